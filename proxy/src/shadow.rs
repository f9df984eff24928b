//! Shadow judging (phase `shadowing`): copies of requests bound for stable
//! are sent to the canary too, and the canary's answers are judged, then
//! thrown away.
//!
//! It exists so that a canary can be judged before any user is sent to it,
//! as Envoy's request mirroring does, but judged here, in-process, by the
//! same window as real canary traffic. What it must never do: delay or
//! change the client's answer. A copy runs as its own task on the worker
//! (`spawn_local`) and nothing on the client's exchange awaits it; copies in
//! flight are bounded per worker, and one over the bound is skipped and
//! counted. The share copied comes from the route table
//! ([`crate::split::RouteTable::shadow_bp`]): at 0 the request path pays one
//! branch, and only a request actually copied allocates.
//!
//! A copy carries [`SHADOW_HEADER`]`: 1`, so that the canary can avoid side
//! effects, and the client's `Host`. Its outcome enters the canary's window
//! through an [`OutcomeRecord`], exactly as a real canary request's would
//! (connect error, timeout, status, gRPC status, latency to headers); its
//! response body is read and discarded up to [`DRAIN_LIMIT`], then the
//! connection is dropped. A copy starts once stable has answered, and
//! compares its status class with stable's (a transport failure counts as
//! 5xx), for the judge's mismatch rule.

use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;

use http::{Method, Request, StatusCode};
use http_body::Body;
use tokio::time::Instant;

use crate::fields::Fields;
use crate::outcome::OutcomeRecord;
use crate::policy::BodyLength;
use crate::split::Target;
use crate::stats::ShadowSkip;
use crate::upstream::{
    H1Request, RequestBody, RequestFraming, UpstreamBody, UpstreamError, UpstreamProtocol,
};
use crate::worker::Worker;

/// The header every copy carries, with the value `1`.
pub const SHADOW_HEADER: &str = "x-serin-shadow";

/// Response body bytes of a copy read (and discarded) before its connection
/// is dropped instead.
pub const DRAIN_LIMIT: u64 = 1 << 20;

/// The status class of a transport failure (no answer, a reset, a timeout).
pub(crate) const FAILED: u8 = 5;

/// What may be copied, and how many copies may be in flight (`[shadow]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowSettings {
    /// Copies in flight, all workers together (split evenly between them,
    /// at least one each); over it a copy is skipped and counted. Default
    /// [`crate::defaults::SHADOW_MAX_CONCURRENT`].
    pub max_concurrent: usize,
    /// Largest request body copied (its length must be known, and both
    /// upstreams must speak HTTP/1.1); 0, the default
    /// ([`crate::defaults::SHADOW_MAX_BODY_BYTES`]), copies only bodiless
    /// GET, HEAD, OPTIONS and TRACE requests.
    pub max_body_bytes: u64,
}

impl Default for ShadowSettings {
    fn default() -> Self {
        Self {
            max_concurrent: crate::defaults::SHADOW_MAX_CONCURRENT,
            max_body_bytes: crate::defaults::SHADOW_MAX_BODY_BYTES,
        }
    }
}

/// Whether a request picked for the shadow may be copied: `Ok(None)`
/// without a body, `Ok(Some(length))` with one, or why not.
///
/// Without `max_body_bytes`, only bodiless requests of safe methods (GET,
/// HEAD, OPTIONS, TRACE) are copied: a copy must not repeat a write. With
/// it, an operator who has made the canary heed [`SHADOW_HEADER`] has
/// copies of any method made too, with a body of known length up to the
/// limit. Upgrades and CONNECT are never copied.
pub(crate) fn eligibility(
    settings: &ShadowSettings,
    method: &Method,
    body: BodyLength,
    upgrade: bool,
) -> Result<Option<u64>, ShadowSkip> {
    if upgrade || method == Method::CONNECT {
        return Err(ShadowSkip::Method);
    }
    let safe = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    match body {
        BodyLength::Empty if safe || settings.max_body_bytes > 0 => Ok(None),
        BodyLength::Empty => Err(ShadowSkip::Method),
        BodyLength::Known(n) if n <= settings.max_body_bytes => Ok(Some(n)),
        BodyLength::Known(_) | BodyLength::Chunked => Err(ShadowSkip::Body),
    }
}

/// A copy's place in its worker's share of `shadow.max_concurrent`, given
/// back when dropped.
struct Slot(Rc<Worker>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.shadow_ended();
    }
}

/// The status class of `status`: 2 for 2xx, and so on.
pub(crate) fn class_of(status: StatusCode) -> u8 {
    (status.as_u16() / 100) as u8
}

// === the copy ===

/// A copy, ready to send to the canary.
pub(crate) enum ShadowCopy {
    /// To an HTTP/1.1 canary: the whole message (head, then any body).
    Http1 { method: Method, message: Vec<u8> },
    /// To an h2c canary (bodiless); boxed, as it is much the larger.
    Http2(Box<Request<RequestBody>>),
}

/// Starts a copy as its own task, once stable has answered the request
/// with status class `stable` ([`FAILED`] for a transport failure), unless
/// the worker's bound or the canary's `max_concurrent` leaves no place for
/// it (counted as skipped). `copy` is only called when the copy is made.
///
/// The copy is sent after the client's answer has gone: it yields once
/// before it starts, and a yielded task runs only after the worker has
/// looked for I/O again, so the client's response is written (the own loop
/// and hyper's HTTP/1.1 write it before they yield; hyper's HTTP/2
/// connection task is woken by it) before the copy costs the worker
/// anything.
pub(crate) fn start(worker: &Rc<Worker>, stable: u8, copy: impl FnOnce() -> ShadowCopy) {
    let stats = worker.shadow_stats();
    let canary = worker.pool(Target::Canary);
    if canary.protocol() == UpstreamProtocol::Auto {
        // An `auto` canary's protocol is learned from a connection: made
        // now, in the background; copies start once it is known.
        canary.learn_protocol(Instant::now());
        stats.record_skipped(ShadowSkip::Busy);
        return;
    }
    if !worker.shadow_started() {
        stats.record_skipped(ShadowSkip::Busy);
        return;
    }
    let slot = Slot(worker.clone());
    tokio::task::spawn_local(run(copy(), stable, slot));
}

