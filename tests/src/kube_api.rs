//! A small in-process fake Kubernetes API server that speaks the real wire
//! protocol for what serin's fleet mode uses: namespaced custom resources
//! (`serin.dev/v1alpha1` `serinrollouts`, with a status subresource) and
//! `coordination.k8s.io/v1` `leases`, over plain HTTP/1.1 on 127.0.0.1 with
//! keep-alive. A kube-rs client reaches it through [`FakeKube::write_kubeconfig`].
//! It is the test environment, not a mock: semantics follow the real API
//! server where serin can observe them.
//!
//! # Handle
//!
//! [`FakeKube::start`] (or [`FakeKube::start_with`] and [`FakeKubeOptions`])
//! binds 127.0.0.1:0 and serves until dropped.
//!
//! - Address: [`FakeKube::addr`], [`FakeKube::url`]; kubeconfig:
//!   [`FakeKube::kubeconfig`], [`FakeKube::write_kubeconfig`].
//! - Objects, through the same code as HTTP (field manager `fake-kube`, not
//!   counted as requests, no latency or injected failures):
//!   [`FakeKube::create`], [`FakeKube::get`], [`FakeKube::list`],
//!   [`FakeKube::replace`], [`FakeKube::replace_status`],
//!   [`FakeKube::merge_patch`], [`FakeKube::merge_patch_status`],
//!   [`FakeKube::apply`], [`FakeKube::apply_status`], [`FakeKube::delete`].
//!   Resources are named by plural (`"serinrollouts"`, `"leases"`) or
//!   `plural.group`.
//! - Faults: [`FakeKube::drop_watches`] (close every open watch's connection
//!   mid-stream),
//!   [`FakeKube::end_watches`] (end them cleanly, as a server-side timeout),
//!   [`FakeKube::compact`] (forget the event history: older
//!   resourceVersions get 410), [`FakeKube::go_down`] /
//!   [`FakeKube::come_back`] (close the listener and every connection; listen
//!   again on the same port, state intact), [`FakeKube::set_latency`],
//!   [`FakeKube::fail_next`] (the next n HTTP writes answer a `Status` with
//!   that code).
//! - Introspection: [`FakeKube::requests`] (counts by verb and resource, a
//!   [`RequestCounts`] snapshot), [`FakeKube::open_watches`],
//!   [`FakeKube::resource_version`], [`FakeKube::events`] (the retained event
//!   history).
//!
//! # Wire protocol
//!
//! Paths `/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/status]]`
//! (and `/api/v1/...` for a core resource registered with group `""`), plus
//! `/apis/{group}/{version}/{plural}` for list and watch across namespaces.
//! Verbs: get, list, watch, create (POST), update (PUT), patch
//! (`application/merge-patch+json`, `application/json-patch+json`;
//! strategic merge answers 415 for custom resources and is treated as a
//! merge patch for built-in ones), apply (`application/apply-patch+yaml`,
//! JSON or YAML body, `fieldManager` required, `force`), delete (with
//! `preconditions`). `dryRun=All` is honoured. `/version`, `/healthz`,
//! `/api`, `/apis` and `/apis/{group}/{version}` answer discovery documents.
//! Errors are `Status` objects with the real reasons and messages. Unknown
//! paths answer a 404 `Status`.
//!
//! One global resourceVersion counter, bumped by every write that changes
//! something (no-op writes change nothing, as on the real server). Watches
//! replay events after `resourceVersion` from a bounded history (or send
//! `ADDED` for every object when it is absent or `"0"`, or with
//! `sendInitialEvents=true`, then the `k8s.io/initial-events-end` bookmark),
//! then stream live events; `BOOKMARK`s every
//! [`FakeKubeOptions::bookmark_interval`] with `allowWatchBookmarks`; a
//! resourceVersion older than the history gets a 200 with one `ERROR` event
//! (410 `Expired`, "too old resource version: X (Y)") and the end of the
//! stream; `timeoutSeconds` ends the stream cleanly.
//!
//! Server-side apply merges maps recursively, replaces lists unless they are
//! declared list-maps ([`ResourceDef::list_maps`]; `status.members` keyed by
//! `pod` for serinrollouts), tracks ownership per leaf and list-map entry
//! per (manager, operation, subresource), answers 409 with the real conflict
//! message unless `force=true`, and removes fields (and list-map entries) a
//! manager stops applying when nobody else owns them. Updates (create, PUT,
//! merge patch) take ownership of the fields they change. Ownership is
//! rendered in `metadata.managedFields` (`FieldsV1`).
//!
//! # Deviations from the real API server
//!
//! - No authentication (the kubeconfig's token is ignored), authorization,
//!   admission, OpenAPI schema validation, defaulting, pruning of unknown
//!   fields, or finalizer handling (delete is immediate). Namespaces need not
//!   exist.
//! - List ignores `limit`/`continue` (one page) and `resourceVersion` /
//!   `resourceVersionMatch` (always the latest state); items always carry
//!   `apiVersion` and `kind`. Field selectors support `metadata.name` and
//!   `metadata.namespace` only (others answer 400, as for custom resources);
//!   label selectors are implemented (equality, existence, `in`, `notin`).
//! - A watch from a resourceVersion newer than the current one answers
//!   504 at once instead of waiting up to 3 s for the cache.
//! - A watch without `timeoutSeconds` lasts 30 minutes (the real server picks
//!   30 to 60). A watcher that falls 1024 events behind is closed.
//! - `null` in an applied configuration is ignored; list-maps are only the
//!   declared ones (other lists are atomic); sets (`listType=set`) are atomic.
//! - Managed fields sent by clients are ignored; updates never conflict.
//! - Built-in resources (leases): PUT creates a missing object, PUT without
//!   `resourceVersion` is unconditional, delete answers a `Status`, and
//!   `metadata.generation` is kept like a custom resource without status
//!   subresource (bumped by every change outside metadata).
//! - Only HTTP/1.1; no protobuf, no CBOR, no `Table` output.

