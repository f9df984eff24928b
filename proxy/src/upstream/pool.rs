//! One worker's connections to one upstream.
//!
//! Pools are single-threaded (`Rc`/`RefCell`, no lock) because a worker is
//! one thread running one current-thread runtime. Connections are opened
//! lazily, with `TCP_NODELAY`, under a connect timeout, and the idle list is
//! bounded. A pooled connection that the upstream closed while it sat idle
//! is noticed at checkout when the close has arrived, and otherwise by the
//! request failing before any response: a bodiless idempotent request is
//! then replayed once on a new connection. An h2c upstream connection
//! (hyper) is shared by all requests of the worker.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::UpstreamResponse;
use super::connection::{Connection, ExchangeError};
use super::idle::IdleConnections;
use super::socket::UpstreamIo;
use super::tls::Origin;
use super::{Http1Error, PoolSettings, RequestBody, RequestFraming, Upstream, UpstreamError};
use crate::fields::RawFields;
use crate::http1::framing::{response_framing, Framing};
use crate::LocalExec;

/// One worker's connections to one upstream.
pub struct Pool {
    upstream: Upstream,
    /// The upstream's TLS client, for `https://`.
    tls: Option<Arc<Origin>>,
    idle: Rc<IdleConnections>,
    shared_h2: RefCell<Option<http2::SendRequest<RequestBody>>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.upstream.url)
            .field("idle", &self.idle.len())
            .finish()
    }
}

/// An HTTP/1.1 request for [`Pool::send_h1`]: its head is written by
/// `encode`, its body framed by `framing`.
pub(crate) struct H1Request<'a, E> {
    pub(crate) method: &'a Method,
    pub(crate) encode: E,
    pub(crate) body: RequestBody,
    pub(crate) framing: RequestFraming,
    /// The request asked to switch protocols: a 101 is an answer, not an error.
    pub(crate) upgrade: bool,
}

impl Pool {
    /// An empty pool for `upstream`; `tls` is its TLS client when it is
    /// `https://`.
    pub(crate) fn new(
        upstream: Upstream,
        tls: Option<Arc<Origin>>,
        settings: PoolSettings,
    ) -> Self {
        Self {
            upstream,
            tls,
            idle: Rc::new(IdleConnections::new(settings)),
            shared_h2: RefCell::new(None),
        }
    }

    /// The upstream this pool connects to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Sends an HTTP/1.1 request and reads the response head, which stays
    /// in place for the caller; the connection goes back to the pool when
    /// the response body ends. A reused connection the upstream closed while
    /// it sat idle fails before any response arrives; a bodiless request
    /// with an idempotent method (RFC 9110 §9.2.2) is then sent once more on
    /// a new connection.
    pub(crate) async fn send_h1<E: Fn(&mut Vec<u8>)>(
        &self,
        request: H1Request<'_, E>,
        now: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.idle.set_now(now);
        let replayable = request.body.is_end_stream() && request.method.is_idempotent();
        let mut body = Some(request.body);
        for attempt in 0..2 {
            let pooled = if attempt == 0 {
                self.idle.checkout()
            } else {
                None
            };
            let mut conn = match pooled {
                Some(conn) => conn,
                None => Connection::new(self.connect().await?),
            };
            conn.write.clear();
            (request.encode)(&mut conn.write);
            let body = body.take().unwrap_or(RequestBody::Empty);
            let error = match conn.transact(body, request.framing).await {
                Ok((head, sent)) => {
                    let fields = RawFields {
                        head: &conn.read[..head.len],
                        spans: &conn.spans,
                    };
                    match response_framing(request.method, head.status, &fields) {
                        Ok(Framing::Tunnel) if !request.upgrade => {
                            ExchangeError::Upstream(Http1Error::UnaskedUpgrade)
                        }
                        Ok(framing) => {
                            let idle = self.idle.clone();
                            return Ok(UpstreamResponse::new(head, framing, conn, idle, sent));
                        }
                        Err(e) => ExchangeError::Upstream(e.into()),
                    }
                }
                Err(e) => e,
            };
            match error {
                ExchangeError::Stale(_) if attempt == 0 && replayable => continue,
                ExchangeError::Stale(e) | ExchangeError::Upstream(e) => {
                    return Err(UpstreamError::Broken {
                        url: self.upstream.url.clone(),
                        source: e.into(),
                    })
                }
                ExchangeError::Client(source) => {
                    return Err(UpstreamError::ClientAborted { source })
                }
            }
        }
        unreachable!("the second attempt always returns")
    }

    /// Sends a request over the worker's shared h2c connection.
    pub(crate) async fn send_h2(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // One retry: only when the connection refused the request before
        // writing any of it (hyper hands the request back in that case).
        for attempt in 0..2 {
            let fresh = attempt > 0;
            let mut sender = self.checkout_h2(fresh).await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
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

    /// Opens a connection: TCP, then TLS for `https://`, all within the
    /// connect timeout.
    async fn connect(&self) -> Result<UpstreamIo, UpstreamError> {
        let url = &self.upstream.url;
        let timeout = self.idle.settings().connect_timeout;
        let connect = async {
            let tcp = TcpStream::connect((self.upstream.host.as_str(), self.upstream.port))
                .await
                .map_err(|source| UpstreamError::Connect {
                    url: url.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(UpstreamIo::Plain(tcp)),
                Some(tls) => match tls.connect(tcp).await {
                    Ok(stream) => Ok(UpstreamIo::Tls(Box::new(stream))),
                    Err(source) => Err(UpstreamError::Tls {
                        url: url.clone(),
                        source,
                    }),
                },
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(connected) => connected,
            Err(_) => Err(UpstreamError::ConnectTimeout {
                url: url.clone(),
                timeout,
            }),
        }
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = TokioIo::new(self.connect().await?);
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
