//! The gateway's configuration: a raw serde model read from YAML, validated into typed settings.
//!
//! Validation errors name the offending field (`upstreams[1].http.url: ...`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub mod credentials;
pub mod pinning;
pub mod profiles;
pub mod tls;
pub mod traces;

use crate::orchestrator::{ResolvedServer, ServerDef};
use profiles::{Grantees, ProfileConfig};

/// A configuration that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The YAML does not match the model.
    #[error("invalid config: {0}")]
    Syntax(String),
    /// A field has a bad value.
    #[error("invalid config: {field}: {reason}")]
    Field {
        /// Path of the field, e.g. `upstreams[0].name`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Whether a tool's public name `name{separator}tool` splits back at `name`: the first
/// separator in it must be the one after `name` (`a_` with `__` gives `a___t`, read as `a`'s
/// `_t`).
pub fn separable(name: &str, separator: &str) -> bool {
    let mut joined = String::with_capacity(name.len() + separator.len());
    joined.push_str(name);
    joined.push_str(separator);
    joined.find(separator) == Some(name.len())
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Raw configuration as written by the operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listen address, e.g. `127.0.0.1:9000`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Client authentication.
    #[serde(default)]
    pub auth: RawAuth,
    /// MCP endpoint settings.
    #[serde(default)]
    pub mcp: RawMcp,
    /// The MCP servers behind the gateway.
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// Logging.
    #[serde(default)]
    pub log: RawLog,
    /// The async runtime that serves requests.
    #[serde(default)]
    pub runtime: RawRuntime,
    /// Wasm policy plugins and the chains that run them.
    #[serde(default)]
    pub plugins: crate::plugins::PluginsConfig,
    /// MCP servers the gateway runs itself (the orchestrator), then serves like upstreams.
    #[serde(default)]
    pub servers: Vec<ServerDef>,
    /// Settings of the servers the gateway runs.
    #[serde(default)]
    pub orchestrator: RawOrchestrator,
    /// The admin API (`/admin/v1/...`): off unless it has tokens.
    #[serde(default)]
    pub admin: RawAdmin,
    /// The audit trail: off unless set.
    #[serde(default)]
    pub audit: Option<RawAudit>,
    /// Profiles (virtual servers) served at `/mcp/{name}`.
    #[serde(default)]
    pub profiles: Vec<ProfileConfig>,
    /// Tool-definition pinning: off unless set.
    #[serde(default)]
    pub pinning: Option<pinning::PinningConfig>,
    /// TLS on the listener: off unless set.
    #[serde(default)]
    pub tls: Option<tls::ListenerTls>,
    /// How the gateway's own HTTPS requests check servers.
    #[serde(default)]
    pub outbound_tls: tls::OutboundTls,
    /// OpenTelemetry traces: off unless set.
    #[serde(default)]
    pub traces: Option<traces::TracesConfig>,
    /// The private MCP registry (on, in memory, unless set).
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// The private MCP registry's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Serve the registry API (`/v0.1/servers`...).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where the catalog is kept (created with the default entries if missing); absent: in
    /// memory, starting from the default entries.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Image that runs installed npm packages (with `npx`) on Kubernetes.
    #[serde(default = "default_npm_image")]
    pub npm_image: String,
    /// Image that runs installed PyPI packages (with `uvx`) on Kubernetes.
    #[serde(default = "default_pypi_image")]
    pub pypi_image: String,
    /// Environment given to every server installed from an npm or PyPI package, for how
    /// `npx` and `uvx` fetch it: a private index (`UV_INDEX_URL`, `NPM_CONFIG_REGISTRY`), the
    /// CA of a TLS-inspecting proxy (`UV_NATIVE_TLS`, `NODE_EXTRA_CA_CERTS`), a `PATH` that
    /// finds them. Entries may not set these names themselves. Plain values: put no secret here.
    #[serde(default)]
    pub runner_env: BTreeMap<String, String>,
}

fn default_npm_image() -> String {
    "node:22-alpine".into()
}

fn default_pypi_image() -> String {
    "ghcr.io/astral-sh/uv:python3.12-alpine".into()
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            enabled: true,
            file: None,
            npm_image: default_npm_image(),
            pypi_image: default_pypi_image(),
            runner_env: BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Raw audit-trail settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// The file records are appended to; absent: standard output.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Size at which the file is moved aside (default 100 MiB).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Files kept besides the current one (default 5).
    #[serde(default)]
    pub keep: Option<usize>,
    /// A signed checkpoint every this many records (default 1000).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// And at least this often while records come (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub checkpoint_interval: Option<Duration>,
    /// The Ed25519 seed checkpoints are signed with (32 bytes, hex or base64).
    #[serde(default)]
    pub signing_key: Option<RawKeySource>,
    /// Also ship every line to an OpenTelemetry collector as a log record.
    #[serde(default)]
    pub otlp: Option<traces::AuditOtlp>,
}

/// Where a secret key is read from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeySource {
    /// A file holding it.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable holding it.
    #[serde(default)]
    pub env: Option<String>,
}

/// Validated audit-trail settings.
#[derive(Clone)]
pub struct AuditSettings {
    /// The file, or standard output.
    pub file: Option<PathBuf>,
    /// Rotation size.
    pub max_bytes: u64,
    /// Old files kept.
    pub keep: usize,
    /// The checkpoint signing seed.
    pub signing_key: Option<[u8; 32]>,
    /// Records between checkpoints.
    pub checkpoint_every: u64,
    /// Longest time between checkpoints.
    pub checkpoint_interval: Duration,
    /// Where lines are shipped as OTLP logs, if anywhere.
    pub otlp: Option<traces::AuditOtlp>,
}

impl std::fmt::Debug for AuditSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSettings")
            .field("file", &self.file)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .field("signing_key", &self.signing_key.map(|_| "<redacted>"))
            .field("checkpoint_every", &self.checkpoint_every)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("otlp", &self.otlp.as_ref().map(|o| &o.endpoint))
            .finish()
    }
}

fn audit_settings(raw: RawAudit) -> Result<AuditSettings, ConfigError> {
    let max_bytes = raw.max_bytes.unwrap_or(100 * 1024 * 1024);
    if max_bytes < 4096 {
        return Err(field_err("audit.max_bytes", "must be at least 4096"));
    }
    let checkpoint_every = raw.checkpoint_every.unwrap_or(1000);
    if checkpoint_every == 0 {
        return Err(field_err("audit.checkpoint_every", "must be at least 1"));
    }
    let checkpoint_interval = raw.checkpoint_interval.unwrap_or(Duration::from_secs(60));
    if checkpoint_interval < Duration::from_millis(100) {
        return Err(field_err(
            "audit.checkpoint_interval",
            "must be at least 100ms",
        ));
    }
    let signing_key = raw
        .signing_key
        .map(|k| key_from("audit.signing_key", &k.file, &k.env))
        .transpose()?;
    if let Some(o) = &raw.otlp {
        o.validate().map_err(|(field, why)| field_err(field, why))?;
    }
    Ok(AuditSettings {
        otlp: raw.otlp,
        file: raw.file,
        max_bytes,
        keep: match raw.keep {
            None => 5,
            Some(0) => 1,
            // Each rotation renames every file kept, on the writer's thread.
            Some(k @ 1..=MAX_AUDIT_FILES) => k,
            Some(_) => {
                return Err(field_err(
                    "audit.keep",
                    format!("must be at most {MAX_AUDIT_FILES}"),
                ));
            }
        },
        signing_key,
        checkpoint_every,
        checkpoint_interval,
    })
}

/// Files of the audit trail kept at most (`audit.keep`).
const MAX_AUDIT_FILES: usize = 1000;

/// A 32-byte key from a file or an environment variable (64 hex digits or base64).
fn key_from(
    field: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<[u8; 32], ConfigError> {
    let text = match (file, env) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| field_err(format!("{field}.file"), format!("{}: {e}", path.display())))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| field_err(format!("{field}.env"), format!("{var} is not set")))?,
        _ => return Err(field_err(field, "set exactly one of file or env")),
    };
    let source = if file.is_some() { "file" } else { "env" };
    session_key(&format!("{field}.{source}"), &text)
}

/// Raw orchestrator settings (the backend itself is chosen by `GATEHOUSE_ORCHESTRATOR_*`
/// environment variables: Kubernetes when a cluster is configured, else local processes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrchestrator {
    /// Deadline for a server to become ready and finish the MCP handshake.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Deadline of one call.
    #[serde(default, with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// Processes one server may run for single sessions (`sharing: per-session`, and
    /// unauthenticated sessions under `per-principal`).
    #[serde(default)]
    pub max_private_processes: Option<usize>,
    /// Of those, what one principal's sessions may hold (default: a quarter).
    #[serde(default)]
    pub max_private_processes_per_principal: Option<usize>,
    /// Relay sessions the Lease holder serves to the other replicas (one per client session
    /// of theirs per stdio server).
    #[serde(default)]
    pub max_relay_sessions: Option<usize>,
    /// How long a call waits for a server stopped while idle to wake (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub wake_timeout: Option<Duration>,
}

/// Raw admin API settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Bearer tokens accepted by the admin API (separate from client tokens).
    #[serde(default)]
    pub tokens: Vec<RawAdminToken>,
    /// Serve `/metrics` off loopback to anyone (default: only to admin tokens granting
    /// `metrics:read`; the metrics name every server, plugin and their counts).
    #[serde(default)]
    pub public_metrics: bool,
}

/// A raw admin API token: a [`RawToken`] and what it may do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminToken {
    /// Who the token identifies.
    pub principal: String,
    /// The token itself (prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// Environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// What it may do ([`ADMIN_SCOPES`]); none given: everything.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// The admin API's scopes: an area (its reads and changes), or one kind of use of it.
/// `servers:logs` is apart from `servers:read` (what a server prints may hold secrets), and
/// `servers:restart` from `servers:write` (restarting changes no definition).
pub const ADMIN_SCOPES: &[&str] = &[
    "servers",
    "servers:read",
    "servers:write",
    "servers:restart",
    "servers:logs",
    "sessions",
    "sessions:read",
    "audit",
    "audit:read",
    "plugins",
    "plugins:read",
    "registry",
    "registry:read",
    "registry:write",
    "pins",
    "pins:read",
    "pins:write",
    "metrics",
    "metrics:read",
];

/// An admin API token.
#[derive(Debug, Clone)]
pub struct AdminToken {
    /// The token itself.
    pub token: String,
    /// Who it identifies.
    pub principal: Arc<str>,
    /// The [`ADMIN_SCOPES`] it grants; `None`: every one.
    pub scopes: Option<Arc<[Box<str>]>>,
}

/// Raw authentication settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Static bearer tokens and the principal each one authenticates.
    #[serde(default)]
    pub tokens: Vec<RawToken>,
    /// Serve without authentication on a non-loopback address (not recommended).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// OAuth 2.1 resource server: JWT access tokens from trusted issuers.
    #[serde(default)]
    pub oauth: Option<RawOAuth>,
}

