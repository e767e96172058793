//! The `kubernetes` backend: one Deployment (one pod) per MCP server, through kube-rs.
//!
//! ```text
//! desired: Runtime::apply (config file)  ∪  McpServer resources (watched)
//!                 │ enqueue(server)
//! watchers ──▶ Index<Deployment|Pod|Secret|Service> ──▶ queue (a set) ──▶ worker: reconcile(server) if leader
//!  (kube::runtime::watcher, label managed-by=gatehouse)             └▶ status(server) from its pod
//! Lease elector ──▶ leading: bool
//! ```
//!
//! - Reconcile renders the server's objects ([`objects::render`]), compares each with
//!   the watched copy ([`objects::is_subset`]) and applies (server-side apply, field
//!   manager `gatehouse`) only what is missing or drifted; with nothing to do it makes
//!   no API call. Objects of servers that are no longer desired are deleted, except
//!   children of an `McpServer`, which the garbage collector removes with it.
//! - Owner references: children of an `McpServer` are owned by it; for config-file
//!   servers the Deployment owns the Secret and Service. The Secret is written first
//!   so the pod never starts without its keys.
//! - Every replica watches and keeps statuses (it needs endpoints to serve); only the
//!   Lease holder writes, and records Events on `McpServer` resources ([`conditions`]).

pub mod attach;
pub mod cilium;
pub mod conditions;
pub mod config_map;
pub mod index;
pub mod lease;
pub mod network_policy;
pub mod objects;
pub mod policy;
pub mod queue;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, LogParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::index::Index;
use self::lease::{Elector, LeaseSettings};
use self::policy::PodPolicy;
use super::egress::EgressPreset;
use super::idle::Usage;
use super::spec::{
    McpServer, McpServerSpec, McpServerStatus, ResolvedServer, ServerDef, SpecError, labels,
    object_name, values_secret_name,
};
use super::{
    Endpoint, FailureReason, LogOptions, OrchestratorError, Phase, RelayAccess, Result, Runtime,
    ServerStatus, StdioEndpoint,
};
use crate::replica_key::ReplicaKey;

/// Lines of a pod's log asked for when the caller names no tail (the newest, within
/// [`crate::orchestrator::logbuf::LOG_BYTES`]).
const DEFAULT_LOG_LINES: i64 = 5000;

/// Environment variable: path of a kubeconfig file.
pub const ENV_KUBECONFIG: &str = "GATEHOUSE_ORCHESTRATOR_KUBECONFIG";
/// Environment variable: `true` to use the pod's service account (in-cluster config).
pub const ENV_IN_CLUSTER: &str = "GATEHOUSE_ORCHESTRATOR_LOAD_KUBECONFIG_FROM_CURRENT_CLUSTER";
/// Environment variable: the namespace servers run in.
pub const ENV_NAMESPACE: &str = "GATEHOUSE_ORCHESTRATOR_K8S_NAMESPACE";
/// Environment variable: `false` to turn leader election off (a single replica).
pub const ENV_LEADER_ELECTION: &str = "GATEHOUSE_ORCHESTRATOR_LEADER_ELECTION";
/// Environment variable: name of the leader-election Lease.
pub const ENV_LEASE_NAME: &str = "GATEHOUSE_ORCHESTRATOR_LEASE_NAME";
/// Environment variable: `false` to ignore `McpServer` resources.
pub const ENV_WATCH_MCPSERVERS: &str = "GATEHOUSE_ORCHESTRATOR_WATCH_MCPSERVERS";
/// Environment variable: comma-separated service accounts a server definition may name.
pub const ENV_ALLOWED_SERVICE_ACCOUNTS: &str = "GATEHOUSE_ORCHESTRATOR_ALLOWED_SERVICE_ACCOUNTS";
/// Environment variable: service account of server pods whose definition names none.
pub const ENV_SERVICE_ACCOUNT: &str = "GATEHOUSE_ORCHESTRATOR_SERVICE_ACCOUNT";
/// Environment variable: `true` to let servers running as an allowed account mount its token.
pub const ENV_ALLOW_TOKEN_MOUNT: &str = "GATEHOUSE_ORCHESTRATOR_ALLOW_TOKEN_MOUNT";
/// Environment variable: the gateway's own service account (never given to a server).
pub const ENV_GATEWAY_SERVICE_ACCOUNT: &str = "GATEHOUSE_ORCHESTRATOR_GATEWAY_SERVICE_ACCOUNT";
/// Environment variable: default requests of server pods, e.g. `cpu=50m,memory=64Mi`.
pub const ENV_DEFAULT_REQUESTS: &str = "GATEHOUSE_ORCHESTRATOR_DEFAULT_REQUESTS";
/// Environment variable: default limits of server pods, e.g. `cpu=1,memory=512Mi`.
pub const ENV_DEFAULT_LIMITS: &str = "GATEHOUSE_ORCHESTRATOR_DEFAULT_LIMITS";
/// Environment variable: port of the relay through which the other replicas reach stdio
/// servers (on `POD_IP`); unset, replicas that do not lead cannot reach stdio servers.
pub const ENV_RELAY_PORT: &str = "GATEHOUSE_ORCHESTRATOR_RELAY_PORT";
/// Environment variable: `sizeLimit` of a server pod's `/tmp` emptyDir, e.g. `64Mi`.
pub const ENV_TMP_SIZE_LIMIT: &str = "GATEHOUSE_ORCHESTRATOR_TMP_SIZE_LIMIT";
/// Environment variable: comma-separated private, cluster or metadata ranges a server's
/// egress may name (none by default: a `cidr` rule reaching such addresses is refused).
pub const ENV_EGRESS_PRIVATE_CIDRS: &str = "GATEHOUSE_ORCHESTRATOR_EGRESS_PRIVATE_CIDRS";
/// Environment variable: comma-separated ranges "public" excludes besides the private ones
/// (the cluster's own public addresses: API server, nodes, load balancers).
pub const ENV_EGRESS_EXCEPT: &str = "GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT";
/// Environment variable: `true` when the cluster runs Cilium (egress host names are then
/// enforced by a CiliumNetworkPolicy each).
pub const ENV_CILIUM: &str = "GATEHOUSE_ORCHESTRATOR_CILIUM";
/// Environment variable: egress of servers whose definition declares none: `none`,
/// `dns-and-https`, or `unrestricted` (the default: no NetworkPolicy of their own).
pub const ENV_DEFAULT_EGRESS: &str = "GATEHOUSE_ORCHESTRATOR_DEFAULT_EGRESS";
/// Field manager of our server-side applies.
pub const FIELD_MANAGER: &str = "gatehouse";
/// Annotation of a Deployment scaled to zero while its server is idle (the value: since when).
pub const ASLEEP_ANNOTATION: &str = "gatehouse.dev/asleep";
/// On a values Secret: the origin (`https://host:port`) its remote header values were given
/// for, the only one they are sent to.
pub const REMOTE_ORIGIN_ANNOTATION: &str = "gatehouse.dev/remote-origin";
/// On a values Secret: the workload its values were given for
/// ([`McpServerSpec::workload_digest`]); they reach no other.
pub const VALUES_FOR_ANNOTATION: &str = "gatehouse.dev/values-for";
/// On the stored values' Secret: the registry entry they were given to run. An upgrade reads
/// the entry from the `McpServer`, which its editors may repoint to another entry listing the
/// same package (and variables of its own): the values go only to the entry they were given
/// for.
pub const VALUES_ENTRY_ANNOTATION: &str = "gatehouse.dev/values-entry";

/// Where the client's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account.
    InCluster,
}

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Where the client's configuration comes from.
    pub source: ConfigSource,
    /// Namespace of the servers (default: the kubeconfig's or the pod's namespace).
    pub namespace: Option<String>,
    /// Leader election; `None` makes this replica always reconcile.
    pub leader_election: Option<LeaseSettings>,
    /// Options shared with [`KubeRuntime::start_with_client`].
    pub options: KubeOptions,
}

/// Behaviour of the backend, independent of how the client is built.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Also run the servers declared as `McpServer` resources.
    pub watch_mcpservers: bool,
    /// Re-check every server this often even without events (a safety net, not polling).
    pub resync_every: Duration,
    /// Delay before retrying a failed reconcile (the first time; it doubles while the
    /// server's reconciles keep failing).
    pub retry_after: Duration,
    /// Longest delay between retries of a server's failed reconciles.
    pub retry_max: Duration,
    /// How long [`StdioEndpoint::open`] waits for the pod to be ready.
    pub attach_timeout: Duration,
    /// Buffer size of an attachment's stdin and stdout.
    pub attach_buffer: usize,
    /// What server definitions may ask of the cluster.
    pub policy: PodPolicy,
    /// Where the relay listens (with leader election only): the replica that holds the
    /// lease attaches to stdio servers and serves them to the others there.
    pub relay_listen: Option<std::net::SocketAddr>,
    /// Scale servers unused for this long to zero unless their definition says otherwise.
    pub idle_after: Option<Duration>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            watch_mcpservers: true,
            resync_every: Duration::from_secs(300),
            retry_after: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            attach_timeout: Duration::from_secs(60),
            attach_buffer: 256 * 1024,
            policy: PodPolicy::default(),
            relay_listen: None,
            idle_after: None,
        }
    }
}

fn truthy(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

impl KubeSettings {
    /// Reads the settings from the process environment; `None` means "no cluster".
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// Reads the settings through `getenv`; `None` when neither a kubeconfig nor in-cluster loading is set.
    pub fn from_env_with(getenv: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let flag = |key: &str, default: bool| -> Result<bool> {
            match getenv(key) {
                None => Ok(default),
                Some(v) => truthy(&v).ok_or_else(|| {
                    OrchestratorError::Settings(format!("{key}={v:?} is not a boolean"))
                }),
            }
        };
        let kubeconfig = getenv(ENV_KUBECONFIG).filter(|p| !p.trim().is_empty());
        let in_cluster = flag(ENV_IN_CLUSTER, false)?;
        let source = match (kubeconfig, in_cluster) {
            (Some(_), true) => {
                return Err(OrchestratorError::Settings(format!(
                    "set either {ENV_KUBECONFIG} or {ENV_IN_CLUSTER}, not both"
                )));
            }
            (Some(path), false) => ConfigSource::Kubeconfig(path.into()),
            (None, true) => ConfigSource::InCluster,
            (None, false) => return Ok(None),
        };
        let namespace = getenv(ENV_NAMESPACE).filter(|n| !n.trim().is_empty());
        if let Some(ns) = &namespace
            && !super::spec::is_dns_label(ns, 63)
        {
            return Err(OrchestratorError::Settings(format!(
                "{ENV_NAMESPACE}={ns:?} is not a namespace name"
            )));
        }
        let leader_election = if flag(ENV_LEADER_ELECTION, true)? {
            let base = getenv("POD_NAME")
                .or_else(|| getenv("HOSTNAME"))
                .unwrap_or_else(|| "gatehouse".into());
            let suffix = format!(
                "{:08x}",
                (super::backoff::random_unit() * f64::from(u32::MAX)) as u32
            );
            Some(LeaseSettings::new(
                getenv(ENV_LEASE_NAME).unwrap_or_else(|| "gatehouse-orchestrator".into()),
                format!("{base}_{suffix}"),
            ))
        } else {
            None
        };
        let policy = policy_from_env(&getenv, flag(ENV_ALLOW_TOKEN_MOUNT, false)?, &source)?;
        let relay_listen = match getenv(ENV_RELAY_PORT).filter(|p| !p.trim().is_empty()) {
            None => None,
            Some(port) => {
                let port: u16 = port.trim().parse().map_err(|_| {
                    OrchestratorError::Settings(format!("{ENV_RELAY_PORT}={port:?} is not a port"))
                })?;
                let ip = getenv("POD_IP").unwrap_or_default();
                let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                    OrchestratorError::Settings(format!(
                        "{ENV_RELAY_PORT} needs POD_IP (the downward API's status.podIP); POD_IP={ip:?} is not an IP address"
                    ))
                })?;
                Some(std::net::SocketAddr::new(ip, port))
            }
        };
        Ok(Some(KubeSettings {
            source,
            namespace,
            leader_election,
            options: KubeOptions {
                watch_mcpservers: flag(ENV_WATCH_MCPSERVERS, true)?,
                policy,
                relay_listen,
                idle_after: super::idle::default_after(&getenv)
                    .map_err(OrchestratorError::Settings)?,
                ..KubeOptions::default()
            },
        }))
    }

    /// Builds the client: kubeconfig (honouring `insecure-skip-tls-verify`) or in-cluster.
    pub async fn client(&self) -> Result<(Client, String)> {
        // kube's rustls setup uses the process-wide provider: make it ring (no aws-lc).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = match &self.source {
            ConfigSource::Kubeconfig(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    OrchestratorError::Settings(format!("kubeconfig {}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| {
                    OrchestratorError::Settings(format!("kubeconfig {}: {e}", path.display()))
                })?
            }
            ConfigSource::InCluster => kube::Config::incluster()
                .map_err(|e| OrchestratorError::Settings(format!("in-cluster config: {e}")))?,
        };
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .map_err(|e| OrchestratorError::Settings(format!("kubernetes client: {e}")))?;
        Ok((client, namespace))
    }
}

