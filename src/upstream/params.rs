//! The params members the gateway routes by: resource URIs and progress tokens.

use bytes::Bytes;
use serde::Deserialize;

use crate::mcp::jsonrpc::{self, Message};

/// The `uri` member of params (`resources/subscribe`, `notifications/resources/updated`...).
pub(crate) fn uri_of(params: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct P {
        uri: String,
    }
    serde_json::from_slice::<P>(params).ok().map(|p| p.uri)
}

/// The progress notification with its `progressToken` replaced by `token` (raw JSON).
pub(super) fn with_progress_token(msg: Message, token: &[u8]) -> Message {
    let rewritten = (|| {
        let jsonrpc::Kind::Notification {
            params: Some(p), ..
        } = &msg.kind
        else {
            return None;
        };
        // Member by member: a server's notification is never read into values.
        let params: &serde_json::value::RawValue =
            serde_json::from_str(std::str::from_utf8(p).ok()?).ok()?;
        let token = serde_json::from_str(std::str::from_utf8(token).ok()?).ok()?;
        let params = jsonrpc::with_member(params, "progressToken", token)?;
        jsonrpc::parse(jsonrpc::notification(
            "notifications/progress",
            Some(&params),
        ))
        .ok()
    })();
    rewritten.unwrap_or(msg)
}

/// Extracts `progressToken` (raw JSON) from notification params.
pub(super) fn progress_token_of(params: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "progressToken")]
        token: Option<&'a serde_json::value::RawValue>,
    }
    let p: P<'_> = serde_json::from_slice(params).ok()?;
    p.token.map(|t| Bytes::copy_from_slice(t.get().as_bytes()))
}

/// Whether a key in `params` could be read as `progressToken`
/// ([`crate::mcp::lookalike::read_as`]): something is escaped (`\u0070rogressToken`, a NUL),
/// or the bytes spell it as such a decoder folds them. Most calls carry no token, and this
/// skips their parse.
pub(crate) fn may_name_progress_token(params: &[u8]) -> bool {
    memchr::memchr(b'\\', params).is_some()
        || memchr::memchr2_iter(b'p', b'P', params).any(|at| folds_to_progress_token(&params[at..]))
}

/// Whether `text` starts with `progressToken` as a lenient decoder reads it: ASCII case aside,
/// with `ſ` (U+017F) for an `s` and the Kelvin sign (U+212A) for a `k`.
fn folds_to_progress_token(mut text: &[u8]) -> bool {
    for want in PROGRESS_TOKEN.bytes().map(|b| b.to_ascii_lowercase()) {
        let folded = match want {
            b's' => "\u{17F}".as_bytes(),
            b'k' => "\u{212A}".as_bytes(),
            _ => &[],
        };
        text = match text.split_first() {
            Some((b, rest)) if b.to_ascii_lowercase() == want => rest,
            _ if !folded.is_empty() && text.starts_with(folded) => &text[folded.len()..],
            _ => return false,
        };
    }
    true
}

