//! The request policy: every rule about what serin lets through, rewrites
//! and answers itself, written once for every path that carries a request.
//!
//! serin serves HTTP/1.1 on two paths (its own loop, [`crate::server::own_h1`],
//! and hyper, [`crate::server::hyper`]) and HTTP/2 on hyper. Those are
//! protocol adapters: they move bytes and frames. What a request may look
//! like, which fields reach the upstream and the client, when a canary
//! failure is replayed on stable, and which status an error becomes are
//! decided here, in the order pingora's `ProxyHttp` hooks run:
//!
//! 1. [`admit`]: framing (RFC 9112 §6), `Host` (§3.2), methods serin does not
//!    forward, `Max-Forwards` (RFC 9110 §7.6.2) and overload. A refusal is a
//!    [`Refusal`]. Then [`limit_rate`]: the local rate limit, called by the
//!    adapter that forwards the request (the own loop hands some admitted
//!    requests to hyper, which admits them again), so each takes one token.
//!    The upstream's concurrency cap is taken with the request's
//!    [`crate::outcome::OutcomeRecord`], once the split has picked it.
//! 2. [`write_request_fields`]: hop-by-hop fields out, every field named in
//!    `Connection` out (no cap), `Host`, `X-Forwarded-For`/`-Proto`, `Via`,
//!    `Max-Forwards`, the request id, and the client certificate's identity
//!    header (every copy the client sent out; serin's in).
//! 3. [`may_fall_back`] and [`canary_failed`]: the canary fallback.
//! 4. [`write_response_fields`]: the same hop-by-hop rules on the way back,
//!    serin's own `x-serin-*` fields, and the request id.
//! 5. [`local_answer`] and [`write_local_fields`]: every response serin makes
//!    itself. This is the only place that picks an error status.
//!
//! A difference between the paths that is not a difference in the protocol
//! (a body's framing, HTTP/2's pseudo-headers) is a bug. The rules only
//! read fields through [`Fields`] and write through [`FieldSink`], so they
//! cost no allocation on serin's own HTTP/1.1 path.

use std::net::IpAddr;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue, Method, StatusCode, Version};
use tokio::time::Instant;

use crate::classify::Classifier;
use crate::fields::{tokens, FieldSink, Fields};
use crate::http1::framing::decimal;
use crate::limit::RateLimiter;
use crate::split::Target;
use crate::upstream::UpstreamError;
use crate::ProxyConfig;

/// Facts about a client connection that the rewrites use, computed once per
/// connection.
pub(crate) struct ConnMeta {
    /// The client's address, which the rate limit may count requests by.
    pub(crate) peer: IpAddr,
    /// The client's address, as `X-Forwarded-For` gives it.
    pub(crate) client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub(crate) proto: HeaderValue,
    /// The verified client certificate's identity (see
    /// [`crate::tls::client_identity`]), read once at the handshake.
    pub(crate) identity: Option<HeaderValue>,
}

impl ConnMeta {
    /// Whether the client connected over TLS.
    #[inline]
    pub(crate) fn tls(&self) -> bool {
        self.proto == "https"
    }

    /// The client's verified identity, if it has one.
    #[inline]
    pub(crate) fn identity(&self) -> Option<&[u8]> {
        self.identity.as_ref().map(HeaderValue::as_bytes)
    }
}

static MAX_FORWARDS: HeaderName = HeaderName::from_static("max-forwards");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The methods named in `Allow` when serin answers for the upstream.
const ALLOWED: &[u8] = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

// === admission ===

/// What admission reads of a request, from either path.
pub(crate) struct RequestHead<'a, F: ?Sized> {
    pub(crate) method: &'a Method,
    pub(crate) version: Version,
    pub(crate) fields: &'a F,
}

/// What admission learnt that the adapters and the rewrites need.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Admitted {
    /// How the request's body is framed.
    pub(crate) body: BodyLength,
    /// `Max-Forwards` to send instead of the client's (OPTIONS and TRACE).
    pub(crate) max_forwards: Option<u32>,
}

