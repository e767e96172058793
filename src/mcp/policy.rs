//! The policy stage: runs the Wasm plugin chains (see [`crate::plugins`]) on calls, on their
//! results and on listings, between the router and the upstream.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use futures_util::future::BoxFuture;

use crate::audit::Audit;
use crate::auth::Claims;
use crate::mcp::jsonrpc::{self, Kind, Message, Outcome};
use crate::mcp::list_page::{Described, ListPage};
use crate::mcp::session::{Caller, MessagePolicy, Session};
use crate::plugins::{CallContext, Decision, Denied, EntryKind, JsonText, ListEntry, PluginSet};
use crate::upstream::UpstreamError;

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
    /// Its server does not list it (within [`MAX_TARGET_PAGES`]).
    Unlisted,
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
    /// name alone. A resource that no listed resource is, is judged as an instance of the
    /// templates it matches (with their labels) and as each of them. A target its server does
    /// not list cannot be judged, and is refused: the filters fail closed. `Err`: the server
    /// failed, and the call answers with its failure.
    pub async fn learn_target(
        &mut self,
        session: &Session,
        index: usize,
        kinds: &[EntryKind],
    ) -> Result<(), UpstreamError> {
        if !self.set.filters_lists() {
            return Ok(());
        }
        let Some(name) = self.name.clone() else {
            return Ok(());
        };
        // Every list read within one call's deadline, not one a page or one a list: a server
        // answering each page just in time must not hold the call (and its session's room)
        // for many deadlines.
        let server = &session.topology().servers[index];
        let timeout = server.config.call_timeout;
        self.target = tokio::time::timeout(timeout, read_target(session, index, kinds, &name))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    server: server.name.clone(),
                    timeout,
                })
            })?;
        if matches!(self.target, Target::Unlisted) {
            tracing::debug!(server = %self.server, target = ?name, "not in its server's lists: refused while a plugin filters listings");
        }
        Ok(())
    }

    /// The entries the plugins judge the target by (`None`: by name), or the refusal of a
    /// target that cannot be judged.
    fn listed(&self) -> Result<Option<&[ListEntry]>, Denied> {
        match &self.target {
            Target::NotRead => Ok(None),
            Target::Listed(entries) => Ok(Some(entries)),
            // Said as a hidden entry is: a caller cannot tell what its server lists.
            Target::Unlisted => Err(Denied {
                plugin: self.set.list_filter().unwrap_or_else(|| Arc::from("lists")),
                code: crate::plugins::POLICY_DENIED,
                message: format!(
                    "{} is not available to this caller",
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
    pub async fn on_request(&self, arguments: &JsonText) -> Decision {
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
    pub async fn on_request_as_is(&self, params: &JsonText) -> Decision {
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
                principal: self.principal.as_deref(),
                session: Some(crate::audit::SessionName::new(&self.session_id)),
                profile: self.profile.as_deref(),
                server: Some(&self.server),
                method: &self.method,
                name: self.name.as_deref(),
                decision: "denied",
                by: Some(&d.plugin),
                outcome: Some(&d.message),
                ..Default::default()
            });
        }
    }

    /// Runs the on-response chain: `Ok(Some(new))` when a plugin rewrote the result.
    pub async fn on_response(&self, result: &Bytes) -> Result<Option<Bytes>, Denied> {
        let decision = self
            .set
            .on_response(&self.ctx(), &JsonText::from_utf8(result))
            .await;
        self.judged(decision)
    }

    /// Runs the on-response chains over a server's own message (its params), whatever tools
    /// they select: see [`crate::plugins::PluginSet::on_server_message`].
    pub async fn on_server_message(&self, params: &Bytes) -> Result<Option<Bytes>, Denied> {
        let decision = self
            .set
            .on_server_message(&self.ctx(), &JsonText::from_utf8(params))
            .await;
        self.judged(decision)
    }

    fn judged(&self, decision: Decision) -> Result<Option<Bytes>, Denied> {
        match decision {
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
/// through the result chains of its server, as the method it is and whatever methods and tools
/// a chain selects (it may belong to any call): a redaction that applies to results applies to
/// a log line too. A denied message is dropped (and audited); a rewrite replaces its params.
/// And the client's answers to those requests through the request chains, as what goes to a
/// server: a denied answer reaches the server as an error (and is audited).
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
            let params = params.unwrap_or_else(|| Bytes::from_static(b"{}"));
            match policy.on_server_message(&params).await {
                Ok(None) => Some(msg),
                Ok(Some(new)) => {
                    if !new.trim_ascii_start().starts_with(b"{")
                        || serde_json::from_slice::<&RawValue>(&new).is_err()
                    {
                        tracing::warn!(
                            ?method,
                            "a plugin rewrote a server message into something that is not a JSON object; dropped it"
                        );
                        return None;
                    }
                    let frame = match &msg.kind {
                        Kind::Request { id, .. } => jsonrpc::request(id, &method, Some(&new)),
                        _ => jsonrpc::notification(&method, Some(&new)),
                    };
                    jsonrpc::parse(frame).ok()
                }
                Err(d) => {
                    tracing::debug!(?method, "a plugin withheld a server message: {d}");
                    None
                }
            }
        })
    }

    fn client_answer<'a>(
        &'a self,
        session: &'a Session,
        index: usize,
        method: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Option<Outcome>> {
        Box::pin(async move {
            let set = self.plugins.current();
            let server = session.topology().servers.get(index)?.name.clone();
            let policy = Policy::for_call(
                &set,
                Some(&self.audit),
                session.caller(),
                method,
                &server,
                None,
            )?;
            let (Outcome::Result(answer) | Outcome::Error(answer)) = outcome;
            let decision = policy.on_request(&JsonText::from_utf8(answer)).await;
            judged_answer(outcome, decision)
        })
    }
}

/// The code and message every JSON-RPC error object has (a rewritten error answer must too).
#[derive(Deserialize)]
struct ErrorObject<'a> {
    #[allow(dead_code)] // read for its presence
    code: i64,
    #[allow(dead_code)]
    #[serde(borrow)]
    message: Cow<'a, str>,
}

