//! serin's own HTTP/1.1 server loop, for the request most traffic is made of.
//!
//! On hyper's path every request head becomes a `HeaderMap` (a hash and a
//! shared-buffer reference count per field), goes through hyper's
//! dispatcher, and its response head is parsed into another map only for
//! hyper to encode it again. That was a third of serin's CPU per request.
//! For an HTTP/1.x request without a body, without an upgrade and sent to
//! an HTTP/1.1 upstream, over plain TCP or TLS ([`super::client_io`]), this
//! loop does the exchange on the raw bytes instead, as nginx and pingora
//! do: it parses the client's head in place ([`crate::http1::head`]), asks
//! the request policy ([`crate::policy`]) whether and how to forward it,
//! writes the upstream request straight from it, and writes the client's
//! response head straight from the upstream's.
//!
//! An HTTP/2 preface hands the connection to the own HTTP/2 loop
//! ([`crate::server::own_h2`]); a request with a body, `Expect` or an
//! upgrade, or a target not in origin form, to hyper
//! ([`crate::server::hyper`]). Either gets the bytes already read, and
//! serves the connection from then on. Both adapters call the same policy, so a request gets
//! the same answer, and its upstream the same bytes, on either.

use std::future::{poll_fn, Future};
use std::io::Write as _;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{Method, Version};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::client_io::{ClientIo, Watched};
use crate::fields::FieldSink;
use crate::fields::{keeps_alive, Fields};
use crate::http1::chunked::encode_last_chunk;
use crate::http1::head::{
    field_slots, parse_request, write_request_line, write_status_line, HeadError,
};
use crate::outcome::{Observation, OutcomeRecord, RequestFacts, Settled};
use crate::policy::{
    admit, canary_failed, limit_rate, local_answer, may_fall_back, write_local_fields,
    write_request_fields, write_response_fields, Admitted, Answering, BodyLength, ConnMeta,
    Forwarding, Refusal, RequestHead, X_REQUEST_ID,
};
use crate::shadow::{self, class_of, ShadowCopy, FAILED, SHADOW_HEADER};
use crate::split::Target;
use crate::trace::TraceContext;
use crate::upstream::{
    Copied, H1Request, RequestBody, RequestFraming, UpstreamError, UpstreamResponse,
};
use crate::worker::Worker;

/// How long an idle keep-alive connection is kept (nginx's default).
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);
/// How long closing a connection may wait for the client to take serin's
/// last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Serves requests on `stream` until it closes, or returns the bytes read so
/// far when hyper has to take the connection over.
pub(crate) async fn serve(
    worker: &Rc<Worker>,
    meta: &ConnMeta,
    stream: &mut ClientIo,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<BytesMut> {
    let config = &worker.shared.config;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut scratch = Scratch::default();
    let mut stop = pin!(shutdown.wait_for(|&stop| stop));
    let mut idle_since = Instant::now();
    // When the current head's first bytes arrived, if it is still partial.
    let mut head_started: Option<Instant> = None;
    // One timer per connection, moved only when it fires early: waiting
    // for a head costs no timer operation per request.
    let mut timer = pin!(tokio::time::sleep_until(idle_since + KEEP_ALIVE_IDLE));
    loop {
        let request = if buf.is_empty() {
            None
        } else {
            match parse(worker, meta, &buf, &mut scratch) {
                Parsed::Partial => None,
                Parsed::Handoff => {
                    buf.extend_from_slice(&stream.take_early());
                    return Some(buf);
                }
                Parsed::Ready(request) => Some(request),
            }
        };
        let Some(request) = request else {
            if !buf.is_empty() && head_started.is_none() {
                let started = Instant::now();
                head_started = Some(started);
                let deadline = started + config.header_read_timeout;
                if deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let waited = wait_for_bytes(stream, &mut buf, stop.as_mut(), timer.as_mut()).await;
            match waited {
                Wait::Bytes => continue,
                Wait::Closed => return None,
                Wait::Stopping => {
                    close(stream).await;
                    return None;
                }
                Wait::Timer => {
                    let deadline = match head_started {
                        Some(started) => started + config.header_read_timeout,
                        None => idle_since + KEEP_ALIVE_IDLE,
                    };
                    if Instant::now() >= deadline {
                        tracing::debug!("closing a connection: no complete request head in time");
                        close(stream).await;
                        return None;
                    }
                    timer.as_mut().reset(deadline);
                    continue;
                }
            }
        };
        head_started = None;
        let keep = exchange(worker, meta, stream, &buf, &request, &mut scratch, &mut out).await;
        buf.advance(request.len);
        if !keep {
            close(stream).await;
            return None;
        }
        if out.capacity() > 2 * WRITE_BATCH {
            out = Vec::new();
        }
        // The idle clock starts at the request's start, not its end: one
        // clock read less, and an idle connection only closes sooner.
        idle_since = request.start;
    }
}

/// Ends a connection from serin's side: over TLS with a `close_notify`,
/// which a client that reads nothing may hold up for at most
/// [`CLOSE_TIMEOUT`].
async fn close(stream: &mut ClientIo) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
}

enum Wait {
    Bytes,
    Closed,
    Stopping,
    Timer,
}

/// Reads more of a request head. Shutdown ends only an idle connection.
async fn wait_for_bytes(
    stream: &mut ClientIo,
    buf: &mut BytesMut,
    mut stop: Pin<&mut impl Future>,
    mut timer: Pin<&mut Sleep>,
) -> Wait {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    poll_fn(|cx| {
        match stream.poll_fill(cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Wait::Closed),
            Poll::Ready(Ok(_)) => return Poll::Ready(Wait::Bytes),
            Poll::Pending => {}
        }
        if buf.is_empty() && stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wait::Stopping);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wait::Timer);
        }
        Poll::Pending
    })
    .await
}

