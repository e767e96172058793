//! OAuth scopes: what a caller was granted, what a request needs, and the hierarchy between them.
//!
//! A granted scope covers itself and every scope below it, `:` separating the levels: `mcp`
//! covers `mcp:tools` and `mcp:tools:call`; `mcp:tools` does not cover `mcp`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::ScopeRule;

/// The scopes a caller holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A static machine token: everything.
    All,
    /// The scopes an access token carries.
    Scopes(Arc<[Box<str>]>),
}

/// Whether `granted` covers `needed`.
pub fn covers(granted: &str, needed: &str) -> bool {
    needed == granted
        || (needed.len() > granted.len()
            && needed.starts_with(granted)
            && needed.as_bytes()[granted.len()] == b':')
}

impl Grant {
    /// The scopes of `needed` this grant does not cover.
    pub fn lacking<'a>(&self, needed: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        match self {
            Grant::All => Vec::new(),
            Grant::Scopes(held) => needed
                .into_iter()
                .filter(|n| !held.iter().any(|g| covers(g, n)))
                .collect(),
        }
    }
}

/// The scope rules, compiled: what each request needs besides the required scopes.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    rules: Vec<(Vec<String>, Vec<wildmatch::WildMatch>, Vec<String>)>,
}

impl Rules {
    pub(crate) fn new(rules: &[ScopeRule]) -> Self {
        Rules {
            rules: rules
                .iter()
                .map(|r| {
                    (
                        r.methods.clone(),
                        r.names
                            .iter()
                            .map(|n| wildmatch::WildMatch::new(n))
                            .collect(),
                        r.scopes.clone(),
                    )
                })
                .collect(),
        }
    }

    /// The scopes a request of `method` with `params` needs (each once, in rule order).
    /// `subscriptions/listen` needs what `resources/subscribe` of each URI it watches needs.
    pub(crate) fn needed<'a>(&'a self, method: &str, params: Option<&[u8]>) -> Vec<&'a str> {
        let mut needed: Vec<&str> = Vec::new();
        if method == "subscriptions/listen" {
            let uris = listened_uris(params);
            for uri in &uris {
                self.add(&mut needed, "resources/subscribe", || {
                    Target::Read(uri.clone())
                });
            }
            self.add(&mut needed, method, || Target::None);
            return needed;
        }
        self.add(&mut needed, method, || target_of(method, params));
        needed
    }

    fn add<'a>(&'a self, needed: &mut Vec<&'a str>, method: &str, target: impl FnOnce() -> Target) {
        let mut target = Some(target);
        let mut read: Option<Target> = None;
        for (methods, names, scopes) in &self.rules {
            if !methods.iter().any(|m| m == method) {
                continue;
            }
            if !names.is_empty() {
                // Read once, and only when a rule narrows by name.
                let t = read.get_or_insert_with(|| target.take().map_or(Target::None, |f| f()));
                // Without a readable target the rule applies: the request cannot be shown to
                // fall outside it.
                if let Target::Read(name) = t
                    && !names.iter().any(|n| n.matches(name))
                {
                    continue;
                }
            }
            for s in scopes {
                if !needed.contains(&s.as_str()) {
                    needed.push(s);
                }
            }
        }
    }
}

/// What a request is about, read the way the router reads it.
enum Target {
    /// The tool or prompt name as clients see it, or the resource URI.
    Read(String),
    /// Nothing to read (or nothing readable).
    None,
}