/// How a request's body is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// No body, or `Content-Length: 0`.
    #[default]
    Empty,
    /// `Content-Length`.
    Known(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Decides whether a request may be forwarded, before anything is sent.
pub(crate) fn admit<F: Fields + ?Sized>(
    head: &RequestHead<'_, F>,
    inflight: usize,
    config: &ProxyConfig,
) -> Result<Admitted, Refusal> {
    let fields = head.fields;
    let body = check_framing(head)?;
    check_host(head)?;
    if head.method == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    let mut admitted = Admitted {
        body,
        max_forwards: None,
    };
    if head.method == Method::OPTIONS || head.method == Method::TRACE {
        if let Some(n) = fields.value(&MAX_FORWARDS).and_then(decimal) {
            if n == 0 {
                return Err(Refusal::MaxForwards(head.method.clone()));
            }
            admitted.max_forwards = Some((n - 1).min(u64::from(u32::MAX)) as u32);
        }
    }
    if inflight >= config.max_inflight {
        return Err(Refusal::Overloaded);
    }
    Ok(admitted)
}

/// The local rate limit (`[rate_limit]`), after [`admit`]: takes a token
/// from the bucket of the request's key, or refuses it until the bucket has
/// one. Without a rate limit, one branch.
#[inline]
pub(crate) fn limit_rate<F: Fields + ?Sized>(
    limiter: Option<&RateLimiter>,
    fields: &F,
    conn: &ConnMeta,
) -> Result<(), Refusal> {
    match limiter {
        None => Ok(()),
        Some(limiter) => limiter
            .take(fields, conn.peer, conn.identity(), Instant::now())
            .map_err(|retry_after| Refusal::RateLimited { retry_after }),
    }
}

/// RFC 9112 §6: a request's body must have one unambiguous length. serin
/// decodes exactly one transfer coding, chunked; it never guesses.
fn check_framing<F: Fields + ?Sized>(head: &RequestHead<'_, F>) -> Result<BodyLength, Refusal> {
    let fields = head.fields;
    if fields.value(&TRANSFER_ENCODING).is_some() {
        if head.version == Version::HTTP_10 {
            return Err(Refusal::Framing(
                "serin: bad request framing: Transfer-Encoding in an HTTP/1.0 request\n",
            ));
        }
        if fields.value(&CONTENT_LENGTH).is_some() {
            return Err(Refusal::Framing(
                "serin: bad request framing: both Transfer-Encoding and Content-Length\n",
            ));
        }
        // Exactly `chunked`: a coding before it would be lost when serin
        // decodes the body, and a second `chunked` is not allowed (§7).
        let mut codings = tokens(fields, &TRANSFER_ENCODING);
        let only_chunked = codings
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !only_chunked {
            return Err(Refusal::Framing(
                "serin: bad request framing: the only Transfer-Encoding accepted is chunked\n",
            ));
        }
        return Ok(BodyLength::Chunked);
    }
    let mut lengths = tokens(fields, &CONTENT_LENGTH);
    match (lengths.next(), lengths.next()) {
        (None, _) => Ok(BodyLength::Empty),
        (Some(_), Some(_)) => Err(Refusal::Framing(
            "serin: bad request framing: more than one Content-Length\n",
        )),
        (Some(length), None) => match decimal(length) {
            Some(0) => Ok(BodyLength::Empty),
            Some(n) => Ok(BodyLength::Known(n)),
            None => Err(Refusal::Framing(
                "serin: bad request framing: invalid Content-Length\n",
            )),
        },
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one valid `Host`, even
/// when its target carries the authority; no request has two. (HTTP/2
/// carries the authority in `:authority`.)
fn check_host<F: Fields + ?Sized>(head: &RequestHead<'_, F>) -> Result<(), Refusal> {
    let mut hosts = head.fields.values(&HOST);
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::Host(
            "serin: bad request: more than one Host header\n",
        ));
    }
    match host {
        Some(value) if !valid_host(value) => Err(Refusal::Host(
            "serin: bad request: the Host header is not a valid host[:port]\n",
        )),
        None if head.version == Version::HTTP_11 => Err(Refusal::Host(
            "serin: an HTTP/1.1 request needs a Host header\n",
        )),
        _ => Ok(()),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2); empty is allowed (RFC 9112 §3.2).
/// Also what an HTTP/2 request's `:authority` must be (RFC 9113 §8.3.1: no
/// userinfo).
pub(crate) fn valid_host(value: &[u8]) -> bool {
    if let Some(literal) = value.strip_prefix(b"[") {
        // An IP literal, then an optional port.
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let (ip, after) = (&literal[..end], &literal[end + 1..]);
        return !ip.is_empty()
            && ip
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && (after.is_empty()
                || after
                    .strip_prefix(b":")
                    .is_some_and(|p| p.iter().all(u8::is_ascii_digit)));
    }
    // A reg-name or IPv4 address, then an optional port: one pass.
    let mut in_port = false;
    value.iter().all(|&b| {
        if in_port {
            b.is_ascii_digit()
        } else if b == b':' {
            in_port = true;
            true
        } else {
            REG_NAME[usize::from(b)]
        }
    })
}

/// The bytes of a reg-name or IPv4 address: unreserved, pct-encoded and
/// sub-delims (RFC 3986 §3.2.2).
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

// === request rewrites ===

/// What the request rewrite needs besides the client's fields.
pub(crate) struct Forwarding<'a> {
    pub(crate) conn: &'a ConnMeta,
    /// The version the client spoke.
    pub(crate) version: Version,
    pub(crate) config: &'a ProxyConfig,
    /// What admission decided.
    pub(crate) admitted: Admitted,
    /// The authority of an absolute-form target or `:authority`, which
    /// replaces the client's `Host` (RFC 9112 §3.2.2).
    pub(crate) authority: Option<&'a [u8]>,
    /// The upstream's `host:port`.
    pub(crate) upstream_authority: &'a [u8],
    /// The id serin made for a request that came without one.
    pub(crate) generated_id: Option<&'a [u8]>,
    /// The `traceparent` to send instead of the client's, when serin
    /// started or continues the trace ([`crate::trace`]).
    pub(crate) traceparent: Option<&'a [u8]>,
}

/// A request or response field serin treats specially, by name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    /// Hop-by-hop (RFC 9110 §7.6.1, plus the legacy `keep-alive` and
    /// `proxy-connection`): never forwarded.
    HopByHop,
    Te,
    Host,
    ContentLength,
    ForwardedFor,
    ForwardedProto,
    MaxForwards,
    RequestId,
    TraceParent,
    /// `x-serin-shadow`: marks serin's copies to the canary
    /// ([`crate::shadow`]); only serin may send it.
    Shadow,
    /// `x-serin-*`: serin's own fields, never taken from an upstream.
    Serin,
    Other,
}

