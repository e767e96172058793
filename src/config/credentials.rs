//! Per-caller upstream credentials (`upstreams[].credentials`): what an HTTP upstream is sent
//! for each principal, since the client's own token never goes upstream.

use std::collections::HashMap;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

/// Credentials as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    /// The header that carries them (default `Authorization`).
    #[serde(default)]
    pub header: Option<String>,
    /// A secret per principal.
    #[serde(default)]
    pub per_principal: Vec<RawSecret>,
    /// A value made from the verified caller, for principals without a secret: `{principal}`
    /// is replaced by the principal.
    #[serde(default)]
    pub template: Option<String>,
    /// Refuse callers with no credentials (default true); false sends such calls without the
    /// header.
    #[serde(default)]
    pub required: Option<bool>,
    /// Exchange the caller's OAuth access token at the upstream's authorization server for a
    /// token meant for the upstream (RFC 8693). Not with `per_principal` or `template`.
    #[serde(default)]
    pub token_exchange: Option<RawTokenExchange>,
    /// Send them over plain http to a host that is not loopback (a network the operator
    /// trusts: a service mesh's mTLS, say). Default false: refused.
    #[serde(default)]
    pub allow_plain_http: bool,
}

/// Token exchange as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenExchange {
    /// The authorization server's token endpoint.
    pub token_endpoint: String,
    /// The gateway's client id there.
    pub client_id: String,
    /// Its client secret (prefer `client_secret_env`); none: a public client.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// `audience` of the requested token.
    #[serde(default)]
    pub audience: Option<String>,
    /// `resource` of the requested token (RFC 8707).
    #[serde(default)]
    pub resource: Option<String>,
    /// `scope` of the requested token.
    #[serde(default)]
    pub scope: Option<String>,
}

impl std::fmt::Debug for RawTokenExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTokenExchange")
            .field("token_endpoint", &self.token_endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| ".."))
            .field("client_secret_env", &self.client_secret_env)
            .finish_non_exhaustive()
    }
}

/// Validated token-exchange settings.
#[derive(Clone)]
pub struct TokenExchangeConfig {
    /// The token endpoint.
    pub token_endpoint: http::Uri,
    /// The client id.
    pub client_id: String,
    /// The client secret, if a confidential client.
    pub client_secret: Option<String>,
    /// Requested audience.
    pub audience: Option<String>,
    /// Requested resource.
    pub resource: Option<String>,
    /// Requested scope.
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenExchangeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenExchangeConfig")
            .field("token_endpoint", &self.token_endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| ".."))
            .field("audience", &self.audience)
            .field("resource", &self.resource)
            .field("scope", &self.scope)
            .finish()
    }
}

impl TokenExchangeConfig {
    fn validate(
        field: &str,
        raw: RawTokenExchange,
    ) -> Result<TokenExchangeConfig, (String, String)> {
        let at = |f: &str| format!("{field}.token_exchange.{f}");
        let token_endpoint: http::Uri = raw
            .token_endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| (at("token_endpoint"), e.to_string()))?;
        let host = token_endpoint.host().unwrap_or("");
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match token_endpoint.scheme_str() {
            Some("https") if !host.is_empty() => {}
            // Callers' tokens go there: in clear text only to this machine.
            Some("http") if loopback => {}
            _ => {
                return Err((
                    at("token_endpoint"),
                    "must be an https:// URL (http:// only to a loopback address)".into(),
                ));
            }
        }
        if token_endpoint
            .authority()
            .is_some_and(|a| a.as_str().contains('@'))
        {
            return Err((
                at("token_endpoint"),
                "must not carry credentials (use client_id and client_secret)".into(),
            ));
        }
        if raw.client_id.is_empty() {
            return Err((at("client_id"), "must not be empty".into()));
        }
        let client_secret = match (raw.client_secret, &raw.client_secret_env) {
            (Some(s), None) => Some(s),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                (
                    at("client_secret_env"),
                    format!("environment variable {var} is not set"),
                )
            })?),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err((
                    at("client_secret"),
                    "set client_secret or client_secret_env, not both".into(),
                ));
            }
        }
        // Without the newline of the file a variable may have been read from.
        .map(|secret| secret.trim().to_owned());
        if client_secret.as_deref() == Some("") {
            let field = match raw.client_secret_env {
                Some(_) => "client_secret_env",
                None => "client_secret",
            };
            return Err((at(field), "must not be empty".into()));
        }
        Ok(TokenExchangeConfig {
            token_endpoint,
            client_id: raw.client_id,
            client_secret,
            audience: raw.audience,
            resource: raw.resource,
            scope: raw.scope,
        })
    }
}

