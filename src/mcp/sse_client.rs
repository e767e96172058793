//! A 2024-11-05 HTTP+SSE client: the one SSE stream everything it is sent travels on, and the
//! session its `initialize` opens (none before).

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::mcp::session::Session;
use bytes::Bytes;
use tokio::sync::mpsc;

/// One HTTP+SSE client, from its GET until its stream closes.
pub struct SseClient {
    /// Who opened the stream; every POST must come from the same principal.
    pub principal: Option<Arc<str>>,
    /// The client's SSE stream: answers, and whatever servers send it.
    pub stream: mpsc::Sender<Bytes>,
    state: Mutex<State>,
    bound: Notify,
    /// Requests of this client whose answers are not yet on its stream: the POST answers at
    /// once, so without this bound a client that stops reading would pile up answers.
    requests: Arc<Semaphore>,
}

enum State {
    /// Waiting for `initialize`.
    Open,
    /// An `initialize` is opening the session.
    Initializing,
    /// Initialized.
    Bound(Arc<Session>),
    /// The stream is gone; a late `initialize` must not open a session nobody can reach.
    Closed,
}

/// Why a client cannot initialize now.
#[derive(Debug, PartialEq, Eq)]
pub enum BindError {
    /// The client initialized already (or is doing so).
    AlreadyBound,
    /// The client's stream is gone.
    Closed,
}

impl SseClient {
    /// A client whose stream is `stream`, with at most `max_requests` answers outstanding.
    pub fn new(
        principal: Option<Arc<str>>,
        stream: mpsc::Sender<Bytes>,
        max_requests: usize,
    ) -> Self {
        SseClient {
            principal,
            stream,
            state: Mutex::new(State::Open),
            bound: Notify::new(),
            requests: Arc::new(Semaphore::new(max_requests)),
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

    /// Whether the client has yet to initialize (it holds no session).
    pub fn is_pending(&self) -> bool {
        matches!(*self.state(), State::Open | State::Initializing)
    }

    /// Claims the right to initialize, so that concurrent `initialize` requests open one
    /// session, not one each.
    pub fn reserve(&self) -> Result<(), BindError> {
        let mut state = self.state();
        match *state {
            State::Open => {
                *state = State::Initializing;
                Ok(())
            }
            State::Initializing | State::Bound(_) => Err(BindError::AlreadyBound),
            State::Closed => Err(BindError::Closed),
        }
    }

    /// Gives a reservation back (the `initialize` failed before opening a session).
    pub fn release(&self) {
        let mut state = self.state();
        if matches!(*state, State::Initializing) {
            *state = State::Open;
        }
    }

    /// Binds the session the reserved `initialize` opened; refused if the stream is gone.
    pub fn bind(&self, session: Arc<Session>) -> Result<(), BindError> {
        let mut state = self.state();
        if !matches!(*state, State::Initializing) {
            return Err(BindError::Closed);
        }
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
                State::Open | State::Initializing => {}
            }
            self.bound.notified().await;
        }
    }

    /// A slot for one request's answer; `None` when the client already has as many
    /// outstanding as it may.
    pub fn request_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.requests.clone().try_acquire_owned().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_initialize_wins_and_a_closed_stream_binds_nothing() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let client = SseClient::new(None, tx, 2);
        assert!(client.is_pending());
        client.reserve().unwrap();
        assert_eq!(client.reserve(), Err(BindError::AlreadyBound));
        client.release();
        client.reserve().unwrap();
        assert!(client.close().is_none());
        assert_eq!(client.reserve(), Err(BindError::Closed));
        assert!(client.bound().await.is_none());
        let (a, b) = (client.request_slot(), client.request_slot());
        assert!(a.is_some() && b.is_some() && client.request_slot().is_none());
        drop(a);
        assert!(client.request_slot().is_some());
    }
}
