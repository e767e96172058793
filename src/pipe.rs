//! A pipe to or from a server process that grows to fit the messages it carries.
//!
//! A pipe holds 64 KiB by default, so a larger message crosses it in pieces: the writer
//! blocks, the reader wakes, reads, and the writer is woken to go on, several times per
//! message. Measured with 64 KiB tool calls over stdio, 1 and 32 clients, that cost the gateway
//! about a fifth of its CPU per call. Pipes are grown when a message needs it, not all at
//! start: the kernel counts every pipe's room against its user's budget
//! (`/proc/sys/fs/pipe-user-pages-soft`), and a user over it gets small pipes everywhere. So
//! a pipe grows only for a message larger than it (written by the gateway, or read as a full
//! pipe holding no line's end), never past [`MAX_ROOM`] (the default `pipe-max-size`), and all
//! pipes together grow by at most a quarter of the user's budget ([`Budget`]); a pipe the
//! kernel refuses to grow stays as it is.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most room a pipe is given.
pub const MAX_ROOM: usize = 1 << 20;

/// Room granted to pipes beyond their first size, against a limit.
struct Budget {
    granted: AtomicUsize,
    limit: OnceLock<usize>,
}

impl Budget {
    /// An empty budget, whose limit is read from the kernel when first needed.
    const fn new() -> Budget {
        Budget {
            granted: AtomicUsize::new(0),
            limit: OnceLock::new(),
        }
    }

    /// The limit: a quarter of the user's pipe budget (of 64 MiB when the kernel sets
    /// none), so that growing never takes the user over it.
    fn limit(&self) -> usize {
        *self.limit.get_or_init(|| {
            let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&p| p > 0)
                .unwrap_or(16384);
            pages.saturating_mul(4096) / 4
        })
    }

    /// Takes `n` bytes, if the limit allows.
    fn take(&self, n: usize) -> bool {
        let limit = self.limit();
        self.granted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g + n <= limit).then_some(g + n)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken.
    fn give(&self, n: usize) {
        self.granted.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What every pipe to a server grows within.
static BUDGET: Budget = Budget::new();

/// One end of a pipe to a server process, growing to fit what crosses it.
pub struct Pipe<T> {
    end: T,
    /// The pipe's room, or `None` once it may not (or need not) grow.
    room: Option<usize>,
    /// What it grows within.
    budget: &'static Budget,
    /// What this pipe was granted of the budget.
    granted: usize,
}

impl<T: AsFd> Pipe<T> {
    /// Wraps one end of a pipe (any other file stays as it is).
    pub fn new(end: T) -> Self {
        Self::within(end, &BUDGET)
    }

    /// Wraps one end of a pipe that grows within `budget`.
    fn within(end: T, budget: &'static Budget) -> Self {
        let mut pipe = Pipe {
            end,
            room: None,
            budget,
            granted: 0,
        };
        pipe.room = pipe.room().filter(|&n| n < MAX_ROOM);
        pipe
    }

    /// The pipe's room, as the kernel reports it.
    pub fn room(&self) -> Option<usize> {
        nix::fcntl::fcntl(self.end.as_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
    }

    /// Grows the pipe to hold `need` bytes (as far as [`MAX_ROOM`] and the budget allow),
    /// if it holds less.
    fn fit(&mut self, need: usize) {
        if self.room.is_none_or(|room| room >= need) {
            return;
        }
        // Read again: the server may have grown the pipe itself, and is not to see it shrink.
        let Some(room) = self.room().filter(|&room| room < need && room < MAX_ROOM) else {
            self.room = self.room().filter(|&n| n < MAX_ROOM);
            return;
        };
        let want = need.next_power_of_two().max(room * 2).min(MAX_ROOM);
        let extra = want - room;
        let taken = self.budget.take(extra);
        let grown = taken
            .then(|| i32::try_from(want).ok())
            .flatten()
            .and_then(|w| {
                nix::fcntl::fcntl(self.end.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(w)).ok()
            })
            .and_then(|n| usize::try_from(n).ok());
        match grown {
            Some(n) => {
                self.granted += extra;
                self.room = (n < MAX_ROOM).then_some(n);
            }
            None => {
                if taken {
                    self.budget.give(extra);
                }
                tracing::debug!(
                    room,
                    want,
                    "a pipe to a server could not grow (the gateway's share of the user's pipe budget, or the kernel's)"
                );
                self.room = None;
            }
        }
    }
}

impl<T> Drop for Pipe<T> {
    fn drop(&mut self) {
        self.budget.give(self.granted);
    }
}

impl<T: AsFd + AsyncRead + Unpin> AsyncRead for Pipe<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.end).poll_read(cx, buf);
        let got = &buf.filled()[before..];
        // A full pipe holding no line's end: the writer waits with more of one message that
        // does not fit (a burst of short messages leaves the pipe as it is).
        if let Some(room) = self.room
            && got.len() >= room
            && memchr::memchr(b'\n', got).is_none()
        {
            self.fit(room + 1);
        }
        read
    }
}

