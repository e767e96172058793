//! Profiles (virtual servers) at `/mcp/{profile}`: a caller sees only its profile's servers and
//! tools (renamed and described as the profile says), and every route to anything else is
//! refused, not only hidden: by tool or prompt name, resource URI, completion ref, subscription,
//! list cursor, session id, stateless request, HTTP+SSE, and the root endpoint.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Client, TestGateway, example};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

/// Three servers; alice is granted `dev` (part of a, all of b) and `ops` (c); bob only `ops`;
/// the root endpoint only admin.
async fn gateway(extra: &str) -> TestGateway {
    gateway_with("", extra).await
}

/// The same, with more `mcp` settings (lines indented by two).
async fn gateway_with(mcp: &str, extra: &str) -> TestGateway {
    let top = format!(
        r#"auth:
  tokens:
    - {{principal: alice, token: {ALICE}}}
    - {{principal: bob, token: {BOB}}}
    - {{principal: admin, token: {ADMIN}}}
mcp:
  root_access: {{principals: [admin]}}
{mcp}
profiles:
  - name: dev
    description: Developer tools
    grant: {{principals: [alice]}}
    servers:
      - name: a
        tools:
          - {{name: echo, rename: say, description: "Says it back", annotations: {{readOnlyHint: true}}}}
          - {{name: "ad*"}}
        prompts: []
        resources: ["example://a/readme"]
      - name: b
  - name: ops
    grant: {{principals: [alice, bob]}}
    servers: [{{name: c}}]
{extra}"#
    );
    TestGateway::start(
        &top,
        &[
            example("a", &["--test-tools"], ""),
            example("b", &["--page-size", "2"], ""),
            example("c", &["--page-size", "2"], ""),
        ],
    )
    .await
}

fn client(gw: &TestGateway, path: &str, token: &str) -> Client {
    let mut c = Client::new(format!("http://{}{path}", gw.addr));
    c.token = Some(token.into());
    c
}

fn names(list: &Value, key: &str, field: &str) -> Vec<String> {
    let mut v: Vec<String> = list["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}: {list}"))
        .iter()
        .map(|t| t[field].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// Every page of a list.
async fn all_pages(c: &Client, method: &str, key: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for id in 100.. {
        let params = cursor.map_or(json!({}), |c| json!({ "cursor": c }));
        let page = c.call(id, method, params).await;
        all.extend(page["result"][key].as_array().unwrap().iter().cloned());
        cursor = page["result"]["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            return all;
        }
        assert!(id < 120, "pagination does not end");
    }
    unreachable!()
}

#[tokio::test]
async fn a_profile_shows_its_servers_and_tools_renamed_and_described_as_configured() {
    let gw = gateway("").await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;

    let tools = all_pages(&dev, "tools/list", "tools").await;
    let mut listed: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "a__add",
            "b__add",
            "b__echo",
            "b__sample",
            "b__slow",
            "b__whoami",
            "say"
        ]
    );
    let say = tools.iter().find(|t| t["name"] == "say").unwrap();
    assert_eq!(say["description"], "Says it back");
    assert_eq!(say["annotations"]["readOnlyHint"], true);
    assert!(
        say["inputSchema"]["properties"]["text"].is_object(),
        "the rest is the server's: {say}"
    );
    assert_eq!(dev.tool_text(1, "say", json!({"text": "hi"})).await, "hi");
    assert_eq!(
        dev.tool_text(2, "a__add", json!({"a": 2, "b": 3})).await,
        "5"
    );
    assert_eq!(dev.tool_text(3, "b__whoami", json!({})).await, "b");

    let prompts = dev.call(4, "prompts/list", json!({})).await;
    assert_eq!(names(&prompts, "prompts", "name"), ["b__greeting"]);
    let resources = dev.call(5, "resources/list", json!({})).await;
    assert_eq!(
        names(&resources, "resources", "uri"),
        ["example://a/readme", "example://b/readme"]
    );
    let templates = dev.call(6, "resources/templates/list", json!({})).await;
    assert_eq!(
        names(&templates, "resourceTemplates", "uriTemplate"),
        ["example://b/echo/{text}"]
    );
    let readme = dev
        .call(7, "resources/read", json!({"uri": "example://a/readme"}))
        .await;
    assert!(
        readme["result"]["contents"][0]["text"].is_string(),
        "{readme}"
    );

    // The other profile: its own server only, names as the topology gives them.
    let mut ops = client(&gw, "/mcp/ops", BOB);
    ops.initialize(json!({})).await;
    let tools = ops.call(1, "tools/list", json!({})).await;
    let listed = names(&tools, "tools", "name");
    assert!(
        listed.iter().all(|n| n.starts_with("c__")) && listed.contains(&"c__echo".to_owned()),
        "{listed:?}"
    );
    // The root endpoint still shows everything to whoever is granted it.
    let mut root = client(&gw, "/mcp", ADMIN);
    root.initialize(json!({})).await;
    let all = all_pages(&root, "tools/list", "tools").await;
    assert!(
        all.iter().any(|t| t["name"] == "c__echo") && all.iter().any(|t| t["name"] == "a__echo")
    );
    gw.stop().await;
}

