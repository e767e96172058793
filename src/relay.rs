//! The relay: the leading replica serves its stdio servers to the other gateway replicas.
//!
//! On Kubernetes, two replicas attached to one stdio pod would read each other's answers (the
//! kubelet merges the stdin of every attachment and copies stdout to each), so only the lease
//! holder attaches ([`crate::orchestrator::kubernetes::attach`]) and the other replicas reach
//! stdio servers here, as Streamable HTTP at `/relay/{server}`.
//!
//! Each relay session stands for one client session of another replica. It joins the server's
//! shared session through its own [`Link`], exactly as a client session of this replica would,
//! so what the shared server sends about one caller reaches only that caller's replica and
//! session. Policy runs on the replica the client talks to, never twice. The relay speaks TLS
//! 1.3 only, and both ends prove the key every replica derives from the replicas' shared secret
//! ([`ReplicaKey`]): a connection that does not is closed before any request is read. A
//! replica that does not lead refuses with 503, and the caller's next call follows the lease
//! to the new leader.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{ACCEPT, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::body::Body;
use crate::gateway::Gateway;
use crate::mcp::front::SESSION_HEADER;
use crate::mcp::handler::{Reply, json_or_stream};
use crate::mcp::jsonrpc::{self, Kind, Message, code};
use crate::mcp::{front, session};
use crate::orchestrator::RelayAccess;
use crate::plugins;
use crate::upstream::{CallOpts, EventSink, Link, Recipient, Route, request_progress_token};

/// Path prefix of the relayed servers.
pub const PATH: &str = "/relay/";
/// Connections served at once. Other replicas hold one each (HTTP/2, every session and stream
/// multiplexed); the rest is headroom for their reconnections.
const MAX_CONNECTIONS: usize = 256;
/// Connections one peer address (an IPv6 peer: its /64) may hold before they prove the
/// replicas' key: a peer that opens many cannot take every slot. A connection that proved it
/// no longer counts (replicas behind one address, a node's SNAT, stay served).
const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// Connections that have not proved the key yet, in all: the rest of [`MAX_CONNECTIONS`]
/// stays for replicas, whatever others open.
const MAX_UNPROVEN: usize = 64;
const _: () = assert!(MAX_UNPROVEN < MAX_CONNECTIONS);
/// Handshakes one peer address may start a second (each costs the relay a key exchange and a
/// signature); replicas behind one address reconnecting at once stay under it.
const HANDSHAKES_PER_PEER: u32 = 32;

/// Log lines a second for relay connections refused for want of room.
static REFUSED_LOGS: crate::log_rate::LogRate = crate::log_rate::LogRate::new(5);
/// Log lines a second for failed handshakes (their own: a prober cannot hide the others).
static HANDSHAKE_LOGS: crate::log_rate::LogRate = crate::log_rate::LogRate::new(5);
/// How often an idle HTTP/2 connection is pinged, and how long a ping may go unanswered.
const PING: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// Calls in flight per relay session (the other replica bounds its own sessions' calls too).
const MAX_IN_FLIGHT: usize = 256;
/// How long a relay that stops lets its connections finish what they have in flight.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Messages waiting for a slow reader of a relay session's GET stream.
const LISTEN_BUFFER: usize = 256;

