//! One upstream MCP session shared by every client session.
//!
//! A stdio server run by the orchestrator is one long-lived process (one pod) with one MCP
//! session inside it, so client sessions cannot each have their own. The gateway initializes
//! it once, in its own name, and multiplexes calls over it: request ids are already numbered
//! per connection; progress tokens are replaced by unique ones and restored on the way back;
//! what the server sends about a call goes to the session that made it.
//!
//! Nothing one session says or receives may reach another principal through the shared
//! process: notifications about the server's lists reach every session (they carry no caller's
//! data); `resources/updated` reaches only the sessions subscribed to that URI (the gateway
//! keeps the subscriptions and subscribes upstream once per URI); other notifications that
//! cannot be attributed to a call (log lines above all) are dropped; requests that concern no
//! call are answered by the gateway (`ping`) or refused, since no single client can be asked.
//! `logging/setLevel` is answered by the gateway: one session must not change what the
//! shared server logs for everyone.
//!
//! A server defined with `sharing: per-principal` has one such shared session per principal
//! (a private process each, see [`SharedServer`]); `per-session` needs no sharing at all (each
//! link starts its own process).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use dashmap::DashMap;

use super::{Connection, Inbox, Recipient, Route, Server, UpstreamError, initialize, stdio};
use crate::mcp::jsonrpc::{self, Kind, Message, Outcome, code};
use crate::orchestrator::{Sharing, StdioEndpoint};

/// Most resources one session may subscribe to on a shared connection (as many as a link
/// subscribes to anew on a new connection of its own).
pub const MAX_MEMBER_SUBSCRIPTIONS: usize = 256;
/// Most resources the sessions of one shared connection may subscribe to, all together.
pub const MAX_SHARED_SUBSCRIPTIONS: usize = 4096;
/// Most resources one principal's sessions may subscribe to on a shared connection together
/// (each counted once, however many of its sessions hold it): a quarter of what all may, so
/// that one caller's sessions cannot take every one.
pub const MAX_PRINCIPAL_SUBSCRIPTIONS: usize = MAX_SHARED_SUBSCRIPTIONS / 4;

/// Sessions by membership number, and resource subscriptions by URI.
#[derive(Default)]
struct Members {
    sessions: HashMap<u64, Joined>,
    subscriptions: HashMap<String, HashSet<u64>>,
    /// Resources each principal's sessions subscribe to (authenticated ones).
    by_principal: HashMap<Arc<str>, usize>,
    /// For each resource, how many of each principal's sessions hold it (so that the counts
    /// above move only with a principal's first and last session on it, at no scan).
    holders: HashMap<(Arc<str>, String), usize>,
}

/// A session in a shared connection.
struct Joined {
    inbox: Inbox,
    /// How many URIs of `Members::subscriptions` hold it.
    subscribed: usize,
    /// Its session's principal (`None`: unauthenticated, or another replica's relay).
    principal: Option<Arc<str>>,
}

/// What a session's (un)subscription means for the upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Forward it: the first subscriber to a URI, or the last to leave it.
    Forward,
    /// Answer locally: the upstream's subscription is unchanged.
    Local,
}

/// Why a session may not subscribe to one more resource of a shared server.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooManySubscriptions {
    /// The session holds [`MAX_MEMBER_SUBSCRIPTIONS`] already.
    #[error(
        "this session already subscribes to {MAX_MEMBER_SUBSCRIPTIONS} resources of the server, as many as a session may"
    )]
    Session,
    /// The sessions sharing the server hold [`MAX_SHARED_SUBSCRIPTIONS`] already.
    #[error(
        "the sessions sharing this server already subscribe to {MAX_SHARED_SUBSCRIPTIONS} resources of it, as many as they may together; retry once some unsubscribe"
    )]
    Shared,
    /// The principal's sessions hold [`MAX_PRINCIPAL_SUBSCRIPTIONS`] already.
    #[error(
        "this principal's sessions already subscribe to {MAX_PRINCIPAL_SUBSCRIPTIONS} resources of the server, as many as one principal may; unsubscribe some first"
    )]
    Principal,
}

impl TooManySubscriptions {
    /// The JSON-RPC error code: the session's own cap is its request's fault; the shared one
    /// is other sessions' load.
    pub fn code(&self) -> i64 {
        match self {
            TooManySubscriptions::Session => code::INVALID_PARAMS,
            TooManySubscriptions::Shared | TooManySubscriptions::Principal => code::TOO_BUSY,
        }
    }
}

/// The shared upstream session of one orchestrated stdio server.
pub struct SharedConnection {
    current: tokio::sync::Mutex<Option<(Arc<Connection>, Bytes, u64)>>,
    members: Arc<Mutex<Members>>,
    next_member: AtomicU64,
}

/// A session's place in a shared connection; leaving it is dropping it.
pub struct Member {
    members: Weak<Mutex<Members>>,
    id: u64,
}

