//! The moment between binding the proxy and loading the saved state.
//!
//! `serin run` binds its listeners first, so a bad address fails before
//! anything else, and loads the saved rollout after. A request that arrives
//! in between must not reach a canary the saved state has rolled back, not
//! even one that asks for it with `x-serin-canary: always`; and the control
//! API must say it is alive but not ready. The test holds that moment open
//! deterministically: the state file is a named pipe, and serin's read of it
//! waits until the test writes the saved state into it.

use std::path::Path;
use std::time::Duration;

use serin_control::config::{Config, Overrides};
use serin_control::store::STATE_FILE;
use serin_control::Running;
use serin_tests::{raw_exchange, temp_dir, TestUpstream};

/// Failure bound for every wait here; never a pause.
const WAIT: Duration = Duration::from_secs(10);

/// A request that asks for the canary.
const ALWAYS: &[u8] =
    b"GET / HTTP/1.1\r\nHost: app\r\nx-serin-canary: always\r\nConnection: close\r\n\r\n";

fn config(
    state: &Path,
    listen: &str,
    admin: &str,
    stable: &TestUpstream,
    canary: &TestUpstream,
) -> Config {
    let text = format!(
        "listen = \"{listen}\"\nadmin = \"{admin}\"\nstate_dir = '{}'\n\
         stable.url = \"{}\"\ncanary.url = \"{}\"\ncanary_weight = 50\n",
        state.display(),
        stable.url(),
        canary.url(),
    );
    let raw = Config::parse_toml(&text, Path::new("startup.toml")).expect("TOML");
    Config::from_raw(raw, &Overrides::default()).expect("valid config")
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
const READYZ: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
const STATUS: &[u8] = b"GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";

/// An address on loopback that nothing listens on right now.
fn free_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_canary_is_unreachable_while_the_saved_state_loads() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;

    // A saved state that says the canary was rolled back.
    let first = temp_dir("startup-saved");
    let running = Running::start(config(
        &first,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &stable,
        &canary,
    ))
    .await
    .expect("serin starts");
    running.controller.rollback().await.expect("rollback");
    running.shutdown().await;
    let saved = std::fs::read(first.join(STATE_FILE)).expect("state saved");

    // The next start reads it from a pipe that stays empty until the test
    // has sent its requests.
    let state = temp_dir("startup-fifo");
    let fifo = state.join(STATE_FILE);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
    let (listen, admin) = (free_addr(), free_addr());
    let starting = Running::start(config(&state, &listen, &admin, &stable, &canary));
    // The probe never panics while serin waits on the pipe: a failed test
    // must still let the load finish, or the runtime would wait for it.
    let probe = async {
        let addr = listen.parse().unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut answers = Vec::new();
        while answers.is_empty() && tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                for _ in 0..5 {
                    answers.push(raw_exchange(addr, ALWAYS).await);
                }
                let admin = admin.parse().unwrap();
                for probe in [HEALTHZ, READYZ, STATUS] {
                    answers.push(raw_exchange(admin, probe).await);
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Now let the load finish.
        let written = tokio::fs::write(&fifo, &saved).await;
        (answers, written)
    };
    let (running, (answers, written)) = tokio::join!(starting, probe);
    written.expect("write the saved state into the pipe");
    let running = running.expect("serin starts with the saved state");
    assert_eq!(answers.len(), 8, "the proxy never accepted a connection");
    for answer in &answers[..5] {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("x-serin-upstream: stable"), "{answer}");
    }
    let [healthz, readyz, status] = &answers[5..] else {
        unreachable!()
    };
    assert!(
        healthz.starts_with("HTTP/1.1 200"),
        "alive while loading: {healthz}"
    );
    assert!(
        readyz.starts_with("HTTP/1.1 503"),
        "not ready while loading: {readyz}"
    );
    assert!(
        status.starts_with("HTTP/1.1 503"),
        "status while loading: {status}"
    );
    let ready = raw_exchange(admin.parse().unwrap(), READYZ).await;
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "ready once loaded: {ready}"
    );
    assert_eq!(
        canary.requests(),
        0,
        "the canary was reached during start-up"
    );

    let status = running.controller.status().await;
    assert_eq!(status.rollout.phase.as_str(), "rolled_back");
    let addr = running.proxy.local_addr();
    let answer = raw_exchange(addr, ALWAYS).await;
    assert!(answer.contains("x-serin-upstream: stable"), "{answer}");
    assert_eq!(canary.requests(), 0);
    running.shutdown().await;
}
