//! The `serin` binary as a user runs it: config errors, `serin check`, TLS
//! (a renewed certificate; client certificates, with curl and openssl
//! s_client), and a SIGTERM that drains in-flight requests before exiting 0.

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serin_tests::*;

fn serin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_serin"))
}

#[test]
fn invalid_config_exits_non_zero_naming_the_key_before_binding() {
    let dir = temp_dir("badconfig");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listen.local_addr().unwrap();
    drop(listen);
    let file = dir.join("serin.toml");
    std::fs::write(
        &file,
        format!("listen = \"{addr}\"\n[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n[judge]\nmax_error_rate = 5\n"),
    )
    .unwrap();
    fails_with(
        serin().args(["run", "--config"]).arg(&file),
        "judge.max_error_rate",
    );
    fails_with(
        serin().args(["run", "--config"]).arg(&file),
        "write 0.05 for 5%",
    );
    // Nothing was bound: the address is still free.
    std::net::TcpListener::bind(addr).expect("serin bound the port before failing");
    fails_with(
        serin().args(["check", "--config"]).arg(&file),
        "judge.max_error_rate",
    );

    // Unknown keys are named.
    std::fs::write(&file, "[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n[judge]\nmax_eror_rate = 0.1\n").unwrap();
    fails_with(
        serin().args(["check", "--config"]).arg(&file),
        "max_eror_rate",
    );

    // The window judge's keys: `confidence` is refused with what to write
    // instead; `max_p95_ratio` still works, as `min_latency_shift`.
    let upstreams =
        "[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n";
    std::fs::write(
        &file,
        format!("{upstreams}[judge]\nconfidence = 0.999999\n"),
    )
    .unwrap();
    fails_with(
        serin().args(["check", "--config"]).arg(&file),
        "`judge.alpha` per step (default 0.002)",
    );
    std::fs::write(&file, format!("{upstreams}[judge]\nmax_p95_ratio = 1.5\n")).unwrap();
    check_passes(&file);

    // The overload limits' errors name their key too.
    for (section, key) in [
        (
            "[rate_limit]\nrequests_per_second = 0\n",
            "rate_limit.requests_per_second",
        ),
        (
            "[rate_limit]\nrequests_per_second = 5\nburst = 0\n",
            "rate_limit.burst",
        ),
        (
            "[rate_limit]\nrequests_per_second = 5\nkey = \"ip\"\n",
            "rate_limit.key",
        ),
        (
            "[rate_limit]\nrequests_per_second = 5\nmax_keys = 0\n",
            "rate_limit.max_keys",
        ),
        ("canary.max_concurrent = 0\n", "canary.max_concurrent"),
    ] {
        std::fs::write(
            &file,
            format!("stable.url = \"http://127.0.0.1:1\"\ncanary.url = \"http://127.0.0.1:2\"\n{section}"),
        )
        .unwrap();
        fails_with(serin().args(["check", "--config"]).arg(&file), key);
    }

    fails_with(
        serin()
            .args(["run", "--canary", "http://127.0.0.1:2"])
            .env_remove("SERIN_STABLE"),
        "stable.url",
    );
}

