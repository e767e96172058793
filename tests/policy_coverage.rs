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

/// Redaction in one chain, with `selects` (`tools: [...], `) before its plugins.
fn redact_in(selects: &str) -> String {
    format!(
        "plugins:\n  modules:\n    - {{ name: redact, path: {:?} }}\n  chains:\n    - {{ name: all, {selects}plugins: [redact] }}",
        wasm("redact")
    )
}

#[tokio::test]
async fn log_lines_and_errors_are_redacted_like_results() {
    // A chain selecting tools judges a server's log line too: the line may be about any of
    // them, and a result put in a log line must not walk around it.
    for (selects, multi, selects_fail) in [
        ("", false, true),
        ("", true, true),
        ("tools: [\"*\"], ", false, true),
        ("tools: [\"nothing-listed\"], ", true, false),
        (
            "methods: [\"tools/call\"], tools: [\"fs_*\"], ",
            false,
            false,
        ),
    ] {
        let (gw, c, prefix) = gateway(&redact_in(selects), multi).await;
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
        if !selects_fail {
            gw.stop().await;
            continue;
        }
        // An error message (a result of the tool the chain selects).
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

/// A stateless (2026-07-28) request to `c`'s endpoint, with the headers such a client mirrors.
async fn stateless(c: &Client, id: u64, method: &str, mut params: Value) -> support::Resp {
    use bytes::Bytes;
    use http_body_util::Full;
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let mut req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params
        .get("name")
        .or(params.get("uri"))
        .and_then(Value::as_str)
    {
        req = req.header("mcp-name", n);
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    c.send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
}

/// A 2024-11-05 HTTP+SSE client: its stream, and the URL it posts to.
struct SseClient {
    body: hyper::body::Incoming,
    buf: String,
    endpoint: String,
    http: Client,
}

impl SseClient {
    async fn open(gw: &TestGateway) -> SseClient {
        use bytes::Bytes;
        use http_body_util::Full;
        let http = gw.client();
        let req = http::Request::get(format!("http://{}/sse", gw.addr))
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = http.http.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut c = SseClient {
            body: resp.into_body(),
            buf: String::new(),
            endpoint: String::new(),
            http,
        };
        let data = c.next_data().await;
        c.endpoint = format!("http://{}/{data}", gw.addr);
        c.request(
            0,
            "initialize",
            json!({"protocolVersion": "2024-11-05",
            "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
        )
        .await;
        c
    }

    async fn next_data(&mut self) -> String {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if !data.is_empty() {
                    return data.join("\n");
                }
                continue;
            }
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&d));
            }
        }
    }

    /// Posts a request and returns its answer from the stream.
    async fn request(&mut self, id: u64, method: &str, params: Value) -> Value {
        use bytes::Bytes;
        use http_body_util::Full;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let req = http::Request::post(&self.endpoint)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        assert_eq!(self.http.send(req).await.status, 202);
        let answer: Value = serde_json::from_str(&self.next_data().await).unwrap();
        assert_eq!(answer["id"], id, "{answer}");
        answer
    }
}

/// What a list-filter plugin hides is hidden, and refused by the plugin, on every front: the
/// 2024-11-05 HTTP+SSE stream and 2026-07-28 requests without a session judge the same as a
/// Streamable HTTP session, by every route (call, prompt, read, subscribe, completion, listen).
#[tokio::test]
async fn hidden_entries_stay_hidden_on_every_front() {
    let plugins = format!(
        "plugins:\n  modules:\n    - name: lists\n      path: {:?}\n      config: {{ rules: [ {{ kinds: [tool], deny: [echo] }}, {{ kinds: [prompt], deny: [greeting] }}, {{ kinds: [resource, resource-template], deny: [\"example://a/*\"] }} ] }}\n  chains:\n    - {{ name: all, plugins: [lists] }}",
        wasm("list_filter")
    );
    for multi in [false, true] {
        let mut upstreams = vec![example("a", &["--test-tools"], "")];
        if multi {
            upstreams.push(example("b", &["--test-tools"], ""));
        }
        let gw = TestGateway::start(&plugins, &upstreams).await;
        let p = if multi { "a__" } else { "" };
        let hidden: Vec<(&str, Value)> = vec![
            (
                "tools/call",
                json!({"name": format!("{p}echo"), "arguments": {"text": "x"}}),
            ),
            (
                "prompts/get",
                json!({"name": format!("{p}greeting"), "arguments": {"name": "x"}}),
            ),
            ("resources/read", json!({"uri": "example://a/readme"})),
            ("resources/read", json!({"uri": "example://a/echo/x"})),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/prompt", "name": format!("{p}greeting")},
                "argument": {"name": "name", "value": ""}}),
            ),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/resource", "uri": "example://a/echo/{text}"},
                "argument": {"name": "text", "value": ""}}),
            ),
        ];
        // HTTP+SSE.
        let mut sse = SseClient::open(&gw).await;
        for (i, (method, params)) in hidden.iter().enumerate() {
            let r = sse.request(10 + i as u64, method, params.clone()).await;
            assert_eq!(
                r["error"]["code"], -32030,
                "multi={multi} SSE {method} {params}: {r}"
            );
        }
        for (i, method) in ["resources/subscribe", "resources/unsubscribe"]
            .iter()
            .enumerate()
        {
            let r = sse
                .request(20 + i as u64, method, json!({"uri": "example://a/readme"}))
                .await;
            assert_eq!(
                r["error"]["code"], -32030,
                "multi={multi} SSE {method}: {r}"
            );
        }
        let tools = sse.request(30, "tools/list", json!({})).await;
        let listed = support::tool_names(&tools);
        assert!(
            !listed.contains(&format!("{p}echo")),
            "multi={multi}: {listed:?}"
        );
        assert!(
            listed.contains(&format!("{p}add")),
            "multi={multi}: {listed:?}"
        );

        // 2026-07-28 without a session.
        let c = gw.client();
        for (i, (method, params)) in hidden.iter().enumerate() {
            let r = stateless(&c, 40 + i as u64, method, params.clone()).await;
            assert_eq!(
                r.response()["error"]["code"],
                -32030,
                "multi={multi} stateless {method} {params}: {}",
                r.body
            );
        }
        let r = stateless(&c, 50, "tools/list", json!({})).await;
        let listed = support::tool_names(&r.response());
        assert!(
            !listed.contains(&format!("{p}echo")),
            "multi={multi}: {listed:?}"
        );
        // A listen stream is not told of a hidden resource's changes: it is not watched.
        let mut listen = {
            use bytes::Bytes;
            use http_body_util::Full;
            let body = json!({"jsonrpc": "2.0", "id": "l", "method": "subscriptions/listen", "params": {
                "notifications": {"resourceSubscriptions": ["example://a/readme"]},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                          "io.modelcontextprotocol/clientCapabilities": {}}}});
            let req = c
                .request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "subscriptions/listen")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let resp = c.http.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            support::SseReader::new(resp.into_body())
        };
        let ack = listen.next().await.unwrap();
        assert_eq!(
            ack["params"]["notifications"],
            json!({}),
            "multi={multi}: {ack}"
        );
        gw.stop().await;
    }
}

