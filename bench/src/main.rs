//! `serin-bench`: the peer benchmark and its tools.
//!
//! `cargo run --release -p serin-bench -- peers [--quick]` measures serin
//! against direct, nginx, haproxy and Envoy and regenerates `bench/REPORT.md`;
//! `judge-sim`, `revert` and `fleet` refresh one safety benchmark each.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serin_bench::{handshakes, loadgen, report, results::Results, run};

/// serin's benchmark harness.
#[derive(Debug, Parser)]
#[command(name = "serin-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure serin against direct, nginx, haproxy and Envoy, plain and with
    /// TLS to the upstream; write bench/REPORT.md.
    Peers {
        /// One short round (about 2 minutes), for iteration.
        #[arg(long)]
        quick: bool,
        /// Rounds of interleaved runs [default: 3, or 1 with --quick].
        #[arg(long)]
        rounds: Option<usize>,
        /// Skip the criterion micro-benchmarks.
        #[arg(long)]
        no_criterion: bool,
        /// Only these targets, comma-separated (nginx, haproxy, envoy, serin,
        /// nginx-log, serin-log, serin-shadow, nginx-tls, haproxy-tls, envoy-tls,
        /// serin-tls);
        /// direct always runs, and direct-tls with any `*-tls` target.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// wrk connection counts for closed-loop HTTP/1.1 (comma-separated); the
        /// first is the one the summary and CPU figures use.
        #[arg(long, value_delimiter = ',', default_value = "64,256")]
        connections: Vec<u32>,
    },
    /// Run only the judge-quality simulator, add it to
    /// bench/results/latest.json and rebuild the report.
    JudgeSim {
        /// Fewer rollouts.
        #[arg(long)]
        quick: bool,
        /// Simulate only the conditions whose progress line contains one of
        /// these texts (separated by |), with their healthy twins, and
        /// print them without recording anything: e.g.
        /// `--only "×10|10 req/s, stable 5%"`.
        #[arg(long, value_delimiter = '|')]
        only: Vec<String>,
    },
    /// Run only the TLS-termination group (nginx-https, haproxy-https,
    /// serin-https), add it to bench/results/latest.json and rebuild the
    /// report. Build serin first (`cargo build --release -p serin-control`).
    Https {
        /// One short round.
        #[arg(long)]
        quick: bool,
        /// Rounds of interleaved runs [default: 3, or 1 with --quick].
        #[arg(long)]
        rounds: Option<usize>,
    },
    /// Run only the revert-latency and blast-radius benchmark, add it to
    /// bench/results/latest.json and rebuild the report. Build serin first
    /// (`cargo build --release -p serin-control`).
    Revert,
    /// Run only the fleet benchmark (5 and 20 `serin run --fleet` members
    /// against a fake Kubernetes API server on loopback: revert propagation
    /// and API requests), add it to bench/results/latest.json and rebuild the
    /// report. Build serin first (`cargo build --release -p serin-control`).
    Fleet {
        /// 3 trials per fleet size and latency and a 20 s idle window (about 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Trials per fleet size and API latency [default: 10, or 3 with --quick].
        #[arg(long)]
        trials: Option<usize>,
        /// Fleet sizes (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "5,20")]
        members: Vec<usize>,
        /// How often each member's `GET /status` is polled during a trial, ms.
        #[arg(long, default_value_t = 2)]
        poll_ms: u64,
    },
    /// Rebuild bench/REPORT.md and the SVGs from bench/results/latest.json.
    Report,
    /// Open-loop, coordinated-omission-corrected load (used by `peers`); prints JSON.
    Openloop {
        /// Server address.
        #[arg(long)]
        addr: SocketAddr,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// Length of the schedule in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        duration_ms: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Speak TLS (SNI bench.serin.test, ALPN http/1.1, the certificate
        /// not verified).
        #[arg(long)]
        tls: bool,
    },
    /// New TLS connections, one request each, for as long as asked (the cost
    /// of TLS termination per connection); prints JSON.
    Handshakes {
        /// TLS server address.
        #[arg(long)]
        addr: SocketAddr,
        /// How long to open connections, in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        duration_ms: u64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Resume sessions (TLS 1.3 tickets) instead of a full handshake each
        /// time.
        #[arg(long)]
        resume: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Peers {
            quick,
            rounds,
            no_criterion,
            only,
            connections,
        } => {
            let opts = run::Options {
                quick,
                rounds,
                no_criterion,
                only,
                connections,
            };
            match run::peers(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("serin-bench peers: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::JudgeSim { quick, only } if !only.is_empty() => {
            let mut settings = serin_bench::judge_sim::SimSettings::new(quick);
            settings.only = only;
            serin_bench::judge_sim::run(&settings);
            ExitCode::SUCCESS
        }
        Cmd::JudgeSim { quick, .. } => update_latest("judge-sim", |res| {
            run::simulate_judge(res, quick);
            Ok::<(), std::convert::Infallible>(())
        }),
        Cmd::Https { quick, rounds } => {
            update_latest("https", |res| run::https_only(res, quick, rounds))
        }
        Cmd::Revert => update_latest("revert", |res| {
            res.revert = serin_bench::revert::run(&run::serin_binary(), 1_000.0)?;
            Ok::<(), std::io::Error>(())
        }),
        Cmd::Fleet {
            quick,
            trials,
            members,
            poll_ms,
        } => {
            if members.contains(&0) || poll_ms == 0 {
                eprintln!("serin-bench fleet: --members and --poll-ms must be at least 1");
                return ExitCode::from(2);
            }
            update_latest("fleet", |res| {
                let opts = serin_bench::fleet::Options {
                    quick,
                    trials,
                    sizes: members,
                    poll: Duration::from_millis(poll_ms),
                };
                res.fleet = Some(serin_bench::fleet::run(&run::serin_binary(), &opts)?);
                Ok::<(), serin_bench::fleet::FleetError>(())
            })
        }
        Cmd::Report => {
            let path = run::bench_dir().join("results/latest.json");
            let res: Result<Results, String> = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            let written =
                res.and_then(|r| report::write(&r, &run::bench_dir()).map_err(|e| e.to_string()));
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "serin-bench report: cannot rebuild from {}: {e}; run `serin-bench peers` first",
                        path.display()
                    );
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Openloop {
            addr,
            rate,
            duration_ms,
            connections,
            tls,
        } => {
            if !rate.is_finite() || rate <= 0.0 {
                eprintln!("serin-bench openloop: --rate must be above 0 (got {rate})");
                return ExitCode::from(2);
            }
            let spec = loadgen::OpenLoop {
                addr,
                rate,
                duration: Duration::from_millis(duration_ms),
                connections,
                tls,
            };
            match loadgen::run(&spec) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("serin-bench openloop: cannot load {addr}: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Handshakes {
            addr,
            duration_ms,
            connections,
            resume,
        } => {
            let spec = handshakes::Handshakes {
                addr,
                resume,
                duration: Duration::from_millis(duration_ms),
                connections,
            };
            match handshakes::run(&spec) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("serin-bench handshakes: cannot start the generator: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Loads bench/results/latest.json (or starts empty), lets `change` refresh
/// one part of it, then saves it and rebuilds bench/REPORT.md.
fn update_latest<E: std::fmt::Display>(
    what: &str,
    change: impl FnOnce(&mut Results) -> Result<(), E>,
) -> ExitCode {
    let path = run::bench_dir().join("results/latest.json");
    let mut res: Results = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Err(e) = change(&mut res) {
        eprintln!("serin-bench {what}: {e}");
        return ExitCode::from(2);
    }
    let saved = serde_json::to_vec_pretty(&res)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&path, b))
        .and_then(|()| report::write(&res, &run::bench_dir()));
    match saved {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin-bench {what}: cannot write the report: {e}");
            ExitCode::from(2)
        }
    }
}
