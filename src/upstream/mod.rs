//! Upstream MCP servers: one [`Link`] per (downstream session, upstream server), over stdio or Streamable HTTP.
//!
//! A link connects lazily, performs the MCP handshake with the client's own capabilities, remaps
//! JSON-RPC ids (each connection numbers its own requests), enforces the per-call deadline and
//! reconnects after the server exits or forgets the session.

pub mod http;
pub mod orchestrated;
pub mod shared;
pub mod stdio;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Transport, UpstreamConfig};
use crate::mcp::jsonrpc::{self, Message, Outcome, code};
use crate::metrics::Metrics;

/// Frames (JSON-RPC messages) bound for one downstream stream.
pub type EventSink = mpsc::Sender<Bytes>;

/// Why an upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The server could not be reached, exited, or broke the protocol.
    #[error("upstream '{server}' is unavailable: {reason}")]
    Unavailable {
        /// Upstream name.
        server: Arc<str>,
        /// What happened.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("upstream '{server}' did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// Upstream name.
        server: Arc<str>,
        /// The deadline.
        timeout: Duration,
    },
    /// The server no longer knows our session (HTTP 404, or 400 from servers that answer so);
    /// the request was not processed.
    #[error("upstream '{server}' refused the session: {detail}")]
    SessionExpired {
        /// Upstream name.
        server: Arc<str>,
        /// What the server said.
        detail: String,
    },
    /// The client cancelled the request.
    #[error("request cancelled")]
    Cancelled,
}

impl UpstreamError {
    /// The JSON-RPC error code sent to the client.
    pub fn code(&self) -> i64 {
        match self {
            UpstreamError::Timeout { .. } => code::UPSTREAM_TIMEOUT,
            UpstreamError::Cancelled => code::REQUEST_CANCELLED,
            _ => code::UPSTREAM_UNAVAILABLE,
        }
    }
}

/// Which downstream streams a server message may take.
#[derive(Default, Clone)]
pub struct Route {
    /// The stream of the client request the message belongs to, when known.
    pub related: Option<EventSink>,
    /// A stream of the same session to use when nothing better is open (a guess among calls in
    /// flight: the client handles messages from every stream of its session alike).
    pub fallback: Option<EventSink>,
}

impl Route {
    /// A route to the stream of a known request.
    pub fn related(events: Option<EventSink>) -> Self {
        Route {
            related: events,
            fallback: None,
        }
    }
}

/// Receives what an upstream sends that is not a response to one of our requests.
pub trait ServerMessages: Send + Sync + 'static {
    /// Handles a server→client request or notification from upstream `index`.
    fn deliver(&self, index: usize, route: Route, msg: Message);
}

/// An upstream server as configured, shared by every session.
pub struct Server {
    /// Position in the routing table.
    pub index: usize,
    /// Name (also the tool prefix).
    pub name: Arc<str>,
    /// Name as a metrics label.
    pub label: &'static str,
    /// Its configuration.
    pub config: UpstreamConfig,
    /// Connection pool for HTTP upstreams.
    pub http: http::Client,
    /// Gateway metrics.
    pub metrics: Arc<Metrics>,
    /// The orchestrator running this server, for [`Transport::Orchestrated`] upstreams.
    pub orchestrated: Option<orchestrated::Orchestrated>,
}

impl Server {
    /// Builds the shared server record.
    pub fn new(
        index: usize,
        config: UpstreamConfig,
        http: http::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        Server {
            index,
            name: Arc::from(config.name.as_str()),
            label: label_of(&config.name),
            config,
            http,
            metrics,
            orchestrated: None,
        }
    }

    /// With the orchestrator that runs it.
    pub fn with_orchestrator(mut self, o: orchestrated::Orchestrated) -> Self {
        self.orchestrated = Some(o);
        self
    }

