//! Gateway benchmark: the cost of Gatehouse against a direct connection, measured in one run.
//!
//! Starts on loopback a fast upstream of our own (`gatehouse example-server`, Streamable HTTP,
//! dual-era, and stdio), gateways in front of it, and a load generator; then measures each
//! configuration in alternating rounds so drift on this noisy machine hits all of them alike.
//! Each workload is compared with the same requests sent to the upstream directly (a stateless
//! call with a stateless call).
//!
//! ```text
//! cargo bench --bench gateway -- [--duration-ms 2000] [--rounds 3] [--clients 1,64]
//!                                [--sessions 10000] [--other-url URL] [--out target/bench]
//!                                [--other-pid PID] [--only-auth] [--only-instructions]
//!                                [--compare YAML] [--write-link-order PROFILE [--binary B]]
//! ```
//! `--compare 'runtime: { workers: 1 }'` measures only a gateway configured with that
//! top-level YAML against one without, in alternating rounds (small calls, the largest
//! `--clients`).
//! `--only-configs stdio,floor` measures only the configurations whose names contain one of
//! the parts (and direct), and prints their table: no instruction counts, no memory.
//! `--only-floor` measures only small calls direct, through the gateway and through the floor
//! proxies (`floor_proxy.rs`: the least any HTTP proxy does), in alternating rounds.
//! `--only-auth` counts only what authentication and the audit trail add to a call.
//! `--only-instructions` counts only the instructions per call of single calls; with
//! `GATEHOUSE_INSTRUCTION_CASES=stateless` (any part of a case's name), only those cases.
//! `--write-link-order PROFILE` ranks the functions a serving gateway runs (this build's, or
//! binary `B`'s) and writes them as that profile's block of `deploy/link-order.txt` (build.rs).
//! `--other-url` adds another gateway (already running, fronting the upstream URL this program
//! prints, or set with `--upstream-port`) measured exactly like ours; with `--other-pid`, its CPU
//! per request too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[path = "gateway/floor_proxy.rs"]
mod floor_proxy;

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// How the load generator sends: on pooled connections, or (counting instructions) on one
/// connection, so that every call takes the same path through the gateway (a pooled client
/// spreads even sequential calls over two connections, which two gateway threads serve, in a
/// share that changes from run to run).
#[derive(Clone)]
enum Http {
    Pooled(Box<Client<HttpConnector, Full<Bytes>>>),
    One(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
}

impl Http {
    fn pooled(max_idle_per_host: usize) -> Http {
        Http::Pooled(Box::new(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(max_idle_per_host)
                .build_http(),
        ))
    }

    /// One connection to `url`'s host.
    async fn one(url: &str) -> Http {
        let uri: http::Uri = url.parse().expect("a URL");
        let authority = uri.authority().expect("a host").as_str().to_owned();
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        Http::One(Arc::new(tokio::sync::Mutex::new(sender)))
    }

    async fn request(
        &self,
        mut req: http::Request<Full<Bytes>>,
    ) -> http::Response<hyper::body::Incoming> {
        match self {
            Http::Pooled(client) => client.request(req).await.expect("request"),
            Http::One(sender) => {
                // On a connection: the target in origin form, the host in its header.
                let uri = req.uri().clone();
                let host = uri.authority().expect("a host").as_str().parse().unwrap();
                req.headers_mut().insert(http::header::HOST, host);
                *req.uri_mut() = uri
                    .path_and_query()
                    .expect("a path")
                    .as_str()
                    .parse()
                    .unwrap();
                let mut sender = sender.lock().await;
                sender.ready().await.expect("the connection is open");
                sender.send_request(req).await.expect("request")
            }
        }
    }
}

struct Args {
    duration: Duration,
    rounds: usize,
    clients: Vec<usize>,
    sessions: usize,
    other_url: Option<String>,
    /// The other gateway's process, for its CPU per request.
    other_pid: Option<u32>,
    upstream_port: u16,
    out: PathBuf,
    /// Only the authentication and audit costs (instruction counts).
    only_auth: bool,
    /// Only the instruction counts of the single-call cases (for quick before/after).
    only_instructions: bool,
    only_memory: bool,
    /// Only small calls: direct, the gateway and the floor proxies.
    only_floor: bool,
    /// Only the configurations whose names contain one of these (and direct), no counts.
    only_configs: Vec<String>,
    /// Write this build profile's block of the link order, from `binary`, and nothing else.
    write_link_order: Option<String>,
    /// The gateway binary to profile for the link order (default: this profile's).
    binary: String,
    /// Only a gateway with this configuration (top-level YAML) against one without.
    compare: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        duration: Duration::from_millis(2000),
        rounds: 3,
        clients: vec![1, 64],
        sessions: 10_000,
        other_url: None,
        other_pid: None,
        upstream_port: 0,
        out: PathBuf::from("target/bench"),
        only_auth: false,
        only_instructions: false,
        only_memory: false,
        only_floor: false,
        only_configs: Vec::new(),
        write_link_order: None,
        binary: BIN.to_owned(),
        compare: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--only-auth" => a.only_auth = true,
            "--only-instructions" => a.only_instructions = true,
            "--only-memory" => a.only_memory = true,
            "--only-floor" => a.only_floor = true,
            "--only-configs" => a.only_configs = val().split(',').map(str::to_owned).collect(),
            "--compare" => a.compare = Some(val()),
            "--write-link-order" => a.write_link_order = Some(val()),
            "--binary" => a.binary = val(),
            "--duration-ms" => a.duration = Duration::from_millis(val().parse().expect("ms")),
            "--rounds" => a.rounds = val().parse().expect("rounds"),
            "--clients" => {
                a.clients = val()
                    .split(',')
                    .map(|c| c.parse().expect("clients"))
                    .collect()
            }
            "--sessions" => a.sessions = val().parse().expect("sessions"),
            "--other-url" => a.other_url = Some(val()),
            "--other-pid" => a.other_pid = Some(val().parse().expect("pid")),
            "--upstream-port" => a.upstream_port = val().parse().expect("port"),
            "--out" => a.out = PathBuf::from(val()),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.rounds > 0, "--rounds must be at least 1");
    assert!(
        !(a.only_auth && a.compare.is_some()),
        "--compare and --only-auth measure different things: give one"
    );
    if let Some(yaml) = &a.compare {
        // The bench writes these itself: given again, the gateway would not start.
        for key in ["listen", "log", "mcp", "upstreams"] {
            assert!(
                !yaml.lines().any(|l| l.starts_with(&format!("{key}:"))),
                "--compare cannot set {key}: the bench sets it"
            );
        }
    }
    if let Some(pid) = a.other_pid {
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok(),
            "--other-pid {pid}: no such process"
        );
    }
    a
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) a process has used, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Counting from the state letter after the name: utime is the 12th field, stime the 13th.
    let field = |i: usize| -> u64 {
        rest.split_whitespace()
            .nth(i)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    let ticks = field(11) + field(12);
    ticks * 1_000_000 / 100 // USER_HZ is 100 on Linux
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the example server over HTTP, dual-era: sessions, and 2026-07-28 requests served
/// statelessly (the direct baseline of each).
fn start_upstream(port: u16) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args([
            "example-server",
            "--stateless",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("upstream starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("LISTENING ")
        .expect("upstream prints its URL")
        .to_owned();
    (Proc(child), url)
}

/// Two policy plugins on every call: a no-op and tool-policy with ten rules that never match;
/// `reused`: both with `reuse_decisions` (neither reads the call's arguments here).
fn two_plugins_yaml(reused: bool) -> Option<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plugins");
    let noop = format!("{dir}/noop.wasm");
    let policy = format!("{dir}/tool_policy.wasm");
    if !std::path::Path::new(&noop).exists() || !std::path::Path::new(&policy).exists() {
        eprintln!(
            "plugins not built (run plugins/build.sh): skipping the two-plugin configuration"
        );
        return None;
    }
    let rules: Vec<String> = (0..10)
        .map(|i| format!("{{ tool: blocked{i}, argument: text, operator: contains, value: x{i}, action: block }}"))
        .collect();
    Some(format!(
        "plugins:\n  modules:\n    - {{ name: noop, path: {noop:?}, reuse_decisions: {reused} }}\n    - name: policy\n      path: {policy:?}\n      reuse_decisions: {reused}\n      config: {{ rules: [{}], default: allow }}\n  chains:\n    - {{ name: all, plugins: [noop, policy] }}\n",
        rules.join(", ")
    ))
}

/// A list filter (hiding destructive tools) on every listing and call: a call's target is
/// judged by how its server lists it; `reused`: with `reuse_decisions`.
fn list_filter_yaml(reused: bool) -> Option<String> {
    let filter = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/plugins/list_filter.wasm"
    );
    if !std::path::Path::new(filter).exists() {
        eprintln!("plugins not built (run plugins/build.sh): skipping the list filter");
        return None;
    }
    Some(format!(
        "plugins:\n  modules:\n    - name: lists\n      path: {filter:?}\n      reuse_decisions: {reused}\n      config: {{ rules: [ {{ deny_labels: [destructive] }} ] }}\n  chains:\n    - {{ name: all, plugins: [lists] }}\n"
    ))
}

fn start_gateway(upstreams_yaml: &str) -> (Proc, String) {
    start_gateway_with("", upstreams_yaml)
}

fn start_gateway_with(top: &str, upstreams_yaml: &str) -> (Proc, String) {
    start_gateway_wrapped(BIN, top, upstreams_yaml, &[], Duration::from_secs(10))
}

/// Starts gateway binary `bin`, run by `wrapper` (say, valgrind) when it is not empty.
fn start_gateway_wrapped(
    bin: &str,
    top: &str,
    upstreams_yaml: &str,
    wrapper: &[String],
    start_within: Duration,
) -> (Proc, String) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("gatehouse-bench-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gatehouse.yaml");
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:{port}\nlog: {{ level: warn }}\nmcp: {{ max_sessions: 1000000 }}\n{top}upstreams:\n{upstreams_yaml}"),
    )
    .unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = Instant::now() + start_within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), url)
}

