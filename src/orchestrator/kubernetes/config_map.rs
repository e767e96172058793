//! [`DocumentStore`] as one key of a ConfigMap in the servers' namespace. The ConfigMap is
//! not owned by anything: it outlives the gateway's Deployment, as the pins must.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
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

    fn stored(&self, cm: &ConfigMap) -> Option<Stored> {
        Some(Stored {
            text: cm.data.as_ref()?.get(self.key)?.clone(),
            version: cm.metadata.resource_version.clone()?,
        })
    }
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
            Ok(cm.and_then(|cm| self.stored(&cm)))
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
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "gatehouse".to_owned(),
                    )])),
                    resource_version: version.map(str::to_owned),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(self.key.to_owned(), text.to_owned())])),
                ..Default::default()
            };
            let pp = PostParams {
                field_manager: Some(super::FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            // With a version: replace, which the API server refuses (409) if it moved on.
            // Without: create, which it refuses (409) if someone created it first.
            let written = match version {
                Some(_) => self.api.replace(&self.name, &pp, &cm).await,
                None => self.api.create(&pp, &cm).await,
            }
            .map_err(api_error)?;
            written
                .metadata
                .resource_version
                .ok_or_else(|| DocumentError::Api("the API server gave no resourceVersion".into()))
        }
        .boxed()
    }

    fn changes(&self) -> BoxStream<'static, Stored> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let key = self.key;
        watcher(self.api.clone(), config)
            .default_backoff()
            .applied_objects()
            .filter_map(move |cm| {
                let stored = cm.ok().and_then(|cm| {
                    Some(Stored {
                        text: cm.data?.remove(key)?,
                        version: cm.metadata.resource_version?,
                    })
                });
                std::future::ready(stored)
            })
            .boxed()
    }
}
