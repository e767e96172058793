//! The admin API: JSON over HTTP at `/admin/v1/`, for operators managing the servers the
//! gateway runs.
//!
//! ```text
//! GET    /admin/v1/whoami                       the token's principal and scopes
//! GET    /admin/v1/servers                      every server with its status
//! GET    /admin/v1/servers/{name}               one server
//! PUT    /admin/v1/servers/{name}               add or update (body: an McpServer spec)
//! DELETE /admin/v1/servers/{name}               stop and remove
//! POST   /admin/v1/servers/{name}/restart       restart its process or pod
//! GET    /admin/v1/servers/{name}/logs          recent output (?previous=true&tail=N)
//! GET    /admin/v1/sessions                     open sessions and their principals
//! GET    /admin/v1/audit                        the audit trail's recent records (?limit=N)
//! GET    /admin/v1/plugins                      policy plugins and their chains
//! GET    /admin/v1/registry/servers             the catalog as the admin principal sees it
//! PUT    /admin/v1/registry/servers/{name}/versions/{v}/labels   the operator's labels
//! GET    /admin/v1/pins                         tool definitions: approved, and waiting
//! POST   /admin/v1/pins/approve                 approve what waits (body: server, tool,
//!                                               digest of the definition reviewed)
//! ```
//!
//! It is off unless `admin.tokens` is set, and takes only those tokens (client tokens do not
//! open it). Servers from the config file are read-only here: they come back with the file.
//! Added servers serve sessions opened after the change. On Kubernetes an added server is an
//! `McpServer` resource: it survives gateway restarts and every replica serves it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;

mod views;

use crate::auth::AuthError;
use crate::body::Body;
use crate::gateway::Gateway;
use crate::mcp::front::{FrontError, read_trusted_body};
use crate::orchestrator::{
    LogOptions, McpServerSpec, OrchestratorError, Runtime, ServerDef, ServerStatus,
};

/// Where the admin API lives.
pub const PREFIX: &str = "/admin/v1/";

