//! Attacks on the request path: message smuggling into line-delimited upstreams, `"id": null`,
//! deep nesting, and streams that outlive their session. Each test also checks that the
//! gateway keeps serving everyone else.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gatehouse::orchestrator::Runtime;
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{BIN, Client, TestGateway, example, sh_server};

/// A complete JSON-RPC request, alone on its own line, hidden inside a client message: on a
/// newline-delimited upstream it would be read as a second message that no policy saw.
const SMUGGLED_CRASH: &str = "\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"crash\",\"arguments\":{}}}\n";

/// `value` with raw CR/LF whitespace between every token and the smuggled line inside.
fn hostile(value: &Value) -> String {
    let compact = value.to_string();
    let spaced = compact
        .replace("{\"", "{\r\n\"")
        .replace("\":", "\"\n:\r\n")
        .replace(",\"", "\n,\r\"");
    // Put the smuggled request where a member value may go (valid JSON: it is whitespace +
    // an object + whitespace).
    spaced.replacen(
        "\"smuggled\"\n:\r\n0",
        &format!("\"smuggled\":{SMUGGLED_CRASH}"),
        1,
    )
}

async fn pid(c: &Client, tool: &str) -> String {
    c.tool_text(900, tool, json!({})).await
}

async fn post_raw(c: &Client, body: String) -> Value {
    let r = c.post(body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.response()
}

/// Every forwarded field, on a single-upstream (names pass through untouched) and a
/// multi-upstream (names rewritten) gateway: the upstream sees one line per message, answers
/// it, and never runs the smuggled request (its process is still the same one).
#[tokio::test]
async fn client_bytes_never_become_a_second_upstream_message() {
    for upstreams in [
        vec![example("a", &["--test-tools"], "    call_timeout: 5s\n")],
        vec![
            example("a", &["--test-tools"], "    call_timeout: 5s\n"),
            example("b", &["--test-tools"], "    call_timeout: 5s\n"),
        ],
    ] {
        let multi = upstreams.len() > 1;
        let tool = |t: &str| {
            if multi {
                format!("a__{t}")
            } else {
                t.to_owned()
            }
        };
        let gw = TestGateway::start("", &upstreams).await;
        let mut c = gw.client();
        // initialize: capabilities and clientInfo reach the upstream's own initialize.
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25",
            "capabilities":{"sampling":{},"experimental":{"smuggled":0}},
            "clientInfo":{"name":"x\ny","version":"1","smuggled":0}}});
        let r = c.post(hostile(&init)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        c.session = Some(r.headers["mcp-session-id"].to_str().unwrap().to_owned());
        let before = pid(&c, &tool("pid")).await;

        // tools/call, prompts/get, resources/read, a notification, and a response to a server
        // request all carry the smuggled line.
        let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
            "name":tool("echo"),"arguments":{"text":"one\nline","nested":{"smuggled":0}}}});
        let resp = post_raw(&c, hostile(&call)).await;
        assert_eq!(resp["result"]["content"][0]["text"], "one\nline", "{resp}");
        let prompt = json!({"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{
            "name":tool("greeting"),"arguments":{"name":"ann","smuggled":0}}});
        let resp = post_raw(&c, hostile(&prompt)).await;
        assert!(resp.get("result").is_some(), "{resp}");
        let read = json!({"jsonrpc":"2.0","id":3,"method":"resources/read","params":{
            "uri":"example://a/readme","smuggled":0}});
        let resp = post_raw(&c, hostile(&read)).await;
        assert!(resp.get("result").is_some(), "{resp}");
        let note = json!({"jsonrpc":"2.0","method":"notifications/roots/list_changed",
            "params":{"smuggled":0}});
        assert_eq!(c.post(hostile(&note)).await.status, 202);

        // The process that answers is the one that started: nothing smuggled made it exit.
        assert_eq!(pid(&c, &tool("pid")).await, before);
        gw.stop().await;
    }
}

/// A client's answer to a server request (sampling) also reaches the upstream as one line.
#[tokio::test]
async fn answers_to_server_requests_stay_one_message() {
    let gw = TestGateway::start("", &[example("a", &["--test-tools"], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({"sampling":{}})).await;
    let before = pid(&c, "pid").await;
    // The sampling request comes on the call's own (SSE) response stream: read it as it arrives.
    let call = json!({"jsonrpc":"2.0","id":5,"method":"tools/call",
        "params":{"name":"sample","arguments":{"prompt":"hi"}}})
    .to_string();
    let req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(call)))
        .unwrap();
    let resp = c.http.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut answered = false;
    let mut seen = String::new();
    let result = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the call's stream goes on")
            .expect("the call's stream ends with its response")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen.push_str(&String::from_utf8_lossy(&data));
        let mut done = None;
        while let Some(end) = seen.find("\n\n") {
            let event: String = seen.drain(..end + 2).collect();
            let Some(line) = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .filter(|d| !d.is_empty())
            else {
                continue; // a comment, or the priming event
            };
            let msg: Value = serde_json::from_str(line).unwrap();
            if msg["method"] == "sampling/createMessage" {
                let answer = json!({"jsonrpc":"2.0","id":msg["id"],"result":{
                    "role":"assistant","model":"m","smuggled":0,
                    "content":{"type":"text","text":"fine"}}});
                assert_eq!(c.post(hostile(&answer)).await.status, 202);
                answered = true;
            } else if msg["id"] == 5 {
                done = Some(msg);
            }
        }
        if let Some(msg) = done {
            break msg;
        }
    };
    assert!(answered);
    assert_eq!(
        result["result"]["content"][0]["text"], "model said: fine",
        "{result}"
    );
    assert_eq!(pid(&c, "pid").await, before);
    gw.stop().await;
}

