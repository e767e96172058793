//! Connections that cannot exhaust the gateway: a deadline from accept for silent HTTP/1 and
//! HTTP/2 connections, an idle deadline that spares SSE streams, caps per source address and
//! overall, a gateway that keeps serving under a low open-file limit; and requests whose target
//! is ambiguous (two Host headers, absolute form) refused with 400; long-lived streams (a
//! session's GET stream, a listen stream, an HTTP+SSE stream) whose client stops reading are
//! ended, while slow readers and idle streams keep theirs.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{BIN, Client, TestGateway, example};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// The HTTP/2 connection preface and an empty SETTINGS frame: a client that then says nothing.
const H2_PREFACE_ONLY: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;

/// A request for `/healthz`, on a connection kept alive.
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";

/// How a test client connects: from which loopback source address (Linux routes all of 127/8
/// to lo, so a test can play several peers), and with what receive buffer.
#[derive(Clone, Copy)]
struct Peer {
    src: Ipv4Addr,
    rcvbuf: Option<u32>,
}

/// A client on 127.0.0.1 with the system's buffers.
const LOCAL: Peer = Peer {
    src: Ipv4Addr::LOCALHOST,
    rcvbuf: None,
};

impl Peer {
    /// A client on `src` (any address of 127/8) with the system's buffers.
    fn at(src: Ipv4Addr) -> Peer {
        Peer { src, rcvbuf: None }
    }

    /// This client with a receive buffer of `SMALL_RCVBUF`: reading nothing, it soon blocks
    /// the gateway.
    fn small_buffer(self) -> Peer {
        Peer {
            rcvbuf: Some(SMALL_RCVBUF),
            ..self
        }
    }

    /// A new connection to `to`.
    async fn connect(self, to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        if let Some(size) = self.rcvbuf {
            s.set_recv_buffer_size(size).unwrap();
        }
        s.bind(SocketAddr::new(self.src.into(), 0)).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Sends `request` on a new connection and reads until the response head has come, and
    /// `until` after it: the connection, and what was read (the head first).
    async fn open_raw(self, to: SocketAddr, request: &str, until: &str) -> (TcpStream, String) {
        let mut s = self.connect(to).await;
        let read = request_on(&mut s, request, until).await;
        (s, read)
    }

    /// The stream `request` opens (it is answered 200) on a new connection.
    async fn open_stream(self, to: SocketAddr, request: &str) -> TcpStream {
        let (s, head) = self.open_raw(to, request, "").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s
    }
}

/// Connects from a chosen loopback source address.
async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    Peer::at(src).connect(to).await
}

/// Sends `request` on `s` and reads until the response head has come, and `until` after it:
/// what was read (the head first).
async fn request_on(s: &mut TcpStream, request: &str, until: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = String::from_utf8_lossy(&read);
            if let Some(head) = text.find("\r\n\r\n")
                && text[head..].contains(until)
            {
                return;
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {text}");
            read.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 10 s");
    String::from_utf8_lossy(&read).into_owned()
}

/// Whether the server closes `s` (EOF or reset) within `within`, discarding anything it sends.
async fn closed_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Whether a new connection from `src` is admitted within `within` (an admitted one is kept
/// open a while; a refused one is closed at once).
async fn admitted_within(src: Ipv4Addr, to: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut s = connect_from(src, to).await;
        if !closed_within(&mut s, Duration::from_millis(200)).await {
            return true;
        }
    }
    false
}

/// A `tools/call` of the example server's `slow` tool (`seconds` long), its body padded to
/// `size` bytes.
fn slow_call(id: u64, seconds: u64, size: usize) -> Bytes {
    let envelope = json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
        "params":{"name":"slow","arguments":{"seconds":seconds,"pad":""}}})
    .to_string();
    let pad = "x".repeat(size - envelope.len());
    Bytes::from(envelope.replace(r#""pad":"""#, &format!(r#""pad":"{pad}""#)))
}

/// Reads one HTTP/1.1 response (its status line and its body) off `r`, without waiting for
/// the connection to close.
async fn response(r: &mut BufReader<TcpStream>) -> (String, String) {
    let mut status = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut status))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// Sends one raw HTTP/1.1 request (the caller writes the head; `connection: close` is added)
/// and returns the whole response text.
async fn raw_exchange(addr: SocketAddr, head: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn healthy_session(gw: &TestGateway) -> Client {
    let mut c = gw.client();
    c.initialize(json!({})).await;
    c
}

/// A gateway (`top` its YAML before `upstreams:`) in front of `upstream`, and a client with a
/// session on it.
async fn gateway_and_session(top: &str, upstream: String) -> (TestGateway, Client) {
    let gw = TestGateway::start(top, &[upstream]).await;
    let c = healthy_session(&gw).await;
    (gw, c)
}

async fn still_healthy(c: &Client) {
    assert_eq!(
        c.tool_text(99, "echo", json!({"text":"still here"})).await,
        "still here"
    );
}

/// Opens a GET SSE stream for `c`'s session on a connection of its own.
async fn open_sse_stream(gw: &TestGateway, c: &Client) -> TcpStream {
    LOCAL.open_stream(gw.addr, &get_request(c)).await
}

/// Asserts that `sse` keeps delivering (keep-alive comments) for `span`.
async fn keeps_delivering(sse: &mut TcpStream, span: Duration) {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + span;
    while Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(2), sse.read(&mut buf))
            .await
            .expect("SSE stream delivers keep-alives")
            .unwrap();
        assert!(n > 0, "the SSE stream was closed");
    }
}

#[tokio::test]
async fn silent_connections_are_closed_from_accept_http1_and_http2() {
    let (gw, healthy) = gateway_and_session(
        "mcp: { header_timeout: 1s, idle_connection_timeout: 60s }",
        example("a", &[], ""),
    )
    .await;
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let mut h2 = TcpStream::connect(gw.addr).await.unwrap();
    h2.write_all(H2_PREFACE_ONLY).await.unwrap();
    let started = Instant::now();
    // Admitted, not refused: both are open a while...
    assert!(!closed_within(&mut silent, Duration::from_millis(300)).await);
    still_healthy(&healthy).await;
    // ...and closed once the first request is overdue (header_timeout from accept).
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "an HTTP/1 connection that never sends a byte is still open after {:?}",
        started.elapsed()
    );
    assert!(
        closed_within(&mut h2, Duration::from_secs(5)).await,
        "an HTTP/2 connection with no stream is still open after {:?}",
        started.elapsed()
    );
    still_healthy(&healthy).await;
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_close_but_sse_streams_stay() {
    let (gw, healthy) = gateway_and_session(
        "mcp: { header_timeout: 30s, idle_connection_timeout: 1s, sse_keepalive: 200ms }",
        example("a", &[], ""),
    )
    .await;

    // A keep-alive connection that served one request, then went quiet.
    let mut kept = TcpStream::connect(gw.addr).await.unwrap();
    kept.write_all(HEALTHZ).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // An SSE stream on another connection, open longer than the idle deadline.
    let mut sse = open_sse_stream(&gw, &healthy).await;

    // The deadline is 1 s; the margin is for a loaded CI machine.
    let idle_since = Instant::now();
    assert!(
        closed_within(&mut kept, Duration::from_secs(8)).await,
        "an idle keep-alive connection outlived idle_connection_timeout"
    );
    eprintln!(
        "idle keep-alive connection closed after {:?}",
        idle_since.elapsed()
    );
    // Well past the idle deadline, the stream still delivers keep-alive comments.
    keeps_delivering(&mut sse, Duration::from_millis(2500)).await;
    still_healthy(&healthy).await;
    gw.stop().await;
}

