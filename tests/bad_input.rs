//! Bad input at the MCP endpoint: one test per kind, each checking the status, the JSON-RPC error,
//! and that a healthy session on the same gateway keeps working.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use support::{Client, TestGateway, example};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOP: &str = "mcp: { max_body_bytes: 65536, body_timeout: 1s, header_timeout: 1s }";

async fn setup() -> (TestGateway, Client) {
    let gw = TestGateway::start(TOP, &[example("a", &[], ""), example("b", &[], "")]).await;
    let mut healthy = gw.client();
    healthy.initialize(json!({})).await;
    (gw, healthy)
}

async fn still_healthy(c: &Client) {
    assert_eq!(
        c.tool_text(99, "a__echo", json!({"text":"still here"}))
            .await,
        "still here"
    );
}

async fn raw_post(
    gw: &TestGateway,
    session: Option<&str>,
    content_type: &str,
    accept: Option<&str>,
    body: &str,
) -> support::Resp {
    let c = gw.client();
    let mut b = c
        .request("POST", Bytes::new())
        .header("content-type", content_type);
    if let Some(a) = accept {
        b = b.header("accept", a);
    }
    if let Some(s) = session {
        b = b.header("mcp-session-id", s);
    }
    c.send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
}

const ACCEPT: Option<&str> = Some("application/json, text/event-stream");

