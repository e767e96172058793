//! The reconcile loop's work queue: each server's name at most once, however many events
//! name it, and retries with a per-server exponential backoff.
//!
//! `kube::runtime::Controller` is not used: it reconciles one root resource kind with its
//! owned children, while a server here is a config-file entry (no resource of its own) or
//! an `McpServer`, and its objects are found by label. What the Controller adds — a
//! deduplicating, bounded queue and error backoff — is this module; the watches are
//! kube-runtime's own.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::orchestrator::backoff::Backoff;

/// Names waiting for the worker: a set, so it never holds more entries than there are
/// servers, and a burst of events about one server is one reconcile.
#[derive(Debug, Default)]
pub struct WorkQueue {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
    /// Failures in a row of each server whose last reconcile failed.
    failures: DashMap<String, u32>,
    /// Servers with a retry scheduled (one timer each, however often they fail).
    retrying: DashMap<String, ()>,
}

impl WorkQueue {
    /// Asks for `name` to be reconciled.
    pub fn push(&self, name: String) {
        let added = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
        if added {
            self.ready.notify_one();
        }
    }

    /// Waits for names and takes them all, in name order.
    pub async fn next_batch(&self) -> BTreeSet<String> {
        loop {
            let batch =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if !batch.is_empty() {
                return batch;
            }
            self.ready.notified().await;
        }
    }

    /// Names waiting now.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no name waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a failed reconcile of `name`; returns the delay before its retry, or `None`
    /// when a retry is already scheduled.
    pub fn failed(&self, name: &str, backoff: &Backoff) -> Option<Duration> {
        if self.retrying.insert(name.to_string(), ()).is_some() {
            return None;
        }
        let attempt = {
            let mut n = self.failures.entry(name.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n - 1
        };
        Some(backoff.delay(attempt, crate::orchestrator::backoff::random_unit()))
    }

    /// The scheduled retry of `name` is due: it is queued again.
    pub fn retry_due(&self, name: &str) {
        self.retrying.remove(name);
        self.push(name.to_string());
    }

    /// Records a successful reconcile of `name`: its next failure starts the backoff over.
    pub fn succeeded(&self, name: &str) {
        self.failures.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_waits_once_however_often_it_is_pushed() {
        let q = WorkQueue::default();
        for _ in 0..1000 {
            q.push("b".into());
            q.push("a".into());
        }
        assert_eq!(q.len(), 2);
        let batch: Vec<_> = q.next_batch().await.into_iter().collect();
        assert_eq!(batch, ["a", "b"]);
        assert!(q.is_empty());
        // A push while the worker waits wakes it.
        let q = std::sync::Arc::new(q);
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next_batch().await }
        });
        tokio::task::yield_now().await;
        q.push("c".into());
        assert_eq!(waiter.await.unwrap().into_iter().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn failures_back_off_exponentially_with_one_timer_per_server() {
        let q = WorkQueue::default();
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::ZERO,
        };
        let mut delays = Vec::new();
        for _ in 0..6 {
            delays.push(q.failed("s", &backoff).expect("no retry scheduled"));
            // A failure while the retry is pending schedules nothing more.
            assert_eq!(q.failed("s", &backoff), None);
            q.retry_due("s");
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000], "doubling, capped");
        q.succeeded("s");
        assert_eq!(q.failed("s", &backoff), Some(Duration::from_millis(100)));
        assert_eq!(q.len(), 1, "retries queue the name once");
    }
}
