//! Key/value state that plugins keep in the host (WIT `interface state`).
//!
//! State lives here, not in guest memory, so it survives instance recycling
//! and hot reload and is shared by all instances of a plugin. It is keyed by
//! scope owner (a session id, a principal, or the plugin itself), then by
//! plugin name, so a plugin sees only its own keys and ending a session drops
//! all of that session's state in one removal.
//!
//! Besides the bounds per key, value and owner, everything one plugin keeps, every owner
//! together, is bounded by its [`StateLimits`] (its `state_max_bytes` and `state_max_entries`):
//! each owner's [`Bucket`] counts what it takes in the plugin's [`Usage`] as it changes and
//! gives it all back when it goes, whichever way its owner goes. A write past the limits is
//! refused; nothing live is evicted for it.
//!
//! With several replicas (Kubernetes, leader election and the relay), the state is the leading
//! replica's: the others ask it for every operation ([`super::leader`]), so a rate limit counts
//! every replica's calls and a taint follows a session to whichever replica serves it. A
//! replica that comes to lead takes the state over from the previous leader first (a
//! [`Snapshot`] of it), so a change of leader (a rolling upgrade) loses none of it; where the
//! previous leader cannot hand it over (it crashed), the new one starts afresh. The leader's
//! record of deleted sessions is also a log, numbered, that the other replicas read
//! ([`Action::DeletedSince`], [`DeletionsRead`]) to end the sessions they hold that were
//! deleted elsewhere.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::leader::{self, Leader, Unavailable};
use crate::orchestrator::Handover;

/// Longest key a plugin may use, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value a plugin may store, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one plugin may hold for one scope owner.
pub const MAX_KEYS_PER_OWNER: usize = 1024;
/// Default of a plugin's `state_max_bytes`: bytes of keys and values it keeps, every scope
/// owner together.
pub const DEFAULT_STATE_BYTES: u64 = 16 << 20;
/// Default of a plugin's `state_max_entries`: keys it keeps, every scope owner together.
pub const DEFAULT_STATE_ENTRIES: u64 = 200_000;
/// How often, at most, a plugin at its limits has its expired keys dropped from every owner to
/// make room (a plugin kept full cannot make each write walk the whole store).
const PURGE_EVERY_MS: u64 = if cfg!(test) { 10 } else { 1000 };
/// Most sessions holding state at once: where replicas share it, the leader holds every
/// replica's (each may serve `mcp.max_sessions`, 100,000 by default), and a session another
/// replica left is counted by no session limit. (Small in unit tests, which fill it.)
pub const MAX_SESSIONS: usize = if cfg!(test) { 1000 } else { 1_000_000 };
/// Most deleted sessions remembered (their state operations refused) at once.
const MAX_DELETED: usize = 100_000;
/// How often a store that replicas share drops what has expired.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a replica that no longer leads keeps what it kept, for the next leader to take
/// over: longer than a lease takes to expire (15 s) and be taken.
const HANDED_OVER_WITHIN: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 60 });
/// How long what was written for the next leader is handed out again (askers retrying).
const HANDING_FRESH: Duration = Duration::from_secs(1);

/// Whose state a key belongs to (mirrors the WIT `scope` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// What one plugin may keep in the state, every scope owner together (its sessions', its
/// principals' and its global keys): a plugin that keys its state by something a client chooses
/// (a session, a principal, a tool name, an argument) cannot grow the gateway's memory beyond
/// it. A write past it is refused ([`StateError::PluginBytes`], [`StateError::PluginEntries`]);
/// nothing live is evicted for it (expired keys are dropped first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLimits {
    /// Bytes of keys and values.
    pub bytes: u64,
    /// Keys.
    pub entries: u64,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            bytes: DEFAULT_STATE_BYTES,
            entries: DEFAULT_STATE_ENTRIES,
        }
    }
}

/// A plugin as its state knows it: the name its keys are kept under, and what it may keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The plugin's name.
    pub plugin: Arc<str>,
    /// Its bounds, every owner together.
    pub limits: StateLimits,
}

impl Holder {
    /// A plugin with the default limits.
    pub fn new(plugin: impl Into<Arc<str>>) -> Holder {
        Holder {
            plugin: plugin.into(),
            limits: StateLimits::default(),
        }
    }
}

/// What one plugin keeps, every owner together: its buckets count what they take as they
/// change, and give it back as they go (a bucket's drop gives back all it holds, however its
/// owner goes: a session's end, a sweep, a reset).
#[derive(Debug, Default)]
struct Usage {
    bytes: AtomicU64,
    entries: AtomicU64,
    /// When its expired keys may next be dropped to make room (ms since the store began).
    purge_from: AtomicU64,
}

impl Usage {
    /// Takes `bytes` and `entries` more, if they fit within `limits`.
    fn take(&self, bytes: u64, entries: u64, limits: StateLimits) -> Result<(), StateError> {
        let within =
            |limit: u64, more: u64| move |held: u64| held.checked_add(more).filter(|n| *n <= limit);
        if entries > 0
            && (self.entries)
                .fetch_update(
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    within(limits.entries, entries),
                )
                .is_err()
        {
            return Err(StateError::PluginEntries(limits.entries));
        }
        if bytes > 0
            && (self.bytes)
                .fetch_update(
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    within(limits.bytes, bytes),
                )
                .is_err()
        {
            self.entries.fetch_sub(entries, Ordering::AcqRel);
            return Err(StateError::PluginBytes(limits.bytes));
        }
        Ok(())
    }

    /// Takes `bytes` and `entries` more, whatever the limits (state taken over from another
    /// leader, which kept it within its own).
    fn add(&self, bytes: u64, entries: u64) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.entries.fetch_add(entries, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: u64, entries: u64) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.entries.fetch_sub(entries, Ordering::AcqRel);
    }

    /// Whether one more key of `bytes` would fit within `limits`.
    fn fits(&self, bytes: u64, limits: StateLimits) -> bool {
        let held = |n: &AtomicU64| n.load(Ordering::Acquire);
        held(&self.entries) < limits.entries
            && held(&self.bytes).saturating_add(bytes) <= limits.bytes
    }
}

/// What a key and its value count for.
fn size(key: &str, value: &str) -> u64 {
    (key.len() + value.len()) as u64
}

/// One plugin's keys for one owner, counted in the plugin's [`Usage`].
#[derive(Debug)]
struct Bucket {
    slots: HashMap<String, Slot>,
    /// Bytes of its keys and values.
    bytes: u64,
    usage: Arc<Usage>,
}

impl Drop for Bucket {
    fn drop(&mut self) {
        (self.usage).give_back(self.bytes, self.slots.len() as u64);
    }
}

impl Bucket {
    fn new(usage: Arc<Usage>) -> Bucket {
        Bucket {
            slots: HashMap::new(),
            bytes: 0,
            usage,
        }
    }

    fn get(&self, key: &str) -> Option<&Slot> {
        self.slots.get(key)
    }

    fn contains_key(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Slot)> {
        self.slots.iter()
    }

    /// Sets `key` to `value`, expiring at `expires`: refused if what it adds (a new key, or a
    /// longer value) does not fit within `limits`, every owner of the plugin together.
    fn put(
        &mut self,
        key: &str,
        value: String,
        expires: Option<Instant>,
        limits: StateLimits,
    ) -> Result<(), StateError> {
        let new = size(key, &value);
        match self.slots.get(key).map(|slot| size(key, &slot.value)) {
            None => {
                self.usage.take(new, 1, limits)?;
                self.slots.insert(key.to_owned(), Slot { value, expires });
            }
            Some(old) => {
                if new > old {
                    self.usage.take(new - old, 0, limits)?;
                } else {
                    self.usage.give_back(old - new, 0);
                }
                self.bytes -= old;
                if let Some(slot) = self.slots.get_mut(key) {
                    *slot = Slot { value, expires };
                }
            }
        }
        self.bytes += new;
        Ok(())
    }

    /// Holds `slot` under `key` whatever the limits (taken over from another leader).
    fn put_taken(&mut self, key: String, slot: Slot) {
        let new = size(&key, &slot.value);
        let key_len = key.len() as u64;
        self.usage.add(new, 1);
        self.bytes += new;
        if let Some(old) = self.slots.insert(key, slot) {
            // (Never: keys are taken over once each.)
            let old = key_len + old.value.len() as u64;
            self.bytes -= old;
            self.usage.give_back(old, 1);
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            let gone = size(key, &slot.value);
            self.bytes -= gone;
            self.usage.give_back(gone, 1);
        }
    }

    /// Drops what has expired.
    fn retain_live(&mut self, now: Instant) {
        let (mut bytes, mut entries) = (0, 0);
        self.slots.retain(|key, slot| {
            let live = slot.live(now);
            if !live {
                bytes += size(key, &slot.value);
                entries += 1;
            }
            live
        });
        self.bytes -= bytes;
        self.usage.give_back(bytes, entries);
    }
}

/// Deleted sessions: their ids' hashes (a few bytes each, however long an id), and each with
/// when it was deleted, oldest first. In that order it is also the log replicas read to end
/// the deleted sessions they still hold ([`Deletions`]): each deletion has a number in it.
#[derive(Debug)]
struct Deleted {
    ids: HashSet<u64>,
    order: VecDeque<(u64, u64)>,
    /// The seed ids are hashed with: random (ids cannot be chosen to collide), and handed over
    /// with the hashes, so the next leader's hashes mean the same.
    seed: u64,
    /// Which log this is: drawn anew each time the record starts afresh (another leader, a
    /// reset), never 0, so that a replica that read another log reads this one whole.
    incarnation: u64,
    /// The number of the oldest deletion kept (`order`'s first) in this log.
    first: u64,
}

