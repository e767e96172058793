//! MCP methods: what the gateway answers itself, what it routes to one upstream
//! ([`forward`]), and what it fans out to all of them and merges ([`aggregate`]).
//! `initialize` is in [`initialize`].

mod aggregate;
mod call_params;
mod forward;
mod initialize;

pub use initialize::{Negotiated, Offer, SERVER_INFO, initialize, negotiate, offer};

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::body::send_to_reader;
use crate::mcp::jsonrpc::{self, Outcome, code};
use crate::mcp::policy::Policy;
use crate::mcp::router::MAX_LEARNED_URI;
use crate::mcp::session::{Session, TooBusy, caps};
use crate::metrics::{Metrics, method_label};
use crate::plugins::{Decision, EntryKind, JsonText, Plugins};
use crate::trace::SpanKind;
use crate::upstream::CallOpts;
use crate::upstream::event_sink::CallEvents;
use call_params::CallParams;

/// How a request is answered.
pub enum Reply {
    /// One JSON-RPC response.
    Json(Bytes),
    /// A refusal with its own HTTP status (the request was not forwarded).
    Refused(http::StatusCode, Bytes),
    /// An SSE stream of related messages ending with the response.
    Stream(mpsc::Receiver<Bytes>),
}

/// Frames a call's queue holds for its client before more are dropped (as a stream's would be).
pub(crate) const CALL_QUEUE: usize = 64;

