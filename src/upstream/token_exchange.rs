//! OAuth 2.0 Token Exchange (RFC 8693) for an upstream's credentials: the caller's access
//! token is exchanged at the upstream's authorization server for a token meant for that
//! upstream, so the client's own token never goes upstream. Exchanged tokens are cached per
//! caller token until shortly before they expire; the cache is bounded. Concurrent requests of
//! one caller token share one exchange; a token the upstream refuses is exchanged again (at
//! most once per [`REFUSED_PACE`]) rather than sent until it expires.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use std::sync::Arc;

use http::HeaderName;

use super::UpstreamError;
use crate::config::credentials::TokenExchangeConfig;

/// The pooled HTTPS client requests go out with (the servers' own, with the outbound TLS
/// settings).
use super::client::Client;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Most exchanged tokens kept (one per caller token in use).
const MAX_CACHED: usize = 4096;
/// Longest exchanged token accepted (bounds the cache: `MAX_CACHED` of these).
const MAX_ISSUED: usize = 8 * 1024;
/// Longest an exchanged token is reused, whatever the server says.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest answer read from the authorization server.
const MAX_ANSWER: usize = 64 * 1024;
/// Longest an exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a token without `expires_in` is reused.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// A token exchanged because the upstream refused the one before is not replaced again, if
/// the upstream refuses it too, for this long: an upstream that refuses every token costs the
/// authorization server one exchange per caller per this, not one per call.
pub const REFUSED_PACE: Duration = Duration::from_secs(10);

/// A failed exchange is answered again, without asking, for this long: a caller whose token the
/// authorization server refuses (or an authorization server that is down) costs it one
/// exchange per caller token per this, not one per call.
pub const FAILED_PACE: Duration = Duration::from_secs(2);

/// The SHA-256 of a caller's token: what the cache and the exchanges in flight are keyed by
/// (the token itself is not kept).
type Key = [u8; 32];

/// An exchanged token, kept for reuse.
struct Cached {
    value: HeaderValue,
    until: Instant,
    /// When it was exchanged in place of a token the upstream refused.
    replaced_refused: Option<Instant>,
    /// The upstream refused it: the next request exchanges anew.
    refused: bool,
}

/// One exchange under way, whose answer every request of the same caller token waits for.
type InFlight = tokio::sync::watch::Receiver<Option<Result<HeaderValue, String>>>;

/// Exchanges callers' tokens for one upstream.
pub struct TokenExchange {
    config: TokenExchangeConfig,
    client: Client,
    cache: DashMap<Key, Cached>,
    in_flight: DashMap<Key, InFlight>,
    /// Exchanges that failed lately: why, and until when that is the answer.
    failed: DashMap<Key, (String, Instant)>,
}

/// What the authorization server answers (RFC 8693 §2.2.1).
#[derive(Deserialize)]
struct Issued {
    access_token: String,
    token_type: String,
    /// Seconds; some servers send a string or a float.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// `expires_in` as seconds: a non-negative number or numeric string; anything else is absent.
fn seconds(v: &serde_json::Value) -> Option<u64> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then(|| n.min(u64::MAX as f64) as u64)
}

/// A caller's token and when it expires (seconds since the Unix epoch).
pub struct Subject {
    /// The access token.
    pub token: Arc<str>,
    /// Its `exp`.
    pub expires_at: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What it answers when it refuses (RFC 6749 §5.2).
#[derive(Deserialize)]
struct Refused {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl TokenExchange {
    /// An exchanger for `config`, making its requests with `client`.
    pub fn new(config: TokenExchangeConfig, client: Client) -> TokenExchange {
        TokenExchange {
            config,
            client,
            cache: DashMap::new(),
            in_flight: DashMap::new(),
            failed: DashMap::new(),
        }
    }

