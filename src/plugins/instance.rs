//! Plugin lifecycle: compile once, link once (`InstancePre`), keep warm
//! instances for reuse, and run each hook call under a deadline and a
//! memory limit. A call that fails drops its instance; the next call gets a
//! fresh one.
//!
//! Guest code runs on a wasmtime fiber (`call_async`): at every epoch tick
//! (1 ms) a running call checks its deadline and, when called from the
//! async runtime, yields to it. A plugin that spins until its deadline thus
//! holds a runtime worker for a tick at a time, not for the whole deadline,
//! and other connections keep being served meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crossbeam_queue::ArrayQueue;
use futures_util::FutureExt;
use wasmtime::component::{Component, Resource};
use wasmtime::{Store, StoreContextMut, UpdateDeadline};

use super::bindings::{self, CallHandle, HookSet};
use super::budget::{Budget, Mode};
use super::config::PluginConfig;
use super::engine::Runtime;
use super::error::{Fault, PluginError};
use super::host::HostState;
use super::metrics::PluginMetrics;
use super::reuse::{Answer, Asked, Decisions};
use super::state::{Holder, StateStore};
use super::{CallContext, JsonText};

/// The hooks a plugin implements (answered by its `init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hooks {
    /// `on-request`.
    pub on_request: bool,
    /// `on-response`.
    pub on_response: bool,
    /// `filter-list`.
    pub filter_list: bool,
}

impl From<HookSet> for Hooks {
    fn from(h: HookSet) -> Self {
        Hooks {
            on_request: h.contains(HookSet::ON_REQUEST),
            on_response: h.contains(HookSet::ON_RESPONSE),
            filter_list: h.contains(HookSet::FILTER_LIST),
        }
    }
}

/// Identity of a plugin file, to notice replacement cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) modified: Option<SystemTime>,
    pub(crate) len: u64,
}

impl FileStamp {
    pub(crate) fn of(path: &std::path::Path) -> std::io::Result<FileStamp> {
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

/// Runs at each epoch tick while guest code runs: trap at the deadline,
/// else yield to the runtime (async) or go on (blocking) for one more tick.
/// The deadline is wall-clock time since the call began, waits for a worker
/// after a yield included.
fn on_tick(store: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let budget = store.data().budget;
    if budget.started.elapsed() >= budget.limit {
        return Ok(UpdateDeadline::Interrupt);
    }
    Ok(match budget.mode {
        // tokio's yield puts the task behind the others and lets the worker
        // poll the I/O driver first (a plain self-wake would not).
        Mode::Async => UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())),
        Mode::Blocking => UpdateDeadline::Continue(1),
    })
}

/// One hook call's input (besides its context).
pub(crate) enum HookCall<'a> {
    /// `on-request` over the arguments.
    Request(&'a JsonText),
    /// `on-response` over the result.
    Response(&'a JsonText),
    /// `filter-list` over entries.
    FilterList(&'a [bindings::ListEntry<'a>]),
}

/// The context `init` runs in: no call, so nothing to name (and no owner for session or
/// principal state).
const NO_CALL: CallContext<'static> = CallContext {
    method: "",
    server: "",
    name: None,
    principal: None,
    session_id: "",
    profile: None,
    groups: &[],
    scopes: &[],
};

/// Longest reason for refusing its configuration a plugin's `init` may give, in bytes.
const MAX_INIT_ERROR: usize = 4096;

/// One hook call's answer.
pub(crate) enum HookAnswer {
    /// From `on-request` or `on-response`.
    Decision(bindings::Decision),
    /// From `filter-list`: one boolean per entry.
    Visible(Vec<bool>),
}

