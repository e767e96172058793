//! JWT access tokens (RFC 9068) checked against each trusted issuer's published keys (JWKS).
//!
//! A token is accepted only when its header names an asymmetric algorithm of the allow-list, its
//! `iss` is a trusted issuer, a key of that issuer's set fits both the algorithm and the `kid`,
//! the signature verifies, `aud` includes this gateway's resource URI, and `exp` (required) and
//! `nbf` hold within the leeway. Keys are fetched when first needed and again when a token names
//! a `kid` the set lacks (rotation), at most once per `key_refetch_interval` per issuer, so tokens with
//! made-up key ids cannot make the gateway hammer an issuer.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::config::OAuthSettings;

/// Longest token read at all.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWK set read.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys kept from one set.
const MAX_KEYS: usize = 64;
/// How long a fetched set is used before it is fetched again.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// How long a set is used at most while fetching it again fails.
const MAX_STALE: Duration = Duration::from_secs(24 * 3600);
/// Deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest principal taken from a claim.
const MAX_PRINCIPAL: usize = 256;
/// Most verified tokens remembered.
const MAX_CACHED: usize = 10_000;
/// Largest token cached (with [`MAX_CACHED`], at most 40 MiB of tokens held; access tokens
/// are rarely above 2 KiB).
const MAX_CACHED_TOKEN_BYTES: usize = 4096;
/// Longest a verified token is remembered (so that a key the issuer withdrew stops working
/// within it).
pub const CACHE_FOR: Duration = Duration::from_secs(300);
/// Most scopes or groups taken from a token.
const MAX_LIST: usize = 256;

/// Algorithms accepted: asymmetric only (an HMAC key would be the issuer's secret, and `none`
/// is no signature).
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was refused (said to the client as the `error_description`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT this gateway reads.
    #[error("the access token is not a well-formed JWT")]
    Malformed,
    /// The header names an algorithm not accepted.
    #[error("the access token's algorithm is not accepted (use RS*, PS*, ES256, ES384 or EdDSA)")]
    Algorithm,
    /// `iss` is missing or not trusted.
    #[error("the access token's issuer is not trusted here")]
    Issuer,
    /// No key of the issuer fits the token.
    #[error("no signing key of the issuer matches the access token")]
    NoKey,
    /// The issuer's keys could not be fetched.
    #[error("the issuer's signing keys cannot be fetched now")]
    KeysUnavailable,
    /// The signature does not verify.
    #[error("the access token's signature is invalid")]
    Signature,
    /// `aud` does not name this resource.
    #[error("the access token was not issued for this resource (aud)")]
    Audience,
    /// Expired, or not valid yet.
    #[error("the access token is expired or not yet valid")]
    Expired,
    /// The header lists critical extensions (RFC 7515 §4.1.11), which this gateway does not
    /// implement.
    #[error("the access token's header lists critical extensions (crit), which are not supported")]
    Critical,
    /// A required claim is missing or of the wrong type.
    #[error("the access token lacks a valid {0} claim")]
    Claim(String),
}

/// What a verified token says about its bearer, built once and shared by every request that
/// presents the token while it is cached (cloning it is three reference counts).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The principal claim's value.
    pub principal: Arc<str>,
    /// `scope` (space-separated) or `scp` (a list).
    pub scopes: Arc<[Box<str>]>,
    /// Groups, scopes and the token itself, as policy plugins and token exchange see them.
    pub claims: Arc<super::Claims>,
}

/// The claims read from a token, before they are shared.
struct Read {
    principal: String,
    scopes: Vec<Box<str>>,
    groups: Vec<Box<str>>,
}

/// One usable key of a set.
struct Key {
    kid: Option<String>,
    /// The algorithm the set pins the key to, if it does.
    alg: Option<Algorithm>,
    /// Which algorithms the key's type and curve fit.
    fits: fn(Algorithm) -> bool,
    decoding: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<Key>>,
    fetched: Option<Instant>,
}

/// What looking a token's key up in the current set found.
enum Lookup {
    Found(Arc<Key>),
    /// The set may have changed (rotation): fetch it again.
    Unknown,
    /// No fetch would help.
    Refused(TokenError),
}