#[tokio::test]
async fn malformed_json_is_a_parse_error() {
    let (gw, healthy) = setup().await;
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        ACCEPT,
        "{\"jsonrpc\":\"2.0\",",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), -32700);
    assert_eq!(r.json()["id"], serde_json::Value::Null);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn non_object_body_is_an_invalid_request() {
    let (gw, healthy) = setup().await;
    for body in ["42", "\"text\"", "null"] {
        let r = raw_post(
            &gw,
            healthy.session.as_deref(),
            "application/json",
            ACCEPT,
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error_code(), -32600, "{body}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("JSON object")
        );
    }
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn batch_arrays_are_refused() {
    let (gw, healthy) = setup().await;
    let body =
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        ACCEPT,
        body,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), -32600);
    assert!(r.body.contains("batch"), "{}", r.body);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn missing_method_is_an_invalid_request() {
    let (gw, healthy) = setup().await;
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        ACCEPT,
        r#"{"jsonrpc":"2.0","id":5}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), -32600);
    assert!(r.body.contains("method"), "{}", r.body);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let (gw, healthy) = setup().await;
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "text/plain",
        ACCEPT,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(r.status, 415);
    assert!(r.body.contains("application/json"));
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn missing_accept_is_406() {
    let (gw, healthy) = setup().await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        None,
        body,
    )
    .await;
    assert_eq!(r.status, 406);
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(r.status, 406, "text/event-stream must be acceptable too");
    assert!(r.body.contains("text/event-stream"));
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn oversized_body_is_413_with_or_without_content_length() {
    let (gw, healthy) = setup().await;
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a__echo","arguments":{{"text":"{}"}}}}}}"#,
        "x".repeat(70_000)
    );
    let r = raw_post(
        &gw,
        healthy.session.as_deref(),
        "application/json",
        ACCEPT,
        &big,
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(r.body.contains("65536"), "{}", r.body);

    // Chunked: no Content-Length to reject up front; the limit applies while reading.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-session-id: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        healthy.session.as_deref().unwrap()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in big.as_bytes().chunks(8192) {
        let _ = s
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = s.write_all(chunk).await;
        let _ = s.write_all(b"\r\n").await;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&out[..n])
    );
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn unknown_session_is_404_and_missing_session_is_400() {
    let (gw, healthy) = setup().await;
    let body = r#"{"jsonrpc":"2.0","id":"req-7","method":"tools/list"}"#;
    let r = raw_post(
        &gw,
        Some("no-such-session"),
        "application/json",
        ACCEPT,
        body,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("session not found"));
    // Refused after the body was read: the answer names the request it refuses.
    assert_eq!(r.json()["id"], "req-7", "{}", r.body);
    let r = raw_post(&gw, None, "application/json", ACCEPT, body).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Mcp-Session-Id"));
    assert_eq!(r.json()["id"], "req-7", "{}", r.body);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn unsupported_protocol_version_is_400() {
    let (_gw, healthy) = setup().await;
    let c = healthy.clone();
    let req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "1999-01-01")
        .body(Full::new(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        )))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("1999-01-01") && r.body.contains("2025-11-25"),
        "{}",
        r.body
    );
    assert_eq!(r.json()["id"], 1, "{}", r.body);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn foreign_origin_is_403_and_foreign_host_is_421() {
    let (gw, healthy) = setup().await;
    let c = gw.client();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
    let with = |name: &'static str, value: &'static str| {
        c.request("POST", Bytes::new())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header(name, value)
            .body(Full::new(Bytes::from_static(init.as_bytes())))
            .unwrap()
    };
    let r = c.send(with("origin", "http://evil.example.com")).await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("evil.example.com"));
    let r = c.send(with("host", "evil.example.com")).await;
    assert_eq!(
        r.status, 421,
        "DNS rebinding: a foreign Host must not reach a loopback gateway"
    );
    let r = c.send(with("origin", "http://localhost:3000")).await;
    assert_eq!(
        r.status, 200,
        "local origins are allowed on loopback: {}",
        r.body
    );
    assert_eq!(gw.gateway().sessions.len(), 2);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn a_body_that_never_finishes_times_out_with_408() {
    let (gw, healthy) = setup().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: 100\r\n\r\n{\"jsonrpc\"";
    s.write_all(head.as_bytes()).await.unwrap();
    // While that request stalls, the healthy session is served.
    still_healthy(&healthy).await;
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&out[..n])
    );
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn headers_that_never_finish_are_cut_off() {
    let (gw, healthy) = setup().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
        .await
        .unwrap();
    still_healthy(&healthy).await;
    let mut out = vec![0u8; 4096];
    // The server closes the connection (possibly after a 408) within the header timeout.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut out).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slowloris connection still open after 5s");
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn unknown_method_and_unknown_tool_are_json_rpc_errors() {
    let (_gw, healthy) = setup().await;
    let r = healthy.call(1, "no/such", json!({})).await;
    assert_eq!(r["error"]["code"], -32601);
    let r = healthy
        .call(2, "tools/call", json!({"name":"zz__echo","arguments":{}}))
        .await;
    assert_eq!(r["error"]["code"], -32602);
    assert!(r["error"]["message"].as_str().unwrap().contains("zz__echo"));
    let r = healthy.call(3, "tools/call", json!({"arguments":{}})).await;
    assert_eq!(r["error"]["code"], -32602);
    assert!(r["error"]["message"].as_str().unwrap().contains("name"));
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn a_call_naming_its_tool_twice_is_refused_and_odd_but_valid_params_pass_as_sent() {
    let (_gw, healthy) = setup().await;
    // The gateway routes by one name; a server reading the other would run what was not
    // checked. Escaped or not, the second name is refused before anything is forwarded, and
    // so is a key a server may read as the name (Go's encoding/json ignores case).
    for (id, params, why) in [
        (
            1,
            r#"{"name":"a__echo","name":"b__echo","arguments":{"text":"x"}}"#,
            "params.name is given twice",
        ),
        (
            2,
            r#"{"name":"a__echo","n\u0061me":"b__echo","arguments":{"text":"x"}}"#,
            "params.name is given twice",
        ),
        (
            3,
            r#"{"name":"a__echo","arguments":{"text":"x"},"arguments":{"text":"y"}}"#,
            "params.arguments is given twice",
        ),
        (
            6,
            r#"{"name":"a__echo","Name":"b__echo","arguments":{"text":"x"}}"#,
            "is too like params.name",
        ),
        (
            7,
            r#"{"name":"a__echo","arguments":{"text":"x"},"ARGUMENTS":{"text":"y"}}"#,
            "is too like params.arguments",
        ),
    ] {
        let message = healthy.invalid_params(id, "tools/call", params).await;
        assert!(message.contains(why), "{message}");
    }
    // Params as an array are not an object.
    let r = healthy
        .post(r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":["a__echo",{}]}"#)
        .await;
    assert_eq!(r.response()["error"]["code"], -32602);
    // Whitespace, an escaped name, other members before and after: routed by the name the
    // escapes spell, the rest reaching the server as sent.
    let r = healthy
        .post(
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params": { "_meta" : {"progressToken": "p"} , "name" : "a__ech\u006f" , "arguments" : { "text" : "sp\"liced" } , "extra" : [1] } }"#,
        )
        .await;
    let resp = r.response();
    assert_eq!(resp["result"]["content"][0]["text"], "sp\"liced", "{resp}");
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn wrong_http_method_is_405_and_unknown_path_is_404() {
    let (gw, healthy) = setup().await;
    let c = gw.client();
    let r = c
        .send(
            c.request("PUT", Bytes::new())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 405);
    assert!(r.headers.get("allow").is_some());
    let mut other = c.clone();
    other.url = format!("http://{}/nope", gw.addr);
    let r = other
        .send(
            other
                .request("GET", Bytes::new())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 404);
    still_healthy(&healthy).await;
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401() {
    let top = "auth: { tokens: [ { principal: alice, token: alice-token-0123456789 }, { principal: bob, token: bob-token-0123456789 } ] }";
    let gw = TestGateway::start(top, &[example("a", &[], "")]).await;
    let mut anon = gw.client();
    let r = anon
        .post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");
    anon.token = Some("wrong".into());
    assert_eq!(
        anon.post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .await
            .status,
        401
    );

    let mut alice = gw.client();
    alice.token = Some("alice-token-0123456789".into());
    alice.initialize(json!({})).await;
    assert_eq!(alice.tool_text(1, "echo", json!({"text":"hi"})).await, "hi");
    // Bob cannot use Alice's session even with its id.
    let mut bob = alice.clone();
    bob.token = Some("bob-token-0123456789".into());
    assert_eq!(
        bob.post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .await
            .status,
        404
    );
    gw.stop().await;
}

/// A session keeps the client's capabilities and info for its life: more than 64 KiB of them
/// (within a body the gateway takes) is refused with 400 / -32602, and no session is made.
#[tokio::test]
async fn an_initialize_offering_too_much_is_refused() {
    // The body limit is the default (4 MiB) here.
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let mut healthy = gw.client();
    healthy.initialize(json!({})).await;
    let pad = "x".repeat(64 * 1024);
    let init = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},
        "clientInfo":{"name":"big","version":"1","description":pad}}})
    .to_string();
    let sessions = gw.gateway().sessions.len();
    let r = gw.client().post(init).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32602, "{}", r.body);
    assert!(
        r.body
            .contains("params.capabilities and params.clientInfo take"),
        "{}",
        r.body
    );
    assert!(r.headers.get("mcp-session-id").is_none());
    assert_eq!(gw.gateway().sessions.len(), sessions);
    assert_eq!(
        healthy
            .tool_text(2, "echo", json!({"text":"still here"}))
            .await,
        "still here"
    );
    gw.stop().await;
}

