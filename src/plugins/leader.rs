//! Plugin state kept by the leading replica: how the others ask it.
//!
//! Every replica runs the same plugins on its own calls, but a rate limit must count all of
//! them and a taint must follow a session to whichever replica serves it next. So, where
//! replicas elect a leader and reach it through its relay (Kubernetes), the leader keeps the
//! state and the others send it each operation: one POST to its relay's [`PATH`], over TLS
//! with the replicas' key, on one HTTP/2 connection this replica holds for them. An
//! operation that cannot be run fails the plugin's call (the gateway then refuses the request,
//! unless the plugin fails open): a policy that counts or remembers must not go on as though
//! it had counted or remembered.
//!
//! A replica that comes to lead takes the state over from the one it took the lease from
//! ([`Handover`]): it reads that one's [`HANDOVER_PATH`] before it applies anything, so a
//! rolling upgrade neither resets a limit nor clears a taint.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, watch};

use crate::orchestrator::Handover;
use crate::replica_key::ReplicaKey;
use crate::upstream::client::plugin_state_client;

/// Path of the state operations on the leader's relay.
pub const PATH: &str = "/plugin-state";
/// Path, on the relay of a replica that led, of the state it kept (for the next leader).
pub const HANDOVER_PATH: &str = "/plugin-state/handover";
/// Largest state handed over (what the previous leader writes and the next one reads).
pub const MAX_HANDOVER: usize = 64 * 1024 * 1024;
/// How long taking the state over may take (it is as large as the state).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest operation sent (a key, a 64 KiB value escaped as JSON at worst 6 bytes a byte, a
/// session id and a principal), and what the relay reads at most.
pub const MAX_ASKED: usize = 512 * 1024;
/// Largest answer read (a value, escaped).
const MAX_ANSWER: usize = 512 * 1024;
/// How long an operation waits for a leader to be known (an election under way, a new pod),
/// within the plugin's own deadline.
const WAIT_FOR_LEADER: Duration = Duration::from_secs(2);
/// How long the exchange with the leader may take, within the plugin's own deadline: a slow
/// leader must not hold calls for long.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Ends of sessions told at once; more are not told (their state goes once unused).
const MAX_TELLING: usize = 64;
/// How long telling the leader of a session's end may take, leadership moving meanwhile (a
/// lease duration, once expired, and a retry).
const TELL_WITHIN: Duration = Duration::from_secs(20);

/// Why a state operation could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// No replica leads, or its relay or the replicas' key are not known yet.
    #[error("plugin state is kept by the leading replica, and none is known")]
    NoLeader,
    /// The leader could not be reached, or its answer not read (why, for the log).
    #[error("the leading replica, which keeps plugin state, did not answer: {0}")]
    Unreachable(String),
    /// The leader did not answer within the time given.
    #[error("the leading replica, which keeps plugin state, did not answer within {0}")]
    Late(&'static str),
    /// It answered something other than an outcome (what it said is logged).
    #[error("the leading replica refused a plugin state operation")]
    Refused,
    /// The previous leader has not stepped down yet.
    #[error("the previous leader has not stepped down yet")]
    StillLeading,
    /// The previous leader has nothing to hand over.
    #[error("the previous leader has no plugin state to hand over")]
    NothingThere,
    /// This replica has come to lead and is taking the state over from the previous leader.
    #[error("the replica that has come to lead is still taking plugin state over")]
    TakingOver,
    /// The session was deleted: what its plugins kept is gone, and it cannot go on.
    #[error("the session was deleted")]
    SessionDeleted,
    /// A hook called outside the runtime (a tool, a test) cannot ask another replica.
    #[error("plugin state is kept by the leading replica, not reachable outside the runtime")]
    Blocking,
}

impl Unavailable {
    /// What a client may be told: the reason, but no replica's address, status or network
    /// error (those go to the log).
    pub fn for_client(&self) -> String {
        match self {
            Unavailable::Unreachable(_) => {
                "the leading replica, which keeps plugin state, did not answer".into()
            }
            other => other.to_string(),
        }
    }
}

/// The leading replica, as the others reach it.
#[derive(Clone)]
pub struct Leader(Arc<Inner>);

struct Inner {
    leading: watch::Receiver<bool>,
    /// Its relay's base URL while another replica leads.
    relay: watch::Receiver<Option<String>>,
    key: watch::Receiver<Option<Arc<ReplicaKey>>>,
    /// Whom this replica took the lease from, as it last came to lead.
    handover: watch::Receiver<Handover>,
    /// Room for ends of sessions being told.
    telling: Arc<Semaphore>,
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
    /// The leader as this replica sees it: whether it leads itself, the leader's relay, the
    /// replicas' key, and whom it took the lease from, each as it changes.
    pub fn new(
        leading: watch::Receiver<bool>,
        relay: watch::Receiver<Option<String>>,
        key: watch::Receiver<Option<Arc<ReplicaKey>>>,
        handover: watch::Receiver<Handover>,
    ) -> Leader {
        Leader(Arc::new(Inner {
            leading,
            relay,
            key,
            handover,
            telling: Arc::new(Semaphore::new(MAX_TELLING)),
        }))
    }