/// The header deadline holds between requests too: a kept-alive HTTP/1 connection whose next
/// request head starts and never finishes is closed `header_timeout` after the last response,
/// though the idle deadline is far longer; one that says nothing at all likewise. A request
/// that lasts longer than the header deadline (an SSE stream) is not cut off.
#[tokio::test]
async fn a_next_request_head_that_never_finishes_is_cut_off_at_the_header_deadline() {
    let (gw, healthy) = gateway_and_session(
        "mcp: { header_timeout: 1s, idle_connection_timeout: 60s, sse_keepalive: 200ms }",
        example("a", &[], ""),
    )
    .await;
    let mut sse = open_sse_stream(&gw, &healthy).await;
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let mut quiet = TcpStream::connect(gw.addr).await.unwrap();
    for s in [&mut slow, &mut quiet] {
        s.write_all(HEALTHZ).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    let served = Instant::now();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
        .await
        .unwrap();
    // Open a while (a head may take up to the deadline)...
    assert!(!closed_within(&mut slow, Duration::from_millis(700)).await);
    still_healthy(&healthy).await;
    // ...and closed once it is overdue, long before the idle deadline (the margin is for a
    // loaded CI machine).
    for (name, s) in [("a started head", &mut slow), ("a silent one", &mut quiet)] {
        assert!(
            closed_within(s, Duration::from_secs(8)).await,
            "a kept-alive connection with {name} is still open after {:?}",
            served.elapsed()
        );
    }
    // Past both deadlines, the stream still delivers keep-alive comments.
    keeps_delivering(&mut sse, Duration::from_millis(1500)).await;
    still_healthy(&healthy).await;
    gw.stop().await;
}

/// A large answer to a client that reads it slowly is not cut off at the header deadline: a
/// request ends when the gateway has handed its answer over, which can be long before a slow
/// reader has it all. The client here reads nothing for longer than the header deadline and
/// the usual closing grace together, then reads the whole answer.
#[tokio::test]
async fn a_large_answer_to_a_slow_reader_is_not_cut_off_at_the_header_deadline() {
    let (gw, c) = gateway_and_session(
        "mcp: { header_timeout: 1s, idle_connection_timeout: 60s, max_body_bytes: 33554432 }",
        example("a", &[], ""),
    )
    .await;
    // Larger than what the kernel buffers between the two sockets: the gateway is still
    // writing while the client waits.
    let text = "x".repeat(12 << 20);
    let body = json!({"jsonrpc":"2.0","id":5,"method":"tools/call",
        "params":{"name":"echo","arguments":{"text": text}}})
    .to_string();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-11-25\r\nmcp-session-id: {}\r\ncontent-length: {}\r\n\r\n",
        c.session.as_deref().unwrap(),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut reader = BufReader::new(s);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
    }
    let length = length.expect("a JSON answer with a length");
    let mut answer = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(20), reader.read_exact(&mut answer))
        .await
        .expect("the answer within 20 s")
        .expect("the whole answer, not cut off");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .map(str::len),
        Some(12 << 20)
    );
    still_healthy(&c).await;
    gw.stop().await;
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_closed_at_once() {
    let (gw, healthy) = gateway_and_session(
        "mcp: { header_timeout: 30s, max_connections_per_ip: 3 }",
        example("a", &[], ""),
    )
    .await;
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(other, gw.addr).await);
    }
    let mut excess = connect_from(other, gw.addr).await;
    assert!(
        closed_within(&mut excess, Duration::from_secs(2)).await,
        "a fourth connection from one address was kept"
    );
    for s in &mut held {
        assert!(!closed_within(s, Duration::from_millis(50)).await);
    }
    // Other addresses are unaffected: a new client gets a session, the old one is served.
    healthy_session(&gw).await;
    still_healthy(&healthy).await;
    // A freed place can be taken again.
    drop(held.pop());
    // Bounded by time, not by attempts: a refused attempt is quick, and under load the gateway
    // may take a while to read the dropped connection's end.
    assert!(
        admitted_within(other, gw.addr, Duration::from_secs(10)).await,
        "a place freed by a closed connection was never given back"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connections_over_the_global_cap_are_closed_until_places_free_up() {
    let gw = TestGateway::start(
        "mcp: { header_timeout: 1s, max_connections: 4, max_connections_per_ip: 2 }",
        &[example("a", &[], "")],
    )
    .await;
    let mut held = Vec::new();
    for src in [2, 2, 3, 3] {
        held.push(connect_from(Ipv4Addr::new(127, 0, 0, src), gw.addr).await);
    }
    let mut excess = connect_from(Ipv4Addr::new(127, 0, 0, 4), gw.addr).await;
    assert!(
        closed_within(&mut excess, Duration::from_millis(500)).await,
        "a fifth connection was kept over max_connections: 4"
    );
    // The silent ones are cut at their deadline; then clients get in again.
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
    let c = healthy_session(&gw).await;
    still_healthy(&c).await;
    gw.stop().await;
}

/// A gateway process under `ulimit -n 128`, its address read from its log.
struct Child {
    process: tokio::process::Child,
    addr: SocketAddr,
    accept_failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn spawn_low_fd_gateway(nofile: u32, mcp: &str) -> Child {
    let dir = std::env::temp_dir().join(format!(
        "gatehouse-connections-{}-{nofile}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gatehouse.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nmcp: {mcp}\nupstreams:\n{}",
            example("a", &[], "")
        ),
    )
    .unwrap();
    let mut process = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" serve --config \"$1\""
        ))
        .arg(BIN)
        .arg(&config)
        .env("RUST_LOG", "gatehouse=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sh runs");
    let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        let mut log = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if let Some(rest) = line.split_once("MCP endpoint http://").map(|(_, r)| r) {
                return rest
                    .split('/')
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap();
            }
        }
        panic!("gateway exited before listening: {}", log.join("\n"));
    })
    .await
    .expect("gateway listening within 30s");
    // Keep draining the log (a full pipe would stall the gateway), counting accept failures.
    let accept_failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accept_failures.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("accept failed") {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    Child {
        process,
        addr,
        accept_failures,
        _dir: TempDir(dir),
    }
}

#[tokio::test]
async fn under_a_low_file_limit_real_clients_get_in_while_silent_connections_are_held() {
    let mut gw =
        spawn_low_fd_gateway(128, "{ header_timeout: 2s, max_connections_per_ip: 16 }").await;
    let url = format!("http://{}/mcp", gw.addr);
    let mut healthy = Client::new(url.clone());
    healthy.initialize(json!({})).await;

    // 300 silent connections, twice what the process may open: HTTP/1 and HTTP/2 preface-only.
    let mut flood = Vec::new();
    for i in 0..300 {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % 2) as u8);
        let mut s = connect_from(src, gw.addr).await;
        if i % 2 == 1 {
            let _ = s.write_all(H2_PREFACE_ONLY).await;
        }
        flood.push(s);
    }

    let started = Instant::now();
    let mut fresh = Client::new(url);
    tokio::time::timeout(Duration::from_secs(5), fresh.initialize(json!({})))
        .await
        .expect("a new client initializes within 5s while silent connections are held");
    let initialized_in = started.elapsed();
    tokio::time::timeout(Duration::from_secs(5), still_healthy(&healthy))
        .await
        .expect("an existing session is served while silent connections are held");
    eprintln!("initialize under flood took {initialized_in:?}");

    for s in &mut flood {
        assert!(
            closed_within(s, Duration::from_secs(6)).await,
            "a silent connection outlived its deadline"
        );
    }
    still_healthy(&fresh).await;
    let failures = gw
        .accept_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        failures, 0,
        "the gateway ran out of descriptors ({failures} accept failures logged)"
    );
    let _ = gw.process.kill().await;
}

