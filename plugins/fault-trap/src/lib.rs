//! Fault plugin for tests: panics (a trap) on a call to the tool named by
//! `trigger` (default `trigger`); allows every other call.
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
}

pub struct FaultTrap {
    trigger: String,
}

impl Plugin for FaultTrap {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        Ok(FaultTrap {
            trigger: c.trigger.unwrap_or_else(|| "trigger".into()),
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if ctx.name() == Some(self.trigger.as_str()) {
            panic!("fault-trap: trap requested by the test");
        }
        Decision::Allow
    }

    fn on_response(&mut self, ctx: &CallContext, _result: &Payload) -> Decision {
        if ctx.name() == Some(self.trigger.as_str()) {
            panic!("fault-trap: trap requested by the test");
        }
        Decision::Allow
    }
}

export_plugin!(FaultTrap: on_request, on_response);
