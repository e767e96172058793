//! Fault plugin for tests: spins forever on a call to the tool named by
//! `trigger` (default `trigger`); allows every other call.
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
}

pub struct FaultLoop {
    trigger: String,
}

impl Plugin for FaultLoop {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        Ok(FaultLoop {
            trigger: c.trigger.unwrap_or_else(|| "trigger".into()),
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if ctx.name() == Some(self.trigger.as_str()) {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Decision::Allow
    }
}

export_plugin!(FaultLoop: on_request);
