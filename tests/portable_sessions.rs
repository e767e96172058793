//! Sessions that survive any replica: two gateways sharing session keys serve one client whose
//! requests alternate between them, through calls, a server request answered on the other
//! replica, and DELETE. Ids sealed with another key, tampered, or presented by another
//! principal open nothing.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Client, TestGateway, example};

const KEY: &str = support::SESSION_KEY;
const OTHER_KEY: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

/// A replica in front of `inner` (over HTTP, with upstream sessions), sealing with `keys`.
async fn replica(inner: &TestGateway, keys: &[(u8, &str)], dir: &std::path::Path) -> TestGateway {
    replica_with(inner, keys, dir, "").await
}

/// A replica with more `mcp` settings (YAML lines indented under `mcp:`).
async fn replica_with(
    inner: &TestGateway,
    keys: &[(u8, &str)],
    dir: &std::path::Path,
    mcp: &str,
) -> TestGateway {
    let mut top = format!("mcp:\n{mcp}  session_keys:\n");
    for (id, key) in keys {
        let path = dir.join(format!("key-{id}-{}", &key[..4]));
        std::fs::write(&path, format!("{key}\n")).unwrap();
        top.push_str(&format!("    - {{ id: {id}, file: {:?} }}\n", path));
    }
    top.push_str(&format!(
        "auth:\n  tokens:\n    - {{ principal: alice, token: {ALICE} }}\n    - {{ principal: bob, token: {BOB} }}\n"
    ));
    let upstream = format!(
        "  - name: inner\n    protocol: sessions\n    http: {{ url: {:?} }}\n",
        inner.url()
    );
    TestGateway::start(&top, &[upstream]).await
}

/// `mcp` settings for a replica where a principal may hold one session at a time.
const ONE_SESSION_EACH: &str = "  max_sessions_per_principal: 1\n";

/// A fresh directory for key files.
fn key_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gatehouse-keys-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The gateway the replicas front: an example server.
async fn inner_gateway() -> TestGateway {
    TestGateway::start("", &[example("ex", &[], "")]).await
}

/// A fresh directory for key files, the gateway the replicas front, and a replica in front of
/// it sealing with `KEY`.
async fn first_replica() -> (std::path::PathBuf, TestGateway, TestGateway) {
    let dir = key_dir();
    let inner = inner_gateway().await;
    let a = replica(&inner, &[(1, KEY)], &dir).await;
    (dir, inner, a)
}

/// A client of `gw` presenting `token`, with a session it initialized declaring
/// `capabilities`.
async fn session_on(gw: &TestGateway, token: &str, capabilities: Value) -> Client {
    let mut c = gw.client();
    c.token = Some(token.into());
    c.initialize(capabilities).await;
    c
}

/// The client `c` pointed at another replica, same session and token.
fn at(c: &Client, gw: &TestGateway) -> Client {
    let mut other = c.clone();
    other.url = gw.url();
    other
}

#[tokio::test]
async fn a_session_is_served_by_whichever_replica_a_request_reaches() {
    let (dir, inner, a) = first_replica().await;
    let b = replica(&inner, &[(1, KEY)], &dir).await;

    let on_a = session_on(&a, ALICE, json!({"sampling": {}})).await;
    let on_b = at(&on_a, &b);
    assert!(b.gateway().sessions.is_empty());

    // Calls alternate between the replicas.
    assert_eq!(
        on_b.tool_text(1, "echo", json!({"text": "one"})).await,
        "one"
    );
    assert_eq!(
        b.gateway().sessions.len(),
        1,
        "B rebuilt the session from its id"
    );
    assert_eq!(
        on_a.tool_text(2, "echo", json!({"text": "two"})).await,
        "two"
    );
    assert_eq!(on_b.tool_text(3, "whoami", json!({})).await, "ex");

    // A server request relayed by B, answered through A: the answer goes to the upstream
    // session that asked, and B's stream carries the call's result.
    let mut stream = on_b
        .stream(json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"sample","arguments":{"prompt":"hi"}}}))
        .await;
    let ask = stream.next().await.expect("the sampling request");
    assert_eq!(ask["method"], "sampling/createMessage", "{ask}");
    assert!(
        ask["id"].is_string(),
        "a portable session's server request id is sealed: {ask}"
    );
    let answer = json!({"jsonrpc":"2.0","id":ask["id"],"result":{"role":"assistant","model":"m","content":{"type":"text","text":"from A"}}});
    assert_eq!(on_a.post(answer.to_string()).await.status, 202);
    let done = stream.next().await.expect("the call's result");
    assert_eq!(done["id"], 4);
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: from A",
        "{done}"
    );

    // DELETE on one replica ends the session there; that replica refuses the id from now on.
    assert_eq!(delete(&on_b).await.status, 200);
    let after = on_b
        .post(json!({"jsonrpc":"2.0","id":5,"method":"tools/list","params":{}}).to_string())
        .await;
    assert_eq!(after.status, 404);
}

