//! The gateway as an OAuth 2.1 resource server: JWT access tokens from a trusted issuer whose
//! keys a local JWKS endpoint publishes (and rotates), checked the way an attacker would probe
//! them; scopes, step-up challenges, and the protected-resource metadata.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use support::{Client, TestGateway, eventually, example};

const RESOURCE: &str = "http://localhost/mcp";
const METADATA_URL: &str = "http://localhost/.well-known/oauth-protected-resource/mcp";
const MACHINE: &str = "machine-token-0123456789";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key of the test issuer: its private half and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn es256(kid: &str) -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref(); // 0x04 ‖ x ‖ y
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..])}),
        }
    }

    fn ed25519(kid: &str) -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                        "x": b64(pair.public_key().as_ref())}),
        }
    }

    fn rs256(kid: &str) -> SigningKey {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/oauth-test-rsa.pem"
        ))
        .unwrap();
        let der = pem_body(&pem);
        let pair = ring::rsa::KeyPair::from_pkcs8(&der).unwrap();
        let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(&pem).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)}),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn pem_body(pem: &[u8]) -> Vec<u8> {
    let text: String = std::str::from_utf8(pem)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A local authorization server's JWKS endpoint: what it publishes can change, it can fail,
/// and it counts its fetches.
#[derive(Clone)]
struct Issuer {
    url: String,
    keys: Arc<std::sync::Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    /// How long each answer waits after the fetch is counted, in milliseconds.
    delay_ms: Arc<AtomicUsize>,
}

impl Issuer {
    async fn start(keys: &[&SigningKey]) -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let issuer = Issuer {
            url,
            keys: Arc::new(std::sync::Mutex::new(
                keys.iter().map(|k| k.jwk.clone()).collect(),
            )),
            fetches: Arc::default(),
            failing: Arc::default(),
            delay_ms: Arc::default(),
        };
        let served = issuer.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let served = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let served = served.clone();
                        async move {
                            served.fetches.fetch_add(1, Ordering::SeqCst);
                            let delay = served.delay_ms.load(Ordering::SeqCst) as u64;
                            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(
                                json!({"keys": *served.keys.lock().unwrap()}).to_string(),
                            )));
                            if served.failing.load(Ordering::SeqCst) {
                                *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        issuer
    }

    fn publish(&self, key: &SigningKey) {
        self.keys.lock().unwrap().push(key.jwk.clone());
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Claims for a valid token of `sub` with `scope`.
    fn claims(&self, sub: &str, scope: &str) -> Value {
        json!({"iss": self.url, "sub": sub, "aud": RESOURCE, "scope": scope,
               "exp": now() + 600, "iat": now(), "groups": ["eng"]})
    }
}

async fn gateway(issuer: &Issuer) -> TestGateway {
    gateway_with(issuer, "").await
}

/// A gateway trusting `issuer`, with more `auth.oauth` lines (indented by four).
async fn gateway_with(issuer: &Issuer, oauth: &str) -> TestGateway {
    let top = format!(
        "auth:
  tokens: [{{ principal: machine, token: {MACHINE} }}]
  oauth:
    resource: {RESOURCE}
    resource_name: Test gateway
    key_refetch_interval: 300ms
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]
    required_scopes: [mcp:connect]
    scope_rules:
      - {{ methods: [tools/call], scopes: [mcp:tools] }}
      - {{ methods: [tools/call], names: [echo], scopes: [mcp:tools:echo] }}
{oauth}",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    TestGateway::start(&top, &[example("ex", &[], "")]).await
}

/// A gateway whose only callers are `issuer`'s (no scope rules), with `top` before `auth`.
async fn trusting_only(issuer: &Issuer, top: &str) -> TestGateway {
    let top = format!(
        "{top}auth:
  oauth:
    resource: {RESOURCE}
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]
",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    TestGateway::start(&top, &[example("ex", &[], "")]).await
}

fn with_token(gw: &TestGateway, token: &str) -> Client {
    let mut c = gw.client();
    c.token = Some(token.into());
    c
}

/// POSTs an initialize with `token` and returns the response.
async fn initialize(gw: &TestGateway, token: Option<&str>) -> support::Resp {
    let mut c = gw.client();
    c.token = token.map(str::to_owned);
    c.post(
        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"t","version":"1"}}})
        .to_string(),
    )
    .await
}

