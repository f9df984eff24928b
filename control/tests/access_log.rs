//! `serin run --access-log stdout` end to end, with its standard output a
//! pipe: the way a container runtime or `serin run | fluent-bit` reads it.
//! A consumer that stops reading must never slow a request: lines are
//! dropped and counted instead, and every line that is written is valid
//! JSON and appears once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::join_all;
use serin_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `serin run` with the access log on standard output, which nobody reads
/// yet; its banner comes on standard error.
async fn spawn_logging_to_a_pipe(
    stable: &TestUpstream,
    state: &std::path::Path,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--stable", &stable.url(), "--canary", &stable.url()])
        .arg("--state-dir")
        .arg(state)
        .args(["--access-log", "stdout", "--log-format", "text"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr_after = |line: &str, prefix: &str| {
        line.strip_prefix(prefix)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
    };
    let (admin, proxy) = tokio::time::timeout(Duration::from_secs(30), async {
        let mut admin = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = addr_after(&line, "serin: control API listening on ") {
                admin = Some(a);
            }
            if let Some(a) = addr_after(&line, "serin: proxy listening on ") {
                return (admin.expect("the control API line comes first"), a);
            }
        }
        panic!("serin exited before listening");
    })
    .await
    .expect("serin listens within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, admin, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_costs_lines_never_requests() {
    const REQUESTS: u64 = 6_000;
    let stable = TestUpstream::start("stable").await;
    let state = temp_dir("access-log-pipe");
    let (mut child, admin, proxy) = spawn_logging_to_a_pipe(&stable, &state).await;

    // Nobody reads the pipe: once it and serin's queue are full, every
    // request must still be answered (a blocked worker would hang them all).
    let client = http1_client();
    let url = format!("http://{proxy}/");
    let mut ids = HashSet::new();
    for _ in 0..REQUESTS / 20 {
        let answers = join_all((0..20).map(|_| get(&client, &url, &[]))).await;
        for answer in answers {
            assert_eq!(answer.status, 200, "{answer:?}");
            ids.insert(answer.headers["x-request-id"].to_str().unwrap().to_owned());
        }
    }
    assert_eq!(ids.len() as u64, REQUESTS);
    let dropped = metric(admin, "serin_access_log_dropped_lines_total").await;
    assert!(dropped > 0, "the pipe held every line: send more requests");

    // Now the reader catches up: every line it reads is whole, valid JSON,
    // about one of the requests, and none comes twice.
    let stdout = child.stdout.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            seen.push(v["request_id"].as_str().unwrap().to_owned());
        }
        seen
    });
    eventually(
        Duration::from_secs(30),
        "every line is written or dropped",
        || async {
            let written = metric(admin, "serin_access_log_lines_total").await;
            let dropped = metric(admin, "serin_access_log_dropped_lines_total").await;
            written + dropped == REQUESTS
        },
    )
    .await;
    let written = metric(admin, "serin_access_log_lines_total").await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let seen = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("serin exits and closes its stdout")
        .unwrap();
    assert_eq!(
        seen.len() as u64,
        written,
        "every written line was read once"
    );
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no line twice");
    assert!(seen.iter().all(|id| ids.contains(id)));
    let _ = child.wait().await;
}