/// Why the relay refused a request.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("this replica does not lead; ask the lease holder")]
    NotLeading,
    #[error("no orchestrated server is named {0:?}")]
    UnknownServer(String),
    #[error("no relay session {0:?} for this server")]
    UnknownSession(String),
    #[error("this request needs an Mcp-Session-Id (only initialize opens a session)")]
    NoSession,
    #[error("request id {0} is already in flight in this relay session")]
    DuplicateId(String),
    #[error("too many relay sessions ({0})")]
    TooManySessions(usize),
    #[error("too many calls in flight in this relay session ({0})")]
    TooBusy(usize),
    #[error("method {0} is not allowed; use POST, GET or DELETE")]
    Method(Method),
    #[error("Accept must include text/event-stream")]
    Accept,
    #[error(transparent)]
    Front(#[from] front::FrontError),
    #[error("not a JSON-RPC message: {0}")]
    Parse(#[from] jsonrpc::ParseError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("not a plugin state operation: {0}")]
    State(String),
    #[error("the plugin state operation cannot run now: {0}")]
    StateUnavailable(String),
    #[error("this replica leads, or is taking the state over: ask again once it has stepped down")]
    Leading,
    #[error("no plugin state to hand over (replicas do not share it, or it is too large)")]
    NothingToHandOver,
}

impl RelayError {
    fn status(&self) -> StatusCode {
        match self {
            RelayError::NotLeading
            | RelayError::TooManySessions(_)
            | RelayError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RelayError::Leading => StatusCode::CONFLICT,
            RelayError::NothingToHandOver => StatusCode::NOT_FOUND,
            RelayError::UnknownServer(_) | RelayError::UnknownSession(_) => StatusCode::NOT_FOUND,
            RelayError::NoSession | RelayError::DuplicateId(_) => StatusCode::BAD_REQUEST,
            RelayError::TooBusy(_) => StatusCode::TOO_MANY_REQUESTS,
            RelayError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            RelayError::Accept => StatusCode::NOT_ACCEPTABLE,
            RelayError::Front(e) => e.status(),
            RelayError::Parse(_) | RelayError::State(_) => StatusCode::BAD_REQUEST,
            RelayError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn into_response(self) -> Response<Body> {
        let code = match &self {
            RelayError::Parse(e) => e.code(),
            RelayError::Upstream(e) => e.code(),
            RelayError::TooBusy(_) | RelayError::TooManySessions(_) => code::TOO_BUSY,
            RelayError::NotLeading => code::UPSTREAM_UNAVAILABLE,
            _ => code::INVALID_REQUEST,
        };
        front::json_response(
            self.status(),
            jsonrpc::error_response(None, code, &self.to_string()),
        )
    }
}

/// A running relay.
pub struct Relay {
    /// The bound address.
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    state: Arc<State>,
}

impl Relay {
    /// Stops accepting, and ends every relay session.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.state.end_all().await;
    }
}

struct State {
    gw: Arc<Gateway>,
    access: Arc<RelayAccess>,
    sessions: DashMap<Arc<str>, Arc<RelaySession>>,
    /// One permit per relay session (`orchestrator.max_relay_sessions`).
    session_slots: Arc<Semaphore>,
    /// Who may start a handshake.
    admission: Arc<Admission>,
}

/// Who may start a TLS handshake with the relay. A handshake costs the relay a key exchange
/// and a signature before the peer has proved anything, so connections that have not proved
/// the replicas' key yet are bounded: [`MAX_UNPROVEN`] in all (the other slots stay for the
/// replicas), [`MAX_CONNECTIONS_PER_PEER`] and [`HANDSHAKES_PER_PEER`] a second per peer address.
struct Admission {
    unproven: Arc<Semaphore>,
    peers: Mutex<HashMap<std::net::IpAddr, Peer>>,
}

/// What one peer address is doing.
struct Peer {
    /// Its connections that have not proved the key yet.
    unproven: usize,
    /// The second its handshakes are being counted in, and how many it started in it.
    window: Instant,
    started: u32,
}

/// Why a connection was not let start a handshake.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// [`MAX_UNPROVEN`] connections are proving themselves already.
    Busy,
    /// The peer holds [`MAX_CONNECTIONS_PER_PEER`] that have not proved the key.
    PeerHolds,
    /// The peer started [`HANDSHAKES_PER_PEER`] handshakes in the last second.
    PeerTooFast,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy => write!(f, "{MAX_UNPROVEN} connections have not proved the key yet"),
            Refusal::PeerHolds => write!(
                f,
                "this peer holds {MAX_CONNECTIONS_PER_PEER} connections that have not proved the key yet"
            ),
            Refusal::PeerTooFast => write!(
                f,
                "this peer started {HANDSHAKES_PER_PEER} handshakes in the last second"
            ),
        }
    }
}

impl Admission {
    /// Peers remembered before the idle ones are forgotten.
    const REMEMBERED: usize = 4096;

    fn new() -> Arc<Admission> {
        Arc::new(Admission {
            unproven: Arc::new(Semaphore::new(MAX_UNPROVEN)),
            peers: Mutex::default(),
        })
    }

