//! Wasm plugins on the request path: security policies and list filters as
//! sandboxed WebAssembly components (WIT package `gatehouse:plugin` in `wit/`).
//!
//! # Using it from the gateway
//!
//! ```ignore
//! let plugins = Plugins::load(&config.plugins)?;      // compile, link, init every plugin
//! let _watch = plugins.watch();                       // hot reload on file change
//!
//! // per request (async, a few µs per plugin):
//! let set = plugins.current();
//! if !set.is_empty() {
//!     let ctx = CallContext { method: "tools/call", server: "files", name: Some("fs_read"),
//!                             principal: Some("alice"), session_id: &sid, profile: None };
//!     match set.on_request(&ctx, arguments_json).await {
//!         Decision::Allow => forward(arguments_json),
//!         Decision::Rewrite(new_args) => forward(&new_args),
//!         Decision::Deny(denied) => reply_error(denied.code, denied.to_string()),
//!     }
//!     // on the way back: set.on_response(&ctx, result_json).await → the same three outcomes
//!     // on tools/list and friends: set.filter_list(&ctx, &entries).await? → keep entries[i] where true
//!     // outside a runtime (tools, tests): set.on_request_blocking(&ctx, arguments_json)
//! }
//! // when a session ends: set.end_session(&sid)
//! ```
//!
//! * [`PluginSet`] is immutable: loaded plugins plus chains. [`Plugins`]
//!   holds the current set behind an atomic pointer ([`arc_swap`]) and swaps
//!   in a new one on reload; calls in flight finish on the set they started on.
//! * Chains ([`ChainConfig`]) select plugins by method, server, tool and
//!   profile. All matching chains run, in config order; a plugin runs at most
//!   once per hook. A deny stops the chain; a rewrite feeds the next plugin.
//! * A call to a tool, prompt or resource (`tools/call`, `prompts/get`,
//!   `resources/read`) first asks the filter-list plugins of the matching
//!   listing (`tools/list`, ...) about that one entry: a hidden entry cannot
//!   be called.
//! * A plugin that traps, runs past its deadline, exceeds its memory limit or
//!   answers malformed output fails only that call: the request is denied
//!   with [`PLUGIN_FAILED`] (or, with `fail_open`, the plugin is skipped).
//!   The instance is dropped and the next call gets a fresh one.
//! * Hook calls are bounded by the plugin's deadline (default 100 ms); a
//!   healthy call takes a few microseconds on a warm instance. A longer one
//!   yields to the async runtime every epoch tick (1 ms), so a plugin that
//!   spins to its deadline does not hold a runtime worker meanwhile.
//!   Instances are reused (up to `max_warm` idle per plugin) and recycled
//!   after `recycle_after` calls.
//!
//! Module map: `config` (serde types and validation), `engine` (the shared
//! wasmtime engine, pooling allocator, epoch ticker, compile cache),
//! `instance` (lifecycle: link, instantiate, warm pool, deadlines, fault
//! classification), `host` (host functions: log, clock, state, WASI view),
//! `state` (the host's key/value store), `reuse` (kept decisions, `reuse_decisions`),
//! `chain` (selectors), `reload`
//! (swapping and the file watcher), `check` (`gatehouse plugin check`).

mod bindings;
mod budget;
mod chain;
mod check;
mod config;
mod engine;
mod error;
mod exported;
mod host;
mod instance;
mod json_text;
pub mod leader;
mod metrics;
mod reload;
mod reuse;
mod state;
mod ticker;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;

pub use check::check;
pub use config::{ByteSize, ChainConfig, EngineConfig, PluginConfig, PluginsConfig};
pub use error::{Fault, FaultKind, PluginError};
pub use exported::Exported;
pub use instance::Hooks;
pub use json_text::JsonText;
pub use metrics::{MetricsSnapshot, PluginMetrics};
pub use reload::{Plugins, Watcher};
pub use state::{
    Action, Asked, DELETION_PAGES_AT_ONCE, Deletions, DeletionsRead, Holder, Joined, Outcome,
    Scope, StateError, StateLimits, StateStore,
};

