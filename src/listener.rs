//! The listener: accepts TCP connections, bounds how many are open (globally and per source
//! address) and how long they may sit idle, applies header and body deadlines, and routes paths:
//! the MCP endpoint, health probes and metrics.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::body::{Body, Carrier, response};
use crate::config::McpSettings;
use crate::gateway::Gateway;
use crate::mcp::{front, http_sse, jsonrpc};
use crate::serving::{Serving, Streams};
use crate::tls::{ClientCertificate, ListenerTls};

/// The MCP endpoint path.
pub const MCP_PATH: &str = "/mcp";

/// First and longest pause after a failed accept (EMFILE and the like): retrying at once would
/// spin and flood the log while descriptors are exhausted.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// How long an idle connection being closed may take to say goodbye (HTTP/2 GOAWAY).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long an HTTP/2 PING may go unanswered before the peer is taken for gone.
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keep-alive probes unanswered before the kernel drops the connection.
const KEEPALIVE_RETRIES: u32 = 3;
/// Most HTTP/2 streams a client may have open at once on one connection (beyond: the stream
/// is refused, REFUSED_STREAM). hyper's default is 200; 100 is the least RFC 9113 advises.
/// Each stream is a request in flight on the shared runtime, so one connection holds at most
/// what 100 HTTP/1 connections would.
const MAX_STREAMS: u32 = 100;
/// Most bytes of header fields an HTTP/2 request may carry (decoded, 32 bytes counted per
/// field): over it, 431; a header block that keeps growing past it (a CONTINUATION flood)
/// ends the connection (GOAWAY ENHANCE_YOUR_CALM). hyper's default, made explicit: HTTP/1
/// heads are bounded by the read buffer ([`MAX_HTTP1_BUFFER`]) and 100 fields, 431 beyond.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Most bytes hyper buffers of an HTTP/1 connection's input (its default is about 400 KiB):
/// room for a whole head and for body reads of a useful size.
const MAX_HTTP1_BUFFER: usize = 64 * 1024;
/// Most HTTP/2 streams a client may open and reset before the gateway has taken them up
/// (rapid reset): past it, GOAWAY ENHANCE_YOUR_CALM. The h2 crate's default, made explicit.
const MAX_PENDING_RESETS: usize = 20;

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

/// Binds the configured address and serves until stopped, over TLS when `tls` is given; each
/// connection on one of `serving`'s threads when given, else on the shared runtime.
pub async fn bind(
    gw: Arc<Gateway>,
    tls: Option<Arc<ListenerTls>>,
    serving: Option<Arc<Serving>>,
) -> std::io::Result<Listening> {
    let listener = TcpListener::bind(gw.config.listen).await?;
    let local_addr = listener.local_addr()?;
    let limits = Arc::new(Limits::new(&gw.config.mcp));
    let (stop, mut stopped) = watch::channel(false);
    let streams = Streams(tokio::runtime::Handle::current());
    let task = tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stopped.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(c) => c,
                // The peer gave up before we accepted: nothing is wrong with the listener.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::warn!(retry_in = ?backoff, "accept failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            };
            backoff = ACCEPT_BACKOFF.0;
            match limits.admit(peer.ip()) {
                // Dropping the stream closes it now: a refused connection holds no descriptor.
                Err(refused) => tracing::debug!(%peer, "connection refused: {refused}"),
                Ok(admitted) => match &serving {
                    Some(serving) => {
                        let (gw, tls, streams) = (gw.clone(), tls.clone(), streams.clone());
                        serving.spawn(stream, move |stream| {
                            accept(gw, tls, streams, stream, peer, admitted)
                        });
                    }
                    None => {
                        let (gw, tls, streams) = (gw.clone(), tls.clone(), streams.clone());
                        tokio::spawn(accept(gw, tls, streams, stream, peer, admitted));
                    }
                },
            }
        }
    });
    Ok(Listening {
        local_addr,
        stop,
        task,
    })
}

/// Takes a connection through the TLS handshake (within the header deadline: a peer that
/// never finishes one holds its slot no longer than a silent one), then serves it.
async fn accept(
    gw: Arc<Gateway>,
    tls: Option<Arc<ListenerTls>>,
    streams: Streams,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Admitted,
) {
    configure_socket(&stream, gw.config.mcp.keepalive_interval);
    let deadline = gw.config.mcp.header_timeout;
    let Some(tls) = tls else {
        return serve_connection(gw, streams, stream, peer, slot, deadline, None).await;
    };
    let accepted = std::time::Instant::now();
    let handshake = tls.acceptor().accept(stream);
    match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(stream)) => {
            let certificate = ClientCertificate(tls.principal_of(stream.get_ref().1));
            // The first request is due by the same deadline from accept, not a fresh one.
            let left = deadline.saturating_sub(accepted.elapsed());
            serve_connection(gw, streams, stream, peer, slot, left, Some(certificate)).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time"),
    }
}