/// Whether serin writes or drops request field `name` by a rule of its own.
pub(crate) fn is_reserved(name: &[u8]) -> bool {
    special(name) != Special::Other
}

fn special(name: &[u8]) -> Special {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 if is("te") => Special::Te,
        4 if is("host") => Special::Host,
        7 if is("trailer") || is("upgrade") => Special::HopByHop,
        10 if is("connection") || is("keep-alive") => Special::HopByHop,
        11 if is("traceparent") => Special::TraceParent,
        12 if is("max-forwards") => Special::MaxForwards,
        12 if is("x-request-id") => Special::RequestId,
        14 if is("content-length") => Special::ContentLength,
        14 if is("x-serin-shadow") => Special::Shadow,
        15 if is("x-forwarded-for") => Special::ForwardedFor,
        16 if is("proxy-connection") => Special::HopByHop,
        17 if is("transfer-encoding") => Special::HopByHop,
        17 if is("x-forwarded-proto") => Special::ForwardedProto,
        n if n > 7 && name[..7].eq_ignore_ascii_case(b"x-serin") && name[7] == b'-' => {
            Special::Serin
        }
        _ => Special::Other,
    }
}

/// Writes the fields the upstream receives: the client's, in order, minus
/// the hop-by-hop ones, then the ones serin adds. The request line and the
/// body's framing fields are the protocol adapter's.
pub(crate) fn write_request_fields<F: Fields + ?Sized>(
    fields: &F,
    fwd: &Forwarding<'_>,
    out: &mut impl FieldSink,
) {
    let headers = &fwd.config.headers;
    let named = ConnectionNamed::of(fields);
    let replace_host = headers.rewrite_host || fwd.authority.is_some();
    let mut has_host = false;
    let mut has_forwarded_for = false;
    let mut replaced_max_forwards = false;
    let identity_header = headers
        .identity_header
        .as_ref()
        .map(|h| h.as_str().as_bytes());
    for (name, value) in fields.each() {
        // Only serin says who the client is: every copy the client sent,
        // on every connection, TLS or not, with a certificate or without.
        if identity_header.is_some_and(|h| name.eq_ignore_ascii_case(h)) {
            continue;
        }
        let kind = special(name);
        // A field the client named in `Connection` is hop-by-hop, whatever
        // it is; but `te: trailers` is named there by design, and the
        // request id stays the one the client gave.
        if kind != Special::Te && kind != Special::RequestId && named.contains(name) {
            continue;
        }
        match kind {
            Special::ForwardedFor => {
                has_forwarded_for = true;
                continue;
            }
            // A client's `x-serin-shadow` would pass a real request off as
            // a copy the upstream may skip the side effects of.
            Special::HopByHop | Special::ForwardedProto | Special::Shadow => continue,
            Special::Te => {
                // gRPC needs `te: trailers` end to end; any other TE is
                // hop-by-hop. Its sender also names it in `Connection`
                // (RFC 9110 §10.1.4).
                if value.eq_ignore_ascii_case(b"trailers") {
                    out.field(b"te", b"trailers");
                    out.field(b"connection", b"te");
                }
                continue;
            }
            Special::Host => {
                has_host = true;
                if replace_host {
                    continue;
                }
            }
            Special::TraceParent if fwd.traceparent.is_some() => continue,
            Special::MaxForwards => {
                // Decremented once, in place of every line the client sent.
                if let Some(n) = fwd.admitted.max_forwards {
                    if !replaced_max_forwards {
                        replaced_max_forwards = true;
                        let mut digits = [0u8; 10];
                        out.field(b"max-forwards", write_decimal(&mut digits, n));
                    }
                    continue;
                }
            }
            _ => {}
        }
        out.field(name, value);
    }
    match fwd.authority {
        _ if headers.rewrite_host => out.field(b"host", fwd.upstream_authority),
        Some(authority) => out.field(b"host", authority),
        None if !has_host => out.field(b"host", fwd.upstream_authority),
        None => {}
    }
    // Every line the client sent, in order, then the client: unless the
    // client named the field in `Connection`, which makes its lines hop-by-hop.
    let client_ip = fwd.conn.client_ip.as_bytes();
    if has_forwarded_for {
        out.joined_field(
            b"x-forwarded-for",
            fields
                .each()
                .filter(|(n, _)| special(n) == Special::ForwardedFor)
                .map(|(_, v)| v)
                .chain(std::iter::once(client_ip)),
        );
    } else {
        out.field(b"x-forwarded-for", client_ip);
    }
    out.field(b"x-forwarded-proto", fwd.conn.proto.as_bytes());
    if let (Some(name), Some(identity)) = (identity_header, fwd.conn.identity()) {
        out.field(name, identity);
    }
    if let Some(id) = fwd.generated_id {
        out.field(b"x-request-id", id);
    }
    if let Some(traceparent) = fwd.traceparent {
        out.field(b"traceparent", traceparent);
    }
    if headers.via {
        // The protocol serin received the request in (RFC 9110 §7.6.3).
        let via: &[u8] = match fwd.version {
            Version::HTTP_10 => b"1.0 serin",
            Version::HTTP_2 => b"2 serin",
            _ => b"1.1 serin",
        };
        out.field(b"via", via);
    }
}

