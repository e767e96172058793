//! The JSON-RPC envelope parser: never panics, and what it accepts re-encodes to the same message.
//! The one-pass scanner under it accepts exactly the objects `serde_json` accepts, with the same
//! members.
#![no_main]

use bytes::Bytes;
use gatehouse::json_scan::{self, ScanError};
use gatehouse::mcp::jsonrpc::{self, Kind, Outcome, code};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

/// Valid JSON text; `RawValue` keeps numbers as written, as the parser does (`1e400` is JSON).
fn is_json(raw: &[u8]) -> bool {
    serde_json::from_slice::<&RawValue>(raw).is_ok()
}

/// The members of a JSON object as `serde_json` reads them: values as written.
fn serde_members(text: &str) -> Option<Vec<&RawValue>> {
    struct Members;
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut values = Vec::new();
            while let Some(serde::de::IgnoredAny) = map.next_key()? {
                values.push(map.next_value()?);
            }
            Ok(values)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let values = serde::Deserializer::deserialize_map(&mut de, Members).ok()?;
    de.end().ok()?;
    Some(values)
}

/// The scanner against `serde_json`, below `serde_json`'s own nesting bound of 128.
fn scan_agrees_with_serde(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut ours = Vec::new();
    let scanned = json_scan::members(text, 100, |key, value| ours.push((key, value)));
    if scanned == Err(ScanError::TooDeep(100)) {
        return;
    }
    // Walking into every object member says the same, and finds what walking each finds.
    let mut outer = Vec::new();
    let mut inner = Vec::new();
    let walked = json_scan::members_and_inner(
        text,
        100,
        |_| true,
        |key, value| outer.push((key, value)),
        |key, value| inner.push((key, value)),
    );
    assert_eq!(walked, scanned);
    if walked.is_ok() {
        assert_eq!(outer, ours);
        let mut want = Vec::new();
        for (_, value) in ours.iter().filter(|(_, v)| v.starts_with('{')) {
            json_scan::members(value, 99, |key, value| want.push((key, value)))
                .expect("a member's value is an object within the bound");
        }
        assert_eq!(inner, want);
    }
    let theirs = serde_members(text);
    // Names are not decoded by the scanner; serde_json refuses one that is no text (a lone
    // surrogate), which the envelope parser refuses too.
    let names_are_text = ours
        .iter()
        .all(|(key, _)| serde_json::from_str::<String>(key).is_ok());
    assert_eq!(scanned.is_ok() && names_are_text, theirs.is_some(), "{scanned:?}");
    let Some(theirs) = theirs else { return };
    assert_eq!(ours.len(), theirs.len());
    for ((key, value), raw) in ours.iter().zip(theirs) {
        assert_eq!(*value, raw.get());
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(key).is_ok() && key.starts_with('"'));
    }
}

fuzz_target!(|data: &[u8]| {
    scan_agrees_with_serde(data);
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
