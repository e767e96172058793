//! Upstreams the orchestrator runs: wait until the server is ready, then reach its endpoint.
//!
//! An HTTP server is reached like any HTTP upstream (one MCP session per client session). A
//! stdio server is one process (one pod) holding one MCP session, which every client session
//! shares through [`SharedServer`] (or one process per principal, or per session, as its
//! `sharing` says).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::shared::SharedServer;
use super::{Server, UpstreamError};
use crate::orchestrator::document::DocumentStore;
use crate::orchestrator::idle::Usage;
use crate::orchestrator::{Endpoint, Runtime, StdioEndpoint};

/// How an orchestrated server is run and reached.
#[derive(Clone)]
pub struct Orchestrated {
    /// The backend running it.
    pub runtime: Arc<dyn Runtime>,
    /// Its shared upstream sessions, when it speaks stdio.
    pub shared: Arc<SharedServer>,
    /// The last lists it gave, served while it sleeps.
    pub listings: Arc<Listings>,
    /// How long a call waits for the server to wake.
    pub wake_timeout: std::time::Duration,
    /// The client of its remote endpoint, when it has one: it connects only to addresses the
    /// backend allows ([`Runtime::remote_addresses`]).
    pub remote_http: super::http::Client,
    /// The gateway's mark, sent to its remote endpoint ([`super::via`]).
    pub via: http::HeaderValue,
}

/// The first pages of the lists an idle-capable server last gave (one process serving every
/// caller alike), and its `initialize` result: what a session sees while the server sleeps.
/// Shared with the other replicas and the next gateway when the backend keeps documents (a
/// listing on any of them then wakes nothing).
#[derive(Default)]
pub struct Listings {
    last: Mutex<LastLists>,
    /// Where every replica keeps them, and this server's name there.
    shared: Option<(Arc<SharedListings>, String)>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct LastLists {
    /// The usage (one definition of the server) they were learnt under.
    usage: u64,
    /// Its last `initialize` result.
    init: Option<Bytes>,
    pages: Vec<(&'static str, Bytes)>,
}

/// The list methods whose first pages are kept.
const LISTS: [&str; 4] = [
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
];

impl Listings {
    /// Listings of server `name`, kept in `shared` too.
    pub fn shared(shared: Arc<SharedListings>, name: &str) -> Listings {
        Listings {
            shared: Some((shared, name.to_owned())),
            ..Listings::default()
        }
    }

    /// Keeps the server's `initialize` result and the first page of `method` it gave, learnt
    /// under `usage` (an earlier definition's are forgotten).
    pub fn keep(&self, usage: &Usage, init: Bytes, method: &'static str, page: Bytes) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.usage != usage.id() {
            *last = LastLists {
                usage: usage.id(),
                ..LastLists::default()
            };
        }
        last.init = Some(init);
        last.pages.retain(|(m, _)| *m != method);
        last.pages.push((method, page));
        if let Some((shared, name)) = &self.shared {
            shared.put(name, usage.definition(), &last);
        }
    }

    /// Its last `initialize` result under `usage`, once known (here, or to another replica).
    pub fn init(&self, usage: &Usage) -> Option<Bytes> {
        self.current(usage).and_then(|l| l.init)
    }

    /// The first page of `method` it last gave under `usage`.
    pub fn page(&self, usage: &Usage, method: &str) -> Option<Bytes> {
        self.current(usage)?
            .pages
            .into_iter()
            .find(|(m, _)| *m == method)
            .map(|(_, p)| p)
    }

    /// What is known under `usage`: learnt here, else from the shared document (for the same
    /// definition), then kept here.
    fn current(&self, usage: &Usage) -> Option<LastLists> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.usage != usage.id() || last.init.is_none() {
            let (shared, name) = self.shared.as_ref()?;
            let mut found = shared.get(name, usage.definition())?;
            found.usage = usage.id();
            *last = found;
        }
        Some(last.clone())
    }
}

/// The servers' last lists as every replica keeps them: one document of the backend (a
/// ConfigMap), followed as it changes and written when a list changes.
pub struct SharedListings {
    store: Arc<dyn DocumentStore>,
    /// The document as last read: server → its entry.
    known: std::sync::RwLock<serde_json::Map<String, serde_json::Value>>,
    /// Serializes this replica's writes.
    writing: tokio::sync::Mutex<()>,
    /// Set once the document was first read.
    loaded: tokio::sync::watch::Sender<bool>,
}

