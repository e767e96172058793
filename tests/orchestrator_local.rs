//! The local backend end to end: child processes, restarts with backoff, logs, endpoints.

#[path = "fake_kube/mcp.rs"]
mod mcp;

use std::time::{Duration, Instant};

use gatehouse::orchestrator::backoff::Backoff;
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use gatehouse::orchestrator::spec::{
    EnvVarSpec, McpServerSpec, ServerDef, TransportKind, TransportSpec,
};
use gatehouse::orchestrator::{
    Endpoint, FailureReason, LogOptions, OrchestratorError, Phase, Runtime,
};
use mcp::{Mcp, tool_names};
use serde_json::json;

const GATEHOUSE: &str = env!("CARGO_BIN_EXE_gatehouse");

fn fast() -> LocalSettings {
    LocalSettings {
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(30),
        },
        stop_grace: Duration::from_millis(500),
        attach_timeout: Duration::from_secs(10),
        ..LocalSettings::default()
    }
}

fn server(name: &str, command: &str, args: &[&str]) -> ServerDef {
    ServerDef {
        name: name.into(),
        spec: McpServerSpec {
            command: Some(command.into()),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..McpServerSpec::default()
        },
    }
}

/// A loopback port nothing listens on for a server that never listens: below the ephemeral
/// range, so no client socket of this process takes it as its own end, and one per test, since
/// the runtime's check that a server's port is free binds it for a moment.
const NEVER_LISTENED_ON: [u16; 2] = [1, 2];

