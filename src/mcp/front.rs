//! The MCP Streamable HTTP front: transport rules for POST, GET and DELETE on the MCP endpoint.
//!
//! Checks run in order: Host/Origin (DNS rebinding), authentication, method, media types,
//! protocol version, body limits, JSON-RPC envelope, session. Every refusal is one
//! [`FrontError`], turned into an HTTP status and a JSON-RPC error body in one place.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CONTENT_TYPE, HOST, HeaderValue, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::auth::{AuthError, Identity, Principal};
use crate::body::{Body, response};
use crate::body_room::{BodyRoom, Full, Room};
use crate::config::Config;
use crate::config::profiles::ProfileConfig;
use crate::gateway::Gateway;
use crate::mcp::handler::{self, Reply};
use crate::mcp::jsonrpc::{self, Kind, ParseError, code};
use crate::mcp::revision;
use crate::mcp::session::Session;
use crate::mcp::stateless;

/// The header that carries a session id.
// Names built once: a `&str` name is parsed again on every lookup.
pub(crate) const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
const VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// Why the front refused a request.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// `Host` is not one this gateway answers to (DNS rebinding).
    #[error("Host header {0:?} is not allowed")]
    Host(String),
    /// More than one `Host` header: which one the request means is ambiguous.
    #[error("request has {0} Host headers; send exactly one")]
    DuplicateHost(usize),
    /// An absolute-form target (or HTTP/2 `:authority`) names another host than `Host`.
    #[error("request target authority {target:?} does not match Host header {host:?}")]
    AuthorityMismatch {
        /// The authority in the request target.
        target: String,
        /// The `Host` header.
        host: String,
    },
    /// `Origin` is not allowed.
    #[error("Origin {0:?} is not allowed")]
    Origin(String),
    /// Authentication failed.
    #[error("unauthorized: {0}")]
    Auth(#[from] AuthError),
    /// The caller is not granted this endpoint.
    #[error("forbidden: {0} is not granted to this caller")]
    NotGranted(String),
    /// Not POST, GET or DELETE.
    #[error("method {0} is not allowed; use POST, GET or DELETE")]
    Method(Method),
    /// POST without `Content-Type: application/json`.
    #[error("Content-Type must be application/json")]
    ContentType,
    /// `Accept` lacks what the response needs.
    #[error("Accept must include {0}")]
    Accept(&'static str),
    /// Unsupported `MCP-Protocol-Version`.
    #[error("unsupported MCP-Protocol-Version {0:?}; supported: {versions}", versions = revision::SUPPORTED.join(", "))]
    Version(String),
    /// Body over the limit.
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// Body not received in time.
    #[error("request body not received within the time limit")]
    BodyTimeout,
    /// Other bodies hold the room bodies may take (`mcp.max_bodies_bytes`).
    #[error("the gateway holds as many request bodies as it may at once; try again shortly")]
    BodiesBusy,
    /// The caller's other bodies hold its share of that room.
    #[error(
        "this caller's requests hold as much body as one caller may at once ({0} bytes of mcp.max_bodies_bytes); try again when they end"
    )]
    CallerBodiesBusy(usize),
    /// Body could not be read.
    #[error("cannot read request body: {0}")]
    Body(String),
    /// Not a single JSON-RPC message.
    #[error("{0}")]
    Parse(#[from] ParseError),
    /// No session header on a request that needs one.
    #[error("Mcp-Session-Id header is required")]
    MissingSession,
    /// Session unknown, expired or deleted.
    #[error("session not found")]
    UnknownSession,
    /// Session cap reached.
    #[error("too many sessions; try again later")]
    TooManySessions,
    /// The principal already has as many sessions as it may.
    #[error("too many open sessions for this principal (at most {0}); end one with DELETE first")]
    TooManySessionsForPrincipal(usize),
    /// A second GET stream on one session.
    #[error("a GET stream is already open for this session")]
    StreamOpen,
    /// A POST to the HTTP+SSE message URL without its stream's id.
    #[error("the sessionId query parameter is required (the URL the endpoint event named)")]
    MissingStreamId,
    /// An HTTP+SSE client has as many requests waiting for their answers as it may.
    #[error(
        "too many requests waiting for this stream to take their answers (at most {0}); read the stream"
    )]
    StreamBusy(usize),
    /// `initialize` params were malformed.
    #[error("invalid initialize params: {0}")]
    Initialize(String),
    /// A `Last-Event-ID` that names no stream this session can resume.
    #[error(transparent)]
    Resume(#[from] crate::mcp::resume::ResumeError),
}

