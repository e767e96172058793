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
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::config::tls::{ListenerTls as Settings, San};

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
    principals: HashMap<San, Principal>,
}

impl ListenerTls {
    /// Loads the certificate, key and client CAs.
    pub fn load(settings: &Settings) -> Result<Arc<ListenerTls>, TlsError> {
        let (config, digest) = build(settings)?;
        let principals = settings
            .client_auth
            .iter()
            .flat_map(|c| c.principals.iter())
            .filter_map(|p| Some((p.san()?, Principal::from(p.principal.as_str()))))
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

    /// The principal of a connection's verified client certificate: the one its URI and DNS
    /// subject alternative names map to. A certificate whose names map to two principals is
    /// no one (which would win is the issuer's choice, not the operator's).
    pub fn principal_of(&self, conn: &rustls::ServerConnection) -> Option<Principal> {
        let leaf = conn.peer_certificates()?.first()?;
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        let names = cert
            .valid_uri_names()
            .map(|u| San::Uri(u.to_owned()))
            .chain(
                cert.valid_dns_names()
                    .map(|d| San::Dns(d.to_ascii_lowercase())),
            );
        let mut found: Option<&Principal> = None;
        for name in names {
            if let Some(p) = self.principals.get(&name) {
                if found.is_some_and(|f| f != p) {
                    tracing::warn!("a client certificate names two principals: taken for none");
                    return None;
                }
                found = Some(p);
            }
        }
        found.cloned()
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

/// The files the configuration is built from, each read once: what is hashed is what is
/// parsed (a file replaced mid-way is read whole on the next look).
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
    crls: Vec<Vec<u8>>,
}

impl Files {
    fn read(s: &Settings) -> Result<Files, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| file_err(path, e));
        let client = s.client_auth.as_ref();
        Ok(Files {
            cert: read(&s.cert_file)?,
            key: read(&s.key_file)?,
            ca: client.map(|c| read(&c.ca_file)).transpose()?,
            crls: client
                .iter()
                .flat_map(|c| c.crl_files.iter())
                .map(|p| read(p))
                .collect::<Result<_, _>>()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.cert, &self.key]
            .into_iter()
            .chain(self.ca.iter())
            .chain(self.crls.iter())
        {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

fn files_digest(s: &Settings) -> Result<[u8; 32], TlsError> {
    Ok(Files::read(s)?.digest())
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The CRLs of one `crl_files` entry: PEM (`X509 CRL` blocks), or one DER list (what CAs
/// publish at their distribution points). A file with none is refused, not read as "nothing
/// revoked": with no CRLs rustls checks no revocation at all, and a file caught half-written
/// by a reload must keep the last good configuration rather than let revoked certificates in.
fn revocation_lists(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    // DER: an ASN.1 SEQUENCE (its content is checked when the verifier is built).
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())]);
    }
    Err(file_err(
        path,
        "no certificate revocation list in it (PEM \"X509 CRL\" blocks or one DER list)",
    ))
}

/// The server configuration from the files, and their digest.
fn build(s: &Settings) -> Result<(rustls::ServerConfig, [u8; 32]), TlsError> {
    let files = Files::read(s)?;
    let digest = files.digest();
    let chain = certificates(&s.cert_file, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| file_err(&s.key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &s.client_auth {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(&c.ca_file, files.ca.as_deref().unwrap_or_default())? {
                roots.add(ca).map_err(|e| file_err(&c.ca_file, e))?;
            }
            let mut crls = Vec::new();
            for (path, bytes) in c.crl_files.iter().zip(&files.crls) {
                crls.extend(revocation_lists(path, bytes)?);
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .with_crls(crls);
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
    if s.client_auth.is_some() {
        // A resumed session keeps the certificate it was verified with: without resumption,
        // each connection is checked against the current CA, CRLs and validity dates.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok((config, digest))
}
