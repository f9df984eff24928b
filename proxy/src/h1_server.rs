//! serin's own HTTP/1.1 server loop, for the request most traffic is made of.
//!
//! On hyper's path every request head becomes a `HeaderMap` (a hash and a
//! shared-buffer reference count per field), goes through hyper's
//! dispatcher, and its response head is parsed into another map only for
//! hyper to encode it again. That was a third of serin's CPU per request.
//! For an HTTP/1.x request without a body, without an upgrade and sent to
//! an HTTP/1.1 upstream, this loop does the exchange on the raw bytes
//! instead, as nginx and pingora do: it parses the client's head in place,
//! decides the split from it, writes the upstream request straight from it,
//! and writes the client's response head straight from the upstream's.
//!
//! Anything else (a request body, `Expect`, an upgrade, an absolute-form
//! target, an HTTP/2 preface, a malformed or oversized head) hands the
//! connection to hyper, with the bytes already read, and hyper serves it from
//! then on. So hyper stays the one place that answers malformed input (400,
//! 431) and that handles uploads, upgrades and HTTP/2; the proxy rules
//! (split, rewrites, classification, fallback, error statuses, and what a
//! client that leaves mid-request costs) are the same functions on both paths.

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::classify::Outcome;
use crate::fields::{keeps_alive, tokens, Fields};
use crate::forward::UpstreamError;
use crate::h1::Copied;
use crate::server::{rescue_status, ConnMeta, InflightGuard, ProxyError, Worker};
use crate::split::Target;
use crate::HeaderPolicy;

/// The most header fields accepted in a request head here; a head with more
/// goes to hyper, which answers 431 past its own limit.
const MAX_HEADERS: usize = 64;
/// How long an idle keep-alive connection is kept (nginx's default).
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// Serves requests on `stream` until it closes, or returns the bytes read so
/// far when hyper has to take the connection over.
pub(crate) async fn serve(
    worker: &Rc<Worker>,
    meta: &ConnMeta,
    stream: &mut TcpStream,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<BytesMut> {
    let config = &worker.shared.config;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut upstream_head = Vec::new();
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
            match parse_request(worker, meta, &buf, &mut upstream_head) {
                Parsed::Partial => None,
                Parsed::Handoff => return Some(buf),
                Parsed::Ready(request) => Some(request),
            }
        };
        let Some(request) = request else {
            if buf.len() >= config.max_header_bytes {
                return Some(buf);
            }
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
                Wait::Closed | Wait::Stopping => return None,
                Wait::Timer => {
                    let deadline = match head_started {
                        Some(started) => started + config.header_read_timeout,
                        None => idle_since + KEEP_ALIVE_IDLE,
                    };
                    if Instant::now() >= deadline {
                        tracing::debug!("closing a connection: no complete request head in time");
                        return None;
                    }
                    timer.as_mut().reset(deadline);
                    continue;
                }
            }
        };
        head_started = None;
        let keep = exchange(
            worker,
            meta,
            stream,
            &buf,
            &request,
            &upstream_head,
            &mut out,
        )
        .await;
        buf.advance(request.len);
        if !keep {
            let _ = stream.shutdown().await;
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

enum Wait {
    Bytes,
    Closed,
    Stopping,
    Timer,
}

/// Reads more of a request head. Shutdown ends only an idle connection.
async fn wait_for_bytes(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    mut stop: Pin<&mut impl Future>,
    mut timer: Pin<&mut Sleep>,
) -> Wait {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    poll_fn(|cx| loop {
        match stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => match stream.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(Wait::Closed),
                Ok(_) => {
                    // A short read took all the socket had: clear its
                    // readable mark (no system call), as tokio's own
                    // `poll_read` does, or the next wait pays a recv(2)
                    // that finds nothing.
                    if buf.capacity() > buf.len() {
                        let _ = stream.try_io(Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    return Poll::Ready(Wait::Bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Poll::Ready(Wait::Closed),
            },
            Poll::Ready(Err(_)) => return Poll::Ready(Wait::Closed),
            Poll::Pending => {}
        }
        if buf.is_empty() && stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wait::Stopping);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wait::Timer);
        }
        return Poll::Pending;
    })
    .await
}