impl FrontError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            FrontError::Host(_) => StatusCode::MISDIRECTED_REQUEST,
            FrontError::Origin(_) | FrontError::NotGranted(_) => StatusCode::FORBIDDEN,
            FrontError::Auth(a) if a.is_forbidden() => StatusCode::FORBIDDEN,
            FrontError::Auth(_) => StatusCode::UNAUTHORIZED,
            FrontError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            FrontError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            FrontError::Accept(_) => StatusCode::NOT_ACCEPTABLE,
            FrontError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            FrontError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            FrontError::UnknownSession => StatusCode::NOT_FOUND,
            FrontError::TooManySessions | FrontError::BodiesBusy => StatusCode::SERVICE_UNAVAILABLE,
            FrontError::TooManySessionsForPrincipal(_)
            | FrontError::StreamBusy(_)
            | FrontError::CallerBodiesBusy(_) => StatusCode::TOO_MANY_REQUESTS,
            FrontError::StreamOpen => StatusCode::CONFLICT,
            FrontError::Version(_)
            | FrontError::DuplicateHost(_)
            | FrontError::AuthorityMismatch { .. }
            | FrontError::Body(_)
            | FrontError::Parse(_)
            | FrontError::MissingSession
            | FrontError::MissingStreamId
            | FrontError::Resume(_)
            | FrontError::Initialize(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn code(&self) -> i64 {
        match self {
            FrontError::Parse(p) => p.code(),
            FrontError::Initialize(_) => code::INVALID_PARAMS,
            FrontError::MissingSession
            | FrontError::MissingStreamId
            | FrontError::Version(_)
            | FrontError::Body(_) => code::INVALID_REQUEST,
            FrontError::StreamBusy(_)
            | FrontError::BodiesBusy
            | FrontError::CallerBodiesBusy(_) => code::TOO_BUSY,
            FrontError::Resume(_) => code::INVALID_REQUEST,
            _ => -32000,
        }
    }

    /// The HTTP response for this refusal, with a JSON-RPC error body.
    pub fn into_response(self, id: Option<&[u8]>) -> Response<Body> {
        let mut resp = json_response(
            self.status(),
            jsonrpc::error_response(id, self.code(), &self.to_string()),
        );
        match self {
            FrontError::Auth(_) => {
                resp.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            FrontError::Method(_) => {
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            }
            FrontError::BodiesBusy | FrontError::CallerBodiesBusy(_) => {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

pub(crate) use crate::body::{accepted, json_response, sse_response};

/// Serves the MCP endpoint: `/mcp` itself, or a profile's (`/mcp/{profile}`).
pub async fn serve(
    gw: Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    profile: Option<&Arc<ProfileConfig>>,
) -> Response<Body> {
    match route(&gw, req, profile).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("refused MCP request: {e}");
            if let FrontError::Auth(a) = &e {
                audit_refusal(&gw, None, &a.to_string());
            }
            refusal(&gw, e, None, profile.map(|p| p.name.as_str()))
        }
    }
}

/// Admits a request to another endpoint `/mcp`'s callers may read (the registry's API) as
/// `/mcp` admits it: Host and Origin (DNS rebinding), authentication (a bearer token or the
/// connection's client certificate), and `/mcp`'s grant; a refusal is audited, and comes back
/// as its status, message and challenge.
pub(crate) async fn admit_reader<B>(
    gw: &Gateway,
    req: &Request<B>,
    profile: Option<&ProfileConfig>,
) -> Result<Option<crate::auth::Identity>, (StatusCode, String, Option<HeaderValue>)> {
    let refused = |e: FrontError| {
        let challenge = match &e {
            FrontError::Auth(a) => Some(gw.auth.challenge(a, profile.map(|p| p.name.as_str()))),
            _ => None,
        };
        (e.status(), e.to_string(), challenge)
    };
    let authority = request_authority(req).map_err(refused)?;
    check_host_and_origin(&gw.config, authority, req.headers()).map_err(refused)?;
    let identity = match gw
        .auth
        .authenticate(
            req.headers(),
            profile.map(|p| p.name.as_str()),
            certificate_of(req),
        )
        .await
    {
        Ok(i) => i,
        Err(e) => {
            audit_refusal(gw, None, &e.to_string());
            return Err(refused(FrontError::Auth(e)));
        }
    };
    if let Err(e) = check_access(gw, profile, identity.as_ref()) {
        let known = identity.as_ref().map(|i| (i.principal.clone(), ""));
        audit_refusal(gw, known, &e.to_string());
        return Err(refused(e));
    }
    Ok(identity)
}

/// The principal of the request's connection's client certificate, if it has one.
pub(crate) fn certificate_of<B>(req: &Request<B>) -> Option<&Principal> {
    req.extensions()
        .get::<crate::tls::ClientCertificate>()
        .and_then(|c| c.0.as_ref())
}

/// Refuses a caller the endpoint of `profile` (`None`: `/mcp`) is not granted to. An access
/// token that would be granted with more scopes is asked to step up.
pub(crate) fn check_access(
    gw: &Gateway,
    profile: Option<&ProfileConfig>,
    identity: Option<&Identity>,
) -> Result<(), FrontError> {
    let grantees = gw.grantees(profile);
    let none = crate::auth::Claims::default();
    let (principal, claims) = match identity {
        Some(i) => (Some(&*i.principal), &*i.claims),
        None => (None, &none),
    };
    if grantees.admits(principal, claims) {
        return Ok(());
    }
    let access_token = identity.is_some_and(|i| matches!(i.grant, crate::auth::Grant::Scopes(_)));
    if access_token && !grantees.scopes.is_empty() {
        let mut needed = gw
            .config
            .oauth
            .as_ref()
            .map_or_else(Vec::new, |o| o.required_scopes.clone());
        needed.extend(grantees.scopes.iter().cloned());
        return Err(FrontError::Auth(AuthError::InsufficientScope(needed)));
    }
    Err(FrontError::NotGranted(match profile {
        Some(p) => format!("profile {:?}", p.name),
        None => {
            format!("{MCP_ENDPOINT} (every server; use the endpoint of a profile granted to you)")
        }
    }))
}

const MCP_ENDPOINT: &str = "/mcp";

/// Records an authentication or scope refusal in the audit trail (the principal and method
/// when known).
pub(crate) fn audit_refusal(gw: &Gateway, known: Option<(Principal, &str)>, e: &str) {
    if !gw.audit.is_on() {
        return;
    }
    let event = |principal, method| crate::audit::Event {
        kind: "denial",
        principal,
        method,
        decision: "denied",
        by: Some("auth"),
        outcome: Some(e),
        ..Default::default()
    };
    match known {
        Some((p, m)) => gw.audit.record(event(Some(&p), m)),
        // Anyone can cause these: bounded, so a flood cannot rotate the history away.
        None => gw.audit.record_unauthenticated(event(None, "")),
    }
}

/// The response to a refused request; an authentication refusal carries the challenge that
/// tells the client how to get a token that will do (RFC 6750, RFC 9728).
pub(crate) fn refusal(
    gw: &Gateway,
    e: FrontError,
    id: Option<&[u8]>,
    profile: Option<&str>,
) -> Response<Body> {
    let challenge = match &e {
        FrontError::Auth(a) => Some(gw.auth.challenge(a, profile)),
        _ => None,
    };
    let mut resp = e.into_response(id);
    if let Some(c) = challenge {
        resp.headers_mut().insert(WWW_AUTHENTICATE, c);
    }
    resp
}

async fn route(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    profile: Option<&Arc<ProfileConfig>>,
) -> Result<Response<Body>, FrontError> {
    // First: the listener leaves this check of `/mcp` to us.
    let authority = request_authority(&req)?;
    check_host_and_origin(&gw.config, authority, req.headers())?;
    let name = profile.map(|p| p.name.as_str());
    let identity = gw
        .auth
        .authenticate(req.headers(), name, certificate_of(&req))
        .await?;
    if let Err(e) = check_access(gw, profile.map(|p| &**p), identity.as_ref()) {
        tracing::debug!("refused MCP request: {e}");
        let known = identity.as_ref().map(|i| (i.principal.clone(), ""));
        audit_refusal(gw, known, &e.to_string());
        return Ok(refusal(gw, e, None, name));
    }
    let principal = identity.as_ref().map(|i| i.principal.clone());
    match *req.method() {
        Method::POST => post(gw, identity.as_ref(), principal, profile, req).await,
        Method::GET => get(gw, principal, profile, req.headers()).await,
        Method::DELETE => delete(gw, principal, profile, req.headers()).await,
        ref m => Err(FrontError::Method(m.clone())),
    }
}

/// The authority a request is addressed to, after checking the request agrees with itself.
///
/// An absolute-form target (`POST http://host/mcp`, HTTP/1) or an HTTP/2 `:authority` names the
/// host in the URI; it must then equal `Host` when one is sent (RFC 9112 §3.2.2 lets the target win,
/// RFC 9113 §8.3.1 calls a difference malformed: refusing is the strict reading of both). Two `Host`
/// headers are refused (RFC 9112 §3.2). The authority then goes through the ordinary Host rules.
pub fn request_authority<B>(req: &Request<B>) -> Result<Option<&str>, FrontError> {
    let all = req.headers().get_all(HOST);
    let mut values = all.iter();
    let host = values.next().map(|h| h.to_str().unwrap_or(""));
    if values.next().is_some() {
        return Err(FrontError::DuplicateHost(all.iter().count()));
    }
    // `http://h/` and `Host: h:80` name the same authority (RFC 9110 §4.2.3).
    let default_port = match req.uri().scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => ":443",
        _ => ":80",
    };
    let normal = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        match a.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => a,
        }
    };
    match (req.uri().authority(), host) {
        (Some(target), Some(host)) if normal(target.as_str()) != normal(host) => {
            Err(FrontError::AuthorityMismatch {
                target: target.as_str().to_owned(),
                host: host.to_owned(),
            })
        }
        (Some(target), _) => Ok(Some(target.as_str())),
        (None, host) => Ok(host),
    }
}

