//! The admin API under concurrent changes to one server, and the definitions it refuses.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse::orchestrator::Runtime;
use gatehouse::orchestrator::backoff::Backoff;
use gatehouse::orchestrator::local::{LocalRuntime, LocalSettings};
use serde_json::{Value, json};
use support::{BIN, Resp, TestGateway};

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

fn local() -> Arc<dyn Runtime> {
    Arc::new(LocalRuntime::new(LocalSettings {
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(30),
        },
        stop_grace: Duration::from_millis(500),
        ..LocalSettings::default()
    }))
}

/// A gateway with no servers of its own, an admin token and the local backend.
async fn gateway() -> TestGateway {
    let yaml = format!(
        "listen: 127.0.0.1:0\nauth: {{tokens: [{{principal: app, token: {CLIENT_TOKEN}}}]}}\nadmin: {{tokens: [{{principal: ops, token: {ADMIN_TOKEN}}}]}}\nservers: []\n"
    );
    let config = gatehouse::Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = gatehouse::start_with(config, Some(local()))
        .await
        .expect("gateway starts");
    let addr = running.listening.local_addr;
    TestGateway {
        running: Some(running),
        addr,
    }
}

/// An admin API request with the admin token.
async fn admin(
    gw_addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    support::admin_request(gw_addr, Some(ADMIN_TOKEN), method, path, body).await
}

