//! Multi round-trip requests (2026-07-28) in front of servers that ask their client mid-call.
//!
//! A server of an earlier revision asks its client (sampling, elicitation, roots) while a call
//! runs. A stateless client cannot be asked: the request is answered with an `input_required`
//! result listing what the server asked, and the call waits, parked, for the client to retry
//! with `inputResponses` and the sealed `requestState`. The retry answers the server's requests
//! and picks the call up where it stopped. A call nobody picks up is abandoned after a while:
//! its questions are answered with an error, so the server stops waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::mcp::jsonrpc::{self, Outcome, code};
use crate::mcp::seal::Sealer;
use crate::mcp::session::{BusyGuard, Session};
use crate::upstream::AwaitingClient;

/// What `requestState` tokens are sealed for.
const PURPOSE: &[u8] = b"gatehouse/requestState/v1";
/// What a token carrying a 2026-07-28 server's own `requestState` is sealed for.
const RELAYED: &[u8] = b"gatehouse/requestState/relayed/v1";
/// Longest `requestState` of a server the gateway carries for it.
pub const MAX_RELAYED_STATE: usize = 256 * 1024;
/// Longest `requestState` a client may send back: the longest this gateway issues (a server's
/// state, JSON-escaped at up to six bytes for each of its own, with the names it is bound to,
/// sealed). A longer one is refused before it is decoded or opened.
pub const MAX_STATE_TOKEN: usize = crate::mcp::seal::sealed_len(MAX_RELAYED_STATE * 6 + 64 * 1024);

/// A server's question to the client, waiting for the client's answer.
pub struct Asked {
    /// The key the client answers it under (`inputRequests` / `inputResponses`).
    pub key: String,
    /// The request's id in the session (raw JSON), to answer it with.
    pub id: Bytes,
    /// What the server asked.
    pub method: String,
    /// Its params (raw JSON).
    pub params: Option<Bytes>,
}

/// The messages of a call in flight, ending with its answer; a message read too early can be
/// held back for the next reader.
pub struct CallStream {
    rx: mpsc::Receiver<Bytes>,
    held: Option<Bytes>,
    awaiting: AwaitingClient,
}

impl CallStream {
    /// The stream of a call's messages; `awaiting` is the mark its upstream call was given.
    pub fn new(rx: mpsc::Receiver<Bytes>, awaiting: AwaitingClient) -> CallStream {
        CallStream {
            rx,
            held: None,
            awaiting,
        }
    }

    /// Marks the call as waiting for its client's answers (parked), or working again: a server
    /// message that names no call is not inferred to be a parked one's.
    pub fn awaiting_client(&self, awaiting: bool) {
        self.awaiting.set(awaiting);
    }

    /// The next message; `None` once the call has ended.
    pub async fn recv(&mut self) -> Option<Bytes> {
        match self.held.take() {
            Some(frame) => Some(frame),
            None => self.rx.recv().await,
        }
    }

    /// Gives `frame` back: the next [`CallStream::recv`] returns it.
    pub fn hold(&mut self, frame: Bytes) {
        debug_assert!(self.held.is_none());
        self.held = Some(frame);
    }
}

/// A call waiting for the client's answers.
pub struct Parked {
    /// The session the call runs in.
    pub session: Arc<Session>,
    /// The rest of the call's stream: more messages, then its answer.
    pub stream: CallStream,
    /// The questions waiting for answers.
    pub asked: Vec<Asked>,
    /// Who asked; only they may pick it up.
    pub principal: Option<Principal>,
    /// The request's method and target (tool or prompt name, resource URI): a retry must match.
    pub method: String,
    /// See `method`.
    pub target: Option<String>,
    /// Keeps the session from expiring while the call waits.
    pub busy: BusyGuard,
    /// When the call is abandoned; set by [`RoundTrips::park`].
    pub expires: Option<tokio::time::Instant>,
    /// The task that abandons it then.
    timer: Option<tokio::task::AbortHandle>,
}

impl Parked {
    /// A call to park: its session and stream, the questions waiting, and who asked what.
    pub fn new(
        session: Arc<Session>,
        stream: CallStream,
        asked: Vec<Asked>,
        principal: Option<Principal>,
        request: (String, Option<String>),
        busy: BusyGuard,
    ) -> Parked {
        Parked {
            session,
            stream,
            asked,
            principal,
            method: request.0,
            target: request.1,
            busy,
            expires: None,
            timer: None,
        }
    }
}

