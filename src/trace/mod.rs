//! OpenTelemetry traces: a span per MCP request with child spans for the policy hooks and the
//! upstream call, W3C trace context taken from the client (the `traceparent` header, or the
//! `_meta` keys of SEP-414, which win) and passed upstream (header and `_meta`), exported over
//! OTLP/HTTP by [`otlp`]. Off, none of this runs: no span, no parse, params untouched.

mod context;
pub mod otlp;

pub use context::SpanContext;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::config::traces::TracesConfig;

/// What a span is to its trace (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside the gateway (a policy hook).
    Internal = 1,
    /// A request the gateway serves.
    Server = 2,
    /// A request the gateway makes (the upstream call).
    Client = 3,
}

/// Longest text kept in an attribute or a span name (a client chooses names, URIs and ids).
const MAX_TEXT: usize = 256;

/// Keys of an object compared one by one for duplicates; past them, hashed.
const LINEAR_KEYS: usize = 16;

/// Longest failure message kept.
const MAX_ERROR: usize = 256;

/// `text` cut to at most `max` bytes, on a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A resource URI as a span may carry it: without user info, query or fragment (where
/// credentials hide), bounded.
pub fn safe_uri(uri: &str) -> String {
    let cut = uri.find(['?', '#']).unwrap_or(uri.len());
    let uri = &uri[..cut];
    let uri = match uri.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|a| a.rfind('@')) {
            Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
            None => uri.to_owned(),
        },
        None => uri.to_owned(),
    };
    bounded(uri, MAX_TEXT)
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// Text.
    Str(String),
    /// An integer.
    Int(i64),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}

impl From<i64> for AttrValue {
    fn from(n: i64) -> Self {
        AttrValue::Int(n)
    }
}

/// A finished span, as exported.
#[derive(Debug, Clone)]
pub struct SpanData {
    /// Its identity.
    pub context: SpanContext,
    /// Its parent's span id, if any.
    pub parent: Option<[u8; 8]>,
    /// `{method} {target}`, as the MCP semantic conventions name spans.
    pub name: String,
    /// Server, client or internal.
    pub kind: SpanKind,
    /// Start, in nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// End, in nanoseconds since the Unix epoch.
    pub end_ns: u64,
    /// Attributes, by OpenTelemetry semantic-convention names where there are some.
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Set when the span failed: why.
    pub error: Option<String>,
}

