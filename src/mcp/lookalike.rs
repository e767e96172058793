//! Keys a lenient JSON decoder reads as another. Go's `encoding/json` matches object keys
//! without regard to case (`Name`, `ARGUMENTS`, and beyond ASCII `REGIÓN` for `región`), folds
//! U+017F to `s` and U+212A to `k`, and one
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
    // NUL is one byte: a byte search finds where trailing ones start.
    let key = &key[..key.bytes().rposition(|b| b != 0).map_or(0, |last| last + 1)];
    // Most keys are ASCII: each of their characters folds to its ASCII lower case, so an owned
    // key of the same length matches byte for byte, ignoring case; a longer one only through
    // characters of more than one byte that fold to ASCII (the long s, the Kelvin sign).
    if key.is_ascii() {
        return owned
            .iter()
            .copied()
            .find(|owned| match owned.len().cmp(&key.len()) {
                std::cmp::Ordering::Equal => owned.eq_ignore_ascii_case(key),
                std::cmp::Ordering::Greater => !owned.is_ascii() && folds_alike(key, owned),
                std::cmp::Ordering::Less => false,
            });
    }
    owned.iter().copied().find(|owned| folds_alike(key, owned))
}

/// Whether `key` and `owned` are alike character by character once folded.
fn folds_alike(key: &str, owned: &str) -> bool {
    let mut chars = key.chars();
    owned
        .chars()
        .all(|o| chars.next().map(fold) == Some(fold(o)))
        && chars.next().is_none()
}

/// `c` as a case-insensitive decoder compares it (Go's simple case folding): lower case where
/// that is one character, and the other members of the few larger case orbits (the long s,
/// final sigma, the Greek symbol forms, the micro sign) taken to their letter.
fn fold(c: char) -> char {
    match c {
        c if c.is_ascii() => c.to_ascii_lowercase(),
        '\u{17F}' => 's',
        '\u{B5}' => '\u{3BC}',
        '\u{3C2}' => '\u{3C3}',
        '\u{3D0}' => '\u{3B2}',
        '\u{3D1}' => '\u{3B8}',
        '\u{3D5}' => '\u{3C6}',
        '\u{3D6}' => '\u{3C0}',
        '\u{3F0}' => '\u{3BA}',
        '\u{3F1}' => '\u{3C1}',
        '\u{3F5}' => '\u{3B5}',
        '\u{1E9B}' => '\u{1E61}',
        '\u{1FBE}' | '\u{345}' => '\u{3B9}',
        // The Cyrillic small letters' rounded and tall forms.
        '\u{1C80}' => '\u{432}',
        '\u{1C81}' => '\u{434}',
        '\u{1C82}' => '\u{43E}',
        '\u{1C83}' => '\u{441}',
        '\u{1C84}' | '\u{1C85}' => '\u{442}',
        '\u{1C86}' => '\u{44A}',
        '\u{1C87}' => '\u{463}',
        '\u{1C88}' => '\u{A64B}',
        c => {
            let mut lower = c.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(one), None) => one,
                _ => c,
            }
        }
    }
}

/// `key` as such a decoder matches it: trailing NULs cut, every character folded.
fn folded_key(key: &str) -> String {
    key.trim_end_matches('\0').chars().map(fold).collect()
}

/// Two keys of one object, at any depth of JSON value `value`, that a lenient decoder reads as
/// one (`path` and `PATH`, or `path` given twice): which one a server acts on, and which one a
/// plugin judged, could differ. `Err` for text that is not JSON.
pub(crate) fn keys_read_as_one(value: &str) -> Result<Option<(String, String)>, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    /// Walks a value, keeping the first pair of keys found read as one.
    struct Walk<'f>(&'f mut Option<(String, String)>);
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen: std::collections::HashMap<String, String> =
                std::collections::HashMap::new();
            while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                map.next_value_seed(Walk(&mut *self.0))?;
                if self.0.is_none()
                    && let Some(first) = seen.insert(folded_key(&key), key.clone().into_owned())
                {
                    *self.0 = Some((first, key.into_owned()));
                }
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk(&mut *self.0))?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut found = None;
    let mut de = serde_json::Deserializer::from_str(value);
    Walk(&mut found).deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// A tool or prompt name as a lenient server may look it up: cut at a NUL, trimmed, in lower
/// case. What selects names for a check (a scope rule, a plugin chain) matches this too, so
/// that `FS_read`, `fs_read ` or `fs_read\0` is checked as `fs_read` is.
pub(crate) fn folded_name(name: &str) -> String {
    let cut = name.split('\0').next().unwrap_or_default();
    cut.trim().to_lowercase()
}

/// A client's key as an error message shows it: cut to 64 characters, so that the answer stays
/// small whatever the key.
pub(crate) fn shown(key: &str) -> &str {
    key.char_indices().nth(64).map_or(key, |(at, _)| &key[..at])
}

