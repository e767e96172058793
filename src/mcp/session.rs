//! Downstream sessions: one per `Mcp-Session-Id`, owning a [`Link`] to every upstream.
//!
//! The session remaps ids of server→client requests (so answers find their upstream), tracks
//! in-flight client requests for cancellation, and routes server messages to the stream of the
//! request they relate to, else to the client's GET stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Claims;
use crate::config::profiles::ProfileConfig;
use crate::mcp::jsonrpc::{self, Kind, Message, MethodName, Outcome, code};
use crate::mcp::list_page::ListPage;
use crate::mcp::param_headers::ToolHeaders;
use crate::mcp::profile::Profile;
use crate::mcp::session_token;
use crate::mcp::subscriptions::{self, Queued, Subscriptions, Topic};
use crate::topology::Topology;
use crate::upstream::event_sink::OnTheWay;
use crate::upstream::token_exchange::{CallerToken, Subject};
use crate::upstream::{EventSink, Link, Recipient, Route};

/// The policy stage's say over what servers send to this session's client (notifications and
/// requests): pass a message as it is, rewrite it, or drop it. Implemented above this layer
/// (by the plugin chains) and handed in, so sessions need not know about plugins.
pub trait MessagePolicy: Send + Sync {
    /// Whether any policy applies now (else messages take the direct path).
    fn active(&self) -> bool;
    /// `None` drops the message; `Some` is what the client receives.
    fn server_message<'a>(
        &'a self,
        session: &'a Session,
        index: usize,
        msg: Message,
    ) -> BoxFuture<'a, Option<Message>>;
    /// What upstream `index` is sent for the client's answer (`outcome`) to its request
    /// `method`: `None` the answer as it is, `Some` another (rewritten, or an error that says
    /// the answer was refused).
    fn client_answer<'a>(
        &'a self,
        session: &'a Session,
        index: usize,
        method: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Option<Outcome>>;
}

/// A server's request waiting for the client's answer.
struct WaitingAnswer {
    /// The upstream that asked.
    index: usize,
    /// The server's own id for it.
    original: Bytes,
    /// The id the client was sent.
    wire: Bytes,
    /// What it asks: the policy judges the answer as that method's.
    method: MethodName,
}

/// How a session's upstream sessions start.
pub struct UpstreamInit {
    /// The `initialize` params each upstream is sent (the client's capabilities and info).
    pub params: Bytes,
    /// Open the server→client streams at once (the client offers roots, which servers may
    /// ask for at any time).
    pub eager_listen: bool,
    /// Seals the ids of servers' requests to the client, so that an answer reaches the upstream
    /// session that asked from any replica (portable sessions only).
    pub portable: Option<Arc<crate::mcp::seal::Sealer>>,
}

/// Server messages waiting for the policy stage, per session (in order; bounded).
const POLICY_QUEUE: usize = 256;

/// Why a server's request is not put to a client whose queues are full.
const QUEUES_FULL: &str = "this client's queues hold too much of what servers said that it has not read yet, so this request was not put to it";

/// Capability bits an upstream advertised.
pub mod caps {
    /// `tools`.
    pub const TOOLS: u8 = 1;
    /// `prompts`.
    pub const PROMPTS: u8 = 2;
    /// `resources`.
    pub const RESOURCES: u8 = 4;
    /// `logging`.
    pub const LOGGING: u8 = 8;
    /// `completions`.
    pub const COMPLETIONS: u8 = 16;
    /// Not yet known (never connected).
    pub const UNKNOWN: u8 = 0x80;
}

/// Who is calling, as the policy stage sees it: the principal, what its token says, and the
/// session.
#[derive(Clone)]
pub struct Caller<'a> {
    /// The authenticated principal, if any.
    pub principal: Option<&'a Arc<str>>,
    /// The groups and scopes of the token of the session's latest request.
    pub claims: Arc<Claims>,
    /// The session id.
    pub session_id: &'a Arc<str>,
    /// The profile the session was opened on.
    pub profile: Option<&'a Arc<str>>,
}

/// A fresh, unguessable session id (192 random bits, URL-safe).
pub fn new_id() -> Arc<str> {
    use base64::Engine;
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(raw)
        .into()
}

/// What the latest request's token says, shared with the session's links: an upstream that
/// exchanges the caller's token reads it here for each request.
struct HeldClaims(arc_swap::ArcSwap<Claims>);

impl CallerToken for HeldClaims {
    fn current(&self) -> Option<Subject> {
        let claims = self.0.load();
        claims.token.as_ref().map(|t| Subject {
            token: t.shared(),
            expires_at: t.expires_at(),
        })
    }
}