/// Records spans and hands them to the exporter. Cheap to share.
pub struct Tracer {
    queue: mpsc::Sender<SpanData>,
    /// Roots (no sampled parent) are recorded when a random u64 falls below this.
    threshold: u64,
    /// A client's sampled flag decides for its trace.
    honor_client_sampling: bool,
    record_principal: bool,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// What the exporter task needs to run: spawn [`otlp::export`] with it.
pub struct ExportQueue {
    /// Finished spans.
    pub spans: mpsc::Receiver<SpanData>,
    /// Counts spans dropped by the exporter (the collector failed).
    pub dropped: prometheus_client::metrics::counter::Counter,
}

impl Tracer {
    /// A tracer for `config`, and the queue its exporter drains. `dropped` counts spans lost
    /// (queue full, export failed).
    pub fn new(
        config: &TracesConfig,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> (Arc<Tracer>, ExportQueue) {
        let (tx, rx) = mpsc::channel(config.max_queue);
        let threshold = if config.sample_ratio >= 1.0 {
            u64::MAX
        } else {
            (config.sample_ratio * u64::MAX as f64) as u64
        };
        let tracer = Arc::new(Tracer {
            queue: tx,
            threshold,
            honor_client_sampling: config.honor_client_sampling,
            record_principal: config.record_principal,
            dropped: dropped.clone(),
        });
        (tracer, ExportQueue { spans: rx, dropped })
    }

    /// The span of one MCP request, child of the client's context when it sent one: a
    /// `traceparent` in the request's `_meta` (SEP-414) or else the HTTP header. None when the
    /// trace is not recorded: the client's context says so, or (without a sampled parent, or
    /// always with `honor_client_sampling: false`) the sample ratio.
    pub fn request_span(
        self: &Arc<Self>,
        method: &str,
        params: Option<&[u8]>,
        header: Option<(&str, Option<&str>)>,
    ) -> Option<Span> {
        let seen = params.map(RequestView::of).unwrap_or_default();
        let from_meta = seen.traceparent.as_deref().and_then(|tp| {
            let parent = SpanContext::parse(tp)?;
            Some((
                parent,
                seen.tracestate.as_deref().and_then(context::tracestate),
            ))
        });
        let from_header = || {
            let (traceparent, state) = header?;
            Some((
                SpanContext::parse(traceparent)?,
                state.and_then(context::tracestate),
            ))
        };
        let (parent, state) = match from_meta.or_else(from_header) {
            Some((p, s)) => (Some(p), s.map(str::to_owned)),
            None => (None, None),
        };
        let by_ratio = || self.threshold == u64::MAX || context::random_u64() < self.threshold;
        let sampled = match parent {
            Some(p) if self.honor_client_sampling => p.sampled,
            _ => by_ratio(),
        };
        if !sampled {
            return None;
        }
        let target = match method {
            "tools/call" | "prompts/get" => seen.name.map(|n| bounded(n, MAX_TEXT)),
            m if m.starts_with("resources/") => seen.uri.as_deref().map(safe_uri),
            _ => None,
        };
        let name = match &target {
            Some(t) => format!("{method} {t}"),
            None => method.to_owned(),
        };
        let mut span = Span::start(
            self.clone(),
            SpanContext {
                trace_id: parent.map_or_else(context::new_trace_id, |p| p.trace_id),
                span_id: context::new_span_id(),
                sampled: true,
            },
            parent.map(|p| p.span_id),
            bounded(name, MAX_TEXT),
            SpanKind::Server,
            state,
        );
        span.attr("mcp.method.name", method);
        if let Some(t) = target {
            let key = match method {
                "tools/call" => "gen_ai.tool.name",
                "prompts/get" => "gen_ai.prompt.name",
                _ => "mcp.resource.uri",
            };
            span.attr(key, t);
        }
        Some(span)
    }

    /// Whether spans carry the caller's principal.
    pub fn records_principal(&self) -> bool {
        self.record_principal
    }

    fn submit(&self, data: SpanData) {
        if self.queue.try_send(data).is_err() {
            self.dropped.inc();
        }
    }
}

/// The fields of a request's params a span reads, in one pass (only when tracing). Each is
/// read on its own: a field of the wrong type is absent, the others still count.
#[derive(Default)]
struct RequestView {
    name: Option<String>,
    uri: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl RequestView {
    fn of(params: &[u8]) -> RequestView {
        #[derive(Deserialize)]
        struct Top<'a> {
            #[serde(borrow)]
            name: Option<&'a RawValue>,
            #[serde(borrow)]
            uri: Option<&'a RawValue>,
            #[serde(rename = "_meta", borrow)]
            meta: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Meta<'a> {
            #[serde(borrow)]
            traceparent: Option<&'a RawValue>,
            #[serde(borrow)]
            tracestate: Option<&'a RawValue>,
        }
        let text = |raw: Option<&RawValue>| -> Option<String> {
            serde_json::from_str::<Cow<'_, str>>(raw?.get())
                .ok()
                .map(Cow::into_owned)
        };
        let Ok(top) = serde_json::from_slice::<Top<'_>>(params) else {
            return RequestView::default();
        };
        let meta = top
            .meta
            .and_then(|m| serde_json::from_str::<Meta<'_>>(m.get()).ok());
        RequestView {
            name: text(top.name),
            uri: text(top.uri),
            traceparent: meta.as_ref().and_then(|m| text(m.traceparent)),
            tracestate: meta.as_ref().and_then(|m| text(m.tracestate)),
        }
    }
}

/// A span being recorded; it ends (and is queued for export) when dropped.
pub struct Span {
    tracer: Arc<Tracer>,
    data: SpanData,
    started: Instant,
    tracestate: Option<String>,
}

impl Span {
    fn start(
        tracer: Arc<Tracer>,
        context: SpanContext,
        parent: Option<[u8; 8]>,
        name: String,
        kind: SpanKind,
        tracestate: Option<String>,
    ) -> Span {
        let start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Span {
            tracer,
            data: SpanData {
                context,
                parent,
                name,
                kind,
                start_ns,
                end_ns: 0,
                attributes: Vec::new(),
                error: None,
            },
            started: Instant::now(),
            tracestate,
        }
    }

