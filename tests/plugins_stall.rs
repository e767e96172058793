//! A plugin that spins to its deadline must not hold a runtime worker: while one session's
//! calls run the looping `fault-loop` plugin (several at once, each until its deadline),
//! another session's calls keep their latency.
//!
//! The runtime has two workers, like production on a two-core machine: two spinning calls
//! would otherwise own both for the whole deadline.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{TestGateway, example};

/// The looping plugin's deadline: what a stalled worker would cost another session.
const DEADLINE: Duration = Duration::from_millis(400);
/// Calls spinning at the same time (more than the runtime has workers).
const SPINNERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_plugin_does_not_delay_other_sessions() {
    let wasm = format!(
        "{}/target/plugins/fault_loop.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    assert!(
        std::path::Path::new(&wasm).exists(),
        "{wasm} is missing: run plugins/build.sh first"
    );
    // Spins on `add`, allows everything else (so the quiet session runs the plugin too).
    let cfg = format!(
        "plugins:\n  modules:\n    - {{ name: loop, path: {wasm:?}, deadline: {}ms, max_warm: 8, config: {{ trigger: add }} }}\n  chains:\n    - {{ name: calls, methods: [\"tools/call\"], plugins: [loop] }}",
        DEADLINE.as_millis()
    );
    // Two upstreams, so tools carry their server prefix.
    let gw = TestGateway::start(&cfg, &[example("a", &[], ""), example("b", &[], "")]).await;
    let mut noisy = gw.client();
    noisy.initialize(json!({})).await;
    let mut quiet = gw.client();
    quiet.initialize(json!({})).await;
    // Warm up the quiet path (upstream connection, plugin instance).
    assert_eq!(
        quiet.tool_text(1, "a__echo", json!({"text":"hi"})).await,
        "hi"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let denied = Arc::new(AtomicUsize::new(0));
    let mut spinners = Vec::new();
    for s in 0..SPINNERS {
        let (c, stop, started, denied) =
            (noisy.clone(), stop.clone(), started.clone(), denied.clone());
        spinners.push(tokio::spawn(async move {
            let mut id = 1000 * (s as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                started.fetch_add(1, Ordering::Relaxed);
                let r = c
                    .call(
                        id,
                        "tools/call",
                        json!({"name":"a__add","arguments":{"a":1,"b":2}}),
                    )
                    .await;
                // Every spinning call ends at its deadline, denied as a plugin failure.
                assert_eq!(r["error"]["code"], json!(-32031), "{r}");
                assert!(
                    r["error"]["message"].as_str().unwrap().contains("deadline"),
                    "{r}"
                );
                denied.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Every spinner has sent its first call (the window below spans several deadlines).
    support::eventually("spinners to start", || {
        let n = started.load(Ordering::Relaxed);
        async move { n >= SPINNERS }
    })
    .await;

    let mut latencies = Vec::new();
    let window = Instant::now();
    // Keep calling for a few deadlines, so spinners restart many times meanwhile.
    let mut id = 10;
    while window.elapsed() < DEADLINE * 4 || latencies.len() < 20 {
        id += 1;
        let t = Instant::now();
        let text = quiet.tool_text(id, "a__echo", json!({"text":"ping"})).await;
        latencies.push(t.elapsed());
        assert_eq!(text, "ping");
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.await.expect("spinner task");
    }
    assert!(
        denied.load(Ordering::Relaxed) >= SPINNERS * 2,
        "the spinners ran to their deadline repeatedly: {} denials",
        denied.load(Ordering::Relaxed)
    );

    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (p50, p99) = (p(0.5), p(0.99));
    eprintln!(
        "quiet session while {SPINNERS} calls spin to a {DEADLINE:?} deadline: {} calls, p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() - 1]
    );
    // A stalled worker shows up as latencies near the deadline (over a second at p50 before
    // hooks yielded); yielding every 1 ms tick keeps them to a few ms (bounds leave room for
    // a noisy machine).
    assert!(
        p50 < DEADLINE / 4 && p99 < DEADLINE,
        "quiet calls are held up by the spinning plugin: p50 {p50:?}, p99 {p99:?} (deadline {DEADLINE:?})"
    );
    gw.stop().await;
}

/// The epoch ticker that stops a looping guest sleeps once no guest has run for 100 ms. In
/// this process no other test runs plugins, so it does sleep here: a loop still ends at its
/// deadline when it starts after an idle spell (the ticker is woken), and when its deadline is
/// longer than the ticker's idle time (the ticker stays awake while the guest runs). Either
/// mistake would leave the loop spinning, which the test reports after 5 s.
#[test]
fn a_loop_is_stopped_at_its_deadline_whatever_the_ticker_was_doing() {
    use gatehouse::plugins::{CallContext, Decision, FaultKind, PluginSet, PluginsConfig};

    let root = env!("CARGO_MANIFEST_DIR");
    let cfg: PluginsConfig = serde_saphyr::from_str(&format!(
        "modules: [ {{ name: loop, path: \"{root}/target/plugins/fault_loop.wasm\", deadline: 400ms }} ]\nchains: [ {{ plugins: [loop] }} ]\nengine: {{ cache_dir: \"{root}/target/plugin-cache-tests\" }}\n"
    ))
    .unwrap();
    let set = PluginSet::load(&cfg).unwrap();
    for idle in [
        Duration::ZERO,
        Duration::from_millis(300),
        Duration::from_millis(300),
    ] {
        std::thread::sleep(idle);
        let (done, answer) = std::sync::mpsc::channel();
        let spinning = Arc::clone(&set);
        std::thread::spawn(move || {
            let ctx = CallContext {
                method: "tools/call",
                server: "s",
                name: Some("trigger"),
                principal: None,
                session_id: "s-1",
                profile: None,
                groups: &[],
                scopes: &[],
            };
            let _ = done.send(spinning.on_request_blocking(&ctx, "{}"));
        });
        let started = Instant::now();
        match answer.recv_timeout(Duration::from_secs(5)) {
            Ok(Decision::Deny(d)) => assert_eq!(d.fault, Some(FaultKind::Deadline)),
            Ok(other) => panic!("expected the deadline, got {other:?}"),
            Err(_) => panic!("the loop was never stopped (after {idle:?} idle)"),
        }
        assert!(started.elapsed() >= Duration::from_millis(350));
    }
}
