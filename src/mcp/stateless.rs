//! The 2026-07-28 front: stateless requests on the same endpoint as sessions.
//!
//! A request without `Mcp-Session-Id` that names revision 2026-07-28 (in `_meta`, in the
//! `MCP-Protocol-Version` header, or by being `server/discover`) carries everything it needs:
//! its version and the client's capabilities in `_meta`, its method and target mirrored in
//! headers. Checks run in order: `_meta` (400, -32602), mirrored headers (400, -32020), version
//! (400, -32022), method (404, -32601). The request then runs in the principal's hidden session
//! ([`Gateway::stateless_session`]), whose upstream sessions the gateway keeps, and every result
//! carries `resultType`.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::auth::{Claims, Principal};
use crate::body::Body;
use crate::body::{Fed, Uptake, accepted, json_response, watched_sse_response};
use crate::config::profiles::ProfileConfig;
use crate::gateway::Gateway;
use crate::json_scan;
use crate::mcp::handler::{self, Reply};
use crate::mcp::jsonrpc::{self, Kind, Message, Outcome, code};
use crate::mcp::lookalike;
use crate::mcp::revision;
use crate::mcp::revision::envelope::{
    CAPABILITIES as CAPS_KEY, KEYS as ENVELOPE_KEYS, LEVEL as LEVEL_KEY, VERSION as VERSION_KEY,
};
use crate::mcp::round_trip;
use crate::mcp::router::ResourceRoute;
use crate::mcp::session::{BusyGuard, Session, caps};
use crate::mcp::subscriptions;
use crate::needle::Needle;

const VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");
const METHOD_HEADER: HeaderName = HeaderName::from_static("mcp-method");
const NAME_HEADER: HeaderName = HeaderName::from_static("mcp-name");

static INPUT_REQUIRED: Needle = Needle::new("input_required");
static ERROR_MEMBER: Needle = Needle::new("\"error\"");
/// The members of a result the gateway owns.
const OWNED_MEMBERS: [&str; 3] = ["resultType", "ttlMs", "cacheScope"];

/// How many strings of `result` may name a member the gateway owns, up to two: strings that
/// read as one of [`OWNED_MEMBERS`] to a lenient decoder (`ResultType`, `TTLMS`, with a long
/// s); any escape counts as two. One pass over its quotes: every key starts after one.
fn owned_names(result: &[u8]) -> usize {
    if memchr::memchr(b'\\', result).is_some() {
        return 2;
    }
    // Most strings are told apart by their first letter (`| 0x20` lowers exactly the ASCII
    // letters that could start an owned member): only the rest are read.
    let may_own = |at: usize| {
        result
            .get(at + 1)
            .is_some_and(|b| matches!(b | 0x20, b'r' | b't' | b'c'))
            && names_owned(&result[at + 1..])
    };
    let mut found = 0;
    // A short result's quotes are dense: found a word at a time, rather than by a vector
    // search set up again for each of them.
    if result.len() <= 1024 {
        json_scan::each_quote(result, |at| {
            found += usize::from(may_own(at));
            found < 2
        });
    } else {
        found = memchr::memchr_iter(b'"', result)
            .filter(|&at| may_own(at))
            .take(2)
            .count();
    }
    found
}

/// Whether the string whose text starts `rest` (just past its opening quote, on a letter
/// that starts an owned member) may read as an owned member.
#[inline(never)]
fn names_owned(rest: &[u8]) -> bool {
    // Where the bytes that could be such a string are ASCII, only the member its first letter
    // starts can match, as it is spelled, ignoring case, and closed by a quote.
    let window = &rest[..rest.len().min(12)];
    if window.is_ascii() {
        let first = rest[0] | 0x20;
        let Some(owned) = OWNED_MEMBERS.iter().find(|o| o.as_bytes()[0] == first) else {
            return false;
        };
        return rest.get(owned.len()) == Some(&b'"')
            && rest[..owned.len()].eq_ignore_ascii_case(owned.as_bytes());
    }
    // Else strings 5 to 11 bytes long (a long s taking two), alike once folded.
    let Some(token) = rest
        .iter()
        .take(12)
        .position(|b| *b == b'"')
        .filter(|end| *end >= 5)
        .map(|end| &rest[..end])
    else {
        return false;
    };
    // An ASCII token (no NUL: it would be escaped) folds to its ASCII lower case.
    if token.is_ascii() {
        return OWNED_MEMBERS
            .iter()
            .any(|owned| owned.as_bytes().eq_ignore_ascii_case(token));
    }
    std::str::from_utf8(token)
        .is_ok_and(|token| crate::mcp::lookalike::read_as(token, &OWNED_MEMBERS).is_some())
}

/// Whether the result object `text` already says it is complete, as the gateway would, and
/// names nothing else the gateway owns: its last member is `"resultType":"complete"` and no
/// other string reads as an owned member (a 2026-07-28 server's usual result). With no
/// escapes, a quote always opens or closes a string, so that last member is the object's own.
fn says_complete_alone(text: &[u8]) -> bool {
    const LAST: &[u8] = br#""resultType":"complete"}"#;
    let text = text.trim_ascii_end();
    text.len() > LAST.len()
        && text.ends_with(LAST)
        && matches!(text[text.len() - LAST.len() - 1], b',' | b'{')
        && owned_names(text) == 1
}

/// The members of the result object `text` but those the gateway owns ([`OWNED_MEMBERS`]),
/// written after its `{` (`"key":value,…}`), in one walk that keeps the rest as written. A
/// key a lenient client reads as an owned member is refused (written after the gateway's own,
/// such a client would read it instead), and so is a `resultType` other than `complete` (an
/// `input_required` reaches this only from a server that cannot mean it).
fn without_owned_members(text: &[u8]) -> Result<Vec<u8>, String> {
    let not_object = || "the upstream's result is not a JSON object".to_owned();
    let text = std::str::from_utf8(text).map_err(|_| not_object())?;
    let mut out = Vec::with_capacity(text.len());
    let mut refused = None;
    json_scan::members(text, json_scan::MAX_DEPTH, |raw_key, value| {
        if refused.is_some() {
            return;
        }
        let Ok(key) = json_scan::unquote(raw_key) else {
            refused = Some(not_object());
            return;
        };
        match lookalike::read_as(&key, &OWNED_MEMBERS) {
            Some(owned) if owned != key => {
                refused = Some(format!(
                    "the upstream's result has a key {:?} that lenient clients read as {owned}",
                    lookalike::shown(&key)
                ));
            }
            Some("resultType") if value != r#""complete""# => {
                refused = Some(format!(
                    "the upstream's result claims resultType {value}, which a server of its revision cannot mean"
                ));
            }
            Some(_) => {}
            None => {
                if !out.is_empty() {
                    out.push(b',');
                }
                out.extend_from_slice(raw_key.as_bytes());
                out.push(b':');
                out.extend_from_slice(value.as_bytes());
            }
        }
    })
    .map_err(|_| not_object())?;
    if let Some(why) = refused {
        return Err(why);
    }
    out.push(b'}');
    Ok(out)
}

/// How long to wait for more questions after a server's first one, to ask them in one round.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);
/// Questions asked in one round at most.
const MAX_QUESTIONS: usize = 16;

/// Whether a frame is a request (a server's question), by its members.
fn is_request(frame: &Bytes) -> bool {
    matches!(
        jsonrpc::parse(frame.clone()).map(|m| m.kind),
        Ok(Kind::Request { .. })
    )
}

/// How long a client may reuse a `server/discover` answer.
const DISCOVER_TTL_MS: u64 = 60_000;

/// The headers a stateless request mirrors its body in, taken before the body is read.
/// Borrowed from the request's headers, kept while its body is read: no copies per request.
#[derive(Default)]
pub(crate) struct Mirrored<'h> {
    version: Option<&'h HeaderValue>,
    method: Option<&'h HeaderValue>,
    name: Option<&'h HeaderValue>,
    /// `Mcp-Param-*` headers by lowercase suffix.
    params: Vec<(&'h str, &'h HeaderValue)>,
    /// A header of the three above given more than once: which one a proxy or server reads
    /// would be a guess, so the request is refused.
    twice: Option<&'static str>,
}

impl<'h> Mirrored<'h> {
    /// Takes the mirrored headers of a request.
    pub(crate) fn of(headers: &'h HeaderMap) -> Mirrored<'h> {
        // One walk over the few headers a request has, rather than a hashed lookup for each
        // name and a walk for the prefix.
        let mut m = Mirrored::default();
        for (k, v) in headers {
            let (slot, name) = match k.as_str() {
                n if n == VERSION_HEADER.as_str() => (&mut m.version, "MCP-Protocol-Version"),
                n if n == METHOD_HEADER.as_str() => (&mut m.method, "Mcp-Method"),
                n if n == NAME_HEADER.as_str() => (&mut m.name, "Mcp-Name"),
                n => {
                    if let Some(suffix) = n.strip_prefix(PARAM_HEADER_PREFIX) {
                        m.params.push((suffix, v));
                    }
                    continue;
                }
            };
            if slot.is_none() {
                *slot = Some(v);
            } else {
                m.twice.get_or_insert(name);
            }
        }
        m
    }

    /// The decoded text of the `Mcp-Param-{suffix}` header: `None` if absent, `Some(None)` if
    /// it cannot be decoded (or is sent twice).
    fn param(&self, suffix: &str) -> Option<Option<String>> {
        let mut sent = self.params.iter().filter(|(s, _)| *s == suffix);
        let (_, value) = sent.next()?;
        Some(if sent.next().is_some() {
            None
        } else {
            header_text(value)
        })
    }
}

/// Headers that mirror tool arguments marked `x-mcp-header` (lowercase, as HTTP gives them).
const PARAM_HEADER_PREFIX: &str = "mcp-param-";

/// Whether a message without a session is a 2026-07-28 stateless one.
pub(crate) fn is_stateless(mirrored: &Mirrored<'_>, msg: &Message) -> bool {
    if mirrored
        .version
        .as_ref()
        .is_some_and(|v| v.as_bytes() == revision::STATELESS.as_bytes())
    {
        return true;
    }
    match &msg.kind {
        // `initialize` has session semantics unless the header says otherwise.
        Kind::Request { method, .. } if &**method == "initialize" => false,
        Kind::Request { method, .. } if &**method == "server/discover" => true,
        Kind::Request { params, .. } | Kind::Notification { params, .. } => {
            params.as_deref().is_some_and(names_a_version)
        }
        Kind::Response { .. } => false,
    }
}

/// Whether params carry `_meta[VERSION_KEY]` (found literally, else by a parse when a key may
/// be escaped).
fn names_a_version(params: &[u8]) -> bool {
    static VERSION: Needle = Needle::new(VERSION_KEY);
    if VERSION.is_in(params) {
        return true;
    }
    if memchr::memchr(b'\\', params).is_none() {
        return false;
    }
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "_meta")]
        meta: Option<std::collections::BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>>,
    }
    serde_json::from_slice::<P<'_>>(params)
        .ok()
        .and_then(|p| p.meta)
        .is_some_and(|m| m.contains_key(VERSION_KEY))
}

