//! Talking 2026-07-28 to an upstream: the probe (`server/discover`), the per-request envelope
//! in `_meta`, the headers that mirror a request (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`), and
//! reading an `input_required` result.
//!
//! Everything here is pure: the link decides when to probe, and what to do with a result that
//! asks the client for input (pass it to a 2026 client, or ask a 2025 client on its stream).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::json_scan;
use crate::mcp::jsonrpc;
use crate::mcp::lookalike;
use crate::mcp::param_headers::ToolHeaders;
use crate::mcp::revision::STATELESS;
use crate::mcp::revision::envelope::{
    CAPABILITIES as CAPABILITIES_KEY, INFO as INFO_KEY, KEYS as ENVELOPE_KEYS, LEVEL as LEVEL_KEY,
    VERSION as VERSION_KEY,
};

/// What every envelope key contains, for a quick look before a parse.
const ENVELOPE_MARK: &str = "io.modelcontextprotocol";

fn is_envelope_key(key: &str) -> bool {
    ENVELOPE_KEYS.contains(&key)
}

/// The members of params the gateway writes for a 2026-07-28 server or mirrors in its headers.
const WRITTEN_KEYS: [&str; 4] = ["_meta", "name", "uri", "arguments"];

/// Methods whose results may ask for input, so whose retries carry answers.
pub(crate) fn may_ask(method: &str) -> bool {
    matches!(method, "tools/call" | "prompts/get" | "resources/read")
}

/// Most input requests one `input_required` result may carry.
pub(crate) const MAX_INPUT_REQUESTS: usize = 16;

type Object<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;

