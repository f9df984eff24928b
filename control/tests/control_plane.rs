//! The control plane end to end, as an operator and a client see it: serin
//! started in-process (or as the `serin` binary) on 127.0.0.1:0 in front of
//! real upstreams, its control API driven by a real HTTP client, webhooks
//! received by a real server in the test.
//!
//! Every request loop is bounded in count and time, nothing sleeps to wait
//! for a condition (the loops poll `/status`, or use [`eventually`]), and no
//! port is fixed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use serin_control::config::{Config, Overrides};
use serin_control::Running;
use serin_tests::*;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, ClientBody>;

/// Requests in flight at once in the traffic loops.
const CONCURRENCY: usize = 4;

// === harness ===

/// serin in-process in front of a stable and a canary upstream.
struct Serin {
    running: Running,
    stable: TestUpstream,
    canary: TestUpstream,
    api: Api,
    client: HttpClient,
    proxy: String,
    /// The state directory, removed when the harness is dropped.
    _state: TempDir,
}

impl Serin {
    /// Starts serin with `extra` appended to a config that sets the
    /// listeners (port 0), a fresh state directory and both upstreams.
    async fn start(extra: &str) -> Self {
        let stage = Stage::new("control-plane", extra).await;
        let raw = Config::parse_toml(&stage.toml, Path::new("control_plane.toml")).expect("TOML");
        let config = Config::from_raw(raw, &Overrides::default()).expect("valid config");
        let running = Running::start(config).await.expect("serin starts");
        let api = Api::new(format!("http://{}", running.admin_addr));
        let proxy = format!("http://{}/", running.proxy.local_addr());
        Self {
            running,
            stable: stage.stable,
            canary: stage.canary,
            api,
            client: http1_client(),
            proxy,
            _state: stage.state,
        }
    }

    /// Sends `n` requests through the proxy, [`CONCURRENCY`] at a time.
    async fn traffic(&self, n: usize, method: &Method) -> Tally {
        traffic(&self.client, &self.proxy, n, method).await
    }

    /// Stops the data plane and the API.
    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.running.shutdown())
            .await
            .expect("serin stops within 10 s");
    }
}

/// A client of the control API.
struct Api {
    base: String,
    client: HttpClient,
}

impl Api {
    fn new(base: String) -> Self {
        Self {
            base,
            client: http1_client(),
        }
    }

    /// One call; the answer's body parsed as JSON (or as a JSON string when
    /// it is not JSON).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        authorization: Option<&str>,
    ) -> (StatusCode, Value, HeaderMap) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(value) = authorization {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_string()));
        let answer = send(&self.client, req.body(Either::Left(body)).unwrap()).await;
        let value = serde_json::from_str(&answer.body).unwrap_or(Value::String(answer.body));
        (answer.status, value, answer.headers)
    }

    /// A call that must answer 200; its JSON body.
    async fn ok(&self, method: Method, path: &str, body: Option<&str>) -> Value {
        let (status, value, _) = self.call(method.clone(), path, body, None).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {value}");
        value
    }

    async fn status(&self) -> Value {
        self.ok(Method::GET, "/status", None).await
    }

    async fn history(&self) -> Vec<Value> {
        match self.ok(Method::GET, "/history", None).await {
            Value::Array(list) => list,
            other => panic!("/history is not a list: {other}"),
        }
    }

    async fn metrics(&self) -> String {
        let (status, value, _) = self.call(Method::GET, "/metrics", None, None).await;
        assert_eq!(status, StatusCode::OK);
        value.as_str().expect("text").to_string()
    }

    async fn set_weight(&self, pct: f64) -> Value {
        let body = json!({ "canary": pct }).to_string();
        self.ok(Method::PUT, "/weight", Some(&body)).await
    }
}

/// `(phase, canary_weight)` of a status body.
fn phase_weight(status: &Value) -> (&str, f64) {
    (
        status["phase"].as_str().expect("phase"),
        status["canary_weight"].as_f64().expect("canary_weight"),
    )
}

/// What the clients saw.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    stable: usize,
    canary: usize,
    /// 5xx answers.
    failed: usize,
    /// Answers replayed on stable after the canary failed them.
    fell_back: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.stable += other.stable;
        self.canary += other.canary;
        self.failed += other.failed;
        self.fell_back += other.fell_back;
    }

    fn total(&self) -> usize {
        self.stable + self.canary
    }
}

/// Sends `n` requests (GETs, or POSTs with a small body) to `url`,
/// [`CONCURRENCY`] at a time, and tallies who answered and how.
async fn traffic(client: &HttpClient, url: &str, n: usize, method: &Method) -> Tally {
    let mut tally = Tally::default();
    let mut sent = 0;
    while sent < n {
        let batch = CONCURRENCY.min(n - sent);
        sent += batch;
        let answers = join_all((0..batch).map(|_| {
            let body = if method == Method::GET {
                empty()
            } else {
                Either::Left(Full::new(Bytes::from_static(b"{\"order\": 1}")))
            };
            let req = Request::builder()
                .method(method.clone())
                .uri(url)
                .body(body)
                .unwrap();
            send(client, req)
        }))
        .await;
        for a in answers {
            match a.upstream() {
                "stable" => tally.stable += 1,
                "canary" => tally.canary += 1,
                other => panic!("x-serin-upstream {other:?} in {a:?}"),
            }
            if a.status.is_server_error() {
                tally.failed += 1;
            } else {
                assert_eq!(a.status, StatusCode::OK, "{a:?}");
                assert_eq!(a.body, a.upstream(), "the body names who answered");
            }
            if a.headers.contains_key("x-serin-fallback") {
                tally.fell_back += 1;
            }
        }
    }
    tally
}

/// What a revert looked like from outside.
#[derive(Debug)]
struct Revert {
    /// Client-visible answers before `/status` showed the revert.
    tally: Tally,
    /// From the canary starting to fail to `/status` showing `rolled_back`.
    flip_to_status: Duration,
    /// From the first 5xx a client saw (if any) to `/status` showing it.
    first_failure_to_status: Option<Duration>,
    /// The status that first showed `rolled_back`.
    status: Value,
}

