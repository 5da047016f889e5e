//! HorizontalPodAutoscalers in `autoscaling/v1`, the version `kubectl autoscale` 1.27–1.32
//! creates (1.33 falls back to it). Autoscalers are stored in `autoscaling/v2`; this handler
//! converts at the edge, as Kubernetes does: v1 has one CPU utilization target where v2 has a
//! list of metrics, so what v1 cannot say (other metrics, `behavior`, conditions, other current
//! metrics) travels in `autoscaling.alpha.kubernetes.io/…` annotations of the v1 object, and a
//! v1 client that writes back what it read loses nothing.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::autoscaling::{v1, v2};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    error::ApiError,
    handler::{
        KindHandler, PageRequest, PatchBody, WatchEventOut, WriteOptions, Written, decode_body,
    },
    kind::{DeleteRequest, KindInfo},
    kinds::horizontal_pod_autoscaler::cpu_utilization_target,
    metadata::MetadataAccess,
    selectors::FieldSelector,
    table::ResponseFormat,
    typed::{ListFilter, WatchStart},
    validation::NameRule,
};
use crate::store::Revision;

/// v2 metrics other than the CPU utilization target.
pub const METRICS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/metrics";
pub const BEHAVIOR_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/behavior";
pub const CONDITIONS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/conditions";
/// v2 current metrics other than the CPU utilization.
pub const CURRENT_METRICS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/current-metrics";
const ANNOTATIONS: [&str; 4] =
    [METRICS_ANNOTATION, BEHAVIOR_ANNOTATION, CONDITIONS_ANNOTATION, CURRENT_METRICS_ANNOTATION];

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    ..KindInfo::of::<v1::HorizontalPodAutoscaler>(
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        NameRule::Subdomain,
    )
};

fn is_cpu_utilization(metric: &v2::MetricSpec) -> bool {
    metric.type_ == "Resource"
        && metric.resource.as_ref().is_some_and(|r| {
            r.name == "cpu"
                && r.target.type_ == "Utilization"
                && r.target.average_utilization.is_some()
        })
}

fn encode<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

fn decode<T: DeserializeOwned>(annotations: &BTreeMap<String, String>, key: &str) -> Option<T> {
    serde_json::from_str(annotations.get(key)?).ok()
}

/// The v1 form of a stored autoscaler.
pub fn to_v1(object: v2::HorizontalPodAutoscaler) -> v1::HorizontalPodAutoscaler {
    let mut metadata = object.metadata;
    let spec = object.spec.unwrap_or_default();
    let status = object.status;
    let mut annotations = metadata.annotations.take().unwrap_or_default();
    let others: Vec<v2::MetricSpec> =
        spec.metrics.iter().flatten().filter(|m| !is_cpu_utilization(m)).cloned().collect();
    let mut add = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            annotations.insert(key.to_owned(), value);
        }
    };
    add(METRICS_ANNOTATION, (!others.is_empty()).then(|| encode(&others)).flatten());
    add(BEHAVIOR_ANNOTATION, spec.behavior.as_ref().and_then(encode));
    let conditions = status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    add(CONDITIONS_ANNOTATION, (!conditions.is_empty()).then(|| encode(&conditions)).flatten());
    let current = status.as_ref().and_then(|s| s.current_metrics.clone()).unwrap_or_default();
    let cpu_now = current.iter().find_map(|m| {
        let r = m.resource.as_ref().filter(|r| m.type_ == "Resource" && r.name == "cpu")?;
        r.current.average_utilization
    });
    let other_current: Vec<&v2::MetricStatus> = current
        .iter()
        .filter(|m| {
            !(m.type_ == "Resource" && m.resource.as_ref().is_some_and(|r| r.name == "cpu"))
        })
        .collect();
    add(
        CURRENT_METRICS_ANNOTATION,
        (!other_current.is_empty()).then(|| encode(&other_current)).flatten(),
    );
    metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    let reference = spec.scale_target_ref.clone();
    v1::HorizontalPodAutoscaler {
        metadata,
        spec: Some(v1::HorizontalPodAutoscalerSpec {
            scale_target_ref: v1::CrossVersionObjectReference {
                api_version: reference.api_version,
                kind: reference.kind,
                name: reference.name,
            },
            min_replicas: spec.min_replicas,
            max_replicas: spec.max_replicas,
            target_cpu_utilization_percentage: cpu_utilization_target(&spec),
        }),
        status: status.map(|s| v1::HorizontalPodAutoscalerStatus {
            current_cpu_utilization_percentage: cpu_now,
            current_replicas: s.current_replicas.unwrap_or(0),
            desired_replicas: s.desired_replicas,
            last_scale_time: s.last_scale_time,
            observed_generation: s.observed_generation,
        }),
    }
}