/// The host of a plain `host[:port]` authority (a `Host` header, an origin after its scheme):
/// "[::1]:9000" → "[::1]". `None` for anything else: userinfo would hide the real host
/// ("localhost:@evil.com" names evil.com), and a port must be digits.
fn hostname(authority: &str) -> Option<&str> {
    if let Some(host) = plain_hostname(authority) {
        return Some(host);
    }
    let parsed: http::uri::Authority = authority.parse().ok()?;
    let port = authority.strip_prefix(parsed.host())?;
    let plain = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
    plain.then(|| &authority[..parsed.host().len()])
}

/// The host of `name` or `name:digits` where the name is letters, digits, dots and hyphens
/// only (what nearly every `Host` header is): what [`hostname`] answers for it, without the
/// copy and scan of a full authority parse. `None` means "parse it fully", not "refused".
fn plain_hostname(authority: &str) -> Option<&str> {
    // Byte by byte, in one pass: these are a few bytes long, shorter than a searcher's setup.
    let bytes = authority.as_bytes();
    let colon = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
    let (host, port) = bytes.split_at(colon);
    let name = |&b: &u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let digits = port.get(1..).unwrap_or_default();
    (!host.is_empty() && host.iter().all(name) && digits.iter().all(u8::is_ascii_digit))
        .then(|| &authority[..colon])
}

fn is_loopback_name(host: &str) -> bool {
    // The usual spelling first, without parsing it as an address.
    host == "127.0.0.1"
        || host.eq_ignore_ascii_case("localhost")
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a `Host` (or request-target authority) or `Origin` this gateway does not answer to
/// (DNS rebinding).
pub fn check_host_and_origin(
    config: &Config,
    authority: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), FrontError> {
    let mcp = &config.mcp;
    let loopback = config.listen.ip().is_loopback();
    if loopback || !mcp.allowed_hosts.is_empty() {
        let host = authority.unwrap_or("");
        let name = hostname(host);
        let ok = (loopback && name.is_some_and(is_loopback_name))
            || mcp.allowed_hosts.iter().any(|h| {
                h.eq_ignore_ascii_case(host) || name.is_some_and(|n| h.eq_ignore_ascii_case(n))
            });
        if !ok {
            return Err(FrontError::Host(host.to_owned()));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let explicitly = mcp
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin));
        let local = loopback
            && origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .and_then(hostname)
                .is_some_and(is_loopback_name);
        if !(explicitly || local) {
            return Err(FrontError::Origin(origin.to_owned()));
        }
    }
    Ok(())
}

/// Whether a `Content-Type` says JSON.
pub(crate) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type.is_some_and(|v| media_type(v.as_bytes()).eq_ignore_ascii_case(b"application/json"))
}

/// The media type (or range) of a `Content-Type` or of one element of an `Accept` list: its
/// parameters (after `;`) and the spaces around it left out.
fn media_type(element: &[u8]) -> &[u8] {
    let end = element
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(element.len());
    element[..end].trim_ascii()
}

/// The headers a POST's checks read, found in one pass over its headers: a look-up hashes
/// the name it looks for, and a request carries few headers, not all of these.
#[derive(Default)]
struct PostHeaders<'a> {
    /// The first of each, as `HeaderMap::get` answers.
    content_type: Option<&'a HeaderValue>,
    version: Option<&'a HeaderValue>,
    session: Option<&'a HeaderValue>,
    accept: Accept<'a>,
}

/// The `Accept` headers a request carries.
#[derive(Default)]
enum Accept<'a> {
    #[default]
    None,
    One(&'a HeaderValue),
    /// More than one: read again, all of them, by [`accepts`].
    Several,
}

impl<'a> PostHeaders<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut seen = PostHeaders::default();
        for (name, value) in headers {
            let first = if name == CONTENT_TYPE {
                &mut seen.content_type
            } else if name == SESSION_HEADER {
                &mut seen.session
            } else if name == VERSION_HEADER {
                &mut seen.version
            } else if name == ACCEPT {
                seen.accept = match seen.accept {
                    Accept::None => Accept::One(value),
                    _ => Accept::Several,
                };
                continue;
            } else {
                continue;
            };
            first.get_or_insert(value);
        }
        seen
    }
}

/// Whether an `Accept` header lists each of `media` (itself, `*/*`, or its type with `/*`):
/// one pass over the header, whatever the number of media asked about.
pub(crate) fn accepts(headers: &HeaderMap, media: &[&str]) -> bool {
    accepts_in(headers.get_all(ACCEPT), media)
}

/// [`accepts`], over a request's `Accept` values.
fn accepts_in<'a>(values: impl IntoIterator<Item = &'a HeaderValue>, media: &[&str]) -> bool {
    debug_assert!(media.len() < 32, "one bit per media type");
    let mut missing: u32 = (1 << media.len()) - 1;
    for value in values {
        // The list as the MCP SDKs send it: compared whole, not taken apart.
        if lists_exactly(value.as_bytes(), media) {
            return true;
        }
        // Split byte by byte: these lists are short, and a searcher's setup costs more than the
        // scan.
        for part in value.as_bytes().split(|&b| b == b',') {
            let m = media_type(part);
            for (i, want) in media.iter().enumerate() {
                let want = want.as_bytes();
                if m.eq_ignore_ascii_case(want)
                    || m == b"*/*"
                    || (m.ends_with(b"/*") && want.starts_with(&m[..m.len() - 1]))
                {
                    missing &= !(1 << i);
                }
            }
            if missing == 0 {
                return true;
            }
        }
    }
    missing == 0
}

