//! Development kit for Gatehouse plugins.
//!
//! A plugin is a type that implements [`Plugin`] and is exported with
//! [`export_plugin!`], naming the hooks it implements:
//!
//! ```ignore
//! use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin};
//!
//! struct DenyDelete;
//!
//! impl Plugin for DenyDelete {
//!     fn init(_config: &str) -> Result<Self, String> {
//!         Ok(DenyDelete)
//!     }
//!     fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
//!         match ctx.name() {
//!             Some(name) if name.starts_with("delete") => Decision::deny("deleting is not allowed"),
//!             _ => Decision::Allow,
//!         }
//!     }
//! }
//!
//! export_plugin!(DenyDelete: on_request);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm`
//! file is the component the gateway loads. Only the hooks named in
//! `export_plugin!` are called by the gateway; the others keep their default
//! (allow / show everything).
//!
//! Host functions: [`log`], [`clock`], [`state`]. On a non-wasm target (unit
//! tests of a plugin with `cargo test`) they are replaced by in-process
//! stand-ins, so plugin logic can be tested natively.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::gatehouse_plugin::bindings",
    });
}

pub mod glob;

pub use bindings::gatehouse::plugin::types::{Decision, Denial, EntryKind, HookSet, ListEntry};

/// The JSON text a hook judges (a request's arguments, a result), asked of the gateway the
/// first time it is read and kept for the rest of the hook call: a plugin that decides
/// without it never has it copied in, however large.
pub struct Payload<'a> {
    host: Option<&'a HostCall>,
    text: OnceCell<String>,
}

impl<'a> Payload<'a> {
    #[doc(hidden)]
    pub fn from_host(host: &'a HostCall) -> Payload<'a> {
        Payload {
            host: Some(host),
            text: OnceCell::new(),
        }
    }

    /// A payload of this text, for unit tests of a plugin on a native target.
    pub fn new(text: &str) -> Payload<'static> {
        Payload {
            host: None,
            text: OnceCell::from(text.to_string()),
        }
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        self.text
            .get_or_init(|| self.host.map(HostCall::payload).unwrap_or_default())
    }
}

use bindings::gatehouse::plugin::types::CallContext as HostCall;
use std::cell::OnceCell;

/// What `export_plugin!`'s hooks receive from the bindings: the gateway's handle.
#[doc(hidden)]
pub type __HostCall<'a> = &'a HostCall;

/// The request a hook runs for. Each field is asked of the gateway the first time the
/// plugin reads it, then kept for the rest of the hook call: a field never read costs
/// nothing.
pub struct CallContext<'a> {
    host: Option<&'a HostCall>,
    method: OnceCell<String>,
    server: OnceCell<String>,
    name: OnceCell<Option<String>>,
    /// The name as a lenient server looks it up, when that is not the name as written.
    folded_name: OnceCell<Option<String>>,
    principal: OnceCell<Option<String>>,
    session_id: OnceCell<String>,
    profile: OnceCell<Option<String>>,
    groups: OnceCell<Vec<String>>,
    scopes: OnceCell<Vec<String>>,
}

impl<'a> CallContext<'a> {
    #[doc(hidden)]
    pub fn from_host(host: &'a HostCall) -> CallContext<'a> {
        CallContext {
            host: Some(host),
            method: OnceCell::new(),
            server: OnceCell::new(),
            name: OnceCell::new(),
            folded_name: OnceCell::new(),
            principal: OnceCell::new(),
            session_id: OnceCell::new(),
            profile: OnceCell::new(),
            groups: OnceCell::new(),
            scopes: OnceCell::new(),
        }
    }

    /// A context with these values and no others, for unit tests of a plugin on a native
    /// target; the `with_` methods add the rest.
    pub fn new(method: &str, server: &str) -> CallContext<'static> {
        CallContext {
            host: None,
            method: OnceCell::from(method.to_string()),
            server: OnceCell::from(server.to_string()),
            name: OnceCell::from(None),
            folded_name: OnceCell::new(),
            principal: OnceCell::from(None),
            session_id: OnceCell::from(String::new()),
            profile: OnceCell::from(None),
            groups: OnceCell::from(Vec::new()),
            scopes: OnceCell::from(Vec::new()),
        }
    }