/// Serves one connection until the peer leaves or it sits idle too long; its first request
/// must begin within `first`. Each request carries the connection's client certificate (when
/// the listener asks for them).
async fn serve_connection<S>(
    gw: Arc<Gateway>,
    streams: Streams,
    stream: S,
    peer: SocketAddr,
    _slot: Admitted,
    first: Duration,
    certificate: Option<ClientCertificate>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mcp = &gw.config.mcp;
    // HTTP/2 streams on the shared runtime (see `Streams`); HTTP/1 calls run in the
    // connection's own task.
    let mut builder = hyper_util::server::conn::auto::Builder::new(streams);
    // hyper's own header deadline armed, and dropped, a timer on every request (a clock read,
    // an allocation, a timer-wheel insert and removal); the idle watch below keeps the same
    // deadline lazily, looking only when a deadline it set passes.
    builder.http1().header_read_timeout(None);
    // An unfinished head is held until the header deadline: a connection holds no more than
    // this of it (hyper's default is about 400 KiB), and a longer head is refused (431).
    builder.http1().max_buf_size(MAX_HTTP1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(mcp.keepalive_interval))
        .keep_alive_timeout(PING_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        let gw = gw.clone();
        service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let in_flight = InFlight::start(&activity, req.version());
            let gw = gw.clone();
            if let Some(c) = &certificate {
                req.extensions_mut().insert(c.clone());
            }
            let http2 = req.version() == http::Version::HTTP_2;
            let activity = activity.clone();
            async move {
                let resp = route(gw, req).await;
                let in_flight = in_flight.follow(resp.body());
                let unsent = (http2 && matches!(resp.body(), Body::Full(Some(_))))
                    .then(|| activity.unsent_answer());
                Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                    _unsent: unsent,
                }))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // The first request must begin within the header deadline of accept, so a connection that
    // never sends a byte (or only the HTTP/2 preface) is not held any longer than a slow one.
    let deadlines = Deadlines {
        first,
        idle: mcp.idle_connection_timeout,
        header: mcp.header_timeout,
        unsent: mcp.stalled_stream_timeout,
    };
    let idle = idle_deadline(activity, deadlines);
    let ended = tokio::select! {
        // The connection first: a request head that came with the deadline is served.
        biased;
        r = conn.as_mut() => r,
        grace = idle => {
            tracing::debug!(%peer, "closing idle connection");
            // Idle between requests, hyper closes at once; still writing an answer to a slow
            // reader, it has the grace to finish.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(grace, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// TCP keep-alive finds peers that vanished without a FIN (a half-open connection would
/// otherwise hold its slot and descriptor until the idle deadline, or forever while streaming).
pub(crate) fn configure_socket(stream: &TcpStream, keepalive: Duration) {
    let _ = stream.set_nodelay(true);
    let probes = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!("cannot enable TCP keep-alive: {e}");
    }
}

/// Requests of one connection: how many are in flight, how many ever started, and when the
/// last one ended.
///
/// Plain atomics, so a request costs two increments and a clock read: the idle watch is never
/// woken by a request, it looks at these when a deadline it set passes.
struct Activity {
    in_flight: AtomicUsize,
    started: AtomicU64,
    /// Milliseconds from `since` to the end of the last request.
    last_end_ms: AtomicU64,
    /// Whether the connection speaks HTTP/2 (known from its first request): its streams have
    /// no header deadline between them.
    http2: AtomicBool,
    since: tokio::time::Instant,
    /// Set for an HTTP/1 connection whose answer was a stream ended for a reader that
    /// stopped: the answer will never be finished, so the connection can serve nothing more.
    reader_gone: AtomicBool,
    /// Wakes the idle watch when `reader_gone` is set (a register per poll costs a few
    /// instructions: the watch is polled whenever its connection's task is).
    watch: futures_util::task::AtomicWaker,
    /// HTTP/2 answers of one buffer made and not yet taken by hyper (it takes one only as the
    /// client's window lets it send): each with when it was made, so that a client granting no
    /// window cannot have finished answers held for as long as it keeps the connection busy.
    unsent: std::sync::Mutex<Vec<(u64, tokio::time::Instant)>>,
    /// The number the next unsent answer is known by.
    next_unsent: AtomicU64,
    /// Set when the first unsent answer comes: the watch looks again.
    recheck: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            since: tokio::time::Instant::now(),
            reader_gone: AtomicBool::new(false),
            watch: futures_util::task::AtomicWaker::new(),
            unsent: std::sync::Mutex::new(Vec::new()),
            next_unsent: AtomicU64::new(0),
            recheck: AtomicBool::new(false),
        })
    }

    /// Counts an HTTP/2 answer of one buffer as unsent until the returned mark is dropped.
    fn unsent_answer(self: &Arc<Self>) -> Unsent {
        let id = self.next_unsent.fetch_add(1, Ordering::Relaxed);
        let mut unsent = self.unsent.lock().unwrap_or_else(|e| e.into_inner());
        unsent.push((id, tokio::time::Instant::now()));
        if unsent.len() == 1 {
            self.recheck.store(true, Ordering::Release);
            self.watch.wake();
        }
        Unsent {
            activity: self.clone(),
            id,
        }
    }

    /// When the oldest unsent answer was made.
    fn oldest_unsent(&self) -> Option<tokio::time::Instant> {
        let unsent = self.unsent.lock().unwrap_or_else(|e| e.into_inner());
        unsent.iter().map(|(_, at)| *at).min()
    }

    fn request_ended(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_end_ms.fetch_max(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/2 answer of one buffer not yet taken by hyper (see [`Activity::unsent`]).
struct Unsent {
    activity: Arc<Activity>,
    id: u64,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        let mut unsent = self
            .activity
            .unsent
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = unsent.iter().position(|(id, _)| *id == self.id) {
            unsent.swap_remove(i);
        }
    }
}

/// One request in flight: counted from its start until its answer is whole (a body of one
/// buffer is, when made: what is left is the connection's writing, as over HTTP/1, where
/// hyper takes such a body at once), or for a stream until hyper drops its body, so a long
/// SSE stream keeps its connection busy; or until a watched stream is ended for a reader that
/// stopped (hyper, which polls a body only when it can write, may never drop it).
struct InFlight(Mark);

enum Mark {
    /// Given back when dropped.
    Request(Arc<Activity>),
    /// A watched stream's, shared with its [`Uptake`](crate::body::Uptake).
    Stream(Arc<StreamMark>),
}

impl InFlight {
    fn start(activity: &Arc<Activity>, version: http::Version) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        if activity.started.fetch_add(1, Ordering::AcqRel) == 0 {
            activity
                .http2
                .store(version == http::Version::HTTP_2, Ordering::Relaxed);
        }
        InFlight(Mark::Request(activity.clone()))
    }

    /// The mark the answer `body` holds: none once it is whole; shared with the watch on its
    /// reader for a long-lived stream (only these pay an allocation); else this one.
    fn follow(mut self, body: &Body) -> Option<InFlight> {
        let uptake = match body {
            Body::Empty | Body::Full(_) => return None,
            Body::Sse { uptake, .. } => uptake.as_ref(),
            Body::Events { uptake, .. } => uptake.as_ref(),
        };
        if let (Some(uptake), Mark::Request(activity)) = (uptake, &self.0) {
            let mark = Arc::new(StreamMark {
                activity: activity.clone(),
                held: AtomicBool::new(true),
            });
            self.0 = Mark::Stream(mark.clone());
            uptake.carried_by(mark);
        }
        Some(self)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        match &self.0 {
            Mark::Request(a) => a.request_ended(),
            Mark::Stream(m) => {
                m.release();
            }
        }
    }
}

