//! Bytes of what servers said that a session's queues hold for clients that have not read it
//! yet (its GET stream, a call's stream, the policy stage's queue): bounded per session and in
//! all. A queue's own bound counts messages, and a message may be up to 1 MiB (a question
//! 4 MiB): a server speaking to clients that do not read could otherwise make each session's
//! queues hold hundreds of megabytes. Small frames go uncounted: their queues' message bounds
//! keep them small.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Frames shorter than this are not counted (a queue of 256 of them holds at most 1 MiB).
const COUNTED_FROM: usize = 4096;

/// Bytes one session's queues may hold of counted frames.
const SESSION_BYTES: usize = 16 << 20;

/// Bytes every session's queues may hold of counted frames together.
const ALL_SESSIONS_BYTES: usize = 256 << 20;

/// What every session's queues hold.
static ALL_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// What one session's queues hold.
#[derive(Default)]
pub struct QueuedBytes {
    held: Arc<AtomicUsize>,
}

impl QueuedBytes {
    /// `frame`, counted in what the session's queues hold until every copy of it is gone, or
    /// `None` when there is no room for it (the caller drops it, or refuses it to its server).
    pub fn admit(&self, frame: Bytes) -> Option<Bytes> {
        self.admit_within(frame, SESSION_BYTES, ALL_SESSIONS_BYTES)
    }

    fn admit_within(&self, frame: Bytes, session: usize, all: usize) -> Option<Bytes> {
        let len = frame.len();
        if len < COUNTED_FROM {
            return Some(frame);
        }
        if !reserve(&self.held, len, session) {
            return None;
        }
        if !reserve(&ALL_SESSIONS, len, all) {
            self.held.fetch_sub(len, Ordering::Relaxed);
            return None;
        }
        Some(Bytes::from_owner(Counted {
            frame,
            held: self.held.clone(),
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
        ALL_SESSIONS.fetch_sub(len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_until_their_last_copy_goes_and_refused_past_the_bound() {
        let q = QueuedBytes::default();
        let big = Bytes::from(vec![b'x'; 10_000]);
        let small = Bytes::from_static(b"{\"jsonrpc\":\"2.0\"}");
        // Small frames are not counted, whatever their number.
        for _ in 0..1000 {
            assert!(q.admit_within(small.clone(), 25_000, usize::MAX).is_some());
        }
        assert_eq!(q.held(), 0);
        let first = q.admit_within(big.clone(), 25_000, usize::MAX).unwrap();
        let second = q.admit_within(big.clone(), 25_000, usize::MAX).unwrap();
        assert_eq!(&first[..], &big[..]);
        assert_eq!(q.held(), 20_000);
        assert!(
            q.admit_within(big.clone(), 25_000, usize::MAX).is_none(),
            "past the bound"
        );
        assert_eq!(q.held(), 20_000, "a refused frame is not counted");
        // A copy keeps it counted; the last one gives it back.
        let copy = first.clone();
        drop(first);
        assert_eq!(q.held(), 20_000);
        drop(copy);
        assert_eq!(q.held(), 10_000);
        assert!(q.admit_within(big, 25_000, usize::MAX).is_some());
        drop(second);
    }
}