    /// A child span, starting now.
    pub fn child(&self, name: impl Into<String>, kind: SpanKind) -> Span {
        child_of(
            &self.tracer,
            self.data.context,
            &self.tracestate,
            name,
            kind,
        )
    }

    /// What starts children of this span later, after it ended (an owned handle).
    pub fn parent(&self) -> SpanParent {
        SpanParent {
            tracer: self.tracer.clone(),
            context: self.data.context,
            tracestate: self.tracestate.clone(),
        }
    }

    /// Sets an attribute (text is bounded).
    pub fn attr(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        let value = match value.into() {
            AttrValue::Str(s) => AttrValue::Str(bounded(s, MAX_TEXT)),
            n => n,
        };
        self.data.attributes.push((key, value));
    }

    /// Marks the span failed (the reason is bounded).
    pub fn fail(&mut self, why: impl Into<String>) {
        self.data.error = Some(bounded(why.into(), MAX_ERROR));
    }

    /// Records a JSON-RPC answer's outcome: an error's code, and the span as failed.
    pub fn record_answer(&mut self, frame: &[u8]) {
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(borrow)]
            error: Option<ErrorView<'a>>,
        }
        #[derive(Deserialize)]
        struct ErrorView<'a> {
            code: i64,
            #[serde(borrow)]
            message: Cow<'a, str>,
        }
        if let Ok(Frame { error: Some(e) }) = serde_json::from_slice(frame) {
            self.attr("rpc.response.status_code", e.code);
            self.attr("error.type", e.code.to_string());
            self.fail(e.message.into_owned());
        }
    }

    /// This span as HTTP headers for the request it makes.
    pub fn headers(&self) -> Option<TraceHeaders> {
        Some(TraceHeaders {
            parent: http::HeaderValue::try_from(self.traceparent()).ok()?,
            state: self
                .tracestate()
                .and_then(|s| http::HeaderValue::try_from(s).ok()),
        })
    }

    /// The `traceparent` naming this span.
    pub fn traceparent(&self) -> String {
        self.data.context.traceparent()
    }

    /// The `tracestate` the trace carries, if the client sent one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// Params for the upstream with this span as the parent in `_meta` (SEP-414). Without a
    /// `_meta`, the member is spliced in and every other byte stays as the client sent it;
    /// with one, `_meta` gets the gateway's `traceparent` (and the client's `tracestate`) in
    /// place of the client's and keeps its other members. Params that are not an object, with
    /// a key given twice, or with a `_meta` that is not an object go as they are (the header
    /// still names the span over HTTP).
    pub fn inject(&self, params: Option<Bytes>) -> Option<Bytes> {
        type Object<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;
        let raw = params.as_deref().unwrap_or(b"{}");
        let Ok(top) = serde_json::from_slice::<Members<'_>>(raw) else {
            return params;
        };
        if top.duplicate {
            return params;
        }
        let mut meta: Object<'_> = match top.meta {
            Some(m) => match serde_json::from_str::<Members<'_>>(m.get()) {
                Ok(m) if !m.duplicate => m.all.into_iter().collect(),
                _ => return params,
            },
            None => Object::new(),
        };
        let traceparent = json_string(&self.traceparent());
        let tracestate = self.tracestate().map(json_string);
        meta.insert(Cow::Borrowed("traceparent"), &traceparent);
        match &tracestate {
            Some(s) => meta.insert(Cow::Borrowed("tracestate"), s),
            None => meta.remove("tracestate"),
        };
        let meta = serde_json::to_string(&meta).expect("JSON members serialize");
        let mut out = Vec::with_capacity(raw.len() + meta.len() + 16);
        match top.meta {
            // Spliced after the opening brace: nothing else is re-encoded.
            None => {
                let open = raw.iter().position(|&b| b == b'{').expect("an object");
                let empty = raw[open + 1..]
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|&b| b == b'}');
                out.extend_from_slice(&raw[..=open]);
                out.extend_from_slice(b"\"_meta\":");
                out.extend_from_slice(meta.as_bytes());
                if !empty {
                    out.push(b',');
                }
                out.extend_from_slice(&raw[open + 1..]);
            }
            Some(_) => {
                let meta = RawValue::from_string(meta).expect("serialized JSON");
                let mut fields: Object<'_> = top.all.into_iter().collect();
                fields.insert(Cow::Borrowed("_meta"), &meta);
                out = serde_json::to_vec(&fields).expect("JSON members serialize");
            }
        }
        Some(Bytes::from(out))
    }
}

