//! JSON-RPC 2.0 envelopes: parse only what routing needs, keep payloads as raw JSON bytes.
//!
//! A [`Message`] holds the frame it was parsed from and zero-copy slices of its
//! `id`, `params`, `result` and `error` members, so forwarding never re-encodes them.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use serde::Deserialize;

use crate::json_scan::{self, ScanError};
use crate::json_string;

/// JSON-RPC and gateway error codes.
pub mod code {
    /// The body is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON is not a valid JSON-RPC message.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters are missing or malformed.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The gateway failed internally.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The upstream server could not be reached or failed mid-call.
    pub const UPSTREAM_UNAVAILABLE: i64 = -32010;
    /// The upstream server did not answer within the deadline.
    pub const UPSTREAM_TIMEOUT: i64 = -32011;
    /// The request was cancelled before it completed.
    pub const REQUEST_CANCELLED: i64 = -32800;
    /// The session has too many requests in flight.
    pub const TOO_BUSY: i64 = -32012;
    /// 2026-07-28: an HTTP header disagrees with the body it mirrors (or is missing).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// 2026-07-28: serving the request needs a capability the client did not declare.
    pub const MISSING_CLIENT_CAPABILITY: i64 = -32021;
    /// 2026-07-28: the request's protocol version is not one the server speaks.
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
    /// The tool's definition changed (or is new) and waits for an operator's approval.
    pub const TOOL_NOT_APPROVED: i64 = -32040;
    /// The caller has no credentials for the upstream the request goes to.
    pub const NO_UPSTREAM_CREDENTIALS: i64 = -32042;
}

/// The `code` of a JSON-RPC error object, if it has one.
pub fn error_code(error: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct E {
        code: i64,
    }
    serde_json::from_slice::<E>(error).ok().map(|e| e.code)
}

/// Why a frame is not an acceptable JSON-RPC message.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all.
    #[error("parse error: {0}")]
    Json(String),
    /// JSON, but not a single JSON-RPC 2.0 message.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

impl ParseError {
    /// The JSON-RPC error code for this failure.
    pub fn code(&self) -> i64 {
        match self {
            ParseError::Json(_) => code::PARSE_ERROR,
            ParseError::Invalid(_) => code::INVALID_REQUEST,
        }
    }
}

/// A method's name: borrowed when it is one of MCP's, so that most messages need no copy.
pub type MethodName = Cow<'static, str>;

/// The name `method` as a message keeps it.
fn method_name(method: Cow<'_, str>) -> MethodName {
    let known: &'static str = match &*method {
        "tools/call" => "tools/call",
        "tools/list" => "tools/list",
        "resources/read" => "resources/read",
        "resources/list" => "resources/list",
        "resources/templates/list" => "resources/templates/list",
        "prompts/get" => "prompts/get",
        "prompts/list" => "prompts/list",
        "completion/complete" => "completion/complete",
        "ping" => "ping",
        "notifications/progress" => "notifications/progress",
        "notifications/message" => "notifications/message",
        "notifications/cancelled" => "notifications/cancelled",
        _ => return Cow::Owned(method.into_owned()),
    };
    Cow::Borrowed(known)
}

/// What a message is, with raw slices of its members.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A call that expects a response.
    Request {
        /// Raw JSON id (number or string).
        id: Bytes,
        /// Method name.
        method: MethodName,
        /// Raw JSON params, if any.
        params: Option<Bytes>,
    },
    /// A one-way message.
    Notification {
        /// Method name.
        method: MethodName,
        /// Raw JSON params, if any.
        params: Option<Bytes>,
    },
    /// The answer to a request.
    Response {
        /// Raw JSON id.
        id: Bytes,
        /// Raw `result` on success, raw `error` object on failure.
        outcome: Outcome,
    },
}

/// The outcome carried by a response: raw `result` or raw `error` object.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Raw JSON of `result`.
    Result(Bytes),
    /// Raw JSON of `error`.
    Error(Bytes),
}

/// A parsed JSON-RPC message and the frame it came from.
#[derive(Debug, Clone)]
pub struct Message {
    /// The whole frame.
    pub frame: Bytes,
    /// Its classification and members.
    pub kind: Kind,
}

/// Deepest nesting of arrays and objects accepted in a message. Raw members are forwarded
/// without being parsed into values, so nothing else would stop a deeply nested payload from
/// reaching (and crashing, or stalling) an upstream or a client.
pub const MAX_DEPTH: usize = 64;