impl KeySet {
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let fits = |k: &&Arc<Key>| (k.fits)(alg) && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => match self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                Some(k) if fits(&k) => Lookup::Found(k.clone()),
                Some(_) => Lookup::Refused(TokenError::NoKey),
                None => Lookup::Unknown,
            },
            // Without a kid, only a set with exactly one fitting key says which key it is.
            None => {
                let mut fitting = self.keys.iter().filter(fits);
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Lookup::Found(k.clone()),
                    (None, _) => Lookup::Unknown,
                    (Some(_), Some(_)) => Lookup::Refused(TokenError::NoKey),
                }
            }
        }
    }
}

/// One trusted issuer and its keys.
struct Issuer {
    issuer: String,
    jwks_uri: http::Uri,
    keys: ArcSwap<KeySet>,
    /// When the keys were last fetched (or tried); held while a fetch runs.
    fetching: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Put before its principals.
    principal_prefix: String,
    /// The scopes its tokens may grant; `None`: any.
    scopes: Option<Vec<String>>,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Checks access tokens against the trusted issuers.
pub struct Verifier {
    issuers: Vec<Arc<Issuer>>,
    leeway: u64,
    principal_claim: String,
    groups_claim: String,
    refetch_interval: Duration,
    client: HttpClient,
    /// Tokens verified recently, by a hash of audience and token seeded from the OS random
    /// source. An entry answers only the exact token and audience it holds, so two tokens
    /// meeting at one entry cost a verification, never a wrong answer; and only verified
    /// tokens are entered. foldhash, not SipHash: about 0.2 k instructions on the bench's
    /// 300-byte token against 1.3 k.
    cache: DashMap<u64, Cached, foldhash::fast::SeedableRandomState>,
    /// The seed of that hash.
    cache_keys: foldhash::fast::SeedableRandomState,
}

/// A verified token, remembered.
struct Cached {
    /// The token and the audience it was verified for (compared on each hit).
    token: Box<str>,
    audience: Box<str>,
    verified: Verified,
    /// When it was cached (Unix seconds): a clock set back past it makes the entry stale.
    since: u64,
    /// The last second it may be used in: its `exp` with the leeway, or [`CACHE_FOR`] after it
    /// was cached, whichever is first.
    until: u64,
}

impl Cached {
    /// Cached at `since` (Unix seconds): entries keep wall-clock times, so that a hit reads
    /// the clock once.
    fn new(
        token: &str,
        audience: &str,
        verified: Verified,
        (exp, leeway): (u64, u64),
        since: u64,
    ) -> Cached {
        Cached {
            token: token.into(),
            audience: audience.into(),
            verified,
            since,
            until: exp
                .saturating_add(leeway)
                .min(since.saturating_add(CACHE_FOR.as_secs() - 1)),
        }
    }

