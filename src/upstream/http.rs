//! Streamable HTTP upstream: POST per message over a pooled keep-alive client, JSON or SSE
//! responses, the upstream's `Mcp-Session-Id`, and a GET stream for server-initiated messages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use serde::Deserialize;

pub use super::client::{Client, checked_client, client, relay_client};
use super::{EventSink, Inbox, Server, UpstreamError};
use crate::mcp::jsonrpc::{self, Kind, Message, Outcome, code};
use crate::mcp::revision::STATELESS;
use crate::sse;

/// Largest JSON response or SSE event accepted from an upstream.
pub(super) const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Most bytes one SSE stream may carry in all: a call's stream fails past it, the GET stream is
/// re-opened.
const MAX_STREAM: u64 = 256 * 1024 * 1024;
/// A GET stream that carries nothing (not even a keep-alive comment) for this long is presumed
/// dead (a half-open connection, a stuck proxy) and re-opened.
const LISTEN_IDLE: Duration = Duration::from_secs(300);
/// Longest upstream `Mcp-Session-Id` accepted.
const MAX_SESSION_ID: usize = 1024;
/// Times one call's response stream may be resumed in all, whatever event ids the server
/// sends: a server that ends every stream at once, with a new id each time, would otherwise be
/// asked again until the call's deadline. (A server polling every 2 s fits the default 60 s
/// deadline.)
const MAX_RESUMES: u32 = 32;
/// Wait before resuming a response stream, unless the server said (`retry`); the least and the
/// most it may say. The wait doubles after each stream that brought no message (up to the
/// most), so a server that ends its streams at once is asked ever more slowly.
const RESUME_WAIT: Duration = Duration::from_millis(500);
const RESUME_WAIT_MIN: Duration = Duration::from_millis(100);
const RESUME_WAIT_MAX: Duration = Duration::from_secs(10);
/// Waits between attempts to re-open a GET stream that failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(60);

// Names built once: a `&str` name is parsed again on every insert.
const MCP_SESSION_ID: http::HeaderName = http::HeaderName::from_static("mcp-session-id");
const MCP_PROTOCOL_VERSION: http::HeaderName =
    http::HeaderName::from_static("mcp-protocol-version");

/// One MCP session with an HTTP server.
pub struct Connection {
    pub(crate) server: Arc<Server>,
    pub(crate) next_id: AtomicU64,
    inbox: Inbox,
    /// The client to send with, when not the server's pooled one.
    client: Option<Box<Client>>,
    url: http::Uri,
    /// `url` as the server's own pool sends to it, when plain http and no client is given.
    /// (Boxed: held beside the stdio connection in one enum.)
    endpoint: Option<Box<super::pool::Endpoint>>,
    headers: http::HeaderMap,
    /// The session and revision, once known, and the headers of a call built from them.
    /// (Boxed: held beside the stdio connection in one enum.)
    sent: Mutex<Box<Sent>>,
    listen_task: Mutex<Option<tokio::task::AbortHandle>>,
    /// The server speaks 2026-07-28: no session, every request mirrored in headers.
    stateless: AtomicBool,
    /// For a 2026-07-28 server: the envelope members its listen stream carries, and the
    /// resources it watches for the session (`resources/subscribe`).
    listen_envelope: Mutex<String>,
    watched: Mutex<Vec<String>>,
    /// Credentials exchanged per request for the caller's token (RFC 8693), if any.
    credential: Option<super::token_exchange::Credential>,
}

/// What a call's request says of the connection: its upstream session and revision, once
/// known, and the headers of a call (a JSON-RPC POST) built from them and the configured
/// headers. A call clones them rather than inserting each header again; they are built anew
/// when the session or the revision changes, which is rare.
struct Sent {
    session_id: Option<HeaderValue>,
    protocol_version: Option<HeaderValue>,
    /// `Host`, for requests the server's own pool sends: written here rather than by the pool,
    /// which would grow every call's cloned map by one header (a reallocation).
    host: Option<HeaderValue>,
    call: http::HeaderMap,
}

/// Bodies shorter than this have their `Content-Length` value in [`LENGTHS`].
const LISTED_LENGTHS: usize = 10_000;