/// Makes the canary answer 500 from now on, then sends traffic in batches
/// until `/status` shows `rolled_back` (at most 2,000 requests or 20 s).
async fn fail_canary_until_reverted(serin: &Serin, method: &Method) -> Revert {
    serin.canary.set(Behavior {
        status: Some(500),
        ..Behavior::default()
    });
    let flipped = Instant::now();
    let mut tally = Tally::default();
    let mut first_failure = None;
    while tally.total() < 2000 && flipped.elapsed() < Duration::from_secs(20) {
        let batch = serin.traffic(CONCURRENCY, method).await;
        if batch.failed > 0 && first_failure.is_none() {
            first_failure = Some(Instant::now());
        }
        tally.add(batch);
        let status = serin.api.status().await;
        if status["phase"] == "rolled_back" {
            let seen = Instant::now();
            return Revert {
                tally,
                flip_to_status: seen - flipped,
                first_failure_to_status: first_failure.map(|t| seen - t),
                status,
            };
        }
    }
    panic!(
        "no revert after {} requests in {:?}: {:?}; status {}",
        tally.total(),
        flipped.elapsed(),
        tally,
        serin.api.status().await
    );
}

/// Sends traffic in batches until the canary's window is empty (the judge
/// has forgotten the failures), asserting on every batch that the canary
/// stays reverted and gets nothing. At most 30,000 requests or 15 s (the
/// proxy can serve 3,000 requests well inside the 1 s window).
async fn healthy_traffic_until_window_clears(serin: &Serin) {
    let canary_before = serin.canary.requests();
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let t = serin.traffic(2 * CONCURRENCY, &Method::GET).await;
        sent += t.total();
        assert_eq!(
            (t.canary, t.failed),
            (0, 0),
            "a reverted canary gets nothing"
        );
        let status = serin.api.status().await;
        assert_eq!(phase_weight(&status), ("rolled_back", 0.0), "{status}");
        assert_eq!(status["latched"], true);
        if status["upstreams"]["canary"]["requests"] == 0 {
            break;
        }
        assert!(
            sent < 30_000 && start.elapsed() < Duration::from_secs(15),
            "the canary window did not clear: {status}"
        );
    }
    assert_eq!(serin.canary.requests(), canary_before);
}

/// Sends GETs until the canary upstream has served `n` more requests (at
/// most 3,000 requests or 15 s); every answer must be a 200.
async fn until_canary_serves(serin: &Serin, n: u64) -> Tally {
    let target = serin.canary.requests() + n;
    let start = Instant::now();
    let mut tally = Tally::default();
    while serin.canary.requests() < target {
        assert!(
            tally.total() < 3000 && start.elapsed() < Duration::from_secs(15),
            "the canary served too little: {tally:?}; status {}",
            serin.api.status().await
        );
        tally.add(serin.traffic(2 * CONCURRENCY, &Method::GET).await);
    }
    assert_eq!(tally.failed, 0, "{tally:?}");
    tally
}

/// The value of the sample `name` (with its labels) in a Prometheus text
/// exposition.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
        .trim()
        .parse()
        .expect("a number")
}

