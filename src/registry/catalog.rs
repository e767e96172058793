//! The catalog: `server.json` documents (schema 2025-12-11), every version kept, one of
//! each server's versions `latest`, each with a status; validated on the way in, naming
//! the JSON path at fault.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::visibility::Visible;
use serde_json::Value;

/// The `$schema` of the documents this catalog speaks.
pub const SCHEMA: &str =
    "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json";
/// The `_meta` key of the registry's own facts about a version (as the official registry).
pub const OFFICIAL_META: &str = "io.modelcontextprotocol.registry/official";
/// The `_meta` key of our own facts: labels and approval.
pub const GATEHOUSE_META: &str = "dev.gatehouse/registry";
/// Most versions one catalog holds (a bound on memory and on the file).
pub const MAX_VERSIONS: usize = 10_000;
/// Largest `server.json` accepted, in bytes.
pub const MAX_DOCUMENT: usize = 64 * 1024;

/// A document refused: `path` names the part at fault (`$.packages[0].transport.type`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DocumentError {
    /// JSON path of the offending value.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

fn refuse(path: impl Into<String>, message: impl Into<String>) -> DocumentError {
    DocumentError {
        path: path.into(),
        message: message.into(),
    }
}

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The document is not a valid `server.json`.
    #[error(transparent)]
    Invalid(#[from] DocumentError),
    /// No such server or version.
    #[error("server not found")]
    NotFound,
    /// The version exists already (publish does not replace).
    #[error("{name} version {version} is already in the catalog; replace it instead")]
    Exists {
        /// Server name.
        name: String,
        /// Version.
        version: String,
    },
    /// The catalog is full.
    #[error("the catalog holds {MAX_VERSIONS} versions already")]
    Full,
    /// Other writers kept changing the versions this change touches.
    #[error("the catalog kept changing under this change: try again")]
    Contended,
    /// The catalog's file or shared store could not be read or written.
    #[error("catalog store {path}: {message}")]
    Store {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// A version's status, as the official registry reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Listed and installable.
    Active,
    /// Listed, marked as not to be installed anew.
    Deprecated,
    /// Hidden unless asked for (`include_deleted`).
    Deleted,
}

/// One version of a server: its document and what the registry knows of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Version {
    /// The `server.json` document, as given.
    pub server: Value,
    /// Its status.
    pub status: Status,
    /// Why the status was set, when someone said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// When it was published (RFC 3339).
    pub published_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// When its status last changed.
    pub status_changed_at: String,
    /// The operator's labels (what the registry's filters see): set through the admin API,
    /// never taken from a document (whose publisher writes its `_meta`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The resourceVersion it was read or written at, in a shared store.
    #[serde(skip)]
    pub resource_version: Option<String>,
}

/// One version as the registry's filters see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The server's name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its description.
    pub description: Option<String>,
    /// The operator's labels, `key=value`.
    pub labels: Vec<String>,
}

/// Most labels on a version.
pub const MAX_LABELS: usize = 32;

/// Takes our own block out of a document's `_meta` (it is the operator's to say, not the
/// publisher's), returning the labels it held.
fn take_our_meta(server: &mut Value) -> BTreeMap<String, String> {
    let Some(meta) = server.get_mut("_meta").and_then(Value::as_object_mut) else {
        return BTreeMap::new();
    };
    let ours = meta.remove(GATEHOUSE_META);
    if meta.is_empty() {
        server.as_object_mut().map(|o| o.remove("_meta"));
    }
    ours.and_then(|o| o.get("labels").and_then(Value::as_object).cloned())
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
        .collect()
}

/// Checks an operator's labels: at most [`MAX_LABELS`], keys and values of at most 63
/// letters, digits and `-._/`, keys not empty.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), DocumentError> {
    if labels.len() > MAX_LABELS {
        return Err(refuse("$.labels", format!("at most {MAX_LABELS} labels")));
    }
    let plain = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._/".contains(c))
    };
    for (k, v) in labels {
        if k.is_empty() || !plain(k) || !plain(v) {
            return Err(refuse(
                format!("$.labels.{k}"),
                "keys and values are at most 63 letters, digits and -._/ (keys not empty)",
            ));
        }
    }
    Ok(())
}

impl Version {
    /// Its server's name.
    pub fn name(&self) -> &str {
        self.server["name"].as_str().unwrap_or_default()
    }

    /// Its version.
    pub fn version(&self) -> &str {
        self.server["version"].as_str().unwrap_or_default()
    }

    /// Checks a version read from a shared store as one given to the catalog is checked
    /// (its document, its labels, its size); drops our block of the document's `_meta`.
    pub fn check(&mut self) -> Result<(), DocumentError> {
        validate(&self.server)?;
        let size = serde_json::to_vec(&self.server).map_or(usize::MAX, |b| b.len());
        if size > MAX_DOCUMENT {
            return Err(refuse("$", format!("{size} bytes; at most {MAX_DOCUMENT}")));
        }
        take_our_meta(&mut self.server);
        check_labels(&self.labels)?;
        if let Some(m) = &self.status_message {
            status_message(m, "$.statusMessage")?;
        }
        for (field, t) in [
            ("publishedAt", &self.published_at),
            ("updatedAt", &self.updated_at),
            ("statusChangedAt", &self.status_changed_at),
        ] {
            if t.len() > 64 || t.parse::<jiff::Timestamp>().is_err() {
                return Err(refuse(format!("$.{field}"), "must be an RFC 3339 time"));
            }
        }
        Ok(())
    }

    /// The `_meta` of a response: the official block, and ours.
    pub fn meta(&self, is_latest: bool) -> Value {
        let mut official = serde_json::json!({
            "status": self.status,
            "publishedAt": self.published_at,
            "updatedAt": self.updated_at,
            "statusChangedAt": self.status_changed_at,
            "isLatest": is_latest,
        });
        if let Some(m) = &self.status_message {
            official["statusMessage"] = Value::String(m.clone());
        }
        let mut meta = serde_json::json!({ OFFICIAL_META: official });
        if !self.labels.is_empty() {
            meta[GATEHOUSE_META] = serde_json::json!({ "labels": self.labels });
        }
        meta
    }
}

/// What another registry said of a version it served (its official `_meta` block).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Facts {
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    status_message: Option<String>,
    #[serde(default, deserialize_with = "time")]
    published_at: Option<String>,
    #[serde(default, deserialize_with = "time")]
    status_changed_at: Option<String>,
}

/// An RFC 3339 time, written again in UTC.
fn time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let t: jiff::Timestamp = s
        .parse()
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))?;
    Ok(Some(
        humantime::format_rfc3339_millis(SystemTime::from(t)).to_string(),
    ))
}

/// What a list asks for (the official registry's query parameters).
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// Start after this (name, version).
    pub after: Option<(String, String)>,
    /// Page size.
    pub limit: usize,
    /// Case-insensitive substring of the name or the description.
    pub search: Option<String>,
    /// Only versions updated after this time.
    pub updated_since: Option<SystemTime>,
    /// Only each server's latest version.
    pub latest_only: bool,
    /// Only this version.
    pub version: Option<String>,
    /// Deleted versions too.
    pub include_deleted: bool,
    /// Servers the caller may see (the registry's filters).
    pub visible: super::visibility::Visible,
}

/// A page of versions: (document, `_meta`) pairs, and where the next page starts.
pub struct Page {
    /// The versions.
    pub items: Vec<(Value, Value)>,
    /// The last item's (name, version), when the page is full.
    pub next: Option<(String, String)>,
}

/// An operator's labels.
type Labels = BTreeMap<String, String>;

/// The versions of every server, by name.
type State = BTreeMap<String, Vec<Version>>;

/// Where the catalog is kept besides memory.
enum Store {
    /// Nowhere: it starts from the default documents each time.
    Memory,
    /// A file, written whole on each change.
    File(PathBuf),
    /// A store every replica shares (one `McpRegistryEntry` resource per version).
    Shared(Arc<dyn SharedStore>),
}

/// A write to a [`SharedStore`] refused or failed.
#[derive(Debug)]
pub enum SharedWrite {
    /// Someone else wrote (or removed) that version since it was read.
    Conflict,
    /// The store failed.
    Failed(CatalogError),
}

