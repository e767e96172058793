//! Hot reload of plugins under load, with the real components built from
//! `plugins/` (run `plugins/build.sh` first): a replaced file takes effect
//! without failing a single concurrent call, and a broken replacement is
//! rejected while the previous version keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatehouse::plugins::{CallContext, Decision, Plugins, PluginsConfig};

fn wasm(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with `plugins/build.sh`",
        path.display()
    );
    path
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gatehouse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `dest` atomically (write aside, then rename), as deploy tools do.
fn replace(dest: &Path, bytes: &[u8]) {
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

fn config(path: &Path) -> PluginsConfig {
    let yaml = format!(
        r#"
modules:
  - name: policy
    path: "{}"
    config: {{ rules: [ {{ tool: shell, action: block, reason: "no shell" }} ] }}
chains: [ {{ methods: ["tools/call"], plugins: [policy] }} ]
engine: {{ cache_dir: "{}/target/plugin-cache-tests" }}
"#,
        path.display(),
        env!("CARGO_MANIFEST_DIR")
    );
    serde_saphyr::from_str(&yaml).unwrap()
}

fn ctx(name: &str) -> CallContext<'_> {
    CallContext {
        method: "tools/call",
        server: "box",
        name: Some(name),
        principal: None,
        session_id: "reload",
        profile: None,
        groups: &[],
        scopes: &[],
    }
}

/// Waits until `cond` holds, polling.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hot_reload_under_load_fails_no_call() {
    let dir = scratch_dir("reload");
    let path = dir.join("policy.wasm");
    // Start with the no-op plugin (it ignores the policy config).
    replace(&path, &std::fs::read(wasm("noop")).unwrap());
    let plugins = Plugins::load(&config(&path)).unwrap();
    let _watcher = plugins.watch_every(Duration::from_millis(50));

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let denied_shell = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (plugins, stop, calls, denied_shell) = (
                plugins.clone(),
                stop.clone(),
                calls.clone(),
                denied_shell.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let set = plugins.current();
                    // A healthy tool is always allowed, whatever the version.
                    let d = set.on_request_blocking(&ctx("ls"), r#"{"path": "/"}"#);
                    assert_eq!(d, Decision::Allow, "a call failed during reload");
                    match set.on_request_blocking(&ctx("shell"), r#"{"cmd": "id"}"#) {
                        Decision::Allow => {}
                        Decision::Deny(d) => {
                            assert_eq!(d.fault, None, "a plugin fault during reload: {d:?}");
                            assert_eq!(d.message, "no shell");
                            denied_shell.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                    calls.fetch_add(2, Ordering::Relaxed);
                }
            })
        })
        .collect();

    eventually("calls on the first version", || {
        calls.load(Ordering::Relaxed) > 100
    });
    assert_eq!(denied_shell.load(Ordering::Relaxed), 0);

    // Swap in the real policy: shell becomes denied, nothing fails.
    replace(&path, &std::fs::read(wasm("tool_policy")).unwrap());
    eventually("the new version to take effect", || {
        matches!(
            plugins.current().on_request_blocking(&ctx("shell"), "{}"),
            Decision::Deny(_)
        )
    });
    let after_swap = calls.load(Ordering::Relaxed);
    eventually("calls on the second version", || {
        calls.load(Ordering::Relaxed) > after_swap + 100
    });

    // A broken file is rejected; the policy keeps serving.
    let before_broken = Arc::as_ptr(&plugins.current());
    replace(&path, b"\0asm\x0d\0\x01\0 not really a component");
    // Give the watcher several polls to see (and reject) it.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        Arc::as_ptr(&plugins.current()),
        before_broken,
        "broken version swapped in"
    );
    assert!(matches!(
        plugins.current().on_request_blocking(&ctx("shell"), "{}"),
        Decision::Deny(_)
    ));
    let err = plugins.reload_changed_files();
    assert!(
        err.is_ok(),
        "already rejected once; not retried until it changes"
    );

    // A valid component that does not implement the interface (an empty
    // one) is rejected too.
    replace(&path, b"\0asm\x0d\0\x01\0");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(Arc::as_ptr(&plugins.current()), before_broken);

    // Back to a good version: picked up again.
    replace(&path, &std::fs::read(wasm("noop")).unwrap());
    eventually("the no-op version again", || {
        plugins.current().on_request_blocking(&ctx("shell"), "{}") == Decision::Allow
    });

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("a load thread saw a failure");
    }
    assert!(calls.load(Ordering::Relaxed) > 300);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_rejects_a_broken_file_explicitly_and_keeps_state() {
    let dir = scratch_dir("reload-explicit");
    let path = dir.join("limit.wasm");
    replace(&path, &std::fs::read(wasm("rate_limit")).unwrap());
    let yaml = format!(
        r#"
modules:
  - name: limit
    path: "{}"
    config: {{ limits: [ {{ calls: 2, window: 1h }} ] }}
chains: [ {{ plugins: [limit] }} ]
engine: {{ cache_dir: "{}/target/plugin-cache-tests" }}
"#,
        path.display(),
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg: PluginsConfig = serde_saphyr::from_str(&yaml).unwrap();
    let plugins = Plugins::load(&cfg).unwrap();
    assert_eq!(
        plugins.current().on_request_blocking(&ctx("t"), "{}"),
        Decision::Allow
    );

    replace(&path, b"garbage");
    let err = plugins.reload_changed_files().unwrap_err();
    assert!(err.to_string().contains("plugin limit"), "{err}");
    assert_eq!(
        plugins.current().on_request_blocking(&ctx("t"), "{}"),
        Decision::Allow
    );

    // A config reload with a changed plugin config rebuilds that plugin;
    // the host-side counters survive: two calls were made, the third is
    // over the limit.
    replace(&path, &std::fs::read(wasm("rate_limit")).unwrap());
    let mut cfg2 = cfg.clone();
    cfg2.modules[0].config = serde_json::json!({"limits": [{"calls": 2, "window": "1h"}], });
    cfg2.modules[0].max_warm = 2;
    let before = plugins.current();
    plugins.reload(&cfg2).unwrap();
    assert!(!Arc::ptr_eq(&before, &plugins.current()));
    let d = plugins.current().on_request_blocking(&ctx("t"), "{}");
    assert!(
        matches!(d, Decision::Deny(ref d) if d.fault.is_none()),
        "{d:?}"
    );
    // The old set still works for calls that hold it.
    assert!(matches!(
        before.on_request_blocking(&ctx("t"), "{}"),
        Decision::Deny(_)
    ));

    // An invalid config is refused; the running set stays.
    let mut bad = cfg2.clone();
    bad.modules[0].config = serde_json::json!({"limits": [{"calls": 1, "window": "soon"}]});
    let err = plugins.reload(&bad).unwrap_err();
    assert!(err.to_string().contains("bad window"), "{err}");
    assert_eq!(plugins.current().config(), &cfg2);
    let _ = std::fs::remove_dir_all(&dir);
}
