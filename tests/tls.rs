//! TLS on the listener: handshakes with and without a client certificate (mapped to a
//! principal, or refused when not from the client CA), ALPN, and a certificate renewed on disk
//! under load without one failed request.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use support::{TestGateway, example};

const APP: &str = "app-token-0123456789";

struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    client_ca: CertifiedIssuer<'static, KeyPair>,
}

fn issuer(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("gatehouse-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki {
            dir,
            ca: issuer("test server CA"),
            client_ca: issuer("test client CA"),
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        std::fs::write(pki.path("client-ca.pem"), pki.client_ca.pem()).unwrap();
        pki.write_server_cert("first");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A server certificate for localhost, its organization set to `tag` (to tell them apart).
    fn write_server_cert(&self, tag: &str) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, tag.to_owned());
        let cert = p.signed_by(&key, &self.ca).unwrap();
        // The key first and the certificate after, each replaced whole (as a renewal tool does).
        write_replacing(&self.path("key.pem"), &key.serialize_pem());
        write_replacing(&self.path("cert.pem"), &cert.pem());
    }

    /// A client certificate with URI SAN `uri` (and DNS SANs `dns`), issued by `by`.
    fn client_cert(
        by: &CertifiedIssuer<'static, KeyPair>,
        uri: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        Pki::client_cert_with(by, uri, &[])
    }

    fn client_cert_with(
        by: &CertifiedIssuer<'static, KeyPair>,
        uri: &str,
        dns: &[&str],
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        Pki::client_cert_numbered(by, uri, dns, None)
    }

    fn client_cert_numbered(
        by: &CertifiedIssuer<'static, KeyPair>,
        uri: &str,
        dns: &[&str],
        serial: Option<u64>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.serial_number = serial.map(rcgen::SerialNumber::from);
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName((*d).try_into().unwrap()));
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, by).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        (vec![cert.der().clone()], key)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }

    /// A client TLS configuration trusting the test CA, with a client certificate or none.
    fn client(
        &self,
        cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<rustls::ClientConfig> {
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots());
        // (The HTTPS connector offers ALPN itself.)
        Arc::new(match cert {
            Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

fn write_replacing(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn gateway(pki: &Pki) -> TestGateway {
    gateway_revoking(pki, None).await
}

/// [`gateway`], with `crl_file` as the client CA's revocation list when given.
async fn gateway_revoking(pki: &Pki, crl_file: Option<&Path>) -> TestGateway {
    TestGateway::start(&tls_top(pki, crl_file), &[example("a", &[], "")]).await
}

fn tls_top(pki: &Pki, crl_file: Option<&Path>) -> String {
    let crls = crl_file.map_or(String::new(), |f| format!("\n    crl_files: [{f:?}]"));
    format!(
        "auth: {{tokens: [{{principal: app, token: {APP}}}]}}
tls:
  cert_file: {cert:?}
  key_file: {key:?}
  reload_interval: 100ms
  client_auth:
    ca_file: {ca:?}
    principals: [{{uri: \"spiffe://test/agent\", principal: agent}}, {{dns: agent.test, principal: other-agent}}]{crls}
mcp:
  root_access: {{principals: [app, agent]}}
profiles:
  - {{name: agents, grant: {{principals: [agent]}}, servers: [{{name: a}}]}}",
        cert = pki.path("cert.pem"),
        key = pki.path("key.pem"),
        ca = pki.path("client-ca.pem"),
    )
}

type Https = HyperClient<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// An HTTPS client offering h2 and http/1.1 by ALPN.
fn https(tls: Arc<rustls::ClientConfig>) -> Https {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    HyperClient::builder(TokioExecutor::new()).build(connector)
}

/// An HTTPS client offering http/1.1 only.
fn https1(tls: Arc<rustls::ClientConfig>) -> Https {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http1()
        .build();
    HyperClient::builder(TokioExecutor::new()).build(connector)
}

/// POSTs an initialize to `path`; the HTTP status, version and body.
async fn initialize(
    client: &Https,
    gw: &TestGateway,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, http::Version, Value), String> {
    let mut req = http::Request::post(format!("https://localhost:{}{path}", gw.addr.port()))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (resp.status().as_u16(), resp.version());
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        status,
        version,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[tokio::test]
async fn client_certificates_map_to_principals_and_unknown_issuers_are_refused() {
    let pki = Pki::new("certs");
    let gw = gateway(&pki).await;

    // A certificate from the client CA is principal `agent`: no token needed, its profile open.
    let agent = https(pki.client(Some(Pki::client_cert(
        &pki.client_ca,
        "spiffe://test/agent",
    ))));
    let (status, version, _) = initialize(&agent, &gw, "/mcp/agents", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(version, http::Version::HTTP_2, "ALPN chose h2");

    // Without a certificate: a token works where its principal is granted, not elsewhere.
    let plain = https(pki.client(None));
    let (status, _, _) = initialize(&plain, &gw, "/mcp", Some(APP)).await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = initialize(&plain, &gw, "/mcp/agents", Some(APP))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _, _) = initialize(&plain, &gw, "/mcp", None).await.unwrap();
    assert_eq!(status, 401);

    // A client-CA certificate with a name the map lacks is no one: a token is still needed.
    let stranger = https(pki.client(Some(Pki::client_cert(
        &pki.client_ca,
        "spiffe://test/other",
    ))));
    let (status, _, _) = initialize(&stranger, &gw, "/mcp/agents", None)
        .await
        .unwrap();
    assert_eq!(status, 401);

    // A URI SAN that reads like a mapped DNS name is not that name; a certificate naming two
    // principals is neither.
    let lookalike = https(pki.client(Some(Pki::client_cert(&pki.client_ca, "agent.test:x"))));
    let (status, _, _) = initialize(&lookalike, &gw, "/mcp", None).await.unwrap();
    assert_eq!(status, 401);
    let both = https(pki.client(Some(Pki::client_cert_with(
        &pki.client_ca,
        "spiffe://test/agent",
        &["AGENT.test"],
    ))));
    let (status, _, _) = initialize(&both, &gw, "/mcp/agents", None).await.unwrap();
    assert_eq!(status, 401, "two principals in one certificate: no one");
    // A bad Authorization header does not fall back to the certificate.
    let (status, _, _) = initialize(&agent, &gw, "/mcp/agents", Some("nope-0123456789"))
        .await
        .unwrap();
    assert_eq!(status, 401);

    // A certificate from another CA (even naming the mapped SAN) fails the handshake.
    let forged = https(pki.client(Some(Pki::client_cert(
        &issuer("evil CA"),
        "spiffe://test/agent",
    ))));
    assert!(
        initialize(&forged, &gw, "/mcp/agents", None).await.is_err(),
        "a certificate from an unknown CA is refused"
    );

    // HTTP/1.1 only clients work too, and plain HTTP to the TLS port gets nothing.
    let (status, version, _) = initialize(&https1(pki.client(None)), &gw, "/mcp", Some(APP))
        .await
        .unwrap();
    assert_eq!((status, version), (200, http::Version::HTTP_11));
    let r = support::Client::new(gw.url())
        .http
        .request(
            http::Request::post(gw.url())
                .body(Full::new(Bytes::from("{}")))
                .unwrap(),
        )
        .await;
    assert!(r.is_err(), "plain HTTP is not served: {r:?}");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// The organization of the certificate a fresh connection is served.
async fn served_organization(pki: &Pki, port: u16) -> String {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client(None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    // The organization is printable text in the DER: find which of the two tags it holds.
    let bytes = der.as_ref();
    ["first", "second"]
        .into_iter()
        .find(|t| bytes.windows(t.len()).any(|w| w == t.as_bytes()))
        .unwrap_or("neither")
        .to_owned()
}

#[tokio::test]
async fn a_renewed_certificate_is_taken_up_under_load_without_a_failed_request() {
    let pki = Pki::new("reload");
    let gw = gateway(&pki).await;
    assert_eq!(served_organization(&pki, gw.addr.port()).await, "first");

    // Load: clients on long-lived connections and clients opening new ones, all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for fresh in [false, false, true, true] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let tls = pki.client(None);
        let port = gw.addr.port();
        let gw_addr = gw.addr;
        load.push(tokio::spawn(async move {
            let mut client = https(tls.clone());
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    client = https(tls.clone()); // a new pool: a new connection, a new handshake
                }
                let req = http::Request::post(format!("https://localhost:{port}/mcp"))
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .header("authorization", format!("Bearer {APP}"))
                    .body(Full::new(Bytes::from(
                        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                            "protocolVersion":"2025-11-25","capabilities":{},
                            "clientInfo":{"name":"t","version":"1"}}})
                        .to_string(),
                    )))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(format!("{e:?} ({gw_addr})")),
                }
            }
        }));
    }
    support::eventually("requests flow", || {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) > 20 }
    })
    .await;

    pki.write_server_cert("second");
    support::eventually("the renewed certificate is served", || async {
        served_organization(&pki, gw.addr.port()).await == "second"
    })
    .await;
    let before = ok.load(Ordering::Relaxed);
    support::eventually("requests keep flowing after the renewal", || {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) > before + 20 }
    })
    .await;

    // A broken renewal (a key that is not the certificate's) keeps the current certificate.
    let wrong = KeyPair::generate().unwrap();
    write_replacing(&pki.path("key.pem"), &wrong.serialize_pem());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(served_organization(&pki, gw.addr.port()).await, "second");

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok.load(Ordering::Relaxed) > 40);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn missing_or_mismatched_files_stop_the_start_naming_the_file() {
    let pki = Pki::new("bad");
    std::fs::write(
        pki.path("key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\ntls: {{cert_file: {:?}, key_file: {:?}}}\nupstreams: [{{name: a, stdio: {{command: \"true\"}}}}]\n",
        pki.path("cert.pem"),
        pki.path("key.pem"),
    );
    let e = gatehouse::start(gatehouse::Config::from_yaml(&yaml).unwrap())
        .await
        .err()
        .expect("a key that is not the certificate's is refused");
    assert!(e.to_string().contains("certificate and key"), "{e}");
    let yaml = yaml.replace("cert.pem", "missing.pem");
    let e = gatehouse::start(gatehouse::Config::from_yaml(&yaml).unwrap())
        .await
        .err()
        .expect("a missing file is refused");
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn an_upstream_behind_a_private_ca_is_trusted_only_with_that_ca() {
    let pki = Pki::new("outbound");
    let inner = gateway(&pki).await;
    let upstream = format!(
        "  - name: inner\n    protocol: sessions\n    http: {{ url: \"https://localhost:{}/mcp\", headers: {{ Authorization: \"Bearer {APP}\" }} }}\n",
        inner.addr.port()
    );
    let trusting = TestGateway::start(
        &format!("outbound_tls: {{ca_files: [{:?}]}}", pki.path("ca.pem")),
        std::slice::from_ref(&upstream),
    )
    .await;
    let mut c = trusting.client();
    c.initialize(json!({})).await;
    assert_eq!(
        c.tool_text(1, "echo", json!({"text": "over TLS"})).await,
        "over TLS"
    );

    let default = TestGateway::start("", &[upstream]).await;
    let mut c = default.client();
    c.initialize(json!({})).await;
    let r = c
        .call(
            2,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}}),
        )
        .await;
    assert!(
        r["error"]["code"].is_i64(),
        "an unknown CA is not trusted: {r}"
    );
    trusting.stop().await;
    default.stop().await;
    inner.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn required_client_certificates_refuse_connections_without_one() {
    let pki = Pki::new("required");
    let top = format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n  client_auth:\n    ca_file: {:?}\n    required: true\n    principals: [{{uri: \"spiffe://test/agent\", principal: agent}}]",
        pki.path("cert.pem"),
        pki.path("key.pem"),
        pki.path("client-ca.pem"),
    );
    let gw = TestGateway::start(&top, &[example("a", &[], "")]).await;
    let without = https(pki.client(None));
    assert!(initialize(&without, &gw, "/mcp", None).await.is_err());
    let with = https(pki.client(Some(Pki::client_cert(
        &pki.client_ca,
        "spiffe://test/agent",
    ))));
    let (status, _, _) = initialize(&with, &gw, "/mcp", None).await.unwrap();
    assert_eq!(status, 200);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// An ES256 key of a test OAuth issuer: its private half and its public JWK (kid `k`).
struct JwtKey {
    encoding: jsonwebtoken::EncodingKey,
    jwk: Value,
}

impl JwtKey {
    fn new() -> JwtKey {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let rng = ring::rand::SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref(); // 0x04 ‖ x ‖ y
        JwtKey {
            encoding: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": "k", "use": "sig", "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..])}),
        }
    }

    /// A token of `iss` for `sub`, valid for ten minutes at the endpoint `aud`.
    fn sign(&self, iss: &str, sub: &str, aud: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k".into());
        let claims = json!({"iss": iss, "sub": sub, "aud": aud, "exp": now + 600, "iat": now});
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

/// Serves the JWK set `{"keys": [jwk]}` on a loopback port, whatever is asked; `http://addr`.
async fn serve_jwks(jwk: Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let set = Bytes::from(json!({"keys": [jwk]}).to_string());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let set = set.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let set = set.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(set)))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    url
}