/// One client session.
pub struct Session {
    /// The `Mcp-Session-Id`.
    pub id: Arc<str>,
    /// Who opened it; later requests must come from the same principal.
    pub principal: Option<Arc<str>>,
    /// Negotiated protocol revision.
    pub protocol_version: &'static str,
    /// What the latest request's token says (a session outlives tokens: a refreshed or
    /// stepped-up token brings new scopes).
    claims: Arc<HeldClaims>,
    topology: Arc<Topology>,
    /// The profile it was opened on (`/mcp/{profile}`): what of the topology it sees.
    profile: Option<Profile>,
    links: Box<[Link]>,
    upstream_caps: Box<[AtomicU8]>,
    /// Per upstream: the generations of its tool list and of its connection that were
    /// checked against the pins (held while checking, so that concurrent calls wait for the
    /// one check).
    tools_pinned: Box<[tokio::sync::Mutex<(u64, u64)>]>,
    /// Per upstream: bumped by each `notifications/tools/list_changed`.
    tools_generation: Box<[AtomicU64]>,
    inflight: Mutex<InFlightTable>,
    next_ticket: AtomicU64,
    /// The `capabilities` the client declared (raw JSON object): a server may ask it nothing
    /// else. `None` in a stateless session, whose requests each declare their own (checked by
    /// `stateless.rs`, per request).
    client_capabilities: Option<Bytes>,
    /// Server requests waiting for the client's answer, by the session's number for them.
    server_requests: Mutex<HashMap<u64, WaitingAnswer>>,
    /// Seals server request ids when the session is portable (answered on any replica).
    portable: Option<Arc<crate::mcp::seal::Sealer>>,
    /// When a portable session's id stops being honored (Unix ms; `u64::MAX`: never), here as
    /// on any replica that would restore it.
    honored_until_ms: AtomicU64,
    next_server_request: AtomicU64,
    listen: Mutex<Listen>,
    epoch: Instant,
    last_active_ms: AtomicU64,
    /// When a read of an unknown resource last had every server's resource lists walked;
    /// held while a walk runs.
    resource_walk: crate::mcp::resource_walk::ResourceWalks,
    busy: AtomicUsize,
    /// Set once the session has ended: every stream and task it owns watches it.
    ended: tokio::sync::watch::Sender<bool>,
    policy: Option<Arc<dyn MessagePolicy>>,
    /// Feeds the task that runs server messages through the policy, one at a time in arrival
    /// order (plugin hooks are async; the upstream readers that deliver messages are not).
    policy_queue: std::sync::OnceLock<mpsc::Sender<PolicyItem>>,
    /// What list handlers made of upstream first pages (see [`Session::merged_page`]).
    merged: Mutex<Vec<MergedPage>>,
    /// What [`Self::list_page`] made of each upstream's kept first pages: (upstream, method).
    list_pages: Mutex<Vec<(usize, &'static str, Arc<ListPage>)>>,
    /// Listen streams (`subscriptions/listen`) of a stateless session's clients.
    pub subscriptions: Subscriptions,
    /// Its POST response streams, kept for resumption (`Last-Event-ID`).
    pub streams: crate::mcp::resume::Streams,
    /// Each upstream's tool arguments mirrored in `Mcp-Param-*` headers, once read, with the
    /// link generation they were read on (stateless sessions only).
    tool_headers: Mutex<Vec<Option<ReadHeaders>>>,
    /// One reading of each server's tool list at a time (concurrent calls wait for it, not
    /// ask again).
    tool_headers_reading: Box<[tokio::sync::Mutex<()>]>,
    /// Paces the log lines for server messages and answers dropped (the policy stage is behind,
    /// or the queues or the answers' room are full).
    dropped_logs: crate::log_rate::LogRate,
    /// Bytes its queues hold of what servers said that its clients have not read.
    queued: crate::mcp::queued_bytes::QueuedBytes,
    /// Bytes its answers hold on their way to clients that have not taken them yet.
    answers: Arc<crate::mcp::queued_bytes::AnswerBytes>,
    weak: Weak<Session>,
}

/// An upstream's tool-argument marks, the link generation they were read on, and, for a list
/// that could not be read to its end, when that reading ended.
type ReadHeaders = (u64, Arc<ToolHeaders>, Option<Instant>);

/// Most pages of a tool list read for its marks.
const MAX_TOOL_LIST_PAGES: usize = 20;

/// An upstream's first page of a list, as the gateway rewrote it for this session: the items
/// (renamed, comma-separated) and the upstream's next cursor.
struct MergedPage {
    index: usize,
    method: &'static str,
    /// The page it was made from, held so that its identity (address) stays unique.
    page: Bytes,
    items: Bytes,
    cursor: Option<String>,
}

struct SessionRecipient(Weak<Session>);

impl Recipient for SessionRecipient {
    fn deliver(&self, index: usize, route: Route, msg: Message) {
        if let Some(s) = self.0.upgrade() {
            s.on_server_message(index, route, msg);
        }
    }
}

/// Whether `msg` is a `notifications/resources/updated` about a resource `profile` hides.
fn hidden_resource_update(profile: &Profile, index: usize, msg: &Message) -> bool {
    updated_uri(msg).is_some_and(|uri| uri.is_none_or(|uri| !profile.shows_resource(index, &uri)))
}

/// The URI of a `notifications/resources/updated` (`Some(None)`: one that names none the
/// gateway can read); `None` for any other message.
fn updated_uri(msg: &Message) -> Option<Option<std::borrow::Cow<'_, str>>> {
    let Kind::Notification { method, params } = &msg.kind else {
        return None;
    };
    if &**method != "notifications/resources/updated" {
        return None;
    }
    #[derive(Deserialize)]
    struct Updated<'a> {
        #[serde(borrow)]
        uri: std::borrow::Cow<'a, str>,
    }
    Some(
        params
            .as_deref()
            .filter(|p| crate::mcp::lookalike::check_members(p, &["uri"], "params").is_ok())
            .and_then(|p| serde_json::from_slice::<Updated<'_>>(p).ok())
            .map(|u| u.uri),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// Creates a session with a link to every server of `topology` (which it keeps for its
    /// lifetime), seeing what `profile` shows of them (everything without one);
    /// `upstream.params` is what each upstream is sent.
    #[allow(clippy::too_many_arguments)] // each is a different part of what the session is
    pub fn new(
        id: Arc<str>,
        principal: Option<Arc<str>>,
        protocol_version: &'static str,
        topology: Arc<Topology>,
        profile: Option<&ProfileConfig>,
        upstream: UpstreamInit,
        epoch: Instant,
        policy: Option<Arc<dyn MessagePolicy>>,
        answers: &Arc<crate::mcp::queued_bytes::AnswerRoom>,
    ) -> Arc<Session> {
        let UpstreamInit {
            params: init_params,
            eager_listen,
            portable,
        } = upstream;
        let profile = profile.map(|p| Profile::new(p, &topology.router));
        let claims = Arc::new(HeldClaims(arc_swap::ArcSwap::default()));
        Arc::new_cyclic(|weak: &Weak<Session>| {
            let sink: Arc<dyn Recipient> = Arc::new(SessionRecipient(weak.clone()));
            let servers = &topology.servers;
            Session {
                id,
                principal: principal.clone(),
                protocol_version,
                claims: claims.clone(),
                links: {
                    let links: Box<[Link]> = servers
                        .iter()
                        .map(|s| {
                            Link::new(
                                s.clone(),
                                principal.clone(),
                                sink.clone(),
                                init_params.clone(),
                                Some(claims.clone() as Arc<dyn CallerToken>),
                            )
                            // Every anonymous stateless caller shares this session.
                            .for_many_callers(
                                principal.is_none()
                                    && protocol_version == crate::mcp::revision::STATELESS,
                            )
                        })
                        .collect();
                    if eager_listen {
                        links
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| profile.as_ref().is_none_or(|p| p.serves(*i)))
                            .for_each(|(_, l)| l.open_listen_stream());
                    }
                    links
                },
                profile,
                upstream_caps: servers
                    .iter()
                    .map(|_| AtomicU8::new(caps::UNKNOWN))
                    .collect(),
                tools_pinned: servers
                    .iter()
                    .map(|_| tokio::sync::Mutex::new((u64::MAX, u64::MAX)))
                    .collect(),
                tools_generation: servers.iter().map(|_| AtomicU64::new(0)).collect(),
                topology: topology.clone(),
                inflight: Mutex::default(),
                next_ticket: AtomicU64::new(0),
                server_requests: Mutex::new(HashMap::new()),
                client_capabilities: (protocol_version != crate::mcp::revision::STATELESS)
                    .then(|| declared_capabilities(&init_params)),
                portable,
                honored_until_ms: AtomicU64::new(u64::MAX),
                next_server_request: AtomicU64::new(1),
                listen: Mutex::new(Listen::default()),
                merged: Mutex::new(Vec::new()),
                list_pages: Mutex::new(Vec::new()),
                subscriptions: Subscriptions::default(),
                streams: crate::mcp::resume::Streams::of(principal.as_ref()),
                tool_headers: Mutex::new(vec![None; servers.len()]),
                tool_headers_reading: (0..servers.len())
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                dropped_logs: crate::log_rate::LogRate::new(5),
                queued: crate::mcp::queued_bytes::QueuedBytes::of(principal.as_ref()),
                answers: Arc::new(crate::mcp::queued_bytes::AnswerBytes::of(
                    answers,
                    principal.as_ref(),
                )),
                epoch,
                last_active_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
                resource_walk: crate::mcp::resource_walk::ResourceWalks::new(servers.len()),
                busy: AtomicUsize::new(0),
                ended: tokio::sync::watch::Sender::new(false),
                policy,
                policy_queue: std::sync::OnceLock::new(),
                weak: weak.clone(),
            }
        })
    }

    /// The session id as logs show it: a prefix, enough to tell sessions apart (a portable id
    /// is a credential on every replica, and is never logged whole).
    pub fn log_id(&self) -> &str {
        log_id(&self.id)
    }

    /// Who calls through this session.
    pub fn caller(&self) -> Caller<'_> {
        Caller {
            principal: self.principal.as_ref(),
            profile: self.profile.as_ref().map(|p| &p.name),
            claims: self.claims.0.load_full(),
            session_id: &self.id,
        }
    }

    /// Keeps what the token of a request of this session says, for the policy stage.
    pub fn hold_claims(&self, claims: &Arc<Claims>) {
        let current = self.claims.0.load();
        if !Arc::ptr_eq(&current, claims) && **current != **claims {
            self.claims.0.store(claims.clone());
        }
    }

    /// The servers and names this session sees (fixed when it opened).
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The profile it was opened on, if any.
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// The name of the profile it was opened on.
    pub fn profile_name(&self) -> Option<&str> {
        self.profile.as_ref().map(|p| &*p.name)
    }

    /// Runs `check` unless upstream `index`'s current tool list was checked already, on its
    /// current connection: a new process (after a crash, a sleep, a redefinition) may offer
    /// other definitions without announcing a change. A check that fails is tried again by
    /// the next call. Concurrent callers wait for one check. `Ok` is the generation of the
    /// link's connection that was checked: the call must go on that one.
    pub async fn pin_check<F, E>(&self, index: usize, check: F) -> Result<u64, E>
    where
        F: Future<Output = Result<(), E>>,
    {
        let (Some(checked), Some(generation), Some(link)) = (
            self.tools_pinned.get(index),
            self.tools_generation.get(index),
            self.links.get(index),
        ) else {
            return Ok(0);
        };
        let mut checked = checked.lock().await;
        let current = (
            generation.load(Ordering::Acquire),
            link.connection_generation(),
        );
        if *checked == current {
            return Ok(current.1);
        }
        check.await?;
        *checked = current;
        Ok(current.1)
    }

    /// Whether the session sees anything of upstream `index`.
    pub fn serves(&self, index: usize) -> bool {
        self.profile.as_ref().is_none_or(|p| p.serves(index))
    }

    /// The upstream and the server's own name of the tool the client calls `public`.
    pub fn resolve_tool<'a>(&'a self, public: &'a str) -> Option<(usize, &'a str)> {
        match &self.profile {
            None => self.topology.router.resolve(public),
            Some(p) => p.tool(&self.topology.router, public),
        }
    }

    /// The upstream and the server's own name of the prompt the client calls `public`.
    pub fn resolve_prompt<'a>(&self, public: &'a str) -> Option<(usize, &'a str)> {
        match &self.profile {
            None => self.topology.router.resolve(public),
            Some(p) => p.prompt(&self.topology.router, public),
        }
    }

    /// Whether the session sees resource (or template) `uri` of upstream `index`.
    pub fn serves_resource(&self, index: usize, uri: &str) -> bool {
        self.profile
            .as_ref()
            .is_none_or(|p| p.shows_resource(index, uri))
    }

    /// The links, indexed like the topology's servers.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Connects upstream `index` if needed and returns its capability bits.
    pub async fn connect(&self, index: usize) -> Result<u8, crate::upstream::UpstreamError> {
        let link = &self.links[index];
        let before = link.generation.load(Ordering::Relaxed);
        link.connection().await?;
        if link.generation.load(Ordering::Relaxed) != before
            || self.upstream_caps[index].load(Ordering::Relaxed) == caps::UNKNOWN
        {
            let bits = link.init_result().map_or(0, |r| capability_bits(&r));
            self.upstream_caps[index].store(bits, Ordering::Relaxed);
        }
        Ok(self.upstream_caps[index].load(Ordering::Relaxed))
    }

    /// Whether upstream `index` is one the orchestrator stops while idle.
    pub fn may_sleep(&self, index: usize) -> bool {
        let server = &self.topology().servers[index];
        server
            .orchestrated
            .as_ref()
            .is_some_and(|o| o.runtime.usage(&server.name).is_some())
    }

    /// The last `initialize` result of upstream `index` while it sleeps (idle) and the gateway
    /// knows what it last offered: what to show instead of waking it.
    pub fn resting(&self, index: usize) -> Option<(Arc<crate::orchestrator::idle::Usage>, Bytes)> {
        let server = &self.topology().servers[index];
        let o = server.orchestrated.as_ref()?;
        let usage = o.runtime.usage(&server.name)?;
        if !usage.is_asleep() {
            return None;
        }
        let init = o.listings.init(&usage)?;
        Some((usage, init))
    }

    /// When a read of an unknown resource last walked every server's resource lists; held
    /// while a walk runs, so that one runs at a time.
    pub fn resource_walk(&self) -> &crate::mcp::resource_walk::ResourceWalks {
        &self.resource_walk
    }

    /// Marks a request running; the returned guard keeps the session from expiring until it
    /// ends, and then marks the session active. (A busy session is never idle: the time its
    /// request began is not needed.)
    pub fn touch(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// How long since its last request ended (zero while one runs).
    pub fn idle_for(&self) -> std::time::Duration {
        if self.is_busy() {
            return std::time::Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)),
        )
    }

    /// Whether its client holds a GET stream open now.
    pub fn is_listening(&self) -> bool {
        lock(&self.listen).is_open()
    }

    /// Whether any replica may serve it (its id is a sealed token).
    pub fn is_portable(&self) -> bool {
        self.portable.is_some()
    }

    /// Honors its id until `ms` (Unix ms) only: a portable id's age bound.
    pub fn honor_until(&self, ms: u64) {
        self.honored_until_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether its id is past the age it is honored to (at `now_ms`, Unix ms).
    pub fn outlived(&self, now_ms: u64) -> bool {
        now_ms > self.honored_until_ms.load(Ordering::Relaxed)
    }

    /// Whether a request is running in the session now.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// True when idle for longer than `idle_ms` with nothing running and no open GET stream.
    pub fn expired(&self, now_ms: u64, idle_ms: u64) -> bool {
        let idle = now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)) > idle_ms;
        let listening = lock(&self.listen).is_open();
        idle && self.busy.load(Ordering::Relaxed) == 0 && !listening
    }

    /// Whether the client can open a GET stream for messages unrelated to a request (a
    /// stateless client cannot: what finds no request's stream is not kept for it).
    pub fn has_listen_stream(&self) -> bool {
        self.protocol_version != crate::mcp::revision::STATELESS
    }

    /// Registers an in-flight client request so `notifications/cancelled` can reach it; the
    /// entry goes when the returned guard drops (the call ended, or the client went away).
    /// Refused past [`MAX_INFLIGHT`] requests at once.
    pub fn track(self: &Arc<Self>, id: Bytes) -> Result<InFlight, TooBusy> {
        let (tx, rx) = oneshot::channel();
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let mut inflight = lock(&self.inflight);
        // Counted apart from the ids: a client that sends many requests under one id must not
        // have them counted as one.
        if inflight.count >= MAX_INFLIGHT {
            return Err(TooBusy(MAX_INFLIGHT));
        }
        inflight.count += 1;
        inflight.by_id.insert(id.clone(), (ticket, tx));
        Ok(InFlight {
            session: self.clone(),
            id,
            ticket,
            cancelled: Some(rx),
        })
    }

    /// Counts a request no `notifications/cancelled` reaches (a list that asks every upstream)
    /// against [`MAX_INFLIGHT`], without taking its id from a call under the same id.
    pub fn count(self: &Arc<Self>) -> Result<InFlight, TooBusy> {
        let mut inflight = lock(&self.inflight);
        if inflight.count >= MAX_INFLIGHT {
            return Err(TooBusy(MAX_INFLIGHT));
        }
        inflight.count += 1;
        Ok(InFlight {
            session: self.clone(),
            id: Bytes::new(),
            // No request's ticket: its drop removes no entry.
            ticket: u64::MAX,
            cancelled: None,
        })
    }

    /// Client requests in flight now.
    pub fn inflight(&self) -> usize {
        lock(&self.inflight).count
    }

    /// Cancels an in-flight request by its client id.
    pub fn cancel(&self, id: &[u8]) {
        if let Some((_, tx)) = lock(&self.inflight).by_id.remove(id) {
            let _ = tx.send(());
        }
    }

    /// Installs the client's GET stream, flushing what waited for it; `None` if one is open,
    /// else the stream's number (to let go of it with [`Session::close_listen_stream`]).
    pub fn open_listen_stream(&self, sink: EventSink) -> Option<u64> {
        let mut listen = lock(&self.listen);
        // Checked under the lock `end` takes after setting `ended`: no sink outlives the end.
        if *self.ended.borrow() {
            return None;
        }
        if listen.is_open() {
            return None;
        }
        while let Some(frame) = listen.backlog.pop_front() {
            if sink.try_send(frame).is_err() {
                break;
            }
        }
        listen.sink = Some(sink);
        listen.stream += 1;
        let stream = listen.stream;
        drop(listen);
        for (i, link) in self.links.iter().enumerate() {
            if self.serves(i) {
                link.open_listen_stream();
            }
        }
        Some(stream)
    }

    /// Lets go of GET stream `stream` while its body lives on (its client stopped reading):
    /// the session counts as not listening (it may idle out, and the client may open another
    /// stream), and what comes next waits for the next stream, as before the first. The
    /// notices still in the old stream's queue no longer stand for the new one's.
    pub fn close_listen_stream(&self, stream: u64) {
        let mut listen = lock(&self.listen);
        if listen.stream == stream && listen.sink.is_some() {
            listen.sink = None;
            listen.queued = Queued::default();
        }
    }

    /// Relays the client's answer to a server→client request back to its upstream, as the
    /// policy judges it. In a portable session the id is sealed and names the upstream session
    /// that asked, so an answer to a request another replica relayed goes straight to that
    /// upstream session.
    pub async fn on_client_response(&self, id: &[u8], outcome: &Outcome) -> bool {
        self.answer(id, outcome, true).await
    }

    /// Answers a server→client request on the client's behalf (the gateway's own answer: a
    /// `ping`, a refusal, a question the client left unanswered): not judged as the client's.
    pub async fn answer_for_client(&self, id: &[u8], outcome: &Outcome) -> bool {
        self.answer(id, outcome, false).await
    }

    /// Where the answer to the request the client knows as `id` goes: decided before it is
    /// judged (`judged`), so an answer that reaches nobody costs no plugin call nor audit.
    async fn answer(&self, id: &[u8], outcome: &Outcome, judged: bool) -> bool {
        if let Some(n) = jsonrpc::id_as_u64(id) {
            let Some(waiting) = lock(&self.server_requests).remove(&n) else {
                return false;
            };
            let index = waiting.index;
            let outcome = self
                .screened(judged, index, Some(&waiting.method), outcome)
                .await;
            self.links[index].respond(&waiting.original, &outcome).await;
            return true;
        }
        let Some(asked) = self
            .portable
            .as_ref()
            .and_then(|sealer| session_token::open_request_id(sealer, id))
        else {
            return false;
        };
        // Only this session's, and only while its call may still be waiting.
        if asked.p.as_deref() != self.principal.as_deref()
            || asked.g != session_token::digest(&self.id)
            || asked.e < session_token::now_ms()
        {
            return false;
        }
        let Some(index) = self
            .topology
            .servers
            .iter()
            .position(|s| *s.name == *asked.s)
        else {
            return false;
        };
        let local = {
            let mut pending = lock(&self.server_requests);
            match pending.get(&asked.n) {
                Some(w) if w.index == index && w.wire[..] == *id => pending.remove(&asked.n),
                _ => None,
            }
        };
        let original = Bytes::from(asked.o);
        if let Some(waiting) = local {
            let outcome = self
                .screened(judged, index, Some(&waiting.method), outcome)
                .await;
            self.links[index].respond(&original, &outcome).await;
            return true;
        }
        // Not asked through this replica: only an HTTP upstream session of another replica's
        // is reachable from here (a process, or a session of this replica's own, would take
        // the answer for a request of its own with the same id).
        match asked.u {
            Some(u)
                if self.links[index]
                    .upstream_session()
                    .is_none_or(|(own, _)| own != u) =>
            {
                let outcome = self
                    .screened(judged, index, asked.m.as_deref(), outcome)
                    .await;
                self.links[index]
                    .respond_in(&u, asked.v.as_deref(), &original, &outcome)
                    .await;
                true
            }
            _ => {
                tracing::info!(session = %self.log_id(), upstream = %asked.s, "dropped an answer to a server request no longer waiting here");
                false
            }
        }
    }

    /// The policy stage over what servers send and clients answer, when there is one.
    pub fn policy(&self) -> Option<&Arc<dyn MessagePolicy>> {
        self.policy.as_ref()
    }

    /// The client's answer to upstream `index`'s request `method`, as the policy has it go
    /// back (when `judged`: the gateway's own answers are not the client's): the on-request
    /// chains judge what goes to a server, answers included. An answer
    /// whose request's method is unknown (its id sealed by a version that did not carry it)
    /// cannot be judged, and is refused while a policy judges answers.
    async fn screened<'a>(
        &self,
        judged: bool,
        index: usize,
        method: Option<&str>,
        outcome: &'a Outcome,
    ) -> std::borrow::Cow<'a, Outcome> {
        let Some(policy) = self.policy.as_ref().filter(|p| judged && p.active()) else {
            return std::borrow::Cow::Borrowed(outcome);
        };
        let Some(method) = method else {
            return std::borrow::Cow::Owned(Outcome::Error(jsonrpc::error_object(
                code::INTERNAL_ERROR,
                "the gateway refused the client's answer: it cannot tell which request the answer is for, so it cannot judge it",
            )));
        };
        match policy.client_answer(self, index, method, outcome).await {
            None => std::borrow::Cow::Borrowed(outcome),
            Some(other) => std::borrow::Cow::Owned(other),
        }
    }

    /// What the policy makes of a request upstream `index` would put to the client (a 2026
    /// server's input request): its params, maybe rewritten, or `None` if withheld.
    pub async fn screen_request(
        &self,
        index: usize,
        method: &str,
        params: Option<&[u8]>,
    ) -> Option<Option<Bytes>> {
        let Some(policy) = self.policy.as_ref().filter(|p| p.active()) else {
            return Some(params.map(Bytes::copy_from_slice));
        };
        let msg = jsonrpc::parse(jsonrpc::request(b"0", method, params)).ok()?;
        match policy.server_message(self, index, msg).await?.kind {
            Kind::Request { params, .. } => Some(params),
            _ => None,
        }
    }

    /// Which arguments of upstream `index`'s tools are mirrored in headers: its whole tool list
    /// read once (at most 20 pages, within one call's deadline), and again after it announces
    /// a change or reconnects. What a list that cannot be read to its end marks is used for
    /// [`crate::mcp::param_headers::UNFINISHED_LIST_KEPT`] (the call goes on; the server judges it).
    pub async fn tool_headers(&self, index: usize) -> Arc<ToolHeaders> {
        let link = &self.links[index];
        let known = || {
            let generation = link.generation.load(Ordering::Acquire);
            lock(&self.tool_headers)[index]
                .as_ref()
                .filter(|(g, _, unfinished)| {
                    *g == generation
                        && unfinished.is_none_or(|t| {
                            t.elapsed() < crate::mcp::param_headers::UNFINISHED_LIST_KEPT
                        })
                })
                .map(|(_, h, _)| h.clone())
        };
        if let Some(h) = known() {
            return h;
        }
        // One reading per server: a server slow to list holds up no other server's calls.
        let _reading = self.tool_headers_reading[index].lock().await;
        if let Some(h) = known() {
            return h;
        }
        // Connected first: the marks are of this connection's list, kept under its generation
        // (unless it changes, or the server announces a change, while the list is read).
        if self.connect(index).await.is_err() {
            return Arc::default();
        }
        let before = (
            link.generation.load(Ordering::Acquire),
            self.tools_generation[index].load(Ordering::Acquire),
        );
        let mut headers = ToolHeaders::default();
        let read = async {
            let mut page = link.first_page("tools/list").await;
            for _ in 0..MAX_TOOL_LIST_PAGES {
                let Ok(Outcome::Result(result)) = &page else {
                    return false;
                };
                match headers.learn(result) {
                    Ok(None) => return true,
                    Ok(Some(cursor)) => {
                        let params = serde_json::json!({ "cursor": cursor }).to_string();
                        page = link
                            .call(
                                "tools/list",
                                Some(params.as_bytes()),
                                crate::upstream::CallOpts::default(),
                            )
                            .await;
                    }
                    Err(_) => return false,
                }
            }
            false
        };
        let deadline = self.topology.servers[index].config.call_timeout;
        let complete = tokio::time::timeout(deadline, read).await.unwrap_or(false);
        let after = (
            link.generation.load(Ordering::Acquire),
            self.tools_generation[index].load(Ordering::Acquire),
        );
        let headers = Arc::new(headers);
        if after != before {
            return headers;
        }
        let generation = before.0;
        let unfinished = (!complete).then(Instant::now);
        lock(&self.tool_headers)[index] = Some((generation, headers.clone(), unfinished));
        headers
    }

    /// Bytes its queues hold of what servers said that its clients have not read (counted
    /// frames only: see [`crate::mcp::queued_bytes`]).
    pub fn queued_bytes(&self) -> usize {
        self.queued.held()
    }

    /// `frame` (an answer the gateway queues for a client that may not read it yet), counted
    /// with what the session's queues hold; `None` when there is no room for it.
    pub fn admit_queued(&self, frame: Bytes) -> Option<Bytes> {
        self.queued.admit(frame)
    }

    /// `frame` (the answer to a request, written next to its client), counted with what the
    /// session's answers hold until the client has taken it. Past what the gateway's room for
    /// them (`mcp.max_answers_bytes`) leaves the session, the client is told instead (-32012):
    /// the request ran, but its answer is not kept for a client that may never read it.
    pub fn bounded_answer(&self, frame: Bytes) -> Bytes {
        let frame = match self.answers.admit(frame) {
            Ok(frame) => return frame,
            Err(frame) => frame,
        };
        if let Some(n) = self.dropped_logs.admit() {
            let more = crate::log_rate::held_back(n);
            tracing::warn!(
                session = %self.log_id(),
                bytes = frame.len(),
                "dropped an answer: no room for it in mcp.max_answers_bytes{more}"
            );
        }
        let message = format!(
            "the request ran, but its answer ({} bytes) was dropped: the gateway keeps at most \
             mcp.max_answers_bytes of answers their clients have not taken yet, and this \
             caller at most {} of it",
            frame.len(),
            self.answers.share(),
        );
        jsonrpc::error_response(jsonrpc::framed_id(&frame), code::TOO_BUSY, &message)
    }

    /// `response` (one of the session's streams), its events counted where its answers are:
    /// past the room, the stream ends before the event (a resumable one is resumed later).
    pub fn counted_stream(
        &self,
        response: http::Response<crate::body::Body>,
    ) -> http::Response<crate::body::Body> {
        crate::body::with_room(response, self.answers.clone())
    }

    /// Whether the session has ended.
    pub fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Resolves once the session has ended (at once if it already has).
    pub fn ended(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.ended.subscribe();
        async move {
            let _ = rx.wait_for(|ended| *ended).await;
        }
    }

    /// The rewritten items and next cursor of upstream `index`'s first page of `method`, when
    /// `page` is the very page (the same buffer, from the link's list cache) they were made from.
    pub fn merged_page(
        &self,
        index: usize,
        method: &'static str,
        page: &Bytes,
    ) -> Option<(Bytes, Option<String>)> {
        lock(&self.merged)
            .iter()
            .find(|m| {
                m.index == index
                    && m.method == method
                    && m.page.as_ptr() == page.as_ptr()
                    && m.page.len() == page.len()
            })
            .map(|m| (m.items.clone(), m.cursor.clone()))
    }

    /// Upstream `index`'s first page of `method` (`page`) read for its items under `key`: read
    /// once while the upstream's link keeps that page (until the server announces a change),
    /// and each time otherwise. `None`: not a list page.
    pub fn list_page(
        &self,
        index: usize,
        method: &'static str,
        key: &str,
        page: Bytes,
    ) -> Option<Arc<ListPage>> {
        let same =
            |p: &ListPage| p.page().as_ptr() == page.as_ptr() && p.page().len() == page.len();
        if let Some((_, _, kept)) = lock(&self.list_pages)
            .iter()
            .find(|(i, m, p)| *i == index && *m == method && same(p))
        {
            return Some(kept.clone());
        }
        let keep = self
            .links
            .get(index)
            .is_some_and(|link| link.keeps_page(method, &page));
        let read = Arc::new(ListPage::read(page, key)?);
        if keep {
            // Held with its page, whose address then names no other page while it is kept.
            let mut kept = lock(&self.list_pages);
            kept.retain(|(i, m, _)| *i != index || *m != method);
            kept.push((index, method, read.clone()));
        }
        Some(read)
    }

    /// Keeps what a list handler made of upstream `index`'s first page of `method`.
    pub fn keep_merged_page(
        &self,
        index: usize,
        method: &'static str,
        page: Bytes,
        items: Bytes,
        cursor: Option<String>,
    ) {
        // Only a page its link keeps is met again: holding a page fetched for this list alone
        // (a server that does not announce changes) would only hold memory, per session.
        if !self
            .links
            .get(index)
            .is_some_and(|link| link.keeps_page(method, &page))
        {
            return;
        }
        let mut merged = lock(&self.merged);
        merged.retain(|m| m.index != index || m.method != method);
        merged.push(MergedPage {
            index,
            method,
            page,
            items,
            cursor,
        });
    }

    /// Ends the session's client streams and the tasks that feed them, at once.
    pub fn end(&self) {
        self.subscriptions.close();
        self.streams.close();
        self.ended.send_replace(true);
        *lock(&self.listen) = Listen::default();
    }

    /// Ends the session's streams, then every upstream session.
    pub async fn close(&self) {
        self.end();
        futures_util::future::join_all(self.links.iter().map(Link::close)).await;
    }

    fn on_server_message(self: Arc<Self>, index: usize, route: Route, mut msg: Message) {
        let most = match &msg.kind {
            Kind::Response { .. } => return,
            Kind::Notification { .. } => MAX_SERVER_NOTIFICATION,
            Kind::Request { .. } => MAX_SERVER_REQUEST,
        };
        // What a server says unasked waits in this session's queues (up to hundreds of
        // messages) until a client reads it: bounded, so that a server cannot make them hold
        // gigabytes.
        if msg.frame.len() > most {
            tracing::debug!(session = %self.log_id(), upstream = %self.topology.servers[index].name, bytes = msg.frame.len(), "dropped a server message over {most} bytes");
            if let Kind::Request { id, .. } = msg.kind {
                let error = jsonrpc::error_object(
                    code::INTERNAL_ERROR,
                    &format!("the gateway passes on requests of at most {most} bytes"),
                );
                let server = self.topology.servers[index].clone();
                server.refuse_in_background(async move {
                    self.links[index].respond(&id, &Outcome::Error(error)).await;
                });
            }
            return;
        }
        // The client gets what the gateway read and checked, not the server's frame: members
        // beside `method` and `params` that a lenient client could read in their place
        // (`PARAMS`, `Method`) do not reach it.
        if let Kind::Notification { method, params } = &msg.kind {
            msg.frame = jsonrpc::notification(method, params.as_deref());
        }
        // A profile's session hears nothing of what it does not see (a shared upstream session
        // speaks to all its members).
        if let Some(profile) = &self.profile
            && (!profile.serves(index) || hidden_resource_update(profile, index, &msg))
        {
            return;
        }
        let Some(msg) = self.clone().counted(index, msg) else {
            return;
        };
        // A server speaks only of its own resources: an update of a URI the gateway routes to
        // another server (reads of it go there) would have the client re-read that server's
        // resource, or a listen stream watching it wake, on a stranger's word.
        match updated_uri(&msg) {
            Some(Some(uri))
                if let crate::mcp::router::ResourceRoute::One(owner) = self
                    .topology
                    .router
                    .resource(&uri, |i| self.serves(i), |_| true)
                    && owner != index =>
            {
                tracing::debug!(session = %self.log_id(), upstream = %self.topology.servers[index].name, "dropped an update of another server's resource");
                return;
            }
            // An update whose URI the gateway cannot read (none, a second `uri`, a `URI`)
            // could name anything to a client that reads it otherwise.
            Some(None) => {
                tracing::debug!(session = %self.log_id(), upstream = %self.topology.servers[index].name, "dropped an update whose uri cannot be read");
                return;
            }
            _ => {}
        }
        // Before any policy: a withheld announcement must still invalidate the cache.
        if let Kind::Notification { method, .. } = &msg.kind
            && method.ends_with("/list_changed")
            && let Some(link) = self.links.get(index)
        {
            link.list_changed(method);
            if &**method == "notifications/tools/list_changed" {
                lock(&self.tool_headers)[index] = None;
                self.tools_generation[index].fetch_add(1, Ordering::AcqRel);
            }
        }
        if self.policy.as_ref().is_some_and(|p| p.active()) {
            let queue = self.policy_queue.get_or_init(|| self.spawn_policy_task());
            // The call the message is about answers only once the message has reached it (or
            // the policy withheld it): the answer must not overtake what came before it.
            let held = route.related.as_ref().and_then(EventSink::on_the_way);
            if let Err(full) = queue.try_send((index, route, msg, held)) {
                if let Some(n) = self.dropped_logs.admit() {
                    let more = crate::log_rate::held_back(n);
                    tracing::warn!(session = %self.log_id(), "dropped a server message: the policy stage is behind{more}");
                }
                // A request still gets an answer: dropped silently, it would leave its server
                // (and the call it asks for) waiting until the call's deadline; and a server
                // that floods the queue could so stall any other server's requests.
                let (index, _, msg, _) = full.into_inner();
                if let Kind::Request { id, .. } = msg.kind {
                    let error = jsonrpc::error_object(
                        code::INTERNAL_ERROR,
                        "the gateway's policy stage is behind on this session's server messages, so this request was not put to the client",
                    );
                    let server = self.topology.servers[index].clone();
                    server.refuse_in_background(async move {
                        self.links[index].respond(&id, &Outcome::Error(error)).await;
                    });
                }
            }
            return;
        }
        self.route_server_message(index, route, msg);
    }

    /// `msg`, counted while any queue holds it ([`crate::mcp::queued_bytes`]); past the
    /// session's share, `None`: what a server says is dropped (a request refused) until its
    /// clients read what waits.
    fn counted(self: Arc<Self>, index: usize, mut msg: Message) -> Option<Message> {
        if let Some(frame) = self.queued.admit(std::mem::take(&mut msg.frame)) {
            msg.frame = frame;
            return Some(msg);
        }
        if let Some(n) = self.dropped_logs.admit() {
            let more = crate::log_rate::held_back(n);
            tracing::warn!(session = %self.log_id(), upstream = %self.topology.servers[index].name, "dropped a server message: the session's queues hold {} bytes its clients have not read{more}", self.queued.held());
        }
        if let Kind::Request { id, .. } = msg.kind {
            let error = jsonrpc::error_object(code::INTERNAL_ERROR, QUEUES_FULL);
            let server = self.topology.servers[index].clone();
            server.refuse_in_background(async move {
                self.links[index].respond(&id, &Outcome::Error(error)).await;
            });
        }
        None
    }

    /// The task that runs this session's server messages through the policy, in order. It
    /// holds the session weakly and ends with it.
    fn spawn_policy_task(&self) -> mpsc::Sender<PolicyItem> {
        let (tx, mut rx) = mpsc::channel::<PolicyItem>(POLICY_QUEUE);
        let weak = self.weak.clone();
        let ended = self.ended();
        tokio::spawn(async move {
            let work = async {
                // `_held` goes at the end of each turn: once the message is routed or withheld.
                while let Some((index, route, msg, _held)) = rx.recv().await {
                    let Some(session) = weak.upgrade() else {
                        return;
                    };
                    let Some(policy) = session.policy.clone() else {
                        return;
                    };
                    let request_id = match &msg.kind {
                        Kind::Request { id, .. } => Some(id.clone()),
                        _ => None,
                    };
                    let counted = msg.frame.as_ptr() as usize;
                    match policy.server_message(&session, index, msg).await {
                        // A rewrite is a frame of its own, counted anew.
                        Some(m) if m.frame.as_ptr() as usize != counted => {
                            if let Some(m) = session.clone().counted(index, m) {
                                session.route_server_message(index, route, m);
                            }
                        }
                        Some(m) => session.route_server_message(index, route, m),
                        // A withheld request still gets an answer, so the server stops waiting.
                        None => {
                            if let Some(id) = request_id {
                                let error = jsonrpc::error_object(
                                    code::INVALID_REQUEST,
                                    "the gateway's policy withheld this request from the client",
                                );
                                // In the background: a server slow to take the refusal must
                                // not hold the session's other messages (nor the calls that
                                // wait for them) behind it.
                                let server = session.topology.servers[index].clone();
                                let session = session.clone();
                                server.refuse_in_background(async move {
                                    session.links[index]
                                        .respond(&id, &Outcome::Error(error))
                                        .await;
                                });
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = work => {}
                _ = ended => {}
            }
        });
        tx
    }

    fn route_server_message(self: Arc<Self>, index: usize, route: Route, msg: Message) {
        let Message { frame, kind } = msg;
        match kind {
            Kind::Request { id, method, params } => {
                // Rebuilt under the session's id below: the server's frame goes first, so that
                // the request is not counted twice in the session's queued bytes.
                drop(frame);
                // The server's id and method are kept until the client answers, which may be
                // never (or until the session ends): bounded as a client's id is, else each
                // session would keep 16 of up to 4 MiB per server. Refused at once, so the
                // server does not wait on it.
                let over = [("id", id.len()), ("method", method.len())]
                    .into_iter()
                    .find(|(_, len)| *len > jsonrpc::MAX_KEPT_NAME);
                if let Some((what, _)) = over {
                    let error = jsonrpc::error_object(
                        code::INVALID_REQUEST,
                        &format!(
                            "the request's {what} is over {} bytes, so the gateway does not ask its client",
                            jsonrpc::MAX_KEPT_NAME
                        ),
                    );
                    let server = self.topology.servers[index].clone();
                    server.refuse_in_background(async move {
                        self.links[index].respond(&id, &Outcome::Error(error)).await;
                    });
                    return;
                }
                // The client is asked only what it declared it answers: its session's servers
                // were told so at `initialize`, and one that asks anyway is refused on the
                // client's behalf (as a client without the capability would answer).
                if let Some(missing) = self
                    .client_capabilities
                    .as_deref()
                    .and_then(|caps| undeclared(caps, &method, params.as_deref()))
                {
                    tracing::info!(session = %self.log_id(), upstream = %self.topology.servers[index].name, ?method, "refused a server request the client declared no capability for");
                    let error = jsonrpc::error_object(
                        code::METHOD_NOT_FOUND,
                        &format!(
                            "the client did not declare the {} capability",
                            missing.capability
                        ),
                    );
                    let server = self.topology.servers[index].clone();
                    server.refuse_in_background(async move {
                        self.links[index].respond(&id, &Outcome::Error(error)).await;
                    });
                    return;
                }
                let n = self.next_server_request.fetch_add(1, Ordering::Relaxed);
                let wire = match &self.portable {
                    Some(sealer) => {
                        let upstream = self.links[index].upstream_session();
                        Bytes::from(session_token::seal_request_id(
                            sealer,
                            &session_token::ServerRequestId {
                                p: self.principal.as_deref().map(str::to_owned),
                                g: session_token::digest(&self.id),
                                e: session_token::now_ms() + SERVER_REQUEST_TTL_MS,
                                s: self.topology.servers[index].name.to_string(),
                                v: upstream.as_ref().and_then(|(_, v)| v.clone()),
                                u: upstream.map(|(u, _)| u),
                                o: String::from_utf8_lossy(&id).into_owned(),
                                n,
                                m: Some(method.to_string()),
                            },
                        ))
                    }
                    None => Bytes::from(n.to_string()),
                };
                let admitted = {
                    let mut pending = lock(&self.server_requests);
                    // Each server has a share: one that asks without end (or whose questions
                    // the client ignores) leaves room for the others', and makes none.
                    let its_own = pending.values().filter(|w| w.index == index).count();
                    // In a portable session an answer may go upstream through another replica
                    // and never come back here: the oldest entry makes room.
                    if self.portable.is_some()
                        && its_own < MAX_SERVER_REQUESTS_PER_SERVER
                        && pending.len() >= MAX_SERVER_REQUESTS
                        && let Some(oldest) = pending.keys().min().copied()
                    {
                        pending.remove(&oldest);
                    }
                    let room = pending.len() < MAX_SERVER_REQUESTS
                        && its_own < MAX_SERVER_REQUESTS_PER_SERVER;
                    if room {
                        let waiting = WaitingAnswer {
                            index,
                            original: id.clone(),
                            wire: wire.clone(),
                            method: method.clone(),
                        };
                        pending.insert(n, waiting);
                    }
                    room
                };
                let frame = self
                    .queued
                    .admit(jsonrpc::request(&wire, &method, params.as_deref()));
                let queued = frame.is_some();
                if !admitted || !frame.is_some_and(|f| self.push(&route, f, None)) {
                    lock(&self.server_requests).remove(&n);
                    let error = jsonrpc::error_object(
                        code::INTERNAL_ERROR,
                        if !admitted {
                            "too many requests are waiting for this client's answers (at most 16 of one server's, 64 in all)"
                        } else if !queued {
                            QUEUES_FULL
                        } else if route.related.is_none() && !self.has_listen_stream() {
                            "the gateway cannot tell which of the calls in progress this request belongs to, so it asks no client"
                        } else {
                            "the client has no open stream to receive this request"
                        },
                    );
                    let server = self.topology.servers[index].clone();
                    server.refuse_in_background(async move {
                        self.links[index].respond(&id, &Outcome::Error(error)).await;
                    });
                }
            }
            Kind::Notification { method, params } => {
                // A stateless client hears of changes only on the listen streams it opened.
                if !self.has_listen_stream() && subscriptions::carried(&method) {
                    self.subscriptions.deliver(&method, params.as_deref());
                    return;
                }
                let topic = Topic::of(&method, params.as_deref());
                let frame = if &*method == "notifications/cancelled" {
                    // The server cancels one of its own requests: translate its id to ours.
                    match params
                        .as_deref()
                        .and_then(|p| self.downstream_id_of(index, p))
                    {
                        Some(wire) => jsonrpc::notification(
                            "notifications/cancelled",
                            Some(
                                format!("{{\"requestId\":{}}}", String::from_utf8_lossy(&wire))
                                    .as_bytes(),
                            ),
                        ),
                        None => return,
                    }
                } else {
                    frame
                };
                if !self.push(&route, frame, topic) {
                    tracing::debug!(session = %self.log_id(), ?method, "dropped a notification: no client stream open");
                }
            }
            Kind::Response { .. } => {}
        }
    }

    fn downstream_id_of(&self, index: usize, params: &[u8]) -> Option<Bytes> {
        #[derive(Deserialize)]
        struct P<'a> {
            #[serde(borrow, rename = "requestId")]
            id: &'a serde_json::value::RawValue,
        }
        let p: P<'_> = serde_json::from_slice(params).ok()?;
        let mut map = lock(&self.server_requests);
        let n = *map
            .iter()
            .find(|(_, w)| w.index == index && w.original[..] == *p.id.get().as_bytes())?
            .0;
        map.remove(&n).map(|w| w.wire)
    }

    /// Sends a frame on the related stream, else the GET stream, else a fallback stream of the
    /// same session; before the client opens its GET stream, a few frames wait for it. Queues are
    /// bounded: a client too slow to drain them loses messages rather than growing our memory.
    /// A change notice (`topic`) bound for the GET stream that says what one still waiting
    /// there says is not queued again (it is as good as delivered): a server's flood costs the
    /// stream one entry, not the room a server request or another server's messages need.
    fn push(&self, route: &Route, frame: Bytes, topic: Option<Topic>) -> bool {
        if let Some(tx) = &route.related
            && tx.try_send(frame.clone()).is_ok()
        {
            return true;
        }
        let mut guard = lock(&self.listen);
        let listen = &mut *guard;
        let open = listen.is_open();
        let to_backlog = !open && route.fallback.is_none() && self.has_listen_stream();
        if let Some(topic) = &topic
            && (open || to_backlog)
            && listen.queued.holds(topic)
        {
            return true;
        }
        // The handle kept of a notice must be its frame's only other one: a server's frame may
        // be a slice of its read buffer (or share it with its params), never unique.
        let frame = match topic {
            Some(_) => Bytes::copy_from_slice(&frame),
            None => frame,
        };
        if open {
            if let Some(tx) = &listen.sink
                && tx.try_send(frame.clone()).is_ok()
            {
                if let Some(topic) = topic {
                    listen.queued.push(topic, frame);
                }
                return true;
            }
        } else if to_backlog
            && listen.backlog.len() < LISTEN_BACKLOG
            && listen.backlog.iter().map(Bytes::len).sum::<usize>() + frame.len()
                <= LISTEN_BACKLOG_BYTES
        {
            listen.sink = None;
            listen.backlog.push_back(frame.clone());
            if let Some(topic) = topic {
                listen.queued.push(topic, frame);
            }
            return true;
        }
        drop(guard);
        // A stateless session's calls may be different clients' (every anonymous caller shares
        // one): what cannot be tied to a call goes to none of them.
        self.has_listen_stream()
            && route
                .fallback
                .as_ref()
                .is_some_and(|tx| tx.try_send(frame).is_ok())
    }
}

/// A server request the client's declared capabilities do not cover: the capability (dotted
/// for a member, `elicitation.url`) and `data` of the refusal (`{"requiredCapabilities":…}`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Undeclared {
    /// What the client would have had to declare: `sampling`, `elicitation.url`, ...
    pub capability: &'static str,
    /// `{"requiredCapabilities":{…}}`, for a -32021 error's `data`.
    pub data: &'static str,
}

/// What a client that declared `capabilities` (its `capabilities` object, raw JSON) did not
/// declare for a server to ask it `method` with `params`, if anything. Besides the capability
/// itself (`round_trip::capability_needed`), a mode needs its member (2025-11-25): an
/// elicitation in URL mode needs `elicitation.url`, one in form mode `elicitation.form` or an
/// `elicitation` with neither member (what earlier revisions declare), a sampling request
/// offering tools `sampling.tools`. A server must not ask beyond that; a hostile one would have
/// the gateway send a client (a browser, a user) what it never agreed to handle, a URL to open
/// above all. The params are read as a lenient client decoder could read them (`Mode`,
/// `mode\u0000`): anything that could be read as a URL mode counts as one.
pub(crate) fn undeclared(
    capabilities: &[u8],
    method: &str,
    params: Option<&[u8]>,
) -> Option<Undeclared> {
    let declared = members(capabilities).unwrap_or_default();
    let member = |cap: &str| declared.iter().find(|(k, _)| k == cap).map(|(_, v)| *v);
    // Whether a declared capability object has member `name` (none, if it is not an object).
    let has = |cap: &RawValue, name: &str| {
        members(cap.get().as_bytes()).is_some_and(|m| m.iter().any(|(k, _)| k == name))
    };
    // Params the gateway cannot read (a key that is no text: a lone surrogate) may still be
    // read by a client's decoder, as anything: they are taken to ask for all they could.
    let asked = members(params.unwrap_or(b"{}"));
    let unreadable = asked.is_none();
    let asked = asked.unwrap_or_default();
    // The values of the params' members a lenient decoder could read as `name`.
    let read_as = |name: &'static str| {
        asked
            .iter()
            .filter(move |(k, _)| crate::mcp::lookalike::read_as(k, &[name]).is_some())
            .map(|(_, v)| v.get())
    };
    let missing = |capability, data| Some(Undeclared { capability, data });
    match method {
        "sampling/createMessage" => {
            let Some(sampling) = member("sampling") else {
                return missing("sampling", r#"{"requiredCapabilities":{"sampling":{}}}"#);
            };
            if (unreadable || read_as("tools").any(|v| v != "null")) && !has(sampling, "tools") {
                return missing(
                    "sampling.tools",
                    r#"{"requiredCapabilities":{"sampling":{"tools":{}}}}"#,
                );
            }
            None
        }
        "elicitation/create" => {
            let Some(elicitation) = member("elicitation") else {
                return missing(
                    "elicitation",
                    r#"{"requiredCapabilities":{"elicitation":{}}}"#,
                );
            };
            let form = !unreadable && read_as("mode").all(|m| m == r#""form""#);
            let (url, form_declared) = (has(elicitation, "url"), has(elicitation, "form"));
            if !form && !url {
                return missing(
                    "elicitation.url",
                    r#"{"requiredCapabilities":{"elicitation":{"url":{}}}}"#,
                );
            }
            if form && url && !form_declared {
                return missing(
                    "elicitation.form",
                    r#"{"requiredCapabilities":{"elicitation":{"form":{}}}}"#,
                );
            }
            None
        }
        "roots/list" if member("roots").is_none() => {
            missing("roots", r#"{"requiredCapabilities":{"roots":{}}}"#)
        }
        _ => None,
    }
}

/// The `capabilities` object of a client's `initialize` params (`{}` if it has none).
fn declared_capabilities(init_params: &[u8]) -> Bytes {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow)]
        capabilities: Option<&'a RawValue>,
    }
    serde_json::from_slice::<P<'_>>(init_params)
        .ok()
        .and_then(|p| p.capabilities)
        .map_or(Bytes::from_static(b"{}"), |c| {
            Bytes::copy_from_slice(c.get().as_bytes())
        })
}

