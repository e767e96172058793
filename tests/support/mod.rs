//! Test support: an in-process gateway over example-server upstreams, and a small MCP HTTP client.
#![allow(dead_code)]

pub mod recorder;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::sync::Arc;

/// The gateway binary, which also runs the example server.
pub const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// A session key (32 bytes, hex) for tests whose gateways share portable sessions.
pub const SESSION_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A file holding [`SESSION_KEY`], for `mcp.session_keys` (`name` tells the tests' files
/// apart).
pub fn session_key_file(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("gatehouse-{name}-key-{}", std::process::id()));
    std::fs::write(&path, format!("{SESSION_KEY}\n")).unwrap();
    path
}

/// A read of `plugin`'s state in `session`'s scope, as a plugin running on a replica asks it
/// (`plugin` empty: as the gateway asks whether a session was deleted).
pub fn session_state_probe(plugin: &str, session: &str) -> gatehouse::plugins::Asked {
    gatehouse::plugins::Asked {
        plugin: plugin.into(),
        session: session.to_owned(),
        principal: None,
        action: gatehouse::plugins::Action::Get {
            scope: gatehouse::plugins::Scope::Session,
            key: String::new(),
        },
        limits: Default::default(),
    }
}

/// YAML for an example-server upstream.
pub fn example(name: &str, extra_args: &[&str], extra: &str) -> String {
    let mut args = vec![
        "example-server".to_owned(),
        "--name".to_owned(),
        name.to_owned(),
    ];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    format!(
        "  - name: {name}\n    stdio: {{ command: {BIN:?}, args: {} }}\n{extra}",
        serde_json::to_string(&args).unwrap()
    )
}

/// YAML for a stdio upstream written in `sh`: a request line whose method is one of `answers`
/// runs that answer's shell command, in which `$id` is the request's (numeric) id, the line's
/// first `"id":` (the gateway writes it before the params); an `initialize` is answered with
/// `capabilities` (JSON). Other lines are ignored.
#[allow(dead_code)] // not every test binary uses every helper
pub fn sh_server(name: &str, capabilities: &str, answers: &[(&str, &str)]) -> String {
    let mut script = String::from(
        "while IFS= read -r line; do\nid=$(printf '%s' \"$line\" | grep -o '\"id\":[0-9]*' | head -n 1 | cut -d: -f2)\ncase \"$line\" in\n",
    );
    let initialize = format!(
        r#"printf '{{"jsonrpc":"2.0","id":%s,"result":{{"protocolVersion":"2025-11-25","capabilities":{capabilities},"serverInfo":{{"name":"{name}","version":"1"}}}}}}\n' "$id""#
    );
    for (method, command) in [("initialize", initialize.as_str())]
        .into_iter()
        .chain(answers.iter().copied())
    {
        script.push_str(&format!("*'\"{method}\"'*) {command};;\n"));
    }
    script.push_str("esac\ndone\n");
    format!(
        "  - name: {name}\n    stdio: {{ command: sh, args: [\"-c\", {}] }}\n",
        serde_json::to_string(&script).unwrap()
    )
}

/// A stdio upstream `name` (`call_timeout: 1s`) that answers each page of its tool list in
/// 0.3 s, empty, with another `nextCursor`: a list that never ends, each page in time.
#[allow(dead_code)] // not every test binary uses every helper
pub fn slow_pager(name: &str) -> String {
    sh_server(
        name,
        r#"{"tools":{}}"#,
        &[(
            "tools/list",
            r#"sleep 0.3; printf '{"jsonrpc":"2.0","id":%s,"result":{"tools":[],"nextCursor":"more"}}\n' "$id""#,
        )],
    ) + "    call_timeout: 1s\n"
}