use budget::Mode;
use chain::Chain;
use instance::{HookAnswer, HookCall, LoadedPlugin};

/// (hits, misses) of the on-disk compile cache in this process.
pub fn compile_cache_stats() -> (usize, usize) {
    engine::cache_stats()
}

/// JSON-RPC error code of a policy denial (unless the plugin chose one). In the
/// implementation-defined range, clear of the codes MCP revisions define (-32002, -32020
/// to -32022, -32042); it was -32020 until MCP 2026-07-28 gave that code to header mismatches.
pub const POLICY_DENIED: i64 = -32030;
/// JSON-RPC error code of a request denied because a plugin failed (was -32021).
pub const PLUGIN_FAILED: i64 = -32031;
/// Most bytes of a plugin's denial reason that reach the client, as its JSON string holds it,
/// and the audit trail, the log and a trace with it: one line, cut on a character boundary
/// with `…` where it was longer.
pub const MAX_REASON_BYTES: usize = 1024;
/// Largest rewrite a plugin may answer (of a call's arguments, a result, a server's message),
/// in bytes: the largest message the gateway reads from an upstream (an HTTP answer, a stdio
/// line). A larger one fails the plugin (-32031).
pub const MAX_REWRITE_BYTES: usize = 64 * 1024 * 1024;

/// The request a hook runs for.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    /// JSON-RPC method (`tools/call`, `tools/list`, `resources/read`, ...).
    pub method: &'a str,
    /// The upstream server (empty when a listing fans out to several).
    pub server: &'a str,
    /// Tool or prompt name as the upstream knows it, or the resource URI.
    pub name: Option<&'a str>,
    /// The authenticated principal.
    pub principal: Option<&'a str>,
    /// The gateway session id.
    pub session_id: &'a str,
    /// The gateway profile.
    pub profile: Option<&'a str>,
    /// The caller's groups (from its access token).
    pub groups: &'a [Box<str>],
    /// The scopes its access token grants.
    pub scopes: &'a [Box<str>],
}

/// What a list entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A tool.
    Tool,
    /// A prompt.
    Prompt,
    /// A resource (name: its URI).
    Resource,
    /// A resource template (name: its URI template).
    ResourceTemplate,
    /// A server entry of a registry listing.
    Server,
}

/// One entry of a listing, as filter-list plugins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// What it is.
    pub kind: EntryKind,
    /// Tool/prompt name, resource URI, or registry server name.
    pub name: String,
    /// Its description, if any.
    pub description: Option<String>,
    /// Labels (annotations, tags).
    pub labels: Vec<String>,
}

/// What the plugin chain decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on unchanged.
    Allow,
    /// Refuse the request (or the response).
    Deny(Denied),
    /// Go on with this JSON text instead (new arguments or new result).
    Rewrite(String),
}

/// A refusal, naming the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by plugin {plugin}: {message}")]
pub struct Denied {
    /// The plugin that refused (or failed).
    pub plugin: Arc<str>,
    /// JSON-RPC error code: the plugin's own, [`POLICY_DENIED`], or
    /// [`PLUGIN_FAILED`].
    pub code: i64,
    /// The reason: a plugin's own on one line, within [`MAX_REASON_BYTES`].
    pub message: String,
    /// Set when the denial comes from a plugin failure, not a decision.
    pub fault: Option<FaultKind>,
}

/// The code a plugin's denial is answered with: its own, unless it is one the protocol or
/// the gateway gives a meaning (a parse error, "method not found", a resource not found,
/// "too busy" that clients retry, the 2026-07-28 header and version errors, a plugin fault, a
/// tool that waits for an operator's approval):
/// a plugin says no, it does not speak for the protocol.
fn denial_code(code: i32) -> i64 {
    // -32040 is the gateway's "tool not approved" (pinning): a client told so waits for an
    // operator, and must not be told so by a plugin.
    let claimed = matches!(
        code,
        -32768..=-32100 | -32022..=-32000 | -32031 | -32040 | -32042 | -32800
    );
    if claimed {
        POLICY_DENIED
    } else {
        i64::from(code)
    }
}

