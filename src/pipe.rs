//! A pipe to or from a server process that grows to fit the messages it carries.
//!
//! A pipe holds 64 KiB by default, so a larger message crosses it in pieces: the writer
//! blocks, the reader wakes, reads, and the writer is woken to go on, several times per
//! message. Measured with 64 KiB tool calls over stdio, 1 and 32 clients, that cost the gateway
//! about a fifth of its CPU per call. Pipes are grown when a message needs it, not all at
//! start: the kernel counts every pipe's room against its user's budget
//! (`/proc/sys/fs/pipe-user-pages-soft`), and a user over it gets small pipes everywhere, so
//! only the servers that exchange large messages spend more of it. The room is at most
//! [`MAX_ROOM`] (the default `pipe-max-size`); a pipe the kernel refuses to grow stays as it is.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most room a pipe is given.
pub const MAX_ROOM: usize = 1 << 20;

/// One end of a pipe to a server process, growing to fit what crosses it.
pub struct Pipe<T> {
    end: T,
    /// The pipe's room, or `None` once it may not (or need not) grow.
    room: Option<usize>,
}

impl<T: AsFd> Pipe<T> {
    /// Wraps one end of a pipe (any other file stays as it is).
    pub fn new(end: T) -> Self {
        let room = nix::fcntl::fcntl(end.as_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n < MAX_ROOM);
        Pipe { end, room }
    }

    /// The pipe's room, as the kernel reports it.
    pub fn room(&self) -> Option<usize> {
        nix::fcntl::fcntl(self.end.as_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
    }

    /// Grows the pipe to hold `need` bytes (as far as [`MAX_ROOM`]), if it holds less.
    fn fit(&mut self, need: usize) {
        let Some(room) = self.room.filter(|&room| room < need) else {
            return;
        };
        let want = need.next_power_of_two().max(room * 2).min(MAX_ROOM);
        let grown = i32::try_from(want)
            .ok()
            .and_then(|w| {
                nix::fcntl::fcntl(self.end.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(w)).ok()
            })
            .and_then(|n| usize::try_from(n).ok());
        self.room = match grown {
            Some(n) if n < MAX_ROOM => Some(n),
            Some(_) => None,
            None => {
                tracing::debug!(
                    room,
                    want,
                    "a pipe to a server could not grow (the user's pipe budget?)"
                );
                None
            }
        };
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
        let n = buf.filled().len() - before;
        // A read that emptied a full pipe: the writer most likely waits with more of a
        // message that does not fit.
        if let Some(room) = self.room
            && n >= room
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
    }

    #[tokio::test]
    async fn a_reader_that_finds_its_pipe_full_grows_it_for_the_writer() {
        let (tx, rx) = pipe::pipe().unwrap();
        let start = Pipe::new(&tx).room().unwrap();
        let writer = tokio::spawn(async move {
            // An unwrapped writer, as a server is: it fills the pipe and waits.
            let mut tx = tx;
            tx.write_all(&vec![b'a'; 3 * start]).await.unwrap();
        });
        let mut rx = Pipe::new(rx);
        let mut got = Vec::new();
        let mut buf = vec![0; 4 * start];
        while got.len() < 3 * start {
            let n = rx.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        assert!(rx.room().unwrap() > start, "grown from {start}");
        // Never past the most room.
        rx.fit(usize::MAX / 2);
        assert!(rx.room().unwrap() <= MAX_ROOM);
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