/// Why a stateless request was refused before it ran.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum Refusal {
    /// `_meta` is missing or malformed.
    #[error("{0}")]
    Meta(String),
    /// Other params are malformed.
    #[error("{0}")]
    Params(String),
    /// The version in `_meta` is not served statelessly.
    #[error("unsupported protocol version {0:?}; this gateway serves {stateless} without a session, and {sessions} with initialize", stateless = revision::STATELESS, sessions = revision::SUPPORTED.join(", "))]
    Version(String),
    /// A mirrored header is missing or disagrees with the body.
    #[error("{0}")]
    Header(String),
    /// No such method in this revision.
    #[error("method not found: {0}")]
    Method(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Method(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn frame(&self, id: &[u8]) -> Bytes {
        let message = self.to_string();
        match self {
            Refusal::Meta(_) | Refusal::Params(_) => {
                jsonrpc::error_response(Some(id), code::INVALID_PARAMS, &message)
            }
            Refusal::Version(requested) => {
                // Only what this path serves: the session revisions need `initialize`.
                let data = serde_json::json!({
                    "supported": [revision::STATELESS],
                    "requested": requested,
                });
                jsonrpc::error_response_with_data(
                    Some(id),
                    code::UNSUPPORTED_PROTOCOL_VERSION,
                    &message,
                    data.to_string().as_bytes(),
                )
            }
            Refusal::Header(_) => {
                jsonrpc::error_response(Some(id), code::HEADER_MISMATCH, &message)
            }
            Refusal::Method(_) => {
                jsonrpc::error_response(Some(id), code::METHOD_NOT_FOUND, &message)
            }
        }
    }
}

/// What a stateless request's `_meta` says about it.
#[derive(Debug, PartialEq)]
pub(crate) struct RequestMeta {
    /// The revision the request speaks (the one served is not copied).
    pub version: std::borrow::Cow<'static, str>,
    /// The lowest log severity the client wants on this request's stream; `None`: no logs.
    pub log_level: Option<u8>,
    /// The client capabilities the request declares (a JSON object, as sent: a slice of the
    /// request).
    pub capabilities: Bytes,
}

/// A stateless request's params, read in one pass: what `_meta` says, the target its headers
/// must name, and a retry's members. The params go on as they are: a link to a server of an
/// earlier revision takes out what that server would not understand.
pub(crate) struct Read {
    /// What `_meta` says.
    pub meta: RequestMeta,
    /// `params.name` (tools/call, prompts/get) or `params.uri` (resources/read).
    pub target: Option<String>,
    /// A retry's `requestState` and `inputResponses`.
    pub retry: round_trip::Retry,
    /// The envelope's members of `_meta` (`"key":value,…`, UTF-8), taken out of the params: a
    /// server of an earlier revision must not see them, one of this revision is sent them. A
    /// slice of the request when `_meta` holds nothing else.
    pub envelope: Bytes,
    /// The params without the envelope.
    pub params: Bytes,
    /// Where in `params` the front wrote `_meta` and found the target.
    pub left: crate::upstream::ParamsLeft,
}

fn severity(level: &str) -> Option<u8> {
    revision::LOG_LEVELS
        .iter()
        .position(|l| *l == level)
        .map(|p| p as u8)
}

/// Writes the member `key: value`: the key as it came when it was `plain` (nothing in it was
/// escaped), else escaped as serde escapes it; the value as written.
fn put_member(out: &mut Vec<u8>, key: &str, plain: bool, value: &str) {
    if plain {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, key).expect("a string serializes into a vector")
    }
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
}

/// The envelope's members of `_meta` (the JSON text `meta`, read and checked by [`read_meta`]),
/// written one after another with their keys as the gateway spells them.
fn envelope_members(meta: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(meta.len());
    let _ = json_scan::members(meta, json_scan::MAX_DEPTH, |raw_key, value| {
        if let Ok(key) = json_scan::unquote(raw_key)
            && ENVELOPE_KEYS.contains(&&*key)
        {
            if !out.is_empty() {
                out.push(b',');
            }
            put_member(&mut out, &key, matches!(key, Cow::Borrowed(_)), value);
        }
    });
    out
}

/// What [`read_meta`] read of the envelope.
#[derive(Default)]
struct Envelope<'a> {
    version: Option<&'a str>,
    capabilities: Option<&'a str>,
    level: Option<&'a str>,
    /// Whether `_meta` is the envelope alone, every key as the gateway spells it: its members
    /// are then sent on as they came, not written again.
    alone: bool,
}

/// The progress token's key in `_meta`: the gateway routes progress notifications by it.
const PROGRESS_KEY: &str = "progressToken";

/// The keys of `_meta` the gateway reads: no other key may be one a server could read as one
/// of them ([`crate::mcp::lookalike`]).
const READ_BY_GATEWAY: [&str; 5] = [
    ENVELOPE_KEYS[0],
    ENVELOPE_KEYS[1],
    ENVELOPE_KEYS[2],
    ENVELOPE_KEYS[3],
    PROGRESS_KEY,
];

/// The members of `_meta`, as [`json_scan::members`] hands them out: most requests carry four
/// or fewer.
type MetaMembers<'a> = smallvec::SmallVec<[(&'a str, &'a str); 4]>;

/// Reads the members of `_meta` in the order they came: the envelope's values, and the
/// members that stay, written as an object onto `kept` (the params being rebuilt without the
/// envelope).
fn read_meta<'a>(
    members: &[(&'a str, &'a str)],
    kept: &mut Vec<u8>,
) -> Result<Envelope<'a>, Refusal> {
    let not_object = || Refusal::Meta("params._meta must be an object".into());
    let mut envelope = Envelope {
        alone: true,
        ..Envelope::default()
    };
    // Every key, to refuse one given twice: the gateway would read one value and the server
    // perhaps the other (a version, a progress token it routes by).
    let mut keys: smallvec::SmallVec<[Cow<'a, str>; 8]> = smallvec::SmallVec::new();
    let mut too_like = None;
    let mut undecodable = false;
    kept.push(b'{');
    let opened = kept.len();
    for &(raw_key, value) in members {
        let Ok(key) = json_scan::unquote(raw_key) else {
            undecodable = true;
            continue;
        };
        let slot = match &*key {
            VERSION_KEY => Some(&mut envelope.version),
            CAPS_KEY => Some(&mut envelope.capabilities),
            LEVEL_KEY => Some(&mut envelope.level),
            _ => None,
        };
        if let Some(slot) = slot {
            *slot = Some(value);
            envelope.alone &= matches!(key, Cow::Borrowed(_));
        } else if ENVELOPE_KEYS.contains(&&*key) {
            envelope.alone &= matches!(key, Cow::Borrowed(_));
        } else {
            envelope.alone = false;
            if too_like.is_none()
                && &*key != PROGRESS_KEY
                && let Some(owned) = lookalike::read_as(&key, &READ_BY_GATEWAY)
            {
                too_like = Some(format!(
                    "params._meta[{:?}] is too like params._meta[{owned:?}]: servers differ on which they read",
                    lookalike::shown(&key)
                ));
            }
            if kept.len() > opened {
                kept.push(b',');
            }
            put_member(kept, &key, matches!(key, Cow::Borrowed(_)), value);
        }
        keys.push(key);
    }
    if undecodable {
        return Err(not_object());
    }
    kept.push(b'}');
    match (json_scan::repeated_key(&mut keys), too_like) {
        (Some(key), _) => Err(Refusal::Meta(format!(
            "params._meta[{:?}] is given twice",
            lookalike::shown(key)
        ))),
        (None, Some(why)) => Err(Refusal::Meta(why)),
        (None, None) => Ok(envelope),
    }
}

/// The server a request that may ask for input (`method` on `target`) reaches in `session`.
fn server_asked(session: &Session, method: &str, target: Option<&str>) -> Option<usize> {
    match (method, target) {
        ("tools/call", Some(name)) => session.resolve_tool(name).map(|r| r.0),
        ("prompts/get", Some(name)) => session.resolve_prompt(name).map(|r| r.0),
        ("resources/read", Some(uri)) => {
            match session.topology().router.resource(
                uri,
                |i| session.serves_resource(i, uri),
                |_| true,
            ) {
                ResourceRoute::One(i) => Some(i),
                ResourceRoute::Unknown | ResourceRoute::Ambiguous(_) => None,
            }
        }
        _ => None,
    }
}

/// The members of a stateless request's params that the gateway reads.
/// The members a lenient server must read as the gateway did: those the gateway reads, and the
/// arguments that `Mcp-Param-*` headers mirror.
const LOOKALIKE_KEYS: [&str; 6] = [
    "_meta",
    "name",
    "uri",
    "requestState",
    "inputResponses",
    "arguments",
];