/// What the loop needs of a request once its head has been parsed and the
/// upstream request encoded.
pub(crate) struct Request {
    /// When its head was complete: the start of its latency.
    start: Instant,
    /// Length of the head.
    pub(crate) len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    method: Method,
    target: Target,
    /// The client allows another request on this connection.
    keep_alive: bool,
    pub(crate) request_id: RequestId,
    admitted: Admitted,
    /// Answer this instead of forwarding.
    pub(crate) refusal: Option<Refusal>,
}

/// What the loop keeps for the request being served besides its
/// [`Request`]: a reused buffer, and the parts that only some settings use,
/// kept here so that every request does not move them about.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The upstream request head, encoded.
    pub(crate) upstream_head: Vec<u8>,
    /// The request's trace context, when serin keeps one.
    trace: Option<TraceContext>,
    /// What the access log and span export keep of it, when either is on.
    observation: Option<Observation>,
    /// Its copy for the canary, encoded, when it is shadowed.
    shadow: Option<Vec<u8>>,
}

/// The request's id: the client's own, or one serin made.
pub(crate) enum RequestId {
    /// Where the client's `x-request-id` value sits in the head.
    Client(usize, usize),
    Generated([u8; 24]),
}

impl RequestId {
    fn bytes<'a>(&'a self, head: &'a [u8]) -> &'a [u8] {
        match self {
            RequestId::Client(start, end) => &head[*start..*end],
            RequestId::Generated(id) => id,
        }
    }

    pub(crate) fn generated(&self) -> Option<&[u8]> {
        match self {
            RequestId::Client(..) => None,
            RequestId::Generated(id) => Some(id),
        }
    }
}

// The large variant is the common one: boxing it would cost an allocation
// per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parsed {
    Partial,
    /// Not for this path: hyper takes the connection.
    Handoff,
    Ready(Request),
}

