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

/// Whether a key in `params` could spell `progressToken`: it is there literally, or something
/// is escaped (`\u0070rogressToken`). Most calls carry no token, and this skips their parse.
pub(crate) fn may_name_progress_token(params: &[u8]) -> bool {
    static NEEDLE: crate::needle::Needle = crate::needle::Needle::new(PROGRESS_TOKEN);
    NEEDLE.is_in(params) || memchr::memchr(b'\\', params).is_some()
}

/// The `_meta.progressToken` (raw JSON) of request params, read as strictly as any server
/// might read it: `Err` when `_meta` (or the params) name it more than once, however spelled
/// (servers differ on which one they read, and the gateway routes progress by the one it
/// reads), or when it is longer than [`jsonrpc::MAX_KEPT_NAME`] (it is kept while the call
/// runs, and written into each of its progress notifications).
pub fn request_progress_token(params: &[u8]) -> Result<Option<Bytes>, String> {
    use crate::json_scan;
    if !may_name_progress_token(params) {
        return Ok(None);
    }
    // Not an object, or not JSON: the call's own checks say so; no token either way.
    let Ok(text) = std::str::from_utf8(params) else {
        return Ok(None);
    };
    let mut metas = Vec::new();
    let scanned = json_scan::members(text, json_scan::MAX_DEPTH, |key, value| {
        if json_scan::unquote(key).is_ok_and(|k| k == "_meta") && value.starts_with('{') {
            metas.push(value);
        }
    });
    if scanned.is_err() {
        return Ok(None);
    }
    let (mut named, mut token) = (0, None);
    for meta in &metas {
        let _ = json_scan::members(meta, json_scan::MAX_DEPTH, |key, value| {
            let named_so = match json_scan::unquote(key) {
                Ok(k) => crate::mcp::lookalike::read_as(&k, &[PROGRESS_TOKEN]).is_some(),
                // A key no text: a server may read it as anything.
                Err(_) => true,
            };
            if named_so {
                named += 1;
                token = Some(value);
            }
        });
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
    use super::request_progress_token;

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
