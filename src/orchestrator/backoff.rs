//! Capped exponential backoff with jitter, reset after a stable run.

use std::time::Duration;

/// Restart delays: `initial`, doubling up to `max`, with ±`jitter` spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Multiplier between consecutive delays.
    pub factor: f64,
    /// Random spread as a fraction of the delay (0.0 to 1.0).
    pub jitter: f64,
    /// A run at least this long resets the delay to `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: 0.1,
            reset_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Delay before restart number `attempt` (0-based), without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self.factor.max(1.0).powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// Delay before restart number `attempt`, with jitter drawn from `unit` in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let spread = self.jitter.clamp(0.0, 1.0) * base;
        let d = base - spread + 2.0 * spread * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(d.clamp(0.0, self.max.as_secs_f64()))
    }
}

/// A uniform random number in [0, 1) from the OS.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..Backoff::default()
        };
        let delays: Vec<u128> = (0..6).map(|a| b.base_delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.base_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(450));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(550));
        let r = random_unit();
        assert!((0.0..1.0).contains(&r));
    }
}