    /// The `Authorization` value for the caller holding `subject`: cached, or exchanged now
    /// (once for all the requests that ask at the same time). Never past the caller's own
    /// token's expiry. The error says why the caller has no token for the upstream (never the
    /// token).
    pub async fn bearer(self: &Arc<Self>, subject: &Subject) -> Result<HeaderValue, String> {
        let now = unix_now();
        if now >= subject.expires_at {
            return Err("the caller's access token has expired".into());
        }
        let left = Duration::from_secs(subject.expires_at - now);
        let key = key_of(subject);
        if let Some(hit) = self.cache.get(&key)
            && !hit.refused
            && hit.until > Instant::now()
        {
            return Ok(hit.value.clone());
        }
        if let Some(failed) = self.failed.get(&key)
            && failed.1 > Instant::now()
        {
            return Err(failed.0.clone());
        }
        let mut answer = match self.in_flight.entry(key) {
            dashmap::Entry::Occupied(held) => held.get().clone(),
            dashmap::Entry::Vacant(free) => {
                // The exchange is a task of its own: a caller that goes away does not end it,
                // and the one after it finds its answer kept (or paced) rather than starting
                // another (cancelling each request made one exchange per request).
                let (tell, answer) = tokio::sync::watch::channel(None);
                free.insert(answer.clone());
                let (this, token) = (self.clone(), subject.token.clone());
                tokio::spawn(async move {
                    // Out of the map however the task ends (a panic, the runtime shutting
                    // down): a dead entry would answer every later request of the token.
                    let entry = InFlightEntry {
                        exchange: &this,
                        key,
                        answer: tell.subscribe(),
                    };
                    let result = this.fetch(key, &token, left).await;
                    // Out of the map before the answer is told: a request after this finds
                    // the answer kept.
                    drop(entry);
                    let _ = tell.send(Some(result));
                });
                answer
            }
        };
        let told = answer.wait_for(Option::is_some).await;
        match told.as_deref() {
            Ok(Some(result)) => result.clone(),
            _ => Err("the token exchange did not finish".into()),
        }
    }

    /// Exchanges `token` and keeps the result for reuse, for at most `left`.
    async fn fetch(&self, key: Key, token: &str, left: Duration) -> Result<HeaderValue, String> {
        let (value, lifetime) = match self.exchange(token).await {
            Ok(issued) => {
                self.failed.remove(&key);
                issued
            }
            Err(why) => {
                self.remember_failure(key, &why);
                return Err(why);
            }
        };
        let lifetime = lifetime.min(left).min(MAX_LIFETIME);
        let Some(until) = Instant::now()
            .checked_add(lifetime)
            .filter(|_| !lifetime.is_zero())
        else {
            return Ok(value);
        };
        let replaced_refused = self
            .cache
            .get(&key)
            .is_some_and(|c| c.refused)
            .then(Instant::now);
        if self.cache.len() >= MAX_CACHED && !self.cache.contains_key(&key) {
            let now = Instant::now();
            self.cache.retain(|_, c| c.until > now);
            // Still full of live tokens: a tenth goes, not everyone's.
            let excess = self.cache.len().saturating_sub(MAX_CACHED * 9 / 10);
            let victims: Vec<Key> = self.cache.iter().take(excess).map(|e| *e.key()).collect();
            for k in victims {
                self.cache.remove(&k);
            }
        }
        self.cache.insert(
            key,
            Cached {
                value: value.clone(),
                until,
                replaced_refused,
                refused: false,
            },
        );
        Ok(value)
    }

    /// Keeps `why` as the answer for `key` for [`FAILED_PACE`] (in a map as bounded as the
    /// cache: when it is full of fresh failures, this one is not kept).
    fn remember_failure(&self, key: Key, why: &str) {
        let Some(until) = Instant::now().checked_add(FAILED_PACE) else {
            return;
        };
        if self.failed.len() >= MAX_CACHED && !self.failed.contains_key(&key) {
            let now = Instant::now();
            self.failed.retain(|_, (_, until)| *until > now);
            if self.failed.len() >= MAX_CACHED {
                return;
            }
        }
        self.failed.insert(key, (why.to_owned(), until));
    }

    /// The upstream refused `sent`, exchanged for `subject`: whether to try once more (with
    /// the token [`bearer`](Self::bearer) gives next). Yes when `sent` is no longer the token
    /// kept (another request replaced it, or is replacing it) or may be replaced now; no when
    /// it was itself exchanged for a refused token within [`REFUSED_PACE`], or never kept (a
    /// token used once: exchanging again would give the same).
    pub fn refused(&self, subject: &Subject, sent: &HeaderValue) -> bool {
        let Some(mut kept) = self.cache.get_mut(&key_of(subject)) else {
            return false;
        };
        if kept.value != *sent || kept.refused {
            return true;
        }
        if kept
            .replaced_refused
            .is_some_and(|at| at.elapsed() < REFUSED_PACE)
        {
            return false;
        }
        kept.refused = true;
        true
    }