/// The `plugins` YAML of a gateway whose plugin `answers` (tool-policy) refuses clients'
/// answers to servers' `method` requests whose `argument` holds `SECRET` ("no secrets to
/// servers"); `more_modules` and `more_chains` are YAML list items added to each list.
#[allow(dead_code)] // not every test binary uses every helper
pub fn answers_policy(
    method: &str,
    argument: &str,
    more_modules: &str,
    more_chains: &str,
) -> String {
    format!(
        r#"plugins:
  modules:
    - name: answers
      path: {:?}
      config:
        rules:
          - {{ argument: {argument}, operator: contains, value: SECRET, action: block, reason: "no secrets to servers" }}
        default: allow
{more_modules}  chains:
    - {{ name: answers, methods: ["{method}"], plugins: [answers] }}
{more_chains}"#,
        wasm("tool_policy")
    )
}

/// The `plugins` YAML of a gateway whose plugin `none` (tool-policy) refuses every client's
/// answer to a server's `method` request ("no answers at all").
#[allow(dead_code)] // not every test binary uses every helper
pub fn no_answers_policy(method: &str) -> String {
    format!(
        "plugins:\n  modules:\n    - name: none\n      path: {:?}\n      config: {{ rules: [ {{ action: block, reason: \"no answers at all\" }} ], default: allow }}\n  chains:\n    - {{ name: answers, methods: [\"{method}\"], plugins: [none] }}\n",
        wasm("tool_policy")
    )
}

/// A fresh scratch directory for one test (`tag` and the process id name it), emptied first.
#[allow(dead_code)] // not every test binary uses every helper
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gatehouse-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The path of a plugin component built by `plugins/build.sh` (into `target/plugins/`).
pub fn wasm(name: &str) -> String {
    let path = format!("{}/target/plugins/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run plugins/build.sh first"
    );
    path
}

/// A gateway serving on a free loopback port.
pub struct TestGateway {
    pub running: Option<gatehouse::Running>,
    pub addr: SocketAddr,
}

impl TestGateway {
    /// Starts a gateway: `top` is YAML before `upstreams:`, `upstreams` the list entries.
    pub async fn start(top: &str, upstreams: &[String]) -> TestGateway {
        let yaml = format!(
            "listen: 127.0.0.1:0\n{top}\nupstreams:\n{}",
            upstreams.join("")
        );
        let config = gatehouse::Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let running = gatehouse::start(config).await.expect("gateway starts");
        let addr = running.listening.local_addr;
        TestGateway {
            running: Some(running),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(self.url())
    }

    pub fn gateway(&self) -> &std::sync::Arc<gatehouse::Gateway> {
        &self.running.as_ref().unwrap().gateway
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// An HTTP response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The JSON-RPC messages in the body, whether JSON or SSE.
    pub fn messages(&self) -> Vec<Value> {
        let sse = self
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        if !sse {
            return vec![self.json()];
        }
        self.body
            .split("\n\n")
            .filter_map(|ev| {
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                // An event without data (a priming event) is not dispatched, as in browsers.
                let data = data.join("\n");
                (!data.is_empty()).then(|| serde_json::from_str(&data).unwrap())
            })
            .collect()
    }

    /// The final JSON-RPC response among the messages.
    pub fn response(&self) -> Value {
        self.messages()
            .into_iter()
            .find(|m| m.get("result").is_some() || m.get("error").is_some())
            .unwrap_or_else(|| panic!("no response in {}", self.body))
    }

    pub fn error_code(&self) -> i64 {
        self.json()["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("no error code: {}", self.body))
    }
}

/// A minimal MCP Streamable HTTP client.
#[derive(Clone)]
pub struct Client {
    pub url: String,
    pub http: HyperClient<HttpConnector, Full<Bytes>>,
    pub session: Option<String>,
    pub token: Option<String>,
}

impl Client {
    pub fn new(url: String) -> Client {
        Client {
            url,
            // Shorter than any server idle timeout in the tests, so a pooled connection is never
            // reused just as the gateway closes it.
            http: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_millis(500))
                .build_http(),
            session: None,
            token: None,
        }
    }

    pub fn request(&self, method: &str, body: impl Into<Bytes>) -> http::request::Builder {
        let mut b = Request::builder().method(method).uri(&self.url);
        if let Some(s) = &self.session {
            b = b.header("mcp-session-id", s);
        }
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let _ = body;
        b
    }

    /// Sends a request built by `f` and reads the whole response.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        let resp = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
            .await
            .expect("response within 30s")
            .expect("HTTP request succeeds");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// POSTs a JSON body with the standard MCP headers.
    pub async fn post(&self, body: impl Into<Bytes>) -> Resp {
        let body = body.into();
        let req = self
            .request("POST", body.clone())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .body(Full::new(body))
            .unwrap();
        self.send(req).await
    }

    /// Initializes a session and remembers its id.
    pub async fn initialize(&mut self, capabilities: Value) -> Value {
        let r = self
            .post(
                json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                    "protocolVersion":"2025-11-25","capabilities":capabilities,
                    "clientInfo":{"name":"rust-test","version":"1"}}})
                .to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        self.session = Some(
            r.headers
                .get("mcp-session-id")
                .expect("session id issued")
                .to_str()
                .unwrap()
                .to_owned(),
        );
        let ok = self
            .post(json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string())
            .await;
        assert_eq!(ok.status, 202);
        r.json()["result"].clone()
    }