/// The envelope members (`"key":value,…`, no braces) a session's requests carry upstream: the
/// revision, and the capabilities and identity the client declared in its `initialize`.
pub(crate) fn envelope(init_params: &[u8], log_level: Option<&str>) -> String {
    #[derive(Deserialize)]
    struct Init<'a> {
        #[serde(borrow)]
        capabilities: Option<&'a RawValue>,
        #[serde(borrow, rename = "clientInfo")]
        info: Option<&'a RawValue>,
    }
    let init: Option<Init<'_>> = serde_json::from_slice(init_params).ok();
    let capabilities = init
        .as_ref()
        .and_then(|i| i.capabilities)
        .map_or("{}", RawValue::get);
    let mut out = format!(r#""{VERSION_KEY}":"{STATELESS}","{CAPABILITIES_KEY}":{capabilities}"#);
    if let Some(info) = init.as_ref().and_then(|i| i.info) {
        out.push_str(&format!(r#","{INFO_KEY}":{}"#, info.get()));
    }
    if let Some(level) = log_level {
        out.push_str(&format!(r#","{LEVEL_KEY}":{}"#, json_string(level)));
    }
    out
}

/// The `server/discover` request that probes whether a server speaks 2026-07-28.
pub(crate) fn discover_frame(envelope: &str) -> Bytes {
    let params = format!(r#"{{"_meta":{{{envelope}}}}}"#);
    jsonrpc::request(b"0", "server/discover", Some(params.as_bytes()))
}

/// Whether a `server/discover` result lists 2026-07-28 among the server's versions.
pub(crate) fn speaks_stateless(result: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Discovered {
        #[serde(rename = "supportedVersions")]
        versions: Vec<String>,
    }
    serde_json::from_slice::<Discovered>(result)
        .is_ok_and(|d| d.versions.iter().any(|v| v == STATELESS))
}

/// A request's params made ready for a 2026-07-28 upstream.
pub(crate) struct Prepared {
    /// The params with the envelope in `_meta`.
    pub params: Bytes,
    /// Where the JSON string `params.name` (tools/call, prompts/get) or `params.uri`
    /// (resources/read) is in `params`, quotes included: see [`Prepared::target`].
    target: Option<std::ops::Range<usize>>,
    /// The client speaks 2026-07-28 itself (its own envelope came with the request): it answers
    /// `input_required` results itself.
    pub client_driven: bool,
}

/// A 2026-07-28 client's envelope, as the stateless front took it out of the client's params.
#[derive(Clone)]
pub struct ClientEnvelope {
    /// The envelope's members of `_meta` (`"key":value,…`, UTF-8).
    pub members: Bytes,
    /// What the front left of the params, when it knows.
    pub left: Option<ParamsLeft>,
}

/// The params the stateless front left once it took the envelope out, and where in them it
/// wrote `_meta` and found the target. A call that reaches a 2026-07-28 server with these
/// very params (no plugin, prefix or trace changed them) has the envelope put back in
/// place, without the params being read again.
#[derive(Clone)]
pub struct ParamsLeft {
    /// The params.
    pub params: Bytes,
    /// `_meta`'s value as the front wrote it: `{…}`, no envelope key in it.
    pub meta: Range<usize>,
    /// The target's JSON string, quotes included.
    pub target: Option<Range<usize>>,
    /// Whether the params name `requestState` or `inputResponses` (the front refused any key
    /// only like them, and any given twice).
    pub retry_members: bool,
}

/// Puts `envelope` (members of `_meta`) in a request's params, in place of any envelope
/// members there. A 2026 client's call (`client_driven`: its request was checked at the
/// stateless front, which took its envelope out) keeps its retry members; anyone else's go,
/// since the gateway runs that client's round trips itself.
pub(crate) fn prepare(
    method: &str,
    params: Option<&[u8]>,
    envelope: &str,
    client_driven: bool,
    left: Option<&ParamsLeft>,
) -> Result<Prepared, String> {
    let bytes = params.unwrap_or(b"{}");
    if let Some(left) = left
        && bytes.as_ptr() == left.params.as_ptr()
        && bytes.len() == left.params.len()
        && (!left.retry_members || (client_driven && may_ask(method)))
        && let Some(prepared) = put_back(left, envelope, client_driven)
    {
        return Ok(prepared);
    }
    let not_object = || "params must be an object".to_owned();
    let text = std::str::from_utf8(bytes).map_err(|_| not_object())?;
    // One walk over the top level, keeping slices of what stays.
    let mut members: SmallVec<[(Cow<'_, str>, &str, &str); 8]> = SmallVec::new();
    let mut undecodable = false;
    json_scan::members(
        text,
        json_scan::MAX_DEPTH,
        |raw_key, value| match json_scan::unquote(raw_key) {
            Ok(key) => members.push((key, raw_key, value)),
            Err(_) => undecodable = true,
        },
    )
    .map_err(|_| not_object())?;
    let twice = {
        let mut keys: SmallVec<[&str; 8]> = members.iter().map(|(k, ..)| &**k).collect();
        json_scan::repeated_key(&mut keys).is_some()
    };
    // Written in the client's order, a key a lenient server reads as one the gateway wrote or
    // mirrors could come after it and be the one read.
    if let Some((key, owned)) = members.iter().find_map(|(key, ..)| {
        lookalike::read_as(key, &WRITTEN_KEYS)
            .filter(|owned| owned != key)
            .map(|owned| (key, owned))
    }) {
        return Err(format!(
            "params.{:?} is too like params.{owned}: servers differ on which they read",
            lookalike::shown(key)
        ));
    }
    if undecodable || twice {
        // Which of two members counts is the decoder's choice: the one serde keeps, as before.
        return prepare_decoded(method, bytes, envelope, client_driven);
    }
    // A retry's members go unless the client runs its own round trips; keys a lenient server
    // reads as them go always (they would carry answers no policy judged, or override the
    // state the gateway put back).
    let keeps_retry = client_driven && may_ask(method);
    members.retain(|(key, ..)| {
        match lookalike::read_as(key, &["requestState", "inputResponses"]) {
            Some(owned) => keeps_retry && owned == &**key,
            None => true,
        }
    });
    let mut out = String::with_capacity(bytes.len() + envelope.len() + 12);
    out.push_str(r#"{"_meta":{"#);
    out.push_str(envelope);
    let mut meta_empty = envelope.is_empty();
    if let Some((.., meta)) = members.iter().find(|(k, ..)| k == "_meta") {
        let mut bad = false;
        let mut kept_keys: SmallVec<[Cow<'_, str>; 4]> = SmallVec::new();
        json_scan::members(
            meta,
            json_scan::MAX_DEPTH,
            |raw_key, value| match json_scan::unquote(raw_key) {
                Ok(key) if is_envelope_key(&key) => {}
                Ok(key) => {
                    if !std::mem::replace(&mut meta_empty, false) {
                        out.push(',');
                    }
                    out.push_str(raw_key);
                    out.push(':');
                    out.push_str(value);
                    kept_keys.push(key);
                }
                Err(_) => bad = true,
            },
        )
        .map_err(|_| "params._meta must be an object".to_owned())?;
        if bad {
            return Err("params._meta must be an object".to_owned());
        }
        // After the gateway's envelope, a key a lenient server reads as one of its keys, or a
        // key given twice, would be the one read.
        if let Some((key, owned)) = kept_keys
            .iter()
            .find_map(|key| lookalike::read_as(key, &ENVELOPE_KEYS).map(|owned| (key, owned)))
        {
            return Err(format!(
                "params._meta[{:?}] is too like params._meta[{owned:?}]: servers differ on which they read",
                lookalike::shown(key)
            ));
        }
        if let Some(key) = json_scan::repeated_key(&mut kept_keys) {
            return Err(format!(
                "params._meta[{:?}] is given twice",
                lookalike::shown(key)
            ));
        }
    }
    out.push('}');
    let target_key = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    let mut target = None;
    for (key, raw_key, value) in members.iter().filter(|(k, ..)| k != "_meta") {
        out.push(',');
        out.push_str(raw_key);
        out.push(':');
        if target_key == Some(&**key) && value.starts_with('"') {
            target = Some(out.len()..out.len() + value.len());
        }
        out.push_str(value);
    }
    out.push('}');
    Ok(Prepared {
        params: Bytes::from(out),
        target,
        client_driven,
    })
}

/// The front's params with `envelope` put back at the start of `_meta`'s value, the rest as
/// it was: `None` if `_meta` is not where the front said.
fn put_back(left: &ParamsLeft, envelope: &str, client_driven: bool) -> Option<Prepared> {
    let bytes = &left.params[..];
    let kept = bytes
        .get(left.meta.clone())?
        .strip_prefix(b"{")?
        .strip_suffix(b"}")?;
    let mut out = Vec::with_capacity(bytes.len() + envelope.len() + 1);
    out.extend_from_slice(&bytes[..left.meta.start]);
    out.push(b'{');
    out.extend_from_slice(envelope.as_bytes());
    if !kept.is_empty() && !envelope.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(kept);
    out.push(b'}');
    let meta_end = out.len();
    out.extend_from_slice(&bytes[left.meta.end..]);
    // The target is outside `_meta`: after it, it moved by what `_meta` grew.
    let target = left.target.clone().map(|at| {
        if at.start >= left.meta.end {
            at.start - left.meta.end + meta_end..at.end - left.meta.end + meta_end
        } else {
            at
        }
    });
    Some(Prepared {
        params: Bytes::from(out),
        target,
        client_driven,
    })
}

/// [`prepare`] for params with a key given twice (or one that does not decode): read into a
/// map, as a decoder reads them, and written again.
fn prepare_decoded(
    method: &str,
    bytes: &[u8],
    envelope: &str,
    client_driven: bool,
) -> Result<Prepared, String> {
    let mut fields: Object<'_> =
        serde_json::from_slice(bytes).map_err(|_| "params must be an object".to_owned())?;
    let meta: Object<'_> = match fields.get("_meta") {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| "params._meta must be an object".to_owned())?,
        None => Object::new(),
    };
    // A retry's members go unless the client runs its own round trips; keys a lenient server
    // reads as them go always (they would carry answers no policy judged, or override the
    // state the gateway put back).
    let keeps_retry = client_driven && may_ask(method);
    fields.retain(
        |key, _| match lookalike::read_as(key, &["requestState", "inputResponses"]) {
            Some(owned) => keeps_retry && owned == &**key,
            None => true,
        },
    );
    // After the gateway's envelope, a key a lenient server reads as one of its keys would be
    // the one read.
    if let Some(key) = meta
        .keys()
        .find(|k| !is_envelope_key(k) && lookalike::read_as(k, &ENVELOPE_KEYS).is_some())
    {
        return Err(format!(
            "params._meta[{:?}] is too like an envelope key: servers differ on which they read",
            lookalike::shown(key)
        ));
    }
    let mut out = String::from("{");
    out.push_str(envelope);
    for (k, v) in meta.iter().filter(|(k, _)| !is_envelope_key(k)) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&json_string(k));
        out.push(':');
        out.push_str(v.get());
    }
    out.push('}');
    let meta_text = RawValue::from_string(out).map_err(|e| e.to_string())?;
    fields.insert(Cow::Borrowed("_meta"), &meta_text);
    let key = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    let params = Bytes::from(serde_json::to_vec(&fields).map_err(|e| e.to_string())?);
    // Where the target is in what was written: found by reading it back.
    let written: Object<'_> = serde_json::from_slice(&params).map_err(|e| e.to_string())?;
    let span = |name: &str| {
        written.get(name).map(|raw| {
            let at = raw.get().as_ptr() as usize - params.as_ptr() as usize;
            at..at + raw.get().len()
        })
    };
    let target = key.and_then(span).filter(|at| params[at.start] == b'"');
    Ok(Prepared {
        params,
        target,
        client_driven,
    })
}

impl Prepared {
    /// `params.arguments`, read only when asked for (a tool that marks arguments).
    fn arguments(&self) -> Option<&RawValue> {
        let text = std::str::from_utf8(&self.params).ok()?;
        let mut found = None;
        json_scan::members(text, json_scan::MAX_DEPTH, |key, value| {
            if json_scan::unquote(key).is_ok_and(|k| k == "arguments") {
                found = Some(value);
            }
        })
        .ok()?;
        serde_json::from_str(found?).ok()
    }

    /// `params.name` (tools/call, prompts/get) or `params.uri` (resources/read), when a string.
    pub(crate) fn target(&self) -> Option<Cow<'_, str>> {
        let raw = std::str::from_utf8(self.params.get(self.target.clone()?)?).ok()?;
        json_scan::unquote(raw).ok()
    }

    /// The params of the retry that answers a round: these answers, and the server's state.
    pub(crate) fn retry(&self, answers: &[(String, Bytes)], state: Option<&str>) -> Bytes {
        let mut fields: Object<'_> =
            serde_json::from_slice(&self.params).expect("prepared params are an object");
        let mut responses = String::from("{");
        for (i, (key, answer)) in answers.iter().enumerate() {
            if i > 0 {
                responses.push(',');
            }
            responses.push_str(&json_string(key));
            responses.push(':');
            responses.push_str(std::str::from_utf8(answer).unwrap_or("null"));
        }
        responses.push('}');
        let responses = RawValue::from_string(responses).ok();
        let state = state.map(|s| RawValue::from_string(json_string(s)).expect("a JSON string"));
        if let Some(r) = &responses {
            fields.insert(Cow::Borrowed("inputResponses"), r);
        }
        if let Some(s) = &state {
            fields.insert(Cow::Borrowed("requestState"), s);
        }
        Bytes::from(serde_json::to_vec(&fields).expect("raw values encode"))
    }
}

/// Params for an upstream of an earlier revision, if they must change: without the envelope
/// (such servers may refuse it) and without a retry's members (they cannot mean anything there).
pub(crate) fn for_sessions(params: &[u8]) -> Option<Bytes> {
    // Most params name none of these: one look each, with searchers built once.
    static MARKS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 3]> =
        std::sync::LazyLock::new(|| {
            [ENVELOPE_MARK, "requestState", "inputResponses"]
                .map(|m| memchr::memmem::Finder::new(m.as_bytes()))
        });
    let may =
        memchr::memchr(b'\\', params).is_some() || MARKS.iter().any(|f| f.find(params).is_some());
    if !may {
        return None;
    }
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow, rename = "_meta")]
        meta: Option<&'a RawValue>,
        #[serde(rename = "requestState")]
        state: Option<serde::de::IgnoredAny>,
        #[serde(rename = "inputResponses")]
        responses: Option<serde::de::IgnoredAny>,
    }
    // A key given twice fails here and takes the general way below.
    let top: Option<Top<'_>> = serde_json::from_slice(params).ok();
    if let Some(top) = top
        && top.state.is_none()
        && top.responses.is_none()
    {
        // The common case, a 2026 client's call: only `_meta`'s value changes, spliced in
        // place rather than the whole params encoded again.
        let raw = top.meta?;
        let meta: Object<'_> = serde_json::from_str(raw.get()).ok()?;
        if !meta.keys().any(|k| is_envelope_key(k)) {
            return None;
        }
        let rest: Object<'_> = meta
            .into_iter()
            .filter(|(k, _)| !is_envelope_key(k))
            .collect();
        let kept = serde_json::to_string(&rest).ok()?;
        let start = (raw.get().as_ptr() as usize).checked_sub(params.as_ptr() as usize)?;
        let end = start
            .checked_add(raw.get().len())
            .filter(|e| *e <= params.len())?;
        let mut out = Vec::with_capacity(params.len() - (end - start) + kept.len());
        out.extend_from_slice(&params[..start]);
        out.extend_from_slice(kept.as_bytes());
        out.extend_from_slice(&params[end..]);
        return Some(Bytes::from(out));
    }
    let mut fields: Object<'_> = serde_json::from_slice(params).ok()?;
    let mut changed = fields.remove("requestState").is_some();
    changed |= fields.remove("inputResponses").is_some();
    let kept;
    if let Some(raw) = fields.get("_meta")
        && let Ok(meta) = serde_json::from_str::<Object<'_>>(raw.get())
        && meta.keys().any(|k| is_envelope_key(k))
    {
        let rest: Object<'_> = meta
            .into_iter()
            .filter(|(k, _)| !is_envelope_key(k))
            .collect();
        kept = RawValue::from_string(serde_json::to_string(&rest).ok()?).ok()?;
        fields.insert(Cow::Borrowed("_meta"), &kept);
        changed = true;
    }
    changed.then(|| serde_json::to_vec(&fields).ok().map(Bytes::from))?
}

/// One question of an `input_required` result.
#[derive(Debug)]
pub(crate) struct InputRequest {
    /// The server's key for the answer.
    pub key: String,
    /// `elicitation/create`, `sampling/createMessage` or `roots/list`.
    pub method: String,
    /// Its params, as sent.
    pub params: Option<Bytes>,
}

/// What an `input_required` result asks.
#[derive(Debug)]
pub(crate) struct InputRequired {
    /// The questions.
    pub requests: Vec<InputRequest>,
    /// The server's `requestState`, to echo on the retry.
    pub state: Option<String>,
}

/// Why `result`, which does not read as an `input_required` result, cannot be one; `None` if it
/// does not say it is one.
fn malformed_input_required(result: &[u8]) -> Option<String> {
    use crate::json_scan::{MAX_DEPTH, members, unquote};
    let text = std::str::from_utf8(result).ok()?;
    let (mut says, mut kinds, mut requests_ok, mut state_ok) = (false, 0, true, true);
    members(text, MAX_DEPTH, |key, value| {
        match unquote(key).as_deref() {
            Ok("resultType") => {
                kinds += 1;
                says |= unquote(value).is_ok_and(|v| v == "input_required");
            }
            Ok("inputRequests") => requests_ok &= value.starts_with('{') || value == "null",
            Ok("requestState") => state_ok &= value.starts_with('"') || value == "null",
            _ => {}
        }
    })
    .ok()?;
    if !says {
        return None;
    }
    Some(
        if kinds > 1 {
            "the server's result names its resultType more than once"
        } else if !requests_ok {
            "the server's inputRequests is not an object"
        } else if !state_ok {
            "the server's requestState is not a string"
        } else {
            "the server's input_required result is malformed"
        }
        .to_owned(),
    )
}

/// The questions of a result, if it is `input_required`; `Err` if it is one the gateway cannot
/// relay (too many questions, or one that is not a client request).
pub(crate) fn input_required(result: &[u8]) -> Option<Result<InputRequired, String>> {
    static INPUT_REQUIRED: crate::needle::Needle = crate::needle::Needle::new("input_required");
    if !INPUT_REQUIRED.is_in(result) && memchr::memchr(b'\\', result).is_none() {
        return None;
    }
    // Only an object is a result (serde's derive would read an array as the struct's fields).
    if !result.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    #[derive(Deserialize)]
    struct R<'a> {
        #[serde(rename = "resultType")]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow, rename = "inputRequests", default)]
        requests: BTreeMap<String, &'a RawValue>,
        #[serde(rename = "requestState")]
        state: Option<String>,
    }
    #[derive(Deserialize)]
    struct Q<'a> {
        method: String,
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let r: R<'_> = match serde_json::from_slice(result) {
        Ok(r) => r,
        // Not this shape: an `input_required` result it does not fit is refused, not passed
        // on as an answer (a client of sessions would be handed the server's questions and
        // state as the call's result).
        Err(_) => return malformed_input_required(result).map(Err),
    };
    if r.kind.as_deref() != Some("input_required") {
        return None;
    }
    Some((|| {
        if r.requests.len() > MAX_INPUT_REQUESTS {
            return Err(format!(
                "the server asked {} questions at once (at most {MAX_INPUT_REQUESTS})",
                r.requests.len()
            ));
        }
        let mut requests = Vec::with_capacity(r.requests.len());
        for (key, raw) in r.requests {
            let q: Q<'_> = serde_json::from_str(raw.get())
                .map_err(|_| "an input request is not a request".to_owned())?;
            if !matches!(
                q.method.as_str(),
                "elicitation/create" | "sampling/createMessage" | "roots/list"
            ) {
                return Err(
                    "an input request asks for a method a client does not answer (elicitation/create, sampling/createMessage and roots/list are)"
                        .to_owned(),
                );
            }
            requests.push(InputRequest {
                key,
                method: q.method,
                params: q.params.map(|p| Bytes::copy_from_slice(p.get().as_bytes())),
            });
        }
        if requests.is_empty() && r.state.is_none() {
            return Err("an input_required result with no requests and no state".into());
        }
        Ok(InputRequired {
            requests,
            state: r.state,
        })
    })())
}

