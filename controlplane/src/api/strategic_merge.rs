//! Strategic merge patch (`application/strategic-merge-patch+json`), the PATCH body of
//! `kubectl apply` (client-side), `edit`, `set`, `cordon`, `rollout restart` and `patch`.
//!
//! Like a JSON merge patch, objects merge key by key and `null` deletes; unlike it, a list
//! merges element by element when the [`patch_schema`](super::patch_schema) table says so
//! (containers by `name`, ports by `containerPort`…), and the patch may carry directives
//! (apimachinery's `strategicpatch` defines them; the behaviour here follows its rules):
//!
//! - `"$patch": "replace"` in an object: the object replaces the stored one instead of
//!   merging; as a list element: the patch's list replaces the stored list.
//! - `"$patch": "delete"` in an object: the object is removed (left empty); as a list element:
//!   the stored elements with that merge key are removed.
//! - `"$patch": "merge"` in an object: the default, merging (as a list element it is an error,
//!   as in Kubernetes).
//! - `"$retainKeys": [..]`: keys of the stored object not listed are cleared (unions).
//! - `"$deleteFromPrimitiveList/<field>": [..]`: those values are removed from a scalar list.
//! - `"$setElementOrder/<field>": [..]`: the order of the merged list's elements; elements
//!   only the server has keep their place relative to their neighbours.
//!
//! Without `$setElementOrder`, a merged list lists the patch's elements in the patch's order,
//! with the server-only elements interleaved where they stood, as Kubernetes orders it.
//! No directive is left in the result.

use serde_json::{Map, Value};

use super::patch_schema::{FieldSchema, PatchStrategy, TypeSchema};

const PATCH: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// Why a strategic merge patch could not be applied. Every case is the client's error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("a strategic merge patch must be a JSON object")]
    NotAnObject,
    #[error("{path}: unknown patch directive {found}")]
    UnknownDirective { path: String, found: String },
    #[error("{path}: {message}")]
    BadDirective { path: String, message: String },
    #[error("{path}: every element of this list needs the merge key {key:?}")]
    MissingMergeKey { path: String, key: &'static str },
    #[error("{path}: {message}")]
    WrongShape { path: String, message: String },
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// Applies `patch` to `original` with the list semantics of `schema` (the kind's).
pub fn apply(
    original: &Value,
    patch: &Value,
    schema: &'static TypeSchema,
) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::NotAnObject);
    };
    let original = match original {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    merge_map(original, patch, Some(schema), "").map(Value::Object)
}

/// Two values are the same list element identity: numbers compare by value (`80` and
/// `80.0` are one port), everything else by JSON equality.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64() == b.as_f64(),
        _ => a == b,
    }
}

