//! One worker's request-path state: its upstream pools, its stats, its view
//! of the route table, its random numbers and request ids.
//!
//! Serin runs N workers (default 1), each one OS thread with a
//! current-thread tokio runtime (see [`crate::server`]). Everything here
//! lives on that thread only (`Rc`, `Cell`): nothing on the request path is
//! shared between workers except the route table (one pointer load per
//! request), the read-only configuration and, when configured, the overload
//! limits ([`crate::limit`]).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use tokio::time::Instant;

use crate::access_log::{AccessLog, WorkerLog};
use crate::classify::Classifier;
use crate::fields::Fields;
use crate::limit::{ConcurrencyLimit, RateLimiter};
use crate::otlp::Exporter;
use crate::outcome::{Observation, RequestFacts, Settled};
use crate::spans::WorkerSpans;
use crate::split::{FastRng, LocalRoutes, Target};
use crate::stats::{ShadowStats, UpstreamStats, WorkerStats};
use crate::tls::Acceptor;
use crate::trace::TraceContext;
use crate::upstream::tls::Origin;
use crate::upstream::{EndpointSet, Pool, UpstreamProtocol};
use crate::{ProxyConfig, Routes};

/// What every worker shares (read-only, or atomic).
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) routes: Routes,
    pub(crate) classifier: Classifier,
    pub(crate) tls: Option<Acceptor>,
    pub(crate) access_log: Option<Arc<AccessLog>>,
    pub(crate) exporter: Option<Arc<Exporter>>,
    /// The local rate limit (`[rate_limit]`), if configured.
    pub(crate) rate_limiter: Option<Arc<RateLimiter>>,
    /// Each upstream's cap on requests in flight (`max_concurrent`), by
    /// [`Target::index`].
    concurrency: [Option<ConcurrencyLimit>; 2],
    /// Each upstream's endpoints and TLS client.
    upstreams: UpstreamLinks,
}

/// What every worker's pools share of each upstream, by [`Target::index`].
pub(crate) struct UpstreamLinks {
    /// Its endpoints.
    pub(crate) endpoints: [Arc<EndpointSet>; 2],
    /// Its TLS client, for `https://`.
    pub(crate) tls: [Option<Arc<Origin>>; 2],
}

impl Shared {
    /// What the workers of a proxy with `config` share; the rate limit's
    /// clock starts at `now`.
    pub(crate) fn new(
        config: ProxyConfig,
        routes: Routes,
        tls: Option<Acceptor>,
        upstreams: UpstreamLinks,
        now: Instant,
        access_log: Option<Arc<AccessLog>>,
        exporter: Option<Arc<Exporter>>,
    ) -> Self {
        Self {
            classifier: config.classifier.clone(),
            rate_limiter: config
                .rate_limit
                .as_ref()
                .map(|limit| Arc::new(RateLimiter::new(limit, now))),
            concurrency: config
                .max_concurrent
                .map(|max| max.map(ConcurrencyLimit::new)),
            config,
            routes,
            tls,
            upstreams,
            access_log,
            exporter,
        }
    }
}

/// One worker's request-path state. Lives on the worker's thread only.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pools: [Rc<Pool>; 2],
    stats: Arc<WorkerStats>,
    routes: LocalRoutes,
    rng: FastRng,
    inflight: Cell<usize>,
    /// Shutdown has begun: connections close after their current response.
    pub(crate) draining: Cell<bool>,
    /// Both upstreams speak HTTP/1.1, so HTTP/1.x clients, over plain TCP
    /// or TLS, are served by serin's own loop ([`crate::server::own_h1`])
    /// until a request needs hyper.
    pub(crate) own_h1: bool,
    request_seq: Cell<u64>,
    request_prefix: u64,
    access_log: Option<WorkerLog>,
    spans: Option<WorkerSpans>,
    /// Shadow copies in flight on this worker, and its share of
    /// `shadow.max_concurrent`.
    shadow_inflight: Cell<usize>,
    shadow_limit: usize,
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The upstream that answers the client.
    pub(crate) target: Target,
    /// A copy goes to the canary too (phase `shadowing`; see [`crate::shadow`]).
    pub(crate) shadow: bool,
}

impl Worker {
    /// The state of worker `index`.
    pub(crate) fn new(index: usize, shared: Arc<Shared>, stats: Arc<WorkerStats>) -> Self {
        let rng = FastRng::from_entropy(index as u64);
        let request_prefix = rng.next_u64();
        let config = &shared.config;
        let own_h1 = config.stable.protocol == UpstreamProtocol::Http1
            && config.canary.protocol == UpstreamProtocol::Http1;
        let access_log = shared
            .access_log
            .as_ref()
            .map(|log| WorkerLog::new(log.clone(), index as u64));
        let spans = shared
            .exporter
            .clone()
            .map(|exporter| WorkerSpans::new(exporter, config.trace.query.clone()));
        let shadow_limit = share(config.shadow.max_concurrent, config.workers);
        Self {
            pools: [
                Rc::new(Pool::new(
                    config.stable.clone(),
                    shared.upstreams.endpoints[0].clone(),
                    shared.upstreams.tls[0].clone(),
                    config.pool.clone(),
                    rng.next_u64(),
                )),
                Rc::new(Pool::new(
                    config.canary.clone(),
                    shared.upstreams.endpoints[1].clone(),
                    shared.upstreams.tls[1].clone(),
                    config.pool.clone(),
                    rng.next_u64(),
                )),
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
            access_log,
            spans,
            shadow_inflight: Cell::new(0),
            shadow_limit,
        }
    }

    /// The proxy's configuration.
    #[inline]
    pub(crate) fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    /// Whether the access log or span export follows requests.
    pub(crate) fn observed(&self) -> bool {
        self.access_log.is_some() || self.spans.is_some()
    }

    /// Begins what the access log and span export keep of an admitted
    /// request; `None` (one branch) when neither is on.
    #[inline]
    pub(crate) fn observe<'a>(
        &self,
        facts: impl FnOnce() -> RequestFacts<'a>,
        trace: Option<&TraceContext>,
    ) -> Option<Observation> {
        if !self.observed() {
            return None;
        }
        let facts = facts();
        Some(Observation {
            line: self.access_log.as_ref().map(|log| log.begin(&facts)),
            span: match (&self.spans, trace) {
                (Some(spans), Some(trace)) => spans.begin(&facts, trace),
                _ => None,
            },
        })
    }

