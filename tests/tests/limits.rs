//! The overload limits end to end: a real `serin_proxy::Proxy` on
//! 127.0.0.1:0 with `[rate_limit]` or `max_concurrent` set, in front of real
//! upstreams, driven by real HTTP/1.1 (serin's own loop) and HTTP/2 (hyper's
//! path) clients. Each test checks what a client sees (429 or 503 with
//! `Retry-After`, while others are served) and that a limited request never
//! reaches an upstream's window, which is all the judge reads.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use http::{StatusCode, Version};
use serin_proxy::{
    Proxy, ProxyConfig, Rate, RateLimit, RateLimitKey, RouteTable, Routes, Target, Upstream,
    UpstreamProtocol,
};
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// A proxy in front of two upstreams, sending half the traffic to each.
struct Limited {
    proxy: Proxy,
    stable: TestUpstream,
    canary: TestUpstream,
    /// `http://PROXY/`.
    url: String,
}

impl Limited {
    /// Starts the upstreams and the proxy, with `tweak` applied to its config.
    async fn start(tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        let stable = TestUpstream::start("stable").await;
        let canary = TestUpstream::start("canary").await;
        let upstream =
            |u: &TestUpstream| Upstream::parse(&u.url(), UpstreamProtocol::Http1).unwrap();
        let mut config = ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            upstream(&stable),
            upstream(&canary),
        );
        tweak(&mut config);
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(5000))).unwrap();
        let url = format!("http://{}/", proxy.local_addr());
        Self {
            proxy,
            stable,
            canary,
            url,
        }
    }

    /// Requests the upstreams received.
    fn upstream_requests(&self) -> u64 {
        self.stable.requests() + self.canary.requests()
    }
}

/// `per_second` per key, in buckets of `burst`, counted by `key`.
fn rate_limit(per_second: f64, burst: u32, key: RateLimitKey) -> RateLimit {
    RateLimit {
        burst: NonZeroU32::new(burst).unwrap(),
        key,
        ..RateLimit::new(Rate::per_second(per_second).unwrap())
    }
}

fn api_key() -> RateLimitKey {
    RateLimitKey::Header(http::HeaderName::from_static("x-api-key"))
}

/// Requests both upstreams' windows hold now.
fn windows(proxy: &Proxy) -> u64 {
    let now = Instant::now();
    Target::ALL
        .into_iter()
        .map(|t| proxy.stats().window_snapshot(t, now).requests)
        .sum()
}

