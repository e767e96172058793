//! [`DocumentStore`] as one key of a ConfigMap in the servers' namespace. The ConfigMap is
//! not owned by anything: it outlives the gateway's Deployment, as the pins must.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use crate::orchestrator::document::{DocumentError, DocumentStore, Stored};

/// The most a ConfigMap's data may hold (the API server refuses objects over 1 MiB; some of
/// it is metadata).
pub const LIMIT: usize = 1_000_000;

/// One key of a ConfigMap.
pub struct ConfigMapDocument {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    key: &'static str,
}

impl ConfigMapDocument {
    /// Key `key` of ConfigMap `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, key: &'static str) -> Self {
        ConfigMapDocument {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key,
        }
    }
}

/// The document in a ConfigMap: its key's text (empty when the key is missing: created
/// ahead by an operator, say), and its resourceVersion.
fn stored(cm: ConfigMap, key: &str) -> Option<Stored> {
    Some(Stored {
        text: cm.data.and_then(|mut d| d.remove(key)).unwrap_or_default(),
        version: cm.metadata.resource_version?,
    })
}

fn api_error(e: kube::Error) -> DocumentError {
    match e {
        // 404 on a replace: deleted since it was read, which is a change like any other.
        kube::Error::Api(e) if e.code == 409 || e.code == 404 => DocumentError::Conflict,
        e => DocumentError::Api(e.to_string()),
    }
}

impl DocumentStore for ConfigMapDocument {
    fn describe(&self) -> String {
        format!(
            "ConfigMap {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }

    fn read(&self) -> BoxFuture<'_, Result<Option<Stored>, DocumentError>> {
        async move {
            let cm = self.api.get_opt(&self.name).await.map_err(api_error)?;
            Ok(cm.and_then(|cm| stored(cm, self.key)))
        }
        .boxed()
    }

    fn write<'a>(
        &'a self,
        text: &'a str,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, DocumentError>> {
        async move {
            if text.len() > LIMIT {
                return Err(DocumentError::TooLarge {
                    size: text.len(),
                    limit: LIMIT,
                });
            }
            let written = match version {
                // A merge patch that names the resourceVersion: the API server refuses it (409)
                // if the ConfigMap moved on, and it leaves the other keys, labels and
                // annotations as they are.
                Some(version) => {
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": version},
                        "data": {self.key: text},
                    });
                    let pp = PatchParams {
                        field_manager: Some(super::FIELD_MANAGER.to_owned()),
                        ..Default::default()
                    };
                    self.api.patch(&self.name, &pp, &Patch::Merge(&patch)).await
                }
                // Created, which the API server refuses (409) if someone created it first.
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/managed-by".to_owned(),
                                "gatehouse".to_owned(),
                            )])),
                            ..Default::default()
                        },
                        data: Some(BTreeMap::from([(self.key.to_owned(), text.to_owned())])),
                        ..Default::default()
                    };
                    let pp = PostParams {
                        field_manager: Some(super::FIELD_MANAGER.to_owned()),
                        ..Default::default()
                    };
                    self.api.create(&pp, &cm).await
                }
            }
            .map_err(api_error)?;
            written
                .metadata
                .resource_version
                .ok_or_else(|| DocumentError::Api("the API server gave no resourceVersion".into()))
        }
        .boxed()
    }

    fn changes(&self) -> BoxStream<'static, Option<Stored>> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let (key, what) = (self.key, self.describe());
        watcher(self.api.clone(), config)
            .default_backoff()
            .filter_map(move |event| {
                let change = match event {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        stored(cm, key).map(Some)
                    }
                    Ok(watcher::Event::Delete(_)) => Some(None),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => {
                        tracing::warn!("watching {what}: {e} (retrying)");
                        None
                    }
                };
                std::future::ready(change)
            })
            .boxed()
    }
}
