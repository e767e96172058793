//! The MCP protocol revisions the gateway speaks.

/// Protocol revisions served with sessions (`initialize`), newest first.
pub const SUPPORTED: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// The revision the gateway asks upstreams for, and answers a client whose own it does not know.
pub const LATEST: &str = SUPPORTED[0];

/// The stateless revision: no sessions, every request carries its version in `_meta`.
pub const STATELESS: &str = "2026-07-28";

/// Log severities, lowest first (RFC 5424 names, as every revision uses them).
pub const LOG_LEVELS: [&str; 8] = [
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];

/// Every revision the endpoint answers, newest first (what an unsupported-version error lists).
pub const ALL: &[&str] = &[
    STATELESS,
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];

/// The 2026-07-28 request envelope: the `_meta` keys in which every request carries what a
/// session once held. Other `io.modelcontextprotocol/` keys are not the envelope's.
pub mod envelope {
    /// The request's protocol revision.
    pub const VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    /// The client's capabilities.
    pub const CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    /// The client's name and version.
    pub const INFO: &str = "io.modelcontextprotocol/clientInfo";
    /// The log level the client asks for this request.
    pub const LEVEL: &str = "io.modelcontextprotocol/logLevel";
    /// All of them: what a server of an earlier revision is not sent.
    pub const KEYS: [&str; 4] = [VERSION, CAPABILITIES, INFO, LEVEL];
}
