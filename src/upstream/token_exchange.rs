//! OAuth 2.0 Token Exchange (RFC 8693) for an upstream's credentials: the caller's access
//! token is exchanged at the upstream's authorization server for a token meant for that
//! upstream, so the client's own token never goes upstream. Exchanged tokens are cached per
//! caller token until shortly before they expire; the cache is bounded.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use crate::auth::SubjectToken;
use crate::config::credentials::TokenExchangeConfig;
use crate::upstream::http::Client;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Most exchanged tokens kept (one per caller token in use).
const MAX_CACHED: usize = 10_000;
/// Largest answer read from the authorization server.
const MAX_ANSWER: usize = 64 * 1024;
/// Longest an exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a token without `expires_in` is reused.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);

/// Exchanges callers' tokens for one upstream.
pub struct TokenExchange {
    config: TokenExchangeConfig,
    client: Client,
    cache: DashMap<[u8; 32], (HeaderValue, Instant)>,
}

/// What the authorization server answers (RFC 8693 §2.2.1).
#[derive(Deserialize)]
struct Issued {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<u64>,
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
        }
    }

    /// The `Authorization` value for the caller holding `subject`: cached, or exchanged now.
    /// The error says why the caller has no token for the upstream (never the token).
    pub async fn bearer(&self, subject: &SubjectToken) -> Result<HeaderValue, String> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, subject.as_str().as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(hit) = self.cache.get(&key)
            && hit.1 > Instant::now()
        {
            return Ok(hit.0.clone());
        }
        let (value, lifetime) = self.exchange(subject).await?;
        if !lifetime.is_zero() {
            if self.cache.len() >= MAX_CACHED {
                let now = Instant::now();
                self.cache.retain(|_, (_, until)| *until > now);
                if self.cache.len() >= MAX_CACHED {
                    self.cache.clear();
                }
            }
            self.cache
                .insert(key, (value.clone(), Instant::now() + lifetime));
        }
        Ok(value)
    }

    async fn exchange(&self, subject: &SubjectToken) -> Result<(HeaderValue, Duration), String> {
        let c = &self.config;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", GRANT_TYPE)
            .append_pair("subject_token", subject.as_str())
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
        let mut req = Request::post(c.token_endpoint.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json");
        match &c.client_secret {
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
                req = req.header(AUTHORIZATION, value);
            }
            None => {
                form.append_pair("client_id", &c.client_id);
            }
        }
        let req = req
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|e| format!("cannot build the token request: {e}"))?;
        let answer = async {
            let resp = self.client.request(req).await.map_err(|e| {
                format!("the authorization server cannot be reached: {e}")
            })?;
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
            .map_err(|_| format!("the authorization server did not answer within {EXCHANGE_TIMEOUT:?}"))??;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<Refused>(&body) {
                Ok(r) => format!(
                    "the authorization server refused the exchange: {}{}",
                    printable(&r.error),
                    r.error_description
                        .map(|d| format!(" ({})", printable(&d)))
                        .unwrap_or_default()
                ),
                Err(_) => format!("the authorization server answered {status}"),
            });
        }
        let issued: Issued = serde_json::from_slice(&body).map_err(|e| {
            format!("the authorization server's answer is not a token response: {e}")
        })?;
        if !issued.token_type.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "the authorization server issued a {:?} token, not a bearer token",
                printable(&issued.token_type)
            ));
        }
        let mut value = HeaderValue::try_from(format!("Bearer {}", issued.access_token))
            .ok()
            .filter(|_| !issued.access_token.is_empty())
            .ok_or_else(|| "the authorization server issued a token that cannot be a header".to_owned())?;
        value.set_sensitive(true);
        // Reused until a little before it expires, so a call never carries a token that
        // expires on the way.
        let lifetime = match issued.expires_in {
            Some(secs) => {
                let secs = Duration::from_secs(secs);
                secs.saturating_sub((secs / 4).min(Duration::from_secs(30)))
            }
            None => DEFAULT_LIFETIME,
        };
        Ok((value, lifetime))
    }
}

/// Text from the authorization server, safe to put in an error: bounded, printable.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}
