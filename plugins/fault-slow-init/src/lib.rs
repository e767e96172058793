//! Fault plugin for tests: `init` busy-waits for `spin_ms` (default 10 000)
//! from the `slow_from`-th initialisation on (counted in the host's global
//! state; default 1, that is every time). Allows every call.
use gatehouse_plugin::state::{self, Scope};
use gatehouse_plugin::{Plugin, clock, export_plugin, parse_config};

#[derive(serde::Deserialize, Default)]
struct Config {
    spin_ms: Option<u64>,
    slow_from: Option<i64>,
}

pub struct FaultSlowInit;

impl Plugin for FaultSlowInit {
    fn init(config: &str) -> Result<Self, String> {
        let c: Config = parse_config(config)?;
        let nth = state::incr(Scope::Global, "inits", 1, None)?;
        if nth >= c.slow_from.unwrap_or(1) {
            let spin_ns = c.spin_ms.unwrap_or(10_000) * 1_000_000;
            let start = clock::monotonic_ns();
            while clock::monotonic_ns().saturating_sub(start) < spin_ns {
                std::hint::spin_loop();
            }
        }
        Ok(FaultSlowInit)
    }
}

export_plugin!(FaultSlowInit: on_request);
