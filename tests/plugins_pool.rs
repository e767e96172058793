//! The plugin host's instance pool when every slot is taken. A binary of its own: the engine
//! (and its pool of `plugins.engine.max_instances` slots) is created once per process, by the
//! first set loaded, so this test's one-slot engine must be the only one here.

use std::path::PathBuf;
use std::time::Duration;

use gatehouse::plugins::{
    CallContext, Decision, Denied, FaultKind, JsonText, PluginSet, PluginsConfig,
};

fn load(yaml: &str) -> std::sync::Arc<PluginSet> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugins");
    assert!(
        dir.join("fault_loop.wasm").exists(),
        "build the plugins first with `plugins/build.sh`"
    );
    let yaml = yaml.replace("{dir}", &dir.display().to_string());
    let mut cfg: PluginsConfig = serde_saphyr::from_str(&yaml).expect("test config parses");
    cfg.engine.cache_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/plugin-cache-tests"));
    PluginSet::load(&cfg).expect("loads")
}

fn ctx(name: &str) -> CallContext<'_> {
    CallContext {
        method: "tools/call",
        server: "s",
        name: Some(name),
        principal: Some("alice"),
        session_id: "session-1",
        profile: None,
        groups: &[],
        scopes: &[],
    }
}

fn denied(d: Decision) -> Denied {
    match d {
        Decision::Deny(denied) => denied,
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// Instance slots (`plugins.engine.max_instances`) are a load any client can cause: with every
/// slot taken, a call is refused as busy (-32012) even through a plugin that fails open, not
/// waved past the plugin; once a slot is free the plugin judges again.
#[tokio::test(flavor = "current_thread")]
async fn a_full_instance_pool_refuses_calls_even_where_the_plugin_fails_open() {
    let set = load(
        r#"
modules: [ { name: loop, path: "{dir}/fault_loop.wasm", deadline: 5s, fail_open: true } ]
chains: [ { plugins: [loop] } ]
engine: { max_instances: 1 }
"#,
    );
    let (trigger, other) = (ctx("trigger"), ctx("other"));
    let empty = JsonText::EMPTY_OBJECT;
    {
        // A call that spins holds the one slot while it is suspended.
        let mut spin = std::pin::pin!(set.on_request(&trigger, &empty));
        tokio::select! {
            _ = &mut spin => panic!("the looping call cannot finish"),
            _ = tokio::time::sleep(Duration::from_millis(30)) => {}
        }
        let d = denied(set.on_request(&other, &empty).await);
        assert_eq!(d.code, -32012, "{d:?}");
        assert!(d.message.contains("no free instance"), "{d:?}");
        assert_eq!(d.fault, Some(FaultKind::Unavailable));
        let skips = set
            .metrics()
            .into_iter()
            .find(|(n, _)| n == "loop")
            .unwrap()
            .1;
        assert_eq!(skips.fail_open_skips, 0);
    }
    // The spinning call is gone (its client went away): its slot is free again.
    let after = set.on_request(&other, &empty).await;
    assert!(matches!(after, Decision::Allow), "{after:?}");
}
