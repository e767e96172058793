//! The catalog on Kubernetes: one `McpRegistryEntry` resource per version in the gateway's
//! namespace, shared by every replica and outliving them. Writes are conditional (a create,
//! or a replace at the resourceVersion read), so of two replicas writing one version one
//! wins and the other decides again; a watch brings each replica the others' changes. An
//! object that is not a valid version (written by hand, say) is left out, with a warning.

use std::sync::Weak;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use sha2::Digest;

use super::catalog::{Catalog, CatalogError, McpRegistryEntry, SharedStore, SharedWrite, Version};

/// The catalog's versions as `McpRegistryEntry` resources in one namespace.
pub struct ClusterStore {
    api: Api<McpRegistryEntry>,
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

impl ClusterStore {
    /// The `McpRegistryEntry` resources of `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        ClusterStore {
            api: Api::namespaced(client, namespace),
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
}

/// The version an object holds, checked as the catalog checks what it is given; `None`
/// (said in a warning) for one that is not a valid version, or not under its own name.
fn version_of(object: McpRegistryEntry) -> Option<Version> {
    let resource = object.metadata.name.unwrap_or_default();
    let mut v = object.spec;
    v.resource_version = object.metadata.resource_version;
    if let Err(e) = v.check() {
        tracing::warn!(%resource, error = %e, "an McpRegistryEntry that is not a valid version is left out of the catalog");
        return None;
    }
    let expected = object_name(v.name(), v.version());
    if resource != expected {
        tracing::warn!(%resource, %expected, entry = %v.name(), version = %v.version(), "an McpRegistryEntry not under its version's name is left out of the catalog (one resource per version)");
        return None;
    }
    Some(v)
}

impl SharedStore for ClusterStore {
    fn describe(&self) -> String {
        format!("McpRegistryEntry resources in namespace {}", self.namespace)
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Version>, CatalogError>> {
        async move {
            let list = self
                .api
                .list(&ListParams::default())
                .await
                .map_err(|e| self.failed(e))?;
            Ok(list.items.into_iter().filter_map(version_of).collect())
        }
        .boxed()
    }

    fn follow(&self, catalog: Weak<Catalog>) -> tokio::task::JoinHandle<()> {
        let events =
            watcher::watcher(self.api.clone(), watcher::Config::default()).default_backoff();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            let mut listing = Vec::new();
            while let Some(event) = events.next().await {
                let Some(catalog) = catalog.upgrade() else {
                    return;
                };
                match event {
                    Ok(Event::Init) => listing.clear(),
                    Ok(Event::InitApply(o)) => listing.extend(version_of(o)),
                    Ok(Event::InitDone) => catalog.relisted(std::mem::take(&mut listing)),
                    Ok(Event::Apply(o)) => {
                        let (name, version) = identity(&o);
                        let rv = o.metadata.resource_version.clone();
                        match version_of(o) {
                            Some(v) => catalog.absorb(v),
                            // Valid before, perhaps: not any more.
                            None => {
                                if let Some((name, version)) = name.zip(version) {
                                    catalog.forget(&name, &version, rv.as_deref());
                                }
                            }
                        }
                    }
                    Ok(Event::Delete(o)) => {
                        if let (Some(name), Some(version)) = identity(&o) {
                            catalog.forget(&name, &version, o.metadata.resource_version.as_deref());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the catalog's McpRegistryEntry resources");
                    }
                }
            }
        })
    }

    fn write<'a>(&'a self, v: &'a Version) -> BoxFuture<'a, Result<String, SharedWrite>> {
        async move {
            let name = object_name(v.name(), v.version());
            let mut object = McpRegistryEntry::new(&name, v.clone());
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
                // 409: created or changed by another replica since it was read; 404 on a
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
            let object = self
                .api
                .get_opt(&object_name(name, version))
                .await
                .map_err(|e| self.failed(e))?;
            Ok(object.and_then(version_of))
        }
        .boxed()
    }
}

/// The server name and version an object says it holds, when it is under their name.
fn identity(object: &McpRegistryEntry) -> (Option<String>, Option<String>) {
    let (name, version) = (
        object.spec.server["name"].as_str(),
        object.spec.server["version"].as_str(),
    );
    match (name, version) {
        (Some(n), Some(v)) if object.metadata.name.as_deref() == Some(&object_name(n, v)) => {
            (Some(n.to_owned()), Some(v.to_owned()))
        }
        _ => (None, None),
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
}
