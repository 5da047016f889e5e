//! Server-side apply (`application/apply-patch+yaml`, `kubectl apply --server-side`): a
//! manager sends the whole configuration it wants; the server merges it into the live object,
//! refuses to change fields another manager owns unless forced (409 with the conflicts),
//! removes the fields the manager stopped setting when no one else owns them, and records the
//! configuration's fields as the manager's `Apply` entry in `managedFields`.
//!
//! Lists merge by the apply list types of [`patch_schema`](super::patch_schema): keyed lists
//! element by element, sets value by value, other lists whole. Merged lists keep the order of
//! the configuration, with the live-only elements left where they stood.

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
use serde_json::{Map, Value};

use super::{
    managed_fields::{
        self, FieldSet, Manager, decode, display_path, encode, fields_of, key_element, remove_at,
        value_at,
    },
    patch_schema::{FieldSchema, ListType, TypeSchema},
};

/// A field another manager owns and the configuration would change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    /// The API version the other manager wrote with.
    pub api_version: String,
    /// The path as Kubernetes prints it (`.spec.replicas`).
    pub field: String,
    path: Vec<String>,
}

/// The annotation client-side apply keeps its last configuration in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The field manager of `kubectl apply --server-side`, which Kubernetes lets take over
/// from client-side apply (see [`allowed_by_last_applied`]).
const KUBECTL_APPLY_MANAGER: &str = "kubectl";

/// The outcome of applying a configuration.
#[derive(Debug)]
pub enum Applied {
    /// The new object (as JSON, with its new `metadata.managedFields`).
    Object(Value),
    Conflicts(Vec<Conflict>),
}

/// Applies `config` (already checked to be an object of the right kind) by `manager` to
/// `live` (the stored object as JSON; an empty object when it is being created).
/// `status`: see [`managed_fields::trackable`].
pub fn apply(
    live: &Value,
    config: &Value,
    schema: &'static TypeSchema,
    manager: &Manager<'_>,
    force: bool,
    status: Option<bool>,
    time: Time,
) -> Applied {
    let outcome = apply_once(live, config, schema, manager, force, status, time.clone());
    let Applied::Conflicts(conflicts) = &outcome else {
        return keep_last_applied(outcome, live, config, manager);
    };
    // `kubectl apply --server-side` on an object made by `kubectl apply`: the fields the
    // last client-side configuration set, still at those values, pass to the applier (as
    // Kubernetes' last-applied manager lets them), so switching to server-side apply does not
    // conflict with the client-side applier.
    if manager.name == KUBECTL_APPLY_MANAGER
        && !force
        && conflicts.iter().all(|c| allowed_by_last_applied(live, &c.path, schema, status))
    {
        let forced = apply_once(live, config, schema, manager, true, status, time);
        return keep_last_applied(forced, live, config, manager);
    }
    outcome
}

/// Whether the last client-side applied configuration set `path` to its live value.
fn allowed_by_last_applied(
    live: &Value,
    path: &[String],
    schema: &'static TypeSchema,
    status: Option<bool>,
) -> bool {
    let Some(Value::String(text)) =
        live.get("metadata").and_then(|m| m.get("annotations")).and_then(|a| a.get(LAST_APPLIED))
    else {
        return false;
    };
    let Ok(last) = serde_json::from_str::<Value>(text) else { return false };
    let last = managed_fields::trackable(&last, status);
    fields_of(&last, Some(schema)).contains(path) && value_at(&last, path) == value_at(live, path)
}

