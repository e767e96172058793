//! stdio upstream: newline-delimited JSON-RPC over a child process's stdin/stdout, or over an
//! attachment to a server the orchestrator runs (a local process or a pod).
//!
//! A child's stderr goes to the gateway's log. The child gets only the environment its definition
//! names and runs in its own process group (see [`crate::process`]); shutdown closes stdin, then
//! sends SIGTERM, then SIGKILL, to the whole group. An attachment is only closed (the
//! orchestrator owns the process).

use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::oneshot;

use super::line_reader::{Line, LineReader};
use super::line_writer::LineWriter;
use super::{CallRoute, Inbox, Pending, Server, UpstreamError};
use crate::config::Transport;
use crate::mcp::jsonrpc::{self, Kind, Outcome};
use crate::pipe::Pipe;
use crate::process::{self, ServerProcess, Stopped};

/// Largest line accepted from a server's stdout.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Longest stderr line logged; the rest of a longer line is skipped, not buffered.
const MAX_STDERR_LINE: usize = 8 * 1024;
/// Most stderr lines of one server process logged a second.
const STDERR_LINES_PER_SECOND: u32 = 100;
/// Grace periods between shutdown steps.
const GRACE: Duration = Duration::from_secs(2);

/// A running stdio server.
pub struct Connection {
    pub(crate) server: Arc<Server>,
    pub(crate) next_id: AtomicU64,
    writer: Arc<LineWriter>,
    pending: Arc<Pending>,
    /// Why the message stream ended, once it has (what a call that is left unanswered hears).
    ended: Arc<OnceLock<&'static str>>,
    child: tokio::sync::Mutex<Option<ServerProcess>>,
    /// What carries the messages, as errors name it ("process", "SSE stream").
    peer: &'static str,
}

