//! A session's walks of its servers' resource lists, which tell the router which server serves
//! a URI, and the servers a walk could not hear to the end (down, slow, or listing without
//! end): the session's reads do not wait for another walk of those for a while. Otherwise a
//! server that never finishes its list would make every read, of any server's resource, wait
//! for a walk of it. Kept per session: a server one caller cannot reach (its credentials, its
//! connection) may well answer another, whose own walk must hear it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a first unfinished walk excuses a server; each one after an excuse ran out
/// doubles it.
const FIRST_EXCUSE: Duration = Duration::from_secs(2);

/// Longest excuse: how long a server that was down at a walk may go unheard at most.
const LONGEST_EXCUSE: Duration = Duration::from_secs(64);

/// One session's resource walks.
pub struct ResourceWalks {
    /// When a walk last ran; held while one runs, so that one runs at a time.
    last: tokio::sync::Mutex<Option<Instant>>,
    /// What [`Excuse::until_ms`] counts from.
    started: Instant,
    /// Per server, as the topology orders them.
    excuses: Box<[Excuse]>,
}

#[derive(Default)]
struct Excuse {
    /// Walks that could not hear it, each after the excuse of the one before ran out.
    misses: AtomicU32,
    /// Until when (milliseconds from [`ResourceWalks::started`]) reads do not wait for it.
    until_ms: AtomicU64,
}

impl ResourceWalks {
    /// The walks of a session with `servers` upstreams.
    pub fn new(servers: usize) -> ResourceWalks {
        ResourceWalks {
            last: tokio::sync::Mutex::new(None),
            started: Instant::now(),
            excuses: (0..servers).map(|_| Excuse::default()).collect(),
        }
    }

    /// Waits for any walk running, and holds off others: when the last walk ran.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<Instant>> {
        self.last.lock().await
    }

    /// Whether reads go on without hearing server `index` first (a walk could not, a short
    /// while ago).
    pub fn excused(&self, index: usize) -> bool {
        self.excuses
            .get(index)
            .is_some_and(|e| e.until_ms.load(Ordering::Relaxed) > self.now_ms())
    }

    /// After a walk: each server `unheard` says it could not hear to the end is excused, for
    /// twice as long as the last time if that excuse had run out (a walk while it holds, for
    /// a URI nobody claims, changes nothing).
    pub fn walked(&self, unheard: impl Fn(usize) -> bool) {
        let now = self.now_ms();
        for (i, excuse) in self.excuses.iter().enumerate() {
            if !unheard(i) || excuse.until_ms.load(Ordering::Relaxed) > now {
                continue;
            }
            let misses = excuse.misses.fetch_add(1, Ordering::Relaxed).min(16);
            let excuse_for = FIRST_EXCUSE.saturating_mul(1 << misses).min(LONGEST_EXCUSE);
            excuse
                .until_ms
                .store(now + excuse_for.as_millis() as u64, Ordering::Relaxed);
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long server `i` is still excused, in milliseconds.
    fn excused_for(w: &ResourceWalks, i: usize) -> u64 {
        w.excuses[i]
            .until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(w.now_ms())
    }

    /// Has the excuse of server `i` run out (as time passing would).
    fn run_out(w: &ResourceWalks, i: usize) {
        w.excuses[i].until_ms.store(0, Ordering::Relaxed);
    }

    #[test]
    fn an_unheard_server_is_excused_twice_as_long_each_time_up_to_the_longest() {
        let w = ResourceWalks::new(2);
        assert!(!w.excused(0) && !w.excused(1));
        w.walked(|i| i == 0);
        assert!(w.excused(0) && !w.excused(1), "only the server not heard");
        assert!((1000..=2000).contains(&excused_for(&w, 0)));
        // Walks while the excuse holds (for URIs nobody claims) do not lengthen it.
        for _ in 0..5 {
            w.walked(|i| i == 0);
        }
        assert!((1000..=2000).contains(&excused_for(&w, 0)));
        run_out(&w, 0);
        assert!(!w.excused(0), "a read waits for a walk again");
        w.walked(|i| i == 0);
        assert!((3000..=4000).contains(&excused_for(&w, 0)));
        for _ in 0..10 {
            run_out(&w, 0);
            w.walked(|i| i == 0);
        }
        assert!((63_000..=64_000).contains(&excused_for(&w, 0)));
        // Out-of-range servers are never excused.
        assert!(!w.excused(7));
    }
}
