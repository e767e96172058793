//! The audit trail through the gateway: calls and policy denials become chained records with a
//! signed checkpoint at shutdown; `gatehouse audit verify` accepts the file as written and names
//! the first broken record once a line is edited.

mod support;

use std::process::Command;

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use support::{BIN, TestGateway, example, wasm};

const SEED: [u8; 32] = [42; 32];

fn verify(file: &std::path::Path, key: Option<&str>) -> (bool, String) {
    let (code, out) = verify_status(file, key);
    (code == 0, out)
}

/// `gatehouse audit verify`'s exit status and what it printed.
fn verify_status(file: &std::path::Path, key: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["audit", "verify"]).arg(file);
    if let Some(k) = key {
        cmd.args(["--public-key", k]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn calls_and_denials_are_chained_signed_and_verifiable() {
    let dir = std::env::temp_dir().join(format!("gatehouse-audit-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&file);
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, format!("{}\n", "2a".repeat(32))).unwrap();
    let top = format!(
        "auth:
  tokens: [{{ principal: alice, token: alice-token-0123456789 }}]
admin:
  tokens: [{{ principal: ops, token: ops-token-0123456789ab }}]
audit:
  file: {file:?}
  signing_key: {{ file: {key_file:?} }}
plugins:
  modules:
    - name: lists
      path: {:?}
      config: {{ rules: [ {{ deny: [add] }} ] }}
  chains:
    - {{ name: all, plugins: [lists] }}
",
        wasm("list_filter")
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.token = Some("alice-token-0123456789".into());
    c.initialize(json!({})).await;
    assert_eq!(
        c.tool_text(1, "echo", json!({"text": "secret-argument"}))
            .await,
        "secret-argument"
    );
    let denied = c
        .call(
            2,
            "tools/call",
            json!({"name": "add", "arguments": {"a": 1, "b": 2}}),
        )
        .await;
    assert!(denied["error"].is_object(), "{denied}");
    // A caller that goes away before the answer: the call is still on the record.
    let gone = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        c.post(json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"slow","arguments":{"seconds":3,"steps":1}}}).to_string()),
    )
    .await;
    assert!(gone.is_err(), "the slow call should still be running");
    // A caller without a valid token, and an admin change that fails.
    let mut stranger = gw.client();
    stranger.token = Some("wrong-token-0123456789".into());
    assert_eq!(
        stranger
            .post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string())
            .await
            .status,
        401
    );
    let delete_with = |token: &str| {
        let mut admin = gw.client();
        admin.url = format!("http://{}/admin/v1/servers/nope", gw.addr);
        admin.token = Some(token.into());
        async move {
            let req = admin
                .request("DELETE", "")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            admin.send(req).await.status
        }
    };
    assert_eq!(delete_with("ops-token-0123456789ab").await, 404);
    assert_eq!(delete_with("not-the-admin-token-000").await, 401);

    // What operators read (the console's pages): the same records, the session and its
    // principal (never its whole id), the plugins; only with an admin token.
    let admin_get = |path: &str, token: &str| {
        let mut admin = gw.client();
        admin.url = format!("http://{}{path}", gw.addr);
        admin.token = Some(token.into());
        async move {
            let req = admin
                .request("GET", "")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let r = admin.send(req).await;
            (
                r.status,
                serde_json::from_str::<Value>(&r.body).unwrap_or(Value::Null),
            )
        }
    };
    const OPS: &str = "ops-token-0123456789ab";
    for path in ["/admin/v1/sessions", "/admin/v1/audit", "/admin/v1/plugins"] {
        assert_eq!(
            admin_get(path, "alice-token-0123456789").await.0,
            401,
            "{path}"
        );
    }
    let (status, sessions) = admin_get("/admin/v1/sessions", OPS).await;
    assert_eq!(status, 200, "{sessions}");
    let session = c.session.as_deref().unwrap();
    let shown = &sessions["sessions"][0];
    assert_eq!(shown["principal"], "alice", "{sessions}");
    assert_eq!(shown["revision"], "2025-11-25", "{sessions}");
    assert!(
        session.starts_with(shown["id"].as_str().unwrap()),
        "{sessions}"
    );
    assert!(!sessions.to_string().contains(session), "{sessions}");
    // The writer is a thread of its own: the denial shows once written.
    let mut recent = Value::Null;
    for _ in 0..100 {
        recent = admin_get("/admin/v1/audit?limit=50", OPS).await.1;
        let records = recent["records"].as_array().cloned().unwrap_or_default();
        if records
            .iter()
            .any(|r| r["kind"] == "admin" && r["outcome"] == "401")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(recent["on"], true, "{recent}");
    let records = recent["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "denial" && r["by"] == "lists" && r["name"] == "add"),
        "{recent}"
    );
    assert!(
        records
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() > w[1]["seq"].as_u64()),
        "newest first: {recent}"
    );
    assert_eq!(admin_get("/admin/v1/audit?limit=0", OPS).await.0, 400);
    // The decisions of identified callers, kept apart from the rest.
    let (_, decisions) = admin_get("/admin/v1/audit?only=decisions", OPS).await;
    let decisions = decisions["records"].as_array().unwrap();
    assert!(
        decisions.iter().any(|r| r["by"] == "lists"),
        "{decisions:?}"
    );
    assert!(
        decisions
            .iter()
            .any(|r| r["kind"] == "admin" && r["principal"] == "ops")
    );
    assert!(
        decisions
            .iter()
            .all(|r| !r["principal"].is_null() && r["kind"] != "call"),
        "{decisions:?}"
    );
    let (_, plugins) = admin_get("/admin/v1/plugins", OPS).await;
    assert_eq!(plugins["modules"][0]["name"], "lists", "{plugins}");
    assert_eq!(
        plugins["modules"][0]["hooks"],
        json!(["filter-list"]),
        "{plugins}"
    );
    assert!(
        plugins["modules"][0]["denials"].as_u64().unwrap() >= 1,
        "{plugins}"
    );
    assert_eq!(
        plugins["chains"][0]["plugins"],
        json!(["lists"]),
        "{plugins}"
    );
    gw.stop().await;

    let text = std::fs::read_to_string(&file).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let call = records
        .iter()
        .find(|r| r["kind"] == "call" && r["name"] == "echo")
        .unwrap_or_else(|| panic!("no call record: {text}"));
    assert_eq!(call["decision"], "allowed");
    assert_eq!(call["outcome"], "ok");
    assert_eq!(call["server"], "ex");
    assert!(call["latency_us"].as_u64().is_some());
    assert!(call["request_bytes"].as_u64().unwrap() > 0);
    let denial = records
        .iter()
        .find(|r| r["kind"] == "denial" && r["by"] == "lists")
        .unwrap_or_else(|| panic!("no denial record: {text}"));
    assert_eq!(denial["name"], "add");
    assert_eq!(denial["by"], "lists");
    assert_eq!(records.last().unwrap()["kind"], "checkpoint");
    let abandoned = records
        .iter()
        .find(|r| r["name"] == "slow")
        .unwrap_or_else(|| panic!("no record of the abandoned call: {text}"));
    assert_eq!(abandoned["outcome"], "abandoned", "{abandoned}");
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "denial" && r["by"] == "auth" && r["principal"].is_null()),
        "no authentication refusal: {text}"
    );
    let changes: Vec<&Value> = records.iter().filter(|r| r["kind"] == "admin").collect();
    assert_eq!(changes.len(), 2, "{text}");
    assert_eq!(changes[0]["principal"], "ops");
    assert_eq!(changes[0]["method"], "DELETE");
    assert_eq!(changes[0]["name"], "/admin/v1/servers/nope");
    assert_eq!(changes[0]["decision"], "allowed");
    assert_eq!(changes[0]["outcome"], "404");
    assert!(changes[1]["principal"].is_null());
    assert_eq!(changes[1]["decision"], "denied");
    assert_eq!(changes[1]["outcome"], "401");
    assert!(
        !text.contains("token-0123456789"),
        "no token in the trail: {text}"
    );
    // Argument values are never written.
    assert!(!text.contains("secret-argument"), "{text}");
    // Nor the whole session id.
    let session = c.session.as_deref().unwrap();
    assert!(!text.contains(session), "{text}");

    let public = Ed25519KeyPair::from_seed_unchecked(&SEED).unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(public.public_key().as_ref());
    let (ok, out) = verify(&file, Some(&public));
    assert!(ok, "{out}");
    assert!(out.contains("1 checkpoints signed"), "{out}");

    // One edited field breaks the chain at the next record, and the tool says which.
    let tampered: Vec<String> = text
        .lines()
        .map(|l| l.replace(r#""decision":"denied""#, r#""decision":"allowed""#))
        .collect();
    assert_ne!(tampered.join("\n"), text.trim_end());
    let line = text
        .lines()
        .position(|l| l.contains(r#""decision":"denied""#))
        .unwrap()
        + 2;
    std::fs::write(&file, tampered.join("\n")).unwrap();
    let (ok, out) = verify(&file, Some(&public));
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("line {line}:")), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A collector's logs endpoint that keeps every log record body it receives, by `seq`.
async fn logs_collector() -> (
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, String>>>,
    String,
) {
    let kept: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, String>>> =
        Default::default();
    let bodies = kept.clone();
    let url = support::serve(move |_, body| {
        let doc: Value = serde_json::from_slice(&body).ok()?;
        for rl in doc["resourceLogs"].as_array()? {
            assert_eq!(rl["resource"]["attributes"][0]["key"], "service.name");
            for sl in rl["scopeLogs"].as_array()? {
                for r in sl["logRecords"].as_array()? {
                    let seq: u64 = r["attributes"][0]["value"]["intValue"]
                        .as_str()?
                        .parse()
                        .ok()?;
                    let line = r["body"]["stringValue"].as_str()?.to_owned();
                    bodies.lock().unwrap().insert(seq, line);
                }
            }
        }
        Some((200, json!({})))
    })
    .await;
    (kept, format!("{url}/v1/logs"))
}

#[tokio::test]
async fn every_line_is_shipped_to_a_collector_as_written() {
    let dir = std::env::temp_dir().join(format!("gatehouse-audit-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&file);
    let (shipped, endpoint) = logs_collector().await;
    let top = format!(
        "audit:
  file: {file:?}
  otlp: {{ endpoint: {endpoint:?}, flush_interval: 20ms, headers: {{ x-api-key: k }} }}
"
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for id in 1..=5 {
        assert_eq!(c.tool_text(id, "echo", json!({"text": "x"})).await, "x");
    }
    gw.stop().await; // writes a last checkpoint and flushes the file
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(lines.len() >= 6, "{lines:?}");
    // The collector gets each line exactly as the file has it, under its seq.
    support::eventually("the collector has every line", || {
        let got = shipped.lock().unwrap().len();
        let want = lines.len();
        async move { got >= want }
    })
    .await;
    let shipped = shipped.lock().unwrap().clone();
    for line in &lines {
        let seq = serde_json::from_str::<Value>(line).unwrap()["seq"]
            .as_u64()
            .unwrap();
        assert_eq!(shipped.get(&seq), Some(line), "seq {seq}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_collector_that_is_down_loses_nothing_from_the_file() {
    let dir =
        std::env::temp_dir().join(format!("gatehouse-audit-otlp-down-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&file);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let top = format!(
        "audit:
  file: {file:?}
  otlp: {{ endpoint: \"http://{closed}/v1/logs\", flush_interval: 20ms }}
"
    );
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for id in 1..=5 {
        assert_eq!(c.tool_text(id, "echo", json!({"text": "x"})).await, "x");
    }
    support::counter_reaches(&gw, "gatehouse_audit_export_dropped_total", 5.0).await;
    gw.stop().await;
    let (ok, out) = verify(&file, None);
    assert!(ok, "{out}");
    let calls = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"call\""))
        .count();
    assert_eq!(calls, 5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory for one test's trail, named after `what`.
fn trail_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gatehouse-audit-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `top` YAML of a gateway writing its trail to `file`, signed with [`SEED`] (its key
/// file written in `dir`).
fn signed_audit_top(dir: &std::path::Path, file: &std::path::Path) -> String {
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, format!("{}\n", "2a".repeat(32))).unwrap();
    format!("audit:\n  file: {file:?}\n  signing_key: {{ file: {key_file:?} }}\n")
}

/// Writes a trail in `dir` through a gateway signing with [`SEED`]: three calls, then the
/// checkpoint at shutdown. Returns the file, its gateway's `top` YAML, and the public key.
async fn signed_trail(dir: &std::path::Path) -> (std::path::PathBuf, String, String) {
    let file = dir.join("audit.jsonl");
    let top = signed_audit_top(dir, &file);
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    for id in 1..=3 {
        assert_eq!(c.tool_text(id, "echo", json!({"text": "x"})).await, "x");
    }
    gw.stop().await;
    let public = Ed25519KeyPair::from_seed_unchecked(&SEED).unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(public.public_key().as_ref());
    let (ok, out) = verify(&file, Some(&public));
    assert!(ok, "the trail as written verifies: {out}");
    (file, top, public)
}

/// Why a gateway configured with `top` (and an example upstream) does not start.
async fn start_refusal(top: &str) -> String {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{top}\nupstreams:\n{}",
        example("ex", &[], "")
    );
    let config = gatehouse::Config::from_yaml(&yaml).unwrap();
    match gatehouse::start(config).await {
        Ok(running) => {
            running.shutdown().await;
            panic!("the gateway started over the trail");
        }
        Err(e) => e.to_string(),
    }
}

/// A trail whose last checkpoint lost its `signature` is refused when a public key is given
/// ("an unsigned checkpoint", at that line), as is a gateway reopening it with its signing
/// key; without a key the chain alone still verifies.
#[tokio::test]
async fn a_checkpoint_stripped_of_its_signature_is_refused_with_a_key() {
    let dir = trail_dir("unsigned-cp");
    let (file, top, public) = signed_trail(&dir).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let last = lines.len() - 1;
    assert!(
        lines[last].contains(r#""kind":"checkpoint""#),
        "the trail ends with its checkpoint: {text}"
    );
    // The signature member cut out; the line is still the last, so the chain holds.
    let at = lines[last].find(r#","signature":""#).expect("a signature");
    let value = at + r#","signature":""#.len();
    let end = value + lines[last][value..].find('"').unwrap() + 1;
    lines[last].replace_range(at..end, "");
    assert!(!lines[last].contains("signature"), "{}", lines[last]);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let (ok, out) = verify(&file, Some(&public));
    assert!(!ok, "{out}");
    assert_eq!(
        out.trim_end(),
        format!(
            "broken: {}: line {}: an unsigned checkpoint",
            file.display(),
            last + 1
        )
    );
    let (ok, out) = verify(&file, None);
    assert!(ok, "the chain itself is intact: {out}");
    assert!(out.contains("signatures not checked"), "{out}");
    // The library says the same.
    let key = gatehouse::audit::public_key(&public).unwrap();
    let broken =
        gatehouse::audit::verify(&std::fs::read_to_string(&file).unwrap(), Some(&key)).unwrap_err();
    assert_eq!(
        (broken.line, broken.reason.as_str()),
        (last + 1, "an unsigned checkpoint")
    );
    // A gateway with the signing key will not sign on over it.
    let refusal = start_refusal(&top).await;
    assert!(
        refusal.contains("does not verify")
            && refusal.contains(&format!("line {}: an unsigned checkpoint", last + 1)),
        "{refusal}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The SHA-256 of `line`, in hex, as the trail chains its lines.
fn line_hash(line: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, line.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A trail with every checkpoint removed and the rest re-chained from the genesis (sequence
/// numbers and `prev` hashes recomputed as the writer does) is a sound chain, but
/// `audit verify --public-key` refuses it: no checkpoint signed by the key. A gateway that
/// then reopens it signs on, but its restart record says how many records it found unsigned,
/// and verify says so (exit status 2 with a key): the later signature proves nothing of them.
#[tokio::test]
async fn a_trail_rechained_without_checkpoints_has_none_signed_by_the_key() {
    let dir = trail_dir("no-cp");
    let (file, top, public) = signed_trail(&dir).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let mut prev = "0".repeat(64);
    let mut forged = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.contains(r#""kind":"checkpoint""#))
    {
        // The writer ends each line with `"seq":N,"prev":"…","time":"…"}`.
        let seq_at = line.rfind(r#""seq":"#).unwrap();
        let time_at = line.rfind(r#","time":""#).unwrap();
        let rewritten = format!(
            "{}\"seq\":{},\"prev\":\"{prev}\"{}",
            &line[..seq_at],
            forged.len() + 1,
            &line[time_at..]
        );
        prev = line_hash(&rewritten);
        forged.push(rewritten);
    }
    assert!(forged.len() >= 3, "{text}");
    std::fs::write(&file, forged.join("\n") + "\n").unwrap();

    // Without a key the chain verifies, from the genesis, with every record unsigned.
    let (ok, out) = verify(&file, None);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "ok: {} records (seq 1 to {})",
            forged.len(),
            forged.len()
        )) && out.contains(&format!("chain anchored at {}", "0".repeat(64)))
            && out.contains(&format!(
                "{} records after the last checkpoint",
                forged.len()
            )),
        "{out}"
    );
    let (ok, out) = verify(&file, Some(&public));
    assert!(!ok, "{out}");
    assert_eq!(
        out.trim_end(),
        format!(
            "broken: {}: no checkpoint signed by the key ({} records)",
            file.display(),
            forged.len()
        )
    );

    // The gateway carries on over it (as over a crash before its first checkpoint), saying so.
    let gw = TestGateway::start(&top, &[example("ex", &[], "")]).await;
    let mut c = gw.client();
    c.initialize(json!({})).await;
    assert_eq!(c.tool_text(1, "echo", json!({"text": "x"})).await, "x");
    gw.stop().await;
    let text = std::fs::read_to_string(&file).unwrap();
    let restart = text.lines().nth(forged.len()).unwrap();
    assert!(
        restart.contains(&format!(r#""unsigned_before":{}"#, forged.len())),
        "{restart}"
    );
    let warning = format!(
        "warning: a restart (line {}) found {} records after the last checkpoint",
        forged.len() + 1,
        forged.len()
    );
    let (code, out) = verify_status(&file, Some(&public));
    assert_eq!(code, 2, "{out}");
    assert!(out.starts_with("ok: ") && out.contains(&warning), "{out}");
    let (code, out) = verify_status(&file, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&warning), "{out}");
    // The admission cannot be shrunk: a restart that says fewer than it found is refused.
    let shrunk = text.replace(
        &format!(r#""unsigned_before":{}"#, forged.len()),
        r#""unsigned_before":1"#,
    );
    // Kept up to the restart, its last line: no later `prev` to mend.
    let kept: Vec<&str> = shrunk.lines().take(forged.len() + 1).collect();
    std::fs::write(&file, kept.join("\n") + "\n").unwrap();
    let (ok, out) = verify(&file, None);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "line {}: a restart says 1 records came after the last checkpoint; {} did",
            forged.len() + 1,
            forged.len()
        )),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
