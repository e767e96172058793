//! Keys a lenient JSON decoder reads as another. Go's `encoding/json` matches object keys
//! without regard to case (`Name`, `ARGUMENTS`), folds U+017F to `s` and U+212A to `k`, and one
//! SDK took `name\u0000` for `name`. Where the gateway forwards a client's bytes as sent, such a
//! key beside the one the gateway read would have a server act on a value the gateway never
//! routed, checked or audited.

/// An object key as read from a client's JSON: borrowed unless it has escapes (serde's plain
/// `Cow` would copy every key).
#[derive(serde::Deserialize)]
pub(crate) struct Key<'a>(#[serde(borrow)] pub std::borrow::Cow<'a, str>);

/// The key of `owned` that `key` is read as by such a decoder, if any; an exact match counts
/// too. No allocation: a client may send many keys.
pub(crate) fn read_as<'o>(key: &str, owned: &[&'o str]) -> Option<&'o str> {
    let fold = |c: char| match c {
        '\u{17F}' => 's',  // ſ, long s
        '\u{212A}' => 'k', // K, Kelvin sign
        c => c.to_ascii_lowercase(),
    };
    let key = key.trim_end_matches('\0');
    owned.iter().copied().find(|owned| {
        let mut chars = key.chars();
        owned
            .chars()
            .all(|o| chars.next().map(fold) == Some(o.to_ascii_lowercase()))
            && chars.next().is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::read_as;

    #[test]
    fn case_long_s_kelvin_and_trailing_nuls_fold() {
        const OWNED: [&str; 2] = ["progressToken", "io.modelcontextprotocol/protocolVersion"];
        for (key, want) in [
            ("progressToken", Some("progressToken")),
            ("PROGRESSTOKEN", Some("progressToken")),
            ("progre\u{17F}\u{17F}To\u{212A}en", Some("progressToken")),
            ("progressToken\0\0", Some("progressToken")),
            (
                "io.modelcontextprotocol/ProtocolVersion",
                Some("io.modelcontextprotocol/protocolVersion"),
            ),
            ("progressTokens", None),
            ("progressToke", None),
            ("", None),
        ] {
            assert_eq!(read_as(key, &OWNED), want, "{key:?}");
        }
    }
}
