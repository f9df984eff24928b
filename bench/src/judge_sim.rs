//! The judge-quality simulator: many simulated 30-minute rollouts, each
//! shown to four judges at once, to measure how often each reverts a
//! healthy canary by chance, how often it catches a bad one, and after how
//! many canary requests.
//!
//! The judges ([`SimJudge`]): serin's judge as the controller of issue #13
//! drives it ([`sequential`]), today's window judge as today's controller
//! drives it ([`window_judge`], the baseline), a Flagger-style interval
//! check ([`flagger`]) and a Kayenta-style Mann-Whitney analysis
//! ([`kayenta`]). Every judge of a rollout sees the same requests, in the
//! same order ([`traffic`]).
//!
//! A rollout lasts 30 minutes in 4 steps of 7.5 minutes. A tick every
//! 10 ms is a look when a request completed since the last look, or 1 s
//! after it (the controller's `judge_loop`); at each step start, after that
//! tick's look, every judge is re-armed, as the judge's step would re-arm
//! it. A revert ends the rollout for that judge.
//!
//! Two shortcuts keep the run short, and neither changes a number:
//! - A bad rollout is the healthy rollout of the same seed up to the onset
//!   ([`traffic`]), so whether a judge reverted before the onset is read
//!   from that twin, and a judge skips the looks that cannot change what
//!   it does after the onset ([`Memory`]). Its records still go on.
//! - A rollout stops once every judge has reverted.

mod flagger;
mod kayenta;
mod normal;
mod sequential;
pub mod traffic;
mod window_judge;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serin_proxy::Target;
use tokio::time::Instant;

use traffic::{Change, LatencyModel, Request, Spec, Traffic};

/// Length of a rollout, seconds.
pub const ROLLOUT_SECS: f64 = 1800.0;

/// Steps of a rollout; a re-arm at the start of each.
pub const STEPS: u32 = 4;

/// Length of a step, seconds.
pub const STEP_SECS: f64 = ROLLOUT_SECS / STEPS as f64;

/// The controller's look interval, ms.
pub const LOOK_MS: u64 = 10;

/// Looks happen at least this often, even without new requests, in ticks.
const IDLE_TICKS: u64 = 1_000 / LOOK_MS;

/// Ticks in a step.
const STEP_TICKS: u64 = (STEP_SECS as u64) * 1_000 / LOOK_MS;

/// Ticks in a rollout.
const ROLLOUT_TICKS: u64 = STEP_TICKS * STEPS as u64;

/// Every regression gets at least this long, seconds: a rollout whose
/// onset comes later than this before its end runs its last step on until
/// then. Without it, a random onset in the last minute or two could be
/// caught by no judge, and the share detected would measure when onsets
/// fall as much as the judges.
pub const MIN_SECS_AFTER_ONSET: f64 = 600.0;

/// The judges compared, in the order of [`judges`] and of the report.
pub const JUDGES: [&str; 4] = ["new", "today", "flagger", "kayenta"];

// === SimJudge ===

/// An instant of a simulated rollout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Moment {
    /// Seconds since the rollout started.
    pub secs: f64,
    /// The same instant on the clock the data plane's windows use.
    pub instant: Instant,
}

impl Moment {
    /// The instant `secs` after `base`.
    pub fn at(base: Instant, secs: f64) -> Self {
        Self {
            secs,
            instant: base + Duration::from_secs_f64(secs),
        }
    }
}

/// How far back what a judge decides at a look depends on its looks; it
/// depends on every request since the rollout's start regardless (each
/// judge records all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// A look's verdict depends on the recorded requests only: no earlier
    /// look matters.
    Window,
    /// A look's verdict depends on the looks since the last re-arm.
    SinceArm,
    /// On everything since the rollout's start.
    WholeRollout,
}

impl Memory {
    /// Whether a judge with this memory must look at the tick at `secs`
    /// to decide as it would have after `onset`, in a rollout that is the
    /// same as its healthy twin up to `onset`.
    fn must_look(self, secs: f64, onset: f64) -> bool {
        match self {
            Memory::Window => secs >= onset,
            // After the re-arm at the start of the onset's step (the first
            // step has none: its judge is new).
            Memory::SinceArm => secs > (onset / STEP_SECS).floor() * STEP_SECS,
            Memory::WholeRollout => true,
        }
    }
}