/// The bearer token of the requests this process sends (none but in the auth measurements).
static TOKEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn with_token(mut b: http::request::Builder) -> http::request::Builder {
    if let Some(t) = TOKEN.lock().unwrap().as_deref() {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b
}

async fn post(
    http: &Http,
    url: &str,
    session: Option<&str>,
    body: Bytes,
) -> (Option<String>, Bytes) {
    let mut b = with_token(http::Request::post(url))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = session {
        b = b
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let resp = http.request(b.body(Full::new(body)).unwrap()).await;
    assert!(resp.status().is_success(), "HTTP {}", resp.status());
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    (sid, resp.into_body().collect().await.unwrap().to_bytes())
}

/// POSTs a 2026-07-28 stateless request: no session, the headers mirroring the body.
async fn post_stateless(http: &Http, url: &str, tool: &str, body: Bytes) -> Bytes {
    let req = with_token(http::Request::post(url))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(Full::new(body))
        .unwrap();
    let resp = http.request(req).await;
    assert!(resp.status().is_success(), "HTTP {}", resp.status());
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// One request of workload `w`, on `session` unless the workload is stateless.
async fn send(
    http: &Http,
    url: &str,
    session: Option<&str>,
    w: Workload,
    tool: &str,
    body: Bytes,
) -> Bytes {
    if w == Workload::CallStateless {
        post_stateless(http, url, tool, body).await
    } else {
        post(http, url, session, body).await.1
    }
}

async fn open_session(http: &Http, url: &str) -> String {
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}});
    let (sid, _) = post(http, url, None, Bytes::from(init.to_string())).await;
    let sid = sid.expect("session id");
    post(
        http,
        url,
        Some(&sid),
        Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
    )
    .await;
    sid
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    CallSmall,
    /// The small call as a 2026-07-28 stateless request (no session, `_meta`, mirrored headers).
    CallStateless,
    Call64k,
    List,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::CallSmall => "tools/call small",
            Workload::CallStateless => "tools/call small, stateless",
            Workload::Call64k => "tools/call 64 KiB",
            Workload::List => "tools/list",
        }
    }

    fn body(self, tool: &str) -> Bytes {
        let v = match self {
            Workload::CallSmall => {
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":{"text":"hello"}}})
            }
            Workload::CallStateless => {
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":{"text":"hello"},
                    "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                             "io.modelcontextprotocol/clientCapabilities":{}}}})
            }
            Workload::Call64k => {
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":{"text":"x".repeat(65536)}}})
            }
            Workload::List => json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}),
        };
        Bytes::from(v.to_string())
    }

    /// The workload of the direct baseline: the same request, sent to the upstream itself.
    fn baseline(self) -> Workload {
        self
    }
}