fn merge_map(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    schema: Option<&'static TypeSchema>,
    path: &str,
) -> Result<Map<String, Value>, PatchError> {
    match patch.get(PATCH) {
        None => {}
        Some(Value::String(directive)) if directive == "replace" => {
            let mut replacement = patch.clone();
            replacement.remove(PATCH);
            // Directives nested in the replacement still apply (to nothing).
            return merge_map(Map::new(), &replacement, schema, path);
        }
        Some(Value::String(directive)) if directive == "delete" => return Ok(Map::new()),
        Some(Value::String(directive)) if directive == "merge" => {}
        Some(other) => {
            return Err(PatchError::UnknownDirective {
                path: child_path(path, PATCH),
                found: other.to_string(),
            });
        }
    }

    if let Some(retain) = patch.get(RETAIN_KEYS) {
        retain_keys(&mut original, patch, retain, path)?;
    }

    let mut done: Vec<&str> = Vec::new();
    for (key, order) in patch {
        let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER) else { continue };
        let field_schema = schema.and_then(|s| s.field(field));
        let list_path = child_path(path, field);
        let Value::Array(order) = order else {
            return Err(PatchError::BadDirective {
                path: child_path(path, key),
                message: "$setElementOrder must be a list".to_owned(),
            });
        };
        let merge_key = match field_schema.map(|f| f.strategy) {
            Some(PatchStrategy::MergeByKey(merge_key)) => Some(merge_key),
            _ => None,
        };
        let patch_list = match patch.get(field) {
            Some(Value::Array(list)) => Some(list),
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(PatchError::WrongShape {
                    path: list_path,
                    message: "a list is expected beside its $setElementOrder".to_owned(),
                });
            }
        };
        if let Some(list) = patch_list {
            check_order_covers_patch(list, order, merge_key, &list_path)?;
        }
        let stored = match original.get(field) {
            Some(Value::Array(list)) => Some(list.clone()),
            _ => None,
        };
        let merged = match (&stored, patch_list) {
            (Some(stored), None) => stored.clone(),
            (stored, Some(list)) => {
                merge_list(stored.clone().unwrap_or_default(), list, field_schema, &list_path)?
            }
            (None, None) => continue,
        };
        let ordered = order_elements(
            merged,
            order,
            stored.as_deref().unwrap_or_default(),
            merge_key,
            &list_path,
        )?;
        original.insert(field.to_owned(), Value::Array(ordered));
        done.push(field);
    }

    let mut deletions = Vec::new();
    for (key, value) in patch {
        if key == PATCH || key == RETAIN_KEYS || key.starts_with(SET_ELEMENT_ORDER) {
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
            deletions.push((field, key, value));
            continue;
        }
        if key.starts_with('$') {
            return Err(PatchError::UnknownDirective {
                path: child_path(path, key),
                found: format!("{key:?}"),
            });
        }
        if done.contains(&key.as_str()) {
            continue;
        }
        let field_path = child_path(path, key);
        if value.is_null() {
            original.remove(key);
            continue;
        }
        let field_schema = schema.and_then(|s| s.field(key));
        let merged = match (original.remove(key), value) {
            (Some(Value::Object(stored)), Value::Object(patch)) => Value::Object(merge_map(
                stored,
                patch,
                field_schema.and_then(|f| f.schema),
                &field_path,
            )?),
            (Some(Value::Array(stored)), Value::Array(patch)) => {
                Value::Array(merge_list(stored, patch, field_schema, &field_path)?)
            }
            // Absent, or of another type: the patch's value, without its directives.
            (_, value) => new_value(value, field_schema, &field_path)?,
        };
        original.insert(key.clone(), merged);
    }

    for (field, key, values) in deletions {
        let Value::Array(values) = values else {
            return Err(PatchError::BadDirective {
                path: child_path(path, key),
                message: "$deleteFromPrimitiveList must be a list".to_owned(),
            });
        };
        if let Some(Value::Array(list)) = original.get_mut(field) {
            list.retain(|element| !values.iter().any(|v| same(v, element)));
        }
    }
    Ok(original)
}

/// `$retainKeys`: keys of the stored object that are not listed are cleared; the patch itself
/// may only set listed keys.
fn retain_keys(
    original: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    retain: &Value,
    path: &str,
) -> Result<(), PatchError> {
    let bad = |message: &str| PatchError::BadDirective {
        path: child_path(path, RETAIN_KEYS),
        message: message.to_owned(),
    };
    let Value::Array(retain) = retain else {
        return Err(bad("$retainKeys must be a list of field names"));
    };
    let mut keep = Vec::with_capacity(retain.len());
    for key in retain {
        match key {
            Value::String(key) => keep.push(key.as_str()),
            _ => return Err(bad("$retainKeys must be a list of field names")),
        }
    }
    for (key, value) in patch {
        if value.is_null() || key.starts_with('$') {
            continue;
        }
        if !keep.contains(&key.as_str()) {
            return Err(bad(&format!("the patch sets {key:?}, which $retainKeys does not list")));
        }
    }
    original.retain(|key, _| keep.contains(&key.as_str()));
    Ok(())
}

/// A value the stored object does not have yet: the patch's, with directives applied to
/// nothing (so none is stored).
fn new_value(
    value: &Value,
    field: Option<&'static FieldSchema>,
    path: &str,
) -> Result<Value, PatchError> {
    Ok(match value {
        Value::Object(map) => {
            Value::Object(merge_map(Map::new(), map, field.and_then(|f| f.schema), path)?)
        }
        Value::Array(list) => Value::Array(merge_list(Vec::new(), list, field, path)?),
        other => other.clone(),
    })
}

