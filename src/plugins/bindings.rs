//! Host bindings for the WIT world `gatehouse:plugin/plugin`, generated once
//! from the repository's `wit/` folder.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
    // Exports are called with `call_async` so a long call can yield to the runtime.
    // Imports are synchronous (they never wait), except state: where replicas share it, an
    // operation is a request to the leading replica, and one that cannot be made traps.
    exports: { default: async },
    imports: { "gatehouse:plugin/state": async | trappable },
    // List entries go in as borrowed strings: the host already holds them, and owned copies
    // cost an allocation per string on every hook call.
    ownership: Borrowing { duplicate_if_necessary: false },
    with: { "gatehouse:plugin/types.call-context": CallHandle },
});

/// The host side of the `call-context` resource: a hook call lends the guest a handle, and
/// the host answers its methods from the call it is running (one at a time per store).
pub struct CallHandle;

// `self::` keeps the generated `gatehouse` module apart from this crate, also in doctests.
pub use self::gatehouse::plugin::types::{Decision, Denial, EntryKind, HookSet, ListEntry};