/// What a shared store holds, listed at one moment.
#[derive(Debug, Default)]
pub struct Listing {
    /// Its valid versions.
    pub versions: Vec<Version>,
    /// How many objects it holds, valid or not.
    pub objects: usize,
    /// The list's resourceVersion: every write up to it is in the list.
    pub resource_version: Option<String>,
}

/// A store the catalog's versions are shared through, one version at a time; writes are
/// conditional on the `resource_version` read, so no writer overwrites another's change
/// unseen. The store's own changes come back through [`Catalog::absorb`] and friends.
pub trait SharedStore: Send + Sync {
    /// Where it is kept, for messages.
    fn describe(&self) -> String;
    /// Every version stored.
    fn list(&self) -> BoxFuture<'_, Result<Listing, CatalogError>>;
    /// Follows the store's changes (every replica's) into `catalog` until it is dropped.
    fn follow(&self, catalog: std::sync::Weak<Catalog>) -> tokio::task::JoinHandle<()>;
    /// Writes `v`: created when it has no `resource_version`, else replaced at it. Returns
    /// its new `resource_version`.
    fn write<'a>(&'a self, v: &'a Version) -> BoxFuture<'a, Result<String, SharedWrite>>;
    /// Version `version` of `name` as stored now (`None`: it is not; an error when what is
    /// stored is not a valid version).
    fn read<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<Option<Version>, CatalogError>>;
}

/// How many times a write is decided again after another replica's write got there first.
const WRITE_ATTEMPTS: usize = 8;

/// The catalog, kept in memory and, when it has one, in its file or its shared store.
pub struct Catalog {
    state: RwLock<State>,
    store: Store,
    /// One change at a time (each is decided on the state it replaces).
    writing: tokio::sync::Mutex<()>,
    /// Follows a shared store's changes.
    follower: std::sync::OnceLock<tokio::task::AbortHandle>,
    /// Versions removed from a shared store, with the resourceVersion they were removed at:
    /// a write of ours answered before the removal but taken in after it does not bring
    /// them back. Taken with `state` held.
    removed: std::sync::Mutex<HashMap<(String, String), u64>>,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Some(f) = self.follower.get() {
            f.abort();
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A resourceVersion as the number the API server makes it.
fn number(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|r| r.parse::<u64>().ok())
}

/// Whether `incoming` (a resourceVersion) may replace `held`: not when both are numbers (as
/// the API server's are) and `incoming` is the older, which a lagging watch delivers after
/// a write of ours it has not reached yet.
fn not_older(incoming: Option<&str>, held: Option<&str>) -> bool {
    match (
        incoming.and_then(|r| r.parse::<u64>().ok()),
        held.and_then(|r| r.parse::<u64>().ok()),
    ) {
        (Some(i), Some(h)) => i >= h,
        _ => true,
    }
}

/// Orders two versions of a server as the official registry does: semantic versions by
/// precedence, above anything that is not one; two that are not, by when they were
/// published (then in the order they came).
fn version_order(versions: &[Version], a: usize, b: usize) -> std::cmp::Ordering {
    let (x, y) = (&versions[a], &versions[b]);
    match (
        semver::Version::parse(x.version()),
        semver::Version::parse(y.version()),
    ) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
        (Err(_), Ok(_)) => std::cmp::Ordering::Less,
        (Err(_), Err(_)) => x.published_at.cmp(&y.published_at).then(a.cmp(&b)),
    }
}

/// The index of the latest of the versions `shown` keeps: the highest, whatever its status (a
/// deleted latest version is not replaced by an older one, as in the official registry),
/// among those a caller sees (no hidden newer one shows through `isLatest`).
fn latest_shown(versions: &[Version], shown: impl Fn(&Version) -> bool) -> Option<usize> {
    (0..versions.len())
        .filter(|&i| shown(&versions[i]))
        .max_by(|&a, &b| version_order(versions, a, b))
}

/// The versions `next` holds that `before` does not hold as they are.
fn changed(before: &State, next: &State) -> Vec<Version> {
    next.iter()
        .flat_map(|(name, versions)| {
            // Each version is compared with the one of its number alone: a name with thousands
            // of versions costs a look-up each, not a comparison with every other.
            let old: BTreeMap<&str, &Version> = before
                .get(name)
                .into_iter()
                .flatten()
                .map(|o| (o.version(), o))
                .collect();
            versions
                .iter()
                .filter(move |v| old.get(v.version()).is_none_or(|o| *o != *v))
        })
        .cloned()
        .collect()
}

/// Publishes `server` (checked) into `state`, with `labels`.
fn publish_into(
    state: &mut State,
    server: Value,
    labels: BTreeMap<String, String>,
) -> Result<(String, String), CatalogError> {
    let name = server["name"].as_str().unwrap_or_default().to_string();
    let version = server["version"].as_str().unwrap_or_default().to_string();
    let count: usize = state.values().map(Vec::len).sum();
    let versions = state.entry(name.clone()).or_default();
    if versions.iter().any(|v| v.version() == version) {
        return Err(CatalogError::Exists { name, version });
    }
    if count >= MAX_VERSIONS {
        return Err(CatalogError::Full);
    }
    let at = now();
    versions.push(Version {
        server,
        status: Status::Active,
        status_message: None,
        published_at: at.clone(),
        updated_at: at.clone(),
        status_changed_at: at,
        labels,
        resource_version: None,
    });
    Ok((name, version))
}

/// The gateway's own documents (its default catalog), checked, with their labels, which are
/// the operator's.
fn trusted(documents: &[Value]) -> Result<Vec<(Value, Labels)>, CatalogError> {
    documents
        .iter()
        .map(|d| {
            let mut server = d.clone();
            validate(&server)?;
            let labels = take_our_meta(&mut server);
            Ok((server, labels))
        })
        .collect()
}

/// A catalog's versions holding `documents` (the gateway's own).
fn seeded(documents: &[Value]) -> Result<State, CatalogError> {
    let mut state = State::new();
    for (server, labels) in trusted(documents)? {
        publish_into(&mut state, server, labels)?;
    }
    Ok(state)
}

impl Catalog {
    fn with(state: State, store: Store) -> Self {
        Catalog {
            state: RwLock::new(state),
            store,
            writing: tokio::sync::Mutex::new(()),
            follower: std::sync::OnceLock::new(),
            removed: std::sync::Mutex::default(),
        }
    }

    /// A catalog in memory only, holding `documents` (each published as given).
    pub fn in_memory(documents: &[Value]) -> Result<Self, CatalogError> {
        Ok(Catalog::with(seeded(documents)?, Store::Memory))
    }

