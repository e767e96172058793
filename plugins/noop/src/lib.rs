//! A plugin that allows every request and response: the baseline for
//! benchmarks (the cost of a hook call itself).
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin};

pub struct Noop;

impl Plugin for Noop {
    fn init(_config: &str) -> Result<Self, String> {
        Ok(Noop)
    }
    fn on_request(&mut self, _ctx: &CallContext, _arguments: &Payload) -> Decision {
        Decision::Allow
    }
    fn on_response(&mut self, _ctx: &CallContext, _result: &Payload) -> Decision {
        Decision::Allow
    }
}

export_plugin!(Noop: on_request, on_response);
