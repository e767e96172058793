//! The orchestrator: turns MCP server definitions into running servers and hands the
//! gateway their [`Endpoint`]s.
//!
//! ```text
//! ServerDef ──resolve──▶ ResolvedServer ──Runtime::apply──▶ backend
//!                                                            ├─ local: child process, supervised (restart with backoff, logs)
//!                                                            └─ kubernetes: Deployment + Secret (+ Service), reconcile loop, Lease
//! Runtime::wait_ready / endpoint ──▶ Endpoint::Http { url } | Endpoint::Stdio(StdioEndpoint::open() → (reader, writer))
//! ```
//!
//! Both backends implement [`Runtime`]; the upstream layer only sees [`Endpoint`]s.
//! A stdio endpoint is one long-lived process (or pod): [`StdioEndpoint::open`] attaches
//! a fresh reader/writer pair to it, and a newer attachment replaces the previous one
//! (local) or shares the process (Kubernetes attach). The MCP session inside the
//! process outlives an attachment, so the gateway should keep one attachment per
//! server and multiplex its sessions over it.

pub mod backoff;
pub mod document;
pub mod egress;
pub mod error;
pub mod idle;
pub mod kubernetes;
pub mod local;
pub mod logbuf;
mod port_owner;
pub mod remote;
pub mod spec;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

pub use error::OrchestratorError;
pub use spec::{McpServer, McpServerSpec, ResolvedServer, ServerDef, Sharing, SpecError};

use crate::process::ServerProcess;
use crate::replica_key::ReplicaKey;

/// Result of orchestrator operations.
pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;

/// A backend that runs MCP servers: local processes or Kubernetes pods.
///
/// Every method is idempotent where it can be: applying the same definition twice
/// changes nothing, removing a server that is gone succeeds. Concurrent changes to one
/// server (apply, remove, restart) take effect one after the other, so whichever comes
/// last wins and nothing started by an earlier one outlives it.
pub trait Runtime: Send + Sync {
    /// Backend name for logs and the admin API (`local` or `kubernetes`).
    fn kind(&self) -> &'static str;

    /// Creates or updates a server; returns once the backend has accepted it (not once ready).
    fn apply(&self, server: ResolvedServer) -> BoxFuture<'_, Result<()>>;

    /// Makes the servers defined by the configuration exactly `servers` (at start and on
    /// every reload): applies each one and removes the others that came from `apply`.
    ///
    /// On Kubernetes, objects left by servers that are no longer defined (say, removed
    /// from the config while the gateway was down) are deleted only once `sync` has run,
    /// so a restarting gateway never tears down servers it has not been told about yet.
    /// Servers declared as `McpServer` resources are not affected.
    fn sync(&self, servers: Vec<ResolvedServer>) -> BoxFuture<'_, Result<()>>;

