//! The pooled HTTP clients upstreams are reached with, and their host name resolution. With
//! a check (remote servers on Kubernetes), every address a name resolves to is checked at
//! each connection and the refused ones left out, so a name that answered an allowed address
//! when the orchestrator looked and answers a private one now (DNS rebinding) still does not
//! reach it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;

use crate::orchestrator::remote::AddressCheck;
use crate::replica_key::ReplicaKey;

/// The shared pooled HTTP client (http and https).
pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector<Resolver>>,
    Full<Bytes>,
>;

/// Builds the pooled client used for every HTTP upstream, with the outbound TLS settings.
pub fn client(tls: &Arc<rustls::ClientConfig>) -> Client {
    builder(tls, Resolver::default())
}

/// The client of remote servers: only addresses `check` allows are connected to, whatever
/// their host resolves to at the time.
pub fn checked_client(tls: &Arc<rustls::ClientConfig>, check: AddressCheck) -> Client {
    builder(tls, Resolver::checked(check))
}

/// The client of relayed servers: HTTP/2 over TLS with the replicas' key to the leading
/// replica, so every session and listen stream of this replica shares one connection instead
/// of holding one each.
pub fn relay_client(key: &Arc<ReplicaKey>) -> Client {
    static RELAY: KeyedClients = KeyedClients::new();
    RELAY.of(key)
}

/// The client plugin state operations go to the leading replica with: like
/// [`relay_client`], on a connection of its own, so that relayed sessions' long streams never
/// hold up (or fill the stream limit before) a call's state operation.
pub fn plugin_state_client(key: &Arc<ReplicaKey>) -> Client {
    static STATE: KeyedClients = KeyedClients::new();
    STATE.of(key)
}

/// One pooled client per replicas' key (one in a gateway; tests run several gateways in one
/// process), so that every request to the relay shares its connection.
struct KeyedClients(std::sync::Mutex<Vec<(Arc<ReplicaKey>, Client)>>);

impl KeyedClients {
    /// More keys than this in one process are tests': the oldest client goes.
    const KEPT: usize = 8;

    const fn new() -> Self {
        KeyedClients(std::sync::Mutex::new(Vec::new()))
    }

    fn of(&self, key: &Arc<ReplicaKey>) -> Client {
        let mut clients = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, client)) = clients.iter().find(|(k, _)| k.same_as(key)) {
            return client.clone();
        }
        if clients.len() == Self::KEPT {
            clients.remove(0);
        }
        let client = replica_client(key);
        clients.push((key.clone(), client.clone()));
        client
    }
}

/// HTTP/2 over TLS to another replica, each end proving the replicas' key.
fn replica_client(key: &ReplicaKey) -> Client {
    let mut http = HttpConnector::new_with_resolver(Resolver::default());
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*key.client_config()).clone())
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(4))
        .pool_max_idle_per_host(256)
        .http2_only(true)
        .build(https)
}

fn builder(tls: &Arc<rustls::ClientConfig>, resolver: Resolver) -> Client {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.set_nodelay(true);
    let https = crate::outbound_tls::connector(http, tls);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        // Below common server keep-alive timeouts (Node's is 5 s), so we rarely send on a
        // connection the server is closing: a POST that loses that race cannot be retried.
        .pool_idle_timeout(std::time::Duration::from_secs(4))
        .pool_max_idle_per_host(256)
        .build(https)
}

/// Resolves with the system's resolver; with a check, keeps only the addresses it allows.
#[derive(Clone, Default)]
pub struct Resolver {
    check: Option<AddressCheck>,
}

impl Resolver {
    /// Keeps only the addresses `check` allows (none: the name is refused, saying why).
    pub fn checked(check: AddressCheck) -> Self {
        Resolver { check: Some(check) }
    }
}

/// The addresses of `addrs` that `check` allows; none allowed: why the first was refused.
fn allowed(
    host: &str,
    addrs: impl Iterator<Item = SocketAddr>,
    check: &AddressCheck,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut refused = None;
    let kept: Vec<SocketAddr> = addrs
        .filter(|a| match check(a.ip()) {
            Ok(()) => true,
            Err(why) => {
                refused.get_or_insert(why);
                false
            }
        })
        .collect();
    if kept.is_empty() {
        let why = refused.unwrap_or_else(|| "no address".to_owned());
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves to {why}"),
        ));
    }
    Ok(kept)
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let check = self.check.clone();
        Box::pin(async move {
            let host = name.as_str();
            // Port 0: the connector sets the URL's.
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            match &check {
                None => Ok(addrs.collect::<Vec<_>>().into_iter()),
                Some(check) => Ok(allowed(host, addrs, check)?.into_iter()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use tower_service::Service;

    fn no_loopback() -> AddressCheck {
        Arc::new(|ip: IpAddr| match ip.is_loopback() {
            true => Err(format!("{ip}, a loopback address")),
            false => Ok(()),
        })
    }

    #[tokio::test]
    async fn a_checked_resolver_leaves_out_refused_addresses_and_says_why_when_none_is_left() {
        let name: Name = "localhost".parse().unwrap();
        let plain: Vec<_> = Resolver::default()
            .call(name.clone())
            .await
            .unwrap()
            .collect();
        assert!(plain.iter().any(|a| a.ip().is_loopback()), "{plain:?}");
        let err = Resolver::checked(no_loopback())
            .call(name)
            .await
            .expect_err("localhost is only loopback");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("localhost resolves to"), "{err}");
        assert!(err.to_string().contains("loopback address"), "{err}");
        // A mix keeps the allowed ones, in their order.
        let mixed = [
            "127.0.0.1:0".parse().unwrap(),
            "192.0.2.7:0".parse().unwrap(),
            "[::1]:0".parse().unwrap(),
        ];
        let kept = allowed("mixed", mixed.into_iter(), &no_loopback()).unwrap();
        assert_eq!(kept, ["192.0.2.7:0".parse::<SocketAddr>().unwrap()]);
    }
}
