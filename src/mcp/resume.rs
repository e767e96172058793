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
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::body::{Fed, Uptake, feed};
use crate::mcp::principal_counts::PrincipalCounts;
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
/// Bytes the streams of every session may keep together.
const ALL_SESSIONS_BYTES: usize = 256 * 1024 * 1024;
/// What one principal's sessions may keep of their common budget: one caller whose streams go
/// unread cannot take it all and leave everyone else's streams unresumable.
const PRINCIPAL_SHARE: usize = 8;
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
pub struct Streams {
    inner: Arc<Mutex<Registry>>,
    /// Bytes all its streams keep.
    kept: Arc<AtomicUsize>,
    /// Bytes the streams of every session of its principal keep (none when unauthenticated).
    principal: Option<Arc<AtomicUsize>>,
    /// What the streams of every session keep, and the most they may.
    all: &'static Budget,
}

/// Bytes the streams of many sessions keep together, and the most they may: past it, what a
/// stream records is sent but not kept (it cannot be resumed), whoever holds the rest.
pub struct Budget {
    kept: AtomicUsize,
    limit: usize,
    /// What each principal's sessions keep, while any of them lives.
    principals: PrincipalCounts,
}

impl Budget {
    /// A budget of `limit` bytes, of which one principal's sessions may keep an eighth.
    pub const fn new(limit: usize) -> Budget {
        Budget {
            kept: AtomicUsize::new(0),
            limit,
            principals: PrincipalCounts::new(),
        }
    }

    fn over(&self) -> bool {
        self.kept.load(Ordering::Relaxed) > self.limit
    }

    /// Whether `principal`'s sessions keep more than their share.
    fn over_share(&self, principal: &AtomicUsize) -> bool {
        principal.load(Ordering::Relaxed) > self.limit / PRINCIPAL_SHARE
    }

    /// The count of what `principal`'s sessions keep, shared by all of them.
    fn principal(&self, principal: &Arc<str>) -> Arc<AtomicUsize> {
        self.principals.of(principal)
    }
}

/// Every session's streams in this process: many sessions of one principal (each within
/// [`SESSION_BYTES`]) must not hold the gateway's memory.
static ALL_SESSIONS: Budget = Budget::new(ALL_SESSIONS_BYTES);

impl Default for Streams {
    fn default() -> Streams {
        Streams::within(&ALL_SESSIONS)
    }
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
    principal: Option<Arc<AtomicUsize>>,
    all: &'static Budget,
}

