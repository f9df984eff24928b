//! Outcome statistics for each upstream: a rolling window for the judge and
//! cumulative totals for Prometheus.
//!
//! Every worker owns one [`WorkerStats`] and is its only writer. Recording is a
//! handful of relaxed atomic loads and stores into fixed-size arrays (no
//! read-modify-write is needed with a single writer): it never locks, never
//! allocates and never waits on a reader. Only the worker thread may record. Readers (the judge, `/status`,
//! `/metrics`) merge all workers' data into owned snapshots on their own thread.
//!
//! The shadow's figures ([`ShadowStats`]: copies sent and skipped, and how
//! often the canary's status class differed from stable's) are kept the same
//! way, per worker.
//!
//! Windows are rings of [`SLICES`] time slices. Time is always passed in as an
//! argument (`now`), so the window logic is tested with a paused tokio clock.
//!
//! The judge also reads the outcomes that completed since its previous look
//! ([`Stats::new_outcomes`] with an [`OutcomeCursor`]): the newest two slices,
//! less what the cursor saw of them last time. The data plane records
//! nothing extra for it.

use crate::access_log::AccessLogCounters;
use crate::otlp::ExportCounters;
use crate::tls::TlsReloadCounters;
use crate::upstream::EndpointSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::limit::RateLimiter;
use crate::split::Target;

/// Number of time slices in a rolling window. A window of 10 s moves in steps
/// of 1 s; a slice older than the window is ignored by readers and reset by
/// the writer before reuse.
pub const SLICES: usize = 10;

/// Sub-bucket resolution of the latency histogram: 2^5 = 32 buckets per power
/// of two, so any recorded value is within ~3% of the reported one.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Largest latency recorded exactly, in µs (2^32 µs ≈ 71 minutes); larger ones
/// are clamped into the last bucket.
const MAX_MICROS: u64 = (1 << 32) - 1;
/// Number of histogram buckets: 32 exact ones, then 32 per power of two up to 2^32.
pub const LATENCY_BUCKETS: usize = SUB + (32 - SUB_BITS as usize) * SUB;

/// Upper bounds (seconds) of the cumulative Prometheus duration histogram.
pub const DURATION_BOUNDS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const DURATION_BOUNDS_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Adds one to a counter that only this thread writes: a plain load and
/// store, cheaper than an atomic read-modify-write.
#[inline]
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

/// Maps a latency in µs to its histogram bucket.
#[inline]
fn bucket_of(micros: u64) -> usize {
    let v = micros.min(MAX_MICROS);
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let mantissa = (v >> shift) as usize - SUB;
    SUB + shift as usize * SUB + mantissa
}

/// The range `[low, high]` of latencies (µs) that fall in bucket `index`.
fn bucket_range(index: usize) -> (u64, u64) {
    if index < SUB {
        return (index as u64, index as u64);
    }
    let shift = ((index - SUB) / SUB) as u32;
    let mantissa = ((index - SUB) % SUB + SUB) as u64;
    let low = mantissa << shift;
    (low, low + (1u64 << shift) - 1)
}

// === impl Slice ===

/// One time slice of a window: counts and a latency histogram.
///
/// The histogram has 896 buckets, but a slice's latencies usually fall in a
/// few dozen of them. The slice keeps the lowest and highest bucket it has
/// touched, so the judge's merge (every tick, for every slice) and the
/// writer's reset read and clear only that range.
struct Slice {
    /// Which period this slice currently holds, plus one (0 = never used).
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Box<[AtomicU64]>,
    /// Lowest bucket index touched since the last reset (`u32::MAX`: none).
    lowest: AtomicU32,
    /// Highest bucket index touched since the last reset.
    highest: AtomicU32,
}

impl Slice {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            lowest: AtomicU32::new(u32::MAX),
            highest: AtomicU32::new(0),
        }
    }

    /// The index of the first bucket that may hold a count, and the buckets
    /// from there to the last one that may; empty when none were touched.
    fn touched(&self) -> (usize, &[AtomicU64]) {
        let low = self.lowest.load(Relaxed) as usize;
        let high = self.highest.load(Relaxed) as usize;
        if low > high {
            return (0, &[]);
        }
        (low, &self.latency[low..=high.min(LATENCY_BUCKETS - 1)])
    }

    /// Counts one latency into its bucket and widens the touched range.
    #[inline]
    fn record_latency(&self, bucket: usize) {
        bump(&self.latency[bucket]);
        let index = bucket as u32;
        if index < self.lowest.load(Relaxed) {
            self.lowest.store(index, Relaxed);
        }
        if index > self.highest.load(Relaxed) {
            self.highest.store(index, Relaxed);
        }
    }

    /// Clears the slice for a new period. Only the writer calls this; a reader
    /// that races with it sees a slice that is briefly partly cleared, which
    /// costs at most one slice's worth of accuracy for one read.
    fn reset(&self, epoch: u64) {
        self.requests.store(0, Relaxed);
        self.errors.store(0, Relaxed);
        for b in self.touched().1 {
            b.store(0, Relaxed);
        }
        self.lowest.store(u32::MAX, Relaxed);
        self.highest.store(0, Relaxed);
        self.epoch.store(epoch, Relaxed);
    }
}