    pub(crate) fn unavailable(&self, reason: impl Into<String>) -> UpstreamError {
        UpstreamError::Unavailable {
            server: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// A static metrics label for a server name.
///
/// Names are few (configuration and admin API), so each distinct one is leaked once and
/// reused: allocation-free labels without growing when a server is re-added.
fn label_of(name: &str) -> &'static str {
    static LABELS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = labels.iter().find(|l| **l == name) {
        return l;
    }
    let l: &'static str = Box::leak(name.to_owned().into_boxed_str());
    labels.push(l);
    l
}

/// Per-call options.
#[derive(Default)]
pub struct CallOpts {
    /// Stream for server→client messages related to this call.
    pub events: Option<EventSink>,
    /// Fires when the client cancels the call.
    pub cancel: Option<oneshot::Receiver<()>>,
    /// The call's progress token (raw JSON), used to route progress from stdio servers.
    pub progress_token: Option<Bytes>,
    /// On a connection shared by several sessions: the calling session, and the client's own
    /// progress token when the gateway replaced it with a unique one.
    pub(crate) origin: Option<(Deliver, Option<Bytes>)>,
}

/// What a stdio connection remembers about a call to route the server's related messages.
pub(crate) struct CallRoute {
    events: Option<EventSink>,
    progress_token: Option<Bytes>,
    origin: Option<(Deliver, Option<Bytes>)>,
}

/// A live connection to one upstream.
pub enum Connection {
    /// A child process.
    Stdio(stdio::Connection),
    /// A Streamable HTTP session.
    Http(http::Connection),
}

impl Connection {
    fn next_id(&self) -> u64 {
        match self {
            Connection::Stdio(c) => c.next_id.fetch_add(1, Ordering::Relaxed),
            Connection::Http(c) => c.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn server(&self) -> &Arc<Server> {
        match self {
            Connection::Stdio(c) => &c.server,
            Connection::Http(c) => &c.server,
        }
    }

    /// Sends a request and waits for its outcome within `timeout`; cancels upstream on timeout,
    /// client cancellation, or when the caller drops the future.
    pub async fn request(
        self: &Arc<Self>,
        method: &str,
        params: Option<&[u8]>,
        mut opts: CallOpts,
        timeout: Duration,
    ) -> Result<Outcome, UpstreamError> {
        let id = self.next_id();
        let frame = jsonrpc::request(id.to_string().as_bytes(), method, params);
        let mut guard = CancelOnDrop {
            conn: Some(self.clone()),
            id,
        };
        let exchange = async {
            match &**self {
                Connection::Stdio(c) => {
                    let route = CallRoute {
                        events: opts.events.take(),
                        progress_token: opts.progress_token.take(),
                        origin: opts.origin.take(),
                    };
                    c.exchange(id, frame, route).await
                }
                Connection::Http(c) => c.exchange(id, frame, opts.events.take()).await,
            }
        };
        let cancelled = async {
            match opts.cancel.take() {
                Some(rx) => {
                    if rx.await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = exchange => r,
            _ = tokio::time::sleep(timeout) => Err(UpstreamError::Timeout { server: self.server().name.clone(), timeout }),
            _ = cancelled => Err(UpstreamError::Cancelled),
        };
        match &result {
            // The server answered, or will never see the request again: nothing to cancel.
            Ok(_)
            | Err(UpstreamError::Unavailable { .. } | UpstreamError::SessionExpired { .. }) => {
                guard.conn = None;
            }
            Err(_) => {}
        }
        result
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Option<&[u8]>) -> Result<(), UpstreamError> {
        self.send(jsonrpc::notification(method, params)).await
    }

    /// Sends a frame that expects no answer (a notification or our response to a server request).
    pub async fn send(&self, frame: Bytes) -> Result<(), UpstreamError> {
        match self {
            Connection::Stdio(c) => c.send(frame).await,
            Connection::Http(c) => c.send(frame).await,
        }
    }

    pub(crate) fn is_alive(&self) -> bool {
        match self {
            Connection::Stdio(c) => c.is_alive(),
            Connection::Http(_) => true,
        }
    }

    /// Ends the upstream session: stdin closed then signals for processes, DELETE for HTTP.
    pub async fn shutdown(&self) {
        match self {
            Connection::Stdio(c) => c.shutdown().await,
            Connection::Http(c) => c.shutdown().await,
        }
    }
}

/// Tells the upstream a request is abandoned unless disarmed.
struct CancelOnDrop {
    conn: Option<Arc<Connection>>,
    id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let params = format!(
                "{{\"requestId\":{},\"reason\":\"cancelled by the gateway\"}}",
                self.id
            );
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = conn
                        .notify("notifications/cancelled", Some(params.as_bytes()))
                        .await;
                });
            }
        }
    }
}

/// Requests waiting for their response on a connection whose responses arrive out of band (stdio).
#[derive(Default)]
pub(crate) struct Pending {
    waiters: Mutex<HashMap<u64, Waiter>>,
}

struct Waiter {
    tx: oneshot::Sender<Outcome>,
    route: CallRoute,
}

impl Pending {
    pub(crate) fn insert(&self, id: u64, tx: oneshot::Sender<Outcome>, route: CallRoute) {
        self.lock().insert(id, Waiter { tx, route });
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Completes a waiter; false when nobody waits for that id.
    pub(crate) fn complete(&self, id: u64, outcome: Outcome) -> bool {
        match self.lock().remove(&id) {
            Some(w) => {
                let _ = w.tx.send(outcome);
                true
            }
            None => false,
        }
    }

    /// Drops every waiter, failing their requests.
    pub(crate) fn fail_all(&self) {
        self.lock().clear();
    }

    /// Hands a server message to where it most likely belongs (stdio carries no relation):
    /// the request with its progress token, else the only request in flight; with several in
    /// flight, the newest one is only a fallback stream. Messages go to `owner` (the session
    /// owning the connection; for a shared connection, a broadcast to every session), except on a
    /// shared connection those related to a call go to the calling session (progress under the
    /// client's own token).
    pub(crate) fn dispatch(&self, msg: Message, owner: &Deliver) {
        let waiters = self.lock();
        let progress = msg.method() == Some("notifications/progress");
        let token = match &msg.kind {
            jsonrpc::Kind::Notification {
                params: Some(p), ..
            } if progress => progress_token_of(p),
            _ => None,
        };
        let related = match &token {
            Some(token) => waiters
                .values()
                .find(|w| w.route.progress_token.as_deref() == Some(&token[..])),
            // A lone call in flight is the likely cause of what the server says, except for
            // what concerns the whole session: on a shared connection that is every session.
            // On a shared connection only a server request (sampling, elicitation) is inferred
            // this way, since the call it waits on is the only one that can be answering it; a
            // log line may be about anything, and another principal must never see it.
            None if waiters.len() == 1 => waiters.values().next().filter(|w| {
                w.route.origin.is_none() || matches!(msg.kind, jsonrpc::Kind::Request { .. })
            }),
            None => None,
        };
        if let Some(w) = related {
            let route = Route::related(w.route.events.clone());
            match w.route.origin.clone() {
                Some((origin, client_token)) => {
                    drop(waiters);
                    let msg = match client_token {
                        Some(t) if progress => with_progress_token(msg, &t),
                        _ => msg,
                    };
                    origin.deliver(route, msg);
                }
                None => {
                    drop(waiters);
                    owner.deliver(route, msg);
                }
            }
            return;
        }
        let newest = waiters.iter().max_by_key(|(id, _)| **id).map(|(_, w)| w);
        let fallback = newest
            .filter(|w| w.route.origin.is_none())
            .and_then(|w| w.route.events.clone());
        drop(waiters);
        owner.deliver(
            Route {
                related: None,
                fallback,
            },
            msg,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `uri` member of params (`resources/subscribe`, `notifications/resources/updated`...).
pub(crate) fn uri_of(params: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct P {
        uri: String,
    }
    serde_json::from_slice::<P>(params).ok().map(|p| p.uri)
}

/// The progress notification with its `progressToken` replaced by `token` (raw JSON).
fn with_progress_token(msg: Message, token: &[u8]) -> Message {
    let rewritten = (|| {
        let jsonrpc::Kind::Notification {
            params: Some(p), ..
        } = &msg.kind
        else {
            return None;
        };
        let mut params: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(p).ok()?;
        params.insert("progressToken".into(), serde_json::from_slice(token).ok()?);
        let params = serde_json::to_vec(&params).ok()?;
        jsonrpc::parse(jsonrpc::notification(
            "notifications/progress",
            Some(&params),
        ))
        .ok()
    })();
    rewritten.unwrap_or(msg)
}

/// Extracts `progressToken` (raw JSON) from notification params.
fn progress_token_of(params: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "progressToken")]
        token: Option<&'a serde_json::value::RawValue>,
    }
    let p: P<'_> = serde_json::from_slice(params).ok()?;
    p.token.map(|t| Bytes::copy_from_slice(t.get().as_bytes()))
}

/// Extracts `_meta.progressToken` (raw JSON) from request params.
pub fn request_progress_token(params: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, rename = "progressToken")]
        token: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "_meta")]
        meta: Option<Meta<'a>>,
    }
    let p: P<'_> = serde_json::from_slice(params).ok()?;
    p.meta?
        .token
        .map(|t| Bytes::copy_from_slice(t.get().as_bytes()))
}

