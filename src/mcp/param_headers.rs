//! `Mcp-Param-{Name}` headers (2026-07-28): a tool's input schema may mark an argument
//! `x-mcp-header: Name`, and a client then mirrors that argument's value in the header
//! `Mcp-Param-Name` (plain, or `=?base64?…?=`), so that intermediaries can route on it without
//! reading the body. A server must refuse a call whose headers and body disagree.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::mcp::jsonrpc::each_member;

/// Longest header name suffix honored (longer marks are ignored: no client can send them).
const MAX_NAME: usize = 128;

/// Most tools of one server whose marked arguments are kept.
const MAX_MARKED_TOOLS: usize = 4096;

/// How long the marks of a tool list that could not be read to its end (within one call's
/// deadline) are used before it is read again: a server that never ends its list must not
/// make every call read it anew, nor one that was slow once go unread for good.
pub const UNFINISHED_LIST_KEPT: std::time::Duration = std::time::Duration::from_secs(30);
/// Most marked arguments of one tool kept (each is a header on every call of it).
const MAX_MARKS_PER_TOOL: usize = 32;
/// Longest tool or argument name whose marks are kept: a server's names are not the gateway's
/// to hold at any length.
const MAX_KEPT_NAME: usize = 256;
/// Most bytes one server's marks hold, for each session that reaches it (names, and
/// [`KEPT_OVERHEAD`] for each tool and mark): past it, further tools' marks are not kept.
const MAX_KEPT_BYTES: usize = 256 * 1024;
/// What a kept tool or mark costs besides its names (the map's entry, the strings' heads).
const KEPT_OVERHEAD: usize = 64;

/// Which arguments of one upstream's tools are mirrored in headers: tool → (argument, header
/// suffix). Tools without marked arguments are absent.
#[derive(Debug, Default)]
pub struct ToolHeaders {
    by_tool: HashMap<String, Vec<(String, String)>>,
    /// Bytes of the names held in `by_tool`.
    bytes: usize,
}

impl ToolHeaders {
    /// Learns the marked arguments of one `tools/list` page (its `result`); returns the page's
    /// next cursor, or `Err` for a page that is not a tool list.
    pub fn learn(&mut self, page: &[u8]) -> Result<Option<String>, serde_json::Error> {
        #[derive(Deserialize)]
        struct Page<'a> {
            #[serde(borrow, default)]
            tools: Vec<&'a RawValue>,
            #[serde(rename = "nextCursor")]
            next: Option<String>,
        }
        #[derive(Deserialize)]
        struct Tool<'a> {
            name: String,
            #[serde(borrow, rename = "inputSchema")]
            schema: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Schema<'a> {
            #[serde(borrow)]
            properties: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Property<'a> {
            #[serde(borrow, rename = "x-mcp-header")]
            header: Option<&'a RawValue>,
        }
        let page: Page<'_> = serde_json::from_slice(page)?;
        for raw in page.tools {
            // Most tools mark nothing: skip them without a full parse (unless escapes could
            // spell the key differently).
            if !raw.get().contains("x-mcp-header") && !raw.get().contains('\\') {
                continue;
            }
            let Ok(Tool {
                name,
                schema: Some(schema),
            }) = serde_json::from_str::<Tool>(raw.get())
            else {
                continue;
            };
            if name.len() > MAX_KEPT_NAME {
                continue;
            }
            let Ok(Schema {
                properties: Some(properties),
            }) = serde_json::from_str::<Schema>(schema.get())
            else {
                continue;
            };
            // Property by property: a schema's size costs no memory beyond its text.
            let mut marked: Vec<(String, String)> = Vec::new();
            let read = each_member(properties, |arg, p| {
                let Ok(Property { header: Some(h) }) = serde_json::from_str::<Property>(p.get())
                else {
                    return;
                };
                let Ok(header) = serde_json::from_str::<String>(h.get()) else {
                    return;
                };
                let valid = !header.is_empty()
                    && header.len() <= MAX_NAME
                    && arg.len() <= MAX_KEPT_NAME
                    && header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if valid {
                    // The last of a property given twice, as a map would keep it; past the
                    // bound, no more are looked at (a schema of a million marked properties
                    // costs a pass, not a million searches of a growing list).
                    let header = header.to_ascii_lowercase();
                    if let Some(kept) = marked.iter_mut().find(|(a, _)| *a == arg) {
                        kept.1 = header;
                    } else if marked.len() < MAX_MARKS_PER_TOOL {
                        marked.push((arg, header));
                    }
                }
            });
            if read.is_ok() && !marked.is_empty() {
                // Bounded whatever a server lists: past the bounds, a tool's marks are not
                // kept (its calls are sent without them, and such a server may refuse them).
                let size = |name: &str, marked: &[(String, String)]| {
                    KEPT_OVERHEAD
                        + name.len()
                        + marked
                            .iter()
                            .map(|(a, h)| KEPT_OVERHEAD + a.len() + h.len())
                            .sum::<usize>()
                };
                let replaced = self.by_tool.get(&name).map(|old| size(&name, old));
                let added = size(&name, &marked);
                let kept = self.bytes - replaced.unwrap_or(0);
                if (self.by_tool.len() >= MAX_MARKED_TOOLS && replaced.is_none())
                    || kept + added > MAX_KEPT_BYTES
                {
                    continue;
                }
                self.bytes = kept + added;
                self.by_tool.insert(name, marked);
            }
        }
        Ok(page.next)
    }

    /// The marked arguments of `tool` (empty when none).
    pub fn of(&self, tool: &str) -> &[(String, String)] {
        self.by_tool.get(tool).map_or(&[], Vec::as_slice)
    }
}

