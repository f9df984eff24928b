//! Workers, listeners and the per-request proxy logic.
//!
//! Serin runs N workers (default 1). Each is one OS thread with a
//! current-thread tokio runtime, its own `SO_REUSEPORT` listener, its own
//! upstream pools and its own stats: the shape of nginx workers and of
//! pingora's no-steal runtime. Nothing on the request path is shared between
//! workers except the route table (`ArcSwap`, one load per request) and the
//! read-only configuration.
//!
//! A connection is served as HTTP/1.1 or HTTP/2 (prior knowledge, detected from
//! the preface; or chosen by ALPN under TLS). Each request:
//! split → rewrite headers → forward over the pool → classify → record →
//! stream the response back. Failures are turned into responses by
//! [`rescue`], the only place that picks an error status.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, HOST, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE, VIA,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::body::{PendingGrpc, ProxyBody};
use crate::classify::{Classifier, Outcome};
use crate::fields::Fields;
use crate::forward::{Pool, RequestBody, UploadEnd, UpstreamBody, UpstreamError, UpstreamProtocol};
use crate::h1::Tunnel;
use crate::split::{FastRng, LocalRoutes, Target};
use crate::stats::WorkerStats;
use crate::{LocalExec, ProxyConfig, Routes};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_SERIN_UPSTREAM: HeaderName = HeaderName::from_static("x-serin-upstream");
static X_SERIN_FALLBACK: HeaderName = HeaderName::from_static("x-serin-fallback");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What every worker shares (read-only, or atomic).
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) routes: Routes,
    pub(crate) classifier: Arc<Classifier>,
    pub(crate) tls: Option<TlsAcceptor>,
}

/// One worker's request-path state. Lives on the worker's thread only.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pools: [Rc<Pool>; 2],
    stats: Arc<WorkerStats>,
    routes: LocalRoutes,
    rng: FastRng,
    pub(crate) inflight: Cell<usize>,
    /// Shutdown has begun: connections close after their current response.
    pub(crate) draining: Cell<bool>,
    /// Both upstreams speak HTTP/1.1, so plain HTTP/1.1 clients are served
    /// by serin's own loop ([`crate::h1_server`]) until a request needs hyper.
    own_h1: bool,
    request_seq: Cell<u64>,
    request_prefix: u64,
    /// Request ids are cut from this block: one allocation per 256 ids
    /// instead of two per request (a copy, then its promotion when cloned).
    request_ids: std::cell::RefCell<bytes::BytesMut>,
}

/// Per-connection facts, computed once per connection.
pub(crate) struct ConnMeta {
    pub(crate) client_ip: HeaderValue,
    pub(crate) proto: HeaderValue,
}

/// Runs one worker until `shutdown` fires and its connections have drained.
pub(crate) fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::from_std(listener)?;
        let rng = FastRng::from_entropy(index as u64);
        let request_prefix = rng.next_u64();
        let pool_settings = shared.config.pool.clone();
        let own_h1 = shared.config.stable.protocol == UpstreamProtocol::Http1
            && shared.config.canary.protocol == UpstreamProtocol::Http1;
        let worker = Rc::new(Worker {
            pools: [
                Rc::new(Pool::new(
                    shared.config.stable.clone(),
                    pool_settings.clone(),
                )),
                Rc::new(Pool::new(shared.config.canary.clone(), pool_settings)),
            ],
            routes: shared.routes.local(),
            shared,
            stats,
            rng,
            inflight: Cell::new(0),
            draining: Cell::new(false),
            own_h1,
            request_seq: Cell::new(0),
            request_prefix,
            request_ids: Default::default(),
        });
        accept_loop(worker, listener, shutdown).await;
        Ok(())
    })
}

async fn accept_loop(
    worker: Rc<Worker>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Rc::new(http_builder(&worker.shared.config));
    let open = Rc::new(OpenConnections::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::task::spawn_local(serve_connection(
                        worker.clone(),
                        builder.clone(),
                        OpenConnection::new(open.clone()),
                        shutdown.clone(),
                        stream,
                        peer,
                    ));
                }
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed; raise the open-file limit (ulimit -n) if this repeats");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    worker.draining.set(true);
    drop(listener);
    let drain = worker.shared.config.drain_timeout;
    tokio::select! {
        _ = open.all_closed() => tracing::debug!("worker drained"),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout: closing connections with requests still in flight");
        }
    }
}

/// Counts a worker's open client connections, so shutdown can wait for them.
#[derive(Default)]
struct OpenConnections {
    count: Cell<usize>,
    none_left: tokio::sync::Notify,
}

