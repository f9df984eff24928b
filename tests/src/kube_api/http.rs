//! The wire protocol: HTTP/1.1 connections, routing of Kubernetes API paths,
//! verbs and their query parameters, JSON responses, and watch streams.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::select::Selector;
use super::store::{Event, EventType, StatusError, Store, Sub, WatchStart, WriteCtx};
use super::{Inner, ResourceDef, WatchSlot};

/// The largest request body the real server takes (3 MiB).
const MAX_BODY: usize = 3 << 20;
/// The watch timeout when the client sets none (the real server picks one
/// between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Accepts connections until `stop` fires, then closes the listener and
/// every open connection before returning.
pub(crate) async fn serve(
    listener: TcpListener,
    inner: Arc<Inner>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let inner = inner.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(inner.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                // Out of descriptors or similar: back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// A response body: a whole JSON document, or a watch stream that ends
/// cleanly (terminating chunk) or, when killed, with an error (the
/// connection is cut mid-stream).
pub(crate) enum ApiBody {
    Full(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<Bytes>,
        killed: Arc<AtomicBool>,
    },
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream { rx, killed } => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(None) if killed.load(Ordering::SeqCst) => Poll::Ready(Some(Err(
                    io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped"),
                ))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Stream { .. } => SizeHint::default(),
        }
    }
}

fn json_response(code: u16, v: &Value) -> Response<ApiBody> {
    let body = serde_json::to_vec(v).expect("JSON values serialize");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(ApiBody::Full(Some(Bytes::from(body))))
        .expect("valid response")
}

fn error_response(e: &StatusError) -> Response<ApiBody> {
    json_response(e.code, &e.to_json())
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let latency = *inner.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    Ok(dispatch(&inner, req)
        .await
        .unwrap_or_else(|e| error_response(&e)))
}

/// `key=value` pairs of a query string, percent-decoded.
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (
                b[i],
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                (b'+', _, _) => {
                    out.push(b' ');
                    i += 1;
                }
                (c, _, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Go's `strconv.ParseBool` truths.
    fn flag(&self, name: &str) -> bool {
        matches!(
            self.get(name),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }
}

/// Where a resource request points.
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    sub: Sub,
}

enum Route {
    Version,
    Health,
    CoreVersions,
    Groups,
    Discovery(String, String),
    Resource(Target),
    NotFound,
}

fn route(store: &Store, path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez"] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["api", v] => return Route::Discovery(String::new(), (*v).to_owned()),
        ["apis", g, v] => return Route::Discovery((*g).to_owned(), (*v).to_owned()),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::NotFound,
    };
    let (ns, plural, name, status) = match rest {
        [plural] => (None, *plural, None, false),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, false),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), false),
        ["namespaces", ns, plural, name, "status"] => (Some(*ns), *plural, Some(*name), true),
        _ => return Route::NotFound,
    };
    let found = store
        .resources
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural);
    match found {
        Some(res) if !status || store.resources[res].has_status => Route::Resource(Target {
            res,
            ns: ns.map(str::to_owned),
            name: name.map(str::to_owned),
            sub: if status { Sub::Status } else { Sub::Main },
        }),
        _ => Route::NotFound,
    }
}

fn unknown_path() -> StatusError {
    StatusError::from_code(404, "the server could not find the requested resource")
}

async fn dispatch(
    inner: &Arc<Inner>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, StatusError> {
    let route = {
        let store = inner.store.lock().unwrap();
        route(&store, req.uri().path())
    };
    match route {
        Route::Resource(t) => resource(inner, req, t).await,
        Route::NotFound => Err(unknown_path()),
        Route::Health => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(ApiBody::Full(Some(Bytes::from_static(b"ok"))))
            .expect("valid response")),
        other => {
            inner.count("get", "discovery");
            let store = inner.store.lock().unwrap();
            discovery(&store, other, req.headers().get(header::HOST))
        }
    }
}