impl Log {
    /// Counts `bytes` more (or fewer) kept, in the session, its principal's and in all.
    fn count(&self, bytes: usize, more: bool) {
        let principal = self.principal.as_deref();
        for counter in [Some(&*self.kept), principal, Some(&self.all.kept)]
            .into_iter()
            .flatten()
        {
            if more {
                counter.fetch_add(bytes, Ordering::Relaxed);
            } else {
                counter.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let bytes = lock(&self.state).bytes;
        self.count(bytes, false);
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
    client: Option<Reader>,
    finished: bool,
}

/// A client reading a stream: the queue its connection takes events from, and the watch on
/// what it takes.
#[derive(Clone)]
struct Reader {
    tx: mpsc::Sender<Bytes>,
    uptake: Arc<Uptake>,
}

impl Reader {
    fn new(tx: mpsc::Sender<Bytes>) -> Reader {
        Reader {
            tx,
            uptake: Arc::new(Uptake::default()),
        }
    }
}

/// How the readers of a session's streams are watched: how long one may take nothing while
/// events wait before it loses the stream (which goes on being recorded for its return) and
/// its connection is let go, and what counts those.
#[derive(Clone)]
pub struct ReaderWatch {
    /// `mcp.stalled_stream_timeout`.
    pub stall: Duration,
    /// Streams ended for a stalled reader.
    pub stalled: Counter,
}

impl Streams {
    /// A session's streams, within `all` (with every other session's). Stream numbers start
    /// at random: a portable session served by several replicas (or brought back after it
    /// idled out) has streams on each, and an event id must name one stream only.
    pub fn within(all: &'static Budget) -> Streams {
        let mut random = [0u8; 8];
        // Without randomness, numbers from 0: resumption stays exact on one replica.
        let _ = getrandom::fill(&mut random);
        Streams::numbered_after(all, u64::from_le_bytes(random) >> 16)
    }

    /// A session's streams, numbered from `last + 1`.
    fn numbered_after(all: &'static Budget, last: u64) -> Streams {
        let registry = Registry {
            next: last,
            ..Registry::default()
        };
        Streams {
            inner: Arc::new(Mutex::new(registry)),
            kept: Arc::default(),
            principal: None,
            all,
        }
    }

    /// A session's streams, of `principal`: within its share of every session's budget too.
    pub fn of(principal: Option<&Arc<str>>) -> Streams {
        Streams::within(&ALL_SESSIONS).with_principal(principal)
    }

    fn with_principal(mut self, principal: Option<&Arc<str>>) -> Streams {
        self.principal = principal.map(|p| self.all.principal(p));
        self
    }

    /// Records the frames of `frames` as a new stream; returns the first client's events (the
    /// priming event first, when `prime`: clients of revisions before 2025-11-25 do not expect
    /// an event without data) and the watch on what it takes (for its body), its reader
    /// watched as `watch` says. `frames` end the stream; an empty frame is a keep-alive. With
    /// as many live streams as it may keep (or once the session ended), `frames` come back, to
    /// be sent as they come, without resumption.
    pub fn open(
        &self,
        frames: mpsc::Receiver<Bytes>,
        prime: bool,
        watch: ReaderWatch,
    ) -> Result<(mpsc::Receiver<Bytes>, Arc<Uptake>), mpsc::Receiver<Bytes>> {
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
                principal: self.principal.clone(),
                all: self.all,
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
        let reader = Reader::new(tx);
        let uptake = reader.uptake.clone();
        lock(&log.state).client = Some(reader);
        tokio::spawn(pump(log, frames, Arc::downgrade(&self.inner), watch));
        Ok((rx, uptake))
    }

    /// The rest of the stream that `last_event_id` belongs to, for a client that resumes it,
    /// and the watch on what it takes (for its body), its reader watched as `watch` says.
    pub fn resume(
        &self,
        last_event_id: &str,
        watch: ReaderWatch,
    ) -> Result<(mpsc::Receiver<Bytes>, Arc<Uptake>), ResumeError> {
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
        // from whoever read before (that connection is broken, or about to be: it is let go,
        // whatever it still held unwritten).
        let uptake = Arc::new(Uptake::default());
        if !state.finished {
            let reader = Reader {
                tx,
                uptake: uptake.clone(),
            };
            let before = state.client.replace(reader);
            drop(state);
            if let Some(before) = before {
                before.uptake.end();
            }
            // A pump blocked on the broken connection gives up on it.
            log.taken.notify_one();
        } else {
            drop(state);
            // Only the replay to write (its queue ends with it): a client that stops reading
            // does not hold its connection with it.
            let watched = uptake.clone();
            tokio::spawn(async move {
                if !watched.delivered(watch.stall).await {
                    watch.stalled.inc();
                }
            });
        }
        Ok((rx, uptake))
    }

    /// Forgets every stream (the session ended): their records go now, not when they expire.
    pub fn close(&self) {
        let mut reg = lock(&self.inner);
        reg.closed = true;
        reg.logs.clear();
    }
}

/// Records frames as they come and hands them to the attached client.
async fn pump(
    log: Arc<Log>,
    mut frames: mpsc::Receiver<Bytes>,
    registry: Weak<Mutex<Registry>>,
    watch: ReaderWatch,
) {
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
                log.count(event.len(), true);
                state.events.push_back((seq, event.clone()));
                let (max_events, max_bytes) = match state.client {
                    Some(_) => (READ_TAIL_EVENTS, READ_TAIL_BYTES),
                    None => (MAX_EVENTS, MAX_BYTES),
                };
                // The newest event goes too when a budget is over: sparing it let each of a
                // session's 64 streams keep one event of up to 4 MiB, past the session's and
                // the principal's bounds. It is sent all the same, only not resumable; and
                // only the session's or the principal's own streams can have taken those
                // budgets.
                while state.events.len() > max_events
                    || state.bytes > max_bytes
                    || log.kept.load(Ordering::Relaxed) > SESSION_BYTES
                    || log
                        .principal
                        .as_deref()
                        .is_some_and(|p| log.all.over_share(p))
                    || log.all.over()
                {
                    let Some((n, old)) = state.events.pop_front() else {
                        break;
                    };
                    state.bytes -= old.len();
                    log.count(old.len(), false);
                    state.first_kept = n + 1;
                }
                (event, state.client.clone())
            }
        };
        // Sent unless the client goes away, or another takes the stream over (it got this
        // event in its replay: the event was recorded before it came).
        while let Some(c) = client.take() {
            tokio::select! {
                fed = feed(&c.tx, &c.uptake, watch.stall, event.clone()) => {
                    if fed != Fed::Sent {
                        if fed == Fed::Stalled {
                            watch.stalled.inc();
                        }
                        // The client went away (or stopped reading): the stream goes on
                        // without it, for its return.
                        let mut state = lock(&log.state);
                        if state.client.as_ref().is_some_and(|cur| cur.tx.same_channel(&c.tx)) {
                            state.client = None;
                        }
                    }
                }
                _ = log.taken.notified() => {
                    // A stale wake-up (the client is still the one taken over by nobody): try
                    // again.
                    let state = lock(&log.state);
                    if state.client.as_ref().is_some_and(|cur| cur.tx.same_channel(&c.tx)) {
                        client = Some(c);
                    }
                }
            }
        }
    }
    let last = {
        let mut state = lock(&log.state);
        state.finished = true;
        state.client.take()
    };
    // The record lingers in the registry alone: evicted or closed, it goes at once.
    let stream = log.stream;
    drop(log);
    if let Some(Reader { tx, uptake }) = last {
        // Its queue ends the client's stream once written; a client that stops reading then
        // does not hold its connection with the end unwritten.
        drop(tx);
        if !uptake.delivered(watch.stall).await {
            watch.stalled.inc();
        }
    }
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