/// Server-side apply by kubectl keeps an existing last-applied annotation current, so that
/// going back to client-side apply works (Kubernetes' last-applied updater does the same).
fn keep_last_applied(
    outcome: Applied,
    live: &Value,
    config: &Value,
    manager: &Manager<'_>,
) -> Applied {
    let Applied::Object(mut object) = outcome else { return outcome };
    let had_annotation = live
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(LAST_APPLIED))
        .is_some();
    let config_sets_it = config
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(LAST_APPLIED))
        .is_some();
    if manager.name == KUBECTL_APPLY_MANAGER && had_annotation && !config_sets_it {
        let mut last = config.clone();
        if let Some(Value::Object(annotations)) =
            last.get_mut("metadata").and_then(|m| m.get_mut("annotations"))
        {
            annotations.remove(LAST_APPLIED);
        }
        if let Some(Value::Object(annotations)) =
            object.get_mut("metadata").and_then(|m| m.get_mut("annotations"))
        {
            annotations.insert(LAST_APPLIED.to_owned(), Value::String(last.to_string()));
        }
    }
    Applied::Object(object)
}

fn apply_once(
    live: &Value,
    config: &Value,
    schema: &'static TypeSchema,
    manager: &Manager<'_>,
    force: bool,
    status: Option<bool>,
    time: Time,
) -> Applied {
    let entries: Option<Vec<ManagedFieldsEntry>> = live
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    let mut sets = decode(entries.as_deref());

    let config_fields =
        fields_of(&managed_fields::trackable(&without_nulls(config), status), Some(schema));
    let mut merged = merge_value(live, config, Some(schema));

    // Conflicts: fields of the configuration that others own and whose value would change.
    let mut conflicts = Vec::new();
    let mut conflicting = FieldSet::default();
    for path in config_fields.paths().into_iter().filter(|p| p.leaf) {
        if value_at(live, &path.elements) == value_at(&merged, &path.elements) {
            continue;
        }
        for (entry, set) in &sets {
            if manager.is(entry) || !set.contains(&path.elements) {
                continue;
            }
            conflicting.insert(&path.elements);
            conflicts.push(Conflict {
                manager: entry.manager.clone().unwrap_or_default(),
                api_version: entry.api_version.clone().unwrap_or_default(),
                field: display_path(&path.elements),
                path: path.elements.clone(),
            });
        }
    }
    if !conflicts.is_empty() && !force {
        return Applied::Conflicts(conflicts);
    }
    for (entry, set) in &mut sets {
        if !manager.is(entry) {
            set.subtract(&conflicting);
        }
    }

    // Fields this manager applied before and no longer does: removed when nobody else owns
    // them (or anything under them).
    let previous = sets
        .iter()
        .find(|(entry, _)| manager.is(entry))
        .map(|(_, set)| set.clone())
        .unwrap_or_default();
    let mut dropped = previous;
    dropped.subtract(&config_fields);
    for path in dropped.paths() {
        let owned_elsewhere = sets
            .iter()
            .any(|(entry, set)| !manager.is(entry) && set.owns_at_or_below(&path.elements));
        if !owned_elsewhere {
            remove_at(&mut merged, &path.elements);
        }
    }

    match sets.iter_mut().find(|(entry, _)| manager.is(entry)) {
        // The same configuration again changes nothing, not even the time: a repeated apply
        // is no write at all.
        Some((_, set)) if *set == config_fields && conflicting.is_empty() => {}
        Some((entry, set)) => {
            *set = config_fields;
            entry.time = Some(time);
            entry.api_version = Some(manager.api_version.to_owned());
        }
        None => sets.push((manager.entry(time), config_fields)),
    }
    let managed = encode(sets);
    if let Some(Value::Object(metadata)) = merged.get_mut("metadata") {
        match managed {
            Some(entries) => {
                metadata.insert(
                    "managedFields".to_owned(),
                    serde_json::to_value(entries).unwrap_or(Value::Null),
                );
            }
            None => {
                metadata.remove("managedFields");
            }
        }
    }
    Applied::Object(merged)
}

