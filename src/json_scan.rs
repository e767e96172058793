//! One pass over a JSON text (RFC 8259) that checks it is JSON and hands back the members of
//! its top-level object as slices of the text: what the gateway reads of every message it
//! forwards, without building values or decoding strings it only passes on.
//!
//! It accepts exactly what `serde_json` accepts (the fuzz target `jsonrpc` holds it to that),
//! but for nesting, which the caller bounds (`serde_json`'s own bound is 128 levels).

use std::borrow::Cow;

/// The deepest nesting [`members`] can bound a text to: one bit per level, in a `u128`.
pub const MAX_DEPTH: usize = 128;

/// Why a text is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Not JSON: what was expected at byte `offset`.
    #[error("{expected} at byte {offset}")]
    Syntax {
        /// Where the text stops being JSON.
        offset: usize,
        /// What would have been JSON there.
        expected: &'static str,
    },
    /// Arrays and objects nested deeper than the bound.
    #[error("nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Walks the JSON object `text`, calling `each(key, value)` for every top-level member in
/// order: `key` is the member's name with its quotes, escapes not decoded; `value` is the
/// member's value as written, without surrounding whitespace. The whole text is checked, so
/// `Ok` means it is one JSON object, nested no deeper than `max_depth` (the object itself is
/// level 1; at most [`MAX_DEPTH`]), with nothing but whitespace around it.
pub fn members<'a>(
    text: &'a str,
    max_depth: usize,
    each: impl FnMut(&'a str, &'a str),
) -> Result<(), ScanError> {
    members_and_inner(text, max_depth, |_| false, each, |_, _| {})
}

/// [`members`], and in the same pass the members of each member's value that is an object
/// and whose key (as written) `descend` accepts: `inner(key, value)` for each of them, before
/// `each` for the member holding them. A caller that reads two levels walks the text once.
pub fn members_and_inner<'a>(
    text: &'a str,
    max_depth: usize,
    descend: impl Fn(&'a str) -> bool,
    mut each: impl FnMut(&'a str, &'a str),
    mut inner: impl FnMut(&'a str, &'a str),
) -> Result<(), ScanError> {
    assert!(
        max_depth <= MAX_DEPTH,
        "one bit per level of nesting, in a u128"
    );
    let bytes = text.as_bytes();
    let at = whitespace(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return Err(syntax(at, "'{' opening an object"));
    }
    if max_depth == 0 {
        return Err(ScanError::TooDeep(max_depth));
    }
    let at = object(text, at + 1, |key, value_start| {
        // An inner object is level 2: with less room, `value_end` says it is too deep.
        let end = if max_depth >= 2 && bytes.get(value_start) == Some(&b'{') && descend(key) {
            object(text, value_start + 1, |inner_key, inner_start| {
                let end = value_end(bytes, inner_start, max_depth - 2, max_depth)?;
                inner(inner_key, &text[inner_start..end]);
                Ok(end)
            })?
        } else {
            value_end(bytes, value_start, max_depth - 1, max_depth)?
        };
        // Each boundary is at an ASCII byte, so both slices are `str` boundaries.
        each(key, &text[value_start..end]);
        Ok(end)
    })?;
    let at = whitespace(bytes, at);
    if at != bytes.len() {
        return Err(syntax(at, "the end of the text after the object"));
    }
    Ok(())
}

/// The members of the object whose `{` is just before `at`: `member(key, value_start)` walks
/// each value and says where it ends. The index just past the object's `}`.
#[inline(always)]
fn object<'a>(
    text: &'a str,
    at: usize,
    mut member: impl FnMut(&'a str, usize) -> Result<usize, ScanError>,
) -> Result<usize, ScanError> {
    let bytes = text.as_bytes();
    let mut at = whitespace(bytes, at);
    if bytes.get(at) == Some(&b'}') {
        return Ok(at + 1);
    }
    loop {
        let key_start = at;
        let key_end = member_name(bytes, at)?;
        let value_start = after_colon(bytes, key_end)?;
        at = whitespace(bytes, member(&text[key_start..key_end], value_start)?);
        match bytes.get(at) {
            Some(b',') => at = whitespace(bytes, at + 1),
            Some(b'}') => return Ok(at + 1),
            _ => return Err(syntax(at, "',' or '}' after a member")),
        }
    }
}

