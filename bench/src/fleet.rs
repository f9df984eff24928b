//! Fleet mode on loopback: N real `serin run --fleet` processes (the release
//! binary) against the in-process fake Kubernetes API server
//! (`serin_tests::kube_api::FakeKube`, which speaks the real wire protocol),
//! in front of two scripted upstreams (`serin_tests::TestUpstream`). It
//! measures what the fleet's design promises and a unit test cannot show:
//!
//! - **Revert propagation.** Only member `m0` gets traffic; at a known
//!   instant (the *onset*) the canary starts answering 500. `m0`'s own judge
//!   reverts it, it writes the rollback to the `SerinRollout`'s status, and
//!   every other member follows its watch. Each member's `GET /status` is
//!   polled every 2 ms (`--poll-ms`) on its own keep-alive connection and the fake's
//!   object is read in process every millisecond, all timed by this
//!   process's one monotonic clock: onset → `m0` at 0 (its local revert) →
//!   the rollback in the API → the last member at 0. Between trials the
//!   fleet is re-armed with a `PUT /weight` on a member's control API (a new
//!   epoch) and the bench waits for every member back at the weight. One
//!   variant adds 20 ms to every API response ([`FakeKube::set_latency`]).
//! - **API requests.** [`FakeKube::requests`] snapshots, by verb and
//!   resource: over an idle window at steady state with the default report
//!   interval (10 s) and lease (15 s), and over a progressive rollout started
//!   with `serin rollout --fleet` under light traffic.
//!
//! Members are started with [`Guarded`] (stopped by PID however the run
//! ends) rather than `SerinProcess`, so that each member's log goes to its
//! own file, read at the end for warnings. Everything is on 127.0.0.1; every
//! wait has a deadline and every request loop a count and time bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use serin_tests::kube_api::{FakeKube, RequestCounts};
use serin_tests::{Behavior, TestUpstream};
use tokio::net::TcpStream;

use crate::procs::{self, Guarded};
use crate::results::spread;

const NS: &str = "bench";
const NAME: &str = "checkout";
const FLEET: &str = "bench/checkout";
/// The canary's weight while armed, percent.
const WEIGHT: f64 = 50.0;
/// How often each member's `/status` is polled during a trial, by default.
pub const POLL: Duration = Duration::from_millis(2);
/// The API latency of the second variant.
const SLOW_API: Duration = Duration::from_millis(20);
/// Failing traffic through `m0`, requests per second (paced, 4 connections).
const FAILING_RPS: f64 = 1_000.0;
/// Light traffic during the rollout, requests per second per member.
const ROLLOUT_RPS: f64 = 20.0;
const ROLLOUT_STEPS: &str = "25,50,100";
const ROLLOUT_HOLD: &str = "2s";
/// A trial that does not finish within this is recorded as incomplete.
const TRIAL_DEADLINE: Duration = Duration::from_secs(10);
/// Waits for the fleet to reach a weight.
const WAIT_DEADLINE: Duration = Duration::from_secs(30);
/// The rollout must promote within this.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(90);
/// After the members start and before the idle window: longer than one
/// report interval plus its jitter, so every member's first (jittered)
/// report is behind it and the window sees only the periodic cadence.
pub const SETTLE: Duration = Duration::from_secs(12);

/// What one `serin-bench fleet` run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetBench {
    /// When the run started (UTC).
    pub started: String,
    /// `--quick`: fewer trials and a shorter idle window.
    pub quick: bool,
    /// serin's git commit (with `-dirty` when proxy/ or control/ had changes).
    pub commit: String,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
    /// Seconds spent waiting for other builds on the machine to finish.
    pub waited_seconds: f64,
    /// `/status` poll interval during trials, ms.
    pub poll_ms: f64,
    /// Failing traffic through `m0`, requests per second.
    pub failing_rps: f64,
    /// One entry per fleet size.
    pub sizes: Vec<FleetSize>,
    /// What disturbed the run, and what the members logged.
    pub notes: Vec<String>,
}

/// One fleet size's results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetSize {
    /// Members in the fleet.
    pub members: usize,
    /// Propagation trials: without added API latency, then with it.
    pub propagation: Vec<Propagation>,
    /// API requests over an idle window at steady state.
    pub steady: ApiWindow,
    /// API requests during a progressive rollout.
    pub rollout: Option<RolloutRun>,
}

