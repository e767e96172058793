//! The example MCP server shipped in the binary (`gatehouse example-server`), spoken over stdio.
//!
//! It gives a new user something to call through the embedded default, and tests a peer whose
//! behaviour they control: progress, cancellation, sampling, and (with `--test-tools`) crashes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
type Running = Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>;

/// How the example server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name reported by `whoami` and used in resource URIs.
    pub name: String,
    /// Offer tools that misbehave on purpose.
    pub test_tools: bool,
    /// Paginate `tools/list` with this many tools per page (0: one page).
    pub page_size: usize,
    /// The echo tool's description, in place of the usual one.
    pub echo_description: Option<String>,
    /// Instructions in place of the usual ones.
    pub instructions: Option<String>,
    /// Over HTTP, also serve 2026-07-28 requests statelessly (a dual-era server).
    pub stateless: bool,
}

/// Serves MCP Streamable HTTP (JSON responses, sessions; with [`Options::stateless`] also
/// 2026-07-28 requests) on `addr` until the process ends.
///
/// Prints `LISTENING http://ADDR/mcp` on stdout once bound. Tools that talk back to the client
/// mid-call (`sample`, progress) need stdio.
pub async fn run_http(opts: Options, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use http::{Method, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("LISTENING http://{}/mcp", listener.local_addr()?);
    let state = Arc::new((opts, dashmap::DashSet::<String>::new()));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let (opts, sessions) = &*state;
                    let reply = |status: StatusCode, body: Vec<u8>| {
                        let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = status;
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        r
                    };
                    let session = req
                        .headers()
                        .get("mcp-session-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let known = session.as_ref().is_some_and(|s| sessions.contains(s));
                    if *req.method() == Method::DELETE {
                        let gone = session.is_some_and(|s| sessions.remove(&s).is_some());
                        let status = if gone {
                            StatusCode::OK
                        } else {
                            StatusCode::NOT_FOUND
                        };
                        return Ok::<_, std::convert::Infallible>(reply(status, Vec::new()));
                    }
                    if *req.method() != Method::POST {
                        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new()));
                    }
                    let (head, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
                        return Ok(reply(StatusCode::BAD_REQUEST, b"{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32700,\"message\":\"parse error\"}}".to_vec()));
                    };
                    if opts.stateless
                        && session.is_none()
                        && let Some((status, answer)) = stateless(&msg, &head.headers, opts).await
                    {
                        let body = answer.map(|a| serde_json::to_vec(&a).unwrap_or_default());
                        return Ok(reply(status, body.unwrap_or_default()));
                    }
                    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
                    let Some(id) = msg.get("id").filter(|_| !method.is_empty()) else {
                        return Ok(reply(StatusCode::ACCEPTED, Vec::new()));
                    };
                    if method != "initialize" && !known {
                        let status = if session.is_some() {
                            StatusCode::NOT_FOUND
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        return Ok(reply(status, b"{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32000,\"message\":\"unknown session\"}}".to_vec()));
                    }
                    // No client stream in this mode: messages sent mid-call are dropped.
                    let (out, _) = mpsc::channel(1);
                    let params = msg.get("params").cloned().unwrap_or(Value::Null);
                    let answer = match handle(method, &params, &out, &Pending::default(), opts)
                        .await
                    {
                        Ok(result) => json!({"jsonrpc":"2.0","id":id,"result":result}),
                        Err((code, message)) => {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":code,"message":message}})
                        }
                    };
                    let mut r = reply(
                        StatusCode::OK,
                        serde_json::to_vec(&answer).unwrap_or_default(),
                    );
                    if method == "initialize" {
                        let mut raw = [0u8; 16];
                        let _ = getrandom::fill(&mut raw);
                        let sid: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                        if let Ok(v) = http::HeaderValue::from_str(&sid) {
                            r.headers_mut().insert("mcp-session-id", v);
                        }
                        sessions.insert(sid);
                    }
                    Ok(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers a 2026-07-28 request (one whose `_meta` names a revision, or `server/discover`):
/// the HTTP status and the answer (none for a notification). `None` for an earlier revision's.
async fn stateless(
    msg: &Value,
    headers: &http::HeaderMap,
    opts: &Options,
) -> Option<(http::StatusCode, Option<Value>)> {
    use crate::mcp::revision::{STATELESS, envelope};
    use http::StatusCode;
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let meta = msg.pointer("/params/_meta");
    let version = meta.and_then(|m| m.get(envelope::VERSION));
    if version.is_none() && method != "server/discover" {
        return None;
    }
    let Some(id) = msg.get("id") else {
        return Some((StatusCode::ACCEPTED, None));
    };
    let error = |status, code: i64, message: String, data: Option<Value>| {
        let mut e = json!({"code": code, "message": message});
        if let Some(d) = data {
            e["data"] = d;
        }
        Some((status, Some(json!({"jsonrpc":"2.0","id":id,"error":e}))))
    };
    let Some(version) = version.and_then(Value::as_str) else {
        let message = format!(
            "params._meta[{:?}] must name the revision",
            envelope::VERSION
        );
        return error(StatusCode::BAD_REQUEST, -32602, message, None);
    };
    if version != STATELESS {
        let data = json!({"supported": [STATELESS], "requested": version});
        let message = format!("unsupported protocol version {version:?}");
        return error(StatusCode::BAD_REQUEST, -32022, message, Some(data));
    }
    if !meta
        .and_then(|m| m.get(envelope::CAPABILITIES))
        .is_some_and(Value::is_object)
    {
        let message = format!(
            "params._meta[{:?}] must be an object",
            envelope::CAPABILITIES
        );
        return error(StatusCode::BAD_REQUEST, -32602, message, None);
    }
    // The headers mirror the body; a value that is not plain text arrives base64-encoded.
    let header = |name: &str| {
        let v = headers.get(name)?.to_str().ok()?;
        match v
            .strip_prefix("=?base64?")
            .and_then(|v| v.strip_suffix("?="))
        {
            Some(b64) => {
                use base64::Engine as _;
                let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                String::from_utf8(raw).ok()
            }
            None => Some(v.to_owned()),
        }
    };
    let named = match method {
        "tools/call" | "prompts/get" => msg.pointer("/params/name"),
        "resources/read" => msg.pointer("/params/uri"),
        _ => None,
    };
    let mismatch = [
        ("mcp-protocol-version", Some(version)),
        ("mcp-method", Some(method)),
        ("mcp-name", named.map(|n| n.as_str().unwrap_or_default())),
    ]
    .into_iter()
    .find(|(name, body)| body.is_some_and(|b| header(name).as_deref() != Some(b)));
    if let Some((name, _)) = mismatch {
        let message = format!("header {name} is missing or does not match the body");
        return error(StatusCode::BAD_REQUEST, -32020, message, None);
    }
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "server/discover" => Ok(json!({
            "supportedVersions": [STATELESS],
            "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
            "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "gatehouse-example", "version": env!("CARGO_PKG_VERSION")}},
            "instructions": opts.instructions.as_deref().unwrap_or(INSTRUCTIONS),
            "ttlMs": 60_000,
            "cacheScope": "public"
        })),
        // What only sessions had (the handshake, ping, the session's log level, subscriptions).
        "initialize"
        | "ping"
        | "logging/setLevel"
        | "resources/subscribe"
        | "resources/unsubscribe" => Err((-32601, format!("method not found: {method}"))),
        _ => {
            // No client stream: a tool that would ask the client something fails instead.
            let (out, _) = mpsc::channel(1);
            handle(method, &params, &out, &Pending::default(), opts).await
        }
    };
    match result {
        Ok(mut result) => {
            result["resultType"] = json!("complete");
            Some((
                StatusCode::OK,
                Some(json!({"jsonrpc":"2.0","id":id,"result":result})),
            ))
        }
        Err((-32601, message)) => error(StatusCode::NOT_FOUND, -32601, message, None),
        Err((code, message)) => error(StatusCode::OK, code, message, None),
    }
}

/// What the server tells clients about itself when not told otherwise.
const INSTRUCTIONS: &str = "Example server shipped with Gatehouse: try the echo and add tools.";

/// Serves MCP on stdin/stdout until stdin closes.
pub async fn run(opts: Options) -> std::io::Result<()> {
    let opts = Arc::new(opts);
    let (out_tx, mut out_rx) = mpsc::channel::<Value>(256);
    let writer = tokio::spawn(async move {
        let mut stdout = stdout();
        let mut lines = Vec::new();
        while let Some(v) = out_rx.recv().await {
            // What else is ready goes in the same write: one system call for a burst.
            let mut next = Some(v);
            while let Some(v) = next {
                if serde_json::to_writer(&mut lines, &v).is_err() {
                    return;
                }
                lines.push(b'\n');
                next = out_rx.try_recv().ok();
            }
            if stdout.write_all(&lines).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
            lines.clear();
        }
    });
    let pending: Pending = Arc::default();
    let running: Running = Arc::default();
    let mut lines = BufReader::new(stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            let _ = out_tx
                .send(json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}))
                .await;
            continue;
        };
        let id = msg.get("id").cloned();
        match (msg.get("method").and_then(Value::as_str), id) {
            (Some(method), Some(id)) => {
                let method = method.to_owned();
                let params = msg.get("params").cloned().unwrap_or(Value::Null);
                let out = out_tx.clone();
                let pending = pending.clone();
                let key = id.to_string();
                let running2 = running.clone();
                let opts = opts.clone();
                let task = tokio::spawn(async move {
                    let reply = match handle(&method, &params, &out, &pending, &opts).await {
                        Ok(result) => json!({"jsonrpc":"2.0","id":id,"result":result}),
                        Err((code, message)) => {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":code,"message":message}})
                        }
                    };
                    running2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id.to_string());
                    let _ = out.send(reply).await;
                });
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, task.abort_handle());
            }
            (Some("notifications/cancelled"), None) => {
                if let Some(rid) = msg.pointer("/params/requestId")
                    && let Some(t) = running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&rid.to_string())
                {
                    t.abort();
                }
            }
            (Some(_), None) => {}
            (None, Some(id)) => {
                if let Some(n) = id.as_u64()
                    && let Some(tx) = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&n)
                {
                    let _ = tx.send(msg);
                }
            }
            (None, None) => {}
        }
    }
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

