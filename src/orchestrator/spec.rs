//! Server definitions: what an MCP server is, independent of where it runs.
//!
//! [`McpServerSpec`] is both the `spec` of the `McpServer` custom resource
//! (`gatehouse.dev/v1alpha1`) and the body of a server entry in the config file.
//! A [`ServerDef`] adds the name (the resource's `metadata.name` on Kubernetes).
//! [`ServerDef::resolve`] validates a definition and reads secret values, giving the
//! [`ResolvedServer`] that the backends consume.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Prefix of every Kubernetes object name the orchestrator creates for a server.
pub const OBJECT_PREFIX: &str = "mcp-";
/// Longest server name: a DNS-1035 label of 63 characters, less the object prefix.
pub const MAX_NAME_LEN: usize = 63 - OBJECT_PREFIX.len();
/// Where a server finds the secrets it gets as files (`asFile`), each named as its variable.
pub const SECRET_FILES_DIR: &str = "/var/run/gatehouse/secrets";
/// Where stored secrets delivered as files are mounted (Kubernetes).
pub const STORED_SECRET_FILES_DIR: &str = "/var/run/gatehouse/stored-secrets";
/// Default MCP endpoint path of a streamable-http server.
pub const DEFAULT_HTTP_PATH: &str = "/mcp";
/// Names no server may take: `gateway` is the `server` label of the metrics of requests
/// the gateway answers itself (see `mcp::handler`), so a server of that name would be
/// indistinguishable from it.
pub const RESERVED_NAMES: &[&str] = &["gateway"];

/// The desired state of one MCP server (the `McpServer` resource's spec).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[allow(clippy::duplicated_attributes)] // several printcolumn(type_ = "string")
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "McpServer",
    namespaced,
    status = "McpServerStatus",
    shortname = "mcps",
    category = "gatehouse",
    doc = "An MCP server run by the Gatehouse orchestrator: one Deployment (one pod) per server.",
    printcolumn(
        name = "Transport",
        type_ = "string",
        json_path = ".spec.transport.type",
        priority = 1
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct McpServerSpec {
    /// Container image (any OCI reference); required on Kubernetes, ignored by the local backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Program to run: the container's entrypoint override, or the local executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Arguments to the command (or to the image's entrypoint when there is no command).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// How the gateway talks to the server.
    #[serde(default)]
    pub transport: TransportSpec,
    /// Environment variables, plain or secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVarSpec>,
    /// Resource requests and limits (Kubernetes quantities such as `100m`, `128Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// Extra labels on the server's objects and pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Mount the service-account token in the pod: refused unless the operator allows token
    /// mounting and `serviceAccountName` is one of the accounts the operator allows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automount_service_account_token: bool,
    /// Service account of the pod: one the operator allows, never the gateway's own
    /// (default: the operator's default account for servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Who shares a stdio server's process: every session (`shared`, default), each
    /// principal its own (`per-principal`), or each session its own (`per-session`). The
    /// kubernetes backend runs one pod per server and accepts only `shared`.
    #[serde(default, skip_serializing_if = "Sharing::is_shared")]
    pub sharing: Sharing,
    /// Where the server may connect: enforced on Kubernetes by a NetworkPolicy (none given:
    /// the operator's default, or no policy of its own), not enforced by the local backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<super::egress::EgressSpec>,
    /// Stop the server while nobody uses it and wake it on the next call (none given: the
    /// operator's default, off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<super::idle::IdleSpec>,
    /// The registry entry it was installed from (set by an install; an upgrade reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySource>,
    /// A server that runs elsewhere, reached at a URL (a registry entry's `remotes[]`):
    /// nothing is run for it, so no image, command, environment or resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSpec>,
}

/// A server the gateway reaches at a URL and does not run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteSpec {
    /// `streamable-http` (default) or `sse` (the 2024-11-05 HTTP+SSE transport).
    #[serde(rename = "type", default)]
    pub kind: RemoteKind,
    /// The MCP endpoint (`https://mcp.example.com/mcp`), or the SSE stream for `sse`.
    pub url: String,
    /// Headers sent with every request to it (an API key): plain or secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderSpec>,
}

/// The transport a remote server speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteKind {
    /// MCP Streamable HTTP.
    #[default]
    StreamableHttp,
    /// The 2024-11-05 HTTP+SSE transport.
    Sse,
}

/// One header of a remote server: exactly one of `value`, `secretValue`, `storedSecret`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderSpec {
    /// Header name (letters, digits and `-`).
    pub name: String,
    /// Plain value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Secret value given inline (never logged; on Kubernetes kept in the values Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_value: Option<String>,
    /// Secret value kept under the header's name in the server's values Secret (Kubernetes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stored_secret: bool,
}