/// The text of a JSON string as [`members`] hands it out (quotes included): borrowed unless
/// it has escapes, which are decoded. `Err` for an escape that is no text (a lone surrogate).
pub fn unquote(string: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    match string.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(plain) if !plain.contains('\\') => Ok(Cow::Borrowed(plain)),
        _ => serde_json::from_str::<String>(string).map(Cow::Owned),
    }
}

/// The first of `keys` (decoded member names) that is given twice, reordering `keys` to find
/// it: compared pairwise when there are few, as in most objects, and sorted when there are
/// many, so that an object of crafted keys costs n log n rather than n².
pub fn repeated_key<K: Ord>(keys: &mut [K]) -> Option<&K> {
    if keys.len() <= 16 {
        (1..keys.len())
            .find(|&i| keys[..i].contains(&keys[i]))
            .map(|i| &keys[i])
    } else {
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| &w[0])
    }
}

fn syntax(offset: usize, expected: &'static str) -> ScanError {
    ScanError::Syntax { offset, expected }
}

/// The first index from `at` that is not JSON whitespace.
#[inline(always)]
fn whitespace(text: &[u8], mut at: usize) -> usize {
    // Every whitespace byte is at most b' ': most bytes leave at the first comparison.
    while let Some(&b) = text.get(at)
        && b <= b' '
        && matches!(b, b' ' | b'\t' | b'\n' | b'\r')
    {
        at += 1;
    }
    at
}

/// A member's name at `at`: the index just past its closing quote.
#[inline(always)]
fn member_name(text: &[u8], at: usize) -> Result<usize, ScanError> {
    if text.get(at) != Some(&b'"') {
        return Err(syntax(at, "a string naming a member"));
    }
    string_end(text, at)
}

/// After a member's name ending at `at`: the index where its value starts.
#[inline(always)]
fn after_colon(text: &[u8], at: usize) -> Result<usize, ScanError> {
    let at = whitespace(text, at);
    if text.get(at) != Some(&b':') {
        return Err(syntax(at, "':' after a member's name"));
    }
    Ok(whitespace(text, at + 1))
}

/// The value starting at `at` (no whitespace before it), nested at most `room` more levels:
/// the index just past it. Iterative, so depth costs no stack.
fn value_end(
    text: &[u8],
    mut at: usize,
    room: usize,
    max_depth: usize,
) -> Result<usize, ScanError> {
    // One bit per open array or object, the innermost lowest: set for an object.
    let mut objects: u128 = 0;
    let mut depth = 0usize;
    'value: loop {
        match text.get(at) {
            Some(b'"') => at = string_end(text, at)?,
            Some(&open @ (b'{' | b'[')) => {
                depth += 1;
                if depth > room {
                    return Err(ScanError::TooDeep(max_depth));
                }
                let object = open == b'{';
                objects = objects << 1 | u128::from(object);
                at = whitespace(text, at + 1);
                let close = if object { b'}' } else { b']' };
                if text.get(at) == Some(&close) {
                    at += 1;
                    depth -= 1;
                    objects >>= 1;
                } else {
                    if object {
                        at = after_colon(text, member_name(text, at)?)?;
                    }
                    continue 'value;
                }
            }
            Some(b'-' | b'0'..=b'9') => at = number_end(text, at)?,
            Some(b't') => at = literal_end(text, at, b"true")?,
            Some(b'f') => at = literal_end(text, at, b"false")?,
            Some(b'n') => at = literal_end(text, at, b"null")?,
            _ => return Err(syntax(at, "a value")),
        }
        // Past a value: close what it ends, or go on to the next element or member.
        while depth > 0 {
            at = whitespace(text, at);
            let object = objects & 1 == 1;
            match (text.get(at), object) {
                (Some(b','), _) => {
                    at = whitespace(text, at + 1);
                    if object {
                        at = after_colon(text, member_name(text, at)?)?;
                    }
                    continue 'value;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    at += 1;
                    depth -= 1;
                    objects >>= 1;
                }
                (_, true) => return Err(syntax(at, "',' or '}' after a member")),
                (_, false) => return Err(syntax(at, "',' or ']' after an element")),
            }
        }
        return Ok(at);
    }
}

/// The string at `at` (on its opening quote): the index just past its closing quote.
#[inline(always)]
fn string_end(text: &[u8], at: usize) -> Result<usize, ScanError> {
    // Most strings (names, methods, short text) hold no escape: one run to the quote.
    let end = plain_run(text, at + 1);
    if text.get(end) == Some(&b'"') {
        return Ok(end + 1);
    }
    string_rest(text, end)
}

