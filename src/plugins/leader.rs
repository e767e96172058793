//! Plugin state kept by the leading replica: how the others ask it.
//!
//! Every replica runs the same plugins on its own calls, but a rate limit must count all of
//! them and a taint must follow a session to whichever replica serves it next. So, where
//! replicas elect a leader and reach it through its relay (Kubernetes), the leader keeps the
//! state and the others send it each operation: one POST to its relay's [`PATH`], with the
//! replicas' shared secret. An operation that cannot reach it fails the plugin's call (the
//! gateway then refuses the request, unless the plugin fails open): a policy that counts or
//! remembers must not go on as though it had counted or remembered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::watch;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::upstream::pool::{Endpoint, Pool};

/// Path of the state operations on the leader's relay.
pub const PATH: &str = "/plugin-state";
/// Largest operation sent (a key, a 64 KiB value escaped as JSON at worst 6 bytes a byte, a
/// session id and a principal), and what the relay reads at most.
pub const MAX_ASKED: usize = 512 * 1024;
/// Largest answer read (a value, escaped).
const MAX_ANSWER: usize = 512 * 1024;
/// How long an operation waits for a leader to be known (an election under way, a new pod).
const WAIT_FOR_LEADER: Duration = Duration::from_secs(2);
/// How long an operation may take on the leader, the round trip included: well inside a
/// plugin's deadline is not possible for every deadline, and a slow leader must not hold calls
/// for long.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Why a state operation could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// No replica leads, or its relay or the secret are not known yet.
    #[error("plugin state is kept by the leading replica, and none is known")]
    NoLeader,
    /// The leader did not answer in time, or not at all.
    #[error("the leading replica, which keeps plugin state, did not answer: {0}")]
    Unreachable(String),
    /// It answered something other than an outcome.
    #[error("the leading replica refused a plugin state operation: {0}")]
    Refused(String),
    /// A hook called outside the runtime (a tool, a test) cannot ask another replica.
    #[error("plugin state is kept by the leading replica, not reachable outside the runtime")]
    Blocking,
}

/// The leading replica, as the others reach it.
#[derive(Clone)]
pub struct Leader(Arc<Inner>);

struct Inner {
    leading: watch::Receiver<bool>,
    /// Its relay's base URL while another replica leads.
    relay: watch::Receiver<Option<String>>,
    secret: watch::Receiver<Option<Arc<str>>>,
    pool: Arc<Pool>,
    /// The endpoint of the last relay asked, worked out once per leader.
    endpoint: Mutex<Option<(String, Arc<Endpoint>)>>,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("leads", &self.leads())
            .field("relay", &*self.0.relay.borrow())
            .finish_non_exhaustive()
    }
}

impl Leader {
    /// The leader as this replica sees it: whether it leads itself, the leader's relay, and the
    /// replicas' secret, each as it changes.
    pub fn new(
        leading: watch::Receiver<bool>,
        relay: watch::Receiver<Option<String>>,
        secret: watch::Receiver<Option<Arc<str>>>,
    ) -> Leader {
        Leader(Arc::new(Inner {
            leading,
            relay,
            secret,
            pool: Arc::new(Pool::default()),
            endpoint: Mutex::new(None),
        }))
    }

    /// Whether this replica leads (and so keeps the state).
    pub fn leads(&self) -> bool {
        *self.0.leading.borrow()
    }

    /// Changes of leadership.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.0.leading.clone()
    }

    /// Runs `asked` on the leader, and reads what it gave.
    pub async fn ask<A: Serialize, O: DeserializeOwned>(
        &self,
        asked: &A,
    ) -> Result<O, Unavailable> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Unavailable::Blocking);
        }
        let body = serde_json::to_vec(asked).map_err(|e| Unavailable::Refused(e.to_string()))?;
        let answer = tokio::time::timeout(TIMEOUT, self.send(Bytes::from(body)))
            .await
            .map_err(|_| Unavailable::Unreachable(format!("no answer within {TIMEOUT:?}")))??;
        serde_json::from_slice(&answer).map_err(|e| Unavailable::Refused(e.to_string()))
    }

    /// Tells the leader `told`, in the background, for what it is worth (nothing waits for the
    /// answer).
    pub fn tell<A: Serialize>(&self, told: &A) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(body) = serde_json::to_vec(told) else {
            return;
        };
        let leader = self.clone();
        runtime.spawn(async move {
            let sent = tokio::time::timeout(TIMEOUT, leader.send(Bytes::from(body))).await;
            if !matches!(sent, Ok(Ok(_))) {
                tracing::debug!("could not tell the leading replica something about plugin state");
            }
        });
    }

    /// The leader's relay and the secret, waiting a little for them to be known.
    async fn target(&self) -> Result<(Arc<Endpoint>, Arc<str>), Unavailable> {
        let (mut relay, mut secret) = (self.0.relay.clone(), self.0.secret.clone());
        // (A sender may be gone once its value is final: the secret, read once.)
        let known = async {
            let url = relay.wait_for(Option::is_some).await.ok()?.clone()?;
            let key = secret.wait_for(Option::is_some).await.ok()?.clone()?;
            Some((url, key))
        };
        // Nor is there anyone to ask once this replica leads itself.
        let mut leading = self.0.leading.clone();
        let leads = async { leading.wait_for(|l| *l).await.is_ok() };
        let found = tokio::time::timeout(WAIT_FOR_LEADER, async {
            tokio::select! {
                k = known => k,
                _ = leads => None,
            }
        });
        let (url, key) = found.await.ok().flatten().ok_or(Unavailable::NoLeader)?;
        let mut cached = lock(&self.0.endpoint);
        if let Some((at, endpoint)) = &*cached
            && *at == url
        {
            return Ok((endpoint.clone(), key));
        }
        // (Its address is not told: the message reaches the client.)
        let uri: Uri = format!("{url}{PATH}")
            .parse()
            .map_err(|_| Unavailable::Unreachable("its relay's address is not a URL".into()))?;
        let endpoint = Arc::new(Endpoint::new(&uri).map_err(|_| {
            Unavailable::Unreachable("its relay's address is not an http URL".into())
        })?);
        *cached = Some((url, endpoint.clone()));
        Ok((endpoint, key))
    }

    async fn send(&self, body: Bytes) -> Result<Bytes, Unavailable> {
        let (endpoint, secret) = self.target().await?;
        let bearer = HeaderValue::from_str(&format!("Bearer {secret}"))
            .map_err(|_| Unavailable::Refused("the relay secret is not a header value".into()))?;
        let req = Request::builder()
            .method(Method::POST)
            .header(AUTHORIZATION, bearer)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| Unavailable::Refused(e.to_string()))?;
        let resp = self
            .0
            .pool
            .send(&endpoint, req)
            .await
            .map_err(Unavailable::Unreachable)?;
        let status = resp.status();
        let answer = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| Unavailable::Unreachable(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(256)]).into_owned();
            return Err(Unavailable::Refused(format!("{status}: {text}")));
        }
        Ok(answer)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
