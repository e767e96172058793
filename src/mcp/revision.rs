//! The MCP protocol revisions the gateway speaks.

/// Protocol revisions served, newest first.
pub const SUPPORTED: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

/// The revision the gateway asks upstreams for, and answers a client whose own it does not know.
pub const LATEST: &str = SUPPORTED[0];
