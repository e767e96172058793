//! Bytes of what servers said that a session's queues hold for clients that have not read it
//! yet (its GET stream, a call's stream, the policy stage's queue): bounded per session and in
//! all. A queue's own bound counts messages, and a message may be up to 1 MiB (a question
//! 4 MiB): a server speaking to clients that do not read could otherwise make each session's
//! queues hold hundreds of megabytes. One principal's sessions together hold at most an eighth
//! of what all may, so that one caller's unread streams leave every other caller room. Small
//! frames go uncounted: their queues' message bounds keep them small.
//!
//! Answers written as plain JSON (up to 64 MiB each) have a budget of their own
//! ([`AnswerBytes`], `mcp.max_answers_bytes`): hyper holds one until its last byte is written,
//! so a client that asks on many connections and reads nothing would otherwise hold that
//! many.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;

use crate::mcp::principal_counts::PrincipalCounts;

/// Frames shorter than this are not counted (a queue of 256 of them holds at most 1 MiB).
pub const COUNTED_FROM: usize = 4096;

/// Bytes one session's queues may hold of counted frames.
const SESSION_BYTES: usize = 16 << 20;

/// Bytes every session's queues may hold of counted frames together.
const ALL_SESSIONS_BYTES: usize = 256 << 20;

/// What one principal's sessions' queues may hold of what all may.
const PRINCIPAL_SHARE: usize = 8;

/// What every session's queues hold.
static ALL_SESSIONS: LazyLock<Arc<AtomicUsize>> = LazyLock::new(Arc::default);

/// What each principal's sessions' queues hold.
static PRINCIPALS: PrincipalCounts = PrincipalCounts::new();

/// The largest answer a server may give (64 MiB, framed again under its client's id): what a
/// session and a principal may always hold, unless all may hold less.
const LARGEST_ANSWER: usize = (64 << 20) + (64 << 10);

/// What one session's queues hold.
#[derive(Default)]
pub struct QueuedBytes {
    held: Arc<AtomicUsize>,
    /// What its principal's sessions hold (none when unauthenticated).
    principal: Option<Arc<AtomicUsize>>,
}

impl QueuedBytes {
    /// The queues of a session of `principal`.
    pub fn of(principal: Option<&Arc<str>>) -> QueuedBytes {
        QueuedBytes {
            held: Arc::default(),
            principal: principal.map(|p| PRINCIPALS.of(p)),
        }
    }

    /// `frame`, counted in what the session's queues hold until every copy of it is gone, or
    /// `None` when there is no room for it (the caller drops it, or refuses it to its server).
    pub fn admit(&self, frame: Bytes) -> Option<Bytes> {
        self.admit_within(frame, SESSION_BYTES, (&ALL_SESSIONS, ALL_SESSIONS_BYTES))
    }

    /// [`QueuedBytes::admit`] with these bounds: a session's, and what all hold with theirs.
    fn admit_within(
        &self,
        frame: Bytes,
        session: usize,
        (every, all): (&Arc<AtomicUsize>, usize),
    ) -> Option<Bytes> {
        self.admit_bounded(frame, session, all / PRINCIPAL_SHARE, (every, all))
            .ok()
    }

    /// Counts `frame` unless that takes the session past `session`, its principal past
    /// `principal` or everyone past `all`; given back when it does.
    fn admit_bounded(
        &self,
        frame: Bytes,
        session: usize,
        principal: usize,
        (every, all): (&Arc<AtomicUsize>, usize),
    ) -> Result<Bytes, Bytes> {
        let len = frame.len();
        if len < COUNTED_FROM {
            return Ok(frame);
        }
        let counters = [
            Some((&*self.held, session)),
            self.principal.as_deref().map(|p| (p, principal)),
            Some((&**every, all)),
        ];
        for (i, (counter, limit)) in counters
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, (*c)?)))
        {
            if !reserve(counter, len, limit) {
                // Given back where it was taken.
                for (taken, _) in counters[..i].iter().flatten() {
                    taken.fetch_sub(len, Ordering::Relaxed);
                }
                return Err(frame);
            }
        }
        Ok(Bytes::from_owner(Counted {
            frame,
            held: self.held.clone(),
            principal: self.principal.clone(),
            every: every.clone(),
        }))
    }

    /// Bytes the session's queues hold of counted frames now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The room one gateway's answers share on their way to clients that have not taken them
