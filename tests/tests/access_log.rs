//! The access log and trace context end to end: a real `serin_proxy::Proxy`
//! writing its access log to a real file while real HTTP/1.1 and HTTP/2
//! clients send requests through it to real upstreams. What is checked is
//! what an operator reads: one line per request, each valid JSON (or
//! logfmt), with the fields the client and the upstream saw.

use std::collections::HashMap;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use serde_json::Value;
use serin_proxy::access_log::{AccessLogConfig, LineFormat, LogSink, QueryPolicy};
use serin_proxy::trace::TraceSettings;
use serin_proxy::{
    Proxy, ProxyConfig, Rate, RateLimit, RateLimitKey, RouteTable, Routes, Upstream,
    UpstreamProtocol,
};
use serin_tests::*;

fn log_config(path: &std::path::Path) -> AccessLogConfig {
    AccessLogConfig {
        sink: LogSink::File(path.to_path_buf()),
        format: LineFormat::Json,
        sample: 1.0,
        errors_only: false,
        query: QueryPolicy::Keep,
    }
}

fn start(
    stable: &TestUpstream,
    canary_url: &str,
    weight_bp: u16,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> Proxy {
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Upstream::parse(&stable.url(), UpstreamProtocol::Http1).unwrap(),
        Upstream::parse(canary_url, UpstreamProtocol::Http1).unwrap(),
    );
    tweak(&mut config);
    Proxy::start(config, Routes::new(RouteTable::new(weight_bp))).unwrap()
}