    /// The catalog kept in `store`, which every replica shares (seeded with `seed` when it
    /// holds nothing). The store's changes reach this replica through [`Catalog::absorb`],
    /// [`Catalog::forget`] and [`Catalog::relisted`].
    pub async fn shared(
        store: Arc<dyn SharedStore>,
        seed: &[Value],
    ) -> Result<Arc<Self>, CatalogError> {
        let listed = store.list().await?;
        // Seeded only when there is nothing at all (an invalid resource is the operator's
        // to fix, not a reason to seed again).
        let empty = listed.objects == 0;
        let catalog = Arc::new(Catalog::with(State::new(), Store::Shared(store.clone())));
        catalog.relisted(listed);
        let follower = store.follow(Arc::downgrade(&catalog));
        let _ = catalog.follower.set(follower.abort_handle());
        if empty {
            for (server, labels) in trusted(seed)? {
                // Another replica seeding at once got there first: that is the same seed.
                match catalog
                    .change(|s| publish_into(s, server.clone(), labels.clone()))
                    .await
                {
                    Ok(_) | Err(CatalogError::Exists { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(catalog)
    }

    /// The catalog kept in `file` (created with `seed` when it does not exist).
    pub fn open(file: PathBuf, seed: &[Value]) -> Result<Self, CatalogError> {
        let store_err = |e: &dyn std::fmt::Display| CatalogError::Store {
            path: file.display().to_string(),
            message: e.to_string(),
        };
        match std::fs::read(&file) {
            Ok(bytes) => {
                // Written by an older version readable by everyone: kept from others now.
                if let Err(e) = crate::private_file::keep_from_others(&file) {
                    tracing::warn!(path = %file.display(), "cannot keep the catalog from other users: {e}");
                }
                let mut state: State = serde_json::from_slice(&bytes).map_err(|e| store_err(&e))?;
                // A file written before labels were the operator's kept them in the
                // documents, where a publisher may have written them: they are dropped (the
                // operator labels again), and said so.
                for v in state.values_mut().flatten() {
                    let dropped = take_our_meta(&mut v.server);
                    if !dropped.is_empty() {
                        tracing::warn!(
                            entry = %v.server["name"].as_str().unwrap_or_default(),
                            version = %v.version(),
                            labels = ?dropped,
                            "labels from a document are no longer taken: set them with PUT /admin/v1/registry/servers/{{name}}/versions/{{version}}/labels"
                        );
                    }
                }
                for (name, versions) in &state {
                    let mut seen = std::collections::BTreeSet::new();
                    for (i, v) in versions.iter().enumerate() {
                        validate(&v.server)
                            .map_err(|e| store_err(&format!("{name} (entry {i}): {e}")))?;
                        if v.server["name"] != name.as_str() || !seen.insert(v.version()) {
                            return Err(store_err(&format!(
                                "{name} (entry {i}): another server's document, or a version twice"
                            )));
                        }
                    }
                }
                Ok(Catalog::with(state, Store::File(file)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = seeded(seed)?;
                save(&file, &state)?;
                Ok(Catalog::with(state, Store::File(file)))
            }
            Err(e) => Err(store_err(&e)),
        }
    }

    /// Takes in a version from the shared store (a replica's write, seen by the watch):
    /// replaces the one held unless that one is newer.
    pub fn absorb(&self, v: Version) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let name = v.server["name"].as_str().unwrap_or_default().to_owned();
        {
            let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            let key = (name.clone(), v.version().to_owned());
            if let Some(&at) = removed.get(&key) {
                match number(v.resource_version.as_deref()) {
                    Some(rv) if rv > at => {
                        removed.remove(&key);
                    }
                    _ => return,
                }
            }
        }
        let count: usize = state.values().map(Vec::len).sum();
        let versions = state.entry(name.clone()).or_default();
        match versions.iter_mut().find(|h| h.version() == v.version()) {
            Some(held) => {
                if not_older(
                    v.resource_version.as_deref(),
                    held.resource_version.as_deref(),
                ) {
                    *held = v;
                }
            }
            None if count >= MAX_VERSIONS => {
                tracing::warn!(entry = %name, version = %v.version(), "the catalog is full: a stored version is left out");
            }
            None => versions.push(v),
        }
        if versions.is_empty() {
            state.remove(&name);
        }
    }

    /// Drops a version the shared store no longer holds (unless the one held is newer than
    /// `resource_version`, the removed object's last).
    pub fn forget(&self, name: &str, version: &str, resource_version: Option<&str>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(versions) = state.get_mut(name) else {
            return;
        };
        versions.retain(|h| {
            h.version() != version || !not_older(resource_version, h.resource_version.as_deref())
        });
        if versions.is_empty() {
            state.remove(name);
        }
        if let Some(at) = number(resource_version) {
            self.mark_removed(name, version, at);
        }
    }

    /// Notes that `name@version` was removed at resourceVersion `at` (bounded: past
    /// [`MAX_VERSIONS`] notes, the oldest are dropped).
    fn mark_removed(&self, name: &str, version: &str, at: u64) {
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        let key = (name.to_owned(), version.to_owned());
        let at = removed.get(&key).map_or(at, |&was| was.max(at));
        removed.insert(key, at);
        if removed.len() > MAX_VERSIONS {
            let mut ats: Vec<u64> = removed.values().copied().collect();
            ats.sort_unstable();
            let cut = ats[ats.len() / 2];
            removed.retain(|_, at| *at > cut);
        }
    }

    /// Takes in the whole shared store, listed again: what it holds replaces what is held,
    /// at once, except versions written here after the list was taken (newer than it).
    /// Beyond [`MAX_VERSIONS`], the first by name and version are kept (every replica keeps
    /// the same ones).
    pub fn relisted(&self, listing: Listing) {
        let mut versions = listing.versions;
        versions.sort_by(|a, b| (a.name(), a.version()).cmp(&(b.name(), b.version())));
        if versions.len() > MAX_VERSIONS {
            tracing::warn!(
                stored = versions.len(),
                kept = MAX_VERSIONS,
                "the shared catalog holds more versions than one catalog may: the rest are left out"
            );
            versions.truncate(MAX_VERSIONS);
        }
        let mut next = State::new();
        for v in versions {
            next.entry(v.name().to_owned()).or_default().push(v);
        }
        let listed_at = number(listing.resource_version.as_deref());
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for v in state.values().flatten() {
            let after_the_list = matches!(
                (number(v.resource_version.as_deref()), listed_at),
                (Some(written), Some(listed)) if written > listed
            );
            if !after_the_list {
                continue;
            }
            let count: usize = next.values().map(Vec::len).sum();
            let versions = next.entry(v.name().to_owned()).or_default();
            match versions.iter_mut().find(|h| h.version() == v.version()) {
                Some(listed) => *listed = v.clone(),
                None if count >= MAX_VERSIONS => {}
                None => versions.push(v.clone()),
            }
        }
        next.retain(|_, versions| !versions.is_empty());
        // Gone as of the list: a write of ours taken in late does not bring them back.
        if let Some(at) = listed_at {
            for v in state.values().flatten() {
                let kept = next
                    .get(v.name())
                    .is_some_and(|vs| vs.iter().any(|n| n.version() == v.version()));
                if !kept {
                    self.mark_removed(v.name(), v.version(), at);
                }
            }
        }
        *state = next;
    }

    fn snapshot(&self) -> State {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `f` to the catalog and keeps the result. On a shared store each changed
    /// version is written at the resourceVersion read; when another replica wrote one first,
    /// it is read again and `f` decides again on what is there now. A change of several
    /// versions (an import) is not one transaction there: those written before a failure
    /// stay.
    async fn change<T>(
        &self,
        f: impl Fn(&mut State) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        Ok(self.change_noting(f).await?.0)
    }

    /// [`Catalog::change`], and the versions it wrote (`name@version`), in every attempt.
    async fn change_noting<T>(
        &self,
        f: impl Fn(&mut State) -> Result<T, CatalogError>,
    ) -> Result<(T, Vec<String>), CatalogError> {
        let _one_at_a_time = self.writing.lock().await;
        let mut written = Vec::new();
        for _ in 0..WRITE_ATTEMPTS {
            let before = self.snapshot();
            let mut next = before.clone();
            let out = f(&mut next)?;
            let store = match &self.store {
                Store::Memory => None,
                Store::File(file) => {
                    save(file, &next)?;
                    None
                }
                Store::Shared(store) => Some(store),
            };
            let Some(store) = store else {
                let changed = changed(&before, &next);
                written.extend(
                    changed
                        .iter()
                        .map(|v| format!("{}@{}", v.name(), v.version())),
                );
                *self.state.write().unwrap_or_else(|e| e.into_inner()) = next;
                return Ok((out, written));
            };
            let mut raced = false;
            for mut v in changed(&before, &next) {
                // What every replica will read back: checked as they check it.
                v.clone().check()?;
                match store.write(&v).await {
                    Ok(rv) => {
                        written.push(format!("{}@{}", v.name(), v.version()));
                        v.resource_version = Some(rv);
                        self.absorb(v);
                    }
                    Err(SharedWrite::Conflict) => {
                        let (name, version) = (v.name().to_owned(), v.version().to_owned());
                        match store.read(&name, &version).await? {
                            Some(fresh) => self.absorb(fresh),
                            None => self.forget(&name, &version, v.resource_version.as_deref()),
                        }
                        raced = true;
                        break;
                    }
                    Err(SharedWrite::Failed(e)) => return Err(e),
                }
            }
            if !raced {
                return Ok((out, written));
            }
        }
        Err(CatalogError::Contended)
    }

    /// Adds a new version; refused if it exists (use [`Catalog::replace`]). Our block of its
    /// `_meta` is dropped: labels are the operator's ([`Catalog::set_labels`]).
    pub async fn publish(&self, mut server: Value) -> Result<(String, String), CatalogError> {
        validate(&server)?;
        take_our_meta(&mut server);
        self.change(|state| publish_into(state, server.clone(), BTreeMap::new()))
            .await
    }

    /// Adds every document that is new, all or none: each is checked first, and a bad one
    /// refuses the whole import (naming its place in the list). A version already in the
    /// catalog is skipped, unchanged. Returns (published, skipped) as `name@version`.
    pub async fn import(
        &self,
        items: Vec<Value>,
    ) -> Result<(Vec<String>, Vec<String>), CatalogError> {
        // Each item is a document, or a registry answer's `{server, _meta}`, whose official
        // block (status, dates) is kept.
        let mut docs = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let (server, facts) = match item {
                Value::Object(mut o) if o.contains_key("server") => {
                    let facts = o
                        .get("_meta")
                        .and_then(|m| m.get(OFFICIAL_META))
                        .filter(|f| !f.is_null())
                        .map(|f| {
                            serde_json::from_value::<Facts>(f.clone()).map_err(|e| {
                                refuse(format!("$[{i}]._meta.{OFFICIAL_META}"), e.to_string())
                            })
                        })
                        .transpose()?;
                    if let Some(m) = facts.as_ref().and_then(|f| f.status_message.as_ref()) {
                        status_message(m, &format!("$[{i}]._meta.{OFFICIAL_META}.statusMessage"))?;
                    }
                    (o.remove("server").unwrap_or_default(), facts)
                }
                doc => (doc, None),
            };
            validate(&server).map_err(|e| refuse(format!("$[{i}]{}", &e.path[1..]), e.message))?;
            let mut server = server;
            take_our_meta(&mut server);
            docs.push((server, facts));
        }
        let ((), written) = self
            .change_noting(|state| {
                let mut count: usize = state.values().map(Vec::len).sum();
                let at = now();
                for (server, facts) in &docs {
                    let name = server["name"].as_str().unwrap_or_default().to_string();
                    let version = server["version"].as_str().unwrap_or_default().to_string();
                    let versions = state.entry(name.clone()).or_default();
                    if versions.iter().any(|v| v.version() == version) {
                        continue;
                    }
                    if count >= MAX_VERSIONS {
                        return Err(CatalogError::Full);
                    }
                    count += 1;
                    let facts = facts.clone().unwrap_or_default();
                    let published_at = facts.published_at.unwrap_or_else(|| at.clone());
                    versions.push(Version {
                        server: server.clone(),
                        status: facts.status.unwrap_or(Status::Active),
                        status_message: facts.status_message,
                        status_changed_at: facts
                            .status_changed_at
                            .unwrap_or_else(|| published_at.clone()),
                        published_at,
                        updated_at: at.clone(),
                        labels: BTreeMap::new(),
                        resource_version: None,
                    });
                }
                Ok(())
            })
            .await?;
        // What this import wrote, in any attempt (on a shared store, a version another
        // writer published first is skipped, one this import wrote before losing a race on
        // another is published).
        let (mut published, mut skipped) = (Vec::new(), Vec::new());
        for (server, _) in &docs {
            let key = format!(
                "{}@{}",
                server["name"].as_str().unwrap_or_default(),
                server["version"].as_str().unwrap_or_default()
            );
            if written.contains(&key) && !published.contains(&key) {
                published.push(key);
            } else {
                skipped.push(key);
            }
        }
        Ok((published, skipped))
    }

    /// Replaces the document of an existing version (same name and version) that `visible`
    /// shows.
    pub async fn replace(
        &self,
        name: &str,
        version: &str,
        mut server: Value,
        visible: &Visible,
    ) -> Result<(), CatalogError> {
        validate(&server)?;
        take_our_meta(&mut server);
        if server["name"] != name {
            return Err(refuse("$.name", format!("must be {name:?}, the name in the path")).into());
        }
        if server["version"] != version {
            return Err(refuse(
                "$.version",
                format!("must be {version:?}, the version in the path"),
            )
            .into());
        }
        self.change(|state| {
            let v = find(state, name, version, visible)?;
            // Another document is not what the operator labelled (approved).
            if v.server != server {
                v.labels.clear();
            }
            v.server = server.clone();
            v.updated_at = now();
            Ok(())
        })
        .await
    }

    /// Sets the status of a version `visible` shows (deprecate, delete, or make active again).
    pub async fn set_status(
        &self,
        name: &str,
        version: &str,
        status: Status,
        message: Option<String>,
        visible: &Visible,
    ) -> Result<(), CatalogError> {
        if let Some(m) = &message {
            status_message(m, "$.statusMessage")?;
        }
        self.change(|state| {
            let v = find(state, name, version, visible)?;
            let at = now();
            if v.status != status {
                v.status_changed_at = at.clone();
            }
            v.status = status;
            v.status_message = message.clone();
            v.updated_at = at;
            Ok(())
        })
        .await
    }

    /// Sets the labels of a version `visible` shows (the operator's: what the registry's
    /// filters see), replacing the ones it had.
    pub async fn set_labels(
        &self,
        name: &str,
        version: &str,
        labels: BTreeMap<String, String>,
        visible: &Visible,
    ) -> Result<(), CatalogError> {
        check_labels(&labels)?;
        self.change(|state| {
            let v = find(state, name, version, visible)?;
            v.labels = labels.clone();
            v.updated_at = now();
            Ok(())
        })
        .await
    }

    /// One version (`latest` names the latest); deleted ones only when asked.
    pub fn version(
        &self,
        name: &str,
        version: &str,
        include_deleted: bool,
    ) -> Result<(Value, Value), CatalogError> {
        self.version_seen(name, version, include_deleted, &Visible::All)
    }

    /// One version as a caller who sees `visible` sees it: `latest` is the latest it sees,
    /// a version it does not see is absent.
    pub fn version_seen(
        &self,
        name: &str,
        version: &str,
        include_deleted: bool,
        visible: &Visible,
    ) -> Result<(Value, Value), CatalogError> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let versions = state.get(name).ok_or(CatalogError::NotFound)?;
        let latest = latest_shown(versions, |v| visible.shows(name, v.version()));
        let i = if version == "latest" {
            latest.ok_or(CatalogError::NotFound)?
        } else {
            versions
                .iter()
                .position(|v| v.version() == version)
                .filter(|&i| visible.shows(name, versions[i].version()))
                .ok_or(CatalogError::NotFound)?
        };
        let v = &versions[i];
        if v.status == Status::Deleted && !include_deleted {
            return Err(CatalogError::NotFound);
        }
        Ok((v.server.clone(), v.meta(Some(i) == latest)))
    }

    /// Every version of a server, newest first.
    pub fn versions(
        &self,
        name: &str,
        include_deleted: bool,
        visible: &Visible,
    ) -> Result<Vec<(Value, Value)>, CatalogError> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let versions = state.get(name).ok_or(CatalogError::NotFound)?;
        let shown = |v: &Version| visible.shows(name, v.version());
        let latest = latest_shown(versions, shown);
        let mut order: Vec<usize> = (0..versions.len())
            .filter(|&i| include_deleted || versions[i].status != Status::Deleted)
            .filter(|&i| shown(&versions[i]))
            .collect();
        order.sort_by(|&a, &b| version_order(versions, b, a));
        if order.is_empty() {
            return Err(CatalogError::NotFound);
        }
        Ok(order
            .into_iter()
            .map(|i| {
                (
                    versions[i].server.clone(),
                    versions[i].meta(Some(i) == latest),
                )
            })
            .collect())
    }

    /// Every version: its server's name, its version, description and the operator's labels
    /// (`key=value`): what the registry's filters decide on, one version at a time (an
    /// approval of one version is not another's).
    pub fn entries(&self) -> Vec<Entry> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .iter()
            .flat_map(|(name, versions)| {
                versions.iter().map(move |v| Entry {
                    name: name.clone(),
                    version: v.version().to_owned(),
                    description: v.server["description"].as_str().map(str::to_owned),
                    labels: v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                })
            })
            .collect()
    }

    /// A page of versions, ordered by name then version (as the official registry).
    pub fn list(&self, q: &Query) -> Page {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let search = q.search.as_ref().map(|s| s.to_lowercase());
        let mut items = Vec::new();
        let mut next = None;
        for (name, versions) in state.iter() {
            if !q.visible.shows_any(name) {
                continue;
            }
            let latest = latest_shown(versions, |v| q.visible.shows(name, v.version()));
            let mut order: Vec<usize> = (0..versions.len()).collect();
            order.sort_by(|&a, &b| versions[a].version().cmp(versions[b].version()));
            for i in order {
                let v = &versions[i];
                let key = (name.clone(), v.version().to_string());
                if q.after.as_ref().is_some_and(|after| key <= *after) {
                    continue;
                }
                let updated_since = q.updated_since.is_some_and(|since| {
                    humantime::parse_rfc3339_weak(&v.updated_at).is_ok_and(|t| t <= since)
                });
                if updated_since
                    || !q.visible.shows(name, v.version())
                    || (q.latest_only && Some(i) != latest)
                    || q.version.as_deref().is_some_and(|want| want != v.version())
                    || (v.status == Status::Deleted && !q.include_deleted)
                {
                    continue;
                }
                if let Some(s) = &search {
                    let description = v.server["description"].as_str().unwrap_or_default();
                    if !name.to_lowercase().contains(s) && !description.to_lowercase().contains(s) {
                        continue;
                    }
                }
                if items.len() == q.limit {
                    next = items_last(&items);
                    return Page { items, next };
                }
                items.push((v.server.clone(), v.meta(Some(i) == latest)));
            }
        }
        Page { items, next }
    }
}

fn items_last(items: &[(Value, Value)]) -> Option<(String, String)> {
    let (server, _) = items.last()?;
    Some((
        server["name"].as_str()?.to_string(),
        server["version"].as_str()?.to_string(),
    ))
}

/// Writes `file` (whole, then renamed over the old one, so a crash leaves either).
fn save(file: &std::path::Path, state: &State) -> Result<(), CatalogError> {
    let store_err = |e: std::io::Error| CatalogError::Store {
        path: file.display().to_string(),
        message: e.to_string(),
    };
    let text = serde_json::to_vec_pretty(state).expect("the catalog serializes");
    // Whole, then renamed over the old one, readable by this user only (entries filtered by
    // visibility are in it).
    crate::private_file::write_atomically(file, &text).map_err(store_err)
}

/// Version `version` of `name`, when `visible` shows it: what a caller does not see is
/// absent to its changes too (or it could read it back, or approve it for itself).
fn find<'a>(
    state: &'a mut State,
    name: &str,
    version: &str,
    visible: &Visible,
) -> Result<&'a mut Version, CatalogError> {
    state
        .get_mut(name)
        .and_then(|vs| vs.iter_mut().find(|v| v.version() == version))
        .filter(|v| visible.shows(name, v.version()))
        .ok_or(CatalogError::NotFound)
}

fn string<'a>(obj: &'a Value, key: &str, path: &str) -> Result<Option<&'a str>, DocumentError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(refuse(format!("{path}.{key}"), "must be a string")),
    }
}