    /// Lets a connection of `ip` start its handshake at `now`, or says why not.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, now: Instant) -> Result<Unproven, Refusal> {
        let mut peers = lock(&self.peers);
        if peers.len() >= Self::REMEMBERED {
            peers.retain(|_, p| p.unproven > 0 || now.duration_since(p.window) < WINDOW);
        }
        let peer = peers.entry(ip).or_insert(Peer {
            unproven: 0,
            window: now,
            started: 0,
        });
        if now.duration_since(peer.window) >= WINDOW {
            (peer.window, peer.started) = (now, 0);
        }
        if peer.unproven >= MAX_CONNECTIONS_PER_PEER {
            return Err(Refusal::PeerHolds);
        }
        if peer.started >= HANDSHAKES_PER_PEER {
            return Err(Refusal::PeerTooFast);
        }
        let permit = self
            .unproven
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        peer.unproven += 1;
        peer.started += 1;
        Ok(Unproven {
            admission: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// The window [`HANDSHAKES_PER_PEER`] counts in.
const WINDOW: Duration = Duration::from_secs(1);

/// A connection that has not proved the key yet; its place is given back when dropped.
struct Unproven {
    admission: Arc<Admission>,
    ip: std::net::IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Unproven {
    fn drop(&mut self) {
        if let Some(peer) = lock(&self.admission.peers).get_mut(&self.ip) {
            peer.unproven -= 1;
        }
    }
}

/// One client session of another replica, on one server.
struct RelaySession {
    id: Arc<str>,
    server: Arc<str>,
    link: Link,
    /// The generation of the link's connection when the session opened: the server the
    /// other replica's client session met (and checked its tools on). A new one (a restart,
    /// a wake) ends the relay session, so that the other replica reconnects and knows.
    generation: u64,
    sink: Arc<RelayRecipient>,
    used: Mutex<Instant>,
    in_flight: Mutex<HashMap<Bytes, oneshot::Sender<()>>>,
    ended: watch::Sender<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A call's place in its session's in-flight table, freed however the call ends (answered,
/// or dropped with its stream).
struct InFlight {
    session: Arc<RelaySession>,
    id: Bytes,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.session.in_flight).remove(&self.id);
    }
}

impl RelaySession {
    fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.ended.subscribe();
        async move {
            let _ = rx.wait_for(|e| *e).await;
        }
    }

    async fn end(&self) {
        self.ended.send_replace(true);
        *lock(&self.sink.listen) = None;
        self.link.close().await;
    }

    /// In use: a call in flight or a listen stream open (its replica's client is there).
    fn busy(&self) -> bool {
        !lock(&self.in_flight).is_empty()
            || lock(&self.sink.listen)
                .as_ref()
                .is_some_and(|tx| !tx.is_closed())
    }
}

/// Where a relay session's server messages go: the stream of the call they concern, else the
/// session's GET stream.
#[derive(Default)]
struct RelayRecipient {
    listen: Mutex<Option<mpsc::Sender<Bytes>>>,
}

impl Recipient for RelayRecipient {
    fn deliver(&self, _index: usize, route: Route, msg: Message) {
        let to = route
            .related
            .filter(|s| !s.is_closed())
            .or(route.fallback)
            .or_else(|| lock(&self.listen).clone().map(EventSink::from));
        if to.is_none_or(|tx| tx.try_send(msg.frame).is_err()) {
            tracing::debug!("relay: dropped a server message nobody listens for");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds `access.listen` and serves the relay until stopped.
pub async fn serve(gw: Arc<Gateway>, access: Arc<RelayAccess>) -> std::io::Result<Relay> {
    let listener = TcpListener::bind(access.listen).await?;
    let local_addr = listener.local_addr()?;
    access.serving(local_addr);
    let state = Arc::new(State {
        session_slots: Arc::new(Semaphore::new(gw.config.orchestrator.max_relay_sessions)),
        admission: Admission::new(),
        gw,
        access,
        sessions: DashMap::new(),
    });
    let (stop, mut stopped) = watch::channel(false);
    let task = {
        let state = state.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            let mut leading = state.access.leading();
            let sweep_every = (state.gw.config.mcp.session_idle_timeout / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(30));
            let mut sweep = tokio::time::interval(sweep_every);
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = sweep.tick() => state.sweep(),
                    // Sessions joined the shared sessions of a leader: they cannot outlive
                    // its leadership (its attachments end with it).
                    Ok(()) = leading.changed() => if !*leading.borrow_and_update() {
                        let state = state.clone();
                        tokio::spawn(async move { state.end_all().await });
                    },
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else {
                            // Out of descriptors, say: do not spin while it lasts.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            if let Some(n) = REFUSED_LOGS.admit() {
                                let more = crate::log_rate::held_back(n);
                                tracing::warn!(%peer, "relay: too many connections ({MAX_CONNECTIONS}); refused one{more}");
                            }
                            continue;
                        };
                        let peer_slot = match state.admission.admit(crate::listener::source(peer.ip()), Instant::now()) {
                            Ok(unproven) => unproven,
                            Err(refusal) => {
                                if let Some(n) = REFUSED_LOGS.admit() {
                                    let more = crate::log_rate::held_back(n);
                                    tracing::warn!(%peer, "relay: {refusal}; refused a connection{more}");
                                }
                                continue;
                            }
                        };
                        let state = state.clone();
                        let mut stopping = stopped.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            let Some(key) = state.access.key() else {
                                tracing::debug!(%peer, "relay: the replicas' key is not known yet; closed a connection");
                                return;
                            };
                            crate::listener::configure_socket(&stream, state.gw.config.mcp.keepalive_interval);
                            // A peer must prove the replicas' key within the header deadline of
                            // connecting: one that sends nothing, or not that, holds no slot longer.
                            let deadline = state.gw.config.mcp.header_timeout;
                            let acceptor = tokio_rustls::TlsAcceptor::from(key.server_config());
                            let stream = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => stream,
                                // (A peer that hung up, or spoke no TLS: nobody to tell.)
                                Ok(Err(e)) if e.kind() != std::io::ErrorKind::InvalidData => {
                                    tracing::debug!(%peer, "relay: a connection ended before it proved the replicas' key: {e}");
                                    return;
                                }
                                Ok(Err(e)) => {
                                    if let Some(n) = HANDSHAKE_LOGS.admit() {
                                        let more = crate::log_rate::held_back(n);
                                        tracing::warn!(%peer, "relay: refused a connection that did not prove the replicas' key: {e}{more}");
                                    }
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "relay: closing a connection that proved no key in {deadline:?}");
                                    return;
                                }
                            };
                            drop(peer_slot);
                            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            builder
                                .http1()
                                .timer(TokioTimer::new())
                                .header_read_timeout(state.gw.config.mcp.header_timeout);
                            // One connection carries every relay session of a replica, each
                            // with its listen stream and calls: hyper's default of 200 streams
                            // would hold calls behind idle streams.
                            let streams = u32::try_from(state.gw.config.orchestrator.max_relay_sessions)
                                .unwrap_or(u32::MAX)
                                .saturating_mul(2)
                                .saturating_add(256);
                            builder
                                .http2()
                                .timer(TokioTimer::new())
                                .max_concurrent_streams(streams)
                                .keep_alive_interval(Some(PING.0))
                                .keep_alive_timeout(PING.1);
                            let service = service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, std::convert::Infallible>(state.handle(req).await) }
                            });
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            tokio::pin!(conn);
                            let ended = tokio::select! {
                                r = conn.as_mut() => r,
                                // The relay stops: what is in flight may finish, a while.
                                () = async { drop(stopping.wait_for(|s| *s).await) } => {
                                    conn.as_mut().graceful_shutdown();
                                    tokio::time::timeout(STOP_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                                }
                            };
                            if let Err(e) = ended {
                                tracing::debug!(%peer, "relay connection ended: {e}");
                            }
                        });
                    }
                }
            }
        })
    };
    Ok(Relay {
        local_addr,
        stop,
        task,
        state,
    })
}

