//! Where the messages a server sends about a request go: a downstream stream's channel, or the
//! queue of one call still waiting for its answer.
//!
//! Most calls hear nothing before their answer, yet each needs somewhere a progress
//! notification or a server request could go. A tokio channel costs two allocations (one of
//! them over-aligned, off glibc's fast path) and a few hundred instructions per poll of its
//! receiver; a call's queue is one small allocation and a flag read per poll.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

/// Frames (JSON-RPC messages) bound for one downstream stream or one call.
#[derive(Clone, Debug)]
pub struct EventSink(Sink);

#[derive(Clone, Debug)]
enum Sink {
    /// A stream's channel (a GET stream, a listen stream, an SSE client).
    Stream(mpsc::Sender<Bytes>),
    /// A call's queue.
    Call(Arc<CallQueue>),
}

/// Why a frame was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The queue holds as many frames as it may: a client too slow to drain it loses messages
    /// rather than growing the gateway's memory.
    #[error("the stream's queue is full")]
    Full,
    /// Nobody reads the stream any more.
    #[error("the stream is closed")]
    Closed,
}

impl EventSink {
    /// Queues `frame` without waiting.
    pub fn try_send(&self, frame: Bytes) -> Result<(), Refused> {
        match &self.0 {
            Sink::Stream(tx) => tx.try_send(frame).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }),
            Sink::Call(queue) => queue.push(frame),
        }
    }

    /// Marks a message for this sink as on its way (held by the policy stage): a call's
    /// reader waits for it before it answers ([`CallEvents::recv_or_settled`]) until the
    /// returned mark is dropped. `None` for a stream, whose reader waits for nothing.
    pub fn on_the_way(&self) -> Option<OnTheWay> {
        match &self.0 {
            Sink::Stream(_) => None,
            Sink::Call(queue) => {
                queue.on_the_way.fetch_add(1, Ordering::SeqCst);
                Some(OnTheWay(queue.clone()))
            }
        }
    }

    /// Whether nobody reads the stream any more.
    pub fn is_closed(&self) -> bool {
        match &self.0 {
            Sink::Stream(tx) => tx.is_closed(),
            Sink::Call(queue) => queue.closed.load(Ordering::Acquire),
        }
    }
}

impl From<mpsc::Sender<Bytes>> for EventSink {
    fn from(tx: mpsc::Sender<Bytes>) -> Self {
        EventSink(Sink::Stream(tx))
    }
}

/// A call's queue and, for the sink's clones, its reader's waker.
#[derive(Debug)]
struct CallQueue {
    frames: Mutex<VecDeque<Bytes>>,
    /// How many frames wait: read without the lock, so that an empty queue costs a load.
    queued: AtomicUsize,
    capacity: usize,
    reader: AtomicWaker,
    /// Set once the reader is dropped.
    closed: AtomicBool,
    /// Messages for this call still held on their way ([`EventSink::on_the_way`]).
    on_the_way: AtomicUsize,
}

/// A message on its way to a call's queue; dropped once it is there (or will never be).
#[derive(Debug)]
pub struct OnTheWay(Arc<CallQueue>);

impl Drop for OnTheWay {
    fn drop(&mut self) {
        if self.0.on_the_way.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.reader.wake();
        }
    }
}

impl CallQueue {
    fn push(&self, frame: Bytes) -> Result<(), Refused> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        {
            let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
            if frames.len() >= self.capacity {
                return Err(Refused::Full);
            }
            frames.push_back(frame);
            // Stored, then `closed` read again (the reader's drop does the opposite, both
            // sequentially consistent): whichever comes second sees the other, so a frame
            // pushed as the reader goes is dropped now, not with the last sink.
            self.queued.store(frames.len(), Ordering::SeqCst);
            if self.closed.load(Ordering::SeqCst) {
                *frames = VecDeque::new();
                self.queued.store(0, Ordering::SeqCst);
                return Err(Refused::Closed);
            }
        }
        self.reader.wake();
        Ok(())
    }

    fn pop(&self) -> Option<Bytes> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        let frame = frames.pop_front();
        self.queued.store(frames.len(), Ordering::Release);
        frame
    }
}

/// The reading end of a call's queue.
#[derive(Debug)]
pub struct CallEvents(Arc<CallQueue>);

/// A call's queue of at most `capacity` frames: the sink its server's messages are routed to,
/// and what the call's handler reads them from.
pub fn call_queue(capacity: usize) -> (EventSink, CallEvents) {
    let queue = Arc::new(CallQueue {
        frames: Mutex::new(VecDeque::new()),
        queued: AtomicUsize::new(0),
        capacity,
        reader: AtomicWaker::new(),
        closed: AtomicBool::new(false),
        on_the_way: AtomicUsize::new(0),
    });
    (EventSink(Sink::Call(queue.clone())), CallEvents(queue))
}