impl<T: AsFd + AsyncWrite + Unpin> AsyncWrite for Pipe<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.fit(buf.len());
        Pin::new(&mut self.end).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.fit(bufs.iter().map(|b| b.len()).sum());
        Pin::new(&mut self.end).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.end.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.end).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.end).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::unix::pipe;

    #[tokio::test]
    async fn a_message_larger_than_the_pipe_grows_it_once_and_crosses_whole() {
        let (tx, rx) = pipe::pipe().unwrap();
        let mut tx = Pipe::new(tx);
        let start = tx.room().unwrap();
        assert!(start < 200_000, "a fresh pipe is small: {start}");
        let message = vec![b'm'; 200_000];
        // The pipe takes the whole message in one write: it grew to fit it first.
        let n = tx.write(&message).await.unwrap();
        assert_eq!(n, message.len());
        assert_eq!(tx.room(), Some(256 * 1024));
        // A small message leaves it as it is.
        tx.write_all(b"x").await.unwrap();
        assert_eq!(tx.room(), Some(256 * 1024));
        let mut rx = Pipe::new(rx);
        let mut got = vec![0; message.len() + 1];
        rx.read_exact(&mut got).await.unwrap();
        assert!(got[..message.len()] == message[..] && got[message.len()] == b'x');
        // Never past the most room.
        tx.fit(3 * MAX_ROOM);
        assert_eq!(tx.room(), Some(MAX_ROOM));
    }

    /// Reads `total` bytes that `writer` (an unwrapped end, as a server's is) writes at once.
    async fn read_while_writing(data: Vec<u8>) -> (usize, usize) {
        let (tx, rx) = pipe::pipe().unwrap();
        let start = Pipe::new(&tx).room().unwrap();
        let total = data.len();
        let writer = tokio::spawn(async move {
            let mut tx = tx;
            tx.write_all(&data).await.unwrap();
        });
        let mut rx = Pipe::new(rx);
        let mut got = 0;
        let mut buf = vec![0; 4 * start];
        while got < total {
            got += rx.read(&mut buf).await.unwrap();
        }
        writer.await.unwrap();
        (start, rx.room().unwrap())
    }

    #[tokio::test]
    async fn a_reader_finding_one_message_fill_its_pipe_grows_it_and_a_burst_does_not() {
        let (start, after) = read_while_writing(vec![b'a'; 3 * 65536]).await;
        assert!(after > start, "grown from {start}");
        let burst = b"{\"short\":1}\n".repeat(3 * 65536 / 12);
        let (start, after) = read_while_writing(burst).await;
        assert_eq!(after, start, "short lines leave the pipe as it is");
    }

    #[tokio::test]
    async fn pipes_grow_within_their_budget_and_give_it_back_when_dropped() {
        static SMALL: Budget = Budget::new();
        SMALL.limit.set(200 * 1024).unwrap();
        let (tx, _rx) = pipe::pipe().unwrap();
        let mut first = Pipe::within(tx, &SMALL);
        let start = first.room().unwrap();
        first.fit(start + 1);
        assert_eq!(first.room(), Some(2 * start));
        // What is left of the budget is less than a second pipe's growth: it stays as it is,
        // and tries no more.
        let (tx, _rx2) = pipe::pipe().unwrap();
        let mut second = Pipe::within(tx, &SMALL);
        second.fit(4 * start);
        assert_eq!((second.room(), second.room), (Some(start), None));
        drop(first);
        let (tx, _rx3) = pipe::pipe().unwrap();
        let mut third = Pipe::within(tx, &SMALL);
        third.fit(3 * start);
        assert_eq!(
            third.room(),
            Some(4 * start),
            "the first pipe's share came back"
        );
        assert_eq!(SMALL.granted.load(Ordering::Acquire), 3 * start);
    }

    #[tokio::test]
    async fn a_pipe_the_server_grew_itself_is_not_shrunk() {
        let (tx, rx) = pipe::pipe().unwrap();
        let mut rx = Pipe::new(rx);
        let start = rx.room().unwrap();
        // The server's end grows the pipe behind the gateway's back.
        nix::fcntl::fcntl(tx.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(512 * 1024)).unwrap();
        rx.fit(start + 1);
        assert_eq!(rx.room(), Some(512 * 1024));
    }

    #[test]
    fn a_file_is_not_a_pipe_and_is_left_alone() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut p = Pipe::new(file);
        assert_eq!(p.room, None);
        p.fit(1 << 20);
        assert_eq!(p.room(), None);
    }
}
