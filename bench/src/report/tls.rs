//! The TLS-origination group's part of `bench/REPORT.md` (bench/src/tls.rs):
//! its rows of the targets table and its section. The group is compared
//! within itself: serin-tls against the better of nginx-tls and haproxy-tls,
//! the target being CPU per keep-alive request ≤ 1.0× theirs and p99 no worse.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{
    med_open, med_tp, open_quartiles, p99_judgement, rate_runs, ratio, table_head, tp, tp_spread,
    verdict, MAX_STEAL_PERCENT,
};
use crate::loadgen::OpenLoopResult;
use crate::measure::Throughput;
use crate::results::{Results, TlsResults};

/// The peers serin-tls is judged against (both on OpenSSL).
const PEERS: [&str; 2] = ["nginx-tls", "haproxy-tls"];
/// CPU per keep-alive request, serin ÷ the better peer.
const CPU_TARGET: f64 = 1.0;

/// The better (lower) of the peers' figures, if either was measured.
fn better(f: impl Fn(&str) -> f64) -> Option<f64> {
    PEERS
        .iter()
        .map(|n| f(n))
        .filter(|v| *v > 0.0)
        .min_by(f64::total_cmp)
}

fn open_runs<'a>(tls: &'a TlsResults, i: usize, name: &str) -> &'a [OpenLoopResult] {
    rate_runs(&tls.open, i, name)
}

fn p99(tls: &TlsResults, i: usize, name: &str) -> f64 {
    med_open(open_runs(tls, i, name), |o| o.p99_us)
}

/// The group's rows of the targets table.
pub(super) fn target_rows(s: &mut String, res: &Results) {
    let Some(tls) = &res.tls else {
        return;
    };
    let cpu = |n: &str| med_tp(tp(&tls.keepalive, n), Throughput::cpu_us);
    let serin = cpu("serin-tls");
    let label = "TLS origination: CPU per keep-alive request ÷ better of nginx, haproxy";
    match better(cpu) {
        Some(b) if serin > 0.0 => {
            let r = serin / b;
            let _ = writeln!(
                s,
                "| {label} | ≤ {CPU_TARGET:.1}× | {r:.2}× | {} |",
                verdict(r <= CPU_TARGET)
            );
        }
        _ => {
            let _ = writeln!(s, "| {label} | ≤ {CPU_TARGET:.1}× | – | not measured |");
        }
    }
    for (i, rate) in tls.open.iter().enumerate() {
        let serin = p99(tls, i, "serin-tls");
        let Some(b) = better(|n| p99(tls, i, n)) else {
            continue;
        };
        let judged = p99_judgement(serin, b, rate.steal_percent);
        let _ = writeln!(
            s,
            "| TLS origination: p99 at {:.0} req/s ≤ better of nginx's, haproxy's | ≤ {b:.0} µs | {serin:.0} µs | {judged} |",
            rate.rate
        );
    }
}

/// The "TLS origination" section.
pub(super) fn section(s: &mut String, res: &Results) {
    let Some(tls) = &res.tls else {
        return;
    };
    let _ = writeln!(s, "\n## TLS origination\n");
    let _ = writeln!(
        s,
        "The client speaks plain HTTP/1.1 to each proxy; each proxy speaks TLS to one TLS upstream \
         (`bench/peers/upstream-tls.conf`: one nginx worker on core 0 answering `return 200`, with a \
         certificate for `{}` from a CA made for the run) and verifies its certificate against that CA, with \
         the same 90/10 split, upstream keep-alive and one worker as the plain targets \
         (`nginx-tls.conf`, `haproxy-tls.cfg`, `envoy-tls.yaml`, `serin-tls.toml`). nginx and haproxy use \
         OpenSSL, Envoy BoringSSL, serin rustls (aws-lc-rs; ring before 2026-11-29). direct-tls is wrk speaking TLS to the upstream itself \
         (closed loop only: the open-loop generator speaks plain HTTP). Ratios are ÷ the better (lower) of \
         nginx-tls and haproxy-tls; target: CPU per keep-alive request ≤ {CPU_TARGET:.1}× and p99 no worse.\n",
        crate::peers::TLS_SERVER_NAME
    );
    keepalive_table(s, res, tls);
    latency_tables(s, tls);
    handshake_table(s, res, tls);
}

