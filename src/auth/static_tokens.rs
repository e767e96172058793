//! Static bearer tokens for machines: kept as SHA-256 digests, compared in constant time.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Grant, Principal};

/// The configured tokens, as digests (the gateway keeps no token it could leak), with the
/// principal and the grant of each.
pub(crate) struct StaticTokens {
    digests: Vec<([u8; 32], Principal, Grant)>,
}

impl StaticTokens {
    /// Digests each token.
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = (&'a str, Principal, Grant)>) -> Self {
        StaticTokens {
            digests: tokens
                .into_iter()
                .map(|(t, p, g)| (Sha256::digest(t.as_bytes()).into(), p, g))
                .collect(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The principal `token` authenticates, and its grant. Every digest is compared, all the
    /// way through, so the time taken says nothing about which token came close.
    pub(crate) fn principal(&self, token: &str) -> Option<(Principal, Grant)> {
        if self.digests.is_empty() {
            return None;
        }
        // ring's SHA-256 (assembly) costs a fraction of sha2's portable one on this path.
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let digest: &[u8] = d.as_ref();
        let mut found = None;
        for (d, p, g) in &self.digests {
            if bool::from(d.as_slice().ct_eq(digest)) {
                found = Some((p.clone(), g.clone()));
            }
        }
        found
    }

    /// Whether `principal` is one a static token names (a token from elsewhere must not pose
    /// as it).
    pub(crate) fn names(&self, principal: &str) -> bool {
        self.digests.iter().any(|(_, p, _)| **p == *principal)
    }
}

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let principals: Vec<&Arc<str>> = self.digests.iter().map(|(_, p, _)| p).collect();
        f.debug_struct("StaticTokens")
            .field("principals", &principals)
            .finish()
    }
}