/// Asserts a JSON-RPC invalid-params refusal that names the target as unknown.
fn refused(r: &Value, what: &str) {
    assert_eq!(r["error"]["code"], -32602, "{what}: {r}");
}

#[tokio::test]
async fn every_route_out_of_a_profile_is_refused() {
    let gw = gateway("").await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;

    // Tools: the old name of a renamed tool, a tool the profile leaves out, another server's.
    for name in ["a__echo", "a__fail", "c__echo", "echo", "c__"] {
        let r = dev
            .call(
                1,
                "tools/call",
                json!({"name": name, "arguments": {"text": "x"}}),
            )
            .await;
        refused(&r, name);
    }
    // Prompts: a server whose prompts are hidden, and a server outside.
    for name in ["a__greeting", "c__greeting"] {
        let r = dev
            .call(
                2,
                "prompts/get",
                json!({"name": name, "arguments": {"name": "x"}}),
            )
            .await;
        refused(&r, name);
    }
    // Resources: outside the globs (a's template), and another server's, by every method.
    for uri in ["example://a/echo/x", "example://c/readme"] {
        for method in [
            "resources/read",
            "resources/subscribe",
            "resources/unsubscribe",
        ] {
            let r = dev.call(3, method, json!({"uri": uri})).await;
            refused(&r, &format!("{method} {uri}"));
        }
    }
    // Completions, by prompt and by resource.
    let r = dev
        .call(
            4,
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "c__greeting"}, "argument": {"name": "name", "value": ""}}),
        )
        .await;
    refused(&r, "completion of c__greeting");
    let r = dev
        .call(
            5,
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": "example://c/echo/{text}"}, "argument": {"name": "text", "value": ""}}),
        )
        .await;
    refused(&r, "completion of c's template");

    // A list cursor made on the root endpoint (naming servers dev does not have) is not one
    // dev was given.
    let mut root = client(&gw, "/mcp", ADMIN);
    root.initialize(json!({})).await;
    let page = root.call(6, "tools/list", json!({})).await;
    let cursor = page["result"]["nextCursor"]
        .as_str()
        .expect("b pages by 2: the root list has a next page")
        .to_owned();
    let r = dev.call(7, "tools/list", json!({"cursor": cursor})).await;
    refused(&r, "a root cursor");

    // A session belongs to the endpoint it was opened on: dev's id is unknown at ops (where
    // alice is granted too), and the root's id is unknown at dev.
    let mut at_ops = client(&gw, "/mcp/ops", ALICE);
    at_ops.session = dev.session.clone();
    let r = at_ops
        .post(json!({"jsonrpc":"2.0","id":8,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let mut admin_at_dev = client(&gw, "/mcp/dev", ADMIN);
    admin_at_dev.session = root.session.clone();
    let r = admin_at_dev
        .post(json!({"jsonrpc":"2.0","id":9,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 403, "admin is not granted dev: {}", r.body);

    // The endpoints themselves: not granted, unknown, unauthenticated.
    for (path, token, status) in [
        ("/mcp", ALICE, 403),
        ("/mcp/dev", BOB, 403),
        ("/mcp/nope", ALICE, 404),
        ("/mcp/dev/", ALICE, 404),
        ("/mcp/dev", "wrong-token-0123456789", 401),
    ] {
        let c = client(&gw, path, token);
        let r = c
            .post(
                json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                    "protocolVersion":"2025-11-25","capabilities":{},
                    "clientInfo":{"name":"t","version":"1"}}})
                .to_string(),
            )
            .await;
        assert_eq!(r.status, status, "{path} with {token}: {}", r.body);
        assert!(r.json()["error"]["message"].is_string(), "{}", r.body);
        if status == 403 {
            assert!(
                r.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("not granted"),
                "{}",
                r.body
            );
        }
    }
    // HTTP+SSE serves every server: it is the root endpoint's, granted as the root is.
    let sse = client(&gw, "/sse", ALICE);
    let r = sse
        .send(
            sse.request("GET", Bytes::new())
                .header("accept", "text/event-stream")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Nothing was harmed: dev still works.
    assert_eq!(
        dev.tool_text(10, "say", json!({"text": "still"})).await,
        "still"
    );
    gw.stop().await;
}

/// A portable session id carries its profile: another replica serves it on that profile's
/// endpoint only.
#[tokio::test]
async fn a_portable_session_is_restored_on_its_own_profile_only() {
    let key = support::session_key_file("profile");
    let keys = format!("  session_keys: [{{ id: 1, file: {key:?} }}]");
    let one = gateway_with(&keys, "").await;
    let two = gateway_with(&keys, "").await;
    let mut dev = client(&one, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let mut elsewhere = client(&two, "/mcp/dev", ALICE);
    elsewhere.session = dev.session.clone();
    assert_eq!(
        elsewhere
            .tool_text(1, "say", json!({"text": "there"}))
            .await,
        "there"
    );
    let r = elsewhere
        .call(
            2,
            "tools/call",
            json!({"name": "c__echo", "arguments": {"text": "x"}}),
        )
        .await;
    refused(&r, "c__echo on the restored session");
    // The same id at another profile's endpoint of that replica (alice is granted it too).
    let mut ops = client(&two, "/mcp/ops", ALICE);
    ops.session = dev.session.clone();
    let r = ops
        .post(json!({"jsonrpc":"2.0","id":3,"method":"tools/list"}).to_string())
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    one.stop().await;
    two.stop().await;
    let _ = std::fs::remove_file(key);
}

/// A stateless (2026-07-28) request to a profile runs in that profile's view too.
#[tokio::test]
async fn stateless_requests_see_the_profile_of_their_endpoint() {
    let gw = gateway("").await;
    let dev = client(&gw, "/mcp/dev", ALICE);
    let send = |id: u64, method: &str, mut params: Value| {
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
        });
        let name = params
            .get("name")
            .or(params.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let body =
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        let mut req = dev
            .request("POST", Bytes::new())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", method);
        if let Some(n) = name {
            req = req.header("mcp-name", n);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let dev = dev.clone();
        async move { dev.send(req).await }
    };
    let r = send(
        1,
        "tools/call",
        json!({"name": "say", "arguments": {"text": "hi"}}),
    )
    .await;
    assert_eq!(r.json()["result"]["content"][0]["text"], "hi", "{}", r.body);
    let r = send(
        2,
        "tools/call",
        json!({"name": "c__echo", "arguments": {"text": "x"}}),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
    let r = send(3, "resources/read", json!({"uri": "example://c/readme"})).await;
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
    let r = send(4, "tools/list", json!({})).await;
    let listed = names(&r.json(), "tools", "name");
    assert!(listed.contains(&"say".to_owned()), "{listed:?}");
    assert!(
        !listed
            .iter()
            .any(|n| n.starts_with("c__") || n == "a__echo"),
        "{listed:?}"
    );
    // The same principal at the root endpoint: not granted, stateless or not.
    let root = client(&gw, "/mcp", ALICE);
    let r = root
        .send(
            root.request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/list")
                .body(Full::new(Bytes::from(
                    json!({"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"_meta":{
                        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                        "io.modelcontextprotocol/clientCapabilities": {},
                        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"}}}})
                    .to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    gw.stop().await;
}

/// Plugin chains select by profile: a chain for `dev` runs on dev's calls, not on ops'.
#[tokio::test]
async fn plugin_chains_select_by_the_calls_profile() {
    let plugins = format!(
        r#"plugins:
  modules:
    - name: policy
      path: {:?}
      config:
        rules:
          - {{ tool: echo, argument: text, operator: contains, value: secret, action: block, reason: "not in dev" }}
        default: allow
  chains:
    - {{ name: dev-calls, methods: ["tools/call"], profiles: [dev], plugins: [policy] }}"#,
        support::wasm("tool_policy")
    );
    let gw = gateway(&plugins).await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let r = dev
        .call(
            1,
            "tools/call",
            json!({"name": "b__echo", "arguments": {"text": "a secret"}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32030, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not in dev")
    );
    let mut ops = client(&gw, "/mcp/ops", ALICE);
    ops.initialize(json!({})).await;
    assert_eq!(
        ops.tool_text(2, "c__echo", json!({"text": "a secret"}))
            .await,
        "a secret"
    );
    gw.stop().await;
}

#[tokio::test]
async fn profiles_that_would_be_wrong_are_refused_naming_the_field() {
    let base = "listen: 127.0.0.1:0\nupstreams: [{name: a, stdio: {command: \"true\"}}]\n";
    for (profiles, field) in [
        (
            "profiles: [{name: 'x y', grant: {everyone: true}, servers: [{name: a}]}]",
            "profiles[0].name",
        ),
        (
            "profiles: [{name: x, grant: {}, servers: [{name: a}]}]",
            "profiles[0].grant",
        ),
        (
            "profiles: [{name: x, grant: {everyone: true}, servers: [{name: a, tools: [{name: '*', description: d}]}]}]",
            "profiles[0].servers[0].tools[0].name",
        ),
    ] {
        let e = gatehouse::Config::from_yaml(&format!("{base}{profiles}"))
            .expect_err(profiles)
            .to_string();
        assert!(e.contains(field), "{profiles}: {e}");
    }
    // With profiles, the root endpoint is no one's unless granted.
    let cfg = gatehouse::Config::from_yaml(&format!(
        "{base}profiles: [{{name: x, grant: {{everyone: true}}, servers: [{{name: a}}]}}]"
    ))
    .unwrap();
    assert!(!cfg.mcp.root_access.everyone && cfg.mcp.root_access.principals.is_empty());
    let cfg = gatehouse::Config::from_yaml(base).unwrap();
    assert!(cfg.mcp.root_access.everyone, "no profiles: as before");
}

/// The `_meta` envelope of a 2026-07-28 request declaring `caps`.
fn envelope(caps: Value) -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": caps,
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
    })
}

/// Sends a stateless (2026-07-28) request with the headers such a client mirrors.
async fn stateless(
    c: &Client,
    id: u64,
    method: &str,
    mut params: Value,
    caps: Value,
) -> support::Resp {
    params["_meta"] = envelope(caps);
    let mut req = c
        .request("POST", Bytes::new())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params
        .get("name")
        .or(params.get("uri"))
        .and_then(Value::as_str)
    {
        // Text a header cannot carry as it is goes base64-encoded, as clients send it.
        let plain = n.bytes().all(|b| b.is_ascii_graphic() || b == b' ') && n.trim() == n;
        req = req.header(
            "mcp-name",
            if plain {
                n.to_owned()
            } else {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(n);
                format!("=?base64?{encoded}?=")
            },
        );
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    c.send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
}

/// Asserts the gateway's own "unknown" refusal (not a server's answer about a tool it lacks).
fn unknown(r: &Value, what: &str) {
    assert_eq!(r["error"]["code"], -32602, "{what}: {r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown") || message.contains("no upstream serves"),
        "{what}: {r}"
    );
}

/// Names that are not, byte for byte, one the profile shows: case, NUL, spaces, lookalike
/// letters, separators doubled or moved, another server's prefix, a very long name. None
/// reaches a server (the example server would answer a name it lacks with a result, not
/// -32602); nor does a name given twice or beside a key a lenient server reads as `name`.
#[tokio::test]
async fn name_tricks_reach_nothing_a_profile_hides() {
    let gw = gateway("").await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let long = format!("say{}", "y".repeat(64 * 1024));
    for name in [
        "SAY",
        "Say",
        "say\u{0}",
        "say ",
        " say",
        "\u{ff53}\u{ff41}\u{ff59}", // fullwidth "say"
        "a__ECHO",
        "A__echo",
        "a__echo\u{0}",
        "a__Echo",
        "a___echo",
        "a__a__echo",
        "a____echo",
        "__a__echo",
        "a\u{ff3f}\u{ff3f}echo", // fullwidth low lines
        "a__",
        "c__echo\u{0}",
        "C__echo",
        "dev__say",
        long.as_str(),
    ] {
        let r = dev
            .call(
                1,
                "tools/call",
                json!({"name": name, "arguments": {"text": "x"}}),
            )
            .await;
        let shown: String = name.chars().take(20).collect();
        unknown(&r, &format!("tools/call {shown:?}"));
    }
    for name in [
        "a__greeting\u{0}",
        "a__Greeting",
        "A__greeting",
        "c__greeting",
    ] {
        let r = dev
            .call(
                2,
                "prompts/get",
                json!({"name": name, "arguments": {"name": "x"}}),
            )
            .await;
        unknown(&r, &format!("prompts/get {name:?}"));
    }
    // The visible name with the hidden one beside it: refused whichever a server would read.
    for params in [
        r#"{"name":"say","name":"a__echo","arguments":{"text":"x"}}"#,
        r#"{"name":"a__echo","name":"say","arguments":{"text":"x"}}"#,
        r#"{"name":"say","Name":"a__echo","arguments":{"text":"x"}}"#,
        r#"{"name":"say","NAME":"echo","arguments":{"text":"x"}}"#,
        r#"{"name":"say","name\u0000":"a__echo","arguments":{"text":"x"}}"#,
        r#"{"name":"say","\u017fay":"x","nam\u0065":"a__echo","arguments":{"text":"x"}}"#,
    ] {
        let r = dev
            .post(format!(
                r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{params}}}"#
            ))
            .await;
        assert_eq!(r.json()["error"]["code"], -32602, "{params}: {}", r.body);
    }
    // The same names without a session (2026-07-28): refused alike.
    let stateless_dev = client(&gw, "/mcp/dev", ALICE);
    for name in ["SAY", "a__echo", "a__echo\u{0}", "c__echo"] {
        let r = stateless(
            &stateless_dev,
            4,
            "tools/call",
            json!({"name": name, "arguments": {"text": "x"}}),
            json!({}),
        )
        .await;
        unknown(&r.json(), &format!("stateless tools/call {name:?}"));
    }
    assert_eq!(dev.tool_text(5, "say", json!({"text": "ok"})).await, "ok");
    gw.stop().await;
}

/// A session id opened at one profile is unknown at another profile's endpoint by every HTTP
/// method (POST, GET, GET resuming a stream, DELETE), and at the root endpoint; the refusals
/// leave the session working where it belongs.
#[tokio::test]
async fn a_session_is_unknown_to_every_method_at_another_endpoint() {
    let gw = gateway("").await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let id = dev.session.clone().unwrap();
    // A recorded stream of dev's, to try to resume elsewhere.
    let r = dev
        .post(
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
                "name":"b__slow","arguments":{"seconds":0.2,"steps":2},"_meta":{"progressToken":"p"}}})
            .to_string(),
        )
        .await;
    let event_id = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("a numbered stream: {}", r.body));
    // Alice at ops (granted it), the admin at the root endpoint (granted it).
    for (path, token) in [("/mcp/ops", ALICE), ("/mcp", ADMIN)] {
        let other = client(&gw, path, token);
        let with_id = |method: &str| {
            other
                .request(method, Bytes::new())
                .header("mcp-session-id", &id)
                .header("mcp-protocol-version", "2025-11-25")
        };
        let r = other
            .send(
                with_id("POST")
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(Full::new(Bytes::from(
                        json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{
                            "name":"say","arguments":{"text":"x"}}})
                        .to_string(),
                    )))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 404, "POST at {path}: {}", r.body);
        let r = other
            .send(
                with_id("GET")
                    .header("accept", "text/event-stream")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 404, "GET at {path}: {}", r.body);
        let r = other
            .send(
                with_id("GET")
                    .header("accept", "text/event-stream")
                    .header("last-event-id", &event_id)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 404, "GET resuming at {path}: {}", r.body);
        let r = other
            .send(with_id("DELETE").body(Full::new(Bytes::new())).unwrap())
            .await;
        assert_eq!(r.status, 404, "DELETE at {path}: {}", r.body);
    }
    // Still alive at its own endpoint.
    assert_eq!(
        dev.tool_text(3, "say", json!({"text": "here"})).await,
        "here"
    );
    gw.stop().await;
}

/// List cursors carry the servers they page: one minted at another profile (or forged to name
/// a server this profile lacks beside one it has) is refused, by every list; a completion
/// refers to nothing a served server's part of the profile hides.
#[tokio::test]
async fn cursors_and_completion_refs_of_what_a_profile_hides_are_refused() {
    let gw = gateway("").await;
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let mut ops = client(&gw, "/mcp/ops", ALICE);
    ops.initialize(json!({})).await;
    let next = |page: &Value| {
        page["result"]["nextCursor"]
            .as_str()
            .unwrap_or_else(|| panic!("a next page: {page}"))
            .to_owned()
    };
    let from_ops = next(&ops.call(1, "tools/list", json!({})).await);
    let from_dev = next(&dev.call(2, "tools/list", json!({})).await);
    for method in [
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
    ] {
        let r = dev.call(3, method, json!({"cursor": from_ops})).await;
        assert_eq!(
            r["error"]["code"], -32602,
            "ops' cursor at dev {method}: {r}"
        );
        let r = ops.call(4, method, json!({"cursor": from_dev})).await;
        assert_eq!(
            r["error"]["code"], -32602,
            "dev's cursor at ops {method}: {r}"
        );
    }
    // Forged: a server dev has, and one it does not.
    use base64::Engine;
    let forge =
        |map: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(map.to_string());
    let r = dev
        .call(
            5,
            "tools/list",
            json!({"cursor": forge(json!({"b": "2", "c": "0"}))}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = dev
        .call(6, "tools/list", json!({"cursor": forge(json!({"b": "2"}))}))
        .await;
    assert!(
        r["result"]["tools"].is_array(),
        "a cursor of dev's own: {r}"
    );
    // Pages through a cursor are filtered like first pages: a's hidden tools stay hidden.
    let r = dev
        .call(7, "tools/list", json!({"cursor": forge(json!({"a": "0"}))}))
        .await;
    let listed = names(&r, "tools", "name");
    assert!(
        listed.iter().all(|n| n == "say" || n.starts_with("a__ad")),
        "{listed:?}"
    );

    // Completions: a served server's prompt the profile hides (a's prompts: none), and its
    // template outside the resource globs.
    let r = dev
        .call(
            8,
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "a__greeting"}, "argument": {"name": "name", "value": ""}}),
        )
        .await;
    unknown(&r, "completion of a__greeting");
    let r = dev
        .call(
            9,
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": "example://a/echo/{text}"}, "argument": {"name": "text", "value": ""}}),
        )
        .await;
    unknown(&r, "completion of a's template");
    // The ref given twice, or beside a lookalike: refused rather than guessed.
    for params in [
        r#"{"ref":{"type":"ref/prompt","name":"b__greeting","name":"a__greeting"},"argument":{"name":"name","value":""}}"#,
        r#"{"ref":{"type":"ref/prompt","name":"b__greeting","Name":"a__greeting"},"argument":{"name":"name","value":""}}"#,
        r#"{"ref":{"type":"ref/prompt","name":"b__greeting"},"Ref":{"type":"ref/prompt","name":"a__greeting"},"argument":{"name":"name","value":""}}"#,
    ] {
        let r = dev
            .post(format!(
                r#"{{"jsonrpc":"2.0","id":10,"method":"completion/complete","params":{params}}}"#
            ))
            .await;
        assert_eq!(r.json()["error"]["code"], -32602, "{params}: {}", r.body);
    }
    gw.stop().await;
}

