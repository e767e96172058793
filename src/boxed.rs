//! Futures built in their box.
//!
//! `Box::pin(fut)` builds `fut` on the stack and then copies it, whole, into the box; an MCP
//! request's futures are KiB, and the copy is a measurable part of a call. Allocating first
//! lets the compiler write the future straight into its box.

use std::future::Future;
use std::pin::Pin;

/// `make()`'s future on the heap, built there rather than moved there.
pub fn in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::<F>::new_uninit(), make()))
}
