//! TLS for the gateway's own outbound HTTP (upstream servers, issuers' key sets): rustls with
//! the ring provider and the webpki roots, HTTP/1.1 and HTTP/2 by ALPN, plain http allowed.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

/// Wraps a TCP connector in TLS for `https://` URLs.
pub fn connector(mut http: HttpConnector) -> HttpsConnector<HttpConnector> {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .expect("the ring provider supports the default protocol versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}