/// Whether the gateway sets the header `lower` (a lowercase name) on upstream requests itself:
/// those that frame the HTTP exchange, the MCP protocol's (`Mcp-Session-Id`, and the 2026
/// revision's `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*`, mirrored from each call), trace
/// context, and its own (`Gatehouse-Via`). Set by anyone else, they would contend with the
/// gateway's: a configured `Mcp-Session-Id` makes every request look already in a session.
pub(crate) fn is_exchange_header(lower: &str) -> bool {
    const NAMES: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
        "last-event-id",
        "traceparent",
        "tracestate",
    ];
    NAMES.contains(&lower) || lower.starts_with("mcp-") || lower.starts_with("gatehouse-")
}

/// A registry entry a server was installed from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistrySource {
    /// The entry's name (`io.github.modelcontextprotocol/server-everything`).
    pub entry: String,
    /// The entry's version that runs.
    pub version: String,
    /// Which of the entry's packages (its index in `packages`).
    #[serde(default)]
    pub package: usize,
    /// The variables that came from the operator's `registry.runner_env` (an upgrade replaces
    /// them with the operator's current ones, not keeping them as the operator's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runner_env: Vec<String>,
    /// Which of the entry's remotes, when it was installed from one (not a package).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<usize>,
    /// A remote's installer values that stayed plain (its URL's variables, a header chosen
    /// among the document's `choices`; never a secret), which an upgrade fills in again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

/// Who shares one process of a stdio server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// One process for every session (notifications that belong to no call are dropped).
    #[default]
    Shared,
    /// One process per authenticated principal: principals never share a process.
    PerPrincipal,
    /// One process per session, initialized with that client's own capabilities.
    PerSession,
}

impl std::fmt::Display for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sharing::Shared => "shared",
            Sharing::PerPrincipal => "per-principal",
            Sharing::PerSession => "per-session",
        })
    }
}

impl Sharing {
    /// Whether this is the default, `shared`.
    pub fn is_shared(&self) -> bool {
        *self == Sharing::Shared
    }
}

/// Transport kind and, for HTTP, where the server listens.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransportSpec {
    /// `stdio` (default) or `streamable-http`.
    #[serde(rename = "type", default)]
    pub kind: TransportKind,
    /// Port the server listens on (streamable-http only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// MCP endpoint path (streamable-http only; default `/mcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The MCP transport a server speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// Newline-delimited JSON-RPC on stdin/stdout.
    #[default]
    Stdio,
    /// MCP Streamable HTTP.
    StreamableHttp,
}

/// One environment variable: exactly one of `value`, `secretValue`, `secretFromEnv`,
/// `storedSecret`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVarSpec {
    /// Variable name.
    pub name: String,
    /// Plain value (visible in the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Secret value given inline (stored in the server's Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_value: Option<String>,
    /// Secret value read from this variable of the gateway's environment (config file only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_from_env: Option<String>,
    /// Secret value kept under the variable's name in the server's values Secret
    /// (`mcp-<name>.values`, Kubernetes only): where the admin API puts a definition's
    /// `secretValue`s, so that the `McpServer` resource never holds one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stored_secret: bool,
    /// Deliver the secret as a read-only file: the variable holds the file's path, not the
    /// secret (which then shows in no process environment).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub as_file: bool,
}

/// Compute resources, as Kubernetes quantities.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourcesSpec {
    /// Requests, e.g. `cpu: 50m`, `memory: 64Mi`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Limits, e.g. `cpu: "1"`, `memory: 256Mi`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// Observed state written by the orchestrator to the `McpServer` status subresource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpServerStatus {
    /// `Pending`, `Starting`, `Ready`, `BackOff`, `Failed` or `Asleep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why the server is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Restarts of the server's container.
    #[serde(default)]
    pub restarts: i32,
    /// Where the gateway reaches the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `phase` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// `Ready`, `Progressing`, `Degraded` and `Asleep`, in that order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<McpServerCondition>,
}

/// One condition of an `McpServer`, in the shape of Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpServerCondition {
    /// `Ready`, `Progressing`, `Degraded` or `Asleep`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in one CamelCase word (`ImagePullBackOff`, `CrashLoopBackOff`, `Ready`...).
    pub reason: String,
    /// Details for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A named server definition (a config-file entry, or an `McpServer` resource).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerDef {
    /// Server name: a DNS-1035 label of at most [`MAX_NAME_LEN`] characters.
    pub name: String,
    /// What to run and how.
    #[serde(flatten)]
    pub spec: McpServerSpec,
}

/// A definition that failed validation; `field` names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Path of the offending field, e.g. `env[2].secretFromEnv`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Where an environment variable's value lives once resolved.
#[derive(Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// Inlined into the pod spec or the process environment.
    Plain(String),
    /// Stored in the server's Secret under the variable's name.
    Secret(String),
    /// Stored like [`EnvValue::Secret`], delivered as a read-only file whose path is the
    /// variable's value.
    SecretFile(String),
    /// Kept in the server's values Secret (Kubernetes): the gateway never holds the value;
    /// `file`: delivered as a read-only file.
    Stored {
        /// Delivered as a file whose path is the variable's value.
        file: bool,
    },
}

impl std::fmt::Debug for EnvValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvValue::Plain(v) => f.debug_tuple("Plain").field(v).finish(),
            EnvValue::Secret(_) => f.write_str("Secret(<redacted>)"),
            EnvValue::SecretFile(_) => f.write_str("SecretFile(<redacted>)"),
            EnvValue::Stored { file } => write!(f, "Stored {{ file: {file} }}"),
        }
    }
}

