//! An open-loop HTTP/1.1 load generator with coordinated-omission correction.
//!
//! Requests are due on a fixed schedule (`rate` per second) whatever the
//! server does. A pacer task releases each request at its due time into a
//! queue served by `connections` keep-alive connections; the latency recorded
//! is from the **due** time to the end of the response body, so a stalled
//! server is charged for every request that should have been sent meanwhile
//! (the wrk2/HdrHistogram correction). The pacer sleeps on tokio's 1 ms timer
//! to within about a millisecond, then yields in a spin to the exact due time,
//! so the schedule is accurate to microseconds; how late requests actually
//! left is reported as `send_lag` so an overloaded generator shows itself.
//!
//! With `tls` each connection speaks TLS (the client of
//! [`handshakes::client_config`], which does not verify the certificate), so
//! a TLS-terminating proxy can be loaded the same way.
//!
//! It runs in its own process, pinned to the load generator's core, and
//! prints one JSON [`OpenLoopResult`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::HOST;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::handshakes;

/// What one open-loop run asks for.
#[derive(Clone, Debug)]
pub struct OpenLoop {
    /// The server to load.
    pub addr: SocketAddr,
    /// Requests per second, fixed.
    pub rate: f64,
    /// How long requests are scheduled for.
    pub duration: Duration,
    /// Keep-alive connections sharing the schedule.
    pub connections: usize,
    /// Speak TLS on each connection (SNI [`handshakes::SERVER_NAME`], ALPN
    /// `http/1.1`) before HTTP/1.1.
    pub tls: bool,
}

/// The outcome of one run. Latencies are in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpenLoopResult {
    /// Requests that were due.
    pub scheduled: u64,
    /// Requests answered with a 2xx.
    pub ok: u64,
    /// Requests that failed or got a non-2xx.
    pub errors: u64,
    /// Answers per second over the run.
    pub achieved_rps: f64,
    /// Corrected latency percentiles: p50, p90, p99, p99.9, max.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The corrected latency curve: (percentile, µs) points for plotting.
    pub curve: Vec<(f64, f64)>,
    /// How late requests left their due time at p99 (generator health).
    pub send_lag_p99_us: f64,
}

/// The percentiles plotted on the latency curves.
pub const CURVE_PERCENTILES: [f64; 12] = [
    10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

struct Queue {
    due: RefCell<VecDeque<Instant>>,
    notify: Notify,
    closed: Cell<bool>,
}

impl Queue {
    async fn pop(&self) -> Option<Instant> {
        loop {
            if let Some(t) = self.due.borrow_mut().pop_front() {
                return Some(t);
            }
            if self.closed.get() {
                return None;
            }
            self.notify.notified().await;
        }
    }
}

struct Recorder {
    latency: RefCell<Histogram<u64>>,
    lag: RefCell<Histogram<u64>>,
    ok: Cell<u64>,
    errors: Cell<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs the schedule to the end and returns the corrected latencies.
pub fn run(spec: &OpenLoop) -> std::io::Result<OpenLoopResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run_async(spec.clone()))
}

async fn run_async(spec: OpenLoop) -> std::io::Result<OpenLoopResult> {
    let queue = Rc::new(Queue {
        due: RefCell::new(VecDeque::new()),
        notify: Notify::new(),
        closed: Cell::new(false),
    });
    let rec = Rc::new(Recorder {
        latency: RefCell::new(histogram()),
        lag: RefCell::new(histogram()),
        ok: Cell::new(0),
        errors: Cell::new(0),
    });
    let tls = spec
        .tls
        .then(|| TlsConnector::from(handshakes::client_config(true)));
    let mut conns = Vec::new();
    for _ in 0..spec.connections.max(1) {
        let stream = TcpStream::connect(spec.addr).await?;
        stream.set_nodelay(true)?;
        let sender = match &tls {
            Some(connector) => {
                http1(connector.connect(handshakes::server_name(), stream).await?).await?
            }
            None => http1(stream).await?,
        };
        conns.push(tokio::task::spawn_local(connection(
            sender,
            spec.addr,
            queue.clone(),
            rec.clone(),
        )));
    }
    let interval = Duration::from_secs_f64(1.0 / spec.rate);
    let total = (spec.rate * spec.duration.as_secs_f64()).round() as u64;
    let start = Instant::now() + Duration::from_millis(20);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now + Duration::from_micros(1_500) {
            tokio::time::sleep(due - now - Duration::from_micros(1_200)).await;
        }
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        queue.due.borrow_mut().push_back(due);
        queue.notify.notify_one();
    }
    queue.closed.set(true);
    queue.notify.notify_waiters();
    for c in conns {
        let _ = c.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let lag_p99 = rec.lag.borrow().value_at_quantile(0.99) as f64 / 1_000.0;
    let h = rec.latency.borrow();
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    Ok(OpenLoopResult {
        scheduled: total,
        ok: rec.ok.get(),
        errors: rec.errors.get(),
        achieved_rps: rec.ok.get() as f64 / elapsed,
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: h.max() as f64 / 1_000.0,
        curve: CURVE_PERCENTILES
            .iter()
            .map(|p| (*p, us(p / 100.0)))
            .collect(),
        send_lag_p99_us: lag_p99,
    })
}

/// The HTTP/1.1 client side of one connection, plain or TLS; its driver runs
/// as a local task.
async fn http1<S>(stream: S) -> std::io::Result<SendRequest<Empty<Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}

async fn connection(
    mut sender: SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    queue: Rc<Queue>,
    rec: Rc<Recorder>,
) {
    let host = addr.to_string();
    while let Some(due) = queue.pop().await {
        let sent = Instant::now();
        let _ = rec
            .lag
            .borrow_mut()
            .record((sent - due).as_nanos().max(1) as u64);
        let ok = async {
            sender.ready().await.ok()?;
            let req = Request::get("/")
                .header(HOST, host.as_str())
                .body(Empty::<Bytes>::new())
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status();
            resp.into_body().collect().await.ok()?;
            Some(status.is_success())
        }
        .await;
        let done = Instant::now();
        let _ = rec
            .latency
            .borrow_mut()
            .record((done - due).as_nanos().max(1) as u64);
        match ok {
            Some(true) => rec.ok.set(rec.ok.get() + 1),
            Some(false) => rec.errors.set(rec.errors.get() + 1),
            // A broken connection: count the error and stop using it.
            None => {
                rec.errors.set(rec.errors.get() + 1);
                return;
            }
        }
    }
}
