//! A fake Kubernetes API server for the orchestrator's tests.
//!
//! It follows the real API's semantics for what the `kubernetes` backend uses, on
//! loopback, over plain HTTP or TLS with a self-signed certificate:
//!
//! - Deployments, Pods, Secrets, ConfigMaps, Services, NetworkPolicies,
//!   CiliumNetworkPolicies, Leases, McpServers and McpRegistryEntries (namespaced):
//!   create (POST), get, list (with `labelSelector`, and `fieldSelector` on the name and
//!   namespace), replace (PUT, with resourceVersion preconditions → 409 Conflict), patch
//!   (server-side apply `application/apply-patch+yaml` — one field manager, so applying
//!   replaces the fields the body sets — and JSON merge patch), delete, the `status`
//!   subresource.
//! - A single resourceVersion counter; writes that change nothing do not bump it.
//! - Watches (`?watch=1&resourceVersion=N`): JSON lines of ADDED/MODIFIED/DELETED from
//!   the retained history, then live; 410 Gone for a version older than the history.
//! - Garbage collection: deleting an object deletes every object whose
//!   ownerReferences name its uid (recursively).
//! - A Deployment controller: one ReplicaSet per template (`NAME-HASH`, controller-owned by
//!   the Deployment, labelled with the template's labels and `pod-template-hash`), the
//!   ReplicaSets of older templates deleted (their pods with them); one Pod per current
//!   ReplicaSet (controller-owned by it), recreated when deleted.
//! - A kubelet ([`kubelet`]): runs each pod's `command + args` as a local process with
//!   the container's env (secretKeyRef resolved from the Secret), reports
//!   Running/Ready, restarts crashed containers through CrashLoopBackOff, keeps
//!   current and previous logs (`pods/log?previous=true`), and serves `pods/attach`
//!   over a websocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`).
//!   Images whose reference contains `unpullable` fail with ErrImagePull →
//!   ImagePullBackOff; `unschedulable` stays Pending/Unschedulable.
//! - Every request is recorded (method, path, query, content type, body) so tests can
//!   assert exactly what the API server was asked.

#![allow(dead_code)]

pub mod kubelet;
pub mod mcp;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A resource kind the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Deployment,
    ReplicaSet,
    Pod,
    Secret,
    ConfigMap,
    NetworkPolicy,
    CiliumNetworkPolicy,
    Service,
    Lease,
    McpServer,
    McpRegistryEntry,
    Event,
}

impl Kind {
    fn from_plural(group_version: &str, plural: &str) -> Option<Kind> {
        Some(match (group_version, plural) {
            ("apps/v1", "deployments") => Kind::Deployment,
            ("apps/v1", "replicasets") => Kind::ReplicaSet,
            ("v1", "pods") => Kind::Pod,
            ("v1", "secrets") => Kind::Secret,
            ("v1", "configmaps") => Kind::ConfigMap,
            ("networking.k8s.io/v1", "networkpolicies") => Kind::NetworkPolicy,
            ("cilium.io/v2", "ciliumnetworkpolicies") => Kind::CiliumNetworkPolicy,
            ("v1", "services") => Kind::Service,
            ("coordination.k8s.io/v1", "leases") => Kind::Lease,
            ("gatehouse.dev/v1alpha1", "mcpservers") => Kind::McpServer,
            ("gatehouse.dev/v1alpha1", "mcpregistryentries") => Kind::McpRegistryEntry,
            ("events.k8s.io/v1", "events") => Kind::Event,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Kind::Service => "Service",
            Kind::Lease => "Lease",
            Kind::McpServer => "McpServer",
            Kind::McpRegistryEntry => "McpRegistryEntry",
            Kind::Event => "Event",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Deployment | Kind::ReplicaSet => "apps/v1",
            Kind::Pod | Kind::Secret | Kind::ConfigMap | Kind::Service => "v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::CiliumNetworkPolicy => "cilium.io/v2",
            Kind::McpServer | Kind::McpRegistryEntry => "gatehouse.dev/v1alpha1",
            Kind::Event => "events.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Deployment => "deployments",
            Kind::ReplicaSet => "replicasets",
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::CiliumNetworkPolicy => "ciliumnetworkpolicies",
            Kind::Service => "services",
            Kind::Lease => "leases",
            Kind::McpServer => "mcpservers",
            Kind::McpRegistryEntry => "mcpregistryentries",
            Kind::Event => "events",
        }
    }

    fn has_status(self) -> bool {
        matches!(
            self,
            Kind::Deployment | Kind::ReplicaSet | Kind::Pod | Kind::Service | Kind::McpServer
        )
    }
}

/// A recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Option<Value>,
}

impl Recorded {
    /// `"PATCH /apis/apps/v1/namespaces/ns/deployments/x"`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// Whether this request changed state (not a GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }

