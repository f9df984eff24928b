//! The outcome of one proxied request, recorded exactly once.
//!
//! The judge must hear about every request that reached an upstream, and
//! about each only once, however the exchange ends. So, as linkerd2-proxy's
//! `ClassifyResponse` → `ClassifyEos` does, one [`OutcomeRecord`] is made when
//! a request is sent and travels with it to the end of the response body:
//! - the upstream fails before answering: an error ([`OutcomeRecord::failed`]);
//! - its response head is an error (a 5xx, a gRPC error status): an error,
//!   recorded at once ([`OutcomeRecord::headers`]);
//! - otherwise the verdict waits for the body's end: a success, or the gRPC
//!   status in the trailers ([`OutcomeRecord::end`]); an upstream that breaks
//!   off mid-body makes it an error ([`OutcomeRecord::broke`]);
//! - the client leaves first: the record is dropped, and records the request
//!   as abandoned (its wait so far enters the window as latency, so a canary
//!   slower than its clients' patience still shows) or, once a success head
//!   was passed on, as the success it was.
//!
//! Latency is always the time to the response head. The record also holds
//! the request's place in the worker's in-flight count, and in its
//! upstream's `max_concurrent` when one is set, until it is dropped. A
//! request its upstream has no place for gets no record: it is refused
//! before it is sent, so its upstream's window never counts it. When the
//! access log or span export is on, the record also carries the request's
//! [`Observation`]: its drop is the one place every forwarded request ends,
//! so it settles the line and the span then.

use std::rc::Rc;
use std::time::Duration;

use http::{HeaderMap, StatusCode, Version};
use tokio::time::Instant;

use crate::classify::Outcome;
use crate::fields::Fields;
use crate::policy::{upstream_failure_status, Refusal};
use crate::spans::SpanStart;
use crate::split::Target;
use crate::upstream::{UploadEnd, UpstreamError};
use crate::worker::Worker;

/// One request's outcome, until it is recorded. See the module header.
pub(crate) struct OutcomeRecord {
    worker: Rc<Worker>,
    target: Target,
    start: Instant,
    state: State,
    /// What the access log and span export follow, when either is on.
    followed: Option<Followed>,
    /// It holds a place in `target`'s `max_concurrent`.
    holds_place: bool,
}

/// What the access log and span export need that the judge does not.
struct Followed {
    observation: Observation,
    /// The status sent to the client; 499 (nginx's "client closed
    /// request") until one is.
    status: u16,
    /// How the exchange ended, once it has.
    class: Option<OutcomeClass>,
    fell_back: bool,
    upstream_time: Option<std::time::Duration>,
    bytes_out: u64,
    upload: Option<UploadEnd>,
}

/// nginx's status for a request whose client left before any answer.
pub(crate) const CLIENT_CLOSED: u16 = 499;

enum State {
    /// Waiting for the response head. `bodiless`: the wait is the
    /// upstream's alone (an upload's is partly the client's own).
    Waiting {
        bodiless: bool,
    },
    /// A head that was not an error has been passed on; `at` is when it
    /// came, `grpc` whether the verdict is in the trailers.
    Streaming {
        at: Instant,
        latency: Duration,
        grpc: bool,
    },
    Recorded,
}

impl OutcomeRecord {
    /// A request to `target`, started at `start`, is on its way, followed
    /// by the access log and span export as `observation` says; or it is
    /// refused, because `target` is at its `max_concurrent`, and counted
    /// apart from the window (the observation comes back, to settle as
    /// refused).
    pub(crate) fn new(
        worker: Rc<Worker>,
        target: Target,
        start: Instant,
        bodiless: bool,
        observation: Option<Observation>,
    ) -> Result<Self, (Refusal, Option<Observation>)> {
        let holds_place = match worker.concurrency_limit(target) {
            None => false,
            Some(limit) if limit.try_acquire() => true,
            Some(_) => {
                worker.stats(target).record_concurrency_limited();
                return Err((Refusal::AtCapacity(target), observation));
            }
        };
        worker.request_started();
        Ok(Self {
            worker,
            target,
            start,
            state: State::Waiting { bodiless },
            holds_place,
            followed: observation.map(|observation| Followed {
                observation,
                status: CLIENT_CLOSED,
                class: None,
                fell_back: false,
                upstream_time: None,
                bytes_out: 0,
                upload: None,
            }),
        })
    }