    /// Adds or updates a server on an operator's behalf (the admin API). Where the backend
    /// can, the definition outlives this process and reaches every replica: an `McpServer`
    /// resource on Kubernetes. Locally it is [`Runtime::apply`].
    fn declare(&self, def: ServerDef) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.apply(def.resolve()?).await })
    }

    /// [`Runtime::declare`] of a new server only: where several replicas may define servers
    /// at once, one defined meanwhile by any of them is not replaced ([`OrchestratorError::Exists`]).
    /// Locally the caller serializes its own changes.
    fn declare_new(&self, def: ServerDef) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.status(&def.name).await.is_ok() {
                return Err(OrchestratorError::Exists(def.name));
            }
            self.declare(def).await
        })
    }

    /// Waits until the server is ready and returns its endpoint; fails fast on a fatal state.
    fn wait_ready<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Endpoint>>;

    /// The server's endpoint as of now (it may not be ready).
    fn endpoint<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Endpoint>>;

    /// Stops an idle server until the next [`Runtime::wait_ready`] wakes it (Kubernetes:
    /// its Deployment scales to zero, by the replica that leads).
    fn sleep<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;

    /// How the server is used, when it may sleep while idle (its definition's `idle`, or
    /// the operator's default).
    fn usage(&self, name: &str) -> Option<Arc<idle::Usage>> {
        let _ = name;
        None
    }

    /// The server's current status.
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServerStatus>>;

    /// Every server this runtime manages, with its status, sorted by name.
    fn list(&self) -> BoxFuture<'_, Vec<(String, ServerStatus)>>;

    /// Restarts the server's process (local) or pod (Kubernetes).
    fn restart<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;

    /// The server's recent output; `previous` asks for the run before the last restart.
    fn logs<'a>(&'a self, name: &'a str, opts: LogOptions) -> BoxFuture<'a, Result<String>>;

    /// Stops the server and removes everything that was created for it.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;

    /// The gateway is stopping: local processes are stopped; on Kubernetes the servers keep
    /// running and the reconcile lease is released so another replica takes over.
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// How this replica serves its stdio servers to the other replicas, when there can be
    /// several (Kubernetes with leader election and a relay port).
    fn relay(&self) -> Option<Arc<RelayAccess>> {
        None
    }

    /// How server `name`'s egress is enforced, in a line for operators (`None`: the server
    /// declares none and nothing applies).
    fn egress(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }

    /// A document that every replica of the gateway shares and that outlives them (key `key`
    /// of ConfigMap `name` on Kubernetes); `None` where the backend keeps none (local).
    fn document(&self, name: &str, key: &'static str) -> Option<Arc<dyn document::DocumentStore>> {
        let _ = (name, key);
        None
    }

    /// Checks every address a remote server's host resolves to, at each connection (`None`:
    /// any address will do).
    fn remote_addresses(&self) -> Option<remote::AddressCheck> {
        None
    }

    /// The Kubernetes API and the namespace the backend works in, where it has them (the
    /// registry keeps its catalog there, shared by every replica).
    fn cluster(&self) -> Option<(kube::Client, String)> {
        None
    }

    /// The definition of server `name` as the backend keeps it (an `McpServer` resource's
    /// spec, its secret values stored apart), when it keeps one that outlives the gateway.
    fn definition<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<McpServerSpec>> {
        let _ = name;
        Box::pin(futures_util::future::ready(None))
    }
}

/// What the gateway needs to run the relay: several replicas must not attach to one stdio
/// pod (the kubelet merges their stdin and copies stdout to each), so only the leader
/// attaches and the other replicas reach stdio servers through its relay.
pub struct RelayAccess {
    /// Where to listen.
    pub listen: std::net::SocketAddr,
    /// The bound address, published to the other replicas (through the Lease).
    advertised: tokio::sync::watch::Sender<Option<String>>,
    /// Whether this replica leads (only the leader serves the relay).
    leading: tokio::sync::watch::Receiver<bool>,
    /// The keys of the replicas' shared secret, once it is read (or created).
    key: tokio::sync::watch::Receiver<Option<Arc<ReplicaKey>>>,
    /// The leader's relay (its base URL), when another replica leads.
    holder: tokio::sync::watch::Receiver<Option<String>>,
    /// Whom this replica took the lease from, as it last came to lead.
    handover: tokio::sync::watch::Receiver<Handover>,
}

/// Whom a replica that has come to lead takes what the leader keeps (the plugins' state) from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Handover {
    /// Nobody: no replica held the lease before, or the one that did signed no relay.
    #[default]
    Nobody,
    /// Itself: it held the lease before and nobody took it since (its renewals failed for a
    /// while), so what it kept stands.
    Kept,
    /// The replica that held the lease before, at its relay's base URL (signed by it).
    From(String),
}

impl RelayAccess {
    /// Access for a replica listening on `listen`.
    pub fn new(
        listen: std::net::SocketAddr,
        leading: tokio::sync::watch::Receiver<bool>,
        key: tokio::sync::watch::Receiver<Option<Arc<ReplicaKey>>>,
        holder: tokio::sync::watch::Receiver<Option<String>>,
        handover: tokio::sync::watch::Receiver<Handover>,
    ) -> Self {
        RelayAccess {
            listen,
            advertised: tokio::sync::watch::Sender::new(None),
            leading,
            key,
            holder,
            handover,
        }
    }

    /// The relay is bound to `addr`: other replicas will be told to use it.
    pub fn serving(&self, addr: std::net::SocketAddr) {
        self.advertised
            .send_replace(Some(format!("https://{addr}")));
    }

    /// The advertised base URL, once serving.
    pub fn advertised(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.advertised.subscribe()
    }

    /// Whether this replica leads now.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Changes of leadership.
    pub fn leading(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leading.clone()
    }

    /// The replicas' key, when known.
    pub fn key(&self) -> Option<Arc<ReplicaKey>> {
        self.key.borrow().clone()
    }

