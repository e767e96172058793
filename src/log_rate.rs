//! Log lines a peer can cause one per message it sends (a server's junk on stdout, a malformed
//! event, a message dropped for a full queue): at most a few a second of each kind, and the
//! number held back told with the next one logged, so that a peer cannot flood the log (its
//! disk, its collector, the gateway's time spent writing it) by sending junk fast.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of line may be logged.
pub struct LogRate {
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    logged: u32,
    held_back: u64,
}

impl LogRate {
    /// At most `per_second` lines a second.
    pub const fn new(per_second: u32) -> LogRate {
        LogRate {
            per_second,
            window: Mutex::new(Window {
                started: None,
                logged: 0,
                held_back: 0,
            }),
        }
    }

    /// Whether to log one more line now: `Some(n)` with the number of lines held back since
    /// the last one logged (to be told with it), `None` to hold this one back.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// The number of lines held back since the last one logged, to be told now (a stream
    /// ends, and no next line will tell it).
    pub fn take_held_back(&self) -> u64 {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut w.held_back)
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.started
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged >= self.per_second {
            w.held_back += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.held_back))
    }
}

/// `" (N more like it not logged)"` for `n` lines held back, else nothing: the tail of the
/// line logged after them.
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it not logged: over the rate)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_rate_lines_are_held_back_and_counted_for_the_next_second() {
        let rate = LogRate::new(3);
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..10).map(|_| rate.admit_at(t0)).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // Still within the second: held back.
        assert_eq!(rate.admit_at(t0 + Duration::from_millis(999)), None);
        // The next second's first line tells the eight held back; the next tells none.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(rate.admit_at(t1), Some(8));
        assert_eq!(rate.admit_at(t1), Some(0));
        // What is held back when the stream ends is told then, once.
        let t2 = t1 + Duration::from_millis(10);
        assert_eq!(rate.admit_at(t2), Some(0));
        assert_eq!(rate.admit_at(t2), None);
        assert_eq!(rate.take_held_back(), 1);
        assert_eq!(rate.take_held_back(), 0);
        assert_eq!(held_back(8), " (8 more like it not logged: over the rate)");
        assert_eq!(held_back(0), "");
    }
}