/// What a payload concerns, as the chains' `tools` selectors see it.
#[derive(Clone, Copy)]
enum Concerns {
    /// The context's own target (`name`): chains selecting tools judge it by that name.
    Target,
    /// Some call of the server, which one unknown: every chain for the server judges it.
    AnyCall,
}

/// Whether the caller applies a chain's rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrites {
    /// It does (call arguments, results).
    Applied,
    /// It sends the request as it is: a rewrite is refused.
    Refused,
}

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Request,
    Response,
}

/// State and counters that outlive a [`PluginSet`] across reloads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) state: Arc<StateStore>,
    metrics: DashMap<String, Arc<PluginMetrics>>,
}

impl Shared {
    fn metrics_for(&self, name: &str) -> Arc<PluginMetrics> {
        self.metrics.entry(name.to_string()).or_default().clone()
    }
}

/// Loaded plugins and the chains that use them. Immutable; replace it as a
/// whole (see [`Plugins`]).
#[derive(Debug)]
pub struct PluginSet {
    plugins: Vec<Arc<LoadedPlugin>>,
    chains: Vec<Chain>,
    shared: Arc<Shared>,
    config: PluginsConfig,
}

impl PluginSet {
    /// Validates the config, then compiles, links and initialises every
    /// plugin (compiled code comes from the on-disk cache when possible).
    pub fn load(cfg: &PluginsConfig) -> Result<Arc<PluginSet>, PluginError> {
        Self::build(cfg, Arc::default(), None).map(Arc::new)
    }

    /// A set with no plugins: every hook allows.
    pub fn empty() -> Arc<PluginSet> {
        Arc::new(PluginSet {
            plugins: Vec::new(),
            chains: Vec::new(),
            shared: Arc::default(),
            config: PluginsConfig::default(),
        })
    }

    /// Builds a set, reusing plugins of `previous` whose file and settings
    /// are unchanged (they keep their warm instances).
    pub(crate) fn build(
        cfg: &PluginsConfig,
        shared: Arc<Shared>,
        previous: Option<&PluginSet>,
    ) -> Result<PluginSet, PluginError> {
        cfg.validate()?;
        let mut plugins = Vec::with_capacity(cfg.modules.len());
        if !cfg.modules.is_empty() {
            let runtime = engine::runtime(&cfg.engine)?;
            for p in &cfg.modules {
                let stamp = instance::FileStamp::of(&p.path).ok();
                let bytes = std::fs::read(&p.path).map_err(|source| PluginError::Read {
                    plugin: p.name.clone(),
                    path: p.path.clone(),
                    source,
                })?;
                let sha = engine::sha256_hex(&bytes);
                let reused = previous.and_then(|prev| {
                    prev.plugins
                        .iter()
                        .find(|old| old.same_as(p, &sha))
                        .cloned()
                });
                let plugin = match reused {
                    Some(old) => old,
                    None => {
                        let loaded = LoadedPlugin::from_bytes(
                            runtime,
                            p,
                            &bytes,
                            stamp,
                            shared.state.clone(),
                            shared.metrics_for(&p.name),
                        )?;
                        tracing::info!(
                            plugin = %p.name,
                            path = %p.path.display(),
                            sha256 = %loaded.sha256,
                            hooks = ?loaded.hooks,
                            "plugin loaded"
                        );
                        Arc::new(loaded)
                    }
                };
                plugins.push(plugin);
            }
        }
        let index_of = |name: &str| {
            cfg.modules
                .iter()
                .position(|p| p.name == name)
                .expect("validated: chains name known plugins")
        };
        let chains = cfg.chains.iter().map(|c| Chain::new(c, index_of)).collect();
        Ok(PluginSet {
            plugins,
            chains,
            shared,
            config: cfg.clone(),
        })
    }

