//! The floor: the least any HTTP proxy does for one MCP call, measured beside the gateway.
//!
//! It reads a request, sends it on to the upstream over a pooled connection and streams the
//! answer back: no JSON read, no session, no policy. Whatever this costs on a machine, no
//! gateway in front of the same upstream can cost less, so the gateway's rows are read against
//! it as well as against the direct connection. Two runtime models, both with `TCP_NODELAY` on
//! every socket:
//! - `shared`: one multi-thread runtime (a worker per CPU), one listener, one upstream pool;
//! - `per-thread`: a current-thread runtime per CPU, each with its own `SO_REUSEPORT` listener
//!   and upstream pool, so a call never leaves the thread that accepted its connection;
//! - `paired`: a thread per CPU as in `per-thread`, each client connection with an upstream
//!   connection of its own, both driven by one task (no hand-off between tasks per call);
//! - `tcp`: below any HTTP proxy, a relay of bytes: a thread per CPU as in `per-thread`, each
//!   client connection paired with an upstream connection of its own and the bytes copied both
//!   ways unread. What this costs is what the machine charges for one more hop at all.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Pool = Client<HttpConnector, Incoming>;

/// Serves as a floor proxy of `upstream_url` in runtime model `model`, printing
/// `LISTENING http://ADDR/mcp` once it accepts; never returns.
pub fn serve(model: &str, upstream_url: &str) -> ! {
    let upstream: Uri = upstream_url.parse().expect("an upstream URL");
    let authority = upstream.authority().expect("a host").clone();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    match model {
        "shared" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                announce(listener.local_addr().unwrap());
                accept(listener, authority).await
            })
        }
        "per-thread" | "tcp" | "paired" => {
            let model = model.to_owned();
            let first = reuse_port_listener("127.0.0.1:0".parse().unwrap());
            let addr = first.local_addr().unwrap();
            let mut listeners = vec![first];
            listeners.extend((1..threads).map(|_| reuse_port_listener(addr)));
            announce(addr);
            let handles: Vec<_> = listeners
                .into_iter()
                .map(|l| {
                    let authority = authority.clone();
                    let model = model.clone();
                    std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        runtime.block_on(async {
                            let listener = tokio::net::TcpListener::from_std(l).unwrap();
                            match model.as_str() {
                                "tcp" => relay_bytes(listener, authority).await,
                                "paired" => accept_paired(listener, authority).await,
                                _ => accept(listener, authority).await,
                            }
                        })
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            unreachable!("the serving threads never end")
        }
        other => panic!("floor proxy model {other:?}: shared, per-thread, paired or tcp"),
    }
}

fn announce(addr: SocketAddr) {
    println!("LISTENING http://{addr}/mcp");
}

fn reuse_port_listener(addr: SocketAddr) -> std::net::TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    socket.into()
}

/// Accepts forever; every connection is served on the runtime running this.
async fn accept(listener: tokio::net::TcpListener, upstream: Authority) -> ! {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let pool: Pool = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(connector);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (pool, upstream) = (pool.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(pool.clone(), upstream.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Accepts forever; each connection gets an upstream connection of its own, and one task
/// drives both.
async fn accept_paired(listener: tokio::net::TcpListener, upstream: Authority) -> ! {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream.as_str()).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let Ok((sender, upstream_conn)) =
                hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(server)).await
            else {
                return;
            };
            let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
            let service = service_fn(move |mut req: http::Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    req.headers_mut().remove(http::header::HOST);
                    let mut sender = sender.lock().await;
                    Ok::<_, Infallible>(
                        sender
                            .send_request(req)
                            .await
                            .expect("the upstream answers the floor proxy"),
                    )
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(client), service);
            tokio::select! {
                _ = served => {}
                _ = upstream_conn => {}
            }
        });
    }
}

/// Accepts forever, relaying each connection's bytes to a new upstream connection and back.
async fn relay_bytes(listener: tokio::net::TcpListener, upstream: Authority) -> ! {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(mut server) = tokio::net::TcpStream::connect(upstream.as_str()).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

/// Sends `req` on to the upstream as it came (path, headers, body), and its answer back.
async fn forward(
    pool: Pool,
    upstream: Authority,
    mut req: http::Request<Incoming>,
) -> Result<http::Response<Incoming>, Infallible> {
    let mut target = http::uri::Parts::default();
    target.scheme = Some(Scheme::HTTP);
    target.authority = Some(upstream);
    target.path_and_query = req.uri().path_and_query().cloned();
    *req.uri_mut() = Uri::from_parts(target).expect("an upstream URI");
    // The client names the upstream in `Host`.
    req.headers_mut().remove(http::header::HOST);
    Ok(pool
        .request(req)
        .await
        .expect("the upstream answers the floor proxy"))
}