/// Whether `value` is exactly `media`, in order, separated by ", ".
fn lists_exactly(value: &[u8], media: &[&str]) -> bool {
    let mut rest = value;
    for (i, m) in media.iter().enumerate() {
        if i > 0 {
            let Some(r) = rest.strip_prefix(b", ") else {
                return false;
            };
            rest = r;
        }
        let Some(r) = rest.strip_prefix(m.as_bytes()) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

fn check_version(headers: &HeaderMap) -> Result<(), FrontError> {
    check_version_value(headers.get(VERSION_HEADER))
}

/// Refuses an `MCP-Protocol-Version` this gateway does not speak (none: the default).
fn check_version_value(version: Option<&HeaderValue>) -> Result<(), FrontError> {
    if let Some(v) = version {
        let v = v.to_str().unwrap_or("");
        if !revision::SUPPORTED.contains(&v) {
            return Err(FrontError::Version(v.to_owned()));
        }
    }
    Ok(())
}

/// The session id a request names: required, and visible ASCII (what ids are made of; any
/// other names no session).
fn session_id(header: Option<&HeaderValue>) -> Result<&str, FrontError> {
    header
        .ok_or(FrontError::MissingSession)?
        .to_str()
        .map_err(|_| FrontError::UnknownSession)
}

async fn session_of(
    gw: &Gateway,
    principal: &Option<Principal>,
    profile: Option<&Arc<ProfileConfig>>,
    header: Option<&HeaderValue>,
) -> Result<Arc<Session>, FrontError> {
    let id = session_id(header)?;
    // A portable session opened by another replica (or ended here for idleness) is served
    // here too, rebuilt from its id.
    let held = gw.sessions.get(id).map(|s| s.clone());
    let session = match held {
        Some(s) => s,
        None => match gw.restore_session(id, principal.as_ref(), profile).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(FrontError::UnknownSession),
            // The session exists; this replica has no room for it now (not a 404, which
            // would tell the client its session is gone).
            Err(crate::gateway::NoRoom::Sessions) => return Err(FrontError::TooManySessions),
            Err(crate::gateway::NoRoom::Principal(cap)) => {
                return Err(FrontError::TooManySessionsForPrincipal(cap));
            }
        },
    };
    // A session belongs to whoever opened it, on the endpoint it was opened on; to anyone
    // else, or on another endpoint, it does not exist.
    if session.principal != *principal || session.profile_name() != profile.map(|p| p.name.as_str())
    {
        return Err(FrontError::UnknownSession);
    }
    // A portable id is honored `mcp.session_max_age` after its opening, by a replica serving
    // it as by one that would restore it: kept busy, it would otherwise live for good here.
    if session.is_portable() && session.outlived(crate::mcp::session_token::now_ms()) {
        gw.end_session(id);
        return Err(FrontError::UnknownSession);
    }
    Ok(session)
}

/// Reads a client's request body within the configured size and time limits, and within the
/// room all clients' bodies share: the body holds its room until the last of its bytes is
/// dropped (a call's arguments are kept while it runs upstream, so counting them only while
/// they arrive would let many slow calls hold any amount of memory).
pub(crate) async fn read_body(
    gw: &Gateway,
    principal: Option<&Principal>,
    version: http::Version,
    body: hyper::body::Incoming,
) -> Result<Bytes, FrontError> {
    let limit = gw.config.mcp.max_body_bytes;
    read_within(gw, version, body, limit, Some((&gw.bodies, principal))).await
}

/// Reads the body of a request from the gateway's operators or its other replicas (the admin
/// API, the relay), already authenticated: not from the room clients' bodies share, which
/// clients could fill.
pub(crate) async fn read_trusted_body(
    gw: &Gateway,
    req: Request<hyper::body::Incoming>,
) -> Result<Bytes, FrontError> {
    let limit = gw.config.mcp.max_body_bytes;
    read_within(gw, req.version(), req.into_body(), limit, None).await
}

async fn read_within(
    gw: &Gateway,
    version: http::Version,
    mut body: hyper::body::Incoming,
    limit: usize,
    shared: Option<(&BodyRoom, Option<&Principal>)>,
) -> Result<Bytes, FrontError> {
    let http1 = version <= http::Version::HTTP_11;
    // What `Content-Length` declared (hyper holds the body to it).
    if hyper::body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(FrontError::TooLarge(limit));
    }
    // Room for what is read is taken from the room all bodies share as bytes arrive (not as
    // declared: a declared length costs nothing to send): past it, the request is refused
    // rather than buffered, so that many slow bodies (one caller's HTTP/2 streams) cannot
    // hold the gateway's memory.
    let mut room = Room::default();
    let read = async {
        // Most bodies are one frame, kept as it came; more are joined.
        let mut first: Option<Bytes> = None;
        let mut joined: Vec<u8> = Vec::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| FrontError::Body(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len();
            if len > limit {
                return Err(FrontError::TooLarge(limit));
            }
            if let Some((shared, principal)) = shared
                && let Some(more) = len.checked_sub(room.bytes()).filter(|n| *n > 0)
            {
                shared
                    .grow(&mut room, principal, more)
                    .map_err(|full| match full {
                        Full::All => FrontError::BodiesBusy,
                        Full::Caller => FrontError::CallerBodiesBusy(shared.share()),
                    })?;
            }
            match first.take() {
                None if joined.is_empty() => first = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        joined.extend_from_slice(&earlier);
                    }
                    joined.extend_from_slice(&data);
                }
            }
        }
        let body = kept_body(first, joined);
        Ok(if room.bytes() > 0 {
            Bytes::from_owner(Held {
                body,
                _room: std::mem::take(&mut room),
            })
        } else {
            body
        })
    };
    let read = {
        // A body that has come with its head is read without arming the deadline.
        let mut read = std::pin::pin!(read);
        match std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await {
            std::task::Poll::Ready(read) => {
                if http1 && read.as_ref().is_ok_and(|b| !b.is_empty()) {
                    // Taking a frame from hyper's HTTP/1 body channel wakes its sender, which
                    // is this connection's own task: it is polled again at once whatever it
                    // waits on. Waiting for that poll here, before the call goes upstream,
                    // makes it the one that sends the call, rather than one more walk down
                    // the whole call's future to find it still waiting for its answer.
                    once_more().await;
                }
                read
            }
            std::task::Poll::Pending => {
                match tokio::time::timeout(gw.config.mcp.body_timeout, read).await {
                    Err(_) => Err(FrontError::BodyTimeout),
                    Ok(read) => read,
                }
            }
        }
    };
    if let Err(FrontError::TooLarge(_) | FrontError::BodiesBusy | FrontError::CallerBodiesBusy(_)) =
        &read
    {
        drain(body, limit, gw.config.mcp.body_timeout);
    }
    read
}

/// Reads and drops the rest of a body refused while it arrives (at most `limit` bytes more,
/// within `within`): its sender, still sending, then reads the refusal, where a connection
/// closed on unread bytes would have been reset under it.
fn drain(mut body: hyper::body::Incoming, limit: usize, within: std::time::Duration) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(within, async {
            let mut read = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > limit {
                    return;
                }
            }
        })
        .await;
    });
}

