//! JSON string literals written straight into a buffer, for the frames and records the
//! gateway writes by hand on the request path.

use bytes::BufMut;

/// Writes `s` as a JSON string, byte for byte what `serde_json` writes.
pub fn put<B: BufMut>(out: &mut B, s: &str) {
    // Most text (method names, principals, outcomes) needs no escape: copied as it is.
    if crate::json_scan::is_plain(s.as_bytes()) {
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
        return;
    }
    serde_json::to_writer(out.writer(), s).expect("a string serializes into memory");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_serde_writes() {
        for s in [
            "",
            "tools/call",
            "quote \" and backslash \\",
            "tab\tnewline\ncontrol\u{1}del\u{7f}",
            "non-ASCII: é ✓ 𝄞 \u{2028}",
        ] {
            let mut vec = Vec::new();
            put(&mut vec, s);
            let mut bytes = bytes::BytesMut::new();
            put(&mut bytes, s);
            let serde = serde_json::to_vec(s).unwrap();
            assert_eq!(vec, serde, "{s:?} into a Vec");
            assert_eq!(&bytes[..], &serde[..], "{s:?} into a BytesMut");
        }
    }
}