/// The field the router routes `method` by: `name` for tools and prompts, `uri` for resources,
/// the prompt name or resource URI of a completion's `ref` (by its `type`).
fn target_of(method: &str, params: Option<&[u8]>) -> Target {
    #[derive(Deserialize)]
    struct Fields<'a> {
        #[serde(borrow)]
        name: Option<&'a RawValue>,
        #[serde(borrow)]
        uri: Option<&'a RawValue>,
        #[serde(borrow, rename = "ref")]
        reference: Option<&'a RawValue>,
        #[serde(borrow, rename = "type")]
        kind: Option<&'a RawValue>,
    }
    fn string(raw: Option<&RawValue>) -> Option<String> {
        serde_json::from_str(raw?.get()).ok()
    }
    // A key a lenient server reads as the target's (`Name`, `URI`), or the target given twice:
    // not readable, so every rule that could apply does.
    use crate::mcp::lookalike::check_members;
    let plain = |json: &[u8], owned: &[&str]| check_members(json, owned, "params").ok();
    let read = || -> Option<String> {
        let f: Fields<'_> = serde_json::from_slice(params?).ok()?;
        match method {
            "tools/call" | "prompts/get" => plain(params?, &["name"]).and_then(|()| string(f.name)),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                plain(params?, &["uri"]).and_then(|()| string(f.uri))
            }
            "completion/complete" => {
                plain(params?, &["ref"])?;
                plain(f.reference?.get().as_bytes(), &["type", "name", "uri"])?;
                let r: Fields<'_> = serde_json::from_str(f.reference?.get()).ok()?;
                match string(r.kind)?.as_str() {
                    "ref/prompt" => string(r.name),
                    "ref/resource" => string(r.uri),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    read().map_or(Target::None, Target::Read)
}

/// The resource URIs a `subscriptions/listen` request watches.
fn listened_uris(params: Option<&[u8]>) -> Vec<String> {
    #[derive(Deserialize)]
    struct Listen {
        notifications: Option<Notifications>,
    }
    #[derive(Deserialize)]
    struct Notifications {
        #[serde(rename = "resourceSubscriptions")]
        uris: Option<Vec<String>>,
    }
    params
        .and_then(|p| serde_json::from_slice::<Listen>(p).ok())
        .and_then(|l| l.notifications?.uris)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_a_server_could_read_otherwise_is_not_read() {
        let read = |method, params: &str| match target_of(method, Some(params.as_bytes())) {
            Target::Read(t) => Some(t),
            Target::None => None,
        };
        assert_eq!(
            read("tools/call", r#"{"name":"echo"}"#).as_deref(),
            Some("echo")
        );
        assert_eq!(
            read("tools/call", r#"{"name":"echo","Name":"delete_repo"}"#),
            None
        );
        assert_eq!(
            read("tools/call", r#"{"name":"echo","name":"delete_repo"}"#),
            None
        );
        assert_eq!(
            read("resources/read", r#"{"uri":"a://x","URI":"a://y"}"#),
            None
        );
        let complete = r#"{"ref":{"type":"ref/prompt","name":"p","NAME":"q"}}"#;
        assert_eq!(read("completion/complete", complete), None);
        let complete = r#"{"ref":{"type":"ref/prompt","name":"p"}}"#;
        assert_eq!(read("completion/complete", complete).as_deref(), Some("p"));
    }

    #[test]
    fn a_scope_covers_itself_and_what_is_below_it() {
        assert!(covers("mcp", "mcp"));
        assert!(covers("mcp", "mcp:tools:call"));
        assert!(covers("mcp:tools", "mcp:tools:call"));
        assert!(!covers("mcp:tools", "mcp"));
        assert!(!covers("mcp", "mcpx"));
        assert!(!covers("mcp:tool", "mcp:tools"));
        let grant = Grant::Scopes(vec!["mcp:tools".into()].into());
        assert_eq!(
            grant.lacking(["mcp:tools:call", "mcp:prompts"]),
            ["mcp:prompts"]
        );
        assert!(Grant::All.lacking(["anything"]).is_empty());
    }

    #[test]
    fn rules_apply_by_method_and_name() {
        let rules = Rules::new(&[
            ScopeRule {
                methods: vec!["tools/call".into()],
                names: vec![],
                scopes: vec!["mcp:call".into()],
            },
            ScopeRule {
                methods: vec!["tools/call".into(), "resources/read".into()],
                names: vec!["github__*".into(), "file:///secret/*".into()],
                scopes: vec!["github:write".into(), "mcp:call".into()],
            },
        ]);
        let call = |name: &str| format!(r#"{{"name":"{name}","arguments":{{}}}}"#);
        assert_eq!(
            rules.needed("tools/call", Some(call("github__push").as_bytes())),
            ["mcp:call", "github:write"]
        );
        assert_eq!(
            rules.needed("tools/call", Some(call("ex__echo").as_bytes())),
            ["mcp:call"]
        );
        assert_eq!(
            rules.needed("resources/read", Some(br#"{"uri":"file:///secret/k"}"#)),
            ["github:write", "mcp:call"]
        );
        assert!(
            rules
                .needed("resources/read", Some(br#"{"uri":"file:///pub"}"#))
                .is_empty()
        );
        // A name the rule cannot read is not a way around it.
        assert_eq!(
            rules.needed("resources/read", Some(br#"{"uri":7}"#)),
            ["github:write", "mcp:call"]
        );
        assert!(rules.needed("tools/list", None).is_empty());
        // Decoys: the field the router does not read does not count.
        assert_eq!(
            rules.needed(
                "tools/call",
                Some(br#"{"name":"github__push","ref":{"type":"ref/prompt","name":"ex__echo"},"uri":"x"}"#)
            ),
            ["mcp:call", "github:write"]
        );
        assert_eq!(
            rules.needed(
                "resources/read",
                Some(br#"{"name":"pub","uri":"file:///secret/k"}"#)
            ),
            ["github:write", "mcp:call"]
        );
    }

    #[test]
    fn completions_and_listens_need_what_their_targets_need() {
        let rules = Rules::new(&[
            ScopeRule {
                methods: vec!["completion/complete".into()],
                names: vec!["secret*".into()],
                scopes: vec!["s".into()],
            },
            ScopeRule {
                methods: vec!["resources/subscribe".into()],
                names: vec!["file:///secret/*".into()],
                scopes: vec!["watch:secret".into()],
            },
        ]);
        let complete = |r: &str| format!(r#"{{"ref":{r},"argument":{{"name":"a","value":"b"}}}}"#);
        assert_eq!(
            rules.needed(
                "completion/complete",
                Some(
                    complete(r#"{"type":"ref/resource","name":"public","uri":"secret://x"}"#)
                        .as_bytes()
                )
            ),
            ["s"]
        );
        assert!(
            rules
                .needed(
                    "completion/complete",
                    Some(
                        complete(r#"{"type":"ref/prompt","name":"public","uri":"secret://x"}"#)
                            .as_bytes()
                    )
                )
                .is_empty()
        );
        let listen = |uris: &str| {
            format!(r#"{{"notifications":{{"tools":true,"resourceSubscriptions":{uris}}}}}"#)
        };
        assert_eq!(
            rules.needed(
                "subscriptions/listen",
                Some(listen(r#"["file:///pub","file:///secret/k"]"#).as_bytes())
            ),
            ["watch:secret"]
        );
        assert!(
            rules
                .needed(
                    "subscriptions/listen",
                    Some(listen(r#"["file:///pub"]"#).as_bytes())
                )
                .is_empty()
        );
    }
}