/// POSTs an initialize to `path` with `token`; the HTTP status and the `WWW-Authenticate`
/// challenge, if any.
async fn initialize_challenge(
    client: &Https,
    gw: &TestGateway,
    path: &str,
    token: &str,
) -> (u16, String) {
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let req = http::Request::post(format!("https://localhost:{}{path}", gw.addr.port()))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map_or(String::new(), |v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), challenge)
}

/// An OAuth access token whose `sub` names a principal client certificates map to is refused
/// (401, saying so) with or without that certificate, so an issuer cannot mint the agent's
/// identity or open the profile granted to it; the certificate itself still does.
#[tokio::test]
async fn an_access_token_cannot_pose_as_a_client_certificate_principal() {
    let pki = Pki::new("oauth");
    let key = JwtKey::new();
    let issuer = serve_jwks(key.jwk.clone()).await;
    let resource = "https://localhost/mcp";
    let agents = format!("{resource}/agents");
    let top = format!(
        "auth:
  oauth:
    resource: {resource}
    issuers: [{{ issuer: {issuer:?}, jwks_uri: {jwks:?} }}]
tls:
  cert_file: {cert:?}
  key_file: {key_file:?}
  client_auth:
    ca_file: {ca:?}
    principals: [{{uri: \"spiffe://test/agent\", principal: agent}}, {{dns: agent.test, principal: other-agent}}]
mcp:
  root_access: {{principals: [agent, carol]}}
profiles:
  - {{name: agents, grant: {{principals: [agent, other-agent]}}, servers: [{{name: a}}]}}",
        jwks = format!("{issuer}/jwks"),
        cert = pki.path("cert.pem"),
        key_file = pki.path("key.pem"),
        ca = pki.path("client-ca.pem"),
    );
    let gw = TestGateway::start(&top, &[example("a", &[], "")]).await;
    let plain = https(pki.client(None));

    // The issuer is trusted: its token for another principal works where that one is granted,
    // and only there.
    let (status, c) =
        initialize_challenge(&plain, &gw, "/mcp", &key.sign(&issuer, "carol", resource)).await;
    assert_eq!(status, 200, "{c}");
    let (status, _) = initialize_challenge(
        &plain,
        &gw,
        "/mcp/agents",
        &key.sign(&issuer, "carol", &agents),
    )
    .await;
    assert_eq!(status, 403);

    // Its tokens naming a certificate's principal are refused, at the root and at the
    // profile granted to that principal.
    for (path, sub, aud) in [
        ("/mcp", "agent", resource),
        ("/mcp/agents", "agent", agents.as_str()),
        ("/mcp/agents", "other-agent", agents.as_str()),
    ] {
        let (status, c) =
            initialize_challenge(&plain, &gw, path, &key.sign(&issuer, sub, aud)).await;
        assert_eq!(status, 401, "{sub} at {path}: {c}");
        assert!(
            c.contains("error=\"invalid_token\""),
            "{sub} at {path}: {c}"
        );
        assert!(
            c.contains("client-certificate principal"),
            "{sub} at {path}: {c}"
        );
    }

    // Over the agent's own connection the token is still judged by itself (no fall-back to the
    // certificate), and the certificate alone still opens the profile.
    let agent = https(pki.client(Some(Pki::client_cert(
        &pki.client_ca,
        "spiffe://test/agent",
    ))));
    let (status, c) = initialize_challenge(
        &agent,
        &gw,
        "/mcp/agents",
        &key.sign(&issuer, "agent", &agents),
    )
    .await;
    assert_eq!(status, 401, "{c}");
    assert!(c.contains("client-certificate principal"), "{c}");
    let (status, _, _) = initialize(&agent, &gw, "/mcp/agents", None).await.unwrap();
    assert_eq!(status, 200);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// Whether a client with the agent's certificate numbered `serial` initializes on the agents'
/// profile. A new client (a new handshake) each time: a pooled connection is not checked again.
async fn admitted(pki: &Pki, serial: u64, gw: &TestGateway) -> bool {
    let c = https(pki.client(Some(Pki::client_cert_numbered(
        &pki.client_ca,
        "spiffe://test/agent",
        &[],
        Some(serial),
    ))));
    initialize(&c, gw, "/mcp/agents", None)
        .await
        .is_ok_and(|(status, _, _)| status == 200)
}

/// The client CA's revocation list, revoking the certificates numbered `serials`.
fn revocation_list(pki: &Pki, serials: &[u64]) -> rcgen::CertificateRevocationList {
    rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2025, 1, 1),
        next_update: rcgen::date_time_ymd(2035, 1, 1),
        crl_number: rcgen::SerialNumber::from(serials.len() as u64 + 1),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|n| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*n),
                revocation_time: rcgen::date_time_ymd(2025, 6, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&pki.client_ca)
    .unwrap()
}

/// A revoked client certificate is refused, whether its CA publishes PEM or DER lists; a
/// revocation file with no list in it stops the start (naming it) rather than turning
/// revocation off, and one caught empty by a reload keeps the last good list.
#[tokio::test]
async fn revoked_client_certificates_are_refused_and_an_empty_list_never_lets_them_in() {
    let pki = Pki::new("crl");
    let crl = revocation_list(&pki, &[77]);
    for (name, bytes) in [
        ("crl.pem", crl.pem().unwrap().into_bytes()),
        ("crl.der", crl.der().to_vec()),
    ] {
        std::fs::write(pki.path(name), &bytes).unwrap();
        let gw = gateway_revoking(&pki, Some(&pki.path(name))).await;
        assert!(!admitted(&pki, 77, &gw).await, "{name}: revoked");
        assert!(admitted(&pki, 78, &gw).await, "{name}: not revoked");
        gw.stop().await;
    }

    // A file with no list (empty, or another PEM block) stops the start, naming the file.
    for (name, text) in [
        ("empty.crl", String::new()),
        ("cert.crl", pki.client_ca.pem()),
    ] {
        std::fs::write(pki.path(name), text).unwrap();
        let yaml = format!(
            "listen: 127.0.0.1:0\n{}\nupstreams: [{{name: a, stdio: {{command: \"true\"}}}}]\n",
            tls_top(&pki, Some(&pki.path(name)))
        );
        let e = gatehouse::start(gatehouse::Config::from_yaml(&yaml).unwrap())
            .await
            .err()
            .expect("a revocation file without a list is refused");
        assert!(
            e.to_string().contains(name)
                && e.to_string().contains("no certificate revocation list"),
            "{e}"
        );
    }

    // Running: the list caught empty by a reload keeps the last good one; a new list is taken up.
    let path = pki.path("live.crl");
    std::fs::write(&path, crl.pem().unwrap()).unwrap();
    let gw = gateway_revoking(&pki, Some(&path)).await;
    assert!(!admitted(&pki, 77, &gw).await);
    write_replacing(&path, "");
    // Several reloads (every 100 ms) find it empty: the revoked certificate stays refused.
    for _ in 0..5 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!admitted(&pki, 77, &gw).await, "an empty list let it in");
    }
    write_replacing(&path, &revocation_list(&pki, &[78]).pem().unwrap());
    support::eventually("the new list is taken up", || {
        let seen = admitted(&pki, 78, &gw);
        async move { !seen.await }
    })
    .await;
    assert!(admitted(&pki, 77, &gw).await, "77 is no longer listed");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}