/// A client's body with the room it holds in `mcp.max_bodies_bytes`, given back when the last
/// `Bytes` sliced from it is dropped.
/// A body as it is kept: its bytes in an allocation of their own, holding no more than
/// they are. A frame is a slice of the connection's read buffer (8 KiB, and up to about
/// 400 KiB once a large body has grown it), which a kept slice would hold whole while only
/// the body's bytes are counted; joined frames grew by doubling.
fn kept_body(first: Option<Bytes>, mut joined: Vec<u8>) -> Bytes {
    match first {
        Some(only) => Bytes::copy_from_slice(&only),
        None => {
            joined.shrink_to_fit();
            Bytes::from(joined)
        }
    }
}

struct Held {
    body: Bytes,
    _room: Room,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// Ready at its second poll; its first asks for that poll (a no-op for a task already woken).
fn once_more() -> impl Future<Output = ()> {
    let mut polled = false;
    std::future::poll_fn(move |cx| {
        if std::mem::replace(&mut polled, true) {
            return std::task::Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}

async fn post(
    gw: &Arc<Gateway>,
    identity: Option<&Identity>,
    principal: Option<Principal>,
    profile: Option<&Arc<ProfileConfig>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, FrontError> {
    // The head is kept while the body is read: what a stateless request mirrors in headers
    // is read in place, after its body.
    let (head, body) = req.into_parts();
    let headers = &head.headers;
    let seen = PostHeaders::of(headers);
    if !is_json(seen.content_type) {
        return Err(FrontError::ContentType);
    }
    let both = ["application/json", "text/event-stream"];
    let acceptable = match seen.accept {
        Accept::None => false,
        Accept::One(value) => accepts_in([value], &both),
        Accept::Several => accepts(headers, &both),
    };
    if !acceptable {
        return Err(FrontError::Accept(
            "both application/json and text/event-stream",
        ));
    }
    let session_header = seen.session;
    // Without a session, the request may be a stateless one (2026-07-28) that mirrors its body
    // in headers: keep them before the body is read.
    let mirrored = session_header
        .is_none()
        .then(|| stateless::Mirrored::of(headers));
    // Traced: the client's trace context, if it sent one in headers.
    let trace_header = gw.tracer.as_ref().and_then(|_| trace_header(headers));
    let body = read_body(gw, principal.as_ref(), head.version, body).await?;
    let msg = jsonrpc::parse_client_body(body)?;
    if let Kind::Request { id, method, params } = &msg.kind
        && let Err(e) = authorize(gw, identity, profile, method, params.as_deref())
    {
        tracing::debug!(?method, "refused MCP request: {e}");
        audit_refusal(
            gw,
            identity.map(|i| (i.principal.clone(), &**method)),
            &e.to_string(),
        );
        let name = profile.map(|p| p.name.as_str());
        return Ok(refusal(gw, FrontError::Auth(e), Some(id), name));
    }

    let mut span = match (&gw.tracer, &msg.kind) {
        (Some(tracer), Kind::Request { id, method, params }) if &**method != "initialize" => {
            let header = trace_header
                .as_ref()
                .map(|(parent, state)| (parent.as_str(), state.as_deref()));
            tracer
                .request_span(method, params.as_deref(), header)
                .map(|mut span| {
                    // A string id without its quotes.
                    let id = serde_json::from_slice::<String>(id)
                        .unwrap_or_else(|_| String::from_utf8_lossy(id).into_owned());
                    span.attr("jsonrpc.request.id", id);
                    if let Some(p) = principal.as_ref().filter(|_| tracer.records_principal()) {
                        span.attr("enduser.id", p.to_string());
                    }
                    if let Some(p) = profile {
                        span.attr("gatehouse.profile", p.name.clone());
                    }
                    span
                })
        }
        _ => None,
    };
    if let Some(mirrored) = mirrored
        && stateless::is_stateless(&mirrored, &msg)
    {
        let claims = identity.map(|i| i.claims.clone());
        let resp =
            stateless::post(gw, principal, profile, claims, mirrored, msg, span.as_mut()).await;
        // Refusals before the call (headers that disagree, a bad envelope) fail the span too.
        if let Some(span) = &mut span
            && !resp.status().is_success()
        {
            span.fail(format!("refused with HTTP {}", resp.status().as_u16()));
        }
        return Ok(resp);
    }
    if let Kind::Request { id, method, params } = &msg.kind
        && &**method == "initialize"
    {
        // The version is negotiated in the body; the header is not yet meaningful.
        let claims = identity.map(|i| &i.claims);
        return initialize(gw, principal, claims, profile, id, params.as_deref()).await;
    }
    // Refused once the body is read: the answer carries the request's id, so a client that
    // sends several requests can tell which one was refused.
    let refused = |mut span: Option<crate::trace::Span>, e: FrontError| {
        tracing::debug!("refused MCP request: {e}");
        if let Some(span) = &mut span {
            span.fail(e.to_string());
        }
        let id = match &msg.kind {
            Kind::Request { id, .. } => Some(&id[..]),
            _ => None,
        };
        Ok(refusal(gw, e, id, profile.map(|p| p.name.as_str())))
    };
    if let Err(e) = check_version_value(seen.version) {
        return refused(span, e);
    }
    let session = match session_of(gw, &principal, profile, session_header).await {
        Ok(s) => s,
        Err(e) => return refused(span, e),
    };
    let _busy = session.touch();
    if let Some(identity) = identity {
        session.hold_claims(&identity.claims);
    }
    match msg.kind {
        Kind::Request { id, method, params } => {
            if let Some(span) = &mut span {
                span.attr("mcp.session.id", session.log_id().to_owned());
                span.attr("mcp.protocol.version", session.protocol_version.to_string());
            }
            let services = handler::Services {
                trace: span.as_ref(),
                ..gw.services()
            };
            let reply = handler::request(services, &session, id, &method, params).await;
            if let (Some(span), Reply::Json(frame) | Reply::Refused(_, frame)) = (&mut span, &reply)
            {
                span.record_answer(frame);
            }
            match reply {
                Reply::Json(frame) => {
                    Ok(json_response(StatusCode::OK, session.bounded_answer(frame)))
                }
                Reply::Refused(status, frame) => Ok(json_response(status, frame)),
                Reply::Stream(rx) => {
                    // Numbered and recorded, so that a broken connection is resumed (with
                    // `Last-Event-ID`) rather than the call lost; revisions before ids get the
                    // stream as it comes.
                    if session.protocol_version < "2025-03-26" {
                        return Ok(session.counted_stream(unrecorded_stream(gw, rx)));
                    }
                    let prime = session.protocol_version >= "2025-11-25";
                    // Past what a session may keep, the stream is sent as it comes.
                    let response = match session.streams.open(rx, prime, reader_watch(gw)) {
                        Ok((events, uptake)) => {
                            crate::body::watched_events_response(events, uptake)
                        }
                        Err(rx) => unrecorded_stream(gw, rx),
                    };
                    Ok(session.counted_stream(response))
                }
            }
        }
        Kind::Notification { method, params } => {
            on_notification(&session, &method, params.as_deref()).await;
            Ok(accepted())
        }
        Kind::Response { id, outcome } => {
            if !session.on_client_response(&id, &outcome).await {
                tracing::debug!(session = %session.log_id(), "response to an unknown server request");
            }
            Ok(accepted())
        }
    }
}

/// How the readers of a session's call streams are watched. At most [`STALLED_READER`] (the
/// handler gives up on a stream that takes nothing for as long: a recorded stream must drop
/// its stalled reader first, to go on recording).
///
/// [`STALLED_READER`]: crate::body::STALLED_READER
fn reader_watch(gw: &Gateway) -> crate::mcp::resume::ReaderWatch {
    crate::mcp::resume::ReaderWatch {
        stall: gw
            .config
            .mcp
            .stalled_stream_timeout
            .min(crate::body::STALLED_READER),
        stalled: gw.metrics.stalled_streams("call"),
    }
}

/// The SSE answer of a call whose stream is not recorded (for a client of a revision before
/// 2025-03-26, or past what its session may record), watched as a recorded one is: a client
/// that takes nothing while events wait loses it, its call, and its connection.
fn unrecorded_stream(gw: &Gateway, mut rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let (tx, out) = mpsc::channel(64);
    let (response, uptake) = crate::body::watched_sse_response(None, out);
    let watch = reader_watch(gw);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            match crate::body::feed(&tx, &uptake, watch.stall, frame).await {
                crate::body::Fed::Sent => {}
                // Dropping `rx` ends the call, as a client gone does.
                crate::body::Fed::ReaderGone => return,
                crate::body::Fed::Stalled => {
                    watch.stalled.inc();
                    return;
                }
            }
        }
        drop(tx);
        if !uptake.delivered(watch.stall).await {
            watch.stalled.inc();
        }
    });
    response
}

/// The `traceparent` and `tracestate` headers, when there is a `traceparent` (one of each:
/// a repeated header is no context).
pub(crate) fn trace_header(headers: &HeaderMap) -> Option<(String, Option<String>)> {
    let one = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok().map(str::to_owned),
            _ => None,
        }
    };
    Some((one("traceparent")?, one("tracestate")))
}

