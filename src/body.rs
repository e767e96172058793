//! Response bodies the gateway sends: a whole buffer, nothing, or an SSE stream fed by a channel.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{Notify, mpsc};

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::sse;

/// A response body.
#[derive(Debug)]
pub enum Body {
    /// No bytes.
    Empty,
    /// One buffer.
    Full(Option<Bytes>),
    /// Server-Sent Events: `prelude` (whole events) first, then each JSON-RPC frame from the
    /// channel as one `message` event; an empty frame becomes a keep-alive comment. Ends when
    /// every sender is gone (or, watched, once its stream is ended for a stalled reader).
    Sse {
        /// Events sent before any frame (the HTTP+SSE `endpoint` event).
        prelude: Option<Bytes>,
        /// The frames.
        frames: mpsc::Receiver<Bytes>,
        /// The watch on a long-lived stream's reader.
        uptake: Option<Arc<Uptake>>,
        /// Where its events count while the connection holds them.
        room: Option<Arc<dyn ChunkRoom>>,
    },
    /// Server-Sent Events already encoded (numbered, for resumption).
    Events {
        /// The events.
        events: mpsc::Receiver<Bytes>,
        /// The watch on the stream's reader.
        uptake: Option<Arc<Uptake>>,
        /// Where its events count while the connection holds them.
        room: Option<Arc<dyn ChunkRoom>>,
    },
}

/// Where a stream's events count while the connection holds them (hyper keeps an event until
/// its last byte is written: a client that reads nothing leaves it with the gateway). `Err`
/// gives an event back when there is no room for it, and the stream ends before it.
pub trait ChunkRoom: Send + Sync + std::fmt::Debug {
    /// `event`, counted until every copy of it is gone, or given back.
    fn admit(&self, event: Bytes) -> Result<Bytes, Bytes>;
}

/// `response`, its stream's events counted in `room` (a body of one buffer is left as it is).
pub fn with_room(mut response: Response<Body>, room: Arc<dyn ChunkRoom>) -> Response<Body> {
    if let Body::Sse { room: r, .. } | Body::Events { room: r, .. } = response.body_mut() {
        *r = Some(room);
    }
    response
}

/// `polled`, its event counted in `room`: past the room the stream ends there.
fn counted(polled: Poll<Option<Bytes>>, room: &Option<Arc<dyn ChunkRoom>>) -> Poll<Option<Bytes>> {
    match (polled, room) {
        (Poll::Ready(Some(event)), Some(room)) => Poll::Ready(room.admit(event).ok()),
        (polled, _) => polled,
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // The connection let go of the stream (written whole, or the client left): whoever
        // watches its reader stops.
        if let Body::Sse {
            uptake: Some(u), ..
        }
        | Body::Events {
            uptake: Some(u), ..
        } = self
        {
            u.body_gone();
        }
    }
}

