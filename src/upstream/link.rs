//! One downstream session's connection to one upstream server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::{Transport, UpstreamProtocol};
use crate::mcp::jsonrpc::{self, Outcome, code};
use crate::mcp::param_headers::{ToolHeaders, UNFINISHED_LIST_KEPT};
use crate::orchestrator::Sharing;

use super::http::Discovered;
use super::{
    CallOpts, Connection, Era, Inbox, Recipient, Route, Server, UpstreamError, initialize,
    orchestrated, shared, stateless, stdio, uri_of,
};

/// The requests forwarded to a server whose one session every principal shares (the rest are
/// refused): each stands on its own, with nothing of one principal's left in the session for
/// another to reach. Subscriptions and the log level are the gateway's own on such a server.
const SHARED_METHODS: [&str; 12] = [
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
];

/// Whether request params ask for the request to run as a task (a `task` member, or a key a
/// lenient server reads as one); unreadable params count as asking.
fn asks_for_a_task(params: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(params) else {
        return true;
    };
    if !text.trim_ascii_start().starts_with('{') {
        return false;
    }
    let mut task = false;
    let read = crate::json_scan::members(text, crate::json_scan::MAX_DEPTH, |key, _| {
        task |= crate::json_scan::unquote(key).map_or(true, |k| {
            crate::mcp::lookalike::read_as(&k, &["task"]).is_some()
        });
    });
    task || read.is_err()
}

/// What the probe declares: the gateway itself, able to answer everything a server may ask.
const PROBE_INIT: &str = r#"{"capabilities":{"sampling":{},"elicitation":{},"roots":{}},"clientInfo":{"name":"gatehouse","version":"probe"}}"#;
/// Most rounds of input one call to a 2026-07-28 server may ask of a session's client.
const MAX_INPUT_ROUNDS: usize = 8;
/// Most resources a link subscribes to anew on a new connection.
const MAX_RESUBSCRIBED: usize = 256;
/// Most pages of a 2026-07-28 server's tool list read to learn its mirrored arguments.
const MAX_MARK_PAGES: usize = 20;
/// Prefix of the ids of requests the link itself sends the client (for a 2026 server's input).
const ASK_ID_PREFIX: &str = "\"gatehouse-input-";

/// A `resources/subscribe` forwarded to a shared server: forgotten again unless the server
/// takes it (it failed, or the call was dropped), so that a refused URI holds no room.
struct SharedSubscribe<'a> {
    link: &'a Link,
    uri: String,
    taken: bool,
}

impl Drop for SharedSubscribe<'_> {
    fn drop(&mut self) {
        if !self.taken
            && let Some((member, _)) = &*self.link.shared.lock().unwrap_or_else(|e| e.into_inner())
        {
            member.subscribe_failed(&self.uri);
        }
    }
}

/// A 2026-07-28 server's tool-argument marks, the link generation they were read on, and when
/// that reading ended if it did not reach the list's end.
type ReadMarks = (u64, Arc<ToolHeaders>, Option<std::time::Instant>);

/// One downstream session's connection to one upstream server.
///
/// Usually the connection is the link's own upstream session. For a stdio server run by the
/// orchestrator it is the server's one [`shared::SharedConnection`] session, which the link joins.
pub struct Link {
    server: Arc<Server>,
    /// The session's principal: with `sharing: per-principal`, whose process to use.
    principal: Option<Arc<str>>,
    /// The caller's access token, for an upstream that exchanges it for its own.
    caller: Option<Arc<dyn super::token_exchange::CallerToken>>,
    inbox: Inbox,
    init_params: Bytes,
    current: Mutex<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
    init_result: Mutex<Option<Bytes>>,
    pub(crate) generation: AtomicU64,
    listen: AtomicBool,
    /// Membership of a shared connection, once joined.
    shared: Mutex<Option<(shared::Member, Arc<shared::SharedConnection>)>>,
    /// Whether the shared connection joined is shared by every principal (`sharing: shared`),
    /// not by one principal's sessions alone.
    across_principals: AtomicBool,
    /// Set by [`Link::close`]: the link never connects again.
    closed: AtomicBool,
    /// First pages of the lists whose changes the upstream promises to announce.
    lists: Mutex<ListCache>,
    /// The resources the server agreed to watch for this link: subscribed anew on the next
    /// connection (a new upstream session knows none of them).
    subscribed: Arc<Mutex<Vec<Box<str>>>>,
    /// The connection last given up on, whose listen stream goes on until the next one's
    /// opens: a 2026-07-28 server's stream needs no session, so a listening client hears on
    /// (once, never from two streams) until a call connects anew.
    retired: Mutex<Option<Arc<Connection>>>,
    /// Held while the link's own process of an orchestrated server runs.
    private_slot: Mutex<Option<super::shared::PrivateSlot>>,
    /// The server definition the link's own process runs (`SharedServer::definition`).
    private_definition: AtomicU64,
    /// For a remote server: the fingerprint of the endpoint the connection was made to (0:
    /// not a remote).
    remote_endpoint: AtomicU64,
    /// The connection goes through the leading replica's relay: when the relay fails, the
    /// next call asks the orchestrator again (leadership may have moved).
    relayed: AtomicBool,
    /// The connection is one every caller shares alike (an HTTP server, or a stdio server
    /// with `sharing: shared`): what it lists is not one caller's own.
    alike: AtomicBool,
    /// The server's idle epoch ([`crate::orchestrator::idle::Usage::epoch`]) when this link
    /// last connected.
    connected_epoch: AtomicU64,
    /// Never through a relay: this link is a relay's, on the replica that leads.
    attach_only: bool,
    /// For a 2026-07-28 server: the log level the session's client asked for.
    log_level: Mutex<Option<String>>,
    /// For a 2026-07-28 server: its tools' mirrored arguments, with the link generation they
    /// were read on, and when that reading ended if the list was not read to its end.
    marks: tokio::sync::Mutex<Option<ReadMarks>>,
    /// Questions of a 2026-07-28 server put to the session's client, by id, awaiting answers.
    asks: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    next_ask: AtomicU64,
    /// Random, so the ids of the link's questions are its own (see [`Link::ask_id`]).
    ask_nonce: u64,
    /// The session's calls may be different callers' (an anonymous stateless session): their
    /// progress tokens, chosen by each, may be the same.
    many_callers: bool,
}

