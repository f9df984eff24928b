//! Several endpoints per upstream, end to end: a real `Proxy` whose stable
//! upstream is three real servers (or a host name), driven by a real
//! client. Covers the spread of requests, an endpoint killed and restarted
//! under load (nothing sent to a dead endpoint fails a client), outlier
//! ejection on 5xx that never takes every endpoint out, and per-endpoint
//! figures.

use std::time::Duration;

use futures_util::future::join_all;
use http::StatusCode;
use serin_proxy::{
    EndpointSnapshot, OutlierSettings, Proxy, ProxyConfig, RouteTable, Routes, Target, Upstream,
    UpstreamProtocol,
};
use serin_tests::*;

/// How long a change may take to show on a busy machine.
const DEADLINE: Duration = Duration::from_secs(20);

struct Harness {
    proxy: Proxy,
    _canary: TestUpstream,
}

impl Harness {
    async fn start(stable_url: &str, outlier: OutlierSettings) -> Self {
        let canary = TestUpstream::start("canary").await;
        let mut stable = Upstream::parse(stable_url, UpstreamProtocol::Http1).unwrap();
        stable.outlier = outlier;
        let config = ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            stable,
            Upstream::parse(&canary.url(), UpstreamProtocol::Http1).unwrap(),
        );
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
        Self {
            proxy,
            _canary: canary,
        }
    }

    /// Sends `n` GETs, 4 at a time; the statuses and bodies.
    async fn load(&self, n: usize) -> Vec<(StatusCode, String)> {
        let client = http1_client();
        let url = format!("http://{}/", self.proxy.local_addr());
        let mut answers = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(4) {
            let batch = 4.min(n - chunk * 4);
            let got = join_all((0..batch).map(|_| get(&client, &url, &[]))).await;
            answers.extend(got.into_iter().map(|a| (a.status, a.body)));
        }
        answers
    }

    fn endpoints(&self) -> Vec<EndpointSnapshot> {
        self.proxy
            .stats()
            .endpoints(Target::Stable)
            .expect("a proxy has endpoint sets")
            .snapshot()
    }

    fn endpoint(&self, upstream: &TestUpstream) -> EndpointSnapshot {
        let address = upstream.addr.to_string();
        self.endpoints()
            .into_iter()
            .find(|e| e.address == address)
            .unwrap_or_else(|| panic!("no endpoint {address}"))
    }
}

/// Three upstreams on 127.0.0.1 and their comma-separated URL list.
async fn three() -> ([TestUpstream; 3], String) {
    let upstreams = [
        TestUpstream::start("one").await,
        TestUpstream::start("two").await,
        TestUpstream::start("three").await,
    ];
    let url = upstreams
        .iter()
        .map(TestUpstream::url)
        .collect::<Vec<_>>()
        .join(",");
    (upstreams, url)
}

