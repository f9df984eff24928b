//! The response body serin streams back to a client on hyper's path.
//!
//! It is the upstream's body passed through frame by frame (never buffered;
//! an HTTP/1.1 upstream connection returns to its pool by itself when its
//! body ends, see [`crate::upstream`]), carrying the request's
//! [`OutcomeRecord`] to the end: the body's end, its trailers, an upstream
//! that breaks off, or a client that stops reading each settle the outcome
//! once. Responses that serin makes itself are a small fixed body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::outcome::OutcomeRecord;
use crate::upstream::{UpstreamBody, WireError};

/// The body of every response serin sends on hyper's path.
pub(crate) struct ProxyBody {
    kind: Kind,
}

// The large variant is the common one: boxing it would cost an allocation
// per request to save a few bytes on serin's own error answers.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Upstream {
        body: UpstreamBody,
        record: OutcomeRecord,
    },
    Fixed(Option<Bytes>),
}

impl ProxyBody {
    /// An upstream's body, with the outcome its end settles.
    pub(crate) fn upstream(body: UpstreamBody, mut record: OutcomeRecord) -> Self {
        // A body that is already complete is never polled.
        if body.is_end_stream() {
            record.end(None);
        }
        Self {
            kind: Kind::Upstream { body, record },
        }
    }

    /// A complete body of these bytes.
    pub(crate) fn fixed(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Fixed(Some(bytes.into())),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let (body, record) = match &mut self.get_mut().kind {
            Kind::Fixed(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, record } => (body, record),
        };
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    record.more_body_sent(data.len() as u64);
                }
                if let Some(trailers) = f.trailers_ref() {
                    record.end(Some(trailers));
                } else if body.is_end_stream() {
                    record.end(None);
                }
            }
            Some(Err(_)) => record.broke(),
            None => record.end(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Fixed(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Fixed(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Fixed(None) => SizeHint::with_exact(0),
        }
    }
}
