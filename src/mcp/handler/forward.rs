//! Methods routed to one upstream: the call, its policy on the way in and out, and the
//! JSON-or-SSE answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::mcp::jsonrpc::{self, code};
use crate::mcp::policy::Policy;
use crate::mcp::router::ResourceRoute;
use crate::mcp::session::Session;
use crate::metrics::method_label;
use crate::plugins::{Decision, EntryKind};
use crate::trace::SpanKind;
use crate::upstream::{CallOpts, EventSink, UpstreamError, request_progress_token};

use super::aggregate::{RESOURCES, TEMPLATES, list};
use super::{
    Fields, Reply, Services, denied, encode_fields, fields, invalid_params, json_string, screen,
    string_field,
};

/// Why a completion is not sent.
pub(super) enum Refused {
    /// A plugin said no.
    Denied(crate::plugins::Denied),
    /// The server failed while its lists were read for the plugins.
    Upstream(UpstreamError),
}

impl Refused {
    fn reply(&self, id: &[u8]) -> Reply {
        match self {
            Refused::Denied(d) => denied(id, d),
            Refused::Upstream(e) => super::upstream_failed(id, e),
        }
    }
}

/// The policy of a completion of the entry `name` on upstream `index`: denied when the caller
/// may not see it as any of `kinds`, or when the on-request chain refuses its `params` (the
/// `argument` being typed and the `context` of arguments already given, all of which go on
/// to the server).
pub(super) async fn completion_policy(
    sv: Services<'_>,
    session: &Arc<Session>,
    index: usize,
    kinds: &[EntryKind],
    name: &str,
    params: Option<&Bytes>,
) -> Result<Option<Policy>, Refused> {
    let plugins = sv.plugins.current();
    let Some(mut policy) = Policy::for_call(
        &plugins,
        Some(sv.audit),
        session.caller(),
        "completion/complete",
        &session.topology().servers[index].name,
        Some(name),
    ) else {
        return Ok(None);
    };
    policy
        .learn_target(session, index, kinds)
        .await
        .map_err(Refused::Upstream)?;
    for kind in kinds {
        if let Some(d) = policy.check_target(*kind, name).await {
            return Err(Refused::Denied(d));
        }
    }
    // A completion is not rewritten (it is what the user is typing): a plugin that would
    // change it refuses the completion rather than let it go on unchanged.
    match super::on_request_as_is(sv, &policy, &super::params_text(params)).await {
        Decision::Deny(d) => Err(Refused::Denied(d)),
        Decision::Allow | Decision::Rewrite(_) => Ok(Some(policy)),
    }
}

/// Routes `completion/complete` by its `ref`: a prompt name or a resource URI.
pub(super) async fn complete(
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
    // The ref is routed and checked as read here: no member a server could read otherwise.
    use crate::mcp::lookalike::check_members;
    let checked = params.as_deref().map_or(Ok(()), |p| {
        check_members(p, &["ref", "argument", "context", "_meta"], "params")
    });
    // The argument and the context are judged by the plugins as read: `Value` or `Arguments`
    // beside them would reach a lenient server unjudged.
    let nested = |key: &str, owned: &[&str]| match f.get(key) {
        Some(v) if v.get() != "null" => {
            check_members(v.get().as_bytes(), owned, &format!("params.{key}"))
        }
        _ => Ok(()),
    };
    if let Err(e) = checked
        .and_then(|()| check_members(r.get().as_bytes(), &["type", "name", "uri"], "params.ref"))
        .and_then(|()| nested("argument", &["name", "value"]))
        .and_then(|()| nested("context", &["arguments"]))
    {
        return invalid_params(&id, &e);
    }
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
            let Some((index, local)) = session.resolve_prompt(&name) else {
                return invalid_params(&id, &format!("unknown prompt: {name}"));
            };
            let policy = match completion_policy(
                sv,
                session,
                index,
                &[EntryKind::Prompt],
                local,
                params.as_ref(),
            )
            .await
            {
                Ok(p) => p,
                Err(r) => return r.reply(&id),
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
                None,
            )
            .await
        }
        "ref/resource" => {
            let uri = string_field(&rf, "uri").unwrap_or_default();
            let index = match resource_owner(sv, session, &uri).await {
                Ok(i) => i,
                Err(e) => return invalid_params(&id, &e),
            };
            // A template URI, or a resource's own: hidden as either, it cannot be completed.
            let kinds = [EntryKind::ResourceTemplate, EntryKind::Resource];
            match completion_policy(sv, session, index, &kinds, &uri, params.as_ref()).await {
                Ok(policy) => {
                    forward(
                        sv,
                        session,
                        index,
                        id,
                        "completion/complete",
                        params,
                        policy,
                        None,
                    )
                    .await
                }
                Err(r) => r.reply(&id),
            }
        }
        _ => invalid_params(&id, "params.ref.type must be ref/prompt or ref/resource"),
    }
}

