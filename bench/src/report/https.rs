//! The TLS-termination group's part of `bench/REPORT.md`
//! (bench/src/https.rs): its rows of the targets table and its section.
//! serin-https is compared with the better of nginx-https and haproxy-https:
//! CPU per keep-alive request ≤ 1.0× theirs, full handshakes per second on
//! one core ≥ 0.9× theirs, and p99 at a fixed rate no worse.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{
    fmt_spread, med_open, med_tp, open_quartiles, p99_judgement, rate_runs, ratio, table_head, tp,
    tp_spread, verdict, Figure, MAX_STEAL_PERCENT,
};
use crate::measure::Throughput;
use crate::results::{spread, CertResults, HandshakeRun, HttpsResults, Results};

/// The peers serin-https is judged against (both on OpenSSL).
const PEERS: [&str; 2] = ["nginx-https", "haproxy-https"];
const SERIN: &str = "serin-https";
/// CPU per keep-alive request, serin ÷ the better peer.
const CPU_TARGET: f64 = 1.0;
/// Full handshakes per second on one core, serin ÷ the better peer.
const HANDSHAKE_TARGET: f64 = 0.9;

/// The better of the peers' figures, if either was measured: the lower, or
/// with `higher`, the higher.
fn better(f: impl Fn(&str) -> f64, higher: bool) -> Option<f64> {
    let measured = PEERS.iter().map(|n| f(n)).filter(|v| *v > 0.0);
    if higher {
        measured.max_by(f64::total_cmp)
    } else {
        measured.min_by(f64::total_cmp)
    }
}

fn hs<'a>(map: &'a BTreeMap<String, Vec<HandshakeRun>>, name: &str) -> &'a [HandshakeRun] {
    map.get(name).map(Vec::as_slice).unwrap_or(&[])
}

fn med_hs(runs: &[HandshakeRun], f: impl Fn(&HandshakeRun) -> f64) -> f64 {
    spread(&runs.iter().map(f).collect::<Vec<_>>()).0
}

fn hs_spread(runs: &[HandshakeRun], f: impl Fn(&HandshakeRun) -> f64, digits: usize) -> String {
    fmt_spread(&runs.iter().map(f).collect::<Vec<_>>(), digits)
}

fn p99(cert: &CertResults, i: usize, name: &str) -> f64 {
    med_open(rate_runs(&cert.open, i, name), |o| o.p99_us)
}

/// A ratio row of the targets table: serin's figure against the better
/// peer's, `at_most` or at least `target`.
fn ratio_row(
    s: &mut String,
    label: &str,
    serin: f64,
    best: Option<f64>,
    target: f64,
    at_most: bool,
) {
    let bound = if at_most { "≤" } else { "≥" };
    match best {
        Some(b) if serin > 0.0 => {
            let r = serin / b;
            let ok = if at_most { r <= target } else { r >= target };
            let _ = writeln!(
                s,
                "| {label} | {bound} {target:.1}× | {r:.2}× | {} |",
                verdict(ok)
            );
        }
        _ => {
            let _ = writeln!(s, "| {label} | {bound} {target:.1}× | – | not measured |");
        }
    }
}

