//! Resumable SSE streams (2025-11-25): every stream of a session numbers its events
//! (`id: S.N`: S the stream, N its sequence), opens with a priming event (an id, empty data and
//! a `retry` hint), and keeps its events for a while. A client whose connection broke resumes
//! with GET and `Last-Event-ID`, and gets the rest of that stream only: what it missed, then
//! what is still to come. A broken connection does not cancel the request (it is not the
//! client's cancellation): the stream goes on being recorded, within bounds, for the client's
//! return.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::sse;

/// Streams one session keeps for resumption; opening one more forgets the oldest finished one
/// (or refuses, when none has finished).
pub const MAX_STREAMS: usize = 64;
/// Events one stream keeps while nobody reads it; older ones are forgotten (a resumption from
/// before them fails).
const MAX_EVENTS: usize = 1024;
/// Bytes of events one stream keeps while nobody reads it.
const MAX_BYTES: usize = 4 * 1024 * 1024;
/// While a client reads the stream, only a short tail is kept: what may have been lost in
/// flight when its connection broke.
const READ_TAIL_EVENTS: usize = 64;
const READ_TAIL_BYTES: usize = 256 * 1024;
/// Bytes of events one session keeps over all its streams.
const SESSION_BYTES: usize = 16 * 1024 * 1024;
/// How long a finished stream stays resumable.
const KEEP_FINISHED: Duration = Duration::from_secs(60);
/// How long a client should wait before reconnecting (the `retry` field).
const RETRY_MS: u64 = 1000;
/// Room in a client's channel beyond a replay.
const CLIENT_QUEUE: usize = 64;

/// Why a `Last-Event-ID` cannot be resumed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// Not an id this gateway gives (`S.N`).
    #[error("Last-Event-ID {0:?} is not an event id of this gateway")]
    Malformed(String),
    /// The stream is unknown, or finished long enough ago to be forgotten.
    #[error("the stream of event {0} is no longer held; send the request again")]
    Gone(String),
    /// Events after the id were forgotten (the stream outgrew what is kept).
    #[error("events after {0} are no longer held (the stream outgrew the replay buffer)")]
    Truncated(String),
}

/// The resumable streams of one session.
#[derive(Default)]
pub struct Streams {
    inner: Arc<Mutex<Registry>>,
    /// Bytes all its streams keep.
    kept: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    logs: HashMap<u64, Arc<Log>>,
    closed: bool,
}

/// One stream's record.
struct Log {
    stream: u64,
    state: Mutex<LogState>,
    /// Woken when another client takes the stream over (see [`Streams::resume`]).
    taken: tokio::sync::Notify,
    kept: Arc<AtomicUsize>,
}

impl Drop for Log {
    fn drop(&mut self) {
        let bytes = lock(&self.state).bytes;
        self.kept.fetch_sub(bytes, Ordering::Relaxed);
    }
}

struct LogState {
    /// Kept events, by sequence number, encoded.
    events: VecDeque<(u64, Bytes)>,
    bytes: usize,
    next_seq: u64,
    /// The lowest sequence number not forgotten.
    first_kept: u64,
    /// The client reading now, if any.
    client: Option<mpsc::Sender<Bytes>>,
    finished: bool,
}

impl Streams {
    /// Records the frames of `frames` as a new stream; returns the first client's events (the
    /// priming event first, when `prime`: clients of revisions before 2025-11-25 do not expect
    /// an event without data). `frames` end the stream; an empty frame is a keep-alive. With
    /// as many live streams as it may keep (or once the session ended), `frames` come back, to
    /// be sent as they come, without resumption.
    pub fn open(
        &self,
        frames: mpsc::Receiver<Bytes>,
        prime: bool,
    ) -> Result<mpsc::Receiver<Bytes>, mpsc::Receiver<Bytes>> {
        let log = {
            let mut reg = lock(&self.inner);
            if reg.closed {
                return Err(frames);
            }
            if reg.logs.len() >= MAX_STREAMS {
                let oldest = reg
                    .logs
                    .values()
                    .filter(|l| lock(&l.state).finished)
                    .map(|l| l.stream)
                    .min();
                match oldest {
                    Some(oldest) => drop(reg.logs.remove(&oldest)),
                    None => return Err(frames),
                }
            }
            reg.next += 1;
            let log = Arc::new(Log {
                stream: reg.next,
                taken: tokio::sync::Notify::new(),
                kept: self.kept.clone(),
                state: Mutex::new(LogState {
                    events: VecDeque::new(),
                    bytes: 0,
                    next_seq: 1,
                    first_kept: 1,
                    client: None,
                    finished: false,
                }),
            });
            reg.logs.insert(log.stream, log.clone());
            log
        };
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        if prime {
            let _ = tx.try_send(priming(log.stream));
        }
        lock(&log.state).client = Some(tx);
        tokio::spawn(pump(log, frames, Arc::downgrade(&self.inner)));
        Ok(rx)
    }

