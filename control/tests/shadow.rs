//! Shadow judging (phase `shadowing`) end to end, as clients and an operator
//! see it: serin in-process (and as the `serin` binary) on 127.0.0.1:0 in
//! front of real upstreams, driven by real HTTP/1.1 and h2c clients. Copies
//! of stable's requests reach the canary, its answers never reach a client,
//! and the judge rolls a canary back on them before any user is sent to it.
//!
//! Every request loop is bounded in count, nothing sleeps to wait for a
//! condition (loops poll `/status`, or use [`eventually`]), a hung canary is
//! held by a [`Gate`] and the assertions are on what completed while it was
//! closed, not on timing; no port is fixed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{Either, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::Value;
use serin_control::config::{Config, Overrides};
use serin_control::Running;
use serin_tests::*;

type HttpClient = Client<HttpConnector, ClientBody>;

/// Longest any condition is waited for.
const DEADLINE: Duration = Duration::from_secs(20);

// === harness ===

/// serin in-process in front of a stable and a canary upstream.
struct Serin {
    running: Running,
    stable: TestUpstream,
    canary: TestUpstream,
    admin: String,
    h1: HttpClient,
    h2: HttpClient,
    proxy: String,
    _state: TempDir,
}

impl Serin {
    /// Starts serin with `extra` appended to a config that sets the
    /// listeners (port 0), a fresh state directory and both upstreams.
    async fn start(extra: &str) -> Self {
        let Stage {
            stable,
            canary,
            state,
            toml,
        } = Stage::new("shadow", extra).await;
        let raw = Config::parse_toml(&toml, Path::new("shadow.toml")).expect("TOML");
        let config = Config::from_raw(raw, &Overrides::default()).expect("valid config");
        let running = Running::start(config).await.expect("serin starts");
        Self {
            admin: format!("http://{}", running.admin_addr),
            proxy: format!("http://{}", running.proxy.local_addr()),
            running,
            stable,
            canary,
            h1: http1_client(),
            h2: h2c_client(),
            _state: state,
        }
    }

    /// [`Serin::start`], then `POST /shadow` at the configured share.
    async fn shadowing(extra: &str) -> Self {
        let serin = Self::start(extra).await;
        let (code, status) = serin.call(Method::POST, "/shadow", None).await;
        assert_eq!(code, StatusCode::OK, "{status}");
        assert_eq!(status["phase"], "shadowing");
        serin
    }

    /// The canary answers every request with `status` from now on.
    fn canary_answers(&self, status: u16) {
        self.canary.set(Behavior {
            status: Some(status),
            ..Behavior::default()
        });
    }

    /// One control API call: its status and JSON body.
    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        call(&self.admin, method, path, body).await
    }

    async fn status(&self) -> Value {
        let (code, status) = self.call(Method::GET, "/status", None).await;
        assert_eq!(code, StatusCode::OK, "{status}");
        status
    }

    async fn metrics(&self) -> String {
        get(&self.h1, &format!("{}/metrics", self.admin), &[])
            .await
            .body
    }

    /// A GET through the proxy, over HTTP/1.1 (serin's own loop) or h2c
    /// (hyper's path).
    async fn get(&self, path: &str, h2: bool) -> Answer {
        let client = if h2 { &self.h2 } else { &self.h1 };
        get(client, &format!("{}{path}", self.proxy), &[]).await
    }

    /// A POST of `body` to `/upload` through the proxy, over HTTP/1.1:
    /// stable must have answered it, whole.
    async fn upload(&self, body: &'static [u8]) {
        let req = Request::post(format!("{}/upload", self.proxy))
            .body(Either::Left(Full::new(Bytes::from_static(body))))
            .unwrap();
        let answer = send(&self.h1, req).await;
        let received = format!("received {}", body.len());
        assert_eq!(
            (answer.status, answer.upstream(), answer.body.as_str()),
            (StatusCode::OK, "stable", received.as_str())
        );
    }

    /// `serin_shadow_requests_total{result=...}`.
    async fn shadow_requests(&self, result: &str) -> f64 {
        let series = format!("serin_shadow_requests_total{{result=\"{result}\"}}");
        sample(&self.metrics().await, &series)
    }

    /// Sends GETs, alternating HTTP/1.1 and h2c, until the phase is
    /// `phase` (at most `max` requests). Every answer sent while the canary
    /// had no weight (as the status read after it says) must be stable's
    /// 200. Returns the status and the requests sent.
    async fn traffic_until(&self, phase: &str, max: usize) -> (Value, usize) {
        for sent in 1..=max {
            let answer = self.get("/", sent % 2 == 0).await;
            let status = self.status().await;
            if status["canary_weight"] == 0.0 {
                assert_stable(&answer);
            }
            if status["phase"] == phase {
                return (status, sent);
            }
        }
        panic!(
            "still not {phase} after {max} requests: {}",
            self.status().await
        );
    }

    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.running.shutdown())
            .await
            .expect("serin stops within 10 s");
    }
}

