//! Fault plugin for tests: panics (a trap) on a call to the tool named by
//! `trigger` (default `trigger`), and on every message of the method `method`
//! when one is set (a server's request to the client, say); on a call to the
//! tool named by `sleep_on`, sleeps ten seconds (which waits on `wasi:io/poll`);
//! allows the rest.
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
    method: Option<String>,
    sleep_on: Option<String>,
}

pub struct FaultTrap {
    trigger: String,
    method: Option<String>,
    sleep_on: Option<String>,
}

impl FaultTrap {
    fn triggered(&self, ctx: &CallContext) -> bool {
        ctx.name() == Some(self.trigger.as_str()) || self.method.as_deref() == Some(ctx.method())
    }
}

impl Plugin for FaultTrap {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        Ok(FaultTrap {
            trigger: c.trigger.unwrap_or_else(|| "trigger".into()),
            method: c.method,
            sleep_on: c.sleep_on,
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if self.triggered(ctx) {
            panic!("fault-trap: trap requested by the test");
        }
        if ctx.name().is_some() && ctx.name() == self.sleep_on.as_deref() {
            std::thread::sleep(std::time::Duration::from_secs(10));
        }
        Decision::Allow
    }

    fn on_response(&mut self, ctx: &CallContext, _result: &Payload) -> Decision {
        if self.triggered(ctx) {
            panic!("fault-trap: trap requested by the test");
        }
        Decision::Allow
    }
}

export_plugin!(FaultTrap: on_request, on_response);