/// Why an admin request failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("the admin API is off: set admin.tokens in the config file")]
    Off,
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("no such admin endpoint: {0}")]
    NoRoute(String),
    #[error("this token does not grant the admin scope {0} (its scopes are set in admin.tokens)")]
    Scope(&'static str, crate::auth::Principal),
    #[error("method {method} is not allowed here (allowed: {allow})")]
    Method { method: Method, allow: &'static str },
    #[error("the body must be JSON (Content-Type: application/json)")]
    ContentType,
    #[error("{0}")]
    Body(FrontError),
    #[error("invalid server definition: {0}")]
    Invalid(String),
    #[error(
        "server {0:?} is defined in the config file; change it there (the admin API manages the servers it added)"
    )]
    Configured(String),
    #[error(transparent)]
    Orchestrator(#[from] OrchestratorError),
    #[error("tool-definition pinning is off: set pinning in the config file")]
    PinningOff,
    #[error(transparent)]
    Approve(#[from] crate::pins::ApproveError),
    #[error("the registry is off: registry.enabled is false")]
    RegistryOff,
    #[error("a server named {0:?} runs already: uninstall it, or install under another name")]
    Installed(String),
    #[error(
        "{0:?} was changed since its values were given: its McpServer no longer runs what its stored values were given for, so no upgrade carries them; give them again (PUT the server with secretValue, or uninstall and install it again)"
    )]
    ValuesGivenForAnother(String),
    #[error("the registry's filter failed, so nothing is shown")]
    Filter,
    #[error(transparent)]
    Catalog(#[from] crate::registry::CatalogError),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Off
            | AdminError::NoRoute(_)
            | AdminError::PinningOff
            | AdminError::RegistryOff => StatusCode::NOT_FOUND,
            AdminError::Catalog(e) => match e {
                crate::registry::CatalogError::Invalid(_) => StatusCode::BAD_REQUEST,
                crate::registry::CatalogError::NotFound => StatusCode::NOT_FOUND,
                crate::registry::CatalogError::Exists { .. }
                | crate::registry::CatalogError::Full
                | crate::registry::CatalogError::Contended => StatusCode::CONFLICT,
                crate::registry::CatalogError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::Approve(e) => match e {
                crate::pins::ApproveError::Unknown { .. } => StatusCode::NOT_FOUND,
                crate::pins::ApproveError::NothingToApprove { .. }
                | crate::pins::ApproveError::Stale { .. } => StatusCode::CONFLICT,
                crate::pins::ApproveError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::Auth(_) => StatusCode::UNAUTHORIZED,
            AdminError::Scope(..) => StatusCode::FORBIDDEN,
            AdminError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::Body(FrontError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Body(FrontError::BodyTimeout) => StatusCode::REQUEST_TIMEOUT,
            AdminError::Body(FrontError::BodiesBusy) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Body(FrontError::CallerBodiesBusy(_)) => StatusCode::TOO_MANY_REQUESTS,
            AdminError::Body(_) | AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::Configured(_)
            | AdminError::Installed(_)
            | AdminError::ValuesGivenForAnother(_) => StatusCode::CONFLICT,
            AdminError::Filter => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Orchestrator(e) => match e {
                OrchestratorError::NotFound(_) | OrchestratorError::Removed(_) => {
                    StatusCode::NOT_FOUND
                }
                OrchestratorError::Invalid(_) | OrchestratorError::Unsupported { .. } => {
                    StatusCode::BAD_REQUEST
                }
                OrchestratorError::WrongTransport { .. }
                | OrchestratorError::Exists(_)
                | OrchestratorError::Conflict(_)
                | OrchestratorError::NotRunning { .. }
                | OrchestratorError::Remote { .. } => StatusCode::CONFLICT,
                _ => StatusCode::BAD_GATEWAY,
            },
        }
    }
}

/// One server as the admin API shows it.
#[derive(Serialize)]
struct ServerView {
    name: String,
    /// `config` (the config file) or `runtime` (the admin API, or an `McpServer` resource).
    source: &'static str,
    status: ServerStatus,
    /// How its egress is enforced (or that it is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    egress: Option<String>,
    /// The registry entry it was installed from.
    #[serde(skip_serializing_if = "Option::is_none")]
    installed: Option<crate::orchestrator::spec::RegistrySource>,
}

/// Serves one admin request.
pub async fn serve(gw: Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    // A change (anything but a read) is audited, allowed or not; so is a read the token's
    // scopes refuse.
    let change = !matches!(*req.method(), Method::GET | Method::HEAD);
    let asked = gw
        .audit
        .is_on()
        .then(|| (req.method().to_string(), req.uri().path().to_owned()));
    let who = match &asked {
        Some(_) => gw
            .admin_auth
            .authenticate(req.headers(), None, None)
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let mut resp = respond(&gw, req).await;
    // What the API answers (logs, sessions, the audit trail, the servers' definitions) is
    // for the token's holder only: no cache keeps it, the browser's included, whose copy would
    // outlive the console's sign-out.
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some((method, path)) = asked
        && (change || resp.status() == StatusCode::FORBIDDEN)
    {
        let authenticated = who.is_some();
        let status = resp.status().as_u16().to_string();
        let event = crate::audit::Event {
            kind: "admin",
            principal: who.as_ref().map(|i| &*i.principal),
            method: &method,
            name: Some(&path),
            // Refused for who asked; any other failure (a 404, a bad body) was allowed and
            // failed, as the outcome says.
            decision: if matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) {
                "denied"
            } else {
                "allowed"
            },
            outcome: Some(&status),
            ..Default::default()
        };
        // Without credentials, anyone can cause these: bounded like refused tokens.
        match authenticated {
            true => gw.audit.record(event),
            false => gw.audit.record_unauthenticated(event),
        }
    }
    resp
}

/// What the log says of a refused admin request: nothing of failed sign-ins and unknown
/// paths (anyone can make those), and not what a body said, which the caller hears: serde
/// quotes a value given in the wrong place, and that may be a secret.
fn log_line(e: &AdminError) -> Option<String> {
    match e {
        AdminError::Auth(_) | AdminError::Off | AdminError::NoRoute(_) => None,
        AdminError::Invalid(_) => Some("invalid server definition (see the response)".into()),
        AdminError::Scope(needed, principal) => Some(format!(
            "{principal:?}'s token does not grant the admin scope {needed}"
        )),
        e => Some(e.to_string()),
    }
}

async fn respond(gw: &Arc<Gateway>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    match handle(gw, req).await {
        Ok(resp) => resp,
        Err(e) => {
            let status = e.status();
            if let Some(line) = log_line(&e) {
                tracing::info!(%status, "admin request refused: {line}");
            }
            let mut resp = json(status, &serde_json::json!({ "error": e.to_string() }));
            match &e {
                AdminError::Auth(_) => {
                    resp.headers_mut()
                        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                AdminError::Method { allow, .. } => {
                    resp.headers_mut()
                        .insert(ALLOW, HeaderValue::from_static(allow));
                }
                _ => {}
            }
            resp
        }
    }
}

async fn handle(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, AdminError> {
    if gw.config.admin_tokens.is_empty() {
        return Err(AdminError::Off);
    }
    // (The admin API is on only with tokens: a request without one is refused here.)
    let identity = gw
        .admin_auth
        .authenticate(req.headers(), None, None)
        .await?
        .ok_or(AdminError::Auth(AuthError::Missing))?;
    if req.uri().path() == WHOAMI {
        allow(req.method(), &[Method::GET], "GET")?;
        let scopes = match &identity.grant {
            crate::auth::Grant::All => crate::config::ADMIN_SCOPES
                .iter()
                .filter(|s| !s.contains(':'))
                .map(|s| (*s).into())
                .collect(),
            crate::auth::Grant::Scopes(s) => s.to_vec(),
        };
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({"principal": &*identity.principal, "scopes": scopes}),
        ));
    }
    match needed_scope(req.uri().path(), req.method()) {
        Some(needed) if !identity.grant.lacking([needed]).is_empty() => {
            return Err(AdminError::Scope(needed, identity.principal));
        }
        // No endpoint needs no scope: a scoped token goes no further where none is.
        None if identity.grant != crate::auth::Grant::All => {
            return Err(AdminError::NoRoute(req.uri().path().to_owned()));
        }
        _ => {}
    }
    let principal = Some(identity.principal);
    if req.uri().path().starts_with(PINS) {
        return pins(gw, req, principal.as_deref().unwrap_or("-")).await;
    }
    if req.uri().path().starts_with(REGISTRY) {
        return registry(gw, req, principal.as_deref().unwrap_or("-")).await;
    }
    let read_only =
        |req: &Request<hyper::body::Incoming>| allow(req.method(), &[Method::GET], "GET");
    match req.uri().path() {
        "/admin/v1/sessions" => {
            read_only(&req)?;
            return Ok(json(StatusCode::OK, &views::sessions(gw)));
        }
        "/admin/v1/audit" => {
            read_only(&req)?;
            let (view, limit) = audit_query(req.uri().query().unwrap_or_default())?;
            let mut resp = crate::body::response(Body::full(views::audit(&gw.audit, view, limit)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(resp);
        }
        "/admin/v1/plugins" => {
            read_only(&req)?;
            return Ok(json(StatusCode::OK, &views::plugins(&gw.plugins)));
        }
        _ => {}
    }
    let Some(runtime) = gw.orchestrator.clone() else {
        return Err(AdminError::Off);
    };
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let who = principal.as_deref().unwrap_or("-");
    match parts.as_slice() {
        ["servers"] | ["servers", ""] => {
            allow(&method, &[Method::GET], "GET")?;
            let list = runtime.list().await;
            let servers: Vec<ServerView> = list
                .into_iter()
                .map(|(name, status)| view(gw, &*runtime, name, status))
                .collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "backend": runtime.kind(), "servers": servers }),
            ))
        }
        ["servers", name] => match method {
            Method::GET => {
                let status = runtime.status(name).await?;
                Ok(json(
                    StatusCode::OK,
                    &view(gw, &*runtime, name.to_string(), status),
                ))
            }
            Method::PUT => {
                let spec = spec_of(gw, req).await?;
                let _serial = gw.admin_changes.lock().await;
                kept_for_this_workload(&*runtime, name, &spec).await?;
                put(gw, &*runtime, name, spec, who, false).await
            }
            Method::DELETE => {
                configured_here(gw, name)?;
                let _serial = gw.admin_changes.lock().await;
                // Not found is said (a typo must not look like a removal).
                runtime.status(name).await?;
                runtime.remove(name).await?;
                gw.refresh_topology().await;
                tracing::info!(server = %name, by = who, "server removed through the admin API");
                Ok(empty(StatusCode::NO_CONTENT))
            }
            m => Err(AdminError::Method {
                method: m,
                allow: "GET, PUT, DELETE",
            }),
        },
        ["registry", "install"] => {
            allow(&method, &[Method::POST], "POST")?;
            install(gw, &*runtime, req, who).await
        }
        ["registry", "upgrade"] => {
            allow(&method, &[Method::POST], "POST")?;
            upgrade(gw, &*runtime, req, who).await
        }
        ["servers", name, "restart"] => {
            allow(&method, &[Method::POST], "POST")?;
            runtime.restart(name).await?;
            tracing::info!(server = %name, by = who, "server restarted through the admin API");
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "restarting": name }),
            ))
        }
        ["servers", name, "logs"] => {
            allow(&method, &[Method::GET], "GET")?;
            let opts = log_options(req.uri().query().unwrap_or_default())?;
            let text = runtime.logs(name, opts).await?;
            let mut resp = crate::body::response(Body::full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(resp)
        }
        _ => Err(AdminError::NoRoute(path)),
    }
}