#[tokio::test]
async fn two_host_headers_are_refused_with_400() {
    let (gw, healthy) = gateway_and_session("", example("a", &[], "")).await;
    let r = raw_exchange(
        gw.addr,
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nhost: evil.example\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n",
        INIT,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("2 Host headers"), "{r}");
    // Every method of the MCP endpoint, and every other path.
    for head in [
        "GET /mcp HTTP/1.1\r\naccept: text/event-stream\r\n",
        "DELETE /mcp HTTP/1.1\r\n",
        "GET /healthz HTTP/1.1\r\n",
        "GET /mcp/any/v0.1/servers HTTP/1.1\r\n",
    ] {
        let r = raw_exchange(
            gw.addr,
            &format!("{head}host: 127.0.0.1\r\nhost: 127.0.0.1\r\n"),
            "",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{head}: {r}");
        assert!(r.contains("2 Host headers"), "{head}: {r}");
    }
    assert_eq!(gw.gateway().sessions.len(), 1);
    still_healthy(&healthy).await;
    gw.stop().await;
}

#[tokio::test]
async fn absolute_form_targets_must_agree_with_host_and_pass_the_host_rules() {
    let (gw, healthy) = gateway_and_session("", example("a", &[], "")).await;
    let headers =
        "content-type: application/json\r\naccept: application/json, text/event-stream\r\n";

    let r = raw_exchange(
        gw.addr,
        &format!("POST http://other.example/mcp HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}"),
        INIT,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.contains("other.example") && r.contains("does not match Host"),
        "{r}"
    );

    // Consistent but foreign: the DNS-rebinding rule applies to the target's authority.
    let r = raw_exchange(
        gw.addr,
        &format!("POST http://other.example/mcp HTTP/1.1\r\nhost: other.example\r\n{headers}"),
        INIT,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 421"), "{r}");

    // Consistent and local: served.
    let local = gw.addr.to_string();
    let r = raw_exchange(
        gw.addr,
        &format!("POST http://{local}/mcp HTTP/1.1\r\nhost: {local}\r\n{headers}"),
        INIT,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(gw.gateway().sessions.len(), 2);

    // The scheme's default port is the same authority written either way.
    for (target, host) in [
        ("http://127.0.0.1/mcp", "127.0.0.1:80"),
        ("http://LOCALHOST:80/mcp", "localhost"),
    ] {
        let r = raw_exchange(
            gw.addr,
            &format!("POST {target} HTTP/1.1\r\nhost: {host}\r\n{headers}"),
            INIT,
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{target} / {host}: {r}");
    }
    // Another port is another authority.
    let r = raw_exchange(
        gw.addr,
        &format!("POST http://127.0.0.1/mcp HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n{headers}"),
        INIT,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    still_healthy(&healthy).await;
    gw.stop().await;
}

#[tokio::test]
async fn http2_clients_are_served_on_loopback() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let mut c = gw.client();
    c.http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    c.initialize(json!({})).await;
    still_healthy(&c).await;
    // Calls multiplexed on the one connection at once (its streams run on the shared runtime,
    // its connection on one serving thread).
    let calls = (0..16).map(|i| {
        let c = &c;
        async move {
            let said = format!("stream {i}");
            let text = c.tool_text(i, "echo", json!({ "text": said })).await;
            assert!(text.contains(&said), "{text}");
        }
    });
    futures::future::join_all(calls).await;
    // :authority and a differing Host header disagree: refused.
    let req = c
        .request("POST", Bytes::new())
        .header("host", "evil.example")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from_static(INIT.as_bytes())))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 400, "{}", r.body);
    gw.stop().await;
}

/// Request bodies being read share one room (`mcp.max_bodies_bytes`), taken as their bytes
/// arrive: bodies only declared cost nothing; slow bodies that fill it make the next request
/// a 503 (with Retry-After) at once, not one more buffer; the slow ones, once sent, are served,
/// and so is everyone after them.
#[tokio::test]
async fn slow_bodies_share_a_bounded_room() {
    const BODY: usize = 64 * 1024;
    let gw = TestGateway::start(
        &format!(
            "mcp: {{ max_body_bytes: {BODY}, max_bodies_bytes: {} }}",
            2 * BODY
        ),
        &[example("ex", &[], "")],
    )
    .await;
    let addr = gw.addr;
    let room = || gw.gateway().bodies.available();
    let head = "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n";
    // An initialize request of exactly `BODY` bytes.
    let pad = BODY - INIT.len() - r#","pad":"""#.len();
    let full = format!(
        r#"{},"pad":"{}"}}"#,
        &INIT[..INIT.len() - 1],
        "x".repeat(pad)
    );
    assert_eq!(full.len(), BODY);
    let status = |response: &str| response.split(' ').nth(1).unwrap_or_default().to_owned();
    let read_all = |mut s: TcpStream| async move {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let declared = format!("{head}connection: close\r\ncontent-length: {BODY}\r\n\r\n");
    // Declaring costs nothing: fifty bodies announced whole and never sent take no room.
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(declared.as_bytes()).await.unwrap();
        idle.push(s);
    }
    let ok = raw_exchange(addr, head, INIT).await;
    assert_eq!(status(&ok), "200", "{ok}");
    assert_eq!(room(), 2 * BODY);
    // Two slow bodies sent but for their last byte: the room is full.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{declared}{}", &full[..BODY - 1]).as_bytes())
            .await
            .unwrap();
        slow.push(s);
    }
    support::eventually("both slow bodies are being read", || async { room() == 2 }).await;
    let refused = raw_exchange(addr, head, INIT).await;
    assert_eq!(status(&refused), "503", "{refused}");
    assert!(refused.contains("request bodies"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // A chunked body is counted as it comes: three bytes do not fit in two.
    let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len());
    let chunked_head = format!("{head}connection: close\r\ntransfer-encoding: chunked\r\n\r\n");
    let mut refused = TcpStream::connect(addr).await.unwrap();
    refused
        .write_all(format!("{chunked_head}{}", chunk("{\"j")).as_bytes())
        .await
        .unwrap();
    // (Answered at once; the connection stays to read the rest of the body, and drop it.)
    let (refused, _) = response(&mut BufReader::new(refused)).await;
    assert_eq!(status(&refused), "503");
    // Ended, a slow body is served and gives its room back; a chunked body takes its share
    // chunk by chunk.
    let mut first = slow.remove(0);
    first.write_all(&full.as_bytes()[BODY - 1..]).await.unwrap();
    assert_eq!(status(&read_all(first).await), "200");
    support::eventually("the first body's room is given back", || async {
        room() == BODY + 1
    })
    .await;
    let mut chunked = TcpStream::connect(addr).await.unwrap();
    let req = format!("{chunked_head}{}", chunk(&full[..BODY / 2]));
    chunked.write_all(req.as_bytes()).await.unwrap();
    support::eventually("the chunked body's first half is counted", || async {
        room() == BODY / 2 + 1
    })
    .await;
    let rest = format!("{}0\r\n\r\n", chunk(&full[BODY / 2..]));
    chunked.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(status(&read_all(chunked).await), "200");
    let mut second = slow.remove(0);
    second
        .write_all(&full.as_bytes()[BODY - 1..])
        .await
        .unwrap();
    assert_eq!(status(&read_all(second).await), "200");
    support::eventually("the room is whole again", || async { room() == 2 * BODY }).await;
    let ok = raw_exchange(addr, head, INIT).await;
    assert_eq!(status(&ok), "200", "{ok}");
    drop(idle);
}

/// A call's body keeps its room in `mcp.max_bodies_bytes` while the call runs upstream (its
/// arguments are kept until it ends), not only while it arrives: otherwise many slow calls,
/// each sent quickly, hold any amount of memory. Calls that fill the room make the next large
/// body a 503; a small request still fits; the room comes back whole when the calls end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_keep_their_room_while_their_calls_run() {
    const BODY: usize = 64 * 1024;
    let gw = TestGateway::start(
        &format!(
            "mcp: {{ max_body_bytes: {BODY}, max_bodies_bytes: {} }}",
            2 * BODY
        ),
        &[example("ex", &["--test-tools"], "")],
    )
    .await;
    let room = || gw.gateway().bodies.available();
    let mut c = gw.client();
    c.initialize(json!({})).await;
    support::eventually("the initialize bodies' room given back", || async {
        room() == 2 * BODY
    })
    .await;
    // A slow call whose body is a little under BODY.
    let call = |id, seconds| slow_call(id, seconds, BODY - 2048);
    let one = call(1, 10);
    let held = one.len();
    let (c1, c2) = (c.clone(), c.clone());
    let running = tokio::spawn(async move {
        let (a, b) = tokio::join!(c1.post(one), c2.post(call(2, 10)));
        (a.status, b.status)
    });
    support::eventually("both running calls hold their bodies' room", || async {
        room() == 2 * BODY - 2 * held
    })
    .await;
    let refused = c.post(call(3, 0)).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("request bodies"), "{}", refused.body);
    // A small request fits in what is left, and gives its room back when answered.
    let pong = c.call(4, "ping", json!({})).await;
    assert_eq!(pong["result"], json!({}), "{pong}");
    assert_eq!(room(), 2 * BODY - 2 * held);
    assert_eq!(running.await.unwrap(), (200, 200));
    support::eventually("the calls' room given back", || async {
        room() == 2 * BODY
    })
    .await;
    let served = c.post(call(5, 0)).await;
    assert_eq!(served.status, 200, "{}", served.body);
    gw.stop().await;
}

/// A call the gateway rewrites on its way (renamed for its server, here) runs on a copy of its
/// params: the copy keeps the body's room while the call runs, also once its answer has become
/// a stream and the request that brought it is gone; and gives it back when the call ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_call_holds_its_bodys_room_while_it_runs() {
    const BODY: usize = 64 * 1024;
    let gw = TestGateway::start(
        &format!(
            "mcp: {{ max_body_bytes: {BODY}, max_bodies_bytes: {} }}",
            4 * BODY
        ),
        &[
            example("ex", &["--test-tools"], ""),
            example("other", &[], ""),
        ],
    )
    .await;
    let room = || gw.gateway().bodies.available();
    let mut c = gw.client();
    c.initialize(json!({})).await;
    support::eventually("the initialize bodies' room given back", || async {
        room() == 4 * BODY
    })
    .await;
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
        "name":"ex__slow","_meta":{"progressToken":"p"},
        "arguments":{"seconds":1.5,"steps":3,"pad":"x".repeat(BODY - 2048)}}});
    let held = call.to_string().len();
    let mut answer = c.stream(call).await;
    let first = answer.next().await.expect("a progress notification");
    assert_eq!(first["method"], "notifications/progress", "{first}");
    assert_eq!(room(), 4 * BODY - held, "the running call holds its body");
    let mut last = first;
    while let Some(m) = answer.next().await {
        last = m;
    }
    assert_eq!(
        last["result"]["content"][0]["text"], "done after 1.5s",
        "{last}"
    );
    support::eventually("the call's room given back", || async {
        room() == 4 * BODY
    })
    .await;
    gw.stop().await;
}

/// Nothing a client sends keeps its body's room after the request is answered: a live session
/// (its initialize, lists, reads, subscriptions, notifications, a cancelled id) and 2026-07-28
/// requests (a question and the retry that answers it) leave `mcp.max_bodies_bytes` whole.
/// A kept slice of a body would hold its room for good, and enough of them would refuse every
/// client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_give_all_their_room_back() {
    let gw = TestGateway::start("", &[example("ex", &["--test-tools"], "")]).await;
    let room = || gw.gateway().bodies.available();
    let whole = room();
    let mut c = gw.client();
    c.initialize(json!({"roots": {"listChanged": true}, "sampling": {}}))
        .await;
    for (id, method, params) in [
        (1, "tools/list", json!({})),
        (
            2,
            "tools/call",
            json!({"name":"echo","arguments":{"text":"kept?"}}),
        ),
        (3, "prompts/list", json!({})),
        (4, "resources/list", json!({})),
        (5, "logging/setLevel", json!({"level":"debug"})),
        (6, "ping", json!({})),
    ] {
        let r = c.call(id, method, params).await;
        assert!(r.get("result").is_some(), "{method}: {r}");
    }
    let uri = c.call(7, "resources/list", json!({})).await["result"]["resources"][0]["uri"]
        .as_str()
        .expect("a resource")
        .to_owned();
    c.call(8, "resources/subscribe", json!({ "uri": uri }))
        .await;
    c.call(9, "resources/read", json!({ "uri": uri })).await;
    for note in [
        json!({"jsonrpc":"2.0","method":"notifications/roots/list_changed"}),
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"gone"}}),
    ] {
        assert_eq!(c.post(note.to_string()).await.status, 202);
    }
    support::eventually("the session's requests give their room back", || async {
        room() == whole
    })
    .await;
    // 2026-07-28: a question asked as input_required, and the retry that answers it.
    let body = |id: u64, mut params: serde_json::Value| {
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"sampling": {}},
        });
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params})
    };
    let stateless = |id: u64, params: serde_json::Value| {
        let body = body(id, params);
        let plain = gw.client();
        let req = plain
            .request("POST", Bytes::new())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "sample")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        async move { plain.send(req).await }
    };
    let call = json!({"name":"sample","arguments":{"prompt":"capital?"}});
    let first = stateless(10, call.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.response();
    let questions = first["result"]["inputRequests"]
        .as_object()
        .expect("a question");
    let key = questions.keys().next().unwrap().clone();
    // The parked call runs on a copy of the params (without the envelope): the copy keeps the
    // body's room until the retry ends the call.
    let asked = body(10, call.clone()).to_string().len();
    support::eventually("the parked call holds its body", || async {
        room() == whole - asked
    })
    .await;
    let mut retry = call;
    retry["requestState"] = first["result"]["requestState"].clone();
    retry["inputResponses"] = json!({ key: {"role":"assistant","model":"m",
        "content":{"type":"text","text":"Paris"}}});
    let done = stateless(11, retry).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(
        done.response()["result"]["content"][0]["text"],
        "model said: Paris"
    );
    support::eventually("the stateless requests give their room back", || async {
        room() == whole
    })
    .await;
    gw.stop().await;
}