/// Runs the command and asserts it exits 2 with `text` on stderr.
/// Runs `command` and asserts that it succeeds.
fn succeeds(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `serin check` on `file`, which must pass; its standard output.
fn check_passes(file: &std::path::Path) -> String {
    let out = serin()
        .args(["check", "--config"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(command: &mut Command, text: &str) {
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{command:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(text),
        "{command:?}: expected {text:?} in {err}"
    );
}

#[test]
fn check_accepts_a_good_config_and_env_overrides_the_file() {
    let dir = temp_dir("goodconfig");
    let file = dir.join("serin.toml");
    std::fs::write(&file, "canary_weight = 10\n[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n").unwrap();
    assert!(check_passes(&file).contains("at 10%"));
    // An environment variable beats the file; a flag beats both.
    let out = serin()
        .args(["run", "--config"])
        .arg(&file)
        .env("SERIN_CANARY_WEIGHT", "250")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`canary_weight`"),
        "SERIN_CANARY_WEIGHT was applied"
    );
}

#[test]
fn check_loads_the_tls_files_and_names_the_bad_one() {
    let (cert, other) = (TestCert::generate(), TestCert::generate());
    let dir = temp_dir("tlsconfig");
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let check = |cert: &std::path::Path, key: &std::path::Path| {
        let file = dir.join("serin.toml");
        std::fs::write(
            &file,
            format!(
                "[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n\
                 [tls]\ncert = {cert:?}\nkey = {key:?}\nreload_interval = \"2s\"\n"
            ),
        )
        .unwrap();
        let mut command = serin();
        command.args(["check", "--config"]).arg(file);
        command
    };
    succeeds(&mut check(&cert.cert_path, &cert.key_path));
    fails_with(
        &mut check(&broken, &cert.key_path),
        &format!(
            "cannot read TLS certificate chain from {}: no \"-----END CERTIFICATE-----\" line",
            broken.display()
        ),
    );
    fails_with(
        &mut check(&cert.cert_path, &dir.join("missing.pem")),
        "missing.pem",
    );
    fails_with(
        &mut check(&cert.cert_path, &other.key_path),
        "do not work together",
    );
}

/// What a `serin run` of these tests runs with: two test upstreams and a
/// state directory, kept until the test ends.
type RunsWith = (TestUpstream, TestUpstream, TempDir);

/// `serin run` with `extra` arguments in front of two test upstreams.
async fn run_serin(extra: &[&str]) -> (SerinProcess, RunsWith) {
    let (stable, canary) = (
        TestUpstream::start("stable").await,
        TestUpstream::start("canary").await,
    );
    let state = temp_dir("run-state");
    let serin =
        SerinProcess::run(env!("CARGO_BIN_EXE_serin"), &stable, &canary, &state, extra).await;
    (serin, (stable, canary, state))
}

/// `serin run --config file` in front of two test upstreams.
async fn run_with_config(file: &std::path::Path) -> (SerinProcess, RunsWith) {
    run_serin(&["--config", file.to_str().unwrap()]).await
}

#[test]
fn check_loads_the_client_ca_and_names_it_when_it_is_bad() {
    let (cert, clients) = (TestCert::generate(), TestCa::new("clients"));
    let dir = temp_dir("mtlsconfig");
    let broken = dir.join("broken-ca.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let check = |client: &str| {
        let file = dir.join("serin.toml");
        std::fs::write(
            &file,
            format!(
                "[stable]\nurl = \"http://127.0.0.1:1\"\n[canary]\nurl = \"http://127.0.0.1:2\"\n\
                 [tls]\ncert = {:?}\nkey = {:?}\n{client}",
                cert.cert_path, cert.key_path
            ),
        )
        .unwrap();
        let mut command = serin();
        command.args(["check", "--config"]).arg(file);
        command
    };
    let good = format!(
        "client_ca = {:?}\nclient_auth = \"optional\"\n",
        clients.cert_path
    );
    succeeds(&mut check(&good));
    fails_with(
        &mut check(&format!("client_ca = {broken:?}\n")),
        &format!(
            "cannot read the client CA bundle (tls.client_ca) from {}: no \"-----END CERTIFICATE-----\" line",
            broken.display()
        ),
    );
    fails_with(
        &mut check(&format!("client_ca = {:?}\n", cert.key_path)),
        &format!(
            "(tls.client_ca) from {}: no certificate found",
            cert.key_path.display()
        ),
    );
    fails_with(
        &mut check(&format!("client_ca = {:?}\n", dir.join("missing.pem"))),
        "missing.pem",
    );
    fails_with(
        &mut check("client_auth = \"required\"\n"),
        "`tls.client_auth` is set without tls.client_ca",
    );
}

/// `serin run` with client certificates, as curl and openssl talk to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_client_certificates_serves_curl_and_openssl_a_verified_identity() {
    let (server_ca, clients) = (TestCa::new("server CA"), TestCa::new("clients"));
    let server = server_ca.server(&["localhost", "127.0.0.1"]);
    let spiffe = "spiffe://cluster.local/ns/a/sa/b";
    let client = clients.client(spiffe);
    let dir = temp_dir("mtlsrun");
    let file = dir.join("serin.toml");
    std::fs::write(
        &file,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             identity_header = \"x-client-identity\"\n",
            server.cert_path, server.key_path, clients.cert_path
        ),
    )
    .unwrap();
    let (serin, _upstreams) = run_with_config(&file).await;
    let url = format!("https://127.0.0.1:{}/echo-headers", serin.proxy.port());
    let curl = |with_cert: bool| {
        let mut curl = tokio::process::Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&server_ca.cert_path)
            .args(["-H", "x-client-identity: forged", &url]);
        if with_cert {
            curl.arg("--cert")
                .arg(&client.cert_path)
                .arg("--key")
                .arg(&client.key_path);
        }
        curl.output()
    };
    let out = curl(true).await.expect("curl is installed");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identities: Vec<_> = body
        .lines()
        .filter(|l| l.starts_with("x-client-identity:"))
        .collect();
    assert_eq!(
        identities,
        [format!("x-client-identity: {spiffe}")],
        "{body}"
    );
    let out = curl(false).await.unwrap();
    assert!(!out.status.success(), "served without a client certificate");

    // openssl s_client: the same request with the certificate, and a
    // handshake without one that the server ends.
    let s_client = |with_cert: bool| {
        let mut openssl = tokio::process::Command::new("openssl");
        openssl
            .args([
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-servername",
                "localhost",
            ])
            .args(["-connect", &serin.proxy.to_string(), "-CAfile"])
            .arg(&server_ca.cert_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if with_cert {
            openssl
                .arg("-cert")
                .arg(&client.cert_path)
                .arg("-key")
                .arg(&client.key_path);
        }
        let mut child = openssl.spawn().expect("openssl is installed");
        let mut stdin = child.stdin.take().unwrap();
        async move {
            use tokio::io::AsyncWriteExt;
            let request = "GET /echo-headers HTTP/1.1\r\nHost: localhost\r\n\
                           x-client-identity: forged\r\nConnection: close\r\n\r\n";
            // A refused handshake may close the pipe first.
            let _ = stdin.write_all(request.as_bytes()).await;
            drop(stdin);
            tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .expect("openssl s_client finished")
                .unwrap()
        }
    };
    let out = s_client(true).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("x-client-identity: {spiffe}\n")),
        "{text}"
    );
    assert!(!text.contains("forged"), "{text}");
    let out = s_client(false).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("HTTP/1.1 200"),
        "served without a certificate: {text}"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("certificate required"), "{said}");
}