impl OpenConnections {
    async fn all_closed(&self) {
        while self.count.get() > 0 {
            self.none_left.notified().await;
        }
    }
}

/// One open connection; dropping it updates the count.
struct OpenConnection(Rc<OpenConnections>);

impl OpenConnection {
    fn new(open: Rc<OpenConnections>) -> Self {
        open.count.set(open.count.get() + 1);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let open = &self.0;
        open.count.set(open.count.get() - 1);
        if open.count.get() == 0 {
            open.none_left.notify_waiters();
        }
    }
}

/// Drives a connection; once shutdown starts, asks it to finish its
/// in-flight requests and close (HTTP/1: after the current response;
/// HTTP/2: GOAWAY), then waits for it.
async fn until_drained<C, T>(
    conn: C,
    mut shutdown: watch::Receiver<bool>,
    graceful: impl FnOnce(Pin<&mut C>),
) -> T
where
    C: std::future::Future<Output = T>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        _ = shutdown.wait_for(|&stop| stop) => graceful(conn.as_mut()),
    }
    conn.await
}

fn http_builder(config: &ProxyConfig) -> auto::Builder<LocalExec> {
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true)
        // Flatten each response into one buffer and one write(2): measured
        // ~3% less CPU per request than vectored writes for typical small
        // responses (bench/REPORT.md). Large bodies still stream in chunks.
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32)
        .max_concurrent_streams(1024);
    builder
}

async fn serve_connection(
    worker: Rc<Worker>,
    builder: Rc<auto::Builder<LocalExec>>,
    _open: OpenConnection,
    shutdown: watch::Receiver<bool>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let tls = worker.shared.tls.clone();
    let meta = Rc::new(ConnMeta {
        client_ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        proto: HeaderValue::from_static(if tls.is_some() { "https" } else { "http" }),
    });
    let mut shutdown = shutdown;
    let mut stream = stream;
    let read_so_far = if tls.is_none() && worker.own_h1 {
        match crate::h1_server::serve(&worker, &meta, &mut stream, &mut shutdown).await {
            Some(read) => read.freeze(),
            None => return,
        }
    } else {
        bytes::Bytes::new()
    };
    let service = hyper::service::service_fn(move |req| proxy(worker.clone(), meta.clone(), req));
    let result = match tls {
        // Boxed: hyper's connection state is large, and most connections
        // never leave serin's own loop.
        None => {
            Box::pin(async move {
                let io = TokioIo::new(Rewind::new(read_so_far, stream));
                let conn = builder.serve_connection_with_upgrades(io, service);
                until_drained(conn, shutdown, |c| c.graceful_shutdown()).await
            })
            .await
        }
        // Boxed: a TLS connection's state is twice a plain one's, and an
        // unboxed branch would make every plain connection's task that large.
        Some(acceptor) => {
            Box::pin(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                let stream = match handshake.await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return Ok(());
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return Ok(());
                    }
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                until_drained(conn, shutdown, |c| c.graceful_shutdown()).await
            })
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

// === the request path ===

/// Stands for a bodiless request while its upstream works on it. Dropped
/// before [`Awaiting::answered`], which happens when the request's future is
/// dropped because its client left (hyper's path) or when serin's own loop
/// sees the client go, it records the request as abandoned (see
/// [`crate::stats::UpstreamStats::record_abandoned`]): the judge sees a canary
/// slower than its clients' patience instead of nothing.
pub(crate) struct Awaiting<'a> {
    worker: &'a Worker,
    target: Target,
    start: Instant,
}

impl Awaiting<'_> {
    /// The upstream answered or failed: nothing more to record here.
    pub(crate) fn answered(self) {
        std::mem::forget(self);
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        self.worker
            .stats
            .upstream(self.target)
            .record_abandoned(now, now.saturating_duration_since(self.start));
    }
}

/// Decrements the worker's in-flight count when the request is done.
pub(crate) struct InflightGuard(pub(crate) Rc<Worker>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get() - 1);
    }
}

/// Why serin answered a request itself.
#[derive(Debug)]
pub enum ProxyError {
    /// The upstream failed (connect, reset, timeout).
    Upstream(Target, UpstreamError),
    /// This worker has too many requests in flight.
    Overloaded,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    MissingHost,
}