/// A subscription is kept for the session's life: a URI over 4096 bytes is refused with
/// -32602, whether the gateway reads the request (two servers) or passes it through (one).
#[tokio::test]
async fn a_subscription_to_an_overlong_uri_is_refused() {
    let uri = format!("demo://{}", "x".repeat(4096));
    let (gw, healthy) = setup().await;
    let one = TestGateway::start("", &[example("a", &[], "")]).await;
    for c in [&healthy, &one.client()] {
        let mut c = c.clone();
        if c.session.is_none() {
            c.initialize(json!({})).await;
        }
        for method in ["resources/subscribe", "resources/unsubscribe"] {
            let r = c
                .post(
                    json!({"jsonrpc":"2.0","id":5,"method":method,"params":{"uri":uri}})
                        .to_string(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.error_code(), -32602, "{}", r.body);
            assert!(r.body.contains("at most 4096 bytes"), "{}", r.body);
        }
    }
    still_healthy(&healthy).await;
    one.stop().await;
    gw.stop().await;
}

/// A request's id and its progress token are kept while it runs (the in-flight map, a listen
/// stream, every progress notification): one over 1024 bytes is refused, the id with 400 and
/// -32600 (and `"id": null`, since it cannot be echoed), the token with -32602, through one
/// server or several; so is a token named twice (a server may read the other one).
#[tokio::test]
async fn an_overlong_request_id_or_progress_token_is_refused() {
    let long = "i".repeat(1025);
    let (gw, healthy) = setup().await;
    let r = healthy
        .post(json!({"jsonrpc":"2.0","id":long,"method":"ping"}).to_string())
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32600, "{}", r.body);
    assert!(r.body.contains("longer than 1024 bytes"), "{}", r.body);
    assert_eq!(r.json()["id"], json!(null), "{}", r.body);
    // 1024 bytes is an id like any other.
    let fits = "i".repeat(1022);
    let r = healthy
        .post(json!({"jsonrpc":"2.0","id":fits,"method":"ping"}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], json!(fits), "{}", r.body);
    let one = TestGateway::start("", &[example("a", &[], "")]).await;
    for (c, tool) in [(&healthy, "a__echo"), (&one.client(), "echo")] {
        let mut c = c.clone();
        if c.session.is_none() {
            c.initialize(json!({})).await;
        }
        let r = c
            .post(
                json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":tool,
                    "arguments":{"text":"hi"},"_meta":{"progressToken":long}}})
                .to_string(),
            )
            .await;
        assert_eq!(r.error_code(), -32602, "{}", r.body);
        assert!(
            r.body.contains("progressToken is longer than 1024 bytes"),
            "{}",
            r.body
        );
        // Named twice, the long one last (where a server reading the last key finds it).
        let twice = format!(
            r#"{{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{{"name":"{tool}","arguments":{{"text":"hi"}},"_meta":{{"progressToken":1,"progressToken":"{long}"}}}}}}"#
        );
        let r = c.post(twice).await;
        assert_eq!(r.error_code(), -32602, "{}", r.body);
        assert!(r.body.contains("more than once"), "{}", r.body);
    }
    still_healthy(&healthy).await;
    one.stop().await;
    gw.stop().await;
}
