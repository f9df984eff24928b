//! One measurement of one target: closed-loop throughput with the proxy's CPU
//! charged per request, open-loop corrected latency, memory with idle and
//! with 1,000 open client connections, and syscalls per request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::handshakes::HandshakeResult;
use crate::loadgen::OpenLoopResult;
use crate::peers::{Running, LOADGEN_CORE, PROXY_CORE};
use crate::procs::{self, CpuTime, Memory};
use crate::tools::{self, H2Bound};

/// One closed-loop run with the proxy's CPU accounting.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Errors seen by the load generator.
    pub errors: u64,
    /// Proxy user CPU per request, µs (0 for direct).
    pub user_us: f64,
    /// Proxy kernel CPU per request, µs.
    pub sys_us: f64,
    /// Upstream CPU per request, µs (the app's share of the proxy core).
    pub upstream_us: f64,
    /// Busy share of the proxy core, 0..1.
    pub proxy_core_busy: f64,
    /// Busy share of the load generator core, 0..1.
    pub loadgen_core_busy: f64,
}

impl Throughput {
    /// Proxy CPU per request, µs.
    pub fn cpu_us(&self) -> f64 {
        self.user_us + self.sys_us
    }

    /// What limited the run: the generator's core or the proxy's.
    pub fn bottleneck(&self) -> &'static str {
        if self.loadgen_core_busy >= 0.95 && self.proxy_core_busy >= 0.9 {
            "both cores"
        } else if self.loadgen_core_busy >= 0.95 {
            "load generator"
        } else if self.proxy_core_busy >= 0.9 {
            "proxy core"
        } else {
            "neither saturated"
        }
    }
}

/// The protocol of a closed-loop run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// wrk, HTTP/1.1 keep-alive.
    Http1,
    /// h2load, h2c prior knowledge.
    Http2,
}

/// Closed-loop max throughput, after a 1 s warm-up, charging the proxy's
/// process tree with its CPU time.
pub fn throughput(
    target: &Running,
    upstream_pids: &[u32],
    protocol: Protocol,
    duration: Duration,
    connections: u32,
) -> std::io::Result<Throughput> {
    let warm = Duration::from_secs(1);
    match protocol {
        Protocol::Http1 => tools::wrk(&target.url(), connections, warm)?,
        Protocol::Http2 => tools::h2load(&target.h2_url(), 16, 16, H2Bound::Duration(warm), false)?,
    };
    let pids = target.pids();
    let cpu0 = CpuTime::of(&pids);
    let up0 = CpuTime::of(upstream_pids);
    let j0 = procs::cpu_jiffies();
    let run = match protocol {
        Protocol::Http1 => tools::wrk(&target.url(), connections, duration)?,
        Protocol::Http2 => {
            tools::h2load(&target.h2_url(), 16, 16, H2Bound::Duration(duration), false)?
        }
    };
    let j1 = procs::cpu_jiffies();
    let cpu = CpuTime::of(&pids).since(cpu0);
    let up = CpuTime::of(upstream_pids).since(up0);
    let busy = procs::cpu_busy(&j0, &j1);
    let n = run.requests.max(1) as f64;
    Ok(Throughput {
        requests: run.requests,
        rps: run.rps,
        errors: run.errors,
        user_us: cpu.user * 1e6 / n,
        sys_us: cpu.sys * 1e6 / n,
        upstream_us: (up.user + up.sys) * 1e6 / n,
        proxy_core_busy: procs::core_busy(&busy, PROXY_CORE),
        loadgen_core_busy: procs::core_busy(&busy, LOADGEN_CORE),
    })
}

/// Runs the open-loop generator (`serin-bench openloop`) in its own process
/// on the load generator core; with `tls` it speaks TLS to `addr`.
pub fn open_loop(
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    connections: usize,
    tls: bool,
) -> std::io::Result<OpenLoopResult> {
    let mut args = vec!["--rate".to_string(), format!("{rate}")];
    if tls {
        args.push("--tls".into());
    }
    generator("openloop", addr, duration, connections, &args)
}

/// Runs the TLS handshake generator (`serin-bench handshakes`) in its own
/// process on the load generator core: new connections to `addr` for
/// `duration`, full handshakes or, with `resume`, resumed ones.
pub fn handshakes(
    addr: SocketAddr,
    resume: bool,
    duration: Duration,
    connections: usize,
) -> std::io::Result<HandshakeResult> {
    let args = if resume {
        vec!["--resume".to_string()]
    } else {
        Vec::new()
    };
    generator("handshakes", addr, duration, connections, &args)
}