impl Member {
    /// Records a `resources/subscribe` (`on`) or `resources/unsubscribe` of `uri`; `Err` when
    /// a new subscription would pass a cap (the map is kept for the session's life).
    pub fn subscribe(&self, uri: &str, on: bool) -> Result<Subscription, TooManySubscriptions> {
        let Some(a) = self.members.upgrade() else {
            return Ok(Subscription::Local);
        };
        let mut m = lock(&a);
        if !on {
            return Ok(if m.leave(self.id, uri) {
                Subscription::Forward
            } else {
                Subscription::Local
            });
        }
        let Members {
            sessions,
            subscriptions,
            by_principal,
            holders,
        } = &mut *m;
        let Some(principal) = sessions.get(&self.id).map(|j| j.principal.clone()) else {
            return Ok(Subscription::Local);
        };
        let subscribers = subscriptions.get(uri);
        if subscribers.is_some_and(|s| s.contains(&self.id)) {
            return Ok(Subscription::Local);
        }
        // A resource another session of the principal holds is not one more of its own.
        let held = principal.as_ref().map(|p| (p.clone(), uri.to_owned()));
        let new_to_it = held.as_ref().is_some_and(|key| !holders.contains_key(key));
        let joined = sessions.get_mut(&self.id).expect("looked up above");
        if joined.subscribed >= MAX_MEMBER_SUBSCRIPTIONS {
            return Err(TooManySubscriptions::Session);
        }
        if let Some(p) = principal.as_ref().filter(|_| new_to_it)
            && by_principal
                .get(p)
                .is_some_and(|n| *n >= MAX_PRINCIPAL_SUBSCRIPTIONS)
        {
            return Err(TooManySubscriptions::Principal);
        }
        if subscribers.is_none() && subscriptions.len() >= MAX_SHARED_SUBSCRIPTIONS {
            return Err(TooManySubscriptions::Shared);
        }
        joined.subscribed += 1;
        if let Some(key) = held {
            if new_to_it {
                *by_principal.entry(key.0.clone()).or_default() += 1;
            }
            *holders.entry(key).or_default() += 1;
        }
        let subscribers = subscriptions.entry(uri.to_owned()).or_default();
        let first = subscribers.is_empty();
        subscribers.insert(self.id);
        Ok(if first {
            Subscription::Forward
        } else {
            Subscription::Local
        })
    }

    /// Forgets the session's subscription to `uri` that the upstream did not take (its
    /// forwarded `resources/subscribe` failed), so that it holds no room in the caps.
    pub fn subscribe_failed(&self, uri: &str) {
        if let Some(a) = self.members.upgrade() {
            lock(&a).leave(self.id, uri);
        }
    }
}