    /// The request's body is streamed upstream: its bytes are read from
    /// `upload` for the access log.
    pub(crate) fn uploading(&mut self, upload: &UploadEnd) {
        if let Some(f) = &mut self.followed {
            f.upload = Some(upload.clone());
        }
    }

    /// The client has been sent `bytes` of the response body so far.
    #[inline]
    pub(crate) fn body_sent(&mut self, bytes: u64) {
        if let Some(f) = &mut self.followed {
            f.bytes_out = bytes;
        }
    }

    /// Another `bytes` of the response body went to the client.
    #[inline]
    pub(crate) fn more_body_sent(&mut self, bytes: u64) {
        if let Some(f) = &mut self.followed {
            f.bytes_out += bytes;
        }
    }

    /// The upstream the record is for.
    pub(crate) fn target(&self) -> Target {
        self.target
    }

    /// The canary failed a request that is now replayed on stable: the
    /// canary's failure is recorded, its place given back, and the record
    /// follows the replay. The replay takes no place in stable's
    /// `max_concurrent`: it is the rare rescue of a request already
    /// admitted, and refusing it would turn the canary's failure into the
    /// client's.
    pub(crate) fn fall_back(&mut self) {
        self.record(Instant::now(), true);
        self.give_back_place();
        self.target = Target::Stable;
        self.state = State::Waiting { bodiless: true };
        if let Some(f) = &mut self.followed {
            f.fell_back = true;
            f.class = None;
        }
    }

    /// The upstream failed before answering. A client whose upload broke
    /// off is not the upstream's failure: nothing is counted then.
    pub(crate) fn failed(&mut self, error: &UpstreamError) {
        if matches!(error, UpstreamError::ClientAborted { .. }) {
            self.state = State::Recorded;
            self.note_class(OutcomeClass::Abandoned);
        } else {
            self.record(Instant::now(), true);
        }
        if let Some(f) = &mut self.followed {
            f.status = upstream_failure_status(error).as_u16();
        }
    }

    /// The response head arrived.
    pub(crate) fn headers<F: Fields + ?Sized>(&mut self, status: StatusCode, fields: &F) {
        let now = Instant::now();
        if let Some(f) = &mut self.followed {
            f.status = status.as_u16();
            f.upstream_time = Some(now.saturating_duration_since(self.start));
        }
        let grpc = match self.worker.shared.classifier.classify(status, fields) {
            Outcome::Error => return self.record(now, true),
            Outcome::Success => false,
            Outcome::AwaitTrailers => true,
        };
        self.state = State::Streaming {
            at: now,
            latency: now.saturating_duration_since(self.start),
            grpc,
        };
    }

    /// The response body ended cleanly, with these trailers.
    pub(crate) fn end(&mut self, trailers: Option<&HeaderMap>) {
        if let State::Streaming { at, latency, grpc } = self.state {
            let classifier = &self.worker.shared.classifier;
            let error = grpc && classifier.classify_trailers(trailers) == Outcome::Error;
            self.record_latency(at, latency, error);
        }
    }

    /// The upstream broke off the response body.
    pub(crate) fn broke(&mut self) {
        if let State::Streaming { at, latency, .. } = self.state {
            self.record_latency(at, latency, true);
        }
    }

    fn give_back_place(&mut self) {
        if self.holds_place {
            self.holds_place = false;
            if let Some(limit) = self.worker.concurrency_limit(self.target) {
                limit.release();
            }
        }
    }

    fn record(&mut self, now: Instant, error: bool) {
        self.record_latency(now, now.saturating_duration_since(self.start), error);
    }

    fn record_latency(&mut self, at: Instant, latency: Duration, error: bool) {
        self.worker.stats(self.target).record(at, latency, error);
        self.state = State::Recorded;
        self.note_class(if error {
            OutcomeClass::Error
        } else {
            OutcomeClass::Success
        });
    }

    /// Notes how the exchange ended, for the access log (the first
    /// verdict stands: a body that breaks after a 5xx head is still that 5xx's error).
    fn note_class(&mut self, class: OutcomeClass) {
        if let Some(f) = &mut self.followed {
            f.class.get_or_insert(class);
        }
    }

