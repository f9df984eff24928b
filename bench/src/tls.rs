//! TLS origination in the `peers` run (issue 14, part 6): what it costs each
//! proxy to speak TLS to its upstream while the client speaks plain HTTP/1.1.
//!
//! The run makes a test CA and a certificate for
//! [`TLS_SERVER_NAME`](crate::peers::TLS_SERVER_NAME) in its temporary
//! directory, starts the TLS upstream (`bench/peers/upstream-tls.conf`) and
//! every `*-tls` proxy twice (bench/src/peers.rs), then measures, in
//! interleaved rounds like the plain targets:
//!
//! - **keep-alive:** closed-loop HTTP/1.1 (wrk) with the proxy's upstream
//!   connections kept alive: CPU per request, with TLS on every byte;
//! - **new handshakes:** the same against the upstream ports that close every
//!   connection after its response (`Connection: close`, the same for every
//!   proxy), so each request is a new upstream TCP connection and TLS
//!   handshake: requests/s and CPU per handshake, with the upstream's log
//!   telling how many resumed a session and what was negotiated;
//! - **latency:** open-loop p99 at fixed rates, keep-alive, proxies only.
//!
//! direct-tls is wrk speaking TLS straight to the upstream (closed loop only:
//! the open-loop generator speaks plain HTTP).

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use crate::measure::{self, Protocol, Throughput};
use crate::peers::{self, PeerKind, Programs, Running, TlsMode, TlsUpstream};
use crate::procs;
use crate::results::{self, Results, Sessions, TlsResults};
use crate::run;

/// How much of the group to run, from the `peers` options.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Interleaved rounds.
    pub rounds: usize,
    /// Length of each closed-loop HTTP/1.1 run.
    pub seconds: u64,
    /// Length of each closed-loop HTTP/2 run and handshake run.
    pub h2_seconds: u64,
    /// wrk connections (the plain run's first count).
    pub connections: u32,
    /// Open-loop passes per rate.
    pub open_slices: usize,
    /// Length of one open-loop slice, seconds.
    pub open_seconds: u64,
    /// Quick mode: one open-loop rate.
    pub quick: bool,
    /// `--only`: when not empty, the `*-tls` targets it names (direct-tls
    /// runs when any other does).
    pub only: Vec<String>,
}

/// The upstream flushes its buffered handshake log every second
/// (`flush=1s`); waiting this long makes the file whole.
const LOG_FLUSH: Duration = Duration::from_millis(1_300);

/// Writes the test CA's certificate and the upstream's certificate and key
/// into `dir`, and picks the upstream's ports.
fn tls_upstream(dir: &Path) -> std::io::Result<TlsUpstream> {
    let ca = serin_tests::TestCa::new("serin-bench test CA");
    let issued = ca.server(&[peers::TLS_SERVER_NAME]);
    let ports = procs::free_ports(4)?;
    let up = TlsUpstream {
        stable: ports[0],
        canary: ports[1],
        stable_new: ports[2],
        canary_new: ports[3],
        ca: dir.join("tls-ca.pem"),
        cert: dir.join("upstream-tls.pem"),
        key: dir.join("upstream-tls-key.pem"),
        handshake_log: dir.join("upstream-tls-handshakes.log"),
    };
    std::fs::copy(&ca.cert_path, &up.ca)?;
    std::fs::write(&up.cert, &issued.cert_pem)?;
    std::fs::write(&up.key, &issued.key_pem)?;
    Ok(up)
}

/// The proxies of the group, each started in both modes.
struct Started {
    keepalive: Vec<Running>,
    handshakes: Vec<Running>,
}

/// Starts direct-tls and the `proxies` that `available` (is its program
/// installed) allows, in both modes; what cannot start is in `res.skipped`
/// with why.
fn start_all(
    res: &mut Results,
    programs: &Programs,
    dir: &Path,
    up: &TlsUpstream,
    proxies: &[PeerKind],
    available: &dyn Fn(PeerKind) -> bool,
) -> Started {
    let mut started = Started {
        keepalive: Vec::new(),
        handshakes: Vec::new(),
    };
    for mode in [TlsMode::KeepAlive, TlsMode::NewHandshakes] {
        let list = match mode {
            TlsMode::KeepAlive => &mut started.keepalive,
            TlsMode::NewHandshakes => &mut started.handshakes,
        };
        list.push(peers::direct_tls(up, mode));
        for &kind in proxies {
            let name = kind.name();
            if !available(kind) {
                if mode == TlsMode::KeepAlive {
                    res.skipped.push((
                        name.into(),
                        format!("`{}` is not installed", kind.program()),
                    ));
                }
                continue;
            }
            match peers::start_tls_proxy(kind, programs, dir, up, mode) {
                Ok(r) => {
                    eprintln!("started {name} ({}): {}", mode.name(), r.command);
                    res.commands
                        .insert(format!("{name} ({})", mode.name()), r.command.clone());
                    list.push(r);
                }
                Err(e) => {
                    eprintln!("  {name} ({}) skipped: {e}", mode.name());
                    res.skipped
                        .push((format!("{name} ({})", mode.name()), e.to_string()));
                }
            }
        }
    }
    started
}

