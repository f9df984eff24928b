//! The fake Kubernetes API server (`serin_tests::kube_api`) through real
//! sockets and a real HTTP/1.1 client: object shapes, watches (replay, live,
//! bookmarks, 410), optimistic concurrency, the status subresource,
//! server-side apply, leases, and the faults tests inject.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use serin_tests::kube_api::{FakeKube, FakeKubeOptions};
use serin_tests::{eventually, http1_client, ClientBody};

const NS: &str = "fleet";
const ROLLOUTS: &str = "/apis/serin.dev/v1alpha1/namespaces/fleet/serinrollouts";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/fleet/leases";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
/// The longest any single step may take.
const STEP: Duration = Duration::from_secs(5);

struct Api {
    client: Client<HttpConnector, ClientBody>,
    base: String,
}

impl Api {
    fn new(fake: &FakeKube) -> Self {
        Self {
            client: http1_client(),
            base: fake.url(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> hyper::Response<Incoming> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("user-agent", "fake-kube-test/1.0");
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                bytes,
            )))
            .unwrap();
        tokio::time::timeout(STEP, self.client.request(req))
            .await
            .expect("answered in time")
            .expect("request sent")
    }

    /// Status code and JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let resp = self.send(method, path, content_type, body).await;
        let code = resp.status().as_u16();
        assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).expect("a JSON body"))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, "", None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, "application/json", Some(&body))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, "application/json", Some(&body))
            .await
    }

    async fn patch(&self, path: &str, content_type: &str, body: Value) -> (u16, Value) {
        self.call(Method::PATCH, path, content_type, Some(&body))
            .await
    }

    async fn apply(&self, path: &str, manager: &str, force: bool, body: Value) -> (u16, Value) {
        let path = format!(
            "{path}?fieldManager={manager}{}",
            if force { "&force=true" } else { "" }
        );
        self.patch(&path, APPLY, body).await
    }

    async fn watch(&self, path_and_query: &str) -> Watch {
        let resp = self.send(Method::GET, path_and_query, "", None).await;
        assert_eq!(resp.status(), 200, "{path_and_query}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        Watch {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

/// A watch response read line by line.
struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

#[derive(Debug)]
enum Next {
    Event(Value),
    /// The stream ended cleanly (terminating chunk).
    End,
    /// The connection broke mid-stream.
    Broken,
}

impl Watch {
    async fn next(&mut self) -> Next {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Next::Event(
                    serde_json::from_slice(&line).expect("one JSON object per line"),
                );
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => panic!("no watch event within {STEP:?}"),
                Ok(None) => {
                    assert!(self.buf.is_empty(), "a partial line at the end");
                    return Next::End;
                }
                Ok(Some(Err(_))) => return Next::Broken,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next event that is not a bookmark.
    async fn event(&mut self) -> Value {
        loop {
            match self.next().await {
                Next::Event(e) if e["type"] == "BOOKMARK" => continue,
                Next::Event(e) => return e,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }
}

fn rollout(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "SerinRollout",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion is a string")
        .parse()
        .expect("resourceVersion is an integer")
}

fn assert_status(body: &Value, code: u16, reason: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["status"], "Failure");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert!(
        body["message"].is_string() && body["metadata"].is_object(),
        "{body}"
    );
}

#[tokio::test]
async fn create_get_list_have_the_real_shapes() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);

    let mut body = rollout("web", json!({"canary": "v2", "weight": 5}));
    body["status"] = json!({"phase": "ignored"});
    let (code, created) = api.post(ROLLOUTS, body).await;
    assert_eq!(code, 201, "{created}");
    let meta = &created["metadata"];
    assert_eq!(
        (meta["name"].as_str(), meta["namespace"].as_str()),
        (Some("web"), Some(NS))
    );
    assert_eq!(meta["uid"].as_str().map(str::len), Some(36), "{meta}");
    assert_eq!(meta["generation"], 1);
    let ts = meta["creationTimestamp"].as_str().unwrap();
    assert!(
        ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
    assert_eq!(meta["managedFields"][0]["manager"], "fake-kube-test");
    assert_eq!(meta["managedFields"][0]["operation"], "Update");
    assert_eq!(created["apiVersion"], "serin.dev/v1alpha1");
    assert_eq!(created["kind"], "SerinRollout");
    assert!(
        created.get("status").is_none(),
        "create cannot set status: {created}"
    );

    let (code, got) = api.get(&format!("{ROLLOUTS}/web")).await;
    assert_eq!((code, &got), (200, &created));

    let (code, again) = api.post(ROLLOUTS, rollout("web", json!({}))).await;
    assert_eq!(code, 409);
    assert_status(&again, 409, "AlreadyExists");
    assert_eq!(
        again["message"],
        r#"serinrollouts.serin.dev "web" already exists"#
    );
    assert_eq!(
        again["details"],
        json!({"name": "web", "group": "serin.dev", "kind": "serinrollouts"})
    );

    // One global counter across resources.
    let (_, lease) = api
        .post(LEASES, json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"}}))
        .await;
    assert_eq!(rv(&lease), rv(&created) + 1);
    let (_, other) = api.post(ROLLOUTS, rollout("api", json!({}))).await;
    assert_eq!(rv(&other), rv(&lease) + 1);
    assert_eq!(fake.resource_version(), rv(&other));

    let (code, list) = api.get(ROLLOUTS).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "SerinRolloutList");
    assert_eq!(list["apiVersion"], "serin.dev/v1alpha1");
    assert_eq!(list["metadata"]["resourceVersion"], rv(&other).to_string());
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "web"]);

    let (_, one) = api
        .get(&format!("{ROLLOUTS}?fieldSelector=metadata.name%3Dweb"))
        .await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    assert_eq!(one["items"][0]["metadata"]["name"], "web");
    let (_, all) = api
        .get("/apis/serin.dev/v1alpha1/serinrollouts?fieldSelector=metadata.namespace%3Dfleet")
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let (_, none) = api
        .get("/apis/serin.dev/v1alpha1/namespaces/other/serinrollouts")
        .await;
    assert_eq!(none["items"], json!([]));
    let (code, bad) = api
        .get(&format!("{ROLLOUTS}?fieldSelector=spec.canary%3Dv2"))
        .await;
    assert_eq!(code, 400);
    assert_status(&bad, 400, "BadRequest");

    let (code, missing) = api.get(&format!("{ROLLOUTS}/nope")).await;
    assert_eq!(code, 404);
    assert_status(&missing, 404, "NotFound");
    assert_eq!(
        missing["message"],
        r#"serinrollouts.serin.dev "nope" not found"#
    );
    assert_eq!(
        missing["details"],
        json!({"name": "nope", "group": "serin.dev", "kind": "serinrollouts"})
    );
    let (code, unknown) = api
        .get("/apis/serin.dev/v1alpha1/namespaces/fleet/widgets")
        .await;
    assert_eq!(code, 404);
    assert_status(&unknown, 404, "NotFound");
    let (code, no_status) = api.get(&format!("{LEASES}/leader/status")).await;
    assert_eq!(code, 404, "leases have no status subresource: {no_status}");

    let (code, invalid) = api.post(ROLLOUTS, rollout("Not_A_Name", json!({}))).await;
    assert_eq!(code, 422);
    assert_status(&invalid, 422, "Invalid");

    let (code, _) = api
        .call(Method::DELETE, &format!("{ROLLOUTS}/api/status"), "", None)
        .await;
    assert_eq!(code, 405);
    let stale = json!({"preconditions": {"resourceVersion": "1"}});
    let (code, refused) = api
        .call(
            Method::DELETE,
            &format!("{ROLLOUTS}/api"),
            "application/json",
            Some(&stale),
        )
        .await;
    assert_eq!(code, 409);
    assert_status(&refused, 409, "Conflict");
    let (code, deleted) = api
        .call(Method::DELETE, &format!("{ROLLOUTS}/api"), "", None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(deleted["metadata"]["name"], "api");
    assert_eq!(rv(&deleted), fake.resource_version());
    assert!(fake.get("serinrollouts", NS, "api").is_none());
}

#[tokio::test]
async fn watch_replays_from_a_resource_version_then_streams_live_events() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let a = fake
        .create("serinrollouts", NS, rollout("a", json!({"weight": 1})))
        .unwrap();
    let a2 = fake
        .merge_patch("serinrollouts", NS, "a", json!({"spec": {"weight": 2}}))
        .unwrap();
    fake.create("leases", NS, json!({"metadata": {"name": "unrelated"}}))
        .unwrap();
    let b = fake
        .create("serinrollouts", NS, rollout("b", json!({})))
        .unwrap();

    let mut w = api
        .watch(&format!("{ROLLOUTS}?watch=true&resourceVersion={}", rv(&a)))
        .await;
    let e = w.event().await;
    assert_eq!(
        (e["type"].as_str(), rv(&e["object"])),
        (Some("MODIFIED"), rv(&a2))
    );
    assert_eq!(e["object"]["spec"]["weight"], 2);
    assert_eq!(e["object"]["kind"], "SerinRollout");
    let e = w.event().await;
    assert_eq!(
        (e["type"].as_str(), rv(&e["object"])),
        (Some("ADDED"), rv(&b))
    );

    // Live.
    let b2 = fake
        .merge_patch("serinrollouts", NS, "b", json!({"spec": {"weight": 7}}))
        .unwrap();
    let e = w.event().await;
    assert_eq!(
        (e["type"].as_str(), rv(&e["object"])),
        (Some("MODIFIED"), rv(&b2))
    );
    fake.delete("serinrollouts", NS, "a").unwrap();
    let e = w.event().await;
    assert_eq!(e["type"], "DELETED");
    assert_eq!(e["object"]["metadata"]["name"], "a");
    assert_eq!(rv(&e["object"]), fake.resource_version());

    // "0" (and no resourceVersion): ADDED for what exists, then live.
    let mut w0 = api
        .watch(&format!("{ROLLOUTS}?watch=1&resourceVersion=0"))
        .await;
    let e = w0.event().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );

    // A field selector filters; a label selector turns transitions into
    // ADDED/DELETED.
    let mut named = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&fieldSelector=metadata.name%3Dc"
        ))
        .await;
    let mut labelled = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&labelSelector=tier%3Dcanary"
        ))
        .await;
    eventually(STEP, "watches open", || async { fake.open_watches() == 4 }).await;
    fake.create("serinrollouts", NS, rollout("c", json!({})))
        .unwrap();
    fake.merge_patch(
        "serinrollouts",
        NS,
        "b",
        json!({"metadata": {"labels": {"tier": "canary"}}}),
    )
    .unwrap();
    fake.merge_patch(
        "serinrollouts",
        NS,
        "b",
        json!({"metadata": {"labels": {"tier": null}}}),
    )
    .unwrap();
    let e = named.event().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("c"))
    );
    let e = labelled.event().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
    let e = labelled.event().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("b"))
    );
    let e = w0.event().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("c"))
    );

    let records = fake.events();
    assert_eq!(
        records.last().unwrap().resource_version,
        fake.resource_version()
    );
    assert_eq!(records[0].event_type, "ADDED");
    assert_eq!(records[0].resource, "serinrollouts");
}