    /// The form of a token-exchange request, and the client's Basic credentials when it has
    /// a secret (else its id goes in the form).
    fn request_body(&self, subject: &str) -> Result<(String, Option<HeaderValue>), String> {
        let c = &self.config;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", GRANT_TYPE)
            .append_pair("subject_token", subject)
            .append_pair("subject_token_type", ACCESS_TOKEN)
            .append_pair("requested_token_type", ACCESS_TOKEN);
        for (key, value) in [
            ("audience", &c.audience),
            ("resource", &c.resource),
            ("scope", &c.scope),
        ] {
            if let Some(v) = value {
                form.append_pair(key, v);
            }
        }
        let basic = match &c.client_secret {
            // client_secret_basic: both halves form-encoded first (RFC 6749 §2.3.1).
            Some(secret) => {
                use base64::Engine;
                let pair = format!(
                    "{}:{}",
                    form_urlencoded::byte_serialize(c.client_id.as_bytes()).collect::<String>(),
                    form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>()
                );
                let basic = base64::engine::general_purpose::STANDARD.encode(pair);
                let mut value = HeaderValue::try_from(format!("Basic {basic}"))
                    .map_err(|_| "the client credentials cannot be a header".to_owned())?;
                value.set_sensitive(true);
                Some(value)
            }
            None => {
                form.append_pair("client_id", &c.client_id);
                None
            }
        };
        Ok((form.finish(), basic))
    }

    async fn exchange(&self, subject: &str) -> Result<(HeaderValue, Duration), String> {
        let (body, basic) = self.request_body(subject)?;
        let mut req = Request::post(self.config.token_endpoint.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json");
        if let Some(basic) = basic {
            req = req.header(AUTHORIZATION, basic);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the token request: {e}"))?;
        let answer = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("the authorization server cannot be reached: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("the authorization server's answer could not be read: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, answer)
            .await
            .map_err(|_| {
                format!("the authorization server did not answer within {EXCHANGE_TIMEOUT:?}")
            })??;
        let quote = |text: &str| quoted(text, subject);
        if !status.is_success() {
            return Err(match serde_json::from_slice::<Refused>(&body) {
                Ok(r) => format!(
                    "the authorization server refused the exchange: {}{}",
                    quote(&r.error),
                    r.error_description
                        .map(|d| format!(" ({})", quote(&d)))
                        .unwrap_or_default()
                ),
                Err(_) => format!("the authorization server answered {status}"),
            });
        }
        let issued: Issued = serde_json::from_slice(&body).map_err(|_| {
            "the authorization server's answer is not a token response (access_token, token_type)"
                .to_owned()
        })?;
        if !issued.token_type.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "the authorization server issued a {:?} token, not a bearer token",
                quote(&issued.token_type)
            ));
        }
        if issued.access_token.len() > MAX_ISSUED {
            return Err(format!(
                "the authorization server issued a token over {MAX_ISSUED} bytes"
            ));
        }
        let mut value = HeaderValue::try_from(format!("Bearer {}", issued.access_token))
            .ok()
            .filter(|_| !issued.access_token.is_empty())
            .ok_or_else(|| {
                "the authorization server issued a token that cannot be a header".to_owned()
            })?;
        value.set_sensitive(true);
        // Reused until a little before it expires, so a call never carries a token that
        // expires on the way.
        let lifetime = match issued.expires_in.as_ref().and_then(seconds) {
            Some(secs) => {
                let secs = Duration::from_secs(secs).min(MAX_LIFETIME);
                secs.saturating_sub((secs / 4).min(Duration::from_secs(30)))
            }
            None => DEFAULT_LIFETIME,
        };
        Ok((value, lifetime))
    }
}

fn key_of(subject: &Subject) -> Key {
    ring::digest::digest(&ring::digest::SHA256, subject.token.as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// An exchange's place in the map of those in flight, taken out when dropped (if still its).
struct InFlightEntry<'a> {
    exchange: &'a TokenExchange,
    key: Key,
    answer: InFlight,
}

impl Drop for InFlightEntry<'_> {
    fn drop(&mut self) {
        self.exchange
            .in_flight
            .remove_if(&self.key, |_, held| held.same_channel(&self.answer));
    }
}

/// The caller's current access token, as its session holds it (the latest one it presented).
pub trait CallerToken: Send + Sync {
    /// The token, if the caller authenticated with one.
    fn current(&self) -> Option<Subject>;
}

/// What one link sends an HTTP upstream whose credentials are exchanged per caller.
#[derive(Clone)]
pub struct Credential {
    /// The header (`Authorization` by default).
    pub header: HeaderName,
    /// The upstream's exchanger (shared by every link to it).
    pub exchange: Arc<TokenExchange>,
    /// Whose token.
    pub caller: Arc<dyn CallerToken>,
    /// Refuse a caller without a token (else: no header).
    pub required: bool,
}

impl Credential {
    /// The header for this request, exchanged or cached.
    pub async fn header(
        &self,
        server: &Arc<str>,
    ) -> Result<Option<(HeaderName, HeaderValue)>, UpstreamError> {
        let refused = |reason: String| UpstreamError::NoCredentials {
            server: server.clone(),
            reason,
        };
        match self.caller.current() {
            Some(subject) => {
                let value = self.exchange.bearer(&subject).await.map_err(refused)?;
                Ok(Some((self.header.clone(), value)))
            }
            None if self.required => Err(refused(
                "this upstream takes the caller's OAuth access token in exchange for its own, and the caller has none".into(),
            )),
            None => Ok(None),
        }
    }

