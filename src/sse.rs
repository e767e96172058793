//! Server-Sent Events: an incremental decoder for upstream streams and the encoder for downstream ones.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `event:` field; empty means the default `message`.
    pub event: String,
    /// `data:` lines joined with `\n`.
    pub data: Bytes,
    /// `id:` field, if any.
    pub id: Option<String>,
    /// `retry:` field (milliseconds), if any.
    pub retry: Option<u64>,
}

/// An SSE stream that broke a size limit.
#[derive(Debug, thiserror::Error)]
pub enum TooLarge {
    /// One event exceeded the per-event limit.
    #[error("SSE event larger than {0} bytes")]
    Event(usize),
    /// The stream as a whole exceeded its limit.
    #[error("SSE stream longer than {0} bytes")]
    Stream(u64),
}

/// Room a decoder keeps between events; a larger buffer, left by a large event, is given back.
const SPARE_CAPACITY: usize = 1 << 20;

/// Incremental SSE decoder: feed chunks, take complete events.
///
/// Decoding is linear in the bytes received: each byte is scanned for an event boundary once,
/// however the stream is split into chunks (a rescan from the start of the buffer on every chunk
/// let an upstream burn a core with one large event).
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    /// Bytes of `buf` already searched for a blank line.
    scanned: usize,
    max_event: usize,
    max_stream: u64,
    received: u64,
}

impl Decoder {
    /// A decoder that refuses events larger than `max_event` bytes (streams are unlimited).
    pub fn new(max_event: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            scanned: 0,
            max_event,
            max_stream: u64::MAX,
            received: 0,
        }
    }

    /// Also refuses a stream once it has carried more than `max_stream` bytes in all.
    pub fn with_stream_limit(mut self, max_stream: u64) -> Self {
        self.max_stream = max_stream;
        self
    }

    /// Appends a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.received = self.received.saturating_add(chunk.len() as u64);
        self.buf.extend_from_slice(chunk);
    }

    /// Returns the next complete event, `Ok(None)` when more input is needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, TooLarge> {
        if self.received > self.max_stream {
            return Err(TooLarge::Stream(self.max_stream));
        }
        loop {
            let Some((end, sep)) = self.find_blank_line() else {
                if self.buf.len() > self.max_event {
                    return Err(TooLarge::Event(self.max_event));
                }
                return Ok(None);
            };
            if end > self.max_event {
                return Err(TooLarge::Event(self.max_event));
            }
            let block = self.buf.split_to(end).freeze();
            self.buf.advance(sep);
            self.scanned = 0;
            // A long-lived stream does not keep its largest event's room for good.
            if self.buf.is_empty() && self.buf.capacity() > SPARE_CAPACITY {
                self.buf = BytesMut::new();
            }
            if let Some(ev) = parse_block(&block) {
                return Ok(Some(ev));
            }
        }
    }

    /// Finds the end of the first event block and the length of its terminator, resuming where
    /// the last search stopped (two bytes back, so a terminator split across chunks is found).
    fn find_blank_line(&mut self) -> Option<(usize, usize)> {
        let buf = &self.buf[..];
        let mut i = self.scanned.saturating_sub(2);
        while let Some(off) = memchr::memchr(b'\n', &buf[i..]) {
            let at = i + off;
            match (buf.get(at + 1), buf.get(at + 2)) {
                (Some(b'\n'), _) => return Some((at, 2)),
                (Some(b'\r'), Some(b'\n')) => return Some((at, 3)),
                // Not decidable yet: look at this newline again when more bytes arrive.
                (None, _) | (Some(b'\r'), None) => {
                    self.scanned = at;
                    return None;
                }
                _ => i = at + 1,
            }
        }
        self.scanned = buf.len();
        None
    }
}

fn parse_block(block: &Bytes) -> Option<Event> {
    let mut event = String::new();
    let mut id = None;
    let mut retry = None;
    let mut data: Option<BytesMut> = None;
    for line in block.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            // Lines join with "\n" even when empty: "data:\ndata:" is "\n", not "".
            b"data" => match &mut data {
                Some(d) => {
                    d.put_u8(b'\n');
                    d.extend_from_slice(value);
                }
                None => data = Some(BytesMut::from(value)),
            },
            b"event" => event = String::from_utf8_lossy(value).into_owned(),
            // An id holding NUL is ignored (the HTML standard's event stream rules).
            b"id" if !value.contains(&0) => id = Some(String::from_utf8_lossy(value).into_owned()),
            b"id" => {}
            b"retry" => retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    data.map(|d| Event {
        event,
        data: d.freeze(),
        id,
        retry,
    })
}

/// Encodes a JSON-RPC frame as one `message` event.
///
/// A frame (an upstream's, as it sent it) may hold raw line breaks where JSON allows
/// whitespace; SSE ends a line at CR, LF or CRLF, so each of them starts a new `data:` line
/// (read back as LF, whitespace all the same), else a bare CR would cut the event short.
pub fn encode_message(frame: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(frame.len() + 24);
    b.put_slice(b"event: message\ndata: ");
    let mut start = 0;
    for at in memchr::memchr2_iter(b'\n', b'\r', frame) {
        b.put_slice(&frame[start..at]);
        b.put_slice(b"\ndata: ");
        start = at + 1;
    }
    b.put_slice(&frame[start..]);
    b.put_slice(b"\n\n");
    b.freeze()
}

