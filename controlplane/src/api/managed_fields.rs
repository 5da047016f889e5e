//! Field ownership (`metadata.managedFields`): which field manager set which fields, in the
//! `FieldsV1` form Kubernetes uses, so that server-side apply can find conflicts and remove
//! the fields an applier stopped setting.
//!
//! A [`FieldSet`] is a tree of path elements, each written as in `FieldsV1`: `f:<name>` for
//! an object member, `k:{"name":"web"}` for the element of a keyed list (its key fields as
//! JSON), `v:<json>` for the element of a set. A node is a *member* of the set when the
//! manager owns the field itself: every leaf, and the element of a keyed list (written
//! `".": {}` beside its children). Which lists are keyed or sets comes from
//! [`patch_schema`](super::patch_schema); other lists are owned whole.
//!
//! Every write through the HTTP API with a field manager (the `fieldManager` parameter, or
//! the client's `User-Agent`) records the fields it changed as that manager's `Update` entry
//! and takes them from the others; server-side apply keeps one `Apply` entry per manager
//! with exactly the fields of its last applied configuration.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
use serde_json::{Map, Value};

use super::patch_schema::{FieldSchema, ListType, TypeSchema};

pub const OPERATION_APPLY: &str = "Apply";
pub const OPERATION_UPDATE: &str = "Update";
const FIELDS_TYPE: &str = "FieldsV1";

/// Metadata the server owns: never part of anyone's fields.
const SERVER_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// A set of field paths (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

/// One owned path: its elements and whether it is a leaf (owned with its value) or the
/// element of a keyed list (owned as being there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedPath {
    pub elements: Vec<String>,
    pub leaf: bool,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Reads a `FieldsV1` object; shapes it does not know are ignored.
    pub fn from_fields_v1(value: &Value) -> Self {
        let mut set = Self::default();
        if let Value::Object(map) = value {
            for (key, child) in map {
                if key == "." {
                    set.member = true;
                } else {
                    let mut child = Self::from_fields_v1(child);
                    if child.children.is_empty() {
                        child.member = true;
                    }
                    set.children.insert(key.clone(), child);
                }
            }
        }
        set
    }

    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".to_owned(), Value::Object(Map::new()));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    fn node(&self, path: &[String]) -> Option<&Self> {
        let mut node = self;
        for element in path {
            node = node.children.get(element)?;
        }
        Some(node)
    }

    /// Whether the path itself is owned.
    pub fn contains(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| n.member)
    }

    /// Whether the path or anything under it is owned.
    pub fn owns_at_or_below(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    pub fn insert(&mut self, path: &[String]) {
        let mut node = self;
        for element in path {
            node = node.children.entry(element.clone()).or_default();
        }
        node.member = true;
    }

    /// Removes the path itself (not what lies under it) and prunes emptied nodes.
    pub fn remove(&mut self, path: &[String]) {
        let Some((first, rest)) = path.split_first() else {
            self.member = false;
            return;
        };
        if let Some(child) = self.children.get_mut(first) {
            child.remove(rest);
            if child.is_empty() {
                self.children.remove(first);
            }
        }
    }

    pub fn union(&mut self, other: &Self) {
        for path in other.paths() {
            self.insert(&path.elements);
        }
    }

    /// Removes every path of `other`.
    pub fn subtract(&mut self, other: &Self) {
        for path in other.paths() {
            self.remove(&path.elements);
        }
    }

    /// Every owned path, parents before children.
    pub fn paths(&self) -> Vec<OwnedPath> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<String>, out: &mut Vec<OwnedPath>) {
        if self.member && !prefix.is_empty() {
            out.push(OwnedPath { elements: prefix.clone(), leaf: self.children.is_empty() });
        }
        for (key, child) in &self.children {
            prefix.push(key.clone());
            child.collect(prefix, out);
            prefix.pop();
        }
    }
}

/// The path as Kubernetes prints it in conflicts: `.spec.containers[name="web"].image`.
pub fn display_path(path: &[String]) -> String {
    let mut text = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            text.push('.');
            text.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let fields: Vec<String> = match serde_json::from_str::<Map<String, Value>>(key) {
                Ok(map) => map.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                Err(_) => vec![key.to_owned()],
            };
            text.push_str(&format!("[{}]", fields.join(",")));
        } else if let Some(value) = element.strip_prefix("v:") {
            text.push_str(&format!("[={value}]"));
        } else {
            text.push_str(&format!("[{element}]"));
        }
    }
    text
}

/// Numbers compare by value, as in the patch formats.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64() == b.as_f64(),
        _ => a == b,
    }
}

/// The `k:` element of a keyed list's item, `None` when a key field is missing.
pub fn key_element(item: &Value, keys: &[&str]) -> Option<String> {
    let mut map = Map::new();
    for key in keys {
        match item.get(*key) {
            Some(value) => {
                map.insert((*key).to_owned(), value.clone());
            }
            // A missing `protocol` is the default one; other missing keys make no identity.
            None if *key == "protocol" => {
                map.insert((*key).to_owned(), Value::String("TCP".to_owned()));
            }
            None => return None,
        }
    }
    Some(format!("k:{}", Value::Object(map)))
}