impl Members {
    /// Takes session `id` off the subscribers of `uri`; whether it was the last one.
    fn leave(&mut self, id: u64, uri: &str) -> bool {
        let Some(subscribers) = self.subscriptions.get_mut(uri) else {
            return false;
        };
        if !subscribers.remove(&id) {
            return false;
        }
        if let Some(joined) = self.sessions.get_mut(&id) {
            joined.subscribed -= 1;
            // The principal's count goes down with its last session holding the resource.
            if let Some(p) = joined.principal.clone() {
                let key = (p, uri.to_owned());
                if let Some(n) = self.holders.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.holders.remove(&key);
                        forget(&mut self.by_principal, &key.0, 1);
                    }
                }
            }
        }
        if subscribers.is_empty() {
            self.subscriptions.remove(uri);
            true
        } else {
            false
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(a) = self.members.upgrade() {
            let mut m = lock(&a);
            // The upstream keeps a subscription nobody holds until it restarts; updates for it
            // reach no one (there is no connection here to unsubscribe on, and it is harmless).
            let held: Vec<String> = m
                .subscriptions
                .iter()
                .filter(|(_, s)| s.contains(&self.id))
                .map(|(uri, _)| uri.clone())
                .collect();
            for uri in held {
                m.leave(self.id, &uri);
            }
            m.sessions.remove(&self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes `n` off `principal`'s count of subscriptions, and the count with its last one.
fn forget(by_principal: &mut HashMap<Arc<str>, usize>, principal: &Arc<str>, n: usize) {
    if let Some(held) = by_principal.get_mut(principal) {
        *held = held.saturating_sub(n);
        if *held == 0 {
            by_principal.remove(principal);
        }
    }
}

/// What the gateway tells a shared server about itself: it relays sampling and elicitation to
/// the client whose call asked for them.
fn init_params() -> Bytes {
    Bytes::from(format!(
        r#"{{"protocolVersion":"{}","capabilities":{{"sampling":{{}},"elicitation":{{}}}},"clientInfo":{{"name":"gatehouse","version":"{}"}}}}"#,
        crate::mcp::revision::LATEST,
        env!("CARGO_PKG_VERSION")
    ))
}

impl Default for SharedConnection {
    fn default() -> Self {
        SharedConnection {
            current: tokio::sync::Mutex::new(None),
            members: Arc::new(Mutex::new(Members::default())),
            next_member: AtomicU64::new(1),
        }
    }
}

impl SharedConnection {
    /// The live shared connection and its `initialize` result, attaching and initializing
    /// first when there is none (first use, or the process was restarted).
    ///
    /// `private`: the connection is to a process of its own (`per-principal`), not to the
    /// server's one process, started for `principal`. `epoch`: the server's idle epoch; a
    /// connection from another (before the last sleep, or a change of leader) is to a process
    /// that is gone or going, or no longer ours to reach, however alive it looks.
    pub async fn connect(
        &self,
        server: &Arc<Server>,
        endpoint: &StdioEndpoint,
        private: bool,
        epoch: u64,
        principal: Option<&str>,
    ) -> Result<(Arc<Connection>, Bytes), UpstreamError> {
        let mut current = self.current.lock().await;
        if let Some((conn, result, made)) = current.as_ref()
            && conn.is_alive()
            && (*made == epoch || private)
        {
            return Ok((conn.clone(), result.clone()));
        }
        if let Some((old, _, _)) = current.take() {
            old.shutdown().await;
        }
        let stream = if private {
            endpoint.open_private(principal).await
        } else {
            endpoint.open().await
        }
        .map_err(|e| server.unavailable(format!("cannot attach: {e}")))?;
        let all_members = Arc::new(AllMembers {
            members: self.members.clone(),
            conn: Mutex::new(Weak::new()),
        });
        let inbox = Inbox {
            recipient: all_members.clone(),
            index: server.index,
        };
        let conn = Arc::new(Connection::Stdio(stdio::Connection::over(
            server.clone(),
            stream.reader,
            stream.writer,
            inbox,
            stream.process,
        )));
        *lock(&all_members.conn) = Arc::downgrade(&conn);
        let result = initialize(&conn, &init_params(), server.config.connect_timeout).await?;
        tracing::info!(server = %server.name, endpoint = %endpoint.describe(), "initialized the shared session");
        *current = Some((conn.clone(), result.clone(), epoch));
        Ok((conn, result))
    }

    /// Adds a session of `principal` to the members (who hear unrelated notifications).
    pub fn join(&self, inbox: Inbox, principal: Option<&Arc<str>>) -> Member {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        lock(&self.members).sessions.insert(
            id,
            Joined {
                inbox,
                subscribed: 0,
                principal: principal.cloned(),
            },
        );
        Member {
            members: Arc::downgrade(&self.members),
            id,
        }
    }

    /// Sessions currently using the connection.
    pub fn members(&self) -> usize {
        lock(&self.members).sessions.len()
    }

    /// Closes the attachment (the server was removed, or the gateway stops).
    pub async fn close(&self) {
        if let Some((conn, _, _)) = self.current.lock().await.take() {
            conn.shutdown().await;
        }
    }
}

/// A slot for one single-session process: one of the server's, and one of its principal's
/// share (authenticated sessions).
pub struct PrivateSlot {
    _global: tokio::sync::OwnedSemaphorePermit,
    _own: Option<OwnShare>,
}

/// A principal's part of a [`PrivateSlot`]; its share leaves the map with its last slot.
struct OwnShare {
    taken: Option<tokio::sync::OwnedSemaphorePermit>,
    principal: Arc<str>,
    share: usize,
    shares: Arc<DashMap<Arc<str>, Arc<tokio::sync::Semaphore>>>,
}

impl Drop for OwnShare {
    fn drop(&mut self) {
        drop(self.taken.take());
        forget_idle(&self.shares, &self.principal, self.share);
    }
}

/// Removes `principal`'s share from `shares` if all of it is free and only the map holds it
/// (under the map's lock on the key, under which slots are taken).
fn forget_idle(
    shares: &DashMap<Arc<str>, Arc<tokio::sync::Semaphore>>,
    principal: &Arc<str>,
    share: usize,
) {
    shares.remove_if(principal, |_, s| {
        Arc::strong_count(s) == 1 && s.available_permits() == share
    });
}

/// The shared sessions of one orchestrated stdio server: one for every session (`shared`), or
/// one per principal (`per-principal`), so that principals never share a process.
pub struct SharedServer {
    everyone: Arc<SharedConnection>,
    /// By principal (an unauthenticated session gets a process of its own instead).
    by_principal: DashMap<Arc<str>, Arc<SharedConnection>>,
    /// Processes for single sessions still allowed (`orchestrator.max_private_processes`).
    private: Arc<tokio::sync::Semaphore>,
    max_private: usize,
    /// What each principal holds of them, up to `per_principal`: one caller's sessions cannot
    /// hold every slot and leave the server unreachable to everyone else.
    private_by_principal: Arc<DashMap<Arc<str>, Arc<tokio::sync::Semaphore>>>,
    per_principal: usize,
    /// Set when the server is removed: single-session processes stop at their next use.
    closed: std::sync::atomic::AtomicBool,
    /// Bumped when the server is defined anew: older private processes stop at their next use.
    definition: AtomicU64,
}

impl SharedServer {
    /// A server allowing `max_private` processes for single sessions, `per_principal` of them
    /// to one principal's sessions.
    pub fn new(max_private: usize, per_principal: usize) -> Self {
        SharedServer {
            everyone: Arc::default(),
            by_principal: DashMap::new(),
            private: Arc::new(tokio::sync::Semaphore::new(max_private)),
            max_private,
            private_by_principal: Arc::default(),
            per_principal,
            closed: std::sync::atomic::AtomicBool::new(false),
            definition: AtomicU64::new(0),
        }
    }

    /// Which definition private processes started now run (see [`Self::redefine`]).
    pub fn definition(&self) -> u64 {
        self.definition.load(Ordering::Acquire)
    }

    /// The server was defined anew: every principal's process stops now (its sessions stay
    /// joined and start the new definition at their next call), single-session processes at
    /// their next use.
    pub async fn redefine(&self) {
        self.definition.fetch_add(1, Ordering::AcqRel);
        let all: Vec<Arc<SharedConnection>> = self
            .by_principal
            .iter()
            .map(|e| e.value().clone())
            .collect();
        for shared in all {
            shared.close().await;
        }
    }

    /// Whether the server was removed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The cap on processes for single sessions.
    pub fn max_private(&self) -> usize {
        self.max_private
    }

    /// What one principal may hold of the processes for single sessions.
    pub fn principal_share(&self) -> usize {
        self.per_principal
    }

    /// A slot for one more single-session process of a session of `principal`, if the cap
    /// and the principal's share of it allow. (Unauthenticated sessions have no share of
    /// their own: with authentication off, everyone is one caller.)
    pub fn private_slot(&self, principal: Option<&Arc<str>>) -> Option<PrivateSlot> {
        let share = self.principal_share();
        let own = match principal {
            Some(p) => {
                let held = self
                    .private_by_principal
                    .entry(p.clone())
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(share)))
                    .clone();
                let taken = held.clone().try_acquire_owned().ok();
                let Some(taken) = taken else {
                    drop(held);
                    self.forget_idle(p, share);
                    return None;
                };
                Some((taken, held, p.clone()))
            }
            None => None,
        };
        let global = self.private.clone().try_acquire_owned().ok();
        let Some(global) = global else {
            if let Some((taken, held, p)) = own {
                drop((taken, held));
                self.forget_idle(&p, share);
            }
            return None;
        };
        Some(PrivateSlot {
            _global: global,
            _own: own.map(|(taken, _, principal)| OwnShare {
                taken: Some(taken),
                principal,
                share,
                shares: self.private_by_principal.clone(),
            }),
        })
    }

    /// Drops a principal's share once it holds nothing and nobody holds it.
    fn forget_idle(&self, principal: &Arc<str>, share: usize) {
        forget_idle(&self.private_by_principal, principal, share);
    }

    /// Joins the shared session a session of `principal` uses under `sharing`. With
    /// `per-principal`, joining happens under the map's entry lock, so [`Self::release`]
    /// never removes a session someone is joining.
    pub fn join(
        &self,
        sharing: Sharing,
        principal: Option<&Arc<str>>,
        inbox: Inbox,
    ) -> (Member, Arc<SharedConnection>) {
        match (sharing, principal) {
            (Sharing::PerPrincipal, Some(principal)) => {
                let entry = self.by_principal.entry(principal.clone()).or_default();
                // Its own connection: the principal may use all of it.
                (entry.join(inbox, None), entry.clone())
            }
            _ => (self.everyone.join(inbox, principal), self.everyone.clone()),
        }
    }

    /// Stops `principal`'s process once no session of theirs uses it.
    pub async fn release(&self, principal: Option<&Arc<str>>) {
        let Some(principal) = principal else {
            return;
        };
        if let Some((_, shared)) = self
            .by_principal
            .remove_if(principal, |_, s| s.members() == 0)
        {
            shared.close().await;
        }
    }

    /// Sessions using the server's shared sessions, all principals together.
    pub fn members(&self) -> usize {
        self.everyone.members() + self.by_principal.iter().map(|e| e.members()).sum::<usize>()
    }

    /// Closes every shared session (the server was removed, or the gateway stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.everyone.close().await;
        let all: Vec<Arc<SharedConnection>> = self
            .by_principal
            .iter()
            .map(|e| e.value().clone())
            .collect();
        self.by_principal.clear();
        for shared in all {
            shared.close().await;
        }
    }
}

