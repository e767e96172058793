//! The process-wide wasm engine: one `wasmtime::Engine` with the pooling
//! instance allocator, epoch interruption driven by a 1 ms ticker thread (`ticker.rs`),
//! and an on-disk cache of compiled components.
//!
//! The compiled-code cache is wasmtime's own (`Config::cache`): entries are
//! keyed by a SHA-256 of the component bytes together with the engine's
//! compilation settings and the wasmtime version, and only artifacts this
//! engine wrote are read back. That keeps `unsafe` deserialization out of
//! Gatehouse (the crate forbids `unsafe`). The directory is created private
//! (0700): whoever can write to it can run code in the gateway.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

use super::bindings;
use super::config::EngineConfig;
use super::error::PluginError;
use super::host::{HostState, add_wasi_to_linker};
use super::ticker::Ticker;

/// Length of one epoch tick: deadlines are counted in these.
pub const TICK: Duration = Duration::from_millis(1);

/// The shared engine, its linker and its cache.
pub(crate) struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    cache: Option<Cache>,
    pub(crate) settings: EngineConfig,
    /// Bounds running guests' time; enter it around guest code.
    pub(crate) ticker: Arc<Ticker>,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The process-wide runtime, created from `settings` on first use.
pub(crate) fn runtime(settings: &EngineConfig) -> Result<&'static Runtime, PluginError> {
    let rt = RUNTIME
        .get_or_init(|| Runtime::new(settings.clone()))
        .as_ref()
        .map_err(|e| PluginError::Engine(e.clone()))?;
    if rt.settings != *settings {
        tracing::warn!(
            "plugins.engine settings changed; they take effect after a restart (the engine is shared)"
        );
    }
    Ok(rt)
}

impl Runtime {
    fn new(settings: EngineConfig) -> Result<Runtime, String> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // Component-model async is not used by the plugin interface; leaving
        // it off halves the cost of a warm call.
        config.concurrency_support(false);
        config.epoch_interruption(true);
        if settings.perf_map {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(&settings)));
        let cache = if settings.cache {
            let dir = cache_dir(&settings);
            match make_private_dir(&dir) {
                Ok(()) => {
                    let mut cc = CacheConfig::new();
                    cc.with_directory(&dir);
                    match Cache::new(cc) {
                        Ok(cache) => Some(cache),
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), "plugin compile cache disabled: {e}");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "plugin compile cache disabled: {e}");
                    None
                }
            }
        } else {
            None
        };
        config.cache(cache.clone());
        let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
        let mut linker = Linker::new(&engine);
        add_wasi_to_linker(&mut linker).map_err(|e| format!("{e:#}"))?;
        bindings::Plugin::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| format!("{e:#}"))?;
        let ticker = Ticker::start(engine.clone(), TICK)
            .map_err(|e| format!("cannot start the plugin deadline ticker: {e}"))?;
        Ok(Runtime {
            engine,
            linker,
            cache,
            settings,
            ticker,
        })
    }

    /// Compiles a component (or loads it from the on-disk cache).
    pub(crate) fn compile(&self, bytes: &[u8]) -> Result<Component, String> {
        Component::from_binary(&self.engine, bytes).map_err(|e| format!("{e:#}"))
    }
}

/// (hits, misses) of the compile cache so far (zeros before the engine exists).
pub(crate) fn cache_stats() -> (usize, usize) {
    match RUNTIME.get() {
        Some(Ok(rt)) => rt
            .cache
            .as_ref()
            .map_or((0, 0), |c| (c.cache_hits(), c.cache_misses())),
        _ => (0, 0),
    }
}

/// Pool sizes: every live instance (warm or in a call) holds a slot.
fn pooling(settings: &EngineConfig) -> PoolingAllocationConfig {
    let n = settings.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        // A Rust component has a handful of core instances (module, shims,
        // adapters); one built from Python has more.
        .max_core_instances_per_component(64)
        .total_core_instances(n.saturating_mul(16))
        .max_memories_per_component(8)
        .total_memories(n.saturating_mul(2))
        .max_tables_per_component(32)
        .total_tables(n.saturating_mul(8))
        .table_elements(100_000)
        .max_memory_size(settings.max_memory.0 as usize)
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(1 << 20)
        .total_stacks(n);
    pool
}

/// The default cache directory (see [`EngineConfig::cache_dir`]).
fn cache_dir(settings: &EngineConfig) -> PathBuf {
    if let Some(dir) = &settings.cache_dir {
        return absolute(dir);
    }
    if let Some(dir) = std::env::var_os("GATEHOUSE_PLUGIN_CACHE") {
        return absolute(Path::new(&dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return absolute(&Path::new(&dir).join("gatehouse/wasm"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        return Path::new(&home).join(".cache/gatehouse/wasm");
    }
    std::env::temp_dir().join("gatehouse-wasm-cache")
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Creates `dir` readable and writable by this user only, and refuses an
/// existing one that others may write to.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is writable by others (mode {:o})",
                dir.display(),
                mode & 0o777
            )));
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// The SHA-256 of a file's bytes, hex-encoded.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}