/// Where the pins are.
/// The admin scope ([`crate::config::ADMIN_SCOPES`]) a request for `path` with `method`
/// needs; none where no endpoint is (refused as such).
fn needed_scope(path: &str, method: &Method) -> Option<&'static str> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let either = |reads, writes| if read { reads } else { writes };
    let parts: Vec<&str> = path
        .strip_prefix(PREFIX)?
        .trim_end_matches('/')
        .split('/')
        .collect();
    Some(match parts.as_slice() {
        ["servers", _, "restart"] => "servers:restart",
        ["servers", _, "logs"] => "servers:logs",
        ["servers", ..] => either("servers:read", "servers:write"),
        // Installing or upgrading an entry is running a server.
        ["registry", "install" | "upgrade"] => "servers:write",
        ["registry", ..] => either("registry:read", "registry:write"),
        ["sessions"] => "sessions:read",
        ["audit"] => "audit:read",
        ["plugins"] => "plugins:read",
        ["pins", ..] => either("pins:read", "pins:write"),
        _ => return None,
    })
}

/// Who the token is and what it may do: `{principal, scopes}` (every token may ask).
const WHOAMI: &str = "/admin/v1/whoami";
const PINS: &str = "/admin/v1/pins";
const REGISTRY: &str = "/admin/v1/registry/servers";

