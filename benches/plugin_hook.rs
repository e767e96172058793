//! Plugin hook benchmark: the cost of one hook call through `PluginSet`,
//! with the real components built by `plugins/build.sh`, against the same
//! decision computed natively in Rust, measured in one run.
//!
//! ```text
//! plugins/build.sh && cargo bench --bench plugin_hook -- [--calls 20000] [--rounds 3]
//! ```
//! Cases: the no-op plugin (the price of crossing into wasm and back), called
//! blocking and awaited on a tokio runtime (as the gateway does);
//! `tool-policy` with ten rules on a realistic tools/call (Rust, and the
//! same plugin built from Python); a native Rust evaluation of the same ten
//! rules (the baseline); and, for scale, a no-op call on a fresh instance
//! every time (what warm-instance reuse saves). Rounds alternate between
//! cases so drift on a noisy machine hits all of them alike.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use gatehouse::plugins::{CallContext, Decision, JsonText, PluginSet, PluginsConfig};
use serde_json::Value;

const ARGS: &str = r#"{"path": "/home/alice/notes/todo.txt", "mode": "read", "encoding": "utf-8"}"#;

const POLICY: &str = r#"
        rules:
          - { tool: "fs_*", argument: path, operator: startsWith, value: /etc, action: block, reason: "system files are off limits" }
          - { tool: "fs_*", argument: path, operator: endsWith, value: .key, action: block, reason: "no key files" }
          - { tool: "fs_*", argument: path, operator: contains, value: "..", action: block, reason: "no parent paths" }
          - { tool: "fs_*", argument: mode, operator: notEqual, value: read, action: block, reason: "read only" }
          - { tool: "fs_*", argument: path, operator: regex, value: "^/home/[a-z]+/\\.ssh/", action: block, reason: "no ssh" }
          - { tool: "fs_*", argument: encoding, operator: equal, value: binary, action: block, reason: "text only" }
          - { tool: http_get, argument: url, operator: regex, value: "^https://([a-z]+\\.)?example\\.com/", action: allow }
          - { tool: http_get, action: block, reason: "only example.com" }
          - { tool: tag, argument: tags, operator: contains, value: secret, action: block, reason: "secret tag" }
          - { tool: "fs_*", action: allow }
        default: block
"#;

