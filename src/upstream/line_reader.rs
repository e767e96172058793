//! The read side of a newline-delimited message stream (a stdio server's stdout, the pipe an
//! HTTP+SSE upstream's messages are copied into, an attachment to a pod).
//!
//! Each message is read once from the stream into one buffer. A message that is at least half
//! of its buffer block is handed on as a slice of it, not copied again (a `BufReader` and
//! `read_until` copied each line twice more, into the line and into its `Bytes`: 130 k
//! instructions of a 64 KiB answer), so it keeps at most twice its size alive. Any other is
//! copied out, so that it does not keep a block alive for as long as it is kept (a cached list
//! page, say).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What one read asks of the stream at least (and a fresh buffer's room).
const READ_BLOCK: usize = 128 * 1024;

/// What the next read found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// One message, without its newline (a last one at the end may have none).
    Message(Bytes),
    /// A line longer than the limit began: the stream cannot be read on.
    TooLong,
    /// The stream ended.
    End,
}

/// Reads lines from `R` without copying large ones.
pub(crate) struct LineReader<R> {
    reader: R,
    buf: BytesMut,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
    /// Longest line accepted (its newline not counted).
    max: usize,
    /// Bytes of the block `buf` is in that lie before it (messages taken).
    front: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Reads from `reader` lines of at most `max` bytes.
    pub(crate) fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            buf: BytesMut::new(),
            scanned: 0,
            max,
            front: 0,
        }
    }

    /// The next line.
    pub(crate) async fn next(&mut self) -> std::io::Result<Line> {
        loop {
            if let Some(at) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
                let end = self.scanned + at;
                self.scanned = 0;
                if end > self.max {
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Message(self.take(end, 1)));
            }
            self.scanned = self.buf.len();
            if self.scanned > self.max {
                return Ok(Line::TooLong);
            }
            if self.buf.is_empty() {
                // A message begins with a block's room before it, so that one up to a block
                // long is read without moving: the block's front once every slice of it is
                // gone, else a new block (nothing to copy either way).
                let at = self.buf.as_ptr();
                self.buf.reserve(READ_BLOCK);
                if self.buf.as_ptr() != at {
                    self.front = 0;
                }
            } else if self.buf.capacity() - self.buf.len() < READ_BLOCK / 8 {
                // A longer message moves to a block twice its size as it grows, but never to
                // one much past the limit: a line over it needs only one byte more to be seen.
                let size = READ_BLOCK
                    .max(2 * self.buf.len())
                    .min(self.max.saturating_add(READ_BLOCK));
                let mut fresh = BytesMut::with_capacity(size);
                fresh.extend_from_slice(&self.buf);
                (self.buf, self.front) = (fresh, 0);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                // A last line without its newline is still a line.
                let rest = self.buf.len();
                self.scanned = 0;
                return Ok(if rest == 0 {
                    Line::End
                } else if rest > self.max {
                    Line::TooLong
                } else {
                    Line::Message(self.take(rest, 0))
                });
            }
        }
    }

    /// Takes the first `len` bytes of the buffer as a message, and `skip` more after them: a
    /// slice of the block when the message is at least half of it (so a kept message holds at
    /// most twice its size; blocks are at least [`READ_BLOCK`] long), else a copy.
    fn take(&mut self, len: usize, skip: usize) -> Bytes {
        let block = self.front + self.buf.capacity();
        self.front += len + skip;
        if 2 * len < block {
            let copy = Bytes::copy_from_slice(&self.buf[..len]);
            let _ = self.buf.split_to(len + skip);
            return copy;
        }
        let message = self.buf.split_to(len).freeze();
        let _ = self.buf.split_to(skip);
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that hands out its bytes in pieces of the given sizes.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(out.remaining());
                out.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn pieces(data: &[u8], size: usize) -> Pieces {
        Pieces(data.chunks(size).map(<[u8]>::to_vec).collect())
    }

    async fn all(mut r: LineReader<Pieces>) -> Vec<Line> {
        let mut out = Vec::new();
        loop {
            let line = r.next().await.unwrap();
            let done = matches!(line, Line::End | Line::TooLong);
            out.push(line);
            if done {
                return out;
            }
        }
    }

    fn message(s: &[u8]) -> Line {
        Line::Message(Bytes::copy_from_slice(s))
    }

    #[tokio::test]
    async fn lines_come_whole_whatever_the_pieces_they_arrive_in() {
        let long = vec![b'x'; 3 * READ_BLOCK + 17];
        let mut data = b"a\n\nbc\n".to_vec();
        data.extend_from_slice(&long);
        data.extend_from_slice(b"\nd\nlast");
        let want = vec![
            message(b"a"),
            message(b""),
            message(b"bc"),
            message(&long),
            message(b"d"),
            message(b"last"),
            Line::End,
        ];
        for size in [1, 2, 7, 4096, READ_BLOCK - 1, READ_BLOCK + 1, data.len()] {
            let got = all(LineReader::new(pieces(&data, size), 1 << 20)).await;
            assert_eq!(got, want, "pieces of {size} bytes");
        }
    }

    #[tokio::test]
    async fn a_line_over_the_limit_ends_the_stream_at_its_newline_or_before() {
        for data in [
            &b"ok\n12345678901\nnext\n"[..],
            b"ok\n12345678901",
            b"ok\n1234567890123456",
        ] {
            let got = all(LineReader::new(pieces(data, 3), 10)).await;
            assert_eq!(got, vec![message(b"ok"), Line::TooLong], "{data:?}");
        }
        // Exactly at the limit is a line, its newline in the same read or the next, or none.
        for (data, size) in [
            (&b"1234567890\n"[..], 4),
            (b"1234567890\n", 10),
            (b"1234567890", 10),
        ] {
            let got = all(LineReader::new(pieces(data, size), 10)).await;
            assert_eq!(
                got,
                vec![message(b"1234567890"), Line::End],
                "{data:?} by {size}"
            );
        }
    }

    #[tokio::test]
    async fn a_line_over_the_limit_grows_no_block_much_past_the_limit() {
        // Doubling alone would take a block from 1.7 read blocks to 3.4 just before the line
        // passes the limit.
        let max = READ_BLOCK * 7 / 4;
        let data = vec![b'z'; 4 * READ_BLOCK];
        let mut r = LineReader::new(pieces(&data, 4096), max);
        assert_eq!(r.next().await.unwrap(), Line::TooLong);
        assert!(
            r.buf.capacity() <= max + READ_BLOCK,
            "a block of {} for a limit of {max}",
            r.buf.capacity()
        );
    }

    #[tokio::test]
    async fn a_long_line_is_a_slice_of_its_block_and_a_short_one_a_copy() {
        let long = vec![b'y'; READ_BLOCK / 2 + 100];
        let mut data = long.clone();
        data.extend_from_slice(b"\nshort\n");
        let mut r = LineReader::new(pieces(&data, data.len()), 1 << 20);
        let mut lines = Vec::new();
        while let Line::Message(line) = r.next().await.unwrap() {
            lines.push(line);
        }
        assert_eq!(lines, [&long[..], b"short"]);
        // Both were read into one block at once: the long line is its first bytes, and the
        // short one is not a slice after it.
        let block = lines[0].as_ptr() as usize..lines[0].as_ptr() as usize + READ_BLOCK;
        assert!(!block.contains(&(lines[1].as_ptr() as usize)));
    }

    #[tokio::test]
    async fn a_long_line_in_the_tail_of_a_larger_block_is_copied_rather_than_hold_it() {
        // The first line grows its block past two read blocks and is handed on as a slice of
        // it; the second, read into what is left of that block, is less than half of it:
        // sharing it would keep the whole block for it.
        let first = vec![b'a'; READ_BLOCK + READ_BLOCK / 8];
        let second = vec![b'b'; READ_BLOCK / 2 + READ_BLOCK / 16];
        let mut data = first.clone();
        data.push(b'\n');
        data.extend_from_slice(&second);
        data.push(b'\n');
        let mut r = LineReader::new(pieces(&data, data.len()), 1 << 20);
        let mut lines = Vec::new();
        while let Line::Message(line) = r.next().await.unwrap() {
            lines.push(line);
        }
        assert_eq!(lines, [first, second]);
        let after_first = lines[0].as_ptr() as usize + lines[0].len() + 1;
        assert_ne!(
            lines[1].as_ptr() as usize,
            after_first,
            "a slice of the first's block"
        );
    }
}