/// The headers that mirror a request (2026-07-28): its method, its target, and the tool
/// arguments the tool's schema marks `x-mcp-header`.
pub(crate) fn mirrored_headers(
    method: &str,
    prepared: &Prepared,
    marks: Option<&ToolHeaders>,
) -> Vec<(HeaderName, HeaderValue)> {
    const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
    const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
    let mut out = Vec::with_capacity(2);
    // The revision's methods are static text: a header of them copies nothing.
    let method_value = METHODS
        .iter()
        .find(|m| **m == method)
        .map(|m| HeaderValue::from_static(m))
        .or_else(|| HeaderValue::from_str(method).ok());
    if let Some(v) = method_value {
        out.push((MCP_METHOD, v));
    }
    let target = prepared.target();
    if let Some(target) = &target {
        // A plain name is the params' own bytes: shared, not copied.
        let shared = match target {
            Cow::Borrowed(text) if is_plain_header(text) => {
                HeaderValue::from_maybe_shared(prepared.params.slice_ref(text.as_bytes())).ok()
            }
            _ => None,
        };
        out.push((MCP_NAME, shared.unwrap_or_else(|| header_value(target))));
    }
    if let (Some(marks), Some(tool)) = (marks, &target)
        && let marked = marks.of(tool)
        && !marked.is_empty()
        && let Some(args) = prepared.arguments()
        && let Ok(values) = crate::mcp::param_headers::marked_values(marked, args)
    {
        for ((_, suffix), value) in marked.iter().zip(values) {
            let Some(Some(Some(text))) = value.map(crate::mcp::param_headers::mirrored_text) else {
                continue;
            };
            if let Ok(name) = HeaderName::try_from(format!("mcp-param-{suffix}")) {
                out.push((name, header_value(&text)));
            }
        }
    }
    out
}

