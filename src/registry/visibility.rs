//! Which catalog entries a caller sees: the filter-list plugins of the chains that match
//! [`METHOD`] decide, per principal, group and scope, one version at a time (each with its
//! own labels). What a caller cannot see it cannot read
//! (a 404, as if absent) nor install (refused).

use std::collections::{HashMap, HashSet};

use crate::plugins::{CallContext, Denied, EntryKind, ListEntry, Plugins};

use super::Catalog;

/// The method filter plugins see for registry reads and installs (what chains match on).
pub const METHOD: &str = "registry/list";

/// Who asks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The authenticated principal (none: anonymous).
    pub principal: Option<&'a str>,
    /// Its groups, from its access token.
    pub groups: &'a [Box<str>],
    /// Its scopes, from its access token.
    pub scopes: &'a [Box<str>],
    /// The profile it reads the registry through (`/mcp/{profile}/v0.1/servers`).
    pub profile: Option<&'a str>,
}

/// What of the catalog a caller may see.
#[derive(Debug, Clone, Default)]
pub enum Visible {
    /// Everything (no filter runs).
    #[default]
    All,
    /// These versions only (server name, version): the filters' answer, so that a version
    /// published after they ran is not shown before they have seen it.
    Only(HashMap<String, HashSet<String>>),
}

impl Visible {
    /// Whether version `version` of server `name` is shown.
    pub fn shows(&self, name: &str, version: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(shown) => shown.get(name).is_some_and(|v| v.contains(version)),
        }
    }

    /// Whether any version of server `name` is shown.
    pub fn shows_any(&self, name: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(shown) => shown.contains_key(name),
        }
    }
}

/// The servers of `catalog` the plugins show `caller`; `Err` when a plugin failed (the
/// caller then sees nothing: fail closed).
pub async fn visible(
    plugins: &Plugins,
    catalog: &Catalog,
    caller: Caller<'_>,
) -> Result<Visible, Denied> {
    let plugins = plugins.current();
    if plugins.is_empty() {
        return Ok(Visible::All);
    }
    let versions = catalog.entries();
    let entries: Vec<ListEntry> = versions
        .iter()
        .map(|e| ListEntry {
            kind: EntryKind::Server,
            name: e.name.clone(),
            description: e.description.clone(),
            labels: e.labels.clone(),
        })
        .collect();
    let ctx = CallContext {
        method: METHOD,
        server: "",
        name: None,
        principal: caller.principal,
        session_id: "",
        profile: caller.profile,
        groups: caller.groups,
        scopes: caller.scopes,
    };
    let shown = plugins.filter_list(&ctx, &entries).await?;
    let mut visible: HashMap<String, HashSet<String>> = HashMap::new();
    for (e, _) in versions.into_iter().zip(shown).filter(|(_, shown)| *shown) {
        visible.entry(e.name).or_default().insert(e.version);
    }
    Ok(Visible::Only(visible))
}
