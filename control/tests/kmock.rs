//! Fleet mode's basic paths against a Kubernetes API emulator written
//! elsewhere: PyPI's `kmock` (its `KubernetesEmulator`, pinned in
//! `control/tests/kmock/requirements.txt`), served on 127.0.0.1 by
//! `control/tests/kmock/serve.py`, with three real `serin run --fleet`
//! members and the CLI talking to it through a kubeconfig, unchanged.
//! `control/tests/fleet.rs` covers the rest against our own fake API server;
//! this test checks that what it relies on is not only our own reading of the
//! protocol.
//!
//! What kmock 0.8 serves, and so what this test covers: create (POST), get,
//! list, watch (each connection gets every object as `ADDED`, then live
//! events) and merge patch, on `/apis/{group}/{version}/namespaces/{ns}/
//! {plural}/{name}[/status]` for any resource. Members list and watch the
//! `SerinRollout`; `serin weight`, `rollback` and `resume --fleet` write it
//! (spec, then status); every member follows; a member that joins later
//! reads the status from its list.
//!
//! What kmock 0.8 lacks, so the test does not cover (fleet.rs does):
//! - `metadata.generation`: never set or bumped, so only the first spec
//!   change is applied to the status (the CLI reconciles generation 0 once;
//!   a second `serin weight` changes the spec and nothing else).
//! - `metadata.resourceVersion`: never set; a precondition in a patch is not
//!   checked but stored into the object; watches ignore `resourceVersion`,
//!   `timeoutSeconds` and `allowWatchBookmarks` (no bookmarks, no 410).
//! - Kubernetes' `Status` reasons: a missing object answers 404 with reason
//!   "Object Not Found", not `NotFound`, which kube-rs's `get_opt` does not
//!   take for absence; so no member ever creates the fleet's Lease. PUT
//!   (replace, how a Lease is renewed) answers 404 "Endpoint Not Found"
//!   anyway. No member leads: no spec is applied without the CLI, no
//!   aggregate, no steps.
//! - Server-side apply: an `application/apply-patch+yaml` body is merged like
//!   a merge patch (no field managers, no list-map keys), so each member's
//!   report replaces `status.members` with its own entry.
//! - A status subresource apart from the object: a patch of `/status` is a
//!   patch of the whole object, and the reverse.
//!
//! The pinned kmock comes from `SERIN_KMOCK_PYTHON`, or else from the venv
//! `control/tests/kmock/venv.sh` creates once under
//! `${XDG_CACHE_HOME:-~/.cache}/serin-kmock-venv` (from PyPI, as the Python
//! client suite installs its own). Every wait polls with a deadline; all
//! traffic is to 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{Either, Full};
use serde_json::{json, Value};
use serin_tests::*;
use tokio::io::AsyncBufReadExt;

const NS: &str = "shop";
const NAME: &str = "checkout";
const FLEET: &str = "shop/checkout";
const DEADLINE: Duration = Duration::from_secs(30);
const ROLLOUTS: &str = "/apis/serin.dev/v1alpha1/namespaces/shop/serinrollouts";

/// The kmock version `requirements.txt` pins.
fn pinned_version() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kmock/requirements.txt");
    let text = std::fs::read_to_string(&path).expect("control/tests/kmock/requirements.txt");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("kmock=="))
        .expect("a kmock==VERSION line in requirements.txt")
        .trim()
        .to_string()
}