#[tokio::test]
async fn bookmarks_and_timeout_and_initial_events() {
    let fake = FakeKube::start_with(FakeKubeOptions {
        bookmark_interval: Duration::from_millis(50),
        ..FakeKubeOptions::default()
    })
    .await;
    let api = Api::new(&fake);
    let obj = fake
        .create("serinrollouts", NS, rollout("web", json!({})))
        .unwrap();
    fake.create("leases", NS, json!({"metadata": {"name": "later"}}))
        .unwrap();

    let started = Instant::now();
    let mut w = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&allowWatchBookmarks=true&timeoutSeconds=1&resourceVersion={}",
            rv(&obj)
        ))
        .await;
    let Next::Event(e) = w.next().await else {
        panic!("a bookmark")
    };
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["kind"], "SerinRollout");
    assert_eq!(e["object"]["apiVersion"], "serin.dev/v1alpha1");
    // Progress includes events of other resources.
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        fake.resource_version().to_string()
    );
    loop {
        match w.next().await {
            Next::Event(e) => assert_eq!(e["type"], "BOOKMARK"),
            Next::End => break,
            Next::Broken => panic!("timeoutSeconds ends the watch cleanly"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Without allowWatchBookmarks, none.
    let mut quiet = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&timeoutSeconds=1&resourceVersion={}",
            rv(&obj)
        ))
        .await;
    assert!(matches!(quiet.next().await, Next::End));

    // Streaming list: initial ADDED, then the initial-events-end bookmark.
    let mut list = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion="
        ))
        .await;
    assert_eq!(list.event().await["type"], "ADDED");
    let Next::Event(e) = list.next().await else {
        panic!("a bookmark")
    };
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[tokio::test]
async fn a_compacted_resource_version_gets_a_410_error_event() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let old = fake
        .create("serinrollouts", NS, rollout("web", json!({})))
        .unwrap();
    fake.merge_patch("serinrollouts", NS, "web", json!({"spec": {"weight": 1}}))
        .unwrap();
    fake.compact();
    let now = fake.resource_version();

    let mut w = api
        .watch(&format!(
            "{ROLLOUTS}?watch=true&resourceVersion={}",
            rv(&old)
        ))
        .await;
    let Next::Event(e) = w.next().await else {
        panic!("an ERROR event")
    };
    assert_eq!(e["type"], "ERROR");
    assert_status(&e["object"], 410, "Expired");
    assert_eq!(
        e["object"]["message"],
        format!("too old resource version: {} ({now})", rv(&old))
    );
    assert!(matches!(w.next().await, Next::End));

    // From the current resourceVersion, a watch works.
    let mut ok = api
        .watch(&format!("{ROLLOUTS}?watch=true&resourceVersion={now}"))
        .await;
    eventually(STEP, "watch open", || async { fake.open_watches() == 1 }).await;
    fake.merge_patch("serinrollouts", NS, "web", json!({"spec": {"weight": 2}}))
        .unwrap();
    assert_eq!(ok.event().await["type"], "MODIFIED");

    // A bounded history expires the oldest resourceVersions by itself.
    let small = FakeKube::start_with(FakeKubeOptions {
        history_limit: 2,
        ..FakeKubeOptions::default()
    })
    .await;
    let first = small
        .create("serinrollouts", NS, rollout("x", json!({})))
        .unwrap();
    for w in 1..4 {
        small
            .merge_patch("serinrollouts", NS, "x", json!({"spec": {"weight": w}}))
            .unwrap();
    }
    let mut w = Api::new(&small)
        .watch(&format!(
            "{ROLLOUTS}?watch=true&resourceVersion={}",
            rv(&first)
        ))
        .await;
    let Next::Event(e) = w.next().await else {
        panic!("an ERROR event")
    };
    assert_status(&e["object"], 410, "Expired");
}

