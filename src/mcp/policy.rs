//! The policy stage: runs the Wasm plugin chains (see [`crate::plugins`]) on calls, on their
//! results and on listings, between the router and the upstream.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use futures_util::future::BoxFuture;

use crate::audit::Audit;
use crate::auth::Claims;
use crate::mcp::jsonrpc::{self, Kind, Message};
use crate::mcp::session::{Caller, MessagePolicy, Session};
use crate::plugins::{CallContext, Decision, Denied, EntryKind, ListEntry, PluginSet};

/// One call as the plugins see it: method, upstream, and the name the upstream knows.
pub struct Policy {
    set: Arc<PluginSet>,
    method: String,
    server: Arc<str>,
    name: Option<String>,
    principal: Option<Arc<str>>,
    profile: Option<Arc<str>>,
    claims: Arc<Claims>,
    session_id: Arc<str>,
    /// Where denials are recorded (when the trail is on).
    audit: Option<Arc<Audit>>,
    /// The target as its server lists it ([`Policy::learn_target`]).
    target: Target,
}

/// How a call's target is listed, for the filter-list plugins.
enum Target {
    /// Not read (no plugin filters listings, or the call names no target).
    NotRead,
    /// The entries that stand for it: its own, or a resource's URI and its template.
    Listed(Vec<ListEntry>),
    /// Its server does not list it, or its lists could not be read: why.
    Unlisted(String),
}

impl Policy {
    /// The policy for a call, or `None` when no plugin is configured (the fast path).
    pub fn for_call(
        set: &Arc<PluginSet>,
        audit: Option<&Arc<Audit>>,
        caller: Caller<'_>,
        method: &str,
        server: &Arc<str>,
        name: Option<&str>,
    ) -> Option<Policy> {
        (!set.is_empty()).then(|| Policy {
            set: set.clone(),
            method: method.to_owned(),
            server: server.clone(),
            name: name.map(str::to_owned),
            principal: caller.principal.cloned(),
            profile: caller.profile.cloned(),
            claims: caller.claims.clone(),
            session_id: caller.session_id.clone(),
            audit: audit.filter(|a| a.is_on()).cloned(),
            target: Target::NotRead,
        })
    }

    /// Reads how upstream `index` lists the call's target (an entry of one of `kinds`, the
    /// first found), when a plugin filters listings: such a plugin then judges the call by the
    /// entries the caller's listing would show, labels and description included, not by its
    /// name alone. A resource that no listed resource is, is judged as its URI and as the
    /// template it matches. A target its server does not list, or whose lists cannot be read,
    /// cannot be judged, and is refused: the filters fail closed.
    pub async fn learn_target(&mut self, session: &Session, index: usize, kinds: &[EntryKind]) {
        if !self.set.filters_lists() {
            return;
        }
        let Some(name) = self.name.clone() else {
            return;
        };
        let mut unreadable = None;
        for kind in kinds {
            match listed_target(session, index, *kind, &name).await {
                Ok(Some(entry)) => {
                    self.target = Target::Listed(vec![entry]);
                    return;
                }
                Ok(None) => {}
                Err(why) => unreadable = Some(why),
            }
        }
        if kinds.contains(&EntryKind::Resource) {
            match matching_template(session, index, &name).await {
                Ok(Some(template)) => {
                    let own = ListEntry {
                        kind: EntryKind::Resource,
                        name: name.clone(),
                        description: None,
                        labels: Vec::new(),
                    };
                    self.target = Target::Listed(vec![own, template]);
                    return;
                }
                Ok(None) => {}
                Err(why) => unreadable = Some(why),
            }
        }
        self.target = Target::Unlisted(unreadable.unwrap_or_else(|| {
            format!("its server does not list it (within {MAX_TARGET_PAGES} pages)")
        }));
    }

    /// The entries the plugins judge the target by (`None`: by name), or the refusal of a
    /// target that cannot be judged.
    fn listed(&self) -> Result<Option<&[ListEntry]>, Denied> {
        match &self.target {
            Target::NotRead => Ok(None),
            Target::Listed(entries) => Ok(Some(entries)),
            Target::Unlisted(why) => Err(Denied {
                plugin: self.set.list_filter().unwrap_or_else(|| Arc::from("lists")),
                code: crate::plugins::POLICY_DENIED,
                message: format!(
                    "{} cannot be judged by the list filters: {why}",
                    self.name.as_deref().unwrap_or_default()
                ),
                fault: None,
            }),
        }
    }

