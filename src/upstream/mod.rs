//! Upstream MCP servers: one [`Link`] per (downstream session, upstream server), over stdio,
//! Streamable HTTP or the 2024-11-05 HTTP+SSE transport.
//!
//! A link connects lazily, performs the MCP handshake with the client's own capabilities, remaps
//! JSON-RPC ids (each connection numbers its own requests), enforces the per-call deadline and
//! reconnects after the server exits or forgets the session.

pub mod client;
mod error;
pub mod event_sink;
mod handshake;
pub mod http;
mod http_sse;
mod line_reader;
mod line_writer;
mod link;
pub mod orchestrated;
mod params;
mod pending;
pub mod pool;
pub mod shared;
mod stateless;
pub mod stdio;
pub mod token_exchange;
pub mod via;

pub use error::{UpstreamError, server_text};
pub use event_sink::EventSink;
pub(crate) use handshake::initialize;
pub use link::{Link, MAX_CACHED_LIST_PAGE};
pub use params::request_progress_token;
pub(crate) use params::uri_of;
use params::{progress_token_of, with_progress_token};
use pending::CancelOnDrop;
pub(crate) use pending::Pending;
#[cfg(test)]
pub(crate) use stateless::prepare;
pub use stateless::{ClientEnvelope, ParamsLeft};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::UpstreamConfig;
use crate::mcp::jsonrpc::{self, Message, Outcome};
use crate::metrics::Metrics;

/// Set while a call's client has been asked something and the call waits for the answers (a
/// stateless call parked on `input_required`). A server message that names no call is never
/// inferred to be such a call's: it is not the one still working.
#[derive(Clone, Default)]
pub struct AwaitingClient(Arc<std::sync::atomic::AtomicBool>);

impl AwaitingClient {
    /// Marks the call as waiting for its client, or as working again.
    pub fn set(&self, awaiting: bool) {
        self.0.store(awaiting, Ordering::Release);
    }

    /// Whether the call waits for its client.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
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
pub trait Recipient: Send + Sync + 'static {
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
    /// Connections kept to its plain-http endpoints, for its sessions' requests.
    pub pool: Arc<pool::Pool>,
    /// Gateway metrics.
    pub metrics: Arc<Metrics>,
    /// Its request metrics, resolved once per (method, outcome).
    pub requests: crate::metrics::ServerMetrics,
    /// The orchestrator running this server, for [`Transport::Orchestrated`] upstreams.
    pub orchestrated: Option<orchestrated::Orchestrated>,
    /// What its `server/discover` probe found (an HTTP server): [`Era`] as a number.
    era: std::sync::atomic::AtomicU8,
    /// Exchanges callers' tokens for this server's, when its credentials say so.
    pub token_exchange: Option<Arc<token_exchange::TokenExchange>>,
    /// Room for refusals of its requests being written ([`Server::refuse_in_background`]).
    refusals: Arc<tokio::sync::Semaphore>,
    /// Paces the log lines for messages of its that cannot be read.
    pub(crate) unreadable: crate::log_rate::LogRate,
    /// Paces the log lines for its failures that clients' requests meet (a failing server
    /// meets each one).
    failures: crate::log_rate::LogRate,
}

/// Log lines a second for one server's unreadable messages.
const UNREADABLE_LOGGED_PER_SECOND: u32 = 5;

/// Refusals of one server's requests (those no client can be asked) written at once, at most,
/// across its sessions: each may wait up to the connect timeout for a server that does not
/// read, so one that asks without end must not hold a task per request.
pub const MAX_REFUSALS_WRITING: usize = 64;

/// Which revisions a server speaks, as far as the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Era {
    /// Not probed yet.
    Unknown = 0,
    /// Sessions (`initialize`): 2025-11-25 and earlier.
    Sessions = 1,
    /// 2026-07-28: no session, every request self-contained.
    Stateless = 2,
}