#[tokio::test]
async fn merge_patch_with_a_stale_resource_version_is_a_conflict() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let created = fake
        .create("serinrollouts", NS, rollout("web", json!({"weight": 1})))
        .unwrap();
    let path = format!("{ROLLOUTS}/web");
    let current = created["metadata"]["resourceVersion"].clone();

    let (code, patched) = api
        .patch(
            &path,
            MERGE,
            json!({"metadata": {"resourceVersion": current}, "spec": {"weight": 2}}),
        )
        .await;
    assert_eq!(code, 200, "{patched}");
    assert!(rv(&patched) > rv(&created));

    let (code, stale) = api
        .patch(
            &path,
            MERGE,
            json!({"metadata": {"resourceVersion": current}, "spec": {"weight": 3}}),
        )
        .await;
    assert_eq!(code, 409);
    assert_status(&stale, 409, "Conflict");
    assert_eq!(
        stale["message"],
        r#"Operation cannot be fulfilled on serinrollouts.serin.dev "web": the object has been modified; please apply your changes to the latest version and try again"#
    );
    assert_eq!(
        stale["details"],
        json!({"name": "web", "group": "serin.dev", "kind": "serinrollouts"})
    );
    assert_eq!(
        fake.get("serinrollouts", NS, "web").unwrap()["spec"]["weight"],
        2
    );

    // Without a resourceVersion, a merge patch is unconditional; null removes.
    let (code, p) = api
        .patch(
            &path,
            MERGE,
            json!({"spec": {"weight": null, "canary": "v3"}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(p["spec"], json!({"canary": "v3"}));

    let (code, smp) = api
        .patch(&path, "application/strategic-merge-patch+json", json!({}))
        .await;
    assert_eq!(code, 415);
    assert_status(&smp, 415, "UnsupportedMediaType");
    let (code, jp) = api
        .patch(
            &path,
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/spec/canary", "value": "v4"}]),
        )
        .await;
    assert_eq!((code, &jp["spec"]["canary"]), (200, &json!("v4")));
    let (code, forced) = api
        .patch(&format!("{path}?force=true"), MERGE, json!({}))
        .await;
    assert_eq!(code, 422, "{forced}");

    // A no-op write changes nothing, not even the resourceVersion.
    let before = fake.resource_version();
    let (code, same) = api
        .patch(&path, MERGE, json!({"spec": {"canary": "v4"}}))
        .await;
    assert_eq!((code, rv(&same)), (200, before));
    assert_eq!(fake.resource_version(), before);
}

#[tokio::test]
async fn the_status_subresource_is_isolated_and_generation_counts_spec_changes() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let created = fake
        .create("serinrollouts", NS, rollout("web", json!({"weight": 1})))
        .unwrap();
    let path = format!("{ROLLOUTS}/web");

    // PUT /status changes only status.
    let mut body = created.clone();
    body["spec"] = json!({"weight": 99});
    body["metadata"]["labels"] = json!({"ignored": "yes"});
    body["status"] = json!({"phase": "Progressing"});
    let (code, put) = api.put(&format!("{path}/status"), body).await;
    assert_eq!(code, 200, "{put}");
    assert_eq!(put["status"], json!({"phase": "Progressing"}));
    assert_eq!(put["spec"], json!({"weight": 1}));
    assert!(put["metadata"].get("labels").is_none());
    assert_eq!(put["metadata"]["generation"], 1);
    assert_eq!(rv(&put), rv(&created) + 1);
    let status_manager = put["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subresource"] == "status")
        .expect("a status manager");
    assert_eq!(
        status_manager["fieldsV1"],
        json!({"f:status": {"f:phase": {}}})
    );

    // A patch of the main resource ignores status; spec bumps generation.
    let (code, main) = api
        .patch(
            &path,
            MERGE,
            json!({"spec": {"weight": 2}, "status": {"phase": "Hacked"}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(main["status"], json!({"phase": "Progressing"}));
    assert_eq!(main["metadata"]["generation"], 2);

    // Metadata-only and status-only changes do not.
    let (_, labelled) = api
        .patch(
            &path,
            MERGE,
            json!({"metadata": {"labels": {"app": "web"}}}),
        )
        .await;
    assert_eq!(labelled["metadata"]["generation"], 2);
    assert!(rv(&labelled) > rv(&main));
    let (_, status) = api
        .patch(
            &format!("{path}/status"),
            MERGE,
            json!({"status": {"phase": "Done"}, "spec": {"weight": 5}}),
        )
        .await;
    assert_eq!(status["metadata"]["generation"], 2);
    assert_eq!(
        (
            status["status"]["phase"].as_str(),
            &status["spec"]["weight"]
        ),
        (Some("Done"), &json!(2))
    );

    // PUT of a custom resource needs a resourceVersion; a stale one conflicts.
    let mut unversioned = rollout("web", json!({"weight": 3}));
    let (code, invalid) = api.put(&path, unversioned.clone()).await;
    assert_eq!(code, 422);
    assert_status(&invalid, 422, "Invalid");
    unversioned["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"].clone();
    let (code, stale) = api.put(&path, unversioned.clone()).await;
    assert_eq!(code, 409);
    assert_status(&stale, 409, "Conflict");
    unversioned["metadata"]["resourceVersion"] = status["metadata"]["resourceVersion"].clone();
    unversioned["status"] = json!({"phase": "Ignored"});
    let (code, replaced) = api.put(&path, unversioned).await;
    assert_eq!(code, 200);
    assert_eq!(replaced["metadata"]["generation"], 3);
    assert_eq!(replaced["status"]["phase"], "Done");
    assert!(
        replaced["metadata"].get("labels").is_none(),
        "PUT replaces labels"
    );
}

#[tokio::test]
async fn server_side_apply_merges_members_by_pod_and_tracks_ownership() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let path = format!("{ROLLOUTS}/web");
    let status = format!("{path}/status");
    let config = |status: Value| json!({"apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout", "metadata": {"name": "web"}, "status": status});

    // Apply creates a missing object through the main resource.
    let (code, created) = api
        .apply(&path, "operator", false, json!({"apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout", "metadata": {"name": "web"}, "spec": {"weight": 5}}))
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["metadata"]["managedFields"][0]["operation"],
        "Apply"
    );
    let mut nope = config(json!({}));
    nope["metadata"]["name"] = json!("nope");
    let (code, missing) = api
        .apply(&format!("{ROLLOUTS}/nope/status"), "a", false, nope)
        .await;
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
    let (code, mismatch) = api
        .apply(&format!("{ROLLOUTS}/other"), "a", false, config(json!({})))
        .await;
    assert_eq!(
        (code, mismatch["reason"].as_str()),
        (400, Some("BadRequest")),
        "{mismatch}"
    );

    // Each member applies its own entry.
    let (code, a) = api
        .apply(
            &status,
            "pod-a",
            false,
            config(json!({"members": [{"pod": "a", "ready": true}]})),
        )
        .await;
    assert_eq!(code, 200, "{a}");
    let (_, b) = api
        .apply(
            &status,
            "pod-b",
            false,
            config(json!({"members": [{"pod": "b", "ready": false}]})),
        )
        .await;
    assert_eq!(
        b["status"]["members"],
        json!([{"pod": "a", "ready": true}, {"pod": "b", "ready": false}])
    );
    let (_, a2) = api
        .apply(
            &status,
            "pod-a",
            false,
            config(json!({"members": [{"pod": "a", "ready": false, "epoch": 2}]})),
        )
        .await;
    assert_eq!(
        a2["status"]["members"],
        json!([{"pod": "a", "ready": false, "epoch": 2}, {"pod": "b", "ready": false}])
    );
    assert_eq!(
        a2["metadata"]["generation"], 1,
        "status changes keep the generation"
    );
    let b_fields = a2["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "pod-b")
        .unwrap();
    assert_eq!(b_fields["operation"], "Apply");
    assert_eq!(b_fields["subresource"], "status");
    assert_eq!(
        b_fields["fieldsV1"],
        json!({"f:status": {"f:members": {"k:{\"pod\":\"b\"}": {".": {}, "f:pod": {}, "f:ready": {}}}}})
    );

    // Re-applying the same thing is a no-op.
    let before = fake.resource_version();
    api.apply(
        &status,
        "pod-b",
        false,
        config(json!({"members": [{"pod": "b", "ready": false}]})),
    )
    .await;
    assert_eq!(fake.resource_version(), before);

    // A field another manager owns with another value conflicts...
    let (code, _) = api
        .apply(
            &status,
            "pod-a",
            false,
            config(json!({"members": [{"pod": "a", "ready": false, "epoch": 2}], "phase": "A"})),
        )
        .await;
    assert_eq!(code, 200);
    let (code, conflict) = api
        .apply(
            &status,
            "leader",
            false,
            config(json!({"phase": "B", "fleet": {"leader": "b"}})),
        )
        .await;
    assert_eq!(code, 409);
    assert_status(&conflict, 409, "Conflict");
    assert_eq!(
        conflict["message"],
        r#"Apply failed with 1 conflict: conflict with "pod-a" with subresource "status": .status.phase"#
    );
    assert_eq!(conflict["details"]["causes"][0]["field"], ".status.phase");
    assert_eq!(
        fake.get("serinrollouts", NS, "web").unwrap()["status"]["phase"],
        "A"
    );
    // ...the same value is shared, and force takes ownership.
    let (code, shared) = api
        .apply(&status, "observer", false, config(json!({"phase": "A"})))
        .await;
    assert_eq!(code, 200, "{shared}");
    let (code, forced) = api
        .apply(
            &status,
            "leader",
            true,
            config(json!({"phase": "B", "fleet": {"leader": "b"}})),
        )
        .await;
    assert_eq!(code, 200, "{forced}");
    assert_eq!(forced["status"]["phase"], "B");
    assert_eq!(forced["status"]["fleet"], json!({"leader": "b"}));
    let owners: Vec<&str> = forced["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["fieldsV1"]["f:status"].get("f:phase").is_some())
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(owners, ["leader"]);

    // A manager that stops applying a field it alone owned removes it; a
    // dropped list-map entry goes too; other members' entries stay.
    let (_, dropped) = api
        .apply(&status, "pod-a", false, config(json!({"members": []})))
        .await;
    assert_eq!(
        dropped["status"]["members"],
        json!([{"pod": "b", "ready": false}])
    );
    assert_eq!(dropped["status"]["phase"], "B", "owned by the leader now");
    let (_, fleet) = api
        .apply(
            &status,
            "leader",
            true,
            config(json!({"fleet": {"leader": "b"}})),
        )
        .await;
    assert!(fleet["status"].get("phase").is_none(), "{fleet}");
    assert_eq!(
        fleet["spec"],
        json!({"weight": 5}),
        "status applies leave spec alone"
    );

    // Applies on the main resource ignore status; fieldManager is required.
    let (_, main) = api
        .apply(&path, "operator", false, json!({"apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout", "metadata": {"name": "web"}, "spec": {"weight": 6}, "status": {"phase": "X"}}))
        .await;
    assert_eq!(
        (
            main["spec"]["weight"].as_i64(),
            main["metadata"]["generation"].as_i64()
        ),
        (Some(6), Some(2))
    );
    assert!(main["status"].get("phase").is_none());
    let (code, no_manager) = api.patch(&status, APPLY, config(json!({}))).await;
    assert_eq!(code, 422);
    assert_status(&no_manager, 422, "Invalid");
    assert_eq!(
        no_manager["message"],
        r#"PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch"#
    );

    // YAML bodies are accepted too.
    let resp = api
        .send(
            Method::PATCH,
            &format!("{status}?fieldManager=pod-c"),
            APPLY,
            None,
        )
        .await;
    assert_eq!(resp.status(), 400, "an empty body is no object");
    let yaml = "apiVersion: serin.dev/v1alpha1\nkind: SerinRollout\nmetadata:\n  name: web\nstatus:\n  members:\n  - pod: c\n    ready: true\n";
    let req = Request::builder()
        .method(Method::PATCH)
        .uri(format!("{}{status}?fieldManager=pod-c", fake.url()))
        .header("content-type", APPLY)
        .body(http_body_util::Either::Left(http_body_util::Full::new(
            Bytes::from(yaml),
        )))
        .unwrap();
    let resp = api.client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let members = &fake.get("serinrollouts", NS, "web").unwrap()["status"]["members"];
    assert_eq!(
        members,
        &json!([{"pod": "b", "ready": false}, {"pod": "c", "ready": true}])
    );
}

#[tokio::test]
async fn leases_replace_with_resource_version_conflicts() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let lease = |holder: &str, rv: Option<&Value>| {
        let mut l = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "serin-leader"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": "2024-01-01T00:00:00.000000Z", "renewTime": "2024-01-01T00:00:00.000000Z", "leaseTransitions": 0},
        });
        if let Some(rv) = rv {
            l["metadata"]["resourceVersion"] = rv.clone();
        }
        l
    };
    let (code, created) = api.post(LEASES, lease("pod-a", None)).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["kind"], "Lease");
    let (code, again) = api.post(LEASES, lease("pod-b", None)).await;
    assert_eq!(
        (code, again["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );

    let path = format!("{LEASES}/serin-leader");
    let (code, renewed) = api
        .put(
            &path,
            lease("pod-a", Some(&created["metadata"]["resourceVersion"])),
        )
        .await;
    assert_eq!(code, 200, "{renewed}");
    // An unchanged PUT is a no-op; a changed one bumps the resourceVersion.
    assert_eq!(rv(&renewed), rv(&created));
    let mut renewal = lease("pod-a", Some(&created["metadata"]["resourceVersion"]));
    renewal["spec"]["renewTime"] = json!("2024-01-01T00:00:05.000000Z");
    let (code, renewed) = api.put(&path, renewal).await;
    assert_eq!(code, 200);
    assert_eq!(rv(&renewed), rv(&created) + 1);
    assert_eq!(renewed["metadata"]["generation"], 2);

    // A contender with the old resourceVersion loses.
    let (code, lost) = api
        .put(
            &path,
            lease("pod-b", Some(&created["metadata"]["resourceVersion"])),
        )
        .await;
    assert_eq!(code, 409);
    assert_status(&lost, 409, "Conflict");
    assert_eq!(
        lost["message"],
        r#"Operation cannot be fulfilled on leases.coordination.k8s.io "serin-leader": the object has been modified; please apply your changes to the latest version and try again"#
    );
    assert_eq!(
        fake.get("leases", NS, "serin-leader").unwrap()["spec"]["holderIdentity"],
        "pod-a"
    );
    let (code, won) = api
        .put(
            &path,
            lease("pod-b", Some(&renewed["metadata"]["resourceVersion"])),
        )
        .await;
    assert_eq!(
        (code, won["spec"]["holderIdentity"].as_str()),
        (200, Some("pod-b"))
    );

    // Leases are built in: DELETE answers a Status.
    let (code, gone) = api.call(Method::DELETE, &path, "", None).await;
    assert_eq!(code, 200);
    assert_eq!(
        (gone["kind"].as_str(), gone["status"].as_str()),
        (Some("Status"), Some("Success"))
    );
    let (code, _) = api.get(&path).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn going_down_refuses_connections_and_coming_back_keeps_the_state() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    fake.create("serinrollouts", NS, rollout("web", json!({"weight": 1})))
        .unwrap();
    let mut w = api.watch(&format!("{ROLLOUTS}?watch=true")).await;
    assert_eq!(w.event().await["type"], "ADDED");
    let (code, _) = api.get(&format!("{ROLLOUTS}/web")).await;
    assert_eq!(code, 200);

    fake.go_down().await;
    assert!(!fake.is_up());
    assert!(matches!(w.next().await, Next::Broken | Next::End));
    assert!(
        tokio::net::TcpStream::connect(fake.addr()).await.is_err(),
        "refused while down"
    );
    let url = format!("{}{ROLLOUTS}/web", fake.url());
    let req = Request::get(url).body(serin_tests::empty()).unwrap();
    assert!(http1_client().request(req).await.is_err());
    // Writes through the handle still work while it is down.
    fake.merge_patch("serinrollouts", NS, "web", json!({"spec": {"weight": 2}}))
        .unwrap();

    fake.come_back().await.unwrap();
    assert!(fake.is_up());
    let (code, got) = api.get(&format!("{ROLLOUTS}/web")).await;
    assert_eq!((code, &got["spec"]["weight"]), (200, &json!(2)));
}

#[tokio::test]
async fn drop_watches_cuts_streams_and_end_watches_ends_them() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);
    let mut w1 = api.watch(&format!("{ROLLOUTS}?watch=true")).await;
    let mut w2 = api
        .watch(&format!("{LEASES}?watch=true&allowWatchBookmarks=true"))
        .await;
    eventually(STEP, "two watches open", || async {
        fake.open_watches() == 2
    })
    .await;
    fake.drop_watches();
    assert!(matches!(w1.next().await, Next::Broken));
    assert!(matches!(w2.next().await, Next::Broken));
    eventually(STEP, "watches closed", || async {
        fake.open_watches() == 0
    })
    .await;

    let mut w3 = api.watch(&format!("{ROLLOUTS}?watch=true")).await;
    eventually(STEP, "watch open", || async { fake.open_watches() == 1 }).await;
    fake.end_watches();
    assert!(matches!(w3.next().await, Next::End));
    // The connection survives a clean end (keep-alive).
    let (code, _) = api.get(ROLLOUTS).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn injected_failures_latency_counts_and_kubeconfig() {
    let fake = FakeKube::start().await;
    let api = Api::new(&fake);

    fake.fail_next(2, 500);
    let (code, failed) = api.post(ROLLOUTS, rollout("web", json!({}))).await;
    assert_eq!(code, 500);
    assert_status(&failed, 500, "InternalError");
    let (code, _) = api.get(ROLLOUTS).await;
    assert_eq!(code, 200, "reads are not failed");
    let (code, failed) = api.post(ROLLOUTS, rollout("web", json!({}))).await;
    assert_eq!(code, 500);
    assert_status(&failed, 500, "InternalError");
    let (code, _) = api.post(ROLLOUTS, rollout("web", json!({}))).await;
    assert_eq!(code, 201);
    fake.fail_next(1, 409);
    let (code, conflict) = api
        .patch(&format!("{ROLLOUTS}/web"), MERGE, json!({}))
        .await;
    assert_eq!(code, 409);
    assert_status(&conflict, 409, "Conflict");

    let base = fake.requests();
    api.get(&format!("{ROLLOUTS}/web")).await;
    api.apply(&format!("{ROLLOUTS}/web/status"), "m", false, json!({"apiVersion": "serin.dev/v1alpha1", "kind": "SerinRollout", "status": {"phase": "A"}})).await;
    api.put(
        &format!("{ROLLOUTS}/web"),
        fake.get("serinrollouts", NS, "web").unwrap(),
    )
    .await;
    api.call(Method::DELETE, &format!("{ROLLOUTS}/web"), "", None)
        .await;
    let _w = api.watch(&format!("{LEASES}?watch=true")).await;
    let counts = fake.requests().since(&base);
    assert_eq!(counts.get("get", "serinrollouts"), 1);
    assert_eq!(counts.get("apply", "serinrollouts/status"), 1);
    assert_eq!(counts.get("update", "serinrollouts"), 1);
    assert_eq!(counts.get("delete", "serinrollouts"), 1);
    assert_eq!(counts.get("watch", "leases"), 1);
    assert_eq!(counts.resource("serinrollouts"), 4);
    assert_eq!(counts.total(), 5);
    let all = fake.requests();
    assert_eq!(all.verb("create"), 3);
    assert_eq!(all.verb("list"), 1);
    assert_eq!(all.verb("patch"), 1);

    fake.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    api.get(ROLLOUTS).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    fake.set_latency(Duration::ZERO);

    let dir = serin_tests::temp_dir("kubeconfig");
    let path = dir.join("config");
    fake.write_kubeconfig(&path, "fleet").unwrap();
    let config: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        (config["apiVersion"].as_str(), config["kind"].as_str()),
        (Some("v1"), Some("Config"))
    );
    let current = config["current-context"].as_str().unwrap();
    let context = config["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == current)
        .unwrap();
    assert_eq!(context["context"]["namespace"], "fleet");
    let cluster = config["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == context["context"]["cluster"])
        .unwrap();
    assert_eq!(cluster["cluster"]["server"], fake.url());
    assert!(config["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == context["context"]["user"]));
}