/// Raw OAuth resource-server settings (the MCP authorization specification).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// This gateway's MCP endpoint as clients address it (RFC 8707 canonical URI); tokens must
    /// name it in `aud`.
    pub resource: String,
    /// Authorization servers whose tokens are accepted.
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
    /// Scopes every request needs.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Scopes that some methods (and tools, prompts or resources) need besides.
    #[serde(default)]
    pub scope_rules: Vec<RawScopeRule>,
    /// Scopes listed in the protected-resource metadata (default: every scope named above).
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 30s, at most 5m).
    #[serde(default, with = "humantime_serde")]
    pub leeway: Option<Duration>,
    /// The claim naming the principal (default `sub`).
    #[serde(default)]
    pub principal_claim: Option<String>,
    /// The claim listing the caller's groups (default `groups`).
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// A human-readable name for the metadata document.
    #[serde(default)]
    pub resource_name: Option<String>,
    /// Shortest time between two fetches of one issuer's keys (default 10s): a token naming an
    /// unknown key id triggers a fetch at most this often.
    #[serde(default, with = "humantime_serde")]
    pub key_refetch_interval: Option<Duration>,
}

/// One trusted authorization server.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    /// The `iss` its tokens carry (and the URL listed in `authorization_servers`).
    pub issuer: String,
    /// Where its signing keys are published (a JWK set).
    pub jwks_uri: String,
    /// Put before each of its principals (required, and distinct, with several issuers: one
    /// issuer's `sub` must not name another's user).
    #[serde(default)]
    pub principal_prefix: Option<String>,
    /// The scopes its tokens may grant here; others they carry are ignored. Unset: any (an
    /// issuer trusted for some callers only should have one, or its tokens could carry any
    /// scope a profile, a scope rule or `mcp.root_access` asks for).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// Scopes a set of methods (optionally narrowed to target names) needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScopeRule {
    /// JSON-RPC methods (`tools/call`, `resources/read`, ...).
    pub methods: Vec<String>,
    /// Globs over the target's name (a tool or prompt as clients name it, or a resource URI);
    /// empty: any target.
    #[serde(default)]
    pub names: Vec<String>,
    /// The scopes needed.
    pub scopes: Vec<String>,
}

/// Validated OAuth resource-server settings.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    /// The canonical resource URI (the audience tokens must carry).
    pub resource: String,
    /// The protected-resource metadata URL (RFC 9728 §3.1, path inserted).
    pub metadata_url: String,
    /// The path the metadata document is served at on this listener.
    pub metadata_path: String,
    /// Trusted issuers.
    pub issuers: Vec<IssuerSettings>,
    /// Scopes every request needs.
    pub required_scopes: Vec<String>,
    /// Scopes some requests need besides.
    pub scope_rules: Vec<ScopeRule>,
    /// Scopes listed in the metadata document.
    pub scopes_supported: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim naming the principal.
    pub principal_claim: String,
    /// The claim listing groups.
    pub groups_claim: String,
    /// The metadata document's `resource_name`.
    pub resource_name: Option<String>,
    /// Shortest time between two fetches of one issuer's keys.
    pub key_refetch_interval: Duration,
}

/// A validated trusted issuer.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The `iss` value.
    pub issuer: String,
    /// Its JWK set.
    pub jwks_uri: http::Uri,
    /// Put before each of its principals.
    pub principal_prefix: String,
    /// The scopes its tokens may grant; `None`: any.
    pub scopes: Option<Vec<String>>,
}

/// A validated scope rule.
#[derive(Debug, Clone)]
pub struct ScopeRule {
    /// Methods it applies to.
    pub methods: Vec<String>,
    /// Target-name globs; empty: any.
    pub names: Vec<String>,
    /// Scopes needed.
    pub scopes: Vec<String>,
}

/// One bearer token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    /// Who the token identifies.
    pub principal: String,
    /// The token itself (prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// Environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

/// Raw MCP endpoint settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMcp {
    /// Extra allowed `Origin` values (exact match, e.g. `https://app.example.com`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Extra allowed `Host` values when serving on loopback.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Largest accepted request body in bytes.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Most bytes of request bodies read at once, all callers together.
    #[serde(default)]
    pub max_bodies_bytes: Option<usize>,
    /// Most bytes of answers on their way to clients that have not taken them yet, all
    /// callers together.
    #[serde(default)]
    pub max_answers_bytes: Option<usize>,
    /// Time allowed to receive request headers.
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    /// Time allowed to receive a request body.
    #[serde(default, with = "humantime_serde")]
    pub body_timeout: Option<Duration>,
    /// Sessions idle longer than this are ended.
    #[serde(default, with = "humantime_serde")]
    pub session_idle_timeout: Option<Duration>,
    /// Most sessions open at once.
    #[serde(default)]
    pub max_sessions: Option<usize>,
    /// Most sessions one authenticated principal may have open at once.
    #[serde(default)]
    pub max_sessions_per_principal: Option<usize>,
    /// Separator between server name and tool/prompt name.
    #[serde(default)]
    pub name_separator: Option<String>,
    /// `auto` (prefix only with several upstreams), `always` or `never`.
    #[serde(default)]
    pub prefix_names: Option<PrefixNames>,
    /// `refuse` (a resource URI several servers claim is read from none) or `first` (from the
    /// one configured first).
    #[serde(default)]
    pub resource_conflicts: Option<ResourceConflicts>,
    /// Interval of keep-alive comments on SSE streams.
    #[serde(default, with = "humantime_serde")]
    pub sse_keepalive: Option<Duration>,
    /// A stream (a session's GET stream, a listen stream, an HTTP+SSE stream, a call's
    /// streamed answer) whose reader takes nothing this long while messages wait for it is
    /// ended.
    #[serde(default, with = "humantime_serde")]
    pub stalled_stream_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this long.
    #[serde(default, with = "humantime_serde")]
    pub idle_connection_timeout: Option<Duration>,
    /// Most client connections open at once.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Most client connections open at once from one source address.
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
    /// Interval of TCP keep-alive probes and HTTP/2 PINGs, to find half-open peers.
    #[serde(default, with = "humantime_serde")]
    pub keepalive_interval: Option<Duration>,
    /// Serve 2024-11-05 HTTP+SSE clients at `/sse` and `/messages` (default true).
    #[serde(default)]
    pub http_sse: Option<bool>,
    /// Keys that seal session ids (and `requestState`) so that any replica holding them
    /// serves any session; the first seals, all open (rotation).
    #[serde(default)]
    pub session_keys: Vec<RawSessionKey>,
    /// A portable session id is honored this long after its session opened.
    #[serde(default, with = "humantime_serde")]
    pub session_max_age: Option<Duration>,
    /// Who may use `/mcp` itself (every server). Default: everyone when no profiles are
    /// defined, no one when some are (a profile would be walked around otherwise).
    #[serde(default)]
    pub root_access: Option<Grantees>,
}

/// Raw session key: its id and where its 32 bytes are (hex or base64), a file or a variable.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessionKey {
    /// Key id (1 to 255), carried in every token it seals.
    pub id: u8,
    /// A file holding the key (a mounted Secret, say).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable holding the key.
    #[serde(default)]
    pub env: Option<String>,
}

/// Session keys, by id, the sealing one first. Debug output never shows them.
#[derive(Clone, Default)]
pub struct SessionKeys(pub Vec<(u8, [u8; 32])>);

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u8> = self.0.iter().map(|(id, _)| *id).collect();
        write!(f, "SessionKeys(ids {ids:?})")
    }
}

/// Reads a session key: 64 hex digits or the base64 of 32 bytes, surrounding space ignored.
fn session_key(field: &str, text: &str) -> Result<[u8; 32], ConfigError> {
    use base64::Engine;
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex digits"))
            .collect()
    } else {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(())
            .map_err(|_| field_err(field, "must hold 64 hex digits or the base64 of 32 bytes"))?
    };
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| field_err(field, format!("holds {} bytes; a key is 32", bytes.len())))
}

/// When tool and prompt names carry their server's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixNames {
    /// Only when more than one upstream is configured.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never (names must not collide).
    Never,
}

/// What the router does with a resource URI several servers claim (resource URIs carry no
/// server name, and any server may list any URI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceConflicts {
    /// Reads it from none of them: no server may take over another's resources.
    #[default]
    Refuse,
    /// Reads it from the claimant configured first: for servers the operator knows serve the
    /// same resources (one server reached two ways, replicas).
    First,
}

/// Raw upstream definition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Unique name; also the tool name prefix.
    pub name: String,
    /// Run a local process speaking MCP over stdio.
    #[serde(default)]
    pub stdio: Option<RawStdio>,
    /// Reach a server over MCP Streamable HTTP.
    #[serde(default)]
    pub http: Option<RawHttp>,
    /// Reach a server over the 2024-11-05 HTTP+SSE transport (`url` is its SSE stream).
    #[serde(default)]
    pub sse: Option<RawHttp>,
    /// Deadline of one call.
    #[serde(default, with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// Deadline of connecting and initializing.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Which MCP revisions to speak to an HTTP server (default `auto`).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// What it is sent for each caller (HTTP upstreams; the client's token never is).
    #[serde(default)]
    pub credentials: Option<credentials::RawCredentials>,
}

/// Which MCP revisions the gateway speaks to an HTTP upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// 2026-07-28 if the server says it speaks it (`server/discover`), else sessions.
    #[default]
    Auto,
    /// Sessions (`initialize`) only, never probing: a server whose 2026-07-28 support is not
    /// to be trusted.
    Sessions,
}

/// Raw stdio transport.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStdio {
    /// Program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
}

/// Raw Streamable HTTP transport.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Endpoint URL, e.g. `http://127.0.0.1:3001/mcp`.
    pub url: String,
    /// Extra request headers (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Raw logging settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `text` or `json`.
    #[serde(default)]
    pub format: Option<LogFormat>,
    /// A tracing filter such as `info` or `gatehouse=debug`.
    #[serde(default)]
    pub level: Option<String>,
}

/// Raw runtime settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Worker threads serving requests; the CPUs the gateway may use when unset.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Serve each client connection on one thread, from accept to close (one single-threaded
    /// runtime per worker), rather than on the shared work-stealing runtime.
    #[serde(default)]
    pub pinned_connections: Option<bool>,
}

/// Most worker threads a gateway is given: more only add wake-ups between them.
pub const MAX_WORKERS: usize = 256;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer tokens → principal; empty (and no `oauth`) means no authentication.
    pub tokens: Vec<(String, Arc<str>)>,
    /// OAuth resource-server settings.
    pub oauth: Option<OAuthSettings>,
    /// MCP endpoint settings.
    pub mcp: McpSettings,
    /// Upstream servers.
    pub upstreams: Vec<UpstreamConfig>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Worker threads of the runtime; the CPUs the gateway may use when `None`.
    pub workers: Option<usize>,
    /// Each client connection is served on one thread (as many as workers) from accept to
    /// close.
    pub pinned_connections: bool,
    /// Wasm policy plugins.
    pub plugins: crate::plugins::PluginsConfig,
    /// Servers the gateway runs (each is also in `upstreams`, as [`Transport::Orchestrated`]).
    pub servers: Vec<ResolvedServer>,
    /// Settings of orchestrated servers.
    pub orchestrator: OrchestratorSettings,
    /// Admin API bearer tokens; none means the admin API is off.
    pub admin_tokens: Vec<AdminToken>,
    /// Whether `/metrics` is served off loopback without an admin token.
    pub public_metrics: bool,
    /// The audit trail, if on.
    pub audit: Option<AuditSettings>,
    /// Profiles served at `/mcp/{name}`.
    pub profiles: Vec<Arc<ProfileConfig>>,
    /// Tool-definition pinning, if on.
    pub pinning: Option<pinning::PinningConfig>,
    /// TLS on the listener, if on.
    pub tls: Option<tls::ListenerTls>,
    /// How outbound HTTPS checks servers.
    pub outbound_tls: tls::OutboundTls,
    /// Trace export, if on.
    pub traces: Option<traces::TracesConfig>,
    /// The private MCP registry.
    pub registry: RegistryConfig,
}