    fn ctx(&self) -> CallContext<'_> {
        CallContext {
            method: &self.method,
            server: &self.server,
            name: self.name.as_deref(),
            principal: self.principal.as_deref(),
            session_id: &self.session_id,
            profile: self.profile.as_deref(),
            groups: &self.claims.groups,
            scopes: &self.claims.scopes,
        }
    }

    /// Runs the on-request chain over the call's arguments (raw JSON).
    pub async fn on_request(&self, arguments: &str) -> Decision {
        let decision = match self.listed() {
            Ok(listed) => {
                self.set
                    .on_request_listed(&self.ctx(), listed, arguments)
                    .await
            }
            Err(d) => Decision::Deny(d),
        };
        if let Decision::Deny(d) = &decision {
            self.record_denial(d);
        }
        decision
    }

    /// Runs the on-request chain over params the gateway sends as they are: a rewrite is
    /// refused ([`crate::plugins::PluginSet::on_request_as_is`]).
    pub async fn on_request_as_is(&self, params: &str) -> Decision {
        let decision = match self.listed() {
            Ok(listed) => self.set.on_request_as_is(&self.ctx(), listed, params).await,
            Err(d) => Decision::Deny(d),
        };
        if let Decision::Deny(d) = &decision {
            self.record_denial(d);
        }
        decision
    }

    /// Denies the call when the caller may not see the `kind` entry `name` it uses.
    pub async fn check_target(&self, kind: EntryKind, name: &str) -> Option<Denied> {
        let denied = match self.listed() {
            Ok(listed) => self.set.check_target(&self.ctx(), kind, name, listed).await,
            Err(d) => Some(d),
        };
        if let Some(d) = &denied {
            self.record_denial(d);
        }
        denied
    }

    /// Writes a denial to the audit trail: who, what, and which plugin said no.
    fn record_denial(&self, d: &Denied) {
        if let Some(audit) = &self.audit {
            audit.record(crate::audit::Event {
                kind: "denial",
                principal: self.principal.clone(),
                session: Some(crate::audit::SessionName::new(self.session_id.clone())),
                profile: self.profile.clone(),
                server: Some(self.server.clone()),
                method: self.method.clone().into(),
                name: self.name.clone(),
                decision: "denied",
                by: Some(d.plugin.clone()),
                outcome: Some(d.message.clone().into()),
                ..Default::default()
            });
        }
    }

    /// Runs the on-response chain: `Ok(Some(new))` when a plugin rewrote the result.
    pub async fn on_response(&self, result: &[u8]) -> Result<Option<Bytes>, Denied> {
        // Checked on the fast path (answers are UTF-8 JSON); the lossy decoder walks byte
        // by byte, 7 instructions a byte of a 64 KiB result under callgrind.
        let text = match std::str::from_utf8(result) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(result),
        };
        match self.set.on_response(&self.ctx(), &text).await {
            Decision::Allow => Ok(None),
            Decision::Rewrite(new) => Ok(Some(Bytes::from(new))),
            Decision::Deny(d) => {
                self.record_denial(&d);
                Err(d)
            }
        }
    }
}

/// Runs what servers send to a client (log lines, progress, sampling and elicitation requests)
/// through the result chains, as the method it is: a redaction that applies to results applies
/// to a log line too. A denied message is dropped (and audited); a rewrite replaces its params.
pub struct PluginMessagePolicy {
    plugins: Arc<crate::plugins::Plugins>,
    audit: Arc<Audit>,
}

impl PluginMessagePolicy {
    /// The stage over the gateway's (hot-reloadable) plugins, recording denials in `audit`.
    pub fn stage(
        plugins: Arc<crate::plugins::Plugins>,
        audit: Arc<Audit>,
    ) -> Arc<dyn MessagePolicy> {
        Arc::new(PluginMessagePolicy { plugins, audit })
    }
}

impl MessagePolicy for PluginMessagePolicy {
    fn active(&self) -> bool {
        !self.plugins.current().is_empty()
    }