impl Parked {
    /// Answers the questions still open with an error, so the server stops waiting.
    async fn abandon(self) {
        // Its server may react to the refusal: the call is working again, if briefly (its
        // stream goes with it, which ends the call upstream).
        self.stream.awaiting_client(false);
        let error =
            jsonrpc::error_object(code::REQUEST_CANCELLED, "the client did not answer in time");
        for asked in &self.asked {
            self.session
                .answer_for_client(&asked.id, &Outcome::Error(error.clone()))
                .await;
        }
    }
}

/// What a `requestState` token carries.
#[derive(Serialize, Deserialize)]
struct State {
    /// The parked call.
    i: u64,
    /// The principal it was issued to.
    p: Option<String>,
    /// Expiry, Unix milliseconds.
    e: u64,
}

/// What a relayed `requestState` token carries: the server's state, bound to its caller and
/// request like a parked call's.
#[derive(Serialize, Deserialize)]
struct Relayed {
    /// The principal it was issued to.
    p: Option<String>,
    /// Expiry, Unix milliseconds.
    e: u64,
    /// The request's method and target.
    m: String,
    t: Option<String>,
    /// The server's own `requestState`, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<String>,
    /// The server's questions: each key the client answers under, and the method it asks
    /// (what the policy judges the answer as).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    q: Vec<(String, String)>,
    /// The profile whose endpoint it was issued on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
    /// The server whose state it is: a retry that reaches another (the topology changed)
    /// does not carry it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    u: Option<String>,
}

/// What a retry's `requestState` picks up.
pub enum Resumed {
    /// A call parked here, waiting for the answers.
    Parked(Parked),
    /// A 2026-07-28 server's own state, for the retry to carry to that server (by name).
    Relayed {
        /// The server's state, if it gave one.
        state: Option<String>,
        /// The server it came from.
        server: Option<String>,
        /// Its questions: the key of each, and the method it asks.
        questions: Vec<(String, String)>,
    },
}

/// Why a retry could not pick up its call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// Forged, altered or not a token of this gateway.
    #[error("requestState is not valid: {0}")]
    Invalid(String),
    /// Issued to another caller, or on another endpoint.
    #[error("requestState was not issued to this caller on this endpoint")]
    Foreign,
    /// Expired, already used, or its call ended.
    #[error("requestState has expired or was already used; send the request again without it")]
    Gone,
    /// Issued for another request.
    #[error("requestState belongs to another request ({0})")]
    Mismatch(String),
}

