//! TLS termination in the `peers` run (issue 15, part 2): what it costs each
//! proxy to take HTTPS from its clients, as a sidecar does on every
//! connection and every record.
//!
//! The run makes two self-signed certificates for `bench.serin.test` with
//! the `openssl` command, one ECDSA P-256 and one RSA 2048, and starts a
//! plain upstream of its own (`bench/peers/upstream.conf`). For each
//! certificate it starts every `*-https` target serving it (nginx and
//! haproxy on OpenSSL, serin on rustls with ring), with the plain targets'
//! 90/10 split, upstream keep-alive and one worker, and measures in
//! interleaved rounds:
//!
//! - **keep-alive:** closed loop over kept-alive HTTPS connections, HTTP/1.1
//!   (wrk) and HTTP/2 (h2load, ALPN `h2`): CPU per request with TLS on
//!   every record;
//! - **full handshakes:** `serin-bench handshakes` opens a new connection
//!   for every request, with resumption off: the target's CPU per
//!   connection, and so how many one core would do per second;
//! - **resumed handshakes:** the same with the client resuming its session
//!   (TLS 1.3 tickets), with the share that did resume;
//! - **latency:** open-loop p99 at fixed rates over kept-alive HTTPS/1.1,
//!   with the ECDSA certificate only (a kept-alive connection's cost does
//!   not depend on the key that authenticated it).
//!
//! No client verifies the certificate (wrk, h2load and the handshake
//! generator alike), so the generator's core is spent on the proxy's work.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::measure::{self, Protocol};
use crate::peers::{self, PeerKind, Programs, Running, ServedCert, UpstreamPorts};
use crate::procs::{self, CpuTime};
use crate::results::{self, CertResults, HandshakeRun, HttpsResults, Results};
use crate::run;
use crate::tls::{record, Plan};

/// Connections the handshake generator keeps in flight.
pub(crate) const HANDSHAKE_CONNECTIONS: usize = 8;

/// The name every certificate is made for (no client checks it).
const SERVED_NAME: &str = "bench.serin.test";

/// Makes the two certificates in `dir` with `openssl req`: what each is,
/// its key type's `-newkey` arguments.
fn make_certs(dir: &Path) -> std::io::Result<Vec<ServedCert>> {
    let kinds: [(&'static str, &'static str, &[&str]); 2] = [
        (
            "ECDSA P-256",
            "ecdsa",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        ("RSA 2048", "rsa", &["-newkey", "rsa:2048"]),
    ];
    let mut certs = Vec::new();
    for (label, short, newkey) in kinds {
        let cert = ServedCert {
            label,
            short,
            cert: dir.join(format!("https-{short}.pem")),
            key: dir.join(format!("https-{short}-key.pem")),
            cert_and_key: dir.join(format!("https-{short}-both.pem")),
        };
        let out = Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "2"])
            .args(newkey)
            .args(["-subj", &format!("/CN={SERVED_NAME}")])
            .args(["-addext", &format!("subjectAltName=DNS:{SERVED_NAME}")])
            .arg("-keyout")
            .arg(&cert.key)
            .arg("-out")
            .arg(&cert.cert)
            .output()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot run openssl ({e}): install it with `apt-get install openssl`"
                ))
            })?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "openssl could not make the {label} certificate: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let both = [std::fs::read(&cert.cert)?, std::fs::read(&cert.key)?].concat();
        std::fs::write(&cert.cert_and_key, both)?;
        certs.push(cert);
    }
    Ok(certs)
}

/// Runs the handshake generator against `r` and charges `r`'s processes
/// with their CPU time per completed connection.
fn handshakes(r: &Running, resume: bool, duration: Duration) -> std::io::Result<HandshakeRun> {
    // Warm-up: the first connections of a new process fill caches.
    measure::handshakes(r.h1, resume, Duration::from_secs(1), HANDSHAKE_CONNECTIONS)?;
    let pids = r.pids();
    let cpu0 = CpuTime::of(&pids);
    let j0 = procs::cpu_jiffies();
    let generator = measure::handshakes(r.h1, resume, duration, HANDSHAKE_CONNECTIONS)?;
    let j1 = procs::cpu_jiffies();
    let cpu = CpuTime::of(&pids).since(cpu0);
    if generator.completed == 0 {
        return Err(std::io::Error::other(format!(
            "no connection completed ({} errors)",
            generator.errors
        )));
    }
    let busy = procs::cpu_busy(&j0, &j1);
    Ok(HandshakeRun {
        cpu_us: (cpu.user + cpu.sys) * 1e6 / generator.completed as f64,
        proxy_core_busy: procs::core_busy(&busy, peers::PROXY_CORE),
        loadgen_core_busy: procs::core_busy(&busy, peers::LOADGEN_CORE),
        generator,
    })
}

/// Starts the `kinds` that `available` allows, serving `cert`; what cannot
/// start is in `res.skipped` with why.
fn start_all(
    res: &mut Results,
    programs: &Programs,
    dir: &Path,
    up: UpstreamPorts,
    kinds: &[PeerKind],
    cert: &ServedCert,
    available: &dyn Fn(PeerKind) -> bool,
) -> Vec<Running> {
    let mut started = Vec::new();
    for &kind in kinds {
        let name = format!("{} ({})", kind.name(), cert.label);
        if !available(kind) {
            res.skipped
                .push((name, format!("`{}` is not installed", kind.program())));
            continue;
        }
        match peers::start_https_proxy(kind, programs, dir, up, cert) {
            Ok(r) => {
                eprintln!("started {name}: {}", r.command);
                res.commands.insert(name, r.command.clone());
                started.push(r);
            }
            Err(e) => {
                eprintln!("  {name} skipped: {e}");
                res.skipped.push((name, e.to_string()));
            }
        }
    }
    started
}