fn discovery(
    store: &Store,
    route: Route,
    host: Option<&http::HeaderValue>,
) -> Result<Response<ApiBody>, StatusError> {
    let v = match route {
        Route::Version => json!({
            "major": "1", "minor": "31", "gitVersion": "v1.31.0-serin-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5", "compiler": "gc",
            "platform": "linux/amd64",
        }),
        Route::CoreVersions => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                "serverAddress": host.and_then(|h| h.to_str().ok()).unwrap_or_default()}],
        }),
        Route::Groups => {
            let mut groups: Vec<Value> = Vec::new();
            for r in store.resources.iter().filter(|r| !r.group.is_empty()) {
                let gv = json!({"groupVersion": r.api_version(), "version": r.version});
                match groups.iter_mut().find(|g| g["name"] == r.group.as_str()) {
                    Some(g) => {
                        let versions = g["versions"].as_array_mut().expect("built as an array");
                        if !versions.contains(&gv) {
                            versions.push(gv);
                        }
                    }
                    None => groups.push(
                        json!({"name": r.group, "versions": [gv.clone()], "preferredVersion": gv}),
                    ),
                }
            }
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        Route::Discovery(group, version) => {
            let mut resources = Vec::new();
            for r in store
                .resources
                .iter()
                .filter(|r| r.group == group && r.version == version)
            {
                resources.push(json!({
                    "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": true,
                    "kind": r.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }));
                if r.has_status {
                    resources.push(json!({
                        "name": format!("{}/status", r.plural), "singularName": "", "namespaced": true,
                        "kind": r.kind, "verbs": ["get", "patch", "update"],
                    }));
                }
            }
            if resources.is_empty() {
                return Err(unknown_path());
            }
            let gv = if group.is_empty() {
                version
            } else {
                format!("{group}/{version}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
        }
        Route::Resource(_) | Route::NotFound | Route::Health => return Err(unknown_path()),
    };
    Ok(json_response(200, &v))
}

/// The media type of a request, without parameters.
fn media_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

async fn read_body(body: Incoming) -> Result<Bytes, StatusError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusError::from_code(
            413,
            "Request entity too large: limit is 3145728",
        )),
        Err(e) => Err(StatusError::bad_request(format!("reading the body: {e}"))),
    }
}

/// A JSON body, or YAML (a superset) when it is not JSON.
fn parse_object(bytes: &[u8]) -> Result<Value, StatusError> {
    serde_json::from_slice(bytes)
        .or_else(|_| serde_norway::from_slice::<Value>(bytes))
        .map_err(|e| {
            StatusError::bad_request(format!("the body of the request could not be decoded: {e}"))
        })
}

fn unsupported(accepted: &str) -> StatusError {
    StatusError::from_code(
        415,
        format!("the body of the request was in an unknown format - accepted media types include: {accepted}"),
    )
}

/// The real server's validation of PatchOptions (422).
fn patch_options_invalid(field: &str, cause: &str, detail: &str) -> StatusError {
    let mut e = StatusError::from_code(
        422,
        format!("PatchOptions.meta.k8s.io \"\" is invalid: {field}: {detail}"),
    );
    e.details = json!({
        "group": "meta.k8s.io", "kind": "PatchOptions",
        "causes": [{"reason": cause, "message": detail, "field": field}],
    });
    e
}