const CLIENT_TOKEN: &str = "client-token-0123456789";

/// Two sessions share one orchestrated stdio server. One smuggles requests with every id the
/// gateway is likely to have given the other's pending call: with line smuggling, the server's
/// answer to the forged request would complete the other caller's call.
#[tokio::test]
async fn a_session_cannot_answer_another_sessions_call_on_a_shared_server() {
    let (gw, [victim, attacker]) = shared_server().await;

    let v = victim.clone();
    let slow = tokio::spawn(async move { v.tool_text(1, "slow", json!({"seconds":1})).await });
    // Wait until the victim's call is in flight upstream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut forged = String::new();
    for id in 1..=40 {
        forged.push_str(&format!(
            "\n{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"forged\"}}}}}}\n"
        ));
    }
    let body = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"mine\",\"x\":[{}0]}}}}}}",
        forged.replace("}\n", "}\n,")
    );
    let resp = post_raw(&attacker, body).await;
    assert_eq!(resp["result"]["content"][0]["text"], "mine", "{resp}");
    assert_eq!(slow.await.unwrap(), "done after 1s");
    gw.stop().await;
}

/// A gateway whose one orchestrated stdio server (`shared`, with the test tools) is shared by
/// every session, and two sessions of it.
async fn shared_server() -> (TestGateway, [Client; 2]) {
    let yaml = format!(
        "listen: 127.0.0.1:0\nauth: {{tokens: [{{principal: app, token: {CLIENT_TOKEN}}}]}}\norchestrator: {{connect_timeout: 20s, call_timeout: 20s}}\nservers:\n  - name: shared\n    command: {BIN:?}\n    args: [example-server, --name, shared, --test-tools]\n"
    );
    let config = gatehouse::Config::from_yaml(&yaml).unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(LocalRuntime::new(LocalSettings::default()));
    let running = gatehouse::start_with(config, Some(runtime)).await.unwrap();
    let addr = running.listening.local_addr;
    let gw = TestGateway {
        running: Some(running),
        addr,
    };
    let mut clients = [gw.client(), gw.client()];
    for c in &mut clients {
        c.token = Some(CLIENT_TOKEN.into());
        c.initialize(json!({})).await;
    }
    (gw, clients)
}

/// A shared server's question asked while two sessions' calls run cannot be tied to one
/// caller: no session sees it (it could reach the wrong user), and the server is told why.
#[tokio::test]
async fn a_shared_servers_question_reaches_no_session_when_it_belongs_to_none() {
    let (gw, clients) = shared_server().await;
    let call = |c: &Client| {
        let c = c.clone();
        tokio::spawn(async move {
            c.post(
                json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{
                    "name":"sample","arguments":{"prompt":"whose?","delay":0.3}}})
                .to_string(),
            )
            .await
        })
    };
    let calls = [call(&clients[0]), call(&clients[1])];
    for call in calls {
        let resp = call.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        let messages = resp.messages();
        assert!(
            messages.iter().all(|m| m.get("method").is_none()),
            "a question reached a session: {messages:?}"
        );
        let answer = resp.response();
        let said = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            said.contains("is not related to a client call in progress"),
            "{answer}"
        );
    }
    // The server and both sessions carry on.
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            c.tool_text(4 + i as u64, "echo", json!({"text":"on"}))
                .await,
            "on"
        );
    }
    gw.stop().await;
}

/// `"id": null` is not a notification: it is refused, not silently accepted.
#[tokio::test]
async fn a_null_id_is_an_invalid_request() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let r = c
        .post(r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32600);
    assert!(r.body.contains("null"), "{}", r.body);
    assert_eq!(c.tool_text(2, "echo", json!({"text":"ok"})).await, "ok");
    gw.stop().await;
}

/// Nesting deeper than the parser's limit is refused before anything is forwarded.
#[tokio::test]
async fn deep_nesting_is_refused() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"x","deep":{}1{}}}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let r = c.post(deep).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32600);
    assert!(r.body.contains("64 levels"), "{}", r.body);
    assert_eq!(c.tool_text(2, "echo", json!({"text":"ok"})).await, "ok");
    gw.stop().await;
}

/// Ending a session ends its GET stream at once, however often keep-alives are due.
#[tokio::test]
async fn a_deleted_sessions_stream_ends() {
    let gw = TestGateway::start("mcp: { sse_keepalive: 50ms }", &[example("a", &[], "")]).await;
    let mut other = gw.client();
    other.initialize(json!({})).await;
    for round in 0..3 {
        let mut c = gw.client();
        c.initialize(json!({})).await;
        let get = c
            .request("GET", Bytes::new())
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let stream = c.http.request(get).await.unwrap();
        assert_eq!(stream.status(), 200);
        let drained = tokio::spawn(stream.into_body().collect());
        let del = c
            .request("DELETE", Bytes::new())
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(c.send(del).await.status, 200);
        tokio::time::timeout(Duration::from_secs(3), drained)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the GET stream outlived its session"))
            .unwrap()
            .ok();
        assert_eq!(
            other.tool_text(round, "echo", json!({"text":"ok"})).await,
            "ok"
        );
    }
    gw.stop().await;
}