/// yet (`mcp.max_answers_bytes`; apart from the queues'), and what each principal holds of it.
pub struct AnswerRoom {
    all: usize,
    held: Arc<AtomicUsize>,
    principals: PrincipalCounts,
}

impl AnswerRoom {
    /// A room of `all` bytes.
    pub fn new(all: usize) -> Arc<AnswerRoom> {
        Arc::new(AnswerRoom {
            all,
            held: Arc::default(),
            principals: PrincipalCounts::new(),
        })
    }

    /// What one session, and one principal's sessions, may hold: an eighth of all and at
    /// least one largest answer (all of it, when that is less).
    pub fn share(&self) -> usize {
        (self.all / PRINCIPAL_SHARE)
            .max(LARGEST_ANSWER)
            .min(self.all)
    }

    /// Bytes all answers hold now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one session's answers hold of their [`AnswerRoom`].
pub struct AnswerBytes {
    room: Arc<AnswerRoom>,
    held: QueuedBytes,
}

impl AnswerBytes {
    /// The answers of a session of `principal`.
    pub fn of(room: &Arc<AnswerRoom>, principal: Option<&Arc<str>>) -> AnswerBytes {
        AnswerBytes {
            room: room.clone(),
            held: QueuedBytes {
                held: Arc::default(),
                principal: principal.map(|p| room.principals.of(p)),
            },
        }
    }

    /// `answer`, counted until its client has taken it (every copy of it gone), or given back
    /// when there is no room for it in the session's share, its principal's or the room.
    pub fn admit(&self, answer: Bytes) -> Result<Bytes, Bytes> {
        let share = self.room.share();
        self.held
            .admit_bounded(answer, share, share, (&self.room.held, self.room.all))
    }

    /// What the session, and its principal's sessions, may hold.
    pub fn share(&self) -> usize {
        self.room.share()
    }

    /// Bytes the session's answers hold now.
    pub fn held(&self) -> usize {
        self.held.held()
    }
}

/// A session's streams count their events where its answers do: a streamed answer is held
/// as a plain one is.
impl crate::body::ChunkRoom for AnswerBytes {
    fn admit(&self, event: Bytes) -> Result<Bytes, Bytes> {
        AnswerBytes::admit(self, event)
    }
}

impl std::fmt::Debug for AnswerBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerBytes")
            .field("held", &self.held())
            .finish()
    }
}

/// Adds `len` to `counter` unless that takes it past `limit`.
fn reserve(counter: &AtomicUsize, len: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            n.checked_add(len).filter(|total| *total <= limit)
        })
        .is_ok()
}