    fn server_message<'a>(
        &'a self,
        session: &'a Session,
        index: usize,
        msg: Message,
    ) -> BoxFuture<'a, Option<Message>> {
        Box::pin(async move {
            let set = self.plugins.current();
            let (method, params) = match &msg.kind {
                Kind::Request { method, params, .. } | Kind::Notification { method, params } => {
                    (method.clone(), params.clone())
                }
                Kind::Response { .. } => return Some(msg),
            };
            let server = session.topology().servers.get(index)?.name.clone();
            let Some(policy) = Policy::for_call(
                &set,
                Some(&self.audit),
                session.caller(),
                &method,
                &server,
                None,
            ) else {
                return Some(msg);
            };
            match policy.on_response(params.as_deref().unwrap_or(b"{}")).await {
                Ok(None) => Some(msg),
                Ok(Some(new)) => {
                    if !new.trim_ascii_start().starts_with(b"{")
                        || serde_json::from_slice::<&RawValue>(&new).is_err()
                    {
                        tracing::warn!(%method, "a plugin rewrote a server message into something that is not a JSON object; dropped it");
                        return None;
                    }
                    let frame = match &msg.kind {
                        Kind::Request { id, .. } => jsonrpc::request(id, &method, Some(&new)),
                        _ => jsonrpc::notification(&method, Some(&new)),
                    };
                    jsonrpc::parse(frame).ok()
                }
                Err(d) => {
                    tracing::debug!(%method, "a plugin withheld a server message: {d}");
                    None
                }
            }
        })
    }
}

/// Which entries of one upstream's listing the caller may see.
pub async fn visible(
    set: &PluginSet,
    caller: Caller<'_>,
    list_method: &str,
    server: &str,
    items: &[&RawValue],
) -> Result<Vec<bool>, Denied> {
    let kind = match list_method {
        "tools/list" => EntryKind::Tool,
        "prompts/list" => EntryKind::Prompt,
        "resources/list" => EntryKind::Resource,
        _ => EntryKind::ResourceTemplate,
    };
    let entries: Vec<ListEntry> = items.iter().map(|i| entry(kind, i)).collect();
    let ctx = CallContext {
        method: list_method,
        server,
        name: None,
        principal: caller.principal.map(|p| &**p),
        session_id: caller.session_id,
        profile: caller.profile.map(|p| &**p),
        groups: &caller.claims.groups,
        scopes: &caller.claims.scopes,
    };
    set.filter_list(&ctx, &entries).await
}

/// Most pages of a server's list read to find how it lists a call's target.
const MAX_TARGET_PAGES: usize = 50;

/// Calls `each` with every item of upstream `index`'s `method` list (`key` in its pages), page
/// by page (the first cached where the server announces changes), until it returns true;
/// `Err` says why a page could not be read.
async fn walk_list(
    session: &Session,
    index: usize,
    method: &'static str,
    key: &str,
    mut each: impl FnMut(&RawValue) -> bool,
) -> Result<(), String> {
    let link = session
        .links()
        .get(index)
        .ok_or_else(|| "no such server".to_owned())?;
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_TARGET_PAGES {
        let page = match &cursor {
            None => link.first_page(method).await,
            Some(c) => {
                let mut p = b"{\"cursor\":".to_vec();
                crate::json_string::put(&mut p, c);
                p.push(b'}');
                link.call(method, Some(&p), crate::upstream::CallOpts::default())
                    .await
            }
        };
        let page = match page {
            Ok(jsonrpc::Outcome::Result(page)) => page,
            Ok(jsonrpc::Outcome::Error(_)) => return Err(format!("its {method} failed")),
            Err(e) => return Err(format!("its {method} failed: {e}")),
        };
        let fields: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_slice(&page)
            .map_err(|_| format!("its {method} answer is not an object"))?;
        if let Some(items) = fields.get(key) {
            let items: Vec<&RawValue> = serde_json::from_str(items.get())
                .map_err(|_| format!("its {method} {key} are not a list"))?;
            if items.into_iter().any(&mut each) {
                return Ok(());
            }
        }
        cursor = match fields
            .get("nextCursor")
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        {
            Some(next) => Some(next),
            None => return Ok(()),
        };
    }
    Ok(())
}

/// The text of member `key` of a listing item, when it is a string.
fn member_text<'a>(item: &'a RawValue, key: &str) -> Option<Cow<'a, str>> {
    let members: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_str(item.get()).ok()?;
    serde_json::from_str::<Cow<'_, str>>(members.get(key)?.get())
        .ok()
        .map(|t| Cow::Owned(t.into_owned()))
}

