//! Glob patterns: `*` matches any run of characters (also none), `?` one
//! character; everything else matches itself. Case-sensitive, but for names
//! ([`matches_name`]), which a lenient server may look up in any case.

/// Whether a tool or prompt name matches the glob `pattern` as written, or as a lenient
/// server may look it up (cut at a NUL, trimmed, in lower case) against the pattern in lower
/// case: `FS_read`, `fs_read ` or `fs_read\0` is judged as `fs_read` is, as the gateway's
/// own chain selectors judge it (a rule for `fs_*` is not walked around by a name's case).
pub fn matches_name(pattern: &str, name: &str) -> bool {
    matches_name_folded(pattern, name, fold_name(name).as_deref())
}

/// [`matches_name`], with the name's fold worked out already: `folded` is [`fold_name`] of
/// `name` (a policy checks each of its rules against one name on every call).
pub fn matches_name_folded(pattern: &str, name: &str, folded: Option<&str>) -> bool {
    if matches(pattern, name) {
        return true;
    }
    // Most patterns are in lower case: then, for a name that folding leaves alone, there is
    // nothing more to try, and nothing is allocated.
    let lower_case = pattern
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase());
    match (folded, lower_case) {
        (None, true) => false,
        (Some(folded), true) => matches(pattern, folded),
        (folded, false) => matches(&pattern.to_lowercase(), folded.unwrap_or(name)),
    }
}

/// `name` as a lenient server may look it up (cut at a NUL, trimmed, in lower case), or none
/// when that is `name` itself.
pub fn fold_name(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let edge_space = |b: Option<&u8>| b.is_some_and(u8::is_ascii_whitespace);
    let folded_already = bytes
        .iter()
        .all(|&b| b != 0 && b.is_ascii() && !b.is_ascii_uppercase());
    if folded_already && !edge_space(bytes.first()) && !edge_space(bytes.last()) {
        return None;
    }
    let folded = name
        .split('\0')
        .next()
        .unwrap_or_default()
        .trim()
        .to_lowercase();
    (folded != name).then_some(folded)
}

/// Whether `text` matches the glob `pattern`.
///
/// Runs on every hook call (a policy checks each rule's globs), so it
/// allocates nothing: one pass with a single backtrack point, the last `*`
/// seen, which is enough because a later `*` can absorb whatever an earlier
/// one would have.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // (pattern index after the last `*`, text index that `*` has reached)
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    pi += 1;
                    star = Some((pi, ti));
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ti += char_len(t[ti]);
                    continue;
                }
                lead => {
                    // Both are UTF-8 and at character boundaries: one pattern
                    // character matches when its bytes come next in the text.
                    let n = char_len(lead);
                    if t[ti..].starts_with(&p[pi..pi + n]) {
                        pi += n;
                        ti += n;
                        continue;
                    }
                }
            }
        }
        match star {
            // The last `*` takes one more character; retry from just after it.
            Some((after, reached)) => {
                let reached = reached + char_len(t[reached]);
                star = Some((after, reached));
                pi = after;
                ti = reached;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Length of the UTF-8 character that starts with `lead`.
fn char_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_matches_as_a_lenient_server_would_look_it_up() {
        for name in [
            "fs_read",
            "FS_read",
            "fs_READ ",
            " fs_read",
            "fs_read\0x",
            "Fs_Read\t",
        ] {
            assert!(matches_name("fs_*", name), "{name:?}");
        }
        assert!(
            matches_name("FS_*", "fs_read"),
            "the pattern in lower case too"
        );
        assert!(!matches_name("fs_*", "f s_read"));
        assert!(!matches_name("fs_*", "xfs_read"));
        // Only names fold: a plain glob stays case-sensitive.
        assert!(!matches("fs_*", "FS_read"));
        assert_eq!(fold_name("fs_read"), None);
        assert_eq!(fold_name("Fs_Read\0x").as_deref(), Some("fs_read"));
        assert_eq!(fold_name(" fs_read").as_deref(), Some("fs_read"));
        assert_eq!(fold_name("ÉTÉ").as_deref(), Some("été"));
        assert!(
            matches_name("ÉT*", "été"),
            "a pattern beyond ASCII folds too"
        );
        assert!(!matches_name("fs_*", "été"));
    }

    #[test]
    fn globs() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("fs_*", "fs_read"));
        assert!(!matches("fs_*", "xfs_read"));
        assert!(matches("*delete*", "bulk_delete_all"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("a*b*c", "aXbYbZc"));
        assert!(!matches("a*b*c", "aXbYbZ"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(matches("ü*", "über"));
        assert!(matches("?ber", "über"));
        assert!(!matches("??ber", "über"));
        assert!(matches("*ü", "aü"));
        assert!(!matches("", "a"));
        assert!(matches("", ""));
        assert!(matches("**", ""));
    }

    /// Every pattern and text of up to five symbols over an alphabet of
    /// wildcards, ASCII and multi-byte characters, against the `wildmatch`
    /// crate (which this matcher replaced on the hot path).
    #[test]
    fn agrees_with_wildmatch_on_every_short_string() {
        const ALPHABET: [&str; 6] = ["*", "?", "a", "b", "é", "😀"];
        fn all(len: usize, symbols: &[&str]) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..len {
                last = last
                    .iter()
                    .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let patterns = all(5, &ALPHABET);
        let texts = all(4, &ALPHABET[1..]);
        let mut checked = 0;
        for p in &patterns {
            let oracle = wildmatch::WildMatch::new(p);
            for t in &texts {
                assert_eq!(
                    matches(p, t),
                    oracle.matches(t),
                    "pattern {p:?}, text {t:?}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 9331 * 781);
    }
}
