//! The gateway's shared state: configuration, upstream servers, routing table, sessions, metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;

use crate::auth::{Auth, Principal};
use crate::config::Config;
use crate::mcp::router::Router;
use crate::mcp::session::Session;
use crate::metrics::Metrics;
use crate::plugins::{PluginError, Plugins};
use crate::upstream::{Server, http};

/// Everything a request may need, shared by all connections.
pub struct Gateway {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Upstream servers, indexed as in the router.
    pub servers: Vec<Arc<Server>>,
    /// Names and resource ownership.
    pub router: Router,
    /// Open sessions by id.
    pub sessions: DashMap<Arc<str>, Arc<Session>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Client authentication.
    pub auth: Auth,
    /// Policy plugins (hot-reloadable).
    pub plugins: Arc<Plugins>,
    epoch: Instant,
}

impl Gateway {
    /// Builds the gateway from a validated configuration, loading its plugins.
    pub fn new(config: Config) -> Result<Arc<Gateway>, PluginError> {
        let plugins = Plugins::load(&config.plugins)?;
        let metrics = Metrics::new();
        let client = http::client();
        let servers: Vec<Arc<Server>> = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| Arc::new(Server::new(i, u.clone(), client.clone(), metrics.clone())))
            .collect();
        let router = Router::new(
            config.upstreams.iter().map(|u| u.name.clone()).collect(),
            config.mcp.name_separator.clone(),
            config.mcp.prefix_names,
        );
        Ok(Arc::new(Gateway {
            plugins,
            auth: Auth::new(&config.tokens),
            config: Arc::new(config),
            servers,
            router,
            sessions: DashMap::new(),
            metrics,
            epoch: Instant::now(),
        }))
    }

    /// Opens a session with a fresh, unguessable id.
    pub fn new_session(
        &self,
        principal: Option<Principal>,
        version: &'static str,
        init_params: Bytes,
        eager_listen: bool,
    ) -> Arc<Session> {
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).expect("the OS random source is available");
        let id: Arc<str> = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(raw)
            .into();
        let session = Session::new(
            id.clone(),
            principal,
            version,
            &self.servers,
            init_params,
            eager_listen,
            self.epoch,
        );
        self.sessions.insert(id, session.clone());
        self.metrics.sessions.set(self.sessions.len() as i64);
        session
    }

    /// Ends a session and, in the background, its upstream sessions.
    pub fn end_session(&self, id: &str) {
        if let Some((_, session)) = self.sessions.remove(id) {
            self.metrics.sessions.set(self.sessions.len() as i64);
            self.plugins.current().end_session(id);
            tokio::spawn(async move { session.close().await });
        }
    }

    /// Ends sessions idle for longer than the configured timeout.
    pub fn sweep(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = self.config.mcp.session_idle_timeout.as_millis() as u64;
        let expired: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|s| s.expired(now, idle))
            .map(|s| s.key().clone())
            .collect();
        for id in expired {
            tracing::info!(session = %id, "session expired after idling");
            self.end_session(&id);
        }
    }

    /// Runs [`Gateway::sweep`] periodically.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gw = Arc::downgrade(self);
        let every = (self.config.mcp.session_idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match gw.upgrade() {
                    Some(gw) => gw.sweep(),
                    None => return,
                }
            }
        })
    }

    /// Ends every session, waiting for upstreams to shut down (bounded).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Session>> = self.sessions.iter().map(|s| s.value().clone()).collect();
        self.sessions.clear();
        self.metrics.sessions.set(0);
        let close = futures_util::future::join_all(all.iter().map(|s| s.close()));
        let _ = tokio::time::timeout(Duration::from_secs(10), close).await;
    }
}