/// One principal's bodies hold at most a quarter of `mcp.max_bodies_bytes` (at least one body):
/// past it that caller gets 429 with Retry-After, while another principal is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_holds_at_most_its_share_of_the_room() {
    const BODY: usize = 64 * 1024;
    let gw = TestGateway::start(
        &format!(
            "auth: {{ tokens: [{{ principal: alice, token: alice-token-0123456789 }}, {{ principal: bob, token: bob-token-0123456789ab }}] }}\nmcp: {{ max_body_bytes: {BODY}, max_bodies_bytes: {} }}",
            4 * BODY
        ),
        &[example("ex", &["--test-tools"], "")],
    )
    .await;
    let bodies = || &gw.gateway().bodies;
    assert_eq!(bodies().share(), BODY);
    let client = |token: &str| {
        let mut c = gw.client();
        c.token = Some(token.into());
        c
    };
    let (mut alice, mut bob) = (
        client("alice-token-0123456789"),
        client("bob-token-0123456789ab"),
    );
    alice.initialize(json!({})).await;
    bob.initialize(json!({})).await;
    let call = |id, seconds| slow_call(id, seconds, BODY - 2048);
    let held = call(1, 10).len();
    let running = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.post(call(1, 10)).await.status })
    };
    let alices: gatehouse::auth::Principal = "alice".into();
    support::eventually("alice's call holds her body", || async {
        bodies().available_to(&alices) == BODY - held
    })
    .await;
    let refused = alice.post(call(2, 0)).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("this caller's requests"),
        "{}",
        refused.body
    );
    assert_eq!(
        refused.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(refused.error_code(), -32012, "{}", refused.body);
    // Bob is served meanwhile, and so is a small request of Alice's.
    let served = bob.post(call(3, 0)).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(alice.call(4, "ping", json!({})).await["result"], json!({}));
    assert_eq!(running.await.unwrap(), 200);
    support::eventually("her share given back", || async {
        bodies().available_to(&alices) == BODY
    })
    .await;
    assert_eq!(alice.post(call(5, 0)).await.status, 200);
    gw.stop().await;
}

/// A body refused while it arrives (no room) is still read to its end, and dropped: its sender
/// hears the 503 and finishes sending, and the connection then serves its next request (it is
/// not closed on unread bytes, which would reset it under a client still writing).
#[tokio::test]
async fn a_refused_body_is_read_to_its_end_and_its_connection_kept() {
    const BODY: usize = 64 * 1024;
    let gw = TestGateway::start(
        &format!("mcp: {{ max_body_bytes: {BODY}, max_bodies_bytes: {BODY} }}"),
        &[example("ex", &[], "")],
    )
    .await;
    let room = || gw.gateway().bodies.available();
    let head = "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n";
    // A slow body holds all of the room but a byte.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(
        format!(
            "{head}content-length: {BODY}\r\n\r\n{}",
            "x".repeat(BODY - 1)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    support::eventually("the slow body holds the room", || async { room() == 1 }).await;
    // Half a body: refused at once, the answer before the rest is sent.
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","pad":"{}"}}"#,
        "y".repeat(8000)
    );
    let (first, rest) = body.split_at(4000);
    let mut s = BufReader::new(TcpStream::connect(gw.addr).await.unwrap());
    s.get_mut()
        .write_all(format!("{head}content-length: {}\r\n\r\n{first}", body.len()).as_bytes())
        .await
        .unwrap();
    let (status, text) = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(text.contains("request bodies"), "{text}");
    // The rest goes, and is read and dropped: the room is untouched.
    s.get_mut().write_all(rest.as_bytes()).await.unwrap();
    drop(slow);
    support::eventually("the slow body's room given back", || async {
        room() == BODY
    })
    .await;
    // The same connection serves the next request.
    s.get_mut()
        .write_all(format!("{head}content-length: {}\r\n\r\n{INIT}", INIT.len()).as_bytes())
        .await
        .unwrap();
    let (status, text) = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {text}");
    gw.stop().await;
}

/// A stdio server whose `flood` tool answers at once, then announces `tools/list_changed`
/// (padded to `pad` bytes) every `every` seconds for `seconds`: notices that come outside any
/// call, so they travel on a session's GET stream (or an HTTP+SSE client's stream), or on a
/// 2026-07-28 caller's listen streams.
const FLOODER: &str = r#"
import json, sys, threading, time
lock = threading.Lock()
def send(line):
    with lock:
        sys.stdout.write(line)
        sys.stdout.flush()
def flood(seconds, pad, every):
    notice = json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                         "params": {"_meta": {"pad": "x" * pad}}}) + "\n"
    end = time.time() + seconds
    while time.time() < end:
        send(notice)
        time.sleep(every)
def stream(id, token, seconds, pad, every):
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        i += 1
        send(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                         "params": {"progressToken": token, "progress": i, "message": "x" * pad}}) + "\n")
        time.sleep(every)
    send(json.dumps({"jsonrpc": "2.0", "id": id,
                     "result": {"content": [{"type": "text", "text": "streamed"}]}}) + "\n")
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m or "method" not in m:
        continue
    method, params = m["method"], m.get("params") or {}
    if method == "tools/call" and params.get("name") == "stream":
        a = params["arguments"]
        token = params["_meta"]["progressToken"]
        threading.Thread(target=stream, args=(m["id"], token, a["seconds"], a["pad"], a["every"]), daemon=True).start()
        continue
    answer = {"jsonrpc": "2.0", "id": m["id"]}
    if method == "initialize":
        answer["result"] = {"protocolVersion": params["protocolVersion"],
                            "capabilities": {"tools": {"listChanged": True}},
                            "serverInfo": {"name": "flood", "version": "1"}}
    elif method == "tools/list":
        answer["result"] = {"tools": [{"name": "flood", "inputSchema": {"type": "object"}},
                                      {"name": "stream", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        answer["result"] = {"content": [{"type": "text", "text": "flooding"}]}
    else:
        answer["error"] = {"code": -32601, "message": method}
    send(json.dumps(answer) + "\n")
    if method == "tools/call":
        a = params["arguments"]
        threading.Thread(target=flood, args=(a["seconds"], a["pad"], a["every"]), daemon=True).start()
"#;

fn flooder() -> String {
    let args = serde_json::to_string(&["-u", "-c", FLOODER]).unwrap();
    format!("  - name: f\n    stdio: {{ command: /usr/bin/python3, args: {args} }}\n")
}

/// A flood of 32 KiB notices every 5 ms: the buffers between a client that reads nothing
/// and the gateway are full within a second.
fn flood() -> Value {
    json!({"seconds": 30, "pad": 32768, "every": 0.005})
}

/// Streams whose reader takes nothing for a second while messages wait are ended;
/// keep-alives every 200 ms; a connection idle between requests for a second is closed.
fn stall_config(extra: &str) -> String {
    format!(
        "mcp: {{ stalled_stream_timeout: 1s, sse_keepalive: 200ms, header_timeout: 1s, idle_connection_timeout: 2s{extra} }}"
    )
}

/// A receive buffer small enough that a client that reads nothing blocks the gateway soon.
const SMALL_RCVBUF: u32 = 4096;

/// The status a request is answered with (a stream it opens is closed at once).
async fn status_of(addr: SocketAddr, request: &str) -> u16 {
    let (_, head) = LOCAL.open_raw(addr, request, "").await;
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A session's GET stream.
fn get_request(c: &Client) -> String {
    format!(
        "GET /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\nmcp-protocol-version: 2025-11-25\r\nmcp-session-id: {}\r\n\r\n",
        c.session.as_deref().unwrap()
    )
}

/// A 2026-07-28 request (no session) of `method`, its `Mcp-Name` `name`: its head (without
/// its length) and body.
fn stateless_parts(
    id: &str,
    method: &str,
    name: Option<&str>,
    mut params: Value,
) -> (String, String) {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    });
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let name = name.map_or(String::new(), |n| format!("mcp-name: {n}\r\n"));
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n{name}"
    );
    (head, body)
}

/// A listen stream asking for `notifications`.
fn listen_request(id: &str, notifications: Value) -> String {
    let params = json!({ "notifications": notifications });
    let (head, body) = stateless_parts(id, "subscriptions/listen", None, params);
    format!("{head}content-length: {}\r\n\r\n{body}", body.len())
}

const SSE_REQUEST: &str =
    "GET /sse HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n";

/// Opens an HTTP+SSE stream from `peer`: the connection, and the message URL its `endpoint`
/// event names.
async fn open_sse(peer: Peer, addr: SocketAddr) -> (TcpStream, String) {
    let (s, read) = peer.open_raw(addr, SSE_REQUEST, "\n\n").await;
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    let data = read.split("data: ").nth(1).expect("an endpoint event");
    (s, format!("/{}", &data[..data.find('\n').unwrap()]))
}

/// POSTs `body` to an HTTP+SSE client's message URL: the status.
async fn post_message(addr: SocketAddr, endpoint: &str, body: &str) -> u16 {
    let head = format!(
        "POST {endpoint} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    );
    let answer = raw_exchange(addr, &head, body).await;
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Initializes an HTTP+SSE client's session (its answers go to its stream).
async fn initialize_sse(addr: SocketAddr, endpoint: &str) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    assert_eq!(post_message(addr, endpoint, &init.to_string()).await, 202);
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        post_message(addr, endpoint, &initialized.to_string()).await,
        202
    );
}

/// The `i`th of a caller's listen streams that ask for nothing (so stay idle), from `peer`.
async fn open_idle_listen(peer: Peer, addr: SocketAddr, i: usize) -> TcpStream {
    let request = listen_request(&format!("idle-{i}"), json!({}));
    peer.open_stream(addr, &request).await
}

/// Starts the flooder's flood on the listen streams of 2026-07-28 callers.
async fn flood_listen_streams(addr: SocketAddr) {
    let call = json!({"name": "flood", "arguments": flood()});
    let (head, body) = stateless_parts("1", "tools/call", Some("flood"), call);
    let answer = raw_exchange(addr, &head, &body).await;
    assert!(answer.contains("flooding"), "{answer}");
}

/// Starts the flooder's flood on an HTTP+SSE client's stream (the client's session
/// initialized).
async fn flood_sse_stream(addr: SocketAddr, endpoint: &str) {
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "flood", "arguments": flood()}});
    assert_eq!(post_message(addr, endpoint, &call.to_string()).await, 202);
}