/// An object's members read once: all of them, whether a key came twice (after unescaping:
/// `"\u005fmeta"` is `_meta`), and its `_meta`.
struct Members<'a> {
    all: Vec<(Cow<'a, str>, &'a RawValue)>,
    duplicate: bool,
    meta: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut all: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                let mut duplicate = false;
                // Past a few keys, the ones seen are hashed: comparing each with all before it
                // made a client's object of 400,000 keys cost minutes of CPU.
                let mut seen: Option<HashSet<Cow<'de, str>>> = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if seen.is_none() && all.len() >= LINEAR_KEYS {
                        seen = Some(all.iter().map(|(k, _)| k.clone()).collect());
                    }
                    duplicate |= match &mut seen {
                        Some(seen) => !seen.insert(key.clone()),
                        None => all.iter().any(|(k, _)| *k == key),
                    };
                    all.push((key, value));
                }
                let meta = all.iter().find(|(k, _)| k == "_meta").map(|(_, v)| *v);
                Ok(Members {
                    all,
                    duplicate,
                    meta,
                })
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A span's context as the headers of an outgoing HTTP request.
#[derive(Debug, Clone)]
pub struct TraceHeaders {
    /// `traceparent`.
    pub parent: http::HeaderValue,
    /// `tracestate`, when the trace has one.
    pub state: Option<http::HeaderValue>,
}

/// Starts children of a span, owned: for work that outlives the borrow of the span (a call's
/// answer screened after the request's handler returned its stream).
#[derive(Clone)]
pub struct SpanParent {
    tracer: Arc<Tracer>,
    context: SpanContext,
    tracestate: Option<String>,
}

impl SpanParent {
    /// A child span, starting now.
    pub fn child(&self, name: impl Into<String>, kind: SpanKind) -> Span {
        child_of(&self.tracer, self.context, &self.tracestate, name, kind)
    }
}

fn child_of(
    tracer: &Arc<Tracer>,
    parent: SpanContext,
    tracestate: &Option<String>,
    name: impl Into<String>,
    kind: SpanKind,
) -> Span {
    Span::start(
        tracer.clone(),
        SpanContext {
            span_id: context::new_span_id(),
            ..parent
        },
        Some(parent.span_id),
        bounded(name.into(), MAX_TEXT),
        kind,
        tracestate.clone(),
    )
}

fn json_string(s: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(s).expect("a string serializes"))
        .expect("a JSON string is JSON")
}