// === impl Window ===

/// A rolling window of request outcomes for one upstream on one worker.
pub struct Window {
    base: Instant,
    slice_micros: u64,
    slices: Box<[Slice]>,
    /// Slices with an epoch below this are ignored: set by [`Window::restart`].
    floor: AtomicU64,
}

impl Window {
    /// A window of length `window` (split into [`SLICES`] slices), whose clock
    /// starts at `base`.
    pub fn new(window: Duration, base: Instant) -> Self {
        let slice_micros = (window.as_micros() as u64 / SLICES as u64).max(1);
        Self {
            base,
            slice_micros,
            slices: (0..SLICES).map(|_| Slice::new()).collect(),
            floor: AtomicU64::new(0),
        }
    }

    /// Forgets everything recorded up to `now`: readers see only outcomes
    /// from the next slice on (at most one slice, 1/10 of the window, later).
    /// The writer is not involved, so this never races with recording.
    pub fn restart(&self, now: Instant) {
        self.floor.store(self.period(now) + 2, Relaxed);
    }

    fn period(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_micros() as u64 / self.slice_micros
    }

    /// Records one outcome that completed at `now`.
    #[inline]
    pub fn record(&self, now: Instant, latency: Duration, error: bool) {
        let period = self.period(now);
        let slice = &self.slices[(period % SLICES as u64) as usize];
        let epoch = period + 1;
        if slice.epoch.load(Relaxed) != epoch {
            slice.reset(epoch);
        }
        bump(&slice.requests);
        if error {
            bump(&slice.errors);
        }
        let micros = latency.as_micros().min(u128::from(MAX_MICROS)) as u64;
        slice.record_latency(bucket_of(micros));
    }

    /// Adds this window's slices that are still inside the window at `now`
    /// into `into`.
    pub fn add_to(&self, now: Instant, into: &mut WindowSnapshot) {
        let current = self.period(now) + 1;
        let oldest = current
            .saturating_sub(SLICES as u64 - 1)
            .max(self.floor.load(Relaxed));
        for slice in self.slices.iter() {
            let epoch = slice.epoch.load(Relaxed);
            if epoch < oldest || epoch > current || epoch == 0 {
                continue;
            }
            into.requests += slice.requests.load(Relaxed);
            into.errors += slice.errors.load(Relaxed);
            let (first, buckets) = slice.touched();
            for (sum, b) in into.latency[first..].iter_mut().zip(buckets) {
                *sum += b.load(Relaxed);
            }
        }
    }

    /// Adds what the slice of period `epoch` (as [`Window::period`] + 1)
    /// holds into `into`, if the slice still holds that period.
    fn add_slice(&self, epoch: u64, into: &mut WindowSnapshot) {
        let slice = &self.slices[((epoch - 1) % SLICES as u64) as usize];
        if slice.epoch.load(Relaxed) != epoch {
            return;
        }
        // The writer counts a request, then its error, then its latency:
        // reading in the reverse order never sees more errors or latencies
        // than requests (on x86; the judge clamps anyway).
        let (first, buckets) = slice.touched();
        for (sum, b) in into.latency[first..].iter_mut().zip(buckets) {
            *sum += b.load(Relaxed);
        }
        into.errors += slice.errors.load(Relaxed);
        into.requests += slice.requests.load(Relaxed);
    }

    /// A snapshot of this window alone.
    pub fn snapshot(&self, now: Instant) -> WindowSnapshot {
        let mut snap = WindowSnapshot::default();
        self.add_to(now, &mut snap);
        snap
    }
}

// === impl WindowSnapshot ===

/// An owned, merged copy of a window: what the judge and `/status` read.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowSnapshot {
    /// Requests that completed in the window.
    pub requests: u64,
    /// Of those, how many were classified as errors.
    pub errors: u64,
    latency: Vec<u64>,
}

impl Default for WindowSnapshot {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            latency: vec![0; LATENCY_BUCKETS],
        }
    }
}