async fn resource(
    inner: &Arc<Inner>,
    req: Request<Incoming>,
    t: Target,
) -> Result<Response<ApiBody>, StatusError> {
    let q = Query(query_pairs(req.uri().query()));
    let media = media_type(&req);
    let (def, label) = {
        let store = inner.store.lock().unwrap();
        let def = store.resources[t.res].clone();
        let label = match t.sub {
            Sub::Main => def.plural.clone(),
            Sub::Status => format!("{}/status", def.plural),
        };
        (def, label)
    };
    let method = req.method().clone();
    let verb = match (&method, &t.name) {
        (&Method::GET, _) if q.flag("watch") => "watch",
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) => "list",
        (&Method::POST, None) if t.sub == Sub::Main && t.ns.is_some() => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) if media == "application/apply-patch+yaml" => "apply",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) if t.sub == Sub::Main => "delete",
        _ => {
            return Err(StatusError::from_code(
                405,
                format!(
                    "the server does not allow this method on the requested resource ({method})"
                ),
            ))
        }
    };
    inner.count(verb, &label);
    if matches!(verb, "create" | "update" | "patch" | "apply" | "delete") {
        if let Some(code) = inner.take_failure() {
            return Err(StatusError::from_code(
                code,
                "injected failure (FakeKube::fail_next)",
            ));
        }
    }
    let ns = t.ns.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_default();
    if verb == "watch" {
        return watch(inner, &def, &t, &q);
    }
    if verb == "list" {
        let selector = Selector::parse(q.get("fieldSelector"), q.get("labelSelector"))?;
        let (items, rv) = inner.store.lock().unwrap().list(t.res, t.ns.as_deref());
        let items: Vec<Value> = items.into_iter().filter(|o| selector.matches(o)).collect();
        let list = json!({
            "apiVersion": def.api_version(),
            "kind": format!("{}List", def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        return Ok(json_response(200, &list));
    }
    if verb == "get" {
        let store = inner.store.lock().unwrap();
        return match store.get(t.res, &ns, &name) {
            Some(o) => Ok(json_response(200, &o)),
            None => Err(StatusError::not_found(&def, &name)),
        };
    }

    // Writes.
    // As the real server: the fieldManager, else the User-Agent's product
    // (before the first '/'), printable characters only, at most 128.
    let manager: String = match q.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => m.to_owned(),
        None => req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect(),
    };
    let dry_run = q.get("dryRun") == Some("All");
    if verb == "patch" && q.get("force").is_some() {
        return Err(patch_options_invalid(
            "force",
            "FieldValueForbidden",
            "Forbidden: may not be specified for non-apply patch",
        ));
    }
    if verb == "apply" && q.get("fieldManager").is_none_or(str::is_empty) {
        return Err(patch_options_invalid(
            "fieldManager",
            "FieldValueRequired",
            "Required value: is required for apply patch",
        ));
    }
    let body = read_body(req.into_body()).await?;
    let ctx = WriteCtx {
        manager: &manager,
        dry_run,
    };
    let (code, answer) = match verb {
        "create" | "update" => {
            if !media.is_empty()
                && !matches!(
                    media.as_str(),
                    "application/json" | "application/yaml" | "*/*"
                )
            {
                return Err(unsupported("application/json, application/yaml"));
            }
            let obj = parse_object(&body)?;
            let mut store = inner.store.lock().unwrap();
            if verb == "create" {
                (201, store.create(t.res, &ns, &obj, &ctx)?)
            } else {
                (200, store.replace(t.res, &ns, &name, t.sub, &obj, &ctx)?)
            }
        }
        "apply" => {
            let config = parse_object(&body)?;
            let force = q.flag("force");
            let mut store = inner.store.lock().unwrap();
            let (object, created) = store.apply(t.res, &ns, &name, t.sub, &config, force, &ctx)?;
            (if created { 201 } else { 200 }, object)
        }
        "patch" => {
            let json_patch = match media.as_str() {
                "application/merge-patch+json" => false,
                "application/strategic-merge-patch+json" if def.builtin => false,
                "application/json-patch+json" => true,
                _ => {
                    let mut accepted = String::from(
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    );
                    if def.builtin {
                        accepted.push_str(", application/strategic-merge-patch+json");
                    }
                    return Err(unsupported(&accepted));
                }
            };
            let patch: Value = serde_json::from_slice(&body)
                .map_err(|e| StatusError::bad_request(format!("the patch is not JSON: {e}")))?;
            let mut store = inner.store.lock().unwrap();
            (
                200,
                store.patch(t.res, &ns, &name, t.sub, &patch, json_patch, &ctx)?,
            )
        }
        _ => {
            // DELETE: optional DeleteOptions with preconditions.
            let options = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                parse_object(&body)?
            };
            let preconditions = options.get("preconditions").cloned().unwrap_or(json!({}));
            let dry_run = dry_run
                || options["dryRun"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == "All"));
            let mut store = inner.store.lock().unwrap();
            (
                200,
                store.delete(t.res, &ns, &name, &preconditions, dry_run)?,
            )
        }
    };
    Ok(json_response(code, &answer))
}

