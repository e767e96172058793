//! One downstream session's connection to one upstream server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::config::Transport;
use crate::mcp::jsonrpc::{self, Outcome};
use crate::orchestrator::Sharing;

use super::{
    CallOpts, Connection, Inbox, Recipient, Server, UpstreamError, initialize, orchestrated,
    shared, stdio, uri_of,
};

/// One downstream session's connection to one upstream server.
///
/// Usually the connection is the link's own upstream session. For a stdio server run by the
/// orchestrator it is the server's one [`shared::SharedConnection`] session, which the link joins.
pub struct Link {
    server: Arc<Server>,
    /// The session's principal: with `sharing: per-principal`, whose process to use.
    principal: Option<Arc<str>>,
    inbox: Inbox,
    init_params: Bytes,
    current: Mutex<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
    init_result: Mutex<Option<Bytes>>,
    pub(crate) generation: AtomicU64,
    listen: AtomicBool,
    /// Membership of a shared connection, once joined.
    shared: Mutex<Option<(shared::Member, Arc<shared::SharedConnection>)>>,
    /// Set by [`Link::close`]: the link never connects again.
    closed: AtomicBool,
    /// First pages of the lists whose changes the upstream promises to announce.
    lists: Mutex<ListCache>,
    /// Held while the link's own process of an orchestrated server runs.
    private_slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// The server definition the link's own process runs (`SharedServer::definition`).
    private_definition: AtomicU64,
    /// The connection goes through the leading replica's relay: when the relay fails, the
    /// next call asks the orchestrator again (leadership may have moved).
    relayed: AtomicBool,
    /// Never through a relay: this link is a relay's, on the replica that leads.
    attach_only: bool,
}

/// First pages of list methods, valid for one upstream session (link generation) until the
/// upstream announces a change (`notifications/*/list_changed`).
#[derive(Default)]
struct ListCache {
    /// Bumped by every change announcement: a fetch that began before one is not kept.
    epoch: u64,
    pages: Vec<(&'static str, u64, Bytes)>,
}

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

impl Link {
    /// A link that will initialize with `init_params` (the client's capabilities and info).
    pub fn new(
        server: Arc<Server>,
        principal: Option<Arc<str>>,
        recipient: Arc<dyn Recipient>,
        init_params: Bytes,
    ) -> Self {
        Link {
            principal,
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
            closed: AtomicBool::new(false),
            lists: Mutex::new(ListCache::default()),
            private_slot: Mutex::new(None),
            private_definition: AtomicU64::new(0),
            relayed: AtomicBool::new(false),
            attach_only: false,
        }
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
        if let Outcome::Result(page) = &outcome
            && !relayed
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
        self.server
            .metrics
            .set_upstream_up(self.server.label, result.is_ok());
        let conn = result?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        self.generation.fetch_add(1, Ordering::Relaxed);
        if self.listen.load(Ordering::Relaxed)
            && let Connection::Http(h) = &*conn
        {
            h.open_listen_stream(conn.clone());
        }
        Ok(conn)
    }

    async fn handshake(&self) -> Result<Arc<Connection>, UpstreamError> {
        let server = &self.server;
        let conn = Arc::new(match &server.config.transport {
            Transport::Stdio { .. } => Connection::Stdio(stdio::Connection::spawn(
                server.clone(),
                self.inbox.clone(),
            )?),
            Transport::Http { url, headers } => Connection::Http(super::http::Connection::new(
                server.clone(),
                url.clone(),
                headers.clone(),
                self.inbox.clone(),
            )),
            Transport::HttpSse { url, headers } => Connection::Stdio(
                super::http_sse::connect(server.clone(), url, headers, self.inbox.clone()).await?,
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
                match ready {
                    orchestrated::Ready::Relay(..) if self.attach_only => {
                        return Err(server.unavailable(
                            "this replica no longer leads; ask the one that holds the lease",
                        ));
                    }
                    orchestrated::Ready::Relay(url, headers) => {
                        // The leader's relay joins the shared session on our behalf; a
                        // membership from when this replica led is left.
                        drop(self.shared.lock().unwrap_or_else(|e| e.into_inner()).take());
                        Connection::Http(
                            super::http::Connection::new(
                                server.clone(),
                                url,
                                headers,
                                self.inbox.clone(),
                            )
                            .with_client(super::http::relay_client()),
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
                        let slot = o.shared.private_slot().ok_or_else(|| {
                            server.unavailable(format!(
                                "the server already runs {} processes for single sessions (orchestrator.max_private_processes)",
                                o.shared.max_private()
                            ))
                        })?;
                        *self.private_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
                        let stream = endpoint
                            .open_private()
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
                                    *joined = Some((membership, shared.clone()));
                                    shared
                                }
                            }
                        };
                        let private = sharing == Sharing::PerPrincipal;
                        let (conn, result) = shared.connect(server, &endpoint, private).await?;
                        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                        return Ok(conn);
                    }
                }
            }
        });
        let result = initialize(&conn, &self.init_params, server.config.connect_timeout).await?;
        *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        Ok(conn)
    }

    /// Calls a method upstream, reconnecting once if the upstream forgot our session.
    pub async fn call(
        &self,
        method: &str,
        params: Option<&[u8]>,
        mut opts: CallOpts,
    ) -> Result<Outcome, UpstreamError> {
        let timeout = self.server.config.call_timeout;
        let conn = self.connection().await?;
        // Several sessions share this connection: give the call a progress token no other
        // session uses, and remember whose call it is.
        let rewritten;
        let mut params = params;
        if self.is_shared() {
            match method {
                // One session must not change what the shared server logs for all of them.
                "logging/setLevel" => return Ok(Outcome::Result(Bytes::from_static(b"{}"))),
                "resources/subscribe" | "resources/unsubscribe" => {
                    let uri = params.and_then(uri_of).ok_or_else(|| {
                        self.server
                            .unavailable("resources/subscribe needs params.uri")
                    })?;
                    let on = method == "resources/subscribe";
                    let forward = self
                        .shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|(m, _)| m.subscribe(&uri, on));
                    if forward != Some(shared::Subscription::Forward) {
                        return Ok(Outcome::Result(Bytes::from_static(b"{}")));
                    }
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
        match conn.request(method, params, opts, timeout).await {
            Err(UpstreamError::SessionExpired { .. }) => {
                // 404 means the request was not processed: safe to retry on a new session.
                self.forget(&conn);
                let conn = self.connection().await?;
                let retry = CallOpts {
                    events,
                    cancel: None,
                    progress_token,
                    origin,
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
            other => other,
        }
    }

    /// Sends a notification if connected (a disconnected upstream has nothing to be told).
    pub async fn notify(&self, method: &str, params: Option<&[u8]>) {
        if let Some(c) = self.live() {
            let _ = c.notify(method, params).await;
        }
    }

    /// Relays the client's response to a server→client request.
    pub async fn respond(&self, id: &[u8], outcome: &Outcome) {
        if let Some(c) = self.live() {
            let _ = c.send(jsonrpc::response(id, outcome)).await;
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

    fn forget(&self, conn: &Arc<Connection>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *cur = None;
        }
    }

    /// Ends the upstream session (a shared one is only left: other sessions still use it).
    pub async fn close(&self) {
        // No new connection from now on; a handshake already under way finishes first (it
        // holds `connecting`), so what it stores is shut down here rather than left running.
        self.closed.store(true, Ordering::Release);
        let _serial = self.connecting.lock().await;
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