impl WindowSnapshot {
    /// Errors divided by requests; 0 when there were no requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The latency below which a fraction `q` (0..=1) of requests fell;
    /// zero when the window is empty. Accurate to about 3%.
    pub fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bucket_range(index);
                return Duration::from_micros(low + (high - low) / 2);
            }
        }
        Duration::from_micros(MAX_MICROS)
    }

    /// How many latencies were certainly above `limit`: those in buckets
    /// whose every value exceeds it (a bucket straddling it does not count).
    pub fn count_above(&self, limit: Duration) -> u64 {
        let micros = limit.as_micros().min(u128::from(MAX_MICROS)) as u64;
        let first = bucket_of(micros) + 1;
        self.latency
            .get(first..)
            .map_or(0, |rest| rest.iter().sum())
    }

    /// A copy with `minus` taken off every latency (down to 0) and the rest
    /// divided by `factor` (≥ 1), rounded down to a bucket: each bucket's
    /// lowest value picks its new bucket, so no latency ends up above
    /// `(latency − minus) / factor`.
    pub fn shrunk(&self, minus: Duration, factor: f64) -> WindowSnapshot {
        let minus = minus.as_micros().min(u128::from(MAX_MICROS)) as u64;
        let mut scaled = WindowSnapshot {
            requests: self.requests,
            errors: self.errors,
            ..WindowSnapshot::default()
        };
        for (bucket, count) in self.latency_buckets() {
            let low = bucket_range(bucket).0.saturating_sub(minus) as f64 / factor;
            scaled.latency[bucket_of(low as u64)] += count;
        }
        scaled
    }

    /// The non-empty latency buckets as `(bucket, count)`, for sending a
    /// window elsewhere to be merged exactly ([`WindowSnapshot::from_buckets`]).
    pub fn latency_buckets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.latency
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(bucket, count)| (bucket, *count))
    }

    /// Rebuilds a window from its counts and [`WindowSnapshot::latency_buckets`];
    /// buckets out of range are ignored.
    pub fn from_buckets(
        requests: u64,
        errors: u64,
        buckets: impl IntoIterator<Item = (usize, u64)>,
    ) -> Self {
        let mut snap = Self {
            requests,
            errors,
            ..Self::default()
        };
        for (bucket, count) in buckets {
            if let Some(slot) = snap.latency.get_mut(bucket) {
                *slot = slot.saturating_add(count);
            }
        }
        snap
    }

    /// A placeholder that holds no buffer (to swap a real one out).
    fn unallocated() -> Self {
        Self {
            requests: 0,
            errors: 0,
            latency: Vec::new(),
        }
    }

    /// Empties this snapshot, keeping its buffer.
    fn clear(&mut self) {
        self.requests = 0;
        self.errors = 0;
        self.latency.fill(0);
    }

    /// Adds what `now` holds beyond `before` (an earlier copy of the same
    /// counts) into this snapshot.
    fn add_growth(&mut self, now: &WindowSnapshot, before: &WindowSnapshot) {
        self.requests += now.requests.saturating_sub(before.requests);
        self.errors += now.errors.saturating_sub(before.errors);
        for ((sum, a), b) in self
            .latency
            .iter_mut()
            .zip(&now.latency)
            .zip(&before.latency)
        {
            *sum += a.saturating_sub(*b);
        }
    }

    /// Adds another snapshot's counts into this one.
    pub fn merge(&mut self, other: &WindowSnapshot) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a += b;
        }
    }
}

// === impl OutcomeCursor ===

/// What one reader of [`Stats::new_outcomes`] has already seen: its copies
/// of the two newest slices of one upstream. One per reader and upstream.
#[derive(Clone, Debug, Default)]
pub struct OutcomeCursor {
    /// `(epoch, counts)` of the previous slice and the current one, as of
    /// the last call.
    seen: [(u64, WindowSnapshot); 2],
    /// A buffer to read the next slice into, so a look allocates only what
    /// it returns.
    spare: WindowSnapshot,
}

// === impl UpstreamStats ===