impl Body {
    /// A body of one buffer.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Sse {
                prelude,
                frames,
                uptake,
                room,
            } => {
                if uptake.as_ref().is_some_and(|u| u.is_ended()) {
                    return Poll::Ready(None);
                }
                let polled = match prelude.take() {
                    Some(p) => Poll::Ready(Some(p)),
                    None => frames.poll_recv(cx).map(|o| {
                        o.map(|frame| {
                            if frame.is_empty() {
                                Bytes::from_static(sse::KEEPALIVE)
                            } else {
                                sse::encode_message(&frame)
                            }
                        })
                    }),
                };
                let polled = counted(polled, room);
                if let Some(u) = uptake {
                    u.saw(&polled);
                }
                polled.map(|o| o.map(|event| Ok(Frame::data(event))))
            }
            Body::Events {
                events,
                uptake,
                room,
            } => {
                if uptake.as_ref().is_some_and(|u| u.is_ended()) {
                    return Poll::Ready(None);
                }
                let polled = counted(events.poll_recv(cx), room);
                if let Some(u) = uptake {
                    u.saw(&polled);
                }
                polled.map(|o| o.map(|e| Ok(Frame::data(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Sse { .. } | Body::Events { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Sse { .. } | Body::Events { .. } => SizeHint::default(),
        }
    }
}

/// Room in a response's header map for the headers of the connection's next request: hyper
/// parses that request into the map this response leaves behind, and a map too small for it
/// is allocated again (about 1.9 k instructions when an `Authorization` header made a
/// request's seventh). 16 leaves room for 24 headers.
const NEXT_REQUEST_HEADERS: usize = 16;

/// A 200 response with `body` and a header map with room for the next request's headers.
pub(crate) fn response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.headers_mut() = http::HeaderMap::with_capacity(NEXT_REQUEST_HEADERS);
    r
}

/// A JSON response with `status`.
pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = response(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// How long a stream's feeder waits for its reader to take a message: past it the reader is
/// taken for gone, and what feeds it (a call, cancelled upstream when it is dropped) stops
/// rather than wait on it for good, holding the call and its request.
pub(crate) const STALLED_READER: std::time::Duration = std::time::Duration::from_secs(30);

/// How a frame offered to a watched stream fared ([`feed`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fed {
    /// Queued for the reader.
    Sent,
    /// The reader is gone (its connection dropped the stream).
    ReaderGone,
    /// The reader took nothing for the stall timeout while frames waited: the stream is ended
    /// and its connection let go.
    Stalled,
}

/// Queues `frame` on a watched stream (`tx` feeding the body that `uptake` watches): at once
/// when there is room, else once the reader takes something, unless it takes nothing for
/// `within` ([`Fed::Stalled`]: the stream is then ended, [`Uptake::end`]). The queue being
/// full, a frame taken frees a place: a send that waits `within` is a reader that took
/// nothing for as long while frames waited.
pub(crate) async fn feed(
    tx: &mpsc::Sender<Bytes>,
    uptake: &Uptake,
    within: Duration,
    frame: Bytes,
) -> Fed {
    // Room in the queue, as a reading client leaves it: no timer.
    let frame = match tx.try_send(frame) {
        Ok(()) => return Fed::Sent,
        Err(mpsc::error::TrySendError::Closed(_)) => return Fed::ReaderGone,
        Err(mpsc::error::TrySendError::Full(frame)) => frame,
    };
    match tokio::time::timeout(within, tx.send(frame)).await {
        Ok(Ok(())) => Fed::Sent,
        Ok(Err(_)) => Fed::ReaderGone,
        Err(_) => {
            uptake.end();
            Fed::Stalled
        }
    }
}

/// Sends `frame` to a stream's reader unless it is gone or takes nothing for
/// [`STALLED_READER`]: `false` then.
pub(crate) async fn send_to_reader(tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STALLED_READER, tx.send(frame)).await,
        Ok(Ok(()))
    )
}

/// An SSE response fed by `rx`.
pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    sse(None, rx, None)
}

/// The SSE response of a watched stream (a session's GET stream, a listen stream, an HTTP+SSE
/// client's stream, a call's streamed answer): the events of `prelude` first, then what `rx`
/// is fed; and the watch on its reader, for the task that feeds it ([`Uptake::stalled`],
/// [`feed`], [`Uptake::delivered`]).
pub(crate) fn watched_sse_response(
    prelude: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
) -> (Response<Body>, Arc<Uptake>) {
    let uptake = Arc::new(Uptake::default());
    (sse(prelude, rx, Some(uptake.clone())), uptake)
}