/// Merges a patch list into a stored list as the field's strategy says.
fn merge_list(
    stored: Vec<Value>,
    patch: &[Value],
    field: Option<&'static FieldSchema>,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    let strategy = field.map_or(PatchStrategy::Replace, |f| f.strategy);
    match strategy {
        PatchStrategy::Replace => Ok(patch.to_vec()),
        PatchStrategy::MergeScalars => {
            if let Some(bad) = patch.iter().chain(&stored).find(|v| v.is_object() || v.is_array()) {
                return Err(PatchError::WrongShape {
                    path: path.to_owned(),
                    message: format!("a list of scalars is expected, found {bad}"),
                });
            }
            let mut merged: Vec<Value> = Vec::with_capacity(stored.len() + patch.len());
            for value in stored.iter().chain(patch) {
                if !merged.iter().any(|m| same(m, value)) {
                    merged.push(value.clone());
                }
            }
            let (from_patch, server_only) =
                merged.into_iter().partition(|v| patch.iter().any(|p| same(p, v)));
            Ok(interleave(from_patch, server_only, patch, &stored, None))
        }
        PatchStrategy::MergeByKey(key) => {
            merge_keyed_list(stored, patch, key, field.and_then(|f| f.schema), path)
        }
    }
}

fn element_key<'a>(
    element: &'a Value,
    key: &'static str,
    path: &str,
) -> Result<&'a Value, PatchError> {
    match element {
        Value::Object(map) => {
            map.get(key).ok_or(PatchError::MissingMergeKey { path: path.to_owned(), key })
        }
        other => Err(PatchError::WrongShape {
            path: path.to_owned(),
            message: format!("a list of objects is expected, found {other}"),
        }),
    }
}

fn merge_keyed_list(
    mut stored: Vec<Value>,
    patch: &[Value],
    key: &'static str,
    schema: Option<&'static TypeSchema>,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    let original = stored.clone();
    let mut elements = Vec::with_capacity(patch.len());
    let mut replace = false;
    for element in patch {
        let Value::Object(map) = element else {
            return Err(PatchError::WrongShape {
                path: path.to_owned(),
                message: format!("a list of objects is expected, found {element}"),
            });
        };
        match map.get(PATCH) {
            None => elements.push(map),
            Some(Value::String(directive)) if directive == "delete" => {
                let value = element_key(element, key, path)?;
                stored.retain(|s| s.get(key).is_none_or(|v| !same(v, value)));
            }
            Some(Value::String(directive)) if directive == "replace" => replace = true,
            Some(Value::String(directive)) if directive == "merge" => {
                return Err(PatchError::BadDirective {
                    path: path.to_owned(),
                    message: "merging lists cannot be asked for with $patch: merge".to_owned(),
                });
            }
            Some(other) => {
                return Err(PatchError::UnknownDirective {
                    path: child_path(path, PATCH),
                    found: other.to_string(),
                });
            }
        }
    }
    if replace {
        return elements
            .into_iter()
            .map(|map| merge_map(Map::new(), map, schema, path).map(Value::Object))
            .collect();
    }
    for map in &elements {
        let value =
            map.get(key).ok_or(PatchError::MissingMergeKey { path: path.to_owned(), key })?;
        let position = stored.iter().position(|s| s.get(key).is_some_and(|v| same(v, value)));
        match position {
            Some(index) => {
                let Value::Object(existing) = std::mem::take(&mut stored[index]) else {
                    return Err(PatchError::WrongShape {
                        path: path.to_owned(),
                        message: "the stored list holds a non-object element".to_owned(),
                    });
                };
                stored[index] = Value::Object(merge_map(existing, map, schema, path)?);
            }
            None => stored.push(Value::Object(merge_map(Map::new(), map, schema, path)?)),
        }
    }
    let patch_keys: Vec<&Value> = elements.iter().filter_map(|m| m.get(key)).collect();
    let (from_patch, server_only): (Vec<Value>, Vec<Value>) = stored
        .into_iter()
        .partition(|s| s.get(key).is_some_and(|v| patch_keys.iter().any(|p| same(p, v))));
    let patch_order: Vec<Value> = elements.iter().map(|m| Value::Object((*m).clone())).collect();
    Ok(interleave(from_patch, server_only, &patch_order, &original, Some(key)))
}

