//! The README's "### Config file" section shows every key with its default.
//! This checks that claim: its ```toml block, parsed as it stands, must give
//! exactly the config that the two upstream URLs alone give, and it must set
//! every key that has a default.
//!
//! Both comparisons destructure the structs without `..`, so a new setting
//! does not compile here until it is compared (and shown in the README).

use std::path::Path;

use serin_control::config::{
    AdminSettings, Config, JudgeSettings, Overrides, RawClassify, RawConfig, RawHeaders, RawJudge,
    RawLimits, RawOutlier, RawRollout, RawShadow, RawSplit, RawTimeouts, RawTrace, RawUpstream,
    RawUrls, RolloutSettings,
};
use serin_control::JudgePolicy;
use serin_proxy::{HeaderPolicy, PoolSettings, ProxyConfig, ShadowSettings, SplitRules};

const README: &str = include_str!("../../README.md");

/// The first ```toml block under "### Config file", before the next heading.
fn readme_config() -> &'static str {
    let (_, section) = README
        .split_once("\n### Config file\n")
        .expect("README.md has a \"### Config file\" section");
    let (before, block) = section
        .split_once("```toml\n")
        .expect("the \"### Config file\" section has a ```toml block");
    assert!(
        !before.lines().any(|l| l.starts_with('#')),
        "the ```toml block must be in the \"### Config file\" section itself"
    );
    let (block, _) = block
        .split_once("\n```")
        .expect("the ```toml block is closed");
    block
}

fn parse(text: &str) -> RawConfig {
    Config::parse_toml(text, Path::new("README.md"))
        .unwrap_or_else(|e| panic!("the README's config does not parse: {e}"))
}

fn build(raw: RawConfig) -> Config {
    Config::from_raw(raw, &Overrides::default())
        .unwrap_or_else(|e| panic!("the README's config does not validate: {e}"))
}

/// Every setting of `c`, by the config key it comes from.
fn settings(c: &Config) -> Vec<(&'static str, String)> {
    let Config {
        proxy,
        canary_weight_bp,
        admin,
        state_dir,
        log,
        log_format,
        judge,
        rollout,
        webhooks,
        fleet,
    } = c;
    let ProxyConfig {
        listen,
        workers,
        stable,
        canary,
        split,
        classifier,
        pool,
        response_timeout,
        header_read_timeout,
        max_header_bytes,
        max_inflight,
        max_concurrent,
        rate_limit,
        drain_timeout,
        canary_fallback,
        headers,
        tls,
        tls_reload_interval,
        window,
        access_log,
        trace,
        shadow,
    } = proxy;
    let ShadowSettings {
        max_concurrent: shadow_max_concurrent,
        max_body_bytes,
    } = shadow;
    let SplitRules {
        override_header,
        override_cookie,
        sticky,
        sticky_identity,
    } = split;
    let PoolSettings {
        connect_timeout,
        idle_timeout,
        max_idle,
    } = pool;
    let HeaderPolicy {
        rewrite_host,
        via,
        upstream_header,
        identity_header,
    } = headers;
    let AdminSettings {
        listen: admin_listen,
        token,
    } = admin;
    let JudgeSettings { policy, interval } = judge;
    let JudgePolicy {
        window: judge_window,
        min_requests,
        max_error_rate,
        max_p95,
        alpha,
        alpha_per_hour,
        min_error_rate_difference,
        min_latency_shift,
        max_consecutive_errors,
        max_shadow_mismatch_rate,
    } = policy;
    let RolloutSettings {
        steps,
        hold,
        min_requests_per_step,
        shadow: shadow_hold,
        shadow_percent,
    } = rollout;
    macro_rules! settings {
        ($($key:literal => $value:expr,)*) => {
            vec![$(($key, format!("{:?}", $value))),*]
        };
    }
    settings! {
        "listen" => listen,
        "workers" => workers,
        "admin" => admin_listen,
        "admin_token" => token,
        "state_dir" => state_dir,
        "canary_weight" => canary_weight_bp,
        "log" => log,
        "log_format" => log_format,
        "stable.url" => stable.url,
        "stable.protocol" => stable.protocol,
        "stable.resolve_interval" => stable.resolve_interval,
        "stable.outlier" => stable.outlier,
        "stable.tls" => stable.tls,
        "canary.url" => canary.url,
        "canary.protocol" => canary.protocol,
        "canary.resolve_interval" => canary.resolve_interval,
        "canary.outlier" => canary.outlier,
        "canary.tls" => canary.tls,
        "split.override_header" => override_header,
        "split.override_cookie" => override_cookie,
        "split.sticky_cookie / split.sticky_header" => sticky,
        "split.sticky_identity" => sticky_identity,
        "split.canary_fallback" => canary_fallback,
        "timeouts.connect" => connect_timeout,
        "timeouts.response" => response_timeout,
        "timeouts.header_read" => header_read_timeout,
        "timeouts.upstream_idle" => idle_timeout,
        "timeouts.drain" => drain_timeout,
        "limits.max_header_bytes" => max_header_bytes,
        "limits.max_inflight" => max_inflight,
        "limits.max_idle_per_upstream" => max_idle,
        "stable.max_concurrent / canary.max_concurrent" => max_concurrent,
        "rate_limit" => rate_limit,
        "headers.rewrite_host" => rewrite_host,
        "headers.via" => via,
        "headers.upstream_header" => upstream_header,
        "tls.identity_header" => identity_header,
        "tls" => tls,
        "tls.reload_interval" => tls_reload_interval,
        "access_log" => access_log,
        "trace" => trace,
        "classify.error_statuses / classify.grpc_error_codes" => classifier,
        "judge.window (the data plane's stats window)" => window,
        "judge.window" => judge_window,
        "judge.interval" => interval,
        "judge.min_requests" => min_requests,
        "judge.max_error_rate" => max_error_rate,
        "judge.max_p95" => max_p95,
        "judge.alpha" => alpha,
        "judge.alpha_per_hour" => alpha_per_hour,
        "judge.min_error_rate_difference" => min_error_rate_difference,
        "judge.min_latency_shift" => min_latency_shift,
        "judge.max_consecutive_errors" => max_consecutive_errors,
        "judge.max_shadow_mismatch_rate" => max_shadow_mismatch_rate,
        "rollout.steps" => steps,
        "rollout.hold" => hold,
        "rollout.min_requests_per_step" => min_requests_per_step,
        "rollout.shadow" => shadow_hold,
        "shadow.percent" => shadow_percent,
        "shadow.max_concurrent" => shadow_max_concurrent,
        "shadow.max_body_bytes" => max_body_bytes,
        "webhook" => webhooks,
        "--fleet (flags and environment only)" => fleet,
    }
}

