//! Gatehouse: one MCP endpoint in front of many MCP servers.
//!
//! A request flows top-down through these modules:
//! [`listener`] (TCP, HTTP, deadlines) → [`auth`] (bearer token → principal) →
//! [`mcp::front`] (Streamable HTTP rules, sessions) → [`mcp::handler`] + [`mcp::router`]
//! (which upstream, fan-out and merge) → [`mcp::policy`] (Wasm plugins) → [`upstream`] (stdio
//! process, HTTP session, or a server the [`orchestrator`] runs).
//! Beside it, [`admin`] manages the orchestrated servers, and [`relay`] serves this replica's
//! stdio servers to the other replicas when it leads.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod body_room;
pub mod boxed;
pub mod config;
pub mod console;
pub mod example_server;
pub mod gateway;
pub mod json_scan;
pub mod json_string;
pub mod listener;
pub mod log_rate;
pub mod mcp;
pub mod metrics;
pub mod needle;
pub mod orchestrator;
pub mod otlp;
pub mod outbound_tls;
pub mod pins;
pub mod pipe;
pub mod plugins;
pub mod private_file;
pub mod process;
pub mod registry;
pub mod relay;
pub mod replica_key;
pub mod serving;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod trace;
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
    /// The relay, when this replica serves stdio servers to the others.
    pub relay: Option<relay::Relay>,
    sweeper: tokio::task::JoinHandle<()>,
    refresher: Option<tokio::task::JoinHandle<()>>,
    /// Puts idle servers to sleep.
    idler: Option<tokio::task::JoinHandle<()>>,
    tls_reload: Option<tokio::task::JoinHandle<()>>,
    _plugin_watcher: Option<plugins::Watcher>,
    /// The threads client connections are pinned to: they end last, once the gateway has shut
    /// down (or when this is dropped).
    serving: Option<Arc<serving::Serving>>,
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
    /// The audit trail could not be opened.
    #[error("audit trail: {0}")]
    Audit(std::io::Error),
    /// The tool pins could not be loaded.
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The registry's catalog could not be opened.
    #[error("registry: {0}")]
    Registry(#[from] registry::CatalogError),
    /// The orchestrator could not start or accept the configured servers.
    #[error("orchestrator: {0}")]
    Orchestrator(#[from] orchestrator::OrchestratorError),
    /// The threads client connections are pinned to could not start.
    #[error("cannot start the serving threads: {0}")]
    Serving(std::io::Error),
}

impl Running {
    /// Stops accepting, ends every session and its upstreams, and (where replicas elect a
    /// leader) gives leadership up, handing what the leader keeps to the next one.
    pub async fn shutdown(self) {
        self.listening.stop().await;
        self.sweeper.abort();
        if let Some(r) = &self.refresher {
            r.abort();
        }
        if let Some(i) = &self.idler {
            i.abort();
        }
        if let Some(r) = &self.tls_reload {
            r.abort();
        }
        self.gateway.shutdown().await;
        if let Some(o) = &self.gateway.orchestrator {
            o.shutdown().await;
        }
        if let Some(r) = self.relay {
            // No longer leading, the relay serves the next leader what this one kept.
            let state = self.gateway.plugins.current().state().clone();
            state.handed_over(HANDOVER_WAIT).await;
            r.stop().await;
        }
        // The connections still open end with their threads, before the audit trail closes:
        // what their drop records (an abandoned call) is written.
        if let Some(serving) = self.serving.and_then(|s| Arc::try_unwrap(s).ok()) {
            serving.stop().await;
        }
        self.gateway.audit.close().await;
    }
}

/// How long a replica that led waits, as it stops, for the next leader to take over what it
/// kept (a candidate retries the lease every 2 s).
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the topology is compared with the orchestrator's (in-memory) list of servers.
const TOPOLOGY_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);
/// How often idle servers are looked for (a scan of in-memory state).
const IDLE_SWEEP: std::time::Duration = std::time::Duration::from_millis(500);