/// A watched stream's request mark, given back once: when hyper drops the stream's body or
/// when the stream is ended for a reader that stopped, whichever comes first.
struct StreamMark {
    activity: Arc<Activity>,
    held: AtomicBool,
}

impl StreamMark {
    /// Gives the mark back unless it was: whether this call did.
    fn release(&self) -> bool {
        let held = self.held.swap(false, Ordering::AcqRel);
        if held {
            self.activity.request_ended();
        }
        held
    }
}

impl Carrier for StreamMark {
    /// The stream no longer counts as in flight. An HTTP/1 connection is closed now: its
    /// answer will never end, so it can serve nothing more (a reader that comes back within
    /// the closing grace sees the stream end). An HTTP/2 connection may be serving other
    /// streams: the idle watch closes it once none is in flight for the idle deadline (the
    /// stalled stream is dropped with it).
    fn reader_gone(&self) {
        if self.release() && !self.activity.http2.load(Ordering::Relaxed) {
            self.activity.reader_gone.store(true, Ordering::Release);
            self.activity.watch.wake();
        }
    }
}

/// How long a connection may go without a request in flight.
#[derive(Clone, Copy)]
struct Deadlines {
    /// From accept to the first request (what is left of the header deadline).
    first: Duration,
    /// After the last request ended.
    idle: Duration,
    /// An HTTP/1 connection's next request head is due this long after the last request
    /// ended (the header deadline hyper would keep, shorter than `idle` by default).
    header: Duration,
    /// How long an HTTP/2 answer of one buffer may wait for the client's window before the
    /// connection is closed (`mcp.stalled_stream_timeout`, as for a stream's reader).
    unsent: Duration,
}

impl Deadlines {
    /// How long a connection found idle may take to close. A request's end is when its answer
    /// is whole or hyper drops its body (see [`InFlight`]), which may be before the answer's
    /// last bytes are written to a slow reader: over HTTP/1, where the header deadline cut the idle one short, the writing
    /// has the rest of the idle deadline to finish (what it had before hyper's header timer
    /// was replaced).
    fn grace(&self, a: &Activity) -> Duration {
        if a.started.load(Ordering::Acquire) > 0 && !a.http2.load(Ordering::Relaxed) {
            SHUTDOWN_GRACE.max(self.idle.saturating_sub(self.header))
        } else {
            SHUTDOWN_GRACE
        }
    }

