//! A small text document the backend keeps for the gateway (its tool pins), shared by every
//! replica: a ConfigMap on Kubernetes. Writes are conditional on the version read, so two
//! replicas never overwrite each other's changes unseen.

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// A version of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its text.
    pub text: String,
    /// Its version (opaque: a ConfigMap's resourceVersion).
    pub version: String,
}

/// Why the document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Someone else wrote it since the version given (read it again, merge, retry).
    #[error("the document changed since it was read")]
    Conflict,
    /// The text is larger than the store holds.
    #[error("{size} bytes is more than the store holds ({limit})")]
    TooLarge {
        /// The text's size.
        size: usize,
        /// The most the store holds.
        limit: usize,
    },
    /// The store's API failed.
    #[error("{0}")]
    Api(String),
}

/// A document kept by the orchestrator's backend.
pub trait DocumentStore: Send + Sync {
    /// Where it is kept, for messages (`ConfigMap mcp/gatehouse-pins`).
    fn describe(&self) -> String;
    /// The document as stored (`None`: it does not exist yet; empty text: it exists and holds
    /// nothing yet).
    fn read(&self) -> BoxFuture<'_, Result<Option<Stored>, DocumentError>>;
    /// Writes `text` if the stored version is still `version` (`None`: only if it does not
    /// exist); returns the new version.
    fn write<'a>(
        &'a self,
        text: &'a str,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, DocumentError>>;
    /// Every version written from now on, by anyone, and `None` when it is deleted (watched:
    /// no polling).
    fn changes(&self) -> BoxStream<'static, Option<Stored>>;
}