fn challenge(r: &support::Resp) -> String {
    r.headers
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("no challenge on {}: {}", r.status, r.body))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn forged_and_misdirected_tokens_are_refused_with_a_challenge() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let gw = gateway(&issuer).await;

    // No token: 401 with where to learn how to get one, and the scope to ask for.
    let r = initialize(&gw, None).await;
    assert_eq!(r.status, 401);
    let c = challenge(&r);
    assert!(c.starts_with("Bearer "), "{c}");
    assert!(
        c.contains(&format!("resource_metadata=\"{METADATA_URL}\"")),
        "{c}"
    );
    assert!(c.contains("scope=\"mcp:connect\""), "{c}");
    assert!(!c.contains("error="), "{c}");

    // A good token works.
    let good = key.sign(&issuer.claims("alice", "mcp:connect mcp:tools"));
    assert_eq!(initialize(&gw, Some(&good)).await.status, 200);
    // A principal of 256 bytes, the longest taken, works too.
    let longest = key.sign(&issuer.claims(&"a".repeat(256), "mcp:connect"));
    assert_eq!(initialize(&gw, Some(&longest)).await.status, 200);

    let stranger = SigningKey::es256("k1"); // same kid, another key
    let mut forged: Vec<(&str, String, &str)> = vec![
        ("a stranger's key under a known kid", stranger.sign(&issuer.claims("alice", "mcp:connect")), "signature"),
        ("another audience", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": "http://localhost/other", "exp": now() + 600, "scope": "mcp:connect"})), "aud"),
        ("no audience", key.sign(&json!({"iss": issuer.url, "sub": "alice", "exp": now() + 600, "scope": "mcp:connect"})), "aud"),
        ("expired beyond the leeway", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() - 120, "scope": "mcp:connect"})), "expired"),
        ("not valid yet", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "nbf": now() + 300, "scope": "mcp:connect"})), "not yet valid"),
        ("a not-before as a string", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "nbf": "9999999999", "scope": "mcp:connect"})), "valid nbf claim"),
        ("a negative not-before", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "nbf": -1, "scope": "mcp:connect"})), "valid nbf claim"),
        ("a not-before past 2^64", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "nbf": 1e20, "scope": "mcp:connect"})), "valid nbf claim"),
        ("a fractional not-before to come", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "nbf": (now() + 300) as f64 + 0.5, "scope": "mcp:connect"})), "not yet valid"),
        ("no expiry", key.sign(&json!({"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "scope": "mcp:connect"})), "exp"),
        ("an untrusted issuer", key.sign(&json!({"iss": "https://evil.example", "sub": "alice", "aud": RESOURCE, "exp": now() + 600, "scope": "mcp:connect"})), "issuer"),
        ("no subject", key.sign(&json!({"iss": issuer.url, "aud": RESOURCE, "exp": now() + 600, "scope": "mcp:connect"})), "sub"),
        ("a machine principal's name", key.sign(&issuer.claims("machine", "mcp:connect")), "static-token"),
        ("a subject with a line break", key.sign(&issuer.claims("alice\nINFO forged", "mcp:connect")), "valid sub claim"),
        ("a subject with a terminal escape", key.sign(&issuer.claims("alice\u{1b}[2K", "mcp:connect")), "valid sub claim"),
        ("a subject with a C1 control", key.sign(&issuer.claims("alice\u{85}root", "mcp:connect")), "valid sub claim"),
        ("a subject with a zero-width space", key.sign(&issuer.claims("admin\u{200B}", "mcp:connect")), "valid sub claim"),
        ("a subject with a variation selector", key.sign(&issuer.claims("admin\u{FE0F}", "mcp:connect")), "valid sub claim"),
        ("a subject with a line separator", key.sign(&issuer.claims("alice\u{2028}INFO forged", "mcp:connect")), "valid sub claim"),
        ("a subject with a right-to-left override", key.sign(&issuer.claims("alice\u{202E}nimda", "mcp:connect")), "valid sub claim"),
        ("an empty subject", key.sign(&issuer.claims("", "mcp:connect")), "valid sub claim"),
        ("a subject over 256 bytes", key.sign(&issuer.claims(&"a".repeat(257), "mcp:connect")), "valid sub claim"),
        ("a subject that is not a string", key.sign(&json!({"iss": issuer.url, "sub": 42, "aud": RESOURCE, "exp": now() + 600, "scope": "mcp:connect"})), "valid sub claim"),
        ("garbage", "not.a.jwt".into(), "well-formed"),
        ("too long", format!("{}.{}.{}", "a".repeat(9000), "b".repeat(9000), "c"), "well-formed"),
    ];
    // alg none: the claims of a good token, no signature.
    let payload = good.split('.').nth(1).unwrap();
    forged.push((
        "alg none",
        format!(
            "{}.{payload}.",
            b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#)
        ),
        "well-formed",
    ));
    // Algorithm confusion: HS256 keyed with public material the JWKS shows everyone.
    let public_x = key.jwk["x"].as_str().unwrap().as_bytes().to_vec();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    forged.push((
        "HS256 keyed with the public key",
        jsonwebtoken::encode(
            &hs,
            &issuer.claims("alice", "mcp:connect"),
            &EncodingKey::from_secret(&public_x),
        )
        .unwrap(),
        "algorithm",
    ));
    // A critical extension this gateway does not implement, correctly signed.
    let crit_header = b64(br#"{"alg":"ES256","kid":"k1","crit":["exp"]}"#);
    let crit_body = b64(issuer.claims("alice", "mcp:connect").to_string().as_bytes());
    let crit_message = format!("{crit_header}.{crit_body}");
    let crit_sig =
        jsonwebtoken::crypto::sign(crit_message.as_bytes(), &key.encoding, Algorithm::ES256)
            .unwrap();
    forged.push((
        "a critical extension",
        format!("{crit_message}.{crit_sig}"),
        "crit",
    ));
    // The signature of a good token on other claims.
    let sig = good.rsplit('.').next().unwrap();
    let header = good.split('.').next().unwrap();
    let other = b64(issuer
        .claims("root", "mcp:connect mcp:tools")
        .to_string()
        .as_bytes());
    forged.push((
        "a good signature on other claims",
        format!("{header}.{other}.{sig}"),
        "signature",
    ));

    for (what, token, says) in &forged {
        let r = initialize(&gw, Some(token)).await;
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        let c = challenge(&r);
        assert!(c.contains("error=\"invalid_token\""), "{what}: {c}");
        assert!(
            c.contains(&format!("resource_metadata=\"{METADATA_URL}\"")),
            "{what}: {c}"
        );
        assert!(
            c.to_lowercase().contains(&says.to_lowercase()),
            "{what}: the description should mention {says:?}: {c}"
        );
        assert!(
            !r.body.contains(token.as_str()) || token.len() < 12,
            "{what}: token echoed"
        );
    }

    // Machines keep working beside it all.
    let mut machine = gw.client();
    machine.token = Some(MACHINE.into());
    machine.initialize(json!({})).await;
    assert_eq!(
        machine.tool_text(1, "echo", json!({"text": "m"})).await,
        "m"
    );
}

#[tokio::test]
async fn keys_rotate_and_unknown_key_ids_cannot_make_the_gateway_hammer_the_issuer() {
    let old = SigningKey::rs256("old");
    let issuer = Issuer::start(&[&old]).await;
    let gw = gateway(&issuer).await;
    assert_eq!(issuer.fetches(), 0, "keys are fetched when first needed");
    let token = old.sign(&issuer.claims("alice", "mcp:connect"));
    assert_eq!(initialize(&gw, Some(&token)).await.status, 200);
    assert_eq!(initialize(&gw, Some(&token)).await.status, 200);
    assert_eq!(issuer.fetches(), 1, "the set is cached");

    // A burst of made-up key ids: at most one fetch per refetch interval.
    let before = issuer.fetches();
    let started = std::time::Instant::now();
    for i in 0..30 {
        let bogus = SigningKey::es256(&format!("bogus-{i}"));
        let r = initialize(
            &gw,
            Some(&bogus.sign(&issuer.claims("alice", "mcp:connect"))),
        )
        .await;
        assert_eq!(r.status, 401);
        assert!(
            challenge(&r).contains("no signing key"),
            "{}",
            challenge(&r)
        );
    }
    let allowed = 1 + started.elapsed().as_millis() as usize / 300;
    let fetched = issuer.fetches() - before;
    assert!(
        fetched <= allowed,
        "{fetched} fetches in {:?}",
        started.elapsed()
    );

    // Rotation: the issuer publishes a new key (Ed25519) and signs with it.
    let new = SigningKey::ed25519("new");
    issuer.publish(&new);
    let rotated = new.sign(&issuer.claims("alice", "mcp:connect"));
    eventually("the rotated key is fetched", || async {
        initialize(&gw, Some(&rotated)).await.status == 200
    })
    .await;
    // The old key still works while it is published.
    assert_eq!(initialize(&gw, Some(&token)).await.status, 200);
}

#[tokio::test]
async fn a_request_abandoned_while_keys_are_fetched_does_not_leave_them_unfetched() {
    use tokio::io::AsyncWriteExt;
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    issuer.delay_ms.store(500, Ordering::SeqCst);
    let top = format!(
        "auth:
  oauth:
    resource: {RESOURCE}
    key_refetch_interval: 60s
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]
",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    // Any token naming the issuer makes the gateway fetch its keys; the client leaves while
    // the fetch runs (no valid token needed: a made-up key id does it).
    let stranger = SigningKey::es256("made-up");
    let token = stranger.sign(&issuer.claims("mallory", "mcp"));
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = r#"{"jsonrpc":"2.0","id":0,"method":"ping"}"#;
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    eventually("the keys are being fetched", || async {
        issuer.fetches() == 1
    })
    .await;
    drop(conn);
    // The fetch finishes without the request that began it: the next token is checked with
    // the keys it brought, not refused for a whole refetch interval.
    let r = initialize(&gw, Some(&key.sign(&issuer.claims("alice", "mcp")))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(issuer.fetches(), 1, "one fetch served both");
}

#[tokio::test]
async fn an_issuer_that_is_down_refuses_its_tokens_and_nothing_else() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    issuer.failing.store(true, Ordering::SeqCst);
    let gw = gateway(&issuer).await;
    let r = initialize(&gw, Some(&key.sign(&issuer.claims("alice", "mcp:connect")))).await;
    assert_eq!(r.status, 401);
    assert!(
        challenge(&r).contains("cannot be fetched"),
        "{}",
        challenge(&r)
    );
    assert_eq!(initialize(&gw, Some(MACHINE)).await.status, 200);
    // Back up: tokens work again (after the refetch interval).
    issuer.failing.store(false, Ordering::SeqCst);
    let token = key.sign(&issuer.claims("alice", "mcp:connect"));
    eventually("the issuer's keys are fetched again", || async {
        initialize(&gw, Some(&token)).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn scopes_are_checked_per_request_with_a_step_up_challenge() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = gateway(&issuer).await;

    // Without the scope every request needs: 403, naming it.
    let r = initialize(&gw, Some(&key.sign(&issuer.claims("alice", "mcp:tools")))).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let c = challenge(&r);
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    assert!(c.contains("scope=\"mcp:connect\""), "{c}");

    // Connected, but not allowed to call tools: listing works, calling is refused with
    // every scope the call needs in one challenge.
    let mut low = with_token(&gw, &key.sign(&issuer.claims("alice", "mcp:connect")));
    low.initialize(json!({})).await;
    let list = low.call(1, "tools/list", json!({})).await;
    assert!(list["result"]["tools"].as_array().unwrap().len() >= 2);
    let r = low
        .post(json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}).to_string())
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let c = challenge(&r);
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    assert!(
        c.contains("scope=\"mcp:connect mcp:tools mcp:tools:echo\""),
        "{c}"
    );
    assert!(
        c.contains(&format!("resource_metadata=\"{METADATA_URL}\"")),
        "{c}"
    );
    assert_eq!(r.json()["id"], json!(2), "the refusal answers the request");

    // `mcp:tools` covers `mcp:tools:echo` (the hierarchy); a narrower scope covers only its
    // own tool.
    let mut wide = with_token(
        &gw,
        &key.sign(&issuer.claims("alice", "mcp:connect mcp:tools")),
    );
    wide.initialize(json!({})).await;
    assert_eq!(wide.tool_text(3, "echo", json!({"text": "hi"})).await, "hi");
    let mut narrow = with_token(
        &gw,
        &key.sign(&issuer.claims("carol", "mcp:connect mcp:tools:add")),
    );
    narrow.initialize(json!({})).await;
    let r = narrow
        .post(json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}).to_string())
        .await;
    assert_eq!(
        r.status, 403,
        "mcp:tools:add does not cover mcp:tools: {}",
        r.body
    );

    // A session belongs to its principal: bob's token does not open alice's session.
    let mut bob = with_token(
        &gw,
        &key.sign(&issuer.claims("bob", "mcp:connect mcp:tools")),
    );
    bob.session = wide.session.clone();
    let r = bob
        .post(json!({"jsonrpc":"2.0","id":5,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // The same scope checks hold for stateless (2026-07-28) requests.
    let mut stateless = gw.client();
    stateless.token = low.token.clone();
    let body = json!({"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},
        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}})
    .to_string();
    let req = stateless
        .request("POST", body.clone())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let r = stateless.send(req).await;
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test]
async fn the_protected_resource_metadata_is_public_and_says_where_tokens_come_from() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = gateway(&issuer).await;
    let c = gw.client();
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let mut client = c.clone();
        client.url = format!("http://{}{path}", gw.addr);
        let r = client
            .send(
                client
                    .request("GET", "")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.headers["access-control-allow-origin"], "*");
        let doc = r.json();
        assert_eq!(doc["resource"], RESOURCE);
        assert_eq!(doc["authorization_servers"], json!([issuer.url]));
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
        assert_eq!(
            doc["scopes_supported"],
            json!(["mcp:connect", "mcp:tools", "mcp:tools:echo"])
        );
        assert_eq!(doc["resource_name"], "Test gateway");
        let r = client
            .send(
                client
                    .request("POST", "")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 405);
    }
    let mut other = c.clone();
    other.url = format!(
        "http://{}/.well-known/oauth-protected-resource/other",
        gw.addr
    );
    let r = other
        .send(
            other
                .request("GET", "")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn plugins_see_the_tokens_groups_and_the_latest_tokens_scopes() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    // `add` is visible to group eng; `echo` to holders of a deploy scope.
    let plugins = format!(
        "plugins:
  modules:
    - name: lists
      path: {:?}
      config: {{ default: deny, rules: [ {{ groups: [eng], allow: [add] }}, {{ scopes: [\"deploy:*\"], allow: [echo] }} ] }}
  chains:
    - {{ name: all, plugins: [lists] }}
",
        support::wasm("list_filter")
    );
    let gw = trusting_only(&issuer, &plugins).await;
    let tools = |c: Client| async move {
        let list = c.call(9, "tools/list", json!({})).await;
        let mut names: Vec<String> = list["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let mut eng = with_token(&gw, &key.sign(&issuer.claims("alice", "mcp")));
    eng.initialize(json!({})).await;
    assert_eq!(tools(eng.clone()).await, ["add"]);
    let mut sales = gw.client();
    let mut claims = issuer.claims("bob", "mcp");
    claims["groups"] = json!(["sales"]);
    sales.token = Some(key.sign(&claims));
    sales.initialize(json!({})).await;
    assert!(tools(sales.clone()).await.is_empty());
    // The same session with a stepped-up token: its scopes count from the next request.
    eng.token = Some(key.sign(&issuer.claims("alice", "mcp deploy:prod")));
    assert_eq!(tools(eng.clone()).await, ["add", "echo"]);
}

#[tokio::test]
async fn a_remembered_token_still_expires() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = gateway_with(&issuer, "    leeway: 0s\n").await;
    let mut claims = issuer.claims("alice", "mcp:connect mcp:tools");
    claims["exp"] = json!(now() + 2);
    let mut c = with_token(&gw, &key.sign(&claims));
    c.initialize(json!({})).await;
    // Verified once, then remembered: still honored until its exp, and not a second longer.
    assert_eq!(c.tool_text(1, "echo", json!({"text": "a"})).await, "a");
    eventually("the remembered token expires", || async {
        let r = c
            .post(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}).to_string())
            .await;
        r.status == 401 && challenge(&r).contains("expired")
    })
    .await;
}

/// Each profile is a protected resource of its own: tokens name it in `aud`, its challenges
/// point at its own metadata, and a grant by scope asks for a step-up.
#[tokio::test]
async fn each_profile_is_a_resource_of_its_own() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let top = format!(
        "auth:
  oauth:
    resource: {RESOURCE}
    resource_name: Test gateway
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]
    required_scopes: [mcp:connect]
    scope_rules:
      - {{ methods: [tools/call], names: [echo], scopes: [mcp:echo] }}
mcp:
  root_access: {{ everyone: true }}
profiles:
  - {{ name: dev, description: Developer tools, grant: {{ scopes: [mcp:dev] }}, servers: [{{ name: ex, tools: [{{ name: echo, rename: say }}, {{ name: add }}] }}] }}
  - {{ name: team, grant: {{ groups: [eng] }}, servers: [{{ name: ex }}] }}
",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let dev_resource = format!("{RESOURCE}/dev");
    let token = |aud: &str, scope: &str, groups: Value| {
        let mut claims = issuer.claims("alice", scope);
        claims["aud"] = json!(aud);
        claims["groups"] = groups;
        key.sign(&claims)
    };
    let initialize_at = |path: &str, token: String| {
        let mut c = Client::new(format!("http://{}{path}", gw.addr));
        c.token = Some(token);
        async move {
            c.post(
                json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                    "protocolVersion":"2025-11-25","capabilities":{},
                    "clientInfo":{"name":"t","version":"1"}}})
                .to_string(),
            )
            .await
        }
    };

    // A token for the gateway's own resource is not one for dev, nor the other way round.
    let r = initialize_at(
        "/mcp/dev",
        token(RESOURCE, "mcp:connect mcp:dev", json!([])),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let c = challenge(&r);
    assert!(
        c.contains(&format!("resource_metadata=\"{METADATA_URL}/dev\"")),
        "{c}"
    );
    let for_dev = token(&dev_resource, "mcp:connect mcp:dev", json!([]));
    let r = initialize_at("/mcp", for_dev.clone()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = initialize_at("/mcp/dev", for_dev.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Verified (and cached) for dev, it is still not one for the gateway's own resource.
    let r = initialize_at("/mcp", for_dev).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Granted by a scope the token lacks: step up, asking for it.
    let r = initialize_at(
        "/mcp/dev",
        token(&dev_resource, "mcp:connect", json!(["eng"])),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let c = challenge(&r);
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    assert!(c.contains("scope=\"mcp:connect mcp:dev\""), "{c}");
    assert!(
        c.contains(&format!("resource_metadata=\"{METADATA_URL}/dev\"")),
        "{c}"
    );
    // A broader scope covers the grant's.
    let r = initialize_at(
        "/mcp/dev",
        token(&dev_resource, "mcp:connect mcp", json!([])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A rename does not slip past the scope rule written for the tool's own name.
    let mut dev = Client::new(format!("http://{}/mcp/dev", gw.addr));
    dev.token = Some(token(&dev_resource, "mcp:connect mcp:dev", json!([])));
    dev.initialize(json!({})).await;
    let r = dev
        .post(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"say","arguments":{"text":"x"}}}).to_string())
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(challenge(&r).contains("mcp:echo"), "{}", challenge(&r));
    dev.token = Some(token(
        &dev_resource,
        "mcp:connect mcp:dev mcp:echo",
        json!([]),
    ));
    assert_eq!(dev.tool_text(2, "say", json!({"text": "ok"})).await, "ok");

    // Granted by group.
    let team = format!("{RESOURCE}/team");
    let r = initialize_at("/mcp/team", token(&team, "mcp:connect", json!(["eng"]))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = initialize_at("/mcp/team", token(&team, "mcp:connect", json!(["sales"]))).await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Each profile's metadata document, at its path-inserted URL.
    let get = |path: &str| {
        let c = Client::new(format!("http://{}{path}", gw.addr));
        async move {
            c.send(c.request("GET", "").body(Full::new(Bytes::new())).unwrap())
                .await
        }
    };
    let r = get("/.well-known/oauth-protected-resource/mcp/dev").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.json();
    assert_eq!(doc["resource"], dev_resource);
    assert_eq!(doc["resource_name"], "Developer tools");
    assert_eq!(
        doc["scopes_supported"],
        json!(["mcp:connect", "mcp:echo", "mcp:dev"])
    );
    assert_eq!(doc["authorization_servers"], json!([issuer.url]));
    let doc = get("/.well-known/oauth-protected-resource/mcp/team")
        .await
        .json();
    assert_eq!(doc["resource_name"], "Test gateway (team)");
    assert_eq!(
        get("/.well-known/oauth-protected-resource/mcp/nope")
            .await
            .status,
        404
    );
    gw.stop().await;
}

/// An authorization server's token endpoint doing OAuth 2.0 Token Exchange (RFC 8693) as one
/// would: it authenticates the client (Basic), checks the grant, the token types and the
/// audience, refuses subjects it does not serve (`invalid_grant`), and issues a new token per
/// exchange. It keeps every form it was sent.
#[derive(Clone, Default)]
struct ExchangeServer {
    forms: Arc<std::sync::Mutex<Vec<std::collections::HashMap<String, String>>>>,
    issued: Arc<AtomicUsize>,
    expires_in: Arc<std::sync::Mutex<Value>>,
}

impl ExchangeServer {
    async fn start() -> (ExchangeServer, String) {
        let server = ExchangeServer::default();
        *server.expires_in.lock().unwrap() = json!(600);
        let kept = server.clone();
        let url = support::serve(move |headers, body| {
            let form: std::collections::HashMap<String, String> =
                form_urlencoded::parse(&body).into_owned().collect();
            kept.forms.lock().unwrap().push(form.clone());
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("gatehouse:s3cret")
            );
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&basic) {
                return Some((401, json!({"error": "invalid_client"})));
            }
            let field = |k: &str| form.get(k).map(String::as_str);
            if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:token-exchange")
                || field("subject_token_type")
                    != Some("urn:ietf:params:oauth:token-type:access_token")
                || field("audience") != Some("files-api")
            {
                return Some((400, json!({"error": "invalid_request"})));
            }
            // The subject: the token's `sub` (this server trusts the same issuer).
            let payload = field("subject_token")?.split('.').nth(1)?;
            let claims: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .ok()?,
            )
            .ok()?;
            let sub = claims["sub"].as_str()?;
            if sub == "mallory" {
                return Some((
                    400,
                    json!({"error": "invalid_grant", "error_description": "subject not allowed\r\nX-Injected: 1"}),
                ));
            }
            let n = kept.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Some((
                200,
                json!({"access_token": format!("upstream-{sub}-{n}"),
                       "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                       "token_type": "Bearer",
                       "expires_in": kept.expires_in.lock().unwrap().clone()}),
            ))
        })
        .await;
        (server, format!("{url}/token"))
    }
}

/// An MCP server whose one tool answers with the `Authorization` header it was sent; it keeps
/// the headers of every request.
async fn recording_upstream() -> (Arc<std::sync::Mutex<Vec<http::HeaderMap>>>, String) {
    let seen: Arc<std::sync::Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let kept = seen.clone();
    let url = support::serve(move |headers, body| {
        let auth = headers
            .get("authorization")
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        kept.lock().unwrap().push(headers);
        Some((200, support::whoami_answer(&body, &auth)?))
    })
    .await;
    (seen, format!("{url}/mcp"))
}

#[tokio::test]
async fn callers_tokens_are_exchanged_for_the_upstreams_own() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let (exchange, token_endpoint) = ExchangeServer::start().await;
    let (seen, upstream_url) = recording_upstream().await;
    let (top, files) = exchanging(&issuer, &upstream_url, &token_endpoint);
    // A machine with a static token besides, and a scope asked for.
    let top = top.replacen(
        "auth:\n",
        &format!("auth:\n  tokens: [{{ principal: machine, token: {MACHINE} }}]\n"),
        1,
    );
    let files = files.replacen(
        "audience: files-api",
        "audience: files-api, scope: files.read",
        1,
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], ""), files]).await;
    let session = |token: String| {
        let gw = &gw;
        async move {
            let mut c = with_token(gw, &token);
            c.initialize(json!({})).await;
            c
        }
    };
    let alice_token = key.sign(&issuer.claims("alice", "mcp:connect"));
    let alice = session(alice_token.clone()).await;
    // Exchanged already for the handshake, which initialize makes.
    assert_eq!(exchange.issued.load(Ordering::SeqCst), 1);
    assert_eq!(
        alice.tool_text(1, "files__whoami", json!({})).await,
        "Bearer upstream-alice-1"
    );
    // Cached while it is valid: no second exchange.
    assert_eq!(
        alice.tool_text(2, "files__whoami", json!({})).await,
        "Bearer upstream-alice-1"
    );
    assert_eq!(exchange.issued.load(Ordering::SeqCst), 1);
    {
        let forms = exchange.forms.lock().unwrap();
        assert_eq!(forms[0]["subject_token"], alice_token);
        assert_eq!(forms[0]["scope"], "files.read");
        assert_eq!(
            forms[0]["requested_token_type"],
            "urn:ietf:params:oauth:token-type:access_token"
        );
        assert!(
            !forms[0].contains_key("client_id"),
            "the secret client authenticates by Basic"
        );
    }

    // A token that expires at once is exchanged for every request to the upstream.
    *exchange.expires_in.lock().unwrap() = json!(0);
    let bob = session(key.sign(&issuer.claims("bob", "mcp:connect"))).await;
    let first = bob.tool_text(3, "files__whoami", json!({})).await;
    let before = exchange.issued.load(Ordering::SeqCst);
    let second = bob.tool_text(4, "files__whoami", json!({})).await;
    assert!(first.starts_with("Bearer upstream-bob-"), "{first}");
    assert_eq!(second, format!("Bearer upstream-bob-{}", before + 1));
    assert_eq!(exchange.issued.load(Ordering::SeqCst), before + 1);

    // A subject the authorization server refuses: a clear error naming why (its text made
    // printable), and nobody else affected.
    let mallory = session(key.sign(&issuer.claims("mallory", "mcp:connect"))).await;
    let r = mallory
        .call(
            5,
            "tools/call",
            json!({"name": "files__whoami", "arguments": {}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32042, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused the exchange: invalid_grant (subject not allowed"),
        "{message}"
    );
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "{message}"
    );
    assert_eq!(
        alice.tool_text(6, "files__whoami", json!({})).await,
        "Bearer upstream-alice-1"
    );

    // A static-token caller has no OAuth token to exchange: refused, not sent without one.
    let machine = session(MACHINE.to_owned()).await;
    let r = machine
        .call(
            7,
            "tools/call",
            json!({"name": "files__whoami", "arguments": {}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32042, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the caller has none"),
        "{r}"
    );
    // Its other server still works.
    assert_eq!(machine.tool_text(8, "ex__whoami", json!({})).await, "ex");

    // The upstream never saw a client's own token, in any header.
    for headers in seen.lock().unwrap().iter() {
        for (name, value) in headers {
            let v = value.to_str().unwrap_or("");
            assert!(
                !v.contains(&alice_token) && !v.contains(MACHINE),
                "client token upstream in {name}"
            );
        }
    }
    gw.stop().await;
}

/// What [`refusing_upstream`] refuses, by the start of the `Authorization` value, and every
/// `Authorization` value it was sent, in order.
#[derive(Clone, Default)]
struct Refusals {
    /// 401 with a `Bearer` challenge (RFC 6750 §3), as a server refuses a revoked token.
    revoked: Arc<std::sync::Mutex<Vec<String>>>,
    /// 403: the token is good, but not for this.
    forbidden: Arc<std::sync::Mutex<Vec<String>>>,
    /// 401 without a challenge (not a bearer token's refusal).
    plain: Arc<std::sync::Mutex<Vec<String>>>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Refusals {
    fn add(list: &Arc<std::sync::Mutex<Vec<String>>>, prefix: &str) {
        list.lock().unwrap().push(prefix.into());
    }

    fn seen_since(&self, n: usize) -> Vec<String> {
        self.seen.lock().unwrap()[n..].to_vec()
    }
}

/// An MCP server like [`recording_upstream`] that refuses the `Authorization` values
/// [`Refusals`] names.
async fn refusing_upstream() -> (Refusals, String) {
    let refusals = Refusals::default();
    let kept = refusals.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
                        kept.seen.lock().unwrap().push(auth.clone());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let listed = |l: &Arc<std::sync::Mutex<Vec<String>>>| {
                            l.lock().unwrap().iter().any(|p| auth.starts_with(p))
                        };
                        let (status, challenge, answer) = if listed(&kept.revoked) {
                            (401, Some(r#"Bearer error="invalid_token""#), json!({}))
                        } else if listed(&kept.forbidden) {
                            (403, None, json!({}))
                        } else if listed(&kept.plain) {
                            (401, None, json!({}))
                        } else {
                            match support::whoami_answer(&body, &auth) {
                                Some(answer) => (200, None, answer),
                                None => (202, None, Value::Null),
                            }
                        };
                        let mut resp = http::Response::new(Full::new(if answer.is_null() {
                            Bytes::new()
                        } else {
                            Bytes::from(answer.to_string())
                        }));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        let h = resp.headers_mut();
                        h.insert("content-type", "application/json".parse().unwrap());
                        h.insert("mcp-session-id", "files-session".parse().unwrap());
                        if let Some(challenge) = challenge {
                            h.insert("www-authenticate", challenge.parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (refusals, url)
}

/// The oauth settings of a gateway trusting `issuer`, and an upstream `files` whose credentials
/// are exchanged at `token_endpoint`.
fn exchanging(issuer: &Issuer, upstream_url: &str, token_endpoint: &str) -> (String, String) {
    let top = format!(
        "auth:
  oauth:
    resource: {RESOURCE}
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    let files = format!(
        "  - name: files
    protocol: sessions
    http: {{ url: {upstream_url:?} }}
    credentials:
      token_exchange: {{ token_endpoint: {token_endpoint:?}, client_id: gatehouse, client_secret: s3cret, audience: files-api }}
"
    );
    (top, files)
}

/// A token the upstream stops accepting (revoked before it expires) is exchanged again and
/// the call goes through; a replacement refused too is not replaced again at once (an upstream
/// refusing everything costs the authorization server one exchange per caller per pace, not
/// one per call), and the caller gets -32042 saying its credentials were refused, while the
/// server stays up for everyone else.
#[tokio::test]
async fn an_exchanged_token_the_upstream_refuses_is_exchanged_again_once() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let (exchange, token_endpoint) = ExchangeServer::start().await;
    let (refusals, upstream_url) = refusing_upstream().await;
    let (top, files) = exchanging(&issuer, &upstream_url, &token_endpoint);
    let gw = TestGateway::start(&top, &[example("ex", &[], ""), files]).await;
    let mut alice = with_token(&gw, &key.sign(&issuer.claims("alice", "mcp:connect")));
    alice.initialize(json!({})).await;
    assert_eq!(
        alice.tool_text(1, "files__whoami", json!({})).await,
        "Bearer upstream-alice-1"
    );
    let issued = || exchange.issued.load(Ordering::SeqCst);
    assert_eq!(issued(), 1);
    let whoami = |id: u64| {
        let alice = &alice;
        async move {
            alice
                .call(
                    id,
                    "tools/call",
                    json!({"name": "files__whoami", "arguments": {}}),
                )
                .await
        }
    };
    let refused = |r: &Value, status: &str| {
        assert_eq!(r["error"]["code"], -32042, "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("'files'")
                && message.contains(&format!("refused the caller's credentials (HTTP {status}")),
            "{message}"
        );
    };
    let up = |gw: &TestGateway| {
        let metrics = gw.gateway().metrics.render();
        assert!(
            metrics.contains("gatehouse_upstream_up{server=\"files\"} 1"),
            "{metrics}"
        );
    };

    // Refused, but not as a bearer token (no challenge), or for want of rights (403): the
    // caller's failure, with no second exchange nor a second try.
    for (list, status) in [(&refusals.plain, "401"), (&refusals.forbidden, "403")] {
        Refusals::add(list, "Bearer upstream-alice-1");
        let before = refusals.seen.lock().unwrap().len();
        refused(&whoami(2).await, status);
        assert_eq!(
            refusals.seen_since(before),
            ["Bearer upstream-alice-1"],
            "sent once"
        );
        assert_eq!(issued(), 1);
        up(&gw);
        list.lock().unwrap().clear();
    }

    // Revoked at the upstream: exchanged again, the request sent once more, and answered.
    Refusals::add(&refusals.revoked, "Bearer upstream-alice-1");
    let before = refusals.seen.lock().unwrap().len();
    assert_eq!(
        alice.tool_text(3, "files__whoami", json!({})).await,
        "Bearer upstream-alice-2"
    );
    assert_eq!(
        refusals.seen_since(before),
        ["Bearer upstream-alice-1", "Bearer upstream-alice-2"]
    );
    assert_eq!(issued(), 2);
    assert_eq!(
        alice.tool_text(4, "files__whoami", json!({})).await,
        "Bearer upstream-alice-2",
        "the new token is kept"
    );

    // Everything of alice's refused: her replacement is not replaced again within the pace.
    Refusals::add(&refusals.revoked, "Bearer upstream-alice-");
    for id in 5..8 {
        refused(&whoami(id).await, "401");
    }
    assert_eq!(issued(), 2, "one exchange per pace, not one per call");
    // The server is up: these were alice's failures.
    up(&gw);
    let metrics = gw.gateway().metrics.render();
    assert!(
        metrics.contains("gatehouse_upstream_credentials_refused_total{server=\"files\"} 5"),
        "{metrics}"
    );

    // Nobody else is affected: another caller, alice's other server.
    let mut bob = with_token(&gw, &key.sign(&issuer.claims("bob", "mcp:connect")));
    bob.initialize(json!({})).await;
    assert_eq!(
        bob.tool_text(8, "files__whoami", json!({})).await,
        "Bearer upstream-bob-3"
    );
    assert_eq!(alice.tool_text(9, "ex__whoami", json!({})).await, "ex");
    gw.stop().await;
}

/// A token endpoint issuing as [`ExchangeServer`] does, which holds each answer until
/// `together` exchanges have come or `within` has passed: exchanges asked at the same time
/// meet there.
async fn holding_token_endpoint(
    together: usize,
    within: std::time::Duration,
) -> (Arc<AtomicUsize>, String) {
    let asked = Arc::new(AtomicUsize::new(0));
    let came = Arc::new(tokio::sync::Notify::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let counted = asked.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (asked, came) = (counted.clone(), came.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let (asked, came) = (asked.clone(), came.clone());
                    async move {
                        let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
                        came.notify_waiters();
                        let _ = tokio::time::timeout(within, async {
                            while asked.load(Ordering::SeqCst) < together {
                                came.notified().await;
                            }
                        })
                        .await;
                        let body = json!({"access_token": format!("upstream-{n}"),
                            "token_type": "Bearer", "expires_in": 600});
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from(body.to_string())));
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (asked, url)
}

/// Sessions a caller opens at the same time, with one token, wait on one exchange rather
/// than each making its own.
#[tokio::test]
async fn concurrent_first_requests_of_a_caller_share_one_exchange() {
    const SESSIONS: usize = 8;
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    // Without sharing, all eight exchanges come and are answered at once; with it, the one
    // that comes is held the whole second, while the others wait on it.
    let (asked, token_endpoint) =
        holding_token_endpoint(SESSIONS, std::time::Duration::from_secs(1)).await;
    let (_, upstream_url) = recording_upstream().await;
    let (top, files) = exchanging(&issuer, &upstream_url, &token_endpoint);
    let gw = TestGateway::start(&top, &[files]).await;
    let token = key.sign(&issuer.claims("alice", "mcp:connect"));
    let opened = futures::future::join_all((0..SESSIONS).map(|i| {
        let mut c = with_token(&gw, &token);
        async move {
            c.initialize(json!({})).await;
            c.tool_text(i as u64 + 1, "files__whoami", json!({})).await
        }
    }))
    .await;
    assert_eq!(asked.load(Ordering::SeqCst), 1, "one exchange for all");
    assert!(
        opened.iter().all(|t| t == "Bearer upstream-1"),
        "{opened:?}"
    );
    gw.stop().await;
}

#[test]
fn token_exchange_settings_are_checked() {
    let base = "listen: 127.0.0.1:0\nupstreams:\n";
    for (upstream, field) in [
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {token_exchange: {token_endpoint: 'http://as.example/token', client_id: g}}}\n",
            "upstreams[0].credentials.token_exchange.token_endpoint",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {token_exchange: {token_endpoint: 'https://u:p@as.example/token', client_id: g}}}\n",
            "upstreams[0].credentials.token_exchange.token_endpoint",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {template: 'x', token_exchange: {token_endpoint: 'https://as.example/token', client_id: g}}}\n",
            "upstreams[0].credentials.token_exchange",
        ),
        (
            "  - {name: a, sse: {url: 'http://127.0.0.1:1/sse'}, credentials: {token_exchange: {token_endpoint: 'https://as.example/token', client_id: g}}}\n",
            "upstreams[0].credentials.token_exchange",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {token_exchange: {token_endpoint: 'https://as.example/token', client_id: g, client_secret_env: GATEHOUSE_TEST_UNSET_VARIABLE}}}\n",
            "upstreams[0].credentials.token_exchange.client_secret_env",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {token_exchange: {token_endpoint: 'https://as.example/token', client_id: ''}}}\n",
            "upstreams[0].credentials.token_exchange.client_id",
        ),
    ] {
        let e = gatehouse::Config::from_yaml(&format!("{base}{upstream}"))
            .expect_err(upstream)
            .to_string();
        assert!(e.contains(field), "{upstream}: {e}");
    }
    // A valid one: its Debug does not show the secret.
    let ok = gatehouse::Config::from_yaml(&format!(
        "{base}  - {{name: a, http: {{url: 'http://127.0.0.1:1/mcp'}}, credentials: {{token_exchange: {{token_endpoint: 'https://as.example/token', client_id: g, client_secret: do-not-print}}}}}}\n"
    ))
    .unwrap();
    assert!(!format!("{:?}", ok.upstreams[0].credentials).contains("do-not-print"));
}

/// Stateless requests of one principal whose tokens grant different scopes run in hidden
/// sessions of their own (one token's request is never judged by another's grants); a
/// principal with more sets in use than it may hold sessions is told so, and a refreshed
/// token with the same grants is not a new set.
#[tokio::test]
async fn stateless_tokens_with_other_grants_are_kept_apart_and_counted() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = trusting_only(&issuer, "mcp: { max_sessions_per_principal: 1 }\n").await;
    let list = |token: String| stateless(&gw, token, "tools/list", json!({}));
    let first = list(key.sign(&issuer.claims("alice", "mcp"))).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let other = list(key.sign(&issuer.claims("alice", "mcp deploy:prod"))).await;
    assert_eq!(other.status, 429, "{}", other.body);
    assert_eq!(other.error_code(), -32012, "{}", other.body);
    assert!(
        other.body.contains("max_sessions_per_principal"),
        "{}",
        other.body
    );
    // A new token with the same grants, and another principal, are served.
    let mut refreshed = issuer.claims("alice", "mcp");
    refreshed["jti"] = json!("second");
    assert_eq!(list(key.sign(&refreshed)).await.status, 200);
    assert_eq!(
        list(key.sign(&issuer.claims("bob", "mcp deploy:prod")))
            .await
            .status,
        200
    );
    assert_eq!(gw.gateway().stateless_sessions(), 2);
}

/// A 2026-07-28 request of `token`'s caller, `params` given their `_meta` (sampling declared).
async fn stateless(
    gw: &TestGateway,
    token: String,
    method: &str,
    mut params: Value,
) -> support::Resp {
    let mut c = gw.client();
    c.token = Some(token);
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                             "io.modelcontextprotocol/clientCapabilities":{"sampling":{}}});
    let body = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params}).to_string();
    let mut req = c
        .request("POST", body.clone())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(name) = params["name"].as_str() {
        req = req.header("mcp-name", name);
    }
    c.send(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
}

