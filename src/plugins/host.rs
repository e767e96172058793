//! Host functions: what a plugin may call (WIT imports `log`, `clock`,
//! `state`, and a locked-down WASI), and the per-store data they work on.
//!
//! Lifecycle (stores, instances, deadlines) lives in `instance.rs`; this
//! file only answers the guest's calls.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock, MonotonicClock, WallClock};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::CallHandle;
use super::bindings::gatehouse::plugin::{clock, log, state, types};
use super::budget::{Budget, Mode};
use super::leader::Unavailable;
use super::state::{Action, Asked, Caller, Holder, Outcome, Scope, StateError, StateStore};
use super::{CallContext, JsonText};

/// Longest log line kept from a plugin, in bytes.
const MAX_LOG_LINE: usize = 4096;
/// Most log lines a plugin may write in one call; the rest are dropped.
const MAX_LOG_LINES_PER_CALL: u32 = 64;
/// How much of the guest's stdout/stderr is kept to explain a trap.
const OUTPUT_TAIL_BYTES: usize = 2048;

/// The data of one plugin instance's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and table bounds of this store.
    pub(crate) limits: Limits,
    /// The plugin's name, for logs and state keys, and what it may keep in the state.
    holder: Holder,
    store: Arc<StateStore>,
    /// The running call's context (empty in `init`), answered to the guest's
    /// `call-context` methods and naming the owners of state scopes.
    call: CallFields,
    log_lines: u32,
    /// Whether `init` is running: no call, so no caller whose state the principal scope is.
    in_init: bool,
    /// The last bytes the guest wrote to stdout/stderr (a panic message).
    pub(crate) output: OutputTail,
    /// The running call's deadline (read by the epoch callback).
    pub(crate) budget: Budget,
    /// Whether the running call used more than a reused decision is keyed on (a refused
    /// memory growth, which the guest may see as a failed allocation, is told apart by
    /// `limits.denied_memory`).
    pub(crate) unkeyed: Unkeyed,
    /// The plugin's share of the gateway's log (every instance of it together).
    log_rate: Arc<crate::log_rate::LogRate>,
}

/// Whether the running hook call used anything a reused decision is not keyed on
/// (`reuse.rs`): its payload or session id, the state, a clock, randomness or the log. Shared
/// with the store's WASI clocks and random sources, which set it too.
#[derive(Clone, Default)]
pub(crate) struct Unkeyed(Arc<AtomicBool>);

impl Unkeyed {
    fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether it was set since the last take, clearing it.
    pub(crate) fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// A WASI clock or random source that marks the call using it [`Unkeyed`].
struct Marking<T> {
    inner: T,
    unkeyed: Unkeyed,
}

impl HostWallClock for Marking<WallClock> {
    fn resolution(&self) -> Duration {
        self.inner.resolution()
    }
    fn now(&self) -> Duration {
        self.unkeyed.mark();
        self.inner.now()
    }
}

impl HostMonotonicClock for Marking<MonotonicClock> {
    fn resolution(&self) -> u64 {
        self.inner.resolution()
    }
    fn now(&self) -> u64 {
        self.unkeyed.mark();
        self.inner.now()
    }
}

impl rand_core::TryRng for Marking<Box<dyn rand_core::Rng + Send>> {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.unkeyed.mark();
        Ok(self.inner.next_u32())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.unkeyed.mark();
        Ok(self.inner.next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.unkeyed.mark();
        self.inner.fill_bytes(dst);
        Ok(())
    }
}

impl HostState {
    /// `seed`: WASI's `insecure-seed`, the same for every instance of a plugin (a plugin's
    /// hash maps iterate alike in each, so no instance decides unlike the others).
    pub(crate) fn new(
        holder: Holder,
        store: Arc<StateStore>,
        memory_limit: usize,
        seed: u128,
        log_rate: Arc<crate::log_rate::LogRate>,
    ) -> Self {
        let output = OutputTail::default();
        let unkeyed = Unkeyed::default();
        let marking = |inner| Marking {
            inner,
            unkeyed: unkeyed.clone(),
        };
        // No environment, arguments, files, sockets or stdin: a plugin sees
        // only clocks and randomness from WASI. Its stdout/stderr are kept
        // in a small tail buffer to explain traps.
        let wasi = WasiCtx::builder()
            .wall_clock(Marking {
                inner: WallClock::new(),
                unkeyed: unkeyed.clone(),
            })
            .monotonic_clock(Marking {
                inner: MonotonicClock::new(),
                unkeyed: unkeyed.clone(),
            })
            .secure_random(marking(wasmtime_wasi::random::thread_rng()))
            .insecure_random(marking(wasmtime_wasi::random::thread_rng()))
            .insecure_random_seed(seed)
            .stdout(output.clone())
            .stderr(output.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: resource_table(),
            limits: Limits::new(memory_limit),
            holder,
            store,
            call: CallFields::default(),
            log_lines: 0,
            in_init: false,
            output,
            budget: Budget::new(Duration::ZERO, Mode::Blocking),
            unkeyed,
            log_rate,
        }
    }

