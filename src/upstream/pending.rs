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
                let mut working = waiters.values().filter(|w| w.route.is_working());
                match (working.next(), working.next()) {
                    (Some(w), None) => Some(w).filter(|w| {
                        w.route.origin.as_ref().is_none_or(|(o, _)| o.is(owner))
                            || matches!(msg.kind, jsonrpc::Kind::Request { .. })
                    }),
                    _ => None,
                }
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
