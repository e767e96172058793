//! Plugin configuration: what the gateway config file says (`PluginsConfig`,
//! deserialized with unknown fields denied) and its validation.
//!
//! ```yaml
//! plugins:
//!   modules:
//!     - name: policy
//!       path: target/plugins/tool_policy.wasm
//!       config: { rules: [ { tool: "shell", action: block, reason: "no shell" } ] }
//!       fail_open: false        # default: a failing plugin denies the request
//!       deadline: 100ms         # per hook call (epoch-interrupted)
//!       init_deadline: 2s       # instantiation + init of one instance
//!       memory_limit: 64MiB     # linear memory per instance
//!       state_max_bytes: 16MiB  # keys and values kept in the host's state, all owners together
//!       state_max_entries: 200000  # keys kept there, all owners together
//!   chains:
//!     - name: tools
//!       methods: ["tools/*"]    # globs; empty or absent = any
//!       servers: ["files", "web"]
//!       tools: ["*"]
//!       profiles: []
//!       plugins: [policy]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::error::PluginError;
use super::state::{DEFAULT_STATE_BYTES, DEFAULT_STATE_ENTRIES, StateLimits};

/// The `plugins` section of the gateway config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// The plugins that may be used by chains.
    #[serde(default)]
    pub modules: Vec<PluginConfig>,
    /// Which plugins run, in which order, for which requests.
    #[serde(default)]
    pub chains: Vec<ChainConfig>,
    /// Settings of the shared wasm engine (read once per process).
    #[serde(default)]
    pub engine: EngineConfig,
    /// How often plugin files are checked for changes (hot reload).
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            modules: Vec::new(),
            chains: Vec::new(),
            engine: EngineConfig::default(),
            watch_interval: default_watch_interval(),
        }
    }
}

/// One plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique name; used in chains, denials, logs and metrics.
    pub name: String,
    /// The component file (`.wasm`). A relative path is taken from the
    /// gateway's working directory.
    pub path: PathBuf,
    /// The plugin's own configuration, handed to its `init` as JSON text.
    #[serde(default)]
    pub config: serde_json::Value,
    /// When the plugin fails (trap, deadline, memory, malformed output),
    /// skip it instead of denying the request.
    #[serde(default)]
    pub fail_open: bool,
    /// Deadline of one hook call.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Deadline of creating one instance and running its `init`.
    #[serde(default = "default_init_deadline", with = "humantime_serde")]
    pub init_deadline: Duration,
    /// Linear memory limit of one instance.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: ByteSize,
    /// Most idle instances kept warm for reuse.
    #[serde(default = "default_max_warm")]
    pub max_warm: usize,
    /// An instance is replaced by a fresh one after this many calls.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u32,
    /// Most bytes of keys and values the plugin keeps in the host's state (WIT `state`), every
    /// session, principal and the global scope together: a write past it is refused.
    #[serde(default = "default_state_max_bytes")]
    pub state_max_bytes: ByteSize,
    /// Most keys the plugin keeps in the host's state, every owner together.
    #[serde(default = "default_state_max_entries")]
    pub state_max_entries: u64,
    /// Answer a call alike in method, server, name, principal, profile, groups and scopes
    /// with the plugin's last decision, when that decision read nothing else and used no
    /// state, clock, randomness or log. For plugins that keep nothing in memory between calls.
    #[serde(default)]
    pub reuse_decisions: bool,
}

impl PluginConfig {
    /// A plugin with default limits and no configuration.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        PluginConfig {
            name: name.into(),
            path: path.into(),
            config: serde_json::Value::Null,
            fail_open: false,
            deadline: default_deadline(),
            init_deadline: default_init_deadline(),
            memory_limit: default_memory_limit(),
            max_warm: default_max_warm(),
            recycle_after: default_recycle_after(),
            state_max_bytes: default_state_max_bytes(),
            state_max_entries: default_state_max_entries(),
            reuse_decisions: false,
        }
    }

    /// What the plugin may keep in the host's state.
    pub fn state_limits(&self) -> StateLimits {
        StateLimits {
            bytes: self.state_max_bytes.0,
            entries: self.state_max_entries,
        }
    }
}

