//! A test plugin for `reuse_decisions`: it denies every request, naming how many calls this
//! instance has run and the principal, after reading what its configuration names (nothing
//! else, the payload, the session id, the state, the gateway's clock, the log, a WASI clock,
//! WASI randomness, or its hash maps' seed). A kept decision repeats an earlier count; a call the plugin ran counts on.
use std::cell::Cell;

use gatehouse_plugin::state::Scope;
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, clock, export_plugin, log, state};

pub struct ReuseProbe {
    reads: String,
    runs: Cell<u64>,
}

impl ReuseProbe {
    /// Reads what the configuration names; the value only matters in that it was read.
    fn read(&self, ctx: &CallContext, payload: &Payload) -> usize {
        match self.reads.as_str() {
            "payload" => payload.text().len(),
            "session" => ctx.session_id().len(),
            "state" => state::get(Scope::Global, "k").map_or(0, |v| v.len()),
            "clock" => clock::now_ms() as usize % 2,
            "log" => {
                log::debug("probed");
                0
            }
            "wasi-wall-clock" => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as usize % 2),
            "wasi-monotonic-clock" => {
                let start = std::time::Instant::now();
                start.elapsed().subsec_nanos() as usize % 2
            }
            // Rust seeds its hash maps from WASI's `insecure-seed`.
            "hash-seed" => {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(1u64) as usize
            }
            "wasi-random" => {
                let mut byte = [0u8; 1];
                getrandom::fill(&mut byte).map_or(0, |()| usize::from(byte[0] % 2))
            }
            _ => 0,
        }
    }
}

impl Plugin for ReuseProbe {
    fn init(config: &str) -> Result<Self, String> {
        let config: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        let reads = config["reads"].as_str().unwrap_or("nothing").to_string();
        Ok(ReuseProbe {
            reads,
            runs: Cell::new(0),
        })
    }

    fn on_request(&mut self, ctx: &CallContext, arguments: &Payload) -> Decision {
        let read = self.read(ctx, arguments);
        self.runs.set(self.runs.get() + 1);
        Decision::deny(format!(
            "run {} for {} ({read})",
            self.runs.get(),
            ctx.principal().unwrap_or("anonymous")
        ))
    }
}

export_plugin!(ReuseProbe: on_request);