async fn open(rt: &LocalRuntime, name: &str) -> Mcp {
    match rt.endpoint(name).await.unwrap() {
        Endpoint::Stdio(s) => Mcp::new(s.open().await.unwrap()),
        other => panic!("expected stdio, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_server_serves_mcp_and_comes_back_after_a_crash() {
    let rt = LocalRuntime::new(fast());
    let def = server(
        "example",
        GATEHOUSE,
        &["example-server", "--test-tools", "--name", "local"],
    );
    let t0 = Instant::now();
    rt.apply(def.resolve().unwrap()).await.unwrap();
    rt.wait_ready("example", Duration::from_secs(10))
        .await
        .unwrap();
    let mut c = open(&rt, "example").await;
    c.handshake().await;
    let list = c.call(2, "tools/list", json!({})).await;
    println!("local: definition → first tools/list in {:?}", t0.elapsed());
    assert!(tool_names(&list).contains(&"crash".to_string()));

    // A newer attachment replaces the older one, whose reader sees the end.
    let mut c2 = open(&rt, "example").await;
    assert!(c.drain(Duration::from_secs(2)).await, "old attachment ends");
    let who = c2
        .call(3, "tools/call", json!({"name": "whoami", "arguments": {}}))
        .await;
    assert!(who.to_string().contains("local"), "{who}");

    // The process crashes: BackOff, then restarted.
    let mut states = rt.watch_status("example").unwrap();
    c2.send(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "crash", "arguments": {}}}))
        .await;
    assert!(
        c2.drain(Duration::from_secs(5)).await,
        "attachment ends with the process"
    );
    let backoff = tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| matches!(s.phase, Phase::BackOff { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(
        backoff.phase,
        Phase::BackOff {
            retry_in: Duration::from_millis(100)
        }
    );
    assert_eq!(backoff.restarts, 1);
    assert!(
        backoff
            .message
            .as_deref()
            .unwrap()
            .contains("exit status: 3"),
        "{backoff:?}"
    );
    rt.wait_ready("example", Duration::from_secs(10))
        .await
        .unwrap();
    let mut c3 = open(&rt, "example").await;
    c3.handshake().await;
    assert!(tool_names(&c3.call(2, "tools/list", json!({})).await).contains(&"echo".to_string()));

    // Restart on request: a fresh process, no backoff.
    rt.restart("example").await.unwrap();
    assert!(c3.drain(Duration::from_secs(5)).await);
    rt.wait_ready("example", Duration::from_secs(10))
        .await
        .unwrap();
    let mut c4 = open(&rt, "example").await;
    c4.handshake().await;
    assert_eq!(rt.status("example").await.unwrap().restarts, 2);

    rt.remove("example").await.unwrap();
    assert!(matches!(
        rt.status("example").await,
        Err(OrchestratorError::NotFound(_))
    ));
    assert!(
        c4.drain(Duration::from_secs(5)).await,
        "removing stops the process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_exponentially_up_to_the_cap() {
    let rt = LocalRuntime::new(fast());
    let def = server("flaky", "sh", &["-c", "echo run >&2; exit 1"]);
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let mut states = rt.watch_status("flaky").unwrap();
    let mut delays = Vec::new();
    while delays.len() < 5 {
        let st = tokio::time::timeout(
            Duration::from_secs(5),
            states.wait_for(|s| matches!(s.phase, Phase::BackOff { .. })),
        )
        .await
        .expect("backs off")
        .unwrap()
        .clone();
        if let Phase::BackOff { retry_in } = st.phase {
            delays.push(retry_in.as_millis());
        }
        tokio::time::timeout(
            Duration::from_secs(5),
            states.wait_for(|s| !matches!(s.phase, Phase::BackOff { .. })),
        )
        .await
        .unwrap()
        .unwrap();
    }
    assert_eq!(delays, [100, 200, 400, 400, 400]);
    // A server that never gets ready: the readiness wait gives up after a few exits.
    let mut def = server("flaky-http", "sh", &["-c", "exit 1"]);
    def.spec.transport = TransportSpec {
        kind: TransportKind::StreamableHttp,
        port: Some(NEVER_LISTENED_ON[0]),
        path: None,
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let err = rt
        .wait_ready("flaky-http", Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OrchestratorError::Failed {
                reason: FailureReason::CrashLoopBackOff,
                ..
            }
        ),
        "{err}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_keep_this_run_and_the_previous_one() {
    let rt = LocalRuntime::new(LocalSettings {
        log_bytes: 64,
        ..fast()
    });
    // An HTTP-transport server: stdout and stderr both go to the logs.
    let script = "i=0; while [ $i -lt 20 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; sleep 0.1; echo \"token=$API_TOKEN leak=$CARGO_PKG_NAME\"; sleep 0.2; exit 2";
    let mut def = server("noisy", "sh", &["-c", script]);
    def.spec.transport = TransportSpec {
        kind: TransportKind::StreamableHttp,
        port: Some(NEVER_LISTENED_ON[1]),
        path: None,
    };
    def.spec.env = vec![EnvVarSpec {
        name: "API_TOKEN".into(),
        secret_from_env: Some("TEST_TOKEN".into()),
        ..EnvVarSpec::default()
    }];
    let resolved = def
        .resolve_with(|k| (k == "TEST_TOKEN").then(|| "t0k".to_string()))
        .unwrap();
    rt.apply(resolved).await.unwrap();
    let mut states = rt.watch_status("noisy").unwrap();
    tokio::time::timeout(Duration::from_secs(5), states.wait_for(|s| s.restarts >= 1))
        .await
        .unwrap()
        .unwrap();
    let previous = rt
        .logs(
            "noisy",
            LogOptions {
                previous: true,
                tail_lines: None,
            },
        )
        .await
        .unwrap();
    assert!(previous.len() <= 64, "bounded: {previous:?}");
    assert!(
        previous.contains("token=t0k leak=\n"),
        "secret passed, the gateway's env not: {previous:?}"
    );
    let tail = rt
        .logs(
            "noisy",
            LogOptions {
                previous: true,
                tail_lines: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(tail, "token=t0k leak=\n");
    rt.shutdown().await;

    // A stdio server: stdout is the MCP channel, only stderr is logged.
    let rt = LocalRuntime::new(fast());
    let def = server("quiet", GATEHOUSE, &["example-server"]);
    rt.apply(def.resolve().unwrap()).await.unwrap();
    rt.wait_ready("quiet", Duration::from_secs(10))
        .await
        .unwrap();
    let mut c = open(&rt, "quiet").await;
    c.handshake().await;
    let logs = rt.logs("quiet", LogOptions::default()).await.unwrap();
    assert!(
        !logs.contains("protocolVersion"),
        "protocol traffic is not logged: {logs}"
    );
    let err = rt
        .logs(
            "quiet",
            LogOptions {
                previous: true,
                tail_lines: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, OrchestratorError::NoLogs { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_is_ready_when_its_port_accepts() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let rt = LocalRuntime::new(fast());
    let mut def = server(
        "web",
        GATEHOUSE,
        &["example-server", "--http", &format!("127.0.0.1:{port}")],
    );
    def.spec.transport = TransportSpec {
        kind: TransportKind::StreamableHttp,
        port: Some(port),
        path: None,
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let url = match rt.wait_ready("web", Duration::from_secs(10)).await.unwrap() {
        Endpoint::Http { url } => url,
        other => panic!("{other:?}"),
    };
    assert_eq!(url, format!("http://127.0.0.1:{port}/mcp"));
    // Speak MCP over HTTP with a raw request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    .to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("protocolVersion"), "{answer}");
    rt.shutdown().await;
}

/// The gateway reaches a local HTTP server by its port alone: two servers may not share one
/// (one would take the other's calls), and a port another program holds is never taken for a
/// server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_belongs_to_one_server() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let on_port = |name: &str| {
        let mut def = server(
            name,
            GATEHOUSE,
            &["example-server", "--http", &format!("127.0.0.1:{port}")],
        );
        def.spec.transport = TransportSpec {
            kind: TransportKind::StreamableHttp,
            port: Some(port),
            path: None,
        };
        def.resolve().unwrap()
    };
    let rt = LocalRuntime::new(fast());
    rt.apply(on_port("alpha")).await.unwrap();
    // Another program listens there: alpha is not ready, and says why.
    let err = rt
        .wait_ready("alpha", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("taken by another program"),
        "{err}"
    );
    // A second server on alpha's port is refused, alone or in a set.
    let err = rt.apply(on_port("beta")).await.unwrap_err();
    assert!(matches!(err, OrchestratorError::Conflict(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("\"alpha\" listens on port {port} already")),
        "{err}"
    );
    let err = rt
        .sync(vec![on_port("alpha"), on_port("beta")])
        .await
        .unwrap_err();
    assert!(matches!(err, OrchestratorError::Conflict(_)), "{err}");
    assert!(rt.watch_status("beta").is_err(), "beta never started");
    // Once the port is free, alpha's next try takes it.
    drop(holder);
    let mut status = rt.watch_status("alpha").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s.phase, Phase::Ready)),
    )
    .await
    .expect("alpha becomes ready")
    .unwrap();
    rt.shutdown().await;
}

/// Listens on 127.0.0.1:`port` as user `nobody` (another user than the gateway's) until
/// killed; `None` when this process may not switch users (not root).
fn squat_as_another_user(port: u16) -> Option<std::process::Child> {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").ok()?.uid() != 0 {
        return None;
    }
    let script = format!(
        "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port}))\ns.listen()\nprint('listening', flush=True)\ntime.sleep(120)"
    );
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv and /usr/bin/python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "listening",
        "the squatter could not bind {port}"
    );
    Some(child)
}

/// Starts `name`, an HTTP server on a free port that runs `then` (a shell command, given the
/// port) once started, and returns when its process has started (after the spawn's check of
/// the port), with the port and the server's status.
async fn start_http_server_then(
    rt: &LocalRuntime,
    name: &str,
    then: impl FnOnce(u16) -> String,
) -> (
    u16,
    tokio::sync::watch::Receiver<gatehouse::orchestrator::ServerStatus>,
) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::env::temp_dir().join(format!("gatehouse-{name}-{port}"));
    let _ = std::fs::remove_file(&started);
    let script = format!("touch {started:?}; {}", then(port));
    let mut def = server(name, "sh", &["-c", &script]);
    def.spec.transport = TransportSpec {
        kind: TransportKind::StreamableHttp,
        port: Some(port),
        path: None,
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let status = rt.watch_status(name).unwrap();
    while !started.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(&started);
    (port, status)
}

/// Another user's program that takes a server's port after the server was started (before
/// the server binds it) answers there, but is not taken for the server: the server is ready
/// only when what listens where the gateway connects is its own user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_by_another_user_is_not_taken_for_the_server() {
    let rt = LocalRuntime::new(fast());
    // The server waits before it binds, as a slow one does.
    let (port, mut status) = start_http_server_then(&rt, "slowbind", |port| {
        format!("sleep 1; exec {GATEHOUSE} example-server --http 127.0.0.1:{port}")
    })
    .await;
    let Some(mut squatter) = squat_as_another_user(port) else {
        eprintln!("not root: another user's program cannot be started here");
        return;
    };
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| {
            matches!(s.phase, Phase::Ready)
                || s.message
                    .as_deref()
                    .is_some_and(|m| m.contains("held by another user's program"))
        }),
    )
    .await
    .expect("the squatter is noticed")
    .unwrap()
    .clone();
    assert!(!matches!(seen.phase, Phase::Ready), "{seen:?}");
    // Once it lets go, the server's next try takes the port, and the message goes.
    squatter.kill().unwrap();
    squatter.wait().unwrap();
    let ready = tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| matches!(s.phase, Phase::Ready)),
    )
    .await
    .expect("the server becomes ready")
    .unwrap()
    .clone();
    assert!(ready.message.is_none(), "{ready:?}");
    let endpoint = rt.endpoint("slowbind").await.unwrap();
    assert!(
        format!("{endpoint:?}").contains(&port.to_string()),
        "{endpoint:?}"
    );
    rt.shutdown().await;
}