/// Validated orchestrator settings.
#[derive(Debug, Clone)]
pub struct OrchestratorSettings {
    /// Ready + handshake deadline.
    pub connect_timeout: Duration,
    /// Call deadline.
    pub call_timeout: Duration,
    /// Per-server cap on processes started for single sessions.
    pub max_private_processes: usize,
    /// Of those, what one principal's sessions may hold.
    pub max_private_processes_per_principal: usize,
    /// Cap on relay sessions served to the other replicas.
    pub max_relay_sessions: usize,
    /// How long a call waits for a sleeping (idle) server to wake.
    pub wake_timeout: Duration,
}

impl OrchestratorSettings {
    /// The upstream entry through which the gateway serves an orchestrated server.
    pub fn upstream(&self, name: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_owned(),
            transport: Transport::Orchestrated,
            call_timeout: self.call_timeout,
            connect_timeout: self.connect_timeout,
            protocol: UpstreamProtocol::Auto,
            credentials: None,
        }
    }
}

/// Validated MCP endpoint settings.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// Extra allowed origins.
    pub allowed_origins: Vec<String>,
    /// Extra allowed hosts.
    pub allowed_hosts: Vec<String>,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Bytes of request bodies being read at once, all callers together (a caller's many
    /// slow bodies over HTTP/2 streams would otherwise each hold up to `max_body_bytes`).
    pub max_bodies_bytes: usize,
    /// Bytes of answers written to clients that have not taken them yet, all callers
    /// together (an answer may be 64 MiB, and a client that does not read leaves it here).
    pub max_answers_bytes: usize,
    /// Header read deadline.
    pub header_timeout: Duration,
    /// Body read deadline.
    pub body_timeout: Duration,
    /// Idle session lifetime.
    pub session_idle_timeout: Duration,
    /// Session cap.
    pub max_sessions: usize,
    /// Session cap per authenticated principal (each session may run its own stdio servers).
    pub max_sessions_per_principal: usize,
    /// Name separator.
    pub name_separator: String,
    /// Prefixing rule.
    pub prefix_names: PrefixNames,
    /// What a resource URI several servers claim is read from.
    pub resource_conflicts: ResourceConflicts,
    /// SSE keep-alive interval.
    pub sse_keepalive: Duration,
    /// How long a stream's reader may take nothing while messages wait for it.
    pub stalled_stream_timeout: Duration,
    /// Lifetime of a connection with no request in flight (after its first request).
    pub idle_connection_timeout: Duration,
    /// Global connection cap.
    pub max_connections: usize,
    /// Per-source-address connection cap.
    pub max_connections_per_ip: usize,
    /// TCP keep-alive and HTTP/2 PING interval.
    pub keepalive_interval: Duration,
    /// Whether `/sse` and `/messages` serve 2024-11-05 HTTP+SSE clients.
    pub http_sse: bool,
    /// Keys sealing portable session ids; empty: sessions live on the replica that opened them.
    pub session_keys: SessionKeys,
    /// How long after its opening a portable session id is honored.
    pub session_max_age: Duration,
    /// Who may use `/mcp` itself.
    pub root_access: Grantees,
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Unique name.
    pub name: String,
    /// How to reach it.
    pub transport: Transport,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// Deadline of connect + initialize.
    pub connect_timeout: Duration,
    /// Which revisions to speak to it (HTTP servers only).
    pub protocol: UpstreamProtocol,
    /// What it is sent for each caller.
    pub credentials: Option<credentials::Credentials>,
}

/// How an upstream is reached.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A child process speaking newline-delimited JSON-RPC.
    Stdio {
        /// Program.
        command: String,
        /// Arguments.
        args: Vec<String>,
        /// Extra environment.
        env: BTreeMap<String, String>,
        /// Working directory.
        cwd: Option<PathBuf>,
    },
    /// MCP Streamable HTTP.
    Http {
        /// Endpoint.
        url: http::Uri,
        /// Extra headers.
        headers: http::HeaderMap,
    },
    /// The 2024-11-05 HTTP+SSE transport.
    HttpSse {
        /// The SSE stream's URL.
        url: http::Uri,
        /// Extra headers (on the stream and on every POST).
        headers: http::HeaderMap,
    },
    /// A server the orchestrator runs (from `servers`, or added through the admin API).
    Orchestrated,
}

/// Parses config YAML. An error names where it is, without quoting the lines around it: they
/// may hold a token or a header value.
fn from_yaml_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        // Which setting it is, by the keys that lead to its line (never a value).
        let path = e
            .location()
            .and_then(|at| {
                setting_path(
                    text,
                    at.line().checked_sub(1)? as usize,
                    at.column() as usize,
                )
            })
            .filter(|path| !path.is_empty());
        ConfigError::Syntax(match path {
            Some(path) => format!("{e} (in {})", path.join(".")),
            None => e.to_string(),
        })
    })
}

/// The keys leading to column `column` (from 1) of line `at` of `text`: the block keys above
/// it at lower indentation (lines that are `key:` alone, a comment aside), then the line's
/// last key before that column (its first, if none is). Only what can only be a key is
/// taken: a line with a value (`token: s3cret`) gives its key, never its value.
fn setting_path(text: &str, at: usize, column: usize) -> Option<Vec<&str>> {
    let lines: Vec<&str> = text.lines().collect();
    let line = *lines.get(at)?;
    let indent = |l: &str| l.len() - l.trim_start_matches([' ', '-']).len();
    let mut path = Vec::new();
    let keys = keys_on_line(line);
    let before = keys.iter().rev().find(|(start, _)| *start < column);
    if let Some((_, key)) = before.or(keys.first()) {
        path.push(*key);
    }
    let mut within = indent(line);
    for above in lines[..at].iter().rev() {
        if within == 0 {
            break;
        }
        let trimmed = above.trim_start_matches([' ', '-']);
        let trimmed = trimmed.split(" #").next().unwrap_or_default().trim_end();
        if trimmed.is_empty() || trimmed.starts_with('#') || indent(above) >= within {
            continue;
        }
        within = indent(above);
        if let [(_, key)] = keys_on_line(above)[..]
            && trimmed == format!("{key}:")
        {
            path.push(key);
        }
    }
    path.reverse();
    Some(path)
}

/// The mapping keys written on one line of YAML, with the character column each starts at
/// (from 0): names made of letters, digits, `_`, `-` and `.` in key position (the line's
/// start, after `- `, or after `{` or `,` within a flow mapping) followed by `: ` (or `:` at
/// the end), outside quotes and comments. What follows a key's colon is a value, never taken
/// for a key (`token: ab12: cd34` and `token: ab,cd: x` have one key).
fn keys_on_line(line: &str) -> Vec<(usize, &str)> {
    let mut keys = Vec::new();
    let mut quote = None;
    // Whether a key may start here (the line's start, or after `{` or `,` in a flow mapping).
    let mut at_key = true;
    // Open flow collections, and whether the innermost is a mapping.
    let mut flows: Vec<bool> = Vec::new();
    // The word being read: where it starts, and whether it is in key position.
    let mut word: Option<(usize, usize, bool)> = None;
    for (column, (i, c)) in line.char_indices().enumerate() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => {
                quote = Some(c);
                (word, at_key) = (None, false);
            }
            (None, '#') if word.is_none() => break,
            // A flow collection opens only where a value starts, not inside a word.
            (None, '{' | '[') if word.is_none() => {
                flows.push(c == '{');
                at_key = c == '{';
            }
            (None, '}' | ']') if word.is_none() || !flows.is_empty() => {
                flows.pop();
                (word, at_key) = (None, false);
            }
            (None, ',') if flows.last() == Some(&true) => (word, at_key) = (None, true),
            (None, ' ' | '\t' | '-') if word.is_none() => {}
            (None, c) if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') => {
                if word.is_none() {
                    word = Some((column, i, at_key));
                }
            }
            (None, ':') => {
                let followed = line[i + 1..].chars().next().is_none_or(char::is_whitespace);
                if let (Some((column, s, true)), true) = (word, followed) {
                    keys.push((column, &line[s..i]));
                }
                (word, at_key) = (None, false);
            }
            (None, _) => (word, at_key) = (None, false),
        }
    }
    keys
}

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

impl Config {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_listening(path, None)
    }

    /// Reads and validates a config file, listening on `listen` instead of its `listen` when
    /// given (validated like it: off loopback, authentication is required).
    pub fn load_listening(path: &Path, listen: Option<SocketAddr>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut raw: RawConfig = from_yaml_text(&text)?;
        if let Some(l) = listen {
            raw.listen = Some(l.to_string());
        }
        raw.validate()
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = from_yaml_text(text)?;
        raw.validate()
    }

    /// The built-in default: the example server shipped in this binary, over stdio, on
    /// `listen` (default 127.0.0.1:9000; it has no credentials, so only a loopback address).
    pub fn embedded_default(listen: Option<SocketAddr>) -> Result<Config, ConfigError> {
        if let Some(l) = listen.filter(|l| !l.ip().is_loopback()) {
            return Err(field_err(
                "listen",
                format!(
                    "{l}: the embedded default has no credentials, so it listens on loopback only; give a config file (--config) with auth to listen there"
                ),
            ));
        }
        let exe = std::env::current_exe()
            .map_err(|e| field_err("upstreams[0].stdio.command", e.to_string()))?;
        RawConfig {
            upstreams: vec![RawUpstream {
                name: "example".into(),
                stdio: Some(RawStdio {
                    command: exe.to_string_lossy().into_owned(),
                    args: vec!["example-server".into()],
                    env: BTreeMap::new(),
                    cwd: None,
                }),
                http: None,
                sse: None,
                call_timeout: None,
                connect_timeout: None,
                protocol: UpstreamProtocol::Auto,
                credentials: None,
            }],
            // Tool definitions are pinned in the user's state directory, and a change is
            // recorded (a warning and a metric) rather than blocked: a demo must keep working
            // across versions of its own example server.
            listen: listen.map(|l| l.to_string()),
            pinning: state_dir().map(|state| pinning::PinningConfig {
                file: Some(state.join("pins.json")),
                on_change: pinning::OnChange::Warn,
                ..Default::default()
            }),
            ..RawConfig::default()
        }
        .validate()
    }
}

/// The user's state directory for Gatehouse (`$XDG_STATE_HOME/gatehouse`, else
/// `~/.local/state/gatehouse`), where the embedded default keeps what it must.
pub fn state_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .map(|state| state.join("gatehouse"))
}

