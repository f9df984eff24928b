//! serin's data plane: it accepts client connections, splits each request
//! between the stable and canary upstreams, forwards it over a pooled
//! connection, classifies the outcome and records it.
//!
//! It knows nothing of rollouts or judging. Its input is a [`Routes`] handle
//! (the current canary weight) and its output is a [`Stats`] handle that the
//! control plane reads. [`Proxy::start`] binds every listener before it
//! returns, so a bad address fails at once and nothing half-starts.

pub mod access_log;
mod body;
pub mod classify;
mod client_body;
pub mod defaults;
pub mod fields;
#[doc(hidden)]
pub mod fuzzing;
mod http1;
mod http2;
mod limit;
mod otlp;
mod outcome;
mod policy;
mod reload;
mod server;
pub mod shadow;
mod socket;
mod spans;
pub mod split;
pub mod stats;
pub mod tls;
pub mod trace;
mod upstream;
pub mod wallclock;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http::HeaderName;
use tokio::sync::watch;

pub use classify::Classifier;
pub use limit::{Rate, RateLimit, RateLimitKey};
pub use otlp::ExportCounters;
pub use shadow::ShadowSettings;
pub use split::{LocalRoutes, RouteTable, Routes, SplitRules, StickyKey, Target};
pub use stats::{OutcomeCursor, ShadowSkip, ShadowTotals, Stats, WindowSnapshot};
pub use upstream::{
    EndpointSet, EndpointSnapshot, OutlierSettings, PoolSettings, Upstream, UpstreamProtocol,
    UpstreamTls, UpstreamUrlError,
};

/// Which headers serin adds or rewrites.
#[derive(Clone, Debug)]
pub struct HeaderPolicy {
    /// Replace the client's `Host` with the upstream's `host:port` (default
    /// false: the client's `Host` is preserved, as NGINX ingress does).
    pub rewrite_host: bool,
    /// Append `Via: 1.1 serin` to requests (default false).
    pub via: bool,
    /// Tell the client which upstream answered, in `x-serin-upstream`
    /// (default true).
    pub upstream_header: bool,
    /// The request header that carries the verified client certificate's
    /// identity to the upstream (default none). Every copy a client sends
    /// is removed, on every connection, so a client cannot forge it.
    pub identity_header: Option<HeaderName>,
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        Self {
            rewrite_host: defaults::REWRITE_HOST,
            via: defaults::VIA,
            upstream_header: defaults::UPSTREAM_HEADER,
            identity_header: None,
        }
    }
}

impl HeaderPolicy {
    /// Whether serin writes or drops request header `name` by a rule of
    /// its own (hop-by-hop fields, `Host`, `X-Forwarded-*`, the request id,
    /// `traceparent`, `x-serin-*`…): such a header cannot also be the
    /// identity header.
    pub fn is_reserved(name: &HeaderName) -> bool {
        policy::is_reserved(name.as_str().as_bytes())
    }
}

/// TLS for the client-facing listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Client certificates to ask for and verify (default none).
    pub client_auth: Option<ClientAuth>,
}

/// Client-certificate authentication on the listener (mTLS).
#[derive(Clone, Debug)]
pub struct ClientAuth {
    /// PEM bundle of the CAs that issue client certificates; reloaded with
    /// the certificate.
    pub ca: PathBuf,
    /// Whether a client must present a certificate.
    pub mode: ClientAuthMode,
}

/// Whether a client must present a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// A handshake without a valid client certificate fails (the default).
    #[default]
    Required,
    /// A client without a certificate is served; one that presents a
    /// certificate the CAs did not issue fails the handshake.
    Optional,
}