/// Writes `n` in decimal into `buf`; returns the digits.
fn write_decimal(buf: &mut [u8; 10], mut n: u32) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// The field names a message's `Connection` header lists (RFC 9110
/// §7.6.1): hop-by-hop, so never forwarded. Every name counts, however many
/// there are: the first few are kept at hand, the rest are looked up in the
/// header again.
struct ConnectionNamed<'a, F: ?Sized> {
    fields: &'a F,
    first: [&'a [u8]; 4],
    len: usize,
    more: bool,
}

impl<'a, F: Fields + ?Sized> ConnectionNamed<'a, F> {
    fn of(fields: &'a F) -> Self {
        let mut named = Self {
            fields,
            first: [&[]; 4],
            len: 0,
            more: false,
        };
        for token in connection_names(fields) {
            if named.len == named.first.len() {
                named.more = true;
                break;
            }
            named.first[named.len] = token;
            named.len += 1;
        }
        named
    }

    #[inline]
    fn contains(&self, name: &[u8]) -> bool {
        if self.len == 0 {
            return false;
        }
        if self.more {
            return connection_names(self.fields).any(|t| t.eq_ignore_ascii_case(name));
        }
        self.first[..self.len]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name))
    }
}

/// The field names in `Connection`: its tokens, less the connection options
/// `close` and `keep-alive`.
fn connection_names<F: Fields + ?Sized>(fields: &F) -> impl Iterator<Item = &[u8]> {
    tokens(fields, &http::header::CONNECTION).filter(|t| {
        !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
    })
}