fn wasm(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    if !path.exists() {
        eprintln!(
            "{} is missing: build the plugins first with `plugins/build.sh`",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

fn set(component: &str, extra: &str, config: &str) -> Arc<PluginSet> {
    let yaml = format!(
        r#"
modules:
  - name: p
    path: "{}"
    memory_limit: 256MiB
    init_deadline: 60s
    max_warm: 8
{extra}
    config:
{config}
chains: [ {{ methods: ["tools/call"], plugins: [p] }} ]
"#,
        wasm(component).display()
    );
    let cfg: PluginsConfig = serde_saphyr::from_str(&yaml).expect("bench config");
    PluginSet::load(&cfg).unwrap_or_else(|e| panic!("{component}: {e}"))
}

/// The same ten rules, evaluated natively: parse the arguments, walk the
/// rules, first match wins.
fn native_policy(name: &str, arguments: &str) -> Decision {
    let fs = name.starts_with("fs_");
    let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
    let text = |k: &str| -> Option<String> {
        args.get(k).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    let block = |r: &str| {
        Decision::Deny(gatehouse::plugins::Denied {
            plugin: "native".into(),
            code: gatehouse::plugins::POLICY_DENIED,
            message: r.into(),
            fault: None,
        })
    };
    if fs {
        let path = text("path");
        if path.as_deref().is_some_and(|p| p.starts_with("/etc")) {
            return block("system files are off limits");
        }
        if path.as_deref().is_some_and(|p| p.ends_with(".key")) {
            return block("no key files");
        }
        if path.as_deref().is_some_and(|p| p.contains("..")) {
            return block("no parent paths");
        }
        if text("mode").is_some_and(|m| m != "read") {
            return block("read only");
        }
        // ^/home/[a-z]+/\.ssh/
        if path.as_deref().is_some_and(|p| {
            p.strip_prefix("/home/").is_some_and(|rest| {
                let user = rest.bytes().take_while(u8::is_ascii_lowercase).count();
                user > 0 && rest[user..].starts_with("/.ssh/")
            })
        }) {
            return block("no ssh");
        }
        if text("encoding").is_some_and(|e| e == "binary") {
            return block("text only");
        }
    }
    if name == "http_get" {
        if text("url").is_some_and(|u| u.starts_with("https://") && u.contains("example.com/")) {
            return Decision::Allow;
        }
        return block("only example.com");
    }
    if name == "tag"
        && args
            .get("tags")
            .and_then(Value::as_array)
            .is_some_and(|t| t.iter().any(|x| x == "secret"))
    {
        return block("secret tag");
    }
    if fs {
        return Decision::Allow;
    }
    block("not allowed by tool-policy")
}

struct Case {
    name: &'static str,
    run: Box<dyn Fn() -> Decision>,
    samples: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let mut calls = 20_000usize;
    let mut rounds = 3usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--calls" => calls = it.next().and_then(|v| v.parse().ok()).expect("--calls N"),
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--bench" => {}
            other => eprintln!("ignoring argument {other}"),
        }
    }

    let started = Instant::now();
    let noop = set("noop", "", "      null");
    let policy = set("tool_policy", "", POLICY);
    let policy_py = set("tool_policy_py", "", POLICY);
    let policy_js = set("tool_policy_js", "", POLICY);
    let cold = set("noop", "    recycle_after: 1", "      null");
    eprintln!("plugins loaded in {:?}", started.elapsed());

    let ctx = CallContext {
        method: "tools/call",
        server: "files",
        name: Some("fs_read"),
        principal: Some("alice"),
        session_id: "bench-session",
        profile: None,
        groups: &[],
        scopes: &[],
    };
    // All policy variants must agree before anything is timed.
    for (tool, args) in [
        ("fs_read", ARGS),
        ("fs_read", r#"{"path": "/etc/shadow", "mode": "read"}"#),
        (
            "fs_read",
            r#"{"path": "/home/bob/.ssh/id", "mode": "read"}"#,
        ),
        ("http_get", r#"{"url": "https://api.example.com/x"}"#),
        ("http_get", r#"{"url": "https://evil.test/"}"#),
        ("tag", r#"{"tags": ["secret"]}"#),
        ("shell", "{}"),
    ] {
        let c = CallContext {
            name: Some(tool),
            ..ctx
        };
        let native = native_policy(tool, args);
        for (which, s) in [
            ("rust", &policy),
            ("python", &policy_py),
            ("javascript", &policy_js),
        ] {
            let d = s.on_request_blocking(&c, args);
            let same = match (&d, &native) {
                (Decision::Allow, Decision::Allow) => true,
                (Decision::Deny(a), Decision::Deny(b)) => a.message == b.message,
                _ => false,
            };
            assert!(same, "{which} {tool} {args}: {d:?} vs native {native:?}");
        }
    }
    assert_eq!(policy.on_request_blocking(&ctx, ARGS), Decision::Allow);

    let mut cases = [
        Case {
            name: "native Rust: ten rules (baseline)",
            run: Box::new(move || native_policy("fs_read", ARGS)),
            samples: Vec::new(),
        },
        Case {
            name: "wasm no-op plugin",
            run: {
                let s = noop.clone();
                Box::new(move || s.on_request_blocking(&ctx, ARGS))
            },
            samples: Vec::new(),
        },
        Case {
            name: "wasm no-op, async on a tokio runtime",
            run: {
                let s = noop.clone();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("tokio runtime");
                let args = JsonText::from(ARGS);
                Box::new(move || rt.block_on(s.on_request(&ctx, &args)))
            },
            samples: Vec::new(),
        },
        Case {
            name: "wasm tool-policy, ten rules (Rust)",
            run: {
                let s = policy.clone();
                Box::new(move || s.on_request_blocking(&ctx, ARGS))
            },
            samples: Vec::new(),
        },
        Case {
            name: "wasm tool-policy, ten rules (Python)",
            run: {
                let s = policy_py.clone();
                Box::new(move || s.on_request_blocking(&ctx, ARGS))
            },
            samples: Vec::new(),
        },
        Case {
            name: "wasm tool-policy, ten rules (JavaScript)",
            run: {
                let s = policy_js.clone();
                Box::new(move || s.on_request_blocking(&ctx, ARGS))
            },
            samples: Vec::new(),
        },
        Case {
            name: "wasm no-op, fresh instance per call",
            run: {
                let s = cold.clone();
                Box::new(move || s.on_request_blocking(&ctx, ARGS))
            },
            samples: Vec::new(),
        },
    ];

    for round in 0..rounds {
        for case in cases.iter_mut() {
            // The Python plugin and fresh instances are slower: fewer calls.
            let n = if case.name.contains("Python") || case.name.contains("fresh") {
                calls / 10
            } else {
                calls
            };
            for _ in 0..(n / 10).max(10) {
                std::hint::black_box((case.run)());
            }
            for _ in 0..n {
                let t = Instant::now();
                let d = (case.run)();
                let elapsed = t.elapsed();
                std::hint::black_box(d);
                case.samples.push(elapsed.as_nanos() as f64 / 1000.0);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }

    let mut baseline_p50 = 0.0;
    println!();
    println!(
        "plugin hook call, µs per call ({calls} calls x {rounds} rounds; fewer for Python and fresh instances)"
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>14}",
        "case", "p50", "p99", "mean", "p50 / native"
    );
    for case in cases.iter_mut() {
        case.samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p50 = percentile(&case.samples, 0.50);
        let p99 = percentile(&case.samples, 0.99);
        let mean = case.samples.iter().sum::<f64>() / case.samples.len() as f64;
        if baseline_p50 == 0.0 {
            baseline_p50 = p50;
        }
        println!(
            "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>13.1}x",
            case.name,
            p50,
            p99,
            mean,
            p50 / baseline_p50
        );
    }
    let policy_p50 = percentile(&cases[3].samples, 0.5);
    let noop_p50 = percentile(&cases[1].samples, 0.5);
    println!();
    println!(
        "target: hook call < 10 µs at p50: no-op {noop_p50:.2} µs, tool-policy {policy_p50:.2} µs: {}",
        if noop_p50 < 10.0 && policy_p50 < 10.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
