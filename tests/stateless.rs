//! The 2026-07-28 front: stateless requests next to sessions on one endpoint, the checks every
//! request passes, and server questions turned into `input_required` rounds.

mod support;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Client, Resp, TestGateway, example};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

/// Request `_meta` of a 2026-07-28 client declaring `capabilities`.
fn meta(capabilities: Value) -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": capabilities,
        "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
    })
}

/// Sends a stateless request with the headers a 2026-07-28 client mirrors; `name` is the
/// `Mcp-Name` header, taken from params when `None`. `headers` override or add headers.
async fn send(c: &Client, id: u64, method: &str, params: Value, headers: &[(&str, &str)]) -> Resp {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let name = params
        .get("name")
        .or(params.get("uri"))
        .and_then(Value::as_str);
    send_text(c, method, name, body, headers).await
}

/// Sends the request `body` as written, with the headers a 2026-07-28 client mirrors it in
/// (`name` as `Mcp-Name`); `headers` override or add headers.
async fn send_text(
    c: &Client,
    method: &str,
    name: Option<&str>,
    body: String,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    let mut mirrored = vec![
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", method.to_owned()),
    ];
    if let Some(n) = name {
        mirrored.push(("mcp-name", n.to_owned()));
    }
    for (k, v) in mirrored {
        if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)) {
            req = req.header(k, v);
        }
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.send(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
}

async fn stateless(c: &Client, id: u64, method: &str, mut params: Value, caps: Value) -> Resp {
    params["_meta"] = meta(caps);
    send(c, id, method, params, &[]).await
}

fn with_token(gw: &TestGateway, token: &str) -> Client {
    let mut c = gw.client();
    c.token = Some(token.into());
    c
}

/// A gateway (`top` its YAML before `upstreams:`) in front of the example server with its test
/// tools.
async fn with_test_tools(top: &str) -> TestGateway {
    TestGateway::start(top, &[example("a", &["--test-tools"], "")]).await
}

async fn two_principals() -> TestGateway {
    with_test_tools(&format!(
        "auth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}"
    ))
    .await
}

/// A 2026-07-28 client needs no handshake: discover, list and call, each request on its own,
/// with no session created and every result saying what it is.
#[tokio::test]
async fn a_stateless_client_calls_without_a_session() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let discover = stateless(&c, 1, "server/discover", json!({}), json!({})).await;
    assert_eq!(discover.status, 200, "{}", discover.body);
    let r = &discover.json()["result"];
    assert_eq!(r["resultType"], "complete");
    assert!(
        r["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2026-07-28"))
    );
    assert!(r["capabilities"]["tools"].is_object(), "{r}");
    assert_eq!(
        r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "gatehouse"
    );
    assert!(r["ttlMs"].as_u64().is_some() && r["cacheScope"] == "private");

    let list = stateless(&c, 2, "tools/list", json!({}), json!({}))
        .await
        .json();
    let r = &list["result"];
    assert_eq!(r["resultType"], "complete");
    assert_eq!(r["cacheScope"], "private");
    assert_eq!(r["ttlMs"], 0);
    assert!(
        r["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "echo")
    );

    let call = stateless(
        &c,
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "hi"}}),
        json!({}),
    )
    .await;
    assert_eq!(call.status, 200);
    assert!(call.headers.get("mcp-session-id").is_none());
    let r = call.response();
    assert_eq!(r["id"], 1);
    assert_eq!(r["result"]["resultType"], "complete");
    assert_eq!(r["result"]["content"][0]["text"], "hi");
    // Nothing session-shaped was made for it; a 2025-11-25 client on the same endpoint still
    // gets its session.
    assert!(gw.gateway().sessions.is_empty());
    let mut legacy = gw.client();
    legacy.initialize(json!({})).await;
    assert_eq!(
        legacy.tool_text(1, "echo", json!({"text": "old"})).await,
        "old"
    );
    gw.stop().await;
}