/// The `_meta.progressToken` (raw JSON) of request params, read as strictly as any server
/// might read it: `Err` when `_meta` (or the params) name it more than once (servers differ on
/// which one they read, and the gateway routes progress by the one it reads), when another key
/// of `_meta` is one a lenient server could read as it (`ProgressToken`: the gateway would
/// neither route nor replace that token) or a key of the params as `_meta`, when a key is no
/// text (a lone surrogate: a server may read it as anything), or when the token is longer than [`jsonrpc::MAX_KEPT_NAME`] (it
/// is kept while the call runs, and written into each of its progress notifications).
pub fn request_progress_token(params: &[u8]) -> Result<Option<Bytes>, String> {
    use crate::json_scan;
    use crate::mcp::lookalike;
    if !may_name_progress_token(params) {
        return Ok(None);
    }
    // Not an object, or not JSON: the call's own checks say so; no token either way.
    let Ok(text) = std::str::from_utf8(params) else {
        return Ok(None);
    };
    let no_text = || "params has a member name that is not text (a lone surrogate)".to_owned();
    let (mut metas, mut refused) = (Vec::new(), None);
    let scanned = json_scan::members(text, json_scan::MAX_DEPTH, |key, value| {
        match json_scan::unquote(key) {
            Ok(k) if k == "_meta" => {
                if value.starts_with('{') {
                    metas.push(value);
                }
            }
            // The gateway replaces the token in `_meta` only: a server reading `_META` as it
            // would get the client's.
            Ok(k) => {
                if refused.is_none() && lookalike::read_as(&k, &["_meta"]).is_some() {
                    refused = Some(format!(
                        "params.{:?} is too like params._meta: servers differ on which they read",
                        lookalike::shown(&k)
                    ));
                }
            }
            Err(_) => {
                refused.get_or_insert_with(no_text);
            }
        }
    });
    if scanned.is_err() {
        return Ok(None);
    }
    let (mut named, mut token) = (0, None);
    for meta in &metas {
        let _ = json_scan::members(
            meta,
            json_scan::MAX_DEPTH,
            |key, value| match json_scan::unquote(key) {
                Ok(k) if k == PROGRESS_TOKEN => {
                    named += 1;
                    token = Some(value);
                }
                Ok(k) => {
                    if refused.is_none() && lookalike::read_as(&k, &[PROGRESS_TOKEN]).is_some() {
                        refused = Some(format!(
                            "params._meta[{:?}] is too like params._meta[{PROGRESS_TOKEN:?}]: servers differ on which they read",
                            lookalike::shown(&k)
                        ));
                    }
                }
                Err(_) => {
                    refused.get_or_insert_with(no_text);
                }
            },
        );
    }
    if let Some(why) = refused {
        return Err(why);
    }
    // Two `_meta`s without a token go as sent; with one, a server reading the other `_meta`
    // than the gateway would get a token the gateway did not read (or replace).
    if named > 0 && metas.len() > 1 {
        return Err(format!(
            "params._meta is given twice, naming {PROGRESS_TOKEN} (servers differ on which they read)"
        ));
    }
    if named > 1 {
        return Err(format!(
            "params._meta names {PROGRESS_TOKEN} more than once (servers differ on which they read)"
        ));
    }
    match token {
        Some(t) if t.len() > jsonrpc::MAX_KEPT_NAME => Err(format!(
            "params._meta.{PROGRESS_TOKEN} is longer than {} bytes",
            jsonrpc::MAX_KEPT_NAME
        )),
        Some(t) if t != "null" => Ok(Some(Bytes::copy_from_slice(t.as_bytes()))),
        _ => Ok(None),
    }
}

const PROGRESS_TOKEN: &str = "progressToken";

#[cfg(test)]
mod tests {
    use super::{may_name_progress_token, request_progress_token};

