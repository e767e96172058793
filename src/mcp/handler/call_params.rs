//! The params of a named call (`tools/call`, `prompts/get`), read in one pass and edited in
//! place: the gateway routes by `name` and shows `arguments` to the plugins, then forwards the
//! params with only those members replaced, every other byte as the client sent it (no parse
//! into a map and no re-encoding of a 64 KiB argument).

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::json_scan;
use crate::mcp::lookalike;

/// The members the gateway reads, as views into the params.
pub(super) struct CallParams<'a> {
    /// The name's JSON text.
    name: Option<&'a str>,
    /// The arguments' JSON text.
    arguments: Option<&'a str>,
    /// Whether the call asks to run as a task (2025-11-25), by `task` or a key a lenient
    /// server reads as it.
    task: bool,
}

/// The top-level members whose meaning the gateway fixes: each must be given once, and no
/// other key may be one a server could read as it ([`crate::mcp::lookalike`]).
const OWNED: [&str; 3] = ["name", "arguments", "_meta"];

impl<'a> CallParams<'a> {
    /// Reads `params` (absent params read as `{}`).
    pub(super) fn read(params: Option<&'a [u8]>) -> Result<CallParams<'a>, String> {
        let Some(p) = params else {
            return Ok(CallParams {
                name: None,
                arguments: None,
                task: false,
            });
        };
        let bad = |e: &dyn std::fmt::Display| format!("params must be an object: {e}");
        let text = std::str::from_utf8(p).map_err(|e| bad(&e))?;
        let mut read = CallParams {
            name: None,
            arguments: None,
            task: false,
        };
        let mut meta = false;
        let mut refused = None;
        // Where a member name that is no text (a lone surrogate) starts.
        let mut undecodable = None;
        // The whole text is checked before any refusal is told: the JSON's own errors come
        // first.
        json_scan::members(text, json_scan::MAX_DEPTH, |raw_key, value| {
            let Ok(key) = json_scan::unquote(raw_key) else {
                // `raw_key` is a slice of `text`.
                undecodable.get_or_insert(raw_key.as_ptr() as usize - text.as_ptr() as usize);
                return;
            };
            if refused.is_some() {
                return;
            }
            let twice = match &*key {
                "name" => read.name.replace(value).is_some(),
                "arguments" => read.arguments.replace(value).is_some(),
                "_meta" => std::mem::replace(&mut meta, true),
                other => {
                    read.task |= lookalike::read_as(other, &["task"]).is_some();
                    if let Some(owned) = lookalike::read_as(other, &OWNED) {
                        refused = Some(format!(
                            "params.{other:?} is too like params.{owned}: servers differ on which they read"
                        ));
                    }
                    false
                }
            };
            if twice {
                refused = Some(format!("params.{key} is given twice"));
            }
        })
        .map_err(|e| bad(&e))?;
        if let Some(at) = undecodable {
            return Err(bad(&format_args!(
                "the member name at byte {at} is not text (a lone surrogate)"
            )));
        }
        match refused {
            Some(why) => Err(why),
            None => Ok(read),
        }
    }

    /// The name called.
    pub(super) fn name(&self) -> Result<Cow<'a, str>, String> {
        let raw = self.name.ok_or("missing params.name")?;
        // Most names need no unescaping: borrowed as they are, without a second parse.
        if let Some(plain) = raw
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .filter(|r| !r.contains('\\'))
        {
            return Ok(Cow::Borrowed(plain));
        }
        serde_json::from_str::<String>(raw)
            .map(Cow::Owned)
            .map_err(|_| "params.name must be a string".into())
    }

    /// Whether the call asks its server to run it as a task: the answer is then the task, and
    /// the call's result comes later, to `tasks/result`.
    pub(super) fn is_task(&self) -> bool {
        self.task
    }