// === canary fallback ===

/// Whether a failure of this request on the canary may be replayed on
/// stable: a bodiless GET, HEAD or OPTIONS that asks for no upgrade, so
/// sending it twice is safe (RFC 9110 §9.2.2) and nothing of it is lost.
pub(crate) fn may_fall_back(
    config: &ProxyConfig,
    target: Target,
    method: &Method,
    bodiless: bool,
    upgrade: bool,
) -> bool {
    config.canary_fallback
        && target == Target::Canary
        && bodiless
        && !upgrade
        && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the canary's answer (a status, or a failure) is one to replay on
/// stable: whatever the judge counts as an error.
pub(crate) fn canary_failed(classifier: &Classifier, status: Option<StatusCode>) -> bool {
    status.is_none_or(|s| classifier.is_error_status(s))
}

// === response rewrites ===

/// What the response rewrite needs besides the upstream's fields.
pub(crate) struct Answering<'a> {
    pub(crate) config: &'a ProxyConfig,
    pub(crate) served_by: Target,
    /// The canary failed and stable answered instead.
    pub(crate) fell_back: bool,
    /// The request's id, sent back unless the upstream set its own.
    pub(crate) request_id: &'a [u8],
}

/// Writes the fields the client receives from an upstream's response: the
/// upstream's, in order, minus the hop-by-hop ones, a `Content-Length` that
/// `Transfer-Encoding` overrides (RFC 9112 §6.3) and any `x-serin-*`, then
/// serin's own. The status line and the framing fields are the adapter's.
pub(crate) fn write_response_fields<F: Fields + ?Sized>(
    fields: &F,
    ans: &Answering<'_>,
    out: &mut impl FieldSink,
) {
    let named = ConnectionNamed::of(fields);
    let framed_by_coding = fields.value(&TRANSFER_ENCODING).is_some();
    let mut has_id = false;
    for (name, value) in fields.each() {
        match special(name) {
            Special::HopByHop | Special::Te | Special::Serin => continue,
            Special::ContentLength if framed_by_coding => continue,
            Special::RequestId => has_id = true,
            _ if named.contains(name) => continue,
            _ => {}
        }
        out.field(name, value);
    }
    if ans.config.headers.upstream_header {
        write_upstream_fields(Some(ans.served_by), ans.fell_back, out);
    }
    if !has_id {
        out.field(b"x-request-id", ans.request_id);
    }
}

/// `x-serin-upstream` and `x-serin-fallback`.
fn write_upstream_fields(upstream: Option<Target>, fell_back: bool, out: &mut impl FieldSink) {
    if let Some(target) = upstream {
        out.field(b"x-serin-upstream", target.as_str().as_bytes());
    }
    if fell_back {
        out.field(b"x-serin-fallback", b"canary");
    }
}

// === serin's own answers ===

