//! Fault plugin for tests: answers malformed output: a rewrite that is not
//! JSON for calls to the tool named by `trigger` (default `trigger`), and a
//! filter-list answer of the wrong length for a listing with an entry named
//! by `list_trigger` (default `trigger-list`). With `rewrite_requests: true`, it
//! rewrites every other request's params to `{"text":"rewritten"}` (well-formed:
//! what a sanitizing plugin does). Allows everything else.
use gatehouse_plugin::{
    CallContext, Decision, ListEntry, Payload, Plugin, export_plugin, parse_config,
};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
    list_trigger: Option<String>,
    #[serde(default)]
    rewrite_requests: bool,
}

pub struct FaultMalformed {
    trigger: String,
    list_trigger: String,
    rewrite_requests: bool,
}

impl FaultMalformed {
    fn triggered(&self, ctx: &CallContext) -> bool {
        ctx.name() == Some(self.trigger.as_str())
    }
}

impl Plugin for FaultMalformed {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        Ok(FaultMalformed {
            trigger: c.trigger.unwrap_or_else(|| "trigger".into()),
            list_trigger: c.list_trigger.unwrap_or_else(|| "trigger-list".into()),
            rewrite_requests: c.rewrite_requests,
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if self.triggered(ctx) {
            return Decision::Rewrite("{\"unterminated\": ".into());
        }
        if self.rewrite_requests {
            return Decision::Rewrite("{\"text\":\"rewritten\"}".into());
        }
        Decision::Allow
    }

    fn on_response(&mut self, ctx: &CallContext, _result: &Payload) -> Decision {
        if self.triggered(ctx) {
            return Decision::Rewrite("not json at all".into());
        }
        Decision::Allow
    }

    fn filter_list(&mut self, _ctx: &CallContext, entries: &[ListEntry]) -> Vec<bool> {
        if entries.iter().any(|e| e.name == self.list_trigger) {
            return vec![true; entries.len() + 1];
        }
        vec![true; entries.len()]
    }
}

export_plugin!(FaultMalformed: on_request, on_response, filter_list);
