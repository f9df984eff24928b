//! The object store: one global resourceVersion, the objects, the bounded
//! event history, and the semantics of every write (create, replace, merge
//! and JSON patch, server-side apply, delete), shared by the HTTP layer and
//! the test helpers.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::fields::{self, Leaves, ListMaps, Managed, ManagerKey, Operation, Writer};
use super::ResourceDef;

/// A Kubernetes `Status` failure, as the API answers it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusError {
    /// The HTTP status, also `code` in the body.
    pub code: u16,
    /// `reason`: `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, …
    pub reason: String,
    /// `message`, worded as the real server words it.
    pub message: String,
    /// `details`: `name`, `group`, `kind`, and `causes` when there are some.
    pub details: Value,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for StatusError {}

impl StatusError {
    /// A failure with `reason` picked from the code, as the real server does.
    pub fn from_code(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            406 => "NotAcceptable",
            409 => "Conflict",
            410 => "Expired",
            413 => "RequestEntityTooLarge",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "",
        };
        Self {
            code,
            reason: reason.into(),
            message: message.into(),
            details: json!({}),
        }
    }

    /// The `Status` object.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        });
        if self.reason.is_empty() {
            v.as_object_mut().map(|m| m.remove("reason"));
        }
        v
    }

    fn about(mut self, def: &ResourceDef, name: &str) -> Self {
        self.details = json!({"name": name, "group": def.group, "kind": def.plural});
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::from_code(400, message)
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::from_code(404, format!("{} {name:?} not found", def.qualified())).about(def, name)
    }

    fn already_exists(def: &ResourceDef, name: &str) -> Self {
        let mut e = Self::from_code(409, format!("{} {name:?} already exists", def.qualified()))
            .about(def, name);
        e.reason = "AlreadyExists".into();
        e
    }

    fn conflict(def: &ResourceDef, name: &str, why: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} {name:?}: {why}",
            def.qualified()
        );
        Self::from_code(409, msg).about(def, name)
    }

    fn stale(def: &ResourceDef, name: &str) -> Self {
        Self::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn invalid(def: &ResourceDef, name: &str, field: &str, cause: &str, detail: &str) -> Self {
        let message = format!(
            "{}.{} {name:?} is invalid: {field}: {detail}",
            def.kind, def.group
        );
        let mut e = Self::from_code(422, message);
        e.details = json!({
            "name": name, "group": def.group, "kind": def.kind,
            "causes": [{"reason": cause, "message": detail, "field": field}],
        });
        e
    }

    /// 410 `Expired`, as a watch from a compacted resourceVersion gets.
    pub(crate) fn expired(message: String) -> Self {
        Self::from_code(410, message)
    }
}

/// Which endpoint a write came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Main => "",
            Sub::Status => "status",
        }
    }
}

/// A watch event's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history and sent to watchers.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) res: usize,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) kind: EventType,
    /// The object's JSON, serialized once for every watcher.
    pub(crate) json: String,
    /// What selectors look at: `{"metadata": {name, namespace, labels}}`.
    pub(crate) meta: Value,
    /// The same before a `MODIFIED`, for label-selector transitions.
    pub(crate) prev_meta: Option<Value>,
}

/// The part of an object selectors read.
fn selector_view(object: &Value) -> Value {
    let m = &object["metadata"];
    json!({"metadata": {"name": m["name"], "namespace": m["namespace"], "labels": m["labels"]}})
}

impl Event {
    fn new(rv: u64, res: usize, kind: EventType, object: &Value, prev: Option<&Value>) -> Self {
        let m = &object["metadata"];
        Self {
            rv,
            res,
            namespace: m["namespace"].as_str().unwrap_or_default().to_owned(),
            name: m["name"].as_str().unwrap_or_default().to_owned(),
            kind,
            json: object.to_string(),
            meta: selector_view(object),
            prev_meta: prev.map(selector_view),
        }
    }
}

#[derive(Clone)]
struct Stored {
    object: Value,
    managed: Managed,
}

type ObjKey = (usize, String, String);

/// What a watch replays before its live events.
pub(crate) enum WatchStart {
    /// `resourceVersion` absent, `"0"`, or `sendInitialEvents`: synthetic
    /// `ADDED` for every current object.
    Current,
    /// Every event after this resourceVersion.
    After(u64),
}

/// A started watch: what to replay, the live feed, and the resourceVersion
/// both are consistent with.
pub(crate) struct WatchFeed {
    pub(crate) initial: Vec<Arc<Event>>,
    pub(crate) live: broadcast::Receiver<Arc<Event>>,
    pub(crate) progress: u64,
}

