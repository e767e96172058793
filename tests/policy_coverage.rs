//! Every method is under policy: log lines and error messages pass the result chains, and a
//! resource or prompt hidden from a caller can be neither subscribed to nor completed, on a
//! single upstream (pass-through mode) as on several. Real plugin components from `plugins/`.

mod support;

use serde_json::{Value, json};
use support::{Client, TestGateway, example, wasm};

/// A gateway over one upstream (`multi` false: names pass through unprefixed) or two.
async fn gateway(plugins: &str, multi: bool) -> (TestGateway, Client, String) {
    let mut upstreams = vec![example("a", &["--test-tools"], "")];
    if multi {
        upstreams.push(example("b", &["--test-tools"], ""));
    }
    let gw = TestGateway::start(plugins, &upstreams).await;
    let mut c = gw.client();
    c.initialize(json!({"sampling":{}})).await;
    (gw, c, if multi { "a__".into() } else { String::new() })
}

const KEY: &str = "sk-live-0123456789abcdefghij";

fn redact() -> String {
    format!(
        "plugins:\n  modules:\n    - {{ name: redact, path: {:?} }}\n  chains:\n    - {{ name: all, plugins: [redact] }}",
        wasm("redact")
    )
}

#[tokio::test]
async fn log_lines_and_errors_are_redacted_like_results() {
    for multi in [false, true] {
        let (gw, c, prefix) = gateway(&redact(), multi).await;
        // A log line the server sends during the call.
        let r = c
            .post(
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
                    "name":format!("{prefix}log"),"arguments":{"text":format!("key {KEY}")}}})
                .to_string(),
            )
            .await;
        let messages = r.messages();
        let log = messages
            .iter()
            .find(|m| m["method"] == "notifications/message")
            .unwrap_or_else(|| panic!("multi={multi}: no log line in {}", r.body));
        let data = log["params"]["data"].as_str().unwrap();
        assert!(!data.contains(KEY), "multi={multi}: {data}");
        assert!(data.starts_with("key "), "multi={multi}: {data}");
        // An error message.
        let r = c
            .call(
                2,
                "tools/call",
                json!({"name":format!("{prefix}fail"),"arguments":{"text":format!("bad {KEY}")}}),
            )
            .await;
        let message = r["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"));
        assert!(!message.contains(KEY), "multi={multi}: {message}");
        assert_eq!(r["error"]["code"], -32000, "multi={multi}: {r}");
        gw.stop().await;
    }
}

/// A server's request to the client passes the policy chains like its results: one a plugin
/// refuses (here fails on: the same branch) never reaches the client, the server is told the
/// gateway withheld it, and the session carries on.
#[tokio::test]
async fn a_servers_request_a_plugin_refuses_never_reaches_the_client() {
    let plugins = format!(
        "plugins:\n  modules:\n    - {{ name: trap, path: {:?}, config: {{ method: sampling/createMessage }} }}\n  chains:\n    - {{ name: questions, methods: [sampling/createMessage], plugins: [trap] }}",
        wasm("fault_trap")
    );
    for multi in [false, true] {
        let (gw, c, prefix) = gateway(&plugins, multi).await;
        let r = c
            .post(
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
                    "name":format!("{prefix}sample"),"arguments":{"prompt":"secret?"}}})
                .to_string(),
            )
            .await;
        let messages = r.messages();
        assert!(
            messages.iter().all(|m| m.get("method").is_none()),
            "multi={multi}: the question reached the client: {messages:?}"
        );
        let answer = r.response();
        let said = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            said.contains("the gateway's policy withheld this request"),
            "multi={multi}: {answer}"
        );
        let echo = c
            .tool_text(2, &format!("{prefix}echo"), json!({"text":"still"}))
            .await;
        assert_eq!(echo, "still");
        gw.stop().await;
    }
}

fn hide(kinds: &str, names: &str) -> String {
    format!(
        "plugins:\n  modules:\n    - name: lists\n      path: {:?}\n      config: {{ rules: [ {{ kinds: {kinds}, deny: {names} }} ] }}\n  chains:\n    - {{ name: all, plugins: [lists] }}",
        wasm("list_filter")
    )
}

fn denied(r: &Value) -> String {
    assert_eq!(r["error"]["code"], -32030, "{r}");
    r["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn hidden_resources_cannot_be_subscribed_to() {
    for multi in [false, true] {
        let (gw, c, _) = gateway(&hide("[resource]", "[\"example://a/*\"]"), multi).await;
        for (i, method) in [
            "resources/read",
            "resources/subscribe",
            "resources/unsubscribe",
        ]
        .iter()
        .enumerate()
        {
            let r = c
                .call(i as u64, method, json!({"uri":"example://a/readme"}))
                .await;
            let msg = denied(&r);
            assert!(msg.contains("lists"), "multi={multi} {method}: {msg}");
        }
        gw.stop().await;
    }
}

#[tokio::test]
async fn hidden_prompts_cannot_be_completed() {
    for multi in [false, true] {
        let (gw, c, prefix) = gateway(&hide("[prompt]", "[greeting]"), multi).await;
        let r = c
            .call(
                1,
                "completion/complete",
                json!({"ref":{"type":"ref/prompt","name":format!("{prefix}greeting")},
                       "argument":{"name":"name","value":"a"}}),
            )
            .await;
        denied(&r);
        let r = c
            .call(
                2,
                "prompts/get",
                json!({"name":format!("{prefix}greeting"),"arguments":{"name":"x"}}),
            )
            .await;
        denied(&r);
        // Tools are not hidden: they still work.
        assert_eq!(
            c.tool_text(3, &format!("{prefix}echo"), json!({"text":"ok"}))
                .await,
            "ok"
        );
        gw.stop().await;
    }
}
