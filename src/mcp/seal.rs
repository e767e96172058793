//! Sealed tokens: state the gateway hands a client and must get back unchanged (ChaCha20-Poly1305).
//!
//! A token is `base64url(key id ‖ nonce ‖ ciphertext ‖ tag)`. The purpose is authenticated as
//! associated data, so a token made for one use does not open as another.

use base64::Engine;
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const NONCE: usize = 12;

/// Why a token did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Not base64url, or too short to be a token.
    #[error("malformed token")]
    Malformed,
    /// Sealed with a key this gateway does not hold.
    #[error("token was sealed with an unknown key")]
    UnknownKey,
    /// Altered, or sealed for another purpose.
    #[error("token failed authentication")]
    Forged,
}

/// A key that seals and opens tokens.
pub struct Sealer {
    id: u8,
    key: LessSafeKey,
}

impl Sealer {
    /// A sealer with a fresh random key (tokens open only in this process).
    pub fn random(id: u8) -> Sealer {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the OS random source is available");
        Sealer::from_key(id, &raw)
    }

    /// A sealer with a given 256-bit key.
    pub fn from_key(id: u8, key: &[u8; 32]) -> Sealer {
        let key = UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key fits");
        Sealer {
            id,
            key: LessSafeKey::new(key),
        }
    }

    /// Seals `plain` for `purpose`.
    pub fn seal(&self, purpose: &[u8], plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let mut out = Vec::with_capacity(1 + NONCE + plain.len() + 16);
        out.push(self.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose),
                &mut body,
            )
            .expect("the plaintext is far below the AEAD limit");
        out.extend_from_slice(&body);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    }

    /// Opens a token sealed for `purpose`.
    pub fn open(&self, purpose: &[u8], token: &str) -> Result<Vec<u8>, SealError> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < 1 + NONCE + aead::MAX_TAG_LEN {
            return Err(SealError::Malformed);
        }
        if raw[0] != self.id {
            return Err(SealError::UnknownKey);
        }
        let nonce = Nonce::try_assume_unique_for_key(&raw[1..1 + NONCE])
            .map_err(|_| SealError::Malformed)?;
        let mut body = raw[1 + NONCE..].to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose), &mut body)
            .map_err(|_| SealError::Forged)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_only_unchanged_for_its_purpose_and_key() {
        let sealer = Sealer::random(1);
        let token = sealer.seal(b"state", b"hello");
        assert_eq!(sealer.open(b"state", &token).unwrap(), b"hello");
        // Two seals of the same text differ (fresh nonce).
        assert_ne!(token, sealer.seal(b"state", b"hello"));
        assert_eq!(sealer.open(b"session", &token), Err(SealError::Forged));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(sealer.open(b"state", &tampered), Err(SealError::Forged));
        assert_eq!(
            Sealer::random(1).open(b"state", &token),
            Err(SealError::Forged)
        );
        assert_eq!(
            Sealer::random(2).open(b"state", &token),
            Err(SealError::UnknownKey)
        );
        assert_eq!(sealer.open(b"state", "short"), Err(SealError::Malformed));
        assert_eq!(
            sealer.open(b"state", "not base64 !"),
            Err(SealError::Malformed)
        );
    }
}