/// The members of a JSON object, keys as read (unescaped); `None` if it is no object serde
/// reads (a key with a lone surrogate, say).
fn members(object: &[u8]) -> Option<Vec<(std::borrow::Cow<'_, str>, &RawValue)>> {
    struct Members;
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<(std::borrow::Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) =
                map.next_entry::<crate::mcp::lookalike::Key<'de>, &'de RawValue>()?
            {
                out.push((k.0, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(object);
    serde::Deserializer::deserialize_map(&mut de, Members).ok()
}

/// Frames that may wait for the client's GET stream.
const LISTEN_BACKLOG: usize = 32;

/// Bytes the backlog may hold: it waits for a GET stream that may never open (nor time out as
/// an unread stream does), so it must not pin much of the sessions' common queue budget.
const LISTEN_BACKLOG_BYTES: usize = 2 << 20;
/// Client requests one session may have in flight at once.
pub const MAX_INFLIGHT: usize = 256;
/// How long a portable session's server request may be answered (through any replica).
const SERVER_REQUEST_TTL_MS: u64 = 10 * 60 * 1000;
/// Server→client requests waiting for one session's answers.
const MAX_SERVER_REQUESTS: usize = 64;
/// Largest notification a server may send the session's clients.
const MAX_SERVER_NOTIFICATION: usize = 1 << 20;
/// Largest request a server may put to the session's clients (a sampling request may carry
/// images).
const MAX_SERVER_REQUEST: usize = 4 << 20;

/// Most of them from one server (the refusal names both numbers).
const MAX_SERVER_REQUESTS_PER_SERVER: usize = 16;

/// A session id as logs show it (see [`Session::log_id`]).
pub fn log_id(id: &str) -> &str {
    crate::audit::log_prefix(id)
}

/// A session already has as many requests in flight as it may.
#[derive(Debug, thiserror::Error)]
#[error("too many requests in flight on this session (at most {0}); wait for some to finish")]
pub struct TooBusy(pub usize);

/// A session's client requests in flight.
#[derive(Default)]
struct InFlightTable {
    /// By the client's id, for `notifications/cancelled`: the latest request under an id.
    /// foldhash, not SipHash: looked up twice per call; the ids are the client's own, and at most
    /// [`MAX_INFLIGHT`] of them.
    by_id: HashMap<Bytes, (u64, oneshot::Sender<()>), foldhash::fast::RandomState>,
    /// Every request in flight, whatever its id.
    count: usize,
}

/// A client request in flight; forgotten when dropped.
pub struct InFlight {
    session: Arc<Session>,
    id: Bytes,
    ticket: u64,
    /// Fires when the client cancels the request.
    pub cancelled: Option<oneshot::Receiver<()>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inflight = lock(&self.session.inflight);
        inflight.count -= 1;
        // One lookup (the id is hashed once): a later request that reused the id owns the entry
        // now.
        if let std::collections::hash_map::Entry::Occupied(entry) =
            inflight.by_id.entry(std::mem::take(&mut self.id))
            && entry.get().0 == self.ticket
        {
            entry.remove();
        }
    }
}

/// A server message waiting for the session's policy stage: its upstream, where it goes, and
/// the mark that keeps the call it is about from answering before it arrives.
type PolicyItem = (usize, Route, Message, Option<OnTheWay>);

/// The client's GET stream, and what waits for it.
#[derive(Default)]
struct Listen {
    sink: Option<EventSink>,
    /// The number of the last stream opened (see [`Session::close_listen_stream`]).
    stream: u64,
    backlog: std::collections::VecDeque<Bytes>,
    /// The change notices in `backlog` or in the stream's queue, not yet taken by its body.
    queued: Queued,
}

impl Listen {
    fn is_open(&self) -> bool {
        self.sink.as_ref().is_some_and(|s| !s.is_closed())
    }
}

/// Keeps a session alive while a request runs.
pub struct BusyGuard(Arc<Session>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.last_active_ms
            .store(s.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads the capability bits out of an `initialize` result.
pub fn capability_bits(init_result: &[u8]) -> u8 {
    #[derive(Deserialize, Default)]
    struct Caps<'a> {
        #[serde(borrow, default)]
        tools: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        prompts: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        resources: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        logging: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        completions: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct R<'a> {
        #[serde(borrow, default)]
        capabilities: Caps<'a>,
    }
    let Ok(r) = serde_json::from_slice::<R<'_>>(init_result) else {
        return 0;
    };
    let c = r.capabilities;
    let bit = |o: Option<&serde_json::value::RawValue>, b: u8| if o.is_some() { b } else { 0 };
    bit(c.tools, caps::TOOLS)
        | bit(c.prompts, caps::PROMPTS)
        | bit(c.resources, caps::RESOURCES)
        | bit(c.logging, caps::LOGGING)
        | bit(c.completions, caps::COMPLETIONS)
}

#[cfg(test)]
mod tests {
    use super::undeclared;

    /// Params the gateway cannot read as an object (a key with a lone surrogate, which a
    /// JavaScript or Python client reads as text) are taken to ask for all they could: a URL
    /// elicitation, sampling with tools.
    #[test]
    fn params_unreadable_to_the_gateway_ask_for_all_they_could() {
        let url = br#"{"mode":"url","url":"https://evil.example","message":"m","elicitationId":"e","\udc00":0}"#;
        let form = br#"{"mode":"form","message":"m","requestedSchema":{},"\udc00":0}"#;
        let tools = br#"{"maxTokens":5,"messages":[],"tools":[{"name":"t"}],"\udc00":0}"#;
        for params in [&url[..], &form[..]] {
            let missing = undeclared(br#"{"elicitation":{}}"#, "elicitation/create", Some(params))
                .expect("refused");
            assert_eq!(missing.capability, "elicitation.url");
            assert!(
                undeclared(
                    br#"{"elicitation":{"url":{},"form":{}}}"#,
                    "elicitation/create",
                    Some(params)
                )
                .is_none(),
                "declared in full"
            );
        }
        let missing = undeclared(br#"{"sampling":{}}"#, "sampling/createMessage", Some(tools))
            .expect("refused");
        assert_eq!(missing.capability, "sampling.tools");
        // Readable params are read as they say.
        let plain = br#"{"mode":"form","message":"m","requestedSchema":{}}"#;
        assert!(undeclared(br#"{"elicitation":{}}"#, "elicitation/create", Some(plain)).is_none());
    }
}