fn retry_after(a: &Answer) -> u32 {
    a.headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {a:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_while_other_keys_are_served_on_http1_and_http2() {
    // One token every 1000 s: nothing refills while the test runs.
    let serin = Limited::start(|c| c.rate_limit = Some(rate_limit(0.001, 2, api_key()))).await;
    let (proxy, url) = (&serin.proxy, &serin.url);
    let mut served = 0;
    let mut limited = 0;
    // "alice", "bob" and requests without a key over HTTP/1.1 (the own
    // loop); "carol" and "dave" over HTTP/2 (hyper's path).
    for (client, version, over, other) in [
        (http1_client(), Version::HTTP_11, Some("alice"), Some("bob")),
        (http1_client(), Version::HTTP_11, None, Some("erin")),
        (h2c_client(), Version::HTTP_2, Some("carol"), Some("dave")),
    ] {
        let headers = |key: Option<&'static str>| {
            key.map(|k| ("x-api-key", k))
                .into_iter()
                .collect::<Vec<_>>()
        };
        for _ in 0..2 {
            let a = get(&client, url, &headers(over)).await;
            assert_eq!((a.status, a.version), (StatusCode::OK, version), "{a:?}");
            served += 1;
        }
        for _ in 0..3 {
            let a = get(&client, url, &headers(over)).await;
            assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{over:?}: {a:?}");
            assert_eq!(a.version, version);
            let wait = retry_after(&a);
            assert!((990..=1000).contains(&wait), "Retry-After {wait}");
            assert!(a.body.contains("too many requests"), "{}", a.body);
            limited += 1;
        }
        // Another key, on the same connection, is still served.
        let a = get(&client, url, &headers(other)).await;
        assert_eq!(a.status, StatusCode::OK, "{other:?}: {a:?}");
        served += 1;
    }
    assert_eq!(serin.upstream_requests(), served);
    assert_eq!(proxy.stats().rate_limited_total(), limited);
    // alice, bob, erin, carol, dave and the keyless bucket.
    assert_eq!(proxy.stats().rate_limit_keys(), 6);
    eventually(
        Duration::from_secs(5),
        "every served request in a window",
        || async { windows(proxy) == served },
    )
    .await;
    for target in Target::ALL {
        let totals = proxy.stats().totals(target);
        assert_eq!((totals.errors, totals.concurrency_limited), (0, 0));
    }
}

/// One GET on a new connection from `source`, a loopback address: the
/// response's head.
async fn get_from(source: &str, proxy: SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_address_over_its_rate_is_limited_on_every_worker() {
    let serin = Limited::start(|c| {
        c.workers = 4;
        c.rate_limit = Some(rate_limit(0.001, 3, RateLimitKey::ClientIp));
    })
    .await;
    let addr = serin.proxy.local_addr();
    // A new connection each time: the kernel spreads them over the workers,
    // and the bucket is the same on every one.
    for _ in 0..3 {
        let answer = get_from("127.0.0.1", addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
    for _ in 0..8 {
        let answer = get_from("127.0.0.1", addr).await;
        assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
        assert!(answer.contains("retry-after: "), "{answer}");
    }
    // Another address is another client.
    let answer = get_from("127.0.0.2", addr).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(serin.upstream_requests(), 4);
    assert_eq!(serin.proxy.stats().rate_limited_total(), 8);
    assert_eq!(serin.proxy.stats().rate_limit_keys(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_key_is_served_again_once_its_bucket_refills() {
    // A token every 500 ms.
    let serin = Limited::start(|c| c.rate_limit = Some(rate_limit(2.0, 1, api_key()))).await;
    let (proxy, url) = (&serin.proxy, &serin.url);
    let client = http1_client();
    let key = [("x-api-key", "k")];
    let mut first_limited = false;
    for _ in 0..50 {
        let a = get(&client, url, &key).await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(retry_after(&a), 1);
            first_limited = true;
            break;
        }
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
    }
    assert!(
        first_limited,
        "50 requests in a row were never over 2 per second"
    );
    eventually(Duration::from_secs(10), "a refilled token", || async {
        get(&client, url, &key).await.status == StatusCode::OK
    })
    .await;
    assert!(proxy.stats().rate_limited_total() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_at_max_concurrent_gets_no_more_until_a_request_ends() {
    let serin =
        Limited::start(|c| c.max_concurrent[Target::Stable.index()] = NonZeroUsize::new(1)).await;
    let (proxy, url, stable) = (&serin.proxy, &serin.url, &serin.stable);
    let gate = Gate::closed();
    stable.set(Behavior {
        hold: Some(gate.clone()),
        ..Behavior::default()
    });
    let never = [("x-serin-canary", "never")];
    let held = {
        let url = url.clone();
        tokio::spawn(async move { get(&http1_client(), &url, &never).await })
    };
    eventually(
        Duration::from_secs(10),
        "the first request held upstream",
        || async { stable.requests() == 1 },
    )
    .await;
    // HTTP/1.1 on the own loop, then HTTP/2 on hyper's path.
    for client in [http1_client(), h2c_client()] {
        let a = get(&client, url, &never).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert_eq!(retry_after(&a), 1);
        assert!(
            a.body
                .contains("stable upstream is at its concurrency limit"),
            "{}",
            a.body
        );
        assert_eq!(a.upstream(), "stable");
    }
    // The canary has no limit.
    let a = get(&http1_client(), url, &[("x-serin-canary", "always")]).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "canary"));
    assert_eq!(
        stable.requests(),
        1,
        "the refused requests never reached stable"
    );

    gate.open();
    let first = held.await.unwrap();
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::OK, "stable")
    );
    // Its place is free again.
    let a = get(&h2c_client(), url, &never).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "stable"));

    let stats = proxy.stats();
    assert_eq!(stats.totals(Target::Stable).concurrency_limited, 2);
    assert_eq!(stats.totals(Target::Canary).concurrency_limited, 0);
    eventually(
        Duration::from_secs(5),
        "the served requests in the windows",
        || async { windows(proxy) == 3 },
    )
    .await;
    let window = stats.window_snapshot(Target::Stable, Instant::now());
    assert_eq!(
        (window.requests, window.errors),
        (2, 0),
        "503s are not stable's errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_at_max_concurrent_sends_the_overflow_to_stable() {
    let serin =
        Limited::start(|c| c.max_concurrent[Target::Canary.index()] = NonZeroUsize::new(1)).await;
    let (proxy, url, canary) = (&serin.proxy, &serin.url, &serin.canary);
    let gate = Gate::closed();
    canary.set(Behavior {
        hold: Some(gate.clone()),
        ..Behavior::default()
    });
    let always = [("x-serin-canary", "always")];
    let held = {
        let url = url.clone();
        tokio::spawn(async move { get(&http1_client(), &url, &always).await })
    };
    eventually(
        Duration::from_secs(10),
        "the first request held by the canary",
        || async { canary.requests() == 1 },
    )
    .await;
    // The canary is full: its next requests are served by stable, on
    // either path, never refused.
    for client in [http1_client(), h2c_client()] {
        let a = get(&client, url, &always).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "stable"),
            "{a:?}"
        );
        assert_eq!(a.upstream(), "stable");
    }
    assert_eq!(
        canary.requests(),
        1,
        "the overflow never reached the canary"
    );
    assert_eq!(proxy.stats().totals(Target::Canary).concurrency_limited, 2);
    gate.open();
    let first = held.await.unwrap();
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::OK, "canary")
    );
    // Its place is free again: the canary takes the next one.
    let a = get(&h2c_client(), url, &always).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "canary"));
}