    /// Sets the call the next hook runs for (its context and payload, the owners of state
    /// scopes) and resets per-call counters.
    pub(crate) fn begin_call(&mut self, ctx: &CallContext<'_>, payload: Option<&JsonText>) {
        self.in_init = false;
        self.call.set(ctx);
        self.call.payload = payload.cloned();
        self.log_lines = 0;
        self.unkeyed.take();
        self.limits.denied_memory = None;
        self.output.clear();
    }

    /// Sets up the store for `init`: no call, so no session and no principal to own state.
    pub(crate) fn begin_init(&mut self, no_call: &CallContext<'_>) {
        self.begin_call(no_call, None);
        self.in_init = true;
    }

    /// Forgets the call just run: its payload (a slice that would keep the whole request or
    /// answer alive in a warm instance until its next call), its caller's fields, and any field
    /// buffer a large value grew past [`KEPT_FIELD_BYTES`].
    pub(crate) fn end_call(&mut self) {
        self.call.forget();
    }

    /// Why `scope` has no owner now, if it has none the store would not see: `init` runs for
    /// no caller, and a principal scope there would be the anonymous callers' (the session
    /// scope has none either, which the store tells by the empty session id).
    fn no_owner(&self, scope: Scope) -> Option<StateError> {
        (self.in_init && scope == Scope::Principal).then_some(StateError::NoCaller)
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            session: &self.call.session_id,
            principal: self.call.principal.as_deref(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The store's resource limiter: caps linear memory at the plugin's limit
/// and remembers a refusal, so a trap that follows is reported as "memory
/// limit exceeded" rather than as a bare trap.
pub(crate) struct Limits {
    memory_limit: usize,
    /// The bytes of every linear memory of the instance: the limit is the instance's, not each
    /// memory's (a component may hold several).
    memory: usize,
    /// The elements of every table of the instance.
    table_elements: usize,
    /// The size a refused `memory.grow` asked for, in this call.
    pub(crate) denied_memory: Option<usize>,
}

/// Most table elements a plugin may have (function references), every table together.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// A plugin's table of host resources, bounded by [`MAX_RESOURCES`].
fn resource_table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    table
}

/// Most host resources a plugin may hold at once (WASI streams and pollables, the gateway's
/// own handles): a plugin that leaks them each call fails instead of growing the host.
pub(crate) const MAX_RESOURCES: usize = 10_000;

impl Limits {
    fn new(memory_limit: usize) -> Self {
        Limits {
            memory_limit,
            memory: 0,
            table_elements: 0,
            denied_memory: None,
        }
    }
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own maximum the grow fails after this: not counted.
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let total = (self.memory - current.min(self.memory)).saturating_add(desired);
        if total > self.memory_limit {
            self.denied_memory = Some(total);
            return Ok(false);
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let total =
            (self.table_elements - current.min(self.table_elements)).saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        256
    }

    fn memories(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        64
    }
}

// ---- gatehouse:plugin imports ----

/// A call's context, copied into buffers the store keeps between calls (so a warm instance
/// copies without allocating), for the guest to read field by field.
#[derive(Default)]
struct CallFields {
    method: String,
    server: String,
    name: Option<String>,
    principal: Option<String>,
    session_id: String,
    profile: Option<String>,
    groups: Vec<String>,
    scopes: Vec<String>,
    /// Shared with the gateway's buffer: copied only into a guest that asks for it.
    payload: Option<JsonText>,
}

impl CallFields {
    fn set(&mut self, ctx: &CallContext<'_>) {
        copy(&mut self.method, ctx.method);
        copy(&mut self.server, ctx.server);
        copy_option(&mut self.name, ctx.name);
        copy_option(&mut self.principal, ctx.principal);
        copy(&mut self.session_id, ctx.session_id);
        copy_option(&mut self.profile, ctx.profile);
        copy_list(&mut self.groups, ctx.groups);
        copy_list(&mut self.scopes, ctx.scopes);
    }
}

/// The largest field buffer a warm instance keeps between calls; a longer value's buffer is
/// freed after its call (names and URIs are short; a client may send a long one).
const KEPT_FIELD_BYTES: usize = 1024;

impl CallFields {
    fn forget(&mut self) {
        self.payload = None;
        for field in [&mut self.method, &mut self.server, &mut self.session_id] {
            forget(field);
        }
        for kept in [&mut self.name, &mut self.principal, &mut self.profile]
            .into_iter()
            .flatten()
        {
            forget(kept);
        }
        for list in [&mut self.groups, &mut self.scopes] {
            let held: usize = list.iter().map(String::capacity).sum();
            if held > KEPT_FIELD_BYTES {
                *list = Vec::new();
            } else {
                list.iter_mut().for_each(String::clear);
            }
        }
    }
}

/// Empties `field`, freeing its buffer if it grew past [`KEPT_FIELD_BYTES`].
fn forget(field: &mut String) {
    if field.capacity() > KEPT_FIELD_BYTES {
        *field = String::new();
    } else {
        field.clear();
    }
}

fn copy(to: &mut String, from: &str) {
    to.clear();
    to.push_str(from);
}

fn copy_option(to: &mut Option<String>, from: Option<&str>) {
    match (from, to.as_mut()) {
        (Some(from), Some(to)) => copy(to, from),
        (from, _) => *to = from.map(str::to_string),
    }
}

fn copy_list(to: &mut Vec<String>, from: &[Box<str>]) {
    to.truncate(from.len());
    for (i, item) in from.iter().enumerate() {
        match to.get_mut(i) {
            Some(kept) => copy(kept, item),
            None => to.push(item.to_string()),
        }
    }
}

impl types::Host for HostState {}

/// The guest only ever holds a borrowed handle, for the length of one hook call, and the
/// store runs one call at a time: every handle means the running call.
impl types::HostCallContext for HostState {
    fn method(&mut self, _: Resource<CallHandle>) -> String {
        self.call.method.clone()
    }
    fn server(&mut self, _: Resource<CallHandle>) -> String {
        self.call.server.clone()
    }
    fn name(&mut self, _: Resource<CallHandle>) -> Option<String> {
        self.call.name.clone()
    }
    fn principal(&mut self, _: Resource<CallHandle>) -> Option<String> {
        self.call.principal.clone()
    }
    fn session_id(&mut self, _: Resource<CallHandle>) -> String {
        self.unkeyed.mark();
        self.call.session_id.clone()
    }
    fn profile(&mut self, _: Resource<CallHandle>) -> Option<String> {
        self.call.profile.clone()
    }
    fn groups(&mut self, _: Resource<CallHandle>) -> Vec<String> {
        self.call.groups.clone()
    }
    fn scopes(&mut self, _: Resource<CallHandle>) -> Vec<String> {
        self.call.scopes.clone()
    }
    fn payload(&mut self, _: Resource<CallHandle>) -> String {
        self.unkeyed.mark();
        let Some(payload) = &self.call.payload else {
            return String::new();
        };
        match std::str::from_utf8(payload.as_bytes()) {
            Ok(text) => text.to_owned(),
            // Never: a payload is made from text.
            Err(_) => String::from_utf8_lossy(payload.as_bytes()).into_owned(),
        }
    }
    fn drop(&mut self, _: Resource<CallHandle>) -> wasmtime::Result<()> {
        // Never owned by the guest, so never dropped by it; nothing to free either way.
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        self.unkeyed.mark();
        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            return;
        }
        self.log_lines += 1;
        let Some(held) = self.log_rate.admit() else {
            return;
        };
        let message = one_line(&message, MAX_LOG_LINE);
        let message = format!("{message}{}", crate::log_rate::held_back(held));
        let plugin = &*self.holder.plugin;
        match level {
            log::Level::Trace => tracing::trace!(target: "gatehouse::plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "gatehouse::plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "gatehouse::plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "gatehouse::plugin", plugin, "{message}"),
            log::Level::Error => tracing::error!(target: "gatehouse::plugin", plugin, "{message}"),
        }
    }
}

/// A plugin's text as one log line of at most `max` bytes: its control characters escaped
/// (`\n`, `\r`, `\u{1b}`), since a line break in a text log would start a record the plugin
/// wrote in the gateway's name, and a carriage return or a terminal escape would hide the
/// line it is on.
pub(crate) fn one_line(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let head = truncate(s, max);
    if !head.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(head);
    }
    let mut out = String::with_capacity(head.len());
    for c in head.chars() {
        let escaped = escaped(c).then(|| c.escape_default());
        let len = escaped
            .as_ref()
            .map_or(c.len_utf8(), ExactSizeIterator::len);
        if out.len() + len > max {
            break;
        }
        match escaped {
            Some(escaped) => out.extend(escaped),
            None => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether a plugin's character is written escaped where a person reads it: a control
/// character (a line break, a carriage return, a terminal escape), a Unicode line or paragraph
/// separator (a line break to some readers), or a bidirectional override or isolate (which
/// would show the text around it reordered).
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Where a plugin's text was cut.
const CUT: char = '…';

/// A plugin's text as a client reads it (in a JSON-RPC error), and the audit trail, the log
/// and a trace with it: one line ([`escaped`] characters written as `\n`, `\u{1b}`, ...), and
/// at most `max` bytes as a JSON string holds it (a quote or a backslash counts twice), cut on
/// a character boundary with `…` where it was longer. Reads at most what fits, whatever the
/// text's length.
pub(crate) fn bounded_text(s: &str, max: usize) -> String {
    let room = max.saturating_sub(CUT.len_utf8());
    let (mut out, mut cost) = (String::new(), 0);
    // The longest prefix that leaves room for the mark.
    let mut cut_at = None;
    for c in s.chars() {
        let escape = escaped(c).then(|| c.escape_default());
        let piece_cost = match &escape {
            // `\n`, `\u{1b}`: its backslash counts twice in JSON.
            Some(e) => e.len() + 1,
            None if matches!(c, '"' | '\\') => 2,
            None => c.len_utf8(),
        };
        if cut_at.is_none() && cost + piece_cost > room {
            cut_at = Some(out.len());
        }
        if cost + piece_cost > max {
            out.truncate(cut_at.unwrap_or(0));
            out.push(CUT);
            return out;
        }
        match escape {
            Some(e) => out.extend(e),
            None => out.push(c),
        }
        cost += piece_cost;
    }
    out
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> u64 {
        self.unkeyed.mark();
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn monotonic_ns(&mut self) -> u64 {
        self.unkeyed.mark();
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

fn scope(s: state::Scope) -> Scope {
    match s {
        state::Scope::Session => Scope::Session,
        state::Scope::Principal => Scope::Principal,
        state::Scope::Global => Scope::Global,
    }
}

impl HostState {
    /// Runs a state operation for the current call, here or on the leading replica. One that
    /// cannot be run traps the guest: the call fails (closed, unless the plugin fails open)
    /// rather than go on as though it had counted or remembered.
    /// (The future holds no reference to the store data, which is not `Sync`.)
    fn state(
        &self,
        action: Action,
    ) -> impl Future<Output = wasmtime::Result<Outcome>> + Send + 'static {
        let blocking = self.budget.mode == Mode::Blocking;
        // The plugin's deadline cannot interrupt it while it waits here: the wait is bounded
        // by what is left of it.
        let left = self
            .budget
            .limit
            .saturating_sub(self.budget.started.elapsed());
        let store = self.store.clone();
        let asked = Asked {
            plugin: self.holder.plugin.clone(),
            session: self.call.session_id.clone(),
            principal: self.call.principal.clone(),
            action,
            limits: self.holder.limits,
        };
        async move {
            // A replica that leads applies it at once, wherever it is called from.
            if blocking && !store.kept_here() {
                return Err(Unavailable::Blocking.into());
            }
            Ok(store.run(asked, left).await?)
        }
    }
}

/// What a state operation gave, where another was expected: a leader of another version.
fn unexpected(outcome: Outcome) -> wasmtime::Error {
    let what = match outcome {
        Outcome::Value(_) => "a value",
        Outcome::Count(_) => "a count",
        Outcome::Done => "done",
        Outcome::Refused(_) => "a refusal",
        Outcome::SessionDeleted => "a deleted session",
    };
    tracing::warn!("the leading replica answered a plugin state operation with {what}");
    Unavailable::Refused.into()
}

impl state::Host for HostState {
    async fn get(&mut self, s: state::Scope, key: String) -> wasmtime::Result<Option<String>> {
        self.unkeyed.mark();
        let scope = scope(s);
        if self.no_owner(scope).is_some() {
            return Ok(None);
        }
        if !self.store.shared() {
            return Ok(self
                .store
                .get(&self.holder.plugin, scope, self.caller(), &key));
        }
        match self.state(Action::Get { scope, key }).await? {
            Outcome::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    async fn set(
        &mut self,
        s: state::Scope,
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<(), String>> {
        self.unkeyed.mark();
        let scope = scope(s);
        if let Some(e) = self.no_owner(scope) {
            return Ok(Err(e.to_string()));
        }
        if !self.store.shared() {
            return Ok(self
                .store
                .set(
                    &self.holder,
                    scope,
                    self.caller(),
                    &key,
                    value,
                    ttl_ms.map(Duration::from_millis),
                )
                .map_err(|e| e.to_string()));
        }
        let action = Action::Set {
            scope,
            key,
            value,
            ttl_ms,
        };
        match self.state(action).await? {
            Outcome::Done => Ok(Ok(())),
            Outcome::Refused(e) => Ok(Err(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn remove(&mut self, s: state::Scope, key: String) -> wasmtime::Result<()> {
        self.unkeyed.mark();
        let scope = scope(s);
        if self.no_owner(scope).is_some() {
            return Ok(());
        }
        if !self.store.shared() {
            self.store
                .remove(&self.holder.plugin, scope, self.caller(), &key);
            return Ok(());
        }
        match self.state(Action::Remove { scope, key }).await? {
            Outcome::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn incr(
        &mut self,
        s: state::Scope,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<i64, String>> {
        self.unkeyed.mark();
        let scope = scope(s);
        if let Some(e) = self.no_owner(scope) {
            return Ok(Err(e.to_string()));
        }
        if !self.store.shared() {
            return Ok(self
                .store
                .incr(
                    &self.holder,
                    scope,
                    self.caller(),
                    &key,
                    delta,
                    ttl_ms.map(Duration::from_millis),
                )
                .map_err(|e| e.to_string()));
        }
        let action = Action::Incr {
            scope,
            key,
            delta,
            ttl_ms,
        };
        match self.state(action).await? {
            Outcome::Count(n) => Ok(Ok(n)),
            Outcome::Refused(e) => Ok(Err(e)),
            other => Err(unexpected(other)),
        }
    }
}

// ---- guest stdout/stderr ----

/// Keeps the last [`OUTPUT_TAIL_BYTES`] a guest wrote to stdout or stderr;
/// writing never fails, so a chatty guest cannot trap itself this way.
#[derive(Clone, Default)]
pub(crate) struct OutputTail(Arc<Mutex<Vec<u8>>>);

impl OutputTail {
    fn push(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend_from_slice(bytes);
        if buf.len() > OUTPUT_TAIL_BYTES {
            let cut = buf.len() - OUTPUT_TAIL_BYTES;
            buf.drain(..cut);
        }
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The last few non-empty lines written, if any (a panic message or a
    /// Python traceback, usually), joined with ` | `.
    pub(crate) fn last_lines(&self) -> Option<String> {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return None;
        }
        let from = lines.len().saturating_sub(8);
        // It is logged, and told the client, with the fault: one line, as a log line is.
        Some(one_line(&lines[from..].join(" | "), OUTPUT_TAIL_BYTES * 2).into_owned())
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputTail {
    async fn ready(&mut self) {}
}

impl OutputStream for OutputTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// ---- WASI streams and poll without a runtime ----
//
// wasmtime-wasi's synchronous bindings run the blocking stream and poll
// functions through a tokio `block_on`, which panics when the caller is
// itself a tokio task — and the gateway calls hooks from tokio tasks. A
// plugin's only streams are the in-memory stdout/stderr tail above and an
// empty stdin, which never need to wait, so these replacements (linked over
// the originals) do the same work synchronously. Waiting on a pollable
// (a sleep) is refused with a trap: a hook has a few milliseconds at most.

use wasmtime_wasi::p2::bindings::sockets;
use wasmtime_wasi::p2::bindings::sync;
use wasmtime_wasi::p2::bindings::sync::io::{poll as sync_poll, streams as sync_streams};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};

/// Links the WASI a plugin may use: clocks, randomness, environment (empty),
/// exit, stdio (the tail buffer), filesystem types and preopens (none),
/// sockets (all uses denied), and streams/poll/error from the replacements
/// below.
pub(crate) fn add_wasi_to_linker(
    l: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, io, random, sockets};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsView};

    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    random::random::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.random())?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.random())?;
    cli::exit::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    filesystem::preopens::add_to_linker::<_, WasiFilesystem>(l, HostState::filesystem)?;
    sync::filesystem::types::add_to_linker::<_, WasiFilesystem>(l, HostState::filesystem)?;
    io::error::add_to_linker::<_, Table>(l, |s| &mut s.table)?;
    sync_streams::add_to_linker::<_, SyncIo>(l, HostState::sync_io)?;
    sync_poll::add_to_linker::<_, SyncIo>(l, HostState::sync_io)?;
    // Sockets are linked (components built from Python import them) but the
    // context allows no network use, so no socket can be created; the one
    // entry point that would reach a tokio runtime first is replaced.
    sockets::tcp_create_socket::add_to_linker::<_, WasiSockets>(l, HostState::sockets)?;
    sockets::instance_network::add_to_linker::<_, WasiSockets>(l, HostState::sockets)?;
    sockets::network::add_to_linker::<_, WasiSockets>(l, &Default::default(), HostState::sockets)?;
    sockets::ip_name_lookup::add_to_linker::<_, WasiSockets>(l, HostState::sockets)?;
    sync::sockets::tcp::add_to_linker::<_, WasiSockets>(l, HostState::sockets)?;
    sync::sockets::udp::add_to_linker::<_, WasiSockets>(l, HostState::sockets)?;
    sync::sockets::udp_create_socket::add_to_linker::<_, SyncIo>(l, HostState::sync_io)?;
    Ok(())
}

impl sockets::network::Host for SyncIoView<'_> {
    fn convert_error_code(
        &mut self,
        error: wasmtime_wasi::p2::SocketError,
    ) -> wasmtime::Result<sockets::network::ErrorCode> {
        error.downcast()
    }

    fn network_error_code(
        &mut self,
        _err: Res<wasmtime_wasi::p2::bindings::io::error::Error>,
    ) -> wasmtime::Result<Option<sockets::network::ErrorCode>> {
        Ok(None)
    }
}

impl sockets::network::HostNetwork for SyncIoView<'_> {
    fn drop(&mut self, this: Res<sockets::network::Network>) -> wasmtime::Result<()> {
        self.0.delete(this)?;
        Ok(())
    }
}

impl sync::sockets::udp_create_socket::Host for SyncIoView<'_> {
    fn create_udp_socket(
        &mut self,
        _family: sync::sockets::udp::IpAddressFamily,
    ) -> wasmtime_wasi::p2::SocketResult<Res<wasmtime_wasi::p2::UdpSocket>> {
        Err(sockets::network::ErrorCode::AccessDenied.into())
    }
}

/// `HasData` projecting the store data to its resource table.
struct Table;

impl wasmtime::component::HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

/// The largest write `blocking-write-and-flush` accepts (per WASI).
const MAX_BLOCKING_WRITE: usize = 4096;

/// `HasData` for the stream/poll replacements.
pub(crate) struct SyncIo;

impl wasmtime::component::HasData for SyncIo {
    type Data<'a> = SyncIoView<'a>;
}

/// The resource table, seen by the stream/poll replacements.
pub(crate) struct SyncIoView<'a>(&'a mut ResourceTable);

impl HostState {
    pub(crate) fn sync_io(&mut self) -> SyncIoView<'_> {
        SyncIoView(&mut self.table)
    }
}

type Res<T> = wasmtime::component::Resource<T>;

fn table_error(e: wasmtime::component::ResourceTableError) -> StreamError {
    StreamError::Trap(e.into())
}

impl sync_streams::Host for SyncIoView<'_> {
    fn convert_stream_error(
        &mut self,
        err: StreamError,
    ) -> wasmtime::Result<sync_streams::StreamError> {
        sync_streams::Host::convert_stream_error(self.0, err)
    }
}

impl sync_streams::HostOutputStream for SyncIoView<'_> {
    fn drop(&mut self, stream: Res<DynOutputStream>) -> wasmtime::Result<()> {
        self.0.delete(stream)?;
        Ok(())
    }

    fn check_write(&mut self, stream: Res<DynOutputStream>) -> StreamResult<u64> {
        sync_streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Res<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        sync_streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Res<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        if bytes.len() > MAX_BLOCKING_WRITE {
            return Err(StreamError::Trap(refused(
                "buffer too large for blocking-write-and-flush (at most 4096 bytes)",
            )));
        }
        let s = self.0.get_mut(&stream).map_err(table_error)?;
        let mut bytes = Bytes::from(bytes);
        while !bytes.is_empty() {
            let permit = s.check_write()?;
            if permit == 0 {
                return Err(StreamError::Trap(refused(
                    "plugins may not wait on a stream",
                )));
            }
            s.write(bytes.split_to(permit.min(bytes.len())))?;
        }
        s.flush()
    }

    fn flush(&mut self, stream: Res<DynOutputStream>) -> StreamResult<()> {
        sync_streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Res<DynOutputStream>) -> StreamResult<()> {
        self.0.get_mut(&stream).map_err(table_error)?.flush()
    }

    fn subscribe(&mut self, stream: Res<DynOutputStream>) -> wasmtime::Result<Res<DynPollable>> {
        sync_streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Res<DynOutputStream>, len: u64) -> StreamResult<()> {
        sync_streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Res<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_BLOCKING_WRITE {
            return Err(StreamError::Trap(refused(
                "too many zeroes for blocking-write-zeroes-and-flush (at most 4096)",
            )));
        }
        self.blocking_write_and_flush(stream, vec![0; len])
    }

    fn splice(
        &mut self,
        dst: Res<DynOutputStream>,
        src: Res<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        sync_streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Res<DynOutputStream>,
        src: Res<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        sync_streams::HostOutputStream::splice(self.0, dst, src, len)
    }
}

impl sync_streams::HostInputStream for SyncIoView<'_> {
    fn drop(&mut self, stream: Res<DynInputStream>) -> wasmtime::Result<()> {
        self.0.delete(stream)?;
        Ok(())
    }

    fn read(&mut self, stream: Res<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        sync_streams::HostInputStream::read(self.0, stream, len)
    }

    // stdin is empty: a read answers at once (closed).
    fn blocking_read(&mut self, stream: Res<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        sync_streams::HostInputStream::read(self.0, stream, len)
    }

    fn skip(&mut self, stream: Res<DynInputStream>, len: u64) -> StreamResult<u64> {
        sync_streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Res<DynInputStream>, len: u64) -> StreamResult<u64> {
        sync_streams::HostInputStream::skip(self.0, stream, len)
    }

    fn subscribe(&mut self, stream: Res<DynInputStream>) -> wasmtime::Result<Res<DynPollable>> {
        sync_streams::HostInputStream::subscribe(self.0, stream)
    }
}

/// A host call the gateway refuses a plugin (one that would wait, or write too much at once):
/// it ends the hook call as a trap would.
#[derive(Debug, thiserror::Error)]
#[error("the host refused a call: {0}")]
pub(crate) struct Refused(&'static str);

fn refused(why: &'static str) -> wasmtime::Error {
    wasmtime::Error::new(Refused(why))
}

fn no_waiting() -> wasmtime::Error {
    refused("plugins may not block (wasi:io/poll): hooks must answer at once")
}

impl sync_poll::Host for SyncIoView<'_> {
    fn poll(&mut self, _pollables: Vec<Res<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        Err(no_waiting())
    }
}

impl sync_poll::HostPollable for SyncIoView<'_> {
    fn ready(&mut self, _pollable: Res<DynPollable>) -> wasmtime::Result<bool> {
        Err(no_waiting())
    }

    fn block(&mut self, _pollable: Res<DynPollable>) -> wasmtime::Result<()> {
        Err(no_waiting())
    }

    fn drop(&mut self, pollable: Res<DynPollable>) -> wasmtime::Result<()> {
        sync_poll::HostPollable::drop(self.0, pollable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_memory_limit_is_the_instances_whatever_its_memories() {
        const MIB: usize = 1 << 20;
        let mut l = Limits::new(64 * MIB);
        // Two memories of 30 MiB fit; a third does not, nor one of them grown past the rest.
        assert!(l.memory_growing(0, 30 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 30 * MIB, None).unwrap());
        assert!(!l.memory_growing(0, 30 * MIB, None).unwrap());
        assert_eq!(l.denied_memory, Some(90 * MIB));
        assert!(!l.memory_growing(30 * MIB, 40 * MIB, None).unwrap());
        assert!(l.memory_growing(30 * MIB, 34 * MIB, None).unwrap());
        // A grow past a memory's own maximum fails, and counts for nothing.
        assert!(
            !l.memory_growing(34 * MIB, 40 * MIB, Some(35 * MIB))
                .unwrap()
        );
        assert!(l.memory_growing(34 * MIB, 34 * MIB, None).unwrap());
        let mut fresh = Limits::new(64 * MIB);
        assert!(!fresh.memory_growing(0, 60 * MIB, Some(MIB)).unwrap());
        assert!(fresh.memory_growing(0, 60 * MIB, None).unwrap());
        // Tables likewise, every table together.
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(!l.table_growing(0, 1, None).unwrap());
    }

    #[test]
    fn a_plugin_holds_a_bounded_number_of_host_resources() {
        let mut table = resource_table();
        for _ in 0..MAX_RESOURCES {
            table.push(()).unwrap();
        }
        assert!(table.push(()).is_err(), "the table is full");
    }

    /// What a JSON string of `s` takes, between its quotes.
    fn json_len(s: &str) -> usize {
        serde_json::to_string(s).unwrap().len() - 2
    }

    #[test]
    fn a_plugins_text_is_one_line_within_its_bound_as_json_holds_it() {
        assert_eq!(bounded_text("no secrets here", 1024), "no secrets here");
        assert_eq!(bounded_text("", 8), "");
        let fits = "x".repeat(1024);
        assert_eq!(bounded_text(&fits, 1024), fits, "exactly the bound: whole");
        for text in [
            "d".repeat(100_000),
            "é".repeat(10_000),
            "\"\\".repeat(5_000),
            "line\nforged record\r\u{1b}[2K\u{2028}\u{202e}".repeat(1000),
            format!("{}€", "x".repeat(1022)),
        ] {
            let out = bounded_text(&text, 1024);
            assert!(
                json_len(&out) <= 1024,
                "{} bytes: {out:.80}",
                json_len(&out)
            );
            assert!(out.ends_with(CUT), "{out:.80}");
            assert!(
                json_len(&out) > 1024 - 8,
                "cut near the bound: {}",
                json_len(&out)
            );
            assert!(!out.chars().any(escaped), "one line: {out:.80}");
            assert!(text.starts_with(out.trim_end_matches(CUT)) || text.contains('\n'));
        }
        // An escaped character is written whole or not at all.
        let out = bounded_text(&format!("{}\n{}", "x".repeat(1019), "y".repeat(10)), 1024);
        assert_eq!(out, format!("{}…", "x".repeat(1019)));
        assert_eq!(bounded_text("a\nb", 1024), "a\\nb");
    }

    #[test]
    fn a_finished_call_leaves_no_payload_nor_caller_and_no_large_buffer() {
        let long = "x".repeat(KEPT_FIELD_BYTES * 4);
        let groups: Vec<Box<str>> = vec![long.as_str().into(), "staff".into()];
        let ctx = CallContext {
            method: "tools/call",
            server: "files",
            name: Some(&long),
            principal: Some("alice"),
            session_id: "s-1",
            profile: None,
            groups: &groups,
            scopes: &[],
        };
        let payload = JsonText::from(r#"{"a":1}"#);
        let mut fields = CallFields::default();
        fields.set(&ctx);
        fields.payload = Some(payload.clone());
        fields.forget();
        assert!(fields.payload.is_none(), "the request's buffer is let go");
        assert_eq!(fields.name.as_ref().map(String::capacity), Some(0));
        assert_eq!(fields.principal.as_deref(), Some(""));
        assert!(
            fields.method.is_empty() && fields.method.capacity() > 0,
            "a short one is kept"
        );
        assert!(fields.groups.is_empty());
        // The next call sees only its own values.
        let next = CallContext {
            name: Some("read"),
            principal: None,
            groups: &[],
            ..ctx
        };
        fields.set(&next);
        assert_eq!(fields.name.as_deref(), Some("read"));
        assert_eq!(fields.principal, None);
        assert!(fields.groups.is_empty());
    }
}