/// Finds the one upstream that serves a resource URI for this session, hearing from every
/// server first (their resource lists and templates, walked from the first page); the error
/// says why there is none.
///
/// One walk at a time per session, at most one a second, within [`REFRESH_DEADLINE`]: a read
/// that comes during a walk waits for it rather than trust lists half heard, and a client
/// cannot make a walk of every server out of each read. A server a walk could not hear to
/// the end is not waited for again for a while ([`crate::mcp::resource_walk`]).
pub(super) async fn resource_owner(
    sv: Services<'_>,
    session: &Arc<Session>,
    uri: &str,
) -> Result<usize, String> {
    let router = &session.topology().router;
    let serves = |i| session.serves_resource(i, uri);
    let walks = session.resource_walk();
    let excused = |i| walks.excused(i);
    let mut route = router.resource(uri, serves, excused);
    if route == ResourceRoute::Unknown {
        let mut last = walks.lock().await;
        route = router.resource(uri, serves, excused);
        if route == ResourceRoute::Unknown {
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                let walk = async {
                    for kind in [RESOURCES, TEMPLATES] {
                        list_all(sv, session, kind).await;
                    }
                };
                let _ = tokio::time::timeout(REFRESH_DEADLINE, walk).await;
                walks.walked(|i| serves(i) && !router.heard(i));
                *last = Some(Instant::now());
            }
            // What could be heard has been: a server that could not be (down, or past the
            // walk's pages) claims nothing it did not claim before.
            route = router.resource(uri, serves, |_| true);
        }
    }
    match route {
        ResourceRoute::One(i) => Ok(i),
        ResourceRoute::Unknown => Err(format!("no upstream serves resource {uri}")),
        ResourceRoute::Ambiguous(owners) => {
            let names: Vec<&str> = owners.iter().map(|i| router.name(*i)).collect();
            Err(format!(
                "resource {uri} is claimed by several servers ({}), so it is not read from any \
                 of them; a profile that serves only one of them can read it",
                names.join(", ")
            ))
        }
    }
}

/// Longest walk of every server's resource lists for one read.
const REFRESH_DEADLINE: Duration = Duration::from_secs(10);

/// Lists every page of `kind` (up to 20), for what the router learns from them.
async fn list_all(sv: Services<'_>, session: &Arc<Session>, kind: super::aggregate::ListKind) {
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
            true,
        )
        .await
        else {
            return;
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
            return;
        }
    }
}

/// A call's audit record: written when the call ends, or as `abandoned` when the call is
/// dropped first (the client went away, the session ended): the trail never misses a call
/// that reached an upstream. It holds views of what the call holds anyway: no copies, and no
/// reference counts shared with other calls.
struct CallRecord<'a> {
    audit: &'a crate::audit::Audit,
    session: &'a Session,
    server: &'a str,
    method: &'a str,
    /// The name or URI, as read from the params before they went upstream.
    name: Option<&'a str>,
    request_bytes: usize,
    started: Instant,
    /// Whether the record is still to be written (not while the pins hold the call back).
    pending: bool,
}

