//! RFC 6902 JSON Patch between two JSON values: what the admission webhook answers with.

use serde_json::{Value, json};

/// Escapes one JSON-pointer segment (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The operations that turn `from` into `to`: objects are compared member by member, anything
/// else (arrays included) is replaced whole.
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk(from, to, String::new(), &mut ops);
    ops
}

fn walk(from: &Value, to: &Value, path: String, ops: &mut Vec<Value>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if !b.contains_key(k) {
                    ops.push(json!({ "op": "remove", "path": format!("{path}/{}", escape(k)) }));
                } else if let Some(w) = b.get(k) {
                    walk(v, w, format!("{path}/{}", escape(k)), ops);
                }
            }
            for (k, w) in b {
                if !a.contains_key(k) {
                    ops.push(
                        json!({ "op": "add", "path": format!("{path}/{}", escape(k)), "value": w }),
                    );
                }
            }
        }
        (a, b) if a == b => {}
        (_, b) => ops.push(json!({ "op": "replace", "path": path, "value": b })),
    }
}

/// Applies `ops` as produced by [`diff`] (add, remove, replace) to `doc`.
pub fn apply(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("an op without \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("an op without \"path\"")?;
        if path.is_empty() {
            *doc = op.get("value").cloned().ok_or("replace without a value")?;
            continue;
        }
        let (parent, last) = path.rsplit_once('/').ok_or("a path must start with /")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| format!("{parent} is not an object"))?;
        match kind {
            "add" | "replace" => {
                let v = op
                    .get("value")
                    .cloned()
                    .ok_or("add/replace without a value")?;
                target.insert(last, v);
            }
            "remove" => {
                target
                    .remove(&last)
                    .ok_or_else(|| format!("{path} does not exist"))?;
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_then_apply_reproduces_the_target() {
        let from = json!({ "a": 1, "b": { "c": [1, 2], "d/e": "x" }, "gone": true });
        let to = json!({ "a": 1, "b": { "c": [1, 2, 3], "d/e": "y", "new": {} }, "added": null });
        let ops = diff(&from, &to);
        let mut doc = from.clone();
        apply(&mut doc, &ops).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc, to);
        assert!(diff(&to, &to).is_empty());
    }
}