/// The rest of a string from an escape, a control character or the end of the text.
#[inline(never)]
fn string_rest(text: &[u8], mut at: usize) -> Result<usize, ScanError> {
    loop {
        match text.get(at) {
            Some(b'"') => return Ok(at + 1),
            Some(b'\\') => {
                at += 1;
                match text.get(at) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => at += 1,
                    Some(b'u') => {
                        let hex = text.get(at + 1..at + 5);
                        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                            // Where the first non-hex character is, as serde_json reports.
                            let bad = text[at + 1..]
                                .iter()
                                .take(4)
                                .take_while(|b| b.is_ascii_hexdigit())
                                .count();
                            return Err(syntax(at + 1 + bad, "four hex digits after \\u"));
                        }
                        at += 5;
                    }
                    _ => return Err(syntax(at, "an escape (one of \"\\/bfnrtu) after '\\'")),
                }
            }
            Some(_) => return Err(syntax(at, "a control character escaped in a string")),
            None => return Err(syntax(at, "'\"' closing a string")),
        }
        at = plain_run(text, at);
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?` at `at`: the index just past it.
fn number_end(text: &[u8], mut at: usize) -> Result<usize, ScanError> {
    let digit = |at: usize| text.get(at).is_some_and(u8::is_ascii_digit);
    let digits = |mut at: usize| {
        while digit(at) {
            at += 1;
        }
        at
    };
    at += usize::from(text[at] == b'-');
    match text.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => at = digits(at),
        _ => return Err(syntax(at, "a digit in a number")),
    }
    if text.get(at) == Some(&b'.') {
        if !digit(at + 1) {
            return Err(syntax(at + 1, "a digit after a decimal point"));
        }
        at = digits(at + 1);
    }
    if let Some(b'e' | b'E') = text.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = text.get(at) {
            at += 1;
        }
        if !digit(at) {
            return Err(syntax(at, "a digit in an exponent"));
        }
        at = digits(at);
    }
    Ok(at)
}

fn literal_end(text: &[u8], at: usize, word: &'static [u8]) -> Result<usize, ScanError> {
    if text[at..].starts_with(word) {
        Ok(at + word.len())
    } else {
        Err(syntax(at, "true, false or null"))
    }
}

/// Whether `text` is plain string content, written in a JSON string as it is: no `"`, `\` or
/// control character (looked at a word at a time).
pub fn is_plain(text: &[u8]) -> bool {
    plain_run(text, 0) == text.len()
}

/// Calls `each(index)` for every `"` in `text`, in order, until it returns `false`; the
/// quotes of a word are found together: for short texts, where a vector search's set-up
/// would cost more than the search.
#[inline(always)]
pub fn each_quote(text: &[u8], mut each: impl FnMut(usize) -> bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let words = text.chunks_exact(8);
    let tail = text.len() - words.remainder().len();
    for (i, word) in words.enumerate() {
        let q =
            u64::from_le_bytes(word.try_into().expect("eight bytes")) ^ (ONES * u64::from(b'"'));
        // Exact for every byte, unlike the borrow in `word_end`: `(q & LOW) + LOW` sets a
        // byte's high bit unless its low seven bits are zero, and `| q` unless it is.
        let mut quotes = !((q & LOW).wrapping_add(LOW) | q) & !LOW;
        while quotes != 0 {
            if !each(i * 8 + (quotes.trailing_zeros() / 8) as usize) {
                return;
            }
            quotes &= quotes - 1;
        }
    }
    for (i, _) in text[tail..].iter().enumerate().filter(|(_, b)| **b == b'"') {
        if !each(tail + i) {
            return;
        }
    }
}

/// The first index from `at` of a byte that ends a run of plain string content: `"`, `\` or
/// a control character (or the text's length).
#[inline]
fn plain_run(text: &[u8], at: usize) -> usize {
    // Short runs (names, methods, most values) end within two words: looked at here, inline.
    words(text, at, 2).unwrap_or_else(|at| medium_run(text, at))
}

