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
