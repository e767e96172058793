//! Idle servers stop and wake on the next call.
//!
//! A server whose definition says `idle: {after: 15m}` (or that gets the operator's default)
//! has a [`Usage`]: the gateway marks each call through it ([`Usage::begin`]), and
//! [`sweep`] asks the runtime to put a server to sleep ([`super::Runtime::sleep`]) once no
//! call has been in flight for that long. The next [`super::Runtime::wait_ready`] wakes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Phase, Runtime};

/// Shortest idle time a definition may ask for.
pub const MIN_AFTER: Duration = Duration::from_secs(1);
/// Longest idle time a definition may ask for.
pub const MAX_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Environment variable: how long servers whose definition says nothing stay unused before
/// they sleep (`15m`, `1h`; unset or `never`: they do not).
pub const ENV_IDLE_AFTER: &str = "GATEHOUSE_ORCHESTRATOR_IDLE_AFTER";

/// The operator's default idle time, read through `getenv`.
pub fn default_after(getenv: impl Fn(&str) -> Option<String>) -> Result<Option<Duration>, String> {
    match getenv(ENV_IDLE_AFTER).filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => IdleSpec { after: v }
            .after()
            .map_err(|e| format!("{ENV_IDLE_AFTER}: {e}")),
    }
}

/// The idle time of a server: its definition's, else the operator's default; never for a
/// remote server (nothing of it runs here to stop).
pub fn after_of(spec: &super::McpServerSpec, default: Option<Duration>) -> Option<Duration> {
    if spec.remote.is_some() {
        return None;
    }
    match &spec.idle {
        Some(idle) => idle.after().ok().flatten(),
        None => default,
    }
}

/// A fingerprint of a server's definition (in memory only: it tells one from the next).
pub fn fingerprint(spec: &super::McpServerSpec) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let text = serde_json::to_vec(spec).unwrap_or_default();
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(text)
}

/// When a server sleeps (the `idle` field of a definition).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdleSpec {
    /// Stop the server once no call has used it for this long (`15m`, `1h`), or `never`
    /// (the operator's default does not apply).
    pub after: String,
}

impl IdleSpec {
    /// The idle time, `None` for `never`; the error says what is wrong with `after`.
    pub fn after(&self) -> Result<Option<Duration>, String> {
        if self.after.trim() == "never" {
            return Ok(None);
        }
        let d = humantime::parse_duration(self.after.trim()).map_err(|e| {
            format!(
                "{:?} is not a duration ({e}); say 15m, 1h or never",
                self.after
            )
        })?;
        if !(MIN_AFTER..=MAX_AFTER).contains(&d) {
            return Err(format!(
                "{:?} is out of range: from {} to {}",
                self.after,
                humantime::format_duration(MIN_AFTER),
                humantime::format_duration(MAX_AFTER)
            ));
        }
        Ok(Some(d))
    }
}

