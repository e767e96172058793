//! A 2024-11-05 HTTP+SSE client: the one SSE stream everything it is sent travels on, and the
//! session its `initialize` opens (none before).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::mcp::session::Session;
use crate::upstream::EventSink;

/// One HTTP+SSE client, from its GET until its stream closes.
pub struct SseClient {
    /// Who opened the stream; every POST must come from the same principal.
    pub principal: Option<Arc<str>>,
    /// The client's SSE stream: answers, and whatever servers send it.
    pub stream: EventSink,
    state: Mutex<State>,
    bound: Notify,
}

enum State {
    /// Waiting for `initialize`.
    Open,
    /// Initialized.
    Bound(Arc<Session>),
    /// The stream is gone; a late `initialize` must not open a session nobody can reach.
    Closed,
}

/// Why a session could not be bound to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum BindError {
    /// The client already initialized.
    AlreadyBound,
    /// The client's stream is gone.
    Closed,
}

impl SseClient {
    /// A client whose stream is `stream`.
    pub fn new(principal: Option<Arc<str>>, stream: EventSink) -> Self {
        SseClient {
            principal,
            stream,
            state: Mutex::new(State::Open),
            bound: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session, once initialized.
    pub fn session(&self) -> Option<Arc<Session>> {
        match &*self.state() {
            State::Bound(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Whether the client has initialized or is gone (so it may not initialize now).
    pub fn check_unbound(&self) -> Result<(), BindError> {
        check(&self.state())
    }

    /// Binds the session `initialize` opened; refused if one is bound or the stream is gone.
    pub fn bind(&self, session: Arc<Session>) -> Result<(), BindError> {
        let mut state = self.state();
        check(&state)?;
        *state = State::Bound(session);
        drop(state);
        self.bound.notify_one();
        Ok(())
    }

    /// Resolves with the session once bound, or `None` once closed.
    pub async fn bound(&self) -> Option<Arc<Session>> {
        loop {
            match &*self.state() {
                State::Bound(s) => return Some(s.clone()),
                State::Closed => return None,
                State::Open => {}
            }
            self.bound.notified().await;
        }
    }

    /// Marks the stream gone, returning the session to end, if one was bound.
    pub fn close(&self) -> Option<Arc<Session>> {
        let was = std::mem::replace(&mut *self.state(), State::Closed);
        self.bound.notify_one();
        match was {
            State::Bound(s) => Some(s),
            _ => None,
        }
    }
}

fn check(state: &State) -> Result<(), BindError> {
    match state {
        State::Open => Ok(()),
        State::Bound(_) => Err(BindError::AlreadyBound),
        State::Closed => Err(BindError::Closed),
    }
}
