//! Gatehouse: one MCP endpoint in front of many MCP servers.
//!
//! A request flows top-down through these modules:
//! [`listener`] (TCP, HTTP, deadlines) → [`auth`] (bearer token → principal) →
//! [`mcp::front`] (Streamable HTTP rules, sessions) → [`mcp::handler`] + [`mcp::router`]
//! (which upstream, fan-out and merge) → [`upstream`] (stdio process or HTTP session).
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod config;
pub mod example_server;
pub mod gateway;
pub mod listener;
pub mod mcp;
pub mod metrics;
pub mod sse;
pub mod telemetry;
pub mod upstream;

use std::sync::Arc;

pub use config::Config;
pub use gateway::Gateway;

/// A gateway that is serving.
pub struct Running {
    /// Shared state.
    pub gateway: Arc<Gateway>,
    /// The listener.
    pub listening: listener::Listening,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends every session and its upstreams.
    pub async fn shutdown(self) {
        self.listening.stop().await;
        self.sweeper.abort();
        self.gateway.shutdown().await;
    }
}

/// Builds the gateway and starts serving.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let gateway = Gateway::new(config);
    let listening = listener::bind(gateway.clone()).await?;
    let sweeper = gateway.spawn_sweeper();
    Ok(Running {
        gateway,
        listening,
        sweeper,
    })
}