/// Instructions the gateway executes per call, counted by callgrind (repeatable where
/// wall-clock figures are not): a gateway under valgrind answers `short` then, started again,
/// `long` sequential calls on one session; the difference over `long - short` calls cancels
/// start-up, the handshake and shutdown. `None` when valgrind is not installed.
async fn instructions_per_call(
    top: &str,
    upstreams_yaml: &str,
    tool: &str,
    w: Workload,
    short: u64,
    long: u64,
) -> Option<f64> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind not found: skipping instruction counts");
        return None;
    }
    let mut totals = Vec::new();
    // Plugins are compiled at a gateway's first start and read from the on-disk cache after:
    // an uncounted start (under valgrind too, whose CPU features key the cache) fills it, so
    // both counted runs start alike.
    let prime = top.contains("plugins:").then_some(0);
    for calls in prime.into_iter().chain([short, long]) {
        let out =
            std::env::temp_dir().join(format!("gatehouse-callgrind-{}-{calls}.out", free_port()));
        let wrapper = vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        // Each run its own audit trail (a trail left by the short run would be verified at
        // the long run's start, and counted as calls).
        let audit = std::env::temp_dir().join(format!("gatehouse-bench-audit-{}", free_port()));
        let top = top.replace("AUDIT_FILE", &audit.display().to_string());
        let (mut gw, url) = start_gateway_wrapped(
            BIN,
            &top,
            upstreams_yaml,
            &wrapper,
            Duration::from_secs(120),
        );
        let http = Http::one(&url).await;
        let sid = open_session(&http, &url).await;
        let body = w.body(tool);
        for _ in 0..calls {
            send(&http, &url, Some(&sid), w, tool, body.clone()).await;
        }
        // SIGTERM: the gateway shuts down and callgrind writes its counts.
        let pid = nix::unistd::Pid::from_raw(gw.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = gw.0.wait();
        let _ = std::fs::remove_file(&audit);
        let text = std::fs::read_to_string(&out).ok()?;
        // GATEHOUSE_CALLGRIND_KEEP=DIR keeps the profiles (for callgrind_annotate).
        if let Ok(dir) = std::env::var("GATEHOUSE_CALLGRIND_KEEP") {
            let _ = std::fs::copy(&out, PathBuf::from(dir).join(out.file_name().unwrap()));
        }
        let _ = std::fs::remove_file(&out);
        let total: u64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            })
            .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
        if calls > 0 {
            totals.push(total);
        }
    }
    Some((totals[1] as f64 - totals[0] as f64) / (long - short) as f64)
}

/// One configuration under test.
struct Target {
    name: String,
    url: String,
    /// The gateway process, when it is ours (for CPU accounting).
    pid: Option<u32>,
    tool: String,
    workloads: Vec<Workload>,
}

impl Target {
    fn new(
        name: &str,
        url: &str,
        gateway: Option<&Proc>,
        tool: &str,
        workloads: &[Workload],
    ) -> Self {
        Target {
            name: name.to_owned(),
            url: url.to_owned(),
            pid: gateway.map(Proc::pid),
            tool: tool.to_owned(),
            workloads: workloads.to_vec(),
        }
    }
}

#[derive(Default, Clone)]
struct Sample {
    requests: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU the measured gateway process spent, when it is ours.
    gateway_cpu_us: Option<u64>,
}

async fn measure(
    url: &str,
    pid: Option<u32>,
    tool: &str,
    w: Workload,
    clients: usize,
    duration: Duration,
) -> Sample {
    let http = Http::pooled(clients * 2);
    let mut sessions = Vec::new();
    for _ in 0..clients {
        sessions.push(open_session(&http, url).await);
    }
    let body = w.body(tool);
    let stop = Arc::new(AtomicBool::new(false));
    let warmup = Duration::from_millis(200);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for sid in sessions {
        let (http, url, body, stop) = (http.clone(), url.to_owned(), body.clone(), stop.clone());
        let tool = tool.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let reply = send(&http, &url, Some(&sid), w, &tool, body.clone()).await;
                let us = t.elapsed().as_micros() as u32;
                assert!(
                    !reply.windows(8).any(|w| w == b"\"error\":"),
                    "error reply: {}",
                    String::from_utf8_lossy(&reply)
                );
                if started.elapsed() > warmup {
                    lat.push(us);
                    n += 1;
                }
            }
            (n, lat)
        }));
    }
    tokio::time::sleep(warmup).await;
    let cpu_before = pid.map(cpu_us);
    tokio::time::sleep(duration).await;
    let gateway_cpu_us = pid
        .zip(cpu_before)
        .map(|(p, before)| cpu_us(p).saturating_sub(before));
    stop.store(true, Ordering::Relaxed);
    let mut s = Sample {
        elapsed: duration,
        gateway_cpu_us,
        ..Sample::default()
    };
    for t in tasks {
        let (n, lat) = t.await.unwrap();
        s.requests += n;
        s.latencies_us.extend(lat);
    }
    s
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i])
}

struct Result_ {
    config: String,
    workload: &'static str,
    /// The workload of its direct baseline.
    baseline: Workload,
    clients: usize,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu_per_request_us: Option<f64>,
}

fn summarize(config: &str, w: Workload, clients: usize, samples: &[Sample]) -> Result_ {
    // Median throughput over rounds; latency percentiles over all rounds' observations.
    let mut rps: Vec<f64> = samples
        .iter()
        .map(|s| s.requests as f64 / s.elapsed.as_secs_f64())
        .collect();
    rps.sort_by(f64::total_cmp);
    let mut lat: Vec<u32> = samples
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let cpu: Option<u64> = samples.iter().map(|s| s.gateway_cpu_us).sum();
    let requests: u64 = samples.iter().map(|s| s.requests).sum();
    Result_ {
        cpu_per_request_us: cpu.map(|c| c as f64 / requests.max(1) as f64),
        config: config.to_owned(),
        workload: w.name(),
        baseline: w.baseline(),
        clients,
        rps: rps[rps.len() / 2],
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        p999: pct(&lat, 0.999),
    }
}

async fn session_memory(gateway: &Proc, url: &str, sessions: usize) -> (u64, u64, f64) {
    // The kernel maps code around a faulting page only from what the page cache holds, so a
    // binary read whole (as one just built or installed is) is the case measured, every time.
    let _ = std::io::copy(
        &mut std::fs::File::open(BIN).expect("the gateway binary"),
        &mut std::io::sink(),
    );
    // Warm the allocator and the upstream pool with one session so "idle" is a serving gateway.
    let http = Http::pooled(32);
    open_session(&http, url).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = gateway.rss_kib();
    let per_worker = sessions.div_ceil(32);
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (http, url) = (http.clone(), url.to_owned());
        let n = per_worker.min(sessions.saturating_sub(w * per_worker));
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                open_session(&http, &url).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = gateway.rss_kib();
    let per_session = (loaded.saturating_sub(idle) * 1024) as f64 / sessions as f64;
    (idle, loaded, per_session)
}