    /// The rest of the stream that `last_event_id` belongs to, for a client that resumes it.
    pub fn resume(&self, last_event_id: &str) -> Result<mpsc::Receiver<Bytes>, ResumeError> {
        let malformed = || ResumeError::Malformed(last_event_id.chars().take(64).collect());
        let (stream, seq) = last_event_id.trim().split_once('.').ok_or_else(malformed)?;
        let stream: u64 = stream.parse().map_err(|_| malformed())?;
        let seq: u64 = seq.parse().map_err(|_| malformed())?;
        let log = lock(&self.inner)
            .logs
            .get(&stream)
            .cloned()
            .ok_or_else(|| ResumeError::Gone(last_event_id.to_owned()))?;
        let mut state = lock(&log.state);
        if seq >= state.next_seq {
            return Err(malformed());
        }
        if seq + 1 < state.first_kept {
            return Err(ResumeError::Truncated(last_event_id.to_owned()));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE + state.events.len());
        for (_, event) in state.events.iter().filter(|(n, _)| *n > seq) {
            let _ = tx.try_send(event.clone());
        }
        // A finished stream's client gets what it missed and the end; a live one takes over
        // from whoever read before (that connection is broken, or about to be).
        if !state.finished {
            state.client = Some(tx);
            drop(state);
            // A pump blocked on the broken connection gives up on it.
            log.taken.notify_one();
        }
        Ok(rx)
    }

    /// Forgets every stream (the session ended): their records go now, not when they expire.
    pub fn close(&self) {
        let mut reg = lock(&self.inner);
        reg.closed = true;
        reg.logs.clear();
    }
}

/// Records frames as they come and hands them to the attached client.
async fn pump(log: Arc<Log>, mut frames: mpsc::Receiver<Bytes>, registry: Weak<Mutex<Registry>>) {
    while let Some(frame) = frames.recv().await {
        let (event, mut client) = {
            let mut state = lock(&log.state);
            if frame.is_empty() {
                (Bytes::from_static(sse::KEEPALIVE), state.client.clone())
            } else {
                let seq = state.next_seq;
                state.next_seq += 1;
                let event = encode(log.stream, seq, &frame);
                state.bytes += event.len();
                log.kept.fetch_add(event.len(), Ordering::Relaxed);
                state.events.push_back((seq, event.clone()));
                let (max_events, max_bytes) = match state.client {
                    Some(_) => (READ_TAIL_EVENTS, READ_TAIL_BYTES),
                    None => (MAX_EVENTS, MAX_BYTES),
                };
                while state.events.len() > max_events
                    || state.bytes > max_bytes
                    || (log.kept.load(Ordering::Relaxed) > SESSION_BYTES && state.events.len() > 1)
                {
                    let Some((n, old)) = state.events.pop_front() else {
                        break;
                    };
                    state.bytes -= old.len();
                    log.kept.fetch_sub(old.len(), Ordering::Relaxed);
                    state.first_kept = n + 1;
                }
                (event, state.client.clone())
            }
        };
        // Sent unless the client goes away, or another takes the stream over (it got this
        // event in its replay: the event was recorded before it came).
        while let Some(c) = client.take() {
            tokio::select! {
                sent = c.send(event.clone()) => {
                    if sent.is_err() {
                        // The client went away: the stream goes on without it, for its return.
                        let mut state = lock(&log.state);
                        if state.client.as_ref().is_some_and(|cur| cur.same_channel(&c)) {
                            state.client = None;
                        }
                    }
                }
                _ = log.taken.notified() => {
                    // A stale wake-up (the client is still the one taken over by nobody): try
                    // again.
                    let state = lock(&log.state);
                    if state.client.as_ref().is_some_and(|cur| cur.same_channel(&c)) {
                        client = Some(c);
                    }
                }
            }
        }
    }
    {
        let mut state = lock(&log.state);
        state.finished = true;
        state.client = None; // ends the client's stream
    }
    // The record lingers in the registry alone: evicted or closed, it goes at once.
    let stream = log.stream;
    drop(log);
    tokio::time::sleep(KEEP_FINISHED).await;
    if let Some(registry) = registry.upgrade() {
        lock(&registry).logs.remove(&stream);
    }
}

/// A frame as the event `stream.seq`.
fn encode(stream: u64, seq: u64, frame: &[u8]) -> Bytes {
    let message = sse::encode_message(frame);
    let mut b = BytesMut::with_capacity(message.len() + 24);
    b.put_slice(format!("id: {stream}.{seq}\n").as_bytes());
    b.put_slice(&message);
    b.freeze()
}