/// The methods of 2026-07-28 requests the gateway sends upstream.
const METHODS: [&str; 9] = [
    "tools/call",
    "tools/list",
    "prompts/get",
    "prompts/list",
    "resources/read",
    "resources/list",
    "resources/templates/list",
    "completion/complete",
    "server/discover",
];

/// Whether a mirrored value goes in a header as it is: visible ASCII without edge spaces, not
/// starting as an encoded value does.
fn is_plain_header(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.starts_with("=?")
}

/// A mirrored value as a header: plain when it is visible ASCII without edge spaces, else
/// `=?base64?…?=` (what the revision prescribes for anything else).
fn header_value(text: &str) -> HeaderValue {
    if is_plain_header(text)
        && let Ok(v) = HeaderValue::from_str(text)
    {
        return v;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    HeaderValue::from_str(&format!("=?base64?{encoded}?=")).expect("base64 is a valid header")
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings encode")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const INIT: &[u8] = br#"{"protocolVersion":"2025-11-25","capabilities":{"elicitation":{}},"clientInfo":{"name":"c","version":"1"}}"#;

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn a_session_clients_request_carries_the_sessions_envelope() {
        let env = envelope(INIT, Some("info"));
        let p = prepare(
            "tools/call",
            Some(br#"{"name":"t","arguments":{"a":1},"_meta":{"progressToken":7,"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"sampling":{}},"io.modelcontextprotocol/related-task":{"taskId":"x"}},"requestState":"x","inputResponses":{}}"#),
            &env,
            false, None)
        .unwrap();
        assert!(!p.client_driven);
        assert_eq!(p.target().as_deref(), Some("t"));
        let v = parse(&p.params);
        let meta = &v["_meta"];
        assert_eq!(meta[VERSION_KEY], "2026-07-28");
        assert_eq!(meta[CAPABILITIES_KEY], json!({"elicitation": {}}));
        assert_eq!(meta[INFO_KEY]["name"], "c");
        assert_eq!(meta[LEVEL_KEY], "info");
        assert_eq!(meta["progressToken"], 7);
        // Not the envelope's: it passes.
        assert_eq!(meta["io.modelcontextprotocol/related-task"]["taskId"], "x");
        // A session client naming a version in _meta is still a session client.
        assert!(v.get("requestState").is_none() && v.get("inputResponses").is_none());
    }

    #[test]
    fn a_2026_clients_own_envelope_and_retry_pass_unchanged() {
        let raw = br#"{"name":"t","_meta":{"progressToken":1},"inputResponses":{"k":{}}}"#;
        let client = r#""io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"roots":{}}"#;
        let p = prepare("tools/call", Some(raw), client, true, None).unwrap();
        assert!(p.client_driven);
        let v = parse(&p.params);
        assert_eq!(v["_meta"][CAPABILITIES_KEY], json!({"roots": {}}));
        assert_eq!(v["_meta"]["progressToken"], 1);
        assert_eq!(v["inputResponses"], json!({"k": {}}));
        let retry = parse(&p.retry(
            &[("k2".into(), Bytes::from_static(b"{\"a\":1}"))],
            Some("s"),
        ));
        assert_eq!(retry["requestState"], "s");
        assert_eq!(retry["inputResponses"], json!({"k2": {"a": 1}}));
        assert!(prepare("tools/call", Some(b"[1]"), "", true, None).is_err());
        // Only requests that may ask carry a retry's members, even a 2026 client's.
        let listed = br#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"},"requestState":"s"}"#;
        let p = prepare("tools/list", Some(listed), "", true, None).unwrap();
        assert!(parse(&p.params).get("requestState").is_none());
    }

    #[test]
    fn params_are_read_as_a_decoder_reads_them() {
        // A key given twice: the value a decoder keeps (the last), written once.
        let twice = br#"{"name":"a","arguments":{"x":1},"name":"t","arguments":{"region":"eu"}}"#;
        let p = prepare("tools/call", Some(twice), r#""k":1"#, false, None).unwrap();
        let v = parse(&p.params);
        assert_eq!(v["name"], "t");
        assert_eq!(p.target().as_deref(), Some("t"));
        assert_eq!(p.arguments().unwrap().get(), r#"{"region":"eu"}"#);
        // Escaped keys and values are read decoded and passed as written.
        let escaped = br#"{"n\u0061me":"\u0074","arguments":{"a":[1]},"_meta":{"io.modelcontextprotocol\/protocolVersion":"x","pro\u0067ressToken":7}}"#;
        let p = prepare("tools/call", Some(escaped), r#""k":1"#, false, None).unwrap();
        assert_eq!(p.target().as_deref(), Some("t"));
        assert_eq!(p.arguments().unwrap().get(), r#"{"a":[1]}"#);
        let v = parse(&p.params);
        assert_eq!(v["_meta"], json!({"k": 1, "progressToken": 7}));
        assert_eq!(v["arguments"], json!({"a": [1]}));
        for bad in [
            &br#"{"_meta":null}"#[..],
            br#"{"_meta":[]}"#,
            br#"{"a":1"#,
            b"\xff",
            // Written after the gateway's own, a server reading the last would read these.
            br#"{"_META":{"io.modelcontextprotocol/protocolVersion":"forged"}}"#,
            br#"{"name":"a","NAME":"b"}"#,
            br#"{"arguments":{},"Arguments":{}}"#,
            br#"{"_meta":{"x":1,"x":2}}"#,
            br#"{"_meta":{"io.modelcontextprotocol/protocolversion":"forged"}}"#,
            // A key given twice takes the decoder's way, which refuses the same.
            br#"{"x":1,"x":2,"_meta":{"io.modelcontextprotocol/protocolversion":"forged"}}"#,
        ] {
            assert!(prepare("tools/call", Some(bad), "", false, None).is_err());
        }
    }

    #[test]
    fn keys_read_as_a_retrys_members_never_reach_the_server() {
        let raw = br#"{"name":"t","requestState":"sealed","inputRe\u017fponses":{"q":1},"REQUESTSTATE":"mine","InputResponses\u0000":{},"inputs":2}"#;
        for (method, client_driven) in [
            ("tools/call", true),
            ("tools/call", false),
            ("tools/list", true),
        ] {
            let p = prepare(method, Some(raw), "", client_driven, None).unwrap();
            let v = parse(&p.params);
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| &**k).collect();
            let kept = client_driven && method == "tools/call";
            let expected: &[&str] = if kept {
                &["_meta", "inputs", "name", "requestState"]
            } else {
                &["_meta", "inputs", "name"]
            };
            assert_eq!(keys, expected, "{method}, client driven: {client_driven}");
            // The retry puts back the gateway's own members and nothing else reads as them.
            let retry = parse(&p.retry(&[("q".into(), Bytes::from_static(b"2"))], Some("s")));
            assert_eq!(retry["requestState"], "s");
            assert_eq!(retry["inputResponses"], json!({"q": 2}));
            assert_eq!(
                retry.as_object().unwrap().len(),
                expected.len() + 1 + usize::from(!kept)
            );
        }
    }

    #[test]
    fn earlier_revisions_never_see_the_envelope_or_retry_members() {
        assert!(for_sessions(br#"{"name":"t","_meta":{"progressToken":1}}"#).is_none());
        let out = for_sessions(br#"{"name":"t","_meta":{"progressToken":1,"io.modelcontextprotocol/protocolVersion":"2026-07-28"},"requestState":"s","inputResponses":{}}"#).unwrap();
        assert_eq!(
            parse(&out),
            json!({"name": "t", "_meta": {"progressToken": 1}})
        );
        // An escaped key is still the envelope's; a nested `_meta` is the arguments' own.
        let escaped = for_sessions(br#"{"_meta":{"io.modelcontextprotocol\/protocolVersion":"2026-07-28"},"arguments":{"_meta":1}}"#).unwrap();
        assert_eq!(
            parse(&escaped),
            json!({"_meta": {}, "arguments": {"_meta": 1}})
        );
    }

    #[test]
    fn input_required_results_are_read_and_bounded() {
        assert!(input_required(br#"{"content":[]}"#).is_none());
        assert!(input_required(br#"{"resultType":"complete","x":"input_required"}"#).is_none());
        let ir = input_required(br#"{"resultType":"input_required","inputRequests":{"user_name":{"method":"elicitation/create","params":{"message":"?"}}},"requestState":"abc"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(ir.requests.len(), 1);
        assert_eq!(ir.requests[0].key, "user_name");
        assert_eq!(ir.state.as_deref(), Some("abc"));
        let odd = input_required(
            br#"{"resultType":"input_required","inputRequests":{"k":{"method":"tools/call"}}}"#,
        )
        .unwrap();
        assert!(
            odd.unwrap_err()
                .contains("a method a client does not answer")
        );
        let many: String = (0..17)
            .map(|i| format!(r#""k{i}":{{"method":"roots/list"}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let many = format!(r#"{{"resultType":"input_required","inputRequests":{{{many}}}}}"#);
        assert!(input_required(many.as_bytes()).unwrap().is_err());
        let empty = input_required(br#"{"resultType":"input_required"}"#).unwrap();
        assert!(empty.is_err());
        // Shapes that do not read as one are refused, saying which field is wrong.
        for (result, why) in [
            (
                r#"{"resultType":"input_required","inputRequests":[{"method":"roots/list"}],"requestState":"s"}"#,
                "the server's inputRequests is not an object",
            ),
            (
                r#"{"resultType":"input_required","inputRequests":{"k":{"method":"roots/list"}},"requestState":5}"#,
                "the server's requestState is not a string",
            ),
            (
                r#"{"resultType":"input_required","inputRequests":{"k":{"method":"roots/list"}},"requestState":"s","resultType":"x"}"#,
                "the server's result names its resultType more than once",
            ),
            (
                r#"{"result\u0054ype":"input_required","inputRequests":{"k":{"method":"roots/list"}},"requestState":"s","resultType":"input_required"}"#,
                "the server's result names its resultType more than once",
            ),
        ] {
            let refused = input_required(result.as_bytes()).expect(result);
            assert_eq!(refused.unwrap_err(), why, "{result}");
        }
        // An array is no result, whatever it holds.
        assert!(
            input_required(br#"["input_required",{"q":{"method":"roots/list"}},"s"]"#).is_none()
        );
        // What does not say it is one still passes.
        assert!(
            input_required(br#"{"resultType":5,"inputRequests":[],"x":"input_required"}"#)
                .is_none()
        );
        assert!(
            input_required(br#"{"resultType":"complete","requestState":5,"y":"input_required"}"#)
                .is_none()
        );
    }

    #[test]
    fn mirrored_values_are_plain_or_base64() {
        assert_eq!(header_value("eu-west-1"), "eu-west-1");
        assert_eq!(header_value(" padded"), "=?base64?IHBhZGRlZA==?=");
        assert_eq!(header_value("héllo"), "=?base64?aMOpbGxv?=");
        assert_eq!(header_value("a\r\nb"), "=?base64?YQ0KYg==?=");
        let mut marks = ToolHeaders::default();
        marks
            .learn(br#"{"tools":[{"name":"t","inputSchema":{"properties":{"region":{"x-mcp-header":"Region"},"n":{"x-mcp-header":"N"}}}}]}"#)
            .unwrap();
        let p = prepare(
            "tools/call",
            Some(br#"{"name":"t","arguments":{"region":"eu","n":3}}"#),
            "",
            false,
            None,
        )
        .unwrap();
        let mut h: Vec<(String, String)> = mirrored_headers("tools/call", &p, Some(&marks))
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        h.sort();
        assert_eq!(
            h,
            [
                ("mcp-method".into(), "tools/call".into()),
                ("mcp-name".into(), "t".into()),
                ("mcp-param-n".into(), "3".into()),
                ("mcp-param-region".into(), "eu".into())
            ]
        );
    }

    #[test]
    fn discover_results_name_the_revision() {
        assert!(speaks_stateless(
            br#"{"supportedVersions":["2025-11-25","2026-07-28"]}"#
        ));
        assert!(!speaks_stateless(
            br#"{"supportedVersions":["2025-11-25"]}"#
        ));
        assert!(!speaks_stateless(br#"{}"#));
        let f = parse(&discover_frame(&envelope(INIT, None)));
        assert_eq!(f["method"], "server/discover");
        assert_eq!(f["params"]["_meta"][VERSION_KEY], "2026-07-28");
    }
}
