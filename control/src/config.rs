//! Configuration: a TOML file, `SERIN_*` environment variables and flags,
//! parsed once into a validated, typed [`Config`].
//!
//! Precedence is flags > environment > file > defaults (clap resolves the
//! first two; [`Config::load`] lays them over the file). `serin check` and
//! `serin run` share [`Config::load`], so a config that checks is a config
//! that runs, and every error names the key at fault and says how to fix it.
//! Nothing is bound or started here.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::defaults;
use crate::judge::JudgePolicy;
use crate::rollout::{basis_points, parse_hold, shadow_basis_points, validate_steps};
use serin_proxy::access_log::{AccessLogConfig, LineFormat, LogSink, QueryPolicy};
use serin_proxy::trace::{SpanExport, TraceSettings};
use serin_proxy::{
    Classifier, ClientAuth, ClientAuthMode, HeaderPolicy, OutlierSettings, PoolSettings,
    ProxyConfig, Rate, RateLimit, RateLimitKey, ShadowSettings, SplitRules, StickyKey, Target,
    TlsFiles, Upstream, UpstreamProtocol, UpstreamTls,
};

/// A configuration problem, with the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is present but wrong.
    #[error("`{key}` {message}")]
    Invalid { key: &'static str, message: String },
    /// A judge or rollout setting the control plane refused (the text names the key).
    #[error("{0}")]
    Policy(String),
    /// A file the config names (`[tls] cert`, `key` or `client_ca`) is
    /// unreadable or wrong (the text names the file).
    #[error("`tls`: {0}")]
    Tls(#[from] serin_proxy::tls::TlsError),
    /// A file an `https://` upstream's TLS settings name is unreadable or
    /// wrong, or its server name is not one (the text names the file).
    #[error("`{key}`: {source}")]
    UpstreamTls {
        key: &'static str,
        source: serin_proxy::tls::TlsError,
    },
    /// A required value is missing.
    #[error("`{key}` is required: {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            message: message.into(),
        }
    }
}

// === raw (as written) ===

/// The file as written. Every field is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub admin: Option<String>,
    pub admin_token: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub canary_weight: Option<f64>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    #[serde(default)]
    pub stable: RawUpstream,
    #[serde(default)]
    pub canary: RawUpstream,
    #[serde(default)]
    pub split: RawSplit,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub headers: RawHeaders,
    pub tls: Option<RawTls>,
    pub access_log: Option<RawAccessLog>,
    #[serde(default)]
    pub trace: RawTrace,
    #[serde(default)]
    pub classify: RawClassify,
    #[serde(default)]
    pub judge: RawJudge,
    #[serde(default)]
    pub rollout: RawRollout,
    #[serde(default)]
    pub shadow: RawShadow,
    #[serde(default)]
    pub webhook: Vec<RawWebhook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<RawUrls>,
    pub protocol: Option<String>,
    pub max_concurrent: Option<usize>,
    pub resolve_interval: Option<String>,
    pub tls: Option<RawUpstreamTls>,
    pub outlier: Option<RawOutlier>,
}

/// `url = "…"`, or `url = ["…", "…"]` for several endpoints.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawUrls {
    One(String),
    Many(Vec<String>),
}

