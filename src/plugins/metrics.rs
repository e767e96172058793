//! Per-plugin counters. They outlive reloads (keyed by plugin name), and
//! `exported.rs` shows them on the gateway's `/metrics` at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::FaultKind;

/// Counters of one plugin.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    /// Hook calls made.
    pub calls: AtomicU64,
    /// Calls that denied (a policy decision, not a fault).
    pub denials: AtomicU64,
    /// Calls that rewrote arguments or results.
    pub rewrites: AtomicU64,
    /// Calls that ran past their deadline.
    pub faults_deadline: AtomicU64,
    /// Calls that hit the memory limit.
    pub faults_memory: AtomicU64,
    /// Calls that trapped.
    pub faults_trap: AtomicU64,
    /// Calls that returned malformed output.
    pub faults_malformed: AtomicU64,
    /// Fresh instances whose `init` failed.
    pub faults_init: AtomicU64,
    /// Calls that could not get an instance.
    pub faults_unavailable: AtomicU64,
    /// Faults skipped because the plugin is fail-open.
    pub fail_open_skips: AtomicU64,
    /// Instances created (first load, after a fault, after recycling).
    pub instances: AtomicU64,
    /// Total time spent in hook calls, in nanoseconds.
    pub call_nanos: AtomicU64,
    /// Hook calls answered with a kept decision, the plugin not run (`reuse_decisions`).
    pub reused: AtomicU64,
}

/// A copy of [`PluginMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`PluginMetrics::calls`].
    pub calls: u64,
    /// See [`PluginMetrics::denials`].
    pub denials: u64,
    /// See [`PluginMetrics::rewrites`].
    pub rewrites: u64,
    /// See [`PluginMetrics::faults_deadline`].
    pub faults_deadline: u64,
    /// See [`PluginMetrics::faults_memory`].
    pub faults_memory: u64,
    /// See [`PluginMetrics::faults_trap`].
    pub faults_trap: u64,
    /// See [`PluginMetrics::faults_malformed`].
    pub faults_malformed: u64,
    /// See [`PluginMetrics::faults_init`].
    pub faults_init: u64,
    /// See [`PluginMetrics::faults_unavailable`].
    pub faults_unavailable: u64,
    /// See [`PluginMetrics::fail_open_skips`].
    pub fail_open_skips: u64,
    /// See [`PluginMetrics::instances`].
    pub instances: u64,
    /// See [`PluginMetrics::call_nanos`].
    pub call_nanos: u64,
    /// See [`PluginMetrics::reused`].
    pub reused: u64,
}

impl MetricsSnapshot {
    /// All faults, of any kind.
    pub fn faults(&self) -> u64 {
        self.faults_deadline
            + self.faults_memory
            + self.faults_trap
            + self.faults_malformed
            + self.faults_init
            + self.faults_unavailable
    }
}

impl PluginMetrics {
    pub(crate) fn fault(&self, kind: FaultKind) {
        let counter = match kind {
            FaultKind::Deadline => &self.faults_deadline,
            FaultKind::Memory => &self.faults_memory,
            FaultKind::Trap => &self.faults_trap,
            FaultKind::Malformed => &self.faults_malformed,
            FaultKind::Init => &self.faults_init,
            FaultKind::Unavailable => &self.faults_unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            calls: r(&self.calls),
            denials: r(&self.denials),
            rewrites: r(&self.rewrites),
            faults_deadline: r(&self.faults_deadline),
            faults_memory: r(&self.faults_memory),
            faults_trap: r(&self.faults_trap),
            faults_malformed: r(&self.faults_malformed),
            faults_init: r(&self.faults_init),
            faults_unavailable: r(&self.faults_unavailable),
            fail_open_skips: r(&self.fail_open_skips),
            instances: r(&self.instances),
            call_nanos: r(&self.call_nanos),
            reused: r(&self.reused),
        }
    }
}
