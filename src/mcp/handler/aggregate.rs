//! Lists fanned out to every upstream and merged into one page, behind one cursor.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use serde_json::value::RawValue;

use crate::mcp::jsonrpc::{self, Outcome, code};
use crate::mcp::policy;
use crate::mcp::profile::{Profile, Shown};
use crate::mcp::router::{Listed, Router};
use crate::mcp::session::{Session, capability_bits, caps};
use crate::upstream::CallOpts;

use super::{Fields, Reply, Services, fields, invalid_params, json_string, string_field};
use crate::mcp::cursor::{MAX_UPSTREAM_CURSOR, decode_cursor, encode_cursor};

/// The `_meta` key of a list result naming the servers listed from what they last listed,
/// because they sleep (idle) and a listing does not wake them.
pub const ASLEEP_META: &str = "dev.gatehouse/asleep";

/// Kinds of list that fan out to every upstream.
#[derive(Clone, Copy)]
pub(super) struct ListKind {
    method: &'static str,
    key: &'static str,
    cap: u8,
    rename: bool,
}

impl ListKind {
    /// The resource list the router learns from this kind, if it is one.
    fn listed(&self) -> Option<Listed> {
        match self.key {
            "resources" => Some(Listed::Resources),
            "resourceTemplates" => Some(Listed::Templates),
            _ => None,
        }
    }
}

pub(super) const TOOLS: ListKind = ListKind {
    method: "tools/list",
    key: "tools",
    cap: caps::TOOLS,
    rename: true,
};
pub(super) const PROMPTS: ListKind = ListKind {
    method: "prompts/list",
    key: "prompts",
    cap: caps::PROMPTS,
    rename: true,
};
pub(super) const RESOURCES: ListKind = ListKind {
    method: "resources/list",
    key: "resources",
    cap: caps::RESOURCES,
    rename: false,
};
pub(super) const TEMPLATES: ListKind = ListKind {
    method: "resources/templates/list",
    key: "resourceTemplates",
    cap: caps::RESOURCES,
    rename: false,
};