    /// The JSON-RPC method (`tools/call`, `tools/list`, ...; `registry/list` for a
    /// registry listing).
    pub fn method(&self) -> &str {
        self.method.get_or_init(|| self.ask(HostCall::method))
    }

    /// The upstream server (empty when the request fans out to several).
    pub fn server(&self) -> &str {
        self.server.get_or_init(|| self.ask(HostCall::server))
    }

    /// The tool or prompt name as the upstream knows it, or the resource URI; none on
    /// listings.
    pub fn name(&self) -> Option<&str> {
        self.name
            .get_or_init(|| self.ask(HostCall::name))
            .as_deref()
    }

    /// The name as a lenient server may look it up ([`glob::fold_name`]), when that is not
    /// the name as written; worked out once per call, however many rules ask.
    pub fn folded_name(&self) -> Option<&str> {
        self.folded_name
            .get_or_init(|| self.name().and_then(glob::fold_name))
            .as_deref()
    }

    /// Who is calling, as the gateway authenticated it; none when anonymous.
    pub fn principal(&self) -> Option<&str> {
        self.principal
            .get_or_init(|| self.ask(HostCall::principal))
            .as_deref()
    }

    /// The gateway's MCP session id.
    pub fn session_id(&self) -> &str {
        self.session_id
            .get_or_init(|| self.ask(HostCall::session_id))
    }

    /// The gateway profile (`/mcp/{profile}`), if any.
    pub fn profile(&self) -> Option<&str> {
        self.profile
            .get_or_init(|| self.ask(HostCall::profile))
            .as_deref()
    }

    /// The caller's groups, as its OAuth access token lists them.
    pub fn groups(&self) -> &[String] {
        self.groups.get_or_init(|| self.ask(HostCall::groups))
    }

    /// The scopes the caller's OAuth access token grants.
    pub fn scopes(&self) -> &[String] {
        self.scopes.get_or_init(|| self.ask(HostCall::scopes))
    }

    /// A field from the gateway (a test context has them all already).
    fn ask<T: Default>(&self, field: fn(&HostCall) -> T) -> T {
        self.host.map(field).unwrap_or_default()
    }

    /// Sets the tool or prompt name (or resource URI).
    pub fn with_name(self, name: &str) -> Self {
        CallContext {
            name: OnceCell::from(Some(name.to_string())),
            folded_name: OnceCell::new(),
            ..self
        }
    }

    /// Sets the principal.
    pub fn with_principal(self, principal: &str) -> Self {
        CallContext {
            principal: OnceCell::from(Some(principal.to_string())),
            ..self
        }
    }

    /// Sets the session id.
    pub fn with_session_id(self, session_id: &str) -> Self {
        CallContext {
            session_id: OnceCell::from(session_id.to_string()),
            ..self
        }
    }

    /// Sets the profile.
    pub fn with_profile(self, profile: &str) -> Self {
        CallContext {
            profile: OnceCell::from(Some(profile.to_string())),
            ..self
        }
    }

    /// Sets the groups.
    pub fn with_groups(self, groups: &[&str]) -> Self {
        CallContext {
            groups: OnceCell::from(groups.iter().map(|g| g.to_string()).collect::<Vec<_>>()),
            ..self
        }
    }

    /// Sets the scopes.
    pub fn with_scopes(self, scopes: &[&str]) -> Self {
        CallContext {
            scopes: OnceCell::from(scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            ..self
        }
    }
}
pub use serde_json;

/// A Gatehouse plugin. One value lives in each instance of the component;
/// the gateway may run several instances of a plugin at once and recycle
/// them at any time, so keep state that must be shared or must last in
/// [`state`].
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its configuration (JSON text; `null` when the
    /// gateway config gives none). An error fails loading the plugin.
    fn init(config: &str) -> Result<Self, String>;

    /// Before a request goes upstream, over its arguments.
    fn on_request(&mut self, ctx: &CallContext, arguments: &Payload) -> Decision {
        let _ = (ctx, arguments);
        Decision::Allow
    }

    /// Before a response goes back to the client, over its result.
    fn on_response(&mut self, ctx: &CallContext, result: &Payload) -> Decision {
        let _ = (ctx, result);
        Decision::Allow
    }

    /// Which entries of a listing the caller may see, one boolean per entry.
    fn filter_list(&mut self, ctx: &CallContext, entries: &[ListEntry]) -> Vec<bool> {
        let _ = ctx;
        vec![true; entries.len()]
    }
}

impl Decision {
    /// A denial with the gateway's default error code.
    pub fn deny(message: impl Into<String>) -> Decision {
        Decision::Deny(Denial {
            code: None,
            message: message.into(),
        })
    }

