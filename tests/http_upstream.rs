//! Streamable HTTP upstreams: a gateway in front of another gateway exercises the pooled client,
//! SSE responses, upstream session ids, DELETE propagation and transparent re-initialization.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use support::{TestGateway, eventually, example};

/// An outer gateway whose upstream `inner` is another gateway, spoken to with `protocol`.
async fn chain_with(protocol: &str) -> (TestGateway, TestGateway) {
    let inner = TestGateway::start("", &[example("ex", &[], "")]).await;
    let http = format!(
        "  - name: inner\n    protocol: {protocol}\n    http: {{ url: {:?} }}\n",
        inner.url()
    );
    let outer = TestGateway::start("", &[http, example("local", &[], "")]).await;
    (inner, outer)
}

/// The chain over upstream sessions (the inner gateway speaks 2026-07-28 too: not probed).
async fn chain() -> (TestGateway, TestGateway) {
    chain_with("sessions").await
}

/// Answers the session's first server request (id 1) with `answer` until `call` finishes.
async fn answer_first_request(
    c: &support::Client,
    call: &tokio::task::JoinHandle<support::Resp>,
    answer: serde_json::Value,
) {
    for _ in 0..200 {
        let ack = c
            .post(json!({"jsonrpc":"2.0","id":1,"result":answer}).to_string())
            .await;
        assert_eq!(ack.status, 202);
        if call.is_finished() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the call never finished");
}

#[tokio::test]
async fn a_2026_upstream_is_spoken_to_statelessly_and_its_questions_reach_a_session_client() {
    let (inner, outer) = chain_with("auto").await;
    let mut c = outer.client();
    c.initialize(json!({"sampling":{}})).await;
    assert_eq!(
        c.tool_text(1, "inner__echo", json!({"text":"hi"})).await,
        "hi"
    );
    assert_eq!(c.tool_text(2, "inner__whoami", json!({})).await, "ex");
    // No upstream session: the inner gateway served the calls statelessly.
    assert!(inner.gateway().sessions.is_empty());
    assert_eq!(inner.gateway().stateless_sessions(), 1);

    // Progress travels on the stateless call's own stream.
    let r = c
        .post(json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{
            "name":"inner__slow","arguments":{"seconds":0.2,"steps":2},"_meta":{"progressToken":"p"}}})
        .to_string())
        .await;
    let msgs = r.messages();
    let progress = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == "p")
        .count();
    assert_eq!(progress, 2, "{msgs:?}");

    // The inner server's sampling question comes back as `input_required`; the outer gateway
    // asks its client on the call's stream and retries with the answer.
    let c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.post(json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"inner__sample","arguments":{"prompt":"hi"}}}).to_string())
            .await
    });
    answer_first_request(
        &c,
        &call,
        json!({"role":"assistant","model":"m","content":{"type":"text","text":"pong"}}),
    )
    .await;
    let msgs = call.await.unwrap().messages();
    assert_eq!(msgs[0]["method"], "sampling/createMessage", "{msgs:?}");
    assert_eq!(msgs[0]["params"]["messages"][0]["content"]["text"], "hi");
    assert_eq!(
        msgs.last().unwrap()["result"]["content"][0]["text"],
        "model said: pong",
        "{msgs:?}"
    );
    // The client refusing the question fails the call with that reason, not a hang.
    let c3 = c.clone();
    let call = tokio::spawn(async move {
        c3.post(json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"inner__sample","arguments":{"prompt":"again"}}}).to_string())
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for id in 1..4 {
        c.post(
            json!({"jsonrpc":"2.0","id":id,"error":{"code":-1,"message":"user said no"}})
                .to_string(),
        )
        .await;
    }
    let msgs = tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .expect("the refused call ends")
        .unwrap()
        .messages();
    let last = msgs.last().unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("user said no")
            || last["result"]["isError"] == true,
        "{msgs:?}"
    );
}

#[tokio::test]
async fn tools_progress_and_sampling_cross_an_http_upstream() {
    let (inner, outer) = chain().await;
    let mut c = outer.client();
    c.initialize(json!({"sampling":{}})).await;
    assert_eq!(
        inner.gateway().sessions.len(),
        1,
        "one upstream session per client session"
    );

    let tools = c.call(1, "tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"inner__echo") && names.contains(&"local__echo"),
        "{names:?}"
    );
    assert_eq!(c.tool_text(2, "inner__whoami", json!({})).await, "ex");

    let r = c
        .post(json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{
            "name":"inner__slow","arguments":{"seconds":0.2,"steps":2},"_meta":{"progressToken":99}}})
        .to_string())
        .await;
    let msgs = r.messages();
    assert_eq!(
        msgs.iter()
            .filter(
                |m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == 99
            )
            .count(),
        2,
        "{msgs:?}"
    );
    assert_eq!(msgs.last().unwrap()["id"], 3);

    // Sampling: inner's stdio server → inner's POST SSE stream → outer → client, and back.
    let c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.post(json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"inner__sample","arguments":{"prompt":"hi"}}}).to_string())
            .await
    });
    // The sampling request arrives first on the POST stream; answer it by polling the gateway's map.
    let outer_gw = outer.gateway().clone();
    let sid = c.session.clone().unwrap();
    eventually("the sampling request to reach the outer session", || {
        let g = outer_gw.clone();
        let sid = sid.clone();
        async move { g.sessions.get(sid.as_str()).is_some() }
    })
    .await;
    // Server→client ids start at 1 in each session.
    answer_first_request(
        &c,
        &call,
        json!({"role":"assistant","model":"m","content":{"type":"text","text":"pong"}}),
    )
    .await;
    let r = call.await.unwrap();
    let msgs = r.messages();
    assert_eq!(msgs[0]["method"], "sampling/createMessage", "{msgs:?}");
    assert_eq!(
        msgs.last().unwrap()["result"]["content"][0]["text"],
        "model said: pong"
    );

    // DELETE on the outer session ends the inner one too.
    let d = c
        .send(
            c.request("DELETE", Bytes::new())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(d.status, 200);
    let inner_gw = inner.gateway().clone();
    eventually("the upstream session to be deleted", || {
        let g = inner_gw.clone();
        async move { g.sessions.is_empty() }
    })
    .await;
}

