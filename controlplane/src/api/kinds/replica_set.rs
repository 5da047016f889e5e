//! ReplicaSets (`apps/v1`): keep `replicas` pods matching `selector` running, made from
//! `template`. The replica set controller does the keeping; this is the API side: defaults,
//! validation as Kubernetes has it (a selector that selects the template, an immutable
//! selector), the generation that counts spec changes, and `kubectl get` columns.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::{
    api::apps::v1::{ReplicaSet, ReplicaSetSpec, ReplicaSetStatus},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, Strategy},
    kinds::pod,
    table::{self, Column},
    validation::NameRule,
};

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    ..KindInfo::of::<ReplicaSet>("replicaset", true, &["rs"], NameRule::Subdomain)
};

/// Where replica sets live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// Whether `selector` selects an object with `labels` (matchLabels and matchExpressions). An
/// empty selector selects nothing here: a replica set must say what it owns.
pub fn selects(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let match_labels = selector.match_labels.as_ref();
    let expressions = selector.match_expressions.as_deref().unwrap_or_default();
    if match_labels.is_none_or(BTreeMap::is_empty) && expressions.is_empty() {
        return false;
    }
    let value = |key: &str| labels.and_then(|l| l.get(key));
    match_labels.into_iter().flatten().all(|(key, wanted)| value(key) == Some(wanted))
        && expressions.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => value(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => value(&e.key).is_some(),
                "DoesNotExist" => value(&e.key).is_none(),
                _ => false,
            }
        })
}

#[derive(Debug, Default)]
pub struct ReplicaSetStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Desired", "Number of desired pods"),
    Column::new("Current", "Number of created pods"),
    Column::new("Ready", "Number of ready pods"),
    Column::new("Age", "Time since the replica set was created"),
];

fn validate_spec(spec: &ReplicaSetSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if spec.replicas.is_some_and(|r| r < 0) {
        errors.push(FieldError::invalid(
            "spec.replicas",
            spec.replicas.unwrap_or_default(),
            "must be greater than or equal to 0",
        ));
    }
    let template_labels = spec.template.as_ref().and_then(|t| t.metadata.as_ref()?.labels.as_ref());
    let selector = &spec.selector;
    if selector.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && selector.match_expressions.as_ref().is_none_or(Vec::is_empty)
    {
        errors.push(FieldError::required(
            "spec.selector",
            "empty selector is invalid for replicaset",
        ));
    } else if !selects(selector, template_labels) {
        errors.push(FieldError::invalid(
            "spec.template.metadata.labels",
            serde_json::to_string(&template_labels).unwrap_or_default(),
            "`selector` does not match template `labels`",
        ));
    }
    match spec.template.as_ref().and_then(|t| t.spec.as_ref()) {
        Some(pod_spec) => {
            for mut error in pod::validate_spec(pod_spec) {
                error.field = format!("spec.template.{}", error.field);
                errors.push(error);
            }
            if let Some(policy) = pod_spec.restart_policy.as_deref()
                && policy != "Always"
            {
                errors.push(FieldError::not_supported(
                    "spec.template.spec.restartPolicy",
                    policy,
                    &["Always"],
                ));
            }
        }
        None => errors.push(FieldError::required("spec.template.spec", "")),
    }
    errors
}

#[async_trait]
impl Strategy for ReplicaSetStrategy {
    type Object = ReplicaSet;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, set: &mut ReplicaSet) {
        let spec = set.spec.get_or_insert_with(ReplicaSetSpec::default);
        spec.replicas.get_or_insert(1);
        spec.min_ready_seconds.get_or_insert(0);
    }

    fn prepare_for_create(&self, set: &mut ReplicaSet) {
        set.status = Some(ReplicaSetStatus::default());
    }

    fn prepare_for_update(&self, new: &mut ReplicaSet, old: &ReplicaSet) {
        new.status = old.status.clone();
    }

    fn prepare_for_status_update(&self, new: &mut ReplicaSet, old: &ReplicaSet) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, set: &ReplicaSet) -> Vec<FieldError> {
        match &set.spec {
            Some(spec) => validate_spec(spec),
            None => vec![FieldError::required("spec", "")],
        }
    }

    fn validate_update(&self, new: &ReplicaSet, old: &ReplicaSet) -> Vec<FieldError> {
        let selector = |s: &ReplicaSet| s.spec.as_ref().map(|spec| spec.selector.clone());
        if selector(new) != selector(old) {
            return vec![FieldError::invalid(
                "spec.selector",
                serde_json::to_string(&selector(new)).unwrap_or_default(),
                "field is immutable",
            )];
        }
        Vec::new()
    }

    fn spec_changed(&self, new: &ReplicaSet, old: &ReplicaSet) -> Option<bool> {
        Some(new.spec != old.spec)
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, set: &ReplicaSet) -> Vec<Value> {
        let status = set.status.clone().unwrap_or_default();
        vec![
            set.metadata.name.clone().unwrap_or_default().into(),
            set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).into(),
            status.replicas.into(),
            status.ready_replicas.unwrap_or(0).into(),
            table::age(set.metadata.creation_timestamp.as_ref()).into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::ReplicaSet, apimachinery::pkg::apis::meta::v1::LabelSelector,
    };
    use serde_json::json;

    use super::{ReplicaSetStrategy, selects};
    use crate::api::kind::Strategy;

    fn replica_set(value: serde_json::Value) -> ReplicaSet {
        serde_json::from_value(value).expect("a replica set")
    }

    #[test]
    fn selectors_match_labels_and_expressions_and_an_empty_one_selects_nothing() {
        let labels = [("app".to_owned(), "web".to_owned()), ("tier".to_owned(), "fe".to_owned())]
            .into_iter()
            .collect();
        let selector =
            |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        assert!(selects(&selector(json!({"matchLabels": {"app": "web"}})), Some(&labels)));
        assert!(!selects(&selector(json!({"matchLabels": {"app": "db"}})), Some(&labels)));
        assert!(selects(
            &selector(
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe", "be"]}]})
            ),
            Some(&labels)
        ));
        assert!(!selects(
            &selector(json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})),
            Some(&labels)
        ));
        assert!(!selects(&LabelSelector::default(), Some(&labels)));
    }

    #[test]
    fn the_selector_must_select_the_template_and_the_template_must_be_a_valid_pod() {
        let fields = |v| -> Vec<String> {
            ReplicaSetStrategy.validate(&replica_set(v)).into_iter().map(|e| e.field).collect()
        };
        assert!(
            fields(json!({"spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]}}}}))
            .is_empty()
        );
        assert_eq!(
            fields(json!({"spec": {
                "replicas": -1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}}}})),
            ["spec.replicas", "spec.template.metadata.labels", "spec.template.spec.containers"]
        );
    }
}
