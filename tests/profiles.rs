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
    let key = std::env::temp_dir().join(format!("gatehouse-profile-key-{}", std::process::id()));
    std::fs::write(
        &key,
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
    )
    .unwrap();
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