    /// The arguments as JSON text (`{}` when absent).
    pub(super) fn arguments(&self) -> &'a str {
        self.arguments.unwrap_or("{}")
    }

    /// `params` (the bytes these views were read from) with the name replaced by `name` when
    /// given and the arguments by `arguments` when given (added when absent): one copy, or
    /// none when nothing changes.
    pub(super) fn splice(
        &self,
        params: &Bytes,
        name: Option<&str>,
        arguments: Option<&RawValue>,
    ) -> Bytes {
        let name = name.map(|n| serde_json::to_vec(n).expect("a string serializes"));
        // (start, end, replacement), in the order they appear.
        let mut edits: Vec<(usize, usize, &[u8])> = Vec::with_capacity(2);
        if let (Some(new), Some(old)) = (&name, self.name) {
            let (start, end) = span(params, old);
            edits.push((start, end, new));
        }
        let inserted;
        match (arguments, self.arguments) {
            (Some(new), Some(old)) => {
                let (start, end) = span(params, old);
                edits.push((start, end, new.get().as_bytes()));
            }
            (Some(new), None) => {
                // Right after the object's `{`, followed by a comma unless the object is empty.
                let open = params.len() - params.trim_ascii_start().len() + 1;
                let empty = params[open..].trim_ascii_start().starts_with(b"}");
                let comma = if empty { "" } else { "," };
                inserted = format!("\"arguments\":{}{comma}", new.get());
                edits.push((open, open, inserted.as_bytes()));
            }
            (None, _) => {}
        }
        if edits.is_empty() {
            return params.clone();
        }
        edits.sort_unstable_by_key(|e| e.0);
        let grown: usize = edits.iter().map(|e| e.2.len()).sum();
        let mut out = Vec::with_capacity(params.len() + grown);
        let mut at = 0;
        for (start, end, new) in edits {
            out.extend_from_slice(&params[at..start]);
            out.extend_from_slice(new);
            at = end;
        }
        out.extend_from_slice(&params[at..]);
        // The call runs on the copy: it keeps the client's body (and its room) alive.
        crate::body_room::derived(out, params)
    }
}