/// A counted frame: its bytes given back when the last copy goes.
struct Counted {
    frame: Bytes,
    held: Arc<AtomicUsize>,
    principal: Option<Arc<AtomicUsize>>,
    every: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let len = self.frame.len();
        self.held.fetch_sub(len, Ordering::Relaxed);
        if let Some(principal) = &self.principal {
            principal.fetch_sub(len, Ordering::Relaxed);
        }
        self.every.fetch_sub(len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static UNBOUNDED: LazyLock<Arc<AtomicUsize>> = LazyLock::new(Arc::default);

    #[test]
    fn frames_are_counted_until_their_last_copy_goes_and_refused_past_the_bound() {
        let q = QueuedBytes::default();
        let big = Bytes::from(vec![b'x'; 10_000]);
        let small = Bytes::from_static(b"{\"jsonrpc\":\"2.0\"}");
        // Small frames are not counted, whatever their number.
        for _ in 0..1000 {
            assert!(
                q.admit_within(small.clone(), 25_000, (&UNBOUNDED, usize::MAX))
                    .is_some()
            );
        }
        assert_eq!(q.held(), 0);
        let first = q
            .admit_within(big.clone(), 25_000, (&UNBOUNDED, usize::MAX))
            .unwrap();
        let second = q
            .admit_within(big.clone(), 25_000, (&UNBOUNDED, usize::MAX))
            .unwrap();
        assert_eq!(&first[..], &big[..]);
        assert_eq!(q.held(), 20_000);
        assert!(
            q.admit_within(big.clone(), 25_000, (&UNBOUNDED, usize::MAX))
                .is_none(),
            "past the bound"
        );
        assert_eq!(q.held(), 20_000, "a refused frame is not counted");
        // A copy keeps it counted; the last one gives it back.
        let copy = first.clone();
        drop(first);
        assert_eq!(q.held(), 20_000);
        drop(copy);
        assert_eq!(q.held(), 10_000);
        assert!(
            q.admit_within(big, 25_000, (&UNBOUNDED, usize::MAX))
                .is_some()
        );
        drop(second);
    }

    /// Answers have a room of their own (`mcp.max_answers_bytes`): a session may hold an
    /// eighth of it, and at least one largest answer, never more than all; a refused answer
    /// is given back whole, and the queues' room is not touched.
    #[test]
    fn answers_have_a_room_of_their_own() {
        let principal: Arc<str> = Arc::from("alice");
        let room = AnswerRoom::new(2 << 20);
        let answers = AnswerBytes::of(&room, Some(&principal));
        let queues = QueuedBytes::of(Some(&principal));
        let answer = Bytes::from(vec![b'x'; 1 << 20]);
        let first = answers.admit(answer.clone()).unwrap();
        let second = answers.admit(answer.clone()).unwrap();
        assert_eq!((answers.held(), room.held()), (2 << 20, 2 << 20));
        let refused = answers.admit(answer.clone()).unwrap_err();
        assert_eq!(refused, answer);
        assert_eq!(room.held(), 2 << 20, "a refused answer is not counted");
        assert_eq!(queues.held(), 0);
        assert!(queues.admit(answer.clone()).is_some());
        drop(first);
        assert!(answers.admit(answer.clone()).is_ok());
        drop(second);
        assert_eq!(room.held(), 0);
        // A room of 1 GiB: a session's share is 128 MiB, and another principal has its own.
        let room = AnswerRoom::new(1 << 30);
        let greedy = AnswerBytes::of(&room, Some(&principal));
        let other = AnswerBytes::of(&room, Some(&Arc::from("bob")));
        let large = Bytes::from(vec![b'y'; 100 << 20]);
        let kept = greedy.admit(large.clone()).unwrap();
        assert!(greedy.admit(large.clone()).is_err());
        assert!(
            AnswerBytes::of(&room, Some(&principal))
                .admit(large.clone())
                .is_err()
        );
        let others = other.admit(large).unwrap();
        drop((kept, others));
        assert_eq!(room.held(), 0);
        // One smaller than the largest answer: a session may hold all of it.
        assert_eq!(AnswerRoom::new(1 << 20).share(), 1 << 20);
        assert_eq!(AnswerRoom::new(256 << 20).share(), LARGEST_ANSWER);
    }

    /// One principal's sessions hold at most their share of what all may; another principal's
    /// session still has room, and what a refusal had taken is given back.
    #[test]
    fn one_principals_sessions_leave_the_others_room() {
        let every = Arc::new(AtomicUsize::new(0));
        // (Names no other test gives: the principals' counts are the process's.)
        let (greedy, other): (Arc<str>, Arc<str>) = (
            Arc::from("queued-bytes-test-greedy"),
            Arc::from("queued-bytes-test-other"),
        );
        let frame = Bytes::from(vec![b'x'; 10_000]);
        // All may hold 80,000: a principal 10,000, each session 50,000.
        let (session, all) = (50_000, (&every, 80_000));
        let a = QueuedBytes::of(Some(&greedy));
        let b = QueuedBytes::of(Some(&greedy));
        let kept = a.admit_within(frame.clone(), session, all).unwrap();
        assert!(
            b.admit_within(frame.clone(), session, all).is_none(),
            "past the principal's share, in another of its sessions"
        );
        assert_eq!(b.held(), 0, "the refused frame's session count given back");
        let c = QueuedBytes::of(Some(&other));
        let theirs = c.admit_within(frame.clone(), session, all).unwrap();
        // Unauthenticated sessions share no principal's count.
        let anonymous = QueuedBytes::of(None);
        let more = anonymous.admit_within(frame.clone(), session, all).unwrap();
        drop(kept);
        assert!(b.admit_within(frame, session, all).is_some(), "room again");
        drop((theirs, more));
    }
}