/// A call parked for its client's input was judged by the grants of the token that began it:
/// a retry with a token of the same principal granting other scopes does not pick it up (nor
/// spend it); one granting the same does.
#[tokio::test]
async fn a_parked_call_is_resumed_only_with_the_grants_that_began_it() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = trusting_only(&issuer, "").await;
    let call = json!({"name": "sample", "arguments": {"prompt": "q"}});
    let first = stateless(
        &gw,
        key.sign(&issuer.claims("alice", "mcp")),
        "tools/call",
        call.clone(),
    )
    .await
    .response();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let question = first["result"]["inputRequests"].as_object().unwrap();
    let asked = question.keys().next().unwrap().clone();
    let mut retry = call.clone();
    retry["requestState"] = first["result"]["requestState"].clone();
    retry["inputResponses"] = json!({ asked: {"role": "assistant", "model": "m",
                                             "content": {"type": "text", "text": "yes"}} });
    let wider = key.sign(&issuer.claims("alice", "mcp deploy:prod"));
    let r = stateless(&gw, wider, "tools/call", retry.clone()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not issued to this caller"), "{}", r.body);
    let mut same = issuer.claims("alice", "mcp");
    same["jti"] = json!("refreshed");
    let done = stateless(&gw, key.sign(&same), "tools/call", retry)
        .await
        .response();
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: yes",
        "{done}"
    );
}