/// The operator's pod policy from the environment; in-cluster, the account of the
/// gateway's own token is forbidden to servers too.
fn policy_from_env(
    getenv: &impl Fn(&str) -> Option<String>,
    allow_token_mount: bool,
    source: &ConfigSource,
) -> Result<PodPolicy> {
    let bad = |key: &str, v: &str, why: String| {
        OrchestratorError::Settings(format!("{key}={v:?}: {why}"))
    };
    let list = |key: &str| -> Vec<String> {
        getenv(key)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    };
    let quantities = |key: &str, default: BTreeMap<String, String>| -> Result<_> {
        let Some(v) = getenv(key) else {
            return Ok(default);
        };
        let mut map = BTreeMap::new();
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((k, q)) if !k.trim().is_empty() && !q.trim().is_empty() => {
                    map.insert(k.trim().to_string(), q.trim().to_string());
                }
                _ => return Err(bad(key, &v, format!("{item:?} is not name=quantity"))),
            }
        }
        Ok(map)
    };
    // A list of CIDRs; `strict`: each must exclude something (a /0 cannot be excepted).
    let cidrs = |key: &str, strict: bool| -> Result<Vec<String>> {
        let mut out = Vec::new();
        for c in list(key) {
            match crate::orchestrator::egress::parse_cidr(&c) {
                Ok((_, 0)) if strict => {
                    return Err(bad(key, &c, "a /0 would except everything".into()));
                }
                // The API server sees these as IPv4 ranges, outside `::/0`: it would refuse
                // every policy.
                Ok((std::net::IpAddr::V6(a), _)) if strict && a.to_ipv4_mapped().is_some() => {
                    return Err(bad(key, &c, "write IPv4-mapped ranges as IPv4".into()));
                }
                Ok(_) => out.push(c),
                Err(why) => return Err(bad(key, &c, why)),
            }
        }
        Ok(out)
    };
    let defaults = PodPolicy::default();
    let mut policy = PodPolicy {
        allowed_accounts: list(ENV_ALLOWED_SERVICE_ACCOUNTS).into_iter().collect(),
        default_account: getenv(ENV_SERVICE_ACCOUNT)
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .unwrap_or(defaults.default_account),
        allow_token_mount,
        forbidden_accounts: defaults.forbidden_accounts,
        default_requests: quantities(ENV_DEFAULT_REQUESTS, defaults.default_requests)?,
        default_limits: quantities(ENV_DEFAULT_LIMITS, defaults.default_limits)?,
        tmp_size_limit: getenv(ENV_TMP_SIZE_LIMIT)
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .unwrap_or(defaults.tmp_size_limit),
        egress_private_cidrs: cidrs(ENV_EGRESS_PRIVATE_CIDRS, false)?,
        egress_except: cidrs(ENV_EGRESS_EXCEPT, true)?,
        cilium: match getenv(ENV_CILIUM).as_deref().map(str::trim) {
            None | Some("" | "false") => false,
            Some("true") => true,
            Some(v) => return Err(bad(ENV_CILIUM, v, "not true or false".into())),
        },
        default_egress: match getenv(ENV_DEFAULT_EGRESS).map(|v| v.trim().to_owned()) {
            None => None,
            Some(v) if v.is_empty() || v == "unrestricted" => None,
            Some(v) => Some(EgressPreset::parse(&v).ok_or_else(|| {
                bad(
                    ENV_DEFAULT_EGRESS,
                    &v,
                    "not none, dns-and-https or unrestricted".into(),
                )
            })?),
        },
    };
    policy
        .forbidden_accounts
        .extend(list(ENV_GATEWAY_SERVICE_ACCOUNT));
    if *source == ConfigSource::InCluster
        && let Ok(token) = std::fs::read_to_string(policy::TOKEN_PATH)
        && let Some(own) = policy::account_of_token(&token)
    {
        policy.forbidden_accounts.insert(own);
    }
    policy.validate().map_err(|why| {
        OrchestratorError::Settings(format!(
            "{ENV_ALLOWED_SERVICE_ACCOUNTS} / {ENV_SERVICE_ACCOUNT}: {why}"
        ))
    })?;
    Ok(policy)
}

/// What identifies an `McpServer` resource's current spec.
#[derive(Debug, Clone)]
struct ResourceRef {
    uid: String,
    generation: Option<i64>,
}

/// Where a desired server comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// [`Runtime::apply`] (the config file, the admin API).
    Config,
    /// An `McpServer` resource with this uid.
    Resource { uid: String },
}

#[derive(Debug, Clone)]
enum Desired {
    Valid {
        server: Box<ResolvedServer>,
        source: Source,
    },
    /// An `McpServer` resource that fails validation.
    Invalid { message: String },
}

/// Counters of the reconcile loop, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Servers processed by the worker.
    pub reconciles: AtomicU64,
    /// Objects written (server-side apply).
    pub applies: AtomicU64,
    /// Objects deleted.
    pub deletes: AtomicU64,
    /// `McpServer` status writes.
    pub status_writes: AtomicU64,
    /// Reconciles that failed (and were retried).
    pub errors: AtomicU64,
}

/// A copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Servers processed by the worker.
    pub reconciles: u64,
    /// Objects written.
    pub applies: u64,
    /// Objects deleted.
    pub deletes: u64,
    /// `McpServer` status writes.
    pub status_writes: u64,
    /// Failed reconciles.
    pub errors: u64,
}

pub(crate) struct Inner {
    client: Client,
    ns: String,
    options: KubeOptions,
    desired: DashMap<String, Desired>,
    deployments: Index<Deployment>,
    replicasets: Index<ReplicaSet>,
    pods: Index<Pod>,
    secrets: Index<Secret>,
    services: Index<Service>,
    network_policies: Index<NetworkPolicy>,
    cilium_policies: Index<cilium::CiliumNetworkPolicy>,
    statuses: DashMap<String, ServerStatus>,
    /// The pod each server's status was read from: a status read from a pod that is no
    /// longer the current one (the watch saw it go before the status was refreshed) is stale.
    status_pods: DashMap<String, String>,
    /// Serializes status refreshes (see `refresh_status`).
    refreshing: std::sync::Mutex<()>,
    /// Pods deleted by the last restart of each server: until the watch has caught up, the
    /// status still describes them, and must not be taken for the new pod's.
    restarted: DashMap<String, Vec<String>>,
    /// The status last written to (or read from) each `McpServer` resource.
    written: DashMap<String, McpServerStatus>,
    /// Each `McpServer` resource's uid and generation, for its status and Events.
    resources: DashMap<String, ResourceRef>,
    /// Records Events on `McpServer` resources.
    recorder: Recorder,
    /// Sleeps (true) and wakes (false) asked of this replica and not yet seen on the
    /// Deployment, whose annotation otherwise says whether a server sleeps.
    sleep_requests: DashMap<String, bool>,
    /// How each idle-capable server is used.
    usage: DashMap<String, Arc<Usage>>,
    /// Per server: held by a reconcile from before its look at a pending sleep until the
    /// Deployment is applied, and by a wake, which so comes after a scale-down it did not
    /// call off, and knows the pods it dooms.
    sleep_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Replicas elect a leader.
    replicated: bool,
    status_changed: watch::Sender<u64>,
    /// Bumped after every status refresh, changed or not: a pod may be replaced while the
    /// status stays the same, and waiters compare pods, not only statuses.
    refreshed: watch::Sender<u64>,
    queue: Arc<queue::WorkQueue>,
    leading: watch::Receiver<bool>,
    /// The lease holder's relay, when another replica holds it.
    holder_relay: watch::Receiver<Option<String>>,
    /// The keys of the replicas' shared secret (the relay's TLS identity, the lease's signature).
    relay_key: watch::Receiver<Option<Arc<ReplicaKey>>>,
    stats: Stats,
    /// `sync` has told us the whole configuration: leftovers may be deleted.
    config_known: AtomicBool,
    /// Servers removed through `remove`: their leftovers may be deleted.
    removed: DashMap<String, ()>,
}

/// Runs MCP servers as pods through the Kubernetes API.
pub struct KubeRuntime {
    inner: Arc<Inner>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    lease: Option<(Api<Lease>, LeaseSettings)>,
    /// Says whether this replica leads; also turned off here at shutdown, before the lease
    /// is given up, so nothing is applied as leader after.
    leading: watch::Sender<bool>,
    relay: Option<Arc<RelayAccess>>,
}

impl Drop for KubeRuntime {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Whether `secret` is server `name`'s values Secret as the gateway writes it: labelled for
/// that server and of type `Opaque`. Anyone who may create Secrets can forge the labels; the
/// type keeps out what a cluster controller fills in (a `service-account-token` Secret gets
/// the token of the account it names, the gateway's own among them).
pub fn is_values_of(secret: &Secret, name: &str) -> bool {
    secret.labels().get(labels::SERVER).map(String::as_str) == Some(name)
        && secret.labels().get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGER)
        // The API server defaults an unset type to `Opaque`.
        && secret.type_.as_deref().is_none_or(|t| t == "Opaque")
}

impl KubeRuntime {
    /// The values Secret of server `name`, if there is one and it is that server's (labelled
    /// so by the gateway, of the type it writes): a Secret of that name made by anyone else
    /// is never read, written over or deleted.
    async fn own_values(&self, name: &str) -> Result<Option<Secret>> {
        let api: Api<Secret> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
        let secret_name = values_secret_name(name);
        let found = api.get_opt(&secret_name).await.map_err(|e| {
            OrchestratorError::kube(format!("read the stored secrets of {name}"), e)
        })?;
        match found {
            None => Ok(None),
            Some(s) if is_values_of(&s, name) => Ok(Some(s)),
            Some(_) => Err(SpecError {
                field: "env".into(),
                message: format!(
                    "the Secret {secret_name} exists and is not this server's stored values: remove or rename it"
                ),
            }
            .into()),
        }
    }

    /// What the values Secret of server `name` is to hold for `spec`: `values` (given now)
    /// and, for its other stored secrets, what the Secret holds already; `None` when `spec`
    /// stores none. Read before anything changes: a stored secret with no value is refused.
    async fn stored_values(
        &self,
        name: &str,
        spec: &McpServerSpec,
        values: BTreeMap<String, String>,
    ) -> Result<Option<BTreeMap<String, k8s_openapi::ByteString>>> {
        use k8s_openapi::ByteString;
        let stored = spec.stored_secret_names();
        if stored.is_empty() {
            return Ok(None);
        }
        let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
        let kept: Vec<&str> = stored
            .iter()
            .map(String::as_str)
            .filter(|k| !values.contains_key(*k))
            .collect();
        if !kept.is_empty() {
            let old = self.own_values(name).await?;
            // A remote's kept values go only where they were given for.
            if let Some(origin) = spec.remote_origin() {
                let given_for = old
                    .as_ref()
                    .and_then(|s| s.annotations().get(REMOTE_ORIGIN_ANNOTATION).cloned());
                if given_for.as_deref() != Some(origin.as_str()) {
                    return Err(SpecError {
                        field: "remote.url".into(),
                        message: format!(
                            "its stored header values were given for {}, not {origin}: give them again (secretValue)",
                            given_for.as_deref().unwrap_or("no remote")
                        ),
                    }
                    .into());
                }
            }
            for k in kept {
                let value = old
                    .as_ref()
                    .and_then(|s| s.data.as_ref())
                    .and_then(|d| d.get(k))
                    .ok_or_else(|| SpecError {
                        field: match spec.remote {
                            Some(_) => "remote.headers".to_owned(),
                            None => format!("env.{k}.storedSecret"),
                        },
                        message: format!(
                            "{} holds no value for {k}: give its secretValue",
                            values_secret_name(name)
                        ),
                    })?;
                data.insert(k.to_owned(), value.clone());
            }
        }
        data.extend(
            values
                .into_iter()
                .filter(|(k, _)| stored.contains(k))
                .map(|(k, v)| (k, ByteString(v.into_bytes()))),
        );
        Ok(Some(data))
    }