/// Bytes of a frame outside its members (unknown members, whitespace) that the members taken
/// from it may keep alive, beyond as many as the members themselves hold.
const MAX_PADDING: usize = 4096;

/// The longest request id (its JSON text) and method name accepted, and the longest progress
/// token: each is kept while its request runs (the in-flight map, a listen stream, every
/// progress notification), apart from the body that brought it.
pub const MAX_KEPT_NAME: usize = 1024;

/// The members of an envelope, as written: `None` if absent, `Some(None)` if `null`.
#[derive(Default)]
struct Envelope<'a> {
    jsonrpc: Option<Option<&'a str>>,
    id: Option<Option<&'a str>>,
    method: Option<Option<&'a str>>,
    params: Option<Option<&'a str>>,
    result: Option<Option<&'a str>>,
    error: Option<Option<&'a str>>,
}

impl<'a> Envelope<'a> {
    /// Records member `key` (with its quotes); the first member named twice, or a name that
    /// is no text, is the error.
    fn take(&mut self, key: &str, value: &'a str, problem: &mut Option<ParseError>) {
        // A name written with escapes is the name it decodes to (`"\u0069d"` is `id`); one
        // that does not decode (a lone surrogate) is no text, and peers read it differently.
        let name = match json_scan::unquote(key) {
            Ok(name) => name,
            Err(e) => {
                problem.get_or_insert(ParseError::Json(format!("a member's name: {e}")));
                return;
            }
        };
        let (slot, name) = match &*name {
            "jsonrpc" => (&mut self.jsonrpc, "\"jsonrpc\" is given twice"),
            "id" => (&mut self.id, "\"id\" is given twice"),
            "method" => (&mut self.method, "\"method\" is given twice"),
            "params" => (&mut self.params, "\"params\" is given twice"),
            "result" => (&mut self.result, "\"result\" is given twice"),
            "error" => (&mut self.error, "\"error\" is given twice"),
            _ => return,
        };
        if slot.is_some() {
            problem.get_or_insert(ParseError::Invalid(name));
        }
        *slot = Some((value != "null").then_some(value));
    }
}

/// The text of a JSON string member (`None` if it is not a string), escapes decoded.
fn string_value(raw: &str) -> Result<Option<Cow<'_, str>>, ParseError> {
    if !raw.starts_with('"') {
        return Ok(None);
    }
    json_scan::unquote(raw)
        .map(Some)
        .map_err(|e| ParseError::Json(e.to_string()))
}

/// Parses one JSON-RPC 2.0 message; batches and non-objects are rejected.
pub fn parse(frame: Bytes) -> Result<Message, ParseError> {
    parse_frame(frame, Origin::Peer)
}

/// Parses a client's request body ([`parse`] otherwise): its members stay slices of it however
/// much of it is padding, since the body holds its share of `mcp.max_bodies_bytes` for as long
/// as any of it is kept, and copies would be memory nobody counts.
///
/// A request's id and method are at most [`MAX_KEPT_NAME`] bytes here (kept apart from the
/// counted body while the request runs). An upstream's are not bounded so: a server request
/// refused unread would leave the call that waits on it hanging.
pub fn parse_client_body(body: Bytes) -> Result<Message, ParseError> {
    parse_frame(body, Origin::ClientBody)
}

/// Whose frame is parsed.
#[derive(Clone, Copy, PartialEq)]
enum Origin {
    /// A client's request body: counted in `mcp.max_bodies_bytes` while any of it is kept.
    ClientBody,
    /// An upstream's message, a replica's, the gateway's own.
    Peer,
}