/// The identity of a list element: its merge key's value, or itself for scalars.
fn identity<'a>(element: &'a Value, key: Option<&str>) -> Option<&'a Value> {
    match key {
        Some(key) => element.get(key),
        None => Some(element),
    }
}

fn index_in(list: &[Value], element: &Value, key: Option<&str>) -> Option<usize> {
    let wanted = identity(element, key)?;
    list.iter().position(|candidate| identity(candidate, key).is_some_and(|c| same(c, wanted)))
}

/// Orders a merged list: `from_patch` in the order of `patch_order`, `server_only` in the
/// order of `server_order`, then the two interleaved so that a server-only element stays
/// before the first patch element that followed it on the server.
fn interleave(
    mut from_patch: Vec<Value>,
    mut server_only: Vec<Value>,
    patch_order: &[Value],
    server_order: &[Value],
    key: Option<&str>,
) -> Vec<Value> {
    let rank = |list: &[Value], element: &Value| index_in(list, element, key).unwrap_or(usize::MAX);
    from_patch.sort_by_key(|element| rank(patch_order, element));
    server_only.sort_by_key(|element| rank(server_order, element));
    let mut merged = Vec::with_capacity(from_patch.len() + server_only.len());
    let mut server = server_only.into_iter().peekable();
    let mut patched = from_patch.into_iter().peekable();
    loop {
        let take_server = match (server.peek(), patched.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(left), Some(right)) => {
                match (index_in(server_order, left, key), index_in(server_order, right, key)) {
                    (Some(l), Some(r)) => l < r,
                    _ => false,
                }
            }
        };
        let next = if take_server { server.next() } else { patched.next() };
        merged.extend(next);
    }
    merged
}

/// `$setElementOrder` must name every element the patch list sets, in the same order.
fn check_order_covers_patch(
    patch: &[Value],
    order: &[Value],
    key: Option<&'static str>,
    path: &str,
) -> Result<(), PatchError> {
    let mut last = None;
    for element in patch {
        if element.get(PATCH).is_some() {
            continue;
        }
        if let Some(key) = key {
            element_key(element, key, path)?;
        }
        let Some(position) = index_in(order, element, key) else {
            return Err(PatchError::BadDirective {
                path: path.to_owned(),
                message: format!("$setElementOrder does not list the patched element {element}"),
            });
        };
        if last.is_some_and(|last| position < last) {
            return Err(PatchError::BadDirective {
                path: path.to_owned(),
                message: "$setElementOrder orders the patched elements differently from the patch"
                    .to_owned(),
            });
        }
        last = Some(position);
    }
    Ok(())
}

