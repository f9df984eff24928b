//! Workers, listeners, connections and drain.
//!
//! Serin runs N workers (default 1). Each is one OS thread with a
//! current-thread tokio runtime, its own `SO_REUSEPORT` listener, its own
//! upstream pools and its own stats ([`crate::worker`]): the shape of nginx
//! workers and of pingora's no-steal runtime.
//!
//! A connection is served by one of two protocol adapters, which both call
//! the same request policy ([`crate::policy`]):
//! - [`own_h1`]: serin's own HTTP/1.1 loop, for HTTP/1.x clients over plain
//!   TCP or TLS ([`client_io`]) when both upstreams speak HTTP/1.1, until a
//!   request needs hyper;
//! - [`own_h2`]: serin's own HTTP/2 loop, for every HTTP/2 client (prior
//!   knowledge, or ALPN `h2` under TLS);
//! - [`hyper`]: hyper's HTTP/1.1 server, for uploads, upgrades, and every
//!   HTTP/1.x connection when an upstream speaks HTTP/2.

mod client_io;
mod hyper;
pub(crate) mod own_h1;
mod own_h2;
mod rewind;

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ::hyper::server::conn::http1;
use bytes::BytesMut;
use http::HeaderValue;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access_log::FLUSH_INTERVAL;
use crate::http1::head::MAX_FIELDS;
use crate::http2::frame::PREFACE;
use crate::policy::ConnMeta;
use crate::socket::Socket;
use crate::stats::WorkerStats;
use crate::tls;
use crate::worker::{Shared, Worker};
use crate::ProxyConfig;
use client_io::ClientIo;
use rewind::Rewind;

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let worker = Rc::new(Worker::new(index, shared, stats));
        if worker.observed() {
            tokio::task::spawn_local(flush_observers(Rc::downgrade(&worker)));
        }
        accept_loop(worker.clone(), listener, shutdown).await;
        worker.flush_observers();
        Ok(())
    })
}

/// Hands the worker's access-log and span batches over at least every
/// [`FLUSH_INTERVAL`], so a quiet proxy's lines and spans still appear.
async fn flush_observers(worker: std::rc::Weak<Worker>) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(worker) = worker.upgrade() else {
            return;
        };
        worker.flush_observers();
    }
}

async fn accept_loop(
    worker: Rc<Worker>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Rc::new(http_builder(worker.config()));
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
    let drain = worker.config().drain_timeout;
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
        // The connection first: one the own loop hands over during a drain
        // reads its request before it is asked to finish.
        biased;
        out = conn.as_mut() => return out,
        _ = shutdown.wait_for(|&stop| stop) => graceful(conn.as_mut()),
    }
    conn.await
}

fn http_builder(config: &ProxyConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_headers(MAX_FIELDS)
        .keep_alive(true)
        // Flatten each response into one buffer and one write(2): measured
        // ~3% less CPU per request than vectored writes for typical small
        // responses (bench/REPORT.md). Large bodies still stream in chunks.
        .writev(false);
    builder
}

async fn serve_connection(
    worker: Rc<Worker>,
    builder: Rc<http1::Builder>,
    _open: OpenConnection,
    mut shutdown: watch::Receiver<bool>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let (mut io, meta) = match worker.shared.tls.clone() {
        None => (
            ClientIo::new(Socket::Plain(stream)),
            conn_meta(peer, "http", None),
        ),
        // Boxed: a handshake's state is large, and an unboxed branch would
        // make every plain connection's task that large.
        Some(acceptor) => match Box::pin(handshake(&acceptor, stream, peer)).await {
            Some(stream) => {
                // Read once here; every request on the connection carries it.
                let identity = tls::client_identity(stream.get_ref().1);
                let socket = Socket::Tls(Box::new(stream));
                (ClientIo::new(socket), conn_meta(peer, "https", identity))
            }
            None => return,
        },
    };
    let mut read_so_far = if io.is_h2() {
        BytesMut::new()
    } else if worker.own_h1 {
        match own_h1::serve(&worker, &meta, &mut io, &mut shutdown).await {
            Some(read) => read,
            None => return,
        }
    } else {
        BytesMut::with_capacity(4096)
    };
    // Not yet known: the own loop hands over the first bytes of a preface
    // as soon as they are one; the rest decides.
    if !io.is_h2() && read_so_far.len() < PREFACE.len() && PREFACE.starts_with(&read_so_far) {
        let timeout = worker.config().header_read_timeout;
        match tokio::time::timeout(timeout, sniff_preface(&mut io, &mut read_so_far)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
    if io.is_h2() || read_so_far.starts_with(PREFACE) {
        // Boxed: most connections are HTTP/1.1, and never need its state.
        Box::pin(own_h2::serve(worker, meta, io, read_so_far, shutdown)).await;
        return;
    }
    let read_so_far = read_so_far.freeze();
    // Boxed: hyper's connection state is large, and most connections never
    // leave serin's own loop.
    let result = Box::pin(async move {
        let io = TokioIo::new(Rewind::new(read_so_far, io.into_socket()));
        let service = ::hyper::service::service_fn(move |req| {
            Box::pin(hyper::proxy(worker.clone(), meta.clone(), req))
        });
        let conn = builder.serve_connection(io, service).with_upgrades();
        until_drained(conn, shutdown, |c| c.graceful_shutdown()).await
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Reads a plain-TCP client's first bytes into `read` until they are an
/// HTTP/2 preface or cannot become one; what it read goes to whichever
/// adapter serves the connection.
async fn sniff_preface(io: &mut ClientIo, read: &mut BytesMut) -> std::io::Result<()> {
    loop {
        let n = read.len().min(PREFACE.len());
        if read[..n] != PREFACE[..n] || n == PREFACE.len() {
            return Ok(());
        }
        if read.capacity() == read.len() {
            read.reserve(4096);
        }
        if std::future::poll_fn(|cx| io.poll_fill(cx, read)).await? == 0 {
            return Ok(());
        }
    }
}

/// The TLS handshake with a client, under [`TLS_HANDSHAKE_TIMEOUT`]; `None`
/// if it failed or timed out.
async fn handshake(
    acceptor: &tls::Acceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// What the policy needs to know of a connection from `peer`, spoken over
/// `proto` (`http` or `https`) by a client with this verified identity.
fn conn_meta(peer: SocketAddr, proto: &'static str, identity: Option<HeaderValue>) -> Rc<ConnMeta> {
    Rc::new(ConnMeta {
        peer: peer.ip(),
        client_ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        proto: HeaderValue::from_static(proto),
        identity,
    })
}