/// The registry's catalog: import (`POST`: one `server.json`, a list of them, or a page of a
/// registry's list response), replace a version (`PUT …/versions/{v}`), set its status
/// (`PATCH …/versions/{v}/status`, as the official registry), set its labels (`PUT
/// …/versions/{v}/labels`: what the registry's filters see), delete it (`DELETE`, which
/// marks it deleted, as the official registry).
async fn registry(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    who: &str,
) -> Result<Response<Body>, AdminError> {
    use crate::registry::catalog::Status;
    let Some(catalog) = gw.registry.get().cloned() else {
        return Err(AdminError::RegistryOff);
    };
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let rest = path[REGISTRY.len()..].trim_end_matches('/');
    if rest.is_empty() && (method == Method::GET || method == Method::HEAD) {
        // The list as the registry API gives it, filtered for the admin principal (what it
        // may install).
        let visible = visible_to_admin(gw, &catalog, who).await?;
        return Ok(crate::registry::api::serve(
            &catalog,
            &method,
            "/v0.1/servers",
            req.uri().query(),
            false,
            visible,
        ));
    }
    if rest.is_empty() {
        allow(&method, &[Method::POST], "GET, HEAD, POST")?;
        let body = json_body(gw, req).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let docs = match v {
            serde_json::Value::Array(docs) => docs,
            serde_json::Value::Object(mut o) if o.contains_key("servers") => {
                match o.remove("servers") {
                    Some(serde_json::Value::Array(items)) => items,
                    _ => return Err(AdminError::Invalid("servers must be a list".into())),
                }
            }
            doc => vec![doc],
        };
        let (published, skipped) = catalog.import(docs).await?;
        let status = if published.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        return Ok(json(
            status,
            &serde_json::json!({"published": published, "skipped": skipped}),
        ));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| AdminError::Invalid(format!("{s:?} is not valid percent-encoding")))
    };
    let rest = rest.trim_start_matches('/');
    // A suffix only after a version (a version may be named `status` or `labels`).
    let after_version = |t: &str| t.contains("/versions/");
    let (target, status_path) = match rest.strip_suffix("/status") {
        Some(t) if after_version(t) => (t, true),
        _ => (rest, false),
    };
    let (target, labels_path) = match target.strip_suffix("/labels") {
        Some(t) if !status_path && after_version(t) => (t, true),
        _ => (target, false),
    };
    let Some((name, version)) = target.rsplit_once("/versions/") else {
        return Err(AdminError::NoRoute(path.clone()));
    };
    let (name, version) = (decode(name)?, decode(version)?);
    // A version the registry's filters hide from `who` is absent to its changes too, as to
    // its reads: it may not label one approved for itself, nor read one back through the
    // answer. Each change finds the version after reading its input, as for an absent one, so
    // that no answer tells a hidden version from an absent one.
    let visible = visible_to_admin(gw, &catalog, who).await?;
    if labels_path {
        allow(&method, &[Method::PUT], "PUT")?;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Labels {
            labels: std::collections::BTreeMap<String, String>,
        }
        let body = json_body(gw, req).await?;
        let l: Labels =
            serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
        tracing::info!(entry = %name, %version, labels = ?l.labels, by = who, "labelling a registry entry");
        catalog
            .set_labels(&name, &version, l.labels, &visible)
            .await?;
        let (server, meta) = catalog.version_seen(&name, &version, true, &visible)?;
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({"server": server, "_meta": meta}),
        ));
    }
    match (status_path, &method) {
        (true, &Method::PATCH) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields, rename_all = "camelCase")]
            struct Change {
                status: Status,
                #[serde(default)]
                status_message: Option<String>,
            }
            let body = json_body(gw, req).await?;
            let c: Change =
                serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
            catalog
                .set_status(&name, &version, c.status, c.status_message, &visible)
                .await?;
        }
        (true, _) => {
            return Err(AdminError::Method {
                method,
                allow: "PATCH",
            });
        }
        (false, &Method::PUT) => {
            let body = json_body(gw, req).await?;
            let doc: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
            catalog.replace(&name, &version, doc, &visible).await?;
        }
        (false, &Method::DELETE) => {
            catalog
                .set_status(&name, &version, Status::Deleted, None, &visible)
                .await?;
        }
        (false, _) => {
            return Err(AdminError::Method {
                method,
                allow: "PUT, DELETE",
            });
        }
    }
    let (server, meta) = catalog.version_seen(&name, &version, true, &visible)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"server": server, "_meta": meta}),
    ))
}

