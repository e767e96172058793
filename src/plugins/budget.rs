//! The time budget of one plugin call, kept in the store for the epoch callback.

use std::time::{Duration, Instant};

/// How a hook call waits: on the async runtime, or blocking its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Polled by the tokio runtime: a long call yields to it at every tick.
    Async,
    /// Driven to completion on the calling thread (`block_on`): loading,
    /// `gatehouse plugin check`, tools and tests outside a runtime. Never
    /// yields, since tokio's yield would wait for a worker this thread may be.
    Blocking,
}

/// The time a running call (or instantiation) may take, kept in the store
/// for the epoch callback.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// When the call began.
    pub(crate) started: Instant,
    /// How long it may take, waits for a worker included.
    pub(crate) limit: Duration,
    /// How it waits.
    pub(crate) mode: Mode,
}

impl Budget {
    /// A budget of `limit` from now.
    pub(crate) fn new(limit: Duration, mode: Mode) -> Budget {
        Budget {
            started: Instant::now(),
            limit,
            mode,
        }
    }
}
