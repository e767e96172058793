//! `tool-policy`: rules on tool-call arguments; first match wins, then a default.
//!
//! ```json
//! {
//!   "rules": [
//!     {"tool": "fs_*", "argument": "path", "operator": "startsWith", "value": "/etc",
//!      "action": "block", "reason": "system files are off limits"},
//!     {"tool": "fs_read", "action": "allow"}
//!   ],
//!   "default": "block",
//!   "default_reason": "tool not allowed by policy"
//! }
//! ```
//!
//! A rule matches when its `tool` / `server` globs match the call (absent:
//! any) and, if it names an `argument`, the argument's value satisfies
//! `operator` against `value`. Arguments are addressed with a dotted path
//! (`options.mode`, `items.0`) or a JSON pointer (`/options/mode`).
//! Operators: equal, notEqual, contains, notContains, startsWith, endsWith,
//! regex (unanchored search). A string argument is compared as is; any
//! other value by its JSON text. `contains` on an array checks its elements.
//! A condition on a missing argument never matches.
use gatehouse_plugin::serde_json::{self, Value};
use gatehouse_plugin::{
    CallContext, Decision, Payload, Plugin, Target, export_plugin, parse_config,
};
use regex::Regex;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    default: Action,
    default_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    tool: Option<String>,
    server: Option<String>,
    argument: Option<String>,
    operator: Option<Operator>,
    value: Option<Value>,
    action: Action,
    reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Action {
    #[default]
    Allow,
    #[serde(alias = "deny")]
    Block,
}

#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(rename_all = "camelCase")]
enum Operator {
    Equal,
    NotEqual,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Regex,
}

enum Test {
    Text(Operator, String),
    Regex(Regex),
}

struct Condition {
    path: Vec<String>,
    test: Test,
}

struct Rule {
    target: Target,
    condition: Option<Condition>,
    action: Action,
    reason: String,
}

