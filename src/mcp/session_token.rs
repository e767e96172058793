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
/// Longest server request id opened (raw JSON); an id is refused longer before it is decoded.
pub const MAX_REQUEST_ID: usize = 16 * 1024;
/// How far ahead of a replica's clock another replica's may run: a token issued later than
/// that is absurd, and honored nowhere.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

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

impl SessionToken {
    /// Whether a replica honors it at `now` (Unix ms) with tokens honored `max_age` ms: issued
    /// at most `max_age` ago, and not later than now (give or take [`MAX_CLOCK_SKEW_MS`]).
    pub fn honored_at(&self, now: u64, max_age: u64) -> bool {
        self.t <= now.saturating_add(MAX_CLOCK_SKEW_MS) && self.t.saturating_add(max_age) >= now
    }
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
    /// What the server asked (`sampling/createMessage`, ...): the policy judges the answer as
    /// that method's. Absent in an id sealed before it was carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<String>,
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

/// Opens a session id sealed by one of `sealer`'s keys (an id longer than any issued is not
/// decoded). Whether it is still honored is [`SessionToken::honored_at`].
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
    if raw.len() > MAX_REQUEST_ID {
        return None;
    }
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
            m: Some("sampling/createMessage".into()),
        };
        let raw = seal_request_id(&a, &ask);
        assert_eq!(open_request_id(&b, raw.as_bytes()), Some(ask));
        assert_eq!(open(&b, raw.trim_matches('"')), None);
        assert_eq!(open_request_id(&b, format!("{id:?}").as_bytes()), None);
    }

    /// Cut, lengthened, sealed with a key id the sealer lacks (or an old key under a known id),
    /// or too long to be one: nothing opens, and a too-long id is not even decoded (a valid
    /// token of that length would open, were it decoded).
    #[test]
    fn altered_foreign_and_enormous_ids_open_nothing() {
        let sealer = Sealer::from_keys(&[(2, [2; 32]), (1, [1; 32])]);
        let id = issue(&sealer, &token()).unwrap();
        assert_eq!(open(&sealer, &id), Some(token()));
        assert_eq!(open(&sealer, &id[..id.len() - 1]), None);
        assert_eq!(open(&sealer, &format!("{id}AA")), None);
        assert_eq!(open(&sealer, ""), None);
        let retired = issue(&Sealer::from_key(1, &[9; 32]), &token()).unwrap();
        assert_eq!(
            open(&sealer, &retired),
            None,
            "an old key under a reused id"
        );
        let unknown = issue(&Sealer::from_key(7, &[1; 32]), &token()).unwrap();
        assert_eq!(open(&sealer, &unknown), None, "a key id not configured");
        let long = SessionToken {
            i: "x".repeat(MAX_SESSION_ID),
            ..token()
        };
        let plain = serde_json::to_vec(&long).unwrap();
        let enormous = sealer.seal(SESSION, &plain);
        assert!(sealer.open(SESSION, &enormous).is_ok());
        assert_eq!(open(&sealer, &enormous), None);
        // A server request id likewise.
        let ask = ServerRequestId {
            p: None,
            g: digest("s"),
            e: 1,
            s: "x".into(),
            u: Some("u".repeat(MAX_REQUEST_ID)),
            v: None,
            o: "1".into(),
            n: 1,
            m: Some("sampling/createMessage".into()),
        };
        let raw = seal_request_id(&sealer, &ask);
        assert!(raw.len() > MAX_REQUEST_ID);
        assert_eq!(open_request_id(&sealer, raw.as_bytes()), None);
        let ask = ServerRequestId { u: None, ..ask };
        let raw = seal_request_id(&sealer, &ask);
        assert_eq!(open_request_id(&sealer, raw.as_bytes()), Some(ask));
    }

    #[test]
    fn a_token_is_honored_from_its_issue_for_max_age_and_never_before() {
        let t = SessionToken {
            t: 1_000_000,
            ..token()
        };
        assert!(t.honored_at(1_000_000, 10));
        assert!(t.honored_at(1_000_010, 10));
        assert!(!t.honored_at(1_000_011, 10), "expired");
        assert!(
            t.honored_at(1_000_000 - MAX_CLOCK_SKEW_MS, 10),
            "a clock a little behind"
        );
        assert!(
            !t.honored_at(1_000_000 - MAX_CLOCK_SKEW_MS - 1, 10),
            "issued in the future"
        );
        let absurd = SessionToken {
            t: u64::MAX,
            ..token()
        };
        assert!(!absurd.honored_at(now_ms(), u64::MAX));
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