/// The pins: every tool's approved definition, what waits, and approvals.
async fn pins(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    who: &str,
) -> Result<Response<Body>, AdminError> {
    let Some(pins) = gw.pins.clone() else {
        return Err(AdminError::PinningOff);
    };
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match path.trim_end_matches('/') {
        PINS => {
            allow(&method, &[Method::GET], "GET")?;
            let mut out = Vec::new();
            for (server, tools) in pins.list() {
                for (tool, pin) in tools {
                    let state = match (&pin.approved, &pin.waiting) {
                        (_, None) => "approved",
                        (Some(_), Some(_)) => "changed",
                        (None, Some(_)) => "new",
                    };
                    let changed = match (&pin.approved, &pin.waiting) {
                        (Some(a), Some(w)) => {
                            crate::pins::changed_fields(&a.definition, &w.definition)
                        }
                        _ => Vec::new(),
                    };
                    out.push(serde_json::json!({
                        "server": server, "tool": tool, "state": state,
                        "changed_fields": changed,
                        "approved": pin.approved, "waiting": pin.waiting,
                    }));
                }
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "blocking": pins.blocks(),
                    "unapproved": pins.unapproved(),
                    "pins": out,
                }),
            ))
        }
        "/admin/v1/pins/approve" => {
            allow(&method, &[Method::POST], "POST")?;
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Approve {
                server: String,
                tool: String,
                /// The digest of the definition the operator reviewed (required: what waits
                /// may have changed again since).
                digest: String,
            }
            let body = json_body(gw, req).await?;
            let a: Approve =
                serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
            let pin = pins
                .approve(
                    &a.server,
                    &a.tool,
                    Some(&a.digest),
                    who,
                    &gw.audit,
                    &gw.metrics,
                )
                .await?;
            tracing::info!(server = %a.server, tool = %a.tool, by = who, "tool definition approved through the admin API");
            Ok(json(StatusCode::OK, &pin))
        }
        _ => Err(AdminError::NoRoute(path)),
    }
}

async fn put(
    gw: &Arc<Gateway>,
    runtime: &dyn Runtime,
    name: &str,
    spec: McpServerSpec,
    who: &str,
    new_only: bool,
) -> Result<Response<Body>, AdminError> {
    configured_here(gw, name)?;
    // An admin may run a server but not read the gateway's own environment through it.
    if let Some((i, _)) = spec
        .env
        .iter()
        .enumerate()
        .find(|(_, e)| e.secret_from_env.is_some())
    {
        return Err(AdminError::Invalid(format!(
            "env[{i}].secretFromEnv: only the config file may read the gateway's environment; send secretValue"
        )));
    }
    let def = ServerDef {
        name: name.to_owned(),
        spec: spec.clone(),
    };
    let existed = runtime.status(name).await.is_ok();
    match new_only {
        true => runtime.declare_new(def).await.map_err(|e| match e {
            crate::orchestrator::OrchestratorError::Exists(name) => AdminError::Installed(name),
            e => e.into(),
        })?,
        false => runtime.declare(def).await?,
    }
    gw.refresh_topology().await;
    gw.defined(name, spec, existed).await;
    tracing::info!(server = %name, by = who, existed, "server applied through the admin API");
    let status = runtime.status(name).await?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json(code, &view(gw, runtime, name.to_owned(), status)))
}

/// Installs a catalog entry: its package, with the installer's values, becomes a server
/// the orchestrator runs (see `registry::install`). Refused, with nothing changed, when the
/// entry or a value is wrong, the version is deprecated, or the name is taken.
async fn install(
    gw: &Arc<Gateway>,
    runtime: &dyn Runtime,
    req: Request<hyper::body::Incoming>,
    who: &str,
) -> Result<Response<Body>, AdminError> {
    use crate::registry::install;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Install {
        /// The entry's name (`io.github.x/y`).
        entry: String,
        /// Its version (default `latest`).
        #[serde(default)]
        version: Option<String>,
        /// The server's name behind the gateway.
        #[serde(default)]
        name: Option<String>,
        /// Which of the entry's packages.
        #[serde(default)]
        package: Option<usize>,
        /// Which of the entry's remotes (instead of a package).
        #[serde(default)]
        remote: Option<usize>,
        /// Values of its environment variables.
        #[serde(default)]
        values: std::collections::BTreeMap<String, String>,
    }
    let Some(catalog) = gw.registry.get().cloned() else {
        return Err(AdminError::RegistryOff);
    };
    let body = json_body(gw, req).await?;
    let ask: Install =
        serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let server = installable(gw, &catalog, who, &ask.entry, ask.version.as_deref()).await?;
    let request = install::Request {
        name: ask.name,
        package: ask.package,
        remote: ask.remote,
        values: ask.values,
    };
    let def = install::plan(
        &server,
        &request,
        &install::Runners::of(&gw.config.registry),
    )
    .map_err(|e| AdminError::Invalid(e.to_string()))?;
    configured_here(gw, &def.name)?;
    // Two installs under one name: the second is refused, not applied over the first.
    let _serial = gw.admin_changes.lock().await;
    if runtime.status(&def.name).await.is_ok() {
        return Err(AdminError::Installed(def.name));
    }
    tracing::info!(server = %def.name, entry = %ask.entry, version = %server["version"], by = who, "installing a registry entry");
    // No other replica's install of that name is replaced either.
    put(gw, runtime, &def.name, def.spec, who, true).await
}

