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
            match cache_dir(&settings, |v| std::env::var_os(v)) {
                None => {
                    tracing::warn!(
                        "plugin compile cache disabled: no engine.cache_dir, GATEHOUSE_PLUGIN_CACHE, XDG_CACHE_HOME or HOME to keep it in (a shared temporary directory would let others plant compiled code)"
                    );
                    None
                }
                Some(dir) => match make_private_dir(&dir) {
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
                },
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

/// The cache directory (see [`EngineConfig::cache_dir`]), `var` reading the environment;
/// `None` when nothing names one (no shared temporary directory: wasmtime runs what it finds
/// in the cache as native code).
fn cache_dir(
    settings: &EngineConfig,
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if let Some(dir) = &settings.cache_dir {
        return Some(absolute(dir));
    }
    // Only absolute paths from the environment (as the XDG rules say): an empty or relative
    // one would be read from wherever the gateway was started.
    let set = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) = set("GATEHOUSE_PLUGIN_CACHE") {
        return Some(dir);
    }
    if let Some(dir) = set("XDG_CACHE_HOME") {
        return Some(dir.join("gatehouse/wasm"));
    }
    set("HOME").map(|home| home.join(".cache/gatehouse/wasm"))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Creates `dir` readable and writable by this user only, and refuses an existing one that
/// is a link, is another user's, or others may write to: what wasmtime finds there it runs
/// as native code; and one below a directory of another user, who could replace it.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = std::fs::symlink_metadata(dir)?;
        let refused = |why: String| Err(std::io::Error::other(format!("{}: {why}", dir.display())));
        if !meta.is_dir() {
            return refused("not a directory (a link is not followed)".into());
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return refused(format!("owned by user {}, not this one", meta.uid()));
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            return refused(format!("writable by others (mode {:o})", mode & 0o777));
        }
        // Nor may another user move it aside and put another in its place: no directory
        // above it is another user's (root's are the system's; one writable by everyone and
        // not sticky, as a pod's emptyDir, is said, not refused).
        for above in dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(above) else {
                continue;
            };
            if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
                return refused(format!(
                    "{} above it is user {}'s",
                    above.display(),
                    meta.uid()
                ));
            }
            let mode = meta.permissions().mode();
            if mode & 0o002 != 0 && mode & 0o1000 == 0 {
                tracing::warn!(dir = %above.display(), "a directory above the plugin cache is writable by everyone and not sticky: whoever may write there could replace the cache");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_where_the_settings_or_the_user_say_and_never_a_shared_directory() {
        let settings = EngineConfig::default();
        let none = |_: &str| None;
        assert_eq!(cache_dir(&settings, none), None);
        let home = |v: &str| (v == "HOME").then(|| "/home/u".into());
        assert_eq!(
            cache_dir(&settings, home),
            Some(PathBuf::from("/home/u/.cache/gatehouse/wasm"))
        );
        // Empty or relative values are not places.
        let relative = |v: &str| match v {
            "XDG_CACHE_HOME" => Some("".into()),
            "HOME" => Some("here".into()),
            _ => None,
        };
        assert_eq!(cache_dir(&settings, relative), None);
        let named = EngineConfig {
            cache_dir: Some("/var/cache/g".into()),
            ..EngineConfig::default()
        };
        assert_eq!(cache_dir(&named, none), Some(PathBuf::from("/var/cache/g")));
    }

    #[test]
    fn a_cache_directory_others_could_fill_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base =
            std::env::temp_dir().join(format!("gatehouse-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let own = base.join("own");
        make_private_dir(&own).unwrap();
        // A link to a directory, however private, is not followed.
        let link = base.join("link");
        std::os::unix::fs::symlink(&own, &link).unwrap();
        assert!(make_private_dir(&link).is_err());
        // A directory others may write to is refused, and so is one below such a directory.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(make_private_dir(&open).is_err());
        // Below another user's directory (who could move it aside): refused. Only root can
        // give a directory away; run otherwise, this part is skipped.
        let theirs = base.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let given = nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(12345)), None);
        if given.is_ok() {
            assert!(make_private_dir(&theirs.join("wasm")).is_err());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
