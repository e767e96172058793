//! Keep-alive HTTP/1.1 connections to one server's plain-http endpoints: what every call to
//! such a server is sent on. hyper-util's pooled client keys its pool by scheme and authority
//! and hashes that key three times per request with SipHash, a byte at a time (about 1 k
//! instructions each for `127.0.0.1:PORT`, more for an in-cluster name); a server has one
//! or two authorities, which this pool compares as bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower_service::Service;

use super::client::Resolver;

/// How long after its last answer began a connection may still be used (so it has been idle no
/// longer than this): below common server keep-alive
/// timeouts (Node's is 5 s), so a request rarely meets a connection the server is closing.
/// An answer that takes longer (a long call, a listen stream) leaves its connection to be closed
/// rather than used again: safe, if not thrifty. Tests run on loaded machines: a minute there.
const IDLE: Duration = Duration::from_secs(if cfg!(test) { 60 } else { 4 });
/// Most connections kept per server, busy or idle (more are closed once their answer is read).
const MAX_KEPT: usize = 1024;
/// How long a thread pinned to its runtime leaves another thread's idle connection to it
/// before taking it.
const CROSS_THREAD_IDLE: Duration = Duration::from_secs(1);
/// Kept connections a request may find closed by the server before it is sent on a new one:
/// a request a connection never wrote is safe to send again.
const RETRIES: usize = 2;

/// Connections kept open to one server's plain-http endpoints.
pub struct Pool {
    connector: HttpConnector<Resolver>,
    /// Connections kept, busy or idle, newest last.
    kept: Mutex<Vec<Kept>>,
    /// Whether a task closes the connections idle too long.
    reaping: AtomicBool,
}

/// A connection kept for later requests.
struct Kept {
    authority: Authority,
    sender: SendRequest<Full<Bytes>>,
    /// The thread it was opened on, where its task runs when the runtime pins tasks.
    thread: std::thread::ThreadId,
    /// When its last answer began: it has been idle no longer than since then.
    since: Instant,
}

impl Default for Pool {
    fn default() -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver::default());
        connector.set_nodelay(true);
        Pool {
            connector,
            kept: Mutex::new(Vec::new()),
            reaping: AtomicBool::new(false),
        }
    }
}

impl Pool {
    /// Sends `req` to `endpoint` (its target and `Host` written here) on an idle connection to
    /// its authority, else on a new one; the connection is kept for the next request once its
    /// answer has been read.
    pub async fn send(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, String> {
        *req.uri_mut() = endpoint.origin.clone();
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, endpoint.host.clone());
        }
        let mut tries = 0;
        loop {
            let kept = if tries < RETRIES {
                self.take(&endpoint.authority)
            } else {
                None
            };
            let (mut sender, thread, reused) = match kept {
                Some((sender, thread)) => (sender, thread, true),
                None => {
                    let sender = self.connect(&endpoint.url).await?;
                    (sender, std::thread::current().id(), false)
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.keep(endpoint.authority.clone(), sender, thread);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the server closed a kept connection first.
                    Some(unsent) if reused => {
                        tries += 1;
                        req = unsent;
                    }
                    _ => return Err(reason(e.error())),
                },
            }
        }
    }

    /// Takes the newest idle connection to `authority`, after closing those kept too long.
    fn take(
        &self,
        authority: &Authority,
    ) -> Option<(SendRequest<Full<Bytes>>, std::thread::ThreadId)> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // Kept in the order their answers began: the expired ones lead.
        let now = Instant::now();
        let expired = kept.partition_point(|k| now.duration_since(k.since) >= IDLE);
        kept.drain(..expired);
        // Closed by the server (a restart): left, they would fill the pool.
        kept.retain(|k| !k.sender.is_closed());
        // Ready: its last answer has been read. One opened on this thread first: its task
        // runs here, so with connections pinned to threads the call wakes no other thread.
        // On such a thread (a runtime of its own), another thread's only once that thread has
        // left it idle a while: taking one in use moments ago would wake that thread twice per
        // call (measured: 3.6 context switches per call against 2.0, for a client alternating
        // between two connections), where a connection of its own is opened once. A server
        // that limits its connections still gets one back from a thread that no longer calls.
        let here = std::thread::current().id();
        let usable = |k: &Kept| k.authority.as_str() == authority.as_str() && k.sender.is_ready();
        // Asked only when this thread has none of its own (it clones the runtime's handle).
        let pinned = || {
            tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        };
        let chosen = kept
            .iter()
            .rposition(|k| k.thread == here && usable(k))
            .or_else(|| match pinned() {
                false => kept.iter().rposition(usable),
                // The oldest first: the least likely to be wanted back by its thread.
                true => kept
                    .iter()
                    .position(|k| now.duration_since(k.since) >= CROSS_THREAD_IDLE && usable(k)),
            })?;
        let taken = kept.remove(chosen);
        Some((taken.sender, taken.thread))
    }

    /// Keeps a connection for the next request. An HTTP/1.1 connection carries one exchange at
    /// a time: it is taken again only once hyper says it is ready, that is once this answer has
    /// been read (kept at once, without a task to wait for that, as a call's answer is read on
    /// the caller's task). A connection whose answer is left unread is closed by hyper, and
    /// dropped when a request looks.
    fn keep(
        self: &Arc<Self>,
        authority: Authority,
        sender: SendRequest<Full<Bytes>>,
        thread: std::thread::ThreadId,
    ) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_KEPT {
            // Not kept: hyper closes it once its answer is read.
            return;
        }
        kept.push(Kept {
            authority,
            sender,
            thread,
            since: Instant::now(),
        });
        // Under the lock, as the reaper decides to stop under it.
        if !self.reaping.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Opens a connection to `target`'s host, resolved as the shared client resolves it.
    async fn connect(&self, target: &Uri) -> Result<SendRequest<Full<Bytes>>, String> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| reason(&e))?;
        let io = connector
            .call(target.clone())
            .await
            .map_err(|e| reason(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| reason(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        sender.ready().await.map_err(|e| reason(&e))?;
        Ok(sender)
    }
}

/// Closes connections idle too long, while any are kept, so a quiet server is not held to
/// sockets until it closes them itself.
async fn reap(pool: std::sync::Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut kept = pool.kept.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let expired = kept.partition_point(|k| now.duration_since(k.since) >= IDLE);
        kept.drain(..expired);
        if kept.is_empty() {
            pool.reaping.store(false, Ordering::Release);
            return;
        }
    }
}