/// POSTs an initialize with `token` to `path` of `gw`.
async fn initialize_at(gw: &TestGateway, path: &str, token: &str) -> support::Resp {
    let mut c = Client::new(format!("http://{}{path}", gw.addr));
    c.token = Some(token.to_owned());
    c.post(
        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"t","version":"1"}}})
        .to_string(),
    )
    .await
}

/// An issuer trusted for some scopes grants those only: a partner's token carrying `mcp` (which
/// covers every `mcp:*`) or a profile's scope opens nothing more than its list allows.
#[tokio::test]
async fn an_issuer_grants_only_the_scopes_it_is_trusted_for() {
    let (key_a, key_b) = (SigningKey::es256("a"), SigningKey::es256("b"));
    let (a, b) = (
        Issuer::start(&[&key_a]).await,
        Issuer::start(&[&key_b]).await,
    );
    let top = format!(
        "auth:
  oauth:
    resource: {RESOURCE}
    required_scopes: [mcp:connect]
    issuers:
      - {{ issuer: {ia:?}, jwks_uri: {ja:?}, principal_prefix: \"corp:\" }}
      - {{ issuer: {ib:?}, jwks_uri: {jb:?}, principal_prefix: \"partner:\", scopes: [mcp:connect] }}
mcp:
  root_access: {{ everyone: true }}
profiles:
  - {{ name: dev, grant: {{ scopes: [mcp:dev] }}, servers: [{{ name: ex }}] }}
",
        ia = a.url,
        ja = format!("{}/jwks", a.url),
        ib = b.url,
        jb = format!("{}/jwks", b.url),
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let token = |key: &SigningKey, issuer: &Issuer, scope: &str, aud: &str| {
        let mut claims = issuer.claims("alice", scope);
        claims["aud"] = json!(aud);
        key.sign(&claims)
    };
    let dev = format!("{RESOURCE}/dev");
    for (what, key, issuer, scope, path, aud, status) in [
        (
            "the partner's listed scope",
            &key_b,
            &b,
            "mcp:connect",
            "/mcp",
            RESOURCE,
            200,
        ),
        (
            "the partner's `mcp`",
            &key_b,
            &b,
            "mcp",
            "/mcp",
            RESOURCE,
            403,
        ),
        (
            "the partner's profile scope",
            &key_b,
            &b,
            "mcp:connect mcp:dev",
            "/mcp/dev",
            &dev,
            403,
        ),
        (
            "corp's profile scope",
            &key_a,
            &a,
            "mcp:connect mcp:dev",
            "/mcp/dev",
            &dev,
            200,
        ),
        ("corp's `mcp`", &key_a, &a, "mcp", "/mcp", RESOURCE, 200),
    ] {
        let r = initialize_at(&gw, path, &token(key, issuer, scope, aud)).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        if status == 403 {
            assert!(
                challenge(&r).contains("insufficient_scope"),
                "{what}: {}",
                challenge(&r)
            );
        }
    }
    // A list that is not scopes is refused at start, naming the field.
    let bad = top.replace("scopes: [mcp:connect] }", "scopes: [\"mcp connect\"] }");
    let e = gatehouse::Config::from_yaml(&format!(
        "{bad}upstreams:\n  - {{name: ex, http: {{url: 'http://127.0.0.1:1/mcp'}}}}\n"
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("auth.oauth.issuers[1].scopes[0]"),
        "{e}"
    );
    // So is one under which no token could have the scopes every request needs.
    let useless = top.replace("scopes: [mcp:connect] }", "scopes: [partner.read] }");
    let e = gatehouse::Config::from_yaml(&format!(
        "{useless}upstreams:\n  - {{name: ex, http: {{url: 'http://127.0.0.1:1/mcp'}}}}\n"
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("auth.oauth.issuers[1].scopes")
            && e.to_string().contains("mcp:connect"),
        "{e}"
    );
    gw.stop().await;
}

/// With several issuers, each one's principals and groups carry its `principal_prefix`: issuer
/// B's `alice` (or `a:alice`, or group `eng`) is not issuer A's, neither for A's alice's session
/// nor for profiles granted to A's names; and a token naming A as `iss` but signed with one of
/// B's keys (even under a key id A uses too) is refused.
#[tokio::test]
async fn several_issuers_keep_their_principals_and_groups_apart() {
    let key_a = SigningKey::es256("k");
    let key_b = SigningKey::es256("k"); // the same key id at the other issuer
    let only_b = SigningKey::ed25519("b-only");
    let a = Issuer::start(&[&key_a]).await;
    let b = Issuer::start(&[&key_b, &only_b]).await;
    let top = format!(
        "auth:
  oauth:
    resource: {RESOURCE}
    key_refetch_interval: 300ms
    issuers:
      - {{ issuer: {ia:?}, jwks_uri: {ja:?}, principal_prefix: \"a:\" }}
      - {{ issuer: {ib:?}, jwks_uri: {jb:?}, principal_prefix: \"b:\" }}
mcp:
  root_access: {{ everyone: true }}
profiles:
  - {{ name: alice, grant: {{ principals: [\"a:alice\"] }}, servers: [{{ name: ex }}] }}
  - {{ name: eng, grant: {{ groups: [\"a:eng\"] }}, servers: [{{ name: ex }}] }}
  - {{ name: bare, grant: {{ principals: [alice], groups: [eng] }}, servers: [{{ name: ex }}] }}
",
        ia = a.url,
        ja = format!("{}/jwks", a.url),
        ib = b.url,
        jb = format!("{}/jwks", b.url),
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    // A token `key` signs for `issuer`'s `sub`, with `groups`, for the endpoint `aud`.
    let token = |key: &SigningKey, issuer: &Issuer, sub: &str, groups: Value, aud: &str| {
        let mut claims = issuer.claims(sub, "mcp");
        claims["groups"] = groups;
        claims["aud"] = json!(aud);
        key.sign(&claims)
    };
    let list = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string();

    // A's alice opens a session; another token of hers uses it, B's alice cannot (it does not
    // exist for her), nor can B's `a:alice`.
    let mut alice_a = with_token(&gw, &token(&key_a, &a, "alice", json!([]), RESOURCE));
    alice_a.initialize(json!({})).await;
    let mut again = a.claims("alice", "mcp");
    again["jti"] = json!("again");
    let mut same = with_token(&gw, &key_a.sign(&again));
    same.session = alice_a.session.clone();
    let r = same.post(list.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for (what, sub) in [("B's alice", "alice"), ("B's a:alice", "a:alice")] {
        let mut intruder = with_token(&gw, &token(&key_b, &b, sub, json!([]), RESOURCE));
        intruder.session = alice_a.session.clone();
        let r = intruder.post(list.clone()).await;
        assert_eq!(r.status, 404, "{what}: {}", r.body);
    }
    // B's alice has sessions of her own, which A's alice cannot use either.
    let mut alice_b = with_token(&gw, &token(&key_b, &b, "alice", json!([]), RESOURCE));
    alice_b.initialize(json!({})).await;
    let mut intruder = alice_a.clone();
    intruder.session = alice_b.session.clone();
    let r = intruder.post(list.clone()).await;
    assert_eq!(r.status, 404, "{}", r.body);

    // A profile granted to principal `a:alice` opens to A's alice only.
    let at = |p: &str| format!("{RESOURCE}/{p}");
    let r = initialize_at(
        &gw,
        "/mcp/alice",
        &token(&key_a, &a, "alice", json!([]), &at("alice")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for sub in ["alice", "a:alice"] {
        let r = initialize_at(
            &gw,
            "/mcp/alice",
            &token(&key_b, &b, sub, json!([]), &at("alice")),
        )
        .await;
        assert_eq!(r.status, 403, "B's {sub}: {}", r.body);
    }
    // One granted to group `a:eng` opens to A's group eng only: B's eng is `b:eng`, and B's
    // `a:eng` is `b:a:eng`.
    let r = initialize_at(
        &gw,
        "/mcp/eng",
        &token(&key_a, &a, "carol", json!(["eng"]), &at("eng")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for group in ["eng", "a:eng"] {
        let r = initialize_at(
            &gw,
            "/mcp/eng",
            &token(&key_b, &b, "carol", json!([group]), &at("eng")),
        )
        .await;
        assert_eq!(r.status, 403, "B's group {group}: {}", r.body);
    }
    // The bare names grant no one: every principal and group of either issuer is prefixed.
    for (key, issuer) in [(&key_a, &a), (&key_b, &b)] {
        let r = initialize_at(
            &gw,
            "/mcp/bare",
            &token(key, issuer, "alice", json!(["eng"]), &at("bare")),
        )
        .await;
        assert_eq!(r.status, 403, "{}'s alice: {}", issuer.url, r.body);
    }

    // A token claiming A as its issuer but signed by B is refused: under the key id both use
    // (A's key does not verify it), or under one only B publishes (A has no such key).
    for (what, forged, says) in [
        (
            "B's key under A's key id",
            token(&key_b, &a, "alice", json!([]), RESOURCE),
            "signature",
        ),
        (
            "a key only B has",
            token(&only_b, &a, "alice", json!([]), RESOURCE),
            "no signing key",
        ),
        (
            "A's key, claiming B",
            token(&key_a, &b, "alice", json!([]), RESOURCE),
            "signature",
        ),
    ] {
        let r = initialize(&gw, Some(&forged)).await;
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        let c = challenge(&r);
        assert!(c.contains("error=\"invalid_token\""), "{what}: {c}");
        assert!(
            c.contains(says),
            "{what}: the description should mention {says:?}: {c}"
        );
    }
    gw.stop().await;
}

/// A gateway over `ex` trusting `issuer`, whose resources under `example://ex/echo/secret`
/// need `mcp:secret` (reading and watching), besides the tool rules of [`gateway_with`]; with
/// a profile `dev` (granted by `mcp:dev`) and the root endpoint everyone's.
async fn guarded(issuer: &Issuer) -> TestGateway {
    guarded_with(issuer, "").await
}

/// [`guarded`], with `top` before `auth`.
async fn guarded_with(issuer: &Issuer, top: &str) -> TestGateway {
    let top = format!(
        "{top}auth:
  oauth:
    resource: {RESOURCE}
    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]
    required_scopes: [mcp:connect]
    scope_rules:
      - {{ methods: [tools/call], scopes: [mcp:tools] }}
      - {{ methods: [tools/call], names: [echo], scopes: [mcp:tools:echo] }}
      - {{ methods: [resources/read, resources/subscribe, completion/complete], names: [\"example://ex/echo/secret*\"], scopes: [mcp:secret] }}
mcp:
  root_access: {{ everyone: true }}
profiles:
  - {{ name: dev, grant: {{ scopes: [mcp:dev] }}, servers: [{{ name: ex }}] }}
",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    TestGateway::start(&top, &[example("ex", &[], "")]).await
}

/// Spellings of `example://ex/echo/secret` that a server resolving URIs reads as it.
const SECRET_SPELLINGS: [&str; 7] = [
    "example://ex/echo/secret",
    "example://ex/echo/public/../secret",
    "example://ex/echo/./secret",
    "example://ex/echo/public/%2e%2e/secret",
    "example://ex/echo/%73ecret",
    "EXAMPLE://ex/echo/secret",
    "example://EX/echo/secret",
];

/// A resource a scope rule guards by URI glob is guarded however its URI is spelled: dot
/// segments, percent-escapes and case that a server resolving URIs reads away do not take a
/// request out of the rule, by any method that names a resource (read, subscribe, a listen
/// stream, a completion), with or without a session; other resources need nothing more.
#[tokio::test]
async fn a_uri_spelled_to_miss_a_scope_rule_does_not() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = guarded(&issuer).await;
    let mut low = with_token(&gw, &key.sign(&issuer.claims("alice", "mcp:connect")));
    low.initialize(json!({})).await;
    let post = |c: &Client, id: u64, method: &str, params: Value| {
        let c = c.clone();
        let body = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string();
        async move { c.post(body).await }
    };
    for uri in SECRET_SPELLINGS {
        for method in ["resources/read", "resources/subscribe"] {
            let r = post(&low, 1, method, json!({"uri": uri})).await;
            assert_eq!(r.status, 403, "{method} {uri}: {}", r.body);
            let c = challenge(&r);
            assert!(c.contains("error=\"insufficient_scope\""), "{c}");
            assert!(c.contains("mcp:secret"), "{method} {uri}: {c}");
        }
        let r = post(
            &low,
            2,
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": format!("{uri}/{{x}}")},
                   "argument": {"name": "x", "value": ""}}),
        )
        .await;
        assert_eq!(r.status, 403, "completion {uri}: {}", r.body);
    }
    // Another resource needs nothing more.
    let r = post(
        &low,
        3,
        "resources/read",
        json!({"uri": "example://ex/echo/public"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["contents"][0]["text"], "public");
    // A listen stream (2026-07-28) watching a spelling of it.
    let mut stateless = gw.client();
    stateless.token = low.token.clone();
    let body = json!({"jsonrpc":"2.0","id":4,"method":"subscriptions/listen","params":{
        "notifications": {"resourceSubscriptions": ["example://ex/echo/public/../secret"]},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}})
    .to_string();
    let req = stateless
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let r = stateless.send(req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(challenge(&r).contains("mcp:secret"), "{}", challenge(&r));
    // With the scope, the same spelling goes through.
    let high = {
        let mut c = low.clone();
        c.token = Some(key.sign(&issuer.claims("alice", "mcp:connect mcp:secret")));
        c
    };
    let r = post(
        &high,
        5,
        "resources/read",
        json!({"uri": "example://ex/echo/public/../secret"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    gw.stop().await;
}

/// A tool or prompt a scope rule guards by name is guarded however its name is spelled: case,
/// a NUL and what follows it, and surrounding whitespace, which a server looking names up
/// leniently reads away, do not take a call out of the rule; other tools need nothing more.
#[tokio::test]
async fn a_name_spelled_to_miss_a_scope_rule_does_not() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let gw = gateway_with(
        &issuer,
        "      - { methods: [tools/call, prompts/get], names: [add, greeting], scopes: [math] }\n",
    )
    .await;
    let mut low = with_token(
        &gw,
        &key.sign(&issuer.claims("alice", "mcp:connect mcp:tools")),
    );
    low.initialize(json!({})).await;
    let post = |c: &Client, id: u64, method: &str, params: Value| {
        let c = c.clone();
        let body = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string();
        async move { c.post(body).await }
    };
    for name in [
        "add",
        "Add",
        "ADD",
        "add\u{0}",
        "add\u{0}x",
        "add ",
        " add",
        "\tAdd\n",
    ] {
        let r = post(
            &low,
            1,
            "tools/call",
            json!({"name": name, "arguments": {"a": 1, "b": 2}}),
        )
        .await;
        assert_eq!(r.status, 403, "{name:?}: {}", r.body);
        let c = challenge(&r);
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        assert!(c.contains("math"), "{name:?}: {c}");
    }
    for name in ["Greeting", "greeting\u{0}", " greeting "] {
        let r = post(
            &low,
            2,
            "prompts/get",
            json!({"name": name, "arguments": {"name": "x"}}),
        )
        .await;
        assert_eq!(r.status, 403, "{name:?}: {}", r.body);
        assert!(challenge(&r).contains("math"), "{name:?}");
    }
    // Another tool needs nothing more; with the scope, the guarded one is called.
    assert_eq!(low.tool_text(3, "echo", json!({"text": "hi"})).await, "hi");
    let high = {
        let mut c = low.clone();
        c.token = Some(key.sign(&issuer.claims("alice", "mcp:connect mcp:tools math")));
        c
    };
    let r = post(
        &high,
        4,
        "tools/call",
        json!({"name": "add", "arguments": {"a": 1, "b": 2}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["result"].is_object(), "{}", r.body);
    gw.stop().await;
}

/// An HTTP+SSE client's stream, read one event at a time.
struct SseStream {
    body: hyper::body::Incoming,
    buf: String,
    /// The URL its `endpoint` event named.
    endpoint: String,
}

impl SseStream {
    /// Opens `GET /sse` with `token`; `Err` is the status it was refused with.
    async fn open(gw: &TestGateway, token: &str) -> Result<SseStream, u16> {
        let c = gw.client();
        let req = http::Request::get(format!("http://{}/sse", gw.addr))
            .header("accept", "text/event-stream")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.http.request(req).await.unwrap();
        if resp.status() != 200 {
            return Err(resp.status().as_u16());
        }
        let mut s = SseStream {
            body: resp.into_body(),
            buf: String::new(),
            endpoint: String::new(),
        };
        let (event, data) = s.next(std::time::Duration::from_secs(10)).await.unwrap();
        assert_eq!(event, "endpoint");
        s.endpoint = format!("http://{}/{data}", gw.addr);
        Ok(s)
    }

    /// The next event with data, if one comes within `wait`.
    async fn next(&mut self, wait: std::time::Duration) -> Option<(String, String)> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = Vec::new();
                for line in ev.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d);
                    }
                }
                if !data.is_empty() {
                    return Some((name, data.join("\n")));
                }
                continue;
            }
            let frame = tokio::time::timeout(wait, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&d));
            }
        }
    }

    /// The next JSON-RPC message on the stream (within 10 s).
    async fn message(&mut self) -> Value {
        let (event, data) = self
            .next(std::time::Duration::from_secs(10))
            .await
            .expect("a message");
        assert_eq!(event, "message");
        serde_json::from_str(&data).unwrap()
    }

    /// POSTs `body` to the stream's endpoint with `token`.
    async fn post(&self, gw: &TestGateway, token: &str, body: Value) -> support::Resp {
        let c = gw.client();
        let req = http::Request::post(&self.endpoint)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        c.send(req).await
    }
}

/// The 2024-11-05 HTTP+SSE front applies the scope rules as `/mcp` does: a request that lacks
/// a scope is refused with the step-up challenge (403, not 202) and nothing of it reaches the
/// stream or the server; a stepped-up token of the same principal goes on on the same stream;
/// another principal's token, or a token for a profile's resource, opens nothing.
#[tokio::test]
async fn scopes_hold_on_the_http_sse_front() {
    let key = SigningKey::es256("k");
    let issuer = Issuer::start(&[&key]).await;
    let audit = std::env::temp_dir().join(format!("gatehouse-sse-audit-{}", std::process::id()));
    let _ = std::fs::remove_file(&audit);
    let gw = guarded_with(&issuer, &format!("audit: {{file: {audit:?}}}\n")).await;
    let low = key.sign(&issuer.claims("alice", "mcp:connect"));
    let none = key.sign(&issuer.claims("alice", "mcp:tools"));
    // Without the scope every request needs: initialize is refused.
    let mut stream = SseStream::open(&gw, &low).await.expect("a stream");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = stream.post(&gw, &none, init.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        challenge(&r).contains("scope=\"mcp:connect\""),
        "{}",
        challenge(&r)
    );
    assert_eq!(stream.post(&gw, &low, init).await.status, 202);
    assert_eq!(stream.message().await["id"], 1);

    let call = |id: u64, name: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": {"text": "x"}}})
    };
    let r = stream.post(&gw, &low, call(2, "echo")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let c = challenge(&r);
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    assert!(
        c.contains("scope=\"mcp:connect mcp:tools mcp:tools:echo\""),
        "{c}"
    );
    for (id, uri) in SECRET_SPELLINGS.iter().enumerate() {
        let r = stream
            .post(
                &gw,
                &low,
                json!({"jsonrpc": "2.0", "id": 10 + id, "method": "resources/read",
                    "params": {"uri": uri}}),
            )
            .await;
        assert_eq!(r.status, 403, "{uri}: {}", r.body);
    }
    // Nothing of the refused requests came on the stream.
    assert!(
        stream
            .next(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "a refused request was answered on the stream"
    );
    // Stepped up: the same principal's wider token goes on, on the same stream.
    let wide = key.sign(&issuer.claims("alice", "mcp:connect mcp:tools mcp:tools:echo"));
    assert_eq!(stream.post(&gw, &wide, call(3, "echo")).await.status, 202);
    let answer = stream.message().await;
    assert_eq!(answer["id"], 3);
    assert_eq!(answer["result"]["content"][0]["text"], "x");
    // Another principal with every scope: the stream does not exist for it.
    let bob = key.sign(&issuer.claims("bob", "mcp:connect mcp:tools mcp:tools:echo"));
    assert_eq!(stream.post(&gw, &bob, call(4, "echo")).await.status, 404);
    // A token issued for the profile's resource is not one for these URLs.
    let mut for_dev = issuer.claims("alice", "mcp:connect mcp:dev mcp:tools");
    for_dev["aud"] = json!(format!("{RESOURCE}/dev"));
    let for_dev = key.sign(&for_dev);
    assert_eq!(SseStream::open(&gw, &for_dev).await.err(), Some(401));
    assert_eq!(
        stream.post(&gw, &for_dev, call(5, "echo")).await.status,
        401
    );
    // Each refusal left a denial in the audit trail, as on `/mcp`: the scope refusals with
    // their principal and method, the refused tokens (the one lacking a scope every request
    // needs, the ones for another resource) without.
    let denials = |method: &str, principal: Option<&str>| {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| {
                r["kind"] == "denial"
                    && r["method"] == method
                    && r["principal"].as_str() == principal
            })
            .count()
    };
    eventually("the refusals to be audited", || async {
        denials("tools/call", Some("alice")) == 1
            && denials("resources/read", Some("alice")) == SECRET_SPELLINGS.len()
            && denials("", None) == 3
    })
    .await;
    gw.stop().await;
    let _ = std::fs::remove_file(&audit);
}
