//! Deployments (`apps/v1`): a pod template rolled out through ReplicaSets, one per template
//! version. The deployment controller does the rolling; this is the API side: Kubernetes'
//! defaults (RollingUpdate 25 %/25 %, 10 revisions of history, a 600 s progress deadline) and
//! validation (a selector that selects the template and never changes, a strategy whose surge
//! and unavailability are not both zero), the generation that counts spec changes, the
//! `/scale` subresource and the `kubectl get` columns.

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        apps::v1::{
            Deployment, DeploymentSpec, DeploymentStatus, DeploymentStrategy as UpdateStrategy,
            RollingUpdateDeployment,
        },
        core::v1::Pod,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, ScaleState, Strategy},
    kinds::{
        pod,
        replica_set::{selector_text, validate_selector_and_template, wide_cells},
    },
    table::{self, Column},
    validation::NameRule,
};

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    has_scale: true,
    ..KindInfo::of::<Deployment>("deployment", true, &["deploy"], NameRule::Subdomain)
};

pub const STRATEGY_ROLLING_UPDATE: &str = "RollingUpdate";
pub const STRATEGY_RECREATE: &str = "Recreate";

/// Where deployments live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

#[derive(Debug, Default)]
pub struct DeploymentStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Ready", "Number of the pod with ready state"),
    Column::new("Up-to-date", "Total number of non-terminated pods targeted by this deployment that have the desired template spec").integer(),
    Column::new("Available", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment").integer(),
    Column::new("Age", "Time since the deployment was created"),
    Column::new("Containers", "Names of each container in the template").wide(),
    Column::new("Images", "Images referenced by each container in the template").wide(),
    Column::new("Selector", "Label selector of the pods the deployment manages").wide(),
];

/// `25%`, Kubernetes' default for both `maxSurge` and `maxUnavailable`.
fn quarter() -> IntOrString {
    IntOrString::String("25%".to_owned())
}

/// An int-or-percent field as a number of pods out of `total`: a percentage is rounded up
/// (`maxSurge`) or down (`maxUnavailable`). `None` for a string that is not a percentage
/// (validation refuses those).
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> Option<i32> {
    match value {
        IntOrString::Int(value) => Some(*value),
        IntOrString::String(text) => {
            let percent: i64 = text.strip_suffix('%')?.parse().ok()?;
            let scaled = i64::from(total) * percent;
            let value =
                if round_up { (scaled + 99).div_euclid(100) } else { scaled.div_euclid(100) };
            i32::try_from(value).ok()
        }
    }
}

/// The surge and unavailability a rolling update of `deployment` allows, in pods (Kubernetes'
/// `ResolveFenceposts`): when both round to zero, one pod may be unavailable so that the
/// rollout can progress at all.
pub fn rolling_bounds(deployment: &Deployment) -> (i32, i32) {
    let spec = deployment.spec.as_ref();
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
    let rolling = spec
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.clone())
        .unwrap_or_default();
    let surge = scaled_value(&rolling.max_surge.unwrap_or_else(quarter), replicas, true);
    let unavailable =
        scaled_value(&rolling.max_unavailable.unwrap_or_else(quarter), replicas, false);
    let surge = surge.unwrap_or(0).max(0);
    let unavailable = unavailable.unwrap_or(0).clamp(0, replicas.max(0));
    if surge == 0 && unavailable == 0 { (0, 1) } else { (surge, unavailable) }
}

/// Whether the deployment replaces its pods all at once rather than rolling.
pub fn is_recreate(deployment: &Deployment) -> bool {
    deployment.spec.as_ref().and_then(|s| s.strategy.as_ref()).and_then(|s| s.type_.as_deref())
        == Some(STRATEGY_RECREATE)
}

const PERCENT_FORMAT: &str = "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')";

/// Checks one int-or-percent field; returns its value as written (0 for an invalid one).
fn check_int_or_percent(
    value: &IntOrString,
    field: &str,
    at_most_all: bool,
    errors: &mut Vec<FieldError>,
) -> i64 {
    match value {
        IntOrString::Int(number) => {
            if *number < 0 {
                errors.push(FieldError::invalid(
                    field,
                    *number,
                    "must be greater than or equal to 0",
                ));
            }
            i64::from(*number)
        }
        IntOrString::String(text) => {
            let digits = text
                .strip_suffix('%')
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
            let Some(percent) = digits.and_then(|d| d.parse::<i64>().ok()) else {
                errors.push(FieldError::invalid(field, text.as_str(), PERCENT_FORMAT));
                return 0;
            };
            if at_most_all && percent > 100 {
                errors.push(FieldError::invalid(
                    field,
                    text.as_str(),
                    "must not be greater than 100%",
                ));
            }
            percent
        }
    }
}

