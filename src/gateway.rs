//! The gateway's shared state: configuration, upstream servers and their names (the
//! [`Topology`]), the orchestrator, sessions, metrics.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;

use crate::audit::Audit;
use crate::auth::{Auth, Principal};
use crate::config::profiles::{Grantees, ProfileConfig};
use crate::config::{Config, Transport, UpstreamConfig};
use crate::mcp::handler::Services;
use crate::mcp::router::Router;
use crate::mcp::seal::Sealer;
use crate::mcp::session::Session;
use crate::mcp::session_token;
use crate::metrics::Metrics;
use crate::orchestrator::{McpServerSpec, Phase, Runtime};
use crate::pins::Pins;
use crate::plugins::{PluginError, Plugins};
use crate::topology::Topology;
use crate::upstream::orchestrated::{Listings, Orchestrated};
use crate::upstream::shared::SharedServer;
use crate::upstream::{Server, http};

/// How long a stateless call waits for its client to retry with the answers it asked for.
const ROUND_TRIP_WAIT: Duration = Duration::from_secs(300);

/// Why a portable session cannot be restored here now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// `mcp.max_sessions` are open.
    Sessions,
    /// The principal has as many sessions open as it may (the cap).
    Principal(usize),
}

/// Deleted portable sessions a replica keeps a record of (about 32 bytes each).
pub const MAX_DELETED_SESSIONS: usize = 100_000;

/// How often a replica holding portable sessions asks the leading replica which sessions were
/// deleted on others (where replicas share plugin state): a deleted session ends everywhere
/// within about this.
const DELETIONS_EVERY: Duration = Duration::from_secs(1);
/// Where the leader logs a deletion, how long it waits to look (deletions logged meanwhile are
/// read in the same look).
const DELETIONS_LOGGED_GAP: Duration = Duration::from_millis(200);
/// The longest it waits between two looks while the leader cannot answer.
const DELETIONS_RETRY_MAX: Duration = Duration::from_secs(5);

/// Most deleted portable sessions of one principal a replica keeps a record of: one caller
/// deleting sessions without end makes room among its own.
const MAX_DELETED_PER_PRINCIPAL: usize = MAX_DELETED_SESSIONS / 4;

/// Portable sessions deleted here (DELETE), each refused until its id expires
/// (`mcp.session_max_age` after it was issued). Bounded: past [`MAX_DELETED_PER_PRINCIPAL`]
/// of one principal's, its deleted id that expires soonest makes room, and every id issued to
/// that principal no later than it is refused from then on (its `floors`); past
/// [`MAX_DELETED_SESSIONS`] in all (more than four principals near their bound), the same for everyone
/// (`floor`). So a session deleted here is never restored here; at worst, after that many
/// deletions within `session_max_age`, an older session that was not deleted is not restored
/// here either (its client opens a new one), and one principal's deletions cost only its own
/// sessions so.
struct Deleted {
    /// When each id was issued (Unix ms), a keyed hash of it, and one of its principal:
    /// soonest to expire first.
    ids: BTreeSet<(u64, u64, u64)>,
    /// Each principal's entries (issued, id hash), by the principal's hash.
    by_principal: std::collections::HashMap<u64, BTreeSet<(u64, u64)>>,
    /// Ids issued to a principal at or before its floor (Unix ms) are refused.
    floors: std::collections::HashMap<u64, u64>,
    /// Ids issued at or before this (Unix ms) are refused, whoever they were issued to.
    floor: u64,
    /// The hash's key, random: ids cannot be chosen to collide.
    keys: std::hash::RandomState,
}

impl Default for Deleted {
    fn default() -> Self {
        Deleted {
            ids: BTreeSet::new(),
            by_principal: Default::default(),
            floors: Default::default(),
            floor: 0,
            keys: std::hash::RandomState::new(),
        }
    }
}

impl Deleted {
    fn principal(&self, principal: Option<&str>) -> u64 {
        self.keys.hash_one(principal)
    }

    /// Whether the id issued to `principal` at `issued` is refused here.
    fn holds(&self, id: &str, issued: u64, principal: Option<&str>) -> bool {
        let p = self.principal(principal);
        issued <= self.floor
            || self.floors.get(&p).is_some_and(|f| issued <= *f)
            || self.ids.contains(&(issued, self.keys.hash_one(id), p))
    }

    /// Forgets one entry of principal `p`'s.
    fn forget(&mut self, p: u64, entry: (u64, u64)) {
        if let Some(its) = self.by_principal.get_mut(&p) {
            its.remove(&entry);
            if its.is_empty() {
                self.by_principal.remove(&p);
            }
        }
    }

    /// Records a deleted id of `principal`'s until it expires, `max_age` after `issued`.
    fn insert(&mut self, id: &str, issued: u64, principal: Option<&str>, now: u64, max_age: u64) {
        while let Some(&(at, h, p)) = self.ids.first()
            && at.saturating_add(max_age) < now
        {
            self.ids.pop_first();
            self.forget(p, (at, h));
        }
        self.floors
            .retain(|_, floor| floor.saturating_add(max_age) >= now);
        if issued.saturating_add(max_age) < now {
            return;
        }
        let (h, p) = (self.keys.hash_one(id), self.principal(principal));
        if !self.ids.insert((issued, h, p)) {
            return;
        }
        let its = self.by_principal.entry(p).or_default();
        its.insert((issued, h));
        if its.len() > MAX_DELETED_PER_PRINCIPAL
            && let Some((at, oldest)) = its.pop_first()
        {
            self.ids.remove(&(at, oldest, p));
            let floor = self.floors.entry(p).or_default();
            *floor = (*floor).max(at);
        }
        while self.ids.len() > MAX_DELETED_SESSIONS {
            if let Some((at, h, p)) = self.ids.pop_first() {
                self.forget(p, (at, h));
                self.floor = self.floor.max(at);
                tracing::debug!(
                    floor = at,
                    "more deleted portable sessions than a replica records: ids issued no later than the oldest are no longer restored here"
                );
            }
        }
    }
}