/// The owner of a shared connection: hands unrelated messages to every session.
struct AllMembers {
    members: Arc<Mutex<Members>>,
    conn: Mutex<Weak<Connection>>,
}

impl Recipient for AllMembers {
    fn deliver(&self, _index: usize, route: Route, msg: Message) {
        match &msg.kind {
            Kind::Request { id, method, .. } => {
                let outcome = if &**method == "ping" {
                    Outcome::Result(Bytes::from_static(b"{}"))
                } else {
                    Outcome::Error(jsonrpc::error_object(
                        code::INVALID_REQUEST,
                        &format!(
                            "{method} is not related to a client call in progress; this server is shared by every client session of the gateway, so no single client can answer it"
                        ),
                    ))
                };
                let frame = jsonrpc::response(id, &outcome);
                if let Some(conn) = lock(&self.conn).upgrade() {
                    let server = conn.server().clone();
                    server.refuse_in_background(async move {
                        let _ = conn.send(frame).await;
                    });
                }
            }
            Kind::Notification { method, params } => {
                // What every member gets is the notice alone, rebuilt once: each member copies
                // what it is handed, and a server padding its notices with megabytes must not
                // cost the gateway that much for every session it serves.
                let (members, notice): (Vec<Inbox>, Option<Bytes>) = {
                    let m = lock(&self.members);
                    match &**method {
                        "notifications/tools/list_changed"
                        | "notifications/prompts/list_changed"
                        | "notifications/resources/list_changed" => (
                            m.sessions.values().map(|j| j.inbox.clone()).collect(),
                            Some(jsonrpc::notification(method, None)),
                        ),
                        "notifications/resources/updated" => {
                            let uri = params.as_deref().and_then(super::uri_of);
                            let members = uri
                                .as_ref()
                                .and_then(|u| m.subscriptions.get(u))
                                .map(|ids| {
                                    ids.iter()
                                        .filter_map(|id| m.sessions.get(id))
                                        .map(|j| j.inbox.clone())
                                        .collect()
                                })
                                .unwrap_or_default();
                            let notice = uri.map(|u| {
                                let mut p = b"{\"uri\":".to_vec();
                                crate::json_string::put(&mut p, &u);
                                p.push(b'}');
                                jsonrpc::notification(method, Some(&p))
                            });
                            (members, notice)
                        }
                        _ => {
                            tracing::debug!(
                                ?method,
                                "dropped a notification of a shared server that no call explains"
                            );
                            (Vec::new(), None)
                        }
                    }
                };
                let Some(notice) = notice.filter(|_| !members.is_empty()) else {
                    return;
                };
                let Ok(notice) = jsonrpc::parse(notice) else {
                    return;
                };
                for m in members {
                    m.deliver(route.clone(), notice.clone());
                }
            }
            Kind::Response { .. } => {}
        }
    }
}