/// What replaces a client's answer that `set`'s on-request chains judged: its rewrite when it
/// is still an answer of the same kind (a result a JSON object, an error one with a code and a
/// message), else an error that says it was refused.
fn judged_answer(outcome: &Outcome, decision: Decision) -> Option<Outcome> {
    match decision {
        Decision::Allow => None,
        Decision::Deny(d) => Some(Outcome::Error(jsonrpc::error_object(
            d.code,
            &format!("the gateway refused the client's answer: {d}"),
        ))),
        Decision::Rewrite(new) => {
            let object = new.trim_ascii_start().starts_with('{');
            let kept = match outcome {
                Outcome::Result(_) if object && serde_json::from_str::<&RawValue>(&new).is_ok() => {
                    Some(Outcome::Result(Bytes::from(new)))
                }
                Outcome::Error(_)
                    if object && serde_json::from_str::<ErrorObject>(&new).is_ok() =>
                {
                    Some(Outcome::Error(Bytes::from(new)))
                }
                _ => None,
            };
            kept.or_else(|| {
                tracing::warn!("a plugin rewrote a client's answer to a server into something that is not one; refused it");
                Some(Outcome::Error(jsonrpc::error_object(
                    crate::plugins::PLUGIN_FAILED,
                    "the gateway refused the client's answer: a plugin rewrote it into something that is not one",
                )))
            })
        }
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
    let (kind, key) = match list_method {
        "tools/list" => (EntryKind::Tool, "tools"),
        "prompts/list" => (EntryKind::Prompt, "prompts"),
        "resources/list" => (EntryKind::Resource, "resources"),
        _ => (EntryKind::ResourceTemplate, "resourceTemplates"),
    };
    // An item that cannot be read as clients read it is hidden, unjudged: the plugins would
    // judge another description or labels than the client shows.
    let read: Vec<Option<ListEntry>> = items
        .iter()
        .map(|i| {
            let (name, described) = Described::read_listed(i.get(), key)?;
            Some(ListEntry {
                kind,
                name: name.unwrap_or_default(),
                description: described.description,
                labels: described.labels,
            })
        })
        .collect();
    let readable: Vec<bool> = read.iter().map(Option::is_some).collect();
    let entries: Vec<ListEntry> = read.into_iter().flatten().collect();
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
    let judged = set.filter_list(&ctx, &entries).await?;
    if entries.len() == readable.len() {
        return Ok(judged);
    }
    let mut judged = judged.into_iter();
    Ok(readable
        .into_iter()
        .map(|read| read && judged.next().unwrap_or(false))
        .collect())
}

/// How upstream `index` lists `name`: see [`Policy::learn_target`].
async fn read_target(
    session: &Session,
    index: usize,
    kinds: &[EntryKind],
    name: &str,
) -> Result<Target, UpstreamError> {
    for kind in kinds {
        if let Some(entry) = listed_target(session, index, *kind, name).await? {
            return Ok(Target::Listed(vec![entry]));
        }
    }
    if kinds.contains(&EntryKind::Resource) {
        let templates = matching_templates(session, index, name).await?;
        if !templates.is_empty() {
            let instance = ListEntry {
                kind: EntryKind::Resource,
                name: name.to_owned(),
                description: templates.iter().find_map(|t| t.description.clone()),
                labels: templates.iter().flat_map(|t| t.labels.clone()).collect(),
            };
            let mut entries = vec![instance];
            entries.extend(templates);
            return Ok(Target::Listed(entries));
        }
    }
    Ok(Target::Unlisted)
}

/// Most pages of a server's list read to find how it lists a call's target.
const MAX_TARGET_PAGES: usize = 50;

/// Calls `each` with every page of upstream `index`'s `method` list (`key` in its pages), in
/// order (the first read once while the server's link keeps it), until it returns true. A page that is an error or cannot be read ends the walk (what it
/// would have listed is not listed); `Err` is the upstream's failure, for the call to answer
/// with.
async fn walk_list(
    session: &Session,
    index: usize,
    method: &'static str,
    key: &str,
    mut each: impl FnMut(&ListPage) -> bool,
) -> Result<(), UpstreamError> {
    let Some(link) = session.links().get(index) else {
        return Ok(());
    };
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_TARGET_PAGES {
        let page = match &cursor {
            None => match link.first_page(method).await? {
                jsonrpc::Outcome::Result(page) => session.list_page(index, method, key, page),
                jsonrpc::Outcome::Error(_) => return Ok(()),
            },
            Some(c) => {
                let mut p = b"{\"cursor\":".to_vec();
                crate::json_string::put(&mut p, c);
                p.push(b'}');
                match link
                    .call(method, Some(&p), crate::upstream::CallOpts::default())
                    .await?
                {
                    jsonrpc::Outcome::Result(page) => ListPage::read(page, key).map(Arc::new),
                    jsonrpc::Outcome::Error(_) => return Ok(()),
                }
            }
        };
        let Some(page) = page else {
            return Ok(());
        };
        if each(&page) {
            return Ok(());
        }
        cursor = match page.next_cursor() {
            Some(next) => Some(next.to_owned()),
            None => return Ok(()),
        };
    }
    Ok(())
}

/// The entry upstream `index` lists for `name` (a tool's or prompt's name, a resource's URI, a
/// template's URI template): `Ok(None)` when it does not list it.
async fn listed_target(
    session: &Session,
    index: usize,
    kind: EntryKind,
    name: &str,
) -> Result<Option<ListEntry>, UpstreamError> {
    let (method, key) = match kind {
        EntryKind::Tool => ("tools/list", "tools"),
        EntryKind::Prompt => ("prompts/list", "prompts"),
        EntryKind::Resource => ("resources/list", "resources"),
        EntryKind::ResourceTemplate => ("resources/templates/list", "resourceTemplates"),
        EntryKind::Server => return Ok(None),
    };
    let mut found = None;
    walk_list(session, index, method, key, |page| {
        found = page
            .find_described(name)
            .map(|described| entry(kind, name, described));
        found.is_some()
    })
    .await?;
    Ok(found)
}

/// The templates of upstream `index` that resource `uri` is an instance of.
async fn matching_templates(
    session: &Session,
    index: usize,
    uri: &str,
) -> Result<Vec<ListEntry>, UpstreamError> {
    let mut found = Vec::new();
    walk_list(
        session,
        index,
        "resources/templates/list",
        "resourceTemplates",
        |page| {
            for (i, (template, _)) in page.items().enumerate() {
                // A template that cannot be read is not judged by: the resource is then
                // judged by the others, or is not listed (refused).
                if template_matches(template, uri)
                    && let Some(described) = page.described(i)
                {
                    found.push(entry(EntryKind::ResourceTemplate, template, described));
                }
            }
            false
        },
    )
    .await?;
    Ok(found)
}

/// Longest template or URI matched against one another.
const MAX_MATCHED: usize = 4096;

/// Whether `uri` is an expansion of URI template `template` (RFC 6570, read loosely: each
/// expression matches any run of the characters its operator may expand to). Linear in the
/// URI per part of the template: a server's template cannot make it backtrack.
fn template_matches(template: &str, uri: &str) -> bool {
    if template.len() > MAX_MATCHED || uri.len() > MAX_MATCHED {
        return false;
    }
    let uri = uri.as_bytes();
    // Positions of `uri` the template's parts so far can end at.
    let mut at = vec![false; uri.len() + 1];
    at[0] = true;
    let mut rest = template;
    while !rest.is_empty() {
        let mut next = vec![false; uri.len() + 1];
        match rest.find('{') {
            Some(0) => {
                let Some(close) = rest.find('}') else {
                    return false;
                };
                let op = rest[1..close].chars().next().unwrap_or(' ');
                // The characters an expansion with this operator may hold.
                let allowed = |b: u8| match op {
                    '+' | '#' => true,
                    '/' => !matches!(b, b'?' | b'#'),
                    '?' | '&' => b != b'#',
                    _ => !matches!(b, b'/' | b'?' | b'#'),
                };
                let mut open = false;
                for i in 0..=uri.len() {
                    open |= at[i];
                    if open {
                        next[i] = true;
                    }
                    if i < uri.len() && !allowed(uri[i]) {
                        open = false;
                    }
                }
                rest = &rest[close + 1..];
            }
            found => {
                let literal = &rest[..found.unwrap_or(rest.len())];
                for i in 0..uri.len() {
                    if at[i] && uri[i..].starts_with(literal.as_bytes()) {
                        next[i + literal.len()] = true;
                    }
                }
                rest = &rest[literal.len()..];
            }
        }
        at = next;
    }
    at[uri.len()]
}

/// A listed item as a [`ListEntry`]: the name it is listed under (a URI for resources), and
/// its description and labels as the page read them ([`Described`]).
fn entry(kind: EntryKind, name: &str, described: &Described) -> ListEntry {
    ListEntry {
        kind,
        name: name.to_owned(),
        description: described.description.clone(),
        labels: described.labels.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_match_the_templates_they_expand() {
        for (template, uri) in [
            ("file:///{path}", "file:///a.txt"),
            ("repo://{o}/{r}/readme", "repo://me/x/readme"),
            ("repo://{o}/readme", "repo://me/readme"),
            ("docs://{+path}", "docs://a/b/c"),
            ("search://q{?term,page}", "search://q?term=x&page=2"),
            ("search://q{?term}", "search://q"),
            ("tree://{/segments}", "tree:///a/b"),
            ("page://x{#frag}", "page://x#top"),
            ("exact://here", "exact://here"),
        ] {
            assert!(template_matches(template, uri), "{template} {uri}");
        }
        for (template, uri) in [
            ("repo://{o}/readme", "repo://me/secrets"),
            ("repo://{o}/secrets", "repo://me/x/secrets"),
            ("file:///{path}", "file:///a/b"),
            ("exact://here", "exact://here2"),
            ("a{x}b", "ab/b"),
            ("unclosed://{x", "unclosed://y"),
        ] {
            assert!(!template_matches(template, uri), "{template} {uri}");
        }
        // A template of many expressions costs linear work, not a backtracking search.
        let many = "{a}".repeat(1000);
        assert!(!template_matches(&many, &format!("{}/", "x".repeat(3000))));
    }

    #[test]
    fn entries_carry_hints_and_meta_labels() {
        let page = ListPage::read(
            Bytes::from_static(
                br#"{"tools":[{"name":"rm","description":"Deletes","annotations":{"destructiveHint":true,"readOnlyHint":false},
                "_meta":{"gatehouse/labels":["fs"]},"inputSchema":{"type":"object"}}]}"#,
            ),
            "tools",
        )
        .unwrap();
        let e = entry(EntryKind::Tool, "rm", page.find_described("rm").unwrap());
        assert_eq!(e.name, "rm");
        assert_eq!(e.description.as_deref(), Some("Deletes"));
        assert_eq!(e.labels, ["destructive", "fs"]);
        let page = ListPage::read(
            Bytes::from_static(br#"{"resources":[{"uri":"file:///a","name":"a"}]}"#),
            "resources",
        )
        .unwrap();
        assert!(page.find_described("file:///a").is_some());
        assert!(page.find_described("a").is_none());
    }
}