    /// Makes the values Secret of server `name` hold `data`, owned by its `McpServer` (uid
    /// `owner`: removed with it); without data, removes it.
    async fn write_values(
        &self,
        name: &str,
        data: Option<BTreeMap<String, k8s_openapi::ByteString>>,
        owner: &str,
        origin: Option<String>,
        runs: String,
        entry: Option<String>,
    ) -> Result<()> {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let api: Api<Secret> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
        let secret_name = values_secret_name(name);
        let kube_err = |e| OrchestratorError::kube(format!("the stored secrets of {name}"), e);
        let Some(data) = data else {
            return self.remove_values(name).await;
        };
        // Never over another's Secret of that name.
        self.own_values(name).await?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                labels: Some(BTreeMap::from([
                    (labels::SERVER.to_owned(), name.to_owned()),
                    (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
                ])),
                owner_references: Some(vec![objects::owner_ref(
                    &McpServer::api_version(&()),
                    &McpServer::kind(&()),
                    name,
                    owner,
                )]),
                annotations: Some(
                    origin
                        .map(|o| (REMOTE_ORIGIN_ANNOTATION.to_owned(), o))
                        .into_iter()
                        .chain([(VALUES_FOR_ANNOTATION.to_owned(), runs)])
                        .chain(entry.map(|e| (VALUES_ENTRY_ANNOTATION.to_owned(), e)))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        api.patch(
            &secret_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(kube_err)?;
        Ok(())
    }

    /// Removes the values Secret of server `name`, if it is that server's.
    async fn remove_values(&self, name: &str) -> Result<()> {
        if self.own_values(name).await?.is_none() {
            return Ok(());
        }
        let api: Api<Secret> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
        match api
            .delete(&values_secret_name(name), &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(OrchestratorError::kube(
                format!("remove the stored secrets of {name}"),
                e,
            )),
        }
    }

    /// Defines server `def` as an `McpServer` resource (its secret values in its values
    /// Secret); `new_only`: only if no server of that name is defined.
    async fn declare_as(&self, def: ServerDef, new_only: bool) -> Result<()> {
        let server = def.resolve_declared()?;
        self.inner.options.policy.admit(&server)?;
        if !self.inner.options.watch_mcpservers {
            // McpServer resources are ignored here: keep the server in this replica only.
            if new_only && self.inner.desired.contains_key(&def.name) {
                return Err(OrchestratorError::Exists(def.name));
            }
            return self.apply(server).await;
        }
        if server.spec.image.is_none() && server.spec.remote.is_none() {
            return Err(OrchestratorError::Unsupported {
                server: server.name.clone(),
                backend: "kubernetes",
                what: "an image",
            });
        }
        // Untyped: a resource this gateway cannot read (a field of a newer CRD) is replaced
        // like any other, not refused as undecodable.
        let api = mcpservers_untyped(self.inner.client.clone(), &self.inner.ns);
        // The resource never holds a secret value (anyone who may read McpServers would
        // read it, and etcd encrypts only Secrets): the values go to the server's values
        // Secret, and the resource names them.
        let (spec, values) = def.spec.clone().without_secret_values();
        // Read first (a stored secret must have a value), written once the resource is
        // (owned by it: no Secret outlives a resource that failed to be written).
        let stored = self.stored_values(&def.name, &spec, values).await?;
        // Never over another's Secret of the values Secret's name, found before anything
        // is written.
        if stored.is_some() {
            self.own_values(&def.name).await?;
        }
        // Given through the gateway now: the values are for what the definition runs now.
        let runs = spec.workload_digest();
        let entry = spec.registry.as_ref().map(|r| r.entry.clone());
        let obj = self.write_resource(&api, &def.name, spec, new_only).await?;
        let uid = obj.uid().unwrap_or_default();
        if let Err(e) = self
            .write_values(
                &def.name,
                stored,
                &uid,
                def.spec.remote_origin(),
                runs,
                entry,
            )
            .await
        {
            // An install is all or nothing: the resource it made goes (that one, by uid).
            if new_only {
                let precondition = kube::api::Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                };
                let params = DeleteParams {
                    preconditions: Some(precondition),
                    ..DeleteParams::background()
                };
                if let Err(undo) = api.delete(&def.name, &params).await {
                    tracing::warn!(server = %def.name, "undoing a failed install: {undo}");
                }
            }
            return Err(e);
        }
        // The watch brings the same object to every replica; take it now so that this
        // replica's status and list show it at once.
        self.inner.removed.remove(&def.name);
        self.inner.desired.insert(
            def.name.clone(),
            desired_from_untyped(&obj, &self.inner.options.policy),
        );
        self.inner.refresh_status(&def.name, None);
        self.inner.enqueue(def.name);
        Ok(())
    }

    /// Refuses a remote whose host name resolves to an address the operator does not allow
    /// (a private, cluster, metadata or loopback one): the gateway's own pod would connect
    /// to it. Checked at each connection, against what the name resolves to then, so the
    /// server shows why; the connection checks its own answers too (`remote_addresses`),
    /// so a name that changes its answers in between gains nothing.
    async fn resolves_outside(
        &self,
        name: &str,
        url: &str,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let refused = |detail: String| OrchestratorError::NotRunning {
            server: name.to_owned(),
            detail,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|_| refused("its URL is not one".into()))?;
        let host = uri.host().unwrap_or_default();
        if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(()); // an address: checked with the definition
        }
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let addrs = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| refused(format!("resolving {host} timed out")))?
            .map_err(|e| refused(format!("cannot resolve {host}: {e}")))?;
        for addr in addrs {
            self.inner
                .options
                .policy
                .remote_address(addr.ip())
                .map_err(|e| refused(format!("its host {host} resolves to {e}")))?;
        }
        Ok(())
    }

    /// Writes server `name`'s `McpServer` with `spec`: created, or (unless `new_only`) its
    /// spec replaced, its other metadata kept. A replace, not an apply: a field the new spec
    /// leaves out is gone, whoever wrote it first; and a change made meanwhile by another
    /// replica is not overwritten unseen (tried again on the fresh object). Read and written
    /// untyped, so that a resource whose spec this gateway cannot read (reported `Failed`)
    /// can still be given a definition it can.
    async fn write_resource(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        spec: McpServerSpec,
        new_only: bool,
    ) -> Result<DynamicObject> {
        let params = kube::api::PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let kube_err = |e| OrchestratorError::kube(format!("declare server {name}"), e);
        let spec = serde_json::to_value(&spec).map_err(|e| kube_err(kube::Error::SerdeError(e)))?;
        for _ in 0..3 {
            let written = match api.get_opt(name).await.map_err(kube_err)? {
                Some(_) if new_only => return Err(OrchestratorError::Exists(name.to_owned())),
                Some(mut current) => {
                    // The whole spec, whatever it held: nothing unreadable is left behind.
                    current.data["spec"] = spec.clone();
                    api.replace(name, &params, &current).await
                }
                None => {
                    let fresh = DynamicObject::new(name, &ApiResource::erase::<McpServer>(&()))
                        .data(serde_json::json!({ "spec": spec }));
                    api.create(&params, &fresh).await
                }
            };
            match written {
                Ok(obj) => return Ok(obj),
                // Created meanwhile (AlreadyExists) or changed meanwhile (Conflict).
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    if new_only && e.reason == "AlreadyExists" {
                        return Err(OrchestratorError::Exists(name.to_owned()));
                    }
                }
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(OrchestratorError::Conflict(format!(
            "{name} keeps changing under this write: try again"
        )))
    }

    /// Builds the client from `settings` and starts watching, electing and reconciling.
    pub async fn start(settings: KubeSettings) -> Result<Self> {
        let (client, ns) = settings.client().await?;
        Ok(Self::start_with_client(
            client,
            ns,
            settings.leader_election,
            settings.options,
        ))
    }

    /// Starts with a ready client (embedding, tests). Must run inside a Tokio runtime.
    /// `McpServer` resources run once [`Runtime::sync`] has given the configuration (empty,
    /// when there is none), which wins over a resource of the same name.
    pub fn start_with_client(
        client: Client,
        namespace: String,
        leader_election: Option<LeaseSettings>,
        options: KubeOptions,
    ) -> Self {
        let (leading_tx, leading) = watch::channel(leader_election.is_none());
        let holder_relay = watch::Sender::new(None);
        let handover = watch::Sender::new(super::Handover::Nobody);
        let relay_key = watch::Sender::new(None);
        let inner = Arc::new(Inner {
            client: client.clone(),
            ns: namespace.clone(),
            options: options.clone(),
            desired: DashMap::new(),
            deployments: Index::default(),
            replicasets: Index::default(),
            pods: Index::default(),
            secrets: Index::default(),
            services: Index::default(),
            network_policies: Index::default(),
            cilium_policies: Index::default(),
            statuses: DashMap::new(),
            status_pods: DashMap::new(),
            refreshing: std::sync::Mutex::new(()),
            restarted: DashMap::new(),
            sleep_locks: DashMap::new(),
            written: DashMap::new(),
            resources: DashMap::new(),
            sleep_requests: DashMap::new(),
            usage: DashMap::new(),
            replicated: leader_election.is_some(),
            recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
            status_changed: watch::Sender::new(0),
            refreshed: watch::Sender::new(0),
            queue: Arc::default(),
            leading: leading.clone(),
            holder_relay: holder_relay.subscribe(),
            relay_key: relay_key.subscribe(),
            stats: Stats::default(),
            config_known: AtomicBool::new(false),
            removed: DashMap::new(),
        });
        let mut tasks = Vec::new();
        let mut synced = Vec::new();
        macro_rules! watch_kind {
            ($ty:ty, $field:ident) => {{
                let (tx, rx) = watch::channel(false);
                synced.push(rx);
                tasks.push(tokio::spawn(watch_children::<$ty>(
                    inner.clone(),
                    |i: &Inner| &i.$field,
                    tx,
                )));
            }};
        }
        watch_kind!(Deployment, deployments);
        watch_kind!(ReplicaSet, replicasets);
        watch_kind!(Pod, pods);
        watch_kind!(Secret, secrets);
        watch_kind!(Service, services);
        watch_kind!(NetworkPolicy, network_policies);
        // Only where the operator says Cilium runs: elsewhere the kind does not exist.
        if options.policy.cilium {
            watch_kind!(cilium::CiliumNetworkPolicy, cilium_policies);
        }
        if options.watch_mcpservers {
            tasks.push(tokio::spawn(watch_mcpservers(inner.clone())));
        }
        tasks.push(tokio::spawn(worker(inner.clone(), synced)));
        let relay = match (&leader_election, options.relay_listen) {
            (Some(settings), Some(listen)) => {
                tasks.push(tokio::spawn(relay_secret_task(
                    Api::namespaced(client.clone(), &namespace),
                    format!("{}-relay", settings.name),
                    options.retry_after,
                    relay_key,
                )));
                Some(Arc::new(RelayAccess::new(
                    listen,
                    leading,
                    inner.relay_key.clone(),
                    inner.holder_relay.clone(),
                    handover.subscribe(),
                )))
            }
            _ => None,
        };
        let lease = leader_election.map(|settings| {
            let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
            let mut elector = Elector::new(api.clone(), settings.clone());
            if let Some(relay) = &relay {
                elector = elector.with_relay(
                    relay.advertised(),
                    inner.relay_key.clone(),
                    holder_relay,
                    handover,
                );
            }
            tasks.push(tokio::spawn(elector.run(leading_tx.clone())));
            (api, settings)
        });
        // Whoever becomes the leader re-checks everything. Calls to servers that may sleep
        // change way (straight, or through the new leader's relay): the leader must see
        // every one of them.
        let on_lead = inner.clone();
        tasks.push(tokio::spawn(async move {
            let mut rx = on_lead.leading.clone();
            loop {
                for usage in on_lead.usage.iter() {
                    usage.reroute();
                }
                if *rx.borrow_and_update() {
                    on_lead.enqueue_all();
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }));
        let resync = inner.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(resync.options.resync_every);
            tick.tick().await;
            loop {
                tick.tick().await;
                resync.enqueue_all();
            }
        }));
        KubeRuntime {
            inner,
            tasks: std::sync::Mutex::new(tasks),
            lease,
            leading: leading_tx,
            relay,
        }
    }