/// Reads `s` until it ends, counting the `list_changed` notices it carries; the count is
/// published as it grows (and its sender dropped when the stream ends).
fn count_notices(mut s: TcpStream) -> tokio::sync::watch::Receiver<usize> {
    const NOTICE: &[u8] = b"list_changed";
    let (tx, rx) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let (mut buf, mut tail, mut heard) = (vec![0u8; 64 * 1024], Vec::new(), 0);
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            tail.extend_from_slice(&buf[..n]);
            let mut from = 0;
            while let Some(at) = tail[from..].windows(NOTICE.len()).position(|w| w == NOTICE) {
                heard += 1;
                from += at + NOTICE.len();
            }
            // Past the last one, what could be the start of the next.
            let keep = from.max(tail.len().saturating_sub(NOTICE.len() - 1));
            tail.drain(..keep);
            tx.send_replace(heard);
        }
    });
    rx
}

/// Waits (at most 10 s) for a reading stream to hear another notice.
async fn hears_more(heard: &mut tokio::sync::watch::Receiver<usize>) {
    let now = *heard.borrow_and_update();
    tokio::time::timeout(Duration::from_secs(10), heard.wait_for(|n| *n > now))
        .await
        .expect("the reading client hears more notices within 10 s")
        .expect("the reading client's stream is open");
}

/// How many streams of `kind` the gateway ended for their stalled readers.
fn stalled(gw: &TestGateway, kind: &str) -> u64 {
    let prefix = format!("gatehouse_streams_stalled_total{{stream=\"{kind}\"}} ");
    gw.gateway()
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// Waits until the gateway has ended a stream of `kind` for its stalled reader.
async fn one_stalled(gw: &TestGateway, kind: &str) {
    support::counter_reaches(
        gw,
        &format!("gatehouse_streams_stalled_total{{stream=\"{kind}\"}}"),
        1.0,
    )
    .await;
}

/// Once a stream of `kind` was ended for its stalled reader and the stream's place was taken
/// again: its connection ends as soon as its client reads again, the reading client (its
/// count `heard`) hears notices throughout, and no other stream was ended.
async fn only_the_stalled_stream_ended(
    gw: &TestGateway,
    kind: &str,
    stalled_stream: &mut TcpStream,
    heard: &mut tokio::sync::watch::Receiver<usize>,
) {
    hears_more(heard).await;
    assert!(
        closed_within(stalled_stream, Duration::from_secs(10)).await,
        "the ended stream's connection is still open once its client read again"
    );
    hears_more(heard).await;
    assert_eq!(stalled(gw, kind), 1, "only the stream nobody read");
}

/// A client that opens its session's GET stream and then reads nothing, while its server
/// floods it (each notice coalesced with the one still waiting, so the stream's queue never
/// fills), loses the stream once it has taken nothing for `stalled_stream_timeout`: the
/// session may open another, and the connection ends as soon as the client reads again.
/// Another session's client, reading, hears notices throughout.
#[tokio::test]
async fn a_get_stream_whose_client_stops_reading_is_ended() {
    let gw = TestGateway::start(&stall_config(""), &[flooder()]).await;
    let (stopped, reading) = (healthy_session(&gw).await, healthy_session(&gw).await);
    let mut stalled_stream = LOCAL
        .small_buffer()
        .open_stream(gw.addr, &get_request(&stopped))
        .await;
    let mut heard = count_notices(LOCAL.open_stream(gw.addr, &get_request(&reading)).await);
    assert_eq!(
        status_of(gw.addr, &get_request(&stopped)).await,
        409,
        "the session's one GET stream is taken"
    );
    for c in [&stopped, &reading] {
        assert_eq!(c.tool_text(1, "flood", flood()).await, "flooding");
    }
    hears_more(&mut heard).await;
    one_stalled(&gw, "get").await;
    support::eventually("another GET stream for the session", || async {
        status_of(gw.addr, &get_request(&stopped)).await == 200
    })
    .await;
    only_the_stalled_stream_ended(&gw, "get", &mut stalled_stream, &mut heard).await;
    gw.stop().await;
}

/// A listen stream whose client reads nothing while its servers flood it is ended, and its
/// slot (one of the caller's 64) is free again; the caller's stream that reads hears notices
/// throughout, and its 62 idle ones (nothing to hear) are kept.
#[tokio::test]
async fn a_listen_stream_whose_client_stops_reading_is_ended_and_its_slot_freed() {
    let gw = TestGateway::start(&stall_config(""), &[flooder()]).await;
    let tools = json!({"toolsListChanged": true});
    let mut stalled_stream = LOCAL
        .small_buffer()
        .open_stream(gw.addr, &listen_request("stops", tools.clone()))
        .await;
    let reading = LOCAL
        .open_stream(gw.addr, &listen_request("reads", tools))
        .await;
    let mut heard = count_notices(reading);
    let mut idle = Vec::new();
    for i in 0..62 {
        idle.push(open_idle_listen(LOCAL, gw.addr, i).await);
    }
    assert_eq!(
        status_of(gw.addr, &listen_request("one-more", json!({}))).await,
        429,
        "every slot is taken"
    );
    flood_listen_streams(gw.addr).await;
    hears_more(&mut heard).await;
    one_stalled(&gw, "listen").await;
    support::eventually("a listen stream in the slot let go of", || async {
        status_of(gw.addr, &listen_request("again", json!({}))).await == 200
    })
    .await;
    only_the_stalled_stream_ended(&gw, "listen", &mut stalled_stream, &mut heard).await;
    drop(idle);
    gw.stop().await;
}

/// An HTTP+SSE client that reads nothing while its server floods it loses its stream and its
/// session (a place under `max_sessions` again); another client, reading, hears notices
/// throughout.
#[tokio::test]
async fn an_http_sse_stream_whose_client_stops_reading_is_ended_with_its_session() {
    let gw = TestGateway::start(&stall_config(", max_sessions: 2"), &[flooder()]).await;
    let (mut stalled_stream, stopped) = open_sse(LOCAL.small_buffer(), gw.addr).await;
    let (s, reading) = open_sse(LOCAL, gw.addr).await;
    let mut heard = count_notices(s);
    for endpoint in [&stopped, &reading] {
        initialize_sse(gw.addr, endpoint).await;
        flood_sse_stream(gw.addr, endpoint).await;
    }
    assert_eq!(
        status_of(gw.addr, SSE_REQUEST).await,
        503,
        "two sessions: no room for a third"
    );
    hears_more(&mut heard).await;
    one_stalled(&gw, "sse").await;
    let ping = json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}).to_string();
    support::eventually("the stopped client's session to end", || async {
        post_message(gw.addr, &stopped, &ping).await == 404
    })
    .await;
    support::eventually("a stream in its place", || async {
        status_of(gw.addr, SSE_REQUEST).await == 200
    })
    .await;
    only_the_stalled_stream_ended(&gw, "sse", &mut stalled_stream, &mut heard).await;
    gw.stop().await;
}

/// A client that reads its GET stream slowly, far more slowly than its server floods it (the
/// connection is blocked most of the time), but takes something in every period, keeps its
/// stream. What a connection takes is what its buffers make room for: a client that reads is
/// seen to take something once it has read a good part of them (the kernel's send buffer
/// wakes a writer only once a third of it is free).
#[tokio::test]
async fn a_slow_reader_keeps_its_stream() {
    let (gw, c) = gateway_and_session(
        "mcp: { stalled_stream_timeout: 2s, sse_keepalive: 200ms }",
        flooder(),
    )
    .await;
    let mut s = LOCAL
        .small_buffer()
        .open_stream(gw.addr, &get_request(&c))
        .await;
    let fast = json!({"seconds": 30, "pad": 32768, "every": 0.001});
    assert_eq!(c.tool_text(1, "flood", fast).await, "flooding");
    let started = Instant::now();
    let (until, mut read) = (started + Duration::from_secs(8), 0);
    let mut buf = [0u8; 8192];
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("notices wait to be read")
            .unwrap();
        assert!(n > 0, "the stream of a slow reader was ended");
        read += n;
    }
    eprintln!(
        "the slow reader read {read} bytes in {:?}",
        started.elapsed()
    );
    assert_eq!(stalled(&gw, "get"), 0);
    assert_eq!(
        status_of(gw.addr, &get_request(&c)).await,
        409,
        "the session's GET stream is still the slow reader's"
    );
    keeps_delivering(&mut s, Duration::from_millis(500)).await;
    gw.stop().await;
}

/// Streams with nothing to send are kept however long their clients leave them unread: a
/// session's GET stream, a listen stream and an HTTP+SSE stream, unread for eight periods
/// (keep-alives come less often than that), are still theirs and deliver keep-alives.
#[tokio::test]
async fn idle_streams_are_kept_however_long_they_go_unread() {
    let (gw, c) = gateway_and_session(
        "mcp: { stalled_stream_timeout: 500ms, sse_keepalive: 1500ms }",
        flooder(),
    )
    .await;
    let unread = LOCAL.small_buffer();
    let mut get = unread.open_stream(gw.addr, &get_request(&c)).await;
    let tools = json!({"toolsListChanged": true});
    let mut listen = unread
        .open_stream(gw.addr, &listen_request("idle", tools))
        .await;
    let (mut sse, endpoint) = open_sse(unread, gw.addr).await;
    initialize_sse(gw.addr, &endpoint).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for kind in ["get", "listen", "sse"] {
        assert_eq!(stalled(&gw, kind), 0, "{kind}");
    }
    assert_eq!(status_of(gw.addr, &get_request(&c)).await, 409);
    let listening = gw.gateway().stateless_session(None, None, None).unwrap();
    assert_eq!(listening.subscriptions.len(), 1);
    let ping = json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}).to_string();
    assert_eq!(post_message(gw.addr, &endpoint, &ping).await, 202);
    for s in [&mut get, &mut listen, &mut sse] {
        keeps_delivering(s, Duration::from_secs(2)).await;
    }
    gw.stop().await;
}

