//! Forwarding to an upstream over pooled keep-alive connections.
//!
//! Each worker owns one [`Pool`] per upstream. Pools are single-threaded
//! (`Rc`/`RefCell`, no lock) because a worker is one thread running one
//! current-thread runtime. An HTTP/1.1 connection goes back to its pool when
//! the response body has been read to the end (see [`crate::body`]); an
//! HTTP/2 upstream connection is shared by all requests of the worker.
//!
//! Connections are opened lazily, with `TCP_NODELAY`, under a connect timeout,
//! and the idle list is bounded. A request that a pooled connection could not
//! even start (the upstream closed it while idle) is retried once on a fresh
//! connection: it never reached the upstream, so this is always safe.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

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
    Broken { url: String, source: hyper::Error },
    /// No response headers within the response timeout.
    #[error("{url} did not respond within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

// === impl RequestBody ===

/// The body sent upstream: the client's, streamed, or empty (for a replay).
pub enum RequestBody {
    /// The client's body, streamed through.
    Client(Incoming),
    /// No body.
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// === impl Pool ===

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// One worker's connections to one upstream.
pub struct Pool {
    upstream: Upstream,
    settings: PoolSettings,
    idle: RefCell<Vec<Idle>>,
    shared_h2: RefCell<Option<http2::SendRequest<RequestBody>>>,
    /// Connections opened so far (for tests and diagnostics).
    opened: Cell<u64>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.upstream.url)
            .field("idle", &self.idle.borrow().len())
            .finish()
    }
}

/// A connection checked out of the pool for one request.
pub(crate) enum Checkout {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

impl Pool {
    /// An empty pool for `upstream`.
    pub fn new(upstream: Upstream, settings: PoolSettings) -> Self {
        Self {
            upstream,
            settings,
            idle: RefCell::new(Vec::new()),
            shared_h2: RefCell::new(None),
            opened: Cell::new(0),
        }
    }

    /// The upstream this pool connects to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// How many connections this pool has opened.
    pub fn connections_opened(&self) -> u64 {
        self.opened.get()
    }

    /// Sends `req` and waits for the response headers. The returned
    /// `Checkin`, if any, must be handed back once the body is finished.
    pub(crate) async fn send(
        self: &Rc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), UpstreamError> {
        // One retry: only when the connection refused the request before
        // writing any of it (hyper hands the request back in that case).
        for attempt in 0..2 {
            let fresh = attempt > 0;
            match self.checkout(fresh).await? {
                Checkout::Http1(mut sender) => match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let checkin = Checkin {
                            pool: self.clone(),
                            sender,
                        };
                        return Ok((resp, Some(checkin)));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(back) if !fresh => req = back,
                        _ => return Err(self.broken(e.into_error())),
                    },
                },
                Checkout::Http2(mut sender) => match sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, None)),
                    Err(mut e) => match e.take_message() {
                        Some(back) if !fresh => {
                            self.shared_h2.borrow_mut().take();
                            req = back
                        }
                        _ => return Err(self.broken(e.into_error())),
                    },
                },
            }
        }
        unreachable!("the second attempt always returns")
    }

    fn broken(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Broken {
            url: self.upstream.url.clone(),
            source,
        }
    }

    async fn checkout(&self, fresh: bool) -> Result<Checkout, UpstreamError> {
        if self.upstream.protocol == UpstreamProtocol::Http2 {
            if !fresh {
                let shared = self.shared_h2.borrow().clone();
                if let Some(sender) = shared.filter(|s| !s.is_closed()) {
                    return Ok(Checkout::Http2(sender));
                }
            }
            let sender = self.connect_h2().await?;
            *self.shared_h2.borrow_mut() = Some(sender.clone());
            return Ok(Checkout::Http2(sender));
        }
        if !fresh {
            let now = Instant::now();
            loop {
                // The borrow ends with this statement: never held across an await.
                let Some(mut idle) = self.idle.borrow_mut().pop() else {
                    break;
                };
                let expired =
                    now.saturating_duration_since(idle.since) >= self.settings.idle_timeout;
                if expired || idle.sender.is_closed() {
                    continue;
                }
                // Checked in only after its last response ended, so this is
                // immediate unless the upstream is closing the connection.
                if idle.sender.ready().await.is_ok() {
                    return Ok(Checkout::Http1(idle.sender));
                }
            }
        }
        self.connect_h1().await.map(Checkout::Http1)
    }

    /// Returns a finished HTTP/1.1 connection to the idle list.
    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.settings.max_idle && !sender.is_closed() {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect_tcp(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
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
        self.opened.set(self.opened.get() + 1);
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        // One buffer, one write(2) per request: see `server::http_builder`.
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                url: self.upstream.url.clone(),
                source,
            })?;
        drive(conn);
        Ok(sender)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                url: self.upstream.url.clone(),
                source,
            })?;
        drive(conn);
        Ok(sender)
    }
}

/// Runs an upstream connection's I/O on this worker until it closes.
fn drive<C>(conn: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + 'static,
{
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
}

// === impl Checkin ===

/// An HTTP/1.1 connection that goes back to its pool once its response body
/// has been read to the end. Dropped early, it closes the connection instead.
pub(crate) struct Checkin {
    pool: Rc<Pool>,
    sender: http1::SendRequest<RequestBody>,
}

impl Checkin {
    pub(crate) fn release(self) {
        self.pool.checkin(self.sender);
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