fn required<'a>(obj: &'a Value, key: &str, path: &str) -> Result<&'a str, DocumentError> {
    string(obj, key, path)?.ok_or_else(|| refuse(format!("{path}.{key}"), "is required"))
}

/// Refuses control characters in text people read (the console, the CLI's terminal): an
/// escape sequence there could rewrite what a terminal shows or reach its clipboard.
fn plain_text(s: &str, path: &str) -> Result<(), DocumentError> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(refuse(
            path,
            format!(
                "must not contain control characters (has U+{:04X})",
                c as u32
            ),
        )),
        None => Ok(()),
    }
}

/// Checks a version's status message: at most 500 characters, none of them control ones.
fn status_message(m: &str, path: &str) -> Result<(), DocumentError> {
    if m.chars().count() > 500 {
        return Err(refuse(path, "at most 500 characters"));
    }
    plain_text(m, path)
}

fn length(s: &str, min: usize, max: usize, path: &str) -> Result<(), DocumentError> {
    let n = s.chars().count();
    if n < min || n > max {
        return Err(refuse(
            path,
            format!("must be {min} to {max} characters (is {n})"),
        ));
    }
    Ok(())
}

fn array<'a>(obj: &'a Value, key: &str, path: &str) -> Result<&'a [Value], DocumentError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(refuse(format!("{path}.{key}"), "must be an array")),
    }
}