    /// When the idle watch is to look again at `now`, or `None` if the connection is idle past
    /// its deadline.
    fn next_look(&self, a: &Activity, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let later = if a.http2.load(Ordering::Relaxed) {
            self.idle
        } else {
            self.idle.min(self.header)
        };
        // An answer the client has left unread that long: it reads nothing, busy or not.
        let unsent_due = a.oldest_unsent().map(|at| at + self.unsent);
        if unsent_due.is_some_and(|due| due <= now) {
            return None;
        }
        if a.in_flight.load(Ordering::Acquire) > 0 {
            // Busy: looked at again a deadline from now, never woken per request.
            return Some(unsent_due.map_or(now + later, |due| due.min(now + later)));
        }
        let due = match a.started.load(Ordering::Acquire) {
            0 => a.since + self.first,
            _ => a.since + Duration::from_millis(a.last_end_ms.load(Ordering::Relaxed)) + later,
        };
        let due = unsent_due.map_or(due, |unsent| unsent.min(due));
        (due > now).then_some(due)
    }
}

/// Resolves once the connection has had no request in flight for its deadline: `first` while
/// no request has started yet (counted from accept), then `idle` (and for HTTP/1 `header`)
/// after the last request ended; to how long its closing may take. One timer per connection,
/// reset only when it fires: a request that comes and goes in the meantime moves the deadline
/// without waking anything. An HTTP/1 connection whose answer was a stream ended for a reader
/// that stopped resolves it at once.
async fn idle_deadline(activity: Arc<Activity>, deadlines: Deadlines) -> Duration {
    let first_look = deadlines.first.min(deadlines.idle).min(deadlines.header);
    let sleep = tokio::time::sleep_until(activity.since + first_look);
    tokio::pin!(sleep);
    loop {
        let reader_gone = std::future::poll_fn(|cx| {
            activity.watch.register(cx.waker());
            if activity.reader_gone.load(Ordering::Acquire) {
                return Poll::Ready(true);
            }
            // An unsent answer's deadline may come before the one slept to.
            if activity.recheck.swap(false, Ordering::AcqRel) {
                return Poll::Ready(false);
            }
            sleep.as_mut().poll(cx).map(|()| false)
        });
        if reader_gone.await {
            return SHUTDOWN_GRACE;
        }
        match deadlines.next_look(&activity, tokio::time::Instant::now()) {
            Some(at) => sleep.as_mut().reset(at),
            None => return deadlines.grace(&activity),
        }
    }
}

/// A response body that holds its request's [`InFlight`] mark (if its answer is not whole yet)
/// until hyper is done with it.
struct Tracked {
    body: Body,
    _in_flight: Option<InFlight>,
    /// An HTTP/2 answer of one buffer, until hyper takes it.
    _unsent: Option<Unsent>,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Why a new connection was refused (it is closed at once).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The global cap is reached.
    #[error("{0} connections open (mcp.max_connections)")]
    Global(usize),
    /// The source address has its share.
    #[error("{count} connections open from {} (mcp.max_connections_per_ip)", source_name(*ip))]
    PerIp {
        /// The source: an IPv4 address, or an IPv6 /64 (its first address).
        ip: IpAddr,
        /// Its open connections.
        count: usize,
    },
}

/// Open connections, counted against the global and per-address caps.
struct Limits {
    max: usize,
    per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// The source a connection counts against: an IPv4 peer on a dual-stack socket is one
/// address however it is spelled; an IPv6 peer is its /64, which one host usually holds
/// whole (counting single addresses would give it 2^64 shares of the cap).
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

fn source_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("{v6}/64"),
        v4 => v4.to_string(),
    }
}

