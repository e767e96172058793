//! TLS settings: the listener's certificate, its optional client certificates, and how the
//! gateway's own outbound HTTP checks servers. [`crate::tls`] and [`crate::outbound_tls`] build
//! them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// TLS on the listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are looked at for a change (a renewed certificate is taken up by
    /// new connections; open ones keep theirs). Default 10 s.
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
    /// Client certificates, when asked for.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// Client certificates on the listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// The CAs that issue client certificates (PEM).
    pub ca_file: PathBuf,
    /// Refuse connections without a certificate (default: optional, so that token callers
    /// can connect too).
    #[serde(default)]
    pub required: bool,
    /// Certificate revocation lists (PEM) of the client CA, read again with the certificate.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// Which certificates are which principals: by a subject alternative name (a URI such as a
    /// SPIFFE id, or a DNS name).
    #[serde(default)]
    pub principals: Vec<CertificatePrincipal>,
}

/// A client certificate's name and the principal it is: set `uri` or `dns`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePrincipal {
    /// A URI subject alternative name, exactly.
    #[serde(default)]
    pub uri: Option<String>,
    /// A DNS subject alternative name (not a wildcard; compared ignoring case).
    #[serde(default)]
    pub dns: Option<String>,
    /// The principal.
    pub principal: String,
}

/// The kind and value of a subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    /// A URI.
    Uri(String),
    /// A DNS name, lowercase.
    Dns(String),
}

impl CertificatePrincipal {
    /// The name it maps (validated: exactly one kind).
    pub fn san(&self) -> Option<San> {
        match (&self.uri, &self.dns) {
            (Some(u), None) => Some(San::Uri(u.clone())),
            (None, Some(d)) => Some(San::Dns(d.to_ascii_lowercase())),
            _ => None,
        }
    }
}

/// How outbound HTTPS (upstream servers, issuers' key sets) checks servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundTls {
    /// Whose roots are trusted.
    #[serde(default)]
    pub verifier: Verifier,
    /// More CA certificates (PEM) trusted besides the bundled roots (a private CA).
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
}

/// Whose roots outbound TLS trusts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verifier {
    /// The Mozilla roots built into the binary (and `ca_files`).
    #[default]
    Bundled,
    /// The operating system's verifier and trust store.
    Platform,
}

/// Checks what can be checked without reading files.
pub fn validate(
    listener: Option<&ListenerTls>,
    outbound: &OutboundTls,
) -> Result<(), (String, String)> {
    if let Some(l) = listener {
        if l.reload_interval
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            return Err(("tls.reload_interval".into(), "at least 100ms".into()));
        }
        if let Some(c) = &l.client_auth {
            let mut seen = std::collections::HashSet::new();
            for (i, p) in c.principals.iter().enumerate() {
                let at = format!("tls.client_auth.principals[{i}]");
                let san = match p.san() {
                    Some(San::Uri(u)) if !u.contains(':') => {
                        return Err((format!("{at}.uri"), format!("{u:?} has no scheme")));
                    }
                    Some(San::Dns(d)) if d.is_empty() || d.contains('*') => {
                        return Err((
                            format!("{at}.dns"),
                            "a DNS name, not empty and not a wildcard".into(),
                        ));
                    }
                    Some(san) => san,
                    None => return Err((at, "set exactly one of uri or dns".into())),
                };
                if p.principal.is_empty() || p.principal.chars().any(char::is_control) {
                    return Err((format!("{at}.principal"), "must be printable text".into()));
                }
                if !seen.insert(san.clone()) {
                    return Err((at, format!("{san:?} is mapped twice")));
                }
            }
        }
    }
    if outbound.verifier == Verifier::Platform && !outbound.ca_files.is_empty() {
        return Err((
            "outbound_tls.ca_files".into(),
            "add private CAs to the platform's trust store with the platform verifier, or use verifier: bundled".into(),
        ));
    }
    Ok(())
}
