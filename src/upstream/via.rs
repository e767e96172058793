//! The gateway's mark on the requests it sends to remote servers: a remote whose URL leads
//! back to this gateway process is refused where the request comes in, instead of each
//! session opening another through itself until sessions run out. (A loop through several
//! gateways or replicas is not caught: each sees another's mark; `max_sessions` bounds it.)

use http::{HeaderMap, HeaderName, HeaderValue};
use ring::rand::SecureRandom;

/// The header the mark travels in (a remote's definition may not set it).
pub const HEADER: HeaderName = HeaderName::from_static("gatehouse-via");

/// This process's mark: random, so that it says nothing of the installation to the remotes
/// that see it and no other gateway shares it (one derived from, say, the namespace would
/// be the same for every default deployment, and refuse them to each other).
pub fn mark() -> HeaderValue {
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No randomness: tell processes apart at least.
        bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&hex).expect("hex digits are a header value")
}

/// Whether a request with `headers` came from this gateway (carries `mark`).
pub fn came_from(headers: &HeaderMap, mark: &HeaderValue) -> bool {
    // Read on every request, which seldom carries it: a pass over a request's few headers
    // costs less than hashing the name to find it missing.
    headers
        .iter()
        .any(|(name, value)| name == HEADER && value == mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_has_its_own_mark() {
        let mine = mark();
        assert_ne!(mine, mark());
        let mut h = HeaderMap::new();
        h.append(HEADER, HeaderValue::from_static("someone-else"));
        assert!(!came_from(&h, &mine));
        h.append(HEADER, mine.clone());
        assert!(came_from(&h, &mine));
    }
}