impl CallRecord<'_> {
    fn write(
        &self,
        decision: &'static str,
        outcome: &str,
        response_bytes: Option<usize>,
        took: Duration,
    ) {
        self.audit.record(crate::audit::Event {
            kind: "call",
            principal: self.session.principal.as_deref(),
            session: Some(crate::audit::SessionName::new(&self.session.id)),
            profile: self.session.profile().map(|p| &*p.name),
            server: Some(self.server),
            method: self.method,
            name: self.name,
            decision,
            by: None,
            outcome: Some(outcome),
            latency_us: Some(took.as_micros() as u64),
            request_bytes: Some(self.request_bytes),
            response_bytes,
        });
    }

    /// Writes the record of a call that ended `outcome` after `took`.
    fn finish(&mut self, outcome: &'static str, response_bytes: usize, took: Duration) {
        if std::mem::take(&mut self.pending) {
            let decision = if outcome == "denied" {
                "denied"
            } else {
                "allowed"
            };
            self.write(decision, outcome, Some(response_bytes), took);
        }
    }
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        if self.pending {
            self.write("allowed", "abandoned", None, self.started.elapsed());
        }
    }
}

/// The tool or prompt name, or the resource URI, of forwarded params: the field the router
/// routed `method` by (a decoy in another field is not what is recorded). A name given twice,
/// or beside a key a server may read as it, is not recorded: which one ran is not known.
fn audit_target<'a>(method: &str, params: Option<&'a [u8]>) -> Option<Cow<'a, str>> {
    #[derive(serde::Deserialize)]
    struct Target {
        uri: Option<String>,
    }
    match method {
        "tools/call" | "prompts/get" => super::call_params::CallParams::read(params)
            .ok()?
            .name()
            .ok(),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            serde_json::from_slice::<Target>(params?)
                .ok()?
                .uri
                .map(Cow::Owned)
        }
        _ => None,
    }
}

/// A `tools/call` checked against the pins before it is sent (boxed: rare, and large).
struct PinnedCall {
    /// The tool's name on its server.
    local: String,
    pinning: super::aggregate::Pinning,
    /// The call's options for its one retry, after meeting a new connection.
    again: Option<CallOpts>,
}

/// A client that asked for progress hears that the call waits for a sleeping server to wake
/// (one notification at progress 0: the server's own progress follows).
fn tell_if_waking(server: &crate::upstream::Server, token: &[u8], events: &EventSink) {
    let asleep = server
        .orchestrated
        .as_ref()
        .is_some_and(|o| o.runtime.usage(&server.name).is_some_and(|u| u.is_asleep()));
    // Written again, not pasted: the client's own whitespace (a bare CR) would split the SSE
    // event the frame travels in.
    let Ok(token) = serde_json::from_slice::<serde_json::Value>(token) else {
        return;
    };
    if asleep {
        let message = format!(
            "server {} is asleep (idle): waking it, within {}",
            server.name,
            humantime::format_duration(
                server
                    .orchestrated
                    .as_ref()
                    .map_or_else(Default::default, |o| o.wake_timeout)
            )
        );
        let frame = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progressToken":{token},"progress":0,"message":{}}}}}"#,
            json_string(&message).get()
        );
        let _ = events.try_send(Bytes::from(frame));
    }
}