    /// Whether it may be used at `now` (Unix seconds).
    fn is_fresh(&self, now: u64) -> bool {
        (self.since..=self.until).contains(&now)
    }
}

/// Whether text shows `c` as nothing, reorders around it, or breaks a line at it: Unicode
/// format characters (Cf: zero-width characters, bidirectional controls, tags), the other
/// default-ignorable code points (variation selectors, Hangul fillers), and the line and
/// paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{34F}' | '\u{115F}'..='\u{1160}' | '\u{17B4}'..='\u{17B5}' | '\u{180B}'..='\u{180F}'
        | '\u{2028}'..='\u{2029}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFF8}' | '\u{E0000}'..='\u{E0FFF}')
        || matches!(c,
        '\u{AD}' | '\u{600}'..='\u{605}' | '\u{61C}' | '\u{6DD}' | '\u{70F}' | '\u{890}'..='\u{891}'
        | '\u{8E2}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// A foldhash state seeded from the OS random source (foldhash's own seed comes from addresses
/// and the clock), falling back to foldhash's own if that source fails.
pub(super) fn random_hash_state() -> foldhash::fast::SeedableRandomState {
    static SHARED: OnceLock<Option<foldhash::SharedSeed>> = OnceLock::new();
    let random = || {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).ok().map(|()| u64::from_ne_bytes(b))
    };
    let shared = SHARED.get_or_init(|| random().map(foldhash::SharedSeed::from_u64));
    match (shared, random()) {
        (Some(shared), Some(seed)) => foldhash::fast::SeedableRandomState::with_seed(seed, shared),
        _ => foldhash::fast::SeedableRandomState::random(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    /// A verifier for the OAuth settings; keys are fetched when first needed.
    pub fn new(settings: &OAuthSettings, tls: &Arc<rustls::ClientConfig>) -> Self {
        let https = crate::outbound_tls::connector(HttpConnector::new(), tls);
        Verifier {
            issuers: settings
                .issuers
                .iter()
                .map(|i| {
                    Arc::new(Issuer {
                        issuer: i.issuer.clone(),
                        jwks_uri: i.jwks_uri.clone(),
                        keys: ArcSwap::from_pointee(KeySet::default()),
                        fetching: Arc::default(),
                        principal_prefix: i.principal_prefix.clone(),
                        scopes: i.scopes.clone(),
                    })
                })
                .collect(),
            leeway: settings.leeway.as_secs(),
            principal_claim: settings.principal_claim.clone(),
            groups_claim: settings.groups_claim.clone(),
            refetch_interval: settings.key_refetch_interval,
            cache: DashMap::with_hasher(random_hash_state()),
            cache_keys: random_hash_state(),
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    /// Verifies a token and reads its bearer's claims. A token verified before is taken from
    /// the cache (found by a keyed hash, compared whole) until it expires or [`CACHE_FOR`]
    /// passes, whichever is first:
    /// a signature check costs more than the rest of a proxied call.
    pub async fn verify(&self, token: &str, audience: &str) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        // Keyed by audience too: a token verified for one endpoint says nothing of another.
        let key = std::hash::BuildHasher::hash_one(&self.cache_keys, (audience, token));
        let now = unix_now();
        if let Some(hit) = self.cache.get(&key)
            && &*hit.token == token
            && &*hit.audience == audience
        {
            if hit.is_fresh(now) {
                return Ok(hit.verified.clone());
            }
            drop(hit);
            self.cache.remove(&key);
        }
        let (verified, exp) = self.verify_uncached(token, audience).await?;
        // Entries hold the token: the largest are verified each time rather than kept.
        if token.len() > MAX_CACHED_TOKEN_BYTES {
            return Ok(verified);
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.retain(|_, e| e.is_fresh(now));
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
        }
        self.cache.insert(
            key,
            Cached::new(
                token,
                audience,
                verified.clone(),
                (exp, self.leeway),
                unix_now(),
            ),
        );
        Ok(verified)
    }

    /// Verifies a token: its claims and its `exp`.
    async fn verify_uncached(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(Verified, u64), TokenError> {
        if token.split('.').count() != 3 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALLOWED.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        if has_critical_extensions(token) {
            return Err(TokenError::Critical);
        }
        // The issuer is read before the signature is checked only to choose whose keys check
        // it; the check then requires that same `iss`.
        let iss = unverified_issuer(token).ok_or(TokenError::Issuer)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(TokenError::Issuer)?;
        let key = self.key(issuer, header.kid.as_deref(), header.alg).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_audience(&[audience]);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &key.decoding,
            &validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::Signature,
                K::InvalidAudience => TokenError::Audience,
                K::ExpiredSignature | K::ImmatureSignature => TokenError::Expired,
                K::InvalidIssuer => TokenError::Issuer,
                K::MissingRequiredClaim(c) => TokenError::Claim(c.clone()),
                K::InvalidAlgorithm => TokenError::NoKey,
                _ => TokenError::Malformed,
            }
        })?;
        let exp = match data.claims.get("exp") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .ok_or_else(|| TokenError::Claim("exp".into()))?,
            _ => return Err(TokenError::Claim("exp".into())),
        };
        // jsonwebtoken skips an `nbf` it cannot read (a string, a negative number): a token
        // its issuer meant for later would pass. Read here, and refused unless a time.
        match data.claims.get("nbf") {
            None => {}
            Some(Value::Number(n)) => {
                let nbf = n
                    .as_u64()
                    .or_else(|| {
                        n.as_f64()
                            .filter(|f| (0.0..u64::MAX as f64).contains(f))
                            .map(|f| f.ceil() as u64)
                    })
                    .ok_or_else(|| TokenError::Claim("nbf".into()))?;
                if nbf > unix_now().saturating_add(self.leeway) {
                    return Err(TokenError::Expired);
                }
            }
            Some(_) => return Err(TokenError::Claim("nbf".into())),
        }
        let mut read = self.claims(&issuer.principal_prefix, data.claims)?;
        if let Some(granted) = &issuer.scopes {
            read.scopes.retain(|s| granted.iter().any(|g| **g == **s));
        }
        let scopes: Arc<[Box<str>]> = read.scopes.into();
        let verified = Verified {
            principal: Arc::from(read.principal),
            claims: Arc::new(super::Claims {
                groups: read.groups.into(),
                scopes: scopes.iter().cloned().collect(),
                token: Some(super::SubjectToken::new(token, exp)),
            }),
            scopes,
        };
        Ok((verified, exp))
    }

    fn claims(
        &self,
        prefix: &str,
        mut c: serde_json::Map<String, Value>,
    ) -> Result<Read, TokenError> {
        // Principals end up in logs, session tokens and plugin calls: printable text only,
        // and none of it invisible (`admin\u{200B}` would show as `admin` there).
        let principal = match c.remove(&self.principal_claim) {
            Some(Value::String(p))
                if !p.is_empty()
                    && p.len() <= MAX_PRINCIPAL
                    && !p.chars().any(|c| c.is_control() || is_invisible(c)) =>
            {
                format!("{prefix}{p}")
            }
            _ => return Err(TokenError::Claim(self.principal_claim.clone())),
        };
        let list = |v: Option<Value>, what: &str| -> Result<Vec<Box<str>>, TokenError> {
            let items: Vec<Box<str>> = match v {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => s
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(Box::from)
                    .collect(),
                Some(Value::Array(a)) => a
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(Box::from(s)),
                        _ => Err(TokenError::Claim(what.to_owned())),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(TokenError::Claim(what.to_owned())),
            };
            if items.len() > MAX_LIST {
                return Err(TokenError::Claim(what.to_owned()));
            }
            Ok(items)
        };
        let mut scopes = list(c.remove("scope"), "scope")?;
        scopes.extend(list(c.remove("scp"), "scp")?);
        // Groups name people of the issuer, like principals: namespaced the same way, so that
        // one issuer's `eng` is not another's.
        let groups = list(c.remove(&self.groups_claim), &self.groups_claim)?
            .into_iter()
            .map(|g| Box::from(format!("{prefix}{g}")))
            .collect();
        Ok(Read {
            principal,
            scopes,
            groups,
        })
    }

    /// The key that checks a token of `issuer` with `kid` and `alg`. A key the current set
    /// has is used at once (a set past [`MAX_AGE`] is refreshed in the background, and used
    /// while that fails, up to [`MAX_STALE`]); an unknown key id waits for a fetch, at most one
    /// per refetch interval.
    async fn key(
        &self,
        issuer: &Arc<Issuer>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<Key>, TokenError> {
        let usable = |set: &KeySet| set.fetched.is_some_and(|t| t.elapsed() < MAX_STALE);
        {
            let set = issuer.keys.load();
            if usable(&set) {
                match set.lookup(kid, alg) {
                    Lookup::Found(k) => {
                        if set.fetched.is_some_and(|t| t.elapsed() >= MAX_AGE) {
                            self.refresh_in_background(issuer);
                        }
                        return Ok(k);
                    }
                    Lookup::Refused(e) => return Err(e),
                    Lookup::Unknown => {}
                }
            }
        }
        {
            let mut last = issuer.fetching.clone().lock_owned().await;
            // Another request may have fetched while this one waited.
            if last.is_none_or(|t| t.elapsed() >= self.refetch_interval) {
                *last = Some(Instant::now());
                // The fetch is a task of its own, holding the lock: a request cancelled while
                // it waits (its client gone) must not end the fetch that the time just set
                // says happened, leaving the keys unfetched for the whole interval.
                let (client, issuer) = (self.client.clone(), issuer.clone());
                let fetch = tokio::spawn(async move {
                    fetch_into(&client, &issuer).await;
                    drop(last);
                });
                let _ = fetch.await;
            }
        }
        let set = issuer.keys.load();
        if !usable(&set) {
            return Err(TokenError::KeysUnavailable);
        }
        match set.lookup(kid, alg) {
            Lookup::Found(k) => Ok(k),
            Lookup::Refused(e) => Err(e),
            Lookup::Unknown => Err(TokenError::NoKey),
        }
    }

    /// Refreshes an issuer's aging set without making the request wait, unless a fetch is
    /// running or one ran within the refetch interval.
    fn refresh_in_background(&self, issuer: &Arc<Issuer>) {
        let Ok(mut last) = issuer.fetching.clone().try_lock_owned() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < self.refetch_interval) {
            return;
        }
        *last = Some(Instant::now());
        let (client, issuer) = (self.client.clone(), issuer.clone());
        tokio::spawn(async move {
            fetch_into(&client, &issuer).await;
            drop(last);
        });
    }
}

