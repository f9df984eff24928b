//! The `peers` command: check the tools, build serin, start the upstream and
//! every proxy, run the interleaved rounds, and write the report.
//!
//! Order of a round: direct → nginx → haproxy → Envoy → serin, repeated, so
//! slow drift of the machine hits every target alike; then the same for the
//! TLS-origination group (bench/src/tls.rs). Nothing is measured while
//! another build is running on the machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::loadgen::OpenLoopResult;
use crate::measure::{self, Protocol, Throughput};
use crate::peers::{self, PeerKind, Programs, Running, UpstreamPorts};
use crate::procs::{self, Memory};
use crate::report;
use crate::results::{self, MicroBench, RateRuns, Results};
use crate::tools;

/// Options of one run.
#[derive(Clone, Debug)]
pub struct Options {
    /// One short round (about 2 minutes), for iteration.
    pub quick: bool,
    /// Rounds (default 3; 1 with `quick`).
    pub rounds: Option<usize>,
    /// Skip the criterion micro-benchmarks.
    pub no_criterion: bool,
    /// Only these targets (direct is always measured).
    pub only: Vec<String>,
    /// wrk connection counts for closed-loop HTTP/1.1 (default 64 and 256);
    /// the first is the one the summary and CPU figures use.
    pub connections: Vec<u32>,
}

/// Where the committed report and results live (`bench/`).
pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn workspace_dir() -> PathBuf {
    bench_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(bench_dir)
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A required tool is missing.
    #[error("missing required tools (see above for how to install them): {0}")]
    MissingTools(String),
    /// serin could not be built.
    #[error("`cargo build --release -p serin-control` failed; fix the build first")]
    Build,
    /// The upstream did not start.
    #[error("the upstream did not start: {0}")]
    Upstream(#[from] peers::StartError),
    /// Files could not be written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn sh(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The machine this runs on, and serin's commit.
pub fn machine() -> results::Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ws = workspace_dir();
    let ws = ws.to_string_lossy();
    let commit = sh("git", &["-C", &ws, "rev-parse", "--short", "HEAD"]);
    let dirty = !sh(
        "git",
        &["-C", &ws, "status", "--porcelain", "--", "proxy", "control"],
    )
    .is_empty();
    results::Machine {
        cpu: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: sh("uname", &["-sr"]),
        memory_mib: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024,
        rustc: sh("rustc", &["--version"]),
        commit: if dirty {
            format!("{commit}-dirty")
        } else {
            commit
        },
    }
}

/// Now, as `date -u` writes it.
pub fn utc_now() -> String {
    sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

/// The serin binary next to this one (or `SERIN_BIN`).
pub fn serin_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SERIN_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("serin")))
        .unwrap_or_else(|| PathBuf::from("serin"))
}

/// Runs criterion and reads every `estimates.json` it wrote.
fn criterion(quick: bool) -> Vec<MicroBench> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_dir())
        .args(["bench", "-p", "serin-bench", "--bench", "hot_path", "--"])
        .args(if quick {
            ["--warm-up-time", "1", "--measurement-time", "1"]
        } else {
            ["--warm-up-time", "1", "--measurement-time", "3"]
        });
    eprintln!("criterion: cargo bench -p serin-bench --bench hot_path");
    match cmd.status() {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("  criterion failed; the report will have no micro-benchmarks");
            return Vec::new();
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"));
    let mut out = Vec::new();
    collect_estimates(
        &target.join("criterion"),
        &target.join("criterion"),
        &mut out,
    );
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn collect_estimates(root: &Path, dir: &Path, out: &mut Vec<MicroBench>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                let est = p.join("estimates.json");
                let bench = p.join("benchmark.json");
                let mean = std::fs::read(&est)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["mean"]["point_estimate"].as_f64());
                let name = std::fs::read(&bench)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["full_id"].as_str().map(str::to_string))
                    .or_else(|| {
                        p.parent()
                            .and_then(|d| d.strip_prefix(root).ok())
                            .map(|d| d.display().to_string())
                    });
                if let (Some(mean), Some(name)) = (mean, name) {
                    out.push(MicroBench {
                        name,
                        mean_ns: mean,
                    });
                }
            } else {
                collect_estimates(root, &p, out);
            }
        }
    }
}