/// First pages of list methods, valid for one upstream session (link generation) until the
/// upstream announces a change (`notifications/*/list_changed`).
#[derive(Default)]
struct ListCache {
    /// Bumped by every change announcement: a fetch that began before one is not kept.
    epoch: u64,
    pages: Vec<(&'static str, u64, Bytes)>,
}

/// Largest first page of a list kept between lists. Pages are kept per session and server,
/// so a larger one (up to the 64 MiB message limit) is fetched each time instead: what a
/// thousand sessions hold stays bounded by what they are sent.
pub const MAX_CACHED_LIST_PAGE: usize = 1 << 20;

/// The list methods a `listChanged` capability covers: (method, capability).
const CACHED_LISTS: [(&str, &str); 4] = [
    ("tools/list", "tools"),
    ("prompts/list", "prompts"),
    ("resources/list", "resources"),
    ("resources/templates/list", "resources"),
];

/// Whether an `initialize` result promises `listChanged` for `capability`.
fn announces_changes(init_result: &[u8], capability: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Init<'a> {
        #[serde(borrow, default)]
        capabilities: std::collections::HashMap<&'a str, &'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Cap {
        #[serde(default, rename = "listChanged")]
        list_changed: bool,
    }
    serde_json::from_slice::<Init<'_>>(init_result)
        .ok()
        .and_then(|i| i.capabilities.get(capability).copied())
        .and_then(|c| serde_json::from_str::<Cap>(c.get()).ok())
        .is_some_and(|c| c.list_changed)
}

/// A link without a client session behind it (a relay's): no caller token.
struct NoCaller;

impl super::token_exchange::CallerToken for NoCaller {
    fn current(&self) -> Option<super::token_exchange::Subject> {
        None
    }
}

impl Link {
    /// A link that will initialize with `init_params` (the client's capabilities and info).
    pub fn new(
        server: Arc<Server>,
        principal: Option<Arc<str>>,
        recipient: Arc<dyn Recipient>,
        init_params: Bytes,
        caller: Option<Arc<dyn super::token_exchange::CallerToken>>,
    ) -> Self {
        Link {
            principal,
            caller,
            inbox: Inbox {
                recipient,
                index: server.index,
            },
            server,
            init_params,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            init_result: Mutex::new(None),
            generation: AtomicU64::new(0),
            listen: AtomicBool::new(false),
            shared: Mutex::new(None),
            across_principals: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            lists: Mutex::new(ListCache::default()),
            subscribed: Arc::default(),
            retired: Mutex::new(None),
            private_slot: Mutex::new(None),
            private_definition: AtomicU64::new(0),
            remote_endpoint: AtomicU64::new(0),
            relayed: AtomicBool::new(false),
            alike: AtomicBool::new(false),
            connected_epoch: AtomicU64::new(0),
            attach_only: false,
            log_level: Mutex::new(None),
            marks: tokio::sync::Mutex::new(None),
            asks: Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(1),
            ask_nonce: {
                let mut raw = [0u8; 8];
                getrandom::fill(&mut raw).expect("the OS random source is available");
                u64::from_le_bytes(raw)
            },
            many_callers: false,
        }
    }

    /// For a session whose calls may be different callers' (an anonymous stateless session).
    pub fn for_many_callers(mut self, many: bool) -> Self {
        self.many_callers = many;
        self
    }

    /// A link that reaches a stdio server only by attaching, never through another replica's
    /// relay (the relay's own links: a relay must not chain to another one).
    pub fn attached_only(mut self) -> Self {
        self.attach_only = true;
        self
    }