    /// Completes the access-log line and the span of a request that ended.
    pub(crate) fn settle(&self, observation: Observation, settled: &Settled) {
        if let (Some(log), Some(line)) = (&self.access_log, observation.line) {
            log.finish(line, settled);
        }
        if let (Some(spans), Some(span)) = (&self.spans, observation.span) {
            spans.finish(span, settled);
        }
    }

    /// Hands the access log's and the spans' batches over (the worker's
    /// timer, and its shutdown).
    pub(crate) fn flush_observers(&self) {
        if let Some(log) = &self.access_log {
            log.flush();
        }
        if let Some(spans) = &self.spans {
            spans.flush();
        }
    }

    /// The request's trace context, when the trace settings or the access
    /// log need one (see [`crate::trace`]); otherwise nothing is looked at.
    #[inline]
    pub(crate) fn trace_context<H: Fields + ?Sized>(&self, headers: &H) -> Option<TraceContext> {
        let settings = &self.shared.config.trace;
        if !settings.active() && !self.observed() {
            return None;
        }
        TraceContext::of(headers, settings, &self.rng)
    }

    /// The split decision for a request with these header fields, from a
    /// client with this verified identity, and whether a request for stable
    /// is copied to the canary too: the route table's shadow share, one
    /// branch when it is 0.
    #[inline]
    pub(crate) fn decide<H: Fields + ?Sized>(
        &self,
        headers: &H,
        identity: Option<&[u8]>,
    ) -> Decision {
        let rules = &self.shared.config.split;
        let (target, shadow_bp) = self.routes.with(|table| {
            (
                rules.decide(table, headers, identity, &self.rng).0,
                table.shadow_bp,
            )
        });
        let shadow = shadow_bp > 0 && target == Target::Stable && self.rng.bucket() < shadow_bp;
        // A canary at its `max_concurrent` sends the overflow to stable:
        // its clients are served, and the judge still sees the canary's
        // latency in the requests it does take.
        match self.concurrency_limit(target) {
            Some(limit) if target == Target::Canary && limit.is_full() => {
                self.stats(Target::Canary).record_concurrency_limited();
                Decision {
                    target: Target::Stable,
                    shadow: false,
                }
            }
            _ => Decision { target, shadow },
        }
    }

    /// Takes a place for a shadow copy in this worker's share of
    /// `shadow.max_concurrent`; false when none is left.
    pub(crate) fn shadow_started(&self) -> bool {
        let n = self.shadow_inflight.get();
        if n >= self.shadow_limit {
            return false;
        }
        self.shadow_inflight.set(n + 1);
        true
    }

    /// Gives a shadow copy's place back.
    pub(crate) fn shadow_ended(&self) {
        self.shadow_inflight.set(self.shadow_inflight.get() - 1);
    }

    /// This worker's shadow figures.
    pub(crate) fn shadow_stats(&self) -> &ShadowStats {
        self.stats.shadow()
    }

    /// The local rate limit, if configured.
    #[inline]
    pub(crate) fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.shared.rate_limiter.as_deref()
    }

    /// `target`'s cap on requests in flight, if configured.
    #[inline]
    pub(crate) fn concurrency_limit(&self, target: Target) -> Option<&ConcurrencyLimit> {
        self.shared.concurrency[target.index()].as_ref()
    }

    /// The pool of connections to `target`.
    pub(crate) fn pool(&self, target: Target) -> &Rc<Pool> {
        &self.pools[target.index()]
    }

    /// This worker's stats for `target`.
    #[inline]
    pub(crate) fn stats(&self, target: Target) -> &UpstreamStats {
        self.stats.upstream(target)
    }

    /// Requests in flight on this worker (sent, response not yet finished).
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.get()
    }

    pub(crate) fn request_started(&self) {
        self.inflight.set(self.inflight.get() + 1);
    }

    pub(crate) fn request_ended(&self) {
        self.inflight.set(self.inflight.get() - 1);
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
}

/// One worker's share of a bound on `total` for all `workers`: split
/// evenly, rounded up, at least one.
fn share(total: usize, workers: usize) -> usize {
    total.div_ceil(workers.max(1)).max(1)
}

fn write_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_is_shared_between_workers() {
        assert_eq!(share(64, 1), 64);
        assert_eq!(share(5, 2), 3, "rounded up");
        assert_eq!(share(5, 64), 1, "at least one each");
    }

    #[test]
    fn request_ids_are_hex() {
        let mut buf = [0u8; 8];
        write_hex(&mut buf, 0xdead_beef);
        assert_eq!(&buf, b"deadbeef");
    }
}