/// Maps a proxy error to the response the client sees: 502 for connect
/// failure or reset, 504 for a timeout, 503 for overload. The only place that
/// chooses these statuses.
pub fn rescue(error: &ProxyError) -> Response<ProxyBody> {
    let (status, text) = rescue_status(error);
    let mut resp = Response::new(ProxyBody::fixed(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if let ProxyError::Upstream(target, _) = error {
        resp.headers_mut()
            .insert(X_SERIN_UPSTREAM.clone(), upstream_value(*target));
    }
    resp
}

/// The status and text of the response for `error`.
pub(crate) fn rescue_status(error: &ProxyError) -> (StatusCode, &'static str) {
    match error {
        ProxyError::MissingHost => (
            StatusCode::BAD_REQUEST,
            "serin: an HTTP/1.1 request needs a Host header\n",
        ),
        ProxyError::Overloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "serin: overloaded, too many requests in flight; retry later\n",
        ),
        ProxyError::Upstream(_, e) => match e {
            UpstreamError::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "serin: upstream did not respond in time\n",
            ),
            UpstreamError::ConnectTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "serin: upstream connect timed out\n",
            ),
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. } => {
                (StatusCode::BAD_GATEWAY, "serin: upstream connect failed\n")
            }
            UpstreamError::ClientAborted { .. } => (
                StatusCode::BAD_REQUEST,
                "serin: the request body ended early; nothing was counted against the upstream\n",
            ),
            UpstreamError::Broken { .. } => (
                StatusCode::BAD_GATEWAY,
                "serin: upstream reset or closed the connection\n",
            ),
        },
    }
}

fn upstream_value(target: Target) -> HeaderValue {
    HeaderValue::from_static(target.as_str())
}

async fn proxy(
    worker: Rc<Worker>,
    meta: Rc<ConnMeta>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let config = &worker.shared.config;
    if worker.inflight.get() >= config.max_inflight {
        return Ok(rescue(&ProxyError::Overloaded));
    }
    if req.version() == Version::HTTP_11
        && req.uri().authority().is_none()
        && !req.headers().contains_key(HOST)
    {
        return Ok(rescue(&ProxyError::MissingHost));
    }
    worker.inflight.set(worker.inflight.get() + 1);
    let _inflight = InflightGuard(worker.clone());

    let target = worker.decide(req.headers());
    let (mut parts, body) = req.into_parts();
    // HTTP/1.1 upgrades (WebSocket and the like) pass through: the handshake
    // is forwarded with its `Upgrade` header and, after a 101, the two
    // connections are spliced together. Only the handshake is judged.
    let upgrade = requested_upgrade(&parts);
    let mut client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<OnUpgrade>());
    let request_id = match parts.headers.get(&X_REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = worker.next_request_id();
            parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let client_version = parts.version;
    prepare_request(&mut parts.headers, &meta, config);
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
    }

    // A bodiless idempotent request to the canary can be replayed on stable
    // if the canary fails it: the client never sees the canary's error.
    let replay = (config.canary_fallback
        && client_upgrade.is_none()
        && target == Target::Canary
        && body.is_end_stream()
        && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS))
    .then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });

    let bodiless = body.is_end_stream();
    let (body, upload) = if bodiless {
        (RequestBody::Client(body), None)
    } else {
        let ended = UploadEnd::default();
        let upload = Some(ended.clone());
        (RequestBody::Upload { body, ended }, upload)
    };
    let req = Request::from_parts(parts, body);
    // Only a bodiless request's wait is the upstream's alone.
    let awaiting = bodiless.then(|| worker.awaiting(target, start));
    let mut result = worker.forward(target, req, start, upload.as_ref()).await;
    if let Some(awaiting) = awaiting {
        awaiting.answered();
    }
    let mut served_by = target;
    let mut fell_back = false;

    if let Some((method, uri, headers)) = replay {
        let canary_failed = match &result {
            Ok(resp) => worker.shared.classifier.is_error_status(resp.status()),
            Err(_) => true,
        };
        if canary_failed {
            worker.record(Target::Canary, start, true);
            let mut req = Request::new(RequestBody::Empty);
            *req.method_mut() = method;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            let awaiting = worker.awaiting(Target::Stable, start);
            // Boxed: a rare path, kept out of every request's future.
            result = Box::pin(worker.forward(Target::Stable, req, Instant::now(), None)).await;
            awaiting.answered();
            served_by = Target::Stable;
            fell_back = true;
        }
    }

    let mut resp = match result {
        Ok(mut resp) => match client_upgrade.take() {
            Some(client) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The upstream connection now belongs to the tunnel, not the pool.
                let protocol = resp.headers().get(UPGRADE).cloned();
                if let Some(tunnel) = resp.body_mut().take_tunnel() {
                    tokio::task::spawn_local(splice(client, tunnel));
                }
                let mut resp = worker.respond(served_by, start, resp);
                if let Some(protocol) = protocol {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    resp.headers_mut().insert(UPGRADE, protocol);
                }
                resp
            }
            _ => worker.respond(served_by, start, resp),
        },
        Err(e) => {
            if !matches!(e, UpstreamError::ClientAborted { .. }) {
                worker.record(served_by, start, true);
            }
            tracing::debug!(upstream = %served_by, error = %e, "upstream request failed");
            rescue(&ProxyError::Upstream(served_by, e))
        }
    };
    *resp.version_mut() = client_version;
    let headers = resp.headers_mut();
    if config.headers.upstream_header {
        headers.insert(X_SERIN_UPSTREAM.clone(), upstream_value(served_by));
        if fell_back {
            headers.insert(X_SERIN_FALLBACK.clone(), upstream_value(Target::Canary));
        }
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id);
    }
    Ok(resp)
}