/// Fans a list out to every upstream that has the capability and merges the pages.
///
/// The cursor handed to the client encodes each upstream's own cursor, so pagination resumes only
/// the upstreams that have more.
///
/// `walk`: the gateway's own walk from the first page (its cursors are the ones it was given):
/// a server's last page then completes what the router heard of it. A client's cursor proves
/// nothing of the pages before (it may be forged), so only a first page that is also the last
/// does.
pub(super) async fn list(
    sv: Services<'_>,
    session: &Arc<Session>,
    id: &[u8],
    kind: ListKind,
    params: Option<&[u8]>,
    walk: bool,
) -> Reply {
    let f = match fields(params) {
        Ok(f) => f,
        Err(e) => return invalid_params(id, &e),
    };
    let targets: Vec<(usize, Option<String>)> = match f
        .get("cursor")
        .map(|c| serde_json::from_str::<Option<String>>(c.get()))
    {
        None | Some(Ok(None)) => (0..session.topology().servers.len())
            .filter(|i| session.serves(*i))
            .map(|i| (i, None))
            .collect(),
        // A cursor naming a server the session does not see is not one it was given.
        Some(Ok(Some(c))) => match decode_cursor(&session.topology().router, &c)
            .filter(|t| t.iter().all(|(i, _)| session.serves(*i)))
        {
            Some(t) => t,
            None => return invalid_params(id, "invalid cursor"),
        },
        Some(Err(_)) => return invalid_params(id, "params.cursor must be a string"),
    };
    let calls = targets.iter().map(|(i, cursor)| {
        let i = *i;
        let p = cursor
            .as_ref()
            .map(|c| format!("{{\"cursor\":{}}}", json_string(c).get()));
        async move {
            let server = &session.topology().servers[i];
            // A sleeping server is listed from what it last listed, not woken by a listing.
            if p.is_none()
                && let Some((usage, init)) = session.resting(i)
            {
                if capability_bits(&init) & kind.cap == 0 {
                    return Ok(None);
                }
                if let Some(page) = server
                    .orchestrated
                    .as_ref()
                    .and_then(|o| o.listings.page(&usage, kind.method))
                {
                    return Ok(Some((Outcome::Result(page), true)));
                }
            }
            let bits = session.connect(i).await?;
            if bits & kind.cap == 0 {
                return Ok(None);
            }
            let started = Instant::now();
            let link = &session.links()[i];
            let r = match &p {
                None => link.first_page(kind.method).await,
                Some(p) => {
                    link.call(kind.method, Some(p.as_bytes()), CallOpts::default())
                        .await
                }
            };
            if p.is_none()
                && link.answers_alike()
                && let (Some(o), Ok(Outcome::Result(page))) = (&server.orchestrated, &r)
                && let Some(usage) = o.runtime.usage(&server.name)
                && let Some(init) = link.init_result()
            {
                o.listings.keep(&usage, init, kind.method, page.clone());
            }
            let outcome = match &r {
                Ok(Outcome::Result(_)) => "ok",
                Ok(Outcome::Error(_)) => "error",
                Err(_) => "failed",
            };
            server
                .requests
                .record(kind.method, outcome, started.elapsed());
            r.map(|o| Some((o, false)))
        }
    });
    let results = futures_util::future::join_all(calls).await;

    let mut items = BytesMut::with_capacity(4096);
    let mut next: Vec<(String, String)> = Vec::new();
    let mut failures = Vec::new();
    let mut answered = 0usize;
    let mut asleep: Vec<&str> = Vec::new();
    for ((index, cursor), r) in targets.iter().zip(results) {
        let name = session.topology().router.name(*index);
        let asked_from_start = cursor.is_none();
        let page = match r {
            Ok(None) => {
                // No such list: nothing it could claim by it.
                if let Some(list) = kind.listed() {
                    session.topology().router.listed(*index, list);
                }
                answered += 1;
                continue;
            }
            Ok(Some((Outcome::Error(e), _)))
                if jsonrpc::error_code(&e) == Some(code::METHOD_NOT_FOUND)
                    && (walk || asked_from_start) =>
            {
                // No such method: nothing it could claim by it either.
                if let Some(list) = kind.listed() {
                    session.topology().router.listed(*index, list);
                }
                failures.push(format!("{name}: answered error {}", code::METHOD_NOT_FOUND));
                continue;
            }
            Ok(Some((Outcome::Result(page), cached))) => {
                if cached {
                    asleep.push(name);
                }
                page
            }
            Ok(Some((Outcome::Error(e), _))) => {
                // The server's words stay in the log: they have not been through the result
                // plugins.
                let code = jsonrpc::error_code(&e).unwrap_or(0);
                if let Some(more) = session.topology().servers[*index].failure_logged() {
                    tracing::warn!(
                        upstream = name,
                        method = kind.method,
                        "list failed: {}{more}",
                        crate::upstream::server_text(&e)
                    );
                }
                failures.push(format!("{name}: answered error {code}"));
                continue;
            }
            Err(e) => {
                if let Some(more) = session.topology().servers[*index].failure_logged() {
                    tracing::warn!(
                        upstream = name,
                        method = kind.method,
                        said = e.said(),
                        "list failed: {e}{more}"
                    );
                }
                failures.push(e.to_string());
                continue;
            }
        };
        // A first page from the link's cache is the same buffer as last time: without plugins
        // (whose verdicts may change) what was made of it then still holds.
        // Nor tools under pinning (each listing is checked).
        let reusable = cursor.is_none()
            && page.len() <= crate::upstream::MAX_CACHED_LIST_PAGE
            && sv.plugins.current().is_empty()
            && (sv.pins.is_none() || kind.key != "tools");
        let merged = match reusable
            .then(|| session.merged_page(*index, kind.method, &page))
            .flatten()
        {
            Some(m) => Ok(m),
            None => {
                let mut part = BytesMut::new();
                merge_page(sv, session, *index, kind, &page, &mut part)
                    .await
                    .map(|cursor| {
                        let part = part.freeze();
                        if reusable {
                            session.keep_merged_page(
                                *index,
                                kind.method,
                                page.clone(),
                                part.clone(),
                                cursor.clone(),
                            );
                        }
                        (part, cursor)
                    })
            }
        };
        match merged {
            Ok((part, cursor)) => {
                answered += 1;
                if cursor.is_none()
                    && (walk || asked_from_start)
                    && let Some(list) = kind.listed()
                {
                    session.topology().router.listed(*index, list);
                }
                if !part.is_empty() {
                    if !items.is_empty() {
                        items.put_u8(b',');
                    }
                    items.put_slice(&part);
                }
                if let Some(c) = cursor {
                    next.push((name.to_owned(), c));
                }
            }
            Err(e) => {
                if let Some(more) = session.topology().servers[*index].failure_logged() {
                    tracing::warn!(
                        upstream = name,
                        method = kind.method,
                        "malformed list result: {e}{more}"
                    );
                }
                failures.push(format!("{name}: malformed result"));
            }
        }
    }
    if answered == 0 && !failures.is_empty() {
        return Reply::Json(jsonrpc::error_response(
            Some(id),
            code::UPSTREAM_UNAVAILABLE,
            &format!(
                "no upstream answered {}: {}",
                kind.method,
                failures.join("; ")
            ),
        ));
    }
    let mut out = BytesMut::with_capacity(items.len() + 64);
    out.put_slice(b"{\"");
    out.put_slice(kind.key.as_bytes());
    out.put_slice(b"\":[");
    out.put_slice(&items);
    out.put_u8(b']');
    if !next.is_empty() {
        out.put_slice(b",\"nextCursor\":");
        out.put_slice(json_string(&encode_cursor(&next)).get().as_bytes());
    }
    if !asleep.is_empty() {
        // Say which servers' entries are what they listed before they went to sleep.
        out.put_slice(b",\"_meta\":{\"");
        out.put_slice(ASLEEP_META.as_bytes());
        out.put_slice(b"\":");
        out.put_slice(
            serde_json::to_string(&asleep)
                .unwrap_or_else(|_| "[]".into())
                .as_bytes(),
        );
        out.put_u8(b'}');
    }
    out.put_u8(b'}');
    Reply::Json(jsonrpc::response(id, &Outcome::Result(out.freeze())))
}