/// Fetches an issuer's keys and stores them; a failure keeps the set it had.
async fn fetch_into(client: &HttpClient, issuer: &Issuer) {
    match fetch(client, &issuer.jwks_uri).await {
        Ok(keys) => {
            tracing::info!(issuer = %issuer.issuer, keys = keys.len(), "fetched signing keys");
            issuer.keys.store(Arc::new(KeySet {
                keys,
                fetched: Some(Instant::now()),
            }));
        }
        Err(why) => {
            tracing::warn!(issuer = %issuer.issuer, uri = %issuer.jwks_uri, "cannot fetch signing keys: {why}");
        }
    }
}

async fn fetch(client: &HttpClient, uri: &http::Uri) -> Result<Vec<Arc<Key>>, String> {
    let req = http::Request::get(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>(body)
    };
    let body = tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
    // A key this gateway cannot use is skipped, not fatal: sets mix key types.
    Ok(set
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| usable(&jwk).map(Arc::new))
        .take(MAX_KEYS)
        .collect())
}

/// A JWK as a verification key, if it is a public signing key of a type accepted here.
fn usable(jwk: &Jwk) -> Option<Key> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let fits: fn(Algorithm) -> bool = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => |a| {
            matches!(
                a,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            )
        },
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => |a| a == Algorithm::ES256,
            EllipticCurve::P384 => |a| a == Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            |a| a == Algorithm::EdDSA
        }
        // Symmetric keys (`oct`) are never verification keys here.
        _ => return None,
    };
    // A key pinned to an algorithm that is not a signature one (RSA-OAEP, say) is not ours.
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(Algorithm::from_str(&format!("{a:?}")).ok()?),
    };
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        fits,
        decoding: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// Whether the token's header has `crit`.
