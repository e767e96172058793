//! Client authentication: static bearer tokens for machines and OAuth 2.1 access tokens (JWTs
//! from trusted issuers, as the MCP authorization specification asks of a resource server),
//! each giving an [`Identity`]; and the scope checks that follow once a request is read.

mod jwt;
mod scopes;
mod static_tokens;

use std::sync::Arc;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

use crate::config::{Config, OAuthSettings};
pub use jwt::TokenError;
pub use scopes::{Grant, covers};

/// Who is calling.
pub type Principal = Arc<str>;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The principal (a static token's, or the access token's principal claim).
    pub principal: Principal,
    /// The scopes it holds, for the gateway's checks.
    pub grant: Grant,
    /// What its token says, for policy plugins.
    pub claims: Arc<Claims>,
}

/// What a caller's access token says beyond its principal: what policy plugins see.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Claims {
    /// The groups it lists.
    pub groups: Box<[Box<str>]>,
    /// The scopes it grants.
    pub scopes: Box<[Box<str>]>,
    /// The verified access token itself, for upstreams that take it in exchange for their own
    /// (RFC 8693). Never sent upstream as it is, never logged.
    pub token: Option<SubjectToken>,
}

impl Claims {
    /// Whether two tokens' claims grant the same groups and scopes (as sets: in any order,
    /// repeats aside; `None` grants nothing): what a policy decision about one holds for the
    /// other.
    pub fn same_grants(a: Option<&Claims>, b: Option<&Claims>) -> bool {
        fn parts(c: Option<&Claims>) -> (&[Box<str>], &[Box<str>]) {
            c.map_or((&[], &[]), |c| (&c.groups, &c.scopes))
        }
        let (a, b) = (parts(a), parts(b));
        let same = |x: &[Box<str>], y: &[Box<str>]| {
            x.iter().all(|s| y.contains(s)) && y.iter().all(|s| x.contains(s))
        };
        same(a.0, b.0) && same(a.1, b.1)
    }

    /// A hash of the groups and scopes as sets: equal for [`Claims::same_grants`].
    pub fn grants_hash(c: Option<&Claims>) -> u64 {
        use std::hash::BuildHasher;
        // Seeded once per process at random: with a known seed, sets of groups chosen to
        // collide would share one bucket of the hidden sessions' map whatever its own seed.
        static HASHER: std::sync::LazyLock<foldhash::fast::SeedableRandomState> =
            std::sync::LazyLock::new(jwt::random_hash_state);
        let hasher = &*HASHER;
        let mut sum = 0u64;
        if let Some(c) = c {
            // Each distinct item once, in any order: equal sets hash alike.
            let mut seen = |kind: u8, items: &[Box<str>]| {
                for (i, s) in items.iter().enumerate() {
                    if !items[..i].contains(s) {
                        sum = sum.wrapping_add(hasher.hash_one((kind, &**s)));
                    }
                }
            };
            seen(0, &c.groups);
            seen(1, &c.scopes);
        }
        sum
    }
}

/// A caller's verified OAuth access token, held for token exchange, with its `exp`. Its
/// `Debug` says nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectToken {
    token: Arc<str>,
    expires_at: u64,
}

impl SubjectToken {
    /// The token.
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The token, shared.
    pub fn shared(&self) -> Arc<str> {
        self.token.clone()
    }

    /// When it expires, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    fn new(token: &str, expires_at: u64) -> SubjectToken {
        SubjectToken {
            token: Arc::from(token),
            expires_at,
        }
    }
}

impl std::fmt::Debug for SubjectToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectToken(..)")
    }
}

/// Why a request was not authenticated or not authorized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// A token that matches no principal.
    #[error("invalid bearer token")]
    Invalid,
    /// An access token that was refused.
    #[error("invalid access token: {0}")]
    Token(#[from] TokenError),
    /// The token lacks scopes the request needs.
    #[error("insufficient scope: this request needs {}", .0.join(" "))]
    InsufficientScope(Vec<String>),
}