#[tokio::test]
async fn foreign_tampered_and_other_principals_ids_open_nothing() {
    let (dir, inner, a) = first_replica().await;
    let stranger = replica(&inner, &[(1, OTHER_KEY)], &dir).await;
    // A replica that rotated: a new key first, the old one still accepted.
    let rotated = replica(&inner, &[(2, OTHER_KEY), (1, KEY)], &dir).await;

    let alice = session_on(&a, ALICE, json!({})).await;

    assert_eq!(at(&alice, &stranger).post(list()).await.status, 404);
    assert_eq!(at(&alice, &rotated).post(list()).await.status, 200);
    let mut bob = at(&alice, &a);
    bob.token = Some(BOB.into());
    assert_eq!(at(&bob, &rotated).post(list()).await.status, 404);
    let mut tampered = at(&alice, &rotated);
    let mut id = tampered.session.clone().unwrap().into_bytes();
    let i = id.len() / 2;
    id[i] = if id[i] == b'A' { b'B' } else { b'A' };
    tampered.session = Some(String::from_utf8(id).unwrap());
    assert_eq!(tampered.post(list()).await.status, 404);
    // The rotated replica seals new sessions with its new key, which the old replica lacks.
    let fresh = session_on(&rotated, ALICE, json!({})).await;
    assert_eq!(at(&fresh, &a).post(list()).await.status, 404);
    assert_eq!(at(&fresh, &rotated).post(list()).await.status, 200);
}

#[tokio::test]
async fn an_old_id_or_a_full_replica_is_told_apart_from_a_gone_session() {
    let (dir, inner, a) = first_replica().await;
    let young = replica_with(&inner, &[(1, KEY)], &dir, "  session_max_age: 1s\n").await;
    let full = replica_with(&inner, &[(1, KEY)], &dir, ONE_SESSION_EACH).await;

    let alice = session_on(&a, ALICE, json!({})).await;
    // A replica at its cap for the principal says so (429), not that the session is gone.
    let _occupying = session_on(&full, ALICE, json!({})).await;
    assert_eq!(at(&alice, &full).post(list()).await.status, 429);
    let held = session_on(&young, ALICE, json!({})).await;
    assert_eq!(held.post(list()).await.status, 200);
    // Past session_max_age, an id restores nothing (404), and the replica serving it ends it
    // (however busy it was kept); a replica whose bound is longer serves it on.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(at(&alice, &young).post(list()).await.status, 404);
    // Ended by the sweep too, with no request (a GET stream held open would keep it else).
    let id = held.session.clone().unwrap();
    assert!(young.gateway().sessions.contains_key(id.as_str()));
    young.gateway().sweep();
    assert!(!young.gateway().sessions.contains_key(id.as_str()));
    assert_eq!(held.post(list()).await.status, 404);
    assert_eq!(alice.post(list()).await.status, 200);
}

/// A portable session's sealed server-request id is answered only by its own session: the
/// same principal's other session and another principal's session, posting a forged result
/// with that id on either replica, are not delivered (whatever the front answers them), and
/// the server receives the real answer.
#[tokio::test]
async fn a_sealed_server_request_id_is_answered_only_by_its_own_session() {
    let (dir, inner, a) = first_replica().await;
    let b = replica(&inner, &[(1, KEY)], &dir).await;

    let on_a = session_on(&a, ALICE, json!({"sampling": {}})).await;
    let on_b = at(&on_a, &b);
    let alice_again = session_on(&a, ALICE, json!({"sampling": {}})).await;
    assert_ne!(alice_again.session, on_a.session);
    let bob = session_on(&a, BOB, json!({"sampling": {}})).await;

    let mut stream = on_b
        .stream(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"sample","arguments":{"prompt":"hi"}}}))
        .await;
    let ask = stream.next().await.expect("the sampling request");
    assert_eq!(ask["method"], "sampling/createMessage", "{ask}");
    assert!(ask["id"].is_string(), "sealed: {ask}");
    let answer = |text: &str| {
        json!({"jsonrpc":"2.0","id":ask["id"],"result":{"role":"assistant","model":"m",
            "content":{"type":"text","text":text}}})
        .to_string()
    };
    // The forgeries, on the replica that relayed the request and on the other one.
    for (who, c) in [
        ("alice's other session on A", alice_again.clone()),
        ("alice's other session on B", at(&alice_again, &b)),
        ("bob's session on A", bob.clone()),
        ("bob's session on B", at(&bob, &b)),
    ] {
        let r = c.post(answer(&format!("forged by {who}"))).await;
        assert!(r.status < 500, "{who}: {} {}", r.status, r.body);
    }
    // Nothing was delivered: the call still waits for its answer.
    assert!(
        stream
            .next_within(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "the call ended on a forged answer"
    );
    assert_eq!(on_a.post(answer("the real one")).await.status, 202);
    let done = stream.next().await.expect("the call's result");
    assert_eq!(done["id"], 1);
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: the real one",
        "{done}"
    );
    // The other sessions serve on.
    assert_eq!(
        bob.tool_text(2, "echo", json!({"text": "bob"})).await,
        "bob"
    );
    assert_eq!(
        alice_again
            .tool_text(3, "echo", json!({"text": "again"}))
            .await,
        "again"
    );
}

