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
    rules: Vec<(Vec<String>, Vec<Glob>, Vec<String>)>,
}

/// One glob of a rule's `names`: as written, and lower-cased for folded tool and prompt names.
#[derive(Debug)]
struct Glob {
    written: wildmatch::WildMatch,
    folded: wildmatch::WildMatch,
}

impl Glob {
    fn new(glob: &str) -> Self {
        Glob {
            written: wildmatch::WildMatch::new(glob),
            folded: wildmatch::WildMatch::new(&glob.to_lowercase()),
        }
    }

    /// Whether a tool or prompt name matches, as sent or folded (see [`folded_name`](crate::mcp::lookalike::folded_name)).
    fn matches_name(&self, name: &str, folded: &str) -> bool {
        self.written.matches(name) || self.folded.matches(folded)
    }
}

impl Rules {
    pub(crate) fn new(rules: &[ScopeRule]) -> Self {
        Rules {
            rules: rules
                .iter()
                .map(|r| {
                    (
                        r.methods.clone(),
                        r.names.iter().map(|n| Glob::new(n)).collect(),
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
                self.add(&mut needed, "resources/subscribe", || Target::uri(uri));
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
                // fall outside it. A name counts as sent and folded; a URI as sent and as a
                // server may resolve it.
                let outside = match t {
                    Target::Read { name, folded } => {
                        !names.iter().any(|n| n.matches_name(name, folded))
                    }
                    Target::Uri(forms) => !forms
                        .iter()
                        .any(|form| names.iter().any(|n| n.written.matches(form))),
                    Target::None => false,
                };
                if outside {
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
    /// The tool or prompt name as clients see it, and folded as a lenient server may look
    /// it up ([`folded_name`](crate::mcp::lookalike::folded_name)).
    Read { name: String, folded: String },
    /// A resource URI: as sent, and as a server that resolves it would read it (when that
    /// differs).
    Uri(Vec<String>),
    /// Nothing to read (or nothing readable).
    None,
}

impl Target {
    /// A tool or prompt name. A rule narrowed by name applies when either form matches:
    /// rules add what a request needs, so a name spelled to miss a rule's glob (`Echo`,
    /// `echo\0`, `echo `) must not miss it where its server finds the tool the rule guards.
    fn name(name: String) -> Target {
        let folded = crate::mcp::lookalike::folded_name(&name);
        Target::Read { name, folded }
    }

    /// A resource URI. A rule narrowed by name applies when either form matches: rules add
    /// what a request needs, so a URI spelled to miss a rule's glob (`file:///pub/../secret/k`,
    /// `FILE:///secret/k`, `file:///s%65cret/k`) must not miss it where its server would read
    /// the file the rule guards.
    fn uri(uri: &str) -> Target {
        let resolved = resolved_uri(uri);
        let mut forms = vec![uri.to_owned()];
        // A file URI's host is not read by every server (Python's `urlparse().path`, Go's
        // `url.Parse().Path`): its path on this machine too.
        let hostless = resolved
            .strip_prefix("file://")
            .filter(|rest| !rest.starts_with('/'))
            .map(|rest| format!("file://{}", &rest[rest.find('/').unwrap_or(rest.len())..]));
        if resolved != uri {
            forms.push(resolved);
        }
        forms.extend(hostless);
        Target::Uri(forms)
    }
}

/// `uri` as a server that resolves URIs may read it: percent-escapes decoded (every one: a
/// form that matches more rules only asks for more), backslashes read as slashes, cut at a NUL,
/// the scheme and authority in lower case, and dot segments of the path removed (RFC 3986
/// §5.2.4).
fn resolved_uri(uri: &str) -> String {
    // As a WHATWG URL parser reads it: tabs and line breaks anywhere dropped, and controls and
    // spaces around it.
    let trimmed = uri.trim_matches(|c: char| c <= ' ');
    let mut text: String = trimmed
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    // Twice encoded (`%252e`) is read by a server that decodes twice; a few rounds at most.
    for _ in 0..3 {
        let decoded = percent_decoded(&text);
        if decoded == text {
            break;
        }
        text = decoded;
    }
    if let Some(nul) = text.find('\0') {
        text.truncate(nul);
    }
    let text = text.replace('\\', "/");
    // The scheme, and the authority after `//`, are case-insensitive.
    let (scheme, rest) = match text.split_once(':') {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            (Some(scheme.to_ascii_lowercase()), rest)
        }
        _ => (None, text.as_str()),
    };
    let (authority, rest) = match rest.strip_prefix("//") {
        Some(after) => {
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            (Some(after[..end].to_lowercase()), &after[end..])
        }
        None => (None, rest),
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let (path, tail) = rest.split_at(end);
    // A file URI names the same file as `file:/x`, `file://localhost/x` and `file:////x`
    // (WHATWG URLs and Node's `fileURLToPath` read all three as `/x`): one spelling.
    let authority = match (scheme.as_deref(), authority) {
        (Some("file"), None) => Some(String::new()),
        (Some("file"), Some(a)) if a == "localhost" => Some(String::new()),
        (_, authority) => authority,
    };
    let rooted;
    let path = if scheme.as_deref() == Some("file") && authority.as_deref() == Some("") {
        rooted = format!("/{}", path.trim_start_matches('/'));
        rooted.as_str()
    } else {
        path
    };
    let mut out = String::with_capacity(text.len());
    if let Some(s) = scheme {
        out.push_str(&s);
        out.push(':');
    }
    if let Some(a) = authority {
        out.push_str("//");
        out.push_str(&a);
    }
    out.push_str(&without_dot_segments(path));
    out.push_str(tail);
    out
}

/// Every `%XX` of `text` decoded (bytes that are no UTF-8 text replaced).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path with its `.` and `..` segments resolved (never above its root).
fn without_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                // The leading empty segment of an absolute path is its root: kept.
                if *seg == ".." && out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    out.join("/")
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
    /// What was read: a name, or a URI.
    enum Read {
        Name(String),
        Uri(String),
    }
    use Read::{Name, Uri};
    let read = || -> Option<Read> {
        let f: Fields<'_> = serde_json::from_slice(params?).ok()?;
        match method {
            "tools/call" | "prompts/get" => {
                plain(params?, &["name"]).and_then(|()| string(f.name).map(Name))
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                plain(params?, &["uri"]).and_then(|()| string(f.uri).map(Uri))
            }
            "completion/complete" => {
                plain(params?, &["ref"])?;
                plain(f.reference?.get().as_bytes(), &["type", "name", "uri"])?;
                let r: Fields<'_> = serde_json::from_str(f.reference?.get()).ok()?;
                match string(r.kind)?.as_str() {
                    "ref/prompt" => string(r.name).map(Name),
                    "ref/resource" => string(r.uri).map(Uri),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    match read() {
        Some(Name(name)) => Target::name(name),
        Some(Uri(uri)) => Target::uri(&uri),
        None => Target::None,
    }
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
            Target::Read { name, .. } => Some(name),
            Target::Uri(mut forms) => Some(forms.swap_remove(0)),
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

    #[test]
    fn a_name_spelled_to_miss_a_rule_does_not() {
        let rules = Rules::new(&[ScopeRule {
            methods: vec![
                "tools/call".into(),
                "prompts/get".into(),
                "completion/complete".into(),
            ],
            names: vec!["echo".into(), "GitHub__*".into()],
            scopes: vec!["guarded".into()],
        }]);
        let call = |method: &str, name: &str| {
            let params = serde_json::json!({ "name": name, "arguments": {} }).to_string();
            rules.needed(method, Some(params.as_bytes()))
        };
        for name in [
            "echo",
            "Echo",
            "ECHO",
            "echo\0",
            "echo\0.anything",
            "echo ",
            " echo",
            "\techo\n",
            " Echo\0",
            "github__push",
            "GITHUB__push",
            " GitHub__push",
        ] {
            assert_eq!(call("tools/call", name), ["guarded"], "{name:?}");
            assert_eq!(call("prompts/get", name), ["guarded"], "{name:?}");
        }
        for name in ["echoes", "ech o", "add", "\0echo", "git__push"] {
            assert!(call("tools/call", name).is_empty(), "{name:?}");
        }
        let complete =
            br#"{"ref":{"type":"ref/prompt","name":"ECHO "},"argument":{"name":"a","value":""}}"#;
        assert_eq!(
            rules.needed("completion/complete", Some(complete)),
            ["guarded"]
        );
        assert_eq!(crate::mcp::lookalike::folded_name(" Echo\0 rest"), "echo");
        // URIs are not folded as names: their case is the resolved form's business.
        let uri_rules = Rules::new(&[ScopeRule {
            methods: vec!["resources/read".into()],
            names: vec!["file:///Secret/*".into()],
            scopes: vec!["secret".into()],
        }]);
        assert!(
            uri_rules
                .needed("resources/read", Some(br#"{"uri":"file:///secret/k"}"#))
                .is_empty()
        );
    }

    #[test]
    fn a_uri_spelled_to_miss_a_rule_does_not() {
        let rules = Rules::new(&[ScopeRule {
            methods: vec![
                "resources/read".into(),
                "resources/subscribe".into(),
                "completion/complete".into(),
            ],
            names: vec!["file:///secret/*".into(), "note://host/key".into()],
            scopes: vec!["secret".into()],
        }]);
        let read = |uri: &str| {
            let params = serde_json::json!({ "uri": uri }).to_string();
            rules.needed("resources/read", Some(params.as_bytes()))
        };
        for uri in [
            "file:///secret/k",
            "file:///pub/../secret/k",
            "file:///pub/./../secret/k",
            "file:///pub/%2e%2e/secret/k",
            "file:///pub/%252e%252e/secret/k",
            "file:///%73ecret/k",
            "FILE:///secret/k",
            "file:///pub\\..\\secret\\k",
            "file:///pub/..%2Fsecret/k",
            // One file, however the URI names it.
            "file://localhost/secret/k",
            "file://LOCALHOST/secret/k",
            "file:/secret/k",
            "file:////secret/k",
            "file://///secret/k",
            "file:secret/k",
            // Read without what a URL parser drops, or without a host some servers ignore.
            "file:///se\tcret/k",
            "file:///secret/\nk",
            " file:///secret/k",
            "\u{1}file:///secret/k ",
            "file://fileserver/secret/k",
            "note://HOST/key",
            "note://host/key%00.txt",
            "note://host/x/../key",
            "note://host/./key",
            // As sent, it matches (a server that does not resolve it reads under secret/).
            "file:///secret/../pub/k",
        ] {
            assert_eq!(read(uri), ["secret"], "{uri}");
        }
        for uri in [
            "file:///pub/k",
            "file:///secret",
            "note://host/keys",
            "note://other/key",
            "file:///pub/a?x=../../secret/k",
            "file://fileserver/pub/k",
        ] {
            assert!(read(uri).is_empty(), "{uri}");
        }
        let listen = br#"{"notifications":{"resourceSubscriptions":["file:///a/../secret/k"]}}"#;
        assert_eq!(
            rules.needed("subscriptions/listen", Some(listen)),
            ["secret"]
        );
        let complete = br#"{"ref":{"type":"ref/resource","uri":"file:///a/../secret/{k}"},"argument":{"name":"k","value":""}}"#;
        assert_eq!(
            rules.needed("completion/complete", Some(complete)),
            ["secret"]
        );
        assert_eq!(resolved_uri("file:///a/b/../../.."), "file:///");
        assert_eq!(resolved_uri("x:a/./b/."), "x:a/b/");
        assert_eq!(resolved_uri("HTTP://Ex.COM/A/%41"), "http://ex.com/A/A");
    }
}