/// What the loop needs of a request once its head has been parsed and the
/// upstream request encoded.
struct Request {
    /// When its head was complete: the start of its latency.
    start: Instant,
    /// Length of the head.
    len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    method: Method,
    target: Target,
    /// The client allows another request on this connection.
    keep_alive: bool,
    request_id: RequestId,
    /// Answer this instead of forwarding.
    refuse: Option<ProxyError>,
}

/// The request's id: the client's own, or one serin made.
enum RequestId {
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
}

enum Parsed {
    Partial,
    /// Not for this path: hyper takes the connection.
    Handoff,
    Ready(Request),
}

/// Parses the request head at the front of `buf`, decides its upstream and
/// encodes the upstream request into `upstream_head`.
fn parse_request(
    worker: &Worker,
    meta: &ConnMeta,
    buf: &[u8],
    upstream_head: &mut Vec<u8>,
) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Handoff,
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Handoff;
    };
    let fields = &*req.headers;
    let bodiless = fields.value(&TRANSFER_ENCODING).is_none()
        && fields.values(&CONTENT_LENGTH).all(|v| v == b"0");
    if !path.starts_with('/')
        || !bodiless
        || fields.value(&UPGRADE).is_some()
        || fields.value(&EXPECT).is_some()
    {
        return Parsed::Handoff;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Handoff;
    };
    let keep_alive = keeps_alive(fields, minor);
    let request_id = match fields.value(&crate::server::X_REQUEST_ID) {
        Some(id) => {
            let start = id.as_ptr() as usize - buf.as_ptr() as usize;
            RequestId::Client(start, start + id.len())
        }
        None => RequestId::Generated(worker.next_request_id_bytes()),
    };
    let config = &worker.shared.config;
    let refuse = if minor == 1 && fields.value(&HOST).is_none() {
        Some(ProxyError::MissingHost)
    } else if worker.inflight.get() >= config.max_inflight {
        Some(ProxyError::Overloaded)
    } else {
        None
    };
    let target = worker.decide(fields);
    if refuse.is_none() {
        upstream_head.clear();
        encode_upstream_head(
            worker,
            meta,
            target,
            &req,
            request_id.bytes(buf),
            upstream_head,
        );
    }
    Parsed::Ready(Request {
        start: Instant::now(),
        len,
        minor,
        method,
        target,
        keep_alive,
        request_id,
        refuse,
    })
}

/// Re-encodes a request head for another upstream (the canary fallback).
fn reencode_for(
    worker: &Worker,
    meta: &ConnMeta,
    target: Target,
    head: &[u8],
    id: &[u8],
) -> Vec<u8> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let mut out = Vec::with_capacity(head.len() + 128);
    if let Ok(httparse::Status::Complete(_)) = req.parse(head) {
        encode_upstream_head(worker, meta, target, &req, id, &mut out);
    }
    out
}

/// The request fields serin itself rewrites, by name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rewritten {
    /// Hop-by-hop: never forwarded.
    HopByHop,
    Te,
    Host,
    ForwardedFor,
    ForwardedProto,
    /// Forwarded as it is.
    Other,
}

fn rewritten(name: &[u8]) -> Rewritten {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 if is("te") => Rewritten::Te,
        4 if is("host") => Rewritten::Host,
        7 if is("trailer") || is("upgrade") => Rewritten::HopByHop,
        10 if is("connection") || is("keep-alive") => Rewritten::HopByHop,
        15 if is("x-forwarded-for") => Rewritten::ForwardedFor,
        16 if is("proxy-connection") => Rewritten::HopByHop,
        17 if is("transfer-encoding") => Rewritten::HopByHop,
        17 if is("x-forwarded-proto") => Rewritten::ForwardedProto,
        _ => Rewritten::Other,
    }
}

