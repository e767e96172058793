//! Orchestrator benchmarks (`cargo bench --bench orchestrator`).
//!
//! 1. Local backend: time from a server definition to the first successful MCP
//!    `tools/list` answer, for the example server built into the gateway: straight from the
//!    runtime (the baseline), and through the gateway (admin API `PUT`, then a client session's
//!    `initialize` + `tools/list` on `/mcp`).
//! 2. Kubernetes backend against the fake API server (tests/fake_kube): CPU of the
//!    orchestrator — watches, reconcile loop, status — while it manages 10, 100 and 500
//!    servers: converging from nothing, idling, and repairing deleted Deployments.
//!    The orchestrator runs alone on a dedicated single-threaded Tokio runtime, so its
//!    thread's CPU time (/proc/.../schedstat) is its own, apart from the fake's.
//!
//! 3. Waking an idle server: from a sleeping server to the first `tools/list` answer, for
//!    the local backend (the baseline: the same from a definition, item 1) and on the fake
//!    API server (scale 0 → 1, pod start, attach).
//!
//! The server counts are 10, 100 and 500 (`ORCH_BENCH_SERVERS=10,100` to change them).
//! `ORCH_BENCH_QUICK=1` runs fewer iterations (a smoke run).

#[path = "../tests/fake_kube/mod.rs"]
mod fake_kube;

use std::time::{Duration, Instant};

use fake_kube::{FakeKube, Kind};
use gatehouse::orchestrator::kubernetes::{KubeOptions, KubeRuntime};
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use gatehouse::orchestrator::spec::{McpServerSpec, ServerDef};
use gatehouse::orchestrator::{Endpoint, Runtime};
use serde_json::json;

const GATEHOUSE: &str = env!("CARGO_BIN_EXE_gatehouse");

fn quick() -> bool {
    std::env::var_os("ORCH_BENCH_QUICK").is_some()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn local_definition_to_tools_list(iterations: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let rt = LocalRuntime::new(LocalSettings::default());
        let def = ServerDef {
            name: format!("bench{i}"),
            spec: McpServerSpec {
                command: Some(GATEHOUSE.into()),
                args: vec!["example-server".into()],
                ..McpServerSpec::default()
            },
        };
        let t0 = Instant::now();
        rt.apply(def.resolve().unwrap()).await.unwrap();
        let Endpoint::Stdio(ep) = rt
            .wait_ready(&def.name, Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("stdio endpoint expected");
        };
        let stream = ep.open().await.unwrap();
        let mut c = fake_kube::mcp::Mcp::new(stream);
        c.handshake().await;
        let list = c.call(2, "tools/list", json!({})).await;
        out.push(t0.elapsed());
        assert!(!fake_kube::mcp::tool_names(&list).is_empty());
        rt.shutdown().await;
    }
    out
}

/// A sleeping local server → its first `tools/list` answer (wake, start, attach, handshake).
async fn local_wake_to_tools_list(iterations: usize) -> Vec<Duration> {
    let rt = LocalRuntime::new(LocalSettings::default());
    let def = ServerDef {
        name: "napper".into(),
        spec: McpServerSpec {
            command: Some(GATEHOUSE.into()),
            args: vec!["example-server".into()],
            idle: Some(gatehouse::orchestrator::idle::IdleSpec { after: "1s".into() }),
            ..McpServerSpec::default()
        },
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let mut out = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        rt.wait_ready("napper", Duration::from_secs(10))
            .await
            .unwrap();
        let usage = rt.usage("napper").unwrap();
        while !usage.is_idle() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rt.sleep("napper").await.unwrap();
        assert_eq!(
            rt.status("napper").await.unwrap().phase,
            gatehouse::orchestrator::Phase::Asleep
        );
        let t0 = Instant::now();
        let Endpoint::Stdio(ep) = rt
            .wait_ready("napper", Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("stdio endpoint expected");
        };
        let mut c = fake_kube::mcp::Mcp::new(ep.open().await.unwrap());
        c.handshake().await;
        let list = c.call(2, "tools/list", json!({})).await;
        out.push(t0.elapsed());
        assert!(!fake_kube::mcp::tool_names(&list).is_empty());
    }
    rt.shutdown().await;
    out
}