impl HookAnswer {
    /// The answer as kept for calls alike, if it may be: a rewrite depends on the payload, and
    /// only a one-entry visibility is kept.
    fn kept(&self) -> Option<Answer> {
        match self {
            HookAnswer::Decision(bindings::Decision::Allow) => Some(Answer::Allow),
            HookAnswer::Decision(bindings::Decision::Deny(denial)) => {
                Some(Answer::Deny(denial.clone()))
            }
            HookAnswer::Decision(bindings::Decision::Rewrite(_)) => None,
            HookAnswer::Visible(shown) => match shown[..] {
                [one] => Some(Answer::Visible(one)),
                _ => None,
            },
        }
    }
}

impl From<Answer> for HookAnswer {
    fn from(answer: Answer) -> HookAnswer {
        match answer {
            Answer::Allow => HookAnswer::Decision(bindings::Decision::Allow),
            Answer::Deny(denial) => HookAnswer::Decision(bindings::Decision::Deny(denial)),
            Answer::Visible(shown) => HookAnswer::Visible(vec![shown]),
        }
    }
}

/// One warm instance.
struct Warm {
    store: Store<HostState>,
    plugin: bindings::Plugin,
    calls: u32,
}

/// A loaded plugin: compiled, linked, validated by one `init`.
pub(crate) struct LoadedPlugin {
    pub(crate) name: Arc<str>,
    pub(crate) cfg: PluginConfig,
    pub(crate) hooks: Hooks,
    pub(crate) sha256: String,
    pub(crate) stamp: Option<FileStamp>,
    config_json: String,
    pre: bindings::PluginPre<HostState>,
    warm: ArrayQueue<Warm>,
    state: Arc<StateStore>,
    pub(crate) metrics: Arc<PluginMetrics>,
    runtime: &'static Runtime,
    /// Answers kept for calls alike (`reuse_decisions`).
    decisions: Option<Decisions>,
    /// WASI's `insecure-seed` for each of its instances.
    seed: u128,
    /// The lines it may have the gateway log (its own, and its faults): as many calls as any
    /// client makes could each log some.
    pub(crate) log_rate: Arc<crate::log_rate::LogRate>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("hooks", &self.hooks)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Compiles and links the plugin, then creates its first instance
    /// (running `init`), which is kept warm.
    pub(crate) fn from_bytes(
        runtime: &'static Runtime,
        cfg: &PluginConfig,
        bytes: &[u8],
        stamp: Option<FileStamp>,
        state: Arc<StateStore>,
        metrics: Arc<PluginMetrics>,
    ) -> Result<LoadedPlugin, PluginError> {
        let sha256 = super::engine::sha256_hex(bytes);
        let component = runtime
            .compile(bytes)
            .map_err(|message| PluginError::Compile {
                plugin: cfg.name.clone(),
                path: cfg.path.clone(),
                message,
            })?;
        let pre = link(runtime, &component).map_err(|message| PluginError::Interface {
            plugin: cfg.name.clone(),
            message,
        })?;
        let mut plugin = LoadedPlugin {
            name: cfg.name.as_str().into(),
            cfg: cfg.clone(),
            hooks: Hooks::default(),
            sha256,
            stamp,
            config_json: cfg.config.to_string(),
            pre,
            warm: ArrayQueue::new(cfg.max_warm.max(1)),
            state,
            metrics,
            runtime,
            decisions: cfg.reuse_decisions.then(Decisions::new),
            seed: random_seed().map_err(|message| PluginError::Interface {
                plugin: cfg.name.clone(),
                message,
            })?,
            log_rate: Arc::new(crate::log_rate::LogRate::new(LOG_LINES_PER_SECOND)),
        };
        let (warm, hooks) = futures_executor::block_on(plugin.instantiate(Mode::Blocking))
            .map_err(|fault| PluginError::Init {
                plugin: cfg.name.clone(),
                fault,
            })?;
        plugin.hooks = hooks;
        let _ = plugin.warm.push(warm);
        Ok(plugin)
    }