/// The stored (v2) form of a v1 autoscaler.
pub fn to_v2(object: v1::HorizontalPodAutoscaler) -> v2::HorizontalPodAutoscaler {
    let mut metadata = object.metadata;
    let annotations = metadata.annotations.take().unwrap_or_default();
    let spec = object.spec.unwrap_or_default();
    let mut metrics = Vec::new();
    if let Some(target) = spec.target_cpu_utilization_percentage {
        metrics.push(v2::MetricSpec {
            type_: "Resource".to_owned(),
            resource: Some(v2::ResourceMetricSource {
                name: "cpu".to_owned(),
                target: v2::MetricTarget {
                    type_: "Utilization".to_owned(),
                    average_utilization: Some(target),
                    ..v2::MetricTarget::default()
                },
            }),
            ..v2::MetricSpec::default()
        });
    }
    metrics.extend(
        decode::<Vec<v2::MetricSpec>>(&annotations, METRICS_ANNOTATION).unwrap_or_default(),
    );
    let status = object.status.map(|s| {
        let mut current = Vec::new();
        if let Some(cpu) = s.current_cpu_utilization_percentage {
            current.push(v2::MetricStatus {
                type_: "Resource".to_owned(),
                resource: Some(v2::ResourceMetricStatus {
                    name: "cpu".to_owned(),
                    current: v2::MetricValueStatus {
                        average_utilization: Some(cpu),
                        ..v2::MetricValueStatus::default()
                    },
                }),
                ..v2::MetricStatus::default()
            });
        }
        current.extend(
            decode::<Vec<v2::MetricStatus>>(&annotations, CURRENT_METRICS_ANNOTATION)
                .unwrap_or_default(),
        );
        v2::HorizontalPodAutoscalerStatus {
            conditions: decode(&annotations, CONDITIONS_ANNOTATION),
            current_metrics: (!current.is_empty()).then_some(current),
            current_replicas: Some(s.current_replicas),
            desired_replicas: s.desired_replicas,
            last_scale_time: s.last_scale_time,
            observed_generation: s.observed_generation,
        }
    });
    let behavior = decode(&annotations, BEHAVIOR_ANNOTATION);
    let kept: BTreeMap<String, String> =
        annotations.into_iter().filter(|(k, _)| !ANNOTATIONS.contains(&k.as_str())).collect();
    metadata.annotations = (!kept.is_empty()).then_some(kept);
    let reference = spec.scale_target_ref;
    v2::HorizontalPodAutoscaler {
        metadata,
        spec: Some(v2::HorizontalPodAutoscalerSpec {
            scale_target_ref: v2::CrossVersionObjectReference {
                api_version: reference.api_version,
                kind: reference.kind,
                name: reference.name,
            },
            min_replicas: spec.min_replicas,
            max_replicas: spec.max_replicas,
            metrics: (!metrics.is_empty()).then_some(metrics),
            behavior,
        }),
        status,
    }
}

fn internal(what: &str) -> impl FnOnce(serde_json::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("converting an autoscaler {what}"), e)
}