/// Everything the data plane needs, validated by the caller.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Client-facing listen address (default 127.0.0.1:8080 in the CLI).
    pub listen: SocketAddr,
    /// Worker threads, each with its own listener and pools (default 1).
    pub workers: usize,
    /// The stable upstream.
    pub stable: Upstream,
    /// The canary upstream.
    pub canary: Upstream,
    /// Override and sticky rules of the split.
    pub split: SplitRules,
    /// What counts as an error.
    pub classifier: Classifier,
    /// Upstream connection settings.
    pub pool: PoolSettings,
    /// Time allowed for an upstream's response headers (default 30 s) → 504.
    pub response_timeout: Duration,
    /// Time allowed for a client to send a request's headers (default 30 s).
    pub header_read_timeout: Duration,
    /// Largest request head accepted (default 64 KiB) → 431.
    pub max_header_bytes: usize,
    /// Requests in flight per worker before serin answers 503 (default 10 000).
    pub max_inflight: usize,
    /// Requests in flight to each upstream, all workers together, before
    /// serin answers 503; indexed by [`Target::index`] (default none:
    /// unlimited).
    pub max_concurrent: [Option<NonZeroUsize>; 2],
    /// The local rate limit per client key, answered 429 (default none: off).
    pub rate_limit: Option<RateLimit>,
    /// How long shutdown waits for in-flight requests (default 30 s).
    pub drain_timeout: Duration,
    /// Replay a failed bodiless GET/HEAD/OPTIONS from the canary on stable
    /// (default true). The canary's failure is still recorded for the judge.
    pub canary_fallback: bool,
    /// Header rewrites.
    pub headers: HeaderPolicy,
    /// TLS on the listener (default none: plain HTTP and h2c).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are read to see whether they changed
    /// (default 5 s); a changed valid pair is served to new connections.
    pub tls_reload_interval: Duration,
    /// Length of the rolling stats window (default 10 s).
    pub window: Duration,
    /// The access log (default off).
    pub access_log: Option<access_log::AccessLogConfig>,
    /// Trace context: start traces, record spans (default: neither).
    pub trace: trace::TraceSettings,
    /// What phase `shadowing` copies to the canary, and how many at once.
    pub shadow: ShadowSettings,
}

impl ProxyConfig {
    /// A config with every default, for these two upstreams.
    pub fn new(listen: SocketAddr, stable: Upstream, canary: Upstream) -> Self {
        Self {
            listen,
            workers: defaults::WORKERS,
            stable,
            canary,
            split: SplitRules::default(),
            classifier: Classifier::default(),
            pool: PoolSettings::default(),
            response_timeout: defaults::RESPONSE_TIMEOUT,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_inflight: defaults::MAX_INFLIGHT,
            max_concurrent: [None; 2],
            rate_limit: None,
            drain_timeout: defaults::DRAIN_TIMEOUT,
            canary_fallback: defaults::CANARY_FALLBACK,
            headers: HeaderPolicy::default(),
            tls: None,
            tls_reload_interval: defaults::TLS_RELOAD_INTERVAL,
            window: defaults::WINDOW,
            access_log: None,
            trace: trace::TraceSettings::default(),
            shadow: ShadowSettings::default(),
        }
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using it? pick another with --listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The access log could not be opened.
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    /// The span exporter could not start.
    #[error("cannot export spans (trace.otlp_endpoint): {0}")]
    Otlp(std::io::Error),
    /// A worker thread could not be started.
    #[error("cannot start worker thread: {0}")]
    Spawn(std::io::Error),
}

/// Spawns hyper's background tasks (HTTP/2 streams and connections) on the
/// worker's own thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

// === impl Proxy ===

/// A running data plane.
pub struct Proxy {
    local_addr: SocketAddr,
    stats: Stats,
    routes: Routes,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    access_log: Option<JoinHandle<()>>,
    tls: Option<tls::Listener>,
    /// Reloads the upstreams' TLS files, when one is `https://`.
    upstream_tls: Option<reload::Reloader>,
    /// Resolves the upstreams' host names again, when a URL has one.
    resolver: Option<reload::Reloader>,
}

impl Proxy {
    /// Binds the listeners (one per worker, `SO_REUSEPORT`) and starts the
    /// workers. Must be called from outside any worker thread.
    pub fn start(config: ProxyConfig, routes: Routes) -> Result<Self, StartError> {
        let tls = match &config.tls {
            Some(files) => Some(tls::Listener::start(files, config.tls_reload_interval)?),
            None => None,
        };
        let workers = config.workers.max(1);
        let mut listeners = Vec::with_capacity(workers);
        let mut addr = config.listen;
        for _ in 0..workers {
            let listener =
                bind(addr, workers > 1).map_err(|source| StartError::Bind { addr, source })?;
            // Port 0 picks a port for the first listener; the rest share it.
            addr = listener
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            listeners.push(listener);
        }
        let origins = [&config.stable, &config.canary].map(|upstream| {
            upstream
                .tls
                .as_ref()
                .map(|tls| upstream::tls::Origin::load(tls, upstream.targets(), upstream.protocol))
                .transpose()
                .map(|origin| origin.map(Arc::new))
        });
        let origins = match origins {
            [Ok(stable), Ok(canary)] => [stable, canary],
            [Err(e), _] | [_, Err(e)] => return Err(e.into()),
        };
        let endpoints = [
            (Target::Stable, &config.stable),
            (Target::Canary, &config.canary),
        ]
        .map(|(target, upstream)| {
            Arc::new(upstream::EndpointSet::new(
                target.as_str(),
                upstream.targets().to_vec(),
                upstream.tls.as_ref(),
                upstream.outlier.clone(),
                &upstream::system_resolve,
            ))
        });
        let resolver = Self::start_resolver(&config, &endpoints)?;
        let now = tokio::time::Instant::now();
        let mut stats = Stats::new(workers, config.window, now).with_endpoints(endpoints.clone());
        if let Some(tls) = &tls {
            stats = stats.with_tls_reload("listener", tls.counters().clone());
        }
        for (target, origin) in Target::ALL.into_iter().zip(&origins) {
            if let Some(origin) = origin {
                stats = stats.with_tls_reload(target.as_str(), origin.counters.clone());
            }
        }
        let upstream_tls = if origins.iter().any(Option::is_some) {
            let origins = origins.clone();
            let job = move || {
                for (target, origin) in Target::ALL.into_iter().zip(&origins) {
                    if let Some(origin) = origin {
                        origin.reload(target.as_str());
                    }
                }
            };
            Some(
                reload::Reloader::spawn("serin-upstream-tls", config.tls_reload_interval, job)
                    .map_err(StartError::Spawn)?,
            )
        } else {
            None
        };
        let (log, access_log) = match &config.access_log {
            Some(log) => {
                let (log, writer) = access_log::AccessLog::start(log.clone())?;
                stats = stats.with_access_log(log.counters.clone());
                (Some(log), Some(writer))
            }
            None => (None, None),
        };
        let exporter = match &config.trace.export {
            Some(export) => {
                let exporter = otlp::Exporter::start(&otlp::OtlpConfig {
                    endpoint: export.endpoint.clone(),
                    service_name: export.service_name.clone(),
                    ..otlp::OtlpConfig::default()
                })
                .map_err(StartError::Otlp)?;
                stats = stats.with_span_export(exporter.counters().clone());
                Some(Arc::new(exporter))
            }
            None => None,
        };
        let shared = Arc::new(worker::Shared::new(
            config,
            routes.clone(),
            tls.as_ref().map(tls::Listener::acceptor),
            worker::UpstreamLinks {
                endpoints,
                tls: origins,
            },
            now,
            log,
            exporter,
        ));
        let stats = stats.with_rate_limiter(shared.rate_limiter.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(workers);
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let worker_stats = stats.worker(index);
            let rx = shutdown_rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("serin-worker-{index}"))
                .spawn(move || {
                    if let Err(e) = server::run_worker(index, listener, shared, worker_stats, rx) {
                        tracing::error!(worker = index, error = %e, "worker stopped");
                    }
                })
                .map_err(StartError::Spawn)?;
            handles.push(handle);
        }
        Ok(Self {
            local_addr: addr,
            stats,
            routes,
            shutdown,
            workers: handles,
            access_log,
            tls,
            upstream_tls,
            resolver,
        })
    }