    /// True when no chain is configured: every hook allows (the fast path).
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() || self.plugins.is_empty()
    }

    /// The config this set was built from.
    pub fn config(&self) -> &PluginsConfig {
        &self.config
    }

    /// The hooks each plugin implements, by name.
    pub fn plugins(&self) -> Vec<(String, Hooks)> {
        self.plugins
            .iter()
            .map(|p| (p.name.to_string(), p.hooks))
            .collect()
    }

    /// Counters per plugin name (they survive reloads).
    pub fn metrics(&self) -> Vec<(String, MetricsSnapshot)> {
        let mut out: Vec<_> = self
            .shared
            .metrics
            .iter()
            .map(|e| (e.key().clone(), e.value().snapshot()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Idle warm instances of a plugin (for tests and introspection).
    pub fn warm_instances(&self, plugin: &str) -> Option<usize> {
        self.plugins
            .iter()
            .find(|p| &*p.name == plugin)
            .map(|p| p.warm_instances())
    }

    /// The host state store (per-session key/value state of plugins).
    pub fn state(&self) -> &Arc<StateStore> {
        &self.shared.state
    }

    /// Drops the plugins' state for a session; call when it ends.
    pub fn end_session(&self, session_id: &str) {
        self.shared.state.end_session(session_id);
    }

    /// Drops the plugins' state for a session its client deleted: see
    /// [`StateStore::delete_session`].
    pub fn delete_session(&self, session_id: &str) {
        self.shared.state.delete_session(session_id);
    }

    /// A portable session is no longer served here (it idled), though its client may come back
    /// to any replica: see [`StateStore::leave_session`].
    pub fn leave_session(&self, session_id: &str) {
        self.shared.state.leave_session(session_id);
    }

    /// Runs the on-request chain. For a call to a tool, prompt or resource,
    /// first checks that the filter-list plugins let the caller see it.
    pub async fn on_request(&self, ctx: &CallContext<'_>, arguments: &JsonText) -> Decision {
        self.request(ctx, None, arguments, Mode::Async, Rewrites::Applied)
            .await
    }

    /// [`Self::on_request`] for a call whose target's server lists it as the `listed` entries
    /// (a resource: its own entry, or its URI and the template it matches): the filter-list
    /// plugins judge what the caller's listing would show (labels and description too), so
    /// an entry hidden by a label cannot be called either; hidden as any, it is refused.
    pub async fn on_request_listed(
        &self,
        ctx: &CallContext<'_>,
        listed: Option<&[ListEntry]>,
        arguments: &JsonText,
    ) -> Decision {
        self.request(ctx, listed, arguments, Mode::Async, Rewrites::Applied)
            .await
    }

    /// Whether any plugin filters listings (and so judges the targets of calls).
    pub fn filters_lists(&self) -> bool {
        self.plugins.iter().any(|p| p.hooks.filter_list)
    }

    /// [`Self::on_request`], blocking the calling thread (not for runtime workers).
    pub fn on_request_blocking(
        &self,
        ctx: &CallContext<'_>,
        arguments: impl Into<JsonText>,
    ) -> Decision {
        futures_executor::block_on(self.request(
            ctx,
            None,
            &arguments.into(),
            Mode::Blocking,
            Rewrites::Applied,
        ))
    }

    /// Runs the on-request chain over a request the gateway sends as it is (its params are not
    /// the plugins' to change): a plugin that answers `rewrite` is refused, naming it, rather
    /// than have the request go on unchanged as though the plugin had allowed it.
    pub async fn on_request_as_is(
        &self,
        ctx: &CallContext<'_>,
        listed: Option<&[ListEntry]>,
        params: &JsonText,
    ) -> Decision {
        self.request(ctx, listed, params, Mode::Async, Rewrites::Refused)
            .await
    }

    /// Runs the on-response chain over a JSON-RPC result.
    pub async fn on_response(&self, ctx: &CallContext<'_>, result: &JsonText) -> Decision {
        self.run_chain(
            Hook::Response,
            ctx,
            result,
            Mode::Async,
            Rewrites::Applied,
            Concerns::Target,
        )
        .await
    }

    /// Runs the on-response chains over what a server sends a client of its own accord (a log
    /// line, progress, a question) as method `ctx.method`: it may belong to any call of the
    /// server, so every chain for the server and profile judges it, whatever methods and
    /// tools it selects (a redaction of `tools/call` results must not be walked around by
    /// putting a result in a log line).
    pub async fn on_server_message(&self, ctx: &CallContext<'_>, params: &JsonText) -> Decision {
        self.run_chain(
            Hook::Response,
            ctx,
            params,
            Mode::Async,
            Rewrites::Applied,
            Concerns::AnyCall,
        )
        .await
    }

    /// [`Self::on_response`], blocking the calling thread (not for runtime workers).
    pub fn on_response_blocking(
        &self,
        ctx: &CallContext<'_>,
        result: impl Into<JsonText>,
    ) -> Decision {
        futures_executor::block_on(self.run_chain(
            Hook::Response,
            ctx,
            &result.into(),
            Mode::Blocking,
            Rewrites::Applied,
            Concerns::Target,
        ))
    }

    /// Which entries the caller may see (`true` = visible), asking every
    /// filter-list plugin of the chains that match the listing. An entry
    /// hidden by one plugin is not shown to the next. `Err` when a plugin
    /// failed (fail-closed).
    pub async fn filter_list(
        &self,
        ctx: &CallContext<'_>,
        entries: &[ListEntry],
    ) -> Result<Vec<bool>, Denied> {
        self.visible(ctx, entries, Mode::Async).await
    }

    /// [`Self::filter_list`], blocking the calling thread (not for runtime workers).
    pub fn filter_list_blocking(
        &self,
        ctx: &CallContext<'_>,
        entries: &[ListEntry],
    ) -> Result<Vec<bool>, Denied> {
        futures_executor::block_on(self.visible(ctx, entries, Mode::Blocking))
    }

    async fn request(
        &self,
        ctx: &CallContext<'_>,
        listed: Option<&[ListEntry]>,
        arguments: &JsonText,
        mode: Mode,
        rewrites: Rewrites,
    ) -> Decision {
        if self.is_empty() {
            return Decision::Allow;
        }
        if let Some(denied) = self.check_visible(ctx, listed, mode).await {
            return Decision::Deny(denied);
        }
        self.run_chain(
            Hook::Request,
            ctx,
            arguments,
            mode,
            rewrites,
            Concerns::Target,
        )
        .await
    }

    async fn visible(
        &self,
        ctx: &CallContext<'_>,
        entries: &[ListEntry],
        mode: Mode,
    ) -> Result<Vec<bool>, Denied> {
        if self.is_empty() {
            return Ok(vec![true; entries.len()]);
        }
        let hidden = self.hidden_by(ctx, entries, mode).await?;
        Ok(hidden.iter().map(Option::is_none).collect())
    }

    /// For calls to a named target, the single-entry visibility check.
    async fn check_visible(
        &self,
        ctx: &CallContext<'_>,
        listed: Option<&[ListEntry]>,
        mode: Mode,
    ) -> Option<Denied> {
        let kind = match ctx.method {
            "tools/call" => EntryKind::Tool,
            "prompts/get" => EntryKind::Prompt,
            // A resource hidden from a caller can be neither read nor watched.
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                EntryKind::Resource
            }
            _ => return None,
        };
        self.target_hidden(ctx, kind, ctx.name?, listed, mode).await
    }

    /// Whether the caller may use the `kind` entry `name`: a hidden entry is denied, whatever
    /// method reaches it (a completion of a hidden prompt's arguments, say).
    pub async fn check_target(
        &self,
        ctx: &CallContext<'_>,
        kind: EntryKind,
        name: &str,
        listed: Option<&[ListEntry]>,
    ) -> Option<Denied> {
        self.target_hidden(ctx, kind, name, listed, Mode::Async)
            .await
    }

    async fn target_hidden(
        &self,
        ctx: &CallContext<'_>,
        kind: EntryKind,
        name: &str,
        listed: Option<&[ListEntry]>,
        mode: Mode,
    ) -> Option<Denied> {
        // Asked before every call: skip building the one-entry listing when no plugin filters.
        if !self.filters_lists() {
            return None;
        }
        // As listed when the server lists it (a label may be what hides it), else by name.
        let bare = [ListEntry {
            kind,
            name: name.to_string(),
            description: None,
            labels: Vec::new(),
        }];
        for entry in listed.unwrap_or(&bare) {
            let list_method = match entry.kind {
                EntryKind::Tool => "tools/list",
                EntryKind::Prompt => "prompts/list",
                EntryKind::Resource => "resources/list",
                EntryKind::ResourceTemplate => "resources/templates/list",
                EntryKind::Server => "servers/list",
            };
            let list_ctx = CallContext {
                method: list_method,
                name: None,
                ..*ctx
            };
            match self
                .hidden_by(&list_ctx, std::slice::from_ref(entry), mode)
                .await
            {
                Ok(hidden) => {
                    if let Some(i) = hidden[0] {
                        // (The name is the client's: as long as its request, on one line or not.)
                        let name = host::bounded_text(name, MAX_REASON_BYTES);
                        return Some(Denied {
                            plugin: self.plugins[i].name.clone(),
                            code: POLICY_DENIED,
                            message: format!("{name} is not available to this caller"),
                            fault: None,
                        });
                    }
                }
                Err(denied) => return Some(denied),
            }
        }
        None
    }

    /// The first plugin that filters listings (it speaks for them when a call's target cannot
    /// be judged).
    pub fn list_filter(&self) -> Option<Arc<str>> {
        self.plugins
            .iter()
            .find(|p| p.hooks.filter_list)
            .map(|p| p.name.clone())
    }

    /// For each entry, the plugin that hid it, if any.
    async fn hidden_by(
        &self,
        ctx: &CallContext<'_>,
        entries: &[ListEntry],
        mode: Mode,
    ) -> Result<Vec<Option<usize>>, Denied> {
        let mut hidden: Vec<Option<usize>> = vec![None; entries.len()];
        // Plugins in order of first appearance, with the chains that bring them.
        let mut order: Vec<(usize, Vec<&Chain>)> = Vec::new();
        for chain in self.chains.iter().filter(|c| c.matches_request(ctx)) {
            for &i in &chain.plugins {
                if !self.plugins[i].hooks.filter_list {
                    continue;
                }
                match order.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, chains)) => chains.push(chain),
                    None => order.push((i, vec![chain])),
                }
            }
        }
        if order.is_empty() {
            return Ok(hidden);
        }
        for (i, chains) in order {
            let plugin = &self.plugins[i];
            let picked: Vec<usize> = (0..entries.len())
                .filter(|&e| hidden[e].is_none())
                .filter(|&e| {
                    chains
                        .iter()
                        .any(|c| c.tools.is_any() || c.tools.matches(Some(&entries[e].name)))
                })
                .collect();
            if picked.is_empty() {
                continue;
            }
            let labels: Vec<Vec<&str>> = picked
                .iter()
                .map(|&e| entries[e].labels.iter().map(String::as_str).collect())
                .collect();
            let wit_entries: Vec<bindings::ListEntry> = picked
                .iter()
                .zip(&labels)
                .map(|(&e, labels)| to_wit_entry(&entries[e], labels))
                .collect();
            let result = plugin
                .call(ctx, HookCall::FilterList(&wit_entries), mode)
                .await;
            let result = result.and_then(|answer| match answer {
                HookAnswer::Visible(v) if v.len() == picked.len() => Ok(v),
                HookAnswer::Visible(v) => Err(Fault::Malformed(format!(
                    "filter-list answered {} booleans for {} entries",
                    v.len(),
                    picked.len()
                ))),
                HookAnswer::Decision(_) => unreachable!("filter-list answers booleans"),
            });
            match result {
                Ok(visible) => {
                    for (k, &e) in picked.iter().enumerate() {
                        if !visible[k] {
                            hidden[e] = Some(i);
                        }
                    }
                    if visible.iter().any(|v| !v) {
                        plugin.metrics.denials.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(fault) => {
                    if let Some(denied) = self.fault(plugin, fault) {
                        return Err(denied);
                    }
                }
            }
        }
        Ok(hidden)
    }

    /// Runs the request or response chain.
    async fn run_chain(
        &self,
        hook: Hook,
        ctx: &CallContext<'_>,
        payload: &JsonText,
        mode: Mode,
        rewrites: Rewrites,
        concerns: Concerns,
    ) -> Decision {
        if self.is_empty() {
            return Decision::Allow;
        }
        // What the next plugin judges: the payload, or the last rewrite of it.
        let mut input = Cow::Borrowed(payload);
        let mut rewritten: Option<String> = None;
        let mut seen = Seen::default();
        let selected = |c: &&Chain| match concerns {
            Concerns::Target => c.matches_call(ctx),
            Concerns::AnyCall => c.matches_server_message(ctx),
        };
        for chain in self.chains.iter().filter(selected) {
            for &i in &chain.plugins {
                let plugin = &self.plugins[i];
                let implements = match hook {
                    Hook::Request => plugin.hooks.on_request,
                    Hook::Response => plugin.hooks.on_response,
                };
                if !implements || !seen.insert(i) {
                    continue;
                }
                let call = match hook {
                    Hook::Request => HookCall::Request(&input),
                    Hook::Response => HookCall::Response(&input),
                };
                let result = plugin.call(ctx, call, mode).await;
                let result = result.and_then(|answer| match answer {
                    HookAnswer::Visible(_) => {
                        unreachable!("on-request/on-response answer a decision")
                    }
                    HookAnswer::Decision(bindings::Decision::Rewrite(json))
                        if json.len() > MAX_REWRITE_BYTES =>
                    {
                        Err(Fault::Oversized(json.len()))
                    }
                    HookAnswer::Decision(bindings::Decision::Rewrite(json)) => {
                        match serde_json::from_str::<&serde_json::value::RawValue>(&json) {
                            // What a rewrite stands for is an object: a call's arguments, a
                            // result, an error, a message's params. Anything else would go on
                            // to the upstream or the client as something the protocol does not
                            // allow (`"arguments": [1]`, `"result": null`).
                            Ok(raw) if raw.get().starts_with('{') => {
                                Ok(bindings::Decision::Rewrite(json))
                            }
                            Ok(_) => Err(Fault::Malformed(
                                "rewrite is a JSON document but not an object (it stands for \
                                 arguments or a result, which are objects)"
                                    .into(),
                            )),
                            Err(e) => Err(Fault::Malformed(format!(
                                "rewrite is not a JSON document: {e}"
                            ))),
                        }
                    }
                    HookAnswer::Decision(other) => Ok(other),
                });
                match result {
                    Ok(bindings::Decision::Allow) => {}
                    Ok(bindings::Decision::Rewrite(_)) if rewrites == Rewrites::Refused => {
                        plugin.metrics.fault(FaultKind::Malformed);
                        return Decision::Deny(Denied {
                            plugin: plugin.name.clone(),
                            code: PLUGIN_FAILED,
                            message: format!(
                                "rewrote a {} request, whose params the gateway sends as they are (it rewrites only the arguments of tools/call and prompts/get): refused rather than sent unchanged",
                                ctx.method
                            ),
                            fault: Some(FaultKind::Malformed),
                        });
                    }
                    Ok(bindings::Decision::Rewrite(json)) => {
                        plugin.metrics.rewrites.fetch_add(1, Ordering::Relaxed);
                        input = Cow::Owned(JsonText::from(json.as_str()));
                        rewritten = Some(json);
                    }
                    Ok(bindings::Decision::Deny(denial)) => {
                        plugin.metrics.denials.fetch_add(1, Ordering::Relaxed);
                        return Decision::Deny(Denied {
                            plugin: plugin.name.clone(),
                            code: denial.code.map_or(POLICY_DENIED, denial_code),
                            message: host::bounded_text(&denial.message, MAX_REASON_BYTES),
                            fault: None,
                        });
                    }
                    Err(fault) => {
                        if let Some(denied) = self.fault(plugin, fault) {
                            return Decision::Deny(denied);
                        }
                    }
                }
            }
        }
        match rewritten {
            Some(json) => Decision::Rewrite(json),
            None => Decision::Allow,
        }
    }

    /// Counts and logs a fault; the denial, unless the plugin is fail-open and the fault is
    /// not one a request can cause at will: a payload large enough for the plugin's memory
    /// limit or slow enough for its deadline, like a flood that takes every instance, is any
    /// client's (or server's) to send, and skipping the plugin then would let it walk around it.
    fn fault(&self, plugin: &LoadedPlugin, fault: Fault) -> Option<Denied> {
        plugin.metrics.fault(fault.kind());
        if plugin.cfg.fail_open
            && !matches!(
                fault,
                Fault::SessionDeleted
                    | Fault::Busy
                    | Fault::Deadline(_)
                    | Fault::Memory { .. }
                    | Fault::Oversized(_)
            )
        {
            plugin
                .metrics
                .fail_open_skips
                .fetch_add(1, Ordering::Relaxed);
            if let Some(held) = plugin.log_rate.admit() {
                let more = crate::log_rate::held_back(held);
                tracing::warn!(plugin = %plugin.name, "plugin {fault}; skipped (fail_open){more}");
            }
            return None;
        }
        if let Some(held) = plugin.log_rate.admit() {
            let more = crate::log_rate::held_back(held);
            tracing::warn!(plugin = %plugin.name, "plugin {fault}; request denied{more}");
        }
        Some(Denied {
            plugin: plugin.name.clone(),
            code: match fault {
                Fault::Busy => crate::mcp::jsonrpc::code::TOO_BUSY,
                _ => PLUGIN_FAILED,
            },
            message: format!("plugin {} {fault}", plugin.name),
            fault: Some(fault.kind()),
        })
    }
}