/// Trials at one API latency.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Propagation {
    /// Latency the fake adds to every API response, ms.
    pub api_latency_ms: f64,
    /// One per trial.
    pub trials: Vec<Trial>,
}

/// One revert-propagation trial. Times in ms, from the bench's clock.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Trial {
    /// `PUT /weight` on a member → every member's `/status` at the weight.
    pub rearm_ms: Option<f64>,
    /// Onset (canary starts failing, traffic through `m0` starts) → `m0`'s
    /// `/status` at 0: its own judge's revert.
    pub onset_to_local_ms: Option<f64>,
    /// `m0` at 0 → the rollback (`latched`) in the API's object.
    pub local_to_api_ms: Option<f64>,
    /// `m0` at 0 → the last member at 0: the propagation.
    pub local_to_last_ms: Option<f64>,
    /// `m0` at 0 → each member at 0 (`m0` first, so 0).
    pub members_ms: Vec<Option<f64>>,
    /// Members seen at 0 before the deadline.
    pub at_zero: usize,
    /// Who the fleet's status says rolled it back (`m0`, or `leader@…` if
    /// the leader's aggregate judge was first).
    pub actor: String,
    /// Requests sent through `m0` until its revert.
    pub failing_requests: u64,
}

impl Trial {
    /// Onset → the last member at 0.
    pub fn onset_to_last_ms(&self) -> Option<f64> {
        Some(self.onset_to_local_ms? + self.local_to_last_ms?)
    }
}

/// API requests over a window, by verb and resource.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiWindow {
    /// Length of the window, seconds.
    pub seconds: f64,
    /// `(verb, resource, count)`.
    pub requests: Vec<(String, String, u64)>,
    /// Changes of the `SerinRollout` in the window: each is one watch event
    /// to every member, carrying the whole object.
    #[serde(default)]
    pub object_events: u64,
    /// The `SerinRollout`'s JSON size at the end of the window, bytes.
    #[serde(default)]
    pub object_bytes: u64,
}

/// The verbs a fleet member can use, in report order.
pub const VERBS: [&str; 8] = [
    "get", "list", "watch", "create", "update", "patch", "apply", "delete",
];
const WRITES: [&str; 5] = ["create", "update", "patch", "apply", "delete"];

impl ApiWindow {
    /// The requests counted since `before` (taken at resourceVersion
    /// `rv_before`), over `seconds`.
    fn measure(api: &FakeKube, before: &RequestCounts, rv_before: u64, seconds: f64) -> Self {
        let counts = api.requests().since(before);
        let object_events = api
            .events()
            .iter()
            .filter(|e| e.resource == "serinrollouts" && e.resource_version > rv_before)
            .count() as u64;
        let object_bytes = api
            .get("serinrollouts", NS, NAME)
            .and_then(|o| serde_json::to_vec(&o).ok())
            .map_or(0, |b| b.len() as u64);
        Self {
            seconds,
            requests: counts
                .0
                .iter()
                .map(|((v, r), n)| (v.clone(), r.clone(), *n))
                .collect(),
            object_events,
            object_bytes,
        }
    }

    /// Requests with this verb.
    pub fn verb(&self, verb: &str) -> u64 {
        self.requests
            .iter()
            .filter(|(v, ..)| v == verb)
            .map(|(.., n)| n)
            .sum()
    }

    /// Every request counted.
    pub fn total(&self) -> u64 {
        self.requests.iter().map(|(.., n)| n).sum()
    }

    /// Writes (create, update, patch, apply, delete).
    pub fn writes(&self) -> u64 {
        WRITES.iter().map(|v| self.verb(v)).sum()
    }

    /// A count scaled to one minute of this window.
    pub fn per_minute(&self, n: u64) -> f64 {
        if self.seconds > 0.0 {
            n as f64 * 60.0 / self.seconds
        } else {
            0.0
        }
    }

    /// Writes per member per 10 s.
    pub fn writes_per_member_per_10s(&self, members: usize) -> f64 {
        if self.seconds > 0.0 && members > 0 {
            self.writes() as f64 * 10.0 / self.seconds / members as f64
        } else {
            0.0
        }
    }
}