/// Where `value` (a view borrowed from `params` while reading) lies in `params`.
fn span(params: &[u8], value: &str) -> (usize, usize) {
    let text = value.as_bytes();
    let start = (text.as_ptr() as usize).wrapping_sub(params.as_ptr() as usize);
    assert!(
        start <= params.len() && text.len() <= params.len() - start,
        "a member's view lies inside the params it was read from"
    );
    (start, start + text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(params: &str) -> Result<CallParams<'_>, String> {
        CallParams::read(Some(params.as_bytes()))
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn the_name_and_arguments_are_replaced_and_every_other_byte_kept() {
        let text = r#" { "_meta" : {"progressToken": 7},"name":"u0__echo" ,"arguments": {"text":"a\"b"}, "x": [1, 2] } "#;
        let params = Bytes::from(text);
        let call = read(text).unwrap();
        assert_eq!(call.name().unwrap(), "u0__echo");
        assert_eq!(call.arguments(), r#"{"text":"a\"b"}"#);
        let renamed = call.splice(&params, Some("echo"), None);
        assert_eq!(renamed, text.replace(r#""u0__echo""#, r#""echo""#));
        let both = call.splice(
            &params,
            Some("e\"cho"),
            Some(&raw(r#"{"text":"redacted"}"#)),
        );
        assert_eq!(
            both,
            text.replace(r#""u0__echo""#, r#""e\"cho""#)
                .replace(r#"{"text":"a\"b"}"#, r#"{"text":"redacted"}"#)
        );
        let back: serde_json::Value = serde_json::from_slice(&both).unwrap();
        assert_eq!(back["name"], "e\"cho");
        assert_eq!(back["_meta"]["progressToken"], 7);
        // Nothing to change: the same bytes, not a copy.
        let same = call.splice(&params, None, None);
        assert_eq!(same.as_ptr(), params.as_ptr());
    }

    #[test]
    fn arguments_a_plugin_adds_go_into_the_object_whatever_it_holds() {
        for (text, want) in [
            (r#"{"name":"t"}"#, r#"{"arguments":{"a":1},"name":"t"}"#),
            (r#" {  } "#, r#" {"arguments":{"a":1}  } "#),
        ] {
            let params = Bytes::from(text);
            let call = read(text).unwrap();
            let out = call.splice(&params, None, Some(&raw(r#"{"a":1}"#)));
            assert_eq!(out, want);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap();
        }
        // Renamed and added at once, the insertion coming first.
        let text = r#"{"name":"u1__t"}"#;
        let out = read(text)
            .unwrap()
            .splice(&Bytes::from(text), Some("t"), Some(&raw("{}")));
        assert_eq!(out, r#"{"arguments":{},"name":"t"}"#);
    }

    #[test]
    fn a_member_given_twice_or_params_of_the_wrong_shape_are_refused() {
        // Escaped or not, a second name would let the server call what the gateway did not
        // route, check or audit.
        for (text, member) in [
            (r#"{"name":"allowed","name":"secret"}"#, "name"),
            (r#"{"name":"allowed","n\u0061me":"secret"}"#, "name"),
            (
                r#"{"name":"t","arguments":{},"arguments":{"x":1}}"#,
                "arguments",
            ),
            // A present `null` is given: it would win over arguments a plugin inserts.
            (
                r#"{"name":"t","arguments":{"a":1},"arguments":null}"#,
                "arguments",
            ),
            (
                r#"{"name":"t","_meta":{},"_meta":{"progressToken":1}}"#,
                "_meta",
            ),
        ] {
            let e = read(text).err().unwrap();
            assert_eq!(e, format!("params.{member} is given twice"), "{text}");
        }
        for text in [r#"["echo", {}]"#, "7", r#""name""#, "{", r#"{"name":}"#] {
            let e = read(text).err().unwrap();
            assert!(e.starts_with("params must be an object"), "{text}: {e}");
        }
        // A bad JSON after a refusal is told as bad JSON, and so is a name that is no text
        // (a lone surrogate) or params that are not UTF-8.
        for text in [
            r#"{"name":"a","name":"b","x":}"#,
            r#"{"name":"a","\ud800":1}"#,
            r#"{"name":"a","name":"b","\udc00x":1}"#,
        ] {
            let e = read(text).err().unwrap();
            assert!(e.starts_with("params must be an object"), "{text}: {e}");
        }
        // The position is the name's in the params, not in the name alone.
        assert_eq!(
            read(r#"{"name":"a","\ud800":1}"#).err().unwrap(),
            "params must be an object: the member name at byte 12 is not text (a lone surrogate)"
        );
        let e = CallParams::read(Some(b"{\"name\":\"\xff\"}"))
            .err()
            .unwrap();
        assert!(e.starts_with("params must be an object"), "{e}");
        assert_eq!(
            read(r#"{"name":7}"#).unwrap().name().unwrap_err(),
            "params.name must be a string"
        );
        assert_eq!(
            read("{}").unwrap().name().unwrap_err(),
            "missing params.name"
        );
        assert_eq!(
            CallParams::read(None).unwrap().name().unwrap_err(),
            "missing params.name"
        );
        // Text without escapes is taken as it is; escapes are read as what they stand for.
        assert_eq!(
            read(r#"{"name":"é ✓ 𝄞 t/x"}"#).unwrap().name().unwrap(),
            "é ✓ 𝄞 t/x"
        );
        assert_eq!(read(r#"{"name":""}"#).unwrap().name().unwrap(), "");
        // Escapes in the name are read as the text they stand for.
        assert_eq!(
            read(r#"{"name":"ech\u006f"}"#).unwrap().name().unwrap(),
            "echo"
        );
        // `null` arguments are shown as they are.
        assert_eq!(read(r#"{"arguments":null}"#).unwrap().arguments(), "null");
    }

    #[test]
    fn keys_a_server_could_read_as_the_name_or_the_arguments_are_refused() {
        // Go's encoding/json matches keys without regard to case and folds U+017F (long s)
        // to `s`; one SDK took a trailing NUL for nothing.
        for (text, owned) in [
            (r#"{"name":"u0__ok","Name":"forbidden"}"#, "name"),
            (r#"{"name":"u0__ok","NAME":"forbidden"}"#, "name"),
            (r#"{"name":"u0__ok","name\u0000":"forbidden"}"#, "name"),
            (
                r#"{"name":"u0__ok","nAmE\u0000\u0000\u0000":"forbidden"}"#,
                "name",
            ),
            (
                r#"{"name":"u0__ok","arguments":{},"ARGUMENTS":{"cmd":"x"}}"#,
                "arguments",
            ),
            (r#"{"name":"u0__ok","ARGUMENTS":{"cmd":"x"}}"#, "arguments"),
            (
                r#"{"name":"u0__ok","argument\u017f":{"cmd":"x"}}"#,
                "arguments",
            ),
            (r#"{"name":"u0__ok","_META":{"progressToken":1}}"#, "_meta"),
        ] {
            let e = read(text).err().unwrap();
            assert!(
                e.contains(&format!("is too like params.{owned}")),
                "{text}: {e}"
            );
        }
        // Other keys pass, whatever they hold.
        let call = read(r#"{"name":"t","names":[1],"argument":0,"x_meta":{},"_meta":{}}"#);
        assert_eq!(call.unwrap().name().unwrap(), "t");
    }

    #[test]
    fn a_call_run_as_a_task_is_told_by_any_spelling_of_task() {
        for text in [
            r#"{"name":"t","task":{"ttl":1}}"#,
            r#"{"name":"t","Task":{}}"#,
            r#"{"name":"t","TASK\u0000":{}}"#,
            r#"{"name":"t","ta\u0073k":{}}"#,
        ] {
            assert!(read(text).unwrap().is_task(), "{text}");
        }
        for text in [
            r#"{"name":"t"}"#,
            r#"{"name":"t","tasks":{},"arguments":{"task":1}}"#,
        ] {
            assert!(!read(text).unwrap().is_task(), "{text}");
        }
    }
}
