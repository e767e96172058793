//! Resumable response streams (2025-11-25): a client whose connection breaks mid-call resumes
//! with `Last-Event-ID` and gets the rest of that stream only; the call was not cancelled by
//! the break. Ids from elsewhere are refused with 400.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{Client, TestGateway, example};

/// One SSE event: its id (if any) and data.
#[derive(Debug)]
struct Event {
    id: Option<String>,
    retry: Option<String>,
    data: String,
}

/// Reads raw SSE events off a response body.
struct Events {
    body: hyper::body::Incoming,
    buf: String,
}

impl Events {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let field = |name: &str| {
                    raw.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_owned)
                };
                if raw.starts_with(':') {
                    continue; // a comment (keep-alive)
                }
                return Some(Event {
                    id: field("id: "),
                    retry: field("retry: "),
                    data: field("data: ").unwrap_or_default(),
                });
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
}

async fn open(c: &Client, method: &str, body: Value, last: Option<&str>) -> (u16, Events) {
    let mut req = c
        .request(method, Bytes::new())
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25");
    if method == "POST" {
        req = req.header("content-type", "application/json");
    }
    if let Some(last) = last {
        req = req.header("last-event-id", last);
    }
    let body = if method == "POST" {
        Bytes::from(body.to_string())
    } else {
        Bytes::new()
    };
    let resp = c
        .http
        .request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (
        status,
        Events {
            body: resp.into_body(),
            buf: String::new(),
        },
    )
}

fn slow_call(id: u64, token: &str) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
        "name":"slow","arguments":{"seconds":1.0,"steps":4},"_meta":{"progressToken":token}}})
}

#[tokio::test]
async fn a_broken_response_stream_is_resumed_where_it_broke() {
    let gw = TestGateway::start("", &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;

    let (status, mut first) = open(&c, "POST", slow_call(7, "t"), None).await;
    assert_eq!(status, 200);
    let priming = first.next().await.unwrap();
    assert!(
        priming.data.is_empty() && priming.retry.is_some(),
        "{priming:?}"
    );
    let stream = priming.id.unwrap().split_once('.').unwrap().0.to_owned();
    let progress = first.next().await.unwrap();
    let seen = progress.id.clone().unwrap();
    assert!(
        progress.data.contains("notifications/progress"),
        "{progress:?}"
    );
    // The connection breaks: the call goes on.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, mut rest) = open(&c, "GET", Value::Null, Some(&seen)).await;
    assert_eq!(status, 200);
    let mut ids = Vec::new();
    let mut result = None;
    while let Some(ev) = rest.next().await {
        let id = ev.id.clone().expect("every replayed event has an id");
        assert!(
            id.starts_with(&format!("{stream}.")),
            "another stream's event: {id}"
        );
        ids.push(id);
        let msg: Value = serde_json::from_str(&ev.data).unwrap();
        if msg["id"] == 7 {
            result = Some(msg);
            break;
        }
        assert_eq!(msg["method"], "notifications/progress", "{msg}");
    }
    let result = result.expect("the call's answer, after the break");
    assert!(result["result"]["content"].is_array(), "{result}");
    // Nothing already seen is sent again, and nothing is skipped.
    let seq = |id: &str| id.split_once('.').unwrap().1.parse::<u64>().unwrap();
    assert_eq!(seq(&ids[0]), seq(&seen) + 1, "{ids:?}");
    assert!(
        ids.windows(2).all(|w| seq(&w[1]) == seq(&w[0]) + 1),
        "{ids:?}"
    );
    assert_eq!(
        ids.len(),
        4,
        "three more progress events and the answer: {ids:?}"
    );

    // Once finished, the stream can still be read again from any point it holds.
    let (status, mut again) = open(&c, "GET", Value::Null, Some(&ids[2])).await;
    assert_eq!(status, 200);
    let last = again.next().await.unwrap();
    assert_eq!(last.id.as_deref(), Some(ids[3].as_str()));
    assert!(
        again.next().await.is_none(),
        "a finished stream ends after its replay"
    );
}

#[tokio::test]
async fn event_ids_from_elsewhere_are_refused() {
    let gw = TestGateway::start("", &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let mut other = gw.client();
    other.initialize(json!({})).await;
    let (_, mut s) = open(&c, "POST", slow_call(1, "a"), None).await;
    let priming = s.next().await.unwrap().id.unwrap();
    for bad in ["", "nonsense", "1", "1.x", "99.0", "1.999999"] {
        let (status, _) = open(&c, "GET", Value::Null, Some(bad)).await;
        assert_eq!(status, 400, "Last-Event-ID {bad:?}");
    }
    // Stream numbers are per session: another session has no such stream.
    let (status, _) = open(&other, "GET", Value::Null, Some(&priming)).await;
    assert_eq!(status, 400);
    // The session's own id still resumes.
    let (status, _) = open(&c, "GET", Value::Null, Some(&priming)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn clients_before_2025_11_25_get_no_priming_event() {
    let gw = TestGateway::start("", &[example("ex", &[], "")]).await;
    let c = gw.client();
    let init = c
        .post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}).to_string())
        .await;
    let mut c = c.clone();
    c.session = init
        .headers
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let req = c
        .request("POST", Bytes::new())
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2025-06-18")
        .body(Full::new(Bytes::from(slow_call(3, "p").to_string())))
        .unwrap();
    let resp = c.http.request(req).await.unwrap();
    let mut events = Events {
        body: resp.into_body(),
        buf: String::new(),
    };
    let first = events.next().await.unwrap();
    assert!(!first.data.is_empty(), "no priming event: {first:?}");
    assert!(
        first.id.is_some(),
        "but numbered, for resumption: {first:?}"
    );
}