/// The decimal digits of every length below [`LISTED_LENGTHS`], four bytes per length
/// (left-aligned): a call's `Content-Length` is a slice of it, where a value formatted per call
/// would be an allocation (and its free) on every request.
static LENGTHS: [u8; 4 * LISTED_LENGTHS] = {
    let mut table = [0u8; 4 * LISTED_LENGTHS];
    let mut n = 0;
    while n < LISTED_LENGTHS {
        let (mut value, mut at) = (n, 4 * n + digits(n));
        loop {
            at -= 1;
            table[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        n += 1;
    }
    table
};

/// How many decimal digits `n` (below [`LISTED_LENGTHS`]) has.
const fn digits(n: usize) -> usize {
    match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        _ => 4,
    }
}

/// The `Content-Length` value for a body of `len` bytes.
fn content_length(len: u64) -> HeaderValue {
    match usize::try_from(len) {
        Ok(n) if n < LISTED_LENGTHS => {
            let digits = &LENGTHS[4 * n..4 * n + digits(n)];
            HeaderValue::from_maybe_shared(Bytes::from_static(digits))
                .expect("decimal digits are a header value")
        }
        _ => HeaderValue::from(len),
    }
}

/// What a call's POST accepts (a JSON answer or a stream).
const CALL_ACCEPT: &str = "application/json, text/event-stream";

impl Sent {
    fn new(configured: &http::HeaderMap, host: Option<HeaderValue>) -> Sent {
        let mut sent = Sent {
            session_id: None,
            protocol_version: None,
            host,
            call: http::HeaderMap::new(),
        };
        sent.call = sent.call_headers(configured);
        sent
    }

    /// The headers of a call, with room kept for its `Content-Length` ([`Connection::request`]
    /// writes it): a clone's entries have no spare capacity, and hyper adding the header would
    /// reallocate them per call.
    fn call_headers(&self, configured: &http::HeaderMap) -> http::HeaderMap {
        let mut h = self.headers(configured, true, CALL_ACCEPT);
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        h
    }

    /// The headers of a request, with a body or not, accepting `accept`.
    fn headers(
        &self,
        configured: &http::HeaderMap,
        has_body: bool,
        accept: &'static str,
    ) -> http::HeaderMap {
        // Room to spare in the index (which a clone keeps): hyper looks up `Transfer-Encoding`
        // with `entry`, which grows a full map (rehashing it) even to insert nothing.
        let mut h = http::HeaderMap::with_capacity(configured.len() + 8);
        h.extend(configured.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(host) = &self.host
            && !h.contains_key(HOST)
        {
            h.insert(HOST, host.clone());
        }
        h.insert(ACCEPT, HeaderValue::from_static(accept));
        if has_body {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(s) = &self.session_id {
            h.insert(MCP_SESSION_ID, s.clone());
        }
        if let Some(v) = &self.protocol_version {
            h.insert(MCP_PROTOCOL_VERSION, v.clone());
        }
        h
    }

    /// Sends `session_id` and `protocol_version` from now on (`None` keeps what is sent).
    fn set(
        &mut self,
        configured: &http::HeaderMap,
        session_id: Option<HeaderValue>,
        protocol_version: Option<HeaderValue>,
    ) {
        if let Some(s) = session_id {
            self.session_id = Some(s);
        }
        if let Some(v) = protocol_version {
            self.protocol_version = Some(v);
        }
        self.call = self.call_headers(configured);
    }
}

/// Resources one session may watch on a 2026-07-28 server.
pub(crate) const MAX_WATCHED: usize = 64;

impl Connection {
    /// A connection to `url` (sending `headers` with every request) that has not yet initialized.
    pub fn new(
        server: Arc<Server>,
        url: http::Uri,
        headers: http::HeaderMap,
        inbox: Inbox,
    ) -> Self {
        let endpoint = (url.scheme() == Some(&http::uri::Scheme::HTTP))
            .then(|| super::pool::Endpoint::new(&url).ok().map(Box::new))
            .flatten();
        let sent = Sent::new(&headers, endpoint.as_ref().map(|e| e.host().clone()));
        Connection {
            client: None,
            server,
            next_id: AtomicU64::new(1),
            inbox,
            endpoint,
            url,
            sent: Mutex::new(Box::new(sent)),
            headers,
            listen_task: Mutex::new(None),
            stateless: AtomicBool::new(false),
            listen_envelope: Mutex::new(String::new()),
            watched: Mutex::new(Vec::new()),
            credential: None,
        }
    }

    /// Sends `credential` with every request.
    pub(crate) fn with_credential(
        mut self,
        credential: Option<super::token_exchange::Credential>,
    ) -> Self {
        self.credential = credential;
        self
    }

    /// A request (see `request`) with the caller's exchanged credential, when there is one.
    async fn authorized(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
    ) -> Result<http::Request<Full<Bytes>>, UpstreamError> {
        Ok(self.authorized_with(method, body, accept).await?.0)
    }

    /// [`authorized`](Self::authorized), and the exchanged credential it carries.
    async fn authorized_with(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
    ) -> Result<(http::Request<Full<Bytes>>, Option<HeaderValue>), UpstreamError> {
        let mut req = self.request(method, body, accept);
        let mut sent = None;
        if let Some(c) = &self.credential
            && let Some((name, value)) = c.header(&self.server.name).await?
        {
            sent = Some(value.clone());
            req.headers_mut().insert(name, value);
        }
        Ok((req, sent))
    }

    /// Sends an authorized request (see `request`) with `extra` headers. An exchanged token
    /// the server refuses as a bearer token (401 with a `Bearer` challenge, RFC 6750 §3:
    /// revoked, or expired early) is exchanged again and the request sent once more: a
    /// refused request was not processed. Credentials of the caller's own that the server
    /// refuses (401, 403) fail the caller's request only ([`UpstreamError::NoCredentials`]):
    /// the server is up for everyone else.
    async fn send_authorized(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
        extra: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Result<Sending, UpstreamError> {
        if self.server.config.credentials.is_none() {
            // Nothing to exchange, and a refusal says nothing of the caller: the plain send
            // (most servers, every call), without the credentials' state in its future.
            let mut req = self.request(method, body, accept);
            req.headers_mut().extend(extra);
            let in_session = req.headers().contains_key(MCP_SESSION_ID);
            let resp = self.send_request(req).await?;
            return Ok(Sending { resp, in_session });
        }
        Box::pin(self.send_with_credentials(method, body, accept, extra)).await
    }

    /// [`send_authorized`](Self::send_authorized) to a server with credentials of its callers'.
    async fn send_with_credentials(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
        extra: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Result<Sending, UpstreamError> {
        // Kept for a second try only where one can happen.
        let again = self
            .credential
            .is_some()
            .then(|| (method.clone(), body.clone(), extra.clone()));
        let (mut req, exchanged) = self.authorized_with(method, body, accept).await?;
        req.headers_mut().extend(extra);
        let in_session = req.headers().contains_key(MCP_SESSION_ID);
        let mut resp = self.send_request(req).await?;
        if let (Some(c), Some(sent), Some((method, body, extra))) =
            (&self.credential, &exchanged, again)
            && refuses_bearer(&resp)
            && c.refused(sent)
        {
            // Read (a little of it), so that the connection is kept.
            let said = read_limited(resp.into_body(), 512)
                .await
                .unwrap_or_default();
            tracing::debug!(server = %self.server.name, "the server refused an exchanged token, exchanging it again: {}", super::error::server_text(&said));
            let (mut req, _) = self.authorized_with(method, body, accept).await?;
            req.headers_mut().extend(extra);
            resp = self.send_request(req).await?;
        }
        let status = resp.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let said = read_limited(resp.into_body(), 512)
                .await
                .unwrap_or_default();
            tracing::debug!(server = %self.server.name, "the server refused the caller's credentials: HTTP {status}: {}", super::error::server_text(&said));
            self.server.metrics.credentials_refused(self.server.label);
            return Err(UpstreamError::NoCredentials {
                server: self.server.name.clone(),
                reason: format!("the server refused the caller's credentials (HTTP {status})"),
            });
        }
        Ok(Sending { resp, in_session })
    }

    /// Joins an upstream session already open (another replica opened it, speaking
    /// `version`), for one message.
    pub(crate) fn in_session(self, session_id: &str, version: Option<&str>) -> Option<Self> {
        let id = HeaderValue::from_str(session_id).ok()?;
        let version =
            HeaderValue::from_str(version.unwrap_or(crate::mcp::revision::LATEST)).ok()?;
        self.sent().set(&self.headers, Some(id), Some(version));
        Some(self)
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, Box<Sent>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision the upstream session speaks (its `MCP-Protocol-Version`), once known.
    pub(crate) fn protocol_version(&self) -> Option<String> {
        self.sent()
            .protocol_version
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The upstream session's id, once the server gave one.
    pub(crate) fn session_id(&self) -> Option<String> {
        self.sent()
            .session_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Sends through `client` rather than the server's pooled one.
    pub fn with_client(mut self, client: Client) -> Self {
        self.client = Some(Box::new(client));
        self.endpoint = None;
        // That client writes its own `Host` (or `:authority`).
        let sent = self.sent.get_mut().unwrap_or_else(|e| e.into_inner());
        sent.host = None;
        sent.set(&self.headers, None, None);
        self
    }

    /// Sends a request: on the server's own pool to a plain-http URL, else on the client
    /// given (a relay's HTTP/2, a remote server's checked one) or the shared pooled client.
    async fn send_request(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let sent = match &self.endpoint {
            Some(endpoint) => self.server.pool.send(endpoint, req).await,
            None => self
                .client
                .as_deref()
                .unwrap_or(&self.server.http)
                .request(req)
                .await
                .map_err(|e| connect_reason(&e)),
        };
        sent.map_err(|reason| self.server.unavailable(reason))
    }

    /// The URL this connection posts to.
    pub fn url(&self) -> &http::Uri {
        &self.url
    }

    /// Remembers the negotiated protocol version for the `MCP-Protocol-Version` header.
    pub(crate) fn set_protocol_version(&self, init_result: &[u8]) {
        #[derive(Deserialize)]
        struct R<'a> {
            #[serde(borrow, rename = "protocolVersion")]
            v: Option<std::borrow::Cow<'a, str>>,
        }
        if let Ok(R { v: Some(v) }) = serde_json::from_slice::<R<'_>>(init_result)
            && let Ok(h) = HeaderValue::from_str(&v)
        {
            self.sent().set(&self.headers, None, Some(h));
        }
    }

    /// Asks the server whether it speaks 2026-07-28 (`server/discover`, outside any session).
    /// Only a failure to get an answer at all is an error; see [`Discovered`] for the rest.
    pub(crate) async fn discover(&self, frame: Bytes) -> Result<Discovered, UpstreamError> {
        let mut req = self.authorized(Method::POST, frame, CALL_ACCEPT).await?;
        let h = req.headers_mut();
        h.remove(MCP_SESSION_ID);
        h.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static(STATELESS));
        h.insert("mcp-method", HeaderValue::from_static("server/discover"));
        let resp = self.send_request(req).await?;
        let status = resp.status();
        let sse = is_event_stream(resp.headers());
        let mut body = resp.into_body();
        // The first message answers; a server that keeps its stream open is not waited on.
        let mut decoder = sse::Decoder::new(MAX_MESSAGE).with_stream_limit(MAX_MESSAGE as u64);
        let mut plain = BytesMut::new();
        let frame = loop {
            if sse {
                match decoder.next_event() {
                    Ok(Some(ev)) if ev.data.trim_ascii().is_empty() => continue,
                    Ok(Some(ev)) => break Some(ev.data),
                    Ok(None) => {}
                    // An event or stream past the limit: no answer (and nothing more is read,
                    // or buffered, for the rest of the probe's time).
                    Err(_) => break None,
                }
            }
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if sse {
                            decoder.feed(&data);
                        } else if plain.len() + data.len() <= MAX_MESSAGE {
                            plain.extend_from_slice(&data);
                        } else {
                            break None;
                        }
                    }
                }
                Some(Err(_)) => break None,
                None => break (!sse).then(|| plain.split().freeze()),
            }
        };
        let outcome = frame
            .and_then(|f| jsonrpc::parse(f).ok())
            .and_then(|m| match m.kind {
                Kind::Response { outcome, .. } => Some(outcome),
                _ => None,
            });
        Ok(match outcome {
            Some(Outcome::Result(r)) if super::stateless::speaks_stateless(&r) => {
                Discovered::Stateless(r)
            }
            // Earlier revisions: no such method, or no session (a 2025 server's 400/404).
            Some(Outcome::Error(e)) if jsonrpc::error_code(&e) == Some(code::METHOD_NOT_FOUND) => {
                Discovered::Sessions
            }
            Some(Outcome::Result(_)) => Discovered::Sessions,
            Some(Outcome::Error(_)) if status.is_server_error() => Discovered::Unsure,
            // A 2026 server refusing what was sent (-32602, -32022, ...) is not a legacy one.
            Some(Outcome::Error(e))
                if matches!(
                    jsonrpc::error_code(&e),
                    Some(code::INVALID_PARAMS | code::UNSUPPORTED_PROTOCOL_VERSION)
                ) =>
            {
                Discovered::Unsure
            }
            _ if matches!(
                status,
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            ) =>
            {
                Discovered::Sessions
            }
            Some(Outcome::Error(_)) if status.is_success() => Discovered::Sessions,
            _ => Discovered::Unsure,
        })
    }

    /// From now on, speaks 2026-07-28 to the server; a listen stream carries `envelope`.
    pub(crate) fn set_stateless(&self, envelope: String) {
        *self
            .listen_envelope
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = envelope;
        self.stateless.store(true, Ordering::Release);
        self.sent().set(
            &self.headers,
            None,
            Some(HeaderValue::from_static(STATELESS)),
        );
    }

    /// Whether the server speaks 2026-07-28 (see [`Connection::set_stateless`]).
    pub(crate) fn is_stateless(&self) -> bool {
        self.stateless.load(Ordering::Acquire)
    }

    fn request(&self, method: Method, body: Bytes, accept: &'static str) -> Request<Full<Bytes>> {
        let len = body.len() as u64;
        let has_body = len > 0;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        if self.endpoint.is_none() {
            // The pool writes its own (origin-form) target.
            *req.uri_mut() = self.url.clone();
        }
        let sent = self.sent();
        *req.headers_mut() = if has_body && accept == CALL_ACCEPT {
            let mut h = sent.call.clone();
            // In place of the one kept (`insert` would make room for one more first).
            if let Some(kept) = h.get_mut(CONTENT_LENGTH) {
                *kept = content_length(len);
            }
            h
        } else {
            sent.headers(&self.headers, has_body, accept)
        };
        req
    }

    async fn post(
        &self,
        frame: Bytes,
        mirrored: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let Sending {
            resp,
            in_session: had_session,
        } = self
            .send_authorized(Method::POST, frame, CALL_ACCEPT, mirrored)
            .await?;
        // 404 is the spec's answer to an unknown session; some servers (server-everything among
        // them) answer 400 instead. Either way the request was not processed, so the link
        // re-initializes and retries once; a genuine 400 then fails on the fresh session too.
        if matches!(
            resp.status(),
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST
        ) && had_session
        {
            let status = resp.status();
            let body = read_limited(resp.into_body(), 512)
                .await
                .unwrap_or_default();
            tracing::debug!(server = %self.server.name, "the session was refused: HTTP {status}: {}", super::error::server_text(&body));
            return Err(UpstreamError::SessionExpired {
                server: self.server.name.clone(),
                detail: format!("HTTP {status}"),
            });
        }
        // The session's id comes with the answer that opens it; a request sent in a session
        // has no use for the header (nor for a new id, from an answer to the old session).
        if !had_session
            && let Some(s) = resp.headers().get(MCP_SESSION_ID)
            && !self.is_stateless()
        {
            // Sent back on every request: only what the specification allows (visible ASCII),
            // of a sane length.
            let valid = !s.is_empty()
                && s.len() <= MAX_SESSION_ID
                && s.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b));
            if !valid {
                return Err(self.server.unavailable(format!(
                    "the server sent an invalid Mcp-Session-Id ({} bytes; visible ASCII and at most {MAX_SESSION_ID} bytes expected)",
                    s.len()
                )));
            }
            let mut sent = self.sent();
            if sent.session_id.is_none() {
                sent.set(&self.headers, Some(s.clone()), None);
            }
        }
        // A 2026-07-28 server answers a refused request with its JSON-RPC error and a 4xx
        // status: the error is the answer.
        if resp.status().is_client_error()
            && self.is_stateless()
            && !is_event_stream(resp.headers())
        {
            return Ok(resp);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = read_limited(resp.into_body(), 512)
                .await
                .unwrap_or_default();
            return Err(self.server.unavailable_saying(refusal(status), &body));
        }
        Ok(resp)
    }

    pub(crate) async fn send(&self, frame: Bytes) -> Result<(), UpstreamError> {
        let resp = self.post(frame, Vec::new()).await?;
        // 202 Accepted with no body is the norm; drain anything else.
        let _ = read_limited(resp.into_body(), MAX_MESSAGE).await;
        Ok(())
    }

    pub(crate) async fn exchange(
        &self,
        id: u64,
        frame: Bytes,
        events: Option<EventSink>,
        mirrored: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Result<Outcome, UpstreamError> {
        let resp = self.post(frame, mirrored).await?;
        if !is_event_stream(resp.headers()) {
            let refused = !resp.status().is_success();
            let body = read_limited(resp.into_body(), MAX_MESSAGE)
                .await
                .map_err(|e| self.server.unavailable(e))?;
            let msg = jsonrpc::parse(body).map_err(|e| {
                self.server
                    .unavailable_saying("the response is not a JSON-RPC message", e.to_string())
            })?;
            return match msg.kind {
                Kind::Response { id: rid, outcome } if jsonrpc::id_as_u64(&rid) == Some(id) => {
                    Ok(outcome)
                }
                // A refusal before the server read the id (a header it disagrees with).
                Kind::Response {
                    outcome: outcome @ Outcome::Error(_),
                    ..
                } if refused => Ok(outcome),
                _ => Err(self
                    .server
                    .unavailable("response does not answer the request")),
            };
        }
        let mut body = resp.into_body();
        let mut decoder = sse::Decoder::new(MAX_MESSAGE).with_stream_limit(MAX_STREAM);
        let mut last_id: Option<String> = None;
        let mut pace = ResumePace::default();
        loop {
            while let Some(ev) = decoder
                .next_event()
                .map_err(|e| self.server.unavailable(e.to_string()))?
            {
                if let Some(id) = &ev.id {
                    last_id = Some(id.clone());
                }
                if let Some(ms) = ev.retry {
                    pace.asked(ms);
                }
                if is_message(&ev) {
                    pace.heard();
                }
                if let Some(outcome) = self.on_event(ev, Some(id), events.as_ref()) {
                    return Ok(outcome);
                }
            }
            let ended = match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        decoder.feed(&data);
                    }
                    continue;
                }
                Some(Err(e)) => format!("stream broke: {e}"),
                None => "stream ended without a response".to_owned(),
            };
            // A server that ends the stream mid-call (2025-11-25 polling), or whose connection
            // broke, is asked for the rest with the last event id it gave.
            let Some(last) = last_id.as_deref() else {
                return Err(self.server.unavailable(ended));
            };
            let Some(wait) = pace.next() else {
                return Err(self.server.unavailable(format!(
                    "{ended} after {MAX_RESUMES} resumes (the most one call gets)"
                )));
            };
            tokio::time::sleep(wait).await;
            body = self.resume_stream(last).await?;
            decoder = sse::Decoder::new(MAX_MESSAGE).with_stream_limit(MAX_STREAM);
        }
    }

    /// Re-opens a response stream after event `last` (GET with `Last-Event-ID`).
    async fn resume_stream(&self, last: &str) -> Result<hyper::body::Incoming, UpstreamError> {
        let value = HeaderValue::from_str(last).map_err(|_| {
            self.server
                .unavailable("the server's event id is not a header value")
        })?;
        let resp = self
            .send_authorized(
                Method::GET,
                Bytes::new(),
                "text/event-stream",
                vec![(http::HeaderName::from_static("last-event-id"), value)],
            )
            .await?
            .resp;
        if !resp.status().is_success() || !is_event_stream(resp.headers()) {
            return Err(self.server.unavailable_saying(
                format!("the stream could not be resumed: HTTP {}", resp.status()),
                format!("after event {last:?}"),
            ));
        }
        Ok(resp.into_body())
    }

    /// Handles one SSE event; returns the outcome when it answers `waiting_for`.
    fn on_event(
        &self,
        ev: sse::Event,
        waiting_for: Option<u64>,
        events: Option<&EventSink>,
    ) -> Option<Outcome> {
        if !is_message(&ev) {
            return None;
        }
        let msg: Message = match jsonrpc::parse(ev.data) {
            Ok(m) => m,
            Err(e) => {
                if let Some(n) = self.server.unreadable.admit() {
                    let more = crate::log_rate::held_back(n);
                    tracing::warn!(server = %self.server.name, "ignoring malformed SSE message: {e}{more}");
                }
                return None;
            }
        };
        match msg.kind {
            Kind::Response { id, outcome } => {
                if waiting_for.is_some() && jsonrpc::id_as_u64(&id) == waiting_for {
                    return Some(outcome);
                }
                tracing::debug!(server = %self.server.name, "unexpected response on SSE stream");
                None
            }
            // What a listen stream says about itself is the gateway's, not the client's.
            Kind::Notification { method, .. }
                if &*method == "notifications/subscriptions/acknowledged" =>
            {
                None
            }
            _ => {
                self.inbox
                    .deliver(super::Route::related(events.cloned()), msg);
                None
            }
        }
    }

    /// Starts or stops watching `uri` on a 2026-07-28 server's listen stream; whether the set
    /// changed, or `Err` when the session already watches as many as it may.
    pub(crate) fn watch(&self, uri: &str, on: bool) -> Result<bool, String> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let at = watched.iter().position(|u| u == uri);
        match (on, at) {
            (true, None) if watched.len() >= MAX_WATCHED => Err(format!(
                "this session already watches {MAX_WATCHED} resources of the server"
            )),
            (true, None) => {
                watched.push(uri.to_owned());
                Ok(true)
            }
            (false, Some(i)) => {
                watched.swap_remove(i);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Opens the server-initiated stream anew (its filter changed), if one is open.
    pub(crate) fn reopen_listen_stream(&self, conn: Arc<super::Connection>) {
        let open = {
            let mut task = self.listen_task.lock().unwrap_or_else(|e| e.into_inner());
            match task.take() {
                Some(t) if !t.is_finished() => {
                    t.abort();
                    true
                }
                _ => false,
            }
        };
        if open {
            self.open_listen_stream(conn);
        }
    }

    /// The `subscriptions/listen` request a 2026-07-28 server's stream is opened with: every
    /// list kind, and the resources the session watches.
    fn listen_frame(&self) -> Bytes {
        let envelope = self
            .listen_envelope
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let uris = serde_json::to_string(&*watched).unwrap_or_else(|_| "[]".into());
        let params = format!(
            r#"{{"_meta":{{{envelope}}},"notifications":{{"toolsListChanged":true,"promptsListChanged":true,"resourcesListChanged":true,"resourceSubscriptions":{uris}}}}}"#
        );
        jsonrpc::request(
            br#""gatehouse-listen""#,
            "subscriptions/listen",
            Some(params.as_bytes()),
        )
    }

    /// Starts the GET stream that carries server-initiated messages, once.
    pub(crate) fn open_listen_stream(&self, conn: Arc<super::Connection>) {
        let mut task = self.listen_task.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let handle = tokio::spawn(async move {
            let super::Connection::Http(this) = &*conn else {
                return;
            };
            if let Err(e) = this.listen().await {
                tracing::debug!(server = %this.server.name, "listen stream ended: {e}");
            }
        });
        *task = Some(handle.abort_handle());
    }

    /// Keeps the GET stream open: re-opens it when it ends, goes idle or grows past its limit,
    /// backing off while the server refuses or cannot be reached.
    async fn listen(&self) -> Result<(), UpstreamError> {
        let mut retry = LISTEN_RETRY;
        loop {
            let opened = tokio::time::Instant::now();
            match self.listen_once(LISTEN_IDLE).await {
                Ok(ListenEnd::Unsupported) => return Ok(()),
                Ok(ListenEnd::Reopen(why)) => {
                    tracing::debug!(server = %self.server.name, "re-opening the GET stream: {why}")
                }
                Err(e) => tracing::debug!(server = %self.server.name, "GET stream failed: {e}"),
            }
            // A stream that lived a while earns a quick re-open; one that keeps failing at once
            // is retried ever more slowly.
            if opened.elapsed() > LISTEN_RETRY_MAX {
                retry = LISTEN_RETRY;
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LISTEN_RETRY_MAX);
        }
    }

    /// Reads one GET stream (a `subscriptions/listen` stream, for a 2026-07-28 server) until it
    /// ends, stays silent for `idle`, or breaks a size limit.
    async fn listen_once(&self, idle: Duration) -> Result<ListenEnd, UpstreamError> {
        let opened = if self.is_stateless() {
            self.send_authorized(
                Method::POST,
                self.listen_frame(),
                CALL_ACCEPT,
                vec![(
                    http::HeaderName::from_static("mcp-method"),
                    HeaderValue::from_static("subscriptions/listen"),
                )],
            )
        } else {
            self.send_authorized(Method::GET, Bytes::new(), "text/event-stream", Vec::new())
        };
        let resp = tokio::time::timeout(idle, opened)
            .await
            .map_err(|_| self.server.unavailable("GET stream: no answer"))??
            .resp;
        match resp.status() {
            s if s.is_success() => {}
            // 405: the server offers no such stream, which is fine. 404: the session is gone;
            // the next call re-initializes it and opens a new stream.
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_FOUND => {
                return Ok(ListenEnd::Unsupported);
            }
            // A 2026-07-28 server that refuses to listen (no such method, say) will not agree
            // on the next attempt either.
            s if s.is_client_error()
                && self.is_stateless()
                && !matches!(
                    s,
                    StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
                ) =>
            {
                return Ok(ListenEnd::Unsupported);
            }
            s => return Err(self.server.unavailable(format!("GET stream: HTTP {s}"))),
        }
        let mut body = resp.into_body();
        let mut decoder = sse::Decoder::new(MAX_MESSAGE).with_stream_limit(MAX_STREAM);
        loop {
            loop {
                match decoder.next_event() {
                    Ok(Some(ev)) => {
                        self.on_event(ev, None, None);
                    }
                    Ok(None) => break,
                    Err(e) => return Ok(ListenEnd::Reopen(e.to_string())),
                }
            }
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Ok(ListenEnd::Reopen(format!("silent for {idle:?}"))),
                Ok(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        decoder.feed(&data);
                    }
                }
                Ok(Some(Err(e))) => {
                    return Err(self.server.unavailable(format!("stream broke: {e}")));
                }
                Ok(None) => return Ok(ListenEnd::Reopen("the server ended it".into())),
            }
        }
    }

    /// Stops the listen stream's task, if one runs.
    pub(crate) fn stop_listening(&self) {
        if let Some(t) = self
            .listen_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }

    pub(crate) async fn shutdown(&self) {
        self.stop_listening();
        let has_session = self.sent().session_id.is_some();
        if !has_session {
            return;
        }
        // 5 s in all, a token exchange included.
        let delete = async {
            if let Ok(req) = self
                .authorized(Method::DELETE, Bytes::new(), CALL_ACCEPT)
                .await
            {
                let _ = self.send_request(req).await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), delete).await;
    }
}