    /// Calls a method and returns its final JSON-RPC response.
    pub async fn call(&self, id: u64, method: &str, params: Value) -> Value {
        let r = self
            .post(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string())
            .await;
        assert_eq!(r.status, 200, "{method}: {}", r.body);
        let resp = r.response();
        assert_eq!(resp["id"], json!(id));
        resp
    }

    /// Sends request `id` of `method` with `params` as written (JSON text) and returns the
    /// message of the invalid-params error (-32602) it must be refused with.
    pub async fn invalid_params(&self, id: u64, method: &str, params: &str) -> String {
        let r = self
            .post(format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#
            ))
            .await;
        let resp = r.response();
        assert_eq!(resp["error"]["code"], -32602, "{params}: {resp}");
        resp["error"]["message"].as_str().unwrap().to_owned()
    }

    /// Calls a tool and returns the text of its first content item.
    pub async fn tool_text(&self, id: u64, name: &str, args: Value) -> String {
        let r = self
            .call(id, "tools/call", json!({"name":name,"arguments":args}))
            .await;
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("no text result: {r}"))
            .to_owned()
    }
}

/// Names of the tools in a `tools/list` answer.
pub fn tool_names(list: &Value) -> Vec<String> {
    list["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A request to the gateway's admin API at `addr`, with bearer `token` (if any) and a JSON body
/// (if any).
pub async fn admin_request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    let c = Client::new(format!("http://{addr}{path}"));
    let mut req = Request::builder().method(method).uri(&c.url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    c.send(req.body(Full::new(body)).unwrap()).await
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Reads SSE messages from a streaming response one at a time.
pub struct SseReader {
    body: hyper::body::Incoming,
    buf: String,
}

impl SseReader {
    pub fn new(body: hyper::body::Incoming) -> SseReader {
        SseReader {
            body,
            buf: String::new(),
        }
    }

    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(10)).await
    }

    /// The next message, if one comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                let data = data.join("\n");
                if !data.is_empty() {
                    return Some(serde_json::from_str(&data).unwrap());
                }
                continue;
            }
            let frame = tokio::time::timeout(wait, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&d));
            }
        }
    }
}

impl Client {
    /// POSTs a message and returns its SSE answer, to read one message at a time (a call that
    /// needs the client's answer mid-way).
    pub async fn stream(&self, body: Value) -> SseReader {
        let req = self
            .request("POST", Bytes::new())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        SseReader {
            body: resp.into_body(),
            buf: String::new(),
        }
    }
}

/// Asserts that `r` is -32042 for `server` refusing the caller's credentials with HTTP 401, and
/// that the refusal was counted without marking the server down.
pub fn assert_credentials_refused(gw: &TestGateway, r: &Value, server: &str) {
    assert_eq!(r["error"]["code"], -32042, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains(&format!(
            "'{server}': the server refused the caller's credentials (HTTP 401"
        )),
        "{r}"
    );
    let metrics = gw.gateway().metrics.render();
    assert!(
        !metrics.contains(&format!("gatehouse_upstream_up{{server=\"{server}\"}} 0"))
            && metrics.contains(&format!(
                "gatehouse_upstream_credentials_refused_total{{server=\"{server}\"}}"
            )),
        "{metrics}"
    );
}