    /// What RBAC authorizes for this request: (verb, API group, resource[/subresource],
    /// name). A list or watch selecting one name by field is authorized by that name, as
    /// the real API server does.
    pub fn rbac(&self) -> Option<(String, String, String, Option<String>)> {
        let parts: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        // The Role is namespaced: a request across namespaces is outside it.
        let ["namespaces", _ns, rest @ ..] = rest else {
            return None;
        };
        let (resource, mut name, sub) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(name.to_string()), None),
            [resource, name, sub] => (*resource, Some(name.to_string()), Some(*sub)),
            _ => return None,
        };
        let q = query_map(&self.query);
        let verb = match (self.method.as_str(), &name) {
            ("GET", None) if q.get("watch").is_some_and(|w| w == "1" || w == "true") => "watch",
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => return None,
        };
        if name.is_none() {
            name = q
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="))
                .filter(|n| !n.contains(','))
                .map(str::to_owned);
        }
        let resource = match sub {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        // A create names its object in the body, which RBAC does not see.
        let name = if verb == "create" && sub.is_none() {
            None
        } else {
            name
        };
        Some((verb.to_owned(), group.to_owned(), resource, name))
    }
}

/// The requests a Role's rules (`rules` of a Role object) do not allow, as lines.
pub fn outside_role(requests: &[Recorded], role: &Value) -> Vec<String> {
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    let has = |list: &Value, v: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|x| x == v || x == "*"))
    };
    let mut outside: Vec<String> = requests
        .iter()
        .filter(|r| {
            let Some((verb, group, resource, name)) = r.rbac() else {
                return true;
            };
            !rules.iter().any(|rule| {
                has(&rule["verbs"], &verb)
                    && has(&rule["apiGroups"], &group)
                    && has(&rule["resources"], &resource)
                    && match rule.get("resourceNames").and_then(Value::as_array) {
                        None => true,
                        Some(names) => name
                            .as_deref()
                            .is_some_and(|n| names.iter().any(|x| x == n)),
                    }
            })
        })
        .map(|r| format!("{} ?{}", r.line(), r.query))
        .collect();
    outside.dedup();
    outside
}

/// The Role the deploy/ manifests give the gateway.
pub fn deployed_role() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/role.yaml"),
    )
    .unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// A watch event as sent on the wire.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub rv: u64,
    pub kind: Kind,
    pub namespace: String,
    pub type_: &'static str,
    pub object: Value,
}

type Key = (Kind, String, String);

/// The API server's state.
pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid: u64,
    history: Vec<Arc<WatchEvent>>,
    history_start: u64,
    pub(crate) requests: Vec<Recorded>,
    pub(crate) kubelet: kubelet::Kubelet,
    pod_counter: u64,
}

/// The fake API server.
pub struct FakeKube {
    pub addr: SocketAddr,
    pub tls: bool,
    pub(crate) shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Knobs tests may turn.
    pub(crate) settings: Mutex<Settings>,
}

/// Behaviour a test may change.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Delay before the kubelet restarts a crashed container (first time; doubles).
    pub crash_backoff: Duration,
    /// Subprotocols the attach endpoint accepts, in preference order.
    pub attach_protocols: Vec<&'static str>,
    /// Paths (prefixes) that answer 500, to inject API faults.
    pub fail_paths: Vec<String>,
    /// Paths (prefixes) that never answer, as behind a network partition.
    pub stall_paths: Vec<String>,
    /// Requests of one method to one path (a prefix) that are served (a write is made) but
    /// whose answer is lost, as when the connection breaks after the API server took it.
    pub lost_answers: Vec<(String, String)>,
    /// Requests held before they are served until released ([`FakeKube::hold`]).
    pub holds: Vec<Hold>,
    /// Attach websockets stay open after their pod is deleted, as when the node holding
    /// the pod is lost and the connection is half-open.
    pub attachments_outlive_pods: bool,
    /// Images the fake node "has", by reference, with their entrypoint: what a container of
    /// that image with no `command` runs (its `args` appended), as a container runtime runs
    /// an image's ENTRYPOINT.
    pub images: std::collections::HashMap<String, Vec<String>>,
}

/// Requests of one method to one path (a prefix) that wait before they are served, as when
/// the API server is slow to take one write, until released.
#[derive(Clone, Debug)]
pub struct Hold {
    method: String,
    path: String,
    /// Requests that reached it so far.
    reached: watch::Sender<usize>,
    released: watch::Sender<bool>,
}

impl Hold {
    /// Waits until a request is held.
    pub async fn reached(&self) {
        let mut rx = self.reached.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Serves the held requests, and those that come later.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            crash_backoff: Duration::from_millis(200),
            attach_protocols: vec!["v5.channel.k8s.io", "v4.channel.k8s.io"],
            fail_paths: Vec::new(),
            stall_paths: Vec::new(),
            lost_answers: Vec::new(),
            holds: Vec::new(),
            attachments_outlive_pods: false,
            images: std::collections::HashMap::new(),
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
        let mut store = self.shared.store.lock().unwrap();
        store.kubelet.stop_all();
    }
}

pub(crate) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap()
        .to_string()
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code,
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

/// 409 for a write whose resourceVersion precondition no longer holds, worded as the real
/// API server words it.
fn conflict(kind: Kind, name: &str) -> Response<Body> {
    error(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.plural()
        ),
    )
}