/// Pids of the processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between listing and reading: that is not a match.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.windows(marker.len()).any(|w| w == marker.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls until exactly `want` processes carry `marker`, or panics with what is running.
async fn expect_processes(marker: &str, want: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids = processes_with(marker);
        if pids.len() == want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: expected {want} processes with {marker:?}, found {pids:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(marker: &str, n: usize) -> Value {
    json!({"command": BIN, "args": ["example-server", "--name", format!("{marker}-{n}")]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_changes_to_one_name_leaves_no_process_behind() {
    let gw = gateway().await;
    let addr = gw.addr;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Unique to this run, so processes of other tests (or runs) never count.
    let marker = format!("storm{}x{nanos}", std::process::id());
    let path = "/admin/v1/servers/storm";

    const WORKERS: usize = 8;
    const ROUNDS: usize = 12;
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let marker = marker.clone();
            tokio::spawn(async move {
                for r in 0..ROUNDS {
                    // Mostly PUTs of distinct definitions (each replaces the running one),
                    // with DELETEs and restarts mixed in.
                    let r = match (w + r) % 5 {
                        0 => admin(addr, "DELETE", path, None).await,
                        1 => admin(addr, "POST", &format!("{path}/restart"), None).await,
                        _ => admin(addr, "PUT", path, Some(spec(&marker, w * ROUNDS + r))).await,
                    };
                    assert!(
                        matches!(r.status, 200 | 201 | 202 | 204 | 404),
                        "unexpected answer {}: {}",
                        r.status,
                        r.body
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("storm worker");
    }

    // One definition now: exactly one process runs it, whatever the storm left.
    let r = admin(addr, "PUT", path, Some(spec(&marker, 9999))).await;
    assert!(matches!(r.status, 200 | 201), "{}: {}", r.status, r.body);
    expect_processes(&format!("{marker}-9999"), 1, "the last definition runs").await;
    expect_processes(&marker, 1, "one server, one process").await;

    let r = admin(addr, "DELETE", path, None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = admin(addr, "GET", path, None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // DELETE answers once the process is gone.
    let left = processes_with(&marker);
    assert!(left.is_empty(), "processes left after DELETE: {left:?}");
    expect_processes(&marker, 0, "nothing runs after DELETE").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_with_nul_bytes_or_an_internal_name_are_refused() {
    let gw = gateway().await;
    let addr = gw.addr;
    let cases = [
        (
            "/admin/v1/servers/nul",
            json!({"command": format!("{BIN}\u{0}x")}),
            "command",
        ),
        (
            "/admin/v1/servers/nul",
            json!({"command": BIN, "args": ["example-server", "a\u{0}b"]}),
            "args[1]",
        ),
        (
            "/admin/v1/servers/nul",
            json!({"command": BIN, "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "x\u{0}"}]}),
            "env[1].value",
        ),
        (
            "/admin/v1/servers/nul",
            json!({"command": BIN, "env": [{"name": "S", "secretValue": "\u{0}"}]}),
            "env[0].secretValue",
        ),
        (
            "/admin/v1/servers/gateway",
            json!({"command": BIN, "args": ["example-server"]}),
            "name",
        ),
    ];
    for (path, body, field) in cases {
        let r = admin(addr, "PUT", path, Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(msg.contains(&format!("{field}:")), "{body}: {msg}");
    }
    // Nothing was added.
    let r = admin(addr, "GET", "/admin/v1/servers", None).await;
    assert_eq!(r.json()["servers"], json!([]), "{}", r.body);

    // The config file's servers go through the same validation.
    let yaml = format!("listen: 127.0.0.1:0\nservers:\n  - name: gateway\n    command: {BIN:?}\n");
    let err = gatehouse::Config::from_yaml(&yaml).unwrap_err().to_string();
    assert!(err.contains("servers[0].name"), "{err}");
    let yaml = format!(
        "listen: 127.0.0.1:0\nservers:\n  - name: ok\n    command: {BIN:?}\n    args: [\"a\\0b\"]\n"
    );
    let err = gatehouse::Config::from_yaml(&yaml).unwrap_err().to_string();
    assert!(err.contains("servers[0].args[0]"), "{err}");
}

/// One request to the gateway with exactly these headers (a browser's, say).
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let c = support::Client::new(format!("http://{addr}{path}"));
    let mut req = http::Request::builder().method(method).uri(&c.url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.send(
        req.body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap(),
    )
    .await
}

/// Another site's page (a cross-site form, a `fetch` from a sandboxed frame whose `Origin` is
/// `null`, a rebound host name) cannot change the servers, even with the admin token in
/// hand; a form's content types are not JSON; no answer lets another origin read it; and
/// what the admin API answers (logs, sessions, the audit trail) is kept by no cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_page_changes_nothing_and_answers_are_not_kept() {
    let gw = gateway().await;
    let addr = gw.addr;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = ("authorization", bearer.as_str());
    let spec = json!({"command": BIN, "args": ["example-server"]}).to_string();
    let r = admin(
        addr,
        "PUT",
        "/admin/v1/servers/kept",
        serde_json::from_str(&spec).ok(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let json_type = ("content-type", "application/json");
    for origin in [
        "https://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
    ] {
        let from = ("origin", origin);
        for (method, path, body) in [
            ("PUT", "/admin/v1/servers/csrf", spec.as_str()),
            ("DELETE", "/admin/v1/servers/kept", ""),
            ("POST", "/admin/v1/servers/kept/restart", ""),
            (
                "POST",
                "/admin/v1/registry/install",
                r#"{"entry": "io.github.modelcontextprotocol/server-fetch", "name": "csrf"}"#,
            ),
            (
                "POST",
                "/admin/v1/registry/servers",
                r#"{"name": "io.example/csrf", "description": "d", "version": "1.0.0"}"#,
            ),
        ] {
            let r = raw(addr, method, path, &[auth, json_type, from], body).await;
            assert_eq!(r.status, 403, "{origin} {method} {path}: {}", r.body);
            assert!(r.body.contains(origin), "names the origin: {}", r.body);
            assert!(!r.headers.contains_key("access-control-allow-origin"));
        }
        // A preflight is refused too: no method or header is granted to another site.
        let preflight = raw(
            addr,
            "OPTIONS",
            "/admin/v1/servers/csrf",
            &[
                from,
                ("access-control-request-method", "PUT"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            "",
        )
        .await;
        assert_eq!(preflight.status, 403, "{origin}: {}", preflight.body);
        for h in [
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-headers",
        ] {
            assert!(!preflight.headers.contains_key(h), "{origin}: {h}");
        }
    }
    // A rebound host name (DNS rebinding) is refused before the token is looked at.
    let rebound = raw(
        addr,
        "DELETE",
        "/admin/v1/servers/kept",
        &[auth, ("host", "attacker.example")],
        "",
    )
    .await;
    assert_eq!(rebound.status, 421, "{}", rebound.body);
    // The bodies a cross-site form can send without asking first are not JSON: 415, nothing
    // applied (the token is there: only the type is wrong).
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ] {
        let r = raw(
            addr,
            "PUT",
            "/admin/v1/servers/csrf",
            &[auth, ("content-type", content_type)],
            &spec,
        )
        .await;
        assert_eq!(r.status, 415, "{content_type}: {}", r.body);
        let r = raw(
            addr,
            "POST",
            "/admin/v1/registry/install",
            &[auth, ("content-type", content_type)],
            r#"{"entry": "io.github.modelcontextprotocol/server-fetch", "name": "csrf"}"#,
        )
        .await;
        assert_eq!(r.status, 415, "{content_type}: {}", r.body);
    }
    let listed = admin(addr, "GET", "/admin/v1/servers", None).await;
    let names: Vec<String> = listed.json()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["kept"], "{}", listed.body);
    let entry = admin(addr, "GET", "/admin/v1/registry/servers?search=csrf", None).await;
    assert_eq!(entry.json()["servers"], json!([]), "{}", entry.body);

    // The console's own requests (same origin) are served; no answer, its own or a
    // refusal, names an origin that may read it, sniffs a type, or may be kept by a cache
    // (the browser's included: the token is gone at sign-out, a cached answer is not).
    let own = format!("http://{addr}");
    for path in [
        "/admin/v1/servers",
        "/admin/v1/servers/kept",
        "/admin/v1/servers/kept/logs?tail=10",
        "/admin/v1/sessions",
        "/admin/v1/audit",
        "/admin/v1/plugins",
        "/admin/v1/registry/servers",
        "/admin/v1/servers/none",
    ] {
        let r = raw(addr, "GET", path, &[auth, ("origin", &own)], "").await;
        assert!(
            matches!(r.status, 200 | 404),
            "{path}: {} {}",
            r.status,
            r.body
        );
        assert!(
            !r.headers.contains_key("access-control-allow-origin"),
            "{path}"
        );
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        let cache = r
            .headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            cache.contains("no-store"),
            "{path}: cache-control {cache:?}"
        );
    }
    gw.stop().await;
}
