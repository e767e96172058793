//! The 2024-11-05 HTTP+SSE front as an attacker meets it: a stream is its opener's alone, a
//! stream that never initializes is closed, caps hold, and a closed stream ends its session.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{Client, TestGateway, eventually, example};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

/// An open HTTP+SSE stream, read one event at a time.
struct Stream {
    body: hyper::body::Incoming,
    buf: String,
    /// The message URL its `endpoint` event named.
    endpoint: String,
}

impl Stream {
    async fn open(c: &Client, base: &str) -> Stream {
        let resp = get(c, base).await;
        assert_eq!(resp.status(), 200);
        let mut s = Stream {
            body: resp.into_body(),
            buf: String::new(),
            endpoint: String::new(),
        };
        let (event, data) = s.next().await.expect("an endpoint event");
        assert_eq!(event, "endpoint");
        assert!(data.starts_with("messages?sessionId="), "{data}");
        s.endpoint = format!("{base}/{data}");
        s
    }

    /// The next event as (name, data); `None` when the stream ends.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = Vec::new();
                for line in ev.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d);
                    }
                }
                if !data.is_empty() {
                    return Some((name, data.join("\n")));
                }
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")?
                .ok()?;
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&d));
            }
        }
    }

    async fn message(&mut self) -> Value {
        let (event, data) = self.next().await.expect("a message");
        assert_eq!(event, "message");
        serde_json::from_str(&data).unwrap()
    }
}

async fn get(c: &Client, base: &str) -> http::Response<hyper::body::Incoming> {
    let mut req = http::Request::get(format!("{base}/sse")).header("accept", "text/event-stream");
    if let Some(t) = &c.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    c.http
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

async fn post(c: &Client, url: &str, body: Value) -> support::Resp {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    if let Some(t) = &c.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    c.send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
}

fn initialize(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
}

fn base(gw: &TestGateway) -> String {
    format!("http://{}", gw.addr)
}

fn with_token(gw: &TestGateway, token: &str) -> Client {
    let mut c = gw.client();
    c.token = Some(token.into());
    c
}

#[tokio::test]
async fn a_stream_belongs_to_its_opener() {
    let gw = TestGateway::start(
        &format!(
            "auth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}"
        ),
        &[example("a", &[], "")],
    )
    .await;
    let (alice, bob) = (with_token(&gw, ALICE), with_token(&gw, BOB));
    assert_eq!(get(&gw.client(), &base(&gw)).await.status(), 401);
    let mut stream = Stream::open(&alice, &base(&gw)).await;
    // Bob knows the URL (it leaked) but not the principal: to him the stream does not exist.
    let r = post(&bob, &stream.endpoint, initialize(1)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(gw.gateway().sessions.len(), 0);
    // Alice goes on as if nothing happened.
    assert_eq!(
        post(&alice, &stream.endpoint, initialize(1)).await.status,
        202
    );
    let init = stream.message().await;
    assert_eq!(init["id"], 1);
    assert_eq!(init["result"]["protocolVersion"], "2024-11-05");
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "mine"}}});
    assert_eq!(
        post(&alice, &stream.endpoint, call.clone()).await.status,
        202
    );
    let answer = stream.message().await;
    assert_eq!(answer["id"], 2);
    assert_eq!(answer["result"]["content"][0]["text"], "mine");
    // Bob's requests and answers go nowhere.
    assert_eq!(post(&bob, &stream.endpoint, call).await.status, 404);
    // A second initialize is refused on the stream; the session stays one.
    assert_eq!(
        post(&alice, &stream.endpoint, initialize(3)).await.status,
        202
    );
    let again = stream.message().await;
    assert_eq!(again["id"], 3);
    assert_eq!(again["error"]["code"], -32600);
    assert_eq!(gw.gateway().sessions.len(), 1);
    // Closing the stream ends the session, and the URL with it.
    let endpoint = stream.endpoint.clone();
    drop(stream);
    eventually("the session to end with its stream", || async {
        gw.gateway().sessions.is_empty() && gw.gateway().sse_clients.is_empty()
    })
    .await;
    assert_eq!(post(&alice, &endpoint, initialize(4)).await.status, 404);
    gw.stop().await;
}