/// One downstream session's connection to one upstream server.
///
/// Usually the connection is the link's own upstream session. For a stdio server run by the
/// orchestrator it is the server's one [`shared::Shared`] session, which the link joins.
pub struct Link {
    server: Arc<Server>,
    deliver: Deliver,
    init_params: Bytes,
    current: Mutex<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
    init_result: Mutex<Option<Bytes>>,
    pub(crate) generation: AtomicU64,
    listen: AtomicBool,
    /// Membership in a shared connection's audience, once joined.
    shared: Mutex<Option<shared::Membership>>,
    /// Set by [`Link::close`]: the link never connects again.
    closed: AtomicBool,
}

impl Link {
    /// A link that will initialize with `init_params` (the client's capabilities and info).
    pub fn new(server: Arc<Server>, sink: Arc<dyn ServerMessages>, init_params: Bytes) -> Self {
        Link {
            deliver: Deliver {
                sink,
                index: server.index,
            },
            server,
            init_params,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            init_result: Mutex::new(None),
            generation: AtomicU64::new(0),
            listen: AtomicBool::new(false),
            shared: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// The upstream this link reaches.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The upstream's last `initialize` result, once connected.
    pub fn init_result(&self) -> Option<Bytes> {
        self.init_result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn live(&self) -> Option<Arc<Connection>> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().filter(|c| c.is_alive()).cloned()
    }

    fn is_shared(&self) -> bool {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The live connection, connecting and initializing first if needed.
    pub async fn connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _serial = self.connecting.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.server.unavailable("the client session has ended"));
        }
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let result =
            tokio::time::timeout(self.server.config.connect_timeout, self.handshake()).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                server: self.server.name.clone(),
                timeout: self.server.config.connect_timeout,
            }),
        };
        self.server
            .metrics
            .set_upstream_up(self.server.label, result.is_ok());
        let conn = result?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        self.generation.fetch_add(1, Ordering::Relaxed);
        if self.listen.load(Ordering::Relaxed)
            && let Connection::Http(h) = &*conn
        {
            h.open_listen_stream(conn.clone());
        }
        Ok(conn)
    }

    async fn handshake(&self) -> Result<Arc<Connection>, UpstreamError> {
        let server = &self.server;
        let conn = Arc::new(match &server.config.transport {
            Transport::Stdio { .. } => Connection::Stdio(stdio::Connection::spawn(
                server.clone(),
                self.deliver.clone(),
            )?),
            Transport::Http { url, headers } => Connection::Http(http::Connection::new(
                server.clone(),
                url.clone(),
                headers.clone(),
                self.deliver.clone(),
            )),
            Transport::Orchestrated => {
                let o = server
                    .orchestrated
                    .as_ref()
                    .ok_or_else(|| server.unavailable("no orchestrator runs this server"))?;
                match o.ready(server).await? {
                    orchestrated::Ready::Http(url) => Connection::Http(http::Connection::new(
                        server.clone(),
                        url,
                        ::http::HeaderMap::new(),
                        self.deliver.clone(),
                    )),
                    orchestrated::Ready::Stdio(endpoint) => {
                        let (conn, result) = o.shared.connect(server, &endpoint).await?;
                        let mut membership = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                        if membership.is_none() {
                            *membership = Some(o.shared.join(self.deliver.clone()));
                        }
                        drop(membership);
                        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                        return Ok(conn);
                    }
                }
            }
        });
        let result = initialize(&conn, &self.init_params, server.config.connect_timeout).await?;
        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        Ok(conn)
    }

    /// Calls a method upstream, reconnecting once if the upstream forgot our session.
    pub async fn call(
        &self,
        method: &str,
        params: Option<&[u8]>,
        mut opts: CallOpts,
    ) -> Result<Outcome, UpstreamError> {
        let timeout = self.server.config.call_timeout;
        let conn = self.connection().await?;
        // Several sessions share this connection: give the call a progress token no other
        // session uses, and remember whose call it is.
        let rewritten;
        let mut params = params;
        if self.is_shared() {
            match method {
                // One session must not change what the shared server logs for all of them.
                "logging/setLevel" => return Ok(Outcome::Result(Bytes::from_static(b"{}"))),
                "resources/subscribe" | "resources/unsubscribe" => {
                    let uri = params.and_then(uri_of).ok_or_else(|| {
                        self.server
                            .unavailable("resources/subscribe needs params.uri")
                    })?;
                    let on = method == "resources/subscribe";
                    let forward = self
                        .shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|m| m.subscribe(&uri, on));
                    if forward != Some(shared::Subscription::Forward) {
                        return Ok(Outcome::Result(Bytes::from_static(b"{}")));
                    }
                }
                _ => {}
            }
            let mut client_token = None;
            if opts.progress_token.is_some()
                && let Some(p) = params
                && let Some((wire, p)) = shared::unique_progress_token(p)
            {
                client_token = opts.progress_token.replace(wire);
                rewritten = p;
                params = Some(&rewritten);
            }
            opts.origin = Some((self.deliver.clone(), client_token));
        }
        let events = opts.events.clone();
        let progress_token = opts.progress_token.clone();
        let origin = opts.origin.clone();
        match conn.request(method, params, opts, timeout).await {
            Err(UpstreamError::SessionExpired { .. }) => {
                // 404 means the request was not processed: safe to retry on a new session.
                self.forget(&conn);
                let conn = self.connection().await?;
                let retry = CallOpts {
                    events,
                    cancel: None,
                    progress_token,
                    origin,
                };
                conn.request(method, params, retry, timeout).await
            }
            Err(e @ UpstreamError::Unavailable { .. }) => {
                self.server
                    .metrics
                    .set_upstream_up(self.server.label, false);
                Err(e)
            }
            other => other,
        }
    }

    /// Sends a notification if connected (a disconnected upstream has nothing to be told).
    pub async fn notify(&self, method: &str, params: Option<&[u8]>) {
        if let Some(c) = self.live() {
            let _ = c.notify(method, params).await;
        }
    }

    /// Relays the client's response to a server→client request.
    pub async fn respond(&self, id: &[u8], outcome: &Outcome) {
        if let Some(c) = self.live() {
            let _ = c.send(jsonrpc::response(id, outcome)).await;
        }
    }

    /// Keeps a server→client stream (HTTP GET) open from now on, on this and later connections.
    pub fn open_listen_stream(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.listen.store(true, Ordering::Relaxed);
        if let Some(c) = self.live()
            && let Connection::Http(h) = &*c
        {
            h.open_listen_stream(c.clone());
        }
    }

    fn forget(&self, conn: &Arc<Connection>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *cur = None;
        }
    }

    /// Ends the upstream session (a shared one is only left: other sessions still use it).
    pub async fn close(&self) {
        // No new connection from now on; a handshake already under way finishes first (it
        // holds `connecting`), so what it stores is shut down here rather than left running.
        self.closed.store(true, Ordering::Release);
        let _serial = self.connecting.lock().await;
        let conn = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let membership = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        if membership.is_some() {
            return;
        }
        if let Some(c) = conn {
            c.shutdown().await;
        }
    }
}

/// Performs the MCP handshake on a fresh connection; returns the server's `initialize` result.
pub(crate) async fn initialize(
    conn: &Arc<Connection>,
    init_params: &[u8],
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let outcome = conn
        .request(
            "initialize",
            Some(init_params),
            CallOpts::default(),
            timeout,
        )
        .await;
    let result = match outcome {
        Ok(Outcome::Result(r)) => r,
        Ok(Outcome::Error(e)) => {
            conn.shutdown().await;
            return Err(conn.server().unavailable(format!(
                "initialize failed: {}",
                String::from_utf8_lossy(&e)
            )));
        }
        Err(e) => {
            conn.shutdown().await;
            return Err(e);
        }
    };
    if let Connection::Http(h) = &**conn {
        h.set_protocol_version(&result);
    }
    conn.notify("notifications/initialized", None).await?;
    Ok(result)
}

/// Where a connection hands server-initiated messages.
#[derive(Clone)]
pub struct Deliver {
    sink: Arc<dyn ServerMessages>,
    index: usize,
}

impl Deliver {
    pub(crate) fn deliver(&self, route: Route, msg: Message) {
        self.sink.deliver(self.index, route, msg);
    }
}