/// Reads and checks the params of a stateless request of `method`: the top level as borrowed
/// members (a key given twice is refused: which one counts would be a guess), then `_meta` in
/// one pass that writes the params without the envelope.
pub(crate) fn read(params: Option<&Bytes>, method: &str) -> Result<Read, Refusal> {
    /// The members of the params the gateway reads: `None` if absent, `Some(None)` if `null`
    /// (which counts as absent, but not when the key comes again).
    #[derive(Default)]
    struct Top<'a> {
        meta: Option<Option<&'a str>>,
        name: Option<Option<&'a str>>,
        uri: Option<Option<&'a str>>,
        state: Option<Option<&'a str>>,
        responses: Option<Option<&'a str>>,
    }
    let refused = |why: &dyn std::fmt::Display| {
        Refusal::Meta(format!("params must be an object carrying _meta: {why}"))
    };
    let bytes = params
        .filter(|p| p.trim_ascii_start().starts_with(b"{"))
        .ok_or_else(|| Refusal::Meta("params must be an object carrying _meta".into()))?;
    let text = std::str::from_utf8(bytes).map_err(|e| refused(&e))?;
    let mut top = Top::default();
    let mut problem: Option<String> = None;
    // Every other key, to refuse one given twice: a server may read either (the arguments
    // its headers mirror, say).
    let mut others: smallvec::SmallVec<[Cow<'_, str>; 4]> = smallvec::SmallVec::new();
    // `_meta`'s members, read in the same walk when its key is written plainly.
    let mut meta_members = MetaMembers::new();
    let mut meta_walked = false;
    let plain_meta = |raw_key: &str| raw_key == "\"_meta\"";
    json_scan::members_and_inner(
        text,
        json_scan::MAX_DEPTH,
        plain_meta,
        |raw_key, value| {
            meta_walked |= plain_meta(raw_key) && value.starts_with('{');
            let key = match json_scan::unquote(raw_key) {
                Ok(key) => key,
                Err(e) => {
                    problem.get_or_insert_with(|| e.to_string());
                    return;
                }
            };
            let slot = match &*key {
                "_meta" => &mut top.meta,
                "name" => &mut top.name,
                "uri" => &mut top.uri,
                "requestState" => &mut top.state,
                "inputResponses" => &mut top.responses,
                // A key a lenient server reads as one of these would carry a value past what the
                // gateway read (answers no policy judged, a state of the client's choosing).
                other => {
                    if let Some(owned) = lookalike::read_as(other, &LOOKALIKE_KEYS)
                        && owned != other
                    {
                        problem.get_or_insert_with(|| {
                            format!(
                                "{:?} is too like {owned}: servers differ on which they read",
                                lookalike::shown(other)
                            )
                        });
                    }
                    others.push(key);
                    return;
                }
            };
            if slot.is_some() {
                problem.get_or_insert_with(|| format!("{key} is given twice"));
            }
            *slot = Some((value != "null").then_some(value));
        },
        |raw_key, value| meta_members.push((raw_key, value)),
    )
    .map_err(|e| refused(&e))?;
    if problem.is_none() {
        problem = json_scan::repeated_key(&mut others)
            .map(|key| format!("{:?} is given twice", lookalike::shown(key)));
    }
    if let Some(problem) = problem {
        return Err(refused(&problem));
    }
    let retry_members = top.state.is_some() || top.responses.is_some();
    let (meta, name, uri, state, responses) = (
        top.meta.flatten(),
        top.name.flatten(),
        top.uri.flatten(),
        top.state.flatten(),
        top.responses.flatten(),
    );
    let meta_raw = meta
        .ok_or_else(|| Refusal::Meta(format!("params._meta is required (with {VERSION_KEY})")))?;
    // The params without the envelope: what comes before `_meta`, the members that stay,
    // what comes after. `meta_raw` is a slice of `text`.
    let start = meta_raw.as_ptr() as usize - text.as_ptr() as usize;
    let end = start + meta_raw.len();
    if !meta_walked {
        // Not an object, or named with an escape: walked on its own.
        meta_members.clear();
        json_scan::members(meta_raw, json_scan::MAX_DEPTH, |k, v| {
            meta_members.push((k, v))
        })
        .map_err(|_| Refusal::Meta("params._meta must be an object".into()))?;
    }
    let mut stripped = Vec::with_capacity(bytes.len());
    stripped.extend_from_slice(&bytes[..start]);
    let envelope = read_meta(&meta_members, &mut stripped)?;
    let meta_end = stripped.len();
    stripped.extend_from_slice(&bytes[end..]);
    // Where the target string is in the params written: what followed `_meta` moved with it.
    let target_at = match method {
        "tools/call" | "prompts/get" => name,
        "resources/read" => uri,
        _ => None,
    }
    .filter(|raw| raw.starts_with('"'))
    .map(|raw| {
        let at = raw.as_ptr() as usize - text.as_ptr() as usize;
        let at = if at >= end { at - end + meta_end } else { at };
        at..at + raw.len()
    });
    fn string<'a>(raw: &'a str, what: impl Fn() -> String) -> Result<Cow<'a, str>, Refusal> {
        let not_string = || Refusal::Meta(format!("{} must be a string", what()));
        if !raw.starts_with('"') {
            return Err(not_string());
        }
        json_scan::unquote(raw).map_err(|_| not_string())
    }
    let version = match envelope.version {
        // The revision served is a constant: no copy of it per request.
        Some(raw) => match string(raw, || format!("params._meta[{VERSION_KEY:?}]"))? {
            v if v == revision::STATELESS => revision::STATELESS.into(),
            v => v.into_owned().into(),
        },
        None => {
            return Err(Refusal::Meta(format!(
                "params._meta[{VERSION_KEY:?}] is required"
            )));
        }
    };
    let capabilities = match envelope.capabilities {
        Some(raw) if raw.starts_with('{') => bytes.slice_ref(raw.as_bytes()),
        Some(_) => {
            return Err(Refusal::Meta(format!(
                "params._meta[{CAPS_KEY:?}] must be an object"
            )));
        }
        None => {
            return Err(Refusal::Meta(format!(
                "params._meta[{CAPS_KEY:?}] is required"
            )));
        }
    };
    let log_level = match envelope.level {
        None => None,
        Some(raw) => {
            let level = string(raw, || format!("params._meta[{LEVEL_KEY:?}]"))?;
            Some(severity(&level).ok_or_else(|| {
                Refusal::Meta(format!(
                    "params._meta[{LEVEL_KEY:?}] must be one of {}",
                    revision::LOG_LEVELS.join(", ")
                ))
            })?)
        }
    };
    let target = match method {
        "tools/call" | "prompts/get" => Some(("name", name)),
        "resources/read" => Some(("uri", uri)),
        _ => None,
    }
    .map(|(key, raw)| match raw {
        Some(raw) => string(raw, || format!("params.{key}")).map(std::borrow::Cow::into_owned),
        None => Err(Refusal::Meta(format!("params.{key} must be a string"))),
    })
    .transpose()?;
    // Only these may answer `input_required`, so only their retries carry answers.
    let mut retry = round_trip::Retry::default();
    let retrying = target.is_some() && (state.is_some() || responses.is_some());
    if retrying {
        if let Some(raw) = state {
            retry.state = Some(string(raw, || "params.requestState".into())?.into_owned());
        }
        if let Some(raw) = responses {
            retry.responses = serde_json::from_str(raw)
                .map_err(|_| Refusal::Meta("params.inputResponses must be an object".into()))?;
        }
    }
    // The call runs on the copy: it keeps the client's body (and its room) alive.
    let params = crate::body_room::derived(stripped, bytes);
    Ok(Read {
        meta: RequestMeta {
            version,
            log_level,
            capabilities,
        },
        target,
        retry,
        // Slices and keys of a `str`: UTF-8.
        envelope: if envelope.alone {
            let inner = meta_raw[1..meta_raw.len() - 1].trim_matches([' ', '\t', '\n', '\r']);
            bytes.slice_ref(inner.as_bytes())
        } else {
            crate::body_room::derived(envelope_members(meta_raw), bytes)
        },
        left: crate::upstream::ParamsLeft {
            params: params.clone(),
            meta: start..meta_end,
            target: target_at,
            retry_members,
        },
        params,
    })
}

/// A mirrored header's value: `=?base64?…?=` decoded, else the plain text.
fn header_text(value: &HeaderValue) -> Option<String> {
    match header_form(value)? {
        HeaderForm::Base64(encoded) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            String::from_utf8(raw).ok()
        }
        HeaderForm::Plain(text) => Some(text.to_owned()),
    }
}

/// How a mirrored header carries its text.
enum HeaderForm<'a> {
    Plain(&'a str),
    Base64(&'a str),
}

fn header_form(value: &HeaderValue) -> Option<HeaderForm<'_>> {
    let text = value.to_str().ok()?.trim();
    Some(
        match text
            .strip_prefix("=?base64?")
            .and_then(|t| t.strip_suffix("?="))
        {
            Some(encoded) => HeaderForm::Base64(encoded),
            None => HeaderForm::Plain(text),
        },
    )
}

/// Whether a mirrored header says `body` (compared in place when it is plain text, as it
/// mostly is).
fn header_says(value: &HeaderValue, body: &str) -> bool {
    // The header as sent is the body's text (not a `=?…?=` form that reads otherwise).
    if value.as_bytes() == body.as_bytes() && !body.starts_with("=?") {
        return true;
    }
    match header_form(value) {
        Some(HeaderForm::Plain(text)) => text == body,
        Some(HeaderForm::Base64(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .is_ok_and(|raw| raw == body.as_bytes()),
        None => false,
    }
}

/// Checks the `Mcp-Param-*` headers of a tool call against the arguments its tool's schema
/// marks `x-mcp-header`.
async fn check_param_headers(
    session: &Session,
    mirrored: &Mirrored<'_>,
    round: &Round,
    params: Option<&[u8]>,
) -> Result<(), Refusal> {
    let Some((index, tool)) = round
        .target
        .as_deref()
        .and_then(|name| session.resolve_tool(name))
    else {
        return Ok(()); // no such tool: the call fails on its own
    };
    let headers = session.tool_headers(index).await;
    let marked = headers.of(tool);
    if marked.is_empty() {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Call<'a> {
        #[serde(borrow)]
        arguments: Option<&'a RawValue>,
    }
    let call: Call<'_> = params
        .map(serde_json::from_slice)
        .transpose()
        .map_err(|e| Refusal::Params(format!("params.arguments must be an object: {e}")))?
        .unwrap_or(Call { arguments: None });
    crate::mcp::param_headers::check(marked, call.arguments, |s| mirrored.param(s)).map_err(|e| {
        match e.starts_with("params.arguments") {
            true => Refusal::Params(e),
            false => Refusal::Header(e),
        }
    })
}

/// Checks that the headers mirror the body: version, method, and the target's name.
fn check_headers(mirrored: &Mirrored<'_>, read: &Read, method: &str) -> Result<(), Refusal> {
    if let Some(name) = mirrored.twice {
        return Err(Refusal::Header(format!(
            "the {name} header is given more than once"
        )));
    }
    let agree = |header: Option<&HeaderValue>, name: &str, body: &str| match header {
        None => Err(Refusal::Header(format!(
            "the {name} header is required and must be {body:?}"
        ))),
        Some(v) if header_says(v, body) => Ok(()),
        Some(v) => Err(Refusal::Header(format!(
            "the {name} header {v:?} does not match the body's {body:?}"
        ))),
    };
    agree(mirrored.version, "MCP-Protocol-Version", &read.meta.version)?;
    agree(mirrored.method, "Mcp-Method", method)?;
    match &read.target {
        Some(target) => agree(mirrored.name, "Mcp-Name", target),
        None => Ok(()),
    }
}

/// Methods a 2026-07-28 client may call here.
fn served(method: &str) -> bool {
    matches!(
        method,
        "server/discover"
            | "tools/list"
            | "tools/call"
            | "prompts/list"
            | "prompts/get"
            | "resources/list"
            | "resources/read"
            | "resources/templates/list"
            | "completion/complete"
            | "subscriptions/listen"
    )
}

/// Serves one stateless message.
pub(crate) async fn post(
    gw: &Arc<Gateway>,
    principal: Option<Principal>,
    profile: Option<&Arc<ProfileConfig>>,
    claims: Option<Arc<Claims>>,
    mirrored: Mirrored<'_>,
    msg: Message,
    mut span: Option<&mut crate::trace::Span>,
) -> Response<Body> {
    let (id, method, params) = match msg.kind {
        Kind::Request { id, method, params } => (id, method, params),
        // Nothing in this revision needs a client notification; they are acknowledged.
        Kind::Notification { .. } => return accepted(),
        Kind::Response { .. } => {
            return json_response(
                StatusCode::BAD_REQUEST,
                jsonrpc::error_response(
                    None,
                    code::INVALID_REQUEST,
                    "a stateless client has no server requests to answer; send input responses with the retried request",
                ),
            );
        }
    };
    let checked = read(params.as_ref(), &method).and_then(|read| {
        // Headers first: a header that disagrees with the body is the request's own fault,
        // whichever version it names.
        check_headers(&mirrored, &read, &method)?;
        if read.meta.version != revision::STATELESS {
            return Err(Refusal::Version(read.meta.version.into_owned()));
        }
        if !served(&method) {
            return Err(Refusal::Method(method.to_string()));
        }
        Ok(read)
    });
    let Read {
        meta,
        target,
        retry,
        envelope,
        params,
        left,
    } = match checked {
        Ok(r) => r,
        Err(refusal) => {
            tracing::debug!(?method, "refused a stateless request: {refusal}");
            return json_response(refusal.status(), refusal.frame(&id));
        }
    };
    let invalid = |message: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            jsonrpc::error_response(Some(&id), code::INVALID_PARAMS, message),
        )
    };
    let completion = Completion::of(&method);
    let round = Round {
        gw: gw.clone(),
        id: id.clone(),
        // The message's own string, not a copy: the round names the method from here on.
        method,
        target,
        completion,
        log_level: meta.log_level,
        meta,
        principal: principal.clone(),
    };
    let mut params = Some(params);
    // The server whose own state the retry carries, to be the one it reaches.
    let mut relayed_from = None;
    // The questions the retry's answers answer, as the token relayed them.
    let mut questions = None;
    if let Some(state) = retry.state {
        let resumed = gw.round_trips.resume(
            (principal.as_ref(), profile.map(|p| p.name.as_str())),
            claims.as_deref(),
            &state,
            &round.method,
            round.target.as_deref(),
        );
        match resumed {
            Ok(round_trip::Resumed::Parked(parked)) => {
                return round.resume(parked, retry.responses).await;
            }
            // The server's own state goes back to it in place of the gateway's token.
            Ok(round_trip::Resumed::Relayed {
                state,
                server,
                questions: asked,
            }) => {
                match with_member(params.as_ref(), "requestState", state.as_deref()) {
                    Some(p) => params = Some(p),
                    None => return invalid("params cannot carry requestState"),
                }
                relayed_from = server;
                questions = Some(asked);
            }
            Err(e) => return invalid(&e.to_string()),
        }
    }
    let session = match gw.stateless_session(principal, profile, claims.as_ref()) {
        Ok(session) => session,
        Err(crate::gateway::NoRoom::Principal(cap)) => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                jsonrpc::error_response(
                    Some(&id),
                    code::TOO_BUSY,
                    &format!(
                        "this principal already has {cap} hidden sessions, one for each set of groups and scopes its tokens grant (mcp.max_sessions_per_principal); retry once one has idled"
                    ),
                ),
            );
        }
        Err(crate::gateway::NoRoom::Sessions) => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                jsonrpc::error_response(
                    Some(&id),
                    code::TOO_BUSY,
                    "the gateway holds as many sessions as it may (mcp.max_sessions); retry later",
                ),
            );
        }
    };
    if let Some(claims) = &claims {
        session.hold_claims(claims);
    }
    if let Some(from) = relayed_from
        && server_asked(&session, &round.method, round.target.as_deref())
            .is_none_or(|i| *session.topology().servers[i].name != *from)
    {
        return invalid(
            "requestState was issued by another server than the one this request reaches now; send the request again without it",
        );
    }
    if !retry.responses.is_empty()
        && let Some(policy) = session.policy().filter(|p| p.active())
    {
        // Answers reach a server only as answers to its questions, judged as such: rebuilt
        // from what the policy passed.
        let Some(questions) = &questions else {
            return invalid(
                "inputResponses answer no questions this gateway relayed: send them with the requestState that came with the questions",
            );
        };
        let Some(index) = server_asked(&session, &round.method, round.target.as_deref()) else {
            return invalid("the server that asked is no longer reached by this request");
        };
        let mut answers = b"{".to_vec();
        for (key, answer) in &retry.responses {
            let Some((_, method)) = questions.iter().find(|(k, _)| k == key) else {
                return invalid(&format!(
                    "params.inputResponses.{key} answers no question the server asked"
                ));
            };
            let asked = Outcome::Result(Bytes::copy_from_slice(answer.get().as_bytes()));
            let judged = policy.client_answer(&session, index, method, &asked).await;
            let answer = match &judged {
                None => answer.get().as_bytes(),
                Some(Outcome::Result(rewritten)) => &rewritten[..],
                Some(Outcome::Error(refused)) => {
                    return json_response(
                        StatusCode::OK,
                        jsonrpc::response(&id, &Outcome::Error(refused.clone())),
                    );
                }
            };
            if answers.len() > 1 {
                answers.push(b',');
            }
            crate::json_string::put(&mut answers, key);
            answers.push(b':');
            answers.extend_from_slice(answer);
        }
        answers.push(b'}');
        let answers = String::from_utf8(answers).unwrap_or_default();
        match with_raw_member(params.as_ref(), "inputResponses", &answers) {
            Some(p) => params = Some(p),
            None => return invalid("params cannot carry inputResponses"),
        }
    }
    let busy = session.touch();
    if round.method == "tools/call"
        && let Err(refusal) =
            check_param_headers(&session, &mirrored, &round, params.as_deref()).await
    {
        tracing::debug!(method = ?round.method, "refused a stateless request: {refusal}");
        return json_response(refusal.status(), refusal.frame(&id));
    }
    if round.method == "subscriptions/listen" {
        // Boxed: a listen is long-lived and rare, and would double every call's future.
        return Box::pin(listen(gw, session, busy, id, params)).await;
    }
    if round.method == "server/discover" {
        let result = discover(gw, &session).await;
        return json_response(
            StatusCode::OK,
            jsonrpc::response(&id, &Outcome::Result(result)),
        );
    }
    if let Some(span) = &mut span {
        span.attr("mcp.protocol.version", revision::STATELESS);
    }
    let client_envelope = crate::upstream::ClientEnvelope {
        members: envelope,
        left: Some(left),
    };
    let awaiting = crate::upstream::AwaitingClient::default();
    let services = crate::mcp::handler::Services {
        envelope: Some(&client_envelope),
        trace: span.as_deref(),
        awaiting: Some(&awaiting),
        ..gw.services()
    };
    match handler::request(services, &session, id, &round.method, params).await {
        Reply::Json(frame) => {
            let frame = round.answer(&session, frame).await;
            if let Some(span) = span {
                span.record_answer(&frame);
            }
            let frame = session.bounded_answer(frame);
            json_response(status_of(&frame, &round.id), frame)
        }
        Reply::Refused(status, frame) => json_response(status, frame),
        Reply::Stream(rx) => {
            round
                .drive(session, busy, round_trip::CallStream::new(rx, awaiting))
                .await
        }
    }
}

