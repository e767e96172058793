//! The MCP layer: transport front, JSON-RPC envelopes, sessions, routing and method handling.

pub mod cursor;
pub mod front;
pub mod handler;
pub mod http_sse;
pub mod jsonrpc;
pub mod list_page;
pub(crate) mod lookalike;
pub mod param_headers;
pub mod policy;
pub mod principal_counts;
pub mod profile;
pub mod queued_bytes;
pub mod resource_walk;
pub mod resume;
pub mod revision;
pub mod round_trip;
pub mod router;
pub mod seal;
pub mod session;
pub mod session_token;
pub mod sse_client;
pub mod stateless;
pub mod subscriptions;