/// Everything recorded about one upstream on one worker.
pub struct UpstreamStats {
    window: Window,
    /// Errors in a row since the last success (reset to 0 by a success).
    consecutive_errors: AtomicU32,
    /// Rung when a run of errors grows (see [`Stats::error_run_alarm`]).
    alarm: Arc<tokio::sync::Notify>,
    successes_total: AtomicU64,
    errors_total: AtomicU64,
    /// Requests whose client left before the upstream answered.
    abandoned_total: AtomicU64,
    /// Requests refused because the upstream was at its `max_concurrent`:
    /// never sent, so never in the window.
    concurrency_limited_total: AtomicU64,
    /// Non-cumulative counts per [`DURATION_BOUNDS_SECONDS`] bucket, plus +Inf.
    duration_buckets: [AtomicU64; DURATION_BOUNDS_MICROS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl UpstreamStats {
    fn new(window: Duration, base: Instant, alarm: Arc<tokio::sync::Notify>) -> Self {
        Self {
            window: Window::new(window, base),
            consecutive_errors: AtomicU32::new(0),
            alarm,
            successes_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            abandoned_total: AtomicU64::new(0),
            concurrency_limited_total: AtomicU64::new(0),
            duration_buckets: Default::default(),
            duration_sum_micros: AtomicU64::new(0),
        }
    }

    /// Requests in this worker's window for this upstream, as of `now`.
    pub fn window_requests(&self, now: Instant) -> u64 {
        self.window.snapshot(now).requests
    }

    /// Records one outcome. Wait-free; only the owning worker calls it.
    #[inline]
    pub fn record(&self, now: Instant, latency: Duration, error: bool) {
        self.window.record(now, latency, error);
        if error {
            bump(&self.errors_total);
            let run = &self.consecutive_errors;
            let length = run.load(Relaxed).saturating_add(1);
            run.store(length, Relaxed);
            // A second error in a row wakes the judge now instead of at its
            // next tick: a canary that fails everything is reverted after its
            // few failures, not up to a tick later. Healthy traffic never
            // gets here, so this costs the request path nothing.
            if length >= 2 {
                self.alarm.notify_one();
            }
        } else {
            bump(&self.successes_total);
            if self.consecutive_errors.load(Relaxed) != 0 {
                self.consecutive_errors.store(0, Relaxed);
            }
        }
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = DURATION_BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        bump(&self.duration_buckets[bucket]);
        let sum = &self.duration_sum_micros;
        sum.store(sum.load(Relaxed).wrapping_add(micros), Relaxed);
    }

    /// Records a request whose client left after `waited` without an answer
    /// from the upstream. The window counts it, with `waited` as its latency
    /// and not as an error: a lower bound on how slow the upstream was, so a
    /// canary slower than its clients' patience still shows in its p95. It
    /// is neither a success nor an error in the totals, and leaves the run
    /// of consecutive errors as it was.
    pub fn record_abandoned(&self, now: Instant, waited: Duration) {
        self.window.record(now, waited, false);
        bump(&self.abandoned_total);
    }

    /// Counts a request refused because the upstream was at its
    /// `max_concurrent`. It was never sent: the window does not count it.
    pub fn record_concurrency_limited(&self) {
        bump(&self.concurrency_limited_total);
    }
}

/// Cumulative totals for one upstream since start: what Prometheus reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Requests classified as successes.
    pub successes: u64,
    /// Requests classified as errors.
    pub errors: u64,
    /// Requests whose client left before the upstream answered.
    pub abandoned: u64,
    /// Requests refused because the upstream was at its `max_concurrent`
    /// (never sent; in no window).
    pub concurrency_limited: u64,
    /// Cumulative counts for each bound of [`DURATION_BOUNDS_SECONDS`]
    /// (Prometheus `le` semantics), then the `+Inf` count.
    pub duration_cumulative: Vec<u64>,
    /// Sum of all recorded durations, in seconds.
    pub duration_sum_seconds: f64,
}

// === impl ShadowStats ===

/// Why a request picked for the shadow was not copied to the canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowSkip {
    /// The shadow's bound on copies in flight (`shadow.max_concurrent`), or
    /// the canary's `max_concurrent`, was reached.
    Busy,
    /// A body that is not copied: any body when `shadow.max_body_bytes` is
    /// 0, else one without a known length, larger than it, or bound for an
    /// HTTP/2 upstream.
    Body,
    /// A method that is not copied without a body being allowed (anything
    /// but GET, HEAD, OPTIONS and TRACE), or an upgrade.
    Method,
}

impl ShadowSkip {
    /// Every reason, in the order [`ShadowTotals::skipped`] counts them.
    pub const ALL: [ShadowSkip; 3] = [ShadowSkip::Busy, ShadowSkip::Body, ShadowSkip::Method];

    /// The `result` label of `serin_shadow_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowSkip::Busy => "skipped_busy",
            ShadowSkip::Body => "skipped_body",
            ShadowSkip::Method => "skipped_method",
        }
    }
}

/// One worker's shadow figures. Only the worker writes them.
pub struct ShadowStats {
    sent: AtomicU64,
    skipped: [AtomicU64; 3],
    compared: AtomicU64,
    mismatches: AtomicU64,
    /// Compared pairs in a rolling window: each pair a request, each
    /// mismatch an "error", so the judge reads a mismatch rate.
    pairs: Window,
}

impl ShadowStats {
    fn new(window: Duration, base: Instant) -> Self {
        Self {
            sent: AtomicU64::new(0),
            skipped: Default::default(),
            compared: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            pairs: Window::new(window, base),
        }
    }

    /// A copy went to the canary.
    pub fn record_sent(&self) {
        bump(&self.sent);
    }

    /// A request picked for the shadow was not copied.
    pub fn record_skipped(&self, why: ShadowSkip) {
        bump(&self.skipped[why as usize]);
    }

    /// Stable's and the canary's answers to one request were compared at
    /// `now`: their status classes differed (`mismatch`) or not.
    pub fn record_pair(&self, now: Instant, mismatch: bool) {
        bump(&self.compared);
        if mismatch {
            bump(&self.mismatches);
        }
        self.pairs.record(now, Duration::ZERO, mismatch);
    }
}