fn validate_strategy(strategy: Option<&UpdateStrategy>, errors: &mut Vec<FieldError>) {
    let strategy = strategy.cloned().unwrap_or_default();
    match strategy.type_.as_deref() {
        Some(STRATEGY_RECREATE) => {
            if strategy.rolling_update.is_some() {
                errors.push(FieldError::forbidden(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy `type` is 'Recreate'",
                ));
            }
        }
        Some(STRATEGY_ROLLING_UPDATE) => {
            let Some(rolling) = strategy.rolling_update else {
                errors.push(FieldError::required(
                    "spec.strategy.rollingUpdate",
                    "this should be defaulted and never be nil",
                ));
                return;
            };
            let surge = rolling.max_surge.unwrap_or_else(quarter);
            let unavailable = rolling.max_unavailable.unwrap_or_else(quarter);
            let surge_value =
                check_int_or_percent(&surge, "spec.strategy.rollingUpdate.maxSurge", false, errors);
            let unavailable_value = check_int_or_percent(
                &unavailable,
                "spec.strategy.rollingUpdate.maxUnavailable",
                true,
                errors,
            );
            if surge_value == 0 && unavailable_value == 0 {
                errors.push(FieldError::invalid(
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    serde_json::to_value(&unavailable).unwrap_or_default(),
                    "may not be 0 when `maxSurge` is 0",
                ));
            }
        }
        other => errors.push(FieldError::not_supported(
            "spec.strategy.type",
            other.unwrap_or_default(),
            &[STRATEGY_RECREATE, STRATEGY_ROLLING_UPDATE],
        )),
    }
}

fn non_negative(field: &str, value: Option<i32>, errors: &mut Vec<FieldError>) {
    if let Some(value) = value.filter(|v| *v < 0) {
        errors.push(FieldError::invalid(field, value, "must be greater than or equal to 0"));
    }
}

fn validate_spec(spec: &DeploymentSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    non_negative("spec.replicas", spec.replicas, &mut errors);
    errors.extend(validate_selector_and_template(
        &spec.selector,
        Some(&spec.template),
        "deployment",
    ));
    validate_strategy(spec.strategy.as_ref(), &mut errors);
    non_negative("spec.minReadySeconds", spec.min_ready_seconds, &mut errors);
    non_negative("spec.revisionHistoryLimit", spec.revision_history_limit, &mut errors);
    non_negative("spec.progressDeadlineSeconds", spec.progress_deadline_seconds, &mut errors);
    if let Some(deadline) = spec.progress_deadline_seconds
        && deadline <= spec.min_ready_seconds.unwrap_or(0)
    {
        errors.push(FieldError::invalid(
            "spec.progressDeadlineSeconds",
            deadline,
            "must be greater than minReadySeconds",
        ));
    }
    errors
}

/// Fills the pod template's defaults as a pod's, so that the template a ReplicaSet copies
/// is the one its pods get (and a template change is a change of what runs). Priority is
/// left to pod admission, as in Kubernetes.
fn default_template(spec: &mut DeploymentSpec) {
    let Some(pod_spec) = spec.template.spec.take() else { return };
    let (priority, preemption) = (pod_spec.priority, pod_spec.preemption_policy.clone());
    let mut pod = Pod { spec: Some(pod_spec), ..Pod::default() };
    pod::default_spec(pod.spec.get_or_insert_with(Default::default));
    let mut pod_spec = pod.spec.unwrap_or_default();
    pod_spec.priority = priority;
    pod_spec.preemption_policy = preemption;
    spec.template.spec = Some(pod_spec);
}