/// Every kind of malformed stateless request is refused with its own status and code, under
/// the request's id, before anything reaches a server.
#[tokio::test]
async fn stateless_refusals_say_what_was_wrong() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let check = |r: &Resp, status: u16, code: i64, id: u64| {
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], code, "{}", r.body);
        assert_eq!(r.json()["id"], id, "{}", r.body);
    };
    // No _meta, or _meta without its required members.
    let r = send(&c, 1, "tools/list", json!({}), &[]).await;
    check(&r, 400, -32602, 1);
    let mut no_caps = meta(json!({}));
    no_caps
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/clientCapabilities");
    let r = send(&c, 2, "tools/list", json!({"_meta": no_caps}), &[]).await;
    check(&r, 400, -32602, 2);
    assert!(r.body.contains("clientCapabilities"), "{}", r.body);
    // A version this endpoint does not serve statelessly, mirrored faithfully.
    let mut old = meta(json!({}));
    old["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let r = send(
        &c,
        3,
        "tools/list",
        json!({"_meta": old}),
        &[("mcp-protocol-version", "2099-01-01")],
    )
    .await;
    check(&r, 400, -32022, 3);
    let data = &r.json()["error"]["data"];
    assert_eq!(data["requested"], "2099-01-01");
    assert!(
        data["supported"]
            .as_array()
            .unwrap()
            .contains(&json!("2026-07-28"))
    );
    // Headers that disagree with the body, or are missing.
    let m = json!({"_meta": meta(json!({}))});
    let r = send(
        &c,
        4,
        "tools/list",
        m.clone(),
        &[("mcp-method", "prompts/list")],
    )
    .await;
    check(&r, 400, -32020, 4);
    let call = json!({"name": "echo", "arguments": {"text": "x"}, "_meta": meta(json!({}))});
    let r = send(&c, 5, "tools/call", call.clone(), &[("mcp-name", "add")]).await;
    check(&r, 400, -32020, 5);
    let r = send(
        &c,
        6,
        "tools/call",
        call.clone(),
        &[("mcp-name", "=?base64?not base64?=")],
    )
    .await;
    check(&r, 400, -32020, 6);
    // The name may come base64-encoded.
    let encoded = format!(
        "=?base64?{}?=",
        base64::engine::general_purpose::STANDARD.encode("echo")
    );
    let r = send(&c, 7, "tools/call", call.clone(), &[("mcp-name", &encoded)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A mirrored header given twice is refused, even when one of the two agrees: a proxy
    // or server that reads the other would route a request nobody checked.
    for (id, twice) in [
        (71, [("mcp-name", "echo"), ("mcp-name", "add")]),
        (72, [("mcp-name", "add"), ("mcp-name", "echo")]),
        (
            73,
            [("mcp-method", "tools/call"), ("mcp-method", "tools/call")],
        ),
        (
            74,
            [
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-protocol-version", "2025-11-25"),
            ],
        ),
    ] {
        let r = send(&c, id, "tools/call", call.clone(), &twice).await;
        check(&r, 400, -32020, id);
        assert!(r.body.contains("more than once"), "{}", r.body);
    }
    // Methods this revision removed, and ones that never were.
    for (id, method) in [
        (8, "ping"),
        (9, "logging/setLevel"),
        (10, "resources/subscribe"),
        (11, "initialize"),
        (12, "no/such"),
    ] {
        let r = send(&c, id, method, m.clone(), &[]).await;
        check(&r, 404, -32601, id);
    }
    // A notification is acknowledged and nothing more.
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized", "params": {"_meta": meta(json!({}))}}).to_string();
    let r = c
        .send(
            c.request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "notifications/initialized")
                .body(Full::new(Bytes::from(note)))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    gw.stop().await;
}

/// The single input request of an `input_required` result.
fn only_question(r: &Value) -> (String, Value) {
    assert_eq!(r["result"]["resultType"], "input_required", "{r}");
    let asked = r["result"]["inputRequests"].as_object().unwrap();
    assert_eq!(asked.len(), 1, "{r}");
    let (k, v) = asked.iter().next().unwrap();
    (k.clone(), v.clone())
}

fn sampled(text: &str) -> Value {
    json!({"role": "assistant", "content": {"type": "text", "text": text}, "model": "m"})
}

/// What a client that can be asked for sampling declares.
fn can_sample() -> Value {
    json!({"sampling": {}})
}

/// A call of the test server's `sample` tool, which asks its client for sampling.
fn sample_call() -> Value {
    json!({"name": "sample", "arguments": {"prompt": "p"}})
}

/// Calls `sample` (id 1) as a client that can sample: the `input_required` answer, and the key
/// of its one question.
async fn asked_to_sample(c: &Client) -> (Value, String) {
    let first = stateless(c, 1, "tools/call", sample_call(), can_sample())
        .await
        .response();
    let (key, _) = only_question(&first);
    (first, key)
}

/// `call` retried with `answers` to its questions and the `requestState` it was given.
fn retried(mut call: Value, answers: Value, state: Value) -> Value {
    call["inputResponses"] = answers;
    call["requestState"] = state;
    call
}

/// The `requestState` an `input_required` answer carries.
fn state_of(asked: &Value) -> Value {
    asked["result"]["requestState"].clone()
}

/// Retries `sample_call()` (as request `id`, a client that can sample) with `answers` and the
/// `requestState` `state`.
async fn retry_sample(c: &Client, id: u64, answers: Value, state: Value) -> Resp {
    let retry = retried(sample_call(), answers, state);
    stateless(c, id, "tools/call", retry, can_sample()).await
}

/// Asserts that `r` refuses its request's params (400, -32602), saying `what` (its body shown
/// cut to 300 characters).
fn refused(r: &Resp, what: &str) {
    let body: String = r.body.chars().take(300).collect();
    assert_eq!(r.status, 400, "{body}");
    assert_eq!(r.error_code(), -32602, "{body}");
    assert!(r.body.contains(what), "{what}: {body}");
}

/// Retries (as request `id`) the sampling call that `asked` the question `key`, with `answers`
/// that leave it unanswered: the call asks it again, in the answer returned.
async fn asked_again(c: &Client, id: u64, asked: &Value, key: &str, answers: Value) -> Value {
    let again = retry_sample(c, id, answers, state_of(asked))
        .await
        .response();
    let (same, _) = only_question(&again);
    assert_eq!(same, key);
    again
}

/// Retries (as request `id`) the sampling call that `asked` the question `key`, with `text` as
/// the model's answer: the call's answer.
async fn answered(c: &Client, id: u64, asked: &Value, key: &str, text: &str) -> Value {
    let answers = json!({ key: sampled(text) });
    retry_sample(c, id, answers, state_of(asked))
        .await
        .response()
}

/// A server of an earlier revision asks its client mid-call; a stateless client gets the
/// question as `input_required`, and its retry (a new id, the answers, the state) finishes the
/// very same call.
#[tokio::test]
async fn a_server_question_becomes_input_required_and_the_retry_answers_it() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let caps = json!({"sampling": {}});
    let call = json!({"name": "sample", "arguments": {"prompt": "capital of France?"}});
    let first = stateless(&c, 1, "tools/call", call.clone(), caps.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.response();
    assert_eq!(first["id"], 1);
    let (key, question) = only_question(&first);
    assert_eq!(question["method"], "sampling/createMessage");
    assert_eq!(
        question["params"]["messages"][0]["content"]["text"],
        "capital of France?"
    );
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();

    let mut retry = call.clone();
    retry["inputResponses"] = json!({ key.clone(): sampled("Paris") });
    retry["requestState"] = json!(state);
    let done = stateless(&c, 2, "tools/call", retry.clone(), caps.clone()).await;
    let done = done.response();
    assert_eq!(done["id"], 2, "the answer carries the retry's id");
    assert_eq!(done["result"]["resultType"], "complete");
    assert_eq!(done["result"]["content"][0]["text"], "model said: Paris");
    // The state opened its call once: replaying it finds nothing.
    let replay = stateless(&c, 3, "tools/call", retry, caps).await;
    refused(&replay, "already used");
    assert_eq!(gw.gateway().round_trips.waiting(), 0);
    gw.stop().await;
}

/// A retry that leaves a question unanswered is asked it again; a client that never comes back
/// leaves nothing waiting past the gateway's patience (here, the session idle timeout).
#[tokio::test]
async fn unanswered_questions_are_asked_again() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let (first, key) = asked_to_sample(&c).await;
    let again = asked_again(&c, 2, &first, &key, json!({"wrong": sampled("x")})).await;
    let done = answered(&c, 3, &again, &key, "fine").await;
    assert_eq!(done["result"]["content"][0]["text"], "model said: fine");
    gw.stop().await;
}

/// A question the client did not declare it can answer is refused on its behalf: the client
/// hears which capability was missing (-32021), the server hears a refusal.
#[tokio::test]
async fn an_undeclared_capability_is_reported_missing() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let r = stateless(
        &c,
        1,
        "tools/call",
        json!({"name": "sample", "arguments": {"prompt": "p"}}),
        json!({"elicitation": {}}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32021);
    assert_eq!(
        r.json()["error"]["data"]["requiredCapabilities"],
        json!({"sampling": {}})
    );
    assert_eq!(r.json()["id"], 1);
    // The server was answered: the next call is served at once.
    let ok = stateless(
        &c,
        2,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "still here"}}),
        json!({}),
    )
    .await;
    assert_eq!(ok.response()["result"]["content"][0]["text"], "still here");
    assert_eq!(gw.gateway().round_trips.waiting(), 0);
    gw.stop().await;
}

/// `requestState` opens only its own call, for its own caller: forged, altered, foreign or
/// misapplied states are refused, and none of them spends the real one.
#[tokio::test]
async fn request_state_is_bound_to_its_caller_and_request() {
    let gw = two_principals().await;
    let alice = with_token(&gw, ALICE);
    let bob = with_token(&gw, BOB);
    let caps = json!({"sampling": {}});
    let call = json!({"name": "sample", "arguments": {"prompt": "secret"}});
    let first = stateless(&alice, 1, "tools/call", call.clone(), caps.clone())
        .await
        .response();
    let (key, _) = only_question(&first);
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let retry = |state: &str, name: &str| {
        let mut r = call.clone();
        r["name"] = json!(name);
        r["inputResponses"] = json!({ key.clone(): sampled("stolen") });
        r["requestState"] = json!(state);
        r
    };
    // Another principal.
    let r = stateless(&bob, 2, "tools/call", retry(&state, "sample"), caps.clone()).await;
    refused(&r, "not issued to this caller");
    // Altered: one character changed.
    let mut chars: Vec<char> = state.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    let altered: String = chars.into_iter().collect();
    let r = stateless(
        &alice,
        3,
        "tools/call",
        retry(&altered, "sample"),
        caps.clone(),
    )
    .await;
    refused(&r, "not valid");
    let r = stateless(
        &alice,
        4,
        "tools/call",
        retry("made-up", "sample"),
        caps.clone(),
    )
    .await;
    refused(&r, "not valid");
    // The right state on another request.
    let r = stateless(&alice, 5, "tools/call", retry(&state, "echo"), caps.clone()).await;
    refused(&r, "another request");
    // Nothing above spent it: the owner's retry finishes the call.
    let done = stateless(&alice, 6, "tools/call", retry(&state, "sample"), caps)
        .await
        .response();
    assert_eq!(done["result"]["content"][0]["text"], "model said: stolen");
    gw.stop().await;
}