/// Measures one certificate's rounds (and, for the first, the open loop).
fn measure_cert(
    res: &mut Results,
    plan: &Plan,
    started: &[Running],
    upstream_pids: &[u32],
    cert: &ServedCert,
    with_latency: bool,
) -> CertResults {
    let mut out = CertResults {
        label: cert.label.to_string(),
        ..CertResults::default()
    };
    let closed = Duration::from_secs(plan.seconds);
    let short = Duration::from_secs(plan.h2_seconds);
    for round in 1..=plan.rounds {
        for r in started {
            let name = r.kind.name();
            let what = format!("round {round} {name} {} keep-alive HTTP/1.1", cert.short);
            let measured = run::quiet(res, &what, || {
                measure::throughput(r, upstream_pids, Protocol::Http1, closed, plan.connections)
            });
            record(res, &mut out.http1, &what, r, measured);

            let what = format!("round {round} {name} {} keep-alive HTTP/2", cert.short);
            let measured = run::quiet(res, &what, || {
                measure::throughput(r, upstream_pids, Protocol::Http2, short, plan.connections)
            });
            record(res, &mut out.http2, &what, r, measured);

            for (resume, list) in [(false, &mut out.full), (true, &mut out.resumed)] {
                let kind = if resume { "resumed" } else { "full" };
                let what = format!("round {round} {name} {} {kind} handshakes", cert.short);
                match run::quiet(res, &what, || handshakes(r, resume, short)) {
                    Ok(h) => {
                        eprintln!(
                            "{what}: {:.0}/s, {:.0} µs CPU each ({:.0}/s per core), {} of {} resumed, {} errors, {}",
                            h.generator.per_sec,
                            h.cpu_us,
                            h.per_core(),
                            h.generator.resumed,
                            h.generator.completed,
                            h.generator.errors,
                            h.generator.negotiated
                        );
                        list.entry(name.into()).or_default().push(h);
                    }
                    Err(e) => {
                        eprintln!("{what} failed: {e}");
                        res.notes.push(format!("{what} failed: {e}"));
                    }
                }
            }
        }
    }
    if with_latency {
        let slowest = started
            .iter()
            .filter_map(|r| out.http1.get(r.kind.name()))
            .map(|runs| results::median(&runs.iter().map(|t| t.rps).collect::<Vec<_>>()))
            .fold(f64::INFINITY, f64::min);
        let targets: Vec<&Running> = started.iter().collect();
        for rate in run::open_rates(slowest, plan.quick) {
            let runs =
                run::open_loop_rate(res, &targets, rate, plan.open_slices, plan.open_seconds);
            out.open.push(runs);
        }
    }
    out
}

/// Measures the TLS-termination group into `res.https`. A failure to set up
/// the group is a note: the rest of the report stands without it.
pub fn run(
    res: &mut Results,
    programs: &Programs,
    dir: &Path,
    plan: &Plan,
    available: &dyn Fn(PeerKind) -> bool,
) {
    let kinds: Vec<PeerKind> = PeerKind::HTTPS_ORDER
        .into_iter()
        .filter(|k| plan.only.is_empty() || plan.only.iter().any(|o| o == k.name()))
        .collect();
    if kinds.is_empty() {
        // `--only` named no `*-https` target.
        return;
    }
    let certs = match make_certs(dir) {
        Ok(certs) => certs,
        Err(e) => {
            res.notes.push(format!("TLS termination not measured: {e}"));
            return;
        }
    };
    let upstream = procs::free_ports(3).and_then(|p| {
        let ports = UpstreamPorts {
            stable: p[0],
            canary: p[1],
            direct_h2: p[2],
        };
        peers::start_upstream(&programs.nginx, dir, ports)
            .map(|u| (u, ports))
            .map_err(std::io::Error::other)
    });
    let (upstream, ports) = match upstream {
        Ok(u) => u,
        Err(e) => {
            res.notes.push(format!(
                "TLS termination not measured: its upstream did not start: {e}"
            ));
            return;
        }
    };
    let upstream_pids = upstream.pids();
    let mut https = HttpsResults {
        rounds: plan.rounds,
        ..HttpsResults::default()
    };
    for (i, cert) in certs.iter().enumerate() {
        let started = start_all(res, programs, dir, ports, &kinds, cert, available);
        if started.is_empty() {
            continue;
        }
        for r in &started {
            if !https.targets.iter().any(|t| t == r.kind.name()) {
                https.targets.push(r.kind.name().to_string());
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let measured = measure_cert(res, plan, &started, &upstream_pids, cert, i == 0);
        https.certs.push(measured);
        // The guards stop this certificate's targets before the next starts.
        drop(started);
    }
    if https.certs.is_empty() {
        res.notes
            .push("TLS termination not measured: no `*-https` target started".into());
        return;
    }
    res.https = Some(https);
    drop(upstream);
}
