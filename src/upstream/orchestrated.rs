//! Upstreams the orchestrator runs: wait until the server is ready, then reach its endpoint.
//!
//! An HTTP server is reached like any HTTP upstream (one MCP session per client session). A
//! stdio server is one process (one pod) holding one MCP session, which every client session
//! shares through [`SharedServer`] (or one process per principal, or per session, as its
//! `sharing` says).

use std::sync::Arc;

use super::shared::SharedServer;
use super::{Server, UpstreamError};
use crate::orchestrator::{Endpoint, Runtime, StdioEndpoint};

/// How an orchestrated server is run and reached.
#[derive(Clone)]
pub struct Orchestrated {
    /// The backend running it.
    pub runtime: Arc<dyn Runtime>,
    /// Its shared upstream sessions, when it speaks stdio.
    pub shared: Arc<SharedServer>,
}

/// A ready server's endpoint.
pub enum Ready {
    /// Streamable HTTP at this URL.
    Http(http::Uri),
    /// stdio through an attachment.
    Stdio(StdioEndpoint),
    /// stdio through the leading replica's relay: Streamable HTTP at this URL, with these
    /// headers (its credentials).
    Relay(http::Uri, http::HeaderMap),
}

impl Orchestrated {
    /// Waits (within the server's connect timeout) until the server is ready.
    ///
    /// The orchestrator fails fast on fatal states (an image that cannot be pulled, a crash
    /// loop...), and its reason becomes the client's error.
    pub async fn ready(&self, server: &Server) -> Result<Ready, UpstreamError> {
        // Leave part of the connect deadline for the MCP handshake, so that a slow start
        // reports the orchestrator's last known phase rather than a bare timeout.
        let wait = server.config.connect_timeout.mul_f32(0.9);
        match self.runtime.wait_ready(&server.name, wait).await {
            Ok(Endpoint::Http { url }) => url
                .parse()
                .map(Ready::Http)
                .map_err(|e| server.unavailable(format!("endpoint {url:?} is not a URL: {e}"))),
            Ok(Endpoint::Stdio(endpoint)) => Ok(Ready::Stdio(endpoint)),
            Ok(Endpoint::Relay { url, secret }) => {
                let uri = url
                    .parse()
                    .map_err(|e| server.unavailable(format!("relay {url:?} is not a URL: {e}")))?;
                let mut bearer = http::HeaderValue::try_from(format!("Bearer {secret}"))
                    .map_err(|_| server.unavailable("the relay secret is not a header value"))?;
                bearer.set_sensitive(true);
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, bearer);
                Ok(Ready::Relay(uri, headers))
            }
            Err(e) => Err(server.unavailable(e.to_string())),
        }
    }
}