/// Asserts that `src`, one of whose connections (`what`) held its last place, is admitted again
/// within 10 s of `since` (the margin is for a loaded machine).
async fn place_given_back(src: Ipv4Addr, to: SocketAddr, what: &str, since: Instant) {
    assert!(
        admitted_within(src, to, Duration::from_secs(10)).await,
        "{what} still holds its place after {:?}",
        since.elapsed()
    );
    eprintln!("{what} gave its place back after {:?}", since.elapsed());
}

/// Asks for `/healthz` again on the kept-alive connection `r`, and reads its answer.
async fn healthz_again(r: &mut BufReader<TcpStream>) {
    r.get_mut()
        .write_all(HEALTHZ)
        .await
        .expect("the keep-alive connection takes another request");
    let (status, body) = response(r).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok\n");
}

/// A keep-alive HTTP/1 connection from `src` that asks for `/healthz` every 250 ms until told
/// to stop: how many answers it read on that one connection (a closed connection fails it).
fn keep_asking(
    src: Ipv4Addr,
    to: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut r = BufReader::new(connect_from(src, to).await);
        let mut answered = 0;
        loop {
            healthz_again(&mut r).await;
            answered += 1;
            tokio::select! {
                _ = &mut stopped => return answered,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    });
    (stop, task)
}

/// A client that stops reading its session's GET stream while its server floods it holds
/// neither the stream nor its connection: once the stream is ended for its stalled reader the
/// gateway closes the connection (the client never reads again, so hyper would never see the
/// stream end), within the closing grace, and its place under `mcp.max_connections_per_ip` is
/// given back. The same address's idle listen stream, and another address's keep-alive
/// connection asking all along, are kept.
#[tokio::test]
async fn a_stalled_streams_connection_is_closed_and_its_place_given_back() {
    let (gw, stopped) =
        gateway_and_session(&stall_config(", max_connections_per_ip: 2"), flooder()).await;
    let (peer, asker) = (Ipv4Addr::new(127, 0, 0, 7), Ipv4Addr::new(127, 0, 0, 8));
    let mut stalled_stream = Peer::at(peer)
        .small_buffer()
        .open_stream(gw.addr, &get_request(&stopped))
        .await;
    let idle_listen = listen_request("idle", json!({}));
    let mut idle = Peer::at(peer).open_stream(gw.addr, &idle_listen).await;
    let mut third = connect_from(peer, gw.addr).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a third connection from the peer was admitted over max_connections_per_ip: 2"
    );
    let (stop_asking, asking) = keep_asking(asker, gw.addr);
    assert_eq!(stopped.tool_text(1, "flood", flood()).await, "flooding");
    one_stalled(&gw, "get").await;
    let stalled_at = Instant::now();
    // The stream is found within twice the stall timeout of its last frame; its connection
    // is closed within the closing grace (2 s) after.
    place_given_back(peer, gw.addr, "the stalled stream's connection", stalled_at).await;
    // Closed by the gateway, though the client read nothing: what was sent, then the end.
    assert!(
        closed_within(&mut stalled_stream, Duration::from_secs(10)).await,
        "the stalled stream's connection is still open"
    );
    keeps_delivering(&mut idle, Duration::from_secs(1)).await;
    stop_asking.send(()).unwrap();
    let answered = asking
        .await
        .expect("the keep-alive connection was never closed");
    assert!(answered >= 8, "only {answered} answers");
    assert_eq!(status_of(gw.addr, &get_request(&stopped)).await, 200);
    assert_eq!(stalled(&gw, "get"), 1, "only the stream nobody read");
    gw.stop().await;
}

/// Progress notices on a call's stream, 32 KiB every 5 ms for 10 s: past what the buffers
/// between the gateway and a client that reads nothing hold within a second, not so long that
/// the floods of one test (each goes on once its stream is given up) weigh on the next.
fn stream_flood() -> Value {
    json!({"seconds": 10, "pad": 32768, "every": 0.005})
}

/// A tool call's stream of progress notices ([`stream_flood`]), as a request of
/// `c`'s session (its `MCP-Protocol-Version` header `version`): the request's head and body,
/// on a raw connection.
fn session_stream_call(c: &Client, version: Option<&str>, id: &str) -> String {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": "stream", "arguments": stream_flood(), "_meta": {"progressToken": id}}})
    .to_string();
    // Clients of revisions before 2025-06-18 send no version header.
    let version = version.map_or(String::new(), |v| format!("mcp-protocol-version: {v}\r\n"));
    format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n{version}mcp-session-id: {}\r\ncontent-length: {}\r\n\r\n{body}",
        c.session.as_deref().unwrap(),
        body.len()
    )
}

/// The same call as a 2026-07-28 request, without a session.
fn stateless_stream_call(id: &str) -> String {
    let (head, body) = stateless_parts(
        id,
        "tools/call",
        Some("stream"),
        json!({"name": "stream", "arguments": stream_flood()}),
    );
    let mut body: Value = serde_json::from_str(&body).unwrap();
    body["params"]["_meta"]["progressToken"] = json!(id);
    let body = body.to_string();
    format!("{head}content-length: {}\r\n\r\n{body}", body.len())
}

/// A session of revision 2024-11-05 (over Streamable HTTP, as such clients of later gateways
/// do), opened through `through`'s connections: its streamed answers are not recorded for
/// resumption.
async fn session_of_2024(through: &Client) -> Client {
    let mut c = through.clone();
    c.session = None;
    let r = c
        .post(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2024-11-05", "capabilities": {},
                "clientInfo": {"name": "old", "version": "1"}}})
            .to_string(),
        )
        .await;
    assert_eq!(
        r.json()["result"]["protocolVersion"],
        "2024-11-05",
        "{}",
        r.body
    );
    c.session = Some(r.headers["mcp-session-id"].to_str().unwrap().to_owned());
    let ok = c
        .post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string())
        .await;
    assert_eq!(ok.status, 202);
    c
}

/// A call's streamed answer whose client stops reading while the server floods it with
/// progress loses its stream once it took nothing for `stalled_stream_timeout`, and its
/// connection its place under `mcp.max_connections_per_ip`, though the client never reads
/// again: a 2026-07-28 call's stream, a session's resumable one, and a 2024-11-05 session's
/// unrecorded one. The sessions go on.
#[tokio::test]
async fn a_calls_stream_whose_client_stops_reading_loses_its_connection() {
    let (gw, c) =
        gateway_and_session(&stall_config(", max_connections_per_ip: 1"), flooder()).await;
    let (stateless, session) = (Ipv4Addr::new(127, 0, 0, 21), Ipv4Addr::new(127, 0, 0, 22));
    let _stalled = Peer::at(stateless)
        .small_buffer()
        .open_stream(gw.addr, &stateless_stream_call("s1"))
        .await;
    assert!(
        !admitted_within(stateless, gw.addr, Duration::from_millis(500)).await,
        "a second connection from {stateless} was admitted"
    );
    one_stalled(&gw, "call").await;
    let what = "the stalled stateless call's connection";
    place_given_back(stateless, gw.addr, what, Instant::now()).await;

    let _stalled = Peer::at(session)
        .small_buffer()
        .open_stream(gw.addr, &session_stream_call(&c, Some("2025-11-25"), "s2"))
        .await;
    support::counter_reaches(&gw, "gatehouse_streams_stalled_total{stream=\"call\"}", 2.0).await;
    let what = "the stalled session call's connection";
    place_given_back(session, gw.addr, what, Instant::now()).await;
    let listed = c.call(3, "tools/list", json!({})).await;
    assert_eq!(support::tool_names(&listed).len(), 2, "{listed}");

    let old = session_of_2024(&c).await;
    let from = Ipv4Addr::new(127, 0, 0, 23);
    let _stalled = Peer::at(from)
        .small_buffer()
        .open_stream(gw.addr, &session_stream_call(&old, None, "s3"))
        .await;
    support::counter_reaches(&gw, "gatehouse_streams_stalled_total{stream=\"call\"}", 3.0).await;
    let what = "the stalled 2024-11-05 call's connection";
    place_given_back(from, gw.addr, what, Instant::now()).await;
    let listed = old.call(4, "tools/list", json!({})).await;
    assert_eq!(support::tool_names(&listed).len(), 2, "{listed}");
    gw.stop().await;
}

/// A listen stream and an HTTP+SSE stream whose clients stop reading while their servers flood
/// them lose their connections too, and their places under `mcp.max_connections_per_ip`, though
/// the clients never read again; each address's idle listen streams are kept.
#[tokio::test]
async fn stalled_listen_and_sse_streams_lose_their_connections_too() {
    let gw = TestGateway::start(&stall_config(", max_connections_per_ip: 3"), &[flooder()]).await;
    let (listener, sse_client) = (Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12));
    let tools = json!({"toolsListChanged": true});
    let request = listen_request("stops", tools);
    let _listen = Peer::at(listener)
        .small_buffer()
        .open_stream(gw.addr, &request)
        .await;
    let (_sse, endpoint) = open_sse(Peer::at(sse_client).small_buffer(), gw.addr).await;
    let mut idle = Vec::new();
    for (i, peer) in [listener, listener, sse_client, sse_client]
        .into_iter()
        .enumerate()
    {
        idle.push(open_idle_listen(Peer::at(peer), gw.addr, i).await);
    }
    for peer in [listener, sse_client] {
        assert!(
            !admitted_within(peer, gw.addr, Duration::from_millis(500)).await,
            "a fourth connection from {peer} was admitted"
        );
    }
    flood_listen_streams(gw.addr).await;
    initialize_sse(gw.addr, &endpoint).await;
    flood_sse_stream(gw.addr, &endpoint).await;
    for (kind, peer) in [("listen", listener), ("sse", sse_client)] {
        one_stalled(&gw, kind).await;
        let what = format!("the stalled {kind} stream's connection");
        place_given_back(peer, gw.addr, &what, Instant::now()).await;
    }
    for s in &mut idle {
        keeps_delivering(s, Duration::from_millis(500)).await;
    }
    gw.stop().await;
}

