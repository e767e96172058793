//! Fault plugin for tests: panics (a trap) on a call to the tool named by
//! `trigger` (default `trigger`), and on every message of the method `method`
//! when one is set (a server's request to the client, say); on a call to the
//! tool named by `sleep_on`, sleeps ten seconds (which waits on `wasi:io/poll`);
//! allows the rest.
//!
//! It also plays a hostile plugin, each behaviour on when its setting is given, on a call to
//! the tool it names (or to the tool `act_on` names, for the gateway's tests, whose servers
//! list tools of their own):
//! - `deny_code` (tool `deny`): denies with that JSON-RPC code, and a message of `deny_bytes`
//!   bytes when given (`deny_text`, default `d`, repeated and cut there);
//! - `rewrite` (tool `rewrite`, or every call with `rewrite_all: true`): answers that text as
//!   the rewrite, of the arguments and of the result alike; `rewrite_bytes` instead answers a
//!   JSON object of that many bytes (`{"x":"xxx…"}`);
//! - `state_fill: {keys, value_bytes, scope, ttl_ms}` (tool `fill`): sets `keys` keys
//!   (`fill-0`, ...) of `value_bytes` bytes each in `scope` (`session`, `principal` or
//!   `global`), and denies with the first refusal (`state_fill: N written; why`), else allows;
//! - `log_lines` (tool `log`): writes that many log lines of `log_text`;
//! - `state_probe: true` (tool `state`): runs state operations at and past the documented
//!   bounds, and denies with what each answered (`name=answer;...`), along with what the same
//!   kind of operations answered in `init` (`init.session`, `init.principal`, `init.global`).
use gatehouse_plugin::state::{self, Scope};
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, log, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
    method: Option<String>,
    sleep_on: Option<String>,
    deny_code: Option<i32>,
    deny_bytes: Option<usize>,
    deny_text: Option<String>,
    rewrite: Option<String>,
    rewrite_bytes: Option<usize>,
    #[serde(default)]
    rewrite_all: bool,
    log_lines: Option<u32>,
    log_text: Option<String>,
    #[serde(default)]
    state_probe: bool,
    state_fill: Option<Fill>,
    act_on: Option<String>,
}

/// What `state_fill` writes.
#[derive(serde::Deserialize)]
struct Fill {
    keys: u32,
    value_bytes: usize,
    scope: String,
    ttl_ms: Option<u64>,
}

impl Fill {
    fn scope(&self) -> Result<Scope, String> {
        match self.scope.as_str() {
            "session" => Ok(Scope::Session),
            "principal" => Ok(Scope::Principal),
            "global" => Ok(Scope::Global),
            other => Err(format!("state_fill.scope: unknown scope {other:?}")),
        }
    }

    /// Writes its keys; the first refusal, with how many were written before it.
    fn run(&self) -> Result<(), String> {
        let scope = self.scope()?;
        let value = "v".repeat(self.value_bytes);
        for i in 0..self.keys {
            state::set(scope, &format!("fill-{i}"), &value, self.ttl_ms)
                .map_err(|e| format!("state_fill: {i} written; {e}"))?;
        }
        Ok(())
    }
}

/// `text` repeated, cut to `bytes` bytes (on a character boundary).
fn repeated(text: &str, bytes: usize) -> String {
    let text = if text.is_empty() { "d" } else { text };
    let mut out = text.repeat(bytes / text.len() + 1);
    let mut end = bytes.min(out.len());
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out
}

pub struct FaultTrap {
    trigger: String,
    method: Option<String>,
    sleep_on: Option<String>,
    c: Config,
    /// What the state operations tried in `init` answered.
    init_report: String,
}

impl FaultTrap {
    fn triggered(&self, ctx: &CallContext) -> bool {
        ctx.name() == Some(self.trigger.as_str()) || self.method.as_deref() == Some(ctx.method())
    }

    /// Whether a call is to `tool`, or to the tool `act_on` names.
    fn on(&self, ctx: &CallContext, tool: &str) -> bool {
        ctx.name()
            .is_some_and(|n| n == tool || Some(n) == self.c.act_on.as_deref())
    }

    /// The rewrite to answer, if the settings ask for one on this call.
    fn rewrite(&self, ctx: &CallContext) -> Option<Decision> {
        if !(self.c.rewrite_all || self.on(ctx, "rewrite")) {
            return None;
        }
        if let Some(bytes) = self.c.rewrite_bytes {
            // `{"x":"` and `"}`: 8 bytes around the padding.
            let mut text = String::with_capacity(bytes.max(8));
            text.push_str("{\"x\":\"");
            text.extend(std::iter::repeat_n('x', bytes.saturating_sub(8)));
            text.push_str("\"}");
            return Some(Decision::Rewrite(text));
        }
        let text = self.c.rewrite.as_ref()?;
        Some(Decision::Rewrite(text.clone()))
    }

