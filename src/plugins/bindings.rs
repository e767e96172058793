//! Host bindings for the WIT world `gatehouse:plugin/plugin`, generated once
//! from the repository's `wit/` folder.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
});

pub use gatehouse::plugin::types::{CallContext, Decision, EntryKind, HookSet, ListEntry};