/// A program of the gateway's own user on the port is not told apart from the server (that
/// user can do anything to the gateway already), but one of another user's that takes a ready
/// server's port (while it rebinds, say) makes the server not ready until it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_servers_port_taken_by_another_user_makes_it_not_ready() {
    // The server (a stand-in that never binds) is answered for by a listener of the gateway's
    // user (this test), which then goes, as a rebinding server's does for a moment.
    let rt = LocalRuntime::new(fast());
    let (port, mut status) =
        start_http_server_then(&rt, "rebinds", |_| "exec sleep 120".to_owned()).await;
    let own = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s.phase, Phase::Ready)),
    )
    .await
    .expect("a listener of the gateway's user is taken for the server")
    .unwrap();
    drop(own);
    let Some(mut squatter) = squat_as_another_user(port) else {
        eprintln!("not root: another user's program cannot be started here");
        return;
    };
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| !matches!(s.phase, Phase::Ready)),
    )
    .await
    .expect("the ready server is seen to lose its port")
    .unwrap()
    .clone();
    assert!(
        seen.message
            .as_deref()
            .is_some_and(|m| m.contains("held by another user's program")),
        "{seen:?}"
    );
    squatter.kill().unwrap();
    squatter.wait().unwrap();
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_executable_fails_fast() {
    let rt = LocalRuntime::new(fast());
    let def = server("ghost", "/nonexistent/mcp-server", &[]);
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let err = rt
        .wait_ready("ghost", Duration::from_secs(5))
        .await
        .unwrap_err();
    match err {
        OrchestratorError::Failed {
            reason, message, ..
        } => {
            assert_eq!(reason, FailureReason::SpawnFailed);
            assert!(message.unwrap().contains("/nonexistent/mcp-server"));
        }
        other => panic!("{other}"),
    }
    let image_only = ServerDef {
        name: "img".into(),
        spec: McpServerSpec {
            image: Some("ghcr.io/x/y:1".into()),
            ..McpServerSpec::default()
        },
    };
    let err = rt.apply(image_only.resolve().unwrap()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the local backend needs a command"),
        "{err}"
    );
    rt.shutdown().await;
}