/// Calls parked for their client's answers.
pub struct RoundTrips {
    sealer: Sealer,
    parked: Arc<DashMap<u64, Parked>>,
    ttl: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RoundTrips {
    /// An empty store whose calls wait at most `ttl` for their retry.
    pub fn new(sealer: Sealer, ttl: Duration) -> RoundTrips {
        RoundTrips {
            sealer,
            parked: Arc::new(DashMap::new()),
            ttl,
        }
    }

    /// Calls waiting now.
    pub fn waiting(&self) -> usize {
        self.parked.len()
    }

    /// Parks a call and returns the `requestState` that picks it up. A call parked before (asked
    /// again what a retry left unanswered) keeps its first deadline.
    pub fn park(&self, mut parked: Parked) -> String {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).expect("the OS random source is available");
        let id = u64::from_le_bytes(raw);
        let now = tokio::time::Instant::now();
        let expires = *parked.expires.get_or_insert(now + self.ttl);
        let left = expires.saturating_duration_since(now);
        let state = State {
            i: id,
            p: parked.principal.as_deref().map(str::to_owned),
            e: now_ms() + left.as_millis() as u64,
        };
        let map: Weak<DashMap<u64, Parked>> = Arc::downgrade(&self.parked);
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(expires).await;
            let abandoned = map.upgrade().and_then(|m| m.remove(&id));
            if let Some((_, parked)) = abandoned {
                tracing::debug!("a call waiting for its client's input was abandoned");
                parked.abandon().await;
            }
        });
        parked.timer = Some(timer.abort_handle());
        self.parked.insert(id, parked);
        let plain = serde_json::to_vec(&state).expect("the state encodes");
        self.sealer.seal(PURPOSE, &plain)
    }

    /// Seals server `server`'s 2026-07-28 `requestState` (if it gave one) and `questions` (key,
    /// method) for `principal`'s retry of `method` on `target`: the client cannot read or
    /// change it, nor use it for another request, caller or server; and its answers are judged
    /// as answers to those questions.
    pub fn relay(
        &self,
        (principal, profile): (Option<&Principal>, Option<&str>),
        (method, target): (&str, Option<&str>),
        server: &str,
        (state, questions): (Option<&str>, Vec<(String, String)>),
    ) -> String {
        let relayed = Relayed {
            q: questions,
            u: Some(server.to_owned()),
            f: profile.map(str::to_owned),
            p: principal.map(|p| p.to_string()),
            e: now_ms() + self.ttl.as_millis() as u64,
            m: method.to_owned(),
            t: target.map(str::to_owned),
            s: state.map(str::to_owned),
        };
        let plain = serde_json::to_vec(&relayed).expect("the state encodes");
        self.sealer.seal(RELAYED, &plain)
    }

    /// Takes what `token` stands for, for `principal`'s retry of `method` on `target` with a
    /// token granting `claims`: the call it parks (only for a token granting what the one
    /// that began it did: the call was judged by those grants), or the server state it carries.
    ///
    /// A parked call's state is taken once: a replay finds nothing. A server's state, carried
    /// for it, is the server's to honor once or more: a replay within its expiry, by its caller
    /// for its request, reaches the server again as a new request (judged again by the policy
    /// with that request's grants), exactly as the server's own state would without the gateway.
    pub fn resume(
        &self,
        (principal, profile): (Option<&Principal>, Option<&str>),
        claims: Option<&crate::auth::Claims>,
        token: &str,
        method: &str,
        target: Option<&str>,
    ) -> Result<Resumed, ResumeError> {
        if token.len() > MAX_STATE_TOKEN {
            return Err(ResumeError::Invalid(format!(
                "{} bytes, longer than any this gateway issues",
                token.len()
            )));
        }
        let plain = match self.sealer.open(PURPOSE, token) {
            Ok(plain) => plain,
            Err(crate::mcp::seal::SealError::Forged) => {
                return self.resume_relayed((principal, profile), token, method, target);
            }
            Err(e) => return Err(ResumeError::Invalid(e.to_string())),
        };
        let state: State = serde_json::from_slice(&plain)
            .map_err(|_| ResumeError::Invalid("unreadable content".into()))?;
        if state.p.as_deref() != principal.map(|p| &**p) {
            return Err(ResumeError::Foreign);
        }
        if state.e < now_ms() {
            return Err(ResumeError::Gone);
        }
        // Taken only by the retry of its own request, on its own endpoint: a mismatched one
        // leaves it in place.
        let granted =
            |p: &Parked| crate::auth::Claims::same_grants(Some(&p.session.caller().claims), claims);
        let taken = self.parked.remove_if(&state.i, |_, p| {
            p.method == method
                && p.target.as_deref() == target
                && p.session.profile_name() == profile
                && granted(p)
        });
        let Some((_, mut parked)) = taken else {
            return Err(match self.parked.get(&state.i) {
                Some(p) if p.session.profile_name() != profile || !granted(&p) => {
                    ResumeError::Foreign
                }
                Some(p) => ResumeError::Mismatch(
                    format!("{} {}", p.method, p.target.as_deref().unwrap_or(""))
                        .trim_end()
                        .to_owned(),
                ),
                None => ResumeError::Gone,
            });
        };
        if let Some(timer) = parked.timer.take() {
            timer.abort();
        }
        Ok(Resumed::Parked(parked))
    }

    fn resume_relayed(
        &self,
        (principal, profile): (Option<&Principal>, Option<&str>),
        token: &str,
        method: &str,
        target: Option<&str>,
    ) -> Result<Resumed, ResumeError> {
        let plain = self
            .sealer
            .open(RELAYED, token)
            .map_err(|e| ResumeError::Invalid(e.to_string()))?;
        let r: Relayed = serde_json::from_slice(&plain)
            .map_err(|_| ResumeError::Invalid("unreadable content".into()))?;
        if r.p.as_deref() != principal.map(|p| &**p) || r.f.as_deref() != profile {
            return Err(ResumeError::Foreign);
        }
        if r.e < now_ms() {
            return Err(ResumeError::Gone);
        }
        if r.m != method || r.t.as_deref() != target {
            return Err(ResumeError::Mismatch(
                format!("{} {}", r.m, r.t.as_deref().unwrap_or(""))
                    .trim_end()
                    .to_owned(),
            ));
        }
        Ok(Resumed::Relayed {
            state: r.s,
            server: r.u,
            questions: r.q,
        })
    }
}

/// The client capability a server request needs, or `None` for one the gateway answers itself.
pub fn capability_needed(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// The `inputRequests` object asking the client `asked`.
pub fn input_requests(asked: &[Asked]) -> String {
    let mut out = String::from("{");
    for (i, a) in asked.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(&a.key).expect("strings encode"));
        out.push_str(r#":{"method":"#);
        out.push_str(&serde_json::to_string(&a.method).expect("strings encode"));
        if let Some(p) = &a.params {
            out.push_str(r#","params":"#);
            out.push_str(std::str::from_utf8(p).unwrap_or("{}"));
        }
        out.push('}');
    }
    out.push('}');
    out
}

/// The `input_required` result: the questions (`inputRequests`) and the state to send back.
pub fn input_required(requests: &str, state: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"resultType":"input_required","inputRequests":{requests},"requestState":{}}}"#,
        serde_json::to_string(state).expect("strings encode")
    ))
}

