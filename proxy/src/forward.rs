//! Forwarding to an upstream over pooled keep-alive connections.
//!
//! Each worker owns one [`Pool`] per upstream. Pools are single-threaded
//! (`Rc`/`RefCell`, no lock) because a worker is one thread running one
//! current-thread runtime. HTTP/1.1 goes through serin's own client
//! ([`crate::h1`]); a connection goes back to its pool when the response body
//! has been read to the end. An h2c upstream connection (hyper) is shared by
//! all requests of the worker.
//!
//! Connections are opened lazily, with `TCP_NODELAY`, under a connect timeout,
//! and the idle list is bounded. A pooled connection that the upstream closed
//! while it sat idle is noticed at checkout when the close has arrived, and
//! otherwise by the request failing before any response: a bodiless
//! idempotent request is then replayed once on a new connection.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::h1::{self, ExchangeError, Http1Error};
use crate::LocalExec;

/// Which HTTP version serin speaks to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive (the default; what most apps speak).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): needed for gRPC upstreams.
    Http2,
}

/// Why an upstream URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Not a parseable URI.
    #[error("`{url}` is not a valid URL: {reason}")]
    Invalid { url: String, reason: String },
    /// Only plain http is proxied to.
    #[error("`{url}` must start with http:// (serin speaks plain HTTP or h2c to upstreams; terminate TLS in serin's listener instead)")]
    Scheme { url: String },
    /// A path or query would be silently ignored.
    #[error("`{url}` has a path; write only scheme, host and port, e.g. http://127.0.0.1:8080")]
    Path { url: String },
}

/// Where an upstream is and how to talk to it. Built once at start-up.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The URL as the user wrote it (for status output).
    pub url: String,
    host: String,
    port: u16,
    /// `host:port`, used as the `Host` header when `rewrite_host` is on.
    pub(crate) authority: HeaderValue,
    /// The protocol spoken to it.
    pub protocol: UpstreamProtocol,
}

impl Upstream {
    /// Parses `http://host[:port]` (port 80 by default).
    pub fn parse(url: &str, protocol: UpstreamProtocol) -> Result<Self, UpstreamUrlError> {
        let uri: Uri =
            url.parse()
                .map_err(|e: http::uri::InvalidUri| UpstreamUrlError::Invalid {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
        if uri.scheme_str() != Some("http") {
            return Err(UpstreamUrlError::Scheme {
                url: url.to_string(),
            });
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(UpstreamUrlError::Path {
                url: url.to_string(),
            });
        }
        let authority = uri.authority().ok_or_else(|| UpstreamUrlError::Invalid {
            url: url.to_string(),
            reason: "no host".to_string(),
        })?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            url: url.to_string(),
            authority: HeaderValue::from_str(authority.as_str()).map_err(|e| {
                UpstreamUrlError::Invalid {
                    url: url.to_string(),
                    reason: e.to_string(),
                }
            })?,
            host,
            port,
            protocol,
        })
    }
}

/// Timeouts and limits of the upstream side.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Time allowed to open a TCP connection (default 3 s).
    pub connect_timeout: Duration,
    /// A pooled connection unused for longer is closed instead of reused (default 60 s).
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream per worker (default 256).
    pub max_idle: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            max_idle: 256,
        }
    }
}

/// What went wrong talking to an upstream. [`crate::rescue`] maps it to a status.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No TCP connection could be made (refused, unreachable, DNS).
    #[error("connect to {url} failed: {source}")]
    Connect { url: String, source: io::Error },
    /// The TCP connect did not finish in time.
    #[error("connect to {url} timed out after {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    /// The HTTP handshake failed.
    #[error("handshake with {url} failed: {source}")]
    Handshake { url: String, source: hyper::Error },
    /// The connection broke before a response arrived (reset, closed, bad response).
    #[error("{url} failed before responding: {source}")]
    Broken { url: String, source: WireError },
    /// The client's request body broke off while it was being forwarded:
    /// the client's fault, never counted against the upstream.
    #[error("the client's request body broke off: {source}")]
    ClientAborted { source: hyper::Error },
    /// No response headers within the response timeout.
    #[error("{url} did not respond within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

// === impl RequestBody ===

/// The body sent upstream: the client's, streamed, or empty (for a replay).
pub enum RequestBody {
    /// The client's body, complete when the request is sent (none, or
    /// already received).
    Client(Incoming),
    /// The client's body, still arriving: streamed through, and its end time
    /// noted so that the response timeout can count from it.
    Upload {
        /// The body.
        body: Incoming,
        /// Set when the last frame has gone by.
        ended: UploadEnd,
    },
    /// No body.
    Empty,
}

