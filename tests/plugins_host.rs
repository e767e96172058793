//! The plugin host with the real components built from `plugins/`
//! (run `plugins/build.sh` first): each shipped plugin's behaviour, the
//! fault plugins, deadlines, memory limits, `plugin check`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::plugins::{
    CallContext, Decision, EntryKind, FaultKind, JsonText, ListEntry, PLUGIN_FAILED, POLICY_DENIED,
    PluginError, PluginSet, PluginsConfig,
};

mod plugin_sets;
use plugin_sets::{ctx, denied, load, wasm};

fn is_allow(d: &Decision) -> bool {
    matches!(d, Decision::Allow)
}

// ---------------------------------------------------------------- tool-policy

const POLICY_CONFIG: &str = r#"
        rules:
          - { tool: "fs_*", argument: path, operator: startsWith, value: /etc, action: block, reason: "system files are off limits" }
          - { tool: "fs_*", argument: path, operator: endsWith, value: .key, action: block, reason: "no key files" }
          - { tool: "fs_*", argument: path, operator: contains, value: "..", action: block, reason: "no parent paths" }
          - { tool: "fs_*", argument: mode, operator: notEqual, value: read, action: block, reason: "read only" }
          - { tool: "fs_*", action: allow }
          - { tool: http_get, argument: url, operator: regex, value: "^https://([a-z]+\\.)?example\\.com/", action: allow }
          - { tool: http_get, action: block, reason: "only example.com" }
          - { tool: tag, argument: tags, operator: contains, value: secret, action: block, reason: "secret tag" }
          - { tool: tag, argument: tags, operator: notContains, value: public, action: block, reason: "must be public" }
          - { tool: "count", argument: /options/n, operator: equal, value: 3, action: block, reason: "three is right out" }
        default: allow
"#;

/// The builds of tool-policy: Rust, Python (componentize-py) and
/// JavaScript (componentize-js), all from plugins/build.sh.
const TOOL_POLICY_BUILDS: [&str; 3] = ["tool_policy", "tool_policy_py", "tool_policy_js"];

/// Compiles the Python and JavaScript components once before the tests that
/// use them run in parallel (a cache miss compiles 12-18 MB of wasm; later
/// loads hit the on-disk cache).
fn warm_interpreted() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for component in ["tool_policy_py", "tool_policy_js"] {
            load(&format!(
                r#"
modules: [ {{ name: warm, path: "{{dir}}/{component}.wasm", memory_limit: 256MiB, init_deadline: 30s }} ]
"#
            ))
            .unwrap_or_else(|e| panic!("{component} compiles: {e}"));
        }
    });
}

fn policy_set(component: &str) -> Arc<PluginSet> {
    if component != "tool_policy" {
        warm_interpreted();
    }
    load(&format!(
        r#"
modules:
  - name: policy
    path: "{{dir}}/{component}.wasm"
    memory_limit: 256MiB
    init_deadline: 30s
    config:
{POLICY_CONFIG}
chains:
  - methods: ["tools/call"]
    plugins: [policy]
"#
    ))
    .unwrap_or_else(|e| panic!("{component}: {e}"))
}

