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
    /// Syscalls per HTTP/2 (h2c) request.
    #[serde(default)]
    pub syscalls_h2: BTreeMap<String, Syscalls>,
    /// Criterion hot-path benchmarks.
    pub micro: Vec<MicroBench>,
    /// Criterion results of the previous report, for the regression note.
    pub micro_previous: Vec<MicroBench>,
    /// serin's flat CPU profile under closed-loop HTTP/1.1 load (perf report lines).
    pub profile: Vec<String>,
    /// The judge-quality simulator (`serin-bench judge-sim`). An older
    /// file's `judge_sim` and `judge_sim_settings` (one judge only) are
    /// ignored.
    #[serde(default)]
    pub judges: Option<crate::judge_sim::SimRun>,
    /// Revert latency and blast radius.
    #[serde(default)]
    pub revert: Vec<crate::revert::RevertResult>,
    /// Fleet mode: revert propagation and API requests (`serin-bench fleet`).
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetBench>,
    /// TLS origination: the `*-tls` targets (bench/src/tls.rs).
    #[serde(default)]
    pub tls: Option<TlsResults>,
    /// TLS termination: the `*-https` targets (bench/src/https.rs).
    #[serde(default)]
    pub https: Option<HttpsResults>,
    /// serin-shadow's copies in the closed-loop runs and in the open-loop
    /// slices, from its metrics.
    #[serde(default)]
    pub shadow_copies: Option<[ShadowCopies; 2]>,
    /// Problems met during the run (a failed run of one target, for example).
    pub notes: Vec<String>,
}

/// serin-shadow's `serin_shadow_requests_total` over one phase of the run: a
/// copy skipped because its bound was full did not cost what a sent one
/// does, and a latency measured without the copies says nothing of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowCopies {
    /// Copies sent to the canary.
    pub sent: u64,
    /// Copies skipped, for any reason.
    pub skipped: u64,
}

impl ShadowCopies {
    /// Reads the counters from a Prometheus text exposition; `None` when
    /// they are not in it.
    pub fn from_metrics(text: &str) -> Option<Self> {
        let mut copies = None::<Self>;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("serin_shadow_requests_total{result=\"") else {
                continue;
            };
            let Some((result, value)) = rest.split_once("\"}") else {
                continue;
            };
            let Ok(n) = value.trim().parse::<f64>() else {
                continue;
            };
            let c = copies.get_or_insert_with(Self::default);
            if result == "sent" {
                c.sent += n as u64;
            } else {
                c.skipped += n as u64;
            }
        }
        copies
    }

    /// The copies counted since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            sent: self.sent.saturating_sub(earlier.sent),
            skipped: self.skipped.saturating_sub(earlier.skipped),
        }
    }

    /// The share of copies skipped, in percent.
    pub fn skipped_percent(self) -> f64 {
        let all = self.sent + self.skipped;
        if all == 0 {
            0.0
        } else {
            100.0 * self.skipped as f64 / all as f64
        }
    }
}

/// The TLS-origination group: plain HTTP/1.1 from the client to each proxy,
/// TLS from the proxy to the TLS upstream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TlsResults {
    /// Targets measured (`direct-tls`, `nginx-tls`, …), in run order.
    pub targets: Vec<String>,
    /// Closed loop (wrk, the first connection count), upstream connections
    /// kept alive: per target, one per round.
    pub keepalive: BTreeMap<String, Vec<Throughput>>,
    /// Closed loop against the upstream ports that close every connection
    /// after its response, so every request is a new upstream handshake:
    /// per target, one per round.
    pub handshakes: BTreeMap<String, Vec<Throughput>>,
    /// What the upstream logged of those handshakes, per target, all rounds.
    pub sessions: BTreeMap<String, Sessions>,
    /// Open-loop latency at fixed rates, keep-alive (proxies only: the
    /// open-loop generator speaks plain HTTP).
    pub open: Vec<RateRuns>,
}

/// The TLS upstream's log of one target's new-handshake runs: one line per
/// request, each on a new connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    /// Handshakes logged.
    pub handshakes: u64,
    /// Of them, resumed sessions (`$ssl_session_reused` = `r`).
    pub resumed: u64,
    /// The most frequent protocol, cipher and key-exchange group, e.g.
    /// `TLSv1.3 TLS_AES_256_GCM_SHA384 X25519`.
    pub negotiated: String,
}

impl Sessions {
    /// Reads the upstream's `handshake` log lines
    /// (`$ssl_session_reused $ssl_protocol $ssl_cipher $ssl_curve`).
    pub fn parse(log: &str) -> Self {
        let mut out = Sessions::default();
        let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
        for line in log.lines() {
            let Some((reused, negotiated)) = line.trim().split_once(' ') else {
                continue;
            };
            out.handshakes += 1;
            if reused == "r" {
                out.resumed += 1;
            }
            *seen.entry(negotiated).or_default() += 1;
        }
        // The most frequent; the first in order on a tie.
        let mut best: Option<(&str, u64)> = None;
        for (line, n) in seen {
            if best.is_none_or(|(_, m)| n > m) {
                best = Some((line, n));
            }
        }
        out.negotiated = best.map(|(l, _)| l.to_owned()).unwrap_or_default();
        out
    }

