//! The listener: accepts TCP connections, applies header and body deadlines, and routes paths:
//! the MCP endpoint, health probes and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::Body;
use crate::gateway::Gateway;
use crate::mcp::{front, jsonrpc};

/// The MCP endpoint path.
pub const MCP_PATH: &str = "/mcp";

/// A running listener.
pub struct Listening {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds the configured address and serves until stopped.
pub async fn bind(gw: Arc<Gateway>) -> std::io::Result<Listening> {
    let listener = TcpListener::bind(gw.config.listen).await?;
    let local_addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let gw = gw.clone();
            tokio::spawn(async move {
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(gw.config.mcp.header_timeout);
                builder.http2().timer(TokioTimer::new());
                let service = service_fn(move |req| {
                    let gw = gw.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(gw, req).await) }
                });
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            });
        }
    });
    Ok(Listening {
        local_addr,
        stop,
        task,
    })
}

async fn route(gw: Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let resp = match req.uri().path() {
        MCP_PATH => front::serve(gw.clone(), req).await,
        path if path.starts_with(crate::admin::PREFIX) => {
            crate::admin::serve(gw.clone(), req).await
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut r = text(StatusCode::OK, gw.metrics.render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        path => {
            let mut r = Response::new(Body::full(jsonrpc::error_response(
                None,
                -32000,
                &format!("no such endpoint: {path}; the MCP endpoint is {MCP_PATH}"),
            )));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    };
    gw.metrics.http_response(resp.status().as_u16());
    resp
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