/// A parsed `labelSelector`: `k=v`, `k==v`, `k!=v`, `k` (exists), `!k`.
fn matches_selector(labels: Option<&Value>, selector: &str) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k) == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    })
}

/// A parsed `fieldSelector` over `metadata.name` and `metadata.namespace` (`k=v`, `k==v`,
/// `k!=v`): the fields the real API server supports for every kind.
fn matches_fields(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v, equal) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((k, v)) => (k, v, true),
                None => return false,
            },
        };
        let field = match k {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            _ => return false,
        };
        (field == Some(v)) == equal
    })
}

/// The API server's validation of what the orchestrator writes, where it refuses objects
/// a client could plausibly get wrong: a NetworkPolicy's `ipBlock` whose `except` ranges are
/// not strict subsets of its `cidr` (same family, longer prefix, inside it); an `McpServer`
/// status that breaks the CRD's schema; an `McpRegistryEntry` spec that breaks its CRD's
/// schema; an `events.k8s.io/v1` Event missing what that API requires.
fn validate(kind: Kind, obj: &Value) -> Result<(), String> {
    match kind {
        Kind::NetworkPolicy => validate_network_policy(obj),
        Kind::McpServer => validate_mcpserver_status(&obj["status"]),
        Kind::McpRegistryEntry => validate_registry_entry(&obj["spec"]),
        Kind::Event => validate_event(obj),
        _ => Ok(()),
    }
}

/// deploy/base/crd-mcpregistryentry.yaml: name, version and document strings, the status one
/// of three, the times and labels strings (what the API server's structural schema enforces).
fn validate_registry_entry(spec: &Value) -> Result<(), String> {
    for field in ["name", "version", "document"] {
        if !spec[field].is_string() {
            return Err(format!("spec.{field}: Required value: must be a string"));
        }
    }
    if !matches!(
        spec["status"].as_str(),
        Some("active" | "deprecated" | "deleted")
    ) {
        return Err(format!(
            "spec.status: Unsupported value: {}: supported values: \"active\", \"deprecated\", \"deleted\"",
            spec["status"]
        ));
    }
    for field in ["publishedAt", "updatedAt", "statusChangedAt"] {
        if !spec[field].is_string() {
            return Err(format!("spec.{field}: Required value"));
        }
    }
    if spec.get("statusMessage").is_some_and(|m| !m.is_string()) {
        return Err("spec.statusMessage: Invalid value: must be a string".into());
    }
    if let Some(labels) = spec.get("labels")
        && !labels
            .as_object()
            .is_some_and(|l| l.values().all(Value::is_string))
    {
        return Err("spec.labels: Invalid value: must map strings to strings".into());
    }
    Ok(())
}

fn is_rfc3339(s: &str) -> bool {
    s.parse::<k8s_openapi::jiff::Timestamp>().is_ok()
}