/// The kmock version `python` imports, if it imports one.
fn kmock_version(python: &str) -> Option<String> {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m, kmock; print(m.version('kmock'))",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A Python with the pinned kmock: `SERIN_KMOCK_PYTHON`, else the venv that
/// `control/tests/kmock/venv.sh` creates once (as the Python client suite
/// does its own), so `cargo test --workspace` runs this on a fresh machine.
fn find_python() -> String {
    let pinned = pinned_version();
    let python = match std::env::var("SERIN_KMOCK_PYTHON") {
        Ok(python) => python,
        Err(_) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kmock/venv.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("run control/tests/kmock/venv.sh");
            assert!(
                out.status.success(),
                "control/tests/kmock/venv.sh could not install kmock=={pinned} from PyPI"
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    let found = kmock_version(&python);
    assert_eq!(
        found.as_deref(),
        Some(pinned.as_str()),
        "{python} must import kmock=={pinned} (pip install -r control/tests/kmock/requirements.txt)"
    );
    python
}

/// kmock's emulator in a child process: killed when dropped, and it exits by
/// itself when its stdin closes (if this process dies first).
struct Kmock {
    _child: tokio::process::Child,
    _stdin: tokio::process::ChildStdin,
    url: String,
    version: String,
}

impl Kmock {
    async fn start(python: &str) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kmock/serve.py");
        let mut child = tokio::process::Command::new(python)
            .arg(&script)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start control/tests/kmock/serve.py");
        let stdin = child.stdin.take().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("kmock did not start listening within 30 s")
            .unwrap()
            .expect("kmock exited before listening");
        // "kmock VERSION listening on 127.0.0.1:PORT"
        let (version, addr) = line
            .strip_prefix("kmock ")
            .and_then(|rest| rest.split_once(" listening on "))
            .unwrap_or_else(|| panic!("unexpected first line from serve.py: {line}"));
        assert!(addr.starts_with("127.0.0.1:"), "{line}");
        let (version, url) = (version.to_string(), format!("http://{addr}"));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            _child: child,
            _stdin: stdin,
            url,
            version,
        }
    }

    fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: kmock
  cluster:
    server: {url}
contexts:
- name: kmock
  context:
    cluster: kmock
    namespace: {NS}
    user: kmock
current-context: kmock
users:
- name: kmock
  user:
    token: kmock-token
",
            url = self.url
        )
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        let req = Request::post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(Either::Left(Full::new(Bytes::from(body.to_string()))))
            .unwrap();
        send(&http1_client(), req).await
    }

    /// The `SerinRollout` as kmock holds it.
    async fn object(&self) -> Value {
        let answer = get(
            &http1_client(),
            &format!("{}{ROLLOUTS}/{NAME}", self.url),
            &[],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        serde_json::from_str(&answer.body).unwrap()
    }
}

/// Fields drop in order: the members are killed before the API goes.
struct Fleet {
    members: Vec<SerinProcess>,
    admin: Vec<String>,
    api: Kmock,
    stable: TestUpstream,
    canary: TestUpstream,
    kubeconfig: PathBuf,
    /// Last, so it is removed after the members are gone.
    dir: TempDir,
}

