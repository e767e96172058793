//! Aggregation through the gateway: merged and paginated lists, routing by name and URI,
//! server→client requests, progress, cancellation, deadlines and upstream faults.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Client, TestGateway, eventually, example, sh_server};

async fn two() -> (TestGateway, Client) {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &[], ""),
            example("b", &["--page-size", "2"], ""),
        ],
    )
    .await;
    let mut c = gw.client();
    let caps = c.initialize(json!({"sampling":{}})).await;
    assert_eq!(caps["serverInfo"]["name"], "gatehouse");
    assert!(caps["capabilities"]["tools"].is_object());
    (gw, c)
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn tools_from_every_upstream_are_merged_prefixed_and_paginated() {
    let (_gw, c) = two().await;
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let params = match &cursor {
            Some(cur) => json!({"cursor": cur}),
            None => json!({}),
        };
        let page = c.call(pages + 1, "tools/list", params).await;
        all.extend(names(&page, "tools"));
        pages += 1;
        cursor = page["result"]["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
        assert!(pages < 10, "pagination does not end");
    }
    // b pages 2 at a time over 5 tools: 3 pages; a answers everything on the first.
    assert_eq!(pages, 3);
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        all.len(),
        "no duplicates across pages: {all:?}"
    );
    for server in ["a", "b"] {
        for tool in ["echo", "add", "slow", "whoami", "sample"] {
            assert!(
                all.contains(&format!("{server}__{tool}")),
                "{server}__{tool} missing from {all:?}"
            );
        }
    }
    let bad = c
        .call(9, "tools/list", json!({"cursor":"!!not-a-cursor"}))
        .await;
    assert_eq!(bad["error"]["code"], -32602);
}

#[tokio::test]
async fn calls_route_by_prefix_with_arguments_untouched() {
    let (_gw, c) = two().await;
    assert_eq!(c.tool_text(1, "a__whoami", json!({})).await, "a");
    assert_eq!(c.tool_text(2, "b__whoami", json!({})).await, "b");
    let tricky = "quotes \" backslash \\ unicode é 🦀 newline \n end";
    assert_eq!(
        c.tool_text(3, "b__echo", json!({"text": tricky})).await,
        tricky
    );
    let r = c
        .call(
            4,
            "tools/call",
            json!({"name":"a__add","arguments":{"a":2,"b":40}}),
        )
        .await;
    assert_eq!(r["result"]["structuredContent"]["sum"], 42.0);
}

