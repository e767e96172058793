//! Upstreams the orchestrator runs: wait until the server is ready, then reach its endpoint.
//!
//! An HTTP server is reached like any HTTP upstream (one MCP session per client session). A
//! stdio server is one process (one pod) holding one MCP session, which every client session
//! shares through [`SharedServer`] (or one process per principal, or per session, as its
//! `sharing` says).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

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
    /// The last lists it gave, served while it sleeps.
    pub listings: Arc<Listings>,
    /// How long a call waits for the server to wake.
    pub wake_timeout: std::time::Duration,
}

/// The first pages of the lists an idle-capable server last gave (one process serving every
/// caller alike), and its `initialize` result: what a session sees while the server sleeps.
#[derive(Debug, Default)]
pub struct Listings {
    last: Mutex<LastLists>,
}

#[derive(Debug, Default)]
struct LastLists {
    /// The usage (one definition of the server) they were learnt under.
    usage: u64,
    /// Its last `initialize` result.
    init: Option<Bytes>,
    pages: Vec<(&'static str, Bytes)>,
}

impl Listings {
    /// Keeps the server's `initialize` result and the first page of `method` it gave, learnt
    /// under `usage` (an earlier definition's are forgotten).
    pub fn keep(&self, usage: u64, init: Bytes, method: &'static str, page: Bytes) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.usage != usage {
            *last = LastLists {
                usage,
                ..LastLists::default()
            };
        }
        last.init = Some(init);
        last.pages.retain(|(m, _)| *m != method);
        last.pages.push((method, page));
    }

    /// Its last `initialize` result under `usage`, once known.
    pub fn init(&self, usage: u64) -> Option<Bytes> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.init.clone().filter(|_| last.usage == usage)
    }

    /// The first page of `method` it last gave under `usage`.
    pub fn page(&self, usage: u64, method: &str) -> Option<Bytes> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.pages
            .iter()
            .find(|(m, _)| *m == method && last.usage == usage)
            .map(|(_, p)| p.clone())
    }
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
        // reports the orchestrator's last known phase rather than a bare timeout. Waking a
        // sleeping server has its own budget.
        let usage = self.runtime.usage(&server.name);
        let asleep = usage.as_ref().is_some_and(|u| u.is_asleep());
        let wakes = usage.as_ref().map(|u| u.wakes());
        let wait = match asleep {
            true => self.wake_timeout,
            false => server.config.connect_timeout.mul_f32(0.9),
        };
        let started = std::time::Instant::now();
        let ready = self.runtime.wait_ready(&server.name, wait).await;
        // A sleep called off before it stopped anything is no wake.
        if asleep && ready.is_ok() && usage.as_ref().map(|u| u.wakes()) != wakes {
            server.metrics.record_wake(server.label, started.elapsed());
        }
        match ready {
            Err(e) if asleep => Err(server.unavailable(format!(
                "the server was asleep (idle) and did not wake within {}: {e}",
                humantime::format_duration(wait)
            ))),
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