    /// Adds another run's counts (the negotiated line of the larger one wins).
    pub fn add(&mut self, other: Sessions) {
        if other.handshakes > self.handshakes {
            self.negotiated = other.negotiated;
        }
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
    }

    /// Share of handshakes that resumed a session, percent.
    pub fn resumed_percent(&self) -> f64 {
        self.resumed as f64 * 100.0 / self.handshakes.max(1) as f64
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_count_resumptions_and_the_usual_negotiation() {
        let log = "r TLSv1.3 TLS_AES_256_GCM_SHA384 X25519\n\
                   . TLSv1.3 TLS_AES_256_GCM_SHA384 X25519\n\
                   r TLSv1.3 TLS_AES_256_GCM_SHA384 X25519\n\
                   r TLSv1.2 ECDHE-ECDSA-AES256-GCM-SHA384 prime256v1\n\
                   \n";
        let s = Sessions::parse(log);
        assert_eq!(s.handshakes, 4);
        assert_eq!(s.resumed, 3);
        assert_eq!(s.negotiated, "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519");
        assert_eq!(s.resumed_percent(), 75.0);
        assert_eq!(Sessions::parse(""), Sessions::default());
        assert_eq!(Sessions::default().resumed_percent(), 0.0);
    }

    #[test]
    fn the_committed_results_parse() {
        // Older files too: fields that are gone (the one-judge simulator's
        // `judge_sim`) are ignored, new ones default.
        let committed: Results =
            serde_json::from_str(include_str!("../results/latest.json")).unwrap();
        assert!(!committed.started.is_empty());
        let again = serde_json::to_string(&committed).unwrap();
        assert!(serde_json::from_str::<Results>(&again).is_ok());
    }

    #[test]
    fn sessions_add_up_over_rounds() {
        let mut all = Sessions::parse("r TLSv1.3 A X25519\n");
        all.add(Sessions::parse(". TLSv1.3 B X25519\n. TLSv1.3 B X25519\n"));
        assert_eq!((all.handshakes, all.resumed), (3, 1));
        assert_eq!(all.negotiated, "TLSv1.3 B X25519");
    }

    #[test]
    fn shadow_copies_are_read_from_serins_metrics() {
        let text = "# TYPE serin_shadow_requests_total counter\n\
                    serin_shadow_requests_total{result=\"sent\"} 1200\n\
                    serin_shadow_requests_total{result=\"skipped_busy\"} 30\n\
                    serin_shadow_requests_total{result=\"skipped_body\"} 2\n\
                    serin_shadow_ratio 1\n";
        assert_eq!(
            ShadowCopies::from_metrics(text),
            Some(ShadowCopies {
                sent: 1200,
                skipped: 32
            })
        );
        assert_eq!(ShadowCopies::from_metrics("serin_shadow_ratio 0\n"), None);
    }
}

/// The TLS-termination group (bench/src/https.rs): each `*-https` target
/// with each certificate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpsResults {
    /// Targets measured (`nginx-https`, …), in run order.
    pub targets: Vec<String>,
    /// Interleaved rounds (`serin-bench https` may run other than the rest).
    #[serde(default)]
    pub rounds: usize,
    /// One entry per certificate, ECDSA first.
    pub certs: Vec<CertResults>,
}

/// What the TLS-termination targets did with one certificate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CertResults {
    /// `ECDSA P-256` or `RSA 2048`.
    pub label: String,
    /// Closed loop over keep-alive HTTPS connections, HTTP/1.1 (wrk): per
    /// target, one per round.
    pub http1: BTreeMap<String, Vec<Throughput>>,
    /// The same over HTTP/2 (h2load, ALPN `h2`).
    pub http2: BTreeMap<String, Vec<Throughput>>,
    /// A new connection and full handshake for every request.
    pub full: BTreeMap<String, Vec<HandshakeRun>>,
    /// A new connection for every request, resuming a session.
    pub resumed: BTreeMap<String, Vec<HandshakeRun>>,
    /// Open-loop latency at fixed rates over keep-alive HTTPS/1.1 (measured
    /// with the first certificate only: a kept-alive connection's cost does
    /// not depend on the key that authenticated it).
    pub open: Vec<RateRuns>,
}

/// One run of the handshake generator against one target, with the
/// target's CPU charged per handshake.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HandshakeRun {
    /// What the generator saw.
    pub generator: crate::handshakes::HandshakeResult,
    /// The target's CPU per completed connection (handshake, one request
    /// and the close), µs.
    pub cpu_us: f64,
    /// Busy share of the proxy core, 0..1.
    pub proxy_core_busy: f64,
    /// Busy share of the load generator core, 0..1.
    pub loadgen_core_busy: f64,
}

impl HandshakeRun {
    /// Handshakes per second one core would do at this cost.
    pub fn per_core(&self) -> f64 {
        if self.cpu_us > 0.0 {
            1e6 / self.cpu_us
        } else {
            0.0
        }
    }
}