fn sse(
    prelude: Option<Bytes>,
    frames: mpsc::Receiver<Bytes>,
    uptake: Option<Arc<Uptake>>,
) -> Response<Body> {
    let mut r = response(Body::Sse {
        prelude,
        frames,
        uptake,
        room: None,
    });
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Whether a long-lived stream's connection still takes what its body hands it, as the body
/// sees it: shared by the body, which notes each frame it hands over and each poll that finds
/// none, and the task that feeds the stream, which waits on [`Uptake::stalled`].
///
/// A connection asks its body for more only while it can write: one whose reader stopped
/// takes a last frame and asks for nothing more (HTTP/1: its write buffer is full; HTTP/2: the
/// stream's window is spent), while one with nothing to send found the body empty at its last
/// poll and waits for it. Neither is polled for: the watch sleeps while the connection waits
/// for the body, is woken by the next frame handed over, and then looks once per period. A
/// frame costs the body an increment and two flag writes; nothing is allocated.
#[derive(Debug, Default)]
pub struct Uptake {
    /// Frames handed to the connection.
    taken: AtomicU64,
    /// Whether the body's last poll found nothing to hand over: the connection waits for the
    /// body, not for its reader.
    caught_up: AtomicBool,
    /// Whether the watch sleeps until the body hands a frame over.
    parked: AtomicBool,
    /// Wakes a parked watch.
    handed: Notify,
    /// Set once the stream is ended for its reader: at its next poll (if the reader ever reads
    /// again) the body ends, what still waits in its queue unsent.
    ended: AtomicBool,
    /// The connection that carries the stream, told once the stream is ended: the connection
    /// polls the body only when it can write, so it would not see the end by itself.
    carrier: Mutex<Option<Arc<dyn Carrier>>>,
    /// Set once the connection dropped the body (written whole, or its client left).
    gone: AtomicBool,
    /// Wakes [`Uptake::delivered`] when the body goes.
    went: Notify,
}

/// The connection that carries a watched stream, as the stream sees it: told once the stream
/// is ended for a reader that stopped, so that it lets go of the stream (the listener closes an
/// HTTP/1 connection, which can serve nothing else while the answer is unfinished, and counts
/// an HTTP/2 stream no longer in flight).
pub(crate) trait Carrier: Send + Sync {
    /// The stream is ended for its reader; called at most once per stream.
    fn reader_gone(&self);
}

impl std::fmt::Debug for dyn Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Carrier")
    }
}

impl Uptake {
    /// Notes what a poll of the body found.
    fn saw(&self, polled: &Poll<Option<Bytes>>) {
        match polled {
            Poll::Ready(Some(_)) => {
                self.taken.fetch_add(1, Ordering::SeqCst);
                self.caught_up.store(false, Ordering::SeqCst);
                if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
                    self.handed.notify_one();
                }
            }
            Poll::Pending => self.caught_up.store(true, Ordering::SeqCst),
            Poll::Ready(None) => {}
        }
    }

    /// Resolves once the stream's reader has taken nothing for a whole `within` while
    /// something waited for it: the body handed the connection a frame (or had one ready
    /// since the stream opened), and the connection, unable to write what it holds, asked for
    /// nothing more. A reader that takes something in every period, however slowly, and a
    /// stream with nothing to send, never resolve it. A reader that stops is found between
    /// `within` and twice `within` after its last frame.
    pub(crate) async fn stalled(&self, within: Duration) {
        let mut mark = self.taken.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(within).await;
            let taken = self.taken.load(Ordering::SeqCst);
            if taken != mark {
                mark = taken;
                continue;
            }
            if !self.caught_up.load(Ordering::SeqCst) {
                return;
            }
            // The connection waits for the body: asleep until a frame is handed over (checked
            // again once parked, so a frame handed over meanwhile is not missed).
            self.parked.store(true, Ordering::SeqCst);
            if self.taken.load(Ordering::SeqCst) == mark {
                self.handed.notified().await;
            }
            self.parked.store(false, Ordering::SeqCst);
            mark = self.taken.load(Ordering::SeqCst);
        }
    }

    /// Ends the body at its next poll, whatever still waits in its queue, and tells the
    /// connection that carries it (which may never poll it again).
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let carrier = self.carrier().take();
        if let Some(c) = carrier {
            c.reader_gone();
        }
    }

    /// Names the connection that carries the stream; told at once if the stream is already
    /// ended.
    pub(crate) fn carried_by(&self, carrier: Arc<dyn Carrier>) {
        let mut slot = self.carrier();
        // Under the lock: `end` either finds the carrier here or has set `ended` before.
        if self.ended.load(Ordering::SeqCst) {
            drop(slot);
            carrier.reader_gone();
        } else {
            *slot = Some(carrier);
        }
    }

    fn carrier(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn Carrier>>> {
        self.carrier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the stream was ended for its reader.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    fn body_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.went.notify_waiters();
    }

    /// For a feeder that sent its last frame (and dropped its sender): resolves once the
    /// connection has let go of the body, `true`; or, `false`, once the reader took nothing
    /// for `within` while frames waited, the stream then ended ([`Uptake::end`]): a client
    /// that stops reading does not hold its connection with the end of an answer unwritten.
    pub(crate) async fn delivered(&self, within: Duration) -> bool {
        let went = self.went.notified();
        tokio::pin!(went);
        // Registered before the flag is read: a body going in between still wakes it.
        went.as_mut().enable();
        if self.gone.load(Ordering::SeqCst) {
            return true;
        }
        tokio::select! {
            // The body gone and a stall seen at once: gone (a stall the connection no longer
            // carries is none).
            biased;
            () = went => true,
            () = self.stalled(within) => {
                self.end();
                false
            }
        }
    }
}