#[tokio::test]
async fn streams_are_capped_and_an_uninitialized_one_is_closed() {
    let gw = TestGateway::start(
        "mcp: {max_sessions: 2, session_idle_timeout: 1s}",
        &[example("a", &[], "")],
    )
    .await;
    let c = gw.client();
    let mut first = Stream::open(&c, &base(&gw)).await;
    let mut second = Stream::open(&c, &base(&gw)).await;
    let third = get(&c, &base(&gw)).await;
    assert_eq!(third.status(), 503);
    // The first initializes and stays; the second never does and is closed.
    assert_eq!(post(&c, &first.endpoint, initialize(1)).await.status, 202);
    assert_eq!(first.message().await["id"], 1);
    // `next` fails the test if the stream stays open past 10 s.
    while let Some((event, _)) = second.next().await {
        assert_ne!(event, "message", "nothing was asked on this stream");
    }
    eventually("the uninitialized stream to be forgotten", || async {
        gw.gateway().sse_clients.len() == 1
    })
    .await;
    assert_eq!(post(&c, &second.endpoint, initialize(1)).await.status, 404);
    // An initialized stream with a listener open does not expire while idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    assert_eq!(post(&c, &first.endpoint, ping).await.status, 202);
    assert_eq!(first.message().await["id"], 2);
    gw.stop().await;
}

/// Streams that never initialize count against their principal's session cap, so one caller
/// cannot hold every slot; a POST without the stream id says what is missing.
#[tokio::test]
async fn uninitialized_streams_count_per_principal() {
    let gw = TestGateway::start(
        &format!(
            "auth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}\nmcp: {{max_sessions_per_principal: 2}}"
        ),
        &[example("a", &[], "")],
    )
    .await;
    let (alice, bob) = (with_token(&gw, ALICE), with_token(&gw, BOB));
    let _first = Stream::open(&alice, &base(&gw)).await;
    let mut second = Stream::open(&alice, &base(&gw)).await;
    let third = get(&alice, &base(&gw)).await;
    assert_eq!(third.status(), 429);
    // Bob is not held back by Alice's streams.
    let _bobs = Stream::open(&bob, &base(&gw)).await;
    // An initialized stream is one session, counted once.
    assert_eq!(
        post(&alice, &second.endpoint, initialize(1)).await.status,
        202
    );
    assert_eq!(second.message().await["id"], 1);
    assert_eq!(gw.gateway().sessions.len(), 1);
    assert_eq!(get(&alice, &base(&gw)).await.status(), 429);
    let r = post(&alice, &format!("{}/messages", base(&gw)), initialize(2)).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("sessionId query parameter"), "{}", r.body);
    gw.stop().await;
}

#[tokio::test]
async fn the_front_can_be_turned_off() {
    let gw = TestGateway::start("mcp: {http_sse: false}", &[example("a", &[], "")]).await;
    assert_eq!(get(&gw.client(), &base(&gw)).await.status(), 404);
    gw.stop().await;
}

/// A legacy client that posts requests faster than it reads their answers is bounded: past
/// 256 requests whose answers wait on its stream, a POST is refused with 429 and says why, and
/// once the stream is read the client is served again.
#[tokio::test]
async fn requests_waiting_on_an_unread_stream_are_bounded() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let mut stream = Stream::open(&c, &base(&gw)).await;
    assert_eq!(post(&c, &stream.endpoint, initialize(1)).await.status, 202);
    assert_eq!(stream.message().await["id"], 1);
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(&c, &stream.endpoint, initialized).await.status, 202);
    let slow = |id: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "slow", "arguments": {"seconds": 2}}})
    };
    for id in 10..10 + 256 {
        let r = post(&c, &stream.endpoint, slow(id)).await;
        assert_eq!(r.status, 202, "request {id}: {}", r.body);
    }
    let refused = post(&c, &stream.endpoint, slow(9999)).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("at most 256") && refused.body.contains("read the stream"),
        "{}",
        refused.body
    );
    // Reading the stream frees the slots: every answer comes, and the client is served again.
    let mut answered = std::collections::HashSet::new();
    while answered.len() < 256 {
        let m = stream.message().await;
        assert_eq!(m["result"]["content"][0]["text"], "done after 2s", "{m}");
        answered.insert(m["id"].as_u64().unwrap());
    }
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    assert_eq!(post(&c, &stream.endpoint, ping).await.status, 202);
    assert_eq!(stream.message().await["id"], 2);
    gw.stop().await;
}