/// Stops the proxy (which writes every line it has) and reads its log.
async fn stop_and_read(proxy: Proxy, path: &std::path::Path) -> Vec<Value> {
    proxy.shutdown();
    proxy.wait().await;
    std::fs::read_to_string(path)
        .expect("the access log exists")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_appears_once_with_what_its_client_saw() {
    let dir = temp_dir("access-log");
    let path = dir.join("access.log");
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = start(&stable, &canary.url(), 5_000, |c| {
        c.workers = 2;
        c.access_log = Some(log_config(&path));
    });
    let base = format!("http://{}", proxy.local_addr());
    let h1 = http1_client();
    let h2 = h2c_client();

    // HTTP/1.1 GETs on serin's own loop, h2c GETs and HTTP/1.1 uploads on
    // hyper's path, 50/50 between the upstreams.
    let mut answers = Vec::new();
    for round in 0..10 {
        let mut batch = Vec::new();
        for i in 0..20 {
            let url = format!("{base}/g?round={round}&i={i}");
            batch.push(tokio::spawn({
                let h1 = h1.clone();
                async move { ("GET", "HTTP/1.1", 0usize, get(&h1, &url, &[]).await) }
            }));
        }
        for _ in 0..10 {
            let url = format!("{base}/h2");
            batch.push(tokio::spawn({
                let h2 = h2.clone();
                async move { ("GET", "HTTP/2", 0, get(&h2, &url, &[]).await) }
            }));
        }
        for _ in 0..5 {
            let req = Request::post(format!("{base}/upload"))
                .body(full(Bytes::from(vec![b'x'; 3000])))
                .unwrap();
            batch.push(tokio::spawn({
                let h1 = h1.clone();
                async move { ("POST", "HTTP/1.1", 3000, send(&h1, req).await) }
            }));
        }
        for joined in join_all(batch).await {
            answers.push(joined.unwrap());
        }
    }
    let lines = stop_and_read(proxy, &path).await;
    assert_eq!(lines.len(), answers.len(), "one line per request");

    let by_id: HashMap<&str, &Value> = lines
        .iter()
        .map(|l| (l["request_id"].as_str().expect("a request id"), l))
        .collect();
    assert_eq!(by_id.len(), lines.len(), "request ids are unique");
    for (method, protocol, sent, answer) in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        let id = answer.headers["x-request-id"].to_str().unwrap();
        let line = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no line for request {id}"));
        assert_eq!(line["method"], *method);
        assert_eq!(line["protocol"], *protocol);
        assert_eq!(line["status"], 200);
        assert_eq!(line["outcome"], "success");
        assert_eq!(line["upstream"], answer.upstream());
        assert_eq!(line["bytes_in"], *sent as u64);
        assert_eq!(line["bytes_out"], answer.body.len() as u64);
        assert_eq!(line["client"], "127.0.0.1");
        assert!(line["authority"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"));
        assert!(line["trace_id"].is_null());
        let upstream_ms = line["upstream_ms"]
            .as_f64()
            .expect("time to upstream headers");
        let total_ms = line["total_ms"].as_f64().expect("total time");
        assert!(upstream_ms <= total_ms, "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
    }
    let paths: Vec<&str> = lines.iter().filter_map(|l| l["path"].as_str()).collect();
    assert!(
        paths.contains(&"/g?round=3&i=7"),
        "the query is kept by default"
    );
    assert!(paths.contains(&"/upload") && paths.contains(&"/h2"));
}

fn full(bytes: Bytes) -> ClientBody {
    http_body_util::Either::Left(http_body_util::Full::new(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_refusals_and_fallbacks_say_so() {
    let dir = temp_dir("access-log-failures");
    let path = dir.join("access.log");
    let stable = TestUpstream::start("stable").await;
    let down = closed_port_url();
    // Every request goes to a canary that is down: GETs fall back to
    // stable, a DELETE cannot and gets serin's 502.
    let proxy = start(&stable, &down, 10_000, |c| {
        c.access_log = Some(AccessLogConfig {
            query: QueryPolicy::Redact(vec!["token".into()]),
            ..log_config(&path)
        });
        c.rate_limit = Some(RateLimit {
            burst: std::num::NonZeroU32::MIN,
            key: RateLimitKey::Header(http::HeaderName::from_static("x-api-key")),
            ..RateLimit::new(Rate::per_second(1.0 / 60.0).unwrap())
        });
    });
    let addr = proxy.local_addr();
    let base = format!("http://{addr}");
    let client = http1_client();
    let fell_back = get(
        &client,
        &format!("{base}/a?token=s3cret&page=2"),
        &[("x-api-key", "a")],
    )
    .await;
    assert_eq!(fell_back.status, StatusCode::OK);
    let req = Request::delete(format!("{base}/b"))
        .header("x-api-key", "b")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client, req).await.status, StatusCode::BAD_GATEWAY);
    let refused = raw_exchange(addr, b"GET /c HTTP/1.1\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    // One request a minute per API key: the second is refused with 429.
    let key = [("x-api-key", "k1")];
    assert_eq!(
        get(&client, &format!("{base}/d1"), &key).await.status,
        StatusCode::OK
    );
    let limited = get(&client, &format!("{base}/d2"), &key).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);

    let lines = stop_and_read(proxy, &path).await;
    let find = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"].as_str().unwrap_or("").starts_with(path))
            .unwrap_or_else(|| panic!("no line for {path} in {lines:?}"))
    };
    let a = find("/a");
    assert_eq!(a["path"], "/a?token=REDACTED&page=2");
    assert_eq!(
        (a["upstream"].as_str(), a["status"].as_u64()),
        (Some("stable"), Some(200))
    );
    assert_eq!(a["outcome"], "fallback");
    let b = find("/b");
    assert_eq!(
        (b["upstream"].as_str(), b["status"].as_u64()),
        (Some("canary"), Some(502))
    );
    assert_eq!(b["outcome"], "error");
    assert!(b["upstream_ms"].is_null());
    let c = find("/c");
    assert_eq!(
        (c["status"].as_u64(), c["outcome"].as_str()),
        (Some(400), Some("refused"))
    );
    assert!(c["upstream"].is_null());
    let d2 = find("/d2");
    assert_eq!(
        (d2["status"].as_u64(), d2["outcome"].as_str()),
        (Some(429), Some("refused"))
    );
    assert!(d2["upstream"].is_null() && d2["upstream_ms"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_only_keeps_the_failures_and_text_is_logfmt() {
    let dir = temp_dir("access-log-errors");
    let path = dir.join("access.log");
    let stable = TestUpstream::start("stable").await;
    let proxy = start(&stable, &closed_port_url(), 0, |c| {
        c.access_log = Some(AccessLogConfig {
            format: LineFormat::Text,
            errors_only: true,
            ..log_config(&path)
        });
    });
    let base = format!("http://{}", proxy.local_addr());
    let client = http1_client();
    for _ in 0..20 {
        assert_eq!(get(&client, &base, &[]).await.status, StatusCode::OK);
    }
    // Forced onto the canary, which is down; no fallback for a POST.
    let req = Request::post(format!("{base}/fails"))
        .header("x-serin-canary", "always")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client, req).await.status, StatusCode::BAD_GATEWAY);
    proxy.shutdown();
    proxy.wait().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(!line.contains('\x1b') && !line.starts_with('{'), "{line}");
    for field in [
        "method=POST",
        "path=/fails",
        "upstream=canary",
        "status=502",
        "outcome=error",
        "trace_id=-",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_is_kept_as_sent_or_started_when_configured() {
    let dir = temp_dir("access-log-trace");
    let path = dir.join("access.log");
    let stable = TestUpstream::start("stable").await;
    let proxy = start(&stable, &stable.url(), 0, |c| {
        c.access_log = Some(log_config(&path));
        c.trace = TraceSettings {
            start: true,
            ..TraceSettings::default()
        };
    });
    let url = format!("http://{}/echo-headers", proxy.local_addr());
    let client = http1_client();
    let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let kept = get(
        &client,
        &url,
        &[("traceparent", theirs), ("x-request-id", "kept")],
    )
    .await;
    assert!(
        kept.body.contains(&format!("traceparent: {theirs}\n")),
        "{}",
        kept.body
    );
    let started = get(&client, &url, &[("x-request-id", "started")]).await;
    let forwarded = started
        .body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent upstream: {}", started.body))
        .to_owned();
    // An invalid one is replaced by a new trace, not passed on.
    let replaced = get(
        &client,
        &url,
        &[("traceparent", "00-zz-bad-01"), ("x-request-id", "bad")],
    )
    .await;
    assert!(!replaced.body.contains("00-zz-bad-01"), "{}", replaced.body);
    assert_eq!(
        replaced.body.matches("traceparent: ").count(),
        1,
        "{}",
        replaced.body
    );

    let lines = stop_and_read(proxy, &path).await;
    let trace_of = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .map(|l| l["trace_id"].as_str().unwrap_or("").to_owned())
            .unwrap()
    };
    assert_eq!(trace_of("kept"), "4bf92f3577b34da6a3ce929d0e0e4736");
    let started_trace = trace_of("started");
    assert_eq!(started_trace.len(), 32);
    assert_eq!(forwarded.len(), 55, "{forwarded}");
    assert_eq!(
        &forwarded[3..35],
        started_trace,
        "the upstream got the logged trace"
    );
    assert!(forwarded.starts_with("00-") && forwarded.ends_with("-01"));
}

/// A span attribute's value, as the collector prints it.
fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| {
            let value = a["value"].as_object().unwrap();
            value.values().next().unwrap()
        })
        .unwrap_or_else(|| panic!("no {key} in {span}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_join_the_clients_trace() {
    let mut collector = serin_tests::otlp_collector::OtlpCollector::start().await;
    let dir = temp_dir("access-log-spans");
    let path = dir.join("access.log");
    let stable = TestUpstream::start("stable").await;
    let endpoint = collector.endpoint.clone();
    let proxy = start(&stable, &stable.url(), 0, |c| {
        c.access_log = Some(log_config(&path));
        c.trace = TraceSettings {
            start: true,
            sample: 1.0,
            export: Some(serin_proxy::trace::SpanExport {
                endpoint,
                service_name: "checkout-edge".into(),
            }),
            ..TraceSettings::default()
        };
    });
    let base = format!("http://{}", proxy.local_addr());
    let h1 = http1_client();
    let client_parent = "00f067aa0ba902b7";
    let theirs = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{client_parent}-01");
    let joined = get(
        &h1,
        &format!("{base}/echo-headers?q=1"),
        &[("traceparent", &theirs), ("x-request-id", "joined")],
    )
    .await;
    let started = get(
        &h2c_client(),
        &format!("{base}/echo-headers"),
        &[("x-request-id", "started")],
    )
    .await;
    // Not sampled by the client: forwarded, never exported.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let skipped = get(
        &h1,
        &format!("{base}/"),
        &[("traceparent", unsampled), ("x-request-id", "skipped")],
    )
    .await;
    assert_eq!(skipped.status, StatusCode::OK);

    let upstream_parent = |body: &str| {
        let tp = body
            .lines()
            .find_map(|l| l.strip_prefix("traceparent: "))
            .unwrap_or_else(|| panic!("no traceparent upstream: {body}"))
            .to_owned();
        (tp[3..35].to_owned(), tp[36..52].to_owned())
    };
    let (joined_trace, joined_parent) = upstream_parent(&joined.body);
    assert_eq!(joined_trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        joined_parent, client_parent,
        "the upstream's parent is serin's span"
    );
    let (started_trace, started_parent) = upstream_parent(&started.body);

    let mut spans = HashMap::new();
    while spans.len() < 2 {
        let span = collector
            .next_span(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("only {} spans arrived: {spans:?}", spans.len()));
        let id = attr(&span["span"], "serin.request_id")
            .as_str()
            .unwrap()
            .to_owned();
        spans.insert(id, span);
    }
    let joined_span = &spans["joined"];
    let span = &joined_span["span"];
    assert_eq!(span["trace_id"], joined_trace);
    assert_eq!(span["span_id"], joined_parent);
    assert_eq!(span["parent_span_id"], client_parent);
    assert_eq!(span["kind"], "SPAN_KIND_SERVER");
    assert_eq!(span["name"], "GET");
    assert_eq!(attr(span, "http.request.method"), "GET");
    assert_eq!(attr(span, "url.path"), "/echo-headers");
    assert_eq!(
        attr(span, "url.query"),
        "q=REDACTED",
        "values stay out of spans by default"
    );
    assert_eq!(attr(span, "http.response.status_code"), 200);
    assert_eq!(attr(span, "network.protocol.version"), "1.1");
    assert_eq!(attr(span, "serin.upstream"), "stable");
    assert_eq!(attr(span, "serin.outcome"), "success");
    assert_eq!(attr(span, "client.address"), "127.0.0.1");
    assert!(span["end_time_unix_nano"].as_u64() >= span["start_time_unix_nano"].as_u64());
    assert_eq!(joined_span["request"]["canonical"], true);
    assert!(joined_span["resource"]["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["key"] == "service.name" && a["value"]["string_value"] == "checkout-edge"));
    let root = &spans["started"]["span"];
    assert_eq!(root["trace_id"], started_trace);
    assert_eq!(root["span_id"], started_parent);
    assert_eq!(
        root["parent_span_id"], "",
        "a trace serin started has no parent"
    );
    assert_eq!(attr(root, "network.protocol.version"), "2");
    let stats = proxy.stats().clone();
    // The access log names the same traces.
    let lines = stop_and_read(proxy, &path).await;
    let trace_of =
        |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap()["trace_id"].clone();
    assert_eq!(trace_of("joined"), joined_trace.as_str());
    assert_eq!(trace_of("started"), started_trace.as_str());
    assert_eq!(trace_of("skipped"), "11111111111111111111111111111111");
    // Stopped, the proxy has exported all it had: the two sampled spans,
    // and not the unsampled one.
    let export = stats.span_export().unwrap();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (count(&export.spans_exported), count(&export.spans_dropped)),
        (2, 0)
    );
}
