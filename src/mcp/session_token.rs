//! Portable sessions: with session keys configured, a 2025-11-25 session id is a sealed token
//! carrying what any replica needs to serve the session (its principal, revision and the
//! client's `initialize` params), and the ids of server requests are sealed tokens naming the
//! upstream session that asked, so that a client's answer is delivered from whichever replica
//! it lands on. Without keys, ids are random and a session lives on the replica that opened it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::mcp::seal::Sealer;

const SESSION: &[u8] = b"gatehouse/session/v1";
const SERVER_REQUEST: &[u8] = b"gatehouse/server-request/v1";
/// Longest portable session id issued (a header every request repeats); a session whose token
/// would be longer (huge client capabilities) gets a random id and lives on one replica.
pub const MAX_SESSION_ID: usize = 1024;

/// What a portable session id carries.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    /// The principal that opened it.
    pub p: Option<String>,
    /// The negotiated revision.
    pub v: String,
    /// The `initialize` params each upstream is sent (the client's capabilities and info).
    pub i: String,
    /// Whether upstream listen streams open at once (the client offers roots).
    pub l: bool,
    /// Issued at, Unix milliseconds.
    pub t: u64,
    /// The profile it was opened on (`/mcp/{profile}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<String>,
}

/// What a server request's id carries in a portable session.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRequestId {
    /// The session's principal.
    pub p: Option<String>,
    /// The session's id, digested ([`digest`]): an answer counts in this session only.
    pub g: String,
    /// Until when it may be answered, Unix milliseconds.
    pub e: u64,
    /// The upstream server that asked, by name.
    pub s: String,
    /// Its upstream session (`Mcp-Session-Id`), when it has one.
    pub u: Option<String>,
    /// The revision that upstream session speaks (its `MCP-Protocol-Version`).
    pub v: Option<String>,
    /// The server's own id for the request (raw JSON).
    pub o: String,
    /// The session's number for it.
    pub n: u64,
}

/// A short digest of a session id (SHA-256, first 16 bytes, hex).
pub fn digest(id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seals a session token; `None` if it would be longer than [`MAX_SESSION_ID`].
pub fn issue(sealer: &Sealer, token: &SessionToken) -> Option<String> {
    let plain = serde_json::to_vec(token).expect("the token encodes");
    let id = sealer.seal(SESSION, &plain);
    (id.len() <= MAX_SESSION_ID).then_some(id)
}

/// Opens a session id sealed by one of `sealer`'s keys.
pub fn open(sealer: &Sealer, id: &str) -> Option<SessionToken> {
    if id.len() > MAX_SESSION_ID {
        return None;
    }
    let plain = sealer.open(SESSION, id).ok()?;
    serde_json::from_slice(&plain).ok()
}

/// A server request's id (a JSON string) sealing where its answer goes.
pub fn seal_request_id(sealer: &Sealer, id: &ServerRequestId) -> String {
    let plain = serde_json::to_vec(id).expect("the id encodes");
    serde_json::to_string(&sealer.seal(SERVER_REQUEST, &plain)).expect("strings encode")
}

/// Opens a server request's id (raw JSON, a string) that `sealer` sealed.
pub fn open_request_id(sealer: &Sealer, raw: &[u8]) -> Option<ServerRequestId> {
    let token: String = serde_json::from_slice(raw).ok()?;
    let plain = sealer.open(SERVER_REQUEST, &token).ok()?;
    serde_json::from_slice(&plain).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SessionToken {
        SessionToken {
            p: Some("alice".into()),
            v: "2025-11-25".into(),
            i: r#"{"capabilities":{}}"#.into(),
            l: false,
            t: 1,
            f: None,
        }
    }

    #[test]
    fn a_session_id_opens_on_any_holder_of_the_key_and_nowhere_else() {
        let a = Sealer::from_key(1, &[7; 32]);
        let b = Sealer::from_key(1, &[7; 32]);
        let id = issue(&a, &token()).unwrap();
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(open(&b, &id), Some(token()));
        assert_eq!(open(&Sealer::from_key(1, &[8; 32]), &id), None);
        assert_eq!(open(&Sealer::from_key(2, &[7; 32]), &id), None);
        let mut tampered = id.clone().into_bytes();
        tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(open(&b, &String::from_utf8(tampered).unwrap()), None);
        // A server request id is not a session id, nor the other way round.
        let ask = ServerRequestId {
            p: None,
            g: digest("session"),
            e: 1,
            s: "x".into(),
            u: None,
            v: None,
            o: "1".into(),
            n: 1,
        };
        let raw = seal_request_id(&a, &ask);
        assert_eq!(open_request_id(&b, raw.as_bytes()), Some(ask));
        assert_eq!(open(&b, raw.trim_matches('"')), None);
        assert_eq!(open_request_id(&b, format!("{id:?}").as_bytes()), None);
    }

    #[test]
    fn an_oversized_session_token_is_not_issued() {
        let big = SessionToken {
            i: "x".repeat(MAX_SESSION_ID),
            ..token()
        };
        assert_eq!(issue(&Sealer::random(1), &big), None);
    }
}