    /// Whether this replica currently holds the lease (always true without election).
    pub fn is_leader(&self) -> bool {
        *self.inner.leading.borrow()
    }

    /// Namespace the servers run in.
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }

    /// The reconcile loop's counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            reconciles: s.reconciles.load(Ordering::Relaxed),
            applies: s.applies.load(Ordering::Relaxed),
            deletes: s.deletes.load(Ordering::Relaxed),
            status_writes: s.status_writes.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Servers ready, and servers defined (cheap: for probes and metrics).
    pub fn ready_count(&self) -> (usize, usize) {
        let ready = self
            .inner
            .statuses
            .iter()
            .filter(|s| s.value().is_ready())
            .count();
        (ready, self.inner.desired.len())
    }

    /// Subscribes to status changes (the value counts changes).
    pub fn watch_statuses(&self) -> watch::Receiver<u64> {
        self.inner.status_changed.subscribe()
    }

    /// Stops reconciling and gives the lease up so another replica takes over at once.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
        if let Some((api, settings)) = &self.lease {
            // Nothing this replica still does as leader (a relayed plugin state operation)
            // may follow the state's handing over.
            self.leading.send_replace(false);
            // Bounded: a gateway stopping during a partition must still stop (the lease then
            // expires on its own).
            let key = self.inner.relay_key.borrow().clone();
            let release = Elector::release(api, settings, key.as_deref());
            match tokio::time::timeout(settings.lease_duration, release).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("releasing the lease: {e}"),
                Err(_) => tracing::warn!("releasing the lease: no answer in time"),
            }
        }
    }
}

impl Inner {
    fn enqueue(&self, server: impl Into<String>) {
        self.queue.push(server.into());
    }

    fn enqueue_all(&self) {
        let mut names: BTreeSet<String> = self.desired.iter().map(|e| e.key().clone()).collect();
        names.extend(self.deployments.servers());
        names.extend(self.secrets.servers());
        names.extend(self.services.servers());
        names.extend(self.network_policies.servers());
        names.extend(self.cilium_policies.servers());
        for n in names {
            self.enqueue(n);
        }
    }

    fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Whether the server sleeps: as this replica last asked, until its Deployment says so,
    /// then as the Deployment's annotation says (any replica may have woken it since).
    fn asleep(&self, name: &str) -> bool {
        if let Some(asked) = self.sleep_requests.get(name) {
            return *asked;
        }
        self.deployment_asleep(name)
    }

    fn deployment_asleep(&self, name: &str) -> bool {
        self.deployments
            .get(name, &object_name(name))
            .is_some_and(|d| d.annotations().contains_key(ASLEEP_ANNOTATION))
    }

    /// Forgets a sleep or wake request once the Deployment shows it.
    fn settle_sleep_request(&self, name: &str) {
        let shown = self.deployment_asleep(name);
        self.sleep_requests
            .remove_if(name, |_, asked| *asked == shown);
    }

    /// The server's usage when it may sleep (as of its last reconcile: a lookup, for every call).
    fn usage(&self, name: &str) -> Option<Arc<Usage>> {
        if let Some(u) = self.usage.get(name) {
            return Some(u.clone());
        }
        // A first look at a server found asleep (a restarted gateway, before its reconcile):
        // known asleep at once, so that a listing does not wake it.
        match self.deployment_asleep(name) {
            true => self.refresh_usage(name),
            false => None,
        }
    }

    /// Follows the server's current definition: whether it may sleep, and after how long.
    fn refresh_usage(&self, name: &str) -> Option<Arc<Usage>> {
        // Under leader election without a relay, the other replicas reach an HTTP server
        // straight, so the leader cannot tell when nobody uses it.
        let after = self.valid(name).and_then(|(s, _)| {
            if self.replicated
                && s.http_port_path().is_some()
                && self.options.relay_listen.is_none()
            {
                return None;
            }
            super::idle::after_of(&s.spec, self.options.idle_after)
                .map(|after| (after, super::idle::fingerprint(&s.spec)))
        });
        let Some((after, definition)) = after else {
            self.usage.remove(name);
            return None;
        };
        let mut entry = self
            .usage
            .entry(name.to_string())
            .or_insert_with(|| Usage::new(after, definition));
        if entry.after() != after || entry.definition() != definition {
            *entry = Usage::new(after, definition);
        }
        let usage = entry.clone();
        drop(entry);
        // A server found asleep (a restarted gateway) is known asleep from its first look.
        if self.deployment_asleep(name) && self.sleep_requests.get(name).is_none_or(|a| *a) {
            usage.fell_asleep();
        }
        Some(usage)
    }

    fn sleep_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.sleep_locks
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Starts a sleeping server: the leader through its next reconcile; another replica, for
    /// a server it reaches straight (not through the relay), by scaling the Deployment back
    /// up itself (the leader then sees it awake).
    async fn wake(&self, name: &str) -> Result<()> {
        tracing::info!(server = name, "waking: a call needs it");
        if self.leading() {
            // After a scale-down in flight has landed: its pods are going (the ReplicaSet
            // controller deletes them when it gets to it, or keeps one it had not reached
            // if the Deployment scales back up first). Either way a call must not be sent to
            // them: they are deleted now, and waited past like a restart's.
            let _after_scale_down = self.sleep_lock(name).lock_owned().await;
            if self.deployment_asleep(name) {
                self.retire_pods(name).await?;
            }
            self.sleep_requests.insert(name.to_string(), false);
            if let Some(u) = self.usage.get(name) {
                u.woke();
            }
            self.enqueue(name);
        } else {
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
            let patch = serde_json::json!({
                "metadata": {"annotations": {ASLEEP_ANNOTATION: null}},
                "spec": {"replicas": 1},
            });
            api.patch(
                &object_name(name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| OrchestratorError::kube(format!("wake server {name}"), e))?;
            if let Some(u) = self.usage.get(name) {
                u.woke();
            }
        }
        self.refresh_status(name, None);
        Ok(())
    }

    /// Deletes the server's pods that are not yet terminating, and marks them gone for
    /// [`Self::wait_ready`] until the watch has caught up.
    async fn retire_pods(&self, name: &str) -> Result<()> {
        let pods: Vec<String> = self
            .own_pods(name)
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        if pods.is_empty() {
            return Ok(());
        }
        // With those of an earlier restart or wake that the watch still shows.
        let shown: Vec<String> = self.own_pods(name).iter().map(|p| p.name_any()).collect();
        let mut gone = self.restarted.entry(name.to_string()).or_default();
        gone.retain(|p| shown.contains(p) && !pods.contains(p));
        gone.extend(pods.iter().cloned());
        drop(gone);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        for pod in pods {
            tracing::info!(
                server = name,
                pod,
                "waking: deleting a pod of the scale-down"
            );
            match api.delete(&pod, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(OrchestratorError::kube(format!("delete Pod {pod}"), e)),
            }
        }
        Ok(())
    }

    fn valid(&self, name: &str) -> Option<(ResolvedServer, Source)> {
        match self.desired.get(name).as_deref() {
            Some(Desired::Valid { server, source }) => Some(((**server).clone(), source.clone())),
            _ => None,
        }
    }

    /// Applies `desired` unless the watched copy already has every field we set.
    async fn ensure<K>(&self, index: &Index<K>, server: &str, desired: K) -> Result<Arc<K>>
    where
        K: Namespaced + Serialize,
    {
        let name = desired.name_any();
        if let Some(observed) = index.get(server, &name) {
            let want = serde_json::to_value(&desired).unwrap_or_default();
            let have = serde_json::to_value(&*observed).unwrap_or_default();
            if objects::is_subset(&want, &have) {
                return Ok(observed);
            }
            tracing::info!(server, kind = %K::kind(&Default::default()), name, "drifted: re-applying");
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.ns);
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|e| {
                OrchestratorError::kube(format!("apply {} {name}", K::kind(&Default::default())), e)
            })?;
        self.stats.applies.fetch_add(1, Ordering::Relaxed);
        Ok(index
            .upsert(applied)
            .map(|(_, o)| o)
            .expect("applied objects carry the server label"))
    }

    /// Like [`Self::ensure`] for an egress policy, whose spec must match exactly: a field
    /// someone else added (a selector that no longer selects the pod, a wider peer) is a way
    /// out, and an apply leaves other managers' fields alone, so a drifted policy is replaced
    /// whole (over the version observed: a concurrent change fails and is retried).
    async fn ensure_exact<K>(&self, index: &Index<K>, server: &str, desired: K) -> Result<()>
    where
        K: Namespaced + Serialize + Clone + DeserializeOwned,
    {
        let name = desired.name_any();
        let spec = |o: &K| serde_json::to_value(o).ok().map(|mut v| v["spec"].take());
        if let Some(observed) = index.get(server, &name)
            && spec(&observed) != spec(&desired)
        {
            let kind = K::kind(&Default::default()).into_owned();
            tracing::info!(server, name, kind, "egress policy drifted: replacing it");
            let mut replacement = desired;
            replacement.meta_mut().resource_version = observed.meta().resource_version.clone();
            let api: Api<K> = Api::namespaced(self.client.clone(), &self.ns);
            let pp = kube::api::PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            let replaced = api
                .replace(&name, &pp, &replacement)
                .await
                .map_err(|e| OrchestratorError::kube(format!("replace {kind} {name}"), e))?;
            self.stats.applies.fetch_add(1, Ordering::Relaxed);
            index.upsert(replaced);
            return Ok(());
        }
        self.ensure(index, server, desired).await.map(drop)
    }

