//! The gateway's mark on the requests it sends to remote servers: a remote whose URL leads
//! back to this gateway (or to another replica of it) is refused where the request comes in,
//! instead of each session opening another through itself until sessions run out.

use http::{HeaderMap, HeaderName, HeaderValue};
use ring::rand::SecureRandom;

/// The header the mark travels in (a remote's definition may not set it).
pub const HEADER: HeaderName = HeaderName::from_static("gatehouse-via");

/// This gateway's mark: the same for the replicas of one installation (`shared`: what they
/// have in common, their namespace on Kubernetes), else this process's own. Not a secret:
/// whoever sends it only gets refused.
pub fn mark(shared: Option<&str>) -> HeaderValue {
    let mut bytes = [0u8; 16];
    match shared {
        Some(s) => {
            let digest = ring::digest::digest(
                &ring::digest::SHA256,
                format!("gatehouse-via\n{s}").as_bytes(),
            );
            bytes.copy_from_slice(&digest.as_ref()[..16]);
        }
        None => {
            if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
                // No randomness: tell processes apart at least.
                bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
            }
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&hex).expect("hex digits are a header value")
}

/// Whether a request with `headers` came from this gateway (carries `mark`).
pub fn came_from(headers: &HeaderMap, mark: &HeaderValue) -> bool {
    headers.get_all(HEADER).iter().any(|v| v == mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_share_a_mark_and_processes_do_not() {
        assert_eq!(mark(Some("mcp")), mark(Some("mcp")));
        assert_ne!(mark(Some("mcp")), mark(Some("other")));
        assert_ne!(mark(None), mark(None));
        let mut h = HeaderMap::new();
        h.append(HEADER, HeaderValue::from_static("someone-else"));
        assert!(!came_from(&h, &mark(Some("mcp"))));
        h.append(HEADER, mark(Some("mcp")));
        assert!(came_from(&h, &mark(Some("mcp"))));
    }
}