/// The scope rules for a request. A tool a profile renamed is also checked under the name the
/// rules know it by (its server's, prefixed as at `/mcp`): a rename must not slip past a rule
/// written for that tool, nor take another tool's.
fn authorize(
    gw: &Gateway,
    identity: Option<&Identity>,
    profile: Option<&Arc<ProfileConfig>>,
    method: &str,
    params: Option<&[u8]>,
) -> Result<(), AuthError> {
    gw.auth.authorize(identity, method, params)?;
    let renamed = match (profile, method) {
        (Some(p), "tools/call") => {
            #[derive(serde::Deserialize)]
            struct Named<'a> {
                #[serde(borrow)]
                name: std::borrow::Cow<'a, str>,
            }
            params
                .and_then(|p| serde_json::from_slice::<Named<'_>>(p).ok())
                .and_then(|n| {
                    let (server, tool) = p.renamed_tool(&n.name)?;
                    let topology = gw.topology();
                    let index = topology.router.index_of(server)?;
                    Some(topology.router.public_name(index, tool))
                })
        }
        _ => None,
    };
    match renamed {
        Some(name) => {
            let params = serde_json::json!({ "name": name }).to_string();
            gw.auth.authorize(identity, method, Some(params.as_bytes()))
        }
        None => Ok(()),
    }
}

async fn initialize(
    gw: &Arc<Gateway>,
    principal: Option<Principal>,
    claims: Option<&Arc<crate::auth::Claims>>,
    profile: Option<&Arc<ProfileConfig>>,
    id: &Bytes,
    params: Option<&[u8]>,
) -> Result<Response<Body>, FrontError> {
    if gw.sessions_held() >= gw.config.mcp.max_sessions {
        return Err(FrontError::TooManySessions);
    }
    if !gw.may_open_session(principal.as_ref(), 0) {
        return Err(FrontError::TooManySessionsForPrincipal(
            gw.config.mcp.max_sessions_per_principal,
        ));
    }
    let asked = handler::negotiate(params).map_err(FrontError::Initialize)?;
    let session = gw.new_session(
        principal,
        profile,
        asked.version,
        asked.init_params,
        asked.offers_roots,
    );
    // Held before the servers are reached: one that takes the caller's token in exchange
    // needs it for the handshake.
    if let Some(claims) = claims {
        session.hold_claims(claims);
    }
    let result = handler::initialize(gw.services(), &session).await;
    Ok(initialized(id, result, &session.id))
}

/// The answer to `initialize`: its result, and the new session's id in the session header.
pub(crate) fn initialized(id: &[u8], result: Bytes, session_id: &str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::OK,
        jsonrpc::response(id, &jsonrpc::Outcome::Result(result)),
    );
    resp.headers_mut().insert(
        SESSION_HEADER,
        HeaderValue::from_str(session_id).expect("session ids are header-safe"),
    );
    resp
}

pub(crate) async fn on_notification(session: &Arc<Session>, method: &str, params: Option<&[u8]>) {
    match method {
        "notifications/initialized" => {}
        "notifications/cancelled" => {
            if let Some(id) = jsonrpc::cancelled_request(params) {
                session.cancel(id);
            }
        }
        "notifications/roots/list_changed" => {
            // The notice alone: whatever else a client puts in it would reach every server
            // past the plugins, which judge no notification of a client's.
            // Side by side: each within its own deadline, none waits on another.
            futures_util::future::join_all(
                session.links().iter().map(|link| link.notify(method, None)),
            )
            .await;
        }
        other => {
            tracing::debug!(session = %session.log_id(), method = ?other, "ignored client notification")
        }
    }
}