/// The group's rows of the summary table: serin-https's figure and its
/// ratio to each peer's `*-https` target (none for the plain-only ones),
/// labelled so, as the table's columns name the plain targets.
pub(super) fn summary_rows(s: &mut String, res: &Results, peers: &[&str]) {
    let Some(https) = &res.https else {
        return;
    };
    let https_name = |n: &str| format!("{n}-https");
    for cert in &https.certs {
        let rows: [(String, Figure<'_>, usize); 4] = [
            (
                format!(
                    "*-https*: CPU µs per keep-alive HTTPS/1.1 request ({})",
                    cert.label
                ),
                Box::new(|n| med_tp(tp(&cert.http1, n), Throughput::cpu_us)),
                2,
            ),
            (
                format!(
                    "*-https*: CPU µs per keep-alive HTTPS/2 request ({})",
                    cert.label
                ),
                Box::new(|n| med_tp(tp(&cert.http2, n), Throughput::cpu_us)),
                2,
            ),
            (
                format!("*-https*: full handshakes/s on one core ({})", cert.label),
                Box::new(|n| med_hs(hs(&cert.full, n), HandshakeRun::per_core)),
                0,
            ),
            (
                format!(
                    "*-https*: resumed handshakes/s on one core ({})",
                    cert.label
                ),
                Box::new(|n| med_hs(hs(&cert.resumed, n), HandshakeRun::per_core)),
                0,
            ),
        ];
        for (label, f, digits) in &rows {
            let sv = f(SERIN);
            let _ = write!(s, "| {label} | {sv:.digits$} |");
            for p in peers {
                let peer = https_name(p);
                if PEERS.contains(&peer.as_str()) {
                    let _ = write!(s, " {} |", ratio(sv, f(&peer)));
                } else {
                    let _ = write!(s, " – |");
                }
            }
            let _ = writeln!(s);
        }
    }
}

/// The group's rows of the targets table.
pub(super) fn target_rows(s: &mut String, res: &Results) {
    let Some(https) = &res.https else {
        return;
    };
    for cert in &https.certs {
        for (proto, map) in [("HTTP/1.1", &cert.http1), ("HTTP/2", &cert.http2)] {
            let cpu = |n: &str| med_tp(tp(map, n), Throughput::cpu_us);
            let label = format!(
                "TLS termination ({}): CPU per keep-alive {proto} request ÷ better of nginx, haproxy",
                cert.label
            );
            ratio_row(s, &label, cpu(SERIN), better(cpu, false), CPU_TARGET, true);
        }
    }
    for cert in &https.certs {
        let per_core = |n: &str| med_hs(hs(&cert.full, n), HandshakeRun::per_core);
        let label = format!(
            "TLS termination ({}): full handshakes per second on one core ÷ better of nginx, haproxy",
            cert.label
        );
        ratio_row(
            s,
            &label,
            per_core(SERIN),
            better(per_core, true),
            HANDSHAKE_TARGET,
            false,
        );
    }
    for cert in https.certs.iter().filter(|c| !c.open.is_empty()) {
        for (i, rate) in cert.open.iter().enumerate() {
            let serin = p99(cert, i, SERIN);
            let Some(b) = better(|n| p99(cert, i, n), false) else {
                continue;
            };
            let judged = p99_judgement(serin, b, rate.steal_percent);
            let _ = writeln!(
                s,
                "| TLS termination: p99 at {:.0} req/s over keep-alive HTTPS/1.1 ≤ better of nginx's, haproxy's | ≤ {b:.0} µs | {serin:.0} µs | {judged} |",
                rate.rate
            );
        }
    }
}

/// The "TLS termination" section.
pub(super) fn section(s: &mut String, res: &Results) {
    let Some(https) = &res.https else {
        return;
    };
    let _ = writeln!(s, "\n## TLS termination\n");
    let _ = writeln!(
        s,
        "The client speaks HTTPS to each proxy (TLS 1.3 where both sides offer it; HTTP/1.1 or HTTP/2 by ALPN); \
         each proxy speaks plain HTTP/1.1 to the plain upstream, with the same 90/10 split, upstream keep-alive \
         and one worker as the plain targets (`nginx-https.conf`, `haproxy-https.cfg`, `serin-https.toml`). \
         Every proxy serves the same self-signed certificate for `bench.serin.test`, made for the run with \
         `openssl req`, once ECDSA P-256 and once RSA 2048. nginx and haproxy use OpenSSL, serin rustls (aws-lc-rs). \
         No client verifies the certificate. Ratios are ÷ the better of nginx-https and haproxy-https; targets: \
         CPU per keep-alive request ≤ {CPU_TARGET:.1}×, full handshakes per second on one core ≥ {HANDSHAKE_TARGET:.1}×, \
         p99 no worse.\n\n\
         New connections come from `serin-bench handshakes` ({} connections in flight, each: connect, handshake, \
         one `GET` with `Connection: close`, read to the end). *Per core* is 10⁶ ÷ the proxy's CPU µs per \
         connection: how many such connections one core would serve, whatever the generator managed. \
         *Full*: the client never resumes. *Resumed*: the client keeps its sessions (TLS 1.3 tickets) and \
         offers one on every new connection; the share the server accepted is shown.\n",
        crate::https::HANDSHAKE_CONNECTIONS
    );
    for cert in &https.certs {
        let _ = writeln!(s, "### {}\n", cert.label);
        keepalive_table(s, res, https, cert);
        handshake_table(s, https, cert);
        latency_tables(s, https, cert);
    }
}

fn keepalive_table(s: &mut String, res: &Results, https: &HttpsResults, cert: &CertResults) {
    let _ = writeln!(
        s,
        "Keep-alive connections: HTTP/1.1 by wrk -t1 -c{}, HTTP/2 by h2load -t1 -c16 -m16; median (min–max) of {} rounds.\n",
        res.wrk_connections, https.rounds
    );
    let cpu1 = |n: &str| med_tp(tp(&cert.http1, n), Throughput::cpu_us);
    let cpu2 = |n: &str| med_tp(tp(&cert.http2, n), Throughput::cpu_us);
    let (best1, best2) = (better(cpu1, false), better(cpu2, false));
    table_head(
        s,
        &[
            "target",
            "HTTP/1.1 req/s",
            "CPU µs/req",
            "user µs",
            "÷ better",
            "HTTP/2 req/s",
            "CPU µs/req",
            "user µs",
            "÷ better",
            "errors",
        ],
    );
    for n in &https.targets {
        let (r1, r2) = (tp(&cert.http1, n), tp(&cert.http2, n));
        if r1.is_empty() && r2.is_empty() {
            continue;
        }
        let vs = |v: f64, b: Option<f64>| b.map(|b| ratio(v, b)).unwrap_or("–".into());
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            tp_spread(r1, |t| t.rps, 0),
            tp_spread(r1, Throughput::cpu_us, 2),
            tp_spread(r1, |t| t.user_us, 2),
            vs(cpu1(n), best1),
            tp_spread(r2, |t| t.rps, 0),
            tp_spread(r2, Throughput::cpu_us, 2),
            tp_spread(r2, |t| t.user_us, 2),
            vs(cpu2(n), best2),
            r1.iter().chain(r2).map(|t| t.errors).sum::<u64>(),
        );
    }
    let _ = writeln!(s);
}

