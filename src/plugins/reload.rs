//! Hot reload: the current [`PluginSet`] behind an atomic pointer, swapped
//! whole when a plugin file or the plugins config changes.
//!
//! A new set is built off the request path (compile, link, first `init`);
//! only when it is complete is it swapped in. Calls already running finish
//! on the set they started with. A broken new version is rejected with a
//! log line and the old set stays in place.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::instance::FileStamp;
use super::{PluginError, PluginSet, PluginsConfig};

/// How often the watcher drops expired plugin state.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The gateway's handle on its plugins: the current set, swapped on reload.
pub struct Plugins {
    current: ArcSwap<PluginSet>,
    /// Serializes reloads (the file watcher and config reloads).
    reloading: Mutex<Seen>,
}

/// File stamps already handled, so a rejected file is not retried (and
/// logged) on every poll, only when it changes again.
#[derive(Default)]
struct Seen(HashMap<PathBuf, FileStamp>);

impl Plugins {
    /// Loads the plugins of `cfg`.
    pub fn load(cfg: &PluginsConfig) -> Result<Arc<Plugins>, PluginError> {
        Ok(Self::new(PluginSet::load(cfg)?))
    }

    /// Wraps an already loaded set.
    pub fn new(set: Arc<PluginSet>) -> Arc<Plugins> {
        let seen = Seen(
            set.plugins
                .iter()
                .filter_map(|p| Some((p.path().clone(), p.stamp.clone()?)))
                .collect(),
        );
        Arc::new(Plugins {
            current: ArcSwap::new(set),
            reloading: Mutex::new(seen),
        })
    }

    /// The current set. Cheap (one atomic load and reference count); hold it
    /// for the whole request so its hooks run on one consistent set.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Replaces the plugins config (for example after the gateway's config
    /// file changed). Unchanged plugins are kept with their warm instances;
    /// on error the current set stays.
    pub fn reload(&self, cfg: &PluginsConfig) -> Result<(), PluginError> {
        let mut seen = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let new = PluginSet::build(cfg, old.shared.clone(), Some(&old))?;
        for p in &new.plugins {
            if let Some(stamp) = &p.stamp {
                seen.0.insert(p.path().clone(), stamp.clone());
            }
        }
        self.current.store(Arc::new(new));
        Ok(())
    }

    /// Reloads if a plugin file changed since it was loaded (or last
    /// rejected). Returns whether a new set was swapped in.
    pub fn reload_changed_files(&self) -> Result<bool, PluginError> {
        let mut seen = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let mut changed = Vec::new();
        for m in &old.config.modules {
            let Ok(stamp) = FileStamp::of(&m.path) else {
                continue; // missing for now (mid-replace?): keep what runs
            };
            if seen.0.get(&m.path) != Some(&stamp) {
                changed.push((m.path.clone(), stamp));
            }
        }
        if changed.is_empty() {
            return Ok(false);
        }
        for (path, stamp) in changed {
            seen.0.insert(path, stamp);
        }
        let started = Instant::now();
        match PluginSet::build(&old.config, old.shared.clone(), Some(&old)) {
            Ok(new) => {
                let replaced: Vec<String> = new
                    .plugins
                    .iter()
                    .filter(|p| !old.plugins.iter().any(|o| Arc::ptr_eq(o, p)))
                    .map(|p| p.name.to_string())
                    .collect();
                if replaced.is_empty() {
                    return Ok(false); // touched, same contents
                }
                self.current.store(Arc::new(new));
                tracing::info!(
                    plugins = ?replaced,
                    took_ms = started.elapsed().as_millis() as u64,
                    "plugins reloaded"
                );
                Ok(true)
            }
            Err(e) => {
                tracing::error!("plugin reload rejected, keeping the previous version: {e}");
                Err(e)
            }
        }
    }

    /// Starts a thread that polls plugin files every `watch_interval` and
    /// reloads on change; it also sweeps expired plugin state. It stops when
    /// the returned [`Watcher`] is dropped.
    pub fn watch(self: &Arc<Self>) -> Watcher {
        let interval = self.current().config.watch_interval;
        self.watch_every(interval)
    }

    /// [`Plugins::watch`] with an explicit interval.
    pub fn watch_every(self: &Arc<Self>, interval: Duration) -> Watcher {
        let (stop, stopped) = mpsc::channel::<()>();
        let plugins = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("gatehouse-plugin-watch".into())
            .spawn(move || {
                let mut last_sweep = Instant::now();
                loop {
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let Some(plugins) = plugins.upgrade() else {
                        return;
                    };
                    // Errors are logged inside; the old set stays.
                    let _ = plugins.reload_changed_files();
                    if last_sweep.elapsed() >= SWEEP_EVERY {
                        plugins.current().state().sweep();
                        last_sweep = Instant::now();
                    }
                }
            })
            .ok();
        Watcher {
            stop: Some(stop),
            thread,
        }
    }
}

/// The file watcher thread; dropping it stops the thread.
pub struct Watcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