/// The same on the fake API server: scale to zero, then a call scales back up.
async fn kube_wake_to_tools_list(iterations: usize) -> Vec<Duration> {
    const NS: &str = "wake";
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: false,
            ..KubeOptions::default()
        },
    );
    let def = ServerDef {
        name: "napper".into(),
        spec: McpServerSpec {
            image: Some("ghcr.io/gatehouse/example:1".into()),
            command: Some(GATEHOUSE.into()),
            args: vec!["example-server".into()],
            idle: Some(gatehouse::orchestrator::idle::IdleSpec { after: "1s".into() }),
            ..McpServerSpec::default()
        },
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let mut out = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        rt.wait_ready("napper", Duration::from_secs(20))
            .await
            .unwrap();
        let usage = loop {
            if let Some(u) = rt.usage("napper") {
                break u;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        while !usage.is_idle() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rt.sleep("napper").await.unwrap();
        // Asleep for real: the pod is gone.
        while fake.pod_of(NS, "mcp-napper").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = Instant::now();
        let Endpoint::Stdio(ep) = rt
            .wait_ready("napper", Duration::from_secs(20))
            .await
            .unwrap()
        else {
            panic!("stdio endpoint expected");
        };
        let mut c = fake_kube::mcp::Mcp::new(ep.open().await.unwrap());
        c.handshake().await;
        let list = c.call(2, "tools/list", json!({})).await;
        out.push(t0.elapsed());
        assert!(!fake_kube::mcp::tool_names(&list).is_empty());
        drop(c);
    }
    drop(rt);
    drop(fake);
    out
}

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// Definition through the admin API → first `tools/list` answered through the gateway.
async fn gateway_definition_to_tools_list(iterations: usize) -> Vec<Duration> {
    use http_body_util::{BodyExt, Full};
    let config = gatehouse::Config::from_yaml(&format!(
        "listen: 127.0.0.1:0\nadmin: {{tokens: [{{principal: bench, token: {ADMIN_TOKEN}}}]}}"
    ))
    .unwrap();
    let runtime: std::sync::Arc<dyn Runtime> =
        std::sync::Arc::new(LocalRuntime::new(LocalSettings::default()));
    let running = gatehouse::start_with(config, Some(runtime)).await.unwrap();
    let base = format!("http://{}", running.listening.local_addr);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let send = |req: http::Request<Full<bytes::Bytes>>| {
        let client = client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let session = resp.headers().get("mcp-session-id").cloned();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, session, body)
        }
    };
    let mcp = |session: Option<&http::HeaderValue>, body: serde_json::Value| {
        let mut b = http::Request::post(format!("{base}/mcp"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(s) = session {
            b = b.header("mcp-session-id", s);
        }
        b.body(Full::new(body.to_string().into())).unwrap()
    };
    let mut out = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let name = format!("bench{i}");
        let url = format!("{base}/admin/v1/servers/{name}");
        let spec = json!({"command": GATEHOUSE, "args": ["example-server"]});
        let t0 = Instant::now();
        let put = http::Request::put(&url)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(spec.to_string().into()))
            .unwrap();
        let (status, _, body) = send(put).await;
        assert_eq!(status, 201, "{body:?}");
        let init = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}});
        let (status, session, _) = send(mcp(None, init)).await;
        assert_eq!(status, 200);
        let list = json!({"jsonrpc":"2.0","id":2,"method":"tools/list"});
        let (status, _, body) = send(mcp(session.as_ref(), list)).await;
        out.push(t0.elapsed());
        assert_eq!(status, 200);
        assert!(
            String::from_utf8_lossy(&body).contains("\"echo\""),
            "{body:?}"
        );
        let delete = http::Request::delete(&url)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(send(delete).await.0, 204);
    }
    running.shutdown().await;
    out
}