    /// A watch that never finds a reader stalled within a test.
    fn watch() -> ReaderWatch {
        ReaderWatch {
            stall: Duration::from_secs(30),
            stalled: Counter::default(),
        }
    }

    /// Streams numbered from 1, within every session's budget.
    fn from_one() -> Streams {
        Streams::numbered_after(&ALL_SESSIONS, 0)
    }

    /// A session served by two replicas (or brought back after it idled out) has streams on
    /// each: their event ids never name each other's.
    #[tokio::test]
    async fn one_sessions_streams_elsewhere_have_ids_of_their_own() {
        let (here, there) = (Streams::default(), Streams::default());
        let (_tx, frames) = mpsc::channel::<Bytes>(8);
        let mut a = here.open(frames, true, watch()).unwrap().0;
        let (_tx2, frames) = mpsc::channel::<Bytes>(8);
        let mut b = there.open(frames, true, watch()).unwrap().0;
        let id_of = |event: String| event.lines().next().unwrap().to_owned();
        let (a, b) = (id_of(next(&mut a).await), id_of(next(&mut b).await));
        assert_ne!(a, b);
        let a = a.strip_prefix("id: ").unwrap();
        assert!(
            matches!(there.resume(a, watch()), Err(ResumeError::Gone(_))),
            "{a}"
        );
        assert!(here.resume(a, watch()).is_ok());
    }

