//! The private MCP registry: the servers an organisation approved, as `server.json`
//! documents ([`catalog`]), served through the official registry's read API ([`api`]).

pub mod api;
pub mod catalog;
pub mod install;
pub mod visibility;

use std::path::PathBuf;

use serde_json::Value;

pub use catalog::{Catalog, CatalogError};

/// What a new catalog starts with: the example server built into the gateway and a few
/// well-known public servers.
pub fn default_documents() -> Vec<Value> {
    serde_json::from_str(include_str!("default-catalog.json")).expect("the default catalog parses")
}

/// The catalog a gateway serves: kept in `file` when given (seeded with the default
/// documents the first time), else in memory.
pub fn open(file: Option<PathBuf>) -> Result<Catalog, CatalogError> {
    match file {
        Some(f) => Catalog::open(f, &default_documents()),
        None => Catalog::in_memory(&default_documents()),
    }
}
