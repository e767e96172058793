//! Profiles (virtual servers): a named set of servers and tools, served at `/mcp/{profile}` to
//! the principals, groups and scopes granted it.
//!
//! A profile's caller sees only what the profile lists, with tools renamed and their
//! descriptions, titles and annotations overridden as configured; anything else is unknown to
//! it by every route (tool and prompt names, resource URIs, completion refs, subscriptions), not
//! only hidden from its lists. Profiles are compiled per topology ([`Profile::new`]) so that
//! their lookups are by upstream index, like the router's.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;
use wildmatch::WildMatch;

use crate::auth::{Claims, covers};
use crate::config::profiles::{Grantees, ProfileConfig};
use crate::mcp::jsonrpc;
use crate::mcp::router::Router;

/// What a profile shows of one tool.
#[derive(Debug)]
pub struct ToolView {
    /// The name its callers see, when renamed.
    pub rename: Option<Box<str>>,
    /// Title in place of the server's.
    pub title: Option<String>,
    /// Description in place of the server's.
    pub description: Option<String>,
    /// Annotations merged over the server's.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ToolView {
    /// Whether the listing item needs more than its name changed.
    pub fn rewrites_fields(&self) -> bool {
        self.title.is_some() || self.description.is_some() || self.annotations.is_some()
    }

    /// The listed tool `tool` (a JSON object) as the profile shows it: named `name`, with the
    /// overrides in place. Written member by member (a server's item is never read into
    /// values, whatever its size); `None` if it is not an object.
    pub fn rewrite(&self, tool: &RawValue, name: &str) -> Option<Vec<u8>> {
        let replaced = |key: &str| match key {
            "name" => true,
            "title" => self.title.is_some(),
            "description" => self.description.is_some(),
            "annotations" => self.annotations.is_some(),
            _ => false,
        };
        let mut out = Vec::with_capacity(tool.get().len() + 64);
        out.push(b'{');
        let mut annotations = None;
        jsonrpc::each_member(tool, |key, value| {
            if key == "annotations" {
                annotations = Some(value);
            }
            if !replaced(&key) {
                crate::json_string::put(&mut out, &key);
                out.push(b':');
                out.extend_from_slice(value.get().as_bytes());
                out.push(b',');
            }
        })
        .ok()?;
        let member = |out: &mut Vec<u8>, key: &str, text: &str| {
            crate::json_string::put(out, key);
            out.push(b':');
            crate::json_string::put(out, text);
        };
        member(&mut out, "name", name);
        if let Some(t) = &self.title {
            out.push(b',');
            member(&mut out, "title", t);
        }
        if let Some(d) = &self.description {
            out.push(b',');
            member(&mut out, "description", d);
        }
        if let Some(over) = &self.annotations {
            // Merged over the server's own (when they are an object).
            out.extend_from_slice(b",\"annotations\":{");
            if let Some(theirs) = annotations.filter(|a| a.get().starts_with('{')) {
                jsonrpc::each_member(theirs, |key, value| {
                    if !over.contains_key(&key) {
                        crate::json_string::put(&mut out, &key);
                        out.push(b':');
                        out.extend_from_slice(value.get().as_bytes());
                        out.push(b',');
                    }
                })
                .ok()?;
            }
            for (key, value) in over {
                crate::json_string::put(&mut out, key);
                out.push(b':');
                out.extend_from_slice(value.to_string().as_bytes());
                out.push(b',');
            }
            if out.last() == Some(&b',') {
                out.pop();
            }
            out.push(b'}');
        }
        out.push(b'}');
        Some(out)
    }
}

/// Which tools of a server a profile shows.
struct Tools {
    named: HashMap<Box<str>, Arc<ToolView>>,
    globs: Vec<WildMatch>,
}

/// What a profile shows of one server.
struct Scope {
    tools: Option<Tools>,
    prompts: Option<Vec<WildMatch>>,
    resources: Option<Vec<WildMatch>>,
}

fn globs(patterns: &Option<Vec<String>>) -> Option<Vec<WildMatch>> {
    patterns
        .as_ref()
        .map(|p| p.iter().map(|g| WildMatch::new(g)).collect())
}