/// The catalog entries the registry's filters show the admin principal `who`.
async fn visible_to_admin(
    gw: &Gateway,
    catalog: &crate::registry::Catalog,
    who: &str,
) -> Result<crate::registry::visibility::Visible, AdminError> {
    use crate::registry::visibility;
    let caller = visibility::Caller {
        principal: Some(who),
        ..Default::default()
    };
    visibility::visible(&gw.plugins, catalog, caller)
        .await
        .map_err(|d| {
            // The plugin's fault is the operator's log's, as on the public registry API.
            tracing::warn!("registry filter failed, nothing shown: {d}");
            AdminError::Filter
        })
}

/// A version of a catalog entry that may be installed (`latest` by default): not deprecated
/// (nor deleted, which the catalog does not give).
async fn installable(
    gw: &Gateway,
    catalog: &crate::registry::Catalog,
    who: &str,
    entry: &str,
    version: Option<&str>,
) -> Result<serde_json::Value, AdminError> {
    // As the admin sees the catalog: `latest` is the latest it sees, and a version or entry
    // the filters hide from it is absent, as on the registry API (neither its number nor
    // that it exists is told).
    let visible = visible_to_admin(gw, catalog, who).await?;
    let (server, meta) =
        catalog.version_seen(entry, version.unwrap_or("latest"), false, &visible)?;
    let official = &meta[crate::registry::catalog::OFFICIAL_META];
    if official["status"] == "deprecated" {
        return Err(AdminError::Invalid(format!(
            "{entry} {} is deprecated{}; install another version",
            server["version"].as_str().unwrap_or_default(),
            official["statusMessage"]
                .as_str()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        )));
    }
    Ok(server)
}

/// Upgrades an installed server to another version of its entry (`latest` by default), with
/// the values it was installed with (those the new version still declares). What the
/// operator changed since (resources, idle, egress...) is kept.
async fn upgrade(
    gw: &Arc<Gateway>,
    runtime: &dyn Runtime,
    req: Request<hyper::body::Incoming>,
    who: &str,
) -> Result<Response<Body>, AdminError> {
    use crate::registry::install;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Upgrade {
        /// The installed server's name.
        name: String,
        /// The version to run (default `latest`).
        #[serde(default)]
        version: Option<String>,
    }
    let Some(catalog) = gw.registry.get().cloned() else {
        return Err(AdminError::RegistryOff);
    };
    let body = json_body(gw, req).await?;
    let ask: Upgrade =
        serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))?;
    configured_here(gw, &ask.name)?;
    let _serial = gw.admin_changes.lock().await;
    runtime.status(&ask.name).await?;
    // The backend's (an McpServer resource: the same for every replica, and it outlives
    // the gateway that made it), else this gateway's own record.
    let current = match runtime.definition(&ask.name).await {
        Some(d) => {
            // Anyone who may edit the resource may have: only what its values were given for
            // is upgraded with them.
            values_given_for(runtime, &ask.name, &d).await?;
            d
        }
        None => gw.definition(&ask.name).ok_or_else(|| {
            AdminError::Invalid(format!(
                "the definition of {:?} was not made through the admin API: install it again",
                ask.name
            ))
        })?,
    };
    let Some(source) = current.registry.clone() else {
        return Err(AdminError::Invalid(format!(
            "{:?} was not installed from the registry",
            ask.name
        )));
    };
    let server = installable(gw, &catalog, who, &source.entry, ask.version.as_deref()).await?;
    // `latest` is the latest this admin sees, which may be older than what runs (a newer
    // version hidden from it): an upgrade never goes back unless a version is named.
    let target = server["version"].as_str().unwrap_or_default();
    let older = match (
        semver::Version::parse(target),
        semver::Version::parse(&source.version),
    ) {
        (Ok(to), Ok(from)) => to < from,
        // Not both semantic versions: only the catalog's own latest is surely no older.
        _ => {
            target != source.version
                && catalog
                    .version(&source.entry, "latest", false)
                    .map_or(true, |(latest, _)| latest["version"] != target)
        }
    };
    if ask.version.is_none() && older {
        return Err(AdminError::Invalid(format!(
            "the latest version of {} you see is {target}, not newer than {} which {:?} runs: name the version to go to it",
            source.entry, source.version, ask.name
        )));
    }
    let old = catalog
        .version(&source.entry, &source.version, true)
        .ok()
        .map(|(doc, _)| doc);
    let spec = install::upgrade(
        &current,
        old.as_ref(),
        &server,
        &install::Runners::of(&gw.config.registry),
    )
    .map_err(|e| AdminError::Invalid(format!("the new version cannot run as installed: {e}")))?;
    tracing::info!(server = %ask.name, entry = %source.entry, from = %source.version, to = %server["version"], by = who, "upgrading an installed server");
    put(gw, runtime, &ask.name, spec, who, false).await
}