impl Deleted {
    fn new(seed: u64) -> Deleted {
        Deleted {
            ids: HashSet::new(),
            order: VecDeque::new(),
            seed,
            incarnation: random_seed().max(1),
            first: 0,
        }
    }

    fn hash(&self, session: &str) -> u64 {
        deletion_hash(self.seed, session)
    }

    /// Logs a deletion; whether it is new.
    fn insert(&mut self, id: u64, at: u64) -> bool {
        let new = self.ids.insert(id);
        if new {
            self.order.push_back((id, at));
        }
        while self.order.len() > MAX_DELETED {
            self.pop_oldest();
        }
        new
    }

    /// Forgets the oldest deletion (its session is refused no longer).
    fn pop_oldest(&mut self) {
        if let Some((old, _)) = self.order.pop_front() {
            self.ids.remove(&old);
            self.first += 1;
        }
    }

    /// The number the next deletion logged will have.
    fn end(&self) -> u64 {
        self.first + self.order.len() as u64
    }

    /// At most `most` deletions logged from number `after` on, for a replica that read this log
    /// up to there; or, where it read another log (`incarnation`), or a part this one no longer
    /// keeps, or a number it never reached, from the oldest kept on: the reader then sees from
    /// [`Deletions::from`] where it stands.
    fn since(&self, incarnation: u64, after: u64, most: usize) -> Deletions {
        let from =
            match incarnation == self.incarnation && (self.first..=self.end()).contains(&after) {
                true => after,
                false => self.first,
            };
        let skip = usize::try_from(from - self.first).unwrap_or(usize::MAX);
        let ids = (self.order.range(skip.min(self.order.len())..))
            .take(most)
            .map(|(id, _)| *id)
            .collect();
        Deletions {
            incarnation: self.incarnation,
            seed: self.seed,
            from,
            ids,
            end: self.end(),
        }
    }
}

/// A deleted session's id as the leader's record keeps it: hashed with the record's seed.
fn deletion_hash(seed: u64, session: &str) -> u64 {
    foldhash::quality::FixedState::with_seed(seed).hash_one(session)
}

/// Most deletions one answer names: each is a number of at most 20 digits, so a page stays well
/// within what a replica reads of an answer (512 KiB), and the whole record (100,000) takes a
/// few.
pub const DELETIONS_PER_PAGE: usize = 16_384;
/// Most pages a replica reads of the log in one look: the whole record, and a few more logged
/// meanwhile (beyond, it reads on at its next look).
pub const DELETION_PAGES_AT_ONCE: usize = MAX_DELETED.div_ceil(DELETIONS_PER_PAGE) + 2;

/// Part of the leader's log of deleted sessions, as a replica asked for it ([`Action::DeletedSince`]):
/// the hashes of the deleted ids, oldest first, numbered from [`Deletions::from`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletions {
    /// The log's incarnation (see [`DeletionsRead`]).
    pub incarnation: u64,
    /// The seed the ids are hashed with.
    pub seed: u64,
    /// The number of the first deletion given.
    pub from: u64,
    /// The deleted ids' hashes, oldest first.
    pub ids: Vec<u64>,
    /// The number the next deletion logged will have: more follow while the page ends before it.
    pub end: u64,
}

impl Deletions {
    /// The answer to [`Action::DeletedSince`].
    fn into_outcome(self) -> Outcome {
        Outcome::Value(Some(
            serde_json::to_string(&self).expect("numbers serialize"),
        ))
    }

    /// The page an answer to [`Action::DeletedSince`] holds (`None`: it holds none, as from a
    /// leader of another version).
    pub fn from_outcome(outcome: &Outcome) -> Option<Deletions> {
        match outcome {
            Outcome::Value(Some(page)) => serde_json::from_str(page).ok(),
            _ => None,
        }
    }

    /// `id` as the log names it.
    pub fn hash(&self, id: &str) -> u64 {
        deletion_hash(self.seed, id)
    }

    /// The number after the last deletion given.
    pub fn next(&self) -> u64 {
        self.from + self.ids.len() as u64
    }

    /// Whether more deletions follow this page (ask again at once).
    pub fn more(&self) -> bool {
        self.next() < self.end
    }
}

/// Where a replica stands in the leader's log of deletions: which log (each leader's, each
/// time its record starts afresh, is another) and how far it read it. A replica that finds
/// another log reads it whole; one that finds its log no longer keeps what it had not read yet
/// is told how much it missed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeletionsRead {
    /// The log read (0: none yet).
    incarnation: u64,
    /// The number of the next deletion to read in it.
    next: u64,
}

/// How a page of the log follows what a replica read of it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Right after it.
    Continued,
    /// Another log (another leader, or its record started afresh): read from its start.
    Afresh,
    /// The log no longer keeps this many deletions that were not read yet (more were logged
    /// than it keeps, or they are older than a session's state is kept): their sessions are
    /// not ended here for it (nor refused by the leader any more).
    Missed(u64),
}

impl DeletionsRead {
    /// What to ask the leader for next.
    pub fn ask(&self) -> Action {
        Action::DeletedSince {
            incarnation: self.incarnation,
            after: self.next,
        }
    }

    /// Moves past `page`, and says how it followed what was read before.
    pub fn read(&mut self, page: &Deletions) -> Joined {
        let joined = if self.incarnation == 0 || page.incarnation != self.incarnation {
            Joined::Afresh
        } else if page.from == self.next {
            Joined::Continued
        } else if page.from > self.next {
            Joined::Missed(page.from - self.next)
        } else {
            // (Read past the log's end: never, within one log. Read again from its start.)
            Joined::Afresh
        };
        *self = DeletionsRead {
            incarnation: page.incarnation,
            next: page.next(),
        };
        joined
    }
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // (Without the OS's randomness, a fixed seed: ids could then be chosen to collide, which
    // refuses another session's plugin state, no more.)
    let _ = getrandom::fill(&mut seed);
    u64::from_le_bytes(seed)
}

/// All plugins' buckets for one owner.
#[derive(Debug)]
struct Owner {
    plugins: HashMap<Arc<str>, Bucket>,
    /// When a plugin last used it, in milliseconds since the store began: a portable session's
    /// state held for other replicas is dropped once unused for long (none of them says when
    /// it ends, unless deleted).
    used: AtomicU64,
}

impl Owner {
    fn new(now: u64) -> Owner {
        Owner {
            plugins: HashMap::new(),
            used: AtomicU64::new(now),
        }
    }
}

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
    /// Principal scope in `init`, which runs for no caller: it would otherwise be the anonymous
    /// callers' state, written before any of them calls.
    #[error("no caller in init")]
    NoCaller,
    /// [`MAX_SESSIONS`] sessions already hold state.
    #[error("more than {MAX_SESSIONS} sessions hold plugin state")]
    TooManySessions,
    /// The plugin's keys and values, every owner together, would take more than its
    /// `state_max_bytes`.
    #[error(
        "the plugin's state is full: its keys and values would take more than {0} bytes (state_max_bytes)"
    )]
    PluginBytes(u64),
    /// The plugin would hold more keys, every owner together, than its `state_max_entries`.
    #[error("the plugin's state is full: it would hold more than {0} keys (state_max_entries)")]
    PluginEntries(u64),
}

/// The host's plugin state, shared by a [`super::PluginSet`] and the sets
/// that replace it on reload.
#[derive(Debug)]
pub struct StateStore {
    /// What each plugin keeps, every owner together (by plugin name).
    usage: DashMap<Arc<str>, Arc<Usage>>,
    sessions: DashMap<Box<str>, Owner>,
    principals: DashMap<Box<str>, Owner>,
    global: DashMap<Box<str>, Owner>,
    /// Where `used` times count from.
    epoch: Instant,
    /// The replica that keeps the state when replicas share it, and how long a session's
    /// state is kept unused there.
    leader: OnceLock<(Leader, Duration)>,
    /// Sessions deleted (where replicas share state), oldest first, with when: their state
    /// operations are refused, since another replica may still serve them.
    deleted: Mutex<Deleted>,
    /// Deletions logged here, and fresh starts of the record (see `deletions_logged`).
    logged: watch::Sender<u64>,
    /// Whether what it holds is the state (where replicas share it): false from when this
    /// replica comes to lead until it has taken the state over from the previous leader.
    settled: watch::Sender<bool>,
    /// Whether the next leader has taken over what this replica kept since it last led.
    handed: watch::Sender<bool>,
    /// Itself, for what it finishes in the background (where replicas share state).
    this: OnceLock<std::sync::Weak<StateStore>>,
    /// Whether what it holds was kept while it led (since it last dropped it): only then is
    /// there anything to hand over.
    led: std::sync::atomic::AtomicBool,
    /// What it hands over, once written (per change of leader), and when.
    handing: tokio::sync::Mutex<Option<(Instant, bytes::Bytes)>>,
    /// Whether it is taking the state over from the previous leader.
    taking: std::sync::atomic::AtomicBool,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore {
            usage: DashMap::new(),
            sessions: DashMap::new(),
            principals: DashMap::new(),
            global: DashMap::new(),
            epoch: Instant::now(),
            leader: OnceLock::new(),
            deleted: Mutex::new(Deleted::new(random_seed())),
            logged: watch::Sender::new(0),
            settled: watch::Sender::new(false),
            handed: watch::Sender::new(false),
            this: OnceLock::new(),
            led: std::sync::atomic::AtomicBool::new(false),
            handing: tokio::sync::Mutex::new(None),
            taking: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// One operation on a plugin's state: what a plugin asked, with whom it asked for; what a
/// replica that does not lead sends the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Asked {
    /// The plugin whose keys these are.
    pub plugin: Arc<str>,
    /// The calling session's id (empty outside of a request).
    pub session: String,
    /// The calling principal.
    pub principal: Option<String>,
    /// What to do.
    pub action: Action,
    /// What the plugin may keep, as the asking replica's configuration says (the default
    /// where it does not say: a version without limits).
    #[serde(default)]
    pub limits: StateLimits,
}

/// What a plugin (or the gateway) asks of the state: the WIT `state` functions, and the end of
/// a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Action {
    /// `get`.
    Get { scope: Scope, key: String },
    /// `set`.
    Set {
        scope: Scope,
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    },
    /// `remove`.
    Remove { scope: Scope, key: String },
    /// `incr`.
    Incr {
        scope: Scope,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    },
    /// The session ended: every plugin's state for it goes.
    EndSession,
    /// The session was deleted: its state goes, and operations for it are refused from now on
    /// (another replica may still serve it).
    DeleteSession,
    /// Which sessions were deleted: the log of deletions from number `after` of the log
    /// `incarnation` on (see [`DeletionsRead`]), a page at most, answered as a
    /// [`Outcome::Value`] holding the [`Deletions`] as JSON (every replica already reads that
    /// outcome).
    DeletedSince { incarnation: u64, after: u64 },
}