/// Runs `serin-bench SUBCOMMAND --addr --duration-ms --connections ARGS`
/// pinned to the load generator core and reads the one JSON result it prints.
fn generator<T: serde::de::DeserializeOwned>(
    subcommand: &str,
    addr: SocketAddr,
    duration: Duration,
    connections: usize,
    args: &[String],
) -> std::io::Result<T> {
    // This very binary, even if a build has replaced the file meanwhile
    // (`cargo bench` rebuilds it): the kernel keeps the running image.
    let exe = format!("/proc/{}/exe", std::process::id());
    let out = Command::new("timeout")
        .args(["-s", "KILL"])
        .arg(format!("{}", duration.as_secs() + 30))
        .args(["taskset", "-c", LOADGEN_CORE])
        .arg(exe)
        .arg(subcommand)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--duration-ms")
        .arg(duration.as_millis().to_string())
        .arg("--connections")
        .arg(connections.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        std::io::Error::other(format!(
            "`serin-bench {subcommand}` failed ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// Memory of the target with `n` client connections open, each having made
/// one request (so the proxy has set up its per-connection state).
pub fn memory_with_connections(target: &Running, n: usize) -> std::io::Result<Memory> {
    let mut conns = Vec::with_capacity(n);
    let req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut buf = [0u8; 1024];
    for _ in 0..n {
        let mut s = TcpStream::connect_timeout(&target.h1, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(req)?;
        let _ = s.read(&mut buf)?;
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let m = Memory::of(&target.pids());
    drop(conns);
    Ok(m)
}

/// Syscalls the proxy makes per proxied request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Syscalls {
    /// All syscalls per request (perf's `raw_syscalls:sys_enter`, or strace).
    pub per_request: f64,
    /// The most frequent syscalls per request (from `strace -c`).
    pub top: Vec<(String, f64)>,
    /// Which tool counted.
    pub counted_by: String,
}

/// Counts the proxy's syscalls over a fixed number of keep-alive requests,
/// with perf (low overhead) and strace -c (the breakdown; slower, so over
/// fewer requests): HTTP/1.1 from `h2load --h1 -c32`, or with `h2` h2c
/// from `h2load -c16 -m16`, as the closed loop sends them.
pub fn syscalls(target: &Running, perf: bool, strace: bool, h2: bool) -> std::io::Result<Syscalls> {
    let load = |n: u64| {
        // nginx and haproxy take h2c on a port of its own.
        let (url, connections, streams) = if h2 {
            (target.h2_url(), 16, 16)
        } else {
            (target.url(), 32, 1)
        };
        tools::h2load(&url, connections, streams, H2Bound::Requests(n), !h2)
    };
    let tids: Vec<u32> = target
        .pids()
        .iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        })
        .collect();
    let tid_list = tids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut out = Syscalls::default();
    if perf {
        let n = 100_000u64;
        let dir = std::env::temp_dir().join(format!("serin-bench-perf-{}", std::process::id()));
        let mut counter = procs::Guarded::spawn(
            "perf stat",
            {
                let mut c = Command::new("perf");
                c.args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-t"])
                    .arg(&tid_list);
                c
            },
            &dir,
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let run = load(n)?;
        std::thread::sleep(Duration::from_millis(100));
        procs::signal(counter.pid(), "INT");
        std::thread::sleep(Duration::from_millis(300));
        counter.stop();
        let text = std::fs::read_to_string(&dir).unwrap_or_default();
        let _ = std::fs::remove_file(&dir);
        if let Some(count) = text
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            out.per_request = count / run.requests.max(1) as f64;
            out.counted_by = format!("perf stat -e raw_syscalls:sys_enter over {n} requests");
        }
    }
    if strace {
        let n = 20_000u64;
        let file = std::env::temp_dir().join(format!("serin-bench-strace-{}", std::process::id()));
        let log =
            std::env::temp_dir().join(format!("serin-bench-strace-log-{}", std::process::id()));
        let mut c = Command::new("strace");
        c.args(["-c", "-f", "-o"]).arg(&file);
        for t in &tids {
            c.arg("-p").arg(t.to_string());
        }
        let mut tracer = procs::Guarded::spawn("strace", c, &log)?;
        std::thread::sleep(Duration::from_millis(800));
        let run = load(n)?;
        procs::signal(tracer.pid(), "INT");
        std::thread::sleep(Duration::from_millis(500));
        tracer.stop();
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&log);
        let per = |calls: f64| calls / run.requests.max(1) as f64;
        let mut top = Vec::new();
        let mut total = None;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
                let name = f[f.len() - 1].to_string();
                let calls = f[3].parse::<f64>().unwrap_or(0.0);
                if name == "total" {
                    total = Some(per(calls));
                } else {
                    top.push((name, per(calls)));
                }
            }
        }
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(6);
        out.top = top;
        if out.counted_by.is_empty() {
            if let Some(t) = total {
                out.per_request = t;
                out.counted_by = format!("strace -c -f over {n} requests");
            }
        }
    }
    Ok(out)
}
