//! Processes the gateway starts get only what they are given, and die with their owner: the
//! gateway's environment (its tokens) never reaches a server; stopping a server stops what it
//! started; a gateway killed with SIGKILL leaves no server process behind.
//!
//! Processes are found by a marker variable their definitions give them (inherited by their
//! children), read from `/proc/<pid>/environ`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse::orchestrator::Runtime;
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use gatehouse::orchestrator::spec::{EnvVarSpec, McpServerSpec, ServerDef};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{BIN, Client, TestGateway};

const MARK: &str = "GH_PROC_TEST_MARK";

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

/// Live (non-zombie) processes whose environment holds `MARK=mark`.
fn marked(mark: &str) -> Vec<u32> {
    let needle = format!("{MARK}={mark}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let zombie = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            == Some("Z");
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !zombie && environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills what a failed test left behind.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    t0.elapsed()
}

/// A `sh` command line that starts a grandchild (`sleep`) and then becomes `exec`.
fn with_grandchild(exec: &str) -> Vec<String> {
    vec!["-c".into(), format!("sleep 1000 & exec {exec}")]
}

/// The `gatehouse` binary serving `yaml` (a `listen:` line is added) with extra environment.
struct GatewayProcess {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

impl GatewayProcess {
    async fn start(yaml: &str, env: &[(&str, &str)]) -> GatewayProcess {
        GatewayProcess::start_as(yaml, env, None).await
    }

    /// [`start`](Self::start), as the user `uid` when given (with a `HOME` of that user's in
    /// the gateway's directory).
    async fn start_as(yaml: &str, env: &[(&str, &str)], uid: Option<u32>) -> GatewayProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = TempDir::new("gw");
        let config = dir.0.join("gateway.yaml");
        std::fs::write(&config, format!("listen: 127.0.0.1:{port}\n{yaml}")).unwrap();
        let mut command = std::process::Command::new(BIN);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            let home = dir.0.join("home");
            std::fs::create_dir_all(&home).unwrap();
            for path in [&dir.0, &home] {
                std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
            }
            command.uid(uid).gid(uid).env("HOME", &home);
        }
        let child = command.spawn().unwrap();
        let mut gw = GatewayProcess {
            child,
            port,
            _dir: dir,
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = gw.child.try_wait().unwrap() {
                panic!("the gateway exited ({status}) before listening");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the gateway never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    fn client(&self, token: Option<&str>) -> Client {
        let mut c = Client::new(format!("http://127.0.0.1:{}/mcp", self.port));
        c.token = token.map(str::to_owned);
        c
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(&format!("gatehouse-{what}")));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// server-everything's command line (node + script), when tests/tools/install.sh has run.
fn everything() -> Option<Vec<String>> {
    let command = std::env::var("GATEHOUSE_EVERYTHING").ok().or_else(|| {
        let env_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/env.sh");
        let text = std::fs::read_to_string(env_sh).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("export GATEHOUSE_EVERYTHING='"))
            .map(|v| v.trim_end_matches('\'').to_string())
    })?;
    let parts: Vec<String> = command.split_whitespace().map(String::from).collect();
    Path::new(parts.first()?).exists().then_some(parts)
}

fn get_env(text: &str) -> serde_json::Map<String, Value> {
    // server-everything answers with the JSON of its process.env.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::from_str::<Value>(&text[start..])
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        .as_object()
        .cloned()
        .unwrap()
}

/// (a) A gateway holding its client and admin tokens in its environment: neither server-everything
/// as a config stdio upstream nor as a server the gateway orchestrates sees them (nor any other
/// variable of the gateway's), while the variable its definition names is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_get_only_the_environment_their_definition_names() {
    let ev = everything()
        .expect("server-everything is installed (tests/tools/install.sh, which tests/run-all.sh runs first)");
    let client_token = unique("client-token-secret");
    let admin_token = unique("admin-token-secret");
    let stray = unique("gateway-only");
    let node = &ev[0];
    let mut args = ev[1..].to_vec();
    args.push("stdio".into());
    let args = json!(args);
    let yaml = format!(
        "auth: {{tokens: [{{principal: tester, token_env: GH_TEST_CLIENT_TOKEN}}]}}\n\
         admin: {{tokens: [{{principal: ops, token_env: GH_TEST_ADMIN_TOKEN}}]}}\n\
         upstreams:\n  - name: evs\n    stdio: {{command: {node:?}, args: {args}, env: {{NAMED_BY_DEFINITION: upstream}}}}\n    connect_timeout: 60s\n\
         servers:\n  - name: evo\n    command: {node:?}\n    args: {args}\n    env: [{{name: NAMED_BY_DEFINITION, value: orchestrated}}]\n\
         orchestrator: {{connect_timeout: 60s}}\n"
    );
    let gw = GatewayProcess::start(
        &yaml,
        &[
            ("GH_TEST_CLIENT_TOKEN", client_token.as_str()),
            ("GH_TEST_ADMIN_TOKEN", admin_token.as_str()),
            ("GH_TEST_GATEWAY_ONLY", stray.as_str()),
        ],
    )
    .await;
    let mut c = gw.client(Some(&client_token));
    c.initialize(json!({})).await;
    for (id, tool, named) in [
        (1, "evs__get-env", "upstream"),
        (2, "evo__get-env", "orchestrated"),
    ] {
        let text = c.tool_text(id, tool, json!({})).await;
        for secret in [&client_token, &admin_token, &stray] {
            assert!(
                !text.contains(secret.as_str()),
                "{tool} sees {secret}: {text}"
            );
        }
        let env = get_env(&text);
        assert_eq!(
            env.get("NAMED_BY_DEFINITION"),
            Some(&json!(named)),
            "{tool}: {text}"
        );
        assert_eq!(
            env.get("PATH"),
            Some(&json!(gatehouse::process::DEFAULT_PATH)),
            "{tool}: {text}"
        );
        let home = env.get("HOME").and_then(Value::as_str).unwrap_or_default();
        assert!(
            Path::new(home).is_dir() && std::env::var("HOME").ok().as_deref() != Some(home),
            "{tool}: HOME is the server's own directory: {text}"
        );
        for key in env.keys() {
            // Node adds nothing by itself; every variable is ours or the definition's.
            assert!(
                ["PATH", "HOME", "NAMED_BY_DEFINITION"].contains(&key.as_str()),
                "{tool}: unexpected variable {key}: {text}"
            );
        }
    }
}

/// (a) A config-file stdio upstream runs where its `cwd` says, and without one in an empty,
/// private directory of its own (never the gateway's, whose `.npmrc` or `uv.toml` could steer
/// its runner), removed when the process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_upstream_runs_where_its_cwd_says_or_in_a_directory_of_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let given = TempDir::new("cwd");
    let upstream = |name: &str, cwd: &str| {
        format!(
            "  - name: {name}\n    stdio: {{command: {BIN:?}, args: [example-server, --test-tools]{cwd}}}\n"
        )
    };
    let gw = TestGateway::start(
        "",
        &[
            upstream("own", ""),
            upstream("given", &format!(", cwd: {:?}", given.0)),
        ],
    )
    .await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    let cwd_of = |pid: String| std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let own = cwd_of(c.tool_text(1, "own__pid", json!({})).await);
    let explicit = cwd_of(c.tool_text(2, "given__pid", json!({})).await);
    assert_eq!(
        explicit,
        given.0.canonicalize().unwrap(),
        "an explicit cwd is kept"
    );
    let gateway_cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    assert!(!own.starts_with(&gateway_cwd), "{own:?} in {gateway_cwd:?}");
    let meta = std::fs::metadata(&own).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{own:?}");
    assert_eq!(
        std::fs::read_dir(&own).unwrap().count(),
        0,
        "{own:?} is empty"
    );
    gw.stop().await;
    wait_for("its directory removed", Duration::from_secs(10), || {
        !own.exists()
    })
    .await;
    assert!(
        given.0.exists(),
        "a given directory is the operator's: kept"
    );
}

/// (b) Ending a session stops its stdio upstream, and the upstream's own child with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_stops_the_upstreams_grandchildren() {
    let mark = unique("session");
    let _cleanup = Cleanup(mark.clone());
    let args = with_grandchild(&format!("{BIN} example-server --name gc"));
    let upstream = format!(
        "  - name: gc\n    stdio: {{command: sh, args: {}, env: {{{MARK}: {mark:?}}}}}\n",
        json!(args)
    );
    let gw = TestGateway::start("", &[upstream]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    assert_eq!(c.tool_text(1, "whoami", json!({})).await, "gc");
    // the server (sh became it) and its sleep
    wait_for(
        "the upstream and its grandchild",
        Duration::from_secs(10),
        || marked(&mark).len() == 2,
    )
    .await;
    let req = c
        .request("DELETE", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send(req).await;
    assert!(r.status < 300, "DELETE: {} {}", r.status, r.body);
    wait_for(
        "no process of the session's upstream",
        Duration::from_secs(10),
        || marked(&mark).is_empty(),
    )
    .await;
    gw.stop().await;
}

/// (b) Stopping a local orchestrated server stops what it started, also when the server ignores
/// its stdin closing (SIGTERM goes to its whole group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_local_server_stops_its_grandchildren() {
    let mark = unique("local");
    let _cleanup = Cleanup(mark.clone());
    let rt = LocalRuntime::new(LocalSettings {
        stop_grace: Duration::from_millis(300),
        ..LocalSettings::default()
    });
    let def = ServerDef {
        name: "gc".into(),
        spec: McpServerSpec {
            command: Some("sh".into()),
            args: with_grandchild("sleep 1001"),
            env: vec![EnvVarSpec {
                name: MARK.into(),
                value: Some(mark.clone()),
                ..EnvVarSpec::default()
            }],
            ..McpServerSpec::default()
        },
    };
    rt.apply(def.resolve().unwrap()).await.unwrap();
    rt.wait_ready("gc", Duration::from_secs(10)).await.unwrap();
    wait_for(
        "the server and its grandchild",
        Duration::from_secs(10),
        || marked(&mark).len() == 2,
    )
    .await;
    rt.remove("gc").await.unwrap();
    wait_for(
        "no process of the removed server",
        Duration::from_secs(5),
        || marked(&mark).is_empty(),
    )
    .await;
    rt.shutdown().await;
}

/// (c) SIGKILL gives the gateway no chance to stop anything: its stdio upstreams, its local
/// orchestrated servers and their children still go, within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_leaves_no_servers_behind() {
    let mark = unique("sigkill");
    let _cleanup = Cleanup(mark.clone());
    let args = json!(with_grandchild(&format!("{BIN} example-server --name s")));
    let yaml = format!(
        "upstreams:\n  - name: up\n    stdio: {{command: sh, args: {args}, env: {{{MARK}: {mark:?}}}}}\n\
         servers:\n  - name: orch\n    command: sh\n    args: {args}\n    env: [{{name: {MARK}, value: {mark:?}}}]\n"
    );
    let mut gw = GatewayProcess::start(&yaml, &[]).await;
    let mut c = gw.client(None);
    c.initialize(json!({})).await;
    assert_eq!(c.tool_text(1, "up__whoami", json!({})).await, "s");
    assert_eq!(c.tool_text(2, "orch__whoami", json!({})).await, "s");
    // two servers (sh became each), each with its sleep
    wait_for(
        "the servers and their grandchildren",
        Duration::from_secs(10),
        || marked(&mark).len() == 4,
    )
    .await;
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    let took = wait_for(
        "no server process after the gateway was killed",
        Duration::from_secs(10),
        || marked(&mark).is_empty(),
    )
    .await;
    println!("servers gone {took:?} after the gateway was SIGKILLed");
}