/// The `initialize` params of the upstream sessions kept for stateless clients. They declare what
/// the gateway can ask a stateless client within its request (`input_required`); whether the
/// client itself declared it is checked per request.
const STATELESS_UPSTREAM_INIT: &str = concat!(
    r#"{"protocolVersion":"2025-11-25","capabilities":{"sampling":{},"elicitation":{},"roots":{}},"clientInfo":{"name":"gatehouse","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}}"#
);

/// Everything a request may need, shared by all connections.
/// How long a starting gateway waits for the servers' shared lists before it serves.
const LISTINGS_LOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// The backend's document (a ConfigMap) where the replicas share servers' last lists.
pub const LISTINGS_DOCUMENT: &str = "gatehouse-listings";

pub struct Gateway {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The current servers; new sessions take this one.
    topology: ArcSwap<Topology>,
    /// The orchestrator running `servers` (and admin-added ones), when there are any.
    pub orchestrator: Option<Arc<dyn Runtime>>,
    /// The private registry's catalog, when the registry is on.
    pub registry: std::sync::OnceLock<Arc<crate::registry::Catalog>>,
    /// The shared upstream sessions of each orchestrated stdio server, by name.
    shared: DashMap<String, Arc<SharedServer>>,
    /// The last lists of each orchestrated server, by name (served while it sleeps).
    listings: DashMap<String, Arc<Listings>>,
    /// Where the replicas share those lists (when the backend keeps documents).
    shared_listings: Option<Arc<crate::upstream::orchestrated::SharedListings>>,
    /// The last definition the admin API gave each server (to tell a change from a re-apply).
    definitions: DashMap<String, McpServerSpec>,
    /// Held by each change the admin API makes to servers' definitions, from what it checks
    /// until it is applied (a check must not be outdated by the time it is acted on).
    pub admin_changes: tokio::sync::Mutex<()>,
    /// Serializes topology changes.
    changes: tokio::sync::Mutex<()>,
    client: http::Client,
    /// The client of remote servers: it connects only where the orchestrator allows.
    remote_client: http::Client,
    /// This gateway's mark on requests to remote servers (one that leads back is refused).
    pub via: ::http::HeaderValue,
    /// Open sessions by id (foldhash, not SipHash: looked up on every request, by ids the
    /// gateway drew at random).
    pub sessions: DashMap<Arc<str>, Arc<Session>, foldhash::fast::RandomState>,
    /// Open sessions per authenticated principal (bounded by `mcp.max_sessions_per_principal`).
    sessions_per_principal: DashMap<Arc<str>, usize>,
    /// Where stateless (2026-07-28) requests run: one hidden session per principal, profile
    /// and token grants, holding the upstream sessions the gateway keeps for them (principals
    /// never share one). foldhash: looked up on every stateless request.
    stateless: DashMap<StatelessKey, Arc<Session>, foldhash::fast::RandomState>,
    /// Stateless sessions a topology change replaced, ended once their requests finish.
    draining: std::sync::Mutex<Vec<Arc<Session>>>,
    /// 2024-11-05 HTTP+SSE clients by the id their endpoint names.
    pub sse_clients: DashMap<Arc<str>, Arc<crate::mcp::sse_client::SseClient>>,
    /// Stateless calls waiting for their client's answers (`input_required`).
    pub round_trips: crate::mcp::round_trip::RoundTrips,
    /// With session keys: seals portable session ids, which any replica holding the keys
    /// serves.
    portable: Option<Arc<Sealer>>,
    /// Serializes restoring portable sessions.
    restoring: std::sync::Mutex<()>,
    /// Portable sessions deleted here (DELETE), refused until their ids expire.
    deleted: std::sync::Mutex<Deleted>,
    /// Pages of the leader's log of deletions read so far that named any (changed under
    /// `restoring`): a restore that a page may have missed asks the leader again.
    deletions_heard: AtomicU64,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Client authentication.
    pub auth: Auth,
    /// Admin API authentication (no tokens: the admin API is off).
    pub admin_auth: Auth,
    /// Policy plugins (hot-reloadable).
    pub plugins: Arc<Plugins>,
    /// The audit trail (off unless configured).
    pub audit: Arc<Audit>,
    /// Approved tool definitions (when pinning is on).
    pub pins: Option<Arc<Pins>>,
    /// Records request spans (when traces are on).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The room client request bodies share (`mcp.max_bodies_bytes`), and each caller's part.
    pub bodies: crate::body_room::BodyRoom,
    /// The room answers share while their clients take them (`mcp.max_answers_bytes`).
    pub answers: Arc<crate::mcp::queued_bytes::AnswerRoom>,
    epoch: Instant,
}