/// A progressive rollout under light traffic.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RolloutRun {
    /// `--steps`.
    pub steps: String,
    /// `--hold`.
    pub hold: String,
    /// Client requests per second sent through each member.
    pub rps_per_member: f64,
    /// Whether the fleet reached `promoted` before the deadline.
    pub promoted: bool,
    /// The phase at the end.
    pub final_phase: String,
    /// From the CLI's start to `promoted` (or the deadline): the window.
    pub window: ApiWindow,
}

/// Options of one run.
#[derive(Clone, Debug)]
pub struct Options {
    /// 3 trials, a 20 s idle window instead of 60 s.
    pub quick: bool,
    /// Trials per fleet size and latency (default 10, 3 with `quick`).
    pub trials: Option<usize>,
    /// Fleet sizes (default 5 and 20).
    pub sizes: Vec<usize>,
    /// `/status` poll interval during trials ([`POLL`]).
    pub poll: Duration,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The serin binary is not there.
    #[error(
        "no serin binary at {0}: build it first with `cargo build --release -p serin-control` \
         (or point SERIN_BIN at one)"
    )]
    NoBinary(PathBuf),
    /// A member or the fleet did not come up.
    #[error("{0}")]
    Setup(String),
    /// Files, sockets or processes.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the whole fleet benchmark.
pub fn run(serin: &Path, opts: &Options) -> Result<FleetBench, FleetError> {
    if !serin.is_file() {
        return Err(FleetError::NoBinary(serin.to_path_buf()));
    }
    let started = Instant::now();
    let mut out = FleetBench {
        started: crate::run::utc_now(),
        quick: opts.quick,
        commit: crate::run::machine().commit,
        poll_ms: ms(opts.poll),
        failing_rps: FAILING_RPS,
        ..FleetBench::default()
    };
    if let Some(note) = stale_binary(serin) {
        eprintln!("fleet: {note}");
        out.notes.push(note);
    }
    let trials = opts.trials.unwrap_or(if opts.quick { 3 } else { 10 });
    for &n in &opts.sizes {
        out.waited_seconds += procs::wait_for_quiet(Duration::from_secs(600)).as_secs_f64();
        let watch = procs::BuildWatch::start();
        let size = run_size(serin, n, trials, opts, &mut out.notes)?;
        let disturbed = watch.finish();
        if !disturbed.is_empty() {
            out.notes.push(format!(
                "{n} members: the machine was busy during the measurement ({})",
                disturbed.join(", ")
            ));
        }
        out.sizes.push(size);
    }
    out.wall_seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// A note when the binary is older than serin's sources.
fn stale_binary(serin: &Path) -> Option<String> {
    let built = std::fs::metadata(serin).and_then(|m| m.modified()).ok()?;
    let root = crate::run::bench_dir().parent()?.to_path_buf();
    let mut newest = None;
    let mut stack = vec![root.join("control/src"), root.join("proxy/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                if newest.is_none_or(|n| t > n) {
                    newest = Some(t);
                }
            }
        }
    }
    (newest? > built).then(|| {
        format!(
            "{} is older than serin's sources: rebuild with `cargo build --release -p serin-control`",
            serin.display()
        )
    })
}

// === members ===

