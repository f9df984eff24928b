//! Prometheus exposition (`GET /metrics`) with the names README.md lists
//! ("State, webhooks and metrics").
//!
//! Data-plane figures are not kept twice: a custom collector reads the
//! proxy's own counters and windows at scrape time (relaxed atomic loads,
//! nothing else), so the request path never touches a Prometheus type.
//! Control-plane figures are read from the controller the same way, except
//! the rollout step, which the API sets before each scrape.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use serin_proxy::stats::DURATION_BOUNDS_SECONDS;
use serin_proxy::{ShadowSkip, Target};

use crate::controller::Controller;
use crate::fleet::member::Member;
use crate::rollout::{Actor, Phase};
use crate::webhook::DeliveryStats;

/// The quantiles exported by `serin_window_latency_seconds`.
const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")];

/// Every metric serin exports.
pub struct Metrics {
    registry: Registry,
    rollout_step: IntGauge,
    fleet: Arc<OnceLock<Member>>,
}

impl Metrics {
    /// Registers the metrics over the controller's stats, routes and
    /// rollback counts, and the webhook delivery counters.
    pub fn new(controller: Controller, webhooks: Arc<DeliveryStats>) -> Self {
        let registry = Registry::new();
        let rollout_step = IntGauge::new(
            "serin_rollout_step",
            "Current rollout step (1-based; 0 when no rollout is running)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(rollout_step.clone()))
            .expect("unique metric");
        let exporter = Exporter::new(controller, webhooks);
        let fleet = exporter.fleet.clone();
        registry
            .register(Box::new(exporter))
            .expect("unique metrics");
        Self {
            registry,
            rollout_step,
            fleet,
        }
    }

    /// Adds the fleet member's gauges and counters (`serin_fleet_*`).
    pub fn attach_fleet(&self, member: Member) {
        let _ = self.fleet.set(member);
    }

    /// Sets the rollout step gauge.
    pub fn set_rollout_step(&self, step: i64) {
        self.rollout_step.set(step);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::default();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

// === impl DataPlaneCollector ===

/// Reads the data plane's counters and windows, the route table and the
/// controller's rollback counts at scrape time.
struct Exporter {
    controller: Controller,
    webhooks: Arc<DeliveryStats>,
    fleet: Arc<OnceLock<Member>>,
    descs: Vec<Desc>,
}

const FAMILIES: [(&str, &str); 30] = [
    (
        "serin_requests_total",
        "Requests forwarded, by upstream and outcome class (success, error, or abandoned: the client left before the upstream answered)",
    ),
    (
        "serin_request_duration_seconds",
        "Time to upstream response headers",
    ),
    (
        "serin_canary_weight_ratio",
        "Share of traffic routed to the canary, 0..1",
    ),
    (
        "serin_window_error_ratio",
        "Error ratio over the judge's rolling window",
    ),
    (
        "serin_window_latency_seconds",
        "Latency quantiles over the judge's rolling window",
    ),
    (
        "serin_webhook_deliveries_total",
        "Webhook deliveries, by outcome",
    ),
    (
        "serin_rollbacks_total",
        "Canary rollbacks since start, by who did them",
    ),
    (
        "serin_phase",
        "1 for the rollout's current phase (steady, manual, shadowing, progressing, paused, promoted, rolled_back), 0 for the others",
    ),
    (
        "serin_shadow_ratio",
        "Share of stable's eligible requests copied to the canary (phase shadowing), 0..1",
    ),
    (
        "serin_shadow_requests_total",
        "Requests picked for a shadow copy: sent to the canary, or skipped (skipped_busy: over shadow.max_concurrent or the canary's max_concurrent; skipped_body: a body not copied; skipped_method: a method or upgrade not copied)",
    ),
    (
        "serin_shadow_compared_total",
        "Shadow copies whose status class was compared with stable's answer to the same request",
    ),
    (
        "serin_shadow_mismatches_total",
        "Compared shadow copies whose status class (2xx/3xx/4xx/5xx; a transport failure is 5xx) differed from stable's",
    ),
    (
        "serin_rate_limited_requests_total",
        "Requests answered 429 by the local rate limit ([rate_limit]); never sent upstream, never judged",
    ),
    (
        "serin_concurrency_limited_requests_total",
        "Requests the upstream had no place for (max_concurrent in flight): stable's were answered 503, the canary's sent to stable; never judged",
    ),
    (
        "serin_endpoint_requests_total",
        "Answers from each endpoint (address) of an upstream, and failures to connect to it",
    ),
    (
        "serin_endpoint_failures_total",
        "Of those, 5xx answers and failures to connect: what outlier detection counts",
    ),
    (
        "serin_endpoint_ejections_total",
        "Times outlier detection took the endpoint out of rotation",
    ),
    (
        "serin_endpoint_ejected",
        "1 while the endpoint is out of rotation (outlier detection), else 0",
    ),
    (
        "serin_upstream_resolve_failures_total",
        "Re-resolutions of an upstream URL's host name that failed; its previous addresses stay in use",
    ),
    (
        "serin_rate_limit_keys",
        "Client keys in the rate limit's table (at most rate_limit.max_keys; 0 without [rate_limit])",
    ),
    (
        "serin_fleet_connected",
        "1 while this fleet member follows its SerinRollout through the Kubernetes API, else 0",
    ),
    (
        "serin_fleet_leader",
        "1 while this fleet member holds the fleet's Lease, else 0",
    ),
    (
        "serin_fleet_disconnects_total",
        "Times this fleet member lost the Kubernetes API",
    ),
    (
        "serin_access_log_lines_total",
        "Access log lines written",
    ),
    (
        "serin_access_log_dropped_lines_total",
        "Access log lines dropped because the writer was behind or the sink failed (requests never wait for the log)",
    ),
    (
        "serin_trace_spans_exported_total",
        "Spans the OTLP collector accepted",
    ),
    (
        "serin_trace_spans_dropped_total",
        "Spans dropped: the export queue was full, the collector was down or refused them (requests never wait for export)",
    ),
    (
        "serin_trace_export_failures_total",
        "OTLP export requests that failed (no connection, no answer in time, or not a 2xx)",
    ),
    (
        "serin_tls_reloads_total",
        "Times changed TLS files were loaded and used by new connections, by what they serve (files: listener, stable, canary)",
    ),
    (
        "serin_tls_reload_failures_total",
        "Times changed TLS files were refused (unreadable, not PEM, or a key not for the certificate); the previous ones are still used (files: listener, stable, canary)",
    ),
];

impl Exporter {
    fn new(controller: Controller, webhooks: Arc<DeliveryStats>) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec![],
                    Default::default(),
                )
                .expect("valid metric")
            })
            .collect();
        Self {
            controller,
            webhooks,
            fleet: Arc::default(),
            descs,
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

/// The family `name` (one of [`FAMILIES`]), with its help text.
fn family(name: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let (name, help) = FAMILIES
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .expect("every family is listed in FAMILIES");
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn counter(pairs: &[(&str, &str)], value: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

impl Collector for Exporter {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = tokio::time::Instant::now();
        let stats = self.controller.stats();
        let mut requests = Vec::default();
        let mut durations = Vec::default();
        let mut error_ratio = Vec::default();
        let mut latency = Vec::default();
        let mut concurrency_limited = Vec::default();
        let mut endpoints: [Vec<Metric>; 4] = Default::default();
        let mut resolve_failures = Vec::default();
        for target in Target::ALL {
            let upstream = target.as_str();
            if let Some(set) = stats.endpoints(target) {
                resolve_failures.push(counter(&[("upstream", upstream)], set.resolve_failures()));
                for e in set.snapshot() {
                    let pairs = [("upstream", upstream), ("endpoint", e.address.as_str())];
                    endpoints[0].push(counter(&pairs, e.requests));
                    endpoints[1].push(counter(&pairs, e.failures));
                    endpoints[2].push(counter(&pairs, u64::from(e.ejections)));
                    endpoints[3].push(gauge(&pairs, if e.ejected { 1.0 } else { 0.0 }));
                }
            }
            let totals = stats.totals(target);
            requests.push(counter(
                &[("upstream", upstream), ("class", "success")],
                totals.successes,
            ));
            requests.push(counter(
                &[("upstream", upstream), ("class", "error")],
                totals.errors,
            ));
            requests.push(counter(
                &[("upstream", upstream), ("class", "abandoned")],
                totals.abandoned,
            ));
            concurrency_limited.push(counter(
                &[("upstream", upstream)],
                totals.concurrency_limited,
            ));

            let mut h = Histogram::default();
            let count = *totals.duration_cumulative.last().unwrap_or(&0);
            h.set_sample_count(count);
            h.set_sample_sum(totals.duration_sum_seconds);
            h.set_bucket(
                DURATION_BOUNDS_SECONDS
                    .iter()
                    .zip(&totals.duration_cumulative)
                    .map(|(bound, cumulative)| {
                        let mut b = Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(*cumulative);
                        b
                    })
                    .collect(),
            );
            let mut m = Metric::from_label(labels(&[("upstream", upstream)]));
            m.set_histogram(h);
            durations.push(m);

            let window = stats.window_snapshot(target, now);
            error_ratio.push(gauge(&[("upstream", upstream)], window.error_rate()));
            for (q, label) in QUANTILES {
                latency.push(gauge(
                    &[("upstream", upstream), ("quantile", label)],
                    window.quantile(q).as_secs_f64(),
                ));
            }
        }
        let table = self.controller.routes().load();
        let weight = f64::from(table.canary_weight_bp) / 10_000.0;
        let shadow_ratio = f64::from(table.shadow_bp) / 10_000.0;
        let shadow = stats.shadow_totals();
        let mut shadow_requests = vec![counter(&[("result", "sent")], shadow.sent)];
        for (why, n) in ShadowSkip::ALL.iter().zip(shadow.skipped) {
            shadow_requests.push(counter(&[("result", why.as_str())], n));
        }
        let phase = self.controller.phase();
        let phases = Phase::ALL
            .iter()
            .map(|p| gauge(&[("phase", p.as_str())], f64::from(u8::from(*p == phase))))
            .collect();
        let w = &self.webhooks;
        let deliveries = vec![
            counter(
                &[("outcome", "delivered")],
                w.delivered.load(Ordering::Relaxed),
            ),
            counter(&[("outcome", "retried")], w.retried.load(Ordering::Relaxed)),
            counter(&[("outcome", "failed")], w.failed.load(Ordering::Relaxed)),
            counter(&[("outcome", "dropped")], w.dropped.load(Ordering::Relaxed)),
        ];
        let mut families = vec![
            family("serin_requests_total", MetricType::COUNTER, requests),
            family(
                "serin_request_duration_seconds",
                MetricType::HISTOGRAM,
                durations,
            ),
            family(
                "serin_canary_weight_ratio",
                MetricType::GAUGE,
                vec![gauge(&[], weight)],
            ),
            family("serin_window_error_ratio", MetricType::GAUGE, error_ratio),
            family("serin_window_latency_seconds", MetricType::GAUGE, latency),
            family(
                "serin_webhook_deliveries_total",
                MetricType::COUNTER,
                deliveries,
            ),
            family(
                "serin_rollbacks_total",
                MetricType::COUNTER,
                [Actor::Judge, Actor::Api]
                    .into_iter()
                    .map(|a| counter(&[("actor", a.as_str())], self.controller.rollbacks_total(a)))
                    .collect(),
            ),
            family("serin_phase", MetricType::GAUGE, phases),
            family(
                "serin_shadow_ratio",
                MetricType::GAUGE,
                vec![gauge(&[], shadow_ratio)],
            ),
            family(
                "serin_shadow_requests_total",
                MetricType::COUNTER,
                shadow_requests,
            ),
            family(
                "serin_shadow_compared_total",
                MetricType::COUNTER,
                vec![counter(&[], shadow.compared)],
            ),
            family(
                "serin_shadow_mismatches_total",
                MetricType::COUNTER,
                vec![counter(&[], shadow.mismatches)],
            ),
            family(
                "serin_rate_limited_requests_total",
                MetricType::COUNTER,
                vec![counter(&[], stats.rate_limited_total())],
            ),
            family(
                "serin_concurrency_limited_requests_total",
                MetricType::COUNTER,
                concurrency_limited,
            ),
            family(
                "serin_rate_limit_keys",
                MetricType::GAUGE,
                vec![gauge(&[], stats.rate_limit_keys() as f64)],
            ),
        ];
        if !resolve_failures.is_empty() {
            let [requests, failures, ejections, ejected] = endpoints;
            families.extend([
                family(
                    "serin_endpoint_requests_total",
                    MetricType::COUNTER,
                    requests,
                ),
                family(
                    "serin_endpoint_failures_total",
                    MetricType::COUNTER,
                    failures,
                ),
                family(
                    "serin_endpoint_ejections_total",
                    MetricType::COUNTER,
                    ejections,
                ),
                family("serin_endpoint_ejected", MetricType::GAUGE, ejected),
                family(
                    "serin_upstream_resolve_failures_total",
                    MetricType::COUNTER,
                    resolve_failures,
                ),
            ]);
        }
        if let Some(log) = stats.access_log() {
            families.push(family(
                "serin_access_log_lines_total",
                MetricType::COUNTER,
                vec![counter(&[], log.written.load(Ordering::Relaxed))],
            ));
            families.push(family(
                "serin_access_log_dropped_lines_total",
                MetricType::COUNTER,
                vec![counter(&[], log.dropped.load(Ordering::Relaxed))],
            ));
        }
        // Unlabelled counters of the parts that are on.
        let mut totals = Vec::default();
        if let Some(spans) = stats.span_export() {
            totals.extend([
                ("serin_trace_spans_exported_total", &spans.spans_exported),
                ("serin_trace_spans_dropped_total", &spans.spans_dropped),
                ("serin_trace_export_failures_total", &spans.export_failures),
            ]);
        }
        for (name, value) in totals {
            families.push(family(
                name,
                MetricType::COUNTER,
                vec![counter(&[], value.load(Ordering::Relaxed))],
            ));
        }
        let tls = stats.tls_reloads();
        if !tls.is_empty() {
            let (mut reloads, mut failures) = (Vec::new(), Vec::new());
            for (files, c) in tls {
                let files = [("files", *files)];
                reloads.push(counter(&files, c.reloads.load(Ordering::Relaxed)));
                failures.push(counter(&files, c.failures.load(Ordering::Relaxed)));
            }
            families.push(family(
                "serin_tls_reloads_total",
                MetricType::COUNTER,
                reloads,
            ));
            families.push(family(
                "serin_tls_reload_failures_total",
                MetricType::COUNTER,
                failures,
            ));
        }
        if let Some(member) = self.fleet.get() {
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            families.push(family(
                "serin_fleet_connected",
                MetricType::GAUGE,
                vec![gauge(&[], flag(member.connected()))],
            ));
            families.push(family(
                "serin_fleet_leader",
                MetricType::GAUGE,
                vec![gauge(&[], flag(member.is_leader()))],
            ));
            families.push(family(
                "serin_fleet_disconnects_total",
                MetricType::COUNTER,
                vec![counter(&[], member.disconnects())],
            ));
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerConfig;
    use crate::store::StateStore;
    use crate::test_support::TempDir;
    use serin_proxy::{RouteTable, Routes, Stats};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn exposition_has_the_contract_names_and_values() {
        let tmp = TempDir::new("metrics");
        let stats = Stats::new(1, Duration::from_secs(10), tokio::time::Instant::now());
        let controller = Controller::start(
            ControllerConfig::default(),
            Routes::new(RouteTable::new(0)),
            stats.clone(),
            StateStore::new(&tmp.0),
            None,
        )
        .await
        .unwrap();
        controller.rollback().await.unwrap();
        controller.set_weight(12.5).await.unwrap();
        let metrics = Metrics::new(controller, Arc::default());
        // Lifting the latch restarted the canary's window at the next slice.
        tokio::time::advance(Duration::from_secs(1)).await;
        let canary = stats.worker(0);
        let now = tokio::time::Instant::now();
        canary
            .upstream(Target::Canary)
            .record(now, Duration::from_millis(3), true);
        canary
            .upstream(Target::Canary)
            .record(now, Duration::from_millis(30), false);
        // A client that left: counted apart, and no error in stable's window.
        canary
            .upstream(Target::Stable)
            .record_abandoned(now, Duration::from_secs(2));
        // A request refused at stable's max_concurrent: counted apart.
        canary.upstream(Target::Stable).record_concurrency_limited();
        metrics.set_rollout_step(2);
        let text = metrics.render();
        for line in [
            "serin_requests_total{upstream=\"canary\",class=\"error\"} 1",
            "serin_requests_total{upstream=\"canary\",class=\"success\"} 1",
            "serin_requests_total{upstream=\"canary\",class=\"abandoned\"} 0",
            "serin_requests_total{upstream=\"stable\",class=\"abandoned\"} 1",
            "serin_request_duration_seconds_bucket{upstream=\"canary\",le=\"0.005\"} 1",
            "serin_request_duration_seconds_bucket{upstream=\"canary\",le=\"+Inf\"} 2",
            "serin_request_duration_seconds_count{upstream=\"canary\"} 2",
            "serin_canary_weight_ratio 0.125",
            "serin_rollbacks_total{actor=\"api\"} 1",
            "serin_rollbacks_total{actor=\"judge\"} 0",
            "serin_rollout_step 2",
            "serin_window_error_ratio{upstream=\"canary\"} 0.5",
            "serin_window_error_ratio{upstream=\"stable\"} 0",
            "serin_webhook_deliveries_total{outcome=\"dropped\"} 0",
            "serin_concurrency_limited_requests_total{upstream=\"stable\"} 1",
            "serin_concurrency_limited_requests_total{upstream=\"canary\"} 0",
            "serin_requests_total{upstream=\"stable\",class=\"success\"} 0",
            "serin_requests_total{upstream=\"stable\",class=\"error\"} 0",
            "serin_rate_limited_requests_total 0",
            "serin_rate_limit_keys 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(text.contains("# TYPE serin_request_duration_seconds histogram"));
        assert!(
            text.contains("serin_window_latency_seconds{upstream=\"canary\",quantile=\"0.95\"}")
        );
    }
}