/// A plain-http URL as its requests are sent, worked out once per upstream connection rather
/// than per request: the path on the request line (origin form), `Host`, and the authority its
/// connections are kept under.
pub struct Endpoint {
    url: Uri,
    authority: Authority,
    host: HeaderValue,
    origin: Uri,
}

impl Endpoint {
    #[cfg(test)]
    fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The `Host` header its requests carry.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The endpoint of `url`, an absolute `http://` URL.
    pub fn new(url: &Uri) -> Result<Endpoint, String> {
        let authority = url
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url} has no host"))?;
        let path = url
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Endpoint {
            url: url.clone(),
            host: host_header(&authority)?,
            authority,
            origin: Uri::from(path),
        })
    }
}

/// `Host` for `authority`: its host (never credentials a URL may carry) and its port unless
/// it is 80, as the shared client writes it.
fn host_header(authority: &Authority) -> Result<HeaderValue, String> {
    let host = authority.host();
    let value = match authority.port_u16() {
        Some(port) if port != 80 => HeaderValue::from_str(&format!("{host}:{port}")),
        _ => HeaderValue::from_str(host),
    };
    value.map_err(|_| format!("{host:?} cannot be a Host header"))
}

/// An error and its causes, as one line.
pub fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each request with its request line's target and `Host`, counting
    /// the connections it accepted; `/stream` answers with a body that stays open until
    /// `release` is notified.
    async fn server() -> (Uri, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (count, gate) = (accepted.clone(), release.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let gate = gate.clone();
                    async move {
                        let said = format!(
                            "{} {}",
                            req.uri(),
                            req.headers()[http::header::HOST].to_str().unwrap()
                        );
                        let body: http_body_util::combinators::BoxBody<Bytes, hyper::Error> =
                            if req.uri().path() == "/stream" {
                                let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
                                tokio::spawn(async move {
                                    let _ = tx.send(Bytes::from("first ")).await;
                                    gate.notified().await;
                                    let _ = tx.send(Bytes::from("last")).await;
                                });
                                let frames = futures_util::stream::unfold(rx, |mut rx| async {
                                    let data = rx.recv().await?;
                                    Some((Ok(hyper::body::Frame::data(data)), rx))
                                });
                                http_body_util::StreamBody::new(frames).boxed()
                            } else {
                                Full::new(Bytes::from(said))
                                    .map_err(|never| match never {})
                                    .boxed()
                            };
                        Ok::<_, hyper::Error>(Response::new(body))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        let url: Uri = format!("http://{addr}/mcp?x=1").parse().unwrap();
        (url, accepted, release)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::new(Full::new(Bytes::new()))
    }

    fn at(url: &Uri) -> Endpoint {
        Endpoint::new(url).unwrap()
    }

    /// The body of the server's streaming answer, its first part on its way.
    async fn streaming(pool: &Arc<Pool>, url: &Uri) -> Incoming {
        let stream = format!("http://{}/stream", url.authority().unwrap());
        let resp = pool.send(&at(&stream.parse().unwrap()), get()).await;
        resp.unwrap().into_body()
    }

    async fn text(resp: Response<Incoming>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_in_origin_form() {
        let (url, accepted, _) = server().await;
        let pool = Arc::new(Pool::default());
        for _ in 0..5 {
            let said = text(pool.send(&at(&url), get()).await.unwrap()).await;
            assert_eq!(said, format!("/mcp?x=1 {}", url.authority().unwrap()));
            // Ready again once its answer is read, with no wait: the next call takes it.
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.kept.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_answer_is_read_whole_in_one_frame_or_several_and_refused_past_its_limit() {
        use super::super::http::read_limited;
        let (url, _, release) = server().await;
        let pool = Arc::new(Pool::default());
        let said = format!("/mcp?x=1 {}", url.authority().unwrap());
        let one = pool.send(&at(&url), get()).await.unwrap().into_body();
        assert_eq!(read_limited(one, said.len()).await.unwrap(), said);
        // Its length is known before it is read: refused at once.
        let one = pool.send(&at(&url), get()).await.unwrap().into_body();
        let refused = read_limited(one, said.len() - 1).await.unwrap_err();
        assert!(refused.contains("length limit exceeded"), "{refused}");
        // Two frames, of unknown length up front, joined.
        let two = streaming(&pool, &url).await;
        release.notify_one();
        assert_eq!(read_limited(two, 10).await.unwrap(), "first last");
        // Refused once what came passes the limit.
        let two = streaming(&pool, &url).await;
        release.notify_one();
        let refused = read_limited(two, 9).await.unwrap_err();
        assert!(refused.contains("length limit exceeded"), "{refused}");
    }

    #[tokio::test]
    async fn a_connection_whose_answer_is_still_coming_is_not_taken() {
        let (url, accepted, release) = server().await;
        let pool = Arc::new(Pool::default());
        let mut body = streaming(&pool, &url).await;
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first ");
        // The stream holds its connection: this call gets one of its own.
        let said = text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert!(said.starts_with("/mcp?x=1 "), "{said}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        release.notify_one();
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last, "last");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_used_and_the_request_still_goes() {
        // Answers one request per connection and closes it without saying so (no
        // `Connection: close`), as a server whose keep-alive timeout just passed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        let url: Uri = format!("http://{addr}/mcp").parse().unwrap();
        let pool = Arc::new(Pool::default());
        for _ in 0..5 {
            let resp = pool
                .send(&at(&url), get())
                .await
                .expect("sent despite the close");
            assert_eq!(text(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// Waits until every kept connection is ready (its last answer read), failing if one
    /// does not get there.
    async fn all_ready(pool: &Pool) {
        // By the clock, not by yields: on a shared runtime the connections' tasks run on other
        // workers, which a burst of yields here can outrun.
        for _ in 0..5_000 {
            if pool
                .kept
                .lock()
                .unwrap()
                .iter()
                .all(|k| k.sender.is_ready())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("a kept connection never became ready within 5 s");
    }

    /// Marks kept connection `i` as opened by another thread.
    fn foreign(pool: &Pool, i: usize) {
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .unwrap();
        pool.kept.lock().unwrap()[i].thread = other;
    }

    /// Marks kept connection `i` as idle for longer than another thread waits to take it.
    fn idled(pool: &Pool, i: usize) {
        let mut kept = pool.kept.lock().unwrap();
        kept[i].since = Instant::now()
            .checked_sub(CROSS_THREAD_IDLE * 2)
            .expect("the clock is past two seconds");
    }

    /// A pool holding one ready connection to a test server, marked as another thread's.
    async fn with_a_foreign_connection() -> (Uri, Arc<AtomicUsize>, Arc<Pool>) {
        let (url, accepted, _) = server().await;
        let pool = Arc::new(Pool::default());
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        all_ready(&pool).await;
        foreign(&pool, 0);
        (url, accepted, pool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_shared_runtime_any_threads_idle_connection_is_taken() {
        // As if opened by another worker: on a shared runtime its task runs on any of them.
        let (url, accepted, pool) = with_a_foreign_connection().await;
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "reused, not opened again"
        );
    }

    #[tokio::test]
    async fn a_pinned_thread_opens_its_own_connection_unless_anothers_has_idled() {
        let (url, accepted, pool) = with_a_foreign_connection().await;
        // Used moments ago by its own thread: a connection of this thread's own is opened.
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        all_ready(&pool).await;
        assert_eq!(pool.kept.lock().unwrap().len(), 2);
        // Now both are another thread's, the older one idle long enough: that one is taken.
        foreign(&pool, 1);
        idled(&pool, 0);
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the idle one reused");
    }

    #[tokio::test]
    async fn an_answer_left_unread_does_not_leave_its_connection_behind() {
        let (url, accepted, _) = server().await;
        let pool = Arc::new(Pool::default());
        drop(streaming(&pool, &url).await);
        let said = text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert!(said.starts_with("/mcp?x=1 "), "{said}");
        // The stream's connection was closed, not taken: the call had one of its own.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn host_is_the_host_and_a_port_other_than_80_never_credentials() {
        for (url, host) in [
            ("http://server.ns.svc:8080/mcp", "server.ns.svc:8080"),
            ("http://server/mcp", "server"),
            ("http://server:80/mcp", "server"),
            ("http://[::1]:9000/mcp", "[::1]:9000"),
            ("http://user:secret@server:8080/mcp", "server:8080"),
            ("http://server:/mcp", "server"),
        ] {
            let endpoint = at(&url.parse().unwrap());
            assert_eq!(endpoint.host, host, "{url}");
            assert_eq!(endpoint.origin, "/mcp", "{url}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_idle_too_long_are_closed_without_a_request_to_find_them() {
        let (url, accepted, _) = server().await;
        let pool = Arc::new(Pool::default());
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        let kept = || pool.kept.lock().unwrap().len();
        assert_eq!(kept(), 1, "kept once its answer was read");
        // Paused time: the reaper's sleep ends as soon as every task waits.
        tokio::time::sleep(IDLE * 2 + Duration::from_millis(1)).await;
        assert_eq!(kept(), 0);
        assert!(!pool.reaping.load(Ordering::Acquire), "the reaper stops");
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_streaming_longer_than_a_connection_is_kept_still_ends_whole() {
        let (url, accepted, release) = server().await;
        let pool = Arc::new(Pool::default());
        let mut body = streaming(&pool, &url).await;
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first ");
        // The reaper lets go of the busy connection: that must not cut its answer.
        tokio::time::sleep(IDLE * 2 + Duration::from_millis(1)).await;
        assert_eq!(pool.kept.lock().unwrap().len(), 0);
        release.notify_one();
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last, "last");
        assert!(body.frame().await.is_none(), "the answer ends");
        // Not kept, it was closed: the next call opens another.
        text(pool.send(&at(&url), get()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_opened_on_this_thread_is_taken_before_a_newer_one_from_another() {
        let (url, accepted, release) = server().await;
        let pool = Arc::new(Pool::default());
        // This thread's connection is kept first, busy with a streaming answer...
        let mut body = streaming(&pool, &url).await;
        // ...so another thread, with a runtime of its own, opens a second one (kept newest).
        let (other_pool, other_url) = (pool.clone(), url.clone());
        let (opened, parked) = tokio::sync::oneshot::channel();
        let other = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                text(other_pool.send(&at(&other_url), get()).await.unwrap()).await;
            });
            opened.send(std::thread::current().id()).unwrap();
            // Its runtime (and the connection's task) lives on until the test is done.
            std::thread::park();
        });
        // Awaited, not blocked on: the test server runs on this thread.
        let elsewhere = parked.await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        release.notify_one();
        while body.frame().await.is_some() {}
        all_ready(&pool).await;
        let authority = at(&url).authority().clone();
        let here = std::thread::current().id();
        let (_, thread) = pool
            .take(&authority)
            .expect("ready once its answer is read");
        assert_eq!(
            thread, here,
            "this thread's connection first, though not the newest"
        );
        // This runtime is pinned to its thread: the other thread's connection, used moments
        // ago, is left to it (a request here opens one of its own)...
        assert!(pool.take(&authority).is_none());
        assert_eq!(pool.kept.lock().unwrap()[0].thread, elsewhere);
        // ...until that thread has left it idle a while.
        idled(&pool, 0);
        let (_, thread) = pool.take(&authority).expect("idle long enough to take");
        assert_eq!(thread, elsewhere);
        other.thread().unpark();
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_is_an_error_that_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: Uri = format!("http://127.0.0.1:{port}/mcp").parse().unwrap();
        let err = Arc::new(Pool::default())
            .send(&at(&url), get())
            .await
            .expect_err("nothing listens");
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