impl State {
    /// Answers one request (of a peer that proved the replicas' key).
    async fn handle(self: &Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        match self.route(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("relay refused a request: {e}");
                e.into_response()
            }
        }
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, RelayError> {
        if req.uri().path() == plugins::leader::HANDOVER_PATH {
            return self.hand_over(&req).await;
        }
        if !self.access.is_leading() {
            return Err(RelayError::NotLeading);
        }
        if req.uri().path() == plugins::leader::PATH {
            return self.plugin_state(req).await;
        }
        let name = req
            .uri()
            .path()
            .strip_prefix(PATH)
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| RelayError::UnknownServer(req.uri().path().to_owned()))?
            .to_owned();
        let session = req
            .headers()
            .get(SESSION_HEADER)
            .map(|s| self.session(&name, s));
        match *req.method() {
            Method::POST => self.post(&name, session, req).await,
            Method::GET => {
                let accepts = req
                    .headers()
                    .get_all(ACCEPT)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")));
                if !accepts {
                    return Err(RelayError::Accept);
                }
                Ok(self.listen(session.ok_or(RelayError::NoSession)??))
            }
            Method::DELETE => {
                let session = session.ok_or(RelayError::NoSession)??;
                self.sessions.remove(&session.id);
                session.end().await;
                Ok(front::accepted())
            }
            ref m => Err(RelayError::Method(m.clone())),
        }
    }

    /// A plugin state operation of another replica's call, run on the state this leader keeps.
    async fn plugin_state(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, RelayError> {
        if req.method() != Method::POST {
            return Err(RelayError::Method(req.method().clone()));
        }
        // Within the header deadline too: a peer that sends its body slowly holds no task.
        let deadline = self.gw.config.mcp.header_timeout;
        let body = Limited::new(req.into_body(), plugins::leader::MAX_ASKED).collect();
        let body = tokio::time::timeout(deadline, body)
            .await
            .map_err(|_| RelayError::State(format!("the body did not come within {deadline:?}")))?
            .map_err(|e| RelayError::State(e.to_string()))?
            .to_bytes();
        let mut asked: plugins::Asked =
            serde_json::from_slice(&body).map_err(|e| RelayError::State(e.to_string()))?;
        // Leadership may have gone while the body came: the state is no longer this one's.
        if !self.access.is_leading() {
            return Err(RelayError::NotLeading);
        }
        let plugins = self.gw.plugins.current();
        // The leader keeps the state: a peer's limits count only below its own configuration's
        // for that plugin (a replica configured otherwise, mid-rollout, or a compromised one
        // cannot raise them).
        if let Some(own) = plugins
            .config()
            .modules
            .iter()
            .find(|m| *m.name == *asked.plugin)
            .map(plugins::PluginConfig::state_limits)
        {
            asked.limits.bytes = asked.limits.bytes.min(own.bytes);
            asked.limits.entries = asked.limits.entries.min(own.entries);
        }
        let state = plugins.state().clone();
        let outcome = state
            .run_here(&asked, plugins::leader::TIMEOUT)
            .await
            .map_err(|e| match e {
                plugins::leader::Unavailable::NoLeader => RelayError::NotLeading,
                e => RelayError::StateUnavailable(e.to_string()),
            })?;
        let answer = serde_json::to_vec(&outcome).map_err(|e| RelayError::State(e.to_string()))?;
        Ok(Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::full(answer))
            .expect("a valid response"))
    }

    /// What this replica kept while it led, for the replica that leads now: only once this one
    /// no longer leads.
    /// (A POST says the next leader took it over: this one may stop.)
    async fn hand_over(
        &self,
        req: &Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, RelayError> {
        let state = self.gw.plugins.current().state().clone();
        if self.access.is_leading() || state.taking_over() {
            return Err(RelayError::Leading);
        }
        match *req.method() {
            Method::GET => {}
            Method::POST => {
                state.taken_over();
                return Ok(Response::new(Body::full(Bytes::new())));
            }
            ref m => return Err(RelayError::Method(m.clone())),
        }
        let snapshot = state.hand_over().await;
        let snapshot = snapshot.ok_or(RelayError::NothingToHandOver)?;
        Ok(Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::full(snapshot))
            .expect("a valid response"))
    }

    fn session(&self, server: &str, id: &HeaderValue) -> Result<Arc<RelaySession>, RelayError> {
        let id = id.to_str().unwrap_or_default();
        self.sessions
            .get(id)
            .map(|s| s.value().clone())
            .filter(|s| *s.server == *server)
            .ok_or_else(|| RelayError::UnknownSession(id.chars().take(64).collect()))
    }

    async fn post(
        self: &Arc<Self>,
        server: &str,
        session: Option<Result<Arc<RelaySession>, RelayError>>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, RelayError> {
        let body = front::read_trusted_body(&self.gw, req).await?;
        let msg = jsonrpc::parse(body)?;
        let session = match (session, &msg.kind) {
            (None, Kind::Request { id, method, params }) if &**method == "initialize" => {
                return self.open(server, id, params.clone()).await;
            }
            (None, _) => return Err(RelayError::NoSession),
            (Some(s), _) => s?,
        };
        *lock(&session.used) = Instant::now();
        match msg.kind {
            Kind::Request { id, method, params } => self.call(&session, id, method, params).await,
            Kind::Notification { method, params } => {
                match &*method {
                    "notifications/initialized" => {}
                    "notifications/cancelled" => {
                        let cancelled = jsonrpc::cancelled_request(params.as_deref())
                            .and_then(|id| lock(&session.in_flight).remove(id));
                        if let Some(cancel) = cancelled {
                            let _ = cancel.send(());
                        }
                    }
                    _ => session.link.notify(&method, params.as_deref()).await,
                }
                Ok(front::accepted())
            }
            Kind::Response { id, outcome } => {
                session.link.respond(&id, &outcome).await;
                Ok(front::accepted())
            }
        }
    }

    /// `initialize`: a new relay session, joined to the server's shared session.
    async fn open(
        self: &Arc<Self>,
        server: &str,
        id: &Bytes,
        params: Option<Bytes>,
    ) -> Result<Response<Body>, RelayError> {
        let slot = self
            .session_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                RelayError::TooManySessions(self.gw.config.orchestrator.max_relay_sessions)
            })?;
        let upstream = self
            .gw
            .topology()
            .servers
            .iter()
            .find(|s| *s.name == *server && s.orchestrated.is_some())
            .cloned()
            .ok_or_else(|| RelayError::UnknownServer(server.to_owned()))?;
        let sink = Arc::new(RelayRecipient::default());
        let link = Link::new(
            upstream,
            None,
            sink.clone(),
            params.unwrap_or_else(|| Bytes::from_static(b"{}")),
            None,
        )
        .attached_only();
        if let Err(e) = link.connection().await {
            link.close().await;
            return Err(e.into());
        }
        // Leadership may have moved while connecting: a session opened now would outlive
        // the sweep that ended the others.
        if !self.access.is_leading() {
            link.close().await;
            return Err(RelayError::NotLeading);
        }
        let result = link
            .init_result()
            .unwrap_or_else(|| Bytes::from_static(b"{}"));
        let session = Arc::new(RelaySession {
            id: session::new_id(),
            server: Arc::from(server),
            generation: link.connection_generation(),
            link,
            sink,
            used: Mutex::new(Instant::now()),
            in_flight: Mutex::new(HashMap::new()),
            ended: watch::Sender::new(false),
            _slot: slot,
        });
        self.sessions.insert(session.id.clone(), session.clone());
        // Leadership may have gone between the check above and the insert, and the sweep of
        // every session with it: looked at again once the session is in the map, so that
        // either the sweep ends it or this does.
        if !self.access.is_leading() {
            self.sessions.remove(&session.id);
            session.end().await;
            return Err(RelayError::NotLeading);
        }
        Ok(front::initialized(id, result, &session.id))
    }

    async fn call(
        &self,
        session: &Arc<RelaySession>,
        id: Bytes,
        method: crate::mcp::jsonrpc::MethodName,
        params: Option<Bytes>,
    ) -> Result<Response<Body>, RelayError> {
        // The server is reached anew (a new process, a new upstream session): the session the
        // other replica opened is gone, and it opens another (a 404 is safe to retry).
        session.link.connection().await?;
        if session.link.connection_generation() != session.generation {
            self.sessions.remove(&session.id);
            session.end().await;
            return Err(RelayError::UnknownSession(session.id.to_string()));
        }
        let (cancel_tx, cancel) = oneshot::channel();
        {
            let mut in_flight = lock(&session.in_flight);
            if in_flight.len() >= MAX_IN_FLIGHT {
                return Err(RelayError::TooBusy(MAX_IN_FLIGHT));
            }
            if in_flight.contains_key(&id) {
                return Err(RelayError::DuplicateId(
                    String::from_utf8_lossy(&id).chars().take(64).collect(),
                ));
            }
            in_flight.insert(id.clone(), cancel_tx);
        }
        let tracked = InFlight {
            session: session.clone(),
            id: id.clone(),
        };
        let (events, events_rx) =
            crate::upstream::event_sink::call_queue(crate::mcp::handler::CALL_QUEUE);
        let opts = CallOpts {
            events: Some(events),
            cancel: Some(cancel),
            // Checked by the replica the client reached.
            progress_token: params
                .as_deref()
                .and_then(|p| request_progress_token(p).ok().flatten()),
            on_connection: Some(session.generation),
            ..CallOpts::default()
        };
        // Met with a new connection, the call was not sent (nor anything streamed): the relay
        // session ends, as above.
        let reconnected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let call = {
            let session = session.clone();
            let reconnected = reconnected.clone();
            async move {
                let outcome = session.link.call(&method, params.as_deref(), opts).await;
                drop(tracked);
                match outcome {
                    Ok(outcome) => jsonrpc::response(&id, &outcome),
                    Err(e) => {
                        if matches!(e, crate::upstream::UpstreamError::Reconnected { .. }) {
                            reconnected.store(true, std::sync::atomic::Ordering::Release);
                        }
                        jsonrpc::error_response(Some(&id), e.code(), &e.to_string())
                    }
                }
            }
        };
        let reply = json_or_stream(Box::pin(call), events_rx, session.ended()).await;
        if matches!(reply, Reply::Json(_)) && reconnected.load(std::sync::atomic::Ordering::Acquire)
        {
            self.sessions.remove(&session.id);
            session.end().await;
            return Err(RelayError::UnknownSession(session.id.to_string()));
        }
        Ok(match reply {
            Reply::Json(frame) => front::json_response(StatusCode::OK, frame),
            Reply::Refused(status, frame) => front::json_response(status, frame),
            Reply::Stream(rx) => front::sse_response(rx),
        })
    }

    /// GET: the session's stream of server messages no call explains (list changes,
    /// resource updates). A newer stream replaces an older one.
    fn listen(&self, session: Arc<RelaySession>) -> Response<Body> {
        *lock(&session.used) = Instant::now();
        let (tx, rx) = mpsc::channel::<Bytes>(LISTEN_BUFFER);
        *lock(&session.sink.listen) = Some(tx.clone());
        front::keep_alive(tx, self.gw.config.mcp.sse_keepalive, session.ended());
        front::sse_response(rx)
    }

    /// Ends relay sessions left idle (no call, no listen stream) for twice the client session
    /// idle timeout: their replica ends its own sessions after one, and says so with DELETE
    /// unless it died.
    fn sweep(&self) {
        let idle = self.gw.config.mcp.session_idle_timeout * 2;
        let expired: Vec<Arc<RelaySession>> = self
            .sessions
            .iter()
            .filter(|s| !s.busy() && lock(&s.used).elapsed() > idle)
            .map(|s| s.value().clone())
            .collect();
        for s in expired {
            self.sessions.remove(&s.id);
            tokio::spawn(async move { s.end().await });
        }
    }

    async fn end_all(&self) {
        let all: Vec<Arc<RelaySession>> = self.sessions.iter().map(|s| s.value().clone()).collect();
        self.sessions.clear();
        futures_util::future::join_all(all.iter().map(|s| s.end())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> std::net::IpAddr {
        std::net::IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_peer_holds_few_unproven_connections_and_starts_few_handshakes_a_second() {
        let admission = Admission::new();
        let t0 = Instant::now();
        let held: Vec<Unproven> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| admission.admit(ip(1), t0).unwrap())
            .collect();
        assert_eq!(admission.admit(ip(1), t0).err(), Some(Refusal::PeerHolds));
        // Another address is not held up.
        let other = admission.admit(ip(2), t0).unwrap();
        drop(held);
        // Proved (or gone): room again, until the peer's handshakes of this second run out.
        for _ in MAX_CONNECTIONS_PER_PEER..HANDSHAKES_PER_PEER as usize {
            drop(admission.admit(ip(1), t0).unwrap());
        }
        assert_eq!(admission.admit(ip(1), t0).err(), Some(Refusal::PeerTooFast));
        assert!(admission.admit(ip(1), t0 + WINDOW).is_ok(), "a new second");
        drop(other);
    }

    #[test]
    fn unproven_connections_leave_room_for_the_replicas() {
        let admission = Admission::new();
        let now = Instant::now();
        let held: Vec<Unproven> = (0..MAX_UNPROVEN)
            .map(|i| admission.admit(ip((i / MAX_CONNECTIONS_PER_PEER) as u8), now))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(admission.admit(ip(200), now).err(), Some(Refusal::Busy));
        drop(held);
        assert!(admission.admit(ip(200), now).is_ok());
        // A refused attempt started no handshake.
        assert_eq!(lock(&admission.peers)[&ip(200)].started, 1);
    }

    #[test]
    fn idle_peers_are_forgotten_once_many_are_remembered() {
        let admission = Admission::new();
        let t0 = Instant::now();
        for i in 0..Admission::REMEMBERED as u32 {
            drop(
                admission
                    .admit(std::net::IpAddr::from(i.to_be_bytes()), t0)
                    .unwrap(),
            );
        }
        let kept = admission.admit(ip(1), t0 + WINDOW).unwrap();
        assert_eq!(lock(&admission.peers).len(), 1, "only the one holding on");
        drop(kept);
    }
}