impl Gateway {
    /// Builds the gateway from a validated configuration, loading its plugins; `orchestrator`
    /// runs the configured `servers` (without one, they are unavailable).
    pub fn new(
        config: Config,
        orchestrator: Option<Arc<dyn Runtime>>,
        audit: Audit,
        pins: Option<Arc<Pins>>,
        outbound_tls: Arc<rustls::ClientConfig>,
    ) -> Result<Arc<Gateway>, PluginError> {
        let plugins = Plugins::load(&config.plugins)?;
        let bodies =
            crate::body_room::BodyRoom::new(config.mcp.max_bodies_bytes, config.mcp.max_body_bytes);
        let round_trip_wait = ROUND_TRIP_WAIT.min(config.mcp.session_idle_timeout);
        let keys = config.mcp.session_keys.clone();
        // Servers may be defined later (admin API, McpServer resources): a profile naming one
        // that is not configured is not an error, but likely a typo.
        for p in &config.profiles {
            for s in &p.servers {
                if !config.upstreams.iter().any(|u| u.name == s.name) {
                    tracing::warn!(profile = %p.name, server = %s.name, "the profile names a server that is not configured (yet): it shows nothing of it until one by that name is defined");
                }
            }
        }
        let metrics =
            Metrics::with_collectors(vec![Box::new(crate::plugins::Exported(plugins.clone()))]);
        // The exporter needs a runtime: spawned here, it lives as long as any tracer does.
        let tracer = config.traces.as_ref().map(|t| {
            let (tracer, queue) = crate::trace::Tracer::new(t, metrics.trace_spans_dropped.clone());
            tokio::spawn(crate::trace::otlp::export(
                t.clone(),
                queue,
                http::client(&outbound_tls),
            ));
            tracer
        });
        if let Some(o) = config.audit.as_ref().and_then(|a| a.otlp.as_ref()) {
            audit.ship(
                o,
                http::client(&outbound_tls),
                metrics.audit_export_dropped.clone(),
            );
        }
        let client = http::client(&outbound_tls);
        let via = crate::upstream::via::mark();
        let remote_client = match orchestrator.as_ref().and_then(|o| o.remote_addresses()) {
            Some(check) => http::checked_client(&outbound_tls, check),
            None => client.clone(),
        };
        let shared_listings = orchestrator
            .as_ref()
            .and_then(|o| o.document(LISTINGS_DOCUMENT, "listings"))
            .map(crate::upstream::orchestrated::SharedListings::start);
        let gw = Gateway {
            answers: crate::mcp::queued_bytes::AnswerRoom::new(config.mcp.max_answers_bytes),
            tracer,
            audit: Arc::new(audit),
            pins,
            plugins,
            auth: Auth::new(&config, &outbound_tls),
            admin_auth: Auth::admin(&config.admin_tokens),
            topology: ArcSwap::from_pointee(Topology {
                servers: Vec::new(),
                router: Router::new(Vec::new(), String::new(), Default::default()),
            }),
            orchestrator,
            registry: std::sync::OnceLock::new(),
            shared: DashMap::new(),
            listings: DashMap::new(),
            shared_listings,
            definitions: DashMap::new(),
            admin_changes: tokio::sync::Mutex::new(()),
            changes: tokio::sync::Mutex::new(()),
            client,
            remote_client,
            via,
            config: Arc::new(config),
            sessions: DashMap::default(),
            sessions_per_principal: DashMap::new(),
            stateless: DashMap::default(),
            draining: std::sync::Mutex::new(Vec::new()),
            sse_clients: DashMap::new(),
            // With session keys, a requestState sealed by one replica opens on the others.
            round_trips: crate::mcp::round_trip::RoundTrips::new(
                match keys.0.is_empty() {
                    true => Sealer::random(0),
                    false => Sealer::from_keys(&keys.0),
                },
                round_trip_wait,
            ),
            portable: (!keys.0.is_empty()).then(|| Arc::new(Sealer::from_keys(&keys.0))),
            deleted: std::sync::Mutex::new(Default::default()),
            deletions_heard: AtomicU64::new(0),
            restoring: std::sync::Mutex::new(()),
            metrics,
            bodies,
            epoch: Instant::now(),
        };
        gw.topology
            .store(Arc::new(gw.build(gw.config.upstreams.clone())));
        Ok(Arc::new(gw))
    }