/// One judge, as the simulator drives it. Every judge of a rollout is
/// given every request, and the same looks and re-arms.
pub trait SimJudge {
    /// The judge's name in the report (one of [`JUDGES`]).
    fn name(&self) -> &'static str;
    /// Which looks it can skip ([`Memory`]).
    fn memory(&self) -> Memory;
    /// One request that completed, in time order.
    fn record(&mut self, request: &Request);
    /// A re-arm at a step start.
    fn rearm(&mut self, at: Moment);
    /// One look: the reason to revert, if the judge reverts.
    fn look(&mut self, at: Moment) -> Option<String>;
}

/// The data plane's stats as a judge over [`serin_proxy::Stats`] is fed:
/// every request recorded, and the canary's run of errors in a row counted
/// only since the last arm, as the controller counts it (its
/// `runs_counted_from`).
pub struct Recorded {
    /// The real stats, one worker.
    pub stats: serin_proxy::Stats,
    /// Canary requests recorded so far.
    canary_total: u64,
    /// The canary total at the last arm.
    armed_at: u64,
}

impl Recorded {
    /// Empty stats with a rolling `window`, whose clock starts at `start`.
    pub fn new(window: Duration, start: Moment) -> Self {
        Self {
            stats: serin_proxy::Stats::new(1, window, start.instant),
            canary_total: 0,
            armed_at: 0,
        }
    }

    /// One request that completed.
    pub fn record(&mut self, r: &Request) {
        self.stats
            .worker(0)
            .upstream(r.target)
            .record(r.at.instant, r.latency, r.error);
        if r.target == Target::Canary {
            self.canary_total += 1;
        }
    }

    /// A re-arm: runs of canary errors count from here.
    pub fn rearm(&mut self) {
        self.armed_at = self.canary_total;
    }

    /// The canary's run of errors in a row since the last arm.
    pub fn canary_run(&self) -> u32 {
        let since_arm = self.canary_total - self.armed_at;
        u64::from(self.stats.consecutive_errors(Target::Canary)).min(since_arm) as u32
    }
}

/// A fresh set of the judges, in the order of [`JUDGES`].
fn judges(start: Moment) -> Vec<Box<dyn SimJudge>> {
    vec![
        Box::new(sequential::Sequential::new(start)),
        Box::new(window_judge::Today::new(start)),
        Box::new(flagger::Flagger::default()),
        Box::new(kayenta::Kayenta::default()),
    ]
}

// === impl Condition ===

/// What happens to the canary in a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Identical to stable throughout: every revert is false.
    Healthy,
    /// `effect` percentage points of errors added to the canary.
    Errors,
    /// Every canary latency multiplied by `effect`.
    Latency,
    /// A shared dependency: both upstreams get `effect` pp more errors.
    SharedErrors,
    /// A shared dependency: both upstreams' latencies multiplied by `effect`.
    SharedLatency,
}

/// When the change starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Onset {
    /// No change (healthy).
    Never,
    /// Uniform over the rollout.
    Random,
    /// At the start of a step, each step alike (a build bad from its first
    /// request at that step).
    StepStart,
    /// At the start of the second step, a re-arm.
    AtRearm,
    /// In the middle of the second step.
    MidStep,
}

/// One kind of rollout to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Canary requests per second (stable gets 9 times as many).
    pub canary_rps: f64,
    /// Both upstreams' error rate while healthy, as a ratio.
    pub stable_errors: f64,
    /// Both upstreams' latency while healthy.
    pub latency: LatencyModel,
    /// What changes.
    pub kind: Kind,
    /// How much: percentage points of errors, or a latency factor.
    pub effect: f64,
    /// When.
    pub onset: Onset,
}