/// Starts a watch: replays what the start asks for, then streams live
/// events, bookmarks, and ends at the timeout.
fn watch(
    inner: &Arc<Inner>,
    def: &ResourceDef,
    t: &Target,
    q: &Query,
) -> Result<Response<ApiBody>, StatusError> {
    let mut fields = q.get("fieldSelector").unwrap_or_default().to_owned();
    if let Some(name) = &t.name {
        // The deprecated watch of one object.
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={name}"));
    }
    let selector = Selector::parse(Some(&fields), q.get("labelSelector"))?;
    let bookmarks = q.flag("allowWatchBookmarks");
    let initial_events = q.flag("sendInitialEvents");
    let timeout = match q.get("timeoutSeconds") {
        Some(s) => Duration::from_secs(
            s.parse()
                .map_err(|_| StatusError::bad_request(format!("invalid timeoutSeconds: {s:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    // 0 means the server's default, as on the real server.
    let timeout = if timeout.is_zero() {
        DEFAULT_WATCH_TIMEOUT
    } else {
        timeout
    };
    let start =
        match q.get("resourceVersion") {
            _ if initial_events => WatchStart::Current,
            None | Some("" | "0") => WatchStart::Current,
            Some(rv) => WatchStart::After(rv.parse().map_err(|_| {
                StatusError::bad_request(format!("invalid resource version: {rv:?}"))
            })?),
        };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let killed = Arc::new(AtomicBool::new(false));
    let feed = {
        let store = inner.store.lock().unwrap();
        store.watch(t.res, t.ns.as_deref(), start)
    };
    let feed = match feed {
        Ok(feed) => feed,
        Err(e) if e.code == 410 => {
            // The real server answers 200 and one ERROR event.
            let line = format!("{}\n", json!({"type": "ERROR", "object": e.to_json()}));
            let _ = tx.try_send(Bytes::from(line));
            drop(tx);
            return Ok(stream_response(rx, killed));
        }
        Err(e) => return Err(e),
    };
    let id = inner.watch_seq.fetch_add(1, Ordering::SeqCst);
    inner.watches.lock().unwrap().insert(
        id,
        WatchSlot {
            killed: killed.clone(),
            task: None,
        },
    );
    let task = WatchTask {
        inner: inner.clone(),
        id,
        res: t.res,
        ns: t.ns.clone(),
        kind: def.kind.clone(),
        api_version: def.api_version(),
        selector,
        bookmarks,
        initial_events: initial_events && bookmarks,
        interval: *inner.bookmark_interval.lock().unwrap(),
        deadline: tokio::time::Instant::now() + timeout,
    };
    let handle = tokio::spawn(task.run(feed, tx));
    if let Some(slot) = inner.watches.lock().unwrap().get_mut(&id) {
        slot.task = Some(handle.abort_handle());
    }
    Ok(stream_response(rx, killed))
}

fn stream_response(rx: mpsc::Receiver<Bytes>, killed: Arc<AtomicBool>) -> Response<ApiBody> {
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(ApiBody::Stream { rx, killed })
        .expect("valid response")
}

struct WatchTask {
    inner: Arc<Inner>,
    id: u64,
    res: usize,
    ns: Option<String>,
    kind: String,
    api_version: String,
    selector: Selector,
    bookmarks: bool,
    /// Send the `k8s.io/initial-events-end` bookmark after the initial events.
    initial_events: bool,
    interval: Duration,
    deadline: tokio::time::Instant,
}

/// Removes the watch from the open set however its task ends.
struct SlotGuard(Arc<Inner>, u64);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.watches.lock() {
            w.remove(&self.1);
        }
    }
}

impl WatchTask {
    /// The line to send for `ev`, if this watch sees it; label selectors turn
    /// a MODIFIED into ADDED or DELETED when the object starts or stops
    /// matching, as the real server does.
    fn line(&self, ev: &Event) -> Option<Bytes> {
        if ev.res != self.res || self.ns.as_ref().is_some_and(|ns| *ns != ev.namespace) {
            return None;
        }
        let now = self.selector.matches(&ev.meta);
        let kind = match ev.kind {
            EventType::Modified => {
                let before = ev
                    .prev_meta
                    .as_ref()
                    .is_none_or(|p| self.selector.matches(p));
                match (before, now) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            k if now => k,
            _ => return None,
        };
        Some(Bytes::from(format!(
            "{{\"type\":\"{}\",\"object\":{}}}\n",
            kind.as_str(),
            ev.json
        )))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let ev = json!({"type": "BOOKMARK", "object": {
            "kind": self.kind, "apiVersion": self.api_version, "metadata": metadata,
        }});
        Bytes::from(format!("{ev}\n"))
    }

    async fn run(self, feed: super::store::WatchFeed, tx: mpsc::Sender<Bytes>) {
        let _guard = SlotGuard(self.inner.clone(), self.id);
        let mut progress = feed.progress;
        for ev in &feed.initial {
            if let Some(line) = self.line(ev) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        if self.initial_events && tx.send(self.bookmark(progress, true)).await.is_err() {
            return;
        }
        let mut live = feed.live;
        let interval = self.interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep_until(self.deadline);
        tokio::pin!(deadline);
        loop {
            let line = tokio::select! {
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        progress = progress.max(ev.rv);
                        match self.line(&ev) {
                            Some(line) => line,
                            None => continue,
                        }
                    }
                    // A watcher that falls too far behind is closed, as the
                    // real server closes slow watchers.
                    Err(_) => return,
                },
                _ = tick.tick(), if self.bookmarks => self.bookmark(progress, false),
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    }
}
