//! Key/value state that plugins keep in the host (WIT `interface state`).
//!
//! State lives here, not in guest memory, so it survives instance recycling
//! and hot reload and is shared by all instances of a plugin. It is keyed by
//! scope owner (a session id, a principal, or the plugin itself), then by
//! plugin name, so a plugin sees only its own keys and ending a session drops
//! all of that session's state in one removal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Longest key a plugin may use, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value a plugin may store, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one plugin may hold for one scope owner.
pub const MAX_KEYS_PER_OWNER: usize = 1024;

/// Whose state a key belongs to (mirrors the WIT `scope` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The current MCP session.
    Session,
    /// The current principal (anonymous callers share one owner).
    Principal,
    /// The whole plugin.
    Global,
}

/// The owner used for the principal scope when the caller is anonymous.
const ANONYMOUS: &str = "\u{0}anonymous";
/// The owner used for the global scope.
const GLOBAL: &str = "\u{0}global";

#[derive(Debug)]
struct Slot {
    value: String,
    expires: Option<Instant>,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

/// One plugin's keys for one owner.
type Bucket = HashMap<String, Slot>;
/// All plugins' buckets for one owner.
type Owner = HashMap<Arc<str>, Bucket>;

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("key longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong,
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value larger than {MAX_VALUE_BYTES} bytes")]
    ValueTooLarge,
    /// The owner already holds [`MAX_KEYS_PER_OWNER`] keys of this plugin.
    #[error("more than {MAX_KEYS_PER_OWNER} keys in this scope")]
    TooManyKeys,
    /// Session scope outside of a request (for example in `init`).
    #[error("no session in this context")]
    NoSession,
}

/// The host's plugin state, shared by a [`super::PluginSet`] and the sets
/// that replace it on reload.
#[derive(Debug, Default)]
pub struct StateStore {
    sessions: DashMap<Box<str>, Owner>,
    principals: DashMap<Box<str>, Owner>,
    global: DashMap<Box<str>, Owner>,
}

/// Who is calling, for resolving scope owners.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The session id; empty outside of a request.
    pub session: &'a str,
    /// The principal, if authenticated.
    pub principal: Option<&'a str>,
}

impl StateStore {
    fn owner_of<'a>(
        &self,
        scope: Scope,
        caller: Caller<'a>,
    ) -> Result<(&DashMap<Box<str>, Owner>, &'a str), StateError> {
        Ok(match scope {
            Scope::Session if caller.session.is_empty() => return Err(StateError::NoSession),
            Scope::Session => (&self.sessions, caller.session),
            Scope::Principal => (&self.principals, caller.principal.unwrap_or(ANONYMOUS)),
            Scope::Global => (&self.global, GLOBAL),
        })
    }

    /// The live value of `key`.
    pub fn get(&self, plugin: &str, scope: Scope, caller: Caller<'_>, key: &str) -> Option<String> {
        let (map, owner) = self.owner_of(scope, caller).ok()?;
        let owner = map.get(owner)?;
        let slot = owner.get(plugin)?.get(key)?;
        slot.live(Instant::now()).then(|| slot.value.clone())
    }

    /// Sets `key`, with an optional time to live.
    pub fn set(
        &self,
        plugin: &Arc<str>,
        scope: Scope,
        caller: Caller<'_>,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(StateError::ValueTooLarge);
        }
        let (map, owner) = self.owner_of(scope, caller)?;
        let now = Instant::now();
        let mut owner = map.entry(owner.into()).or_default();
        let bucket = owner.entry(plugin.clone()).or_default();
        make_room(bucket, key, now)?;
        bucket.insert(
            key.to_string(),
            Slot {
                value,
                expires: ttl.map(|t| now + t),
            },
        );
        Ok(())
    }

    /// Removes `key`.
    pub fn remove(&self, plugin: &str, scope: Scope, caller: Caller<'_>, key: &str) {
        if let Ok((map, owner)) = self.owner_of(scope, caller)
            && let Some(mut owner) = map.get_mut(owner)
            && let Some(bucket) = owner.get_mut(plugin)
        {
            bucket.remove(key);
        }
    }

    /// Adds `delta` to the counter `key` atomically and returns the new value.
    /// A missing, expired or non-integer value counts as 0; `ttl` applies
    /// when the counter is (re)created.
    pub fn incr(
        &self,
        plugin: &Arc<str>,
        scope: Scope,
        caller: Caller<'_>,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        check_key(key)?;
        let (map, owner) = self.owner_of(scope, caller)?;
        let now = Instant::now();
        // The shard lock of `entry` makes read-modify-write atomic.
        let mut owner = map.entry(owner.into()).or_default();
        let bucket = owner.entry(plugin.clone()).or_default();
        if let Some(slot) = bucket.get_mut(key)
            && slot.live(now)
        {
            let value = slot.value.parse::<i64>().unwrap_or(0).saturating_add(delta);
            slot.value = value.to_string();
            return Ok(value);
        }
        make_room(bucket, key, now)?;
        bucket.insert(
            key.to_string(),
            Slot {
                value: delta.to_string(),
                expires: ttl.map(|t| now + t),
            },
        );
        Ok(delta)
    }

    /// Drops everything kept for a session (call when the session ends).
    pub fn end_session(&self, session: &str) {
        self.sessions.remove(session);
    }

    /// Drops expired keys and empty owners.
    pub fn sweep(&self) {
        let now = Instant::now();
        for map in [&self.sessions, &self.principals, &self.global] {
            map.retain(|_, owner| {
                owner.retain(|_, bucket| {
                    bucket.retain(|_, slot| slot.live(now));
                    !bucket.is_empty()
                });
                !owner.is_empty()
            });
        }
    }

    /// Number of live sessions that hold state (for tests and metrics).
    pub fn sessions_with_state(&self) -> usize {
        self.sessions.len()
    }
}