/// `@modelcontextprotocol/server-everything` over stdio, when the test tools are installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio() {
    let command = std::env::var("GATEHOUSE_EVERYTHING").ok().or_else(|| {
        let env_sh = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/env.sh");
        let text = std::fs::read_to_string(env_sh).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("export GATEHOUSE_EVERYTHING='"))
            .map(|v| v.trim_end_matches('\'').to_string())
    });
    let Some(command) = command else {
        println!(
            "skipped: target/tools/env.sh not found (run tests/tools/install.sh for server-everything)"
        );
        return;
    };
    let mut parts = command.split_whitespace();
    let program = parts.next().unwrap().to_string();
    let args: Vec<&str> = parts.collect();
    if !std::path::Path::new(&program).exists() {
        println!("skipped: {program} is not installed");
        return;
    }
    let rt = LocalRuntime::new(fast());
    let t0 = Instant::now();
    rt.apply(server("everything", &program, &args).resolve().unwrap())
        .await
        .unwrap();
    rt.wait_ready("everything", Duration::from_secs(30))
        .await
        .unwrap();
    let mut c = open(&rt, "everything").await;
    let init = c.handshake().await;
    assert!(init["result"]["serverInfo"]["name"].is_string(), "{init}");
    let list = c.call(2, "tools/list", json!({})).await;
    println!(
        "server-everything: definition → first tools/list in {:?}",
        t0.elapsed()
    );
    let names = tool_names(&list);
    assert!(names.iter().any(|n| n == "echo"), "{names:?}");
    let echo = c
        .call(
            3,
            "tools/call",
            json!({"name": "echo", "arguments": {"message": "hi from gatehouse"}}),
        )
        .await;
    assert!(echo.to_string().contains("hi from gatehouse"), "{echo}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_makes_the_configured_set_exact() {
    let rt = LocalRuntime::new(fast());
    let a = server("a", "sleep", &["30"]).resolve().unwrap();
    let b = server("b", "sleep", &["30"]).resolve().unwrap();
    rt.sync(vec![a.clone(), b]).await.unwrap();
    rt.wait_ready("a", Duration::from_secs(5)).await.unwrap();
    let since = rt.status("a").await.unwrap().since;
    rt.sync(vec![a]).await.unwrap();
    let names: Vec<String> = rt.list().await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a"]);
    let st = rt.status("a").await.unwrap();
    assert!(
        st.is_ready() && st.since == since,
        "an unchanged server is left running"
    );
    rt.shutdown().await;
}