/// Refuses an upgrade of server `name` from `current` (its `McpServer` as read now) when its
/// values Secret was given for another workload than `current` runs: someone who may edit
/// McpServers but not read Secrets (a variable like NODE_OPTIONS, egress, a service account,
/// another entry) would otherwise have the upgrade carry the stored values into their edit
/// and mark them as given for it, which the backend then runs.
async fn values_given_for(
    runtime: &dyn Runtime,
    name: &str,
    current: &McpServerSpec,
) -> Result<(), AdminError> {
    use crate::orchestrator::kubernetes::{VALUES_ENTRY_ANNOTATION, VALUES_FOR_ANNOTATION};
    // Nothing stored, nothing carried (plain values are in the resource for all to read).
    if current.stored_secret_names().is_empty() || runtime.cluster().is_none() {
        return Ok(());
    }
    let secret = values_secret(runtime, name).await?;
    // No mark (nor Secret) vouches for nothing: the values are given again.
    let given_for = secret
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(VALUES_FOR_ANNOTATION));
    if given_for.map(String::as_str) != Some(current.workload_digest().as_str()) {
        return Err(AdminError::ValuesGivenForAnother(name.to_owned()));
    }
    // The entry is not part of what runs, but it chooses what the upgrade runs next (another
    // entry may list the same package with variables of its own).
    let given_entry = secret
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(VALUES_ENTRY_ANNOTATION));
    if let Some(source) = &current.registry
        && given_entry != Some(&source.entry)
    {
        return Err(AdminError::ValuesGivenForAnother(name.to_owned()));
    }
    Ok(())
}

/// Server `name`'s values Secret as the cluster holds it now (`None` without a cluster, where
/// the values are this process's own, or without such a Secret).
async fn values_secret(
    runtime: &dyn Runtime,
    name: &str,
) -> Result<Option<k8s_openapi::api::core::v1::Secret>, AdminError> {
    let Some((client, namespace)) = runtime.cluster() else {
        return Ok(None);
    };
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, &namespace);
    let secret_name = crate::orchestrator::spec::values_secret_name(name);
    Ok(secrets
        .get_opt(&secret_name)
        .await
        .map_err(|e| OrchestratorError::kube(format!("read the stored secrets of {name}"), e))?)
}

/// Refuses a definition of server `name` that keeps stored values (a `storedSecret` given no
/// `secretValue` now) for another workload than they were given for: a caller who may define
/// servers but not read Secrets cannot have another image or command run with them, as an
/// edit of the resource behind the gateway's back cannot. (An upgrade checks the values
/// against the definition it upgrades, and runs what the registry says the entry runs.)
async fn kept_for_this_workload(
    runtime: &dyn Runtime,
    name: &str,
    spec: &McpServerSpec,
) -> Result<(), AdminError> {
    use crate::orchestrator::kubernetes::{VALUES_ENTRY_ANNOTATION, VALUES_FOR_ANNOTATION};
    let (bare, values) = spec.clone().without_secret_values();
    // A remote's kept values are bound to its origin by the backend.
    let keeps = bare.remote.is_none()
        && bare
            .stored_secret_names()
            .iter()
            .any(|k| !values.contains_key(k));
    if !keeps {
        return Ok(());
    }
    let secret = values_secret(runtime, name).await?;
    let secret_name = crate::orchestrator::spec::values_secret_name(name);
    // No Secret of the server's: the backend says why no value is kept (none given, or a
    // Secret of that name someone else made). One of its own without a mark vouches for
    // nothing.
    let Some(secret) = secret.filter(|s| crate::orchestrator::kubernetes::is_values_of(s, name))
    else {
        return Ok(());
    };
    let annotations = secret.metadata.annotations.unwrap_or_default();
    let again = |what: &str| {
        Err(OrchestratorError::Conflict(format!(
            "{secret_name} holds secrets given for another {what} than this definition: give them again (secretValue)"
        ))
        .into())
    };
    if annotations.get(VALUES_FOR_ANNOTATION) != Some(&bare.workload_digest()) {
        return again("image, command, arguments, environment or egress");
    }
    // The entry chooses what a later upgrade runs with them.
    if annotations.get(VALUES_ENTRY_ANNOTATION) != bare.registry.as_ref().map(|r| &r.entry) {
        return again("registry entry");
    }
    Ok(())
}

async fn spec_of(
    gw: &Gateway,
    req: Request<hyper::body::Incoming>,
) -> Result<McpServerSpec, AdminError> {
    let body = json_body(gw, req).await?;
    serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(e.to_string()))
}

/// A JSON request body, within the body limits.
async fn json_body(gw: &Gateway, req: Request<hyper::body::Incoming>) -> Result<Bytes, AdminError> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(AdminError::ContentType);
    }
    read_trusted_body(gw, req).await.map_err(AdminError::Body)
}