fn parse_frame(frame: Bytes, from: Origin) -> Result<Message, ParseError> {
    let copy_from_padding = from == Origin::Peer;
    let first = frame.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => return Err(ParseError::Invalid("empty body")),
        Some(b'[') => return Err(ParseError::Invalid("JSON-RPC batches are not supported")),
        Some(b'{') => {}
        Some(_) => {
            // Distinguish "valid JSON but not an object" from "not JSON".
            return match serde_json::from_slice::<&RawValue>(&frame) {
                Ok(_) => Err(ParseError::Invalid(
                    "a JSON-RPC message must be a JSON object",
                )),
                Err(e) => Err(ParseError::Json(e.to_string())),
            };
        }
    }
    // JSON text must be UTF-8; checked once here for the whole frame.
    let text = match std::str::from_utf8(&frame) {
        Ok(text) => text,
        Err(e) => return Err(ParseError::Json(format!("not UTF-8: {e}"))),
    };
    // One pass checks the whole frame is JSON and finds the envelope's members; nothing is
    // decoded but the names and the two strings routing reads (`jsonrpc`, `method`).
    let mut env = Envelope::default();
    let mut problem = None;
    json_scan::members(text, MAX_DEPTH, |key, value| {
        env.take(key, value, &mut problem)
    })
    .map_err(|e| match e {
        ScanError::TooDeep(_) => {
            ParseError::Invalid("JSON nested deeper than 64 levels is not accepted")
        }
        e @ ScanError::Syntax { .. } => ParseError::Json(e.to_string()),
    })?;
    if let Some(problem) = problem {
        return Err(problem);
    }
    let jsonrpc = env
        .jsonrpc
        .flatten()
        .map(string_value)
        .transpose()?
        .flatten();
    if jsonrpc.as_deref() != Some("2.0") {
        return Err(ParseError::Invalid("\"jsonrpc\" must be \"2.0\""));
    }
    let method = match env.method.flatten() {
        None => None,
        Some(raw) => {
            Some(string_value(raw)?.ok_or(ParseError::Invalid("\"method\" must be a string"))?)
        }
    };
    // `"id": null` stays distinguishable from a missing id (a notification); a `null` params,
    // result or error counts as absent.
    let id_raw = env.id.map(|id| id.unwrap_or("null"));
    let (params, result, error) = (
        env.params.flatten(),
        env.result.flatten(),
        env.error.flatten(),
    );
    // What is kept of a message (a cached list page, an initialize result, a request id)
    // must not hold its whole frame: a peer could pad a tiny result with megabytes of members
    // nobody reads. Where most of the frame is such padding, the members are copied out.
    let kept: usize = [id_raw, params, result, error]
        .into_iter()
        .flatten()
        .map(str::len)
        .sum();
    let padded = copy_from_padding && frame.len() - kept > MAX_PADDING.max(kept);
    let slice = |raw: &str| {
        if padded {
            Bytes::copy_from_slice(raw.as_bytes())
        } else if raw == "null" {
            Bytes::from_static(b"null")
        } else {
            frame.slice_ref(raw.as_bytes())
        }
    };
    // A response's id is only looked up; a request's is kept while it runs.
    if from == Origin::ClientBody
        && let Some(method) = &method
    {
        if id_raw.is_some_and(|id| id.len() > MAX_KEPT_NAME) {
            return Err(ParseError::Invalid(
                "a request's \"id\" longer than 1024 bytes is not accepted",
            ));
        }
        if method.len() > MAX_KEPT_NAME {
            return Err(ParseError::Invalid(
                "a \"method\" longer than 1024 bytes is not accepted",
            ));
        }
    }
    // A request's id is copied whatever the frame: it is small, and it is what outlives a
    // request (a listen stream's subscription id, the in-flight map, a parked call), where a
    // slice would keep the whole frame (and a client body's share of `mcp.max_bodies_bytes`)
    // alive. A response's id is only looked up, and lives no longer than its outcome's slice.
    let id = id_raw.map(|raw| match raw {
        "null" => Bytes::from_static(b"null"),
        raw if method.is_some() => Bytes::copy_from_slice(raw.as_bytes()),
        raw => slice(raw),
    });
    // Only an error response may carry `"id": null` (its request's id could not be read).
    let null_error = error.is_some() && id.as_deref() == Some(b"null");
    if let Some(id) = &id
        && !null_error
    {
        let ok = matches!(id.first(), Some(b'"' | b'-' | b'0'..=b'9'));
        if !ok {
            return Err(ParseError::Invalid(
                "\"id\" must be a string or a number (a request with \"id\": null is not a notification)",
            ));
        }
    }
    let kind = match (method, id, result, error) {
        (Some(method), id, None, None) => {
            let params = params.map(slice);
            if let Some(p) = &params
                && !matches!(p.first(), Some(b'{' | b'['))
            {
                return Err(ParseError::Invalid(
                    "\"params\" must be an object or an array",
                ));
            }
            let method = method_name(method);
            match id {
                Some(id) => Kind::Request { id, method, params },
                None => Kind::Notification { method, params },
            }
        }
        (None, Some(id), Some(result), None) => Kind::Response {
            id,
            outcome: Outcome::Result(slice(result)),
        },
        (None, id, None, Some(error)) => Kind::Response {
            id: id.unwrap_or_else(|| Bytes::from_static(b"null")),
            outcome: Outcome::Error(slice(error)),
        },
        (None, _, None, None) => return Err(ParseError::Invalid("missing \"method\"")),
        _ => {
            return Err(ParseError::Invalid(
                "a message must have exactly one of \"method\", \"result\" or \"error\"",
            ));
        }
    };
    Ok(Message { frame, kind })
}

