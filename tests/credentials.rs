//! Per-caller upstream credentials, against an upstream that records every header it receives:
//! each principal's own secret or a header made from its verified principal, refusal without
//! credentials, and the client's token never sent upstream.

mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::TestGateway;

const ALICE: &str = "alice-client-token-0123456789";
const BOB: &str = "bob-client-token-0123456789";

/// A minimal Streamable HTTP MCP server (JSON answers, one session id) whose one tool answers
/// with the `Authorization` header it was sent; it keeps every request's headers.
struct Recorder {
    url: String,
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
        let kept = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            kept.lock().unwrap().push(req.headers().clone());
                            Ok::<_, std::convert::Infallible>(answer(req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { url, seen }
    }
}

async fn answer(req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let status = |s: u16| {
        let mut r = http::Response::new(Full::new(Bytes::new()));
        *r.status_mut() = http::StatusCode::from_u16(s).unwrap();
        r
    };
    if req.method() == http::Method::GET {
        return status(405);
    }
    if req.method() == http::Method::DELETE {
        return status(200);
    }
    let auth = req
        .headers()
        .get("authorization")
        .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(id) = msg.get("id").cloned() else {
        return status(202);
    };
    let result = match msg["method"].as_str().unwrap_or("") {
        "initialize" => json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "recorder", "version": "1"}}),
        "tools/list" => json!({"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]}),
        "tools/call" => json!({"content": [{"type": "text", "text": auth}]}),
        _ => json!({}),
    };
    let mut r = http::Response::new(Full::new(Bytes::from(
        json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
    )));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("mcp-session-id", "recorded-session".parse().unwrap());
    r
}

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