impl CallEvents {
    /// The next frame, waiting for one. Never ends on its own: a call's sinks are dropped as
    /// its answer comes, which the reader waits for alongside.
    pub async fn recv(&mut self) -> Bytes {
        poll_fn(|cx| {
            if let Some(frame) = self.0.pop() {
                return Poll::Ready(frame);
            }
            self.0.reader.register(cx.waker());
            // A frame pushed before the waker was registered woke nobody: look again.
            match self.0.pop() {
                Some(frame) => Poll::Ready(frame),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next frame, if one waits.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.0.pop()
    }

    /// Whether no frame waits and none is on its way: [`Self::recv_or_settled`] would answer
    /// `None` at once.
    pub fn is_settled(&self) -> bool {
        self.0.on_the_way.load(Ordering::SeqCst) == 0 && self.0.queued.load(Ordering::SeqCst) == 0
    }

    /// The next frame, waiting while any is on its way; `None` once none waits and none is on
    /// its way. What a call reads after its answer: the messages its server sent before the
    /// answer may still be in the policy stage, and come first.
    pub async fn recv_or_settled(&mut self) -> Option<Bytes> {
        poll_fn(|cx| {
            // The count first: a message is queued before its mark is dropped, so a count of
            // zero read before the queue means the queue holds whatever came.
            let on_the_way = self.0.on_the_way.load(Ordering::SeqCst);
            if let Some(frame) = self.0.pop() {
                return Poll::Ready(Some(frame));
            }
            if on_the_way == 0 {
                return Poll::Ready(None);
            }
            self.0.reader.register(cx.waker());
            let on_the_way = self.0.on_the_way.load(Ordering::SeqCst);
            match self.0.pop() {
                Some(frame) => Poll::Ready(Some(frame)),
                None if on_the_way == 0 => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for CallEvents {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        // The reading task's waker goes too: a sink a route keeps must not keep that task's
        // memory.
        drop(self.0.reader.take());
        // What waits is dropped now, not when the last sink goes (a route kept by a server
        // connection, say).
        if self.0.queued.load(Ordering::SeqCst) > 0 {
            let mut frames = self.0.frames.lock().unwrap_or_else(PoisonError::into_inner);
            let waiting = std::mem::take(&mut *frames);
            self.0.queued.store(0, Ordering::SeqCst);
            drop(frames);
            drop(waiting);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_queue_hands_over_frames_in_order_and_wakes_its_reader() {
        let (sink, mut events) = call_queue(4);
        assert_eq!(events.try_recv(), None);
        let reader = tokio::spawn(async move {
            let first = events.recv().await;
            let second = events.recv().await;
            (first, second, events)
        });
        tokio::task::yield_now().await;
        let clone = sink.clone();
        sink.try_send(Bytes::from_static(b"1")).unwrap();
        clone.try_send(Bytes::from_static(b"2")).unwrap();
        let (first, second, events) = reader.await.unwrap();
        assert_eq!((&first[..], &second[..]), (&b"1"[..], &b"2"[..]));
        assert!(!sink.is_closed());
        drop(events);
        assert!(sink.is_closed());
        assert_eq!(
            sink.try_send(Bytes::from_static(b"3")),
            Err(Refused::Closed)
        );
    }

    #[tokio::test]
    async fn a_reader_waits_for_what_is_on_its_way_and_no_longer() {
        let (sink, mut events) = call_queue(4);
        assert_eq!(events.recv_or_settled().await, None, "nothing on its way");
        let held = sink.on_the_way().expect("a call's sink");
        let reader = tokio::spawn(async move {
            let first = events.recv_or_settled().await;
            let then = events.recv_or_settled().await;
            (first, then)
        });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "waits while a message is on its way");
        sink.try_send(Bytes::from_static(b"log")).unwrap();
        drop(held);
        let (first, then) = reader.await.unwrap();
        assert_eq!(first.as_deref(), Some(&b"log"[..]));
        assert_eq!(then, None);
        // A message that never comes (withheld) settles the reader too.
        let (sink, mut events) = call_queue(4);
        let held = sink.on_the_way();
        let reader = tokio::spawn(async move { events.recv_or_settled().await });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(reader.await.unwrap(), None);
        let (tx, _rx) = mpsc::channel(1);
        assert!(EventSink::from(tx).on_the_way().is_none());
    }

    #[test]
    fn a_full_call_queue_refuses_and_takes_again_once_read() {
        let (sink, mut events) = call_queue(2);
        sink.try_send(Bytes::from_static(b"a")).unwrap();
        sink.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(sink.try_send(Bytes::from_static(b"c")), Err(Refused::Full));
        assert_eq!(events.try_recv().as_deref(), Some(&b"a"[..]));
        sink.try_send(Bytes::from_static(b"c")).unwrap();
        assert_eq!(events.try_recv().as_deref(), Some(&b"b"[..]));
        assert_eq!(events.try_recv().as_deref(), Some(&b"c"[..]));
        assert_eq!(events.try_recv(), None);
    }

    #[test]
    fn a_dropped_reader_frees_what_waited_though_sinks_remain() {
        let (sink, events) = call_queue(8);
        let frame = Bytes::from(vec![0u8; 1024]);
        sink.try_send(frame.clone()).unwrap();
        assert!(!frame.is_unique());
        drop(events);
        assert!(
            frame.is_unique(),
            "the queued copy was dropped with the reader"
        );
    }

    #[tokio::test]
    async fn a_stream_sink_reports_full_and_closed() {
        let (tx, mut rx) = mpsc::channel(1);
        let sink = EventSink::from(tx);
        sink.try_send(Bytes::from_static(b"x")).unwrap();
        assert_eq!(sink.try_send(Bytes::from_static(b"y")), Err(Refused::Full));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"x"[..]));
        drop(rx);
        assert!(sink.is_closed());
        assert_eq!(
            sink.try_send(Bytes::from_static(b"z")),
            Err(Refused::Closed)
        );
    }
}