impl RawUrls {
    /// The URLs as one comma-separated list (the flag's and env's form).
    fn joined(&self) -> String {
        match self {
            RawUrls::One(url) => url.clone(),
            RawUrls::Many(urls) => urls.join(","),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub max_ejection_percent: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    pub override_header: Option<String>,
    pub override_cookie: Option<String>,
    pub sticky_cookie: Option<String>,
    pub sticky_header: Option<String>,
    pub sticky_identity: Option<bool>,
    pub canary_fallback: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<String>,
    pub response: Option<String>,
    pub header_read: Option<String>,
    pub upstream_idle: Option<String>,
    pub drain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<usize>,
    pub max_inflight: Option<usize>,
    pub max_idle_per_upstream: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u64>,
    pub key: Option<String>,
    pub max_keys: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    pub rewrite_host: Option<bool>,
    pub via: Option<bool>,
    pub upstream_header: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub reload_interval: Option<String>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: Option<String>,
    pub identity_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub path: Option<String>,
    pub format: Option<String>,
    pub sample: Option<f64>,
    pub errors_only: Option<bool>,
    pub query: Option<String>,
    pub redact_params: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrace {
    pub start: Option<bool>,
    pub sample: Option<f64>,
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub query: Option<String>,
    pub redact_params: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassify {
    pub error_statuses: Option<Vec<toml::Value>>,
    pub grpc_error_codes: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJudge {
    pub window: Option<String>,
    pub interval: Option<String>,
    pub min_requests: Option<u64>,
    pub max_error_rate: Option<f64>,
    pub max_p95: Option<String>,
    pub alpha: Option<f64>,
    pub alpha_per_hour: Option<f64>,
    pub min_latency_shift: Option<f64>,
    /// The window judge's key before the sequential one: read as
    /// `min_latency_shift`.
    pub max_p95_ratio: Option<f64>,
    /// The window judge's key before the sequential one: refused, with what
    /// to write instead.
    pub confidence: Option<f64>,
    pub min_error_rate_difference: Option<f64>,
    pub max_consecutive_errors: Option<u32>,
    pub max_shadow_mismatch_rate: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub steps: Option<Vec<f64>>,
    pub hold: Option<String>,
    pub min_requests_per_step: Option<u64>,
    pub shadow: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    pub percent: Option<f64>,
    pub max_concurrent: Option<usize>,
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    pub secret: Option<String>,
    pub events: Option<Vec<String>>,
}

/// Values given on the command line or in the environment; they override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub stable: Option<String>,
    pub canary: Option<String>,
    pub canary_weight: Option<f64>,
    pub admin: Option<String>,
    pub admin_token: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub max_error_rate: Option<f64>,
    pub max_p95: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--access-log`: `stdout` or a file; turns the access log on.
    pub access_log: Option<String>,
    /// `--fleet NAMESPACE/NAME`.
    pub fleet: Option<String>,
    /// `--fleet-member`.
    pub fleet_member: Option<String>,
    /// `--fleet-report-interval`.
    pub fleet_report_interval: Option<String>,
    /// `--fleet-lease-duration`.
    pub fleet_lease_duration: Option<String>,
}

// === typed (validated) ===

/// How serin writes its own log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Text on a terminal (with colours), JSON lines otherwise.
    Auto,
    /// Text, with colours only on a terminal.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), and the span, for Loki, Fluent Bit or CloudWatch.
    Json,
}

/// `[access_log]`, validated; `None` when it is off. `--access-log` turns
/// it on, or names another sink.
fn access_log(
    raw: Option<RawAccessLog>,
    sink: Option<&str>,
) -> Result<Option<AccessLogConfig>, ConfigError> {
    let raw = match (raw, sink) {
        (None, None) => return Ok(None),
        (raw, _) => raw.unwrap_or_default(),
    };
    let sink = match sink.or(raw.path.as_deref()).unwrap_or("stdout") {
        "" => {
            return Err(ConfigError::invalid(
                "access_log.path",
                "is empty; give a file path, or \"stdout\"",
            ))
        }
        "stdout" | "-" => LogSink::Stdout,
        path => LogSink::File(PathBuf::from(path)),
    };
    let format = match raw.format.as_deref().unwrap_or("json") {
        "json" => LineFormat::Json,
        "text" => LineFormat::Text,
        other => {
            return Err(ConfigError::invalid(
                "access_log.format",
                format!("must be \"json\" or \"text\" (got {other:?})"),
            ))
        }
    };
    let sample = raw
        .sample
        .unwrap_or(serin_proxy::defaults::ACCESS_LOG_SAMPLE);
    if !(0.0..=1.0).contains(&sample) {
        return Err(ConfigError::invalid(
            "access_log.sample",
            format!("must be between 0 and 1, the share of requests logged (got {sample})"),
        ));
    }
    let query = query_policy(
        ("access_log.query", "access_log.redact_params"),
        raw.query.as_deref(),
        raw.redact_params,
        "keep",
    )?;
    Ok(Some(AccessLogConfig {
        sink,
        format,
        sample,
        errors_only: raw.errors_only.unwrap_or(false),
        query,
    }))
}

/// `[trace]`, validated: the data plane's settings, and the span export.
fn trace_settings(raw: &RawTrace) -> Result<TraceSettings, ConfigError> {
    let sample = raw.sample.unwrap_or(serin_proxy::defaults::TRACE_SAMPLE);
    if !(0.0..=1.0).contains(&sample) {
        return Err(ConfigError::invalid(
            "trace.sample",
            format!("must be between 0 and 1, the share of started traces marked sampled (got {sample})"),
        ));
    }
    let export = match raw.otlp_endpoint.as_deref() {
        None => None,
        Some(endpoint) => {
            let uri: http::Uri = endpoint.parse().map_err(|_| {
                ConfigError::invalid(
                    "trace.otlp_endpoint",
                    format!("is not a URL (got {endpoint:?}); use e.g. \"http://127.0.0.1:4318/v1/traces\""),
                )
            })?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(ConfigError::invalid(
                    "trace.otlp_endpoint",
                    format!("must be an http:// URL with a host (got {endpoint:?}); https is not supported yet, so send to a local collector or agent"),
                ));
            }
            Some(SpanExport {
                endpoint: endpoint.to_owned(),
                service_name: raw
                    .service_name
                    .clone()
                    .unwrap_or_else(|| "serin".to_owned()),
            })
        }
    };
    if raw.service_name.is_some() && export.is_none() {
        return Err(ConfigError::invalid(
            "trace.service_name",
            "only applies when trace.otlp_endpoint is set",
        ));
    }
    let query = query_policy(
        ("trace.query", "trace.redact_params"),
        raw.query.as_deref(),
        raw.redact_params.clone(),
        "redact",
    )?;
    Ok(TraceSettings {
        start: raw.start.unwrap_or(serin_proxy::defaults::TRACE_START),
        sample,
        export,
        query,
    })
}

/// A `query` / `redact_params` pair: what of a request's query is kept.
/// Naming parameters implies `redact`; `default` applies otherwise.
fn query_policy(
    keys: (&'static str, &'static str),
    query: Option<&str>,
    redact_params: Option<Vec<String>>,
    default: &str,
) -> Result<QueryPolicy, ConfigError> {
    let (query_key, params_key) = keys;
    let names = redact_params.unwrap_or_default();
    let chosen = query.unwrap_or(if names.is_empty() { default } else { "redact" });
    match chosen {
        "keep" | "drop" if !names.is_empty() => Err(ConfigError::invalid(
            params_key,
            "only applies with query = \"redact\"; remove it, or set query = \"redact\"",
        )),
        "keep" => Ok(QueryPolicy::Keep),
        "drop" => Ok(QueryPolicy::Drop),
        "redact" => Ok(QueryPolicy::Redact(names)),
        other => Err(ConfigError::invalid(
            query_key,
            format!("must be \"keep\", \"drop\" or \"redact\" (got {other:?})"),
        )),
    }
}

fn log_format(value: Option<&str>) -> Result<LogFormat, ConfigError> {
    match value.unwrap_or(defaults::LOG_FORMAT) {
        "auto" => Ok(LogFormat::Auto),
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(ConfigError::invalid(
            "log_format",
            format!("must be \"auto\", \"text\" or \"json\" (got {other:?})"),
        )),
    }
}

/// Fleet membership (`serin run --fleet`), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// The fleet's `SerinRollout`.
    pub target: crate::fleet::FleetRef,
    /// This member's name: `--fleet-member`, else the host name (a pod's name).
    pub member: String,
    /// How often the member reports its windows (default 10s).
    pub report_interval: Duration,
    /// The fleet Lease's duration (default 15s).
    pub lease_duration: Duration,
}

fn fleet_settings(o: &Overrides) -> Result<Option<FleetSettings>, ConfigError> {
    let Some(target) = &o.fleet else {
        return Ok(None);
    };
    let target = target
        .parse()
        .map_err(|e: String| ConfigError::invalid("fleet", e))?;
    let member = o
        .fleet_member
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("serin-{}", std::process::id()));
    let report_interval = duration_or(
        "fleet_report_interval",
        o.fleet_report_interval.as_deref(),
        defaults::FLEET_REPORT_INTERVAL,
    )?;
    let lease_duration = duration_or(
        "fleet_lease_duration",
        o.fleet_lease_duration.as_deref(),
        defaults::FLEET_LEASE_DURATION,
    )?;
    if report_interval < Duration::from_millis(100) {
        return Err(ConfigError::invalid(
            "fleet_report_interval",
            "must be at least 100ms",
        ));
    }
    if lease_duration < Duration::from_secs(1) {
        return Err(ConfigError::invalid(
            "fleet_lease_duration",
            "must be at least 1s",
        ));
    }
    Ok(Some(FleetSettings {
        target,
        member,
        report_interval,
        lease_duration,
    }))
}

/// The judge, validated: its policy (README.md, "The judge") and how often it looks.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeSettings {
    /// What counts as a breach; defaults in [`JudgePolicy::default`].
    pub policy: JudgePolicy,
    /// How often the judge looks (default [`defaults::JUDGE_INTERVAL`]).
    pub interval: Duration,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        Self {
            policy: JudgePolicy::default(),
            interval: defaults::JUDGE_INTERVAL,
        }
    }
}

/// Progressive rollout defaults, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutSettings {
    /// Canary weights in percent, strictly increasing, ending at 100
    /// (default [`defaults::ROLLOUT_STEPS`]).
    pub steps: Vec<f64>,
    /// Minimum time on each step (default [`defaults::ROLLOUT_HOLD`]).
    pub hold: Duration,
    /// Canary requests each step must serve before advancing (default
    /// [`defaults::MIN_REQUESTS_PER_STEP`]).
    pub min_requests_per_step: u64,
    /// `rollout.shadow`: the hold of a shadow step (phase `shadowing`)
    /// before the first weight step (default none: no shadow step).
    pub shadow: Option<Duration>,
    /// `shadow.percent`: share of stable's eligible requests copied to the
    /// canary when shadowing, in percent (default [`defaults::SHADOW_PERCENT`]).
    pub shadow_percent: f64,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            steps: defaults::ROLLOUT_STEPS.to_vec(),
            hold: defaults::ROLLOUT_HOLD,
            min_requests_per_step: defaults::MIN_REQUESTS_PER_STEP,
            shadow: None,
            shadow_percent: defaults::SHADOW_PERCENT,
        }
    }
}

/// One webhook receiver.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookSettings {
    /// Where events are POSTed (http:// or https://).
    pub url: String,
    /// HMAC-SHA256 key for `X-Serin-Signature` (default none: unsigned).
    pub secret: Option<String>,
    /// Events sent (default all of [`WEBHOOK_EVENTS`]).
    pub events: Vec<String>,
}

/// The control API's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminSettings {
    /// Listen address (default [`defaults::ADMIN`]).
    pub listen: SocketAddr,
    /// Bearer token for mutating calls (default none; required off loopback).
    pub token: Option<String>,
}

/// The whole validated configuration of `serin run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// The data plane.
    pub proxy: ProxyConfig,
    /// Starting canary weight in basis points, used when no state is saved
    /// (default [`defaults::CANARY_WEIGHT`] percent).
    pub canary_weight_bp: u16,
    /// The control API.
    pub admin: AdminSettings,
    /// Where state is persisted (default [`defaults::STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Log filter, tracing syntax (default [`defaults::LOG`]).
    pub log: String,
    /// How serin's own log lines are written (default [`defaults::LOG_FORMAT`]).
    pub log_format: LogFormat,
    /// The judge.
    pub judge: JudgeSettings,
    /// Rollout defaults.
    pub rollout: RolloutSettings,
    /// Webhook receivers (default none).
    pub webhooks: Vec<WebhookSettings>,
    /// Fleet membership (`--fleet`; default none: a fleet of one).
    pub fleet: Option<FleetSettings>,
}

/// The event names a webhook may subscribe to.
pub const WEBHOOK_EVENTS: [&str; 6] = [
    "rollback",
    "promoted",
    "step",
    "paused",
    "judge_blocked",
    "shadowing",
];

impl Config {
    /// Reads the files the config names, as the data plane will when it
    /// starts: the `[tls]` certificate and key must be a valid pair,
    /// `client_ca` a bundle of CAs, and an `https://` upstream's CA, client
    /// certificate and key must load (`serin check`; `serin run` fails the
    /// same way when it starts).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(files) = &self.proxy.tls {
            serin_proxy::tls::check(files)?;
        }
        for (key, upstream) in [
            ("stable.tls", &self.proxy.stable),
            ("canary.tls", &self.proxy.canary),
        ] {
            upstream
                .check_tls()
                .map_err(|source| ConfigError::UpstreamTls { key, source })?;
        }
        Ok(())
    }

    /// Reads `file` (if any), lays `overrides` over it and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse_toml(&text, path)?
            }
            None => RawConfig::default(),
        };
        Self::from_raw(raw, overrides)
    }

    /// Parses TOML text (used by `load`, and by `demo` for its embedded config).
    pub fn parse_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Validates a raw config with overrides applied.
    pub fn from_raw(raw: RawConfig, o: &Overrides) -> Result<Self, ConfigError> {
        let listen = parse_addr(
            "listen",
            o.listen
                .as_deref()
                .or(raw.listen.as_deref())
                .unwrap_or(defaults::LISTEN),
        )?;
        let workers = o.workers.or(raw.workers).unwrap_or(defaults::WORKERS);
        if workers == 0 || workers > 256 {
            return Err(ConfigError::invalid(
                "workers",
                format!("must be between 1 and 256 (got {workers})"),
            ));
        }
        let stable = upstream(&STABLE_KEYS, &raw.stable, o.stable.as_deref())?;
        let canary = upstream(&CANARY_KEYS, &raw.canary, o.canary.as_deref())?;
        let weight = o
            .canary_weight
            .or(raw.canary_weight)
            .unwrap_or(defaults::CANARY_WEIGHT);
        let canary_weight_bp = percent_to_bp("canary_weight", weight)?;

        let tls = tls_settings(raw.tls)?;
        let split = split_rules(&raw.split, tls.client_auth)?;
        let classifier = classifier(&raw.classify)?;
        let t = &raw.timeouts;
        let pool = PoolSettings {
            connect_timeout: duration_or(
                "timeouts.connect",
                t.connect.as_deref(),
                defaults::CONNECT_TIMEOUT,
            )?,
            idle_timeout: duration_or(
                "timeouts.upstream_idle",
                t.upstream_idle.as_deref(),
                defaults::UPSTREAM_IDLE_TIMEOUT,
            )?,
            max_idle: raw
                .limits
                .max_idle_per_upstream
                .unwrap_or(defaults::MAX_IDLE_PER_UPSTREAM),
        };
        let max_header_bytes = raw
            .limits
            .max_header_bytes
            .unwrap_or(defaults::MAX_HEADER_BYTES);
        if !(8 * 1024..=1024 * 1024).contains(&max_header_bytes) {
            return Err(ConfigError::invalid(
                "limits.max_header_bytes",
                format!("must be between 8192 and 1048576 (got {max_header_bytes})"),
            ));
        }
        let max_inflight = raw.limits.max_inflight.unwrap_or(defaults::MAX_INFLIGHT);
        if max_inflight == 0 {
            return Err(ConfigError::invalid(
                "limits.max_inflight",
                "must be at least 1 (got 0)",
            ));
        }
        let judge = judge_settings(&raw.judge, o)?;
        let rollout = rollout_settings(&raw.rollout, &raw.shadow)?;
        let shadow = shadow_settings(&raw.shadow)?;
        let access_log = access_log(raw.access_log, o.access_log.as_deref())?;
        let trace = trace_settings(&raw.trace)?;

        let proxy = ProxyConfig {
            workers,
            split,
            classifier,
            pool,
            response_timeout: duration_or(
                "timeouts.response",
                t.response.as_deref(),
                defaults::RESPONSE_TIMEOUT,
            )?,
            header_read_timeout: duration_or(
                "timeouts.header_read",
                t.header_read.as_deref(),
                defaults::HEADER_READ_TIMEOUT,
            )?,
            max_header_bytes,
            max_inflight,
            max_concurrent: [
                max_concurrent(Target::Stable, raw.stable.max_concurrent)?,
                max_concurrent(Target::Canary, raw.canary.max_concurrent)?,
            ],
            rate_limit: raw
                .rate_limit
                .as_ref()
                .map(|raw| rate_limit(raw, tls.client_auth))
                .transpose()?,
            drain_timeout: duration_or(
                "timeouts.drain",
                t.drain.as_deref(),
                defaults::DRAIN_TIMEOUT,
            )?,
            canary_fallback: raw
                .split
                .canary_fallback
                .unwrap_or(defaults::CANARY_FALLBACK),
            headers: HeaderPolicy {
                rewrite_host: raw.headers.rewrite_host.unwrap_or(defaults::REWRITE_HOST),
                via: raw.headers.via.unwrap_or(defaults::VIA),
                upstream_header: raw
                    .headers
                    .upstream_header
                    .unwrap_or(defaults::UPSTREAM_HEADER),
                identity_header: tls.identity_header,
            },
            tls: tls.files,
            tls_reload_interval: tls.reload_interval,
            window: judge.policy.window,
            access_log,
            trace,
            shadow,
            ..ProxyConfig::new(listen, stable, canary)
        };

        let admin_listen = parse_addr(
            "admin",
            o.admin
                .as_deref()
                .or(raw.admin.as_deref())
                .unwrap_or(defaults::ADMIN),
        )?;
        let token = o
            .admin_token
            .clone()
            .or(raw.admin_token)
            .filter(|t| !t.is_empty());
        if !admin_listen.ip().is_loopback() && token.is_none() {
            return Err(ConfigError::invalid(
                "admin",
                format!(
                    "is {admin_listen}, which is reachable from other hosts, but no admin token is set; \
                     set --admin-token (or SERIN_ADMIN_TOKEN) or listen on 127.0.0.1"
                ),
            ));
        }
        let webhooks = raw
            .webhook
            .into_iter()
            .map(webhook_settings)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            proxy,
            canary_weight_bp,
            admin: AdminSettings {
                listen: admin_listen,
                token,
            },
            state_dir: o
                .state_dir
                .clone()
                .or(raw.state_dir)
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            log: raw.log.unwrap_or_else(|| defaults::LOG.to_string()),
            log_format: log_format(o.log_format.as_deref().or(raw.log_format.as_deref()))?,
            judge,
            rollout,
            webhooks,
            fleet: fleet_settings(o)?,
        })
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("must be an IP address and port such as 127.0.0.1:8080 (got {value:?})"),
        )
    })
}

