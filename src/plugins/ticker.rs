//! The epoch ticker: what bounds a running guest's time. It advances the engine's epoch every
//! tick while guest code may run, and sleeps once none has for a while, so that an idle
//! gateway with plugins configured is not woken a thousand times a second.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::Engine;

/// Ticks without guest code running after which the ticker sleeps.
const IDLE_TICKS_BEFORE_SLEEP: u32 = 100;

/// Advances an engine's epoch while guest code may run.
pub(crate) struct Ticker {
    /// Guest calls (and instantiations) under way.
    running: AtomicUsize,
    /// Set by the ticker just before it sleeps.
    asleep: AtomicBool,
    /// The ticker's thread, to wake it.
    thread: OnceLock<Thread>,
    /// Ticks so far (for tests).
    ticks: AtomicU64,
}

/// Guest code may run while this lives: the ticker is awake.
pub(crate) struct Running<'a>(&'a Ticker);

impl Ticker {
    /// Starts a ticker thread for `engine`, ticking every `tick`. It lives as long as the
    /// process. Without it no deadline would ever stop a guest, so failing to start it is an
    /// error, not a warning.
    pub(crate) fn start(engine: Engine, tick: Duration) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker {
            running: AtomicUsize::new(0),
            asleep: AtomicBool::new(false),
            thread: OnceLock::new(),
            ticks: AtomicU64::new(0),
        });
        let shared = ticker.clone();
        std::thread::Builder::new()
            .name("gatehouse-wasm-epoch".into())
            .spawn(move || shared.run(&engine, tick))?;
        Ok(ticker)
    }

    fn run(&self, engine: &Engine, tick: Duration) {
        // Set before the first sleep can happen, so a caller that sees `asleep` can wake it.
        self.thread.get_or_init(std::thread::current);
        let mut idle = 0;
        loop {
            std::thread::sleep(tick);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
            if self.running.load(Ordering::SeqCst) > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS_BEFORE_SLEEP {
                continue;
            }
            // With `enter`, a store-then-load on each side (SeqCst): either this sees the new
            // call, or the call sees `asleep` and wakes this (an unpark before the park makes
            // the park return at once). No guest runs without the ticker.
            self.asleep.store(true, Ordering::SeqCst);
            if self.running.load(Ordering::SeqCst) == 0 {
                std::thread::park();
            }
            self.asleep.store(false, Ordering::SeqCst);
            idle = 0;
        }
    }

    /// Marks guest code as about to run until the guard drops, waking the ticker if it sleeps.
    pub(crate) fn enter(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Running(self)
    }

    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits up to 5 s for `cond`.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_ticker_sleeps_when_idle_and_wakes_for_a_call() {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).unwrap();
        let ticker = Ticker::start(engine, Duration::from_micros(200)).unwrap();
        eventually("asleep after idle ticks", || {
            ticker.asleep.load(Ordering::SeqCst)
        });
        let slept_at = ticker.ticks();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ticker.ticks(), slept_at, "no ticks while asleep");
        {
            let _running = ticker.enter();
            eventually("ticking again for a call", || ticker.ticks() > slept_at + 3);
            // While a call runs it never sleeps, however long the call.
            std::thread::sleep(Duration::from_millis(40));
            assert!(!ticker.asleep.load(Ordering::SeqCst));
        }
        eventually("asleep again once the call ended", || {
            ticker.asleep.load(Ordering::SeqCst)
        });
        // A call after each fall asleep, some as it falls asleep: each one sees it tick. (A
        // smoke test of the handshake: the window it aims at is nanoseconds wide.)
        for i in 0..40 {
            if i % 2 == 0 {
                eventually("asleep", || ticker.asleep.load(Ordering::SeqCst));
            } else {
                std::thread::sleep(Duration::from_micros(200 * 99));
            }
            let before = ticker.ticks();
            let _running = ticker.enter();
            eventually("a tick for every call", || ticker.ticks() > before);
        }
    }
}