/// Sends the copy, records its outcome and compares its status class with
/// stable's, and reads its body away.
async fn run(copy: ShadowCopy, stable: u8, slot: Slot) {
    tokio::task::yield_now().await;
    let worker = &slot.0;
    let stats = worker.shadow_stats();
    let start = Instant::now();
    let Ok(mut record) = OutcomeRecord::new(worker.clone(), Target::Canary, start, true, None)
    else {
        stats.record_skipped(ShadowSkip::Busy);
        return;
    };
    stats.record_sent();
    let pool = worker.pool(Target::Canary);
    let timeout = worker.config().response_timeout;
    let deadline = start + timeout;
    let answered = match copy {
        ShadowCopy::Http1 { method, message } => {
            let request = H1Request {
                method: &method,
                encode: |out: &mut Vec<u8>| out.extend_from_slice(&message),
                body: RequestBody::Empty,
                framing: RequestFraming::None,
                upgrade: false,
            };
            tokio::time::timeout_at(deadline, pool.send_h1(request, start))
                .await
                .map(|sent| {
                    sent.map(|resp| {
                        heard(worker, stable, &mut record, resp.status(), &resp.fields());
                        UpstreamBody::Http1(resp.into_body())
                    })
                })
        }
        ShadowCopy::Http2(request) => {
            tokio::time::timeout_at(deadline, pool.send_h2(*request, start))
                .await
                .map(|sent| {
                    sent.map(|resp| {
                        heard(worker, stable, &mut record, resp.status(), resp.headers());
                        UpstreamBody::Http2(resp.into_body())
                    })
                })
        }
    };
    let failure = match answered {
        Ok(Ok(body)) => return drain(body, &mut record, Instant::now() + timeout).await,
        Ok(Err(e)) => e,
        Err(_) => UpstreamError::Timeout {
            url: pool.upstream().url.clone(),
            timeout,
        },
    };
    tracing::debug!(error = %failure, "shadow copy failed");
    record.failed(&failure);
    stats.record_pair(Instant::now(), stable != FAILED);
}

/// The copy's response head arrived: its outcome is recorded, and its
/// status class compared with stable's.
fn heard<F: Fields + ?Sized>(
    worker: &Worker,
    stable: u8,
    record: &mut OutcomeRecord,
    status: StatusCode,
    fields: &F,
) {
    record.headers(status, fields);
    worker
        .shadow_stats()
        .record_pair(Instant::now(), class_of(status) != stable);
}

/// Reads the copy's body to its end (settling a gRPC status in trailers),
/// or up to [`DRAIN_LIMIT`] bytes or `deadline`, whichever comes first;
/// then the body, and its connection, are dropped.
async fn drain(mut body: UpstreamBody, record: &mut OutcomeRecord, deadline: Instant) {
    if body.is_end_stream() {
        return record.end(None);
    }
    let mut read = 0u64;
    let reading = async {
        loop {
            match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return record.end(None),
                Some(Err(_)) => return record.broke(),
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        return record.end(Some(trailers));
                    }
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if body.is_end_stream() {
                        return record.end(None);
                    }
                    if read > DRAIN_LIMIT {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, reading).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_bodiless_requests_by_default() {
        let off = ShadowSettings::default();
        let ok = |m: Method, b| eligibility(&off, &m, b, false);
        assert_eq!(ok(Method::GET, BodyLength::Empty), Ok(None));
        assert_eq!(ok(Method::HEAD, BodyLength::Empty), Ok(None));
        assert_eq!(ok(Method::OPTIONS, BodyLength::Empty), Ok(None));
        assert_eq!(
            ok(Method::DELETE, BodyLength::Empty),
            Err(ShadowSkip::Method)
        );
        assert_eq!(
            ok(Method::POST, BodyLength::Known(3)),
            Err(ShadowSkip::Body)
        );
        assert_eq!(ok(Method::GET, BodyLength::Chunked), Err(ShadowSkip::Body));
        assert_eq!(
            eligibility(&off, &Method::GET, BodyLength::Empty, true),
            Err(ShadowSkip::Method),
            "an upgrade is never copied"
        );
        assert_eq!(
            ok(Method::CONNECT, BodyLength::Empty),
            Err(ShadowSkip::Method)
        );
    }

    #[test]
    fn bodies_up_to_the_limit_when_allowed() {
        let on = ShadowSettings {
            max_body_bytes: 10,
            ..ShadowSettings::default()
        };
        let ok = |m: Method, b| eligibility(&on, &m, b, false);
        assert_eq!(ok(Method::POST, BodyLength::Known(10)), Ok(Some(10)));
        assert_eq!(
            ok(Method::POST, BodyLength::Known(11)),
            Err(ShadowSkip::Body)
        );
        assert_eq!(ok(Method::POST, BodyLength::Chunked), Err(ShadowSkip::Body));
        assert_eq!(ok(Method::DELETE, BodyLength::Empty), Ok(None));
    }

    #[test]
    fn status_classes() {
        assert_eq!(class_of(StatusCode::OK), 2);
        assert_eq!(class_of(StatusCode::NOT_FOUND), 4);
        assert_eq!(class_of(StatusCode::BAD_GATEWAY), FAILED);
    }
}