/// The values of the `marked` arguments in a call's `arguments` object (the last of one given
/// twice), read in one pass that keeps nothing else of them.
pub fn marked_values<'a>(
    marked: &[(String, String)],
    arguments: &'a RawValue,
) -> Result<Vec<Option<&'a RawValue>>, serde_json::Error> {
    let mut found = vec![None; marked.len()];
    each_member(arguments, |key, value| {
        if let Some(i) = marked.iter().position(|(arg, _)| *arg == key) {
            found[i] = Some(value);
        }
    })?;
    Ok(found)
}

/// The text an argument's value is mirrored as: `None` for an array or object (only
/// primitive values are mirrored), `Some(None)` for null.
pub fn mirrored_text(value: &RawValue) -> Option<Option<String>> {
    if matches!(value.get().as_bytes().first(), Some(b'[' | b'{')) {
        return None;
    }
    match serde_json::from_str::<Value>(value.get()).ok()? {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s)),
        v => Some(Some(v.to_string())),
    }
}

/// Checks a call's `Mcp-Param-*` headers against its arguments (raw JSON). `header` finds a
/// header's decoded text by its lowercase suffix (`None` if absent; `Some(None)` if not
/// decodable).
pub fn check<'a>(
    marked: &[(String, String)],
    arguments: Option<&RawValue>,
    header: impl Fn(&str) -> Option<Option<String>> + 'a,
) -> Result<(), String> {
    let values = match arguments {
        Some(a) => checked_values(marked, a)?,
        None => vec![None; marked.len()],
    };
    for ((arg, suffix), value) in marked.iter().zip(values) {
        let expected = match value.map(mirrored_text) {
            None | Some(Some(None)) => None,
            Some(Some(Some(text))) => Some(text),
            // Not mirrored: a header sent for it says something the body does not.
            Some(None) if header(suffix).is_some() => {
                return Err(format!(
                    "the Mcp-Param-{suffix} header is sent but argument {arg:?} is an array or object (only strings, numbers and booleans are mirrored)"
                ));
            }
            Some(None) => continue,
        };
        match (expected, header(suffix)) {
            (None, None) => {}
            (Some(want), None) => {
                return Err(format!(
                    "the Mcp-Param-{suffix} header is required (argument {arg:?} is {want:?})"
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "the Mcp-Param-{suffix} header is sent but argument {arg:?} is not"
                ));
            }
            (Some(want), Some(got)) if got.as_deref() == Some(want.as_str()) => {}
            // The same number however written (`42` and `42.0`), compared exactly: as
            // doubles, `9007199254740993` would pass for `9007199254740992`.
            (Some(_), Some(Some(got)))
                if value.is_some_and(|v| same_number(v.get(), got.trim())) => {}
            (Some(want), Some(got)) => {
                return Err(match got {
                    Some(got) => format!(
                        "the Mcp-Param-{suffix} header {got:?} does not match argument {arg:?} ({want:?})"
                    ),
                    None => format!(
                        "the Mcp-Param-{suffix} header is not valid (=?base64?…?= must hold padded base64 of UTF-8 text)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The values of the `marked` arguments, as [`marked_values`] reads them, refusing arguments a
/// lenient server could read otherwise than the headers were checked against: a marked
/// argument given twice, or a key such a server reads as one (`REGION` for `region`: Go's
/// `encoding/json` matches keys without case).
fn checked_values<'a>(
    marked: &[(String, String)],
    arguments: &'a RawValue,
) -> Result<Vec<Option<&'a RawValue>>, String> {
    let names: smallvec::SmallVec<[&str; 8]> = marked.iter().map(|(a, _)| a.as_str()).collect();
    let mut found = vec![None; marked.len()];
    let mut refused = None;
    each_member(arguments, |key, value| {
        if refused.is_some() {
            return;
        }
        match marked.iter().position(|(arg, _)| *arg == key) {
            Some(i) if found[i].is_some() => {
                refused = Some(format!("params.arguments gives {key:?} twice"));
            }
            Some(i) => found[i] = Some(value),
            None => {
                if let Some(arg) = crate::mcp::lookalike::read_as(&key, &names) {
                    refused = Some(format!(
                        "params.arguments has the key {:?}, which lenient servers read as the argument {arg:?} its Mcp-Param header mirrors",
                        crate::mcp::lookalike::shown(&key)
                    ));
                }
            }
        }
    })
    .map_err(|e| format!("params.arguments must be an object: {e}"))?;
    match refused {
        Some(why) => Err(why),
        None => Ok(found),
    }
}

/// A JSON number as sign, significant digits and exponent: equal for equal values however
/// written (`42`, `42.0`, `4.2e1`); `None` if `text` is not a JSON number.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => {
            let e = &rest[at + 1..];
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (&rest[..at], e.parse::<i64>().ok()?)
        }
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let well_formed = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && (int == "0" || !int.starts_with('0'))
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() != mantissa.contains('.'));
    if !well_formed {
        return None;
    }
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return Some((false, String::new(), 0)); // zero, whatever its sign
    }
    let exponent = exponent - frac.len() as i64 + (significant.len() - trimmed.len()) as i64;
    Some((negative, trimmed.to_owned(), exponent))
}

/// Whether two JSON numbers have the same value, exactly.
fn same_number(a: &str, b: &str) -> bool {
    matches!((decimal(a), decimal(b)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_the_same_only_when_their_values_are() {
        for (a, b) in [
            ("42", "42.0"),
            ("42", "4.2e1"),
            ("42", "420E-1"),
            ("0", "-0.0"),
            ("0.5", "5e-1"),
            ("-1.50", "-1.5"),
            ("1e400", "10e399"),
        ] {
            assert!(same_number(a, b), "{a} {b}");
            assert!(same_number(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("9007199254740993", "9007199254740992"),
            ("1", "1.0000000000000000001"),
            ("1", "-1"),
            ("42", "042"),
            ("42", "42."),
            ("42", ".42e2"),
            ("42", "+42"),
            ("42", "4 2"),
            ("42", "0x2a"),
            ("42", "42e"),
            ("1", "1e9999999999"),
            ("42", ""),
        ] {
            assert!(!same_number(a, b), "{a} {b}");
        }
    }

    fn learned() -> ToolHeaders {
        let mut h = ToolHeaders::default();
        let page = json!({"tools": [
            {"name": "plain", "inputSchema": {"type": "object", "properties": {"a": {"type": "string"}}}},
            {"name": "routed", "inputSchema": {"type": "object", "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"},
                "n": {"type": "integer", "x-mcp-header": "N"},
                "bad": {"type": "string", "x-mcp-header": "no spaces"},
                "obj": {"type": "object", "x-mcp-header": "Obj"}}}}],
            "nextCursor": "2"});
        assert_eq!(
            h.learn(page.to_string().as_bytes()).unwrap().as_deref(),
            Some("2")
        );
        assert!(h.learn(b"{\"tools\": 3}").is_err());
        h
    }

    #[test]
    fn marked_arguments_are_learned_from_schemas() {
        let h = learned();
        assert!(h.of("plain").is_empty() && h.of("unknown").is_empty());
        let mut routed: Vec<_> = h.of("routed").to_vec();
        routed.sort();
        let names: Vec<_> = routed
            .iter()
            .map(|(a, s)| (a.as_str(), s.as_str()))
            .collect();
        assert_eq!(names, [("n", "n"), ("obj", "obj"), ("region", "region")]);
    }

    #[test]
    fn headers_must_mirror_the_marked_arguments() {
        let h = learned();
        let args = RawValue::from_string(
            json!({"region": "eu-west", "n": 3, "obj": {"x": 1}}).to_string(),
        )
        .unwrap();
        let args = Some(&*args);
        let headers = |pairs: &'static [(&'static str, Option<&'static str>)]| {
            move |s: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == s)
                    .map(|(_, v)| v.map(str::to_owned))
            }
        };
        let ok = &[("region", Some("eu-west")), ("n", Some("3"))];
        assert!(check(h.of("routed"), args, headers(ok)).is_ok());
        let float = &[("region", Some("eu-west")), ("n", Some("3.0"))];
        assert!(check(h.of("routed"), args, headers(float)).is_ok());
        // A number the header rounds (as a double would read both) does not match.
        let big =
            RawValue::from_string(r#"{"region":"eu-west","n":9007199254740993}"#.into()).unwrap();
        let rounded = &[("region", Some("eu-west")), ("n", Some("9007199254740992"))];
        assert!(
            check(h.of("routed"), Some(&big), headers(rounded))
                .unwrap_err()
                .contains("does not match")
        );
        let missing = &[("region", Some("eu-west"))];
        assert!(
            check(h.of("routed"), args, headers(missing))
                .unwrap_err()
                .contains("Mcp-Param-n")
        );
        let differs = &[("region", Some("us")), ("n", Some("3"))];
        assert!(
            check(h.of("routed"), args, headers(differs))
                .unwrap_err()
                .contains("does not match")
        );
        let undecodable = &[("region", None), ("n", Some("3"))];
        assert!(
            check(h.of("routed"), args, headers(undecodable))
                .unwrap_err()
                .contains("not valid")
        );
        let extra = &[("region", Some("eu-west")), ("n", Some("3"))];
        let no_n = RawValue::from_string(json!({"region": "eu-west"}).to_string()).unwrap();
        assert!(
            check(h.of("routed"), Some(&no_n), headers(extra))
                .unwrap_err()
                .contains("is not")
        );
        // What a lenient server could read otherwise than the headers were checked against.
        for (body, sent, why) in [
            (
                r#"{"REGION":"eu","n":3}"#,
                &[("n", Some("3"))][..],
                "lenient servers read as the argument \"region\"",
            ),
            (
                r#"{"region":"us","Region":"eu","n":3}"#,
                &[("region", Some("us")), ("n", Some("3"))][..],
                "\"Region\"",
            ),
            (
                r#"{"region":"us","n":3,"n":4}"#,
                &[("region", Some("us")), ("n", Some("4"))][..],
                "gives \"n\" twice",
            ),
            (
                r#"{"region\u0000":"eu","n":3}"#,
                &[("n", Some("3"))][..],
                "lenient servers read",
            ),
            (
                r#"{"region":"us","n":3,"obj":["eu"]}"#,
                &[
                    ("region", Some("us")),
                    ("n", Some("3")),
                    ("obj", Some("eu")),
                ][..],
                "array or object",
            ),
        ] {
            let args = RawValue::from_string(body.into()).unwrap();
            let sent: Vec<(&str, Option<&str>)> = sent.to_vec();
            let header = |s: &str| {
                sent.iter()
                    .find(|(k, _)| *k == s)
                    .map(|(_, v)| v.map(str::to_owned))
            };
            let e = check(h.of("routed"), Some(&args), header).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
        // Keys no marked argument folds to pass as they are.
        let other = RawValue::from_string(r#"{"region":"us","n":3,"Note":"x"}"#.into()).unwrap();
        let sent = &[("region", Some("us")), ("n", Some("3"))];
        assert!(check(h.of("routed"), Some(&other), headers(sent)).is_ok());
    }

    #[test]
    fn what_is_kept_of_a_servers_marks_is_bounded() {
        let marked = |n: usize| {
            let props: serde_json::Map<String, serde_json::Value> = (0..n)
                .map(|i| {
                    (
                        format!("a{i}"),
                        json!({"type": "string", "x-mcp-header": format!("H{i}")}),
                    )
                })
                .collect();
            json!({"type": "object", "properties": props})
        };
        // A tool already kept is still learned anew, its marks cut to the bound.
        let tools: Vec<_> = (0..10)
            .map(|i| json!({"name": format!("t{i}"), "inputSchema": marked(1)}))
            .chain([json!({"name": "t0", "inputSchema": marked(MAX_MARKS_PER_TOOL + 8)})])
            .collect();
        let mut h = ToolHeaders::default();
        h.learn(json!({"tools": tools}).to_string().as_bytes())
            .unwrap();
        assert_eq!(h.of("t0").len(), MAX_MARKS_PER_TOOL);
        assert_eq!(h.of("t0")[0], ("a0".to_owned(), "h0".to_owned()));
        // Many tools: the first are kept, within both bounds.
        let tools: Vec<_> = (0..MAX_MARKED_TOOLS + 10)
            .map(|i| json!({"name": format!("t{i}"), "inputSchema": marked(1)}))
            .collect();
        let mut h = ToolHeaders::default();
        h.learn(json!({"tools": tools}).to_string().as_bytes())
            .unwrap();
        assert!(h.by_tool.len() <= MAX_MARKED_TOOLS && h.bytes <= MAX_KEPT_BYTES);
        assert_eq!(h.of("t0").len(), 1);
        assert!(h.of(&format!("t{}", MAX_MARKED_TOOLS)).is_empty());

        // Long names: a tool's or an argument's past the bound is not kept, and what the
        // names hold in all is bounded whatever their number.
        let long = "n".repeat(MAX_KEPT_NAME - 8);
        let too_long = "x".repeat(MAX_KEPT_NAME + 1);
        let named = |tool: String, arg: &str| {
            json!({"name": tool, "inputSchema": {"type": "object", "properties": {
                arg: {"type": "string", "x-mcp-header": "H"}}}})
        };
        // The names too long first: kept out by their length, not by what came before.
        let tools: Vec<_> = [
            named(too_long.clone(), "a"),
            named("short".into(), &too_long),
        ]
        .into_iter()
        .chain((0..MAX_MARKED_TOOLS).map(|i| named(format!("{i}{long}"), &long)))
        .collect();
        let mut h = ToolHeaders::default();
        h.learn(json!({"tools": tools}).to_string().as_bytes())
            .unwrap();
        assert!(h.bytes <= MAX_KEPT_BYTES, "{}", h.bytes);
        let held: usize = h
            .by_tool
            .iter()
            .map(|(t, m)| {
                KEPT_OVERHEAD
                    + t.len()
                    + m.iter()
                        .map(|(a, x)| KEPT_OVERHEAD + a.len() + x.len())
                        .sum::<usize>()
            })
            .sum();
        assert_eq!(held, h.bytes);
        assert!(h.by_tool.len() < MAX_MARKED_TOOLS, "{}", h.by_tool.len());
        assert!(h.of(&format!("0{long}")).len() == 1, "the first are kept");
        assert!(h.of(&too_long).is_empty());
        assert!(h.of("short").is_empty());
    }
}