/// A watched stream that ends on its own (its session is deleted) leaves its keep-alive
/// connection to serve the next request: only a stream ended for its stalled reader closes
/// its connection.
#[tokio::test]
async fn a_stream_that_ends_on_its_own_leaves_its_connection_serving() {
    let (gw, c) = gateway_and_session(
        "mcp: { sse_keepalive: 200ms, stalled_stream_timeout: 1s }",
        example("a", &[], ""),
    )
    .await;
    let mut s = LOCAL.open_stream(gw.addr, &get_request(&c)).await;
    // Read a while, past the stall timeout: an idle stream is kept.
    keeps_delivering(&mut s, Duration::from_millis(2500)).await;
    let del = c
        .request("DELETE", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(c.send(del).await.status, 200);
    // The chunked stream's last chunk, then the connection is ready for another request.
    let mut tail = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !tail.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection was closed with its stream");
            tail.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the GET stream ends with its session");
    healthz_again(&mut BufReader::new(s)).await;
    assert_eq!(stalled(&gw, "get"), 0);
    gw.stop().await;
}

/// Raw HTTP/2 frames, so that a test can play a client no library would be.
mod h2_raw {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;

    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// The connection preface a client begins with.
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = values
            .iter()
            .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
            .collect();
        frame(SETTINGS, 0, 0, &payload)
    }

    /// An HPACK integer of `prefix` bits.
    pub fn integer(out: &mut Vec<u8>, prefix: u8, v: usize) {
        let max = (1usize << prefix) - 1;
        if v < max {
            out.push(v as u8);
            return;
        }
        out.push(max as u8);
        let mut rest = v - max;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }

    pub fn string(out: &mut Vec<u8>, s: &[u8]) {
        integer(out, 7, s.len());
        out.extend_from_slice(s);
    }

    /// A header block of literal fields, never indexed nor Huffman-coded.
    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0);
            string(&mut out, name.as_bytes());
            string(&mut out, value.as_bytes());
        }
        out
    }

    /// The fields of a request for `path` on the gateway, then `extra`.
    pub fn request<'a>(
        method: &'a str,
        path: &'a str,
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut fields = vec![
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
        ];
        fields.extend_from_slice(extra);
        fields
    }

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    /// An HTTP/2 connection played frame by frame.
    pub struct Conn {
        pub s: TcpStream,
        /// The gateway's settings.
        pub settings: Vec<(u16, u32)>,
    }

    impl Conn {
        /// Connects with `settings`, reads the gateway's and acknowledges them.
        pub async fn open(to: SocketAddr, settings: &[(u16, u32)]) -> Conn {
            let s = TcpStream::connect(to).await.unwrap();
            Conn::over(s, settings).await
        }

        /// Over `s`, sends the preface and `settings`, reads the gateway's and acknowledges
        /// them.
        pub async fn over(s: TcpStream, settings: &[(u16, u32)]) -> Conn {
            let mut c = Conn::greet(s, settings).await;
            loop {
                let f = c.next().await.expect("the gateway's settings");
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    c.settings = f
                        .payload
                        .chunks(6)
                        .map(|v| {
                            (
                                u16::from_be_bytes([v[0], v[1]]),
                                u32::from_be_bytes([v[2], v[3], v[4], v[5]]),
                            )
                        })
                        .collect();
                    break;
                }
            }
            c.send(&frame(SETTINGS, ACK, 0, &[])).await;
            c
        }

        /// Over `s`, sends the preface and `settings`, and reads nothing yet.
        pub async fn greet(mut s: TcpStream, settings: &[(u16, u32)]) -> Conn {
            let mut hello = PREFACE.to_vec();
            hello.extend(self::settings(settings));
            s.write_all(&hello).await.unwrap();
            Conn {
                s,
                settings: Vec::new(),
            }
        }

        pub fn setting(&self, id: u16) -> Option<u32> {
            self.settings
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, v)| *v)
        }

        pub async fn send(&mut self, bytes: &[u8]) {
            self.s.write_all(bytes).await.unwrap();
        }

        /// The next frame, or `None` once the connection has ended.
        pub async fn next(&mut self) -> Option<Frame> {
            let mut head = [0u8; 9];
            self.s.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            self.s.read_exact(&mut payload).await.ok()?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            Some(Frame {
                kind: head[3],
                flags: head[4],
                stream,
                payload,
            })
        }

        /// The next frame `wanted` picks out (others are passed over), within 5 s; the
        /// connection must stay open.
        pub async fn next_where(&mut self, what: &str, wanted: impl Fn(&Frame) -> bool) -> Frame {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let f = self.next().await.expect("the connection stays open");
                    if wanted(&f) {
                        return f;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{what} within 5 s"))
        }

        /// Reads frames (each seen by `each`) until the connection ends, within `within`: the
        /// error code of the GOAWAY that ended it, if one did.
        pub async fn ends_within(
            &mut self,
            within: Duration,
            mut each: impl FnMut(&Frame),
        ) -> Option<u32> {
            tokio::time::timeout(within, async {
                let mut goaway = None;
                while let Some(f) = self.next().await {
                    if f.kind == GOAWAY {
                        goaway = Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
                    }
                    each(&f);
                }
                goaway
            })
            .await
            .unwrap_or_else(|_| panic!("the HTTP/2 connection still open after {within:?}"))
        }
    }
}

use h2_raw::*;

/// The gateway's HTTP/2 limits are the ones it says: at most 100 streams at once per
/// connection (the 101st is refused, REFUSED_STREAM, the others go on), 16 KiB of header
/// fields (a larger request is answered 431), and a CONTINUATION flood ends the connection
/// (GOAWAY ENHANCE_YOUR_CALM); other clients are served throughout.
#[tokio::test]
async fn http2_streams_and_header_lists_are_bounded() {
    let (gw, healthy) =
        gateway_and_session("mcp: { body_timeout: 30s }", example("a", &[], "")).await;
    let mut c = Conn::open(gw.addr, &[]).await;
    assert_eq!(c.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(100));
    assert_eq!(c.setting(SETTINGS_MAX_HEADER_LIST_SIZE), Some(16 * 1024));
    // 101 calls whose bodies never come: each stays in flight.
    let fields = request(
        "POST",
        "/mcp",
        &[
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("content-length", "100"),
        ],
    );
    let block = block(&fields);
    let mut burst = Vec::new();
    for i in 0..101 {
        burst.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, &block));
    }
    c.send(&burst).await;
    let reset = c
        .next_where("the 101st stream refused", |f| f.kind == RST_STREAM)
        .await;
    let code = u32::from_be_bytes(reset.payload[..4].try_into().unwrap());
    assert_eq!((reset.stream, code), (201, REFUSED_STREAM));
    still_healthy(&healthy).await;

    // A request with 20 KiB of header fields: 431 on its stream, the connection kept.
    let mut big = Conn::open(gw.addr, &[]).await;
    let large = "x".repeat(20 * 1024);
    let block = h2_raw::block(&request("GET", "/healthz", &[("x-large", &large)]));
    let (first, rest) = block.split_at(16 * 1024);
    let mut frames = frame(HEADERS, END_STREAM, 1, first);
    frames.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
    big.send(&frames).await;
    let answer = big
        .next_where("an answer", |f| f.kind == HEADERS && f.stream == 1)
        .await
        .payload;
    // `:status` (static index 8) and 431, as text or Huffman-coded.
    assert!(
        answer
            .windows(3)
            .any(|w| w == b"431" || w == [0x69, 0x90, 0xff]),
        "not 431: {answer:?}"
    );
    let small = h2_raw::block(&request("GET", "/healthz", &[]));
    big.send(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &small))
        .await;
    let data = big
        .next_where("the next request answered", |f| {
            f.kind == DATA && f.stream == 3
        })
        .await
        .payload;
    assert_eq!(data, b"ok\n");

    // A header block that never ends: CONTINUATION frames of a value that keeps growing.
    let mut flood = Conn::open(gw.addr, &[]).await;
    let mut start = vec![0u8];
    string(&mut start, b"x-flood");
    // A literal value of a million bytes announced.
    integer(&mut start, 7, 1_000_000);
    let mut frames = frame(HEADERS, END_STREAM, 1, &start);
    for _ in 0..64 {
        frames.extend(frame(CONTINUATION, 0, 1, &[b'x'; 64]));
    }
    // The gateway may end the connection before it has read them all.
    let _ = flood.s.write_all(&frames).await;
    assert_eq!(
        flood.ends_within(Duration::from_secs(5), |_| {}).await,
        Some(ENHANCE_YOUR_CALM)
    );
    still_healthy(&healthy).await;
    gw.stop().await;
}

/// HTTP/2 rapid reset: a client that opens streams and resets them at once, as fast as it can
/// write, is told to go away (GOAWAY ENHANCE_YOUR_CALM) and its connection ends; nothing it
/// asked for is left in flight, and other clients are served.
#[tokio::test]
async fn http2_rapid_reset_ends_the_connection() {
    let (gw, healthy) = gateway_and_session("", example("a", &[], "")).await;
    let mut c = Conn::open(gw.addr, &[]).await;
    let block = h2_raw::block(&request("GET", "/healthz", &[]));
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let writer = tokio::spawn(async move {
        let _ = c.s.write_all(&burst).await;
        c
    });
    let mut c = writer.await.unwrap();
    let mut answered = 0;
    let code = c
        .ends_within(Duration::from_secs(10), |f| {
            if f.kind == HEADERS {
                answered += 1;
            }
        })
        .await;
    eprintln!("rapid reset: {answered} of 2000 streams answered before the end");
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
    assert!(answered < 2000);
    still_healthy(&healthy).await;
    gw.stop().await;
}