/// A principal's sessions are capped (each may run its own stdio servers); others are not
/// affected, and ending one makes room.
#[tokio::test]
async fn sessions_per_principal_are_bounded() {
    let gw = TestGateway::start(
        "auth: {tokens: [{principal: alice, token: alice-token-0123456789}, {principal: bob, token: bob-token-0123456789}]}\nmcp: { max_sessions_per_principal: 2 }",
        &[example("a", &[], "")],
    )
    .await;
    let client = |token: &str| {
        let mut c = gw.client();
        c.token = Some(token.into());
        c
    };
    let mut first = client("alice-token-0123456789");
    first.initialize(json!({})).await;
    client("alice-token-0123456789").initialize(json!({})).await;
    let third = client("alice-token-0123456789")
        .post(
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion":"2025-11-25","capabilities":{},
                "clientInfo":{"name":"t","version":"1"}}})
            .to_string(),
        )
        .await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert!(third.body.contains("at most 2"), "{}", third.body);
    // Another principal still gets in.
    let mut bob = client("bob-token-0123456789");
    bob.initialize(json!({})).await;
    assert_eq!(bob.tool_text(1, "echo", json!({"text":"ok"})).await, "ok");
    // Ending one of alice's sessions makes room for another.
    let del = first
        .request("DELETE", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(first.send(del).await.status, 200);
    client("alice-token-0123456789").initialize(json!({})).await;
    gw.stop().await;
}

/// The gateway's sessions are capped (`mcp.max_sessions`) whoever opens them: past the cap an
/// `initialize` is refused with 503, the sessions already open keep working, and ending one
/// makes room.
#[tokio::test]
async fn sessions_are_bounded_for_everyone() {
    let gw = TestGateway::start("mcp: { max_sessions: 2 }", &[example("a", &[], "")]).await;
    let mut first = gw.client();
    first.initialize(json!({})).await;
    let mut second = gw.client();
    second.initialize(json!({})).await;
    let initialize = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},
        "clientInfo":{"name":"t","version":"1"}}})
    .to_string();
    for _ in 0..3 {
        let third = gw.client().post(initialize.clone()).await;
        assert_eq!(third.status, 503, "{}", third.body);
        assert!(third.body.contains("too many sessions"), "{}", third.body);
    }
    assert_eq!(gw.gateway().sessions.len(), 2);
    assert_eq!(
        second.tool_text(1, "echo", json!({"text":"ok"})).await,
        "ok"
    );
    let del = first
        .request("DELETE", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(first.send(del).await.status, 200);
    let mut third = gw.client();
    third.initialize(json!({})).await;
    assert_eq!(third.tool_text(2, "echo", json!({"text":"in"})).await, "in");
    gw.stop().await;
}

/// The gateway's session of client `c`.
fn session_of(gw: &TestGateway, c: &Client) -> Arc<gatehouse::mcp::session::Session> {
    gw.gateway()
        .sessions
        .get(c.session.as_deref().unwrap())
        .unwrap()
        .clone()
}

/// Waits until `session` has `n` client requests in flight.
async fn in_flight(session: &gatehouse::mcp::session::Session, n: usize, what: &str) {
    support::eventually(what, || {
        let now = session.inflight();
        async move { now == n }
    })
    .await;
}

/// A client that goes away mid-call leaves nothing behind in its session's in-flight table.
#[tokio::test]
async fn abandoned_calls_are_forgotten() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let session = session_of(&gw, &c);
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.tool_text(i, "slow", json!({"seconds":30})).await })
        })
        .collect();
    in_flight(&session, 8, "8 calls in flight").await;
    for call in calls {
        call.abort();
    }
    in_flight(&session, 0, "the abandoned calls to be forgotten").await;
    assert_eq!(c.tool_text(100, "echo", json!({"text":"ok"})).await, "ok");
    gw.stop().await;
}

/// Requests in flight are counted one by one, whatever their ids: many under one id do not
/// count as one (and slip past the session's bound).
#[tokio::test]
async fn calls_under_one_id_each_count_against_the_in_flight_bound() {
    let gw = TestGateway::start(
        "mcp: { max_connections_per_ip: 1000 }",
        &[example("a", &[], "")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let session = session_of(&gw, &c);
    let bound = gatehouse::mcp::session::MAX_INFLIGHT;
    let calls: Vec<_> = (0..bound)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                c.call(
                    7,
                    "tools/call",
                    json!({"name":"slow","arguments":{"seconds":60}}),
                )
                .await
            })
        })
        .collect();
    in_flight(&session, bound, "every call in flight").await;
    let one_more = c
        .post(
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call",
                     "params":{"name":"echo","arguments":{"text":"x"}}})
            .to_string(),
        )
        .await;
    assert_eq!(one_more.status, 429, "{}", one_more.body);
    assert_eq!(one_more.error_code(), -32012, "{}", one_more.body);
    for call in calls {
        call.abort();
    }
    in_flight(&session, 0, "the abandoned calls to be forgotten").await;
    assert_eq!(c.tool_text(8, "echo", json!({"text":"ok"})).await, "ok");
    gw.stop().await;
}

