//! One worker's connections to one upstream, and the choice of endpoint.
//!
//! Pools are single-threaded (`Rc`/`RefCell`, no lock) because a worker is
//! one thread running one current-thread runtime. Each endpoint of the
//! upstream ([`super::endpoints`]) has its own idle list and shared HTTP/2
//! connection here. A request goes to one endpoint chosen by the power of
//! two choices: two drawn at random, the one with fewer of this worker's
//! requests in flight wins, and an ejected one only if nothing else is
//! left (Envoy's and linkerd's least-request balancing). With one endpoint
//! there is no draw.
//!
//! Connections are opened lazily, with `TCP_NODELAY`, under a connect
//! timeout that covers the TLS handshake too, and the idle lists are
//! bounded. When a connection cannot be made, nothing was sent: the request
//! goes to one other endpoint, if there is one (nginx's default
//! `proxy_next_upstream error timeout`). A pooled connection that the
//! upstream closed while it sat idle is noticed at checkout when the close
//! has arrived, and otherwise by the request failing before any response: a
//! bodiless idempotent request is then replayed once on a new connection.
//! An HTTP/2 upstream connection (hyper; h2c, or h2 over TLS) is shared by
//! all of the worker's requests to that endpoint.

use std::cell::{Cell, RefCell};
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
use super::endpoints::{Endpoint, EndpointSet};
use super::idle::{Busy, IdleConnections};
use super::socket::UpstreamIo;
use super::tls::Origin;
use super::{
    Http1Error, PoolSettings, RequestBody, RequestFraming, Upstream, UpstreamError,
    UpstreamProtocol,
};
use crate::fields::RawFields;
use crate::http1::framing::{response_framing, Framing};
use crate::split::FastRng;
use crate::LocalExec;

/// One worker's connections to one endpoint.
struct Local {
    endpoint: Arc<Endpoint>,
    idle: Rc<IdleConnections>,
    shared_h2: RefCell<Option<http2::SendRequest<RequestBody>>>,
}