/// A validated definition with its secret values read.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedServer {
    /// Server name.
    pub name: String,
    /// The spec as given.
    pub spec: McpServerSpec,
    /// Environment in declaration order.
    pub env: Vec<(String, EnvValue)>,
    /// A remote server's headers, in declaration order (never [`EnvValue::SecretFile`]).
    pub headers: Vec<(String, EnvValue)>,
}

impl ResolvedServer {
    /// Name of the Deployment, Secret and Service on Kubernetes.
    pub fn object_name(&self) -> String {
        object_name(&self.name)
    }

    /// Whether the server speaks stdio.
    pub fn is_stdio(&self) -> bool {
        self.spec.transport.kind == TransportKind::Stdio
    }

    /// Port and path of a streamable-http server.
    pub fn http_port_path(&self) -> Option<(u16, &str)> {
        match self.spec.transport.kind {
            TransportKind::Stdio => None,
            TransportKind::StreamableHttp => Some((
                self.spec.transport.port.unwrap_or(0),
                self.spec
                    .transport
                    .path
                    .as_deref()
                    .unwrap_or(DEFAULT_HTTP_PATH),
            )),
        }
    }

    /// Whether a variable's (or a remote header's) value is kept in the server's values
    /// Secret.
    pub fn uses_stored_secrets(&self) -> bool {
        self.env
            .iter()
            .chain(&self.headers)
            .any(|(_, v)| matches!(v, EnvValue::Stored { .. }))
    }

    /// Secret values, keyed by variable name.
    pub fn secret_data(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|(k, v)| match v {
                EnvValue::Secret(s) | EnvValue::SecretFile(s) => Some((k.clone(), s.clone())),
                EnvValue::Plain(_) | EnvValue::Stored { .. } => None,
            })
            .collect()
    }
}

/// The Secret holding a server's stored secret values (see [`EnvVarSpec::stored_secret`]):
/// `mcp-<name>.values`. A server name has no dot, so this is never another server's object
/// (`mcp-<name>-values` would be the Secret of a server named `<name>-values`).
pub fn values_secret_name(server: &str) -> String {
    format!("{OBJECT_PREFIX}{server}.values")
}

impl McpServerSpec {
    /// This definition with every `secretValue` turned into a `storedSecret`, and the values
    /// taken out (by variable name), to be kept in the server's values Secret.
    pub fn without_secret_values(mut self) -> (McpServerSpec, BTreeMap<String, String>) {
        let mut values = BTreeMap::new();
        for var in &mut self.env {
            if let Some(v) = var.secret_value.take() {
                values.insert(var.name.clone(), v);
                var.stored_secret = true;
            }
        }
        for header in self.remote.iter_mut().flat_map(|r| &mut r.headers) {
            if let Some(v) = header.secret_value.take() {
                values.insert(header_key(&header.name), v);
                header.stored_secret = true;
            }
        }
        (self, values)
    }

    /// The keys of the values this definition keeps in its values Secret.
    pub fn stored_secret_names(&self) -> Vec<String> {
        let env = self
            .env
            .iter()
            .filter(|e| e.stored_secret)
            .map(|e| e.name.clone());
        let headers = self.remote.iter().flat_map(|r| &r.headers);
        env.chain(
            headers
                .filter(|h| h.stored_secret)
                .map(|h| header_key(&h.name)),
        )
        .collect()
    }

    /// What a server's stored secrets are given for: a digest of what runs with them and where
    /// it may send them (image, command, arguments, environment, egress, pod labels, service
    /// account).
    /// Whoever may change a definition but not read Secrets must not hand its stored secrets to
    /// a program of their choosing.
    pub fn workload_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Runs<'a> {
            image: &'a Option<String>,
            command: &'a Option<String>,
            args: &'a [String],
            env: &'a [EnvVarSpec],
            egress: &'a Option<super::egress::EgressSpec>,
            // Pod labels: another NetworkPolicy may let a labelled pod out.
            labels: &'a BTreeMap<String, String>,
            service_account_name: &'a Option<String>,
            automount_service_account_token: bool,
        }
        let runs = serde_json::to_vec(&Runs {
            image: &self.image,
            command: &self.command,
            args: &self.args,
            env: &self.env,
            egress: &self.egress,
            labels: &self.labels,
            service_account_name: &self.service_account_name,
            automount_service_account_token: self.automount_service_account_token,
        })
        .unwrap_or_default();
        Sha256::digest(&runs)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Where a remote's stored header values may be sent: its URL's origin
    /// (`https://host:port`).
    pub fn remote_origin(&self) -> Option<String> {
        let uri: http::Uri = self.remote.as_ref()?.url.parse().ok()?;
        let scheme = uri.scheme_str()?;
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Some(format!(
            "{scheme}://{}:{port}",
            uri.host()?.to_ascii_lowercase()
        ))
    }
}