/// Whether `uri` has a part a server may resolve to another path than the text says. The
/// query and fragment are checked too: a glob's `*` matches across `?` and `#`, and a server
/// that takes the URI's text as a path (`path.resolve`, `normpath`) reads them as part of it.
fn escapes(uri: &str) -> bool {
    // Encoded separators only in the path: a query's `?ref=feature%2Fx` is a value, not a path
    // a server resolves.
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    uri.contains('\\')
        || uri.to_ascii_lowercase().contains("%00")
        // A NUL or other control character a server may cut at.
        || uri.chars().any(char::is_control)
        || uri
            .split(['/', '?', '#'])
            .any(|seg| seg == "." || seg == "..")
        // `%25`: an encoded `%`, which a server that decodes twice reads as the escape after.
        || ["%2e", "%2f", "%5c", "%25"]
            .iter()
            .any(|bad| path.to_ascii_lowercase().contains(bad))
}

/// Whether `glob` shows the tool or prompt `name`: it matches the name as sent and as a lenient
/// server looks it up (cut at a NUL, trimmed), so that `drop_all\0_read` is not shown by
/// `*_read` to reach `drop_all` on a server that cuts at the NUL.
fn glob_shows(glob: &WildMatch, name: &str) -> bool {
    let cut = name.split('\0').next().unwrap_or_default().trim();
    glob.matches(name) && glob.matches(cut)
}

/// Whether a listing item shows, and how.
pub enum Shown<'a> {
    /// Not in the profile.
    Hidden,
    /// As the server sent it (prefixed as usual).
    AsIs,
    /// A tool with the profile's name and overrides.
    Tool(&'a ToolView),
}

impl Grantees {
    /// Whether a caller with this principal and these claims is granted.
    pub fn admits(&self, principal: Option<&str>, claims: &Claims) -> bool {
        self.everyone
            || principal.is_some_and(|p| self.principals.iter().any(|g| g == p))
            || claims
                .groups
                .iter()
                .any(|g| self.groups.iter().any(|w| **w == **g))
            || self
                .scopes
                .iter()
                .any(|needed| claims.scopes.iter().any(|held| covers(held, needed)))
    }
}

/// A profile compiled over one topology's servers.
pub struct Profile {
    /// Its name.
    pub name: Arc<str>,
    /// By upstream index: what it shows of that server (`None`: not in the profile).
    servers: Box<[Option<Scope>]>,
    /// Renamed tools by the name their callers use: upstream index and the server's name.
    renamed: HashMap<Box<str>, (usize, Box<str>)>,
}

impl Profile {
    /// Compiles `config` over the servers `router` names; servers it lists that the topology
    /// lacks (not defined yet) are absent until a topology has them.
    pub fn new(config: &ProfileConfig, router: &Router) -> Profile {
        let mut servers: Vec<Option<Scope>> = (0..router.len()).map(|_| None).collect();
        let mut renamed = HashMap::new();
        for s in &config.servers {
            let Some(index) = router.index_of(&s.name) else {
                continue;
            };
            let tools = s.tools.as_ref().map(|list| {
                let mut named = HashMap::new();
                let mut globs = Vec::new();
                for t in list {
                    if t.name.contains(['*', '?']) {
                        globs.push(WildMatch::new(&t.name));
                        continue;
                    }
                    if let Some(r) = &t.rename {
                        renamed.insert(Box::from(r.as_str()), (index, Box::from(t.name.as_str())));
                    }
                    named.insert(
                        Box::from(t.name.as_str()),
                        Arc::new(ToolView {
                            rename: t.rename.as_deref().map(Box::from),
                            title: t.title.clone(),
                            description: t.description.clone(),
                            annotations: t.annotations.clone(),
                        }),
                    );
                }
                Tools { named, globs }
            });
            servers[index] = Some(Scope {
                tools,
                prompts: globs(&s.prompts),
                resources: globs(&s.resources),
            });
        }
        Profile {
            name: Arc::from(config.name.as_str()),
            servers: servers.into(),
            renamed,
        }
    }

    /// Whether the profile has any of upstream `index`.
    pub fn serves(&self, index: usize) -> bool {
        self.servers.get(index).is_some_and(Option::is_some)
    }

    fn scope(&self, index: usize) -> Option<&Scope> {
        self.servers.get(index)?.as_ref()
    }