/// Builds the gateway and starts serving. The orchestrator (picked from the environment, see
/// [`orchestrator::from_env`]) starts when the configuration defines servers or the admin API.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let orchestrator = if config.servers.is_empty() && config.admin_tokens.is_empty() {
        None
    } else {
        Some(orchestrator::from_env().await?)
    };
    start_with(config, orchestrator).await
}

/// Like [`start`], with a given orchestrator.
pub async fn start_with(
    config: Config,
    orchestrator: Option<Arc<dyn orchestrator::Runtime>>,
) -> Result<Running, StartError> {
    if let Some(o) = &orchestrator {
        o.sync(config.servers.clone()).await?;
        tracing::info!(
            backend = o.kind(),
            servers = config.servers.len(),
            "orchestrator started"
        );
    }
    let audit = match &config.audit {
        Some(settings) => audit::Audit::start(settings).map_err(StartError::Audit)?,
        None => audit::Audit::default(),
    };
    let pins = match &config.pinning {
        Some(settings) => Some(pins::Pins::start(settings, orchestrator.as_deref()).await?),
        None => None,
    };
    let outbound_tls = outbound_tls::client_config(&config.outbound_tls)?;
    let listener_tls = config
        .tls
        .as_ref()
        .map(tls::ListenerTls::load)
        .transpose()?;
    let registry = match config.registry.enabled {
        true => {
            let cluster = orchestrator.as_ref().and_then(|o| o.cluster());
            Some(registry::open(config.registry.file.clone(), cluster).await?)
        }
        false => None,
    };
    let gateway = Gateway::new(config, orchestrator, audit, pins, outbound_tls)?;
    if let Some(r) = registry {
        let _ = gateway.registry.set(r);
    }
    let refresher = gateway
        .orchestrator
        .is_some()
        .then(|| gateway.spawn_topology_refresh(TOPOLOGY_REFRESH));
    gateway.refresh_topology().await;
    gateway.listings_loaded().await;
    let relay = match gateway.orchestrator.as_ref().and_then(|o| o.relay()) {
        Some(access) => {
            // Replicas that elect a leader share the plugins' state through it.
            let leader = plugins::leader::Leader::new(
                access.leading(),
                access.holder(),
                access.keys(),
                access.handover(),
            );
            // A session's state outlives its use as long as the session may: a portable one
            // may come back until its id expires.
            let mcp = &gateway.config.mcp;
            let retention = mcp
                .session_max_age
                .max(mcp.session_idle_timeout.saturating_mul(2));
            gateway
                .plugins
                .current()
                .state()
                .share_through(leader, retention);
            Some(relay::serve(gateway.clone(), access).await?)
        }
        None => None,
    };
    let tls_reload = listener_tls.as_ref().map(|t| t.spawn_reload());
    // As many serving threads as the runtime has workers (configured, from the environment, or
    // one per CPU).
    let serving = match gateway.config.pinned_connections {
        true => {
            let threads = tokio::runtime::Handle::current().metrics().num_workers();
            let serving = serving::Serving::start(threads).map_err(StartError::Serving)?;
            tracing::info!(threads, "client connections pinned to threads");
            Some(Arc::new(serving))
        }
        false => None,
    };
    let listening = listener::bind(gateway.clone(), listener_tls, serving.clone()).await?;
    let sweeper = gateway.spawn_sweeper();
    let idler = gateway
        .orchestrator
        .as_ref()
        .map(|o| tokio::spawn(orchestrator::idle::sweep(Arc::downgrade(o), IDLE_SWEEP)));
    let interval = gateway.config.plugins.watch_interval;
    let watcher =
        (!gateway.config.plugins.modules.is_empty()).then(|| gateway.plugins.watch_every(interval));
    Ok(Running {
        serving,
        tls_reload,
        _plugin_watcher: watcher,
        gateway,
        listening,
        relay,
        sweeper,
        refresher,
        idler,
    })
}