/// The shadow's figures since start, merged over workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowTotals {
    /// Copies sent to the canary.
    pub sent: u64,
    /// Requests picked but not copied, by [`ShadowSkip::ALL`].
    pub skipped: [u64; 3],
    /// Pairs whose two answers were compared.
    pub compared: u64,
    /// Of those, pairs whose status classes differed.
    pub mismatches: u64,
}

// === impl WorkerStats ===

/// One worker's stats: one [`UpstreamStats`] per [`Target`], and the shadow's.
pub struct WorkerStats {
    upstreams: [UpstreamStats; 2],
    shadow: ShadowStats,
}

impl WorkerStats {
    fn new(window: Duration, base: Instant, alarm: &Arc<tokio::sync::Notify>) -> Self {
        Self {
            upstreams: [
                UpstreamStats::new(window, base, alarm.clone()),
                UpstreamStats::new(window, base, alarm.clone()),
            ],
            shadow: ShadowStats::new(window, base),
        }
    }

    /// The stats of one upstream.
    #[inline]
    pub fn upstream(&self, target: Target) -> &UpstreamStats {
        &self.upstreams[target.index()]
    }

    /// The shadow's figures.
    #[inline]
    pub fn shadow(&self) -> &ShadowStats {
        &self.shadow
    }
}

// === impl Stats ===

/// The read side: a handle on every worker's stats, cheap to clone.
#[derive(Clone)]
pub struct Stats {
    workers: Arc<[Arc<WorkerStats>]>,
    window: Duration,
    alarm: Arc<tokio::sync::Notify>,
    access_log: Option<Arc<AccessLogCounters>>,
    span_export: Option<Arc<ExportCounters>>,
    /// Reload counters of each set of TLS files, by what they serve:
    /// `listener`, `stable` or `canary`.
    tls_reload: Vec<(&'static str, Arc<TlsReloadCounters>)>,
    /// Each upstream's endpoints, by [`Target::index`] (none: stats made
    /// without a proxy).
    endpoints: Option<[Arc<EndpointSet>; 2]>,
    /// The local rate limit, whose table and refusals are read from its
    /// shards (counted under the lock each refusal takes anyway).
    rate_limiter: Option<Arc<RateLimiter>>,
}

impl Stats {
    /// Stats for `workers` workers with a rolling window of `window`, whose
    /// clock starts at `base`.
    pub fn new(workers: usize, window: Duration, base: Instant) -> Self {
        let alarm = Arc::new(tokio::sync::Notify::new());
        Self {
            workers: (0..workers.max(1))
                .map(|_| Arc::new(WorkerStats::new(window, base, &alarm)))
                .collect(),
            window,
            alarm,
            access_log: None,
            span_export: None,
            tls_reload: Vec::new(),
            endpoints: None,
            rate_limiter: None,
        }
    }

    /// These stats with the span exporter's counters.
    pub(crate) fn with_span_export(mut self, counters: Arc<ExportCounters>) -> Self {
        self.span_export = Some(counters);
        self
    }

    /// The span exporter's counters, when spans are exported.
    pub fn span_export(&self) -> Option<&ExportCounters> {
        self.span_export.as_deref()
    }

    /// These stats with the upstreams' endpoints.
    pub(crate) fn with_endpoints(mut self, endpoints: [Arc<EndpointSet>; 2]) -> Self {
        self.endpoints = Some(endpoints);
        self
    }

    /// The endpoints of `target`'s upstream (none for stats made without a
    /// proxy).
    pub fn endpoints(&self, target: Target) -> Option<&EndpointSet> {
        self.endpoints.as_ref().map(|e| &*e[target.index()])
    }

    /// These stats with the reload counters of the TLS files of `files`
    /// (`listener`, `stable` or `canary`).
    pub(crate) fn with_tls_reload(
        mut self,
        files: &'static str,
        counters: Arc<TlsReloadCounters>,
    ) -> Self {
        self.tls_reload.push((files, counters));
        self
    }

    /// The reload counters of every set of TLS files serin watches, by what
    /// they serve: `listener`, `stable`, `canary`.
    pub fn tls_reloads(&self) -> &[(&'static str, Arc<TlsReloadCounters>)] {
        &self.tls_reload
    }

    /// The reload counters of the TLS files of `files` (`listener`,
    /// `stable` or `canary`), if serin watches them.
    pub fn tls_reload(&self, files: &str) -> Option<&TlsReloadCounters> {
        self.tls_reload
            .iter()
            .find(|(f, _)| *f == files)
            .map(|(_, c)| &**c)
    }

    /// These stats with the access log's counters.
    pub(crate) fn with_access_log(mut self, counters: Arc<AccessLogCounters>) -> Self {
        self.access_log = Some(counters);
        self
    }

    /// The access log's counters, when it is on.
    pub fn access_log(&self) -> Option<&AccessLogCounters> {
        self.access_log.as_deref()
    }

    /// The same stats, reading the rate limit's figures from `limiter`.
    pub(crate) fn with_rate_limiter(self, limiter: Option<Arc<RateLimiter>>) -> Self {
        Self {
            rate_limiter: limiter,
            ..self
        }
    }

    /// Requests the local rate limit refused since start (0 without one).
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limiter.as_ref().map_or(0, |l| l.limited())
    }