/// Why serin answers a request itself instead of passing on an upstream's answer.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The upstream failed (connect, reset, timeout), or the client's upload broke off.
    Upstream(Target, UpstreamError),
    /// This worker has too many requests in flight.
    Overloaded,
    /// The client's key has no token left (`[rate_limit]`); one comes in
    /// `retry_after` whole seconds.
    RateLimited { retry_after: u32 },
    /// The upstream the split picked has `max_concurrent` requests in flight.
    AtCapacity(Target),
    /// The body's length is ambiguous or invalid (RFC 9112 §6): answered,
    /// then the connection is closed, as the rest of it cannot be trusted.
    /// The text says which rule.
    Framing(&'static str),
    /// A missing, repeated or invalid `Host` (RFC 9112 §3.2). The text says which.
    Host(&'static str),
    /// CONNECT: serin is a reverse proxy, not a forward one.
    Connect,
    /// OPTIONS or TRACE with `Max-Forwards: 0`: serin is the final recipient
    /// (RFC 9110 §7.6.2).
    MaxForwards(Method),
    /// The request head is larger than `max_header_bytes` allows.
    HeadTooLarge,
    /// The request head is not valid HTTP/1.1.
    Malformed,
}

/// A response serin makes itself.
pub(crate) struct LocalAnswer {
    pub(crate) status: StatusCode,
    /// The plain-text body: what happened and what to do.
    pub(crate) text: &'static str,
    /// The connection must close after it: its framing cannot be trusted.
    pub(crate) close: bool,
    /// Whose failure it was.
    pub(crate) upstream: Option<Target>,
    /// The answer lists the methods allowed.
    pub(crate) allow: bool,
    /// `Retry-After`, in seconds.
    pub(crate) retry_after: Option<u32>,
}

/// Maps a refusal to the response the client sees: 400 for a bad request,
/// 502 for a connect failure or reset, 504 for a timeout, 503 for overload
/// (a worker's, or an upstream at its concurrency cap), 429 for a client
/// over its rate.
pub(crate) fn local_answer(refusal: &Refusal) -> LocalAnswer {
    let answer = |status, text| LocalAnswer {
        status,
        text,
        close: false,
        upstream: None,
        allow: false,
        retry_after: None,
    };
    match refusal {
        Refusal::Overloaded => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "serin: overloaded, too many requests in flight; retry later\n",
        ),
        Refusal::RateLimited { retry_after } => LocalAnswer {
            retry_after: Some(*retry_after),
            ..answer(
                StatusCode::TOO_MANY_REQUESTS,
                "serin: too many requests for this client key (rate_limit); retry after the seconds in Retry-After\n",
            )
        },
        // As Envoy's circuit breaker (`max_requests`): the upstream was not
        // asked, so the answer does not count against it.
        Refusal::AtCapacity(target) => LocalAnswer {
            retry_after: Some(1),
            upstream: Some(*target),
            ..answer(
                StatusCode::SERVICE_UNAVAILABLE,
                match target {
                    Target::Stable => "serin: the stable upstream is at its concurrency limit (stable.max_concurrent); retry later\n",
                    Target::Canary => "serin: the canary upstream is at its concurrency limit (canary.max_concurrent); retry later\n",
                },
            )
        },
        Refusal::Framing(text) => LocalAnswer {
            close: true,
            ..answer(StatusCode::BAD_REQUEST, text)
        },
        // The framing is sound: the connection can carry the next request.
        Refusal::Host(text) => answer(StatusCode::BAD_REQUEST, text),
        Refusal::Connect => LocalAnswer {
            allow: true,
            ..answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "serin: CONNECT is not forwarded; serin is a reverse proxy\n",
            )
        },
        Refusal::MaxForwards(method) if method == Method::OPTIONS => LocalAnswer {
            allow: true,
            ..answer(StatusCode::OK, "")
        },
        Refusal::MaxForwards(_) => LocalAnswer {
            allow: true,
            ..answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "serin: TRACE reached Max-Forwards 0 and serin does not answer TRACE itself\n",
            )
        },
        Refusal::HeadTooLarge => LocalAnswer {
            close: true,
            ..answer(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "serin: the request head is larger than limits.max_header_bytes\n",
            )
        },
        Refusal::Malformed => LocalAnswer {
            close: true,
            ..answer(StatusCode::BAD_REQUEST, "serin: malformed request\n")
        },
        Refusal::Upstream(target, e) => {
            let (status, text) = upstream_failure(e);
            LocalAnswer {
                upstream: Some(*target),
                close: matches!(e, UpstreamError::ClientAborted { .. }),
                ..answer(status, text)
            }
        }
    }
}