/// Up to `n` words of a run from `at`: `Ok` with its end if it ends among them (or in the
/// last few bytes of the text), else `Err` with where the words stop.
#[inline(always)]
fn words(text: &[u8], mut at: usize, n: usize) -> Result<usize, usize> {
    for _ in 0..n {
        match word_end(text, at) {
            Some(Ok(end)) => return Ok(end),
            Some(Err(())) => at += 8,
            None => return Ok(tail_run(text, at)),
        }
    }
    Err(at)
}

/// Where a plain run ends in the eight bytes at `at`: `Ok(index)` if it does, `Err` if all
/// eight are plain, `None` if fewer than eight bytes are left.
#[inline(always)]
fn word_end(text: &[u8], at: usize) -> Option<Result<usize, ()>> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let x = u64::from_le_bytes(*text.get(at..)?.first_chunk::<8>()?);
    // A byte of `v - ONES * n` borrows, and with `!v` sets its high bit, where that byte of
    // `v` is below `n` (XOR first turns "equals c" into "is zero"). A borrow can only
    // wrongly mark bytes above a rightly marked one, so the lowest mark is the first match.
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let found = ((quote.wrapping_sub(ONES) & !quote)
        | (backslash.wrapping_sub(ONES) & !backslash)
        | (x.wrapping_sub(ONES * 0x20) & !x))
        & HIGH;
    Some(match found {
        0 => Err(()),
        _ => Ok(at + (found.trailing_zeros() / 8) as usize),
    })
}

/// [`plain_run`] past its first sixteen bytes, up to 64 (the 2026-07-28 `_meta` keys are
/// about 40): still a word at a time, which costs less than a vector search's set-up.
#[inline(never)]
fn medium_run(text: &[u8], at: usize) -> usize {
    match words(text, at, 6) {
        Ok(end) => end,
        Err(at) if text.len() - at >= 8 => long_run(text, at),
        Err(at) => tail_run(text, at),
    }
}

