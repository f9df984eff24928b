//! Revert latency and blast radius: the real `serin` binary, with its judge
//! and control API, in front of two scripted upstreams. The canary gets 10%
//! of about 1,000 req/s; at a known instant it starts failing every request
//! (or, separately, answering 2 s late). We measure the time from that
//! instant to the canary's weight reaching 0 (polling `GET /status` every
//! 2 ms) and count the client responses that failed or were slow.
//!
//! Everything is on loopback and bounded in time; serin is stopped by PID.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::procs::{self, Guarded};

/// What the canary does after the onset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// Every request gets a 500.
    Errors,
    /// Every response comes 2 s late.
    Slow,
}

/// One scenario's outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RevertResult {
    /// Scenario label.
    pub name: String,
    /// Whether serin replays failed idempotent canary requests on stable.
    pub fallback: bool,
    /// Client request rate.
    pub rate: f64,
    /// Onset to the first `GET /status` showing canary weight 0, ms (2 ms polling).
    pub revert_ms: Option<f64>,
    /// The judge's reason for the revert.
    pub reason: String,
    /// Client responses that were not 2xx.
    pub failed: u64,
    /// Client responses slower than 1 s.
    pub slow: u64,
    /// Responses served by the canary after the onset (before the revert).
    pub canary_after_onset: u64,
    /// Client requests sent in the run.
    pub requests: u64,
}

const MODE_OK: u8 = 0;
const MODE_ERRORS: u8 = 1;
const MODE_SLOW: u8 = 2;