/// One chain: the plugins it runs and the requests it applies to. Every
/// selector is a list of globs (`*`, `?`); an empty list matches anything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// A name for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// JSON-RPC methods (`tools/call`, `tools/list`, `prompts/*`, ...).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Upstream server names.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tool / prompt names or resource URIs. On listings this selects the
    /// entries the chain's filters see.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Gateway profiles (`/mcp/{profile}`); a request without a profile
    /// matches only chains without a `profiles` selector.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Plugin names, in the order they run.
    pub plugins: Vec<String>,
}

/// Settings of the process-wide wasm engine. They take effect when the
/// first plugin set of the process is loaded; later changes need a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Where compiled plugins are cached. Default: `$GATEHOUSE_PLUGIN_CACHE`,
    /// else `$XDG_CACHE_HOME/gatehouse/wasm`, else `~/.cache/gatehouse/wasm`; with none of
    /// these, no cache. It must be this user's own directory, not a link, and not writable
    /// by others.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Cache compiled plugins on disk.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Most plugin instances alive at once (pool slots).
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Largest memory limit a plugin may be given.
    #[serde(default = "default_max_memory")]
    pub max_memory: ByteSize,
    /// Name every compiled plugin function in `/tmp/perf-PID.map`, so `perf` shows where
    /// guest time goes (off by default: the file grows with each compile).
    #[serde(default)]
    pub perf_map: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cache_dir: None,
            cache: true,
            max_instances: default_max_instances(),
            max_memory: default_max_memory(),
            perf_map: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_watch_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_deadline() -> Duration {
    Duration::from_millis(100)
}
fn default_init_deadline() -> Duration {
    Duration::from_secs(2)
}
fn default_memory_limit() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_max_warm() -> usize {
    4
}
fn default_recycle_after() -> u32 {
    10_000
}
fn default_state_max_bytes() -> ByteSize {
    ByteSize(DEFAULT_STATE_BYTES)
}
fn default_state_max_entries() -> u64 {
    DEFAULT_STATE_ENTRIES
}
fn default_max_instances() -> u32 {
    256
}
fn default_max_memory() -> ByteSize {
    ByteSize(512 << 20)
}

/// Range of `state_max_bytes`.
pub const STATE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 30);
/// Range of `state_max_entries`.
pub const STATE_ENTRIES_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;

/// Shortest deadline accepted: epoch ticks are 1 ms and the machine may be
/// busy, so anything shorter would interrupt healthy calls.
pub const MIN_DEADLINE: Duration = Duration::from_millis(10);