fn check_key(key: &str) -> Result<(), StateError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::KeyTooLong);
    }
    Ok(())
}

/// Ensures a new key fits in the bucket, dropping expired keys first.
fn make_room(bucket: &mut Bucket, key: &str, now: Instant) -> Result<(), StateError> {
    if bucket.len() < MAX_KEYS_PER_OWNER || bucket.contains_key(key) {
        return Ok(());
    }
    bucket.retain(|_, slot| slot.live(now));
    if bucket.len() < MAX_KEYS_PER_OWNER {
        Ok(())
    } else {
        Err(StateError::TooManyKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(session: &str) -> Caller<'_> {
        Caller {
            session,
            principal: Some("alice"),
        }
    }

    #[test]
    fn scopes_and_plugins_are_separate() {
        let store = StateStore::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        store
            .set(&a, Scope::Session, caller("s1"), "k", "1".into(), None)
            .unwrap();
        assert_eq!(
            store.get("a", Scope::Session, caller("s1"), "k").as_deref(),
            Some("1")
        );
        assert_eq!(store.get("b", Scope::Session, caller("s1"), "k"), None);
        assert_eq!(store.get("a", Scope::Session, caller("s2"), "k"), None);
        assert_eq!(store.get("a", Scope::Principal, caller("s1"), "k"), None);
        store
            .set(&b, Scope::Principal, caller("s1"), "k", "p".into(), None)
            .unwrap();
        assert_eq!(
            store
                .get("b", Scope::Principal, caller("s2"), "k")
                .as_deref(),
            Some("p")
        );
        store.end_session("s1");
        assert_eq!(store.get("a", Scope::Session, caller("s1"), "k"), None);
        assert_eq!(
            store
                .get("b", Scope::Principal, caller("s1"), "k")
                .as_deref(),
            Some("p")
        );
    }

    #[test]
    fn counters_expire() {
        let store = StateStore::default();
        let p: Arc<str> = "p".into();
        let ttl = Some(Duration::from_millis(30));
        let c = caller("s");
        assert_eq!(store.incr(&p, Scope::Global, c, "n", 1, ttl), Ok(1));
        assert_eq!(store.incr(&p, Scope::Global, c, "n", 2, ttl), Ok(3));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(store.incr(&p, Scope::Global, c, "n", 1, ttl), Ok(1));
        std::thread::sleep(Duration::from_millis(40));
        store.sweep();
        assert_eq!(store.get("p", Scope::Global, c, "n"), None);
    }

    #[test]
    fn bounds() {
        let store = StateStore::default();
        let p: Arc<str> = "p".into();
        let c = caller("s");
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            store.set(&p, Scope::Session, c, &long, String::new(), None),
            Err(StateError::KeyTooLong)
        );
        assert_eq!(
            store.set(
                &p,
                Scope::Session,
                c,
                "k",
                "v".repeat(MAX_VALUE_BYTES + 1),
                None
            ),
            Err(StateError::ValueTooLarge)
        );
        for i in 0..MAX_KEYS_PER_OWNER {
            store
                .set(&p, Scope::Session, c, &i.to_string(), String::new(), None)
                .unwrap();
        }
        assert_eq!(
            store.set(&p, Scope::Session, c, "one more", String::new(), None),
            Err(StateError::TooManyKeys)
        );
        let no_session = Caller {
            session: "",
            principal: None,
        };
        assert_eq!(
            store.set(&p, Scope::Session, no_session, "k", String::new(), None),
            Err(StateError::NoSession)
        );
    }
}
