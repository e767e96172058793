//! Errors of the plugin host: loading errors ([`PluginError`]) and the ways a
//! single plugin call can fail ([`Fault`]).

use std::path::PathBuf;
use std::time::Duration;

/// Why plugins could not be loaded (or checked).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The configuration is inconsistent; `field` names the place at fault.
    #[error("{field}: {message}")]
    Config {
        /// Where in the config, e.g. `plugins[1].name`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The plugin file could not be read.
    #[error("plugin {plugin}: cannot read {}: {source}", path.display())]
    Read {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid WebAssembly component.
    #[error("plugin {plugin}: {} is not a valid component: {message}", path.display())]
    Compile {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The compiler's error.
        message: String,
    },
    /// The component does not fit the `gatehouse:plugin` interface (missing
    /// export, wrong types, or an import the gateway does not provide).
    #[error("plugin {plugin}: does not implement gatehouse:plugin/plugin@0.3.0: {message}")]
    Interface {
        /// The plugin's name.
        plugin: String,
        /// What does not fit.
        message: String,
    },
    /// The first instance of the plugin failed to start or `init` refused
    /// the configuration.
    #[error("plugin {plugin}: {fault}")]
    Init {
        /// The plugin's name.
        plugin: String,
        /// What went wrong.
        fault: Fault,
    },
    /// The shared engine could not be created.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// A `plugin check` sample is not usable.
    #[error("sample input: {0}")]
    Input(String),
}

impl PluginError {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        PluginError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// How one plugin call failed. The call's request is denied (or, for a
/// fail-open plugin, the plugin is skipped); the gateway and other calls are
/// not affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The call ran past its deadline and was interrupted.
    #[error("exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// The guest tried to grow its memory past the limit.
    #[error("exceeded its memory limit of {limit} bytes (asked for {asked})")]
    Memory {
        /// The configured limit.
        limit: usize,
        /// The size the guest asked for.
        asked: usize,
    },
    /// The guest trapped (a panic, an `unreachable`, a bad memory access).
    #[error("trapped: {0}")]
    Trap(String),
    /// The guest answered something the host cannot use (a rewrite that is
    /// not JSON, a filter answer of the wrong length, bad UTF-8).
    #[error("returned malformed output: {0}")]
    Malformed(String),
    /// `init` refused the configuration.
    #[error("init failed: {0}")]
    InitRejected(String),
    /// No instance could be created (a resource other than the instance pool).
    #[error("could not be instantiated: {0}")]
    Unavailable(String),
    /// Every instance slot (`plugins.engine.max_instances`) is taken: a load any client can
    /// cause, so it refuses the call even where the plugin fails open (skipping would let a
    /// flood of calls walk around the plugin).
    #[error("has no free instance (plugins.engine.max_instances are all in use); retry shortly")]
    Busy,
    /// A state operation could not be run (the replica that keeps the state is unreachable).
    #[error("could not use its state: {0}")]
    State(String),
    /// The guest's rewrite is larger than the gateway takes ([`super::MAX_REWRITE_BYTES`]): a
    /// payload can make it so at will (a redaction lengthens what it masks), so it refuses the
    /// call even where the plugin fails open. Counted as [`FaultKind::Malformed`].
    #[error("returned a rewrite of {0} bytes, larger than the gateway takes ({max} bytes)", max = super::MAX_REWRITE_BYTES)]
    Oversized(usize),
    /// A state operation was refused because the session was deleted (on another replica): the
    /// client's doing, not an outage, so it refuses the call even where the plugin fails open.
    #[error("cannot go on: the session was deleted")]
    SessionDeleted,
}

impl Fault {
    /// The kind of fault, for metrics and tests.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Deadline(_) => FaultKind::Deadline,
            Fault::Memory { .. } => FaultKind::Memory,
            Fault::Trap(_) => FaultKind::Trap,
            Fault::Malformed(_) | Fault::Oversized(_) => FaultKind::Malformed,
            Fault::InitRejected(_) => FaultKind::Init,
            Fault::Unavailable(_) | Fault::Busy | Fault::State(_) | Fault::SessionDeleted => {
                FaultKind::Unavailable
            }
        }
    }
}

/// The kind of a [`Fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// See [`Fault::Deadline`].
    Deadline,
    /// See [`Fault::Memory`].
    Memory,
    /// See [`Fault::Trap`].
    Trap,
    /// See [`Fault::Malformed`].
    Malformed,
    /// See [`Fault::InitRejected`]. (A deadline or trap during `init` of a
    /// fresh instance counts as [`FaultKind::Deadline`] / [`FaultKind::Trap`].)
    Init,
    /// See [`Fault::Unavailable`] and [`Fault::State`].
    Unavailable,
}