/// A server that sends requests without end and never reads what the gateway writes back:
/// the requests no client can be asked are refused by a bounded number of tasks (each waits
/// for a server that does not read), not one task per request, and the session goes on.
#[tokio::test]
async fn a_server_that_asks_without_end_and_never_reads_holds_a_bounded_number_of_tasks() {
    let dir = std::env::temp_dir().join(format!("gatehouse-asker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let done = dir.join("done");
    let _ = std::fs::remove_file(&done);
    const ASKED: usize = 50_000;
    // Answers `initialize`, then asks and asks, never reading its stdin again.
    let script = format!(
        r#"read line
id=$(printf '%s' "$line" | sed -n 's/.*"id":\([^,}}]*\).*/\1/p')
printf '{{"jsonrpc":"2.0","id":%s,"result":{{"protocolVersion":"2025-11-25","capabilities":{{}},"serverInfo":{{"name":"asker","version":"1"}}}}}}\n' "$id"
i=0
while [ $i -lt {ASKED} ]; do i=$((i+1)); echo '{{"jsonrpc":"2.0","id":'$i',"method":"roots/list"}}'; done
touch {done:?}
sleep 120
"#
    );
    let asker = format!(
        "  - name: asker\n    stdio: {{ command: sh, args: [\"-c\", {}] }}\n",
        serde_json::to_string(&script).unwrap()
    );
    let gw = TestGateway::start(
        "runtime: { pinned_connections: false }",
        &[asker, example("ex", &[], "")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({"roots": {}})).await;
    let done_ = done.clone();
    support::eventually("the server to have asked everything", || {
        let done = done_.clone();
        async move { done.exists() }
    })
    .await;
    // Nearly all of it read by now (what is left fits the pipe's buffer).
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks < 1_000,
        "{tasks} tasks alive after {ASKED} requests nobody reads the answers to"
    );
    assert_eq!(
        c.tool_text(1, "ex__echo", json!({"text": "on"})).await,
        "on"
    );
}

/// A list asks every upstream, and counts against the session's bound on requests in flight
/// as a call does: lists that a server never answers cannot pile up without end.
#[tokio::test]
async fn lists_in_flight_count_against_the_session_bound() {
    // Answers `initialize`, then reads and never answers.
    let script = r#"read line
id=$(printf '%s' "$line" | sed -n 's/.*"id":\([^,}]*\).*/\1/p')
printf '{"jsonrpc":"2.0","id":%s,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"mute","version":"1"}}}\n' "$id"
cat >/dev/null
"#;
    let mute = format!(
        "  - name: mute\n    stdio: {{ command: sh, args: [\"-c\", {}] }}\n",
        serde_json::to_string(script).unwrap()
    );
    let gw = TestGateway::start(
        "mcp: { max_connections_per_ip: 1000 }",
        &[mute, example("a", &[], "")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let session = session_of(&gw, &c);
    let bound = gatehouse::mcp::session::MAX_INFLIGHT;
    let lists: Vec<_> = (0..bound)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.call(i as u64, "tools/list", json!({})).await })
        })
        .collect();
    in_flight(&session, bound, "every list in flight").await;
    for (method, params) in [
        ("tools/list", json!({})),
        (
            "tools/call",
            json!({"name":"a__echo","arguments":{"text":"x"}}),
        ),
    ] {
        let one_more = c
            .post(json!({"jsonrpc":"2.0","id":"more","method":method,"params":params}).to_string())
            .await;
        assert_eq!(one_more.status, 429, "{method}: {}", one_more.body);
        assert_eq!(one_more.error_code(), -32012, "{method}: {}", one_more.body);
    }
    for list in lists {
        list.abort();
    }
    in_flight(&session, 0, "the abandoned lists to be forgotten").await;
    assert_eq!(c.tool_text(1, "a__echo", json!({"text":"ok"})).await, "ok");
    gw.stop().await;
}