/// The config keys of one upstream's section, for error messages.
struct UpstreamKeys {
    url: &'static str,
    protocol: &'static str,
    resolve_interval: &'static str,
    tls: &'static str,
    server_name: &'static str,
    cert: &'static str,
    consecutive_failures: &'static str,
    base_ejection: &'static str,
    max_ejection: &'static str,
    max_ejection_percent: &'static str,
}

const STABLE_KEYS: UpstreamKeys = UpstreamKeys {
    url: "stable.url",
    protocol: "stable.protocol",
    resolve_interval: "stable.resolve_interval",
    tls: "stable.tls",
    server_name: "stable.tls.server_name",
    cert: "stable.tls.cert",
    consecutive_failures: "stable.outlier.consecutive_failures",
    base_ejection: "stable.outlier.base_ejection",
    max_ejection: "stable.outlier.max_ejection",
    max_ejection_percent: "stable.outlier.max_ejection_percent",
};

const CANARY_KEYS: UpstreamKeys = UpstreamKeys {
    url: "canary.url",
    protocol: "canary.protocol",
    resolve_interval: "canary.resolve_interval",
    tls: "canary.tls",
    server_name: "canary.tls.server_name",
    cert: "canary.tls.cert",
    consecutive_failures: "canary.outlier.consecutive_failures",
    base_ejection: "canary.outlier.base_ejection",
    max_ejection: "canary.outlier.max_ejection",
    max_ejection_percent: "canary.outlier.max_ejection_percent",
};