/// A size in bytes: an integer, or a string with a unit (`64MiB`, `512KiB`,
/// `1GiB`, `10MB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `64MiB`, `512 KiB`, `1GB`, `4096`.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("bad size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl PluginsConfig {
    /// Checks what serde cannot: unique names, known plugin references,
    /// limits within the engine's bounds. Errors name the field at fault.
    pub fn validate(&self) -> Result<(), PluginError> {
        // Zero would have the watcher look at the files without pause.
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&self.watch_interval)
        {
            return Err(PluginError::config(
                "plugins.watch_interval",
                "must be between 100ms and 1h",
            ));
        }
        let max_memory = self.engine.max_memory.0;
        for (i, p) in self.modules.iter().enumerate() {
            let field = |f: &str| format!("plugins.modules[{i}].{f}");
            if p.name.is_empty() {
                return Err(PluginError::config(field("name"), "must not be empty"));
            }
            if self.modules[..i].iter().any(|q| q.name == p.name) {
                return Err(PluginError::config(
                    field("name"),
                    format!("duplicate plugin name {:?}", p.name),
                ));
            }
            if p.deadline < MIN_DEADLINE || p.deadline > Duration::from_secs(60) {
                return Err(PluginError::config(
                    field("deadline"),
                    format!("must be between {MIN_DEADLINE:?} and 60s"),
                ));
            }
            if p.init_deadline < MIN_DEADLINE || p.init_deadline > Duration::from_secs(300) {
                return Err(PluginError::config(
                    field("init_deadline"),
                    format!("must be between {MIN_DEADLINE:?} and 300s"),
                ));
            }
            if p.memory_limit.0 < (1 << 20) || p.memory_limit.0 > max_memory {
                return Err(PluginError::config(
                    field("memory_limit"),
                    format!("must be between 1MiB and engine.max_memory ({max_memory} bytes)"),
                ));
            }
            if p.recycle_after == 0 {
                return Err(PluginError::config(
                    field("recycle_after"),
                    "must be at least 1",
                ));
            }
            if !STATE_BYTES_RANGE.contains(&p.state_max_bytes.0) {
                return Err(PluginError::config(
                    field("state_max_bytes"),
                    "must be between 1KiB and 1GiB",
                ));
            }
            if !STATE_ENTRIES_RANGE.contains(&p.state_max_entries) {
                return Err(PluginError::config(
                    field("state_max_entries"),
                    format!(
                        "must be between {} and {}",
                        STATE_ENTRIES_RANGE.start(),
                        STATE_ENTRIES_RANGE.end()
                    ),
                ));
            }
        }
        for (i, c) in self.chains.iter().enumerate() {
            for (j, name) in c.plugins.iter().enumerate() {
                if !self.modules.iter().any(|p| &p.name == name) {
                    return Err(PluginError::config(
                        format!("plugins.chains[{i}].plugins[{j}]"),
                        format!("no plugin named {name:?} in plugins.modules"),
                    ));
                }
            }
        }
        if self.engine.max_instances == 0 {
            return Err(PluginError::config(
                "plugins.engine.max_instances",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_defaults() {
        let cfg: PluginsConfig = serde_saphyr::from_str(
            r#"
modules:
  - name: policy
    path: target/plugins/tool_policy.wasm
    config: { rules: [ { tool: shell, action: block } ], default: allow }
    memory_limit: 32MiB
    deadline: 50ms
chains:
  - methods: ["tools/call"]
    plugins: [policy]
"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let p = &cfg.modules[0];
        assert_eq!(p.memory_limit, ByteSize(32 << 20));
        assert_eq!(p.deadline, Duration::from_millis(50));
        assert_eq!(p.init_deadline, Duration::from_secs(2));
        assert!(!p.fail_open);
        assert_eq!(p.config["rules"][0]["tool"], "shell");
        assert_eq!(cfg.chains[0].plugins, ["policy"]);
        assert_eq!(cfg.watch_interval, Duration::from_secs(1));
        assert_eq!(
            p.state_limits(),
            StateLimits {
                bytes: 16 << 20,
                entries: 200_000
            },
            "a plugin's state is bounded unless told otherwise"
        );
    }

    #[test]
    fn state_limits_are_read_and_checked() {
        let cfg: PluginsConfig = serde_saphyr::from_str(
            "modules: [{name: a, path: a.wasm, state_max_bytes: 64KiB, state_max_entries: 10}]",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.modules[0].state_limits(),
            StateLimits {
                bytes: 64 << 10,
                entries: 10
            }
        );
        for (bad, field) in [
            ("state_max_bytes: 1000", "state_max_bytes"),
            ("state_max_bytes: 2GiB", "state_max_bytes"),
            ("state_max_entries: 0", "state_max_entries"),
            ("state_max_entries: 10000001", "state_max_entries"),
        ] {
            let cfg: PluginsConfig = serde_saphyr::from_str(&format!(
                "modules: [{{name: a, path: a.wasm}}, {{name: b, path: b.wasm, {bad}}}]"
            ))
            .unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("plugins.modules[1].{field}:")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_bad_references_are_errors() {
        assert!(serde_saphyr::from_str::<PluginsConfig>("modulez: []").is_err());
        let cfg: PluginsConfig =
            serde_saphyr::from_str("modules: [{name: a, path: a.wasm}]\nchains: [{plugins: [b]}]")
                .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("plugins.chains[0].plugins[0]:"), "{err}");
        let cfg: PluginsConfig =
            serde_saphyr::from_str("modules: [{name: a, path: a.wasm}, {name: a, path: b.wasm}]")
                .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("plugins.modules[1].name:"), "{err}");
        let cfg: PluginsConfig =
            serde_saphyr::from_str("modules: [{name: a, path: a.wasm, deadline: 1ms}]").unwrap();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("512 KiB"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("1GB"), Ok(ByteSize(1_000_000_000)));
        assert!(ByteSize::parse("1 parsec").is_err());
    }
}
