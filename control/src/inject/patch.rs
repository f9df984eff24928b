//! RFC 6902 JSON Patch between two JSON documents, for the admission webhook.
//!
//! The patch is minimal where it matters to other mutating webhooks: objects are compared
//! key by key, and an array that only grew gets `add …/-` operations. It must never emit a
//! path that does not exist in the original document (except as an `add`).

use serde_json::{json, Value};

/// The operations that turn `old` into `new`.
pub fn diff(old: &Value, new: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk(String::new(), old, new, &mut ops);
    ops
}

/// Escapes one JSON Pointer reference token (RFC 6901): `~` then `/`.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn walk(path: String, old: &Value, new: &Value, ops: &mut Vec<Value>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}/{}", escape(k));
                match b.get(k) {
                    Some(vb) => walk(p, va, vb, ops),
                    None => ops.push(json!({"op": "remove", "path": p})),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    let p = format!("{path}/{}", escape(k));
                    ops.push(json!({"op": "add", "path": p, "value": vb}));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() <= b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                walk(format!("{path}/{i}"), va, vb, ops);
            }
            for vb in &b[a.len()..] {
                ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": vb}));
            }
        }
        _ if old == new => {}
        _ => ops.push(json!({"op": "replace", "path": path, "value": new})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_annotation_keys_and_appends_to_arrays() {
        let old = json!({"metadata": {"annotations": {"a": "1"}}, "spec": {"containers": [{"name": "app"}]}});
        let new = json!({
            "metadata": {"annotations": {"a": "1", "serin.dev/injected": "inbound"}},
            "spec": {"containers": [{"name": "app"}, {"name": "serin"}], "volumes": []}
        });
        assert_eq!(
            diff(&old, &new),
            vec![
                json!({"op": "add", "path": "/metadata/annotations/serin.dev~1injected", "value": "inbound"}),
                json!({"op": "add", "path": "/spec/containers/-", "value": {"name": "serin"}}),
                json!({"op": "add", "path": "/spec/volumes", "value": []}),
            ]
        );
    }

    #[test]
    fn equal_documents_need_no_operation_and_shrinking_arrays_are_replaced() {
        let v = json!({"a": [1, 2], "b~c": {"d": null}});
        assert!(diff(&v, &v).is_empty());
        let ops = diff(&json!({"a": [1, 2], "x": 1}), &json!({"a": [2]}));
        assert_eq!(
            ops,
            vec![
                json!({"op": "replace", "path": "/a", "value": [2]}),
                json!({"op": "remove", "path": "/x"}),
            ]
        );
    }
}