pub struct ToolPolicy {
    rules: Vec<Rule>,
    default: Action,
    default_reason: String,
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn split_path(path: &str) -> Vec<String> {
    if let Some(pointer) = path.strip_prefix('/') {
        pointer
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect()
    } else {
        path.split('.').map(str::to_string).collect()
    }
}

fn lookup<'a>(mut v: &'a Value, path: &[String]) -> Option<&'a Value> {
    for key in path {
        v = match v {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

impl Condition {
    fn holds(&self, arguments: &Value) -> bool {
        let Some(actual) = lookup(arguments, &self.path) else {
            return false;
        };
        match &self.test {
            Test::Regex(re) => re.is_match(&text_of(actual)),
            Test::Text(op, expected) => {
                let contains = || match actual {
                    Value::Array(items) => items.iter().any(|i| text_of(i) == *expected),
                    other => text_of(other).contains(expected.as_str()),
                };
                let text = text_of(actual);
                match op {
                    Operator::Equal => text == *expected,
                    Operator::NotEqual => text != *expected,
                    Operator::Contains => contains(),
                    Operator::NotContains => !contains(),
                    Operator::StartsWith => text.starts_with(expected.as_str()),
                    Operator::EndsWith => text.ends_with(expected.as_str()),
                    Operator::Regex => unreachable!("regex conditions are compiled"),
                }
            }
        }
    }
}

impl ToolPolicy {
    fn decide(&self, ctx: &CallContext, arguments: &Payload) -> Decision {
        // Parse the arguments only if some applicable rule looks at them; `None` inside when
        // they cannot be read (serde refuses `1e400`, which a server's decoder may well read).
        let mut parsed: Option<Option<Value>> = None;
        for rule in &self.rules {
            // A rule that blocks matches a name as a lenient server may look it up; one that
            // allows only the name as written (`allow file:///home/Alice/*` must not allow
            // `file:///home/alice/...`).
            let matched = match rule.action {
                Action::Block => rule.target.matches_leniently(ctx),
                Action::Allow => rule.target.matches(ctx),
            };
            if !matched {
                continue;
            }
            if let Some(cond) = &rule.condition {
                let args = parsed.get_or_insert_with(|| {
                    serde_json::from_str(&without_lone_surrogates(arguments.text())).ok()
                });
                match args {
                    Some(args) if !cond.holds(args) => continue,
                    Some(_) => {}
                    // Arguments this policy cannot read: a rule that blocks on them applies,
                    // one that allows on them does not (fail closed).
                    None if rule.action == Action::Allow => continue,
                    None => {}
                }
            }
            return verdict(rule.action, &rule.reason);
        }
        verdict(self.default, &self.default_reason)
    }
}

/// `text` with each escape of a lone surrogate (`\ud800` with no low half after it) written
/// `\ufffd`: serde refuses them, where the Python and JavaScript builds (and servers' decoders)
/// read them as text; the rest of a string, what rules look at, is read as it is.
fn without_lone_surrogates(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let unit = |at: usize| -> Option<u16> {
        let hex = bytes.get(at..at + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    };
    let mut out: Option<String> = None;
    let (mut copied, mut i, mut in_string) = (0, 0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                let lone = match unit(i) {
                    Some(0xD800..=0xDBFF) => !matches!(unit(i + 6), Some(0xDC00..=0xDFFF)),
                    Some(0xDC00..=0xDFFF) => true,
                    _ => false,
                };
                let width = match unit(i) {
                    Some(0xD800..=0xDBFF) if !lone => 12,
                    Some(_) => 6,
                    None => 2,
                };
                if lone {
                    let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                    o.push_str(&text[copied..i]);
                    o.push_str("\\ufffd");
                    copied = i + 6;
                }
                i += width;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            std::borrow::Cow::Owned(o)
        }
        None => std::borrow::Cow::Borrowed(text),
    }
}

fn verdict(action: Action, reason: &str) -> Decision {
    match action {
        Action::Allow => Decision::Allow,
        Action::Block => Decision::deny(reason),
    }
}

impl Plugin for ToolPolicy {
    fn init(config: &str) -> Result<Self, String> {
        let cfg: Config = parse_config(config)?;
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.into_iter().enumerate() {
            let condition = match (r.argument, r.operator) {
                (None, None) => None,
                (Some(argument), Some(op)) => {
                    let value = r.value.as_ref().map(text_of).ok_or_else(|| {
                        format!("rules[{i}]: `value` is required with `operator`")
                    })?;
                    let test = match op {
                        Operator::Regex => Test::Regex(
                            Regex::new(&value).map_err(|e| format!("rules[{i}].value: {e}"))?,
                        ),
                        op => Test::Text(op, value),
                    };
                    Some(Condition {
                        path: split_path(&argument),
                        test,
                    })
                }
                _ => return Err(format!("rules[{i}]: `argument` and `operator` go together")),
            };
            rules.push(Rule {
                target: Target {
                    tool: r.tool,
                    server: r.server,
                },
                condition,
                action: r.action,
                reason: r
                    .reason
                    .unwrap_or_else(|| format!("blocked by tool-policy rule {i}")),
            });
        }
        Ok(ToolPolicy {
            rules,
            default: cfg.default,
            default_reason: cfg
                .default_reason
                .unwrap_or_else(|| "not allowed by tool-policy".into()),
        })
    }

    fn on_request(&mut self, ctx: &CallContext, arguments: &Payload) -> Decision {
        self.decide(ctx, arguments)
    }
}

export_plugin!(ToolPolicy: on_request);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogates_are_read_as_replacement_characters_and_nothing_else_changes() {
        for (text, read) in [
            (r#"{"a":"\ud800"}"#, r#"{"a":"\ufffd"}"#),
            (r#"{"a":"x\udc00y"}"#, r#"{"a":"x\ufffdy"}"#),
            (r#"{"\ud800":1,"b":"\ud800\ud800"}"#, r#"{"\ufffd":1,"b":"\ufffd\ufffd"}"#),
            (r#"{"a":"\ud83d\ude00"}"#, r#"{"a":"\ud83d\ude00"}"#),
            (r#"{"a":"\\ud800"}"#, r#"{"a":"\\ud800"}"#),
            (r#"{"a":"\"\ud800"}"#, r#"{"a":"\"\ufffd"}"#),
            (r#"{"a":"\ud800\n"}"#, r#"{"a":"\ufffd\n"}"#),
        ] {
            assert_eq!(without_lone_surrogates(text), read, "{text}");
            assert!(serde_json::from_str::<Value>(read).is_ok(), "{read}");
        }
    }

    #[test]
    fn arguments_it_cannot_read_meet_the_rules_that_block_not_those_that_allow() {
        let p = ToolPolicy::init(
            r#"{"rules":[
                {"tool":"get","argument":"url","operator":"startsWith","value":"https://ok/","action":"allow"},
                {"tool":"get","action":"block","reason":"not ok"},
                {"tool":"fs_*","argument":"path","operator":"startsWith","value":"/etc","action":"block","reason":"system"}
            ],"default":"allow"}"#,
        )
        .unwrap();
        let decide = |tool: &str, args: &str| p.decide(&ctx(tool), &Payload::new(args));
        for args in [r#"{"path":"/home/a","n":1e400}"#, "not json"] {
            assert!(denied(&decide("fs_read", args)), "{args}");
            assert!(denied(&decide("get", args)), "{args}");
        }
        // A lone surrogate is read: the path decides.
        assert!(!denied(&decide("fs_read", r#"{"path":"/home/a","x":"\ud800"}"#)));
        assert!(denied(&decide("fs_read", r#"{"path":"/etc/passwd","x":"\ud800"}"#)));
        assert!(!denied(&decide("get", r#"{"url":"https://ok/a","x":"\udc00"}"#)));
    }

    fn ctx(name: &str) -> CallContext<'static> {
        CallContext::new("tools/call", "files")
            .with_name(name)
            .with_session_id("s")
    }

    fn denied(d: &Decision) -> bool {
        matches!(d, Decision::Deny(_))
    }

    #[test]
    fn first_match_wins_then_default() {
        let p = ToolPolicy::init(
            r#"{"rules": [
                {"tool": "fs_*", "argument": "path", "operator": "startsWith", "value": "/etc", "action": "block", "reason": "no /etc"},
                {"tool": "fs_*", "action": "allow"}
            ], "default": "block"}"#,
        )
        .unwrap();
        assert!(denied(&p.decide(
            &ctx("fs_read"),
            &Payload::new(r#"{"path": "/etc/passwd"}"#)
        )));
        assert!(!denied(&p.decide(
            &ctx("fs_read"),
            &Payload::new(r#"{"path": "/home/a"}"#)
        )));
        assert!(denied(&p.decide(&ctx("shell"), &Payload::new("{}"))));
    }

    #[test]
    fn operators() {
        let cases = [
            ("equal", "x", r#"{"a": "x"}"#, true),
            ("equal", "5", r#"{"a": 5}"#, true),
            ("notEqual", "x", r#"{"a": "y"}"#, true),
            ("contains", "ell", r#"{"a": "hello"}"#, true),
            ("contains", "b", r#"{"a": ["a", "b"]}"#, true),
            ("notContains", "z", r#"{"a": "hello"}"#, true),
            ("startsWith", "he", r#"{"a": "hello"}"#, true),
            ("endsWith", "lo", r#"{"a": "hello"}"#, true),
            ("regex", "^h.*o$", r#"{"a": "hello"}"#, true),
            ("regex", "^x", r#"{"a": "hello"}"#, false),
            ("equal", "x", r#"{"b": "x"}"#, false),
        ];
        for (op, value, args, expect) in cases {
            let cfg = format!(
                r#"{{"rules": [{{"argument": "a", "operator": "{op}", "value": "{value}", "action": "block"}}]}}"#
            );
            let p = ToolPolicy::init(&cfg).unwrap();
            assert_eq!(
                denied(&p.decide(&ctx("t"), &Payload::new(args))),
                expect,
                "{op} {value} {args}"
            );
        }
    }

    #[test]
    fn nested_paths() {
        let p = ToolPolicy::init(
            r#"{"rules": [{"argument": "/opts/mode", "operator": "equal", "value": "rw", "action": "block"},
                          {"argument": "items.1", "operator": "equal", "value": "bad", "action": "block"}]}"#,
        )
        .unwrap();
        assert!(denied(&p.decide(
            &ctx("t"),
            &Payload::new(r#"{"opts": {"mode": "rw"}}"#)
        )));
        assert!(denied(&p.decide(
            &ctx("t"),
            &Payload::new(r#"{"items": ["ok", "bad"]}"#)
        )));
        assert!(!denied(
            &p.decide(&ctx("t"), &Payload::new(r#"{"items": ["bad"]}"#))
        ));
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(ToolPolicy::init(r#"{"rules": [{"argument": "a", "action": "block"}]}"#).is_err());
        assert!(ToolPolicy::init(
            r#"{"rules": [{"argument": "a", "operator": "regex", "value": "(", "action": "block"}]}"#
        )
        .is_err());
        assert!(ToolPolicy::init(r#"{"rulez": []}"#).is_err());
    }
}
