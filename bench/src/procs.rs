//! Processes and their accounting: start a peer pinned to a core, stop it by
//! PID however the run ends (a `Drop` guard), and read what the kernel
//! charged it (`/proc/PID/stat`, `smaps_rollup`, `/proc/stat`).
//!
//! Never kills by name: only the PIDs this run started, and their children.

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Kernel clock ticks per second for `/proc/PID/stat` times (`getconf CLK_TCK`).
pub const CLOCK_TICKS: f64 = 100.0;

// === impl Guarded ===

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Guarded {
    name: String,
    child: Option<Child>,
}

impl Guarded {
    /// Starts `cmd` with its output sent to `log` (a file path).
    pub fn spawn(name: &str, mut cmd: Command, log: &std::path::Path) -> io::Result<Self> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn()?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// The PID of the started process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The process and all its descendants (nginx's workers, for example).
    pub fn tree(&self) -> Vec<u32> {
        tree(self.pid())
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the process tree: SIGTERM to the PID, up to 3 s to exit, then
    /// SIGKILL to every PID of the tree that is left.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pids = tree(child.id());
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        for pid in pids.iter().rev() {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() && *pid != child.id() {
                signal(*pid, "KILL");
            }
        }
        if let Ok(None) = child.try_wait() {
            eprintln!(
                "  {} (pid {}) ignored SIGTERM; killing",
                self.name,
                child.id()
            );
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a signal to one PID with `kill(1)`.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// === /proc readers ===

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The PID and its descendants, parents first.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(f) = stat_fields(pid) {
                if let Ok(ppid) = f[1].parse::<u32>() {
                    parent_of.push((pid, ppid));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// User and system CPU time charged so far, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    /// User-space seconds.
    pub user: f64,
    /// Kernel seconds.
    pub sys: f64,
}

impl CpuTime {
    /// The CPU time of these processes (all their threads), summed.
    pub fn of(pids: &[u32]) -> Self {
        let mut t = Self::default();
        for pid in pids {
            if let Some(f) = stat_fields(*pid) {
                t.user += f[11].parse::<f64>().unwrap_or(0.0) / CLOCK_TICKS;
                t.sys += f[12].parse::<f64>().unwrap_or(0.0) / CLOCK_TICKS;
            }
        }
        t
    }

    /// `self - earlier`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }
}

/// Memory of a process tree, in KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// Sum of `VmRSS` (pages shared between processes counted in each).
    pub rss_kib: u64,
    /// Sum of `Pss` (shared pages split between the processes sharing them).
    pub pss_kib: u64,
}

impl Memory {
    /// Reads `VmRSS` and `Pss` of each PID.
    pub fn of(pids: &[u32]) -> Self {
        let mut m = Self::default();
        for pid in pids {
            m.rss_kib += kib_field(&format!("/proc/{pid}/status"), "VmRSS:");
            m.pss_kib += kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
        }
        m
    }
}

fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Busy and total jiffies of each CPU, from `/proc/stat`.
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Stolen and total jiffies of the whole machine, from `/proc/stat`'s `cpu`
/// line. Steal is time a virtual CPU was ready to run but the hypervisor ran
/// something else: on a VM it, not the program under test, sets latency tails.
pub fn steal_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (v.get(7).copied().unwrap_or(0), v.iter().take(8).sum())
}

/// Share of time (0..1) each CPU was busy between two [`cpu_jiffies`] readings.
pub fn cpu_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((b0, t0), (b1, t1))| {
            let dt = t1.saturating_sub(*t0).max(1) as f64;
            b1.saturating_sub(*b0) as f64 / dt
        })
        .collect()
}

/// Core `core`'s (a `taskset` core number) share in a [`cpu_busy`] result.
pub fn core_busy(busy: &[f64], core: &str) -> f64 {
    core.parse::<usize>()
        .ok()
        .and_then(|i| busy.get(i).copied())
        .unwrap_or(0.0)
}

// === ports and readiness ===

/// `n` distinct free loopback ports (bound to :0, then released).
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Waits until `addr` answers a plain HTTP/1.1 GET with a 200, up to `timeout`.
pub fn wait_http_ok(addr: SocketAddr, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
            let mut buf = [0u8; 512];
            if s.write_all(req).is_ok() {
                if let Ok(n) = s.read(&mut buf) {
                    if buf[..n].starts_with(b"HTTP/1.1 200") {
                        return true;
                    }
                }
            }
        }
        sleep(Duration::from_millis(50));
    }
    false
}

/// POSTs the JSON `body` to `path` at `addr` (a control API); the answer's
/// status line and body, or what went wrong.
pub fn post_json(addr: SocketAddr, path: &str, body: &str) -> String {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, &request).unwrap_or_else(|e| format!("no answer: {e}"))
}

/// GETs `path` at `addr` (a control API); the answer's body, or an empty
/// string when there was none.
pub fn get_text(addr: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    exchange(addr, &request)
        .ok()
        .and_then(|answer| Some(answer.split_once("\r\n\r\n")?.1.to_owned()))
        .unwrap_or_default()
}

/// Sends `request` on a new connection to `addr` and reads the whole answer.
fn exchange(addr: SocketAddr, request: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Moves every thread of `pids` to the idle scheduling class (`chrt
/// --all-tasks --idle`), where they run only when their core has nothing
/// else to run and a waking process preempts them at once; or, with `idle`
/// false, back to the normal one.
pub fn idle_priority(pids: &[u32], idle: bool) -> io::Result<()> {
    let class = if idle { "--idle" } else { "--other" };
    for pid in pids {
        let status = Command::new("chrt")
            .args(["--all-tasks", class, "--pid", "0", &pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "chrt {class} for PID {pid}: {status}"
            )));
        }
    }
    Ok(())
}