/// How long a call's answer waits, once it has come, for its server's earlier messages still
/// in the session's policy stage; past it the answer goes, and they are dropped.
const HELD_MESSAGES_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers with the call's frame as JSON when it comes before any related message (and none
/// is on its way through the policy stage), or else as an SSE stream of the related messages
/// ending with the call's frame.
///
/// The stream's task ends when `ended` resolves (the session is over) or the stream's reader
/// is gone; either way dropping `call` cancels it upstream.
///
/// `call` comes boxed: an upstream call's future is kilobytes, and held inline it would make
/// every future around it as large, each move of them a copy of it.
pub(crate) async fn json_or_stream(
    mut call: std::pin::Pin<Box<impl Future<Output = Bytes> + Send + 'static>>,
    mut events: CallEvents,
    ended: impl Future<Output = ()> + Send + 'static,
) -> Reply {
    // A message the server sent before its answer may still be in the policy stage when the
    // answer comes: it is waited for (a while: the stage is the session's, and other servers'
    // messages may be ahead of it), and the answer is then a stream that carries it first.
    let (first, answer) = tokio::select! {
        biased;
        first = events.recv() => (first, None),
        frame = &mut call => {
            if events.is_settled() {
                return Reply::Json(frame);
            }
            let held = tokio::time::timeout(HELD_MESSAGES_WAIT, events.recv_or_settled());
            match held.await {
                Ok(Some(first)) => (first, Some(frame)),
                Ok(None) | Err(_) => return Reply::Json(frame),
            }
        },
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut ended = Box::pin(ended);
    tokio::spawn(async move {
        if !send_to_reader(&tx, first).await {
            return;
        }
        let frame = match answer {
            Some(frame) => frame,
            None => loop {
                tokio::select! {
                    biased;
                    _ = &mut ended => return,
                    // Nobody can hear the rest (a stateless call abandoned while parked, a
                    // client gone from a stream that cannot be resumed): the call ends now,
                    // not at its next message.
                    _ = tx.closed() => return,
                    ev = events.recv() => {
                        // A client that stops reading must not keep the task past the
                        // session's end, nor the call past its deadline: the call is still
                        // polled meanwhile.
                        let send = send_to_reader(&tx, ev);
                        tokio::pin!(send);
                        tokio::select! {
                            sent = &mut send => if !sent {
                                return; // the client went away, or stopped reading
                            },
                            _ = &mut ended => return,
                            frame = &mut call => {
                                // The message still goes before the answer.
                                tokio::select! {
                                    sent = &mut send => if !sent {
                                        return;
                                    },
                                    _ = &mut ended => return,
                                }
                                break frame;
                            }
                        }
                    }
                    frame = &mut call => break frame,
                }
            },
        };
        // What came before the answer (some perhaps still in the policy stage, waited for a
        // while), then the answer.
        let held = tokio::time::sleep(HELD_MESSAGES_WAIT);
        tokio::pin!(held);
        loop {
            tokio::select! {
                biased;
                _ = &mut ended => return,
                _ = tx.closed() => return,
                ev = events.recv_or_settled() => match ev {
                    Some(ev) => if !send_to_reader(&tx, ev).await {
                        return;
                    },
                    None => break,
                },
                _ = &mut held => break,
            }
        }
        send_to_reader(&tx, frame).await;
    });
    Reply::Stream(rx)
}

/// The refusal of a request past the session's bound on requests in flight (429).
fn too_busy(id: &[u8], busy: TooBusy) -> Reply {
    Reply::Refused(
        http::StatusCode::TOO_MANY_REQUESTS,
        jsonrpc::error_response(Some(id), code::TOO_BUSY, &busy.to_string()),
    )
}

/// What the method handlers use of the gateway (its policy plugins and its metrics), and of a
/// 2026-07-28 request its envelope.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    /// The policy plugins (their current generation is taken per request).
    pub plugins: &'a Plugins,
    /// Request metrics.
    pub metrics: &'a Arc<Metrics>,
    /// The audit trail.
    pub audit: &'a Arc<crate::audit::Audit>,
    /// Approved tool definitions, when pinning is on.
    pub pins: Option<&'a Arc<crate::pins::Pins>>,
    /// A 2026-07-28 client's envelope (the `_meta` members the stateless front took out of
    /// its params): what a 2026-07-28 server is sent on its behalf.
    pub envelope: Option<&'a crate::upstream::ClientEnvelope>,
    /// The request's span, when it is traced.
    pub trace: Option<&'a crate::trace::Span>,
    /// The mark a stateless call's upstream call is given while it waits for its client.
    pub awaiting: Option<&'a crate::upstream::AwaitingClient>,
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

/// The length of the URI a subscription names (0 when it names none: refused further on).
fn subscribed_uri_len(params: Option<&[u8]>) -> usize {
    fields(params)
        .ok()
        .and_then(|f| string_field(&f, "uri").ok())
        .map_or(0, |uri| uri.len())
}

fn invalid_params(id: &[u8], msg: &str) -> Reply {
    Reply::Json(jsonrpc::error_response(Some(id), code::INVALID_PARAMS, msg))
}

fn denied(id: &[u8], d: &crate::plugins::Denied) -> Reply {
    Reply::Json(jsonrpc::error_response(Some(id), d.code, &d.to_string()))
}

/// The params of `logging/setLevel` are `{"level": L}` with L one of the revision's levels (and
/// whatever else the client adds): else why not.
fn log_level(params: Option<&[u8]>) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Params<'a> {
        #[serde(borrow)]
        level: std::borrow::Cow<'a, str>,
    }
    let levels = crate::mcp::revision::LOG_LEVELS;
    // An object: serde would read a struct from an array too.
    let object = params.filter(|p| p.trim_ascii_start().starts_with(b"{"));
    match object.map(serde_json::from_slice::<Params<'_>>) {
        Some(Ok(p)) if levels.contains(&&*p.level) => Ok(()),
        _ => Err(format!("params.level must be one of {}", levels.join(", "))),
    }
}

/// Records in the audit trail that `server` took a request of the session's client that no
/// call of its carried (a level set for every server).
fn audit_told(sv: Services<'_>, session: &Session, server: &Arc<str>, method: &str) {
    if sv.audit.is_on() {
        sv.audit.record(crate::audit::Event {
            kind: "call",
            principal: session.principal.as_deref(),
            session: Some(crate::audit::SessionName::new(&session.id)),
            profile: session.profile().map(|p| &*p.name),
            server: Some(server),
            method,
            decision: "allowed",
            ..Default::default()
        });
    }
}

/// The answer to a request whose server failed before it was sent (its code, as a call's).
fn upstream_failed(id: &[u8], e: &crate::upstream::UpstreamError) -> Reply {
    Reply::Json(jsonrpc::error_response(Some(id), e.code(), &e.to_string()))
}