/// When a streamed request body ended: written by the body, read by the
/// response timeout. Only uploads allocate one.
pub type UploadEnd = Rc<Cell<Option<Instant>>>;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Upload { body, ended } => {
                let frame = Pin::new(&mut *body).poll_frame(cx);
                if matches!(frame, Poll::Ready(None)) || body.is_end_stream() {
                    ended.set(Some(Instant::now()));
                }
                frame
            }
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(b) | RequestBody::Upload { body: b, .. } => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(b) | RequestBody::Upload { body: b, .. } => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// === impl UpstreamBody ===

/// A response body as it comes from an upstream.
pub enum UpstreamBody {
    /// From serin's HTTP/1.1 client: read straight off the connection.
    Http1(h1::ResponseBody),
    /// From a shared h2c connection (hyper).
    Http2(Incoming),
}

/// How an exchange with an upstream failed on the wire: before the response
/// (`UpstreamError::Broken`) or while its body streamed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// HTTP/1.1 upstream.
    #[error(transparent)]
    Http1(#[from] Http1Error),
    /// h2c upstream.
    #[error(transparent)]
    Http2(#[from] hyper::Error),
}

impl UpstreamBody {
    /// After a 101, the upgraded upstream connection (HTTP/1.1 only).
    pub(crate) fn take_tunnel(&mut self) -> Option<h1::Tunnel> {
        match self {
            UpstreamBody::Http1(b) => b.take_tunnel(),
            UpstreamBody::Http2(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(WireError::from),
            UpstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(WireError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

// === impl Pool ===

struct Idle {
    conn: h1::Connection,
    since: Instant,
}

/// One worker's connections to one upstream.
pub struct Pool {
    upstream: Upstream,
    settings: PoolSettings,
    idle: RefCell<Vec<Idle>>,
    /// When the latest request through this pool started: the clock for
    /// idle bookkeeping, so it reads no clock of its own. It runs behind by
    /// at most one request, which only makes idle connections expire sooner.
    recent: Cell<Instant>,
    shared_h2: RefCell<Option<http2::SendRequest<RequestBody>>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.upstream.url)
            .field("idle", &self.idle.borrow().len())
            .finish()
    }
}

impl Pool {
    /// An empty pool for `upstream`.
    pub fn new(upstream: Upstream, settings: PoolSettings) -> Self {
        Self {
            upstream,
            settings,
            idle: RefCell::new(Vec::new()),
            recent: Cell::new(Instant::now()),
            shared_h2: RefCell::new(None),
        }
    }

    /// The upstream this pool connects to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Sends `req` and waits for the response headers. An HTTP/1.1
    /// connection goes back to the pool when the response body ends.
    pub(crate) async fn send(
        self: &Rc<Self>,
        req: Request<RequestBody>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match self.upstream.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req, now).await,
            // Boxed: h2c's future is large and rare; unboxed it would grow
            // every request's future, which is moved into place per request.
            UpstreamProtocol::Http2 => Box::pin(self.send_h2(req)).await,
        }
    }

    async fn send_h1(
        self: &Rc<Self>,
        req: Request<RequestBody>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (head, body) = req.into_parts();
        let replayable = body.is_end_stream() && head.method.is_idempotent();
        let mut body = Some(body);
        let head = &head;
        let resp = self
            .exchange_h1(replayable, now, |conn| {
                conn.exchange(head, body.take().unwrap_or(RequestBody::Empty), self)
            })
            .await?;
        Ok(resp.map(UpstreamBody::Http1))
    }

    /// Sends a bodiless request whose head `encode` writes, for serin's own
    /// HTTP/1.1 server path; the response head is read in place. The
    /// upstream must speak HTTP/1.1.
    pub(crate) async fn send_raw(
        self: &Rc<Self>,
        encode: impl Fn(&mut Vec<u8>),
        method: &Method,
        now: Instant,
    ) -> Result<h1::RawResponse, UpstreamError> {
        let is_head = method == Method::HEAD;
        self.exchange_h1(method.is_idempotent(), now, |conn| {
            conn.exchange_raw(&encode, is_head, self)
        })
        .await
    }

    /// Runs one exchange on a pooled HTTP/1.1 connection. A reused
    /// connection the upstream closed while it sat idle fails before any
    /// response arrives; a `replayable` request (bodiless, with an idempotent
    /// method: RFC 9110 §9.2.2) is then sent once more on a new connection.
    async fn exchange_h1<T, F>(
        &self,
        replayable: bool,
        now: Instant,
        mut exchange: impl FnMut(h1::Connection) -> F,
    ) -> Result<T, UpstreamError>
    where
        F: std::future::Future<Output = Result<T, ExchangeError>>,
    {
        self.recent.set(now);
        for attempt in 0..2 {
            let conn = self.checkout_h1(attempt > 0).await?;
            match exchange(conn).await {
                Ok(done) => return Ok(done),
                Err(ExchangeError::Stale(_)) if attempt == 0 && replayable => continue,
                Err(ExchangeError::Stale(e) | ExchangeError::Upstream(e)) => {
                    return Err(UpstreamError::Broken {
                        url: self.upstream.url.clone(),
                        source: e.into(),
                    })
                }
                Err(ExchangeError::Client(source)) => {
                    return Err(UpstreamError::ClientAborted { source })
                }
            }
        }
        unreachable!("the second attempt always returns")
    }

    async fn send_h2(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // One retry: only when the connection refused the request before
        // writing any of it (hyper hands the request back in that case).
        for attempt in 0..2 {
            let fresh = attempt > 0;
            let mut sender = self.checkout_h2(fresh).await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::Http2)),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => {
                        self.shared_h2.borrow_mut().take();
                        req = back
                    }
                    _ => return Err(self.broken_h2(e.into_error())),
                },
            }
        }
        unreachable!("the second attempt always returns")
    }

    fn broken_h2(&self, source: hyper::Error) -> UpstreamError {
        // A failure of the request body we were streaming is the client's
        // doing (it hung up mid-upload), not the upstream's.
        if source.is_user() || source.is_body_write_aborted() {
            return UpstreamError::ClientAborted { source };
        }
        UpstreamError::Broken {
            url: self.upstream.url.clone(),
            source: source.into(),
        }
    }

    async fn checkout_h2(
        &self,
        fresh: bool,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if !fresh {
            let shared = self.shared_h2.borrow().clone();
            if let Some(sender) = shared.filter(|s| !s.is_closed()) {
                return Ok(sender);
            }
        }
        let sender = self.connect_h2().await?;
        *self.shared_h2.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }

    async fn checkout_h1(&self, fresh: bool) -> Result<h1::Connection, UpstreamError> {
        if !fresh {
            let now = self.recent.get();
            loop {
                // The borrow ends with this statement: never held across an await.
                let Some(idle) = self.idle.borrow_mut().pop() else {
                    break;
                };
                let expired =
                    now.saturating_duration_since(idle.since) >= self.settings.idle_timeout;
                if expired || idle.conn.closed_while_idle().await {
                    continue;
                }
                return Ok(idle.conn);
            }
        }
        let io = self.connect_tcp().await?;
        Ok(h1::Connection::new(io))
    }

    /// Returns a finished HTTP/1.1 connection to the idle list.
    pub(crate) fn checkin(&self, conn: h1::Connection) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                conn,
                since: self.recent.get(),
            });
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let url = &self.upstream.url;
        let connect = TcpStream::connect((self.upstream.host.as_str(), self.upstream.port));
        let stream = match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    url: url.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    url: url.clone(),
                    timeout: self.settings.connect_timeout,
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = TokioIo::new(self.connect_tcp().await?);
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                url: self.upstream.url.clone(),
                source,
            })?;
        // The connection's I/O runs as its own task on this worker.
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_validated() {
        let u = Upstream::parse("http://127.0.0.1:8080", UpstreamProtocol::Http1).unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8080));
        assert_eq!(u.authority, "127.0.0.1:8080");
        let u = Upstream::parse("http://app.ns.svc/", UpstreamProtocol::Http1).unwrap();
        assert_eq!((u.host.as_str(), u.port), ("app.ns.svc", 80));
        let u = Upstream::parse("http://[::1]:9000", UpstreamProtocol::Http1).unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert!(matches!(
            Upstream::parse("https://x:1", UpstreamProtocol::Http1),
            Err(UpstreamUrlError::Scheme { .. })
        ));
        assert!(matches!(
            Upstream::parse("http://x:1/api", UpstreamProtocol::Http1),
            Err(UpstreamUrlError::Path { .. })
        ));
        assert!(Upstream::parse("not a url", UpstreamProtocol::Http1).is_err());
    }
}