/// An MCP server over HTTP that runs its tool as a task (2025-11-25) when asked to: the call
/// answers with the task, and `tasks/result` with what the tool returned (a secret). It counts
/// the task-augmented calls it was sent (by any spelling of `task` a lenient decoder reads).
async fn task_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let tasks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = tasks.clone();
    let url = support::serve(move |_headers, body| {
        let msg: Value = serde_json::from_slice(&body).ok()?;
        let id = msg.get("id")?.clone();
        let task = json!({"taskId": "t1", "status": "completed", "createdAt": "2025-11-25T00:00:00Z",
            "lastUpdatedAt": "2025-11-25T00:00:00Z", "ttl": 60000});
        let leaked = json!({"content": [{"type": "text", "text": format!("key {KEY}")}]});
        let augmented = msg["params"].as_object().is_some_and(|p| {
            p.keys()
                .any(|k| k.trim_end_matches('\0').eq_ignore_ascii_case("task"))
        });
        let result = match msg["method"].as_str()? {
            "initialize" => json!({"protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}, "tasks": {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}},
                "serverInfo": {"name": "tasks", "version": "1"}}),
            "tools/list" => json!({"tools": [{"name": "leak", "inputSchema": {"type": "object"},
                "execution": {"taskSupport": "optional"}}]}),
            "tools/call" if augmented => {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                json!({"task": task})
            }
            "tools/call" => leaked,
            "tasks/get" => task,
            "tasks/result" => leaked,
            "tasks/list" => json!({"tasks": [task]}),
            _ => json!({}),
        };
        Some((200, json!({"jsonrpc": "2.0", "id": id, "result": result})))
    })
    .await;
    (format!("{url}/mcp"), tasks)
}

/// A call's result passes the result chains of its method however the client asks for it:
/// a task-augmented call (2025-11-25), whose result would come back later under
/// `tasks/result` (a method that names no tool, past a chain that screens `tools/call`), is
/// refused while plugins judge the call, by any spelling of `task` a server may read, and
/// never reaches the server.
#[tokio::test]
async fn a_task_cannot_carry_a_calls_result_past_the_result_chains() {
    let (url, tasks) = task_server().await;
    let plugins = format!(
        "plugins:\n  modules:\n    - {{ name: redact, path: {:?} }}\n  chains:\n    - {{ name: results, methods: [tools/call], plugins: [redact] }}",
        wasm("redact")
    );
    let gw = TestGateway::start(
        &plugins,
        &[format!(
            "  - name: t\n    protocol: sessions\n    http: {{ url: {url:?} }}\n"
        )],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    // The plain call: redacted.
    let text = c.tool_text(1, "leak", json!({})).await;
    assert!(!text.contains(KEY), "{text}");
    for key in ["task", "Task", "TASK", "task\u{0}"] {
        let mut params = json!({"name": "leak", "arguments": {}});
        params[key] = json!({"ttl": 60000});
        let r = c.call(2, "tools/call", params).await;
        assert_eq!(r["error"]["code"], -32602, "{key:?}: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("task"),
            "{key:?}: {r}"
        );
    }
    assert_eq!(
        tasks.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a task-augmented call reached the server"
    );
    // Through the plugins' session-less path too.
    let r = stateless(
        &gw.client(),
        3,
        "tools/call",
        json!({"name": "leak", "arguments": {}, "task": {"ttl": 60000}}),
    )
    .await;
    assert_eq!(r.response()["error"]["code"], -32602, "{}", r.body);
    assert_eq!(tasks.load(std::sync::atomic::Ordering::SeqCst), 0);
    gw.stop().await;
}