/// What an [`Action`] gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// `get`'s value.
    Value(Option<String>),
    /// `incr`'s new count.
    Count(i64),
    /// Done (`set`, `remove`, the end of a session).
    Done,
    /// A bound refused it.
    Refused(String),
    /// The session was deleted.
    SessionDeleted,
}

/// What a leader kept, as it hands it over to the next one.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// The seed `deleted` was hashed with.
    seed: u64,
    /// Deleted sessions' hashes, oldest first, each with how long ago (ms).
    deleted: Vec<(u64, u64)>,
    owners: Vec<KeptOwner>,
}

/// One scope owner's keys, handed over.
#[derive(Debug, Serialize, Deserialize)]
struct KeptOwner {
    scope: Scope,
    owner: String,
    /// How long since a plugin last used it (ms).
    unused_ms: u64,
    plugins: Vec<(Arc<str>, Vec<KeptKey>)>,
}

/// One scope owner as it serializes into a [`KeptOwner`].
struct OwnerOf<'a> {
    scope: Scope,
    entry: dashmap::mapref::multiple::RefMulti<'a, Box<str>, Owner>,
    now: Instant,
    used_now: u64,
}

/// One live key as it serializes into a [`KeptKey`].
#[derive(Serialize)]
struct KeyOf<'a> {
    key: &'a str,
    value: &'a str,
    ttl_ms: Option<u64>,
}

impl Serialize for OwnerOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let owner = self.entry.value();
        let plugins: Vec<(&Arc<str>, Vec<KeyOf>)> = (owner.plugins.iter())
            .map(|(plugin, bucket)| {
                let keys = (bucket.iter())
                    .filter(|(_, slot)| slot.live(self.now))
                    .map(|(key, slot)| KeyOf {
                        key,
                        value: &slot.value,
                        ttl_ms: slot.expires.map(|t| {
                            u64::try_from(t.duration_since(self.now).as_millis())
                                .unwrap_or(u64::MAX)
                        }),
                    })
                    .collect();
                (plugin, keys)
            })
            .collect();
        let unused = (self.used_now).saturating_sub(owner.used.load(Ordering::Relaxed));
        let mut out = s.serialize_struct("KeptOwner", 4)?;
        out.serialize_field("scope", &self.scope)?;
        out.serialize_field("owner", &**self.entry.key())?;
        out.serialize_field("unused_ms", &unused)?;
        out.serialize_field("plugins", &plugins)?;
        out.end()
    }
}

/// Fewer bytes than any scope owner takes as JSON.
const SMALLEST_OWNER: usize = 48;

