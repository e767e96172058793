//! TLS on the listener: the certificate (taken up again when its files change, by new
//! connections; open ones keep theirs), TLS 1.2 and 1.3 with rustls' defaults, ALPN `h2` and
//! `http/1.1`, and optional client certificates whose subject alternative names map to
//! principals.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::config::tls::ListenerTls as Settings;

/// Default time between two looks at the certificate files.
const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or keys.
    #[error("TLS settings: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The principal a connection's client certificate is, if it maps to one (put in each
/// request's extensions by the listener).
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Option<Principal>);

/// The listener's TLS: the current server configuration and the principal map.
pub struct ListenerTls {
    settings: Settings,
    current: ArcSwap<rustls::ServerConfig>,
    /// What the files held when `current` was built (a change rebuilds it).
    files: std::sync::Mutex<[u8; 32]>,
    principals: HashMap<String, Principal>,
}

impl ListenerTls {
    /// Loads the certificate, key and client CAs.
    pub fn load(settings: &Settings) -> Result<Arc<ListenerTls>, TlsError> {
        let (config, digest) = build(settings)?;
        let principals = settings
            .client_auth
            .iter()
            .flat_map(|c| c.principals.iter())
            .map(|p| (p.san.clone(), Principal::from(p.principal.as_str())))
            .collect();
        Ok(Arc::new(ListenerTls {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(config),
            files: std::sync::Mutex::new(digest),
            principals,
        }))
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// The principal of a connection's verified client certificate: the first of its DNS or
    /// URI subject alternative names that the map names.
    pub fn principal_of(&self, conn: &rustls::ServerConnection) -> Option<Principal> {
        let leaf = conn.peer_certificates()?.first()?;
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        cert.valid_uri_names()
            .chain(cert.valid_dns_names())
            .find_map(|san| self.principals.get(san).cloned())
    }

    /// Looks at the files again; rebuilds the configuration when they changed. A change that
    /// does not load (a key that does not match, a half-written file) keeps the old one.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let digest = files_digest(&self.settings)?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if *files == digest {
            return Ok(false);
        }
        let (config, digest) = build(&self.settings)?;
        self.current.store(Arc::new(config));
        *files = digest;
        Ok(true)
    }

    /// Looks at the files every reload interval until the listener is gone.
    pub fn spawn_reload(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let every = self.settings.reload_interval.unwrap_or(RELOAD_INTERVAL);
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(tls) = tls.upgrade() else { return };
                let reloaded = tokio::task::spawn_blocking(move || tls.reload()).await;
                match reloaded {
                    Ok(Ok(true)) => tracing::info!("TLS certificate reloaded"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!("TLS certificate not reloaded (the old one stays): {e}")
                    }
                    Err(_) => return,
                }
            }
        })
    }
}

/// SHA-256 over the bytes of every file the configuration is built from.
fn files_digest(s: &Settings) -> Result<[u8; 32], TlsError> {
    let mut h = Sha256::new();
    let ca = s.client_auth.as_ref().map(|c| c.ca_file.as_path());
    for path in [Some(s.cert_file.as_path()), Some(s.key_file.as_path()), ca]
        .into_iter()
        .flatten()
    {
        h.update(std::fs::read(path).map_err(|e| file_err(path, e))?);
        h.update([0]);
    }
    Ok(h.finalize().into())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The server configuration from the files, and their digest.
fn build(s: &Settings) -> Result<(rustls::ServerConfig, [u8; 32]), TlsError> {
    // Digest first: a file replaced while being read is read again on the next look.
    let digest = files_digest(s)?;
    let chain = certificates(&s.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| file_err(&s.key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &s.client_auth {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(&c.ca_file)? {
                roots.add(ca).map_err(|e| file_err(&c.ca_file, e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if c.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Rustls(e.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, digest))
}