fn order_elements(
    merged: Vec<Value>,
    order: &[Value],
    stored: &[Value],
    key: Option<&'static str>,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    if let Some(key) = key {
        for element in order {
            element_key(element, key, path)?;
        }
    }
    let (listed, server_only): (Vec<Value>, Vec<Value>) =
        merged.into_iter().partition(|element| index_in(order, element, key).is_some());
    Ok(interleave(listed, server_only, order, stored, key))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{PatchError, apply};
    use crate::api::patch_schema::kind_schema;

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": spec})
    }

    /// (what the case shows, stored pod spec, patch of the spec, expected pod spec)
    #[test]
    fn pod_spec_patches_merge_as_kubernetes_merges_them() {
        let cases = [
            (
                "a container is merged by name, its other fields kept",
                json!({"containers": [{"name": "web", "image": "web:1", "args": ["a"]}]}),
                json!({"containers": [{"name": "web", "image": "web:2"}]}),
                json!({"containers": [{"name": "web", "image": "web:2", "args": ["a"]}]}),
            ),
            (
                "a new container leads the list, as in Kubernetes, unless an order is given",
                json!({"containers": [{"name": "web", "image": "web:1"}]}),
                json!({"containers": [{"name": "log", "image": "log:1"}]}),
                json!({"containers": [{"name": "log", "image": "log:1"}, {"name": "web", "image": "web:1"}]}),
            ),
            (
                "$patch: delete removes the element with that key",
                json!({"containers": [{"name": "web", "image": "w"}, {"name": "log", "image": "l"}]}),
                json!({"containers": [{"name": "log", "$patch": "delete"}]}),
                json!({"containers": [{"name": "web", "image": "w"}]}),
            ),
            (
                "$patch: replace as an element replaces the list",
                json!({"containers": [{"name": "web", "image": "w"}, {"name": "log", "image": "l"}]}),
                json!({"containers": [{"name": "new", "image": "n"}, {"$patch": "replace"}]}),
                json!({"containers": [{"name": "new", "image": "n"}]}),
            ),
            (
                "ports merge by containerPort, env by name, mounts by mountPath",
                json!({"containers": [{"name": "web", "image": "w",
                    "ports": [{"containerPort": 80, "name": "http"}],
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    "volumeMounts": [{"mountPath": "/data", "name": "data"}]}]}),
                json!({"containers": [{"name": "web",
                    "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 443}],
                    "env": [{"name": "B", "value": "3"}],
                    "volumeMounts": [{"mountPath": "/data", "readOnly": true}]}]}),
                json!({"containers": [{"name": "web", "image": "w",
                    "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}, {"containerPort": 443}],
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}],
                    "volumeMounts": [{"mountPath": "/data", "name": "data", "readOnly": true}]}]}),
            ),
            (
                "tolerations have no merge key: the patch's list replaces the stored one",
                json!({"tolerations": [{"key": "a", "operator": "Exists"}]}),
                json!({"tolerations": [{"key": "b", "operator": "Exists"}]}),
                json!({"tolerations": [{"key": "b", "operator": "Exists"}]}),
            ),
            (
                "args are replaced whole, null deletes a field",
                json!({"containers": [{"name": "web", "args": ["a", "b"], "command": ["x"]}]}),
                json!({"containers": [{"name": "web", "args": ["c"], "command": null}]}),
                json!({"containers": [{"name": "web", "args": ["c"]}]}),
            ),
            (
                "$setElementOrder orders the listed elements; a server-only one stays before its successor",
                json!({"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}),
                json!({"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}],
                       "containers": [{"name": "c", "image": "c:2"}]}),
                json!({"containers": [{"name": "b"}, {"name": "c", "image": "c:2"}, {"name": "a"}]}),
            ),
            (
                "$setElementOrder alone reorders without changing elements",
                json!({"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]}),
                json!({"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}),
                json!({"containers": [{"name": "b", "image": "2"}, {"name": "a", "image": "1"}]}),
            ),
            (
                "$retainKeys clears the members of a union that it does not list",
                json!({"volumes": [{"name": "data", "emptyDir": {}}]}),
                json!({"volumes": [{"name": "data", "hostPath": {"path": "/srv"},
                                    "$retainKeys": ["hostPath", "name"]}]}),
                json!({"volumes": [{"name": "data", "hostPath": {"path": "/srv"}}]}),
            ),
            (
                "$patch: replace in an object replaces it instead of merging",
                json!({"nodeSelector": {"a": "1", "b": "2"}}),
                json!({"nodeSelector": {"c": "3", "$patch": "replace"}}),
                json!({"nodeSelector": {"c": "3"}}),
            ),
            (
                "$patch: delete in an object empties it",
                json!({"securityContext": {"runAsUser": 1}}),
                json!({"securityContext": {"$patch": "delete"}}),
                json!({"securityContext": {}}),
            ),
            (
                "a list the server lacks is taken from the patch, without directives",
                json!({}),
                json!({"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}],
                        "$setElementOrder/env": [{"name": "X"}]}]}),
                json!({"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]}),
            ),
        ];
        let schema = kind_schema("Pod");
        for (what, stored, patch, expected) in cases {
            let patched = apply(&pod(stored), &json!({"spec": patch}), schema)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(patched, pod(expected), "{what}");
        }
    }

    #[test]
    fn metadata_lists_merge_as_sets_and_by_uid() {
        let stored = json!({"metadata": {"name": "a", "finalizers": ["x", "y"],
            "ownerReferences": [{"uid": "1", "name": "rs", "controller": true}],
            "labels": {"app": "web", "tier": "front"}}});
        let patch = json!({"metadata": {"finalizers": ["z", "x"],
            "$deleteFromPrimitiveList/finalizers": ["y"],
            "ownerReferences": [{"uid": "2", "name": "other"}],
            "labels": {"tier": null, "env": "prod"}}});
        let patched = apply(&stored, &patch, kind_schema("ConfigMap")).unwrap();
        assert_eq!(
            patched,
            json!({"metadata": {"name": "a", "finalizers": ["z", "x"],
                "ownerReferences": [{"uid": "2", "name": "other"}, {"uid": "1", "name": "rs", "controller": true}],
                "labels": {"app": "web", "env": "prod"}}})
        );
    }

    #[test]
    fn service_ports_merge_by_port_and_node_pod_cidrs_as_a_set() {
        let service = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}});
        let patched = apply(
            &service,
            &json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
            kind_schema("Service"),
        )
        .unwrap();
        assert_eq!(
            patched,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}, {"port": 443}]}})
        );
        let node = json!({"spec": {"podCIDRs": ["10.0.0.0/24"], "taints": [{"key": "a", "effect": "NoSchedule"}]}});
        let patched = apply(
            &node,
            &json!({"spec": {"podCIDRs": ["10.0.1.0/24"], "taints": [], "unschedulable": true}}),
            kind_schema("Node"),
        )
        .unwrap();
        assert_eq!(
            patched,
            json!({"spec": {"podCIDRs": ["10.0.1.0/24", "10.0.0.0/24"], "taints": [], "unschedulable": true}})
        );
    }

    #[test]
    fn deployment_template_containers_merge_by_name() {
        let stored = json!({"spec": {"replicas": 1, "template": {"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1"}, {"name": "side", "image": "s"}]}}}});
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "now"}},
            "spec": {"$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
                     "containers": [{"name": "web", "image": "web:2"}]}}}});
        let patched = apply(&stored, &patch, kind_schema("Deployment")).unwrap();
        assert_eq!(
            patched,
            json!({"spec": {"replicas": 1, "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {"kubectl.kubernetes.io/restartedAt": "now"}},
                "spec": {"containers": [{"name": "web", "image": "web:2"}, {"name": "side", "image": "s"}]}}}})
        );
    }

    #[test]
    fn malformed_patches_are_refused() {
        let stored = pod(json!({"containers": [{"name": "web"}]}));
        let schema = kind_schema("Pod");
        type Expected = fn(&PatchError) -> bool;
        let cases: [(&str, Value, Expected); 8] = [
            ("not an object", json!([1]), |e| matches!(e, PatchError::NotAnObject)),
            (
                "an element without its merge key",
                json!({"spec": {"containers": [{"image": "x"}]}}),
                |e| matches!(e, PatchError::MissingMergeKey { key: "name", .. }),
            ),
            ("a scalar in a list of objects", json!({"spec": {"containers": ["web"]}}), |e| {
                matches!(e, PatchError::WrongShape { .. })
            }),
            ("an unknown $patch value", json!({"spec": {"$patch": "explode"}}), |e| {
                matches!(e, PatchError::UnknownDirective { .. })
            }),
            (
                "$patch: merge on a list element",
                json!({"spec": {"containers": [{"name": "web", "$patch": "merge"}]}}),
                |e| matches!(e, PatchError::BadDirective { .. }),
            ),
            (
                "$retainKeys that omits a key the patch sets",
                json!({"spec": {"hostname": "h", "$retainKeys": ["containers"]}}),
                |e| matches!(e, PatchError::BadDirective { .. }),
            ),
            (
                "$setElementOrder that omits a patched element",
                json!({"spec": {"$setElementOrder/containers": [{"name": "a"}],
                                "containers": [{"name": "web", "image": "x"}]}}),
                |e| matches!(e, PatchError::BadDirective { .. }),
            ),
            ("an unknown directive", json!({"spec": {"$unknown": 1}}), |e| {
                matches!(e, PatchError::UnknownDirective { .. })
            }),
        ];
        for (what, patch, expected) in cases {
            let error = apply(&stored, &patch, schema).expect_err(what);
            assert!(expected(&error), "{what}: {error:?}");
        }
    }
}