fn object<'a>(
    v: &'a Value,
    path: &str,
) -> Result<&'a serde_json::Map<String, Value>, DocumentError> {
    v.as_object()
        .ok_or_else(|| refuse(path, "must be an object"))
}

fn http_url(url: &str, path: &str) -> Result<(), DocumentError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() > "http://".len()
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(refuse(path, format!("{url:?} is not an http(s) URL")));
    }
    Ok(())
}

/// Checks an input (an environment variable, a header, an argument, a variable).
fn input(v: &Value, path: &str) -> Result<(), DocumentError> {
    object(v, path)?;
    for key in [
        "description",
        "value",
        "default",
        "placeholder",
        "name",
        "valueHint",
    ] {
        string(v, key, path)?;
    }
    for key in ["isRequired", "isSecret", "isRepeated"] {
        if v.get(key).is_some_and(|b| !b.is_boolean() && !b.is_null()) {
            return Err(refuse(format!("{path}.{key}"), "must be true or false"));
        }
    }
    if let Some(format) = string(v, "format", path)?
        && !matches!(format, "string" | "number" | "boolean" | "filepath")
    {
        return Err(refuse(
            format!("{path}.format"),
            format!("{format:?} is not one of string, number, boolean, filepath"),
        ));
    }
    for (i, c) in array(v, "choices", path)?.iter().enumerate() {
        if !c.is_string() {
            return Err(refuse(format!("{path}.choices[{i}]"), "must be a string"));
        }
    }
    if let Some(vars) = v.get("variables").filter(|v| !v.is_null()) {
        for (k, var) in object(vars, &format!("{path}.variables"))? {
            input(var, &format!("{path}.variables.{k}"))?;
        }
    }
    Ok(())
}

fn transport(t: &Value, path: &str, remote: bool) -> Result<(), DocumentError> {
    object(t, path)?;
    let kind = required(t, "type", path)?;
    match kind {
        "stdio" if !remote => {}
        "streamable-http" | "sse" => {
            http_url(required(t, "url", path)?, &format!("{path}.url"))?;
            for (i, h) in array(t, "headers", path)?.iter().enumerate() {
                let p = format!("{path}.headers[{i}]");
                input(h, &p)?;
                required(h, "name", &p)?;
            }
        }
        other => {
            let allowed = if remote {
                "streamable-http, sse"
            } else {
                "stdio, streamable-http, sse"
            };
            return Err(refuse(
                format!("{path}.type"),
                format!("{other:?} is not one of {allowed}"),
            ));
        }
    }
    Ok(())
}