impl RawConfig {
    /// Checks every field and builds the typed configuration.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            field_err(
                "listen",
                format!("{listen_text:?} is not an address like 127.0.0.1:9000 ({e})"),
            )
        })?;

        let workers = match self.runtime.workers {
            Some(n @ 1..=MAX_WORKERS) => Some(n),
            Some(n) => {
                return Err(field_err(
                    "runtime.workers",
                    format!(
                        "{n} worker threads: give 1 to {MAX_WORKERS}, or leave it unset for one per CPU"
                    ),
                ));
            }
            None => None,
        };
        let pinned_connections = self.runtime.pinned_connections.unwrap_or(true);
        let tokens = bearer_tokens("auth.tokens", self.auth.tokens)?;
        let public_metrics = self.admin.public_metrics;
        let admin_tokens = admin_tokens(self.admin.tokens)?;
        // A client holding a token the admin API also takes would open it; a principal named
        // in both lists would share the registry filter's decisions and the audit trail's name.
        if let Some((i, AdminToken { principal, .. })) = admin_tokens
            .iter()
            .enumerate()
            .find(|(_, a)| tokens.iter().any(|(c, _)| *c == a.token))
        {
            return Err(field_err(
                format!("admin.tokens[{i}].token"),
                format!(
                    "{principal:?}'s token is also a client token in auth.tokens: a client would open the admin API"
                ),
            ));
        }
        let certificate_names: Vec<&str> = self
            .tls
            .iter()
            .flat_map(|t| t.client_auth.iter())
            .flat_map(|c| c.principals.iter())
            .map(|p| p.principal.as_str())
            .collect();
        if let Some((i, AdminToken { principal, .. })) =
            admin_tokens.iter().enumerate().find(|(_, a)| {
                tokens.iter().any(|(_, c)| *c == a.principal)
                    || certificate_names.contains(&&*a.principal)
            })
        {
            return Err(field_err(
                format!("admin.tokens[{i}].principal"),
                format!(
                    "{principal:?} is also a client principal (auth.tokens or tls.client_auth.principals): name admins and clients apart (they share the registry filter's decisions and the audit trail's names)"
                ),
            ));
        }
        let oauth = self.auth.oauth.map(oauth_settings).transpose()?;
        tls::validate(self.tls.as_ref(), &self.outbound_tls)
            .map_err(|(field, reason)| field_err(field, reason))?;
        let certificate_principals = self
            .tls
            .as_ref()
            .and_then(|t| t.client_auth.as_ref())
            .is_some_and(|c| !c.principals.is_empty());
        if let Some((i, p)) = self
            .tls
            .iter()
            .flat_map(|t| t.client_auth.iter())
            .flat_map(|c| c.principals.iter())
            .enumerate()
            .find(|(_, p)| tokens.iter().any(|(_, t)| **t == *p.principal))
        {
            return Err(field_err(
                format!("tls.client_auth.principals[{i}].principal"),
                format!(
                    "{:?} is also a static token's principal: one name, one credential",
                    p.principal
                ),
            ));
        }
        if tokens.is_empty()
            && oauth.is_none()
            && !certificate_principals
            && !listen.ip().is_loopback()
            && !self.auth.allow_anonymous
        {
            return Err(field_err(
                "auth.tokens",
                format!(
                    "required when listen ({listen}) is not a loopback address (or set auth.allow_anonymous: true)"
                ),
            ));
        }

        let m = self.mcp;
        let name_separator = m.name_separator.unwrap_or_else(|| "__".into());
        if name_separator.is_empty() {
            return Err(field_err("mcp.name_separator", "must not be empty"));
        }
        // Servers the orchestrator runs are named by DNS labels: a separator made of their
        // characters could appear in one (`my-srv` with `-`), and split a tool's name wrongly.
        if name_separator
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(field_err(
                "mcp.name_separator",
                format!(
                    "{name_separator:?} must contain a character other than a-z, 0-9 and '-' (server names are made of those)"
                ),
            ));
        }
        let max_body_bytes = m.max_body_bytes.unwrap_or(4 * 1024 * 1024);
        if max_body_bytes < 1024 {
            return Err(field_err("mcp.max_body_bytes", "must be at least 1024"));
        }
        let max_bodies_bytes = m.max_bodies_bytes.unwrap_or(256 * 1024 * 1024);
        if max_bodies_bytes < max_body_bytes || max_bodies_bytes > u32::MAX as usize {
            return Err(field_err(
                "mcp.max_bodies_bytes",
                format!("must be between mcp.max_body_bytes ({max_body_bytes}) and 4 GiB"),
            ));
        }
        let max_answers_bytes = m.max_answers_bytes.unwrap_or(1 << 30);
        if !(1 << 20..=1 << 40).contains(&max_answers_bytes) {
            return Err(field_err(
                "mcp.max_answers_bytes",
                "must be between 1 MiB and 1 TiB",
            ));
        }
        for (i, o) in m.allowed_origins.iter().enumerate() {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(field_err(
                    format!("mcp.allowed_origins[{i}]"),
                    format!("{o:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        let max_connections = at_least_one("mcp.max_connections", m.max_connections, 10_000)?;
        let max_connections_per_ip = at_least_one(
            "mcp.max_connections_per_ip",
            m.max_connections_per_ip,
            max_connections.min(256),
        )?;
        if max_connections_per_ip > max_connections {
            return Err(field_err(
                "mcp.max_connections_per_ip",
                format!("{max_connections_per_ip} exceeds mcp.max_connections ({max_connections})"),
            ));
        }
        let mcp = McpSettings {
            idle_connection_timeout: positive(
                "mcp.idle_connection_timeout",
                m.idle_connection_timeout,
                Duration::from_secs(60),
            )?,
            max_connections,
            max_connections_per_ip,
            keepalive_interval: positive(
                "mcp.keepalive_interval",
                m.keepalive_interval,
                Duration::from_secs(30),
            )?,
            allowed_origins: m.allowed_origins,
            allowed_hosts: m
                .allowed_hosts
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            max_body_bytes,
            max_bodies_bytes,
            max_answers_bytes,
            header_timeout: positive(
                "mcp.header_timeout",
                m.header_timeout,
                Duration::from_secs(10),
            )?,
            body_timeout: positive("mcp.body_timeout", m.body_timeout, Duration::from_secs(30))?,
            session_idle_timeout: positive(
                "mcp.session_idle_timeout",
                m.session_idle_timeout,
                Duration::from_secs(30 * 60),
            )?,
            max_sessions: m.max_sessions.unwrap_or(100_000).max(1),
            max_sessions_per_principal: match m.max_sessions_per_principal {
                Some(0) => {
                    return Err(field_err(
                        "mcp.max_sessions_per_principal",
                        "must be at least 1",
                    ));
                }
                n => n.unwrap_or(1_000),
            },
            prefix_names: m.prefix_names.unwrap_or_default(),
            resource_conflicts: m.resource_conflicts.unwrap_or_default(),
            sse_keepalive: positive(
                "mcp.sse_keepalive",
                m.sse_keepalive,
                Duration::from_secs(25),
            )?,
            stalled_stream_timeout: positive(
                "mcp.stalled_stream_timeout",
                m.stalled_stream_timeout,
                crate::body::STALLED_READER,
            )?,
            name_separator,
            http_sse: m.http_sse.unwrap_or(true),
            session_keys: {
                let mut keys = Vec::with_capacity(m.session_keys.len());
                for (i, k) in m.session_keys.iter().enumerate() {
                    let field = format!("mcp.session_keys[{i}]");
                    if k.id == 0 {
                        return Err(field_err(format!("{field}.id"), "must be 1 to 255"));
                    }
                    if keys.iter().any(|(id, _)| *id == k.id) {
                        return Err(field_err(
                            format!("{field}.id"),
                            format!("{} is used by another key", k.id),
                        ));
                    }
                    let key = key_from(&field, &k.file, &k.env)?;
                    // One key under two ids would open a sealed id with its id byte changed:
                    // another spelling of the same session, which the record of deleted
                    // sessions would not know.
                    if let Some((other, _)) = keys.iter().find(|(_, known)| *known == key) {
                        return Err(field_err(
                            field,
                            format!(
                                "holds the same key as the one with id {other}: give each id a key of its own"
                            ),
                        ));
                    }
                    keys.push((k.id, key));
                }
                SessionKeys(keys)
            },
            session_max_age: positive(
                "mcp.session_max_age",
                m.session_max_age,
                Duration::from_secs(24 * 60 * 60),
            )?,
            root_access: m.root_access.clone().unwrap_or(Grantees {
                everyone: self.profiles.is_empty(),
                ..Default::default()
            }),
        };

        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let field = format!("upstreams[{i}]");
            let valid_name = !u.name.is_empty()
                && u.name.len() <= 64
                && u.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name {
                return Err(field_err(
                    format!("{field}.name"),
                    format!("{:?} must be 1-64 characters of [A-Za-z0-9_-]", u.name),
                ));
            }
            if !separable(&u.name, &mcp.name_separator) {
                return Err(field_err(
                    format!("{field}.name"),
                    format!(
                        "{:?} contains the name separator {:?}, or ends with its start (a tool's name could not be told from another server's)",
                        u.name, mcp.name_separator
                    ),
                ));
            }
            if upstreams.iter().any(|o: &UpstreamConfig| o.name == u.name) {
                return Err(field_err(
                    format!("{field}.name"),
                    format!("duplicate name {:?}", u.name),
                ));
            }
            let transport = match (u.stdio, u.http, u.sse) {
                (Some(s), None, None) => {
                    if s.command.trim().is_empty() {
                        return Err(field_err(
                            format!("{field}.stdio.command"),
                            "must not be empty",
                        ));
                    }
                    Transport::Stdio {
                        command: s.command,
                        args: s.args,
                        env: s.env,
                        cwd: s.cwd,
                    }
                }
                (None, Some(h), None) => {
                    let (url, headers) = http_endpoint(&format!("{field}.http"), h)?;
                    Transport::Http { url, headers }
                }
                (None, None, Some(h)) => {
                    let (url, headers) = http_endpoint(&format!("{field}.sse"), h)?;
                    Transport::HttpSse { url, headers }
                }
                _ => return Err(field_err(field, "set exactly one of stdio, http or sse")),
            };
            if u.protocol != UpstreamProtocol::Auto && !matches!(transport, Transport::Http { .. })
            {
                return Err(field_err(
                    format!("{field}.protocol"),
                    "applies to http upstreams only (others speak sessions)",
                ));
            }
            upstreams.push(UpstreamConfig {
                call_timeout: positive(
                    &format!("{field}.call_timeout"),
                    u.call_timeout,
                    Duration::from_secs(60),
                )?,
                connect_timeout: positive(
                    &format!("{field}.connect_timeout"),
                    u.connect_timeout,
                    Duration::from_secs(30),
                )?,
                credentials: match u.credentials {
                    None => None,
                    Some(_) if matches!(transport, Transport::Stdio { .. }) => {
                        return Err(field_err(
                            format!("{field}.credentials"),
                            "apply to http and sse upstreams (a process gets its env)",
                        ));
                    }
                    // Exchanged tokens expire: they go per request, which only Streamable HTTP
                    // requests carry.
                    Some(raw)
                        if raw.token_exchange.is_some()
                            && !matches!(transport, Transport::Http { .. }) =>
                    {
                        return Err(field_err(
                            format!("{field}.credentials.token_exchange"),
                            "applies to http (Streamable HTTP) upstreams",
                        ));
                    }
                    // Per-caller secrets would cross the network in the clear.
                    Some(raw)
                        if !raw.allow_plain_http
                            && transport_url(&transport).is_some_and(|u| !secure_url_ok(u)) =>
                    {
                        return Err(field_err(
                            format!("{field}.credentials"),
                            "callers' credentials would cross the network in the clear: use an https:// URL (plain http only to a loopback host), or set allow_plain_http on a network you trust to protect them",
                        ));
                    }
                    Some(raw) => Some(
                        credentials::Credentials::validate(&format!("{field}.credentials"), raw)
                            .map_err(|(f, r)| field_err(f, r))?,
                    ),
                },
                name: u.name,
                transport,
                protocol: u.protocol,
            });
        }
        let orchestrator = OrchestratorSettings {
            connect_timeout: positive(
                "orchestrator.connect_timeout",
                self.orchestrator.connect_timeout,
                Duration::from_secs(120),
            )?,
            call_timeout: positive(
                "orchestrator.call_timeout",
                self.orchestrator.call_timeout,
                Duration::from_secs(60),
            )?,
            max_private_processes: at_least_one(
                "orchestrator.max_private_processes",
                self.orchestrator.max_private_processes,
                64,
            )?,
            max_private_processes_per_principal: {
                let all = self.orchestrator.max_private_processes.unwrap_or(64).max(1);
                let share = at_least_one(
                    "orchestrator.max_private_processes_per_principal",
                    self.orchestrator.max_private_processes_per_principal,
                    (all / 4).max(1),
                )?;
                if share > all {
                    return Err(field_err(
                        "orchestrator.max_private_processes_per_principal",
                        format!("must be at most orchestrator.max_private_processes ({all})"),
                    ));
                }
                share
            },
            max_relay_sessions: at_least_one(
                "orchestrator.max_relay_sessions",
                self.orchestrator.max_relay_sessions,
                4096,
            )?,
            wake_timeout: positive(
                "orchestrator.wake_timeout",
                self.orchestrator.wake_timeout,
                Duration::from_secs(60),
            )?,
        };
        let mut orchestrator = orchestrator;
        if self.orchestrator.wake_timeout.is_none() {
            orchestrator.wake_timeout = orchestrator.wake_timeout.min(orchestrator.connect_timeout);
        }
        // The wake happens inside the connection's handshake, which connect_timeout bounds.
        if orchestrator.wake_timeout > orchestrator.connect_timeout {
            return Err(field_err(
                "orchestrator.wake_timeout",
                format!(
                    "{} is longer than orchestrator.connect_timeout ({}), which bounds it",
                    humantime::format_duration(orchestrator.wake_timeout),
                    humantime::format_duration(orchestrator.connect_timeout)
                ),
            ));
        }
        let mut servers = Vec::with_capacity(self.servers.len());
        for (i, def) in self.servers.into_iter().enumerate() {
            let field = format!("servers[{i}]");
            let resolved = def
                .resolve()
                .map_err(|e| field_err(format!("{field}.{}", e.field), e.message))?;
            if upstreams
                .iter()
                .any(|o: &UpstreamConfig| o.name == def.name)
            {
                return Err(field_err(
                    format!("{field}.name"),
                    format!(
                        "duplicate name {:?} (names are shared with upstreams)",
                        def.name
                    ),
                ));
            }
            if !separable(&def.name, &mcp.name_separator) {
                return Err(field_err(
                    format!("{field}.name"),
                    format!(
                        "{:?} contains the name separator {:?}, or ends with its start (a tool's name could not be told from another server's)",
                        def.name, mcp.name_separator
                    ),
                ));
            }
            upstreams.push(orchestrator.upstream(&def.name));
            servers.push(resolved);
        }
        // With the admin API on, servers may all come later.
        if upstreams.is_empty() && admin_tokens.is_empty() {
            return Err(field_err(
                "upstreams",
                "at least one upstream or server is required (or admin.tokens, to add servers later)",
            ));
        }

        self.plugins
            .validate()
            .map_err(|e| field_err("plugins", e.to_string()))?;

        profiles::validate(&self.profiles).map_err(|e| field_err(e.field, e.reason))?;
        if let Some(t) = &self.traces {
            t.validate().map_err(|(field, why)| field_err(field, why))?;
        }
        if let Some(p) = &self.pinning {
            p.validate().map_err(|(field, why)| field_err(field, why))?;
        }
        for (name, value) in &self.registry.runner_env {
            let field = || format!("registry.runner_env.{name}");
            let plain = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.len() <= 128;
            if !plain {
                return Err(field_err(
                    field(),
                    "not a variable name (letters, digits and _, at most 128)",
                ));
            }
            // Where a runner keeps what it fetched and its settings: each server's own, under
            // its own HOME (shared, they would mix servers' caches and credentials).
            let upper = name.to_ascii_uppercase();
            if upper == "HOME"
                || upper.starts_with("XDG_")
                || ["UV_CACHE_DIR", "UV_TOOL_DIR", "UV_TOOL_BIN_DIR"].contains(&upper.as_str())
                || [
                    "NPM_CONFIG_CACHE",
                    "NPM_CONFIG_PREFIX",
                    "NPM_CONFIG_USERCONFIG",
                ]
                .contains(&upper.as_str())
            {
                return Err(field_err(
                    field(),
                    "each server keeps its own (a shared one would mix their caches and credentials)",
                ));
            }
            if value.contains('\0') {
                return Err(field_err(field(), "must not contain a NUL byte"));
            }
        }

        Ok(Config {
            profiles: self.profiles.into_iter().map(Arc::new).collect(),
            pinning: self.pinning,
            tls: self.tls,
            outbound_tls: self.outbound_tls,
            traces: self.traces,
            registry: self.registry,
            plugins: self.plugins,
            servers,
            orchestrator,
            admin_tokens,
            public_metrics,
            audit: self.audit.map(audit_settings).transpose()?,
            listen,
            tokens,
            oauth,
            mcp,
            upstreams,
            log_format: self.log.format.unwrap_or_default(),
            log_level: self.log.level.unwrap_or_else(|| "info".into()),
            workers,
            pinned_connections,
        })
    }
}

/// The URL of an HTTP or SSE upstream.
fn transport_url(t: &Transport) -> Option<&http::Uri> {
    match t {
        Transport::Http { url, .. } | Transport::HttpSse { url, .. } => Some(url),
        _ => None,
    }
}

/// Whether `url` is https, or plain http to a loopback host.
fn secure_url_ok(url: &http::Uri) -> bool {
    let host = url.host().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme_str() {
        Some("https") => !host.is_empty(),
        Some("http") => loopback,
        _ => false,
    }
}

/// An absolute http(s) URL with a host and no fragment; plain http only to a loopback host.
fn secure_url(field: &str, text: &str) -> Result<http::Uri, ConfigError> {
    let url: http::Uri = text
        .parse()
        .map_err(|e| field_err(field, format!("{text:?} is not a URL ({e})")))?;
    if !secure_url_ok(&url) {
        return Err(field_err(
            field,
            format!("{text:?} must be an https:// URL (http:// only to a loopback host)"),
        ));
    }
    if text.contains('#') {
        return Err(field_err(
            field,
            format!("{text:?} must not have a fragment"),
        ));
    }
    Ok(url)
}

/// Scope names as RFC 6749 §3.3 allows them (printable ASCII but space, `"` and `\\`).
fn scope_list(field: &str, scopes: &[String]) -> Result<(), ConfigError> {
    for (i, s) in scopes.iter().enumerate() {
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b > 0x20 && b < 0x7f && b != b'"' && b != b'\\')
        {
            return Err(field_err(
                format!("{field}[{i}]"),
                format!("{s:?} is not a scope (printable ASCII without spaces or quotes)"),
            ));
        }
    }
    Ok(())
}