/// A connection's place under the caps, given back when dropped.
struct Admitted {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    fn new(mcp: &McpSettings) -> Limits {
        let max = match descriptor_budget() {
            Some(budget) if budget < mcp.max_connections => {
                tracing::warn!(
                    configured = mcp.max_connections,
                    budget,
                    "mcp.max_connections exceeds what the open-file limit leaves for connections; capping it"
                );
                budget
            }
            _ => mcp.max_connections,
        };
        Limits {
            max,
            per_ip: mcp.max_connections_per_ip.min(max),
            open: Mutex::new(Open::default()),
        }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let ip = source(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max {
            return Err(Refused::Global(open.total));
        }
        let count = open.by_ip.entry(ip).or_default();
        if *count >= self.per_ip {
            return Err(Refused::PerIp { ip, count: *count });
        }
        *count += 1;
        open.total += 1;
        Ok(Admitted {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Connections the open-file limit can hold while leaving a quarter (at least 32) of the
/// descriptors for upstream pipes, sockets and files; `None` when the limit is unknown.
fn descriptor_budget() -> Option<usize> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    Some(soft.saturating_sub((soft / 4).max(32)).max(1))
}

async fn route(gw: Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    // Two Host headers, or a target naming another host than Host, are refused on every path.
    // `/mcp` is refused by `front::serve`, whose checks begin with this one (not made twice),
    // after the loop check below.
    let checked_by_front = req.uri().path() == MCP_PATH;
    let refused = (!checked_by_front)
        .then(|| front::request_authority(&req).err())
        .flatten();
    let resp = match refused {
        Some(refused) => refused.into_response(None),
        None => dispatch(&gw, req).await,
    };
    gw.metrics.http_response(resp.status().as_u16());
    resp
}

/// Marks a response of the console's origin as the type it says it is: the admin API and the
/// registry echo what they were sent (in errors, in entries), and a browser that guessed a
/// type could run it on the console's origin.
fn nosniff(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn dispatch(gw: &Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if crate::upstream::via::came_from(req.headers(), &gw.via) {
        return text(
            StatusCode::LOOP_DETECTED,
            "this request came from this gateway: a remote server's URL leads back to it\n",
        );
    }
    match req.uri().path() {
        MCP_PATH => crate::boxed::in_place(|| front::serve(gw.clone(), req, None)).await,
        path if path.starts_with(PROFILE_PREFIX) => {
            let rest = &path[PROFILE_PREFIX.len()..];
            // `/mcp/{profile}/v0.1/servers…`: the registry as that profile's callers see it.
            let (name, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match gw.profile(name) {
                Some(profile) if crate::registry::api::is_registry_path(tail) => {
                    let profile = profile.clone();
                    nosniff(Box::pin(registry(gw, &req, Some(&profile), tail)).await)
                }
                Some(profile) if tail.is_empty() => {
                    let profile = profile.clone();
                    crate::boxed::in_place(|| front::serve(gw.clone(), req, Some(&profile))).await
                }
                _ => not_found(path),
            }
        }
        // The other paths' futures are boxed: hyper moves the whole request future (the
        // largest of its branches) on every request, and the admin API's is many KiB.
        http_sse::SSE_PATH if gw.config.mcp.http_sse => {
            Box::pin(http_sse::serve_stream(gw.clone(), req)).await
        }
        http_sse::MESSAGES_PATH if gw.config.mcp.http_sse => {
            Box::pin(http_sse::serve_message(gw.clone(), req)).await
        }
        path if path.starts_with(crate::admin::PREFIX) => {
            nosniff(match operator_refusal(gw, &req) {
                None => Box::pin(crate::admin::serve(gw.clone(), req)).await,
                Some(refused) => refused,
            })
        }
        path if crate::registry::api::is_registry_path(path) => {
            nosniff(Box::pin(registry(gw, &req, None, path)).await)
        }
        // The console is a client of the admin API: where that is off, there is none.
        path if (path == crate::console::PREFIX || path.starts_with("/ui/"))
            && !gw.config.admin_tokens.is_empty() =>
        {
            match operator_refusal(gw, &req) {
                None => crate::console::serve(req.method(), path),
                Some(refused) => refused,
            }
        }
        path if path.starts_with(WELL_KNOWN_RESOURCE) => resource_metadata(gw, &req),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        // On loopback, a page whose name was rebound to 127.0.0.1 could read what the metrics
        // name (servers, plugins, counts): its Host is checked as `/mcp`'s is. Off loopback a
        // scraper names the pod's address, which `mcp.allowed_hosts` need not list: it shows
        // an admin token granting `metrics:read` instead (unless the operator made them public).
        "/metrics"
            if gw.config.listen.ip().is_loopback()
                && let Some(refused) = operator_refusal(gw, &req) =>
        {
            refused
        }
        "/metrics"
            if !gw.config.listen.ip().is_loopback()
                && !gw.config.public_metrics
                && let Some(refused) = Box::pin(metrics_refusal(gw, &req)).await =>
        {
            refused
        }
        "/metrics" => {
            // Other replicas' approvals reach the pins without passing through a listing.
            if let Some(pins) = &gw.pins {
                gw.metrics.tools_unapproved.set(pins.unapproved() as i64);
            }
            for server in gw.topology().servers.iter() {
                if let Some(u) = server
                    .orchestrated
                    .as_ref()
                    .and_then(|o| o.runtime.usage(&server.name))
                {
                    gw.metrics
                        .set_sleep(server.label, u.is_stopped(), u.time_asleep(), u.wakes());
                }
            }
            let mut r = text(StatusCode::OK, gw.metrics.render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        path => not_found(path),
    }
}

/// Refuses a `/metrics` request off loopback that shows no admin token granting
/// `metrics:read`: what the metrics name (every server and plugin, the pins' state) is for
/// operators, not for anyone who can reach the port.
async fn metrics_refusal(
    gw: &Gateway,
    req: &Request<hyper::body::Incoming>,
) -> Option<Response<Body>> {
    let refused = |status: StatusCode, why: &str| {
        let mut r = text(status, format!("{why}\n"));
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        Some(r)
    };
    if gw.config.admin_tokens.is_empty() {
        return refused(
            StatusCode::NOT_FOUND,
            "off loopback, /metrics is served to admin tokens granting metrics:read (admin.tokens), or to anyone with admin.public_metrics: true",
        );
    }
    match gw.admin_auth.authenticate(req.headers(), None, None).await {
        Ok(Some(identity)) if identity.grant.lacking(["metrics:read"]).is_empty() => None,
        Ok(Some(_)) => refused(
            StatusCode::FORBIDDEN,
            "this admin token does not grant metrics:read",
        ),
        _ => refused(
            StatusCode::UNAUTHORIZED,
            "/metrics needs an admin token granting metrics:read",
        ),
    }
}

/// Refuses an admin or console request whose `Host` this gateway does not answer to (DNS
/// rebinding), or that comes from another site's page. The console's own requests are
/// same-origin (their `Origin` names the `Host` they are sent to).
fn operator_refusal(gw: &Gateway, req: &Request<hyper::body::Incoming>) -> Option<Response<Body>> {
    // A single, well-formed authority: `route` has checked it.
    let authority = front::request_authority(req).ok().flatten();
    let same_origin = req
        .headers()
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .and_then(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
        })
        .is_some_and(|o| Some(o) == authority);
    let no_headers = http::HeaderMap::new();
    let headers = if same_origin {
        &no_headers
    } else {
        req.headers()
    };
    let e = front::check_host_and_origin(&gw.config, authority, headers).err()?;
    let mut r = response(Body::full(
        serde_json::json!({ "error": e.to_string() }).to_string(),
    ));
    *r.status_mut() = e.status();
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Some(r)
}

/// Where profile endpoints are: `/mcp/{profile}`.
const PROFILE_PREFIX: &str = "/mcp/";

fn not_found(path: &str) -> Response<Body> {
    let mut r = response(Body::full(jsonrpc::error_response(
        None,
        -32000,
        &format!(
            "no such endpoint: {path}; the MCP endpoint is {MCP_PATH} (and {PROFILE_PREFIX}{{profile}} for each profile)"
        ),
    )));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Where RFC 9728 protected-resource metadata lives (with the resource's path appended).
const WELL_KNOWN_RESOURCE: &str = "/.well-known/oauth-protected-resource";

/// The protected-resource metadata document: public (clients read it before they hold a
/// token), readable from any origin (browser-based clients discover with it).
fn resource_metadata(gw: &Gateway, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let Some(doc) = gw.auth.metadata(req.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "no protected-resource metadata here\n",
        );
    };
    let mut r = match *req.method() {
        http::Method::GET | http::Method::HEAD => response(Body::full(doc)),
        http::Method::OPTIONS => text(StatusCode::NO_CONTENT, ""),
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            r.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            return r;
        }
    };
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    // Clients send MCP-Protocol-Version on this GET too: a browser asks first (preflight).
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

/// The registry's read API (at `path`), to the callers `/mcp` admits (anyone, when
/// authentication is off); under a profile, to those it grants, filtered as that profile's.
async fn registry(
    gw: &Arc<Gateway>,
    req: &Request<hyper::body::Incoming>,
    profile: Option<&crate::config::profiles::ProfileConfig>,
    path: &str,
) -> Response<Body> {
    use crate::registry::api;
    let Some(catalog) = gw.registry.get() else {
        return not_found(req.uri().path());
    };
    // A preflight carries no credentials (and gets no data).
    let mut identity = None;
    if req.method() != http::Method::OPTIONS {
        match front::admit_reader(gw, req, profile).await {
            Ok(who) => identity = who,
            Err((status, message, challenge)) => {
                let mut r = api::error(status, &message);
                if let Some(c) = challenge {
                    r.headers_mut().insert(http::header::WWW_AUTHENTICATE, c);
                }
                return r;
            }
        }
    }
    let caller = crate::registry::visibility::Caller {
        principal: identity.as_ref().map(|i| &*i.principal),
        groups: identity.as_ref().map_or(&[], |i| &i.claims.groups),
        scopes: identity.as_ref().map_or(&[], |i| &i.claims.scopes),
        profile: profile.map(|p| p.name.as_str()),
    };
    // A preflight shows no entry: no filter to run.
    let visible = if req.method() == http::Method::OPTIONS {
        crate::registry::visibility::Visible::Only(Default::default())
    } else {
        match crate::registry::visibility::visible(&gw.plugins, catalog, caller).await {
            Ok(visible) => visible,
            Err(denied) => {
                // The plugin's fault is the operator's to read, not the caller's.
                tracing::warn!("registry filter failed, nothing shown: {denied}");
                return api::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the registry's filter failed, so nothing is shown",
                );
            }
        }
    };
    // Any origin may read with a credential; without authentication, only the page's own
    // origin (a browser then hides the answer from other sites).
    let anyone = !gw.auth.is_off();
    api::serve(
        catalog,
        req.method(),
        path,
        req.uri().query(),
        anyone,
        visible,
    )
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = response(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F: std::future::Future>(
        _: fn(Arc<Gateway>, Request<hyper::body::Incoming>) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper moves each request's future once, whole: the MCP path's many KiB are built in
    /// their own box (`in_place`), and a branch that is not boxed makes every call pay for its
    /// size (it was 14 KiB; each KiB costs about 1 k instructions a call under callgrind, where
    /// `rep movsb` counts per byte).
    #[test]
    fn the_request_future_stays_small() {
        let size = future_size(route);
        eprintln!("request future: {size} bytes");
        assert!(size <= 2 * 1024, "the request future grew to {size} bytes");
    }

    const FIRST: Duration = Duration::from_secs(10);
    const LATER: Duration = Duration::from_secs(1);
    /// No shorter header deadline: the idle one decides.
    const DEADLINES: Deadlines = Deadlines {
        first: FIRST,
        idle: LATER,
        header: Duration::from_secs(3600),
        unsent: Duration::from_secs(3600),
    };
    const H1: http::Version = http::Version::HTTP_11;

    async fn resolves_after(activity: Arc<Activity>) -> Duration {
        let start = tokio::time::Instant::now();
        idle_deadline(activity, DEADLINES).await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_no_request_gets_the_first_deadline() {
        assert_eq!(resolves_after(Activity::new()).await, FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_served_before_the_first_look_switches_to_the_idle_deadline() {
        let activity = Activity::new();
        drop(InFlight::start(&activity, H1));
        assert_eq!(resolves_after(activity).await, LATER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle() {
        let activity = Activity::new();
        let request = InFlight::start(&activity, H1);
        let idle = tokio::spawn(resolves_after(activity.clone()));
        tokio::time::sleep(FIRST * 3).await;
        assert!(!idle.is_finished());
        drop(request);
        assert_eq!(idle.await.unwrap(), FIRST * 3 + LATER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_switches_a_long_header_deadline_to_the_short_idle_one() {
        let activity = Activity::new();
        let start = tokio::time::Instant::now();
        let deadlines = Deadlines {
            first: LATER * 30,
            ..DEADLINES
        };
        let idle = tokio::spawn(idle_deadline(activity.clone(), deadlines));
        tokio::time::sleep(LATER / 2).await;
        drop(InFlight::start(&activity, H1));
        idle.await.unwrap();
        assert_eq!(start.elapsed(), LATER / 2 + LATER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_idle_wait_restarts_it_from_its_end() {
        let activity = Activity::new();
        drop(InFlight::start(&activity, H1));
        let idle = tokio::spawn(resolves_after(activity.clone()));
        // Half-way through the idle deadline, a request comes and lasts a while.
        tokio::time::sleep(LATER / 2).await;
        let request = InFlight::start(&activity, H1);
        tokio::time::sleep(LATER * 2).await;
        assert!(!idle.is_finished(), "idle while a request was in flight");
        drop(request);
        assert_eq!(idle.await.unwrap(), LATER / 2 + LATER * 2 + LATER);
    }

    /// Many requests coming and going between two looks move the deadline to the last one's end.
    #[tokio::test(start_paused = true)]
    async fn requests_between_looks_move_the_deadline_to_the_last_end() {
        let activity = Activity::new();
        let start = tokio::time::Instant::now();
        let idle = tokio::spawn(resolves_after(activity.clone()));
        for _ in 0..25 {
            tokio::time::sleep(LATER / 10).await;
            drop(InFlight::start(&activity, H1));
        }
        idle.await.unwrap();
        assert_eq!(start.elapsed(), LATER * 5 / 2 + LATER);
    }

    /// hyper's header deadline, kept by the watch: an HTTP/1 connection's next request is due
    /// `header` after the last one ended when that is shorter than `idle`; HTTP/2 streams have
    /// no header deadline between them.
    /// An HTTP/1 connection closed at the header deadline may still be writing its last
    /// answer: it has the rest of the idle deadline to finish; otherwise the usual grace.
    #[test]
    fn a_connection_closed_at_the_header_deadline_has_the_rest_of_the_idle_one_to_finish() {
        let deadlines = Deadlines {
            first: FIRST,
            idle: LATER * 60,
            header: LATER * 10,
            unsent: LATER * 600,
        };
        let served = |version| {
            let activity = Activity::new();
            drop(InFlight::start(&activity, version));
            deadlines.grace(&activity)
        };
        assert_eq!(served(http::Version::HTTP_11), LATER * 50);
        assert_eq!(served(http::Version::HTTP_2), SHUTDOWN_GRACE);
        assert_eq!(
            deadlines.grace(&Activity::new()),
            SHUTDOWN_GRACE,
            "no request yet"
        );
        let longer_header = Deadlines {
            header: LATER * 120,
            ..deadlines
        };
        let activity = Activity::new();
        drop(InFlight::start(&activity, http::Version::HTTP_11));
        assert_eq!(longer_header.grace(&activity), SHUTDOWN_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn http1_keeps_the_header_deadline_between_requests_and_http2_the_idle_one() {
        let deadlines = Deadlines {
            first: FIRST,
            idle: LATER * 60,
            header: LATER * 10,
            unsent: LATER * 600,
        };
        for (version, after) in [
            (http::Version::HTTP_11, LATER * 10),
            (http::Version::HTTP_2, LATER * 60),
        ] {
            let activity = Activity::new();
            let start = tokio::time::Instant::now();
            drop(InFlight::start(&activity, version));
            idle_deadline(activity, deadlines).await;
            assert_eq!(start.elapsed(), after, "{version:?}");
        }
    }

    /// A watched stream's answer with its request's mark, as the service hands it to hyper.
    fn watched_answer(
        activity: &Arc<Activity>,
        version: http::Version,
    ) -> (Tracked, Arc<crate::body::Uptake>) {
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let (resp, uptake) = crate::body::watched_sse_response(None, rx);
        let in_flight = InFlight::start(activity, version).follow(resp.body());
        assert!(in_flight.is_some());
        let tracked = Tracked {
            body: resp.into_body(),
            _in_flight: in_flight,
            _unsent: None,
        };
        (tracked, uptake)
    }

    fn in_flight(a: &Activity) -> usize {
        a.in_flight.load(Ordering::SeqCst)
    }

    /// An answer of one buffer is whole when made: its request is no longer in flight, though
    /// the connection (a client that grants no HTTP/2 window) may never write it. A stream's
    /// request stays in flight while hyper holds its body.
    #[test]
    fn a_whole_answer_ends_its_request_and_a_stream_holds_it() {
        let activity = Activity::new();
        let full = InFlight::start(&activity, H1).follow(&Body::full("ok"));
        assert!(full.is_none());
        assert_eq!(in_flight(&activity), 0);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let stream = InFlight::start(&activity, H1).follow(&Body::Events {
            events: rx,
            uptake: None,
            room: None,
        });
        assert_eq!(in_flight(&activity), 1);
        drop(stream);
        assert_eq!(in_flight(&activity), 0);
    }

    /// A watched stream ended for its reader gives its request's mark back once, whether
    /// hyper drops the body before or after; and closes an HTTP/1 connection at once (with the
    /// usual grace), while an HTTP/2 one is closed only once idle for its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_stream_ended_for_its_reader_lets_go_of_its_connection() {
        for version in [H1, http::Version::HTTP_2] {
            let activity = Activity::new();
            let (tracked, uptake) = watched_answer(&activity, version);
            let start = tokio::time::Instant::now();
            let idle = tokio::spawn(idle_deadline(activity.clone(), DEADLINES));
            tokio::time::sleep(FIRST * 3).await;
            assert!(!idle.is_finished(), "{version:?}: the stream is in flight");
            uptake.end();
            assert_eq!(in_flight(&activity), 0, "{version:?}");
            drop(tracked);
            assert_eq!(in_flight(&activity), 0, "{version:?}: given back once");
            assert_eq!(idle.await.unwrap(), SHUTDOWN_GRACE, "{version:?}");
            let closing = start.elapsed();
            if version == H1 {
                assert_eq!(closing, FIRST * 3, "HTTP/1: closed at once");
            } else {
                assert!(closing > FIRST * 3 + LATER / 2, "HTTP/2: {closing:?}");
                assert!(closing <= FIRST * 3 + LATER * 2, "HTTP/2: {closing:?}");
            }
        }
    }

    /// A stream whose body hyper dropped first (it ended, or its client left) gives its mark
    /// back then; ending it afterwards changes nothing, and does not close the connection,
    /// which may be serving the next request.
    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ended_first_leaves_its_connection_alone() {
        let activity = Activity::new();
        let (tracked, uptake) = watched_answer(&activity, H1);
        drop(tracked);
        let next = InFlight::start(&activity, H1);
        uptake.end();
        assert_eq!(in_flight(&activity), 1, "the next request is still counted");
        let idle = tokio::spawn(idle_deadline(activity.clone(), DEADLINES));
        tokio::time::sleep(FIRST * 3).await;
        assert!(!idle.is_finished(), "the next request's connection is kept");
        drop(next);
        idle.await.unwrap();
    }

    #[test]
    fn caps_per_address_and_overall() {
        let limits = Arc::new(Limits {
            max: 3,
            per_ip: 2,
            open: Mutex::new(Open::default()),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert!(matches!(
            limits.admit(a),
            Err(Refused::PerIp { count: 2, .. })
        ));
        let _b1 = limits.admit(b).unwrap();
        assert!(matches!(limits.admit(b), Err(Refused::Global(3))));
        drop(a1);
        // The mapped IPv6 spelling is the same peer as plain IPv4.
        let _b2 = limits.admit("10.0.0.2".parse().unwrap()).unwrap();
        assert!(limits.admit(b).is_err());
    }

    #[test]
    fn an_ipv6_peer_counts_as_its_slash_64() {
        let limits = Arc::new(Limits {
            max: 10,
            per_ip: 2,
            open: Mutex::new(Open::default()),
        });
        let _a = limits.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _b = limits
            .admit("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        let Err(err) = limits.admit("2001:db8:1:2:dead:beef:0:1".parse().unwrap()) else {
            panic!("a third connection from the same /64 is refused");
        };
        assert_eq!(
            err.to_string(),
            "2 connections open from 2001:db8:1:2::/64 (mcp.max_connections_per_ip)"
        );
        // The next /64 is another source.
        let _c = limits.admit("2001:db8:1:3::1".parse().unwrap()).unwrap();
    }
}