/// An SSE response of events already encoded, watched by `uptake` for the task that feeds it
/// ([`feed`], [`Uptake::delivered`]).
pub(crate) fn watched_events_response(
    events: mpsc::Receiver<Bytes>,
    uptake: Arc<Uptake>,
) -> Response<Body> {
    events_body(events, Some(uptake))
}

fn events_body(events: mpsc::Receiver<Bytes>, uptake: Option<Arc<Uptake>>) -> Response<Body> {
    let mut r = response(Body::Events {
        events,
        uptake,
        room: None,
    });
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// 202 Accepted, no body.
pub(crate) fn accepted() -> Response<Body> {
    let mut r = response(Body::Empty);
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHIN: Duration = STALLED_READER;

    /// Polls the body as its connection would, with no waker to speak of.
    fn poll(body: &mut Body) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        http_body::Body::poll_frame(Pin::new(body), &mut cx)
            .map(|o| o.map(|f| f.unwrap().into_data().unwrap()))
    }

    fn watch(uptake: &Arc<Uptake>) -> tokio::task::JoinHandle<()> {
        let uptake = uptake.clone();
        tokio::spawn(async move { uptake.stalled(WITHIN).await })
    }

    /// A stream with nothing to send is kept however long it idles (its keep-alives written),
    /// and one whose connection takes a frame and then asks for nothing more is found within
    /// two periods; ended, its body ends, what waited unsent.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_found_and_an_idle_stream_is_kept() {
        let (tx, rx) = mpsc::channel(8);
        let (response, uptake) = watched_sse_response(None, rx);
        let mut body = response.into_body();
        assert!(poll(&mut body).is_pending(), "nothing to send");
        let stalled = watch(&uptake);
        tokio::time::sleep(WITHIN * 10).await;
        assert!(!stalled.is_finished(), "an idle stream is kept");
        for _ in 0..10 {
            // A keep-alive, written at once: the connection asks for more.
            tx.send(Bytes::new()).await.unwrap();
            assert!(poll(&mut body).is_ready());
            assert!(poll(&mut body).is_pending());
            tokio::time::sleep(WITHIN / 2).await;
        }
        tokio::time::sleep(WITHIN * 3).await;
        assert!(!stalled.is_finished(), "an idle stream is kept");
        // A frame taken, then nothing more asked for: the connection cannot write it.
        tx.send(Bytes::from_static(b"{}")).await.unwrap();
        assert!(poll(&mut body).is_ready());
        let handed = tokio::time::Instant::now();
        tx.send(Bytes::from_static(b"{}")).await.unwrap();
        stalled.await.unwrap();
        let after = handed.elapsed();
        assert!(after >= WITHIN && after <= WITHIN * 2, "{after:?}");
        uptake.end();
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
    }

    /// A reader that takes a frame now and then while more always wait, slower than they come
    /// but within every period, is kept; once it stops, it is found within two periods.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_kept_until_it_stops() {
        let (tx, rx) = mpsc::channel(64);
        let (response, uptake) = watched_sse_response(Some(Bytes::from_static(b"prelude")), rx);
        let mut body = response.into_body();
        let stalled = watch(&uptake);
        for _ in 0..20 {
            for _ in 0..2 {
                let _ = tx.try_send(Bytes::from_static(b"{}"));
            }
            assert!(poll(&mut body).is_ready());
            tokio::time::sleep(WITHIN * 9 / 10).await;
            assert!(!stalled.is_finished(), "a slow reader is kept");
        }
        let stopped = tokio::time::Instant::now();
        stalled.await.unwrap();
        assert!(stopped.elapsed() <= WITHIN * 2, "{:?}", stopped.elapsed());
    }

    /// The connection carrying a stream is told once when the stream is ended for its reader,
    /// whether it was named before or after; and never while the stream lives.
    #[test]
    fn the_carrier_is_told_once_when_the_stream_is_ended() {
        #[derive(Default)]
        struct Count(std::sync::atomic::AtomicUsize);
        impl Carrier for Count {
            fn reader_gone(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let told = |c: &Arc<Count>| c.0.load(Ordering::SeqCst);
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let (_response, uptake) = watched_sse_response(None, rx);
        let before = Arc::new(Count::default());
        uptake.carried_by(before.clone());
        assert_eq!(told(&before), 0, "the stream lives");
        uptake.end();
        uptake.end();
        assert_eq!(told(&before), 1);
        let after = Arc::new(Count::default());
        uptake.carried_by(after.clone());
        assert_eq!(told(&after), 1, "named once the stream had ended");
        assert_eq!(told(&before), 1);
    }

    /// A feeder that sent its last frame waits until the connection lets go of the body, or
    /// until the reader takes nothing for the stall timeout: the stream is then ended, its
    /// body ends at its next poll and the carrier is told.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_an_answer_is_delivered_or_its_stalled_reader_let_go() {
        // Read to its end: the connection drops the body.
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let (response, uptake) = watched_sse_response(None, rx);
        let mut body = response.into_body();
        tx.try_send(Bytes::from_static(b"{}")).unwrap();
        drop(tx);
        let delivered = tokio::spawn({
            let uptake = uptake.clone();
            async move { uptake.delivered(WITHIN).await }
        });
        assert!(matches!(poll(&mut body), Poll::Ready(Some(_))));
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        drop(body);
        assert!(delivered.await.unwrap(), "delivered");
        assert!(!uptake.is_ended());

        // Never read: found within twice the timeout, and ended.
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let (response, uptake) = watched_sse_response(None, rx);
        let mut body = response.into_body();
        tx.try_send(Bytes::from_static(b"{}")).unwrap();
        tx.try_send(Bytes::from_static(b"{}")).unwrap();
        drop(tx);
        // The connection took the first frame and could write no more.
        assert!(matches!(poll(&mut body), Poll::Ready(Some(_))));
        let started = tokio::time::Instant::now();
        assert!(!uptake.delivered(WITHIN).await, "stalled");
        assert!(started.elapsed() <= WITHIN * 2);
        assert!(uptake.is_ended());
        assert!(
            matches!(poll(&mut body), Poll::Ready(None)),
            "the body ends, the second frame unsent"
        );
    }

    /// A feed into a full queue that the reader does not empty gives up after the timeout and
    /// ends the stream; one the reader makes room in goes through.
    #[tokio::test(start_paused = true)]
    async fn a_feed_waits_for_room_only_while_the_reader_takes_something() {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let (response, uptake) = watched_sse_response(None, rx);
        let mut body = response.into_body();
        let frame = || Bytes::from_static(b"{}");
        assert_eq!(feed(&tx, &uptake, WITHIN, frame()).await, Fed::Sent);
        let reading = tokio::spawn(async move {
            tokio::time::sleep(WITHIN / 2).await;
            assert!(matches!(poll(&mut body), Poll::Ready(Some(_))));
            body
        });
        assert_eq!(feed(&tx, &uptake, WITHIN, frame()).await, Fed::Sent);
        let body = reading.await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(feed(&tx, &uptake, WITHIN, frame()).await, Fed::Stalled);
        assert_eq!(started.elapsed(), WITHIN);
        assert!(uptake.is_ended());
        drop(body);
        assert_eq!(feed(&tx, &uptake, WITHIN, frame()).await, Fed::ReaderGone);
    }

    /// A connection that never asked for the first frame (it could not even write the
    /// response's head) is found too.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_never_reads_is_found() {
        let (_tx, rx) = mpsc::channel::<Bytes>(8);
        let (_response, uptake) = watched_sse_response(Some(Bytes::from_static(b"x")), rx);
        let stalled = tokio::time::timeout(WITHIN * 2, uptake.stalled(WITHIN)).await;
        assert!(stalled.is_ok());
    }
}