/// The client requests scope rules may name.
const SCOPED_METHODS: [&str; 14] = [
    "initialize",
    "server/discover",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "subscriptions/listen",
];

/// Validates the OAuth block; the metadata URL is the resource URI with
/// `/.well-known/oauth-protected-resource` inserted before its path (RFC 9728 §3.1).
fn oauth_settings(raw: RawOAuth) -> Result<OAuthSettings, ConfigError> {
    let resource_url = secure_url("auth.oauth.resource", &raw.resource)?;
    if resource_url.query().is_some() {
        return Err(field_err("auth.oauth.resource", "must not have a query"));
    }
    let path = resource_url.path().trim_end_matches('/');
    let metadata_path = format!("/.well-known/oauth-protected-resource{path}");
    let authority = resource_url.authority().map(|a| a.as_str()).unwrap_or("");
    let scheme = resource_url.scheme_str().unwrap_or("https");
    let metadata_url = format!("{scheme}://{authority}{metadata_path}");
    if raw.issuers.is_empty() {
        return Err(field_err(
            "auth.oauth.issuers",
            "at least one trusted issuer is required",
        ));
    }
    let several = raw.issuers.len() > 1;
    let mut issuers = Vec::new();
    for (i, iss) in raw.issuers.into_iter().enumerate() {
        let field = format!("auth.oauth.issuers[{i}]");
        secure_url(&format!("{field}.issuer"), &iss.issuer)?;
        let jwks_uri = secure_url(&format!("{field}.jwks_uri"), &iss.jwks_uri)?;
        if issuers
            .iter()
            .any(|s: &IssuerSettings| s.issuer == iss.issuer)
        {
            return Err(field_err(format!("{field}.issuer"), "listed twice"));
        }
        let principal_prefix = iss.principal_prefix.unwrap_or_default();
        if several {
            if principal_prefix.is_empty() {
                return Err(field_err(
                    format!("{field}.principal_prefix"),
                    "required with several issuers (say \"corp:\"), so that one issuer's subjects cannot pose as another's",
                ));
            }
            if let Some(other) = issuers.iter().find(|s: &&IssuerSettings| {
                s.principal_prefix.starts_with(&principal_prefix)
                    || principal_prefix.starts_with(&s.principal_prefix)
            }) {
                return Err(field_err(
                    format!("{field}.principal_prefix"),
                    format!(
                        "{principal_prefix:?} overlaps {:?} of issuer {}",
                        other.principal_prefix, other.issuer
                    ),
                ));
            }
        }
        if let Some(scopes) = &iss.scopes {
            scope_list(&format!("{field}.scopes"), scopes)?;
            // Its tokens could never be taken: say so now, not with every refusal.
            let covers = |g: &String, r: &String| {
                r == g
                    || r.strip_prefix(g.as_str())
                        .is_some_and(|l| l.starts_with(':'))
            };
            if let Some(r) = raw
                .required_scopes
                .iter()
                .find(|r| !scopes.iter().any(|g| covers(g, r)))
            {
                return Err(field_err(
                    format!("{field}.scopes"),
                    format!(
                        "grants nothing that covers {r:?}, which auth.oauth.required_scopes asks of every token"
                    ),
                ));
            }
        }
        issuers.push(IssuerSettings {
            issuer: iss.issuer,
            jwks_uri,
            principal_prefix,
            scopes: iss.scopes,
        });
    }
    scope_list("auth.oauth.required_scopes", &raw.required_scopes)?;
    scope_list("auth.oauth.scopes_supported", &raw.scopes_supported)?;
    let mut scope_rules = Vec::new();
    for (i, r) in raw.scope_rules.into_iter().enumerate() {
        let field = format!("auth.oauth.scope_rules[{i}]");
        if r.methods.is_empty() {
            return Err(field_err(
                format!("{field}.methods"),
                "name at least one method (required_scopes apply to all)",
            ));
        }
        if let Some((j, m)) = r
            .methods
            .iter()
            .enumerate()
            .find(|(_, m)| !SCOPED_METHODS.contains(&m.as_str()))
        {
            return Err(field_err(
                format!("{field}.methods[{j}]"),
                format!(
                    "{m:?} is not a method a scope rule can cover ({})",
                    SCOPED_METHODS.join(", ")
                ),
            ));
        }
        if r.scopes.is_empty() {
            return Err(field_err(format!("{field}.scopes"), "must not be empty"));
        }
        scope_list(&format!("{field}.scopes"), &r.scopes)?;
        scope_rules.push(ScopeRule {
            methods: r.methods,
            names: r.names,
            scopes: r.scopes,
        });
    }
    let leeway = raw.leeway.unwrap_or(Duration::from_secs(30));
    if leeway > Duration::from_secs(300) {
        return Err(field_err("auth.oauth.leeway", "must be at most 5m"));
    }
    let key_refetch_interval = raw.key_refetch_interval.unwrap_or(Duration::from_secs(10));
    if key_refetch_interval < Duration::from_millis(100) {
        return Err(field_err(
            "auth.oauth.key_refetch_interval",
            "must be at least 100ms (each unknown key id would fetch the issuer's keys)",
        ));
    }
    let mut scopes_supported = raw.scopes_supported;
    if scopes_supported.is_empty() {
        let named = raw
            .required_scopes
            .iter()
            .chain(scope_rules.iter().flat_map(|r| r.scopes.iter()));
        for s in named {
            if !scopes_supported.contains(s) {
                scopes_supported.push(s.clone());
            }
        }
    }
    let claim = |field: &str, v: Option<String>, default: &str| match v {
        Some(c) if c.is_empty() => Err(field_err(field, "must not be empty")),
        Some(c) => Ok(c),
        None => Ok(default.to_owned()),
    };
    Ok(OAuthSettings {
        resource: raw.resource,
        metadata_url,
        metadata_path,
        issuers,
        required_scopes: raw.required_scopes,
        scope_rules,
        scopes_supported,
        leeway,
        principal_claim: claim("auth.oauth.principal_claim", raw.principal_claim, "sub")?,
        groups_claim: claim("auth.oauth.groups_claim", raw.groups_claim, "groups")?,
        resource_name: raw.resource_name,
        key_refetch_interval,
    })
}