/// Standard input, read as the runtime's other sockets are when it is a pipe (as it is under a
/// gateway): `tokio::io::stdin` hands every read to a blocking thread, a cross-thread round
/// trip per message. Anything else (a terminal, a file) is read that way still.
fn stdin() -> Box<dyn AsyncRead + Unpin + Send> {
    use std::os::fd::AsFd as _;
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok());
    match pipe {
        Some(pipe) => Box::new(pipe),
        None => Box::new(tokio::io::stdin()),
    }
}

/// Standard output, written without a blocking thread when it is a pipe (see [`stdin`]).
fn stdout() -> Box<dyn AsyncWrite + Unpin + Send> {
    use std::os::fd::AsFd as _;
    let pipe = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| tokio::net::unix::pipe::Sender::from_owned_fd(fd).ok());
    match pipe {
        Some(pipe) => Box::new(pipe),
        None => Box::new(tokio::io::stdout()),
    }
}

type Handled = Result<Value, (i64, String)>;

async fn handle(
    method: &str,
    params: &Value,
    out: &mpsc::Sender<Value>,
    pending: &Pending,
    opts: &Options,
) -> Handled {
    let name = &opts.name;
    match method {
        "initialize" => {
            let requested = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("2025-11-25");
            let version =
                if ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"].contains(&requested) {
                    requested
                } else {
                    "2025-11-25"
                };
            Ok(json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": true}, "prompts": {}, "resources": {"subscribe": true}, "logging": {}},
                "serverInfo": {"name": "gatehouse-example", "version": env!("CARGO_PKG_VERSION")},
                "instructions": opts.instructions.as_deref().unwrap_or(INSTRUCTIONS)
            }))
        }
        "ping" | "logging/setLevel" => Ok(json!({})),
        "tools/list" => {
            let mut all = tools(opts.test_tools);
            if let Some(d) = &opts.echo_description {
                all[0]["description"] = json!(d);
            }
            if opts.page_size == 0 {
                return Ok(json!({"tools": all}));
            }
            let start: usize = match params.get("cursor").and_then(Value::as_str) {
                Some(c) => c
                    .parse()
                    .map_err(|_| (-32602, "invalid cursor".to_owned()))?,
                None => 0,
            };
            let page: Vec<Value> = all
                .iter()
                .skip(start)
                .take(opts.page_size)
                .cloned()
                .collect();
            let end = start + page.len();
            let mut r = json!({"tools": page});
            if end < all.len() {
                r["nextCursor"] = json!(end.to_string());
            }
            Ok(r)
        }
        "tools/call" => call_tool(params, out, pending, opts).await,
        "prompts/list" => Ok(json!({"prompts": [{
            "name": "greeting",
            "description": "A friendly greeting for someone",
            "arguments": [{"name": "name", "description": "Who to greet", "required": true}]
        }]})),
        "prompts/get" => {
            if params.get("name").and_then(Value::as_str) != Some("greeting") {
                return Err((-32602, "unknown prompt".into()));
            }
            let name = params
                .pointer("/arguments/name")
                .and_then(Value::as_str)
                .unwrap_or("world");
            Ok(
                json!({"messages": [{"role": "user", "content": {"type": "text", "text": format!("Say hello to {name}.")}}]}),
            )
        }
        "resources/list" => Ok(json!({"resources": [{
            "uri": format!("example://{name}/readme"), "name": "readme", "mimeType": "text/plain",
            "description": "What this server is"
        }]})),
        "resources/templates/list" => Ok(json!({"resourceTemplates": [{
            "uriTemplate": format!("example://{name}/echo/{{text}}"), "name": "echo", "mimeType": "text/plain"
        }]})),
        "resources/read" => {
            let uri = params.get("uri").and_then(Value::as_str).unwrap_or("");
            let text = if uri == format!("example://{name}/readme") {
                "Gatehouse example server: tools echo and add, prompt greeting.".to_owned()
            } else if let Some(t) = uri.strip_prefix(&format!("example://{name}/echo/")) {
                t.to_owned()
            } else {
                return Err((-32002, format!("resource not found: {uri}")));
            };
            Ok(json!({"contents": [{"uri": uri, "mimeType": "text/plain", "text": text}]}))
        }
        // Watching is the client's business: `touch` announces an update either way.
        "resources/subscribe" | "resources/unsubscribe" => {
            let uri = params.get("uri").and_then(Value::as_str).unwrap_or("");
            if uri.starts_with(&format!("example://{name}/")) {
                Ok(json!({}))
            } else {
                Err((-32602, format!("no such resource: {uri}")))
            }
        }
        _ => Err((-32601, format!("method not found: {method}"))),
    }
}