    /// Many sessions' unread streams keep no more than their common budget: past it, events
    /// are sent but not kept, and resuming before them says so.
    #[tokio::test]
    async fn every_sessions_streams_stay_within_their_common_budget() {
        static SMALL: Budget = Budget::new(64 * 1024);
        let frame = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(4000)));
        let mut held = Vec::new();
        for _ in 0..4 {
            let streams = Streams::numbered_after(&SMALL, 0);
            let (tx, frames) = mpsc::channel(8);
            drop(streams.open(frames, false, watch()).unwrap()); // nobody reads
            for _ in 0..40 {
                tx.send(frame.clone()).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                SMALL.kept.load(Ordering::Relaxed) <= SMALL.limit,
                "{} bytes kept",
                SMALL.kept.load(Ordering::Relaxed)
            );
            held.push((streams, tx));
        }
        // The last session's early events were not kept.
        let (last, _) = held.last().unwrap();
        assert!(matches!(
            last.resume("1.1", watch()),
            Err(ResumeError::Truncated(_))
        ));
        // Sessions that end give their bytes back.
        drop(held);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(SMALL.kept.load(Ordering::Relaxed), 0);
    }

    /// One principal whose sessions' streams go unread keeps no more than its share of the
    /// common budget: another principal's stream is kept whole, and can be resumed.
    #[tokio::test]
    async fn one_principals_unread_streams_leave_the_others_room() {
        static SMALL: Budget = Budget::new(64 * 1024);
        let frame = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1000)));
        let greedy: Arc<str> = Arc::from("greedy");
        let mut held = Vec::new();
        for _ in 0..8 {
            let streams = Streams::numbered_after(&SMALL, 0).with_principal(Some(&greedy));
            let (tx, frames) = mpsc::channel(8);
            drop(streams.open(frames, false, watch()).unwrap()); // nobody reads
            for _ in 0..40 {
                tx.send(frame.clone()).await.unwrap();
            }
            drop(tx);
            eventually_finished(&streams).await;
            held.push(streams);
        }
        let other = Streams::numbered_after(&SMALL, 0).with_principal(Some(&Arc::from("other")));
        let (tx, frames) = mpsc::channel(8);
        drop(other.open(frames, false, watch()).unwrap());
        for _ in 0..6 {
            tx.send(frame.clone()).await.unwrap();
        }
        drop(tx);
        eventually_finished(&other).await;
        let (mut rx, _) = other
            .resume("1.0", watch())
            .expect("the other's stream is kept");
        for n in 1..=6 {
            assert!(next(&mut rx).await.starts_with(&format!("id: 1.{n}\n")));
        }
        // Its streams keep no more than its share, their newest events included.
        let greedy_kept = SMALL.principal(&greedy).load(Ordering::Relaxed);
        assert!(
            greedy_kept <= SMALL.limit / PRINCIPAL_SHARE,
            "{greedy_kept}"
        );
        // The principals' counts go with their last session.
        drop((held, other));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(SMALL.kept.load(Ordering::Relaxed), 0);
        assert!(
            !SMALL.principals.held(&greedy),
            "greedy's count is gone with its sessions"
        );
    }

    /// Streams of one event each, left unread, keep no more than the session's bound and the
    /// principal's share: a newest event is not kept past them (64 streams of one 4 MiB event
    /// each held a whole common budget).
    #[tokio::test]
    async fn streams_of_one_large_event_each_stay_within_the_bounds() {
        static SMALL: Budget = Budget::new(64 * 1024);
        let frame = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(7_500)));
        let greedy: Arc<str> = Arc::from("greedy");
        let streams = Streams::numbered_after(&SMALL, 0).with_principal(Some(&greedy));
        let mut senders = Vec::new();
        for _ in 0..9 {
            let (tx, frames) = mpsc::channel(8);
            drop(streams.open(frames, false, watch()).unwrap()); // nobody reads
            tx.send(frame.clone()).await.unwrap();
            senders.push(tx);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kept = SMALL.principal(&greedy).load(Ordering::Relaxed);
        assert!(kept <= SMALL.limit / PRINCIPAL_SHARE, "{kept}");
        // Another principal's stream is kept whole.
        let other = Streams::numbered_after(&SMALL, 0).with_principal(Some(&Arc::from("other")));
        let (tx, frames) = mpsc::channel(8);
        drop(other.open(frames, false, watch()).unwrap());
        for _ in 0..2 {
            tx.send(Bytes::from_static(b"{\"small\":1}")).await.unwrap();
        }
        drop(tx);
        eventually_finished(&other).await;
        let (mut rx, _) = other.resume("1.0", watch()).expect("kept");
        assert!(next(&mut rx).await.starts_with("id: 1.1\n"));

        // One session's streams, whatever their principal: no more than SESSION_BYTES.
        let one = from_one();
        let big = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20)));
        let mut senders = Vec::new();
        for _ in 0..24 {
            let (tx, frames) = mpsc::channel(8);
            drop(one.open(frames, false, watch()).unwrap());
            // The first finds the reader gone; the next is kept as for an unread stream.
            tx.send(Bytes::from_static(b"{}")).await.unwrap();
            tx.send(big.clone()).await.unwrap();
            senders.push(tx);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let kept = one.kept.load(Ordering::Relaxed);
        assert!(kept <= SESSION_BYTES, "{kept}");
        assert!(
            kept >= SESSION_BYTES / 2,
            "still kept up to the bound: {kept}"
        );
    }

    /// Waits until the first stream of `streams` has recorded its end.
    async fn eventually_finished(streams: &Streams) {
        for _ in 0..500 {
            let log = lock(&streams.inner).logs.get(&1).cloned();
            if log.is_some_and(|l| lock(&l.state).finished) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the stream did not finish");
    }

    async fn next(rx: &mut mpsc::Receiver<Bytes>) -> String {
        let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("the stream is open");
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_stream_is_primed_numbered_and_resumed_after_the_last_seen_event() {
        let streams = from_one();
        let (tx, frames) = mpsc::channel(8);
        let mut first = streams.open(frames, true, watch()).unwrap().0;
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
        let mut again = streams.resume("1.1", watch()).unwrap().0;
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
        let mut late = streams.resume("1.3", watch()).unwrap().0;
        assert!(next(&mut late).await.starts_with("id: 1.4\n"));
        assert!(late.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_stalled_connection_does_not_hold_up_the_client_that_resumes() {
        let streams = from_one();
        let (tx, frames) = mpsc::channel(8);
        // The first connection is never read again (half-open): its queue fills up.
        let stalled = streams.open(frames, false, watch()).unwrap();
        for i in 0..CLIENT_QUEUE + 8 {
            tx.send(Bytes::from(format!("{{\"n\":{i}}}")))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stalled.1.is_ended());
        // The last event the broken connection delivered lies within the tail kept.
        let mut resumed = streams.resume("1.10", watch()).unwrap().0;
        assert!(stalled.1.is_ended(), "the connection taken over is let go");
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

    /// A finished stream's replay that its client does not read is let go once the reader
    /// took nothing for the stall timeout, and counted.
    #[tokio::test(start_paused = true)]
    async fn a_replay_nobody_reads_is_let_go() {
        let streams = from_one();
        let (tx, frames) = mpsc::channel(8);
        drop(streams.open(frames, false, watch()).unwrap());
        tx.send(Bytes::from_static(b"{}")).await.unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let counted = Counter::default();
        let stall = Duration::from_secs(1);
        let watch = ReaderWatch {
            stall,
            stalled: counted.clone(),
        };
        let (_events, uptake) = streams.resume("1.0", watch).unwrap();
        tokio::time::sleep(stall * 2 + Duration::from_millis(10)).await;
        assert!(uptake.is_ended());
        assert_eq!(counted.get(), 1);
    }

    #[tokio::test]
    async fn ids_from_elsewhere_are_refused_by_kind() {
        let streams = from_one();
        let (_tx, frames) = mpsc::channel(8);
        let _rx = streams.open(frames, true, watch()).unwrap();
        for bad in ["", "7", "x.1", "1.x", "1.5", "-1.0"] {
            assert!(
                matches!(streams.resume(bad, watch()), Err(ResumeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            streams.resume("9.0", watch()),
            Err(ResumeError::Gone(_))
        ));
        assert!(streams.resume("1.0", watch()).is_ok());
    }

    #[tokio::test]
    async fn a_long_stream_keeps_only_its_newest_events() {
        let streams = from_one();
        let (tx, frames) = mpsc::channel(8);
        let rx = streams.open(frames, true, watch()).unwrap();
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
            streams.resume("1.3", watch()),
            Err(ResumeError::Truncated(_))
        ));
        let mut tail = streams
            .resume(&format!("1.{}", MAX_EVENTS), watch())
            .unwrap()
            .0;
        assert!(
            next(&mut tail)
                .await
                .starts_with(&format!("id: 1.{}\n", MAX_EVENTS + 1))
        );
    }

    #[tokio::test]
    async fn a_session_holds_a_bounded_number_of_live_streams() {
        let streams = from_one();
        let mut senders = Vec::new();
        for _ in 0..MAX_STREAMS {
            let (tx, frames) = mpsc::channel(1);
            senders.push(tx);
            streams.open(frames, true, watch()).unwrap();
        }
        // One more is sent as it comes, without a record.
        let (_tx, frames) = mpsc::channel(1);
        assert!(streams.open(frames, true, watch()).is_err());
        // One finishes: its place can be taken.
        drop(senders.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_tx, frames) = mpsc::channel(1);
        assert!(streams.open(frames, true, watch()).is_ok());
    }
}