/// Parses the request head at the front of `buf`, asks the policy about it,
/// decides its upstream and encodes the upstream request into
/// `scratch.upstream_head`.
pub(crate) fn parse(worker: &Worker, meta: &ConnMeta, buf: &[u8], scratch: &mut Scratch) -> Parsed {
    let config = worker.config();
    // No copy for the canary unless this request turns out to want one.
    scratch.shadow = None;
    let mut slots = field_slots();
    let mut req = httparse::Request::new(&mut []);
    // A request answered at once, whose bytes are all dropped.
    let mut refused_with =
        |refusal, minor, method: Method, keep_alive, head: Option<LogHead<'_>>| {
            let id = worker.next_request_id_bytes();
            scratch.trace = None;
            scratch.observation = worker.observe(
                || {
                    let head = head.unwrap_or_default();
                    RequestFacts {
                        request_id: &id,
                        trace_id: None,
                        client: meta.client_ip.as_bytes(),
                        method: method.as_str().as_bytes(),
                        authority: head.authority,
                        target: head.target,
                        version: if minor == 0 {
                            Version::HTTP_10
                        } else {
                            Version::HTTP_11
                        },
                        tls: meta.tls(),
                    }
                },
                None,
            );
            Parsed::Ready(Request {
                start: Instant::now(),
                len: buf.len(),
                minor,
                method,
                target: Target::Stable,
                keep_alive,
                request_id: RequestId::Generated(id),
                admitted: Admitted::default(),
                refusal: Some(refusal),
            })
        };
    // The head could not be read: answered as HTTP/1.1, then closed.
    let mut refused = |refusal| refused_with(refusal, 1, Method::GET, false, None);
    let len = match parse_request(&mut req, buf, &mut slots, config.max_header_bytes) {
        Ok(Some(len)) => len,
        Ok(None) => return Parsed::Partial,
        Err(HeadError::Http2Preface) => return Parsed::Handoff,
        Err(HeadError::TooLarge) => return refused(Refusal::HeadTooLarge),
        Err(HeadError::Malformed(what)) => {
            tracing::debug!(what, "malformed request head");
            return refused(Refusal::Malformed);
        }
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return refused(Refusal::Malformed);
    };
    let fields = &*req.headers;
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return refused(Refusal::Malformed);
    };
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let head = RequestHead {
        method: &method,
        version,
        fields,
    };
    // The policy judges the request here, on the bytes as sent, even one that
    // goes on to hyper: hyper would normalise what serin refuses (it merges
    // repeated Content-Length lines and drops Content-Length next to
    // Transfer-Encoding).
    let admitted = admit(&head, worker.inflight(), config);
    let bodiless = match &admitted {
        Ok(admitted) => admitted.body == BodyLength::Empty,
        Err(_) => {
            fields.value(&TRANSFER_ENCODING).is_none()
                && fields.values(&CONTENT_LENGTH).all(|v| v == b"0")
        }
    };
    let hyper_needed = !path.starts_with('/')
        || !bodiless
        || fields.value(&UPGRADE).is_some()
        || fields.value(&EXPECT).is_some();
    let (admitted, refusal) = match admitted {
        // Hyper admits it again, and takes its rate-limit token.
        Ok(_) if hyper_needed => return Parsed::Handoff,
        Ok(admitted) => match limit_rate(worker.rate_limiter(), fields, meta) {
            Ok(()) => (admitted, None),
            Err(refusal) => (admitted, Some(refusal)),
        },
        // A refused request's body would be read as the next request: the
        // connection closes after the answer.
        Err(refusal) if !bodiless => {
            let head = LogHead {
                authority: fields.value(&HOST).unwrap_or_default(),
                target: path.as_bytes(),
            };
            return refused_with(refusal, minor, method, false, Some(head));
        }
        Err(refusal) => (Admitted::default(), Some(refusal)),
    };
    let request_id = match fields.value(&X_REQUEST_ID) {
        Some(id) => {
            let start = id.as_ptr() as usize - buf.as_ptr() as usize;
            RequestId::Client(start, start + id.len())
        }
        None => RequestId::Generated(worker.next_request_id_bytes()),
    };
    let decision = worker.decide(fields, meta.identity());
    let target = decision.target;
    let trace = worker.trace_context(fields);
    if refusal.is_none() {
        let ids = Ids {
            request: &request_id,
            trace: trace.as_ref(),
        };
        let upstream_head = &mut scratch.upstream_head;
        upstream_head.clear();
        encode_upstream_head(
            worker,
            meta,
            target,
            &req,
            admitted,
            &ids,
            false,
            upstream_head,
        );
        if decision.shadow {
            // This loop serves only bodiless requests without an upgrade.
            match shadow::eligibility(&config.shadow, &method, BodyLength::Empty, false) {
                Ok(_) => {
                    let mut copy = Vec::with_capacity(upstream_head.len() + 32);
                    encode_upstream_head(
                        worker,
                        meta,
                        Target::Canary,
                        &req,
                        admitted,
                        &ids,
                        true,
                        &mut copy,
                    );
                    scratch.shadow = Some(copy);
                }
                Err(why) => worker.shadow_stats().record_skipped(why),
            }
        }
    }
    scratch.observation = worker.observe(
        || RequestFacts {
            request_id: request_id.bytes(buf),
            trace_id: trace.as_ref().map(TraceContext::trace_id),
            client: meta.client_ip.as_bytes(),
            method: method.as_str().as_bytes(),
            authority: fields.value(&HOST).unwrap_or_default(),
            target: path.as_bytes(),
            version,
            tls: meta.tls(),
        },
        trace.as_ref(),
    );
    scratch.trace = trace;
    Parsed::Ready(Request {
        start: Instant::now(),
        len,
        minor,
        keep_alive: keeps_alive(fields, minor),
        method,
        target,
        request_id,
        admitted,
        refusal,
    })
}

