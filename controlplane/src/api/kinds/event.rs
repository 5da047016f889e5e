//! Events (core/v1): what happened to an object, as the scheduler, the controllers and the
//! node agents report it. Served so that `kubectl get events`, `kubectl events` and the event
//! list of `kubectl describe` work, with the field selectors they use
//! (`involvedObject.name=…,involvedObject.namespace=…,involvedObject.kind=…,involvedObject.uid=…`).
//!
//! Aggregation (one object per repeated event, `count` and `lastTimestamp` bumped) is done by
//! the reporters, as in Kubernetes (see [`crate::events`]); expiry after the configured TTL by
//! the event expiry controller. An event about a cluster-scoped object (a node) lives in the
//! `default` namespace with an empty `involvedObject.namespace`, as Kubernetes stores it.

use async_trait::async_trait;
use k8s_openapi::{api::core::v1::Event, apimachinery::pkg::apis::meta::v1::Time};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, Strategy},
    table::{self, Column},
    validation::{self, NameRule},
};

/// Where events about cluster-scoped objects are stored.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "default";
pub const TYPE_NORMAL: &str = "Normal";
pub const TYPE_WARNING: &str = "Warning";

const INFO: KindInfo = KindInfo {
    has_status: false,
    ..KindInfo::of::<Event>("event", true, &["ev"], NameRule::Subdomain)
};

pub fn key_prefix() -> String {
    INFO.key_prefix()
}

#[derive(Debug, Default)]
pub struct EventStrategy;

/// The columns Kubernetes prints for events (the wide ones only with `-o wide`).
const COLUMNS: &[Column] = &[
    Column::new(
        "Last Seen",
        "The time at which the most recent occurrence of this event was recorded.",
    ),
    Column::new("Type", "Type of this event (Normal, Warning)."),
    Column::new("Reason", "Why the action was taken, in UpperCamelCase."),
    Column::new("Object", "The object this event is about."),
    Column::new("Subobject", "The part of the object this event is about (a container).").wide(),
    Column::new("Source", "The component reporting this event.").wide(),
    Column::new("Message", "A human-readable description of the status of this operation."),
    Column::new("First Seen", "The time at which the event was first recorded.").wide(),
    Column::new("Count", "The number of times this event has occurred.").integer().wide(),
    Column::name_column().wide(),
];