/// The gateway's words for an HTTP refusal (the body is the server's, kept for the log).
/// A request sent: the server's response, and whether the request went in the upstream
/// session.
struct Sending {
    resp: http::Response<hyper::body::Incoming>,
    in_session: bool,
}

/// Whether a response refuses the request's bearer token: 401 with a `Bearer` challenge
/// (RFC 6750 §3), which a server answers before it processes the request.
fn refuses_bearer(resp: &http::Response<hyper::body::Incoming>) -> bool {
    resp.status() == StatusCode::UNAUTHORIZED
        && resp
            .headers()
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| {
                v.as_bytes()
                    .get(..6)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer"))
                    && v.as_bytes().get(6).is_none_or(|b| *b == b' ')
            })
}

pub(super) fn refusal(status: StatusCode) -> String {
    match status {
        // A gateway in the way answers so when the request went through it once already.
        StatusCode::LOOP_DETECTED => {
            format!(
                "HTTP {status}: the server's URL leads back to a gateway the request came through"
            )
        }
        _ => format!("HTTP {status}"),
    }
}

/// Whether an SSE event carries a JSON-RPC message (not a priming event, a comment or another
/// event type).
fn is_message(ev: &sse::Event) -> bool {
    (ev.event.is_empty() || ev.event == "message") && !ev.data.trim_ascii().is_empty()
}