/// One round of a stateless request: what its answer needs to know.
struct Round {
    gw: Arc<Gateway>,
    /// The client's id for this round (a retry has its own).
    id: Bytes,
    method: jsonrpc::MethodName,
    target: Option<String>,
    completion: Completion,
    log_level: Option<u8>,
    /// What the request's `_meta` said (its declared capabilities among it).
    meta: RequestMeta,
    principal: Option<Principal>,
}

/// The sending end of a call's SSE stream, and the watch on its reader.
struct Feed {
    tx: mpsc::Sender<Bytes>,
    uptake: Arc<Uptake>,
}

impl Feed {
    async fn send(&self, stall: std::time::Duration, frame: Bytes) -> Fed {
        crate::body::feed(&self.tx, &self.uptake, stall, frame).await
    }
}

/// What a message of the call's stream means for the client.
enum Step {
    /// Nothing for the client (a log it did not ask for, a question the gateway answered).
    Skip,
    /// A message on the way (progress, logs).
    Event(Bytes),
    /// The final answer.
    Answer(Bytes),
    /// The server asks the client: the round ends with `input_required`.
    Ask(round_trip::Asked),
    /// The server asks for something the client did not declare (-32021).
    Missing(Bytes),
}

impl Round {
    /// Answers the parked call's questions with the client's responses and carries on; asks
    /// again for what is still unanswered.
    async fn resume(
        self,
        parked: round_trip::Parked,
        responses: std::collections::BTreeMap<String, Box<RawValue>>,
    ) -> Response<Body> {
        let round_trip::Parked {
            session,
            stream,
            asked,
            busy,
            expires,
            ..
        } = parked;
        // Working again before the server hears the answers: its next question may follow.
        stream.awaiting_client(false);
        let mut missing = Vec::new();
        for a in asked {
            match responses.get(&a.key) {
                Some(raw) => {
                    let answer = Outcome::Result(Bytes::copy_from_slice(raw.get().as_bytes()));
                    session.on_client_response(&a.id, &answer).await;
                }
                None => missing.push(a),
            }
        }
        if !missing.is_empty() {
            let frame = self.park(session, stream, missing, busy, expires);
            return json_response(StatusCode::OK, frame);
        }
        self.drive(session, busy, stream).await
    }

    /// Parks the call and returns the `input_required` response asking `asked`.
    fn park(
        &self,
        session: Arc<Session>,
        stream: round_trip::CallStream,
        asked: Vec<round_trip::Asked>,
        busy: crate::mcp::session::BusyGuard,
        expires: Option<tokio::time::Instant>,
    ) -> Bytes {
        let requests = round_trip::input_requests(&asked);
        stream.awaiting_client(true);
        let mut parked = round_trip::Parked::new(
            session,
            stream,
            asked,
            self.principal.clone(),
            (self.method.to_string(), self.target.clone()),
            busy,
        );
        parked.expires = expires;
        let state = self.gw.round_trips.park(parked);
        let result = round_trip::input_required(&requests, &state);
        jsonrpc::response(&self.id, &Outcome::Result(result))
    }

    /// Reads the call's stream until the client's answer takes shape: a single JSON response
    /// (the answer, `input_required`, or an error), or an SSE stream when messages come first.
    async fn drive(
        self,
        session: Arc<Session>,
        busy: crate::mcp::session::BusyGuard,
        mut stream: round_trip::CallStream,
    ) -> Response<Body> {
        loop {
            let Some(frame) = stream.recv().await else {
                return json_response(StatusCode::OK, self.ended());
            };
            match self.step(&session, frame).await {
                Step::Skip => {}
                Step::Answer(frame) => {
                    let frame = session.bounded_answer(frame);
                    return json_response(status_of(&frame, &self.id), frame);
                }
                Step::Missing(frame) => return json_response(StatusCode::BAD_REQUEST, frame),
                Step::Ask(asked) => {
                    let asked = self.gather(&session, &mut stream, asked).await;
                    // Not counted as an answer: its questions are, in the session's queues,
                    // and refusing it would leave the call parked with nobody to resume it.
                    let frame = self.park(session, stream, asked, busy, None);
                    return json_response(StatusCode::OK, frame);
                }
                Step::Event(first) => {
                    let (tx, out) = mpsc::channel::<Bytes>(64);
                    let (response, uptake) = watched_sse_response(None, out);
                    let response = session.counted_stream(response);
                    let feed = Feed { tx, uptake };
                    tokio::spawn(self.relay(session, busy, stream, feed, first));
                    return response;
                }
            }
        }
    }

    /// Relays the rest of the call's stream once it is an SSE stream. A client that takes
    /// nothing for `mcp.stalled_stream_timeout` while messages wait loses the stream (and the
    /// call, cancelled upstream as its stream is dropped), and its connection is let go, also
    /// when only the end of the answer is left to write.
    async fn relay(
        self,
        session: Arc<Session>,
        busy: crate::mcp::session::BusyGuard,
        stream: round_trip::CallStream,
        feed: Feed,
        first: Bytes,
    ) {
        let stall = self.gw.config.mcp.stalled_stream_timeout;
        // The call (its session, its stream) is let go once its last frame is queued.
        let Some(last) = self
            .relay_until_last(session, busy, stream, &feed, first, stall)
            .await
        else {
            return;
        };
        if self.sent(feed.send(stall, last).await) {
            let Feed { tx, uptake } = feed;
            drop(tx);
            if !uptake.delivered(stall).await {
                self.call_stream_stalled();
            }
        }
    }

    /// Relays the call's stream up to its last frame (the answer, or the round's end), which
    /// it returns; `None` if the client is gone or stopped reading before.
    async fn relay_until_last(
        &self,
        session: Arc<Session>,
        busy: crate::mcp::session::BusyGuard,
        mut stream: round_trip::CallStream,
        feed: &Feed,
        first: Bytes,
        stall: std::time::Duration,
    ) -> Option<Bytes> {
        if !self.sent(feed.send(stall, first).await) {
            return None;
        }
        loop {
            // A stateless client cancels by closing its stream: the call ends then, not at
            // its server's next message.
            let next = tokio::select! {
                biased;
                () = feed.tx.closed() => return None,
                next = stream.recv() => next,
            };
            let Some(frame) = next else {
                return Some(self.ended());
            };
            match self.step(&session, frame).await {
                Step::Skip => {}
                Step::Event(frame) => {
                    if !self.sent(feed.send(stall, frame).await) {
                        return None;
                    }
                }
                Step::Answer(frame) | Step::Missing(frame) => return Some(frame),
                Step::Ask(asked) => {
                    let asked = self.gather(&session, &mut stream, asked).await;
                    return Some(self.park(session, stream, asked, busy, None));
                }
            }
        }
    }

    /// Whether a frame reached the stream's queue (a stall counted).
    fn sent(&self, fed: Fed) -> bool {
        match fed {
            Fed::Sent => true,
            Fed::ReaderGone => false,
            Fed::Stalled => {
                self.call_stream_stalled();
                false
            }
        }
    }

    fn call_stream_stalled(&self) {
        tracing::info!(method = ?self.method, "ended a call's stream whose client took nothing while messages waited");
        self.gw.metrics.stream_stalled("call");
    }

    /// The questions a server asks together: `first`, and those that follow it within
    /// [`GATHER`] (a server asking several things at once sends them back to back). Anything
    /// else ends the gathering and waits in the stream for the next round.
    async fn gather(
        &self,
        session: &Session,
        stream: &mut round_trip::CallStream,
        first: round_trip::Asked,
    ) -> Vec<round_trip::Asked> {
        let mut asked = vec![first];
        while asked.len() < MAX_QUESTIONS {
            let Ok(Some(frame)) = tokio::time::timeout(GATHER, stream.recv()).await else {
                break;
            };
            if !is_request(&frame) {
                stream.hold(frame);
                break;
            }
            // Anything but a question was refused on the client's behalf (it cannot answer it):
            // the server hears so, and a later round carries what it does about it.
            if let Step::Ask(a) = self.step(session, frame).await {
                asked.push(a);
            }
        }
        asked
    }