/// A retry's own members, taken out of its params (servers of earlier revisions do not know them).
#[derive(Default)]
pub struct Retry {
    /// `requestState`, when the request is a retry.
    pub state: Option<String>,
    /// `inputResponses`: answers by key.
    pub responses: BTreeMap<String, Box<RawValue>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's state carried for a 2026-07-28 server opens for its own caller, endpoint,
    /// method and target only, until its expiry; a replay is the server's to judge; an enormous
    /// token is refused unopened.
    #[test]
    fn a_relayed_state_is_bound_to_its_caller_request_and_expiry() {
        let trips = RoundTrips::new(Sealer::random(1), Duration::from_secs(60));
        let alice: Principal = Arc::from("alice");
        let bob: Principal = Arc::from("bob");
        let token = trips.relay(
            (Some(&alice), Some("dev")),
            ("tools/call", Some("t")),
            "s1",
            (
                Some("server-state"),
                vec![("q1".into(), "sampling/createMessage".into())],
            ),
        );
        assert!(token.len() <= MAX_STATE_TOKEN);
        let resume = |who: Option<&Principal>, profile: Option<&str>, method, target| {
            trips.resume((who, profile), None, &token, method, target)
        };
        let carried = |r: Result<Resumed, ResumeError>| match r {
            Ok(Resumed::Relayed {
                state,
                server,
                questions,
            }) => {
                assert_eq!(server.as_deref(), Some("s1"), "it names its server");
                assert_eq!(questions, [("q1".into(), "sampling/createMessage".into())]);
                state.unwrap_or_default()
            }
            Ok(Resumed::Parked(_)) => panic!("not a parked call"),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            carried(resume(Some(&alice), Some("dev"), "tools/call", Some("t"))),
            "server-state"
        );
        // Twice: the server's own state, as replayable as it would be without the gateway.
        assert_eq!(
            carried(resume(Some(&alice), Some("dev"), "tools/call", Some("t"))),
            "server-state"
        );
        for (who, profile) in [
            (Some(&bob), Some("dev")),
            (None, Some("dev")),
            (Some(&alice), None),
            (Some(&alice), Some("ops")),
        ] {
            assert_eq!(
                resume(who, profile, "tools/call", Some("t")).err(),
                Some(ResumeError::Foreign),
                "{who:?} at {profile:?}"
            );
        }
        for (method, target) in [
            ("tools/call", Some("u")),
            ("tools/call", None),
            ("prompts/get", Some("t")),
        ] {
            assert!(matches!(
                resume(Some(&alice), Some("dev"), method, target),
                Err(ResumeError::Mismatch(_))
            ));
        }
        // Sealed by another gateway (another key): not valid.
        let stranger = RoundTrips::new(Sealer::random(1), Duration::from_secs(60));
        assert!(matches!(
            stranger.resume(
                (Some(&alice), Some("dev")),
                None,
                &token,
                "tools/call",
                Some("t")
            ),
            Err(ResumeError::Invalid(_))
        ));
        let enormous = "A".repeat(MAX_STATE_TOKEN + 1);
        match trips.resume((Some(&alice), None), None, &enormous, "tools/call", None) {
            Err(ResumeError::Invalid(why)) => assert!(why.contains("longer than"), "{why}"),
            _ => panic!("an enormous token is refused for its length"),
        }
        // Expired.
        let brief = RoundTrips::new(Sealer::random(1), Duration::ZERO);
        let token = brief.relay(
            (None, None),
            ("tools/call", Some("t")),
            "s1",
            (Some("s"), Vec::new()),
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            brief
                .resume((None, None), None, &token, "tools/call", Some("t"))
                .err(),
            Some(ResumeError::Gone)
        );
    }

    #[test]
    fn input_required_lists_every_question() {
        let asked = [Asked {
            key: "3".into(),
            id: Bytes::from_static(b"3"),
            method: "elicitation/create".into(),
            params: Some(Bytes::from_static(br#"{"message":"name?"}"#)),
        }];
        let v: serde_json::Value =
            serde_json::from_slice(&input_required(&input_requests(&asked), "tok")).unwrap();
        assert_eq!(v["resultType"], "input_required");
        assert_eq!(v["inputRequests"]["3"]["method"], "elicitation/create");
        assert_eq!(v["inputRequests"]["3"]["params"]["message"], "name?");
        assert_eq!(v["requestState"], "tok");
    }
}
