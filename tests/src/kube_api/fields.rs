//! Field paths, server-side apply's merge, and field ownership
//! (`metadata.managedFields`), after structured-merge-diff, kept pragmatic:
//! maps merge recursively, lists are atomic unless declared list-maps, and
//! ownership is tracked per leaf and per list-map entry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

/// One step of a field path: a map field, or a list-map entry by key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Seg {
    Field(String),
    /// `value` is the key's JSON text (`"a"`), as in `k:{"pod":"a"}`.
    Key {
        field: String,
        value: String,
    },
}

/// A field path from the object's root, e.g. `.status.members[pod="a"].ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Path(pub(crate) Vec<Seg>);

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for seg in &self.0 {
            match seg {
                Seg::Field(name) => write!(f, ".{name}")?,
                Seg::Key { field, value } => write!(f, "[{field}={value}]")?,
            }
        }
        Ok(())
    }
}

impl Path {
    fn starts_with(&self, prefix: &Path) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

/// Which lists are list-maps: schema path (field names only, list-map keys
/// skipped) → key field.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListMaps(pub(crate) Vec<(Vec<String>, String)>);

impl ListMaps {
    /// The key field if the list at `path` is a declared list-map.
    fn key_at(&self, path: &[Seg]) -> Option<&str> {
        let names = || {
            path.iter().filter_map(|s| match s {
                Seg::Field(f) => Some(f.as_str()),
                Seg::Key { .. } => None,
            })
        };
        self.0
            .iter()
            .find(|(p, _)| p.iter().map(String::as_str).eq(names()))
            .map(|(_, k)| k.as_str())
    }
}

/// The keys (JSON text) of a list-map's items, or `None` when the list is not
/// a valid list-map (an item is not an object, lacks a scalar key, or a key
/// repeats); such a list is then treated as atomic.
fn item_keys(items: &[Value], key: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut keys = Vec::with_capacity(items.len());
    for item in items {
        let k = item.as_object()?.get(key)?;
        if k.is_object() || k.is_array() || k.is_null() {
            return None;
        }
        let text = k.to_string();
        if !seen.insert(text.clone()) {
            return None;
        }
        keys.push(text);
    }
    Some(keys)
}

/// Whether every declared list-map in `v` is valid; the first invalid one's
/// path otherwise (server-side apply refuses those).
pub(crate) fn check_list_maps(v: &Value, lm: &ListMaps) -> Result<(), String> {
    fn walk(v: &Value, lm: &ListMaps, path: &mut Vec<Seg>) -> Result<(), String> {
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    path.push(Seg::Field(k.clone()));
                    walk(c, lm, path)?;
                    path.pop();
                }
                Ok(())
            }
            Value::Array(items) => {
                let Some(key) = lm.key_at(path) else {
                    return Ok(());
                };
                let Some(keys) = item_keys(items, key) else {
                    return Err(format!(
                        "{}: each item must be an object with a unique scalar `{key}`",
                        Path(path.clone())
                    ));
                };
                for (item, value) in items.iter().zip(keys) {
                    path.push(Seg::Key {
                        field: key.to_owned(),
                        value,
                    });
                    walk(item, lm, path)?;
                    path.pop();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    walk(v, lm, &mut Vec::new())
}

/// A leaf of an object: a scalar, an atomic list, an empty map, or the
/// existence of a list-map entry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Leaf {
    Value(Value),
    Entry,
}

pub(crate) type Leaves = BTreeMap<Path, Leaf>;

/// Every leaf of `v` by path.
pub(crate) fn leaves(v: &Value, lm: &ListMaps) -> Leaves {
    fn walk(v: &Value, lm: &ListMaps, path: &mut Vec<Seg>, out: &mut Leaves) {
        match v {
            Value::Object(m) if !m.is_empty() || path.is_empty() => {
                for (k, c) in m {
                    path.push(Seg::Field(k.clone()));
                    walk(c, lm, path, out);
                    path.pop();
                }
            }
            Value::Array(items) => {
                let keys = lm
                    .key_at(path)
                    .and_then(|k| Some((k, item_keys(items, k)?)));
                let Some((key, keys)) = keys else {
                    out.insert(Path(path.clone()), Leaf::Value(v.clone()));
                    return;
                };
                for (item, value) in items.iter().zip(keys) {
                    path.push(Seg::Key {
                        field: key.to_owned(),
                        value,
                    });
                    out.insert(Path(path.clone()), Leaf::Entry);
                    walk(item, lm, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(Path(path.clone()), Leaf::Value(v.clone()));
            }
        }
    }
    let mut out = Leaves::new();
    walk(v, lm, &mut Vec::new(), &mut out);
    out
}

/// Paths whose leaf differs between `a` and `b` (added, removed or changed).
pub(crate) fn changed(a: &Leaves, b: &Leaves) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    for (p, leaf) in a {
        if b.get(p) != Some(leaf) {
            out.insert(p.clone());
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            out.insert(p.clone());
        }
    }
    out
}

/// Removes JSON nulls from maps, recursively (an applied `null` means
/// "not specified" here).
pub(crate) fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, c| !c.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Server-side apply's merge of `config` into `live`: maps merge
/// recursively, list-maps merge by key (new entries appended), everything
/// else is replaced.
pub(crate) fn apply_merge(live: &mut Value, config: &Value, lm: &ListMaps) {
    fn walk(live: &mut Value, config: &Value, lm: &ListMaps, path: &mut Vec<Seg>) {
        match (live, config) {
            (Value::Object(l), Value::Object(c)) => {
                for (k, cv) in c {
                    path.push(Seg::Field(k.clone()));
                    match l.get_mut(k) {
                        Some(lv) => walk(lv, cv, lm, path),
                        None => {
                            l.insert(k.clone(), cv.clone());
                        }
                    }
                    path.pop();
                }
            }
            (Value::Array(l), Value::Array(c)) if lm.key_at(path).is_some() => {
                let key = lm.key_at(path).unwrap_or_default().to_owned();
                let (Some(lkeys), Some(ckeys)) = (item_keys(l, &key), item_keys(c, &key)) else {
                    *l = c.clone();
                    return;
                };
                for (citem, ck) in c.iter().zip(ckeys) {
                    path.push(Seg::Key {
                        field: key.clone(),
                        value: ck.clone(),
                    });
                    match lkeys.iter().position(|lk| *lk == ck) {
                        Some(i) => walk(&mut l[i], citem, lm, path),
                        None => l.push(citem.clone()),
                    }
                    path.pop();
                }
            }
            (live, config) => *live = config.clone(),
        }
    }
    walk(live, config, lm, &mut Vec::new())
}

/// Removes the field or list-map entry at `path`, if present.
fn remove_path(v: &mut Value, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = v;
    for seg in parents {
        let next = match (seg, node) {
            (Seg::Field(f), Value::Object(m)) => m.get_mut(f),
            (Seg::Key { field, value }, Value::Array(items)) => items
                .iter_mut()
                .find(|i| i.get(field).map(Value::to_string).as_deref() == Some(value)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    match (last, node) {
        (Seg::Field(f), Value::Object(m)) => {
            m.remove(f);
        }
        (Seg::Key { field, value }, Value::Array(items)) => {
            items.retain(|i| i.get(field).map(Value::to_string).as_deref() != Some(value));
        }
        _ => {}
    }
}

/// `Apply` or `Update`, as in `managedFields[].operation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Operation {
    Apply,
    Update,
}

/// Who manages a set of fields: one `managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ManagerKey {
    pub(crate) manager: String,
    pub(crate) operation: Operation,
    /// `""` for the main resource, `"status"` for the status subresource.
    pub(crate) subresource: String,
}

impl ManagerKey {
    /// As the real server prints a manager in a conflict message.
    fn describe(&self, entry: &Entry) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == Operation::Update {
            s.push_str(&format!(" using {} at {}", entry.api_version, entry.time));
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) fields: BTreeSet<Path>,
    pub(crate) api_version: String,
    pub(crate) time: String,
}

/// The ownership of an object's fields, in `managedFields` order.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Managed(pub(crate) Vec<(ManagerKey, Entry)>);

/// One field another manager owns and an apply would change.
pub(crate) struct Conflict {
    pub(crate) manager: ManagerKey,
    pub(crate) path: Path,
}

impl Managed {
    /// Whether both own the same fields by the same managers (times ignored).
    pub(crate) fn same_fields(&self, other: &Managed) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((ka, ea), (kb, eb))| ka == kb && ea.fields == eb.fields)
    }

    fn entry_mut(&mut self, key: &ManagerKey, api_version: &str, time: &str) -> &mut Entry {
        let i = match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.0.push((
                    key.clone(),
                    Entry {
                        fields: BTreeSet::new(),
                        api_version: api_version.to_owned(),
                        time: time.to_owned(),
                    },
                ));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    /// Sets the time and apiVersion of `key`'s entry (the writer's), if any.
    pub(crate) fn touch(&mut self, key: &ManagerKey, api_version: &str, time: &str) {
        if let Some((_, e)) = self.0.iter_mut().find(|(k, _)| k == key) {
            e.time = time.to_owned();
            e.api_version = api_version.to_owned();
        }
    }

    /// Keeps only paths that exist in `present`; drops empty entries.
    pub(crate) fn prune(&mut self, present: &Leaves) {
        for (_, e) in &mut self.0 {
            e.fields.retain(|p| present.contains_key(p));
        }
        self.0.retain(|(_, e)| !e.fields.is_empty());
    }

    /// An update (create, replace, merge patch) by `key` changed `old` into
    /// `new`: the writer takes every field it set or changed; removed fields
    /// leave every owner.
    pub(crate) fn record_update(
        &mut self,
        key: &ManagerKey,
        old: &Leaves,
        new: &Leaves,
        api_version: &str,
        time: &str,
    ) {
        let diff = changed(old, new);
        if diff.is_empty() {
            return;
        }
        for (k, e) in &mut self.0 {
            if k != key {
                e.fields.retain(|p| !diff.contains(p));
            }
        }
        let entry = self.entry_mut(key, api_version, time);
        entry
            .fields
            .extend(diff.iter().filter(|p| new.contains_key(p)).cloned());
        self.prune(new);
    }

    /// Renders `metadata.managedFields`.
    pub(crate) fn render(&self) -> Value {
        let entries = self
            .0
            .iter()
            .map(|(k, e)| {
                let mut m = Map::new();
                if !k.manager.is_empty() {
                    m.insert("manager".into(), Value::from(k.manager.clone()));
                }
                let op = match k.operation {
                    Operation::Apply => "Apply",
                    Operation::Update => "Update",
                };
                m.insert("operation".into(), Value::from(op));
                m.insert("apiVersion".into(), Value::from(e.api_version.clone()));
                m.insert("time".into(), Value::from(e.time.clone()));
                m.insert("fieldsType".into(), Value::from("FieldsV1"));
                m.insert("fieldsV1".into(), fields_v1(&e.fields));
                if !k.subresource.is_empty() {
                    m.insert("subresource".into(), Value::from(k.subresource.clone()));
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(entries)
    }
}

/// A set of paths as a `FieldsV1` tree (`f:name`, `k:{"pod":"a"}`, `.`).
fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut node = &mut root;
        for seg in &p.0 {
            let name = match seg {
                Seg::Field(f) => format!("f:{f}"),
                Seg::Key { field, value } => {
                    format!("k:{{{}:{value}}}", Value::from(field.clone()))
                }
            };
            node = node
                .entry(name)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("fieldsV1 nodes are maps");
        }
        if matches!(p.0.last(), Some(Seg::Key { .. })) {
            node.insert(".".into(), Value::Object(Map::new()));
        }
    }
    Value::Object(root)
}

/// The conflict message and the `details.causes` of a 409, as the real
/// server words them.
pub(crate) fn conflict_message(managed: &Managed, conflicts: &[Conflict]) -> (String, Value) {
    let describe = |manager: &ManagerKey| {
        managed
            .0
            .iter()
            .find(|(k, _)| k == manager)
            .map(|(k, e)| k.describe(e))
            .unwrap_or_else(|| format!("{:?}", manager.manager))
    };
    let causes = conflicts
        .iter()
        .map(|c| {
            serde_json::json!({
                "type": "FieldManagerConflict",
                "message": format!("conflict with {}", describe(&c.manager)),
                "field": c.path.to_string(),
            })
        })
        .collect();
    if let [only] = conflicts {
        let msg = format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            describe(&only.manager),
            only.path
        );
        return (msg, Value::Array(causes));
    }
    let mut by_manager: BTreeMap<String, Vec<&Path>> = BTreeMap::new();
    for c in conflicts {
        by_manager
            .entry(describe(&c.manager))
            .or_default()
            .push(&c.path);
    }
    let mut lines = Vec::new();
    for (manager, paths) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(paths.iter().map(|p| format!("- {p}")));
    }
    let msg = format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    );
    (msg, Value::Array(causes))
}