/// Stateless requests of different principals never share an upstream session (here, a
/// process each); one principal's requests reuse theirs.
#[tokio::test]
async fn principals_get_their_own_upstream_sessions() {
    let gw = two_principals().await;
    let pid = |c: Client| async move {
        let r = stateless(
            &c,
            1,
            "tools/call",
            json!({"name": "pid", "arguments": {}}),
            json!({}),
        )
        .await;
        r.response()["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let alice = pid(with_token(&gw, ALICE)).await;
    let bob = pid(with_token(&gw, BOB)).await;
    assert_ne!(alice, bob);
    assert_eq!(pid(with_token(&gw, ALICE)).await, alice);
    // Without a token, nothing is served.
    let r = stateless(&gw.client(), 1, "tools/list", json!({}), json!({})).await;
    assert_eq!(r.status, 401);
    gw.stop().await;
}

/// Log messages reach a stateless client only when its request asked for them, and only at or
/// above the level it asked for.
#[tokio::test]
async fn logs_follow_the_level_each_request_asks_for() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let call = json!({"name": "log", "arguments": {"text": "hello log"}});
    let quiet = stateless(&c, 1, "tools/call", call.clone(), json!({})).await;
    assert!(!quiet.body.contains("hello log"), "{}", quiet.body);
    assert_eq!(quiet.response()["result"]["resultType"], "complete");
    let mut loud = call.clone();
    loud["_meta"] = meta(json!({}));
    loud["_meta"]["io.modelcontextprotocol/logLevel"] = json!("debug");
    let r = send(&c, 2, "tools/call", loud.clone(), &[]).await;
    let msgs = r.messages();
    assert!(
        msgs.iter().any(|m| m["method"] == "notifications/message"),
        "{}",
        r.body
    );
    assert_eq!(msgs.last().unwrap()["result"]["resultType"], "complete");
    loud["_meta"]["io.modelcontextprotocol/logLevel"] = json!("emergency");
    let r = send(&c, 3, "tools/call", loud, &[]).await;
    assert!(!r.body.contains("hello log"), "{}", r.body);
    gw.stop().await;
}

/// A call nobody picks up is abandoned at its deadline (here the session idle timeout, shorter
/// than the default wait): the server's question is answered with an error, nothing stays
/// parked, and the principal's next call is served.
#[tokio::test]
async fn an_abandoned_round_frees_its_call() {
    let gw = with_test_tools("mcp: {session_idle_timeout: 1s}").await;
    let c = gw.client();
    let first = stateless(
        &c,
        1,
        "tools/call",
        json!({"name": "sample", "arguments": {"prompt": "p"}}),
        json!({"sampling": {}}),
    )
    .await;
    only_question(&first.response());
    assert_eq!(gw.gateway().round_trips.waiting(), 1);
    support::eventually("the parked call to be abandoned", || async {
        gw.gateway().round_trips.waiting() == 0
    })
    .await;
    let ok = stateless(
        &c,
        2,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "next"}}),
        json!({}),
    )
    .await;
    assert_eq!(ok.response()["result"]["content"][0]["text"], "next");
    gw.stop().await;
}

/// Opens a listen stream asking for `notifications`; the response must be an SSE stream.
async fn listen(c: &Client, id: Value, notifications: Value) -> support::SseReader {
    match try_listen(c, id, notifications).await {
        Ok(stream) => stream,
        Err(status) => panic!("listen refused with {status}"),
    }
}

/// [`listen`], or the status it was refused with.
async fn try_listen(
    c: &Client,
    id: Value,
    notifications: Value,
) -> Result<support::SseReader, u16> {
    let mut params = json!({ "notifications": notifications });
    params["_meta"] = meta(json!({}));
    let body =
        json!({"jsonrpc": "2.0", "id": id, "method": "subscriptions/listen", "params": params});
    let req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.http.request(req).await.unwrap();
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    Ok(support::SseReader::new(resp.into_body()))
}

const SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";