#[tokio::test]
async fn a_forgotten_upstream_session_is_reinitialized_transparently() {
    let (inner, outer) = chain().await;
    let mut c = outer.client();
    c.initialize(json!({})).await;
    assert_eq!(
        c.tool_text(1, "inner__echo", json!({"text":"one"})).await,
        "one"
    );
    let old: Vec<String> = inner
        .gateway()
        .sessions
        .iter()
        .map(|s| s.key().to_string())
        .collect();
    assert_eq!(old.len(), 1);
    inner.gateway().end_session(&old[0]);
    assert_eq!(
        c.tool_text(2, "inner__echo", json!({"text":"two"})).await,
        "two"
    );
    let now: Vec<String> = inner
        .gateway()
        .sessions
        .iter()
        .map(|s| s.key().to_string())
        .collect();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], old[0], "a new upstream session was initialized");
}

#[tokio::test]
async fn a_session_client_cannot_pose_as_a_2026_client_to_a_2026_upstream() {
    let (inner, outer) = chain_with("auto").await;
    // Capabilities that are not an object are refused at the handshake: they would be sent on.
    let bad = outer
        .client()
        .post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":5,"clientInfo":{"name":"x","version":"1"}}}).to_string())
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let mut c = outer.client();
    c.initialize(json!({"sampling":{}})).await;
    assert_eq!(
        c.tool_text(1, "inner__echo", json!({"text":"hi"})).await,
        "hi"
    );
    assert!(
        inner.gateway().sessions.is_empty(),
        "still spoken to statelessly"
    );
    // A session client that puts a 2026 envelope and a retry's members in its call is still
    // a session client: the gateway asks it on its stream, and it never sees the server's
    // input_required or its state.
    let c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.post(
            json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{
            "name":"inner__sample","arguments":{"prompt":"posing"},
            "requestState":"forged","inputResponses":{"x":{}},
            "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                     "io.modelcontextprotocol/clientCapabilities":{"sampling":{}}}}})
            .to_string(),
        )
        .await
    });
    answer_first_request(
        &c,
        &call,
        json!({"role":"assistant","model":"m","content":{"type":"text","text":"ok"}}),
    )
    .await;
    let msgs = call.await.unwrap().messages();
    assert_eq!(msgs[0]["method"], "sampling/createMessage", "{msgs:?}");
    let last = msgs.last().unwrap();
    assert_eq!(
        last["result"]["content"][0]["text"], "model said: ok",
        "{msgs:?}"
    );
    assert!(last["result"].get("requestState").is_none());
}

/// A server whose answer to the `server/discover` probe is one SSE event that never ends: the
/// probe stops reading at the message limit (64 MiB) and closes the connection, rather than
/// buffering the stream for as long as the connect timeout allows. Returns the bytes the
/// server wrote before the gateway closed, or `None` if it still read after `cap` bytes.
async fn endless_discover_event(cap: usize) -> (String, tokio::task::JoinHandle<Option<usize>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let probe = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Read until the request's JSON body has come (enough to name its method).
            while !seen.ends_with(b"}") {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            if !String::from_utf8_lossy(&seen).contains("server/discover") {
                let _ = s
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
                continue;
            }
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ";
            s.write_all(head).await.unwrap();
            let chunk = vec![b'A'; 64 * 1024];
            let mut sent = 0;
            while sent < cap {
                if s.write_all(&chunk).await.is_err() {
                    return Some(sent);
                }
                sent += chunk.len();
            }
            return None;
        }
    });
    (url, probe)
}

#[tokio::test]
async fn an_endless_event_in_answer_to_the_probe_is_not_buffered() {
    let (url, probe) = endless_discover_event(512 * 1024 * 1024).await;
    let gw = TestGateway::start(
        "",
        &[format!(
            "  - name: odd\n    protocol: auto\n    connect_timeout: 60s\n    http: {{ url: {url:?} }}\n"
        )],
    )
    .await;
    let mut c = gw.client();
    let list = tokio::spawn(async move {
        c.initialize(serde_json::json!({})).await;
        c.post(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}).to_string())
            .await
    });
    let sent = tokio::time::timeout(std::time::Duration::from_secs(45), probe)
        .await
        .expect("the probe's stream is closed well before its connect timeout")
        .unwrap()
        .expect("the gateway stopped reading the probe's answer");
    // The limit, and what the sockets' buffers held when the gateway closed.
    assert!(sent <= 96 * 1024 * 1024, "read {sent} bytes");
    list.abort();
    gw.stop().await;
}