fn keepalive_table(s: &mut String, res: &Results, tls: &TlsResults) {
    let _ = writeln!(
        s,
        "### Keep-alive upstream connections (wrk -t1 -c{}; median (min–max) of {} rounds)\n",
        res.wrk_connections, res.rounds
    );
    closed_table(
        s,
        tls,
        &tls.keepalive,
        ["req/s", "proxy CPU µs/req", "upstream µs/req"],
        &["bottleneck"],
        |_, runs| {
            let mut bottlenecks: Vec<&str> = runs.iter().map(Throughput::bottleneck).collect();
            bottlenecks.dedup();
            bottlenecks.join(", ")
        },
    );
}

/// A closed-loop table of the group: each target's rate, its proxy's CPU
/// per request (with the ratio to the better peer's), the upstream's CPU per
/// request, `extra` columns (`|`-separated, one per `extra_labels`) and the
/// errors.
/// `labels` name the rate, proxy CPU and upstream CPU columns.
fn closed_table(
    s: &mut String,
    tls: &TlsResults,
    map: &BTreeMap<String, Vec<Throughput>>,
    labels: [&str; 3],
    extra_labels: &[&str],
    extra: impl Fn(&str, &[Throughput]) -> String,
) {
    let cpu = |n: &str| med_tp(tp(map, n), Throughput::cpu_us);
    let best = better(cpu);
    let [rate, proxy_cpu, upstream_cpu] = labels;
    let mut columns = vec![
        "target",
        rate,
        proxy_cpu,
        "user µs",
        "sys µs",
        "CPU ÷ better of nginx, haproxy",
        upstream_cpu,
    ];
    columns.extend(extra_labels);
    columns.push("errors");
    table_head(s, &columns);
    for n in &tls.targets {
        let runs = tp(map, n);
        if runs.is_empty() {
            continue;
        }
        // direct-tls has no proxy to charge.
        let direct = n == "direct-tls";
        let proxy = |f: &dyn Fn(&Throughput) -> f64| {
            if direct {
                "–".to_string()
            } else {
                tp_spread(runs, f, 2)
            }
        };
        let vs = match best {
            Some(b) if !direct => ratio(cpu(n), b),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {vs} | {} | {} | {} |",
            tp_spread(runs, |t| t.rps, 0),
            proxy(&Throughput::cpu_us),
            proxy(&|t| t.user_us),
            proxy(&|t| t.sys_us),
            tp_spread(runs, |t| t.upstream_us, 2),
            extra(n, runs),
            runs.iter().map(|t| t.errors).sum::<u64>(),
        );
    }
    let _ = writeln!(s);
}

fn latency_tables(s: &mut String, tls: &TlsResults) {
    for (i, rate) in tls.open.iter().enumerate() {
        let slices = tls
            .targets
            .iter()
            .map(|n| open_runs(tls, i, n).len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "### p99 at {:.0} req/s, keep-alive, 32 connections (µs; median (25th–75th percentile) of {slices} slices)\n",
            rate.rate
        );
        let _ = writeln!(
            s,
            "The hypervisor stole {:.1}% of the machine's CPU time while this rate was measured{}.\n",
            rate.steal_percent,
            if rate.steal_percent > MAX_STEAL_PERCENT {
                "; the targets table does not judge these figures"
            } else {
                ""
            }
        );
        let best = better(|n| p99(tls, i, n));
        table_head(
            s,
            &[
                "target",
                "p50",
                "p99",
                "p99.9",
                "p99 ÷ better of nginx, haproxy",
                "achieved req/s",
                "errors",
                "send lag p99",
            ],
        );
        let measured = tls
            .targets
            .iter()
            .map(|n| (n, open_runs(tls, i, n)))
            .filter(|(_, runs)| !runs.is_empty());
        for (n, runs) in measured {
            let vs = best.map(|b| ratio(p99(tls, i, n), b)).unwrap_or("–".into());
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {vs} | {} | {} | {} |",
                open_quartiles(runs, |o| o.p50_us),
                open_quartiles(runs, |o| o.p99_us),
                open_quartiles(runs, |o| o.p999_us),
                open_quartiles(runs, |o| o.achieved_rps),
                runs.iter().map(|o| o.errors).sum::<u64>(),
                open_quartiles(runs, |o| o.send_lag_p99_us),
            );
        }
        let _ = writeln!(s);
    }
}

