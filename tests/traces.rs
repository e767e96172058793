//! OpenTelemetry traces: spans exported over OTLP/HTTP to a collector that records what it
//! receives, W3C trace context taken from the client (header or `_meta`) and passed upstream
//! to a server that records what it was sent, policy hooks as child spans, and a collector that
//! is down costing the clients nothing.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Client, TestGateway, serve, wasm};

/// A collector keeping every span it is sent, with the headers and resource of each export.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Value>>>,
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    resources: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    async fn start() -> (Collector, String) {
        let c = Collector::default();
        let kept = c.clone();
        let url = serve(move |headers, body| {
            let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            kept.headers.lock().unwrap().push(headers);
            for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                kept.resources.lock().unwrap().push(rs["resource"].clone());
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        kept.spans.lock().unwrap().push(span.clone());
                    }
                }
            }
            Some((200, json!({})))
        })
        .await;
        (c, format!("{url}/v1/traces"))
    }

    /// The spans of trace `trace_id`, once the server span and `more` others have arrived.
    async fn trace(&self, trace_id: &str, more: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<Value> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s["traceId"] == trace_id)
                .cloned()
                .collect();
            if spans.len() > more && spans.iter().any(|s| s["kind"] == 2) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "trace {trace_id}: {spans:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An MCP server (Streamable HTTP, JSON answers) whose tools answer with what they were
/// sent: the trace headers, `_meta`, the arguments, the name and the raw request body.
async fn upstream() -> String {
    let url = serve(|headers, body| {
        let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let id = msg.get("id")?.clone();
        let result = match msg["method"].as_str().unwrap_or("") {
            "initialize" => json!({"protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}}, "serverInfo": {"name": "traced", "version": "1"}}),
            "tools/list" => json!({"tools": [
                {"name": "echo", "inputSchema": {"type": "object"}},
                {"name": "forbidden", "inputSchema": {"type": "object"}}]}),
            "tools/call" => {
                let seen = json!({
                    "header": headers.get("traceparent").map(|v| v.to_str().unwrap()),
                    "state_header": headers.get("tracestate").map(|v| v.to_str().unwrap()),
                    "raw": String::from_utf8_lossy(&body),
                    "meta": msg["params"]["_meta"],
                    "arguments": msg["params"]["arguments"],
                    "name": msg["params"]["name"],
                });
                json!({"content": [{"type": "text", "text": seen.to_string()}]})
            }
            _ => json!({}),
        };
        Some((200, json!({"jsonrpc": "2.0", "id": id, "result": result})))
    })
    .await;
    format!("{url}/mcp")
}

fn traces_config(endpoint: &str) -> String {
    format!(
        r#"
traces:
  endpoint: "{endpoint}"
  service_name: gatehouse-test
  flush_interval: 20ms
  headers: {{ x-api-key: secret-collector-key }}
plugins:
  modules:
    - name: policy
      path: "{}"
      config: {{ rules: [ {{ tool: forbidden, action: block, reason: "not this one" }} ] }}
  chains: [ {{ methods: ["tools/call"], plugins: [policy] }} ]
"#,
        wasm("tool_policy")
    )
}

fn traced_upstream(url: &str) -> String {
    format!("  - name: rec\n    protocol: sessions\n    http: {{ url: {url:?} }}\n")
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

/// The one span of `kind` (1 internal, 2 server, 3 client) named `name`.
fn one<'a>(spans: &'a [Value], kind: u8, name: &str) -> &'a Value {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s["name"] == name && s["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {name:?} of kind {kind} in {spans:#?}");
    found[0]
}

async fn call_with(c: &Client, id: u64, tool: &str, meta: Value, header: Option<&str>) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {"n": id}, "_meta": meta}})
    .to_string();
    let mut req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25");
    if let Some(h) = header {
        req = req
            .header("traceparent", h)
            .header("tracestate", "vendor=1");
    }
    c.send(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .response()
}

