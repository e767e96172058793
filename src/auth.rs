//! Client authentication: static bearer tokens mapped to principals.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// Who is calling.
pub type Principal = Arc<str>;

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// A token that matches no principal.
    #[error("invalid bearer token")]
    Invalid,
}

/// The configured tokens; empty means authentication is off.
pub struct Auth {
    tokens: HashMap<String, Principal>,
}

impl Auth {
    /// Builds the token table.
    pub fn new(tokens: &[(String, Principal)]) -> Self {
        Auth {
            tokens: tokens.iter().cloned().collect(),
        }
    }

    /// Authenticates a request: `Ok(None)` when authentication is off.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, AuthError> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let value = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?
            .trim();
        self.tokens
            .get(token)
            .cloned()
            .map(Some)
            .ok_or(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_tokens_to_principals() {
        let auth = Auth::new(&[("s3cret-token-000000".into(), Arc::from("alice"))]);
        let mut h = HeaderMap::new();
        assert_eq!(auth.authenticate(&h), Err(AuthError::Missing));
        h.insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(auth.authenticate(&h), Err(AuthError::Invalid));
        h.insert(AUTHORIZATION, "Bearer s3cret-token-000000".parse().unwrap());
        assert_eq!(auth.authenticate(&h).unwrap().as_deref(), Some("alice"));
        assert_eq!(Auth::new(&[]).authenticate(&HeaderMap::new()), Ok(None));
    }
}