/// Validates bearer tokens (at least 16 characters, inline or from the environment).
fn bearer_tokens(field: &str, raw: Vec<RawToken>) -> Result<Vec<(String, Arc<str>)>, ConfigError> {
    let mut tokens = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        if t.principal.trim().is_empty() {
            return Err(field_err(format!("{field}.principal"), "must not be empty"));
        }
        let token = match (t.token, t.token_env) {
            (Some(tok), None) => tok,
            (None, Some(var)) => std::env::var(&var).map_err(|_| {
                field_err(
                    format!("{field}.token_env"),
                    format!("environment variable {var} is not set"),
                )
            })?,
            _ => return Err(field_err(field, "set exactly one of token or token_env")),
        };
        // A presented token is read trimmed: one kept with the newline of the file its
        // variable came from would never match.
        let token = match token.trim() {
            trimmed if trimmed.len() == token.len() => token,
            trimmed => trimmed.to_owned(),
        };
        if token.len() < 16 {
            return Err(field_err(
                format!("{field}.token"),
                "must be at least 16 characters",
            ));
        }
        // One token, one principal: which of two a request would be is a guess.
        if let Some((_, other)) = tokens.iter().find(|(known, _)| *known == token) {
            return Err(field_err(
                format!("{field}.token"),
                format!("{other:?}'s token too: give each principal its own"),
            ));
        }
        tokens.push((token, Arc::from(t.principal)));
    }
    Ok(tokens)
}

/// The admin tokens of `raw` (`admin.tokens`), their scopes checked.
fn admin_tokens(raw: Vec<RawAdminToken>) -> Result<Vec<AdminToken>, ConfigError> {
    let mut scopes = Vec::with_capacity(raw.len());
    let mut plain = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let granted = match t.scopes {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(field_err(
                    format!("admin.tokens[{i}].scopes"),
                    "must not be empty (leave it out for every scope)",
                ));
            }
            Some(list) => {
                if let Some((j, bad)) = list
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !ADMIN_SCOPES.contains(&s.as_str()))
                {
                    return Err(field_err(
                        format!("admin.tokens[{i}].scopes[{j}]"),
                        format!(
                            "{bad:?} is not an admin scope (one of {})",
                            ADMIN_SCOPES.join(", ")
                        ),
                    ));
                }
                Some(list.into_iter().map(String::into_boxed_str).collect())
            }
        };
        scopes.push(granted);
        plain.push(RawToken {
            principal: t.principal,
            token: t.token,
            token_env: t.token_env,
        });
    }
    let tokens: Vec<AdminToken> = bearer_tokens("admin.tokens", plain)?
        .into_iter()
        .zip(scopes)
        .map(|((token, principal), scopes)| AdminToken {
            token,
            principal,
            scopes,
        })
        .collect();
    // Two tokens of one principal (a rotation) must grant alike: the audit trail and the
    // approvals name the principal, not which of its tokens acted.
    for (i, t) in tokens.iter().enumerate() {
        if let Some(other) = tokens[..i]
            .iter()
            .find(|o| o.principal == t.principal && o.scopes != t.scopes)
        {
            return Err(field_err(
                format!("admin.tokens[{i}].scopes"),
                format!(
                    "{:?} has another token with other scopes: give each set of scopes its own principal",
                    other.principal
                ),
            ));
        }
    }
    Ok(tokens)
}

/// An HTTP upstream's URL (absolute http:// or https://) and extra headers; `field` names the
/// block (`upstreams[0].http`) in errors.
fn http_endpoint(field: &str, h: RawHttp) -> Result<(http::Uri, http::HeaderMap), ConfigError> {
    let url: http::Uri = h.url.parse().map_err(|e| {
        field_err(
            format!("{field}.url"),
            format!("{:?} is not a URL ({e})", h.url),
        )
    })?;
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
        return Err(field_err(
            format!("{field}.url"),
            format!("{:?} must be an absolute http:// or https:// URL", h.url),
        ));
    }
    // Credentials go in `headers` (sensitive there), not in a URL that errors and logs show.
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(field_err(
            format!("{field}.url"),
            "must not carry credentials (user:password@): put them in headers",
        ));
    }
    let mut headers = http::HeaderMap::new();
    for (k, v) in h.headers {
        let name = http::HeaderName::try_from(k.as_str()).map_err(|_| {
            field_err(
                format!("{field}.headers"),
                format!("{k:?} is not a header name"),
            )
        })?;
        if crate::orchestrator::spec::is_exchange_header(name.as_str()) {
            return Err(field_err(
                format!("{field}.headers.{k}"),
                "is the gateway's to send (it frames the exchange or carries the MCP session)",
            ));
        }
        let value = http::HeaderValue::try_from(v.as_str()).map_err(|_| {
            field_err(
                format!("{field}.headers.{k}"),
                "is not a valid header value",
            )
        })?;
        headers.insert(name, value);
    }
    Ok((url, headers))
}

/// The longest deadline or interval a setting may name: far past any use, and far short of
/// what would overflow a clock reading it is added to (a panic on every connection).
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