/// A listen stream is acknowledged first, then hears exactly the change notifications it asked
/// for, tagged with its id; closing it stops the watching.
#[tokio::test]
async fn listen_streams_hear_what_they_asked_for() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let discover = stateless(&c, 1, "server/discover", json!({}), json!({})).await;
    let caps = &discover.json()["result"]["capabilities"];
    assert_eq!(caps["tools"]["listChanged"], true, "{caps}");
    assert_eq!(caps["resources"]["subscribe"], true, "{caps}");

    let watched = "example://a/readme";
    let mut a = listen(
        &c,
        json!("listen-a"),
        json!({"toolsListChanged": true, "resourceSubscriptions": [watched], "taskIds": ["t"]}),
    )
    .await;
    let ack = a.next().await.expect("an acknowledgement");
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(ack["params"]["_meta"][SUBSCRIPTION], "listen-a");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": [watched]}),
        "what is honored, and nothing it does not know"
    );
    // A resource no server serves is not watched (the acknowledgement leaves it out).
    let mut nowhere = listen(
        &c,
        json!("listen-n"),
        json!({"resourceSubscriptions": ["nowhere://x", watched]}),
    )
    .await;
    let ack = nowhere.next().await.unwrap();
    assert_eq!(
        ack["params"]["notifications"],
        json!({"resourceSubscriptions": [watched]})
    );
    drop(nowhere);
    let mut b = listen(&c, json!(7), json!({"promptsListChanged": true})).await;
    assert_eq!(b.next().await.unwrap()["params"]["_meta"][SUBSCRIPTION], 7);

    let call = |id: u64, tool: &'static str, args: Value| {
        let c = c.clone();
        async move {
            let r = stateless(
                &c,
                id,
                "tools/call",
                json!({"name": tool, "arguments": args}),
                json!({}),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    call(2, "toggle", json!({"on": true, "notify": true})).await;
    let changed = a.next().await.expect("tools/list_changed");
    assert_eq!(changed["method"], "notifications/tools/list_changed");
    assert_eq!(changed["params"]["_meta"][SUBSCRIPTION], "listen-a");
    // Updates of other resources are not this stream's business.
    call(3, "touch", json!({"uri": "example://a/other"})).await;
    call(4, "touch", json!({"uri": watched})).await;
    let updated = a.next().await.expect("resources/updated");
    assert_eq!(updated["method"], "notifications/resources/updated");
    assert_eq!(updated["params"]["uri"], watched);
    assert_eq!(updated["params"]["_meta"][SUBSCRIPTION], "listen-a");
    // B asked for prompts only: nothing of the above reached it.
    assert!(
        b.next_within(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );

    // Closing a stream forgets it.
    let session = gw.gateway().stateless_session(None, None, None).unwrap();
    assert_eq!(session.subscriptions.len(), 2);
    drop(a);
    support::eventually("the closed listen stream to be forgotten", || async {
        session.subscriptions.len() == 1
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn listen_refusals_say_what_was_wrong() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let missing = stateless(&c, 1, "subscriptions/listen", json!({}), json!({})).await;
    assert_eq!(
        (missing.status, missing.error_code()),
        (400, -32602),
        "{}",
        missing.body
    );
    assert!(missing.body.contains("params.notifications"));
    let many: Vec<String> = (0..65).map(|i| format!("example://a/{i}")).collect();
    let r = stateless(
        &c,
        2,
        "subscriptions/listen",
        json!({"notifications": {"resourceSubscriptions": many}}),
        json!({}),
    )
    .await;
    assert_eq!((r.status, r.error_code()), (400, -32602), "{}", r.body);
    // The method header must say what the body does.
    let mut params = json!({"notifications": {"toolsListChanged": true}});
    params["_meta"] = meta(json!({}));
    let r = send(
        &c,
        3,
        "subscriptions/listen",
        params,
        &[("mcp-method", "tools/list")],
    )
    .await;
    assert_eq!((r.status, r.error_code()), (400, -32020), "{}", r.body);
    gw.stop().await;
}

/// One caller's listen streams are bounded (each holds upstream streams open): the 65th is
/// refused with 429 / -32012 and says why, another caller still listens, and closing one of
/// the 64 makes room.
#[tokio::test]
async fn a_callers_listen_streams_are_bounded() {
    let gw = two_principals().await;
    let (alice, bob) = (with_token(&gw, ALICE), with_token(&gw, BOB));
    let mut open = Vec::new();
    for i in 0..64 {
        let mut s = listen(&alice, json!(i), json!({"toolsListChanged": true})).await;
        let ack = s.next().await.expect("an acknowledgement");
        assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
        open.push(s);
    }
    let mut params = json!({"notifications": {"toolsListChanged": true}});
    params["_meta"] = meta(json!({}));
    let refused = send(&alice, 99, "subscriptions/listen", params, &[]).await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (429, -32012),
        "{}",
        refused.body
    );
    assert!(refused.body.contains("at most 64"), "{}", refused.body);
    let mut other = listen(&bob, json!("b"), json!({"toolsListChanged": true})).await;
    assert!(other.next().await.is_some());
    drop(open.pop());
    let mut again = None;
    for _ in 0..200 {
        match try_listen(&alice, json!(100), json!({"toolsListChanged": true})).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(status) => assert_eq!(status, 429),
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let mut again = again.expect("room once a stream closed");
    assert!(again.next().await.is_some());
    gw.stop().await;
}

/// Tool arguments marked `x-mcp-header` must be mirrored in `Mcp-Param-*` headers (plain or
/// base64), and agree with the body.
#[tokio::test]
async fn marked_arguments_must_be_mirrored_in_headers() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let call = |args: Value, headers: &'static [(&'static str, &'static str)]| {
        let c = c.clone();
        async move {
            let mut params = json!({"name": "routed", "arguments": args});
            params["_meta"] = meta(json!({}));
            send(&c, 1, "tools/call", params, headers).await
        }
    };
    let ok = call(
        json!({"region": "eu-west"}),
        &[("mcp-param-region", "eu-west")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["result"]["content"][0]["text"], "eu-west");
    // base64 of "Zürich", with padding.
    let b64 = call(
        json!({"region": "Zürich"}),
        &[("mcp-param-region", "=?base64?WsO8cmljaA==?=")],
    )
    .await;
    assert_eq!(b64.status, 200, "{}", b64.body);
    let numbers = call(
        json!({"region": "x", "count": 3}),
        &[("mcp-param-region", "x"), ("mcp-param-count", "3")],
    )
    .await;
    assert_eq!(numbers.status, 200, "{}", numbers.body);
    for (args, headers, says) in [
        (
            json!({"region": "eu"}),
            &[][..],
            "Mcp-Param-region header is required",
        ),
        (
            json!({"region": "eu"}),
            &[("mcp-param-region", "us")][..],
            "does not match",
        ),
        (
            json!({"region": "Hello"}),
            &[("mcp-param-region", "=?base64?SGVsbG8?=")][..],
            "not valid",
        ),
        (
            json!({"region": "x"}),
            &[("mcp-param-region", "x"), ("mcp-param-count", "3")][..],
            "is not",
        ),
    ] {
        let r = call(args, headers).await;
        assert_eq!((r.status, r.error_code()), (400, -32020), "{}", r.body);
        assert!(r.body.contains(says), "{says}: {}", r.body);
    }
    let float = call(
        json!({"region": "x", "count": 3}),
        &[("mcp-param-region", "x"), ("mcp-param-count", "3.0")],
    )
    .await;
    assert_eq!(float.status, 200, "{}", float.body);
    let not_object = call(json!(["x"]), &[("mcp-param-region", "x")]).await;
    assert_eq!(
        (not_object.status, not_object.error_code()),
        (400, -32602),
        "{}",
        not_object.body
    );
    // Headers of arguments no schema marks are none of the gateway's business.
    let other = stateless(
        &c,
        2,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "t"}}),
        json!({}),
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);
    gw.stop().await;
}

/// Stateless requests of one principal run in a hidden session per set of token grants: a
/// session holds its latest request's claims for policy and plugins, so a request must never
/// share one with a token that grants other groups or scopes. A refreshed token with the same
/// grants keeps the session; the principal's sets are capped.
#[tokio::test]
async fn tokens_with_other_grants_never_share_a_hidden_session() {
    use gatehouse::auth::Claims;
    use std::sync::Arc;
    let gw = TestGateway::start(
        "mcp: { max_sessions_per_principal: 2 }",
        &[example("a", &[], "")],
    )
    .await;
    let g = gw.gateway();
    let claims = |scopes: &[&str], groups: &[&str]| {
        Arc::new(Claims {
            groups: groups.iter().map(|s| (*s).into()).collect(),
            scopes: scopes.iter().map(|s| (*s).into()).collect(),
            token: None,
        })
    };
    let alice = || Some(Arc::<str>::from("alice"));
    let read = claims(&["read"], &[]);
    let admin = claims(&["read", "admin"], &[]);
    let s_read = g.stateless_session(alice(), None, Some(&read)).unwrap();
    let s_admin = g.stateless_session(alice(), None, Some(&admin)).unwrap();
    assert!(
        !Arc::ptr_eq(&s_read, &s_admin),
        "other scopes, other session"
    );
    // Equal grants (a refreshed token) find the same session.
    let again = g
        .stateless_session(alice(), None, Some(&claims(&["read"], &[])))
        .unwrap();
    assert!(Arc::ptr_eq(&s_read, &again));
    // A third set is over alice's cap; bob is not affected.
    assert!(
        g.stateless_session(alice(), None, Some(&claims(&[], &["ops"])))
            .is_err()
    );
    let bob = g
        .stateless_session(Some("bob".into()), None, Some(&read))
        .unwrap();
    assert!(!Arc::ptr_eq(&bob, &s_read), "principals never share one");
    gw.stop().await;
}

/// Anonymous stateless callers share a hidden session, and each chooses its own progress
/// token: two calls under one token each hear only their own progress (over stdio a
/// notification says nothing else of its call).
#[tokio::test]
async fn progress_reaches_only_its_own_caller_whatever_token_it_chose() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let call = |steps: u64| {
        let c = gw.client();
        async move {
            let mut m = meta(json!({}));
            m["progressToken"] = json!("t");
            let params =
                json!({"name": "slow", "arguments": {"seconds": 1, "steps": steps}, "_meta": m});
            send(&c, 1, "tools/call", params, &[]).await
        }
    };
    let (a, b) = tokio::join!(call(3), call(30));
    for (r, steps) in [(a, 3), (b, 30)] {
        let msgs = r.messages();
        let heard: Vec<&Value> = msgs
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .collect();
        assert_eq!(heard.len(), steps, "{msgs:?}");
        assert!(
            heard
                .iter()
                .all(|m| m["params"]["progressToken"] == "t" && m["params"]["total"] == steps),
            "{msgs:?}"
        );
        assert_eq!(
            msgs.last().unwrap()["result"]["resultType"],
            "complete",
            "{msgs:?}"
        );
    }
    gw.stop().await;
}