impl AuthError {
    /// Whether this refusal is 403 (authenticated, not allowed) rather than 401.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::InsufficientScope(_))
    }
}

/// The OAuth side: the verifier, the scope rules and what the challenges and metadata say.
struct OAuth {
    verifier: jwt::Verifier,
    rules: scopes::Rules,
    required: Vec<String>,
    /// `/mcp` itself.
    root: Resource,
    /// Each profile's endpoint (`/mcp/{profile}`), by profile name.
    profiles: std::collections::HashMap<String, Resource>,
}

/// One protected resource (an endpoint): the audience its tokens name, and where its
/// metadata is.
struct Resource {
    audience: String,
    metadata_url: String,
    metadata_path: String,
    metadata: Bytes,
}

/// What the authenticator needs of a profile: its name, what it is for, and the scopes that
/// grant it (advertised in its metadata).
pub struct ProfileResource<'a> {
    /// The profile's name (the last segment of its endpoint).
    pub name: &'a str,
    /// Its description.
    pub description: Option<&'a str>,
    /// Scopes that grant it.
    pub scopes: &'a [String],
}

impl OAuth {
    fn resource(&self, profile: Option<&str>) -> &Resource {
        profile
            .and_then(|p| self.profiles.get(p))
            .unwrap_or(&self.root)
    }
}

/// The authenticator of one endpoint; with no tokens, no OAuth and no client certificates
/// mapped to principals, authentication is off.
pub struct Auth {
    tokens: static_tokens::StaticTokens,
    /// Principals client certificates map to (the listener says which a connection has).
    certificate_principals: std::collections::HashSet<Principal>,
    oauth: Option<OAuth>,
    /// The claims of every static-token caller: none.
    no_claims: Arc<Claims>,
}

impl Auth {
    /// An authenticator of static tokens only (the admin API's).
    pub fn new_static(tokens: &[(String, Principal)]) -> Self {
        Auth {
            tokens: static_tokens::StaticTokens::new(
                tokens
                    .iter()
                    .map(|(t, p)| (t.as_str(), p.clone(), Grant::All)),
            ),
            certificate_principals: Default::default(),
            oauth: None,
            no_claims: Arc::default(),
        }
    }

    /// The admin API's authenticator: its tokens, each with the scopes it grants.
    pub fn admin(tokens: &[crate::config::AdminToken]) -> Self {
        let grant = |t: &crate::config::AdminToken| match &t.scopes {
            None => Grant::All,
            Some(scopes) => Grant::Scopes(scopes.clone()),
        };
        Auth {
            tokens: static_tokens::StaticTokens::new(
                tokens
                    .iter()
                    .map(|t| (t.token.as_str(), t.principal.clone(), grant(t))),
            ),
            certificate_principals: Default::default(),
            oauth: None,
            no_claims: Arc::default(),
        }
    }

    /// Builds the MCP endpoints' authenticator from the configuration: static tokens, client
    /// certificates' principals and, optionally, OAuth (its issuers reached with `tls`); each
    /// profile is a protected resource of its own (its URL below the gateway's resource).
    pub fn new(config: &Config, tls: &Arc<rustls::ClientConfig>) -> Self {
        let profiles: Vec<ProfileResource<'_>> = config
            .profiles
            .iter()
            .map(|p| ProfileResource {
                name: &p.name,
                description: p.description.as_deref(),
                scopes: &p.grant.scopes,
            })
            .collect();
        let profiles = &profiles;
        Auth {
            tokens: static_tokens::StaticTokens::new(
                config
                    .tokens
                    .iter()
                    .map(|(t, p)| (t.as_str(), p.clone(), Grant::All)),
            ),
            certificate_principals: config
                .tls
                .iter()
                .flat_map(|t| t.client_auth.iter())
                .flat_map(|c| c.principals.iter())
                .map(|p| Principal::from(p.principal.as_str()))
                .collect(),
            oauth: config.oauth.as_ref().map(|o| OAuth {
                verifier: jwt::Verifier::new(o, tls),
                rules: scopes::Rules::new(&o.scope_rules),
                required: o.required_scopes.clone(),
                root: Resource {
                    audience: o.resource.clone(),
                    metadata_url: o.metadata_url.clone(),
                    metadata_path: o.metadata_path.clone(),
                    metadata: metadata_document(o, &o.resource, None),
                },
                profiles: profiles
                    .iter()
                    .map(|p| {
                        let audience = format!("{}/{}", o.resource.trim_end_matches('/'), p.name);
                        let resource = Resource {
                            metadata_url: format!("{}/{}", o.metadata_url, p.name),
                            metadata_path: format!("{}/{}", o.metadata_path, p.name),
                            metadata: metadata_document(o, &audience, Some(p)),
                            audience,
                        };
                        (p.name.to_owned(), resource)
                    })
                    .collect(),
            }),
            no_claims: Arc::default(),
        }
    }