fn tools(test_tools: bool) -> Vec<Value> {
    let mut t = vec![
        json!({"name": "echo", "description": "Returns its text",
               "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}),
        json!({"name": "add", "description": "Adds two numbers",
               "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}),
        json!({"name": "slow", "description": "Waits, reporting progress each step",
               "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number"}, "steps": {"type": "integer"}, "hold": {"type": "number", "description": "Seconds to wait after the last step"}}}}),
        json!({"name": "whoami", "description": "Returns this server's name",
               "inputSchema": {"type": "object"}}),
        json!({"name": "sample", "description": "Asks the client's model to answer a prompt (sampling)",
               "inputSchema": {"type": "object", "properties": {"prompt": {"type": "string"}, "delay": {"type": "number", "description": "Seconds to wait before asking"}}, "required": ["prompt"]}}),
    ];
    if test_tools {
        t.push(
            json!({"name": "crash", "description": "Exits the process mid-call",
                      "inputSchema": {"type": "object"}}),
        );
        t.push(
            json!({"name": "pid", "description": "Returns this process's id",
                      "inputSchema": {"type": "object"}}),
        );
        t.push(
            json!({"name": "log", "description": "Sends its text as a log message, then answers",
                      "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}}),
        );
        t.push(
            json!({"name": "fail", "description": "Answers a JSON-RPC error carrying its text",
                      "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}}),
        );
        t.push(
            json!({"name": "toggle", "description": "Adds (on) or removes the tool `extra`; announces it if `notify`",
                      "inputSchema": {"type": "object", "properties": {"on": {"type": "boolean"}, "notify": {"type": "boolean"}}}}),
        );
        t.push(
            json!({"name": "routed", "description": "Echoes its region, which clients mirror in the Mcp-Param-Region header",
                      "inputSchema": {"type": "object", "required": ["region"], "properties": {
                          "region": {"type": "string", "x-mcp-header": "Region"},
                          "count": {"type": "integer", "x-mcp-header": "Count"}}}}),
        );
        t.push(
            json!({"name": "touch", "description": "Announces that resource `uri` was updated",
                      "inputSchema": {"type": "object", "properties": {"uri": {"type": "string"}}}}),
        );
        if EXTRA.load(std::sync::atomic::Ordering::Relaxed) {
            t.push(
                json!({"name": "extra", "description": "Present while toggled on",
                          "inputSchema": {"type": "object"}}),
            );
        }
    }
    t
}

/// Whether the test tool `extra` is listed (see the `toggle` tool).
static EXTRA: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn text(s: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": s.into()}]})
}

async fn call_tool(
    params: &Value,
    out: &mpsc::Sender<Value>,
    pending: &Pending,
    opts: &Options,
) -> Handled {
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    match params.get("name").and_then(Value::as_str).unwrap_or("") {
        "echo" => Ok(text(args.get("text").and_then(Value::as_str).unwrap_or(""))),
        "add" => {
            let (Some(a), Some(b)) = (
                args.get("a").and_then(Value::as_f64),
                args.get("b").and_then(Value::as_f64),
            ) else {
                return Err((-32602, "a and b must be numbers".into()));
            };
            let mut r = text(format!("{}", a + b));
            r["structuredContent"] = json!({"sum": a + b});
            Ok(r)
        }
        "slow" => {
            let seconds = args
                .get("seconds")
                .and_then(Value::as_f64)
                .unwrap_or(1.0)
                .clamp(0.0, 600.0);
            let steps = args
                .get("steps")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 1000);
            let token = params.pointer("/_meta/progressToken").cloned();
            for i in 1..=steps {
                tokio::time::sleep(Duration::from_secs_f64(seconds / steps as f64)).await;
                if let Some(t) = &token {
                    let _ = out
                        .send(json!({"jsonrpc":"2.0","method":"notifications/progress",
                                     "params":{"progressToken":t,"progress":i,"total":steps}}))
                        .await;
                }
            }
            pause(&args, "hold").await;
            Ok(text(format!("done after {seconds}s")))
        }
        "sample" if out.is_closed() => {
            Err((-32603, "sampling needs the stdio transport".to_owned()))
        }
        "sample" => {
            let prompt = args
                .get("prompt")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            // A question asked a while into the call (tests: calls that overlap).
            pause(&args, "delay").await;
            let (tx, rx) = oneshot::channel();
            let id = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                let id = 1000 + p.len() as u64 + rand_suffix();
                p.insert(id, tx);
                id
            };
            let _ = out
                .send(json!({"jsonrpc":"2.0","id":id,"method":"sampling/createMessage","params":{
                    "messages":[{"role":"user","content":{"type":"text","text":prompt}}],"maxTokens":100}}))
                .await;
            let answer = rx
                .await
                .map_err(|_| (-32603, "no answer to sampling".to_owned()))?;
            if let Some(e) = answer.get("error") {
                return Err((-32603, format!("sampling failed: {e}")));
            }
            // Still working a while after the answer (tests: what the answer holds meanwhile).
            pause(&args, "after").await;
            let said = answer
                .pointer("/result/content/text")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok(text(format!("model said: {said}")))
        }
        "whoami" => Ok(text(opts.name.clone())),
        "crash" if opts.test_tools => std::process::exit(3),
        "pid" if opts.test_tools => Ok(text(std::process::id().to_string())),
        "log" if opts.test_tools => {
            let said = args.get("text").cloned().unwrap_or(json!(""));
            let _ = out
                .send(json!({"jsonrpc":"2.0","method":"notifications/message",
                             "params":{"level":"info","logger":"example","data":said}}))
                .await;
            Ok(text("logged"))
        }
        "toggle" if opts.test_tools => {
            let on = args.get("on").and_then(Value::as_bool).unwrap_or(false);
            EXTRA.store(on, std::sync::atomic::Ordering::Relaxed);
            if args.get("notify").and_then(Value::as_bool).unwrap_or(false) {
                let _ = out
                    .send(json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}))
                    .await;
            }
            Ok(text(if on { "on" } else { "off" }))
        }
        "routed" if opts.test_tools => Ok(text(
            args.get("region")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        )),
        "touch" if opts.test_tools => {
            let uri = args.get("uri").cloned().unwrap_or(json!(""));
            let _ = out
                .send(
                    json!({"jsonrpc":"2.0","method":"notifications/resources/updated",
                             "params":{"uri":uri}}),
                )
                .await;
            Ok(text("touched"))
        }
        "fail" if opts.test_tools => Err((
            -32000,
            args.get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        )),
        other => Ok(
            json!({"content":[{"type":"text","text":format!("unknown tool: {other}")}],"isError":true}),
        ),
    }
}

/// Waits the seconds argument `key` asks for (up to a minute), if any.
async fn pause(args: &Value, key: &str) {
    let seconds = args
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        .clamp(0.0, 60.0);
    if seconds > 0.0 {
        tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u64::from(u32::from_le_bytes(b))
}