    /// Deletes an object if we watch one of that name; "already gone" is success.
    async fn delete_if_present<K>(&self, index: &Index<K>, server: &str, name: &str) -> Result<()>
    where
        K: Namespaced,
    {
        let Some(obj) = index.get(server, name) else {
            return Ok(());
        };
        drop(obj);
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.ns);
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(OrchestratorError::kube(
                    format!("delete {} {name}", K::kind(&Default::default())),
                    e,
                ));
            }
        }
        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
        index.remove_named(server, name);
        Ok(())
    }

    /// Makes the cluster match the desired state of one server.
    async fn reconcile(&self, name: &str) -> Result<()> {
        let obj = object_name(name);
        let Some((server, source)) = self.valid(name) else {
            if self.desired.contains_key(name) {
                return Ok(()); // invalid definition: leave what runs alone
            }
            // Not desired: remove what we created, except children of an McpServer
            // (the garbage collector removes those with their owner). Before the
            // configuration is known, a server without a definition may just not have
            // been applied yet: leave it alone.
            if !self.config_known.load(Ordering::Acquire) && !self.removed.contains_key(name) {
                return Ok(());
            }
            return self.delete_workload(name, false).await;
        };
        // An `McpServer` named like a config-file server loses to it, but only once the
        // configuration is known: at start the watch's first list may come before it, and
        // the resource's workload would run (its image, its values) until it does. `sync`
        // reconciles everything again once it is known.
        if matches!(source, Source::Resource { .. }) && !self.config_known.load(Ordering::Acquire) {
            return Ok(());
        }
        if server.spec.remote.is_some() {
            // Nothing runs for a remote, nor sleeps: what ran for an earlier definition of it
            // goes, and a sleep asked of that one is forgotten.
            self.sleep_requests.remove(name);
            return self.delete_workload(name, true).await;
        }
        let resource_owner = match &source {
            Source::Resource { uid } => Some(objects::owner_ref(
                &McpServer::api_version(&()),
                &McpServer::kind(&()),
                name,
                uid,
            )),
            Source::Config => None,
        };
        let deployment_owner = |d: &Deployment| {
            d.metadata
                .uid
                .as_deref()
                .map(|uid| objects::owner_ref("apps/v1", "Deployment", &obj, uid))
        };
        let known_owner = match &resource_owner {
            Some(_) => None,
            None => self
                .deployments
                .get(name, &obj)
                .and_then(|d| deployment_owner(&d)),
        };
        if resource_owner.is_some() && server.uses_stored_secrets() {
            self.values_given_for(name, &server.spec).await?;
        }
        let rendered = objects::render(
            &server,
            &self.ns,
            resource_owner.as_ref(),
            known_owner.as_ref(),
            &self.options.policy,
        )?;
        // The Secret and the egress policy first: the pod never starts without its keys, nor
        // unrestricted.
        match rendered.secret {
            Some(secret) => {
                self.ensure(&self.secrets, name, secret).await?;
            }
            None => self.delete_if_present(&self.secrets, name, &obj).await?,
        }
        match rendered.cilium_policy {
            Some(cnp) => self.ensure_exact(&self.cilium_policies, name, cnp).await?,
            None => {
                self.delete_if_present(&self.cilium_policies, name, &obj)
                    .await?
            }
        }
        match rendered.network_policy {
            Some(np) => self.ensure_exact(&self.network_policies, name, np).await?,
            None => {
                self.delete_if_present(&self.network_policies, name, &obj)
                    .await?
            }
        }
        let mut rendered_deployment = rendered.deployment;
        // From the last look at a pending sleep below until the Deployment is applied, a wake
        // waits (it then finds the server scaled down, or the sleep called off). Taken before
        // that look, by every pass: a sleep asked for meanwhile is seen under it.
        let _sleeping = self.sleep_lock(name).lock_owned().await;
        // A call that began since the sleep was asked for keeps the server up.
        if self.sleep_requests.get(name).is_some_and(|asked| *asked)
            && let Some(u) = self.usage(name).filter(|u| !u.is_idle())
        {
            self.sleep_requests.remove(name);
            u.woke();
        }
        if self.asleep(name) {
            // Since when: the Deployment's own mark once it has one (a fresh time on every
            // reconcile would read as drift).
            let since = self
                .deployments
                .get(name, &object_name(name))
                .and_then(|d| d.annotations().get(ASLEEP_ANNOTATION).cloned())
                .unwrap_or_else(|| conditions::rfc3339(Timestamp::now()));
            if let Some(spec) = rendered_deployment.spec.as_mut() {
                spec.replicas = Some(0);
            }
            rendered_deployment
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(ASLEEP_ANNOTATION.into(), since);
        }
        let deployment = self
            .ensure(&self.deployments, name, rendered_deployment)
            .await?;
        self.settle_sleep_request(name);
        let mut service = rendered.service;
        if resource_owner.is_none() && known_owner.is_none() {
            // The Deployment did not exist: now it does, it owns the Secret and Service.
            let owner = deployment_owner(&deployment);
            let again = objects::render(
                &server,
                &self.ns,
                None,
                owner.as_ref(),
                &self.options.policy,
            )?;
            if let Some(secret) = again.secret {
                self.ensure(&self.secrets, name, secret).await?;
            }
            if let Some(np) = again.network_policy {
                self.ensure_exact(&self.network_policies, name, np).await?;
            }
            if let Some(cnp) = again.cilium_policy {
                self.ensure_exact(&self.cilium_policies, name, cnp).await?;
            }
            service = again.service;
        }
        match service {
            Some(service) => {
                self.ensure(&self.services, name, service).await?;
            }
            None => self.delete_if_present(&self.services, name, &obj).await?,
        }
        // A pod of ours that ended (evicted: Failed; stopped by a graceful node shutdown:
        // Succeeded) is replaced by its ReplicaSet but stays behind until deleted.
        for pod in self.pods_of(name, |_| true) {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Failed" | "Succeeded"))
                && pod.metadata.deletion_timestamp.is_none()
            {
                let pod_name = pod.name_any();
                tracing::info!(server = name, pod = %pod_name, "deleting a failed pod");
                self.delete_if_present(&self.pods, name, &pod_name).await?;
            }
        }
        Ok(())
    }

    /// Refuses what needs something of server `name` running here (`what`) when it is remote.
    fn not_remote(&self, name: &str, what: &'static str) -> Result<()> {
        match self.valid(name) {
            Some((s, _)) if s.spec.remote.is_some() => Err(OrchestratorError::Remote {
                server: name.to_owned(),
                what,
            }),
            _ => Ok(()),
        }
    }

    /// Deletes what runs server `name` (its Deployment, Secret, Service and egress policies;
    /// not its values Secret), except, unless `owned_too`, what its `McpServer` owns (the
    /// garbage collector removes those with it).
    async fn delete_workload(&self, name: &str, owned_too: bool) -> Result<()> {
        let obj = object_name(name);
        if owned_too || !self.owned_by_resource(&self.deployments, name, &obj) {
            self.delete_if_present(&self.deployments, name, &obj)
                .await?;
        }
        if owned_too || !self.owned_by_resource(&self.secrets, name, &obj) {
            self.delete_if_present(&self.secrets, name, &obj).await?;
        }
        if owned_too || !self.owned_by_resource(&self.services, name, &obj) {
            self.delete_if_present(&self.services, name, &obj).await?;
        }
        if owned_too || !self.owned_by_resource(&self.network_policies, name, &obj) {
            self.delete_if_present(&self.network_policies, name, &obj)
                .await?;
        }
        if owned_too || !self.owned_by_resource(&self.cilium_policies, name, &obj) {
            self.delete_if_present(&self.cilium_policies, name, &obj)
                .await?;
        }
        Ok(())
    }

    fn owned_by_resource<K: Resource>(&self, index: &Index<K>, server: &str, name: &str) -> bool {
        index.get(server, name).is_some_and(|o| {
            o.owner_references()
                .iter()
                .any(|r| r.kind == McpServer::kind(&()))
        })
    }

    /// Refuses to run `spec` with server `name`'s stored secrets when they were given for
    /// another workload: someone who may edit its `McpServer` but not read Secrets (an image,
    /// a command that prints its environment) gets nothing from them. A values Secret from
    /// before the mark is marked for what runs now.
    async fn values_given_for(&self, name: &str, spec: &McpServerSpec) -> Result<()> {
        let secret_name = values_secret_name(name);
        // None yet (an install writes it just after the resource): nothing is rolled out, or
        // a pod of a definition edited meanwhile would wait for values given for another.
        let Some(secret) = self.secrets.get(name, &secret_name) else {
            // Not among the Secrets labelled as the gateway's: none yet, or one of that name
            // someone else made, which the pods (referring to it by name) would read when
            // they next start. Such a one stops what runs.
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
            // (One of the gateway's that the watch has not shown yet is waited for.)
            if api
                .get_opt(&secret_name)
                .await
                .map_err(|e| OrchestratorError::kube(format!("read {secret_name}"), e))?
                .is_some_and(|found| !is_values_of(&found, name))
            {
                self.delete_if_present(&self.deployments, name, &object_name(name))
                    .await?;
                return Err(OrchestratorError::Conflict(format!(
                    "the Secret {secret_name} is not one the gateway wrote for this server: remove it, then give the stored secrets again (secretValue) through the gateway"
                )));
            }
            return Err(OrchestratorError::Conflict(format!(
                "waiting for {secret_name}, which holds its stored secrets"
            )));
        };
        if !is_values_of(&secret, name) {
            // Replaced behind the gateway's back after a rollout: the pods already running
            // would read it when they next start (a restart, a wake). None runs with it.
            self.delete_if_present(&self.deployments, name, &object_name(name))
                .await?;
            return Err(OrchestratorError::Conflict(format!(
                "the Secret {secret_name} is not one the gateway wrote for this server (type {}): remove it, then give the stored secrets again (secretValue) through the gateway",
                secret.type_.as_deref().unwrap_or("Opaque")
            )));
        }
        let runs = spec.workload_digest();
        match secret.annotations().get(VALUES_FOR_ANNOTATION) {
            Some(given_for) if *given_for == runs => Ok(()),
            Some(_) => Err(OrchestratorError::Conflict(format!(
                "{secret_name} holds secrets given for another image, command, arguments, environment or egress than the definition has now: give them again (secretValue) through the gateway"
            ))),
            None => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
                let mark =
                    serde_json::json!({"metadata": {"annotations": {VALUES_FOR_ANNOTATION: runs}}});
                api.patch(&secret_name, &PatchParams::default(), &Patch::Merge(&mark))
                    .await
                    .map_err(|e| OrchestratorError::kube(format!("mark {secret_name}"), e))?;
                Ok(())
            }
        }
    }

    /// Recomputes a server's status from its pod; returns whether it changed.
    fn refresh_status(&self, name: &str, error: Option<&OrchestratorError>) -> bool {
        // One refresh at a time: the status and the pod it was read from are written as a
        // pair, and a refresh computed from an older view never lands after a newer one.
        let _one = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        let desired = self.desired.get(name).map(|d| match &*d {
            Desired::Invalid { message } => Err(message.clone()),
            Desired::Valid { .. } => Ok(()),
        });
        // Nothing runs for a remote: it is ready once its stored header values are there.
        let remote = self.valid(name).and_then(|(s, _)| {
            let remote = s.spec.remote.as_ref()?;
            let missing = s
                .spec
                .stored_secret_names()
                .into_iter()
                .find(|k| self.stored_value(name, k).is_none());
            Some(match missing {
                None => {
                    ServerStatus::new(Phase::Ready).with_message(format!("remote: {}", remote.url))
                }
                Some(k) => ServerStatus::new(Phase::Starting).with_message(format!(
                    "remote: waiting for {} to hold {k} given for this URL's origin",
                    values_secret_name(name)
                )),
            })
        });
        let next = match desired {
            None => {
                self.status_pods.remove(name);
                self.sleep_locks.remove(name);
                None
            }
            Some(Err(message)) => Some(
                ServerStatus::new(Phase::Failed {
                    reason: FailureReason::InvalidDefinition,
                })
                .with_message(message),
            ),
            Some(Ok(())) if remote.is_some() => {
                self.status_pods.remove(name);
                remote
            }
            Some(Ok(())) if self.asleep(name) => {
                // Counted once the Deployment is scaled down: a request a call calls off
                // stopped nothing. Its usage is made now if need be: a restarted gateway
                // shows it asleep only once its usage knows (the wake that follows counts).
                if self.deployment_asleep(name)
                    && let Some(u) = self.refresh_usage(name)
                {
                    u.fell_asleep();
                }
                self.status_pods.remove(name);
                Some(
                    ServerStatus::new(Phase::Asleep)
                        .with_message("idle: scaled to zero until the next call"),
                )
            }
            Some(Ok(())) => {
                if let Some(u) = self.usage.get(name)
                    && u.is_asleep()
                {
                    // Another replica woke it.
                    u.woke();
                }
                let pods = self.serving_pods(name);
                let observed = status::observe(status::current_pod(pods.iter().map(|p| &**p)));
                match &observed.pod {
                    Some(pod) => self.status_pods.insert(name.to_string(), pod.clone()),
                    None => self.status_pods.remove(name).map(|(_, p)| p),
                };
                // A pod that started before its Secret was (re)made: the kubelet retries it,
                // so it is starting, not failed (a deleted Deployment is repaired this way,
                // the garbage collector having taken its Secret). The server's own Secret is
                // made again by this loop; its values Secret only if it is there.
                let ours_now = |message: &Option<String>| {
                    let missing = |s: &str| {
                        message
                            .as_deref()
                            .is_some_and(|m| m.contains(&format!("secret \"{s}\" not found")))
                    };
                    let values = values_secret_name(name);
                    missing(&object_name(name))
                        || (missing(&values) && self.secrets.get(name, &values).is_some())
                };
                let phase = match observed.phase {
                    Phase::Failed {
                        reason: FailureReason::CreateContainerConfig,
                    } if ours_now(&observed.message) => Phase::Starting,
                    phase => phase,
                };
                let mut st = ServerStatus::new(phase);
                st.restarts = observed.restarts;
                st.message = observed.message;
                if observed.pod.is_none()
                    && self.deployments.get(name, &object_name(name)).is_none()
                {
                    st.message = Some("creating the Deployment".into());
                }
                if let Some(e) = error {
                    st.message = Some(format!("reconcile failed: {e}"));
                }
                Some(st)
            }
        };
        let changed = match next {
            None => self.statuses.remove(name).is_some(),
            Some(mut st) => match self.statuses.get_mut(name) {
                Some(mut cur) => {
                    if cur.phase == st.phase
                        && cur.message == st.message
                        && cur.restarts == st.restarts
                    {
                        false
                    } else {
                        if std::mem::discriminant(&cur.phase) == std::mem::discriminant(&st.phase) {
                            st.since = cur.since;
                        }
                        *cur = st;
                        true
                    }
                }
                None => {
                    self.statuses.insert(name.to_string(), st);
                    true
                }
            },
        };
        if changed {
            self.status_changed.send_modify(|g| *g += 1);
        }
        self.refreshed.send_modify(|g| *g += 1);
        changed
    }

    /// Writes the status of a server defined by an `McpServer` resource and records the
    /// Events its change is worth (leader only).
    async fn write_resource_status(
        &self,
        name: &str,
        generation: Option<i64>,
        error: Option<&OrchestratorError>,
    ) {
        let is_resource = matches!(
            self.desired.get(name).as_deref(),
            Some(Desired::Valid {
                source: Source::Resource { .. },
                ..
            }) | Some(Desired::Invalid { .. })
        );
        if !is_resource {
            return;
        }
        let Some(st) = self.statuses.get(name).map(|s| s.clone()) else {
            return;
        };
        let Some(resource) = self.resources.get(name).map(|r| r.clone()) else {
            return;
        };
        let error = error.map(|e| e.to_string());
        let facts = conditions::Facts {
            generation,
            endpoint: self.valid(name).map(|(s, _)| self.endpoint_string(&s)),
            reconcile_error: error.as_deref(),
        };
        let prev = self.written.get(name).map(|w| w.clone());
        let status = conditions::render(&st, &facts, prev.as_ref(), Timestamp::now());
        if prev.as_ref() == Some(&status) {
            return;
        }
        // Untyped: the answer is the whole resource, which may hold what this gateway cannot
        // read (the status is written all the same, and must be taken as written).
        let api = mcpservers_untyped(self.client.clone(), &self.ns);
        let patch = serde_json::json!({
            "apiVersion": McpServer::api_version(&()),
            "kind": McpServer::kind(&()),
            "status": status,
        });
        match api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                self.stats.status_writes.fetch_add(1, Ordering::Relaxed);
                let occurred = conditions::events(prev.as_ref(), &status);
                self.written.insert(name.to_string(), status);
                self.record(name, &resource, occurred).await;
            }
            Err(e) => tracing::warn!(server = name, "writing McpServer status: {e}"),
        }
    }

    /// Records Events on the `McpServer` resource; a failure is logged, never retried (an
    /// Event is a hint for people, the status is the record).
    async fn record(
        &self,
        name: &str,
        resource: &ResourceRef,
        occurred: Vec<conditions::Occurrence>,
    ) {
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(McpServer::api_version(&()).into_owned()),
            kind: Some(McpServer::kind(&()).into_owned()),
            name: Some(name.to_string()),
            namespace: Some(self.ns.clone()),
            uid: Some(resource.uid.clone()),
            ..Default::default()
        };
        for o in occurred {
            let event = KubeEvent {
                type_: if o.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: o.reason,
                note: Some(o.note),
                action: o.action.to_string(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &regarding).await {
                tracing::warn!(server = name, "recording an Event: {e}");
            }
        }
    }

    fn endpoint_string(&self, server: &ResolvedServer) -> String {
        if let Some(remote) = &server.spec.remote {
            return remote.url.clone();
        }
        objects::service_url(server, &self.ns)
            .unwrap_or_else(|| format!("attach://{}/{}", self.ns, server.object_name()))
    }

    async fn process(&self, name: &str) {
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        self.refresh_usage(name);
        // The generation this pass works from (a newer one may land meanwhile).
        let generation = self.resources.get(name).and_then(|r| r.generation);
        let leading = self.leading();
        let mut error = None;
        if leading && let Err(e) = self.reconcile(name).await {
            tracing::warn!(server = name, "reconcile failed (retrying): {e}");
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            error = Some(e);
        }
        self.refresh_status(name, error.as_ref());
        if error.is_none() {
            self.queue.succeeded(name);
        } else if let Some(after) = self.queue.failed(name, &self.retry_backoff()) {
            let queue = self.queue.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                queue.retry_due(&name);
            });
        }
        if leading {
            self.write_resource_status(name, generation, error.as_ref())
                .await;
        }
    }

    /// Delays between retries of a server's failed reconciles: `retry_after`, doubling up
    /// to `retry_max`.
    fn retry_backoff(&self) -> super::backoff::Backoff {
        super::backoff::Backoff {
            initial: self.options.retry_after,
            max: self.options.retry_max.max(self.options.retry_after),
            factor: 2.0,
            jitter: 0.1,
            reset_after: Duration::ZERO,
        }
    }

    fn current_pod(&self, name: &str) -> Option<Arc<Pod>> {
        let pods = self.serving_pods(name);
        let current = status::current_pod(pods.iter().map(|p| &**p))?
            .metadata
            .name
            .clone();
        pods.into_iter().find(|p| p.metadata.name == current)
    }

    fn current_pod_name(&self, name: &str) -> Option<String> {
        self.current_pod(name).and_then(|p| p.metadata.name.clone())
    }

    /// The server's pods that its own Deployment created: each one's controller is a
    /// ReplicaSet whose controller is the Deployment we applied (by uid). Anyone who may
    /// create pods can copy our labels; such a pod is never attached to, reached, or
    /// taken for the server's status.
    fn own_pods(&self, name: &str) -> Vec<Arc<Pod>> {
        self.pods_of(name, |_| true)
    }

    /// The server's own pods whose ReplicaSet passes `keep`.
    fn pods_of(&self, name: &str, keep: impl Fn(&ReplicaSet) -> bool) -> Vec<Arc<Pod>> {
        let Some(deployment_uid) = self
            .deployments
            .get(name, &object_name(name))
            .and_then(|d| d.metadata.uid.clone())
        else {
            return Vec::new();
        };
        let replicasets: BTreeSet<String> = self
            .replicasets
            .of(name)
            .iter()
            .filter(|rs| {
                controller_uid(&rs.metadata, "apps/v1", "Deployment") == Some(&deployment_uid)
                    && keep(rs)
            })
            .filter_map(|rs| rs.metadata.uid.clone())
            .collect();
        self.pods
            .of(name)
            .into_iter()
            .filter(|p| {
                controller_uid(&p.metadata, "apps/v1", "ReplicaSet")
                    .is_some_and(|uid| replicasets.contains(uid))
            })
            .collect()
    }

    /// The server's own pods made from its current definition (image, command, args of the
    /// ReplicaSet's template: admission webhooks may rewrite a pod's image, say to a digest,
    /// but not the template). While the reconcile loop replaces the pods of a drifted or
    /// outdated template, their state (say, a crash of someone else's image) is not the server's.
    fn serving_pods(&self, name: &str) -> Vec<Arc<Pod>> {
        let desired = self.desired.get(name).and_then(|d| match &*d {
            Desired::Valid { server, .. } => Some((
                server.spec.image.clone(),
                server.spec.command.as_ref().map(|c| vec![c.clone()]),
                server.spec.args.clone(),
            )),
            Desired::Invalid { .. } => None,
        });
        self.pods_of(name, |rs| {
            let Some((image, command, args)) = &desired else {
                return true;
            };
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.spec.as_ref())
                .and_then(|s| s.containers.iter().find(|c| c.name == objects::CONTAINER))
                .is_some_and(|c| {
                    c.image == *image
                        && c.command == *command
                        && c.args.as_deref().unwrap_or_default() == args.as_slice()
                })
        })
    }

    async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<String> {
        let mut rx = self.refreshed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if !self.desired.contains_key(name) {
                    return Err(OrchestratorError::NotFound(name.to_string()));
                }
                let current = self.current_pod_name(name);
                let invalid = matches!(
                    self.desired.get(name).as_deref(),
                    Some(Desired::Invalid { .. })
                );
                let read_from = self.status_pods.get(name).map(|p| p.clone());
                let stale = (!invalid && current != read_from)
                    || current.is_some_and(|pod| {
                        self.restarted
                            .get(name)
                            .is_some_and(|gone| gone.contains(&pod))
                    });
                if let Some(st) = self.statuses.get(name).map(|s| s.clone())
                    && !stale
                {
                    match st.phase {
                        Phase::Ready => {
                            if let Some(pod) = self.current_pod_name(name) {
                                return Ok(pod);
                            }
                        }
                        Phase::Failed { reason } => {
                            return Err(OrchestratorError::Failed {
                                server: name.to_string(),
                                reason,
                                message: st.message,
                            });
                        }
                        _ => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(OrchestratorError::Removed(name.to_string()));
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => {
                let last = self.statuses.get(name).map_or_else(
                    || "no status yet".to_string(),
                    |s| match &s.message {
                        Some(m) => format!("{}: {m}", s.phase.name()),
                        None => s.phase.name().to_string(),
                    },
                );
                Err(OrchestratorError::Timeout {
                    server: name.to_string(),
                    waited: timeout,
                    last,
                })
            }
        }
    }

    /// On a replica that does not lead, waits (until `deadline`) for what reaching a stdio
    /// server through the leader's relay takes: its address in the lease, and the secret.
    async fn wait_for_relay(&self, name: &str, deadline: tokio::time::Instant) {
        let relayed = self
            .valid(name)
            .is_some_and(|(s, _)| self.through_relay(&s));
        if !relayed || self.options.relay_listen.is_none() {
            return;
        }
        let (mut leading, mut holder, mut secret) = (
            self.leading.clone(),
            self.holder_relay.clone(),
            self.relay_key.clone(),
        );
        loop {
            if *leading.borrow_and_update()
                || (holder.borrow_and_update().is_some() && secret.borrow_and_update().is_some())
            {
                return;
            }
            tokio::select! {
                Ok(()) = leading.changed() => {}
                Ok(()) = holder.changed() => {}
                Ok(()) = secret.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Whether this replica reaches the server through the leader's relay: a stdio server
    /// (never attach beside the leader: the kubelet would merge both replicas' stdin and
    /// copy the server's stdout to each), and an HTTP server that may sleep (the leader must
    /// see every use of it to know when it is idle, and alone scales it).
    fn through_relay(&self, server: &ResolvedServer) -> bool {
        !self.leading()
            && server.spec.remote.is_none()
            && (server.http_port_path().is_none()
                || (self.options.relay_listen.is_some()
                    && super::idle::after_of(&server.spec, self.options.idle_after).is_some()))
    }

    /// Value `key` of server `name`'s values Secret (as watched), when that Secret is the
    /// server's (made by the gateway for it).
    fn stored_value(&self, name: &str, key: &str) -> Option<String> {
        let secret = self.secrets.get(name, &values_secret_name(name))?;
        let ours = is_values_of(&secret, name);
        if key.starts_with("header.")
            && !self
                .valid(name)
                .is_some_and(|(s, _)| for_origin(&secret, &s.spec))
        {
            return None;
        }
        let value = secret.data.as_ref()?.get(key)?;
        ours.then(|| String::from_utf8(value.0.clone()).ok())?
    }

    /// The leader's relay, for a server this replica reaches through it.
    fn relay_endpoint(&self, name: &str) -> Result<Endpoint> {
        let not_running = |detail: &str| OrchestratorError::NotRunning {
            server: name.to_string(),
            detail: detail.to_string(),
        };
        let leader = self.holder_relay.borrow().clone().ok_or_else(|| {
            not_running("another replica leads (it attaches to stdio servers and alone scales servers that sleep), and its relay is not known yet (GATEHOUSE_ORCHESTRATOR_RELAY_PORT must be set on every replica)")
        })?;
        let key = self
            .relay_key
            .borrow()
            .clone()
            .ok_or_else(|| not_running("the replicas' secret has not been read yet"))?;
        let alike = self.valid(name).is_some_and(|(s, _)| {
            s.http_port_path().is_some() || s.spec.sharing == super::spec::Sharing::Shared
        });
        Ok(Endpoint::Relay {
            url: format!("{leader}/relay/{name}"),
            key,
            alike,
        })
    }

    /// A stdio server's attachment (the leader's), the leader's relay (for what the other
    /// replicas reach through it), or an HTTP server's URL at its own pod's IP (not the
    /// Service, whose label selector would also pick a look-alike pod).
    fn endpoint(self: &Arc<Self>, name: &str) -> Result<Endpoint> {
        let (server, _) = self
            .valid(name)
            .ok_or_else(|| OrchestratorError::NotFound(name.to_string()))?;
        if let Some(remote) = super::remote::endpoint(&server, |key| self.stored_value(name, key)) {
            return remote;
        }
        let (port, path) = match server.http_port_path() {
            Some(http) if !self.through_relay(&server) => http,
            None if self.leading() => {
                return Ok(Endpoint::Stdio(StdioEndpoint::new(Arc::new(
                    attach::KubeAttach::new(self.clone(), name.to_string()),
                ))));
            }
            _ => return self.relay_endpoint(name),
        };
        let ip = self
            .current_pod(name)
            .and_then(|p| p.status.as_ref()?.pod_ip.clone())
            .ok_or_else(|| OrchestratorError::NotRunning {
                server: name.to_string(),
                detail: "no pod of its Deployment has an IP yet".into(),
            })?;
        // Whoever may write the pod's status writes this: only a pod's kind of address goes
        // into the URL (a host name, a path or userinfo would send the server's calls
        // elsewhere; so would the link-local metadata address, or none at all). Loopback
        // stays: a cluster never gives it a pod, and the tests' fake does.
        let refused = |why: &str| OrchestratorError::NotRunning {
            server: name.to_string(),
            detail: format!(
                "its pod's IP {:?} is {why}",
                ip.chars().take(64).collect::<String>()
            ),
        };
        let addr: std::net::IpAddr = ip
            .parse::<std::net::IpAddr>()
            .map_err(|_| refused("not an IP address"))?
            .to_canonical();
        let pod_address = match addr {
            std::net::IpAddr::V4(v4) => {
                !(v4.is_unspecified()
                    || v4.is_link_local()
                    || v4.is_multicast()
                    || v4.is_broadcast())
            }
            std::net::IpAddr::V6(v6) => {
                !(v6.is_unspecified() || v6.is_unicast_link_local() || v6.is_multicast())
            }
        };
        if !pod_address {
            return Err(refused("not a pod's address"));
        }
        let addr = std::net::SocketAddr::new(addr, port);
        Ok(Endpoint::Http {
            url: format!("http://{addr}{path}"),
        })
    }
}

/// Whether the values Secret `secret` holds a remote's header values given for the origin
/// `spec`'s URL has now (its URL may have been edited since, by someone who cannot read
/// them: they go nowhere else).
fn for_origin(secret: &Secret, spec: &McpServerSpec) -> bool {
    let given_for = secret.annotations().get(REMOTE_ORIGIN_ANNOTATION);
    given_for.is_some() && given_for.cloned() == spec.remote_origin()
}

/// Reads the replicas' relay secret from its Secret, creating it (32 random bytes) when no
/// replica has yet, and derives its keys; retries until it has them. While the secret is
/// rotated, the Secret's `also-accepted` holds other secrets (one a line) whose replicas are
/// accepted too.
async fn relay_secret_task(
    api: Api<Secret>,
    name: String,
    retry_after: Duration,
    key: watch::Sender<Option<Arc<ReplicaKey>>>,
) {
    const KEY: &str = "secret";
    const ALSO: &str = "also-accepted";
    let read = |s: &Secret| {
        let text = |k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|v| std::str::from_utf8(&v.0))
        };
        let value = text(KEY)
            .and_then(Result::ok)
            .ok_or_else(|| format!("Secret {name} has no key {KEY:?} in UTF-8"))?;
        let also: Vec<&str> = match text(ALSO) {
            None => Vec::new(),
            Some(Ok(lines)) => lines
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect(),
            Some(Err(_)) => return Err(format!("Secret {name}, key {ALSO:?}: not UTF-8")),
        };
        ReplicaKey::accepting(value, &also)
            .map_err(|e| format!("Secret {name}, key {KEY:?} or {ALSO:?}: {e}"))
    };
    loop {
        let found = match api.get_opt(&name).await {
            Ok(Some(s)) => read(&s),
            Ok(None) => {
                let mut raw = [0u8; 32];
                getrandom::fill(&mut raw).expect("the OS random source is available");
                let value =
                    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
                let new = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        // Not `managed-by: gatehouse`: that marks servers' objects.
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_string(),
                            "gatehouse".to_string(),
                        )])),
                        ..Default::default()
                    },
                    string_data: Some(BTreeMap::from([(KEY.to_string(), value.clone())])),
                    ..Default::default()
                };
                match api.create(&kube::api::PostParams::default(), &new).await {
                    Ok(_) => ReplicaKey::derive(&value).map_err(|e| e.to_string()),
                    // Another replica created it first: read theirs next time round.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => Err(format!("creating Secret {name}: {e}")),
                }
            }
            Err(e) => Err(format!("reading Secret {name}: {e}")),
        };
        match found {
            Ok(derived) => {
                key.send_replace(Some(Arc::new(derived)));
                return;
            }
            Err(why) => {
                tracing::warn!("relay secret: {why}");
                tokio::time::sleep(retry_after).await;
            }
        }
    }
}