async fn get(
    gw: &Arc<Gateway>,
    principal: Option<Principal>,
    profile: Option<&Arc<ProfileConfig>>,
    headers: &HeaderMap,
) -> Result<Response<Body>, FrontError> {
    if !accepts(headers, &["text/event-stream"]) {
        return Err(FrontError::Accept("text/event-stream"));
    }
    check_version(headers)?;
    let session = session_of(gw, &principal, profile, headers.get(SESSION_HEADER)).await?;
    // A client resuming a response stream whose connection broke gets the rest of it.
    if let Some(last) = headers.get("last-event-id") {
        let last = last
            .to_str()
            .map_err(|_| crate::mcp::resume::ResumeError::Malformed("(not text)".into()))?;
        let (events, uptake) = session.streams.resume(last, reader_watch(gw))?;
        let response = crate::body::watched_events_response(events, uptake);
        return Ok(session.counted_stream(response));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let Some(stream) = session.open_listen_stream(tx.clone().into()) else {
        return Err(FrontError::StreamOpen);
    };
    let (response, uptake) = crate::body::watched_sse_response(None, rx);
    let response = session.counted_stream(response);
    watch_get_stream(gw, session, stream, tx, uptake);
    Ok(response)
}

/// Keeps a session's GET stream alive (keep-alive comments) until its client leaves or the
/// session ends, and lets go of it once its reader has taken nothing for
/// `mcp.stalled_stream_timeout` while messages waited: a client that stops reading then holds
/// neither the session's one GET stream (messages wait for the next) nor this task, and its
/// session may idle out.
fn watch_get_stream(
    gw: &Gateway,
    session: Arc<Session>,
    stream: u64,
    tx: mpsc::Sender<Bytes>,
    uptake: Arc<crate::body::Uptake>,
) {
    let stall = gw.config.mcp.stalled_stream_timeout;
    let metrics = gw.metrics.clone();
    let ended = async move {
        tokio::select! {
            _ = session.ended() => {}
            _ = uptake.stalled(stall) => {
                tracing::info!(session = %session.log_id(), "ended a GET stream whose client took nothing for {stall:?} while messages waited");
                metrics.stream_stalled("get");
                uptake.end();
                session.close_listen_stream(stream);
            }
        }
    };
    keep_alive(tx, gw.config.mcp.sse_keepalive, ended);
}

/// Sends a keep-alive comment on a stream every `every` until its client is gone or `ended`
/// resolves: comments hold idle proxies open and notice a departed client. Ending drops the
/// task's sender, which ends the client's stream.
pub(crate) fn keep_alive(
    tx: mpsc::Sender<Bytes>,
    every: std::time::Duration,
    ended: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        let keepalive = async {
            loop {
                tokio::time::sleep(every).await;
                if tx.send(Bytes::new()).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = keepalive => {}
            _ = tx.closed() => {}
            _ = ended => {}
        }
    });
}