/// The event that opens a stream: its first id, empty data, and how soon to reconnect.
fn priming(stream: u64) -> Bytes {
    Bytes::from(format!("id: {stream}.0\nretry: {RETRY_MS}\ndata: \n\n"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Bytes>) -> String {
        let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("the stream is open");
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_stream_is_primed_numbered_and_resumed_after_the_last_seen_event() {
        let streams = Streams::default();
        let (tx, frames) = mpsc::channel(8);
        let mut first = streams.open(frames, true).unwrap();
        assert_eq!(next(&mut first).await, "id: 1.0\nretry: 1000\ndata: \n\n");
        tx.send(Bytes::from_static(b"{\"a\":1}")).await.unwrap();
        assert_eq!(
            next(&mut first).await,
            "id: 1.1\nevent: message\ndata: {\"a\":1}\n\n"
        );
        // The client goes away; the stream goes on and is recorded.
        drop(first);
        tx.send(Bytes::from_static(b"{\"a\":2}")).await.unwrap();
        tx.send(Bytes::from_static(b"{\"a\":3}")).await.unwrap();
        let mut again = streams.resume("1.1").unwrap();
        assert!(next(&mut again).await.starts_with("id: 1.2\n"));
        assert!(next(&mut again).await.starts_with("id: 1.3\n"));
        tx.send(Bytes::from_static(b"{\"a\":4}")).await.unwrap();
        assert!(next(&mut again).await.starts_with("id: 1.4\n"));
        drop(tx);
        assert!(
            again.recv().await.is_none(),
            "the stream ends with its frames"
        );
        // Finished, it still replays for a while, then ends at once.
        let mut late = streams.resume("1.3").unwrap();
        assert!(next(&mut late).await.starts_with("id: 1.4\n"));
        assert!(late.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_stalled_connection_does_not_hold_up_the_client_that_resumes() {
        let streams = Streams::default();
        let (tx, frames) = mpsc::channel(8);
        // The first connection is never read again (half-open): its queue fills up.
        let _stalled = streams.open(frames, false).unwrap();
        for i in 0..CLIENT_QUEUE + 8 {
            tx.send(Bytes::from(format!("{{\"n\":{i}}}")))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The last event the broken connection delivered lies within the tail kept.
        let mut resumed = streams.resume("1.10").unwrap();
        tx.send(Bytes::from_static(b"{\"last\":true}"))
            .await
            .unwrap();
        drop(tx);
        let mut seen = Vec::new();
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), resumed.recv())
            .await
            .expect("the resumed client is not held up")
        {
            seen.push(String::from_utf8(ev.to_vec()).unwrap());
        }
        assert!(seen.last().unwrap().contains("last"), "{:?}", seen.last());
        // Within the tail kept while the stalled client held the stream: no gaps, no repeats.
        let seqs: Vec<u64> = seen
            .iter()
            .map(|e| {
                e[4..e.find('\n').unwrap()]
                    .split_once('.')
                    .unwrap()
                    .1
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[tokio::test]
    async fn ids_from_elsewhere_are_refused_by_kind() {
        let streams = Streams::default();
        let (_tx, frames) = mpsc::channel(8);
        let _rx = streams.open(frames, true).unwrap();
        for bad in ["", "7", "x.1", "1.x", "1.5", "-1.0"] {
            assert!(
                matches!(streams.resume(bad), Err(ResumeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(streams.resume("9.0"), Err(ResumeError::Gone(_))));
        assert!(streams.resume("1.0").is_ok());
    }

    #[tokio::test]
    async fn a_long_stream_keeps_only_its_newest_events() {
        let streams = Streams::default();
        let (tx, frames) = mpsc::channel(8);
        let rx = streams.open(frames, true).unwrap();
        drop(rx);
        for i in 0..MAX_EVENTS + 10 {
            tx.send(Bytes::from(format!("{{\"n\":{i}}}")))
                .await
                .unwrap();
        }
        // Let the pump record the last one.
        tokio::task::yield_now().await;
        tx.send(Bytes::from_static(b"{}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(
            streams.resume("1.3"),
            Err(ResumeError::Truncated(_))
        ));
        let mut tail = streams.resume(&format!("1.{}", MAX_EVENTS)).unwrap();
        assert!(
            next(&mut tail)
                .await
                .starts_with(&format!("id: 1.{}\n", MAX_EVENTS + 1))
        );
    }

    #[tokio::test]
    async fn a_session_holds_a_bounded_number_of_live_streams() {
        let streams = Streams::default();
        let mut senders = Vec::new();
        for _ in 0..MAX_STREAMS {
            let (tx, frames) = mpsc::channel(1);
            senders.push(tx);
            streams.open(frames, true).unwrap();
        }
        // One more is sent as it comes, without a record.
        let (_tx, frames) = mpsc::channel(1);
        assert!(streams.open(frames, true).is_err());
        // One finishes: its place can be taken.
        drop(senders.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_tx, frames) = mpsc::channel(1);
        assert!(streams.open(frames, true).is_ok());
    }
}