    /// Starts the thread that resolves the upstreams' host names again
    /// every `resolve_interval`, when a URL has a name.
    fn start_resolver(
        config: &ProxyConfig,
        endpoints: &[Arc<upstream::EndpointSet>; 2],
    ) -> Result<Option<reload::Reloader>, StartError> {
        let resolving = endpoints
            .iter()
            .filter(|set| set.resolves())
            .cloned()
            .collect::<Vec<_>>();
        if resolving.is_empty() {
            return Ok(None);
        }
        let interval = config
            .stable
            .resolve_interval
            .min(config.canary.resolve_interval);
        let job = move || {
            for set in &resolving {
                set.refresh(&upstream::system_resolve);
            }
        };
        reload::Reloader::spawn("serin-resolve", interval, job)
            .map(Some)
            .map_err(StartError::Spawn)
    }

    /// The address the listeners are bound to (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The stats handle the control plane reads.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The route table handle.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Stops accepting and lets in-flight requests finish (up to the drain
    /// timeout). Returns at once; [`Proxy::wait`] waits for the drain.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until every worker has drained and stopped, and the access
    /// log has written what they logged.
    pub async fn wait(self) {
        let workers = self.workers;
        let log_writer = self.access_log;
        let tls = self.tls;
        let upstream_tls = self.upstream_tls;
        let resolver = self.resolver;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(resolver) = resolver {
                resolver.stop();
            }
            if let Some(tls) = tls {
                tls.stop();
            }
            if let Some(reloader) = upstream_tls {
                reloader.stop();
            }
            for w in workers {
                let _ = w.join();
            }
            // The workers held the only senders: the writer ends once it
            // has written what they gave it, unless its sink is stuck (a
            // pipe nobody reads): shutdown does not wait for that.
            if let Some(writer) = log_writer {
                let deadline = std::time::Instant::now() + access_log::WRITER_EXIT;
                while !writer.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if writer.is_finished() {
                    let _ = writer.join();
                } else {
                    tracing::warn!(
                        "the access log's writer is still blocked on its sink; stopping without it"
                    );
                }
            }
        })
        .await;
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