/// Refuses an object (`what`: `params`, `params.ref`) whose members a lenient decoder could
/// read otherwise than the gateway: a key of `owned` given twice (which one counts differs
/// between decoders), or another key such a decoder reads as one of `owned`. JSON that is not
/// an object is refused too.
pub(crate) fn check_members(object: &[u8], owned: &[&str], what: &str) -> Result<(), String> {
    struct Members<'o> {
        owned: &'o [&'o str],
    }
    impl<'de> serde::de::Visitor<'de> for Members<'_> {
        /// The JSON's own errors outside, the members' refusal inside.
        type Value = Result<(), String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut seen: Vec<&str> = Vec::new();
            let mut refused = None;
            while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if refused.is_some() {
                    continue; // read to the end all the same: the JSON's own errors come first
                }
                refused = match read_as(&key, self.owned) {
                    Some(owned) if owned == key => {
                        if seen.contains(&owned) {
                            Some(format!("{owned} is given twice"))
                        } else {
                            seen.push(owned);
                            None
                        }
                    }
                    Some(owned) => Some(format!(
                        "{:?} is too like {owned}: servers differ on which they read",
                        shown(&key)
                    )),
                    None => None,
                };
            }
            Ok(refused.map_or(Ok(()), Err))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(object);
    serde::Deserializer::deserialize_map(&mut de, Members { owned })
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| format!("{what} must be an object: {e}"))?
        .map_err(|why| format!("{what}.{why}"))
}

#[cfg(test)]
mod tests {
    use super::{check_members, read_as};

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
        // Beyond ASCII, as Go folds a name that is not ASCII itself.
        const GREEK: [&str; 2] = ["región", "σοφία"];
        for (key, want) in [
            ("REGIÓN", Some("región")),
            ("Región", Some("región")),
            ("ΣΟΦΊΑ", Some("σοφία")),
            ("σοφία", Some("σοφία")),
            ("regiõn", None),
            ("İregión", None),
        ] {
            assert_eq!(read_as(key, &GREEK), want, "{key:?}");
        }
        assert_eq!(
            read_as("\u{3C2}", &["\u{3A3}"]),
            Some("\u{3A3}"),
            "final sigma"
        );
        assert_eq!(
            read_as("\u{B5}", &["\u{39C}"]),
            Some("\u{39C}"),
            "micro sign"
        );
        assert_eq!(
            read_as("г\u{1C82}род", &["город"]),
            Some("город"),
            "rounded o"
        );
        assert_eq!(
            read_as("\u{345}", &["\u{399}"]),
            Some("\u{399}"),
            "ypogegrammeni"
        );
    }

    #[test]
    fn read_as_agrees_with_comparing_folded_keys() {
        use super::folded_key;
        // Keys and owned keys of every kind: ASCII, characters that fold to ASCII, others, of
        // equal and unequal lengths in bytes.
        const WORDS: [&str; 16] = [
            "task",
            "TASK",
            "ta\u{17F}k",
            "\u{212A}ey",
            "key",
            "KEY",
            "ke",
            "keys",
            "ta\u{17F}\u{17F}",
            "tass",
            "r\u{E9}gion",
            "R\u{C9}GION",
            "regio",
            "\u{3A3}\u{3A3}",
            "\u{3C2}\u{3C3}",
            "task\0",
        ];
        for key in WORDS {
            for owned in WORDS.iter().filter(|o| !o.ends_with('\0')) {
                let want = (folded_key(key) == folded_key(owned)).then_some(*owned);
                assert_eq!(read_as(key, &[owned]), want, "{key:?} as {owned:?}");
            }
        }
    }

    #[test]
    fn keys_a_lenient_decoder_reads_as_one_are_found_at_any_depth() {
        use super::keys_read_as_one;
        let found = |json: &str| keys_read_as_one(json).unwrap();
        assert_eq!(found(r#"{"path":"/tmp","other":1}"#), None);
        assert_eq!(
            found(r#"{"path":"/tmp","PATH":"/etc/shadow"}"#),
            Some(("path".into(), "PATH".into()))
        );
        assert_eq!(
            found(r#"{"a":[{"x":{"pa\u017fh":1,"pash":2}}]}"#),
            Some(("paſh".into(), "pash".into()))
        );
        assert_eq!(
            found(r#"{"path":1,"path":2}"#),
            Some(("path".into(), "path".into()))
        );
        assert_eq!(
            found(r#"{"path\u0000":1,"path":2}"#).map(|p| p.1),
            Some("path".into())
        );
        // The same key in two objects is no ambiguity.
        assert_eq!(found(r#"{"a":{"k":1},"b":{"k":2}}"#), None);
        assert_eq!(found("[1,\"x\",null,true,-2.5]"), None);
        assert!(keys_read_as_one("{").is_err());
    }

    #[test]
    fn members_a_server_could_read_otherwise_are_refused() {
        const OWNED: [&str; 2] = ["uri", "_meta"];
        let check = |json: &str| check_members(json.as_bytes(), &OWNED, "params");
        assert_eq!(check(r#"{"uri":"a","_meta":{},"other":1}"#), Ok(()));
        assert_eq!(check("{}"), Ok(()));
        for (json, said) in [
            (
                r#"{"uri":"a","URI":"b"}"#,
                r#"params."URI" is too like uri"#,
            ),
            (
                r#"{"Uri":"b","uri":"a"}"#,
                r#"params."Uri" is too like uri"#,
            ),
            (r#"{"uri":"a","uri\u0000":"b"}"#, "is too like uri"),
            (r#"{"uri":"a","uri":"b"}"#, "params.uri is given twice"),
            (r#"{"_META":{},"uri":"a"}"#, "is too like _meta"),
        ] {
            let e = check(json).unwrap_err();
            assert!(e.contains(said), "{json}: {e}");
        }
        assert!(
            check("[1]")
                .unwrap_err()
                .starts_with("params must be an object")
        );
        assert!(check(r#"{"uri":"a""#).is_err());
    }
}
