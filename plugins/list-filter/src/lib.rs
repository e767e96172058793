//! `list-filter`: which tools, prompts, resources and registry entries a
//! caller may see (and so call).
//!
//! ```json
//! {"rules": [
//!    {"principals": ["alice", "team-*"], "groups": ["eng"], "profiles": ["dev"], "kinds": ["tool"],
//!     "allow": ["fs_*"], "deny": ["*delete*"],
//!     "allow_labels": ["safe"], "deny_labels": ["destructive"]}
//!  ],
//!  "default": "allow"}
//! ```
//! A rule applies to a caller and an entry when its `principals`, `groups`
//! and `scopes` (one of the caller's groups or scopes, from its OAuth access
//! token, matches a glob),
//! `profiles`, `servers` and `kinds` match (absent: any; an anonymous
//! caller has the empty principal, which `*` matches, and no groups). Of the applicable
//! rules, a deny (name glob or label) hides the entry; otherwise, if any of
//! them has allow lists, the entry must match one of those allows; otherwise
//! `default` decides.
use gatehouse_plugin::{
    CallContext, EntryKind, ListEntry, Plugin, export_plugin, glob, parse_config,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    default: Default,
}

#[derive(Deserialize, Default, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Default {
    #[default]
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    principals: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    scopes: Option<Vec<String>>,
    profiles: Option<Vec<String>>,
    servers: Option<Vec<String>>,
    kinds: Option<Vec<Kind>>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow_labels: Vec<String>,
    #[serde(default)]
    deny_labels: Vec<String>,
}

#[derive(Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Tool,
    Prompt,
    Resource,
    ResourceTemplate,
    Server,
}

fn kind_of(k: EntryKind) -> Kind {
    match k {
        EntryKind::Tool => Kind::Tool,
        EntryKind::Prompt => Kind::Prompt,
        EntryKind::Resource => Kind::Resource,
        EntryKind::ResourceTemplate => Kind::ResourceTemplate,
        EntryKind::Server => Kind::Server,
    }
}

/// Whether `value` matches one of `patterns` (absent: any caller). The value is read only
/// when a pattern needs it: each field of the context read is a call to the gateway.
fn any_glob<'a>(patterns: &Option<Vec<String>>, value: impl FnOnce() -> &'a str) -> bool {
    patterns.as_ref().is_none_or(|ps| {
        let value = value();
        ps.iter().any(|p| glob::matches(p, value))
    })
}

/// Whether one of `held` matches one of `patterns` (absent: any caller).
fn any_held<'a>(patterns: &Option<Vec<String>>, held: impl FnOnce() -> &'a [String]) -> bool {
    patterns.as_ref().is_none_or(|ps| {
        held()
            .iter()
            .any(|h| ps.iter().any(|p| glob::matches(p, h)))
    })
}

impl Rule {
    fn applies_to_caller(&self, ctx: &CallContext) -> bool {
        any_glob(&self.principals, || ctx.principal().unwrap_or(""))
            && any_held(&self.groups, || ctx.groups())
            && any_held(&self.scopes, || ctx.scopes())
            && any_glob(&self.profiles, || ctx.profile().unwrap_or(""))
            && any_glob(&self.servers, || ctx.server())
    }

    fn applies_to_entry(&self, entry: &ListEntry) -> bool {
        self.kinds
            .as_ref()
            .is_none_or(|ks| ks.contains(&kind_of(entry.kind)))
    }

    fn denies(&self, e: &ListEntry) -> bool {
        self.deny.iter().any(|p| glob::matches(p, &e.name))
            || e.labels.iter().any(|l| self.deny_labels.contains(l))
    }

    fn has_allows(&self) -> bool {
        !self.allow.is_empty() || !self.allow_labels.is_empty()
    }

    fn allows(&self, e: &ListEntry) -> bool {
        self.allow.iter().any(|p| glob::matches(p, &e.name))
            || e.labels.iter().any(|l| self.allow_labels.contains(l))
    }
}

pub struct ListFilter {
    rules: Vec<Rule>,
    default: Default,
}

impl ListFilter {
    fn visible(&self, rules: &[&Rule], e: &ListEntry) -> bool {
        let applicable = rules.iter().filter(|r| r.applies_to_entry(e));
        let mut any_allow_list = false;
        let mut allowed = false;
        for r in applicable {
            if r.denies(e) {
                return false;
            }
            if r.has_allows() {
                any_allow_list = true;
                allowed |= r.allows(e);
            }
        }
        if any_allow_list {
            allowed
        } else {
            self.default == Default::Allow
        }
    }
}

impl Plugin for ListFilter {
    fn init(config: &str) -> Result<Self, String> {
        let cfg: Config = parse_config(config)?;
        Ok(ListFilter {
            rules: cfg.rules,
            default: cfg.default,
        })
    }

    fn filter_list(&mut self, ctx: &CallContext, entries: &[ListEntry]) -> Vec<bool> {
        let rules: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.applies_to_caller(ctx))
            .collect();
        entries.iter().map(|e| self.visible(&rules, e)).collect()
    }
}

export_plugin!(ListFilter: filter_list);

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(principal: Option<&str>) -> CallContext<'static> {
        let ctx = CallContext::new("tools/list", "files").with_session_id("s");
        match principal {
            Some(p) => ctx.with_principal(p),
            None => ctx,
        }
    }

    fn entry(name: &str, labels: &[&str]) -> ListEntry {
        ListEntry {
            kind: EntryKind::Tool,
            name: name.into(),
            description: None,
            labels: labels.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn allow_deny_labels_per_principal() {
        let mut p = ListFilter::init(
            r#"{"rules": [
                {"deny": ["*delete*"], "deny_labels": ["destructive"]},
                {"principals": ["alice"], "allow": ["fs_*"]},
                {"principals": ["bob"], "allow_labels": ["safe"]}
            ]}"#,
        )
        .unwrap();
        let entries = [
            entry("fs_read", &[]),
            entry("fs_delete", &[]),
            entry("search", &["safe"]),
            entry("wipe", &["destructive", "safe"]),
        ];
        assert_eq!(
            p.filter_list(&ctx(Some("alice")), &entries),
            [true, false, false, false]
        );
        assert_eq!(
            p.filter_list(&ctx(Some("bob")), &entries),
            [false, false, true, false]
        );
        assert_eq!(
            p.filter_list(&ctx(None), &entries),
            [true, false, true, false]
        );
    }

    #[test]
    fn rules_may_select_callers_by_group() {
        let mut p = ListFilter::init(
            r#"{"rules": [{"groups": ["eng*"], "allow": ["deploy"]}], "default": "deny"}"#,
        )
        .unwrap();
        let entries = [entry("deploy", &[])];
        let engineer = ctx(Some("alice")).with_groups(&["staff", "engineering"]);
        assert_eq!(p.filter_list(&engineer, &entries), [true]);
        let other = ctx(Some("bob")).with_groups(&["sales"]);
        assert_eq!(p.filter_list(&other, &entries), [false]);
        assert_eq!(p.filter_list(&ctx(Some("machine")), &entries), [false]);
        let mut p = ListFilter::init(
            r#"{"rules": [{"scopes": ["deploy:*"], "allow": ["deploy"]}], "default": "deny"}"#,
        )
        .unwrap();
        let granted = ctx(Some("carol")).with_scopes(&["mcp", "deploy:prod"]);
        assert_eq!(p.filter_list(&granted, &entries), [true]);
        assert_eq!(p.filter_list(&engineer, &entries), [false]);
    }
}