/// Checks a `server.json` document against the 2025-12-11 schema's rules (and refuses what
/// the official registry refuses: version ranges).
pub fn validate(doc: &Value) -> Result<(), DocumentError> {
    object(doc, "$")?;
    if serde_json::to_vec(doc).map_or(0, |b| b.len()) > MAX_DOCUMENT {
        return Err(refuse("$", format!("larger than {MAX_DOCUMENT} bytes")));
    }
    // Documents published under an earlier revision of the schema are listed as they are.
    if let Some(schema) = string(doc, "$schema", "$")?
        && !(schema
            .strip_prefix("https://static.modelcontextprotocol.io/schemas/")
            .and_then(|s| s.strip_suffix("/server.schema.json"))
            .is_some_and(|date| {
                date.len() == 10 && date.chars().all(|c| c.is_ascii_digit() || c == '-')
            }))
    {
        return Err(refuse(
            "$.$schema",
            format!(
                "must be a server.json schema of static.modelcontextprotocol.io, like {SCHEMA}"
            ),
        ));
    }
    let name = required(doc, "name", "$")?;
    length(name, 3, 200, "$.name")?;
    let (namespace, rest) = name.split_once('/').ok_or_else(|| {
        refuse(
            "$.name",
            "must be reverse-DNS with one '/', like io.github.user/server",
        )
    })?;
    let ok_namespace = !namespace.is_empty()
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let ok_rest = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok_namespace || !ok_rest {
        return Err(refuse(
            "$.name",
            format!("{name:?} must match ^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$"),
        ));
    }
    let description = required(doc, "description", "$")?;
    length(description, 1, 100, "$.description")?;
    plain_text(description, "$.description")?;
    if let Some(title) = string(doc, "title", "$")? {
        length(title, 1, 100, "$.title")?;
        plain_text(title, "$.title")?;
    }
    let version = required(doc, "version", "$")?;
    length(version, 1, 255, "$.version")?;
    plain_text(version, "$.version")?;
    if version == "latest"
        || version.starts_with(['^', '~', '>', '<', '='])
        || version.contains(['*', ' '])
        || version.split('.').any(|p| p.eq_ignore_ascii_case("x"))
    {
        return Err(refuse(
            "$.version",
            format!("{version:?} is a range or a tag, not one version"),
        ));
    }
    if let Some(url) = string(doc, "websiteUrl", "$")? {
        http_url(url, "$.websiteUrl")?;
    }
    // The official registry has served an empty repository as {}, null or empty strings.
    let repository = doc.get("repository").filter(|r| {
        !r.is_null()
            && !r
                .as_object()
                .is_some_and(|o| o.values().all(|v| v.is_null() || v.as_str() == Some("")))
    });
    if let Some(repo) = repository {
        object(repo, "$.repository")?;
        http_url(required(repo, "url", "$.repository")?, "$.repository.url")?;
        required(repo, "source", "$.repository")?;
        for key in ["id", "subfolder"] {
            string(repo, key, "$.repository")?;
        }
    }
    for (i, icon) in array(doc, "icons", "$")?.iter().enumerate() {
        let p = format!("$.icons[{i}]");
        object(icon, &p)?;
        let src = required(icon, "src", &p)?;
        if !src.starts_with("https://") || src.len() > 255 {
            return Err(refuse(
                format!("{p}.src"),
                "must be an https URL of at most 255 characters",
            ));
        }
        if let Some(m) = string(icon, "mimeType", &p)?
            && !matches!(
                m,
                "image/png" | "image/jpeg" | "image/jpg" | "image/svg+xml" | "image/webp"
            )
        {
            return Err(refuse(
                format!("{p}.mimeType"),
                format!("{m:?} is not an image type"),
            ));
        }
        if let Some(theme) = string(icon, "theme", &p)?
            && !matches!(theme, "light" | "dark")
        {
            return Err(refuse(format!("{p}.theme"), "must be light or dark"));
        }
    }
    for (i, pkg) in array(doc, "packages", "$")?.iter().enumerate() {
        let p = format!("$.packages[{i}]");
        object(pkg, &p)?;
        required(pkg, "registryType", &p)?;
        let identifier = required(pkg, "identifier", &p)?;
        if identifier.trim().is_empty() || identifier.chars().any(char::is_control) {
            return Err(refuse(format!("{p}.identifier"), "must not be empty"));
        }
        for key in ["registryBaseUrl", "runtimeHint"] {
            string(pkg, key, &p)?;
        }
        if let Some(v) = string(pkg, "version", &p)?
            && (v.is_empty() || v == "latest")
        {
            return Err(refuse(format!("{p}.version"), "must name one version"));
        }
        if let Some(sha) = string(pkg, "fileSha256", &p)?
            && (sha.len() != 64 || !sha.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
        {
            return Err(refuse(
                format!("{p}.fileSha256"),
                "must be 64 lowercase hex digits",
            ));
        }
        let t = pkg
            .get("transport")
            .ok_or_else(|| refuse(format!("{p}.transport"), "is required"))?;
        transport(t, &format!("{p}.transport"), false)?;
        for key in ["runtimeArguments", "packageArguments"] {
            for (j, arg) in array(pkg, key, &p)?.iter().enumerate() {
                let ap = format!("{p}.{key}[{j}]");
                input(arg, &ap)?;
                match string(arg, "type", &ap)? {
                    Some("positional") => {
                        if arg.get("value").is_none() && arg.get("valueHint").is_none() {
                            return Err(refuse(
                                &ap,
                                "a positional argument needs value or valueHint",
                            ));
                        }
                    }
                    Some("named") => {
                        required(arg, "name", &ap)?;
                    }
                    Some(other) => {
                        return Err(refuse(
                            format!("{ap}.type"),
                            format!("{other:?} is not positional or named"),
                        ));
                    }
                    None => return Err(refuse(format!("{ap}.type"), "is required")),
                }
            }
        }
        for (j, env) in array(pkg, "environmentVariables", &p)?.iter().enumerate() {
            let ep = format!("{p}.environmentVariables[{j}]");
            input(env, &ep)?;
            let name = required(env, "name", &ep)?;
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(refuse(
                    format!("{ep}.name"),
                    format!("{name:?} is not a variable name"),
                ));
            }
        }
    }
    for (i, remote) in array(doc, "remotes", "$")?.iter().enumerate() {
        let p = format!("$.remotes[{i}]");
        transport(remote, &p, true)?;
        if let Some(vars) = remote.get("variables").filter(|v| !v.is_null()) {
            for (k, var) in object(vars, &format!("{p}.variables"))? {
                input(var, &format!("{p}.variables.{k}"))?;
            }
        }
    }
    if let Some(meta) = doc.get("_meta").filter(|m| !m.is_null()) {
        object(meta, "$._meta")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(name: &str, version: &str) -> Value {
        json!({
            "$schema": SCHEMA,
            "name": name,
            "description": format!("{name} server"),
            "version": version,
            "packages": [{"registryType": "npm", "identifier": "@x/y", "transport": {"type": "stdio"}}],
        })
    }

    fn path_of(mut d: Value, edit: impl FnOnce(&mut Value)) -> String {
        edit(&mut d);
        validate(&d).expect_err("refused").path
    }

    #[test]
    fn refusals_name_the_json_path_at_fault() {
        let base = doc("io.github.a/b", "1.0.0");
        assert!(validate(&base).is_ok());
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|d| d["name"] = json!("no-slash")), "$.name"),
            (Box::new(|d| d["name"] = json!("a/b c")), "$.name"),
            (Box::new(|d| d["name"] = json!(7)), "$.name"),
            (
                Box::new(|d| {
                    d.as_object_mut()
                        .unwrap()
                        .remove("description")
                        .map(|_| ())
                        .unwrap()
                }),
                "$.description",
            ),
            (
                Box::new(|d| d["description"] = json!("x".repeat(101))),
                "$.description",
            ),
            (Box::new(|d| d["version"] = json!("^1.2.0")), "$.version"),
            (Box::new(|d| d["version"] = json!("latest")), "$.version"),
            // Control characters would reach a terminal (`registry upgrade` prints versions).
            (
                Box::new(|d| d["version"] = json!("1.0.1\u{1b}]52;c;aGk=\u{7}")),
                "$.version",
            ),
            (
                Box::new(|d| d["description"] = json!("fine\u{1b}[2Jgone")),
                "$.description",
            ),
            (Box::new(|d| d["title"] = json!("a\rb")), "$.title"),
            (
                Box::new(|d| d["$schema"] = json!("https://example.com/other.json")),
                "$.$schema",
            ),
            (
                Box::new(|d| d["packages"][0]["transport"]["type"] = json!("carrier-pigeon")),
                "$.packages[0].transport.type",
            ),
            (
                Box::new(|d| d["packages"][0]["transport"] = json!({"type": "streamable-http"})),
                "$.packages[0].transport.url",
            ),
            (
                Box::new(|d| {
                    d["packages"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("identifier")
                        .map(|_| ())
                        .unwrap()
                }),
                "$.packages[0].identifier",
            ),
            (
                Box::new(|d| {
                    d["packages"][0]["environmentVariables"] =
                        json!([{"name": "A"}, {"description": "no name"}])
                }),
                "$.packages[0].environmentVariables[1].name",
            ),
            (
                Box::new(|d| {
                    d["packages"][0]["environmentVariables"] =
                        json!([{"name": "A", "isSecret": "yes"}])
                }),
                "$.packages[0].environmentVariables[0].isSecret",
            ),
            (
                Box::new(|d| d["packages"][0]["packageArguments"] = json!([{"type": "named"}])),
                "$.packages[0].packageArguments[0].name",
            ),
            (
                Box::new(|d| {
                    d["packages"][0]["runtimeArguments"] = json!([{"type": "positional"}])
                }),
                "$.packages[0].runtimeArguments[0]",
            ),
            (
                Box::new(|d| d["remotes"] = json!([{"type": "stdio"}])),
                "$.remotes[0].type",
            ),
            (
                Box::new(|d| d["remotes"] = json!([{"type": "sse", "url": "ftp://x"}])),
                "$.remotes[0].url",
            ),
            (
                Box::new(|d| d["icons"] = json!([{"src": "http://insecure/icon.png"}])),
                "$.icons[0].src",
            ),
            (
                Box::new(|d| d["repository"] = json!({"url": "https://github.com/a/b"})),
                "$.repository.source",
            ),
            (
                Box::new(|d| d["packages"][0]["fileSha256"] = json!("ABC")),
                "$.packages[0].fileSha256",
            ),
        ];
        for (edit, path) in cases {
            assert_eq!(path_of(base.clone(), edit), path);
        }
        assert_eq!(validate(&json!([1])).unwrap_err().path, "$");
    }

    #[tokio::test]
    async fn only_what_the_filters_showed_is_listed() {
        use super::super::visibility::Visible;
        let c = Catalog::in_memory(&[]).unwrap();
        c.publish(doc("io.github.a/shown", "1.0.0")).await.unwrap();
        let visible =
            Visible::Only([("io.github.a/shown".to_owned(), ["1.0.0".to_owned()].into())].into());
        // Published after the filters ran: not shown until they have seen it.
        c.publish(doc("io.github.a/later", "1.0.0")).await.unwrap();
        let names = |visible: Visible| {
            c.list(&Query {
                visible,
                limit: 100,
                ..Query::default()
            })
            .items
            .into_iter()
            .map(|(s, _)| s["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
        };
        assert_eq!(names(visible), ["io.github.a/shown"]);
        assert_eq!(names(Visible::All).len(), 2);
    }

    #[tokio::test]
    async fn versions_latest_status_and_pages() {
        let c = Catalog::in_memory(&[]).unwrap();
        for v in ["1.0.0", "1.10.0", "1.9.0", "2.0.0-rc.1"] {
            c.publish(doc("io.github.a/b", v)).await.unwrap();
        }
        c.publish(doc("io.github.a/a", "0.1.0")).await.unwrap();
        assert!(matches!(
            c.publish(doc("io.github.a/b", "1.0.0")).await,
            Err(CatalogError::Exists { .. })
        ));
        // Latest by precedence: 2.0.0-rc.1 > 1.10.0 > 1.9.0.
        let (latest, meta) = c.version("io.github.a/b", "latest", false).unwrap();
        assert_eq!(latest["version"], "2.0.0-rc.1");
        assert_eq!(meta[OFFICIAL_META]["isLatest"], true);
        let versions: Vec<_> = c
            .versions("io.github.a/b", false, &Visible::All)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s["version"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(versions, ["2.0.0-rc.1", "1.10.0", "1.9.0", "1.0.0"]);

        // A deleted latest is not replaced by an older one; deprecated stays listed.
        c.set_status(
            "io.github.a/b",
            "2.0.0-rc.1",
            Status::Deleted,
            Some("withdrawn".into()),
            &Visible::All,
        )
        .await
        .unwrap();
        assert!(matches!(
            c.version("io.github.a/b", "latest", false),
            Err(CatalogError::NotFound)
        ));
        let (_, meta) = c.version("io.github.a/b", "latest", true).unwrap();
        assert_eq!(meta[OFFICIAL_META]["status"], "deleted");
        assert_eq!(meta[OFFICIAL_META]["statusMessage"], "withdrawn");
        c.set_status(
            "io.github.a/b",
            "1.0.0",
            Status::Deprecated,
            None,
            &Visible::All,
        )
        .await
        .unwrap();

        // Pages of two, by name then version, deleted ones hidden.
        let mut q = Query {
            limit: 2,
            ..Query::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = c.list(&q);
            seen.extend(page.items.iter().map(|(s, _)| {
                format!(
                    "{}@{}",
                    s["name"].as_str().unwrap(),
                    s["version"].as_str().unwrap()
                )
            }));
            match page.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert_eq!(
            seen,
            [
                "io.github.a/a@0.1.0",
                "io.github.a/b@1.0.0",
                "io.github.a/b@1.10.0",
                "io.github.a/b@1.9.0"
            ]
        );
        let latest_only = c.list(&Query {
            limit: 10,
            latest_only: true,
            include_deleted: true,
            ..Query::default()
        });
        assert_eq!(latest_only.items.len(), 2);
        let searched = c.list(&Query {
            limit: 10,
            search: Some("A/A".into()),
            ..Query::default()
        });
        assert_eq!(searched.items.len(), 1);
        let later = c.list(&Query {
            limit: 10,
            updated_since: Some(SystemTime::now() + std::time::Duration::from_secs(60)),
            include_deleted: true,
            ..Query::default()
        });
        assert!(later.items.is_empty());
        // Replace keeps name and version.
        assert_eq!(
            c.replace(
                "io.github.a/a",
                "0.1.0",
                doc("io.github.a/a", "0.2.0"),
                &Visible::All
            )
            .await
            .unwrap_err()
            .to_string(),
            "$.version: must be \"0.1.0\", the version in the path"
        );
    }

    #[tokio::test]
    async fn the_file_keeps_the_catalog_and_a_damaged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("gatehouse-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("catalog.json");
        let _ = std::fs::remove_file(&file);
        let c = Catalog::open(file.clone(), &[doc("io.github.a/seed", "1.0.0")]).unwrap();
        c.publish(doc("io.github.a/b", "1.0.0")).await.unwrap();
        drop(c);
        // Readable by this user only, and kept from others when an older version wrote it so.
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &std::path::Path| std::fs::metadata(f).unwrap().permissions().mode();
        assert_eq!(mode(&file) & 0o077, 0, "{:o}", mode(&file));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = Catalog::open(file.clone(), &[]).unwrap();
        assert_eq!(mode(&file) & 0o007, 0, "{:o}", mode(&file));
        assert!(again.version("io.github.a/b", "1.0.0", false).is_ok());
        assert!(again.version("io.github.a/seed", "latest", false).is_ok());
        drop(again);
        // A file from before labels were kept apart: the documents lose the block, and its
        // labels are not taken as the operator's.
        let mut old: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        old["io.github.a/b"][0]["server"]["_meta"] =
            serde_json::json!({GATEHOUSE_META: {"labels": {"team": "a"}}});
        std::fs::write(&file, serde_json::to_vec(&old).unwrap()).unwrap();
        let migrated = Catalog::open(file.clone(), &[]).unwrap();
        let (server, meta) = migrated.version("io.github.a/b", "1.0.0", false).unwrap();
        assert!(server.get("_meta").is_none(), "{server}");
        assert!(meta.get(GATEHOUSE_META).is_none(), "{meta}");
        let entries = migrated.entries();
        let b = entries.iter().find(|e| e.name == "io.github.a/b").unwrap();
        assert!(b.labels.is_empty(), "{:?}", b.labels);
        // A replaced document loses the operator's labels of the one it replaces (the same
        // document again keeps them).
        let mut labels = BTreeMap::new();
        labels.insert("approved".to_owned(), "yes".to_owned());
        migrated
            .set_labels("io.github.a/b", "1.0.0", labels, &Visible::All)
            .await
            .unwrap();
        let same = doc("io.github.a/b", "1.0.0");
        migrated
            .replace("io.github.a/b", "1.0.0", same.clone(), &Visible::All)
            .await
            .unwrap();
        let (_, meta) = migrated.version("io.github.a/b", "1.0.0", false).unwrap();
        assert_eq!(meta[GATEHOUSE_META]["labels"]["approved"], "yes", "{meta}");
        let mut changed = same;
        changed["description"] = serde_json::json!("something else now");
        migrated
            .replace("io.github.a/b", "1.0.0", changed, &Visible::All)
            .await
            .unwrap();
        let (_, meta) = migrated.version("io.github.a/b", "1.0.0", false).unwrap();
        assert!(meta.get(GATEHOUSE_META).is_none(), "{meta}");
        std::fs::write(
            &file,
            b"{\"io.github.a/b\": [{\"server\": {\"name\": \"x\"}}]}",
        )
        .unwrap();
        let err = Catalog::open(file.clone(), &[]).err().expect("refused");
        assert!(err.to_string().contains("catalog.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn stored(name: &str, version: &str, rv: u64) -> Version {
        Version {
            server: doc(name, version),
            status: Status::Active,
            status_message: None,
            published_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:00Z".into(),
            status_changed_at: "2026-01-01T00:00:00Z".into(),
            labels: BTreeMap::new(),
            resource_version: Some(rv.to_string()),
        }
    }

    fn held(c: &Catalog) -> Vec<String> {
        let state = c.state.read().unwrap();
        state
            .values()
            .flatten()
            .map(|v| {
                format!(
                    "{}@{}#{}",
                    v.name(),
                    v.version(),
                    v.resource_version.as_deref().unwrap_or("-")
                )
            })
            .collect()
    }

    /// A shared store in memory, as the API server keeps resources: a resourceVersion counter,
    /// creates refused when the version exists, replaces when the resourceVersion moved on.
    #[derive(Default)]
    struct Shared {
        /// The last resourceVersion, and the versions by (name, version).
        objects: std::sync::Mutex<(u64, Objects)>,
    }

    type Objects = BTreeMap<(String, String), Version>;

    impl Shared {
        /// Another writer's write.
        fn put(&self, mut v: Version) {
            let mut o = self.objects.lock().unwrap();
            o.0 += 1;
            v.resource_version = Some(o.0.to_string());
            o.1.insert((v.name().to_owned(), v.version().to_owned()), v);
        }
    }

    impl SharedStore for Shared {
        fn describe(&self) -> String {
            "in memory".into()
        }
        fn list(&self) -> BoxFuture<'_, Result<Listing, CatalogError>> {
            let o = self.objects.lock().unwrap();
            let listing = Listing {
                versions: o.1.values().cloned().collect(),
                objects: o.1.len(),
                resource_version: Some(o.0.to_string()),
            };
            Box::pin(async move { Ok(listing) })
        }
        fn follow(&self, _: std::sync::Weak<Catalog>) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async {})
        }
        fn write<'a>(&'a self, v: &'a Version) -> BoxFuture<'a, Result<String, SharedWrite>> {
            let mut o = self.objects.lock().unwrap();
            let key = (v.name().to_owned(), v.version().to_owned());
            let current = o.1.get(&key).and_then(|h| h.resource_version.clone());
            let out = if current != v.resource_version {
                Err(SharedWrite::Conflict)
            } else {
                o.0 += 1;
                let mut v = v.clone();
                v.resource_version = Some(o.0.to_string());
                o.1.insert(key, v);
                Ok(o.0.to_string())
            };
            Box::pin(async move { out })
        }
        fn read<'a>(
            &'a self,
            name: &'a str,
            version: &'a str,
        ) -> BoxFuture<'a, Result<Option<Version>, CatalogError>> {
            let o = self.objects.lock().unwrap();
            let v = o.1.get(&(name.to_owned(), version.to_owned())).cloned();
            Box::pin(async move { Ok(v) })
        }
    }

    #[tokio::test]
    async fn a_relist_replaces_what_is_held_but_not_writes_made_after_it() {
        let c = Catalog::in_memory(&[]).unwrap();
        let listing = |versions: Vec<Version>, at: u64| Listing {
            objects: versions.len(),
            versions,
            resource_version: Some(at.to_string()),
        };
        c.relisted(listing(
            vec![stored("a/x", "1", 5), stored("a/y", "1", 7)],
            10,
        ));
        // Written here after the next list was taken.
        c.absorb(stored("a/z", "1", 12));
        // A lagging event older than what is held changes nothing; nor does its deletion.
        c.absorb(Version {
            status: Status::Deleted,
            ..stored("a/z", "1", 11)
        });
        c.forget("a/z", "1", Some("11"));
        assert_eq!(held(&c), ["a/x@1#5", "a/y@1#7", "a/z@1#12"]);
        // y was deleted while the watch was away: gone; z, newer than the list, stays.
        c.relisted(listing(vec![stored("a/x", "1", 5)], 11));
        assert_eq!(held(&c), ["a/x@1#5", "a/z@1#12"]);
        // A list taken after z that does not hold it: z was deleted since.
        c.relisted(listing(vec![stored("a/x", "1", 5)], 13));
        assert_eq!(held(&c), ["a/x@1#5"]);
        // A write of ours answered before a removal but taken in after it does not bring the
        // version back (the removal seen by the watch, or by a relist); a later one does.
        c.forget("a/x", "1", Some("20"));
        c.absorb(stored("a/x", "1", 15));
        c.absorb(stored("a/z", "1", 12));
        assert!(held(&c).is_empty(), "{:?}", held(&c));
        c.absorb(stored("a/x", "1", 25));
        assert_eq!(held(&c), ["a/x@1#25"]);
        // Beyond the bound, every replica keeps the same ones: the first by name and version.
        let many: Vec<Version> = (0..MAX_VERSIONS + 2)
            .rev()
            .map(|i| stored(&format!("b/n{i:05}"), "1", 1))
            .collect();
        c.relisted(listing(many, 30));
        let kept = held(&c);
        assert_eq!(kept.len(), MAX_VERSIONS);
        assert_eq!(kept[0], "b/n00000@1#1");
        assert_eq!(
            kept[MAX_VERSIONS - 1],
            format!("b/n{:05}@1#1", MAX_VERSIONS - 1)
        );
    }

    #[tokio::test]
    async fn a_write_that_loses_a_race_is_decided_again_and_reports_what_it_wrote() {
        let shared = Arc::new(Shared::default());
        let c = Catalog::shared(shared.clone(), &[doc("io.github.a/seed", "1.0.0")])
            .await
            .unwrap();
        assert_eq!(held(&c), ["io.github.a/seed@1.0.0#1"]);
        // Another writer publishes b@1 unseen: the import writes a@1, loses on b@1, reads
        // it, and decides again: a@1 is still its own (published), b@1 the other's.
        shared.put(stored("io.github.a/b", "1.0.0", 0));
        let (published, skipped) = c
            .import(vec![
                doc("io.github.a/a", "1.0.0"),
                doc("io.github.a/b", "1.0.0"),
            ])
            .await
            .unwrap();
        assert_eq!(published, ["io.github.a/a@1.0.0"]);
        assert_eq!(skipped, ["io.github.a/b@1.0.0"]);
        // A status change on a version changed meanwhile lands on the current one.
        let mut labelled = stored("io.github.a/a", "1.0.0", 0);
        labelled.labels.insert("team".into(), "b".into());
        shared.put(labelled);
        c.set_status(
            "io.github.a/a",
            "1.0.0",
            Status::Deprecated,
            None,
            &Visible::All,
        )
        .await
        .unwrap();
        let a = shared.objects.lock().unwrap().1[&("io.github.a/a".to_owned(), "1.0.0".to_owned())]
            .clone();
        assert_eq!(a.status, Status::Deprecated);
        assert_eq!(a.labels["team"], "b");
        // A stored version that is the same version again is refused as existing.
        assert!(matches!(
            c.publish(doc("io.github.a/b", "1.0.0")).await,
            Err(CatalogError::Exists { .. })
        ));
    }
}