    /// Settles the access-log line and the span, once the exchange is over.
    fn settle_followed(&mut self, f: Followed) {
        let class = match f.class {
            Some(OutcomeClass::Success) if f.fell_back => OutcomeClass::Fallback,
            Some(class) => class,
            None => OutcomeClass::Abandoned,
        };
        let settled = Settled {
            upstream: Some(self.target),
            status: f.status,
            class,
            bytes_in: f.upload.as_ref().map_or(0, |u| u.bytes.get()),
            bytes_out: f.bytes_out,
            upstream_time: f.upstream_time,
            total_time: self.start.elapsed(),
        };
        self.worker.settle(f.observation, &settled);
    }
}

impl Drop for OutcomeRecord {
    fn drop(&mut self) {
        match self.state {
            State::Waiting { bodiless: true } => {
                let now = Instant::now();
                self.worker
                    .stats(self.target)
                    .record_abandoned(now, now.saturating_duration_since(self.start));
            }
            // The client stopped reading a success: it was one.
            State::Streaming {
                at,
                latency,
                grpc: false,
            } => self.worker.stats(self.target).record(at, latency, false),
            // A gRPC stream the client left before its status: abandoned.
            State::Streaming {
                at,
                latency,
                grpc: true,
            } => self.worker.stats(self.target).record_abandoned(at, latency),
            State::Waiting { bodiless: false } | State::Recorded => {}
        }
        self.give_back_place();
        if let Some(followed) = self.followed.take() {
            self.settle_followed(followed);
        }
        self.worker.request_ended();
    }
}

/// How a request ended, in the access log's and the span's words
/// (`outcome`, `serin.outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutcomeClass {
    /// Answered, and the judge counted it as a success.
    Success,
    /// The judge counted it as an error.
    Error,
    /// The client left before the answer was complete.
    Abandoned,
    /// The canary failed it and stable answered instead.
    Fallback,
    /// serin answered it itself without asking an upstream (a bad request,
    /// overload, a limit).
    Refused,
}

impl OutcomeClass {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Success => "success",
            OutcomeClass::Error => "error",
            OutcomeClass::Abandoned => "abandoned",
            OutcomeClass::Fallback => "fallback",
            OutcomeClass::Refused => "refused",
        }
    }
}

// === what the access log and the span exporter see ===

/// What is known of a request when it is admitted.
pub(crate) struct RequestFacts<'a> {
    pub(crate) request_id: &'a [u8],
    /// The trace id, 32 hex digits, when the request has a trace context.
    pub(crate) trace_id: Option<&'a [u8]>,
    pub(crate) client: &'a [u8],
    pub(crate) method: &'a [u8],
    pub(crate) authority: &'a [u8],
    /// The request target as sent: path and query.
    pub(crate) target: &'a [u8],
    pub(crate) version: Version,
    /// The client came over TLS.
    pub(crate) tls: bool,
}

/// What is known of a request when its outcome is settled.
pub(crate) struct Settled {
    pub(crate) upstream: Option<Target>,
    /// The status the client was sent (499 when none was: nginx's "client
    /// closed request").
    pub(crate) status: u16,
    pub(crate) class: OutcomeClass,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Time to the upstream's response head.
    pub(crate) upstream_time: Option<Duration>,
    pub(crate) total_time: Duration,
}

impl Settled {
    /// A request serin answered itself with `status`, without sending it
    /// (to `upstream`, when the refusal was that upstream's: its
    /// `max_concurrent`).
    pub(crate) fn refused(
        upstream: Option<Target>,
        status: StatusCode,
        bytes_out: u64,
        total_time: Duration,
    ) -> Self {
        Settled {
            upstream,
            status: status.as_u16(),
            class: OutcomeClass::Refused,
            bytes_in: 0,
            bytes_out,
            upstream_time: None,
            total_time,
        }
    }
}

/// What the access log and the span exporter keep of a request from its
/// admission to its end ([`crate::worker::Worker::observe`] and
/// [`crate::worker::Worker::settle`]).
pub(crate) struct Observation {
    /// The access-log line, begun.
    pub(crate) line: Option<Vec<u8>>,
    /// The span's start, when the request's trace is sampled.
    pub(crate) span: Option<Box<SpanStart>>,
}
