//! `serin demo`: a self-contained tour on one machine, in about 30 seconds.
//!
//! It starts two small built-in upstreams (stable "v1" and canary "v2"), serin
//! itself with an embedded config, and a bounded traffic generator, all on
//! 127.0.0.1. It runs a progressive rollout; once the canary holds half the
//! traffic, the canary starts failing every request; the judge reverts it.
//! Along the way it shows, live, what serin sees and does, and at the end it
//! measures how fast the revert was and how many requests it cost.
//!
//! Everything it starts is stopped before it returns; it never sends traffic
//! anywhere but loopback, and every loop is bounded in time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::client::{render_status, stdout_is_tty};
use crate::config::{Config, Overrides};
use crate::Running;

/// The demo's serin config: a quick rollout so the tour fits in half a minute.
const DEMO_CONFIG: &str = r#"
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
log = "error"

[rollout]
steps = [5, 25, 50, 100]
hold = "3s"
min_requests_per_step = 30

[judge]
window = "10s"
"#;

/// Requests per second the traffic generator aims at.
const DEMO_RPS: u64 = 400;
/// The demo never runs longer than this.
const DEMO_LIMIT: Duration = Duration::from_secs(60);

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A local socket could not be opened.
    #[error("cannot start a demo upstream on 127.0.0.1: {0}")]
    Upstream(std::io::Error),
    /// serin itself could not start.
    #[error(transparent)]
    Serve(#[from] crate::ServeError),
    /// The embedded config did not validate (a bug).
    #[error("the demo's embedded config is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// A control call failed.
    #[error("control call failed: {0}")]
    Control(#[from] crate::ControllerError),
    /// The tour did not reach a step in time (a very busy machine?).
    #[error("the demo did not reach {0} within {DEMO_LIMIT:?}; is the machine very busy?")]
    Timeout(&'static str),
}

// === the built-in upstreams ===

struct DemoUpstream {
    addr: SocketAddr,
    broken: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DemoUpstream {
    async fn start(body: &'static str) -> Result<Self, DemoError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Upstream)?;
        let addr = listener.local_addr().map_err(DemoError::Upstream)?;
        let broken = Arc::new(AtomicBool::new(false));
        let flag = broken.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                            let broken = flag.load(Ordering::Relaxed);
                            async move {
                                let (status, text) = if broken {
                                    (
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "v2 crashed: nil pointer dereference\n",
                                    )
                                } else {
                                    (StatusCode::OK, body)
                                };
                                let mut resp =
                                    Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                                *resp.status_mut() = status;
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, broken, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// === the traffic generator ===

/// What clients saw.
#[derive(Default)]
struct Tally {
    stable: AtomicU64,
    canary: AtomicU64,
    /// Responses that were errors when they reached the client.
    client_errors: AtomicU64,
    /// Canary failures that serin replayed on stable (the client saw a 200).
    replayed: AtomicU64,
}

impl Tally {
    fn read(&self) -> [u64; 4] {
        [
            self.stable.load(Ordering::Relaxed),
            self.canary.load(Ordering::Relaxed),
            self.client_errors.load(Ordering::Relaxed),
            self.replayed.load(Ordering::Relaxed),
        ]
    }
}

/// Sends GETs to `proxy` at about `DEMO_RPS` from 4 keep-alive connections
/// until `stop` is set or the time limit passes.
async fn generate(proxy: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + DEMO_LIMIT;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (tally, stop) = (tally.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(4_000_000 / DEMO_RPS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(tcp) = tokio::net::TcpStream::connect(proxy).await else {
                    return;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tick.tick().await;
                    let req = Request::get("/checkout")
                        .header("host", "shop.local")
                        .body(Empty::<Bytes>::new())
                        .expect("valid request");
                    let Ok(resp) = sender.send_request(req).await else {
                        break;
                    };
                    let upstream = resp.headers().get("x-serin-upstream").cloned();
                    let replayed = resp.headers().contains_key("x-serin-fallback");
                    let failed = !resp.status().is_success();
                    let _ = resp.into_body().collect().await;
                    let counter = match upstream.as_ref().map(|v| v.as_bytes()) {
                        Some(b"canary") => &tally.canary,
                        _ => &tally.stable,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if failed {
                        tally.client_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if replayed {
                        tally.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

// === the tour ===

struct Screen {
    live: bool,
    start: Instant,
}

impl Screen {
    fn say(&self, text: &str) {
        let t = self.start.elapsed().as_secs_f64();
        if self.live {
            println!("\x1b[1m[{t:5.1}s]\x1b[0m {text}");
        } else {
            println!("[{t:5.1}s] {text}");
        }
    }
}

/// Runs the tour. `plain` turns off colour.
pub async fn run(plain: bool, state_dir: &Path) -> Result<(), DemoError> {
    let screen = Screen {
        live: !plain && stdout_is_tty(),
        start: Instant::now(),
    };
    println!("serin demo: a canary rollout that goes wrong, and serin putting it right.\n");
    let stable = DemoUpstream::start("v1: order placed\n").await?;
    let canary = DemoUpstream::start("v2: order placed (new checkout)\n").await?;
    let overrides = Overrides {
        stable: Some(stable.url()),
        canary: Some(canary.url()),
        state_dir: Some(state_dir.to_path_buf()),
        ..Overrides::default()
    };
    let config = Config::from_raw(
        Config::parse_toml(DEMO_CONFIG, Path::new("demo.toml"))?,
        &overrides,
    )?;
    let serin = Running::start(config).await?;
    let controller = serin.controller.clone();
    screen.say(&format!(
        "stable v1 on {}, canary v2 on {}; serin proxy on {}, control API on {}",
        stable.addr,
        canary.addr,
        serin.proxy.local_addr(),
        serin.admin_addr
    ));

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(generate(
        serin.proxy.local_addr(),
        tally.clone(),
        stop.clone(),
    ));
    screen.say(&format!(
        "clients send ~{DEMO_RPS} req/s through serin (GET /checkout)"
    ));

    controller.rollout(None, None, None).await?;
    screen
        .say("POST /rollout: steps 5% → 25% → 50% → 100%, hold 3s and 30 canary requests per step");

    // Watch the rollout climb to 50%.
    let deadline = Instant::now() + DEMO_LIMIT;
    let mut last_weight = -1.0;
    loop {
        let status = controller.status().await;
        let weight = status.rollout.canary_weight;
        if weight != last_weight {
            let [s, c, _, _] = tally.read();
            screen.say(&format!(
                "phase {} · canary at {weight}% · so far stable served {s}, canary {c}",
                status.rollout.phase.as_str()
            ));
            last_weight = weight;
        }
        if weight >= 50.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout("the 50% step"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Break the canary.
    let before = tally.read();
    let canary_before = controller.stats().totals(serin_proxy::Target::Canary);
    canary.broken.store(true, Ordering::SeqCst);
    let broke_at = Instant::now();
    screen.say("💥 v2 starts failing every request (HTTP 500)");
    let routes = controller.routes().clone();
    while routes.load().canary_weight_bp != 0 {
        if broke_at.elapsed() > Duration::from_secs(20) {
            return Err(DemoError::Timeout("the revert"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reverted_in = broke_at.elapsed();
    let canary_after = controller.stats().totals(serin_proxy::Target::Canary);
    let status = controller.status().await;
    screen.say(&format!(
        "judge reverted the canary to 0% {:.0} ms after it broke: {}",
        reverted_in.as_secs_f64() * 1000.0,
        status.rollout.reason
    ));

    // Let traffic flow a little longer on stable, then stop everything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.await;
    let after = tally.read();
    let failed_canary = canary_after.errors - canary_before.errors;

    println!("\n── what happened ──────────────────────────────────────────────");
    print!(
        "{}",
        render_status(
            &serde_json::to_value(controller.status().await).unwrap_or_default(),
            screen.live
        )
    );
    println!();
    println!(
        "revert latency        {:.0} ms from v2 breaking to weight 0, including the time for {failed_canary}",
        reverted_in.as_secs_f64() * 1000.0
    );
    println!("                      failures to arrive; the judge acts on its next 10 ms look");
    println!(
        "clients saw           {} errors: serin replayed {} failed GETs on stable",
        after[2] - before[2],
        after[3] - before[3]
    );
    println!(
        "requests served       {} by stable, {} by canary",
        after[0], after[1]
    );
    println!(
        "\nA Flagger-style loop (analysis every 60 s, 5 failed checks) would have sent ~{} failing",
        (DEMO_RPS as f64 * last_weight / 100.0 * 300.0) as u64
    );
    println!("requests to v2 before acting at this traffic.");
    println!("\nNext: put serin in front of your own service:");
    println!("  serin run --stable http://127.0.0.1:8081 --canary http://127.0.0.1:8082 --canary-weight 5");
    println!("  serin rollout           # 5% → 25% → 50% → 100%, judged all the way");
    println!("  serin status --watch");
    println!("See README.md for the config file, the control API and Kubernetes.");
    serin.shutdown().await;
    Ok(())
}
