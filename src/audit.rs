//! A tamper-evident audit trail: every call and every policy denial as one JSON line, each line
//! carrying the SHA-256 of the line before it (`prev`), with checkpoints signed by an Ed25519
//! key every so many records and when the gateway stops. Editing, removing or reordering a line
//! breaks the chain at that line; rewriting the tail after a checkpoint needs the signing key.
//! Cutting the file back to a checkpoint is not seen from the file alone: a copy kept off the
//! machine (the OTLP export) shows it.
//!
//! The request path only hands a record to a bounded queue; one task writes. Records the queue
//! has no room for are counted and written as a `gap` record, so a loss shows in the chain too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::AuditSettings;

/// Records waiting to be written, at most.
const QUEUE: usize = 65_536;
/// Bytes of records waiting to be written, at most (each record is under 2 KiB: its texts
/// are cut to [`MAX_TEXT`]).
const QUEUE_BYTES: usize = 16 << 20;
/// Bytes of queue buffer kept between batches, at most (a burst's larger buffer is freed).
const SPARE_BYTES: usize = 1 << 20;
/// How long the writer lets records gather after one wakes it (the queue holds what comes
/// meanwhile at any rate the gateway reaches). Measured with `cargo bench --bench gateway --
/// --only-auth`: at 1 ms the writer's wake-ups cost the gateway 1.18–1.26 × the CPU per call
/// of no trail under load, at 10 ms 1.06–1.09 ×.
const GATHER: Duration = Duration::from_millis(10);
/// Bytes of one block lines are made in: they reach the file a block (about 140 records) or
/// a batch at a time, and the view of every record holds them there, uncopied.
const BLOCK: usize = 64 * 1024;
/// Bytes the chain's members add to a record's object, at most (`seq`, `prev`, `time`).
const LINK_BYTES: usize = 160;
/// Written lines kept in memory for the admin API (the console's recent activity), per
/// kind of view, at most.
pub const RECENT: usize = 500;
/// Bytes of lines kept in memory per view, at most (the view of every record holds them in
/// the blocks they were made in: up to two blocks more).
const RECENT_BYTES: usize = 1 << 20;

/// The last lines written, in two views: every record (checkpoints aside), and the decisions
/// of identified callers (denials, admin changes, approvals), which a flood of calls or of
/// anonymous refusals cannot push out of sight.
#[derive(Default)]
struct Kept {
    all: Ring,
    decisions: Ring,
}

/// Lines, oldest first, bounded by [`RECENT`] and [`RECENT_BYTES`].
#[derive(Default)]
struct Ring {
    lines: std::collections::VecDeque<Bytes>,
    bytes: usize,
}

impl Ring {
    fn push(&mut self, line: Bytes) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > RECENT || self.bytes > RECENT_BYTES {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.len();
        }
    }
}

/// Shared by the writer and its readers.
type Recent = Arc<std::sync::Mutex<Kept>>;

/// Which of the kept views to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Every record but checkpoints.
    All,
    /// Denials, admin changes and approvals of identified callers.
    Decisions,
}

/// Where a written line is kept in memory.
#[derive(Clone, Copy)]
enum Keep {
    Nowhere,
    All,
    AllAndDecisions,
}

/// Longest name or outcome kept in a record (bytes): an attacker's 4 MiB URI must not roll the
/// files over.
pub const MAX_TEXT: usize = 512;

/// `s` cut to [`MAX_TEXT`] bytes (at a character boundary), the cut marked.
fn cut(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_TEXT {
        return s.into();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// Records of unauthenticated refusals written per second, at most.
pub const UNAUTHENTICATED_PER_SECOND: u64 = 20;

/// Counts events per second, admitting the first few.
#[derive(Default)]
struct Limiter {
    second: AtomicU64,
    admitted: AtomicU64,
    refused: AtomicU64,
}

impl Limiter {
    /// Whether an event in second `now` is admitted, and how many were refused in the second
    /// just ended (told once, by the first event of a new second).
    fn admit(&self, now: u64) -> (bool, u64) {
        let mut told = 0;
        let second = self.second.load(Ordering::Relaxed);
        if second != now
            && self
                .second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.admitted.store(0, Ordering::Relaxed);
            told = self.refused.swap(0, Ordering::Relaxed);
        }
        if self.admitted.fetch_add(1, Ordering::Relaxed) < UNAUTHENTICATED_PER_SECOND {
            (true, told)
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            (false, told)
        }
    }
}

/// The chain's anchor when there is no earlier line.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A session in a record: shown only by its [`log_prefix`], in the trail and in debug output
/// alike.
#[derive(Clone, Copy)]
pub struct SessionName<'a>(&'a str);

impl<'a> SessionName<'a> {
    /// The session with this id.
    pub fn new(id: &'a str) -> SessionName<'a> {
        SessionName(id)
    }
}

impl std::fmt::Debug for SessionName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(log_prefix(self.0))
    }
}

impl Serialize for SessionName<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(log_prefix(self.0))
    }
}

/// Characters of a session id that logs and the trail show.
const SHOWN_OF_SESSION: usize = 12;

/// The part of a session id that logs and the trail show: enough to tell sessions apart, too
/// little to take one over.
pub fn log_prefix(id: &str) -> &str {
    // Ids the gateway makes are ASCII: their first characters are their first bytes.
    if let Some(head) = id.as_bytes().get(..SHOWN_OF_SESSION)
        && head.is_ascii()
    {
        return &id[..SHOWN_OF_SESSION];
    }
    let end = id
        .char_indices()
        .nth(SHOWN_OF_SESSION)
        .map_or(id.len(), |(i, _)| i);
    &id[..end]
}

/// One audited event, as a view of what it names: it is serialized as it is recorded, so it
/// holds no copy, nor a reference count, of anything.
#[derive(Debug, Default, Serialize)]
pub struct Event<'a> {
    /// `call`, `denial`, `admin`, `approval`, `tool_change`, or the trail's own (`gap`, `checkpoint`, `restart`, `suppressed`).
    pub kind: &'static str,
    /// Who.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<&'a str>,
    /// The session (its log prefix, never the whole id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionName<'a>>,
    /// The profile (`/mcp/{profile}`) the call came through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'a str>,
    /// The upstream server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<&'a str>,
    /// The JSON-RPC method.
    pub method: &'a str,
    /// The tool or prompt (as the server knows it) or the resource URI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `allowed` or `denied`.
    pub decision: &'static str,
    /// The plugin that decided a denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<&'a str>,
    /// What a denial said, or how a call ended (`ok`, `error`, `failed`, `denied`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'a str>,
    /// How long the call took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Size of the request's params.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<usize>,
    /// Size of the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<usize>,
}

/// The audit trail's entry point on the request path; off when not configured.
#[derive(Default)]
pub struct Audit {
    /// Where records wait for the writer; `None` when the trail is off.
    queue: Option<Intake>,
    /// Bounds records anyone can cause without credentials.
    unauthenticated: Limiter,
    /// The writer thread, until `close` joins it.
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when the gateway starts shipping lines to a collector.
    shipping: Arc<OnceLock<Shipping>>,
    /// The last lines written.
    recent: Recent,
}

/// Records serialized on the request path, waiting for the writer: one buffer both sides
/// swap, so a record costs no allocation of its own, no channel, and no free on another
/// thread than the one that allocated.
#[derive(Default)]
struct Queue {
    waiting: std::sync::Mutex<Waiting>,
    /// Wakes the writer (signalled only while it waits: a record under load costs no
    /// system call).
    wake: std::sync::Condvar,
}