    /// A fresh instance with `init` run, under the init deadline.
    async fn instantiate(&self, mode: Mode) -> Result<(Warm, Hooks), Fault> {
        let _running = self.runtime.ticker.enter();
        let mut store = Store::new(
            &self.runtime.engine,
            HostState::new(
                Holder {
                    plugin: self.name.clone(),
                    limits: self.cfg.state_limits(),
                },
                self.state.clone(),
                self.cfg.memory_limit.0 as usize,
                self.seed,
                self.log_rate.clone(),
            ),
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(on_tick);
        store.set_epoch_deadline(1);
        store.data_mut().begin_init(&NO_CALL);
        store.data_mut().budget = Budget::new(self.cfg.init_deadline, mode);
        self.metrics.instances.fetch_add(1, Ordering::Relaxed);
        let plugin = match guard(self.pre.instantiate_async(&mut store)).await? {
            Ok(p) => p,
            Err(e) => return Err(classify(e, &store, Phase::Instantiate, &self.cfg)),
        };
        let init = guard(
            plugin
                .gatehouse_plugin_hooks()
                .call_init(&mut store, &self.config_json),
        )
        .await?;
        let hooks = match init {
            Ok(Ok(set)) => Hooks::from(set),
            // The plugin's own words, logged when a reload is refused: one line, bounded.
            Ok(Err(message)) => {
                let message = super::host::one_line(&message, MAX_INIT_ERROR).into_owned();
                return Err(Fault::InitRejected(message));
            }
            Err(e) => return Err(classify(e, &store, Phase::Init, &self.cfg)),
        };
        Ok((
            Warm {
                store,
                plugin,
                calls: 0,
            },
            hooks,
        ))
    }

    /// Runs one hook call on a warm instance (or a fresh one), under the
    /// call deadline. A failed call drops its instance, and so does a call
    /// dropped before it finished (its future cancelled).
    pub(crate) async fn call(
        &self,
        ctx: &CallContext<'_>,
        input: HookCall<'_>,
        mode: Mode,
    ) -> Result<HookAnswer, Fault> {
        let asked = match input {
            HookCall::Request(_) => Some(Asked::Request),
            HookCall::Response(_) => Some(Asked::Response),
            HookCall::FilterList(entries) => match entries {
                [entry] => Some(Asked::Visible(entry)),
                _ => None,
            },
        };
        self.metrics.calls.fetch_add(1, Ordering::Relaxed);
        let reuse = match (&self.decisions, asked) {
            (Some(decisions), Some(asked)) => match decisions.answer(asked, ctx) {
                Ok(answer) => {
                    self.metrics.reused.fetch_add(1, Ordering::Relaxed);
                    return Ok(HookAnswer::from(answer));
                }
                Err(miss) => Some((decisions, asked, miss)),
            },
            _ => None,
        };
        let _timed = Timed {
            started: std::time::Instant::now(),
            metrics: &self.metrics,
        };
        let _running = self.runtime.ticker.enter();
        let mut warm = match self.warm.pop() {
            Some(w) => w,
            None => self.instantiate(mode).await?.0,
        };
        let payload = match input {
            HookCall::Request(json) | HookCall::Response(json) => Some(json),
            HookCall::FilterList(_) => None,
        };
        warm.store.data_mut().begin_call(ctx, payload);
        warm.store.data_mut().budget = Budget::new(self.cfg.deadline, mode);
        warm.store.set_epoch_deadline(1);
        let hooks = warm.plugin.gatehouse_plugin_hooks();
        let store = &mut warm.store;
        // The handle's number means nothing: the host answers from the call it runs.
        let handle = || Resource::<CallHandle>::new_borrow(0);
        let result = guard(async move {
            match input {
                HookCall::Request(_) => hooks
                    .call_on_request(store, handle())
                    .await
                    .map(HookAnswer::Decision),
                HookCall::Response(_) => hooks
                    .call_on_response(store, handle())
                    .await
                    .map(HookAnswer::Decision),
                HookCall::FilterList(entries) => hooks
                    .call_filter_list(store, handle(), entries)
                    .await
                    .map(HookAnswer::Visible),
            }
        })
        .await?;
        warm.store.data_mut().end_call();
        // A call whose memory growth was refused may have answered from a failed allocation:
        // its instance's history, not the keyed fields.
        let unkeyed =
            warm.store.data().unkeyed.take() || warm.store.data().limits.denied_memory.is_some();
        match result {
            Ok(out) => {
                if let Some((decisions, asked, miss)) = reuse
                    && !unkeyed
                    && let Some(answer) = out.kept()
                {
                    decisions.keep(miss, asked, ctx, answer);
                }
                warm.calls += 1;
                if warm.calls < self.cfg.recycle_after {
                    // A full queue drops the instance, freeing its slot.
                    let _ = self.warm.push(warm);
                }
                Ok(out)
            }
            Err(e) => Err(classify(e, &warm.store, Phase::Call, &self.cfg)),
        }
    }

    /// Instances kept warm right now.
    pub(crate) fn warm_instances(&self) -> usize {
        self.warm.len()
    }

    /// Whether this plugin can stand in for `cfg` unchanged (same file
    /// contents, same settings).
    pub(crate) fn same_as(&self, cfg: &PluginConfig, sha256: &str) -> bool {
        self.cfg == *cfg && self.sha256 == sha256
    }

    pub(crate) fn path(&self) -> &PathBuf {
        &self.cfg.path
    }
}

/// Adds the time a hook call took, however it ended (a cancelled call too), to its plugin's
/// [`PluginMetrics::call_nanos`].
struct Timed<'a> {
    started: std::time::Instant,
    metrics: &'a PluginMetrics,
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        let nanos = self.started.elapsed().as_nanos() as u64;
        self.metrics.call_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// A random `insecure-seed` for a plugin's instances.
fn random_seed() -> Result<u128, String> {
    let mut seed = [0u8; 16];
    getrandom::fill(&mut seed).map_err(|e| format!("no random source: {e}"))?;
    Ok(u128::from_le_bytes(seed))
}

/// Links the component against the host (WASI + gatehouse imports) and
/// checks its exports against the `hooks` interface.
pub(crate) fn link(
    runtime: &Runtime,
    component: &Component,
) -> Result<bindings::PluginPre<HostState>, String> {
    let explain = |e: wasmtime::Error| {
        let mut message = format!("{e:#}");
        if let Some(version) = other_version(runtime, component) {
            message.push_str(&format!(
                " (the component was built against gatehouse:plugin@{version}: rebuild it \
                 against wit/plugin.wit, version {INTERFACE_VERSION}; plugins/README.md says \
                 what changed)"
            ));
        }
        message
    };
    let instance_pre = runtime.linker.instantiate_pre(component).map_err(explain)?;
    bindings::PluginPre::new(instance_pre).map_err(explain)
}

/// The version of `gatehouse:plugin` this gateway implements.
const INTERFACE_VERSION: &str = "0.3.0";

/// Another version of `gatehouse:plugin` the component imports or exports, if any: what to
/// tell its author when it does not link (wasmtime names only the first item it missed).
fn other_version(runtime: &Runtime, component: &Component) -> Option<String> {
    let ty = component.component_type();
    ty.imports(&runtime.engine)
        .chain(ty.exports(&runtime.engine))
        .map(|(name, _)| name)
        .filter_map(|name| name.strip_prefix("gatehouse:plugin/")?.split_once('@'))
        .map(|(_, version)| version)
        .find(|version| *version != INTERFACE_VERSION)
        .map(str::to_string)
}

/// Runs `f`, turning a panic in a host function it reached into a fault
/// of this call (the instance involved is dropped by the caller's `?`).
/// Host functions are written not to panic; this keeps a bug in one of them
/// (or in a library beneath) from unwinding into the request path.
async fn guard<R>(f: impl Future<Output = R>) -> Result<R, Fault> {
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Fault::Trap(format!("host function panicked: {what}"))
        })
}