    /// A key a lenient server reads as `progressToken` is neither routed nor replaced by the
    /// gateway: refused, the key named (cut) in the error.
    #[test]
    fn a_key_too_like_progress_token_is_refused() {
        for (params, key) in [
            (
                r#"{"_meta":{"ProgressToken":"gatehouse-1"}}"#,
                "ProgressToken",
            ),
            (r#"{"_meta":{"PROGRESSTOKEN":1}}"#, "PROGRESSTOKEN"),
            (
                "{\"_meta\":{\"progre\u{17F}sToken\":1}}",
                "progre\u{17F}sToken",
            ),
            (
                "{\"_meta\":{\"progressTo\u{212A}en\":1}}",
                "progressTo\u{212A}en",
            ),
            (r#"{"_meta":{"progressToken\u0000":1}}"#, "progressToken\0"),
            (r#"{"_meta":{"\u0050rogressToken":1}}"#, "ProgressToken"),
            (
                r#"{"_meta":{"progressToken":1,"progresstoken":2}}"#,
                "progresstoken",
            ),
        ] {
            let err = request_progress_token(params.as_bytes()).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "params._meta[{key:?}] is too like params._meta[\"progressToken\"]: servers differ on which they read"
                ),
                "{params}"
            );
        }
        let long = format!(
            r#"{{"_meta":{{"progressToken{}":1}}}}"#,
            "\\u0000".repeat(500)
        );
        let err = request_progress_token(long.as_bytes()).unwrap_err();
        assert_eq!(
            err.matches(r"\0").count(),
            64 - "progressToken".len(),
            "{err}"
        );
        // `_meta` itself, spelled so that a lenient server reads it and the gateway does not.
        for params in [
            r#"{"_META":{"progressToken":"gatehouse-1"}}"#,
            r#"{"_meta":{},"_Meta":{"progressToken":"gatehouse-1"}}"#,
        ] {
            let err = request_progress_token(params.as_bytes()).unwrap_err();
            assert!(
                err.ends_with("is too like params._meta: servers differ on which they read"),
                "{params}: {err}"
            );
        }
        // A key that is no text could be read as anything.
        for params in [
            r#"{"_meta":{"\ud800":"gatehouse-1"}}"#,
            r#"{"\ud800":1,"_meta":{"progressToken":"gatehouse-1"}}"#,
        ] {
            let err = request_progress_token(params.as_bytes()).unwrap_err();
            assert!(err.contains("not text"), "{params}: {err}");
        }
        // Outside `_meta`, or longer than the name: not the token.
        for params in [
            r#"{"arguments":{"ProgressToken":1},"_meta":{"progressTokens":2}}"#,
            r#"{"_meta":{"xprogressToken":1}}"#,
        ] {
            assert_eq!(
                request_progress_token(params.as_bytes()),
                Ok(None),
                "{params}"
            );
        }
    }

    /// The pre-check skips ordinary calls, and misses no key a server could read as the token.
    #[test]
    fn only_params_that_may_name_a_token_are_parsed() {
        for params in [
            r#"{"name":"echo","arguments":{"text":"progress report: 3 tokens, Progress Token"}}"#,
            r#"{"name":"p","arguments":{"path":"/tmp/progressTokenizer"}}"#,
            "{\"name\":\"caf\u{e9}\",\"arguments\":{}}",
        ] {
            let named = params.contains("progressToken");
            assert_eq!(
                may_name_progress_token(params.as_bytes()),
                named,
                "{params}"
            );
        }
        for params in [
            r#"{"_meta":{"progressToken":1}}"#,
            r#"{"_meta":{"PROGRESStoken":1}}"#,
            "{\"_meta\":{\"progre\u{17F}\u{17F}To\u{212A}en\":1}}",
            r#"{"_meta":{"\u0070rogressToken":1}}"#,
            r#"{"arguments":{"text":"a \"quote\""}}"#,
        ] {
            assert!(may_name_progress_token(params.as_bytes()), "{params}");
        }
    }

    #[test]
    fn a_progress_token_is_found_however_its_key_is_spelled() {
        let plain = br#"{"name":"t","_meta":{"progressToken":7}}"#;
        let token = |p: &[u8]| request_progress_token(p).unwrap();
        assert_eq!(token(plain).as_deref(), Some(&b"7"[..]));
        // The key escaped: the fast path must not skip it.
        let escaped = br#"{"_meta":{"\u0070rogressToken":"p"}}"#;
        assert_eq!(token(escaped).as_deref(), Some(&br#""p""#[..]));
        assert_eq!(token(br#"{"name":"t","arguments":{}}"#), None);
        // The word inside a value is not a key.
        assert_eq!(token(br#"{"arguments":{"text":"progressToken"}}"#), None);
        assert_eq!(token(br#"{"_meta":{"progressToken":null}}"#), None);
    }

    #[test]
    fn a_token_named_twice_or_too_long_is_refused() {
        for params in [
            r#"{"_meta":{"progressToken":1,"progressToken":2}}"#,
            r#"{"_meta":{"progressToken":1,"\u0070rogressToken":2}}"#,
            r#"{"_meta":{"progressToken":1,"ProgressToken":2}}"#,
            r#"{"_meta":{"progressToken":1},"_meta":{"progressToken":2}}"#,
            r#"{"_meta":{"progressToken":1},"\u005fmeta":{}}"#,
        ] {
            assert!(
                request_progress_token(params.as_bytes()).is_err(),
                "{params}"
            );
        }
        let long = format!(r#"{{"_meta":{{"progressToken":"{}"}}}}"#, "p".repeat(1023));
        let err = request_progress_token(long.as_bytes()).unwrap_err();
        assert!(err.contains("longer than 1024 bytes"), "{err}");
        let fits = format!(r#"{{"_meta":{{"progressToken":"{}"}}}}"#, "p".repeat(1022));
        assert_eq!(
            request_progress_token(fits.as_bytes())
                .unwrap()
                .unwrap()
                .len(),
            1024
        );
        // Two `_meta`s naming no token go as sent.
        let no_token = br#"{"_meta":{"a":1},"\u005fmeta":{"b":"progressToken"}}"#;
        assert_eq!(request_progress_token(no_token), Ok(None));
    }
}
