//! Fault plugin for tests: allocates memory without bound on a call to the
//! tool named by `trigger` (default `trigger`); allows every other call.
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    trigger: Option<String>,
}

pub struct FaultOom {
    trigger: String,
}

impl Plugin for FaultOom {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        Ok(FaultOom {
            trigger: c.trigger.unwrap_or_else(|| "trigger".into()),
        })
    }

    fn on_request(&mut self, ctx: &CallContext, _arguments: &Payload) -> Decision {
        if ctx.name() == Some(self.trigger.as_str()) {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // 1 MiB at a time, touched so it is really committed.
                hoard.push(std::hint::black_box(vec![0xA5u8; 1 << 20]));
            }
        }
        Decision::Allow
    }
}

export_plugin!(FaultOom: on_request);