impl Condition {
    fn healthy(canary_rps: f64, stable_errors: f64, latency: LatencyModel) -> Self {
        Self {
            canary_rps,
            stable_errors,
            latency,
            kind: Kind::Healthy,
            effect: 0.0,
            onset: Onset::Never,
        }
    }

    /// The healthy condition of the same traffic.
    pub fn twin(&self) -> Self {
        Self::healthy(self.canary_rps, self.stable_errors, self.latency)
    }

    /// Whether any revert in it is false.
    pub fn healthy_canary(&self) -> bool {
        matches!(
            self.kind,
            Kind::Healthy | Kind::SharedErrors | Kind::SharedLatency
        )
    }

    /// The change, e.g. `+2 pp errors`, `1.5× latency`, `both ×10 latency`.
    pub fn effect_label(&self) -> String {
        match self.kind {
            Kind::Healthy => "healthy".into(),
            Kind::Errors => format!("+{} pp errors", self.effect),
            Kind::Latency => format!("{}× latency", self.effect),
            Kind::SharedErrors => format!("both +{} pp errors", self.effect),
            Kind::SharedLatency => format!("both ×{} latency", self.effect),
        }
    }

    /// When, in words.
    pub fn onset_label(&self) -> &'static str {
        match self.onset {
            Onset::Never => "",
            Onset::Random => "random onset",
            Onset::StepStart => "onset at a step start",
            Onset::AtRearm => "at a re-arm",
            Onset::MidStep => "mid-step",
        }
    }

    /// Traffic, change and onset, as the progress lines print them.
    pub fn description(&self) -> String {
        format!(
            "{}, {} {}",
            self.traffic_label(),
            self.effect_label(),
            self.onset_label()
        )
    }

    /// The traffic, e.g. `100 req/s, stable 1% errors, log-normal`.
    pub fn traffic_label(&self) -> String {
        format!(
            "{} req/s, stable {}% errors, {}",
            self.canary_rps,
            self.stable_errors * 100.0,
            self.latency.label()
        )
    }

    /// The onset of rollout `seed`, seconds (0 when nothing changes: a
    /// healthy canary is judged from the start).
    fn onset_secs(&self, seed: u64) -> f64 {
        let u = (traffic::mix(seed, 3) >> 11) as f64 / (1u64 << 53) as f64;
        match self.onset {
            Onset::Never => 0.0,
            Onset::Random => u * ROLLOUT_SECS,
            Onset::StepStart => (u * f64::from(STEPS)).floor() * STEP_SECS,
            Onset::AtRearm => STEP_SECS,
            Onset::MidStep => 1.5 * STEP_SECS,
        }
    }

    /// The traffic of rollout `seed`.
    fn spec(&self, seed: u64) -> Spec {
        let at = self.onset_secs(seed);
        let change = match self.kind {
            Kind::Healthy => Change::NONE,
            Kind::Errors | Kind::SharedErrors => Change {
                at,
                extra_error: self.effect / 100.0,
                latency_factor: 1.0,
                shared: self.kind == Kind::SharedErrors,
            },
            Kind::Latency | Kind::SharedLatency => Change {
                at,
                extra_error: 0.0,
                latency_factor: self.effect,
                shared: self.kind == Kind::SharedLatency,
            },
        };
        Spec {
            canary_rps: self.canary_rps,
            error_rate: self.stable_errors,
            latency: self.latency,
            change,
        }
    }

    /// The seed of rollout `i`: the same for every condition of the same
    /// traffic, so a bad rollout and its healthy twin share it.
    fn seed(&self, i: u64) -> u64 {
        let traffic = (self.canary_rps as u64) << 32
            | ((self.stable_errors * 1e4).round() as u64) << 8
            | self.latency as u64;
        traffic::mix(traffic, i)
    }
}

