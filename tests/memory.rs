//! What a hostile upstream's JSON costs the gateway in memory, counted by a global allocator
//! (in a binary of its own, with one test, so that nothing else moves the count).

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::TestGateway;

/// Bytes the process holds, and their peak (this binary runs this one test, so that nothing
/// else moves them).
mod process_memory {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicIsize, Ordering};

    pub struct Counting;

    static NOW: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    fn add(n: isize) {
        let v = NOW.fetch_add(n, Ordering::Relaxed) + n;
        PEAK.fetch_max(v, Ordering::Relaxed);
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            add(-(l.size() as isize));
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
            add(size as isize - l.size() as isize);
            unsafe { System.realloc(p, l, size) }
        }
    }

    /// Bytes the process holds now.
    pub fn now() -> isize {
        NOW.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what the process holds now; returns that.
    pub fn reset_peak() -> isize {
        let now = now();
        PEAK.store(now, Ordering::Relaxed);
        now
    }

    /// The most the process held since [`reset_peak`].
    pub fn peak() -> isize {
        PEAK.load(Ordering::Relaxed)
    }
}

#[global_allocator]
static ALLOCATOR: process_memory::Counting = process_memory::Counting;

/// Serves `answer(method)` as raw JSON-RPC results (text, never a value tree: the test's own
/// server must not be what uses the memory measured) on a loopback port: `http://addr/mcp`.
async fn raw_upstream(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> String {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        if req.method() != http::Method::POST {
                            *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
                            return Ok(resp);
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        #[derive(serde::Deserialize)]
                        struct Msg<'a> {
                            id: Option<&'a serde_json::value::RawValue>,
                            method: &'a str,
                        }
                        let msg: Msg<'_> = serde_json::from_slice(&body).unwrap();
                        if let Some(id) = msg.id {
                            let frame = format!(
                                r#"{{"jsonrpc":"2.0","id":{},"result":{}}}"#,
                                id.get(),
                                answer(msg.method)
                            );
                            *resp.body_mut() = Full::new(Bytes::from(frame));
                            let h = resp.headers_mut();
                            h.insert("content-type", "application/json".parse().unwrap());
                            h.insert("mcp-session-id", "raw".parse().unwrap());
                        } else {
                            *resp.status_mut() = http::StatusCode::ACCEPTED;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/mcp")
}

/// A server's JSON is never read into value trees whose size it chooses (a value takes up to
/// a hundred times the room of its text): a tool with a 4 MiB schema of tiny objects, under
/// pinning, costs the gateway about what its text does. What sessions keep of a server's
/// `initialize` answer is its result, not megabytes beside it, and a result larger than
/// 256 KiB is refused rather than kept by every session.
#[tokio::test]
async fn a_servers_json_costs_the_gateway_about_its_size() {
    const MIB: isize = 1 << 20;
    let objects = r#"{"":0},"#.repeat(600_000); // 4 MiB of text, ~400 MiB as values
    let schema = format!(r#"{{"type":"object","default":[{}{{}}]}}"#, objects);
    let init = |extra: &str| {
        format!(
            r#"{{"protocolVersion":"2025-11-25","capabilities":{{"tools":{{}}}},"serverInfo":{{"name":"s","version":"1"}}{extra}}}"#
        )
    };
    let pad = "x".repeat(8 << 20);
    let big = raw_upstream(move |method| match method {
        "initialize" => init(""),
        "tools/list" => format!(
            r#"{{"tools":[{{"name":"big","description":"d","inputSchema":{schema}}},{{"name":"small","description":"s","inputSchema":{{"type":"object"}}}}]}}"#
        ),
        _ => "{}".into(),
    });
    let (beside, inside) = (pad.clone(), pad);
    // The padding a sibling of `result`, then inside it.
    let padded = raw_upstream(move |method| match method {
        "initialize" => format!(r#"{},"pad":"{beside}""#, init("")),
        "tools/list" => r#"{"tools":[{"name":"t","inputSchema":{"type":"object"}}]}"#.into(),
        _ => "{}".into(),
    });
    let huge = raw_upstream(move |method| match method {
        "initialize" => init(&format!(r#","pad":"{inside}""#)),
        "tools/list" => r#"{"tools":[{"name":"t","inputSchema":{"type":"object"}}]}"#.into(),
        _ => "{}".into(),
    });
    let pins = std::env::temp_dir().join(format!("gatehouse-memory-pins-{}", std::process::id()));
    let _ = std::fs::remove_file(&pins);
    let upstream = |name: &str, url: &str| {
        format!("  - name: {name}\n    protocol: sessions\n    http: {{ url: {url:?} }}\n")
    };
    let gw = TestGateway::start(
        &format!("pinning: {{file: {pins:?}}}"),
        &[
            upstream("big", &big.await),
            upstream("padded", &padded.await),
            upstream("huge", &huge.await),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let before = process_memory::reset_peak();
    let listed = c.call(1, "tools/list", json!({})).await;
    let peak = process_memory::peak() - before;
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    // Too large to pin: not shown while pinning blocks; the others are. The server whose
    // initialize result is too large is not reached at all.
    assert_eq!(names, ["big__small", "padded__t"]);
    assert!(
        peak < 64 * MIB,
        "listing a 4 MiB tool peaked at {} MiB",
        peak / MIB
    );
    let held = process_memory::now();
    let mut sessions = Vec::new();
    for _ in 0..8 {
        let mut s = gw.client();
        s.initialize(json!({})).await;
        let r = s
            .call(
                1,
                "tools/call",
                json!({"name": "padded__t", "arguments": {}}),
            )
            .await;
        assert!(r["result"].is_object(), "{r}");
        sessions.push(s);
    }
    let grown = process_memory::now() - held;
    assert!(grown < 24 * MIB, "8 sessions hold {} MiB", grown / MIB);
    let _ = std::fs::remove_file(&pins);
}