/// One principal's secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    /// The principal.
    pub principal: String,
    /// The header value (prefer `value_env`).
    #[serde(default)]
    pub value: Option<String>,
    /// The environment variable holding it.
    #[serde(default)]
    pub value_env: Option<String>,
}

/// Validated credentials of one upstream.
#[derive(Clone)]
pub struct Credentials {
    /// The header.
    pub header: HeaderName,
    per_principal: HashMap<String, HeaderValue>,
    template: Option<String>,
    /// Whether a caller without credentials is refused.
    pub required: bool,
    /// Token exchange, when the upstream's credentials are exchanged for the caller's token.
    pub token_exchange: Option<TokenExchangeConfig>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("header", &self.header)
            .field("principals", &self.per_principal.keys().collect::<Vec<_>>())
            .field("template", &self.template.is_some())
            .field("required", &self.required)
            .field("token_exchange", &self.token_exchange)
            .finish()
    }
}

/// Why a caller has no credentials for an upstream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct NoCredentials(pub String);

impl Credentials {
    /// Checks the written credentials (`field` names them in errors).
    pub fn validate(field: &str, raw: RawCredentials) -> Result<Credentials, (String, String)> {
        let header = raw.header.as_deref().unwrap_or("authorization");
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            (
                format!("{field}.header"),
                format!("{header:?} is not a header name"),
            )
        })?;
        if crate::orchestrator::spec::is_exchange_header(header.as_str()) {
            return Err((
                format!("{field}.header"),
                format!("{header} is the gateway's to send; credentials go in another header"),
            ));
        }
        let mut per_principal = HashMap::new();
        for (i, s) in raw.per_principal.into_iter().enumerate() {
            let at = format!("{field}.per_principal[{i}]");
            let value = match (s.value, &s.value_env) {
                (Some(v), None) => v,
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    (
                        format!("{at}.value_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?,
                _ => return Err((at, "set exactly one of value or value_env".into())),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                (
                    format!("{at}.value"),
                    "must be visible ASCII (no line breaks)".into(),
                )
            })?;
            value.set_sensitive(true);
            if per_principal.insert(s.principal.clone(), value).is_some() {
                return Err((
                    format!("{at}.principal"),
                    format!("{:?} is listed twice", s.principal),
                ));
            }
        }
        if let Some(t) = &raw.template
            && HeaderValue::from_str(&t.replace("{principal}", "x")).is_err()
        {
            return Err((
                format!("{field}.template"),
                "must be visible ASCII (no line breaks)".into(),
            ));
        }
        let token_exchange = match raw.token_exchange {
            Some(_) if !per_principal.is_empty() || raw.template.is_some() => {
                return Err((
                    format!("{field}.token_exchange"),
                    "token_exchange replaces per_principal and template: set one way".into(),
                ));
            }
            Some(tx) => Some(TokenExchangeConfig::validate(field, tx)?),
            None => None,
        };
        if per_principal.is_empty() && raw.template.is_none() && token_exchange.is_none() {
            return Err((
                field.to_owned(),
                "set per_principal, template (or both), or token_exchange".into(),
            ));
        }
        Ok(Credentials {
            header,
            per_principal,
            template: raw.template,
            required: raw.required.unwrap_or(true),
            token_exchange,
        })
    }

    /// The header to send for `principal`; `Ok(None)`: none, and none is required. (With
    /// token exchange, the header comes per request from the exchange: `Ok(None)` here.)
    pub fn for_principal(
        &self,
        principal: Option<&str>,
    ) -> Result<Option<(HeaderName, HeaderValue)>, NoCredentials> {
        if self.token_exchange.is_some() {
            return Ok(None);
        }
        let value = match principal {
            Some(p) => match self.per_principal.get(p) {
                Some(v) => Some(v.clone()),
                // A principal that cannot be a header value (non-ASCII), or could add to the
                // template's structure (a `,`, `;`, `=`, quote or space: `alice; role=admin`
                // in `user={principal}; role=reader`), has no credentials.
                None if !fits_template(p) => None,
                None => self.template.as_ref().and_then(|t| {
                    let mut v = HeaderValue::from_str(&t.replace("{principal}", p)).ok()?;
                    v.set_sensitive(true);
                    Some(v)
                }),
            },
            None => None,
        };
        match value {
            Some(v) => Ok(Some((self.header.clone(), v))),
            None if self.required => Err(NoCredentials(match principal {
                Some(p) => format!("no upstream credentials for principal {p}"),
                None => "this upstream needs an authenticated caller".into(),
            })),
            None => Ok(None),
        }
    }
}

