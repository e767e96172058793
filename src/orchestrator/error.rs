//! The orchestrator's typed errors.

use std::time::Duration;

use super::{FailureReason, spec::SpecError};

/// Why an orchestrator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// No server of that name is defined.
    #[error("no MCP server named {0:?}")]
    NotFound(String),
    /// A server of that name is defined already (a definition only for a new server).
    #[error("a server named {0:?} is defined already")]
    Exists(String),
    /// Others kept changing what this change was to write.
    #[error("{0}")]
    Conflict(String),
    /// The definition is invalid.
    #[error("invalid server definition: {0}")]
    Invalid(#[from] SpecError),
    /// The definition lacks what this backend needs.
    #[error("server {server:?}: the {backend} backend needs {what}")]
    Unsupported {
        /// Server name.
        server: String,
        /// Backend name.
        backend: &'static str,
        /// What is missing.
        what: &'static str,
    },
    /// The server cannot become ready without a change.
    #[error("server {server:?} failed: {reason}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Failed {
        /// Server name.
        server: String,
        /// Why.
        reason: FailureReason,
        /// Details from the process or the kubelet.
        message: Option<String>,
    },
    /// The server did not become ready in time.
    #[error("server {server:?} not ready after {waited:?} (last: {last})")]
    Timeout {
        /// Server name.
        server: String,
        /// How long we waited.
        waited: Duration,
        /// The last phase seen, with its message.
        last: String,
    },
    /// The server was removed while we waited for it.
    #[error("server {0:?} was removed")]
    Removed(String),
    /// The server is not running, so there is nothing to attach to.
    #[error("server {server:?} is not running: {detail}")]
    NotRunning {
        /// Server name.
        server: String,
        /// Its phase.
        detail: String,
    },
    /// The operation does not apply to this server's transport.
    #[error("server {server:?} does not speak {expected}")]
    WrongTransport {
        /// Server name.
        server: String,
        /// The transport the operation needs.
        expected: &'static str,
    },
    /// The server is remote: nothing of it runs here to restart or read logs of.
    #[error("server {server:?} runs elsewhere (remote): it has no {what} here")]
    Remote {
        /// Server name.
        server: String,
        /// What it has not (`process`, `logs`).
        what: &'static str,
    },
    /// A Kubernetes API call failed.
    #[error("kubernetes: {action}: {source}")]
    Kube {
        /// What we were doing, e.g. `apply Deployment mcp-x`.
        action: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// Attaching to a pod or a process failed.
    #[error("attach to server {server:?}: {detail}")]
    Attach {
        /// Server name.
        server: String,
        /// What failed.
        detail: String,
    },
    /// Orchestrator settings (environment, kubeconfig) are invalid.
    #[error("orchestrator settings: {0}")]
    Settings(String),
    /// No logs are available (e.g. `previous` before any restart).
    #[error("no logs for server {server:?}: {detail}")]
    NoLogs {
        /// Server name.
        server: String,
        /// Why.
        detail: String,
    },
}

impl OrchestratorError {
    /// Wraps a kube error with what we were doing.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        OrchestratorError::Kube {
            action: action.into(),
            source: Box::new(source),
        }
    }
}