/// A configuration's `null`s mean "not set": they own nothing and are dropped.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(list) => Value::Array(list.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn merge_value(live: &Value, config: &Value, schema: Option<&'static TypeSchema>) -> Value {
    match (live, config) {
        (Value::Object(live), Value::Object(config)) => {
            let mut merged: Map<String, Value> = live.clone();
            for (key, value) in config {
                if value.is_null() {
                    merged.remove(key);
                    continue;
                }
                let field = schema.and_then(|s| s.field(key));
                let next = match merged.get(key) {
                    Some(existing) => merge_field(existing, value, field),
                    None => merge_field(&Value::Null, value, field),
                };
                merged.insert(key.clone(), next);
            }
            Value::Object(merged)
        }
        (_, config) => without_nulls(config),
    }
}

fn merge_field(live: &Value, config: &Value, field: Option<&'static FieldSchema>) -> Value {
    match (live, config, field.map(|f| f.list_type)) {
        (Value::Array(live), Value::Array(config), Some(ListType::Map(keys))) => {
            let identify = |item: &Value| key_element(item, keys);
            let item_schema = field.and_then(|f| f.schema);
            merge_list(live, config, identify, |live, config| match live {
                Some(live) => merge_value(live, config, item_schema),
                None => merge_value(&Value::Object(Map::new()), config, item_schema),
            })
        }
        (Value::Array(live), Value::Array(config), Some(ListType::Set)) => {
            merge_list(live, config, |item| Some(item.to_string()), |_, config| config.clone())
        }
        (Value::Object(_), Value::Object(_), _) => {
            merge_value(live, config, field.and_then(|f| f.schema))
        }
        (_, Value::Object(_), _) => {
            merge_value(&Value::Object(Map::new()), config, field.and_then(|f| f.schema))
        }
        _ => without_nulls(config),
    }
}