/// What the access log reads of a head that was refused.
#[derive(Default)]
struct LogHead<'a> {
    authority: &'a [u8],
    target: &'a [u8],
}

/// The ids a request carries upstream.
struct Ids<'a> {
    request: &'a RequestId,
    trace: Option<&'a TraceContext>,
}

/// Writes the upstream request for `target`: the request line, then the
/// fields as the policy rewrites them, then, for a shadow copy, its marker.
#[allow(clippy::too_many_arguments)]
fn encode_upstream_head(
    worker: &Worker,
    meta: &ConnMeta,
    target: Target,
    req: &httparse::Request<'_, '_>,
    admitted: Admitted,
    ids: &Ids<'_>,
    shadow: bool,
    out: &mut Vec<u8>,
) {
    let method = req.method.unwrap_or("GET").as_bytes();
    write_request_line(out, method, req.path.unwrap_or("/").as_bytes());
    let forwarding = Forwarding {
        conn: meta,
        version: if req.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        config: worker.config(),
        admitted,
        authority: None,
        upstream_authority: worker.pool(target).upstream().authority.as_bytes(),
        generated_id: ids.request.generated(),
        traceparent: ids.trace.and_then(TraceContext::forward),
    };
    write_request_fields(&*req.headers, &forwarding, out);
    if shadow {
        out.field(SHADOW_HEADER.as_bytes(), b"1");
    }
    out.extend_from_slice(b"\r\n");
}

/// Re-encodes a request head for another upstream (the canary fallback).
fn reencode_for(
    worker: &Worker,
    meta: &ConnMeta,
    target: Target,
    request: &Request,
    trace: Option<&TraceContext>,
    head: &[u8],
) -> Vec<u8> {
    let mut slots = [httparse::EMPTY_HEADER; crate::http1::head::MAX_FIELDS];
    let mut req = httparse::Request::new(&mut slots);
    let mut out = Vec::with_capacity(head.len() + 128);
    if let Ok(httparse::Status::Complete(_)) = req.parse(head) {
        encode_upstream_head(
            worker,
            meta,
            target,
            &req,
            request.admitted,
            &Ids {
                request: &request.request_id,
                trace,
            },
            false,
            &mut out,
        );
    }
    out
}