    /// Whether this replica leads (and so keeps the state).
    pub fn leads(&self) -> bool {
        *self.0.leading.borrow()
    }

    /// Whether another replica is known to lead now.
    pub fn another_leads(&self) -> bool {
        !self.leads() && self.0.relay.borrow().is_some()
    }

    /// Changes of leadership.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.0.leading.clone()
    }

    /// Whom this replica took the lease from, each time it comes to lead (a new value each
    /// time, even the same).
    pub fn handovers(&self) -> watch::Receiver<Handover> {
        self.0.handover.clone()
    }

    /// The state the replica whose relay is at `relay` kept while it led (it hands it over
    /// only once it no longer leads).
    pub async fn take_over_from(&self, relay: &str) -> Result<Bytes, Unavailable> {
        let (key, req) = self.to_handover(relay, Method::GET)?;
        let (status, answer) = exchange(&key, req, MAX_HANDOVER, HANDOVER_TIMEOUT).await?;
        match status {
            StatusCode::OK => Ok(answer),
            // Nothing kept, or a version that hands nothing over (it answers that it does not
            // lead).
            StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE => {
                Err(Unavailable::NothingThere)
            }
            // It has not stepped down yet, or is taking the state over itself.
            StatusCode::CONFLICT => Err(Unavailable::StillLeading),
            status => Err(Unavailable::Unreachable(format!("it answered {status}"))),
        }
    }

    /// Tells the replica whose relay is at `relay` that what it kept was taken over (it may
    /// stop now), for what it is worth.
    pub async fn acknowledge(&self, relay: &str) {
        let Ok((key, req)) = self.to_handover(relay, Method::POST) else {
            return;
        };
        if !matches!(
            exchange(&key, req, MAX_ANSWER, TIMEOUT).await,
            Ok((StatusCode::OK, _))
        ) {
            tracing::debug!("could not tell the previous leader that its state was taken over");
        }
    }

    fn to_handover(
        &self,
        relay: &str,
        method: Method,
    ) -> Result<(Arc<ReplicaKey>, Request<Full<Bytes>>), Unavailable> {
        let key = self.0.key.borrow().clone();
        let key = key.ok_or(Unavailable::NoLeader)?;
        let uri: Uri = format!("{relay}{HANDOVER_PATH}")
            .parse()
            .map_err(|_| Unavailable::Unreachable("its relay's address is not a URL".into()))?;
        Ok((key, request(method, uri, Bytes::new())?))
    }

    /// Runs `asked` on the leader within `deadline` (what is left of the plugin's), and reads
    /// what it gave.
    pub async fn ask<A: Serialize, O: DeserializeOwned>(
        &self,
        asked: &A,
        deadline: Duration,
    ) -> Result<O, Unavailable> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Unavailable::Blocking);
        }
        let body = serde_json::to_vec(asked).map_err(|e| {
            tracing::warn!("a plugin state operation cannot be written: {e}");
            Unavailable::Refused
        })?;
        let answer = tokio::time::timeout(deadline, self.send(Bytes::from(body)))
            .await
            .map_err(|_| Unavailable::Late("the plugin's deadline"))??;
        serde_json::from_slice(&answer).map_err(|e| {
            tracing::warn!("the leading replica answered a plugin state operation unreadably: {e}");
            Unavailable::Refused
        })
    }

    /// Tells the leader `told`, in the background, for what it is worth (nothing waits for the
    /// answer, and beyond [`MAX_TELLING`] at once nothing is told).
    pub fn tell<A: Serialize>(&self, told: &A) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(permit) = self.0.telling.clone().try_acquire_owned() else {
            tracing::debug!("too many session ends being told to the leading replica");
            return;
        };
        let Ok(body) = serde_json::to_vec(told) else {
            return;
        };
        let leader = self.clone();
        let body = Bytes::from(body);
        runtime.spawn(async move {
            let _permit = permit;
            // Again while leadership moves (the old leader refuses, the new one is not known
            // yet): a deleted session's state must not outlive its deletion for that.
            let until = tokio::time::Instant::now() + TELL_WITHIN;
            let mut pause = Duration::from_millis(100);
            loop {
                let sent =
                    tokio::time::timeout(WAIT_FOR_LEADER + TIMEOUT, leader.send(body.clone()))
                        .await;
                if matches!(sent, Ok(Ok(_))) {
                    return;
                }
                if leader.leads() || tokio::time::Instant::now() + pause >= until {
                    tracing::debug!("could not tell the leading replica that a session ended");
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// The leader's relay and the replicas' key, waiting a little for them to be known.
    async fn target(&self) -> Result<(Uri, Arc<ReplicaKey>), Unavailable> {
        let (mut relay, mut key) = (self.0.relay.clone(), self.0.key.clone());
        // (A sender may be gone once its value is final: the key, derived once.)
        let known = async {
            let url = relay.wait_for(Option::is_some).await.ok()?.clone()?;
            let key = key.wait_for(Option::is_some).await.ok()?.clone()?;
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
        // (Its address is not told: the message reaches the client.)
        let uri: Uri = format!("{url}{PATH}")
            .parse()
            .map_err(|_| Unavailable::Unreachable("its relay's address is not a URL".into()))?;
        Ok((uri, key))
    }

    async fn send(&self, body: Bytes) -> Result<Bytes, Unavailable> {
        let (uri, key) = self.target().await?;
        let req = request(Method::POST, uri, body)?;
        let (status, answer) = exchange(&key, req, MAX_ANSWER, TIMEOUT).await?;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(256)]).into_owned();
            // Escaped: a peer's words cannot forge log lines.
            tracing::warn!(%status, "the leading replica refused a plugin state operation: {text:?}");
            return Err(Unavailable::Refused);
        }
        Ok(answer)
    }
}

/// A request to another replica's relay.
fn request(method: Method, uri: Uri, body: Bytes) -> Result<Request<Full<Bytes>>, Unavailable> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| {
            tracing::warn!("a plugin state request cannot be built: {e}");
            Unavailable::Refused
        })
}

