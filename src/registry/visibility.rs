//! Which catalog entries a caller sees: the filter-list plugins of the chains that match
//! [`METHOD`] decide, per principal, group and scope. What a caller cannot see it cannot read
//! (a 404, as if absent) nor install (refused).

use std::collections::HashSet;

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
}

/// What of the catalog a caller may see.
#[derive(Debug, Clone, Default)]
pub enum Visible {
    /// Everything (no filter runs).
    #[default]
    All,
    /// These servers only: the filters' answer, so that an entry published after they ran is
    /// not shown before they have seen it.
    Only(HashSet<String>),
}

impl Visible {
    /// Whether server `name` is shown.
    pub fn shows(&self, name: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(names) => names.contains(name),
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
    let entries: Vec<ListEntry> = catalog
        .entries()
        .into_iter()
        .map(|(name, description, labels)| ListEntry {
            kind: EntryKind::Server,
            name,
            description,
            labels,
        })
        .collect();
    let ctx = CallContext {
        method: METHOD,
        server: "",
        name: None,
        principal: caller.principal,
        session_id: "",
        profile: None,
        groups: caller.groups,
        scopes: caller.scopes,
    };
    let shown = plugins.filter_list(&ctx, &entries).await?;
    Ok(Visible::Only(
        entries
            .into_iter()
            .zip(shown)
            .filter(|(_, shown)| *shown)
            .map(|(e, _)| e.name)
            .collect(),
    ))
}
