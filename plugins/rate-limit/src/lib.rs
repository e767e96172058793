//! `rate-limit`: calls per principal (or session) per window.
//!
//! ```json
//! {"limits": [
//!    {"tool": "search*", "calls": 10, "window": "1m"},
//!    {"calls": 100, "window": "1h", "per": "session"}
//!  ]}
//! ```
//! Every limit whose `tool` / `server` globs match the call counts it, per
//! `per` (`principal`, the default; `session`; `global`): one counter per
//! limit, for every call it matches together (not one per name, which the
//! caller chooses: a new name each time would dodge the limit and fill the
//! host's key space for everyone). The
//! window is fixed and starts with the first call; windows are `500ms`,
//! `30s`, `5m`, `1h`. Counters live in the host, shared by all instances.
use gatehouse_plugin::state::{self, Scope};
use gatehouse_plugin::{
    CallContext, Decision, Payload, Plugin, Target, export_plugin, parse_config,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    limits: Vec<LimitConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitConfig {
    tool: Option<String>,
    server: Option<String>,
    calls: u32,
    window: String,
    #[serde(default)]
    per: Per,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Per {
    #[default]
    Principal,
    Session,
    Global,
}

struct Limit {
    target: Target,
    calls: u32,
    window_ms: u64,
    window: String,
    scope: Scope,
}

pub fn parse_window(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad window {s:?}"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("bad window {s:?}: use ms, s, m or h")),
    };
    if ms == 0 {
        return Err(format!("bad window {s:?}: must be positive"));
    }
    Ok(ms)
}

pub struct RateLimit {
    limits: Vec<Limit>,
}

impl Plugin for RateLimit {
    fn init(config: &str) -> Result<Self, String> {
        let cfg: Config = parse_config(config)?;
        let limits = cfg
            .limits
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(Limit {
                    target: Target {
                        tool: l.tool,
                        server: l.server,
                    },
                    calls: l.calls,
                    window_ms: parse_window(&l.window).map_err(|e| format!("limits[{i}]: {e}"))?,
                    window: l.window,
                    scope: match l.per {
                        Per::Principal => Scope::Principal,
                        Per::Session => Scope::Session,
                        Per::Global => Scope::Global,
                    },
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(RateLimit { limits })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        let tool = ctx.name().unwrap_or("");
        for (i, limit) in self.limits.iter().enumerate() {
            // Leniently: a name in another case counts against the limit too.
            if !limit.target.matches_leniently(ctx) {
                continue;
            }
            let key = format!("limit-{i}");
            match state::incr(limit.scope, &key, 1, Some(limit.window_ms)) {
                Ok(n) if n > i64::from(limit.calls) => {
                    return Decision::deny_with_code(
                        -32029,
                        format!(
                            "rate limit exceeded: {} calls per {} for {tool}",
                            limit.calls, limit.window
                        ),
                    );
                }
                Ok(_) => {}
                Err(e) => return Decision::deny(format!("rate-limit: {e}")),
            }
        }
        Decision::Allow
    }
}

export_plugin!(RateLimit: on_request);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("500ms"), Ok(500));
        assert_eq!(parse_window("30s"), Ok(30_000));
        assert_eq!(parse_window("5m"), Ok(300_000));
        assert!(parse_window("5d").is_err());
        assert!(parse_window("0s").is_err());
    }

    #[test]
    fn counts_every_call_a_limit_matches_together() {
        let mut p =
            RateLimit::init(r#"{"limits": [{"tool": "a*", "calls": 2, "window": "1h"}]}"#).unwrap();
        let ctx = |name: &str| {
            CallContext::new("tools/call", "s")
                .with_name(name)
                .with_principal("p")
                .with_session_id("s")
        };
        assert!(matches!(
            p.on_request(&ctx("ab"), &Payload::new("{}")),
            Decision::Allow
        ));
        assert!(matches!(
            p.on_request(&ctx("ac"), &Payload::new("{}")),
            Decision::Allow
        ));
        // Another name the glob matches counts against the same limit.
        assert!(matches!(
            p.on_request(&ctx("ad"), &Payload::new("{}")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.on_request(&ctx("ab"), &Payload::new("{}")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.on_request(&ctx("zz"), &Payload::new("{}")),
            Decision::Allow
        ));
    }
}