async fn worker(inner: Arc<Inner>, synced: Vec<watch::Receiver<bool>>) {
    // Decide nothing before every watch has listed once: an empty index would look like
    // "everything is missing".
    for mut s in synced {
        if s.wait_for(|v| *v).await.is_err() {
            return;
        }
    }
    inner.enqueue_all();
    loop {
        for name in inner.queue.next_batch().await {
            inner.process(&name).await;
        }
    }
}

async fn watch_children<K>(
    inner: Arc<Inner>,
    index: fn(&Inner) -> &Index<K>,
    synced: watch::Sender<bool>,
) where
    K: Namespaced,
{
    let api: Api<K> = Api::namespaced(inner.client.clone(), &inner.ns);
    let stream = watcher::watcher(api, watcher::Config::default().labels(labels::SELECTOR))
        .default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let idx = index(&inner);
        match event {
            Ok(Event::Apply(obj)) => {
                if let Some((server, _)) = idx.upsert(obj) {
                    inner.enqueue(server);
                }
            }
            Ok(Event::Delete(obj)) => {
                if let Some(server) = idx.remove(&obj) {
                    inner.enqueue(server);
                }
            }
            Ok(Event::Init) => idx.begin_relist(),
            Ok(Event::InitApply(obj)) => idx.relist_item(obj),
            Ok(Event::InitDone) => {
                for server in idx.finish_relist() {
                    inner.enqueue(server);
                }
                synced.send_replace(true);
            }
            Err(e) => tracing::warn!(kind = %K::kind(&Default::default()), "watch: {e}"),
        }
    }
}