/// A recording MCP server's answer to the message `body`: `initialize`, one tool `whoami`
/// whose call answers `auth` (the `Authorization` value the request carried), `{}` to other
/// requests; `None` for a notification (answered 202).
pub fn whoami_answer(body: &[u8], auth: &str) -> Option<Value> {
    let msg: Value = serde_json::from_slice(body).ok()?;
    let id = msg.get("id")?.clone();
    let result = match msg["method"].as_str()? {
        "initialize" => json!({"protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}}, "serverInfo": {"name": "files", "version": "1"}}),
        "tools/list" => json!({"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]}),
        "tools/call" => json!({"content": [{"type": "text", "text": auth}]}),
        _ => json!({}),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// Serves `handle` on a loopback port (POST only) and returns `http://addr`: its JSON answer
/// and status go back with a `mcp-session-id`, none is 202.
pub async fn serve<F>(handle: F) -> String
where
    F: Fn(http::HeaderMap, Bytes) -> Option<(u16, Value)> + Send + Sync + 'static,
{
    serve_naming_sessions(|_| HeaderValue::from_static("traced-session"), handle).await
}

/// [`serve`], whose `n`th answer (from 0) carries the `mcp-session-id` `session(n)`.
pub async fn serve_naming_sessions<S, F>(session: S, handle: F) -> String
where
    S: Fn(usize) -> HeaderValue + Send + Sync + 'static,
    F: Fn(http::HeaderMap, Bytes) -> Option<(u16, Value)> + Send + Sync + 'static,
{
    serve_over(None, session, handle).await
}

/// [`serve`] over TLS with `tls` (a stand-in for a replica's relay, say): an `https://` URL.
pub async fn serve_tls<F>(tls: Arc<rustls::ServerConfig>, handle: F) -> String
where
    F: Fn(http::HeaderMap, Bytes) -> Option<(u16, Value)> + Send + Sync + 'static,
{
    let tls = tokio_rustls::TlsAcceptor::from(tls);
    serve_over(
        Some(tls),
        |_| HeaderValue::from_static("traced-session"),
        handle,
    )
    .await
}

async fn serve_over<S, F>(tls: Option<tokio_rustls::TlsAcceptor>, session: S, handle: F) -> String
where
    S: Fn(usize) -> HeaderValue + Send + Sync + 'static,
    F: Fn(http::HeaderMap, Bytes) -> Option<(u16, Value)> + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new((handle, session, std::sync::atomic::AtomicUsize::new(0)));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let handle = handle.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let handle = handle.clone();
                    async move {
                        let (handle, session, answered) = &*handle;
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        if req.method() != http::Method::POST {
                            *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        match handle(headers, body) {
                            Some((status, answer)) => {
                                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                *resp.body_mut() = Full::new(Bytes::from(answer.to_string()));
                                let h = resp.headers_mut();
                                h.insert("content-type", "application/json".parse().unwrap());
                                let n = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                h.insert("mcp-session-id", session(n));
                            }
                            None => *resp.status_mut() = http::StatusCode::ACCEPTED,
                        }
                        Ok(resp)
                    }
                });
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => server.serve_connection(TokioIo::new(stream), svc).await,
                        Err(_) => return,
                    },
                    None => server.serve_connection(TokioIo::new(stream), svc).await,
                };
            });
        }
    });
    format!("{scheme}://{addr}")
}

/// Waits until the gateway's counter `name` (as `/metrics` renders it) reaches `at_least`.
pub async fn counter_reaches(gw: &TestGateway, name: &str, at_least: f64) {
    let metrics = gw.gateway().metrics.clone();
    let prefix = format!("{name} ");
    eventually(&format!("{name} reaches {at_least}"), || {
        let text = metrics.render();
        let prefix = prefix.clone();
        async move {
            text.lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
                .is_some_and(|n| n >= at_least)
        }
    })
    .await;
}
