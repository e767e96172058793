//! Counts per principal, shared by all of its sessions while any of them lives: what one
//! caller's sessions hold of a budget every caller shares (replay buffers, queued bytes), so
//! that one caller cannot take it all.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};

/// The count of each principal whose sessions hold one.
pub struct PrincipalCounts {
    table: Mutex<Option<HashMap<Arc<str>, Weak<AtomicUsize>>>>,
}

impl PrincipalCounts {
    /// An empty table (a `static` one allocates nothing until used).
    pub const fn new() -> PrincipalCounts {
        PrincipalCounts {
            table: Mutex::new(None),
        }
    }

    /// The count of `principal`'s sessions, the same for all of them; forgotten once none
    /// holds it.
    pub fn of(&self, principal: &Arc<str>) -> Arc<AtomicUsize> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = table.get_or_insert_with(HashMap::new);
        if let Some(count) = table.get(principal).and_then(Weak::upgrade) {
            return count;
        }
        // Principals whose sessions are all gone are forgotten as the table doubles.
        if table.len() >= 64 && table.len().is_power_of_two() {
            table.retain(|_, count| count.strong_count() > 0);
        }
        let count = Arc::new(AtomicUsize::new(0));
        table.insert(principal.clone(), Arc::downgrade(&count));
        count
    }

    /// Whether a session of `principal` holds its count now.
    #[cfg(test)]
    pub(crate) fn held(&self, principal: &str) -> bool {
        self.table
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|t| t.get(principal))
            .is_some_and(|c| c.strong_count() > 0)
    }

    /// Principals remembered now.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.table.lock().unwrap().as_ref().map_or(0, HashMap::len)
    }
}

impl Default for PrincipalCounts {
    fn default() -> Self {
        PrincipalCounts::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_principals_sessions_share_one_count_which_goes_with_the_last() {
        let counts = PrincipalCounts::new();
        let alice: Arc<str> = Arc::from("alice");
        let a = counts.of(&alice);
        let b = counts.of(&alice);
        a.fetch_add(5, Ordering::Relaxed);
        assert_eq!(b.load(Ordering::Relaxed), 5, "one count");
        assert_eq!(counts.of(&Arc::from("bob")).load(Ordering::Relaxed), 0);
        assert!(counts.held("alice"));
        drop((a, b));
        assert!(!counts.held("alice"));
        // Gone principals are forgotten as the table grows.
        for i in 0..200 {
            drop(counts.of(&Arc::from(format!("p{i}"))));
        }
        assert!(counts.remembered() < 100, "{}", counts.remembered());
        assert_eq!(
            counts.of(&alice).load(Ordering::Relaxed),
            0,
            "a fresh count"
        );
    }
}
