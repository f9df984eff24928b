//! The response body serin streams back to the client.
//!
//! It is the upstream's body passed through frame by frame (never buffered;
//! an HTTP/1.1 upstream connection returns to its pool by itself when its
//! body ends, see [`crate::h1`]). For gRPC responses whose status arrives in
//! trailers, the outcome is recorded once the trailers are seen. Responses
//! that serin makes itself (errors) are a small fixed body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::classify::{Classifier, Outcome};
use crate::forward::{UpstreamBody, WireError};
use crate::split::Target;
use crate::stats::WorkerStats;

/// An outcome whose recording waits for gRPC trailers.
pub(crate) struct PendingGrpc {
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) classifier: Arc<Classifier>,
    pub(crate) target: Target,
    /// Time to response headers: what the judge compares.
    pub(crate) latency: Duration,
}

impl PendingGrpc {
    fn record(self, trailers: Option<&http::HeaderMap>) {
        let error = self.classifier.classify_trailers(trailers) == Outcome::Error;
        self.stats
            .upstream(self.target)
            .record(Instant::now(), self.latency, error);
    }
}

/// The body of every response serin sends.
pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Upstream {
        body: UpstreamBody,
        grpc: Option<PendingGrpc>,
    },
    Fixed(Option<Bytes>),
}

impl ProxyBody {
    pub(crate) fn upstream(body: UpstreamBody, mut grpc: Option<PendingGrpc>) -> Self {
        // A gRPC response that is already complete (no body, no trailers)
        // is recorded now.
        if body.is_end_stream() {
            if let Some(g) = grpc.take() {
                g.record(None);
            }
        }
        Self {
            kind: Kind::Upstream { body, grpc },
        }
    }

    /// A complete body of these bytes.
    pub fn fixed(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Fixed(Some(bytes.into())),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Fixed(None),
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
        let this = self.get_mut();
        let Kind::Upstream { body, grpc } = &mut this.kind else {
            let Kind::Fixed(bytes) = &mut this.kind else {
                unreachable!()
            };
            return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))));
        };
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        if let Some(Ok(f)) = &frame {
            if let Some(trailers) = f.trailers_ref() {
                if let Some(g) = grpc.take() {
                    g.record(Some(trailers));
                }
            }
        }
        // The end, or a broken body: a gRPC stream that ended without
        // trailers is recorded as an error.
        if !matches!(frame, Some(Ok(_))) || body.is_end_stream() {
            if let Some(g) = grpc.take() {
                g.record(None);
            }
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
