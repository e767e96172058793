//! `subscriptions/listen` (2026-07-28): the open listen streams of one stateless session, what
//! each asked to hear, and the fan-out of servers' change notifications to them.
//!
//! Every notification on a listen stream carries the listen request's id in
//! `_meta["io.modelcontextprotocol/subscriptionId"]`; a stream hears only the kinds it asked for
//! and the gateway agreed to (the acknowledgement says which).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::mcp::jsonrpc;
use crate::upstream::EventSink;

/// The `_meta` key that ties a notification to its listen stream.
pub const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
/// Listen streams one stateless session (one principal) may hold open.
pub const MAX_LISTENERS: usize = 64;
/// Resources one listen request may watch.
pub const MAX_RESOURCES: usize = 64;
/// Longest resource URI a listen request may watch.
const MAX_URI: usize = 4096;

/// What a listen stream asks to hear (`params.notifications`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `notifications/tools/list_changed`.
    pub tools: bool,
    /// `notifications/prompts/list_changed`.
    pub prompts: bool,
    /// `notifications/resources/list_changed`.
    pub resources: bool,
    /// `notifications/resources/updated` for these URIs (and resources below them).
    pub uris: Vec<String>,
}

impl Filter {
    /// Reads `params.notifications` of a listen request; what it does not know is ignored (it
    /// is not honored, and the acknowledgement leaves it out).
    pub fn of(params: Option<&[u8]>) -> Result<Filter, String> {
        #[derive(Deserialize)]
        struct P {
            notifications: Option<F>,
        }
        #[derive(Deserialize)]
        struct F {
            #[serde(default, rename = "toolsListChanged")]
            tools: Option<bool>,
            #[serde(default, rename = "promptsListChanged")]
            prompts: Option<bool>,
            #[serde(default, rename = "resourcesListChanged")]
            resources: Option<bool>,
            #[serde(default, rename = "resourceSubscriptions")]
            uris: Option<Vec<String>>,
        }
        let p: P = serde_json::from_slice(params.unwrap_or(b"{}"))
            .map_err(|e| format!("params.notifications: {e}"))?;
        let f = p
            .notifications
            .ok_or("params.notifications is required (the notifications to listen for)")?;
        let mut uris = f.uris.unwrap_or_default();
        if uris.len() > MAX_RESOURCES {
            return Err(format!(
                "params.notifications.resourceSubscriptions lists {} resources; at most {MAX_RESOURCES}",
                uris.len()
            ));
        }
        if let Some(long) = uris.iter().find(|u| u.len() > MAX_URI || u.is_empty()) {
            return Err(format!(
                "params.notifications.resourceSubscriptions: a URI must be 1 to {MAX_URI} bytes (one is {})",
                long.len()
            ));
        }
        uris.sort();
        uris.dedup();
        Ok(Filter {
            tools: f.tools.unwrap_or(false),
            prompts: f.prompts.unwrap_or(false),
            resources: f.resources.unwrap_or(false),
            uris,
        })
    }

    /// The filter as the acknowledgement states it (only what is honored).
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        for (key, on) in [
            ("toolsListChanged", self.tools),
            ("promptsListChanged", self.prompts),
            ("resourcesListChanged", self.resources),
        ] {
            if on {
                m.insert(key.into(), Value::Bool(true));
            }
        }
        if !self.uris.is_empty() {
            m.insert("resourceSubscriptions".into(), self.uris.clone().into());
        }
        Value::Object(m).to_string()
    }

    /// Whether the stream wants `method`; `uri` is the resource a `resources/updated` names.
    fn wants(&self, method: &str, uri: Option<&str>) -> bool {
        match method {
            "notifications/tools/list_changed" => self.tools,
            "notifications/prompts/list_changed" => self.prompts,
            "notifications/resources/list_changed" => self.resources,
            "notifications/resources/updated" => {
                uri.is_some_and(|uri| self.uris.iter().any(|u| covers(u, uri)))
            }
            _ => false,
        }
    }
}

