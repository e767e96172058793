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
    static PROGRESS_TOKEN: crate::needle::Needle = crate::needle::Needle::new("progressToken");
    PROGRESS_TOKEN.is_in(params) || memchr::memchr(b'\\', params).is_some()
}

/// Extracts `_meta.progressToken` (raw JSON) from request params.
pub fn request_progress_token(params: &[u8]) -> Option<Bytes> {
    if !may_name_progress_token(params) {
        return None;
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, rename = "progressToken")]
        token: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow, rename = "_meta")]
        meta: Option<Meta<'a>>,
    }
    let p: P<'_> = serde_json::from_slice(params).ok()?;
    p.meta?
        .token
        .map(|t| Bytes::copy_from_slice(t.get().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::request_progress_token;

    #[test]
    fn a_progress_token_is_found_however_its_key_is_spelled() {
        let plain = br#"{"name":"t","_meta":{"progressToken":7}}"#;
        assert_eq!(request_progress_token(plain).as_deref(), Some(&b"7"[..]));
        // The key escaped: the fast path must not skip it.
        let escaped = br#"{"_meta":{"\u0070rogressToken":"p"}}"#;
        assert_eq!(
            request_progress_token(escaped).as_deref(),
            Some(&br#""p""#[..])
        );
        assert_eq!(
            request_progress_token(br#"{"name":"t","arguments":{}}"#),
            None
        );
        // The word inside a value is not a key.
        assert_eq!(
            request_progress_token(br#"{"arguments":{"text":"progressToken"}}"#),
            None
        );
    }
}