/// Appends one upstream's page to `items`, hiding what the filter-list plugins hide.
pub(super) async fn merge_page(
    sv: Services<'_>,
    session: &Session,
    index: usize,
    kind: ListKind,
    page: &[u8],
    items: &mut BytesMut,
) -> Result<Option<String>, String> {
    let f: Fields<'_> = serde_json::from_slice(page).map_err(|e| e.to_string())?;
    let list: Vec<&RawValue> = match f.get(kind.key) {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let plugins = sv.plugins.current();
    let shown = if plugins.is_empty() {
        None
    } else {
        let server = &session.topology().servers[index].name;
        Some(
            policy::visible(&plugins, session.caller(), kind.method, server, &list)
                .await
                .map_err(|d| d.to_string())?,
        )
    };
    let router = &session.topology().router;
    let prefixing = kind.rename && router.prefixing();
    let server = &session.topology().servers[index];
    let pins = sv.pins.filter(|_| kind.key == "tools");
    for (i, item) in list.into_iter().enumerate() {
        let raw = item.get();
        if let Some(why) = crate::mcp::list_page::misread_member(raw) {
            tracing::debug!(server = %server.name, "a listed item left out: {why}");
            continue;
        }
        // Every definition seen is checked against its pin; a flagged one is not shown.
        if let Some(pins) = pins
            && !pins.observe(&server.name, server.label, raw, sv.audit, sv.metrics)
        {
            continue;
        }
        // Resources are learned for routing even when hidden: a read of a hidden one is then
        // denied by policy, not reported unknown.
        if matches!(kind.key, "resources" | "resourceTemplates") {
            let entry: Fields<'_> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            if kind.key == "resources" {
                if let Ok(uri) = string_field(&entry, "uri") {
                    router.learn_resource(&uri, index);
                }
            } else if let Ok(t) = string_field(&entry, "uriTemplate") {
                router.learn_template(&t, index);
            }
        }
        if shown
            .as_ref()
            .is_some_and(|v| !v.get(i).copied().unwrap_or(false))
        {
            continue;
        }
        if let Some(profile) = session.profile() {
            match profile_item(profile, router, index, kind, raw)? {
                ProfileItem::Hidden => continue,
                ProfileItem::Rewritten(new) => {
                    if !items.is_empty() {
                        items.put_u8(b',');
                    }
                    items.put_slice(&new);
                    continue;
                }
                ProfileItem::AsIs => {}
            }
        }
        if prefixing {
            // Only the name changes: splice the public one in, keep the rest as sent.
            #[derive(serde::Deserialize)]
            struct Named<'a> {
                #[serde(borrow)]
                name: &'a RawValue,
            }
            let named: Named<'_> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            let name: Cow<'_, str> =
                serde_json::from_str(named.name.get()).map_err(|e| e.to_string())?;
            let start = named.name.get().as_ptr() as usize - raw.as_ptr() as usize;
            let end = start + named.name.get().len();
            let public = json_string(&router.public_name(index, &name));
            if !items.is_empty() {
                items.put_u8(b',');
            }
            items.put_slice(&raw.as_bytes()[..start]);
            items.put_slice(public.get().as_bytes());
            items.put_slice(&raw.as_bytes()[end..]);
        } else {
            if !items.is_empty() {
                items.put_u8(b',');
            }
            items.put_slice(raw.as_bytes());
        }
    }
    if let Some(pins) = pins {
        pins.flush().await;
    }
    match f.get("nextCursor") {
        Some(c) => match serde_json::from_str::<Option<String>>(c.get()) {
            // Carried inside the gateway's own cursor: keep the one the client sees small.
            Ok(Some(c)) if c.len() > MAX_UPSTREAM_CURSOR => Err(format!(
                "nextCursor of {} bytes (at most {MAX_UPSTREAM_CURSOR})",
                c.len()
            )),
            other => other.map_err(|e| e.to_string()),
        },
        None => Ok(None),
    }
}