/// Calls `f` with each member of the JSON object `object`, in order; nothing is kept between
/// members, so a huge object costs no memory beyond its text. `Err` if it is not an object.
pub fn each_member<'a>(
    object: &'a RawValue,
    f: impl FnMut(String, &'a RawValue),
) -> Result<(), serde_json::Error> {
    struct Members<F>(F);
    impl<'de, F: FnMut(String, &'de RawValue)> serde::de::Visitor<'de> for Members<F> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                let value: &'de RawValue = map.next_value()?;
                (self.0)(key, value);
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(object.get());
    serde::Deserializer::deserialize_map(&mut de, Members(f))
}

/// The JSON object `object` with its member `key` (every one so named) replaced by `value`,
/// or added: written member by member, never read into values (a peer's object may be
/// large). `None` if `object` is not an object.
pub fn with_member(object: &RawValue, key: &str, value: &RawValue) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(object.get().len() + key.len() + value.get().len() + 4);
    out.push(b'{');
    each_member(object, |k, v| {
        if k != key {
            crate::json_string::put(&mut out, &k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
            out.push(b',');
        }
    })
    .ok()?;
    crate::json_string::put(&mut out, key);
    out.push(b':');
    out.extend_from_slice(value.get().as_bytes());
    out.push(b'}');
    Some(out)
}

/// The id a `notifications/cancelled` names (`params.requestId`, raw JSON).
pub fn cancelled_request(params: Option<&[u8]>) -> Option<&[u8]> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "requestId")]
        id: &'a RawValue,
    }
    let p: P<'_> = serde_json::from_slice(params?).ok()?;
    Some(p.id.get().as_bytes())
}

impl Message {
    /// The method name of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match &self.kind {
            Kind::Request { method, .. } | Kind::Notification { method, .. } => Some(method),
            Kind::Response { .. } => None,
        }
    }
}

/// Encodes a request frame.
pub fn request(id: &[u8], method: &str, params: Option<&[u8]>) -> Bytes {
    const HEAD: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":";
    const METHOD: &[u8] = b",\"method\":";
    const PARAMS: &[u8] = b",\"params\":";
    // The frame's length when the method needs no escape: short, and large params are
    // copied again as the buffer grows.
    let mut b = BytesMut::with_capacity(
        HEAD.len()
            + id.len()
            + METHOD.len()
            + method.len()
            + 2
            + PARAMS.len()
            + params.map_or(0, <[u8]>::len)
            + 1,
    );
    b.put_slice(HEAD);
    b.put_slice(id);
    b.put_slice(METHOD);
    json_string::put(&mut b, method);
    if let Some(p) = params {
        b.put_slice(PARAMS);
        b.put_slice(p);
    }
    b.put_u8(b'}');
    b.freeze()
}

/// Encodes a notification frame.
pub fn notification(method: &str, params: Option<&[u8]>) -> Bytes {
    let mut b = BytesMut::with_capacity(40 + method.len() + params.map_or(0, <[u8]>::len));
    b.put_slice(b"{\"jsonrpc\":\"2.0\",\"method\":");
    json_string::put(&mut b, method);
    if let Some(p) = params {
        b.put_slice(b",\"params\":");
        b.put_slice(p);
    }
    b.put_u8(b'}');
    b.freeze()
}

/// Encodes a response frame carrying a raw outcome.
pub fn response(id: &[u8], outcome: &Outcome) -> Bytes {
    let (key, raw): (&[u8], &Bytes) = match outcome {
        Outcome::Result(r) => (b",\"result\":", r),
        Outcome::Error(e) => (b",\"error\":", e),
    };
    const HEAD: &[u8] = RESPONSE_HEAD;
    // Exactly the frame's length: one byte short, and a 64 KiB result is copied again.
    let mut b = BytesMut::with_capacity(HEAD.len() + id.len() + key.len() + raw.len() + 1);
    b.put_slice(HEAD);
    b.put_slice(id);
    b.put_slice(key);
    b.put_slice(raw);
    b.put_u8(b'}');
    b.freeze()
}