/// The uid of the controller owner of `kind`, if any.
fn controller_uid<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    api_version: &str,
    kind: &str,
) -> Option<&'a String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .filter(|r| r.kind == kind && r.api_version == api_version)
        .map(|r| &r.uid)
}

/// A resource's definition: validated without the gateway's environment and against the
/// operator's policy, so that writing an `McpServer` grants nothing the operator did not.
fn desired_from_resource(obj: &McpServer, policy: &PodPolicy) -> Desired {
    let def = ServerDef {
        name: obj.name_any(),
        spec: obj.spec.clone(),
    };
    let checked = def
        .resolve_declared()
        .and_then(|s| policy.admit(&s).map(|_| s));
    match checked {
        Ok(server) if server.spec.image.is_none() && server.spec.remote.is_none() => {
            Desired::Invalid {
                message: "spec.image: the kubernetes backend needs an image".into(),
            }
        }
        Ok(server) => Desired::Valid {
            server: Box::new(server),
            source: Source::Resource {
                uid: obj.uid().unwrap_or_default(),
            },
        },
        Err(e) => Desired::Invalid {
            message: e.to_string(),
        },
    }
}

/// The `McpServer` resources, read untyped.
fn mcpservers_untyped(client: Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<McpServer>(&()))
}

/// An `McpServer` decoded alone from its untyped object; why not, for one this gateway
/// cannot read (a field of a newer CRD, after a rollback of the gateway, say). Its status is
/// read apart: one this gateway cannot read is written again.
fn read_mcpserver(obj: &DynamicObject) -> std::result::Result<McpServer, String> {
    let spec = obj.data.get("spec").unwrap_or(&serde_json::Value::Null);
    let spec = McpServerSpec::deserialize(spec)
        .map_err(|e| format!("spec: this gateway cannot read it: {e}"))?;
    let mut server = McpServer::new(&obj.name_any(), spec);
    server.metadata = obj.metadata.clone();
    server.status = status_of(obj);
    Ok(server)
}

/// What an untyped `McpServer` defines; `Invalid`, saying why, when this gateway cannot read
/// its spec.
fn desired_from_untyped(obj: &DynamicObject, policy: &PodPolicy) -> Desired {
    match read_mcpserver(obj) {
        Ok(server) => desired_from_resource(&server, policy),
        Err(message) => Desired::Invalid { message },
    }
}

/// The status an untyped `McpServer` holds, when this gateway can read it.
fn status_of(obj: &DynamicObject) -> Option<McpServerStatus> {
    obj.data
        .get("status")
        .filter(|s| !s.is_null())
        .and_then(|s| McpServerStatus::deserialize(s).ok())
}

async fn watch_mcpservers(inner: Arc<Inner>) {
    // Each resource is decoded alone: a typed list fails whole on one resource this gateway
    // cannot read, and would hide every other server (none run, none are reported). That one
    // is reported `Failed` on itself instead.
    let api = mcpservers_untyped(inner.client.clone(), &inner.ns);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut relist: Option<Vec<DynamicObject>> = None;
    let is_resource = |d: &Desired| {
        matches!(
            d,
            Desired::Invalid { .. }
                | Desired::Valid {
                    source: Source::Resource { .. },
                    ..
                }
        )
    };
    let upsert = |obj: &DynamicObject| {
        let name = obj.name_any();
        if matches!(
            inner.desired.get(&name).as_deref(),
            Some(Desired::Valid {
                source: Source::Config,
                ..
            })
        ) {
            tracing::warn!(server = %name, "an McpServer resource has the name of a config-file server; the config file wins");
            return;
        }
        let desired = desired_from_untyped(obj, &inner.options.policy);
        inner.desired.insert(name.clone(), desired);
        inner.resources.insert(
            name.clone(),
            ResourceRef {
                uid: obj.uid().unwrap_or_default(),
                generation: obj.metadata.generation,
            },
        );
        // What the resource says now is what the next status write compares with: a
        // restarted gateway rewrites nothing that did not change, nor records it again.
        match status_of(obj) {
            Some(status) => inner.written.insert(name.clone(), status),
            None => inner.written.remove(&name).map(|(_, s)| s),
        };
        inner.enqueue(name);
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(obj)) => upsert(&obj),
            Ok(Event::Delete(obj)) => {
                let name = obj.name_any();
                if inner
                    .desired
                    .remove_if(&name, |_, d| is_resource(d))
                    .is_some()
                {
                    inner.written.remove(&name);
                    inner.resources.remove(&name);
                    inner.sleep_requests.remove(&name);
                    inner.enqueue(name);
                }
            }
            Ok(Event::Init) => relist = Some(Vec::new()),
            Ok(Event::InitApply(obj)) => relist.get_or_insert_with(Vec::new).push(obj),
            Ok(Event::InitDone) => {
                let items = relist.take().unwrap_or_default();
                let names: BTreeSet<String> = items.iter().map(|o| o.name_any()).collect();
                let gone: Vec<String> = inner
                    .desired
                    .iter()
                    .filter(|e| is_resource(e.value()) && !names.contains(e.key()))
                    .map(|e| e.key().clone())
                    .collect();
                for name in gone {
                    inner.desired.remove(&name);
                    inner.written.remove(&name);
                    inner.resources.remove(&name);
                    inner.sleep_requests.remove(&name);
                    inner.enqueue(name);
                }
                for obj in &items {
                    upsert(obj);
                }
            }
            Err(e) => tracing::debug!("watch McpServer: {e}"),
        }
    }
}