/// Whether a subscription to `watched` covers an update of `uri`: the same resource or one
/// below it (the specification lets a server report a sub-resource).
fn covers(watched: &str, uri: &str) -> bool {
    uri == watched
        || uri.strip_prefix(watched).is_some_and(|rest| {
            watched.ends_with('/') || rest.starts_with('/') || rest.starts_with('#')
        })
}

/// Whether `method` is a notification listen streams carry.
pub fn carried(method: &str) -> bool {
    matches!(
        method,
        "notifications/tools/list_changed"
            | "notifications/prompts/list_changed"
            | "notifications/resources/list_changed"
            | "notifications/resources/updated"
    )
}

/// What a change notification tells a client: two with the same topic say the same thing (a
/// list changed; this resource changed), so the second adds nothing while the first waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topic {
    /// `notifications/{tools,prompts,resources}/list_changed`.
    ListChanged(&'static str),
    /// `notifications/resources/updated` of this URI.
    Updated(String),
}

impl Topic {
    /// The topic of a server's notification; `None` for one that is not a change notice (or
    /// an update that names no URI).
    pub(crate) fn of(method: &str, params: Option<&[u8]>) -> Option<Topic> {
        match method {
            "notifications/tools/list_changed" => Some(Topic::ListChanged("tools")),
            "notifications/prompts/list_changed" => Some(Topic::ListChanged("prompts")),
            "notifications/resources/list_changed" => Some(Topic::ListChanged("resources")),
            "notifications/resources/updated" => {
                params.and_then(crate::upstream::uri_of).map(Topic::Updated)
            }
            _ => None,
        }
    }
}

/// The change notices queued on one client stream (a listen stream, a session's GET stream),
/// with a copy of each frame's handle: once the stream's body has taken a frame (it encodes it
/// and drops it), this copy is the frame's only one. While a topic's frame waits, the same
/// topic again is not queued: a server's flood costs one queue entry per distinct notice, not
/// the whole queue (which a stream whose client reads would otherwise lose, and with it the
/// messages that matter). Never longer than the queue; a frame already taken is let go at the
/// stream's next notice.
#[derive(Default)]
pub(crate) struct Queued(Vec<(Topic, Bytes)>);

impl Queued {
    /// Whether a notice saying what `topic` says still waits for the stream to take it.
    pub(crate) fn holds(&mut self, topic: &Topic) -> bool {
        self.0.retain(|(_, frame)| !frame.is_unique());
        self.0.iter().any(|(t, _)| t == topic)
    }

    /// Notes that the stream's queue took a copy of `frame`, which says `topic`. The frame
    /// must be an allocation of its own, with no other handle kept: a slice of a larger buffer
    /// (a server's read buffer) would never be unique, and its topic never news again.
    pub(crate) fn push(&mut self, topic: Topic, frame: Bytes) {
        self.0.push((topic, frame));
    }
}

struct Listener {
    key: u64,
    /// The listen request's id (raw JSON): the subscription id.
    id: Bytes,
    filter: Filter,
    sink: EventSink,
    /// The notices waiting in the stream's queue.
    queued: Queued,
}

impl Listener {
    /// Queues the notification (`topic` is what it says) unless one saying the same waits
    /// already; false if the queue refused it.
    fn send(&mut self, topic: Topic, method: &str, params: Option<&[u8]>) -> bool {
        if self.queued.holds(&topic) {
            return true;
        }
        let frame = jsonrpc::notification(method, Some(&tagged(params, &self.id)));
        if self.sink.try_send(frame.clone()).is_err() {
            return false;
        }
        self.queued.push(topic, frame);
        true
    }
}