fn configured_here(gw: &Gateway, name: &str) -> Result<(), AdminError> {
    if gw.config.upstreams.iter().any(|u| u.name == name) {
        return Err(AdminError::Configured(name.to_owned()));
    }
    Ok(())
}

fn view(gw: &Gateway, runtime: &dyn Runtime, name: String, status: ServerStatus) -> ServerView {
    let source = if gw.config.upstreams.iter().any(|u| u.name == name) {
        "config"
    } else {
        "runtime"
    };
    ServerView {
        egress: runtime.egress(&name),
        installed: gw.definition(&name).and_then(|d| d.registry),
        name,
        source,
        status,
    }
}

fn allow(method: &Method, allowed: &[Method], allow: &'static str) -> Result<(), AdminError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(AdminError::Method {
            method: method.clone(),
            allow,
        })
    }
}

fn log_options(query: &str) -> Result<LogOptions, AdminError> {
    let mut opts = LogOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "previous" => {
                opts.previous = match v {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(AdminError::Invalid(format!(
                            "previous={v:?}: expected true or false"
                        )));
                    }
                }
            }
            "tail" => {
                opts.tail_lines = Some(v.parse().map_err(|_| {
                    AdminError::Invalid(format!("tail={v:?}: expected a number of lines"))
                })?)
            }
            other => {
                return Err(AdminError::Invalid(format!(
                    "unknown query parameter {other:?} (expected previous, tail)"
                )));
            }
        }
    }
    Ok(opts)
}

/// `only=decisions` and `limit=N` (100 by default, at most what is kept) of the audit view.
fn audit_query(query: &str) -> Result<(crate::audit::View, usize), AdminError> {
    use crate::audit::View;
    let mut limit = 100;
    let mut view = View::All;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("only", "decisions")) => view = View::Decisions,
            Some(("only", v)) => {
                return Err(AdminError::Invalid(format!(
                    "only={v:?}: expected decisions"
                )));
            }
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=crate::audit::RECENT).contains(n))
                    .ok_or_else(|| {
                        AdminError::Invalid(format!(
                            "limit={v:?}: expected a number from 1 to {}",
                            crate::audit::RECENT
                        ))
                    })?;
            }
            _ => {
                return Err(AdminError::Invalid(format!(
                    "unknown query parameter {pair:?} (expected limit, only)"
                )));
            }
        }
    }
    Ok((view, limit))
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut resp = crate::body::response(Body::full(
        serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = crate::body::response(Body::full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_needs_a_scope_the_configuration_knows() {
        let endpoints = [
            ("GET", "/admin/v1/servers", "servers:read"),
            ("GET", "/admin/v1/servers/", "servers:read"),
            ("GET", "/admin/v1/servers/a", "servers:read"),
            ("PUT", "/admin/v1/servers/a", "servers:write"),
            ("DELETE", "/admin/v1/servers/a", "servers:write"),
            ("POST", "/admin/v1/servers/a/restart", "servers:restart"),
            ("GET", "/admin/v1/servers/a/logs", "servers:logs"),
            ("GET", "/admin/v1/sessions", "sessions:read"),
            ("GET", "/admin/v1/audit", "audit:read"),
            ("GET", "/admin/v1/plugins", "plugins:read"),
            ("POST", "/admin/v1/registry/install", "servers:write"),
            ("POST", "/admin/v1/registry/upgrade", "servers:write"),
            ("GET", "/admin/v1/registry/servers", "registry:read"),
            ("HEAD", "/admin/v1/registry/servers", "registry:read"),
            ("POST", "/admin/v1/registry/servers", "registry:write"),
            (
                "PUT",
                "/admin/v1/registry/servers/a/versions/1/labels",
                "registry:write",
            ),
            ("GET", "/admin/v1/pins", "pins:read"),
            ("POST", "/admin/v1/pins/approve", "pins:write"),
        ];
        for (method, path, scope) in endpoints {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(needed_scope(path, &method), Some(scope), "{method} {path}");
            assert!(crate::config::ADMIN_SCOPES.contains(&scope), "{scope}");
        }
        assert_eq!(needed_scope("/admin/v1/nothing", &Method::GET), None);
        assert_eq!(needed_scope("/elsewhere", &Method::GET), None);
    }

    #[test]
    fn the_log_never_repeats_what_a_body_said() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct EnvVar {
            name: String,
        }
        // A secret given where a structure was expected, as serde quotes it.
        let said = serde_json::from_str::<Vec<EnvVar>>(r#"["API_KEY=sk-live-123"]"#)
            .unwrap_err()
            .to_string();
        assert!(said.contains("sk-live-123"), "{said}");
        let e = AdminError::Invalid(said);
        assert!(e.to_string().contains("sk-live-123"), "the caller hears it");
        let line = log_line(&e).unwrap();
        assert!(!line.contains("sk-live-123"), "{line}");
        assert_eq!(log_line(&AdminError::Off), None);
        let other = AdminError::ContentType;
        assert_eq!(log_line(&other), Some(other.to_string()));
    }
}