/// The status and text for an upstream that failed before answering: 504
/// for a timeout, 502 for a connect failure or reset, 400 for a client
/// whose upload broke off.
fn upstream_failure(e: &UpstreamError) -> (StatusCode, &'static str) {
    match e {
        UpstreamError::Timeout { .. } => (
            StatusCode::GATEWAY_TIMEOUT,
            "serin: upstream did not respond in time\n",
        ),
        UpstreamError::ConnectTimeout { .. } => (
            StatusCode::GATEWAY_TIMEOUT,
            "serin: upstream connect timed out\n",
        ),
        UpstreamError::Connect { .. }
        | UpstreamError::Tls { .. }
        | UpstreamError::Handshake { .. } => {
            (StatusCode::BAD_GATEWAY, "serin: upstream connect failed\n")
        }
        UpstreamError::NoEndpoint { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "serin: the upstream has no address (its host name does not resolve)\n",
        ),
        UpstreamError::ClientAborted { .. } => (
            StatusCode::BAD_REQUEST,
            "serin: the request body ended early; nothing was counted against the upstream\n",
        ),
        UpstreamError::Broken { .. } => (
            StatusCode::BAD_GATEWAY,
            "serin: upstream reset or closed the connection\n",
        ),
    }
}

/// The status [`local_answer`] gives a client whose request failed this way.
pub(crate) fn upstream_failure_status(e: &UpstreamError) -> StatusCode {
    upstream_failure(e).0
}