async fn upstream(listener: TcpListener, name: &'static str, mode: Arc<AtomicU8>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mode = mode.clone();
        tokio::task::spawn_local(async move {
            let service =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let m = mode.load(Ordering::Relaxed);
                    async move {
                        if m == MODE_SLOW {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let mut resp =
                            Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                        if m == MODE_ERRORS {
                            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the stable and canary upstreams on their own thread; returns their
/// addresses and the canary's mode switch.
fn start_upstreams() -> std::io::Result<(SocketAddr, SocketAddr, Arc<AtomicU8>)> {
    let stable = std::net::TcpListener::bind("127.0.0.1:0")?;
    let canary = std::net::TcpListener::bind("127.0.0.1:0")?;
    stable.set_nonblocking(true)?;
    canary.set_nonblocking(true)?;
    let addrs = (stable.local_addr()?, canary.local_addr()?);
    let mode = Arc::new(AtomicU8::new(MODE_OK));
    let canary_mode = mode.clone();
    std::thread::Builder::new()
        .name("fake-upstreams".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let s = TcpListener::from_std(stable).expect("listener");
                let c = TcpListener::from_std(canary).expect("listener");
                tokio::task::spawn_local(upstream(s, "stable", Arc::new(AtomicU8::new(MODE_OK))));
                upstream(c, "canary", canary_mode).await;
            });
        })?;
    Ok((addrs.0, addrs.1, mode))
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::task::spawn_local(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&bytes).into_owned()))
}

#[derive(Default)]
struct Tally {
    failed: u64,
    slow: u64,
    canary_after_onset: u64,
    requests: u64,
}

/// Runs one scenario: `warm` s of traffic, the onset, then up to `after` s.
async fn scenario(
    serin: SocketAddr,
    admin: SocketAddr,
    mode: Arc<AtomicU8>,
    fault: Fault,
    rate: f64,
) -> (Option<f64>, String, Tally) {
    let warm = Duration::from_secs(3);
    let after = Duration::from_secs(if fault == Fault::Slow { 12 } else { 6 });
    let tally = Rc::new(std::cell::RefCell::new(Tally::default()));
    let onset: Rc<std::cell::Cell<Option<Instant>>> = Rc::new(std::cell::Cell::new(None));
    let reverted: Rc<std::cell::Cell<Option<Instant>>> = Rc::new(std::cell::Cell::new(None));
    let start = Instant::now();
    let end = start + warm + after;
    // The client: an open-loop schedule over fresh tasks, one request each on
    // a pool of keep-alive connections.
    let mut senders = Vec::new();
    for _ in 0..64 {
        if let Ok(stream) = TcpStream::connect(serin).await {
            let _ = stream.set_nodelay(true);
            if let Ok((s, conn)) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
            {
                tokio::task::spawn_local(conn);
                senders.push(s);
            }
        }
    }
    let pool = Rc::new(std::cell::RefCell::new(senders));
    // The status poller.
    let poll = {
        let reverted = reverted.clone();
        let onset = onset.clone();
        tokio::task::spawn_local(async move {
            while Instant::now() < end {
                if onset.get().is_some() && reverted.get().is_none() {
                    if let Some((200, body)) = http(admin, "GET", "/status", "").await {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                        if v["canary_weight"].as_f64() == Some(0.0) {
                            reverted.set(Some(Instant::now()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut i = 0u64;
    let mut tasks = Vec::new();
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end {
            break;
        }
        if onset.get().is_none() && due >= start + warm {
            mode.store(
                if fault == Fault::Errors {
                    MODE_ERRORS
                } else {
                    MODE_SLOW
                },
                Ordering::Relaxed,
            );
            onset.set(Some(Instant::now()));
        }
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        i += 1;
        let pool = pool.clone();
        let tally = tally.clone();
        let onset = onset.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let sender = pool.borrow_mut().pop();
            let mut sender = match sender {
                Some(s) => s,
                None => {
                    let Ok(stream) = TcpStream::connect(serin).await else {
                        tally.borrow_mut().failed += 1;
                        return;
                    };
                    let _ = stream.set_nodelay(true);
                    let Ok((s, conn)) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                        TokioIo::new(stream),
                    )
                    .await
                    else {
                        tally.borrow_mut().failed += 1;
                        return;
                    };
                    tokio::task::spawn_local(conn);
                    s
                }
            };
            let sent = Instant::now();
            let req = Request::get("/")
                .header(HOST, serin.to_string())
                .body(Empty::<Bytes>::new())
                .expect("static request");
            let ok = async {
                sender.ready().await.ok()?;
                let resp = sender.send_request(req).await.ok()?;
                let status = resp.status();
                let canary = resp
                    .headers()
                    .get("x-serin-upstream")
                    .is_some_and(|v| v == "canary");
                resp.into_body().collect().await.ok()?;
                Some((status.is_success(), canary))
            }
            .await;
            let took = sent.elapsed();
            let mut t = tally.borrow_mut();
            t.requests += 1;
            match ok {
                Some((success, canary)) => {
                    if !success {
                        t.failed += 1;
                    }
                    if canary && onset.get().is_some_and(|o| sent >= o) {
                        t.canary_after_onset += 1;
                    }
                    drop(t);
                    pool.borrow_mut().push(sender);
                }
                None => t.failed += 1,
            }
            if took > Duration::from_secs(1) {
                tally.borrow_mut().slow += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = poll.await;
    let revert_ms = match (onset.get(), reverted.get()) {
        (Some(o), Some(r)) => Some(r.saturating_duration_since(o).as_secs_f64() * 1000.0),
        _ => None,
    };
    let reason = match http(admin, "GET", "/status", "").await {
        Some((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let t = Rc::try_unwrap(tally)
        .map(|c| c.into_inner())
        .unwrap_or_default();
    (revert_ms, reason, t)
}

fn start_serin(
    serin: &Path,
    dir: &Path,
    stable: SocketAddr,
    canary: SocketAddr,
    fallback: bool,
) -> std::io::Result<(Guarded, SocketAddr, SocketAddr)> {
    let ports = procs::free_ports(2)?;
    let listen = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let admin = SocketAddr::from(([127, 0, 0, 1], ports[1]));
    let state = dir.join(format!("state-{}-{}", ports[0], fallback));
    let config = dir.join(format!("serin-{}.toml", ports[0]));
    std::fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\nadmin = \"{admin}\"\nstate_dir = \"{}\"\ncanary_weight = 10.0\nworkers = 1\n\
             [stable]\nurl = \"http://{stable}\"\n[canary]\nurl = \"http://{canary}\"\n[split]\ncanary_fallback = {fallback}\n",
            state.display()
        ),
    )?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", crate::peers::PROXY_CORE])
        .arg(serin)
        .arg("run")
        .arg("--config")
        .arg(&config);
    let g = Guarded::spawn("serin", cmd, &dir.join(format!("serin-{}.log", ports[0])))?;
    if !procs::wait_http_ok(listen, Duration::from_secs(10)) {
        return Err(std::io::Error::other(format!(
            "serin did not answer on {listen}; see {}",
            dir.display()
        )));
    }
    Ok((g, listen, admin))
}

/// Runs the three scenarios (errors without and with stable fallback, then
/// 2 s latency) at `rate` client req/s with the canary at 10%.
pub fn run(serin: &Path, rate: f64) -> std::io::Result<Vec<RevertResult>> {
    let dir = std::env::temp_dir().join(format!("serin-bench-revert-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (stable, canary, mode) = start_upstreams()?;
    let mut out = Vec::new();
    for (name, fault, fallback) in [
        (
            "canary fails every request, no fallback",
            Fault::Errors,
            false,
        ),
        (
            "canary fails every request, stable fallback (default)",
            Fault::Errors,
            true,
        ),
        ("canary answers 2 s late", Fault::Slow, true),
    ] {
        mode.store(MODE_OK, Ordering::Relaxed);
        let (mut g, listen, admin) = start_serin(serin, &dir, stable, canary, fallback)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        let (revert_ms, reason, t) =
            local.block_on(&rt, scenario(listen, admin, mode.clone(), fault, rate));
        g.stop();
        let r = RevertResult {
            name: name.into(),
            fallback,
            rate,
            revert_ms,
            reason,
            failed: t.failed,
            slow: t.slow,
            canary_after_onset: t.canary_after_onset,
            requests: t.requests,
        };
        eprintln!(
            "revert: {name}: {} ms to weight 0, {} failed, {} slow (> 1 s) client responses, {} canary responses after onset; reason: {}",
            r.revert_ms.map(|m| format!("{m:.1}")).unwrap_or("no revert".into()),
            r.failed,
            r.slow,
            r.canary_after_onset,
            r.reason
        );
        out.push(r);
    }
    mode.store(MODE_OK, Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