fn seen_upstream(answer: &Value) -> Value {
    let text = answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"));
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn a_call_is_a_trace_continuing_the_clients_and_reaching_the_server() {
    let (collector, endpoint) = Collector::start().await;
    let up = upstream().await;
    let gw = TestGateway::start(&traces_config(&endpoint), &[traced_upstream(&up)]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;

    // The client's context in the header.
    let parent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let answer = call_with(&c, 1, "echo", json!({}), Some(&parent)).await;
    let spans = collector.trace(TRACE, 2).await;
    let server = one(&spans, 2, "tools/call echo");
    assert_eq!(server["parentSpanId"], CLIENT_SPAN);
    assert_eq!(
        attr(server, "mcp.method.name").unwrap()["stringValue"],
        "tools/call"
    );
    assert_eq!(
        attr(server, "gen_ai.tool.name").unwrap()["stringValue"],
        "echo"
    );
    assert_eq!(seen_upstream(&answer)["name"], "echo");
    assert_eq!(
        attr(server, "jsonrpc.request.id").unwrap()["stringValue"],
        "1"
    );
    // The session is named as in the logs: never by its whole id, which is a credential.
    let session = c.session.clone().unwrap();
    let logged = attr(server, "mcp.session.id").unwrap()["stringValue"]
        .as_str()
        .unwrap();
    assert!(
        session.starts_with(logged) && logged.len() < session.len(),
        "{logged}"
    );
    assert_eq!(server["status"]["code"], 0);
    let client = one(&spans, 3, "tools/call echo");
    assert_eq!(client["parentSpanId"], server["spanId"]);
    assert_eq!(
        attr(client, "gatehouse.server").unwrap()["stringValue"],
        "rec"
    );
    let policy = one(&spans, 1, "policy on-request");
    assert_eq!(policy["parentSpanId"], server["spanId"]);
    assert_eq!(
        attr(policy, "gatehouse.policy.decision").unwrap()["stringValue"],
        "allow"
    );
    for s in [server, client, policy] {
        let start: u64 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && end >= start, "{s}");
    }
    // The server was told the upstream call's span is its parent, in the header and in
    // `_meta`, with the client's tracestate; the arguments arrived as sent.
    let upstream_parent = format!("00-{TRACE}-{}-01", client["spanId"].as_str().unwrap());
    let seen = seen_upstream(&answer);
    assert_eq!(seen["header"], upstream_parent);
    assert_eq!(seen["meta"]["traceparent"], upstream_parent);
    assert_eq!(seen["meta"]["tracestate"], "vendor=1");
    assert_eq!(seen["state_header"], "vendor=1");
    // No principal unless asked for.
    assert!(attr(server, "enduser.id").is_none());
    assert_eq!(
        collector.resources.lock().unwrap()[0]["attributes"][0],
        json!({"key": "service.name", "value": {"stringValue": "gatehouse-test"}})
    );
    assert_eq!(seen["arguments"], json!({"n": 1}));

    // The context in `_meta` (SEP-414) wins over the header; the client's own `_meta`
    // members other than the trace context reach the server.
    let meta_trace = "0af7651916cd43dd8448eb211c80319c";
    let meta = json!({"traceparent": format!("00-{meta_trace}-b7ad6b7169203331-01"),
        "progressToken": "p-2"});
    let answer = call_with(&c, 2, "echo", meta, Some(&parent)).await;
    let spans = collector.trace(meta_trace, 2).await;
    let server = one(&spans, 2, "tools/call echo");
    assert_eq!(server["parentSpanId"], "b7ad6b7169203331");
    let seen = seen_upstream(&answer);
    assert!(
        seen["meta"]["traceparent"]
            .as_str()
            .unwrap()
            .starts_with(&format!("00-{meta_trace}-")),
        "{seen}"
    );
    assert_eq!(seen["meta"]["progressToken"], "p-2");
    assert!(seen["meta"].get("tracestate").is_none(), "{seen}");

    // A denial: the policy span says who and why, the request's span failed with the code,
    // and nothing went upstream.
    let deny_trace = "11111111111111111111111111111111";
    let r = call_with(
        &c,
        3,
        "forbidden",
        json!({}),
        Some(&format!("00-{deny_trace}-2222222222222222-01")),
    )
    .await;
    assert_eq!(r["error"]["code"], -32030, "{r}");
    let spans = collector.trace(deny_trace, 1).await;
    let server = one(&spans, 2, "tools/call forbidden");
    assert_eq!(server["status"]["code"], 2);
    assert_eq!(
        attr(server, "rpc.response.status_code").unwrap()["intValue"],
        "-32030"
    );
    let policy = one(&spans, 1, "policy on-request");
    assert_eq!(
        attr(policy, "gatehouse.policy.decision").unwrap()["stringValue"],
        "deny"
    );
    assert_eq!(
        attr(policy, "gatehouse.policy.plugin").unwrap()["stringValue"],
        "policy"
    );
    assert!(
        policy["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not this one")
    );
    assert!(!spans.iter().any(|s| s["kind"] == 3), "{spans:#?}");

    // An unsampled parent records nothing and passes its `_meta` on untouched; a malformed
    // one is no parent (a new trace). Both answer normally.
    let quiet_trace = "33333333333333333333333333333333";
    let quiet = format!("00-{quiet_trace}-4444444444444444-00");
    let answer = call_with(&c, 4, "echo", json!({"traceparent": quiet}), None).await;
    assert_eq!(seen_upstream(&answer)["meta"]["traceparent"], quiet);
    let answer = call_with(&c, 5, "echo", json!({}), Some("00-nonsense")).await;
    let root_trace = seen_upstream(&answer)["header"].as_str().unwrap()[3..35].to_owned();
    assert_ne!(root_trace, TRACE);
    let spans = collector.trace(&root_trace, 1).await;
    assert!(
        one(&spans, 2, "tools/call echo")
            .get("parentSpanId")
            .is_none()
    );
    // Spans are exported in order: the unsampled call's would have come before these.
    assert!(
        !collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s["traceId"] == quiet_trace),
        "an unsampled trace was recorded"
    );
    // Every export carried the configured header.
    assert!(
        collector
            .headers
            .lock()
            .unwrap()
            .iter()
            .all(|h| h["x-api-key"] == "secret-collector-key")
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stateless_request_is_traced_from_its_meta() {
    let (collector, endpoint) = Collector::start().await;
    let up = upstream().await;
    let gw = TestGateway::start(&traces_config(&endpoint), &[traced_upstream(&up)]).await;
    let c = gw.client();
    let trace = "55555555555555555555555555555555";
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
    "name": "echo", "arguments": {},
    "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "traceparent": format!("00-{trace}-6666666666666666-01"),
    }}})
    .to_string();
    let req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let answer = c.send(req).await.response();
    let spans = collector.trace(trace, 1).await;
    let server = one(&spans, 2, "tools/call echo");
    assert_eq!(server["parentSpanId"], "6666666666666666");
    assert_eq!(
        attr(server, "mcp.protocol.version").unwrap()["stringValue"],
        "2026-07-28"
    );
    let seen = seen_upstream(&answer);
    assert_eq!(seen["name"], "echo");
    // The span the server was told is its parent is the gateway's client span, exported.
    let told = seen["meta"]["traceparent"].as_str().unwrap().to_owned();
    assert_eq!(&told[..36], format!("00-{trace}-"));
    let spans = collector.trace(trace, 2).await;
    let client = spans
        .iter()
        .find(|s| s["spanId"] == told[36..52])
        .unwrap_or_else(|| panic!("{told} in {spans:#?}"));
    assert_eq!(client["kind"], 3);
    assert_eq!(client["parentSpanId"], server["spanId"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_the_clients_nothing() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = upstream().await;
    let gw = TestGateway::start(
        &traces_config(&format!("http://{closed}/v1/traces")),
        &[traced_upstream(&up)],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for id in 1..=20 {
        let answer = call_with(&c, id, "echo", json!({}), None).await;
        assert_eq!(seen_upstream(&answer)["arguments"], json!({"n": id}));
    }
    support::counter_reaches(&gw, "gatehouse_trace_spans_dropped_total", 20.0).await;
    gw.stop().await;
}

#[test]
fn bad_trace_settings_are_refused_naming_the_field() {
    let base =
        "listen: 127.0.0.1:0\nupstreams:\n  - {name: a, http: {url: 'http://127.0.0.1:1/mcp'}}\n";
    for (traces, field) in [
        ("{endpoint: 'not a url'}", "traces.endpoint"),
        ("{endpoint: 'ftp://x/v1/traces'}", "traces.endpoint"),
        (
            "{endpoint: 'http://c:4318/v1/traces', sample_ratio: 1.5}",
            "traces.sample_ratio",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', max_queue: 0}",
            "traces.max_queue",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', flush_interval: 0s}",
            "traces.flush_interval",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', headers: {'bad name': x}}",
            "traces.headers.bad name",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', headers: {k: \"a\\nb\"}}",
            "traces.headers.k",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', headers: {k: '${GATEHOUSE_TEST_UNSET_VARIABLE}'}}",
            "traces.headers.k",
        ),
        (
            "{endpoint: 'http://c:4318/v1/traces', colour: blue}",
            "colour",
        ),
        (
            "{endpoint: 'http://user:pw@c:4318/v1/traces'}",
            "traces.endpoint",
        ),
    ] {
        let e = gatehouse::Config::from_yaml(&format!("{base}traces: {traces}\n"))
            .expect_err(traces)
            .to_string();
        assert!(e.contains(field), "{traces}: {e}");
    }
    // The audit trail's OTLP sink is checked the same way.
    for (otlp, field) in [
        ("{endpoint: 'ftp://c/v1/logs'}", "audit.otlp.endpoint"),
        (
            "{endpoint: 'http://c:4318/v1/logs', max_queue: 0}",
            "audit.otlp.max_queue",
        ),
        (
            "{endpoint: 'http://c:4318/v1/logs', headers: {'a b': x}}",
            "audit.otlp.headers.a b",
        ),
    ] {
        let e = gatehouse::Config::from_yaml(&format!("{base}audit: {{otlp: {otlp}}}\n"))
            .expect_err(otlp)
            .to_string();
        assert!(e.contains(field), "{otlp}: {e}");
    }
}

/// Sends `body` as is (a session request) and returns the JSON-RPC answer.
async fn send_raw(c: &Client, body: String, traceparent: Option<&str>) -> Value {
    let mut req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25");
    if let Some(h) = traceparent {
        req = req.header("traceparent", h);
    }
    c.send(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .response()
}

#[tokio::test]
async fn awkward_params_and_contexts_are_bounded_and_never_change_what_the_server_gets() {
    let (collector, endpoint) = Collector::start().await;
    let up = upstream().await;
    // No plugins, one server: the pass-through path, where the client's bytes go upstream.
    let top = format!(
        "traces: {{ endpoint: {endpoint:?}, service_name: gatehouse-test, flush_interval: 20ms }}"
    );
    let gw = TestGateway::start(&top, &[traced_upstream(&up)]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;

    // Without `_meta`, the member is spliced in: every other byte as the client sent it.
    let parent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let params = r#"{"name":"echo",  "arguments": {"z":1, "a":[2, 3.0]} }"#;
    let body =
        format!(r#"{{"jsonrpc":"2.0","id":"req-1","method":"tools/call","params":{params}}}"#);
    let answer = send_raw(&c, body, Some(&parent)).await;
    let seen = seen_upstream(&answer);
    let raw = seen["raw"].as_str().unwrap();
    assert!(
        raw.contains(r#""arguments": {"z":1, "a":[2, 3.0]} }"#),
        "{raw}"
    );
    assert_eq!(seen["meta"]["traceparent"], seen["header"]);
    let spans = collector.trace(TRACE, 1).await;
    let server = one(&spans, 2, "tools/call echo");
    assert_eq!(
        attr(server, "jsonrpc.request.id").unwrap()["stringValue"],
        "req-1"
    );

    // A tool name of 100 KB is forwarded, and its span name is bounded.
    let long_trace = "77777777777777777777777777777777";
    let long = "x".repeat(100_000);
    let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": long, "arguments": {}}})
    .to_string();
    let answer = send_raw(&c, body, Some(&format!("00-{long_trace}-{CLIENT_SPAN}-01"))).await;
    assert_eq!(
        seen_upstream(&answer)["name"].as_str().unwrap().len(),
        100_000
    );
    let spans = collector.trace(long_trace, 1).await;
    for s in &spans {
        assert!(s["name"].as_str().unwrap().len() <= 256, "{}", s["name"]);
        for a in s["attributes"].as_array().unwrap() {
            let v = a["value"]["stringValue"].as_str().unwrap_or("");
            assert!(v.len() <= 256, "{}", a["key"]);
        }
    }

    // A tracestate that could break a header is dropped; the call goes on.
    let state_trace = "88888888888888888888888888888888";
    let meta = json!({"traceparent": format!("00-{state_trace}-{CLIENT_SPAN}-01"),
        "tracestate": "a=1\r\nx-injected: yes"});
    let answer = call_with(&c, 3, "echo", meta, None).await;
    let seen = seen_upstream(&answer);
    assert!(seen["meta"].get("tracestate").is_none(), "{seen}");
    assert!(seen["state_header"].is_null(), "{seen}");
    assert!(
        seen["meta"]["traceparent"]
            .as_str()
            .unwrap()
            .contains(state_trace)
    );

    // A `_meta` given twice (once escaped): which one counts is a parser's guess, so the params
    // go as sent; the header still names the gateway's span.
    let forged = format!("00-{TRACE}-1111111111111111-01");
    let params = format!(
        r#"{{"name":"echo","arguments":{{}},"_meta":{{"traceparent":"{forged}"}},"\u005fmeta":{{"a":1}}}}"#
    );
    let body = format!(r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{params}}}"#);
    let answer = send_raw(&c, body, Some(&parent)).await;
    let seen = seen_upstream(&answer);
    assert!(seen["raw"].as_str().unwrap().contains(&params), "{seen}");
    assert_ne!(seen["header"], forged);
    assert!(seen["header"].as_str().unwrap().contains(TRACE));
    gw.stop().await;
}

#[tokio::test]
async fn an_operator_can_stop_clients_from_choosing_what_is_recorded() {
    let (collector, endpoint) = Collector::start().await;
    let up = upstream().await;
    let top = format!(
        "traces: {{ endpoint: {endpoint:?}, service_name: gatehouse-test, flush_interval: 20ms, sample_ratio: 0, honor_client_sampling: false, record_principal: true }}"
    );
    let gw = TestGateway::start(&top, &[traced_upstream(&up)]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let forced = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    for id in 1..=5 {
        let answer = call_with(
            &c,
            id,
            "echo",
            json!({"traceparent": forced}),
            Some(&forced),
        )
        .await;
        // Not recorded: the client's `_meta` goes on untouched, no header is added.
        let seen = seen_upstream(&answer);
        assert_eq!(seen["meta"]["traceparent"], forced);
        assert!(seen["header"].is_null(), "{seen}");
    }
    // Nothing was queued: no export was ever attempted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(collector.spans.lock().unwrap().is_empty());
    gw.stop().await;
}