fn quick_ejection() -> OutlierSettings {
    OutlierSettings {
        consecutive_failures: 3,
        base_ejection: Duration::from_millis(300),
        max_ejection: Duration::from_millis(300),
        ..OutlierSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_every_endpoint() {
    let (upstreams, url) = three().await;
    let h = Harness::start(&url, OutlierSettings::default()).await;
    let answers = h.load(300).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));
    for (upstream, name) in upstreams.iter().zip(["one", "two", "three"]) {
        let served = answers.iter().filter(|(_, body)| body == name).count();
        assert!(served >= 30, "{name} served {served} of 300");
        let endpoint = h.endpoint(upstream);
        assert_eq!(endpoint.requests, served as u64);
        assert_eq!((endpoint.failures, endpoint.ejected), (0, false));
    }
    // The judge sees one upstream.
    eventually(DEADLINE, "300 stable successes", || async {
        h.proxy.stats().totals(Target::Stable).successes == 300
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_fails_no_request_and_is_used_again_once_restarted() {
    let ([one, two, three], url) = three().await;
    let h = Harness::start(&url, quick_ejection()).await;
    assert!(h.load(60).await.iter().all(|(s, _)| *s == StatusCode::OK));

    // Killed between batches: its pooled connections close, its port refuses.
    let addr = two.addr;
    drop(two);
    let answers = h.load(200).await;
    let failed = answers
        .iter()
        .filter(|(s, _)| *s != StatusCode::OK)
        .collect::<Vec<_>>();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(answers.iter().all(|(_, body)| body != "two"));
    let dead = h
        .endpoints()
        .into_iter()
        .find(|e| e.address == addr.to_string())
        .unwrap();
    assert!(dead.failures >= 3, "{dead:?}");
    assert!(dead.ejections >= 1, "{dead:?}");

    // Restarted on the same port: back in rotation once its ejection ends.
    let two = TestUpstream::start_at("two", addr).await;
    eventually(DEADLINE, "the restarted endpoint serves again", || async {
        h.load(8).await;
        two.requests() > 0
    })
    .await;
    assert!(h.load(100).await.iter().all(|(s, _)| *s == StatusCode::OK));
    assert!(one.requests() > 0 && three.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_5xx_is_ejected_but_never_every_one() {
    let ([one, two, three], url) = three().await;
    let h = Harness::start(
        &url,
        OutlierSettings {
            base_ejection: Duration::from_secs(600),
            max_ejection: Duration::from_secs(600),
            ..quick_ejection()
        },
    )
    .await;
    two.set(Behavior {
        status: Some(503),
        ..Behavior::default()
    });
    h.load(60).await;
    assert!(h.endpoint(&two).ejected);
    let before = two.requests();
    let answers = h.load(100).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));
    assert_eq!(two.requests(), before, "an ejected endpoint gets nothing");

    // Every endpoint fails: at most half (one of three) is ever out.
    for upstream in [&one, &three] {
        upstream.set(Behavior {
            status: Some(500),
            ..Behavior::default()
        });
    }
    h.load(100).await;
    let out = h.endpoints().iter().filter(|e| e.ejected).count();
    assert_eq!(out, 1, "{:?}", h.endpoints());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_is_resolved_to_its_addresses() {
    let upstream = TestUpstream::start("named").await;
    let url = format!("http://localhost:{}", upstream.addr.port());
    let h = Harness::start(&url, OutlierSettings::default()).await;
    let addresses = h
        .endpoints()
        .into_iter()
        .map(|e| e.address)
        .collect::<Vec<_>>();
    assert!(
        addresses.contains(&upstream.addr.to_string()),
        "localhost resolves to 127.0.0.1: {addresses:?}"
    );
    // localhost may also resolve to ::1, where nothing listens: connects
    // there move on to 127.0.0.1, so every answer is the upstream's.
    let answers = h.load(40).await;
    assert!(answers
        .iter()
        .all(|(s, b)| *s == StatusCode::OK && b == "named"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_and_restarted_while_load_runs() {
    let ([one, two, three], url) = three().await;
    let h = std::sync::Arc::new(Harness::start(&url, quick_ejection()).await);
    let load = tokio::spawn({
        let h = h.clone();
        async move { h.load(1200).await }
    });
    let addr = two.addr;
    eventually(DEADLINE, "the load reaches every endpoint", || async {
        one.requests() > 20 && two.requests() > 20 && three.requests() > 20
    })
    .await;
    drop(two);
    let served = one.requests() + three.requests();
    eventually(DEADLINE, "the others carry the load", || async {
        one.requests() + three.requests() > served + 100
    })
    .await;
    let two = TestUpstream::start_at("two", addr).await;
    let answers = load.await.unwrap();
    // The only requests that may fail are the (at most 4) in flight on a
    // fresh connection to it at the kill; everything else is moved or
    // replayed.
    let failed = answers.iter().filter(|(s, _)| *s != StatusCode::OK).count();
    assert!(failed <= 4, "{failed} failed");
    assert_eq!(answers.len(), 1200);
    eventually(DEADLINE, "the restarted endpoint serves again", || async {
        h.load(8).await;
        two.requests() > 0
    })
    .await;
}