/// Who writes (the `fieldManager`, else the User-Agent's product, or
/// `fake-kube` for the handle's helpers), and whether only to try.
pub(crate) struct WriteCtx<'a> {
    pub(crate) manager: &'a str,
    pub(crate) dry_run: bool,
}

/// Events buffered for each watcher before a slow one is closed.
pub(crate) const EVENT_BUFFER: usize = 1024;

/// Metadata fields a client sets and field ownership tracks.
const USER_META: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];
/// Metadata fields only the server sets.
const SERVER_META: [&str; 8] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

pub(crate) struct Store {
    pub(crate) resources: Vec<ResourceDef>,
    list_maps: Vec<ListMaps>,
    rv: u64,
    objects: BTreeMap<ObjKey, Stored>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// A watch can start from any resourceVersion >= floor.
    floor: u64,
    uid_seq: u64,
    uid_seed: u64,
    events: broadcast::Sender<Arc<Event>>,
}

fn meta(v: &Value) -> Option<&Map<String, Value>> {
    v.get("metadata")?.as_object()
}

fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    meta(v)?.get(field)?.as_str().filter(|s| !s.is_empty())
}

fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    let obj = v.as_object_mut().expect("objects are maps");
    let m = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut().expect("metadata is a map")
}

/// The resourceVersion of a stored object.
fn rv_of(v: &Value) -> u64 {
    meta_str(v, "resourceVersion")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// RFC 3339 UTC, seconds precision, as Kubernetes timestamps.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A DNS-1123 subdomain, as object names must be.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
}

impl Store {
    pub(crate) fn new(resources: Vec<ResourceDef>, history_limit: usize) -> Self {
        let list_maps = resources
            .iter()
            .map(|r| {
                ListMaps(
                    r.list_maps
                        .iter()
                        .map(|(path, key)| {
                            (path.split('.').map(str::to_owned).collect(), key.clone())
                        })
                        .collect(),
                )
            })
            .collect();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            resources,
            list_maps,
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            floor: 1,
            uid_seq: 0,
            uid_seed: splitmix(seed),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The resource registered as `plural` or `plural.group`.
    pub(crate) fn find(&self, resource: &str) -> Option<usize> {
        self.resources
            .iter()
            .position(|r| r.plural == resource || r.qualified() == resource)
    }

    fn next_uid(&mut self) -> String {
        self.uid_seq += 1;
        let a = splitmix(self.uid_seed ^ self.uid_seq);
        let b = splitmix(a);
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    pub(crate) fn get(&self, res: usize, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .map(|s| s.object.clone())
    }

    /// Objects of `res` (in `ns`, or every namespace), by namespace and name,
    /// and the list's resourceVersion.
    pub(crate) fn list(&self, res: usize, ns: Option<&str>) -> (Vec<Value>, u64) {
        let items = self
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
            .map(|(_, s)| s.object.clone())
            .collect();
        (items, self.rv)
    }

    /// Subscribes a watch, consistently with the history: nothing is missed
    /// or sent twice between `initial` and `live`.
    pub(crate) fn watch(
        &self,
        res: usize,
        ns: Option<&str>,
        start: WatchStart,
    ) -> Result<WatchFeed, StatusError> {
        let initial = match start {
            WatchStart::Current => self
                .objects
                .iter()
                .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
                .map(|(_, s)| {
                    Arc::new(Event::new(
                        rv_of(&s.object),
                        res,
                        EventType::Added,
                        &s.object,
                        None,
                    ))
                })
                .collect(),
            WatchStart::After(rv) if rv < self.floor => {
                return Err(StatusError::expired(format!(
                    "too old resource version: {rv} ({})",
                    self.floor
                )));
            }
            WatchStart::After(rv) if rv > self.rv => {
                let mut e = StatusError::from_code(
                    504,
                    format!(
                        "Timeout: Too large resource version: {rv}, current: {}",
                        self.rv
                    ),
                );
                e.details = json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1});
                return Err(e);
            }
            WatchStart::After(rv) => self
                .history
                .iter()
                .filter(|e| e.rv > rv && e.res == res && ns.is_none_or(|ns| ns == e.namespace))
                .cloned()
                .collect(),
        };
        Ok(WatchFeed {
            initial,
            live: self.events.subscribe(),
            progress: self.rv,
        })
    }