    /// Whether no caller needs a credential (no tokens, OAuth or client certificates).
    pub fn is_off(&self) -> bool {
        self.tokens.is_empty() && self.oauth.is_none() && self.certificate_principals.is_empty()
    }

    /// Authenticates a request to the endpoint of `profile` (`None`: `/mcp`): an access token
    /// must have been issued for that endpoint (its `aud`). `Ok(None)` when authentication is
    /// off.
    /// A request without a bearer token is its connection's client certificate's principal,
    /// when it has one (`certificate`).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        profile: Option<&str>,
        certificate: Option<&Principal>,
    ) -> Result<Option<Identity>, AuthError> {
        if self.is_off() {
            return Ok(None);
        }
        // One Authorization header: with two, which one counts would be a guess.
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().map_err(|_| AuthError::Invalid)?,
            (None, _) => {
                return match certificate {
                    Some(principal) => Ok(Some(Identity {
                        principal: principal.clone(),
                        grant: Grant::All,
                        claims: self.no_claims.clone(),
                    })),
                    None => Err(AuthError::Missing),
                };
            }
            (Some(_), Some(_)) => return Err(AuthError::Invalid),
        };
        // The scheme, then one space: a plain comparison (the usual case), else a search.
        let token = match value.get(..7) {
            Some(head) if head.eq_ignore_ascii_case("bearer ") => &value[7..],
            _ => match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
                _ => return Err(AuthError::Missing),
            },
        };
        let token = token.trim();
        if let Some((principal, grant)) = self.tokens.principal(token) {
            return Ok(Some(Identity {
                principal,
                grant,
                claims: self.no_claims.clone(),
            }));
        }
        let Some(oauth) = &self.oauth else {
            return Err(AuthError::Invalid);
        };
        let audience = &oauth.resource(profile).audience;
        let verified = oauth.verifier.verify(token, audience).await?;
        // A token from an issuer must not pose as a machine principal.
        if self.tokens.names(&verified.principal)
            || self.certificate_principals.contains(&*verified.principal)
        {
            return Err(AuthError::Token(TokenError::Claim(
                "principal (it names a static-token or client-certificate principal)".into(),
            )));
        }
        // Shared with the cache: no allocation per request, and a session holding these
        // claims already sees the same pointer.
        let identity = Identity {
            principal: verified.principal,
            grant: Grant::Scopes(verified.scopes),
            claims: verified.claims,
        };
        let lacking = identity
            .grant
            .lacking(oauth.required.iter().map(String::as_str));
        if !lacking.is_empty() {
            return Err(AuthError::InsufficientScope(
                lacking.into_iter().map(str::to_owned).collect(),
            ));
        }
        Ok(Some(identity))
    }

    /// Checks that `identity` holds the scopes a request of `method` with `params` needs.
    pub fn authorize(
        &self,
        identity: Option<&Identity>,
        method: &str,
        params: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let (Some(oauth), Some(identity)) = (&self.oauth, identity) else {
            return Ok(());
        };
        if identity.grant == Grant::All {
            return Ok(());
        }
        let needed = oauth.rules.needed(method, params);
        if needed.is_empty() || identity.grant.lacking(needed.iter().copied()).is_empty() {
            return Ok(());
        }
        // The challenge names everything the request needs, so that one step-up suffices.
        let mut all: Vec<String> = oauth.required.clone();
        for s in needed {
            if !all.iter().any(|a| a == s) {
                all.push(s.to_owned());
            }
        }
        Err(AuthError::InsufficientScope(all))
    }

    /// The `WWW-Authenticate` value for a refusal at the endpoint of `profile` (RFC 6750 §3,
    /// RFC 9728 §5.1).
    pub fn challenge(&self, error: &AuthError, profile: Option<&str>) -> HeaderValue {
        let Some(oauth) = &self.oauth else {
            return HeaderValue::from_static("Bearer");
        };
        let mut v = String::from("Bearer ");
        let quoted = |s: &str| -> String {
            s.chars()
                .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
                .collect()
        };
        match error {
            AuthError::Missing => {}
            AuthError::Invalid | AuthError::Token(_) => {
                v.push_str("error=\"invalid_token\", error_description=\"");
                v.push_str(&quoted(&error.to_string()));
                v.push_str("\", ");
            }
            AuthError::InsufficientScope(_) => {
                v.push_str("error=\"insufficient_scope\", error_description=\"");
                v.push_str(&quoted(&error.to_string()));
                v.push_str("\", ");
            }
        }
        v.push_str("resource_metadata=\"");
        v.push_str(&quoted(&oauth.resource(profile).metadata_url));
        v.push('"');
        let scopes = match error {
            AuthError::InsufficientScope(s) => s.as_slice(),
            _ => oauth.required.as_slice(),
        };
        if !scopes.is_empty() {
            v.push_str(", scope=\"");
            v.push_str(&quoted(&scopes.join(" ")));
            v.push('"');
        }
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// The protected-resource metadata document, if `path` is where it is served.
    pub fn metadata(&self, path: &str) -> Option<Bytes> {
        let oauth = self.oauth.as_ref()?;
        // Clients look at the path-inserted URL first, then at the bare well-known one.
        // A client that kept the resource's trailing slash asks with it.
        let path = path.strip_suffix('/').unwrap_or(path);
        if path == oauth.root.metadata_path || path == "/.well-known/oauth-protected-resource" {
            return Some(oauth.root.metadata.clone());
        }
        let name = path
            .strip_prefix(oauth.root.metadata_path.as_str())?
            .strip_prefix('/')?;
        oauth.profiles.get(name).map(|r| r.metadata.clone())
    }
}