/// Stateless callers of one principal (every anonymous one) share a hidden session, and a
/// stdio server's question says nothing of the call it belongs to: with several calls working
/// it is put to none of them, never to the newest caller, who would see another's question and
/// be asked to answer it.
#[tokio::test]
async fn a_question_that_cannot_be_tied_to_a_call_reaches_no_other_caller() {
    let gw = with_test_tools("").await;
    let hidden = gw.gateway().stateless_session(None, None, None).unwrap();
    let caps = json!({"sampling": {}});
    let asker = {
        let (c, caps) = (gw.client(), caps.clone());
        tokio::spawn(async move {
            let call = json!({"name": "sample", "arguments": {"prompt": "SECRET-of-the-asker", "delay": 2}});
            stateless(&c, 1, "tools/call", call, caps).await
        })
    };
    support::eventually("the asker's call in progress", || {
        let n = hidden.inflight();
        async move { n == 1 }
    })
    .await;
    // Begun after the asker's call, before its server asks: the newest call in progress.
    let other = stateless(
        &gw.client(),
        1,
        "tools/call",
        json!({"name": "slow", "arguments": {"seconds": 3}}),
        caps,
    )
    .await;
    let other = other.response();
    assert_eq!(other["result"]["resultType"], "complete", "{other}");
    assert!(!other.to_string().contains("SECRET"), "{other}");
    // The asker is not left waiting: its server was told nobody can be asked.
    let asked = asker.await.unwrap();
    assert!(!asked.body.contains("input_required"), "{}", asked.body);
    assert!(
        asked.body.contains("cannot tell which of the calls"),
        "{}",
        asked.body
    );
    gw.stop().await;
}

/// A call parked on `input_required` waits for its client, not its server: a call its client
/// abandoned there does not make the next caller's question ambiguous, and the parked one is
/// still answered when its client comes back.
#[tokio::test]
async fn a_parked_call_leaves_the_next_callers_question_to_it() {
    let gw = with_test_tools("").await;
    let (c, caps) = (gw.client(), json!({"sampling": {}}));
    let call = |prompt: &str| json!({"name": "sample", "arguments": {"prompt": prompt}});
    let first = stateless(&c, 1, "tools/call", call("first?"), caps.clone()).await;
    let first = first.response();
    let (first_key, q) = only_question(&first);
    assert_eq!(q["params"]["messages"][0]["content"]["text"], "first?");

    let second = stateless(&c, 2, "tools/call", call("second?"), caps.clone()).await;
    let second = second.response();
    let (key, q) = only_question(&second);
    assert_eq!(q["params"]["messages"][0]["content"]["text"], "second?");
    let answers = json!({ key: sampled("two") });
    let retry = retried(call("second?"), answers, state_of(&second));
    let done = stateless(&c, 3, "tools/call", retry, caps.clone())
        .await
        .response();
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: two",
        "{done}"
    );

    let answers = json!({ first_key: sampled("one") });
    let retry = retried(call("first?"), answers, state_of(&first));
    let done = stateless(&c, 4, "tools/call", retry, caps).await.response();
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: one",
        "{done}"
    );
    gw.stop().await;
}

/// A stateless client pages a merged list with the cursors the gateway hands it, each page a
/// request of its own; a cursor it did not get (unreadable, or naming a server the gateway
/// does not have) is refused as invalid params, never passed on.
#[tokio::test]
async fn list_cursors_work_across_requests_and_forged_ones_are_refused() {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &["--page-size", "2"], ""),
            example("b", &[], ""),
        ],
    )
    .await;
    let c = gw.client();
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 1.. {
        assert!(page < 20, "the pages never end");
        let params = cursor.map_or(json!({}), |c| json!({ "cursor": c }));
        let r = stateless(&c, page, "tools/list", params, json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = r.response();
        assert_eq!(r["result"]["resultType"], "complete", "{r}");
        for t in r["result"]["tools"].as_array().unwrap() {
            names.push(t["name"].as_str().unwrap().to_owned());
        }
        cursor = r["result"]["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "a tool listed twice: {names:?}");
    assert!(names.contains(&"a__echo".to_owned()), "{names:?}");
    assert!(names.contains(&"b__echo".to_owned()), "{names:?}");

    let unknown_server =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"nobody":"c1"}"#);
    for forged in ["!!not-a-cursor".to_owned(), unknown_server] {
        let r = stateless(&c, 99, "tools/list", json!({ "cursor": forged }), json!({})).await;
        assert_eq!(r.error_code(), -32602, "{forged}: {}", r.body);
        assert!(r.body.contains("invalid cursor"), "{forged}: {}", r.body);
    }
    gw.stop().await;
}

/// A JSON-RPC response POSTed by a stateless (2026-07-28, no session) client answers nothing:
/// it is refused with 400/-32600 under no id, echoing none of it, and the endpoint serves on.
#[tokio::test]
async fn a_stateless_clients_response_is_refused_and_not_echoed() {
    let gw = TestGateway::start("", &[example("a", &[], "")]).await;
    let c = gw.client();
    let post = |body: Value| {
        let c = c.clone();
        async move {
            let req = c
                .request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            c.send(req).await
        }
    };
    for answer in [
        json!({"jsonrpc":"2.0","id":"SECRET-ID","result":{"action":"accept","content":{"k":"SECRET"}}}),
        json!({"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"SECRET-ERROR"}}),
    ] {
        let r = post(answer.clone()).await;
        assert_eq!(r.status, 400, "{answer}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error"]["code"], -32600, "{body}");
        assert_eq!(body["id"], Value::Null, "{body}");
        assert_eq!(
            body["error"]["message"],
            "a stateless client has no server requests to answer; send input responses with the retried request",
            "{body}"
        );
        assert!(!r.body.contains("SECRET"), "{}", r.body);
        assert!(r.headers.get("mcp-session-id").is_none());
    }
    assert!(gw.gateway().sessions.is_empty(), "no session was made");
    let call = stateless(
        &c,
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "still"}}),
        json!({}),
    )
    .await;
    assert_eq!(call.status, 200, "{}", call.body);
    assert_eq!(call.response()["result"]["content"][0]["text"], "still");
    let mut legacy = gw.client();
    legacy.initialize(json!({})).await;
    assert_eq!(
        legacy.tool_text(1, "echo", json!({"text": "old"})).await,
        "old"
    );
    gw.stop().await;
}

/// A listen stream watching one server's resource hears its updates from that server only:
/// another server announcing the same URI (one the gateway routes to the first) wakes nobody.
#[tokio::test]
async fn a_listen_stream_hears_a_resources_updates_from_its_owner_only() {
    let gw = TestGateway::start(
        "",
        &[
            example("a", &["--test-tools"], ""),
            example("b", &["--test-tools"], ""),
        ],
    )
    .await;
    let c = gw.client();
    let watched = "example://b/readme";
    let mut stream = listen(
        &c,
        json!("watch-b"),
        json!({"resourceSubscriptions": [watched]}),
    )
    .await;
    let ack = stream.next().await.expect("an acknowledgement");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"resourceSubscriptions": [watched]}),
        "{ack}"
    );
    let touch = |id: u64, tool: &'static str| {
        let c = c.clone();
        async move {
            let r = stateless(
                &c,
                id,
                "tools/call",
                json!({"name": tool, "arguments": {"uri": watched}}),
                json!({}),
            )
            .await;
            assert_eq!(
                r.response()["result"]["content"][0]["text"],
                "touched",
                "{}",
                r.body
            );
        }
    };
    touch(1, "a__touch").await;
    assert!(
        stream
            .next_within(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "a stranger's word woke the stream"
    );
    touch(2, "b__touch").await;
    let updated = stream.next().await.expect("the owner's update");
    assert_eq!(updated["method"], "notifications/resources/updated");
    assert_eq!(updated["params"]["uri"], watched);
    gw.stop().await;
}

