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
    pub(crate) fn needed<'a>(&'a self, method: &str, params: Option<&[u8]>) -> Vec<&'a str> {
        let mut target: Option<Option<String>> = None;
        let mut needed: Vec<&str> = Vec::new();
        for (methods, names, scopes) in &self.rules {
            if !methods.iter().any(|m| m == method) {
                continue;
            }
            if !names.is_empty() {
                // Read once, and only when a rule narrows by name.
                let name = target.get_or_insert_with(|| target_of(params));
                // No readable target: the rule applies (the stricter reading).
                if let Some(name) = name
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
        needed
    }
}

/// `params.name` (a tool or prompt) or `params.uri` (a resource), as the client sent it.
fn target_of(params: Option<&[u8]>) -> Option<String> {
    #[derive(Deserialize)]
    struct Target<'a> {
        #[serde(borrow)]
        name: Option<&'a RawValue>,
        #[serde(borrow)]
        uri: Option<&'a RawValue>,
        #[serde(borrow)]
        r#ref: Option<&'a RawValue>,
    }
    let t: Target<'_> = serde_json::from_slice(params?).ok()?;
    // completion/complete names its prompt or resource template in `ref`.
    if let Some(r) = t.r#ref {
        #[derive(Deserialize)]
        struct Ref {
            name: Option<String>,
            uri: Option<String>,
        }
        let r: Ref = serde_json::from_str(r.get()).ok()?;
        return r.name.or(r.uri);
    }
    serde_json::from_str(t.name.or(t.uri)?.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