struct Member {
    process: Guarded,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

/// Starts `n` members, then waits for each to print its addresses.
fn start_members(
    serin: &Path,
    dir: &Path,
    n: usize,
    kubeconfig: &Path,
    stable: &str,
    canary: &str,
) -> Result<Vec<Member>, FleetError> {
    let mut started = Vec::new();
    for i in 0..n {
        let log = dir.join(format!("m{i}.log"));
        let mut cmd = Command::new(serin);
        cmd.args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--stable", stable, "--canary", canary])
            .arg("--state-dir")
            .arg(dir.join(format!("state-m{i}")))
            .args(["--fleet", FLEET, "--fleet-member", &format!("m{i}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", log_filter());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SERIN_") {
                cmd.env_remove(key);
            }
        }
        let process = Guarded::spawn(&format!("serin m{i}"), cmd, &log)?;
        started.push((process, log));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut members = Vec::new();
    for (mut process, log) in started {
        let (proxy, admin) = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let after = |prefix: &str| {
                text.lines().find_map(|l| {
                    l.strip_prefix(prefix)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                })
            };
            if let (Some(p), Some(a)) = (
                after("serin: proxy listening on "),
                after("serin: control API listening on "),
            ) {
                break (p, a);
            }
            if !process.alive() || Instant::now() > deadline {
                return Err(FleetError::Setup(format!(
                    "a fleet member did not start listening; its log {}:\n{}",
                    log.display(),
                    text.lines().take(20).collect::<Vec<_>>().join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        members.push(Member {
            process,
            proxy,
            admin,
            log,
        });
    }
    Ok(members)
}

/// The members' `RUST_LOG`: `warn`, or `SERIN_BENCH_RUST_LOG`.
fn log_filter() -> String {
    std::env::var("SERIN_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// SIGTERM to every member at once, then wait for each (SIGKILL after 3 s).
fn stop_members(members: &mut [Member]) {
    for m in members.iter() {
        procs::signal(m.process.pid(), "TERM");
    }
    for m in members.iter_mut() {
        m.process.stop();
    }
}

/// Warnings, errors and panics the members logged, counted by level,
/// target and message (without the fields, which vary per line).
fn log_summary(members: &[Member]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in members {
        let text = std::fs::read_to_string(&m.log).unwrap_or_default();
        for line in text.lines() {
            let Some(at) = [" WARN ", " ERROR ", "panicked"]
                .iter()
                .find_map(|w| line.find(w))
            else {
                continue;
            };
            let message: Vec<&str> = line[at..]
                .split_whitespace()
                .take_while(|w| !w.contains('='))
                .collect();
            *out.entry(message.join(" ")).or_insert(0) += 1;
        }
    }
    out
}

// === HTTP ===

/// One keep-alive HTTP/1.1 connection to a loopback address, reopened after
/// an error. Every call is bounded in time.
struct Http {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    async fn connect(&mut self) -> Option<()> {
        let stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.addr))
            .await
            .ok()?
            .ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        self.sender = Some(sender);
        Some(())
    }

    /// One request; `(status, body, served by the canary)`.
    async fn call(&mut self, method: Method, path: &str, body: &str) -> Option<(u16, Bytes, bool)> {
        for _ in 0..2 {
            if self.sender.is_none() && self.connect().await.is_none() {
                continue;
            }
            let sender = self.sender.as_mut()?;
            let req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, self.addr.to_string())
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .ok()?;
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                sender.ready().await.ok()?;
                let resp = sender.send_request(req).await.ok()?;
                let status = resp.status().as_u16();
                let canary = resp
                    .headers()
                    .get("x-serin-upstream")
                    .is_some_and(|v| v == "canary");
                let bytes = resp.into_body().collect().await.ok()?.to_bytes();
                Some((status, bytes, canary))
            })
            .await;
            match answer {
                Ok(Some(a)) => return Some(a),
                _ => self.sender = None,
            }
        }
        None
    }

    /// The member's `canary_weight` from `GET /status`.
    async fn weight(&mut self) -> Option<f64> {
        let (status, body, _) = self.call(Method::GET, "/status", "").await?;
        if status != 200 {
            return None;
        }
        serde_json::from_slice::<Value>(&body).ok()?["canary_weight"].as_f64()
    }
}

/// Polls every member's `/status` every `every` until it shows `pct`, up to
/// `deadline`; returns when each was first seen there. `first` is set when
/// member 0 is.
async fn weights_reach(
    admins: &[SocketAddr],
    pct: f64,
    every: Duration,
    deadline: Instant,
    first: Option<Arc<AtomicBool>>,
) -> Vec<Option<Instant>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, &admin) in admins.iter().enumerate() {
        let first = if i == 0 { first.clone() } else { None };
        tasks.spawn(async move {
            let mut http = Http::new(admin);
            while Instant::now() < deadline {
                if http.weight().await == Some(pct) {
                    if let Some(f) = first {
                        f.store(true, Ordering::Relaxed);
                    }
                    return (i, Some(Instant::now()));
                }
                tokio::time::sleep(every).await;
            }
            (i, None)
        });
    }
    let mut out = vec![None; admins.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, at)) = done {
            out[i] = at;
        }
    }
    out
}