impl Server {
    /// Waits for a frame that expects no answer to be taken, within the connect timeout: even
    /// such a frame waits on the server (for its HTTP answer, or room in its stdin pipe), and
    /// one that never takes it must not hold whoever sent it.
    pub(crate) async fn sent_in_time(
        &self,
        sent: impl std::future::Future<Output = Result<(), UpstreamError>>,
    ) -> Result<(), UpstreamError> {
        let timeout = self.config.connect_timeout;
        tokio::time::timeout(timeout, sent)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    server: self.name.clone(),
                    timeout,
                })
            })
    }

    /// Builds the shared server record.
    pub fn new(
        index: usize,
        config: UpstreamConfig,
        http: http::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        let label = label_of(&config.name);
        let token_exchange = config
            .credentials
            .as_ref()
            .and_then(|c| c.token_exchange.clone())
            .map(|tx| Arc::new(token_exchange::TokenExchange::new(tx, http.clone())));
        Server {
            token_exchange,
            index,
            name: Arc::from(config.name.as_str()),
            label,
            requests: metrics.server(label),
            config,
            http,
            pool: Arc::default(),
            metrics,
            orchestrated: None,
            era: std::sync::atomic::AtomicU8::new(Era::Unknown as u8),
            refusals: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS_WRITING)),
            unreadable: crate::log_rate::LogRate::new(UNREADABLE_LOGGED_PER_SECOND),
            failures: crate::log_rate::LogRate::new(UNREADABLE_LOGGED_PER_SECOND),
        }
    }

    /// Runs `refusal` (the writing of an answer that refuses one of the server's requests) in
    /// the background, unless [`MAX_REFUSALS_WRITING`] already run: the request is then left
    /// unanswered, as a server that asks faster than it takes answers has earned. Returns
    /// whether it runs.
    pub(crate) fn refuse_in_background(
        &self,
        refusal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        let Ok(room) = self.refusals.clone().try_acquire_owned() else {
            tracing::debug!(upstream = %self.name, "a server request left unanswered: {MAX_REFUSALS_WRITING} refusals are already being written to it");
            return false;
        };
        tokio::spawn(async move {
            refusal.await;
            drop(room);
        });
        true
    }

    /// What the server's probe found.
    pub(crate) fn era(&self) -> Era {
        match self.era.load(Ordering::Acquire) {
            1 => Era::Sessions,
            2 => Era::Stateless,
            _ => Era::Unknown,
        }
    }

    /// Remembers what the server's probe found (for every session's link).
    pub(crate) fn set_era(&self, era: Era) {
        self.era.store(era as u8, Ordering::Release);
    }

    /// With the orchestrator that runs it.
    pub fn with_orchestrator(mut self, o: orchestrated::Orchestrated) -> Self {
        self.orchestrated = Some(o);
        self
    }

    /// Whether to log one more failure of this server that a request met: `Some` with what
    /// to add to the line (how many were held back since the last), `None` to hold it back.
    pub(crate) fn failure_logged(&self) -> Option<String> {
        self.failures.admit().map(crate::log_rate::held_back)
    }

    pub(crate) fn unavailable(&self, reason: impl Into<String>) -> UpstreamError {
        UpstreamError::Unavailable {
            server: self.name.clone(),
            reason: reason.into(),
            said: None,
        }
    }

    /// Unavailable for `reason`, the gateway's words, with what the server said kept apart
    /// (for the log: it never reaches the client unscreened).
    pub(crate) fn unavailable_saying(
        &self,
        reason: impl Into<String>,
        said: impl AsRef<[u8]>,
    ) -> UpstreamError {
        UpstreamError::Unavailable {
            server: self.name.clone(),
            reason: reason.into(),
            said: Some(error::server_text(said.as_ref())),
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
    pub(crate) origin: Option<(Inbox, Option<Bytes>)>,
    /// Headers that mirror the request, for a 2026-07-28 server (HTTP only).
    pub(crate) mirrored: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    /// The caller is a 2026-07-28 client, checked at the stateless front, with this envelope
    /// (`_meta` members): a 2026-07-28 server is sent it and the call's retry members as they
    /// are, and `input_required` comes back.
    pub client_envelope: Option<stateless::ClientEnvelope>,
    /// The call's span as `traceparent` (and `tracestate`) headers, when traced (HTTP only;
    /// `_meta` carries them for every transport).
    pub traceparent: Option<crate::trace::TraceHeaders>,
    /// Send only on the link's connection of this generation (the one the call was checked
    /// for); on another, the call fails with [`UpstreamError::Reconnected`], unsent.
    pub on_connection: Option<u64>,
    /// Set while the call waits for its client's answers (see [`AwaitingClient`]).
    pub awaiting: Option<AwaitingClient>,
}

/// What a stdio connection remembers about a call to route the server's related messages.
pub(crate) struct CallRoute {
    events: Option<EventSink>,
    progress_token: Option<Bytes>,
    origin: Option<(Inbox, Option<Bytes>)>,
    awaiting: Option<AwaitingClient>,
}

impl CallRoute {
    /// Whether the call is still working (not waiting for its client's answers).
    fn is_working(&self) -> bool {
        self.awaiting.as_ref().is_none_or(|a| !a.is_set())
    }

    /// Whether both calls come from the same session.
    fn same_session(&self, other: &CallRoute) -> bool {
        match (&self.origin, &other.origin) {
            (None, None) => true,
            (Some((a, _)), Some((b, _))) => a.is(b),
            _ => false,
        }
    }
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
        let frame = jsonrpc::request(itoa::Buffer::new().format(id).as_bytes(), method, params);
        let mut guard = CancelOnDrop {
            conn: Some(self.clone()),
            id,
        };
        // Pinned where they are built: `select!` would otherwise move each future (the
        // exchange is KiB) into its own state.
        let exchange = std::pin::pin!(async {
            match &**self {
                Connection::Stdio(c) => {
                    let route = CallRoute {
                        events: opts.events.take(),
                        progress_token: opts.progress_token.take(),
                        origin: opts.origin.take(),
                        awaiting: opts.awaiting.take(),
                    };
                    c.exchange(id, frame, route).await
                }
                Connection::Http(c) => {
                    let mut mirrored = std::mem::take(&mut opts.mirrored);
                    if let Some(t) = opts.traceparent.take() {
                        mirrored.push((::http::HeaderName::from_static("traceparent"), t.parent));
                        if let Some(state) = t.state {
                            mirrored.push((::http::HeaderName::from_static("tracestate"), state));
                        }
                    }
                    c.exchange(id, frame, opts.events.take(), mirrored).await
                }
            }
        });
        let cancelled = std::pin::pin!(async {
            match opts.cancel.take() {
                Some(rx) => {
                    if rx.await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        });
        // In this order: an answer that has come wins, and no random start is drawn per call.
        let result = tokio::select! {
            biased;
            r = exchange => r,
            _ = tokio::time::sleep(timeout) => Err(UpstreamError::Timeout { server: self.server().name.clone(), timeout }),
            _ = cancelled => Err(UpstreamError::Cancelled),
        };
        match &result {
            // The server answered, refused it, or will never see the request again: nothing
            // to cancel.
            Ok(_)
            | Err(
                UpstreamError::Unavailable { .. }
                | UpstreamError::SessionExpired { .. }
                | UpstreamError::NoCredentials { .. },
            ) => {
                guard.conn = None;
            }
            Err(_) => {}
        }
        result
    }

    /// Stops the connection's listen stream, if it has one, without telling the server.
    pub(crate) fn stop_listening(&self) {
        if let Connection::Http(c) = self {
            c.stop_listening();
        }
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Option<&[u8]>) -> Result<(), UpstreamError> {
        self.send(jsonrpc::notification(method, params)).await
    }

    /// Sends a frame that expects no answer (a notification or our response to a server
    /// request), within the server's connect timeout ([`Server::sent_in_time`]).
    pub async fn send(&self, frame: Bytes) -> Result<(), UpstreamError> {
        let sent = async {
            match self {
                Connection::Stdio(c) => c.send(frame).await,
                Connection::Http(c) => c.send(frame).await,
            }
        };
        self.server().sent_in_time(sent).await
    }

    /// Whether the server speaks 2026-07-28 (no session; see [`http::Connection::set_stateless`]).
    pub(crate) fn is_stateless(&self) -> bool {
        matches!(self, Connection::Http(c) if c.is_stateless())
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

/// Where a connection hands server-initiated messages: a [`Recipient`] and the upstream index it hears them from.
#[derive(Clone)]
pub struct Inbox {
    recipient: Arc<dyn Recipient>,
    index: usize,
}

impl Inbox {
    pub(crate) fn deliver(&self, route: Route, msg: Message) {
        self.recipient.deliver(self.index, route, msg);
    }

    /// Whether both deliver to the same session's same server.
    pub(crate) fn is(&self, other: &Inbox) -> bool {
        self.index == other.index && Arc::ptr_eq(&self.recipient, &other.recipient)
    }
}