impl Worker {
    /// The split decision for a request with these header fields.
    #[inline]
    pub(crate) fn decide<H: Fields + ?Sized>(&self, headers: &H) -> Target {
        let rules = &self.shared.config.split;
        self.routes
            .with(|table| rules.decide(table, headers, &self.rng).0)
    }

    pub(crate) fn pool(&self, target: Target) -> &Rc<Pool> {
        &self.pools[target.index()]
    }

    /// Sends a request to `target` under the response timeout (counted from
    /// `sent_at`, or from the end of `upload` when the body was still
    /// arriving), after the upstream-specific rewrites (version, URI form, Host).
    async fn forward(
        &self,
        target: Target,
        mut req: Request<RequestBody>,
        sent_at: Instant,
        upload: Option<&UploadEnd>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let pool = self.pool(target);
        let upstream = pool.upstream();
        let config = &self.shared.config;
        if config.headers.rewrite_host || !req.headers().contains_key(HOST) {
            let host = match req.uri().authority() {
                Some(a) if !config.headers.rewrite_host => {
                    HeaderValue::from_str(a.as_str()).unwrap_or_else(|_| upstream.authority.clone())
                }
                _ => upstream.authority.clone(),
            };
            req.headers_mut().insert(HOST, host);
        }
        match upstream.protocol {
            UpstreamProtocol::Http1 => {
                if req.version() == Version::HTTP_2 {
                    join_cookie_crumbs(req.headers_mut());
                }
                *req.version_mut() = Version::HTTP_11;
                if req.uri().authority().is_some() {
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    *req.uri_mut() = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
                }
            }
            UpstreamProtocol::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                if req.uri().authority().is_none() {
                    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    let absolute = format!("http://{}{}", host.unwrap_or("localhost"), path);
                    if let Ok(uri) = Uri::try_from(absolute) {
                        *req.uri_mut() = uri;
                    }
                }
                // HTTP/2 carries the authority in the URI, not in Host.
                req.headers_mut().remove(HOST);
            }
        }
        // The response timeout counts from the end of the request, as Envoy's
        // route timeout does: a slow upload is not the upstream's fault. For
        // a bodiless request that is `sent_at` (no extra clock read).
        let timeout = config.response_timeout;
        let mut deadline = sent_at + timeout;
        let mut send = std::pin::pin!(pool.send(req, sent_at));
        loop {
            match tokio::time::timeout_at(deadline, send.as_mut()).await {
                Ok(result) => return result,
                Err(_) => match upload.map(|u| u.get()) {
                    // Still uploading: look again one timeout from now.
                    Some(None) => deadline = Instant::now() + timeout,
                    Some(Some(end)) if end + timeout > deadline => deadline = end + timeout,
                    _ => {
                        return Err(UpstreamError::Timeout {
                            url: upstream.url.clone(),
                            timeout,
                        })
                    }
                },
            }
        }
    }

    /// Classifies and records an upstream response, then prepares it for the client.
    fn respond(
        &self,
        target: Target,
        start: Instant,
        resp: Response<UpstreamBody>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        let outcome = self
            .shared
            .classifier
            .classify(parts.status, &parts.headers);
        let grpc = match outcome {
            Outcome::AwaitTrailers => Some(PendingGrpc {
                stats: self.stats.clone(),
                classifier: self.shared.classifier.clone(),
                target,
                latency: start.elapsed(),
            }),
            Outcome::Success | Outcome::Error => {
                self.record(target, start, outcome == Outcome::Error);
                None
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, ProxyBody::upstream(body, grpc))
    }

    /// Records an outcome for `target` with the latency since `start`.
    #[inline]
    pub(crate) fn record(&self, target: Target, start: Instant, error: bool) {
        let now = Instant::now();
        self.stats
            .upstream(target)
            .record(now, now.saturating_duration_since(start), error);
    }

    /// A request to `target` that started at `start` is now waiting on it.
    pub(crate) fn awaiting(&self, target: Target, start: Instant) -> Awaiting<'_> {
        Awaiting {
            worker: self,
            target,
            start,
        }
    }

    /// Records an outcome whose latency was measured earlier (gRPC trailers).
    pub(crate) fn record_latency(&self, target: Target, latency: Duration, error: bool) {
        self.stats
            .upstream(target)
            .record(Instant::now(), latency, error);
    }

    /// A request id unique across workers and restarts in practice:
    /// a random per-worker prefix and a counter, 24 hex digits.
    pub(crate) fn next_request_id_bytes(&self) -> [u8; 24] {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        let mut id = [0u8; 24];
        write_hex(&mut id[..16], self.request_prefix);
        write_hex(&mut id[16..], seq);
        id
    }

    /// [`Self::next_request_id_bytes`] as a header value.
    fn next_request_id(&self) -> HeaderValue {
        const ID_LEN: usize = 24;
        let buf = self.next_request_id_bytes();
        let mut ids = self.request_ids.borrow_mut();
        if ids.capacity() < ID_LEN {
            *ids = bytes::BytesMut::with_capacity(ID_LEN * 256);
        }
        ids.extend_from_slice(&buf);
        HeaderValue::from_maybe_shared(ids.split().freeze())
            .expect("hex digits are a valid header value")
    }
}

