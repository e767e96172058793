//! Sealed tokens: state the gateway hands a client and must get back unchanged (ChaCha20-Poly1305).
//!
//! A token is `base64url(key id ‖ nonce ‖ ciphertext ‖ tag)`. The purpose is authenticated as
//! associated data, so a token made for one use does not open as another.

use base64::Engine;
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const NONCE: usize = 12;

/// The length of the token sealing `plain` bytes: callers bound what they open by it, before
/// any decoding.
pub const fn sealed_len(plain: usize) -> usize {
    (4 * (1 + NONCE + plain + aead::MAX_TAG_LEN)).div_ceil(3)
}

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

/// Keys that seal and open tokens: the first seals, every one opens what it sealed (so keys
/// rotate: a new key goes first, the old one stays until its tokens have lapsed).
pub struct Sealer {
    keys: Vec<(u8, LessSafeKey)>,
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
        Sealer::from_keys(&[(id, *key)])
    }

    /// A sealer with several keys, by id; the first seals. At least one key is needed.
    pub fn from_keys(keys: &[(u8, [u8; 32])]) -> Sealer {
        assert!(!keys.is_empty(), "a sealer needs a key");
        Sealer {
            keys: keys
                .iter()
                .map(|(id, key)| {
                    let key = UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key fits");
                    (*id, LessSafeKey::new(key))
                })
                .collect(),
        }
    }

    /// Seals `plain` for `purpose`.
    pub fn seal(&self, purpose: &[u8], plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let (id, key) = &self.keys[0];
        let mut out = Vec::with_capacity(1 + NONCE + plain.len() + 16);
        out.push(*id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
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
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == raw[0]) else {
            return Err(SealError::UnknownKey);
        };
        let nonce = Nonce::try_assume_unique_for_key(&raw[1..1 + NONCE])
            .map_err(|_| SealError::Malformed)?;
        let mut body = raw[1 + NONCE..].to_vec();
        let plain = key
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
        // Rotation: a keyring opens what its older key sealed, and seals with its first.
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let before = Sealer::from_key(1, &old).seal(b"s", b"x");
        let ring = Sealer::from_keys(&[(2, new), (1, old)]);
        assert_eq!(ring.open(b"s", &before).unwrap(), b"x");
        let after = ring.seal(b"s", b"y");
        assert_eq!(Sealer::from_key(2, &new).open(b"s", &after).unwrap(), b"y");
        assert_eq!(
            Sealer::from_key(1, &old).open(b"s", &after),
            Err(SealError::UnknownKey)
        );
        assert_eq!(
            sealer.open(b"state", "not base64 !"),
            Err(SealError::Malformed)
        );
    }

    /// A token has one spelling: what keeps a record of tokens by their text (deleted session
    /// ids) cannot be walked around with another spelling of the same bytes. Cut, lengthened,
    /// padded or with any character changed, it opens nothing.
    #[test]
    fn a_token_opens_only_as_it_was_spelled() {
        let sealer = Sealer::random(1);
        for len in 0..4 {
            // Each length modulo 3, so the last character carries unused bits or none.
            let token = sealer.seal(b"s", &vec![7u8; 40 + len]);
            assert_eq!(token.len(), sealed_len(40 + len));
            assert!(sealer.open(b"s", &token).is_ok());
            let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            for at in [0, 1, token.len() / 2, token.len() - 1] {
                for c in alphabet.chars() {
                    let mut other: Vec<char> = token.chars().collect();
                    if other[at] == c {
                        continue;
                    }
                    other[at] = c;
                    let other: String = other.into_iter().collect();
                    assert!(
                        sealer.open(b"s", &other).is_err(),
                        "{other} opens as {token}"
                    );
                }
            }
            for other in [
                &token[..token.len() - 1],
                &format!("{token}A"),
                &format!("{token}AA"),
                &format!("{token}="),
                &format!("{token}=="),
                &format!(" {token}"),
                &token.replace('-', "+").replace('_', "/"),
            ] {
                if *other != token {
                    assert!(
                        sealer.open(b"s", other).is_err(),
                        "{other} opens as {token}"
                    );
                }
            }
        }
    }
}