    /// A denial with a JSON-RPC error code of the plugin's choice.
    pub fn deny_with_code(code: i32, message: impl Into<String>) -> Decision {
        Decision::Deny(Denial {
            code: Some(code),
            message: message.into(),
        })
    }

    /// Replaces the arguments (on-request) or the result (on-response).
    pub fn rewrite(json: &serde_json::Value) -> Decision {
        Decision::Rewrite(json.to_string())
    }
}

/// Parses a plugin's JSON configuration into `T`; `null` gives `T::default()`.
pub fn parse_config<T>(config: &str) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + Default,
{
    let trimmed = config.trim();
    if trimmed.is_empty() || trimmed == "null" {
        return Ok(T::default());
    }
    serde_json::from_str(trimmed).map_err(|e| format!("invalid configuration: {e}"))
}

/// Exports a [`Plugin`] type as the component's `hooks`, naming the hooks it
/// implements: any of `on_request`, `on_response`, `filter_list`.
///
/// ```ignore
/// export_plugin!(MyPlugin: on_request, on_response);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty : $($hook:ident),* $(,)?) => {
        const _: () = {
            struct __GatehouseExport;

            ::std::thread_local! {
                static __GATEHOUSE_PLUGIN: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            fn __with_plugin<R>(f: impl FnOnce(&mut $plugin) -> R) -> R {
                __GATEHOUSE_PLUGIN.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let plugin = slot.as_mut().expect("gatehouse plugin: hook called before init");
                    f(plugin)
                })
            }

            impl $crate::bindings::exports::gatehouse::plugin::hooks::Guest for __GatehouseExport {
                fn init(config: ::std::string::String)
                    -> ::core::result::Result<$crate::HookSet, ::std::string::String>
                {
                    let plugin = <$plugin as $crate::Plugin>::init(&config)?;
                    __GATEHOUSE_PLUGIN.with(|cell| *cell.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok($crate::HookSet::empty() $(| $crate::__hook_flag!($hook))*)
                }

                fn on_request(host: $crate::__HostCall<'_>) -> $crate::Decision {
                    let ctx = $crate::CallContext::from_host(host);
                    let arguments = $crate::Payload::from_host(host);
                    __with_plugin(|p| <$plugin as $crate::Plugin>::on_request(p, &ctx, &arguments))
                }

                fn on_response(host: $crate::__HostCall<'_>) -> $crate::Decision {
                    let ctx = $crate::CallContext::from_host(host);
                    let result = $crate::Payload::from_host(host);
                    __with_plugin(|p| <$plugin as $crate::Plugin>::on_response(p, &ctx, &result))
                }

                fn filter_list(
                    ctx: $crate::__HostCall<'_>,
                    entries: ::std::vec::Vec<$crate::ListEntry>,
                ) -> ::std::vec::Vec<bool> {
                    let ctx = $crate::CallContext::from_host(ctx);
                    __with_plugin(|p| <$plugin as $crate::Plugin>::filter_list(p, &ctx, &entries))
                }
            }