/// The end of a plain run in the last few bytes of the text.
#[inline]
fn tail_run(text: &[u8], mut at: usize) -> usize {
    while let Some(&b) = text.get(at) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

/// [`plain_run`] past its first 64 bytes (an argument, a document): memchr's vector
/// search finds the run's end, and the smallest byte before it, a reduction the compiler
/// vectorizes, says whether a control character came first.
#[inline(never)]
fn long_run(text: &[u8], at: usize) -> usize {
    let end = memchr::memchr2(b'"', b'\\', &text[at..]).map_or(text.len(), |i| at + i);
    let run = &text[at..end];
    if run.iter().fold(u8::MAX, |least, &b| least.min(b)) >= 0x20 {
        return end;
    }
    at + run.iter().position(|&b| b < 0x20).unwrap_or(run.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &str, depth: usize) -> Result<Vec<(&str, &str)>, ScanError> {
        let mut out = Vec::new();
        members(text, depth, |k, v| out.push((k, v)))?;
        Ok(out)
    }

    /// [`members_and_inner`], descending into every member, says what [`members`] says of
    /// `text`, and hands out as inner members what [`members`] finds in each object value.
    fn inner_walk_agrees(text: &str, depth: usize) {
        let mut outer = Vec::new();
        let mut inner = Vec::new();
        let walked = members_and_inner(
            text,
            depth,
            |_| true,
            |k, v| outer.push((k, v)),
            |k, v| inner.push((k, v)),
        );
        assert_eq!(walked, members(text, depth, |_, _| {}), "{text:?}");
        if walked.is_err() {
            return;
        }
        assert_eq!(outer, collect(text, depth).unwrap(), "{text:?}");
        let mut want = Vec::new();
        for (_, value) in outer.iter().filter(|(_, v)| v.starts_with('{')) {
            members(value, depth - 1, |k, v| want.push((k, v))).unwrap();
        }
        assert_eq!(inner, want, "{text:?}");
    }

    #[test]
    fn an_inner_walk_reads_two_levels_as_two_walks_would() {
        for text in [
            r#"{"_meta":{"a":1,"b":{"c":[2]}},"name":"x","args":{}}"#,
            r#"{"a":{"b":{"c":{}}}}"#,
            r#"{"a":{"b":1}, "c":{"d":2} }"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":{"b":1}"#,
            r#"{"a":{"b" 1}}"#,
            r#"{"a":{"b":1}}x"#,
        ] {
            for depth in 1..5 {
                inner_walk_agrees(text, depth);
            }
        }
        // Only the keys asked for are walked into, as written.
        let mut inner = Vec::new();
        members_and_inner(
            r#"{"_meta":{"a":1},"\u005fmeta":{"b":2},"c":{"d":3}}"#,
            8,
            |k| k == "\"_meta\"",
            |_, _| {},
            |k, v| inner.push((k, v)),
        )
        .unwrap();
        assert_eq!(inner, [("\"a\"", "1")]);
    }

    /// Whether `serde_json` takes `text` as one JSON value.
    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    #[test]
    fn members_are_slices_of_the_text_as_written() {
        let text = " {\"a\" : 1 , \"b\\u0022\":{\"c\":[true,false,null,\"x\"]},\"\":-0.5e+3 }\n";
        assert_eq!(
            collect(text, 64).unwrap(),
            [
                ("\"a\"", "1"),
                ("\"b\\u0022\"", "{\"c\":[true,false,null,\"x\"]}"),
                ("\"\"", "-0.5e+3"),
            ]
        );
        assert_eq!(collect("{}", 64).unwrap(), []);
        assert_eq!(collect("\t{ }\r\n", 64).unwrap(), []);
    }

    #[test]
    fn a_string_ends_where_it_does_whatever_its_length() {
        // Every length a run can take through the word-at-a-time looks and the vector search,
        // ended by a quote, by an escape, or by a control character (not JSON).
        for len in 0..200 {
            let run = "a".repeat(len);
            let text = format!(r#"{{"k":"{run}","z":1}}"#);
            assert_eq!(
                collect(&text, 4).unwrap(),
                [("\"k\"", &*format!("\"{run}\"")), ("\"z\"", "1")],
                "{len}"
            );
            let escaped = format!(r#"{{"k":"{run}\"{run}"}}"#);
            assert_eq!(
                collect(&escaped, 4).unwrap()[0].1.len(),
                2 * len + 4,
                "{len}"
            );
            let control = format!("{{\"k\":\"{run}\u{1}\"}}");
            assert!(!serde_accepts(&control));
            assert_eq!(
                collect(&control, 4),
                Err(ScanError::Syntax {
                    offset: 6 + len,
                    expected: "a control character escaped in a string"
                }),
                "{len}"
            );
        }
    }

    #[test]
    fn accepts_what_serde_json_accepts_and_nothing_else() {
        let cases = [
            r#"{"a":"plain text longer than eight bytes, then more"}"#,
            r#"{"a":"esc \" \\ \/ \b \f \n \r \t \u00e9 \uD800 end"}"#,
            "{\"a\":\"non-ASCII é ✓ 𝄞 in a string\"}",
            r#"{"a":[1,-1,0,-0,1.5,1e5,1E+5,1e-5,123456789012345678901234567890,1e400]}"#,
            r#"{"a":[[],{},[{}],{"b":[]}]}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"\u12G4"}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":"trailing backslash\"#,
            "{\"a\":\"tab\tin a string\"}",
            "{\"a\":\"newline\nin a string\"}",
            "{\"a\":\"\u{7f} is not a control character\"}",
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            r#"{"a":- 1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":truex}"#,
            r#"{"a":NaN}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{'a':1}"#,
            r#"{"a":1}}"#,
            r#"{"a":1} {}"#,
            r#"{"a":1"#,
            r#"{"a":"#,
            r#"{"a""#,
            r#"{"#,
            "{\"a\":1}\u{c}",
            "\u{c}{\"a\":1}",
            "{\"a\":\u{a0}1}",
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":}}"#,
            r#"{"a":{1:2}}"#,
        ];
        for text in cases {
            inner_walk_agrees(text, 64);
            assert_eq!(
                collect(text, 64).is_ok(),
                serde_accepts(text),
                "{text:?}: {:?}",
                collect(text, 64)
            );
        }
    }

    #[test]
    fn a_plain_run_ends_at_the_first_quote_backslash_or_control_character() {
        let ends = |b: u8| b == b'"' || b == b'\\' || b < 0x20;
        let naive = |text: &[u8], at: usize| {
            (at..text.len())
                .find(|&i| ends(text[i]))
                .unwrap_or(text.len())
        };
        // Every byte value, alone or after another that ends a run (whose borrow must not
        // mark it), at every place in texts of every length the word looks and the tail
        // take, from every start.
        for len in 0..=26 {
            for at in 0..=len {
                for place in 0..len {
                    for b in 0..=255u8 {
                        for lower in [None, Some(b'"'), Some(0u8)] {
                            let mut text = vec![b'x'; len];
                            text[place] = b;
                            if let (Some(l), Some(p)) = (lower, place.checked_sub(1)) {
                                text[p] = l;
                            }
                            assert_eq!(
                                plain_run(&text, at),
                                naive(&text, at),
                                "{text:?} from {at}"
                            );
                        }
                    }
                }
                assert_eq!(plain_run(&vec![b'x'; len], at), len);
            }
        }
        for s in [
            "",
            "a",
            "ok",
            "\"",
            "call",
            "tools/call",
            "allowed",
            "a\u{1}b",
            "é漢",
        ] {
            assert_eq!(is_plain(s.as_bytes()), !s.bytes().any(ends), "{s:?}");
        }
    }

    #[test]
    fn a_control_character_in_a_string_is_found_wherever_it_falls_in_a_word() {
        for at in 0..17 {
            let mut s = "x".repeat(16);
            s.insert(at, '\u{1f}');
            let text = format!("{{\"a\":\"{s}\"}}");
            assert!(
                matches!(collect(&text, 64), Err(ScanError::Syntax { offset, .. }) if offset == 6 + at),
                "{at}"
            );
            // An escaped quote in the same word ends no run early.
            let quoted = format!("{{\"a\":\"{}\\\"{}\"}}", "x".repeat(at), "y".repeat(16));
            assert_eq!(collect(&quoted, 64).unwrap()[0].1.len(), at + 20, "{at}");
        }
    }

    #[test]
    fn a_long_string_ends_at_its_quote_and_not_after_a_control_character() {
        for len in [16, 17, 40, 1000] {
            let long = "y".repeat(len);
            let text = format!("{{\"a\":\"{long}\",\"b\":\"\\\"{long}\"}}");
            assert_eq!(collect(&text, 64).unwrap()[1].1.len(), len + 4, "{len}");
            for at in [0, 15, 16, len - 1] {
                let mut s = long.clone();
                s.insert(at, '\n');
                let text = format!("{{\"a\":\"{s}\"}}");
                assert!(
                    matches!(collect(&text, 64), Err(ScanError::Syntax { offset, .. }) if offset == 6 + at),
                    "{len} {at}"
                );
            }
        }
    }

    #[test]
    fn nesting_is_bounded_and_the_object_is_level_one() {
        let nested = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(collect(&nested(63), 64).is_ok());
        assert_eq!(collect(&nested(64), 64), Err(ScanError::TooDeep(64)));
        // Brackets inside strings are text.
        assert!(collect(&format!("{{\"a\":\"{}\"}}", "[".repeat(100)), 64).is_ok());
        assert_eq!(collect("{}", 0), Err(ScanError::TooDeep(0)));
    }

    #[test]
    fn only_an_object_is_walked() {
        for text in ["[]", "1", "\"a\"", "null", "", " "] {
            assert!(
                matches!(collect(text, 64), Err(ScanError::Syntax { .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_key_given_twice_is_found_among_few_keys_and_many() {
        for n in [0, 1, 2, 16, 17, 5000] {
            let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            assert_eq!(repeated_key(&mut keys), None, "{n} distinct keys");
            if n > 0 {
                // The repeat at either end of the object.
                for at in [0, n] {
                    let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
                    keys.insert(at, format!("k{}", n / 2));
                    assert_eq!(
                        repeated_key(&mut keys).map(String::as_str),
                        Some(&*format!("k{}", n / 2)),
                        "{n} keys, repeat at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_quote_is_found_and_nothing_else() {
        // Every byte value before and after a quote, at every offset in a word and the tail:
        // a borrow between bytes would mark one that is not a quote.
        for len in [0, 1, 7, 8, 9, 16, 23, 40] {
            for at in 0..len {
                for other in 0..=255u8 {
                    let mut text = vec![other; len];
                    text[at] = b'"';
                    let want: Vec<usize> = (0..len).filter(|&i| text[i] == b'"').collect();
                    let mut found = Vec::new();
                    each_quote(&text, |q| {
                        found.push(q);
                        true
                    });
                    assert_eq!(found, want, "{len} {at} {other}");
                    // Stopped, it looks no further.
                    let mut first = Vec::new();
                    each_quote(&text, |q| {
                        first.push(q);
                        false
                    });
                    assert_eq!(first, want[..want.len().min(1)], "{len} {at} {other}");
                }
            }
        }
    }
}