/// The plugins already run on one hook (a plugin in several matching chains runs once): a bit
/// each for the first 64, so the usual walk allocates nothing, and a list past those.
#[derive(Default)]
struct Seen {
    low: u64,
    high: Vec<usize>,
}

impl Seen {
    /// Adds `i`; false if it was there.
    fn insert(&mut self, i: usize) -> bool {
        match u32::try_from(i).ok().and_then(|i| 1u64.checked_shl(i)) {
            Some(bit) => {
                let new = self.low & bit == 0;
                self.low |= bit;
                new
            }
            None if self.high.contains(&i) => false,
            None => {
                self.high.push(i);
                true
            }
        }
    }
}

fn to_wit_entry<'a>(e: &'a ListEntry, labels: &'a [&'a str]) -> bindings::ListEntry<'a> {
    bindings::ListEntry {
        kind: match e.kind {
            EntryKind::Tool => bindings::EntryKind::Tool,
            EntryKind::Prompt => bindings::EntryKind::Prompt,
            EntryKind::Resource => bindings::EntryKind::Resource,
            EntryKind::ResourceTemplate => bindings::EntryKind::ResourceTemplate,
            EntryKind::Server => bindings::EntryKind::Server,
        },
        name: &e.name,
        description: e.description.as_deref(),
        labels,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seen_holds_each_index_once_below_and_above_64() {
        let mut seen = super::Seen::default();
        for i in [0, 1, 63, 64, 65, 1000, usize::MAX] {
            assert!(seen.insert(i), "{i} first");
            assert!(!seen.insert(i), "{i} again");
        }
        assert!(seen.insert(2));
        assert_eq!(seen.high, [64, 65, 1000, usize::MAX]);
    }

    #[test]
    fn a_denial_code_the_protocol_claims_becomes_the_policy_code() {
        for claimed in [
            -32700, -32601, -32602, -32002, -32012, -32020, -32022, -32031, -32040, -32042, -32800,
        ] {
            assert_eq!(
                super::denial_code(claimed),
                super::POLICY_DENIED,
                "{claimed}"
            );
        }
        for own in [-32029, -32050, 403, 1] {
            assert_eq!(super::denial_code(own), i64::from(own), "{own}");
        }
    }
}