    /// Client keys in the rate limit's table (0 without one).
    pub fn rate_limit_keys(&self) -> usize {
        self.rate_limiter.as_ref().map_or(0, |l| l.keys())
    }

    /// Notified (one stored permit) whenever some upstream's run of
    /// consecutive errors reaches two or more: the judge waits on it as well
    /// as on its tick.
    pub fn error_run_alarm(&self) -> &tokio::sync::Notify {
        &self.alarm
    }

    /// The length of the rolling window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The writer handle for worker `index`.
    pub fn worker(&self, index: usize) -> Arc<WorkerStats> {
        self.workers[index].clone()
    }

    /// The merged window of one upstream across all workers, as of `now`.
    pub fn window_snapshot(&self, target: Target, now: Instant) -> WindowSnapshot {
        let mut snap = WindowSnapshot::default();
        for worker in self.workers.iter() {
            worker.upstream(target).window.add_to(now, &mut snap);
        }
        snap
    }

    /// The outcomes of one upstream that completed since `cursor`'s previous
    /// call, merged over workers, as of `now`.
    ///
    /// Reads the current slice and the one before (a worker may still be
    /// finishing a request it timed in the previous slice) and subtracts what
    /// the cursor saw of them: one look costs two slices' merge, whatever
    /// the window's length. Outcomes recorded in a slice older than that
    /// after the cursor moved past it are never returned, which needs a
    /// worker a whole slice (a tenth of the window) behind the reader's clock.
    pub fn new_outcomes(
        &self,
        target: Target,
        cursor: &mut OutcomeCursor,
        now: Instant,
    ) -> WindowSnapshot {
        let current = match self.workers.first() {
            Some(worker) => worker.upstream(target).window.period(now) + 1,
            None => return WindowSnapshot::default(),
        };
        let mut new = WindowSnapshot::default();
        for (slot, epoch) in [current.saturating_sub(1), current].into_iter().enumerate() {
            let mut slice = std::mem::replace(&mut cursor.spare, WindowSnapshot::unallocated());
            slice.clear();
            if epoch > 0 {
                for worker in self.workers.iter() {
                    worker.upstream(target).window.add_slice(epoch, &mut slice);
                }
            }
            // The previous slice may be what was the current one (the
            // clock moved on a slice): search both before replacing any.
            match cursor.seen.iter().find(|(e, _)| *e == epoch) {
                Some((_, before)) => new.add_growth(&slice, before),
                None => new.merge(&slice),
            }
            let (_, old) = std::mem::replace(&mut cursor.seen[slot], (epoch, slice));
            cursor.spare = old;
        }
        new
    }

    /// Restarts one upstream's window on every worker (see [`Window::restart`]).
    pub fn restart_window(&self, target: Target, now: Instant) {
        for worker in self.workers.iter() {
            worker.upstream(target).window.restart(now);
        }
    }

    /// The compared shadow pairs in the window as of `now`, merged over
    /// workers: `requests` pairs, of which `errors` differed in status class.
    pub fn shadow_window(&self, now: Instant) -> WindowSnapshot {
        let mut snap = WindowSnapshot::default();
        for worker in self.workers.iter() {
            worker.shadow.pairs.add_to(now, &mut snap);
        }
        snap
    }

    /// Restarts the shadow pairs' window on every worker.
    pub fn restart_shadow_window(&self, now: Instant) {
        for worker in self.workers.iter() {
            worker.shadow.pairs.restart(now);
        }
    }

    /// The shadow's figures since start, merged over workers.
    pub fn shadow_totals(&self) -> ShadowTotals {
        let mut totals = ShadowTotals::default();
        for worker in self.workers.iter() {
            let s = &worker.shadow;
            totals.sent += s.sent.load(Relaxed);
            for (sum, n) in totals.skipped.iter_mut().zip(&s.skipped) {
                *sum += n.load(Relaxed);
            }
            totals.compared += s.compared.load(Relaxed);
            totals.mismatches += s.mismatches.load(Relaxed);
        }
        totals
    }

    /// Current runs of consecutive errors of one upstream, summed over
    /// workers: a canary that fails everything reaches N after N failures
    /// however many workers share the traffic.
    pub fn consecutive_errors(&self, target: Target) -> u32 {
        self.workers
            .iter()
            .map(|w| w.upstream(target).consecutive_errors.load(Relaxed))
            .sum()
    }

    /// Requests recorded for one upstream since start (successes, errors and
    /// abandoned), summed over workers. Cheap: three loads per worker.
    pub fn request_count(&self, target: Target) -> u64 {
        self.workers
            .iter()
            .map(|w| {
                let u = w.upstream(target);
                u.successes_total.load(Relaxed)
                    + u.errors_total.load(Relaxed)
                    + u.abandoned_total.load(Relaxed)
            })
            .sum()
    }