/// Writes the fields of a response serin makes itself, but its framing.
pub(crate) fn write_local_fields(
    answer: &LocalAnswer,
    config: &ProxyConfig,
    fell_back: bool,
    request_id: &[u8],
    out: &mut impl FieldSink,
) {
    out.field(b"content-type", b"text/plain");
    if answer.allow {
        out.field(b"allow", ALLOWED);
    }
    if let Some(seconds) = answer.retry_after {
        let mut digits = [0u8; 10];
        out.field(b"retry-after", write_decimal(&mut digits, seconds));
    }
    // An error serin answers for an upstream names it even with
    // `upstream_header` off: it says whose failure it was.
    write_upstream_fields(
        answer.upstream,
        fell_back && config.headers.upstream_header,
        out,
    );
    out.field(b"x-request-id", request_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Upstream, UpstreamProtocol};

    fn config() -> ProxyConfig {
        let up = Upstream::parse("http://up.test:81", UpstreamProtocol::Http1).unwrap();
        ProxyConfig::new("127.0.0.1:0".parse().unwrap(), up.clone(), up)
    }

    fn parsed(head: &[u8], f: impl FnOnce(&[httparse::Header<'_>])) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head).unwrap().is_complete());
        f(req.headers);
    }

    fn forwarded(head: &[u8]) -> String {
        forwarded_with_trace(head, None)
    }

    fn forwarded_with_trace(head: &[u8], traceparent: Option<&[u8]>) -> String {
        forwarded_by(&config(), None, head, traceparent)
    }

    /// What the upstream gets of `head` from a client with `identity`.
    fn forwarded_by(
        config: &ProxyConfig,
        identity: Option<&'static str>,
        head: &[u8],
        traceparent: Option<&[u8]>,
    ) -> String {
        let conn = ConnMeta {
            peer: "192.0.2.1".parse().unwrap(),
            client_ip: HeaderValue::from_static("192.0.2.1"),
            proto: HeaderValue::from_static("http"),
            identity: identity.map(HeaderValue::from_static),
        };
        let mut out = Vec::new();
        parsed(head, |fields| {
            let fwd = Forwarding {
                conn: &conn,
                version: Version::HTTP_11,
                config,
                admitted: Admitted::default(),
                authority: None,
                upstream_authority: b"up.test:81",
                generated_id: None,
                traceparent,
            };
            write_request_fields(fields, &fwd, &mut out);
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_traceparent_serin_replaces_replaces_every_line_of_the_clients() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\ntraceparent: bad\r\nTraceparent: worse\r\ntracestate: k=v\r\n\r\n";
        let ours = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = forwarded_with_trace(head, Some(ours));
        assert_eq!(out.matches("raceparent").count(), 1, "{out}");
        assert!(out
            .contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"));
        assert!(
            out.contains("tracestate: k=v\r\n"),
            "tracestate passes through: {out}"
        );
        let kept = forwarded(head);
        assert!(kept.contains("traceparent: bad\r\n") && kept.contains("Traceparent: worse\r\n"));
    }

    #[test]
    fn the_identity_header_carries_only_the_verified_identity() {
        let mut config = config();
        config.headers.identity_header = Some(HeaderName::from_static("x-client-identity"));
        let head = b"GET / HTTP/1.1\r\nHost: app\r\nX-Client-Identity: forged\r\n\
                     x-client-identity: again\r\nConnection: x-client-identity\r\n\r\n";
        let spiffe = "spiffe://cluster.local/ns/a/sa/b";
        assert_eq!(
            forwarded_by(&config, Some(spiffe), head, None),
            format!(
                "Host: app\r\nx-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: http\r\n\
                 x-client-identity: {spiffe}\r\n"
            )
        );
        let anonymous = forwarded_by(&config, None, head, None);
        assert!(
            !anonymous.to_ascii_lowercase().contains("identity"),
            "{anonymous}"
        );
        // Without the setting the header is the client's, like any other.
        let kept = forwarded_by(
            &self::config(),
            Some(spiffe),
            b"GET / HTTP/1.1\r\nHost: app\r\nx-client-identity: mine\r\n\r\n",
            None,
        );
        assert!(kept.contains("x-client-identity: mine\r\n"), "{kept}");
        assert!(!kept.contains(spiffe), "{kept}");
        assert!(is_reserved(b"X-Forwarded-For") && is_reserved(b"x-serin-upstream"));
        assert!(!is_reserved(b"x-client-identity"));
    }

    #[test]
    fn a_client_cannot_mark_its_request_a_shadow_copy() {
        let head =
            b"GET / HTTP/1.1\r\nHost: app\r\nX-Serin-Shadow: 1\r\nx-serin-canary: never\r\n\r\n";
        assert_eq!(
            forwarded(head),
            "Host: app\r\nx-serin-canary: never\r\nx-forwarded-for: 192.0.2.1\r\n\
             x-forwarded-proto: http\r\n"
        );
    }

    #[test]
    fn hosts_are_host_and_port_only() {
        for good in [
            "app",
            "app:8080",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "a-b.c_d~e",
            "",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "app other",
            "user@app",
            "app:http",
            "app/p",
            "[::1",
            "app:80:81",
            "[]",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn every_field_named_in_connection_is_dropped_however_many() {
        let mut head = b"GET / HTTP/1.1\r\nHost: app\r\nConnection: keep-alive".to_vec();
        for i in 0..20 {
            head.extend_from_slice(format!(", x-hop-{i}").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        for i in 0..20 {
            head.extend_from_slice(format!("X-Hop-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"x-kept: yes\r\n\r\n");
        assert_eq!(
            forwarded(&head),
            "Host: app\r\nx-kept: yes\r\nx-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: http\r\n"
        );
    }

    #[test]
    fn forwarded_for_lines_are_joined_in_order_unless_named_in_connection() {
        let joined = forwarded(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: a, b\r\nHost: app\r\nx-forwarded-for: c\r\n\r\n",
        );
        assert_eq!(
            joined,
            "Host: app\r\nx-forwarded-for: a, b, c, 192.0.2.1\r\nx-forwarded-proto: http\r\n"
        );
        let named = forwarded(
            b"GET / HTTP/1.1\r\nHost: app\r\nConnection: x-forwarded-for\r\nX-Forwarded-For: a\r\n\r\n",
        );
        assert!(named.contains("x-forwarded-for: 192.0.2.1\r\n"), "{named}");
    }

    #[test]
    fn responses_lose_hop_by_hop_fields_serins_own_and_a_length_beside_a_coding() {
        let config = config();
        let mut out = Vec::new();
        let head = b"GET / HTTP/1.1\r\nConnection: x-a\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\
                     Content-Length: 3\r\nx-serin-fallback: canary\r\nX-Kept: 2\r\n\r\n";
        parsed(head, |fields| {
            let ans = Answering {
                config: &config,
                served_by: Target::Stable,
                fell_back: false,
                request_id: b"id-1",
            };
            write_response_fields(fields, &ans, &mut out);
        });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Kept: 2\r\nx-serin-upstream: stable\r\nx-request-id: id-1\r\n"
        );
    }
}