// === 1. a failing canary is reverted ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_failing_mid_run_is_reverted_with_few_client_failures() {
    // The blast-radius scenario of bench/README.md ("Targets"): the canary at 10%, here
    // under as much load as the client can make (thousands of req/s).
    let serin = Serin::start("").await;
    let status = serin.api.set_weight(10.0).await;
    assert_eq!(phase_weight(&status), ("manual", 10.0));

    // Healthy: both upstreams serve, nothing fails, the judge leaves it be.
    let healthy = serin.traffic(300, &Method::POST).await;
    assert_eq!(healthy.failed, 0, "{healthy:?}");
    assert!(healthy.stable > 200 && healthy.canary > 5, "{healthy:?}");
    assert_eq!(phase_weight(&serin.api.status().await), ("manual", 10.0));

    // POSTs are never replayed on stable: every canary failure reaches a
    // client until the judge reverts.
    let revert = fail_canary_until_reverted(&serin, &Method::POST).await;
    println!(
        "POST clients: {} failed responses before the revert ({} requests), \
         canary failing → status rolled_back in {:?}, first client failure → status in {:?}; {}",
        revert.tally.failed,
        revert.tally.total(),
        revert.flip_to_status,
        revert.first_failure_to_status,
        revert.status["reason"],
    );
    assert!(
        (1..=30).contains(&revert.tally.failed),
        "{:?}",
        revert.tally
    );
    assert_eq!(revert.tally.fell_back, 0, "POSTs are not replayed");
    let status = &revert.status;
    assert_eq!(phase_weight(status), ("rolled_back", 0.0), "{status}");
    assert_eq!(status["latched"], true);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("canary"), "reason {reason:?}");
    assert!(
        status["upstreams"]["canary"]["errors"].as_u64().unwrap() >= 1,
        "{status}"
    );

    // From now on every request goes to stable, and none fails.
    let (stable_before, canary_before) = (serin.stable.requests(), serin.canary.requests());
    let after = serin.traffic(100, &Method::POST).await;
    assert_eq!((after.stable, after.canary, after.failed), (100, 0, 0));
    assert_eq!(serin.stable.requests(), stable_before + 100);
    assert_eq!(serin.canary.requests(), canary_before);

    let history = serin.api.history().await;
    let revert_entry = history
        .iter()
        .find(|t| t["actor"] == "judge" && t["phase"] == "rolled_back")
        .unwrap_or_else(|| panic!("no judge revert in {history:?}"));
    assert_eq!(
        (revert_entry["from"].as_f64(), revert_entry["to"].as_f64()),
        (Some(10.0), Some(0.0))
    );
    assert_eq!(revert_entry["reason"], status["reason"]);

    let metrics = serin.api.metrics().await;
    assert_eq!(
        sample(&metrics, "serin_rollbacks_total{actor=\"judge\"}"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "serin_rollbacks_total{actor=\"api\"}"),
        0.0
    );
    assert_eq!(sample(&metrics, "serin_canary_weight_ratio"), 0.0);
    assert!(
        sample(
            &metrics,
            "serin_requests_total{upstream=\"canary\",class=\"error\"}"
        ) >= revert.tally.failed as f64
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stable_fallback_get_clients_see_no_failure_yet_the_judge_reverts() {
    let serin = Serin::start("").await;
    serin.api.set_weight(50.0).await;
    let healthy = serin.traffic(200, &Method::GET).await;
    assert_eq!((healthy.failed, healthy.fell_back), (0, 0), "{healthy:?}");

    let revert = fail_canary_until_reverted(&serin, &Method::GET).await;
    println!(
        "GET clients with fallback: {} failed responses ({} replayed on stable) before the revert, \
         canary failing → status rolled_back in {:?}",
        revert.tally.failed, revert.tally.fell_back, revert.flip_to_status,
    );
    assert_eq!(revert.tally.failed, 0, "{:?}", revert.tally);
    assert!(revert.tally.fell_back >= 1, "{:?}", revert.tally);
    assert_eq!(revert.tally.canary, 0, "every canary failure was replayed");
    assert_eq!(phase_weight(&revert.status), ("rolled_back", 0.0));
    assert!(revert.status["reason"].as_str().unwrap().contains("canary"));

    let after = serin.traffic(40, &Method::GET).await;
    assert_eq!((after.stable, after.fell_back, after.failed), (40, 0, 0));
    let metrics = serin.api.metrics().await;
    assert_eq!(
        sample(&metrics, "serin_rollbacks_total{actor=\"judge\"}"),
        1.0
    );
    serin.stop().await;
}

/// A canary that hangs longer than its clients wait: each canary client
/// gives up after 300 ms and closes its connection, so no canary response
/// ever arrives. serin cancels those requests and counts them as abandoned,
/// with their wait as latency, so the judge reverts the canary on its p95
/// against stable's instead of never hearing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_slower_than_its_clients_patience_is_reverted_on_latency() {
    let serin = Serin::start("").await;
    serin.api.set_weight(10.0).await;
    serin.canary.set(Behavior {
        delay: Duration::from_secs(120),
        ..Behavior::default()
    });
    let proxy_addr = serin.running.proxy.local_addr();
    let start = Instant::now();
    let mut gave_up = 0;
    let status = loop {
        let status = serin.api.status().await;
        if status["phase"] == "rolled_back" {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30) && gave_up < 400,
            "no revert after {gave_up} abandoned canary requests: {status}"
        );
        // Stable traffic for the comparison, then canary clients that give up.
        let stable = join_all((0..CONCURRENCY).map(|_| {
            let req = Request::get(&serin.proxy)
                .header("x-serin-canary", "never")
                .body(empty())
                .unwrap();
            send(&serin.client, req)
        }))
        .await;
        assert!(stable
            .iter()
            .all(|a| a.status == StatusCode::OK && a.upstream() == "stable"));
        // Once the judge has reverted (possibly mid-batch), the override no
        // longer reaches the canary and stable answers: only the clients that
        // waited in vain count.
        let waits = join_all((0..CONCURRENCY).map(|_| async move {
            let mut stream = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nx-serin-canary: always\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf))
                .await
                .is_err()
        }))
        .await;
        gave_up += waits.iter().filter(|gave_up| **gave_up).count();
    };
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("p95"), "{status}");
    // The judge may revert before min_requests when every canary sample is
    // far slower than stable's; what must hold is that each canary request
    // was counted as abandoned (serin notices a client's close a moment
    // after the client gives up) and cancelled upstream, never as an error.
    // A request abandoned before it reached the canary counts too.
    eventually(
        Duration::from_secs(10),
        "every canary request was counted abandoned and cancelled upstream",
        || async {
            let metrics = serin.api.metrics().await;
            let abandoned = sample(
                &metrics,
                "serin_requests_total{upstream=\"canary\",class=\"abandoned\"}",
            );
            let requests = serin.canary.requests();
            requests > 0 && abandoned >= requests as f64 && serin.canary.cancelled() == requests
        },
    )
    .await;
    assert_eq!(
        sample(
            &serin.api.metrics().await,
            "serin_requests_total{upstream=\"canary\",class=\"error\"}"
        ),
        0.0,
        "a client leaving is not the canary's error"
    );
    serin.stop().await;
}