/// How often, and how soon, one call's response stream is resumed after its server ended it.
#[derive(Debug)]
struct ResumePace {
    /// What the server asked for (`retry`), within [`RESUME_WAIT_MIN`]..[`RESUME_WAIT_MAX`].
    asked: Duration,
    /// Streams in a row that brought no message: each doubles the wait.
    silent: u32,
    /// Resumes so far, for the whole call (new event ids do not reset it).
    resumed: u32,
}

impl Default for ResumePace {
    fn default() -> Self {
        ResumePace {
            asked: RESUME_WAIT,
            silent: 0,
            resumed: 0,
        }
    }
}

impl ResumePace {
    /// The server's `retry` (milliseconds): honoured, but never below the floor (`retry: 0`
    /// would have the gateway ask again at once) nor above the ceiling.
    fn asked(&mut self, ms: u64) {
        self.asked = Duration::from_millis(ms).clamp(RESUME_WAIT_MIN, RESUME_WAIT_MAX);
    }

    /// The stream brought a message: the server is moving on, so the next wait is its own.
    fn heard(&mut self) {
        self.silent = 0;
    }

    /// How long to wait before the next resume; `None` once the call had its [`MAX_RESUMES`].
    fn next(&mut self) -> Option<Duration> {
        if self.resumed >= MAX_RESUMES {
            return None;
        }
        self.resumed += 1;
        let wait = self
            .asked
            .saturating_mul(1 << self.silent.min(16))
            .min(RESUME_WAIT_MAX);
        self.silent += 1;
        Some(wait)
    }
}

