//! MCP methods: what the gateway answers itself, what it routes to one upstream, and what it fans
//! out to all of them and merges.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::OptionFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::mcp::jsonrpc::{self, Outcome, code};
use crate::mcp::policy::{self, Policy};
use crate::mcp::revision;
use crate::mcp::router::Router;
use crate::mcp::session::{Session, caps};
use crate::metrics::{Metrics, method_label};
use crate::plugins::{Decision, EntryKind, Plugins};
use crate::upstream::{CallOpts, UpstreamError, request_progress_token};

/// How a request is answered.
pub enum Reply {
    /// One JSON-RPC response.
    Json(Bytes),
    /// A refusal with its own HTTP status (the request was not forwarded).
    Refused(http::StatusCode, Bytes),
    /// An SSE stream of related messages ending with the response.
    Stream(mpsc::Receiver<Bytes>),
}

/// What the method handlers use of the gateway: its policy plugins and its metrics.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    /// The policy plugins (their current generation is taken per request).
    pub plugins: &'a Plugins,
    /// Request metrics.
    pub metrics: &'a Arc<Metrics>,
}

/// A params object parsed one level deep: values stay raw.
type Fields<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;

fn fields(params: Option<&[u8]>) -> Result<Fields<'_>, String> {
    match params {
        None => Ok(Fields::new()),
        Some(p) => serde_json::from_slice(p).map_err(|e| format!("params must be an object: {e}")),
    }
}

fn string_field(f: &Fields<'_>, key: &str) -> Result<String, String> {
    let raw = f.get(key).ok_or_else(|| format!("missing params.{key}"))?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| format!("params.{key} must be a string"))
}

fn encode_fields(f: &Fields<'_>) -> Bytes {
    Bytes::from(serde_json::to_vec(f).unwrap_or_else(|_| b"{}".to_vec()))
}

fn json_string(s: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()))
        .unwrap_or_else(|_| RawValue::from_string("\"\"".into()).expect("valid JSON"))
}

fn invalid_params(id: &[u8], msg: &str) -> Reply {
    Reply::Json(jsonrpc::error_response(Some(id), code::INVALID_PARAMS, msg))
}

/// What a client's `initialize` asks for, negotiated: the revision both speak, the params
/// each upstream is initialized with (the client's own capabilities), and whether the client
/// offers roots.
pub struct Negotiated {
    /// The protocol revision of the session.
    pub version: &'static str,
    /// `initialize` params for the upstreams.
    pub init_params: Bytes,
    /// The client offers `roots`.
    pub offers_roots: bool,
}

