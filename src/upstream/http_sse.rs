//! HTTP+SSE upstream (MCP 2024-11-05): a GET stream whose first `endpoint` event names the URL
//! every message is POSTed to; everything the server sends arrives as `message` events on that
//! one stream.
//!
//! That is one stream of messages each way, as with a stdio server, so the connection is a
//! [`stdio::Connection`] over two pipes: one task copies the SSE stream's messages into the
//! first, one line each, another POSTs each line of the second.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::http::{Client, MAX_MESSAGE, connect_reason, is_event_stream, read_limited};
use super::line_reader::{Line, LineReader};
use super::{Inbox, Server, UpstreamError, stdio};
use crate::mcp::jsonrpc::{self, Kind, code};
use crate::sse;

/// Bytes buffered in each pipe between the HTTP tasks and the connection.
const PIPE: usize = 64 * 1024;

/// Opens the server's SSE stream, waits for its endpoint, and returns the connection (not yet
/// initialized).
pub(crate) async fn connect(
    server: Arc<Server>,
    client: Client,
    url: &Uri,
    headers: &HeaderMap,
    inbox: Inbox,
) -> Result<stdio::Connection, UpstreamError> {
    let req = request(
        &server,
        http::Method::GET,
        url.clone(),
        headers,
        Bytes::new(),
    )?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| server.unavailable(connect_reason(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let body = read_limited(resp.into_body(), 512)
            .await
            .unwrap_or_default();
        if let Some(refused) = credentials_refused(&server, status, &body) {
            return Err(refused);
        }
        // The URL is not quoted: these reasons reach clients, and a URL may carry a key in
        // its path or query.
        return Err(server.unavailable_saying(
            format!("the server's SSE stream: {}", super::http::refusal(status)),
            &body,
        ));
    }
    if !is_event_stream(resp.headers()) {
        return Err(server.unavailable("the server's SSE URL did not answer an SSE stream"));
    }
    let mut body = resp.into_body();
    let mut decoder = sse::Decoder::new(MAX_MESSAGE);
    let endpoint = loop {
        match decoder.next_event() {
            Ok(Some(ev)) if ev.event == "endpoint" => {
                break endpoint_of(url, &ev.data)
                    .map_err(|e| server.unavailable_saying(e, &ev.data))?;
            }
            Ok(Some(ev)) => {
                return Err(server.unavailable_saying(
                    "the SSE stream's first event is not \"endpoint\"",
                    ev.event.as_bytes(),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(server.unavailable(e.to_string())),
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    decoder.feed(&data);
                }
            }
            Some(Err(e)) => return Err(server.unavailable(format!("SSE stream broke: {e}"))),
            None => {
                return Err(server.unavailable("the SSE stream ended before naming its endpoint"));
            }
        }
    };
    tracing::debug!(server = %server.name, %endpoint, "HTTP+SSE upstream connected");
    let (conn_reads, server_writes) = tokio::io::duplex(PIPE);
    let (conn_writes, posts) = tokio::io::duplex(PIPE);
    let (refusals, refused) = mpsc::channel(64);
    tokio::spawn(read_stream(
        server.clone(),
        body,
        decoder,
        server_writes,
        refused,
    ));
    tokio::spawn(post_messages(
        server.clone(),
        client,
        endpoint,
        headers.clone(),
        posts,
        refusals,
    ));
    Ok(
        stdio::Connection::over(server, conn_reads, conn_writes, inbox, None)
            .carried_by("SSE stream"),
    )
}

fn request(
    server: &Server,
    method: http::Method,
    url: Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, UpstreamError> {
    let mut req = Request::builder().method(method).uri(url);
    let h = req.headers_mut().expect("builder has no error yet");
    h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    if body.is_empty() {
        h.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    } else {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    req.body(Full::new(body))
        .map_err(|e| server.unavailable(format!("cannot build request: {e}")))
}

/// Credentials of the caller's own that the server refuses (401, 403) are the caller's
/// failure, counted: the server is up for everyone else.
fn credentials_refused(server: &Server, status: StatusCode, body: &[u8]) -> Option<UpstreamError> {
    if !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        || server.config.credentials.is_none()
    {
        return None;
    }
    tracing::debug!(server = %server.name, "the server refused the caller's credentials: HTTP {status}: {}", super::error::server_text(body));
    server.metrics.credentials_refused(server.label);
    Some(UpstreamError::NoCredentials {
        server: server.name.clone(),
        reason: format!("the server refused the caller's credentials (HTTP {status})"),
    })
}

/// The URL an `endpoint` event names, resolved against the stream's URL. It must stay on the
/// stream's origin: a server that could point our POSTs elsewhere would have the gateway send
/// its clients' messages, and the configured credentials, to any host.
fn endpoint_of(stream: &Uri, data: &[u8]) -> Result<Uri, String> {
    let text = std::str::from_utf8(data)
        .map_err(|_| "the endpoint event is not UTF-8".to_owned())?
        .trim();
    // Browsers read `\` as `/` in http URLs; nothing honest needs one, so no reading of it is
    // guessed at.
    if text.contains('\\') {
        return Err("the endpoint event names a URL with a backslash".to_owned());
    }
    let scheme = stream.scheme_str().unwrap_or("http");
    let base = format!(
        "{scheme}://{}",
        stream.authority().map_or("", |a| a.as_str())
    );
    let path = stream.path();
    let has_scheme = text.split_once("://").is_some_and(|(s, _)| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let resolved = if has_scheme {
        text.to_owned()
    } else if text.starts_with("//") {
        format!("{scheme}:{text}")
    } else if text.starts_with('/') {
        format!("{base}{text}")
    } else if text.starts_with('?') {
        format!("{base}{path}{text}")
    } else {
        // Relative to the stream's directory, as a browser resolves it.
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{base}{dir}{text}")
    };
    let uri: Uri = resolved
        .parse()
        .map_err(|e| format!("the endpoint event names no URL ({e})"))?;
    if origin(&uri) != origin(stream) {
        return Err("the endpoint event names a URL outside the stream's origin".to_owned());
    }
    Ok(uri)
}

/// Scheme, host and port (default ports filled in) of a URL; `None` parts never match a
/// real origin (an authority with userinfo is no origin at all).
fn origin(uri: &Uri) -> Option<(String, String, u16)> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let port = authority.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    Some((scheme, authority.host().to_ascii_lowercase(), port))
}

/// Copies the SSE stream's messages into the connection's read pipe, one line each, and the
/// answers made up for messages the server refused; ends (and so ends the connection) when the
/// stream does, or when the POSTing task has ended (the connection is closing, or the server
/// forgot the session) and its last refusals are written.
async fn read_stream(
    server: Arc<Server>,
    mut body: hyper::body::Incoming,
    mut decoder: sse::Decoder,
    mut pipe: DuplexStream,
    mut refused: mpsc::Receiver<Bytes>,
) {
    loop {
        loop {
            match decoder.next_event() {
                Ok(Some(ev)) if ev.event.is_empty() || ev.event == "message" => {
                    if ev.data.trim_ascii().is_empty() {
                        continue;
                    }
                    let line = stdio::one_line(ev.data);
                    if pipe.write_all(&line).await.is_err() || pipe.write_all(b"\n").await.is_err()
                    {
                        return;
                    }
                }
                Ok(Some(ev)) => {
                    tracing::debug!(server = %server.name, event = %ev.event, "ignored SSE event")
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(server = %server.name, "ending the SSE stream: {e}");
                    return;
                }
            }
        }
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        decoder.feed(&data);
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(server = %server.name, "SSE stream broke: {e}");
                    return;
                }
                None => {
                    tracing::info!(server = %server.name, "the server ended its SSE stream");
                    return;
                }
            },
            answer = refused.recv() => {
                let Some(answer) = answer else { return };
                if pipe.write_all(&answer).await.is_err() || pipe.write_all(b"\n").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// POSTs each line the connection writes to the endpoint, in order. A message the server
/// refuses is answered in its place (so its caller hears why at once); a server that no longer
/// knows the session (404) ends the stream, and so the connection, which the link re-opens.
async fn post_messages(
    server: Arc<Server>,
    client: Client,
    endpoint: Uri,
    headers: HeaderMap,
    pipe: DuplexStream,
    refusals: mpsc::Sender<Bytes>,
) {
    // The connection writes whole lines of its own making; any length it may send.
    let mut lines = LineReader::new(pipe, usize::MAX);
    while let Ok(Line::Message(line)) = lines.next().await {
        let frame = line.slice_ref(line.trim_ascii());
        if frame.is_empty() {
            continue;
        }
        let Err(refused) = post(&server, &client, &endpoint, &headers, frame.clone()).await else {
            continue;
        };
        let (code, message) = match &refused {
            Refused::Credentials(e) => (e.code(), e.to_string()),
            Refused::Other { why, said, .. } => {
                if let Some(more) = server.failure_logged() {
                    tracing::warn!(server = %server.name, said = %said, "POST to the server's message URL: {why}{more}");
                }
                (
                    code::INTERNAL_ERROR,
                    format!("upstream {} refused the message: {why}", server.name),
                )
            }
        };
        if let Ok(jsonrpc::Message {
            kind: Kind::Request { id, .. },
            ..
        }) = jsonrpc::parse(frame)
        {
            let _ = refusals
                .send(jsonrpc::error_response(Some(&id), code, &message))
                .await;
        }
        if matches!(refused, Refused::Other { gone: true, .. }) {
            break;
        }
    }
    // Dropping `refusals` ends the stream's task, and so the connection.
}

/// Why a POST failed.
enum Refused {
    /// The server refused the caller's own credentials.
    Credentials(UpstreamError),
    /// Anything else (`said`: the server's words, for the log only); `gone` when the server
    /// has forgotten the session.
    Other {
        why: String,
        said: Box<str>,
        gone: bool,
    },
}

impl Refused {
    fn other(why: String) -> Refused {
        Refused::Other {
            why,
            said: "".into(),
            gone: false,
        }
    }
}

/// One POST, answered (headers and body) within the connect timeout: the server only has to
/// accept the message, its answer comes on the stream.
async fn post(
    server: &Server,
    client: &Client,
    endpoint: &Uri,
    headers: &HeaderMap,
    frame: Bytes,
) -> Result<(), Refused> {
    let req = request(server, http::Method::POST, endpoint.clone(), headers, frame)
        .map_err(|e| Refused::other(e.to_string()))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| Refused::other(connect_reason(&e)))?;
        let status = resp.status();
        let body = read_limited(resp.into_body(), 512)
            .await
            .unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        if let Some(refused) = credentials_refused(server, status, &body) {
            return Err(Refused::Credentials(refused));
        }
        Err(Refused::Other {
            why: format!("HTTP {status}"),
            said: super::error::server_text(&body),
            gone: status == StatusCode::NOT_FOUND,
        })
    };
    tokio::time::timeout(server.config.connect_timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(Refused::other("no answer in time".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_resolve_on_the_stream_origin() {
        let stream: Uri = "http://127.0.0.1:8000/mcp/sse".parse().unwrap();
        let ok = |d: &str| endpoint_of(&stream, d.as_bytes()).map(|u| u.to_string());
        assert_eq!(
            ok("/messages/?session_id=ab").unwrap(),
            "http://127.0.0.1:8000/messages/?session_id=ab"
        );
        assert_eq!(
            ok("messages?sessionId=1").unwrap(),
            "http://127.0.0.1:8000/mcp/messages?sessionId=1"
        );
        assert_eq!(
            ok("http://127.0.0.1:8000/m").unwrap(),
            "http://127.0.0.1:8000/m"
        );
        assert_eq!(
            ok("?sessionId=q").unwrap(),
            "http://127.0.0.1:8000/mcp/sse?sessionId=q"
        );
        assert_eq!(
            ok("messages?next=http://x").unwrap(),
            "http://127.0.0.1:8000/mcp/messages?next=http://x"
        );
        let default_port: Uri = "http://Example.com/sse".parse().unwrap();
        assert_eq!(
            endpoint_of(&default_port, b"http://example.com:80/m")
                .unwrap()
                .to_string(),
            "http://example.com:80/m"
        );
        for elsewhere in [
            "http://evil.example/m",
            "//evil.example/m",
            "https://127.0.0.1:8000/m",
            "http://127.0.0.1:8001/m",
            "http://127.0.0.1:8000@evil.example/m",
            "http://evil.example@127.0.0.1:8000/m",
            "http:\\\\evil.example/m",
        ] {
            assert!(ok(elsewhere).is_err(), "{elsewhere}");
        }
        assert!(endpoint_of(&stream, b"\xff").is_err());
    }
}