/// Every condition, each healthy one before the bad ones of its traffic.
pub fn conditions() -> Vec<Condition> {
    let rates = [10.0, 100.0];
    let errors = [0.0, 0.01, 0.05];
    let onsets = [Onset::Random, Onset::StepStart];
    let mut out = Vec::new();
    for rps in rates {
        for e in errors {
            for latency in LatencyModel::ALL {
                out.push(Condition::healthy(rps, e, latency));
            }
        }
    }
    let with = |base: Condition, kind, effect, onset| Condition {
        kind,
        effect,
        onset,
        ..base
    };
    for rps in rates {
        for e in errors {
            for onset in onsets {
                for pp in [1.0, 2.0, 5.0, 20.0] {
                    let base = Condition::healthy(rps, e, LatencyModel::LogNormal);
                    out.push(with(base, Kind::Errors, pp, onset));
                }
            }
        }
        for latency in LatencyModel::ALL {
            for onset in onsets {
                for factor in [1.2, 1.5, 2.0] {
                    let base = Condition::healthy(rps, 0.01, latency);
                    out.push(with(base, Kind::Latency, factor, onset));
                }
            }
        }
        for onset in [Onset::AtRearm, Onset::MidStep] {
            let base = Condition::healthy(rps, 0.01, LatencyModel::LogNormal);
            out.push(with(base, Kind::SharedLatency, 10.0, onset));
            out.push(with(base, Kind::SharedErrors, 5.0, onset));
        }
    }
    out
}

// === one rollout ===

/// A judge's revert.
#[derive(Clone, Debug)]
struct Revert {
    /// Seconds since the rollout's start.
    secs: f64,
    /// Canary requests completed by then.
    canary: u64,
    reason: String,
}

/// What one rollout gave.
#[derive(Clone, Debug)]
struct Rollout {
    onset: f64,
    /// Canary requests completed before the onset.
    canary_before_onset: u64,
    /// Per judge, in the order of [`JUDGES`].
    reverts: Vec<Option<Revert>>,
    /// Per judge: looks made, and the time they took.
    looks: Vec<(u64, Duration)>,
}

/// Runs rollout `seed` of `cond` through every judge.
fn rollout(cond: &Condition, seed: u64) -> Rollout {
    let base = Instant::now();
    let onset = cond.onset_secs(seed);
    let mut traffic = Traffic::new(&cond.spec(seed), seed, base);
    let mut judges = judges(Moment::at(base, 0.0));
    let mut reverts: Vec<Option<Revert>> = vec![None; judges.len()];
    let mut looks = vec![(0u64, Duration::ZERO); judges.len()];
    let mut canary = 0u64;
    let mut canary_before_onset = 0u64;
    let mut seen = 0u64;
    let mut last_look: Option<(u64, u64)> = None;
    let last_tick = match cond.kind {
        Kind::Healthy => ROLLOUT_TICKS,
        _ => ROLLOUT_TICKS.max(((onset + MIN_SECS_AFTER_ONSET) * 1_000.0) as u64 / LOOK_MS),
    };
    for tick in 1..=last_tick {
        let now = Moment::at(base, (tick * LOOK_MS) as f64 / 1_000.0);
        while let Some(r) = traffic.next_until(now.secs) {
            seen += 1;
            if r.target == Target::Canary {
                canary += 1;
                if r.at.secs < onset {
                    canary_before_onset += 1;
                }
            }
            for (j, _) in judges.iter_mut().zip(&reverts).filter(|(_, r)| r.is_none()) {
                j.record(&r);
            }
        }
        let look = match last_look {
            Some((count, at)) => count != seen || tick - at >= IDLE_TICKS,
            None => true,
        };
        if look {
            last_look = Some((seen, tick));
            for ((j, revert), cost) in judges.iter_mut().zip(&mut reverts).zip(&mut looks) {
                if revert.is_some() || !j.memory().must_look(now.secs, onset) {
                    continue;
                }
                let started = std::time::Instant::now();
                let verdict = j.look(now);
                *cost = (cost.0 + 1, cost.1 + started.elapsed());
                if let Some(reason) = verdict {
                    *revert = Some(Revert {
                        secs: now.secs,
                        canary,
                        reason,
                    });
                }
            }
            if reverts.iter().all(Option::is_some) {
                break;
            }
        }
        if tick % STEP_TICKS == 0 && tick < ROLLOUT_TICKS {
            for (j, _) in judges.iter_mut().zip(&reverts).filter(|(_, r)| r.is_none()) {
                j.rearm(now);
            }
        }
    }
    Rollout {
        onset,
        canary_before_onset,
        reverts,
        looks,
    }
}

