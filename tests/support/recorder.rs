//! A minimal Streamable HTTP MCP server that records what it is sent: a faithful peer for
//! what the gateway sends upstream (headers above all).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// A minimal Streamable HTTP MCP server (JSON answers, one session id) whose one tool answers
/// with the `Authorization` header it was sent; it keeps every request's headers.
pub struct Recorder {
    /// Its MCP endpoint.
    pub url: String,
    /// The headers of every request, in order.
    pub seen: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl Recorder {
    /// Starts serving on a free loopback port.
    pub async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
        let kept = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            kept.lock().unwrap().push(req.headers().clone());
                            Ok::<_, std::convert::Infallible>(answer(req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { url, seen }
    }
}

async fn answer(req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let status = |s: u16| {
        let mut r = http::Response::new(Full::new(Bytes::new()));
        *r.status_mut() = http::StatusCode::from_u16(s).unwrap();
        r
    };
    if req.method() == http::Method::GET {
        return status(405);
    }
    if req.method() == http::Method::DELETE {
        return status(200);
    }
    let auth = req
        .headers()
        .get("authorization")
        .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(id) = msg.get("id").cloned() else {
        return status(202);
    };
    let result = match msg["method"].as_str().unwrap_or("") {
        "initialize" => json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "recorder", "version": "1"}}),
        "tools/list" => json!({"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]}),
        "tools/call" => json!({"content": [{"type": "text", "text": auth}]}),
        _ => json!({}),
    };
    let mut r = http::Response::new(Full::new(Bytes::from(
        json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
    )));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("mcp-session-id", "recorded-session".parse().unwrap());
    r
}