/// The resident set size of this process (the gateway runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A stdio server that answers a call with one stdout line longer than the 64 MiB bound (and
/// no newline) fails that call with -32010 within seconds rather than buffering without end;
/// doing it again does not grow the gateway's memory by another line's worth, and another
/// upstream keeps answering.
#[tokio::test]
async fn a_stdout_line_over_the_bound_fails_the_call_and_spares_the_rest() {
    // Answers initialize and tools/list like a server; a call gets 70 MB of `a` and no newline.
    let flood = format!(
        "{}    call_timeout: 60s\n",
        sh_server(
            "flood",
            r#"{"tools":{}}"#,
            &[
                (
                    "tools/list",
                    r#"printf '{"jsonrpc":"2.0","id":%s,"result":{"tools":[{"name":"flood","inputSchema":{"type":"object"}}]}}\n' "$id""#,
                ),
                (
                    "tools/call",
                    "head -c 70000000 /dev/zero | tr '\\0' a; sleep 60",
                ),
            ],
        )
    );
    let gw = TestGateway::start("", &[flood, example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let mut rss = Vec::new();
    for round in 0..4u64 {
        let started = std::time::Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            c.call(
                10 + round,
                "tools/call",
                json!({"name":"flood__flood","arguments":{}}),
            ),
        )
        .await
        .expect("the call ends");
        let took = started.elapsed();
        assert_eq!(resp["error"]["code"], -32010, "round {round}: {resp}");
        assert!(
            took < Duration::from_secs(10),
            "round {round}: took {took:?}"
        );
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("'flood' is unavailable")
                    && m.contains("sent a line over 64 MiB")),
            "{resp}"
        );
        rss.push(rss_bytes());
        assert_eq!(
            c.tool_text(20 + round, "ex__echo", json!({"text": "still here"}))
                .await,
            "still here"
        );
    }
    // An over-long line's room is given back: two more add less than the two lines' worth
    // (128 MiB) they would if it were kept. The baseline is after the second: the first's freed
    // 64 MiB block raises glibc's mmap threshold, so the next line's smaller blocks come from,
    // and partly stay in, the heap (30 to 60 MiB in all, measured), however many lines follow.
    assert!(
        rss[3] < rss[1] + (96 << 20),
        "resident set grew from {} to {} bytes",
        rss[1],
        rss[3]
    );
    gw.stop().await;
}

/// A server may ask a session's client only what the client declared it can answer
/// (`capabilities` in its `initialize`): a server that asks anyway (here a stdio server asking
/// for sampling of a client that declared nothing) is refused by the gateway on the client's
/// behalf, and the client is never sent the request.
#[tokio::test]
async fn a_server_cannot_ask_a_client_for_what_it_did_not_declare() {
    let gw = TestGateway::start(
        "",
        &[example("a", &["--test-tools"], "    call_timeout: 5s\n")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({"elicitation":{}})).await;
    let r = tokio::time::timeout(
        Duration::from_secs(4),
        c.post(
            json!({"jsonrpc":"2.0","id":3,"method":"tools/call",
                "params":{"name":"sample","arguments":{"prompt":"undeclared"}}})
            .to_string(),
        ),
    )
    .await
    .expect("the call is refused at once, not left waiting for an answer the client never gives");
    assert_eq!(r.status, 200, "{}", r.body);
    let messages = r.messages();
    assert!(
        messages.iter().all(|m| m.get("method").is_none()),
        "the client was asked: {messages:?}"
    );
    let answer = r.response();
    let said = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        said.contains("sampling failed")
            && said.contains("did not declare the sampling capability"),
        "{answer}"
    );
    // The session and its server carry on.
    assert_eq!(c.tool_text(4, "echo", json!({"text":"on"})).await, "on");
    gw.stop().await;
}

/// A stdio server (Python) that says things unasked: `script` defines `start(arguments)`, which
/// the tool `start` runs (answering "started" at once), with `send(message)`, `raw(text)` (a
/// line as is) and the thread-safe output they share; the tool `answers` tells what the client
/// answered to the server's requests. The gateway in front of it, and a session (elicitation
/// declared) with its GET stream open.
async fn unasked_server_session(script: &str) -> (TestGateway, Client, support::SseReader) {
    const LOOP: &str = r#"
for line in sys.stdin:
    m = json.loads(line)
    if "method" not in m:
        answers.append(m)
        continue
    if "id" not in m:
        continue
    method, params = m["method"], m.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params["protocolVersion"],
                  "capabilities": {"tools": {"listChanged": True}, "prompts": {"listChanged": True}},
                  "serverInfo": {"name": "unasked", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("start", "answers")]}
    elif method == "tools/call" and params["name"] == "start":
        send({"jsonrpc": "2.0", "id": m["id"], "result": {"content": [{"type": "text", "text": "started"}]}})
        start(params.get("arguments") or {})
        continue
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": json.dumps(answers)}]}
    else:
        send({"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": method}})
        continue
    send({"jsonrpc": "2.0", "id": m["id"], "result": result})
"#;
    const PRELUDE: &str = r#"
import json, sys, threading
out = threading.Lock()
answers = []
def raw(text):
    with out:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
def send(m):
    raw(json.dumps(m))
"#;
    let program = format!("{PRELUDE}{script}{LOOP}");
    let args = serde_json::to_string(&["-u", "-c", &program]).unwrap();
    let gw = TestGateway::start(
        "",
        &[format!(
            "  - name: f\n    stdio: {{ command: /usr/bin/python3, args: {args} }}\n"
        )],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({"elicitation":{}})).await;
    let get = c
        .request("GET", Bytes::new())
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let stream = c.http.request(get).await.unwrap();
    assert_eq!(stream.status(), 200);
    (gw, c, support::SseReader::new(stream.into_body()))
}

