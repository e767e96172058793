//! The 2024-11-05 HTTP+SSE front, for clients older than Streamable HTTP.
//!
//! `GET /sse` opens the client's one stream; its first event, `endpoint`, names the URL the
//! client POSTs every message to (`messages?sessionId=…`, relative, so a path prefix added by
//! a reverse proxy carries over). A POST answers 202 at once; answers and whatever servers send
//! the client travel on the stream. The client's `initialize` opens an ordinary session, so
//! everything behind the front (router, policy, upstreams) is the same as for `/mcp`. The
//! stream's id is the client's credential, bound to the principal that opened it; the session
//! ends when the stream closes, and a stream that does not initialize within the session idle
//! timeout is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response};
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::body::{Body, Uptake, accepted, watched_sse_response};
use crate::gateway::Gateway;
use crate::mcp::front::{self, FrontError};
use crate::mcp::handler::{self, Reply};
use crate::mcp::jsonrpc::{self, Kind, Outcome, code};
use crate::mcp::session::{self, Session};
use crate::mcp::sse_client::{BindError, SseClient};

/// Where HTTP+SSE clients open their stream.
pub const SSE_PATH: &str = "/sse";
/// Where HTTP+SSE clients POST their messages.
pub const MESSAGES_PATH: &str = "/messages";
/// Frames waiting for a slow client, per stream.
const STREAM_QUEUE: usize = 256;
/// Longest wait for `initialize` on a new stream.
const INITIALIZE_WITHIN: Duration = Duration::from_secs(60);

/// Serves `GET /sse`.
pub async fn serve_stream(gw: Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    match open_stream(&gw, req).await {
        Ok(r) => r,
        Err(e) => refusal(&gw, e, "GET"),
    }
}