            // Native builds (unit tests of a plugin) skip the component exports.
            #[cfg(target_family = "wasm")]
            $crate::bindings::__export_plugin_world!(__GatehouseExport with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hook_flag {
    (on_request) => {
        $crate::HookSet::ON_REQUEST
    };
    (on_response) => {
        $crate::HookSet::ON_RESPONSE
    };
    (filter_list) => {
        $crate::HookSet::FILTER_LIST
    };
}

/// Log lines, written to the gateway's log with the plugin's name.
pub mod log {
    #[cfg(target_family = "wasm")]
    fn write(level: crate::bindings::gatehouse::plugin::log::Level, message: &str) {
        crate::bindings::gatehouse::plugin::log::log(level, message);
    }

    #[cfg(not(target_family = "wasm"))]
    fn write(level: crate::bindings::gatehouse::plugin::log::Level, message: &str) {
        eprintln!("[{level:?}] {message}");
    }

    use crate::bindings::gatehouse::plugin::log::Level;

    pub fn debug(message: &str) {
        write(Level::Debug, message)
    }
    pub fn info(message: &str) {
        write(Level::Info, message)
    }
    pub fn warn(message: &str) {
        write(Level::Warn, message)
    }
    pub fn error(message: &str) {
        write(Level::Error, message)
    }
}

/// The host's clocks.
pub mod clock {
    /// Milliseconds since the Unix epoch.
    #[cfg(target_family = "wasm")]
    pub fn now_ms() -> u64 {
        crate::bindings::gatehouse::plugin::clock::now_ms()
    }

    /// Nanoseconds on a monotonic clock.
    #[cfg(target_family = "wasm")]
    pub fn monotonic_ns() -> u64 {
        crate::bindings::gatehouse::plugin::clock::monotonic_ns()
    }

    /// Milliseconds since the Unix epoch.
    #[cfg(not(target_family = "wasm"))]
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Nanoseconds on a monotonic clock.
    #[cfg(not(target_family = "wasm"))]
    pub fn monotonic_ns() -> u64 {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// Key/value state kept by the gateway (see `interface state` in the WIT).
pub mod state {
    pub use crate::bindings::gatehouse::plugin::state::Scope;

    #[cfg(target_family = "wasm")]
    mod imp {
        use super::Scope;
        use crate::bindings::gatehouse::plugin::state as host;

        pub fn get(scope: Scope, key: &str) -> Option<String> {
            host::get(scope, key)
        }
        pub fn set(
            scope: Scope,
            key: &str,
            value: &str,
            ttl_ms: Option<u64>,
        ) -> Result<(), String> {
            host::set(scope, key, value, ttl_ms)
        }
        pub fn remove(scope: Scope, key: &str) {
            host::remove(scope, key)
        }
        pub fn incr(
            scope: Scope,
            key: &str,
            delta: i64,
            ttl_ms: Option<u64>,
        ) -> Result<i64, String> {
            host::incr(scope, key, delta, ttl_ms)
        }
    }

    /// In-process stand-in for native unit tests: one map per scope, no
    /// expiry, owners ignored.
    #[cfg(not(target_family = "wasm"))]
    mod imp {
        use super::Scope;
        use std::cell::RefCell;
        use std::collections::HashMap;

        thread_local! {
            static MAP: RefCell<HashMap<(u8, String), String>> = RefCell::new(HashMap::new());
        }

        fn slot(scope: Scope, key: &str) -> (u8, String) {
            (scope as u8, key.to_string())
        }

        pub fn get(scope: Scope, key: &str) -> Option<String> {
            MAP.with(|m| m.borrow().get(&slot(scope, key)).cloned())
        }
        pub fn set(
            scope: Scope,
            key: &str,
            value: &str,
            _ttl_ms: Option<u64>,
        ) -> Result<(), String> {
            MAP.with(|m| m.borrow_mut().insert(slot(scope, key), value.to_string()));
            Ok(())
        }
        pub fn remove(scope: Scope, key: &str) {
            MAP.with(|m| m.borrow_mut().remove(&slot(scope, key)));
        }
        pub fn incr(
            scope: Scope,
            key: &str,
            delta: i64,
            _ttl_ms: Option<u64>,
        ) -> Result<i64, String> {
            MAP.with(|m| {
                let mut m = m.borrow_mut();
                let entry = m.entry(slot(scope, key)).or_default();
                let value = entry.parse::<i64>().unwrap_or(0).saturating_add(delta);
                *entry = value.to_string();
                Ok(value)
            })
        }
    }

    /// The value of `key` in `scope`, if set and not expired.
    pub fn get(scope: Scope, key: &str) -> Option<String> {
        imp::get(scope, key)
    }

    /// Sets `key` in `scope`, expiring after `ttl_ms` if given.
    pub fn set(scope: Scope, key: &str, value: &str, ttl_ms: Option<u64>) -> Result<(), String> {
        imp::set(scope, key, value, ttl_ms)
    }

    /// Removes `key` from `scope`.
    pub fn remove(scope: Scope, key: &str) {
        imp::remove(scope, key)
    }

    /// Adds `delta` to the counter `key` and returns the new value; `ttl_ms`
    /// starts a fixed window when the counter is created.
    pub fn incr(scope: Scope, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        imp::incr(scope, key, delta, ttl_ms)
    }
}

/// Matching a call's target: a name glob and an optional server glob.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Glob on the tool/prompt name or resource URI (`*` and `?`); none
    /// matches every name.
    #[serde(default)]
    pub tool: Option<String>,
    /// Glob on the upstream server name; none matches every server.
    #[serde(default)]
    pub server: Option<String>,
}

impl Target {
    /// Whether this target matches the context, its name as written: what a rule that
    /// allows uses (a name in another case is not the name it allows).
    pub fn matches(&self, ctx: &CallContext) -> bool {
        let name_ok = match (&self.tool, ctx.name()) {
            (None, _) => true,
            (Some(pattern), Some(name)) => glob::matches(pattern, name),
            (Some(_), None) => false,
        };
        name_ok && self.server_matches(ctx)
    }

    /// Whether this target matches the context, its name as written or as a lenient server
    /// may look it up ([`glob::matches_name`]): what a rule that blocks, limits or taints
    /// uses, so that `FS_read` is not a way around a rule for `fs_*`.
    pub fn matches_leniently(&self, ctx: &CallContext) -> bool {
        let name_ok = match (&self.tool, ctx.name()) {
            (None, _) => true,
            (Some(pattern), Some(name)) => {
                glob::matches_name_folded(pattern, name, ctx.folded_name())
            }
            (Some(_), None) => false,
        };
        name_ok && self.server_matches(ctx)
    }

    fn server_matches(&self, ctx: &CallContext) -> bool {
        self.server
            .as_deref()
            .is_none_or(|pattern| glob::matches(pattern, ctx.server()))
    }
}

/// A list of tool targets written either as plain name globs (`"fetch*"`) or
/// as objects (`{"tool": "fetch*", "server": "web"}`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(from = "Vec<TargetSpec>")]
pub struct Targets(pub Vec<Target>);

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TargetSpec {
    Name(String),
    Target(Target),
}

impl From<Vec<TargetSpec>> for Targets {
    fn from(specs: Vec<TargetSpec>) -> Self {
        Targets(
            specs
                .into_iter()
                .map(|s| match s {
                    TargetSpec::Name(tool) => Target {
                        tool: Some(tool),
                        server: None,
                    },
                    TargetSpec::Target(t) => t,
                })
                .collect(),
        )
    }
}

impl Targets {
    /// Whether any target matches the context ([`Target::matches`]).
    pub fn matches(&self, ctx: &CallContext) -> bool {
        self.0.iter().any(|t| t.matches(ctx))
    }

    /// Whether any target matches the context leniently ([`Target::matches_leniently`]).
    pub fn matches_leniently(&self, ctx: &CallContext) -> bool {
        self.0.iter().any(|t| t.matches_leniently(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(server: &str, name: Option<&str>) -> CallContext<'static> {
        let ctx = CallContext::new("tools/call", server).with_session_id("s");
        match name {
            Some(name) => ctx.with_name(name),
            None => ctx,
        }
    }

    #[test]
    fn targets_accept_both_forms() {
        let t: Targets =
            serde_json::from_str(r#"["fetch*", {"tool": "send", "server": "mail"}]"#).unwrap();
        assert!(t.matches(&ctx("web", Some("fetch_url"))));
        assert!(t.matches(&ctx("mail", Some("send"))));
        assert!(!t.matches(&ctx("other", Some("send"))));
        assert!(!t.matches(&ctx("web", None)));
    }

    #[test]
    fn config_null_is_default() {
        let v: Vec<String> = parse_config("null").unwrap();
        assert!(v.is_empty());
        assert!(parse_config::<Vec<String>>("{").is_err());
    }
}
