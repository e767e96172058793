//! The list cursor a client sees: every upstream's own next cursor, by upstream name.

use std::collections::BTreeMap;

use base64::Engine;

use crate::mcp::router::Router;

/// Longest cursor accepted from an upstream.
pub(crate) const MAX_UPSTREAM_CURSOR: usize = 4096;

/// Encodes each upstream's next cursor (by upstream name) into the one cursor a client sees.
pub fn encode_cursor(next: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &str> = next.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&map).unwrap_or_default())
}

/// Decodes a client's cursor into (upstream index, upstream cursor); `None` if it is not one we issued.
pub fn decode_cursor(router: &Router, cursor: &str) -> Option<Vec<(usize, Option<String>)>> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let map: BTreeMap<String, String> = serde_json::from_slice(&raw).ok()?;
    if map.is_empty() {
        return None;
    }
    map.into_iter()
        .map(|(name, c)| Some((router.index_of(&name)?, Some(c))))
        .collect()
}