/// The values Secret's key of a remote's header `name`: a key space of its own, never an
/// environment variable's (no variable's name starts with `header.`).
pub fn header_key(name: &str) -> String {
    format!("header.{name}")
}

/// Kubernetes object name for a server.
pub fn object_name(server: &str) -> String {
    format!("{OBJECT_PREFIX}{server}")
}

/// Label keys the orchestrator sets; user labels may not use them.
pub mod labels {
    /// The server's name.
    pub const SERVER: &str = "gatehouse.dev/server";
    /// Always `gatehouse`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Always `mcp-server`.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// The server's name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// Value of [`MANAGED_BY`].
    pub const MANAGER: &str = "gatehouse";
    /// Label selector matching every object the orchestrator manages.
    pub const SELECTOR: &str = "app.kubernetes.io/managed-by=gatehouse";
}

/// Whether `s` is a DNS-1035 label (lowercase alphanumerics and `-`, starting with a letter).
pub fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Refuses a value with a NUL byte, which no process argument or variable can carry.
fn no_nul(field: &str, value: Option<&str>) -> Result<(), SpecError> {
    match value.and_then(|v| v.find('\0')) {
        Some(at) => Err(SpecError::new(
            field,
            format!("contains a NUL byte (at byte {at}), which a process cannot receive"),
        )),
        None => Ok(()),
    }
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with("header.")
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Whether `s` is a quantity the API server takes for a container's resources (`250m`,
/// `1.5Gi`, `2e3`): a number, not negative, then a binary or decimal suffix or an exponent.
/// Checked here so that a definition the API server would refuse (each Deployment write,
/// after the definition was accepted) is refused naming its field instead.
fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix('+').unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let number_ok = number.chars().any(|c| c.is_ascii_digit()) && number.matches('.').count() <= 1;
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.len() <= 3 && e.chars().all(|c| c.is_ascii_digit())
    };
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(exponent);
    s.len() <= 64 && number_ok && suffix_ok
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && (s.is_empty()
            || (s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
}

fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            // Every part non-empty: `..` and `.x` are no DNS subdomain (the API server would
            // refuse each object carrying the label, after the definition was accepted).
            && p.split('.').all(|part| {
                !part.is_empty()
                    && (is_dns_label(part, 63) || part.chars().all(|c| c.is_ascii_digit()))
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// Checks a remote server's definition (nothing of what runs a server may be given with it)
/// and returns its headers.
fn remote_headers(
    spec: &McpServerSpec,
    remote: &RemoteSpec,
) -> Result<Vec<(String, EnvValue)>, SpecError> {
    let running = [
        ("image", spec.image.is_some()),
        ("command", spec.command.is_some()),
        ("args", !spec.args.is_empty()),
        ("transport", spec.transport != TransportSpec::default()),
        ("env", !spec.env.is_empty()),
        ("resources", spec.resources.is_some()),
        ("sharing", !spec.sharing.is_shared()),
        ("egress", spec.egress.is_some()),
        ("idle", spec.idle.is_some()),
        ("serviceAccountName", spec.service_account_name.is_some()),
        (
            "automountServiceAccountToken",
            spec.automount_service_account_token,
        ),
    ];
    if let Some((field, _)) = running.iter().find(|(_, given)| *given) {
        return Err(SpecError::new(
            *field,
            "a remote server runs elsewhere: nothing is run for it here",
        ));
    }
    remote_url(&remote.url).map_err(|m| SpecError::new("remote.url", m))?;
    if remote.headers.len() > MAX_REMOTE_HEADERS {
        return Err(SpecError::new(
            "remote.headers",
            format!("more than {MAX_REMOTE_HEADERS} headers"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut headers = Vec::with_capacity(remote.headers.len());
    for (i, h) in remote.headers.iter().enumerate() {
        let at = |f: &str| format!("remote.headers[{i}]{f}");
        remote_header_name(&h.name).map_err(|m| SpecError::new(at(".name"), m))?;
        let lower = h.name.to_ascii_lowercase();
        if !seen.insert(lower) {
            return Err(SpecError::new(
                at(".name"),
                format!("{:?} is set twice", h.name),
            ));
        }
        let value = match (&h.value, &h.secret_value, h.stored_secret) {
            (Some(v), None, false) => EnvValue::Plain(v.clone()),
            (None, Some(v), false) => EnvValue::Secret(v.clone()),
            (None, None, true) => EnvValue::Stored { file: false },
            _ => {
                return Err(SpecError::new(
                    at(""),
                    "give exactly one of value, secretValue, storedSecret",
                ));
            }
        };
        if let EnvValue::Plain(v) | EnvValue::Secret(v) = &value
            && let Err(m) = remote_header_value(v)
        {
            return Err(SpecError::new(
                at(if h.value.is_some() {
                    ".value"
                } else {
                    ".secretValue"
                }),
                m,
            ));
        }
        headers.push((h.name.clone(), value));
    }
    let uri: http::Uri = remote
        .url
        .parse()
        .map_err(|_| SpecError::new("remote.url", "is not a URL"))?;
    let host = uri.host().unwrap_or_default();
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        });
    let link_local = |ip: std::net::IpAddr| outside_link_local(ip).is_err();
    // `0251.0376.0251.0376`, `169.254.43518`, `0x7f.1`: addresses the resolver reads, in
    // forms no check here would see as one.
    let number = |l: &str| {
        let hex = l.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
        match hex {
            true => l[2..].chars().all(|c| c.is_ascii_hexdigit()),
            false => !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()),
        }
    };
    // As `inet_aton` reads it: every part a number (decimal, octal or hex).
    let numeric = ip.is_none() && host.trim_end_matches('.').split('.').all(number);
    if numeric {
        return Err(SpecError::new(
            "remote.url",
            "write an address in its usual form (a.b.c.d, or [v6] without a zone)",
        ));
    }
    if ip.is_some_and(link_local) {
        return Err(SpecError::new(
            "remote.url",
            "a link-local or unspecified address (where clouds serve their metadata) is never a remote",
        ));
    }
    let secret = headers
        .iter()
        .any(|(_, v)| !matches!(v, EnvValue::Plain(_)));
    let this_host = host.eq_ignore_ascii_case("localhost") || ip.is_some_and(|ip| ip.is_loopback());
    if secret && uri.scheme_str() == Some("http") && !this_host {
        return Err(SpecError::new(
            "remote.url",
            "its secret headers (declared secret, or values an installer gave) would cross the network in the clear: use https (plain http only to this host)",
        ));
    }
    Ok(headers)
}

/// Refuses the addresses a remote may never be reached at from the gateway's own machine:
/// link-local ones (a cloud's metadata service, `169.254.169.254`, `fe80::/10`) and the
/// unspecified one, whatever name resolves to them. Loopback and private addresses stay
/// the operator's to reach (the local backend's remotes may run beside it).
pub fn outside_link_local(ip: std::net::IpAddr) -> std::result::Result<(), String> {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    let refused = match ip {
        std::net::IpAddr::V4(v4) => {
            // Alibaba Cloud's metadata service is not link-local.
            v4.is_link_local() || v4.is_unspecified() || v4.octets() == [100, 100, 100, 200]
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded_v4 = |hi: u16, lo: u16| {
                let v4 = std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
                v4.is_link_local() || v4.octets() == [100, 100, 100, 200]
            };
            (s[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                // AWS's IPv6 metadata service.
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach IPv4 addresses through them.
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded_v4(s[6], s[7]))
                || (s[0] == 0x2002 && embedded_v4(s[1], s[2]))
        }
    };
    match refused {
        true => Err(format!(
            "{ip} is a link-local or unspecified address (a cloud's metadata service lives there)"
        )),
        false => Ok(()),
    }
}

/// Most headers a remote server's definition sets.
pub const MAX_REMOTE_HEADERS: usize = 32;
/// Longest value of a remote server's header.
pub const MAX_REMOTE_HEADER_VALUE: usize = 8192;

/// Why `url` cannot be a remote server's: it must be an absolute `http` or `https` URL with a
/// host and no credentials in it (they go in headers, which are kept secret). The URL is not
/// echoed: a refused one may carry credentials.
pub fn remote_url(url: &str) -> Result<(), String> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry credentials (give them as a secret header)".into());
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("is not a URL (at most 2048 characters, no spaces)".into());
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must be an http or https URL".into());
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => Ok(()),
        _ => Err("has no host".into()),
    }
}

/// Why `name` cannot be a header a remote server is sent: letters, digits and `-` (it is also
/// the key of the values Secret that keeps a stored one), and none the gateway sends itself.
pub fn remote_header_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!(
            "{name:?} is not a header name (letters, digits and '-', at most 128)"
        ));
    }
    let lower = name.to_ascii_lowercase();
    // A remote definition may not name its host or media types either (an operator's
    // configuration may set `Host`).
    if is_exchange_header(&lower)
        || ["host", "content-type", "accept"].contains(&lower.as_str())
        || ["proxy-", "sec-"].iter().any(|p| lower.starts_with(p))
    {
        return Err(format!("{name} is the gateway's to send"));
    }
    Ok(())
}