#[test]
fn check_loads_an_https_upstreams_files_and_names_the_bad_one() {
    let ca = TestCa::new("upstream ca");
    let client = ca.client("serin.app.svc");
    let dir = temp_dir("upstreamtls");
    let broken = dir.join("broken-ca.pem");
    std::fs::write(&broken, "no certificates here\n").unwrap();
    let check = |tls: &str| {
        let file = dir.join("serin.toml");
        std::fs::write(
            &file,
            format!(
                "[stable]\nurl = \"https://127.0.0.1:1\"\n[stable.tls]\n{tls}\n\
                 [canary]\nurl = \"http://127.0.0.1:2\"\n"
            ),
        )
        .unwrap();
        let mut command = serin();
        command.args(["check", "--config"]).arg(file);
        command
    };
    let good = format!(
        "ca = {:?}\ncert = {:?}\nkey = {:?}",
        ca.cert_path, client.cert_path, client.key_path
    );
    succeeds(&mut check(&good));
    fails_with(
        &mut check(&format!("ca = {broken:?}")),
        &format!(
            "`stable.tls`: cannot read CA certificates from {}: no certificate found",
            broken.display()
        ),
    );
    fails_with(
        &mut check(&format!(
            "cert = {:?}\nkey = {:?}",
            client.cert_path,
            dir.join("missing-key.pem")
        )),
        "missing-key.pem",
    );
    fails_with(
        &mut check("server_name = \"not a name!\""),
        "`not a name!` cannot be a TLS server name",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reloads_a_renewed_certificate_and_counts_a_refused_one() {
    let (first, second) = (TestCert::named("first"), TestCert::named("second"));
    let dir = temp_dir("tlsreload");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let replace = |path: &std::path::Path, text: &str| {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    };
    replace(&cert, &first.cert_pem);
    replace(&key, &first.key_pem);
    let file = dir.join("serin.toml");
    std::fs::write(
        &file,
        format!("[tls]\ncert = {cert:?}\nkey = {key:?}\nreload_interval = \"50ms\"\n"),
    )
    .unwrap();
    let (serin, _upstreams) = run_with_config(&file).await;
    let admin = serin.admin.expect("the control API's address");
    assert_eq!(
        metric(admin, "serin_tls_reloads_total{files=\"listener\"}").await,
        0
    );
    assert_eq!(
        metric(admin, "serin_tls_reload_failures_total{files=\"listener\"}").await,
        0
    );

    replace(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n");
    eventually(
        Duration::from_secs(20),
        "the broken file is counted",
        || async {
            metric(admin, "serin_tls_reload_failures_total{files=\"listener\"}").await == 1
        },
    )
    .await;
    replace(&key, &second.key_pem);
    replace(&cert, &second.cert_pem);
    eventually(
        Duration::from_secs(20),
        "the renewed pair is loaded",
        || async { metric(admin, "serin_tls_reloads_total{files=\"listener\"}").await == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    stable.set(Behavior {
        delay: Duration::from_millis(700),
        ..Behavior::default()
    });
    let state = temp_dir("sigterm");
    let mut serin =
        SerinProcess::run(env!("CARGO_BIN_EXE_serin"), &stable, &canary, &state, &[]).await;
    let addr = serin.proxy;
    let url = format!("http://{addr}/");
    let client = http1_client();
    let slow = tokio::spawn(async move { get(&client, &url, &[]).await });
    eventually(
        Duration::from_secs(10),
        "the request reaches the upstream",
        || async { stable.requests() == 1 },
    )
    .await;
    serin.signal("TERM");
    let answer = slow.await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "stable")
    );
    let status = tokio::time::timeout(Duration::from_secs(30), serin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "a drained shutdown exits 0");
}

#[test]
fn demo_rolls_out_breaks_and_reverts_on_its_own() {
    let out = serin().args(["demo", "--plain"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "canary at 25%",
        "canary at 50%",
        "v2 starts failing every request",
        "judge reverted the canary to 0%",
        "phase    rolled_back",
        "clients saw           0 errors",
        "serin run --stable",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains('\x1b'), "--plain output has no escape codes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_subcommands_drive_a_running_serin() {
    let (running, _upstreams) = run_serin(&["--admin-token", "s3cret"]).await;
    let admin = running
        .admin
        .expect("control API address printed")
        .to_string();
    let client = |args: &[&str]| {
        let out = serin()
            .args(args)
            .args(["--admin", &admin])
            .env_remove("SERIN_ADMIN_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A mutating call without the token is refused with the server's words.
    let (code, _, err) = client(&["weight", "25"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("401") && err.contains("bearer token"), "{err}");

    let (code, out, _) = client(&["weight", "25", "--token", "s3cret"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("phase    manual") && out.contains("canary   25% of traffic"),
        "{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );

    let (code, out, _) = client(&["status", "--json"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("\"phase\":\"manual\"") && out.contains("\"canary_weight\":25.0"),
        "{out}"
    );

    let (code, _, err) = client(&["weight", "150", "--token", "s3cret"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("400") && err.contains("write 12.5 for 12.5%"),
        "{err}"
    );

    let (code, out, _) = client(&[
        "rollout", "--steps", "10,100", "--hold", "5m", "--token", "s3cret",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("phase    progressing") && out.contains("step     1 of 2"),
        "{out}"
    );

    let (code, out, _) = client(&["rollback", "--token", "s3cret"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("phase    rolled_back"), "{out}");

    let out = serin()
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach serin's control API"));
}

/// Peak resident memory of a process, from /proc (Linux).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_upload_and_download_stream_through_with_flat_memory() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = temp_dir("bigbody");
    let running =
        SerinProcess::run(env!("CARGO_BIN_EXE_serin"), &stable, &canary, &state, &[]).await;
    let pid = running.child.id().unwrap();
    let url = format!("http://{}", running.proxy);
    let client = http1_client();
    // Warm up, then take the baseline peak.
    assert_eq!(
        get(&client, &format!("{url}/"), &[]).await.status,
        StatusCode::OK
    );
    let before = peak_rss_kib(pid);

    const SIZE: u64 = 100 * 1024 * 1024;
    let req = http::Request::post(format!("{url}/upload"))
        .body(http_body_util::Either::Right(TestBody::generated(SIZE)))
        .unwrap();
    assert_eq!(send(&client, req).await.body, format!("received {SIZE}"));
    assert_eq!(
        download_len(&client, &format!("{url}/download/{SIZE}")).await,
        SIZE
    );

    let growth_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    assert!(
        growth_mib < 16,
        "peak RSS grew by {growth_mib} MiB moving 2 × 100 MiB: bodies are being buffered"
    );
}

/// Runs `serin run` with stdout and stderr piped and `extra` flags until it
/// listens, stops it with SIGTERM, and returns what it logged.
async fn piped_logs(tag: &str, extra: &[&str]) -> String {
    let stable = TestUpstream::start("stable").await;
    piped_logs_while(tag, &stable.url(), extra, None, |_| async {}).await
}

/// As [`piped_logs`], with `stable` as the stable upstream, `log_filter` as
/// `RUST_LOG`, and `during` run against the proxy's address before the stop.
async fn piped_logs_while<F, Fut>(
    tag: &str,
    stable: &str,
    extra: &[&str],
    log_filter: Option<&str>,
    during: F,
) -> String
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let canary = TestUpstream::start("canary").await;
    let state = temp_dir(tag);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_serin"));
    command
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--stable", stable, "--canary", &canary.url()])
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("SERIN_LOG_FORMAT");
    if let Some(filter) = log_filter {
        command.env("RUST_LOG", filter);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let proxy = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("serin: proxy listening on ") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("serin exited before listening");
    })
    .await
    .expect("serin listens within 30 s");
    during(proxy).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().unwrap();
    tokio::time::timeout(Duration::from_secs(30), pipe.read_to_string(&mut stderr))
        .await
        .expect("serin exits within 30 s")
        .unwrap();
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_are_json_lines_by_default_and_never_carry_colour_codes() {
    // Not a terminal: JSON lines a log collector parses as they are.
    let json = piped_logs("json-logs", &[]).await;
    assert!(
        !json.contains('\x1b'),
        "colour codes in piped logs: {json:?}"
    );
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let draining = lines
        .iter()
        .find(|l| l["fields"]["message"] == "SIGTERM: draining")
        .unwrap_or_else(|| panic!("no SIGTERM line in {json}"));
    assert_eq!(draining["level"], "INFO");
    assert!(draining["timestamp"].is_string() && draining["target"].is_string());

    // Asked for text: plain text, still without escape codes.
    let text = piped_logs("text-logs", &["--log-format", "text"]).await;
    assert!(text.contains("SIGTERM: draining"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes in piped logs: {text:?}"
    );
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_about_a_request_carries_its_request_id() {
    // Stable is down: the request fails, and the debug line that says so
    // names the request, by the client's id or by the one serin made.
    let down = closed_port_url();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let generated = sent.clone();
    let logs = piped_logs_while(
        "request-id-logs",
        &down,
        &["--log-format", "json"],
        Some("info,serin_proxy=debug"),
        |proxy| async move {
            let client = http1_client();
            let url = format!("http://{proxy}/");
            let answer = get(&client, &url, &[("x-request-id", "trace-me-123")]).await;
            assert_eq!(answer.status, 502);
            let answer = get(&client, &url, &[]).await;
            assert_eq!(answer.status, 502);
            let id = answer.headers["x-request-id"].to_str().unwrap().to_string();
            *generated.lock().unwrap() = id;
        },
    )
    .await;
    let failures: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "upstream request failed")
        .collect();
    let ids: Vec<&str> = failures
        .iter()
        .filter_map(|l| l["fields"]["request_id"].as_str())
        .collect();
    let generated = sent.lock().unwrap().clone();
    assert!(ids.contains(&"trace-me-123"), "{logs}");
    assert!(
        ids.contains(&generated.as_str()),
        "{generated} not in {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_of_several_endpoints_shows_each_in_status_and_metrics() {
    let (one, two, canary) = (
        TestUpstream::start("one").await,
        TestUpstream::start("two").await,
        TestUpstream::start("canary").await,
    );
    let state = temp_dir("endpoints");
    let stable = format!("{},{}", one.url(), two.url());
    let serin = SerinProcess::run_urls(
        env!("CARGO_BIN_EXE_serin"),
        &stable,
        &canary.url(),
        &state,
        &[],
        &[],
    )
    .await;
    let client = http1_client();
    for _ in 0..40 {
        let a = get(&client, &format!("http://{}/", serin.proxy), &[]).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let admin = serin.admin.expect("the control API's address");
    let status = get(&client, &format!("http://{admin}/status"), &[]).await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    let stable_status = &status["upstreams"]["stable"];
    assert_eq!(stable_status["url"], stable.as_str());
    let endpoints = stable_status["endpoints"].as_array().unwrap();
    let addresses = endpoints
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(addresses, [one.addr.to_string(), two.addr.to_string()]);
    let served = [one.requests(), two.requests()];
    for (endpoint, served) in endpoints.iter().zip(served) {
        assert_eq!(endpoint["state"], "serving");
        assert_eq!(endpoint["requests"], served);
        assert_eq!(endpoint["failures"], 0);
    }
    assert_eq!(served.iter().sum::<u64>(), 40);
    let name = format!(
        "serin_endpoint_requests_total{{upstream=\"stable\",endpoint=\"{}\"}}",
        one.addr
    );
    assert_eq!(metric(admin, &name).await, one.requests());
    let ejected = format!(
        "serin_endpoint_ejected{{upstream=\"stable\",endpoint=\"{}\"}}",
        two.addr
    );
    assert_eq!(metric(admin, &ejected).await, 0);
}