/// The working directory of the server process `name` (asked for its pid by the `pid` test
/// tool), read from `/proc`.
async fn cwd_of(rt: &LocalRuntime, name: &str) -> std::path::PathBuf {
    rt.wait_ready(name, Duration::from_secs(10)).await.unwrap();
    let mut c = open(rt, name).await;
    c.handshake().await;
    let r = c
        .call(2, "tools/call", json!({"name": "pid", "arguments": {}}))
        .await;
    let pid = r["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

/// A server whose definition names no directory starts in one of its own: not the gateway's
/// (where a `.npmrc` or `uv.toml` could steer its runner), nor under it, empty, private
/// (0700), another for each server and each start, and removed with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_in_an_empty_private_directory_of_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let rt = LocalRuntime::new(fast());
    let gateway_cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    for name in ["one", "two"] {
        let def = server(name, GATEHOUSE, &["example-server", "--test-tools"]);
        rt.apply(def.resolve().unwrap()).await.unwrap();
    }
    let one = cwd_of(&rt, "one").await;
    let two = cwd_of(&rt, "two").await;
    for dir in [&one, &two] {
        assert!(!dir.starts_with(&gateway_cwd), "{dir:?} in {gateway_cwd:?}");
        let meta = std::fs::metadata(dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{dir:?}");
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            0,
            "{dir:?} is empty"
        );
    }
    assert_ne!(one, two, "each server its own");
    // What a run leaves there is not the next run's: a restart starts in a new, empty one.
    std::fs::write(one.join(".npmrc"), "registry=http://127.0.0.1:1/\n").unwrap();
    rt.restart("one").await.unwrap();
    let start = Instant::now();
    while one.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "{one:?} removed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let again = cwd_of(&rt, "one").await;
    assert_ne!(again, one);
    assert_eq!(std::fs::read_dir(&again).unwrap().count(), 0);
    // Removed with the server.
    rt.remove("two").await.unwrap();
    assert!(!two.exists(), "{two:?} removed with its server");
    rt.shutdown().await;
    assert!(!again.exists(), "{again:?} removed at shutdown");
}

/// A secret delivered as a file: the process's variable holds the path of a read-only file
/// (0400, in a private 0700 directory) with the secret, which is in no process environment;
/// the directory goes with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_as_files_are_private_files_the_variable_points_to() {
    use std::os::unix::fs::PermissionsExt;
    // What a gateway that was killed left behind is swept by the next one; a live one's is not.
    let tmp = std::env::temp_dir();
    let dead = tmp.join("gatehouse-secrets-999999999-gone-0000000000000000");
    let live = tmp.join(format!(
        "gatehouse-secrets-{}-kept-0000000000000000",
        std::process::id()
    ));
    for d in [&dead, &live] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("TOKEN"), "left").unwrap();
    }
    let rt = LocalRuntime::new(fast());
    assert!(!dead.exists(), "swept");
    assert!(live.exists(), "a live gateway's is kept");
    std::fs::remove_dir_all(&live).unwrap();
    let mut def = server(
        "filed",
        GATEHOUSE,
        &["example-server", "--test-tools", "--name", "filed"],
    );
    def.spec.env = vec![
        EnvVarSpec {
            name: "API_TOKEN_FILE".into(),
            secret_value: Some("s3cret-in-a-file".into()),
            as_file: true,
            ..EnvVarSpec::default()
        },
        EnvVarSpec {
            name: "PLAIN".into(),
            value: Some("visible".into()),
            ..EnvVarSpec::default()
        },
    ];
    rt.apply(def.resolve().unwrap()).await.unwrap();
    rt.wait_ready("filed", Duration::from_secs(10))
        .await
        .unwrap();
    let mut c = open(&rt, "filed").await;
    c.handshake().await;
    let r = c
        .call(2, "tools/call", json!({"name": "pid", "arguments": {}}))
        .await;
    let pid = r["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(vars.contains(&"PLAIN=visible".to_owned()), "{vars:?}");
    assert!(
        !vars.iter().any(|v| v.contains("s3cret-in-a-file")),
        "the secret is in no environment"
    );
    let path = vars
        .iter()
        .find_map(|v| v.strip_prefix("API_TOKEN_FILE="))
        .expect("the variable names the file");
    let path = std::path::Path::new(path);
    assert_eq!(std::fs::read_to_string(path).unwrap(), "s3cret-in-a-file");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path), 0o400);
    let dir = path.parent().unwrap().to_owned();
    assert_eq!(mode(&dir), 0o700);

    // Gone behind its back (a cleaner of /tmp, the server itself): written again before the
    // process starts again.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut states = rt.watch_status("filed").unwrap();
    c.send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                  "params": {"name": "crash", "arguments": {}}}))
        .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| s.restarts >= 1 && s.phase == Phase::Ready),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), "s3cret-in-a-file");
    assert_eq!(mode(path), 0o400);

    rt.remove("filed").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dir.exists(), "removed with the server");

    // Only a secret can be a file.
    let mut bad = server("bad", GATEHOUSE, &["example-server"]);
    bad.spec.env = vec![EnvVarSpec {
        name: "X".into(),
        value: Some("plain".into()),
        as_file: true,
        ..EnvVarSpec::default()
    }];
    let err = bad.resolve().unwrap_err();
    assert_eq!(err.field, "env[0].asFile", "{err}");
    bad.spec.env = vec![EnvVarSpec {
        name: "..".into(),
        secret_value: Some("x".into()),
        as_file: true,
        ..EnvVarSpec::default()
    }];
    assert_eq!(bad.resolve().unwrap_err().field, "env[0].name");
}

