//! The catalog on Kubernetes: one `McpRegistryEntry` resource per version in the gateway's
//! namespace, shared by every replica and outliving them. Writes are conditional (a create,
//! or a replace at the resourceVersion read), so of two replicas writing one version one
//! wins and the other decides again; a watch brings each replica the others' changes. An
//! object that is not a valid version (written by hand, say) is left out, with a warning.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use kube::CustomResource;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::catalog::{Catalog, CatalogError, Listing, SharedStore, SharedWrite, Status, Version};

/// One version of a server in the catalog (the `McpRegistryEntry` resource's spec). The
/// document is kept as JSON text: the API server checks every other field against this
/// schema, and a document, whatever its shape or depth, is parsed and checked by the
/// gateway alone, one resource at a time (a bad one is left out; it cannot make the list of
/// all of them unreadable).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(clippy::duplicated_attributes)] // several printcolumn(type_ = "string")
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "McpRegistryEntry",
    namespaced,
    shortname = "mcpre",
    category = "gatehouse",
    doc = "One version of a server in the Gatehouse registry's catalog: its server.json and what the registry knows of it.",
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.name"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Status", type_ = "string", json_path = ".spec.status"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct McpRegistryEntrySpec {
    /// The server's name (the document's `name`).
    pub name: String,
    /// The version (the document's `version`).
    pub version: String,
    /// The `server.json` document, as JSON text.
    pub document: String,
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
    /// The operator's labels: what the registry's filters see.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl From<&Version> for McpRegistryEntrySpec {
    fn from(v: &Version) -> Self {
        McpRegistryEntrySpec {
            name: v.name().to_owned(),
            version: v.version().to_owned(),
            document: v.server.to_string(),
            status: v.status,
            status_message: v.status_message.clone(),
            published_at: v.published_at.clone(),
            updated_at: v.updated_at.clone(),
            status_changed_at: v.status_changed_at.clone(),
            labels: v.labels.clone(),
        }
    }
}

/// The catalog's versions as `McpRegistryEntry` resources in one namespace.
#[derive(Clone)]
pub struct ClusterStore {
    api: Api<McpRegistryEntry>,
    /// The same resources read untyped: each is decoded alone, so that one this gateway
    /// cannot read (another version's fields, a value it does not know) is left out without
    /// making the list of all of them unreadable.
    raw: Api<DynamicObject>,
    namespace: String,
}

