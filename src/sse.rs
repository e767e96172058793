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
}

/// An SSE stream that broke the format or a size limit.
#[derive(Debug, thiserror::Error)]
#[error("SSE event larger than {0} bytes")]
pub struct TooLarge(pub usize);

/// Incremental SSE decoder: feed chunks, take complete events.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_event: usize,
}

impl Decoder {
    /// A decoder that refuses events larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            max_event,
        }
    }

    /// Appends a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Returns the next complete event, `Ok(None)` when more input is needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, TooLarge> {
        loop {
            let Some((end, sep)) = find_blank_line(&self.buf) else {
                if self.buf.len() > self.max_event {
                    return Err(TooLarge(self.max_event));
                }
                return Ok(None);
            };
            let block = self.buf.split_to(end).freeze();
            self.buf.advance(sep);
            if let Some(ev) = parse_block(&block) {
                return Ok(Some(ev));
            }
        }
    }
}

/// Finds the end of the first event block and the length of its terminator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn parse_block(block: &Bytes) -> Option<Event> {
    let mut event = String::new();
    let mut id = None;
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
            b"id" => id = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    data.map(|d| Event {
        event,
        data: d.freeze(),
        id,
    })
}

/// Encodes a JSON-RPC frame as one `message` event. JSON frames from the gateway contain no raw newlines.
pub fn encode_message(frame: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(frame.len() + 24);
    b.put_slice(b"event: message\ndata: ");
    for (i, line) in frame.split(|c| *c == b'\n').enumerate() {
        if i > 0 {
            b.put_slice(b"\ndata: ");
        }
        b.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
    }
    b.put_slice(b"\n\n");
    b.freeze()
}

/// A comment line that keeps idle connections open.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn refuses_oversized_events() {
        let mut d = Decoder::new(8);
        d.feed(b"data: 0123456789");
        assert!(d.next_event().is_err());
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
