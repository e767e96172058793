//! Host bindings for the WIT world `gatehouse:plugin/plugin`, generated once
//! from the repository's `wit/` folder.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
    // Exports are called with `call_async` so a long call can yield to the runtime;
    // imports stay synchronous (they never wait).
    exports: { default: async },
});

// `self::` keeps the generated `gatehouse` module apart from this crate, also in doctests.
pub use self::gatehouse::plugin::types::{CallContext, Decision, EntryKind, HookSet, ListEntry};