fn handshake_table(s: &mut String, https: &HttpsResults, cert: &CertResults) {
    let _ = writeln!(
        s,
        "New connections, one request each; median (min–max) of {} rounds.\n",
        https.rounds
    );
    table_head(
        s,
        &[
            "target",
            "handshakes",
            "connections/s",
            "CPU µs/connection",
            "per core /s",
            "per core ÷ better",
            "resumed",
            "errors",
            "negotiated",
        ],
    );
    for (kind, map) in [("full", &cert.full), ("resumed", &cert.resumed)] {
        let per_core = |n: &str| med_hs(hs(map, n), HandshakeRun::per_core);
        let best = better(per_core, true);
        for n in &https.targets {
            let runs = hs(map, n);
            if runs.is_empty() {
                continue;
            }
            let completed: u64 = runs.iter().map(|h| h.generator.completed).sum();
            let resumed: u64 = runs.iter().map(|h| h.generator.resumed).sum();
            let _ = writeln!(
                s,
                "| {n} | {kind} | {} | {} | {} | {} | {:.1}% | {} | {} |",
                hs_spread(runs, |h| h.generator.per_sec, 0),
                hs_spread(runs, |h| h.cpu_us, 1),
                hs_spread(runs, HandshakeRun::per_core, 0),
                best.map(|b| ratio(per_core(n), b)).unwrap_or("–".into()),
                resumed as f64 * 100.0 / completed.max(1) as f64,
                runs.iter().map(|h| h.generator.errors).sum::<u64>(),
                runs.first()
                    .map(|h| h.generator.negotiated.as_str())
                    .unwrap_or("–"),
            );
        }
    }
    let _ = writeln!(s);
}

