//! `trusted-data`: a result from an untrusted tool taints the session;
//! afterwards, sensitive tools are blocked in that session.
//!
//! ```json
//! {"untrusted": ["fetch*", {"server": "web"}],
//!  "sensitive": ["send_email", {"tool": "write_*", "server": "files"}]}
//! ```
//! Entries are name globs or `{"tool", "server"}` objects. The taint lives in
//! the host's session state, so it holds across instances and reloads and
//! ends with the session.
use gatehouse_plugin::state::{self, Scope};
use gatehouse_plugin::{
    CallContext, Decision, Payload, Plugin, Targets, export_plugin, parse_config,
};
use serde::Deserialize;

const TAINT_KEY: &str = "tainted-by";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    untrusted: Targets,
    #[serde(default)]
    sensitive: Targets,
}

pub struct TrustedData {
    untrusted: Targets,
    sensitive: Targets,
}

impl Plugin for TrustedData {
    fn init(config: &str) -> Result<Self, String> {
        let cfg: Config = parse_config(config)?;
        Ok(TrustedData {
            untrusted: cfg.untrusted,
            sensitive: cfg.sensitive,
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        // Leniently: both lists only restrict, and a name in another case is the same tool to
        // a lenient server.
        if !self.sensitive.matches_leniently(ctx) {
            return Decision::Allow;
        }
        match state::get(Scope::Session, TAINT_KEY) {
            Some(source) => Decision::deny(format!(
                "the session holds untrusted data (from {source}); sensitive tool {} is blocked in this session",
                ctx.name().unwrap_or("?")
            )),
            None => Decision::Allow,
        }
    }

    fn on_response(&mut self, ctx: &CallContext, _result: &Payload) -> Decision {
        if self.untrusted.matches_leniently(ctx) {
            let source = format!("{}/{}", ctx.server(), ctx.name().unwrap_or("?"));
            if let Err(e) = state::set(Scope::Session, TAINT_KEY, &source, None) {
                // Fail closed: if the taint cannot be recorded, the data must not flow.
                return Decision::deny(format!("trusted-data: cannot record taint: {e}"));
            }
        }
        Decision::Allow
    }
}

export_plugin!(TrustedData: on_request, on_response);