    /// The hostile answer to a call, if its settings and the tool name ask for one.
    fn hostile(&self, ctx: &CallContext) -> Option<Decision> {
        if let Some(rewrite) = self.rewrite(ctx) {
            return Some(rewrite);
        }
        if let Some(code) = self.c.deny_code
            && self.on(ctx, "deny")
        {
            let message = match self.c.deny_bytes {
                Some(n) => repeated(self.c.deny_text.as_deref().unwrap_or("d"), n),
                None => format!("hostile denial {code}"),
            };
            return Some(Decision::deny_with_code(code, message));
        }
        if let Some(lines) = self.c.log_lines
            && self.on(ctx, "log")
        {
            let text = self.c.log_text.as_deref().unwrap_or("hostile log line");
            for _ in 0..lines {
                log::warn(text);
            }
            return Some(Decision::Allow);
        }
        if self.c.state_probe && self.on(ctx, "state") {
            return Some(Decision::deny(format!("{}{}", self.init_report, probe())));
        }
        if let Some(fill) = &self.c.state_fill
            && self.on(ctx, "fill")
        {
            return Some(match fill.run() {
                Ok(()) => Decision::Allow,
                Err(e) => Decision::deny(e),
            });
        }
        None
    }
}

/// `name=ok`, `name=<value>` or `name=err:<why>;`.
fn answer<T: std::fmt::Display>(name: &str, r: Result<T, String>) -> String {
    match r {
        Ok(v) => format!("{name}={v};"),
        Err(e) => format!("{name}=err:{e};"),
    }
}

/// State operations at and past each bound, in the calling principal's and session's scopes
/// and the plugin's global one.
fn probe() -> String {
    let mut out = String::new();
    let set = |scope, key: &str, value: &str| state::set(scope, key, value, None).map(|()| "ok");
    out += &answer("key256", set(Scope::Session, &"k".repeat(256), "v"));
    out += &answer("key257", set(Scope::Session, &"k".repeat(257), "v"));
    out += &answer(
        "value64k",
        set(Scope::Session, "big", &"v".repeat(64 * 1024)),
    );
    out += &answer(
        "value64k+1",
        set(Scope::Session, "bigger", &"v".repeat(64 * 1024 + 1)),
    );
    // Fill the principal's keys to the bound (two are there: `mine` and whatever a previous
    // probe of this principal wrote are overwritten, not added).
    let mut filled = Ok("ok");
    for i in 0..1024 {
        if let Err(e) = set(Scope::Principal, &format!("fill-{i}"), "x") {
            filled = Err(format!("{i}:{e}"));
            break;
        }
    }
    out += &answer("fill1024", filled);
    out += &answer("key1025", set(Scope::Principal, "one-more", "x"));
    out += &answer("overwrite", set(Scope::Principal, "fill-0", "y"));
    out += &answer(
        "incr-new-past-bound",
        state::incr(Scope::Principal, "counter", 1, None),
    );
    out += &answer(
        "incr-saturates",
        state::incr(Scope::Global, "max", i64::MAX, None)
            .and_then(|_| state::incr(Scope::Global, "max", i64::MAX, None)),
    );
    out += &answer(
        "ttl-max",
        set(Scope::Global, "forever", "1")
            .and_then(|_| state::set(Scope::Global, "forever", "1", Some(u64::MAX)).map(|()| "ok")),
    );
    out += &format!(
        "forever-read={};",
        state::get(Scope::Global, "forever").unwrap_or_else(|| "none".into())
    );
    out += &format!(
        "init-global-read={};",
        state::get(Scope::Global, "from-init").unwrap_or_else(|| "none".into())
    );
    out += &format!(
        "init-principal-read={};",
        state::get(Scope::Principal, "from-init").unwrap_or_else(|| "none".into())
    );
    out
}

impl Plugin for FaultTrap {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        if let Some(fill) = &c.state_fill {
            fill.scope()?;
        }
        let mut init_report = String::new();
        if c.state_probe {
            for (name, scope) in [
                ("init.session", Scope::Session),
                ("init.principal", Scope::Principal),
                ("init.global", Scope::Global),
            ] {
                let r = state::set(scope, "from-init", "init", None).map(|()| "ok");
                init_report += &answer(name, r);
            }
        }
        Ok(FaultTrap {
            trigger: c.trigger.clone().unwrap_or_else(|| "trigger".into()),
            method: c.method.clone(),
            sleep_on: c.sleep_on.clone(),
            c,
            init_report,
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if self.triggered(ctx) {
            panic!("fault-trap: trap requested by the test");
        }
        if ctx.name().is_some() && ctx.name() == self.sleep_on.as_deref() {
            std::thread::sleep(std::time::Duration::from_secs(10));
        }
        self.hostile(ctx).unwrap_or(Decision::Allow)
    }

    fn on_response(&mut self, ctx: &CallContext, _result: &Payload) -> Decision {
        if self.triggered(ctx) {
            panic!("fault-trap: trap requested by the test");
        }
        self.rewrite(ctx).unwrap_or(Decision::Allow)
    }
}

export_plugin!(FaultTrap: on_request, on_response);