    /// The replicas' key, as it becomes known.
    pub fn keys(&self) -> tokio::sync::watch::Receiver<Option<Arc<ReplicaKey>>> {
        self.key.clone()
    }

    /// The leader's relay (its base URL) as it changes; `None` while this replica leads or
    /// no leader is known.
    pub fn holder(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.holder.clone()
    }

    /// Whom this replica took the lease from, as it last came to lead (set before `leading`
    /// turns true).
    pub fn handover(&self) -> tokio::sync::watch::Receiver<Handover> {
        self.handover.clone()
    }
}

/// What [`Runtime::logs`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// The previous run's output (after a crash or restart).
    pub previous: bool,
    /// Only the last N lines.
    pub tail_lines: Option<usize>,
}

/// How the gateway reaches a server.
#[derive(Clone)]
pub enum Endpoint {
    /// A Streamable HTTP server at this URL.
    Http {
        /// The MCP endpoint, e.g. `http://mcp-x.ns.svc:8080/mcp`.
        url: String,
    },
    /// A server that runs elsewhere (a remote), reached at its URL with its headers.
    Remote {
        /// The MCP endpoint (the SSE stream for `sse`).
        url: String,
        /// Headers for every request; their values may be secret.
        headers: Vec<(String, String)>,
        /// It speaks the 2024-11-05 HTTP+SSE transport.
        sse: bool,
    },
    /// A stdio server: open a byte stream to its stdin/stdout on demand.
    Stdio(StdioEndpoint),
    /// A server another replica (the leader) reaches for this one (a stdio server it is
    /// attached to, an HTTP server that may sleep), through that replica's relay as
    /// Streamable HTTP (see [`RelayAccess`]).
    Relay {
        /// The relay's URL for this server, e.g. `https://10.0.0.7:9091/relay/x`.
        url: String,
        /// The replicas' key, which the relay and this replica prove to each other.
        key: Arc<ReplicaKey>,
        /// The server answers every caller alike (an HTTP server, a shared stdio server):
        /// what it lists may be kept for all.
        alike: bool,
    },
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Http { url } => f.debug_struct("Http").field("url", url).finish(),
            // Header values may be secrets: their names only.
            Endpoint::Remote { url, headers, sse } => f
                .debug_struct("Remote")
                .field("url", url)
                .field("headers", &headers.iter().map(|h| &h.0).collect::<Vec<_>>())
                .field("sse", sse)
                .finish(),
            Endpoint::Stdio(s) => f.debug_tuple("Stdio").field(&s.describe()).finish(),
            Endpoint::Relay { url, .. } => f.debug_struct("Relay").field("url", url).finish(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Http { url } | Endpoint::Remote { url, .. } => f.write_str(url),
            Endpoint::Stdio(s) => f.write_str(&s.describe()),
            Endpoint::Relay { url, .. } => write!(f, "{url} (the leader's relay)"),
        }
    }
}

/// Opens byte streams to a stdio server; implemented by each backend.
pub trait StdioConnector: Send + Sync {
    /// Attaches a fresh reader/writer pair to the server's stdout/stdin.
    fn open(&self) -> BoxFuture<'_, Result<StdioStream>>;
    /// Starts a process of the server for one session or one principal alone (the stream
    /// owns it: shutting the connection down stops it), for `principal` (`None`: an
    /// unauthenticated session): it keeps its files apart from every other principal's.
    fn open_private<'a>(&'a self, principal: Option<&'a str>)
    -> BoxFuture<'a, Result<StdioStream>>;
    /// Who shares the server's process.
    fn sharing(&self) -> Sharing;
    /// A short description for logs, e.g. `local process` or `pod ns/mcp-x (attach)`.
    fn describe(&self) -> String;
}

/// A handle that opens [`StdioStream`]s to one stdio server.
#[derive(Clone)]
pub struct StdioEndpoint(Arc<dyn StdioConnector>);

impl StdioEndpoint {
    /// Wraps a backend's connector.
    pub fn new(connector: Arc<dyn StdioConnector>) -> Self {
        StdioEndpoint(connector)
    }

    /// Attaches a fresh reader/writer pair to the server's stdout/stdin.
    pub async fn open(&self) -> Result<StdioStream> {
        self.0.open().await
    }

    /// Starts a process of the server for one session or principal alone, for `principal`.
    pub async fn open_private(&self, principal: Option<&str>) -> Result<StdioStream> {
        self.0.open_private(principal).await
    }