/// What a profile makes of one listing item.
enum ProfileItem {
    Hidden,
    AsIs,
    /// A tool renamed or with fields overridden, re-encoded.
    Rewritten(Vec<u8>),
}

fn profile_item(
    profile: &Profile,
    router: &Router,
    index: usize,
    kind: ListKind,
    raw: &str,
) -> Result<ProfileItem, String> {
    let entry: Fields<'_> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let shown = match kind.key {
        "tools" => {
            let name = string_field(&entry, "name")?;
            match profile.shows_tool(index, &name) {
                Shown::Hidden => return Ok(ProfileItem::Hidden),
                Shown::AsIs => return Ok(ProfileItem::AsIs),
                Shown::Tool(view) if view.rename.is_none() && !view.rewrites_fields() => {
                    return Ok(ProfileItem::AsIs);
                }
                Shown::Tool(view) => {
                    let public = profile
                        .public_tool_name(router, index, &name)
                        .unwrap_or(Cow::Borrowed(&*name));
                    let tool: &RawValue = serde_json::from_str(raw).map_err(|e| e.to_string())?;
                    return view
                        .rewrite(tool, &public)
                        .map(ProfileItem::Rewritten)
                        .ok_or_else(|| "a tool must be an object".to_owned());
                }
            }
        }
        "prompts" => {
            let name = string_field(&entry, "name")?;
            profile.shows_prompt(index, &name)
        }
        "resources" => {
            let uri = string_field(&entry, "uri")?;
            profile.shows_resource(index, &uri)
        }
        _ => {
            let t = string_field(&entry, "uriTemplate")?;
            profile.shows_resource(index, &t)
        }
    };
    Ok(if shown {
        ProfileItem::AsIs
    } else {
        ProfileItem::Hidden
    })
}