#[tokio::test]
async fn prompts_and_resources_route_to_their_owner() {
    let (_gw, c) = two().await;
    let prompts = c.call(1, "prompts/list", json!({})).await;
    let mut p = names(&prompts, "prompts");
    p.sort();
    assert_eq!(p, ["a__greeting", "b__greeting"]);
    let got = c
        .call(
            2,
            "prompts/get",
            json!({"name":"b__greeting","arguments":{"name":"Ada"}}),
        )
        .await;
    assert_eq!(
        got["result"]["messages"][0]["content"]["text"],
        "Say hello to Ada."
    );

    // A resource read before any list: the gateway learns the owner by listing.
    let read = c
        .call(3, "resources/read", json!({"uri":"example://b/readme"}))
        .await;
    assert_eq!(read["result"]["contents"][0]["uri"], "example://b/readme");
    let listed = c.call(4, "resources/list", json!({})).await;
    let uris: Vec<&str> = listed["result"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    assert!(
        uris.contains(&"example://a/readme") && uris.contains(&"example://b/readme"),
        "{uris:?}"
    );
    // Template resources route by their literal prefix.
    let t = c
        .call(5, "resources/read", json!({"uri":"example://a/echo/hello"}))
        .await;
    assert_eq!(t["result"]["contents"][0]["text"], "hello");
    let missing = c
        .call(6, "resources/read", json!({"uri":"nobody://x"}))
        .await;
    assert_eq!(missing["error"]["code"], -32602);
}

/// Resource URIs carry no server prefix, so a server can list another's URIs (and templates).
/// Neither claim wins: reads of a URI two servers claim are refused, naming both, in either
/// order of listing; other servers' resources keep working.
#[tokio::test]
async fn a_resource_uri_two_servers_claim_is_read_from_neither() {
    // `evil` is configured under its own name but lists server `a`'s URIs and template.
    let evil = example("evil", &[], "").replace(r#""evil"]"#, r#""a"]"#);
    assert!(evil.contains(r#""--name","a""#), "{evil}");
    let gw = TestGateway::start("", &[example("a", &[], ""), example("b", &[], ""), evil]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for (id, uri) in [(1, "example://a/readme"), (2, "example://a/echo/hi")] {
        let read = c.call(id, "resources/read", json!({"uri": uri})).await;
        assert_eq!(read["error"]["code"], -32602, "{uri}: {read}");
        let message = read["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("several servers (a, evil)"),
            "{uri}: {message}"
        );
    }
    // Listing again changes nothing: the last server to list a URI does not take it over.
    c.call(3, "resources/list", json!({})).await;
    c.call(4, "resources/templates/list", json!({})).await;
    let read = c
        .call(5, "resources/read", json!({"uri":"example://a/readme"}))
        .await;
    assert_eq!(read["error"]["code"], -32602, "{read}");
    let other = c
        .call(6, "resources/read", json!({"uri":"example://b/readme"}))
        .await;
    assert_eq!(other["result"]["contents"][0]["uri"], "example://b/readme");
    let done = c
        .call(
            7,
            "completion/complete",
            json!({"ref":{"type":"ref/resource","uri":"example://a/echo/{text}"},
                   "argument":{"name":"text","value":"x"}}),
        )
        .await;
    assert_eq!(done["error"]["code"], -32602, "{done}");
}

/// An operator who knows two servers serve the same resources (one server reached two ways)
/// says so: a URI both claim is read from the one configured first.
#[tokio::test]
async fn with_first_a_uri_two_servers_claim_is_read_from_the_first() {
    let twin = example("twin", &[], "").replace(r#""twin"]"#, r#""a"]"#);
    let gw = TestGateway::start(
        "mcp: { resource_conflicts: first }",
        &[example("a", &[], ""), twin],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for (id, uri) in [(1, "example://a/readme"), (2, "example://a/echo/hi")] {
        let read = c.call(id, "resources/read", json!({ "uri": uri })).await;
        assert_eq!(read["result"]["contents"][0]["uri"], uri, "{read}");
    }
}

/// The gateway routes, checks and audits one URI or prompt name; a second key a lenient server
/// (Go's `encoding/json`) reads as that one, or the key given twice, is refused, not forwarded.
#[tokio::test]
async fn a_resource_or_completion_ref_with_a_lookalike_key_is_refused() {
    let (_gw, c) = two().await;
    for (id, method, params, said) in [
        (
            1,
            "resources/read",
            r#"{"uri":"example://b/readme","URI":"example://a/readme"}"#,
            "too like uri",
        ),
        (
            2,
            "resources/subscribe",
            r#"{"uri":"example://b/readme","uri":"example://a/readme"}"#,
            "params.uri is given twice",
        ),
        (
            3,
            "completion/complete",
            r#"{"ref":{"type":"ref/prompt","name":"b__greeting","Name":"a__greeting"},"argument":{"name":"name","value":"A"}}"#,
            "too like name",
        ),
        (
            4,
            "completion/complete",
            r#"{"ref":{"type":"ref/prompt","name":"b__greeting"},"REF":{},"argument":{"name":"name","value":"A"}}"#,
            "too like ref",
        ),
    ] {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#);
        let r: serde_json::Value = serde_json::from_str(&c.post(body).await.body).unwrap();
        assert_eq!(r["error"]["code"], -32602, "{method} {params}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(said), "{message}");
    }
    // The same reads without the decoys pass.
    let read = c
        .call(5, "resources/read", json!({"uri":"example://b/readme"}))
        .await;
    assert_eq!(read["result"]["contents"][0]["uri"], "example://b/readme");
}

#[tokio::test]
async fn progress_streams_back_as_sse_with_the_clients_token() {
    let (_gw, c) = two().await;
    let r = c
        .post(json!({"jsonrpc":"2.0","id":"call-1","method":"tools/call","params":{
            "name":"b__slow","arguments":{"seconds":0.3,"steps":3},"_meta":{"progressToken":"tok-7"}}})
        .to_string())
        .await;
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let msgs = r.messages();
    let progress: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{msgs:?}");
    assert!(
        progress
            .iter()
            .all(|p| p["params"]["progressToken"] == "tok-7")
    );
    let last = msgs.last().unwrap();
    assert_eq!(last["id"], "call-1", "the original id comes back");
    assert_eq!(last["result"]["content"][0]["text"], "done after 0.3s");
}

#[tokio::test]
async fn sampling_requests_reach_the_client_and_answers_reach_the_upstream() {
    let (_gw, c) = two().await;
    let mut s = c.stream(json!({"jsonrpc":"2.0","id":41,"method":"tools/call","params":{"name":"a__sample","arguments":{"prompt":"2+2?"}}})).await;
    let req = s.next().await.expect("sampling request");
    assert_eq!(req["method"], "sampling/createMessage");
    assert_eq!(req["params"]["messages"][0]["content"]["text"], "2+2?");
    let gateway_id = req["id"].clone();
    let ack = c
        .post(json!({"jsonrpc":"2.0","id":gateway_id,"result":{"role":"assistant","model":"m","content":{"type":"text","text":"four"}}}).to_string())
        .await;
    assert_eq!(ack.status, 202);
    let done = s.next().await.expect("final response");
    assert_eq!(done["id"], 41);
    assert_eq!(done["result"]["content"][0]["text"], "model said: four");
}

/// A server has a share of the requests that may wait for one client's answers: one that asks
/// without end (or whose questions the client leaves unanswered) is refused past its share,
/// and another server's questions still reach the client.
#[tokio::test]
async fn one_server_cannot_take_every_slot_for_the_clients_answers() {
    let (_gw, c) = two().await;
    let sample = |id: u64, tool: &str| {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
               "params":{"name":tool,"arguments":{"prompt":format!("q{id}")}}})
    };
    let mut waiting = Vec::new();
    for id in 0..16 {
        let mut s = c.stream(sample(id, "a__sample")).await;
        let req = s.next().await.expect("sampling request");
        assert_eq!(req["method"], "sampling/createMessage");
        waiting.push(s);
    }
    // The seventeenth question of server a is refused, and its call says so.
    let done = c
        .call(16, "tools/call", sample(16, "a__sample")["params"].clone())
        .await;
    assert_eq!(done["id"], 16, "{done}");
    let message = done["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
        + done["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
    assert!(message.contains("too many requests are waiting"), "{done}");
    // Server b still asks, and its answer gets through.
    let mut s = c.stream(sample(17, "b__sample")).await;
    let req = s.next().await.expect("b's sampling request");
    assert_eq!(req["params"]["messages"][0]["content"]["text"], "q17");
    let ack = c
        .post(
            json!({"jsonrpc":"2.0","id":req["id"],"result":{"role":"assistant","model":"m",
                     "content":{"type":"text","text":"yes"}}})
            .to_string(),
        )
        .await;
    assert_eq!(ack.status, 202);
    let done = s.next().await.expect("b's answer");
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: yes",
        "{done}"
    );
    drop(waiting);
}

#[tokio::test]
async fn concurrent_calls_with_colliding_ids_do_not_mix() {
    let (_gw, c) = two().await;
    // Two sessions reuse the same JSON-RPC ids at the same time on the same upstreams.
    let mut c2 = c.clone();
    c2.initialize(json!({})).await;
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let client = if i % 2 == 0 { c.clone() } else { c2.clone() };
        tasks.push(tokio::spawn(async move {
            let text = format!("message-{i}");
            let server = if i % 3 == 0 { "a" } else { "b" };
            let got = client
                .tool_text(i / 2, &format!("{server}__echo"), json!({"text": text}))
                .await;
            assert_eq!(got, text);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn cancellation_ends_the_call_and_the_session_keeps_working() {
    let (_gw, c) = two().await;
    let c2 = c.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move {
        c2.post(json!({"jsonrpc":"2.0","id":77,"method":"tools/call","params":{"name":"a__slow","arguments":{"seconds":20}}}).to_string())
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = c
        .post(json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":77,"reason":"user"}}).to_string())
        .await;
    assert_eq!(n.status, 202);
    let r = call.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel did not end the call"
    );
    assert_eq!(r.response()["error"]["code"], -32800);
    assert_eq!(
        c.tool_text(78, "a__echo", json!({"text":"after"})).await,
        "after"
    );
}

/// A list sent under the id of a call in flight (ids are the client's to choose) counts
/// against the session's bound but does not take the call's place: cancelling that id still
/// ends the call.
#[tokio::test]
async fn a_list_under_a_calls_id_leaves_it_cancellable() {
    let (gw, c) = two().await;
    let session = gw
        .gateway()
        .sessions
        .get(c.session.as_deref().unwrap())
        .unwrap()
        .clone();
    let c2 = c.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move {
        c2.post(json!({"jsonrpc":"2.0","id":77,"method":"tools/call","params":{"name":"a__slow","arguments":{"seconds":20}}}).to_string())
            .await
    });
    eventually("the call in flight", || {
        let n = session.inflight();
        async move { n == 1 }
    })
    .await;
    let list = c.call(77, "tools/list", json!({})).await;
    assert!(list["result"]["tools"].is_array(), "{list}");
    let n = c
        .post(json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":77,"reason":"user"}}).to_string())
        .await;
    assert_eq!(n.status, 202);
    let r = call.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel did not end the call"
    );
    assert_eq!(r.response()["error"]["code"], -32800);
}

#[tokio::test]
async fn a_slow_upstream_hits_its_deadline_and_others_are_unaffected() {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &[], "    call_timeout: 500ms\n"),
            example("b", &[], ""),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let started = Instant::now();
    let r = c
        .call(
            1,
            "tools/call",
            json!({"name":"a__slow","arguments":{"seconds":10}}),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(r["error"]["code"], -32011);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("'a'"),
        "{r}"
    );
    assert_eq!(
        c.tool_text(2, "b__echo", json!({"text":"fine"})).await,
        "fine"
    );
    assert_eq!(
        c.tool_text(3, "a__echo", json!({"text":"a is fine too"}))
            .await,
        "a is fine too"
    );
}

#[tokio::test]
async fn an_upstream_that_crashes_mid_call_fails_that_call_and_is_restarted() {
    let gw = TestGateway::start(
        "",
        &[example("a", &["--test-tools"], ""), example("b", &[], "")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let r = c
        .call(1, "tools/call", json!({"name":"a__crash","arguments":{}}))
        .await;
    assert_eq!(r["error"]["code"], -32010);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("'a'"),
        "{r}"
    );
    assert_eq!(
        c.tool_text(2, "b__echo", json!({"text":"b unaffected"}))
            .await,
        "b unaffected"
    );
    assert_eq!(
        c.tool_text(3, "a__whoami", json!({})).await,
        "a",
        "a is respawned on the next call"
    );
}

#[tokio::test]
async fn a_dead_upstream_leaves_lists_to_the_healthy_ones() {
    let dead =
        "  - name: dead\n    http: { url: \"http://127.0.0.1:9/mcp\" }\n    connect_timeout: 2s\n";
    let gw = TestGateway::start("", &[example("a", &[], ""), dead.to_owned()]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let tools = names(&c.call(1, "tools/list", json!({})).await, "tools");
    assert!(tools.contains(&"a__echo".to_owned()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.starts_with("dead__")));
    let r = c
        .call(
            2,
            "tools/call",
            json!({"name":"dead__anything","arguments":{}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32010);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("'dead'"),
        "{r}"
    );
    let metrics = gw.gateway().metrics.render();
    assert!(
        metrics.contains("gatehouse_upstream_up{server=\"dead\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("gatehouse_upstream_up{server=\"a\"} 1"));
}

#[tokio::test]
async fn delete_ends_the_session() {
    let (gw, c) = two().await;
    assert_eq!(c.tool_text(1, "a__echo", json!({"text":"x"})).await, "x");
    let r = c
        .send(
            c.request("DELETE", Bytes::new())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.gateway().sessions.len(), 0);
    let r = c
        .post(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn idle_sessions_expire() {
    let gw = TestGateway::start(
        "mcp: { session_idle_timeout: 300ms }",
        &[example("a", &[], "")],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let gateway = gw.gateway().clone();
    eventually("the idle session to expire", || {
        let g = gateway.clone();
        async move { g.sessions.is_empty() }
    })
    .await;
    let r = c
        .post(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn get_opens_one_listen_stream_per_session() {
    let (_gw, c) = two().await;
    let get = || {
        c.request("GET", Bytes::new())
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = c.http.request(get()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let second = c.send(get()).await;
    assert_eq!(second.status, 409);
    drop(first);
    let bad = c
        .send(
            c.request("GET", Bytes::new())
                .header("accept", "application/json")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(bad.status, 406);
}

/// `server/discover` is a 2026-07-28 request: without its `_meta` it is invalid params (400),
/// and it never opens a session.
#[tokio::test]
async fn server_discover_without_meta_is_invalid_params() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let r = c
        .post(json!({"jsonrpc":"2.0","id":1,"method":"server/discover","params":{}}).to_string())
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32602);
    assert_eq!(r.json()["id"], 1);
    assert!(gw.gateway().sessions.is_empty());
}

/// A list whose changes the upstream promises to announce (`listChanged`) is served from the
/// gateway's cache until the upstream announces a change; then it is fetched again.
/// A first page is kept per session and server: one over the cache's limit is fetched anew
/// each time, so that many sessions of a server with a huge list do not each hold a copy.
#[tokio::test]
async fn a_huge_first_page_is_not_kept() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = |description: usize| {
        let lists = Arc::new(AtomicUsize::new(0));
        let counted = lists.clone();
        let url = support::serve(move |_, body| {
            let msg: Value = serde_json::from_slice(&body).unwrap();
            msg.get("id")?;
            let result = match msg["method"].as_str().unwrap() {
                "initialize" => json!({"protocolVersion":"2025-11-25",
                    "capabilities":{"tools":{"listChanged":true}},
                    "serverInfo":{"name":"lists","version":"1"}}),
                "tools/list" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    json!({"tools":[{"name":"t","description":"d".repeat(description),
                                     "inputSchema":{"type":"object"}}]})
                }
                _ => json!({}),
            };
            Some((200, json!({"jsonrpc":"2.0","id":msg["id"],"result":result})))
        });
        (url, lists)
    };
    let (small_url, small) = server(10);
    let (huge_url, huge) = server(gatehouse::upstream::MAX_CACHED_LIST_PAGE);
    let upstream = |name: &str, url: &str| {
        format!("  - name: {name}\n    protocol: sessions\n    http: {{ url: {url:?} }}\n")
    };
    let gw = TestGateway::start(
        "",
        &[
            upstream("small", &small_url.await),
            upstream("huge", &huge_url.await),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for id in 1..=3 {
        let listed = c.call(id, "tools/list", json!({})).await;
        assert_eq!(names(&listed, "tools"), ["small__t", "huge__t"]);
    }
    assert_eq!(small.load(Ordering::SeqCst), 1, "the small page is kept");
    assert_eq!(
        huge.load(Ordering::SeqCst),
        3,
        "the huge page is fetched each time"
    );
}

#[tokio::test]
async fn announced_lists_are_cached_until_the_upstream_says_they_changed() {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &["--test-tools"], ""),
            example("b", &["--page-size", "2"], ""),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let list = |id| {
        let c = &c;
        async move { names(&c.call(id, "tools/list", json!({})).await, "tools") }
    };
    assert!(!list(1).await.contains(&"a__extra".to_owned()));
    // The upstream changes its list without saying so: the cached page is still served.
    let r = c
        .call(
            2,
            "tools/call",
            json!({"name": "a__toggle", "arguments": {"on": true}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "on", "{r}");
    assert!(!list(3).await.contains(&"a__extra".to_owned()));
    // Now it announces the change: the next list asks it again.
    let r = c
        .call(
            4,
            "tools/call",
            json!({"name": "a__toggle", "arguments": {"on": true, "notify": true}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "on", "{r}");
    let after = list(5).await;
    assert!(after.contains(&"a__extra".to_owned()), "{after:?}");
    // Pages after the first always go upstream, and b's pages still merge in.
    assert!(after.iter().any(|n| n.starts_with("b__")), "{after:?}");
}

/// An upstream's `nextCursor` rides inside the gateway's own cursor, so one over 4096 bytes
/// (MAX_UPSTREAM_CURSOR) drops that server's page as malformed, unechoed, while the other
/// servers' entries are still listed; one of exactly 4096 bytes is carried and handed back.
#[tokio::test]
async fn an_upstream_cursor_over_4096_bytes_drops_its_page_and_others_list_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let cursor_len = Arc::new(AtomicUsize::new(4097));
    let returned: Arc<Mutex<Vec<String>>> = Arc::default();
    let (len, seen) = (cursor_len.clone(), returned.clone());
    let url = support::serve(move |_, body| {
        let msg: Value = serde_json::from_slice(&body).unwrap();
        msg.get("id")?;
        let result = match msg["method"].as_str().unwrap() {
            "initialize" => json!({"protocolVersion":"2025-11-25","capabilities":{"tools":{}},
                "serverInfo":{"name":"big","version":"1"}}),
            "tools/list" => match msg["params"]["cursor"].as_str() {
                Some(c) => {
                    seen.lock().unwrap().push(c.to_owned());
                    json!({"tools":[{"name":"t2","inputSchema":{"type":"object"}}]})
                }
                None => {
                    let n = len.load(Ordering::SeqCst);
                    json!({"tools":[{"name":"t","inputSchema":{"type":"object"}}],
                        "nextCursor": format!("SECRET{}", "c".repeat(n - 6))})
                }
            },
            "tools/call" => json!({"content":[{"type":"text","text":"called"}]}),
            _ => json!({}),
        };
        Some((200, json!({"jsonrpc":"2.0","id":msg["id"],"result":result})))
    })
    .await;
    let big = format!("  - name: big\n    protocol: sessions\n    http: {{ url: {url:?} }}\n");
    let gw = TestGateway::start("", &[big.clone(), example("a", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let r = c
        .post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("SECRET"), "{}", r.body);
    let listed = r.response();
    let tools = names(&listed, "tools");
    assert!(tools.contains(&"a__echo".to_owned()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.starts_with("big__")), "{tools:?}");
    assert!(listed["result"].get("nextCursor").is_none(), "{listed}");
    // The server still serves calls, and a cursor of exactly the limit is carried.
    assert_eq!(c.tool_text(2, "big__t", json!({})).await, "called");
    cursor_len.store(4096, Ordering::SeqCst);
    let listed = c.call(3, "tools/list", json!({})).await;
    assert!(
        names(&listed, "tools").contains(&"big__t".to_owned()),
        "{listed}"
    );
    let next = listed["result"]["nextCursor"]
        .as_str()
        .expect("a next page");
    let page = c.call(4, "tools/list", json!({ "cursor": next })).await;
    assert_eq!(names(&page, "tools"), ["big__t2"], "{page}");
    let handed_back = returned.lock().unwrap().clone();
    assert_eq!(handed_back.len(), 1);
    assert_eq!(handed_back[0].len(), 4096);
    assert!(handed_back[0].starts_with("SECRET"));

    // The only server, listed through the gateway's table (its names prefixed): no upstream
    // answered, and the gateway says why in its own words.
    cursor_len.store(4097, Ordering::SeqCst);
    let alone = TestGateway::start("mcp: { prefix_names: always }", &[big]).await;
    let mut c = alone.client();
    c.initialize(json!({})).await;
    let r = c
        .post(json!({"jsonrpc":"2.0","id":5,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.response();
    assert_eq!(answer["error"]["code"], -32010, "{answer}");
    assert_eq!(
        answer["error"]["message"], "no upstream answered tools/list: big: malformed result",
        "{answer}"
    );
    assert!(!r.body.contains("SECRET"), "{}", r.body);
    assert_eq!(c.tool_text(6, "big__t", json!({})).await, "called");
    alone.stop().await;
    gw.stop().await;
}

/// The `notifications/resources/updated` URIs in a response's messages.
fn updated(r: &support::Resp) -> Vec<String> {
    r.messages()
        .iter()
        .filter(|m| m["method"] == "notifications/resources/updated")
        .map(|m| m["params"]["uri"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A server may announce updates of its own resources only: once the gateway knows that a URI
/// is another server's (it routes reads of it there), a server's `resources/updated` for it is
/// dropped (the client would re-read the other server's resource on a stranger's word), while
/// updates of its own resources, and the owner's of that URI, reach the client.
#[tokio::test]
async fn a_server_cannot_announce_updates_of_another_servers_resource() {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &["--test-tools"], ""),
            example("b", &["--test-tools"], ""),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let read = c
        .call(1, "resources/read", json!({"uri":"example://b/readme"}))
        .await;
    assert_eq!(read["result"]["contents"][0]["uri"], "example://b/readme");
    let touch = |id: u64, tool: &str, uri: &str| {
        let c = c.clone();
        let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
            "params":{"name":tool,"arguments":{"uri":uri}}})
        .to_string();
        async move {
            let r = c.post(body).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(
                r.response()["result"]["content"][0]["text"],
                "touched",
                "{}",
                r.body
            );
            updated(&r)
        }
    };
    assert_eq!(
        touch(2, "a__touch", "example://b/readme").await,
        Vec::<String>::new(),
        "a server announced another's resource"
    );
    assert_eq!(
        touch(3, "a__touch", "example://a/readme").await,
        ["example://a/readme"]
    );
    assert_eq!(
        touch(4, "b__touch", "example://b/readme").await,
        ["example://b/readme"]
    );
    // A URI nobody is known to own is the announcing server's business.
    assert_eq!(touch(5, "a__touch", "other://x").await, ["other://x"]);
    gw.stop().await;
}

/// A server whose resource list never reaches its last page (here: every page points to a next
/// one) cannot tell the router it claims no other server's URI, so the first read walks it.
/// But the session's reads of another server's resources do not wait for another walk of it at
/// every turn until a while has passed; then they walk it again. Another session hears it
/// for itself (what one caller could not hear, another may).
#[tokio::test]
async fn a_server_listing_without_end_does_not_hold_up_every_read() {
    let dir = std::env::temp_dir().join(format!("gatehouse-endless-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let asked = dir.join("asked");
    let _ = std::fs::remove_file(&asked);
    let list = format!(
        r#"printf 'L' >> {asked:?}; printf '{{"jsonrpc":"2.0","id":%s,"result":{{"resources":[],"nextCursor":"more"}}}}\n' "$id""#
    );
    let endless = sh_server(
        "endless",
        r#"{"resources":{}}"#,
        &[
            ("resources/list", &list),
            (
                "resources/templates/list",
                r#"printf '{"jsonrpc":"2.0","id":%s,"result":{"resourceTemplates":[]}}\n' "$id""#,
            ),
        ],
    );
    let gw = TestGateway::start("", &[example("a", &[], ""), endless]).await;
    let lists = || std::fs::read(&asked).map_or(0, |b| b.len());
    let read = |c: Client, id: u64| async move {
        let r = c
            .call(id, "resources/read", json!({"uri":"example://a/readme"}))
            .await;
        assert_eq!(
            r["result"]["contents"][0]["uri"], "example://a/readme",
            "{r}"
        );
    };
    let (mut c, mut other) = (gw.client(), gw.client());
    c.initialize(json!({})).await;
    other.initialize(json!({})).await;
    read(c.clone(), 1).await;
    let walked = lists();
    assert!(walked > 1, "the first read walked its pages ({walked})");
    // Past the session's own one walk a second: no walk.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    read(c.clone(), 2).await;
    assert_eq!(lists(), walked, "a read walked the endless list again");
    read(other, 1).await;
    let other_walked = lists();
    assert!(other_walked > walked, "the other session walked it itself");
    // The excuse runs out (two seconds after the first walk): the next read walks again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    read(c, 3).await;
    assert!(lists() > other_walked, "no walk after the excuse ran out");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
