//! Read-only views of the gateway's state for operators (and the console): open sessions,
//! the audit trail's recent records, the policy plugins and their chains.

use serde::Serialize;

use crate::audit::{Audit, View};
use crate::gateway::Gateway;
use crate::plugins::Plugins;

/// Sessions listed at most (the count says how many there are).
pub const MAX_SESSIONS: usize = 1000;

/// One open session as the admin API shows it: never its whole id (a credential).
#[derive(Serialize)]
struct SessionView<'a> {
    /// The id's log prefix.
    id: &'a str,
    principal: Option<&'a str>,
    /// The MCP revision it negotiated.
    revision: &'static str,
    profile: Option<&'a str>,
    idle_seconds: u64,
    /// Requests running now.
    inflight: usize,
    /// Whether its client holds a GET stream open.
    listening: bool,
}

/// The open sessions (at most [`MAX_SESSIONS`], most recently active first), with how many
/// there are.
pub fn sessions(gw: &Gateway) -> serde_json::Value {
    let mut sessions: Vec<_> = gw
        .sessions
        .iter()
        .map(|e| (e.value().idle_for(), e.value().clone()))
        .collect();
    let count = sessions.len();
    // Only the kept ones are looked into (and sorted): the listing stays cheap with many.
    if count > MAX_SESSIONS {
        sessions.select_nth_unstable_by_key(MAX_SESSIONS, |(idle, _)| *idle);
        sessions.truncate(MAX_SESSIONS);
    }
    sessions.sort_by_key(|(idle, _)| *idle);
    let views: Vec<SessionView<'_>> = sessions
        .iter()
        .map(|(idle, s)| SessionView {
            id: s.log_id(),
            principal: s.principal.as_deref(),
            revision: s.protocol_version,
            profile: s.profile_name(),
            idle_seconds: idle.as_secs(),
            inflight: s.inflight(),
            listening: s.is_listening(),
        })
        .collect();
    serde_json::json!({ "count": count, "sessions": views })
}

/// The audit trail's last `limit` records of `view`, newest first, as they were written; `on`
/// says whether there is a trail at all.
pub fn audit(audit: &Audit, view: View, limit: usize) -> Vec<u8> {
    let lines = audit.recent(view, limit);
    // The lines are JSON objects already: spliced in, not parsed and written again.
    let mut out = Vec::with_capacity(32 + lines.iter().map(|l| l.len() + 1).sum::<usize>());
    out.extend_from_slice(if audit.is_on() {
        b"{\"on\":true,\"records\":["
    } else {
        b"{\"on\":false,\"records\":["
    });
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b"]}");
    out
}

/// The plugins loaded now (their hooks, settings and counters) and the chains that run them.
pub fn plugins(plugins: &Plugins) -> serde_json::Value {
    let set = plugins.current();
    let config = set.config();
    let hooks = set.plugins();
    let metrics = set.metrics();
    let modules: Vec<_> = config
        .modules
        .iter()
        .map(|m| {
            let h = hooks.iter().find(|(n, _)| *n == m.name).map(|(_, h)| *h);
            let counters = metrics.iter().find(|(n, _)| *n == m.name).map(|(_, c)| c);
            let hook_names: Vec<&str> = h
                .map(|h| {
                    [
                        (h.on_request, "on-request"),
                        (h.on_response, "on-response"),
                        (h.filter_list, "filter-list"),
                    ]
                    .into_iter()
                    .filter_map(|(on, name)| on.then_some(name))
                    .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "name": m.name,
                "path": m.path,
                "hooks": hook_names,
                "fail_open": m.fail_open,
                "deadline_ms": m.deadline.as_millis() as u64,
                "memory_limit": m.memory_limit.0,
                "calls": counters.map_or(0, |c| c.calls),
                "denials": counters.map_or(0, |c| c.denials),
                "rewrites": counters.map_or(0, |c| c.rewrites),
                "reused": counters.map_or(0, |c| c.reused),
                "faults": counters.map_or(0, |c| c.faults_deadline + c.faults_memory + c.faults_trap + c.faults_malformed + c.faults_init),
            })
        })
        .collect();
    let chains: Vec<_> = config
        .chains
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "methods": c.methods,
                "servers": c.servers,
                "tools": c.tools,
                "profiles": c.profiles,
                "plugins": c.plugins,
            })
        })
        .collect();
    serde_json::json!({ "modules": modules, "chains": chains })
}