/// Forwards one request and writes the response. Returns whether the
/// connection can carry another request.
async fn exchange(
    worker: &Rc<Worker>,
    meta: &ConnMeta,
    stream: &mut ClientIo,
    head: &[u8],
    request: &Request,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> bool {
    let config = worker.config();
    let observation = scratch.observation.take();
    let (upstream_head, trace) = (&scratch.upstream_head, scratch.trace.as_ref());
    let id = request.request_id.bytes(head);
    out.clear();
    if let Some(refusal) = &request.refusal {
        return refuse(worker, stream, out, request, refusal, id, observation).await;
    }
    let start = request.start;
    let record = OutcomeRecord::new(worker.clone(), request.target, start, true, observation);
    let mut record = match record {
        Ok(record) => record,
        Err((refusal, observation)) => {
            return refuse(worker, stream, out, request, &refusal, id, observation).await;
        }
    };
    let sent = send_watched(
        worker,
        stream,
        request.target,
        upstream_head,
        request,
        start,
    );
    let Some(mut result) = sent.await else {
        return false;
    };
    // The copy, once stable has answered: its own task, which nothing here
    // waits for, and which starts after this answer is written.
    if let Some(message) = scratch.shadow.take() {
        let stable = result.as_ref().map_or(FAILED, |r| class_of(r.status()));
        shadow::start(worker, stable, || ShadowCopy::Http1 {
            method: request.method.clone(),
            message,
        });
    }
    let mut fell_back = false;
    // A bodiless idempotent request the canary fails is replayed on stable:
    // the client never sees the canary's error, the judge does.
    if may_fall_back(config, request.target, &request.method, true, false)
        && canary_failed(
            &worker.shared.classifier,
            result.as_ref().ok().map(UpstreamResponse::status),
        )
    {
        record.fall_back();
        fell_back = true;
        drop(result);
        let stable_head = reencode_for(
            worker,
            meta,
            Target::Stable,
            request,
            trace,
            &head[..request.len],
        );
        // Boxed: a rare path, kept out of every request's future.
        let replay = send_watched(
            worker,
            stream,
            Target::Stable,
            &stable_head,
            request,
            Instant::now(),
        );
        let Some(replayed) = Box::pin(replay).await else {
            return false;
        };
        result = replayed;
    }
    let served_by = record.target();
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            record.failed(&e);
            tracing::debug!(
                request_id = %String::from_utf8_lossy(id),
                upstream = %served_by,
                error = %e,
                "upstream request failed"
            );
            let refusal = Refusal::Upstream(served_by, e);
            let (keep_alive, sent) = write_local(out, worker, request, &refusal, id, fell_back);
            record.body_sent(sent);
            return stream.write_all(out).await.is_ok() && keep_alive;
        }
    };

    let status = resp.status();
    record.headers(status, &resp.fields());
    // The client's framing: the upstream's length when it has one, else
    // chunked for HTTP/1.1 and the end of the connection for HTTP/1.0.
    let chunked = !resp.length_delimited() && request.minor == 1;
    let keep_alive = request.keep_alive
        && !worker.draining.get()
        && (resp.length_delimited() || request.minor == 1);
    write_status_line(out, request.minor, status);
    let answering = Answering {
        config,
        served_by,
        fell_back,
        request_id: id,
    };
    write_response_fields(&resp.fields(), &answering, out);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    put_connection(out, request.minor, keep_alive);
    out.extend_from_slice(b"\r\n");

    let mut body = resp.into_body();
    loop {
        // While the upstream is quiet (a long poll, an event stream), the
        // client is watched too: one that leaves closes the upstream
        // connection now, not at the next write.
        let copied = unless_client_leaves(stream, poll_fn(|cx| body.poll_copy(cx, out, chunked)));
        let Some(copied) = copied.await else {
            return false;
        };
        record.body_sent(body.copied());
        match copied {
            Ok(Copied::More) => {}
            Ok(Copied::End(trailers)) => {
                if chunked {
                    encode_last_chunk(out, trailers.as_ref());
                }
                record.end(trailers.as_ref());
                return stream.write_all(out).await.is_ok() && keep_alive;
            }
            Err(e) => {
                record.broke();
                tracing::debug!(
                    request_id = %String::from_utf8_lossy(answering.request_id),
                    upstream = %served_by,
                    error = %e,
                    "upstream response body broke off"
                );
                // The client cannot be told after the head: it sees the
                // connection close before the body is complete.
                let _ = stream.write_all(out).await;
                return false;
            }
        }
        if stream.write_all(out).await.is_err() {
            return false;
        }
        out.clear();
    }
}