/// Writes the upstream request: the client's head with the same rewrites as
/// hyper's path (hop-by-hop fields out, `X-Forwarded-*`, `x-request-id`,
/// `Host` and optional `Via`).
fn encode_upstream_head(
    worker: &Worker,
    meta: &ConnMeta,
    target: Target,
    req: &httparse::Request<'_, '_>,
    request_id: &[u8],
    out: &mut Vec<u8>,
) {
    encode_upstream_head_with(
        &worker.shared.config.headers,
        worker.pool(target).upstream().authority.as_bytes(),
        meta,
        req,
        request_id,
        out,
    );
}

/// [`encode_upstream_head`] given what it needs of the worker: the header
/// policy and the upstream's `host:port` (also the fuzz targets' way in).
pub(crate) fn encode_upstream_head_with(
    policy: &HeaderPolicy,
    authority: &[u8],
    meta: &ConnMeta,
    req: &httparse::Request<'_, '_>,
    request_id: &[u8],
    out: &mut Vec<u8>,
) {
    let fields = &*req.headers;
    let named = connection_named(fields);
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let mut has_id = false;
    for field in fields {
        let name = field.name.as_bytes();
        match rewritten(name) {
            Rewritten::HopByHop | Rewritten::ForwardedFor | Rewritten::ForwardedProto => continue,
            Rewritten::Te => {
                // gRPC needs `te: trailers` end to end; any other TE is hop-by-hop.
                if field.value.eq_ignore_ascii_case(b"trailers") {
                    out.extend_from_slice(b"te: trailers\r\n");
                }
                continue;
            }
            Rewritten::Host => {
                has_host = true;
                if policy.rewrite_host {
                    continue;
                }
            }
            Rewritten::Other => {
                if named.contains(name) {
                    continue;
                }
                has_id |= name.eq_ignore_ascii_case(b"x-request-id");
            }
        }
        put_field(out, name, field.value);
    }
    if policy.rewrite_host || !has_host {
        put_field(out, b"host", authority);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for value in fields
        .iter()
        .filter(|f| rewritten(f.name.as_bytes()) == Rewritten::ForwardedFor)
    {
        out.extend_from_slice(value.value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(meta.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_field(out, b"x-forwarded-proto", meta.proto.as_bytes());
    if !has_id {
        put_field(out, b"x-request-id", request_id);
    }
    if policy.via {
        out.extend_from_slice(b"via: 1.1 serin\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Field names listed in `Connection` (hop-by-hop by RFC 9110 §7.6.1).
struct ConnectionNamed<'a> {
    names: [&'a [u8]; 8],
    len: usize,
}

impl ConnectionNamed<'_> {
    fn contains(&self, name: &[u8]) -> bool {
        self.names[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

fn connection_named<'a, F: Fields + ?Sized>(fields: &'a F) -> ConnectionNamed<'a> {
    let mut named = ConnectionNamed {
        names: [&[]; 8],
        len: 0,
    };
    for token in tokens(fields, &CONNECTION) {
        // `close` and `keep-alive` are connection options, not field names.
        if token.is_empty()
            || token.eq_ignore_ascii_case(b"close")
            || token.eq_ignore_ascii_case(b"keep-alive")
        {
            continue;
        }
        if named.len == named.names.len() {
            break;
        }
        named.names[named.len] = token;
        named.len += 1;
    }
    named
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Forwards one request and writes the response. Returns whether the
/// connection can carry another request.
async fn exchange(
    worker: &Rc<Worker>,
    meta: &ConnMeta,
    stream: &mut TcpStream,
    head: &[u8],
    request: &Request,
    upstream_head: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let config = &worker.shared.config;
    let id = request.request_id.bytes(head);
    out.clear();
    if let Some(error) = &request.refuse {
        let keep_alive = write_rescue(out, worker, request, error, id, false);
        return stream.write_all(out).await.is_ok() && keep_alive;
    }
    let start = request.start;
    worker.inflight.set(worker.inflight.get() + 1);
    let _inflight = InflightGuard(worker.clone());
    let mut served_by = request.target;
    let sent = send_watched(worker, stream, served_by, upstream_head, request, start);
    let Some(mut result) = sent.await else {
        return false;
    };
    let mut fell_back = false;
    // A bodiless idempotent request the canary fails is replayed on stable:
    // the client never sees the canary's error, the judge does.
    if served_by == Target::Canary
        && config.canary_fallback
        && matches!(request.method, Method::GET | Method::HEAD | Method::OPTIONS)
    {
        let canary_failed = match &result {
            Ok(resp) => worker.shared.classifier.is_error_status(resp.status()),
            Err(_) => true,
        };
        if canary_failed {
            worker.record(Target::Canary, start, true);
            drop(result);
            let stable_head = reencode_for(worker, meta, Target::Stable, &head[..request.len], id);
            served_by = Target::Stable;
            fell_back = true;
            // Boxed: a rare path, kept out of every request's future.
            let replay = send_watched(
                worker,
                stream,
                served_by,
                &stable_head,
                request,
                Instant::now(),
            );
            let Some(replayed) = Box::pin(replay).await else {
                return false;
            };
            result = replayed;
        }
    }
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if !matches!(e, UpstreamError::ClientAborted { .. }) {
                worker.record(served_by, start, true);
            }
            tracing::debug!(upstream = %served_by, error = %e, "upstream request failed");
            let error = ProxyError::Upstream(served_by, e);
            let keep_alive = write_rescue(out, worker, request, &error, id, fell_back);
            return stream.write_all(out).await.is_ok() && keep_alive;
        }
    };

    let status = resp.status();
    let awaits_trailers = match worker.shared.classifier.classify(status, &resp.fields()) {
        Outcome::AwaitTrailers => true,
        outcome => {
            worker.record(served_by, start, outcome == Outcome::Error);
            false
        }
    };
    // The client's framing: the upstream's length when it has one, else
    // chunked for HTTP/1.1 and the end of the connection for HTTP/1.0.
    let chunked = !resp.length_delimited() && request.minor == 1;
    let keep_alive = request.keep_alive
        && !worker.draining.get()
        && (resp.length_delimited() || request.minor == 1);
    write_status_line(out, request.minor, status);
    let fields = resp.fields();
    let named = connection_named(&fields);
    let mut has_id = false;
    for (name, value) in fields.iter() {
        match rewritten(name) {
            Rewritten::HopByHop | Rewritten::Te => continue,
            _ if named.contains(name) => continue,
            // A length next to chunked framing is wrong (RFC 9112 §6.3).
            _ if !resp.length_delimited() && name.eq_ignore_ascii_case(b"content-length") => {
                continue
            }
            _ => {}
        }
        if config.headers.upstream_header
            && (name.eq_ignore_ascii_case(b"x-serin-upstream")
                || name.eq_ignore_ascii_case(b"x-serin-fallback"))
        {
            continue;
        }
        has_id |= name.eq_ignore_ascii_case(b"x-request-id");
        put_field(out, name, value);
    }
    if config.headers.upstream_header {
        put_field(out, b"x-serin-upstream", served_by.as_str().as_bytes());
        if fell_back {
            put_field(out, b"x-serin-fallback", b"canary");
        }
    }
    if !has_id {
        put_field(out, b"x-request-id", id);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    put_connection(out, request.minor, keep_alive);
    out.extend_from_slice(b"\r\n");

    let mut body = resp.into_body();
    loop {
        match poll_fn(|cx| body.poll_copy(cx, out, chunked)).await {
            Ok(Copied::More) => {}
            Ok(Copied::End(trailers)) => {
                if chunked {
                    write_last_chunk(out, trailers.as_ref());
                }
                if awaits_trailers {
                    record_trailers(worker, served_by, start, trailers.as_ref());
                }
                return stream.write_all(out).await.is_ok() && keep_alive;
            }
            Err(e) => {
                if awaits_trailers {
                    record_trailers(worker, served_by, start, None);
                }
                tracing::debug!(upstream = %served_by, error = %e, "upstream response body broke off");
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

/// Sends the encoded request to `target` (see [`send`]) while watching the
/// client: a client that leaves drops the upstream request, as nginx and
/// hyper do, and the request is recorded as abandoned (`None`).
async fn send_watched(
    worker: &Worker,
    stream: &TcpStream,
    target: Target,
    upstream_head: &[u8],
    request: &Request,
    sent_at: Instant,
) -> Option<Result<crate::h1::RawResponse, UpstreamError>> {
    let awaiting = worker.awaiting(target, request.start);
    let sent = send(worker, target, upstream_head, &request.method, sent_at);
    let result = unless_client_leaves(stream, sent).await?;
    awaiting.answered();
    Some(result)
}

/// Waits for `work` unless the client closes or resets its connection first
/// (`None`). A client that sends more bytes meanwhile (a pipelined request)
/// is not watched any further: its bytes stay in the socket for the loop,
/// and a peek past them cannot see the close. Watching costs no system call
/// until the client's socket turns readable.
async fn unless_client_leaves<T>(stream: &TcpStream, work: impl Future<Output = T>) -> Option<T> {
    let mut work = pin!(work);
    let mut watching = true;
    poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        if watching {
            let mut probe = [0u8; 1];
            match stream.poll_peek(cx, &mut ReadBuf::new(&mut probe)) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => watching = false,
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
) -> Result<crate::h1::RawResponse, UpstreamError> {
    let pool = worker.pool(target);
    let timeout = worker.shared.config.response_timeout;
    let send = pool.send_raw(|w| w.extend_from_slice(upstream_head), method, sent_at);
    match tokio::time::timeout_at(sent_at + timeout, send).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            url: pool.upstream().url.clone(),
            timeout,
        }),
    }
}

/// Records a gRPC-style outcome that waited for the trailers.
fn record_trailers(worker: &Worker, target: Target, start: Instant, trailers: Option<&HeaderMap>) {
    let error = worker.shared.classifier.classify_trailers(trailers) == Outcome::Error;
    worker.record_latency(target, start.elapsed(), error);
}

fn write_status_line(out: &mut Vec<u8>, minor: u8, status: StatusCode) {
    out.extend_from_slice(if minor == 1 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
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

/// The last chunk of a chunked response, with its trailers.
fn write_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the response serin makes itself for `error` (see
/// [`rescue_status`]); returns whether the connection stays open.
fn write_rescue(
    out: &mut Vec<u8>,
    worker: &Worker,
    request: &Request,
    error: &ProxyError,
    id: &[u8],
    fell_back: bool,
) -> bool {
    let (status, text) = rescue_status(error);
    write_status_line(out, request.minor, status);
    out.extend_from_slice(b"content-type: text/plain\r\ncontent-length: ");
    let _ = write!(out, "{}", text.len());
    out.extend_from_slice(b"\r\n");
    if let ProxyError::Upstream(target, _) = error {
        // Named even when the header is turned off: it says whose failure it was.
        put_field(out, b"x-serin-upstream", target.as_str().as_bytes());
        if fell_back && worker.shared.config.headers.upstream_header {
            put_field(out, b"x-serin-fallback", b"canary");
        }
    }
    put_field(out, b"x-request-id", id);
    let keep_alive = request.keep_alive && !worker.draining.get();
    put_connection(out, request.minor, keep_alive);
    out.extend_from_slice(b"\r\n");
    // A response to HEAD has the length of the body it would have, not the body.
    if request.method != Method::HEAD {
        out.extend_from_slice(text.as_bytes());
    }
    keep_alive
}
