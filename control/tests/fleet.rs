//! Fleet mode end to end: five or more real `serin run --fleet` processes,
//! real upstreams, and the CLI, against the fake Kubernetes API server in
//! `serin_tests::kube_api` (it speaks the real wire protocol; serin's kube-rs
//! client talks to it unchanged over HTTP). Faults are the server's own:
//! going down, dropping watches, forgetting history (410), failing writes.
//!
//! Every wait polls with a deadline; every request loop is bounded.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serin_tests::kube_api::FakeKube;
use serin_tests::*;

const NS: &str = "shop";
const NAME: &str = "checkout";
const FLEET: &str = "shop/checkout";
const DEADLINE: Duration = Duration::from_secs(30);
/// Short, so the tests see reports and leases move quickly.
const REPORT: &str = "200ms";
const LEASE: &str = "2s";

struct Fleet {
    api: FakeKube,
    stable: TestUpstream,
    canary: TestUpstream,
    kubeconfig: PathBuf,
    members: Vec<Option<SerinProcess>>,
    admin: Vec<String>,
    proxies: Vec<String>,
    /// Last, so it is removed after the members are gone.
    dir: TempDir,
}

impl Fleet {
    /// The fake API server with a `SerinRollout` whose spec is `spec` (no
    /// status yet), and `n` members.
    async fn start(tag: &str, n: usize, spec: Value) -> Self {
        let api = FakeKube::start().await;
        let dir = temp_dir(tag);
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, NS).unwrap();
        api.create(
            "serinrollouts",
            NS,
            json!({
                "apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": spec,
            }),
        )
        .unwrap();
        let mut fleet = Self {
            api,
            stable: TestUpstream::start("stable").await,
            canary: TestUpstream::start("canary").await,
            kubeconfig,
            dir,
            members: Vec::new(),
            admin: Vec::new(),
            proxies: Vec::new(),
        };
        for _ in 0..n {
            fleet.add_member().await;
        }
        fleet
    }

    /// Starts one more member, `m<index>`, with an empty state directory
    /// (a new pod). Returns its index.
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
            "--fleet-report-interval",
            REPORT,
            "--fleet-lease-duration",
            LEASE,
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
        self.proxies.push(format!("http://{}", process.proxy));
        self.members.push(Some(process));
        index
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].is_some())
            .collect()
    }

    /// `kill -9` member `index`.
    async fn kill(&mut self, index: usize) {
        let mut process = self.members[index].take().expect("alive");
        process.signal("KILL");
        let _ = process.child.wait().await;
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

    async fn weight(&self, index: usize) -> f64 {
        self.status(index).await["canary_weight"].as_f64().unwrap()
    }

    /// Waits until every live member's route table holds `pct`.
    async fn all_at(&self, pct: f64, what: &str) {
        for i in self.alive() {
            eventually(
                DEADLINE,
                &format!("{what}: m{i} at {pct}%"),
                || async move { self.weight(i).await == pct },
            )
            .await;
        }
    }

    /// Waits until the leader has written the steady state.
    async fn until_steady(&self) {
        eventually(DEADLINE, "the fleet's status is written", || async {
            self.fleet_status()["phase"] == "steady"
        })
        .await;
    }

    fn object(&self) -> Value {
        self.api
            .get("serinrollouts", NS, NAME)
            .expect("the SerinRollout")
    }

    fn fleet_status(&self) -> Value {
        self.object()["status"].clone()
    }

    fn lease_holder(&self) -> Option<String> {
        self.api
            .get("leases", NS, "serin-checkout")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    /// `serin ARGS --fleet shop/checkout`, through the kubeconfig.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_serin"))
            .args(args)
            .args(["--fleet", FLEET])
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("run the serin CLI")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "serin {args:?} --fleet failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Sends `n` GETs through member `index`, 8 at a time.
    async fn traffic(&self, index: usize, n: usize) {
        let client = http1_client();
        let url = format!("{}/", self.proxies[index]);
        for _ in 0..n.div_ceil(8) {
            let batch = (0..8).map(|_| get(&client, &url, &[]));
            futures_util::future::join_all(batch).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_started_once_advances_on_every_member_together() {
    let fleet = Fleet::start("fleet-rollout", 5, json!({})).await;
    // The leader writes the steady state; every member leaves "closed".
    fleet.until_steady().await;
    fleet.all_at(0.0, "steady").await;

    let out = fleet.cli_ok(&["rollout", "--steps", "20,60,100", "--hold", "1s"]);
    assert!(out.contains("progressing at 20%"), "{out}");
    fleet.all_at(20.0, "step 1").await;
    let status = fleet.fleet_status();
    assert_eq!(
        (status["epoch"].as_u64(), status["actor"].as_str()),
        (Some(1), Some("cli"))
    );

    // Traffic through every member; the fleet's judge holds each step for
    // its hold and 100 canary requests summed over the members.
    let started = Instant::now();
    let mut seen_steps = vec![];
    for _ in 0..400 {
        let status = fleet.fleet_status();
        let step = status["step"].as_u64().unwrap_or(0);
        if seen_steps.last() != Some(&step) {
            seen_steps.push(step);
            if step == 2 {
                fleet.all_at(60.0, "step 2").await;
            }
        }
        if status["phase"] == "promoted" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "rollout stuck: {status:#}"
        );
        for i in 0..5 {
            fleet.traffic(i, 16).await;
        }
    }
    fleet.all_at(100.0, "promoted").await;
    let status = fleet.fleet_status();
    assert_eq!(status["phase"], "promoted", "{status:#}");
    assert!(seen_steps.contains(&2), "steps seen: {seen_steps:?}");
    assert!(
        status["actor"].as_str().unwrap().starts_with("leader@m"),
        "{status:#}"
    );
    assert!(
        status["fleet"]["members"].as_u64().unwrap() >= 5,
        "{status:#}"
    );
    // Every member's own /status says which generation it applied.
    for i in 0..5 {
        let s = fleet.status(i).await;
        assert_eq!(s["phase"], "promoted", "m{i}: {s:#}");
        assert_eq!(s["fleet"]["connected"], true, "m{i}: {s:#}");
    }
    // `serin status --fleet` shows every member.
    let out = fleet.cli_ok(&["status"]);
    for i in 0..5 {
        assert!(out.contains(&format!("m{i} ")), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_breach_reverts_every_member_and_a_new_pod_stays_at_zero() {
    let mut fleet = Fleet::start("fleet-breach", 5, json!({"canaryWeight": 50})).await;
    fleet.all_at(50.0, "manual 50%").await;
    // The same weight again is a new epoch that changes nothing on the
    // members; they run in it all the same, so a rollback decided now is
    // recorded (and not undone by the next version of the object).
    fleet.cli_ok(&["weight", "50"]);
    for i in fleet.alive() {
        let fleet = &fleet;
        eventually(DEADLINE, &format!("m{i} runs epoch 2"), || async move {
            fleet.status(i).await["fleet"]["epoch"] == 2
        })
        .await;
    }
    fleet.canary.set(Behavior {
        status: Some(503),
        ..Behavior::default()
    });
    // Only m0 sees traffic: its own judge reverts it.
    let started = Instant::now();
    for _ in 0..50 {
        fleet.traffic(0, 8).await;
        if fleet.weight(0).await == 0.0 {
            break;
        }
    }
    assert_eq!(fleet.weight(0).await, 0.0, "m0's judge reverts it");
    fleet.all_at(0.0, "the breach reaches every member").await;
    let propagation = started.elapsed();
    let status = fleet.fleet_status();
    assert_eq!(status["phase"], "rolled_back", "{status:#}");
    assert_eq!(status["actor"], "m0", "{status:#}");
    assert!(
        status["reason"].as_str().unwrap().contains("judge of m0"),
        "{status:#}"
    );
    let rollbacks = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["phase"] == "rolled_back")
        .count();
    assert_eq!(rollbacks, 1, "one rollback, written once: {status:#}");
    eprintln!("breach on m0 → all 5 members at 0 in {propagation:?}");

    // kill -9 a member, start a new one: it joins the rolled-back fleet at 0,
    // with the canary unreachable even by override.
    fleet.kill(3).await;
    let new = fleet.add_member().await;
    // Closed until it reads the object (weight 0 already), then rolled back.
    eventually(
        DEADLINE,
        "the new pod takes the fleet's rollback",
        || async { fleet.status(new).await["phase"] == "rolled_back" },
    )
    .await;
    fleet.all_at(0.0, "the new pod").await;
    let client = http1_client();
    let canary_before = fleet.canary.requests();
    for _ in 0..20 {
        get(
            &client,
            &format!("{}/", fleet.proxies[new]),
            &[("x-serin-canary", "always")],
        )
        .await;
    }
    assert_eq!(
        fleet.canary.requests(),
        canary_before,
        "a latched fleet closes overrides too"
    );

    // Only an explicit resume raises it again, on every member.
    fleet.canary.set(Behavior::default());
    fleet.cli_ok(&["resume"]);
    fleet.all_at(50.0, "resumed").await;
    assert_eq!(fleet.fleet_status()["epoch"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_joins_takes_the_fleets_state_and_is_closed_until_it_reads_it() {
    let mut fleet = Fleet::start("fleet-join", 5, json!({"canaryWeight": 30})).await;
    fleet.all_at(30.0, "manual 30%").await;
    // m1 has reported at least once (the first report comes at a random
    // moment of the first interval, so the members' writes spread out).
    eventually(DEADLINE, "m1 reports", || async {
        fleet
            .api
            .get("configmaps", NS, "serin-checkout-members")
            .is_some_and(|r| r["data"]["m1"].is_string())
    })
    .await;
    fleet.kill(1).await;
    // The killed member shows as gone, then its entry is removed.
    eventually(DEADLINE, "serin status --fleet marks m1", || async {
        let out = fleet.cli_ok(&["status"]);
        out.lines()
            .any(|l| l.starts_with("m1 ") && l.contains("DISCONNECTED or gone"))
    })
    .await;
    eventually(DEADLINE, "m1's report is removed", || async {
        let reports = fleet.api.get("configmaps", NS, "serin-checkout-members");
        let data = reports.map(|r| r["data"].clone()).unwrap_or_default();
        let pods: Vec<&String> = data
            .as_object()
            .into_iter()
            .flat_map(|d| d.keys())
            .collect();
        !pods.iter().any(|p| *p == "m1") && pods.len() == 4
    })
    .await;
    let joined = fleet.add_member().await;
    fleet.all_at(30.0, "the replacement").await;

    // A member started while the API is down stays closed (canary 0, even
    // for overrides) until it has read the object.
    fleet.api.go_down().await;
    let late = fleet.add_member().await;
    let s = fleet.status(late).await;
    assert_eq!(s["fleet"]["connected"], false, "{s:#}");
    let client = http1_client();
    let canary_before = fleet.canary.requests();
    for _ in 0..20 {
        get(
            &client,
            &format!("{}/", fleet.proxies[late]),
            &[("x-serin-canary", "always")],
        )
        .await;
    }
    assert_eq!(
        fleet.canary.requests(),
        canary_before,
        "closed until the object is read"
    );
    // The others keep their last state while the API is away.
    assert_eq!(fleet.weight(joined).await, 30.0);
    fleet.api.come_back().await.unwrap();
    fleet.all_at(30.0, "after the API returns").await;
    eventually(DEADLINE, "the late member reconnects", || async {
        fleet.status(late).await["fleet"]["connected"] == true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_while_the_api_is_down_reverts_at_once_and_is_written_when_it_returns() {
    let fleet = Fleet::start("fleet-down", 5, json!({"canaryWeight": 50})).await;
    fleet.all_at(50.0, "manual 50%").await;
    fleet.api.go_down().await;
    fleet.canary.set(Behavior {
        status: Some(500),
        ..Behavior::default()
    });
    for _ in 0..50 {
        fleet.traffic(2, 8).await;
        if fleet.weight(2).await == 0.0 {
            break;
        }
    }
    assert_eq!(
        fleet.weight(2).await,
        0.0,
        "m2 reverts locally without the API"
    );
    eventually(DEADLINE, "m2 says it is disconnected", || async {
        fleet.status(2).await["fleet"]["connected"] == false
    })
    .await;
    // The fleet's object has not heard yet; the others keep what they had.
    assert_eq!(fleet.fleet_status()["latched"], false);
    assert_eq!(fleet.weight(1).await, 50.0);
    let metrics = get(&http1_client(), &format!("{}/metrics", fleet.admin[2]), &[]).await;
    let metrics = metrics.body;
    assert!(metrics.contains("serin_fleet_connected 0"), "{metrics}");

    fleet.api.come_back().await.unwrap();
    eventually(DEADLINE, "m2's rollback reaches the object", || async {
        fleet.fleet_status()["latched"] == true
    })
    .await;
    assert_eq!(fleet.fleet_status()["actor"], "m2");
    fleet.all_at(0.0, "every member follows").await;
    let metrics = get(&http1_client(), &format!("{}/metrics", fleet.admin[2]), &[]).await;
    let metrics = metrics.body;
    assert!(
        metrics.contains("serin_fleet_disconnects_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_killed_mid_rollout_is_replaced_and_the_rollout_goes_on() {
    let mut fleet = Fleet::start(
        "fleet-lease",
        5,
        json!({"rollout": {"steps": [20, 60, 100], "hold": "1s", "minRequestsPerStep": 20}}),
    )
    .await;
    fleet.all_at(20.0, "step 1").await;
    eventually(DEADLINE, "a leader", || async {
        fleet.lease_holder().is_some()
    })
    .await;
    let holder = fleet.lease_holder().unwrap();
    let index: usize = holder.trim_start_matches('m').parse().unwrap();
    fleet.kill(index).await;
    let killed = Instant::now();
    eventually(DEADLINE, "another member takes the lease", || async {
        fleet.lease_holder().is_some_and(|h| h != holder)
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("lease {LEASE}: taken over {takeover:?} after the holder was killed");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    // The new leader moves the steps.
    let started = Instant::now();
    while fleet.fleet_status()["phase"] != "promoted" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:#}",
            fleet.fleet_status()
        );
        for i in fleet.alive() {
            fleet.traffic(i, 16).await;
        }
    }
    fleet.all_at(100.0, "promoted by the new leader").await;
    let actor = fleet.fleet_status()["actor"].as_str().unwrap().to_string();
    assert_ne!(actor, format!("leader@{holder}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_writes_and_expired_watches_lose_nothing() {
    let fleet = Fleet::start("fleet-conflict", 5, json!({"canaryWeight": 10})).await;
    fleet.all_at(10.0, "manual 10%").await;

    // Stale resourceVersions: the CLI's status write meets conflicts and
    // computes again from a fresh read.
    fleet.api.fail_next(3, 409);
    fleet.cli_ok(&["weight", "25"]);
    fleet.all_at(25.0, "after conflicts").await;

    // Watch expiry: the history is forgotten and every watch dropped; the
    // members list again (410 Gone) and follow the next change.
    fleet.api.compact();
    fleet.api.drop_watches();
    fleet.cli_ok(&["weight", "40"]);
    fleet.all_at(40.0, "after 410").await;

    // Breaches on every member at once: many concurrent rollback writes,
    // one rollback recorded, nothing undone by a later write in that epoch.
    fleet.canary.set(Behavior {
        status: Some(500),
        ..Behavior::default()
    });
    let sends = (0..5).map(|i| fleet.traffic(i, 40));
    futures_util::future::join_all(sends).await;
    fleet.all_at(0.0, "all reverted").await;
    let status = fleet.fleet_status();
    let rollbacks = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["phase"] == "rolled_back")
        .count();
    assert_eq!(rollbacks, 1, "{status:#}");
    // A promote on a rolled-back fleet is refused, and changes nothing.
    let out = fleet.cli(&["promote"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rolled back"),
        "{out:?}"
    );
    assert_eq!(fleet.fleet_status()["weightBp"], 0);
    // No write undoes a rollback in its epoch: a writer that un-latches the
    // status in the same epoch (a stale copy written back) is overruled,
    // the members stay at 0 and write the rollback again ...
    let epoch = status["epoch"].as_u64().unwrap();
    let stale = json!({"status": {"phase": "manual", "weightBp": 9000, "canaryWeight": 90.0,
                                   "latched": false, "resume": null, "epoch": epoch}});
    fleet
        .api
        .merge_patch_status("serinrollouts", NS, NAME, stale)
        .unwrap();
    eventually(DEADLINE, "the rollback is written again", || async {
        fleet.fleet_status()["latched"] == true
    })
    .await;
    // ... and a status from an older epoch (restored from an old copy) is
    // ignored by every member.
    let restored = json!({"status": {"phase": "manual", "weightBp": 9000, "canaryWeight": 90.0,
                                      "latched": false, "resume": null, "epoch": 0}});
    fleet
        .api
        .merge_patch_status("serinrollouts", NS, NAME, restored)
        .unwrap();
    // Members report every 200 ms, so once the object has moved on a few
    // versions every member has read the stale one.
    let seen = fleet.api.resource_version();
    eventually(DEADLINE, "members read past the stale write", || async {
        fleet.api.resource_version() > seen + 10
    })
    .await;
    for i in fleet.alive() {
        assert_eq!(fleet.weight(i).await, 0.0, "m{i} raised on a stale status");
    }
    // A member's own control API acts on the fleet, in a new epoch above
    // every member's.
    let client = http1_client();
    let answer = send(
        &client,
        http::Request::put(format!("{}/weight", fleet.admin[4]))
            .header("content-type", "application/json")
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                bytes::Bytes::from_static(br#"{"canary": 15}"#),
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    fleet.canary.set(Behavior::default());
    let status = fleet.fleet_status();
    assert_eq!(status["weightBp"], 1500, "{status:#}");
    fleet.all_at(15.0, "weight through m4's API").await;
    // The leader judges the new epoch on its own outcomes: the failures
    // that got the canary rolled back are still in every window it was
    // sent before, and must not roll it back again.
    let seen = fleet.api.resource_version();
    eventually(DEADLINE, "the leader judged the new epoch", || async {
        fleet.api.resource_version() > seen + 10
    })
    .await;
    assert_eq!(fleet.fleet_status()["actor"], "api@m4");
    assert_eq!(fleet.fleet_status()["epoch"].as_u64(), Some(epoch + 1));
    fleet
        .all_at(15.0, "still at 15% after the leader's passes")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_errors_say_what_to_do_and_change_nothing() {
    let fleet = Fleet::start("fleet-errors", 0, json!({"canaryWeight": 5})).await;
    let run = |args: &[&str], kubeconfig: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_serin"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .output()
            .unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    // No Kubernetes configuration: `serin run --fleet` stops before binding.
    let out = run(
        &[
            "run",
            "--stable",
            "http://127.0.0.1:1",
            "--canary",
            "http://127.0.0.1:2",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--fleet",
            FLEET,
        ],
        "/nonexistent/kubeconfig",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Set KUBECONFIG"), "{}", stderr(&out));

    let kubeconfig = fleet.kubeconfig.to_str().unwrap();
    let out = run(&["status", "--fleet", "checkout"], kubeconfig);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("NAMESPACE/NAME"), "{}", stderr(&out));

    let out = run(&["status", "--fleet", "shop/missing"], kubeconfig);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not found; create it"),
        "{}",
        stderr(&out)
    );

    let before = fleet.object();
    let out = run(&["weight", "120", "--fleet", FLEET], kubeconfig);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("0 to 100"), "{}", stderr(&out));
    let out = run(
        &["rollout", "--steps", "10,50", "--fleet", FLEET],
        kubeconfig,
    );
    assert!(
        stderr(&out).contains("last rollout step must be 100"),
        "{}",
        stderr(&out)
    );
    let out = run(&["pause", "--fleet", FLEET], kubeconfig);
    assert!(
        stderr(&out).contains("no rollout to pause"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fleet.object()["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );

    // The API server gone: a clear error, not a hang.
    fleet.api.go_down().await;
    let out = run(&["status", "--fleet", FLEET], kubeconfig);
    assert!(
        stderr(&out).contains("cannot reach the API server"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shadows_before_its_first_step_and_no_user_reaches_the_canary() {
    let fleet = Fleet::start("fleet-shadow", 2, json!({})).await;
    fleet.until_steady().await;
    fleet.cli_ok(&[
        "rollout", "--steps", "20,100", "--hold", "1h", "--shadow", "1s",
    ]);
    let fleet = &fleet;
    for i in 0..2 {
        eventually(DEADLINE, &format!("m{i} shadows"), || async move {
            let s = fleet.status(i).await;
            s["phase"] == "shadowing" && s["shadow"]["percent"] == 100.0
        })
        .await;
    }
    assert_eq!(fleet.fleet_status()["shadowHold"], "1s");

    // Clients of every member get stable's answers while the fleet
    // shadows; the copies reach the canary, and the leader moves the fleet
    // to its first step once the hold is over and the copies are healthy.
    let client = http1_client();
    let started = Instant::now();
    while fleet.fleet_status()["phase"] == "shadowing" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "shadow step stuck: {:#}",
            fleet.fleet_status()
        );
        for i in 0..2 {
            let url = format!("{}/", fleet.proxies[i]);
            let answers =
                futures_util::future::join_all((0..8).map(|_| get(&client, &url, &[]))).await;
            if fleet.weight(i).await == 0.0 {
                for a in answers {
                    assert_eq!((a.status.as_u16(), a.upstream()), (200, "stable"), "{a:?}");
                }
            }
        }
    }
    assert!(fleet.canary.requests() > 0, "the copies reached the canary");
    fleet.all_at(20.0, "step 1").await;
    let status = fleet.fleet_status();
    assert_eq!(
        (status["phase"].as_str(), status["step"].as_u64()),
        (Some("progressing"), Some(1))
    );
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("the shadow healthy over 1s"),
        "{status:#}"
    );

    // A member's control API shadows the whole fleet by hand, and refuses
    // a share out of range.
    let post = |body: &'static str| {
        let req = http::Request::post(format!("{}/shadow", fleet.admin[1]))
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                bytes::Bytes::from_static(body.as_bytes()),
            )))
            .unwrap();
        async move { send(&http1_client(), req).await }
    };
    let refused = post(r#"{"percent": 0}"#).await;
    assert_eq!(refused.status.as_u16(), 400, "{refused:?}");
    let answer = post(r#"{"percent": 30}"#).await;
    assert_eq!(answer.status.as_u16(), 200, "{answer:?}");
    fleet.all_at(0.0, "shadowing by hand").await;
    let status = fleet.fleet_status();
    assert_eq!(
        (status["phase"].as_str(), status["shadowBp"].as_u64()),
        (Some("shadowing"), Some(3000))
    );
    assert_eq!(fleet.object()["spec"]["shadow"], 30.0);
}