/// A writer that refuses to grow beyond `limit` bytes.
struct Bounded<'a> {
    written: &'a mut Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("beyond the limit"));
        }
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads what the replica whose relay is at `relay` kept while it led, retrying within
/// [`leader::HANDOVER_TIMEOUT`] (it may not have stepped down quite yet), and parses it off the
/// runtime's threads.
async fn take_over_from(leader: &Leader, relay: &str) -> Result<Snapshot, String> {
    let taking = async {
        let mut pause = Duration::from_millis(50);
        let bytes = loop {
            match leader.take_over_from(relay).await {
                Ok(bytes) => break bytes,
                // It has not stepped down yet (a lease given up as it stops): again.
                Err(Unavailable::StillLeading) => {}
                // Nothing to hand over: it never led, or dropped it (or is of a version
                // without); or it cannot be reached (it crashed): no waiting on it.
                Err(e) => return Err(e.to_string()),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        };
        let parsed =
            tokio::task::spawn_blocking(move || serde_json::from_slice::<Snapshot>(&bytes))
                .await
                .map_err(|e| e.to_string())?;
        parsed.map_err(|e| format!("unreadable: {e}"))
    };
    tokio::time::timeout(leader::HANDOVER_TIMEOUT, taking)
        .await
        .map_err(|_| format!("not done within {:?}", leader::HANDOVER_TIMEOUT))?
}

/// One live key, handed over.
#[derive(Debug, Serialize, Deserialize)]
struct KeptKey {
    key: String,
    value: String,
    /// What is left of its time to live (ms).
    ttl_ms: Option<u64>,
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

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Keeps the state on the leading replica from now on: while this replica does not lead,
    /// every operation asks `leader`'s (and this store holds nothing of its own), and a
    /// session's state is kept there until the session is deleted, ends on a replica that does
    /// not carry it elsewhere, or goes unused by its plugins for `retention` (longer than a
    /// session may live unused: a portable session may come back until its id expires). Call
    /// once, inside the runtime.
    pub fn share_through(self: &Arc<Self>, leader: Leader, retention: Duration) {
        let mut leading = leader.leading();
        let mut handovers = leader.handovers();
        if self.leader.set((leader.clone(), retention)).is_err() {
            return;
        }
        let _ = self.this.set(Arc::downgrade(self));
        // What it wrote before it took part (an `init`) is not the state.
        self.clear();
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            let mut led = false;
            // When what it kept as leader goes, once another may have taken it over.
            let mut forget: Option<tokio::time::Instant> = None;
            // Whom from was told anew since the last look (`changed` marks it seen).
            let mut told = false;
            loop {
                let leads = *leading.borrow_and_update();
                // Each time it comes to lead, whom from is told anew: a change of leadership
                // that came and went between two looks here is not missed.
                let came_again = leads && led && (told || handovers.has_changed().unwrap_or(false));
                told = false;
                if !leads {
                    handovers.borrow_and_update();
                }
                if leads != led || came_again {
                    led = leads;
                    let Some(store) = store.upgrade() else { return };
                    if leads {
                        forget = None;
                        let from = handovers.borrow_and_update().clone();
                        store.take_over(from, &leader, &mut leading).await;
                        continue;
                    }
                    // Nothing is applied here from now on: what it holds stays as it was,
                    // for the next leader to take over.
                    store.settled.send_replace(false);
                    forget = Some(tokio::time::Instant::now() + HANDED_OVER_WITHIN);
                }
                let forgetting = async {
                    match forget {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = leading.changed() => if changed.is_err() {
                        return;
                    },
                    Ok(()) = handovers.changed() => told = true,
                    _ = sweep.tick() => match store.upgrade() {
                        Some(store) => store.sweep(),
                        None => return,
                    },
                    _ = forgetting => {
                        // Kept while no other replica is known to lead (the API server
                        // unreachable, say): this one may well take its own lease back.
                        if !leader.another_leads() {
                            forget = Some(tokio::time::Instant::now() + HANDED_OVER_WITHIN);
                            continue;
                        }
                        forget = None;
                        match store.upgrade() {
                            Some(store) => store.clear(),
                            None => return,
                        }
                    }
                }
            }
        });
    }

    /// This replica has come to lead: before it applies anything, what it holds becomes the
    /// state the previous leader kept (or nothing, where none can hand it over).
    async fn take_over(
        &self,
        from: Handover,
        leader: &Leader,
        leading: &mut watch::Receiver<bool>,
    ) {
        self.settled.send_replace(false);
        self.handed.send_replace(false);
        *self.handing.lock().await = None;
        let mut took_from = None;
        match from {
            Handover::Kept => {}
            Handover::Nobody => self.clear(),
            Handover::From(relay) => {
                self.clear();
                // Asked meanwhile (it lost leadership again), it says to ask again.
                self.taking.store(true, Ordering::Release);
                let taken = tokio::select! {
                    taken = take_over_from(leader, &relay) => taken,
                    // Leadership went meanwhile: nothing to settle, nothing of its own kept.
                    _ = leading.wait_for(|l| !*l) => {
                        self.taking.store(false, Ordering::Release);
                        return;
                    }
                };
                match taken {
                    Ok(snapshot) => {
                        let kept = self.restore(snapshot);
                        tracing::info!(
                            kept,
                            "took the plugins' state over from the previous leader"
                        );
                        took_from = Some(relay);
                    }
                    Err(e) => tracing::warn!(
                        "the previous leader could not hand its plugin state over ({e}); starting afresh"
                    ),
                }
            }
        }
        self.led.store(true, Ordering::Release);
        self.taking.store(false, Ordering::Release);
        self.settled.send_replace(true);
        // The previous leader may stop now: once this one holds the state, and still leads.
        if let Some(relay) = took_from
            && leader.leads()
        {
            let leader = leader.clone();
            tokio::spawn(async move { leader.acknowledge(&relay).await });
        }
    }

    /// Whether it is taking the state over (having come to lead): asked for it meanwhile, it
    /// has nothing to hand over yet.
    pub fn taking_over(&self) -> bool {
        self.taking.load(Ordering::Acquire)
    }

    /// What this replica kept while it led, as JSON, for the next leader: only once it no
    /// longer leads (nothing is applied here after), where it led since it last dropped what
    /// it kept, and within [`leader::MAX_HANDOVER`]. Written once per change of leader, off
    /// the runtime's threads, and handed to every asker alike.
    pub async fn hand_over(self: &Arc<Self>) -> Option<bytes::Bytes> {
        let (leader, _) = self.leader.get()?;
        let mut handing = self.handing.lock().await;
        if leader.leads() || !self.led.load(Ordering::Acquire) {
            return None;
        }
        // (Ages and times to live in it count from when it was written.)
        if let Some((at, written)) = &*handing
            && at.elapsed() < HANDING_FRESH
        {
            return Some(written.clone());
        }
        let store = self.clone();
        let (written, left_out) =
            tokio::task::spawn_blocking(move || store.snapshot_json(leader::MAX_HANDOVER))
                .await
                .ok()?;
        if left_out > 0 {
            tracing::warn!(
                left_out,
                "the plugins' state is larger than can be handed over: the next leader starts without what some scope owners kept"
            );
        }
        // Dropped meanwhile (it was kept long enough): what was written may be torn.
        if !self.led.load(Ordering::Acquire) {
            return None;
        }
        let written = bytes::Bytes::from(written);
        *handing = Some((Instant::now(), written.clone()));
        Some(written)
    }

    /// The next leader has taken over what this replica kept.
    pub fn taken_over(&self) {
        self.handed.send_replace(true);
    }

    /// Waits, at most `within`, for the next leader to take over what this replica kept
    /// while it led (call once it no longer leads, before its relay stops): at once where
    /// it kept nothing, or replicas do not share state.
    pub async fn handed_over(&self, within: Duration) {
        if !self.shared() || self.is_empty() {
            return;
        }
        let mut handed = self.handed.subscribe();
        let _ = tokio::time::timeout(within, handed.wait_for(|h| *h)).await;
    }

    fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.principals.is_empty()
            && self.global.is_empty()
            && lock(&self.deleted).ids.is_empty()
    }

    /// Whether replicas share the state (whichever keeps it now): where they do not, an
    /// operation can be applied at once, without building what asking another replica takes.
    pub fn shared(&self) -> bool {
        self.leader.get().is_some()
    }

    /// Whether this replica keeps the state now (it leads, or replicas do not share it).
    pub fn kept_here(&self) -> bool {
        self.kept_elsewhere().is_none()
    }

    /// Whether another replica keeps the state.
    fn kept_elsewhere(&self) -> Option<&Leader> {
        self.leader.get().map(|(l, _)| l).filter(|l| !l.leads())
    }

    /// Runs what a plugin asked, within `deadline`: here, or on the leading replica when
    /// replicas share state (`Err` when that one cannot be reached, or the session was
    /// deleted).
    pub async fn run(&self, asked: Asked, deadline: Duration) -> Result<Outcome, Unavailable> {
        let outcome = match self.kept_elsewhere() {
            Some(leader) => match leader.ask(&asked, deadline).await {
                // It came to lead while waiting for a leader to be known.
                Err(Unavailable::NoLeader) if leader.leads() => {
                    self.run_here(&asked, deadline).await?
                }
                asked => asked?,
            },
            None => self.run_here(&asked, deadline).await?,
        };
        match outcome {
            Outcome::SessionDeleted => Err(Unavailable::SessionDeleted),
            outcome => Ok(outcome),
        }
    }

    /// Applies `asked` here, as the replica that keeps the state: once it has taken the state
    /// over (waiting at most `deadline`), and only while it still leads.
    pub async fn run_here(
        &self,
        asked: &Asked,
        deadline: Duration,
    ) -> Result<Outcome, Unavailable> {
        if let Some((leader, _)) = self.leader.get() {
            let mut settled = self.settled.subscribe();
            tokio::time::timeout(deadline, settled.wait_for(|s| *s))
                .await
                .map_err(|_| Unavailable::TakingOver)?
                .map_err(|_| Unavailable::NoLeader)?;
            if !leader.leads() {
                return Err(Unavailable::NoLeader);
            }
        }
        Ok(self.apply(asked))
    }

    /// Whether `session` was deleted (where replicas share state).
    fn was_deleted(&self, session: &str) -> bool {
        if session.is_empty() || !self.shared() {
            return false;
        }
        let deleted = lock(&self.deleted);
        !deleted.ids.is_empty() && deleted.ids.contains(&deleted.hash(session))
    }

    /// Applies `asked` to this replica's state: what the leader does for the others too.
    pub fn apply(&self, asked: &Asked) -> Outcome {
        let caller = Caller {
            session: &asked.session,
            principal: asked.principal.as_deref(),
        };
        let ttl = |ms: &Option<u64>| ms.map(Duration::from_millis);
        let session_scope = match &asked.action {
            Action::Get { scope, .. }
            | Action::Set { scope, .. }
            | Action::Remove { scope, .. }
            | Action::Incr { scope, .. } => *scope == Scope::Session,
            Action::EndSession | Action::DeleteSession | Action::DeletedSince { .. } => false,
        };
        if session_scope && self.was_deleted(&asked.session) {
            return Outcome::SessionDeleted;
        }
        let holder = Holder {
            plugin: asked.plugin.clone(),
            limits: asked.limits,
        };
        match &asked.action {
            Action::Get { scope, key } => {
                Outcome::Value(self.get(&asked.plugin, *scope, caller, key))
            }
            Action::Set {
                scope,
                key,
                value,
                ttl_ms,
            } => match self.set(&holder, *scope, caller, key, value.clone(), ttl(ttl_ms)) {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Refused(e.to_string()),
            },
            Action::Remove { scope, key } => {
                self.remove(&asked.plugin, *scope, caller, key);
                Outcome::Done
            }
            Action::Incr {
                scope,
                key,
                delta,
                ttl_ms,
            } => match self.incr(&holder, *scope, caller, key, *delta, ttl(ttl_ms)) {
                Ok(n) => Outcome::Count(n),
                Err(e) => Outcome::Refused(e.to_string()),
            },
            Action::EndSession => {
                self.sessions.remove(&*asked.session);
                Outcome::Done
            }
            Action::DeleteSession => {
                self.delete_here(&asked.session);
                Outcome::Done
            }
            Action::DeletedSince { incarnation, after } => {
                let page = lock(&self.deleted).since(*incarnation, *after, DELETIONS_PER_PAGE);
                page.into_outcome()
            }
        }
    }

    /// The live value of `key`.
    pub fn get(&self, plugin: &str, scope: Scope, caller: Caller<'_>, key: &str) -> Option<String> {
        let (map, owner) = self.owner_of(scope, caller).ok()?;
        let owner = map.get(owner)?;
        owner.used.store(self.now(), Ordering::Relaxed);
        let slot = owner.plugins.get(plugin)?.get(key)?;
        slot.live(Instant::now()).then(|| slot.value.clone())
    }

    /// Sets `key`, with an optional time to live.
    pub fn set(
        &self,
        holder: &Holder,
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
        let adds = size(key, &value);
        self.write(holder, map, owner, adds, |bucket, now| {
            make_room(bucket, key, now)?;
            let expires = ttl.and_then(|t| now.checked_add(t));
            bucket.put(key, value, expires, holder.limits)
        })
    }

    /// Removes `key`.
    pub fn remove(&self, plugin: &str, scope: Scope, caller: Caller<'_>, key: &str) {
        if let Ok((map, owner)) = self.owner_of(scope, caller)
            && let Some(mut owner) = map.get_mut(owner)
            && let Some(bucket) = owner.plugins.get_mut(plugin)
        {
            bucket.remove(key);
        }
    }

    /// Adds `delta` to the counter `key` atomically and returns the new value.
    /// A missing, expired or non-integer value counts as 0; `ttl` applies
    /// when the counter is (re)created.
    pub fn incr(
        &self,
        holder: &Holder,
        scope: Scope,
        caller: Caller<'_>,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        check_key(key)?;
        let (map, owner) = self.owner_of(scope, caller)?;
        // (The longest count: `-9223372036854775808`.)
        let adds = size(key, "") + 20;
        // The shard lock `write` holds makes read-modify-write atomic.
        self.write(holder, map, owner, adds, |bucket, now| {
            if let Some(slot) = bucket.get(key)
                && slot.live(now)
            {
                let value = slot.value.parse::<i64>().unwrap_or(0).saturating_add(delta);
                let expires = slot.expires;
                bucket.put(key, value.to_string(), expires, holder.limits)?;
                return Ok(value);
            }
            make_room(bucket, key, now)?;
            let expires = ttl.and_then(|t| now.checked_add(t));
            bucket.put(key, delta.to_string(), expires, holder.limits)?;
            Ok(delta)
        })
    }

    /// Runs `op` on the holder's bucket of `owner` in `map` (made if need be), under the
    /// owner's shard lock, once the plugin has room for a new key of `adds` bytes where it can
    /// be made (its expired keys dropped). A bucket, and an owner, that a refused write leaves
    /// empty go.
    fn write<T>(
        &self,
        holder: &Holder,
        map: &DashMap<Box<str>, Owner>,
        owner: &str,
        adds: u64,
        op: impl FnOnce(&mut Bucket, Instant) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        self.room_for(map, owner)?;
        let usage = self.usage_of(&holder.plugin);
        if !usage.fits(adds, holder.limits) {
            self.purge_expired(&holder.plugin, &usage);
        }
        let now = Instant::now();
        let used = self.now();
        let mut entry = map.entry(owner.into()).or_insert_with(|| Owner::new(used));
        *entry.used.get_mut() = used;
        let bucket = (entry.plugins)
            .entry(holder.plugin.clone())
            .or_insert_with(|| Bucket::new(usage));
        let result = op(bucket, now);
        if result.is_err() && bucket.is_empty() {
            entry.plugins.remove(&*holder.plugin);
        }
        let emptied = entry.plugins.is_empty();
        drop(entry);
        if emptied {
            map.remove_if(owner, |_, o| o.plugins.is_empty());
        }
        result
    }

    /// What `plugin` keeps, every owner together.
    fn usage_of(&self, plugin: &Arc<str>) -> Arc<Usage> {
        if let Some(usage) = self.usage.get(&**plugin) {
            return usage.clone();
        }
        self.usage.entry(plugin.clone()).or_default().clone()
    }

    /// Drops `plugin`'s expired keys from every owner, to make room: at most once per
    /// [`PURGE_EVERY_MS`] for a plugin (the sweep drops them all every 30 s anyway).
    fn purge_expired(&self, plugin: &str, usage: &Usage) {
        let now_ms = self.now();
        let from = usage.purge_from.load(Ordering::Acquire);
        if now_ms < from
            || (usage.purge_from)
                .compare_exchange(
                    from,
                    now_ms + PURGE_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        let now = Instant::now();
        for map in [&self.sessions, &self.principals, &self.global] {
            map.retain(|_, owner| {
                if let Some(bucket) = owner.plugins.get_mut(plugin) {
                    bucket.retain_live(now);
                    if bucket.is_empty() {
                        owner.plugins.remove(plugin);
                    }
                }
                !owner.plugins.is_empty()
            });
        }
    }

    /// Bytes of keys and values, and keys, that `plugin` keeps, every owner together (expired
    /// keys not yet dropped included).
    pub fn held_by(&self, plugin: &str) -> (u64, u64) {
        self.usage.get(plugin).map_or((0, 0), |u| {
            (
                u.bytes.load(Ordering::Acquire),
                u.entries.load(Ordering::Acquire),
            )
        })
    }

    /// Refuses a new session owner when [`MAX_SESSIONS`] sessions hold state.
    fn room_for(&self, map: &DashMap<Box<str>, Owner>, owner: &str) -> Result<(), StateError> {
        if std::ptr::eq(map, &self.sessions)
            && self.sessions.len() >= MAX_SESSIONS
            && !map.contains_key(owner)
        {
            return Err(StateError::TooManySessions);
        }
        Ok(())
    }

    /// Drops everything kept for a session (call when the session ends): here, or on the
    /// leading replica when replicas share state (in the background; what it cannot be told
    /// goes once unused for long).
    pub fn end_session(&self, session: &str) {
        self.tell_or_apply(session, Action::EndSession);
    }

    /// A session was deleted: its state goes, and where replicas share state (another one may
    /// still serve it) its plugins' operations are refused from now on.
    pub fn delete_session(&self, session: &str) {
        self.tell_or_apply(session, Action::DeleteSession);
    }

    fn tell_or_apply(&self, session: &str, action: Action) {
        let asked = Asked {
            plugin: Arc::from(""),
            session: session.to_owned(),
            principal: None,
            action,
            limits: StateLimits::default(),
        };
        match self.kept_elsewhere() {
            Some(leader) => leader.tell(&asked),
            // Taking the state over: applied once it is (what is taken over would replace it).
            None if self.shared() && !*self.settled.borrow() => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let Some(store) = self.this.get().and_then(std::sync::Weak::upgrade) else {
                    return;
                };
                runtime.spawn(async move {
                    let _ = store.run_here(&asked, 2 * leader::HANDOVER_TIMEOUT).await;
                });
            }
            None => {
                self.apply(&asked);
            }
        }
    }

    /// Drops a deleted session's state and, where replicas share state, remembers it.
    fn delete_here(&self, session: &str) {
        self.sessions.remove(session);
        if session.is_empty() || !self.shared() {
            return;
        }
        let now = self.now();
        let mut deleted = lock(&self.deleted);
        let id = deleted.hash(session);
        if deleted.insert(id, now) {
            drop(deleted);
            // This replica's own sessions of that id end at once (see `deletions_logged`).
            self.logged.send_modify(|n| *n += 1);
        }
    }

    /// Counts the deletions this replica logs, and each time its record starts afresh: where
    /// it leads, whoever holds its sessions reads the log at once when this changes, not at its
    /// next look.
    pub fn deletions_logged(&self) -> watch::Receiver<u64> {
        self.logged.subscribe()
    }

    /// A portable session is no longer served here, though its client may come back to any
    /// replica: its state stays where replicas share it, and goes when they do not.
    pub fn leave_session(&self, session: &str) {
        if self.leader.get().is_none() {
            self.sessions.remove(session);
        }
    }

    /// Drops everything.
    fn clear(&self) {
        self.led.store(false, Ordering::Release);
        if let Ok(mut handing) = self.handing.try_lock() {
            *handing = None;
        }
        self.sessions.clear();
        self.principals.clear();
        self.global.clear();
        *lock(&self.deleted) = Deleted::new(random_seed());
        self.logged.send_modify(|n| *n += 1);
    }

    /// Drops expired keys and empty owners, and where replicas share state, the state (and
    /// the deletion) of sessions unused for longer than they may be.
    pub fn sweep(&self) {
        let now = Instant::now();
        let idle = self
            .leader
            .get()
            .map(|(_, kept)| u64::try_from(kept.as_millis()).unwrap_or(u64::MAX));
        let used_since = self.now().saturating_sub(idle.unwrap_or(u64::MAX));
        {
            let mut deleted = lock(&self.deleted);
            while deleted
                .order
                .front()
                .is_some_and(|(_, at)| *at < used_since)
            {
                deleted.pop_oldest();
            }
        }
        for map in [&self.sessions, &self.principals, &self.global] {
            let sessions = std::ptr::eq(map, &self.sessions);
            map.retain(|_, owner| {
                if sessions && idle.is_some() && *owner.used.get_mut() < used_since {
                    return false;
                }
                owner.plugins.retain(|_, bucket| {
                    bucket.retain_live(now);
                    !bucket.is_empty()
                });
                !owner.plugins.is_empty()
            });
        }
    }

    /// Everything it holds, live, as JSON the next leader reads as a [`Snapshot`], written
    /// straight from the maps (no copy of the values) within `limit` bytes: the deleted
    /// sessions, then the plugins', the principals' and the sessions' keys, one owner at a
    /// time, as long as each fits (so one session holding much cannot cost every principal
    /// its limits). Returns it and how many owners did not fit.
    fn snapshot_json(&self, limit: usize) -> (Vec<u8>, usize) {
        let (now, used_now) = (Instant::now(), self.now());
        let mut out = Vec::new();
        {
            // (They fit whatever the limit: at most 100,000 pairs of numbers.)
            let deleted = lock(&self.deleted);
            let ids: Vec<(u64, u64)> = (deleted.order.iter())
                .map(|(id, at)| (*id, used_now.saturating_sub(*at)))
                .collect();
            out.extend_from_slice(format!("{{\"seed\":{},\"deleted\":", deleted.seed).as_bytes());
            serde_json::to_writer(&mut out, &ids).expect("numbers serialize");
        }
        out.extend_from_slice(b",\"owners\":[");
        let (mut first, mut left_out) = (true, 0);
        let mut one = Vec::new();
        let scopes = [
            (Scope::Global, &self.global),
            (Scope::Principal, &self.principals),
            (Scope::Session, &self.sessions),
        ];
        for (scope, map) in scopes {
            for entry in map.iter() {
                // (Room for this owner, a comma and the closing brackets.)
                let room = limit.saturating_sub(out.len() + 3);
                if room < SMALLEST_OWNER {
                    left_out += 1;
                    continue;
                }
                one.clear();
                let owner = OwnerOf {
                    scope,
                    entry,
                    now,
                    used_now,
                };
                // Written only as far as it fits: one owner may hold more than the limit.
                let mut bounded = Bounded {
                    written: &mut one,
                    limit: room,
                };
                if serde_json::to_writer(&mut bounded, &owner).is_err() {
                    left_out += 1;
                    continue;
                }
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                out.extend_from_slice(&one);
            }
        }
        out.extend_from_slice(b"]}");
        (out, left_out)
    }

    /// Holds what `snapshot` holds, within this store's bounds (another version's may be
    /// wider), added to what it holds; returns how many keys it took.
    fn restore(&self, snapshot: Snapshot) -> usize {
        let now = Instant::now();
        let used_now = self.now();
        let mut deleted = Deleted::new(snapshot.seed);
        for (id, ago) in snapshot.deleted {
            deleted.insert(id, used_now.saturating_sub(ago));
        }
        *lock(&self.deleted) = deleted;
        self.logged.send_modify(|n| *n += 1);
        let mut kept = 0;
        for taken in snapshot.owners {
            let map = match taken.scope {
                Scope::Session => &self.sessions,
                Scope::Principal => &self.principals,
                Scope::Global => &self.global,
            };
            if self.room_for(map, &taken.owner).is_err() {
                continue;
            }
            let mut owner = Owner::new(used_now.saturating_sub(taken.unused_ms));
            for (plugin, keys) in taken.plugins {
                let mut bucket = Bucket::new(self.usage_of(&plugin));
                for k in keys {
                    if check_key(&k.key).is_err()
                        || k.value.len() > MAX_VALUE_BYTES
                        || bucket.len() >= MAX_KEYS_PER_OWNER
                    {
                        continue;
                    }
                    let expires = k
                        .ttl_ms
                        .map(|ms| now.checked_add(Duration::from_millis(ms)));
                    let slot = Slot {
                        value: k.value,
                        // A time to live too long to count is none.
                        expires: expires.flatten(),
                    };
                    bucket.put_taken(k.key, slot);
                    kept += 1;
                }
                if !bucket.is_empty() {
                    owner.plugins.insert(plugin, bucket);
                }
            }
            if !owner.plugins.is_empty() {
                map.insert(taken.owner.into(), owner);
            }
        }
        kept
    }

    /// Number of live sessions that hold state (for tests and metrics).
    pub fn sessions_with_state(&self) -> usize {
        self.sessions.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    bucket.retain_live(now);
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
        let a = Holder::new("a");
        let b = Holder::new("b");
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
        let p = Holder::new("p");
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

    /// What a replica asks next of `log`, in pages of `most`.
    fn page_of(log: &Deleted, read: &DeletionsRead, most: usize) -> Deletions {
        match read.ask() {
            Action::DeletedSince { incarnation, after } => log.since(incarnation, after, most),
            other => panic!("asked {other:?}"),
        }
    }

    /// The log of deletions replicas read is numbered within one log and read in pages; a
    /// reader of another log (another leader, a record started afresh), or of a number the log
    /// never reached, reads it from its start; one the log's bound left behind is told how
    /// many it missed; and neither the log nor a page grows beyond its bound.
    #[test]
    fn the_log_of_deletions_is_read_in_pages_and_afresh_from_another_log() {
        let mut log = Deleted::new(7);
        for i in 0..10 {
            assert!(log.insert(log.hash(&format!("s{i}")), i));
        }
        assert!(!log.insert(log.hash("s3"), 20), "told twice, logged once");
        let mut read = DeletionsRead::default();
        let page = page_of(&log, &read, 4);
        assert_eq!(read.read(&page), Joined::Afresh, "nothing read yet");
        assert_eq!((page.from, page.ids.len(), page.more()), (0, 4, true));
        assert_eq!(page.ids[0], page.hash("s0"), "named as the record names it");
        let page = page_of(&log, &read, 4);
        assert_eq!(read.read(&page), Joined::Continued);
        assert_eq!((page.from, page.ids.len(), page.more()), (4, 4, true));
        let page = page_of(&log, &read, 4);
        assert_eq!((page.ids.len(), page.more()), (2, false));
        assert_eq!(read.read(&page), Joined::Continued);
        let page = page_of(&log, &read, 4);
        assert_eq!((page.ids.len(), page.more()), (0, false));
        assert_eq!(read.read(&page), Joined::Continued);
        log.insert(log.hash("s10"), 30);
        let page = page_of(&log, &read, 4);
        assert_eq!(page.ids, [page.hash("s10")]);
        assert_eq!(read.read(&page), Joined::Continued);

        // Another leader's log (or this one's, afresh) is read from its start, whatever
        // number the reader reached: nothing it holds is skipped.
        let mut other = Deleted::new(7);
        other.insert(other.hash("s0"), 0);
        assert_ne!(other.incarnation, log.incarnation);
        let page = page_of(&other, &read, 4);
        assert_eq!((page.from, page.ids.clone()), (0, vec![page.hash("s0")]));
        assert_eq!(read.read(&page), Joined::Afresh);
        // A number the log never reached (asked wrong): from its start too.
        let ahead = log.since(log.incarnation, log.end() + 5, 4);
        assert_eq!(ahead.from, log.first);

        // Past its bound the log drops its oldest: a reader that had not read them is told.
        let mut log = Deleted::new(1);
        let mut read = DeletionsRead::default();
        for i in 0..3 {
            log.insert(log.hash(&format!("a{i}")), 0);
        }
        let page = page_of(&log, &read, DELETIONS_PER_PAGE);
        read.read(&page);
        for i in 0..MAX_DELETED + 2 {
            log.insert(log.hash(&format!("b{i}")), 1);
        }
        assert_eq!((log.order.len(), log.ids.len()), (MAX_DELETED, MAX_DELETED));
        assert_eq!(log.first, 5, "a0..a2, b0 and b1 dropped");
        let mut page = page_of(&log, &read, DELETIONS_PER_PAGE);
        assert_eq!(read.read(&page), Joined::Missed(2), "b0 and b1, never read");
        assert_eq!(page.ids.len(), DELETIONS_PER_PAGE, "a page at most");
        let mut pages = 1;
        while page.more() {
            page = page_of(&log, &read, DELETIONS_PER_PAGE);
            assert_eq!(read.read(&page), Joined::Continued);
            pages += 1;
        }
        assert_eq!(read.next, log.end(), "read to the end");
        assert!(pages < DELETION_PAGES_AT_ONCE, "{pages} pages in one look");
        // A sweep drops the oldest too, and the numbers go on.
        let end = log.end();
        log.pop_oldest();
        assert_eq!((log.first, log.end()), (6, end));
        // A full page of the largest hashes fits in what a replica reads of an answer.
        let full = Deletions {
            incarnation: u64::MAX,
            seed: u64::MAX,
            from: u64::MAX,
            ids: vec![u64::MAX; DELETIONS_PER_PAGE],
            end: u64::MAX,
        };
        let outcome = full.clone().into_outcome();
        let wire = serde_json::to_vec(&outcome).unwrap();
        assert!(wire.len() < 512 * 1024, "{} bytes", wire.len());
        let back: Outcome = serde_json::from_slice(&wire).unwrap();
        assert_eq!(Deletions::from_outcome(&back), Some(full));
        assert_eq!(Deletions::from_outcome(&Outcome::Value(None)), None);
    }

    /// A leader logs each session deleted (once), says so at once to whoever follows its log,
    /// and answers a replica's question with the page; the next leader takes the deletions over
    /// as a new log, which a replica that read the last one reads whole, its ids named alike.
    #[tokio::test]
    async fn a_leader_logs_deletions_and_the_next_one_serves_them_as_a_new_log() {
        let (_leading, [old, new]) = led_alone(Duration::from_secs(600)).await;
        let asked = |session: &str, action| Asked {
            plugin: Arc::from(""),
            session: session.into(),
            principal: None,
            action,
            limits: StateLimits::default(),
        };
        let mut logged = old.deletions_logged();
        logged.borrow_and_update();
        old.apply(&asked("s1", Action::DeleteSession));
        assert!(logged.has_changed().unwrap(), "told at once");
        logged.borrow_and_update();
        old.apply(&asked("s1", Action::DeleteSession));
        assert!(
            !logged.has_changed().unwrap(),
            "a deletion told again is not new"
        );
        old.apply(&asked("s2", Action::DeleteSession));
        let mut read = DeletionsRead::default();
        let ask = |store: &StateStore, read: &DeletionsRead| {
            let outcome = store.apply(&asked("", read.ask()));
            Deletions::from_outcome(&outcome).expect("a page")
        };
        let page = ask(&old, &read);
        assert_eq!(page.ids, [page.hash("s1"), page.hash("s2")]);
        read.read(&page);
        assert!(ask(&old, &read).ids.is_empty());

        let (bytes, _) = old.snapshot_json(usize::MAX);
        new.restore(serde_json::from_slice(&bytes).unwrap());
        let page = ask(&new, &read);
        assert_eq!(read.read(&page), Joined::Afresh);
        assert_eq!(page.ids, [page.hash("s1"), page.hash("s2")]);
        assert!(ask(&new, &read).ids.is_empty());
    }

    /// The senders behind a [`Leader`] that leads with nobody to take over from: kept while
    /// it is to go on leading so.
    struct Leading {
        _lead: tokio::sync::watch::Sender<bool>,
        _relay: tokio::sync::watch::Sender<Option<String>>,
        _secret: tokio::sync::watch::Sender<Option<Arc<crate::replica_key::ReplicaKey>>>,
        _handover: tokio::sync::watch::Sender<Handover>,
    }

    /// `N` stores sharing state through one such leader (sessions idle for `idle`), settled.
    async fn led_alone<const N: usize>(idle: Duration) -> (Leading, [Arc<StateStore>; N]) {
        let (lead, leads) = tokio::sync::watch::channel(true);
        let (relay_at, relay) = tokio::sync::watch::channel(None);
        let (secret_is, secret) = tokio::sync::watch::channel(None);
        let (handing, handover) = tokio::sync::watch::channel(Handover::Nobody);
        let leader = Leader::new(leads, relay, secret, handover);
        let stores = [(); N].map(|_| Arc::new(StateStore::default()));
        for store in &stores {
            store.share_through(leader.clone(), idle);
            store.settled.subscribe().wait_for(|s| *s).await.unwrap();
        }
        let leading = Leading {
            _lead: lead,
            _relay: relay_at,
            _secret: secret_is,
            _handover: handing,
        };
        (leading, stores)
    }

    /// The state of a session that another replica may still serve is kept when this one
    /// lets it go, and dropped once unused for as long as it may idle (or deleted).
    #[tokio::test]
    async fn shared_session_state_outlives_a_replica_not_its_use() {
        let idle = Duration::from_millis(200);
        // It leads, with nobody to take over from: settled at once.
        let (_leading, [store]) = led_alone(idle).await;
        let p = Holder::new("p");
        let asked = |session: &str, action| Asked {
            plugin: p.plugin.clone(),
            session: session.into(),
            principal: None,
            action,
            limits: StateLimits::default(),
        };
        for s in ["kept", "idle", "deleted"] {
            let set = Action::Set {
                scope: Scope::Session,
                key: "taint".into(),
                value: "1".into(),
                ttl_ms: None,
            };
            assert_eq!(store.apply(&asked(s, set)), Outcome::Done);
            store.leave_session(s);
        }
        store.delete_session("deleted");
        assert_eq!(store.sessions_with_state(), 2, "left, not ended: kept");
        let incr = Action::Incr {
            scope: Scope::Session,
            key: "n".into(),
            delta: 1,
            ttl_ms: None,
        };
        assert_eq!(
            store.apply(&asked("deleted", incr.clone())),
            Outcome::SessionDeleted,
            "another replica may still serve it: refused, not counted afresh"
        );
        let global = Action::Incr {
            scope: Scope::Global,
            key: "n".into(),
            delta: 1,
            ttl_ms: None,
        };
        assert_eq!(store.apply(&asked("deleted", global)), Outcome::Count(1));
        let started = Instant::now();
        while started.elapsed() < idle + Duration::from_millis(50) {
            assert!(
                store
                    .get("p", Scope::Session, caller("kept"), "taint")
                    .is_some()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        store.sweep();
        assert_eq!(
            store
                .get("p", Scope::Session, caller("kept"), "taint")
                .as_deref(),
            Some("1"),
            "in use"
        );
        assert_eq!(
            store.sessions_with_state(),
            1,
            "unused for longer than idle"
        );
        assert_eq!(
            store.apply(&asked("deleted", incr)),
            Outcome::Count(1),
            "a deletion is remembered as long as the session's state would be"
        );
    }

    /// What a leader kept reaches the next one whole: every scope, what is left of each time
    /// to live, and the deleted sessions (still refused there); never beyond its bounds.
    #[tokio::test]
    async fn the_next_leader_takes_over_what_the_last_one_kept() {
        let (_leading, [old, new]) = led_alone(Duration::from_secs(600)).await;
        let p = Holder::new("p");
        let asked = |session: &str, principal: Option<&str>, action| Asked {
            plugin: p.plugin.clone(),
            session: session.into(),
            principal: principal.map(str::to_owned),
            action,
            limits: StateLimits::default(),
        };
        let set = |scope, key: &str, ttl_ms| Action::Set {
            scope,
            key: key.into(),
            value: format!("{key}-value"),
            ttl_ms,
        };
        let incr = |scope| Action::Incr {
            scope,
            key: "n".into(),
            delta: 3,
            ttl_ms: None,
        };
        old.apply(&asked(
            "s1",
            Some("alice"),
            set(Scope::Session, "taint", None),
        ));
        old.apply(&asked("s1", Some("alice"), incr(Scope::Principal)));
        old.apply(&asked("s1", None, incr(Scope::Global)));
        old.apply(&asked(
            "s1",
            None,
            set(Scope::Global, "brief", Some(60_000)),
        ));
        old.apply(&asked("s1", None, set(Scope::Global, "gone", Some(1))));
        old.apply(&asked("s2", None, set(Scope::Session, "taint", None)));
        old.apply(&asked("s2", None, Action::DeleteSession));
        std::thread::sleep(Duration::from_millis(5));

        let (bytes, left_out) = old.snapshot_json(usize::MAX);
        assert_eq!(left_out, 0);
        // Within a bound: whole owners left out (the last written, a session), and still
        // readable.
        let (bounded, left_out) = old.snapshot_json(bytes.len() - 1);
        assert!(bounded.len() < bytes.len() && left_out == 1, "{left_out}");
        let partial: Snapshot = serde_json::from_slice(&bounded).unwrap();
        assert!(partial.owners.iter().any(|o| o.scope == Scope::Global));
        assert_eq!(partial.deleted.len(), 1);
        let mut snapshot: Snapshot = serde_json::from_slice(&bytes).unwrap();
        // Beyond this version's bounds (another's may be wider): left out, not refused whole.
        snapshot.owners.push(KeptOwner {
            scope: Scope::Principal,
            owner: "mallory".into(),
            unused_ms: 0,
            plugins: vec![(
                p.plugin.clone(),
                vec![
                    KeptKey {
                        key: "k".repeat(MAX_KEY_BYTES + 1),
                        value: "v".into(),
                        ttl_ms: None,
                    },
                    KeptKey {
                        key: "big".into(),
                        value: "v".repeat(MAX_VALUE_BYTES + 1),
                        ttl_ms: None,
                    },
                ],
            )],
        });
        assert_eq!(new.restore(snapshot), 4, "the live keys that fit");
        let on_new = |session: &str, principal: Option<&str>, action| {
            new.apply(&asked(session, principal, action))
        };
        let get = |scope, key: &str| Action::Get {
            scope,
            key: key.into(),
        };
        assert_eq!(
            on_new("s1", None, get(Scope::Session, "taint")),
            Outcome::Value(Some("taint-value".into()))
        );
        assert_eq!(
            on_new("s9", Some("alice"), incr(Scope::Principal)),
            Outcome::Count(6)
        );
        assert_eq!(on_new("s9", None, incr(Scope::Global)), Outcome::Count(6));
        assert_eq!(
            on_new("s9", None, get(Scope::Global, "brief")),
            Outcome::Value(Some("brief-value".into()))
        );
        assert_eq!(
            on_new("s9", None, get(Scope::Global, "gone")),
            Outcome::Value(None)
        );
        assert_eq!(
            on_new("s2", None, get(Scope::Session, "taint")),
            Outcome::SessionDeleted,
            "a deleted session stays refused"
        );
        assert_eq!(
            on_new("s3", Some("mallory"), get(Scope::Principal, "big")),
            Outcome::Value(None)
        );
        let brief = new.global.get(GLOBAL).unwrap().plugins[&p.plugin]
            .get("brief")
            .unwrap()
            .expires;
        let left = brief.unwrap().duration_since(Instant::now());
        assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(50),
            "what is left of its time to live: {left:?}"
        );
    }

    /// A replica that no longer leads keeps what it kept for the next leader, and drops it
    /// once another is known to lead and has had time to take it over; not before (the API
    /// server unreachable, it may take its own lease back).
    #[tokio::test]
    async fn what_a_replica_kept_goes_once_another_leads() {
        let (lead, leads) = tokio::sync::watch::channel(true);
        let (relay_at, relay) = tokio::sync::watch::channel(None);
        let (_secret, secret) = tokio::sync::watch::channel(None);
        let (_handover, handover) = tokio::sync::watch::channel(Handover::Nobody);
        let store = Arc::new(StateStore::default());
        store.share_through(
            Leader::new(leads, relay, secret, handover),
            Duration::from_secs(600),
        );
        store.settled.subscribe().wait_for(|s| *s).await.unwrap();
        let asked = Asked {
            plugin: "p".into(),
            session: String::new(),
            principal: None,
            action: Action::Incr {
                scope: Scope::Global,
                key: "n".into(),
                delta: 1,
                ttl_ms: None,
            },
            limits: StateLimits::default(),
        };
        assert_eq!(store.apply(&asked), Outcome::Count(1));
        lead.send_replace(false);
        tokio::time::sleep(HANDED_OVER_WITHIN * 2).await;
        assert!(!store.is_empty(), "nobody else leads: kept");
        assert!(store.hand_over().await.is_some());
        relay_at.send_replace(Some("http://127.0.0.1:9".into()));
        let started = Instant::now();
        while !store.is_empty() {
            assert!(started.elapsed() < HANDED_OVER_WITHIN * 3, "dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.hand_over().await.is_none());
    }

    #[test]
    fn sessions_holding_state_are_bounded() {
        let store = StateStore::default();
        let p = Holder::new("p");
        for i in 0..MAX_SESSIONS {
            store
                .incr(&p, Scope::Session, caller(&i.to_string()), "n", 1, None)
                .unwrap();
        }
        assert_eq!(
            store.incr(&p, Scope::Session, caller("one more"), "n", 1, None),
            Err(StateError::TooManySessions)
        );
        assert_eq!(
            store.incr(&p, Scope::Session, caller("7"), "n", 1, None),
            Ok(2),
            "a session that holds state keeps using it"
        );
        store.end_session("7");
        assert_eq!(
            store.incr(&p, Scope::Session, caller("one more"), "n", 1, None),
            Ok(1)
        );
    }

    #[test]
    fn operations_travel_as_json_and_apply_as_called() {
        let store = StateStore::default();
        let asked = |action| Asked {
            plugin: "p".into(),
            session: "s".into(),
            principal: Some("alice".into()),
            action,
            limits: StateLimits::default(),
        };
        let incr = asked(Action::Incr {
            scope: Scope::Principal,
            key: "n".into(),
            delta: 5,
            ttl_ms: Some(60_000),
        });
        let wire = serde_json::to_string(&incr).unwrap();
        assert_eq!(
            wire,
            r#"{"plugin":"p","session":"s","principal":"alice","action":{"op":"incr","scope":"principal","key":"n","delta":5,"ttl_ms":60000},"limits":{"bytes":16777216,"entries":200000}}"#
        );
        let back: Asked = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, incr);
        // From a replica of a version without limits: the default ones.
        let older = r#"{"plugin":"p","session":"s","principal":"alice","action":{"op":"incr","scope":"principal","key":"n","delta":5,"ttl_ms":60000}}"#;
        assert_eq!(serde_json::from_str::<Asked>(older).unwrap(), incr);
        assert_eq!(store.apply(&back), Outcome::Count(5));
        assert_eq!(
            store
                .get("p", Scope::Principal, caller("other"), "n")
                .as_deref(),
            Some("5")
        );
        let too_big = asked(Action::Set {
            scope: Scope::Session,
            key: "k".into(),
            value: "v".repeat(MAX_VALUE_BYTES + 1),
            ttl_ms: None,
        });
        assert_eq!(
            store.apply(&too_big),
            Outcome::Refused(StateError::ValueTooLarge.to_string())
        );
        let get = asked(Action::Get {
            scope: Scope::Principal,
            key: "n".into(),
        });
        assert_eq!(
            serde_json::to_string(&store.apply(&get)).unwrap(),
            r#"{"value":"5"}"#
        );
        store.apply(&asked(Action::Remove {
            scope: Scope::Principal,
            key: "n".into(),
        }));
        assert_eq!(store.apply(&get), Outcome::Value(None));
    }

    /// What `plugin` holds, counted afresh from the maps.
    fn recount(store: &StateStore, plugin: &str) -> (u64, u64) {
        let (mut bytes, mut entries) = (0, 0);
        for map in [&store.sessions, &store.principals, &store.global] {
            for owner in map.iter() {
                if let Some(bucket) = owner.plugins.get(plugin) {
                    for (k, slot) in bucket.iter() {
                        bytes += size(k, &slot.value);
                        entries += 1;
                    }
                }
            }
        }
        (bytes, entries)
    }

    /// A plugin keyed by what clients choose (a session each) cannot hold more than its limits,
    /// every owner together; the write past them is refused with the limit it met, and another
    /// plugin is not affected. What an owner's end gives back makes room again.
    #[test]
    fn a_plugins_state_is_bounded_every_owner_together() {
        let store = StateStore::default();
        let small = Holder {
            plugin: "small".into(),
            limits: StateLimits {
                bytes: 9_500,
                entries: 1_000,
            },
        };
        let value = || "v".repeat(999);
        for i in 0..9 {
            let session = format!("s{i}");
            store
                .set(&small, Scope::Session, caller(&session), "k", value(), None)
                .unwrap();
        }
        assert_eq!(store.held_by("small"), (9000, 9));
        assert_eq!(
            store.set(&small, Scope::Session, caller("s9"), "k", value(), None),
            Err(StateError::PluginBytes(9_500))
        );
        assert_eq!(
            store.incr(&small, Scope::Principal, caller("s9"), "n", 1, None),
            Ok(1),
            "a counter still fits"
        );
        assert_eq!(
            store.set(
                &small,
                Scope::Session,
                caller("s0"),
                "k",
                "v".repeat(1990),
                None
            ),
            Err(StateError::PluginBytes(9_500)),
            "nor can a value grow past it"
        );
        assert_eq!(
            store.sessions_with_state(),
            9,
            "a refused write leaves no owner behind"
        );
        let other = Holder::new("other");
        store
            .set(&other, Scope::Session, caller("s9"), "k", value(), None)
            .unwrap();
        assert_eq!(store.held_by("other"), (1000, 1));
        assert!(
            StateError::PluginBytes(9_500)
                .to_string()
                .contains("state_max_bytes"),
            "the plugin is told which limit"
        );
        // A smaller value gives bytes back; a session's end gives back all it held.
        store
            .set(&small, Scope::Session, caller("s0"), "k", "v".into(), None)
            .unwrap();
        assert_eq!(store.held_by("small"), (9002 - 998, 10));
        store.end_session("s1");
        store
            .set(&small, Scope::Session, caller("s9"), "k", value(), None)
            .unwrap();
        assert_eq!(store.held_by("small"), recount(&store, "small"));

        let few = Holder {
            plugin: "few".into(),
            limits: StateLimits {
                bytes: 1 << 20,
                entries: 3,
            },
        };
        for key in ["a", "b", "c"] {
            store
                .set(&few, Scope::Global, caller("s"), key, "1".into(), None)
                .unwrap();
        }
        assert_eq!(
            store.set(&few, Scope::Principal, caller("s"), "d", "1".into(), None),
            Err(StateError::PluginEntries(3))
        );
        assert_eq!(
            store.incr(&few, Scope::Session, caller("s"), "n", 1, None),
            Err(StateError::PluginEntries(3))
        );
        assert!(
            StateError::PluginEntries(3)
                .to_string()
                .contains("state_max_entries")
        );
        store
            .set(&few, Scope::Global, caller("s"), "a", "2".into(), None)
            .unwrap();
        store.remove("few", Scope::Global, caller("s"), "b");
        store
            .set(&few, Scope::Principal, caller("s"), "d", "1".into(), None)
            .unwrap();
        assert_eq!(store.held_by("few"), (6, 3));
        assert_eq!(store.held_by("few"), recount(&store, "few"));
    }

    /// Expired keys make room: a plugin at its limits has them dropped from every owner before
    /// a write is refused (nothing live is evicted).
    #[test]
    fn expired_keys_make_room_for_a_plugin_at_its_limits() {
        let store = StateStore::default();
        let p = Holder {
            plugin: "p".into(),
            limits: StateLimits {
                bytes: 1 << 20,
                entries: 10,
            },
        };
        let brief = Some(Duration::from_millis(20));
        for i in 0..5 {
            let session = format!("s{i}");
            let c = Caller {
                session: &session,
                principal: None,
            };
            store
                .set(&p, Scope::Session, c, "k", "1".into(), brief)
                .unwrap();
            store
                .set(&p, Scope::Session, c, "kept", "1".into(), None)
                .unwrap();
        }
        assert_eq!(
            store.set(&p, Scope::Global, caller("x"), "k", "1".into(), None),
            Err(StateError::PluginEntries(10))
        );
        std::thread::sleep(Duration::from_millis(30));
        for i in 0..5 {
            store
                .set(
                    &p,
                    Scope::Global,
                    caller("x"),
                    &i.to_string(),
                    "1".into(),
                    None,
                )
                .unwrap();
        }
        assert_eq!(store.held_by("p"), (35, 10));
        assert_eq!(
            store.set(&p, Scope::Global, caller("x"), "one more", "1".into(), None),
            Err(StateError::PluginEntries(10)),
            "the live keys stay"
        );
        assert_eq!(store.held_by("p"), recount(&store, "p"));
    }

    /// What a plugin holds is counted exactly however its keys go (a sweep, a reset, a
    /// handover), and writers racing for the last room never take more than the limits.
    #[test]
    fn what_a_plugin_holds_is_counted_exactly() {
        let store = Arc::new(StateStore::default());
        let p = Holder {
            plugin: "p".into(),
            limits: StateLimits {
                bytes: 50_000,
                entries: 400,
            },
        };
        std::thread::scope(|s| {
            for t in 0..8 {
                let (store, p) = (&store, &p);
                s.spawn(move || {
                    for i in 0..200 {
                        let session = format!("t{t}-{}", i % 50);
                        let c = Caller {
                            session: &session,
                            principal: Some("alice"),
                        };
                        let _ = store.set(
                            p,
                            Scope::Session,
                            c,
                            &format!("k{i}"),
                            "v".repeat(i % 300),
                            None,
                        );
                        let _ = store.incr(p, Scope::Principal, c, &format!("n{}", i % 7), 1, None);
                        if i % 3 == 0 {
                            store.remove("p", Scope::Session, c, &format!("k{}", i / 2));
                        }
                    }
                });
            }
        });
        let (bytes, entries) = store.held_by("p");
        assert!(bytes <= 50_000 && entries <= 400, "{bytes} {entries}");
        assert_eq!((bytes, entries), recount(&store, "p"));
        let (snapshot, _) = store.snapshot_json(usize::MAX);
        store.sweep();
        assert_eq!(store.held_by("p"), recount(&store, "p"));
        store.clear();
        assert_eq!(store.held_by("p"), (0, 0), "a reset gives it all back");
        store.restore(serde_json::from_slice(&snapshot).unwrap());
        assert_eq!(store.held_by("p"), (bytes, entries), "taken over: counted");
        for i in 0..50 {
            store.end_session(&format!("t0-{i}"));
        }
        assert_eq!(store.held_by("p"), recount(&store, "p"));
    }

    #[test]
    fn bounds() {
        let store = StateStore::default();
        let p = Holder::new("p");
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