async fn call(admin: &str, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("{admin}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Either::Left(Full::new(Bytes::from(
            body.unwrap_or_default().to_string(),
        ))))
        .unwrap();
    let answer = send(&http1_client(), req).await;
    let value = serde_json::from_str(&answer.body).unwrap_or(Value::String(answer.body));
    (answer.status, value)
}

/// The answer is stable's, whole: what a client must always get while the
/// canary is shadowed.
fn assert_stable(answer: &Answer) {
    assert_eq!(
        (answer.status, answer.upstream(), answer.body.as_str()),
        (StatusCode::OK, "stable", "stable"),
        "{answer:?}"
    );
}

/// The value of the metric line that starts with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

// === the judge on copies ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_fails_only_in_shadow_is_rolled_back_and_no_client_sees_it() {
    let serin = Serin::start("").await;
    serin.canary_answers(500);
    let (code, status) = serin
        .call(Method::POST, "/shadow", Some(r#"{"percent": 100}"#))
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(status["phase"], "shadowing");
    assert_eq!(status["canary_weight"], 0.0);
    assert_eq!(status["shadow"]["percent"], 100.0);

    // Clients over both protocols get stable's answer, every one of them,
    // until the judge has seen enough of the copies' failures.
    let (status, sent) = serin.traffic_until("rolled_back", 2_000).await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("shadow: "), "{reason}");
    assert_eq!(status["latched"], true);
    assert_eq!(status["canary_weight"], 0.0);
    assert!(serin.canary.requests() > 0, "the canary saw the copies");
    assert!(
        status["upstreams"]["canary"]["errors"].as_u64().unwrap() > 0,
        "the copies' failures are in the canary's window: {status}"
    );
    println!("rolled back after {sent} client requests: {reason}");

    // Rolled back: no more copies.
    let metrics = serin.metrics().await;
    let copies = sample(&metrics, "serin_shadow_requests_total{result=\"sent\"}");
    assert!(copies > 0.0);
    assert_eq!(sample(&metrics, "serin_phase{phase=\"rolled_back\"}"), 1.0);
    assert_eq!(sample(&metrics, "serin_phase{phase=\"shadowing\"}"), 0.0);
    assert_eq!(sample(&metrics, "serin_shadow_ratio"), 0.0);
    for i in 0..20 {
        assert_stable(&serin.get("/", i % 2 == 0).await);
    }
    let metrics = serin.metrics().await;
    assert_eq!(
        sample(&metrics, "serin_shadow_requests_total{result=\"sent\"}"),
        copies
    );

    let (_, history) = serin.call(Method::GET, "/history", None).await;
    let history = history.as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|t| t["phase"] == "shadowing" && t["actor"] == "api"),
        "{history:?}"
    );
    let revert = history.last().unwrap();
    assert_eq!(
        (&revert["phase"], &revert["actor"], &revert["to"]),
        (
            &Value::from("rolled_back"),
            &Value::from("judge"),
            &Value::from(0.0)
        )
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_answering_404_where_stable_answers_200_is_caught_by_the_mismatch_rule() {
    // A 404 is no error: only the comparison with stable's answer shows it.
    let serin = Serin::shadowing("").await;
    serin.canary_answers(404);
    let (status, _) = serin.traffic_until("rolled_back", 2_000).await;
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("shadow: canary status class differs from stable's in 100.0% > 5.0%"),
        "{reason}"
    );
    assert_eq!(status["upstreams"]["canary"]["errors"], 0, "{status}");
    let shadow = &status["shadow"];
    assert!(shadow["compared"].as_u64().unwrap() >= 20, "{shadow}");
    assert_eq!(shadow["mismatches"], shadow["compared"], "{shadow}");
    assert_eq!(shadow["mismatch_rate"], 1.0);
    let metrics = serin.metrics().await;
    assert!(sample(&metrics, "serin_shadow_mismatches_total") >= 20.0);
    assert_eq!(
        sample(&metrics, "serin_shadow_mismatches_total"),
        sample(&metrics, "serin_shadow_compared_total")
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_judged_on_copies_and_stays_in_shadow() {
    let serin = Serin::start("[judge]\nmin_requests = 5\n").await;
    let (code, _) = serin
        .call(Method::POST, "/shadow", Some(r#"{"percent": 50}"#))
        .await;
    assert_eq!(code, StatusCode::OK);
    for i in 0..200 {
        assert_stable(&serin.get("/", i % 2 == 0).await);
    }
    eventually(DEADLINE, "the copies are compared", || async {
        serin.status().await["shadow"]["compared"].as_u64() >= Some(20)
    })
    .await;
    let status = serin.status().await;
    assert_eq!(status["phase"], "shadowing", "{status}");
    let shadow = &status["shadow"];
    assert_eq!(shadow["percent"], 50.0);
    assert_eq!(shadow["mismatches"], 0);
    let copies = shadow["requests"].as_u64().unwrap();
    assert!((40..=160).contains(&copies), "about half copied: {shadow}");
    eventually(DEADLINE, "every copy reaches the canary", || async {
        serin.canary.requests() == copies
    })
    .await;
    serin.stop().await;
}

// === the data plane ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_canary_never_delays_a_client_and_its_copies_are_bounded() {
    let serin = Serin::shadowing("[shadow]\nmax_concurrent = 2\n").await;
    let gate = Gate::closed();
    serin.canary.set(Behavior {
        hold: Some(gate.clone()),
        ..Behavior::default()
    });
    // The gate stays closed: every client's answer completes all the same,
    // over either protocol, one after the other.
    for i in 0..10 {
        assert_stable(&serin.get("/", i % 2 == 0).await);
    }
    eventually(DEADLINE, "two copies are held at the canary", || async {
        serin.canary.requests() == 2
    })
    .await;
    let shadow = serin.status().await["shadow"].clone();
    assert_eq!(
        (&shadow["requests"], &shadow["skipped"]),
        (&2.into(), &8.into()),
        "{shadow}"
    );
    assert_eq!(serin.shadow_requests("skipped_busy").await, 8.0);

    // Released, the two copies are judged and compared, and a place is
    // free for the next one.
    gate.open();
    eventually(
        DEADLINE,
        "the held copies are judged and compared",
        || async {
            let status = serin.status().await;
            status["shadow"]["compared"] == 2 && status["upstreams"]["canary"]["requests"] == 2
        },
    )
    .await;
    assert_stable(&serin.get("/", false).await);
    eventually(DEADLINE, "a new copy is sent", || async {
        serin.canary.requests() == 3
    })
    .await;
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_made_only_once_stable_has_answered() {
    // So that the copy's work never comes between stable's answer and the
    // client: while stable holds the request, nothing has been sent to the
    // canary; once stable answers, the copy follows.
    let serin = Serin::shadowing("").await;
    for (n, h2) in [(1u32, false), (2, true)] {
        let gate = Gate::closed();
        serin.stable.set(Behavior {
            hold: Some(gate.clone()),
            ..Behavior::default()
        });
        let client = async {
            let answer = serin.get("/", h2).await;
            assert_stable(&answer);
        };
        let while_held = async {
            eventually(DEADLINE, "stable holds the request", || async {
                serin.stable.requests() == u64::from(n)
            })
            .await;
            assert_eq!(serin.shadow_requests("sent").await, f64::from(n - 1));
            assert_eq!(serin.canary.requests(), u64::from(n - 1));
            gate.open();
        };
        tokio::join!(client, while_held);
        eventually(DEADLINE, "the copy follows stable's answer", || async {
            serin.canary.requests() == u64::from(n)
        })
        .await;
    }
    eventually(DEADLINE, "both copies are compared", || async {
        serin.status().await["shadow"]["compared"] == 2
    })
    .await;
    assert_eq!(serin.status().await["shadow"]["mismatches"], 0);
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_not_copied_by_default() {
    let serin = Serin::shadowing("").await;
    serin.upload(b"hello").await;
    assert_stable(&serin.get("/", false).await);
    eventually(DEADLINE, "the GET is copied", || async {
        serin.canary.requests() == 1
    })
    .await;
    assert_eq!(serin.canary.uploaded(), 0);
    assert_eq!(serin.shadow_requests("skipped_body").await, 1.0);
    // Nor is a bodiless request of a method that may write.
    let req = Request::delete(format!("{}/", serin.proxy))
        .body(empty())
        .unwrap();
    assert_eq!(send(&serin.h1, req).await.status, StatusCode::OK);
    assert_eq!(serin.shadow_requests("skipped_method").await, 1.0);
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_max_body_bytes_are_copied() {
    let serin = Serin::shadowing("[shadow]\nmax_body_bytes = 16\n").await;
    serin.upload(b"hello").await;
    eventually(DEADLINE, "the body reaches the canary", || async {
        serin.canary.uploaded() == 5
    })
    .await;
    // One byte over: stable gets it whole, the canary nothing.
    serin.upload(b"seventeen bytes!!").await;
    assert_eq!(serin.stable.uploaded(), 22);
    assert_eq!(serin.shadow_requests("skipped_body").await, 1.0);
    assert_eq!(serin.canary.uploaded(), 5);
    assert_eq!(serin.canary.requests(), 1);
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_carry_the_marker_and_the_clients_host() {
    let serin = Serin::shadowing("").await;
    for h2 in [false, true] {
        let before = serin.canary.requests();
        let answer = serin.get("/echo-headers", h2).await;
        assert_eq!(answer.upstream(), "stable");
        assert!(
            !answer.body.contains("x-serin-shadow"),
            "stable's request has no marker: {}",
            answer.body
        );
        eventually(DEADLINE, "the copy arrives", || async {
            serin.canary.requests() == before + 1
        })
        .await;
        let seen = serin.canary.last_headers().unwrap();
        assert_eq!(seen["x-serin-shadow"], "1", "{seen:?}");
        let host = seen["host"].to_str().unwrap();
        assert!(
            answer.body.contains(&format!("host: {host}\n")),
            "the copy keeps the Host stable got ({host}): {}",
            answer.body
        );
    }
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_canary_gets_its_copies_over_http2_and_is_judged_on_them() {
    let serin = Serin::shadowing("canary.protocol = \"http2\"\n").await;
    serin.canary_answers(503);
    let (status, _) = serin.traffic_until("rolled_back", 2_000).await;
    assert!(
        status["reason"].as_str().unwrap().starts_with("shadow: "),
        "{status}"
    );
    let seen = serin.canary.last_headers().unwrap();
    assert_eq!(seen["x-serin-shadow"], "1", "{seen:?}");
    serin.stop().await;
}

// === rollouts, the API and the CLI ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_a_shadow_step_moves_to_the_first_weight_step_after_its_hold() {
    let serin = Serin::start(
        "[rollout]\nhold = \"1h\"\nmin_requests_per_step = 5\n[judge]\nmin_requests = 5\n",
    )
    .await;
    let (code, status) = serin
        .call(
            Method::POST,
            "/rollout",
            Some(r#"{"steps": [10, 100], "shadow": "200ms"}"#),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(status["phase"], "shadowing");
    assert_eq!(status["canary_weight"], 0.0);
    assert_eq!(status["shadow"]["hold"], "200ms");
    assert_eq!(status["shadow"]["percent"], 100.0);
    // While it shadows, no client reaches the canary; after its hold and
    // enough healthy copies, the rollout moves to its first weight step.
    let (status, _) = serin.traffic_until("progressing", 20_000).await;
    assert_eq!(status["canary_weight"], 10.0, "{status}");
    assert_eq!(status["step"], 1);
    assert_eq!(status["shadow"]["percent"], 0.0);
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .starts_with("step 1 of 2 (10%): the shadow healthy over 200ms"),
        "{status}"
    );
    serin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shadow_calls_get_400_with_what_to_write() {
    let serin = Serin::start("").await;
    for body in [
        r#"{"percent": 0}"#,
        r#"{"percent": 100.5}"#,
        r#"{"percent": -5}"#,
        r#"{"percent": "all"}"#,
        r#"{"pct": 50}"#,
        "fifty",
    ] {
        let (code, answer) = serin.call(Method::POST, "/shadow", Some(body)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{body}: {answer}");
    }
    let (_, answer) = serin
        .call(Method::POST, "/shadow", Some(r#"{"percent": 120}"#))
        .await;
    assert_eq!(
        answer["error"],
        "shadow percent must be above 0 and at most 100 (got 120); write 100 to copy every \
         eligible request, 12.5 for one in eight"
    );
    for body in [
        r#"{"shadow": "soon"}"#,
        r#"{"shadow": "0s"}"#,
        r#"{"shadow": 60}"#,
    ] {
        let (code, answer) = serin.call(Method::POST, "/rollout", Some(body)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (_, answer) = serin
        .call(Method::POST, "/rollout", Some(r#"{"shadow": "soon"}"#))
        .await;
    assert_eq!(
        answer["error"],
        "shadow: hold must be a duration like 60s, 5m, 1m30s or 500ms (got \"soon\")"
    );
    let (code, _) = serin.call(Method::GET, "/shadow", None).await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(serin.status().await["phase"], "steady", "nothing changed");
    serin.stop().await;
}

fn serin_cli(admin: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(args)
        .args(["--admin", admin])
        .output()
        .expect("run serin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shadows_and_the_phase_survives_kill_9() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = temp_dir("shadow-restart");
    let bin = env!("CARGO_BIN_EXE_serin");
    let serin = SerinProcess::run(bin, &stable, &canary, &state, &[]).await;
    let admin = serin.admin.expect("admin address").to_string();

    let out = serin_cli(&admin, &["shadow", "150"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shadow percent must be above 0 and at most 100"),
        "{err}"
    );
    let out = serin_cli(&admin, &["shadow", "50"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase    shadowing"), "{text}");
    assert!(
        text.contains("shadow   50% of eligible requests copied"),
        "{text}"
    );

    serin.signal("KILL");
    drop(serin);
    let serin = SerinProcess::run(bin, &stable, &canary, &state, &[]).await;
    let admin = serin.admin.expect("admin address");
    let (_, status) = call(&format!("http://{admin}"), Method::GET, "/status", None).await;
    assert_eq!(status["phase"], "shadowing", "{status}");
    assert_eq!(status["shadow"]["percent"], 50.0);
    let client = http1_client();
    let url = format!("http://{}/", serin.proxy);
    for _ in 0..200 {
        assert_stable(&get(&client, &url, &[]).await);
        if canary.requests() > 0 {
            break;
        }
    }
    eventually(
        DEADLINE,
        "copies reach the canary after the restart",
        || async { canary.requests() > 0 },
    )
    .await;

    // A rollout's shadow step from the CLI, at the configured share.
    let out = serin_cli(
        &admin.to_string(),
        &["rollout", "--shadow", "30s", "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "shadowing");
    assert_eq!(status["shadow"]["hold"], "30s");
    assert_eq!(status["shadow"]["percent"], 100.0);
}