    /// Forgets the event history: a watch from any older resourceVersion
    /// gets 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    pub(crate) fn history(&self) -> impl Iterator<Item = &Arc<Event>> {
        self.history.iter()
    }

    fn emit(&mut self, event: Event) {
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        let _ = self.events.send(event);
    }

    /// The part of an object that field ownership tracks: everything but
    /// `apiVersion`, `kind` and server-set metadata.
    fn tracked(object: &Value) -> Value {
        let mut t = object.clone();
        let Some(obj) = t.as_object_mut() else {
            return Value::Object(Map::new());
        };
        obj.remove("apiVersion");
        obj.remove("kind");
        if let Some(Value::Object(m)) = obj.get_mut("metadata") {
            m.retain(|k, _| USER_META.contains(&k.as_str()));
        }
        if obj
            .get("metadata")
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            obj.remove("metadata");
        }
        t
    }

    /// `apiVersion` and `kind` must match the endpoint; when `required`,
    /// they must be there.
    fn check_type(def: &ResourceDef, body: &Value, required: bool) -> Result<(), StatusError> {
        if !body.is_object() {
            return Err(StatusError::bad_request(
                "the object provided is unrecognized (must be a JSON or YAML object)",
            ));
        }
        let api_version = def.api_version();
        match body.get("kind").and_then(Value::as_str) {
            None if required => {
                return Err(StatusError::bad_request(format!(
                    "Object 'Kind' is missing in '{body}'"
                )));
            }
            Some(k) if k != def.kind => {
                return Err(StatusError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind
                )));
            }
            _ => {}
        }
        match body.get("apiVersion").and_then(Value::as_str) {
            None if required => Err(StatusError::bad_request(format!(
                "Object 'apiVersion' is missing in '{body}'"
            ))),
            Some(v) if v != api_version => Err(StatusError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            ))),
            _ => Ok(()),
        }
    }

    /// The body's name and namespace, if set, must match the URL's.
    fn check_identity(body: &Value, ns: &str, name: Option<&str>) -> Result<(), StatusError> {
        if let (Some(want), Some(got)) = (name, meta_str(body, "name")) {
            if want != got {
                return Err(StatusError::bad_request(format!(
                    "the name of the object ({got}) does not match the name on the URL ({want})"
                )));
            }
        }
        match meta_str(body, "namespace") {
            Some(got) if got != ns => Err(StatusError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )),
            _ => Ok(()),
        }
    }

    /// `metadata.resourceVersion` and `metadata.uid`, when the body sets
    /// them, are preconditions.
    fn check_preconditions(
        def: &ResourceDef,
        name: &str,
        current: &Value,
        body: &Value,
    ) -> Result<(), StatusError> {
        if let Some(rv) = meta_str(body, "resourceVersion") {
            if Some(rv) != meta_str(current, "resourceVersion") {
                return Err(StatusError::stale(def, name));
            }
        }
        if let Some(uid) = meta_str(body, "uid") {
            let have = meta_str(current, "uid").unwrap_or_default();
            if uid != have {
                let why = format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                );
                return Err(StatusError::conflict(def, name, &why));
            }
        }
        Ok(())
    }

    /// A new object's skeleton: server metadata, the body's user metadata.
    fn new_object(&mut self, res: usize, ns: &str, name: &str, body: &Value) -> Value {
        let def = &self.resources[res];
        let mut object = body.clone();
        let obj = object.as_object_mut().expect("checked to be a map");
        obj.insert("apiVersion".into(), Value::from(def.api_version()));
        obj.insert("kind".into(), Value::from(def.kind.clone()));
        if def.has_status {
            // Create cannot set status.
            obj.remove("status");
        }
        let uid = self.next_uid();
        let m = meta_mut(&mut object);
        for k in SERVER_META {
            m.remove(k);
        }
        m.insert("name".into(), Value::from(name));
        m.insert("namespace".into(), Value::from(ns));
        m.insert("uid".into(), Value::from(uid));
        m.insert("generation".into(), Value::from(1));
        m.insert("creationTimestamp".into(), Value::from(now_rfc3339()));
        object
    }

    fn name_of(&self, res: usize, body: &Value) -> Result<String, StatusError> {
        let def = &self.resources[res];
        let name = match (meta_str(body, "name"), meta_str(body, "generateName")) {
            (Some(n), _) => n.to_owned(),
            (None, Some(prefix)) => {
                let mut x = splitmix(self.uid_seed ^ self.rv ^ 0x5eed);
                let suffix: String = (0..5)
                    .map(|_| {
                        x = splitmix(x);
                        b"bcdfghjklmnpqrstvwxz2456789"[(x % 27) as usize] as char
                    })
                    .collect();
                format!("{prefix}{suffix}")
            }
            (None, None) => {
                return Err(StatusError::invalid(
                    def,
                    "",
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                ))
            }
        };
        if !valid_name(&name) {
            let detail = format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')");
            return Err(StatusError::invalid(
                def,
                &name,
                "metadata.name",
                "FieldValueInvalid",
                &detail,
            ));
        }
        Ok(name)
    }

    /// The object a write through `sub` makes of `old` and the body: the
    /// status subresource changes only status; the main resource of a
    /// resource with a status subresource ignores status.
    fn isolate(def: &ResourceDef, old: &Value, body: &Value, sub: Sub) -> Value {
        let take_status = |mut into: Value, from: &Value| {
            let obj = into.as_object_mut().expect("objects are maps");
            match from.get("status") {
                Some(s) => obj.insert("status".into(), s.clone()),
                None => obj.remove("status"),
            };
            into
        };
        match sub {
            Sub::Status => take_status(old.clone(), body),
            Sub::Main => {
                let mut new = body.clone();
                let obj = new.as_object_mut().expect("checked to be a map");
                obj.insert("apiVersion".into(), Value::from(def.api_version()));
                obj.insert("kind".into(), Value::from(def.kind.clone()));
                let old_meta = meta(old).cloned().unwrap_or_default();
                let m = meta_mut(&mut new);
                m.retain(|k, _| USER_META.contains(&k.as_str()));
                for (k, v) in old_meta {
                    if !USER_META.contains(&k.as_str()) {
                        m.insert(k, v);
                    }
                }
                if def.has_status {
                    new = take_status(new, old);
                }
                new
            }
        }
    }

    /// Whether anything outside `metadata` (and `status`, with a status
    /// subresource) differs: what bumps `metadata.generation`.
    fn spec_changed(def: &ResourceDef, a: &Value, b: &Value) -> bool {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("metadata");
                if def.has_status {
                    o.remove("status");
                }
            }
            v
        };
        strip(a) != strip(b)
    }

    fn leaves(&self, res: usize, object: &Value) -> Leaves {
        fields::leaves(&Self::tracked(object), &self.list_maps[res])
    }

    /// Stores a write (unless it changes nothing, as the real server skips
    /// no-op writes), bumping the resourceVersion and emitting the event.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        old: Option<&Stored>,
        mut object: Value,
        mut managed: Managed,
        writer: &ManagerKey,
        dry_run: bool,
    ) -> Value {
        let def = &self.resources[res];
        let m = meta_mut(&mut object);
        m.remove("managedFields");
        // ObjectMeta's omitempty fields.
        m.retain(|k, v| {
            !(USER_META.contains(&k.as_str())
                && (v.is_null()
                    || v.as_object().is_some_and(Map::is_empty)
                    || v.as_array().is_some_and(Vec::is_empty)))
        });
        if let Some(old) = old {
            let mut before = old.object.clone();
            meta_mut(&mut before).remove("managedFields");
            if before == object && old.managed.same_fields(&managed) {
                return old.object.clone();
            }
            if Self::spec_changed(def, &before, &object) {
                let generation = meta(&before)
                    .and_then(|m| m.get("generation"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                meta_mut(&mut object).insert("generation".into(), Value::from(generation + 1));
            }
        }
        managed.touch(writer, &def.api_version(), &now_rfc3339());
        let rv = if dry_run { self.rv } else { self.rv + 1 };
        let m = meta_mut(&mut object);
        m.insert("resourceVersion".into(), Value::from(rv.to_string()));
        if !managed.0.is_empty() {
            m.insert("managedFields".into(), managed.render());
        }
        if dry_run {
            return object;
        }
        self.rv = rv;
        let key = (res, ns.to_owned(), name.to_owned());
        self.objects.insert(
            key,
            Stored {
                object: object.clone(),
                managed,
            },
        );
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(Event::new(rv, res, kind, &object, old.map(|o| &o.object)));
        object
    }

    fn stored(&self, res: usize, ns: &str, name: &str) -> Option<Stored> {
        self.objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    fn update_key(ctx: &WriteCtx<'_>, sub: Sub) -> ManagerKey {
        ManagerKey {
            manager: ctx.manager.to_owned(),
            operation: Operation::Update,
            subresource: sub.name().to_owned(),
        }
    }

    /// POST: creates an object (409 AlreadyExists if it exists).
    pub(crate) fn create(
        &mut self,
        res: usize,
        ns: &str,
        body: &Value,
        ctx: &WriteCtx<'_>,
    ) -> Result<Value, StatusError> {
        let def = &self.resources[res];
        Self::check_type(def, body, !def.builtin)?;
        Self::check_identity(body, ns, None)?;
        if meta_str(body, "resourceVersion").is_some() {
            return Err(StatusError::from_code(
                500,
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = self.name_of(res, body)?;
        if self.stored(res, ns, &name).is_some() {
            return Err(StatusError::already_exists(&self.resources[res], &name));
        }
        let object = self.new_object(res, ns, &name, body);
        let key = Self::update_key(ctx, Sub::Main);
        let mut managed = Managed::default();
        let new_leaves = self.leaves(res, &object);
        let api_version = self.resources[res].api_version();
        managed.record_update(
            &key,
            &Leaves::new(),
            &new_leaves,
            &api_version,
            &now_rfc3339(),
        );
        Ok(self.finish(res, ns, &name, None, object, managed, &key, ctx.dry_run))
    }

    /// PUT: replaces an object (or its status).
    pub(crate) fn replace(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        sub: Sub,
        body: &Value,
        ctx: &WriteCtx<'_>,
    ) -> Result<Value, StatusError> {
        let def = &self.resources[res];
        Self::check_type(def, body, !def.builtin)?;
        Self::check_identity(body, ns, Some(name))?;
        let Some(old) = self.stored(res, ns, name) else {
            if def.builtin && sub == Sub::Main {
                let mut body = body.clone();
                meta_mut(&mut body).insert("name".into(), Value::from(name));
                meta_mut(&mut body).remove("resourceVersion");
                return self.create(res, ns, &body, ctx);
            }
            return Err(StatusError::not_found(def, name));
        };
        if !def.builtin && meta_str(body, "resourceVersion").is_none() {
            return Err(StatusError::invalid(
                def,
                name,
                "metadata.resourceVersion",
                "FieldValueInvalid",
                "Invalid value: 0x0: must be specified for an update",
            ));
        }
        Self::check_preconditions(def, name, &old.object, body)?;
        let new = Self::isolate(def, &old.object, body, sub);
        self.update(res, ns, name, sub, old, new, ctx)
    }

    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        sub: Sub,
        old: Stored,
        new: Value,
        ctx: &WriteCtx<'_>,
    ) -> Result<Value, StatusError> {
        let key = Self::update_key(ctx, sub);
        let mut managed = old.managed.clone();
        let (old_leaves, new_leaves) = (self.leaves(res, &old.object), self.leaves(res, &new));
        let api_version = self.resources[res].api_version();
        managed.record_update(&key, &old_leaves, &new_leaves, &api_version, &now_rfc3339());
        Ok(self.finish(res, ns, name, Some(&old), new, managed, &key, ctx.dry_run))
    }

    /// PATCH with a merge patch (RFC 7386) or a JSON patch (RFC 6902).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        sub: Sub,
        patch: &Value,
        json_patch: bool,
        ctx: &WriteCtx<'_>,
    ) -> Result<Value, StatusError> {
        let def = &self.resources[res];
        let Some(old) = self.stored(res, ns, name) else {
            return Err(StatusError::not_found(def, name));
        };
        let mut doc = old.object.clone();
        meta_mut(&mut doc).remove("managedFields");
        if json_patch {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
                StatusError::bad_request(format!(
                    "the body of the request is not a JSON patch: {e}"
                ))
            })?;
            json_patch::patch(&mut doc, &ops)
                .map_err(|e| StatusError::from_code(422, format!("the JSON patch failed: {e}")))?;
        } else {
            if !patch.is_object() {
                return Err(StatusError::bad_request(
                    "the body of a merge patch must be a JSON object",
                ));
            }
            json_patch::merge(&mut doc, patch);
        }
        Self::check_type(def, &doc, true)?;
        Self::check_identity(&doc, ns, Some(name))?;
        Self::check_preconditions(def, name, &old.object, &doc)?;
        let new = Self::isolate(def, &old.object, &doc, sub);
        self.update(res, ns, name, sub, old, new, ctx)
    }

    /// PATCH with `application/apply-patch+yaml`: server-side apply.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        sub: Sub,
        config: &Value,
        force: bool,
        ctx: &WriteCtx<'_>,
    ) -> Result<(Value, bool), StatusError> {
        let def = &self.resources[res];
        Self::check_type(def, config, true)?;
        Self::check_identity(config, ns, Some(name))?;
        let old = self.stored(res, ns, name);
        let created = old.is_none();
        let base = match &old {
            Some(old) => {
                Self::check_preconditions(def, name, &old.object, config)?;
                old.object.clone()
            }
            None if sub == Sub::Status => return Err(StatusError::not_found(def, name)),
            None => {
                if meta_str(config, "resourceVersion").is_some() {
                    return Err(StatusError::stale(def, name));
                }
                let mut body = config.clone();
                meta_mut(&mut body).insert("name".into(), Value::from(name));
                self.name_of(res, &body)?;
                let mut skeleton = json!({"metadata": {}});
                meta_mut(&mut skeleton).insert("name".into(), Value::from(name));
                self.new_object(res, ns, name, &skeleton)
            }
        };
        let def = &self.resources[res];
        let lm = &self.list_maps[res];
        if let Err(e) = fields::check_list_maps(config, lm) {
            return Err(StatusError::invalid(
                def,
                name,
                "body",
                "FieldValueInvalid",
                &e,
            ));
        }
        // Only the fields this endpoint may set (the real server's "reset
        // fields").
        let mut config_t = Self::tracked(config);
        if let Some(obj) = config_t.as_object_mut() {
            match sub {
                Sub::Status => obj.retain(|k, _| k == "status"),
                Sub::Main if def.has_status => {
                    obj.remove("status");
                }
                Sub::Main => {}
            }
        }
        fields::strip_nulls(&mut config_t);
        let key = ManagerKey {
            manager: ctx.manager.to_owned(),
            operation: Operation::Apply,
            subresource: sub.name().to_owned(),
        };
        let mut managed = old.as_ref().map(|o| o.managed.clone()).unwrap_or_default();
        let api_version = def.api_version();
        let time = now_rfc3339();
        let writer = Writer {
            key: &key,
            list_maps: lm,
            api_version: &api_version,
            time: &time,
        };
        let live_t = Self::tracked(&base);
        let merged = fields::server_side_apply(&live_t, &config_t, &mut managed, &writer, force)
            .map_err(|conflicts| {
                let (message, causes) = fields::conflict_message(&managed, &conflicts);
                let mut e = StatusError::from_code(409, message);
                e.details =
                    json!({"name": name, "group": def.group, "kind": def.plural, "causes": causes});
                e
            })?;
        // The new object: the merged tracked part, server metadata kept.
        let mut new = merged;
        let merged_meta = new
            .as_object_mut()
            .and_then(|o| o.remove("metadata"))
            .unwrap_or_else(|| json!({}));
        let obj = new.as_object_mut().expect("objects are maps");
        obj.insert("apiVersion".into(), Value::from(api_version.clone()));
        obj.insert("kind".into(), Value::from(def.kind.clone()));
        obj.insert("metadata".into(), base["metadata"].clone());
        let m = meta_mut(&mut new);
        for k in USER_META {
            match merged_meta.get(k) {
                Some(v) => m.insert(k.into(), v.clone()),
                None => m.remove(k),
            };
        }
        let object = self.finish(res, ns, name, old.as_ref(), new, managed, &key, ctx.dry_run);
        Ok((object, created))
    }

    /// DELETE, with optional preconditions (resourceVersion, uid).
    pub(crate) fn delete(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        preconditions: &Value,
        dry_run: bool,
    ) -> Result<Value, StatusError> {
        let def = &self.resources[res];
        let Some(old) = self.stored(res, ns, name) else {
            return Err(StatusError::not_found(def, name));
        };
        for (field, label) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str) {
                let have = meta_str(&old.object, field).unwrap_or_default();
                if want != have {
                    let why = format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}");
                    return Err(StatusError::conflict(def, name, &why));
                }
            }
        }
        let answer = |object: &Value| {
            if def.builtin {
                json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": def.group, "kind": def.plural,
                                "uid": meta_str(object, "uid")},
                })
            } else {
                object.clone()
            }
        };
        if dry_run {
            return Ok(answer(&old.object));
        }
        self.rv += 1;
        let mut object = old.object.clone();
        meta_mut(&mut object).insert("resourceVersion".into(), Value::from(self.rv.to_string()));
        let out = answer(&object);
        self.objects.remove(&(res, ns.to_owned(), name.to_owned()));
        self.emit(Event::new(self.rv, res, EventType::Deleted, &object, None));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