/// For [`unasked_server_session`]: once started, floods `tools/list_changed` from a thread of
/// its own (no call in flight, so it all goes to the session's GET stream), puts one question
/// to the client (elicitation) in the middle of it, and says `prompts/list_changed` when done.
const ASKING_FLOODER: &str = r#"
def flood(before, after, pad):
    line = json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                       "params": {"_meta": {"pad": "x" * pad}}}) + "\n"
    for n in (before, after):
        for _ in range(n // 16):
            with out:
                sys.stdout.write(line * 16)
                sys.stdout.flush()
        if n is before:
            send({"jsonrpc": "2.0", "id": "ask-1", "method": "elicitation/create",
                  "params": {"mode": "form", "message": "Your name?", "requestedSchema":
                             {"type": "object", "properties": {"name": {"type": "string"}}}}})
    send({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"})
def start(a):
    threading.Thread(target=flood, args=(a["before"], a["after"], a["pad"]), daemon=True).start()
"#;

/// A server flooding `list_changed` costs a session's GET stream one queue entry, not its whole
/// queue: a question a server puts to the client in the middle of the flood still reaches the
/// client (which reads more slowly than the flood comes), and the client's answer reaches the
/// server. Before, the flood kept the stream's 256 entries full, and the question was refused
/// ("the client has no open stream to receive this request").
#[tokio::test]
async fn a_list_changed_flood_leaves_room_for_a_servers_question() {
    let (gw, c, mut stream) = unasked_server_session(ASKING_FLOODER).await;
    // 16 KiB a notice: what the connection's buffers hold is soon read once the question is in.
    // 2,000 before the question: far more than those buffers and the stream's queue hold.
    let flood = json!({"before": 2000, "after": 400, "pad": 16 * 1024});
    assert_eq!(c.tool_text(1, "start", flood).await, "started");
    let mut asked = false;
    while let Some(m) = stream.next_within(Duration::from_secs(10)).await {
        match m["method"].as_str() {
            Some("notifications/tools/list_changed") => {}
            Some("notifications/prompts/list_changed") => break,
            Some("elicitation/create") => {
                assert_eq!(m["params"]["message"], "Your name?", "{m}");
                let answer = json!({"jsonrpc":"2.0","id":m["id"],"result":{
                    "action":"accept","content":{"name":"gatehouse"}}});
                assert_eq!(c.post(answer.to_string()).await.status, 202);
                asked = true;
            }
            _ => panic!("unexpected on the GET stream: {m}"),
        }
        // Slower than the flood, until the question is in.
        if !asked {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let answers: Value = serde_json::from_str(&c.tool_text(2, "answers", json!({})).await).unwrap();
    assert!(
        asked,
        "the client was never asked; the server heard: {answers}"
    );
    assert_eq!(
        answers,
        json!([{"jsonrpc":"2.0","id":"ask-1","result":{"action":"accept","content":{"name":"gatehouse"}}}]),
    );
    gw.stop().await;
}

/// For [`unasked_server_session`]: once started, says from a thread of its own what a hostile
/// server says unasked: a 2 MiB log message, a log message with a `PARAMS` twin, a
/// `resources/updated` naming its URI twice, a 5 MiB question to the client, a question whose
/// method is 2,000 bytes, then a plain update and `last`.
const NOISY: &str = r#"
def noise():
    send({"jsonrpc": "2.0", "method": "notifications/message",
          "params": {"level": "info", "data": "x" * (2 << 20)}})
    raw('{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"shown"},"PARAMS":{"level":"info","data":"hidden"}}')
    raw('{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"mem://f/a","uri":"mem://other/b"}}')
    send({"jsonrpc": "2.0", "id": "big-1", "method": "elicitation/create",
          "params": {"mode": "form", "message": "y" * (5 << 20), "requestedSchema":
                     {"type": "object", "properties": {"name": {"type": "string"}}}}})
    send({"jsonrpc": "2.0", "id": "long-1", "method": "m" * 2000, "params": {}})
    send({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "mem://f/a"}})
    send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "last"}})
def start(a):
    threading.Thread(target=noise, daemon=True).start()
"#;

/// What a server says unasked is bounded and passed on as the gateway read it: a notification
/// over 1 MiB is dropped, a question over 4 MiB (or with a method over 1 KiB) is refused to
/// the server, a frame's look-alike
/// members (`PARAMS`) do not reach the client, and an update whose URI cannot be read (given
/// twice) is dropped. Before, the server's frames went to the client as sent, whatever their
/// size, so a server could make a session's queues hold gigabytes.
#[tokio::test]
async fn what_a_server_says_unasked_is_bounded_and_passed_on_as_read() {
    let (gw, c, mut stream) = unasked_server_session(NOISY).await;
    assert_eq!(c.tool_text(1, "start", json!({})).await, "started");
    let mut heard = Vec::new();
    while let Some(m) = stream.next_within(Duration::from_secs(10)).await {
        let last = m["params"]["data"] == "last";
        heard.push(m);
        if last {
            break;
        }
    }
    let shown: Vec<String> = heard
        .iter()
        .map(|m| {
            let text = m.to_string();
            text[..text.len().min(200)].to_owned()
        })
        .collect();
    assert_eq!(
        heard.len(),
        3,
        "the shown log, the plain update, last: {shown:?}"
    );
    assert_eq!(
        heard[0],
        json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"shown"}})
    );
    assert_eq!(
        heard[1],
        json!({"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"mem://f/a"}})
    );
    let answers: Value = serde_json::from_str(&c.tool_text(2, "answers", json!({})).await).unwrap();
    let said = |n: usize| answers[n]["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(answers[0]["id"], "big-1", "{answers}");
    assert!(said(0).contains("at most 4194304 bytes"), "{answers}");
    // A method the gateway would keep while the client does not answer is bounded like an id.
    assert_eq!(answers[1]["id"], "long-1", "{answers}");
    assert!(said(1).contains("method is over 1024 bytes"), "{answers}");
    gw.stop().await;
}

/// For [`unasked_server_session`]: once started, says from a thread of its own 64 log messages
/// of 900 KB each (under the 1 MiB bound of one) and a small `last`, then writes the file
/// `done` names.
const LARGE_TALKER: &str = r#"
def talk(done):
    for _ in range(64):
        send({"jsonrpc": "2.0", "method": "notifications/message",
              "params": {"level": "info", "data": "x" * 900000}})
    send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "last"}})
    open(done, "w").close()
