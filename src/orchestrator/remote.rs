//! Remote servers: the gateway reaches them at a URL and runs nothing for them (a registry
//! entry's `remotes[]`). Both backends keep their definitions and statuses like any other
//! server's; their endpoint is the URL with its headers.

use super::spec::{EnvValue, RemoteKind, ResolvedServer, header_key, values_secret_name};
use super::{Endpoint, OrchestratorError, Result};

/// Refuses an address a remote server may not be reached at, saying why.
pub type AddressCheck =
    std::sync::Arc<dyn Fn(std::net::IpAddr) -> std::result::Result<(), String> + Send + Sync>;

/// Refuses the addresses a remote may never be reached at from the gateway's own machine:
/// link-local ones (a cloud's metadata service, `169.254.169.254`, `fe80::/10`) and the
/// unspecified one, whatever name resolves to them. Loopback and private addresses stay
/// the operator's to reach (the local backend's remotes may run beside it).
pub fn outside_link_local(ip: std::net::IpAddr) -> std::result::Result<(), String> {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    let refused = match ip {
        std::net::IpAddr::V4(v4) => {
            // Alibaba Cloud's metadata service is not link-local.
            v4.is_link_local() || v4.is_unspecified() || v4.octets() == [100, 100, 100, 200]
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded_v4 = |hi: u16, lo: u16| {
                let v4 = std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
                v4.is_link_local() || v4.octets() == [100, 100, 100, 200]
            };
            (s[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                // AWS's IPv6 metadata service.
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach IPv4 addresses through them.
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded_v4(s[6], s[7]))
                || (s[0] == 0x2002 && embedded_v4(s[1], s[2]))
        }
    };
    match refused {
        true => Err(format!(
            "{ip} is a link-local or unspecified address (a cloud's metadata service lives there)"
        )),
        false => Ok(()),
    }
}

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