/// The listen streams of one session.
pub struct Subscriptions {
    listeners: Mutex<Vec<Listener>>,
    /// One per listen stream, taken before any work for it is done.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    next: AtomicU64,
    /// How many listen streams watch each resource (subscribed upstream while any does).
    watched: Mutex<HashMap<String, usize>>,
    /// Per resource, held while its first watcher subscribes it upstream, and while a last
    /// one unsubscribes it: a watcher arriving meanwhile learns the outcome rather than being
    /// acknowledged for a subscription that is then refused. One per resource, so that a slow
    /// server holds up the listens of its own resources only.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set when the session stops serving listeners (it was replaced or ended): each stream
    /// ends with its final result.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            listeners: Mutex::new(Vec::new()),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LISTENERS)),
            next: AtomicU64::new(0),
            watched: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// One resource's turn to be subscribed or unsubscribed upstream; its entry goes with the
/// last turn taken or waited for.
pub struct Turn<'a> {
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
    uri: String,
    turns: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut turns = lock(self.turns);
        if turns
            .get(&self.uri)
            .is_some_and(|t| Arc::strong_count(t) == 1)
        {
            turns.remove(&self.uri);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Subscriptions {
    /// Listen streams open now.
    pub fn len(&self) -> usize {
        lock(&self.listeners).len()
    }

    /// Whether no listen stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serializes subscribing and unsubscribing `uri` upstream (see the field).
    pub async fn upstream_turn(&self, uri: &str) -> Turn<'_> {
        let turn = lock(&self.turns).entry(uri.to_owned()).or_default().clone();
        Turn {
            held: Some(turn.lock_owned().await),
            uri: uri.to_owned(),
            turns: &self.turns,
        }
    }

    /// Whether any listen stream watches `uri`.
    pub fn is_watched(&self, uri: &str) -> bool {
        lock(&self.watched).contains_key(uri)
    }

    /// Counts one more watcher of `uri`; true when it is the first (subscribe upstream).
    pub fn watch(&self, uri: &str) -> bool {
        let mut w = lock(&self.watched);
        let n = w.entry(uri.to_owned()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts one watcher of `uri` less; true when it was the last (unsubscribe upstream).
    pub fn unwatch(&self, uri: &str) -> bool {
        let mut w = lock(&self.watched);
        match w.get_mut(uri) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                w.remove(uri);
                true
            }
            None => false,
        }
    }

    /// A slot for one more listen stream, held for its life; `None` past [`MAX_LISTENERS`].
    pub fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Adds a listen stream (its acknowledgement already sent; its slot taken).
    pub fn add(&self, id: Bytes, filter: Filter, sink: EventSink) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners).push(Listener {
            key,
            id,
            filter,
            sink,
            queued: Queued::default(),
        });
        key
    }

    /// Removes a listen stream.
    pub fn remove(&self, key: u64) {
        lock(&self.listeners).retain(|l| l.key != key);
    }

    /// Sends a server's change notification to every stream that asked for it, tagged with its
    /// subscription id, unless the same notification still waits in its queue. A stream too
    /// slow to drain its queue misses it rather than holding the upstream reader.
    pub fn deliver(&self, method: &str, params: Option<&[u8]>) {
        let Some(topic) = Topic::of(method, params) else {
            return;
        };
        let uri = match &topic {
            Topic::Updated(uri) => Some(uri.as_str()),
            Topic::ListChanged(_) => None,
        };
        // Under the lock: whether a topic waits and queueing it are one step.
        for l in lock(&self.listeners).iter_mut() {
            if l.filter.wants(method, uri) && !l.send(topic.clone(), method, params) {
                tracing::debug!(
                    ?method,
                    "a listen stream missed a notification: its queue is full"
                );
            }
        }
    }

    /// Ends every listen stream with its final result.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Subscriptions::close`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