fn profile_serin(target: &Running, seconds: u64, connections: u32) -> Vec<String> {
    let data = std::env::temp_dir().join(format!("serin-bench-perf-{}.data", std::process::id()));
    let pid = target.process.as_ref().map(|p| p.pid()).unwrap_or(0);
    let mut rec = Command::new("perf");
    rec.args(["record", "-F", "1999", "-o"])
        .arg(&data)
        .arg("-p")
        .arg(pid.to_string())
        .arg("--")
        .arg("sleep")
        .arg(seconds.to_string());
    let log = std::env::temp_dir().join(format!("serin-bench-perf-{}.log", std::process::id()));
    let Ok(mut recorder) = procs::Guarded::spawn("perf record", rec, &log) else {
        return Vec::new();
    };
    let _ = tools::wrk(&target.url(), connections, Duration::from_secs(seconds + 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while recorder.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    recorder.stop();
    let report = |args: &[&str]| -> Vec<String> {
        Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-i"])
            .arg(&data)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .map(|l| l.trim_end_matches([' ', '-']).to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut lines = vec!["by binary:".to_string()];
    lines.extend(report(&["--sort", "dso"]).into_iter().take(8));
    lines.push(String::new());
    lines.push("top symbols:".to_string());
    lines.extend(report(&["--sort", "dso,symbol"]).into_iter().take(40));
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&log);
    lines
}

/// Runs one measurement on a quiet machine: waits for other builds to end,
/// watches for builds starting during the run, and repeats a disturbed run
/// (up to 3 tries; a run still disturbed after that is kept and noted).
pub(crate) fn quiet<T>(
    res: &mut Results,
    what: &str,
    mut f: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    for attempt in 1..=3 {
        res.waited_seconds += procs::wait_for_quiet(Duration::from_secs(1800)).as_secs_f64();
        let watch = procs::BuildWatch::start();
        let r = f();
        let seen = watch.finish();
        if seen.is_empty() {
            return r;
        }
        if attempt == 3 {
            res.notes.push(format!(
                "{what}: builds ran during all 3 tries ({}); the last try is kept",
                seen.join(", ")
            ));
            return r;
        }
        eprintln!(
            "  {what}: the machine got busy during the run ({}); repeating it",
            seen.join(", ")
        );
        res.disturbed_runs += 1;
    }
    unreachable!("the third try always returns")
}

/// One closed-loop result as the progress lines print it.
pub(crate) fn closed_loop_line(t: &Throughput) -> String {
    format!(
        "{:>8.0} req/s, {:.1} µs CPU/req ({:.1} user + {:.1} sys), {} errors, cores busy {:.0}%/{:.0}% → {}",
        t.rps,
        t.cpu_us(),
        t.user_us,
        t.sys_us,
        t.errors,
        t.proxy_core_busy * 100.0,
        t.loadgen_core_busy * 100.0,
        t.bottleneck()
    )
}

/// The open-loop rates: 2,000 req/s and about half the slowest proxy's
/// median max (`slowest`, req/s; infinite when none was measured), rounded
/// to 500; only the latter with `quick`.
pub(crate) fn open_rates(slowest: f64, quick: bool) -> Vec<f64> {
    let half = if slowest.is_finite() {
        ((slowest * 0.5) / 500.0).round().max(1.0) * 500.0
    } else {
        2_000.0
    };
    if quick {
        return vec![half];
    }
    let mut rates = vec![2_000.0];
    if (half - 2_000.0).abs() > 1.0 {
        rates.push(half);
    }
    rates
}

/// Open-loop latency of `targets` at one fixed rate: `slices` passes, each
/// running every target for `seconds` in an order rotated by one from the
/// last pass, so that slice `k` of every target comes from pass `k`.
pub(crate) fn open_loop_rate(
    res: &mut Results,
    targets: &[&Running],
    rate: f64,
    slices: usize,
    seconds: u64,
) -> RateRuns {
    let steal_before = procs::steal_jiffies();
    let mut runs: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for pass in 0..slices {
        let mut order = targets.to_vec();
        order.rotate_left(pass % targets.len().max(1));
        // The quiet check and build watch cover the whole pass: a pass
        // disturbed by a build is run again, and a pass where any target
        // failed is dropped for every target, so passes stay aligned.
        let what = format!("open loop {rate}/s, pass {}", pass + 1);
        let measured = quiet(res, &what, || {
            order
                .iter()
                .map(|r| {
                    measure::open_loop(r.h1, rate, Duration::from_secs(seconds), 32, r.tls_client)
                        .map(|o| (r.kind.name(), o))
                        .map_err(|e| std::io::Error::other(format!("{}: {e}", r.kind.name())))
                })
                .collect::<std::io::Result<Vec<_>>>()
        });
        match measured {
            Ok(measured) => {
                for (name, o) in measured {
                    runs.entry(name.into()).or_default().push(o);
                }
            }
            Err(e) => {
                eprintln!("{what} failed and is left out: {e}");
                res.notes
                    .push(format!("{what} failed and is left out: {e}"));
            }
        }
        if (pass + 1) % 4 == 0 || pass + 1 == slices {
            eprintln!("open loop {rate:>6.0}/s: {}/{slices} passes", pass + 1);
        }
    }
    let (stolen, total) = procs::steal_jiffies();
    let steal_percent = stolen.saturating_sub(steal_before.0) as f64 * 100.0
        / total.saturating_sub(steal_before.1).max(1) as f64;
    for (name, slices) in &runs {
        let med = |f: fn(&OpenLoopResult) -> f64| {
            results::median(&slices.iter().map(f).collect::<Vec<_>>())
        };
        eprintln!(
            "{name:8} open loop {rate:>6.0}/s, median of {} slices: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {} errors, send lag p99 {:.0} µs",
            slices.len(),
            med(|o| o.p50_us),
            med(|o| o.p99_us),
            med(|o| o.p999_us),
            slices.iter().map(|o| o.errors).sum::<u64>(),
            med(|o| o.send_lag_p99_us),
        );
    }
    eprintln!("open loop {rate:>6.0}/s: the hypervisor stole {steal_percent:.1}% of the machine's CPU time");
    RateRuns {
        rate,
        runs,
        steal_percent,
    }
}

/// The whole `peers` run.
pub fn peers(opts: &Options) -> Result<(), RunError> {
    let t0 = Instant::now();
    let quick = opts.quick;
    let rounds = opts.rounds.unwrap_or(if quick { 1 } else { 3 });
    let (h1_s, h2_s) = if quick { (3, 2) } else { (12, 6) };
    // Open loop: 1 s slices, 8 per round (see phase 2).
    let open_s = 1;
    let open_slices = if quick { 4 } else { 8 * rounds };
    let mut res = Results {
        started: utc_now(),
        quick,
        rounds,
        closed_seconds: (h1_s, h2_s),
        wrk_connections: opts.connections.first().copied().unwrap_or(64),
        open_seconds: open_s,
        open_slices,
        ..Results::default()
    };

    // Tools: check, explain, never install.
    eprintln!("serin-bench peers: checking tools (nothing is installed by this command)");
    let found = tools::discover();
    let mut missing = Vec::new();
    for t in &found {
        match &t.path {
            Some(p) => {
                eprintln!("  {:8} {} ({})", t.name, t.version, p.display());
                res.versions.insert(t.name.to_string(), t.version.clone());
            }
            None => {
                eprintln!(
                    "  {:8} MISSING{}: install with `{}`",
                    t.name,
                    if t.required { "" } else { " (optional)" },
                    t.install
                );
                if t.required {
                    missing.push(t.name);
                }
            }
        }
    }
    if !missing.is_empty() {
        return Err(RunError::MissingTools(missing.join(", ")));
    }
    let path_of = |n: &str| {
        found
            .iter()
            .find(|t| t.name == n)
            .and_then(|t| t.path.clone())
    };
    let has = |n: &str| path_of(n).is_some();
    // nginx is required and serin is built: only haproxy and Envoy can be missing.
    let installed = |kind: PeerKind| match kind.program() {
        p @ ("haproxy" | "envoy") => has(p),
        _ => true,
    };

    // serin itself: built from this tree, so the report measures this commit.
    eprintln!("building serin: cargo build --release -p serin-control");
    let built = Command::new("cargo")
        .current_dir(workspace_dir())
        .args(["build", "--release", "-p", "serin-control"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !built {
        return Err(RunError::Build);
    }
    let programs = programs(&found);
    res.versions.insert(
        "serin".into(),
        sh(&programs.serin.to_string_lossy(), &["--version"]),
    );
    res.machine = machine();

    let previous = std::fs::read(bench_dir().join("results/latest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Results>(&b).ok());
    // What this run does not measure is carried over: the fleet benchmark
    // has its own command (`serin-bench fleet`), and a run with `--only`
    // leaves the judge simulator and the revert benchmark out, and the TLS
    // termination group too unless it names one of its targets (which
    // then replaces the group's results).
    if let Some(previous) = previous {
        res.micro_previous = previous.micro;
        res.fleet = previous.fleet;
        if !opts.only.is_empty() {
            res.judges = previous.judges;
            res.revert = previous.revert;
            res.https = previous.https;
        }
    }
    if !opts.no_criterion {
        res.waited_seconds += procs::wait_for_quiet(Duration::from_secs(1800)).as_secs_f64();
        res.micro = criterion(quick);
    }

    // From here on the harness itself stays on the load generator's core.
    procs::pin_self(peers::LOADGEN_CORE);

    // Start everything.
    let dir = std::env::temp_dir().join(format!("serin-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ports = procs::free_ports(3)?;
    let up = UpstreamPorts {
        stable: ports[0],
        canary: ports[1],
        direct_h2: ports[2],
    };
    let upstream = peers::start_upstream(&programs.nginx, &dir, up)?;
    let upstream_pids = upstream.pids();
    res.commands
        .insert("upstream".into(), upstream.command.clone());
    let mut running: Vec<Running> = Vec::new();
    let mut shadow_canary = None;
    for kind in PeerKind::ORDER {
        let name = kind.name();
        if kind != PeerKind::Direct && !opts.only.is_empty() && !opts.only.iter().any(|o| o == name)
        {
            continue;
        }
        if !installed(kind) {
            res.skipped
                .push((name.into(), format!("`{name}` is not installed")));
            continue;
        }
        let r = if kind == PeerKind::Direct {
            Ok(Running {
                kind,
                h1: upstream.h1,
                tls_client: false,
                h2: upstream.h2,
                process: None,
                config_path: None,
                command: "(the upstream itself)".into(),
                admin: None,
            })
        } else if kind == PeerKind::SerinShadow {
            // Its canary is a process of its own (`start_shadow_canary`).
            procs::free_ports(1)
                .map_err(|source| peers::StartError::Spawn {
                    what: "ports",
                    source,
                })
                .and_then(|ports| {
                    let (canary, command) =
                        peers::start_shadow_canary(&programs.nginx, &dir, ports[0])?;
                    res.commands.insert("shadow-canary".into(), command);
                    let up = UpstreamPorts {
                        canary: ports[0],
                        ..up
                    };
                    shadow_canary = Some(canary);
                    peers::start_proxy(kind, &programs, &dir, up)
                })
        } else {
            peers::start_proxy(kind, &programs, &dir, up)
        };
        match r {
            Ok(r) => {
                eprintln!("started {name}: {}", r.command);
                res.commands.insert(name.into(), r.command.clone());
                running.push(r);
            }
            Err(e) => {
                eprintln!("  {name} skipped: {e}");
                res.skipped.push((name.into(), e.to_string()));
            }
        }
    }
    res.targets = running.iter().map(|r| r.kind.name().to_string()).collect();
    std::thread::sleep(Duration::from_secs(1));
    for r in &running {
        let pids = if r.kind == PeerKind::Direct {
            upstream_pids.clone()
        } else {
            r.pids()
        };
        res.idle.insert(r.kind.name().into(), Memory::of(&pids));
    }

    // serin-shadow's copies, sent or skipped over its bound, counted at the
    // start and after phases 1 and 2.
    let shadow_admin = running
        .iter()
        .find(|r| r.kind == PeerKind::SerinShadow)
        .and_then(|r| r.admin);
    let shadow_counts = || {
        shadow_admin.and_then(|admin| {
            results::ShadowCopies::from_metrics(&procs::get_text(admin, "/metrics"))
        })
    };
    let shadow_at_start = shadow_counts();

    // Phase 1: closed-loop throughput and CPU, interleaved rounds.
    for round in 1..=rounds {
        for r in &running {
            let name = r.kind.name();
            let mut runs: Vec<(Protocol, u64, u32)> = opts
                .connections
                .iter()
                .enumerate()
                .map(|(i, c)| (Protocol::Http1, if i == 0 { h1_s } else { h2_s }, *c))
                .collect();
            runs.push((Protocol::Http2, h2_s, 0));
            for (level, (protocol, secs, conns)) in runs.into_iter().enumerate() {
                let what = format!("round {round} {name} {protocol:?} c{conns}");
                let measured = quiet(&mut res, &what, || {
                    measure::throughput(
                        r,
                        &upstream_pids,
                        protocol,
                        Duration::from_secs(secs),
                        conns,
                    )
                });
                match measured {
                    Ok(t) => {
                        eprintln!("{what}: {}", closed_loop_line(&t));
                        let map = if protocol == Protocol::Http2 {
                            &mut res.h2
                        } else if level == 0 {
                            &mut res.h1
                        } else {
                            &mut res.h1_more.entry(conns.to_string()).or_default()
                        };
                        map.entry(name.into()).or_default().push(t);
                    }
                    Err(e) => {
                        eprintln!("round {round} {name} {protocol:?} failed: {e}");
                        res.notes
                            .push(format!("round {round}: {name} {protocol:?} failed: {e}"));
                    }
                }
            }
        }
    }

    // Phase 2: open-loop latency at fixed rates: 2,000 req/s and about half
    // the slowest proxy's median max. On a virtual machine the tail is set
    // mostly by the hypervisor: while a vCPU is descheduled, whichever target
    // is running stalls. One long run per target lets a single stall decide a
    // comparison, so every target instead gets many short slices, taken in
    // passes (each pass runs every target once, its order rotated by one from
    // the last), and the report reads the median slice. Slice `k` of every
    // target comes from pass `k`, which the report's paired count relies on.
    // The access-log targets are measured in the closed loop only: what
    // logging costs is CPU per request.
    let compared: Vec<&Running> = running.iter().filter(|r| !r.kind.logs()).collect();
    let slowest = compared
        .iter()
        .filter(|r| r.kind != PeerKind::Direct)
        .filter_map(|r| res.h1.get(r.kind.name()))
        .map(|runs| results::median(&runs.iter().map(|t| t.rps).collect::<Vec<_>>()))
        .fold(f64::INFINITY, f64::min);
    let shadow_after_closed = shadow_counts();
    // serin-shadow's canary stands in for pods of its own: for the latency
    // runs it takes only what its core leaves idle, so that its own work
    // does not count as serin's cost to the client. The other phases run it
    // at normal priority, so that the copies are answered.
    let canary_priority = |res: &mut Results, idle: bool| {
        if let Some(canary) = &shadow_canary {
            if let Err(e) = procs::idle_priority(&canary.tree(), idle) {
                res.notes
                    .push(format!("serin-shadow: its canary's priority: {e}"));
            }
        }
    };
    canary_priority(&mut res, true);
    for rate in open_rates(slowest, quick) {
        let runs = open_loop_rate(&mut res, &compared, rate, open_slices, open_s);
        res.open.push(runs);
    }
    if let (Some(start), Some(closed), Some(open)) =
        (shadow_at_start, shadow_after_closed, shadow_counts())
    {
        res.shadow_copies = Some([closed.since(start), open.since(closed)]);
    } else if shadow_admin.is_some() {
        res.notes
            .push("serin-shadow: its metrics had no serin_shadow_requests_total".into());
    }
    canary_priority(&mut res, false);

    // Phase 3: memory with 1,000 connections, syscalls, and serin's profile.
    let perf = has("perf");
    let strace = has("strace");
    for r in &compared {
        let name = r.kind.name();
        if r.kind == PeerKind::Direct {
            continue;
        }
        let measured = quiet(&mut res, &format!("{name} memory"), || {
            measure::memory_with_connections(r, 1_000)
        });
        match measured {
            Ok(m) => {
                eprintln!(
                    "{name:8} with 1,000 connections: {} KiB PSS, {} KiB RSS",
                    m.pss_kib, m.rss_kib
                );
                res.conns_1000.insert(name.into(), m);
            }
            Err(e) => res
                .notes
                .push(format!("{name}: 1,000-connection memory failed: {e}")),
        }
        std::thread::sleep(Duration::from_millis(500));
        for (protocol, h2) in [("HTTP/1.1", false), ("HTTP/2", true)] {
            let measured = quiet(&mut res, &format!("{name} {protocol} syscalls"), || {
                measure::syscalls(r, perf, strace && !quick, h2)
            });
            match measured {
                Ok(s) => {
                    eprintln!(
                        "{name:8} syscalls per {protocol} request: {:.2} ({})",
                        s.per_request, s.counted_by
                    );
                    let map = if h2 {
                        &mut res.syscalls_h2
                    } else {
                        &mut res.syscalls
                    };
                    map.insert(name.into(), s);
                }
                Err(e) => res
                    .notes
                    .push(format!("{name}: {protocol} syscall count failed: {e}")),
            }
        }
        if r.kind == PeerKind::Serin && perf {
            res.waited_seconds += procs::wait_for_quiet(Duration::from_secs(1800)).as_secs_f64();
            res.profile = profile_serin(r, if quick { 3 } else { 6 }, res.wrk_connections);
        }
    }

    // Stop everything by PID (the guards do it on any early return too).
    for mut r in running {
        if let Some(p) = r.process.as_mut() {
            p.stop();
        }
    }
    drop(upstream);
    drop(shadow_canary);

    // Phase 4: TLS origination, with its own upstream and proxies
    // (bench/src/tls.rs).
    let plan = crate::tls::Plan {
        rounds,
        seconds: h1_s,
        h2_seconds: h2_s,
        connections: res.wrk_connections,
        open_slices,
        open_seconds: open_s,
        quick,
        only: opts.only.clone(),
    };
    crate::tls::run(&mut res, &programs, &dir, &plan, &installed);
    // Phase 5: TLS termination, with its own upstream and proxies
    // (bench/src/https.rs).
    crate::https::run(&mut res, &programs, &dir, &plan, &installed);

    let _ = std::fs::remove_dir_all(&dir);
    // The judge simulator and the revert benchmark are not targets: a run
    // with `--only` carries them over, as it does the fleet's.
    if opts.only.is_empty() {
        // The judge-quality simulator: pure computation, after the timed runs.
        simulate_judge(&mut res, quick);
        // Revert latency and blast radius: serin alone, with its control plane.
        res.waited_seconds += procs::wait_for_quiet(Duration::from_secs(1800)).as_secs_f64();
        match crate::revert::run(&programs.serin, 1_000.0) {
            Ok(r) => res.revert = r,
            Err(e) => res.notes.push(format!("revert benchmark failed: {e}")),
        }
    }
    res.wall_seconds = t0.elapsed().as_secs_f64();

    let out = bench_dir().join("results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_vec_pretty(&res).map_err(std::io::Error::other)?,
    )?;
    report::write(&res, &bench_dir())?;
    eprintln!(
        "done in {:.0} s: {} and {}",
        res.wall_seconds,
        bench_dir().join("REPORT.md").display(),
        out.join("latest.json").display()
    );
    Ok(())
}

/// Where the peer programs `discover` found are, and the serin built from
/// this tree.
fn programs(found: &[tools::Tool]) -> Programs {
    let path_of = |n: &str| {
        found
            .iter()
            .find(|t| t.name == n)
            .and_then(|t| t.path.clone())
    };
    Programs {
        nginx: path_of("nginx").unwrap_or_default(),
        haproxy: path_of("haproxy"),
        envoy: path_of("envoy"),
        serin: serin_binary(),
    }
}

/// Measures only the TLS-termination group (bench/src/https.rs) into `res`,
/// for `serin-bench https`: the same tools, pinning and rounds as in
/// `peers`, with the serin built from this tree (build it first).
pub fn https_only(res: &mut Results, quick: bool, rounds: Option<usize>) -> Result<(), RunError> {
    let found = tools::discover();
    let missing: Vec<&str> = found
        .iter()
        .filter(|t| t.required && t.path.is_none())
        .map(|t| t.name)
        .collect();
    if !missing.is_empty() {
        return Err(RunError::MissingTools(missing.join(", ")));
    }
    let programs = programs(&found);
    let installed = |kind: PeerKind| kind.program() != "haproxy" || programs.haproxy.is_some();
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 });
    let plan = crate::tls::Plan {
        rounds,
        seconds: if quick { 3 } else { 12 },
        h2_seconds: if quick { 2 } else { 6 },
        connections: res.wrk_connections.max(1),
        open_slices: if quick { 4 } else { 8 * rounds },
        open_seconds: 1,
        quick,
        only: Vec::new(),
    };
    procs::pin_self(peers::LOADGEN_CORE);
    let dir = std::env::temp_dir().join(format!("serin-bench-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    res.https = None;
    crate::https::run(res, &programs, &dir, &plan, &installed);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs the judge-quality simulator into `res` (pure computation, no sockets).
pub fn simulate_judge(res: &mut Results, quick: bool) {
    let started = utc_now();
    let mut run = crate::judge_sim::run(&crate::judge_sim::SimSettings::new(quick));
    run.started = started;
    run.commit = machine().commit;
    res.judges = Some(run);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_rates_are_2000_and_half_the_slowest_rounded_to_500() {
        assert_eq!(open_rates(36_600.0, false), vec![2_000.0, 18_500.0]);
        assert_eq!(open_rates(36_600.0, true), vec![18_500.0]);
        // Half the slowest is 2,000 already: one rate.
        assert_eq!(open_rates(4_100.0, false), vec![2_000.0]);
        // At least 500; nothing measured: 2,000.
        assert_eq!(open_rates(300.0, true), vec![500.0]);
        assert_eq!(open_rates(f64::INFINITY, true), vec![2_000.0]);
    }
}