/// Paced GETs through `proxy` at `rps` over `conns` connections until
/// `stop` is set, `deadline` passes or `max` requests were sent. Returns the
/// requests sent.
async fn traffic(
    proxy: SocketAddr,
    rps: f64,
    conns: usize,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    max: u64,
) -> u64 {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_secs_f64(conns as f64 / rps);
    for c in 0..conns {
        let (stop, sent) = (stop.clone(), sent.clone());
        tasks.spawn(async move {
            let mut http = Http::new(proxy);
            // Stagger the connections over one interval.
            let start = Instant::now() + interval.mul_f64(c as f64 / conns as f64);
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && sent.load(Ordering::Relaxed) < max
            {
                let due = start + interval * k;
                k += 1;
                tokio::time::sleep_until(due.into()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                let _ = http.call(Method::GET, "/", "").await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    sent.load(Ordering::Relaxed)
}

// === one fleet size ===

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn since(later: Option<Instant>, earlier: Option<Instant>) -> Option<f64> {
    let (l, e) = (later?, earlier?);
    Some(if l >= e { ms(l - e) } else { -ms(e - l) })
}

fn fleet_status(api: &FakeKube) -> Value {
    api.get("serinrollouts", NS, NAME)
        .map(|o| o["status"].clone())
        .unwrap_or_default()
}

fn run_size(
    serin: &Path,
    n: usize,
    trials: usize,
    opts: &Options,
    notes: &mut Vec<String>,
) -> Result<FleetSize, FleetError> {
    eprintln!("fleet: {n} members");
    let dir = std::env::temp_dir().join(format!("serin-bench-fleet-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (api, stable, canary) = rt.block_on(async {
        (
            FakeKube::start().await,
            TestUpstream::start("stable").await,
            TestUpstream::start("canary").await,
        )
    });
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS)?;
    api.create(
        "serinrollouts",
        NS,
        json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"canaryWeight": WEIGHT},
        }),
    )
    .map_err(|e| FleetError::Setup(format!("cannot create the SerinRollout: {e:?}")))?;
    let mut members = start_members(serin, &dir, n, &kubeconfig, &stable.url(), &canary.url())?;
    let ctx = Ctx {
        api: &api,
        canary: &canary,
        serin,
        kubeconfig: &kubeconfig,
        proxies: members.iter().map(|m| m.proxy).collect(),
        admins: members.iter().map(|m| m.admin).collect(),
        poll: opts.poll,
    };
    let measured = rt.block_on(measure(&ctx, trials, opts.quick));
    stop_members(&mut members);
    let logged = log_summary(&members);
    if !logged.is_empty() {
        let lines: Vec<String> = logged
            .iter()
            .map(|(m, c)| format!("{c}× `{}`", m.replace('`', "'")))
            .collect();
        notes.push(format!(
            "{n} members logged (warnings and errors, summed over members): {}",
            lines.join("; ")
        ));
    }
    drop(ctx);
    drop((api, stable, canary));
    rt.shutdown_timeout(Duration::from_secs(2));
    let incomplete = measured.as_ref().map_or(true, |s| {
        s.propagation
            .iter()
            .flat_map(|p| &p.trials)
            .any(|t| t.local_to_last_ms.is_none())
    });
    if incomplete || std::env::var_os("SERIN_BENCH_KEEP").is_some() {
        let note = format!(
            "{n} members: the members' logs and state are kept in {}",
            dir.display()
        );
        eprintln!("  {note}");
        notes.push(note);
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut size = measured?;
    size.members = n;
    Ok(size)
}

struct Ctx<'a> {
    api: &'a FakeKube,
    canary: &'a TestUpstream,
    serin: &'a Path,
    kubeconfig: &'a Path,
    proxies: Vec<SocketAddr>,
    admins: Vec<SocketAddr>,
    poll: Duration,
}

async fn measure(ctx: &Ctx<'_>, trials: usize, quick: bool) -> Result<FleetSize, FleetError> {
    let n = ctx.admins.len();
    // Every member follows the object and one holds the Lease.
    let all = weights_reach(
        &ctx.admins,
        WEIGHT,
        Duration::from_millis(20),
        Instant::now() + WAIT_DEADLINE,
        None,
    )
    .await;
    if all.iter().any(Option::is_none) {
        return Err(FleetError::Setup(format!(
            "not every member reached {WEIGHT}% within {WAIT_DEADLINE:?}"
        )));
    }
    let lease = format!("serin-{NAME}");
    let deadline = Instant::now() + WAIT_DEADLINE;
    while ctx
        .api
        .get("leases", NS, &lease)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .is_none()
    {
        if Instant::now() > deadline {
            return Err(FleetError::Setup("no member took the Lease".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Steady state: idle, default report interval and lease.
    tokio::time::sleep(SETTLE).await;
    let window = Duration::from_secs(if quick { 20 } else { 60 });
    eprintln!("  steady state: counting API requests over {window:?}");
    let (before, rv) = (ctx.api.requests(), ctx.api.resource_version());
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let steady = ApiWindow::measure(ctx.api, &before, rv, t0.elapsed().as_secs_f64());
    eprintln!(
        "  steady state: {:.0} requests/min, {:.2} writes per member per 10 s",
        steady.per_minute(steady.total()),
        steady.writes_per_member_per_10s(n)
    );

    // Revert propagation, without and with API latency. Every trial re-arms
    // a rolled-back fleet, so the fleet starts rolled back (an operator's
    // rollback) and every trial starts from the same state.
    let mut admin = Http::new(ctx.admins[n - 1]);
    match admin.call(Method::POST, "/rollback", "").await {
        Some((200, ..)) => {}
        other => {
            return Err(FleetError::Setup(format!(
                "POST /rollback on m{} answered {:?}",
                n - 1,
                other.map(|(s, b, _)| (s, String::from_utf8_lossy(&b).into_owned()))
            )))
        }
    }
    let down = weights_reach(
        &ctx.admins,
        0.0,
        ctx.poll,
        Instant::now() + WAIT_DEADLINE,
        None,
    )
    .await;
    if down.iter().any(Option::is_none) {
        return Err(FleetError::Setup(
            "after POST /rollback, not every member went to 0".into(),
        ));
    }
    let mut propagation = Vec::new();
    for latency in [Duration::ZERO, SLOW_API] {
        ctx.api.set_latency(latency);
        let mut run = Propagation {
            api_latency_ms: ms(latency),
            trials: Vec::new(),
        };
        for k in 0..trials {
            let t = trial(ctx).await?;
            eprintln!(
                "  API +{} ms, trial {}: onset → m0 at 0 {} ms; m0 → API {} ms; m0 → last of {n} at 0 {} ms ({} at 0, by {})",
                ms(latency),
                k + 1,
                fmt_ms(t.onset_to_local_ms),
                fmt_ms(t.local_to_api_ms),
                fmt_ms(t.local_to_last_ms),
                t.at_zero,
                t.actor
            );
            run.trials.push(t);
        }
        propagation.push(run);
    }
    ctx.api.set_latency(Duration::ZERO);

    let rollout = rollout(ctx).await;
    Ok(FleetSize {
        members: n,
        propagation,
        steady,
        rollout: Some(rollout),
    })
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |m| format!("{m:.1}"))
}

/// Re-arms the fleet at [`WEIGHT`], then fails the canary under traffic
/// through `m0` and times the revert's way through the fleet.
async fn trial(ctx: &Ctx<'_>) -> Result<Trial, FleetError> {
    let n = ctx.admins.len();
    ctx.canary.set(Behavior::default());
    // Re-arm: a new epoch through the last member's control API.
    let armed = Instant::now();
    let mut admin = Http::new(ctx.admins[n - 1]);
    let body = format!("{{\"canary\": {WEIGHT}}}");
    match admin.call(Method::PUT, "/weight", &body).await {
        Some((200, ..)) => {}
        other => {
            return Err(FleetError::Setup(format!(
                "PUT /weight on m{} answered {:?}",
                n - 1,
                other.map(|(s, b, _)| (s, String::from_utf8_lossy(&b).into_owned()))
            )))
        }
    }
    let back = weights_reach(&ctx.admins, WEIGHT, ctx.poll, armed + WAIT_DEADLINE, None).await;
    if back.iter().any(Option::is_none) {
        return Err(FleetError::Setup(format!(
            "after PUT /weight, not every member was back at {WEIGHT}% within {WAIT_DEADLINE:?}"
        )));
    }
    let rearm_ms = back.iter().flatten().max().map(|t| ms(*t - armed));
    let epoch = fleet_status(ctx.api)["epoch"].as_u64().unwrap_or(0);
    // A healthy baseline through m0 for its judge.
    traffic(
        ctx.proxies[0],
        FAILING_RPS,
        4,
        Arc::new(AtomicBool::new(false)),
        Instant::now() + Duration::from_secs(2),
        100,
    )
    .await;

    // The onset.
    ctx.canary.set(Behavior {
        status: Some(500),
        ..Behavior::default()
    });
    let onset = Instant::now();
    let deadline = onset + TRIAL_DEADLINE;
    let first = Arc::new(AtomicBool::new(false));
    let api = ctx.api;
    let in_api = async {
        while Instant::now() < deadline {
            let s = fleet_status(api);
            if s["latched"] == true && s["epoch"].as_u64() == Some(epoch) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    };
    let failing = traffic(
        ctx.proxies[0],
        FAILING_RPS,
        4,
        first.clone(),
        deadline,
        (FAILING_RPS * TRIAL_DEADLINE.as_secs_f64()) as u64,
    );
    let (at, api_at, sent) = tokio::join!(
        weights_reach(&ctx.admins, 0.0, ctx.poll, deadline, Some(first.clone())),
        in_api,
        failing
    );
    let local = at[0];
    let last = if at.iter().all(Option::is_some) {
        at.iter().flatten().max().copied()
    } else {
        None
    };
    let status = fleet_status(ctx.api);
    ctx.canary.set(Behavior::default());
    Ok(Trial {
        rearm_ms,
        onset_to_local_ms: since(local, Some(onset)),
        local_to_api_ms: since(api_at, local),
        local_to_last_ms: since(last, local),
        members_ms: at.iter().map(|t| since(*t, local)).collect(),
        at_zero: at.iter().flatten().count(),
        actor: status["actor"].as_str().unwrap_or("").to_string(),
        failing_requests: sent,
    })
}

/// `serin rollout --fleet` under light traffic through every member,
/// counting the API requests until the fleet is promoted.
async fn rollout(ctx: &Ctx<'_>) -> RolloutRun {
    eprintln!("  rollout: `serin rollout --steps {ROLLOUT_STEPS} --hold {ROLLOUT_HOLD} --fleet {FLEET}`, {ROLLOUT_RPS} req/s through each member");
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + ROLLOUT_DEADLINE;
    let mut load = tokio::task::JoinSet::new();
    for &proxy in &ctx.proxies {
        load.spawn(traffic(
            proxy,
            ROLLOUT_RPS,
            1,
            stop.clone(),
            deadline,
            (ROLLOUT_RPS * ROLLOUT_DEADLINE.as_secs_f64()) as u64,
        ));
    }
    let (before, rv) = (ctx.api.requests(), ctx.api.resource_version());
    let t0 = Instant::now();
    let cli = tokio::process::Command::new(ctx.serin)
        .args(["rollout", "--steps", ROLLOUT_STEPS, "--hold", ROLLOUT_HOLD])
        .args(["--fleet", FLEET])
        .env("KUBECONFIG", ctx.kubeconfig)
        .kill_on_drop(true)
        .output();
    let cli = tokio::time::timeout(Duration::from_secs(30), cli).await;
    let mut phase = String::new();
    match cli {
        Ok(Ok(out)) if out.status.success() => {
            while Instant::now() < deadline {
                phase = fleet_status(ctx.api)["phase"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if phase == "promoted" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Ok(out)) => {
            phase = format!(
                "CLI failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
        Ok(Err(e)) => phase = format!("CLI did not run: {e}"),
        Err(_) => phase = "CLI did not finish within 30 s".into(),
    }
    let window = ApiWindow::measure(ctx.api, &before, rv, t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    eprintln!(
        "  rollout: {phase} after {:.1} s; {:.0} requests/min, {:.2} writes per member per 10 s",
        window.seconds,
        window.per_minute(window.total()),
        window.writes_per_member_per_10s(ctx.admins.len())
    );
    RolloutRun {
        steps: ROLLOUT_STEPS.into(),
        hold: ROLLOUT_HOLD.into(),
        rps_per_member: ROLLOUT_RPS,
        promoted: phase == "promoted",
        final_phase: phase,
        window,
    }
}

/// Median and max of the figures some trials have.
pub fn median_max(values: impl Iterator<Item = Option<f64>>) -> Option<(f64, f64, usize)> {
    let v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return None;
    }
    let (m, _, hi) = spread(&v);
    Some((m, hi, v.len()))
}