async fn delete(
    gw: &Arc<Gateway>,
    principal: Option<Principal>,
    profile: Option<&Arc<ProfileConfig>>,
    headers: &HeaderMap,
) -> Result<Response<Body>, FrontError> {
    let id = session_id(headers.get(SESSION_HEADER))?;
    // A session held elsewhere (a portable one) is not restored here to be deleted: that would
    // need room here, and open upstream sessions only to close them.
    if !gw.delete_session(id, principal.as_ref(), profile).await {
        return Err(FrontError::UnknownSession);
    }
    let mut r = response(Body::Empty);
    *r.status_mut() = StatusCode::OK;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_body_holds_its_own_bytes_not_the_buffer_it_was_read_into() {
        // A small body read as a slice of a large read buffer, as hyper hands it over.
        let mut buffer = bytes::BytesMut::from(&vec![b'x'; 1 << 20][..]);
        let small = buffer.split_to(200).freeze();
        let range = small.as_ptr() as usize..small.as_ptr() as usize + (1 << 20);
        let kept = kept_body(Some(small), Vec::new());
        assert_eq!(kept.len(), 200);
        assert!(
            !range.contains(&(kept.as_ptr() as usize)),
            "a copy of its own"
        );
        // A large one too: the buffer may be several times its size.
        let mut buffer = bytes::BytesMut::from(&vec![b'y'; 417 * 1024][..]);
        let large = buffer.split_to(65 * 1024).freeze();
        let range = large.as_ptr() as usize..large.as_ptr() as usize + 417 * 1024;
        let kept = kept_body(Some(large), Vec::new());
        assert_eq!(kept.len(), 65 * 1024);
        assert!(!range.contains(&(kept.as_ptr() as usize)));
        // Joined frames hold no spare capacity.
        let mut joined = Vec::with_capacity(4096);
        joined.extend_from_slice(b"{}");
        let kept = kept_body(None, joined);
        assert_eq!(&kept[..], b"{}");
        let vec: Vec<u8> = kept.into();
        assert_eq!(vec.capacity(), 2);
    }

    #[test]
    fn a_posts_headers_read_in_one_pass_are_what_look_ups_would_find() {
        let v = HeaderValue::from_static;
        let mut h = HeaderMap::new();
        h.insert("x-other", v("1"));
        let seen = PostHeaders::of(&h);
        assert!(seen.content_type.is_none() && seen.session.is_none() && seen.version.is_none());
        assert!(matches!(seen.accept, Accept::None));
        // Repeated headers: the first, as `get` answers; several `Accept`s are read again.
        h.append(CONTENT_TYPE, v("application/json"));
        h.append(CONTENT_TYPE, v("text/plain"));
        h.append(SESSION_HEADER, v("s1"));
        h.append(SESSION_HEADER, v("s2"));
        h.append("MCP-Protocol-Version", v("2025-11-25"));
        h.append(ACCEPT, v("application/json"));
        let seen = PostHeaders::of(&h);
        assert_eq!(seen.content_type, h.get(CONTENT_TYPE));
        assert_eq!(seen.session, Some(&v("s1")));
        assert_eq!(seen.version, Some(&v("2025-11-25")));
        assert!(matches!(seen.accept, Accept::One(a) if a == "application/json"));
        h.append(ACCEPT, v("text/event-stream"));
        assert!(matches!(PostHeaders::of(&h).accept, Accept::Several));
    }

    #[test]
    fn accept_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            "application/json, text/event-stream;q=0.9".parse().unwrap(),
        );
        assert!(accepts(&h, &["application/json"]) && accepts(&h, &["text/event-stream"]));
        h.insert(ACCEPT, "text/*".parse().unwrap());
        assert!(accepts(&h, &["text/event-stream"]) && !accepts(&h, &["application/json"]));
        h.insert(ACCEPT, "*/*".parse().unwrap());
        assert!(accepts(&h, &["application/json"]));
        let both = ["application/json", "text/event-stream"];
        for (values, ok) in [
            (&["application/json, text/event-stream"][..], true),
            (&["Application/JSON ;q=1,TEXT/EVENT-STREAM"], true),
            (&["application/json", "text/event-stream"], true),
            (&["application/json"], false),
            (&["text/event-stream, text/*"], false),
            (&["application/*, text/*"], true),
            (&["application/jsonx, text/event-stream"], false),
            (&[""], false),
        ] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(ACCEPT, v.parse().unwrap());
            }
            assert_eq!(accepts(&h, &both), ok, "{values:?}");
        }
        assert!(!accepts(&HeaderMap::new(), &both));
        assert!(
            accepts(&HeaderMap::new(), &[]),
            "nothing asked, nothing missing"
        );
    }

    fn config(yaml: &str) -> Config {
        let upstream = "upstreams: [{name: a, stdio: {command: \"true\"}}]\n";
        Config::from_yaml(&format!("{upstream}{yaml}")).unwrap()
    }

    fn check(config: &Config, host: &str, origin: Option<&str>) -> Result<(), FrontError> {
        let mut h = HeaderMap::new();
        h.insert(HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(ORIGIN, o.parse().unwrap());
        }
        check_host_and_origin(config, Some(host), &h)
    }

    // Found by fuzz/fuzz_targets/host_origin.rs: the text before the last colon was taken as the
    // host, so userinfo ("localhost:@evil.com" names evil.com) or a bad port passed for loopback.
    #[test]
    fn host_and_origin_must_be_plain_authorities() {
        let local = config("");
        for host in ["localhost:9000", "127.0.0.1", "[::1]:9000", "LocalHost"] {
            assert!(check(&local, host, None).is_ok(), "{host}");
        }
        for host in [
            "localhost:@evil.com",
            "localhost@evil.com:9000",
            "localhost:x",
            "[::1]evil.com",
        ] {
            assert!(
                matches!(check(&local, host, None), Err(FrontError::Host(_))),
                "{host}"
            );
        }
        assert!(check(&local, "localhost", Some("http://localhost:9000")).is_ok());
        for origin in [
            "http://localhost:@evil.com",
            "http://127.0.0.1:80@evil.com",
            "http://[::1]/x",
        ] {
            let refused = check(&local, "localhost", Some(origin));
            assert!(matches!(refused, Err(FrontError::Origin(_))), "{origin}");
        }
        let public = config(
            "listen: 0.0.0.0:9000\nauth: {allow_anonymous: true}\nmcp: {allowed_hosts: [gw.example.com]}\n",
        );
        assert!(check(&public, "GW.example.com:443", None).is_ok());
        assert!(matches!(
            check(&public, "gw.example.com:@evil.com", None),
            Err(FrontError::Host(_))
        ));
    }

    #[test]
    fn a_plain_hostname_is_what_the_full_parse_answers() {
        let alphabet = [
            "a", "Z", "0", "9", ".", "-", ":", "@", "[", "]", "_", "%", " ", "é",
        ];
        let mut cases = vec![String::new()];
        // Every string of up to four symbols of the alphabet, and some longer ones.
        for _ in 0..4 {
            let next: Vec<String> = cases
                .iter()
                .flat_map(|c| alphabet.iter().map(move |a| format!("{c}{a}")))
                .collect();
            cases.extend(next);
        }
        cases.extend(
            [
                "localhost:9000",
                "127.0.0.1:99999999",
                "evil.com:80:80",
                "localhost:@evil.com",
                "server.ns.svc.cluster.local:8080",
            ]
            .map(String::from),
        );
        for case in &cases {
            if let Some(host) = plain_hostname(case) {
                let parsed: http::uri::Authority = case.parse().expect(case);
                assert_eq!(Some(host), Some(parsed.host()), "{case:?}");
                let port = &case[host.len()..];
                assert!(port.is_empty() || port.starts_with(':'), "{case:?}");
            }
        }
        assert_eq!(plain_hostname("localhost:9000"), Some("localhost"));
        assert_eq!(plain_hostname("localhost:@evil.com"), None);
        assert_eq!(hostname("localhost:@evil.com"), None);
        assert_eq!(plain_hostname("[::1]:9000"), None);
    }

    /// The byte-by-byte readers answer as the splitting they replaced did, and the whole-list
    /// comparison only ever says yes where the element-by-element reading does.
    #[test]
    fn header_readers_agree_with_splitting_them() {
        fn accepts_by_splitting(values: &[&str], media: &[&str]) -> bool {
            media.iter().all(|want| {
                values.iter().any(|v| {
                    v.split(',').any(|part| {
                        let m = part.split(';').next().unwrap_or("").trim();
                        m.eq_ignore_ascii_case(want)
                            || m == "*/*"
                            || (m.ends_with("/*") && want.starts_with(&m[..m.len() - 1]))
                    })
                })
            })
        }
        let lists = [
            "application/json, text/event-stream",
            "text/event-stream, application/json",
            "application/json,text/event-stream",
            "APPLICATION/JSON, text/event-stream",
            "application/json;q=0.9, text/event-stream; charset=utf-8",
            "application/json, text/event-stream, ",
            "application/json, text/event-streamx",
            "application/jsonx, text/event-stream",
            "application/json,  text/event-stream",
            "application/json",
            "text/event-stream",
            "*/*",
            "application/*, text/*",
            "text/*",
            "",
            ", ,",
            ";",
        ];
        let media_lists: [&[&str]; 3] = [
            &["application/json", "text/event-stream"],
            &["text/event-stream"],
            &[],
        ];
        for media in media_lists {
            for a in lists {
                for b in [None, Some("text/event-stream"), Some("application/json")] {
                    let mut headers = HeaderMap::new();
                    headers.append(ACCEPT, HeaderValue::from_str(a).unwrap());
                    let mut values = vec![a];
                    if let Some(b) = b {
                        headers.append(ACCEPT, HeaderValue::from_static(b));
                        values.push(b);
                    }
                    assert_eq!(
                        accepts(&headers, media),
                        accepts_by_splitting(&values, media),
                        "{values:?} for {media:?}"
                    );
                }
            }
        }
        for ct in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;x",
            "application/jsonx",
            "text/plain",
            "",
            ";application/json",
        ] {
            let by_splitting = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json");
            assert_eq!(
                is_json(Some(&HeaderValue::from_str(ct).unwrap())),
                by_splitting,
                "{ct:?}"
            );
        }
        assert!(!is_json(None));
        for authority in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost:",
            "localhost:80:90",
            ":80",
            "a:b",
            "ex-ample.com:443",
            "[::1]:9000",
            "",
            "h\u{e9}.com",
            "127.0.0.1:\u{ff18}",
        ] {
            let (host, port) = authority.split_once(':').unwrap_or((authority, ""));
            let name = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
            let by_splitting = (!host.is_empty()
                && host.bytes().all(name)
                && port.bytes().all(|b| b.is_ascii_digit()))
            .then_some(host);
            assert_eq!(plain_hostname(authority), by_splitting, "{authority:?}");
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("[::1]:9000"), Some("[::1]"));
        assert_eq!(hostname("localhost:9000"), Some("localhost"));
        assert_eq!(hostname("127.0.0.1"), Some("127.0.0.1"));
        assert!(
            is_loopback_name("127.0.0.2")
                && is_loopback_name("LOCALHOST")
                && !is_loopback_name("evil.com")
        );
    }
}