// === results ===

/// One judge's figures over the rollouts of one condition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JudgeResult {
    /// The judge (one of [`JUDGES`]).
    pub judge: String,
    /// Rollouts it reverted before the onset (a false revert, the same as
    /// in the healthy twin).
    pub before_onset: u64,
    /// Rollouts it reverted at or after the onset (healthy: any time).
    pub reverted: u64,
    /// Over the rollouts not reverted before the onset: the median canary
    /// requests from the onset to the revert, a rollout never reverted
    /// counting as infinitely many (`None`: more than half never were).
    pub median_requests: Option<f64>,
    /// The same, 90th percentile.
    pub p90_requests: Option<f64>,
    /// The same, seconds from the onset to the revert, median.
    pub median_seconds: Option<f64>,
    /// Its reasons, grouped by their words before the first number, most
    /// frequent first, with their counts.
    pub reasons: Vec<(String, u64)>,
    /// One full reason.
    pub example_reason: String,
    /// Looks it made, over all the rollouts.
    #[serde(default)]
    pub looks: u64,
    /// The time they took, seconds (wall clock, on a machine that may be
    /// busy with other work).
    #[serde(default)]
    pub look_seconds: f64,
}

impl JudgeResult {
    /// Rollouts in which it reverted, before or after the onset.
    pub fn any_revert(&self) -> u64 {
        self.before_onset + self.reverted
    }
}

/// What the rollouts of one condition gave.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimResult {
    /// The condition.
    pub condition: Condition,
    /// Rollouts simulated.
    pub rollouts: u64,
    /// Per judge, in the order of [`JUDGES`].
    pub judges: Vec<JudgeResult>,
}

/// One run of the simulator.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimRun {
    /// When the run started (UTC).
    pub started: String,
    /// serin's git commit (with `-dirty` when proxy/ or control/ had changes).
    pub commit: String,
    /// `--quick`.
    pub quick: bool,
    /// Rollouts per healthy condition.
    pub healthy_rollouts: u64,
    /// Rollouts per other condition.
    pub bad_rollouts: u64,
    /// Threads the rollouts ran on.
    pub threads: usize,
    /// Wall time, seconds.
    pub wall_seconds: f64,
    /// Every condition.
    pub results: Vec<SimResult>,
}

/// Simulation settings.
#[derive(Clone, Debug)]
pub struct SimSettings {
    /// `--quick`.
    pub quick: bool,
    /// Rollouts per healthy condition.
    pub healthy_rollouts: u64,
    /// Rollouts per other condition (at most `healthy_rollouts`: a bad
    /// rollout's healthy twin must exist).
    pub bad_rollouts: u64,
    /// Simulate only the conditions whose description contains one of
    /// these (and their healthy twins); all when empty.
    pub only: Vec<String>,
}