fn main() {
    // The bench starts itself again as the floor proxy, a process of its own.
    let argv: Vec<String> = std::env::args().collect();
    if let [_, flag, model, upstream, ..] = argv.as_slice()
        && flag == "--floor-proxy"
    {
        floor_proxy::serve(model, upstream);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

/// Starts this program as a floor proxy of `upstream_url` in runtime `model`.
fn start_floor_proxy(model: &str, upstream_url: &str) -> (Proc, String) {
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .args(["--floor-proxy", model, upstream_url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("floor proxy starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("LISTENING ")
        .expect("floor proxy prints its URL")
        .to_owned();
    (Proc(child), url)
}

async fn bench() {
    let a = args();
    let upstream_port = if a.upstream_port == 0 {
        free_port()
    } else {
        a.upstream_port
    };
    let (_upstream, upstream_url) = start_upstream(upstream_port);
    println!("upstream: {upstream_url}");
    // The upstream speaks both eras; `protocol: sessions` keeps these gateways on upstream
    // sessions whatever their clients speak, and `modern_upstream` lets a gateway probe it
    // and speak 2026-07-28 to it.
    let http_upstream = |name: &str| {
        format!("  - name: {name}\n    protocol: sessions\n    http: {{ url: {upstream_url:?} }}\n")
    };
    let modern_upstream =
        |name: &str| format!("  - name: {name}\n    http: {{ url: {upstream_url:?} }}\n");
    if let Some(yaml) = &a.compare {
        let clients = a.clients.iter().copied().max().unwrap_or(1);
        let (rps, cpu) = paired_throughput(
            [
                ("as is", String::new(), None),
                ("with it", format!("{yaml}\n"), None),
            ],
            &http_upstream("ex"),
            clients,
            a.rounds,
            a.duration,
        )
        .await;
        println!(
            "with {yaml:?} against without, {clients} clients, medians of {} per-round ratios: throughput {rps:.3} ×, gateway CPU per request {cpu:.3} ×",
            a.rounds
        );
        return;
    }
    if let Some(profile) = &a.write_link_order {
        write_link_order(profile, &a.binary, &upstream_url).await;
        return;
    }
    if a.only_memory {
        let (gw, url) = start_gateway(&http_upstream("ex"));
        let (idle, loaded, per_session) = session_memory(&gw, &url, a.sessions).await;
        println!(
            "gateway RSS idle {idle} KiB ({:.1} MiB); with {} sessions open {loaded} KiB; {per_session:.0} bytes per idle session",
            idle as f64 / 1024.0,
            a.sessions
        );
        println!("{}", link_order_coverage(BIN));
        return;
    }
    if a.only_auth {
        let costs = auth_costs(&http_upstream("ex")).await;
        let base = costs.first().map_or(f64::NAN, |c| c.1);
        for (name, n) in &costs {
            println!(
                "{name:>28}: {n:>9.0} instructions per call, {:.3} × no authentication",
                n / base
            );
        }
        let clients = a.clients.iter().copied().max().unwrap_or(1).min(16);
        // GATEHOUSE_AUTH_AGAINST=case compares another of `auth_cases` with no authentication.
        let against =
            std::env::var("GATEHOUSE_AUTH_AGAINST").unwrap_or_else(|_| "JWT (warm) + audit".into());
        let (rps, cpu) = auth_throughput(
            &http_upstream("ex"),
            &against,
            clients,
            a.rounds,
            a.duration,
        )
        .await;
        println!(
            "{against} against no authentication, {clients} clients, medians of {} per-round ratios: throughput {rps:.3} ×, gateway CPU per request {cpu:.3} ×",
            a.rounds
        );
        return;
    }
    let stdio_upstream =
        format!("  - name: ex\n    stdio: {{ command: {BIN:?}, args: [example-server] }}\n");
    if a.only_instructions {
        let two = format!("{}{}", http_upstream("u0"), http_upstream("u1"));
        // Valgrind cannot reserve the address space of the default instance pool.
        let small_pool = |p: String| {
            p.replacen(
                "plugins:\n",
                "plugins:\n  engine: { max_instances: 4 }\n",
                1,
            )
        };
        let plugins = two_plugins_yaml(false).map(small_pool);
        let reused = two_plugins_yaml(true).map(small_pool);
        let filter = list_filter_yaml(false).map(small_pool);
        let filter_reused = list_filter_yaml(true).map(small_pool);
        for (name, top, yaml, w) in [
            (
                "gateway→http",
                None,
                http_upstream("ex"),
                Workload::CallSmall,
            ),
            (
                "gateway→http",
                None,
                http_upstream("ex"),
                Workload::CallStateless,
            ),
            (
                "gateway→http 2026",
                None,
                modern_upstream("ex"),
                Workload::CallStateless,
            ),
            (
                "gateway→http 2026",
                None,
                modern_upstream("ex"),
                Workload::CallSmall,
            ),
            (
                "gateway→stdio",
                None,
                stdio_upstream.clone(),
                Workload::CallSmall,
            ),
            ("gateway→http", None, http_upstream("ex"), Workload::Call64k),
            (
                "gateway→stdio",
                None,
                stdio_upstream.clone(),
                Workload::Call64k,
            ),
            (
                "gateway→2 upstreams",
                None,
                two.clone(),
                Workload::CallSmall,
            ),
            ("gateway→2 upstreams", None, two.clone(), Workload::Call64k),
            (
                "gateway→20 upstreams",
                None,
                (0..20).map(|i| http_upstream(&format!("u{i}"))).collect(),
                Workload::List,
            ),
            (
                "+ 2 plugins",
                plugins.as_deref(),
                http_upstream("ex"),
                Workload::CallSmall,
            ),
            (
                "+ 2 plugins",
                plugins.as_deref(),
                http_upstream("ex"),
                Workload::Call64k,
            ),
            (
                "+ 2 plugins, reused",
                reused.as_deref(),
                http_upstream("ex"),
                Workload::CallSmall,
            ),
            (
                "+ list filter",
                filter.as_deref(),
                http_upstream("ex"),
                Workload::CallSmall,
            ),
            (
                "+ list filter, reused",
                filter_reused.as_deref(),
                http_upstream("ex"),
                Workload::CallSmall,
            ),
        ] {
            if name.starts_with('+') && top.is_none() {
                continue;
            }
            // GATEHOUSE_INSTRUCTION_CASES=stateless (any part of "name workload") counts only
            // the cases it names: a quick before/after of one.
            let case = format!("{name} {}", w.name());
            if std::env::var("GATEHOUSE_INSTRUCTION_CASES").is_ok_and(|only| !case.contains(&only))
            {
                continue;
            }
            let top = top.unwrap_or_default();
            // Two upstreams: tools are prefixed, and a call's name is rewritten on its way.
            let tool = if name.starts_with("gateway→2") {
                "u0__echo"
            } else {
                "echo"
            };
            if let Some(n) = instructions_per_call(top, &yaml, tool, w, 100, 600).await {
                println!(
                    "{name:>14} {:>18}: {n:>9.0} instructions per call",
                    w.name()
                );
            }
        }
        return;
    }
    let (gw_http, gw_http_url) = start_gateway(&http_upstream("ex"));
    let floors = [
        ("floor proxy, shared runtime", "shared"),
        ("floor proxy, thread per CPU", "per-thread"),
        ("floor proxy, paired, one task", "paired"),
        ("floor relay, TCP bytes only", "tcp"),
    ]
    .map(|(name, model)| (name, start_floor_proxy(model, &upstream_url)));
    if a.only_floor {
        let small = [Workload::CallSmall];
        let mut configs = vec![
            Target::new("direct", &upstream_url, None, "echo", &small),
            Target::new("gateway→http", &gw_http_url, Some(&gw_http), "echo", &small),
        ];
        for (name, (proc_, url)) in &floors {
            configs.push(Target::new(name, url, Some(proc_), "echo", &small));
        }
        let results = measure_rounds(&configs, &a).await;
        println!("{}", results_table(&results).0);
        return;
    }
    let (gw_stdio, gw_stdio_url) = start_gateway(&stdio_upstream);
    let twenty: String = (0..20).map(|i| http_upstream(&format!("u{i}"))).collect();
    let (gw_20, gw_20_url) = start_gateway(&twenty);
    let all = vec![Workload::CallSmall, Workload::Call64k, Workload::List];
    let mut all_eras = all.clone();
    all_eras.insert(1, Workload::CallStateless);
    let calls = vec![Workload::CallSmall, Workload::Call64k];

    let (gw_modern, gw_modern_url) = start_gateway(&modern_upstream("ex"));
    let mut configs = vec![
        Target::new("direct", &upstream_url, None, "echo", &all_eras),
        Target::new(
            "gateway→http",
            &gw_http_url,
            Some(&gw_http),
            "echo",
            &all_eras,
        ),
        // The same upstream spoken to in 2026-07-28, whatever the client speaks.
        Target::new(
            "gateway→http 2026",
            &gw_modern_url,
            Some(&gw_modern),
            "echo",
            &[Workload::CallStateless, Workload::CallSmall],
        ),
        Target::new(
            "gateway→stdio",
            &gw_stdio_url,
            Some(&gw_stdio),
            "echo",
            &calls,
        ),
        Target::new(
            "gateway→20 upstreams",
            &gw_20_url,
            Some(&gw_20),
            "u0__echo",
            &[Workload::List],
        ),
    ];
    let with_plugins =
        two_plugins_yaml(false).map(|top| start_gateway_with(&top, &http_upstream("ex")));
    if let Some((gw, url)) = &with_plugins {
        configs.push(Target::new(
            "gateway→http + 2 plugins",
            url,
            Some(gw),
            "echo",
            &calls,
        ));
    }
    let with_reused =
        two_plugins_yaml(true).map(|top| start_gateway_with(&top, &http_upstream("ex")));
    if let Some((gw, url)) = &with_reused {
        configs.push(Target::new(
            "gateway→http + 2 plugins, reused",
            url,
            Some(gw),
            "echo",
            &calls,
        ));
    }
    for (name, (proc_, url)) in &floors {
        configs.push(Target::new(name, url, Some(proc_), "echo", &calls));
    }
    if let Some(other) = &a.other_url {
        let mut t = Target::new("other gateway", other, None, "echo", &all);
        t.pid = a.other_pid;
        configs.push(t);
    }
    if !a.only_configs.is_empty() {
        configs.retain(|t| t.name == "direct" || a.only_configs.iter().any(|c| t.name.contains(c)));
        let results = measure_rounds(&configs, &a).await;
        println!("{}", results_table(&results).0);
        return;
    }

    let results = measure_rounds(&configs, &a).await;

    eprintln!("counting instructions per call with callgrind…");
    let mut counts = Vec::new();
    for (name, yaml, tool, w) in [
        (
            "gateway→http",
            http_upstream("ex"),
            "echo",
            Workload::CallSmall,
        ),
        (
            "gateway→http",
            http_upstream("ex"),
            "echo",
            Workload::CallStateless,
        ),
        (
            "gateway→http 2026",
            modern_upstream("ex"),
            "echo",
            Workload::CallStateless,
        ),
        (
            "gateway→http 2026",
            modern_upstream("ex"),
            "echo",
            Workload::CallSmall,
        ),
        (
            "gateway→stdio",
            stdio_upstream.clone(),
            "echo",
            Workload::CallSmall,
        ),
        (
            "gateway→20 upstreams",
            twenty.clone(),
            "u0__echo",
            Workload::List,
        ),
    ] {
        if let Some(n) = instructions_per_call("", &yaml, tool, w, 100, 600).await {
            counts.push((name, w.name(), n));
        }
    }
    let auth_costs = auth_costs(&http_upstream("ex")).await;

    eprintln!("measuring memory with {} sessions…", a.sessions);
    drop((
        gw_http,
        gw_modern,
        gw_stdio,
        gw_20,
        with_plugins,
        with_reused,
        floors,
    ));
    let (gw_mem, gw_mem_url) = start_gateway(&http_upstream("ex"));
    let (idle_kib, loaded_kib, per_session) =
        session_memory(&gw_mem, &gw_mem_url, a.sessions).await;

    let (mut md, rows) = results_table(&results);
    if !auth_costs.is_empty() {
        let base = auth_costs[0].1;
        md.push_str("\n| callers | gateway instructions per call (callgrind) | × no auth |\n|---|---:|---:|\n");
        for (name, n) in &auth_costs {
            md.push_str(&format!("| {name} | {n:.0} | {:.3} |\n", n / base));
        }
    }
    if !counts.is_empty() {
        md.push_str("\n| configuration | workload | gateway instructions per call (callgrind, 600 − 100 calls, 1 client) |\n|---|---|---:|\n");
        for (name, workload, n) in &counts {
            md.push_str(&format!("| {name} | {workload} | {:.0} |\n", n));
        }
    }
    md.push_str(&format!(
        "\nGateway memory: RSS idle {} KiB; with {} sessions open {} KiB; **{:.0} bytes per idle session**; {}.\n",
        idle_kib, a.sessions, loaded_kib, per_session, link_order_coverage(BIN)
    ));
    md.push_str(
        "\n(tools/list over 20 upstreams is compared with tools/list on one upstream directly.)\n",
    );
    let report = json!({
        "duration_ms": a.duration.as_millis() as u64, "rounds": a.rounds, "results": rows,
        "auth_costs": auth_costs.iter().map(|(c, n)| json!({"callers": c, "instructions": n})).collect::<Vec<_>>(),
        "instructions_per_call": counts.iter().map(|(c, w, n)| json!({"config": c, "workload": w, "instructions": n})).collect::<Vec<_>>(),
        "memory": {"idle_rss_kib": idle_kib, "sessions": a.sessions, "loaded_rss_kib": loaded_kib, "bytes_per_session": per_session},
    });
    std::fs::create_dir_all(&a.out).unwrap();
    std::fs::write(
        a.out.join("gateway.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    std::fs::write(a.out.join("gateway.md"), &md).unwrap();
    println!("{md}");
    println!("wrote {}/gateway.json and gateway.md", a.out.display());
}

/// Measures every workload of every configuration at every client count, in alternating rounds.
async fn measure_rounds(configs: &[Target], a: &Args) -> Vec<Result_> {
    let mut samples: BTreeMap<(usize, usize, usize), Vec<Sample>> = BTreeMap::new();
    for round in 0..a.rounds {
        for &clients in &a.clients {
            for (ci, t) in configs.iter().enumerate() {
                let name = &t.name;
                for (wi, w) in t.workloads.iter().enumerate() {
                    let s = measure(&t.url, t.pid, &t.tool, *w, clients, a.duration).await;
                    eprintln!(
                        "round {round} {name:>22} {:>18} c={clients:<3} {:>9.0} req/s",
                        w.name(),
                        s.requests as f64 / s.elapsed.as_secs_f64()
                    );
                    samples.entry((clients, ci, wi)).or_default().push(s);
                }
            }
        }
    }

    let mut results = Vec::new();
    for ((clients, ci, wi), s) in &samples {
        let t = &configs[*ci];
        results.push(summarize(&t.name, t.workloads[*wi], *clients, s));
    }
    results
}

/// The results as a Markdown table with ratios to the direct rows, and as JSON rows.
fn results_table(results: &[Result_]) -> (String, Vec<serde_json::Value>) {
    let baseline = |r: &Result_| {
        results
            .iter()
            .find(|b| {
                b.config == "direct" && b.clients == r.clients && b.workload == r.baseline.name()
            })
            .map(|b| (b.rps, b.p50))
    };

    let mut md = String::from(
        "| configuration | workload | clients | req/s | × direct | p50 µs | p99 µs | p99.9 µs | added p50 µs | gateway CPU µs/req |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut rows = Vec::new();
    for r in results {
        let (ratio, added) = match baseline(r) {
            Some((rps, p50)) => (r.rps / rps, r.p50 - p50),
            None => (f64::NAN, f64::NAN),
        };
        let cpu = r
            .cpu_per_request_us
            .map_or("–".to_owned(), |c| format!("{c:.0}"));
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            r.config, r.workload, r.clients, r.rps, ratio, r.p50, r.p99, r.p999, added, cpu
        ));
        rows.push(json!({"config": r.config, "workload": r.workload, "clients": r.clients, "rps": r.rps,
            "ratio_to_direct": ratio, "p50_us": r.p50, "p99_us": r.p99, "p999_us": r.p999, "added_p50_us": added,
            "gateway_cpu_us_per_request": r.cpu_per_request_us}));
    }
    (md, rows)
}

/// The callers measured: no authentication, a static token, and a JWT access token (its
/// issuer's keys fetched once, the verified token cached), each with and without an audit
/// record per call: (name, top of the config with `AUDIT_FILE` for the trail, bearer token).
fn auth_cases() -> Vec<(&'static str, String, Option<String>)> {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256", "use": "sig",
                     "x": b64(&point[1..33]), "y": b64(&point[33..65])});
    // The issuer's JWKS endpoint, in this process.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let keys = Bytes::from(json!({ "keys": [jwk] }).to_string());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                keys.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&keys);
        }
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let resource = "http://127.0.0.1/mcp";
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("bench".into());
    let jwt = jsonwebtoken::encode(
        &header,
        &json!({"iss": issuer, "sub": "bench-user", "aud": resource, "scope": "mcp",
                "exp": now + 3600, "iat": now}),
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )
    .unwrap();
    let static_token = "bench-static-token-0123456789";
    let audit = "audit: { file: AUDIT_FILE }\n".to_owned();
    let oauth = format!(
        "auth:\n  oauth:\n    resource: {resource}\n    issuers: [{{ issuer: {issuer:?}, jwks_uri: \"{issuer}/jwks\" }}]\n"
    );
    let tokens = format!("auth: {{ tokens: [{{ principal: bench, token: {static_token} }}] }}\n");
    let cases = [
        ("no authentication", String::new(), None),
        (
            "static token",
            tokens.clone(),
            Some(static_token.to_owned()),
        ),
        ("JWT (warm)", oauth.clone(), Some(jwt.clone())),
        ("no authentication + audit", audit.clone(), None),
        (
            "static token + audit",
            format!("{tokens}{audit}"),
            Some(static_token.to_owned()),
        ),
        ("JWT (warm) + audit", format!("{oauth}{audit}"), Some(jwt)),
    ];
    cases.into()
}

/// What authentication and the audit trail cost a call: instructions per `tools/call` (session,
/// HTTP upstream) for each of [`auth_cases`].
async fn auth_costs(upstream: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    // GATEHOUSE_AUTH_CASES=a,b measures only the cases whose names contain one of them.
    let only = std::env::var("GATEHOUSE_AUTH_CASES").ok();
    for (name, top, token) in auth_cases() {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|w| name.contains(w)))
        {
            continue;
        }
        *TOKEN.lock().unwrap() = token;
        if let Some(n) =
            instructions_per_call(&top, upstream, "echo", Workload::CallSmall, 100, 600).await
        {
            eprintln!("{name}: {n:.0} instructions per call");
            out.push((name.to_owned(), n));
        }
    }
    *TOKEN.lock().unwrap() = None;
    out
}

/// Throughput at `clients` clients (one session each, small calls) and the gateway's CPU
/// time per request (user and system, so system calls count) with no authentication and with
/// the authentication case named `against`: see [`paired_throughput`].
async fn auth_throughput(
    upstream: &str,
    against: &str,
    clients: usize,
    rounds: usize,
    duration: Duration,
) -> (f64, f64) {
    let cases = auth_cases();
    let pick = |name: &str| {
        let case = cases.iter().find(|c| c.0 == name);
        case.cloned()
            .unwrap_or_else(|| panic!("no authentication case named {name:?}"))
    };
    paired_throughput(
        [pick("no authentication"), pick(against)],
        upstream,
        clients,
        rounds,
        duration,
    )
    .await
}

/// Throughput and gateway CPU time per request of the second gateway of `pair` (a name, the
/// configuration's top level, a bearer token) against the first, each measured in turn for
/// `rounds` rounds so that drift hits both alike: the medians of the per-round ratios.
async fn paired_throughput(
    pair: [(&str, String, Option<String>); 2],
    upstream: &str,
    clients: usize,
    rounds: usize,
    duration: Duration,
) -> (f64, f64) {
    let names = [pair[0].0, pair[1].0];
    let mut gateways = Vec::new();
    for (_, top, token) in pair {
        let trail = std::env::temp_dir().join(format!("gatehouse-bench-trail-{}", free_port()));
        let top = top.replace("AUDIT_FILE", &trail.display().to_string());
        let (gw, url) = start_gateway_with(&top, upstream);
        gateways.push((gw, url, token, trail));
    }
    let (mut rps_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (mut rps, mut cpu) = ([0.0; 2], [0.0; 2]);
        // Alternate which goes first, so neither always follows the other.
        for i in [round % 2, 1 - round % 2] {
            let (gw, url, token, _) = &gateways[i];
            *TOKEN.lock().unwrap() = token.clone();
            let s = measure(
                url,
                Some(gw.pid()),
                "echo",
                Workload::CallSmall,
                clients,
                duration,
            )
            .await;
            rps[i] = s.requests as f64 / s.elapsed.as_secs_f64();
            cpu[i] = s.gateway_cpu_us.unwrap_or(0) as f64 / s.requests.max(1) as f64;
        }
        eprintln!(
            "round {round}: {} {:.0} req/s {:.1} µs CPU/req, {} {:.0} req/s {:.1} µs CPU/req",
            names[0], rps[0], cpu[0], names[1], rps[1], cpu[1]
        );
        rps_ratios.push(rps[1] / rps[0]);
        cpu_ratios.push(cpu[1] / cpu[0]);
    }
    *TOKEN.lock().unwrap() = None;
    for (_, _, _, trail) in &gateways {
        let _ = std::fs::remove_file(trail);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(rps_ratios), median(cpu_ratios))
}

/// The list `build.rs` hands the linker: the functions a serving gateway runs, hottest first.
const LINK_ORDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/link-order.txt");

/// Writes `profile`'s block of [`LINK_ORDER`]: the functions of gateway binary `bin` that a
/// serving gateway runs, counted by callgrind in a plain gateway and in one with what
/// deployments add (JWT, an audit trail, two plugins): first those the requests ran, hottest
/// first, then those run between start-up giving its code back and the first request (tasks
/// start-up spawned). Symbol names differ between builds (profile, and the features Cargo
/// unifies with dev-dependencies under `cargo bench`), so each keeps its own block.
async fn write_link_order(profile: &str, bin: &str, upstream_url: &str) {
    assert!(
        !profile.is_empty() && !profile.contains(char::is_whitespace),
        "--write-link-order needs a profile name (release, bench, production)"
    );
    let bin = std::fs::canonicalize(bin).unwrap_or_else(|e| panic!("{bin}: {e}"));
    // Counting starts afresh where start-up gives its code back: a function of its own, or
    // start-up would be counted as what the serving gateway reaches.
    assert!(
        defined_symbols(bin.to_str().expect("a UTF-8 path"))
            .expect("nm runs")
            .contains("startup_code7release"),
        "{}: no startup_code::release symbol (inlined?)",
        bin.display()
    );
    let upstreams = format!(
        "  - name: u0\n    http: {{ url: {upstream_url:?} }}\n  - name: ex\n    stdio: {{ command: {bin:?}, args: [example-server] }}\n"
    );
    let (_, deployed, jwt) = auth_cases()
        .into_iter()
        .find(|c| c.0 == "JWT (warm) + audit")
        .expect("the JWT + audit case");
    // Valgrind cannot reserve the address space of the default instance pool.
    let plugins = two_plugins_yaml(false)
        .map(|p| {
            p.replacen(
                "plugins:\n",
                "plugins:\n  engine: { max_instances: 4 }\n",
                1,
            )
        })
        .unwrap_or_default();
    // Serving first, hottest first; then what start-up ran, which the serving gateway still
    // reaches now and then (tasks start-up spawned, first-use paths), kept out of the rest.
    let mut serving: BTreeMap<String, u64> = BTreeMap::new();
    let mut start_up: BTreeMap<String, u64> = BTreeMap::new();
    for (top, token) in [(String::new(), None), (format!("{deployed}{plugins}"), jwt)] {
        let out = std::env::temp_dir().join(format!("gatehouse-link-order-{}", free_port()));
        let audit =
            std::env::temp_dir().join(format!("gatehouse-link-order-audit-{}", free_port()));
        let top = top.replace("AUDIT_FILE", &audit.display().to_string());
        let wrapper: Vec<String> = [
            "valgrind",
            "--tool=callgrind",
            "--demangle=no",
            "--zero-before=*startup_code*release*",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--callgrind-out-file={}", out.display())])
        .collect();
        *TOKEN.lock().unwrap() = token;
        let (mut gw, url) = start_gateway_wrapped(
            bin.to_str().expect("a UTF-8 path"),
            &top,
            &upstreams,
            &wrapper,
            Duration::from_secs(300),
        );
        // Each dump writes the counts so far to `out.N` and starts counting afresh.
        let dump = |n: u32| -> String {
            let status = Command::new("callgrind_control")
                .args(["--dump", &gw.pid().to_string()])
                .stdout(Stdio::null())
                .status()
                .expect("callgrind_control runs");
            assert!(status.success(), "callgrind_control --dump failed");
            let file = PathBuf::from(format!("{}.{n}", out.display()));
            let text = std::fs::read_to_string(&file).expect("callgrind dumped its counts");
            let _ = std::fs::remove_file(&file);
            text
        };
        let counted_start_up = dump(1);
        serving_workload(&url).await;
        let counted_serving = dump(2);
        let pid = nix::unistd::Pid::from_raw(gw.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = gw.0.wait();
        let _ = std::fs::remove_file(&audit);
        for n in ["", ".3"] {
            let _ = std::fs::remove_file(format!("{}{n}", out.display()));
        }
        for (into, text) in [
            (&mut serving, counted_serving),
            (&mut start_up, counted_start_up),
        ] {
            for (name, n) in self_costs(&text, &bin) {
                *into.entry(name).or_default() += n;
            }
        }
    }
    *TOKEN.lock().unwrap() = None;
    let rank = |costs: BTreeMap<String, u64>| {
        // Valgrind's own names ("(below main)", "???") are no symbols.
        let symbol =
            |name: &str| !name.contains(char::is_whitespace) && !name.starts_with(['(', '?']);
        let mut ranked: Vec<(String, u64)> = costs
            .into_iter()
            .filter(|c| c.1 > 0 && symbol(&c.0))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.into_iter().map(|c| c.0)
    };
    start_up.retain(|name, _| !serving.contains_key(name));
    let ranked: Vec<String> = rank(serving).chain(rank(start_up)).collect();
    // The other profiles' blocks stay; this one's is replaced.
    // A profile that matched nothing of `bin` must not replace a good block.
    assert!(
        ranked.len() >= 500,
        "only {} functions of {} counted: not writing the link order",
        ranked.len(),
        bin.display()
    );
    let header = format!("# profile: {profile}");
    let mut block = format!("{header}\n");
    for name in &ranked {
        block.push_str(name);
        block.push('\n');
    }
    // The preamble is written afresh; the other blocks stay where they are, and so does this
    // one (the linker ranks a name by its first line, so moving a block would move names).
    let old = std::fs::read_to_string(LINK_ORDER).unwrap_or_default();
    let mut text = LINK_ORDER_PREAMBLE.to_owned();
    let mut ours = None; // `None` before the first block
    let mut written = false;
    for line in old.lines() {
        if line.starts_with("# profile: ") {
            ours = Some(line == header);
            if line == header && !std::mem::replace(&mut written, true) {
                text.push_str(&block);
            }
        }
        if ours == Some(false) {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !written {
        text.push_str(&block);
    }
    let part = format!("{LINK_ORDER}.part");
    std::fs::write(&part, text).expect("write the link order");
    std::fs::rename(&part, LINK_ORDER).expect("replace the link order");
    println!(
        "{LINK_ORDER}: {} functions of {} for profile {profile}",
        ranked.len(),
        bin.display()
    );
}

/// The symbols `bin` defines, as `nm` lists them; `None` without `nm`.
fn defined_symbols(bin: &str) -> Option<String> {
    let out = Command::new("nm")
        .args(["--defined-only", bin])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How much of [`LINK_ORDER`] gateway binary `bin` was laid out by: the block with the most of
/// its names in the binary (`nm`), and how many; a low count means the list is stale.
fn link_order_coverage(bin: &str) -> String {
    let Some(symbols) = defined_symbols(bin) else {
        return "link order not checked (no nm)".to_owned();
    };
    let defined: std::collections::HashSet<&str> = symbols
        .lines()
        .filter_map(|l| l.rsplit(' ').next())
        .collect();
    let order = std::fs::read_to_string(LINK_ORDER).unwrap_or_default();
    let mut best = ("none", 0, 0);
    let mut block = ("", 0, 0);
    for line in order.lines().chain(["# profile: "]) {
        if let Some(name) = line.strip_prefix("# profile: ") {
            if block.1 > best.1 {
                best = block;
            }
            block = (name, 0, 0);
        } else if !line.starts_with('#') && !block.0.is_empty() {
            block.2 += 1;
            block.1 += usize::from(defined.contains(line));
        }
    }
    format!(
        "link order: {} of the {} names of block {:?} in the binary",
        best.1, best.2, best.0
    )
}

/// What heads [`LINK_ORDER`] (lines the linker reads as names no build has, so skips).
const LINK_ORDER_PREAMBLE: &str = "\
# The functions a serving gateway runs, hottest first: build.rs passes this file to the linker,
# which lays them out together at the start of the text. Symbol names differ between builds,
# so there is a block per build; a name no build has is skipped (so are these lines).
#   bench:      cargo bench --bench gateway -- --write-link-order bench
#   release:    cargo build --release && cp target/release/gatehouse /tmp/gh &&
#               cargo bench --bench gateway -- --write-link-order release --binary /tmp/gh
#   production: cargo build --profile production &&
#               cargo bench --bench gateway -- --write-link-order production \\
#                 --binary target/production/gatehouse
";

/// What a serving gateway does, for the link order: sessions, lists, calls through an HTTP
/// and a stdio upstream, a 64 KiB call, errors, 2026-07-28 stateless requests, probes.
async fn serving_workload(url: &str) {
    let base = url.strip_suffix("/mcp").expect("an /mcp URL");
    let rpc = |method: &str, params: serde_json::Value| {
        Bytes::from(json!({"jsonrpc":"2.0","id":1,"method":method,"params":params}).to_string())
    };
    // A request whose answer may be an error: only its completion matters.
    async fn exchange(http: &Http, req: http::Request<Full<Bytes>>) {
        let resp = http.request(req).await;
        resp.into_body().collect().await.expect("a body");
    }
    let meta = json!({"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities":{}});
    for _ in 0..3 {
        let http = Http::one(url).await;
        let sid = open_session(&http, url).await;
        for method in [
            "tools/list",
            "prompts/list",
            "resources/list",
            "resources/templates/list",
            "ping",
        ] {
            post(&http, url, Some(&sid), rpc(method, json!({}))).await;
        }
        for _ in 0..20 {
            for tool in ["u0__echo", "ex__echo"] {
                let body = Workload::CallSmall.body(tool);
                let (_, answer) = post(&http, url, Some(&sid), body).await;
                assert!(
                    answer.windows(5).any(|w| w == b"hello"),
                    "{tool} answers: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
        }
        post(&http, url, Some(&sid), Workload::Call64k.body("u0__echo")).await;
        post(
            &http,
            url,
            Some(&sid),
            Workload::CallSmall.body("u0__absent"),
        )
        .await;
        post(&http, url, Some(&sid), rpc("absent/method", json!({}))).await;
        let stateless = |method: &str, name: Option<&str>, params: serde_json::Value| {
            let mut b = with_token(http::Request::post(url))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", method);
            if let Some(name) = name {
                b = b.header("mcp-name", name);
            }
            b.body(Full::new(rpc(method, params))).unwrap()
        };
        exchange(
            &http,
            stateless("server/discover", None, json!({"_meta": meta})),
        )
        .await;
        for _ in 0..20 {
            let body = Workload::CallStateless.body("u0__echo");
            let answer = post_stateless(&http, url, "u0__echo", body).await;
            assert!(
                answer.windows(5).any(|w| w == b"hello"),
                "a stateless call answers"
            );
        }
        exchange(&http, stateless("tools/list", None, json!({"_meta": meta}))).await;
        for path in ["/healthz", "/readyz", "/metrics"] {
            let req = with_token(http::Request::get(format!("{base}{path}")));
            exchange(&http, req.body(Full::new(Bytes::new())).unwrap()).await;
        }
        let delete = with_token(http::Request::delete(url))
            .header("mcp-session-id", &sid)
            .header("mcp-protocol-version", "2025-11-25");
        exchange(&http, delete.body(Full::new(Bytes::new())).unwrap()).await;
    }
}

/// The instructions each function of object `bin` ran by itself, from a callgrind profile
/// (`--demangle=no`, so names are the linker's). Names and objects are compressed: `(n) name`
/// defines `n`, a later `(n)` refers to it; the cost line after `calls=` is a callee's, not
/// the function's own.
fn self_costs(profile: &str, bin: &std::path::Path) -> BTreeMap<String, u64> {
    let bin = bin.to_str().unwrap_or_default();
    let mut names: [BTreeMap<String, String>; 2] = Default::default();
    let mut resolve = |kind: usize, v: &str| -> String {
        match v.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, rest)) if !rest.is_empty() => {
                let name = rest.trim_start().to_owned();
                names[kind].insert(id.to_owned(), name.clone());
                name
            }
            Some((id, _)) => names[kind].get(id).cloned().unwrap_or_default(),
            None => v.to_owned(),
        }
    };
    let mut costs = BTreeMap::new();
    let (mut in_bin, mut function, mut callee_line) = (false, String::new(), false);
    // A cost line is its positions (`line`, or `instr line` with --dump-instr) then the events
    // (`Ir` first).
    let mut cost_column = 1;
    for line in profile.lines() {
        if let Some(v) = line.strip_prefix("positions:") {
            cost_column = v.split_whitespace().count();
        } else if let Some(v) = line.strip_prefix("ob=") {
            in_bin = resolve(0, v) == bin;
        } else if let Some(v) = line.strip_prefix("cob=") {
            resolve(0, v);
        } else if let Some(v) = line.strip_prefix("fn=") {
            function = resolve(1, v);
            // A recursion level callgrind tells apart (`name'2`) is the same function.
            if let Some((name, level)) = function.rsplit_once('\'')
                && level.bytes().all(|b| b.is_ascii_digit())
            {
                function.truncate(name.len());
            }
        } else if let Some(v) = line.strip_prefix("cfn=") {
            resolve(1, v);
        } else if line.starts_with("calls=") {
            callee_line = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            if std::mem::take(&mut callee_line) || !in_bin {
                continue;
            }
            let n: u64 = line
                .split_whitespace()
                .nth(cost_column)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            *costs.entry(function.clone()).or_default() += n;
        }
    }
    costs
}
