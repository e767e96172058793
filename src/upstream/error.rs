//! Why an upstream call failed, and the JSON-RPC error code each reason becomes.

use std::sync::Arc;
use std::time::Duration;

use crate::mcp::jsonrpc::code;

/// Why an upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The server could not be reached, exited, or broke the protocol.
    #[error("upstream '{server}' is unavailable: {reason}")]
    Unavailable {
        /// Upstream name.
        server: Arc<str>,
        /// What happened, in the gateway's words: this reaches the client.
        reason: String,
        /// What the server said about it (an error body, a name it sent), capped: for the
        /// gateway's log only, since it has not been through the result plugins.
        said: Option<Box<str>>,
    },
    /// No answer within the deadline.
    #[error("upstream '{server}' did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// Upstream name.
        server: Arc<str>,
        /// The deadline.
        timeout: Duration,
    },
    /// The server no longer knows our session (HTTP 404, or 400 from servers that answer so);
    /// the request was not processed.
    #[error("upstream '{server}' refused the session: {detail}")]
    SessionExpired {
        /// Upstream name.
        server: Arc<str>,
        /// What the server said.
        detail: String,
    },
    /// The caller has no credentials for this upstream.
    #[error("upstream '{server}': {reason}")]
    NoCredentials {
        /// Upstream name.
        server: Arc<str>,
        /// Why.
        reason: String,
    },
    /// The server has no room for this caller now (its processes for single sessions are
    /// all taken, or the caller's share of them): nothing of the server's health.
    #[error("upstream '{server}' is busy: {reason}")]
    Busy {
        /// Upstream name.
        server: Arc<str>,
        /// Why, and which setting bounds it.
        reason: String,
    },
    /// The client cancelled the request.
    #[error("request cancelled")]
    Cancelled,
    /// The call was checked for one connection to the server (its tools against the pins),
    /// and the server is now reached anew (a new process, a new session): it was not sent.
    #[error("upstream '{server}' was reached anew since the call was checked; it was not sent")]
    Reconnected {
        /// Upstream name.
        server: Arc<str>,
    },
}

impl UpstreamError {
    /// What the server said about the failure, for the log (never sent to the client).
    pub fn said(&self) -> &str {
        match self {
            UpstreamError::Unavailable { said: Some(s), .. } => s,
            _ => "",
        }
    }

    /// The JSON-RPC error code sent to the client.
    pub fn code(&self) -> i64 {
        match self {
            UpstreamError::Timeout { .. } => code::UPSTREAM_TIMEOUT,
            UpstreamError::Cancelled => code::REQUEST_CANCELLED,
            UpstreamError::NoCredentials { .. } => code::NO_UPSTREAM_CREDENTIALS,
            UpstreamError::Busy { .. } => code::TOO_BUSY,
            _ => code::UPSTREAM_UNAVAILABLE,
        }
    }
}

/// Most bytes of a server's own words kept for the log.
const MAX_SAID: usize = 1024;

/// A server's own words, capped, for the log: its control characters escaped, so that what it
/// says cannot begin a log line of its own (a text log line ends at a line break).
pub fn server_text(bytes: &[u8]) -> Box<str> {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_SAID)]);
    one_line(text.trim()).into()
}

/// `text` with its control characters (a carriage return, an escape) and line separators
/// written as escapes: a server's words make one line of the log, which cannot pass for
/// another of the gateway's lines.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    let odd = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.contains(odd) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if odd(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_words_stay_on_one_log_line_and_are_capped() {
        let forged =
            b"bad gateway\r\n2026-12-06T00:00:00Z  INFO gatehouse: admin token accepted\x1b[2J";
        let text = server_text(forged);
        assert!(!text.contains(['\r', '\n', '\x1b']), "{text}");
        assert!(text.starts_with("bad gateway\\r\\n2026"), "{text}");
        assert_eq!(&*server_text(b" plain words \n"), "plain words");
        assert_eq!(server_text(&[b'a'; 5000]).len(), MAX_SAID);
        // A stderr line keeps its length; a line separator is escaped too.
        let line = format!("{}\u{2028}INFO forged\rx", "a".repeat(5000));
        let one = one_line(&line);
        assert!(!one.contains(['\r', '\u{2028}']), "{one}");
        assert!(one.ends_with("\\u{2028}INFO forged\\rx"), "{one}");
        assert!(matches!(
            one_line("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }
}