/// The CRD's status schema: conditions are a map keyed by `type`, each with the fields
/// `metav1.Condition` requires; times are `date-time`.
fn validate_mcpserver_status(status: &Value) -> Result<(), String> {
    if let Some(t) = status.get("lastTransitionTime")
        && !t.as_str().is_some_and(is_rfc3339)
    {
        return Err(format!(
            "status.lastTransitionTime: Invalid value: {t}: must be a date-time"
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("status.conditions[{i}]");
        for required in ["type", "status", "reason", "lastTransitionTime"] {
            if !c[required].is_string() {
                return Err(format!("{field}.{required}: Required value"));
            }
        }
        if !seen.insert(c["type"].as_str().unwrap_or_default().to_string()) {
            return Err(format!(
                "{field}: Duplicate value: {{\"type\": {}}}",
                c["type"]
            ));
        }
        if !c["lastTransitionTime"].as_str().is_some_and(is_rfc3339) {
            return Err(format!("{field}.lastTransitionTime: must be a date-time"));
        }
    }
    Ok(())
}

/// What the events.k8s.io/v1 API requires of a new or patched Event.
fn validate_event(ev: &Value) -> Result<(), String> {
    let text = |f: &str| ev[f].as_str().unwrap_or_default();
    if !ev["eventTime"].as_str().is_some_and(is_rfc3339) {
        return Err("eventTime: Required value".into());
    }
    for (f, max) in [
        ("reportingController", 253),
        ("reportingInstance", 128),
        ("action", 128),
        ("reason", 128),
    ] {
        if text(f).is_empty() || text(f).len() > max {
            return Err(format!(
                "{f}: Invalid value: {:?}: must be 1 to {max} characters",
                text(f)
            ));
        }
    }
    if !matches!(text("type"), "Normal" | "Warning") {
        return Err(format!("type: Unsupported value: {:?}", text("type")));
    }
    if text("note").len() > 1024 {
        return Err("note: Too long: may not be more than 1024 bytes".into());
    }
    if ev["regarding"]["name"].as_str().is_none_or(str::is_empty) {
        return Err("regarding.name: Required value".into());
    }
    Ok(())
}

fn validate_network_policy(obj: &Value) -> Result<(), String> {
    let parse = |s: &str| -> Option<(u128, u8, bool)> {
        let (a, l) = s.split_once('/')?;
        let l: u8 = l.parse().ok()?;
        match a.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(a) => Some((u128::from(u32::from(a)) << 96, l, true)),
            // As Go's net package sees it: an IPv4-mapped address is an IPv4 one.
            std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Some((u128::from(u32::from(v4)) << 96, l.saturating_sub(96), true)),
                None => Some((u128::from(a), l, false)),
            },
        }
    };
    let rules = obj["spec"]["egress"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (r, rule) in rules.iter().enumerate() {
        for (p, peer) in rule["to"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let Some(block) = peer.get("ipBlock") else {
                continue;
            };
            let field = format!("spec.egress[{r}].to[{p}].ipBlock");
            let cidr = block["cidr"].as_str().unwrap_or_default();
            let (c, cl, c4) = parse(cidr).ok_or(format!("{field}.cidr: invalid CIDR {cidr:?}"))?;
            for e in block["except"].as_array().cloned().unwrap_or_default() {
                let e = e.as_str().unwrap_or_default();
                let (x, xl, x4) = parse(e).ok_or(format!("{field}.except: invalid CIDR {e:?}"))?;
                let mask = u128::MAX.checked_shl(128 - u32::from(cl)).unwrap_or(0);
                if x4 != c4 || xl <= cl || x & mask != c & mask {
                    return Err(format!(
                        "{field}.except: Invalid value: {e:?}: must be a strict subset of `cidr`"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn query_map(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JSON merge patch (RFC 7386).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, shared_events: &broadcast::Sender<Arc<WatchEvent>>, ev: WatchEvent) {
        let ev = Arc::new(ev);
        self.history.push(ev.clone());
        let _ = shared_events.send(ev);
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind, ns.to_string(), name.to_string()))
    }

    pub fn list(&self, kind: Kind, ns: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates an object: fills uid, resourceVersion, creationTimestamp, generation.
    pub(crate) fn create(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        kind: Kind,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, (u16, &'static str, String)> {
        let name = obj["metadata"]["name"]
            .as_str()
            .map(str::to_string)
            .ok_or((422, "Invalid", "metadata.name: Required value".to_string()))?;
        let key = (kind, ns.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err((
                409,
                "AlreadyExists",
                format!(
                    "{}s \"{name}\" already exists",
                    kind.plural().trim_end_matches('s')
                ),
            ));
        }
        let rv = self.next_rv();
        self.uid += 1;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("namespace".into(), json!(ns));
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012}", self.uid)),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        if kind == Kind::Secret
            && let Some(sd) = obj
                .get("stringData")
                .cloned()
                .and_then(|v| v.as_object().cloned())
        {
            use base64::Engine;
            for (k, v) in sd {
                obj["data"][&k] = json!(
                    base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default())
                );
            }
            obj.as_object_mut().unwrap().remove("stringData");
        }
        self.objects.insert(key, obj.clone());
        self.emit(
            events,
            WatchEvent {
                rv,
                kind,
                namespace: ns.into(),
                type_: "ADDED",
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    /// Replaces an object's content (keeping system metadata); no-op when nothing changed.
    pub(crate) fn update(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        kind: Kind,
        ns: &str,
        name: &str,
        mut next: Value,
    ) -> Value {
        let key = (kind, ns.to_string(), name.to_string());
        let old = self.objects.get(&key).cloned().unwrap_or(Value::Null);
        for f in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
        ] {
            if let Some(v) = old["metadata"].get(f) {
                next["metadata"][f] = v.clone();
            }
        }
        next["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        next["apiVersion"] = json!(kind.api_version());
        next["kind"] = json!(kind.name());
        if next == old {
            return old;
        }
        if next.get("spec") != old.get("spec") {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            next["metadata"]["generation"] = json!(g);
        }
        let rv = self.next_rv();
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, next.clone());
        self.emit(
            events,
            WatchEvent {
                rv,
                kind,
                namespace: ns.into(),
                type_: "MODIFIED",
                object: next.clone(),
            },
        );
        next
    }

    /// Deletes an object and, recursively, everything it owns.
    pub(crate) fn delete(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Option<Value> {
        let key = (kind, ns.to_string(), name.to_string());
        let mut obj = self.objects.remove(&key)?;
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind == Kind::Pod {
            self.kubelet.stop(ns, name);
        }
        self.emit(
            events,
            WatchEvent {
                rv,
                kind,
                namespace: ns.into(),
                type_: "DELETED",
                object: obj.clone(),
            },
        );
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|((_, n, _), v)| {
                n == ns
                    && v["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (k, n, name) in dependents {
            self.delete(events, k, &n, &name);
        }
        Some(obj)
    }
}

impl FakeKube {
    /// Starts on 127.0.0.1 over plain HTTP.
    pub async fn start() -> Self {
        Self::start_inner(false).await
    }

    /// Starts on 127.0.0.1 over TLS with a self-signed certificate.
    pub async fn start_tls() -> Self {
        Self::start_inner(true).await
    }

    async fn start_inner(tls: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                objects: BTreeMap::new(),
                rv: 100,
                uid: 0,
                history: Vec::new(),
                history_start: 100,
                requests: Vec::new(),
                kubelet: kubelet::Kubelet::default(),
                pod_counter: 0,
            }),
            events,
            settings: Mutex::new(Settings::default()),
        });
        let acceptor = tls.then(tls_acceptor);
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let shared = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            let lost = shared.settings.lock().unwrap().lost_answers.iter().any(
                                |(m, p)| {
                                    req.method() == m.as_str()
                                        && req.uri().path().starts_with(p.as_str())
                                },
                            );
                            let resp = handle(shared, req).await;
                            if lost {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(tcp).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(tls), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        FakeKube {
            addr,
            tls,
            shared,
            task,
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// A client for the plain-HTTP fake, with `ns` as its default namespace.
    pub fn client(&self, ns: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().unwrap());
        config.default_namespace = ns.into();
        config.accept_invalid_certs = self.tls;
        kube::Client::try_from(config).unwrap()
    }

    /// Writes a kubeconfig for this server (TLS: `insecure-skip-tls-verify: true`).
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str, token: &str) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let cluster = if self.tls {
            format!("server: {}\n    insecure-skip-tls-verify: true", self.url())
        } else {
            format!("server: {}", self.url())
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    {cluster}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: tester\n  user:\n    token: {token}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Turns a knob.
    pub fn configure(&self, f: impl FnOnce(&mut Settings)) {
        let keep = {
            let mut settings = self.shared.settings.lock().unwrap();
            f(&mut settings);
            settings.attachments_outlive_pods
        };
        self.shared.store.lock().unwrap().kubelet.keep_attachments = keep;
    }

    /// Holds requests of `method` to `path` (a prefix) before they are served, until released.
    pub fn hold(&self, method: &str, path: &str) -> Hold {
        let hold = Hold {
            method: method.to_owned(),
            path: path.to_owned(),
            reached: watch::Sender::new(0),
            released: watch::Sender::new(false),
        };
        self.configure(|s| s.holds.push(hold.clone()));
        hold
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.store.lock().unwrap().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.store.lock().unwrap().requests.clear();
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .get(kind, ns, name)
            .cloned()
    }

    /// Every stored object of a kind in a namespace.
    pub fn list(&self, kind: Kind, ns: &str) -> Vec<Value> {
        self.shared.store.lock().unwrap().list(kind, ns)
    }

    /// Creates an object as another client would (e.g. an `McpServer`).
    pub fn create(&self, kind: Kind, ns: &str, obj: Value) -> Value {
        let mut store = self.shared.store.lock().unwrap();
        let out = store.create(&self.shared.events, kind, ns, obj).unwrap();
        drop(store);
        self.after_write(kind, ns, &out);
        out
    }

    /// Deletes an object as another client would ("behind our back"), with cascade.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let mut store = self.shared.store.lock().unwrap();
        let out = store.delete(&self.shared.events, kind, ns, name);
        drop(store);
        if let Some(o) = &out {
            self.after_write(kind, ns, o);
        }
        out
    }

    /// Asserts that every request made so far is allowed by the Role deploy/ installs.
    pub fn assert_within_deployed_role(&self) {
        let outside = outside_role(&self.requests(), &deployed_role());
        assert!(
            outside.is_empty(),
            "not allowed by deploy/base/role.yaml: {outside:#?}"
        );
    }

    /// Changes an object as another client would (merge patch).
    pub fn patch(&self, kind: Kind, ns: &str, name: &str, patch: Value) -> Value {
        let mut store = self.shared.store.lock().unwrap();
        let mut obj = store.get(kind, ns, name).cloned().unwrap();
        merge_patch(&mut obj, &patch);
        let out = store.update(&self.shared.events, kind, ns, name, obj);
        drop(store);
        self.after_write(kind, ns, &out);
        out
    }

    /// The current pod of a Deployment (through its ReplicaSets), if any.
    pub fn pod_of(&self, ns: &str, deployment: &str) -> Option<Value> {
        let dep = self.get(Kind::Deployment, ns, deployment)?;
        let replicasets: Vec<Value> = self
            .list(Kind::ReplicaSet, ns)
            .into_iter()
            .filter(|rs| controller_uid(rs) == dep["metadata"]["uid"])
            .map(|rs| rs["metadata"]["uid"].clone())
            .collect();
        self.list(Kind::Pod, ns)
            .into_iter()
            .find(|p| replicasets.contains(&controller_uid(p)))
    }

    /// Kills the process of a pod's container (as if it crashed).
    pub fn kill_container(&self, ns: &str, pod: &str) {
        kubelet::kill(&self.shared, ns, pod);
    }

    fn after_write(&self, kind: Kind, ns: &str, obj: &Value) {
        controllers(&self.shared, kind, ns, obj);
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_kube");
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Runs the Deployment controller and the kubelet's pod starts after a write of `obj`.
///
/// A Deployment write syncs that Deployment; a Pod deletion syncs its owner; a Secret
/// write retries pods waiting for configuration. (The real controllers are level-based
/// too; reacting to the one object written keeps the fake linear in the number of servers.)
pub(crate) fn controllers(shared: &Arc<Shared>, kind: Kind, ns: &str, obj: &Value) {
    let mut to_start = Vec::new();
    {
        let mut store = shared.store.lock().unwrap();
        let store = &mut *store;
        let owner_named = |o: &Value, kind: &str| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["kind"] == kind))
                .and_then(|r| r["name"].as_str().map(str::to_string))
        };
        let deployment = match kind {
            Kind::Deployment => obj["metadata"]["name"].as_str().map(str::to_string),
            Kind::ReplicaSet => owner_named(obj, "Deployment"),
            Kind::Pod => owner_named(obj, "ReplicaSet")
                .and_then(|rs| store.get(Kind::ReplicaSet, ns, &rs).cloned())
                .and_then(|rs| owner_named(&rs, "Deployment")),
            _ => None,
        };
        if let Some(dep) = deployment.and_then(|d| store.get(Kind::Deployment, ns, &d).cloned())
            && let Some(name) = sync_deployment(store, &shared.events, ns, &dep)
        {
            to_start.push((ns.to_string(), name));
        }
        if kind == Kind::Secret {
            to_start.extend(store.kubelet.waiting_for_config());
        }
    }
    for (ns, name) in to_start {
        kubelet::start_pod(shared, &ns, &name);
    }
}

/// The uid of an object's controller owner (`Null` when it has none).
pub fn controller_uid(obj: &Value) -> Value {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["controller"] == true))
        .map(|r| r["uid"].clone())
        .unwrap_or(Value::Null)
}

/// One ReplicaSet per Deployment for its current template, with the Deployment's replicas
/// (0 or 1; 1 when unset), and that many pods; returns a pod to start.
fn sync_deployment(
    store: &mut Store,
    events: &broadcast::Sender<Arc<WatchEvent>>,
    ns: &str,
    dep: &Value,
) -> Option<String> {
    let dep_name = dep["metadata"]["name"].as_str().unwrap().to_string();
    let dep_uid = dep["metadata"]["uid"].clone();
    let template = dep["spec"]["template"].clone();
    let hash = format!("{:x}", fxhash(&template.to_string()));
    let rs_name = format!("{dep_name}-{hash}");
    for rs in store.list(Kind::ReplicaSet, ns) {
        if controller_uid(&rs) == dep_uid && rs["metadata"]["name"] != rs_name.as_str() {
            let n = rs["metadata"]["name"].as_str().unwrap().to_string();
            store.delete(events, Kind::ReplicaSet, ns, &n);
        }
    }
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!(hash);
    let replicas = dep["spec"]["replicas"].as_i64().unwrap_or(1).min(1);
    let rs = match store.get(Kind::ReplicaSet, ns, &rs_name).cloned() {
        Some(rs) if rs["spec"]["replicas"].as_i64() != Some(replicas) => {
            let mut next = rs.clone();
            next["spec"]["replicas"] = json!(replicas);
            store.update(events, Kind::ReplicaSet, ns, &rs_name, next)
        }
        Some(rs) => rs,
        None => store
            .create(
                events,
                Kind::ReplicaSet,
                ns,
                json!({
                    "metadata": {
                        "name": rs_name,
                        "labels": labels,
                        "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "Deployment", "name": dep_name,
                            "uid": dep_uid, "controller": true, "blockOwnerDeletion": true,
                        }],
                    },
                    "spec": {"replicas": replicas, "template": template},
                }),
            )
            .ok()?,
    };
    let rs_uid = rs["metadata"]["uid"].clone();
    if replicas == 0 {
        // Scaled to zero: the ReplicaSet controller deletes its pods.
        let pods: Vec<String> = store
            .list(Kind::Pod, ns)
            .iter()
            .filter(|p| controller_uid(p) == rs_uid)
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        for pod in pods {
            store.delete(events, Kind::Pod, ns, &pod);
        }
        return None;
    }
    let current = store
        .list(Kind::Pod, ns)
        .iter()
        .any(|p| controller_uid(p) == rs_uid);
    if current {
        return None;
    }
    store.pod_counter += 1;
    let name = format!("{rs_name}-{:05x}", store.pod_counter);
    let pod = json!({
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": template["metadata"]["annotations"].clone(),
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                "uid": rs_uid, "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": template["spec"].clone(),
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"}
        ]},
    });
    store.create(events, Kind::Pod, ns, pod).ok().map(|_| name)
}

