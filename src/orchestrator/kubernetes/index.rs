//! An in-memory index of watched objects, grouped by the server they belong to.
//!
//! Fed by `kube::runtime::watcher` events; a relist (`Init` … `InitDone`) replaces the
//! contents at once, so objects deleted while the watch was down disappear too.
//! Lookups are per server, so the cost of handling one event does not grow with the
//! number of servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use kube::{Resource, ResourceExt};

use crate::orchestrator::spec::labels;

/// Objects of one kind, by server name, then object name.
pub struct Index<K> {
    by_server: DashMap<String, BTreeMap<String, Arc<K>>>,
    relist: Mutex<Option<Vec<K>>>,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Index {
            by_server: DashMap::new(),
            relist: Mutex::new(None),
        }
    }
}

fn is_older<K: Resource>(new: &K, old: &K) -> bool {
    let rv = |o: &K| o.resource_version().and_then(|v| v.parse::<u64>().ok());
    match (rv(new), rv(old), new.uid() == old.uid()) {
        (Some(n), Some(o), true) => n < o,
        _ => false,
    }
}

/// The server an object belongs to (its `gatehouse.dev/server` label).
pub fn server_of<K: Resource>(obj: &K) -> Option<String> {
    obj.labels().get(labels::SERVER).cloned()
}

impl<K: Resource> Index<K> {
    /// Stores an object (added or modified); returns its server and the copy kept.
    ///
    /// A watch event can arrive after our own write's response: an object never
    /// replaces a newer one (resourceVersions are etcd revisions on real API servers;
    /// when either does not parse as a number, the later call wins).
    pub fn upsert(&self, obj: K) -> Option<(String, Arc<K>)> {
        let server = server_of(&obj)?;
        let obj = Arc::new(obj);
        let mut objs = self.by_server.entry(server.clone()).or_default();
        let kept = match objs.get(&obj.name_any()) {
            Some(old) if is_older(&*obj, &**old) => old.clone(),
            _ => {
                objs.insert(obj.name_any(), obj.clone());
                obj
            }
        };
        Some((server, kept))
    }

    /// Forgets a deleted object; returns its server.
    pub fn remove(&self, obj: &K) -> Option<String> {
        let server = server_of(obj)?;
        let name = obj.name_any();
        self.remove_named(&server, &name);
        Some(server)
    }

    /// Forgets an object by server and name.
    pub fn remove_named(&self, server: &str, name: &str) {
        let empty = match self.by_server.get_mut(server) {
            Some(mut objs) => {
                objs.remove(name);
                objs.is_empty()
            }
            None => false,
        };
        if empty {
            self.by_server.remove_if(server, |_, v| v.is_empty());
        }
    }

    /// A relist starts.
    pub fn begin_relist(&self) {
        *self.relist.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// An object of the relist.
    pub fn relist_item(&self, obj: K) {
        self.relist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Vec::new)
            .push(obj);
    }

    /// The relist is complete: replace the contents; returns every server touched.
    pub fn finish_relist(&self) -> BTreeSet<String> {
        let items = self
            .relist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let mut touched: BTreeSet<String> = self.servers().into_iter().collect();
        let mut fresh: BTreeMap<String, BTreeMap<String, Arc<K>>> = BTreeMap::new();
        for obj in items {
            if let Some(server) = server_of(&obj) {
                fresh
                    .entry(server)
                    .or_default()
                    .insert(obj.name_any(), Arc::new(obj));
            }
        }
        // Server by server, never cleared as a whole: a reader between two steps sees each
        // server's objects either as before or as relisted, never none of them.
        self.by_server
            .retain(|server, _| fresh.contains_key(server));
        for (server, objs) in fresh {
            touched.insert(server.clone());
            self.by_server.insert(server, objs);
        }
        touched
    }

    /// One object of a server.
    pub fn get(&self, server: &str, name: &str) -> Option<Arc<K>> {
        self.by_server
            .get(server)
            .and_then(|objs| objs.get(name).cloned())
    }

    /// Every object of a server.
    pub fn of(&self, server: &str) -> Vec<Arc<K>> {
        self.by_server
            .get(server)
            .map(|objs| objs.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Servers that have objects of this kind.
    pub fn servers(&self) -> Vec<String> {
        self.by_server.iter().map(|e| e.key().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    fn secret(name: &str, server: &str, rv: &str) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "uid": "u1", "resourceVersion": rv,
                         "labels": {labels::SERVER: server}},
        }))
        .unwrap()
    }

    #[test]
    fn groups_by_server_and_never_goes_back_in_time() {
        let idx = Index::<Secret>::default();
        idx.upsert(secret("mcp-a", "a", "10"));
        // A late watch event with an older version does not replace the newer copy.
        let (_, kept) = idx.upsert(secret("mcp-a", "a", "9")).unwrap();
        assert_eq!(kept.resource_version().as_deref(), Some("10"));
        idx.upsert(secret("mcp-b", "b", "11"));
        assert_eq!(idx.of("a").len(), 1);
        // A relist replaces everything and reports every server touched.
        idx.begin_relist();
        idx.relist_item(secret("mcp-c", "c", "12"));
        let touched: Vec<String> = idx.finish_relist().into_iter().collect();
        assert_eq!(touched, ["a", "b", "c"]);
        assert!(idx.get("a", "mcp-a").is_none());
        assert!(idx.get("c", "mcp-c").is_some());
        idx.remove(&secret("mcp-c", "c", "13"));
        assert!(idx.servers().is_empty());
    }
}
