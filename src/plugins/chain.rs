//! Chains: which plugins run, in which order, for which requests.

use super::CallContext;
use super::config::ChainConfig;
use wildmatch::WildMatch;

/// A glob list; empty matches anything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector(Vec<WildMatch>);

impl Selector {
    /// Globs: `*` any run of characters, `?` one character, case-sensitive (compiled once).
    pub(crate) fn new(patterns: &[String]) -> Self {
        Selector(patterns.iter().map(|p| WildMatch::new(p)).collect())
    }

    /// Whether `value` matches (an empty selector matches even `None`).
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        value.is_some_and(|v| self.0.iter().any(|p| p.matches(v)))
    }
}

/// The `tools` globs: a name matches as sent, or as a lenient server may look it up
/// ([`folded_name`](crate::mcp::lookalike::folded_name)) against the glob in lower case, so that
/// `FS_read` or `fs_read ` cannot walk around a chain that selects `fs_*`.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameSelector(Vec<(WildMatch, WildMatch)>);

impl NameSelector {
    pub(crate) fn new(patterns: &[String]) -> Self {
        NameSelector(
            patterns
                .iter()
                .map(|p| (WildMatch::new(p), WildMatch::new(&p.to_lowercase())))
                .collect(),
        )
    }

    pub(crate) fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `value` matches (an empty selector matches even `None`).
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(v) = value else {
            return false;
        };
        if self.0.iter().any(|(written, _)| written.matches(v)) {
            return true;
        }
        let folded = crate::mcp::lookalike::folded_name(v);
        self.0.iter().any(|(_, lower)| lower.matches(&folded))
    }
}

/// A resolved chain: selectors and plugin indices into the set.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub(crate) methods: Selector,
    pub(crate) servers: Selector,
    pub(crate) tools: NameSelector,
    pub(crate) profiles: Selector,
    pub(crate) plugins: Vec<usize>,
}

impl Chain {
    pub(crate) fn new(cfg: &ChainConfig, index_of: impl Fn(&str) -> usize) -> Chain {
        Chain {
            methods: Selector::new(&cfg.methods),
            servers: Selector::new(&cfg.servers),
            tools: NameSelector::new(&cfg.tools),
            profiles: Selector::new(&cfg.profiles),
            plugins: cfg.plugins.iter().map(|n| index_of(n)).collect(),
        }
    }

    /// Whether the chain applies to the request, ignoring the `tools`
    /// selector (listings apply it per entry).
    pub(crate) fn matches_request(&self, ctx: &CallContext<'_>) -> bool {
        self.methods.matches(Some(ctx.method))
            && self.servers.matches(Some(ctx.server))
            && self.profiles.matches(ctx.profile)
    }

    /// Whether the chain applies to the request and its named target.
    pub(crate) fn matches_call(&self, ctx: &CallContext<'_>) -> bool {
        self.matches_request(ctx) && self.tools.matches(ctx.name)
    }

    /// Whether the chain judges what its server says of its own accord (a log line, progress,
    /// a question): it may belong to any call of the server, whatever the chain's `methods`
    /// and `tools` select, so only the server and the profile decide.
    pub(crate) fn matches_server_message(&self, ctx: &CallContext<'_>) -> bool {
        self.servers.matches(Some(ctx.server)) && self.profiles.matches(ctx.profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_selecting_tools_runs_on_every_spelling_a_server_may_read_as_them() {
        let tools = NameSelector::new(&["fs_*".to_owned(), "Exact".to_owned()]);
        for name in [
            "fs_read",
            "FS_read",
            "fs_read ",
            " Fs_Read",
            "fs_read\0anything",
            "Exact",
            "exact",
        ] {
            assert!(tools.matches(Some(name)), "{name:?}");
        }
        for name in ["f_read", "xfs_read", "inexact", ""] {
            assert!(!tools.matches(Some(name)), "{name:?}");
        }
        assert!(!tools.matches(None));
        assert!(NameSelector::new(&[]).matches(None));
    }

    fn glob(pattern: &str, text: &str) -> bool {
        Selector::new(&[pattern.to_owned()]).matches(Some(text))
    }

    fn ctx<'a>(
        method: &'a str,
        name: Option<&'a str>,
        profile: Option<&'a str>,
    ) -> CallContext<'a> {
        CallContext {
            method,
            server: "files",
            name,
            principal: None,
            session_id: "s",
            profile,
            groups: &[],
            scopes: &[],
        }
    }

    #[test]
    fn selectors() {
        let chain = Chain::new(
            &ChainConfig {
                methods: vec!["tools/*".into()],
                servers: vec!["files".into()],
                tools: vec!["fs_*".into()],
                profiles: vec!["dev".into()],
                plugins: vec!["a".into()],
                ..Default::default()
            },
            |_| 0,
        );
        assert!(chain.matches_call(&ctx("tools/call", Some("fs_read"), Some("dev"))));
        assert!(!chain.matches_call(&ctx("tools/call", Some("fs_read"), None)));
        assert!(!chain.matches_call(&ctx("tools/call", Some("shell"), Some("dev"))));
        assert!(!chain.matches_call(&ctx("prompts/get", Some("fs_read"), Some("dev"))));
        assert!(chain.matches_request(&ctx("tools/list", None, Some("dev"))));
        let any = Chain::new(
            &ChainConfig {
                plugins: vec!["a".into()],
                ..Default::default()
            },
            |_| 0,
        );
        assert!(any.matches_call(&ctx("initialize", None, None)));
    }

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*x*", "abxcd"));
        assert!(!glob("abc", "abcd"));
    }
}