/// Runs an upstream's answer (result or error) through the result chains: the frame for the
/// client and the metric outcome. A rewrite must keep the answer's shape (valid JSON for a
/// result, a JSON-RPC error object for an error).
async fn screen(
    policy: Option<&Policy>,
    trace: Option<&crate::trace::SpanParent>,
    id: &[u8],
    outcome: Outcome,
) -> (Bytes, &'static str) {
    let (raw, label) = match &outcome {
        Outcome::Result(r) => (r, "ok"),
        Outcome::Error(e) => (e, "error"),
    };
    let screened = async {
        let p = policy?;
        let mut span = trace.map(|t| t.child("policy on-response", SpanKind::Internal));
        let decided = p.on_response(raw).await;
        if let Some(span) = &mut span {
            let decision = match &decided {
                Ok(None) => Decision::Allow,
                Ok(Some(_)) => Decision::Rewrite(String::new()),
                Err(d) => Decision::Deny(d.clone()),
            };
            trace_decision(span, &decision);
        }
        Some(decided)
    };
    match screened.await {
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

/// Runs the on-request chains, in a child span of the request's when it is traced.
async fn on_request(sv: Services<'_>, policy: &Policy, arguments: &JsonText) -> Decision {
    traced(sv, policy.on_request(arguments)).await
}

/// [`on_request`] over params the gateway sends as they are: a rewrite is refused.
async fn on_request_as_is(sv: Services<'_>, policy: &Policy, params: &JsonText) -> Decision {
    traced(sv, policy.on_request_as_is(params)).await
}

/// A policy decision, in a span of its own when the request is traced.
async fn traced(sv: Services<'_>, decide: impl std::future::Future<Output = Decision>) -> Decision {
    let Some(parent) = sv.trace else {
        return decide.await;
    };
    let mut span = parent.child("policy on-request", SpanKind::Internal);
    let decision = decide.await;
    trace_decision(&mut span, &decision);
    decision
}

/// A policy span's outcome: the decision, and for a denial the plugin and its reason.
fn trace_decision(span: &mut crate::trace::Span, decision: &Decision) {
    let (what, denial) = match decision {
        Decision::Allow => ("allow", None),
        Decision::Rewrite(_) => ("rewrite", None),
        Decision::Deny(d) => ("deny", Some(d)),
    };
    span.attr("gatehouse.policy.decision", what);
    if let Some(d) = denial {
        span.attr("gatehouse.policy.plugin", d.plugin.to_string());
        span.fail(d.to_string());
    }
}

/// Params as text for the plugins (`{}` when absent; frames were validated as JSON).
fn params_text(params: Option<&Bytes>) -> JsonText {
    params.map_or(JsonText::EMPTY_OBJECT, JsonText::from_utf8)
}

/// Handles one client request within a session.
pub async fn request(
    sv: Services<'_>,
    session: &Arc<Session>,
    id: Bytes,
    method: &str,
    params: Option<Bytes>,
) -> Reply {
    let label = method_label(method);
    let plugins = sv.plugins.current();
    // One upstream, names unchanged and no plugins: forward everything untouched.
    // (A profile's session sees only part of the servers: always through the table.)
    let single = session.topology().servers.len() == 1
        && !session.topology().router.prefixing()
        && session.profile().is_none();
    // What the gateway answers itself is timed here; a forwarded call, where it is forwarded
    // (no clock read for it here).
    let answered_here = !single
        && matches!(
            label,
            "ping"
                | "tools/list"
                | "prompts/list"
                | "resources/list"
                | "resources/templates/list"
                | "logging/setLevel"
        );
    let started = answered_here.then(Instant::now);
    // (With pinning on, tools are checked by name: through the table too. A server that may
    // sleep is listed through it too: from what it last listed, while it sleeps.)
    let direct = single && plugins.is_empty() && sv.pins.is_none() && !session.may_sleep(0);
    // What asks every upstream counts against the session's bound as a forwarded call does.
    let fans_out = match method {
        "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" => !direct,
        "logging/setLevel" => !single,
        _ => false,
    };
    let _inflight = if fans_out {
        match session.count() {
            Ok(t) => Some(t),
            Err(busy) => return too_busy(&id, busy),
        }
    } else {
        None
    };
    let reply = match method {
        // A subscription is kept for the session's life (to subscribe again on a new
        // connection), so its URI is bounded as the URIs learnt from servers are.
        "resources/subscribe" | "resources/unsubscribe"
            if subscribed_uri_len(params.as_deref()) > MAX_LEARNED_URI =>
        {
            invalid_params(
                &id,
                &format!("params.uri must be at most {MAX_LEARNED_URI} bytes"),
            )
        }
        "ping" => Reply::Json(jsonrpc::response(
            &id,
            &Outcome::Result(Bytes::from_static(b"{}")),
        )),
        "tools/list" if !direct => {
            aggregate::list(sv, session, &id, aggregate::TOOLS, params.as_deref(), false).await
        }
        "prompts/list" if !direct => {
            aggregate::list(
                sv,
                session,
                &id,
                aggregate::PROMPTS,
                params.as_deref(),
                false,
            )
            .await
        }
        "resources/list" if !direct => {
            aggregate::list(
                sv,
                session,
                &id,
                aggregate::RESOURCES,
                params.as_deref(),
                false,
            )
            .await
        }
        "resources/templates/list" if !direct => {
            aggregate::list(
                sv,
                session,
                &id,
                aggregate::TEMPLATES,
                params.as_deref(),
                false,
            )
            .await
        }
        "tools/call" | "prompts/get" if !direct => {
            let Some(params) = params else {
                return invalid_params(&id, "missing params.name");
            };
            let call = match CallParams::read(Some(&params)) {
                Ok(c) => c,
                Err(e) => return invalid_params(&id, &e),
            };
            let name = match call.name() {
                Ok(n) => n,
                Err(e) => return invalid_params(&id, &e),
            };
            let what = if method == "tools/call" {
                "tool"
            } else {
                "prompt"
            };
            let resolved = if method == "tools/call" {
                session.resolve_tool(&name)
            } else {
                session.resolve_prompt(&name)
            };
            let Some((index, local)) = resolved else {
                return invalid_params(&id, &format!("unknown {what}: {name}"));
            };
            // With pinning on, the tool's definition is checked in `forward`: reading the
            // list may wake a sleeping server, which a client that asked for progress hears of.
            let mut policy = Policy::for_call(
                &plugins,
                Some(sv.audit),
                session.caller(),
                method,
                &session.topology().servers[index].name,
                Some(local),
            );
            // A task's result comes back to `tasks/result`, a request that names neither
            // the tool nor the call: the result chains this call selected would never screen
            // it (a redaction walked around). Refused while plugins judge the call.
            if policy.is_some() && call.is_task() {
                return invalid_params(
                    &id,
                    "params.task: a call run as a task would bring its result back past the \
                     gateway's result policy (to tasks/result); call it without task",
                );
            }
            if let Some(p) = &mut policy {
                let kind = if method == "tools/call" {
                    EntryKind::Tool
                } else {
                    EntryKind::Prompt
                };
                if let Err(e) = p.learn_target(session, index, &[kind]).await {
                    return upstream_failed(&id, &e);
                }
            }
            let mut rewritten = None;
            if let Some(p) = &policy {
                // Two keys a lenient server reads as one: the plugins would judge one value and
                // the server might act on the other.
                match crate::mcp::lookalike::keys_read_as_one(call.arguments()) {
                    Ok(None) => {}
                    Ok(Some((first, second))) => {
                        return invalid_params(
                            &id,
                            &format!(
                                "params.arguments has the keys {:?} and {:?} in one object, which lenient servers read as one key: the gateway's policy cannot tell which one a server would act on",
                                crate::mcp::lookalike::shown(&first),
                                crate::mcp::lookalike::shown(&second)
                            ),
                        );
                    }
                    // Arguments its keys cannot be read from (a lone surrogate, a number past
                    // what a double holds) are not judged on a guess: refused.
                    Err(e) => {
                        return invalid_params(
                            &id,
                            &format!("params.arguments cannot be read to be judged: {e}"),
                        );
                    }
                }
                match on_request(sv, p, &JsonText::within(&params, call.arguments())).await {
                    Decision::Allow => {}
                    Decision::Deny(d) => return denied(&id, &d),
                    Decision::Rewrite(new) => match RawValue::from_string(new) {
                        Ok(raw) => rewritten = Some(raw),
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
            let renamed = (local != name).then_some(local);
            let out = call.splice(&params, renamed, rewritten.as_deref());
            let target = Some(local);
            forward::forward(sv, session, index, id, method, Some(out), policy, target).await
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" if !direct => {
            // The URI is routed, checked and audited as read here; the params go as sent.
            let checked = params.as_deref().map_or(Ok(()), |p| {
                crate::mcp::lookalike::check_members(p, &["uri", "_meta"], "params")
            });
            let uri = match checked
                .and_then(|()| fields(params.as_deref()))
                .and_then(|f| string_field(&f, "uri"))
            {
                Ok(u) => u,
                Err(e) => return invalid_params(&id, &e),
            };
            let index = match forward::resource_owner(sv, session, &uri).await {
                Ok(i) => i,
                Err(e) => return invalid_params(&id, &e),
            };
            let mut policy = Policy::for_call(
                &plugins,
                Some(sv.audit),
                session.caller(),
                method,
                &session.topology().servers[index].name,
                Some(&uri),
            );
            if let Some(p) = &mut policy
                && let Err(e) = p.learn_target(session, index, &[EntryKind::Resource]).await
            {
                return upstream_failed(&id, &e);
            }
            if let Some(p) = &policy
                && let Decision::Deny(d) =
                    on_request_as_is(sv, p, &params_text(params.as_ref())).await
            {
                return denied(&id, &d);
            }
            let target = Some(uri.as_str());
            forward::forward(sv, session, index, id, method, params, policy, target).await
        }
        "completion/complete" if !direct => {
            Box::pin(forward::complete(sv, session, id, params)).await
        }
        "logging/setLevel" if !single => {
            // Sent on to every server as it came: it must be what the method takes.
            if let Err(why) = log_level(params.as_deref()) {
                return Reply::Json(jsonrpc::error_response(
                    Some(&id),
                    code::INVALID_PARAMS,
                    &why,
                ));
            }
            // The chains judge it for each server, as they do with one server: a denial for any
            // answers the request, and no server is told.
            let servers = session.topology().servers.clone();
            let text = params_text(params.as_ref());
            let mut told = Vec::new();
            for (i, link) in session.links().iter().enumerate() {
                // A sleeping server is not woken to set a level it forgets with its process.
                if !session.serves(i) || session.resting(i).is_some() {
                    continue;
                }
                let policy = Policy::for_call(
                    &plugins,
                    Some(sv.audit),
                    session.caller(),
                    method,
                    &servers[i].name,
                    None,
                );
                if let Some(p) = &policy
                    && let Decision::Deny(d) = on_request_as_is(sv, p, &text).await
                {
                    return denied(&id, &d);
                }
                told.push((i, link));
            }
            for (i, link) in told {
                if session
                    .connect(i)
                    .await
                    .is_ok_and(|b| b & caps::LOGGING != 0)
                    && let Ok(Outcome::Result(_)) = link
                        .call(method, params.as_deref(), CallOpts::default())
                        .await
                {
                    audit_told(sv, session, &servers[i].name, method);
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
                Some(sv.audit),
                session.caller(),
                method,
                &session.topology().servers[0].name,
                None,
            );
            if let Some(p) = &policy
                && let Decision::Deny(d) =
                    on_request_as_is(sv, p, &params_text(params.as_ref())).await
            {
                return denied(&id, &d);
            }
            forward::forward(sv, session, 0, id, method, params, policy, None).await
        }
        _ => Reply::Json(jsonrpc::error_response(
            Some(&id),
            code::METHOD_NOT_FOUND,
            &format!("method not found: {method}"),
        )),
    };
    if let Some(started) = started {
        sv.metrics.record(label, "gateway", "ok", started.elapsed());
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::event_sink::call_queue;

    #[tokio::test]
    async fn an_answer_does_not_overtake_a_message_still_in_the_policy_stage() {
        // Nothing on its way: the answer is JSON.
        let (_sink, events) = call_queue(CALL_QUEUE);
        let call = Box::pin(async { Bytes::from_static(b"answer") });
        let reply = json_or_stream(call, events, std::future::pending()).await;
        assert!(matches!(reply, Reply::Json(ref f) if &f[..] == b"answer"));
        // The server's log line is held by the policy when its answer comes: it comes first.
        let (sink, events) = call_queue(CALL_QUEUE);
        let held = sink.on_the_way();
        let release = Arc::new(tokio::sync::Notify::new());
        let later = release.clone();
        tokio::spawn(async move {
            later.notified().await;
            sink.try_send(Bytes::from_static(b"log")).unwrap();
            drop(held);
        });
        let call = Box::pin(async { Bytes::from_static(b"answer") });
        let replying = tokio::spawn(json_or_stream(call, events, std::future::pending()));
        tokio::task::yield_now().await;
        assert!(!replying.is_finished(), "waits for the held message");
        release.notify_one();
        let Reply::Stream(mut rx) = replying.await.unwrap() else {
            panic!("a stream carries the held message")
        };
        assert_eq!(rx.recv().await.as_deref(), Some(&b"log"[..]));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"answer"[..]));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_waits_for_held_messages_only_a_while() {
        // Held behind a stage that never lets it through: the answer goes after the wait.
        let (sink, events) = call_queue(CALL_QUEUE);
        let _held = sink.on_the_way();
        let call = Box::pin(async { Bytes::from_static(b"answer") });
        let started = tokio::time::Instant::now();
        let reply = json_or_stream(call, events, std::future::pending()).await;
        assert!(matches!(reply, Reply::Json(ref f) if &f[..] == b"answer"));
        assert_eq!(started.elapsed(), HELD_MESSAGES_WAIT);
        // On a stream (a message came before the answer), likewise.
        let (sink, events) = call_queue(CALL_QUEUE);
        sink.try_send(Bytes::from_static(b"progress")).unwrap();
        let _held = sink.on_the_way();
        let call = Box::pin(async { Bytes::from_static(b"answer") });
        let Reply::Stream(mut rx) = json_or_stream(call, events, std::future::pending()).await
        else {
            panic!("a message came first")
        };
        assert_eq!(rx.recv().await.as_deref(), Some(&b"progress"[..]));
        let started = tokio::time::Instant::now();
        assert_eq!(rx.recv().await.as_deref(), Some(&b"answer"[..]));
        assert!(started.elapsed() <= HELD_MESSAGES_WAIT);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_holds_neither_the_call_nor_the_stream() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (sink, events) = call_queue(CALL_QUEUE);
        sink.try_send(Bytes::from_static(b"progress")).unwrap();
        // The call's own deadline answers it after 10 s.
        let answered = Arc::new(AtomicBool::new(false));
        let call = {
            let answered = answered.clone();
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                answered.store(true, Ordering::SeqCst);
                Bytes::from_static(b"timed out")
            })
        };
        // The server keeps talking, far more than the stream holds.
        let talking = tokio::spawn(async move {
            for _ in 0..2_000 {
                let _ = sink.try_send(Bytes::from_static(b"progress"));
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        let Reply::Stream(mut rx) = json_or_stream(call, events, std::future::pending()).await
        else {
            panic!("a message came first")
        };
        // Nobody reads: the call is still polled, and its deadline ends it.
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        assert!(
            answered.load(Ordering::SeqCst),
            "the call ran to its deadline"
        );
        // The reader is given up on: what the stream held, then its end.
        tokio::time::sleep(crate::body::STALLED_READER).await;
        let mut held = 0;
        while let Some(frame) = rx.recv().await {
            assert_eq!(&frame[..], b"progress");
            held += 1;
        }
        assert_eq!(held, 64, "the stream held what it could, then ended");
        talking.abort();
    }
}
