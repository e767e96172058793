//! Bytes of what servers said that a session's queues hold for clients that have not read it
//! yet (its GET stream, a call's stream, the policy stage's queue): bounded per session and in
//! all. A queue's own bound counts messages, and a message may be up to 1 MiB (a question
//! 4 MiB): a server speaking to clients that do not read could otherwise make each session's
//! queues hold hundreds of megabytes. One principal's sessions together hold at most an eighth
//! of what all may, so that one caller's unread streams leave every other caller room. Small
//! frames go uncounted: their queues' message bounds keep them small.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
static ALL_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// What each principal's sessions' queues hold.
static PRINCIPALS: PrincipalCounts = PrincipalCounts::new();

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
        (every, all): (&'static AtomicUsize, usize),
    ) -> Option<Bytes> {
        let len = frame.len();
        if len < COUNTED_FROM {
            return Some(frame);
        }
        let counters = [
            Some((&*self.held, session)),
            self.principal
                .as_deref()
                .map(|p| (p, all / PRINCIPAL_SHARE)),
            Some((every, all)),
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
                return None;
            }
        }
        Some(Bytes::from_owner(Counted {
            frame,
            held: self.held.clone(),
            principal: self.principal.clone(),
            every,
        }))
    }

    /// Bytes the session's queues hold of counted frames now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
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
    every: &'static AtomicUsize,
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

    static UNBOUNDED: AtomicUsize = AtomicUsize::new(0);

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

    /// One principal's sessions hold at most their share of what all may; another principal's
    /// session still has room, and what a refusal had taken is given back.
    #[test]
    fn one_principals_sessions_leave_the_others_room() {
        static EVERY: AtomicUsize = AtomicUsize::new(0);
        // (Names no other test gives: the principals' counts are the process's.)
        let (greedy, other): (Arc<str>, Arc<str>) = (
            Arc::from("queued-bytes-test-greedy"),
            Arc::from("queued-bytes-test-other"),
        );
        let frame = Bytes::from(vec![b'x'; 10_000]);
        // All may hold 80,000: a principal 10,000, each session 50,000.
        let (session, all) = (50_000, (&EVERY, 80_000));
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