/// How one idle-capable server is used: calls in flight, the last one's end, and whether
/// the runtime has put it to sleep.
#[derive(Debug)]
pub struct Usage {
    /// Unique to this definition of the server: what was learnt of an earlier one (its
    /// lists) is not this one's.
    id: u64,
    /// Fingerprint of the definition it follows.
    definition: u64,
    after: Duration,
    epoch: Instant,
    last_used_ms: AtomicU64,
    /// Calls in flight, and [`ASLEEP`]: one word, so that a call beginning and the server
    /// being put to sleep cannot both win.
    state: AtomicU64,
    /// Whether the server was stopped for the current sleep (a sleep asked for and then
    /// called off before the process stopped does not count).
    stopped: AtomicBool,
    wakes: AtomicU64,
    sleeps: AtomicU64,
    /// Times the way to the server changed without a sleep (see [`Usage::reroute`]).
    reroutes: AtomicU64,
    slept_ms: AtomicU64,
    asleep_since_ms: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The bit of [`Usage::state`] that says calls must wake the server before using it.
const ASLEEP: u64 = 1 << 63;

/// A call in flight through a server; dropping it marks the server used now.
#[derive(Debug)]
pub struct InUse(Arc<Usage>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.state.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Usage {
    /// A server (of definition fingerprint `definition`) that sleeps after `after` without
    /// a call.
    pub fn new(after: Duration, definition: u64) -> Arc<Self> {
        Arc::new(Usage {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            definition,
            after,
            epoch: Instant::now(),
            last_used_ms: AtomicU64::new(0),
            state: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            reroutes: AtomicU64::new(0),
            slept_ms: AtomicU64::new(0),
            asleep_since_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_used_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Marks a call through the server until the guard drops. A call that began before
    /// [`Usage::try_sleep`] keeps the server awake; one that began after finds it asleep
    /// ([`Usage::is_asleep`]) and goes through the runtime, which wakes it.
    pub fn begin(self: &Arc<Self>) -> InUse {
        self.state.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InUse(self.clone())
    }

    /// How long the server may stay unused before it sleeps.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Unique to this usage (a new definition of the server gets a new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The fingerprint of the definition it follows.
    pub fn definition(&self) -> u64 {
        self.definition
    }

    /// Times it fell asleep.
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Acquire)
    }

    /// Changes with each sleep and each [`Usage::reroute`]: a connection made under another
    /// epoch is to a stopped server, or goes a way that no longer sees every use.
    pub fn epoch(&self) -> u64 {
        self.sleeps
            .load(Ordering::Acquire)
            .wrapping_add(self.reroutes.load(Ordering::Acquire))
    }

    /// The way calls reach the server changed (the replica that sees every use of it is
    /// another): connections made before are dropped, and the next ones go the new way.
    pub fn reroute(&self) {
        self.reroutes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether it has gone unused for `after`, with no call in flight.
    pub fn is_idle(&self) -> bool {
        self.state.load(Ordering::Acquire) & !ASLEEP == 0
            && self
                .now_ms()
                .saturating_sub(self.last_used_ms.load(Ordering::Acquire))
                >= u64::try_from(self.after.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the runtime has put it to sleep, or is putting it, and has not woken it
    /// since: a call must go through [`super::Runtime::wait_ready`].
    pub fn is_asleep(&self) -> bool {
        self.state.load(Ordering::Acquire) & ASLEEP != 0
    }

    /// Whether its process (or pod) is stopped for a sleep: what the `asleep` gauge shows.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Marks it asleep if it is idle and no call is in flight; false if a call holds it
    /// (called by the backend before it stops the server).
    pub fn try_sleep(&self) -> bool {
        self.is_idle()
            && self
                .state
                .compare_exchange(0, ASLEEP, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The runtime stopped the server (called by the backend).
    pub fn fell_asleep(&self) {
        self.state.fetch_or(ASLEEP, Ordering::AcqRel);
        if !self.stopped.swap(true, Ordering::AcqRel) {
            self.asleep_since_ms.store(self.now_ms(), Ordering::Release);
            self.sleeps.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The runtime is starting the server again (called by the backend); the wake counts
    /// as a use, so the server is not put back to sleep before the waker's call.
    pub fn woke(&self) {
        self.touch();
        self.state.fetch_and(!ASLEEP, Ordering::AcqRel);
        if self.stopped.swap(false, Ordering::AcqRel) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            let slept = self
                .now_ms()
                .saturating_sub(self.asleep_since_ms.load(Ordering::Acquire));
            self.slept_ms.fetch_add(slept, Ordering::Relaxed);
        }
    }

    /// Wakes so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Time spent asleep so far, including the current sleep.
    pub fn time_asleep(&self) -> Duration {
        let mut ms = self.slept_ms.load(Ordering::Relaxed);
        if self.stopped.load(Ordering::Acquire) {
            ms += self
                .now_ms()
                .saturating_sub(self.asleep_since_ms.load(Ordering::Acquire));
        }
        Duration::from_millis(ms)
    }
}

/// Puts idle servers to sleep, checking every `tick`, until the runtime is dropped.
pub async fn sweep(runtime: std::sync::Weak<dyn Runtime>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(runtime) = runtime.upgrade() else {
            return;
        };
        for (name, status) in runtime.list().await {
            let idle = runtime.usage(&name).is_some_and(|u| u.is_idle());
            if idle && status.phase == Phase::Ready {
                tracing::info!(server = %name, "idle: stopping it until the next call");
                if let Err(e) = runtime.sleep(&name).await {
                    tracing::warn!(server = %name, "putting an idle server to sleep: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_after_and_refuses_what_is_out_of_range() {
        let spec = |s: &str| IdleSpec { after: s.into() };
        assert_eq!(spec("15m").after(), Ok(Some(Duration::from_secs(900))));
        assert_eq!(spec("never").after(), Ok(None));
        assert!(spec("0s").after().unwrap_err().contains("out of range"));
        assert!(spec("400d").after().unwrap_err().contains("out of range"));
        assert!(spec("soon").after().unwrap_err().contains("not a duration"));
    }

    #[test]
    fn a_call_in_flight_keeps_a_server_awake() {
        let u = Usage::new(Duration::from_millis(0), 7);
        assert_eq!(u.definition(), 7);
        assert_ne!(u.id(), Usage::new(Duration::ZERO, 7).id());
        let call = u.begin();
        assert!(!u.is_idle(), "in flight");
        drop(call);
        assert!(u.is_idle());
        u.fell_asleep();
        u.fell_asleep();
        assert!(u.is_asleep());
        assert_eq!(u.sleeps(), 1);
        u.woke();
        assert!(!u.is_asleep());
        assert_eq!(u.wakes(), 1);
        u.woke();
        assert_eq!(u.wakes(), 1, "a wake of an awake server is not counted");
    }

    #[test]
    fn a_call_and_a_sleep_cannot_both_win() {
        let u = Usage::new(Duration::ZERO, 1);
        let call = u.begin();
        assert!(!u.try_sleep(), "a call in flight");
        drop(call);
        assert!(u.try_sleep());
        assert!(u.is_asleep(), "the next call wakes it");
        assert!(!u.try_sleep(), "already asleep");
        let call = u.begin();
        assert!(
            u.is_asleep(),
            "a call that began after the sleep still sees it"
        );
        u.woke();
        assert!(
            !u.is_asleep() && !u.is_idle(),
            "woken, the call still in flight"
        );
        assert_eq!(
            (u.sleeps(), u.wakes()),
            (0, 0),
            "called off before it stopped"
        );
        drop(call);
        assert!(u.try_sleep());
        u.fell_asleep();
        assert_eq!(u.sleeps(), 1);
        u.woke();
        assert_eq!(u.wakes(), 1);
    }
}
