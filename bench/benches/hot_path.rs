//! Criterion micro-benchmarks of serin's per-request hot path: the split
//! decision (the route table check plus the rules), recording an outcome in the
//! rolling window, and the judge's merged window snapshot.
//!
//! bench/README.md ("Targets") budgets route decision plus stats record at ≤ 100 ns.
//! `cargo run --release -p serin-bench -- peers` copies the latest numbers
//! into `bench/REPORT.md`; run with `cargo bench -p serin-bench --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderValue, ACCEPT, COOKIE, HOST, USER_AGENT};
use serin_proxy::split::FastRng;
use serin_proxy::{RouteTable, Routes, SplitRules, Stats, StickyKey, Target};
use tokio::time::Instant;

/// The headers of a typical API request that carries no override.
fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HOST, HeaderValue::from_static("api.example.com"));
    h.insert(USER_AGENT, HeaderValue::from_static("curl/8.5.0"));
    h.insert(ACCEPT, HeaderValue::from_static("*/*"));
    h.insert(
        COOKIE,
        HeaderValue::from_static("theme=dark; session=4f1c2a9e7d; lang=en"),
    );
    h
}

fn route_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_decision");
    let routes = Routes::new(RouteTable::new(1_000));
    let rules = SplitRules::default();
    let rng = FastRng::new(42);
    let headers = typical_headers();
    group.bench_function("load_and_decide/weight", |b| {
        b.iter(|| {
            let table = routes.load();
            black_box(rules.decide(&table, black_box(&headers), None, &rng))
        })
    });
    let sticky = SplitRules {
        sticky: Some(StickyKey::Cookie("session".to_string())),
        ..SplitRules::default()
    };
    group.bench_function("load_and_decide/sticky_cookie", |b| {
        b.iter(|| {
            let table = routes.load();
            black_box(sticky.decide(&table, black_box(&headers), None, &rng))
        })
    });
    group.finish();
}

fn stats_record(c: &mut Criterion) {
    let mut group = c.benchmark_group("stats_record");
    let stats = Stats::new(1, Duration::from_secs(10), Instant::now());
    let worker = stats.worker(0);
    let now = Instant::now();
    group.bench_function("record/fixed_now", |b| {
        b.iter(|| {
            worker.upstream(Target::Stable).record(
                black_box(now),
                black_box(Duration::from_micros(180)),
                false,
            )
        })
    });
    group.bench_function("record/clock_read", |b| {
        b.iter(|| {
            worker.upstream(Target::Canary).record(
                Instant::now(),
                black_box(Duration::from_micros(180)),
                false,
            )
        })
    });
    group.finish();
}

/// The same request as it arrives on the wire, for serin's own HTTP/1.1
/// path, which decides from the raw fields.
const TYPICAL_HEAD: &[u8] = b"GET /api/v1/items HTTP/1.1\r\nHost: api.example.com\r\n\
User-Agent: curl/8.5.0\r\nAccept: */*\r\n\
Cookie: theme=dark; session=4f1c2a9e7d; lang=en\r\n\r\n";

/// What the request path adds per request: one route table check and
/// decision, one clock read and one stats record (the ≤ 100 ns budget of
/// bench/README.md). `decide_and_record` is the HTTP/1.1 path (raw fields,
/// the worker's route view); `/header_map` is hyper's path (HTTP/2, uploads).
fn decide_and_record(c: &mut Criterion) {
    let routes = Routes::new(RouteTable::new(1_000));
    let local = routes.local();
    let rules = SplitRules::default();
    let rng = FastRng::new(7);
    let stats = Stats::new(1, Duration::from_secs(10), Instant::now());
    let worker = stats.worker(0);
    let mut fields = [httparse::EMPTY_HEADER; 16];
    let mut req = httparse::Request::new(&mut fields);
    assert!(req.parse(TYPICAL_HEAD).unwrap().is_complete());
    let raw = &*req.headers;
    c.bench_function("decide_and_record", |b| {
        b.iter(|| {
            let (target, _) = local.with(|table| rules.decide(table, black_box(raw), None, &rng));
            worker.upstream(target).record(
                Instant::now(),
                black_box(Duration::from_micros(180)),
                false,
            );
        })
    });
    let headers = typical_headers();
    c.bench_function("decide_and_record/header_map", |b| {
        b.iter(|| {
            let (target, _) =
                local.with(|table| rules.decide(table, black_box(&headers), None, &rng));
            worker.upstream(target).record(
                Instant::now(),
                black_box(Duration::from_micros(180)),
                false,
            );
        })
    });
}

/// What the judge reads every tick: a full 10 s window (ten 1 s slices, each
/// with 10,000 requests between 50 µs and 5 ms), merged across workers.
fn window_snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("window_snapshot");
    for workers in [1usize, 4] {
        let base = Instant::now();
        let window = Duration::from_secs(10);
        let stats = Stats::new(workers, window, base);
        let now = base + window - Duration::from_millis(1);
        for slice in 0..10u64 {
            let at = base + Duration::from_secs(slice);
            for w in 0..workers {
                let upstream = stats.worker(w);
                for i in 0..10_000u64 {
                    upstream.upstream(Target::Canary).record(
                        at,
                        Duration::from_micros(50 + i % 5_000),
                        i % 50 == 0,
                    );
                }
            }
        }
        assert_eq!(
            stats.window_snapshot(Target::Canary, now).requests,
            100_000 * workers as u64,
            "every slice is inside the window"
        );
        group.bench_function(format!("workers_{workers}"), |b| {
            b.iter(|| black_box(stats.window_snapshot(Target::Canary, black_box(now))))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    route_decision,
    stats_record,
    decide_and_record,
    window_snapshot
);
criterion_main!(benches);