/// The RFC 9728 document of `resource`: its authorization servers, scopes, and header-only
/// bearer tokens (tokens in a query string would be logged everywhere).
fn metadata_document(
    o: &OAuthSettings,
    resource: &str,
    profile: Option<&ProfileResource<'_>>,
) -> Bytes {
    let mut doc = serde_json::json!({
        "resource": resource,
        "authorization_servers": o.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
        "bearer_methods_supported": ["header"],
    });
    let mut scopes = o.scopes_supported.clone();
    for s in profile.map_or(&[][..], |p| p.scopes) {
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    if !scopes.is_empty() {
        doc["scopes_supported"] = serde_json::json!(scopes);
    }
    let name = match profile {
        None => o.resource_name.clone(),
        Some(p) => Some(match (p.description, &o.resource_name) {
            (Some(d), _) => d.to_owned(),
            (None, Some(n)) => format!("{n} ({})", p.name),
            (None, None) => p.name.to_owned(),
        }),
    };
    if let Some(name) = name {
        doc["resource_name"] = serde_json::json!(name);
    }
    Bytes::from(serde_json::to_vec(&doc).expect("a JSON value serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn grants_compare_and_hash_as_sets() {
        let c = |groups: &[&str], scopes: &[&str]| Claims {
            groups: groups.iter().map(|s| (*s).into()).collect(),
            scopes: scopes.iter().map(|s| (*s).into()).collect(),
            token: None,
        };
        let same = [
            (c(&["eng"], &["a", "b"]), c(&["eng"], &["b", "a"])),
            (c(&[], &["a", "a", "b"]), c(&[], &["b", "a"])),
            (c(&[], &["a", "b", "b"]), c(&[], &["a", "a", "b"])),
        ];
        for (x, y) in &same {
            assert!(Claims::same_grants(Some(x), Some(y)), "{x:?} {y:?}");
            assert_eq!(Claims::grants_hash(Some(x)), Claims::grants_hash(Some(y)));
        }
        assert!(Claims::same_grants(None, Some(&c(&[], &[]))));
        assert_eq!(
            Claims::grants_hash(None),
            Claims::grants_hash(Some(&c(&[], &[])))
        );
        let other = [
            (c(&["eng"], &["a"]), c(&["eng"], &["a", "admin"])),
            (c(&["eng"], &[]), c(&[], &["eng"])),
            (c(&["a"], &[]), c(&["b"], &[])),
        ];
        for (x, y) in &other {
            assert!(!Claims::same_grants(Some(x), Some(y)), "{x:?} {y:?}");
        }
    }

    #[tokio::test]
    async fn the_scheme_is_bearer_in_any_case_followed_by_a_space() {
        let auth = Auth::new_static(&[("s3cret-token-000000".into(), Arc::from("alice"))]);
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, value.parse().unwrap());
            h
        };
        for ok in [
            "Bearer s3cret-token-000000",
            "bearer s3cret-token-000000",
            "BEARER   s3cret-token-000000 ",
            "bEaReR s3cret-token-000000\t",
        ] {
            let id = auth.authenticate(&with(ok), None, None).await;
            assert_eq!(id.unwrap().unwrap().principal.as_ref(), "alice", "{ok:?}");
        }
        for missing in [
            "Bearer\ts3cret-token-000000",
            "Bearers3cret-token-000000",
            "Basic s3cret-token-000000",
            "Bearerx s3cret-token-000000",
            "Bearer",
            "s3cret-token-000000",
        ] {
            let id = auth.authenticate(&with(missing), None, None).await;
            assert_eq!(id, Err(AuthError::Missing), "{missing:?}");
        }
        // Bytes past ASCII (obs-text), which HTTP lets through.
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"Bearer s3cret-token-000000\xff").unwrap();
        h.insert(AUTHORIZATION, value);
        let id = auth.authenticate(&h, None, None).await;
        assert_eq!(id, Err(AuthError::Invalid));
    }

    #[tokio::test]
    async fn maps_tokens_to_principals() {
        let auth = Auth::new_static(&[("s3cret-token-000000".into(), Arc::from("alice"))]);
        assert_eq!(
            auth.authenticate(&HeaderMap::new(), None, None).await,
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.authenticate(&bearer("nope"), None, None).await,
            Err(AuthError::Invalid)
        );
        // A prefix of the token, or the token with more after it, is not the token.
        assert_eq!(
            auth.authenticate(&bearer("s3cret-token-00000"), None, None)
                .await,
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.authenticate(&bearer("s3cret-token-0000000"), None, None)
                .await,
            Err(AuthError::Invalid)
        );
        let id = auth
            .authenticate(&bearer("s3cret-token-000000"), None, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&*id.principal, "alice");
        assert_eq!(id.grant, Grant::All);
        let mut lower = HeaderMap::new();
        lower.insert(AUTHORIZATION, "bearer s3cret-token-000000".parse().unwrap());
        assert!(
            auth.authenticate(&lower, None, None)
                .await
                .unwrap()
                .is_some()
        );
        // Two Authorization headers: refused, whichever is valid.
        let mut two = bearer("s3cret-token-000000");
        two.append(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(
            auth.authenticate(&two, None, None).await,
            Err(AuthError::Invalid)
        );
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, "Basic czNjcmV0".parse().unwrap());
        assert_eq!(
            auth.authenticate(&basic, None, None).await,
            Err(AuthError::Missing)
        );
        assert_eq!(
            Auth::new_static(&[])
                .authenticate(&HeaderMap::new(), None, None)
                .await,
            Ok(None)
        );
        // The table holds digests, not tokens.
        assert!(!format!("{:?}", auth.tokens).contains("s3cret"));
    }
}