/// What checking a call against the pins uses, owned: the check runs in the call's own task.
pub(super) struct Pinning {
    pub pins: Arc<crate::pins::Pins>,
    pub audit: Arc<crate::audit::Audit>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Whether the pins allow the session to call `local` on upstream `index`: its list checked
/// (once per list and connection, [`pin_check`]) and the tool approved. `Ok` is the
/// generation of the connection checked, which the call must go on (`None`: the list could
/// not be read and the pins do not block). `Err` says why not.
pub(super) async fn pins_allow(
    pinning: &Pinning,
    session: &Arc<Session>,
    index: usize,
    local: &str,
) -> Result<Option<u64>, PinRefusal> {
    let pins = &pinning.pins;
    let server = &session.topology().servers[index];
    // A server that cannot be reached now (or has no room for this caller) fails the call as
    // such: it is not a tool the pins refuse.
    if let Err(e) = session.connect(index).await {
        return Err(PinRefusal::Upstream(e));
    }
    match pin_check(pinning, session, index).await {
        Ok(generation) => pins
            .check(&server.name, local)
            .map(|()| Some(generation))
            .map_err(PinRefusal::Denied),
        Err(why) if pins.blocks() => Err(PinRefusal::Denied(why)),
        Err(_) => Ok(None),
    }
}

/// Why a call is not sent after its pin check.
pub(super) enum PinRefusal {
    /// The pins refuse it (a changed or unapproved tool, or a list that cannot be checked).
    Denied(String),
    /// The server cannot be reached for it.
    Upstream(crate::upstream::UpstreamError),
}

/// Most pages of a tool list read to check it against the pins.
const MAX_PIN_PAGES: usize = 50;

/// Checks the tool definitions of upstream `index` against the pins before the session's
/// calls to it: every page of its list, once per list and connection (again after it
/// announces a change, or is reached anew). A server that changed a tool since it was
/// approved (between two runs, say) is caught even when the client calls without listing.
/// `Err` says why the list could not be checked.
async fn pin_check(pinning: &Pinning, session: &Arc<Session>, index: usize) -> Result<u64, String> {
    let pins = &pinning.pins;
    let server = &session.topology().servers[index];
    // Connected first (waking a sleeping server): the check is of this connection's list.
    let connected = session.connect(index).await;
    let read = async {
        let bits = connected.map_err(|e| e.to_string())?;
        if bits & caps::TOOLS == 0 {
            return Ok(()); // no tools: nothing to call either (the pins know none)
        }
        let link = &session.links()[index];
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PIN_PAGES {
            let page = match &cursor {
                None => link.first_page(TOOLS.method).await,
                Some(c) => {
                    let p = format!("{{\"cursor\":{}}}", json_string(c).get());
                    link.call(TOOLS.method, Some(p.as_bytes()), CallOpts::default())
                        .await
                }
            };
            let page = match page.map_err(|e| e.to_string())? {
                Outcome::Result(page) => page,
                // The server's words stay in the log (they reach the client in a refusal,
                // unscreened by the result plugins).
                Outcome::Error(e) => {
                    if let Some(more) = server.failure_logged() {
                        tracing::warn!(upstream = %server.name, "tools/list for the pin check failed: {}{more}", crate::upstream::server_text(&e));
                    }
                    return Err(format!(
                        "its tools/list answered error {}",
                        jsonrpc::error_code(&e).unwrap_or(0)
                    ));
                }
            };
            #[derive(serde::Deserialize)]
            struct Page<'a> {
                #[serde(borrow, default)]
                tools: Vec<&'a RawValue>,
                #[serde(rename = "nextCursor")]
                next: Option<String>,
            }
            let p: Page<'_> = serde_json::from_slice(&page).map_err(|e| {
                if let Some(more) = server.failure_logged() {
                    tracing::warn!(upstream = %server.name, "tools/list for the pin check is malformed: {e}{more}");
                }
                "its tools/list result is malformed".to_owned()
            })?;
            for tool in p.tools {
                pins.observe(
                    &server.name,
                    server.label,
                    tool.get(),
                    &pinning.audit,
                    &pinning.metrics,
                );
            }
            pins.flush().await;
            match p.next {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
        Err(format!("more than {MAX_PIN_PAGES} pages"))
    };
    // The whole list within one call's deadline, not a deadline a page.
    let timeout = server.config.call_timeout;
    let read = async {
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| Err(format!("it took longer than {timeout:?}")))
    };
    session.pin_check(index, read).await.map_err(|e| {
        format!(
            "the tool list of server {} could not be read to check its definitions: {e}",
            server.name
        )
    })
}
