//! A bounded ring buffer of output lines, for [`Runtime::logs`](super::Runtime::logs).
//!
//! Keeps at most `max_bytes` of the most recent lines; older lines are dropped
//! whole. An over-long line is cut to the budget. Partial lines (no newline yet)
//! are held until their newline arrives or the run ends.

use std::collections::VecDeque;

/// Bytes of a run's output a backend hands out at most: what the local backend keeps by
/// default, and what the kubernetes backend asks of the API server.
pub const LOG_BYTES: usize = 256 * 1024;

/// Recent output lines of one run, bounded in bytes.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    lines: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
    partial: Vec<u8>,
    dropped: u64,
}

impl LogBuffer {
    /// An empty buffer keeping at most `max_bytes` of text.
    pub fn new(max_bytes: usize) -> Self {
        LogBuffer {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes: max_bytes.max(1),
            partial: Vec::new(),
            dropped: 0,
        }
    }

    /// Appends raw output; complete lines are stored, a trailing partial line is held.
    pub fn push_bytes(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.push_line(&chunk[..nl]);
            } else {
                self.partial.extend_from_slice(&chunk[..nl]);
                let line = std::mem::take(&mut self.partial);
                self.push_line(&line);
            }
            chunk = &chunk[nl + 1..];
        }
        self.partial.extend_from_slice(chunk);
        if self.partial.len() > self.max_bytes {
            let line = std::mem::take(&mut self.partial);
            self.push_line(&line);
        }
    }

    /// Stores a held partial line (call when the stream ends).
    pub fn flush(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.push_line(&line);
        }
    }

    /// Appends one line (without its newline).
    pub fn push_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut text = String::from_utf8_lossy(line).into_owned();
        if text.len() > self.max_bytes {
            let mut cut = self.max_bytes;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        self.bytes += text.len() + 1;
        self.lines.push_back(text);
        while self.bytes > self.max_bytes {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len() + 1;
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// Lines dropped so far to stay within the bound.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Number of stored lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.partial.is_empty()
    }

    /// The stored text (each line ends with a newline), optionally only the last `tail` lines.
    pub fn text(&self, tail: Option<usize>) -> String {
        let skip = tail.map_or(0, |t| self.lines.len().saturating_sub(t));
        let mut out = String::with_capacity(self.bytes + self.partial.len());
        for line in self.lines.iter().skip(skip) {
            out.push_str(line);
            out.push('\n');
        }
        if !self.partial.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.partial));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_recent_lines_within_the_bound() {
        let mut b = LogBuffer::new(20);
        for i in 0..10 {
            b.push_bytes(format!("line {i}\n").as_bytes());
        }
        // "line N\n" is 7 bytes: two lines fit in 20.
        assert_eq!(b.text(None), "line 8\nline 9\n");
        assert_eq!(b.dropped(), 8);
    }

    #[test]
    fn joins_partial_lines_and_tails() {
        let mut b = LogBuffer::new(1000);
        b.push_bytes(b"hel");
        b.push_bytes(b"lo\r\nwor");
        b.push_bytes(b"ld\nlast");
        assert_eq!(b.text(None), "hello\nworld\nlast");
        assert_eq!(b.text(Some(1)), "world\nlast");
        b.flush();
        assert_eq!(b.text(Some(1)), "last\n");
    }

    #[test]
    fn cuts_overlong_lines_on_a_char_boundary() {
        let mut b = LogBuffer::new(5);
        b.push_bytes("ééééé\n".as_bytes());
        assert_eq!(b.text(None), "éé\n");
    }
}