/// The resource name of version `version` of server `name`: the name made a DNS label
/// (shortened), and a digest of both, which tells apart names and versions the label
/// cannot (`io.github.a/b` and `io-github-a-b`; `1.0` and `1-0`).
pub fn object_name(name: &str, version: &str) -> String {
    let mut slug: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(40)
        .collect();
    slug = slug.trim_matches('-').to_owned();
    if slug.is_empty() {
        slug.push_str("entry");
    }
    // The name's length first: no two pairs make one text.
    let digest = sha2::Sha256::digest(format!("{}:{name}{version}", name.len()).as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{slug}-{hex}")
}

/// Waits after a failed list or watch, doubling up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A watch request lasts at most this long (then it is made again from where it was).
const WATCH_SECONDS: u32 = 290;

/// The version a resource holds, checked as the catalog checks what it is given; why not,
/// for one that is not a valid version or not under its own name.
fn version_of(object: &DynamicObject) -> Result<Version, String> {
    let spec = McpRegistryEntrySpec::deserialize(&object.data["spec"])
        .map_err(|e| format!("its spec is not one this gateway reads: {e}"))?;
    let spec = &spec;
    let resource = object.metadata.name.as_deref().unwrap_or_default();
    let expected = object_name(&spec.name, &spec.version);
    if resource != expected {
        return Err(format!(
            "it is not under its version's name ({expected}): one resource per version"
        ));
    }
    if spec.document.len() > super::catalog::MAX_DOCUMENT {
        return Err(format!(
            "its document is {} bytes; at most {}",
            spec.document.len(),
            super::catalog::MAX_DOCUMENT
        ));
    }
    let server: serde_json::Value = serde_json::from_str(&spec.document)
        .map_err(|e| format!("its document is not JSON: {e}"))?;
    let mut v = Version {
        server,
        status: spec.status,
        status_message: spec.status_message.clone(),
        published_at: spec.published_at.clone(),
        updated_at: spec.updated_at.clone(),
        status_changed_at: spec.status_changed_at.clone(),
        labels: spec.labels.clone(),
        resource_version: object.metadata.resource_version.clone(),
    };
    v.check().map_err(|e| e.to_string())?;
    if v.name() != spec.name || v.version() != spec.version {
        return Err(format!(
            "its document is {}@{}, not {}@{}",
            v.name(),
            v.version(),
            spec.name,
            spec.version
        ));
    }
    Ok(v)
}

/// [`version_of`], saying in a warning why a resource is left out.
fn valid(object: &DynamicObject) -> Option<Version> {
    version_of(object)
        .map_err(|why| {
            let resource = object.metadata.name.as_deref().unwrap_or_default();
            tracing::warn!(%resource, %why, "an McpRegistryEntry is left out of the catalog");
        })
        .ok()
}

impl ClusterStore {
    /// The `McpRegistryEntry` resources of `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        ClusterStore {
            api: Api::namespaced(client.clone(), namespace),
            raw: Api::namespaced_with(
                client,
                namespace,
                &ApiResource::erase::<McpRegistryEntry>(&()),
            ),
            namespace: namespace.to_owned(),
        }
    }

    fn failed(&self, e: kube::Error) -> CatalogError {
        let message = match &e {
            kube::Error::Api(s) if s.code == 404 => {
                "the McpRegistryEntry resource is not defined in this cluster: apply deploy/base/crd-mcpregistryentry.yaml".to_owned()
            }
            kube::Error::Api(s) if s.code == 403 => format!(
                "{}: the gateway's Role must allow get, list, watch, create and update on mcpregistryentries (deploy/base/role.yaml)",
                s.message
            ),
            e => e.to_string(),
        };
        CatalogError::Store {
            path: self.describe(),
            message,
        }
    }

    /// Every resource: the valid versions, by resource name the (name, version) each holds,
    /// and the list's resourceVersion.
    async fn listing(&self) -> Result<(Listing, HashMap<String, (String, String)>), CatalogError> {
        let list = self
            .raw
            .list(&ListParams::default())
            .await
            .map_err(|e| self.failed(e))?;
        let objects = list.items.len();
        let mut held = HashMap::new();
        let mut versions = Vec::new();
        for o in &list.items {
            if let Some(v) = valid(o) {
                held.insert(
                    o.metadata.name.clone().unwrap_or_default(),
                    (v.name().to_owned(), v.version().to_owned()),
                );
                versions.push(v);
            }
        }
        let resource_version = list.metadata.resource_version.clone();
        Ok((
            Listing {
                versions,
                objects,
                resource_version,
            },
            held,
        ))
    }

    /// Lists, then watches from the list's version, until the catalog is dropped; lists
    /// again when the watch cannot go on (its version expired, the API failed).
    async fn follow_into(self, catalog: Weak<Catalog>) {
        let mut wait = Duration::from_millis(500);
        // By resource name, the version each valid one holds (a resource edited to hold
        // another version, or none valid, withdraws the one it held).
        let mut held: HashMap<String, (String, String)> = HashMap::new();
        let mut from: Option<String> = None;
        loop {
            if from.is_none() {
                match self.listing().await {
                    Ok((listing, now_held)) => {
                        from = listing.resource_version.clone();
                        held = now_held;
                        let Some(c) = catalog.upgrade() else { return };
                        c.relisted(listing);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "listing the catalog's McpRegistryEntry resources");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
            let since = from.clone().unwrap_or_else(|| "0".to_owned());
            // Bookmarks move `from` on while nothing changes, so a quiet catalog resumes
            // where it was rather than listing all of it again.
            let params = WatchParams::default().timeout(WATCH_SECONDS);
            let started = tokio::time::Instant::now();
            let mut seen = 0usize;
            let mut pause = false;
            let events = match self.raw.watch(&params, &since).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the catalog's McpRegistryEntry resources");
                    from = None;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                    continue;
                }
            };
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let Some(c) = catalog.upgrade() else { return };
                seen += 1;
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        from.clone_from(&o.metadata.resource_version);
                        wait = Duration::from_millis(500);
                        let resource = o.metadata.name.clone().unwrap_or_default();
                        let now = valid(&o);
                        let identity = now
                            .as_ref()
                            .map(|v| (v.name().to_owned(), v.version().to_owned()));
                        if let Some((name, version)) = held.remove(&resource)
                            && identity.as_ref() != Some(&(name.clone(), version.clone()))
                        {
                            c.forget(&name, &version, o.metadata.resource_version.as_deref());
                        }
                        if let (Some(v), Some(identity)) = (now, identity) {
                            held.insert(resource, identity);
                            c.absorb(v);
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        from.clone_from(&o.metadata.resource_version);
                        let resource = o.metadata.name.clone().unwrap_or_default();
                        if let Some((name, version)) = held.remove(&resource) {
                            c.forget(&name, &version, o.metadata.resource_version.as_deref());
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => from = Some(b.metadata.resource_version),
                    Ok(WatchEvent::Error(status)) => {
                        // 410 Gone: the version is too old to watch from; list again.
                        from = None;
                        if status.code != 410 {
                            tracing::warn!(error = %status.message, "watching the catalog's McpRegistryEntry resources");
                            pause = true;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the catalog's McpRegistryEntry resources");
                        from = None;
                        pause = true;
                        break;
                    }
                }
            }
            // A failure, or a watch that ended at once with nothing (a proxy closing it):
            // not again straight away.
            if pause || (seen == 0 && started.elapsed() < Duration::from_secs(1)) {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

impl SharedStore for ClusterStore {
    fn describe(&self) -> String {
        format!("McpRegistryEntry resources in namespace {}", self.namespace)
    }

    fn list(&self) -> BoxFuture<'_, Result<Listing, CatalogError>> {
        async move { Ok(self.listing().await?.0) }.boxed()
    }

    fn follow(&self, catalog: Weak<Catalog>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().follow_into(catalog))
    }

    fn write<'a>(&'a self, v: &'a Version) -> BoxFuture<'a, Result<String, SharedWrite>> {
        async move {
            let name = object_name(v.name(), v.version());
            let mut object = McpRegistryEntry::new(&name, McpRegistryEntrySpec::from(v));
            let written = match &v.resource_version {
                None => self.api.create(&PostParams::default(), &object).await,
                Some(rv) => {
                    object.metadata.resource_version = Some(rv.clone());
                    self.api
                        .replace(&name, &PostParams::default(), &object)
                        .await
                }
            };
            match written {
                Ok(o) => Ok(o.metadata.resource_version.unwrap_or_default()),
                // 409: created or changed by another writer since it was read; 404 on a
                // replace: removed since, which is a change like any other.
                Err(kube::Error::Api(s))
                    if s.code == 409 || (s.code == 404 && v.resource_version.is_some()) =>
                {
                    Err(SharedWrite::Conflict)
                }
                Err(e) => Err(SharedWrite::Failed(self.failed(e))),
            }
        }
        .boxed()
    }

    fn read<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<Option<Version>, CatalogError>> {
        async move {
            let resource = object_name(name, version);
            let Some(object) = self
                .raw
                .get_opt(&resource)
                .await
                .map_err(|e| self.failed(e))?
            else {
                return Ok(None);
            };
            // Not taken for absent: a write would be refused (409) again and again.
            version_of(&object)
                .map(Some)
                .map_err(|why| CatalogError::Store {
                    path: self.describe(),
                    message: format!(
                        "resource {resource} holds no valid version ({why}): fix or delete it"
                    ),
                })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_dns_labels_and_tell_apart_what_the_label_cannot() {
        let a = object_name("io.github.a/b", "1.0.0");
        assert!(a.starts_with("io-github-a-b-"), "{a}");
        let dns = |n: &str| {
            n.len() <= 63
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !n.starts_with('-')
                && !n.ends_with('-')
        };
        for n in [
            a.clone(),
            object_name("IO.GITHUB.A/B", "1.0.0"),
            object_name(&"x".repeat(200), "1"),
            object_name("///", "1"),
        ] {
            assert!(dns(&n), "{n}");
        }
        assert_ne!(a, object_name("io-github-a-b", "1.0.0"));
        assert_ne!(a, object_name("io.github.a/b", "1-0-0"));
        // No pair of name and version is another's.
        assert_ne!(object_name("a", "b\nc"), object_name("a\nb", "c"));
    }

    fn resource(spec: serde_json::Value) -> DynamicObject {
        let name = object_name(
            spec["name"].as_str().unwrap_or("x/y"),
            spec["version"].as_str().unwrap_or("1"),
        );
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gatehouse.dev/v1alpha1", "kind": "McpRegistryEntry",
            "metadata": {"name": name, "resourceVersion": "7"}, "spec": spec}))
        .unwrap()
    }

    #[test]
    fn each_resource_is_read_alone_and_one_this_gateway_cannot_read_is_only_left_out() {
        let doc = serde_json::json!({"name": "io.github.a/b", "description": "d", "version": "1.0.0",
            "remotes": [{"type": "sse", "url": "https://a.example.com/sse"}]});
        let good = serde_json::json!({"name": "io.github.a/b", "version": "1.0.0",
            "document": doc.to_string(), "status": "active",
            "publishedAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z",
            "statusChangedAt": "2026-01-01T00:00:00Z", "someNewerField": {"x": 1}});
        let v = version_of(&resource(good.clone())).unwrap();
        assert_eq!((v.name(), v.version()), ("io.github.a/b", "1.0.0"));
        assert_eq!(v.resource_version.as_deref(), Some("7"));
        for (edit, why) in [
            (
                serde_json::json!({"status": "archived"}),
                "not one this gateway reads",
            ),
            (
                serde_json::json!({"document": null}),
                "not one this gateway reads",
            ),
            (serde_json::json!({"publishedAt": "yesterday"}), "RFC 3339"),
            (
                serde_json::json!({"document": doc.to_string().replace("1.0.0", "2.0.0")}),
                "not io.github.a/b@1.0.0",
            ),
            (
                serde_json::json!({"name": "io.github.a/c"}),
                "one resource per version",
            ),
        ] {
            let mut spec = good.clone();
            for (k, val) in edit.as_object().unwrap() {
                spec[k] = val.clone();
            }
            let mut o = resource(spec);
            // Under the name of the version it says it holds.
            o.metadata.name = Some(object_name("io.github.a/b", "1.0.0"));
            let e = version_of(&o).unwrap_err();
            assert!(e.contains(why), "{edit}: {e}");
        }
    }
}
