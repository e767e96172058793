//! The MCP protocol revisions the gateway speaks.

/// Protocol revisions served with sessions (`initialize`), newest first.
pub const SUPPORTED: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// The revision the gateway asks upstreams for, and answers a client whose own it does not know.
pub const LATEST: &str = SUPPORTED[0];

/// The stateless revision: no sessions, every request carries its version in `_meta`.
pub const STATELESS: &str = "2026-07-28";

/// Every revision the endpoint answers, newest first (what an unsupported-version error lists).
pub const ALL: &[&str] = &[
    STATELESS,
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];