/// The raw id of a response framed by [`response`], whatever its size, without reading the
/// rest of it.
pub fn framed_id(frame: &[u8]) -> Option<&[u8]> {
    let rest = frame.strip_prefix(RESPONSE_HEAD)?;
    let mut ids = serde_json::Deserializer::from_slice(rest);
    let id = <&RawValue as serde::Deserialize>::deserialize(&mut ids).ok()?;
    Some(id.get().as_bytes())
}

/// How [`response`] starts a frame.
const RESPONSE_HEAD: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":";

/// Encodes a JSON-RPC error object.
pub fn error_object(code: i64, message: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(32 + message.len());
    b.put_slice(b"{\"code\":");
    b.put_slice(code.to_string().as_bytes());
    b.put_slice(b",\"message\":");
    json_string::put(&mut b, message);
    b.put_u8(b'}');
    b.freeze()
}

/// Encodes an error response frame; `id` is `None` when the request's id is unknown.
pub fn error_response(id: Option<&[u8]>, code: i64, message: &str) -> Bytes {
    response(
        id.unwrap_or(b"null"),
        &Outcome::Error(error_object(code, message)),
    )
}

/// Encodes an error response frame whose error carries `data` (raw JSON).
pub fn error_response_with_data(id: Option<&[u8]>, code: i64, message: &str, data: &[u8]) -> Bytes {
    let object = error_object(code, message);
    let mut b = BytesMut::with_capacity(object.len() + 8 + data.len());
    b.put_slice(&object[..object.len() - 1]);
    b.put_slice(b",\"data\":");
    b.put_slice(data);
    b.put_u8(b'}');
    response(id.unwrap_or(b"null"), &Outcome::Error(b.freeze()))
}

/// Encodes a u64 as a raw JSON id.
pub fn numeric_id(n: u64) -> Bytes {
    Bytes::from(n.to_string())
}

