//! TLS for the gateway's own outbound HTTP (upstream servers, issuers' key sets): rustls with
//! the ring provider, trusting the bundled webpki roots (and any private CAs configured) or the
//! platform's verifier; HTTP/1.1 and HTTP/2 by ALPN, plain http allowed.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::tls::{OutboundTls, Verifier};
use crate::tls::TlsError;

/// The client TLS configuration `settings` ask for.
pub fn client_config(settings: &OutboundTls) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let config = match settings.verifier {
        Verifier::Platform => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| TlsError::Rustls(format!("the platform verifier: {e}")))?
                .with_no_client_auth()
        }
        Verifier::Bundled => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for path in &settings.ca_files {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                if certs.is_empty() {
                    return Err(TlsError::File {
                        path: path.display().to_string(),
                        reason: "no PEM certificate in it".into(),
                    });
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| TlsError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Wraps a TCP connector in TLS for `https://` URLs.
pub fn connector<R>(
    mut http: HttpConnector<R>,
    tls: &Arc<ClientConfig>,
) -> HttpsConnector<HttpConnector<R>> {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((**tls).clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}