fn fxhash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h & 0xff_ffff_ffff
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let is_upgrade = req.headers().contains_key("upgrade");
    let (parts, body) = req.into_parts();
    let body_bytes = if is_upgrade {
        Bytes::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    let body_json: Option<Value> = serde_json::from_slice(&body_bytes).ok();
    shared.store.lock().unwrap().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        authorization,
        body: body_json.clone(),
    });
    if shared
        .settings
        .lock()
        .unwrap()
        .fail_paths
        .iter()
        .any(|p| path.starts_with(p.as_str()))
    {
        return error(500, "InternalError", "injected fault");
    }
    let stalled = {
        let settings = shared.settings.lock().unwrap();
        settings
            .stall_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    };
    if stalled {
        std::future::pending::<()>().await;
    }
    let held = shared
        .settings
        .lock()
        .unwrap()
        .holds
        .iter()
        .find(|h| h.method == method.as_str() && path.starts_with(&h.path) && !*h.released.borrow())
        .cloned();
    if let Some(hold) = held {
        hold.reached.send_modify(|n| *n += 1);
        let _ = hold.released.subscribe().wait_for(|r| *r).await;
    }
    let q = query_map(&query);

    // /api/v1/namespaces/{ns}/{plural}[/{name}[/{sub}]]
    // /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/{sub}]]
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return error(404, "NotFound", format!("the server could not find {path}")),
    };
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural] => (*ns, *plural, None, None),
        ["namespaces", ns, plural, name] => (*ns, *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (*ns, *plural, Some(*name), Some(*sub)),
        _ => return error(404, "NotFound", format!("the server could not find {path}")),
    };
    let Some(kind) = Kind::from_plural(&gv, plural) else {
        return error(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({gv} {plural})"),
        );
    };
    let ns = ns.to_string();
    let name = name.map(str::to_string);
    let name_for_hint = name.clone().or_else(|| {
        body_json
            .as_ref()
            .and_then(|b| b["metadata"]["name"].as_str().map(str::to_string))
    });
    let deleted: Mutex<Option<Value>> = Mutex::new(None);

    if kind == Kind::Pod && method == Method::GET && sub == Some("log") {
        return kubelet::logs(&shared, &ns, name.as_deref().unwrap(), &q);
    }
    if kind == Kind::Pod && sub == Some("attach") {
        let req = Request::from_parts(parts, Full::new(Bytes::new()));
        return kubelet::attach(shared.clone(), &ns, name.as_deref().unwrap(), &q, req);
    }
    if sub.is_some() && sub != Some("status") {
        return error(404, "NotFound", format!("no subresource {sub:?}"));
    }
    if sub == Some("status") && !kind.has_status() {
        return error(404, "NotFound", "no status subresource");
    }

    let response = match (method.clone(), name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "1" || w == "true") => {
            return watch(&shared, kind, &ns, &q);
        }
        (Method::GET, None) => {
            let store = shared.store.lock().unwrap();
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            let fields = q.get("fieldSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = store
                .list(kind, &ns)
                .into_iter()
                .filter(|o| matches_selector(o["metadata"].get("labels"), &selector))
                .filter(|o| matches_fields(o, &fields))
                .collect();
            json_response(
                200,
                &json!({
                    "kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": store.rv.to_string()},
                    "items": items,
                }),
            )
        }
        (Method::GET, Some(name)) => match shared.store.lock().unwrap().get(kind, &ns, &name) {
            Some(o) => json_response(200, o),
            None => error(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural()),
            ),
        },
        (Method::POST, None) => {
            let Some(obj) = body_json else {
                return error(400, "BadRequest", "body is not JSON");
            };
            let mut store = shared.store.lock().unwrap();
            if let Err(msg) = validate(kind, &obj) {
                return error(422, "Invalid", msg);
            }
            match store.create(&shared.events, kind, &ns, obj) {
                Ok(o) => json_response(201, &o),
                Err((code, reason, msg)) => error(code, reason, msg),
            }
        }
        (Method::PUT, Some(name)) => {
            let Some(obj) = body_json else {
                return error(400, "BadRequest", "body is not JSON");
            };
            let mut store = shared.store.lock().unwrap();
            let Some(old) = store.get(kind, &ns, &name).cloned() else {
                return error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural()),
                );
            };
            let want = obj["metadata"]["resourceVersion"].as_str();
            if want.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
                return conflict(kind, &name);
            }
            let mut next = obj;
            if sub == Some("status") {
                let mut o = old.clone();
                o["status"] = next["status"].clone();
                next = o;
            } else if kind.has_status() {
                next["status"] = old.get("status").cloned().unwrap_or(Value::Null);
                if next["status"].is_null() {
                    next.as_object_mut().unwrap().remove("status");
                }
            }
            if let Err(msg) = validate(kind, &next) {
                return error(422, "Invalid", msg);
            }
            json_response(200, &store.update(&shared.events, kind, &ns, &name, next))
        }
        (Method::PATCH, Some(name)) => {
            let Some(patch) = body_json else {
                return error(400, "BadRequest", "body is not JSON");
            };
            let ct = content_type.unwrap_or_default();
            let mut store = shared.store.lock().unwrap();
            let old = store.get(kind, &ns, &name).cloned();
            if ct.starts_with("application/apply-patch") {
                if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
                    return error(
                        400,
                        "BadRequest",
                        "fieldManager is required for apply requests",
                    );
                }
                if patch["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n != name)
                {
                    return error(
                        400,
                        "BadRequest",
                        "the name of the object does not match the name on the URL",
                    );
                }
                match old {
                    None if sub == Some("status") => error(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", kind.plural()),
                    ),
                    None => {
                        let mut obj = patch;
                        obj.as_object_mut().unwrap().remove("status");
                        obj["metadata"]["name"] = json!(name);
                        if let Err(msg) = validate(kind, &obj) {
                            return error(422, "Invalid", msg);
                        }
                        match store.create(&shared.events, kind, &ns, obj) {
                            Ok(o) => json_response(201, &o),
                            Err((code, reason, msg)) => error(code, reason, msg),
                        }
                    }
                    Some(old) => {
                        // One field manager: the applied fields replace ours; others stay.
                        let mut next = old.clone();
                        if sub == Some("status") {
                            next["status"] = patch["status"].clone();
                        } else {
                            for (k, v) in patch.as_object().unwrap() {
                                if k != "metadata" && k != "status" {
                                    next[k] = v.clone();
                                }
                            }
                            for f in ["labels", "annotations", "ownerReferences"] {
                                match patch["metadata"].get(f) {
                                    Some(v) => next["metadata"][f] = v.clone(),
                                    None => {
                                        next["metadata"].as_object_mut().unwrap().remove(f);
                                    }
                                }
                            }
                        }
                        if let Err(msg) = validate(kind, &next) {
                            return error(422, "Invalid", msg);
                        }
                        json_response(200, &store.update(&shared.events, kind, &ns, &name, next))
                    }
                }
            } else if ct.starts_with("application/merge-patch+json")
                || ct.starts_with("application/strategic-merge-patch+json")
            {
                let Some(mut obj) = old else {
                    return error(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", kind.plural()),
                    );
                };
                // A resourceVersion in the patch is a precondition, as on a replace.
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != obj["metadata"]["resourceVersion"].as_str()
                {
                    return conflict(kind, &name);
                }
                if sub == Some("status") {
                    merge_patch(&mut obj["status"], &patch["status"]);
                } else {
                    let mut p = patch;
                    if let Some(o) = p.as_object_mut() {
                        o.remove("status");
                    }
                    merge_patch(&mut obj, &p);
                }
                if let Err(msg) = validate(kind, &obj) {
                    return error(422, "Invalid", msg);
                }
                json_response(200, &store.update(&shared.events, kind, &ns, &name, obj))
            } else {
                error(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({ct})"
                    ),
                )
            }
        }
        (Method::DELETE, Some(name)) => {
            let mut store = shared.store.lock().unwrap();
            match store.delete(&shared.events, kind, &ns, &name) {
                Some(o) => {
                    *deleted.lock().unwrap() = Some(o.clone());
                    json_response(200, &o)
                }
                None => error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural()),
                ),
            }
        }
        _ => error(
            405,
            "MethodNotAllowed",
            format!("{method} not allowed here"),
        ),
    };
    if method != Method::GET && response.status().is_success() {
        let written = shared
            .store
            .lock()
            .unwrap()
            .get(kind, &ns, name_for_hint.as_deref().unwrap_or_default())
            .cloned();
        match written {
            Some(obj) => controllers(&shared, kind, &ns, &obj),
            // Deleted: the response carried the object.
            None => controllers(
                &shared,
                kind,
                &ns,
                &deleted.lock().unwrap().take().unwrap_or(Value::Null),
            ),
        }
    }
    response
}

fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let fields = q.get("fieldSelector").cloned().unwrap_or_default();
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let ns = ns.to_string();
    let matches = move |ev: &WatchEvent| {
        ev.kind == kind
            && ev.namespace == ns
            && matches_selector(ev.object["metadata"].get("labels"), &selector)
            && matches_fields(&ev.object, &fields)
    };
    let line = |type_: &str, obj: &Value| {
        let mut s = json!({"type": type_, "object": obj}).to_string();
        s.push('\n');
        Bytes::from(s)
    };
    let (backlog, mut live, gone) = {
        let store = shared.store.lock().unwrap();
        let live = shared.events.subscribe();
        match from {
            Some(rv) if rv < store.history_start => (Vec::new(), live, true),
            Some(rv) => (
                store
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && matches(e))
                    .map(|e| line(e.type_, &e.object))
                    .collect(),
                live,
                false,
            ),
            None => (
                store
                    .objects
                    .iter()
                    .filter(|((k, _, _), _)| *k == kind)
                    .map(|(_, v)| v)
                    .filter(|o| {
                        matches(&WatchEvent {
                            rv: 0,
                            kind,
                            namespace: o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                            type_: "ADDED",
                            object: (*o).clone(),
                        })
                    })
                    .map(|o| line("ADDED", o))
                    .collect(),
                live,
                false,
            ),
        }
    };
    let last = from.unwrap_or(0);
    tokio::spawn(async move {
        if gone {
            let _ = tx
                .send(line(
                    "ERROR",
                    &status(410, "Expired", "too old resource version"),
                ))
                .await;
            return;
        }
        for b in backlog {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv > last && matches(&ev) && tx.send(line(ev.type_, &ev.object)).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return, // lagged or closed: the client re-watches
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BoxBody::new(StreamBody::new(stream)))
        .unwrap()
}