/// Reads a raw JSON id back as a u64, if it is one.
pub fn id_as_u64(id: &[u8]) -> Option<u64> {
    std::str::from_utf8(id).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_answers_id_is_read_whatever_follows_it() {
        let result = Outcome::Result(Bytes::from_static(b"{\"x\":1}"));
        for id in [&b"7"[..], b"\"a,\\\"result\\\":\"", b"null", b"-1.5e3"] {
            let frame = response(id, &result);
            assert_eq!(
                framed_id(&frame),
                Some(id),
                "{}",
                String::from_utf8_lossy(&frame)
            );
        }
        // Only what `response` framed: another shape is not guessed at.
        assert_eq!(
            framed_id(b"{\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{}}"),
            None
        );
        assert_eq!(framed_id(b"{\"jsonrpc\":\"2.0\",\"id\":"), None);
    }

    fn p(s: &str) -> Result<Message, ParseError> {
        parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn a_clients_request_id_and_method_are_bounded_and_a_responses_id_is_not() {
        let id = |n: usize| format!("\"{}\"", "i".repeat(n - 2));
        let p = |s: &str| parse_client_body(Bytes::copy_from_slice(s.as_bytes()));
        let request = |id: &str, method: &str| {
            p(&format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}"}}"#
            ))
        };
        assert!(request(&id(MAX_KEPT_NAME), "ping").is_ok());
        let long = request(&id(MAX_KEPT_NAME + 1), "ping").unwrap_err();
        assert_eq!(long.code(), code::INVALID_REQUEST);
        assert!(
            long.to_string().contains("\"id\" longer than 1024"),
            "{long}"
        );
        let notification = format!(
            r#"{{"jsonrpc":"2.0","method":"{}"}}"#,
            "m".repeat(MAX_KEPT_NAME + 1)
        );
        assert!(p(&notification).is_err());
        assert!(request("1", &"m".repeat(MAX_KEPT_NAME)).is_ok());
        // A response's id (a sealed server request's, say) is looked up, not kept.
        let response = format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
            id(4 * MAX_KEPT_NAME)
        );
        assert!(p(&response).is_ok());
        // A server's question with a long id is read, to be answered.
        let asked = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"sampling/createMessage"}}"#,
            id(4 * MAX_KEPT_NAME)
        );
        assert!(parse(Bytes::from(asked)).is_ok());
    }

    #[test]
    fn what_is_kept_of_a_padded_message_does_not_hold_its_frame() {
        let within = |part: &Bytes, frame: &Bytes| {
            let (start, end) = (
                frame.as_ptr() as usize,
                frame.as_ptr() as usize + frame.len(),
            );
            (start..end).contains(&(part.as_ptr() as usize))
        };
        let pad = "x".repeat(1 << 20);
        let padded = Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":7,"result":{{"tools":[]}},"pad":"{pad}"}}"#
        ));
        let m = parse(padded.clone()).unwrap();
        let Kind::Response {
            id,
            outcome: Outcome::Result(result),
        } = &m.kind
        else {
            panic!("a response");
        };
        assert_eq!((&id[..], &result[..]), (&b"7"[..], &br#"{"tools":[]}"#[..]));
        assert!(!within(id, &padded) && !within(result, &padded));
        // An ordinary message, however large, is not copied: its members are most of it.
        let large = Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":7,"result":{{"text":"{pad}"}},"extra":"{}"}}"#,
            "y".repeat(1000)
        ));
        let m = parse(large.clone()).unwrap();
        let Kind::Response {
            outcome: Outcome::Result(result),
            ..
        } = &m.kind
        else {
            panic!("a response");
        };
        assert!(within(result, &large));
        let Kind::Response { id, .. } = &m.kind else {
            unreachable!()
        };
        assert!(
            within(id, &large),
            "a response's id is a slice, like its outcome"
        );
        // A client's body keeps its params as slices of it whatever the padding (it is counted
        // while any of it lives); its id is a copy, so that nothing kept for long holds it.
        let body = Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":"call-1","method":"tools/call","params":{{"name":"t"}},"pad":"{pad}"}}"#
        ));
        for (m, sliced) in [
            (parse_client_body(body.clone()).unwrap(), true),
            (parse(body.clone()).unwrap(), false),
        ] {
            let Kind::Request { id, params, .. } = &m.kind else {
                panic!("a request");
            };
            assert_eq!(&id[..], br#""call-1""#);
            assert!(!within(id, &body));
            assert_eq!(within(params.as_ref().unwrap(), &body), sliced);
        }
    }

    #[test]
    fn frames_written_read_back_as_written_whatever_the_method_or_id() {
        use serde_json::{Value, json};
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(70_000));
        for method in [
            "tools/call",
            "a\"b",
            "back\\slash",
            "line\nbreak\u{1}",
            "caf\u{e9}",
        ] {
            for id in [&b"1"[..], b"12345678901234567890", br#""an id""#] {
                for params in [None, Some(&b"{}"[..]), Some(big.as_bytes())] {
                    let frame: Value =
                        serde_json::from_slice(&request(id, method, params)).unwrap();
                    let id: Value = serde_json::from_slice(id).unwrap();
                    let mut want = json!({"jsonrpc": "2.0", "id": id, "method": method});
                    if let Some(p) = params {
                        want["params"] = serde_json::from_slice(p).unwrap();
                    }
                    assert_eq!(frame, want);
                    let note: Value =
                        serde_json::from_slice(&notification(method, params)).unwrap();
                    want.as_object_mut().unwrap().remove("id");
                    assert_eq!(note, want);
                }
                let result = Outcome::Result(Bytes::from(big.clone()));
                let frame: Value = serde_json::from_slice(&response(id, &result)).unwrap();
                assert_eq!(frame["result"]["x"].as_str().map(str::len), Some(70_000));
            }
        }
    }

    #[test]
    fn request_members_are_zero_copy_slices() {
        let m = p(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"x":[1,2]}}}"#).unwrap();
        match m.kind {
            Kind::Request { id, method, params } => {
                assert_eq!(&id[..], b"7");
                assert_eq!(&*method, "tools/call");
                assert_eq!(
                    &params.unwrap()[..],
                    br#"{"name":"a","arguments":{"x":[1,2]}}"#
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn classifies_notifications_and_responses() {
        // Names and the routed strings are read decoded; every other byte stays as written.
        let m = p(r#"{"j\u0073onrpc":"2\u002e0","id":"\u0031","method":"tools\/call","params":{"a":"\u00e9"}}"#)
            .unwrap();
        let Kind::Request { id, method, params } = m.kind else {
            panic!("a request")
        };
        assert_eq!(&*method, "tools/call");
        assert_eq!(&id[..], br#""\u0031""#);
        assert_eq!(params.as_deref(), Some(&br#"{"a":"\u00e9"}"#[..]));
        // `null` members other than `id` count as absent.
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","method":"x","params":null,"id":null,"result":null,"error":null}"#)
                .map(|m| m.kind),
            Err(ParseError::Invalid(_))
        ));
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","method":"x","params":null}"#)
                .unwrap()
                .kind,
            Kind::Notification { params: None, .. }
        ));
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .unwrap()
                .kind,
            Kind::Notification { .. }
        ));
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap().kind,
            Kind::Response {
                outcome: Outcome::Result(_),
                ..
            }
        ));
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}"#)
                .unwrap()
                .kind,
            Kind::Response {
                outcome: Outcome::Error(_),
                ..
            }
        ));
        assert!(matches!(
            p(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}"#)
                .unwrap()
                .kind,
            Kind::Response {
                outcome: Outcome::Error(_),
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_input_with_the_right_code() {
        let cases = [
            ("{not json", code::PARSE_ERROR),
            ("", code::INVALID_REQUEST),
            (
                "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]",
                code::INVALID_REQUEST,
            ),
            ("42", code::INVALID_REQUEST),
            ("\"str\"", code::INVALID_REQUEST),
            (r#"{"jsonrpc":"2.0","id":1}"#, code::INVALID_REQUEST),
            (r#"{"id":1,"method":"ping"}"#, code::INVALID_REQUEST),
            (
                r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":null,"result":{}}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#,
                code::INVALID_REQUEST,
            ),
            // Valid JSON of the wrong shape is an invalid request, not a parse error.
            (
                r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":2.0,"id":1,"method":"x"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":null,"id":1,"method":"x"}"#,
                code::INVALID_REQUEST,
            ),
            // A member named twice, however its name is written: which one would a peer read?
            (
                r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"x"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"\u0069d":2,"method":"x"}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","params":null,"params":{}}"#,
                code::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","metho\u0064":"y"}"#,
                code::INVALID_REQUEST,
            ),
            // Not JSON, wherever it stops being JSON.
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x",}"#,
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":01,"method":"x"}"#,
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":"\q"}}"#,
                code::PARSE_ERROR,
            ),
            (
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"a\nb\"}",
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x"} x"#,
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"\uD800"}"#,
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","\uDCCC":1}"#,
                code::PARSE_ERROR,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","result":{}}"#,
                code::INVALID_REQUEST,
            ),
        ];
        for (input, want) in cases {
            let err = p(input).expect_err(input);
            assert_eq!(err.code(), want, "{input}: {err}");
        }
    }

    // Found by fuzz/fuzz_targets/jsonrpc.rs: invalid UTF-8 inside a member the envelope ignores
    // was accepted.
    #[test]
    fn rejects_invalid_utf8_anywhere() {
        let frame = b"{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"extra\":{\"k\":\"\xff\xfe\"}}";
        let err = parse(Bytes::from_static(frame)).expect_err("invalid UTF-8");
        assert_eq!(err.code(), code::PARSE_ERROR, "{err}");
    }

    #[test]
    fn nesting_is_bounded_and_strings_do_not_count() {
        let nested = |n: usize| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":{}1{}}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The envelope and params are two levels.
        assert!(p(&nested(MAX_DEPTH - 2)).is_ok());
        let err = p(&nested(MAX_DEPTH - 1)).unwrap_err();
        assert_eq!(err.code(), code::INVALID_REQUEST, "{err}");
        let in_string = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":"{}\"\\{}"}}}}"#,
            "[{".repeat(500),
            "]".repeat(10)
        );
        assert!(p(&in_string).is_ok(), "brackets inside strings are text");
    }

    #[test]
    fn encodes_frames_that_parse_back() {
        let f = request(b"3", "tools/call", Some(br#"{"a":"\u00e9"}"#));
        assert!(matches!(parse(f).unwrap().kind, Kind::Request { .. }));
        let e = error_response(Some(b"\"x\""), code::INVALID_PARAMS, "bad \"name\"");
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"]["message"], "bad \"name\"");
        assert_eq!(v["id"], "x");
        assert_eq!(id_as_u64(b"12"), Some(12));
        assert_eq!(id_as_u64(b"\"12\""), None);
    }
}
