//! Host bindings for the WIT world `gatehouse:plugin/plugin`, generated once
//! from the repository's `wit/` folder.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
});

// `self::` keeps the generated `gatehouse` module apart from this crate, also in doctests.
pub use self::gatehouse::plugin::types::{CallContext, Decision, EntryKind, HookSet, ListEntry};
