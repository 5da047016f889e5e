//! HorizontalPodAutoscalers (`autoscaling/v2`): keep a scalable object's replica count between
//! `minReplicas` and `maxReplicas` from its pods' resource usage. The autoscaler controller
//! does the scaling; this is the API side: Kubernetes' defaults (one replica at least, CPU at
//! 80 % when no metric is named) and validation, the generation that counts spec changes, and
//! the columns of `kubectl get hpa`.

use async_trait::async_trait;
use k8s_openapi::api::autoscaling::v2::{
    HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, HorizontalPodAutoscalerStatus,
    MetricSpec, MetricStatus, MetricTarget, ResourceMetricSource,
};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, Strategy},
    table::{self, Column},
    validation::{self, NameRule},
};

/// The CPU utilization an autoscaler without metrics aims at (Kubernetes' default).
pub const DEFAULT_CPU_UTILIZATION: i32 = 80;

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    ..KindInfo::of::<HorizontalPodAutoscaler>(
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        NameRule::Subdomain,
    )
};

/// Where autoscalers live in the store (every served version shares it).
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

const METRIC_TYPES: [&str; 5] = ["ContainerResource", "External", "Object", "Pods", "Resource"];
const TARGET_TYPES: [&str; 3] = ["AverageValue", "Utilization", "Value"];

#[derive(Debug, Default)]
pub struct HorizontalPodAutoscalerStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Reference", "The object whose replicas are scaled"),
    Column::new("Targets", "The current and target value of each metric"),
    Column::new("MinPods", "The lower limit of replicas").integer(),
    Column::new("MaxPods", "The upper limit of replicas").integer(),
    Column::new("Replicas", "The current number of replicas").integer(),
    Column::new("Age", "Time since the autoscaler was created"),
];

/// The CPU utilization metric an autoscaler aims at, when it has one.
pub fn cpu_utilization_target(spec: &HorizontalPodAutoscalerSpec) -> Option<i32> {
    spec.metrics.iter().flatten().find_map(|metric| {
        let resource = metric.resource.as_ref().filter(|_| metric.type_ == "Resource")?;
        (resource.name == "cpu" && resource.target.type_ == "Utilization")
            .then_some(resource.target.average_utilization)
            .flatten()
    })
}

/// The TARGETS column: `cpu: 42%/50%` per metric (`<unknown>` before a measurement), as
/// Kubernetes prints it, the first two then `+ N more...`.
fn targets(spec: &HorizontalPodAutoscalerSpec, current: &[MetricStatus]) -> String {
    let metrics = spec.metrics.as_deref().unwrap_or_default();
    if metrics.is_empty() {
        return "<none>".to_owned();
    }
    let mut shown = Vec::new();
    for (index, metric) in metrics.iter().enumerate() {
        let status = current.get(index).and_then(|s| s.resource.as_ref());
        let text = match (metric.type_.as_str(), &metric.resource) {
            ("Resource", Some(resource)) => match &resource.target.average_value {
                Some(value) => {
                    let now = status
                        .and_then(|s| s.current.average_value.as_ref())
                        .map_or_else(|| "<unknown>".to_owned(), |q| q.0.clone());
                    format!("{}: {now}/{}", resource.name, value.0)
                }
                None => {
                    let now = status
                        .and_then(|s| s.current.average_utilization)
                        .map_or_else(|| "<unknown>".to_owned(), |u| format!("{u}%"));
                    let target = resource
                        .target
                        .average_utilization
                        .map_or_else(|| "<auto>".to_owned(), |u| format!("{u}%"));
                    format!("{}: {now}/{target}", resource.name)
                }
            },
            (other, _) => format!("<{}>", other.to_lowercase()),
        };
        shown.push(text);
    }
    if shown.len() > 2 {
        let more = shown.len() - 2;
        shown.truncate(2);
        return format!("{} + {more} more...", shown.join(", "));
    }
    shown.join(", ")
}

