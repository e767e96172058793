//! Remote servers: the gateway reaches them at a URL and runs nothing for them (a registry
//! entry's `remotes[]`). Both backends keep their definitions and statuses like any other
//! server's; their endpoint is the URL with its headers.

use super::spec::{EnvValue, RemoteKind, ResolvedServer, header_key, values_secret_name};
use super::{Endpoint, OrchestratorError, Result};

/// Refuses an address a remote server may not be reached at, saying why.
pub type AddressCheck =
    std::sync::Arc<dyn Fn(std::net::IpAddr) -> std::result::Result<(), String> + Send + Sync>;

/// A remote server's endpoint, with its headers' values (`stored`: the values Secret's,
/// by header name); `None` for a server that runs here.
pub fn endpoint(
    server: &ResolvedServer,
    stored: impl Fn(&str) -> Option<String>,
) -> Option<Result<Endpoint>> {
    let remote = server.spec.remote.as_ref()?;
    let headers = server
        .headers
        .iter()
        .map(|(name, value)| {
            let value = match value {
                EnvValue::Plain(v) | EnvValue::Secret(v) | EnvValue::SecretFile(v) => v.clone(),
                EnvValue::Stored { .. } => {
                    stored(&header_key(name)).ok_or_else(|| OrchestratorError::NotRunning {
                        server: server.name.clone(),
                        detail: format!(
                            "{} holds no value for its header {name} given for this URL's origin: give it again",
                            values_secret_name(&server.name)
                        ),
                    })?
                }
            };
            Ok((name.clone(), value))
        })
        .collect::<Result<Vec<_>>>();
    Some(headers.map(|headers| Endpoint::Remote {
        url: remote.url.clone(),
        headers,
        sse: remote.kind == RemoteKind::Sse,
    }))
}

/// A fingerprint of what a remote endpoint is (URL, transport, headers and their values), to
/// tell when its definition changed under a connection made to it (in memory only).
pub fn fingerprint(endpoint: &Endpoint) -> Option<u64> {
    use std::hash::BuildHasher;
    let Endpoint::Remote { url, headers, sse } = endpoint else {
        return None;
    };
    let hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    // Never 0: that is "not a remote" to whoever keeps one.
    Some(hasher.hash_one((url, headers, sse)) | 1)
}