#[test]
fn the_readme_config_is_exactly_the_defaults() {
    let raw = parse(readme_config());
    let url = |raw: &RawUpstream| match &raw.url {
        Some(RawUrls::One(url)) => url.clone(),
        _ => panic!("the README's config sets each upstream's url to one URL"),
    };
    let minimal = format!(
        "[stable]\nurl = {:?}\n[canary]\nurl = {:?}\n",
        url(&raw.stable),
        url(&raw.canary),
    );
    let shown = settings(&build(raw));
    let defaults = settings(&build(parse(&minimal)));
    let differ = shown
        .iter()
        .zip(&defaults)
        .filter(|(s, d)| s != d)
        .map(|((key, s), (_, d))| format!("  `{key}`: the README gives {s}, the default is {d}"))
        .collect::<Vec<_>>();
    assert!(
        differ.is_empty(),
        "README.md's example config (### Config file) must show the defaults; \
         fix the README or the constant in control/src/defaults.rs \
         (the data plane's: proxy/src/defaults.rs):\n{}",
        differ.join("\n")
    );
}

/// Every key that has a default is shown; the ones left out have none.
#[test]
fn the_readme_config_shows_every_key() {
    let RawConfig {
        listen,
        workers,
        admin,
        admin_token: _, // no default: none
        state_dir,
        canary_weight,
        log,
        log_format,
        stable:
            RawUpstream {
                url: stable_url,
                protocol: stable_protocol,
                max_concurrent: _, // no default: unlimited
                resolve_interval: stable_resolve_interval,
                tls: _, // only for https:// URLs
                outlier: stable_outlier,
            },
        canary:
            RawUpstream {
                url: canary_url,
                protocol: canary_protocol,
                max_concurrent: _,
                resolve_interval: canary_resolve_interval,
                tls: _,
                outlier: _, // the same keys and defaults as stable's, shown there
            },
        split:
            RawSplit {
                override_header,
                override_cookie,
                sticky_cookie: _, // no default: random split
                sticky_header: _,
                sticky_identity,
                canary_fallback,
            },
        timeouts:
            RawTimeouts {
                connect,
                response,
                header_read,
                upstream_idle,
                drain,
            },
        limits:
            RawLimits {
                max_header_bytes,
                max_inflight,
                max_idle_per_upstream,
            },
        rate_limit: _, // no default: off
        headers:
            RawHeaders {
                rewrite_host,
                via,
                upstream_header,
            },
        tls: _,        // no default: plain HTTP
        access_log: _, // no default: off
        trace:
            RawTrace {
                start: trace_start,
                sample: trace_sample,
                otlp_endpoint: _, // no default: no spans exported
                service_name: _,  // only with otlp_endpoint
                query: trace_query,
                redact_params: _, // no default: every value
            },
        classify: RawClassify {
            error_statuses,
            grpc_error_codes,
        },
        judge:
            RawJudge {
                window,
                interval,
                min_requests,
                max_error_rate,
                max_p95,
                alpha,
                alpha_per_hour,
                min_latency_shift,
                max_p95_ratio: _, // the window judge's key, read as min_latency_shift
                confidence: _,    // the window judge's key, refused
                min_error_rate_difference,
                max_consecutive_errors,
                max_shadow_mismatch_rate,
            },
        rollout:
            RawRollout {
                steps,
                hold,
                min_requests_per_step,
                shadow: _, // no default: no shadow step
            },
        shadow:
            RawShadow {
                percent: shadow_percent,
                max_concurrent: shadow_max_concurrent,
                max_body_bytes,
            },
        webhook: _, // no default: none
    } = parse(readme_config());
    let RawOutlier {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejection_percent,
    } = stable_outlier.expect("the README's config shows [stable.outlier]");
    let shown = [
        (
            "stable.outlier.consecutive_failures",
            consecutive_failures.is_some(),
        ),
        ("stable.outlier.base_ejection", base_ejection.is_some()),
        ("stable.outlier.max_ejection", max_ejection.is_some()),
        (
            "stable.outlier.max_ejection_percent",
            max_ejection_percent.is_some(),
        ),
        ("listen", listen.is_some()),
        ("workers", workers.is_some()),
        ("admin", admin.is_some()),
        ("state_dir", state_dir.is_some()),
        ("canary_weight", canary_weight.is_some()),
        ("log", log.is_some()),
        ("log_format", log_format.is_some()),
        ("stable.url", stable_url.is_some()),
        ("stable.protocol", stable_protocol.is_some()),
        ("stable.resolve_interval", stable_resolve_interval.is_some()),
        ("canary.url", canary_url.is_some()),
        ("canary.protocol", canary_protocol.is_some()),
        ("canary.resolve_interval", canary_resolve_interval.is_some()),
        ("split.override_header", override_header.is_some()),
        ("split.override_cookie", override_cookie.is_some()),
        ("split.sticky_identity", sticky_identity.is_some()),
        ("split.canary_fallback", canary_fallback.is_some()),
        ("timeouts.connect", connect.is_some()),
        ("timeouts.response", response.is_some()),
        ("timeouts.header_read", header_read.is_some()),
        ("timeouts.upstream_idle", upstream_idle.is_some()),
        ("timeouts.drain", drain.is_some()),
        ("limits.max_header_bytes", max_header_bytes.is_some()),
        ("limits.max_inflight", max_inflight.is_some()),
        (
            "limits.max_idle_per_upstream",
            max_idle_per_upstream.is_some(),
        ),
        ("headers.rewrite_host", rewrite_host.is_some()),
        ("headers.via", via.is_some()),
        ("headers.upstream_header", upstream_header.is_some()),
        ("trace.start", trace_start.is_some()),
        ("trace.sample", trace_sample.is_some()),
        ("trace.query", trace_query.is_some()),
        ("classify.error_statuses", error_statuses.is_some()),
        ("classify.grpc_error_codes", grpc_error_codes.is_some()),
        ("judge.window", window.is_some()),
        ("judge.interval", interval.is_some()),
        ("judge.min_requests", min_requests.is_some()),
        ("judge.max_error_rate", max_error_rate.is_some()),
        ("judge.max_p95", max_p95.is_some()),
        ("judge.alpha", alpha.is_some()),
        ("judge.alpha_per_hour", alpha_per_hour.is_some()),
        ("judge.min_latency_shift", min_latency_shift.is_some()),
        (
            "judge.min_error_rate_difference",
            min_error_rate_difference.is_some(),
        ),
        (
            "judge.max_consecutive_errors",
            max_consecutive_errors.is_some(),
        ),
        ("rollout.steps", steps.is_some()),
        ("rollout.hold", hold.is_some()),
        (
            "rollout.min_requests_per_step",
            min_requests_per_step.is_some(),
        ),
        (
            "judge.max_shadow_mismatch_rate",
            max_shadow_mismatch_rate.is_some(),
        ),
        ("shadow.percent", shadow_percent.is_some()),
        ("shadow.max_concurrent", shadow_max_concurrent.is_some()),
        ("shadow.max_body_bytes", max_body_bytes.is_some()),
    ];
    let missing = shown
        .iter()
        .filter(|(_, shown)| !shown)
        .map(|(key, _)| *key)
        .collect::<Vec<_>>();
    assert!(
        missing.is_empty(),
        "README.md's example config (### Config file) should show every key with its default; \
         missing: {}",
        missing.join(", ")
    );
}