    /// The upstream refused `sent`, this credential's last header: whether to send the request
    /// once more with a new one (see [`TokenExchange::refused`]).
    pub fn refused(&self, sent: &HeaderValue) -> bool {
        self.caller
            .current()
            .is_some_and(|subject| self.exchange.refused(&subject, sent))
    }
}

/// Text from the authorization server, safe to put in an error: bounded, printable (no
/// control characters, no invisible or direction-changing format characters).
/// The authorization server's words as they may be shown: they go to the caller and the logs,
/// so only the characters RFC 6749 §5.2 allows in an error (visible ASCII but `"` and `\`,
/// and space), at most 200 of them, and none at all when they hold a run of 16 characters of
/// the caller's token (a server that split it, or hid it behind other characters, shows
/// nothing of it).
fn quoted(text: &str, subject: &str) -> String {
    const RUN: usize = 16;
    let shown: String = text
        .chars()
        .filter(|c| matches!(c, ' '..='~') && !matches!(c, '"' | '\\'))
        .collect();
    let echoes = subject.len() >= RUN
        && subject
            .as_bytes()
            .windows(RUN)
            .any(|run| memchr::memmem::find(shown.as_bytes(), run).is_some());
    if echoes {
        return "[withheld: it held part of the caller's token]".to_owned();
    }
    shown.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_callers_token_is_never_quoted_back() {
        let token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
        let withheld = "[withheld: it held part of the caller's token]";
        for hidden in [
            "\u{1}",
            "\u{200B}",
            "\u{FEFF}",
            "\r\n",
            "\u{AD}",
            "\u{E0041}",
        ] {
            let sent = format!("{}{hidden}{} tail", &token[..10], &token[10..]);
            assert_eq!(quoted(&sent, token), withheld, "{hidden:?}");
        }
        // Half of it in each of two fields: neither half is shown.
        let (a, b) = token.split_at(token.len() / 2);
        assert_eq!(quoted(a, token), withheld);
        assert_eq!(quoted(b, token), withheld);
        assert_eq!(quoted(&"x".repeat(500), token).len(), 200);
        assert_eq!(quoted("invalid_grant", token), "invalid_grant");
        assert_eq!(quoted("bad \"scope\" é", token), "bad scope ");
    }

    #[test]
    fn expires_in_is_read_leniently_and_never_negative() {
        assert_eq!(seconds(&json!(600)), Some(600));
        assert_eq!(seconds(&json!(12.9)), Some(12));
        assert_eq!(seconds(&json!(" 30 ")), Some(30));
        assert_eq!(seconds(&json!(u64::MAX)), Some(u64::MAX));
        assert_eq!(seconds(&json!(1e300)), Some(u64::MAX));
        for bad in [
            json!(-1),
            json!("soon"),
            json!(null),
            json!([1]),
            json!("NaN"),
        ] {
            assert_eq!(seconds(&bad), None, "{bad}");
        }
    }

    fn exchanger(endpoint: &str) -> TokenExchange {
        TokenExchange::new(
            TokenExchangeConfig {
                token_endpoint: endpoint.parse().unwrap(),
                client_id: "gatehouse".into(),
                client_secret: None,
                audience: None,
                resource: None,
                scope: None,
            },
            crate::upstream::client::client(
                &crate::outbound_tls::client_config(&Default::default()).unwrap(),
            ),
        )
    }

    fn subject(token: &str) -> Subject {
        Subject {
            token: token.into(),
            expires_at: unix_now() + 600,
        }
    }

    #[tokio::test]
    async fn a_failed_exchange_is_the_answer_for_a_while_for_that_token_alone() {
        // An authorization server that refuses every subject, counting what it is asked.
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut resp = http::Response::new(Full::new(Bytes::from_static(
                            br#"{"error":"invalid_grant"}"#,
                        )));
                        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let x = Arc::new(exchanger(&url));
        let alice = subject("alice-token");
        let first = x.bearer(&alice).await.unwrap_err();
        assert!(first.contains("invalid_grant"), "{first}");
        assert_eq!(x.bearer(&alice).await.unwrap_err(), first);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another caller's token is asked about on its own.
        assert!(x.bearer(&subject("bob-token")).await.is_err());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Past the pace, asked again.
        x.failed.get_mut(&key_of(&alice)).unwrap().1 = Instant::now();
        assert!(x.bearer(&alice).await.is_err());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn a_refused_token_is_replaced_once_per_pace() {
        let x = exchanger("http://127.0.0.1:1/token");
        let alice = subject("alice-token");
        let bearer = |v: &str| HeaderValue::from_str(v).unwrap();
        let keep = |value: &str, replaced_refused: Option<Instant>| {
            x.cache.insert(
                key_of(&alice),
                Cached {
                    value: bearer(value),
                    until: Instant::now() + Duration::from_secs(600),
                    replaced_refused,
                    refused: false,
                },
            );
        };
        assert!(!x.refused(&alice, &bearer("Bearer t1")), "nothing kept");
        keep("Bearer t1", None);
        assert!(x.refused(&alice, &bearer("Bearer t1")));
        assert!(x.cache.get(&key_of(&alice)).unwrap().refused);
        // Requests that sent it too retry, on the one exchange that replaces it.
        assert!(x.refused(&alice, &bearer("Bearer t1")));
        // Its replacement, refused at once: not replaced again within the pace.
        keep("Bearer t2", Some(Instant::now()));
        assert!(!x.refused(&alice, &bearer("Bearer t2")));
        assert!(!x.cache.get(&key_of(&alice)).unwrap().refused);
        // A request that sent the old one retries with the kept one.
        assert!(x.refused(&alice, &bearer("Bearer t1")));
        // Past the pace, it may be replaced.
        keep(
            "Bearer t2",
            Instant::now().checked_sub(REFUSED_PACE + Duration::from_secs(1)),
        );
        assert!(x.refused(&alice, &bearer("Bearer t2")));
        // Another caller's token is its own.
        assert!(!x.refused(&subject("bob-token"), &bearer("Bearer t2")));
    }

    /// An authorization server that answers each exchange after `delay`, counting them.
    async fn slow_endpoint(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(
                                    br#"{"access_token":"exchanged","token_type":"Bearer","expires_in":300}"#,
                                ),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, asked)
    }

    /// Callers that go away while their token is exchanged do not end the exchange: it is
    /// made once, kept, and what the next caller gets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exchange_its_callers_left_goes_on_once() {
        let (url, asked) = slow_endpoint(Duration::from_millis(500)).await;
        let x = Arc::new(exchanger(&url));
        for round in 0..20 {
            // Waits on two threads, all cancelled at once.
            let waits: Vec<_> = (0..4)
                .map(|_| {
                    let x = x.clone();
                    tokio::spawn(async move { x.bearer(&subject("alice-token")).await })
                })
                .collect();
            // The first round's callers go once the exchange has reached the server.
            while round == 0 && asked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::yield_now().await;
            for w in &waits {
                w.abort();
            }
            for w in waits {
                let _ = w.await;
            }
        }
        let token = x.bearer(&subject("alice-token")).await.unwrap();
        assert_eq!(token, "Bearer exchanged");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(x.in_flight.is_empty(), "nothing left in flight");
        // Kept: asked of nobody.
        assert_eq!(x.bearer(&subject("alice-token")).await.unwrap(), token);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_others_carry_on_an_exchange_whose_starter_went_away() {
        let (url, asked) = slow_endpoint(Duration::from_millis(300)).await;
        let x = Arc::new(exchanger(&url));
        let alice = subject("alice-token");
        let mut first = Box::pin(x.bearer(&alice));
        // The first waits until its exchange has reached the server.
        while asked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::select! {
                _ = &mut first => panic!("not answered yet"),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        let second = x.bearer(&alice);
        assert_eq!(
            x.in_flight.len(),
            1,
            "the second waits on the first's exchange"
        );
        drop(first);
        assert_eq!(second.await.unwrap(), "Bearer exchanged");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(x.in_flight.is_empty());
    }

    #[test]
    fn server_text_is_made_printable_and_bounded() {
        assert_eq!(
            quoted("bad\r\nX-Injected: 1", "subject"),
            "badX-Injected: 1"
        );
        assert_eq!(quoted("a\u{202E}b\u{200B}c\u{FEFF}", "subject"), "abc");
        assert_eq!(
            quoted(&"é".repeat(500), "subject"),
            "",
            "not ASCII: not shown"
        );
        assert_eq!(quoted(&"e".repeat(500), "subject").len(), 200);
    }
}