/// What waits in the [`Queue`].
#[derive(Default)]
struct Waiting {
    /// The records' JSON objects, one after another.
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`, and where its line is kept.
    records: Vec<(usize, Keep)>,
    /// Records there was no room for, to be told in the next `gap`.
    lost: u64,
    /// Whether the writer waits for a record.
    writer_waits: bool,
    /// Whether the writer is to write what waits, a last checkpoint, and stop.
    closing: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one serialized record, or counts it lost when the queue is full. Records a
    /// client can cause (calls, denials, tool changes) leave the last eighth of it to those
    /// only the operator's side makes (admin changes, approvals): a flood while the writer is
    /// slow must not cost the trail those.
    fn push(&self, record: &[u8], keep: Keep, reserved: bool) {
        let (records, bytes) = match reserved {
            false => (QUEUE - QUEUE / 8, QUEUE_BYTES - QUEUE_BYTES / 8),
            true => (QUEUE, QUEUE_BYTES),
        };
        let mut w = self.lock();
        if w.records.len() >= records || w.bytes.len() + record.len() > bytes {
            w.lost += 1;
            return;
        }
        w.bytes.extend_from_slice(record);
        let end = w.bytes.len();
        w.records.push((end, keep));
        if std::mem::take(&mut w.writer_waits) {
            self.wake.notify_one();
        }
    }

    /// Tells the writer to write what waits and stop.
    fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }
}

/// The request path's end of the [`Queue`]: dropping it (without `close`) still lets the
/// writer write what waits and end the chain.
struct Intake(Arc<Queue>);

impl Drop for Intake {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Trail lines as an OTLP `ExportLogsServiceRequest` (JSON encoding): one log record per line,
/// its body the line as written, `gatehouse.audit.seq` an attribute.
fn encode_logs(service_name: &str, lines: &[Shipped]) -> Vec<u8> {
    let records: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::json!({
                "timeUnixNano": l.time_ns.to_string(),
                "observedTimeUnixNano": l.time_ns.to_string(),
                "severityNumber": 9,
                "severityText": "INFO",
                "body": {"stringValue": String::from_utf8_lossy(&l.line)},
                "attributes": [{"key": "gatehouse.audit.seq", "value": {"intValue": l.seq.to_string()}}],
            })
        })
        .collect();
    let doc = serde_json::json!({
        "resourceLogs": [{
            "resource": crate::otlp::resource(service_name),
            "scopeLogs": [{
                "scope": {"name": "gatehouse.audit", "version": env!("CARGO_PKG_VERSION")},
                "logRecords": records,
            }],
        }],
    });
    serde_json::to_vec(&doc).expect("JSON values serialize")
}

impl Audit {
    /// Starts the writer for `settings` (continuing the chain of an existing file). It is a
    /// thread of its own: file writes and signatures never hold up the request path's workers.
    pub fn start(settings: &AuditSettings) -> std::io::Result<Audit> {
        let shipping: Arc<OnceLock<Shipping>> = Arc::default();
        let recent = Recent::default();
        let writer = Writer::open(settings, shipping.clone(), recent.clone())?;
        let queue = Arc::new(Queue::default());
        let thread = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("gatehouse-audit".into())
                .spawn(move || writer.run(&queue))?
        };
        Ok(Audit {
            queue: Some(Intake(queue)),
            unauthenticated: Limiter::default(),
            writer: std::sync::Mutex::new(Some(thread)),
            shipping,
            recent,
        })
    }

    /// Ships every line written from now on to `settings`' collector as an OTLP log record
    /// whose body is the line itself (so the chain can be checked there too), with the
    /// gateway's HTTP client; `dropped` counts lines lost on the way. Once only; needs a
    /// runtime.
    pub fn ship<C>(
        &self,
        settings: &crate::config::traces::AuditOtlp,
        client: hyper_util::client::legacy::Client<C, http_body_util::Full<Bytes>>,
        dropped: prometheus_client::metrics::counter::Counter,
    ) where
        C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        let Some(target) = crate::otlp::Target::new(
            &settings.endpoint,
            &settings.headers,
            settings.flush_interval,
            "audit records",
        ) else {
            return;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(settings.max_queue);
        let shipping = Shipping {
            lines: tx,
            dropped: dropped.clone(),
        };
        if self.shipping.set(shipping).is_err() {
            return;
        }
        let service = settings.service_name.clone();
        tokio::spawn(crate::otlp::export(
            target,
            rx,
            dropped,
            client,
            move |lines| encode_logs(&service, lines),
        ));
    }

    /// Writes what is queued and a last checkpoint, and waits until they are flushed.
    pub async fn close(&self) {
        let Some(queue) = &self.queue else {
            return;
        };
        let Some(thread) = self.writer.lock().map(|mut w| w.take()).unwrap_or(None) else {
            return;
        };
        queue.0.close();
        // A blocking join, off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    /// The last `n` lines written (at most [`RECENT`]), newest first: each a JSON object as
    /// the trail has it, chain members included.
    pub fn recent(&self, view: View, n: usize) -> Vec<Bytes> {
        let kept = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let ring = match view {
            View::All => &kept.all,
            View::Decisions => &kept.decisions,
        };
        ring.lines.iter().rev().take(n).cloned().collect()
    }

    /// Whether records are kept at all (callers skip building them otherwise).
    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues a record of something anyone can cause without credentials (a refused token):
    /// at most [`UNAUTHENTICATED_PER_SECOND`] a second, the rest counted in one `suppressed`
    /// record, so that a flood cannot rotate the trail's history away.
    pub fn record_unauthenticated(&self, event: Event<'_>) {
        if !self.is_on() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (admit, suppressed) = self.unauthenticated.admit(now);
        if suppressed > 0 {
            let told = format!("{suppressed} more such refusals in the second before");
            self.record(Event {
                kind: "suppressed",
                method: event.method,
                decision: "denied",
                by: event.by,
                outcome: Some(&told),
                ..Default::default()
            });
        }
        if admit {
            self.record(event);
        }
    }

    /// Queues a record; never waits. Methods, names and outcomes longer than [`MAX_TEXT`] are
    /// cut (a client names the method of a call passed through to its one server).
    pub fn record(&self, event: Event<'_>) {
        let Some(queue) = &self.queue else {
            return;
        };
        // Serialized here, outside the queue's lock, into this thread's own buffer (a record
        // costs no allocation).
        thread_local! {
            static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let written = BODY.try_with(|body| {
            let mut body = body.borrow_mut();
            body.clear();
            event.write_json(&mut body);
            queue.0.push(&body, event.keep(), event.operators());
            // A record with long texts is rare: its buffer is not kept.
            if body.capacity() > 4096 {
                *body = Vec::new();
            }
        });
        // A thread tearing down its locals (a call dropped as its runtime ends) still records.
        if written.is_err() {
            let mut body = Vec::new();
            event.write_json(&mut body);
            queue.0.push(&body, event.keep(), event.operators());
        }
    }
}

impl Event<'_> {
    /// The record's JSON object, byte for byte what its `Serialize` writes (once its method,
    /// name and outcome are [`cut`]), without
    /// escaping, byte by byte, the member names the gateway fixed or text that needs none
    /// (most of a record; this runs on the request path for every call).
    fn write_json(&self, out: &mut Vec<u8>) {
        fn text(out: &mut Vec<u8>, name: &str, value: &str) {
            out.extend_from_slice(name.as_bytes());
            crate::json_string::put(out, value);
        }
        fn number(out: &mut Vec<u8>, name: &str, value: u64) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
        // Every field named: one added to `Event` fails to compile here until it is written.
        let Event {
            kind,
            principal,
            session,
            profile,
            server,
            method,
            name,
            decision,
            by,
            outcome,
            latency_us,
            request_bytes,
            response_bytes,
        } = self;
        let (method, name, outcome) = (cut(method), name.map(cut), outcome.map(cut));
        out.reserve(256);
        text(out, "{\"kind\":", kind);
        for (key, value) in [
            (",\"principal\":", *principal),
            (",\"session\":", session.map(|n| log_prefix(n.0))),
            (",\"profile\":", *profile),
            (",\"server\":", *server),
            (",\"method\":", Some(&*method)),
            (",\"name\":", name.as_deref()),
            (",\"decision\":", Some(*decision)),
            (",\"by\":", *by),
            (",\"outcome\":", outcome.as_deref()),
        ] {
            if let Some(value) = value {
                text(out, key, value);
            }
        }
        for (key, value) in [
            (",\"latency_us\":", *latency_us),
            (",\"request_bytes\":", request_bytes.map(|n| n as u64)),
            (",\"response_bytes\":", response_bytes.map(|n| n as u64)),
        ] {
            if let Some(value) = value {
                number(out, key, value);
            }
        }
        out.push(b'}');
    }

    /// Whether only the operator's side makes it (no client can cause it in volume): an
    /// admin change or an approval by an authenticated admin (a refused admin request has
    /// no principal, nor does an approval on first sight, which servers' lists cause).
    fn operators(&self) -> bool {
        matches!(self.kind, "admin" | "approval") && self.principal.is_some()
    }

    /// Where its line is kept: decisions about identified callers in their own view too.
    fn keep(&self) -> Keep {
        if matches!(self.kind, "denial" | "admin" | "approval") && self.principal.is_some() {
            Keep::AllAndDecisions
        } else {
            Keep::All
        }
    }
}

/// Writes the chain: one line per record, the hash of each line in the next.
struct Writer {
    path: Option<PathBuf>,
    out: Box<dyn Write + Send>,
    written: u64,
    max_bytes: u64,
    keep: usize,
    seq: u64,
    prev: String,
    key: Option<Ed25519KeyPair>,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    since_checkpoint: u64,
    /// A checkpoint is being written (the line that fills a file is signed before it is
    /// moved aside; the checkpoint's own line then moves it).
    signing: bool,
    /// Records that could not be written, to be told in the next `gap`.
    pending_loss: u64,
    /// Lines made and not yet handed to `out`, one after another, in the block the next line
    /// is made in too.
    batch: bytes::BytesMut,
    /// The lines of `batch`, in order.
    lines: Vec<Line>,
    /// The chain's end (`seq`, `prev`) before `batch`'s first line: where the chain goes on
    /// from when the batch cannot be written.
    batch_from: (u64, String),
    /// The rest of a line a failed write took part of: written before anything else.
    unfinished: Bytes,
    /// The time of the line being written, as text.
    stamp: Stamp,
    /// Where written lines are also shipped (OTLP logs), once the gateway started shipping.
    shipping: Arc<OnceLock<Shipping>>,
    /// The last lines written, for the admin API.
    recent: Recent,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Writes what of `bytes` `out` takes until it fails: how many bytes it took, and the error.
fn write_some(out: &mut (dyn Write + Send), bytes: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut taken = 0;
    while taken < bytes.len() {
        match out.write(&bytes[taken..]) {
            Ok(0) => return (taken, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => taken += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (taken, Some(e)),
        }
    }
    (taken, None)
}

/// A line of a batch, until it is written.
struct Line {
    /// Where it ends in the batch (after its newline).
    end: usize,
    keep: Keep,
    seq: u64,
    /// Its hash: the next line's `prev`.
    hash: [u8; 32],
    /// When it was made (nanoseconds since the Unix epoch).
    time_ns: u64,
}

/// The way to the OTLP exporter of the trail.
struct Shipping {
    lines: tokio::sync::mpsc::Sender<Shipped>,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// One written line on its way to the collector.
pub struct Shipped {
    /// The line as written (its chain members included), without the newline.
    line: Bytes,
    seq: u64,
    time_ns: u64,
}

impl Writer {
    fn open(
        s: &AuditSettings,
        shipping: Arc<OnceLock<Shipping>>,
        recent: Recent,
    ) -> std::io::Result<Writer> {
        let key =
            match &s.signing_key {
                Some(seed) => Some(Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| {
                    std::io::Error::other("audit.signing_key is not an Ed25519 seed")
                })?),
                None => None,
            };
        let public = key.as_ref().map(|k| k.public_key().as_ref().to_vec());
        let torn = match &s.file {
            Some(path) => cut_torn_tail(path)?,
            None => None,
        };
        let (seq, prev, unsigned_tail) = match &s.file {
            Some(path) => last_link(path, public.as_deref())?,
            None => (0, GENESIS.to_owned(), 0),
        };
        let (out, written): (Box<dyn Write + Send>, u64) = match &s.file {
            Some(path) => {
                let f = trail_file(path)?;
                // The files moved aside by an older version too.
                for n in 1..=s.keep {
                    let aside = PathBuf::from(format!("{}.{n}", path.display()));
                    match crate::private_file::keep_from_others(&aside) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            tracing::warn!(path = %aside.display(), "cannot keep the audit trail from other users: {e}");
                        }
                        _ => {}
                    }
                }
                let len = f.metadata()?.len();
                (Box::new(f), len)
            }
            None => (Box::new(std::io::stdout()), 0),
        };
        Ok(Writer {
            path: s.file.clone(),
            out,
            written,
            max_bytes: s.max_bytes,
            keep: s.keep,
            seq,
            prev,
            key,
            checkpoint_every: s.checkpoint_every,
            checkpoint_interval: s.checkpoint_interval,
            since_checkpoint: 0,
            signing: false,
            pending_loss: 0,
            batch: bytes::BytesMut::new(),
            lines: Vec::new(),
            batch_from: (0, String::new()),
            unfinished: Bytes::new(),
            stamp: Stamp::default(),
            shipping,
            recent,
        })
        .map(|mut w| {
            // Records after the file's last checkpoint were not signed (a crash, or someone
            // else's hand): the chain goes on, and says so before it signs anything again.
            if unsigned_tail > 0 || torn.is_some() {
                let mut m = Map::new();
                m.insert("kind".into(), "restart".into());
                m.insert("unsigned_before".into(), unsigned_tail.into());
                if let Some((bytes, aside)) = &torn {
                    m.insert("torn_tail_bytes".into(), (*bytes).into());
                    m.insert("torn_tail_file".into(), aside.display().to_string().into());
                }
                w.write(m);
                w.since_checkpoint += 1;
            }
            w
        })
    }

    /// Writes what `queue` is given until it closes, each batch in one go, then a last
    /// checkpoint.
    fn run(mut self, queue: &Queue) {
        let mut taken = Waiting::default();
        let mut last_checkpoint = std::time::Instant::now();
        loop {
            let mut w = queue.lock();
            if w.records.is_empty() && !w.closing {
                w.writer_waits = true;
                let wait = self
                    .checkpoint_interval
                    .saturating_sub(last_checkpoint.elapsed());
                w = queue
                    .wake
                    .wait_timeout(w, wait)
                    .map_or_else(|e| e.into_inner().0, |(w, _)| w);
                w.writer_waits = false;
                if w.records.is_empty() && !w.closing {
                    drop(w);
                    if last_checkpoint.elapsed() >= self.checkpoint_interval {
                        self.checkpoint_if_new();
                        last_checkpoint = std::time::Instant::now();
                    }
                    continue;
                }
                if !w.closing {
                    // Let the records that follow gather, then write them in one go: while
                    // this thread sleeps rather than waits, the request path queues without
                    // waking it (a system call each).
                    drop(w);
                    std::thread::sleep(GATHER);
                    w = queue.lock();
                }
            }
            std::mem::swap(&mut w.bytes, &mut taken.bytes);
            std::mem::swap(&mut w.records, &mut taken.records);
            let lost = std::mem::take(&mut w.lost);
            let closing = w.closing;
            drop(w);
            let mut start = 0;
            for &(end, keep) in &taken.records {
                self.write_record(&taken.bytes[start..end], keep);
                start = end;
            }
            // Lost for want of room: after the records that took it.
            if lost > 0 {
                self.write_gap(lost);
            }
            taken.bytes.clear();
            taken.records.clear();
            // A burst's buffers are not kept for good (both sides' are, in turn, this one).
            if taken.bytes.capacity() > SPARE_BYTES {
                taken = Waiting::default();
            }
            // Each batch reaches the file as it ends: a crash loses at most the batch being
            // written, not a buffer's worth of records the views and the collector showed.
            self.flush();
            if closing {
                break;
            }
            if last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.checkpoint_if_new();
                last_checkpoint = std::time::Instant::now();
            }
            // Under a steady load the next batch gathers while this one was written; the
            // wait between batches keeps them few.
            std::thread::sleep(GATHER);
        }
        if self.pending_loss > 0 {
            let lost = std::mem::take(&mut self.pending_loss);
            self.write_gap(lost);
        }
        self.checkpoint_if_new();
    }

    #[cfg(test)]
    fn write_event(&mut self, e: &Event) {
        let body = serde_json::to_vec(e).expect("records serialize");
        self.write_record(&body, e.keep());
    }

    /// Writes one serialized record (after a `gap` for records lost before it).
    fn write_record(&mut self, record: &[u8], keep: Keep) {
        if self.pending_loss > 0 {
            let lost = std::mem::take(&mut self.pending_loss);
            self.write_gap(lost);
        }
        self.write_object(record, keep);
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.checkpoint_every {
            self.checkpoint_if_new();
        }
    }

    fn write_gap(&mut self, lost: u64) {
        let mut m = Map::new();
        m.insert("kind".into(), "gap".into());
        m.insert("lost".into(), lost.into());
        tracing::warn!(
            lost,
            "audit records lost: the queue was full or a write failed"
        );
        self.write(m);
        self.since_checkpoint += 1;
    }

    /// A signed checkpoint over the chain so far, if anything was written since the last one.
    fn checkpoint_if_new(&mut self) {
        if self.since_checkpoint == 0 {
            self.flush();
            return;
        }
        // What it signs is the chain's end once the lines before it are written: a write
        // that fails moves that end back.
        self.flush();
        self.since_checkpoint = 0;
        self.signing = true;
        let mut m = Map::new();
        m.insert("kind".into(), "checkpoint".into());
        if let Some(key) = &self.key {
            let signed = checkpoint_message(self.seq + 1, &self.prev);
            let b64 = base64::engine::general_purpose::STANDARD;
            m.insert(
                "public_key".into(),
                b64.encode(key.public_key().as_ref()).into(),
            );
            m.insert(
                "signature".into(),
                b64.encode(key.sign(&signed).as_ref()).into(),
            );
        }
        self.write_kept(m, Keep::Nowhere);
        self.signing = false;
        self.flush();
    }

    fn write(&mut self, fields: Map<String, Value>) {
        self.write_kept(fields, Keep::All);
    }

    fn write_kept(&mut self, fields: Map<String, Value>, keep: Keep) {
        if let Ok(body) = serde_json::to_vec(&Value::Object(fields)) {
            self.write_object(&body, keep);
        }
    }

    /// Writes one record: `object` is its JSON object, to which the chain's members are added
    /// (at its end: the record is serialized once, straight from its fields). The line is made
    /// in the batch and reaches the file with it.
    fn write_object(&mut self, object: &[u8], keep: Keep) {
        use bytes::BufMut as _;
        let Some((b'}', members)) = object.split_last() else {
            return;
        };
        let need = members.len() + LINK_BYTES;
        if self.batch.capacity() - self.batch.len() < need {
            // The block is full: what it holds goes out, and the next line starts a new one
            // (the lines the views hold keep the old one alive, not copied).
            self.flush();
            self.batch.reserve(need.max(BLOCK));
        }
        // After that flush: one that failed moved the chain's end back.
        let Some(seq) = self.seq.checked_add(1) else {
            tracing::error!("the audit trail's sequence is exhausted: nothing more is written");
            return;
        };
        if self.lines.is_empty() {
            self.batch_from.0 = self.seq;
            self.batch_from.1.clone_from(&self.prev);
        }
        let now = SystemTime::now();
        let start = self.batch.len();
        let line = &mut self.batch;
        line.put_slice(members);
        if members.len() > 1 {
            line.put_u8(b',');
        }
        line.put_slice(b"\"seq\":");
        line.put_slice(itoa::Buffer::new().format(seq).as_bytes());
        line.put_slice(b",\"prev\":\"");
        line.put_slice(self.prev.as_bytes());
        line.put_slice(b"\",\"time\":\"");
        line.put_slice(self.stamp.of(now).as_bytes());
        line.put_slice(b"\"}");
        let hash = ring::digest::digest(&ring::digest::SHA256, &line[start..]);
        line.put_u8(b'\n');
        let end = line.len();
        self.seq = seq;
        self.prev.clear();
        hex_into(&mut self.prev, hash.as_ref());
        self.written += (end - start) as u64;
        self.lines.push(Line {
            end,
            keep,
            seq,
            hash: hash.as_ref().try_into().expect("SHA-256 is 32 bytes"),
            time_ns: now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        });
        if self.written >= self.max_bytes {
            if self.signing {
                self.rotate();
            } else {
                // A file moved aside ends with a signed checkpoint: rewriting its tail then
                // needs the key, as anywhere else in the chain (its checkpoint's line rotates).
                self.since_checkpoint += 1;
                self.checkpoint_if_new();
            }
        }
    }

    /// Hands the batch to the file, then to the views and the collector. The chain moves on
    /// only with lines written: lines a failed write did not take are a loss (the next record
    /// says so), and the chain goes on from the last line the file took, not from lines it
    /// does not have (which would look like tampering). A line the file took only part of is
    /// finished before anything else is written to it: a torn line mid-file would break the
    /// chain for good, where a torn last line is set aside at the next start. Whether the
    /// file took everything.
    fn flush(&mut self) -> bool {
        if self.lines.is_empty() && self.unfinished.is_empty() {
            return true;
        }
        let batch = self.batch.split().freeze();
        let (mut taken, mut failed) = (0, None);
        if !self.unfinished.is_empty() {
            let (rest, error) = write_some(&mut *self.out, &self.unfinished);
            bytes::Buf::advance(&mut self.unfinished, rest);
            failed = error;
        }
        if failed.is_none() {
            (taken, failed) = write_some(&mut *self.out, &batch);
        }
        let failed = failed.or_else(|| self.out.flush().err());
        let whole = self.lines.partition_point(|l| l.end <= taken);
        let mut start = 0;
        {
            let mut kept = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for l in &self.lines[..whole] {
                let line = batch.slice(start..l.end - 1);
                start = l.end;
                if matches!(l.keep, Keep::Nowhere) {
                    continue;
                }
                if matches!(l.keep, Keep::AllAndDecisions) {
                    // A copy of its own: a decision may be kept long after the lines around
                    // it, and must not hold their block in memory.
                    kept.decisions.push(Bytes::copy_from_slice(&line));
                }
                kept.all.push(line);
            }
        }
        if let Some(ship) = self.shipping.get() {
            let mut start = 0;
            for l in &self.lines[..whole] {
                let shipped = Shipped {
                    // A copy of its own too: lines wait for the collector in any order of
                    // release, and must not each hold a block.
                    line: Bytes::copy_from_slice(&batch[start..l.end - 1]),
                    seq: l.seq,
                    time_ns: l.time_ns,
                };
                start = l.end;
                // Never waits: a collector that falls behind loses lines (counted), not the
                // trail.
                if ship.lines.try_send(shipped).is_err() {
                    ship.dropped.inc();
                }
            }
        }
        let took_all = failed.is_none();
        if let Some(e) = failed
            && !self.lines.is_empty()
        {
            tracing::error!("cannot write the audit trail: {e}");
            // A line begun is the chain's end, to be finished first; the rest are lost.
            let mut kept_end = start;
            let mut ends_chain = whole;
            if taken > start {
                kept_end = self.lines[whole].end;
                ends_chain += 1;
                self.unfinished = batch.slice(taken..kept_end);
            }
            let lost = &self.lines[ends_chain..];
            self.pending_loss += lost.len() as u64;
            // A lost checkpoint leaves the lines before it to the next one.
            if lost.iter().any(|l| matches!(l.keep, Keep::Nowhere)) {
                self.since_checkpoint += 1;
            }
            self.written -= (batch.len() - kept_end) as u64;
            match ends_chain.checked_sub(1).map(|i| &self.lines[i]) {
                Some(last) => {
                    self.seq = last.seq;
                    self.prev.clear();
                    hex_into(&mut self.prev, &last.hash);
                }
                None => {
                    self.seq = self.batch_from.0;
                    self.prev.clone_from(&self.batch_from.1);
                }
            }
        }
        self.lines.clear();
        took_all
    }

    /// Moves the file aside (`.1`, `.2`, … up to `keep`) and goes on in a new one; the chain
    /// goes on across files.
    fn rotate(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        // A file moved aside must end as its signed checkpoint left it: when the write fails,
        // the file stays (the lost checkpoint is made again, and the move tried again, with
        // the next record).
        if !self.flush() {
            return;
        }
        let aside = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(aside(n), aside(n + 1));
        }
        let _ = std::fs::rename(&path, aside(1));
        match trail_file(&path) {
            Ok(f) => {
                self.out = Box::new(f);
                self.written = 0;
            }
            Err(e) => tracing::error!("cannot open a new audit file: {e}"),
        }
    }
}

/// A record's time as RFC 3339 text (milliseconds, UTC), formatted once per millisecond:
/// under load the writer writes many lines within one.
#[derive(Default)]
struct Stamp {
    /// The millisecond `text` shows (since the Unix epoch).
    millis: Option<u128>,
    text: String,
}

impl Stamp {
    fn of(&mut self, now: SystemTime) -> &str {
        use std::fmt::Write as _;
        // A clock before 1970 reads as 1970 (humantime panics on such a time).
        let now = now.max(std::time::UNIX_EPOCH);
        let millis = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        if self.millis != Some(millis) {
            self.millis = Some(millis);
            self.text.clear();
            let _ = write!(self.text, "{}", humantime::format_rfc3339_millis(now));
        }
        &self.text
    }
}

/// Opens the trail's file to append to, created readable by this user only, and kept from
/// others (not its group) when an older version made it readable by everyone: records name
/// principals, tools and resources.
fn trail_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    // One an older version made readable by everyone is made unreadable to others, if it
    // is ours (what a group may do with it is left as an operator may have set it).
    let meta = file.metadata()?;
    if meta.mode() & 0o007 != 0
        && meta.uid() == nix::unistd::geteuid().as_raw()
        && let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o770))
    {
        tracing::warn!(path = %path.display(), "cannot make the audit trail private: {e}");
    }
    Ok(file)
}

/// What a checkpoint signs: its own sequence number and the hash of the line before it.
fn checkpoint_message(seq: u64, prev: &str) -> Vec<u8> {
    format!("gatehouse-audit-checkpoint:{seq}:{prev}").into_bytes()
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    hex_into(&mut s, bytes);
    s
}

/// Appends `bytes` in lowercase hex to `s`.
fn hex_into(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// The SHA-256 of `bytes`, in hex (ring's: assembly, a fraction of the portable one's cost).
fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A last line the writer did not finish (the disk filled, the process was killed mid-write):
/// moved aside to a new file `<file>.torn-<seconds>-<random>` and cut from the file, so that the
/// trail goes on from the last whole line; the `restart` record says how many bytes went and
/// where. A last line whole but for its newline (that one byte lost, or taken) gets it back.
/// Anything else that does not verify still stops the start.
fn cut_torn_tail(path: &Path) -> std::io::Result<Option<(u64, PathBuf)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(None);
    }
    if let Ok(text) = std::str::from_utf8(&bytes)
        && verify(&format!("{text}\n"), None).is_ok()
    {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)?
            .write_all(b"\n")?;
        return Ok(None);
    }
    let whole = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |at| at + 1);
    let torn = &bytes[whole..];
    let seconds = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut random = [0u8; 6];
    getrandom::fill(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let aside = PathBuf::from(format!(
        "{}.torn-{seconds}-{}",
        path.display(),
        hex(&random)
    ));
    // A new file only its user reads: never written through a link put in its place.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&aside)?
            .write_all(torn)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(whole as u64)?;
    tracing::warn!(
        file = %path.display(),
        aside = %aside.display(),
        bytes = torn.len(),
        "the audit trail's last line was not finished: moved aside, the trail goes on from the line before"
    );
    Ok(Some((torn.len() as u64, aside)))
}

/// Where to go on from in `path` (or, when it is empty, the file rotated before it): its last
/// sequence number and line hash, and how many records follow its last checkpoint. A file
/// that does not verify (with `public_key`, when the trail signs) is refused: the gateway will
/// not sign over a chain it cannot vouch for.
fn last_link(path: &Path, public_key: Option<&[u8]>) -> std::io::Result<(u64, String, u64)> {
    let read = |p: &Path| match std::fs::read_to_string(p) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    };
    let mut source = path.to_owned();
    let mut text = read(path)?;
    if text.trim().is_empty() {
        source = PathBuf::from(format!("{}.1", path.display()));
        text = read(&source)?;
    }
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Ok((0, GENESIS.to_owned(), 0));
    };
    let checked = verify(&text, public_key).map_err(|b| {
        std::io::Error::other(format!(
            "{} does not verify ({b}): move it aside to start a new trail",
            source.display()
        ))
    })?;
    Ok((
        checked.last_seq,
        sha256_hex(last.as_bytes()),
        checked.unsigned_tail,
    ))
}

/// Reads a public key given as base64 or hex (32 bytes).
pub fn public_key(text: &str) -> Result<Vec<u8>, AuditKeyError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| AuditKeyError)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| AuditKeyError)?
    };
    (bytes.len() == 32).then_some(bytes).ok_or(AuditKeyError)
}

/// A public key that is not 32 bytes of base64 or hex.
#[derive(Debug, thiserror::Error)]
#[error("the public key must be 32 bytes, as base64 or 64 hex digits")]
pub struct AuditKeyError;

/// What `verify` found in a file.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records read.
    pub records: u64,
    /// Checkpoints whose signature was checked.
    pub signed_checkpoints: u64,
    /// The `prev` of the first record (the previous file's last line, or the genesis).
    pub anchor: String,
    /// The first record's sequence number.
    pub first_seq: u64,
    /// The last record's sequence number.
    pub last_seq: u64,
    /// Records after the last checkpoint (not yet covered by a signature).
    pub unsigned_tail: u64,
    /// Records a restart found after the last checkpoint (a crash before one, or someone
    /// else's hand), which later checkpoints sign only as that restart found them; with the
    /// 1-based line of the first such restart.
    pub found_unsigned: Option<(u64, usize)>,
}

/// Where and why a chain is broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct Broken {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong there.
    pub reason: String,
}

/// The kinds of records a trail holds.
const KINDS: [&str; 9] = [
    "call",
    "denial",
    "admin",
    "approval",
    "tool_change",
    "gap",
    "checkpoint",
    "restart",
    "suppressed",
];

/// A record's members, refusing a key given twice (which member counts would be a guess, and
/// a forger's choice).
fn members(line: &str) -> Result<Map<String, Value>, String> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut m = Map::new();
            while let Some((k, v)) = a.next_entry::<String, Value>()? {
                if m.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "the key {k:?} is given twice"
                    )));
                }
                m.insert(k, v);
            }
            Ok(m)
        }
    }
    use serde::Deserializer;
    let mut de = serde_json::Deserializer::from_str(line);
    let members = de.deserialize_map(Unique).map_err(|e| e.to_string())?;
    // Nothing after the object: a reader of JSON lines would see otherwise than this check.
    de.end().map_err(|e| e.to_string())?;
    Ok(members)
}

/// Checks a file's chain, and each checkpoint's signature against `public_key` (raw 32 bytes)
/// when given.
pub fn verify(text: &str, public_key: Option<&[u8]>) -> Result<Verified, Broken> {
    let mut out = Verified {
        records: 0,
        signed_checkpoints: 0,
        anchor: String::new(),
        first_seq: 0,
        last_seq: 0,
        unsigned_tail: 0,
        found_unsigned: None,
    };
    let mut prev: Option<String> = None;
    // Lines as the gateway writes them: each ends with `\n`, none is empty, none has `\r`
    // (which other readers may take for a line break the chain never saw).
    let body = text.strip_suffix('\n').unwrap_or(text);
    for (i, line) in body.split('\n').enumerate().filter(|_| !text.is_empty()) {
        let broken = |reason: String| Broken {
            line: i + 1,
            reason,
        };
        if line.is_empty() {
            return Err(broken("an empty line".into()));
        }
        if line.contains('\r') {
            return Err(broken("a carriage return in a line".into()));
        }
        let v = members(line).map_err(|e| broken(format!("not an audit record ({e})")))?;
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .filter(|k| KINDS.contains(k))
            .ok_or_else(|| broken(format!("kind must be one of {}", KINDS.join(", "))))?;
        let this_prev = v
            .get("prev")
            .and_then(Value::as_str)
            .ok_or_else(|| broken("no prev".into()))?;
        let this_seq = v
            .get("seq")
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)
            .ok_or_else(|| broken("no seq".into()))?;
        match &prev {
            None => {
                // The first record of a trail follows the genesis; a later file's first
                // record follows the file before it.
                if (this_seq == 1) != (this_prev == GENESIS) {
                    return Err(broken(format!(
                        "seq {this_seq} with prev {this_prev}: only the first record of a trail follows the genesis"
                    )));
                }
                out.anchor = this_prev.to_owned();
                out.first_seq = this_seq;
            }
            Some(p) => {
                if this_prev != p {
                    return Err(broken(format!(
                        "prev {this_prev} is not the hash of the line before ({p}): a line was changed, removed or inserted"
                    )));
                }
                if Some(this_seq) != out.last_seq.checked_add(1) {
                    return Err(broken(format!(
                        "seq {this_seq} does not follow {}",
                        out.last_seq
                    )));
                }
            }
        }
        if kind == "restart" {
            let said = v
                .get("unsigned_before")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            // What a restart says it found is what the chain holds before it (but for a
            // file's first record, which may speak of the file before it: a restart just
            // after a rotation).
            if out.records > 0 && said != out.unsigned_tail {
                return Err(broken(format!(
                    "a restart says {said} records came after the last checkpoint; {} did",
                    out.unsigned_tail
                )));
            }
            if said > 0 {
                out.found_unsigned = Some(match out.found_unsigned {
                    Some((count, line)) => (count + said, line),
                    None => (said, i + 1),
                });
            }
        }
        out.unsigned_tail += 1;
        if kind == "checkpoint" {
            out.unsigned_tail = 0;
            if let Some(key) = public_key {
                let b64 = base64::engine::general_purpose::STANDARD;
                let sig = v
                    .get("signature")
                    .and_then(Value::as_str)
                    .and_then(|s| b64.decode(s).ok())
                    .ok_or_else(|| broken("an unsigned checkpoint".into()))?;
                UnparsedPublicKey::new(&ED25519, key)
                    .verify(&checkpoint_message(this_seq, this_prev), &sig)
                    .map_err(|_| broken("the checkpoint's signature does not verify".into()))?;
                out.signed_checkpoints += 1;
            }
        }
        prev = Some(sha256_hex(line.as_bytes()));
        out.last_seq = this_seq;
        out.records += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(file: &Path, seed: [u8; 32], every: u64) -> AuditSettings {
        AuditSettings {
            file: Some(file.to_owned()),
            max_bytes: u64::MAX,
            keep: 3,
            signing_key: Some(seed),
            checkpoint_every: every,
            checkpoint_interval: Duration::from_secs(3600),
            otlp: None,
        }
    }

    fn call(name: &str) -> Event<'_> {
        Event {
            kind: "call",
            principal: Some("alice"),
            method: "tools/call",
            name: Some(name),
            decision: "allowed",
            outcome: Some("ok"),
            ..Event::default()
        }
    }

    #[test]
    fn a_record_is_written_as_serde_writes_it_whatever_its_text() {
        let odd = [
            "plain",
            "",
            "quote\"d",
            "back\\slash",
            "line\nbreak\ttab\u{1}\u{1f}",
            "\u{7f}del and é, 漢字, \u{2028}",
            "</script>",
        ];
        let longs: Vec<String> = odd.iter().map(|t| format!("{t}{t}{t}{t}{t}")).collect();
        let mut events = vec![Event::default(), call("tool1")];
        for (i, (t, long)) in odd.iter().zip(&longs).enumerate() {
            events.push(Event {
                kind: "denial",
                principal: Some(t),
                session: Some(SessionName::new(long)),
                profile: Some(t),
                server: Some(t),
                method: t,
                name: Some(t),
                decision: "denied",
                by: Some(t),
                outcome: Some(t),
                latency_us: Some(u64::MAX >> i),
                request_bytes: (i % 2 == 0).then_some(i),
                response_bytes: Some(usize::MAX),
            });
        }
        for e in &events {
            let mut ours = Vec::new();
            e.write_json(&mut ours);
            let serde = serde_json::to_vec(e).unwrap();
            assert_eq!(ours, serde, "{}", String::from_utf8_lossy(&serde));
        }
    }

    #[test]
    fn a_record_shows_only_its_sessions_prefix_and_cuts_long_text() {
        let id = "a-whole-session-id-that-is-a-credential";
        let (outcome, method) = ("é".repeat(MAX_TEXT), "m".repeat(4 * MAX_TEXT));
        let event = Event {
            session: Some(SessionName::new(id)),
            outcome: Some(&outcome),
            // A client names the method of a call passed through to its one server.
            method: &method,
            ..call("tool1")
        };
        let debugged = format!("{event:?}");
        let written = serde_json::to_string(&event).unwrap();
        for shown in [&debugged, &written] {
            assert!(shown.contains("a-whole-sess"), "{shown}");
            assert!(!shown.contains(id), "the whole id leaked: {shown}");
        }
        // Twelve characters, whatever their bytes.
        for id in [
            "",
            "short",
            id,
            "ééééééééééééé",
            "abcdefghijké-more",
            "漢字漢字漢字漢字漢字漢字漢字",
        ] {
            let twelve: String = id.chars().take(12).collect();
            assert_eq!(log_prefix(id), twelve, "{id:?}");
        }
        // Cut on the way into the queue, at a character boundary.
        let audit = Audit {
            queue: Some(Intake(Arc::default())),
            ..Audit::default()
        };
        audit.record(event);
        let queue = audit.queue.as_ref().unwrap().0.lock();
        assert_eq!(queue.records.len(), 1, "no record queued");
        let kept: Value = serde_json::from_slice(&queue.bytes).unwrap();
        for text in [&kept["outcome"], &kept["method"]] {
            let text = text.as_str().unwrap();
            assert!(text.len() <= MAX_TEXT + '…'.len_utf8(), "{}", text.len());
            assert!(text.ends_with('…'));
        }
    }

    fn public(seed: [u8; 32]) -> Vec<u8> {
        Ed25519KeyPair::from_seed_unchecked(&seed)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_last_line_left_unfinished_is_moved_aside_and_the_trail_goes_on() {
        let dir = std::env::temp_dir().join(format!("gatehouse-audit-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let seed = [7u8; 32];
        let mut w =
            Writer::open(&settings(&file, seed, 100), Arc::default(), Arc::default()).unwrap();
        for n in 0..3 {
            w.write_event(&call(&format!("tool{n}")));
        }
        drop(w);
        // The disk filled in the middle of the next line.
        let torn = r#"{"kind":"call","principal":"ali"#;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(torn.as_bytes()).unwrap();
        drop(f);
        let mut w =
            Writer::open(&settings(&file, seed, 100), Arc::default(), Arc::default()).unwrap();
        w.write_event(&call("tool3"));
        w.checkpoint_if_new();
        drop(w);
        let text = std::fs::read_to_string(&file).unwrap();
        let ok = verify(&text, Some(&public(seed))).unwrap();
        assert_eq!(
            ok.records, 6,
            "three, the restart, one more, the checkpoint: {text}"
        );
        let restart: Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
        assert_eq!(restart["kind"], "restart");
        assert_eq!(restart["torn_tail_bytes"], torn.len());
        let aside = PathBuf::from(restart["torn_tail_file"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), torn);
        // A last line whole but for its newline gets it back: nothing is cut.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.trim_end_matches('\n')).unwrap();
        drop(Writer::open(&settings(&file, seed, 100), Arc::default(), Arc::default()).unwrap());
        let again = std::fs::read_to_string(&file).unwrap();
        assert!(again.starts_with(&text), "the last record is kept");
        assert!(!again[text.len()..].contains("torn_tail"), "{again}");
        let text = again;
        // A whole line that does not verify still stops the start.
        std::fs::write(&file, format!("{text}{{\"kind\":\"call\"}}\n")).unwrap();
        assert!(Writer::open(&settings(&file, seed, 100), Arc::default(), Arc::default()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_chain_verifies_and_any_edit_breaks_it_at_that_line() {
        let dir = std::env::temp_dir().join(format!("gatehouse-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let _ = std::fs::remove_file(&file);
        let seed = [7u8; 32];
        let mut w =
            Writer::open(&settings(&file, seed, 3), Arc::default(), Arc::default()).unwrap();
        for n in 0..7 {
            w.write_event(&call(&format!("tool{n}")));
        }
        w.write_gap(2);
        w.checkpoint_if_new();
        drop(w);
        // A restart goes on with the same chain.
        let mut w =
            Writer::open(&settings(&file, seed, 3), Arc::default(), Arc::default()).unwrap();
        w.write_event(&call("tool99"));
        w.checkpoint_if_new();
        drop(w);
        let text = std::fs::read_to_string(&file).unwrap();
        let ok = verify(&text, Some(&public(seed))).unwrap();
        assert_eq!(ok.records, 13, "{text}");
        assert_eq!(ok.signed_checkpoints, 4);
        assert_eq!(ok.anchor, GENESIS);
        assert!(text.contains(r#""kind":"gap""#));

        let lines: Vec<&str> = text.lines().collect();
        // An edited line: broken at the line after it (its hash no longer matches).
        let mut edited = lines.clone();
        let tampered = lines[1].replace("tool1", "tool9");
        edited[1] = &tampered;
        assert_eq!(verify(&edited.join("\n"), None).unwrap_err().line, 3);
        // A removed line.
        let mut removed = lines.clone();
        removed.remove(4);
        assert_eq!(verify(&removed.join("\n"), None).unwrap_err().line, 5);
        // Swapped lines.
        let mut swapped = lines.clone();
        swapped.swap(5, 6);
        assert!(verify(&swapped.join("\n"), None).unwrap_err().line <= 7);
        // Lines other readers would read otherwise: text after a record, a CR, an empty line.
        let mut trailing = lines.clone();
        let after = format!("{} {{\"kind\":\"call\"}}", lines[2]);
        trailing[2] = &after;
        assert_eq!(verify(&trailing.join("\n"), None).unwrap_err().line, 3);
        assert_eq!(verify(&lines.join("\r\n"), None).unwrap_err().line, 1);
        let mut blank = lines.clone();
        blank.insert(3, "");
        assert_eq!(verify(&blank.join("\n"), None).unwrap_err().line, 4);
        // A rewritten tail with a recomputed chain still fails the signature (another key).
        let other = [9u8; 32];
        assert!(
            verify(&text, Some(&public(other)))
                .unwrap_err()
                .reason
                .contains("signature")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn forged_records_and_a_forged_restart_point_are_refused() {
        let dir = std::env::temp_dir().join(format!("gatehouse-audit-f-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let _ = std::fs::remove_file(&file);
        let seed = [3u8; 32];
        let mut w =
            Writer::open(&settings(&file, seed, 2), Arc::default(), Arc::default()).unwrap();
        for n in 0..4 {
            w.write_event(&call(&format!("tool{n}")));
        }
        drop(w);
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let key = public(seed);
        // A checkpoint that says it is something else (a second `kind`) is refused, not
        // skipped.
        let mut dup = lines.clone();
        dup[2] = dup[2].replacen('{', r#"{"kind":"call","#, 1);
        let e = verify(&dup.join("\n"), Some(&key)).unwrap_err();
        assert!(e.reason.contains("twice"), "{e}");
        let mut unknown = lines.clone();
        unknown[2] = unknown[2].replace(r#""kind":"checkpoint""#, r#""kind":"note""#);
        assert!(
            verify(&unknown.join("\n"), Some(&key))
                .unwrap_err()
                .reason
                .contains("kind")
        );
        // The first lines cut away: what is left starts past 1 and is anchored elsewhere,
        // which verify reports; a first record claiming seq 1 with another anchor is refused.
        let rest = verify(&lines[3..].join("\n"), Some(&key)).unwrap();
        assert_eq!(rest.first_seq, 4);
        assert_ne!(rest.anchor, GENESIS);
        let forged = lines[3].replacen(r#""seq":4"#, r#""seq":1"#, 1);
        assert!(verify(&forged, None).is_err());
        // Appended records, unsigned, are counted as such.
        let ok = verify(&text, Some(&key)).unwrap();
        assert_eq!(ok.unsigned_tail, 0);
        // A restart over a file someone edited: refused, rather than signing over it.
        std::fs::write(&file, unknown.join("\n") + "\n").unwrap();
        let err = Writer::open(&settings(&file, seed, 2), Arc::default(), Arc::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not verify"), "{err}");
        // Over a file whose tail was never signed (a crash): goes on, and says so first.
        let mut w = Writer::open(
            &settings(&file.with_extension("b"), seed, 100),
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        w.write_event(&call("tool1"));
        drop(w);
        let mut w = Writer::open(
            &settings(&file.with_extension("b"), seed, 100),
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        w.checkpoint_if_new();
        drop(w);
        let text = std::fs::read_to_string(file.with_extension("b")).unwrap();
        assert!(text.contains(r#""unsigned_before":1"#), "{text}");
        assert_eq!(verify(&text, Some(&key)).unwrap().signed_checkpoints, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unauthenticated_floods_are_counted_not_written_one_by_one() {
        let l = Limiter::default();
        let admitted = (0..100).filter(|_| l.admit(1000).0).count() as u64;
        assert_eq!(admitted, UNAUTHENTICATED_PER_SECOND);
        // The next second says how many were left out, once.
        assert_eq!(l.admit(1001), (true, 100 - UNAUTHENTICATED_PER_SECOND));
        assert_eq!(l.admit(1001), (true, 0));
        assert_eq!(l.admit(1002), (true, 0));
    }

    #[test]
    fn long_names_are_cut() {
        let long = "é".repeat(600);
        let s = cut(&long);
        assert!(s.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(s.ends_with('…'));
        assert!(long.starts_with(s.trim_end_matches('…')));
        // Short text is left as it is, uncopied.
        let short = "é".repeat(MAX_TEXT / 2);
        assert!(matches!(cut(&short), std::borrow::Cow::Borrowed(s) if s == short));
    }

    #[test]
    fn a_full_queue_counts_what_it_refuses_and_the_writer_says_so_after_what_it_held() {
        let dir = std::env::temp_dir().join(format!("gatehouse-audit-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let _ = std::fs::remove_file(&file);
        let audit = Audit {
            queue: Some(Intake(Arc::default())),
            ..Audit::default()
        };
        // Calls fill what they may (seven eighths), and so would denials (any client causes
        // them); an admin change still has room after.
        let calls = QUEUE - QUEUE / 8;
        for n in 0..calls + 2 {
            audit.record(call(&format!("tool{n}")));
        }
        audit.record(Event {
            kind: "denial",
            principal: Some("mallory"),
            method: "tools/call",
            decision: "denied",
            ..Default::default()
        });
        audit.record(Event {
            kind: "admin",
            principal: Some("ops"),
            method: "upstreams/set",
            decision: "allowed",
            ..Default::default()
        });
        let queue = audit.queue.as_ref().unwrap().0.clone();
        assert_eq!(queue.lock().lost, 3);
        queue.close();
        let seed = [5u8; 32];
        let w = Writer::open(
            &settings(&file, seed, u64::MAX),
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        w.run(&queue);
        let text = std::fs::read_to_string(&file).unwrap();
        let ok = verify(&text, Some(&public(seed))).unwrap();
        assert_eq!(
            ok.records as usize,
            calls + 3,
            "the calls, the admin change, a gap, a checkpoint"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains(r#""name":"tool0""#), "{}", lines[0]);
        let last_kept = format!(r#""name":"tool{}""#, calls - 1);
        assert!(lines[calls - 1].contains(&last_kept));
        assert!(
            lines[calls].contains(r#""kind":"admin""#),
            "{}",
            lines[calls]
        );
        let gap = members(lines[calls + 1]).unwrap();
        assert_eq!(
            (gap["kind"].as_str(), gap["lost"].as_u64()),
            (Some("gap"), Some(3))
        );
        assert!(lines[calls + 2].contains(r#""kind":"checkpoint""#));
        assert!(queue.lock().bytes.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer of a new trail in a directory of its own (named by `tag`), and its views.
    fn with_views(tag: &str, seed: [u8; 32]) -> (PathBuf, PathBuf, Recent, Writer) {
        let dir =
            std::env::temp_dir().join(format!("gatehouse-audit-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let recent = Recent::default();
        let w = Writer::open(
            &settings(&file, seed, 10_000),
            Arc::default(),
            recent.clone(),
        )
        .unwrap();
        (dir, file, recent, w)
    }

    #[test]
    fn the_recent_lines_are_the_last_written_newest_first_and_bounded() {
        let (dir, file, recent, mut w) = with_views("m", [2u8; 32]);
        // A denial of an identified caller, then a flood of calls and anonymous refusals.
        w.write_event(&Event {
            kind: "denial",
            principal: Some("mallory"),
            method: "tools/call",
            decision: "denied",
            by: Some("policy"),
            ..Default::default()
        });
        for n in 0..RECENT + 7 {
            w.write_event(&call(&format!("tool{n}")));
            w.write_event(&Event {
                kind: "denial",
                method: "tools/list",
                decision: "denied",
                by: Some("auth"),
                ..Default::default()
            });
        }
        w.checkpoint_if_new();
        drop(w);
        let audit = Audit {
            recent,
            ..Default::default()
        };
        let all = audit.recent(View::All, usize::MAX);
        assert_eq!(all.len(), RECENT);
        let written = std::fs::read_to_string(&file).unwrap();
        let last: Vec<&str> = written
            .lines()
            .rev()
            .filter(|l| !l.contains(r#""kind":"checkpoint""#))
            .take(RECENT)
            .collect();
        let kept: Vec<&str> = all
            .iter()
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        assert_eq!(
            kept, last,
            "the lines as written, newest first, checkpoints aside"
        );
        assert_eq!(audit.recent(View::All, 3).len(), 3);
        // The flood pushed the denial out of the first view, not out of the decisions.
        assert!(!kept.iter().any(|l| l.contains("mallory")));
        let decisions = audit.recent(View::Decisions, usize::MAX);
        assert_eq!(decisions.len(), 1);
        assert!(
            std::str::from_utf8(&decisions[0])
                .unwrap()
                .contains("mallory")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stamp_is_the_time_of_each_line_to_the_millisecond() {
        let mut stamp = Stamp::default();
        let base = std::time::UNIX_EPOCH + Duration::from_millis(1_764_806_400_123);
        for (offset_us, want) in [
            (0, "2025-12-04T00:00:00.123Z"),
            (500, "2025-12-04T00:00:00.123Z"),
            (999, "2025-12-04T00:00:00.123Z"),
            (1_000, "2025-12-04T00:00:00.124Z"),
            (0, "2025-12-04T00:00:00.123Z"),
            (86_400_000_000, "2025-12-05T00:00:00.123Z"),
        ] {
            let now = base + Duration::from_micros(offset_us);
            assert_eq!(stamp.of(now), want);
            assert_eq!(
                stamp.of(now),
                humantime::format_rfc3339_millis(now).to_string()
            );
        }
        // A clock before 1970 (humantime panics on such a time) reads as 1970.
        let before = std::time::UNIX_EPOCH - Duration::from_millis(1);
        assert_eq!(stamp.of(before), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn lines_of_any_size_reach_the_file_and_the_view_as_written() {
        let (dir, file, recent, mut w) = with_views("b", [4u8; 32]);
        // Around a block's size and past it, and many small ones between: lines cross from
        // one block into the next, and a batch is written as a block fills.
        let sizes: Vec<usize> = (0..600)
            .map(|i| match i % 200 {
                7 => BLOCK + 10,
                8 => BLOCK - LINK_BYTES - 40,
                _ => i % 300,
            })
            .collect();
        for (i, n) in sizes.iter().enumerate() {
            let principal = "p".repeat(*n);
            w.write_event(&Event {
                principal: Some(&principal),
                ..call(&format!("tool{i}"))
            });
            if i % 50 == 0 {
                w.flush();
            }
        }
        w.checkpoint_if_new();
        drop(w);
        let written = std::fs::read_to_string(&file).unwrap();
        let checked = verify(&written, Some(&public([4u8; 32]))).unwrap();
        assert_eq!(checked.records, sizes.len() as u64 + 1);
        let calls: Vec<&str> = written
            .lines()
            .filter(|l| l.contains(r#""kind":"call""#))
            .collect();
        for (line, n) in calls.iter().zip(&sizes) {
            let principal = members(line).unwrap()["principal"].as_str().unwrap().len();
            assert_eq!(principal, *n);
        }
        let audit = Audit {
            recent,
            ..Default::default()
        };
        let kept: Vec<Bytes> = audit.recent(View::All, usize::MAX);
        let bytes: usize = kept.iter().map(|l| l.len()).sum();
        assert!(
            !kept.is_empty() && bytes <= RECENT_BYTES + 2 * BLOCK,
            "{bytes}"
        );
        for (kept, line) in kept.iter().zip(calls.iter().rev()) {
            assert_eq!(&kept[..], line.as_bytes());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file whose `fail_at`th write (counted from 1) fails, the others reaching `inner`.
    struct FailNth {
        inner: std::fs::File,
        calls: usize,
        fail_at: usize,
    }

    impl Write for FailNth {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls == self.fail_at {
                return Err(std::io::Error::other("no space left"));
            }
            self.inner.write(buf)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn a_file_is_moved_aside_only_once_it_ends_with_its_signed_checkpoint() {
        let (dir, file, mut w) = rotating("rf", [6u8; 32]);
        // The first flush writes the records that filled the file; the second, the
        // checkpoint that ends it, fails.
        w.out = Box::new(FailNth {
            inner: trail_file(&file).unwrap(),
            calls: 0,
            fail_at: 2,
        });
        let mut n = 0;
        // Until the file is full (a move aside would start a new one: at most 100).
        while w.written < 2000 && n < 100 {
            w.write_event(&call(&format!("tool{n}")));
            n += 1;
        }
        assert!(!dir.join("a.jsonl.1").exists(), "moved aside unsigned");
        for _ in 0..3 {
            w.write_event(&call(&format!("tool{n}")));
            n += 1;
        }
        w.checkpoint_if_new();
        drop(w);
        let older = std::fs::read_to_string(dir.join("a.jsonl.1")).unwrap();
        let newest = std::fs::read_to_string(&file).unwrap();
        let checked = verify(&older, Some(&public([6u8; 32]))).unwrap();
        assert_eq!(checked.unsigned_tail, 0, "{older}");
        let gap = older
            .lines()
            .find(|l| l.contains(r#""kind":"gap""#))
            .unwrap();
        assert_eq!(members(gap).unwrap()["lost"], 1, "the lost checkpoint");
        let v_new = verify(&newest, Some(&public([6u8; 32]))).unwrap();
        assert_eq!(
            v_new.anchor,
            sha256_hex(older.lines().last().unwrap().as_bytes())
        );
        let calls = |t: &str| t.lines().filter(|l| l.contains(r#""kind":"call""#)).count();
        assert_eq!(calls(&older) + calls(&newest), n, "every record written");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file that takes `budget` bytes, then fails one write (a full disk), then takes all.
    struct Flaky {
        took: Arc<std::sync::Mutex<Vec<u8>>>,
        budget: Option<usize>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = match &mut self.budget {
                Some(0) => {
                    self.budget = None;
                    return Err(std::io::Error::other("no space left"));
                }
                Some(left) => {
                    let n = buf.len().min(*left);
                    *left -= n;
                    n
                }
                None => buf.len(),
            };
            self.took.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_loses_its_lines_not_the_chain() {
        // The write fails at once, after the file took two lines, or within the third line
        // (which is then finished before anything else); or while a block fills in the middle
        // of a batch (the lines after it are made on the chain's end moved back).
        for (case, (budget_lines, torn_bytes, batch)) in
            [(0, 0, 5), (2, 0, 5), (2, 10, 5), (0, 0, 400)]
                .into_iter()
                .enumerate()
        {
            let took = Arc::new(std::sync::Mutex::new(Vec::new()));
            let recent = Recent::default();
            let mut w = Writer::open(
                &AuditSettings {
                    file: None,
                    ..settings(Path::new("unused"), [5u8; 32], 10_000)
                },
                Arc::default(),
                recent.clone(),
            )
            .unwrap();
            w.out = Box::new(Flaky {
                took: took.clone(),
                budget: None,
            });
            for n in 0..3 {
                w.write_event(&call(&format!("before{n}")));
            }
            w.flush();
            let before = took.lock().unwrap().len();
            let pad = "p".repeat(300);
            if batch > 100 {
                // Fails the flush a full block makes.
                w.out = Box::new(Flaky {
                    took: took.clone(),
                    budget: Some(0),
                });
            }
            for n in 0..batch {
                let name = format!("lost{n}");
                w.write_event(&Event {
                    principal: Some(if batch > 100 { &pad } else { "alice" }),
                    ..call(&name)
                });
            }
            if batch <= 100 {
                let budget = w.lines[..budget_lines].last().map_or(0, |l| l.end) + torn_bytes;
                w.out = Box::new(Flaky {
                    took: took.clone(),
                    budget: Some(budget),
                });
                w.flush();
                assert_eq!(took.lock().unwrap().len(), before + budget, "case {case}");
            }
            w.write_event(&call("after"));
            w.checkpoint_if_new();
            drop(w);
            let text = String::from_utf8(took.lock().unwrap().clone()).unwrap();
            let checked = verify(&text, Some(&public([5u8; 32])))
                .unwrap_or_else(|b| panic!("case {case}: {b} in\n{text}"));
            let names: Vec<String> = text
                .lines()
                .filter_map(|l| members(l).unwrap().get("name").cloned())
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            // The loss is told, in the chain, after what the file took.
            let gap = text
                .lines()
                .find(|l| l.contains(r#""kind":"gap""#))
                .unwrap();
            let lost = members(gap).unwrap()["lost"].as_u64().unwrap();
            let made = names.iter().filter(|n| n.starts_with("lost")).count();
            assert_eq!(made as u64 + lost, batch as u64, "case {case}: {text}");
            assert!(lost > 0, "case {case}");
            if batch <= 100 {
                let mut want: Vec<String> = (0..3).map(|n| format!("before{n}")).collect();
                let finished = budget_lines + usize::from(torn_bytes > 0);
                want.extend((0..finished).map(|n| format!("lost{n}")));
                want.push("after".into());
                assert_eq!(names, want, "case {case}: {text}");
            }
            assert_eq!(names.last().map(String::as_str), Some("after"));
            assert_eq!(checked.last_seq, checked.first_seq + checked.records - 1);
            assert_eq!(checked.unsigned_tail, 0, "case {case}: the end is signed");
            // The views show only what the file took.
            let audit = Audit {
                recent,
                ..Default::default()
            };
            let shown = audit.recent(View::All, usize::MAX);
            assert!(
                shown
                    .iter()
                    .all(|l| text.contains(std::str::from_utf8(l).unwrap())),
                "case {case}: a view shows a line the file lacks"
            );
        }
    }

    /// A writer of a new trail in a directory of its own (named by `tag`), whose file is
    /// moved aside past 2,000 bytes.
    fn rotating(tag: &str, seed: [u8; 32]) -> (PathBuf, PathBuf, Writer) {
        let dir =
            std::env::temp_dir().join(format!("gatehouse-audit-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.jsonl");
        let mut s = settings(&file, seed, 1000);
        s.max_bytes = 2000;
        let w = Writer::open(&s, Arc::default(), Arc::default()).unwrap();
        (dir, file, w)
    }

    #[test]
    fn files_rotate_and_the_chain_goes_on_across_them() {
        let (dir, file, mut w) = rotating("r", [1u8; 32]);
        for n in 0..40 {
            w.write_event(&call(&format!("tool{n}")));
        }
        w.checkpoint_if_new();
        drop(w);
        let newest = std::fs::read_to_string(&file).unwrap();
        let older = std::fs::read_to_string(dir.join("a.jsonl.1")).unwrap();
        let v_old = verify(&older, None).unwrap();
        let v_new = verify(&newest, None).unwrap();
        // The newest file starts where the one before it ended.
        let last_old = older.lines().last().unwrap();
        assert_eq!(v_new.anchor, sha256_hex(last_old.as_bytes()));
        assert!(v_old.records > 0 && v_new.records > 0);
        assert!(!dir.join("a.jsonl.4").exists(), "at most `keep` old files");
        // Readable by this user only, the first file as those made at each rotation.
        use std::os::unix::fs::PermissionsExt;
        for name in ["a.jsonl", "a.jsonl.1", "a.jsonl.3"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
        }
        // Each file moved aside ends with a signed checkpoint (checkpoint_every is 1000 here):
        // its tail cannot be rewritten without the key.
        let public = Ed25519KeyPair::from_seed_unchecked(&[1u8; 32]).unwrap();
        for n in 1..=3 {
            let text = std::fs::read_to_string(dir.join(format!("a.jsonl.{n}"))).unwrap();
            let v = verify(&text, Some(public.public_key().as_ref())).unwrap();
            assert_eq!(v.unsigned_tail, 0, "a.jsonl.{n}");
            assert!(
                text.lines()
                    .last()
                    .unwrap()
                    .contains(r#""kind":"checkpoint""#)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