/// `params` with the subscription id added to its `_meta` (member by member: a server's
/// notification is never read into values, whatever its size).
pub fn tagged(params: Option<&[u8]>, id: &[u8]) -> Vec<u8> {
    fn raw(b: &[u8]) -> Option<&RawValue> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|t| serde_json::from_str::<&RawValue>(t).ok())
    }
    let null = RawValue::NULL;
    let id = raw(id).unwrap_or(null);
    let params = params.and_then(raw).filter(|p| p.get().starts_with('{'));
    let meta = params.and_then(|p| {
        let mut meta = None;
        jsonrpc::each_member(p, |k, v| {
            if k == "_meta" {
                meta = Some(v);
            }
        })
        .ok()?;
        meta.filter(|m| m.get().starts_with('{'))
    });
    let empty = raw(b"{}").expect("an object");
    let meta = jsonrpc::with_member(meta.unwrap_or(empty), SUBSCRIPTION_ID, id)
        .or_else(|| jsonrpc::with_member(empty, SUBSCRIPTION_ID, id))
        .and_then(|m| RawValue::from_string(String::from_utf8(m).ok()?).ok())
        .expect("an object with a member is JSON");
    // Params the splice cannot read (a key no string can hold: a lone surrogate) are not
    // passed on; the tag alone is.
    jsonrpc::with_member(params.unwrap_or(empty), "_meta", &meta)
        .or_else(|| jsonrpc::with_member(empty, "_meta", &meta))
        .expect("an empty object with a member is JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_what_they_know_and_bound_the_rest() {
        let f = Filter::of(Some(
            br#"{"notifications":{"toolsListChanged":true,"promptsListChanged":false,"taskIds":["x"],"resourceSubscriptions":["b://2","a://1","a://1"]},"_meta":{}}"#,
        ))
        .unwrap();
        assert!(f.tools && !f.prompts && !f.resources);
        assert_eq!(f.uris, ["a://1", "b://2"]);
        assert_eq!(
            f.to_json(),
            r#"{"resourceSubscriptions":["a://1","b://2"],"toolsListChanged":true}"#
        );
        assert!(Filter::of(Some(b"{}")).is_err());
        assert!(Filter::of(Some(br#"{"notifications":{"toolsListChanged":"yes"}}"#)).is_err());
        let many: Vec<String> = (0..65).map(|i| format!("r://{i}")).collect();
        let p = serde_json::json!({"notifications": {"resourceSubscriptions": many}}).to_string();
        assert!(
            Filter::of(Some(p.as_bytes()))
                .unwrap_err()
                .contains("at most 64")
        );
        let long =
            serde_json::json!({"notifications": {"resourceSubscriptions": ["x".repeat(5000)]}});
        assert!(Filter::of(Some(long.to_string().as_bytes())).is_err());
    }

    #[test]
    fn updates_reach_the_watchers_of_the_resource_or_a_parent() {
        let f = Filter {
            uris: vec!["file:///p/config".into()],
            ..Filter::default()
        };
        let upd = |u: &str| format!(r#"{{"uri":"{u}"}}"#);
        let wants = |u: &str| {
            let uri = crate::upstream::uri_of(upd(u).as_bytes());
            f.wants("notifications/resources/updated", uri.as_deref())
        };
        assert!(
            wants("file:///p/config") && wants("file:///p/config/a") && wants("file:///p/config#x")
        );
        assert!(!wants("file:///p/config2") && !wants("file:///p"));
        assert!(!f.wants("notifications/tools/list_changed", None));
        assert!(!f.wants("notifications/message", None));
    }

    #[test]
    fn tags_are_spliced_in_whatever_the_params() {
        let tag = |params: Option<&str>| -> Value {
            serde_json::from_slice(&tagged(params.map(str::as_bytes), b"\"L\"")).unwrap()
        };
        let id = |v: &Value| v["_meta"][SUBSCRIPTION_ID].clone();
        assert_eq!(
            tag(None),
            serde_json::json!({"_meta": {SUBSCRIPTION_ID: "L"}})
        );
        let v = tag(Some(r#"{"uri":"a","_meta":{"x":[1,{"y":2}],"\u0069d":3}}"#));
        assert_eq!(
            (id(&v), &v["uri"], &v["_meta"]["x"][1]["y"]),
            ("L".into(), &"a".into(), &2.into())
        );
        assert_eq!(
            v["_meta"]["id"], 3,
            "an escaped key is read as what it spells"
        );
        // A client's own tag, or a `_meta` that is not an object, is replaced.
        let forged = format!(r#"{{"_meta":{{"{SUBSCRIPTION_ID}":"X","{SUBSCRIPTION_ID}":"Y"}}}}"#);
        assert_eq!(id(&tag(Some(&forged))), "L");
        assert_eq!(
            tag(Some(r#"{"_meta":5,"_meta":7}"#)),
            serde_json::json!({"_meta": {SUBSCRIPTION_ID: "L"}})
        );
        assert_eq!(tag(Some("[1]")), tag(None));
        // A key or `_meta` key no string can hold (a lone surrogate): the tag alone.
        assert_eq!(tag(Some(r#"{"\ud800":1}"#)), tag(None));
        assert_eq!(tag(Some(r#"{"_meta":{"\ud800":1}}"#)), tag(None));
        assert_eq!(tag(Some("not json")), tag(None));
    }

    #[tokio::test]
    async fn notifications_are_tagged_with_their_stream() {
        let subs = Subscriptions::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let (other, mut other_rx) = tokio::sync::mpsc::channel(4);
        let all = Filter {
            tools: true,
            ..Filter::default()
        };
        subs.add(Bytes::from_static(b"\"L1\""), all, tx.into());
        let k = subs.add(Bytes::from_static(b"7"), Filter::default(), other.into());
        subs.deliver(
            "notifications/tools/list_changed",
            Some(br#"{"_meta":{"x":1}}"#),
        );
        let frame: Value = serde_json::from_slice(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(frame["params"]["_meta"][SUBSCRIPTION_ID], "L1");
        assert_eq!(frame["params"]["_meta"]["x"], 1);
        assert!(other_rx.try_recv().is_err(), "it did not ask for tools");
        subs.remove(k);
        assert_eq!(subs.len(), 1);
        assert!(subs.watch("a") && !subs.watch("a") && !subs.unwatch("a") && subs.unwatch("a"));
        assert!(!subs.unwatch("a"));
    }

    #[tokio::test]
    async fn a_notification_that_waits_already_is_not_queued_again() {
        let subs = Subscriptions::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let all = Filter {
            tools: true,
            prompts: true,
            uris: vec!["r://a".into(), "r://b".into()],
            ..Filter::default()
        };
        subs.add(Bytes::from_static(b"1"), all, tx.into());
        for _ in 0..1000 {
            for (method, params) in [
                ("notifications/tools/list_changed", None),
                ("notifications/prompts/list_changed", None),
                (
                    "notifications/resources/updated",
                    Some(&br#"{"uri":"r://a"}"#[..]),
                ),
                (
                    "notifications/resources/updated",
                    Some(&br#"{"uri":"r://b"}"#[..]),
                ),
            ] {
                subs.deliver(method, params);
            }
        }
        // One of each distinct notification, in the order they first came.
        let mut said = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            let v: Value = serde_json::from_slice(&frame).unwrap();
            said.push(format!("{} {}", v["method"], v["params"]["uri"]));
        }
        assert_eq!(
            said,
            [
                r#""notifications/tools/list_changed" null"#,
                r#""notifications/prompts/list_changed" null"#,
                r#""notifications/resources/updated" "r://a""#,
                r#""notifications/resources/updated" "r://b""#,
            ]
        );
        // Taken (and dropped) by the stream, a notification is news again.
        subs.deliver("notifications/tools/list_changed", None);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_notice_waits_while_any_queue_holds_its_frame() {
        let mut queued = Queued::default();
        let tools = Topic::of("notifications/tools/list_changed", None).unwrap();
        let updated = |uri: &str| {
            let params = format!(r#"{{"uri":"{uri}"}}"#);
            Topic::of("notifications/resources/updated", Some(params.as_bytes())).unwrap()
        };
        assert_eq!(Topic::of("notifications/resources/updated", None), None);
        assert_eq!(Topic::of("notifications/message", None), None);
        // Frames held by a queue (a channel, a backlog): their topics wait.
        let mut backlog = std::collections::VecDeque::new();
        for topic in [tools.clone(), updated("r://a")] {
            let frame = Bytes::from(b"{}".to_vec());
            backlog.push_back(frame.clone());
            queued.push(topic, frame);
        }
        assert!(queued.holds(&tools) && queued.holds(&updated("r://a")));
        assert!(!queued.holds(&updated("r://b")));
        // Taken off the queue and dropped, the first is news again; the second still waits.
        drop(backlog.pop_front());
        assert!(!queued.holds(&tools) && queued.holds(&updated("r://a")));
        drop(backlog);
        assert!(!queued.holds(&updated("r://a")));
    }
}