    /// The upstream and the server's own name of the tool its callers call `public`.
    pub fn tool<'a>(&'a self, router: &Router, public: &'a str) -> Option<(usize, &'a str)> {
        if let Some((index, local)) = self.renamed.get(public) {
            return Some((*index, local));
        }
        let (index, local) = router.resolve(public)?;
        match self.shows_tool(index, local) {
            Shown::AsIs | Shown::Tool(ToolView { rename: None, .. }) => Some((index, local)),
            // A renamed tool answers to its new name only.
            Shown::Tool(_) | Shown::Hidden => None,
        }
    }

    /// The upstream and the server's own name of the prompt `public`.
    pub fn prompt<'a>(&self, router: &Router, public: &'a str) -> Option<(usize, &'a str)> {
        let (index, local) = router.resolve(public)?;
        self.shows_prompt(index, local).then_some((index, local))
    }

    /// How the profile shows tool `local` of upstream `index`.
    pub fn shows_tool(&self, index: usize, local: &str) -> Shown<'_> {
        let Some(scope) = self.scope(index) else {
            return Shown::Hidden;
        };
        let Some(tools) = &scope.tools else {
            return Shown::AsIs;
        };
        if let Some(view) = tools.named.get(local) {
            return Shown::Tool(view);
        }
        if tools.globs.iter().any(|g| glob_shows(g, local)) {
            Shown::AsIs
        } else {
            Shown::Hidden
        }
    }

    /// Whether the profile shows prompt `local` of upstream `index`.
    pub fn shows_prompt(&self, index: usize, local: &str) -> bool {
        self.scope(index).is_some_and(|s| {
            s.prompts
                .as_ref()
                .is_none_or(|g| g.iter().any(|g| glob_shows(g, local)))
        })
    }

    /// Whether the profile shows the resource (or resource template) `uri` of upstream `index`.
    /// Under globs, a URI that could name another path once a server normalizes it (dot
    /// segments, encoded dots or slashes, backslashes) is not shown: `*` would match across it.
    pub fn shows_resource(&self, index: usize, uri: &str) -> bool {
        self.scope(index).is_some_and(|s| {
            s.resources
                .as_ref()
                .is_none_or(|g| !escapes(uri) && g.iter().any(|g| g.matches(uri)))
        })
    }

    /// The name a profile's caller sees for tool `local` of upstream `index` (`None`: hidden).
    pub fn public_tool_name<'a>(
        &'a self,
        router: &Router,
        index: usize,
        local: &str,
    ) -> Option<Cow<'a, str>> {
        match self.shows_tool(index, local) {
            Shown::Hidden => None,
            Shown::Tool(ToolView {
                rename: Some(r), ..
            }) => Some(Cow::Borrowed(r)),
            Shown::AsIs | Shown::Tool(_) => Some(Cow::Owned(router.public_name(index, local))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PrefixNames;
    use crate::config::profiles::from_yaml as profile;

    /// A name a server that cuts at a NUL (and trims) reads as another tool or prompt is shown
    /// only if the globs show that one too.
    #[test]
    fn a_glob_shows_a_name_only_as_a_lenient_server_reads_it_too() {
        let cfg = profile(
            r#"
- name: dev
  grant: {groups: [eng]}
  servers:
    - name: files
      tools: [{name: "*_read"}]
      prompts: ["*_p"]
"#,
        )
        .unwrap();
        let router = Router::new(vec!["files".into()], "__".into(), PrefixNames::Always);
        let p = Profile::new(&cfg[0], &router);
        assert_eq!(p.tool(&router, "files__fs_read"), Some((0, "fs_read")));
        assert_eq!(p.tool(&router, "files__drop_all\u{0}_read"), None);
        assert_eq!(p.tool(&router, "files__drop_all \u{0}x_read"), None);
        assert_eq!(
            p.tool(&router, "files__fs_read\u{0}_read"),
            Some((0, "fs_read\u{0}_read"))
        );
        assert_eq!(p.prompt(&router, "files__a_p"), Some((0, "a_p")));
        assert_eq!(p.prompt(&router, "files__secret\u{0}_p"), None);
    }

    #[test]
    fn resolves_only_what_the_profile_lists() {
        let cfg = profile(
            r#"
- name: dev
  grant: {groups: [eng]}
  servers:
    - name: files
      tools:
        - {name: read, rename: read_repo, description: "Reads the repo", annotations: {readOnlyHint: true}}
        - {name: "list_*"}
      prompts: []
      resources: ["file:///repo/*"]
    - name: gh
"#,
        )
        .unwrap();
        let router = Router::new(
            vec!["files".into(), "gh".into(), "secrets".into()],
            "__".into(),
            PrefixNames::Auto,
        );
        let p = Profile::new(&cfg[0], &router);
        assert_eq!(p.tool(&router, "read_repo"), Some((0, "read")));
        // The old name of a renamed tool, an unlisted tool, a server outside: unknown.
        assert_eq!(p.tool(&router, "files__read"), None);
        assert_eq!(p.tool(&router, "files__write"), None);
        assert_eq!(p.tool(&router, "secrets__get"), None);
        assert_eq!(p.tool(&router, "files__list_dir"), Some((0, "list_dir")));
        assert_eq!(p.tool(&router, "gh__anything"), Some((1, "anything")));

        assert_eq!(p.prompt(&router, "files__p"), None);
        assert_eq!(p.prompt(&router, "gh__p"), Some((1, "p")));
        assert!(p.shows_resource(0, "file:///repo/a"));
        assert!(
            p.shows_resource(0, "file:///repo/a?rev=1..5#L10"),
            "dots that are not a segment"
        );
        assert!(
            p.shows_resource(0, "file:///repo/a?ref=feature%2Fx"),
            "an encoded value"
        );
        assert!(!p.shows_resource(0, "file:///etc/passwd"));
        for sneaky in [
            "file:///repo/../etc/passwd",
            "file:///repo/%2e%2e/etc/passwd",
            "file:///repo/a%2Fb",
            "file:///repo/..",
            "file:///repo/.\\x",
            "file:///repo/x?/../../etc/passwd",
            "file:///repo/x#/../../etc/passwd",
            "file:///repo/x?a=/../secret",
            "file:///repo/x?..",
            // Encoded twice (a server that decodes twice), and cut at a NUL.
            "file:///repo/%252e%252e/%252e%252e/etc/passwd",
            "file:///repo/a%252f..%252fsecret",
            "file:///repo/id_rsa\u{0}.md",
            "file:///repo/a\u{1}",
        ] {
            assert!(!p.shows_resource(0, sneaky), "{sneaky}");
        }
        assert!(!p.shows_resource(2, "file:///repo/a"));
        assert!(p.serves(1) && !p.serves(2));
        assert_eq!(
            p.public_tool_name(&router, 0, "read").as_deref(),
            Some("read_repo")
        );
        let Shown::Tool(view) = p.shows_tool(0, "read") else {
            panic!("read has overrides")
        };
        let rewrite = |item: serde_json::Value| -> serde_json::Value {
            let raw = RawValue::from_string(item.to_string()).unwrap();
            serde_json::from_slice(&view.rewrite(&raw, "read_repo").unwrap()).unwrap()
        };
        let item = rewrite(serde_json::json!({"name": "read", "description": "x",
            "annotations": {"destructiveHint": false, "readOnlyHint": false}, "inputSchema": {"type": "object"}}));
        assert_eq!(
            item,
            serde_json::json!({"name": "read_repo", "description": "Reads the repo",
                "annotations": {"destructiveHint": false, "readOnlyHint": true}, "inputSchema": {"type": "object"}})
        );
        // Annotations that are not an object, a name given twice: the profile's view only.
        let item = rewrite(serde_json::from_str(r#"{"name": "read", "annotations": 3}"#).unwrap());
        assert_eq!(
            item["annotations"],
            serde_json::json!({"readOnlyHint": true})
        );
        let twice = RawValue::from_string(
            r#"{"name":"a","name":"b","description":"x","description":"y"}"#.into(),
        )
        .unwrap();
        let text = String::from_utf8(view.rewrite(&twice, "read_repo").unwrap()).unwrap();
        assert_eq!(text.matches("\"name\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"description\"").count(), 1, "{text}");
        assert!(
            view.rewrite(&RawValue::from_string("[1]".into()).unwrap(), "x")
                .is_none()
        );
    }

    #[test]
    fn grants_by_principal_group_or_covering_scope() {
        let g = Grantees {
            principals: vec!["alice".into()],
            groups: vec!["eng".into()],
            scopes: vec!["mcp:dev".into()],
            ..Default::default()
        };
        let none = Claims::default();
        let claims = |groups: &[&str], scopes: &[&str]| Claims {
            groups: groups.iter().map(|s| Box::from(*s)).collect(),
            scopes: scopes.iter().map(|s| Box::from(*s)).collect(),
            token: None,
        };
        assert!(g.admits(Some("alice"), &none));
        assert!(!g.admits(Some("bob"), &none));
        assert!(!g.admits(None, &none));
        assert!(g.admits(Some("bob"), &claims(&["eng"], &[])));
        assert!(g.admits(Some("bob"), &claims(&[], &["mcp"])));
        assert!(!g.admits(
            Some("bob"),
            &claims(&["engineering"], &["mcp:dev:x", "mcp:de"])
        ));
        assert!(
            Grantees {
                everyone: true,
                ..Default::default()
            }
            .admits(None, &none)
        );
    }
}
