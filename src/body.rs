//! Response bodies the gateway sends: a whole buffer, nothing, or an SSE stream fed by a channel.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::sse;

/// A response body.
#[derive(Debug)]
pub enum Body {
    /// No bytes.
    Empty,
    /// One buffer.
    Full(Option<Bytes>),
    /// Server-Sent Events: `prelude` (whole events) first, then each JSON-RPC frame from the
    /// channel as one `message` event; an empty frame becomes a keep-alive comment. Ends when
    /// every sender is gone.
    Sse {
        /// Events sent before any frame (the HTTP+SSE `endpoint` event).
        prelude: Option<Bytes>,
        /// The frames.
        frames: mpsc::Receiver<Bytes>,
    },
    /// Server-Sent Events already encoded (numbered, for resumption).
    Events(mpsc::Receiver<Bytes>),
}

impl Body {
    /// A body of one buffer.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Sse { prelude, .. } if prelude.is_some() => {
                Poll::Ready(prelude.take().map(|p| Ok(Frame::data(p))))
            }
            Body::Sse { frames, .. } => frames.poll_recv(cx).map(|o| {
                o.map(|frame| {
                    let event = if frame.is_empty() {
                        Bytes::from_static(sse::KEEPALIVE)
                    } else {
                        sse::encode_message(&frame)
                    };
                    Ok(Frame::data(event))
                })
            }),
            Body::Events(events) => events.poll_recv(cx).map(|o| o.map(|e| Ok(Frame::data(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Sse { .. } | Body::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Sse { .. } | Body::Events(_) => SizeHint::default(),
        }
    }
}

/// Room in a response's header map for the headers of the connection's next request: hyper
/// parses that request into the map this response leaves behind, and a map too small for it
/// is allocated again (about 1.9 k instructions when an `Authorization` header made a
/// request's seventh). 16 leaves room for 24 headers.
const NEXT_REQUEST_HEADERS: usize = 16;

/// A 200 response with `body` and a header map with room for the next request's headers.
pub(crate) fn response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.headers_mut() = http::HeaderMap::with_capacity(NEXT_REQUEST_HEADERS);
    r
}

/// A JSON response with `status`.
pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = response(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// How long a stream's feeder waits for its reader to take a message: past it the reader is
/// taken for gone, and what feeds it (a call, cancelled upstream when it is dropped) stops
/// rather than wait on it for good, holding the call and its request.
pub(crate) const STALLED_READER: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `frame` to a stream's reader unless it is gone or takes nothing for
/// [`STALLED_READER`]: `false` then.
pub(crate) async fn send_to_reader(tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STALLED_READER, tx.send(frame)).await,
        Ok(Ok(()))
    )
}

/// An SSE response fed by `rx`.
pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    sse_response_after(None, rx)
}

/// An SSE response that sends the events of `prelude` first, then what `rx` is fed.
pub(crate) fn sse_response_after(
    prelude: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
) -> Response<Body> {
    let mut r = response(Body::Sse {
        prelude,
        frames: rx,
    });
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An SSE response of events already encoded.
pub(crate) fn events_response(events: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = response(Body::Events(events));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// 202 Accepted, no body.
pub(crate) fn accepted() -> Response<Body> {
    let mut r = response(Body::Empty);
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}