fn handshake_table(s: &mut String, res: &Results, tls: &TlsResults) {
    if tls.handshakes.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### New upstream handshakes (wrk -t1 -c{}; median (min–max) of {} rounds)\n",
        res.wrk_connections, res.rounds
    );
    let _ = writeln!(
        s,
        "The same targets in front of upstream ports that close every connection after its response \
         (`keepalive_timeout 0`: `Connection: close`), the same for every proxy, so each request opens a new \
         upstream TCP connection and TLS handshake; the client's connections stay alive. Requests/s is \
         handshakes/s; CPU per request is CPU per handshake (with the connection's setup and teardown). \
         Resumed: the upstream's `$ssl_session_reused` over every handshake of the target's runs, warm-ups \
         included, with what was negotiated most often. Envoy keeps one session per cluster by default; nginx \
         (`proxy_ssl_session_reuse on`) and haproxy keep the last one per server; serin shares one session \
         cache per upstream.\n"
    );
    closed_table(
        s,
        tls,
        &tls.handshakes,
        [
            "handshakes/s",
            "CPU µs per handshake",
            "upstream µs per handshake",
        ],
        &["resumed", "negotiated"],
        |n, _| {
            tls.sessions
                .get(n)
                .filter(|x| x.handshakes > 0)
                .map(|x| {
                    format!(
                        "{:.0}% of {} | `{}`",
                        x.resumed_percent(),
                        x.handshakes,
                        x.negotiated
                    )
                })
                .unwrap_or_else(|| "– | –".into())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{RateRuns, Sessions};

    fn closed(rps: f64, user_us: f64, sys_us: f64) -> Vec<Throughput> {
        vec![Throughput {
            requests: (rps * 3.0) as u64,
            rps,
            user_us,
            sys_us,
            upstream_us: 9.0,
            proxy_core_busy: 1.0,
            loadgen_core_busy: 0.5,
            ..Throughput::default()
        }]
    }

    fn open(p99_us: f64) -> Vec<OpenLoopResult> {
        vec![OpenLoopResult {
            p50_us: p99_us / 4.0,
            p99_us,
            achieved_rps: 5_000.0,
            ..OpenLoopResult::default()
        }]
    }

    /// serin-tls at `serin_cpu` µs per keep-alive request and `serin_p99` µs,
    /// nginx-tls at 20 µs and 400 µs, haproxy-tls at 25 µs and 300 µs.
    fn results(serin_cpu: f64, serin_p99: f64, steal_percent: f64) -> Results {
        let mut tls = TlsResults {
            targets: ["direct-tls", "nginx-tls", "haproxy-tls", "serin-tls"]
                .map(String::from)
                .to_vec(),
            ..TlsResults::default()
        };
        for (name, cpu) in [
            ("direct-tls", 0.0),
            ("nginx-tls", 20.0),
            ("haproxy-tls", 25.0),
            ("serin-tls", serin_cpu),
        ] {
            tls.keepalive
                .insert(name.into(), closed(30_000.0, cpu / 4.0, cpu * 0.75));
            tls.handshakes
                .insert(name.into(), closed(2_000.0, cpu * 4.0, cpu * 6.0));
            tls.sessions.insert(
                name.into(),
                Sessions {
                    handshakes: 1_000,
                    resumed: 900,
                    negotiated: "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519".into(),
                },
            );
        }
        let mut runs = BTreeMap::new();
        for (name, p99) in [
            ("nginx-tls", 400.0),
            ("haproxy-tls", 300.0),
            ("serin-tls", serin_p99),
        ] {
            runs.insert(name.to_string(), open(p99));
        }
        tls.open.push(RateRuns {
            rate: 7_500.0,
            runs,
            steal_percent,
        });
        Results {
            rounds: 1,
            wrk_connections: 64,
            tls: Some(tls),
            ..Results::default()
        }
    }

    fn rows(res: &Results) -> String {
        let mut s = String::new();
        target_rows(&mut s, res);
        s
    }

    #[test]
    fn targets_are_judged_against_the_better_of_nginx_and_haproxy() {
        let met = rows(&results(18.0, 250.0, 0.0));
        assert!(
            met.contains("| TLS origination: CPU per keep-alive request ÷ better of nginx, haproxy | ≤ 1.0× | 0.90× | met |"),
            "{met}"
        );
        assert!(
            met.contains("| TLS origination: p99 at 7500 req/s ≤ better of nginx's, haproxy's | ≤ 300 µs | 250 µs | met |"),
            "{met}"
        );
        let missed = rows(&results(22.0, 350.0, 0.0));
        assert!(missed.contains("| 1.10× | **not met** |"), "{missed}");
        assert!(
            missed.contains("| ≤ 300 µs | 350 µs | **not met** |"),
            "{missed}"
        );
        let stolen = rows(&results(18.0, 350.0, 5.0));
        assert!(
            stolen.contains("| 350 µs | not judged: 5.0% steal |"),
            "{stolen}"
        );
    }

    #[test]
    fn without_serin_or_peers_nothing_is_judged() {
        let mut res = results(18.0, 250.0, 0.0);
        let tls = res.tls.as_mut().unwrap();
        tls.keepalive.remove("serin-tls");
        tls.open[0].runs.remove("serin-tls");
        let s = rows(&res);
        assert!(s.contains("| ≤ 1.0× | – | not measured |"), "{s}");
        assert!(s.contains("| 0 µs | not measured |"), "{s}");
        assert_eq!(rows(&Results::default()), "");
        let mut s = String::new();
        section(&mut s, &Results::default());
        assert_eq!(s, "");
    }

    #[test]
    fn the_section_has_cpu_latency_and_handshakes_for_every_target() {
        let res = results(18.0, 250.0, 0.0);
        let mut s = String::new();
        section(&mut s, &res);
        assert!(s.starts_with("\n## TLS origination\n"), "{s}");
        // Keep-alive: CPU with its ratio; direct-tls has no proxy to charge.
        assert!(
            s.contains("| target | req/s | proxy CPU µs/req | user µs | sys µs | CPU ÷ better of nginx, haproxy | upstream µs/req | bottleneck | errors |\n|---|---|---|---|---|---|---|---|---|\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "| serin-tls | 30000 | 18.00 | 4.50 | 13.50 | 0.90× | 9.00 | proxy core | 0 |"
            ),
            "{s}"
        );
        assert!(
            s.contains("| direct-tls | 30000 | – | – | – | – | 9.00 |"),
            "{s}"
        );
        // p99 at the fixed rate, ÷ haproxy's 300 µs.
        assert!(s.contains("| serin-tls | 62 | 250 | 0 | 0.83× |"), "{s}");
        // New handshakes: rate, CPU per handshake, resumption, negotiation.
        assert!(
            s.contains(
                "| resumed | negotiated | errors |\n|---|---|---|---|---|---|---|---|---|---|\n"
            ),
            "{s}"
        );
        assert!(s.contains(
            "| nginx-tls | 2000 | 200.00 | 80.00 | 120.00 | 1.00× | 9.00 | 90% of 1000 | `TLSv1.3 TLS_AES_256_GCM_SHA384 X25519` | 0 |"
        ), "{s}");
        assert!(s.contains("| direct-tls | 2000 | – | – | – | – |"), "{s}");
        let order: Vec<usize> = [
            "### Keep-alive",
            "### p99 at 7500",
            "### New upstream handshakes",
        ]
        .iter()
        .map(|h| s.find(h).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{s}");
    }
}