impl Fleet {
    /// Starts member `m<index>`, a new pod with an empty state directory.
    async fn add_member(&mut self) -> usize {
        let index = self.members.len();
        let state = self.dir.join(format!("state-{index}"));
        let name = format!("m{index}");
        let kubeconfig = self.kubeconfig.to_str().unwrap().to_string();
        let extra = [
            "--fleet",
            FLEET,
            "--fleet-member",
            &name,
            // Reports (merge patches on kmock) keep arriving while the CLI
            // writes: members must follow the object through them.
            "--fleet-report-interval",
            "500ms",
        ];
        let process = SerinProcess::run_env(
            env!("CARGO_BIN_EXE_serin"),
            &self.stable,
            &self.canary,
            &state,
            &extra,
            &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "warn")],
        )
        .await;
        self.admin
            .push(format!("http://{}", process.admin.expect("admin address")));
        self.members.push(process);
        index
    }

    async fn status(&self, index: usize) -> Value {
        let answer = get(
            &http1_client(),
            &format!("{}/status", self.admin[index]),
            &[],
        )
        .await;
        serde_json::from_str(&answer.body).unwrap()
    }

    /// Waits until every member's `/status` shows `phase` at `pct`.
    async fn all_at(&self, phase: &str, pct: f64, what: &str) {
        for i in 0..self.members.len() {
            eventually(
                DEADLINE,
                &format!("{what}: m{i} {phase} at {pct}%"),
                || async move {
                    let s = self.status(i).await;
                    s["phase"] == phase && s["canary_weight"].as_f64() == Some(pct)
                },
            )
            .await;
        }
    }

    /// `serin ARGS --fleet shop/checkout` through the kubeconfig; its stdout.
    fn cli_ok(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_serin"))
            .args(args)
            .args(["--fleet", FLEET])
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("run the serin CLI");
        assert!(
            out.status.success(),
            "serin {args:?} --fleet failed against kmock: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_the_cli_work_the_basic_paths_against_kmock() {
    let python = find_python();
    let started = Instant::now();
    let api = Kmock::start(&python).await;
    let dir = temp_dir("kmock");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let created = api
        .post(
            ROLLOUTS,
            &json!({
                "apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": {},
            }),
        )
        .await;
    assert!(created.status.is_success(), "create: {created:?}");
    let mut fleet = Fleet {
        members: Vec::new(),
        admin: Vec::new(),
        api,
        stable: TestUpstream::start("stable").await,
        canary: TestUpstream::start("canary").await,
        kubeconfig,
        dir,
    };
    for _ in 0..3 {
        fleet.add_member().await;
    }

    // Every member lists the object and watches it. There is no status yet
    // (and on kmock no leader to write one), so the canary stays closed.
    for i in 0..3 {
        eventually(DEADLINE, &format!("m{i} follows the SerinRollout"), || {
            let fleet = &fleet;
            async move {
                let s = fleet.status(i).await;
                s["fleet"]["connected"] == true
            }
        })
        .await;
        let s = fleet.status(i).await;
        assert_eq!(s["canary_weight"], 0.0, "m{i}: {s:#}");
        assert_eq!(s["fleet"]["name"], FLEET, "m{i}: {s:#}");
    }

    // The CLI writes the spec, then the status; the watches bring it to
    // every member.
    let out = fleet.cli_ok(&["weight", "20"]);
    assert!(out.contains("manual at 20%"), "{out}");
    fleet.all_at("manual", 20.0, "serin weight 20").await;
    let object = fleet.api.object().await;
    assert_eq!(object["spec"]["canaryWeight"], 20.0, "{object:#}");
    let status = &object["status"];
    assert_eq!(
        (
            &status["phase"],
            &status["weightBp"],
            &status["actor"],
            &status["epoch"]
        ),
        (&json!("manual"), &json!(2000), &json!("cli"), &json!(1)),
        "{object:#}"
    );

    // Status-only writes (no spec change) reach every member too.
    let out = fleet.cli_ok(&["rollback"]);
    assert!(out.contains("rolled_back at 0%"), "{out}");
    fleet.all_at("rolled_back", 0.0, "serin rollback").await;
    let out = fleet.cli_ok(&["resume"]);
    assert!(out.contains("manual at 20%"), "{out}");
    fleet.all_at("manual", 20.0, "serin resume").await;
    let status = fleet.api.object().await["status"].clone();
    assert_eq!(status["epoch"], 2, "{status:#}");
    for i in 0..3 {
        let s = fleet.status(i).await;
        assert_eq!(s["fleet"]["epoch"], 2, "m{i}: {s:#}");
    }

    // A member that joins now reads the fleet's state from its list.
    let late = fleet.add_member().await;
    fleet.all_at("manual", 20.0, "a member joining later").await;
    assert_eq!(fleet.status(late).await["fleet"]["connected"], true);

    let out = fleet.cli_ok(&["status"]);
    assert!(out.contains("fleet shop/checkout: manual at 20%"), "{out}");
    eprintln!(
        "kmock {}: 4 members and the CLI followed the SerinRollout in {:?}",
        fleet.api.version,
        started.elapsed()
    );
}