/// Waits until `addr` accepts a TCP connection, up to `timeout` (for a
/// server that speaks TLS, which [`wait_http_ok`] cannot ask).
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    false
}

// === a quiet machine ===

/// Waits until no `rustc`/`cargo` (other than this process's own ancestors,
/// e.g. the `cargo run` that started it) is running and no other user's
/// process is using more than 5% of a core, so that nothing else competes
/// for the two cores. Returns how long it waited: zero when the first look
/// (half a second of sampling) finds the machine quiet, which is not waiting.
pub fn wait_for_quiet(limit: Duration) -> Duration {
    let start = Instant::now();
    let mut told = false;
    loop {
        let busy = machine_busy(Duration::from_millis(500));
        if busy.is_empty() {
            if !told {
                return Duration::ZERO;
            }
            eprintln!("  machine quiet again; measuring");
            return start.elapsed();
        }
        if start.elapsed() > limit {
            eprintln!(
                "  still compiling after {:?} ({}); measuring anyway, the report says so",
                limit,
                busy.join(", ")
            );
            return start.elapsed();
        }
        if !told {
            eprintln!(
                "  waiting: other builds or busy processes ({}); benchmarks only run on a quiet machine",
                busy.join(", ")
            );
            told = true;
        }
        sleep(Duration::from_secs(3));
    }
}

fn ancestors() -> HashSet<u32> {
    let mut out = HashSet::new();
    let mut pid = std::process::id();
    while pid > 1 && out.insert(pid) {
        pid = stat_fields(pid)
            .and_then(|f| f[1].parse().ok())
            .unwrap_or(0);
    }
    out
}

/// CPU ticks, name and parent of every process now.
fn process_table() -> Vec<(u32, u32, u64, String)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
                continue;
            };
            let comm = text[open + 1..close].to_string();
            let f: Vec<&str> = text[close + 2..].split_whitespace().collect();
            if f.len() < 13 {
                continue;
            }
            let ppid = f[1].parse().unwrap_or(0);
            let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            out.push((pid, ppid, ticks, comm));
        }
    }
    out
}

/// PIDs that are this run's own: its ancestors, itself and its descendants
/// (proxies, upstream, load generators), and kernel threads (which carry the
/// loopback traffic).
fn own_pids(table: &[(u32, u32, u64, String)]) -> HashSet<u32> {
    let mut own = ancestors();
    own.insert(2);
    let me = std::process::id();
    let mut frontier = vec![me];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, _, _) in table {
            if *ppid == p && own.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    for (pid, ppid, _, _) in table {
        if *ppid == 2 {
            own.insert(*pid);
        }
    }
    own
}

/// Processes of other users of the machine that used more than 5% of a core
/// between two process tables taken `interval` apart.
fn foreign_busy(
    before: &[(u32, u32, u64, String)],
    after: &[(u32, u32, u64, String)],
    interval: Duration,
) -> Vec<String> {
    let own = own_pids(after);
    let limit = (interval.as_secs_f64() * CLOCK_TICKS * 0.05).max(1.0) as u64;
    after
        .iter()
        .filter(|(pid, ..)| !own.contains(pid))
        .filter_map(|(pid, _, ticks, comm)| {
            let prev = before
                .iter()
                .find(|(p, ..)| p == pid)
                .map(|(_, _, t, _)| *t)
                .unwrap_or(0);
            (ticks.saturating_sub(prev) > limit).then(|| format!("{comm} {pid}"))
        })
        .collect()
}

/// Builds, or any other user's process that is using CPU, over the next `interval`.
fn machine_busy(interval: Duration) -> Vec<String> {
    let before = process_table();
    sleep(interval);
    let after = process_table();
    let mut busy = compilers_running();
    busy.extend(foreign_busy(&before, &after, interval));
    busy.sort();
    busy.dedup();
    busy
}

/// `rustc`/`cargo`/linker processes running now, other than this process's ancestors.
pub fn compilers_running() -> Vec<String> {
    let mine = ancestors();
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if mine.contains(&pid) {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if matches!(
                comm,
                "rustc" | "cargo" | "cc1" | "cc1plus" | "ld" | "rust-lld"
            ) {
                out.push(format!("{comm} {pid}"));
            }
        }
    }
    out
}

// === impl BuildWatch ===

/// Tells whether the machine got busy while a measurement ran: builds still
/// running at its end, or other users' processes that used more than 5% of a
/// core over it. It reads `/proc` only at the start and the end, so it costs
/// nothing while the measurement runs.
pub struct BuildWatch {
    before: Vec<(u32, u32, u64, String)>,
    started: Instant,
}

impl BuildWatch {
    /// Starts watching.
    pub fn start() -> Self {
        Self {
            before: process_table(),
            started: Instant::now(),
        }
    }

    /// Stops watching; returns what disturbed the run (empty: undisturbed).
    pub fn finish(self) -> Vec<String> {
        let after = process_table();
        let mut seen = compilers_running();
        seen.extend(foreign_busy(&self.before, &after, self.started.elapsed()));
        seen.sort();
        seen.dedup();
        seen
    }
}

/// Pins this process (all its threads) to `core`, so the harness's own work
/// stays off the proxy core. Children started later inherit it unless they
/// pin themselves.
pub fn pin_self(core: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", core])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