// `StatusError` is the API's answer, fields and all; test support does not
// need it boxed.
#![allow(clippy::result_large_err)]

mod fields;
mod http;
mod select;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

pub use store::StatusError;
use store::{Store, Sub, WriteCtx};

/// A kind of namespaced object the fake serves.
#[derive(Clone, Debug)]
pub struct ResourceDef {
    /// API group; `""` for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    /// The path segment, e.g. `serinrollouts`.
    pub plural: String,
    /// e.g. `SerinRollout`; lists are `{kind}List`.
    pub kind: String,
    /// Whether `/status` is a subresource: then the main resource ignores
    /// status, `/status` changes only status, and only spec changes bump
    /// `metadata.generation`.
    pub has_status: bool,
    /// Lists of objects merged by key in server-side apply: (dotted path,
    /// key field), e.g. `("status.members", "pod")`.
    pub list_maps: Vec<(String, String)>,
    /// A built-in type rather than a custom resource (see the module's
    /// deviations).
    pub builtin: bool,
}

impl ResourceDef {
    /// A custom resource with a status subresource and no list-maps.
    pub fn custom(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            has_status: true,
            list_maps: Vec::new(),
            builtin: false,
        }
    }

    /// `serin.dev/v1alpha1` `serinrollouts`, `status.members` keyed by `pod`.
    pub fn serin_rollout() -> Self {
        Self::custom("serin.dev", "v1alpha1", "serinrollouts", "SerinRollout")
            .with_list_map("status.members", "pod")
    }

    /// `coordination.k8s.io/v1` `leases`, no status subresource.
    pub fn lease() -> Self {
        Self {
            has_status: false,
            builtin: true,
            ..Self::custom("coordination.k8s.io", "v1", "leases", "Lease")
        }
    }

    /// Core `v1` `configmaps` (`/api/v1/...`), no status subresource.
    pub fn config_map() -> Self {
        Self {
            has_status: false,
            builtin: true,
            ..Self::custom("", "v1", "configmaps", "ConfigMap")
        }
    }

    /// Declares the list at `path` (dotted) a list-map keyed by `key`.
    pub fn with_list_map(mut self, path: &str, key: &str) -> Self {
        self.list_maps.push((path.into(), key.into()));
        self
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group`, as error messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// How a [`FakeKube`] starts.
#[derive(Clone, Debug)]
pub struct FakeKubeOptions {
    /// The resources served (default: serinrollouts, leases and configmaps).
    pub resources: Vec<ResourceDef>,
    /// Between `BOOKMARK` events on watches that allow them (default 1 s;
    /// the real server sends one about every minute).
    pub bookmark_interval: Duration,
    /// Events retained for watch replay (default 1000); a watch from before
    /// the oldest retained event gets 410.
    pub history_limit: usize,
}

impl Default for FakeKubeOptions {
    fn default() -> Self {
        Self {
            resources: vec![
                ResourceDef::serin_rollout(),
                ResourceDef::lease(),
                ResourceDef::config_map(),
            ],
            bookmark_interval: Duration::from_secs(1),
            history_limit: 1000,
        }
    }
}

/// API requests counted by (verb, resource): verbs `get`, `list`, `watch`,
/// `create`, `update`, `patch`, `apply`, `delete`; resources by plural, with
/// `/status` for the subresource (`serinrollouts/status`); discovery
/// requests as (`get`, `discovery`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts(pub BTreeMap<(String, String), u64>);

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Requests with this verb, on any resource.
    pub fn verb(&self, verb: &str) -> u64 {
        self.0
            .iter()
            .filter(|((v, _), _)| v == verb)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests on this resource, its subresources included.
    pub fn resource(&self, resource: &str) -> u64 {
        self.0
            .iter()
            .filter(|((_, r), _)| {
                r == resource
                    || r.strip_prefix(resource)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests with this verb on exactly this resource (or `plural/status`).
    pub fn get(&self, verb: &str, resource: &str) -> u64 {
        self.0
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The requests counted since `earlier`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .map(|(k, n)| (k.clone(), n - earlier.0.get(k).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }
}

/// One retained event of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub resource_version: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub event_type: &'static str,
    /// The plural.
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

/// An open watch: killed ones end with an error (the connection is cut).
pub(crate) struct WatchSlot {
    pub(crate) killed: Arc<AtomicBool>,
    pub(crate) task: Option<AbortHandle>,
}

/// State shared by the handle, the server and the watch tasks.
pub(crate) struct Inner {
    pub(crate) store: Mutex<Store>,
    pub(crate) bookmark_interval: Mutex<Duration>,
    pub(crate) latency: Mutex<Duration>,
    /// (remaining, status code) of injected write failures.
    failures: Mutex<(u32, u16)>,
    counts: Mutex<BTreeMap<(String, String), u64>>,
    pub(crate) watches: Mutex<HashMap<u64, WatchSlot>>,
    pub(crate) watch_seq: AtomicU64,
}

impl Inner {
    pub(crate) fn count(&self, verb: &str, resource: &str) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry((verb.to_owned(), resource.to_owned()))
            .or_default() += 1;
    }

    /// The status code to fail this write with, if failures are pending.
    pub(crate) fn take_failure(&self) -> Option<u16> {
        let mut f = self.failures.lock().unwrap();
        if f.0 == 0 {
            return None;
        }
        f.0 -= 1;
        Some(f.1)
    }

    /// Ends every open watch; `kill` cuts the connections mid-stream.
    fn end_watches(&self, kill: bool) {
        let tasks: Vec<AbortHandle> = self
            .watches
            .lock()
            .unwrap()
            .values()
            .filter_map(|w| {
                if kill {
                    w.killed.store(true, Ordering::SeqCst);
                }
                w.task.clone()
            })
            .collect();
        for t in tasks {
            t.abort();
        }
    }
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The fake API server. See the module documentation.
pub struct FakeKube {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().ok().and_then(|mut s| s.take()) {
            server.task.abort();
        }
        self.inner.end_watches(true);
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A helper's write: field manager `fake-kube`, never a dry run.
const HELPER: WriteCtx<'static> = WriteCtx {
    manager: "fake-kube",
    dry_run: false,
};

impl FakeKube {
    /// Serves serinrollouts, leases and configmaps on 127.0.0.1 with a free port.
    pub async fn start() -> Self {
        Self::start_with(FakeKubeOptions::default()).await
    }

    pub async fn start_with(options: FakeKubeOptions) -> Self {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new(options.resources, options.history_limit)),
            bookmark_interval: Mutex::new(options.bookmark_interval),
            latency: Mutex::new(Duration::ZERO),
            failures: Mutex::new((0, 500)),
            counts: Mutex::new(BTreeMap::new()),
            watches: Mutex::new(HashMap::new()),
            watch_seq: AtomicU64::new(1),
        });
        let listener =
            bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind the fake API server");
        let addr = listener.local_addr().expect("bound address");
        let server = Self::spawn(listener, &inner);
        Self {
            inner,
            addr,
            server: Mutex::new(Some(server)),
        }
    }

    fn spawn(listener: TcpListener, inner: &Arc<Inner>) -> Server {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(http::serve(listener, inner.clone(), stopped));
        Server { stop, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server with
    /// `namespace` as the default namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake-kube
  cluster:
    server: {url}
contexts:
- name: fake-kube
  context:
    cluster: fake-kube
    namespace: {namespace}
    user: fake-kube
current-context: fake-kube
users:
- name: fake-kube
  user:
    token: fake-token
preferences: {{}}
",
            url = self.url()
        )
    }

    /// Writes [`FakeKube::kubeconfig`] to `path`, for `KUBECONFIG`.
    pub fn write_kubeconfig(
        &self,
        path: impl AsRef<std::path::Path>,
        namespace: &str,
    ) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig(namespace))
    }

    /// Whether it is listening (not between `go_down` and `come_back`).
    pub fn is_up(&self) -> bool {
        self.server.lock().unwrap().is_some()
    }

    /// Closes the listener and every open connection (watches included);
    /// new connections are refused until [`FakeKube::come_back`]. Returns
    /// once all are closed.
    pub async fn go_down(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
        self.inner.end_watches(true);
    }

    /// Listens again on the same port, with the state intact.
    pub async fn come_back(&self) -> std::io::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        let listener = bind(self.addr)?;
        let server = Self::spawn(listener, &self.inner);
        *self.server.lock().unwrap() = Some(server);
        Ok(())
    }

    /// Ends every open watch abruptly: the connection is closed mid-stream
    /// (no terminating chunk). hyper's client reports an error; kube-rs maps
    /// that unexpected EOF to the end of the watch stream (and logs "eof in
    /// poll"), as it does when a real API server's connection breaks.
    pub fn drop_watches(&self) {
        self.inner.end_watches(true);
    }

    /// Ends every open watch cleanly, as a server-side watch timeout does.
    pub fn end_watches(&self) {
        self.inner.end_watches(false);
    }

    /// Watches currently streaming.
    pub fn open_watches(&self) -> usize {
        self.inner.watches.lock().unwrap().len()
    }

    /// Forgets the event history: a watch from any resourceVersion older than
    /// the current one gets a 410 `Expired` ERROR event.
    pub fn compact(&self) {
        self.inner.store.lock().unwrap().compact();
    }

    /// Delays every HTTP response by `latency` (zero to stop).
    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.lock().unwrap() = latency;
    }

    /// The bookmark interval for watches started from now on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self.inner.bookmark_interval.lock().unwrap() = interval;
    }

    /// The next `n` HTTP writes (create, update, patch, apply, delete) answer
    /// a `Status` with `code` (e.g. 409, 500, 503) and change nothing.
    pub fn fail_next(&self, n: u32, code: u16) {
        *self.inner.failures.lock().unwrap() = (n, code);
    }

    /// A snapshot of the HTTP requests counted so far.
    pub fn requests(&self) -> RequestCounts {
        RequestCounts(self.inner.counts.lock().unwrap().clone())
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store.lock().unwrap().resource_version()
    }

    /// The retained event history, oldest first.
    pub fn events(&self) -> Vec<EventRecord> {
        let store = self.inner.store.lock().unwrap();
        store
            .history()
            .map(|e| EventRecord {
                resource_version: e.rv,
                event_type: e.kind.as_str(),
                resource: store.resources[e.res].plural.clone(),
                namespace: e.namespace.clone(),
                name: e.name.clone(),
            })
            .collect()
    }

    fn with_store<T>(
        &self,
        resource: &str,
        f: impl FnOnce(&mut Store, usize) -> Result<T, StatusError>,
    ) -> Result<T, StatusError> {
        let mut store = self.inner.store.lock().unwrap();
        let res = store.find(resource).ok_or_else(|| {
            StatusError::from_code(404, "the server could not find the requested resource")
        })?;
        f(&mut store, res)
    }

    fn status_sub(store: &Store, res: usize) -> Result<Sub, StatusError> {
        if store.resources[res].has_status {
            Ok(Sub::Status)
        } else {
            Err(StatusError::from_code(
                404,
                "the server could not find the requested resource",
            ))
        }
    }

    /// Creates `object` (POST semantics).
    pub fn create(
        &self,
        resource: &str,
        namespace: &str,
        object: Value,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| s.create(r, namespace, &object, &HELPER))
    }

    /// The object, if it exists.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.with_store(resource, |s, r| Ok(s.get(r, namespace, name)))
            .ok()
            .flatten()
    }

    /// The objects in `namespace`, by name.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        self.with_store(resource, |s, r| Ok(s.list(r, Some(namespace)).0))
            .unwrap_or_default()
    }

    /// Replaces the object (PUT semantics: status ignored with a status
    /// subresource; custom resources need `metadata.resourceVersion`).
    pub fn replace(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| {
            s.replace(r, namespace, name, Sub::Main, &object, &HELPER)
        })
    }

    /// Replaces the status (PUT to `/status`).
    pub fn replace_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| {
            let sub = Self::status_sub(s, r)?;
            s.replace(r, namespace, name, sub, &object, &HELPER)
        })
    }

    /// A JSON merge patch (RFC 7386) of the object.
    pub fn merge_patch(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| {
            s.patch(r, namespace, name, Sub::Main, &patch, false, &HELPER)
        })
    }

    /// A JSON merge patch through `/status`.
    pub fn merge_patch_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| {
            let sub = Self::status_sub(s, r)?;
            s.patch(r, namespace, name, sub, &patch, false, &HELPER)
        })
    }

    /// Server-side apply of `config` by `manager` (creates the object if
    /// missing).
    pub fn apply(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        manager: &str,
        force: bool,
        config: Value,
    ) -> Result<Value, StatusError> {
        let ctx = WriteCtx {
            manager,
            dry_run: false,
        };
        self.with_store(resource, |s, r| {
            s.apply(r, namespace, name, Sub::Main, &config, force, &ctx)
                .map(|(o, _)| o)
        })
    }

    /// Server-side apply through `/status`.
    pub fn apply_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        manager: &str,
        force: bool,
        config: Value,
    ) -> Result<Value, StatusError> {
        let ctx = WriteCtx {
            manager,
            dry_run: false,
        };
        self.with_store(resource, |s, r| {
            let sub = Self::status_sub(s, r)?;
            s.apply(r, namespace, name, sub, &config, force, &ctx)
                .map(|(o, _)| o)
        })
    }

    /// Deletes the object; answers what DELETE answers.
    pub fn delete(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, StatusError> {
        self.with_store(resource, |s, r| {
            s.delete(r, namespace, name, &Value::Null, false)
        })
    }
}
