//! Every default of the data plane's settings, in one place.
//!
//! [`crate::ProxyConfig::new`], the config file loader and the CLI's help
//! all read these constants, and a test checks that the README's example
//! config, which shows each default, parses to the same values.

use std::time::Duration;

/// `listen`: where clients connect.
pub const LISTEN: &str = "127.0.0.1:8080";
/// `workers`: worker threads, each with its own listener and pools (one,
/// as for a sidecar; use more for a standalone proxy).
pub const WORKERS: usize = 1;
/// `timeouts.response`: time allowed for an upstream's response head (→ 504).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// `timeouts.header_read`: time allowed for a client to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `timeouts.connect`: time allowed to open an upstream connection (→ 504).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `timeouts.upstream_idle`: a pooled upstream connection idle for longer is
/// closed instead of reused.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `timeouts.drain`: how long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `limits.max_header_bytes`: the largest request head accepted (→ 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// `limits.max_inflight`: requests in flight per worker before serin answers 503.
pub const MAX_INFLIGHT: usize = 10_000;
/// `limits.max_idle_per_upstream`: idle connections kept per upstream per worker.
pub const MAX_IDLE_PER_UPSTREAM: usize = 256;
/// `rate_limit.max_keys`: client keys the rate limit tracks at once (the
/// section itself is off unless set; its other defaults are in
/// [`crate::RateLimit::new`]).
pub const RATE_LIMIT_MAX_KEYS: usize = 100_000;
/// `tls.reload_interval`: how often the listener's certificate, key and
/// client CA files are read to see whether they changed.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// `stable.resolve_interval`: how often an upstream URL's host name is
/// resolved again (its addresses are its endpoints).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// `stable.outlier.consecutive_failures`: failures in a row (5xx answers,
/// or no connection) that eject an endpoint.
pub const OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
/// `stable.outlier.base_ejection`: a first ejection's length; the n-th is n
/// times as long.
pub const OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(30);
/// `stable.outlier.max_ejection`: the longest an ejection lasts.
pub const OUTLIER_MAX_EJECTION: Duration = Duration::from_secs(300);
/// `stable.outlier.max_ejection_percent`: the most endpoints out at once (one
/// always may be, of two or more; the last never is).
pub const OUTLIER_MAX_EJECTION_PERCENT: u8 = 50;
/// `split.canary_fallback`: replay a failed bodiless GET/HEAD/OPTIONS from
/// the canary on stable (the judge still sees the canary's failure).
pub const CANARY_FALLBACK: bool = true;
/// `split.sticky_identity`: the verified client certificate's identity is
/// the sticky key (off; it needs `tls.client_ca`).
pub const STICKY_IDENTITY: bool = false;
/// `shadow.max_concurrent`: copies to the canary in flight, all workers
/// together (phase `shadowing`); over it a copy is skipped and counted.
pub const SHADOW_MAX_CONCURRENT: usize = 64;
/// `shadow.max_body_bytes`: the largest request body copied to the canary;
/// 0 copies only bodiless GET, HEAD, OPTIONS and TRACE requests.
pub const SHADOW_MAX_BODY_BYTES: u64 = 0;
/// `headers.rewrite_host`: replace the client's `Host` with the upstream's
/// (off: the client's `Host` is kept, as NGINX ingress does).
pub const REWRITE_HOST: bool = false;
/// `headers.via`: add `Via: 1.1 serin` to requests (off, as in NGINX and
/// Envoy; RFC 9110 §7.6.3 asks a gateway for it, see the README).
pub const VIA: bool = false;
/// `headers.upstream_header`: tell the client which upstream answered, in
/// `x-serin-upstream`.
pub const UPSTREAM_HEADER: bool = true;
/// `classify.error_statuses`: the HTTP statuses that count as errors, as
/// inclusive ranges (every 5xx, serin's own 502/503/504 included).
pub const ERROR_STATUSES: &[(u16, u16)] = &[(500, 599)];
/// `classify.grpc_error_codes`: the gRPC statuses that count as errors
/// (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE).
pub const GRPC_ERROR_CODES: &[u8] = &[2, 4, 13, 14];
/// `judge.window`: the length of the rolling stats window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// `trace.start`: start a W3C trace for a request without a valid
/// `traceparent` (off: a trace is only kept, never made up).
pub const TRACE_START: bool = false;
/// `trace.sample`: the share of the traces serin starts that are marked sampled.
pub const TRACE_SAMPLE: f64 = 1.0;
/// `access_log.sample`: the share of requests that were not errors that is logged.
pub const ACCESS_LOG_SAMPLE: f64 = 1.0;
/// `trace.otlp_endpoint`'s example: the collector's OTLP/HTTP traces URL
/// (the OpenTelemetry Collector's own default). Spans are exported only
/// when an endpoint is set.
pub const OTLP_ENDPOINT: &str = "http://127.0.0.1:4318/v1/traces";
/// `trace.service_name`: the resource's `service.name`.
pub const OTLP_SERVICE_NAME: &str = "serin";
/// The time allowed for one export, connect to answer (the OpenTelemetry
/// SDKs' default), and for the final export at shutdown.
pub const OTLP_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches waiting for the exporter before workers drop spans instead of
/// queueing them.
pub const OTLP_MAX_QUEUED_BATCHES: usize = 64;