/// One upstream from its section, with the URL from a flag or env if given.
fn upstream(
    keys: &UpstreamKeys,
    raw: &RawUpstream,
    url: Option<&str>,
) -> Result<Upstream, ConfigError> {
    let from_file = raw.url.as_ref().map(RawUrls::joined);
    let url = url.or(from_file.as_deref()).ok_or(ConfigError::Missing {
        key: keys.url,
        hint: "give the upstream's URL, e.g. --stable http://127.0.0.1:8081 --canary http://127.0.0.1:8082",
    })?;
    let protocol = match raw.protocol.as_deref() {
        None => UpstreamProtocol::default(),
        Some("http1") => UpstreamProtocol::Http1,
        Some("http2" | "h2c") => UpstreamProtocol::Http2,
        Some("auto") => UpstreamProtocol::Auto,
        Some(other) => {
            return Err(ConfigError::invalid(
                keys.protocol,
                format!(
                    "must be \"http1\", \"http2\" or, for https://, \"auto\" (got {other:?}); use http2 for gRPC upstreams"
                ),
            ))
        }
    };
    let mut upstream = Upstream::parse(url, protocol)
        .map_err(|e| ConfigError::invalid(keys.url, e.to_string()))?;
    upstream.resolve_interval = duration_or(
        keys.resolve_interval,
        raw.resolve_interval.as_deref(),
        serin_proxy::defaults::RESOLVE_INTERVAL,
    )?;
    if let Some(outlier) = &raw.outlier {
        upstream.outlier = outlier_settings(keys, outlier)?;
    }
    if let Some(tls) = &raw.tls {
        let Some(settings) = upstream.tls.as_mut() else {
            return Err(ConfigError::invalid(
                keys.tls,
                format!("is set, but {url} is not https://; write https:// to speak TLS to it"),
            ));
        };
        if tls.server_name.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                keys.server_name,
                "must not be empty; leave it out to use the URL's host",
            ));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConfigError::invalid(
                keys.cert,
                "and `key` go together: a client certificate is a PEM chain and its key; set both, or neither",
            ));
        }
        *settings = UpstreamTls {
            server_name: tls.server_name.clone(),
            ca: tls.ca.clone(),
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        };
    }
    Ok(upstream)
}

/// `[stable.outlier]` or `[canary.outlier]`.
fn outlier_settings(keys: &UpstreamKeys, raw: &RawOutlier) -> Result<OutlierSettings, ConfigError> {
    let defaults = OutlierSettings::default();
    let consecutive_failures = raw
        .consecutive_failures
        .unwrap_or(defaults.consecutive_failures);
    if consecutive_failures == 0 {
        return Err(ConfigError::invalid(
            keys.consecutive_failures,
            "must be at least 1 (to never eject, set max_ejection_percent = 0)",
        ));
    }
    let max_ejection_percent = raw
        .max_ejection_percent
        .unwrap_or(defaults.max_ejection_percent);
    if max_ejection_percent > 100 {
        return Err(ConfigError::invalid(
            keys.max_ejection_percent,
            format!("must be between 0 and 100 (got {max_ejection_percent})"),
        ));
    }
    let base_ejection = duration_or(
        keys.base_ejection,
        raw.base_ejection.as_deref(),
        defaults.base_ejection,
    )?;
    let max_ejection = duration_or(
        keys.max_ejection,
        raw.max_ejection.as_deref(),
        defaults.max_ejection,
    )?;
    if max_ejection < base_ejection {
        return Err(ConfigError::invalid(
            keys.max_ejection,
            format!("must be at least base_ejection ({base_ejection:?})"),
        ));
    }
    Ok(OutlierSettings {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejection_percent,
    })
}

/// Percent (0..=100, e.g. 12.5) to basis points.
fn percent_to_bp(key: &'static str, pct: f64) -> Result<u16, ConfigError> {
    basis_points(pct).ok_or_else(|| {
        ConfigError::invalid(
            key,
            format!("must be a percentage between 0 and 100 (got {pct}); write 12.5 for 12.5%"),
        )
    })
}

fn duration_or(
    key: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match parse_hold(v) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(ConfigError::invalid(
                key,
                format!(
                    "must be a positive duration such as \"500ms\", \"10s\" or \"2m\" (got {v:?})"
                ),
            )),
        },
    }
}

/// `stable.max_concurrent` or `canary.max_concurrent`.
fn max_concurrent(
    target: Target,
    value: Option<usize>,
) -> Result<Option<NonZeroUsize>, ConfigError> {
    let key = match target {
        Target::Stable => "stable.max_concurrent",
        Target::Canary => "canary.max_concurrent",
    };
    match value {
        None => Ok(None),
        Some(n) => NonZeroUsize::new(n).map(Some).ok_or_else(|| {
            ConfigError::invalid(key, "must be at least 1 (got 0); leave it out for no limit")
        }),
    }
}

/// `[tls]`, validated: what the data plane gets of it.
struct TlsSettings {
    files: Option<TlsFiles>,
    reload_interval: Duration,
    identity_header: Option<http::HeaderName>,
    /// `client_ca` is set: connections may carry a verified identity.
    client_auth: bool,
}

fn tls_settings(raw: Option<RawTls>) -> Result<TlsSettings, ConfigError> {
    let reload_interval = duration_or(
        "tls.reload_interval",
        raw.as_ref().and_then(|t| t.reload_interval.as_deref()),
        serin_proxy::defaults::TLS_RELOAD_INTERVAL,
    )?;
    let Some(raw) = raw else {
        return Ok(TlsSettings {
            files: None,
            reload_interval,
            identity_header: None,
            client_auth: false,
        });
    };
    let mode = match raw.client_auth.as_deref() {
        None | Some("required") => ClientAuthMode::Required,
        Some("optional") => ClientAuthMode::Optional,
        Some(other) => {
            return Err(ConfigError::invalid(
                "tls.client_auth",
                format!("must be \"required\" or \"optional\" (got {other:?})"),
            ))
        }
    };
    let client_auth = match (raw.client_ca, &raw.client_auth) {
        (Some(ca), _) => Some(ClientAuth { ca, mode }),
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "tls.client_auth",
                "is set without tls.client_ca; set client_ca to the PEM bundle of the CAs \
                 that issue client certificates, or remove client_auth",
            ))
        }
        (None, None) => None,
    };
    let identity_header = match &raw.identity_header {
        None => None,
        Some(_) if client_auth.is_none() => {
            return Err(ConfigError::invalid(
                "tls.identity_header",
                "needs tls.client_ca: the identity comes from a verified client certificate",
            ))
        }
        Some(name) => Some(
            http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .filter(|h| !HeaderPolicy::is_reserved(h))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "tls.identity_header",
                        format!(
                            "must be a valid header name that serin does not set itself \
                             (got {name:?}), e.g. \"x-client-identity\""
                        ),
                    )
                })?,
        ),
    };
    Ok(TlsSettings {
        reload_interval,
        identity_header,
        client_auth: client_auth.is_some(),
        files: Some(TlsFiles {
            cert: raw.cert,
            key: raw.key,
            client_auth,
        }),
    })
}