// ---- Revocation, binding and forgery (the adversarial audit) ----

/// The 32 bytes of a hex key.
fn key_bytes(hex: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    key
}

/// A session id sealed with `KEY` (key id 1), as a replica would issue it, for `principal`.
fn minted(
    principal: &str,
    f: impl FnOnce(&mut gatehouse::mcp::session_token::SessionToken),
) -> String {
    use gatehouse::mcp::session_token::{SessionToken, issue, now_ms};
    let mut token = SessionToken {
        p: Some(principal.into()),
        v: "2025-11-25".into(),
        i: r#"{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"rust-test","version":"1"}}"#.into(),
        l: false,
        t: now_ms(),
        f: None,
    };
    f(&mut token);
    let sealer = gatehouse::mcp::seal::Sealer::from_key(1, &key_bytes(KEY));
    issue(&sealer, &token).expect("a short token")
}

async fn delete(c: &Client) -> support::Resp {
    c.send(
        c.request("DELETE", Bytes::new())
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

fn list() -> String {
    json!({"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}).to_string()
}

/// However many sessions are deleted after it, a session deleted on a replica is never
/// restored there from its id (the record of deletions is bounded, not forgetful).
#[tokio::test]
async fn a_replica_never_restores_a_session_deleted_there() {
    let (_dir, _inner, a) = first_replica().await;
    let alice = session_on(&a, ALICE, json!({})).await;
    assert_eq!(delete(&alice).await.status, 200);
    assert_eq!(alice.post(list()).await.status, 404);
    // Many other sessions of alice's deleted since (as many as the record holds, and one),
    // each issued later than hers.
    let principal: gatehouse::auth::Principal = std::sync::Arc::from("alice");
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    for _ in 0..=gatehouse::gateway::MAX_DELETED_SESSIONS {
        let id = minted("alice", |_| {});
        assert!(
            a.gateway()
                .delete_session(&id, Some(&principal), None)
                .await
        );
    }
    assert_eq!(alice.post(list()).await.status, 404, "resurrected");
    // A fresh session of alice's is served as ever.
    let again = session_on(&a, ALICE, json!({})).await;
    assert_eq!(again.post(list()).await.status, 200);
}

/// A session deleted on one replica is not restored by another (or by the same one after a
/// restart) where replicas share state through the leading replica.
#[tokio::test]
async fn a_session_deleted_on_one_replica_is_not_restored_by_another_sharing_state() {
    use gatehouse::orchestrator::Handover;
    use gatehouse::plugins::leader::Leader;
    use tokio::sync::watch;
    let (dir, inner, a) = first_replica().await;
    let b = replica(&inner, &[(1, KEY)], &dir).await;
    // A leads and keeps the state; B asks it (a stand-in for A's relay, applying what B asks).
    let kept = a.gateway().plugins.current().state().clone();
    let (_a_leads, leads) = watch::channel(true);
    let (_a_relay, relay) = watch::channel(None);
    let key =
        std::sync::Arc::new(gatehouse::replica_key::ReplicaKey::derive(&"s".repeat(43)).unwrap());
    let (_a_secret, secret) = watch::channel(Some(key.clone()));
    let (_a_handover, handover) = watch::channel(Handover::Kept);
    kept.share_through(
        Leader::new(leads, relay, secret, handover),
        std::time::Duration::from_secs(600),
    );
    let at_a = kept.clone();
    let relay_url = support::serve_tls(key.server_config(), move |_, body| {
        let asked: gatehouse::plugins::Asked = serde_json::from_slice(&body).unwrap();
        Some((200, serde_json::to_value(at_a.apply(&asked)).unwrap()))
    })
    .await;
    let (_b_leads, leads) = watch::channel(false);
    let (_b_relay, relay) = watch::channel(Some(relay_url));
    let (_b_secret, secret) = watch::channel(Some(key));
    let (_b_handover, handover) = watch::channel(Handover::Nobody);
    b.gateway().plugins.current().state().share_through(
        Leader::new(leads, relay, secret, handover),
        std::time::Duration::from_secs(600),
    );

    let alice = session_on(&a, ALICE, json!({})).await;
    // Another session of alice's, served by B too: restoring asks the leader, and goes on.
    let other = session_on(&a, ALICE, json!({})).await;
    assert_eq!(at(&other, &b).post(list()).await.status, 200);

    assert_eq!(delete(&alice).await.status, 200);
    let id = alice.session.clone().unwrap();
    let probe = support::session_state_probe("", &id);
    support::eventually("the leader to record the deletion", || {
        let kept = kept.clone();
        let probe = probe.clone();
        async move { kept.apply(&probe) == gatehouse::plugins::Outcome::SessionDeleted }
    })
    .await;
    // B (or A restarted: a replica that never saw the DELETE) refuses the id.
    assert_eq!(at(&alice, &b).post(list()).await.status, 404);
    assert!(b.gateway().sessions.get(id.as_str()).is_none());
    assert_eq!(at(&other, &b).post(list()).await.status, 200);
}

/// DELETE of a portable session this replica does not hold needs no room here and opens no
/// upstream session: the id is checked and recorded as deleted, not restored first.
#[tokio::test]
async fn deleting_a_session_held_elsewhere_restores_nothing() {
    let (dir, inner, a) = first_replica().await;
    let full = replica_with(&inner, &[(1, KEY)], &dir, ONE_SESSION_EACH).await;
    let alice = session_on(&a, ALICE, json!({})).await;
    let _occupying = session_on(&full, ALICE, json!({})).await;
    let there = at(&alice, &full);
    assert_eq!(there.post(list()).await.status, 429, "no room to serve it");
    assert_eq!(delete(&there).await.status, 200, "but room to delete it");
    assert_eq!(full.gateway().sessions.len(), 1);
    assert_eq!(there.post(list()).await.status, 404);
    assert_eq!(delete(&there).await.status, 404, "deleted already");
    // Another principal's DELETE of it is no DELETE (and says nothing of it).
    let mut bob = at(&alice, &a);
    bob.token = Some(BOB.into());
    assert_eq!(delete(&bob).await.status, 404);
    assert_eq!(alice.post(list()).await.status, 200);
}

/// What is not an id this gateway issued (or no longer honors) is an unknown session (404),
/// whatever is wrong with it, and is refused before any work on an enormous one.
#[tokio::test]
async fn ids_that_are_not_sessions_are_unknown_sessions() {
    let dir = key_dir();
    let inner = inner_gateway().await;
    let a = replica(&inner, &[(2, OTHER_KEY), (1, KEY)], &dir).await;
    let mut alice = a.client();
    alice.token = Some(ALICE.into());
    // An id minted as a replica mints them opens (the control).
    alice.session = Some(minted("alice", |_| {}));
    assert_eq!(alice.post(list()).await.status, 200);
    let good = minted("alice", |_| {});
    let raw =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &good).unwrap();
    let with_key_id = |id: u8| {
        let mut r = raw.clone();
        r[0] = id;
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, r)
    };
    let now = gatehouse::mcp::session_token::now_ms();
    let cases: Vec<(&str, String)> = vec![
        ("non-ASCII", format!("{}é", &good[..good.len() - 1])),
        ("truncated", good[..good.len() - 1].to_owned()),
        ("extended", format!("{good}AA")),
        ("another configured key id", with_key_id(2)),
        ("a key id not configured", with_key_id(9)),
        ("enormous", "A".repeat(8 * 1024)),
        ("bob's", minted("bob", |_| {})),
        (
            "another profile's",
            minted("alice", |t| t.f = Some("p".into())),
        ),
        (
            "an unknown revision",
            minted("alice", |t| t.v = "1999-01-01".into()),
        ),
        (
            "older than session_max_age",
            minted("alice", |t| t.t = now - 25 * 3600 * 1000),
        ),
        (
            "opened in the future",
            minted("alice", |t| t.t = now + 3600 * 1000),
        ),
        ("sealed with a key no longer held", {
            let old = gatehouse::mcp::seal::Sealer::from_key(3, &[9; 32]);
            let mut t = serde_json::from_slice::<gatehouse::mcp::session_token::SessionToken>(
                br#"{"p":"alice","v":"2025-11-25","i":"{}","l":false,"t":1}"#,
            )
            .unwrap();
            t.t = now;
            gatehouse::mcp::session_token::issue(&old, &t).unwrap()
        }),
    ];
    for (what, id) in cases {
        let mut c = alice.clone();
        c.session = Some(id);
        let r = c.post(list()).await;
        assert_eq!(r.status, 404, "{what}: {}", r.body);
        assert_eq!(delete(&c).await.status, 404, "{what} (DELETE)");
    }
    assert_eq!(
        a.gateway().sessions.len(),
        1,
        "only the control was restored"
    );
}