/// A profile `dev2` that shows server b, as dev does, granted to alice.
const DEV2: &str = "  - name: dev2
    grant: {principals: [alice]}
    servers: [{name: b}]
  - name: narrow
    grant: {principals: [alice]}
    servers: [{name: a, resources: [\"example://a/readme\"]}]";

/// An `input_required` state handed out at one profile's endpoint resumes its call there only:
/// not at another profile showing the same server, nor at the root endpoint, and the refusals
/// do not spend it.
#[tokio::test]
async fn request_state_resumes_only_on_the_profile_that_issued_it() {
    let gw = gateway(DEV2).await;
    let caps = json!({"sampling": {}});
    let dev = client(&gw, "/mcp/dev", ALICE);
    let call = json!({"name": "b__sample", "arguments": {"prompt": "secret?"}});
    let first = stateless(&dev, 1, "tools/call", call.clone(), caps.clone())
        .await
        .response();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let (key, _) = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let mut retry = call.clone();
    retry["inputResponses"] = json!({ key.clone(): {"role": "assistant",
        "content": {"type": "text", "text": "stolen"}, "model": "m"} });
    retry["requestState"] = first["result"]["requestState"].clone();
    // Alice at another profile showing b, and at one that does not; the admin at the root.
    for (path, token) in [("/mcp/dev2", ALICE), ("/mcp/ops", ALICE), ("/mcp", ADMIN)] {
        let other = client(&gw, path, token);
        let r = stateless(&other, 2, "tools/call", retry.clone(), caps.clone()).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.error_code(), -32602, "{path}: {}", r.body);
        assert!(
            r.body
                .contains("not issued to this caller on this endpoint"),
            "{path}: {}",
            r.body
        );
    }
    let mut answer = retry.clone();
    answer["inputResponses"][key.as_str()]["content"]["text"] = json!("mine");
    let done = stateless(&dev, 3, "tools/call", answer, caps)
        .await
        .response();
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: mine",
        "{done}"
    );
    gw.stop().await;
}

/// Opens a `subscriptions/listen` stream at `c`'s endpoint.
async fn listen(c: &Client, id: Value, notifications: Value) -> support::SseReader {
    let params = json!({ "notifications": notifications, "_meta": envelope(json!({})) });
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
    assert_eq!(resp.status(), 200);
    support::SseReader::new(resp.into_body())
}

/// A listen stream at a profile watches only resources the profile shows, and hears no update
/// of a resource it hides, even one below a resource it watches.
#[tokio::test]
async fn a_listen_stream_at_a_profile_hears_only_what_it_shows() {
    let gw = gateway(DEV2).await;
    let narrow = client(&gw, "/mcp/narrow", ALICE);
    let watched = "example://a/readme";
    let mut stream = listen(
        &narrow,
        json!("l"),
        json!({"resourceSubscriptions": [
            watched, "example://a/echo/x", "example://b/readme", "example://c/readme",
            "example://a/readme/../../b/readme"
        ]}),
    )
    .await;
    let ack = stream.next().await.expect("an acknowledgement");
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"resourceSubscriptions": [watched]}),
        "{ack}"
    );
    let touch = |id: u64, uri: &'static str| {
        let narrow = narrow.clone();
        async move {
            let r = stateless(
                &narrow,
                id,
                "tools/call",
                json!({"name": "a__touch", "arguments": {"uri": uri}}),
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
    // Below the watched resource, but hidden by the profile's glob: not heard.
    touch(1, "example://a/readme/hidden").await;
    touch(2, "example://a/readme#part").await;
    touch(3, watched).await;
    let heard = stream.next().await.expect("the watched resource's update");
    assert_eq!(heard["method"], "notifications/resources/updated");
    assert_eq!(heard["params"]["uri"], watched, "{heard}");
    // Subscribing to a hidden resource through the method table: unknown too.
    let r = stateless(
        &narrow,
        4,
        "resources/read",
        json!({"uri": "example://a/echo/x"}),
        json!({}),
    )
    .await;
    unknown(&r.json(), "read of a hidden template's resource");
    gw.stop().await;
}

/// A caller cannot cancel another caller's request by naming its id: not from another
/// principal's session at the same profile, not from the same principal's session at another
/// profile, not without a session; and batches, which would carry several targets past one
/// check, are refused at a profile with or without a session.
#[tokio::test]
async fn another_callers_request_cannot_be_cancelled_and_batches_are_refused() {
    let gw = gateway("").await;
    let mut alice = client(&gw, "/mcp/ops", ALICE);
    alice.initialize(json!({})).await;
    let slow = {
        let alice = alice.clone();
        tokio::spawn(async move {
            alice
                .call(
                    7,
                    "tools/call",
                    json!({"name": "c__slow", "arguments": {"seconds": 1.0}}),
                )
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 7, "reason": "not yours"}})
    .to_string();
    let mut bob = client(&gw, "/mcp/ops", BOB);
    bob.initialize(json!({})).await;
    assert_eq!(bob.post(cancel.clone()).await.status, 202);
    let mut alice_dev = client(&gw, "/mcp/dev", ALICE);
    alice_dev.initialize(json!({})).await;
    assert_eq!(alice_dev.post(cancel.clone()).await.status, 202);
    let bob_stateless = client(&gw, "/mcp/ops", BOB);
    let r = bob_stateless
        .send(
            bob_stateless
                .request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "notifications/cancelled")
                .body(Full::new(Bytes::from(
                    json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 7, "_meta": envelope(json!({}))}})
                    .to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let done = slow.await.unwrap();
    assert_eq!(
        done["result"]["content"][0]["text"], "done after 1s",
        "{done}"
    );

    // Batches: a visible call and a hidden one together.
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "say", "arguments": {"text": "x"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "a__echo", "arguments": {"text": "x"}}}
    ])
    .to_string();
    let mut dev = client(&gw, "/mcp/dev", ALICE);
    dev.initialize(json!({})).await;
    let r = dev.post(batch.clone()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32600, "{}", r.body);
    let no_session = client(&gw, "/mcp/dev", ALICE);
    let r = no_session
        .send(
            no_session
                .request("POST", Bytes::new())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "say")
                .body(Full::new(Bytes::from(batch)))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), -32600, "{}", r.body);
    gw.stop().await;
}