/// CPU time (ns) a thread has run, from /proc/self/task/TID/schedstat.
fn thread_cpu_ns(tid: &str) -> u64 {
    let text =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct OrchestratorThread {
    handle: tokio::runtime::Handle,
    tid: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OrchestratorThread {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            let tid = link.file_name().unwrap().to_string_lossy().into_owned();
            tx.send((rt.handle().clone(), tid)).unwrap();
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let (handle, tid) = rx.recv().unwrap();
        OrchestratorThread {
            handle,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn cpu(&self) -> Duration {
        Duration::from_nanos(thread_cpu_ns(&self.tid))
    }

    async fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        self.handle.spawn(f).await.unwrap()
    }
}

impl Drop for OrchestratorThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits, inside the orchestrator's runtime, until it reports every server Ready.
/// Woken by status changes only, and counting without cloning, so the wait itself
/// adds little to the CPU measured.
async fn all_ready(
    orch: &OrchestratorThread,
    rt: &std::sync::Arc<KubeRuntime>,
    servers: usize,
    timeout: Duration,
) {
    let rt = rt.clone();
    orch.run(async move {
        let mut changes = rt.watch_statuses();
        let deadline = Instant::now() + timeout;
        loop {
            let (ready, _) = rt.ready_count();
            if ready == servers {
                return;
            }
            assert!(Instant::now() < deadline, "ready: {ready}/{servers}");
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
            // Coalesce bursts of changes.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

struct KubeFigures {
    servers: usize,
    converge: Duration,
    converge_cpu: Duration,
    idle_cpu: Duration,
    idle_for: Duration,
    repair_cpu: Duration,
    repaired: usize,
    requests: usize,
}

async fn kube_reconcile(servers: usize) -> KubeFigures {
    const NS: &str = "bench";
    let fake = FakeKube::start().await;
    let orch = OrchestratorThread::start();
    let client = {
        let url = fake.url();
        orch.run(async move {
            let mut config = kube::Config::new(url.parse().unwrap());
            config.default_namespace = NS.into();
            kube::Client::try_from(config).unwrap()
        })
        .await
    };
    let rt = std::sync::Arc::new(
        orch.run(async move {
            KubeRuntime::start_with_client(
                client,
                NS.into(),
                None,
                KubeOptions {
                    watch_mcpservers: false,
                    ..KubeOptions::default()
                },
            )
        })
        .await,
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // watches listed
    let cpu0 = orch.cpu();
    let t0 = Instant::now();
    {
        let rt = rt.clone();
        orch.run(async move {
            for i in 0..servers {
                let def = ServerDef {
                    name: format!("s{i:03}"),
                    spec: McpServerSpec {
                        image: Some("registry.example/idle:1".into()),
                        command: Some("sleep".into()),
                        args: vec!["3600".into()],
                        ..McpServerSpec::default()
                    },
                };
                rt.apply(def.resolve().unwrap()).await.unwrap();
            }
        })
        .await;
    }
    all_ready(&orch, &rt, servers, Duration::from_secs(120)).await;
    let converge = t0.elapsed();
    let converge_cpu = orch.cpu() - cpu0;

    // Idle: nothing changes, nothing should be done.
    let idle_for = Duration::from_secs(if quick() { 1 } else { 3 });
    let cpu1 = orch.cpu();
    tokio::time::sleep(idle_for).await;
    let idle_cpu = orch.cpu() - cpu1;

    // Repair: 10% of the Deployments deleted behind its back (with their Pods).
    let repaired = (servers / 10).max(1);
    let cpu2 = orch.cpu();
    for i in 0..repaired {
        fake.delete(Kind::Deployment, NS, &format!("mcp-s{i:03}"));
    }
    let t1 = Instant::now();
    loop {
        let back = (0..repaired)
            .filter(|i| {
                fake.get(Kind::Deployment, NS, &format!("mcp-s{i:03}"))
                    .is_some()
            })
            .count();
        if back == repaired {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "repair");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_ready(&orch, &rt, servers, Duration::from_secs(60)).await;
    let repair_cpu = orch.cpu() - cpu2;
    let requests = fake.requests().len();
    drop(rt);
    drop(orch);
    drop(fake);
    KubeFigures {
        servers,
        converge,
        converge_cpu,
        idle_cpu,
        idle_for,
        repair_cpu,
        repaired,
        requests,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = if quick() { 5 } else { 30 };
        let mut times = local_definition_to_tools_list(n).await;
        times.sort();
        println!(
            "local backend, definition → first tools/list (example server, {n} runs): p50 {:.1?}, p90 {:.1?}, min {:.1?}, max {:.1?}",
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            times[0],
            times[times.len() - 1]
        );
        let mut through = gateway_definition_to_tools_list(n).await;
        through.sort();
        println!(
            "through the gateway, admin PUT → session → first tools/list ({n} runs): p50 {:.1?}, p90 {:.1?}, min {:.1?}, max {:.1?}; p50 {:.2}x the runtime's own",
            percentile(&through, 0.5),
            percentile(&through, 0.9),
            through[0],
            through[through.len() - 1],
            percentile(&through, 0.5).as_secs_f64() / percentile(&times, 0.5).as_secs_f64()
        );

        let w = if quick() { 3 } else { 10 };
        let mut wakes = local_wake_to_tools_list(w).await;
        wakes.sort();
        println!(
            "local backend, asleep → first tools/list ({w} wakes): p50 {:.1?}, p90 {:.1?}; p50 {:.2}x a start from the definition",
            percentile(&wakes, 0.5),
            percentile(&wakes, 0.9),
            percentile(&wakes, 0.5).as_secs_f64() / percentile(&times, 0.5).as_secs_f64()
        );
        let mut kube_wakes = kube_wake_to_tools_list(w).await;
        kube_wakes.sort();
        println!(
            "kubernetes backend (fake API server), scaled to zero → first tools/list ({w} wakes): p50 {:.1?}, p90 {:.1?}; p50 {:.2}x the local wake",
            percentile(&kube_wakes, 0.5),
            percentile(&kube_wakes, 0.9),
            percentile(&kube_wakes, 0.5).as_secs_f64() / percentile(&wakes, 0.5).as_secs_f64()
        );

        let counts: Vec<usize> = std::env::var("ORCH_BENCH_SERVERS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![10, 100, 500]);
        let mut figures = Vec::new();
        for servers in counts {
            let f = kube_reconcile(servers).await;
            println!(
                "kubernetes backend, {:>3} servers: converge {:>7.1?} wall, {:>7.1?} CPU ({:>6.1?}/server); idle {:?}: {:.1?} CPU; repair {} deleted Deployments: {:.1?} CPU ({:.1?}/server); {} API requests",
                f.servers,
                f.converge,
                f.converge_cpu,
                f.converge_cpu / f.servers as u32,
                f.idle_for,
                f.idle_cpu,
                f.repaired,
                f.repair_cpu,
                f.repair_cpu / f.repaired as u32,
                f.requests,
            );
            figures.push(f);
        }
        let base = &figures[0];
        let per = |cpu: Duration, n: usize| cpu.as_secs_f64() / n as f64;
        for f in &figures[1..] {
            println!(
                "CPU per server, {} vs {} servers (1.00 = linear): converge {:.2}x, idle {:.2}x, repair {:.2}x (per repaired server)",
                f.servers,
                base.servers,
                per(f.converge_cpu, f.servers) / per(base.converge_cpu, base.servers),
                per(f.idle_cpu, f.servers) / per(base.idle_cpu, base.servers).max(1e-9),
                per(f.repair_cpu, f.repaired) / per(base.repair_cpu, base.repaired),
            );
        }
    });
}