    /// Who shares the server's process.
    pub fn sharing(&self) -> Sharing {
        self.0.sharing()
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        self.0.describe()
    }
}

/// One attachment to a stdio server: JSON-RPC lines go to `writer`, answers come from `reader`.
pub struct StdioStream {
    /// The server's stdout.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    /// The server's stdin. Shutting it down ends the attachment, not the server.
    pub writer: Pin<Box<dyn AsyncWrite + Send>>,
    /// The process, when the stream owns it (a private process).
    pub process: Option<ServerProcess>,
}

impl fmt::Debug for StdioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StdioStream")
    }
}

/// Where a server is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Accepted; nothing runs yet (no pod, or the process is about to start).
    Pending,
    /// Running but not ready yet (container starting, readiness not reached).
    Starting,
    /// Ready to serve.
    Ready,
    /// Exited; waiting before the next restart.
    BackOff {
        /// Time until the next attempt.
        #[serde(with = "humantime_serde")]
        retry_in: Duration,
    },
    /// Cannot become ready without a change (bad image, missing config, no node...).
    Failed {
        /// Why.
        reason: FailureReason,
    },
    /// Stopped while idle; the next call wakes it.
    Asleep,
    /// Stopped and removed.
    Removed,
}

impl Phase {
    /// A one-word name: `Pending`, `Starting`, `Ready`, `BackOff`, `Failed`, `Asleep`, `Removed`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Starting => "Starting",
            Phase::Ready => "Ready",
            Phase::BackOff { .. } => "BackOff",
            Phase::Failed { .. } => "Failed",
            Phase::Asleep => "Asleep",
            Phase::Removed => "Removed",
        }
    }
}

/// Why a server cannot become ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureReason {
    /// The container keeps exiting (Kubernetes `CrashLoopBackOff`).
    CrashLoopBackOff,
    /// The image cannot be pulled (`ImagePullBackOff`, `ErrImagePull`, `InvalidImageName`).
    ImagePull,
    /// The container cannot be created from its spec (`CreateContainerConfigError`, e.g. a missing Secret key).
    CreateContainerConfig,
    /// No node can run the pod (`Unschedulable`).
    Unschedulable,
    /// The local process cannot be started (missing executable, permissions...).
    SpawnFailed,
    /// The local process exited too many times in a row.
    TooManyRestarts,
    /// The definition is invalid (an `McpServer` resource that fails validation).
    InvalidDefinition,
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureReason::CrashLoopBackOff => "CrashLoopBackOff",
            FailureReason::ImagePull => "ImagePullBackOff",
            FailureReason::CreateContainerConfig => "CreateContainerConfigError",
            FailureReason::Unschedulable => "Unschedulable",
            FailureReason::SpawnFailed => "SpawnFailed",
            FailureReason::TooManyRestarts => "TooManyRestarts",
            FailureReason::InvalidDefinition => "InvalidDefinition",
        })
    }
}

/// A server's status as the admin API and the gateway see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    /// Where the server is in its life.
    #[serde(flatten)]
    pub phase: Phase,
    /// Details: the last exit, the kubelet's message, the pod name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Restarts so far (process restarts, or the container's restart count).
    pub restarts: u32,
    /// When the phase last changed.
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
}

impl ServerStatus {
    /// A status in `phase` since now.
    pub fn new(phase: Phase) -> Self {
        ServerStatus {
            phase,
            message: None,
            restarts: 0,
            since: SystemTime::now(),
        }
    }

    /// With a message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Whether the server is ready to serve.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Changes the phase, keeping `since` when it stays the same.
    pub fn set_phase(&mut self, phase: Phase) {
        if std::mem::discriminant(&self.phase) != std::mem::discriminant(&phase) {
            self.since = SystemTime::now();
        }
        self.phase = phase;
    }
}

/// Picks the backend from the environment: Kubernetes when a kubeconfig or in-cluster
/// loading is configured (see [`kubernetes::KubeSettings::from_env`]), otherwise local.
pub async fn from_env() -> Result<Arc<dyn Runtime>> {
    match kubernetes::KubeSettings::from_env()? {
        Some(settings) => Ok(Arc::new(kubernetes::KubeRuntime::start(settings).await?)),
        None => Ok(Arc::new(local::LocalRuntime::new(local::LocalSettings {
            idle_after: idle::default_after(|k| std::env::var(k).ok())
                .map_err(OrchestratorError::Settings)?,
            ..local::LocalSettings::default()
        }))),
    }
}