/// A stored object as JSON → its v1 JSON (objects of other kinds, such as a Status, pass).
fn external(value: Value) -> Result<Value, ApiError> {
    if value.get("kind").and_then(Value::as_str) != Some("HorizontalPodAutoscaler")
        && value.get("spec").is_none()
    {
        return Ok(value);
    }
    let stored: v2::HorizontalPodAutoscaler =
        serde_json::from_value(value).map_err(internal("to autoscaling/v1"))?;
    let mut out = serde_json::to_value(to_v1(stored)).map_err(internal("to autoscaling/v1"))?;
    out["apiVersion"] = "autoscaling/v1".into();
    out["kind"] = "HorizontalPodAutoscaler".into();
    Ok(out)
}

/// A v1 request body → the v2 body the stored kind takes.
fn internal_body(body: &[u8], strict: bool) -> Result<Vec<u8>, ApiError> {
    let object: v1::HorizontalPodAutoscaler = decode_body(body, "HorizontalPodAutoscaler", strict)?;
    let mut value = serde_json::to_value(to_v2(object)).map_err(internal("to autoscaling/v2"))?;
    value["apiVersion"] = "autoscaling/v2".into();
    value["kind"] = "HorizontalPodAutoscaler".into();
    serde_json::to_vec(&value).map_err(internal("to autoscaling/v2"))
}

/// JSON, list or table from the stored kind's handler → the same in v1.
fn external_response(mut value: Value) -> Result<Value, ApiError> {
    match value.get("kind").and_then(Value::as_str) {
        Some("HorizontalPodAutoscalerList") => {
            value["apiVersion"] = "autoscaling/v1".into();
            if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
                for item in items.iter_mut() {
                    *item = external(std::mem::take(item))?;
                }
            }
            Ok(value)
        }
        Some("Table") => {
            if let Some(rows) = value.get_mut("rows").and_then(Value::as_array_mut) {
                for row in rows.iter_mut() {
                    if let Some(object) = row.get_mut("object")
                        && object.get("kind").and_then(Value::as_str)
                            == Some("HorizontalPodAutoscaler")
                    {
                        *object = external(std::mem::take(object))?;
                    }
                }
            }
            Ok(value)
        }
        _ => external(value),
    }
}

fn written(mut written: Written) -> Result<Written, ApiError> {
    written.object = external(written.object)?;
    Ok(written)
}

/// The `autoscaling/v1` face of the stored `autoscaling/v2` autoscalers.
pub struct AutoscalingV1Handler {
    stored: Arc<dyn KindHandler>,
}

impl AutoscalingV1Handler {
    /// `stored` is the handler of the `autoscaling/v2` kind.
    pub fn new(stored: Arc<dyn KindHandler>) -> Self {
        Self { stored }
    }
}

#[async_trait]
impl KindHandler for AutoscalingV1Handler {
    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn check_field_selector(&self, fields: &FieldSelector) -> Result<(), ApiError> {
        self.stored.check_field_selector(fields)
    }