/// The entry upstream `index` lists for `name` (a tool's or prompt's name, a resource's URI, a
/// template's URI template): `Ok(None)` when it does not list it.
async fn listed_target(
    session: &Session,
    index: usize,
    kind: EntryKind,
    name: &str,
) -> Result<Option<ListEntry>, String> {
    let (method, key, named_by) = match kind {
        EntryKind::Tool => ("tools/list", "tools", "name"),
        EntryKind::Prompt => ("prompts/list", "prompts", "name"),
        EntryKind::Resource => ("resources/list", "resources", "uri"),
        EntryKind::ResourceTemplate => (
            "resources/templates/list",
            "resourceTemplates",
            "uriTemplate",
        ),
        EntryKind::Server => return Ok(None),
    };
    let mut found = None;
    walk_list(session, index, method, key, |item| {
        if member_text(item, named_by).is_some_and(|n| n == name) {
            found = Some(entry(kind, item));
        }
        found.is_some()
    })
    .await?;
    Ok(found)
}

/// The template of upstream `index` that resource `uri` matches (the longest literal prefix,
/// as the router routes by), if any.
async fn matching_template(
    session: &Session,
    index: usize,
    uri: &str,
) -> Result<Option<ListEntry>, String> {
    let mut best: Option<(usize, ListEntry)> = None;
    walk_list(
        session,
        index,
        "resources/templates/list",
        "resourceTemplates",
        |item| {
            if let Some(template) = member_text(item, "uriTemplate") {
                let prefix = template.split('{').next().unwrap_or_default();
                if !prefix.is_empty()
                    && uri.starts_with(prefix)
                    && best.as_ref().is_none_or(|(len, _)| prefix.len() > *len)
                {
                    best = Some((prefix.len(), entry(EntryKind::ResourceTemplate, item)));
                }
            }
            false
        },
    )
    .await?;
    Ok(best.map(|(_, e)| e))
}

/// A listing item as a [`ListEntry`]: its name (URI for resources), description and labels.
///
/// Labels come from the tool's behaviour hints (`destructive`, `read-only`, `idempotent`,
/// `open-world` when the hint is true) and from `_meta["gatehouse/labels"]`.
fn entry(kind: EntryKind, item: &RawValue) -> ListEntry {
    #[derive(Deserialize, Default)]
    struct Item<'a> {
        name: Option<String>,
        uri: Option<String>,
        #[serde(rename = "uriTemplate")]
        uri_template: Option<String>,
        description: Option<String>,
        // Read as text: a server's annotations are never a value tree of its choosing.
        #[serde(borrow, default)]
        annotations: BTreeMap<Cow<'a, str>, &'a RawValue>,
        #[serde(borrow, rename = "_meta")]
        meta: Option<BTreeMap<Cow<'a, str>, &'a RawValue>>,
    }
    let it: Item<'_> = serde_json::from_str(item.get()).unwrap_or_default();
    let name = match kind {
        EntryKind::Resource => it.uri,
        EntryKind::ResourceTemplate => it.uri_template,
        _ => it.name,
    };
    let mut labels: Vec<String> = [
        ("destructiveHint", "destructive"),
        ("readOnlyHint", "read-only"),
        ("idempotentHint", "idempotent"),
        ("openWorldHint", "open-world"),
    ]
    .iter()
    .filter(|(hint, _)| it.annotations.get(*hint).is_some_and(|v| v.get() == "true"))
    .map(|(_, label)| (*label).to_owned())
    .collect();
    if let Some(extra) = it
        .meta
        .as_ref()
        .and_then(|m| m.get("gatehouse/labels"))
        .and_then(|raw| serde_json::from_str::<Vec<String>>(raw.get()).ok())
    {
        labels.extend(extra);
    }
    ListEntry {
        kind,
        name: name.unwrap_or_default(),
        description: it.description,
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_hints_and_meta_labels() {
        let raw: Box<RawValue> = serde_json::from_str(
            r#"{"name":"rm","description":"Deletes","annotations":{"destructiveHint":true,"readOnlyHint":false},
                "_meta":{"gatehouse/labels":["fs"]},"inputSchema":{"type":"object"}}"#,
        )
        .unwrap();
        let e = entry(EntryKind::Tool, &raw);
        assert_eq!(e.name, "rm");
        assert_eq!(e.description.as_deref(), Some("Deletes"));
        assert_eq!(e.labels, ["destructive", "fs"]);
        let r: Box<RawValue> = serde_json::from_str(r#"{"uri":"file:///a","name":"a"}"#).unwrap();
        assert_eq!(entry(EntryKind::Resource, &r).name, "file:///a");
    }
}