/// (e) A server running as the gateway's user cannot read the gateway's environment (its
/// tokens) through `/proc/<pid>/environ`, as it can any other process of that user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_the_gateways_user_cannot_read_its_environment() {
    use std::os::unix::process::CommandExt;
    // Root reads every process's entries: as root, the gateway and the reader run as nobody.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let uid = root.then_some(65534u32);
    let as_user = |command: &mut std::process::Command| {
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
    };
    let secret = unique("gateway-secret");
    let mut gw = GatewayProcess::start_as(
        "upstreams:\n  - name: up\n    stdio: {command: sh, args: [-c, 'exec cat']}\n",
        &[("GH_TEST_GATEWAY_SECRET", secret.as_str())],
        uid,
    )
    .await;
    let read = |pid: u32| {
        let mut cat = std::process::Command::new("cat");
        cat.arg(format!("/proc/{pid}/environ"));
        as_user(&mut cat);
        cat.output().unwrap()
    };
    // The reader can read a process of its user's that does not keep its entries private.
    let mut other = std::process::Command::new("sleep");
    other
        .arg("60")
        .env("GH_TEST_GATEWAY_SECRET", &secret)
        .stdin(Stdio::null());
    as_user(&mut other);
    let mut other = other.spawn().unwrap();
    let seen = read(other.id());
    let _ = other.kill();
    let _ = other.wait();
    assert!(
        String::from_utf8_lossy(&seen.stdout).contains(&secret),
        "a process of the same user is readable: {seen:?}"
    );
    // The gateway's are not.
    let seen = read(gw.child.id());
    assert!(
        !seen.status.success() && !String::from_utf8_lossy(&seen.stdout).contains(&secret),
        "{seen:?}"
    );
    assert!(
        String::from_utf8_lossy(&seen.stderr).contains("Permission denied"),
        "{seen:?}"
    );
    // And it still serves.
    assert!(gw.child.try_wait().unwrap().is_none());
}