    /// What the method handlers use: the plugins and the metrics.
    pub fn services(&self) -> Services<'_> {
        Services {
            plugins: &self.plugins,
            metrics: &self.metrics,
            audit: &self.audit,
            pins: self.pins.as_ref(),
            envelope: None,
            trace: None,
            awaiting: None,
        }
    }

    /// The profile served at `/mcp/{name}`.
    pub fn profile(&self, name: &str) -> Option<&Arc<ProfileConfig>> {
        self.config.profiles.iter().find(|p| p.name == name)
    }

    /// Who may use the endpoint of `profile` (`None`: `/mcp` itself).
    pub fn grantees<'a>(&'a self, profile: Option<&'a ProfileConfig>) -> &'a Grantees {
        profile.map_or(&self.config.mcp.root_access, |p| &p.grant)
    }

    /// The servers new sessions see.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    fn build(&self, upstreams: Vec<UpstreamConfig>) -> Topology {
        let router = Router::new(
            upstreams.iter().map(|u| u.name.clone()).collect(),
            self.config.mcp.name_separator.clone(),
            self.config.mcp.prefix_names,
        )
        .with_resource_conflicts(self.config.mcp.resource_conflicts);
        let servers = upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| {
                let orchestrated = match (&u.transport, &self.orchestrator) {
                    (Transport::Orchestrated, Some(runtime)) => Some(Orchestrated {
                        runtime: runtime.clone(),
                        shared: self
                            .shared
                            .entry(u.name.clone())
                            .or_insert_with(|| {
                                Arc::new(SharedServer::new(
                                    self.config.orchestrator.max_private_processes,
                                    self.config.orchestrator.max_private_processes_per_principal,
                                ))
                            })
                            .clone(),
                        listings: self
                            .listings
                            .entry(u.name.clone())
                            .or_insert_with(|| {
                                Arc::new(match &self.shared_listings {
                                    Some(s) => Listings::shared(s.clone(), &u.name),
                                    None => Listings::default(),
                                })
                            })
                            .clone(),
                        wake_timeout: self.config.orchestrator.wake_timeout,
                        remote_http: self.remote_client.clone(),
                        via: self.via.clone(),
                    }),
                    _ => None,
                };
                let server = Server::new(i, u, self.client.clone(), self.metrics.clone());
                Arc::new(match orchestrated {
                    Some(o) => server.with_orchestrator(o),
                    None => server,
                })
            })
            .collect();
        Topology { servers, router }
    }

    /// Makes the topology follow the orchestrator: the configured upstreams and servers, then
    /// every other server it runs (added through the admin API, or `McpServer` resources),
    /// by name. Returns whether anything changed.
    pub async fn refresh_topology(&self) -> bool {
        let Some(runtime) = &self.orchestrator else {
            return false;
        };
        let _serial = self.changes.lock().await;
        let mut upstreams = self.config.upstreams.clone();
        for (name, status) in runtime.list().await {
            if status.phase != Phase::Removed && !upstreams.iter().any(|u| u.name == name) {
                upstreams.push(self.config.orchestrator.upstream(&name));
            }
        }
        let current = self.topology.load();
        let same = current.servers.len() == upstreams.len()
            && current
                .servers
                .iter()
                .zip(&upstreams)
                .all(|(s, u)| *s.name == *u.name);
        if same {
            return false;
        }
        let gone: Vec<String> = current
            .servers
            .iter()
            .filter(|s| !upstreams.iter().any(|u| *u.name == *s.name))
            .map(|s| s.name.to_string())
            .collect();
        let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        tracing::info!(servers = ?names, "serving a new set of upstreams to new sessions");
        let topology = Arc::new(self.build(upstreams));
        self.topology.store(topology.clone());
        // Stateless listen streams hear the change, then end: their clients listen again and
        // so reach the new servers. (A session made on the new servers meanwhile stays open.)
        for session in self
            .stateless
            .iter()
            .filter(|s| !Arc::ptr_eq(s.topology(), &topology))
        {
            end_listens_for_new_servers(&session);
        }
        for name in gone {
            self.definitions.remove(&name);
            self.listings.remove(&name);
            if let Some((_, shared)) = self.shared.remove(&name) {
                shared.close().await;
            }
        }
        true
    }

    /// Waits (briefly) until the servers' lists the replicas share are read.
    pub async fn listings_loaded(&self) {
        if let Some(s) = &self.shared_listings {
            s.loaded(LISTINGS_LOAD).await;
        }
    }

    /// The last definition this replica's admin API applied to a server.
    pub fn definition(&self, name: &str) -> Option<McpServerSpec> {
        self.definitions.get(name).map(|d| d.value().clone())
    }

    /// A server was defined through the admin API. When the definition differs from the last
    /// one (or the server ran before the gateway knew its definition), processes started for
    /// single sessions or principals stop, and the next call starts them from the new one.
    pub async fn defined(&self, name: &str, spec: McpServerSpec, existed: bool) {
        let changed = match self.definitions.insert(name.to_owned(), spec.clone()) {
            Some(old) => old != spec,
            None => existed,
        };
        let shared = self.shared.get(name).map(|s| s.value().clone());
        if changed && let Some(shared) = shared {
            shared.redefine().await;
        }
    }

    /// Runs [`Gateway::refresh_topology`] every `every` (the orchestrator's list is in memory).
    pub fn spawn_topology_refresh(
        self: &Arc<Self>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let gw = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match gw.upgrade() {
                    Some(gw) => {
                        gw.refresh_topology().await;
                    }
                    None => return,
                }
            }
        })
    }

    /// Opens a session with a fresh, unguessable id (sealed, when the gateway has session keys).
    pub fn new_session(
        &self,
        principal: Option<Principal>,
        profile: Option<&Arc<ProfileConfig>>,
        version: &'static str,
        init_params: Bytes,
        eager_listen: bool,
    ) -> Arc<Session> {
        self.new_session_on(principal, profile, version, init_params, eager_listen, true)
    }

    /// A session bound to one connection (an HTTP+SSE client's stream): never portable, its
    /// id never leaves this replica.
    pub fn new_local_session(
        &self,
        principal: Option<Principal>,
        version: &'static str,
        init_params: Bytes,
        eager_listen: bool,
    ) -> Arc<Session> {
        self.new_session_on(principal, None, version, init_params, eager_listen, false)
    }

    fn new_session_on(
        &self,
        principal: Option<Principal>,
        profile: Option<&Arc<ProfileConfig>>,
        version: &'static str,
        init_params: Bytes,
        eager_listen: bool,
        portable: bool,
    ) -> Arc<Session> {
        let sealer = self.portable.as_ref().filter(|_| portable);
        let portable_id = sealer.and_then(|sealer| {
            let token = session_token::SessionToken {
                p: principal.as_deref().map(str::to_owned),
                v: version.to_owned(),
                i: String::from_utf8_lossy(&init_params).into_owned(),
                l: eager_listen,
                t: session_token::now_ms(),
                f: profile.map(|p| p.name.clone()),
            };
            let id = session_token::issue(sealer, &token).map(|id| (Arc::from(id), token.t));
            if id.is_none() {
                tracing::warn!(
                    "the client's initialize params make too long a portable session id ({} bytes of params): this session lives on this replica only",
                    init_params.len()
                );
            }
            id
        });
        let issued = portable_id.as_ref().map(|(_, t)| *t);
        let id = portable_id.map_or_else(crate::mcp::session::new_id, |(id, _)| id);
        self.open_session(
            id,
            principal,
            profile,
            version,
            init_params,
            eager_listen,
            issued,
        )
    }

    /// A portable session (its id sealed by this gateway's session keys) that another replica
    /// opened, or this one before it ended here for idleness: opened again from its id, for
    /// its own principal and profile only, within `mcp.session_max_age` of its opening, unless
    /// it was deleted (here, or where replicas share state, on any of them). `Ok(None)`: not
    /// such an id; `Err`: no room for it now.
    pub async fn restore_session(
        &self,
        id: &str,
        principal: Option<&Principal>,
        profile: Option<&Arc<ProfileConfig>>,
    ) -> Result<Option<Arc<Session>>, NoRoom> {
        let Some((token, version)) = self.portable_token(id, principal, profile) else {
            return Ok(None);
        };
        let heard = self.deletions_heard.load(Ordering::Acquire);
        if self.deleted_elsewhere(id).await {
            // Asked again, this replica answers itself.
            self.record_deleted(id, token.t, token.p.as_deref());
            return Ok(None);
        }
        let session = {
            // Under the one lock that DELETE's record also takes: a session deleted here is
            // not restored by a request racing the DELETE, and two restores share one session.
            let _serial = self.restoring.lock().unwrap_or_else(|e| e.into_inner());
            if self
                .deleted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .holds(id, token.t, token.p.as_deref())
            {
                return Ok(None);
            }
            if let Some(s) = self.sessions.get(id) {
                return Ok(Some(s.clone()));
            }
            if self.sessions_held() >= self.config.mcp.max_sessions {
                return Err(NoRoom::Sessions);
            }
            if !self.may_open_session(principal, 0) {
                return Err(NoRoom::Principal(
                    self.config.mcp.max_sessions_per_principal,
                ));
            }
            tracing::debug!(session = %crate::mcp::session::log_id(id), "restored a portable session opened elsewhere");
            self.open_session(
                Arc::from(id),
                principal.cloned(),
                profile,
                version,
                Bytes::from(token.i),
                token.l,
                Some(token.t),
            )
        };
        // Deleted after the leader answered, and read in its log before the session was held
        // here (so not ended for it): the leader is asked again, and now knows.
        if self.deletions_heard.load(Ordering::Acquire) != heard && self.deleted_elsewhere(id).await
        {
            self.record_deleted(id, token.t, token.p.as_deref());
            self.end_session(id);
            return Ok(None);
        }
        Ok(Some(session))
    }

    /// What a portable session id carries, and its revision, if this replica honors it for
    /// `principal` at `profile` now: sealed by its keys, issued to that principal on that
    /// endpoint, within `mcp.session_max_age` (and not in the future), of a revision spoken
    /// here, and not deleted here. Anything else is no session (404), whatever is wrong.
    fn portable_token(
        &self,
        id: &str,
        principal: Option<&Principal>,
        profile: Option<&Arc<ProfileConfig>>,
    ) -> Option<(session_token::SessionToken, &'static str)> {
        let token = session_token::open(self.portable.as_ref()?, id)?;
        let max_age = self.config.mcp.session_max_age.as_millis() as u64;
        if token.p.as_deref() != principal.map(|p| &**p)
            || token.f.as_deref() != profile.map(|p| p.name.as_str())
            || !token.honored_at(session_token::now_ms(), max_age)
        {
            return None;
        }
        let version = crate::mcp::revision::SUPPORTED
            .iter()
            .find(|v| **v == token.v)?;
        let deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        (!deleted.holds(id, token.t, token.p.as_deref())).then_some((token, *version))
    }

    /// Whether the replicas' shared record says `id` was deleted: where replicas share plugin
    /// state, the leading replica keeps the deletions every replica tells it (each DELETE), and
    /// refuses any session-scope operation of a deleted session; one such read is the question.
    /// State not shared: `false`. The leader not answering within [`leader::TIMEOUT`]: `false`,
    /// logged (a restore is not refused while leadership moves, for a record that a leader
    /// that crashed loses anyway).
    ///
    /// [`leader::TIMEOUT`]: crate::plugins::leader::TIMEOUT
    async fn deleted_elsewhere(&self, id: &str) -> bool {
        let state = self.plugins.current().state().clone();
        if !state.shared() {
            return false;
        }
        let probe = crate::plugins::Asked {
            plugin: Arc::from(""),
            session: id.to_owned(),
            principal: None,
            action: crate::plugins::Action::Get {
                scope: crate::plugins::Scope::Session,
                key: String::new(),
            },
            limits: Default::default(),
        };
        match state.run(probe, crate::plugins::leader::TIMEOUT).await {
            Ok(_) => false,
            Err(crate::plugins::leader::Unavailable::SessionDeleted) => true,
            Err(e) => {
                tracing::warn!(session = %crate::mcp::session::log_id(id), "could not ask the leading replica whether a portable session was deleted ({e}); restoring it");
                false
            }
        }
    }

    /// Ends the session `id` its client deleted (DELETE), if `principal` opened it at
    /// `profile`: one held here, or a portable one held elsewhere or nowhere, which is not
    /// restored for that (no room needed, no upstream session opened to be closed): its id is
    /// checked as a restore would check it. A portable id opens nothing here from then on, and
    /// where replicas share state, is restored by none of them, and the replicas that hold it
    /// end it too (they read the leader's log of deletions). `false`: no such session.
    pub async fn delete_session(
        &self,
        id: &str,
        principal: Option<&Principal>,
        profile: Option<&Arc<ProfileConfig>>,
    ) -> bool {
        let held = self.sessions.get(id).map(|s| s.clone());
        let issued = match held {
            Some(s) => {
                if s.principal.as_ref() != principal
                    || s.profile_name() != profile.map(|p| p.name.as_str())
                {
                    return false;
                }
                // A portable session's id says when it was issued.
                self.portable
                    .as_ref()
                    .filter(|_| s.is_portable())
                    .and_then(|sealer| session_token::open(sealer, id))
                    .map(|token| token.t)
            }
            None => {
                let Some((token, _)) = self.portable_token(id, principal, profile) else {
                    return false;
                };
                if self.deleted_elsewhere(id).await {
                    self.record_deleted(id, token.t, token.p.as_deref());
                    return false;
                }
                Some(token.t)
            }
        };
        if let Some(issued) = issued {
            self.record_deleted(id, issued, principal.map(|p| &**p));
        }
        self.end_session(id);
        if issued.is_some() {
            // Its plugins' state too, wherever it is kept: a portable session ends only so
            // (it may have been served here long ago, or never, and other replicas may still
            // serve it: where they share plugin state, it refuses the session from now on,
            // and no replica restores it).
            self.plugins.current().delete_session(id);
        }
        true
    }

    /// Records that a portable session issued to `principal` at `issued` was deleted, so that
    /// its id opens nothing here again.
    fn record_deleted(&self, id: &str, issued: u64, principal: Option<&str>) {
        let _serial = self.restoring.lock().unwrap_or_else(|e| e.into_inner());
        self.note_deleted(id, issued, principal);
    }

    /// [`Gateway::record_deleted`], `restoring` held.
    fn note_deleted(&self, id: &str, issued: u64, principal: Option<&str>) {
        let max_age = self.config.mcp.session_max_age.as_millis() as u64;
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, issued, principal, session_token::now_ms(), max_age);
    }

    /// Whether this replica follows the leader's log of deletions now: it has session keys,
    /// shares plugin state with other replicas, and holds a portable session.
    fn follows_deletions(&self) -> bool {
        self.portable.is_some()
            && self.plugins.current().state().shared()
            && self.sessions.iter().any(|s| s.is_portable())
    }

    /// Ends the portable sessions held here that `page` of the leader's log says were deleted
    /// (on any replica), as their DELETE would have here: their ids open nothing here again.
    fn end_deleted(&self, page: &crate::plugins::Deletions) {
        let Some(sealer) = &self.portable else {
            return;
        };
        if page.ids.is_empty() {
            return;
        }
        let deleted: std::collections::HashSet<u64> = page.ids.iter().copied().collect();
        // Found before the restores' lock is taken (a hash per held session); a session
        // restored meanwhile sees `deletions_heard` move below, and asks the leader again.
        let ended: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|s| s.is_portable() && deleted.contains(&page.hash(s.key())))
            .map(|s| s.key().clone())
            .collect();
        let _serial = self.restoring.lock().unwrap_or_else(|e| e.into_inner());
        for id in &ended {
            if let Some(token) = session_token::open(sealer, id) {
                self.note_deleted(id, token.t, token.p.as_deref());
            }
            tracing::info!(session = %crate::mcp::session::log_id(id), "ended a portable session its client deleted on another replica");
            // (Its plugins' state went when the leader logged the deletion.)
            self.end_session(id);
        }
        self.deletions_heard.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads what the leader logged since `read` (every page of it, within one look), and ends
    /// the sessions held here that were deleted. `Err`: the leader could not be asked, or
    /// answered something else (a version without the log); `read` stays where it got.
    async fn read_deletions(
        &self,
        read: &mut crate::plugins::DeletionsRead,
    ) -> Result<(), crate::plugins::leader::Unavailable> {
        use crate::plugins::{Deletions, Joined, leader::Unavailable};
        let state = self.plugins.current().state().clone();
        for _ in 0..crate::plugins::DELETION_PAGES_AT_ONCE {
            let asked = crate::plugins::Asked {
                plugin: Arc::from(""),
                session: String::new(),
                principal: None,
                action: read.ask(),
                limits: Default::default(),
            };
            let outcome = state.run(asked, crate::plugins::leader::TIMEOUT).await?;
            let page = Deletions::from_outcome(&outcome).ok_or(Unavailable::Refused)?;
            match read.read(&page) {
                Joined::Continued => {}
                Joined::Afresh => {
                    tracing::debug!(
                        "reading the leading replica's log of deleted sessions from its start"
                    )
                }
                Joined::Missed(missed) => tracing::warn!(
                    missed,
                    "the leading replica no longer keeps some deletions of portable sessions this replica had not read: sessions held here that they name are not ended for them"
                ),
            }
            self.end_deleted(&page);
            if !page.more() {
                break;
            }
        }
        Ok(())
    }

    /// Follows the leader's log of deletions while the gateway lives: every
    /// [`DELETIONS_EVERY`] while this replica holds a portable session (and at once where it
    /// leads and logs one), so that a session deleted on another replica ends here too.
    async fn follow_deletions(gw: Weak<Gateway>) {
        let mut read = crate::plugins::DeletionsRead::default();
        let mut logged = match gw.upgrade() {
            Some(gw) => gw.plugins.current().state().deletions_logged(),
            None => return,
        };
        let mut pause = DELETIONS_EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // (A store that is gone changes no more: the sleep goes on.)
                Ok(()) = logged.changed() => {
                    // Paced: a client deleting sessions in a loop does not have the leader
                    // look through every session it holds at each one.
                    tokio::time::sleep(DELETIONS_LOGGED_GAP).await;
                }
            }
            let Some(gw) = gw.upgrade() else { return };
            if !gw.follows_deletions() {
                // Read afresh when it follows again: what it missed meanwhile named none of
                // its sessions.
                read = crate::plugins::DeletionsRead::default();
                pause = DELETIONS_EVERY;
                continue;
            }
            pause = match gw.read_deletions(&mut read).await {
                Ok(()) => DELETIONS_EVERY,
                Err(e) => {
                    tracing::debug!(
                        "could not read the leading replica's log of deleted sessions: {e}"
                    );
                    (pause * 2).min(DELETIONS_RETRY_MAX)
                }
            };
        }
    }

    #[allow(clippy::too_many_arguments)] // the parts of a session, as Session::new takes them
    fn open_session(
        &self,
        id: Arc<str>,
        principal: Option<Principal>,
        profile: Option<&Arc<ProfileConfig>>,
        version: &'static str,
        init_params: Bytes,
        eager_listen: bool,
        issued: Option<u64>,
    ) -> Arc<Session> {
        let portable = issued.is_some();
        let session = Session::new(
            id.clone(),
            principal,
            version,
            self.topology(),
            profile.map(|p| &**p),
            crate::mcp::session::UpstreamInit {
                params: init_params,
                eager_listen,
                portable: self.portable.clone().filter(|_| portable),
            },
            self.epoch,
            Some(crate::mcp::policy::PluginMessagePolicy::stage(
                self.plugins.clone(),
                self.audit.clone(),
            )),
            &self.answers,
        );
        if let Some(issued) = issued {
            let max_age = self.config.mcp.session_max_age.as_millis() as u64;
            session.honor_until(issued.saturating_add(max_age));
        }
        if let Some(p) = &session.principal {
            *self.sessions_per_principal.entry(p.clone()).or_insert(0) += 1;
        }
        self.sessions.insert(id, session.clone());
        self.metrics.sessions.set(self.sessions.len() as i64);
        session
    }

    /// Hidden sessions of stateless (2026-07-28) callers, one per principal.
    pub fn stateless_sessions(&self) -> usize {
        self.stateless.len()
    }

    /// Sessions held here, hidden ones included: what `mcp.max_sessions` bounds.
    pub fn sessions_held(&self) -> usize {
        self.sessions.len() + self.stateless.len()
    }

    /// The session stateless requests of `principal` with a token granting `claims` run in,
    /// on the current topology. A topology change replaces it; requests still running keep the
    /// old one until they finish.
    ///
    /// Requests whose tokens grant different groups or scopes run in different sessions: a
    /// session holds its latest request's claims for policy, and one token's request must never
    /// be judged by another's grants. `Err` when the principal already has as many
    /// (`mcp.max_sessions_per_principal`) as it may, or the gateway holds `mcp.max_sessions`.
    pub fn stateless_session(
        &self,
        principal: Option<Principal>,
        profile: Option<&Arc<ProfileConfig>>,
        claims: Option<&Arc<crate::auth::Claims>>,
    ) -> Result<Arc<Session>, NoRoom> {
        let topology = self.topology();
        let key = (
            principal,
            profile.map(|p| p.name.clone()),
            Grants(claims.cloned()),
        );
        match self.stateless.get(&key) {
            Some(s) if Arc::ptr_eq(s.topology(), &topology) => return Ok(s.clone()),
            Some(_) => {}
            None => {
                // Counted before the entry is taken (its shard stays locked until dropped);
                // concurrent first requests may pass the caps by a few, no more. Hidden
                // sessions count in `mcp.max_sessions` too: each has links to every server.
                if self.sessions_held() >= self.config.mcp.max_sessions {
                    return Err(NoRoom::Sessions);
                }
                if let Some(p) = &key.0 {
                    let held = self
                        .stateless
                        .iter()
                        .filter(|s| s.key().0.as_ref() == Some(p))
                        .count();
                    if held >= self.config.mcp.max_sessions_per_principal {
                        return Err(NoRoom::Principal(
                            self.config.mcp.max_sessions_per_principal,
                        ));
                    }
                }
            }
        }
        let fresh = || {
            Session::new(
                crate::mcp::session::new_id(),
                key.0.clone(),
                crate::mcp::revision::STATELESS,
                topology.clone(),
                profile.map(|p| &**p),
                crate::mcp::session::UpstreamInit {
                    params: Bytes::from_static(STATELESS_UPSTREAM_INIT.as_bytes()),
                    eager_listen: false,
                    portable: None,
                },
                self.epoch,
                Some(crate::mcp::policy::PluginMessagePolicy::stage(
                    self.plugins.clone(),
                    self.audit.clone(),
                )),
                &self.answers,
            )
        };
        use dashmap::mapref::entry::Entry;
        match self.stateless.entry(key.clone()) {
            // Held on this topology, or on one stored since it was read (a session this
            // request must not replace with one on the servers of before).
            Entry::Occupied(e)
                if Arc::ptr_eq(e.get().topology(), &topology)
                    || Arc::ptr_eq(e.get().topology(), &self.topology()) =>
            {
                Ok(e.get().clone())
            }
            Entry::Occupied(mut e) => {
                let session = fresh();
                let old = e.insert(session.clone());
                // Replaced before `set_topology` reached it (which now finds it gone): its
                // listen streams are told and ended here.
                end_listens_for_new_servers(&old);
                // Calls running (or waiting for input) in the old one finish there.
                self.draining
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(old);
                Ok(session)
            }
            Entry::Vacant(e) => Ok(e.insert(fresh()).clone()),
        }
    }

    /// Ends a session that no map holds any more: its streams now, its upstreams in the background.
    fn retire(&self, session: Arc<Session>) {
        match session.is_portable() {
            // Its client may come back to another replica, or to this one once it is restored.
            true => self.plugins.current().leave_session(&session.id),
            false => self.plugins.current().end_session(&session.id),
        }
        session.end();
        tokio::spawn(async move { session.close().await });
    }

    /// Whether `principal` may open one more session, `pending` more being on the way (HTTP+SSE
    /// streams not yet initialized).
    pub fn may_open_session(&self, principal: Option<&Arc<str>>, pending: usize) -> bool {
        principal.is_none_or(|p| {
            self.sessions_per_principal.get(p).map_or(0, |n| *n) + pending
                < self.config.mcp.max_sessions_per_principal
        })
    }

    /// Ends a session and, in the background, its upstream sessions.
    pub fn end_session(&self, id: &str) {
        if let Some((_, session)) = self.sessions.remove(id) {
            self.metrics.sessions.set(self.sessions.len() as i64);
            if let Some(p) = &session.principal {
                self.sessions_per_principal.remove_if_mut(p, |_, n| {
                    *n = n.saturating_sub(1);
                    *n == 0
                });
            }
            self.retire(session);
        }
    }

    /// Ends sessions idle for longer than the configured timeout, and portable sessions past
    /// `mcp.session_max_age` (however busy: a GET stream held open would keep one for good).
    pub fn sweep(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = self.config.mcp.session_idle_timeout.as_millis() as u64;
        let wall = session_token::now_ms();
        let expired: Vec<(Arc<str>, &str)> = self
            .sessions
            .iter()
            .filter_map(|s| {
                let why = if s.expired(now, idle) {
                    "idling"
                } else if s.outlived(wall) {
                    "reaching mcp.session_max_age"
                } else {
                    return None;
                };
                Some((s.key().clone(), why))
            })
            .collect();
        for (id, why) in expired {
            tracing::info!(session = %crate::mcp::session::log_id(&id), "session expired after {why}");
            self.end_session(&id);
        }
        let drained: Vec<Arc<Session>> = {
            let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            let (done, running) = draining.drain(..).partition(|s| !s.is_busy());
            *draining = running;
            done
        };
        for session in drained {
            self.retire(session);
        }
        let idle_stateless: Vec<_> = self
            .stateless
            .iter()
            .filter(|s| s.expired(now, idle))
            .map(|s| s.key().clone())
            .collect();
        for key in idle_stateless {
            if let Some((_, session)) = self.stateless.remove_if(&key, |_, s| s.expired(now, idle))
            {
                tracing::info!(principal = ?key.0, profile = ?key.1, "stateless upstream sessions expired after idling");
                self.retire(session);
            }
        }
    }

    /// Runs [`Gateway::sweep`] periodically, and ends the portable sessions held here that
    /// were deleted on other replicas (where they share plugin state).
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gw = Arc::downgrade(self);
        let every = (self.config.mcp.session_idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let deletions = Gateway::follow_deletions(gw.clone());
        let sweeping = async move {
            loop {
                tokio::time::sleep(every).await;
                match gw.upgrade() {
                    Some(gw) => gw.sweep(),
                    None => return,
                }
            }
        };
        // One task: aborting it stops both.
        tokio::spawn(async move {
            tokio::join!(sweeping, deletions);
        })
    }

    /// Ends every session, waiting for upstreams to shut down (bounded).
    pub async fn shutdown(&self) {
        // HTTP+SSE streams not yet initialized close now (the others end with their sessions).
        for client in self.sse_clients.iter() {
            client.close();
        }
        let mut all: Vec<Arc<Session>> = self.sessions.iter().map(|s| s.value().clone()).collect();
        all.extend(self.stateless.iter().map(|s| s.value().clone()));
        all.append(&mut self.draining.lock().unwrap_or_else(|e| e.into_inner()));
        self.sessions.clear();
        self.stateless.clear();
        self.sessions_per_principal.clear();
        self.metrics.sessions.set(0);
        let close = futures_util::future::join_all(all.iter().map(|s| s.close()));
        let _ = tokio::time::timeout(Duration::from_secs(10), close).await;
        let shared: Vec<Arc<SharedServer>> =
            self.shared.iter().map(|s| s.value().clone()).collect();
        futures_util::future::join_all(shared.iter().map(|s| s.close())).await;
    }
}