/// Sends GETs in rounds of 100 until `/status` shows a revert, at most
/// `max` requests; the status and the canary requests served meanwhile.
async fn traffic_until_reverted(serin: &Serin, max: usize) -> (Value, u64) {
    let canary_before = serin.canary.requests();
    for _ in 0..max / 100 {
        serin.traffic(100, &Method::GET).await;
        let status = serin.api.status().await;
        if status["phase"] == "rolled_back" {
            return (status, serin.canary.requests() - canary_before);
        }
    }
    panic!(
        "no revert after {max} requests: {}",
        serin.api.status().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modest_error_regression_is_reverted_on_its_evidence() {
    let serin = Serin::start("").await;
    let errors = |ratio| Behavior {
        error_ratio: ratio,
        ..Behavior::default()
    };
    serin.stable.set(errors(0.01));
    serin.canary.set(errors(0.01));
    serin.api.set_weight(25.0).await;
    // As good as stable: left alone.
    serin.traffic(2_000, &Method::GET).await;
    assert_eq!(phase_weight(&serin.api.status().await), ("manual", 25.0));

    // 1% -> 4%: under the 5% limit, so only the comparison with stable
    // over the same time can catch it.
    serin.canary.set(errors(0.04));
    let (status, served) = traffic_until_reverted(&serin, 20_000).await;
    let reason = status["reason"].as_str().unwrap();
    println!("1% -> 4% reverted after {served} canary requests: {reason}");
    assert!(reason.starts_with("canary errors "), "{reason}");
    assert!(reason.contains(" vs stable "), "{reason}");
    assert!(reason.contains("canary requests: e-value "), "{reason}");
    assert!(reason.contains(" ≥ 1/α = "), "{reason}");
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowdown_both_share_is_not_reverted_but_a_slower_canary_is() {
    let serin = Serin::start("").await;
    let delay = |ms| Behavior {
        delay: Duration::from_millis(ms),
        ..Behavior::default()
    };
    serin.api.set_weight(30.0).await;
    serin.traffic(400, &Method::GET).await;
    // A dependency both use slows down at the moment the weight changes
    // (the window judge reverted this healthy canary within seconds).
    serin.stable.set(delay(15));
    serin.canary.set(delay(15));
    serin.api.set_weight(40.0).await;
    serin.traffic(800, &Method::GET).await;
    assert_eq!(phase_weight(&serin.api.status().await), ("manual", 40.0));

    // The canary alone at twice stable's latency.
    serin.canary.set(delay(30));
    let (status, served) = traffic_until_reverted(&serin, 4_000).await;
    let reason = status["reason"].as_str().unwrap();
    println!("2x latency reverted after {served} canary requests: {reason}");
    assert!(
        reason.starts_with("canary latency over 1.1× stable's: p50 "),
        "{reason}"
    );
    assert!(served < 1_000, "{served} canary requests: {reason}");
    serin.stop().await;
}

// === 2. the latch ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_revert_is_latched_until_weight_or_rollout_is_called() {
    // A 1 s window so that the failures age out quickly: within one window
    // of a revert, a canary brought back is still judged on the failures
    // that reverted it (documented in controller.rs).
    let serin = Serin::start("[judge]\nwindow = \"1s\"\n").await;
    serin.api.set_weight(50.0).await;
    serin.traffic(100, &Method::GET).await;
    fail_canary_until_reverted(&serin, &Method::GET).await;

    // The canary is healthy again, but healthy traffic does not bring it
    // back, not even once the judge has forgotten the failures.
    serin.canary.set(Behavior::default());
    healthy_traffic_until_window_clears(&serin).await;

    // Promote and pause are refused while latched; nothing changes.
    for path in ["/promote", "/pause"] {
        let (code, answer, _) = serin.api.call(Method::POST, path, None, None).await;
        assert_eq!(code, StatusCode::CONFLICT, "POST {path}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("rolled back"));
    }
    assert_eq!(
        phase_weight(&serin.api.status().await),
        ("rolled_back", 0.0)
    );

    // An explicit weight does.
    let status = serin.api.set_weight(10.0).await;
    assert_eq!(phase_weight(&status), ("manual", 10.0));
    assert_eq!(status["latched"], false);
    until_canary_serves(&serin, 20).await;
    assert_eq!(phase_weight(&serin.api.status().await), ("manual", 10.0));

    // It fails again: reverted again, by the judge.
    fail_canary_until_reverted(&serin, &Method::GET).await;
    serin.canary.set(Behavior::default());
    healthy_traffic_until_window_clears(&serin).await;

    // A rollout brings it back too.
    let (code, status, _) = serin
        .api
        .call(
            Method::POST,
            "/rollout",
            Some(r#"{"steps": [25, 100], "hold": "1h"}"#),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(phase_weight(&status), ("progressing", 25.0));
    assert_eq!(status["step"], 1);
    until_canary_serves(&serin, 20).await;
    assert_eq!(
        phase_weight(&serin.api.status().await),
        ("progressing", 25.0)
    );

    let judge_reverts = serin
        .api
        .history()
        .await
        .into_iter()
        .filter(|t| t["actor"] == "judge" && t["phase"] == "rolled_back")
        .count();
    assert_eq!(judge_reverts, 2);
    let metrics = serin.api.metrics().await;
    assert_eq!(
        sample(&metrics, "serin_rollbacks_total{actor=\"judge\"}"),
        2.0
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_canary_that_breaks_is_reverted_too() {
    // Until stable is redeployed it is still the fallback.
    let serin = Serin::start("").await;
    let status = serin.api.ok(Method::POST, "/promote", None).await;
    assert_eq!(phase_weight(&status), ("promoted", 100.0));
    let t = serin.traffic(100, &Method::GET).await;
    assert_eq!((t.canary, t.failed), (100, 0));

    let revert = fail_canary_until_reverted(&serin, &Method::GET).await;
    assert_eq!(revert.tally.failed, 0, "GETs fall back to stable");
    assert_eq!(phase_weight(&revert.status), ("rolled_back", 0.0));
    let t = serin.traffic(40, &Method::GET).await;
    assert_eq!((t.stable, t.failed), (40, 0));
    let last = serin.api.history().await.pop().unwrap();
    assert_eq!(
        (last["actor"].as_str(), last["from"].as_f64()),
        (Some("judge"), Some(100.0))
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_judge_revert_override_always_does_not_reach_the_canary() {
    // The README: a revert to 0 moves everyone back to stable; after
    // a revert, "traffic goes back to the canary only on an explicit
    // rollout, weight or resume call".
    let serin = Serin::start("").await;
    serin.api.set_weight(50.0).await;
    serin.traffic(100, &Method::GET).await;
    fail_canary_until_reverted(&serin, &Method::GET).await;

    let canary_before = serin.canary.requests();
    let mut failed = Vec::new();
    for (name, value) in [
        ("x-serin-canary", "always"),
        ("cookie", "serin-canary=always"),
    ] {
        for _ in 0..10 {
            let req = Request::post(&serin.proxy)
                .header(name, value)
                .body(Either::Left(Full::new(Bytes::from_static(b"{}"))))
                .unwrap();
            let a = send(&serin.client, req).await;
            if a.status != StatusCode::OK || a.upstream() != "stable" {
                failed.push(format!(
                    "{name}: {value} → {} from {}",
                    a.status,
                    a.upstream()
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 20 overridden POSTs reached the reverted canary ({} canary requests), e.g. {:?}",
        failed.len(),
        serin.canary.requests() - canary_before,
        &failed[..failed.len().min(2)],
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_canary_brought_back_by_hand_is_judged_on_new_requests() {
    let serin = Serin::start("").await;
    serin.api.set_weight(50.0).await;
    serin.traffic(100, &Method::GET).await;
    // 30% errors: reverted by the window check, not by a run of errors.
    serin.canary.set(Behavior {
        error_ratio: 0.3,
        ..Behavior::default()
    });
    let start = Instant::now();
    loop {
        serin.traffic(2 * CONCURRENCY, &Method::GET).await;
        if serin.api.status().await["phase"] == "rolled_back" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no revert");
    }

    // Fixed, and brought back at once by hand.
    serin.canary.set(Behavior::default());
    assert_eq!(
        phase_weight(&serin.api.set_weight(50.0).await),
        ("manual", 50.0)
    );
    let t = serin.traffic(200, &Method::GET).await;
    assert_eq!(t.failed, 0);
    let status = serin.api.status().await;
    assert_eq!(
        phase_weight(&status),
        ("manual", 50.0),
        "a healthy canary was reverted again after {} healthy canary requests: {}",
        t.canary,
        status["reason"]
    );
    serin.stop().await;
}

// === 3. webhooks ===

/// One request a webhook receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    answered: StatusCode,
}

/// A webhook receiver on 127.0.0.1:0 that answers 500 to its first
/// `fail_first` requests and 204 after.
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/serin", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body: Bytes = BodyExt::collect(body)
                                .await
                                .map(|c: http_body_util::Collected<Bytes>| c.to_bytes())
                                .unwrap_or_default();
                            let mut hits = seen.lock().unwrap();
                            let answered = if hits.len() < fail_first {
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::NO_CONTENT
                            };
                            hits.push(Hit {
                                headers: parts.headers,
                                body,
                                answered,
                            });
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = answered;
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, hits, task }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// `hex(HMAC-SHA256(secret, body))`, computed here independently of serin.
fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks one delivery's signature and JSON body; returns the body.
fn verified_rollback(hit: &Hit, secret: &str) -> Value {
    let signature = hit
        .headers
        .get("x-serin-signature")
        .expect("X-Serin-Signature")
        .to_str()
        .unwrap();
    let expected = format!("sha256={}", hmac_sha256_hex(secret.as_bytes(), &hit.body));
    assert_eq!(
        signature, expected,
        "the signature is HMAC-SHA256 of the body"
    );
    assert_eq!(
        serin_control::webhook::sign(secret.as_bytes(), &hit.body),
        expected,
        "cross-check with serin's own signer"
    );
    assert_ne!(
        signature,
        format!("sha256={}", hmac_sha256_hex(b"not the secret", &hit.body))
    );
    assert_eq!(hit.headers.get("content-type").unwrap(), "application/json");
    let body: Value = serde_json::from_slice(&hit.body).expect("a JSON body");
    for key in [
        "id",
        "event",
        "at",
        "canary_weight",
        "phase",
        "reason",
        "upstreams",
    ] {
        assert!(body.get(key).is_some(), "no {key:?} in {body}");
    }
    assert_eq!(body["event"], "rollback");
    assert_eq!(body["phase"], "rolled_back");
    assert_eq!(body["canary_weight"], 0.0);
    assert!(
        body["reason"].as_str().unwrap().contains("canary"),
        "{body}"
    );
    assert!(!body["id"].as_str().unwrap().is_empty());
    assert!(
        body["at"].as_str().unwrap().ends_with('Z'),
        "RFC 3339 UTC: {body}"
    );
    assert!(
        body["upstreams"]["canary"]["errors"].as_u64().unwrap() >= 1,
        "{body}"
    );
    assert!(body["upstreams"]["stable"]["requests"].as_u64().is_some());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_revert_fires_a_signed_rollback_webhook_that_is_retried() {
    let secret = "webhook-s3cret";
    let prompt = Receiver::start(0).await;
    let flaky = Receiver::start(2).await;
    // A receiver that accepts connections and never answers: it must not
    // hold up the others, the judge or the data plane.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let silent_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let serin = Serin::start(&format!(
        "[[webhook]]\nurl = \"{silent_url}\"\n\
         [[webhook]]\nurl = \"{}\"\nsecret = \"{secret}\"\n\
         [[webhook]]\nurl = \"{}\"\nsecret = \"{secret}\"\nevents = [\"rollback\"]\n",
        prompt.url, flaky.url
    ))
    .await;
    serin.api.set_weight(50.0).await;
    serin.traffic(100, &Method::GET).await;
    assert!(prompt.hits().is_empty(), "a weight change is not an event");
    let revert = fail_canary_until_reverted(&serin, &Method::GET).await;
    let reverted = Instant::now();

    // Well within the 5 s the silent receiver's attempt may take.
    eventually(
        Duration::from_secs(3),
        "the prompt receiver gets the rollback",
        || async {
            prompt
                .hits()
                .iter()
                .any(|h| h.body.windows(8).any(|w| w == b"rollback"))
        },
    )
    .await;
    let hits = prompt.hits();
    assert_eq!(hits.len(), 1, "one event, delivered once: {hits:?}");
    let event = verified_rollback(&hits[0], secret);
    assert_eq!(event["reason"], revert.status["reason"]);
    assert_eq!(
        hits[0].headers.get("x-serin-event-id").unwrap(),
        event["id"].as_str().unwrap()
    );

    // The flaky receiver answers 500 twice; the third attempt gets through,
    // with the same event and signature.
    eventually(
        Duration::from_secs(4),
        "the flaky receiver gets the rollback on the third attempt",
        || async { flaky.hits().len() >= 3 },
    )
    .await;
    println!(
        "webhook: delivered to a receiver failing twice {:?} after the revert was visible",
        reverted.elapsed()
    );
    let hits = flaky.hits();
    assert_eq!(
        hits.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::NO_CONTENT
        ]
    );
    for hit in &hits {
        let retried = verified_rollback(hit, secret);
        assert_eq!(retried["id"], event["id"], "one event id across retries");
        assert_eq!(hit.body, hits[0].body, "the same body on every attempt");
    }
    let metrics = serin.api.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "serin_webhook_deliveries_total{outcome=\"delivered\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "serin_webhook_deliveries_total{outcome=\"retried\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "serin_webhook_deliveries_total{outcome=\"failed\"}"
        ),
        0.0
    );
    // The silent receiver's attempt is still pending; the proxy serves on.
    let t = serin.traffic(40, &Method::GET).await;
    assert_eq!((t.stable, t.failed), (40, 0));
    silent_task.abort();
    serin.stop().await;
}

// === 4. token auth ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_mutating_calls_need_it_and_change_nothing_without_it() {
    let token = "t0ken-for-tests";
    let serin = Serin::start(&format!("admin_token = \"{token}\"\n")).await;
    let api = &serin.api;
    let before = api.status().await;
    let history = api.history().await.len();
    assert_eq!(phase_weight(&before), ("steady", 0.0));

    let calls: [(Method, &str, Option<&str>); 7] = [
        (Method::PUT, "/weight", Some(r#"{"canary": 10}"#)),
        (Method::POST, "/rollout", Some(r#"{"steps": [10, 100]}"#)),
        (Method::POST, "/rollout", None),
        (Method::POST, "/pause", None),
        (Method::POST, "/resume", None),
        (Method::POST, "/promote", None),
        (Method::POST, "/rollback", None),
    ];
    let wrong = [
        None,
        Some("Bearer wrong-token"),
        Some("Bearer "),
        Some("Bearer t0ken-for-test"),
        Some("Bearer t0ken-for-tests-and-more"),
        Some("Basic dDBrZW4tZm9yLXRlc3Rz"),
        Some(token),
    ];
    for (method, path, body) in &calls {
        for authorization in wrong {
            let (code, answer, _) = api.call(method.clone(), path, *body, authorization).await;
            assert_eq!(
                code,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {authorization:?}: {answer}"
            );
            assert!(answer["error"].is_string(), "{answer}");
        }
    }
    // A bad body without the token is still a 401: nothing is parsed.
    let (code, _, _) = api
        .call(Method::PUT, "/weight", Some("{not json"), None)
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // Nothing changed, and the canary got nothing.
    let after = api.status().await;
    assert_eq!(phase_weight(&after), ("steady", 0.0));
    assert_eq!(after["reason"], before["reason"]);
    assert_eq!(api.history().await.len(), history);
    let t = serin.traffic(40, &Method::GET).await;
    assert_eq!((t.stable, t.canary), (40, 0));

    // Reads need no token.
    for path in ["/status", "/history", "/metrics", "/healthz", "/readyz"] {
        let (code, _, _) = api.call(Method::GET, path, None, None).await;
        assert_eq!(code, StatusCode::OK, "GET {path}");
    }

    // The right token works.
    let bearer = format!("Bearer {token}");
    let (code, status, _) = api
        .call(
            Method::PUT,
            "/weight",
            Some(r#"{"canary": 10}"#),
            Some(&bearer),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(phase_weight(&status), ("manual", 10.0));
    until_canary_serves(&serin, 5).await;
    let (code, status, _) = api
        .call(Method::POST, "/rollback", None, Some(&bearer))
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(phase_weight(&status), ("rolled_back", 0.0));
    let history = api.history().await;
    let last = history.last().unwrap();
    assert_eq!(
        (&last["actor"], &last["phase"]),
        (&json!("api"), &json!("rolled_back"))
    );
    serin.stop().await;
}

// === 5. bad calls ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_calls_get_400_404_or_405_and_change_nothing() {
    let serin = Serin::start("").await;
    let api = &serin.api;
    serin.traffic(8, &Method::GET).await;
    let history = api.history().await.len();

    let bad_bodies = [
        (Method::PUT, "/weight", r#"{"canary": "#),
        (Method::PUT, "/weight", "canary=10"),
        (Method::PUT, "/weight", r#"{"canary": 150}"#),
        (Method::PUT, "/weight", r#"{"canary": -1}"#),
        (Method::PUT, "/weight", r#"{"canary": 100.5}"#),
        (Method::PUT, "/weight", r#"{"canary": "10"}"#),
        (Method::PUT, "/weight", r#"{"canary": 10, "stable": 90}"#),
        (Method::PUT, "/weight", r#"{}"#),
        (Method::PUT, "/weight", ""),
        (Method::PUT, "/weight", r#"{"canary": 10} trailing"#),
        (Method::PUT, "/weight", r#"{"canary": 10, "canary": 20}"#),
        (Method::PUT, "/weight", r#"{"canary": 1e400}"#),
        (Method::PUT, "/weight", "null"),
        (Method::POST, "/rollout", r#"{"steps": [0, 100]}"#),
        (Method::POST, "/rollout", r#"{"steps": [5, 150]}"#),
        (Method::POST, "/rollout", r#"{"hold": "0s"}"#),
        (Method::POST, "/rollout", r#"{"hold": 60}"#),
        (Method::POST, "/rollout", r#"{"steps": [50, 25]}"#),
        (Method::POST, "/rollout", r#"{"steps": [5, 25, 50]}"#),
        (Method::POST, "/rollout", r#"{"steps": []}"#),
        (Method::POST, "/rollout", r#"{"hold": "soon"}"#),
        (
            Method::POST,
            "/rollout",
            r#"{"steps": [5, 100], "paws": 1}"#,
        ),
    ];
    for (method, path, body) in bad_bodies {
        let (code, answer, headers) = api.call(method.clone(), path, Some(body), None).await;
        assert_eq!(
            code,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}: {answer}"
        );
        let message = answer["error"].as_str().unwrap_or_else(|| {
            panic!("{method} {path} {body}: no JSON {{\"error\": ..}} in {answer}")
        });
        assert!(!message.is_empty());
        assert_eq!(headers.get("content-type").unwrap(), "application/json");
    }
    // An oversized body is refused without being read whole.
    let huge = format!(
        "{{\"canary\": 10, \"pad\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let (code, answer, _) = api.call(Method::PUT, "/weight", Some(&huge), None).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].is_string(), "{answer}");

    // The messages say what is wrong.
    let (_, answer, _) = api
        .call(Method::PUT, "/weight", Some(r#"{"canary": 150}"#), None)
        .await;
    assert!(
        answer["error"].as_str().unwrap().contains("150"),
        "{answer}"
    );
    let (_, answer, _) = api
        .call(Method::POST, "/rollout", Some(r#"{"hold": "soon"}"#), None)
        .await;
    assert!(
        answer["error"].as_str().unwrap().contains("soon"),
        "{answer}"
    );

    for path in ["/nope", "/status/extra", "/", "/weights"] {
        let (code, answer, _) = api.call(Method::GET, path, None, None).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "GET {path}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    for (method, path, allow) in [
        (Method::POST, "/status", "GET"),
        (Method::DELETE, "/history", "GET"),
        (Method::GET, "/weight", "PUT"),
        (Method::POST, "/weight", "PUT"),
        (Method::GET, "/rollback", "POST"),
        (Method::PUT, "/rollout", "POST"),
    ] {
        let (code, answer, headers) = api.call(method.clone(), path, None, None).await;
        assert_eq!(
            code,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {answer}"
        );
        assert_eq!(headers.get("allow").unwrap(), allow);
        assert!(answer["error"].is_string(), "{answer}");
    }

    // Nothing changed, and the proxy and the API keep serving.
    let status = api.status().await;
    assert_eq!(phase_weight(&status), ("steady", 0.0));
    assert_eq!(api.history().await.len(), history);
    let t = serin.traffic(40, &Method::GET).await;
    assert_eq!((t.stable, t.failed), (40, 0));
    assert_eq!(phase_weight(&api.set_weight(20.0).await), ("manual", 20.0));
    serin.stop().await;
}

// === 6. a progressive rollout ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_holds_without_traffic_and_is_promoted_with_it() {
    let hooks = Receiver::start(0).await;
    let serin = Serin::start(&format!(
        "[rollout]\nhold = \"200ms\"\nmin_requests_per_step = 5\n[[webhook]]\nurl = \"{}\"\n",
        hooks.url
    ))
    .await;
    let api = &serin.api;
    let (code, status, _) = api
        .call(
            Method::POST,
            "/rollout",
            Some(r#"{"steps": [10, 50, 100]}"#),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(phase_weight(&status), ("progressing", 10.0));
    assert_eq!(
        (&status["step"], &status["steps"]),
        (&json!(1), &json!([10.0, 50.0, 100.0]))
    );

    // No traffic: once the hold is over the step is held, and the reason
    // says it is waiting for requests. It is not a failure.
    let started = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the status says the step is holding for requests",
        || async {
            let status = api.status().await;
            status["reason"]
                .as_str()
                .is_some_and(|r| r.contains("holding step 1"))
        },
    )
    .await;
    let status = api.status().await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(phase_weight(&status), ("progressing", 10.0), "{status}");
    assert_eq!(status["step"], 1);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("0 of 5 canary requests"), "{reason}");
    assert_eq!(serin.canary.requests(), 0);
    assert!(api
        .history()
        .await
        .iter()
        .all(|t| t["phase"] != "rolled_back"));
    let metrics = api.metrics().await;
    assert_eq!(sample(&metrics, "serin_rollout_step"), 1.0);
    assert_eq!(sample(&metrics, "serin_canary_weight_ratio"), 0.1);

    // With traffic the steps advance to promotion.
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut weights = vec![10.0];
    loop {
        tally.add(serin.traffic(2 * CONCURRENCY, &Method::GET).await);
        let status = api.status().await;
        let (phase, weight) = phase_weight(&status);
        if weights.last() != Some(&weight) {
            weights.push(weight);
        }
        if phase == "promoted" {
            break;
        }
        assert_eq!(phase, "progressing", "{status}");
        assert!(
            tally.total() < 4000 && start.elapsed() < Duration::from_secs(20),
            "not promoted after {tally:?}: {status}"
        );
    }
    println!(
        "rollout [10, 50, 100] with a 200ms hold promoted after {} requests in {:?}",
        tally.total(),
        start.elapsed()
    );
    assert_eq!(tally.failed, 0);
    assert_eq!(weights, [10.0, 50.0, 100.0], "each step in turn");
    let status = api.status().await;
    assert_eq!(phase_weight(&status), ("promoted", 100.0));
    assert_eq!(status["latched"], false);

    let t = serin.traffic(40, &Method::GET).await;
    assert_eq!(
        (t.canary, t.failed),
        (40, 0),
        "promoted: the canary serves all"
    );
    let history = api.history().await;
    let by_judge: Vec<_> = history
        .iter()
        .filter(|t| t["actor"] == "judge")
        .map(|t| (t["to"].as_f64().unwrap(), t["phase"].as_str().unwrap()))
        .collect();
    assert_eq!(
        by_judge,
        [
            (50.0, "progressing"),
            (100.0, "progressing"),
            (100.0, "promoted")
        ],
        "the last step is held like the others, then promoted"
    );
    let metrics = api.metrics().await;
    assert_eq!(sample(&metrics, "serin_canary_weight_ratio"), 1.0);
    assert_eq!(
        sample(&metrics, "serin_rollbacks_total{actor=\"judge\"}"),
        0.0
    );

    // The webhook heard every step, the hold and the promotion (unsigned:
    // this receiver has no secret).
    let events = || -> Vec<String> {
        hooks
            .hits()
            .iter()
            .map(|h| {
                assert!(!h.headers.contains_key("x-serin-signature"));
                let body: Value = serde_json::from_slice(&h.body).unwrap();
                body["event"].as_str().unwrap().to_string()
            })
            .collect()
    };
    eventually(
        Duration::from_secs(10),
        "the promoted webhook arrives",
        || async { events().iter().any(|e| e == "promoted") },
    )
    .await;
    let mut events = events();
    events.sort();
    let steps = events.iter().filter(|e| *e == "step").count();
    assert_eq!(steps, 3, "rollout start, then 50% and 100%: {events:?}");
    events.dedup();
    assert_eq!(events, ["judge_blocked", "promoted", "step"]);
    serin.stop().await;
}

// === 7. durability, with the real binary ===

/// `serin run` with a state directory, in front of the given upstreams.
async fn spawn_serin(
    dir: &Path,
    stable: &TestUpstream,
    canary: &TestUpstream,
    extra: &[&str],
) -> (SerinProcess, Api) {
    let config = dir.join("serin.toml");
    std::fs::write(&config, "log = \"error\"\n").unwrap();
    let state = dir.join("state");
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let serin = SerinProcess::run(env!("CARGO_BIN_EXE_serin"), stable, canary, &state, &args).await;
    let api = Api::new(format!("http://{}", serin.admin.expect("admin address")));
    let (code, _, _) = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(code, StatusCode::OK, "ready once it printed its addresses");
    (serin, api)
}

async fn kill_9(mut serin: SerinProcess) {
    serin.signal("KILL");
    let status = tokio::time::timeout(Duration::from_secs(10), serin.child.wait())
        .await
        .expect("serin dies within 10 s")
        .unwrap();
    assert!(!status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_and_revert_survive_kill_9_and_a_corrupt_state_starts_at_0() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let dir = temp_dir("durable");
    let client = http1_client();

    // A weight set by hand survives kill -9, with its history.
    let (serin, api) = spawn_serin(&dir, &stable, &canary, &[]).await;
    assert_eq!(phase_weight(&api.status().await), ("steady", 0.0));
    assert_eq!(phase_weight(&api.set_weight(25.0).await), ("manual", 25.0));
    kill_9(serin).await;

    let (serin, api) = spawn_serin(&dir, &stable, &canary, &[]).await;
    let status = api.status().await;
    assert_eq!(phase_weight(&status), ("manual", 25.0), "{status}");
    let history = api.history().await;
    assert!(
        history
            .iter()
            .any(|t| t["actor"] == "api" && t["to"] == 25.0 && t["phase"] == "manual"),
        "{history:?}"
    );
    let startups = history.iter().filter(|t| t["actor"] == "startup").count();
    assert_eq!(startups, 2, "one per start: {history:?}");
    let url = format!("http://{}/", serin.proxy);
    let t = traffic(&client, &url, 200, &Method::GET).await;
    assert!(t.canary > 10 && t.stable > 60 && t.failed == 0, "{t:?}");

    // A judge revert survives kill -9 too: it is saved before /status shows it.
    canary.set(Behavior {
        status: Some(500),
        ..Behavior::default()
    });
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let t = traffic(&client, &url, 2 * CONCURRENCY, &Method::GET).await;
        assert_eq!(t.failed, 0, "GETs fall back to stable");
        sent += t.total();
        if api.status().await["phase"] == "rolled_back" {
            break;
        }
        assert!(
            sent < 3000 && start.elapsed() < Duration::from_secs(20),
            "no revert after {sent} requests"
        );
    }
    kill_9(serin).await;
    canary.set(Behavior::default());

    let (serin, api) = spawn_serin(&dir, &stable, &canary, &[]).await;
    let status = api.status().await;
    assert_eq!(phase_weight(&status), ("rolled_back", 0.0), "{status}");
    assert_eq!(status["latched"], true);
    let history = api.history().await;
    assert!(
        history
            .iter()
            .any(|t| t["actor"] == "judge" && t["phase"] == "rolled_back"),
        "{history:?}"
    );
    let url = format!("http://{}/", serin.proxy);
    let canary_before = canary.requests();
    let t = traffic(&client, &url, 40, &Method::GET).await;
    assert_eq!((t.stable, t.failed), (40, 0));
    assert_eq!(canary.requests(), canary_before, "still latched at 0");
    kill_9(serin).await;

    // A corrupt state file: the canary starts at 0 (even with a start-up
    // weight configured), serin serves, and /status says why.
    let state_file = dir.join("state").join("state.json");
    std::fs::write(&state_file, b"{\"version\": 1, \"rollout\": \x00garbage").unwrap();
    let (serin, api) = spawn_serin(&dir, &stable, &canary, &["--canary-weight", "50"]).await;
    let status = api.status().await;
    assert_eq!(phase_weight(&status), ("steady", 0.0), "{status}");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("corrupt") && reason.contains("state.json"),
        "the reason says why: {reason}"
    );
    let t = traffic(
        &client,
        &format!("http://{}/", serin.proxy),
        40,
        &Method::GET,
    )
    .await;
    assert_eq!((t.stable, t.failed), (40, 0));
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the bad file is kept aside for inspection");
    assert!(std::fs::read(&aside[0]).unwrap().ends_with(b"garbage"));
    // And a good state was written in its place.
    let saved: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(saved["rollout"]["canary_weight_bp"], 0);
    kill_9(serin).await;

    // Files that parse but cannot be trusted are refused the same way: one
    // from a future format, and one whose fields contradict each other (a
    // revert that still gives the canary 25%).
    let mut future = saved.clone();
    future["version"] = json!(99);
    let mut inconsistent = saved.clone();
    inconsistent["rollout"]["phase"] = json!("rolled_back");
    inconsistent["rollout"]["latched"] = json!(true);
    inconsistent["rollout"]["canary_weight_bp"] = json!(2500);
    for (file, why) in [(future, "version 99"), (inconsistent, "2500 bp")] {
        let dir = temp_dir("untrusted");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("state").join("state.json"), file.to_string()).unwrap();
        let (serin, api) = spawn_serin(&dir, &stable, &canary, &["--canary-weight", "50"]).await;
        let status = api.status().await;
        assert_eq!(phase_weight(&status), ("steady", 0.0), "{status}");
        let reason = status["reason"].as_str().unwrap();
        assert!(reason.contains(why), "the reason says why: {reason}");
        let canary_before = canary.requests();
        let url = format!("http://{}/", serin.proxy);
        let t = traffic(&client, &url, 40, &Method::GET).await;
        assert_eq!((t.stable, t.failed), (40, 0));
        assert_eq!(canary.requests(), canary_before);
        kill_9(serin).await;
    }
}

// === 8. probes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_200_once_started() {
    let serin = Serin::start("").await;
    for path in ["/healthz", "/readyz"] {
        let (code, body, headers) = serin.api.call(Method::GET, path, None, None).await;
        assert_eq!(code, StatusCode::OK, "GET {path}: {body}");
        assert!(body.is_object(), "{body}");
        assert_eq!(headers.get("content-type").unwrap(), "application/json");
    }
    serin.stop().await;
}

// === overload limits are not the canary's errors ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_are_counted_apart_and_never_judged() {
    // One token every 1000 s: after its burst of 5, the key is refused.
    let serin = Serin::start(
        "[rate_limit]\nrequests_per_second = 0.001\nburst = 5\nkey = \"header:x-api-key\"\n",
    )
    .await;
    serin.api.set_weight(50.0).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let a = get(&serin.client, &serin.proxy, &[("x-api-key", "flood")]).await;
        statuses.push(a.status);
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((served, limited), (5, 55), "{statuses:?}");

    // 55 refusals, well over the judge's min_requests, yet no revert: the
    // windows hold the 5 served requests (each settles as its response
    // ends) and nothing else, and the judge, which has looked at them
    // since, left the canary alone.
    eventually(
        Duration::from_secs(10),
        "the 5 served requests in the windows",
        || async {
            let status = serin.api.status().await;
            let requests = |t: &str| status["upstreams"][t]["requests"].as_u64().unwrap_or(0);
            requests("stable") + requests("canary") == 5
        },
    )
    .await;
    let status = serin.api.status().await;
    assert_eq!(phase_weight(&status), ("manual", 50.0), "{status}");
    let upstreams = &status["upstreams"];
    let requests = |t: &str| upstreams[t]["requests"].as_u64().unwrap();
    assert_eq!(requests("stable") + requests("canary"), 5, "{status}");
    assert_eq!(upstreams["canary"]["errors"], 0, "{status}");

    let metrics = serin.api.metrics().await;
    assert_eq!(sample(&metrics, "serin_rate_limited_requests_total"), 55.0);
    assert_eq!(sample(&metrics, "serin_rate_limit_keys"), 1.0);
    let class = |upstream: &str, class: &str| {
        sample(
            &metrics,
            &format!("serin_requests_total{{upstream=\"{upstream}\",class=\"{class}\"}}"),
        )
    };
    assert_eq!(class("stable", "success") + class("canary", "success"), 5.0);
    assert_eq!(class("stable", "error") + class("canary", "error"), 0.0);
    for upstream in ["stable", "canary"] {
        let name = format!("serin_concurrency_limited_requests_total{{upstream=\"{upstream}\"}}");
        assert_eq!(sample(&metrics, &name), 0.0);
    }
    serin.stop().await;
}
