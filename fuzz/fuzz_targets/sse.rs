//! The SSE decoder: never panics, decodes the same events however the stream is chunked, and
//! decodes what the encoder wrote.
#![no_main]

use gatehouse::sse::{self, Decoder, Event};
use libfuzzer_sys::fuzz_target;

/// Feeds `stream` in chunks and drains events after each; stops at the first error.
fn decode(stream: &[u8], chunks: &[u8], max: usize) -> (Vec<Event>, bool) {
    let mut d = Decoder::new(max);
    let mut events = Vec::new();
    let mut rest = stream;
    let mut sizes = chunks.iter().map(|c| usize::from(*c) + 1).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        d.feed(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(_) => return (events, true),
            }
        }
    }
    (events, false)
}

fuzz_target!(|input: (u16, Vec<u8>, &[u8])| {
    let (max, chunks, stream) = input;
    let whole = decode(stream, &[], usize::MAX);
    let chunked = decode(stream, &chunks, usize::from(max).max(1));
    assert!(!whole.1, "an unlimited decoder refused input");
    if chunked.1 {
        // A size limit may stop a chunked decode early, never change what came before.
        assert!(whole.0.starts_with(&chunked.0));
    } else {
        assert_eq!(chunked.0, whole.0);
    }

    // The encoder's contract: a frame without carriage returns comes back as it was.
    if !stream.contains(&b'\r') {
        let mut d = Decoder::new(usize::MAX);
        d.feed(&sse::encode_message(stream));
        let e = d.next_event().expect("no limit").expect("one event");
        assert_eq!((e.event.as_str(), &e.data[..]), ("message", stream));
        assert_eq!(d.next_event().expect("no limit"), None);
    }
});
