//! The JSON-RPC envelope parser: never panics, and what it accepts re-encodes to the same message.
#![no_main]

use bytes::Bytes;
use gatehouse::mcp::jsonrpc::{self, Kind, Outcome, code};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

/// Valid JSON text; `RawValue` keeps numbers as written, as the parser does (`1e400` is JSON).
fn is_json(raw: &[u8]) -> bool {
    serde_json::from_slice::<&RawValue>(raw).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let m = match jsonrpc::parse(Bytes::copy_from_slice(data)) {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(
                e.code(),
                code::PARSE_ERROR | code::INVALID_REQUEST
            ));
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    assert!(is_json(data) && first == Some(&b'{'));
    // Every member is a valid JSON slice of the frame, and the encoders rebuild an equal message.
    let again = match &m.kind {
        Kind::Request { id, method, params } => {
            assert!(is_json(id) && params.as_deref().is_none_or(is_json));
            jsonrpc::request(id, method, params.as_deref())
        }
        Kind::Notification { method, params } => {
            assert!(params.as_deref().is_none_or(is_json));
            jsonrpc::notification(method, params.as_deref())
        }
        Kind::Response { id, outcome } => {
            let (Outcome::Result(raw) | Outcome::Error(raw)) = outcome;
            assert!(is_json(id) && is_json(raw));
            jsonrpc::response(id, outcome)
        }
    };
    let back = jsonrpc::parse(again).expect("an encoded message parses");
    assert_eq!(format!("{:?}", back.kind), format!("{:?}", m.kind));
});
