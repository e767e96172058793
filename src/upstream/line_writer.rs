//! The write side of a newline-delimited message stream (a stdio server's stdin, an HTTP+SSE
//! upstream's posts, an attachment to a pod).
//!
//! A message is written by the call that sends it, when the stream takes the whole line at
//! once: no task is woken and, with connections pinned to threads, no other thread either (a
//! writer task on the thread that started the server cost every call from another thread an
//! `eventfd` write to wake it). What the stream does not take at once waits, in order, for
//! the writer task, and so does every message after it until the task has written them all,
//! so lines never interleave. A line is queued whole or written whole before `send` returns,
//! so a caller that goes away never leaves half a line behind.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Most lines waiting for the writer task; a sender waits for room beyond them.
const MAX_QUEUED: usize = 256;

/// The stream was closed ([`LineWriter::close`]) or a write to it failed.
#[derive(Debug, thiserror::Error)]
#[error("the stream is closed")]
pub struct Closed;

/// Writes messages as lines to one stream, from any task.
pub struct LineWriter {
    state: Mutex<State>,
    /// Wakes the writer task: lines were queued, or the stream closed.
    work: Notify,
    /// Wakes senders waiting for room in the queue.
    room: Notify,
}

type Sink = Pin<Box<dyn AsyncWrite + Send>>;

struct State {
    /// The stream, unless the writer task holds it while it writes queued lines (then every
    /// sender queues, behind them).
    sink: Option<Sink>,
    /// Pieces of lines waiting for the writer task, in order.
    queue: VecDeque<Bytes>,
    /// Closed for sending: by [`LineWriter::close`], or after a failed write.
    closed: bool,
}

