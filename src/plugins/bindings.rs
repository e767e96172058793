//! Host bindings for the WIT world `gatehouse:plugin/plugin`, generated once
//! from the repository's `wit/` folder.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
    // Exports are called with `call_async` so a long call can yield to the runtime;
    // imports stay synchronous (they never wait).
    exports: { default: async },
    // The call context and list entries go in as borrowed strings: the host already holds
    // them, and owned copies cost an allocation per string on every hook call.
    ownership: Borrowing { duplicate_if_necessary: false },
});

// `self::` keeps the generated `gatehouse` module apart from this crate, also in doctests.
pub use self::gatehouse::plugin::types::{CallContext, Decision, EntryKind, HookSet, ListEntry};