/// Largest entry kept for one server (its lists are served from memory alone beyond it).
const MAX_SHARED_ENTRY: usize = 128 * 1024;

impl SharedListings {
    /// Follows `store` from now on.
    pub fn start(store: Arc<dyn DocumentStore>) -> Arc<SharedListings> {
        let shared = Arc::new(SharedListings {
            store,
            known: Default::default(),
            writing: tokio::sync::Mutex::new(()),
            loaded: tokio::sync::watch::Sender::new(false),
        });
        let weak = Arc::downgrade(&shared);
        let mut changes = shared.store.changes();
        let store = shared.store.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            // Read once (a document not made yet is an empty one), then followed.
            match store.read().await {
                Ok(first) => {
                    if let Some(shared) = weak.upgrade() {
                        shared.learn(first.as_ref().map(|s| s.text.as_str()));
                    }
                }
                Err(e) => tracing::warn!("reading {}: {e}", store.describe()),
            }
            while let Some(change) = changes.next().await {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared.learn(change.as_ref().map(|s| s.text.as_str()));
            }
        });
        shared
    }

    fn learn(&self, text: Option<&str>) {
        let map = text
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|v| match v {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default();
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = map;
        self.loaded.send_replace(true);
    }

    /// Waits (at most `within`) until the document was first read: a gateway that serves
    /// before would wake a sleeping server to list it.
    pub async fn loaded(&self, within: std::time::Duration) {
        let mut rx = self.loaded.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|l| *l)).await;
    }

    /// What server `name` last listed under `definition`, if any replica kept it.
    fn get(&self, name: &str, definition: u64) -> Option<LastLists> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let entry = known.get(name)?;
        if entry["definition"].as_str() != Some(definition.to_string().as_str()) {
            return None;
        }
        let raw = |v: &serde_json::Value| Bytes::from(serde_json::to_vec(v).ok()?).into();
        let init = entry.get("init").and_then(raw);
        let pages = LISTS
            .iter()
            .filter_map(|m| Some((*m, entry["pages"].get(*m).and_then(raw)?)))
            .collect();
        Some(LastLists {
            usage: 0,
            init,
            pages,
        })
    }

    /// Keeps `last` as what server `name` lists under `definition`, when it differs from
    /// what the document holds (written in the background; a conflict is read again).
    fn put(self: &Arc<Self>, name: &str, definition: u64, last: &LastLists) {
        // Measured before anything is parsed: a server's lists are read into values only when
        // they could be shared (a value takes many times the memory of its text).
        let text: usize = last.init.as_ref().map_or(0, Bytes::len)
            + last.pages.iter().map(|(_, p)| p.len()).sum::<usize>();
        if text > MAX_SHARED_ENTRY {
            tracing::debug!(
                server = name,
                "its lists are too large to share with the other replicas"
            );
            return;
        }
        let parse = |b: &Bytes| serde_json::from_slice::<serde_json::Value>(b).ok();
        let mut pages = serde_json::Map::new();
        for (m, p) in &last.pages {
            if let Some(v) = parse(p) {
                pages.insert((*m).to_owned(), v);
            }
        }
        let entry = serde_json::json!({
            "definition": definition.to_string(),
            "init": last.init.as_ref().and_then(parse),
            "pages": pages,
        });
        {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if known.get(name) == Some(&entry) {
                return;
            }
        }
        if entry.to_string().len() > MAX_SHARED_ENTRY {
            tracing::debug!(
                server = name,
                "its lists are too large to share with the other replicas"
            );
            return;
        }
        let shared = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let _one = shared.writing.lock().await;
            for _ in 0..5 {
                let stored = match shared.store.read().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("reading {}: {e}", shared.store.describe());
                        return;
                    }
                };
                let mut map = stored
                    .as_ref()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s.text).ok())
                    .and_then(|v| match v {
                        serde_json::Value::Object(m) => Some(m),
                        _ => None,
                    })
                    .unwrap_or_default();
                if map.get(&name) == Some(&entry) {
                    return;
                }
                map.insert(name.clone(), entry.clone());
                let text = serde_json::Value::Object(map).to_string();
                match shared
                    .store
                    .write(&text, stored.as_ref().map(|s| s.version.as_str()))
                    .await
                {
                    Ok(_) => {
                        shared.learn(Some(&text));
                        return;
                    }
                    Err(crate::orchestrator::document::DocumentError::Conflict) => continue,
                    Err(e) => {
                        tracing::warn!(
                            "keeping the lists of {name} in {}: {e}",
                            shared.store.describe()
                        );
                        return;
                    }
                }
            }
        });
    }
}