/// Reads a client's `initialize` params and picks the revision.
pub fn negotiate(params: Option<&[u8]>) -> Result<Negotiated, String> {
    let f = fields(params)?;
    let requested = string_field(&f, "protocolVersion")?;
    let version = revision::SUPPORTED
        .iter()
        .copied()
        .find(|v| *v == requested)
        .unwrap_or(revision::LATEST);
    let client_caps = f.get("capabilities").map_or("{}", |r| r.get());
    let client_info = f
        .get("clientInfo")
        .map_or(r#"{"name":"unknown","version":"0"}"#, |r| r.get());
    let init_params = Bytes::from(format!(
        r#"{{"protocolVersion":"{version}","capabilities":{client_caps},"clientInfo":{client_info}}}"#
    ));
    // A client that offers roots gets roots/list at any time, unrelated to a call: listen for it
    // upstream from the start instead of racing the client's own GET stream.
    let offers_roots = f
        .get("capabilities")
        .and_then(|c| serde_json::from_str::<Fields<'_>>(c.get()).ok())
        .is_some_and(|c| c.contains_key("roots"));
    Ok(Negotiated {
        version,
        init_params,
        offers_roots,
    })
}

/// Handles `initialize` of a new session: connects every upstream with the client's own
/// capabilities, and merges what they offer into the result.
pub async fn initialize(session: &Arc<Session>) -> Bytes {
    let results = futures_util::future::join_all(
        (0..session.topology().servers.len()).map(|i| session.connect(i)),
    )
    .await;

    let mut bits = 0u8;
    let mut instructions = String::new();
    for (i, r) in results.iter().enumerate() {
        let name = session.topology().router.name(i);
        match r {
            Ok(b) => {
                bits |= b;
                if let Some(text) = session.links()[i]
                    .init_result()
                    .as_deref()
                    .and_then(instructions_of)
                {
                    if !instructions.is_empty() {
                        instructions.push_str("\n\n");
                    }
                    if session.topology().router.prefixing() {
                        instructions.push_str(&format!("[{name}] "));
                    }
                    instructions.push_str(&text);
                }
            }
            Err(e) => {
                tracing::warn!(session = %session.id, upstream = name, "upstream unavailable at initialize: {e}")
            }
        }
    }
    if bits == 0 {
        // Nothing reachable yet: advertise the basics so the client still asks later.
        bits = caps::TOOLS | caps::PROMPTS | caps::RESOURCES;
    }
    let mut c = Vec::new();
    if bits & caps::TOOLS != 0 {
        c.push(r#""tools":{"listChanged":true}"#);
    }
    if bits & caps::PROMPTS != 0 {
        c.push(r#""prompts":{"listChanged":true}"#);
    }
    if bits & caps::RESOURCES != 0 {
        c.push(r#""resources":{"subscribe":true,"listChanged":true}"#);
    }
    if bits & caps::LOGGING != 0 {
        c.push(r#""logging":{}"#);
    }
    if bits & caps::COMPLETIONS != 0 {
        c.push(r#""completions":{}"#);
    }
    let mut result = format!(
        r#"{{"protocolVersion":"{}","capabilities":{{{}}},"serverInfo":{{"name":"gatehouse","title":"Gatehouse MCP gateway","version":"{}"}}"#,
        session.protocol_version,
        c.join(","),
        env!("CARGO_PKG_VERSION")
    );
    if !instructions.is_empty() {
        result.push_str(",\"instructions\":");
        result.push_str(json_string(&instructions).get());
    }
    result.push('}');
    Bytes::from(result)
}

fn instructions_of(init_result: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct R {
        instructions: Option<String>,
    }
    serde_json::from_slice::<R>(init_result)
        .ok()?
        .instructions
        .filter(|s| !s.is_empty())
}

/// Kinds of list that fan out to every upstream.
#[derive(Clone, Copy)]
struct ListKind {
    method: &'static str,
    key: &'static str,
    cap: u8,
    rename: bool,
}

const TOOLS: ListKind = ListKind {
    method: "tools/list",
    key: "tools",
    cap: caps::TOOLS,
    rename: true,
};
const PROMPTS: ListKind = ListKind {
    method: "prompts/list",
    key: "prompts",
    cap: caps::PROMPTS,
    rename: true,
};
const RESOURCES: ListKind = ListKind {
    method: "resources/list",
    key: "resources",
    cap: caps::RESOURCES,
    rename: false,
};
const TEMPLATES: ListKind = ListKind {
    method: "resources/templates/list",
    key: "resourceTemplates",
    cap: caps::RESOURCES,
    rename: false,
};

/// Handles one client request within a session.
pub async fn request(
    sv: Services<'_>,
    session: &Arc<Session>,
    id: Bytes,
    method: &str,
    params: Option<Bytes>,
) -> Reply {
    let started = Instant::now();
    let label = method_label(method);
    let plugins = sv.plugins.current();
    // One upstream, names unchanged and no plugins: forward everything untouched.
    let single = session.topology().servers.len() == 1 && !session.topology().router.prefixing();
    let direct = single && plugins.is_empty();
    let reply = match method {
        "ping" => Reply::Json(jsonrpc::response(
            &id,
            &Outcome::Result(Bytes::from_static(b"{}")),
        )),
        "tools/list" if !direct => list(sv, session, &id, TOOLS, params.as_deref()).await,
        "prompts/list" if !direct => list(sv, session, &id, PROMPTS, params.as_deref()).await,
        "resources/list" if !direct => list(sv, session, &id, RESOURCES, params.as_deref()).await,
        "resources/templates/list" if !direct => {
            list(sv, session, &id, TEMPLATES, params.as_deref()).await
        }
        "tools/call" | "prompts/get" if !direct => {
            let f = match fields(params.as_deref()) {
                Ok(f) => f,
                Err(e) => return invalid_params(&id, &e),
            };
            let name = match string_field(&f, "name") {
                Ok(n) => n,
                Err(e) => return invalid_params(&id, &e),
            };
            let what = if method == "tools/call" {
                "tool"
            } else {
                "prompt"
            };
            let Some((index, local)) = session.topology().router.resolve(&name) else {
                return invalid_params(&id, &format!("unknown {what}: {name}"));
            };
            let policy = Policy::for_call(
                &plugins,
                session,
                method,
                &session.topology().servers[index].name,
                Some(local),
            );
            let mut f = f;
            let local = json_string(local);
            f.insert(Cow::Borrowed("name"), &local);
            let rewritten;
            if let Some(p) = &policy {
                let arguments = f.get("arguments").map_or("{}", |a| a.get());
                match p.on_request(arguments).await {
                    Decision::Allow => {}
                    Decision::Deny(d) => return denied(&id, &d),
                    Decision::Rewrite(new) => match RawValue::from_string(new) {
                        Ok(raw) => {
                            rewritten = raw;
                            f.insert(Cow::Borrowed("arguments"), &rewritten);
                        }
                        Err(e) => {
                            return Reply::Json(jsonrpc::error_response(
                                Some(&id),
                                crate::plugins::PLUGIN_FAILED,
                                &format!("a plugin rewrote the arguments into invalid JSON: {e}"),
                            ));
                        }
                    },
                }
            }
            let out = encode_fields(&f);
            forward(sv, session, index, id, method, Some(out), policy).await
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" if !direct => {
            let uri = match fields(params.as_deref()).and_then(|f| string_field(&f, "uri")) {
                Ok(u) => u,
                Err(e) => return invalid_params(&id, &e),
            };
            let Some(index) = resource_owner(sv, session, &uri).await else {
                return invalid_params(&id, &format!("no upstream serves resource {uri}"));
            };
            let policy = Policy::for_call(
                &plugins,
                session,
                method,
                &session.topology().servers[index].name,
                Some(&uri),
            );
            if let Some(p) = &policy
                && let Decision::Deny(d) = p.on_request("{}").await
            {
                return denied(&id, &d);
            }
            forward(sv, session, index, id, method, params, policy).await
        }
        "completion/complete" if !direct => complete(sv, session, id, params).await,
        "logging/setLevel" if !single => {
            for (i, link) in session.links().iter().enumerate() {
                if session
                    .connect(i)
                    .await
                    .is_ok_and(|b| b & caps::LOGGING != 0)
                {
                    let _ = link
                        .call(method, params.as_deref(), CallOpts::default())
                        .await;
                }
            }
            Reply::Json(jsonrpc::response(
                &id,
                &Outcome::Result(Bytes::from_static(b"{}")),
            ))
        }
        // Pass-through to the one upstream. With plugins, every method still passes the chains
        // (on its params, and on its result or error).
        _ if single => {
            let policy = Policy::for_call(
                &plugins,
                session,
                method,
                &session.topology().servers[0].name,
                None,
            );
            if let Some(p) = &policy
                && let Decision::Deny(d) = p.on_request(params_text(params.as_deref())).await
            {
                return denied(&id, &d);
            }
            forward(sv, session, 0, id, method, params, policy).await
        }
        _ => Reply::Json(jsonrpc::error_response(
            Some(&id),
            code::METHOD_NOT_FOUND,
            &format!("method not found: {method}"),
        )),
    };
    if matches!(
        label,
        "ping"
            | "tools/list"
            | "prompts/list"
            | "resources/list"
            | "resources/templates/list"
            | "logging/setLevel"
    ) && !single
    {
        sv.metrics.record(label, "gateway", "ok", started.elapsed());
    }
    reply
}

/// Runs an upstream's answer (result or error) through the result chains: the frame for the
/// client and the metric outcome. A rewrite must keep the answer's shape (valid JSON for a
/// result, a JSON-RPC error object for an error).
async fn screen(policy: Option<&Policy>, id: &[u8], outcome: Outcome) -> (Bytes, &'static str) {
    let (raw, label) = match &outcome {
        Outcome::Result(r) => (r, "ok"),
        Outcome::Error(e) => (e, "error"),
    };
    match OptionFuture::from(policy.map(|p| p.on_response(raw))).await {
        None | Some(Ok(None)) => (jsonrpc::response(id, &outcome), label),
        Some(Ok(Some(new))) => {
            let (fits, rewritten, what) = match outcome {
                Outcome::Result(_) => (
                    serde_json::from_slice::<&RawValue>(&new).is_ok(),
                    Outcome::Result(new),
                    "a plugin rewrote the result into invalid JSON",
                ),
                Outcome::Error(_) => (
                    is_error_object(&new),
                    Outcome::Error(new),
                    "a plugin rewrote an error into something that is not a JSON-RPC error object",
                ),
            };
            if fits {
                (jsonrpc::response(id, &rewritten), label)
            } else {
                (
                    jsonrpc::error_response(Some(id), crate::plugins::PLUGIN_FAILED, what),
                    "denied",
                )
            }
        }
        Some(Err(d)) => (
            jsonrpc::error_response(Some(id), d.code, &d.to_string()),
            "denied",
        ),
    }
}

/// Whether `raw` is a JSON-RPC error object (`code` integer, `message` string).
fn is_error_object(raw: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct E<'a> {
        #[allow(dead_code)]
        code: i64,
        #[serde(borrow)]
        #[allow(dead_code)]
        message: Cow<'a, str>,
    }
    serde_json::from_slice::<E<'_>>(raw).is_ok()
}

/// Params as text for the plugins (`{}` when absent; frames were validated as JSON).
fn params_text(params: Option<&[u8]>) -> &str {
    params
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("{}")
}

fn denied(id: &[u8], d: &crate::plugins::Denied) -> Reply {
    Reply::Json(jsonrpc::error_response(Some(id), d.code, &d.to_string()))
}

/// The policy of a completion of the entry `name` on upstream `index`: denied when the caller
/// may not see it as any of `kinds`, or when the on-request chain refuses the `argument`.
async fn completion_policy(
    sv: Services<'_>,
    session: &Arc<Session>,
    index: usize,
    kinds: &[EntryKind],
    name: &str,
    f: &Fields<'_>,
) -> Result<Option<Policy>, crate::plugins::Denied> {
    let plugins = sv.plugins.current();
    let Some(policy) = Policy::for_call(
        &plugins,
        session,
        "completion/complete",
        &session.topology().servers[index].name,
        Some(name),
    ) else {
        return Ok(None);
    };
    for kind in kinds {
        if let Some(d) = policy.check_target(*kind, name).await {
            return Err(d);
        }
    }
    let argument = f.get("argument").map_or("{}", |a| a.get());
    match policy.on_request(argument).await {
        Decision::Deny(d) => Err(d),
        // A completion's argument is not rewritten: it is what the user is typing.
        Decision::Allow | Decision::Rewrite(_) => Ok(Some(policy)),
    }
}

/// Routes `completion/complete` by its `ref`: a prompt name or a resource URI.
async fn complete(
    sv: Services<'_>,
    session: &Arc<Session>,
    id: Bytes,
    params: Option<Bytes>,
) -> Reply {
    let f = match fields(params.as_deref()) {
        Ok(f) => f,
        Err(e) => return invalid_params(&id, &e),
    };
    let Some(r) = f.get("ref") else {
        return invalid_params(&id, "missing params.ref");
    };
    let mut rf: Fields<'_> = match serde_json::from_str(r.get()) {
        Ok(v) => v,
        Err(_) => return invalid_params(&id, "params.ref must be an object"),
    };
    let kind = string_field(&rf, "type").unwrap_or_default();
    match kind.as_str() {
        "ref/prompt" => {
            let name = match string_field(&rf, "name") {
                Ok(n) => n,
                Err(_) => return invalid_params(&id, "missing params.ref.name"),
            };
            let Some((index, local)) = session.topology().router.resolve(&name) else {
                return invalid_params(&id, &format!("unknown prompt: {name}"));
            };
            let policy = match completion_policy(
                sv,
                session,
                index,
                &[EntryKind::Prompt],
                local,
                &f,
            )
            .await
            {
                Ok(p) => p,
                Err(d) => return denied(&id, &d),
            };
            let local = json_string(local);
            rf.insert(Cow::Borrowed("name"), &local);
            let new_ref =
                RawValue::from_string(String::from_utf8_lossy(&encode_fields(&rf)).into_owned())
                    .expect("re-encoded object is valid JSON");
            let mut f = f.clone();
            f.insert(Cow::Borrowed("ref"), &new_ref);
            let out = encode_fields(&f);
            forward(
                sv,
                session,
                index,
                id,
                "completion/complete",
                Some(out),
                policy,
            )
            .await
        }
        "ref/resource" => {
            let uri = string_field(&rf, "uri").unwrap_or_default();
            let Some(index) = resource_owner(sv, session, &uri).await else {
                return invalid_params(&id, &format!("no upstream serves resource {uri}"));
            };
            // A template URI, or a resource's own: hidden as either, it cannot be completed.
            let kinds = [EntryKind::ResourceTemplate, EntryKind::Resource];
            match completion_policy(sv, session, index, &kinds, &uri, &f).await {
                Ok(policy) => {
                    forward(
                        sv,
                        session,
                        index,
                        id,
                        "completion/complete",
                        params,
                        policy,
                    )
                    .await
                }
                Err(d) => denied(&id, &d),
            }
        }
        _ => invalid_params(&id, "params.ref.type must be ref/prompt or ref/resource"),
    }
}

/// Finds the upstream of a resource URI, refreshing the resource lists once if it is unknown.
async fn resource_owner(sv: Services<'_>, session: &Arc<Session>, uri: &str) -> Option<usize> {
    if let Some(i) = session.topology().router.resource(uri) {
        return Some(i);
    }
    for kind in [RESOURCES, TEMPLATES] {
        let mut cursor: Option<String> = None;
        for _ in 0..20 {
            let params = cursor
                .as_ref()
                .map(|c| format!("{{\"cursor\":{}}}", json_string(c).get()));
            let Reply::Json(page) = list(
                sv,
                session,
                b"0",
                kind,
                params.as_deref().map(str::as_bytes),
            )
            .await
            else {
                break;
            };
            #[derive(Deserialize)]
            struct Page {
                result: Option<Next>,
            }
            #[derive(Deserialize)]
            struct Next {
                #[serde(rename = "nextCursor")]
                next: Option<String>,
            }
            cursor = serde_json::from_slice::<Page>(&page)
                .ok()
                .and_then(|p| p.result?.next);
            if cursor.is_none() {
                break;
            }
        }
        if let Some(i) = session.topology().router.resource(uri) {
            return Some(i);
        }
    }
    None
}

/// Sends a request to one upstream. Answers with plain JSON when the upstream sends nothing else
/// first; switches to SSE as soon as a related message (progress, sampling, logging) arrives.
async fn forward(
    sv: Services<'_>,
    session: &Arc<Session>,
    index: usize,
    id: Bytes,
    method: &str,
    params: Option<Bytes>,
    policy: Option<Policy>,
) -> Reply {
    let label = method_label(method);
    let started = Instant::now();
    let server = session.topology().servers[index].clone();
    let (ev_tx, mut ev_rx) = mpsc::channel::<Bytes>(64);
    let mut inflight = match session.track(id.clone()) {
        Ok(t) => t,
        Err(busy) => {
            return Reply::Refused(
                http::StatusCode::TOO_MANY_REQUESTS,
                jsonrpc::error_response(Some(&id), code::TOO_BUSY, &busy.to_string()),
            );
        }
    };
    let opts = CallOpts {
        events: Some(ev_tx),
        cancel: inflight.cancelled.take(),
        progress_token: params.as_deref().and_then(request_progress_token),
        ..CallOpts::default()
    };
    let metrics = sv.metrics.clone();
    let session2 = session.clone();
    let method = method.to_owned();
    let call = async move {
        let result = session2.links()[index]
            .call(&method, params.as_deref(), opts)
            .await;
        drop(inflight);
        let (frame, outcome) = match result {
            // Error messages pass the result chains too: a redaction must not be bypassed by
            // a server that puts the data in an error.
            Ok(outcome) => screen(policy.as_ref(), &id, outcome).await,
            Err(e) => {
                if !matches!(e, UpstreamError::Cancelled) {
                    tracing::warn!(upstream = %server.name, method = %method, "call failed: {e}");
                }
                (
                    jsonrpc::error_response(Some(&id), e.code(), &e.to_string()),
                    "failed",
                )
            }
        };
        metrics.record(label, server.label, outcome, started.elapsed());
        frame
    };
    let mut call = Box::pin(call);
    tokio::select! {
        biased;
        Some(first) = ev_rx.recv() => {
            let (tx, rx) = mpsc::channel::<Bytes>(64);
            let mut ended = Box::pin(session.ended());
            tokio::spawn(async move {
                if tx.send(first).await.is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        biased;
                        // The session ended: dropping `call` cancels upstream, dropping `tx`
                        // ends the client's stream.
                        _ = &mut ended => return,
                        Some(ev) = ev_rx.recv() => {
                            // A client that stops reading must not keep the task past its
                            // session's end.
                            tokio::select! {
                                sent = tx.send(ev) => if sent.is_err() {
                                    return; // client went away: dropping `call` cancels upstream
                                },
                                _ = &mut ended => return,
                            }
                        }
                        frame = &mut call => {
                            while let Ok(ev) = ev_rx.try_recv() {
                                let _ = tx.send(ev).await;
                            }
                            let _ = tx.send(frame).await;
                            return;
                        }
                    }
                }
            });
            Reply::Stream(rx)
        }
        frame = &mut call => Reply::Json(frame),
    }
}

/// Fans a list out to every upstream that has the capability and merges the pages.
///
/// The cursor handed to the client encodes each upstream's own cursor, so pagination resumes only
/// the upstreams that have more.
async fn list(
    sv: Services<'_>,
    session: &Arc<Session>,
    id: &[u8],
    kind: ListKind,
    params: Option<&[u8]>,
) -> Reply {
    let f = match fields(params) {
        Ok(f) => f,
        Err(e) => return invalid_params(id, &e),
    };
    let targets: Vec<(usize, Option<String>)> = match f
        .get("cursor")
        .map(|c| serde_json::from_str::<Option<String>>(c.get()))
    {
        None | Some(Ok(None)) => (0..session.topology().servers.len())
            .map(|i| (i, None))
            .collect(),
        Some(Ok(Some(c))) => match decode_cursor(&session.topology().router, &c) {
            Some(t) => t,
            None => return invalid_params(id, "invalid cursor"),
        },
        Some(Err(_)) => return invalid_params(id, "params.cursor must be a string"),
    };
    let calls = targets.iter().map(|(i, cursor)| {
        let i = *i;
        let p = cursor
            .as_ref()
            .map(|c| format!("{{\"cursor\":{}}}", json_string(c).get()));
        async move {
            let bits = session.connect(i).await?;
            if bits & kind.cap == 0 {
                return Ok(None);
            }
            let started = Instant::now();
            let r = session.links()[i]
                .call(
                    kind.method,
                    p.as_deref().map(str::as_bytes),
                    CallOpts::default(),
                )
                .await;
            let outcome = match &r {
                Ok(Outcome::Result(_)) => "ok",
                Ok(Outcome::Error(_)) => "error",
                Err(_) => "failed",
            };
            sv.metrics.record(
                kind.method,
                session.topology().servers[i].label,
                outcome,
                started.elapsed(),
            );
            r.map(Some)
        }
    });
    let results = futures_util::future::join_all(calls).await;

    let mut items = BytesMut::with_capacity(4096);
    let mut next: Vec<(String, String)> = Vec::new();
    let mut failures = Vec::new();
    let mut answered = 0usize;
    for ((index, _), r) in targets.iter().zip(results) {
        let name = session.topology().router.name(*index);
        let page = match r {
            Ok(None) => {
                answered += 1;
                continue;
            }
            Ok(Some(Outcome::Result(page))) => page,
            Ok(Some(Outcome::Error(e))) => {
                tracing::warn!(
                    upstream = name,
                    method = kind.method,
                    "list failed: {}",
                    String::from_utf8_lossy(&e)
                );
                failures.push(format!("{name}: {}", String::from_utf8_lossy(&e)));
                continue;
            }
            Err(e) => {
                tracing::warn!(upstream = name, method = kind.method, "list failed: {e}");
                failures.push(e.to_string());
                continue;
            }
        };
        match merge_page(sv, session, *index, kind, &page, &mut items).await {
            Ok(cursor) => {
                answered += 1;
                if let Some(c) = cursor {
                    next.push((name.to_owned(), c));
                }
            }
            Err(e) => {
                tracing::warn!(
                    upstream = name,
                    method = kind.method,
                    "malformed list result: {e}"
                );
                failures.push(format!("{name}: malformed result"));
            }
        }
    }
    if answered == 0 && !failures.is_empty() {
        return Reply::Json(jsonrpc::error_response(
            Some(id),
            code::UPSTREAM_UNAVAILABLE,
            &format!(
                "no upstream answered {}: {}",
                kind.method,
                failures.join("; ")
            ),
        ));
    }
    let mut out = BytesMut::with_capacity(items.len() + 64);
    out.put_slice(b"{\"");
    out.put_slice(kind.key.as_bytes());
    out.put_slice(b"\":[");
    out.put_slice(&items);
    out.put_u8(b']');
    if !next.is_empty() {
        out.put_slice(b",\"nextCursor\":");
        out.put_slice(json_string(&encode_cursor(&next)).get().as_bytes());
    }
    out.put_u8(b'}');
    Reply::Json(jsonrpc::response(id, &Outcome::Result(out.freeze())))
}

/// Appends one upstream's page to `items`, hiding what the filter-list plugins hide.
async fn merge_page(
    sv: Services<'_>,
    session: &Session,
    index: usize,
    kind: ListKind,
    page: &[u8],
    items: &mut BytesMut,
) -> Result<Option<String>, String> {
    let f: Fields<'_> = serde_json::from_slice(page).map_err(|e| e.to_string())?;
    let list: Vec<&RawValue> = match f.get(kind.key) {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let plugins = sv.plugins.current();
    let shown = if plugins.is_empty() {
        None
    } else {
        let server = &session.topology().servers[index].name;
        Some(
            policy::visible(&plugins, session, kind.method, server, &list)
                .await
                .map_err(|d| d.to_string())?,
        )
    };
    for (i, item) in list.into_iter().enumerate() {
        let mut entry: Fields<'_> = serde_json::from_str(item.get()).map_err(|e| e.to_string())?;
        let bytes = match kind.key {
            "resources" => {
                if let Ok(uri) = string_field(&entry, "uri") {
                    session.topology().router.learn_resource(&uri, index);
                }
                Bytes::copy_from_slice(item.get().as_bytes())
            }
            "resourceTemplates" => {
                if let Ok(t) = string_field(&entry, "uriTemplate") {
                    session.topology().router.learn_template(&t, index);
                }
                Bytes::copy_from_slice(item.get().as_bytes())
            }
            _ if kind.rename && session.topology().router.prefixing() => {
                let name = string_field(&entry, "name")?;
                let public = json_string(&session.topology().router.public_name(index, &name));
                entry.insert(Cow::Borrowed("name"), &public);
                encode_fields(&entry)
            }
            _ => Bytes::copy_from_slice(item.get().as_bytes()),
        };
        if shown
            .as_ref()
            .is_some_and(|v| !v.get(i).copied().unwrap_or(false))
        {
            continue;
        }
        if !items.is_empty() {
            items.put_u8(b',');
        }
        items.put_slice(&bytes);
    }
    match f.get("nextCursor") {
        Some(c) => match serde_json::from_str::<Option<String>>(c.get()) {
            // Carried inside the gateway's own cursor: keep the one the client sees small.
            Ok(Some(c)) if c.len() > MAX_UPSTREAM_CURSOR => Err(format!(
                "nextCursor of {} bytes (at most {MAX_UPSTREAM_CURSOR})",
                c.len()
            )),
            other => other.map_err(|e| e.to_string()),
        },
        None => Ok(None),
    }
}

/// Longest cursor accepted from an upstream.
const MAX_UPSTREAM_CURSOR: usize = 4096;

/// Encodes each upstream's next cursor (by upstream name) into the one cursor a client sees.
pub fn encode_cursor(next: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &str> = next.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&map).unwrap_or_default())
}

/// Decodes a client's cursor into (upstream index, upstream cursor); `None` if it is not one we issued.
pub fn decode_cursor(router: &Router, cursor: &str) -> Option<Vec<(usize, Option<String>)>> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let map: BTreeMap<String, String> = serde_json::from_slice(&raw).ok()?;
    if map.is_empty() {
        return None;
    }
    map.into_iter()
        .map(|(name, c)| Some((router.index_of(&name)?, Some(c))))
        .collect()
}