fn item_matches(item: &Value, element: &str) -> bool {
    if let Some(key) = element.strip_prefix("k:") {
        let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(key) else {
            return false;
        };
        let keys: Vec<&str> = wanted.keys().map(String::as_str).collect();
        return key_element(item, &keys).is_some_and(|found| {
            serde_json::from_str::<Value>(&found["k:".len()..])
                .ok()
                .and_then(|v| v.as_object().cloned())
                .is_some_and(|found| {
                    found.iter().all(|(k, v)| wanted.get(k).is_some_and(|w| same(v, w)))
                })
        });
    }
    if let Some(value) = element.strip_prefix("v:") {
        return serde_json::from_str::<Value>(value).is_ok_and(|v| same(&v, item));
    }
    false
}

/// The value at `path` in `document`.
pub fn value_at<'a>(document: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = document;
    for element in path {
        current = match (element.strip_prefix("f:"), current) {
            (Some(field), Value::Object(map)) => map.get(field)?,
            (None, Value::Array(list)) => list.iter().find(|item| item_matches(item, element))?,
            _ => return None,
        };
    }
    Some(current)
}

/// Removes the value at `path` from `document` (a member, a keyed element, a set element).
pub fn remove_at(document: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut current = document;
    for element in parents {
        let next = match (element.strip_prefix("f:"), current) {
            (Some(field), Value::Object(map)) => map.get_mut(field),
            (None, Value::Array(list)) => list.iter_mut().find(|item| item_matches(item, element)),
            _ => None,
        };
        match next {
            Some(next) => current = next,
            None => return,
        }
    }
    match (last.strip_prefix("f:"), current) {
        (Some(field), Value::Object(map)) => {
            map.remove(field);
        }
        (None, Value::Array(list)) => list.retain(|item| !item_matches(item, last)),
        _ => {}
    }
}

/// The part of an object that field managers own: without `apiVersion`, `kind`, the
/// server's metadata, and (`status: false`) without `status`, or (`status: true`) with only
/// `status`. Kinds without a status subresource keep everything.
pub fn trackable(document: &Value, status: Option<bool>) -> Value {
    let Value::Object(map) = document else { return Value::Object(Map::new()) };
    let mut map = map.clone();
    map.remove("apiVersion");
    map.remove("kind");
    match status {
        Some(false) => {
            map.remove("status");
        }
        Some(true) => map.retain(|key, _| key == "status"),
        None => {}
    }
    if let Some(Value::Object(metadata)) = map.get_mut("metadata") {
        for field in SERVER_METADATA {
            metadata.remove(field);
        }
        if metadata.is_empty() {
            map.remove("metadata");
        }
    }
    Value::Object(map)
}

/// The fields an object (already [`trackable`]) sets.
pub fn fields_of(document: &Value, schema: Option<&'static TypeSchema>) -> FieldSet {
    let mut set = FieldSet::default();
    if let Value::Object(map) = document {
        for (key, value) in map {
            let field = schema.and_then(|s| s.field(key));
            set.children.insert(format!("f:{key}"), value_fields(value, field));
        }
    }
    set
}

fn value_fields(value: &Value, field: Option<&'static FieldSchema>) -> FieldSet {
    let leaf = FieldSet { member: true, children: BTreeMap::new() };
    match value {
        Value::Object(map) if !map.is_empty() => fields_of(value, field.and_then(|f| f.schema)),
        Value::Array(list) if !list.is_empty() => {
            let mut set = FieldSet::default();
            match field.map(|f| f.list_type) {
                Some(ListType::Set) => {
                    for item in list {
                        set.children.insert(format!("v:{item}"), leaf.clone());
                    }
                }
                Some(ListType::Map(keys)) => {
                    for item in list {
                        // An element without its keys cannot be told apart: the list is then
                        // owned whole.
                        let Some(element) = key_element(item, keys) else { return leaf };
                        let mut child = fields_of(item, field.and_then(|f| f.schema));
                        child.member = true;
                        set.children.insert(element, child);
                    }
                }
                _ => return leaf,
            }
            set
        }
        _ => leaf,
    }
}

/// What a write changed: the paths of `new` whose value differs from `old` (or that `old`
/// lacks), and the paths of `old` that `new` no longer has.
pub fn changes(
    old: &Value,
    new: &Value,
    schema: Option<&'static TypeSchema>,
) -> (FieldSet, FieldSet) {
    let old_set = fields_of(old, schema);
    let new_set = fields_of(new, schema);
    let mut changed = FieldSet::default();
    for path in new_set.paths() {
        let before = value_at(old, &path.elements);
        let differs = match before {
            None => true,
            Some(before) => path.leaf && value_at(new, &path.elements) != Some(before),
        };
        if differs {
            changed.insert(&path.elements);
        }
    }
    let mut removed = old_set;
    removed.subtract(&new_set);
    (changed, removed)
}

