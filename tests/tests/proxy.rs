//! The data plane end to end: a real `serin_proxy::Proxy` on 127.0.0.1:0 in
//! front of real upstream servers, driven by real HTTP/1.1, HTTP/2 and TLS
//! clients. Every assertion is something a client or operator would see.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serin_proxy::{
    Proxy, ProxyConfig, RouteTable, Routes, StickyKey, Target, Upstream, UpstreamProtocol,
};
use serin_tests::*;

struct Harness {
    proxy: Proxy,
    stable: TestUpstream,
    canary: TestUpstream,
    base: String,
}

impl Harness {
    async fn start(weight_bp: u16, tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        let stable = TestUpstream::start("stable").await;
        let canary = TestUpstream::start("canary").await;
        Self::with_upstreams(stable, canary, weight_bp, tweak)
    }

    fn with_upstreams(
        stable: TestUpstream,
        canary: TestUpstream,
        weight_bp: u16,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Self {
        let mut config = ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            Upstream::parse(&stable.url(), UpstreamProtocol::Http1).unwrap(),
            Upstream::parse(&canary.url(), UpstreamProtocol::Http1).unwrap(),
        );
        tweak(&mut config);
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(weight_bp))).unwrap();
        let base = format!("http://{}", proxy.local_addr());
        Self {
            proxy,
            stable,
            canary,
            base,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends `n` GETs (8 at a time) and counts how many each upstream served.
    async fn split(&self, n: usize, headers: &[(&str, &str)]) -> (usize, usize) {
        let client = http1_client();
        let mut stable = 0;
        let mut canary = 0;
        for chunk in 0..n.div_ceil(8) {
            let count = 8.min(n - chunk * 8);
            let url = self.url("/");
            let answers = join_all((0..count).map(|_| get(&client, &url, headers))).await;
            for a in answers {
                assert_eq!(a.status, StatusCode::OK, "{a:?}");
                assert_eq!(
                    a.body,
                    a.upstream(),
                    "the header names the upstream that answered"
                );
                match a.upstream() {
                    "stable" => stable += 1,
                    "canary" => canary += 1,
                    other => panic!("unexpected upstream {other:?}"),
                }
            }
        }
        (stable, canary)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_follows_the_weight() {
    let h = Harness::start(0, |_| {}).await;
    assert_eq!(h.split(200, &[]).await, (200, 0), "weight 0 is exact");

    h.proxy.routes().store(RouteTable::new(10_000));
    assert_eq!(h.split(200, &[]).await, (0, 200), "weight 100 is exact");

    for (bp, n) in [(1_000u16, 1_000usize), (5_000, 1_000)] {
        h.proxy.routes().store(RouteTable::new(bp));
        let (_, canary) = h.split(n, &[]).await;
        let share = canary as f64 / n as f64;
        let want = f64::from(bp) / 10_000.0;
        // > 5 standard deviations of a binomial at n = 1000.
        assert!(
            (share - want).abs() < 0.08,
            "weight {bp} bp: canary share {share}"
        );
    }
    assert_eq!(h.stable.requests() + h.canary.requests(), 2_400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_follow_nginx_precedence() {
    let h = Harness::start(5_000, |_| {}).await;
    assert_eq!(h.split(20, &[("x-serin-canary", "always")]).await, (0, 20));
    assert_eq!(h.split(20, &[("x-serin-canary", "never")]).await, (20, 0));
    assert_eq!(
        h.split(20, &[("cookie", "serin-canary=always")]).await,
        (0, 20)
    );
    // Header beats cookie.
    assert_eq!(
        h.split(
            20,
            &[
                ("x-serin-canary", "never"),
                ("cookie", "serin-canary=always")
            ]
        )
        .await,
        (20, 0)
    );
    // An unknown header value falls through to the cookie.
    assert_eq!(
        h.split(
            20,
            &[
                ("x-serin-canary", "sometimes"),
                ("cookie", "a=b; serin-canary=never")
            ]
        )
        .await,
        (20, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_stay_put_and_only_move_onto_the_canary_as_weight_rises() {
    let h = Harness::start(1_000, |c| {
        c.split.sticky = Some(StickyKey::Cookie("user".into()))
    })
    .await;
    let client = http1_client();
    let users: Vec<String> = (0..200).map(|i| format!("user=u{i}")).collect();
    let mut on_canary = vec![false; users.len()];
    for bp in [1_000u16, 3_000, 6_000, 10_000] {
        h.proxy.routes().store(RouteTable::new(bp));
        for (i, cookie) in users.iter().enumerate() {
            let first = get(&client, &h.url("/"), &[("cookie", cookie)])
                .await
                .upstream()
                .to_string();
            let again = get(&client, &h.url("/"), &[("cookie", cookie)])
                .await
                .upstream()
                .to_string();
            assert_eq!(
                first, again,
                "{cookie} moved between two requests at {bp} bp"
            );
            let now = first == "canary";
            assert!(
                !on_canary[i] || now,
                "{cookie} left the canary when the weight rose to {bp} bp"
            );
            on_canary[i] = now;
        }
        let share = on_canary.iter().filter(|&&c| c).count() as f64 / users.len() as f64;
        assert!(
            (share - f64::from(bp) / 1e4).abs() < 0.15,
            "{bp} bp: {share}"
        );
    }
    // A revert to 0 moves everyone back.
    h.proxy.routes().store(RouteTable::new(0));
    for cookie in &users[..20] {
        assert_eq!(
            get(&client, &h.url("/"), &[("cookie", cookie)])
                .await
                .upstream(),
            "stable"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_reports_scripted_error_rate_and_latency() {
    let h = Harness::start(10_000, |c| c.canary_fallback = false).await;
    h.canary.set(Behavior {
        error_ratio: 0.25,
        delay: Duration::from_millis(120),
        ..Behavior::default()
    });
    let client = http1_client();
    let url = h.url("/");
    let answers: Vec<StatusCode> =
        join_all((0..40).map(|_| async { get(&client, &url, &[]).await.status })).await;
    assert_eq!(
        answers
            .iter()
            .filter(|s| **s == StatusCode::INTERNAL_SERVER_ERROR)
            .count(),
        10
    );
    for _ in 0..40 {
        get(&client, &h.url("/"), &[("x-serin-canary", "never")]).await;
    }
    let now = tokio::time::Instant::now();
    let canary = h.proxy.stats().window_snapshot(Target::Canary, now);
    let stable = h.proxy.stats().window_snapshot(Target::Stable, now);
    assert_eq!((canary.requests, canary.errors), (40, 10));
    assert!((canary.error_rate() - 0.25).abs() < 1e-9);
    assert_eq!((stable.requests, stable.errors), (40, 0));
    let p95 = canary.quantile(0.95);
    assert!(
        p95 >= Duration::from_millis(115),
        "canary p95 {p95:?} below its scripted 120 ms delay"
    );
    assert!(canary.quantile(0.5) >= Duration::from_millis(115));
    assert!(stable.quantile(0.95) < p95, "stable has no delay");
    let totals = h.proxy.stats().totals(Target::Canary);
    assert_eq!((totals.successes, totals.errors), (30, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_and_counted() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let mut h = Harness::with_upstreams(stable, canary, 10_000, |c| {
        c.canary = Upstream::parse(&closed_port_url(), UpstreamProtocol::Http1).unwrap();
        c.canary_fallback = false;
    });
    h.base = format!("http://{}", h.proxy.local_addr());
    let client = http1_client();
    let a = get(&client, &h.url("/"), &[]).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.upstream(), "canary");
    assert!(a.body.contains("connect failed"), "{}", a.body);
    let s = h
        .proxy
        .stats()
        .window_snapshot(Target::Canary, tokio::time::Instant::now());
    assert_eq!((s.requests, s.errors), (1, 1));
    // The proxy keeps serving.
    assert_eq!(
        get(&client, &h.url("/"), &[("x-serin-canary", "never")])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_is_504_and_counted() {
    let h = Harness::start(10_000, |c| {
        c.response_timeout = Duration::from_millis(300);
        c.canary_fallback = false;
    })
    .await;
    h.canary.set(Behavior {
        delay: Duration::from_secs(60),
        ..Behavior::default()
    });
    let client = http1_client();
    let a = get(&client, &h.url("/"), &[]).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.upstream(), "canary");
    let s = h
        .proxy
        .stats()
        .window_snapshot(Target::Canary, tokio::time::Instant::now());
    assert_eq!((s.requests, s.errors), (1, 1));
    assert!(
        s.quantile(0.5) >= Duration::from_millis(290),
        "latency is the time until the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_upstream_is_502_and_counted() {
    let h = Harness::start(10_000, |c| c.canary_fallback = false).await;
    h.canary.set(Behavior {
        reset: true,
        ..Behavior::default()
    });
    let client = http1_client();
    let a = get(&client, &h.url("/"), &[]).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(a.body.contains("reset or closed"), "{}", a.body);
    assert_eq!(h.proxy.stats().totals(Target::Canary).errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_idempotent_canary_requests_fall_back_to_stable() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Behavior {
        status: Some(503),
        ..Behavior::default()
    });
    let h = Harness::with_upstreams(stable, canary, 10_000, |_| {});
    let client = http1_client();
    let a = get(&client, &h.url("/"), &[]).await;
    assert_eq!(
        (a.status, a.body.as_str(), a.upstream()),
        (StatusCode::OK, "stable", "stable")
    );
    assert_eq!(a.headers["x-serin-fallback"], "canary");
    // The judge still sees the canary's failure.
    assert_eq!(h.proxy.stats().totals(Target::Canary).errors, 1);
    // A POST is not replayed: the client gets the canary's answer.
    let post = Request::post(h.url("/")).body(empty()).unwrap();
    let a = send(&client, post).await;
    assert_eq!(
        (a.status, a.upstream()),
        (StatusCode::SERVICE_UNAVAILABLE, "canary")
    );
    assert_eq!(h.proxy.stats().totals(Target::Canary).errors, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_end_to_end() {
    let h = Harness::start(0, |_| {}).await;
    let client = h2c_client();
    for _ in 0..5 {
        let a = get(&client, &h.url("/"), &[]).await;
        assert_eq!(
            (a.status, a.version, a.body.as_str()),
            (StatusCode::OK, http::Version::HTTP_2, "stable")
        );
    }
    let a = get(&client, &h.url("/"), &[("x-serin-canary", "always")]).await;
    assert_eq!(a.body, "canary");
    // The HTTP/1.1 upstream received a proper Host header from :authority.
    let a = get(&client, &h.url("/echo-headers"), &[]).await;
    assert!(
        a.body.contains(&format!("host: {}", h.proxy.local_addr())),
        "{}",
        a.body
    );
}

/// A response's `x-request-id` is new every time, so over HTTP/2 it is sent
/// as a literal never indexed: it must not enter the connection's HPACK
/// table, where each one would evict an entry later responses could reuse.
/// Read off the wire: after the first response sent, the others insert nothing
/// (the upstream's `date` may tick over once), and each carries exactly one
/// never-indexed field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_ids_stay_out_of_the_hpack_table() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = Harness::start(0, |_| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(h.proxy.local_addr())
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    const STREAMS: u32 = 6;
    for i in 0..STREAMS {
        // GET http://localhost/ : indexed :method, :scheme and :path, and
        // :authority as a literal that is not indexed (name index 1).
        let block = [&[0x82u8, 0x86, 0x84, 0x01, 9][..], b"localhost"].concat();
        out.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[1, 0x5]); // HEADERS, END_STREAM | END_HEADERS
        out.extend_from_slice(&(2 * i + 1).to_be_bytes());
        out.extend_from_slice(&block);
    }
    tcp.write_all(&out).await.unwrap();

    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let read_all = async {
        while blocks.len() < STREAMS as usize {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            if head[3] == 1 {
                assert_eq!(head[4] & 0x28, 0, "no padding or priority expected");
                assert_ne!(head[4] & 0x4, 0, "one HEADERS frame per response");
                blocks.push(payload);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("six responses within 10 s");
    // In the order they were sent, which is the order they were encoded in:
    // the streams may answer in any order.

    let reps: Vec<Representations> = blocks.iter().map(|b| Representations::of(b)).collect();
    for (i, r) in reps.iter().enumerate() {
        assert_eq!(r.never_indexed, 1, "response {i}: {r:?}");
    }
    let later_inserts: usize = reps[1..].iter().map(|r| r.inserted).sum();
    assert!(
        later_inserts <= 1,
        "later responses inserted {later_inserts} fields: {reps:?}"
    );
}

/// How the fields of one HPACK block (RFC 7541 §6) were represented.
#[derive(Debug, Default)]
struct Representations {
    /// Literals with incremental indexing: added to the decoder's table.
    inserted: usize,
    /// Literals never indexed.
    never_indexed: usize,
}

impl Representations {
    fn of(mut block: &[u8]) -> Self {
        fn int(block: &mut &[u8], prefix_bits: u32) -> usize {
            let max = (1usize << prefix_bits) - 1;
            let mut value = (block[0] as usize) & max;
            *block = &block[1..];
            if value == max {
                let mut shift = 0;
                loop {
                    let b = block[0];
                    *block = &block[1..];
                    value += ((b & 0x7f) as usize) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
            }
            value
        }
        fn skip_string(block: &mut &[u8]) {
            let len = int(block, 7);
            *block = &block[len..];
        }
        let mut r = Representations::default();
        while !block.is_empty() {
            let first = block[0];
            let prefix = match first {
                b if b & 0x80 != 0 => {
                    int(&mut block, 7);
                    continue;
                }
                b if b & 0xe0 == 0x20 => {
                    int(&mut block, 5); // table size update
                    continue;
                }
                b if b & 0xc0 == 0x40 => {
                    r.inserted += 1;
                    6
                }
                b if b & 0xf0 == 0x10 => {
                    r.never_indexed += 1;
                    4
                }
                _ => 4, // literal without indexing
            };
            if int(&mut block, prefix) == 0 {
                skip_string(&mut block);
            }
            skip_string(&mut block);
        }
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_rewritten() {
    let h = Harness::start(0, |_| {}).await;
    let client = http1_client();
    let a = get(
        &client,
        &h.url("/echo-headers"),
        &[
            ("host", "shop.example"),
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("x-request-id", "abc-123"),
        ],
    )
    .await;
    let seen = a.body;
    assert!(
        seen.contains("host: shop.example\n"),
        "Host preserved: {seen}"
    );
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-request-id: abc-123\n"), "{seen}");
    assert!(
        !seen.contains("x-drop-me"),
        "Connection-named header removed: {seen}"
    );
    assert!(!seen.contains("keep-alive"), "{seen}");
    assert_eq!(
        a.headers["x-request-id"], "abc-123",
        "the client's id comes back"
    );

    // Without an id, one is generated, sent upstream and returned.
    let a = get(&client, &h.url("/echo-headers"), &[]).await;
    let id = a.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 24);
    assert!(a.body.contains(&format!("x-request-id: {id}\n")));
    let other = get(&client, &h.url("/"), &[]).await;
    assert_ne!(other.headers["x-request-id"].to_str().unwrap(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rewrite_and_via_when_configured() {
    let h = Harness::start(0, |c| {
        c.headers.rewrite_host = true;
        c.headers.via = true;
        c.headers.upstream_header = false;
    })
    .await;
    let a = get(
        &http1_client(),
        &h.url("/echo-headers"),
        &[("host", "shop.example")],
    )
    .await;
    assert!(
        a.body.contains(&format!("host: {}\n", h.stable.addr)),
        "{}",
        a.body
    );
    assert!(a.body.contains("via: 1.1 serin\n"), "{}", a.body);
    assert!(a.headers.get("x-serin-upstream").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let h = Harness::start(0, |_| {}).await;
    let client = http1_client();
    const SIZE: u64 = 50 * 1024 * 1024;
    // Upload: a generated 50 MB chunked body, never held in memory by the test.
    let req = Request::post(h.url("/upload"))
        .body(http_body_util::Either::Right(TestBody::generated(SIZE)))
        .unwrap();
    let a = send(&client, req).await;
    assert_eq!(a.body, format!("received {SIZE}"));
    // Download: count bytes as they stream.
    assert_eq!(
        download_len(&client, &h.url(&format!("/download/{SIZE}"))).await,
        SIZE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let h = Harness::start(0, |_| {}).await;
    let client = http1_client();
    for _ in 0..100 {
        assert_eq!(get(&client, &h.url("/"), &[]).await.status, StatusCode::OK);
    }
    assert_eq!(h.stable.requests(), 100);
    assert!(
        h.stable.connections() <= 2,
        "{} upstream connections for 100 sequential requests",
        h.stable.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_4xx_and_serving_continues() {
    let h = Harness::start(0, |c| c.max_header_bytes = 16 * 1024).await;
    let addr = h.proxy.local_addr();
    let bad = raw_exchange(addr, b"GARBAGE\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad:?}");
    let no_host = raw_exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host:?}");
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw_exchange(addr, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(
        get(&http1_client(), &h.url("/"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.stable.requests(),
        1,
        "bad requests never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_in_flight_requests() {
    let h = Harness::start(0, |_| {}).await;
    h.stable.set(Behavior {
        delay: Duration::from_millis(500),
        ..Behavior::default()
    });
    let client = http1_client();
    let url = h.url("/");
    let in_flight = tokio::spawn(async move { get(&client, &url, &[]).await });
    eventually(
        Duration::from_secs(10),
        "the slow request reaches the upstream",
        || async { h.stable.requests() == 1 },
    )
    .await;
    let addr = h.proxy.local_addr();
    h.proxy.shutdown();
    let a = in_flight.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "stable"));
    h.proxy.wait().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_trailers_is_classified() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Behavior {
        grpc_status: Some(14),
        ..Behavior::default()
    });
    stable.set(Behavior {
        grpc_status: Some(0),
        ..Behavior::default()
    });
    let h = Harness::with_upstreams(stable, canary, 0, |c| {
        c.stable.protocol = UpstreamProtocol::Http2;
        c.canary.protocol = UpstreamProtocol::Http2;
    });
    let client = h2c_client();
    for (route, want) in [("always", "14"), ("never", "0")] {
        let req = Request::post(h.url("/pkg.Service/Method"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-serin-canary", route)
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                Bytes::from_static(b"\0\0\0\0\0"),
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().expect("trailers forwarded").clone();
        assert_eq!(trailers["grpc-status"], want);
    }
    let totals = |t| h.proxy.stats().totals(t);
    assert_eq!(
        (
            totals(Target::Canary).successes,
            totals(Target::Canary).errors
        ),
        (0, 1)
    );
    assert_eq!(
        (
            totals(Target::Stable).successes,
            totals(Target::Stable).errors
        ),
        (1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_http1_and_h2_by_alpn() {
    let cert = TestCert::generate();
    let h = Harness::start(0, |c| {
        c.tls = Some(serin_proxy::TlsFiles {
            cert: cert.cert_path.clone(),
            key: cert.key_path.clone(),
            client_auth: None,
        })
    })
    .await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let mut config = (*cert.client).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(h.proxy.local_addr())
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = Request::get("/echo-headers")
            .header("host", "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = if alpn == b"h2" {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!(
                "https://localhost:{}/echo-headers",
                h.proxy.local_addr().port()
            ))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_upgrades_are_spliced_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(0, |_| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(h.proxy.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /upgrade HTTP/1.1\r\nhost: app\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: echo") && head.contains("connection: upgrade"),
        "{head}"
    );
    assert!(head.contains("x-serin-upstream: stable"), "{head}");
    for message in [&b"ping"[..], b"a longer message over the tunnel"] {
        tcp.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message);
    }
    // Ordinary requests still work alongside the tunnel.
    assert_eq!(
        get(&http1_client(), &h.url("/"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_port_and_their_stats_merge() {
    let h = Harness::start(0, |c| c.workers = 2).await;
    // A fresh connection per request, so the kernel spreads them over both
    // SO_REUSEPORT listeners.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    for _ in 0..200 {
        assert_eq!(get(&client, &h.url("/"), &[]).await.status, StatusCode::OK);
    }
    let now = tokio::time::Instant::now();
    assert_eq!(
        h.proxy
            .stats()
            .window_snapshot(Target::Stable, now)
            .requests,
        200
    );
    for worker in 0..2 {
        let served = h
            .proxy
            .stats()
            .worker(worker)
            .upstream(Target::Stable)
            .window_requests(now);
        assert!(
            served > 0,
            "worker {worker} served nothing of 200 connections"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_mid_upload_are_not_the_upstreams_fault() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start(10_000, |_| {}).await;
    for i in 0..12u64 {
        let mut tcp = tokio::net::TcpStream::connect(h.proxy.local_addr())
            .await
            .unwrap();
        tcp.write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 1000000\r\n\r\n")
            .await
            .unwrap();
        tcp.write_all(&[b'x'; 4096]).await.unwrap();
        eventually(
            Duration::from_secs(10),
            "the upload reaches the canary",
            || async { h.canary.requests() == i + 1 },
        )
        .await;
        drop(tcp);
        eventually(
            Duration::from_secs(10),
            "the canary sees the upload break off",
            || async { h.canary.aborted_uploads() == i + 1 },
        )
        .await;
    }
    // A normal request afterwards is served, and nothing above counted
    // against the canary.
    assert_eq!(get(&http1_client(), &h.url("/"), &[]).await.body, "canary");
    let totals = h.proxy.stats().totals(Target::Canary);
    assert_eq!((totals.successes, totals.errors), (1, 0));
    assert_eq!(h.proxy.stats().consecutive_errors(Target::Canary), 0);
}