/// Sends a request to one upstream. Answers with plain JSON when the upstream sends nothing else
/// first; switches to SSE as soon as a related message (progress, sampling, logging) arrives.
/// `target` is the name or URI the request was routed by, when the caller knows it (else it is
/// read from the params, for the audit trail and the span).
#[allow(clippy::too_many_arguments)] // each is a different part of the call
pub(super) async fn forward(
    sv: Services<'_>,
    session: &Arc<Session>,
    index: usize,
    id: Bytes,
    method: &str,
    params: Option<Bytes>,
    policy: Option<Policy>,
    target: Option<&str>,
) -> Reply {
    // The tool whose definition the pins must allow: checked once the client can be told
    // that reading the list wakes a sleeping server.
    let mut pinned = match (method, sv.pins) {
        ("tools/call", Some(pins)) => target.map(|local| {
            Box::new(PinnedCall {
                local: local.to_owned(),
                pinning: super::aggregate::Pinning {
                    pins: pins.clone(),
                    audit: sv.audit.clone(),
                    metrics: sv.metrics.clone(),
                },
                again: None,
            })
        }),
        _ => None,
    };
    // What the audit trail records of the call, taken before the params go upstream: the
    // name a caller routed by, else read (in the call's future) from the params as given.
    let audit = sv.audit.is_on().then(|| sv.audit.clone());
    let routed_by = audit.as_ref().and(target).map(str::to_owned);
    let request_bytes = params.as_ref().map_or(0, |p| p.len());
    let target = || match target {
        Some(t) => Some(Cow::Borrowed(t)),
        None => audit_target(method, params.as_deref()),
    };
    // Routed by and written into every progress notification while the call runs.
    let progress_token = match params.as_deref().map(request_progress_token) {
        Some(Err(why)) => return super::invalid_params(&id, &why),
        Some(Ok(token)) => token,
        None => None,
    };
    // The params as the request gave them (or a rewrite that keeps the request's body alive):
    // kept until the call ends, so that the body holds its room in `mcp.max_bodies_bytes`
    // while copies made of it on the way upstream (a trace context, a shared connection's
    // token) live.
    let given = params.clone();
    let label = method_label(method);
    let started = Instant::now();
    let server = session.topology().servers[index].clone();
    let (ev_tx, ev_rx) = crate::upstream::event_sink::call_queue(super::CALL_QUEUE);
    let mut inflight = match session.track(id.clone()) {
        Ok(t) => t,
        Err(busy) => return super::too_busy(&id, busy),
    };
    // Traced: the upstream call is a client span, and the server is told it is the parent
    // (in `_meta` for every transport, and as the `traceparent` header over HTTP).
    let mut upstream_span = sv.trace.map(|s| {
        let name = match target() {
            Some(target) if method.starts_with("resources/") => {
                format!("{method} {}", crate::trace::safe_uri(&target))
            }
            Some(target) => format!("{method} {target}"),
            None => method.to_owned(),
        };
        let mut span = s.child(name, SpanKind::Client);
        span.attr("mcp.method.name", method);
        span.attr("gatehouse.server", &*server.name);
        span
    });
    let (params, traceparent) = match &upstream_span {
        Some(span) => (span.inject(params), span.headers()),
        None => (params, None),
    };
    let response_trace = sv.trace.map(crate::trace::Span::parent);
    if let Some(token) = &progress_token {
        tell_if_waking(&server, token, &ev_tx);
    }
    let opts = CallOpts {
        events: Some(ev_tx.clone()),
        cancel: inflight.cancelled.take(),
        progress_token: progress_token.clone(),
        client_envelope: sv.envelope.cloned(),
        traceparent: traceparent.clone(),
        awaiting: sv.awaiting.cloned(),
        ..CallOpts::default()
    };
    // A call checked against the pins is sent only on the connection checked; met with a new
    // one (a restarted server, a lost session), it is checked again and sent once more
    // (without cancellation, as the link's own retry).
    if let Some(p) = &mut pinned {
        p.again = Some(CallOpts {
            events: Some(ev_tx),
            progress_token,
            client_envelope: sv.envelope.cloned(),
            traceparent,
            awaiting: sv.awaiting.cloned(),
            ..CallOpts::default()
        });
    }
    let session2 = session.clone();
    let method = method.to_owned();
    let call = crate::boxed::in_place(|| async move {
        let read_name = match (&audit, &routed_by) {
            (Some(_), None) => audit_target(&method, given.as_deref()),
            _ => None,
        };
        let mut audited = audit.as_deref().map(|audit| CallRecord {
            audit,
            session: &session2,
            server: &server.name,
            method: if label == method { label } else { &method },
            name: routed_by.as_deref().or(read_name.as_deref()),
            request_bytes,
            started,
            // A call the pins refuse, or abandoned while checked, is not recorded as a call.
            pending: pinned.is_none(),
        });
        let mut opts = opts;
        let checked = loop {
            if let Some(p) = &mut pinned {
                // Boxed: the check's future (list pages) would double every call's.
                match Box::pin(super::aggregate::pins_allow(
                    &p.pinning, &session2, index, &p.local,
                ))
                .await
                {
                    Ok(generation) => opts.on_connection = generation,
                    Err(super::aggregate::PinRefusal::Denied(why)) => {
                        break Err((why, p.local.clone(), p.pinning.audit.clone()));
                    }
                    Err(super::aggregate::PinRefusal::Upstream(e)) => {
                        // A call that failed: recorded as one (its record was kept back
                        // until the pins allowed it).
                        if let Some(record) = &mut audited {
                            record.pending = true;
                        }
                        break Ok(Err(e));
                    }
                }
                if let Some(record) = &mut audited {
                    record.pending = true;
                }
            }
            let result = session2.links()[index]
                .call(&method, params.as_deref(), opts)
                .await;
            match (result, pinned.as_mut().and_then(|p| p.again.take())) {
                (Err(UpstreamError::Reconnected { .. }), Some(next)) => {
                    opts = next;
                    // Unsent: kept back again until the pins allow it.
                    if let Some(record) = &mut audited {
                        record.pending = false;
                    }
                }
                (result, _) => break Ok(result),
            }
        };
        let result = match checked {
            Ok(result) => result,
            Err((why, local, audit)) => {
                drop(inflight);
                // A denial, not a call (checked again after a reconnection, say).
                if let Some(record) = &mut audited {
                    record.pending = false;
                }
                if let Some(span) = &mut upstream_span {
                    span.fail("denied by pinning");
                }
                server.requests.record(label, "denied", started.elapsed());
                audit.record(crate::audit::Event {
                    kind: "denial",
                    principal: session2.principal.as_deref(),
                    session: Some(crate::audit::SessionName::new(&session2.id)),
                    profile: session2.profile().map(|p| &*p.name),
                    server: Some(&server.name),
                    method: &method,
                    name: Some(&local),
                    decision: "denied",
                    by: Some("pinning"),
                    outcome: Some(&why),
                    ..Default::default()
                });
                return jsonrpc::error_response(Some(&id), code::TOOL_NOT_APPROVED, &why);
            }
        };
        drop(inflight);
        let (frame, outcome) = match result {
            // Error messages pass the result chains too: a redaction must not be bypassed by
            // a server that puts the data in an error.
            Ok(outcome) => {
                if let (Some(span), crate::mcp::jsonrpc::Outcome::Error(e)) =
                    (&mut upstream_span, &outcome)
                {
                    let code = jsonrpc::error_code(e).unwrap_or(0);
                    span.attr("rpc.response.status_code", code);
                    span.fail(format!("the server answered error {code}"));
                }
                drop(upstream_span.take());
                screen(policy.as_ref(), response_trace.as_ref(), &id, outcome).await
            }
            Err(e) => {
                // The code only: an upstream's error text has not been through the result
                // chains.
                if let Some(span) = &mut upstream_span {
                    span.attr("rpc.response.status_code", e.code());
                    span.fail(format!("the call failed with {}", e.code()));
                }
                if !matches!(e, UpstreamError::Cancelled)
                    && let Some(more) = server.failure_logged()
                {
                    tracing::warn!(upstream = %server.name, method = ?method, said = e.said(), "call failed: {e}{more}");
                }
                (
                    jsonrpc::error_response(Some(&id), e.code(), &e.to_string()),
                    "failed",
                )
            }
        };
        let took = started.elapsed();
        server.requests.record(label, outcome, took);
        if let Some(record) = &mut audited {
            record.finish(outcome, frame.len(), took);
        }
        frame
    });
    super::json_or_stream(call, ev_rx, session.ended()).await
}

#[cfg(test)]
mod tests {
    use super::audit_target;

    #[test]
    fn the_trail_records_the_name_routed_by_and_none_when_it_is_in_doubt() {
        fn target(method: &str, params: &str) -> Option<String> {
            audit_target(method, Some(params.as_bytes())).map(|n| n.into_owned())
        }
        assert_eq!(
            target("tools/call", r#"{"arguments":{"name":"decoy"},"name":"t"}"#).as_deref(),
            Some("t")
        );
        assert_eq!(
            target("resources/read", r#"{"uri":"file:///a","name":"x"}"#).as_deref(),
            Some("file:///a")
        );
        // A server may read another name than the first: the record does not guess.
        for params in [r#"{"name":"t","name":"u"}"#, r#"{"name":"t","Name":"u"}"#] {
            assert_eq!(target("tools/call", params), None, "{params}");
        }
        assert_eq!(target("tools/list", r#"{"name":"t"}"#), None);
    }
}
