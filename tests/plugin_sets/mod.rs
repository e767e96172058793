//! Plugin sets for the tests of the plugin host: loaded from YAML over the components
//! `plugins/build.sh` builds, and the call contexts they are asked with.

use std::path::PathBuf;
use std::sync::Arc;

use gatehouse::plugins::{CallContext, Decision, Denied, PluginError, PluginSet, PluginsConfig};

/// The folder `plugins/build.sh` writes components to.
pub fn plugins_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugins")
}

pub fn wasm(name: &str) -> PathBuf {
    let path = plugins_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with `plugins/build.sh`",
        path.display()
    );
    path
}

/// Loads a set from YAML; `{dir}` stands for the components folder. Every
/// test shares one engine; its compile cache lives under target/.
pub fn load(yaml: &str) -> Result<Arc<PluginSet>, PluginError> {
    let yaml = yaml.replace("{dir}", &plugins_dir().display().to_string());
    let mut cfg: PluginsConfig = serde_saphyr::from_str(&yaml).expect("test config parses");
    cfg.engine.cache_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugin-cache-tests"));
    for m in &cfg.modules {
        wasm(m.path.file_stem().unwrap().to_str().unwrap());
    }
    PluginSet::load(&cfg)
}

pub fn ctx<'a>(server: &'a str, name: &'a str) -> CallContext<'a> {
    CallContext {
        method: "tools/call",
        server,
        name: Some(name),
        principal: Some("alice"),
        session_id: "session-1",
        profile: None,
        groups: &[],
        scopes: &[],
    }
}

pub fn denied(d: Decision) -> Denied {
    match d {
        Decision::Deny(denied) => denied,
        other => panic!("expected a denial, got {other:?}"),
    }
}