    /// Cumulative totals of one upstream, merged over workers.
    pub fn totals(&self, target: Target) -> Totals {
        let mut totals = Totals {
            duration_cumulative: vec![0; DURATION_BOUNDS_MICROS.len() + 1],
            ..Totals::default()
        };
        let mut sum_micros = 0u64;
        for worker in self.workers.iter() {
            let u = worker.upstream(target);
            totals.successes += u.successes_total.load(Relaxed);
            totals.errors += u.errors_total.load(Relaxed);
            totals.abandoned += u.abandoned_total.load(Relaxed);
            totals.concurrency_limited += u.concurrency_limited_total.load(Relaxed);
            sum_micros += u.duration_sum_micros.load(Relaxed);
            for (sum, b) in totals
                .duration_cumulative
                .iter_mut()
                .zip(u.duration_buckets.iter())
            {
                *sum += b.load(Relaxed);
            }
        }
        let mut running = 0;
        for count in totals.duration_cumulative.iter_mut() {
            running += *count;
            *count = running;
        }
        totals.duration_sum_seconds = sum_micros as f64 / 1e6;
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_in_order() {
        let mut last_high = None;
        for index in 0..LATENCY_BUCKETS {
            let (low, high) = bucket_range(index);
            assert!(low <= high);
            if let Some(prev) = last_high {
                assert_eq!(low, prev + 1, "bucket {index} leaves a gap");
            }
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(high), index);
            last_high = Some(high);
        }
        assert_eq!(last_high, Some(MAX_MICROS));
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn buckets_are_within_three_percent() {
        for v in [33u64, 100, 999, 12_345, 1_000_000, 987_654_321] {
            let (low, high) = bucket_range(bucket_of(v));
            assert!((high - low) as f64 / v as f64 <= 1.0 / 31.0, "{v}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn window_counts_errors_and_quantiles() {
        let base = Instant::now();
        let w = Window::new(Duration::from_secs(10), base);
        for i in 0..100u64 {
            // latencies 1..=100 ms, every 10th an error
            w.record(Instant::now(), Duration::from_millis(i + 1), i % 10 == 0);
        }
        let s = w.snapshot(Instant::now());
        assert_eq!(s.requests, 100);
        assert_eq!(s.errors, 10);
        assert!((s.error_rate() - 0.1).abs() < 1e-9);
        let p50 = s.quantile(0.5).as_secs_f64() * 1000.0;
        let p95 = s.quantile(0.95).as_secs_f64() * 1000.0;
        let p99 = s.quantile(0.99).as_secs_f64() * 1000.0;
        assert!((p50 - 50.0).abs() / 50.0 < 0.04, "p50 {p50}");
        assert!((p95 - 95.0).abs() / 95.0 < 0.04, "p95 {p95}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.04, "p99 {p99}");
    }

    #[tokio::test(start_paused = true)]
    async fn old_slices_leave_the_window() {
        let base = Instant::now();
        let w = Window::new(Duration::from_secs(10), base);
        w.record(Instant::now(), Duration::from_millis(1), true);
        tokio::time::advance(Duration::from_secs(5)).await;
        w.record(Instant::now(), Duration::from_millis(1), false);
        assert_eq!(w.snapshot(Instant::now()).requests, 2);
        // 9.5 s after the first record: it is still inside the 10 s window.
        tokio::time::advance(Duration::from_millis(4_500)).await;
        assert_eq!(w.snapshot(Instant::now()).requests, 2);
        // 10.5 s after it: the first slice has aged out, the second remains.
        tokio::time::advance(Duration::from_secs(1)).await;
        let s = w.snapshot(Instant::now());
        assert_eq!((s.requests, s.errors), (1, 0));
        // A full window later everything is gone, and slots are reused cleanly.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.snapshot(Instant::now()).requests, 0);
        w.record(Instant::now(), Duration::from_millis(1), true);
        let s = w.snapshot(Instant::now());
        assert_eq!((s.requests, s.errors), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_slice_keeps_no_latency_from_its_last_period() {
        let base = Instant::now();
        let w = Window::new(Duration::from_secs(10), base);
        // Period 0: a fast and a very slow request set the slice's range wide.
        w.record(Instant::now(), Duration::from_micros(5), false);
        w.record(Instant::now(), Duration::from_secs(30), false);
        let s = w.snapshot(Instant::now());
        assert_eq!(s.quantile(0.01), Duration::from_micros(5));
        assert!(s.quantile(1.0) >= Duration::from_secs(29));
        // Period 10 reuses the same slice; its range starts empty.
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            w.record(Instant::now(), Duration::from_millis(2), false);
        }
        let s = w.snapshot(Instant::now());
        assert_eq!(s.requests, 3);
        let (low, high) = (s.quantile(0.0), s.quantile(1.0));
        assert!(
            low >= Duration::from_micros(1_900) && high <= Duration::from_micros(2_100),
            "only the new 2 ms requests remain: {low:?}..{high:?}"
        );
        // A merge over slices with different ranges lines the buckets up.
        tokio::time::advance(Duration::from_secs(1)).await;
        w.record(Instant::now(), Duration::from_micros(40), false);
        let s = w.snapshot(Instant::now());
        assert_eq!(s.requests, 4);
        let p25 = s.quantile(0.25);
        assert!(
            p25 >= Duration::from_micros(39) && p25 <= Duration::from_micros(41),
            "{p25:?}"
        );
        assert!(s.quantile(1.0) <= Duration::from_micros(2_100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_window_forgets_the_past_and_counts_from_the_next_slice() {
        let base = Instant::now();
        let w = Window::new(Duration::from_secs(10), base);
        tokio::time::advance(Duration::from_millis(2_500)).await;
        w.record(Instant::now(), Duration::from_millis(1), true);
        w.restart(Instant::now());
        w.record(Instant::now(), Duration::from_millis(1), true);
        assert_eq!(
            w.snapshot(Instant::now()).requests,
            0,
            "the current slice is dropped whole"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        w.record(Instant::now(), Duration::from_millis(1), false);
        let s = w.snapshot(Instant::now());
        assert_eq!((s.requests, s.errors), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cursor_yields_each_outcome_once_across_slices_and_workers() {
        let stats = Stats::new(2, Duration::from_secs(10), Instant::now());
        let mut cursor = OutcomeCursor::default();
        let record = |worker: usize, ms: u64, error: bool| {
            stats.worker(worker).upstream(Target::Canary).record(
                Instant::now(),
                Duration::from_millis(ms),
                error,
            )
        };
        let take = |cursor: &mut OutcomeCursor| {
            let new = stats.new_outcomes(Target::Canary, cursor, Instant::now());
            (new.requests, new.errors, new.quantile(1.0))
        };
        record(0, 5, true);
        record(1, 5, false);
        let (requests, errors, _) = take(&mut cursor);
        assert_eq!((requests, errors), (2, 1));
        assert_eq!(take(&mut cursor).0, 0, "nothing new, nothing returned");
        // One more in the same slice, then two in the next: each once.
        record(0, 50, false);
        let (requests, _, slowest) = take(&mut cursor);
        assert_eq!(requests, 1);
        assert!(slowest >= Duration::from_millis(48), "{slowest:?}");
        tokio::time::advance(Duration::from_millis(1_200)).await;
        record(1, 7, true);
        record(0, 7, false);
        assert_eq!(take(&mut cursor).0, 2);
        // Stable's outcomes are never the canary's.
        stats.worker(0).upstream(Target::Stable).record(
            Instant::now(),
            Duration::from_millis(1),
            false,
        );
        assert_eq!(take(&mut cursor).0, 0);
        // A cursor that looked long ago sees only the two newest slices.
        tokio::time::advance(Duration::from_secs(30)).await;
        record(0, 1, false);
        assert_eq!(take(&mut cursor).0, 1);
        assert_eq!(take(&mut OutcomeCursor::default()).0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stats_merge_workers_and_keep_totals() {
        let stats = Stats::new(2, Duration::from_secs(10), Instant::now());
        let now = Instant::now();
        stats
            .worker(0)
            .upstream(Target::Canary)
            .record(now, Duration::from_micros(300), true);
        stats
            .worker(1)
            .upstream(Target::Canary)
            .record(now, Duration::from_millis(30), true);
        stats
            .worker(1)
            .upstream(Target::Stable)
            .record(now, Duration::from_millis(2), false);
        assert_eq!(
            stats.consecutive_errors(Target::Canary),
            2,
            "runs add up across workers"
        );
        let c = stats.window_snapshot(Target::Canary, now);
        assert_eq!((c.requests, c.errors), (2, 2));
        let t = stats.totals(Target::Canary);
        assert_eq!((t.successes, t.errors), (0, 2));
        // 300 µs ≤ 0.0005; 30 ms ≤ 0.05 (index 6); +Inf holds both.
        assert_eq!(t.duration_cumulative[0], 1);
        assert_eq!(t.duration_cumulative[5], 1);
        assert_eq!(t.duration_cumulative[6], 2);
        assert_eq!(*t.duration_cumulative.last().unwrap(), 2);
        assert!((t.duration_sum_seconds - 0.0303).abs() < 1e-9);
        assert_eq!(stats.request_count(Target::Stable), 1);
        stats
            .worker(0)
            .upstream(Target::Canary)
            .record(now, Duration::from_micros(300), false);
        assert_eq!(
            stats.consecutive_errors(Target::Canary),
            1,
            "worker 1 still has a run of 1"
        );
    }
}