/// The params of a call on a shared connection, as the server must see them.
pub(crate) struct SharedParams {
    /// The client's progress token (raw JSON, as it sent it) and the unique one that replaced
    /// it, when the params carry one.
    pub tokens: Option<(Bytes, Bytes)>,
    /// What to send instead of the client's params.
    pub params: Vec<u8>,
}

/// Gives a call on a shared connection a progress token no other session uses.
///
/// Progress is routed by token, so a client must not get a token of its choosing to the
/// server: one that another session holds would hand it that session's progress, or let it
/// send progress to that session. The token is read the way a server reads it (keys
/// unescaped, the last of duplicate keys) and the params are re-encoded, so the server sees
/// exactly one `_meta` holding exactly the gateway's token, whatever its parser does with
/// duplicate keys; keys a lenient server could read as `_meta` or `progressToken` are
/// dropped. `None`: the params cannot carry a token (no key can spell `progressToken`, or they
/// are not an object) and go as they are.
pub(crate) fn unique_progress_token(params: &[u8]) -> Option<SharedParams> {
    use crate::mcp::lookalike::read_as;
    use serde_json::value::RawValue;
    type RawObject = std::collections::BTreeMap<String, Box<RawValue>>;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if !super::params::may_name_progress_token(params) {
        return None;
    }
    // Raw values keep every other member byte for byte (a large integer token included).
    let mut p: RawObject = serde_json::from_slice(params).ok()?;
    // Refused on the way in (`request_progress_token`), and dropped here all the same: a key a
    // lenient server reads as `_meta` or `progressToken` would carry a token of the client's.
    p.retain(|key, _| key == "_meta" || read_as(key, &["_meta"]).is_none());
    let mut tokens = None;
    if let Some(meta) = p.get("_meta")
        && let Ok(mut meta) = serde_json::from_str::<RawObject>(meta.get())
    {
        let client = meta.remove("progressToken");
        meta.retain(|key, _| read_as(key, &["progressToken"]).is_none());
        if let Some(client) = client {
            let token = format!("gatehouse-{}", NEXT.fetch_add(1, Ordering::Relaxed));
            let wire = serde_json::value::to_raw_value(&token).ok()?;
            tokens = Some((
                Bytes::copy_from_slice(client.get().as_bytes()),
                Bytes::copy_from_slice(wire.get().as_bytes()),
            ));
            meta.insert("progressToken".into(), wire);
        }
        p.insert("_meta".into(), serde_json::value::to_raw_value(&meta).ok()?);
    }
    Some(SharedParams {
        tokens,
        params: serde_json::to_vec(&p).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{CallRoute, Pending};

    /// Records what it is handed: (index, had a related stream, method, params).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, bool, String, String)>>);

    impl Recipient for Recorder {
        fn deliver(&self, index: usize, route: Route, msg: Message) {
            let params = match &msg.kind {
                Kind::Notification { params, .. } => params
                    .as_deref()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let method = msg.method().unwrap_or_default().to_owned();
            lock(&self.0).push((index, route.related.is_some(), method, params));
        }
    }

    fn notification(method: &str, params: &str) -> Message {
        jsonrpc::parse(jsonrpc::notification(method, Some(params.as_bytes()))).unwrap()
    }

    #[test]
    fn a_shared_connection_routes_call_messages_to_the_caller_and_the_rest_to_everyone() {
        let caller = Arc::new(Recorder::default());
        let everyone = Arc::new(Recorder::default());
        let owner = Inbox {
            recipient: everyone.clone(),
            index: 0,
        };
        let pending = Pending::default();
        let (events, _rx) = tokio::sync::mpsc::channel(4);
        let (tx, _out) = tokio::sync::oneshot::channel();
        pending.insert(
            7,
            tx,
            CallRoute {
                events: Some(events.into()),
                progress_token: Some(Bytes::from_static(b"\"gatehouse-1\"")),
                origin: Some((
                    Inbox {
                        recipient: caller.clone(),
                        index: 3,
                    },
                    Some(Bytes::from_static(b"42")),
                )),
                awaiting: None,
            },
        );
        pending.dispatch(
            notification(
                "notifications/progress",
                r#"{"progressToken":"gatehouse-1","progress":1}"#,
            ),
            &owner,
        );
        pending.dispatch(
            notification("notifications/message", r#"{"level":"info","data":"x"}"#),
            &owner,
        );
        pending.dispatch(
            notification("notifications/tools/list_changed", "{}"),
            &owner,
        );

        let got = lock(&caller.0).clone();
        // The log line is not attributable (no token; one call in flight proves nothing on a
        // shared server): it reaches the owner, which decides (and drops it).
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].0, got[0].1, got[0].2.as_str()),
            (3, true, "notifications/progress")
        );
        let p: serde_json::Value = serde_json::from_str(&got[0].3).unwrap();
        assert_eq!(p["progressToken"], 42, "the client's own token is restored");
        let all = lock(&everyone.0).clone();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].2, "notifications/message");
        assert_eq!(
            (all[1].1, all[1].2.as_str()),
            (false, "notifications/tools/list_changed")
        );
    }

    /// The shared connection's owner: list changes reach everyone, resource updates only the
    /// subscribers of that URI, log lines no one; each as the notice alone (whatever else a
    /// server puts in it, every member would copy).
    #[test]
    fn unattributed_notifications_reach_only_who_may_see_them() {
        let shared = SharedConnection::default();
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let ma = shared.join(
            Inbox {
                recipient: a.clone(),
                index: 0,
            },
            None,
        );
        let _mb = shared.join(
            Inbox {
                recipient: b.clone(),
                index: 0,
            },
            None,
        );
        let owner = AllMembers {
            members: shared.members.clone(),
            conn: Mutex::new(Weak::new()),
        };
        assert_eq!(ma.subscribe("file:///a", true), Ok(Subscription::Forward));
        assert_eq!(ma.subscribe("file:///a", true), Ok(Subscription::Local));
        for (method, params) in [
            (
                "notifications/message",
                r#"{"level":"info","data":"secret of a"}"#,
            ),
            (
                "notifications/resources/updated",
                r#"{"padding":"xxxxxxxx","uri":"file:///a"}"#,
            ),
            ("notifications/resources/updated", r#"{"uri":"file:///b"}"#),
            (
                "notifications/prompts/list_changed",
                r#"{"padding":"xxxxxxxx"}"#,
            ),
        ] {
            owner.deliver(0, Route::related(None), notification(method, params));
        }
        let methods = |r: &Recorder| -> Vec<(String, String)> {
            lock(&r.0)
                .iter()
                .map(|e| (e.2.clone(), e.3.clone()))
                .collect()
        };
        assert_eq!(
            methods(&a),
            [
                (
                    "notifications/resources/updated".to_owned(),
                    r#"{"uri":"file:///a"}"#.to_owned()
                ),
                (
                    "notifications/prompts/list_changed".to_owned(),
                    String::new()
                )
            ]
        );
        assert_eq!(
            methods(&b),
            [(
                "notifications/prompts/list_changed".to_owned(),
                String::new()
            )]
        );
        // The last subscriber leaving unsubscribes upstream; a member leaving drops the rest.
        assert_eq!(ma.subscribe("file:///a", false), Ok(Subscription::Forward));
        assert_eq!(ma.subscribe("file:///a", false), Ok(Subscription::Local));
        assert_eq!(ma.subscribe("file:///c", true), Ok(Subscription::Forward));
        drop(ma);
        assert!(lock(&shared.members).subscriptions.is_empty());
        assert_eq!(shared.members(), 1);
    }

    fn member(shared: &SharedConnection) -> Member {
        member_of(shared, None)
    }

    fn member_of(shared: &SharedConnection, principal: Option<&str>) -> Member {
        shared.join(
            Inbox {
                recipient: Arc::new(Recorder::default()),
                index: 0,
            },
            principal.map(Arc::from).as_ref(),
        )
    }

    /// One principal's sessions hold at most a quarter of a shared connection's
    /// subscriptions: another principal still subscribes; leaving gives them back.
    #[test]
    fn one_principals_subscriptions_leave_the_others_room() {
        let shared = SharedConnection::default();
        let uri = |who: usize, n: usize| format!("file:///{who}/{n}");
        let mut greedy = Vec::new();
        let mut held = 0;
        'fill: for who in 0..16 {
            let m = member_of(&shared, Some("greedy"));
            for n in 0..MAX_MEMBER_SUBSCRIPTIONS {
                match m.subscribe(&uri(who, n), true) {
                    Ok(_) => held += 1,
                    Err(e) => {
                        assert_eq!(e, TooManySubscriptions::Principal);
                        greedy.push(m);
                        break 'fill;
                    }
                }
            }
            greedy.push(m);
        }
        assert_eq!(held, MAX_PRINCIPAL_SUBSCRIPTIONS);
        // At its cap, one more session of it may still watch what its others watch: the
        // resource is counted once.
        let more = member_of(&shared, Some("greedy"));
        assert_eq!(more.subscribe(&uri(0, 0), true), Ok(Subscription::Local));
        assert_eq!(more.subscribe(&uri(0, 1), false), Ok(Subscription::Local));
        drop(more);
        let other = member_of(&shared, Some("other"));
        assert_eq!(
            other.subscribe(&uri(99, 0), true),
            Ok(Subscription::Forward)
        );
        // Greedy's sessions leave: their subscriptions no longer count against it.
        greedy.clear();
        let again = member_of(&shared, Some("greedy"));
        assert_eq!(again.subscribe(&uri(0, 0), true), Ok(Subscription::Forward));
        assert_eq!(lock(&shared.members).by_principal.get("greedy"), Some(&1));
        // Nothing else is kept of what left: other's resource and greedy's new one.
        assert_eq!(lock(&shared.members).holders.len(), 2);
    }

    /// One session cannot grow the map kept for the shared server without bound, nor all of
    /// them together; a refusal changes nothing.
    #[test]
    fn subscriptions_are_capped_per_session_and_per_shared_connection() {
        let shared = SharedConnection::default();
        let a = member(&shared);
        let uri = |who: usize, n: usize| format!("file:///{who}/{n}");
        for n in 0..MAX_MEMBER_SUBSCRIPTIONS {
            assert_eq!(a.subscribe(&uri(0, n), true), Ok(Subscription::Forward));
        }
        assert_eq!(
            a.subscribe(&uri(0, MAX_MEMBER_SUBSCRIPTIONS), true),
            Err(TooManySubscriptions::Session)
        );
        // Subscribing again to what it holds is no new subscription.
        assert_eq!(a.subscribe(&uri(0, 0), true), Ok(Subscription::Local));
        // Another session is not held back by this one's cap, and shares its URIs.
        let b = member(&shared);
        assert_eq!(b.subscribe(&uri(0, 0), true), Ok(Subscription::Local));
        assert_eq!(a.subscribe(&uri(0, 0), false), Ok(Subscription::Local));
        assert_eq!(
            a.subscribe(&uri(0, MAX_MEMBER_SUBSCRIPTIONS), true),
            Ok(Subscription::Forward)
        );
        drop(b);
        assert_eq!(
            lock(&shared.members).subscriptions.len(),
            MAX_MEMBER_SUBSCRIPTIONS
        );

        // Sessions together: fill the connection to its cap.
        let mut others = Vec::new();
        let mut held = MAX_MEMBER_SUBSCRIPTIONS;
        for who in 1.. {
            let m = member(&shared);
            for n in 0..MAX_MEMBER_SUBSCRIPTIONS.min(MAX_SHARED_SUBSCRIPTIONS - held) {
                assert_eq!(m.subscribe(&uri(who, n), true), Ok(Subscription::Forward));
                held += 1;
            }
            others.push(m);
            if held == MAX_SHARED_SUBSCRIPTIONS {
                break;
            }
        }
        let late = member(&shared);
        let refused = late.subscribe("file:///new", true).unwrap_err();
        assert_eq!(refused, TooManySubscriptions::Shared);
        assert_eq!(refused.code(), code::TOO_BUSY);
        assert!(refused.to_string().contains("4096"), "{refused}");
        // A URI someone holds costs the connection nothing more.
        assert_eq!(late.subscribe(&uri(1, 0), true), Ok(Subscription::Local));
        assert_eq!(
            lock(&shared.members).subscriptions.len(),
            MAX_SHARED_SUBSCRIPTIONS
        );
        // A session leaving gives its room back.
        drop(others.pop());
        assert_eq!(
            late.subscribe("file:///new", true),
            Ok(Subscription::Forward)
        );
        assert_eq!(TooManySubscriptions::Session.code(), code::INVALID_PARAMS);
        assert!(TooManySubscriptions::Session.to_string().contains("256"));
    }

    /// A subscription the upstream refused holds no room, and the next subscriber asks the
    /// upstream again.
    #[test]
    fn a_failed_subscribe_is_forgotten() {
        let shared = SharedConnection::default();
        let a = member(&shared);
        for n in 0..MAX_MEMBER_SUBSCRIPTIONS + 10 {
            let uri = format!("file:///refused/{n}");
            assert_eq!(a.subscribe(&uri, true), Ok(Subscription::Forward));
            a.subscribe_failed(&uri);
        }
        assert!(lock(&shared.members).subscriptions.is_empty());
        let b = member(&shared);
        assert_eq!(b.subscribe("file:///x", true), Ok(Subscription::Forward));
        b.subscribe_failed("file:///x");
        assert_eq!(a.subscribe("file:///x", true), Ok(Subscription::Forward));
        // Another session's subscription to the URI stays.
        assert_eq!(b.subscribe("file:///x", true), Ok(Subscription::Local));
        a.subscribe_failed("file:///x");
        assert_eq!(b.subscribe("file:///x", false), Ok(Subscription::Forward));
    }

    #[test]
    fn progress_tokens_are_made_unique_and_the_rest_is_kept() {
        let token = |params: &[u8]| {
            let r = unique_progress_token(params).expect("a token to replace");
            let (client, wire) = r.tokens.expect("a token");
            let v: serde_json::Value = serde_json::from_slice(&r.params).unwrap();
            (client, wire, v)
        };
        let (ca, a, v) = token(br#"{"name":"x","_meta":{"progressToken":1,"k":2}}"#);
        let (_, b, _) = token(br#"{"_meta":{"progressToken":1}}"#);
        assert_ne!(a, b);
        assert_eq!(&ca[..], b"1");
        assert_eq!(v["name"], "x");
        assert_eq!(v["_meta"]["k"], 2);
        assert_eq!(
            serde_json::to_vec(&v["_meta"]["progressToken"]).unwrap(),
            a.to_vec()
        );
        assert!(unique_progress_token(br#"{"name":"x"}"#).is_none());
        // The client's token comes back exactly as sent, however large.
        let (big, _, _) = token(br#"{"_meta":{"progressToken":123456789012345678901234567890}}"#);
        assert_eq!(&big[..], b"123456789012345678901234567890");
    }

    /// Ways a client could try to get a token of its choosing to a shared server.
    #[test]
    fn no_client_chosen_token_reaches_a_shared_server() {
        // Another session's token (far above any this test process hands out).
        let stolen = "gatehouse-999999";
        for params in [
            // Duplicate keys: parsers differ on which one wins.
            r#"{"_meta":{"progressToken":0,"progressToken":"gatehouse-999999"}}"#,
            r#"{"_meta":{"progressToken":"gatehouse-999999","progressToken":0}}"#,
            r#"{"_meta":{"progressToken":"gatehouse-999999"},"_meta":{}}"#,
            r#"{"_meta":{},"_meta":{"progressToken":"gatehouse-999999"}}"#,
            // An escaped key.
            r#"{"_meta":{"\u0070rogressToken":"gatehouse-999999"}}"#,
            // Keys a lenient decoder reads as `progressToken` (Go's is case-insensitive).
            r#"{"_meta":{"ProgressToken":"gatehouse-999999"}}"#,
            r#"{"_meta":{"progressToken":1,"PROGRESSTOKEN":"gatehouse-999999"}}"#,
            "{\"_meta\":{\"progre\u{17F}sToken\":\"gatehouse-999999\"}}",
            "{\"_meta\":{\"progressTo\u{212A}en\":\"gatehouse-999999\"}}",
            r#"{"_meta":{"progressToken\u0000":"gatehouse-999999"}}"#,
            r#"{"_meta":{"Progress\u0054oken":"gatehouse-999999"}}"#,
            r#"{"_META":{"progressToken":"gatehouse-999999"}}"#,
            r#"{"_meta":{"progressToken":1},"_Meta":{"progressToken":"gatehouse-999999"}}"#,
        ] {
            let r = unique_progress_token(params.as_bytes()).expect(params);
            let sent = String::from_utf8(r.params.clone()).unwrap();
            assert!(
                !sent.contains(stolen),
                "{params} went to the server as {sent}"
            );
            // One `_meta`, at most one token, and it is the gateway's.
            let v: serde_json::Value = serde_json::from_slice(&r.params).unwrap();
            if let Some((_, wire)) = &r.tokens {
                assert_eq!(
                    serde_json::to_vec(&v["_meta"]["progressToken"]).unwrap(),
                    wire.to_vec()
                );
            }
        }
        // `_meta` that is not an object, or params that are not one: no token a server reads,
        // and nothing for the gateway to route by.
        let r = unique_progress_token(br#"{"_meta":["gatehouse-999999"],"x":"progressToken"}"#)
            .unwrap();
        assert!(r.tokens.is_none());
        assert!(unique_progress_token(br#"[{"progressToken":"gatehouse-999999"}]"#).is_none());
    }
}
