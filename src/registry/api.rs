//! The official registry's read API over the catalog, so that existing registry clients
//! read ours unchanged: `GET /v0.1/servers` (and `/v0/…`), a server's versions, one version
//! (or `latest`), the same shapes, CORS.

use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::catalog::{Catalog, CatalogError, Query};
use crate::body::Body;

/// The API's path prefixes: `/v0.1` (stable) and `/v0` (development), served alike.
pub const PREFIXES: [&str; 2] = ["/v0.1/", "/v0/"];
/// Page size when none is asked for.
const DEFAULT_LIMIT: usize = 30;
/// Largest page.
const MAX_LIMIT: usize = 100;

/// Whether `path` is one of the API's.
pub fn is_registry_path(path: &str) -> bool {
    PREFIXES.iter().any(|p| path.starts_with(p))
}

/// CORS headers: any origin may read when reading takes a credential (`anyone`); otherwise
/// none is named, and a browser keeps other sites from reading the answer.
fn cors(mut r: Response<Body>, anyone: bool) -> Response<Body> {
    let h = r.headers_mut();
    if anyone {
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    }
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    r
}

fn json(status: StatusCode, v: &Value) -> Response<Body> {
    crate::body::json_response(
        status,
        Bytes::from(serde_json::to_vec(v).expect("JSON serializes")),
    )
}

/// An error in both shapes registry clients read: `{"error"}` (the API reference) and the
/// problem details the official server sends (`title`, `status`, `detail`).
pub fn error(status: StatusCode, detail: &str) -> Response<Body> {
    let mut r = json(
        status,
        &json!({
            "error": detail,
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
        }),
    );
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn encode_cursor(name: &str, version: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&(name, version)).expect("JSON serializes"))
}

fn decode_cursor(cursor: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn flag(value: &str, name: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("{name}={other:?}: must be true or false")),
    }
}

/// Reads the list's query parameters; the error names the bad one.
fn query(raw: Option<&str>) -> Result<Query, String> {
    let mut q = Query {
        limit: DEFAULT_LIMIT,
        ..Query::default()
    };
    let mut include_deleted = None;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*k {
            "cursor" => {
                q.after = Some(decode_cursor(&v).ok_or("cursor: not a cursor this registry gave")?)
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or(format!("limit={v:?}: must be 1 to {MAX_LIMIT}"))?
            }
            "search" => q.search = Some(v.into_owned()).filter(|s| !s.is_empty()),
            "updated_since" => {
                // Any offset, as RFC 3339 allows (and Go's parser, which the official
                // registry uses).
                let t: jiff::Timestamp = v.parse().map_err(|_| {
                    format!("updated_since={v:?}: expected an RFC 3339 time (e.g. 2025-08-07T13:15:04.280Z)")
                })?;
                q.updated_since = Some(SystemTime::from(t))
            }
            "version" if v == "latest" => q.latest_only = true,
            "version" => q.version = Some(v.into_owned()),
            "include_deleted" => include_deleted = Some(flag(&v, "include_deleted")?),
            _ => {} // unknown parameters are ignored, as the official registry does
        }
    }
    // Incremental sync needs the deletions, as in the official registry.
    q.include_deleted = match (q.updated_since, include_deleted) {
        (Some(_), Some(false)) => {
            return Err(
                "include_deleted=false cannot go with updated_since (a sync needs deletions)"
                    .into(),
            );
        }
        (Some(_), _) => true,
        (None, flag) => flag.unwrap_or(false),
    };
    Ok(q)
}

fn decode_segment(s: &str, what: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("invalid {what} encoding"))
}

fn not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "Server not found")
}

fn catalog_error(e: CatalogError) -> Response<Body> {
    match e {
        CatalogError::NotFound => not_found(),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, &other.to_string()),
    }
}

/// Answers a request under one of [`PREFIXES`] (authentication is the caller's); `anyone`:
/// reading takes a credential, so any origin may.
/// `visible`: the servers the caller may see (see [`super::visibility`]).
pub fn serve(
    catalog: &Catalog,
    method: &Method,
    path: &str,
    raw_query: Option<&str>,
    anyone: bool,
    visible: super::visibility::Visible,
) -> Response<Body> {
    cors(answer(catalog, method, path, raw_query, visible), anyone)
}

fn answer(
    catalog: &Catalog,
    method: &Method,
    path: &str,
    raw_query: Option<&str>,
    visible: super::visibility::Visible,
) -> Response<Body> {
    if method == Method::OPTIONS {
        let mut r = crate::body::response(Body::Empty);
        *r.status_mut() = StatusCode::NO_CONTENT;
        return r;
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the registry API is read-only here; use the admin API",
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD, OPTIONS"));
        return r;
    }
    let Some(rest) = PREFIXES.iter().find_map(|p| path.strip_prefix(p)) else {
        return not_found();
    };
    if rest == "servers" {
        let q = match query(raw_query) {
            Ok(q) => super::catalog::Query { visible, ..q },
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let page = catalog.list(&q);
        let count = page.items.len();
        let mut metadata = json!({ "count": count });
        if let Some((name, version)) = page.next {
            metadata["nextCursor"] = Value::String(encode_cursor(&name, &version));
        }
        let servers: Vec<Value> = page
            .items
            .into_iter()
            .map(|(server, meta)| json!({"server": server, "_meta": meta}))
            .collect();
        return json(
            StatusCode::OK,
            &json!({"servers": servers, "metadata": metadata}),
        );
    }
    let Some(rest) = rest.strip_prefix("servers/") else {
        return not_found();
    };
    // A name is sent with its '/' encoded (%2F); a client that did not encode it is
    // understood too: the name is what comes before the last "/versions".
    let include_deleted = form_urlencoded::parse(raw_query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "include_deleted")
        .map(|(_, v)| flag(&v, "include_deleted"));
    let include_deleted = match include_deleted.transpose() {
        Ok(f) => f.unwrap_or(false),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let (name, version) = if let Some(name) = rest.strip_suffix("/versions") {
        (name, None)
    } else if let Some((name, version)) = rest.rsplit_once("/versions/") {
        (name, Some(version))
    } else {
        return not_found();
    };
    let name = match decode_segment(name, "server name") {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    // Every input is read before what is hidden is looked at: a hidden name answers as an
    // absent one would, whatever else the request holds.
    let version = match version.map(|v| decode_segment(v, "version")).transpose() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    if !visible.shows_any(&name) {
        return not_found();
    }
    // What the caller does not see is absent; `latest` is the latest it sees.
    match version {
        None => match catalog.versions(&name, include_deleted, &visible) {
            Ok(items) => {
                let count = items.len();
                let servers: Vec<Value> = items
                    .into_iter()
                    .map(|(server, meta)| json!({"server": server, "_meta": meta}))
                    .collect();
                json(
                    StatusCode::OK,
                    &json!({"servers": servers, "metadata": {"count": count}}),
                )
            }
            Err(e) => catalog_error(e),
        },
        Some(version) => match catalog.version_seen(&name, &version, include_deleted, &visible) {
            Ok((server, meta)) => json(StatusCode::OK, &json!({"server": server, "_meta": meta})),
            Err(e) => catalog_error(e),
        },
    }
}