/// The most keys `rate_limit.max_keys` may ask for (about 100 bytes each).
const MAX_RATE_LIMIT_KEYS: usize = 10_000_000;

/// `[rate_limit]`; `client_auth`: `[tls] client_ca` is set.
fn rate_limit(raw: &RawRateLimit, client_auth: bool) -> Result<RateLimit, ConfigError> {
    let per_second = raw.requests_per_second.ok_or(ConfigError::Missing {
        key: "rate_limit.requests_per_second",
        hint: "set each client key's refill rate, e.g. requests_per_second = 100, \
               or remove [rate_limit] for no rate limit",
    })?;
    let rate = Rate::per_second(per_second).ok_or_else(|| {
        ConfigError::invalid(
            "rate_limit.requests_per_second",
            format!(
                "must be between 0.001 and {} (got {per_second}); write 0.5 for one request \
                 every 2 s, or remove [rate_limit] for no rate limit",
                Rate::MAX_PER_SECOND
            ),
        )
    })?;
    let mut limit = RateLimit::new(rate);
    if let Some(burst) = raw.burst {
        limit.burst = u32::try_from(burst)
            .ok()
            .filter(|&b| b <= RateLimit::MAX_BURST)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "rate_limit.burst",
                    format!(
                        "must be between 1 and {} (got {burst}); it is how many requests a \
                         client key may send at once",
                        RateLimit::MAX_BURST
                    ),
                )
            })?;
    }
    if let Some(key) = &raw.key {
        limit.key = rate_limit_key(key, client_auth)?;
    }
    if let Some(max_keys) = raw.max_keys {
        limit.max_keys = NonZeroUsize::new(max_keys)
            .filter(|n| n.get() <= MAX_RATE_LIMIT_KEYS)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "rate_limit.max_keys",
                    format!(
                        "must be between 1 and {MAX_RATE_LIMIT_KEYS} (got {max_keys}); each key \
                         tracked takes about 100 bytes"
                    ),
                )
            })?;
    }
    Ok(limit)
}

/// `client_ip`, `header:NAME`, `cookie:NAME` or `identity`.
fn rate_limit_key(key: &str, client_auth: bool) -> Result<RateLimitKey, ConfigError> {
    const KEY: &str = "rate_limit.key";
    if key == "client_ip" {
        return Ok(RateLimitKey::ClientIp);
    }
    if key == "identity" {
        return if client_auth {
            Ok(RateLimitKey::Identity)
        } else {
            Err(ConfigError::invalid(
                KEY,
                "is \"identity\", which needs tls.client_ca: the identity comes from a \
                 verified client certificate",
            ))
        };
    }
    if let Some(name) = key.strip_prefix("header:") {
        return http::HeaderName::from_bytes(name.as_bytes())
            .map(RateLimitKey::Header)
            .map_err(|_| {
                ConfigError::invalid(KEY, format!("has an invalid header name (got {key:?})"))
            });
    }
    if let Some(name) = key.strip_prefix("cookie:") {
        return cookie_name(KEY, name).map(RateLimitKey::Cookie);
    }
    Err(ConfigError::invalid(
        KEY,
        format!(
            "must be \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"identity\" \
             (got {key:?}), e.g. \"header:x-api-key\""
        ),
    ))
}

/// `[split]`; `client_auth`: `[tls] client_ca` is set.
fn split_rules(raw: &RawSplit, client_auth: bool) -> Result<SplitRules, ConfigError> {
    let mut rules = SplitRules::default();
    if let Some(h) = &raw.override_header {
        rules.override_header = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            ConfigError::invalid(
                "split.override_header",
                format!("is not a valid header name (got {h:?})"),
            )
        })?;
    }
    if let Some(c) = &raw.override_cookie {
        rules.override_cookie = cookie_name("split.override_cookie", c)?;
    }
    rules.sticky = match (&raw.sticky_cookie, &raw.sticky_header) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "split.sticky_cookie",
                "and split.sticky_header are both set; choose one",
            ))
        }
        (Some(c), None) => Some(StickyKey::Cookie(cookie_name("split.sticky_cookie", c)?)),
        (None, Some(h)) => Some(StickyKey::Header(
            http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    "split.sticky_header",
                    format!("is not a valid header name (got {h:?})"),
                )
            })?,
        )),
        (None, None) => None,
    };
    rules.sticky_identity = raw.sticky_identity.unwrap_or(defaults::STICKY_IDENTITY);
    if rules.sticky_identity && !client_auth {
        return Err(ConfigError::invalid(
            "split.sticky_identity",
            "needs tls.client_ca: the identity comes from a verified client certificate",
        ));
    }
    Ok(rules)
}

fn cookie_name(key: &'static str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("is not a valid cookie name (got {name:?})"),
        ))
    }
}

fn classifier(raw: &RawClassify) -> Result<Classifier, ConfigError> {
    let mut c = Classifier::none();
    let key = "classify.error_statuses";
    match &raw.error_statuses {
        None => {
            for &(low, high) in defaults::ERROR_STATUSES {
                c.add_status_range(low, high);
            }
        }
        Some(list) => {
            for item in list {
                let (low, high) = match item {
                    toml::Value::Integer(n) => (*n, *n),
                    toml::Value::String(s) if s.len() == 3 && s.ends_with("xx") => {
                        let class = s[..1].parse::<i64>().map_err(|_| ConfigError::invalid(key, format!("has a bad class {s:?}; write e.g. \"5xx\"")))?;
                        (class * 100, class * 100 + 99)
                    }
                    toml::Value::String(s) => match s.split_once('-') {
                        Some((a, b)) => (
                            a.trim().parse().map_err(|_| ConfigError::invalid(key, format!("has a bad range {s:?}; write e.g. \"500-504\"")))?,
                            b.trim().parse().map_err(|_| ConfigError::invalid(key, format!("has a bad range {s:?}; write e.g. \"500-504\"")))?,
                        ),
                        None => return Err(ConfigError::invalid(key, format!("has {s:?}; write a status (503), a class (\"5xx\") or a range (\"500-504\")"))),
                    },
                    other => return Err(ConfigError::invalid(key, format!("has {other}; write a status (503), a class (\"5xx\") or a range (\"500-504\")"))),
                };
                if !(100..=599).contains(&low) || !(100..=599).contains(&high) || low > high {
                    return Err(ConfigError::invalid(
                        key,
                        format!("has {low}-{high}, outside the HTTP statuses 100..599"),
                    ));
                }
                c.add_status_range(low as u16, high as u16);
            }
        }
    }
    let codes = raw.grpc_error_codes.clone().unwrap_or_else(|| {
        defaults::GRPC_ERROR_CODES
            .iter()
            .map(|&code| i64::from(code))
            .collect()
    });
    for code in codes {
        if !(0..=16).contains(&code) {
            return Err(ConfigError::invalid(
                "classify.grpc_error_codes",
                format!("has {code}; gRPC codes are 0..16"),
            ));
        }
        c.add_grpc_code(code as u8);
    }
    Ok(c)
}

