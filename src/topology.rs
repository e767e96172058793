//! The upstream servers and their public names, as one unit.

use std::sync::Arc;

use crate::mcp::router::Router;
use crate::upstream::Server;

/// The upstream servers and their public names, as one unit. A session keeps the topology it
/// opened with, so its names and indices never shift under it; servers added or removed later
/// (admin API, `McpServer` resources) appear in sessions opened afterwards.
pub struct Topology {
    /// Upstream servers, indexed as in the router.
    pub servers: Vec<Arc<Server>>,
    /// Names and resource ownership.
    pub router: Router,
}