/// HTTP/2 clients may send each cookie as its own field; HTTP/1.1 needs them
/// in one `Cookie` header, joined with "; " (RFC 9113 §8.2.3).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, crumb) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it asks.
fn requested_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asks = parts.headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    asks.then(|| parts.headers.get(UPGRADE).cloned()).flatten()
}

/// Copies bytes both ways between an upgraded client connection and an
/// upgraded upstream connection until either side closes.
async fn splice(client: OnUpgrade, mut upstream: Tunnel) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    // What the upstream sent right after its 101 came in with the head.
    if !upstream.early.is_empty() {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &upstream.early).await {
            tracing::debug!(error = %e, "upgraded connection ended");
            return;
        }
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream.io).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

fn write_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// The client-side rewrites of a request: hop-by-hop headers out,
/// `X-Forwarded-*` and optional `Via` in.
fn prepare_request(headers: &mut HeaderMap, meta: &ConnMeta, config: &ProxyConfig) {
    // gRPC needs `te: trailers` end to end; any other TE is hop-by-hop.
    let keep_te = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    if keep_te {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), meta.client_ip.clone());
        }
        Some(existing) => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + meta.client_ip.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(meta.client_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), meta.proto.clone());
    if config.headers.via {
        headers.append(VIA, HeaderValue::from_static("1.1 serin"));
    }
}

/// Removes hop-by-hop headers: the fixed list of RFC 9110 §7.6.1 and any
/// header named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names (no
    // hashing) decides whether there is anything to do.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too. The value is copied
    // to the stack so the map can be changed while its tokens are read.
    let mut named = [0u8; 256];
    let mut len = 0;
    for value in headers.get_all(CONNECTION) {
        let bytes = value.as_bytes();
        if len + bytes.len() + 1 > named.len() {
            break;
        }
        named[len..len + bytes.len()].copy_from_slice(bytes);
        named[len + bytes.len()] = b',';
        len += bytes.len() + 1;
    }
    for token in named[..len].split(|&b| b == b',') {
        let token = token.trim_ascii();
        // `close` and `keep-alive` are connection options, not header names.
        if !token.is_empty()
            && !token.eq_ignore_ascii_case(b"close")
            && !token.eq_ignore_ascii_case(b"keep-alive")
        {
            if let Ok(name) = std::str::from_utf8(token) {
                headers.remove(name);
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy
/// `keep-alive` and `proxy-connection`).
static HOP_BY_HOP: [&HeaderName; 7] = [
    &CONNECTION,
    &TRANSFER_ENCODING,
    &TE,
    &TRAILER,
    &UPGRADE,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
];

#[inline]
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// A client socket with the bytes serin's own loop already read put back in
/// front, for hyper to read first.
struct Rewind {
    read_so_far: bytes::Bytes,
    io: TcpStream,
}

impl Rewind {
    fn new(read_so_far: bytes::Bytes, io: TcpStream) -> Self {
        Self { read_so_far, io }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.read_so_far.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read_so_far.len().min(buf.remaining());
        buf.put_slice(&self.read_so_far.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn request_ids_are_hex_and_distinct() {
        let mut buf = [0u8; 8];
        write_hex(&mut buf, 0xdead_beef);
        assert_eq!(&buf, b"deadbeef");
    }
}