/// Who writes, when, and how the object's lists merge.
pub(crate) struct Writer<'a> {
    pub(crate) key: &'a ManagerKey,
    pub(crate) list_maps: &'a ListMaps,
    pub(crate) api_version: &'a str,
    pub(crate) time: &'a str,
}

/// Server-side apply of `config` (already restricted to the fields this
/// endpoint may set) onto `live` (the tracked part of the object). Returns
/// the new tracked part, with `managed` updated, or the conflicts.
pub(crate) fn server_side_apply(
    live: &Value,
    config: &Value,
    managed: &mut Managed,
    w: &Writer<'_>,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let (key, lm) = (w.key, w.list_maps);
    let mut merged = live.clone();
    apply_merge(&mut merged, config, lm);
    let live_leaves = leaves(live, lm);
    let merged_leaves = leaves(&merged, lm);
    let diff = changed(&live_leaves, &merged_leaves);
    let config_set: BTreeSet<Path> = leaves(config, lm).into_keys().collect();

    let mut conflicts = Vec::new();
    for (k, e) in &managed.0 {
        if k == key {
            continue;
        }
        for p in e.fields.intersection(&diff) {
            conflicts.push(Conflict {
                manager: k.clone(),
                path: p.clone(),
            });
        }
    }
    if !conflicts.is_empty() {
        if !force {
            return Err(conflicts);
        }
        for (k, e) in &mut managed.0 {
            if k != key {
                e.fields.retain(|p| !diff.contains(p));
            }
        }
    }

    // Fields this manager applied before and no longer does, that nobody
    // else owns, are removed.
    let previous = managed
        .0
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, e)| e.fields.clone())
        .unwrap_or_default();
    let others: Vec<&Path> = managed
        .0
        .iter()
        .filter(|(k, _)| k != key)
        .flat_map(|(_, e)| e.fields.iter())
        .collect();
    for p in previous.difference(&config_set) {
        let owned_elsewhere = match p.0.last() {
            Some(Seg::Key { .. }) => others.iter().any(|o| o.starts_with(p)),
            _ => others.contains(&p),
        };
        if !owned_elsewhere {
            remove_path(&mut merged, &p.0);
        }
    }

    managed.entry_mut(key, w.api_version, w.time).fields = config_set;
    managed.prune(&leaves(&merged, lm));
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lm() -> ListMaps {
        ListMaps(vec![(
            vec!["status".into(), "members".into()],
            "pod".into(),
        )])
    }

    fn key(m: &str) -> ManagerKey {
        ManagerKey {
            manager: m.into(),
            operation: Operation::Apply,
            subresource: "status".into(),
        }
    }

    #[test]
    fn list_maps_merge_by_key_and_paths_print_like_smd() {
        let mut managed = Managed::default();
        let a = json!({"status": {"members": [{"pod": "a", "ready": true}]}});
        let b = json!({"status": {"members": [{"pod": "b", "ready": false}]}});
        let lm = lm();
        let (ka, kb) = (key("a"), key("b"));
        let wa = Writer {
            key: &ka,
            list_maps: &lm,
            api_version: "v",
            time: "t",
        };
        let wb = Writer {
            key: &kb,
            list_maps: &lm,
            api_version: "v",
            time: "t",
        };
        let live = server_side_apply(&json!({}), &a, &mut managed, &wa, false)
            .ok()
            .unwrap();
        let live = server_side_apply(&live, &b, &mut managed, &wb, false)
            .ok()
            .unwrap();
        assert_eq!(
            live,
            json!({"status": {"members": [{"pod": "a", "ready": true}, {"pod": "b", "ready": false}]}})
        );
        let paths: Vec<String> = managed.0[1]
            .1
            .fields
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            paths,
            [
                r#".status.members[pod="b"]"#,
                r#".status.members[pod="b"].pod"#,
                r#".status.members[pod="b"].ready"#
            ]
        );
        let fv1 = &managed.render()[1]["fieldsV1"];
        assert_eq!(
            fv1,
            &json!({"f:status": {"f:members": {"k:{\"pod\":\"b\"}": {".": {}, "f:pod": {}, "f:ready": {}}}}})
        );
    }
}