    /// The final response frame under the client's id: completed with `resultType`, or, when
    /// a 2026-07-28 server asks for input, with the server's `requestState` sealed for this
    /// caller and request.
    async fn answer(&self, session: &Session, frame: Bytes) -> Bytes {
        if INPUT_REQUIRED.is_in(&frame)
            && let Some(relayed) = self.relay_input_required(session, &frame).await
        {
            return relayed;
        }
        self.completion.frame(frame, &self.id)
    }

    /// A 2026-07-28 server's `input_required` response made the client's: each question one
    /// the client declared it can answer and the policy lets through (as if the server had
    /// asked it directly), and the server's state sealed. `None` if `frame` is not one.
    async fn relay_input_required(&self, session: &Session, frame: &Bytes) -> Option<Bytes> {
        type Object<'a> = std::collections::BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>;
        let Ok(Message {
            kind:
                Kind::Response {
                    outcome: Outcome::Result(result),
                    ..
                },
            ..
        }) = jsonrpc::parse(frame.clone())
        else {
            return None;
        };
        let mut fields: Object<'_> = serde_json::from_slice(&result).ok()?;
        if fields.get("resultType").map(|k| k.get()) != Some(r#""input_required""#) {
            return None;
        }
        // The result goes on re-encoded, every member kept: a key a lenient client reads as
        // one the gateway checks and seals (`inputrequests`) would carry questions past it.
        const CHECKED: [&str; 3] = ["resultType", "inputRequests", "requestState"];
        if let Some(key) = fields.keys().find(|k| {
            crate::mcp::lookalike::read_as(k, &CHECKED).is_some_and(|owned| owned != &***k)
        }) {
            return Some(self.refused_state(&format!(
                "the server's result has a key {:?} that lenient clients read as another the gateway checks",
                crate::mcp::lookalike::shown(key)
            )));
        }
        let topology = session.topology();
        let Some(index) = server_asked(session, &self.method, self.target.as_deref()) else {
            return Some(self.refused_state(&format!(
                "{} cannot ask for input (only tools/call, prompts/get and resources/read of a known server can)",
                self.method
            )));
        };
        #[derive(Deserialize)]
        struct Question<'a> {
            method: String,
            #[serde(borrow)]
            params: Option<&'a RawValue>,
        }
        let asked: std::collections::BTreeMap<String, &RawValue> = match fields.get("inputRequests")
        {
            Some(raw) => match serde_json::from_str(raw.get()) {
                Ok(q) => q,
                Err(_) => {
                    return Some(self.refused_state("the server's inputRequests is not an object"));
                }
            },
            None => Default::default(),
        };
        if asked.len() > MAX_QUESTIONS {
            return Some(self.refused_state(&format!(
                "the server asked {} questions at once (at most {MAX_QUESTIONS})",
                asked.len()
            )));
        }
        let mut requests = String::from("{");
        let mut questions = Vec::with_capacity(asked.len());
        for (key, raw) in &asked {
            let Ok(q) = serde_json::from_str::<Question<'_>>(raw.get()) else {
                return Some(self.refused_state("an input request is not a request"));
            };
            // `Method` beside `method`: a lenient client would answer another question than
            // the one checked.
            if crate::mcp::lookalike::check_members(
                raw.get().as_bytes(),
                &["method", "params"],
                "inputRequests",
            )
            .is_err()
            {
                return Some(self.refused_state(
                    "an input request has a key that lenient clients read as method or params",
                ));
            }
            if round_trip::capability_needed(&q.method).is_none() {
                return Some(self.refused_state(
                    "an input request asks for a method a client does not answer (elicitation/create, sampling/createMessage and roots/list are)",
                ));
            }
            // The capability, and the member a mode needs (URL-mode elicitation, sampling
            // with tools): a 2026 server must not ask beyond what this request declares.
            if let Some(missing) = crate::mcp::session::undeclared(
                &self.meta.capabilities,
                &q.method,
                q.params.map(|p| p.get().as_bytes()),
            ) {
                return Some(jsonrpc::error_response_with_data(
                    Some(&self.id),
                    code::MISSING_CLIENT_CAPABILITY,
                    &format!(
                        "the server asked for {}, which needs the client capability {:?}; declare it in _meta to allow this",
                        q.method, missing.capability
                    ),
                    missing.data.as_bytes(),
                ));
            }
            let params = q.params.map(|p| p.get().as_bytes());
            let Some(params) = session.screen_request(index, &q.method, params).await else {
                return Some(jsonrpc::error_response(
                    Some(&self.id),
                    code::INVALID_REQUEST,
                    &format!(
                        "the gateway's policy withheld the server's {} request",
                        q.method
                    ),
                ));
            };
            if requests.len() > 1 {
                requests.push(',');
            }
            requests.push_str(&serde_json::to_string(key).ok()?);
            requests.push_str(r#":{"method":"#);
            requests.push_str(&serde_json::to_string(&q.method).ok()?);
            questions.push((key.to_string(), q.method.to_string()));
            if let Some(p) = params {
                requests.push_str(r#","params":"#);
                requests.push_str(std::str::from_utf8(&p).ok()?);
            }
            requests.push('}');
        }
        requests.push('}');
        let requests = RawValue::from_string(requests).ok()?;
        fields.insert("inputRequests".into(), &requests);
        // Sealed whether or not the server gave a state: the retry's answers are judged as
        // answers to these questions, and only with this token.
        let state = match fields.get("requestState") {
            None => None,
            Some(raw) => {
                let Ok(state) = serde_json::from_str::<String>(raw.get()) else {
                    return Some(self.refused_state("the server's requestState is not a string"));
                };
                if state.len() > round_trip::MAX_RELAYED_STATE {
                    return Some(self.refused_state(&format!(
                        "the server's requestState is {} bytes (at most {})",
                        state.len(),
                        round_trip::MAX_RELAYED_STATE
                    )));
                }
                Some(state)
            }
        };
        let token = self.gw.round_trips.relay(
            (self.principal.as_ref(), session.profile_name()),
            (&self.method, self.target.as_deref()),
            &topology.servers[index].name,
            (state.as_deref(), questions),
        );
        let sealed = RawValue::from_string(serde_json::to_string(&token).ok()?).ok()?;
        fields.insert("requestState".into(), &sealed);
        let result = serde_json::to_vec(&fields).ok()?;
        Some(jsonrpc::response(
            &self.id,
            &Outcome::Result(Bytes::from(result)),
        ))
    }

    fn refused_state(&self, why: &str) -> Bytes {
        jsonrpc::error_response(Some(&self.id), code::UPSTREAM_UNAVAILABLE, why)
    }

    /// The error when the call's stream ends without an answer (its session ended).
    fn ended(&self) -> Bytes {
        jsonrpc::error_response(
            Some(&self.id),
            code::UPSTREAM_UNAVAILABLE,
            "the call ended without an answer",
        )
    }

    async fn step(&self, session: &Session, frame: Bytes) -> Step {
        let Ok(msg) = jsonrpc::parse(frame.clone()) else {
            return Step::Skip;
        };
        match msg.kind {
            Kind::Notification { method, params } => {
                if &*method == "notifications/message"
                    && !log_wanted(params.as_deref(), self.log_level)
                {
                    Step::Skip
                } else {
                    Step::Event(frame)
                }
            }
            Kind::Response { .. } => Step::Answer(self.answer(session, frame).await),
            Kind::Request { id, method, params } => {
                match round_trip::capability_needed(&method) {
                    None => {
                        // Nothing the client must be asked: `ping` is answered here, the rest refused.
                        let outcome = if &*method == "ping" {
                            Outcome::Result(Bytes::from_static(b"{}"))
                        } else {
                            Outcome::Error(jsonrpc::error_object(
                                code::METHOD_NOT_FOUND,
                                &format!("{method} is not a request a client can be asked"),
                            ))
                        };
                        session.answer_for_client(&id, &outcome).await;
                        Step::Skip
                    }
                    Some(_)
                        if let Some(missing) = crate::mcp::session::undeclared(
                            &self.meta.capabilities,
                            &method,
                            params.as_deref(),
                        ) =>
                    {
                        let cap = missing.capability;
                        let refusal = Outcome::Error(jsonrpc::error_object(
                            code::METHOD_NOT_FOUND,
                            &format!("the client did not declare the {cap} capability"),
                        ));
                        session.answer_for_client(&id, &refusal).await;
                        // Servers ask for roots on their own (after initialize, on a change),
                        // and over stdio such a question lands on whatever call is in flight:
                        // it is no sign that this call needs roots. The server heard the
                        // refusal; the call goes on.
                        if cap == "roots" {
                            return Step::Skip;
                        }
                        Step::Missing(jsonrpc::error_response_with_data(
                            Some(&self.id),
                            code::MISSING_CLIENT_CAPABILITY,
                            &format!(
                                "the server asked for {method}, which needs the client capability {cap:?}; declare it in _meta to allow this"
                            ),
                            missing.data.as_bytes(),
                        ))
                    }
                    Some(_) => Step::Ask(round_trip::Asked {
                        key: String::from_utf8_lossy(&id).into_owned(),
                        id,
                        method: method.to_string(),
                        params,
                    }),
                }
            }
        }
    }
}