/// The HTTP/2 header block of session client `c`'s GET stream.
fn get_stream_block(c: &Client) -> Vec<u8> {
    let session = c.session.clone().unwrap();
    h2_raw::block(&request(
        "GET",
        "/mcp",
        &[
            ("accept", "text/event-stream"),
            ("mcp-protocol-version", "2025-11-25"),
            ("mcp-session-id", &session),
        ],
    ))
}

/// Clients that grant no HTTP/2 window (SETTINGS_INITIAL_WINDOW_SIZE 0, never a
/// WINDOW_UPDATE) get their answers' heads and nothing more. A plain answer (`/healthz`) is
/// whole when made, so its request is over and the connection is closed once idle; a session's
/// GET stream, whose reader takes nothing while keep-alives wait, is ended for its stalled
/// reader (the session may open another) and its connection closed the same way. A window
/// over 2^31-1 ends the connection (h2 reads it as a PROTOCOL_ERROR; RFC 9113 names it a
/// FLOW_CONTROL_ERROR). Other clients are served throughout.
#[tokio::test]
async fn http2_clients_that_grant_no_window_are_let_go_of() {
    let (gw, c) = gateway_and_session(&stall_config(""), example("a", &[], "")).await;
    let no_window = [(SETTINGS_INITIAL_WINDOW_SIZE, 0)];
    let mut plain = Conn::open(gw.addr, &no_window).await;
    let block = h2_raw::block(&request("GET", "/healthz", &[]));
    plain
        .send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    let mut stream = Conn::open(gw.addr, &no_window).await;
    let block = get_stream_block(&c);
    stream
        .send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    let started = Instant::now();
    for (name, conn) in [("/healthz", &mut plain), ("a GET stream", &mut stream)] {
        let (mut heads, mut data) = (0, 0);
        // Stall (1-2 s) for the stream, then the idle deadline (2 s, looked at every 2 s) and
        // the closing grace (2 s); the margin is for a loaded machine.
        let code = conn
            .ends_within(Duration::from_secs(20), |f| match f.kind {
                HEADERS => heads += 1,
                DATA => data += 1,
                _ => {}
            })
            .await;
        eprintln!("{name}: closed after {:?} ({code:?})", started.elapsed());
        assert_eq!((heads, data), (1, 0), "{name}: the head and nothing more");
        still_healthy(&c).await;
    }
    assert_eq!(stalled(&gw, "get"), 1);
    assert_eq!(status_of(gw.addr, &get_request(&c)).await, 200);

    let s = TcpStream::connect(gw.addr).await.unwrap();
    let mut huge = Conn::greet(s, &[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31)]).await;
    let code = huge.ends_within(Duration::from_secs(5), |_| {}).await;
    assert!(
        matches!(code, Some(PROTOCOL_ERROR | FLOW_CONTROL_ERROR)),
        "{code:?}"
    );
    still_healthy(&c).await;
    gw.stop().await;
}

/// A PING flood from a client that reads nothing: the gateway answers what its buffers take
/// and then reads no more (the flood is held to the kernel's buffers, not the gateway's
/// memory), and the connection, which never asks for anything, is closed at the deadline from
/// accept; other clients are served meanwhile.
#[tokio::test]
async fn an_http2_ping_flood_is_bounded() {
    let (gw, c) = gateway_and_session(
        "mcp: { header_timeout: 6s, idle_connection_timeout: 60s }",
        example("a", &[], ""),
    )
    .await;
    let flooder = Conn::over(LOCAL.small_buffer().connect(gw.addr).await, &[]).await;
    let started = Instant::now();
    let mut pings = Vec::new();
    for i in 0..10_000u64 {
        pings.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    let (mut read, mut write) = flooder.s.into_split();
    let mut sent = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), write.write_all(&pings)).await {
            Ok(Ok(())) => sent += pings.len(),
            // Held, or already closed: either way the flood stopped here.
            Err(_) | Ok(Err(_)) => break,
        }
        assert!(
            sent < 64 << 20,
            "the gateway read 64 MiB of PINGs whose answers went unread"
        );
    }
    eprintln!(
        "PING flood: {} KiB taken in {:?} before the gateway read no more",
        sent >> 10,
        started.elapsed()
    );
    still_healthy(&c).await;
    assert!(
        closed_within(&mut read, Duration::from_secs(15)).await,
        "the flooding connection still open after {:?}",
        started.elapsed()
    );
    eprintln!("PING flood: closed after {:?}", started.elapsed());
    still_healthy(&c).await;
    gw.stop().await;
}

/// HTTP/1 heads are bounded: more than 100 header fields, or a head larger than hyper's read
/// buffer (about 400 KiB), is answered 431 and the connection closed; other clients are served.
#[tokio::test]
async fn http1_heads_over_the_bounds_are_431() {
    let (gw, c) = gateway_and_session("", example("a", &[], "")).await;
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long = format!("x-long: {}\r\n", "y".repeat(512 * 1024));
    // Past the 64 KiB hyper may buffer of a head (its default took 400 KiB).
    let past_buffer = format!("x-long: {}\r\n", "y".repeat(100 * 1024));
    for (name, fields) in [
        ("101 fields", many),
        ("a 512 KiB field", long),
        ("a 100 KiB field", past_buffer),
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let request = format!("GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n{fields}\r\n");
        let (mut read, mut write) = s.split();
        // The gateway may answer, and close, before it has read it all.
        let (_, answer) = tokio::join!(write.write_all(request.as_bytes()), async {
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out)).await;
            out
        });
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{name}: {answer}");
        still_healthy(&c).await;
    }
    gw.stop().await;
}

/// On the loopback default, `/metrics` checks Host as `/mcp` does: a page whose name was
/// rebound to 127.0.0.1 cannot read what the metrics name.
#[tokio::test]
async fn metrics_refuse_a_rebound_name_on_loopback() {
    let (gw, c) = gateway_and_session("", example("a", &[], "")).await;
    for (host, status) in [("attacker.example:9000", "421"), ("127.0.0.1", "200")] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let request = format!("GET /metrics HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {answer:.300}"
        );
    }
    still_healthy(&c).await;
    gw.stop().await;
}

/// Pipelined HTTP/1 requests are answered one after another, in order, however many come at
/// once; a client that pipelines without end and reads nothing holds the gateway to what its
/// buffers take, and its connection is closed within the header deadline and the closing grace
/// (its place given back).
#[tokio::test]
async fn pipelined_requests_are_bounded() {
    let gw = TestGateway::start(
        "mcp: { header_timeout: 1s, idle_connection_timeout: 2s, max_connections_per_ip: 1 }",
        &[example("a", &[], "")],
    )
    .await;
    let (reader_ip, flooder_ip) = (Ipv4Addr::new(127, 0, 0, 9), Ipv4Addr::new(127, 0, 0, 10));
    let mut r = BufReader::new(connect_from(reader_ip, gw.addr).await);
    let (mut read, mut write) = tokio::io::split(&mut r);
    let writing = async {
        for _ in 0..2000 {
            write.write_all(HEALTHZ).await.unwrap();
        }
    };
    let reading = async {
        let mut all = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        while all.windows(3).filter(|w| w == b"ok\n").count() < 2000 {
            let n = read.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before every answer");
            all.extend_from_slice(&buf[..n]);
        }
        all.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count()
    };
    let (_, answered) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writing, reading)
    })
    .await
    .expect("2000 pipelined requests answered within 30 s");
    assert_eq!(answered, 2000);

    let s = Peer::at(flooder_ip).small_buffer().connect(gw.addr).await;
    let (mut read, mut write) = s.into_split();
    let flood = tokio::spawn(async move {
        let many = HEALTHZ.repeat(1000);
        while write.write_all(&many).await.is_ok() {}
    });
    let started = Instant::now();
    // Refused while the flood holds the address's one place...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!admitted_within(flooder_ip, gw.addr, Duration::from_millis(300)).await);
    // ...given back within the header deadline and the grace.
    place_given_back(flooder_ip, gw.addr, "the pipelining connection", started).await;
    assert!(closed_within(&mut read, Duration::from_secs(5)).await);
    flood.abort();
    gw.stop().await;
}

/// An HTTP/2 answer of one buffer waits at most `mcp.stalled_stream_timeout` for the client's
/// window, even while another stream keeps the connection busy: a client that grants its GET
/// stream a window and no other stream one cannot have finished answers held for as long as it
/// likes (the connection is closed, not left to the idle deadline it never reaches).
#[tokio::test]
async fn http2_answers_left_without_a_window_do_not_hold_a_busy_connection() {
    let (gw, c) = gateway_and_session(
        "mcp: { stalled_stream_timeout: 1s, sse_keepalive: 200ms, idle_connection_timeout: 60s, keepalive_interval: 120s }",
        example("a", &[], ""),
    )
    .await;
    let mut conn = Conn::open(gw.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    // Stream 1: the session's GET stream, given a window: it keeps the connection busy.
    let block = get_stream_block(&c);
    conn.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    const WINDOW_UPDATE: u8 = 0x8;
    let window = (1u32 << 30).to_be_bytes();
    conn.send(&frame(WINDOW_UPDATE, 0, 1, &window)).await;
    // Stream 3: a plain answer, never given a window.
    let block = h2_raw::block(&request("GET", "/healthz", &[]));
    conn.send(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &block))
        .await;
    let started = Instant::now();
    let mut keepalives = 0;
    conn.ends_within(Duration::from_secs(20), |f| {
        if f.kind == DATA && f.stream == 1 {
            keepalives += 1;
        }
    })
    .await;
    let took = started.elapsed();
    // The GET stream flowed (the connection was busy), and the wait was the stall (1 s) and
    // the closing grace (2 s), not the idle deadline (60 s).
    assert!(keepalives > 0, "the GET stream was read");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    still_healthy(&c).await;
    gw.stop().await;
}