impl Drop for Span {
    fn drop(&mut self) {
        let context = self.data.context;
        let mut data = std::mem::replace(
            &mut self.data,
            SpanData {
                context,
                parent: None,
                name: String::new(),
                kind: SpanKind::Internal,
                start_ns: 0,
                end_ns: 0,
                attributes: Vec::new(),
                error: None,
            },
        );
        data.end_ns = data.start_ns + self.started.elapsed().as_nanos() as u64;
        self.tracer.submit(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> (Arc<Tracer>, ExportQueue) {
        let config: TracesConfig = serde_json::from_value(serde_json::json!({
            "endpoint": "http://127.0.0.1:1/v1/traces", "sample_ratio": ratio, "max_queue": 4
        }))
        .unwrap();
        Tracer::new(&config, Default::default())
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OTHER: &str = "00-11111111111111111111111111111111-2222222222222222-01";

    #[test]
    fn meta_wins_over_the_header_and_the_span_is_its_child() {
        let (t, mut q) = tracer(1.0);
        let params =
            format!(r#"{{"name":"echo","_meta":{{"traceparent":"{PARENT}","tracestate":"k=v"}}}}"#);
        let span = t
            .request_span("tools/call", Some(params.as_bytes()), Some((OTHER, None)))
            .unwrap();
        assert_eq!(span.tracestate(), Some("k=v"));
        drop(span);
        let data = q.spans.try_recv().unwrap();
        let parent = SpanContext::parse(PARENT).unwrap();
        assert_eq!(data.context.trace_id, parent.trace_id);
        assert_eq!(data.parent, Some(parent.span_id));
        assert_eq!(data.name, "tools/call echo");
        assert!(
            data.attributes
                .contains(&("gen_ai.tool.name", "echo".into()))
        );
    }

    #[test]
    fn an_unsampled_parent_or_ratio_zero_records_nothing() {
        let (t, _q) = tracer(1.0);
        let off = PARENT.replace("-01", "-00");
        assert!(t.request_span("ping", None, Some((&off, None))).is_none());
        let (t, _q) = tracer(0.0);
        assert!(t.request_span("ping", None, None).is_none());
        // A bad traceparent is no parent: a root, sampled by the ratio.
        let (t, _q) = tracer(1.0);
        let span = t.request_span("ping", None, Some(("junk", None))).unwrap();
        assert!(span.data.parent.is_none());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, q) = tracer(1.0);
        for _ in 0..6 {
            drop(t.request_span("ping", None, None));
        }
        assert_eq!(q.dropped.get(), 2);
    }

    #[test]
    fn inject_replaces_the_clients_context_and_keeps_the_rest() {
        let (t, _q) = tracer(1.0);
        let span = t.request_span("tools/call", None, None).unwrap();
        let params = Bytes::from_static(
            br#"{"name":"x","arguments":{"a":1},"_meta":{"traceparent":"forged","progressToken":7}}"#,
        );
        let out = span.inject(Some(params)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["_meta"]["traceparent"], span.traceparent());
        assert_eq!(v["_meta"]["progressToken"], 7);
        assert_eq!(v["arguments"]["a"], 1);
        assert!(v["_meta"].get("tracestate").is_none());
        // No params: an object with only `_meta`.
        let v: serde_json::Value = serde_json::from_slice(&span.inject(None).unwrap()).unwrap();
        assert_eq!(v["_meta"]["traceparent"], span.traceparent());
        // Not an object: left alone.
        let odd = Bytes::from_static(b"[1,2]");
        assert_eq!(span.inject(Some(odd.clone())), Some(odd));
    }

    #[test]
    fn duplicates_are_found_among_many_keys_as_among_few() {
        let (t, _q) = tracer(1.0);
        let span = t.request_span("tools/call", None, None).unwrap();
        // Many distinct keys (hashed past the first few): `_meta` is added.
        let keys: Vec<String> = (0..100_000).map(|i| format!("\"k{i:06}\":0")).collect();
        let many = Bytes::from(format!("{{{}}}", keys.join(",")));
        let v: serde_json::Value =
            serde_json::from_slice(&span.inject(Some(many)).unwrap()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 100_001);
        assert_eq!(v["_meta"]["traceparent"], span.traceparent());
        // A key given twice, once escaped, far apart or near: the params are left alone.
        for (first, second) in [(0, 99_999), (3, 5), (20, 17), (0, 15), (16, 0)] {
            let mut twice = keys.clone();
            twice[second] = format!("\"\\u006b{:06}\":1", first);
            let params = Bytes::from(format!("{{{}}}", twice.join(",")));
            assert_eq!(
                span.inject(Some(params.clone())),
                Some(params),
                "k{first:06} at {first} and {second}"
            );
        }
    }
}