/// Merges two lists of identified elements: the configuration's elements in its order, each
/// merged with the live element of the same identity; live-only elements stay where they
/// were relative to the shared ones. Elements without an identity are kept as they are.
fn merge_list(
    live: &[Value],
    config: &[Value],
    identify: impl Fn(&Value) -> Option<String>,
    merge: impl Fn(Option<&Value>, &Value) -> Value,
) -> Value {
    let live_ids: Vec<Option<String>> = live.iter().map(&identify).collect();
    let config_ids: Vec<Option<String>> = config.iter().map(&identify).collect();
    let in_config: HashSet<&str> = config_ids.iter().flatten().map(String::as_str).collect();
    let in_live: HashSet<&str> = live_ids.iter().flatten().map(String::as_str).collect();
    let live_item =
        |id: &str| live_ids.iter().position(|l| l.as_deref() == Some(id)).map(|index| &live[index]);
    let mut shared =
        config_ids.iter().flatten().filter(|id| in_live.contains(id.as_str())).peekable();
    let mut next_shared = shared.next();
    let mut merged_ids: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(live.len().max(config.len()));
    let (mut l, mut r) = (0, 0);
    while l < live.len() || r < config.len() {
        if l < live.len() && r < config.len() {
            if let (Some(left), Some(right)) = (&live_ids[l], &config_ids[r])
                && left == right
            {
                merged_ids.insert(right);
                out.push(merge(Some(&live[l]), &config[r]));
                l += 1;
                r += 1;
                next_shared = shared.next();
                continue;
            }
            if let Some(left) = &live_ids[l]
                && in_config.contains(left.as_str())
                && next_shared.is_some_and(|next| next != left)
            {
                // A shared element, but not the one whose turn it is.
                l += 1;
                continue;
            }
        }
        if l < live.len() {
            match &live_ids[l] {
                Some(left) if in_config.contains(left.as_str()) => {
                    if merged_ids.contains(left.as_str()) {
                        l += 1;
                        continue;
                    }
                }
                _ => {
                    out.push(live[l].clone());
                    l += 1;
                    continue;
                }
            }
        }
        if r < config.len() {
            match &config_ids[r] {
                Some(right) => {
                    merged_ids.insert(right);
                    out.push(merge(live_item(right), &config[r]));
                    if next_shared.is_some_and(|next| next == right) {
                        next_shared = shared.next();
                    }
                }
                None => out.push(merge(None, &config[r])),
            }
            r += 1;
        } else {
            // Only shared live elements already merged can be left here.
            l += 1;
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    use super::{Applied, apply};
    use crate::api::{
        managed_fields::{Manager, OPERATION_APPLY, OPERATION_UPDATE, record_update, trackable},
        patch_schema::kind_schema,
    };

    fn time() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    fn applier(name: &str) -> Manager<'_> {
        Manager { name, operation: OPERATION_APPLY, api_version: "apps/v1", subresource: None }
    }

    fn config(replicas: Option<i64>, image: &str, labels: Value) -> Value {
        let mut spec = json!({"selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": image}]}}});
        if let Some(replicas) = replicas {
            spec["replicas"] = json!(replicas);
        }
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "labels": labels}, "spec": spec})
    }

    fn applied(outcome: Applied) -> Value {
        match outcome {
            Applied::Object(object) => object,
            Applied::Conflicts(conflicts) => panic!("unexpected conflicts: {conflicts:?}"),
        }
    }

    fn managers(object: &Value) -> Vec<(String, String)> {
        object["metadata"]["managedFields"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        (
                            e["manager"].as_str().unwrap().to_owned(),
                            e["operation"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn applying_creates_owns_and_then_removes_what_the_manager_dropped() {
        let schema = kind_schema("Deployment");
        let a = applier("a");
        let first = config(Some(3), "web:1", json!({"app": "web", "team": "x"}));
        let created = applied(apply(&json!({}), &first, schema, &a, false, Some(false), time()));
        assert_eq!(created["spec"]["replicas"], 3);
        assert_eq!(managers(&created), [("a".to_owned(), "Apply".to_owned())]);
        let fields = &created["metadata"]["managedFields"][0]["fieldsV1"];
        assert_eq!(fields["f:spec"]["f:replicas"], json!({}));
        assert_eq!(fields["f:metadata"]["f:labels"]["f:team"], json!({}));

        // Dropping `replicas` and a label from the configuration removes them.
        let second = config(None, "web:2", json!({"app": "web"}));
        let updated = applied(apply(&created, &second, schema, &a, false, Some(false), time()));
        assert!(updated["spec"].get("replicas").is_none(), "{updated}");
        assert_eq!(updated["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(updated["spec"]["template"]["spec"]["containers"][0]["image"], "web:2");
    }

    #[test]
    fn another_managers_field_is_a_conflict_unless_forced_or_equal() {
        let schema = kind_schema("Deployment");
        let (a, b) = (applier("a"), applier("b"));
        let live = applied(apply(
            &json!({}),
            &config(Some(3), "web:1", json!({"app": "web"})),
            schema,
            &a,
            false,
            Some(false),
            time(),
        ));

        // b sets the same replicas: shared, no conflict.
        let same = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 3}});
        let shared = applied(apply(&live, &same, schema, &b, false, Some(false), time()));
        assert_eq!(
            managers(&shared),
            [("a".to_owned(), "Apply".to_owned()), ("b".to_owned(), "Apply".to_owned())]
        );

        // b changes them: a conflict naming a and the field.
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
        match apply(&shared, &other, schema, &b, false, Some(false), time()) {
            Applied::Conflicts(conflicts) => {
                assert_eq!(conflicts.len(), 1, "{conflicts:?}");
                assert_eq!(
                    (conflicts[0].manager.as_str(), conflicts[0].field.as_str()),
                    ("a", ".spec.replicas")
                );
            }
            Applied::Object(object) => panic!("no conflict: {object}"),
        }
        // Forced, b takes the field from a.
        let forced = applied(apply(&shared, &other, schema, &b, true, Some(false), time()));
        assert_eq!(forced["spec"]["replicas"], 5);
        let a_fields = &forced["metadata"]["managedFields"][0]["fieldsV1"];
        assert!(a_fields["f:spec"].get("f:replicas").is_none(), "{a_fields}");

        // a drops replicas, which b owns now: they stay.
        let without = applied(apply(
            &forced,
            &config(None, "web:1", json!({"app": "web"})),
            schema,
            &a,
            false,
            Some(false),
            time(),
        ));
        assert_eq!(without["spec"]["replicas"], 5);
    }

    #[test]
    fn keyed_lists_merge_and_keep_other_managers_elements() {
        let schema = kind_schema("Deployment");
        let a = applier("a");
        let live = applied(apply(
            &json!({}),
            &config(Some(1), "web:1", json!({"app": "web"})),
            schema,
            &a,
            false,
            Some(false),
            time(),
        ));
        // Someone else adds a sidecar with an update.
        let mut with_sidecar = trackable(&live, Some(false));
        with_sidecar["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "side:1"}));
        let editor = Manager {
            name: "kubectl-edit",
            operation: OPERATION_UPDATE,
            api_version: "apps/v1",
            subresource: None,
        };
        let entries: Vec<_> =
            serde_json::from_value(live["metadata"]["managedFields"].clone()).unwrap();
        let managed = record_update(
            Some(&entries),
            &trackable(&live, Some(false)),
            &with_sidecar,
            Some(schema),
            &editor,
            time(),
        );
        let mut live = live.clone();
        live["spec"] = with_sidecar["spec"].clone();
        live["metadata"]["managedFields"] = serde_json::to_value(managed).unwrap();

        // a applies a new image: both containers stay, the sidecar where it was.
        let updated = applied(apply(
            &live,
            &config(Some(1), "web:2", json!({"app": "web"})),
            schema,
            &a,
            false,
            Some(false),
            time(),
        ));
        let containers = &updated["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            containers,
            &json!([{"name": "web", "image": "web:2"}, {"name": "side", "image": "side:1"}])
        );
        assert_eq!(
            managers(&updated),
            [
                ("a".to_owned(), "Apply".to_owned()),
                ("kubectl-edit".to_owned(), "Update".to_owned())
            ]
        );
    }

    #[test]
    fn kubectl_takes_over_what_its_client_side_apply_set_but_not_more() {
        let schema = kind_schema("Deployment");
        let last = config(Some(2), "web:1", json!({"app": "web"}));
        let mut live = last.clone();
        live["metadata"]["annotations"] = json!({super::LAST_APPLIED: last.to_string()});
        let csa = Manager {
            name: "kubectl-client-side-apply",
            operation: OPERATION_UPDATE,
            api_version: "apps/v1",
            subresource: None,
        };
        let managed = record_update(
            None,
            &json!({}),
            &trackable(&live, Some(false)),
            Some(schema),
            &csa,
            time(),
        );
        live["metadata"]["managedFields"] = serde_json::to_value(managed).unwrap();

        let new = config(Some(2), "web:2", json!({"app": "web"}));
        let upgraded =
            applied(apply(&live, &new, schema, &applier("kubectl"), false, Some(false), time()));
        assert_eq!(upgraded["spec"]["template"]["spec"]["containers"][0]["image"], "web:2");
        let annotation: Value = serde_json::from_str(
            upgraded["metadata"]["annotations"][super::LAST_APPLIED].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(
            annotation["spec"]["template"]["spec"]["containers"][0]["image"], "web:2",
            "kept current"
        );

        // Another manager gets no such pass.
        assert!(matches!(
            apply(&live, &new, schema, &applier("ops"), false, Some(false), time()),
            Applied::Conflicts(_)
        ));
        // Nor does kubectl for a field changed since the last client-side apply.
        let mut drifted = live.clone();
        drifted["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:9");
        assert!(matches!(
            apply(&drifted, &new, schema, &applier("kubectl"), false, Some(false), time()),
            Applied::Conflicts(_)
        ));
    }
}
