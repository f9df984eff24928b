//! Everything one `peers` run measured, kept as JSON in
//! `bench/results/latest.json` so the report can be rebuilt without
//! re-measuring (`serin-bench report`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::loadgen::OpenLoopResult;
use crate::measure::{Syscalls, Throughput};
use crate::procs::Memory;

/// The machine the run was on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online cores.
    pub cores: usize,
    /// `uname -sr`.
    pub kernel: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// rustc version used to build serin.
    pub rustc: String,
    /// serin's git commit (with `-dirty` when the tree had changes).
    pub commit: String,
}

/// The open-loop runs at one fixed rate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RateRuns {
    /// Requests per second.
    pub rate: f64,
    /// Per target, one result per slice, in pass order: entry `k` of every
    /// target comes from the same pass.
    pub runs: BTreeMap<String, Vec<OpenLoopResult>>,
    /// Share of the machine's CPU time the hypervisor took away (`steal` in
    /// `/proc/stat`) while this rate was measured, percent.
    #[serde(default)]
    pub steal_percent: f64,
}

/// One criterion benchmark's mean time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MicroBench {
    /// `group/function`.
    pub name: String,
    /// Mean, ns.
    pub mean_ns: f64,
}

/// Everything a `peers` run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// When the run started (UTC, `date -u`).
    pub started: String,
    /// Quick mode (one round, short runs).
    pub quick: bool,
    /// Rounds of interleaved runs.
    pub rounds: usize,
    /// Closed-loop run length, seconds (HTTP/1.1, HTTP/2).
    pub closed_seconds: (u64, u64),
    /// Open-loop slice length, seconds.
    pub open_seconds: u64,
    /// Open-loop slices per rate per target.
    #[serde(default)]
    pub open_slices: usize,
    /// Seconds spent waiting for other builds to finish.
    pub waited_seconds: f64,
    /// Measurements repeated because a build started during them.
    pub disturbed_runs: u64,
    /// wrk connections used for closed-loop HTTP/1.1.
    pub wrk_connections: u32,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// Tool name → version line.
    pub versions: BTreeMap<String, String>,
    /// Targets measured, in run order.
    pub targets: Vec<String>,
    /// Targets skipped, with why.
    pub skipped: Vec<(String, String)>,
    /// Target → command line.
    pub commands: BTreeMap<String, String>,
    /// HTTP/1.1 closed loop (wrk), per target, one per round.
    pub h1: BTreeMap<String, Vec<Throughput>>,
    /// HTTP/1.1 closed loop at the other wrk connection counts: count → target → runs.
    #[serde(default)]
    pub h1_more: BTreeMap<String, BTreeMap<String, Vec<Throughput>>>,
    /// HTTP/2 closed loop (h2load), per target, one per round.
    pub h2: BTreeMap<String, Vec<Throughput>>,
    /// Open-loop latency at fixed rates.
    pub open: Vec<RateRuns>,
    /// Memory right after start, before any traffic.
    pub idle: BTreeMap<String, Memory>,
    /// Memory with 1,000 open client connections.
    pub conns_1000: BTreeMap<String, Memory>,
    /// Syscalls per HTTP/1.1 request.
    pub syscalls: BTreeMap<String, Syscalls>,
    /// Criterion hot-path benchmarks.
    pub micro: Vec<MicroBench>,
    /// Criterion results of the previous report, for the regression note.
    pub micro_previous: Vec<MicroBench>,
    /// serin's flat CPU profile under closed-loop HTTP/1.1 load (perf report lines).
    pub profile: Vec<String>,
    /// The judge-quality simulator.
    #[serde(default)]
    pub judge_sim: Vec<crate::judge_sim::SimResult>,
    /// Judge simulator settings: (healthy rollouts, bad rollouts, rollout s, look interval ms).
    #[serde(default)]
    pub judge_sim_settings: (u64, u64, u64, u64),
    /// Revert latency and blast radius.
    #[serde(default)]
    pub revert: Vec<crate::revert::RevertResult>,
    /// Fleet mode: revert propagation and API requests (`serin-bench fleet`).
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetBench>,
    /// Problems met during the run (a failed run of one target, for example).
    pub notes: Vec<String>,
}

/// Median, min and max of a list (NaN-free); zeros when empty.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The median of a list.
pub fn median(values: &[f64]) -> f64 {
    spread(values).0
}