/// Writes serin's answer to a request it refuses before sending it anywhere,
/// with its access-log line and span settled; returns whether the
/// connection stays open.
async fn refuse(
    worker: &Worker,
    stream: &mut ClientIo,
    out: &mut Vec<u8>,
    request: &Request,
    refusal: &Refusal,
    id: &[u8],
    observation: Option<Observation>,
) -> bool {
    let (keep_alive, sent) = write_local(out, worker, request, refusal, id, false);
    let written = stream.write_all(out).await.is_ok();
    if let Some(observation) = observation {
        let answer = local_answer(refusal);
        let elapsed = request.start.elapsed();
        let settled = Settled::refused(answer.upstream, answer.status, sent, elapsed);
        worker.settle(observation, &settled);
    }
    written && keep_alive
}

/// Sends the encoded request to `target` (see [`send`]) while watching the
/// client: a client that leaves drops the upstream request, as nginx and
/// hyper do (`None`; the dropped [`OutcomeRecord`] counts it as abandoned).
async fn send_watched(
    worker: &Worker,
    stream: &mut ClientIo,
    target: Target,
    upstream_head: &[u8],
    request: &Request,
    sent_at: Instant,
) -> Option<Result<UpstreamResponse, UpstreamError>> {
    let sent = send(worker, target, upstream_head, &request.method, sent_at);
    unless_client_leaves(stream, sent).await
}

/// Waits for `work` unless the client closes or resets its connection first
/// (`None`). A client that sends more bytes meanwhile (a pipelined request)
/// is not watched any further: its bytes wait for the loop, and a close
/// behind them cannot be seen until they are read. See
/// [`ClientIo::poll_watch`].
async fn unless_client_leaves<T>(
    stream: &mut ClientIo,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = pin!(work);
    let mut watching = true;
    poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        if watching {
            match stream.poll_watch(cx) {
                Poll::Ready(Watched::Left) => return Poll::Ready(None),
                Poll::Ready(Watched::Sent) => watching = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Sends the encoded request to `target` under the response timeout.
async fn send(
    worker: &Worker,
    target: Target,
    upstream_head: &[u8],
    method: &Method,
    sent_at: Instant,
) -> Result<UpstreamResponse, UpstreamError> {
    let pool = worker.pool(target);
    let timeout = worker.config().response_timeout;
    let request = H1Request {
        method,
        encode: |w: &mut Vec<u8>| w.extend_from_slice(upstream_head),
        body: RequestBody::Empty,
        framing: RequestFraming::None,
        upgrade: false,
    };
    match tokio::time::timeout_at(sent_at + timeout, pool.send_h1(request, sent_at)).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            url: pool.upstream().url.clone(),
            timeout,
        }),
    }
}

/// `Connection` for the client: close when the connection ends after this
/// response; keep-alive when an HTTP/1.0 client asked to keep it.
fn put_connection(out: &mut Vec<u8>, minor: u8, keep_alive: bool) {
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Writes the response serin makes itself for `refusal` (see
/// [`local_answer`]); returns whether the connection stays open, and the
/// body's length.
fn write_local(
    out: &mut Vec<u8>,
    worker: &Worker,
    request: &Request,
    refusal: &Refusal,
    id: &[u8],
    fell_back: bool,
) -> (bool, u64) {
    let answer = local_answer(refusal);
    write_status_line(out, request.minor, answer.status);
    write_local_fields(&answer, worker.config(), fell_back, id, out);
    out.extend_from_slice(b"content-length: ");
    let _ = write!(out, "{}", answer.text.len());
    out.extend_from_slice(b"\r\n");
    let keep_alive = request.keep_alive && !answer.close && !worker.draining.get();
    put_connection(out, request.minor, keep_alive);
    out.extend_from_slice(b"\r\n");
    // A response to HEAD has the length of the body it would have, not the body.
    if request.method == Method::HEAD {
        return (keep_alive, 0);
    }
    out.extend_from_slice(answer.text.as_bytes());
    (keep_alive, answer.text.len() as u64)
}