/// Whether a response is an SSE stream.
pub(super) fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

pub(super) fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    super::pool::reason(e)
}

/// The whole of `body`, refused past `limit` bytes. A body of one frame (what a JSON answer
/// with a `Content-Length` is) comes back as that frame, not copied.
pub(super) async fn read_limited(
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<Bytes, String> {
    let too_long = || "cannot read response body: length limit exceeded".to_owned();
    if body.size_hint().lower() > limit as u64 {
        return Err(too_long());
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("cannot read response body: {e}"))?;
        // Trailers carry nothing an answer needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(too_long());
        }
        match (&mut joined, first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut both = BytesMut::with_capacity(earlier.len() + data.len());
                both.extend_from_slice(&earlier);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// What a `server/discover` probe found.
#[derive(Debug)]
pub(crate) enum Discovered {
    /// The server speaks 2026-07-28; its discover result.
    Stateless(Bytes),
    /// The server plainly speaks an earlier revision (no such method, or a 2025 server's
    /// refusal of a request without a session).
    Sessions,
    /// No telling (a 5xx, a 429, a refusal of what was sent): this connection uses sessions,
    /// and the next one asks again.
    Unsure,
}

/// How one GET stream ended without an error.
enum ListenEnd {
    /// The server has no GET stream for us (405) or no longer knows the session (404).
    Unsupported,
    /// Open a new one (the reason is logged).
    Reopen(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_are_paced_and_counted_for_the_whole_call() {
        let ms = Duration::from_millis;
        let mut pace = ResumePace::default();
        pace.asked(0);
        // `retry: 0` is raised to the floor, and silent streams double the wait.
        assert_eq!(
            [pace.next(), pace.next(), pace.next()],
            [Some(ms(100)), Some(ms(200)), Some(ms(400))]
        );
        // A message resets the wait, not the count; the wait never passes the ceiling.
        pace.heard();
        assert_eq!(pace.next(), Some(ms(100)));
        pace.asked(60_000);
        assert_eq!(pace.next(), Some(RESUME_WAIT_MAX));
        while pace.next().is_some() {}
        assert_eq!(pace.resumed, MAX_RESUMES);
        pace.heard();
        assert_eq!(pace.next(), None, "exhausted for the whole call");
    }

    struct Nobody;

    impl super::super::Recipient for Nobody {
        fn deliver(&self, _: usize, _: super::super::Route, _: Message) {}
    }

    fn connection(configured: http::HeaderMap) -> Connection {
        const UP: &str = "upstreams:\n  - { name: u, http: { url: \"http://127.0.0.1:1/mcp\" } }\n";
        let config = crate::config::Config::from_yaml(UP).unwrap();
        let tls = crate::outbound_tls::client_config(&Default::default()).unwrap();
        let server = Server::new(
            0,
            config.upstreams[0].clone(),
            super::super::client::client(&tls),
            crate::metrics::Metrics::new(),
        );
        let inbox = Inbox {
            recipient: Arc::new(Nobody),
            index: 0,
        };
        let url = "http://127.0.0.1:1/mcp".parse().unwrap();
        Connection::new(Arc::new(server), url, configured, inbox)
    }

    fn headers(req: &Request<Full<Bytes>>) -> Vec<(String, String)> {
        let mut all: Vec<_> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        all.sort();
        all
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all: Vec<_> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn content_lengths_are_the_lengths_in_decimal() {
        for len in [
            0,
            1,
            9,
            10,
            99,
            100,
            999,
            1000,
            4321,
            9999,
            10_000,
            123_456,
            u64::MAX,
        ] {
            assert_eq!(content_length(len), HeaderValue::from(len), "{len}");
        }
        for len in 0..LISTED_LENGTHS as u64 {
            assert_eq!(content_length(len).to_str().unwrap(), len.to_string());
        }
    }

    #[test]
    fn requests_carry_the_configured_headers_and_the_sessions_id_and_revision_once_known() {
        let mut configured = http::HeaderMap::new();
        configured.insert("x-team", HeaderValue::from_static("blue"));
        // The gateway's own Accept wins over a configured one.
        configured.insert(ACCEPT, HeaderValue::from_static("text/plain"));
        let c = connection(configured);
        let post = |c: &Connection| c.request(Method::POST, Bytes::from_static(b"{}"), CALL_ACCEPT);
        assert_eq!(
            headers(&post(&c)),
            pairs(&[
                ("accept", CALL_ACCEPT),
                // The body's, written in place of the one the prebuilt map keeps room for.
                ("content-length", "2"),
                ("content-type", "application/json"),
                // The pool's endpoint's, written with the rest rather than added per call.
                ("host", "127.0.0.1:1"),
                ("x-team", "blue"),
            ])
        );
        assert_eq!((c.session_id(), c.protocol_version()), (None, None));
        // Room for hyper's `entry` look-up, which grows a full map even to insert nothing.
        let h = post(&c).headers().clone();
        assert!(h.capacity() > h.len(), "{} of {}", h.len(), h.capacity());

        let c = c.in_session("s-1", Some("2025-06-18")).unwrap();
        c.set_protocol_version(br#"{"protocolVersion":"2025-11-25","capabilities":{}}"#);
        assert_eq!(
            headers(&post(&c)),
            pairs(&[
                ("accept", CALL_ACCEPT),
                ("content-length", "2"),
                ("content-type", "application/json"),
                ("host", "127.0.0.1:1"),
                ("mcp-protocol-version", "2025-11-25"),
                ("mcp-session-id", "s-1"),
                ("x-team", "blue"),
            ])
        );
        // A GET (the listen stream) and a DELETE: their own Accept, and no body to type.
        let get = c.request(Method::GET, Bytes::new(), "text/event-stream");
        assert_eq!(
            headers(&get),
            pairs(&[
                ("accept", "text/event-stream"),
                ("host", "127.0.0.1:1"),
                ("mcp-protocol-version", "2025-11-25"),
                ("mcp-session-id", "s-1"),
                ("x-team", "blue"),
            ])
        );
        let delete = c.request(Method::DELETE, Bytes::new(), CALL_ACCEPT);
        assert!(!delete.headers().contains_key(CONTENT_TYPE));
        // A request's own additions stay its own.
        let mut one = post(&c);
        one.headers_mut()
            .insert("authorization", HeaderValue::from_static("Bearer x"));
        assert!(!post(&c).headers().contains_key("authorization"));
        assert_eq!(
            (c.session_id().as_deref(), c.protocol_version().as_deref()),
            (Some("s-1"), Some("2025-11-25"))
        );
        c.set_stateless(String::new());
        assert_eq!(c.protocol_version().as_deref(), Some(STATELESS));
        // A call's headers, built once, follow the change.
        assert_eq!(
            post(&c).headers().get(MCP_PROTOCOL_VERSION).unwrap(),
            STATELESS
        );
    }

    #[test]
    fn host_is_the_configured_one_else_the_endpoints_and_none_through_another_client() {
        let mut configured = http::HeaderMap::new();
        configured.insert(HOST, HeaderValue::from_static("virtual.example"));
        let c = connection(configured);
        let req = c.request(Method::POST, Bytes::from_static(b"{}"), CALL_ACCEPT);
        let hosts: Vec<_> = req.headers().get_all(HOST).iter().collect();
        assert_eq!(hosts, ["virtual.example"]);
        // A relay's HTTP/2 client or a checked remote one writes its own.
        let tls = crate::outbound_tls::client_config(&Default::default()).unwrap();
        let c = connection(http::HeaderMap::new()).with_client(super::super::client::client(&tls));
        for req in [
            c.request(Method::POST, Bytes::from_static(b"{}"), CALL_ACCEPT),
            c.request(Method::GET, Bytes::new(), "text/event-stream"),
        ] {
            assert!(!req.headers().contains_key(HOST), "{:?}", req.headers());
        }
    }

    #[test]
    fn a_connection_joined_in_session_sends_that_session() {
        let c = connection(http::HeaderMap::new())
            .in_session("abc", Some("2025-06-18"))
            .unwrap();
        let req = c.request(Method::POST, Bytes::from_static(b"{}"), CALL_ACCEPT);
        assert_eq!(req.headers()[MCP_SESSION_ID], "abc");
        assert_eq!(req.headers()[MCP_PROTOCOL_VERSION], "2025-06-18");
        // Not a header value: refused, not sent.
        assert!(
            connection(http::HeaderMap::new())
                .in_session("a\nb", None)
                .is_none()
        );
    }
}