fn latency_tables(s: &mut String, https: &HttpsResults, cert: &CertResults) {
    for (i, rate) in cert.open.iter().enumerate() {
        let slices = https
            .targets
            .iter()
            .map(|n| rate_runs(&cert.open, i, n).len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "p99 at {:.0} req/s over keep-alive HTTPS/1.1, 32 connections (µs; median (25th–75th percentile) of {slices} slices). \
             The hypervisor stole {:.1}% of the machine's CPU time meanwhile{}.\n",
            rate.rate,
            rate.steal_percent,
            if rate.steal_percent > MAX_STEAL_PERCENT {
                "; the targets table does not judge these figures"
            } else {
                ""
            }
        );
        let best = better(|n| p99(cert, i, n), false);
        table_head(
            s,
            &[
                "target",
                "p50",
                "p99",
                "p99.9",
                "p99 ÷ better",
                "achieved req/s",
                "errors",
            ],
        );
        for n in &https.targets {
            let runs = rate_runs(&cert.open, i, n);
            if runs.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} | {} |",
                open_quartiles(runs, |o| o.p50_us),
                open_quartiles(runs, |o| o.p99_us),
                open_quartiles(runs, |o| o.p999_us),
                best.map(|b| ratio(p99(cert, i, n), b))
                    .unwrap_or("–".into()),
                open_quartiles(runs, |o| o.achieved_rps),
                runs.iter().map(|o| o.errors).sum::<u64>(),
            );
        }
        let _ = writeln!(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshakes::HandshakeResult;

    fn cert(cpu: [(&str, f64); 3], handshake_us: [(&str, f64); 3]) -> CertResults {
        let mut c = CertResults {
            label: "ECDSA P-256".into(),
            ..CertResults::default()
        };
        for (n, us) in cpu {
            let t = Throughput {
                requests: 1000,
                user_us: us / 2.0,
                sys_us: us / 2.0,
                ..Throughput::default()
            };
            c.http1.insert(n.into(), vec![t.clone()]);
            c.http2.insert(n.into(), vec![t]);
        }
        for (n, us) in handshake_us {
            let h = HandshakeRun {
                generator: HandshakeResult {
                    completed: 100,
                    ..HandshakeResult::default()
                },
                cpu_us: us,
                ..HandshakeRun::default()
            };
            c.full.insert(n.into(), vec![h.clone()]);
            c.resumed.insert(n.into(), vec![h]);
        }
        c
    }

    /// CPU is judged lower-is-better, handshakes per core higher-is-better,
    /// each against the better of nginx and haproxy.
    #[test]
    fn rows_judge_cpu_down_and_handshakes_up_against_the_better_peer() {
        let https = HttpsResults {
            rounds: 1,
            targets: vec![PEERS[0].into(), PEERS[1].into(), SERIN.into()],
            certs: vec![cert(
                [(PEERS[0], 30.0), (PEERS[1], 20.0), (SERIN, 22.0)],
                [(PEERS[0], 500.0), (PEERS[1], 400.0), (SERIN, 200.0)],
            )],
        };
        let res = Results {
            https: Some(https),
            ..Results::default()
        };
        let mut rows = String::new();
        target_rows(&mut rows, &res);
        let row = |what: &str| rows.lines().find(|l| l.contains(what)).unwrap().to_string();
        assert!(
            row("HTTP/1.1 request").contains("| 1.10× | **not met** |"),
            "{rows}"
        );
        // 10⁶/200 against 10⁶/400 per second.
        assert!(
            row("full handshakes").contains("| ≥ 0.9× | 2.00× | met |"),
            "{rows}"
        );
        let mut section_text = String::new();
        section(&mut section_text, &res);
        for n in [PEERS[0], PEERS[1], SERIN] {
            assert!(
                section_text.matches(&format!("| {n} |")).count() >= 3,
                "{section_text}"
            );
        }
    }
}