/// Serves `POST /messages?sessionId=…`.
pub async fn serve_message(
    gw: Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    match message(&gw, req).await {
        Ok(r) => r,
        Err(e) => {
            // Refused before its body was read: the connection cannot carry another request
            // (a client that reused it would see it closed under its next one).
            let mut r = refusal(&gw, e, "POST");
            r.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

fn refusal(gw: &Gateway, e: FrontError, allow: &'static str) -> Response<Body> {
    tracing::debug!("refused HTTP+SSE request: {e}");
    let method = matches!(e, FrontError::Method(_));
    let mut resp = front::refusal(gw, e, None, None);
    if method {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

/// Host/Origin and authentication, as on `/mcp`.
async fn admit<B>(gw: &Gateway, req: &Request<B>) -> Result<Option<Identity>, FrontError> {
    let authority = front::request_authority(req)?;
    front::check_host_and_origin(&gw.config, authority, req.headers())?;
    // Refusals are audited as on `/mcp`: guessing tokens here leaves the same trace.
    let identity = gw
        .auth
        .authenticate(req.headers(), None, front::certificate_of(req))
        .await
        .inspect_err(|e| front::audit_refusal(gw, None, &e.to_string()))?;
    // Every server is behind these URLs: they are `/mcp`'s, granted as `/mcp` is.
    if let Err(e) = front::check_access(gw, None, identity.as_ref()) {
        let known = identity.as_ref().map(|i| (i.principal.clone(), ""));
        front::audit_refusal(gw, known, &e.to_string());
        return Err(e);
    }
    Ok(identity)
}

async fn open_stream(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, FrontError> {
    let principal = admit(gw, &req).await?.map(|i| i.principal);
    if req.method() != Method::GET {
        return Err(FrontError::Method(req.method().clone()));
    }
    let wants_sse = req.headers().get_all(ACCEPT).iter().next().is_none()
        || front::accepts(req.headers(), &["text/event-stream"]);
    if !wants_sse {
        return Err(FrontError::Accept("text/event-stream"));
    }
    // A stream is a session to be: until it initializes it counts against the same caps.
    let (mut pending, mut pending_here) = (0, 0);
    for c in gw.sse_clients.iter().filter(|c| c.is_pending()) {
        pending += 1;
        pending_here += usize::from(c.principal == principal);
    }
    if gw.sessions_held() + pending >= gw.config.mcp.max_sessions {
        return Err(FrontError::TooManySessions);
    }
    if !gw.may_open_session(principal.as_ref(), pending_here) {
        return Err(FrontError::TooManySessionsForPrincipal(
            gw.config.mcp.max_sessions_per_principal,
        ));
    }
    let id = session::new_id();
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    let client = Arc::new(SseClient::new(principal, tx.clone(), session::MAX_INFLIGHT));
    gw.sse_clients.insert(id.clone(), client.clone());
    let endpoint = Bytes::from(format!(
        "event: endpoint\ndata: {}?sessionId={id}\n\n",
        &MESSAGES_PATH[1..]
    ));
    let (response, uptake) = watched_sse_response(Some(endpoint), rx);
    tokio::spawn(watch_stream(gw.clone(), id, client, tx, uptake));
    Ok(response)
}

/// Keeps a client's stream alive (keep-alive comments) until the client leaves, its session
/// ends, it has not initialized in time (a minute, or the session idle timeout if shorter), or
/// its reader has taken nothing for `mcp.stalled_stream_timeout` while messages waited (what
/// servers send outside any request, or keep-alives, never wait on the stream, so without this
/// a client that stops reading would keep its session for good); then forgets the client and
/// ends its session.
async fn watch_stream(
    gw: Arc<Gateway>,
    id: Arc<str>,
    client: Arc<SseClient>,
    tx: mpsc::Sender<Bytes>,
    uptake: Arc<Uptake>,
) {
    let every = gw.config.mcp.sse_keepalive;
    let stall = gw.config.mcp.stalled_stream_timeout;
    let keep_alive = async {
        loop {
            tokio::time::sleep(every).await;
            if tx.send(Bytes::new()).await.is_err() {
                return;
            }
        }
    };
    let lifetime = async {
        let within = INITIALIZE_WITHIN.min(gw.config.mcp.session_idle_timeout);
        let initialized = tokio::time::timeout(within, client.bound());
        let session = tokio::select! {
            s = initialized => s.ok().flatten(),
            _ = tx.closed() => None,
        };
        if let Some(session) = session {
            tokio::select! {
                _ = tx.closed() => {}
                _ = session.ended() => {}
            }
        }
    };
    tokio::select! {
        _ = keep_alive => {}
        _ = lifetime => {}
        _ = uptake.stalled(stall) => {
            let session = client.session();
            let session = session.as_ref().map_or("(none yet)", |s| s.log_id());
            tracing::info!(%session, "ending an HTTP+SSE stream (and its session) whose client took nothing for {stall:?} while messages waited");
            gw.metrics.stream_stalled("sse");
            uptake.end();
        }
    }
    gw.sse_clients.remove(&id);
    if let Some(session) = client.close() {
        gw.end_session(&session.id);
    }
}

async fn message(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, FrontError> {
    let identity = admit(gw, &req).await?;
    let principal = identity.as_ref().map(|i| i.principal.clone());
    if req.method() != Method::POST {
        return Err(FrontError::Method(req.method().clone()));
    }
    if !front::is_json(req.headers().get(CONTENT_TYPE)) {
        return Err(FrontError::ContentType);
    }
    let id = req
        .uri()
        .query()
        .and_then(session_id_of)
        .ok_or(FrontError::MissingStreamId)?;
    let client = gw
        .sse_clients
        .get(id)
        .map(|c| c.clone())
        .ok_or(FrontError::UnknownSession)?;
    // A stream belongs to whoever opened it; to anyone else it does not exist.
    if client.principal != principal {
        return Err(FrontError::UnknownSession);
    }
    let trace_header = gw
        .tracer
        .as_ref()
        .and_then(|_| front::trace_header(req.headers()));
    let (head, body) = req.into_parts();
    let body = front::read_body(gw, principal.as_ref(), head.version, body).await?;
    let msg = jsonrpc::parse_client_body(body)?;
    if let Kind::Request { method, params, .. } = &msg.kind
        && let Err(e) = gw
            .auth
            .authorize(identity.as_ref(), method, params.as_deref())
    {
        let known = identity.as_ref().map(|i| (i.principal.clone(), &**method));
        front::audit_refusal(gw, known, &e.to_string());
        return Err(e.into());
    }
    match msg.kind {
        Kind::Request { id, method, params } if &*method == "initialize" => {
            let claims = identity.as_ref().map(|i| &i.claims);
            initialize(gw, &client, claims, id, params.as_deref()).await
        }
        Kind::Request { id, method, params } => {
            let Some(session) = client.session() else {
                let refusal = jsonrpc::error_response(
                    Some(&id),
                    code::INVALID_REQUEST,
                    "the session is not initialized: send initialize first",
                );
                refuse(&client, refusal);
                return Ok(accepted());
            };
            let slot = client
                .request_slot()
                .ok_or(FrontError::StreamBusy(session::MAX_INFLIGHT))?;
            if let Some(identity) = &identity {
                session.hold_claims(&identity.claims);
            }
            let mut span = gw.tracer.as_ref().and_then(|t| {
                let header = trace_header
                    .as_ref()
                    .map(|(parent, state)| (parent.as_str(), state.as_deref()));
                let mut span = t.request_span(&method, params.as_deref(), header)?;
                span.attr("mcp.session.id", session.log_id().to_owned());
                span.attr("mcp.protocol.version", session.protocol_version.to_string());
                if let Some(p) = principal.as_ref().filter(|_| t.records_principal()) {
                    span.attr("enduser.id", p.to_string());
                }
                Some(span)
            });
            let gw = gw.clone();
            tokio::spawn(async move {
                let _busy = session.touch();
                let stall = gw.config.mcp.body_timeout;
                let run = async {
                    let services = handler::Services {
                        trace: span.as_ref(),
                        ..gw.services()
                    };
                    let reply =
                        handler::request(services, &session, id.clone(), &method, params).await;
                    match reply {
                        Reply::Json(frame) | Reply::Refused(_, frame) => {
                            if let Some(span) = &mut span {
                                span.record_answer(&frame);
                            }
                            let frame = counted_answer(&client, &session, &id, frame);
                            send(&client, &session, frame, stall).await
                        }
                        Reply::Stream(mut frames) => {
                            while let Some(frame) = frames.recv().await {
                                // What servers said on the way was counted as it came.
                                let frame = if is_answer(&frame) {
                                    counted_answer(&client, &session, &id, frame)
                                } else {
                                    frame
                                };
                                if !send(&client, &session, frame, stall).await {
                                    return false;
                                }
                            }
                            true
                        }
                    }
                };
                // Dropping the request when the session ends cancels it upstream.
                let read = tokio::select! {
                    sent = run => sent,
                    _ = session.ended() => true,
                };
                drop(slot);
                if !read {
                    tracing::info!(session = %session.log_id(), "ending an HTTP+SSE session whose client stopped reading its stream");
                    gw.end_session(&session.id);
                }
            });
            Ok(accepted())
        }
        Kind::Notification { method, params } => {
            if let Some(session) = client.session() {
                front::on_notification(&session, &method, params.as_deref()).await;
            }
            Ok(accepted())
        }
        Kind::Response { id, outcome } => {
            if let Some(session) = client.session()
                && !session.on_client_response(&id, &outcome).await
            {
                tracing::debug!(session = %session.log_id(), "response to an unknown server request");
            }
            Ok(accepted())
        }
    }
}

/// Opens the client's session; the answer (or why not) goes on its stream.
async fn initialize(
    gw: &Arc<Gateway>,
    client: &Arc<SseClient>,
    claims: Option<&Arc<crate::auth::Claims>>,
    id: Bytes,
    params: Option<&[u8]>,
) -> Result<Response<Body>, FrontError> {
    let error = |code: i64, message: &str| jsonrpc::error_response(Some(&id), code, message);
    match client.reserve() {
        Ok(()) => {}
        Err(BindError::AlreadyBound) => {
            refuse(
                client,
                error(
                    code::INVALID_REQUEST,
                    "this stream's session is already initialized",
                ),
            );
            return Ok(accepted());
        }
        Err(BindError::Closed) => return Err(FrontError::UnknownSession),
    }
    let refused = if gw.sessions_held() >= gw.config.mcp.max_sessions {
        Some(FrontError::TooManySessions.to_string())
    } else if !gw.may_open_session(client.principal.as_ref(), 0) {
        Some(
            FrontError::TooManySessionsForPrincipal(gw.config.mcp.max_sessions_per_principal)
                .to_string(),
        )
    } else {
        None
    };
    if let Some(why) = refused {
        client.release();
        refuse(client, error(code::TOO_BUSY, &why));
        return Ok(accepted());
    }
    let asked = match handler::negotiate(params) {
        Ok(a) => a,
        Err(e) => {
            client.release();
            refuse(
                client,
                error(
                    code::INVALID_PARAMS,
                    &format!("invalid initialize params: {e}"),
                ),
            );
            return Ok(accepted());
        }
    };
    let session = gw.new_local_session(
        client.principal.clone(),
        asked.version,
        asked.init_params,
        asked.offers_roots,
    );
    if let Some(claims) = claims {
        session.hold_claims(claims);
    }
    if client.bind(session.clone()).is_err() {
        // The stream closed meanwhile: nobody could reach this session.
        gw.end_session(&session.id);
        return Err(FrontError::UnknownSession);
    }
    let result = handler::initialize(gw.services(), &session).await;
    let answer = jsonrpc::response(&id, &Outcome::Result(result));
    if !send(client, &session, answer, gw.config.mcp.body_timeout).await {
        gw.end_session(&session.id);
        return Ok(accepted());
    }
    // The answer first: what servers send outside any request follows it on the one stream.
    let _ = session.open_listen_stream(client.stream.clone().into());
    Ok(accepted())
}

/// An answer to request `id` as the stream queues it: counted with what the session's queues
/// hold for a client that may not read them (else 256 answers of many MiB could wait on a
/// stream left unread). Past that, it goes uncounted to a stream with nothing waiting (its
/// client reads: other sessions' unread queues must not cost it its results), and is an
/// error in its place on one where answers pile up.
fn counted_answer(client: &SseClient, session: &Session, id: &[u8], frame: Bytes) -> Bytes {
    let idle = client.stream.capacity() == client.stream.max_capacity();
    match session.admit_queued(frame.clone()) {
        Some(counted) => counted,
        None if idle => frame,
        None => jsonrpc::error_response(
            Some(id),
            code::TOO_BUSY,
            "the answer does not fit in what this session may hold for its stream while it is unread: read the stream",
        ),
    }
}

/// Whether a frame of a call's stream is its answer (one large enough to be counted).
fn is_answer(frame: &Bytes) -> bool {
    frame.len() >= crate::mcp::queued_bytes::COUNTED_FROM
        && matches!(
            jsonrpc::parse(frame.clone()).map(|m| m.kind),
            Ok(Kind::Response { .. })
        )
}

/// Puts a frame on the client's stream, waiting while the client is slow to read, but not past
/// the end of its session; false if the client did not read for `stall`.
async fn send(client: &SseClient, session: &Session, frame: Bytes, stall: Duration) -> bool {
    tokio::select! {
        sent = client.stream.send_timeout(frame, stall) => {
            !matches!(sent, Err(mpsc::error::SendTimeoutError::Timeout(_)))
        }
        _ = session.ended() => true,
    }
}

/// Puts a refusal on the stream of a client that has no session (nothing to wait on: a full
/// queue drops it).
fn refuse(client: &SseClient, frame: Bytes) {
    let _ = client.stream.try_send(frame);
}

/// The `sessionId` of a query string.
fn session_id_of(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sessionId="))
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_come_from_the_query() {
        assert_eq!(session_id_of("sessionId=abc"), Some("abc"));
        assert_eq!(session_id_of("x=1&sessionId=abc&y=2"), Some("abc"));
        assert_eq!(session_id_of("sessionid=abc"), None);
        assert_eq!(session_id_of("sessionId="), None);
        assert_eq!(session_id_of("xsessionId=abc"), None);
    }
}