/// The fields `fieldSelector` may use on events, as Kubernetes' `EventToSelectableFields`.
const SELECTABLE: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// When the event last happened: the newest of its timestamps (a bumped event's
/// `lastTimestamp`, a new-style event's `series.lastObservedTime` or `eventTime`), or its
/// creation.
pub fn last_seen(event: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    [
        event.last_timestamp.as_ref().map(|t| t.0),
        event.series.as_ref().and_then(|s| s.last_observed_time.as_ref()).map(|t| t.0),
        event.event_time.as_ref().map(|t| t.0),
        event.first_timestamp.as_ref().map(|t| t.0),
        event.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

fn first_seen(event: &Event) -> Option<Time> {
    event
        .first_timestamp
        .clone()
        .or_else(|| event.event_time.as_ref().map(|t| Time(t.0)))
        .or_else(|| event.metadata.creation_timestamp.clone())
}

/// `component, host` as Kubernetes prints an event's source.
fn source_text(event: &Event) -> String {
    let source = event.source.clone().unwrap_or_default();
    let component = source
        .component
        .filter(|c| !c.is_empty())
        .or_else(|| event.reporting_component.clone())
        .unwrap_or_default();
    match source.host.filter(|h| !h.is_empty()) {
        Some(host) => format!("{component}, {host}"),
        None => component,
    }
}

#[async_trait]
impl Strategy for EventStrategy {
    type Object = Event;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_status_update(&self, new: &mut Event, old: &Event) {
        // Events have no status subresource; nothing reaches here.
        *new = old.clone();
    }

    fn validate(&self, event: &Event) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let namespace = event.metadata.namespace.as_deref().unwrap_or_default();
        let involved = event.involved_object.namespace.as_deref().unwrap_or_default();
        // Kubernetes' rule for core/v1 events: the event lives in its object's namespace, or
        // (for a cluster-scoped object) in `default`.
        let agrees = if involved.is_empty() {
            namespace.is_empty() || namespace == CLUSTER_EVENTS_NAMESPACE
        } else {
            namespace == involved
        };
        if !agrees {
            errors.push(FieldError::invalid(
                "involvedObject.namespace",
                involved,
                "does not match event.namespace",
            ));
        }
        if let Some(why) = validation::dns1123_subdomain(namespace) {
            errors.push(FieldError::invalid("metadata.namespace", namespace, why));
        }
        if event.count.is_some_and(|c| c < 0) {
            errors.push(FieldError::invalid(
                "count",
                event.count.unwrap_or_default(),
                "must be greater than or equal to 0",
            ));
        }
        errors
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, event: &Event) -> Vec<Value> {
        let involved = &event.involved_object;
        let kind = involved.kind.clone().unwrap_or_default().to_lowercase();
        let object = match involved.name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => format!("{kind}/{name}"),
            None => kind,
        };
        let last = last_seen(event).map(Time);
        let count = event
            .series
            .as_ref()
            .and_then(|s| s.count)
            .or(event.count)
            .filter(|c| *c > 0)
            .unwrap_or(1);
        vec![
            table::age(last.as_ref()).into(),
            event.type_.clone().unwrap_or_default().into(),
            event.reason.clone().unwrap_or_default().into(),
            object.into(),
            involved.field_path.clone().unwrap_or_default().into(),
            source_text(event).into(),
            event.message.clone().unwrap_or_default().trim().to_owned().into(),
            table::age(first_seen(event).as_ref()).into(),
            i64::from(count).into(),
            event.metadata.name.clone().unwrap_or_default().into(),
        ]
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        SELECTABLE
    }

    fn field_value(&self, event: &Event, field: &str) -> String {
        let involved = &event.involved_object;
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        match field {
            "involvedObject.kind" => text(&involved.kind),
            "involvedObject.namespace" => text(&involved.namespace),
            "involvedObject.name" => text(&involved.name),
            "involvedObject.uid" => text(&involved.uid),
            "involvedObject.apiVersion" => text(&involved.api_version),
            "involvedObject.resourceVersion" => text(&involved.resource_version),
            "involvedObject.fieldPath" => text(&involved.field_path),
            "reason" => text(&event.reason),
            "reportingComponent" => text(&event.reporting_component),
            "source" => event.source.as_ref().map(|s| text(&s.component)).unwrap_or_default(),
            "type" => text(&event.type_),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Event;
    use serde_json::json;

    use super::EventStrategy;
    use crate::api::kind::Strategy;

    fn event(value: serde_json::Value) -> Event {
        serde_json::from_value(value).expect("an event")
    }

    #[test]
    fn an_event_lives_in_its_objects_namespace_or_default_for_cluster_objects() {
        let strategy = EventStrategy;
        let pod_event = event(json!({
            "metadata": {"name": "web.1", "namespace": "team"},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "team"},
        }));
        assert!(strategy.validate(&pod_event).is_empty());
        let node_event = event(json!({
            "metadata": {"name": "n1.1", "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": "n1"},
        }));
        assert!(strategy.validate(&node_event).is_empty());
        let misplaced = event(json!({
            "metadata": {"name": "web.1", "namespace": "other"},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "team"},
        }));
        let errors = strategy.validate(&misplaced);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "involvedObject.namespace");
    }

    #[test]
    fn rows_and_selectable_fields_follow_kubernetes() {
        let strategy = EventStrategy;
        let bumped = event(json!({
            "metadata": {"name": "web.1", "namespace": "team"},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "team", "uid": "u1",
                               "fieldPath": "spec.containers{app}"},
            "reason": "BackOff", "message": "Back-off restarting failed container\n", "type": "Warning",
            "source": {"component": "kubelet", "host": "n1"}, "count": 3,
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:05:00Z",
        }));
        let row = strategy.row(&bumped);
        assert_eq!(row[1], "Warning");
        assert_eq!(row[2], "BackOff");
        assert_eq!(row[3], "pod/web");
        assert_eq!(row[4], "spec.containers{app}");
        assert_eq!(row[5], "kubelet, n1");
        assert_eq!(row[6], "Back-off restarting failed container");
        assert_eq!(row[8], 3);
        assert_eq!(row[9], "web.1");
        assert_eq!(strategy.field_value(&bumped, "involvedObject.uid"), "u1");
        assert_eq!(strategy.field_value(&bumped, "involvedObject.kind"), "Pod");
        assert_eq!(strategy.field_value(&bumped, "source"), "kubelet");
        assert_eq!(strategy.field_value(&bumped, "type"), "Warning");
        assert_eq!(
            super::last_seen(&bumped).map(|t| t.to_string()).as_deref(),
            Some("2026-01-01T00:05:00Z")
        );
    }
}