/// One worker's connections to one upstream.
pub struct Pool {
    upstream: Upstream,
    /// The upstream's TLS client, for `https://`.
    tls: Option<Arc<Origin>>,
    /// The upstream's endpoints, shared by every worker.
    endpoints: Arc<EndpointSet>,
    settings: PoolSettings,
    /// This worker's connections to each endpoint of generation `seen`.
    locals: RefCell<Vec<Rc<Local>>>,
    seen: Cell<u64>,
    rng: FastRng,
    /// The protocol spoken: the configured one, or for `auto` what this
    /// worker's first connection chose (`Auto` until then).
    protocol: Cell<UpstreamProtocol>,
    /// A background connection is learning an `auto` upstream's protocol.
    learning: Cell<bool>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.upstream.url)
            .field("endpoints", &self.locals.borrow().len())
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
    /// An empty pool for `upstream`, whose endpoints are `endpoints`; `tls`
    /// is its TLS client when it is `https://`.
    pub(crate) fn new(
        upstream: Upstream,
        endpoints: Arc<EndpointSet>,
        tls: Option<Arc<Origin>>,
        settings: PoolSettings,
        seed: u64,
    ) -> Self {
        Self {
            tls,
            endpoints,
            settings,
            locals: RefCell::new(Vec::new()),
            seen: Cell::new(0),
            rng: FastRng::new(seed),
            protocol: Cell::new(upstream.protocol),
            learning: Cell::new(false),
            upstream,
        }
    }

    /// The protocol spoken now: `Auto` until an `auto` upstream's first
    /// connection chose.
    pub(crate) fn protocol(&self) -> UpstreamProtocol {
        self.protocol.get()
    }

    /// Learns an `auto` upstream's protocol in the background (one
    /// connection at a time), for a caller that cannot wait for it: a
    /// shadow copy, which is skipped meanwhile.
    pub(crate) fn learn_protocol(self: &Rc<Self>, now: Instant) {
        if self.learning.replace(true) {
            return;
        }
        let pool = self.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = pool.speaks_h2(now).await {
                tracing::debug!(error = %e, "could not learn the upstream's protocol");
            }
            pool.learning.set(false);
        });
    }

    /// Whether requests go over HTTP/2. For a `protocol = "auto"`
    /// upstream, the first call connects to learn what ALPN chooses, and
    /// keeps the connection for the request.
    pub(crate) async fn speaks_h2(&self, now: Instant) -> Result<bool, UpstreamError> {
        match self.protocol.get() {
            UpstreamProtocol::Http1 => return Ok(false),
            UpstreamProtocol::Http2 => return Ok(true),
            UpstreamProtocol::Auto => {}
        }
        let local = self.pick(now, None).ok_or_else(|| self.no_endpoint())?;
        let io = match self.connect(&local.endpoint).await {
            Ok(io) => io,
            Err(e) => {
                self.endpoints.record(&local.endpoint, true, now);
                return Err(e);
            }
        };
        // Another request may have learned it meanwhile: this connection
        // is used all the same.
        let h2 = io.is_h2();
        if h2 {
            let sender = self.handshake_h2(io).await?;
            *local.shared_h2.borrow_mut() = Some(sender);
        } else {
            local.idle.set_now(now);
            local.idle.checkin(Connection::new(io));
        }
        let learned = if h2 {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        };
        self.protocol.set(learned);
        Ok(h2)
    }

    /// The upstream this pool connects to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Follows the endpoint set when it changed (one atomic load when not):
    /// kept endpoints keep their connections, gone ones' idle connections
    /// close.
    fn sync(&self) {
        if self.endpoints.generation() == self.seen.get() {
            return;
        }
        let (generation, endpoints) = self.endpoints.current();
        let mut locals = self.locals.borrow_mut();
        let next = endpoints
            .into_iter()
            .map(|endpoint| {
                let kept = locals
                    .iter()
                    .find(|l| Arc::ptr_eq(&l.endpoint, &endpoint))
                    .cloned();
                kept.unwrap_or_else(|| {
                    Rc::new(Local {
                        endpoint,
                        idle: Rc::new(IdleConnections::new(self.settings.clone())),
                        shared_h2: RefCell::new(None),
                    })
                })
            })
            .collect();
        *locals = next;
        self.seen.set(generation);
    }

    /// Chooses the endpoint for a request, other than `not` (one that could
    /// not be connected to): of two drawn at random, the one in rotation
    /// with fewer requests in flight.
    fn pick(&self, now: Instant, not: Option<&Rc<Local>>) -> Option<Rc<Local>> {
        self.sync();
        let locals = self.locals.borrow();
        let usable = |l: &Rc<Local>| not.is_none_or(|n| !Rc::ptr_eq(n, l));
        let n = locals.len();
        if n <= 1 {
            return locals.first().filter(|l| usable(l)).cloned();
        }
        let a = (self.rng.next_u64() % n as u64) as usize;
        let mut b = (self.rng.next_u64() % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let serving = |l: &Rc<Local>| usable(l) && !self.endpoints.ejected(&l.endpoint, now);
        let (a, b) = (&locals[a], &locals[b]);
        let chosen = match (serving(a), serving(b)) {
            (true, true) if b.idle.busy() < a.idle.busy() => b,
            (true, _) => a,
            (false, true) => b,
            // Both drawn are out: any in rotation, else any but `not`.
            (false, false) => locals
                .iter()
                .find(|l| serving(l))
                .or_else(|| locals.iter().find(|l| usable(l)))?,
        };
        Some(chosen.clone())
    }

    /// After a failed connect to `local` (counted against it): the other
    /// endpoint to send the request to, unless it has `moved` once already.
    fn instead_of(&self, local: &Rc<Local>, moved: bool, now: Instant) -> Option<Rc<Local>> {
        self.endpoints.record(&local.endpoint, true, now);
        if moved {
            return None;
        }
        self.pick(now, Some(local))
    }

    fn no_endpoint(&self) -> UpstreamError {
        UpstreamError::NoEndpoint {
            url: self.upstream.url.clone(),
        }
    }

    /// Sends an HTTP/1.1 request and reads the response head, which stays
    /// in place for the caller; the connection goes back to the pool when
    /// the response body ends. A reused connection the upstream closed while
    /// it sat idle fails before any response arrives; a bodiless request
    /// with an idempotent method (RFC 9110 §9.2.2) is then sent once more on
    /// a new connection. A connection that cannot be made sends the request
    /// to one other endpoint.
    pub(crate) async fn send_h1<E: Fn(&mut Vec<u8>)>(
        &self,
        request: H1Request<'_, E>,
        now: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let replayable = request.body.is_end_stream() && request.method.is_idempotent();
        let mut body = Some(request.body);
        let mut local = self.pick(now, None).ok_or_else(|| self.no_endpoint())?;
        let mut busy = Busy::new(&local.idle);
        let (mut replayed, mut moved) = (false, false);
        loop {
            local.idle.set_now(now);
            let pooled = if replayed {
                None
            } else {
                local.idle.checkout()
            };
            let mut conn = match pooled {
                Some(conn) => conn,
                // Boxed: a connect (with its TLS handshake) is large and
                // rare; unboxed it would grow every request's future, which
                // is moved whole into its timeout.
                None => match Box::pin(self.connect(&local.endpoint)).await {
                    Ok(io) => Connection::new(io),
                    Err(e) => match self.instead_of(&local, moved, now) {
                        Some(other) => {
                            (local, moved, replayed) = (other, true, false);
                            busy = Busy::new(&local.idle);
                            continue;
                        }
                        None => return Err(e),
                    },
                },
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
                            let failed = head.status.is_server_error();
                            self.endpoints.record(&local.endpoint, failed, now);
                            return Ok(UpstreamResponse::new(head, framing, conn, busy, sent));
                        }
                        Err(e) => ExchangeError::Upstream(e.into()),
                    }
                }
                Err(e) => e,
            };
            match error {
                ExchangeError::Stale(_) if !replayed && replayable => replayed = true,
                ExchangeError::Stale(e) | ExchangeError::Upstream(e) => {
                    self.endpoints.record(&local.endpoint, true, now);
                    return Err(UpstreamError::Broken {
                        url: self.upstream.url.clone(),
                        source: e.into(),
                    });
                }
                ExchangeError::Client(source) => {
                    return Err(UpstreamError::ClientAborted { source })
                }
            }
        }
    }

    /// Sends a request over the worker's shared HTTP/2 connection to the
    /// chosen endpoint.
    pub(crate) async fn send_h2(
        &self,
        mut req: Request<RequestBody>,
        now: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut local = self.pick(now, None).ok_or_else(|| self.no_endpoint())?;
        let mut busy = Busy::new(&local.idle);
        let (mut fresh, mut moved) = (false, false);
        loop {
            let mut sender = match self.checkout_h2(&local, fresh).await {
                Ok(sender) => sender,
                Err(e) => match self.instead_of(&local, moved, now) {
                    Some(other) => {
                        (local, moved, fresh) = (other, true, false);
                        busy = Busy::new(&local.idle);
                        continue;
                    }
                    None => return Err(e),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let failed = resp.status().is_server_error();
                    self.endpoints.record(&local.endpoint, failed, now);
                    drop(busy);
                    return Ok(resp);
                }
                // One retry: only when the connection refused the request
                // before writing any of it (hyper hands it back then).
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => {
                        local.shared_h2.borrow_mut().take();
                        (req, fresh) = (back, true);
                    }
                    _ => {
                        let error = self.broken_h2(e.into_error());
                        if !matches!(error, UpstreamError::ClientAborted { .. }) {
                            self.endpoints.record(&local.endpoint, true, now);
                        }
                        return Err(error);
                    }
                },
            }
        }
    }

    fn broken_h2(&self, source: hyper::Error) -> UpstreamError {
        // A failure of the request body we were streaming is the client's
        // doing (it hung up mid-upload), not the upstream's.
        if source.is_user() || source.is_body_write_aborted() {
            return UpstreamError::ClientAborted {
                source: source.into(),
            };
        }
        UpstreamError::Broken {
            url: self.upstream.url.clone(),
            source: source.into(),
        }
    }

    async fn checkout_h2(
        &self,
        local: &Local,
        fresh: bool,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if !fresh {
            let shared = local.shared_h2.borrow().clone();
            if let Some(sender) = shared.filter(|s| !s.is_closed()) {
                return Ok(sender);
            }
        }
        let sender = self.connect_h2(&local.endpoint).await?;
        *local.shared_h2.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }

    /// Opens a connection to `endpoint`: TCP, then TLS for `https://`, all
    /// within the connect timeout.
    async fn connect(&self, endpoint: &Endpoint) -> Result<UpstreamIo, UpstreamError> {
        let url = &self.upstream.url;
        let timeout = self.settings.connect_timeout;
        let connect = async {
            let tcp = TcpStream::connect(endpoint.addr).await.map_err(|source| {
                UpstreamError::Connect {
                    url: url.clone(),
                    endpoint: endpoint.addr,
                    source,
                }
            })?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(UpstreamIo::Plain(tcp));
            };
            let tls_error = |source| UpstreamError::Tls {
                url: url.clone(),
                endpoint: endpoint.addr,
                source,
            };
            let name = endpoint.server_name.clone().ok_or_else(|| {
                tls_error(std::io::Error::other("no valid TLS server name for it"))
            })?;
            match tls.connect(tcp, name, self.protocol.get()).await {
                Ok(stream) => Ok(UpstreamIo::Tls(Box::new(stream))),
                Err(source) => Err(tls_error(source)),
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(connected) => connected,
            Err(_) => Err(UpstreamError::ConnectTimeout {
                url: url.clone(),
                endpoint: endpoint.addr,
                timeout,
            }),
        }
    }

    async fn connect_h2(
        &self,
        endpoint: &Endpoint,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect(endpoint).await?;
        self.handshake_h2(io).await
    }

    /// Starts HTTP/2 on a new connection.
    async fn handshake_h2(
        &self,
        io: UpstreamIo,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = TokioIo::new(io);
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
