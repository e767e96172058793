//! The plugin host's instance pool when every slot is taken. A binary of its own: the engine
//! (and its pool of `plugins.engine.max_instances` slots) is created once per process, by the
//! first set loaded, so this test's one-slot engine must be the only one here.

use std::time::Duration;

use gatehouse::plugins::{Decision, FaultKind, JsonText};

mod plugin_sets;
use plugin_sets::{ctx, denied, load};

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
    )
    .unwrap();
    let (trigger, other) = (ctx("s", "trigger"), ctx("s", "other"));
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
