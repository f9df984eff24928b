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
//! before it is sent, so its upstream's window never counts it.

use std::rc::Rc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::classify::Outcome;
use crate::fields::Fields;
use crate::policy::Refusal;
use crate::split::Target;
use crate::upstream::UpstreamError;
use crate::worker::Worker;

/// One request's outcome, until it is recorded. See the module header.
pub(crate) struct OutcomeRecord {
    worker: Rc<Worker>,
    target: Target,
    start: Instant,
    state: State,
    /// It holds a place in `target`'s `max_concurrent`.
    holds_place: bool,
}

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
    /// A request to `target`, started at `start`, is on its way; or it is
    /// refused, because `target` is at its `max_concurrent`, and counted
    /// apart from the window.
    pub(crate) fn new(
        worker: Rc<Worker>,
        target: Target,
        start: Instant,
        bodiless: bool,
    ) -> Result<Self, Refusal> {
        let holds_place = match worker.concurrency_limit(target) {
            None => false,
            Some(limit) if limit.try_acquire() => true,
            Some(_) => {
                worker.stats(target).record_concurrency_limited();
                return Err(Refusal::AtCapacity(target));
            }
        };
        worker.request_started();
        Ok(Self {
            worker,
            target,
            start,
            state: State::Waiting { bodiless },
            holds_place,
        })
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
    }

    /// The upstream failed before answering. A client whose upload broke
    /// off is not the upstream's failure: nothing is counted then.
    pub(crate) fn failed(&mut self, error: &UpstreamError) {
        if matches!(error, UpstreamError::ClientAborted { .. }) {
            self.state = State::Recorded;
        } else {
            self.record(Instant::now(), true);
        }
    }

    /// The response head arrived.
    pub(crate) fn headers<F: Fields + ?Sized>(&mut self, status: StatusCode, fields: &F) {
        let now = Instant::now();
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
        self.worker.request_ended();
    }
}
