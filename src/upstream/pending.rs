//! Requests in flight on a connection whose answers arrive out of band (stdio): who waits for
//! which id, and the cancellation sent when a caller gives up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::mcp::jsonrpc::{self, Message, Outcome};

use super::{CallRoute, Connection, Inbox, Route, progress_token_of, with_progress_token};

/// Tells the upstream a request is abandoned unless disarmed.
pub(super) struct CancelOnDrop {
    pub(super) conn: Option<Arc<Connection>>,
    pub(super) id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let params = format!(
                "{{\"requestId\":{},\"reason\":\"cancelled by the gateway\"}}",
                self.id
            );
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = conn
                        .notify("notifications/cancelled", Some(params.as_bytes()))
                        .await;
                });
            }
        }
    }
}

/// Requests waiting for their response on a connection whose responses arrive out of band (stdio).
#[derive(Default)]
pub(crate) struct Pending {
    waiters: Mutex<HashMap<u64, Waiter>>,
}

struct Waiter {
    tx: oneshot::Sender<Outcome>,
    route: CallRoute,
}

impl Pending {
    pub(crate) fn insert(&self, id: u64, tx: oneshot::Sender<Outcome>, route: CallRoute) {
        self.lock().insert(id, Waiter { tx, route });
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Completes a waiter; false when nobody waits for that id.
    pub(crate) fn complete(&self, id: u64, outcome: Outcome) -> bool {
        match self.lock().remove(&id) {
            Some(w) => {
                let _ = w.tx.send(outcome);
                true
            }
            None => false,
        }
    }

    /// Drops every waiter, failing their requests.
    pub(crate) fn fail_all(&self) {
        self.lock().clear();
    }

    /// Hands a server message to where it most likely belongs (stdio carries no relation):
    /// the request with its progress token, else the only request still working (one waiting
    /// for its client's answers is not asking more); with several working, the newest one is
    /// only a fallback stream. Messages go to `owner` (the session
    /// owning the connection; for a shared connection, a broadcast to every session), except on a
    /// shared connection those related to a call go to the calling session (progress under the
    /// client's own token).
    pub(crate) fn dispatch(&self, msg: Message, owner: &Inbox) {
        let waiters = self.lock();
        let progress = msg.method() == Some("notifications/progress");
        let token = match &msg.kind {
            jsonrpc::Kind::Notification {
                params: Some(p), ..
            } if progress => progress_token_of(p),
            _ => None,
        };
        let related = match &token {
            Some(token) => waiters
                .values()
                .find(|w| w.route.progress_token.as_deref() == Some(&token[..])),
            // A lone call in flight is the likely cause of what the server says, except for
            // what concerns the whole session: on a shared connection that is every session.
            // On a shared connection only a server request (sampling, elicitation) is inferred
            // this way, since the call it waits on is the only one that can be answering it; a
            // log line may be about anything, and another principal must never see it.
            None => {
                let request = matches!(msg.kind, jsonrpc::Kind::Request { .. });
                let mut working = waiters.values().filter(|w| w.route.is_working());
                let speaker = match (working.next(), working.next()) {
                    // Calls parked for their clients' answers seldom hear more from their
                    // server meanwhile, so the working call is taken to be the one asking; but
                    // a log line is not guessed at, and a parked call of another session
                    // leaves the question to nobody (never another principal's).
                    (Some(w), None) => {
                        let parked = waiters.len() > 1;
                        let parked_elsewhere = parked
                            && waiters
                                .values()
                                .any(|p| !p.route.is_working() && !p.route.same_session(&w.route));
                        (!parked_elsewhere && (request || !parked)).then_some(w)
                    }
                    // A lone parked call: its server asks it more (heard in its next round).
                    (None, _) if waiters.len() == 1 => waiters.values().next(),
                    _ => None,
                };
                speaker
                    .filter(|w| w.route.origin.as_ref().is_none_or(|(o, _)| o.is(owner)) || request)
            }
        };
        if let Some(w) = related {
            let route = Route::related(w.route.events.clone());
            match w.route.origin.clone() {
                Some((origin, client_token)) => {
                    drop(waiters);
                    let msg = match client_token {
                        Some(t) if progress => with_progress_token(msg, &t),
                        _ => msg,
                    };
                    origin.deliver(route, msg);
                }
                None => {
                    drop(waiters);
                    owner.deliver(route, msg);
                }
            }
            return;
        }
        let newest = waiters
            .iter()
            .filter(|(_, w)| w.route.is_working())
            .max_by_key(|(id, _)| **id)
            .map(|(_, w)| w);
        let fallback = newest
            .filter(|w| w.route.origin.as_ref().is_none_or(|(o, _)| o.is(owner)))
            .and_then(|w| w.route.events.clone());
        drop(waiters);
        owner.deliver(
            Route {
                related: None,
                fallback,
            },
            msg,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{AwaitingClient, Recipient};

    /// Records what it is handed: (had a related stream, method).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, String)>>);

    impl Recipient for Recorder {
        fn deliver(&self, _: usize, route: Route, msg: Message) {
            let method = msg.method().unwrap_or_default().to_owned();
            let mut got = self.0.lock().unwrap();
            got.push((route.related.is_some(), method));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(bool, String)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn inbox(r: &Arc<Recorder>) -> Inbox {
        Inbox {
            recipient: r.clone(),
            index: 0,
        }
    }

    /// A call of `origin`'s, parked (waiting for its client) or working; the caller keeps its
    /// stream.
    fn call(
        pending: &Pending,
        id: u64,
        origin: &Arc<Recorder>,
        parked: bool,
    ) -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
        let (events, rx) = tokio::sync::mpsc::channel(4);
        let (tx, _) = oneshot::channel();
        let awaiting = AwaitingClient::default();
        awaiting.set(parked);
        let route = CallRoute {
            events: Some(events.into()),
            progress_token: None,
            origin: Some((inbox(origin), None)),
            awaiting: Some(awaiting),
        };
        pending.insert(id, tx, route);
        rx
    }

    fn ask() -> Message {
        jsonrpc::parse(jsonrpc::request(
            b"1",
            "sampling/createMessage",
            Some(b"{}"),
        ))
        .unwrap()
    }

    fn asked() -> (bool, String) {
        (true, "sampling/createMessage".to_owned())
    }

    fn log() -> Message {
        let params = br#"{"level":"info","data":"x"}"#;
        jsonrpc::parse(jsonrpc::notification("notifications/message", Some(params))).unwrap()
    }

    #[test]
    fn a_question_is_inferred_only_where_no_one_else_could_have_asked_it() {
        let (a, b, owner) = (
            Arc::new(Recorder::default()),
            Arc::new(Recorder::default()),
            Arc::new(Recorder::default()),
        );

        // A parked call of one session and a working call of another: the question may be
        // the parked one's, and goes to neither caller.
        let pending = Pending::default();
        let _s1a = call(&pending, 1, &a, true);
        let _s2b = call(&pending, 2, &b, false);
        pending.dispatch(ask(), &inbox(&owner));
        assert!(a.take().is_empty() && b.take().is_empty());
        assert_eq!(owner.take(), vec![(false, "sampling/createMessage".into())]);

        // Both of one session: the working call is taken to be asking; a log line is not
        // guessed at.
        let pending = Pending::default();
        let _s1a = call(&pending, 1, &a, true);
        let _s2a = call(&pending, 2, &a, false);
        pending.dispatch(ask(), &inbox(&owner));
        assert_eq!(a.take(), vec![asked()]);
        pending.dispatch(log(), &inbox(&a));
        assert_eq!(a.take(), vec![(false, "notifications/message".into())]);

        // Two working calls: nobody's.
        let _s3a = call(&pending, 3, &a, false);
        pending.dispatch(ask(), &inbox(&owner));
        assert!(a.take().is_empty());
        assert_eq!(owner.take().len(), 1);

        // A lone parked call: its server asks it more.
        let pending = Pending::default();
        let _s1b = call(&pending, 1, &b, true);
        pending.dispatch(ask(), &inbox(&owner));
        assert_eq!(b.take(), vec![asked()]);
        assert!(owner.take().is_empty());
    }
}