/// What a hidden stateless session is keyed by: principal, profile, and token grants.
type StatelessKey = (Option<Principal>, Option<String>, Grants);

/// A token's groups and scopes, compared (in any order) and hashed without the token itself:
/// requests whose tokens grant the same may share a hidden session (the token is refreshed in
/// place).
#[derive(Clone)]
struct Grants(Option<Arc<crate::auth::Claims>>);

impl PartialEq for Grants {
    fn eq(&self, other: &Self) -> bool {
        crate::auth::Claims::same_grants(self.0.as_deref(), other.0.as_deref())
    }
}

impl Eq for Grants {}

impl std::hash::Hash for Grants {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(crate::auth::Claims::grants_hash(self.0.as_deref()));
    }
}

/// Tells a stateless session's listen streams that every list may have changed, then ends
/// them: their clients listen again, and so reach the servers of a new topology.
fn end_listens_for_new_servers(session: &Session) {
    for method in [
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    ] {
        session.subscriptions.deliver(method, None);
    }
    session.subscriptions.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deleted id is refused until it expires, and only it; expired ids give their room back
    /// without refusing anything else; past the bound, the soonest to expire makes room and
    /// nothing issued no later than it is restored.
    #[test]
    fn the_record_of_deleted_sessions_holds_each_until_it_expires() {
        let mut d = Deleted::default();
        d.insert("a", 1_000, None, 1_000, 100);
        assert!(d.holds("a", 1_000, None));
        assert!(!d.holds("a", 1_001, None), "another id, issued later");
        assert!(!d.holds("b", 1_000, None));
        // Expired ids are not kept, and go as others come.
        d.insert("old", 500, None, 1_000, 100);
        assert!(!d.holds("old", 500, None));
        d.insert("c", 1_150, Some("p0"), 1_150, 100);
        assert_eq!(d.ids.len(), 1, "a expired and gave its room back");
        assert_eq!(d.floor, 0);
        // Five principals within their bounds, past the bound of all: the soonest to expire
        // of all makes room, and nothing issued no later than it is restored, whoever it was
        // issued to.
        for i in 0..=MAX_DELETED_SESSIONS as u64 {
            let who = format!("p{}", i % 5);
            d.insert(&format!("x{i}"), 1_151 + i, Some(&who), 1_200, 1_000_000);
        }
        assert_eq!(d.ids.len(), MAX_DELETED_SESSIONS);
        assert_eq!(d.floor, 1_151, "c and x0, the soonest to expire, made room");
        assert!(d.holds("c", 1_150, Some("p0")) && d.holds("x0", 1_151, Some("p0")));
        assert!(d.holds("x1", 1_152, Some("p1")));
        assert!(
            d.holds("never deleted", 1_100, Some("p9")),
            "issued before the floor"
        );
        assert!(!d.holds("never deleted", 1_152, Some("p9")));
    }

    /// One principal deleting sessions without end makes room among its own: past its bound
    /// its own older sessions are no longer restored here, and no one else's.
    #[test]
    fn one_principals_deletions_cost_only_its_own_sessions() {
        let mut d = Deleted::default();
        d.insert("bobs", 999, Some("bob"), 1_000, 1_000_000);
        for i in 0..(MAX_DELETED_PER_PRINCIPAL + 10) as u64 {
            d.insert(
                &format!("m{i}"),
                1_000 + i,
                Some("mallory"),
                1_000,
                1_000_000,
            );
        }
        assert_eq!(d.ids.len(), MAX_DELETED_PER_PRINCIPAL + 1);
        assert_eq!(d.floor, 0, "no floor for everyone");
        assert!(
            d.holds("m0", 1_000, Some("mallory")),
            "made room, still refused"
        );
        assert!(d.holds("another of mallory's", 1_005, Some("mallory")));
        assert!(!d.holds("alice's", 1_005, Some("alice")), "restored");
        assert!(d.holds("bobs", 999, Some("bob")) && !d.holds("bobs2", 999, Some("bob")));
        // The id's principal counts: mallory's deleted id is not another's.
        assert!(!d.holds("m20", 1_020, Some("alice")));
    }
}
