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
pub mod orchestrator;
pub mod plugins;
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
    _plugin_watcher: Option<plugins::Watcher>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A plugin failed to load.
    #[error(transparent)]
    Plugins(#[from] plugins::PluginError),
    /// The listen address could not be bound.
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
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
pub async fn start(config: Config) -> Result<Running, StartError> {
    let gateway = Gateway::new(config)?;
    let listening = listener::bind(gateway.clone()).await?;
    let sweeper = gateway.spawn_sweeper();
    let interval = gateway.config.plugins.watch_interval;
    let watcher =
        (!gateway.config.plugins.modules.is_empty()).then(|| gateway.plugins.watch_every(interval));
    Ok(Running {
        _plugin_watcher: watcher,
        gateway,
        listening,
        sweeper,
    })
}
