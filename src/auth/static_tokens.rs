//! Static bearer tokens for machines: kept as SHA-256 digests, compared in constant time.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Principal;

/// The configured tokens, as digests (the gateway keeps no token it could leak).
pub(crate) struct StaticTokens {
    digests: Vec<([u8; 32], Principal)>,
}

impl StaticTokens {
    /// Digests each token.
    pub(crate) fn new(tokens: &[(String, Principal)]) -> Self {
        StaticTokens {
            digests: tokens
                .iter()
                .map(|(t, p)| (Sha256::digest(t.as_bytes()).into(), p.clone()))
                .collect(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The principal `token` authenticates. Every digest is compared, all the way through, so
    /// the time taken says nothing about which token came close.
    pub(crate) fn principal(&self, token: &str) -> Option<Principal> {
        if self.digests.is_empty() {
            return None;
        }
        // ring's SHA-256 (assembly) costs a fraction of sha2's portable one on this path.
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let digest: &[u8] = d.as_ref();
        let mut found = None;
        for (d, p) in &self.digests {
            if bool::from(d.as_slice().ct_eq(digest)) {
                found = Some(p.clone());
            }
        }
        found
    }

    /// Whether `principal` is one a static token names (a token from elsewhere must not pose
    /// as it).
    pub(crate) fn names(&self, principal: &str) -> bool {
        self.digests.iter().any(|(_, p)| **p == *principal)
    }
}

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let principals: Vec<&Arc<str>> = self.digests.iter().map(|(_, p)| p).collect();
        f.debug_struct("StaticTokens")
            .field("principals", &principals)
            .finish()
    }
}