pub(crate) fn judge_settings(raw: &RawJudge, o: &Overrides) -> Result<JudgeSettings, ConfigError> {
    let d = JudgePolicy::default();
    let window = duration_or("judge.window", raw.window.as_deref(), d.window)?;
    if window < Duration::from_secs(1) || window > Duration::from_secs(3600) {
        return Err(ConfigError::invalid(
            "judge.window",
            format!("must be between 1s and 1h (got {window:?})"),
        ));
    }
    if raw.max_p95_ratio.is_some() && raw.min_latency_shift.is_some() {
        return Err(ConfigError::invalid(
            "judge.max_p95_ratio",
            "is the old name of `judge.min_latency_shift`, which is set too; remove \
             `max_p95_ratio`",
        ));
    }
    if raw.confidence.is_some() {
        return Err(ConfigError::invalid(
            "judge.confidence",
            "is no longer used: the judge's tests are sequential, and the chance that they \
             revert a healthy canary is `judge.alpha` per step (default 0.002) plus \
             `judge.alpha_per_hour` (default 0.004); remove `confidence`, or write `alpha` \
             instead",
        ));
    }
    let interval = duration_or(
        "judge.interval",
        raw.interval.as_deref(),
        defaults::JUDGE_INTERVAL,
    )?;
    if interval > window {
        return Err(ConfigError::invalid(
            "judge.interval",
            "must be shorter than judge.window",
        ));
    }
    let policy = JudgePolicy {
        window,
        min_requests: raw.min_requests.unwrap_or(d.min_requests),
        max_error_rate: o
            .max_error_rate
            .or(raw.max_error_rate)
            .unwrap_or(d.max_error_rate),
        max_p95: duration_or(
            "judge.max_p95",
            o.max_p95.as_deref().or(raw.max_p95.as_deref()),
            d.max_p95,
        )?,
        alpha: raw.alpha.unwrap_or(d.alpha),
        alpha_per_hour: raw.alpha_per_hour.unwrap_or(d.alpha_per_hour),
        min_latency_shift: raw
            .min_latency_shift
            .or(raw.max_p95_ratio)
            .unwrap_or(d.min_latency_shift),
        min_error_rate_difference: raw
            .min_error_rate_difference
            .unwrap_or(d.min_error_rate_difference),
        max_consecutive_errors: raw
            .max_consecutive_errors
            .unwrap_or(d.max_consecutive_errors),
        max_shadow_mismatch_rate: raw
            .max_shadow_mismatch_rate
            .unwrap_or(d.max_shadow_mismatch_rate),
    };
    policy
        .validate()
        .map_err(|e| ConfigError::Policy(e.to_string()))?;
    Ok(JudgeSettings { policy, interval })
}

fn rollout_settings(raw: &RawRollout, shadow: &RawShadow) -> Result<RolloutSettings, ConfigError> {
    let d = RolloutSettings::default();
    let steps = raw.steps.clone().unwrap_or(d.steps);
    let steps =
        validate_steps(&steps).map_err(|e| ConfigError::Policy(format!("`rollout.steps`: {e}")))?;
    let shadow_hold = match raw.shadow.as_deref() {
        None => None,
        Some(text) => match parse_hold(text) {
            Ok(hold) if !hold.is_zero() => Some(hold),
            _ => {
                return Err(ConfigError::invalid(
                    "rollout.shadow",
                    format!(
                        "must be a duration longer than 0s, like \"60s\" or \"5m\" (got {text:?}); \
                         remove it for no shadow step"
                    ),
                ))
            }
        },
    };
    let shadow_percent = shadow.percent.unwrap_or(d.shadow_percent);
    shadow_basis_points(shadow_percent)
        .map_err(|e| ConfigError::invalid("shadow.percent", e.to_string()))?;
    Ok(RolloutSettings {
        steps,
        hold: duration_or("rollout.hold", raw.hold.as_deref(), d.hold)?,
        min_requests_per_step: raw.min_requests_per_step.unwrap_or(d.min_requests_per_step),
        shadow: shadow_hold,
        shadow_percent,
    })
}

fn shadow_settings(raw: &RawShadow) -> Result<ShadowSettings, ConfigError> {
    let d = ShadowSettings::default();
    let max_concurrent = raw.max_concurrent.unwrap_or(d.max_concurrent);
    if max_concurrent == 0 {
        return Err(ConfigError::invalid(
            "shadow.max_concurrent",
            "must be at least 1 (got 0); to copy nothing, do not shadow",
        ));
    }
    Ok(ShadowSettings {
        max_concurrent,
        max_body_bytes: raw.max_body_bytes.unwrap_or(d.max_body_bytes),
    })
}