/// A stdio server (Python) that floods: `flood` sends `notifications/tools/list_changed` in
/// bursts of `burst` (each padded with `pad` bytes) for `seconds` (one burst at least), then
/// answers; `announce` sends one `notifications/prompts/list_changed`, then answers.
const FLOODING_SERVER: &str = r#"
import json, sys, time
def send(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m or "method" not in m:
        continue
    method, params = m["method"], m.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params["protocolVersion"],
                  "capabilities": {"tools": {"listChanged": True}, "prompts": {"listChanged": True}},
                  "serverInfo": {"name": "flood", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("flood", "announce")]}
    elif method == "prompts/list":
        result = {"prompts": []}
    elif method == "tools/call" and params["name"] == "flood":
        args = params["arguments"]
        burst = json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                            "params": {"_meta": {"pad": "x" * args["pad"]}}}) + "\n"
        end = time.time() + args["seconds"]
        while True:
            sys.stdout.write(burst * args["burst"])
            sys.stdout.flush()
            if time.time() >= end:
                break
        result = {"content": [{"type": "text", "text": "flooded"}]}
    elif method == "tools/call":
        send({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"})
        result = {"content": [{"type": "text", "text": "announced"}]}
    else:
        send({"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": method}})
        continue
    send({"jsonrpc": "2.0", "id": m["id"], "result": result})
"#;

/// A server flooding `tools/list_changed` costs a listen stream one queue entry, not its whole
/// queue: a client that reads (more slowly than the flood comes) keeps its stream through
/// every keep-alive and hears what comes next; a client that reads nothing is still cut off
/// (its queue fills with keep-alives), so it holds no more than its queue.
#[tokio::test]
async fn a_list_changed_flood_ends_no_stream_whose_client_reads() {
    let args = serde_json::to_string(&["-u", "-c", FLOODING_SERVER]).unwrap();
    let gw = TestGateway::start(
        "mcp: { sse_keepalive: 20ms }",
        &[format!(
            "  - name: f\n    stdio: {{ command: /usr/bin/python3, args: {args} }}\n"
        )],
    )
    .await;
    let c = gw.client();
    let call = |id: u64, tool: &'static str, args: Value| {
        let c = c.clone();
        async move {
            let r = stateless(
                &c,
                id,
                "tools/call",
                json!({"name": tool, "arguments": args}),
                json!({}),
            )
            .await;
            r.response()["result"]["content"][0]["text"].clone()
        }
    };
    let asked = json!({"toolsListChanged": true, "promptsListChanged": true});
    let mut reading = listen(&c, json!("reads"), asked.clone()).await;
    let ack = reading.next().await.expect("an acknowledgement");
    assert_eq!(ack["params"]["notifications"], asked, "{ack}");
    // The client reads every message, one a millisecond while `slow`: slower than the flood.
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (heard, mut methods) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn({
        let slow = slow.clone();
        async move {
            while let Some(m) = reading
                .next_within(std::time::Duration::from_secs(60))
                .await
            {
                let _ = heard.send(m["method"].as_str().unwrap_or_default().to_owned());
                if slow.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    });
    let session = gw.gateway().stateless_session(None, None, None).unwrap();
    assert_eq!(
        call(1, "flood", json!({"seconds": 1, "burst": 100, "pad": 0})).await,
        "flooded"
    );
    assert_eq!(
        session.subscriptions.len(),
        1,
        "the reading client's stream was ended during the flood"
    );
    slow.store(false, std::sync::atomic::Ordering::Relaxed);

    // A client that stops reading after its acknowledgement: once the connection's buffers are
    // full (40 MiB of notifications fill them), its queue fills (the flood's one entry, then
    // keep-alives) and the stream ends.
    let mut idle = listen(&c, json!("idle"), asked.clone()).await;
    assert!(idle.next().await.is_some(), "an acknowledgement");
    assert_eq!(session.subscriptions.len(), 2);
    assert_eq!(
        call(
            2,
            "flood",
            // Each just under the 1 MiB a notification may have.
            json!({"seconds": 0, "burst": 40, "pad": (1 << 20) - 1024})
        )
        .await,
        "flooded"
    );
    support::eventually("the stream nobody reads to end", || async {
        session.subscriptions.len() == 1
    })
    .await;

    // The reading client's stream is still open, and hears the next change.
    assert_eq!(call(3, "announce", json!({})).await, "announced");
    let next = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(m) = methods.recv().await {
            if m != "notifications/tools/list_changed" {
                return Some(m);
            }
        }
        None
    })
    .await
    .expect("the reading client hears the next change");
    assert_eq!(next.as_deref(), Some("notifications/prompts/list_changed"));
    assert!(!reader.is_finished());
    drop(idle);
    gw.stop().await;
}