impl Runtime for KubeRuntime {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn relay(&self) -> Option<Arc<RelayAccess>> {
        self.relay.clone()
    }

    fn egress(&self, name: &str) -> Option<String> {
        let (server, _) = self.inner.valid(name)?;
        // Nothing runs here for a remote: no policy of ours applies to it.
        if server.spec.remote.is_some() {
            return None;
        }
        let cilium = self.inner.options.policy.cilium;
        Some(match self.inner.options.policy.egress(&server) {
            Some(egress) => format!(
                "enforced by NetworkPolicy {}{}: {}",
                server.object_name(),
                match (egress.has_hosts(), cilium) {
                    (false, _) => "",
                    (true, true) => " and CiliumNetworkPolicy (host names)",
                    (true, false) => {
                        " (host names: their ports to any public address; set GATEHOUSE_ORCHESTRATOR_CILIUM on Cilium)"
                    }
                },
                egress.summary()
            ),
            None => {
                "no NetworkPolicy of its own: only the namespace's policies restrict it".to_owned()
            }
        })
    }

    fn remote_addresses(&self) -> Option<super::remote::AddressCheck> {
        // The gateway's pod connects: the pod policy's addresses, as for a definition.
        let policy = self.inner.options.policy.clone();
        Some(Arc::new(move |ip| policy.remote_address(ip)))
    }

    fn cluster(&self) -> Option<(Client, String)> {
        Some((self.inner.client.clone(), self.inner.ns.clone()))
    }

    fn document(
        &self,
        name: &str,
        key: &'static str,
    ) -> Option<Arc<dyn super::document::DocumentStore>> {
        Some(Arc::new(config_map::ConfigMapDocument::new(
            self.inner.client.clone(),
            &self.inner.ns,
            name,
            key,
        )))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(KubeRuntime::shutdown(self))
    }

    fn apply(&self, server: ResolvedServer) -> BoxFuture<'_, Result<()>> {
        async move {
            self.inner.options.policy.admit(&server)?;
            if server.spec.image.is_none() && server.spec.remote.is_none() {
                return Err(OrchestratorError::Unsupported {
                    server: server.name.clone(),
                    backend: "kubernetes",
                    what: "an image",
                });
            }
            let name = server.name.clone();
            self.inner.removed.remove(&name);
            self.inner.desired.insert(
                name.clone(),
                Desired::Valid {
                    server: Box::new(server),
                    source: Source::Config,
                },
            );
            self.inner.refresh_status(&name, None);
            self.inner.enqueue(name);
            Ok(())
        }
        .boxed()
    }

    fn declare(&self, def: ServerDef) -> BoxFuture<'_, Result<()>> {
        self.declare_as(def, false).boxed()
    }

    fn declare_new(&self, def: ServerDef) -> BoxFuture<'_, Result<()>> {
        self.declare_as(def, true).boxed()
    }

    fn definition<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<McpServerSpec>> {
        async move {
            // Where resources are ignored, none defines a server.
            if !self.inner.options.watch_mcpservers {
                return None;
            }
            // Untyped, as watched: one whose spec this gateway cannot read is said so.
            let api = mcpservers_untyped(self.inner.client.clone(), &self.inner.ns);
            match api.get_opt(name).await {
                Ok(found) => found.and_then(|o| match read_mcpserver(&o) {
                    Ok(server) => Some(server.spec),
                    Err(e) => {
                        tracing::warn!(server = name, "reading its McpServer: {e}");
                        None
                    }
                }),
                Err(e) => {
                    tracing::warn!(server = name, "reading its McpServer: {e}");
                    None
                }
            }
        }
        .boxed()
    }

    fn sync(&self, servers: Vec<ResolvedServer>) -> BoxFuture<'_, Result<()>> {
        async move {
            for s in &servers {
                self.inner.options.policy.admit(s).map_err(|e| SpecError {
                    field: format!("servers[{}].{}", s.name, e.field),
                    message: e.message,
                })?;
            }
            if let Some(s) = servers
                .iter()
                .find(|s| s.spec.image.is_none() && s.spec.remote.is_none())
            {
                return Err(OrchestratorError::Unsupported {
                    server: s.name.clone(),
                    backend: "kubernetes",
                    what: "an image",
                });
            }
            let keep: BTreeSet<String> = servers.iter().map(|s| s.name.clone()).collect();
            let gone: Vec<String> = self
                .inner
                .desired
                .iter()
                .filter(|e| {
                    matches!(
                        e.value(),
                        Desired::Valid {
                            source: Source::Config,
                            ..
                        }
                    ) && !keep.contains(e.key())
                })
                .map(|e| e.key().clone())
                .collect();
            for name in gone {
                self.inner.desired.remove(&name);
                self.inner.refresh_status(&name, None);
            }
            for server in servers {
                self.apply(server).await?;
            }
            self.inner.config_known.store(true, Ordering::Release);
            self.inner.enqueue_all();
            Ok(())
        }
        .boxed()
    }

    fn wait_ready<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Endpoint>> {
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            // Nothing runs for a remote to wait for. Its stored header values are read, not
            // taken from the watch, which may not have brought a Secret just written.
            if let Some((server, _)) = self.inner.valid(name)
                && server.spec.remote.is_some()
            {
                let endpoint = match self.inner.endpoint(name) {
                    Err(OrchestratorError::NotRunning { .. }) if server.uses_stored_secrets() => {
                        let read = tokio::time::timeout_at(deadline, self.own_values(name))
                            .await
                            .map_err(|_| OrchestratorError::Timeout {
                                server: name.to_owned(),
                                waited: timeout,
                                last: format!("reading {}", values_secret_name(name)),
                            })??;
                        let values = read
                            .filter(|s| for_origin(s, &server.spec))
                            .and_then(|s| s.data);
                        let stored = |key: &str| {
                            let bytes = values.as_ref()?.get(key)?;
                            String::from_utf8(bytes.0.clone()).ok()
                        };
                        super::remote::endpoint(&server, stored)
                            .unwrap_or_else(|| Err(OrchestratorError::NotFound(name.to_owned())))
                    }
                    watched => watched,
                }?;
                // The URL of the endpoint handed out (the definition may have changed since
                // `server` was read).
                if let Endpoint::Remote { url, .. } = &endpoint {
                    self.resolves_outside(name, url, deadline).await?;
                }
                return Ok(endpoint);
            }
            // Through the relay, the leader waits for the server when the relay session
            // opens, and wakes it (after a scale-down in flight, which only it knows of).
            if self
                .inner
                .valid(name)
                .is_some_and(|(s, _)| self.inner.through_relay(&s))
            {
                self.inner.wait_for_relay(name, deadline).await;
                return self.inner.endpoint(name);
            }
            if self.inner.asleep(name) {
                self.inner.wake(name).await?;
            }
            self.inner.wait_ready(name, timeout).await?;
            self.inner.wait_for_relay(name, deadline).await;
            self.inner.endpoint(name)
        }
        .boxed()
    }

    fn endpoint<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Endpoint>> {
        async move { self.inner.endpoint(name) }.boxed()
    }

    fn sleep<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            let inner = &self.inner;
            // The leader scales; the others' use of the server is not seen here, and their
            // next call wakes it.
            if !inner.leading() || inner.asleep(name) {
                return Ok(());
            }
            if inner.valid(name).is_none() {
                return Err(OrchestratorError::NotFound(name.to_string()));
            }
            // From here a call that begins goes through wait_ready, which wakes it; one in
            // flight keeps it up.
            if inner.refresh_usage(name).is_none_or(|u| !u.try_sleep()) {
                return Ok(());
            }
            inner.sleep_requests.insert(name.to_string(), true);
            inner.refresh_status(name, None);
            inner.enqueue(name);
            Ok(())
        }
        .boxed()
    }

    fn usage(&self, name: &str) -> Option<Arc<Usage>> {
        self.inner.usage(name)
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServerStatus>> {
        async move {
            if !self.inner.desired.contains_key(name) {
                return Err(OrchestratorError::NotFound(name.to_string()));
            }
            self.inner.refresh_status(name, None);
            self.inner
                .statuses
                .get(name)
                .map(|s| s.clone())
                .ok_or_else(|| OrchestratorError::NotFound(name.to_string()))
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Vec<(String, ServerStatus)>> {
        async move {
            let names: Vec<String> = self.inner.desired.iter().map(|e| e.key().clone()).collect();
            let mut all: Vec<(String, ServerStatus)> = names
                .into_iter()
                .map(|n| {
                    let st = self
                        .inner
                        .statuses
                        .get(&n)
                        .map(|s| s.clone())
                        .unwrap_or_else(|| ServerStatus::new(Phase::Pending));
                    (n, st)
                })
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        }
        .boxed()
    }

    fn restart<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            if !self.inner.desired.contains_key(name) {
                return Err(OrchestratorError::NotFound(name.to_string()));
            }
            self.inner.not_remote(name, "process to restart")?;
            let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
            let pods = self.inner.own_pods(name);
            self.inner.restarted.insert(
                name.to_string(),
                pods.iter().map(|p| p.name_any()).collect(),
            );
            for pod in pods {
                let pod_name = pod.name_any();
                match api.delete(&pod_name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        return Err(OrchestratorError::kube(format!("delete Pod {pod_name}"), e));
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn logs<'a>(&'a self, name: &'a str, opts: LogOptions) -> BoxFuture<'a, Result<String>> {
        async move {
            if !self.inner.desired.contains_key(name) {
                return Err(OrchestratorError::NotFound(name.to_string()));
            }
            self.inner.not_remote(name, "logs")?;
            let pod =
                self.inner
                    .current_pod_name(name)
                    .ok_or_else(|| OrchestratorError::NoLogs {
                        server: name.to_string(),
                        detail: "no pod".into(),
                    })?;
            let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
            let params = LogParams {
                container: Some(objects::CONTAINER.into()),
                previous: opts.previous,
                // The kubelet keeps megabytes per container, all read into memory here: bound
                // it as the local backend does. The API server counts the bytes from the first
                // line it sends, so a tail is always asked for: the bound keeps the newest.
                tail_lines: Some(
                    opts.tail_lines
                        .and_then(|n| i64::try_from(n).ok())
                        .unwrap_or(DEFAULT_LOG_LINES),
                ),
                limit_bytes: i64::try_from(crate::orchestrator::logbuf::LOG_BYTES).ok(),
                ..LogParams::default()
            };
            match api.logs(&pod, &params).await {
                Ok(text) => Ok(text),
                Err(kube::Error::Api(e)) if e.code == 400 || e.code == 404 => {
                    Err(OrchestratorError::NoLogs {
                        server: name.to_string(),
                        detail: e.message,
                    })
                }
                Err(e) => Err(OrchestratorError::kube(format!("logs of Pod {pod}"), e)),
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            let removed = self.inner.desired.remove(name).map(|(_, d)| d);
            self.inner.removed.insert(name.to_string(), ());
            let from_resource = matches!(
                removed,
                Some(Desired::Valid {
                    source: Source::Resource { .. },
                    ..
                }) | Some(Desired::Invalid { .. })
            );
            let result = if from_resource {
                let api: Api<McpServer> =
                    Api::namespaced(self.inner.client.clone(), &self.inner.ns);
                api.delete(name, &DeleteParams::background())
                    .await
                    .map(|_| ())
            } else {
                let api: Api<Deployment> =
                    Api::namespaced(self.inner.client.clone(), &self.inner.ns);
                api.delete(&object_name(name), &DeleteParams::background())
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(OrchestratorError::kube(format!("remove server {name}"), e)),
            }
            // Its stored secrets go with it (the garbage collector would, after a while).
            self.remove_values(name).await?;
            self.inner.written.remove(name);
            self.inner.resources.remove(name);
            self.inner.sleep_requests.remove(name);
            self.inner.refresh_status(name, None);
            // The leader removes leftovers the garbage collector does not own.
            self.inner.enqueue(name);
            Ok(())
        }
        .boxed()
    }
}

/// A namespaced API object the backend watches and deletes.
trait Namespaced:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType: Default>
    + Clone
    + Debug
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Namespaced for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType: Default>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static
{
}