/// A comment line that keeps idle connections open.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_events_room_is_given_back_once_it_is_read() {
        let mut d = Decoder::new(8 << 20);
        d.feed(format!("data: {}\n\n", "x".repeat(4 << 20)).as_bytes());
        assert_eq!(d.next_event().unwrap().unwrap().data.len(), 4 << 20);
        assert!(d.buf.capacity() <= SPARE_CAPACITY, "{}", d.buf.capacity());
        d.feed(b"data: small\n\n");
        assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"small");
    }

    #[test]
    fn decodes_events_split_across_chunks() {
        let mut d = Decoder::new(1024);
        d.feed(b"event: message\nid: 1\nda");
        assert_eq!(d.next_event().unwrap(), None);
        d.feed(b"ta: {\"a\":1}\n\n: comment\n\ndata: x\r\ndata: y\r\n\r\n");
        let e = d.next_event().unwrap().unwrap();
        assert_eq!(
            (e.event.as_str(), &e.data[..], e.id.as_deref()),
            ("message", &b"{\"a\":1}"[..], Some("1"))
        );
        let e = d.next_event().unwrap().unwrap();
        assert_eq!(&e.data[..], b"x\ny");
        assert_eq!(d.next_event().unwrap(), None);
        // An id with NUL in it is ignored, not kept.
        d.feed(b"id: 7\nid: a\0b\ndata: z\n\n");
        assert_eq!(d.next_event().unwrap().unwrap().id.as_deref(), Some("7"));
    }

    #[test]
    fn line_breaks_inside_a_frame_stay_inside_its_event() {
        let frame = b"{\"a\":1,\r\"b\":\r\n2,\n\"c\":3}";
        let mut d = Decoder::new(1024);
        d.feed(&encode_message(frame));
        d.feed(&encode_message(b"{}"));
        let e = d.next_event().unwrap().unwrap();
        assert_eq!(e.event, "message");
        let read: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(read, serde_json::json!({"a":1,"b":2,"c":3}));
        assert!(!e.data.contains(&b'\r'));
        assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"{}");
        assert_eq!(d.next_event().unwrap(), None);
    }

    #[test]
    fn refuses_oversized_events() {
        let mut d = Decoder::new(8);
        d.feed(b"data: 0123456789");
        assert!(matches!(d.next_event(), Err(TooLarge::Event(8))));
    }

    #[test]
    fn refuses_oversized_events_that_arrive_whole() {
        let mut d = Decoder::new(8);
        d.feed(b"data: 0123456789\n\n");
        assert!(matches!(d.next_event(), Err(TooLarge::Event(8))));
    }

    #[test]
    fn refuses_overlong_streams() {
        let mut d = Decoder::new(64).with_stream_limit(40);
        d.feed(b"data: 1\n\ndata: 2\n\n");
        assert!(d.next_event().unwrap().is_some());
        d.feed(b"data: 3\n\ndata: 4\n\ndata: 5\n\n");
        assert!(matches!(d.next_event(), Err(TooLarge::Stream(40))));
    }

    #[test]
    fn terminators_split_across_chunks_are_found() {
        for split in [b"data: a\n".as_slice(), b"data: a\n\r", b"data: a"] {
            let whole = b"data: a\n\r\n";
            let mut d = Decoder::new(64);
            d.feed(split);
            assert_eq!(d.next_event().unwrap(), None);
            d.feed(&whole[split.len()..]);
            assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"a");
        }
        // Byte by byte, with both terminators.
        let stream = b"data: x\r\n\r\nid: 2\ndata: y\n\n";
        let mut d = Decoder::new(64);
        let mut got = Vec::new();
        for b in stream {
            d.feed(&[*b]);
            while let Some(e) = d.next_event().unwrap() {
                got.push(e.data);
            }
        }
        assert_eq!(got, [&b"x"[..], &b"y"[..]]);
    }

    /// A large event fed in small chunks costs time linear in its size: the work per chunk does
    /// not grow with what is already buffered. Counted in bytes examined, not timed.
    #[test]
    fn decoding_a_large_event_is_linear() {
        let mut d = Decoder::new(64 * 1024 * 1024);
        d.feed(b"data: ");
        let chunk = vec![b'x'; 1024];
        for _ in 0..16 * 1024 {
            d.feed(&chunk);
            assert_eq!(d.next_event().unwrap(), None);
            // The search resumes at the end of what was already scanned.
            assert!(d.buf.len() - d.scanned <= 2);
        }
        d.feed(b"\n\n");
        assert_eq!(
            d.next_event().unwrap().unwrap().data.len(),
            16 * 1024 * 1024
        );
    }

    #[test]
    fn encoded_events_decode_back() {
        let mut d = Decoder::new(1024);
        d.feed(&encode_message(b"{\"x\":\"a\"}"));
        assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"{\"x\":\"a\"}");
    }

    // Found by fuzz/fuzz_targets/sse.rs: the separator was skipped while the data was still
    // empty, so a frame starting with a newline lost it.
    #[test]
    fn empty_data_lines_keep_their_newlines() {
        let mut d = Decoder::new(1024);
        d.feed(b"data:\ndata: \ndata: x\n\n");
        assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"\n\nx");
        d.feed(&encode_message(b"\n{}"));
        assert_eq!(&d.next_event().unwrap().unwrap().data[..], b"\n{}");
    }
}