/// The HTTP status of a final answer: 400 for the errors the revision says are the request's
/// fault at the protocol level (an upstream of this revision may answer them), else 200.
fn status_of(frame: &[u8], id: &[u8]) -> StatusCode {
    // A result the gateway framed under this id is no error: no search of its text.
    if own_result(frame, id).is_some() || !ERROR_MEMBER.is_in(frame) {
        return StatusCode::OK;
    }
    #[derive(Deserialize)]
    struct R {
        error: Option<E>,
    }
    #[derive(Deserialize)]
    struct E {
        code: i64,
    }
    match serde_json::from_slice::<R>(frame)
        .ok()
        .and_then(|r| r.error)
    {
        Some(E {
            code:
                code::HEADER_MISMATCH
                | code::MISSING_CLIENT_CAPABILITY
                | code::UNSUPPORTED_PROTOCOL_VERSION,
        }) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// `params` with member `key` set to the string `value`, or without it for `None` (a retry's
/// `requestState`: the server's own, or none when it gave none).
fn with_member(params: Option<&Bytes>, key: &str, value: Option<&str>) -> Option<Bytes> {
    match value {
        Some(v) => with_raw_member(params, key, &serde_json::to_string(v).ok()?),
        None => {
            let params = params?;
            let mut fields: Object<'_> = serde_json::from_slice(params).ok()?;
            fields.remove(key);
            let out = serde_json::to_vec(&fields).ok()?;
            Some(crate::body_room::derived(out, params))
        }
    }
}

/// `params` with member `key` set to the JSON text `raw`.
fn with_raw_member(params: Option<&Bytes>, key: &str, raw: &str) -> Option<Bytes> {
    let params = params?;
    let mut fields: Object<'_> = serde_json::from_slice(params).ok()?;
    let value = RawValue::from_string(raw.to_owned()).ok()?;
    fields.insert(key.to_owned().into(), &value);
    let out = serde_json::to_vec(&fields).ok()?;
    Some(crate::body_room::derived(out, params))
}

/// A JSON object's members, borrowed.
type Object<'a> = std::collections::BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>;

/// Serves `subscriptions/listen`: the acknowledgement first (what is honored: the kinds some
/// server offers, the resources their servers agreed to watch), then the servers' change
/// notifications the client asked for, each tagged with the listen request's id. The stream
/// ends when the client closes it (the gateway then stops watching for it) or, with a final
/// result, when the session stops serving listeners (a topology change, shutdown).
async fn listen(
    gw: &Arc<Gateway>,
    session: Arc<Session>,
    busy: BusyGuard,
    id: Bytes,
    params: Option<Bytes>,
) -> Response<Body> {
    let refuse = |status: StatusCode, code: i64, message: &str| {
        json_response(status, jsonrpc::error_response(Some(&id), code, message))
    };
    let asked = match subscriptions::Filter::of(params.as_deref()) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, &e),
    };
    // The slot first: listens started at once cannot all do the work below.
    let Some(slot) = session.subscriptions.slot() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            code::TOO_BUSY,
            &format!(
                "too many listen streams open for this caller (at most {}); close one first",
                subscriptions::MAX_LISTENERS
            ),
        );
    };
    // Listening needs every server connected, and its notifications flowing.
    let offer = handler::offer(gw.services(), &session).await;
    for (i, link) in session.links().iter().enumerate() {
        if session.serves(i) {
            link.open_listen_stream();
        }
    }
    let mut honored = subscriptions::Filter {
        tools: asked.tools && offer.has(caps::TOOLS),
        prompts: asked.prompts && offer.has(caps::PROMPTS),
        resources: asked.resources && offer.has(caps::RESOURCES),
        uris: Vec::new(),
    };
    // Undoes the watches if the client leaves before its stream is set up, or when it ends.
    let mut watches = Watches {
        gw: gw.clone(),
        session: session.clone(),
        uris: Vec::new(),
    };
    for uri in asked.uris {
        // In turn: a second watcher waits for the first's subscription to be made or refused.
        let _turn = session.subscriptions.upstream_turn(&uri).await;
        // Counted before the upstream is asked, so a client leaving meanwhile undoes it.
        let first = session.subscriptions.watch(&uri);
        watches.uris.push(uri.clone());
        if first && !subscribe(gw, &session, "resources/subscribe", &uri).await {
            watches.uris.pop();
            session.subscriptions.unwatch(&uri);
            continue;
        }
        honored.uris.push(uri);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(LISTEN_QUEUE);
    let ack = format!(r#"{{"notifications":{}}}"#, honored.to_json());
    let ack = jsonrpc::notification(
        "notifications/subscriptions/acknowledged",
        Some(&subscriptions::tagged(Some(ack.as_bytes()), &id)),
    );
    let _ = tx.try_send(ack);
    let key = session
        .subscriptions
        .add(id.clone(), honored, tx.clone().into());
    let every = gw.config.mcp.sse_keepalive;
    let stall = gw.config.mcp.stalled_stream_timeout;
    let metrics = gw.metrics.clone();
    let (resp, uptake) = crate::body::watched_sse_response(None, rx);
    let mut resp = session.counted_stream(resp);
    tokio::spawn(async move {
        // A client that leaves its queue full (it stopped reading) loses the stream.
        let keep_alive = async {
            loop {
                tokio::time::sleep(every).await;
                if tx.try_send(Bytes::new()).is_err() {
                    return;
                }
            }
        };
        let graceful = tokio::select! {
            _ = keep_alive => false,
            _ = tx.closed() => false,
            // So does one that takes nothing while notices wait (they are coalesced: its
            // queue may never fill), with its slot and watches.
            _ = uptake.stalled(stall) => {
                tracing::info!(session = %session.log_id(), "ended a listen stream whose client took nothing for {stall:?} while messages waited");
                metrics.stream_stalled("listen");
                uptake.end();
                false
            }
            _ = session.subscriptions.closed() => true,
            _ = session.ended() => true,
        };
        session.subscriptions.remove(key);
        if graceful {
            let result = format!(
                r#"{{"resultType":"complete","_meta":{{"{}":{}}}}}"#,
                subscriptions::SUBSCRIPTION_ID,
                String::from_utf8_lossy(&id)
            );
            let _ = tx.try_send(jsonrpc::response(
                &id,
                &Outcome::Result(Bytes::from(result)),
            ));
        }
        drop((tx, watches, slot, busy));
    });
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Frames waiting for a slow listen stream.
const LISTEN_QUEUE: usize = 64;

/// The resources one listen stream watches: dropped, it stops watching them (the last stream
/// to leave a resource unsubscribes it upstream).
struct Watches {
    gw: Arc<Gateway>,
    session: Arc<Session>,
    uris: Vec<String>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        let last: Vec<String> = std::mem::take(&mut self.uris)
            .into_iter()
            .filter(|uri| self.session.subscriptions.unwatch(uri))
            .collect();
        if last.is_empty() || self.session.is_ended() {
            return;
        }
        let (gw, session) = (self.gw.clone(), self.session.clone());
        tokio::spawn(async move {
            for uri in &last {
                let _turn = session.subscriptions.upstream_turn(uri).await;
                // Not if a watcher came meanwhile (and found it subscribed, or subscribed it).
                if !session.subscriptions.is_watched(uri) {
                    subscribe(&gw, &session, "resources/unsubscribe", uri).await;
                }
            }
        });
    }
}

/// Asks the resource's server to start or stop watching it, through the method table (so the
/// policy stage decides, as for a session's own `resources/subscribe`); true if it agreed.
async fn subscribe(gw: &Gateway, session: &Arc<Session>, method: &str, uri: &str) -> bool {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let params = Bytes::from(serde_json::json!({ "uri": uri }).to_string());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = Bytes::from(format!("\"gatehouse:listen:{n}\""));
    let answer = match handler::request(gw.services(), session, id, method, Some(params)).await {
        Reply::Json(frame) => Some(frame),
        Reply::Refused(..) => None,
        // Messages before the answer: the answer is the last frame.
        Reply::Stream(mut frames) => {
            let mut last = None;
            while let Some(frame) = frames.recv().await {
                last = Some(frame);
            }
            last
        }
    };
    answer.is_some_and(|frame| {
        matches!(
            jsonrpc::parse(frame).map(|m| m.kind),
            Ok(Kind::Response {
                outcome: Outcome::Result(_),
                ..
            })
        )
    })
}

/// The `server/discover` result: every revision served, what the servers offer together, and
/// how long the answer may be reused.
async fn discover(gw: &Gateway, session: &Arc<Session>) -> Bytes {
    let offer = handler::offer(gw.services(), session).await;
    let mut result = format!(
        r#"{{"resultType":"complete","supportedVersions":{},"capabilities":{},"ttlMs":{DISCOVER_TTL_MS},"cacheScope":"private","_meta":{{"io.modelcontextprotocol/serverInfo":{}}}"#,
        serde_json::to_string(revision::ALL).expect("strings encode"),
        offer.capabilities(),
        handler::SERVER_INFO,
    );
    if !offer.instructions.is_empty() {
        result.push_str(",\"instructions\":");
        result.push_str(&serde_json::to_string(&offer.instructions).expect("strings encode"));
    }
    result.push('}');
    Bytes::from(result)
}

/// What 2026-07-28 adds to a result: that it is complete (`resultType`) and, on lists and reads,
/// how long it may be reused and by whom (`ttlMs`, `cacheScope`).
#[derive(Clone, Copy)]
pub(crate) struct Completion {
    cache_hints: bool,
    resource_read: bool,
}

/// The result of a frame `jsonrpc::response` encoded under `id`, if that is what `frame` is.
fn own_result<'a>(frame: &'a [u8], id: &[u8]) -> Option<&'a [u8]> {
    let rest = frame.strip_prefix(br#"{"jsonrpc":"2.0","id":"#)?;
    let rest = rest.strip_prefix(id)?;
    rest.strip_prefix(br#","result":"#)?.strip_suffix(b"}")
}

/// The code 2025-era servers answer an unknown resource with.
const RESOURCE_NOT_FOUND_2025: i64 = -32002;

impl Completion {
    /// What results of `method` carry.
    pub(crate) fn of(method: &str) -> Completion {
        Completion {
            cache_hints: matches!(
                method,
                "tools/list"
                    | "prompts/list"
                    | "resources/list"
                    | "resources/templates/list"
                    | "resources/read"
            ),
            resource_read: method == "resources/read",
        }
    }

    /// The response frame, under the id `id`, with its result completed. Errors, and results
    /// that already say what they are, keep their content.
    pub(crate) fn frame(self, frame: Bytes, id: &[u8]) -> Bytes {
        // The gateway encoded the frame itself (`jsonrpc::response`): a result under this very
        // id is found without parsing the frame again.
        if let Some(result) = own_result(&frame, id) {
            if !self.cache_hints && says_complete_alone(result) {
                return frame;
            }
            return match self.result(result, id) {
                Ok(framed) => framed,
                Err(why) => jsonrpc::error_response(Some(id), code::INTERNAL_ERROR, &why),
            };
        }
        let Ok(msg) = jsonrpc::parse(frame.clone()) else {
            return frame;
        };
        match msg.kind {
            Kind::Response {
                outcome: Outcome::Result(result),
                ..
            } => match self.result(&result, id) {
                Ok(framed) => framed,
                Err(why) => jsonrpc::error_response(Some(id), code::INTERNAL_ERROR, &why),
            },
            Kind::Response {
                outcome: Outcome::Error(error),
                ..
            } if self.resource_read
                && jsonrpc::error_code(&error) == Some(RESOURCE_NOT_FOUND_2025) =>
            {
                // 2025-era servers say -32002 for an unknown resource; 2026-07-28 says -32602.
                // Its members as text: the server's error is not read into values.
                let mut e: std::collections::BTreeMap<String, Box<RawValue>> =
                    serde_json::from_slice(&error).unwrap_or_default();
                e.insert(
                    "code".into(),
                    RawValue::from_string(code::INVALID_PARAMS.to_string())
                        .expect("a number is JSON"),
                );
                let error = serde_json::to_vec(&e).map_or(error, Bytes::from);
                jsonrpc::response(id, &Outcome::Error(error))
            }
            Kind::Response { id: own, outcome } if *own != *id => jsonrpc::response(id, &outcome),
            _ => frame,
        }
    }

    /// The response under `id` whose result is `result` with the members the gateway owns put
    /// first: `resultType`, and on lists and reads the cache hints. What upstreams say of these
    /// members is replaced (a server may not widen `cacheScope` past what its callers may
    /// share), and a result that claims another `resultType` here (an `input_required` reaches
    /// this only from a server that cannot mean it) or is no object is refused. Written in one
    /// buffer: this runs on every stateless answer.
    fn result(self, result: &[u8], id: &[u8]) -> Result<Bytes, String> {
        // Every answer reaching here was parsed (an upstream's frame, a plugin's rewrite) or
        // written by the gateway, from checked parts: valid UTF-8, not checked again.
        debug_assert!(std::str::from_utf8(result).is_ok());
        let text = result.trim_ascii_start();
        // No change notifications reach a stateless client yet: nothing may be reused; and
        // what a caller sees depends on who it is (policy plugins filter lists).
        let owned = if self.cache_hints {
            r#""resultType":"complete","ttlMs":0,"cacheScope":"private""#
        } else {
            r#""resultType":"complete""#
        };
        let could = owned_names(result) > 0;
        let rest = if could {
            Cow::Owned(without_owned_members(text)?)
        } else {
            Cow::Borrowed(
                text.strip_prefix(b"{")
                    .ok_or_else(|| "the upstream's result is not a JSON object".to_owned())?,
            )
        };
        const HEAD: &[u8] = br#"{"jsonrpc":"2.0","id":"#;
        const RESULT: &[u8] = br#","result":{"#;
        let comma = !rest.trim_ascii_start().starts_with(b"}");
        // Exactly the frame's length: a vector with room to spare becomes `Bytes` through one
        // more allocation.
        let len = HEAD.len() + id.len() + RESULT.len() + owned.len() + usize::from(comma);
        let mut out = Vec::with_capacity(len + rest.len() + 1);
        out.extend_from_slice(HEAD);
        out.extend_from_slice(id);
        out.extend_from_slice(RESULT);
        out.extend_from_slice(owned.as_bytes());
        if comma {
            out.push(b',');
        }
        out.extend_from_slice(&rest);
        out.push(b'}');
        debug_assert_eq!(out.len(), out.capacity());
        Ok(Bytes::from(out))
    }
}

fn log_wanted(params: Option<&[u8]>, wanted: Option<u8>) -> bool {
    let Some(wanted) = wanted else {
        return false;
    };
    #[derive(Deserialize)]
    struct P {
        level: String,
    }
    params
        .and_then(|p| serde_json::from_slice::<P>(p).ok())
        .and_then(|p| severity(&p.level))
        .is_some_and(|s| s >= wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`super::read`] of a copy of `params`.
    fn read(params: Option<&[u8]>, method: &str) -> Result<Read, Refusal> {
        super::read(params.map(Bytes::copy_from_slice).as_ref(), method)
    }

    fn meta(params: &str) -> Result<RequestMeta, Refusal> {
        read(Some(params.as_bytes()), "tools/list").map(|r| r.meta)
    }

    #[test]
    fn meta_needs_version_and_capabilities() {
        let ok = r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/logLevel":"warning"}}"#;
        assert_eq!(
            meta(ok).unwrap(),
            RequestMeta {
                version: "2026-07-28".into(),
                log_level: Some(3),
                capabilities: "{}".into(),
            }
        );
        for bad in [
            r#"{}"#,
            r#"[]"#,
            r#"{"_meta":{}}"#,
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#,
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":7,"io.modelcontextprotocol/clientCapabilities":{}}}"#,
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":[]}}"#,
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/logLevel":"loud"}}"#,
        ] {
            assert!(matches!(meta(bad), Err(Refusal::Meta(_))), "{bad}");
        }
        assert!(matches!(read(None, "tools/list"), Err(Refusal::Meta(_))));
        // `_meta` named with an escape is read as `_meta` (walked apart from the params), and
        // one that is no object is refused, whatever its key looks like.
        let escaped = ok.replace(r#"{"_meta""#, r#"{"\u005fmeta""#);
        assert_eq!(meta(&escaped).unwrap(), meta(ok).unwrap());
        for key in ["_meta", r"\u005fmeta"] {
            for value in ["[]", "\"x\"", "1", "true"] {
                let bad = format!(r#"{{"{key}":{value}}}"#);
                assert!(
                    matches!(meta(&bad), Err(Refusal::Meta(ref why)) if why.contains("_meta must be an object")),
                    "{bad}: {:?}",
                    meta(&bad).err()
                );
            }
        }
        // Keys of `_meta` that do not decode are refused.
        let undecodable = ok.replace(r#""io.modelcontextprotocol/logLevel""#, r#""\ud800""#);
        assert!(matches!(meta(&undecodable), Err(Refusal::Meta(_))));
    }

    const META: &str = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;

    #[test]
    fn headers_must_mirror_the_body_base64_or_plain() {
        let body = format!(r#"{{"name":"caf\u00e9",{META}}}"#);
        let call = read(Some(body.as_bytes()), "tools/call").unwrap();
        assert_eq!(call.target.as_deref(), Some("café"));
        let map = |name: &str| {
            let mut h = HeaderMap::new();
            h.insert(VERSION_HEADER, HeaderValue::from_static("2026-07-28"));
            h.insert(METHOD_HEADER, HeaderValue::from_static("tools/call"));
            h.insert(NAME_HEADER, HeaderValue::from_str(name).unwrap());
            h
        };
        // "café" base64-encoded, as a client must send a non-ASCII name.
        let encoded = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("café")
        );
        assert_eq!(
            check_headers(&Mirrored::of(&map(&encoded)), &call, "tools/call"),
            Ok(())
        );
        for bad in ["other", "=?base64?!!?="] {
            assert!(matches!(
                check_headers(&Mirrored::of(&map(bad)), &call, "tools/call"),
                Err(Refusal::Header(_))
            ));
        }
        let all = map(&encoded);
        let mut missing = Mirrored::of(&all);
        missing.method = None;
        assert!(matches!(
            check_headers(&missing, &call, "tools/call"),
            Err(Refusal::Header(_))
        ));
        // The method header must name the body's method.
        assert!(matches!(
            check_headers(&Mirrored::of(&map(&encoded)), &call, "prompts/get"),
            Err(Refusal::Header(_))
        ));
        // A name that reads as encoded itself must be sent encoded: sent as is, the header
        // says what it decodes to, not the name.
        let odd = format!(r#"{{"name":"=?base64?YWJj?=",{META}}}"#);
        let odd = read(Some(odd.as_bytes()), "tools/call").unwrap();
        assert!(matches!(
            check_headers(&Mirrored::of(&map("=?base64?YWJj?=")), &odd, "tools/call"),
            Err(Refusal::Header(_))
        ));
        let as_sent = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("=?base64?YWJj?=")
        );
        assert_eq!(
            check_headers(&Mirrored::of(&map(&as_sent)), &odd, "tools/call"),
            Ok(())
        );
        // A call must name its tool.
        let nameless = format!(r#"{{"name":7,{META}}}"#);
        assert!(matches!(
            read(Some(nameless.as_bytes()), "tools/call"),
            Err(Refusal::Meta(_))
        ));
    }

    /// The result of a response frame under id 1.
    fn unframed(frame: &[u8]) -> String {
        let text = std::str::from_utf8(frame).unwrap();
        text.strip_prefix(r#"{"jsonrpc":"2.0","id":1,"result":"#)
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or_else(|| panic!("not a response under id 1: {text}"))
            .to_owned()
    }

    /// The params a 2026 client's call leaves at the front get the envelope back in place, and
    /// a server gets what a full read of them would have given it.
    #[test]
    fn the_params_left_take_the_envelope_back_as_a_full_read_would() {
        let v = r#""io.modelcontextprotocol/protocolVersion":"2026-07-28""#;
        let c = r#""io.modelcontextprotocol/clientCapabilities":{"sampling":{}}"#;
        for (method, params) in [
            (
                "tools/call",
                format!(
                    r#"{{"name":"t","_meta":{{{v},"progressToken":3,{c}}},"arguments":{{"a":"x"}}}}"#
                ),
            ),
            (
                "tools/call",
                format!(r#"{{"_meta":{{{v},{c}}},"arguments":{{}},"name":"t\u00e9"}}"#),
            ),
            (
                "resources/read",
                format!(r#"{{"uri":"file:///x","_meta":{{{c},{v}}}}}"#),
            ),
            (
                "tools/call",
                format!(r#"{{ "name" : "t" , "_meta" : {{ {v} , {c} }} , "arguments" : {{}} }}"#),
            ),
            (
                "tools/list",
                format!(r#"{{"cursor":"2","_meta":{{{v},{c}}}}}"#),
            ),
            (
                "tools/call",
                format!(
                    r#"{{"name":"t","_meta":{{{v},{c}}},"requestState":"s","inputResponses":{{}}}}"#
                ),
            ),
        ] {
            let r = read(Some(params.as_bytes()), method).unwrap();
            let envelope = std::str::from_utf8(&r.envelope).unwrap();
            let prepare = |left| {
                crate::upstream::prepare(method, Some(&r.params), envelope, true, left).unwrap()
            };
            let (fast, full) = (prepare(Some(&r.left)), prepare(None));
            let value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
            assert_eq!(value(&fast.params), value(&full.params), "{params}");
            assert_eq!(fast.target(), full.target(), "{params}");
            // Put back in place: everything before `_meta`'s value is as the front left it.
            assert!(
                fast.params.starts_with(&r.params[..r.left.meta.start]),
                "{params}"
            );
        }
    }

    #[test]
    fn owned_names_are_the_strings_that_read_as_owned_members() {
        /// The strings of `value`, keys and values, at any depth, read as owned: at most two.
        fn reading_as_owned(value: &serde_json::Value) -> usize {
            let owned = |s: &str| usize::from(lookalike::read_as(s, &OWNED_MEMBERS).is_some());
            match value {
                serde_json::Value::String(s) => owned(s),
                serde_json::Value::Array(a) => a.iter().map(reading_as_owned).sum(),
                serde_json::Value::Object(o) => {
                    o.iter().map(|(k, v)| owned(k) + reading_as_owned(v)).sum()
                }
                _ => 0,
            }
        }
        let names = [
            "resultType",
            "RESULTTYPE",
            "re\u{17F}ultType",
            "ttlMs",
            "TtLm\u{17F}",
            "cacheScope",
            "cacheScopes",
            "TTLMS",
            "CacheScope",
            "ttlMs\u{e9}",
            "c\u{e9}cheScope",
            "r\u{e9}sultType",
            "result",
            "type",
            "content",
            "text",
            "ttl",
            "cache",
            "r",
            "t",
            "c",
        ];
        // Every name as a key and a value, after padding that moves it through a word and
        // past the length where a vector search takes over.
        for pad in (0..9).chain([1000, 1020, 1100]) {
            for name in names {
                for other in names {
                    let result = serde_json::json!({
                        "content": [{"type": "text", "text": "x".repeat(pad)}],
                        name: other,
                    })
                    .to_string();
                    let value: serde_json::Value = serde_json::from_str(&result).unwrap();
                    assert_eq!(
                        owned_names(result.as_bytes()),
                        reading_as_owned(&value).min(2),
                        "{result}"
                    );
                }
            }
        }
        // Any escape counts as two: what it hides is not read here.
        assert_eq!(owned_names(br#"{"a":"\n"}"#), 2);
    }

    #[test]
    fn results_say_they_are_complete_once() {
        let call = |s: &str| {
            Completion::of("tools/call")
                .result(s.as_bytes(), b"1")
                .map(|b| unframed(&b))
        };
        assert_eq!(call("{}").as_deref(), Ok(r#"{"resultType":"complete"}"#));
        assert_eq!(
            call(r#"{"content":[]}"#).as_deref(),
            Ok(r#"{"resultType":"complete","content":[]}"#)
        );
        assert_eq!(
            call(r#"{"resultType":"complete","content":[]}"#).as_deref(),
            Ok(r#"{"resultType":"complete","content":[]}"#)
        );
        // An upstream cannot make the client answer questions the gateway never screened.
        for claims in [
            r#"{"resultType":"input_required","inputRequests":{}}"#,
            r#"{"\u0072esultType":"input_required"}"#,
            r#"{"resultType":"input_required","resultType":"complete"}"#,
            r#"{"resultType":"complete","ResultType":"input_required"}"#,
            "[1]",
            "7",
        ] {
            assert!(call(claims).is_err(), "{claims}");
        }
        // The word inside a value does not count as the key.
        assert_eq!(
            call(r#"{"text":"resultType"}"#).as_deref(),
            Ok(r#"{"resultType":"complete","text":"resultType"}"#)
        );
        let list = |s: &str| {
            Completion::of("tools/list")
                .result(s.as_bytes(), b"1")
                .map(|b| unframed(&b))
        };
        assert_eq!(
            list(r#"{"tools":[]}"#).as_deref(),
            Ok(r#"{"resultType":"complete","ttlMs":0,"cacheScope":"private","tools":[]}"#)
        );
        // What an upstream says of caching is not what its callers may share.
        assert_eq!(
            list(r#"{"tools":[],"ttlMs":5000,"cacheScope":"public","cacheScope":"public"}"#)
                .as_deref(),
            Ok(r#"{"resultType":"complete","ttlMs":0,"cacheScope":"private","tools":[]}"#)
        );
        // A result that says it is complete last, and names nothing else the gateway owns,
        // passes as the server framed it; any other goes the whole way.
        let framed = |result: &str| {
            jsonrpc::response(b"1", &Outcome::Result(Bytes::from(result.to_owned())))
        };
        let alone = framed(r#"{"content":[],"resultType":"complete"} "#);
        let passed = Completion::of("tools/call").frame(alone.clone(), b"1");
        assert_eq!(passed.as_ptr(), alone.as_ptr());
        for (result, completed) in [
            (
                r#"{"content":[{"text":"resultType"}],"resultType":"complete"}"#,
                r#"{"resultType":"complete","content":[{"text":"resultType"}]}"#,
            ),
            (
                r#"{"ttlMs":1,"resultType":"complete"}"#,
                r#"{"resultType":"complete"}"#,
            ),
            (
                r#"{"resultType":"complete"}"#,
                r#"{"resultType":"complete"}"#,
            ),
            (r#"{"a":"resultType":"complete"}"#, ""),
        ] {
            let out = Completion::of("tools/call").frame(framed(result), b"1");
            if completed.is_empty() {
                assert!(out.windows(5).any(|w| w == b"error"), "{result}");
            } else {
                assert_eq!(unframed(&out), completed, "{result}");
            }
        }
        let listed = framed(r#"{"tools":[],"resultType":"complete"}"#);
        assert_eq!(
            unframed(&Completion::of("tools/list").frame(listed, b"1")),
            r#"{"resultType":"complete","ttlMs":0,"cacheScope":"private","tools":[]}"#
        );
        // A whole frame: the id is kept, an error passes as it is.
        let frame = Completion::of("tools/list").frame(
            Bytes::from_static(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#),
            b"\"a\"",
        );
        assert_eq!(
            &frame[..],
            br#"{"jsonrpc":"2.0","id":"a","result":{"resultType":"complete","ttlMs":0,"cacheScope":"private"}}"#
        );
        let error =
            Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#);
        assert_eq!(
            Completion::of("tools/list").frame(error.clone(), b"1"),
            error
        );
        // A retry's answer goes out under the retry's own id.
        let moved = Completion::of("tools/call").frame(error.clone(), b"9");
        assert_eq!(
            &moved[..],
            br#"{"jsonrpc":"2.0","id":9,"error":{"code":1,"message":"m"}}"#
        );
    }

    #[test]
    fn the_envelope_leaves_the_params_and_the_rest_stays() {
        let r = read(
            Some(br#"{"name":"t","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"progressToken":4,"io.modelcontextprotocol/related-task":{"taskId":"x"}},"arguments":{"_meta":1}}"#),
            "tools/call",
        )
        .unwrap();
        assert_eq!(
            &r.params[..],
            br#"{"name":"t","_meta":{"progressToken":4,"io.modelcontextprotocol/related-task":{"taskId":"x"}},"arguments":{"_meta":1}}"#
        );
        assert_eq!(
            r.envelope,
            r#""io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}"#
        );
        // An escaped key is the envelope's all the same.
        let escaped = read(
            Some(br#"{"_meta":{"io.modelcontextprotocol\/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}"#),
            "tools/list",
        )
        .unwrap();
        assert_eq!(&escaped.params[..], br#"{"_meta":{}}"#);
        assert_eq!(
            escaped.envelope,
            r#""io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}"#,
            "written again with the key as the gateway spells it"
        );
        // `_meta` that is the envelope alone, spaced out: its members go on as they came,
        // shared with the request, without the space around them.
        let request = Bytes::from_static(
            b"{\"name\":\"t\", \"_meta\": {\n \"io.modelcontextprotocol/protocolVersion\" : \"2026-07-28\" ,\t\"io.modelcontextprotocol/clientCapabilities\":{ } \r\n} }",
        );
        let alone = super::read(Some(&request), "tools/call").unwrap();
        assert_eq!(
            alone.envelope,
            "\"io.modelcontextprotocol/protocolVersion\" : \"2026-07-28\" ,\t\"io.modelcontextprotocol/clientCapabilities\":{ }"
        );
        let within = request.as_ptr_range();
        assert!(within.contains(&alone.envelope.as_ptr()), "a copy");
        assert_eq!(alone.meta.capabilities, "{ }");
        assert!(within.contains(&alone.meta.capabilities.as_ptr()), "a copy");
        assert_eq!(&alone.params[..], b"{\"name\":\"t\", \"_meta\": {} }");
        // Put in a server's `_meta`, it is JSON.
        let sent: serde_json::Value = serde_json::from_str(&format!(
            "{{{}}}",
            std::str::from_utf8(&alone.envelope).unwrap()
        ))
        .unwrap();
        assert_eq!(
            sent["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
    }

    #[test]
    fn meta_keys_and_strings_read_as_their_text_escaped_or_not() {
        let r = read(
            Some(br#"{"name":"t\u0031","_meta":{"io.modelcontextprotocol/protocolVersion":"2026\u002d07-28","io.modelcontextprotocol\u002fclientCapabilities":{"a":1},"k\"ey":1,"plain":"x"},"arguments":{}}"#),
            "tools/call",
        )
        .unwrap();
        assert_eq!(r.target.as_deref(), Some("t1"));
        assert_eq!(r.meta.version, "2026-07-28");
        assert_eq!(r.meta.capabilities, r#"{"a":1}"#);
        assert_eq!(
            r.envelope,
            r#""io.modelcontextprotocol/protocolVersion":"2026\u002d07-28","io.modelcontextprotocol/clientCapabilities":{"a":1}"#
        );
        // What stays is written escaped where it must be, plain where it came plain.
        assert_eq!(
            &r.params[..],
            br#"{"name":"t\u0031","_meta":{"k\"ey":1,"plain":"x"},"arguments":{}}"#
        );
        serde_json::from_slice::<serde_json::Value>(&r.params).unwrap();
        let empty = format!(r#"{{"name":"",{META}}}"#);
        let r = read(Some(empty.as_bytes()), "tools/call").unwrap();
        assert_eq!(r.target.as_deref(), Some(""));
    }

    #[test]
    fn a_meta_key_given_twice_is_refused_however_it_is_spelled_or_many_keys_there_are() {
        const V: &str = r#""io.modelcontextprotocol/protocolVersion":"2026-07-28""#;
        const C: &str = r#""io.modelcontextprotocol/clientCapabilities":{}"#;
        let refused = |meta: String| match read(
            Some(format!(r#"{{"name":"t","_meta":{{{meta}}}}}"#).as_bytes()),
            "tools/call",
        ) {
            Err(Refusal::Meta(why)) => why,
            other => panic!("{meta}: {:?}", other.map(|r| r.params)),
        };
        // The gateway would read one version and a server the other.
        let why = refused(format!(
            r#"{V},{C},"io.modelcontextprotocol\u002fprotocolVersion":"2025-11-25""#
        ));
        assert!(
            why.contains("protocolVersion") && why.contains("twice"),
            "{why}"
        );
        // A progress token the gateway routes by, and a server reads the other of.
        let why = refused(format!(
            r#""progressToken":1,{V},{C},"progressTok\u0065n":2"#
        ));
        assert!(why.contains("progressToken"), "{why}");
        // Past the pairwise comparison's reach too.
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let why = refused(format!(r#"{many}{V},{C},"k7":0"#));
        assert!(why.contains("\"k7\""), "{why}");
        // Many distinct keys pass, kept in their order.
        let r = read(
            Some(format!(r#"{{"_meta":{{{many}{V},{C}}}}}"#).as_bytes()),
            "tools/list",
        )
        .unwrap();
        let kept: serde_json::Value = serde_json::from_slice(&r.params).unwrap();
        assert_eq!(kept["_meta"].as_object().unwrap().len(), 40);
        assert_eq!(kept["_meta"]["k39"], 39);
        // A key a lenient decoder reads as one the gateway reads (Go's `encoding/json` takes
        // the last that matches regardless of case): the server would take another version
        // or progress token than the gateway did.
        for (lookalike, owned) in [
            (
                r#""io.modelcontextprotocol/ProtocolVersion":"2025-06-18""#,
                "protocolVersion",
            ),
            (r#""PROGRESSTOKEN":2"#, "progressToken"),
            (r#""progre\u017fsToken\u0000":2"#, "progressToken"),
        ] {
            let why = refused(format!(r#""progressToken":1,{V},{C},{lookalike}"#));
            assert!(why.contains("too like") && why.contains(owned), "{why}");
        }
        // A key is shown cut, however long: the answer stays small.
        let long = r"\u0085".repeat(10_000);
        let why = refused(format!(r#""{long}":1,{V},{C},"{long}":2"#));
        assert!(why.contains("twice") && why.len() < 1_000, "{}", why.len());
        // Params that are no object carry no `_meta` a server would read.
        let listed = format!(r#"[{{{V},{C}}}]"#);
        assert!(matches!(
            read(Some(listed.as_bytes()), "tools/list"),
            Err(Refusal::Meta(_))
        ));
        // `_meta` of another shape is refused as such.
        for meta in ["[]", "1", r#""x""#, "null"] {
            let body = format!(r#"{{"_meta":{meta}}}"#);
            assert!(matches!(
                read(Some(body.as_bytes()), "tools/list"),
                Err(Refusal::Meta(_))
            ));
        }
    }

    #[test]
    fn a_retrys_members_are_read_and_checked() {
        let retry = format!(
            r#"{{"name":"t","arguments":{{}},"requestState":"abc","inputResponses":{{"1":{{"action":"accept"}}}},{META}}}"#
        );
        let r = read(Some(retry.as_bytes()), "tools/call").unwrap();
        assert_eq!(r.retry.state.as_deref(), Some("abc"));
        assert_eq!(r.retry.responses["1"].get(), r#"{"action":"accept"}"#);
        // A key given twice is ambiguous, however it is spelled and even where the first is
        // `null` (which a server reading the first would take): refused.
        for twice in [
            format!(r#"{{"name":"a","name":"b",{META}}}"#),
            format!(r#"{{"name":"a","n\u0061me":"b",{META}}}"#),
            format!(r#"{{"name":null,"name":"b",{META}}}"#),
            format!(r#"{{"name":"t","requestState":null,"requestState":"s",{META}}}"#),
            format!(r#"{{"name":"t","_meta":null,{META}}}"#),
        ] {
            assert!(
                matches!(
                    read(Some(twice.as_bytes()), "tools/call"),
                    Err(Refusal::Meta(ref why)) if why.contains("given twice")
                ),
                "{twice}"
            );
        }
        // Only requests that may be asked back carry a retry's members.
        let listed = read(Some(retry.as_bytes()), "tools/list").unwrap();
        assert!(listed.retry.state.is_none());
        for bad in [r#""requestState":7"#, r#""inputResponses":[1]"#] {
            let body = format!(r#"{{"name":"t",{bad},{META}}}"#);
            assert!(matches!(
                read(Some(body.as_bytes()), "tools/call"),
                Err(Refusal::Meta(_))
            ));
        }
        // A key a lenient server reads as one the gateway reads is refused, whatever the
        // method: it would carry answers no policy judged, or a state of the client's own.
        for lookalike in [
            r#""inputRe\u017fponses":{"1":{}}"#,
            r#""REQUESTSTATE":"mine""#,
            r#""requestState\u0000":"mine""#,
            r#""Name":"other""#,
            r#""URI":"file:///etc/passwd""#,
            r#""_META":{}"#,
        ] {
            for method in ["tools/call", "tools/list"] {
                let body = format!(r#"{{"name":"t","requestState":"abc",{lookalike},{META}}}"#);
                assert!(
                    matches!(
                        read(Some(body.as_bytes()), method),
                        Err(Refusal::Meta(ref why)) if why.contains("too like")
                    ),
                    "{method} {lookalike}"
                );
            }
        }
    }

    #[test]
    fn a_version_in_meta_is_found_however_its_key_is_spelled() {
        assert!(names_a_version(
            br#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#
        ));
        assert!(names_a_version(
            br#"{"_meta":{"io.modelcontextprotocol\/protocolVersion":"2026-07-28"}}"#
        ));
        assert!(!names_a_version(br#"{"name":"a\"b"}"#));
        assert!(!names_a_version(br#"{"name":"t"}"#));
    }

    #[test]
    fn logs_pass_at_or_above_the_asked_level_only() {
        let warning = Some(br#"{"level":"warning","data":"x"}"#.as_slice());
        assert!(log_wanted(warning, Some(3)));
        assert!(log_wanted(warning, Some(0)));
        assert!(!log_wanted(warning, Some(4)));
        assert!(!log_wanted(warning, None));
    }
}