impl SimSettings {
    /// The settings of the full report (`quick`: fewer rollouts).
    pub fn new(quick: bool) -> Self {
        Self {
            quick,
            healthy_rollouts: if quick { 20 } else { 200 },
            bad_rollouts: if quick { 8 } else { 50 },
            only: Vec::new(),
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let v = *sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize)?;
    v.is_finite().then_some(v)
}

/// Groups reasons by the words before their first number.
fn reason_kinds<'a>(reasons: impl Iterator<Item = &'a str>) -> Vec<(String, u64)> {
    let mut kinds: Vec<(String, u64)> = Vec::new();
    for r in reasons {
        let key: String = r
            .split_whitespace()
            .take_while(|w| !w.starts_with(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join(" ");
        let key = if key.is_empty() {
            r.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        } else {
            key
        };
        match kinds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => kinds.push((key, 1)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds
}

/// One judge's figures: its reverts in `runs`, and whether its healthy
/// twin (`twins`, the same seeds; none for a healthy condition) had
/// reverted before each onset.
fn judge_result(j: usize, runs: &[Rollout], twins: Option<&[Rollout]>) -> JudgeResult {
    let mut out = JudgeResult {
        judge: JUDGES[j].into(),
        ..JudgeResult::default()
    };
    let mut requests = Vec::new();
    let mut seconds = Vec::new();
    let mut reasons = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        out.looks += run.looks[j].0;
        out.look_seconds += run.looks[j].1.as_secs_f64();
        let twin = twins.and_then(|t| t[i].reverts[j].as_ref());
        let own = run.reverts[j].as_ref();
        match (twin, own) {
            (Some(t), _) if t.secs < run.onset => out.before_onset += 1,
            (_, Some(r)) if r.secs < run.onset => out.before_onset += 1,
            (_, Some(r)) => {
                out.reverted += 1;
                requests.push((r.canary - run.canary_before_onset) as f64);
                seconds.push(r.secs - run.onset);
                reasons.push(r.reason.as_str());
            }
            (_, None) => {
                requests.push(f64::INFINITY);
                seconds.push(f64::INFINITY);
            }
        }
    }
    requests.sort_by(f64::total_cmp);
    seconds.sort_by(f64::total_cmp);
    out.median_requests = percentile(&requests, 0.5);
    out.p90_requests = percentile(&requests, 0.9);
    out.median_seconds = percentile(&seconds, 0.5);
    out.example_reason = reasons.first().map(|r| r.to_string()).unwrap_or_default();
    out.reasons = reason_kinds(reasons.into_iter());
    out
}

/// Simulates every condition on all cores, printing one line per condition
/// to stderr as it completes.
pub fn run(settings: &SimSettings) -> SimRun {
    assert!(settings.bad_rollouts <= settings.healthy_rollouts);
    let t0 = std::time::Instant::now();
    let conds = selected(conditions(), &settings.only);
    let rollouts = |cond: &Condition| {
        if cond.kind == Kind::Healthy {
            settings.healthy_rollouts
        } else {
            settings.bad_rollouts
        }
    };
    let jobs: Vec<(usize, u64)> = conds
        .iter()
        .enumerate()
        .flat_map(|(c, cond)| (0..rollouts(cond)).map(move |i| (c, i)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut runs: Vec<Vec<Option<Rollout>>> = conds
        .iter()
        .map(|c| vec![None; rollouts(c) as usize])
        .collect();
    let mut results = Vec::new();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, jobs, conds) = (&next, &jobs, &conds);
            s.spawn(move || {
                while let Some(&(c, i)) = jobs.get(next.fetch_add(1, Relaxed)) {
                    let cond = &conds[c];
                    if tx.send((c, i, rollout(cond, cond.seed(i)))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // Conditions complete in order (healthy twins first): report each
        // as soon as it and everything before it are in.
        for (c, i, run) in rx {
            runs[c][i as usize] = Some(run);
            while results.len() < conds.len() && runs[results.len()].iter().all(Option::is_some) {
                let k = results.len();
                let result = condition_result(&conds, &runs, k);
                progress(&result, t0.elapsed());
                results.push(result);
            }
        }
    });
    SimRun {
        started: String::new(),
        commit: String::new(),
        quick: settings.quick,
        healthy_rollouts: settings.healthy_rollouts,
        bad_rollouts: settings.bad_rollouts,
        threads,
        wall_seconds: t0.elapsed().as_secs_f64(),
        results,
    }
}

/// The conditions described (see [`progress`]) by a text containing one of
/// `only`, with their healthy twins; all of them when `only` is empty.
fn selected(all: Vec<Condition>, only: &[String]) -> Vec<Condition> {
    if only.is_empty() {
        return all;
    }
    let chosen: Vec<Condition> = all
        .iter()
        .filter(|c| only.iter().any(|o| c.description().contains(o.as_str())))
        .copied()
        .collect();
    all.into_iter()
        .filter(|c| chosen.iter().any(|k| k == c || k.twin() == *c))
        .collect()
}

/// The figures of condition `k`, from its runs and its twin's.
fn condition_result(conds: &[Condition], runs: &[Vec<Option<Rollout>>], k: usize) -> SimResult {
    let cond = conds[k];
    let own: Vec<Rollout> = runs[k].iter().flatten().cloned().collect();
    let twins: Option<Vec<Rollout>> = (cond.kind != Kind::Healthy).then(|| {
        let t = conds
            .iter()
            .position(|c| *c == cond.twin())
            .expect("every traffic has a healthy condition");
        runs[t].iter().flatten().cloned().collect()
    });
    SimResult {
        condition: cond,
        rollouts: own.len() as u64,
        judges: (0..JUDGES.len())
            .map(|j| judge_result(j, &own, twins.as_deref()))
            .collect(),
    }
}

fn progress(r: &SimResult, elapsed: Duration) {
    let c = &r.condition;
    let judges: Vec<String> = r
        .judges
        .iter()
        .map(|j| {
            let median = j
                .median_requests
                .map_or("never".into(), |m| format!("{m:.0}"));
            let before = match j.before_onset {
                0 => String::new(),
                n => format!(" (+{n} before)"),
            };
            format!(
                "{} {}/{}{before} med {median}",
                j.judge, j.reverted, r.rollouts
            )
        })
        .collect();
    eprintln!(
        "judge sim [{:>4.0} s] {}: {}",
        elapsed.as_secs_f64(),
        c.description(),
        judges.join(" · ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_conditions_share_their_healthy_twins_seeds() {
        let conds = conditions();
        for c in &conds {
            let twin = conds.iter().position(|t| *t == c.twin()).unwrap();
            assert!(twin <= conds.iter().position(|x| x == c).unwrap());
            assert_eq!(c.seed(3), c.twin().seed(3));
        }
        let healthy = conds.iter().filter(|c| c.kind == Kind::Healthy).count();
        assert_eq!(healthy, 12);
        // Onsets at a step start fall on one.
        let c = conds.iter().find(|c| c.onset == Onset::StepStart).unwrap();
        for i in 0..20 {
            let at = c.onset_secs(c.seed(i));
            assert_eq!(at % STEP_SECS, 0.0);
            assert!(at < ROLLOUT_SECS);
        }
    }

    #[test]
    fn a_look_is_needed_only_where_the_judge_remembers_it() {
        assert!(!Memory::Window.must_look(99.0, 100.0));
        assert!(Memory::Window.must_look(100.0, 100.0));
        // The onset's step starts at 450 s.
        assert!(!Memory::SinceArm.must_look(450.0, 500.0));
        assert!(Memory::SinceArm.must_look(450.01, 500.0));
        assert!(Memory::SinceArm.must_look(0.01, 0.0));
        assert!(Memory::WholeRollout.must_look(0.01, 1000.0));
    }

    #[test]
    fn a_revert_before_the_onset_is_read_from_the_twin() {
        let revert = |secs: f64, canary| {
            Some(Revert {
                secs,
                canary,
                reason: "canary error rate 9% > 5%".into(),
            })
        };
        let run = |onset, reverts: Vec<Option<Revert>>| Rollout {
            onset,
            canary_before_onset: 100,
            reverts,
            looks: vec![(2, Duration::from_micros(3))],
        };
        let twins = [
            run(0.0, vec![revert(50.0, 50)]),
            run(0.0, vec![None]),
            run(0.0, vec![None]),
        ];
        let runs = [
            // The twin reverted at 50 s, before this onset: a false revert.
            run(60.0, vec![revert(61.0, 110)]),
            run(60.0, vec![revert(70.0, 130)]),
            run(60.0, vec![None]),
        ];
        let r = judge_result(0, &runs, Some(&twins));
        assert_eq!((r.before_onset, r.reverted), (1, 1));
        assert_eq!(r.looks, 6);
        // Of two rollouts, one reverted after 30 canary requests, one never.
        assert_eq!(r.median_requests, None);
        assert_eq!(r.reasons, vec![("canary error rate".to_string(), 1)]);
        let r = judge_result(0, &runs[1..2], None);
        assert_eq!(
            (r.median_requests, r.median_seconds),
            (Some(30.0), Some(10.0))
        );
    }
}