fn has_critical_extensions(token: &str) -> bool {
    #[derive(Deserialize)]
    struct Crit {
        crit: Option<serde::de::IgnoredAny>,
    }
    let Some(header) = token.split('.').next() else {
        return true;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice::<Crit>(&b).ok())
        .is_none_or(|c| c.crit.is_some())
}

/// The `iss` of a token's payload, before anything is verified.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified() -> Verified {
        Verified {
            principal: Arc::from("alice"),
            scopes: Arc::default(),
            claims: Arc::default(),
        }
    }

    #[test]
    fn a_cached_token_serves_until_its_exp_or_the_cache_period_and_not_after_the_clock_goes_back() {
        let (leeway, now) = (30, 1_800_000_000);
        let cached = |exp| Cached::new("t", "a", verified(), (exp, leeway), now);
        // Expiring within the cache period: served through its leeway, not a second after.
        let soon = cached(now + 100);
        assert!(soon.is_fresh(now));
        assert!(soon.is_fresh(now + 100 + leeway));
        assert!(!soon.is_fresh(now + 100 + leeway + 1));
        // Expiring long after: served for the cache period only.
        let late = cached(now + 86_400);
        let period = CACHE_FOR.as_secs();
        assert!(late.is_fresh(now + period - 2));
        assert!(!late.is_fresh(now + period));
        // A clock set back past when it was cached: verified again.
        assert!(!late.is_fresh(now - 1));
        // An exp in the past (within the leeway when verified) or at the end of time.
        let past = cached(now - leeway);
        assert!(past.is_fresh(now) && !past.is_fresh(now + 1));
        let never = cached(u64::MAX);
        assert!(never.is_fresh(now + period - 2) && !never.is_fresh(now + period));
    }
}