/// Whether `principal` may be put in a credentials template as it is: an HTTP token's
/// characters, and the `@`, `:` and `/` of e-mail addresses and issuer-prefixed subjects;
/// nothing that separates a header's parameters or list items.
fn fits_template(principal: &str) -> bool {
    !principal.is_empty()
        && principal
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~@:/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(yaml: &str) -> Result<Credentials, (String, String)> {
        Credentials::validate("c", serde_saphyr::from_str(yaml).unwrap())
    }

    #[test]
    fn secrets_then_the_template_then_refusal() {
        let c = creds(
            "{per_principal: [{principal: alice, value: 'Bearer a-secret'}], template: 'user={principal}'}",
        )
        .unwrap();
        let v = |p| {
            c.for_principal(p)
                .map(|h| h.map(|(_, v)| v.to_str().unwrap().to_owned()))
        };
        assert_eq!(v(Some("alice")), Ok(Some("Bearer a-secret".into())));
        assert_eq!(v(Some("bob")), Ok(Some("user=bob".into())));
        assert!(v(None).is_err(), "anonymous callers have no credentials");
        assert!(
            v(Some("bad\nname")).is_err(),
            "a value that would break the header is refused"
        );
        // Nothing a principal says can add to the template's structure.
        for bad in [
            "alice; role=admin",
            "x, Bearer y",
            "a b",
            "a=b",
            "a\"b",
            "a\\b",
        ] {
            assert!(v(Some(bad)).is_err(), "{bad:?}");
        }
        for good in [
            "alice@example.com",
            "auth0|123",
            "https://issuer/|sub",
            "okta:alice",
        ] {
            assert_eq!(v(Some(good)), Ok(Some(format!("user={good}"))));
        }
        assert!(!format!("{c:?}").contains("a-secret"), "not printed");
        let optional = creds("{template: 'x', required: false}").unwrap();
        assert_eq!(optional.for_principal(None), Ok(None));
    }

    #[test]
    fn bad_credentials_are_named() {
        assert_eq!(creds("{}").unwrap_err().0, "c");
        assert_eq!(
            creds("{header: 'a b', template: x}").unwrap_err().0,
            "c.header"
        );
        for own in ["Mcp-Session-Id", "content-length", "Transfer-Encoding"] {
            let (field, why) = creds(&format!("{{header: {own}, template: x}}")).unwrap_err();
            assert_eq!(field, "c.header");
            assert!(why.contains("the gateway's to send"), "{why}");
        }
        assert_eq!(
            creds("{per_principal: [{principal: a}]}").unwrap_err().0,
            "c.per_principal[0]"
        );
        assert_eq!(
            creds("{per_principal: [{principal: a, value: \"x\\ny\"}]}")
                .unwrap_err()
                .0,
            "c.per_principal[0].value"
        );
        assert_eq!(
            creds("{per_principal: [{principal: a, value: x}, {principal: a, value: y}]}")
                .unwrap_err()
                .0,
            "c.per_principal[1].principal"
        );
    }
}
