//! Per-caller upstream credentials, against an upstream that records every header it receives:
//! each principal's own secret or a header made from its verified principal, refusal without
//! credentials, and the client's token never sent upstream.

mod support;

use serde_json::json;
use support::TestGateway;
use support::recorder::Recorder;

const ALICE: &str = "alice-client-token-0123456789";
const BOB: &str = "bob-client-token-0123456789";

fn upstream(name: &str, url: &str, credentials: &str) -> String {
    format!(
        "  - name: {name}\n    protocol: sessions\n    http: {{ url: {url:?}, headers: {{ X-Operator: fixed }} }}\n    credentials: {credentials}\n"
    )
}

#[tokio::test]
async fn each_caller_gets_its_own_upstream_credentials_and_never_its_token_upstream() {
    let rec = Recorder::start().await;
    let gw = TestGateway::start(
        &format!(
            "auth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}"
        ),
        &[
            upstream(
                "open",
                &rec.url,
                "{per_principal: [{principal: alice, value: 'Bearer alice-upstream'}], template: 'Bearer user-{principal}'}",
            ),
            upstream(
                "strict",
                &rec.url,
                "{per_principal: [{principal: alice, value: 'Bearer alice-strict'}]}",
            ),
        ],
    )
    .await;
    let client = |token: &str| {
        let mut c = gw.client();
        c.token = Some(token.to_owned());
        c
    };
    let mut alice = client(ALICE);
    alice.initialize(json!({})).await;
    assert_eq!(
        alice.tool_text(1, "open__whoami", json!({})).await,
        "Bearer alice-upstream"
    );
    assert_eq!(
        alice.tool_text(2, "strict__whoami", json!({})).await,
        "Bearer alice-strict"
    );
    let mut bob = client(BOB);
    bob.initialize(json!({})).await;
    assert_eq!(
        bob.tool_text(3, "open__whoami", json!({})).await,
        "Bearer user-bob"
    );
    let r = bob
        .call(
            4,
            "tools/call",
            json!({"name": "strict__whoami", "arguments": {}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32042, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no upstream credentials for principal bob"),
        "{r}"
    );
    // Alice is unaffected by bob's refusal.
    assert_eq!(
        alice.tool_text(5, "strict__whoami", json!({})).await,
        "Bearer alice-strict"
    );

    // Everything the upstream received: the operator's header each time, the client's own
    // token never, in any header.
    let seen = rec.seen.lock().unwrap().clone();
    assert!(seen.len() >= 6, "{} requests", seen.len());
    for headers in &seen {
        assert_eq!(headers["x-operator"], "fixed");
        for (name, value) in headers {
            let v = value.to_str().unwrap_or("");
            assert!(
                !v.contains(ALICE) && !v.contains(BOB),
                "the client's token went upstream in {name}"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn credentials_are_checked_when_the_config_is_read() {
    let base = "listen: 127.0.0.1:0\nupstreams:\n";
    for (upstream, field) in [
        (
            "  - {name: a, stdio: {command: x}, credentials: {template: 'x'}}\n",
            "upstreams[0].credentials",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {}}\n",
            "upstreams[0].credentials",
        ),
        (
            "  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}, credentials: {per_principal: [{principal: p, value_env: GATEHOUSE_TEST_UNSET_VARIABLE}]}}\n",
            "upstreams[0].credentials.per_principal[0].value_env",
        ),
    ] {
        let e = gatehouse::Config::from_yaml(&format!("{base}{upstream}"))
            .expect_err(upstream)
            .to_string();
        assert!(e.contains(field), "{upstream}: {e}");
    }
    // A real value from the environment works, and is not in the config's debug output.
    let ok = gatehouse::Config::from_yaml(&format!(
        "{base}  - {{name: a, http: {{url: 'http://127.0.0.1:1/mcp'}}, credentials: {{per_principal: [{{principal: p, value_env: PATH}}]}}}}\n"
    ))
    .unwrap();
    let path = std::env::var("PATH").unwrap();
    assert!(!format!("{ok:?}").contains(&path));
}

/// The resource the OAuth callers' tokens are meant for.
const RESOURCE: &str = "http://localhost/mcp";

/// A local issuer of Ed25519-signed access tokens: its JWKS served at `{url}/jwks`, and a
/// token for any subject.
struct Issuer {
    url: String,
    key: ring::signature::Ed25519KeyPair,
}

impl Issuer {
    async fn start() -> Issuer {
        use base64::Engine;
        use ring::signature::KeyPair;
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap();
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
        let jwks = json!({"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":x}]}).to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let jwks = jwks.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = bytes::Bytes::from(jwks.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(body),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        Issuer { url, key }
    }

    /// A valid access token of `sub` (signed by hand: EdDSA over `header.claims`).
    fn token(&self, sub: &str) -> String {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = format!(
            "{}.{}",
            b64(json!({"alg":"EdDSA","typ":"at+jwt","kid":"k1"})),
            b64(json!({"iss":self.url,"sub":sub,"aud":RESOURCE,"exp":now + 600,"iat":now}))
        );
        let signature = self.key.sign(signed.as_bytes());
        format!(
            "{signed}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

/// An RFC 8693 token endpoint whose answer is `issue(sub)` for the subject token's `sub`:
/// `(token_type, access_token)`.
async fn token_endpoint(issue: fn(&str) -> (String, String)) -> String {
    use base64::Engine;
    let url = support::serve(move |_, body| {
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&body).into_owned().collect();
        let payload = form.get("subject_token")?.split('.').nth(1)?;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()?,
        )
        .ok()?;
        let (token_type, access_token) = issue(claims["sub"].as_str()?);
        Some((
            200,
            json!({"access_token": access_token, "token_type": token_type,
                   "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                   "expires_in": 600}),
        ))
    })
    .await;
    format!("{url}/token")
}

/// What the authorization server issues in a token exchange is checked before it goes
/// upstream: a token type other than bearer (its name made printable), a token over 8192
/// bytes (MAX_ISSUED) or one that cannot be a header value (empty, a line break) refuses the
/// caller with -32042, the token unechoed and never sent; a bearer token (any case) of exactly
/// 8192 bytes is used, and other callers and servers are unaffected.
#[tokio::test]
async fn an_exchanged_token_that_is_not_a_sound_bearer_token_is_refused() {
    let issuer = Issuer::start().await;
    let rec = Recorder::start().await;
    let endpoint = token_endpoint(|sub| {
        let (kind, token) = match sub {
            "dpop" => ("DPoP\r\nX-Injected: 1", "SECRET-dpop".to_owned()),
            "huge" => ("Bearer", format!("SECRET{}", "x".repeat(8 * 1024 + 1 - 6))),
            "line-break" => ("Bearer", "SECRET\r\nX-Injected: 1".to_owned()),
            "control" => ("Bearer", "SECRET\u{1}".to_owned()),
            "empty" => ("Bearer", String::new()),
            "limit" => ("bearer", "L".repeat(8 * 1024)),
            other => ("Bearer", format!("upstream-{other}")),
        };
        (kind.to_owned(), token)
    })
    .await;
    let top = format!(
        "auth:\n  oauth:\n    resource: {RESOURCE}\n    issuers: [{{ issuer: {iss:?}, jwks_uri: {jwks:?} }}]",
        iss = issuer.url,
        jwks = format!("{}/jwks", issuer.url),
    );
    let files = format!(
        "  - name: files\n    protocol: sessions\n    http: {{ url: {:?} }}\n    credentials:\n      token_exchange: {{ token_endpoint: {endpoint:?}, client_id: gatehouse }}\n",
        rec.url
    );
    let gw = TestGateway::start(&top, &[files, support::example("ex", &[], "")]).await;
    let session = |sub: &'static str| {
        let (gw, token) = (&gw, issuer.token(sub));
        async move {
            let mut c = gw.client();
            c.token = Some(token.clone());
            c.initialize(json!({})).await;
            (c, token)
        }
    };
    let (alice, _) = session("alice").await;
    assert_eq!(
        alice.tool_text(1, "files__whoami", json!({})).await,
        "Bearer upstream-alice"
    );
    let printable = "upstream 'files': the authorization server issued a \"DPoPX-Injected: 1\" token, not a bearer token";
    let over = "upstream 'files': the authorization server issued a token over 8192 bytes";
    let unsafe_header =
        "upstream 'files': the authorization server issued a token that cannot be a header";
    for (id, sub, said) in [
        (2, "dpop", printable),
        (3, "huge", over),
        (4, "line-break", unsafe_header),
        (5, "control", unsafe_header),
        (6, "empty", unsafe_header),
    ] {
        let (c, token) = session(sub).await;
        let r = c
            .call(
                id,
                "tools/call",
                json!({"name": "files__whoami", "arguments": {}}),
            )
            .await;
        assert_eq!(r["error"]["code"], -32042, "{sub}: {r}");
        assert_eq!(r["error"]["message"], said, "{sub}: {r}");
        let text = r.to_string();
        assert!(
            !text.contains("SECRET") && !text.contains(&token),
            "{sub}: {r}"
        );
        // Its other server is still served.
        assert_eq!(c.tool_text(id + 10, "ex__whoami", json!({})).await, "ex");
    }
    let (limit, _) = session("limit").await;
    assert_eq!(
        limit.tool_text(7, "files__whoami", json!({})).await,
        format!("Bearer {}", "L".repeat(8 * 1024))
    );
    assert_eq!(
        alice.tool_text(8, "files__whoami", json!({})).await,
        "Bearer upstream-alice"
    );
    // None of the refused tokens went upstream, in any header.
    for headers in rec.seen.lock().unwrap().iter() {
        for (name, value) in headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains("SECRET"),
                "a refused token went upstream in {name}"
            );
        }
    }
    gw.stop().await;
}

/// Credentials of the caller's own that the upstream refuses are the caller's failure
/// (-32042, saying so), not the server's: it stays up, and other callers go on.
#[tokio::test]
async fn a_callers_refused_credentials_leave_the_server_up_for_the_others() {
    let url = support::serve(|headers, body| {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        if auth == "Bearer user-bob" {
            return Some((401, json!({"error": "invalid_token"})));
        }
        Some((200, support::whoami_answer(&body, &auth)?))
    })
    .await;
    let gw = TestGateway::start(
        &format!(
            "auth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}"
        ),
        &[upstream(
            "files",
            &format!("{url}/mcp"),
            "{template: 'Bearer user-{principal}'}",
        )],
    )
    .await;
    let client = |token: &str| {
        let mut c = gw.client();
        c.token = Some(token.to_owned());
        c
    };
    let mut bob = client(BOB);
    bob.initialize(json!({})).await;
    let r = bob
        .call(1, "tools/call", json!({"name": "whoami", "arguments": {}}))
        .await;
    support::assert_credentials_refused(&gw, &r, "files");
    let mut alice = client(ALICE);
    alice.initialize(json!({})).await;
    assert_eq!(
        alice.tool_text(2, "whoami", json!({})).await,
        "Bearer user-alice"
    );
    let metrics = gw.gateway().metrics.render();
    assert!(
        metrics.contains("gatehouse_upstream_up{server=\"files\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}