impl Connection {
    /// Starts the process and its reader, writer and stderr tasks.
    pub fn spawn(server: Arc<Server>, inbox: Inbox) -> Result<Self, UpstreamError> {
        let Transport::Stdio {
            command,
            args,
            env,
            cwd,
        } = &server.config.transport
        else {
            return Err(server.unavailable("not a stdio upstream"));
        };
        // Only what the definition names reaches the server (see crate::process).
        let mut cmd = process::command(&server.name, command, env);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut proc = ServerProcess::spawn(&mut cmd)
            .map_err(|e| server.unavailable(format!("cannot start {command:?}: {e}")))?;
        let child = &mut proc.child;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(server.unavailable("child process has no stdio pipes"));
        };
        let pid = child.id();
        tracing::debug!(server = %server.name, ?pid, "started stdio upstream");
        let name = server.name.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            // A chatty (or hostile) process cannot flood the gateway's log: past a number of
            // lines a second, lines are counted, and the count is logged when the second ends.
            let mut second = std::time::Instant::now();
            let (mut logged, mut unlogged) = (0u32, 0u64);
            let untold = |name: &str, n: u64| {
                tracing::warn!(server = %name, "{n} more stderr lines not logged (over {STDERR_LINES_PER_SECOND} a second)");
            };
            loop {
                let got = {
                    let read = bounded_line(&mut reader, &mut line, MAX_STDERR_LINE);
                    tokio::pin!(read);
                    loop {
                        let ends = tokio::time::Instant::from_std(second + Duration::from_secs(1));
                        tokio::select! {
                            got = &mut read => break got,
                            () = tokio::time::sleep_until(ends), if unlogged > 0 => {
                                untold(&name, unlogged);
                                (second, logged, unlogged) = (std::time::Instant::now(), 0, 0);
                            }
                        }
                    }
                };
                let Ok(Some(cut)) = got else {
                    break;
                };
                if second.elapsed() >= Duration::from_secs(1) {
                    if unlogged > 0 {
                        untold(&name, unlogged);
                    }
                    (second, logged, unlogged) = (std::time::Instant::now(), 0, 0);
                }
                if logged >= STDERR_LINES_PER_SECOND {
                    unlogged += 1;
                    continue;
                }
                logged += 1;
                let text = String::from_utf8_lossy(line.trim_ascii_end());
                let text = super::error::one_line(&text);
                let more = if cut { " [line cut]" } else { "" };
                tracing::info!(server = %name, "stderr: {text}{more}");
            }
            if unlogged > 0 {
                untold(&name, unlogged);
            }
        });
        Ok(Connection::over(
            server,
            Pipe::new(stdout),
            Pipe::new(stdin),
            inbox,
            Some(proc),
        ))
    }

    /// Speaks JSON-RPC over an existing byte stream (`child` is shut down with the connection).
    pub fn over(
        server: Arc<Server>,
        reader: impl AsyncRead + Send + Unpin + 'static,
        writer: impl AsyncWrite + Send + Unpin + 'static,
        inbox: Inbox,
        child: Option<ServerProcess>,
    ) -> Self {
        let pending = Arc::new(Pending::default());
        let ended = Arc::new(OnceLock::new());
        let writer = LineWriter::start(writer);
        tokio::spawn(read_loop(
            reader,
            server.clone(),
            pending.clone(),
            ended.clone(),
            inbox,
        ));
        Connection {
            server,
            next_id: AtomicU64::new(1),
            writer,
            pending,
            ended,
            child: tokio::sync::Mutex::new(child),
            peer: "process",
        }
    }

    /// Names what carries the messages in errors (a process unless said otherwise).
    pub(crate) fn carried_by(mut self, peer: &'static str) -> Self {
        self.peer = peer;
        self
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.ended.get().is_none()
    }

    pub(crate) async fn send(&self, frame: Bytes) -> Result<(), UpstreamError> {
        if !self.is_alive() {
            return Err(self
                .server
                .unavailable(format!("the {} has ended", self.peer)));
        }
        self.writer.send(one_line(frame)).await.map_err(|_| {
            self.server
                .unavailable(format!("cannot write to the {}", self.peer))
        })
    }

    pub(crate) async fn exchange(
        &self,
        id: u64,
        frame: Bytes,
        route: CallRoute,
    ) -> Result<Outcome, UpstreamError> {
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx, route);
        let remove = RemoveOnDrop(&self.pending, id);
        self.send(frame).await?;
        let out = rx.await.map_err(|_| {
            let why = self.ended.get().copied().unwrap_or(ENDED);
            self.server.unavailable(format!("the {} {why}", self.peer))
        });
        drop(remove);
        out
    }

    pub(crate) async fn shutdown(&self) {
        // The writer task writes what was sent, then closes the child's stdin.
        self.writer.close();
        let Some(mut proc) = self.child.lock().await.take() else {
            return;
        };
        if proc.stop(GRACE).await == Stopped::Killed {
            tracing::warn!(server = %self.server.name, "stdio upstream ignored SIGTERM; killed it");
        }
    }
}

struct RemoveOnDrop<'a>(&'a Pending, u64);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// Reads one line into `line` (cleared first), keeping at most `max` bytes of it and skipping
/// the rest: `Some(true)` when the line was cut, `None` at the end of the stream.
async fn bounded_line(
    reader: &mut (impl AsyncBufReadExt + Unpin),
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let n = (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') || n < max {
        return Ok(Some(false));
    }
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Some(true));
        }
        match memchr::memchr(b'\n', buf) {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(Some(true));
            }
            None => {
                let all = buf.len();
                reader.consume(all);
            }
        }
    }
}