/// A ready server's endpoint.
pub enum Ready {
    /// Streamable HTTP at this URL.
    Http(http::Uri),
    /// A remote server at this URL, with its headers; whether it speaks HTTP+SSE; the
    /// fingerprint of its endpoint.
    Remote(http::Uri, http::HeaderMap, bool, u64),
    /// stdio through an attachment.
    Stdio(StdioEndpoint),
    /// Through the leading replica's relay: Streamable HTTP at this URL, over TLS with the
    /// replicas' key; whether the server answers every caller alike.
    Relay(
        http::Uri,
        std::sync::Arc<crate::replica_key::ReplicaKey>,
        bool,
    ),
}

impl Orchestrated {
    /// Waits (within the server's connect timeout) until the server is ready.
    ///
    /// The orchestrator fails fast on fatal states (an image that cannot be pulled, a crash
    /// loop...), and its reason becomes the client's error.
    pub async fn ready(&self, server: &Server) -> Result<Ready, UpstreamError> {
        // Leave part of the connect deadline for the MCP handshake, so that a slow start
        // reports the orchestrator's last known phase rather than a bare timeout. Waking a
        // sleeping server has its own budget.
        let usage = self.runtime.usage(&server.name);
        let asleep = usage.as_ref().is_some_and(|u| u.is_asleep());
        let wakes = usage.as_ref().map(|u| u.wakes());
        let wait = match asleep {
            true => self.wake_timeout,
            false => server.config.connect_timeout.mul_f32(0.9),
        };
        let started = std::time::Instant::now();
        let ready = self.runtime.wait_ready(&server.name, wait).await;
        // A sleep called off before it stopped anything is no wake.
        if asleep && ready.is_ok() && usage.as_ref().map(|u| u.wakes()) != wakes {
            server.metrics.record_wake(server.label, started.elapsed());
        }
        match ready {
            Err(e) if asleep => Err(server.unavailable(format!(
                "the server was asleep (idle) and did not wake within {}: {e}",
                humantime::format_duration(wait)
            ))),
            Ok(Endpoint::Http { url }) => url
                .parse()
                .map(Ready::Http)
                .map_err(|e| server.unavailable(format!("endpoint {url:?} is not a URL: {e}"))),
            Ok(endpoint @ Endpoint::Remote { .. }) => {
                let fingerprint = crate::orchestrator::remote::fingerprint(&endpoint).unwrap_or(1);
                let Endpoint::Remote { url, headers, sse } = endpoint else {
                    unreachable!("matched above");
                };
                let uri = url.parse().map_err(|e| {
                    server.unavailable(format!("endpoint {url:?} is not a URL: {e}"))
                })?;
                let mut map = http::HeaderMap::with_capacity(headers.len() + 1);
                map.insert(super::via::HEADER, self.via.clone());
                for (name, value) in headers {
                    // Checked when the definition was; a stored value read since was not.
                    let name = http::HeaderName::try_from(name.as_str()).map_err(|_| {
                        server.unavailable(format!("{name:?} is not a header name"))
                    })?;
                    let mut value = http::HeaderValue::try_from(value).map_err(|_| {
                        server.unavailable(format!(
                            "the value of its header {name} is not a header value"
                        ))
                    })?;
                    value.set_sensitive(true);
                    map.append(name, value);
                }
                Ok(Ready::Remote(uri, map, sse, fingerprint))
            }
            Ok(Endpoint::Stdio(endpoint)) => Ok(Ready::Stdio(endpoint)),
            Ok(Endpoint::Relay { url, key, alike }) => {
                let uri = url
                    .parse()
                    .map_err(|e| server.unavailable(format!("relay {url:?} is not a URL: {e}")))?;
                Ok(Ready::Relay(uri, key, alike))
            }
            Err(e) => Err(server.unavailable(e.to_string())),
        }
    }
}