fn check_policy(set: &PluginSet, component: &str) {
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "fs_read",
            r#"{"path": "/etc/passwd", "mode": "read"}"#,
            Some("system files are off limits"),
        ),
        (
            "fs_read",
            r#"{"path": "/home/a/id.key", "mode": "read"}"#,
            Some("no key files"),
        ),
        (
            "fs_read",
            r#"{"path": "/home/a/../../etc", "mode": "read"}"#,
            Some("no parent paths"),
        ),
        (
            "fs_read",
            r#"{"path": "/home/a/notes.txt", "mode": "write"}"#,
            Some("read only"),
        ),
        (
            "fs_read",
            r#"{"path": "/home/a/notes.txt", "mode": "read"}"#,
            None,
        ),
        ("http_get", r#"{"url": "https://api.example.com/v1"}"#, None),
        (
            "http_get",
            r#"{"url": "https://evil.test/"}"#,
            Some("only example.com"),
        ),
        (
            "tag",
            r#"{"tags": ["public", "secret"]}"#,
            Some("secret tag"),
        ),
        ("tag", r#"{"tags": ["internal"]}"#, Some("must be public")),
        ("tag", r#"{"tags": ["public"]}"#, None),
        (
            "count",
            r#"{"options": {"n": 3}}"#,
            Some("three is right out"),
        ),
        ("count", r#"{"options": {"n": 4}}"#, None),
        ("other", r#"{}"#, None),
        // A name in another case, padded or cut by a NUL is judged as a lenient server reads it.
        (
            "FS_read",
            r#"{"path": "/etc/passwd", "mode": "read"}"#,
            Some("system files are off limits"),
        ),
        (
            "fs_read ",
            r#"{"path": "/etc/passwd", "mode": "read"}"#,
            Some("system files are off limits"),
        ),
        (
            "HTTP_GET\u{0}",
            r#"{"url": "https://evil.test/"}"#,
            Some("only example.com"),
        ),
        // Every build trims Unicode's White_Space, and only that (U+0085 is, U+FEFF is not).
        (
            "\u{85}FS_read",
            r#"{"path": "/etc/passwd", "mode": "read"}"#,
            Some("system files are off limits"),
        ),
        ("HTTP_GET\u{feff}", r#"{"url": "https://evil.test/"}"#, None),
    ];
    for (tool, args, expect) in cases {
        let d = set.on_request_blocking(&ctx("files", tool), *args);
        match expect {
            None => assert!(is_allow(&d), "{component}: {tool} {args}: {d:?}"),
            Some(reason) => {
                let denied = denied(d);
                assert_eq!(denied.message, *reason, "{component}: {tool} {args}");
                assert_eq!(&*denied.plugin, "policy");
                assert_eq!(denied.code, POLICY_DENIED);
                assert_eq!(denied.fault, None);
            }
        }
    }
    // Methods outside the chain are not seen by the plugin.
    let list = CallContext {
        method: "tools/list",
        ..ctx("files", "fs_read")
    };
    assert!(is_allow(
        &set.on_request_blocking(&list, r#"{"path": "/etc"}"#)
    ));
}

#[test]
fn tool_policy_rust() {
    let set = policy_set("tool_policy");
    check_policy(&set, "tool_policy");
}

/// The same plugin written in Python (componentize-py) passes the same test.
#[test]
fn tool_policy_python() {
    let set = policy_set("tool_policy_py");
    check_policy(&set, "tool_policy_py");
}

/// The same plugin written in JavaScript (componentize-js) passes the same
/// test.
#[test]
fn tool_policy_javascript() {
    let set = policy_set("tool_policy_js");
    check_policy(&set, "tool_policy_js");
}

/// The three builds make the same decision on every input of a matrix that
/// includes the awkward ones: arguments that are not an object or not JSON,
/// missing and null values, non-string values compared by their JSON text,
/// non-ASCII text, array indexes and JSON pointers, glob corners.
#[test]
fn tool_policy_builds_agree() {
    let sets: Vec<_> = TOOL_POLICY_BUILDS.map(|c| (c, policy_set(c))).into();
    let tools = [
        "fs_read", "fs_", "fs", "xfs_read", "http_get", "tag", "count", "", "fs_é",
    ];
    let arguments = [
        r#"{}"#,
        r#"[]"#,
        r#"null"#,
        r#"not json"#,
        r#""/etc/passwd""#,
        r#"{"path": null, "mode": "read"}"#,
        r#"{"path": "/etc", "mode": "read"}"#,
        r#"{"path": "/etcetera", "mode": "read"}"#,
        r#"{"path": "/home/é/../x", "mode": "read"}"#,
        r#"{"path": "/home/a/b.KEY", "mode": "read"}"#,
        r#"{"path": "/home/a/b", "mode": ["read"]}"#,
        r#"{"path": "/home/a/b", "mode": "read", "extra": 1}"#,
        r#"{"path": 7, "mode": "read"}"#,
        r#"{"url": "https://example.com/"}"#,
        r#"{"url": "https://a.b.example.com/"}"#,
        r#"{"url": "http://example.com/"}"#,
        r#"{"url": "https://EXAMPLE.com/"}"#,
        r#"{"url": ["https://example.com/"]}"#,
        r#"{"tags": "public secret"}"#,
        r#"{"tags": "public"}"#,
        r#"{"tags": ["public", 1, null]}"#,
        r#"{"tags": []}"#,
        r#"{"options": {"n": "3"}}"#,
        r#"{"options": {"n": 3.0}}"#,
        r#"{"options": {"n": 3e0}}"#,
        r#"{"options": {"n": -3}}"#,
        r#"{"options": {"n": [3]}}"#,
        r#"{"options": null}"#,
        // A lone surrogate (which serde refuses): every build reads the rest.
        r#"{"path": "/etc/passwd", "mode": "read", "x": "\ud800"}"#,
        r#"{"path": "/home/a/b", "mode": "read", "\udc00": "\ud800x"}"#,
        r#"{"url": "https://example.com/", "x": "\ud800"}"#,
        // A number past a double's range: no build reads the arguments, and the rules that
        // block apply (fail closed), those that allow do not.
        r#"{"path": "/home/a/b", "mode": "read", "n": 1e400}"#,
        r#"{"url": "https://example.com/", "n": -1e400}"#,
        r#"{"options": {"n": 1e999}, "tags": "public"}"#,
    ];
    let mut compared = 0;
    for tool in tools {
        for args in arguments {
            let decisions: Vec<_> = sets
                .iter()
                .map(|(c, set)| {
                    let d = set.on_request_blocking(&ctx("files", tool), args);
                    let summary = match d {
                        Decision::Allow => "allow".to_string(),
                        Decision::Deny(d) => format!("deny {}: {}", d.code, d.message),
                        other => panic!("{c}: {tool} {args}: {other:?}"),
                    };
                    (*c, summary)
                })
                .collect();
            for (c, d) in &decisions[1..] {
                assert_eq!(
                    d, &decisions[0].1,
                    "{c} disagrees with {} on {tool} {args}",
                    decisions[0].0
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, tools.len() * arguments.len());
}

#[test]
fn tool_policy_default_block_and_bad_config() {
    warm_interpreted();
    for component in TOOL_POLICY_BUILDS {
        let set = load(&format!(
            r#"
modules:
  - name: strict
    path: "{{dir}}/{component}.wasm"
    memory_limit: 256MiB
    init_deadline: 30s
    config: {{ rules: [ {{ tool: fs_read, action: allow }} ], default: block, default_reason: "not on the list" }}
chains: [ {{ plugins: [strict] }} ]
"#
        ))
        .unwrap();
        let d = set.on_request_blocking(&ctx("s", "fs_read"), "{}");
        assert!(is_allow(&d), "{component}: {d:?}");
        assert_eq!(
            denied(set.on_request_blocking(&ctx("s", "shell"), "{}")).message,
            "not on the list",
            "{component}"
        );
        // An allow rule allows the name as written only: folding would widen what it allows.
        for other in ["FS_read", "fs_read ", "fs_read\u{0}x"] {
            assert_eq!(
                denied(set.on_request_blocking(&ctx("s", other), "{}")).message,
                "not on the list",
                "{component}: {other:?}"
            );
        }

        let err = load(&format!(
            r#"
modules:
  - name: broken
    path: "{{dir}}/{component}.wasm"
    memory_limit: 256MiB
    init_deadline: 30s
    config: {{ rules: [ {{ argument: a, operator: regex, value: "(", action: block }} ] }}
"#
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, PluginError::Init { plugin, .. } if plugin == "broken"),
            "{component}: {text}"
        );
        assert!(text.contains("rules[0].value"), "{component}: {text}");
    }
}

// --------------------------------------------------------------------- redact

#[test]
fn redact_masks_secrets_in_results() {
    let set = load(
        r#"
modules:
  - { name: redact, path: "{dir}/redact.wasm" }
chains: [ { plugins: [redact] } ]
"#,
    )
    .unwrap();
    let result = r#"{"content":[{"type":"text","text":"key sk-live-abcdefghijklmnopqrstuvwx, mail bob@example.com, card 4111-1111-1111-1111, order 1234-5678-9012-3456"}],"structuredContent":{"token":"ghp_abcdefghijklmnopqrstuvwxyz0123456789"},"isError":false}"#;
    let Decision::Rewrite(json) = set.on_response_blocking(&ctx("s", "t"), result) else {
        panic!("expected a rewrite");
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["content"][0]["text"],
        "key [REDACTED:api-key], mail [REDACTED:email], card [REDACTED:card], order 1234-5678-9012-3456"
    );
    assert_eq!(v["structuredContent"]["token"], "[REDACTED:api-key]");
    assert_eq!(v["isError"], false);
    // Nothing to mask: no rewrite.
    let clean = r#"{"content":[{"type":"text","text":"all good"}]}"#;
    assert!(is_allow(&set.on_response_blocking(&ctx("s", "t"), clean)));
    // Requests are not touched (the plugin has no on-request hook).
    assert!(is_allow(&set.on_request_blocking(
        &ctx("s", "t"),
        r#"{"a":"bob@example.com"}"#
    )));
}

// --------------------------------------------------------------- trusted-data

#[test]
fn trusted_data_taints_the_session() {
    let set = load(
        r#"
modules:
  - name: trust
    path: "{dir}/trusted_data.wasm"
    config: { untrusted: ["fetch*", { server: web }], sensitive: ["send_email", { tool: "write_*", server: files }] }
chains: [ { methods: ["tools/call"], plugins: [trust] } ]
"#,
    )
    .unwrap();
    let a = |name| CallContext {
        session_id: "taint-a",
        ..ctx("mail", name)
    };
    let b = |name| CallContext {
        session_id: "taint-b",
        ..ctx("mail", name)
    };
    assert!(is_allow(&set.on_request_blocking(&a("send_email"), "{}")));
    assert!(is_allow(&set.on_response_blocking(&a("send_email"), "{}")));
    // An untrusted result taints session a.
    assert!(is_allow(&set.on_request_blocking(&a("fetch_url"), "{}")));
    assert!(is_allow(
        &set.on_response_blocking(&a("fetch_url"), r#"{"content":[]}"#)
    ));
    let d = denied(set.on_request_blocking(&a("send_email"), "{}"));
    assert_eq!(&*d.plugin, "trust");
    assert!(
        d.message.contains("untrusted data (from mail/fetch_url)"),
        "{}",
        d.message
    );
    // Server-qualified targets.
    let files = CallContext {
        session_id: "taint-a",
        ..ctx("files", "write_file")
    };
    assert!(set.on_request_blocking(&files, "{}") != Decision::Allow);
    let other_server = CallContext {
        session_id: "taint-a",
        ..ctx("notes", "write_file")
    };
    assert!(is_allow(&set.on_request_blocking(&other_server, "{}")));
    // Session b is clean; tainting by server works too.
    assert!(is_allow(&set.on_request_blocking(&b("send_email"), "{}")));
    let web = CallContext {
        session_id: "taint-b",
        ..ctx("web", "anything")
    };
    assert!(is_allow(&set.on_response_blocking(&web, "{}")));
    assert!(!is_allow(&set.on_request_blocking(&b("send_email"), "{}")));
    // Ending the session drops the taint.
    set.end_session("taint-a");
    assert!(is_allow(&set.on_request_blocking(&a("send_email"), "{}")));
}

// ---------------------------------------------------------------- list-filter

fn entry(name: &str, labels: &[&str]) -> ListEntry {
    ListEntry {
        kind: EntryKind::Tool,
        name: name.into(),
        description: Some(format!("the {name} tool")),
        labels: labels.iter().map(|l| l.to_string()).collect(),
    }
}

#[test]
fn list_filter_hides_and_blocks() {
    let set = load(
        r#"
modules:
  - name: filter
    path: "{dir}/list_filter.wasm"
    config:
      rules:
        - { deny: ["*delete*"], deny_labels: [destructive] }
        - { principals: [alice], allow: ["fs_*"] }
        - { principals: ["team-*"], allow_labels: [safe] }
        - { profiles: [admin], kinds: [server], allow: ["*"] }
        - { kinds: [server], allow: ["public-*"] }
chains: [ { plugins: [filter] } ]
"#,
    )
    .unwrap();
    let entries = [
        entry("fs_read", &[]),
        entry("fs_delete", &[]),
        entry("search", &["safe"]),
        entry("wipe", &["destructive", "safe"]),
    ];
    let list = |principal| CallContext {
        method: "tools/list",
        name: None,
        principal,
        ..ctx("files", "")
    };
    assert_eq!(
        set.filter_list_blocking(&list(Some("alice")), &entries)
            .unwrap(),
        [true, false, false, false]
    );
    assert_eq!(
        set.filter_list_blocking(&list(Some("team-red")), &entries)
            .unwrap(),
        [false, false, true, false]
    );
    assert_eq!(
        set.filter_list_blocking(&list(None), &entries).unwrap(),
        [true, false, true, false]
    );
    // Registry entries, per profile.
    let servers = [
        ListEntry {
            kind: EntryKind::Server,
            ..entry("public-weather", &[])
        },
        ListEntry {
            kind: EntryKind::Server,
            ..entry("internal-db", &[])
        },
    ];
    let registry = |profile| CallContext {
        method: "registry/list",
        profile,
        groups: &[],
        scopes: &[],
        ..list(Some("bob"))
    };
    assert_eq!(
        set.filter_list_blocking(&registry(None), &servers).unwrap(),
        [true, false]
    );
    assert_eq!(
        set.filter_list_blocking(&registry(Some("admin")), &servers)
            .unwrap(),
        [true, true]
    );
    // A hidden tool cannot be called either.
    let d = denied(set.on_request_blocking(&ctx("files", "fs_delete"), "{}"));
    assert_eq!(&*d.plugin, "filter");
    assert_eq!(d.code, POLICY_DENIED);
    assert!(d.message.contains("fs_delete"), "{}", d.message);
    assert!(is_allow(
        &set.on_request_blocking(&ctx("files", "fs_read"), "{}")
    ));
    let team = CallContext {
        principal: Some("team-red"),
        ..ctx("files", "fs_read")
    };
    assert!(!is_allow(&set.on_request_blocking(&team, "{}")));
}

#[test]
fn chain_tools_selector_limits_what_a_filter_sees() {
    let set = load(
        r#"
modules:
  - name: hide-all
    path: "{dir}/list_filter.wasm"
    config: { default: deny }
chains: [ { methods: ["tools/list"], tools: ["admin_*"], plugins: [hide-all] } ]
"#,
    )
    .unwrap();
    let list = CallContext {
        method: "tools/list",
        name: None,
        ..ctx("s", "")
    };
    let entries = [entry("admin_reset", &[]), entry("search", &[])];
    assert_eq!(
        set.filter_list_blocking(&list, &entries).unwrap(),
        [false, true]
    );
    assert!(!is_allow(
        &set.on_request_blocking(&ctx("s", "admin_reset"), "{}")
    ));
    assert!(is_allow(
        &set.on_request_blocking(&ctx("s", "search"), "{}")
    ));
}

// ----------------------------------------------------------------- rate-limit

#[test]
fn rate_limit_per_principal_and_limit() {
    let set = load(
        r#"
modules:
  - name: limit
    path: "{dir}/rate_limit.wasm"
    config: { limits: [ { tool: "search*", calls: 3, window: 1h }, { tool: burst, calls: 2, window: 300ms } ] }
chains: [ { plugins: [limit] } ]
"#,
    )
    .unwrap();
    let as_ = |principal, name| CallContext {
        principal: Some(principal),
        ..ctx("s", name)
    };
    for _ in 0..3 {
        assert!(is_allow(
            &set.on_request_blocking(&as_("rl-alice", "search"), "{}")
        ));
    }
    let d = denied(set.on_request_blocking(&as_("rl-alice", "search"), "{}"));
    assert_eq!(&*d.plugin, "limit");
    assert_eq!(d.code, -32029);
    assert!(d.message.contains("3 calls per 1h"), "{}", d.message);
    // Another tool the limit matches counts against it too (a limit is one counter,
    // whatever the names); another principal has its own counter; another session of the
    // same principal has not: the limit is per principal.
    assert!(!is_allow(
        &set.on_request_blocking(&as_("rl-alice", "search_docs"), "{}")
    ));
    assert!(is_allow(
        &set.on_request_blocking(&as_("rl-bob", "search"), "{}")
    ));
    let other_session = CallContext {
        session_id: "session-2",
        ..as_("rl-alice", "search")
    };
    assert!(!is_allow(&set.on_request_blocking(&other_session, "{}")));
    // Tools without a limit are never counted.
    for _ in 0..10 {
        assert!(is_allow(
            &set.on_request_blocking(&as_("rl-alice", "other"), "{}")
        ));
    }
    // The window ends.
    assert!(is_allow(
        &set.on_request_blocking(&as_("rl-carol", "burst"), "{}")
    ));
    assert!(is_allow(
        &set.on_request_blocking(&as_("rl-carol", "burst"), "{}")
    ));
    assert!(!is_allow(
        &set.on_request_blocking(&as_("rl-carol", "burst"), "{}")
    ));
    std::thread::sleep(Duration::from_millis(400));
    assert!(is_allow(
        &set.on_request_blocking(&as_("rl-carol", "burst"), "{}")
    ));
}

// --------------------------------------------------------------------- faults

/// Every fault plugin on its own server, plus a healthy policy on another.
fn fault_set() -> Arc<PluginSet> {
    load(
        r#"
modules:
  - { name: trap, path: "{dir}/fault_trap.wasm" }
  - { name: loop, path: "{dir}/fault_loop.wasm", deadline: 50ms }
  - { name: hog, path: "{dir}/fault_oom.wasm", memory_limit: 16MiB, deadline: 5s }
  - { name: malformed, path: "{dir}/fault_malformed.wasm" }
  - name: policy
    path: "{dir}/tool_policy.wasm"
    config: { rules: [ { tool: shell, action: block, reason: "no shell" } ] }
chains:
  - { servers: [trap], plugins: [trap] }
  - { servers: [loop], plugins: [loop] }
  - { servers: [hog], plugins: [hog] }
  - { servers: [malformed], plugins: [malformed] }
  - { servers: [healthy], plugins: [policy] }
"#,
    )
    .unwrap()
}

fn expect_fault(set: &PluginSet, server: &str, kind: FaultKind, text: &str) {
    let started = Instant::now();
    let d = denied(set.on_request_blocking(&ctx(server, "trigger"), "{}"));
    assert_eq!(d.fault, Some(kind), "{server}: {d:?}");
    assert_eq!(d.code, PLUGIN_FAILED);
    assert_eq!(&*d.plugin, server);
    assert!(d.message.contains(text), "{server}: {}", d.message);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{server} took {:?}",
        started.elapsed()
    );
    // The same plugin keeps serving other calls (on a fresh instance).
    assert!(
        is_allow(&set.on_request_blocking(&ctx(server, "fine"), "{}")),
        "{server}"
    );
}

#[test]
fn faults_fail_only_their_call() {
    let set = fault_set();
    let healthy = || {
        assert!(is_allow(
            &set.on_request_blocking(&ctx("healthy", "ls"), "{}")
        ));
        assert_eq!(
            denied(set.on_request_blocking(&ctx("healthy", "shell"), "{}")).message,
            "no shell"
        );
    };
    healthy();
    expect_fault(&set, "trap", FaultKind::Trap, "trap requested by the test");
    healthy();
    expect_fault(&set, "loop", FaultKind::Deadline, "deadline of 50ms");
    healthy();
    expect_fault(
        &set,
        "hog",
        FaultKind::Memory,
        "memory limit of 16777216 bytes",
    );
    healthy();
    expect_fault(
        &set,
        "malformed",
        FaultKind::Malformed,
        "not a JSON document",
    );
    healthy();
    // Malformed responses and filter answers.
    let d = denied(set.on_response_blocking(&ctx("malformed", "trigger"), "{}"));
    assert_eq!(d.fault, Some(FaultKind::Malformed));
    let list = CallContext {
        method: "tools/list",
        name: None,
        ..ctx("malformed", "")
    };
    let err = set
        .filter_list_blocking(&list, &[entry("trigger-list", &[]), entry("x", &[])])
        .unwrap_err();
    assert_eq!(err.fault, Some(FaultKind::Malformed));
    assert!(
        err.message.contains("3 booleans for 2 entries"),
        "{}",
        err.message
    );
    assert_eq!(
        set.filter_list_blocking(&list, &[entry("x", &[])]).unwrap(),
        [true]
    );
    // Counted per plugin.
    let metrics: std::collections::HashMap<_, _> = set.metrics().into_iter().collect();
    assert_eq!(metrics["trap"].faults_trap, 1);
    assert_eq!(metrics["loop"].faults_deadline, 1);
    assert_eq!(metrics["hog"].faults_memory, 1);
    assert!(metrics["malformed"].faults_malformed >= 3);
    assert_eq!(metrics["policy"].faults(), 0);
    assert!(
        metrics["trap"].instances >= 2,
        "a new instance after the trap"
    );
}

/// A hook that waits (here `std::thread::sleep`, which polls a clock) would hold the thread
/// every session's calls run on: the host refuses to wait, so the call fails at once as a
/// trap, and the plugin serves the next call.
#[test]
fn a_plugin_that_waits_fails_at_once() {
    let set = load(
        r#"
modules:
  - { name: trap, path: "{dir}/fault_trap.wasm", config: { sleep_on: nap }, deadline: 30s }
chains:
  - { plugins: [trap] }
"#,
    )
    .unwrap();
    let started = Instant::now();
    let d = denied(set.on_request_blocking(&ctx("any", "nap"), "{}"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(d.fault, Some(FaultKind::Trap), "{d:?}");
    assert!(d.message.contains("may not block"), "{}", d.message);
    assert!(is_allow(
        &set.on_request_blocking(&ctx("any", "fine"), "{}")
    ));
}

#[test]
fn faults_under_concurrency_do_not_leak_into_other_calls() {
    let set = fault_set();
    std::thread::scope(|s| {
        for t in 0..4 {
            let set = &set;
            s.spawn(move || {
                for i in 0..40 {
                    let server = ["trap", "hog", "malformed", "loop"][(t + i) % 4];
                    if i % 10 == 0 {
                        let d = denied(set.on_request_blocking(&ctx(server, "trigger"), "{}"));
                        assert!(d.fault.is_some(), "{d:?}");
                    } else {
                        let d = set.on_request_blocking(&ctx(server, "fine"), "{}");
                        assert!(is_allow(&d), "{server}: {d:?}");
                        let d = set.on_request_blocking(&ctx("healthy", "ls"), "{}");
                        assert!(is_allow(&d), "{d:?}");
                    }
                }
            });
        }
    });
}

/// The loop plugin, with a 30 ms deadline, on every call.
fn loop_set() -> Arc<PluginSet> {
    load(
        r#"
modules: [ { name: loop, path: "{dir}/fault_loop.wasm", deadline: 30ms } ]
chains: [ { plugins: [loop] } ]
"#,
    )
    .unwrap()
}

#[test]
fn deadline_interrupts_a_loop_promptly() {
    let set = loop_set();
    for _ in 0..3 {
        let started = Instant::now();
        let d = denied(set.on_request_blocking(&ctx("s", "trigger"), "{}"));
        let took = started.elapsed();
        assert_eq!(d.fault, Some(FaultKind::Deadline));
        assert!(
            took >= Duration::from_millis(25),
            "interrupted too early: {took:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "interrupted too late: {took:?}"
        );
    }
}

/// On the async path a looping call yields to the runtime at every tick: on a one-thread
/// runtime another task keeps running while the call spins, and the call still ends at its
/// deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_looping_call_yields_to_the_runtime_until_its_deadline() {
    let set = load(
        r#"
modules: [ { name: loop, path: "{dir}/fault_loop.wasm", deadline: 200ms } ]
chains: [ { plugins: [loop] } ]
"#,
    )
    .unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::task::yield_now().await;
    let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let d = denied(
        set.on_request(&ctx("s", "trigger"), &JsonText::EMPTY_OBJECT)
            .await,
    );
    let took = started.elapsed();
    let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
    ticker.abort();
    assert_eq!(d.fault, Some(FaultKind::Deadline));
    assert!(
        // Generous: other tests of this binary compile and run plugins on the same two cores.
        took >= Duration::from_millis(200) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // 200 ms of 5 ms sleeps: about 40 (a blocked thread would manage none).
    assert!(
        during >= 10,
        "the runtime's other task ran {during} times during the call"
    );
}

/// A call dropped while the guest runs (the client went away) drops its instance; the plugin
/// keeps answering.
#[tokio::test(flavor = "current_thread")]
async fn a_call_cancelled_mid_guest_leaves_the_plugin_working() {
    let set = load(
        r#"
modules: [ { name: loop, path: "{dir}/fault_loop.wasm", deadline: 5s } ]
chains: [ { plugins: [loop] } ]
"#,
    )
    .unwrap();
    let trigger = ctx("s", "trigger");
    let empty = JsonText::EMPTY_OBJECT;
    let spin = set.on_request(&trigger, &empty);
    let started = Instant::now();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), spin)
            .await
            .is_err(),
        "the looping call cannot finish"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(is_allow(&set.on_request(&ctx("s", "other"), &empty).await));
    assert_eq!(set.warm_instances("loop"), Some(1));
}

#[test]
fn memory_limit_is_per_plugin() {
    let set = load(
        r#"
modules:
  - { name: small, path: "{dir}/fault_oom.wasm", memory_limit: 8MiB, deadline: 5s }
  - { name: large, path: "{dir}/fault_oom.wasm", memory_limit: 48MiB, deadline: 5s }
chains:
  - { servers: [small], plugins: [small] }
  - { servers: [large], plugins: [large] }
"#,
    )
    .unwrap();
    let d = denied(set.on_request_blocking(&ctx("small", "trigger"), "{}"));
    assert_eq!(d.fault, Some(FaultKind::Memory));
    assert!(
        d.message.contains("limit of 8388608 bytes"),
        "{}",
        d.message
    );
    let d = denied(set.on_request_blocking(&ctx("large", "trigger"), "{}"));
    assert!(
        d.message.contains("limit of 50331648 bytes"),
        "{}",
        d.message
    );
}

#[test]
fn fail_open_skips_a_failing_plugin() {
    let set = load(
        r#"
modules:
  - { name: trap, path: "{dir}/fault_trap.wasm", fail_open: true }
  - name: policy
    path: "{dir}/tool_policy.wasm"
    config: { rules: [ { tool: shell, action: block } ] }
chains: [ { plugins: [trap, policy] } ]
"#,
    )
    .unwrap();
    // The trap is skipped; the next plugin still decides.
    assert!(is_allow(
        &set.on_request_blocking(&ctx("s", "trigger"), "{}")
    ));
    let shell_after_trap = set.on_response_blocking(&ctx("s", "trigger"), "{}");
    assert!(is_allow(&shell_after_trap));
    assert!(!is_allow(
        &set.on_request_blocking(&ctx("s", "shell"), "{}")
    ));
    let metrics: std::collections::HashMap<_, _> = set.metrics().into_iter().collect();
    assert_eq!(metrics["trap"].fail_open_skips, 2);
    assert_eq!(metrics["trap"].faults_trap, 2);
}

/// A request can be made large enough for a plugin's memory limit or slow enough for its
/// deadline: such a fault refuses the call even through a plugin that fails open, which
/// would otherwise let any such request walk around it.
#[test]
fn fail_open_does_not_skip_what_a_request_can_cause() {
    let set = load(
        r#"
modules:
  - { name: loop, path: "{dir}/fault_loop.wasm", deadline: 50ms, fail_open: true }
  - { name: hog, path: "{dir}/fault_oom.wasm", memory_limit: 16MiB, deadline: 5s, fail_open: true }
chains:
  - { servers: [loop], plugins: [loop] }
  - { servers: [hog], plugins: [hog] }
"#,
    )
    .unwrap();
    for (server, kind) in [("loop", FaultKind::Deadline), ("hog", FaultKind::Memory)] {
        let d = denied(set.on_request_blocking(&ctx(server, "trigger"), "{}"));
        assert_eq!(d.fault, Some(kind), "{server}: {d:?}");
        assert_eq!(d.code, PLUGIN_FAILED, "{server}");
    }
    let metrics: std::collections::HashMap<_, _> = set.metrics().into_iter().collect();
    assert_eq!(metrics["loop"].fail_open_skips, 0);
    assert_eq!(metrics["hog"].fail_open_skips, 0);
}

#[test]
fn slow_init_is_bounded() {
    // Every init is slow: loading fails with a clear error.
    let started = Instant::now();
    let err = load(
        r#"
modules:
  - { name: sloth, path: "{dir}/fault_slow_init.wasm", init_deadline: 100ms, config: { spin_ms: 10000 } }
"#,
    )
    .unwrap_err();
    // Bounded by the init deadline, not the 10 s spin (compiling may take a while on a busy machine).
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, PluginError::Init { plugin, fault } if plugin == "sloth" && fault.kind() == FaultKind::Deadline),
        "{err}"
    );
    assert!(err.to_string().contains("deadline of 100ms"), "{err}");

    // Only later inits are slow: the first instance serves, the next one
    // (needed after every call here) fails its call, and only that call.
    let set = load(
        r#"
modules:
  - { name: sloth, path: "{dir}/fault_slow_init.wasm", init_deadline: 100ms, recycle_after: 1, config: { spin_ms: 10000, slow_from: 2 } }
  - name: policy
    path: "{dir}/tool_policy.wasm"
    config: { rules: [ { tool: shell, action: block } ] }
chains:
  - { servers: [slow], plugins: [sloth] }
  - { plugins: [policy] }
"#,
    )
    .unwrap();
    assert!(is_allow(&set.on_request_blocking(&ctx("slow", "a"), "{}")));
    let d = denied(set.on_request_blocking(&ctx("slow", "b"), "{}"));
    assert_eq!(d.fault, Some(FaultKind::Deadline));
    assert_eq!(&*d.plugin, "sloth");
    assert!(is_allow(&set.on_request_blocking(&ctx("fast", "a"), "{}")));
    assert!(!is_allow(
        &set.on_request_blocking(&ctx("fast", "shell"), "{}")
    ));
}

// ------------------------------------------------------------- chains, reuse

#[test]
fn chains_run_in_order_and_rewrites_feed_the_next_plugin() {
    let set = load(
        r#"
modules:
  - { name: redact, path: "{dir}/redact.wasm" }
  - name: trust
    path: "{dir}/trusted_data.wasm"
    config: { untrusted: ["*"], sensitive: [] }
  - { name: noop, path: "{dir}/noop.wasm" }
chains:
  - { name: first, plugins: [noop, redact] }
  - { name: second, plugins: [redact, trust] }
"#,
    )
    .unwrap();
    let d = set.on_response_blocking(&ctx("s", "t"), r#"{"text":"a@b.io"}"#);
    assert_eq!(
        d,
        Decision::Rewrite(r#"{"text":"[REDACTED:email]"}"#.into())
    );
    let metrics: std::collections::HashMap<_, _> = set.metrics().into_iter().collect();
    assert_eq!(metrics["redact"].calls, 1, "a plugin runs once per hook");
    assert_eq!(metrics["trust"].calls, 1);
}

/// The context a plugin reads, field by field, call after call on one warm instance: each
/// call sees its own values and nothing of the call before (the host reuses its buffers).
#[test]
fn each_call_context_field_reaches_the_plugin_and_nothing_stale_does() {
    let set = load(
        r#"
modules:
  - { name: echo, path: "{dir}/echo_context.wasm", max_warm: 1 }
chains: [ { plugins: [echo] } ]
"#,
    )
    .unwrap();
    let groups: Vec<Box<str>> = vec!["staff".into(), "eng".into(), "ops".into()];
    let scopes: Vec<Box<str>> = vec!["mcp".into()];
    let one_group: Vec<Box<str>> = vec!["x".into()];
    let calls = [
        CallContext {
            method: "tools/call",
            server: "files",
            name: Some("read"),
            principal: Some("alice"),
            session_id: "session-1",
            profile: Some("team"),
            groups: &groups,
            scopes: &scopes,
        },
        CallContext {
            method: "prompts/get",
            server: "s",
            name: Some("p"),
            principal: Some("bo"),
            session_id: "2",
            profile: None,
            groups: &one_group,
            scopes: &[],
        },
        CallContext {
            method: "tools/list",
            server: "",
            name: None,
            principal: None,
            session_id: "",
            profile: None,
            groups: &[],
            scopes: &[],
        },
        CallContext {
            method: "resources/read",
            server: "a-much-longer-server-name",
            name: Some("file:///a/much/longer/uri"),
            principal: Some("carol"),
            session_id: "session-4",
            profile: Some("p"),
            groups: &groups,
            scopes: &[],
        },
    ];
    // Arguments long then short: a copy that kept the longer one's tail would show.
    let payloads = [
        r#"{"path":"/a/long/path/to/read","mode":"r"}"#,
        "{}",
        r#"{"a":1}"#,
        r#"{"uri":"file:///x"}"#,
    ];
    for (ctx, payload) in calls.iter().zip(payloads) {
        let echoed: serde_json::Value =
            serde_json::from_str(&denied(set.on_request_blocking(ctx, payload)).message).unwrap();
        let strs = |items: &[Box<str>]| items.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(
            echoed,
            serde_json::json!({
                "method": ctx.method,
                "server": ctx.server,
                "name": ctx.name,
                "principal": ctx.principal,
                "session_id": ctx.session_id,
                "profile": ctx.profile,
                "groups": strs(ctx.groups),
                "scopes": strs(ctx.scopes),
                "name_again": ctx.name,
                "arguments": payload,
            }),
        );
    }
    assert_eq!(
        set.warm_instances("echo"),
        Some(1),
        "one instance served them all"
    );
    let m = set
        .metrics()
        .into_iter()
        .find(|(n, _)| n == "echo")
        .unwrap()
        .1;
    assert_eq!(m.instances, 1);
}

/// A component built against an older `gatehouse:plugin` is refused at load, and the error
/// says which version it was built for and what to do.
#[test]
fn a_component_of_an_older_interface_is_refused_with_what_to_do() {
    // Built against 0.2.0 and importing from it (as a plugin that uses `state` does), or only
    // exporting its hooks under the old name (as the no-op does): either way the error names
    // the version, though wasmtime's own words name only the first item it missed.
    for component in [
        component_of(Some("gatehouse:plugin/clock@0.2.0"), None),
        component_of(None, Some("gatehouse:plugin/hooks@0.2.0")),
    ] {
        let err = load_component(&component).unwrap_err().to_string();
        assert!(
            err.contains("does not implement gatehouse:plugin/plugin@0.3.0")
                && err.contains("built against gatehouse:plugin@0.2.0")
                && err.contains("rebuild it against wit/plugin.wit"),
            "{err}"
        );
    }
    // A component of nothing of ours gets no hint about versions.
    let err = load_component(&component_of(Some("example:other/clock"), None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not implement") && !err.contains("built against"),
        "{err}"
    );
}

/// The smallest component, encoded by hand, that imports an instance `import` holding a
/// function `now-ms` (a type section with the instance type, then the import), or exports an
/// empty instance of its own as `export`.
fn component_of(import: Option<&str>, export: Option<&str>) -> Vec<u8> {
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    if let Some(import) = import {
        let instance_type: &[u8] = &[
            0x01, 0x42, 0x02, // one type: an instance type of two declarations
            0x01, 0x40, 0x00, 0x00, 0x77, // a func type: no parameters, one u64 result
            0x04, 0x00, 0x06, b'n', b'o', b'w', b'-', b'm', b's', 0x01,
            0x00, // export "now-ms" of it
        ];
        bytes.extend([0x07, instance_type.len() as u8]);
        bytes.extend(instance_type);
        let mut section = vec![0x01, 0x00, import.len() as u8];
        section.extend(import.as_bytes());
        section.extend([0x05, 0x00]); // an instance of type 0
        bytes.extend([0x0a, section.len() as u8]);
        bytes.extend(section);
    }
    if let Some(export) = export {
        bytes.extend([0x05, 0x03, 0x01, 0x01, 0x00]); // one instance: of no exports, inline
        let mut section = vec![0x01, 0x00, export.len() as u8];
        section.extend(export.as_bytes());
        section.extend([0x05, 0x00, 0x00]); // instance 0, no type ascribed
        bytes.extend([0x0b, section.len() as u8]);
        bytes.extend(section);
    }
    bytes
}

/// Loads a set of one plugin, the component `bytes`.
fn load_component(bytes: &[u8]) -> Result<Arc<PluginSet>, PluginError> {
    let dir = std::env::temp_dir().join(format!(
        "gatehouse-component-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("component.wasm");
    std::fs::write(&path, bytes).unwrap();
    let yaml = format!(
        "modules: [ {{ name: it, path: {path:?} }} ]\nchains: [ {{ plugins: [it] }} ]\nengine: {{ cache_dir: {:?} }}\n",
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugin-cache-tests")
    );
    let cfg: PluginsConfig = serde_saphyr::from_str(&yaml).unwrap();
    let loaded = PluginSet::load(&cfg);
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}

#[test]
fn warm_instances_are_reused_and_recycled() {
    let set = load(
        r#"
modules:
  - { name: allow, path: "{dir}/tool_policy.wasm", recycle_after: 50, max_warm: 2 }
chains: [ { plugins: [allow] } ]
"#,
    )
    .unwrap();
    for _ in 0..120 {
        assert!(is_allow(&set.on_request_blocking(&ctx("s", "t"), "{}")));
    }
    let m = set
        .metrics()
        .into_iter()
        .find(|(n, _)| n == "allow")
        .unwrap()
        .1;
    assert_eq!(m.calls, 120);
    // The first instance, then one after each 50 calls.
    assert_eq!(m.instances, 3);
    assert_eq!(set.warm_instances("allow"), Some(1));
}

#[test]
fn empty_set_allows_everything() {
    let set = load("modules: []").unwrap();
    assert!(set.is_empty());
    assert!(is_allow(&set.on_request_blocking(&ctx("s", "t"), "{}")));
    assert_eq!(
        set.filter_list_blocking(&ctx("s", "t"), &[entry("a", &[])])
            .unwrap(),
        [true]
    );
}

#[test]
fn loading_errors_name_the_plugin() {
    let not_wasm = std::env::temp_dir().join("gatehouse-not-a-plugin.wasm");
    std::fs::write(&not_wasm, b"definitely not wasm").unwrap();
    let mut cfg = PluginsConfig::default();
    cfg.modules
        .push(gatehouse::plugins::PluginConfig::new("bogus", &not_wasm));
    cfg.engine.cache_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugin-cache-tests"));
    let err = PluginSet::load(&cfg).unwrap_err();
    assert!(
        matches!(err, PluginError::Compile { ref plugin, .. } if plugin == "bogus"),
        "{err}"
    );
    // A valid component that exports nothing.
    std::fs::write(&not_wasm, b"\0asm\x0d\0\x01\0").unwrap();
    let err = PluginSet::load(&cfg).unwrap_err();
    assert!(
        matches!(err, PluginError::Interface { ref plugin, .. } if plugin == "bogus"),
        "{err}"
    );
    assert!(err.to_string().contains("gatehouse:plugin/hooks"), "{err}");
    cfg.modules[0].path = PathBuf::from("/nonexistent/plugin.wasm");
    let err = PluginSet::load(&cfg).unwrap_err();
    assert!(matches!(err, PluginError::Read { .. }), "{err}");
}

#[test]
fn compiled_plugins_come_from_the_disk_cache() {
    let yaml = r#"
modules: [ { name: a, path: "{dir}/list_filter.wasm" } ]
"#;
    load(yaml).unwrap();
    let (hits_before, _) = gatehouse::plugins::compile_cache_stats();
    load(yaml).unwrap();
    let (hits_after, _) = gatehouse::plugins::compile_cache_stats();
    assert!(
        hits_after > hits_before,
        "second compile should hit the cache"
    );
}

// ---------------------------------------------------------------- plugin check

#[test]
fn plugin_check_reports_the_decision() {
    let sample = std::env::temp_dir().join("gatehouse-check-sample.json");
    std::fs::write(
        &sample,
        r#"{"config": {"rules": [{"tool": "shell", "action": "block", "reason": "no shell"}]},
            "context": {"method": "tools/call", "server": "box", "name": "shell", "session_id": "c"},
            "arguments": {"cmd": "rm -rf /"}}"#,
    )
    .unwrap();
    let report = gatehouse::plugins::check(&wasm("tool_policy"), Some(&sample)).unwrap();
    assert!(
        report.contains("interface: gatehouse:plugin/plugin@0.3.0 ok"),
        "{report}"
    );
    assert!(report.contains("hooks: on-request"), "{report}");
    assert!(
        report
            .trim_end()
            .ends_with("on-request (tools/call shell): deny (code -32030): no shell"),
        "{report}"
    );

    let report = gatehouse::plugins::check(&wasm("noop"), None).unwrap();
    assert!(
        report.contains("hooks: on-request, on-response\n"),
        "{report}"
    );
    assert!(
        report
            .trim_end()
            .ends_with("on-request (tools/call example): allow"),
        "{report}"
    );

    let filter_sample = std::env::temp_dir().join("gatehouse-check-filter.json");
    std::fs::write(
        &filter_sample,
        r#"{"config": {"rules": [{"deny": ["*delete*"]}]}, "hook": "filter-list",
            "context": {"method": "tools/list"},
            "entries": [{"name": "read"}, {"name": "delete_all"}]}"#,
    )
    .unwrap();
    let report = gatehouse::plugins::check(&wasm("list_filter"), Some(&filter_sample)).unwrap();
    assert!(
        report
            .trim_end()
            .ends_with("filter-list (tools/list): [read=visible, delete_all=hidden]"),
        "{report}"
    );

    let trap_sample = std::env::temp_dir().join("gatehouse-check-trap.json");
    std::fs::write(&trap_sample, r#"{"context": {"name": "trigger"}}"#).unwrap();
    let trap = gatehouse::plugins::check(&wasm("fault_trap"), Some(&trap_sample)).unwrap();
    assert!(trap.contains("deny (plugin fault: Trap"), "{trap}");

    let not_wasm = std::env::temp_dir().join("gatehouse-check-not-wasm.wasm");
    std::fs::write(&not_wasm, b"\0asm nope").unwrap();
    assert!(gatehouse::plugins::check(&not_wasm, None).is_err());
}

/// The gateway calls hooks from tokio tasks: a guest that writes to stderr
/// (a panic message), prints, or tries to block must not hit the WASI
/// implementation's own runtime handling (which panics inside a runtime).
#[test]
fn hooks_run_inside_a_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let set = fault_set();
    let py = policy_set("tool_policy_py");
    rt.block_on(async move {
        let task = tokio::spawn(async move {
            let d = denied(set.on_request_blocking(&ctx("trap", "trigger"), "{}"));
            assert_eq!(d.fault, Some(FaultKind::Trap));
            assert!(
                d.message.contains("trap requested by the test"),
                "{}",
                d.message
            );
            assert!(is_allow(
                &set.on_request_blocking(&ctx("trap", "fine"), "{}")
            ));
            let d = denied(py.on_request_blocking(
                &ctx("files", "fs_read"),
                r#"{"path": "/etc/x", "mode": "read"}"#,
            ));
            assert_eq!(d.message, "system files are off limits");
        });
        task.await.expect("hook calls inside a tokio task");
    });
}

// ------------------------------------------------------------ hostile plugins
//
// What a plugin controls (its answers, what it asks of the host) cannot make the gateway
// speak for the protocol, send something malformed on, or reach past the state's bounds.

/// A plugin's denial codes: one the protocol or the gateway gives a meaning (a parse error,
/// "resource not found", "too busy", a tool that waits for approval, a plugin fault, ...) is
/// answered as the policy code; its own code, outside those, is kept.
#[test]
fn a_denial_code_the_gateway_gives_a_meaning_is_answered_as_a_policy_denial() {
    let claimed = [
        -32700, -32603, -32002, -32010, -32012, -32020, -32031, -32040, -32042, -32800,
    ];
    let own = [-32030, -32050, -32099 + 1, 403];
    let modules: String = claimed
        .iter()
        .chain(&own)
        .map(|code| {
            format!(
                "  - {{ name: \"p{code}\", path: \"{{dir}}/fault_trap.wasm\", config: {{ deny_code: {code} }} }}\n"
            )
        })
        .collect();
    let chains: String = claimed
        .iter()
        .chain(&own)
        .map(|code| format!("  - {{ servers: [\"s{code}\"], plugins: [\"p{code}\"] }}\n"))
        .collect();
    let set = load(&format!("modules:\n{modules}chains:\n{chains}")).unwrap();
    for code in claimed.iter().chain(&own) {
        let server = format!("s{code}");
        let d = denied(set.on_request_blocking(&ctx(&server, "deny"), "{}"));
        let expected = if own.contains(code) {
            i64::from(*code)
        } else {
            POLICY_DENIED
        };
        assert_eq!(d.code, expected, "a denial with {code}: {d:?}");
        assert_eq!(&*d.plugin, format!("p{code}"));
        assert_eq!(d.fault, None);
        assert_eq!(d.message, format!("hostile denial {code}"));
        assert!(
            d.to_string()
                .starts_with(&format!("denied by plugin p{code}: ")),
            "{d}"
        );
    }
}

/// A rewrite stands for the call's arguments or its result, both JSON objects: JSON that is
/// not an object (an array, a string, `null`, a number) would reach the upstream as
/// `arguments`, or the client as a `result`, that the protocol does not allow. It fails the
/// plugin (naming it) as a rewrite that is not JSON does.
#[test]
fn a_rewrite_that_is_not_a_json_object_fails_the_plugin() {
    for bad in [
        "[1,2]", "\"text\"", "null", "42", "true", " [] ", "{} {}", "",
    ] {
        let set = load(&format!(
            "modules: [ {{ name: shaper, path: \"{{dir}}/fault_trap.wasm\", config: {{ rewrite: {} }} }} ]\nchains: [ {{ plugins: [shaper] }} ]",
            serde_json::to_string(bad).unwrap()
        ))
        .unwrap();
        let d = denied(set.on_request_blocking(&ctx("s", "rewrite"), r#"{"a":1}"#));
        assert_eq!(
            d.fault,
            Some(FaultKind::Malformed),
            "request {bad:?}: {d:?}"
        );
        assert_eq!(d.code, PLUGIN_FAILED);
        assert_eq!(&*d.plugin, "shaper");
        assert!(d.message.contains("plugin shaper"), "{}", d.message);
        let d = denied(set.on_response_blocking(&ctx("s", "rewrite"), r#"{"content":[]}"#));
        assert_eq!(d.fault, Some(FaultKind::Malformed), "result {bad:?}: {d:?}");
        assert_eq!(&*d.plugin, "shaper");
        // Other calls go on.
        assert!(is_allow(&set.on_request_blocking(&ctx("s", "fine"), "{}")));
    }
    for good in [r#"{"a":2}"#, " {\"a\": [1]}\n", "{}"] {
        let set = load(&format!(
            "modules: [ {{ name: shaper, path: \"{{dir}}/fault_trap.wasm\", config: {{ rewrite: {} }} }} ]\nchains: [ {{ plugins: [shaper] }} ]",
            serde_json::to_string(good).unwrap()
        ))
        .unwrap();
        assert_eq!(
            set.on_request_blocking(&ctx("s", "rewrite"), r#"{"a":1}"#),
            Decision::Rewrite(good.into())
        );
        assert_eq!(
            set.on_response_blocking(&ctx("s", "rewrite"), "{}"),
            Decision::Rewrite(good.into())
        );
    }
}

/// The state bounds hold as a plugin meets them through the host (keys of 256 bytes, values
/// of 64 KiB, 1024 keys per owner), a counter saturates, and `init`, which runs for no caller,
/// has neither a session's nor a principal's state to write (it would be the anonymous
/// callers'); each principal and each plugin sees only its own keys.
#[test]
fn state_bounds_hold_through_the_host_and_init_has_no_caller() {
    let set = load(
        r#"
modules:
  - { name: probe, path: "{dir}/fault_trap.wasm", config: { state_probe: true } }
  - { name: other, path: "{dir}/fault_trap.wasm", config: { state_probe: true } }
chains:
  - { servers: [one], plugins: [probe] }
  - { servers: [two], plugins: [other] }
"#,
    )
    .unwrap();
    let report = |server: &str, principal: Option<&str>, session: &str| {
        let c = CallContext {
            principal,
            session_id: session,
            ..ctx(server, "state")
        };
        let message = denied(set.on_request_blocking(&c, "{}")).message;
        let answers: std::collections::HashMap<String, String> = message
            .split(';')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        answers
    };
    let a = report("one", Some("alice"), "s-alice");
    assert_eq!(a["init.session"], "err:no session in this context", "{a:?}");
    assert_eq!(a["init.principal"], "err:no caller in init", "{a:?}");
    assert_eq!(a["init.global"], "ok", "{a:?}");
    assert_eq!(a["key256"], "ok");
    assert_eq!(a["key257"], "err:key longer than 256 bytes");
    assert_eq!(a["value64k"], "ok");
    assert_eq!(a["value64k+1"], "err:value larger than 65536 bytes");
    assert_eq!(a["fill1024"], "ok");
    assert_eq!(a["key1025"], "err:more than 1024 keys in this scope");
    assert_eq!(a["overwrite"], "ok");
    assert_eq!(
        a["incr-new-past-bound"],
        "err:more than 1024 keys in this scope"
    );
    assert_eq!(a["incr-saturates"], i64::MAX.to_string());
    assert_eq!(a["ttl-max"], "ok");
    assert_eq!(
        a["forever-read"], "1",
        "a time to live past the clock's end is none"
    );
    assert_eq!(a["init-global-read"], "init");
    // What init wrote is no caller's: not even an anonymous one reads it as its own.
    let anonymous = report("one", None, "s-anon");
    assert_eq!(anonymous["init-principal-read"], "none", "{anonymous:?}");
    assert_eq!(
        anonymous["fill1024"], "ok",
        "the anonymous owner is not alice"
    );
    // Another principal, and another plugin of the same file, start with room for their own.
    let b = report("one", Some("bob"), "s-bob");
    assert_eq!(b["fill1024"], "ok", "{b:?}");
    let other = report("two", Some("alice"), "s-alice");
    assert_eq!(other["fill1024"], "ok", "{other:?}");
    assert_eq!(other["value64k"], "ok");
    // The bounds are per owner: what alice filled stays full.
    let again = report("one", Some("alice"), "s-alice-2");
    assert_eq!(again["key1025"], "err:more than 1024 keys in this scope");
    assert_eq!(again["key256"], "ok", "a new session has room");
}

/// A plugin's log lines go to the gateway's log bounded (64 lines a call, 4 KiB a line), and
/// as one line each: a line break or another control character in a plugin's message cannot
/// forge a record of the gateway's own in a text log.
#[test]
fn a_plugin_cannot_flood_or_forge_the_gateways_log() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let forged = "x\n2030-01-01T00:00:00.000000Z  INFO gatehouse::admin: operator token accepted\r\u{1b}[2K\u{2028}\u{202e}";
    let text = format!("{forged}{}", "y".repeat(10_000));
    let set = load(&format!(
        "modules: [ {{ name: chatty, path: \"{{dir}}/fault_trap.wasm\", config: {{ log_lines: 1000, log_text: {} }} }} ]\nchains: [ {{ plugins: [chatty] }} ]",
        serde_json::to_string(&text).unwrap()
    ))
    .unwrap();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..2 {
            assert!(is_allow(&set.on_request_blocking(&ctx("s", "log"), "{}")));
        }
    });
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("chatty")).collect();
    // 64 lines a call, and 20 a second of each plugin however many calls log (two calls run
    // within a second, or across the turn of one).
    assert!((20..=40).contains(&lines.len()), "{} lines", lines.len());
    assert_eq!(
        out.lines().count(),
        lines.len(),
        "no line of another's: {out:.2000}"
    );
    assert!(
        !out.contains(['\r', '\u{1b}', '\u{2028}', '\u{202e}']),
        "a line separator or a bidirectional override is escaped too: {out:.2000}"
    );
    for line in lines {
        assert!(line.len() < 4096 + 512, "{} bytes", line.len());
    }
}

/// What a JSON string of `s` takes, between its quotes.
fn json_len(s: &str) -> usize {
    serde_json::to_string(s).unwrap().len() - 2
}

/// A plugin that keys its state by what a client chooses (a session each, a principal each)
/// cannot grow the gateway's memory past its `state_max_bytes` / `state_max_entries`, every
/// owner together: the write past them is refused, and the plugin is told which limit it met
/// (here it denies the call with what it was told). Calls that write nothing go on, another
/// plugin of the same file has room of its own, and a session's end gives its room back.
#[test]
fn a_plugins_state_is_bounded_every_owner_together() {
    let set = load(
        r#"
modules:
  - { name: filler, path: "{dir}/fault_trap.wasm", state_max_bytes: 64KiB, config: { state_fill: { keys: 20, value_bytes: 1000, scope: session } } }
  - { name: keyed, path: "{dir}/fault_trap.wasm", state_max_entries: 50, config: { state_fill: { keys: 20, value_bytes: 1, scope: principal } } }
  - { name: roomy, path: "{dir}/fault_trap.wasm", config: { state_fill: { keys: 20, value_bytes: 1000, scope: session } } }
chains:
  - { servers: [one], plugins: [filler] }
  - { servers: [two], plugins: [keyed] }
  - { servers: [three], plugins: [roomy] }
"#,
    )
    .unwrap();
    let fill = |server: &str, principal: &str, session: &str| {
        let c = CallContext {
            principal: Some(principal),
            session_id: session,
            ..ctx(server, "fill")
        };
        set.on_request_blocking(&c, "{}")
    };
    // Twenty keys of about 1 KB a session: three sessions fit in 64 KiB, the fourth does not.
    for session in ["s1", "s2", "s3"] {
        assert!(is_allow(&fill("one", "alice", session)), "{session}");
    }
    let d = denied(fill("one", "alice", "s4"));
    assert_eq!(d.code, POLICY_DENIED);
    assert_eq!(d.fault, None, "the plugin chose to deny: {d:?}");
    assert_eq!(
        d.message,
        "state_fill: 5 written; the plugin's state is full: its keys and values would take more than 65536 bytes (state_max_bytes)"
    );
    let (bytes, entries) = set.state().held_by("filler");
    assert!(bytes <= 64 * 1024, "{bytes}");
    assert_eq!(entries, 65);
    // Another client's session: refused too (the bound is the plugin's), and it holds nothing.
    assert!(
        denied(fill("one", "bob", "s5"))
            .message
            .starts_with("state_fill: 0 written;")
    );
    assert_eq!(set.state().held_by("filler"), (bytes, entries));
    // A call that writes nothing goes on; so does a session that writes what it held.
    assert!(is_allow(
        &set.on_request_blocking(&ctx("one", "other"), "{}")
    ));
    assert!(is_allow(&fill("one", "alice", "s1")));
    // Another plugin of the same file has its own room.
    for session in ["s1", "s2", "s3", "s4", "s5"] {
        assert!(is_allow(&fill("three", "alice", session)), "{session}");
    }
    // A session's end gives back what it held.
    set.end_session("s2");
    assert!(is_allow(&fill("one", "bob", "s5")));
    assert!(set.state().held_by("filler").0 <= 64 * 1024);

    // Keys: twenty a principal, at most fifty in all.
    assert!(is_allow(&fill("two", "alice", "s1")));
    assert!(is_allow(&fill("two", "bob", "s1")));
    let d = denied(fill("two", "carol", "s1"));
    assert_eq!(
        d.message,
        "state_fill: 10 written; the plugin's state is full: it would hold more than 50 keys (state_max_entries)"
    );
    assert_eq!(set.state().held_by("keyed").1, 50);
    assert!(
        is_allow(&fill("two", "alice", "s9")),
        "what alice holds, rewritten"
    );
}

/// A plugin at its limits has its expired keys dropped to make room (nothing live is evicted):
/// what a client's sessions wrote with a time to live does not hold the plugin full after it
/// expires, even where no sweep ran.
#[test]
fn expired_state_makes_room_for_a_plugin_at_its_limits() {
    let set = load(
        r#"
modules:
  - { name: brief, path: "{dir}/fault_trap.wasm", state_max_entries: 40, config: { state_fill: { keys: 20, value_bytes: 10, scope: session, ttl_ms: 200 } } }
chains:
  - { plugins: [brief] }
"#,
    )
    .unwrap();
    let fill = |session: &str| {
        let c = CallContext {
            session_id: session,
            ..ctx("one", "fill")
        };
        set.on_request_blocking(&c, "{}")
    };
    assert!(is_allow(&fill("s1")));
    assert!(is_allow(&fill("s2")));
    assert!(
        denied(fill("s3")).message.contains("state_max_entries"),
        "full while they live"
    );
    // Past their time to live, and past how often a full plugin's keys are looked over (1 s).
    std::thread::sleep(Duration::from_millis(1100));
    assert!(is_allow(&fill("s3")));
    assert_eq!(set.state().held_by("brief").1, 20);
}

/// A plugin's denial reason reaches the caller bounded (1 KiB as the JSON string holds it, cut
/// on a character boundary and marked `…`) and on one line (a line break, a quote, a terminal
/// escape cannot end the message or forge a record of the log or the audit trail, which get
/// the same text). Its code is kept.
#[test]
fn a_plugins_denial_reason_is_bounded_and_one_line() {
    let text = "é\n\"\u{1b}[2K\u{2028}\\ ";
    let set = load(&format!(
        "modules: [ {{ name: loud, path: \"{{dir}}/fault_trap.wasm\", config: {{ deny_code: -32050, deny_bytes: 1000000, deny_text: {} }} }} ]\nchains: [ {{ plugins: [loud] }} ]",
        serde_json::to_string(text).unwrap()
    ))
    .unwrap();
    for _ in 0..2 {
        let d = denied(set.on_request_blocking(&ctx("s", "deny"), "{}"));
        assert_eq!(d.code, -32050);
        assert_eq!(d.fault, None);
        assert!(
            json_len(&d.message) <= gatehouse::plugins::MAX_REASON_BYTES,
            "{} bytes",
            json_len(&d.message)
        );
        assert!(
            json_len(&d.message) > 1000,
            "cut near the bound, not before"
        );
        assert!(d.message.ends_with('…'), "{:.100}", d.message);
        assert!(
            !d.message.contains(['\n', '\r', '\u{1b}', '\u{2028}']),
            "one line: {:.100}",
            d.message
        );
        assert!(
            d.message.starts_with("é\\n\"\\u{1b}[2K\\u{2028}\\ é"),
            "{:.100}",
            d.message
        );
        let shown = d.to_string();
        assert!(
            shown.starts_with("denied by plugin loud: é"),
            "{shown:.100}"
        );
        assert!(shown.len() < 1100, "{}", shown.len());
    }
    // A short reason is left as it is.
    let set = load(
        "modules: [ { name: short, path: \"{dir}/fault_trap.wasm\", config: { deny_code: -32050, deny_bytes: 40, deny_text: \"no: \" } } ]\nchains: [ { plugins: [short] } ]",
    )
    .unwrap();
    let d = denied(set.on_request_blocking(&ctx("s", "deny"), "{}"));
    assert_eq!(d.message, "no: ".repeat(10));
}

/// A rewrite larger than the gateway takes from an upstream (64 MiB) fails the plugin (-32031,
/// naming it), of the arguments and of the result alike, rather than reach the upstream or the
/// client; one within it is applied.
#[test]
fn a_rewrite_larger_than_the_gateway_takes_fails_the_plugin() {
    let over = gatehouse::plugins::MAX_REWRITE_BYTES + 1;
    let set = load(&format!(
        "modules:\n  - {{ name: bloat, path: \"{{dir}}/fault_trap.wasm\", memory_limit: 256MiB, deadline: 10s, config: {{ rewrite_bytes: {over} }} }}\n  - {{ name: lenient, path: \"{{dir}}/fault_trap.wasm\", memory_limit: 256MiB, deadline: 10s, fail_open: true, config: {{ rewrite_bytes: {over} }} }}\n  - {{ name: fits, path: \"{{dir}}/fault_trap.wasm\", memory_limit: 256MiB, deadline: 10s, config: {{ rewrite_bytes: 1048576 }} }}\nchains:\n  - {{ servers: [big], plugins: [bloat] }}\n  - {{ servers: [open], plugins: [lenient] }}\n  - {{ servers: [small], plugins: [fits] }}"
    ))
    .unwrap();
    // Even through a plugin that fails open: a payload can make a rewrite grow (a redaction
    // lengthens what it masks), so skipping the plugin would let such a payload walk past it.
    for (d, plugin) in [
        (
            denied(set.on_request_blocking(&ctx("big", "rewrite"), r#"{"a":1}"#)),
            "bloat",
        ),
        (
            denied(set.on_response_blocking(&ctx("big", "rewrite"), "{}")),
            "bloat",
        ),
        (
            denied(set.on_response_blocking(&ctx("open", "rewrite"), "{}")),
            "lenient",
        ),
    ] {
        assert_eq!(d.code, PLUGIN_FAILED, "{d:?}");
        assert_eq!(d.fault, Some(FaultKind::Malformed));
        assert_eq!(&*d.plugin, plugin);
        assert!(
            d.message.contains(&format!(
                "returned a rewrite of {over} bytes, larger than the gateway takes"
            )),
            "{}",
            d.message
        );
    }
    match set.on_request_blocking(&ctx("small", "rewrite"), r#"{"a":1}"#) {
        Decision::Rewrite(json) => assert_eq!(json.len(), 1 << 20),
        other => panic!("expected a rewrite, got {other:?}"),
    }
    assert!(is_allow(
        &set.on_request_blocking(&ctx("big", "other"), "{}")
    ));
}

// ------------------------------------------------------------- reused decisions

/// A set running `reuse_probe` (one instance, so its run count is one count) reading `reads`.
fn probe_set(reads: &str, reuse: bool) -> Arc<PluginSet> {
    load(&format!(
        r#"
modules:
  - name: probe
    path: "{{dir}}/reuse_probe.wasm"
    config: {{ reads: {reads} }}
    max_warm: 1
    reuse_decisions: {reuse}
chains: [ {{ plugins: [probe] }} ]
"#
    ))
    .unwrap()
}

fn metrics_of(set: &PluginSet, plugin: &str) -> gatehouse::plugins::MetricsSnapshot {
    set.metrics()
        .into_iter()
        .find(|(n, _)| n == plugin)
        .expect("the plugin's counters")
        .1
}

/// The probe's denial: which of its runs answered, and for whom.
fn probe_answer(set: &PluginSet, ctx: &CallContext<'_>) -> String {
    denied(set.on_request_blocking(ctx, r#"{"a":1}"#)).message
}

#[test]
fn a_kept_decision_answers_calls_alike_and_only_those() {
    let set = probe_set("nothing", true);
    let alice = ctx("s", "t");
    let bob = CallContext {
        principal: Some("bob"),
        ..alice
    };
    assert_eq!(probe_answer(&set, &alice), "run 1 for alice (0)");
    // The same caller, tool and server, from another session and with other arguments: kept.
    let other_session = CallContext {
        session_id: "session-2",
        ..alice
    };
    assert_eq!(probe_answer(&set, &other_session), "run 1 for alice (0)");
    // Another principal, tool, server, group or scope is asked anew.
    assert_eq!(probe_answer(&set, &bob), "run 2 for bob (0)");
    assert_eq!(probe_answer(&set, &ctx("s", "u")), "run 3 for alice (0)");
    assert_eq!(
        probe_answer(&set, &ctx("other", "t")),
        "run 4 for alice (0)"
    );
    let admins: [Box<str>; 1] = ["admins".into()];
    let grouped = CallContext {
        groups: &admins,
        ..alice
    };
    assert_eq!(probe_answer(&set, &grouped), "run 5 for alice (0)");
    let scoped = CallContext {
        scopes: &admins,
        ..alice
    };
    assert_eq!(probe_answer(&set, &scoped), "run 6 for alice (0)");
    assert_eq!(probe_answer(&set, &bob), "run 2 for bob (0)");
    let m = metrics_of(&set, "probe");
    assert_eq!((m.calls, m.reused, m.denials), (8, 2, 8));

    // Off (the default), the plugin decides every call.
    let set = probe_set("nothing", false);
    assert_eq!(probe_answer(&set, &alice), "run 1 for alice (0)");
    assert_eq!(probe_answer(&set, &alice), "run 2 for alice (0)");
    assert_eq!(metrics_of(&set, "probe").reused, 0);
}

#[test]
fn a_call_that_reads_beyond_its_keyed_fields_is_never_kept() {
    for reads in [
        "payload",
        "session",
        "state",
        "clock",
        "log",
        "wasi-wall-clock",
        "wasi-monotonic-clock",
        "wasi-random",
    ] {
        let set = probe_set(reads, true);
        let alice = ctx("s", "t");
        for run in 1..=3 {
            let answer = probe_answer(&set, &alice);
            assert!(
                answer.starts_with(&format!("run {run} for alice")),
                "{reads}: {answer}"
            );
        }
        let m = metrics_of(&set, "probe");
        assert_eq!((m.calls, m.reused), (3, 0), "{reads}");
    }
}

#[test]
fn every_instance_of_a_plugin_has_the_same_hash_seed() {
    // A fresh instance each call: a plugin's hash maps must not iterate unlike in another
    // instance, or a kept decision would be whichever instance answered first.
    let set = load(
        r#"
modules:
  - name: probe
    path: "{dir}/reuse_probe.wasm"
    config: { reads: hash-seed }
    recycle_after: 1
chains: [ { plugins: [probe] } ]
"#,
    )
    .unwrap();
    let seed = |answer: String| answer.rsplit_once('(').unwrap().1.to_string();
    let first = seed(probe_answer(&set, &ctx("s", "t")));
    for _ in 0..3 {
        assert_eq!(seed(probe_answer(&set, &ctx("s", "t"))), first);
    }
    assert!(metrics_of(&set, "probe").instances >= 4);
}

#[test]
fn a_rate_limit_keeps_counting_with_reuse_turned_on() {
    let set = load(
        r#"
modules:
  - name: limit
    path: "{dir}/rate_limit.wasm"
    config: { limits: [ { tool: search, calls: 3, window: 1h } ] }
    reuse_decisions: true
chains: [ { plugins: [limit] } ]
"#,
    )
    .unwrap();
    let alice = ctx("s", "search");
    for _ in 0..3 {
        assert!(is_allow(&set.on_request_blocking(&alice, "{}")));
    }
    let d = denied(set.on_request_blocking(&alice, "{}"));
    assert_eq!(d.code, -32029);
    assert_eq!(metrics_of(&set, "limit").reused, 0);
}

#[test]
fn a_list_filters_answer_for_a_calls_target_is_kept() {
    let set = load(
        r#"
modules:
  - name: filter
    path: "{dir}/list_filter.wasm"
    config: { rules: [ { deny: ["*delete*"] } ] }
    reuse_decisions: true
chains: [ { plugins: [filter] } ]
"#,
    )
    .unwrap();
    for _ in 0..3 {
        let d = denied(set.on_request_blocking(&ctx("s", "fs_delete"), "{}"));
        assert!(d.message.contains("not available"), "{}", d.message);
        assert!(is_allow(
            &set.on_request_blocking(&ctx("s", "fs_read"), "{}")
        ));
    }
    let m = metrics_of(&set, "filter");
    assert_eq!((m.calls, m.reused), (6, 4));
    // A listing of several entries is asked each time (only one-entry answers are kept).
    let entries = [entry("fs_read", &[]), entry("fs_delete", &[])];
    let listing = CallContext {
        method: "tools/list",
        name: None,
        ..ctx("s", "")
    };
    for _ in 0..2 {
        assert_eq!(
            set.filter_list_blocking(&listing, &entries).unwrap(),
            [true, false]
        );
    }
    assert_eq!(metrics_of(&set, "filter").reused, 4);
}

/// Each build of tool-policy reads the arguments only where a rule on them names the tool: its
/// other decisions are kept (where its runtime lets the host see that they can be).
#[test]
fn every_build_of_tool_policy_has_its_name_only_decisions_kept() {
    warm_interpreted();
    for build in TOOL_POLICY_BUILDS {
        let set = load(&format!(
            r#"
modules:
  - name: policy
    path: "{{dir}}/{build}.wasm"
    reuse_decisions: true
    config:
      rules:
        - {{ tool: "fs_*", argument: path, operator: startsWith, value: /etc, action: block, reason: "no /etc" }}
        - {{ tool: shell, action: block, reason: "no shell" }}
      default: allow
chains: [ {{ plugins: [policy] }} ]
"#
        ))
        .unwrap();
        for _ in 0..3 {
            assert_eq!(
                denied(set.on_request_blocking(&ctx("s", "shell"), "{}")).message,
                "no shell",
                "{build}"
            );
            assert!(
                is_allow(&set.on_request_blocking(&ctx("s", "search"), "{}")),
                "{build}"
            );
            // A rule on the arguments names fs_*: those calls are judged each time.
            assert!(
                !is_allow(&set.on_request_blocking(&ctx("s", "fs_read"), r#"{"path":"/etc/x"}"#)),
                "{build}"
            );
            assert!(
                is_allow(&set.on_request_blocking(&ctx("s", "fs_read"), r#"{"path":"/home/x"}"#)),
                "{build}"
            );
        }
        let m = metrics_of(&set, "policy");
        // The JavaScript build's runtime reads a WASI clock and draws randomness on every call,
        // so nothing of it is kept (its decisions above are right all the same).
        let kept = if build == "tool_policy_js" { 0 } else { 4 };
        assert_eq!((m.calls, m.reused), (12, kept), "{build}");
    }
}