fn positive(
    field: &str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(d) if d.is_zero() => Err(field_err(field, "must be greater than zero")),
        Some(d) if d > MAX_DURATION => Err(field_err(field, "must be at most 10 years")),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

fn at_least_one(field: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(field_err(field, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

#[cfg(test)]
mod tests {

    const ONE_UPSTREAM: &str =
        "upstreams:\n  - { name: u, http: { url: \"http://127.0.0.1:1/mcp\" } }\n";

    #[test]
    fn the_keys_of_a_line_are_read_without_its_values() {
        let keys = |line| -> Vec<&str> { keys_on_line(line).into_iter().map(|(_, k)| k).collect() };
        assert_eq!(keys("  token: s3cret"), ["token"]);
        assert_eq!(keys("  token: ab12: cd34"), ["token"]);
        assert_eq!(keys("  token: s3cret:"), ["token"]);
        assert_eq!(keys("  token: s3cr,3t: x"), ["token"]);
        assert_eq!(keys("  token: ab{cd: x"), ["token"]);
        assert_eq!(keys("- [a, b: c]"), Vec::<&str>::new());
        assert_eq!(
            keys("runtime: { pinned_connections: sometimes }"),
            ["runtime", "pinned_connections"]
        );
        assert_eq!(keys("- { url: \"http://a: b\", x: 'c: d' }"), ["url", "x"]);
        assert_eq!(keys("  url: http://host:80/x # note: y"), ["url"]);
        assert_eq!(keys("  x-mcp-header: a"), ["x-mcp-header"]);
        assert!(keys("  - plain").is_empty());
    }

    #[test]
    fn a_setting_is_named_by_its_keys_not_its_values() {
        let text = "auth:  # who\n  tokens:\n    - principal: ops\n      token: ab12: cd34\n    - token: s3cret:\nruntime: { workers: 2, pinned: x }\n";
        assert_eq!(
            setting_path(text, 3, 18).unwrap(),
            ["auth", "tokens", "token"]
        );
        assert_eq!(
            setting_path(text, 4, 9).unwrap(),
            ["auth", "tokens", "token"]
        );
        assert_eq!(setting_path(text, 0, 1).unwrap(), ["auth"]);
        assert_eq!(setting_path(text, 5, 34).unwrap(), ["pinned"]);
        assert_eq!(setting_path(text, 5, 22).unwrap(), ["workers"]);
        // An error on a key itself (unknown, given twice) names that key.
        assert_eq!(setting_path(text, 5, 24).unwrap(), ["pinned"]);
        assert!(setting_path(text, 9, 1).is_none());
    }

    #[test]
    fn a_syntax_error_does_not_quote_the_lines_around_it() {
        let yaml = format!(
            "{ONE_UPSTREAM}auth:\n  tokens:\n    - principal: ops\n      token: s3cret-0123456789abcdef\n      scope: x\n"
        );
        let e = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(e.contains("auth.tokens.scope"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        // An unquoted value with `: ` in it: its line's key, not the value's pieces.
        let yaml = format!(
            "{ONE_UPSTREAM}auth:\n  tokens:\n    - principal: ops\n      token: s3cret-0123: 456789abcdef\n"
        );
        let e = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn values_that_parse_but_would_harm_are_refused_by_field() {
        for (yaml, field) in [
            ("audit: { keep: 100000000 }\n", "audit.keep"),
            (
                "plugins: { watch_interval: 0s }\n",
                "plugins.watch_interval",
            ),
            (
                "plugins: { watch_interval: 2h }\n",
                "plugins.watch_interval",
            ),
            (
                "mcp: { max_answers_bytes: 1000 }\n",
                "mcp.max_answers_bytes",
            ),
        ] {
            let e = Config::from_yaml(&format!("{ONE_UPSTREAM}{yaml}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        assert!(Config::from_yaml(&format!("{ONE_UPSTREAM}audit: {{ keep: 1000 }}\n")).is_ok());
    }

    #[test]
    fn callers_credentials_and_url_credentials_never_go_in_the_clear() {
        let with = |url: &str| {
            Config::from_yaml(&format!(
                "upstreams:\n  - {{ name: u, http: {{ url: \"{url}\" }}, credentials: {{template: 'Bearer user-{{principal}}'}} }}\n"
            ))
        };
        let e = with("http://10.0.0.5/mcp").unwrap_err().to_string();
        assert!(e.contains("upstreams[0].credentials"), "{e}");
        let trusted = Config::from_yaml(
            "upstreams:\n  - { name: u, http: { url: \"http://mcp.ns.svc\" }, credentials: {template: 'Bearer user-{principal}', allow_plain_http: true} }\n",
        );
        assert!(trusted.is_ok(), "{:?}", trusted.err());
        assert!(with("http://127.0.0.1:1/mcp").is_ok());
        assert!(with("https://mcp.example.com/mcp").is_ok());
        let e = Config::from_yaml(
            "upstreams:\n  - { name: u, sse: { url: \"https://me:pw@mcp.example.com/sse\" } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("upstreams[0].sse.url"), "{e}");
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn a_token_is_taken_without_the_newline_of_the_file_it_came_from() {
        // As `token_env` of a variable read from a file would give it.
        let c = Config::from_yaml(&format!(
            "{ONE_UPSTREAM}auth:\n  tokens:\n    - {{ principal: ops, token: \"0123456789abcdef\\n\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.tokens[0].0, "0123456789abcdef");
    }

    #[test]
    fn session_keys_are_read_in_every_usual_spelling_and_refused_by_field() {
        let hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let want: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(session_key("k", &format!("  {hex}\n")).unwrap(), want);
        use base64::Engine;
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            assert_eq!(session_key("k", &engine.encode(want)).unwrap(), want);
        }
        let short = session_key("mcp.session_keys[0].file", &hex[..62]).unwrap_err();
        assert!(
            short.to_string().contains("mcp.session_keys[0].file"),
            "{short}"
        );
        assert!(session_key("k", "not a key").is_err());
        let file = std::env::temp_dir().join(format!("gatehouse-key-{}", std::process::id()));
        std::fs::write(&file, format!("{hex}\n")).unwrap();
        let key = format!("{{ id: 2, file: {:?} }}", file);
        const UP: &str = "upstreams:\n  - { name: u, http: { url: \"http://127.0.0.1:1/mcp\" } }\n";
        let c = Config::from_yaml(&format!("{UP}mcp:\n  session_keys:\n    - {key}\n")).unwrap();
        assert_eq!(c.mcp.session_keys.0, vec![(2, want)]);
        assert!(
            !format!("{:?}", c.mcp.session_keys).contains("0102"),
            "keys never printed"
        );
        let one = key.replace("id: 2", "id: 1");
        for (yaml, field) in [
            (key.replace("id: 2", "id: 0"), "mcp.session_keys[0].id"),
            (format!("{one}\n    - {one}"), "mcp.session_keys[1].id"),
            // One key under two ids.
            (format!("{one}\n    - {key}"), "mcp.session_keys[1]"),
            ("{ id: 1 }".to_owned(), "mcp.session_keys[0]"),
            (
                "{ id: 1, env: GATEHOUSE_NO_SUCH_VARIABLE }".to_owned(),
                "mcp.session_keys[0].env",
            ),
            (
                "{ id: 1, file: /nonexistent/key }".to_owned(),
                "mcp.session_keys[0].file",
            ),
        ] {
            let err = Config::from_yaml(&format!("{UP}mcp:\n  session_keys:\n    - {yaml}\n"))
                .unwrap_err();
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
        let _ = std::fs::remove_file(&file);
    }

    use super::*;

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml).expect_err(yaml).to_string()
    }

    #[test]
    fn admin_scopes_are_known_ones_or_none_for_all() {
        let base = "admin: {tokens: [{principal: ops, token: 0123456789abcdef0";
        let c = Config::from_yaml(&format!("{base}, scopes: [servers:read, pins]}}]}}")).unwrap();
        let scopes = c.admin_tokens[0].scopes.as_deref().unwrap();
        assert_eq!(scopes, ["servers:read".into(), "pins".into()]);
        let e = err(&format!(
            "{base}, scopes: [servers:read, server:write]}}]}}"
        ));
        assert!(
            e.contains("admin.tokens[0].scopes[1]")
                && e.contains("\"server:write\" is not an admin scope"),
            "{e}"
        );
        let e = err(&format!("{base}, scopes: []}}]}}"));
        assert!(
            e.contains("admin.tokens[0].scopes") && e.contains("must not be empty"),
            "{e}"
        );
        let two = "admin: {tokens: [{principal: ops, token: 0123456789abcdef0}, {principal: ops, token: 0123456789abcdef1";
        assert!(
            Config::from_yaml(&format!("{two}}}]}}")).is_ok(),
            "a rotation"
        );
        let e = err(&format!("{two}, scopes: [pins]}}]}}"));
        assert!(
            e.contains("admin.tokens[1].scopes") && e.contains("another token"),
            "{e}"
        );
        let e = err("auth: {tokens: [{principal: app, token: 0123456789abcdef0, scopes: [x]}]}");
        assert!(e.contains("scopes"), "client tokens take none: {e}");
    }

    #[test]
    fn a_token_opens_one_door_for_one_principal() {
        const A: &str = "aaaaaaaaaaaaaaaa";
        const B: &str = "bbbbbbbbbbbbbbbb";
        let up = "upstreams: [{name: u, stdio: {command: x}}]\n";
        // A client token that the admin API also takes.
        let e = err(&format!(
            "{up}auth: {{tokens: [{{principal: ci, token: {A}}}]}}\nadmin: {{tokens: [{{principal: ops, token: {A}}}]}}"
        ));
        assert!(
            e.contains("admin.tokens[0].token") && e.contains("a client would open the admin API"),
            "{e}"
        );
        assert!(!e.contains(A), "the token is not quoted: {e}");
        // A principal in both lists.
        let e = err(&format!(
            "{up}auth: {{tokens: [{{principal: ops, token: {A}}}]}}\nadmin: {{tokens: [{{principal: ops, token: {B}}}]}}"
        ));
        assert!(e.contains("admin.tokens[0].principal"), "{e}");
        // Or a client certificate's principal.
        let e = err(&format!(
            "{up}tls: {{cert_file: c.pem, key_file: k.pem, client_auth: {{ca_file: ca.pem, principals: [{{dns: ops.example, principal: ops}}]}}}}\nadmin: {{tokens: [{{principal: ops, token: {B}}}]}}"
        ));
        assert!(e.contains("admin.tokens[0].principal"), "{e}");
        // One token for two principals, in either list.
        for list in ["auth", "admin"] {
            let e = err(&format!(
                "{up}{list}: {{tokens: [{{principal: one, token: {A}}}, {{principal: two, token: {A}}}]}}"
            ));
            assert!(e.contains(&format!("{list}.tokens[1].token")), "{e}");
            assert!(!e.contains(A), "{e}");
        }
        // Apart, both are taken.
        let cfg = Config::from_yaml(&format!(
            "{up}auth: {{tokens: [{{principal: ci, token: {A}}}]}}\nadmin: {{tokens: [{{principal: ops, token: {B}}}]}}"
        ))
        .unwrap();
        assert_eq!(cfg.admin_tokens.len(), 1);
    }

    #[test]
    fn runtime_workers_are_one_to_the_cap_or_one_per_cpu() {
        const UP: &str = "upstreams:\n  - { name: u, http: { url: \"http://127.0.0.1:1/mcp\" } }\n";
        assert_eq!(Config::from_yaml(UP).unwrap().workers, None);
        for n in [1, MAX_WORKERS] {
            let c = Config::from_yaml(&format!("{UP}runtime: {{ workers: {n} }}")).unwrap();
            assert_eq!(c.workers, Some(n));
        }
        for bad in ["0", "257", "-1", "many"] {
            let e = err(&format!("{UP}runtime: {{ workers: {bad} }}"));
            assert!(e.contains("runtime") || e.contains("workers"), "{bad}: {e}");
        }
        let e = err(&format!("{UP}runtime: {{ threads: 2 }}"));
        assert!(e.contains("threads"), "{e}");
        // Connections are pinned to threads unless asked otherwise.
        assert!(Config::from_yaml(UP).unwrap().pinned_connections);
        let c = Config::from_yaml(&format!("{UP}runtime: {{ pinned_connections: false }}"));
        assert!(!c.unwrap().pinned_connections);
        let e = err(&format!("{UP}runtime: {{ pinned_connections: sometimes }}"));
        assert!(e.contains("pinned_connections"), "{e}");
    }

    #[test]
    fn runner_environment_is_checked_by_name() {
        const UP: &str = "upstreams:\n  - { name: u, http: { url: \"http://127.0.0.1:1/mcp\" } }\n";
        let c = Config::from_yaml(&format!(
            "{UP}registry: {{ runner_env: {{ UV_NATIVE_TLS: \"true\", PATH: /opt/bin }} }}\n"
        ))
        .unwrap();
        assert_eq!(c.registry.runner_env["UV_NATIVE_TLS"], "true");
        for (env, field, why) in [
            ("{ HOME: /tmp }", "registry.runner_env.HOME", "its own"),
            (
                "{ XDG_CACHE_HOME: /tmp }",
                "registry.runner_env.XDG_CACHE_HOME",
                "its own",
            ),
            (
                "{ npm_config_cache: /tmp }",
                "registry.runner_env.npm_config_cache",
                "its own",
            ),
            (
                "{ \"A-B\": x }",
                "registry.runner_env.A-B",
                "not a variable name",
            ),
            (
                "{ \"1X\": x }",
                "registry.runner_env.1X",
                "not a variable name",
            ),
            ("{ X: \"a\\0b\" }", "registry.runner_env.X", "NUL"),
        ] {
            let e = err(&format!("{UP}registry: {{ runner_env: {env} }}\n"));
            assert!(e.contains(field) && e.contains(why), "{env}: {e}");
        }
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = Config::from_yaml(
            r#"
upstreams:
  - name: everything
    stdio: { command: node, args: [server.js, stdio] }
  - name: remote
    http: { url: "http://127.0.0.1:3001/mcp", headers: { x-api-key: abc } }
    call_timeout: 5s
"#,
        )
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[1].call_timeout, Duration::from_secs(5));
        assert_eq!(c.upstreams[0].call_timeout, Duration::from_secs(60));
        assert_eq!(c.mcp.name_separator, "__");
        assert!(matches!(c.upstreams[1].transport, Transport::Http { .. }));
    }

    /// A tool's public name must split back at its server: no server name that contains
    /// the separator or ends with its start, and no separator a server's DNS name could hold.
    #[test]
    fn names_and_the_separator_keep_tool_names_unambiguous() {
        for (name, sep, ok) in [
            ("a", "__", true),
            ("_a", "__", true),
            ("a_", "__", false),
            ("a__b", "__", false),
            ("my-srv", ".", true),
            ("ab", "b.", true),
            ("b_a", "_a_", false),
        ] {
            assert_eq!(super::separable(name, sep), ok, "{name:?} with {sep:?}");
        }
        let e = err("upstreams: [{name: a_, stdio: {command: x}}]");
        assert!(
            e.contains("upstreams[0].name") && e.contains("ends with its start"),
            "{e}"
        );
        for sep in ["-", "x", "a-1"] {
            let e = err(&format!(
                "mcp: {{ name_separator: {sep:?} }}\nupstreams: [{{name: a, stdio: {{command: x}}}}]"
            ));
            assert!(
                e.contains("mcp.name_separator") && e.contains("other than a-z"),
                "{sep}: {e}"
            );
        }
        Config::from_yaml(
            "mcp: { name_separator: \"::\" }\nupstreams: [{name: a_b, stdio: {command: x}}]",
        )
        .unwrap();
    }

    #[test]
    fn errors_name_the_bad_field() {
        assert!(
            err("listen: nope\nupstreams: [{name: a, stdio: {command: x}}]").contains("listen:")
        );
        assert!(
            err("upstreams: [{name: 'a b', stdio: {command: x}}]").contains("upstreams[0].name")
        );
        assert!(
            err("upstreams: [{name: a, stdio: {command: x}}, {name: a, stdio: {command: y}}]")
                .contains("upstreams[1].name: duplicate")
        );
        assert!(err("upstreams: [{name: a}]").contains("upstreams[0]: set exactly one"));
        assert!(
            err("upstreams: [{name: a, http: {url: 'ftp://x'}}]").contains("upstreams[0].http.url")
        );
        assert!(
            err("upstreams: [{name: a, sse: {url: 'http://h/sse', headers: {'a b': x}}}]")
                .contains("upstreams[0].sse.headers")
        );
        for own in [
            "Mcp-Session-Id",
            "transfer-encoding",
            "gatehouse-via",
            "Mcp-Method",
            "traceparent",
        ] {
            let e = err(&format!(
                "upstreams: [{{name: a, http: {{url: 'http://h/mcp', headers: {{{own}: x}}}}}}]"
            ));
            assert!(
                e.contains(&format!("upstreams[0].http.headers.{own}"))
                    && e.contains("the gateway's to send"),
                "{e}"
            );
        }
        assert!(
            err("upstreams: [{name: a, sse: {url: '/sse'}, http: {url: 'http://h/mcp'}}]")
                .contains("upstreams[0]: set exactly one of stdio, http or sse")
        );
        assert!(
            err("upstreams: [{name: a, stdio: {command: x}, call_timeout: 0s}]")
                .contains("upstreams[0].call_timeout")
        );
        assert!(err("upstreams: []").contains("upstreams: at least one"));
        assert!(
            err("servers: [{name: Bad_Name, command: x}]").contains("servers[0].name"),
            "{}",
            err("servers: [{name: Bad_Name, command: x}]")
        );
        assert!(
            err("upstreams: [{name: a, stdio: {command: x}}]\nservers: [{name: a, command: srv}]")
                .contains("servers[0].name: duplicate")
        );
        assert!(
            err("servers: [{name: a, command: x, env: [{name: K}]}]").contains("servers[0].env[0]")
        );
        assert!(
            err("servers: [{name: a, command: x}]\norchestrator: {call_timeout: 0s}")
                .contains("orchestrator.call_timeout")
        );
        assert!(
            err("servers: [{name: a, command: x}]\norchestrator: {connect_timeout: 30s, wake_timeout: 2m}")
                .contains("orchestrator.wake_timeout: 2m is longer than orchestrator.connect_timeout (30s)")
        );
        assert!(
            err("servers: [{name: a, command: x, idle: {after: soon}}]")
                .contains("servers[0].idle.after")
        );
        assert!(
            err("servers: [{name: a, command: x}]\nadmin: {tokens: [{principal: ops, token: short}]}")
                .contains("admin.tokens[0].token")
        );
        assert!(err("bogus: 1\nupstreams: [{name: a, stdio: {command: x}}]").contains("bogus"));
        assert!(err("mcp: {allowed_origins: ['example.com']}\nupstreams: [{name: a, stdio: {command: x}}]")
            .contains("mcp.allowed_origins[0]"));
        let up = "upstreams: [{name: a, stdio: {command: x}}]";
        assert!(
            err(&format!("mcp: {{max_connections: 0}}\n{up}")).contains("mcp.max_connections:")
        );
        assert!(
            err(&format!(
                "mcp: {{max_connections: 10, max_connections_per_ip: 11}}\n{up}"
            ))
            .contains("mcp.max_connections_per_ip: 11 exceeds")
        );
        assert!(
            err(&format!("mcp: {{idle_connection_timeout: 0s}}\n{up}"))
                .contains("mcp.idle_connection_timeout")
        );
        // A deadline so long that adding it to a clock reading would overflow (and panic on
        // every connection) is refused, naming the field.
        let huge = err(&format!("mcp: {{header_timeout: 300000000000y}}\n{up}"));
        assert!(
            huge.contains("mcp.header_timeout") && huge.contains("at most 10 years"),
            "{huge}"
        );
        assert!(Config::from_yaml(&format!("mcp: {{session_idle_timeout: 3650d}}\n{up}")).is_ok());
        assert!(
            err(&format!("mcp: {{keepalive_interval: 0s}}\n{up}"))
                .contains("mcp.keepalive_interval")
        );
        assert!(
            err(&format!("mcp: {{stalled_stream_timeout: 0s}}\n{up}"))
                .contains("mcp.stalled_stream_timeout")
        );
    }

    #[test]
    fn connection_limits_default_safely() {
        let c = Config::from_yaml("upstreams: [{name: a, stdio: {command: x}}]").unwrap();
        assert_eq!(c.mcp.max_connections, 10_000);
        assert_eq!(c.mcp.max_connections_per_ip, 256);
        assert_eq!(c.mcp.idle_connection_timeout, Duration::from_secs(60));
        assert_eq!(c.mcp.stalled_stream_timeout, Duration::from_secs(30));
        let small = Config::from_yaml(
            "mcp: {max_connections: 8}\nupstreams: [{name: a, stdio: {command: x}}]",
        )
        .unwrap();
        assert_eq!(small.mcp.max_connections_per_ip, 8);
    }

    #[test]
    fn servers_become_orchestrated_upstreams() {
        let c = Config::from_yaml(
            "servers:\n  - name: everything\n    command: node\n    args: [server.js]\norchestrator: {call_timeout: 5s}\nadmin: {tokens: [{principal: ops, token: 0123456789abcdef0}]}",
        )
        .unwrap();
        assert_eq!(c.servers.len(), 1);
        assert_eq!(c.servers[0].name, "everything");
        assert_eq!(c.upstreams[0].name, "everything");
        assert!(matches!(c.upstreams[0].transport, Transport::Orchestrated));
        assert_eq!(c.upstreams[0].call_timeout, Duration::from_secs(5));
        assert_eq!(&*c.admin_tokens[0].principal, "ops");
        assert_eq!(c.admin_tokens[0].scopes, None, "every scope");
        // With the admin API on, a gateway may start with no server at all.
        let empty =
            Config::from_yaml("admin: {tokens: [{principal: ops, token: 0123456789abcdef0}]}")
                .unwrap();
        assert!(empty.upstreams.is_empty());
    }

    #[test]
    fn oauth_settings_are_checked_field_by_field() {
        let with = |oauth: &str| {
            format!(
                "listen: 0.0.0.0:9000\nauth: {{oauth: {oauth}}}\nupstreams: [{{name: a, stdio: {{command: x}}}}]"
            )
        };
        let iss = "issuers: [{issuer: 'https://as.example', jwks_uri: 'https://as.example/jwks'}]";
        // OAuth alone is authentication enough off loopback.
        let ok = Config::from_yaml(&with(&format!(
            "{{resource: 'https://gw.example/mcp/', {iss}, required_scopes: [mcp], scope_rules: [{{methods: [tools/call], scopes: [mcp:call]}}]}}"
        )))
        .unwrap();
        let o = ok.oauth.unwrap();
        assert_eq!(
            o.metadata_url,
            "https://gw.example/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(o.metadata_path, "/.well-known/oauth-protected-resource/mcp");
        assert_eq!(o.scopes_supported, ["mcp", "mcp:call"]);
        assert_eq!(o.principal_claim, "sub");
        for (oauth, field) in [
            (format!("{{resource: 'http://gw.example/mcp', {iss}}}"), "auth.oauth.resource"),
            (format!("{{resource: 'https://gw.example/mcp#x', {iss}}}"), "auth.oauth.resource"),
            ("{resource: 'https://gw.example/mcp'}".to_owned(), "auth.oauth.issuers"),
            (
                "{resource: 'https://gw.example/mcp', issuers: [{issuer: 'https://a', jwks_uri: 'http://a/jwks'}]}".to_owned(),
                "auth.oauth.issuers[0].jwks_uri",
            ),
            (
                format!("{{resource: 'https://gw.example/mcp', {iss}, scope_rules: [{{methods: [], scopes: [a]}}]}}"),
                "auth.oauth.scope_rules[0].methods",
            ),
            (
                format!("{{resource: 'https://gw.example/mcp', {iss}, required_scopes: ['a b']}}"),
                "auth.oauth.required_scopes[0]",
            ),
            (
                format!("{{resource: 'https://gw.example/mcp', {iss}, leeway: 1h}}"),
                "auth.oauth.leeway",
            ),
            (
                "{resource: 'https://gw.example/mcp', issuers: [{issuer: 'https://a', jwks_uri: 'https://a/k'}, {issuer: 'https://b', jwks_uri: 'https://b/k', principal_prefix: 'b:'}]}".to_owned(),
                "auth.oauth.issuers[0].principal_prefix",
            ),
            (
                "{resource: 'https://gw.example/mcp', issuers: [{issuer: 'https://a', jwks_uri: 'https://a/k', principal_prefix: 'a:'}, {issuer: 'https://b', jwks_uri: 'https://b/k', principal_prefix: 'a:b:'}]}".to_owned(),
                "auth.oauth.issuers[1].principal_prefix",
            ),
            (
                format!("{{resource: 'https://gw.example/mcp', {iss}, scope_rules: [{{methods: [tools/cal], scopes: [a]}}]}}"),
                "auth.oauth.scope_rules[0].methods[0]",
            ),
            (
                format!("{{resource: 'https://gw.example/mcp', {iss}, key_refetch_interval: 1ms}}"),
                "auth.oauth.key_refetch_interval",
            ),
        ] {
            let e = err(&with(&oauth));
            assert!(e.contains(field), "{oauth}: {e}");
        }
    }

    #[test]
    fn auth_is_required_off_loopback() {
        let e = err("listen: 0.0.0.0:9000\nupstreams: [{name: a, stdio: {command: x}}]");
        assert!(e.contains("auth.tokens"), "{e}");
        let ok = Config::from_yaml(
            "listen: 0.0.0.0:9000\nauth: {tokens: [{principal: ci, token: 0123456789abcdef0}]}\nupstreams: [{name: a, stdio: {command: x}}]",
        )
        .unwrap();
        assert_eq!(&*ok.tokens[0].1, "ci");
        assert!(err("auth: {tokens: [{principal: ci, token: short}]}\nupstreams: [{name: a, stdio: {command: x}}]")
            .contains("auth.tokens[0].token"));
    }
}