/// Why `value` cannot be a header's value (not echoed: it may be a secret).
pub fn remote_header_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_REMOTE_HEADER_VALUE {
        return Err(format!("is longer than {MAX_REMOTE_HEADER_VALUE} bytes"));
    }
    match http::HeaderValue::from_str(value) {
        Ok(_) => Ok(()),
        Err(_) => Err("is not a header value (visible ASCII, spaces and tabs only)".into()),
    }
}

impl ServerDef {
    /// Validates the definition and reads secret values from `getenv`.
    pub fn resolve_with(
        &self,
        getenv: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedServer, SpecError> {
        let spec = &self.spec;
        if !is_dns_label(&self.name, MAX_NAME_LEN) {
            return Err(SpecError::new(
                "name",
                format!(
                    "{:?} must be a lowercase DNS label (a-z, 0-9, '-', starting with a letter) of at most {MAX_NAME_LEN} characters",
                    self.name
                ),
            ));
        }
        if RESERVED_NAMES.contains(&self.name.as_str()) {
            return Err(SpecError::new(
                "name",
                format!(
                    "{:?} is reserved for the gateway's own use (reserved: {})",
                    self.name,
                    RESERVED_NAMES.join(", ")
                ),
            ));
        }
        let headers = match &spec.remote {
            Some(remote) => remote_headers(spec, remote)?,
            None => Vec::new(),
        };
        if spec.image.is_none() && spec.command.is_none() && spec.remote.is_none() {
            return Err(SpecError::new(
                "image",
                "give an image (Kubernetes) or a command (local), or both",
            ));
        }
        if let Some(image) = &spec.image
            && (image.trim().is_empty()
                || image.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(SpecError::new(
                "image",
                format!("{image:?} is not an image reference"),
            ));
        }
        if spec.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(SpecError::new("command", "must not be empty"));
        }
        if let Some(egress) = &spec.egress {
            egress
                .validate()
                .map_err(|e| SpecError::new(e.field, e.message))?;
        }
        if let Some(idle) = &spec.idle {
            idle.after().map_err(|m| SpecError::new("idle.after", m))?;
        }
        // A process cannot receive a NUL byte in its command, arguments or environment:
        // the server would fail to start on every retry.
        no_nul("command", spec.command.as_deref())?;
        for (i, arg) in spec.args.iter().enumerate() {
            no_nul(&format!("args[{i}]"), Some(arg))?;
        }
        match spec.transport.kind {
            TransportKind::Stdio => {
                if spec.transport.port.is_some() || spec.transport.path.is_some() {
                    return Err(SpecError::new(
                        "transport",
                        "port and path apply to streamable-http only",
                    ));
                }
            }
            TransportKind::StreamableHttp => {
                if !spec.sharing.is_shared() {
                    return Err(SpecError::new(
                        "sharing",
                        "applies to stdio servers only (a streamable-http server keeps one MCP session per client session already)",
                    ));
                }
                if spec.transport.port.is_none_or(|p| p == 0) {
                    return Err(SpecError::new(
                        "transport.port",
                        "a streamable-http server needs the port it listens on",
                    ));
                }
                if let Some(path) = &spec.transport.path {
                    if !path.starts_with('/') {
                        return Err(SpecError::new("transport.path", "must start with '/'"));
                    }
                    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(SpecError::new(
                            "transport.path",
                            format!("{path:?} is not a URL path"),
                        ));
                    }
                }
            }
        }
        let mut env = Vec::with_capacity(spec.env.len());
        let mut seen = std::collections::HashSet::new();
        for (i, var) in spec.env.iter().enumerate() {
            let at = |f: &str| format!("env[{i}]{f}");
            if !is_env_name(&var.name) {
                return Err(SpecError::new(
                    at(".name"),
                    format!("{:?} is not a variable name", var.name),
                ));
            }
            if !seen.insert(var.name.as_str()) {
                return Err(SpecError::new(
                    at(".name"),
                    format!("{:?} is set twice", var.name),
                ));
            }
            // A secret's name is a key of the server's Secret, and a file's name: `.`, `..`
            // and a leading `..` are neither.
            if var.value.is_none() && var.name.starts_with('.') {
                return Err(SpecError::new(
                    at(".name"),
                    format!("{:?}: a secret's name must not start with '.'", var.name),
                ));
            }
            no_nul(&at(".value"), var.value.as_deref())?;
            no_nul(&at(".secretValue"), var.secret_value.as_deref())?;
            no_nul(&at(".secretFromEnv"), var.secret_from_env.as_deref())?;
            let value = match (
                &var.value,
                &var.secret_value,
                &var.secret_from_env,
                var.stored_secret,
            ) {
                (Some(v), None, None, false) => EnvValue::Plain(v.clone()),
                (None, Some(v), None, false) => EnvValue::Secret(v.clone()),
                (None, None, None, true) => EnvValue::Stored { file: var.as_file },
                (None, None, Some(from), false) => {
                    EnvValue::Secret(getenv(from).ok_or_else(|| {
                        SpecError::new(
                            at(".secretFromEnv"),
                            format!("the gateway's environment has no {from:?}"),
                        )
                    })?)
                }
                _ => {
                    return Err(SpecError::new(
                        at(""),
                        "give exactly one of value, secretValue, secretFromEnv, storedSecret",
                    ));
                }
            };
            let value = match value {
                EnvValue::Secret(s) if var.as_file => EnvValue::SecretFile(s),
                EnvValue::Plain(_) if var.as_file => {
                    return Err(SpecError::new(
                        at(".asFile"),
                        "only a secret (secretValue, secretFromEnv) is delivered as a file",
                    ));
                }
                v => v,
            };
            env.push((var.name.clone(), value));
        }
        for (k, v) in &spec.labels {
            if !is_label_key(k) {
                return Err(SpecError::new(
                    format!("labels.{k}"),
                    "not a valid label key",
                ));
            }
            if !is_label_value(v) {
                return Err(SpecError::new(
                    format!("labels.{k}"),
                    format!("{v:?} is not a valid label value"),
                ));
            }
            if [
                labels::SERVER,
                labels::MANAGED_BY,
                labels::NAME,
                labels::INSTANCE,
            ]
            .contains(&k.as_str())
            {
                return Err(SpecError::new(
                    format!("labels.{k}"),
                    "reserved for the orchestrator",
                ));
            }
        }
        if let Some(res) = &spec.resources {
            for (field, map) in [("requests", &res.requests), ("limits", &res.limits)] {
                for (k, v) in map {
                    // A resource is named like a label key (`cpu`, `example.com/gpu`).
                    if !is_label_key(k) {
                        return Err(SpecError::new(
                            format!("resources.{field}.{k}"),
                            "not a resource name",
                        ));
                    }
                    if !is_quantity(v) {
                        return Err(SpecError::new(
                            format!("resources.{field}.{k}"),
                            format!("{v:?} is not a quantity"),
                        ));
                    }
                }
            }
        }
        Ok(ResolvedServer {
            name: self.name.clone(),
            spec: spec.clone(),
            env,
            headers,
        })
    }

    /// Validates the definition and reads secret values from the process environment.
    pub fn resolve(&self) -> Result<ResolvedServer, SpecError> {
        self.resolve_with(|k| std::env::var(k).ok())
    }

    /// Validates a definition that does not come from the operator's config file (an
    /// `McpServer` resource, the admin API): it may not read the gateway's environment,
    /// which holds the gateway's own credentials.
    pub fn resolve_declared(&self) -> Result<ResolvedServer, SpecError> {
        if let Some(i) = self
            .spec
            .env
            .iter()
            .position(|e| e.secret_from_env.is_some())
        {
            return Err(SpecError::new(
                format!("env[{i}].secretFromEnv"),
                "only the operator's config file may read the gateway's environment; use secretValue",
            ));
        }
        self.resolve_with(|_| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(yaml: &str) -> ServerDef {
        serde_saphyr::from_str(yaml).expect("yaml")
    }

    #[test]
    fn parses_a_config_entry() {
        let d = def(r#"
name: github
image: ghcr.io/example/github-mcp:1.2
command: github-mcp
args: [--stdio]
env:
  - { name: LOG, value: debug }
  - { name: TOKEN, secretFromEnv: GH_TOKEN }
resources: { limits: { memory: 128Mi } }
labels: { team: tools }
"#);
        let r = d
            .resolve_with(|k| (k == "GH_TOKEN").then(|| "s3cret".to_string()))
            .unwrap();
        assert_eq!(r.object_name(), "mcp-github");
        assert!(r.is_stdio());
        assert_eq!(r.env[0], ("LOG".into(), EnvValue::Plain("debug".into())));
        assert_eq!(
            r.secret_data().get("TOKEN").map(String::as_str),
            Some("s3cret")
        );
        assert!(
            !format!("{r:?}").contains("s3cret"),
            "secrets are redacted in Debug"
        );
    }

    #[test]
    fn rejects_bad_definitions_naming_the_field() {
        let cases = [
            ("name: Bad\ncommand: x", "name"),
            ("name: a\n", "image"),
            (
                "name: a\ncommand: x\ntransport: { type: streamable-http }",
                "transport.port",
            ),
            (
                "name: a\ncommand: x\ntransport: { type: stdio, port: 1 }",
                "transport",
            ),
            ("name: a\ncommand: x\nenv: [{ name: A }]", "env[0]"),
            (
                "name: a\ncommand: x\nenv: [{ name: A, value: x }, { name: A, value: z }]",
                "env[1].name",
            ),
            (
                "name: a\ncommand: x\nenv: [{ name: A, secretFromEnv: NOPE_NOT_SET }]",
                "env[0].secretFromEnv",
            ),
            (
                "name: a\ncommand: x\nlabels: { gatehouse.dev/server: x }",
                "labels.gatehouse.dev/server",
            ),
            (
                "name: a\ncommand: x\nlabels: { team: 'a b' }",
                "labels.team",
            ),
            ("name: gateway\ncommand: x", "name"),
            ("name: a\ncommand: \"x\\0\"", "command"),
            ("name: a\ncommand: x\nargs: [ok, \"b\\0\"]", "args[1]"),
            (
                "name: a\ncommand: x\nenv: [{ name: A, value: \"\\0\" }]",
                "env[0].value",
            ),
            (
                "name: a\ncommand: x\nenv: [{ name: A, secretValue: \"s\\0\" }]",
                "env[0].secretValue",
            ),
            (
                "name: a\ncommand: x\nenv: [{ name: A, secretFromEnv: \"V\\0\" }]",
                "env[0].secretFromEnv",
            ),
            ("name: a\nimage: \"i\\0\"", "image"),
            (
                "name: a\ncommand: x\nenv: [{ name: A, secretValue: s, storedSecret: true }]",
                "env[0]",
            ),
            (
                "name: a\ncommand: x\nenv: [{ name: .A, storedSecret: true }]",
                "env[0].name",
            ),
        ];
        for (yaml, field) in cases {
            let err = def(yaml).resolve_with(|_| None).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }

    #[test]
    fn a_remote_runs_nothing_and_its_url_and_headers_are_checked() {
        let ok = def(
            "name: r\nremote: { url: 'https://mcp.example.com/mcp', headers: [{ name: X-Api-Key, secretValue: k }, { name: X-Team, value: blue }] }",
        );
        let r = ok.resolve_declared().unwrap();
        assert_eq!(
            r.headers[0],
            ("X-Api-Key".into(), EnvValue::Secret("k".into()))
        );
        assert_eq!(
            r.headers[1],
            ("X-Team".into(), EnvValue::Plain("blue".into()))
        );
        // On Kubernetes the secret goes to the values Secret, keyed by the header's name.
        let (spec, values) = ok.spec.clone().without_secret_values();
        assert_eq!(
            values.get("header.X-Api-Key").map(String::as_str),
            Some("k")
        );
        let kept = spec.remote.as_ref().unwrap();
        assert!(kept.headers[0].stored_secret && kept.headers[0].secret_value.is_none());
        assert_eq!(spec.stored_secret_names(), ["header.X-Api-Key"]);
        assert!(
            !format!("{spec:?}").contains("\"k\""),
            "no value left: {spec:?}"
        );

        // A host with a number in it is a host.
        assert!(
            def("name: r\nremote: { url: 'https://api.0x.org/mcp' }")
                .resolve_declared()
                .is_ok()
        );
        assert!(
            def("name: r\nremote: { url: 'https://1password.example/mcp' }")
                .resolve_declared()
                .is_ok()
        );
        let remote = "remote: { url: 'https://x.example/mcp' }";
        let cases = [
            (format!("name: a\nimage: i\n{remote}"), "image"),
            (format!("name: a\ncommand: x\n{remote}"), "command"),
            (format!("name: a\nargs: [x]\n{remote}"), "args"),
            (
                format!("name: a\nenv: [{{ name: A, value: x }}]\n{remote}"),
                "env",
            ),
            (format!("name: a\nidle: {{ after: 5m }}\n{remote}"), "idle"),
            (
                format!("name: a\ntransport: {{ type: streamable-http, port: 1 }}\n{remote}"),
                "transport",
            ),
            ("name: a\nremote: { url: 'ftp://x.example/' }".into(), "remote.url"),
            ("name: a\nremote: { url: '/mcp' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'https://u:p@x.example/' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'https://x.example/ a' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://169.254.169.254/latest' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://[fe80::1]/mcp' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://0251.0376.0251.0376/' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://169.254.43518/' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://0x7f.1:9000/' }".into(), "remote.url"),
            ("name: a\nremote: { url: 'http://2130706433/' }".into(), "remote.url"),
            (
                "name: a\nremote: { url: 'http://mcp.example.com/mcp', headers: [{ name: X-Key, secretValue: k }] }".into(),
                "remote.url",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: Mcp-Method, value: v1 }] }".into(),
                "remote.headers[0].name",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: Host, value: v1 }] }".into(),
                "remote.headers[0].name",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: Mcp-Session-Id, value: v1 }] }".into(),
                "remote.headers[0].name",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: 'X A', value: v1 }] }".into(),
                "remote.headers[0].name",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: X-A, value: v1 }, { name: x-a, value: z }] }".into(),
                "remote.headers[1].name",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: X-A, secretValue: \"a\\r\\nX-B: c\" }] }".into(),
                "remote.headers[0].secretValue",
            ),
            (
                "name: a\nremote: { url: 'https://x.example/', headers: [{ name: X-A }] }".into(),
                "remote.headers[0]",
            ),
        ];
        for (yaml, field) in cases {
            let err = def(&yaml).resolve_with(|_| None).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
            assert!(
                !err.message.contains("X-B"),
                "a secret is not echoed: {err}"
            );
        }
        // A URL carrying credentials is refused without being echoed.
        for url in [
            "https://u:pw@x.example/",
            "ftp://u:pw@x.example/",
            "https://u:pw@x.example/ a",
        ] {
            let err = def(&format!("name: a\nremote: {{ url: '{url}' }}"))
                .resolve_with(|_| None)
                .unwrap_err();
            assert_eq!(err.field, "remote.url", "{url}");
            assert!(!err.message.contains("pw"), "{url}: {err}");
        }
    }

    #[test]
    fn declared_definitions_never_read_the_gateway_environment() {
        let d = def(
            "name: a\ncommand: x\nenv: [{ name: A, value: x }, { name: T, secretFromEnv: HOME }]",
        );
        assert!(d.resolve().is_ok(), "the config file may");
        let err = d.resolve_declared().unwrap_err();
        assert_eq!(err.field, "env[1].secretFromEnv", "{err}");
    }

    #[test]
    fn http_defaults_path() {
        let r = def("name: h\ncommand: x\ntransport: { type: streamable-http, port: 8080 }")
            .resolve_with(|_| None)
            .unwrap();
        assert_eq!(r.http_port_path(), Some((8080, "/mcp")));
    }
}