/// One message, one line: the wire is newline-delimited, so a raw CR or LF inside a frame would
/// end it early and let the rest be read as a second message that the gateway never checked
/// (smuggled past policy, or answering another caller's request id). In valid JSON a raw CR or
/// LF can only be whitespace between tokens (inside strings they must be escaped), so turning
/// them into spaces keeps the message's meaning; in anything else, it still keeps it one line.
pub(crate) fn one_line(frame: Bytes) -> Bytes {
    if memchr::memchr2(b'\n', b'\r', &frame).is_none() {
        return frame;
    }
    let mut line = frame.to_vec();
    for b in &mut line {
        if matches!(*b, b'\n' | b'\r') {
            *b = b' ';
        }
    }
    Bytes::from(line)
}

/// Why a stream ended, unless something more precise is known.
const ENDED: &str = "ended before answering";

async fn read_loop(
    stdout: impl AsyncRead + Unpin,
    server: Arc<Server>,
    pending: Arc<Pending>,
    ended: Arc<OnceLock<&'static str>>,
    inbox: Inbox,
) {
    let mut reader = LineReader::new(stdout, MAX_LINE);
    loop {
        let line = match reader.next().await {
            Ok(Line::Message(line)) => line,
            Ok(Line::End) => break,
            Ok(Line::TooLong) => {
                tracing::error!(server = %server.name, "stdout line exceeds {MAX_LINE} bytes; dropping the connection");
                let _ = ended.set("sent a line over 64 MiB, so the gateway dropped the connection");
                break;
            }
            Err(e) => {
                tracing::warn!(server = %server.name, "reading stdout failed: {e}");
                break;
            }
        };
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        let frame = line.slice_ref(trimmed);
        let msg = match jsonrpc::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                if let Some(n) = server.unreadable.admit() {
                    let more = crate::log_rate::held_back(n);
                    tracing::warn!(server = %server.name, "ignoring non-JSON-RPC output on stdout: {e}{more}");
                }
                continue;
            }
        };
        match &msg.kind {
            Kind::Response { id, outcome } => {
                let known =
                    jsonrpc::id_as_u64(id).is_some_and(|id| pending.complete(id, outcome.clone()));
                if !known {
                    tracing::debug!(server = %server.name, "response to an unknown or abandoned request");
                }
            }
            _ => pending.dispatch(msg, &inbox),
        }
    }
    // The buffer goes before the calls hear: an over-long line's room is given back by the
    // time anyone can ask again.
    drop(reader);
    let untold = server.unreadable.take_held_back();
    if untold > 0 {
        tracing::warn!(server = %server.name, "{untold} more lines of non-JSON-RPC output on stdout not logged (over the rate)");
    }
    let _ = ended.set(ENDED);
    pending.fail_all();
    tracing::info!(server = %server.name, "upstream message stream ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stderr_lines_are_bounded() {
        let huge = vec![b'x'; 1 << 20];
        let mut input = b"short\n".to_vec();
        input.extend_from_slice(&huge);
        input.extend_from_slice(b"\nafter\nlast");
        let mut reader = BufReader::with_capacity(4096, &input[..]);
        let mut line = Vec::new();
        let mut got = Vec::new();
        while let Some(cut) = bounded_line(&mut reader, &mut line, 100).await.unwrap() {
            assert!(line.len() <= 100);
            got.push((
                String::from_utf8_lossy(line.trim_ascii_end()).into_owned(),
                cut,
            ));
        }
        assert_eq!(
            got,
            [
                ("short".to_owned(), false),
                ("x".repeat(100), true),
                ("after".to_owned(), false),
                ("last".to_owned(), false),
            ]
        );
    }

    #[test]
    fn every_frame_becomes_exactly_one_line() {
        let smuggling = Bytes::from_static(
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\r\n\"arguments\":{\"x\":\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"secret\"}}\n,\"text\":\"a\\nb\"}}}",
        );
        let line = one_line(smuggling.clone());
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let before: serde_json::Value = serde_json::from_slice(&smuggling).unwrap();
        let after: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(before, after, "the message means the same");
        // Frames without line breaks pass through without a copy.
        let plain = Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"method\":\"x\"}");
        assert_eq!(one_line(plain.clone()).as_ptr(), plain.as_ptr());
    }
}