impl LineWriter {
    /// Writes to `sink`; its writer task is spawned on the current runtime, and shuts the
    /// stream down once closed and drained.
    pub fn start(sink: impl AsyncWrite + Send + 'static) -> Arc<LineWriter> {
        let writer = Arc::new(LineWriter {
            state: Mutex::new(State {
                sink: Some(Box::pin(sink)),
                queue: VecDeque::new(),
                closed: false,
            }),
            work: Notify::new(),
            room: Notify::new(),
        });
        tokio::spawn(drain(writer.clone()));
        writer
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `line` (which holds no line break) and a newline: written at once when the
    /// stream takes it, else queued for the writer task.
    pub async fn send(&self, line: Bytes) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.state();
                if state.closed {
                    return Err(Closed);
                }
                // Nothing queued: nothing goes before this line. (What a partial write left
                // queues behind it until the writer task has written it.)
                if state.queue.is_empty()
                    && let Some(sink) = state.sink.as_mut()
                {
                    match write_now(sink, &line) {
                        Ok(written) => {
                            if written < line.len() + 1 {
                                state.queue.extend(rest_of(&line, written));
                                self.work.notify_one();
                            }
                            return Ok(());
                        }
                        Err(_) => {
                            state.closed = true;
                            state.sink = None;
                            drop(state);
                            self.work.notify_one();
                            return Err(Closed);
                        }
                    }
                }
                if state.queue.len() < MAX_QUEUED {
                    state.queue.push_back(line);
                    state.queue.push_back(Bytes::from_static(b"\n"));
                    self.work.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Closes the stream for sending; lines already sent are still written, then the stream
    /// is shut down.
    pub fn close(&self) {
        self.state().closed = true;
        self.work.notify_one();
        self.room.notify_waiters();
    }
}

/// Writes as much of `line` and its newline as the stream takes without waiting: how many
/// bytes it took (0 when it would wait).
fn write_now(sink: &mut Sink, line: &[u8]) -> std::io::Result<usize> {
    // A waker that does nothing: a stream that is not ready is left to the writer task,
    // whose own poll registers the waker that counts.
    let mut cx = Context::from_waker(Waker::noop());
    let poll = if sink.is_write_vectored() {
        let parts = [IoSlice::new(line), IoSlice::new(b"\n")];
        sink.as_mut().poll_write_vectored(&mut cx, &parts)
    } else {
        sink.as_mut().poll_write(&mut cx, line)
    };
    match poll {
        Poll::Ready(Ok(0)) if !line.is_empty() => Err(std::io::ErrorKind::WriteZero.into()),
        Poll::Ready(result) => result,
        Poll::Pending => Ok(0),
    }
}

/// What is left of `line` and its newline after the first `written` bytes (fewer than all).
fn rest_of(line: &Bytes, written: usize) -> impl Iterator<Item = Bytes> {
    let body = (written < line.len()).then(|| line.slice(written..));
    body.into_iter().chain([Bytes::from_static(b"\n")])
}

/// What the writer task does next.
enum Next {
    /// Wait for lines.
    Wait,
    /// Write these, holding the stream meanwhile.
    Write(Sink, VecDeque<Bytes>),
    /// Shut the stream down (closed, nothing left), and end.
    End(Option<Sink>),
}

impl LineWriter {
    /// The writer task's next step: the stream and what is queued, if anything is.
    fn next(&self) -> Next {
        let mut state = self.state();
        if state.queue.is_empty() {
            return if state.closed {
                Next::End(state.sink.take())
            } else {
                Next::Wait
            };
        }
        match state.sink.take() {
            Some(sink) => Next::Write(sink, std::mem::take(&mut state.queue)),
            None => {
                // A failed write dropped the stream: nothing queued can be written.
                state.queue.clear();
                Next::End(None)
            }
        }
    }

    /// After a batch: more to write, or the stream handed back to the senders (`None`). A
    /// failed write closes the writer.
    fn written(&self, sink: Sink, ok: bool) -> Option<(Sink, VecDeque<Bytes>)> {
        let mut state = self.state();
        if !ok {
            state.closed = true;
            state.queue.clear();
            return None;
        }
        if state.queue.is_empty() {
            // Back to the senders, who write for themselves again.
            state.sink = Some(sink);
            return None;
        }
        Some((sink, std::mem::take(&mut state.queue)))
    }
}

/// The writer task: writes queued lines while any are queued, holding the stream meanwhile;
/// once closed and drained, shuts the stream down.
async fn drain(writer: Arc<LineWriter>) {
    loop {
        let work = writer.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let (mut sink, mut batch) = match writer.next() {
            Next::Wait => {
                work.await;
                continue;
            }
            Next::End(sink) => {
                if let Some(mut sink) = sink {
                    let _ = sink.shutdown().await;
                }
                return;
            }
            Next::Write(sink, batch) => (sink, batch),
        };
        loop {
            writer.room.notify_waiters();
            let mut ok = true;
            for piece in batch.drain(..) {
                if sink.write_all(&piece).await.is_err() {
                    ok = false;
                    break;
                }
            }
            ok = ok && sink.flush().await.is_ok();
            match writer.written(sink, ok) {
                Some(more) => (sink, batch) = more,
                None => break,
            }
        }
        writer.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Lines from many senders, through a pipe far smaller than they are, arrive whole and
    /// each sender's in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_never_interleave_whoever_writes_them() {
        let (sink, mut source) = tokio::io::duplex(64);
        let writer = LineWriter::start(sink);
        let mut senders = Vec::new();
        for s in 0..8 {
            let writer = writer.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..50 {
                    let line = format!("{s}:{i}:{}", "x".repeat((s * 37 + i * 11) % 300));
                    writer.send(Bytes::from(line)).await.unwrap();
                }
            }));
        }
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            source.read_to_end(&mut all).await.unwrap();
            all
        });
        for s in senders {
            s.await.unwrap();
        }
        writer.close();
        let all = reader.await.unwrap();
        let text = String::from_utf8(all).unwrap();
        let mut next = [0usize; 8];
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let s: usize = parts.next().unwrap().parse().unwrap();
            let i: usize = parts.next().unwrap().parse().unwrap();
            let x = parts.next().unwrap();
            assert_eq!(i, next[s], "sender {s}'s lines in order");
            assert_eq!(x, "x".repeat((s * 37 + i * 11) % 300), "line {s}:{i} whole");
            next[s] += 1;
        }
        assert_eq!(next, [50; 8], "every line arrived");
    }

    /// A stream that takes at most 5 bytes a write, and keeps them.
    struct Trickle(Arc<Mutex<Vec<u8>>>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(5);
            self.0.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What a partial write leaves goes first: a line sent after it waits behind it, even
    /// though the stream would take it at once.
    #[tokio::test]
    async fn a_line_waits_behind_the_rest_of_a_partial_one() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let writer = LineWriter::start(Trickle(written.clone()));
        writer
            .send(Bytes::from_static(b"aaaaaaaaaa"))
            .await
            .unwrap();
        writer.send(Bytes::from_static(b"bbb")).await.unwrap();
        writer.close();
        while Arc::strong_count(&writer) > 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(&*written.lock().unwrap(), b"aaaaaaaaaa\nbbb\n");
    }

    /// A stream that takes nothing holds at most the queue's bound; senders beyond it wait,
    /// and a closed writer refuses them.
    #[tokio::test]
    async fn a_stream_that_takes_nothing_holds_a_bounded_queue() {
        let (sink, source) = tokio::io::duplex(16);
        let writer = LineWriter::start(sink);
        // The first line fills the pipe; the rest queue, for the task or in its hands.
        let mut sent = 0;
        while tokio::time::timeout(
            std::time::Duration::from_millis(100),
            writer.send(Bytes::from_static(b"0123456789abcdef0123")),
        )
        .await
        .is_ok_and(|r| r.is_ok())
        {
            sent += 1;
            assert!(sent <= MAX_QUEUED + 1, "a sender is made to wait");
        }
        assert!(sent > 1, "lines queue while the stream is full");
        assert!(writer.state().queue.len() <= MAX_QUEUED);
        drop(source);
        writer.close();
        assert!(writer.send(Bytes::from_static(b"late")).await.is_err());
    }

    /// A stream that fails closes the writer: later sends say so.
    #[tokio::test]
    async fn a_failed_stream_refuses_later_lines() {
        let (sink, source) = tokio::io::duplex(8);
        drop(source);
        let writer = LineWriter::start(sink);
        let first = writer.send(Bytes::from_static(b"hello")).await;
        assert!(first.is_err(), "a write to a closed pipe fails");
        assert!(writer.send(Bytes::from_static(b"again")).await.is_err());
    }
}