fn validate_target(path: &str, target: &MetricTarget, errors: &mut Vec<FieldError>) {
    if target.type_.is_empty() {
        errors.push(FieldError::required(
            format!("{path}.type"),
            "must specify a metric target type",
        ));
        return;
    }
    if !TARGET_TYPES.contains(&target.type_.as_str()) {
        errors.push(FieldError::not_supported(
            format!("{path}.type"),
            target.type_.as_str(),
            &TARGET_TYPES,
        ));
        return;
    }
    match target.type_.as_str() {
        "Utilization" => match target.average_utilization {
            None => errors.push(FieldError::required(
                format!("{path}.averageUtilization"),
                "must set averageUtilization when the target type is Utilization",
            )),
            Some(u) if u <= 0 => errors.push(FieldError::invalid(
                format!("{path}.averageUtilization"),
                u,
                "must be greater than 0",
            )),
            Some(_) => {}
        },
        "AverageValue" if target.average_value.is_none() => errors.push(FieldError::required(
            format!("{path}.averageValue"),
            "must set averageValue when the target type is AverageValue",
        )),
        "Value" if target.value.is_none() => errors.push(FieldError::required(
            format!("{path}.value"),
            "must set value when the target type is Value",
        )),
        _ => {}
    }
}

fn validate_metric(path: &str, metric: &MetricSpec, errors: &mut Vec<FieldError>) {
    if metric.type_.is_empty() {
        errors.push(FieldError::required(
            format!("{path}.type"),
            "must specify a metric source type",
        ));
        return;
    }
    if !METRIC_TYPES.contains(&metric.type_.as_str()) {
        errors.push(FieldError::not_supported(
            format!("{path}.type"),
            metric.type_.as_str(),
            &METRIC_TYPES,
        ));
        return;
    }
    if metric.type_ == "Resource" {
        match &metric.resource {
            None => errors.push(FieldError::required(
                format!("{path}.resource"),
                "must populate information for the given metric source",
            )),
            Some(resource) => {
                if resource.name.is_empty() {
                    errors.push(FieldError::required(format!("{path}.resource.name"), ""));
                }
                validate_target(&format!("{path}.resource.target"), &resource.target, errors);
            }
        }
    }
}

fn validate_spec(spec: &HorizontalPodAutoscalerSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let reference = &spec.scale_target_ref;
    if reference.kind.is_empty() {
        errors.push(FieldError::required("spec.scaleTargetRef.kind", ""));
    }
    if reference.name.is_empty() {
        errors.push(FieldError::required("spec.scaleTargetRef.name", ""));
    } else if let Some(why) = validation::dns1123_subdomain(&reference.name) {
        errors.push(FieldError::invalid("spec.scaleTargetRef.name", reference.name.as_str(), why));
    }
    if let Some(min) = spec.min_replicas.filter(|m| *m < 1) {
        errors.push(FieldError::invalid(
            "spec.minReplicas",
            min,
            "must be greater than or equal to 1",
        ));
    }
    if spec.max_replicas < 1 {
        errors.push(FieldError::invalid(
            "spec.maxReplicas",
            spec.max_replicas,
            "must be greater than 0",
        ));
    } else if spec.min_replicas.is_some_and(|min| spec.max_replicas < min) {
        errors.push(FieldError::invalid(
            "spec.maxReplicas",
            spec.max_replicas,
            "must be greater than or equal to `minReplicas`",
        ));
    }
    for (index, metric) in spec.metrics.iter().flatten().enumerate() {
        validate_metric(&format!("spec.metrics[{index}]"), metric, &mut errors);
    }
    errors
}