    /// The first page of a list (no cursor): from the cache while the upstream session that
    /// gave it promised to announce changes and has not, else fetched (and kept if it may be).
    pub async fn first_page(&self, method: &'static str) -> Result<Outcome, UpstreamError> {
        let generation = self.generation.load(Ordering::Acquire);
        let epoch = {
            let cache = self.lists.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, page)) = cache
                .pages
                .iter()
                .find(|(m, g, _)| *m == method && *g == generation)
            {
                return Ok(Outcome::Result(page.clone()));
            }
            cache.epoch
        };
        let outcome = self.call(method, None, CallOpts::default()).await?;
        let capability = CACHED_LISTS.iter().find(|(m, _)| *m == method).map(|c| c.1);
        // Through a relay, change announcements reach this replica only on a listen stream,
        // which a session may not have: nothing would invalidate the copy.
        let relayed = self.relayed.load(Ordering::Acquire);
        // A 2026-07-28 server announces changes only on a listen stream, which links do not
        // always hold: nothing would invalidate the copy.
        if let Outcome::Result(page) = &outcome
            && page.len() <= MAX_CACHED_LIST_PAGE
            && !relayed
            && !self.live().is_some_and(|c| c.is_stateless())
            && let Some(capability) = capability
            && self.generation.load(Ordering::Acquire) == generation
            && self
                .init_result()
                .is_some_and(|init| announces_changes(&init, capability))
        {
            let mut cache = self.lists.lock().unwrap_or_else(|e| e.into_inner());
            if cache.epoch == epoch {
                cache.pages.retain(|(m, _, _)| *m != method);
                cache.pages.push((method, generation, page.clone()));
            }
        }
        Ok(outcome)
    }

    /// Whether `page` is the first page of `method` this link keeps now (the same buffer).
    pub fn keeps_page(&self, method: &str, page: &Bytes) -> bool {
        let cache = self.lists.lock().unwrap_or_else(|e| e.into_inner());
        cache.pages.iter().any(|(m, _, kept)| {
            *m == method && kept.as_ptr() == page.as_ptr() && kept.len() == page.len()
        })
    }

    /// Forgets cached lists after `notifications/<kind>/list_changed` from the upstream.
    pub fn list_changed(&self, notification: &str) {
        let Some(kind) = notification
            .strip_prefix("notifications/")
            .and_then(|n| n.strip_suffix("/list_changed"))
        else {
            return;
        };
        let mut cache = self.lists.lock().unwrap_or_else(|e| e.into_inner());
        cache.epoch += 1;
        cache
            .pages
            .retain(|(m, _, _)| CACHED_LISTS.iter().all(|(cm, cap)| cm != m || *cap != kind));
    }

    /// The upstream this link reaches.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Whether what the connection lists is the same for every caller (see `alike`).
    pub fn answers_alike(&self) -> bool {
        self.alike.load(Ordering::Acquire)
    }

    /// The upstream's last `initialize` result, once connected.
    pub fn init_result(&self) -> Option<Bytes> {
        self.init_result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn live(&self) -> Option<Arc<Connection>> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().filter(|c| c.is_alive()).cloned()
    }

    fn is_shared(&self) -> bool {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// A remote server keeps answering at its old URL with its old headers after it is
    /// redefined (on any replica, or its stored values rotated): the connection made to the
    /// old one is ended, and the next one is made to the new.
    async fn drop_if_remote_redefined(&self) {
        let connected = self.remote_endpoint.load(Ordering::Acquire);
        if connected == 0 {
            return;
        }
        let Some(o) = &self.server.orchestrated else {
            return;
        };
        // Anything else than this same remote is a change: another URL or header, a server
        // run here now, or one that cannot be reached as defined (removed, invalid, its
        // stored values not given for its URL): the connection to the old one ends, and the
        // next is made as the orchestrator says then.
        let now = o.runtime.endpoint(&self.server.name).await;
        if now
            .as_ref()
            .ok()
            .and_then(crate::orchestrator::remote::fingerprint)
            == Some(connected)
        {
            return;
        }
        // One caller ends the old connection: not one a concurrent call made since.
        if self
            .remote_endpoint
            .compare_exchange(connected, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let old = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = old {
            tracing::info!(server = %self.server.name, "the remote was redefined: reconnecting");
            tokio::spawn(async move { old.shutdown().await });
        }
    }

    /// The live connection, connecting and initializing first if needed.
    pub async fn connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(o) = &self.server.orchestrated
            && o.shared.is_closed()
        {
            // The server was removed: a process of this link's own stops now.
            self.stop_own_connection().await;
            return Err(self.server.unavailable("the server was removed"));
        }
        if let Some(o) = &self.server.orchestrated
            && o.shared.definition() != self.private_definition.load(Ordering::Acquire)
            && !self.is_shared()
        {
            // Redefined: a process of this link's own runs the old definition; stop it.
            self.stop_own_connection().await;
            self.private_definition
                .store(o.shared.definition(), Ordering::Release);
        }
        self.drop_if_remote_redefined().await;
        let usage = self
            .server
            .orchestrated
            .as_ref()
            .and_then(|o| o.runtime.usage(&self.server.name));
        if let Some(u) = &usage
            && (u.is_asleep() || u.epoch() != self.connected_epoch.load(Ordering::Acquire))
        {
            // The server sleeps, or slept since this link connected: its process is gone or
            // going, with any HTTP session (and on Kubernetes its address), whatever the
            // connection looks like. The next connection goes through the orchestrator,
            // which wakes it. A process of this link's own does not sleep.
            let shared = self.is_shared();
            let dropped = {
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                match current
                    .as_ref()
                    .is_some_and(|c| shared || matches!(&**c, Connection::Http(_)))
                {
                    true => current.take(),
                    false => None,
                }
            };
            // Ended, not only forgotten: its listen stream would go on (delivering twice,
            // or retrying a pod that is gone), and the upstream session is ended politely.
            if let Some(old) = dropped
                && !shared
            {
                tokio::spawn(async move { old.shutdown().await });
            }
        }
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _serial = self.connecting.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.server.unavailable("the client session has ended"));
        }
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let result =
            tokio::time::timeout(self.server.config.connect_timeout, self.handshake()).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                server: self.server.name.clone(),
                timeout: self.server.config.connect_timeout,
            }),
        };
        // A caller without credentials, or without room, says nothing of the server's health.
        if !matches!(
            result,
            Err(UpstreamError::NoCredentials { .. } | UpstreamError::Busy { .. })
        ) {
            self.server
                .metrics
                .set_upstream_up(self.server.label, result.is_ok());
        }
        let conn = result?;
        if let Some(u) = &usage {
            self.connected_epoch.store(u.epoch(), Ordering::Release);
        }
        {
            // Together: whoever finds this connection in `current` reads its generation (or
            // a later one), never the one before (a pinned call checks it is still on the
            // connection it was checked for).
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            self.generation.fetch_add(1, Ordering::AcqRel);
            *current = Some(conn.clone());
        }
        self.stop_retired();
        self.resubscribe(&conn);
        if self.listen.load(Ordering::Relaxed)
            && let Connection::Http(h) = &*conn
        {
            h.open_listen_stream(conn.clone());
        }
        Ok(conn)
    }

    /// Stops the listen stream of the connection last given up on, if any.
    fn stop_retired(&self) {
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = retired {
            old.stop_listening();
        }
    }

    /// Remembers that the server agreed to watch `uri` for this link (`on`), or no longer.
    fn note_subscription(&self, uri: &str, on: bool) {
        let mut subscribed = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        let at = subscribed.iter().position(|u| &**u == uri);
        match (on, at) {
            (true, None) if subscribed.len() < MAX_RESUBSCRIBED => subscribed.push(uri.into()),
            (false, Some(i)) => {
                subscribed.swap_remove(i);
            }
            _ => {}
        }
    }

    /// Subscribes a new connection to what the link's earlier ones watched: on a 2026-07-28
    /// server's listen stream (before it opens), else with `resources/subscribe` in the
    /// background. A shared connection keeps its own subscriptions.
    fn resubscribe(&self, conn: &Arc<Connection>) {
        if self.is_shared() {
            return;
        }
        let uris = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if uris.is_empty() {
            return;
        }
        if let Connection::Http(h) = &**conn
            && h.is_stateless()
        {
            for uri in &uris {
                let _ = h.watch(uri, true);
            }
            return;
        }
        let conn = conn.clone();
        let kept = self.subscribed.clone();
        let timeout = self.server.config.call_timeout;
        // Side by side, within one call's deadline in all; one unsubscribed meanwhile is left.
        tokio::spawn(async move {
            let each = uris.iter().map(|uri| {
                let (conn, kept) = (&conn, &kept);
                async move {
                    let still = kept
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(uri);
                    if !still {
                        return;
                    }
                    let params = serde_json::json!({ "uri": &**uri }).to_string();
                    let subscribed = conn
                        .request(
                            "resources/subscribe",
                            Some(params.as_bytes()),
                            CallOpts::default(),
                            timeout,
                        )
                        .await;
                    if !matches!(subscribed, Ok(Outcome::Result(_))) {
                        tracing::info!(server = %conn.server().name, %uri, "could not subscribe anew to a resource on the new upstream session");
                    }
                }
            });
            let all = futures_util::future::join_all(each);
            let _ = tokio::time::timeout(timeout, all).await;
        });
    }

    /// The headers of an HTTP upstream's requests for this link's caller: the operator's own,
    /// and the caller's credentials when the upstream has some (the client's token is never
    /// among them).
    fn headers(&self, headers: &http::HeaderMap) -> Result<http::HeaderMap, UpstreamError> {
        let Some(credentials) = &self.server.config.credentials else {
            return Ok(headers.clone());
        };
        let mut headers = headers.clone();
        match credentials.for_principal(self.principal.as_deref()) {
            Ok(Some((name, value))) => {
                headers.insert(name, value);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(UpstreamError::NoCredentials {
                    server: self.server.name.clone(),
                    reason: e.0,
                });
            }
        }
        Ok(headers)
    }

    /// The per-request credential of an upstream that exchanges the caller's token.
    fn credential(&self) -> Option<super::token_exchange::Credential> {
        let exchange = self.server.token_exchange.clone()?;
        let settings = self.server.config.credentials.as_ref()?;
        Some(super::token_exchange::Credential {
            header: settings.header.clone(),
            exchange,
            caller: self.caller.clone().unwrap_or_else(|| Arc::new(NoCaller)),
            required: settings.required,
        })
    }

    async fn handshake(&self) -> Result<Arc<Connection>, UpstreamError> {
        let server = &self.server;
        let conn = Arc::new(match &server.config.transport {
            Transport::Stdio { .. } => Connection::Stdio(stdio::Connection::spawn(
                server.clone(),
                self.inbox.clone(),
            )?),
            Transport::Http { url, headers } => Connection::Http(
                super::http::Connection::new(
                    server.clone(),
                    url.clone(),
                    self.headers(headers)?,
                    self.inbox.clone(),
                )
                .with_credential(self.credential()),
            ),
            Transport::HttpSse { url, headers } => Connection::Stdio(
                super::http_sse::connect(
                    server.clone(),
                    server.http.clone(),
                    url,
                    &self.headers(headers)?,
                    self.inbox.clone(),
                )
                .await?,
            ),
            Transport::Orchestrated => {
                let o = server
                    .orchestrated
                    .as_ref()
                    .ok_or_else(|| server.unavailable("no orchestrator runs this server"))?;
                let ready = o.ready(server).await?;
                self.relayed.store(
                    matches!(ready, orchestrated::Ready::Relay(..)),
                    Ordering::Release,
                );
                self.alike.store(
                    match &ready {
                        orchestrated::Ready::Http(_) | orchestrated::Ready::Remote(..) => true,
                        orchestrated::Ready::Stdio(e) => e.sharing() == Sharing::Shared,
                        orchestrated::Ready::Relay(_, _, alike) => *alike,
                    },
                    Ordering::Release,
                );
                match ready {
                    orchestrated::Ready::Relay(..) if self.attach_only => {
                        return Err(server.unavailable(
                            "this replica no longer leads; ask the one that holds the lease",
                        ));
                    }
                    orchestrated::Ready::Relay(url, key, _) => {
                        // The leader's relay joins the shared session on our behalf; a
                        // membership from when this replica led is left.
                        drop(self.shared.lock().unwrap_or_else(|e| e.into_inner()).take());
                        Connection::Http(
                            super::http::Connection::new(
                                server.clone(),
                                url,
                                http::HeaderMap::new(),
                                self.inbox.clone(),
                            )
                            .with_client(super::http::relay_client(&key)),
                        )
                    }
                    orchestrated::Ready::Remote(url, headers, false, fingerprint) => {
                        self.remote_endpoint.store(fingerprint, Ordering::Release);
                        Connection::Http(
                            super::http::Connection::new(
                                server.clone(),
                                url,
                                headers,
                                self.inbox.clone(),
                            )
                            .with_client(o.remote_http.clone()),
                        )
                    }
                    orchestrated::Ready::Remote(url, headers, true, fingerprint) => {
                        self.remote_endpoint.store(fingerprint, Ordering::Release);
                        Connection::Stdio(
                            super::http_sse::connect(
                                server.clone(),
                                o.remote_http.clone(),
                                &url,
                                &headers,
                                self.inbox.clone(),
                            )
                            .await?,
                        )
                    }
                    orchestrated::Ready::Http(url) => {
                        Connection::Http(super::http::Connection::new(
                            server.clone(),
                            url,
                            ::http::HeaderMap::new(),
                            self.inbox.clone(),
                        ))
                    }
                    // An unauthenticated session has no principal to share with: its own.
                    orchestrated::Ready::Stdio(endpoint)
                        if endpoint.sharing() == Sharing::PerSession
                            || (endpoint.sharing() == Sharing::PerPrincipal
                                && self.principal.is_none()) =>
                    {
                        // A process of this session's own, initialized below with the
                        // client's own capabilities like any stdio upstream.
                        // The last process of this link is gone (or there was none): its
                        // slot is free before a new one is taken.
                        drop(
                            self.private_slot
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .take(),
                        );
                        let slot = o.shared.private_slot(self.principal.as_ref()).ok_or_else(|| {
                            UpstreamError::Busy {
                                server: server.name.clone(),
                                reason: format!(
                                    "it already runs {} processes for single sessions, or this principal's sessions {} (orchestrator.max_private_processes, orchestrator.max_private_processes_per_principal); retry once a session ends",
                                    o.shared.max_private(),
                                    o.shared.principal_share()
                                ),
                            }
                        })?;
                        *self.private_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
                        let stream = endpoint
                            .open_private(self.principal.as_deref())
                            .await
                            .map_err(|e| server.unavailable(format!("cannot start: {e}")))?;
                        Connection::Stdio(stdio::Connection::over(
                            server.clone(),
                            stream.reader,
                            stream.writer,
                            self.inbox.clone(),
                            stream.process,
                        ))
                    }
                    orchestrated::Ready::Stdio(endpoint) => {
                        let sharing = endpoint.sharing();
                        // Joined before connecting, and for the link's life: the shared
                        // session it joined cannot be released under it.
                        let shared = {
                            let mut joined = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                            match &*joined {
                                Some((_, shared)) => shared.clone(),
                                None => {
                                    let (membership, shared) = o.shared.join(
                                        sharing,
                                        self.principal.as_ref(),
                                        self.inbox.clone(),
                                    );
                                    // As joined, for the link's life (a redefinition may change
                                    // the server's sharing, not the connection this link joined).
                                    self.across_principals
                                        .store(sharing != Sharing::PerPrincipal, Ordering::Release);
                                    *joined = Some((membership, shared.clone()));
                                    shared
                                }
                            }
                        };
                        let private = sharing == Sharing::PerPrincipal;
                        let epoch = o.runtime.usage(&server.name).map_or(0, |u| u.epoch());
                        let (conn, result) = shared
                            .connect(server, &endpoint, private, epoch, self.principal.as_deref())
                            .await?;
                        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                        return Ok(conn);
                    }
                }
            }
        });
        if let Some(discovered) = self.probe(&conn).await? {
            *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(discovered);
            return Ok(conn);
        }
        let result = initialize(&conn, &self.init_params, server.config.connect_timeout).await?;
        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        Ok(conn)
    }

    /// Asks an HTTP server (not a relay) whether it speaks 2026-07-28, unless it is known not
    /// to: its discover result if it does (the connection then speaks it), `None` if it does
    /// not (remembered for the server: later links go straight to `initialize`).
    async fn probe(&self, conn: &Arc<Connection>) -> Result<Option<Bytes>, UpstreamError> {
        let Connection::Http(h) = &**conn else {
            return Ok(None);
        };
        if self.relayed.load(Ordering::Acquire)
            || self.server.era() == Era::Sessions
            || self.server.config.protocol == UpstreamProtocol::Sessions
        {
            return Ok(None);
        }
        // The gateway's own envelope: what one client declared must not decide, by a server's
        // refusal of it, how every session reaches the server.
        let frame = stateless::discover_frame(&stateless::envelope(PROBE_INIT.as_bytes(), None));
        match h.discover(frame).await? {
            Discovered::Stateless(discovered) => {
                super::handshake::kept_result(conn, &discovered)?;
                h.set_stateless(stateless::envelope(&self.init_params, None));
                self.server.set_era(Era::Stateless);
                Ok(Some(discovered))
            }
            // A server once seen to speak 2026-07-28 is not written off on one answer.
            Discovered::Sessions if self.server.era() == Era::Unknown => {
                self.server.set_era(Era::Sessions);
                Ok(None)
            }
            Discovered::Sessions | Discovered::Unsure => Ok(None),
        }
    }

    /// The envelope this session's requests carry to a 2026-07-28 server.
    fn envelope(&self) -> String {
        let level = self.log_level.lock().unwrap_or_else(|e| e.into_inner());
        stateless::envelope(&self.init_params, level.as_deref())
    }

    /// Fails unless the link is still on the connection of generation `expected` (if any).
    fn still_on(&self, expected: Option<u64>) -> Result<(), UpstreamError> {
        match expected {
            Some(g) if self.generation.load(Ordering::Acquire) != g => {
                Err(UpstreamError::Reconnected {
                    server: self.server.name.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The generation of the link's current connection (bumped by each new one).
    pub fn connection_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Calls a method upstream, reconnecting once if the upstream forgot our session.
    pub async fn call(
        &self,
        method: &str,
        params: Option<&[u8]>,
        mut opts: CallOpts,
    ) -> Result<Outcome, UpstreamError> {
        let timeout = self.server.config.call_timeout;
        // In use from before it connects (a sleeping server is not put back to sleep under
        // the call that wakes it) until the answer.
        let _in_use = self
            .server
            .orchestrated
            .as_ref()
            .and_then(|o| o.runtime.usage(&self.server.name))
            .map(|u| u.begin());
        let conn = self.connection().await?;
        let on_connection = opts.on_connection;
        self.still_on(on_connection)?;
        if conn.is_stateless() {
            // Boxed: held inline, its future would make every call's as large. Built in its
            // box: moved there, its KiB are copied on every call.
            return crate::boxed::in_place(|| self.call_stateless(&conn, method, params, opts))
                .await;
        }
        // A 2026 client's envelope and retry members mean nothing to earlier revisions.
        let legacy;
        let mut params = params;
        if let Some(p) = params
            && let Some(stripped) = stateless::for_sessions(p)
        {
            legacy = stripped;
            params = Some(&legacy);
        }
        // Several sessions share this connection (or several callers this session, which
        // cannot tell them apart): give the call a progress token nobody else's call uses, and
        // remember whose call it is. Over stdio a progress notification says nothing else of
        // the call it belongs to.
        let rewritten;
        let shared = self.is_shared();
        let mut subscribing = None;
        if shared || (self.many_callers && matches!(&*conn, Connection::Stdio(_))) {
            match method {
                _ if !shared => {}
                // One session must not change what the shared server logs for all of them.
                "logging/setLevel" => return Ok(Outcome::Result(Bytes::from_static(b"{}"))),
                "resources/subscribe" | "resources/unsubscribe" => {
                    let uri = params.and_then(uri_of).ok_or_else(|| {
                        self.server
                            .unavailable("resources/subscribe needs params.uri")
                    })?;
                    let on = method == "resources/subscribe";
                    let recorded = self
                        .shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|(m, _)| m.subscribe(&uri, on));
                    match recorded {
                        Some(Ok(shared::Subscription::Forward)) => {}
                        Some(Err(refused)) => {
                            return Ok(Outcome::Error(jsonrpc::error_object(
                                refused.code(),
                                &refused.to_string(),
                            )));
                        }
                        _ => return Ok(Outcome::Result(Bytes::from_static(b"{}"))),
                    }
                    if on {
                        subscribing = Some(SharedSubscribe {
                            link: self,
                            uri,
                            taken: false,
                        });
                    }
                }
                // The server holds one session for every principal: a method that reaches
                // what earlier requests left in it (`tasks/list`, `tasks/result` of another
                // principal's task) would let one principal see or cancel another's work.
                _ if !SHARED_METHODS.contains(&method)
                    && self.across_principals.load(Ordering::Acquire) =>
                {
                    return Ok(Outcome::Error(jsonrpc::error_object(
                        code::METHOD_NOT_FOUND,
                        &format!(
                            "{method} is not available through server {:?}: every principal shares its one session, and {method} would reach what the others left in it",
                            self.server.name
                        ),
                    )));
                }
                // A call run as a task leaves its result in that shared session.
                _ if self.across_principals.load(Ordering::Acquire)
                    && params.is_some_and(asks_for_a_task) =>
                {
                    return Ok(Outcome::Error(jsonrpc::error_object(
                        code::INVALID_PARAMS,
                        &format!(
                            "params.task: server {:?} is shared by every principal in one session, where a task's result could be fetched by another; call it without task",
                            self.server.name
                        ),
                    )));
                }
                _ => {}
            }
            // On a shared connection the token to route by is only the one the gateway put
            // in the params, never one read from them some other way.
            let mut client_token = None;
            opts.progress_token = None;
            if let Some(p) = params
                && let Some(shared) = shared::unique_progress_token(p)
            {
                if let Some((client, wire)) = shared.tokens {
                    client_token = Some(client);
                    opts.progress_token = Some(wire);
                }
                rewritten = shared.params;
                params = Some(&rewritten);
            }
            opts.origin = Some((self.inbox.clone(), client_token));
        }
        let events = opts.events.clone();
        let progress_token = opts.progress_token.clone();
        let origin = opts.origin.clone();
        let traceparent = opts.traceparent.clone();
        let awaiting = opts.awaiting.clone();
        let result = match conn.request(method, params, opts, timeout).await {
            Err(UpstreamError::SessionExpired { .. }) => {
                // 404 means the request was not processed: safe to retry on a new session.
                self.forget(&conn);
                let conn = self.connection().await?;
                self.still_on(on_connection)?;
                let retry = CallOpts {
                    events,
                    cancel: None,
                    progress_token,
                    origin,
                    mirrored: Vec::new(),
                    client_envelope: None,
                    traceparent: traceparent.clone(),
                    on_connection,
                    awaiting,
                };
                conn.request(method, params, retry, timeout).await
            }
            Err(e @ UpstreamError::Unavailable { .. }) => {
                self.server
                    .metrics
                    .set_upstream_up(self.server.label, false);
                if self.relayed.load(Ordering::Acquire) && self.relay_moved(&conn).await {
                    // The relay's replica stopped leading, or is gone: the next call follows
                    // the lease to whoever leads now.
                    self.forget(&conn);
                    tokio::spawn(async move { conn.shutdown().await });
                }
                Err(e)
            }
            Ok(Outcome::Result(r)) if stateless::input_required(&r).is_some() => {
                Err(self.server.unavailable(
                    "the server answered input_required, which a server of its revision cannot mean",
                ))
            }
            other => other,
        };
        if let (Some(s), Ok(Outcome::Result(_))) = (&mut subscribing, &result) {
            s.taken = true;
        }
        // Kept for the next connection (retried or not, what the server agreed to).
        if let Ok(Outcome::Result(_)) = &result
            && matches!(method, "resources/subscribe" | "resources/unsubscribe")
            && !self.is_shared()
            && let Some(uri) = params.and_then(uri_of)
        {
            self.note_subscription(&uri, method == "resources/subscribe");
        }
        result
    }

    /// Calls a 2026-07-28 server: the envelope in `_meta`, the request mirrored in headers.
    /// An `input_required` answer goes back to a 2026 client as it is (it retries itself);
    /// for a session's client the link asks the questions on the call's stream, as server
    /// requests, and retries with the answers.
    async fn call_stateless(
        &self,
        conn: &Arc<Connection>,
        method: &str,
        params: Option<&[u8]>,
        mut opts: CallOpts,
    ) -> Result<Outcome, UpstreamError> {
        match method {
            // The revision has neither: the level travels with each request, and a server
            // that answers is alive.
            "logging/setLevel" => {
                // A level of the revision's, or none (a client's string is kept for the
                // session's life, and sent with every request).
                let level = params
                    .and_then(level_of)
                    .filter(|l| crate::mcp::revision::LOG_LEVELS.contains(&l.as_str()));
                *self.log_level.lock().unwrap_or_else(|e| e.into_inner()) = level;
                return Ok(Outcome::Result(Bytes::from_static(b"{}")));
            }
            "ping" => return Ok(Outcome::Result(Bytes::from_static(b"{}"))),
            // The revision watches resources on the listen stream: the link's stream asks
            // for these, and a change of them opens it anew.
            "resources/subscribe" | "resources/unsubscribe" => {
                let Connection::Http(h) = &**conn else {
                    return Err(self.server.unavailable("not an HTTP server"));
                };
                let Some(uri) = params.and_then(uri_of) else {
                    return Ok(Outcome::Error(jsonrpc::error_object(
                        code::INVALID_PARAMS,
                        &format!("{method} needs params.uri"),
                    )));
                };
                let on = method == "resources/subscribe";
                return Ok(match h.watch(&uri, on) {
                    Ok(changed) => {
                        self.note_subscription(&uri, on);
                        if changed && self.listen.load(Ordering::Relaxed) {
                            h.reopen_listen_stream(conn.clone());
                        }
                        Outcome::Result(Bytes::from_static(b"{}"))
                    }
                    Err(why) => Outcome::Error(jsonrpc::error_object(code::INVALID_PARAMS, &why)),
                });
            }
            _ => {}
        }
        // A 2026 client's own envelope (the front took it out of the params), else the
        // session's.
        let own;
        let (envelope, client_driven, left) = match &opts.client_envelope {
            // UTF-8: the front took it out of a `str` (checked again: one pass, no copy).
            Some(client) => (
                std::str::from_utf8(&client.members).unwrap_or_default(),
                true,
                client.left.as_ref(),
            ),
            None => {
                own = self.envelope();
                (&*own, false, None)
            }
        };
        let prepared = match stateless::prepare(method, params, envelope, client_driven, left) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Outcome::Error(jsonrpc::error_object(
                    code::INVALID_PARAMS,
                    &e,
                )));
            }
        };
        let timeout = self.server.config.call_timeout;
        let cancel = opts.cancel.take();
        let events = opts.events.take();
        let progress_token = opts.progress_token.take();
        let traceparent = opts.traceparent.take();
        let opts_checked = opts.on_connection.is_some();
        // Pinned where it is built: moved into a deadline's future, the rounds' KiB would be
        // copied on every call.
        let rounds = std::pin::pin!(async {
            let mut params = prepared.params.clone();
            // The client's answers the retry's params were copied from: slices of its
            // response bodies, kept so that those hold their room while the copy lives.
            let mut _answered: Vec<(String, Bytes)> = Vec::new();
            let mut marks_reread = false;
            let mut round = 0;
            loop {
                let marks = if method == "tools/call" {
                    Some(self.tool_marks(conn, marks_reread).await)
                } else {
                    None
                };
                let round_opts = CallOpts {
                    events: events.clone(),
                    progress_token: progress_token.clone(),
                    mirrored: stateless::mirrored_headers(method, &prepared, marks.as_deref()),
                    traceparent: traceparent.clone(),
                    ..CallOpts::default()
                };
                let outcome = conn
                    .request(method, Some(&params), round_opts, timeout)
                    .await?;
                if let Outcome::Error(e) = &outcome
                    && marks.is_some()
                    && !marks_reread
                    && jsonrpc::error_code(e) == Some(code::HEADER_MISMATCH)
                {
                    // The tool's marks may have changed since they were read: once more, with
                    // the tool list read again. A call checked against the pins is not sent
                    // to a tool that changed: the link counts as reached anew, and the call
                    // is checked again first.
                    if opts_checked {
                        self.generation.fetch_add(1, Ordering::AcqRel);
                        return Err(UpstreamError::Reconnected {
                            server: self.server.name.clone(),
                        });
                    }
                    marks_reread = true;
                    continue;
                }
                if let Outcome::Error(e) = &outcome
                    && (jsonrpc::error_code(e) == Some(code::HEADER_MISMATCH)
                        || jsonrpc::error_code(e) == Some(code::UNSUPPORTED_PROTOCOL_VERSION))
                {
                    // What the gateway sent was refused, not what the client asked: the
                    // server's fault or ours, either way not the client's to fix.
                    return Err(self.server.unavailable_saying(
                        format!(
                            "the server refused the gateway's request with error {}",
                            jsonrpc::error_code(e).unwrap_or(0)
                        ),
                        e,
                    ));
                }
                let Outcome::Result(result) = &outcome else {
                    return Ok(outcome);
                };
                let asked = match stateless::input_required(result) {
                    None => return Ok(outcome),
                    Some(Err(why)) => return Err(self.server.unavailable(why)),
                    // Only the methods whose retries carry answers may ask: questions put in
                    // answer to a list or a completion would be asked of the client for
                    // nothing (the retry cannot carry them), round after round.
                    Some(Ok(_)) if !stateless::may_ask(method) => {
                        return Err(self.server.unavailable(format!(
                            "the server answered {method} with input_required, which only tools/call, prompts/get and resources/read may"
                        )));
                    }
                    // A 2026 client answers for itself (the front checks each question).
                    Some(Ok(_)) if prepared.client_driven => return Ok(outcome),
                    Some(Ok(asked)) => asked,
                };
                round += 1;
                if round > MAX_INPUT_ROUNDS {
                    return Err(self.server.unavailable(format!(
                        "the server asked for input more than {MAX_INPUT_ROUNDS} times in one call"
                    )));
                }
                let answers = match self.ask_client(asked.requests, &events, timeout).await {
                    Ok(a) => a,
                    Err(refusal) => return Ok(refusal),
                };
                params = prepared.retry(&answers, asked.state.as_deref());
                _answered = answers;
            }
        });
        // One deadline for the whole call, questions and all, as for a server of an earlier
        // revision that waits on its client within the call. An answer ready in time wins.
        let result = tokio::select! {
            biased;
            r = rounds => r,
            _ = tokio::time::sleep(timeout) => Err(UpstreamError::Timeout {
                server: self.server.name.clone(),
                timeout,
            }),
            _ = cancelled(cancel) => Err(UpstreamError::Cancelled),
        };
        if let Err(UpstreamError::Unavailable { .. }) = &result {
            // The next call connects anew, and asks the server again what it speaks.
            self.forget(conn);
        }
        result
    }

    /// Puts a 2026-07-28 server's questions to the session's client, as server requests on the
    /// call's stream, and collects the answers by the server's keys. A client that answers
    /// with an error, or not within `timeout`, fails the call with that reason.
    async fn ask_client(
        &self,
        requests: Vec<stateless::InputRequest>,
        events: &Option<super::EventSink>,
        timeout: std::time::Duration,
    ) -> Result<Vec<(String, Bytes)>, Outcome> {
        struct Asked<'a> {
            link: &'a Link,
            numbers: Vec<u64>,
        }
        impl Drop for Asked<'_> {
            // Questions left unanswered (the call timed out, was cancelled, or another question
            // failed) are withdrawn: the client hears so, and its session forgets them.
            fn drop(&mut self) {
                let unanswered: Vec<u64> = {
                    let mut asks = self.link.asks.lock().unwrap_or_else(|e| e.into_inner());
                    self.numbers
                        .iter()
                        .filter(|n| asks.remove(n).is_some())
                        .copied()
                        .collect()
                };
                for n in unanswered {
                    let params = format!(r#"{{"requestId":{}}}"#, self.link.ask_id(n));
                    let frame =
                        jsonrpc::notification("notifications/cancelled", Some(params.as_bytes()));
                    if let Ok(msg) = jsonrpc::parse(frame) {
                        self.link.inbox.deliver(Route::default(), msg);
                    }
                }
            }
        }
        let mut asked = Asked {
            link: self,
            numbers: Vec::with_capacity(requests.len()),
        };
        let mut waiting = Vec::with_capacity(requests.len());
        for q in requests {
            let n = self.next_ask.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.asks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(n, tx);
            asked.numbers.push(n);
            let id = self.ask_id(n);
            let frame = jsonrpc::request(id.as_bytes(), &q.method, q.params.as_deref());
            let Ok(msg) = jsonrpc::parse(frame) else {
                return Err(Outcome::Error(jsonrpc::error_object(
                    code::INTERNAL_ERROR,
                    &format!("the server's input request {:?} is not valid JSON", q.key),
                )));
            };
            self.inbox.deliver(Route::related(events.clone()), msg);
            waiting.push((q.key, q.method, rx));
        }
        let mut answers = Vec::with_capacity(waiting.len());
        for (key, method, rx) in waiting {
            let refused = |why: String| {
                Outcome::Error(jsonrpc::error_object(
                    code::INTERNAL_ERROR,
                    &format!(
                        "the server {} asked the client {method} ({key:?}): {why}",
                        self.server.name
                    ),
                ))
            };
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(Outcome::Result(r))) => answers.push((key, r)),
                Ok(Ok(Outcome::Error(e))) => {
                    return Err(refused(format!(
                        "the client answered with an error: {}",
                        String::from_utf8_lossy(&e)
                    )));
                }
                Ok(Err(_)) => return Err(refused("the question was dropped".into())),
                Err(_) => {
                    return Err(refused(format!("no answer within {timeout:?}")));
                }
            }
        }
        Ok(answers)
    }

    /// The id of the link's own question `n` (raw JSON): the link's nonce keeps it apart from
    /// any id a server of its own may use.
    fn ask_id(&self, n: u64) -> String {
        format!("{ASK_ID_PREFIX}{:016x}-{n}\"", self.ask_nonce)
    }

    /// The number of the link's own question whose id is `id`, if it is one.
    fn ask_number(&self, id: &[u8]) -> Option<u64> {
        let rest = std::str::from_utf8(id).ok()?.strip_prefix(ASK_ID_PREFIX)?;
        let (nonce, n) = rest.strip_suffix('"')?.split_once('-')?;
        (u64::from_str_radix(nonce, 16).ok()? == self.ask_nonce)
            .then(|| n.parse().ok())
            .flatten()
    }

    /// The tool arguments a 2026-07-28 server's schemas mark for `Mcp-Param-*` headers: its
    /// tool list read once per connection, within one call's deadline (and again when
    /// `reread`, after the server said the headers were wrong, or [`UNFINISHED_LIST_KEPT`]
    /// after a reading that did not reach its end). A list that cannot be read marks nothing.
    async fn tool_marks(&self, conn: &Arc<Connection>, reread: bool) -> Arc<ToolHeaders> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut known = self.marks.lock().await;
        if let Some((g, marks, unfinished)) = &*known
            && *g == generation
            && !reread
            && unfinished.is_none_or(|t| t.elapsed() < UNFINISHED_LIST_KEPT)
        {
            return marks.clone();
        }
        let mut marks = ToolHeaders::default();
        let timeout = self.server.config.call_timeout;
        // The whole list within one call's deadline: a server slow to page does not hold the
        // link's calls for a deadline a page.
        let read = async {
            let mut cursor: Option<String> = None;
            for _ in 0..MAX_MARK_PAGES {
                let params = match &cursor {
                    Some(c) => format!(
                        r#"{{"cursor":{},"_meta":{{{}}}}}"#,
                        serde_json::to_string(c).unwrap_or_default(),
                        self.envelope()
                    ),
                    None => format!(r#"{{"_meta":{{{}}}}}"#, self.envelope()),
                };
                let opts = CallOpts {
                    mirrored: vec![(
                        ::http::HeaderName::from_static("mcp-method"),
                        ::http::HeaderValue::from_static("tools/list"),
                    )],
                    ..CallOpts::default()
                };
                let page = match conn
                    .request("tools/list", Some(params.as_bytes()), opts, timeout)
                    .await
                {
                    Ok(Outcome::Result(page)) => page,
                    _ => return false,
                };
                match marks.learn(&page) {
                    Ok(Some(next)) => cursor = Some(next),
                    Ok(None) => return true,
                    Err(_) => return false,
                }
            }
            false
        };
        let complete = tokio::time::timeout(timeout, read).await.unwrap_or(false);
        let marks = Arc::new(marks);
        let unfinished = (!complete).then(std::time::Instant::now);
        *known = Some((generation, marks.clone(), unfinished));
        marks
    }

    /// Sends a notification if connected (a disconnected upstream has nothing to be told).
    pub async fn notify(&self, method: &str, params: Option<&[u8]>) {
        if let Some(c) = self.live() {
            let _ = c.notify(method, params).await;
        }
    }

    /// Relays the client's response to a server→client request (or takes it, when the link
    /// asked it on a 2026-07-28 server's behalf).
    pub async fn respond(&self, id: &[u8], outcome: &Outcome) {
        if let Some(n) = self.ask_number(id) {
            let waiting = self
                .asks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&n);
            // One of the link's own (its nonce says so): a late answer has nobody to reach.
            if let Some(tx) = waiting {
                let _ = tx.send(outcome.clone());
            }
            return;
        }
        if let Some(c) = self.live() {
            let _ = c.send(jsonrpc::response(id, outcome)).await;
        }
    }

    /// The upstream session (`Mcp-Session-Id`) this link holds with an HTTP server, if any,
    /// and the revision it speaks.
    pub fn upstream_session(&self) -> Option<(String, Option<String>)> {
        match &*self.live()? {
            Connection::Http(h) => Some((h.session_id()?, h.protocol_version())),
            Connection::Stdio(_) => None,
        }
    }

    /// Relays the client's answer to a server request that another replica's upstream session
    /// `session` (speaking `version`) sent: straight to the server, in that session
    /// (configured HTTP servers only).
    pub async fn respond_in(
        &self,
        session: &str,
        version: Option<&str>,
        id: &[u8],
        outcome: &Outcome,
    ) {
        let Transport::Http { url, headers } = &self.server.config.transport else {
            tracing::info!(upstream = %self.server.name, "an answer for a server request another replica relayed cannot reach it");
            return;
        };
        let Ok(headers) = self.headers(headers) else {
            return;
        };
        let conn = super::http::Connection::new(
            self.server.clone(),
            url.clone(),
            headers,
            self.inbox.clone(),
        )
        .with_credential(self.credential())
        .in_session(session, version);
        if let Some(conn) = conn
            && let Err(e) = self
                .server
                .sent_in_time(conn.send(jsonrpc::response(id, outcome)))
                .await
        {
            tracing::debug!(upstream = %self.server.name, "an answer for another replica's server request failed: {e}");
        }
    }

    /// Keeps a server→client stream (HTTP GET) open from now on, on this and later connections.
    pub fn open_listen_stream(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.listen.store(true, Ordering::Relaxed);
        if let Some(c) = self.live()
            && let Connection::Http(h) = &*c
        {
            h.open_listen_stream(c.clone());
        }
    }

    /// Whether the orchestrator now names another way to the server than `conn`'s relay (a
    /// failed call alone says nothing: the relay session still holds the client's others).
    async fn relay_moved(&self, conn: &Connection) -> bool {
        let (Some(o), Connection::Http(h)) = (&self.server.orchestrated, conn) else {
            return false;
        };
        match o.runtime.endpoint(&self.server.name).await {
            Ok(crate::orchestrator::Endpoint::Relay { url, .. }) => *h.url() != *url,
            _ => true,
        }
    }

    /// Drops `conn` as the link's connection; its listen stream stops when the next
    /// connection's opens (forgotten alone, it would go on for ever, delivering an old
    /// session's messages beside the new one's). The server lost the session, or cannot be
    /// reached: nothing is sent to end it (a DELETE would wake a sleeping server for nothing).
    /// A shared connection is others' too; its owner replaces it.
    fn forget(&self, conn: &Arc<Connection>) {
        let forgotten = {
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            match cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                true => cur.take(),
                false => None,
            }
        };
        if let Some(old) = forgotten
            && !self.is_shared()
        {
            let earlier = self
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(old);
            if let Some(earlier) = earlier {
                earlier.stop_listening();
            }
        }
    }

    /// Ends the upstream session (a shared one is only left: other sessions still use it).
    pub async fn close(&self) {
        // No new connection from now on; a handshake already under way finishes first (it
        // holds `connecting`), so what it stores is shut down here rather than left running.
        self.closed.store(true, Ordering::Release);
        let _serial = self.connecting.lock().await;
        self.stop_retired();
        let conn = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let membership = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        if membership.is_some() {
            drop(membership);
            // A principal's own process stops with the last session of theirs.
            if let Some(o) = &self.server.orchestrated {
                o.shared.release(self.principal.as_ref()).await;
            }
            return;
        }
        if let Some(c) = conn {
            c.shutdown().await;
        }
        self.free_private_slot();
    }

    /// Shuts down the link's own connection (never a shared one, which others use) and gives
    /// back its process slot.
    async fn stop_own_connection(&self) {
        let own = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = own.filter(|_| !self.is_shared()) {
            c.shutdown().await;
        }
        self.free_private_slot();
    }

    /// Gives back the slot of the link's own process (it has stopped, or is about to).
    fn free_private_slot(&self) {
        drop(
            self.private_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

/// `params.level` of `logging/setLevel`.
fn level_of(params: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct P {
        level: String,
    }
    serde_json::from_slice::<P>(params).ok().map(|p| p.level)
}

/// Resolves when the client cancels (never, without a cancel channel or once it is dropped).
async fn cancelled(cancel: Option<oneshot::Receiver<()>>) {
    let fired = match cancel {
        Some(rx) => rx.await.is_ok(),
        None => false,
    };
    if !fired {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::announces_changes;

    #[test]
    fn only_a_declared_list_changed_allows_caching() {
        let init = br#"{"capabilities":{"tools":{"listChanged":true},"prompts":{},"resources":{"listChanged":false,"subscribe":true}}}"#;
        assert!(announces_changes(init, "tools"));
        assert!(!announces_changes(init, "prompts"));
        assert!(!announces_changes(init, "resources"));
        assert!(!announces_changes(init, "logging"));
        assert!(!announces_changes(
            br#"{"capabilities":{"tools":{"listChanged":"yes"}}}"#,
            "tools"
        ));
        assert!(!announces_changes(b"not json", "tools"));
    }
}