#[async_trait]
impl Strategy for DeploymentStrategy {
    type Object = Deployment;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, deployment: &mut Deployment) {
        let spec = deployment.spec.get_or_insert_with(DeploymentSpec::default);
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.progress_deadline_seconds.get_or_insert(600);
        let strategy = spec.strategy.get_or_insert_with(UpdateStrategy::default);
        let kind = strategy.type_.get_or_insert_with(|| STRATEGY_ROLLING_UPDATE.to_owned());
        if kind == STRATEGY_ROLLING_UPDATE {
            let rolling =
                strategy.rolling_update.get_or_insert_with(RollingUpdateDeployment::default);
            rolling.max_surge.get_or_insert_with(quarter);
            rolling.max_unavailable.get_or_insert_with(quarter);
        }
        default_template(spec);
    }

    fn prepare_for_create(&self, deployment: &mut Deployment) {
        deployment.status = Some(DeploymentStatus::default());
    }

    fn prepare_for_update(&self, new: &mut Deployment, old: &Deployment) {
        new.status = old.status.clone();
    }

    fn prepare_for_status_update(&self, new: &mut Deployment, old: &Deployment) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, deployment: &Deployment) -> Vec<FieldError> {
        match &deployment.spec {
            Some(spec) => validate_spec(spec),
            None => vec![FieldError::required("spec", "")],
        }
    }

    fn validate_update(&self, new: &Deployment, old: &Deployment) -> Vec<FieldError> {
        let selector = |d: &Deployment| d.spec.as_ref().map(|spec| spec.selector.clone());
        if selector(new) != selector(old) {
            return vec![FieldError::invalid(
                "spec.selector",
                serde_json::to_value(selector(new)).unwrap_or_default(),
                "field is immutable",
            )];
        }
        Vec::new()
    }

    fn spec_changed(&self, new: &Deployment, old: &Deployment) -> Option<bool> {
        Some(new.spec != old.spec)
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, deployment: &Deployment) -> Vec<Value> {
        let status = deployment.status.clone().unwrap_or_default();
        let spec = deployment.spec.as_ref();
        let desired = spec.and_then(|s| s.replicas).unwrap_or(1);
        let mut cells = vec![
            deployment.metadata.name.clone().unwrap_or_default().into(),
            format!("{}/{desired}", status.ready_replicas.unwrap_or(0)).into(),
            status.updated_replicas.unwrap_or(0).into(),
            status.available_replicas.unwrap_or(0).into(),
            table::age(deployment.metadata.creation_timestamp.as_ref()).into(),
        ];
        let selector = spec.map(|s| s.selector.clone()).unwrap_or_default();
        cells.extend(wide_cells(spec.map(|s| &s.template), &selector));
        cells
    }

    fn scale(&self, deployment: &Deployment) -> Option<ScaleState> {
        let spec = deployment.spec.as_ref();
        Some(ScaleState {
            spec_replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            status_replicas: deployment.status.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            selector: spec.map(|s| selector_text(&s.selector)).unwrap_or_default(),
        })
    }

    fn set_replicas(&self, deployment: &mut Deployment, replicas: i32) {
        deployment.spec.get_or_insert_with(DeploymentSpec::default).replicas = Some(replicas);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::util::intstr::IntOrString};
    use serde_json::json;

    use super::{DeploymentStrategy, rolling_bounds, scaled_value};
    use crate::api::kind::Strategy;

    fn deployment(spec: serde_json::Value) -> Deployment {
        let mut deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": spec,
        }))
        .expect("a deployment");
        DeploymentStrategy.default(&mut deployment);
        deployment
    }

    fn valid_spec() -> serde_json::Value {
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]}},
        })
    }

    fn with(
        mut spec: serde_json::Value,
        path: &[&str],
        value: serde_json::Value,
    ) -> serde_json::Value {
        let mut at = &mut spec;
        for key in &path[..path.len() - 1] {
            at = at.as_object_mut().unwrap().entry(*key).or_insert_with(|| json!({}));
        }
        at[path[path.len() - 1]] = value;
        spec
    }

    fn fields(spec: serde_json::Value) -> Vec<String> {
        DeploymentStrategy.validate(&deployment(spec)).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn defaults_are_kubernetes_own() {
        let d = deployment(valid_spec());
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.revision_history_limit, Some(10));
        assert_eq!(spec.progress_deadline_seconds, Some(600));
        let strategy = spec.strategy.unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let rolling = strategy.rolling_update.unwrap();
        assert_eq!(rolling.max_surge, Some(IntOrString::String("25%".into())));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::String("25%".into())));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        assert_eq!(pod.priority, None, "priority is pod admission's, not a template default");
        // A Recreate deployment gets no rolling parameters.
        let recreate = deployment(with(valid_spec(), &["strategy", "type"], json!("Recreate")));
        assert_eq!(recreate.spec.unwrap().strategy.unwrap().rolling_update, None);
    }

    #[test]
    fn a_valid_deployment_passes_and_each_broken_field_is_named() {
        assert!(fields(valid_spec()).is_empty());
        assert_eq!(fields(with(valid_spec(), &["replicas"], json!(-1))), ["spec.replicas"]);
        assert_eq!(
            fields(with(valid_spec(), &["selector"], json!({}))),
            ["spec.selector"],
            "an empty selector"
        );
        assert_eq!(
            fields(with(valid_spec(), &["selector", "matchLabels", "app"], json!("db"))),
            ["spec.template.metadata.labels"]
        );
        assert_eq!(
            fields(with(valid_spec(), &["template", "spec", "restartPolicy"], json!("Never"))),
            ["spec.template.spec.restartPolicy"]
        );
        assert_eq!(
            fields(with(valid_spec(), &["strategy", "type"], json!("BlueGreen"))),
            ["spec.strategy.type"]
        );
        assert_eq!(
            fields(with(
                valid_spec(),
                &["strategy"],
                json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}})
            )),
            ["spec.strategy.rollingUpdate"]
        );
        let rolling = |surge: serde_json::Value, unavailable: serde_json::Value| {
            fields(with(
                valid_spec(),
                &["strategy", "rollingUpdate"],
                json!({"maxSurge": surge, "maxUnavailable": unavailable}),
            ))
        };
        assert_eq!(rolling(json!(0), json!(0)), ["spec.strategy.rollingUpdate.maxUnavailable"]);
        assert_eq!(rolling(json!("0%"), json!(0)), ["spec.strategy.rollingUpdate.maxUnavailable"]);
        assert!(rolling(json!(0), json!(1)).is_empty());
        assert!(rolling(json!("50%"), json!(0)).is_empty());
        assert_eq!(rolling(json!("half"), json!(1)), ["spec.strategy.rollingUpdate.maxSurge"]);
        assert_eq!(rolling(json!(-1), json!(1)), ["spec.strategy.rollingUpdate.maxSurge"]);
        assert_eq!(
            rolling(json!(1), json!("101%")),
            ["spec.strategy.rollingUpdate.maxUnavailable"]
        );
        assert!(rolling(json!("200%"), json!("100%")).is_empty(), "surge may exceed 100%");
        assert_eq!(
            fields(with(valid_spec(), &["revisionHistoryLimit"], json!(-2))),
            ["spec.revisionHistoryLimit"]
        );
        let slow = with(valid_spec(), &["minReadySeconds"], json!(30));
        assert_eq!(
            fields(with(slow, &["progressDeadlineSeconds"], json!(30))),
            ["spec.progressDeadlineSeconds"]
        );
    }

    #[test]
    fn the_selector_cannot_change() {
        let old = deployment(valid_spec());
        let mut new = old.clone();
        new.spec.as_mut().unwrap().selector.match_labels =
            Some([("app".to_owned(), "other".to_owned())].into());
        let errors = DeploymentStrategy.validate_update(&new, &old);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.selector");
        assert!(errors[0].to_string().contains("field is immutable"), "{}", errors[0]);
        assert!(DeploymentStrategy.validate_update(&old, &old).is_empty());
    }

    #[test]
    fn percentages_round_up_for_surge_and_down_for_unavailability() {
        let percent = |p: &str| IntOrString::String(p.to_owned());
        assert_eq!(scaled_value(&percent("25%"), 10, true), Some(3));
        assert_eq!(scaled_value(&percent("25%"), 10, false), Some(2));
        assert_eq!(scaled_value(&IntOrString::Int(4), 10, true), Some(4));
        assert_eq!(scaled_value(&percent("x"), 10, true), None);
        // One replica at the defaults: surge 1, unavailable 0.
        assert_eq!(rolling_bounds(&deployment(valid_spec())), (1, 0));
        let four = deployment(with(valid_spec(), &["replicas"], json!(4)));
        assert_eq!(rolling_bounds(&four), (1, 1));
        // Both rounding to zero: one may be unavailable, or nothing could ever move.
        let tiny = with(
            valid_spec(),
            &["strategy", "rollingUpdate"],
            json!({"maxSurge": "10%", "maxUnavailable": "10%"}),
        );
        let tiny = deployment(with(tiny, &["replicas"], json!(3)));
        assert_eq!(rolling_bounds(&tiny), (1, 0));
        let none = with(
            valid_spec(),
            &["strategy", "rollingUpdate"],
            json!({"maxSurge": 0, "maxUnavailable": "10%"}),
        );
        assert_eq!(rolling_bounds(&deployment(with(none, &["replicas"], json!(3)))), (0, 1));
    }
}