/// A `requestState` past its call's wait is refused as expired (400, -32602), whoever sends
/// it: the call was abandoned, nothing waits for the answers.
#[tokio::test]
async fn a_request_state_past_its_wait_is_refused() {
    let gw = with_test_tools("mcp: {session_idle_timeout: 1s}").await;
    let c = gw.client();
    let (first, key) = asked_to_sample(&c).await;
    support::eventually("the parked call to be abandoned", || async {
        gw.gateway().round_trips.waiting() == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = retry_sample(&c, 2, json!({ key: sampled("late") }), state_of(&first)).await;
    refused(&r, "expired");
    gw.stop().await;
}

/// An enormous `requestState` is refused for its length before it is decoded or opened, and
/// answers for questions that were not asked are not delivered anywhere (the question that
/// was asked is asked again).
#[tokio::test]
async fn an_enormous_request_state_is_refused_unopened() {
    let gw = with_test_tools("").await;
    let c = gw.client();
    let (first, key) = asked_to_sample(&c).await;
    let huge = json!("A".repeat(3 * 1024 * 1024));
    let r = retry_sample(&c, 2, json!({ key.clone(): sampled("x") }), huge).await;
    refused(&r, "longer than");
    // Answers to questions never asked, with the real state: the call asks its question again.
    let stray = json!({"not-asked": sampled("stray"), "9999": sampled("stray")});
    let again = asked_again(&c, 3, &first, &key, stray).await;
    let done = answered(&c, 4, &again, &key, "mine").await;
    assert_eq!(done["result"]["content"][0]["text"], "model said: mine");
    gw.stop().await;
}

/// A server whose tool list never reaches its last page (every page points to a next one) is
/// read for its `x-mcp-header` marks once, within one call's deadline, and what its pages
/// marked is used for a while: a stateless call does not read the whole list again each time.
#[tokio::test]
async fn a_tool_list_without_end_is_not_read_again_for_every_call() {
    let dir = support::scratch_dir("endless-tools");
    let asked = dir.join("asked");
    let list = format!(
        r#"printf 'L' >> {asked:?}; printf '{{"jsonrpc":"2.0","id":%s,"result":{{"tools":[{{"name":"t","inputSchema":{{"type":"object","properties":{{"region":{{"type":"string","x-mcp-header":"Region"}}}}}}}}],"nextCursor":"more"}}}}\n' "$id""#
    );
    let endless = support::sh_server(
        "endless",
        r#"{"tools":{}}"#,
        &[
            ("tools/list", &list),
            (
                "tools/call",
                r#"printf '{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"called"}]}}\n' "$id""#,
            ),
        ],
    );
    let gw = TestGateway::start("", &[endless]).await;
    let c = gw.client();
    let lists = || std::fs::read(&asked).map_or(0, |b| b.len());
    let call = |id: u64| {
        let c = c.clone();
        async move {
            let mut params = json!({"name": "t", "arguments": {"region": "eu"}});
            params["_meta"] = meta(json!({}));
            let r = send(&c, id, "tools/call", params, &[("mcp-param-region", "eu")]).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["result"]["content"][0]["text"], "called");
        }
    };
    call(1).await;
    let read = lists();
    assert!(read >= 20, "the first call read its pages ({read})");
    for id in 2..5 {
        call(id).await;
    }
    assert_eq!(lists(), read, "a call read the endless list again");
    // Its marks still hold: a call without the header is refused.
    let mut params = json!({"name": "t", "arguments": {"region": "eu"}});
    params["_meta"] = meta(json!({}));
    let r = send(&c, 9, "tools/call", params, &[]).await;
    assert_eq!((r.status, r.error_code()), (400, -32020), "{}", r.body);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stateless client's answer (in `inputResponses`) to a server's question goes to that server
/// through the on-request chains too, as a session client's does: a denied one reaches it as
/// an error, and the call fails saying so.
#[tokio::test]
async fn an_answer_in_a_retry_passes_the_request_chains() {
    let gw = with_test_tools(&support::answers_policy(
        "sampling/createMessage",
        "content.text",
        "",
        "",
    ))
    .await;
    let c = gw.client();
    let (asked, key) = asked_to_sample(&c).await;
    let told = answered(&c, 2, &asked, &key, "the SECRET is 42").await;
    let message = told["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("refused the client's answer")
            && message.contains("no secrets to servers")
            && !message.contains("42"),
        "{told}"
    );
    let (asked, key) = asked_to_sample(&c).await;
    let fine = answered(&c, 4, &asked, &key, "all fine").await;
    assert_eq!(fine["result"]["content"][0]["text"], "model said: all fine");
    gw.stop().await;
}

/// A server whose tool `t` asks the client to sample, and which writes the answer it hears (an
/// error) to the file it names, under `dir`.
fn asking_server(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let heard = dir.join("heard");
    let record = format!(r#"printf '%s\n' "$line" >> {heard:?}"#);
    let asking = support::sh_server(
        "asking",
        r#"{"tools":{}}"#,
        &[
            (
                "tools/list",
                r#"printf '{"jsonrpc":"2.0","id":%s,"result":{"tools":[{"name":"t","inputSchema":{"type":"object"}}]}}\n' "$id""#,
            ),
            (
                "tools/call",
                r#"printf '{"jsonrpc":"2.0","id":"q1","method":"sampling/createMessage","params":{"messages":[],"maxTokens":10}}\n'"#,
            ),
            ("error", &record),
        ],
    );
    (asking, heard)
}

/// What [`asking_server`] heard in answer to its question, once it has heard it.
async fn heard_answer(heard: &std::path::Path) -> String {
    let read = || std::fs::read_to_string(heard).unwrap_or_default();
    support::eventually("the server hears the gateway's answer", || {
        let text = read();
        async move { !text.is_empty() }
    })
    .await;
    read()
}

/// The gateway's own answer to a server's question (a refusal: the 2026 client did not declare
/// the capability) is not the client's, and is not judged as the client's: a chain that
/// refuses every sampling answer leaves it as it is, and the server hears the gateway's words.
#[tokio::test]
async fn the_gateways_own_answer_reaches_the_server_unjudged() {
    let dir = support::scratch_dir("own-answer");
    let (asking, heard) = asking_server(&dir);
    let top = support::no_answers_policy("sampling/createMessage");
    let gw = TestGateway::start(&top, &[asking]).await;
    let c = gw.client();
    let mut params = json!({"name": "t", "arguments": {}});
    params["_meta"] = meta(json!({}));
    let r = send(&c, 1, "tools/call", params, &[]).await;
    assert_eq!(r.error_code(), -32021, "{}", r.body);
    let text = heard_answer(&heard).await;
    assert!(
        text.contains("did not declare the sampling capability"),
        "{text}"
    );
    assert!(
        !text.contains("no answers at all"),
        "judged as the client's: {text}"
    );
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A question the client leaves unanswered: when its call is abandoned, the gateway answers
/// the server itself ("did not answer in time"), and that answer is not judged as the client's
/// (a chain that refuses every answer does not see it; the server hears the gateway's words).
#[tokio::test]
async fn an_abandoned_questions_answer_reaches_the_server_unjudged() {
    let dir = support::scratch_dir("abandoned-answer");
    let (asking, heard) = asking_server(&dir);
    let top = format!(
        "mcp: {{session_idle_timeout: 1s}}\n{}",
        support::no_answers_policy("sampling/createMessage")
    );
    let gw = TestGateway::start(&top, &[asking]).await;
    let c = gw.client();
    let mut params = json!({"name": "t", "arguments": {}});
    params["_meta"] = meta(json!({"sampling": {}}));
    let r = send(&c, 1, "tools/call", params, &[]).await;
    only_question(&r.response());
    let text = heard_answer(&heard).await;
    assert!(text.contains("did not answer in time"), "{text}");
    assert!(
        !text.contains("no answers at all"),
        "judged as the client's: {text}"
    );
    assert_eq!(gw.gateway().round_trips.waiting(), 0);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stateless client cancels a call by closing its stream: once the stream has begun (a
/// progress message went out), the call ends as the client leaves, not at its server's next
/// message.
#[tokio::test]
async fn closing_a_calls_stream_ends_the_call() {
    use tokio::io::AsyncReadExt;
    let gw = with_test_tools("").await;
    let hidden = gw.gateway().stateless_session(None, None, None).unwrap();
    let slow = json!({"name": "slow", "arguments": {"seconds": 0.1, "steps": 1, "hold": 60}});
    let mut conn = call_on_a_connection(&gw, 1, slow).await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("notifications/progress") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the progress message comes")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(hidden.inflight(), 1);
    drop(conn);
    support::eventually("the call to end with its stream", || {
        let n = hidden.inflight();
        async move { n == 0 }
    })
    .await;
    gw.stop().await;
}

/// Sends a stateless `tools/call` with `params` (the tool's name and arguments; the envelope
/// and a progress token are added) on a connection of its own to `gw`: the connection, to read
/// the answer from or to drop mid-call.
async fn call_on_a_connection(
    gw: &TestGateway,
    id: u64,
    mut params: Value,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let name = params["name"].as_str().unwrap().to_owned();
    params["_meta"] = meta(json!({}));
    params["_meta"]["progressToken"] = json!("p1");
    let body =
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}).to_string();
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {name}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

/// Hidden sessions count in `mcp.max_sessions`: each holds links to every server, as a
/// session does.
#[tokio::test]
async fn hidden_sessions_count_in_the_gateways_session_cap() {
    let gw = TestGateway::start(
        &format!(
            "mcp: {{max_sessions: 2}}\nauth: {{tokens: [{{principal: alice, token: {ALICE}}}, {{principal: bob, token: {BOB}}}]}}"
        ),
        &[example("a", &["--test-tools"], "")],
    )
    .await;
    let mut session = with_token(&gw, ALICE);
    session.initialize(json!({})).await;
    let echo = json!({"name": "echo", "arguments": {"text": "hi"}});
    // Alice's hidden session is the second.
    let r = stateless(
        &with_token(&gw, ALICE),
        1,
        "tools/call",
        echo.clone(),
        json!({}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Bob's would be a third: refused, saying which bound.
    let r = stateless(&with_token(&gw, BOB), 2, "tools/call", echo, json!({})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.response()["error"]["code"], -32012);
    assert!(r.body.contains("mcp.max_sessions"), "{}", r.body);
    // So would a session.
    let third = with_token(&gw, BOB);
    let r = third
        .post(
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}})
            .to_string(),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    gw.stop().await;
}

/// A gateway in front of the HTTP server at `url` (with `settings`, lines of its entry),
/// probing which revision it speaks.
async fn in_front_of(url: &str, settings: &str) -> TestGateway {
    TestGateway::start(
        "",
        &[format!(
            "  - name: ex\n{settings}    http: {{ url: {url:?} }}\n"
        )],
    )
    .await
}

/// Starts `gatehouse example-server --http --stateless` on a free port: its URL.
async fn dual_era_example() -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(support::BIN)
        .args(["example-server", "--stateless", "--http", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let url = line.trim().strip_prefix("LISTENING ").unwrap().to_owned();
    (child, url)
}

/// The example server with `--stateless` is a dual-era server: it answers 2026-07-28 requests
/// without a session, refuses what the revision refuses with the revision's statuses and
/// codes, still serves sessions, and a gateway that probes it serves both kinds of client
/// from it.
#[tokio::test]
async fn the_example_server_serves_both_eras_with_stateless() {
    let (_server, url) = dual_era_example().await;
    let direct = Client::new(url.clone());
    let discover = stateless(&direct, 1, "server/discover", json!({}), json!({})).await;
    assert_eq!(discover.status, 200, "{}", discover.body);
    let r = &discover.json()["result"];
    assert_eq!(r["resultType"], "complete");
    assert_eq!(r["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(
        r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "gatehouse-example"
    );
    let echo = json!({"name": "echo", "arguments": {"text": "hi"}});
    let call = stateless(&direct, 2, "tools/call", echo.clone(), json!({})).await;
    assert_eq!(call.status, 200, "{}", call.body);
    assert!(call.headers.get("mcp-session-id").is_none());
    assert_eq!(call.response()["result"]["resultType"], "complete");
    assert_eq!(call.response()["result"]["content"][0]["text"], "hi");

    let mut with_meta = echo.clone();
    with_meta["_meta"] = meta(json!({}));
    let encoded = send(
        &direct,
        3,
        "tools/call",
        with_meta.clone(),
        &[("mcp-name", "=?base64?ZWNobw==?=")],
    )
    .await;
    assert_eq!(
        encoded.status, 200,
        "a base64 header is decoded: {}",
        encoded.body
    );
    let mismatch = send(
        &direct,
        4,
        "tools/call",
        with_meta.clone(),
        &[("mcp-name", "add")],
    )
    .await;
    assert_eq!(
        (mismatch.status, mismatch.error_code()),
        (400, -32020),
        "{}",
        mismatch.body
    );
    assert!(mismatch.body.contains("mcp-name"), "{}", mismatch.body);
    let mut old = with_meta.clone();
    old["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let unsupported = send(
        &direct,
        5,
        "tools/call",
        old,
        &[("mcp-protocol-version", "2099-01-01")],
    )
    .await;
    assert_eq!(
        (unsupported.status, unsupported.error_code()),
        (400, -32022)
    );
    let data = &unsupported.json()["error"]["data"];
    assert_eq!(data["supported"], json!(["2026-07-28"]));
    assert_eq!(data["requested"], "2099-01-01");
    let mut bare = with_meta.clone();
    bare["_meta"]
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/clientCapabilities");
    let no_caps = send(&direct, 6, "tools/call", bare, &[]).await;
    assert_eq!((no_caps.status, no_caps.error_code()), (400, -32602));
    assert!(
        no_caps.body.contains("clientCapabilities"),
        "{}",
        no_caps.body
    );
    let ping = stateless(&direct, 7, "ping", json!({}), json!({})).await;
    assert_eq!(
        (ping.status, ping.error_code()),
        (404, -32601),
        "{}",
        ping.body
    );
    let mut legacy = Client::new(url.clone());
    legacy.initialize(json!({})).await;
    assert_eq!(
        legacy.tool_text(8, "echo", json!({"text": "old"})).await,
        "old"
    );

    let gw = in_front_of(&url, "").await;
    let call = stateless(&gw.client(), 9, "tools/call", echo, json!({})).await;
    assert_eq!(call.status, 200, "{}", call.body);
    assert_eq!(call.response()["result"]["content"][0]["text"], "hi");
    assert_eq!(call.response()["result"]["resultType"], "complete");
    let mut session = gw.client();
    session.initialize(json!({})).await;
    assert_eq!(
        session.tool_text(10, "echo", json!({"text": "s"})).await,
        "s"
    );
    gw.stop().await;
}

/// What a lenient server could read otherwise than the gateway did is refused before it is
/// sent to a 2026-07-28 server: from a 2026 client, arguments given twice or beside a key a
/// case-insensitive decoder reads as them; from a session client, a key read as one the gateway
/// writes there, or a `_meta` key given twice or read as the envelope's. The server serves on.
#[tokio::test]
async fn what_a_lenient_server_would_read_otherwise_never_reaches_a_2026_server() {
    let (_server, url) = dual_era_example().await;
    let gw = in_front_of(&url, "").await;
    let c = gw.client();
    let meta = meta(json!({})).to_string();
    for (id, params, why) in [
        (
            1,
            format!(
                r#"{{"name":"echo","arguments":{{"text":"a"}},"arguments":{{"text":"b"}},"_meta":{meta}}}"#
            ),
            r#""arguments" is given twice"#,
        ),
        (
            2,
            format!(
                r#"{{"name":"echo","arguments":{{"text":"a"}},"ARGUMENTS":{{"text":"b"}},"_meta":{meta}}}"#
            ),
            r#""ARGUMENTS" is too like arguments"#,
        ),
    ] {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{params}}}"#);
        let r = send_text(&c, "tools/call", Some("echo"), body, &[]).await;
        assert_eq!((r.status, r.error_code()), (400, -32602), "{}", r.body);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(why), "{message}");
    }
    let mut s = gw.client();
    s.initialize(json!({})).await;
    for (id, params, why) in [
        (
            3,
            r#"{"name":"echo","arguments":{"text":"a"},"NAME":"whoami"}"#,
            r#""NAME" is too like params.name"#,
        ),
        (
            4,
            r#"{"name":"echo","arguments":{"text":"a"},"_meta":{"traceparent":"a","traceparent":"b"}}"#,
            "is given twice",
        ),
        (
            5,
            r#"{"name":"echo","arguments":{"text":"a"},"_meta":{"io.modelcontextprotocol/protocolversion":"x"}}"#,
            "is too like params._meta",
        ),
    ] {
        let message = s.invalid_params(id, "tools/call", params).await;
        assert!(message.contains(why), "{message}");
    }
    assert_eq!(s.tool_text(6, "echo", json!({"text": "ok"})).await, "ok");
    gw.stop().await;
}

/// A call to a 2026-07-28 server has one deadline, questions and all: past it the call fails
/// with the timeout's code, naming the deadline, and the next call goes through; and a
/// stateless client that leaves mid-call ends the call upstream.
#[tokio::test]
async fn a_2026_servers_call_keeps_its_deadline_and_ends_with_its_stream() {
    let (_server, url) = dual_era_example().await;
    let gw = in_front_of(&url, "    call_timeout: 1s\n").await;
    let c = gw.client();
    let slow = json!({"name": "slow", "arguments": {"seconds": 0.05, "steps": 1, "hold": 30}});
    let started = std::time::Instant::now();
    let r = stateless(&c, 1, "tools/call", slow.clone(), json!({})).await;
    assert_eq!(
        r.response()["error"]["code"],
        gatehouse::mcp::jsonrpc::code::UPSTREAM_TIMEOUT,
        "{}",
        r.body
    );
    assert!(r.body.contains("1s"), "names the deadline: {}", r.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let echo = json!({"name": "echo", "arguments": {"text": "after"}});
    let r = stateless(&c, 2, "tools/call", echo, json!({})).await;
    assert_eq!(
        r.response()["result"]["content"][0]["text"],
        "after",
        "{}",
        r.body
    );

    // Within the deadline, a client leaving ends the call.
    let gw_long = in_front_of(&url, "    call_timeout: 60s\n").await;
    let hidden = gw_long
        .gateway()
        .stateless_session(None, None, None)
        .unwrap();
    let conn = call_on_a_connection(&gw_long, 3, slow).await;
    // This server answers when done, with no stream before: the client leaves mid-call.
    support::eventually("the call to be under way", || {
        let n = hidden.inflight();
        async move { n == 1 }
    })
    .await;
    drop(conn);
    support::eventually("the call to end with its stream", || {
        let n = hidden.inflight();
        async move { n == 0 }
    })
    .await;
    gw_long.stop().await;
    gw.stop().await;
}