#[async_trait]
impl Strategy for HorizontalPodAutoscalerStrategy {
    type Object = HorizontalPodAutoscaler;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, autoscaler: &mut HorizontalPodAutoscaler) {
        let spec = autoscaler.spec.get_or_insert_with(HorizontalPodAutoscalerSpec::default);
        spec.min_replicas.get_or_insert(1);
        if spec.metrics.as_ref().is_none_or(Vec::is_empty) {
            spec.metrics = Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(DEFAULT_CPU_UTILIZATION),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]);
        }
    }

    fn prepare_for_create(&self, autoscaler: &mut HorizontalPodAutoscaler) {
        autoscaler.status = Some(HorizontalPodAutoscalerStatus::default());
    }

    fn prepare_for_update(&self, new: &mut HorizontalPodAutoscaler, old: &HorizontalPodAutoscaler) {
        new.status = old.status.clone();
    }

    fn prepare_for_status_update(
        &self,
        new: &mut HorizontalPodAutoscaler,
        old: &HorizontalPodAutoscaler,
    ) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, autoscaler: &HorizontalPodAutoscaler) -> Vec<FieldError> {
        match &autoscaler.spec {
            Some(spec) => validate_spec(spec),
            None => vec![FieldError::required("spec", "")],
        }
    }

    fn spec_changed(
        &self,
        new: &HorizontalPodAutoscaler,
        old: &HorizontalPodAutoscaler,
    ) -> Option<bool> {
        Some(new.spec != old.spec)
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, autoscaler: &HorizontalPodAutoscaler) -> Vec<Value> {
        let spec = autoscaler.spec.clone().unwrap_or_default();
        let status = autoscaler.status.clone().unwrap_or_default();
        let reference = format!("{}/{}", spec.scale_target_ref.kind, spec.scale_target_ref.name);
        vec![
            autoscaler.metadata.name.clone().unwrap_or_default().into(),
            reference.into(),
            targets(&spec, status.current_metrics.as_deref().unwrap_or_default()).into(),
            spec.min_replicas.map_or_else(|| Value::from("<unset>"), Value::from),
            spec.max_replicas.into(),
            status.current_replicas.unwrap_or(0).into(),
            table::age(autoscaler.metadata.creation_timestamp.as_ref()).into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::autoscaling::v2::{HorizontalPodAutoscaler, MetricStatus};
    use serde_json::json;

    use super::{HorizontalPodAutoscalerStrategy, targets};
    use crate::api::kind::Strategy;

    fn autoscaler(value: serde_json::Value) -> HorizontalPodAutoscaler {
        serde_json::from_value(value).expect("an autoscaler")
    }

    #[test]
    fn an_autoscaler_without_metrics_aims_at_80_percent_cpu_from_one_replica() {
        let mut hpa = autoscaler(json!({"spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "maxReplicas": 5}}));
        HorizontalPodAutoscalerStrategy.default(&mut hpa);
        let spec = hpa.spec.unwrap();
        assert_eq!(spec.min_replicas, Some(1));
        assert_eq!(super::cpu_utilization_target(&spec), Some(80));
    }

    #[test]
    fn limits_target_and_metrics_are_validated_field_by_field() {
        let fields = |v| -> Vec<String> {
            HorizontalPodAutoscalerStrategy
                .validate(&autoscaler(v))
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert!(
            fields(json!({"spec": {
            "scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 3}}))
            .is_empty()
        );
        assert_eq!(
            fields(json!({"spec": {
            "scaleTargetRef": {"kind": "", "name": ""},
            "minReplicas": 4, "maxReplicas": 3,
            "metrics": [
                {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 0}}},
                {"type": "Sideways"},
            ]}})),
            [
                "spec.scaleTargetRef.kind",
                "spec.scaleTargetRef.name",
                "spec.maxReplicas",
                "spec.metrics[0].resource.target.averageUtilization",
                "spec.metrics[1].type",
            ]
        );
    }

    #[test]
    fn targets_print_current_over_target_per_metric() {
        let hpa = autoscaler(json!({"spec": {
        "scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 3,
        "metrics": [
            {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
            {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
        ]}}));
        let spec = hpa.spec.unwrap();
        assert_eq!(targets(&spec, &[]), "cpu: <unknown>/50%, memory: <unknown>/100Mi");
        let current: Vec<MetricStatus> = serde_json::from_value(json!([
            {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 42}}},
        ]))
        .unwrap();
        assert_eq!(targets(&spec, &current), "cpu: 42%/50%, memory: <unknown>/100Mi");
    }
}
