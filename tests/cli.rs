//! `gatehouse servers …` and `gatehouse registry …` against a running gateway: the binary
//! itself, run as an operator would.

mod support;

use std::sync::Arc;

use gatehouse::orchestrator::Runtime;
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use serde_json::{Value, json};
use support::BIN;

const ADMIN: &str = "cli-admin-token-0123456789";

struct Ran {
    ok: bool,
    out: String,
    err: String,
}

/// Runs `gatehouse ARGS` against the gateway at `addr`, with the admin token in the
/// environment as an operator's shell would have it.
async fn gatehouse(addr: std::net::SocketAddr, token: &str, args: &[&str]) -> Ran {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("GATEHOUSE_URL", format!("http://{addr}"))
        .env("GATEHOUSE_ADMIN_TOKEN", token)
        .output()
        .await
        .expect("runs");
    Ran {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_servers_and_the_registry_from_the_command_line() {
    let config = gatehouse::Config::from_yaml(&format!(
        "listen: 127.0.0.1:0\nadmin: {{tokens: [{{principal: ops, token: {ADMIN}}}]}}"
    ))
    .unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(LocalRuntime::new(LocalSettings::default()));
    let running = gatehouse::start_with(config, Some(runtime.clone()))
        .await
        .unwrap();
    let addr = running.listening.local_addr;
    let dir = std::env::temp_dir().join(format!("gatehouse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // The catalog: a table for people, JSON for scripts.
    let found = gatehouse(addr, ADMIN, &["registry", "search", "time"]).await;
    assert!(found.ok, "{}", found.err);
    let lines: Vec<&str> = found.out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("VERSION"),
        "{}",
        found.out
    );
    assert_eq!(lines.len(), 2, "{}", found.out);
    assert!(lines[1].starts_with("io.github.modelcontextprotocol/server-time"));
    let json = gatehouse(addr, ADMIN, &["registry", "search", "--json"]).await;
    let all: Value =
        serde_json::from_str(&json.out).unwrap_or_else(|e| panic!("{e}: {}", json.out));
    assert_eq!(all["servers"].as_array().unwrap().len(), 4, "{all}");

    // An import, then an install the local backend cannot run (an image): refused, nothing
    // installed.
    let doc = dir.join("server.json");
    std::fs::write(
        &doc,
        r#"{"name": "io.example/imaged", "description": "an image", "version": "1.0.0",
            "packages": [{"registryType": "oci", "identifier": "ghcr.io/example/imaged", "transport": {"type": "stdio"}}]}"#,
    )
    .unwrap();
    let imported = gatehouse(addr, ADMIN, &["registry", "import", doc.to_str().unwrap()]).await;
    assert!(imported.ok, "{}", imported.err);
    assert_eq!(
        imported.out.trim(),
        "published 1 version(s); 0 already there"
    );
    let install = gatehouse(addr, ADMIN, &["registry", "install", "io.example/imaged"]).await;
    assert!(!install.ok, "{}", install.out);
    assert!(
        install.err.contains("400") && install.err.contains("needs a command"),
        "{}",
        install.err
    );
    assert!(runtime.list().await.is_empty(), "nothing half-installed");
    let nobody = gatehouse(addr, ADMIN, &["registry", "uninstall", "imaged"]).await;
    assert!(!nobody.ok && nobody.err.contains("404"), "{}", nobody.err);

    // An entry that runs elsewhere: its remote is listed, installed with a header's value,
    // ready at once (nothing to start), and reached with that header.
    let recorder = support::recorder::Recorder::start().await;
    std::fs::write(
        &doc,
        json!({"name": "io.example/faraway", "description": "runs elsewhere", "version": "1.0.0",
            "remotes": [{"type": "streamable-http", "url": recorder.url,
                "headers": [{"name": "Authorization", "isSecret": true, "isRequired": true}]}]})
        .to_string(),
    )
    .unwrap();
    let imported = gatehouse(addr, ADMIN, &["registry", "import", doc.to_str().unwrap()]).await;
    assert!(imported.ok, "{}", imported.err);
    let found = gatehouse(addr, ADMIN, &["registry", "search", "faraway"]).await;
    assert!(
        found.out.contains("remote:streamable-http"),
        "{}",
        found.out
    );
    let labelled = gatehouse(
        addr,
        ADMIN,
        &[
            "registry",
            "label",
            "io.example/faraway",
            "1.0.0",
            "approved=yes",
            "team=tools",
        ],
    )
    .await;
    assert_eq!(
        labelled.out.trim(),
        "io.example/faraway 1.0.0: labels approved=yes, team=tools",
        "{}",
        labelled.err
    );
    let install = gatehouse(
        addr,
        ADMIN,
        &[
            "registry",
            "install",
            "io.example/faraway",
            "--remote",
            "0",
            "--set",
            "Authorization=Bearer cli-remote",
        ],
    )
    .await;
    assert!(install.ok, "{}{}", install.out, install.err);
    assert!(install.out.contains("faraway"), "{}", install.out);
    assert!(!install.out.contains("cli-remote"), "{}", install.out);
    let mut client = support::Client::new(format!("http://{addr}/mcp"));
    client.initialize(json!({})).await;
    assert_eq!(
        client.tool_text(1, "whoami", json!({})).await,
        "Bearer cli-remote"
    );
    let removed = gatehouse(addr, ADMIN, &["registry", "uninstall", "faraway"]).await;
    assert!(removed.ok, "{}", removed.err);

    // A server from a spec file: listed, its logs, restarted, removed.
    let spec = dir.join("spec.yaml");
    std::fs::write(
        &spec,
        format!("command: {BIN:?}\nargs: [example-server, --name, cli]\n"),
    )
    .unwrap();
    let added = gatehouse(
        addr,
        ADMIN,
        &[
            "servers",
            "add",
            "cli-server",
            "--file",
            spec.to_str().unwrap(),
        ],
    )
    .await;
    assert!(added.ok, "{}", added.err);
    support::eventually("the server ready", || async {
        let listed = gatehouse(addr, ADMIN, &["servers", "list"]).await;
        listed
            .out
            .lines()
            .any(|l| l.starts_with("cli-server ") && l.contains("ready"))
    })
    .await;
    let listed = gatehouse(addr, ADMIN, &["servers", "list", "--json"]).await;
    let listed: Value = serde_json::from_str(&listed.out).unwrap();
    assert_eq!(listed["servers"][0]["name"], "cli-server", "{listed}");
    let logs = gatehouse(
        addr,
        ADMIN,
        &["servers", "logs", "cli-server", "--tail", "5"],
    )
    .await;
    assert!(logs.ok, "{}", logs.err);
    let restarted = gatehouse(addr, ADMIN, &["servers", "restart", "cli-server"]).await;
    assert_eq!(
        restarted.out.trim(),
        "cli-server: restarting",
        "{}",
        restarted.err
    );
    let removed = gatehouse(addr, ADMIN, &["servers", "remove", "cli-server"]).await;
    assert!(removed.ok, "{}", removed.err);
    assert!(runtime.status("cli-server").await.is_err());

    // What the gateway refuses is said plainly, with a failing exit status.
    let denied = gatehouse(addr, "wrong-token", &["servers", "list"]).await;
    assert!(!denied.ok);
    assert!(denied.err.contains("401"), "{}", denied.err);
    let unknown = gatehouse(addr, ADMIN, &["registry", "show", "io.example/none"]).await;
    assert!(!unknown.ok);
    assert!(
        unknown.err.contains("404") && unknown.err.contains("not found"),
        "{}",
        unknown.err
    );
    let bad = gatehouse(
        addr,
        ADMIN,
        &["registry", "install", "x", "--set", "novalue"],
    )
    .await;
    assert!(!bad.ok);
    assert!(bad.err.contains("KEY=VALUE"), "{}", bad.err);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gatehouse serve` with no config, its stderr a pipe (a log, not a terminal), as a
/// service manager would run it; returns the child and what it said until it listened.
async fn serve_default(state: &std::path::Path, listen: &str) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", listen])
        .env("XDG_STATE_HOME", state)
        .env_remove("GATEHOUSE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = String::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            said.push_str(&line);
            said.push('\n');
            if line.starts_with("console: ") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), read).await;
    (child, said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_keeps_its_admin_token_out_of_the_log_and_off_the_network() {
    use std::os::unix::fs::PermissionsExt;
    let state = std::env::temp_dir().join(format!("gatehouse-cli-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap();

    // Its token is in a file only its user reads; the log says where, not what.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut child, said) = serve_default(&state, &format!("127.0.0.1:{port}")).await;
    let file = state.join("gatehouse/admin-token");
    assert!(said.contains(&format!("in {}", file.display())), "{said}");
    let token = std::fs::read_to_string(&file).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64, "32 random bytes as hex");
    assert!(!said.contains(token), "the token is not in the log: {said}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sessions =
        support::admin_request(addr, Some(token), "GET", "/admin/v1/sessions", None).await;
    assert_eq!(sessions.status, 200, "{}", sessions.body);
    let wrong = support::admin_request(
        addr,
        Some("x".repeat(64).as_str()),
        "GET",
        "/admin/v1/sessions",
        None,
    )
    .await;
    assert_eq!(wrong.status, 401);
    child.kill().await.unwrap();

    // Off loopback it has no credentials to ask for: it does not start.
    let (mut child, said) = serve_default(&state, "0.0.0.0:0").await;
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(!status.success());
    assert!(said.contains("loopback only"), "{said}");
    std::fs::remove_dir_all(&state).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_prints_new_output_once_and_no_terminal_controls() {
    use tokio::io::AsyncBufReadExt;
    let config = gatehouse::Config::from_yaml(&format!(
        "listen: 127.0.0.1:0\nadmin: {{tokens: [{{principal: ops, token: {ADMIN}}}]}}"
    ))
    .unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(LocalRuntime::new(LocalSettings::default()));
    let running = gatehouse::start_with(config, Some(runtime.clone()))
        .await
        .unwrap();
    let addr = running.listening.local_addr;
    // A server that writes a line every 300 ms (one with a terminal escape), then serves.
    let script = format!(
        "printf 'first\\n\\033]0;pwned\\007title\\n' >&2; for i in 1 2 3 4 5; do sleep 0.3; echo line-$i >&2; done; exec {BIN:?} example-server"
    );
    let spec = serde_json::json!({"command": "/bin/sh", "args": ["-c", script]});
    let r = support::admin_request(
        addr,
        Some(ADMIN),
        "PUT",
        "/admin/v1/servers/chatty",
        Some(spec),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    support::eventually("the first line logged", || async {
        let r = support::admin_request(
            addr,
            Some(ADMIN),
            "GET",
            "/admin/v1/servers/chatty/logs",
            None,
        )
        .await;
        r.body.contains("first")
    })
    .await;

    // The token from a file (not the command line, which every local user sees).
    let token_file =
        std::env::temp_dir().join(format!("gatehouse-cli-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["servers", "logs", "chatty", "--follow", "--token-file"])
        .arg(&token_file)
        .env("GATEHOUSE_URL", format!("http://{addr}"))
        .env_remove("GATEHOUSE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let read = async {
        while let Ok(Some(line)) = out.next_line().await {
            let done = line == "line-5";
            seen.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("line-5 never printed: {seen:?}"));
    child.kill().await.unwrap();
    assert_eq!(
        seen,
        [
            "first",
            "?]0;pwned?title",
            "line-1",
            "line-2",
            "line-3",
            "line-4",
            "line-5"
        ],
        "each line once, in order, its controls shown as ?"
    );
    let _ = std::fs::remove_file(&token_file);
    running.shutdown().await;
}

#[tokio::test]
async fn the_cli_does_not_send_its_token_in_the_clear_across_the_network() {
    let ran = gatehouse(
        "192.0.2.1:9000".parse().unwrap(),
        ADMIN,
        &["servers", "list"],
    )
    .await;
    assert!(!ran.ok);
    assert!(ran.err.contains("unencrypted"), "{}", ran.err);
    assert!(!ran.err.contains(ADMIN), "{}", ran.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_given_one_worker_thread_serves_concurrent_sessions() {
    let threads =
        serves_concurrent_sessions("{ workers: 1 }", "workers=1", Some("threads=1")).await;
    assert_eq!(threads, ["serving-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_connections_pinned_to_two_threads_serves_concurrent_sessions() {
    let threads =
        serves_concurrent_sessions("{ workers: 2 }", "workers=2", Some("threads=2")).await;
    assert_eq!(threads, ["serving-0", "serving-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_the_shared_runtime_serves_concurrent_sessions() {
    let config = "{ workers: 2, pinned_connections: false }";
    let threads = serves_concurrent_sessions(config, "workers=2", None).await;
    assert!(threads.is_empty(), "{threads:?}");
}

/// Runs a gateway with `runtime` settings, checks what its log says of them (`workers`, and
/// `pinned` when its connections are pinned to threads, else that they are not), serves
/// sessions in parallel through it; answers the names of its serving threads.
/// A free loopback port for a gateway, and a scratch directory named after it.
fn scratch(name: &str) -> (u16, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("gatehouse-{name}-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    (port, dir)
}

async fn serves_concurrent_sessions(
    runtime: &str,
    workers: &str,
    pinned: Option<&str>,
) -> Vec<String> {
    use tokio::io::AsyncBufReadExt;
    let (port, dir) = scratch("one-worker");
    let config = dir.join("gatehouse.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nruntime: {runtime}\nupstreams:\n{}",
            support::example("ex", &[], "")
        ),
    )
    .unwrap();
    let mut gateway = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("TOKIO_WORKER_THREADS")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    // The gateway says how many workers its runtime has, and whether connections are pinned
    // to threads, before it listens.
    let mut lines = tokio::io::BufReader::new(gateway.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut said = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let listening = line.contains("gatehouse listening");
            said.push(line);
            if listening {
                break;
            }
        }
        said
    })
    .await
    .expect("the gateway starts");
    let line = |what: &str| said.iter().find(|l| l.contains(what)).cloned();
    let started = line("runtime started").unwrap_or_default();
    assert!(started.contains(workers), "{said:?}");
    match (pinned, line("pinned to threads")) {
        (Some(threads), Some(l)) => assert!(l.contains(threads), "{said:?}"),
        (None, None) => {}
        (want, got) => panic!("pinned: wanted {want:?}, said {got:?}"),
    }
    // Keep reading its log, so a full pipe never stalls it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    support::eventually("the gateway listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    // Sessions in parallel, each with calls in flight together: nothing in the request path
    // may wait on a second worker.
    let url = format!("http://127.0.0.1:{port}/mcp");
    let sessions = (0..4).map(|s| {
        let url = url.clone();
        async move {
            let mut c = support::Client::new(url);
            c.initialize(json!({})).await;
            let calls = (0..8).map(|i| {
                let c = &c;
                async move {
                    let said = format!("s{s} c{i}");
                    let text = c.tool_text(i, "echo", json!({ "text": said })).await;
                    assert!(text.contains(&said), "{text}");
                }
            });
            futures::future::join_all(calls).await;
        }
    });
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join_all(sessions),
    )
    .await
    .expect("all calls answered");
    // The serving threads, and that each served: a thread that only waited was woken once (its
    // first park), one that served a single request about five times. Serving many calls on
    // a loaded machine wakes a thread less often than one might think (one wake takes every
    // connection ready by then): CI saw 6 and 9 for threads that served their share.
    let pid = gateway.id().expect("running");
    let mut threads: Vec<(String, u64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let task = t.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?;
            let status = std::fs::read_to_string(task.join("status")).ok()?;
            let woken = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            Some((name.trim().to_owned(), woken))
        })
        .filter(|(name, _)| name.starts_with("serving-"))
        .collect();
    threads.sort();
    for (name, woken) in &threads {
        assert!(
            *woken >= 3,
            "{name} was woken {woken} times: it served nothing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    threads.into_iter().map(|(name, _)| name).collect()
}

/// `plugins.engine.perf_map` names each compiled plugin function in `/tmp/perf-PID.map`
/// (where `perf` looks for JIT code); off, no file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_engine_writes_a_perf_map_only_when_asked() {
    use tokio::io::AsyncBufReadExt;
    let noop = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plugins/noop.wasm");
    assert!(
        std::path::Path::new(noop).exists(),
        "build the plugins first (plugins/build.sh)"
    );
    for perf_map in [true, false] {
        let (port, dir) = scratch("perf-map");
        let config = dir.join("gatehouse.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nupstreams:\n{}plugins:\n  modules:\n    - {{ name: noop, path: {noop:?} }}\n  chains:\n    - {{ plugins: [noop] }}\n  engine: {{ perf_map: {perf_map}, cache_dir: {:?} }}\n",
                support::example("ex", &[], ""),
                dir.join("cache"),
            ),
        )
        .unwrap();
        let mut gateway = tokio::process::Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("runs");
        let pid = gateway.id().expect("running");
        let map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
        let _ = std::fs::remove_file(&map);
        let mut lines = tokio::io::BufReader::new(gateway.stderr.take().unwrap()).lines();
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("gatehouse listening") {
                    return;
                }
            }
            panic!("the gateway ended before listening");
        })
        .await
        .expect("the gateway starts");
        // Plugins are loaded before the listener opens.
        let written = std::fs::read_to_string(&map).unwrap_or_default();
        let named = written
            .lines()
            .filter(|l| l.contains("wasm[0]::function["))
            .count();
        if perf_map {
            assert!(named > 10, "perf map {}:\n{written}", map.display());
        } else {
            assert_eq!(named, 0, "no perf map when not asked for: {written}");
        }
        gateway.kill().await.unwrap();
        let _ = std::fs::remove_file(&map);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A server process that writes its stderr as fast as it can does not flood the gateway's log:
/// at most 100 of its lines a second are logged, and the rest are counted in one line. Nor do
/// lines on its stdout that are not JSON-RPC: at most 5 a second are logged, each later one
/// telling how many were held back before it.
#[tokio::test]
async fn a_chatty_servers_stderr_and_stdout_junk_are_logged_within_a_rate() {
    use tokio::io::AsyncBufReadExt;
    let (port, dir) = scratch("chatty");
    let config = dir.join("gatehouse.yaml");
    // 20,000 lines on stderr, 20,000 junk lines on stdout, then an ordinary example server.
    let script = r#"i=0; while [ $i -lt 20000 ]; do echo "noise $i"; i=$((i+1)); done >&2; i=0; while [ $i -lt 20000 ]; do echo "junk $i"; i=$((i+1)); done; exec "$0" example-server --name loud"#;
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nupstreams:\n  - name: loud\n    stdio: {{ command: sh, args: [\"-c\", {script:?}, {BIN:?}] }}\n"
        ),
    )
    .unwrap();
    let mut gateway = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let mut lines = tokio::io::BufReader::new(gateway.stderr.take().unwrap()).lines();
    // The count in a line `… N <marker> …`.
    let count = |line: &str, marker: &str| {
        line.split(marker)
            .next()
            .filter(|_| line.contains(marker))
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.trim_start_matches('(').parse::<u64>().ok())
            .unwrap_or(0)
    };
    // A session starts the server; its first call waits until the noise is written.
    let url = format!("http://127.0.0.1:{port}/mcp");
    let (all_noise_heard, heard) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(async move {
        let (mut noise, mut counted, mut junk, mut junk_counted) = (0u64, 0u64, 0u64, 0u64);
        let mut all_noise_heard = Some(all_noise_heard);
        while let Ok(Some(line)) = lines.next_line().await {
            noise += u64::from(line.contains("stderr: noise"));
            counted += count(&line, " more stderr lines not logged");
            junk += u64::from(line.contains("ignoring non-JSON-RPC output on stdout"));
            junk_counted += count(&line, " more like it not logged");
            if noise + counted >= 20_000 {
                all_noise_heard.take().map(|tx| tx.send(()));
            }
        }
        (noise, counted, junk, junk_counted)
    });
    let mut client = None;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let mut c = support::Client::new(url.clone());
            c.initialize(serde_json::json!({})).await;
            client = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let c = client.expect("the gateway listens");
    assert_eq!(
        c.tool_text(1, "echo", serde_json::json!({"text": "heard"}))
            .await,
        "heard"
    );
    // The junk came before the server's first answer, so its lines were logged by now; the
    // stderr count is logged when its second ends.
    tokio::time::timeout(std::time::Duration::from_secs(30), heard)
        .await
        .expect("every stderr line logged or counted")
        .unwrap();
    let _ = gateway.kill().await;
    let (noise, counted, junk, junk_counted) =
        tokio::time::timeout(std::time::Duration::from_secs(30), reading)
            .await
            .expect("the gateway's stderr ends once it is killed")
            .unwrap();
    assert_eq!(noise + counted, 20_000);
    assert!(noise <= 500, "{noise} lines logged");
    assert!((1..=50).contains(&junk), "{junk} junk lines logged");
    // The last ones held back are told only with a next line logged (none came).
    assert!(junk + junk_counted <= 20_000, "{junk} + {junk_counted}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The example server's stdio: a burst of requests over pipes (as a gateway runs it) gets every
/// answer, each on a line of its own, and so do requests read from a file into a file (as
/// `gatehouse example-server < requests > answers` runs it: not pipes, read another way).
#[test]
fn the_example_server_answers_over_pipes_and_files() {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    const CALLS: u64 = 300;
    let mut requests = String::from(
        r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
    );
    requests.push('\n');
    for id in 1..=CALLS {
        requests.push_str(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"call {id}\"}}}}}}\n"
        ));
    }
    let check = |answers: &str| {
        let mut seen = std::collections::BTreeSet::new();
        for line in answers.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON answer per line ({e}): {line:?}"));
            let id = v["id"].as_u64().expect("an id");
            if id > 0 {
                assert_eq!(
                    v["result"]["content"][0]["text"],
                    format!("call {id}"),
                    "{v}"
                );
            }
            assert!(seen.insert(id), "answered twice: {id}");
        }
        assert_eq!(seen.len() as u64, CALLS + 1, "every request answered");
    };

    let mut child = Command::new(BIN)
        .arg("example-server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(requests.as_bytes()).map(|_| requests));
    let mut answers = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut answers)
        .unwrap();
    let requests = writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    check(&answers);

    let dir = std::env::temp_dir().join(format!("gatehouse-example-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("requests"), &requests).unwrap();
    let status = Command::new(BIN)
        .arg("example-server")
        .stdin(std::fs::File::open(dir.join("requests")).unwrap())
        .stdout(std::fs::File::create(dir.join("answers")).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    check(&std::fs::read_to_string(dir.join("answers")).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
