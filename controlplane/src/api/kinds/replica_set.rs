//! ReplicaSets (`apps/v1`): keep `replicas` pods matching `selector` running, made from
//! `template`. The replica set controller does the keeping; this is the API side: defaults,
//! validation as Kubernetes has it (a selector that selects the template, an immutable
//! selector), the generation that counts spec changes, and `kubectl get` columns.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        apps::v1::{ReplicaSet, ReplicaSetSpec, ReplicaSetStatus},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, ScaleState, Strategy},
    kinds::pod,
    table::{self, Column},
    validation::NameRule,
};

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    has_scale: true,
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
    Column::new("Containers", "Names of each container in the template").wide(),
    Column::new("Images", "Images referenced by each container in the template").wide(),
    Column::new("Selector", "Label selector of the pods the replica set controls").wide(),
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
    errors.extend(validate_selector_and_template(
        &spec.selector,
        spec.template.as_ref(),
        "replicaset",
    ));
    errors
}

/// The checks a workload's selector and pod template share (ReplicaSet, Deployment): a
/// non-empty selector that selects the template's labels, and a template that is a valid pod
/// which restarts always. `kind` names the workload in the message, as Kubernetes words it.
pub fn validate_selector_and_template(
    selector: &LabelSelector,
    template: Option<&PodTemplateSpec>,
    kind: &str,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let template_labels = template.and_then(|t| t.metadata.as_ref()?.labels.as_ref());
    if selector.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && selector.match_expressions.as_ref().is_none_or(Vec::is_empty)
    {
        errors.push(FieldError::required(
            "spec.selector",
            format!("empty selector is invalid for {kind}"),
        ));
    } else if !selects(selector, template_labels) {
        errors.push(FieldError::invalid(
            "spec.template.metadata.labels",
            serde_json::to_string(&template_labels).unwrap_or_default(),
            "`selector` does not match template `labels`",
        ));
    }
    match template.and_then(|t| t.spec.as_ref()) {
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

/// A label selector in the text form of `labelSelector=` and `kubectl get -o wide`
/// (`app=web,tier in (be,fe)`), requirements sorted by key; empty when it selects everything.
pub fn selector_text(selector: &LabelSelector) -> String {
    let mut requirements: Vec<(String, String)> = Vec::new();
    for (key, value) in selector.match_labels.iter().flatten() {
        requirements.push((key.clone(), format!("{key}={value}")));
    }
    for expression in selector.match_expressions.iter().flatten() {
        let key = &expression.key;
        let mut values = expression.values.clone().unwrap_or_default();
        values.sort();
        let text = match expression.operator.as_str() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({})", values.join(",")),
        };
        requirements.push((key.clone(), text));
    }
    requirements.sort();
    requirements.into_iter().map(|(_, text)| text).collect::<Vec<_>>().join(",")
}

/// The `-o wide` cells a workload shares: its containers' names and images, and its selector.
pub fn wide_cells(template: Option<&PodTemplateSpec>, selector: &LabelSelector) -> [Value; 3] {
    let containers = template.and_then(|t| t.spec.as_ref()).map(|s| s.containers.as_slice());
    let join = |part: fn(&k8s_openapi::api::core::v1::Container) -> String| {
        containers.unwrap_or_default().iter().map(part).collect::<Vec<_>>().join(",")
    };
    let selector = selector_text(selector);
    [
        join(|c| c.name.clone()).into(),
        join(|c| c.image.clone().unwrap_or_default()).into(),
        if selector.is_empty() { "<none>".to_owned() } else { selector }.into(),
    ]
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
        let mut cells = vec![
            set.metadata.name.clone().unwrap_or_default().into(),
            set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).into(),
            status.replicas.into(),
            status.ready_replicas.unwrap_or(0).into(),
            table::age(set.metadata.creation_timestamp.as_ref()).into(),
        ];
        let spec = set.spec.as_ref();
        let selector = spec.map(|s| s.selector.clone()).unwrap_or_default();
        cells.extend(wide_cells(spec.and_then(|s| s.template.as_ref()), &selector));
        cells
    }

    fn scale(&self, set: &ReplicaSet) -> Option<ScaleState> {
        let spec = set.spec.as_ref();
        Some(ScaleState {
            spec_replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            status_replicas: set.status.as_ref().map_or(0, |s| s.replicas),
            selector: spec.map(|s| selector_text(&s.selector)).unwrap_or_default(),
        })
    }

    fn set_replicas(&self, set: &mut ReplicaSet, replicas: i32) {
        set.spec.get_or_insert_with(ReplicaSetSpec::default).replicas = Some(replicas);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::ReplicaSet, apimachinery::pkg::apis::meta::v1::LabelSelector,
    };
    use serde_json::json;

    use super::{ReplicaSetStrategy, selector_text, selects};
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
    fn selectors_print_as_label_selector_text_sorted_by_key() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"tier": "fe", "app": "web"},
            "matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["b", "a"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "owner", "operator": "Exists"},
            ],
        }))
        .unwrap();
        assert_eq!(
            selector_text(&selector),
            "app=web,!canary,env notin (dev),owner,tier=fe,zone in (a,b)"
        );
        assert_eq!(selector_text(&LabelSelector::default()), "");
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