/// Sends `req` (over TLS with `key`), and reads an answer of at most `limit` bytes within
/// `timeout`.
async fn exchange(
    key: &Arc<ReplicaKey>,
    req: Request<Full<Bytes>>,
    limit: usize,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), Unavailable> {
    let exchange = async {
        let resp = plugin_state_client(key)
            .request(req)
            .await
            .map_err(|e| Unavailable::Unreachable(crate::upstream::pool::reason(&e)))?;
        let status = resp.status();
        let answer = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| Unavailable::Unreachable(e.to_string()))?
            .to_bytes();
        Ok::<_, Unavailable>((status, answer))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Unavailable::Late("the time a replica waits for another"))?
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const SECRET: &str = "a secret of the replicas, long enough";

    /// A session's end told while leadership moves (the old leader refuses it) is told again
    /// until a leader takes it.
    #[tokio::test]
    async fn an_end_refused_while_leadership_moves_is_told_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let key = Arc::new(ReplicaKey::derive(SECRET).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(key.server_config());
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let asked = counted.clone();
                let service = hyper::service::service_fn(move |_: Request<_>| {
                    let n = asked.fetch_add(1, Ordering::SeqCst);
                    async move {
                        // Twice "not leading" (503), then taken.
                        let status = match n {
                            0 | 1 => StatusCode::SERVICE_UNAVAILABLE,
                            _ => StatusCode::OK,
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from("\"done\"")));
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service),
                );
            }
        });
        let (_leading, leading) = watch::channel(false);
        let (_relay, relay) = watch::channel(Some(url));
        let (_key, key) = watch::channel(Some(key));
        let (_handover, handover) = watch::channel(Handover::Nobody);
        let leader = Leader::new(leading, relay, key, handover);
        leader.tell(&serde_json::json!({"op": "end-session"}));
        let started = std::time::Instant::now();
        while asked.load(Ordering::SeqCst) < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "told {} times",
                asked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Taken: not told again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        assert_eq!(leader.0.telling.available_permits(), MAX_TELLING);
    }

    /// An unreachable leader: the log learns why, the client only that it did not answer.
    #[tokio::test]
    async fn a_client_is_not_told_how_reaching_the_leader_failed() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let (_leading, leading) = watch::channel(false);
        let (_relay, relay) = watch::channel(Some(format!("https://127.0.0.1:{port}")));
        let key = Arc::new(ReplicaKey::derive(SECRET).unwrap());
        let (_key, key) = watch::channel(Some(key));
        let (_handover, handover) = watch::channel(Handover::Nobody);
        let leader = Leader::new(leading, relay, key, handover);
        let err = leader.send(Bytes::from_static(b"{}")).await.unwrap_err();
        assert!(matches!(err, Unavailable::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("os error"), "{err}");
        let told = err.for_client();
        assert!(
            !told.contains("os error") && !told.contains("tcp") && !told.contains("127.0.0.1"),
            "{told}"
        );
        assert!(told.contains("did not answer"), "{told}");
    }
}
