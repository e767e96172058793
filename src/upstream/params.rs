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
        let mut params: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(p).ok()?;
        params.insert("progressToken".into(), serde_json::from_slice(token).ok()?);
        let params = serde_json::to_vec(&params).ok()?;
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

/// Extracts `_meta.progressToken` (raw JSON) from request params.
pub fn request_progress_token(params: &[u8]) -> Option<Bytes> {
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
