//! W3C Trace Context: the `traceparent` a span is known by across processes, and the
//! `tracestate` that travels with it (<https://www.w3.org/TR/trace-context/>).

use std::cell::Cell;

/// The longest `tracestate` passed on (the W3C limit is 32 members; 512 bytes holds them
/// comfortably and bounds what a client makes the gateway copy).
const MAX_TRACESTATE: usize = 512;

/// Who a span is, as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace's id (never all zeros).
    pub trace_id: [u8; 16],
    /// The span's id (never all zeros).
    pub span_id: [u8; 8],
    /// Whether the trace is recorded (the `sampled` flag).
    pub sampled: bool,
}

impl SpanContext {
    /// Parses a `traceparent` value. Version `00` must be exactly 55 characters; a later version
    /// may append fields after a `-` (read as `00`, as the specification asks). Ids in
    /// upper case, all-zero ids and version `ff` are refused.
    pub fn parse(value: &str) -> Option<SpanContext> {
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value naming this span (version `00`).
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }
}

/// A `tracestate` worth passing on: bounded, and only characters the header allows (printable
/// ASCII), so a value from a client's JSON cannot smuggle anything into a header.
pub fn tracestate(value: &str) -> Option<&str> {
    let value = value.trim();
    (!value.is_empty()
        && value.len() <= MAX_TRACESTATE
        && value.bytes().all(|c| (0x20..0x7f).contains(&c)))
    .then_some(value)
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

/// Appends lower-case hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // Without the OS's randomness ids are still unique per process, from the clock.
    if getrandom::fill(&mut b).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (now.as_nanos() as u64).to_le_bytes();
    }
    u64::from_le_bytes(b)
}

/// A random u64 (SplitMix64 per thread, seeded from the OS): for sampling decisions, which
/// need to be cheap and fair, not secret.
pub(crate) fn random_u64() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Fills `id` from the OS (an upstream that sees ids must not predict the next ones), or from
/// the per-thread generator if the OS fails; never all zeros.
fn fill_id(id: &mut [u8]) {
    while id.iter().all(|&b| b == 0) {
        if getrandom::fill(id).is_err() {
            for chunk in id.chunks_mut(8) {
                chunk.copy_from_slice(&random_u64().to_le_bytes()[..chunk.len()]);
            }
        }
    }
}

/// A new non-zero span id.
pub(crate) fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    fill_id(&mut id);
    id
}

/// A new non-zero trace id.
pub(crate) fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    fill_id(&mut id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let c = SpanContext::parse(GOOD).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), GOOD);
        let unsampled = SpanContext::parse(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled);
        // A later version with more fields is read as version 00.
        let future = SpanContext::parse(&format!("{}-whatever", GOOD.replacen("00", "cc", 1)));
        assert_eq!(future.map(|c| c.span_id), Some(c.span_id));
    }

    #[test]
    fn every_malformed_traceparent_is_refused() {
        for bad in [
            "",
            "garbage",
            &GOOD[..54],
            &format!("{GOOD}-"),
            &format!("{GOOD}0"),
            &GOOD.replacen("00", "ff", 1),
            &GOOD.to_uppercase(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            &"é".repeat(28),
            &format!("{}x{}", &GOOD[..55].replacen("00", "01", 1), "-a"),
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tracestate_is_bounded_and_plain() {
        assert_eq!(tracestate(" a=1,b=2 "), Some("a=1,b=2"));
        assert_eq!(tracestate(""), None);
        assert_eq!(tracestate("a=1\r\nx: y"), None);
        assert_eq!(tracestate(&"a".repeat(MAX_TRACESTATE + 1)), None);
    }

    #[test]
    fn ids_are_not_zero_and_differ() {
        let a = new_span_id();
        let b = new_span_id();
        assert_ne!(a, [0; 8]);
        assert_ne!(a, b);
        assert_ne!(new_trace_id(), [0; 16]);
    }
}