    async fn create(
        &self,
        namespace: Option<&str>,
        body: &[u8],
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        let body = internal_body(body, options.strict_fields)?;
        written(self.stored.create(namespace, &body, options).await?)
    }

    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        external_response(self.stored.get(namespace, name, format).await?)
    }

    async fn list(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
        page: &PageRequest,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        external_response(self.stored.list(namespace, filter, page, format).await?)
    }

    async fn watch(
        &self,
        namespace: Option<&str>,
        filter: ListFilter,
        start: WatchStart,
        format: ResponseFormat,
    ) -> Result<(Revision, BoxStream<'static, WatchEventOut>), ApiError> {
        let (revision, events) = self.stored.watch(namespace, filter, start, format).await?;
        let events = events
            .map(|mut event| {
                if event.event_type != "ERROR" {
                    match external_response(std::mem::take(&mut event.object)) {
                        Ok(object) => event.object = object,
                        Err(error) => {
                            return WatchEventOut {
                                event_type: "ERROR",
                                object: error.to_status(),
                                revision: None,
                            };
                        }
                    }
                }
                event
            })
            .boxed();
        Ok((revision, events))
    }

    async fn replace(
        &self,
        namespace: Option<&str>,
        name: &str,
        body: &[u8],
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        let body = internal_body(body, options.strict_fields)?;
        written(self.stored.replace(namespace, name, &body, status, options).await?)
    }

    /// A patch applies to the v1 form: read it, patch it, write its v2 form back under the
    /// resourceVersion read (a concurrent change is a Conflict for the client to retry).
    async fn patch(
        &self,
        namespace: Option<&str>,
        name: &str,
        patch: &PatchBody,
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        if matches!(patch, PatchBody::Apply(_)) {
            return Err(ApiError::UnsupportedMediaType {
                accepted: "application/merge-patch+json, application/strategic-merge-patch+json, \
                           application/json-patch+json (server-side apply: use autoscaling/v2)"
                    .to_owned(),
            });
        }
        let mut document = self.get(namespace, name, ResponseFormat::Json).await?;
        patch.apply_to(&mut document, INFO.kind)?;
        let body = serde_json::to_vec(&document)
            .map_err(|e| ApiError::internal("encoding the patched autoscaler", e))?;
        self.replace(namespace, name, &body, status, options).await
    }

    async fn delete(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
        options: WriteOptions,
    ) -> Result<Value, ApiError> {
        external(self.stored.delete(namespace, name, request, options).await?)
    }

    async fn post_subresource(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _subresource: &str,
        _body: &[u8],
    ) -> Result<Value, ApiError> {
        Err(ApiError::UnknownPath)
    }

    fn bookmark(&self, revision: Revision, format: ResponseFormat) -> Value {
        let mut bookmark = self.stored.bookmark(revision, format);
        if bookmark.get("kind").and_then(Value::as_str) == Some("HorizontalPodAutoscaler") {
            bookmark["apiVersion"] = "autoscaling/v1".into();
        }
        bookmark
    }

    fn metadata_access(&self) -> &dyn MetadataAccess {
        self.stored.metadata_access()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::autoscaling::{v1, v2};
    use serde_json::json;

    use super::{METRICS_ANNOTATION, to_v1, to_v2};

    #[test]
    fn v1_carries_the_cpu_target_and_keeps_the_rest_of_v2_in_annotations() {
        let stored: v2::HorizontalPodAutoscaler = serde_json::from_value(json!({
            "metadata": {"name": "web", "annotations": {"team": "a"}},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2, "maxReplicas": 8,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}},
                    {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}},
            },
            "status": {
                "currentReplicas": 3, "desiredReplicas": 4,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 75}}}],
                "conditions": [{"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale"}],
            },
        }))
        .unwrap();
        let v1 = to_v1(stored.clone());
        let spec = v1.spec.clone().unwrap();
        assert_eq!(spec.target_cpu_utilization_percentage, Some(60));
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 8));
        let status = v1.status.clone().unwrap();
        assert_eq!(status.current_cpu_utilization_percentage, Some(75));
        assert_eq!((status.current_replicas, status.desired_replicas), (3, 4));
        let annotations = v1.metadata.annotations.clone().unwrap();
        assert!(annotations[METRICS_ANNOTATION].contains("memory"), "{annotations:?}");
        // And back: nothing lost.
        assert_eq!(to_v2(v1), stored);
    }

    #[test]
    fn a_v1_autoscaler_without_a_target_has_no_metrics_in_v2() {
        let v1: v1::HorizontalPodAutoscaler = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"kind": "ReplicaSet", "name": "web"}, "maxReplicas": 3},
        }))
        .unwrap();
        let spec = to_v2(v1).spec.unwrap();
        assert_eq!(spec.metrics, None, "the v2 defaults then aim at 80 % CPU, as v1's nil does");
    }
}