/// What the guest was doing when an error came back.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Instantiation (start functions, memory and table setup).
    Instantiate,
    /// `init`.
    Init,
    /// A hook call.
    Call,
}

/// Turns a wasmtime error into a [`Fault`]: the limiter's record first
/// (a refused `memory.grow` usually ends in a trap), then the trap code;
/// errors that are not traps are, during a call, answers the host could not
/// lift (bad UTF-8, bad discriminants, out-of-bounds lists) and, during
/// instantiation, resource exhaustion (pool slots).
/// Lines a plugin may have the gateway log a second (its `log` calls and its faults).
const LOG_LINES_PER_SECOND: u32 = 20;

/// Most bytes of a fault's text (it reaches the log and the client's error).
const MAX_FAULT_TEXT: usize = 1024;

fn classify(
    err: wasmtime::Error,
    store: &Store<HostState>,
    phase: Phase,
    cfg: &PluginConfig,
) -> Fault {
    let state = store.data();
    if let Some(asked) = state.limits.denied_memory {
        return Fault::Memory {
            limit: cfg.memory_limit.0 as usize,
            asked,
        };
    }
    match err.downcast_ref::<super::leader::Unavailable>() {
        Some(super::leader::Unavailable::SessionDeleted) => return Fault::SessionDeleted,
        Some(e) => {
            // The client is told the reason; where the leader was, and how reaching it
            // failed, is the operator's to read.
            if let super::leader::Unavailable::Unreachable(why) = e {
                tracing::warn!(why, "plugin state: the leading replica did not answer");
            }
            return Fault::State(e.for_client());
        }
        None => {}
    }
    // Raised by the host, not answered by the guest: the guest did nothing malformed.
    if let Some(refused) = err.downcast_ref::<super::host::Refused>() {
        return Fault::Trap(refused.to_string());
    }
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Fault::Deadline(match phase {
            Phase::Call => cfg.deadline,
            Phase::Instantiate | Phase::Init => cfg.init_deadline,
        }),
        Some(trap) => {
            let mut message = trap.to_string();
            if let Some(output) = state.output.last_lines() {
                message.push_str(": ");
                message.push_str(&output);
            }
            Fault::Trap(super::host::one_line(&message, MAX_FAULT_TEXT).into_owned())
        }
        None if err
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some() =>
        {
            Fault::Busy
        }
        // One bounded line: wasmtime's error carries a backtrace naming the guest's own
        // functions, whose names the plugin chooses (a line break, a forged log record).
        None => {
            let text = super::host::one_line(&format!("{err:#}"), MAX_FAULT_TEXT).into_owned();
            match phase {
                Phase::Call | Phase::Init => Fault::Malformed(text),
                Phase::Instantiate => Fault::Unavailable(text),
            }
        }
    }
}

#[cfg(test)]
mod kept_tests {
    use super::*;

    #[test]
    fn only_an_allow_a_deny_or_a_one_entry_visibility_is_kept() {
        let rewrite = HookAnswer::Decision(bindings::Decision::Rewrite("{}".into()));
        assert!(rewrite.kept().is_none());
        assert!(HookAnswer::Visible(vec![true, false]).kept().is_none());
        assert!(HookAnswer::Visible(vec![]).kept().is_none());
        assert!(matches!(
            HookAnswer::Visible(vec![false]).kept(),
            Some(Answer::Visible(false))
        ));
        assert!(matches!(
            HookAnswer::Decision(bindings::Decision::Allow).kept(),
            Some(Answer::Allow)
        ));
        let deny = HookAnswer::Decision(bindings::Decision::Deny(bindings::Denial {
            code: None,
            message: "no".into(),
        }));
        assert!(matches!(deny.kept(), Some(Answer::Deny(d)) if d.message == "no"));
    }
}
