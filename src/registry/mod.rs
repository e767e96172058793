//! The private MCP registry: the servers an organisation approved, as `server.json`
//! documents ([`catalog`]), served through the official registry's read API ([`api`]).

pub mod api;
pub mod catalog;
pub mod cluster;
pub mod install;
pub mod visibility;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

pub use catalog::{Catalog, CatalogError};

/// What a new catalog starts with: the example server built into the gateway and a few
/// well-known public servers.
pub fn default_documents() -> Vec<Value> {
    serde_json::from_str(include_str!("default-catalog.json")).expect("the default catalog parses")
}

/// The catalog a gateway serves: kept in `file` when given (seeded with the default
/// documents the first time), else as `McpRegistryEntry` resources in `cluster` (a client
/// and namespace: every replica shares them), else in memory.
pub async fn open(
    file: Option<PathBuf>,
    cluster: Option<(kube::Client, String)>,
) -> Result<Arc<Catalog>, CatalogError> {
    match (file, cluster) {
        (Some(f), _) => Catalog::open(f, &default_documents()).map(Arc::new),
        (None, Some((client, namespace))) => {
            let store = Arc::new(cluster::ClusterStore::new(client, &namespace));
            Catalog::shared(store, &default_documents()).await
        }
        (None, None) => Catalog::in_memory(&default_documents()).map(Arc::new),
    }
}