def start(a):
    threading.Thread(target=talk, args=(a["done"],), daemon=True).start()
"#;

/// What a server says to a client that does not read is bounded in bytes, not only in
/// messages: of 64 messages just under the 1 MiB bound of one (57 MB), those waiting for a
/// GET stream nobody reads hold at most 16 MiB, the rest dropped, while small messages still
/// pass; once the client reads, the session's queues hold nothing.
#[tokio::test]
async fn what_waits_for_a_client_that_does_not_read_is_bounded_in_bytes() {
    let (gw, c, mut stream) = unasked_server_session(LARGE_TALKER).await;
    let session = session_of(&gw, &c);
    let done = std::env::temp_dir().join(format!("gatehouse-talked-{}", std::process::id()));
    let _ = std::fs::remove_file(&done);
    let args = json!({"done": done.to_str().unwrap()});
    assert_eq!(c.tool_text(1, "start", args).await, "started");
    support::eventually("the server to have said it all", || {
        let done = done.clone();
        async move { done.exists() }
    })
    .await;
    // A call's answer comes after everything the server said before it (and, the server done
    // talking, takes none of it on its own stream).
    let _ = c.tool_text(2, "answers", json!({})).await;
    let held = session.queued_bytes();
    assert!(
        (8 << 20..=16 << 20).contains(&held),
        "{held} bytes wait for the client"
    );
    // What the connection took before its reader stopped (socket buffers) was not held.
    let mut large = 0;
    while let Some(m) = stream.next_within(Duration::from_secs(10)).await {
        if m["params"]["data"] == "last" {
            break;
        }
        large += 1;
    }
    assert!(
        (9..48).contains(&large),
        "{large} of 64 large messages kept"
    );
    support::eventually("the queues to be empty once read", || {
        let session = session.clone();
        async move { session.queued_bytes() == 0 }
    })
    .await;
    let _ = std::fs::remove_file(&done);
    gw.stop().await;
}

/// Off loopback, `/metrics` (every server and plugin by name, the pins' state) is served only
/// to admin tokens granting `metrics:read`, or to anyone where the operator made it public;
/// a client's token is no admin token.
#[tokio::test]
async fn off_loopback_the_metrics_are_for_admin_tokens_granting_them() {
    let start = |admin: &str| {
        let yaml = format!(
            "listen: 0.0.0.0:0\nauth: {{tokens: [{{principal: app, token: client-token-0123456789}}]}}\n{admin}\nupstreams:\n{}",
            example("a", &[], "")
        );
        async move {
            let config = gatehouse::Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}"));
            gatehouse::start(config).await.expect("gateway starts")
        }
    };
    let local = |gw: &gatehouse::Running| {
        std::net::SocketAddr::from(([127, 0, 0, 1], gw.listening.local_addr.port()))
    };
    let gw = start(
        "admin: {tokens: [{principal: ops, token: ops-token-0123456789}, {principal: prom, token: prom-token-0123456789, scopes: [metrics:read]}, {principal: auditor, token: audit-token-0123456789, scopes: [audit]}]}",
    )
    .await;
    let addr = local(&gw);
    for (token, status) in [
        (None, 401),
        (Some("client-token-0123456789"), 401),
        (Some("audit-token-0123456789"), 403),
        (Some("prom-token-0123456789"), 200),
        (Some("ops-token-0123456789"), 200),
    ] {
        let r = support::admin_request(addr, token, "GET", "/metrics", None).await;
        assert_eq!(r.status, status, "{token:?}: {}", r.body);
        assert_eq!(
            r.body.contains("gatehouse_sessions_active"),
            status == 200,
            "{token:?}: {}",
            r.body
        );
    }
    gw.shutdown().await;
    // No admin tokens: not served off loopback, unless the operator made the metrics public.
    let gw = start("").await;
    let r = support::admin_request(local(&gw), None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("admin.public_metrics"), "{}", r.body);
    gw.shutdown().await;
    let gw = start("admin: {public_metrics: true}").await;
    let r = support::admin_request(local(&gw), None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("gatehouse_sessions_active"), "{}", r.body);
    gw.shutdown().await;
}