fn webhook_settings(raw: RawWebhook) -> Result<WebhookSettings, ConfigError> {
    if !(raw.url.starts_with("http://") || raw.url.starts_with("https://"))
        || raw.url.parse::<http::Uri>().is_err()
    {
        return Err(ConfigError::invalid(
            "webhook.url",
            format!("must be an http:// or https:// URL (got {:?})", raw.url),
        ));
    }
    let events = match raw.events {
        None => WEBHOOK_EVENTS.iter().map(|e| e.to_string()).collect(),
        Some(events) => {
            for e in &events {
                if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                    return Err(ConfigError::invalid(
                        "webhook.events",
                        format!(
                            "has unknown event {e:?}; known: {}",
                            WEBHOOK_EVENTS.join(", ")
                        ),
                    ));
                }
            }
            events
        }
    };
    Ok(WebhookSettings {
        url: raw.url,
        secret: raw.secret.filter(|s| !s.is_empty()),
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, o: &Overrides) -> Result<Config, ConfigError> {
        Config::from_raw(Config::parse_toml(text, Path::new("test.toml"))?, o)
    }

    fn upstreams() -> Overrides {
        Overrides {
            stable: Some("http://127.0.0.1:1".into()),
            canary: Some("http://127.0.0.1:2".into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn defaults_are_the_constants() {
        // Every value is compared in control/tests/readme_config.rs; these
        // are the ones not set from a data-plane `Default`.
        let c = load("", &upstreams()).unwrap();
        assert_eq!(c.proxy.listen, defaults::LISTEN.parse().unwrap());
        assert_eq!(c.admin.listen, defaults::ADMIN.parse().unwrap());
        assert_eq!(
            f64::from(c.canary_weight_bp) / 100.0,
            defaults::CANARY_WEIGHT
        );
        assert_eq!(c.state_dir, Path::new(defaults::STATE_DIR));
        assert_eq!(c.log, defaults::LOG);
        assert_eq!(c.judge, JudgeSettings::default());
        assert_eq!(c.judge.interval, defaults::JUDGE_INTERVAL);
        assert_eq!(c.rollout, RolloutSettings::default());
        assert_eq!(c.proxy.workers, defaults::WORKERS);
        assert_eq!(c.proxy.classifier, Classifier::default());
        assert_eq!(c.proxy.canary_fallback, defaults::CANARY_FALLBACK);
    }

    #[test]
    fn overrides_beat_the_file() {
        let text = "listen = \"127.0.0.1:7000\"\ncanary_weight = 10\n[stable]\nurl = \"http://10.0.0.1:80\"\n[canary]\nurl = \"http://10.0.0.2:80\"\n";
        let c = load(text, &Overrides::default()).unwrap();
        assert_eq!(c.canary_weight_bp, 1000);
        assert_eq!(c.proxy.stable.url, "http://10.0.0.1:80");
        let o = Overrides {
            canary_weight: Some(12.5),
            listen: Some("127.0.0.1:7001".into()),
            ..upstreams()
        };
        let c = load(text, &o).unwrap();
        assert_eq!(c.canary_weight_bp, 1250);
        assert_eq!(c.proxy.listen.port(), 7001);
        assert_eq!(c.proxy.stable.url, "http://127.0.0.1:1");
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| load(text, &upstreams()).unwrap_err().to_string();
        assert!(err("[judge]\nmax_error_rate = 5\n")
            .contains("`judge.max_error_rate` must be between 0 and 1 (got 5); write 0.05"));
        assert!(err("canary_weight = 120\n").contains("`canary_weight`"));
        assert!(err("log_format = \"yaml\"\n")
            .contains("`log_format` must be \"auto\", \"text\" or \"json\" (got \"yaml\")"));
        let o = Overrides {
            log_format: Some("json".into()),
            ..upstreams()
        };
        assert_eq!(
            load("log_format = \"text\"\n", &o).unwrap().log_format,
            LogFormat::Json
        );
        assert!(err("[judge]\nmax_eror_rate = 0.1\n").contains("max_eror_rate"));
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert!(err(&format!("{tls}reload_interval = \"0s\"\n")).contains("`tls.reload_interval`"));
        assert_eq!(
            load(&format!("{tls}reload_interval = \"250ms\"\n"), &upstreams())
                .unwrap()
                .proxy
                .tls_reload_interval,
            Duration::from_millis(250)
        );
        assert!(err("listen = \"nope\"\n").contains("`listen`"));
        assert!(err("[timeouts]\nconnect = \"soon\"\n").contains("`timeouts.connect`"));
        assert!(err("[rollout]\nsteps = [50, 25]\n")
            .contains("`rollout.steps`: rollout steps must be strictly increasing"));
        assert!(err("[rollout]\nsteps = [5, 50]\n").contains("last rollout step must be 100"));
        assert!(
            err("[classify]\nerror_statuses = [\"9xx\"]\n").contains("`classify.error_statuses`")
        );
        assert!(err("admin = \"0.0.0.0:9901\"\n").contains("no admin token"));
        assert!(err("[[webhook]]\nurl = \"ftp://x\"\n").contains("`webhook.url`"));
        assert!(err("[stable]\nmax_concurrent = 0\n")
            .contains("`stable.max_concurrent` must be at least 1 (got 0)"));
        assert!(err("[canary]\nmax_concurrent = 0\n").contains("`canary.max_concurrent`"));
        let missing = load("", &Overrides::default()).unwrap_err().to_string();
        assert!(missing.contains("`stable.url` is required"), "{missing}");
        let bad_url = load(
            "",
            &Overrides {
                canary: Some("ftp://x".into()),
                ..upstreams()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(bad_url.contains("`canary.url`"), "{bad_url}");
    }

    #[test]
    fn an_upstream_is_one_url_or_several_with_outlier_settings() {
        let none = Overrides::default();
        let text = "[stable]\nurl = [\"http://10.0.0.1:80\", \"http://app.svc:81\"]\n\
                    resolve_interval = \"2s\"\n\
                    [stable.outlier]\nconsecutive_failures = 3\nbase_ejection = \"10s\"\n\
                    [canary]\nurl = \"http://10.0.0.2:80\"\n";
        let config = load(text, &none).unwrap();
        let stable = &config.proxy.stable;
        assert_eq!(stable.url, "http://10.0.0.1:80,http://app.svc:81");
        assert_eq!(stable.resolve_interval, Duration::from_secs(2));
        assert_eq!(
            stable.outlier,
            OutlierSettings {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(10),
                ..OutlierSettings::default()
            }
        );
        assert_eq!(config.proxy.canary.outlier, OutlierSettings::default());
        // The flag's and env's form: a comma-separated list.
        let flag = Overrides {
            stable: Some("http://10.0.0.1:80, http://10.0.0.3:80".into()),
            ..upstreams()
        };
        assert_eq!(
            load("", &flag).unwrap().proxy.stable.url,
            "http://10.0.0.1:80, http://10.0.0.3:80"
        );
        let err = |text: &str| load(text, &upstreams()).unwrap_err().to_string();
        assert!(err("[stable.outlier]\nconsecutive_failures = 0\n")
            .contains("`stable.outlier.consecutive_failures` must be at least 1"));
        assert!(err("[canary.outlier]\nmax_ejection_percent = 101\n")
            .contains("`canary.outlier.max_ejection_percent` must be between 0 and 100"));
        assert!(
            err("[stable.outlier]\nbase_ejection = \"1m\"\nmax_ejection = \"30s\"\n")
                .contains("`stable.outlier.max_ejection` must be at least base_ejection")
        );
        assert!(err("[stable]\nresolve_interval = \"0s\"\n").contains("`stable.resolve_interval`"));
        let mixed = Overrides {
            stable: Some("http://a:1,https://b:2".into()),
            ..upstreams()
        };
        assert!(load("", &mixed)
            .unwrap_err()
            .to_string()
            .contains("`stable.url` `http://a:1,https://b:2` mixes http:// and https://"));
    }

    #[test]
    fn an_https_upstream_takes_tls_settings_and_only_it_does() {
        let https = Overrides {
            stable: Some("https://app.internal:8443".into()),
            ..upstreams()
        };
        let config = load("", &https).unwrap();
        assert_eq!(config.proxy.stable.tls, Some(UpstreamTls::default()));
        assert_eq!(config.proxy.canary.tls, None);
        let config = load(
            "[stable.tls]\nserver_name = \"app\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            &https,
        )
        .unwrap();
        let tls = config.proxy.stable.tls.unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("app"));
        assert_eq!(tls.ca, Some(PathBuf::from("ca.pem")));
        let err = |text: &str, o: &Overrides| load(text, o).unwrap_err().to_string();
        assert!(err("[canary.tls]\nca = \"ca.pem\"\n", &https)
            .contains("`canary.tls` is set, but http://127.0.0.1:2 is not https://"));
        assert!(err("[stable.tls]\ncert = \"c.pem\"\n", &https)
            .contains("`stable.tls.cert` and `key` go together"));
        assert!(err("[stable.tls]\nserver_name = \"\"\n", &https)
            .contains("`stable.tls.server_name` must not be empty"));
        assert!(err("[stable.tls]\nsni = \"x\"\n", &https).contains("sni"));
    }

    #[test]
    fn the_access_log_and_trace_sections_are_validated() {
        assert!(load("", &upstreams()).unwrap().proxy.access_log.is_none());
        let on = load("[access_log]\n", &upstreams())
            .unwrap()
            .proxy
            .access_log
            .unwrap();
        assert_eq!(
            (on.sink, on.format, on.query),
            (LogSink::Stdout, LineFormat::Json, QueryPolicy::Keep)
        );
        let flag = Overrides {
            access_log: Some("/var/log/serin/access.log".into()),
            ..upstreams()
        };
        let file = load("[access_log]\nformat = \"text\"\n", &flag)
            .unwrap()
            .proxy
            .access_log
            .unwrap();
        assert_eq!(file.sink, LogSink::File("/var/log/serin/access.log".into()));
        assert_eq!(file.format, LineFormat::Text);
        let picked = load("[access_log]\nredact_params = [\"token\"]\n", &upstreams()).unwrap();
        assert_eq!(
            picked.proxy.access_log.unwrap().query,
            QueryPolicy::Redact(vec!["token".into()])
        );
        for (text, says) in [
            (
                "[access_log]\nformat = \"xml\"\n",
                "`access_log.format` must be \"json\" or \"text\"",
            ),
            (
                "[access_log]\nsample = 2\n",
                "`access_log.sample` must be between 0 and 1",
            ),
            (
                "[access_log]\nquery = \"hide\"\n",
                "`access_log.query` must be",
            ),
            (
                "[access_log]\nquery = \"keep\"\nredact_params = [\"a\"]\n",
                "`access_log.redact_params` only applies",
            ),
            ("[access_log]\npath = \"\"\n", "`access_log.path` is empty"),
            (
                "[trace]\nsample = -1\n",
                "`trace.sample` must be between 0 and 1",
            ),
            (
                "[trace]\notlp_endpoint = \"https://c:4318/v1/traces\"\n",
                "`trace.otlp_endpoint` must be an http:// URL",
            ),
            (
                "[trace]\notlp_endpoint = \"not a url\"\n",
                "`trace.otlp_endpoint` is not a URL",
            ),
            (
                "[trace]\nservice_name = \"x\"\n",
                "`trace.service_name` only applies",
            ),
            ("[trace]\nquery = \"hide\"\n", "`trace.query` must be"),
            (
                "[trace]\nquery = \"drop\"\nredact_params = [\"a\"]\n",
                "`trace.redact_params` only applies",
            ),
        ] {
            let e = load(text, &upstreams()).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let spans = load(
            "[trace]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n",
            &upstreams(),
        )
        .unwrap();
        assert_eq!(spans.proxy.trace.query, QueryPolicy::Redact(vec![]));
        let export = spans.proxy.trace.export.unwrap();
        assert_eq!(export.service_name, "serin");
    }

    #[test]
    fn client_certificates_and_what_their_identity_is_used_for() {
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let mtls = format!("{tls}client_ca = \"ca.pem\"\n");
        let proxy = |text: &str| load(text, &upstreams()).unwrap().proxy;
        let client_auth = |text: &str| proxy(text).tls.unwrap().client_auth;
        assert!(client_auth(tls).is_none());
        let auth = client_auth(&mtls).unwrap();
        assert_eq!(
            (auth.ca, auth.mode),
            (PathBuf::from("ca.pem"), ClientAuthMode::Required)
        );
        let optional = format!("{mtls}client_auth = \"optional\"\n");
        assert_eq!(
            client_auth(&optional).unwrap().mode,
            ClientAuthMode::Optional
        );

        let uses = format!(
            "[split]\nsticky_identity = true\n[rate_limit]\nrequests_per_second = 1\n\
             key = \"identity\"\n{mtls}identity_header = \"X-Client-Identity\"\n"
        );
        let p = proxy(&uses);
        assert!(p.split.sticky_identity);
        assert_eq!(p.rate_limit.unwrap().key, RateLimitKey::Identity);
        assert_eq!(
            p.headers.identity_header.unwrap().as_str(),
            "x-client-identity"
        );
        let off = proxy(&mtls);
        assert!(!off.split.sticky_identity && off.headers.identity_header.is_none());

        let err = |text: &str| load(text, &upstreams()).unwrap_err().to_string();
        for (text, says) in [
            (
                format!("{tls}client_auth = \"optional\"\n"),
                "`tls.client_auth` is set without tls.client_ca",
            ),
            (
                format!("{mtls}client_auth = \"maybe\"\n"),
                "`tls.client_auth` must be \"required\" or \"optional\" (got \"maybe\")",
            ),
            (
                format!("{tls}identity_header = \"x-id\"\n"),
                "`tls.identity_header` needs tls.client_ca",
            ),
            (
                format!("{mtls}identity_header = \"x-forwarded-for\"\n"),
                "`tls.identity_header` must be a valid header name that serin does not set itself",
            ),
            (
                format!("{mtls}identity_header = \"bad name\"\n"),
                "`tls.identity_header` must be a valid header name",
            ),
            (
                "[split]\nsticky_identity = true\n".to_string(),
                "`split.sticky_identity` needs tls.client_ca",
            ),
            (
                "[rate_limit]\nrequests_per_second = 1\nkey = \"identity\"\n".to_string(),
                "`rate_limit.key` is \"identity\", which needs tls.client_ca",
            ),
        ] {
            let message = err(&text);
            assert!(message.contains(says), "{text}: {message}");
        }
    }

    #[test]
    fn rate_limit_errors_name_the_key_and_what_to_write() {
        let err = |text: &str| load(text, &upstreams()).unwrap_err().to_string();
        for (text, expected) in [
            ("burst = 5", "`rate_limit.requests_per_second` is required"),
            (
                "requests_per_second = 0",
                "`rate_limit.requests_per_second` must be between 0.001 and 1000000 (got 0)",
            ),
            (
                "requests_per_second = 10\nburst = 0",
                "`rate_limit.burst` must be between 1 and 1000000 (got 0)",
            ),
            (
                "requests_per_second = 10\nkey = \"ip\"",
                "`rate_limit.key` must be \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"identity\" (got \"ip\")",
            ),
            (
                "requests_per_second = 10\nkey = \"header:x api\"",
                "`rate_limit.key` has an invalid header name",
            ),
            (
                "requests_per_second = 10\nkey = \"cookie:\"",
                "`rate_limit.key` is not a valid cookie name",
            ),
            (
                "requests_per_second = 10\nmax_keys = 0",
                "`rate_limit.max_keys` must be between 1 and 10000000 (got 0)",
            ),
            ("requests_per_second = 10\nrate = 5", "unknown field `rate`"),
        ] {
            let message = err(&format!("[rate_limit]\n{text}\n"));
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn rate_limit_defaults_and_keys() {
        let c = load("", &upstreams()).unwrap();
        assert_eq!(
            (c.proxy.rate_limit, c.proxy.max_concurrent),
            (None, [None; 2])
        );
        let c = load(
            "[stable]\nmax_concurrent = 8\n[rate_limit]\nrequests_per_second = 2.5\n",
            &upstreams(),
        )
        .unwrap();
        assert_eq!(c.proxy.max_concurrent, [NonZeroUsize::new(8), None]);
        let limit = c.proxy.rate_limit.unwrap();
        assert_eq!(limit.rate.as_per_second(), 2.5);
        assert_eq!(limit.burst.get(), 3, "the rate, rounded up");
        assert_eq!(limit.key, RateLimitKey::ClientIp);
        assert_eq!(
            limit.max_keys.get(),
            serin_proxy::defaults::RATE_LIMIT_MAX_KEYS
        );
        let key = |k: &str| {
            let text = format!("[rate_limit]\nrequests_per_second = 1\nkey = {k:?}\n");
            load(&text, &upstreams())
                .unwrap()
                .proxy
                .rate_limit
                .unwrap()
                .key
        };
        assert_eq!(
            key("header:X-Api-Key"),
            RateLimitKey::Header(http::HeaderName::from_static("x-api-key"))
        );
        assert_eq!(
            key("cookie:session"),
            RateLimitKey::Cookie("session".into())
        );
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        let o = Overrides {
            admin: Some("0.0.0.0:9901".into()),
            admin_token: Some("s3cret".into()),
            ..upstreams()
        };
        assert_eq!(load("", &o).unwrap().admin.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn status_classes_and_ranges() {
        let c = load(
            "[classify]\nerror_statuses = [429, \"502-504\"]\ngrpc_error_codes = [14]\n",
            &upstreams(),
        )
        .unwrap();
        let cl = &c.proxy.classifier;
        assert!(cl.is_error_status(http::StatusCode::TOO_MANY_REQUESTS));
        assert!(cl.is_error_status(http::StatusCode::BAD_GATEWAY));
        assert!(!cl.is_error_status(http::StatusCode::INTERNAL_SERVER_ERROR));
    }
}