/// Waits for the upstream's buffered log to be flushed, then returns its length.
fn flushed_len(log: &Path) -> u64 {
    sleep(LOG_FLUSH);
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// What the upstream logged after byte `from`, once flushed.
fn flushed_since(log: &Path, from: u64) -> Sessions {
    sleep(LOG_FLUSH);
    let text = std::fs::read(log).unwrap_or_default();
    let from = (from as usize).min(text.len());
    Sessions::parse(&String::from_utf8_lossy(&text[from..]))
}

/// Measures the TLS-origination group into `res.tls`. A failure to set up
/// the group is a note: the rest of the report stands without it.
pub fn run(
    res: &mut Results,
    programs: &Programs,
    dir: &Path,
    plan: &Plan,
    available: &dyn Fn(PeerKind) -> bool,
) {
    let chosen =
        |kind: PeerKind| plan.only.is_empty() || plan.only.iter().any(|o| o == kind.name());
    let proxies: Vec<PeerKind> = PeerKind::TLS_ORDER
        .into_iter()
        .filter(|k| *k != PeerKind::DirectTls && chosen(*k))
        .collect();
    if proxies.is_empty() {
        // `--only` named no `*-tls` target.
        return;
    }
    let up = match tls_upstream(dir) {
        Ok(up) => up,
        Err(e) => {
            res.notes.push(format!(
                "TLS origination not measured: cannot write its files: {e}"
            ));
            return;
        }
    };
    let upstream = match peers::start_upstream_tls(&programs.nginx, dir, &up) {
        Ok(u) => u,
        Err(e) => {
            res.notes.push(format!(
                "TLS origination not measured: the TLS upstream did not start: {e}"
            ));
            return;
        }
    };
    res.commands
        .insert("upstream-tls".into(), upstream.command.clone());
    let started = start_all(res, programs, dir, &up, &proxies, available);
    if started.keepalive.len() < 2 && started.handshakes.len() < 2 {
        res.notes
            .push("TLS origination not measured: no `*-tls` proxy started".into());
        return;
    }
    let upstream_pids = upstream.pids();
    let mut tls = TlsResults {
        targets: PeerKind::TLS_ORDER
            .iter()
            .filter(|k| {
                let has = |list: &[Running]| list.iter().any(|r| r.kind == **k);
                has(&started.keepalive) || has(&started.handshakes)
            })
            .map(|k| k.name().to_string())
            .collect(),
        ..TlsResults::default()
    };
    std::thread::sleep(Duration::from_secs(1));
    let closed = Duration::from_secs(plan.seconds);
    for round in 1..=plan.rounds {
        for r in &started.keepalive {
            let what = format!("round {round} {} keep-alive", r.kind.name());
            let measured = run::quiet(res, &what, || {
                measure::throughput(r, &upstream_pids, Protocol::Http1, closed, plan.connections)
            });
            record(res, &mut tls.keepalive, &what, r, measured);
        }
        for r in &started.handshakes {
            let what = format!("round {round} {} new handshakes", r.kind.name());
            let measured = run::quiet(res, &what, || {
                let from = flushed_len(&up.handshake_log);
                let t = measure::throughput(
                    r,
                    &upstream_pids,
                    Protocol::Http1,
                    closed,
                    plan.connections,
                )?;
                Ok((t, flushed_since(&up.handshake_log, from)))
            });
            let measured = measured.map(|(t, sessions)| {
                eprintln!(
                    "{what}: {} of {} upstream handshakes resumed ({})",
                    sessions.resumed, sessions.handshakes, sessions.negotiated
                );
                tls.sessions
                    .entry(r.kind.name().into())
                    .or_default()
                    .add(sessions);
                t
            });
            record(res, &mut tls.handshakes, &what, r, measured);
        }
    }

    // p99 at fixed rates, keep-alive, the proxies only.
    let compared: Vec<&Running> = started
        .keepalive
        .iter()
        .filter(|r| r.kind != PeerKind::DirectTls)
        .collect();
    let slowest = compared
        .iter()
        .filter_map(|r| tls.keepalive.get(r.kind.name()))
        .map(|runs| results::median(&runs.iter().map(|t| t.rps).collect::<Vec<_>>()))
        .fold(f64::INFINITY, f64::min);
    for rate in run::open_rates(slowest, plan.quick) {
        let runs = run::open_loop_rate(res, &compared, rate, plan.open_slices, plan.open_seconds);
        tls.open.push(runs);
    }
    res.tls = Some(tls);
    // The guards stop every proxy, then the upstream, by PID.
    drop(started);
    drop(upstream);
}

/// Files one closed-loop result under its target, or notes its failure.
pub(crate) fn record(
    res: &mut Results,
    map: &mut std::collections::BTreeMap<String, Vec<Throughput>>,
    what: &str,
    r: &Running,
    measured: std::io::Result<Throughput>,
) {
    match measured {
        Ok(t) => {
            eprintln!("{what}: {}", run::closed_loop_line(&t));
            map.entry(r.kind.name().into()).or_default().push(t);
        }
        Err(e) => {
            eprintln!("{what} failed: {e}");
            res.notes.push(format!("{what} failed: {e}"));
        }
    }
}