/// Sleep and wake at the runtime: a sleep that a call overtakes settles at once (it holds
/// the server's lock, so it must not wait for a stop that will not come), a restart of a
/// sleeping server does nothing (and leaves nothing armed to kill the next process), and
/// the default idle time applies only to servers that do not say `never`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_wake_restart_and_a_sleep_overtaken_by_a_call() {
    let rt = std::sync::Arc::new(LocalRuntime::new(LocalSettings {
        idle_after: Some(Duration::from_secs(1)),
        ..fast()
    }));
    let mut never = server("insomniac", GATEHOUSE, &["example-server"]);
    never.spec.idle = Some(gatehouse::orchestrator::idle::IdleSpec {
        after: "never".into(),
    });
    rt.apply(never.resolve().unwrap()).await.unwrap();
    assert!(
        rt.usage("insomniac").is_none(),
        "never opts out of the default"
    );
    let def = server("napper", GATEHOUSE, &["example-server", "--test-tools"]);
    rt.apply(def.resolve().unwrap()).await.unwrap();
    rt.wait_ready("napper", Duration::from_secs(10))
        .await
        .unwrap();
    let usage = rt.usage("napper").expect("the default applies");
    let idle = Instant::now();
    while !usage.is_idle() {
        assert!(idle.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A sleep and a call at once: both finish, and the server ends up serving.
    let (slept, ready) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(8), rt.sleep("napper")),
        tokio::time::timeout(
            Duration::from_secs(8),
            rt.wait_ready("napper", Duration::from_secs(8))
        )
    );
    slept.expect("the sleep settles").unwrap();
    if ready.expect("the call is served").is_err() {
        // The call came first and the sleep after it: the next call wakes it.
        rt.wait_ready("napper", Duration::from_secs(8))
            .await
            .unwrap();
    }
    rt.wait_ready("napper", Duration::from_secs(8))
        .await
        .unwrap();

    // Asleep, a restart changes nothing; the woken process is not killed under its caller.
    while !usage.is_idle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.sleep("napper").await.unwrap();
    assert_eq!(rt.status("napper").await.unwrap().phase, Phase::Asleep);
    let restarts = rt.status("napper").await.unwrap().restarts;
    rt.restart("napper").await.unwrap();
    assert_eq!(rt.status("napper").await.unwrap().phase, Phase::Asleep);
    rt.wait_ready("napper", Duration::from_secs(8))
        .await
        .unwrap();
    let mut mcp = open(&rt, "napper").await;
    mcp.handshake().await;
    let list = mcp.call(2, "tools/list", json!({})).await;
    assert!(tool_names(&list).contains(&"pid".to_string()));
    let pid = mcp
        .call(3, "tools/call", json!({"name": "pid", "arguments": {}}))
        .await;
    assert!(pid["result"].is_object(), "{pid}");
    let st = rt.status("napper").await.unwrap();
    assert_eq!(st.phase, Phase::Ready);
    assert_eq!(st.restarts, restarts, "no restart happened: {st:?}");
}

/// The gateway reaches a local backend's remotes from its own machine: whatever a remote's
/// host name resolves to, a link-local address (a cloud's metadata service) is refused at
/// each connection; this machine's and its network's addresses are the operator's to reach.
#[test]
fn remotes_never_reach_link_local_addresses() {
    let rt = LocalRuntime::new(fast());
    let check = rt
        .remote_addresses()
        .expect("the local backend checks addresses");
    for refused in [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "fd00:ec2::254",
        "100.100.100.200",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::",
    ] {
        let err = check(refused.parse().unwrap()).unwrap_err();
        assert!(err.contains("metadata"), "{refused}: {err}");
    }
    for allowed in [
        "127.0.0.1",
        "10.1.2.3",
        "::1",
        "93.184.216.34",
        "64:ff9b::5db8:d822",
    ] {
        assert!(check(allowed.parse().unwrap()).is_ok(), "{allowed}");
    }
}