/// The managed fields as sets, with their entries.
pub fn decode(entries: Option<&[ManagedFieldsEntry]>) -> Vec<(ManagedFieldsEntry, FieldSet)> {
    entries
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            let set = entry
                .fields_v1
                .as_ref()
                .map(|fields| FieldSet::from_fields_v1(&fields.0))
                .unwrap_or_default();
            (entry.clone(), set)
        })
        .collect()
}

/// Writes the sets back into their entries, dropping the entries left without fields.
pub fn encode(entries: Vec<(ManagedFieldsEntry, FieldSet)>) -> Option<Vec<ManagedFieldsEntry>> {
    let entries: Vec<ManagedFieldsEntry> = entries
        .into_iter()
        .filter(|(_, set)| !set.is_empty())
        .map(|(mut entry, set)| {
            entry.fields_v1 = Some(FieldsV1(set.to_fields_v1()));
            entry.fields_type = Some(FIELDS_TYPE.to_owned());
            entry
        })
        .collect();
    (!entries.is_empty()).then_some(entries)
}

/// Who is writing: the manager, its operation, the API version it writes and the
/// subresource (`status`, or none).
#[derive(Clone, Debug)]
pub struct Manager<'a> {
    pub name: &'a str,
    pub operation: &'a str,
    pub api_version: &'a str,
    pub subresource: Option<&'a str>,
}

impl Manager<'_> {
    pub fn is(&self, entry: &ManagedFieldsEntry) -> bool {
        entry.manager.as_deref() == Some(self.name)
            && entry.operation.as_deref() == Some(self.operation)
            && entry.subresource.as_deref().filter(|s| !s.is_empty()) == self.subresource
    }

    pub fn entry(&self, time: Time) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            api_version: Some(self.api_version.to_owned()),
            fields_type: Some(FIELDS_TYPE.to_owned()),
            fields_v1: None,
            manager: Some(self.name.to_owned()),
            operation: Some(self.operation.to_owned()),
            subresource: self.subresource.map(str::to_owned),
            time: Some(time),
        }
    }
}

/// Records an update (create, replace, any patch but apply) by `manager`: it gains the
/// fields it changed, which every other manager loses; fields it removed are nobody's.
pub fn record_update(
    entries: Option<&[ManagedFieldsEntry]>,
    old: &Value,
    new: &Value,
    schema: Option<&'static TypeSchema>,
    manager: &Manager<'_>,
    time: Time,
) -> Option<Vec<ManagedFieldsEntry>> {
    let (changed, removed) = changes(old, new, schema);
    let mut sets = decode(entries);
    if changed.is_empty() && removed.is_empty() {
        return entries.map(<[ManagedFieldsEntry]>::to_vec);
    }
    for (_, set) in &mut sets {
        set.subtract(&changed);
        set.subtract(&removed);
    }
    match sets.iter_mut().find(|(entry, _)| manager.is(entry)) {
        Some((entry, set)) => {
            set.union(&changed);
            entry.time = Some(time);
        }
        None => sets.push((manager.entry(time), changed)),
    }
    encode(sets)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{FieldSet, changes, display_path, fields_of, remove_at, trackable, value_at};
    use crate::api::patch_schema::kind_schema;

    fn deployment() -> serde_json::Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "uid": "u", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "web:1", "ports": [{"containerPort": 80}]}]}}},
            "status": {"replicas": 2}})
    }

    #[test]
    fn fields_are_written_as_kubernetes_writes_them() {
        let document = trackable(&deployment(), Some(false));
        let set = fields_of(&document, Some(kind_schema("Deployment")));
        assert_eq!(
            set.to_fields_v1(),
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}, "f:finalizers": {"v:\"a\"": {}}},
                "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"web\"}": {".": {}, "f:name": {}, "f:image": {},
                        "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {
                            ".": {}, "f:containerPort": {}}}}}}}},
            })
        );
        assert_eq!(FieldSet::from_fields_v1(&set.to_fields_v1()), set, "the form round-trips");
    }

    #[test]
    fn paths_find_and_remove_keyed_elements() {
        let mut document = deployment();
        let image: Vec<String> =
            ["f:spec", "f:template", "f:spec", "f:containers", "k:{\"name\":\"web\"}", "f:image"]
                .map(str::to_owned)
                .to_vec();
        assert_eq!(value_at(&document, &image), Some(&json!("web:1")));
        assert_eq!(display_path(&image), ".spec.template.spec.containers[name=\"web\"].image");
        remove_at(&mut document, &image[..5]);
        assert_eq!(document["spec"]["template"]["spec"]["containers"], json!([]));
    }

    #[test]
    fn changes_name_what_differs_and_what_went() {
        let old = trackable(&deployment(), Some(false));
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(3);
        new["metadata"]["labels"] = json!({"app": "web", "tier": "front"});
        new["metadata"].as_object_mut().unwrap().remove("finalizers");
        let (changed, removed) = changes(&old, &new, Some(kind_schema("Deployment")));
        assert_eq!(
            changed.to_fields_v1(),
            json!({"f:metadata": {"f:labels": {"f:tier": {}}}, "f:spec": {"f:replicas": {}}})
        );
        assert_eq!(
            removed.to_fields_v1(),
            json!({"f:metadata": {"f:finalizers": {"v:\"a\"": {}}}})
        );
    }
}