/// A request for one of the `big` server's 8 MB answers: its JSON body and its headers
/// (after the content type), for a session's client or (`None`) a 2026-07-28 one (`loud`:
/// one that asks for log lines, so that its answer streams after the server's).
fn big_request(
    id: u64,
    tool: &str,
    session: Option<&str>,
    loud: bool,
) -> (String, Vec<(String, String)>) {
    let mut params = json!({"name": format!("big__{tool}"), "arguments": {}});
    let mut headers = vec![(
        "accept".into(),
        "application/json, text/event-stream".into(),
    )];
    match session {
        Some(s) => {
            headers.push(("mcp-protocol-version".into(), "2025-11-25".into()));
            headers.push(("mcp-session-id".into(), s.into()));
        }
        None => {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
            });
            if loud {
                params["_meta"]["io.modelcontextprotocol/logLevel"] = json!("debug");
            }
            headers.push(("mcp-protocol-version".into(), "2026-07-28".into()));
            headers.push(("mcp-method".into(), "tools/call".into()));
            headers.push(("mcp-name".into(), format!("big__{tool}")));
        }
    }
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params});
    (body.to_string(), headers)
}

/// Answers their clients do not take stay with the gateway (hyper holds an answer until its
/// last byte is written): together they hold at most `mcp.max_answers_bytes`. Past it an
/// answer is dropped for a short error that names the bound and says the request ran; small
/// answers still go, and the room comes back when the clients holding it leave. For session
/// and 2026-07-28 clients alike, for an answer that came after a server message (`chatty`
/// logs first) as for one that came alone, and for answers streamed (SSE) as for plain ones:
/// past the room a stream ends before its event.
#[tokio::test]
async fn answers_their_clients_do_not_take_hold_at_most_their_room() {
    use tokio::io::AsyncWriteExt as _;
    const ANSWER: usize = 8_000_000;
    let answer = format!(
        r#"printf '{{"jsonrpc":"2.0","id":%s,"result":{{"content":[{{"type":"text","text":"' "$id"; head -c {ANSWER} /dev/zero | tr '\0' a; printf '"}}]}}}}\n'"#
    );
    let big = sh_server(
        "big",
        r#"{"tools":{},"logging":{}}"#,
        &[
            (
                "tools/list",
                r#"printf '{"jsonrpc":"2.0","id":%s,"result":{"tools":[{"name":"big","inputSchema":{"type":"object"}},{"name":"chatty","inputSchema":{"type":"object"}}]}}\n' "$id""#,
            ),
            (
                "tools/call",
                &format!(
                    r#"case "$line" in *chatty*) printf '{{"jsonrpc":"2.0","method":"notifications/message","params":{{"level":"info","data":"first"}}}}\n';; esac; {answer}"#
                ),
            ),
        ],
    );
    for (era, stuck_tool, sessions, loud) in [
        ("sessions", "big", true, false),
        ("sessions, streamed", "chatty", true, false),
        ("2026-07-28", "chatty", false, false),
        ("2026-07-28, streamed", "chatty", false, true),
    ] {
        // Room for two such answers, not three.
        let gw = TestGateway::start(
            "mcp:\n  max_answers_bytes: 20000000\n",
            &[big.clone(), example("ex", &[], "")],
        )
        .await;
        let mut c = gw.client();
        c.initialize(json!({})).await;
        let session = c.session.clone().filter(|_| sessions);
        // A 2026-07-28 client has no session id to send.
        let stateless = gw.client();
        let post = |(body, headers): (String, Vec<(String, String)>)| {
            let c = if sessions { &c } else { &stateless };
            let mut req = c
                .request("POST", Bytes::new())
                .header("content-type", "application/json");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            c.send(req.body(Full::new(Bytes::from(body))).unwrap())
        };
        let room = gw.gateway().answers.clone();
        // Two clients that ask and never read, through sockets that take almost nothing.
        let mut stuck = Vec::new();
        for id in [100, 101] {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut conn = socket.connect(gw.addr).await.unwrap();
            let (body, headers) = big_request(id, stuck_tool, session.as_deref(), loud);
            let mut head = format!(
                "POST /mcp HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n",
                gw.addr,
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            conn.write_all(format!("{head}\r\n{body}").as_bytes())
                .await
                .unwrap();
            stuck.push(conn);
        }
        support::eventually("both unread answers counted", || {
            let held = room.held();
            async move { held >= 2 * ANSWER }
        })
        .await;
        // A third finds no room.
        let refused = post(big_request(7, "big", session.as_deref(), false))
            .await
            .json();
        assert_eq!(refused["error"]["code"], -32012, "{era}: {refused}");
        assert_eq!(refused["id"], 7, "{era}: {refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("mcp.max_answers_bytes") && message.contains("the request ran"),
            "{era}: {message}"
        );
        // Small answers are not counted: they still go.
        assert_eq!(
            c.tool_text(8, "ex__echo", json!({"text": "small"})).await,
            "small"
        );
        // The clients that held the room leave: it comes back.
        drop(stuck);
        support::eventually("the room given back", || {
            let held = room.held();
            async move { held == 0 }
        })
        .await;
        let answer = post(big_request(9, "big", session.as_deref(), false))
            .await
            .json();
        let text = answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(text.len(), ANSWER, "{era}");
        assert_eq!(room.held(), 0, "{era}: an answer taken is given back");
        gw.stop().await;
    }
}
