//! Reporting events: what the scheduler, the controllers and the node agents tell users about
//! the objects they act on (`kubectl describe`, `kubectl get events`).
//!
//! Aggregation is the reporter's work, as in Kubernetes' event correlator: an occurrence is
//! named after what identifies it (the source, the involved object and its field path, type,
//! reason and message), so the same occurrence again finds its event by name and bumps its
//! `count` and `lastTimestamp` instead of adding an object. The name is a stable hash, so the
//! controller and every agent (possibly of another build) agree on it.
//!
//! In-process reporters use an [`EventRecorder`]: recording never waits for the store; a
//! background task writes (a few at a time) and drops occurrences when its queue is full, so a
//! burst of scheduling never slows down on its events. Node agents post through the API with
//! [`post_through_api`].

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::StreamExt;
use k8s_openapi::{
    Metadata, Resource,
    api::core::v1::{Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    api::{
        error::ApiError,
        kinds::event::{CLUSTER_EVENTS_NAMESPACE, EventStrategy, TYPE_NORMAL, TYPE_WARNING},
        typed::{TypedKind, UpdateMode, current_time},
    },
    client::{ApiClient, ClientError},
};

/// Occurrences waiting to be written before new ones are dropped (Kubernetes' broadcaster
/// queues 1,000 too).
const QUEUE_CAPACITY: usize = 1000;
/// Event writes in flight at once.
const CONCURRENT_WRITES: usize = 8;
/// How often a bump is retried when another reporter bumped the same event meanwhile.
const BUMP_ATTEMPTS: usize = 5;
/// Kubernetes object names are at most 253 characters; the hash suffix takes 17.
const MAX_NAME_PREFIX: usize = 253 - 17;

/// One thing that happened to an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Occurrence {
    pub involved: ObjectReference,
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    pub reason: String,
    pub message: String,
}

impl Occurrence {
    pub fn normal(involved: ObjectReference, reason: &str, message: impl Into<String>) -> Self {
        Self { involved, type_: TYPE_NORMAL, reason: reason.to_owned(), message: message.into() }
    }

    pub fn warning(involved: ObjectReference, reason: &str, message: impl Into<String>) -> Self {
        Self { involved, type_: TYPE_WARNING, reason: reason.to_owned(), message: message.into() }
    }

    /// The namespace the event is stored in: its object's, or `default` for cluster-scoped
    /// objects.
    pub fn namespace(&self) -> &str {
        self.involved
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(CLUSTER_EVENTS_NAMESPACE)
    }
}

/// A reference to a stored object, as events carry it.
pub fn object_reference<K: Resource + Metadata<Ty = ObjectMeta>>(object: &K) -> ObjectReference {
    let meta = object.metadata();
    ObjectReference {
        api_version: Some(K::API_VERSION.to_owned()),
        kind: Some(K::KIND.to_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// A reference to one container of a pod (`fieldPath: spec.containers{name}`).
pub fn container_reference(pod: &Pod, container: &str) -> ObjectReference {
    ObjectReference {
        field_path: Some(format!("spec.containers{{{container}}}")),
        ..object_reference(pod)
    }
}

/// 64-bit FNV-1a: small, and the same in every build (std's hasher promises neither).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The name of the event an occurrence aggregates into: `<object>.<hash>`.
pub fn event_name(source: &EventSource, occurrence: &Occurrence) -> String {
    let involved = &occurrence.involved;
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let hash = fnv1a(&[
        &text(&source.component),
        &text(&source.host),
        &text(&involved.api_version),
        &text(&involved.kind),
        &text(&involved.namespace),
        &text(&involved.name),
        &text(&involved.uid),
        &text(&involved.field_path),
        occurrence.type_,
        &occurrence.reason,
        &occurrence.message,
    ]);
    let mut prefix = text(&involved.name);
    if prefix.is_empty() {
        prefix = text(&involved.kind).to_lowercase();
    }
    let mut cut = prefix.len().min(MAX_NAME_PREFIX);
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    prefix.truncate(cut);
    // A subdomain may not end in '-' or '.' before the suffix's dot.
    let prefix = prefix.trim_end_matches(['-', '.']);
    format!("{prefix}.{hash:016x}")
}

/// The first event of an occurrence.
pub fn new_event(source: &EventSource, occurrence: &Occurrence, now: Time) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(source, occurrence)),
            namespace: Some(occurrence.namespace().to_owned()),
            ..ObjectMeta::default()
        },
        involved_object: occurrence.involved.clone(),
        reason: Some(occurrence.reason.clone()),
        message: Some(occurrence.message.clone()),
        type_: Some(occurrence.type_.to_owned()),
        source: Some(source.clone()),
        reporting_component: source.component.clone(),
        reporting_instance: source.host.clone(),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    }
}

/// The event once the occurrence happened again.
pub fn bump(existing: &Event, now: Time) -> Event {
    let mut bumped = existing.clone();
    bumped.count = Some(existing.count.unwrap_or(1).saturating_add(1));
    bumped.last_timestamp = Some(now);
    bumped
}

/// Whether a refused event write is one to drop quietly: its namespace is gone or being
/// deleted (Kubernetes refuses new content there, events included).
fn namespace_refused(error: &ApiError) -> bool {
    matches!(error, ApiError::Forbidden { .. })
        || matches!(error, ApiError::NotFound { resource, .. } if resource == "namespaces")
}

/// Writes one occurrence into the store: creates its event or bumps the existing one.
pub async fn record_in_store(
    events: &TypedKind<EventStrategy>,
    source: &EventSource,
    occurrence: &Occurrence,
) -> Result<Event, ApiError> {
    let event = new_event(source, occurrence, current_time());
    let namespace = occurrence.namespace().to_owned();
    let name = event.metadata.name.clone().unwrap_or_default();
    loop {
        match events.create(Some(&namespace), event.clone(), false).await {
            Ok(created) => return Ok(created),
            Err(ApiError::AlreadyExists { .. }) => {}
            Err(error) => return Err(error),
        }
        let bumped = events
            .update(Some(&namespace), &name, UpdateMode::Main, false, |current| {
                Ok(bump(current, current_time()))
            })
            .await;
        match bumped {
            // Expired between the two writes: create it afresh.
            Err(ApiError::NotFound { resource, .. }) if resource != "namespaces" => continue,
            other => return other,
        }
    }
}

/// Posts one occurrence through the API (node agents): creates its event or bumps the
/// existing one.
pub async fn post_through_api(
    client: &ApiClient,
    source: &EventSource,
    occurrence: &Occurrence,
) -> Result<(), ClientError> {
    let event = new_event(source, occurrence, current_time());
    let namespace = occurrence.namespace();
    let name = event.metadata.name.clone().unwrap_or_default();
    let mut last_error = None;
    for _ in 0..BUMP_ATTEMPTS {
        match client.create(Some(namespace), &event).await {
            Ok(_) => return Ok(()),
            Err(error) if error.reason() == Some("AlreadyExists") => {}
            Err(error) => return Err(error),
        }
        let Some(current) = client.get::<Event>(Some(namespace), &name).await? else {
            continue;
        };
        match client.replace(Some(namespace), &name, &bump(&current, current_time())).await {
            Ok(_) => return Ok(()),
            // Bumped by another reporter meanwhile, or expired: read again.
            Err(error) if matches!(error.code(), Some(404 | 409)) => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    match last_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The event reporter of one control-plane component. Cheap to clone; recording returns at
/// once.
#[derive(Clone, Debug)]
pub struct EventRecorder {
    queue: mpsc::Sender<Occurrence>,
    source: EventSource,
    dropped: Arc<AtomicU64>,
}

impl EventRecorder {
    /// A recorder for `component`, with its writer task. The task ends once every clone of
    /// the recorder is dropped and the queue is written.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the writer is a task).
    pub fn spawn(events: Arc<TypedKind<EventStrategy>>, component: &str) -> Self {
        let (queue, pending) = mpsc::channel::<Occurrence>(QUEUE_CAPACITY);
        let source = EventSource { component: Some(component.to_owned()), host: None };
        let writer_source = source.clone();
        tokio::spawn(async move {
            ReceiverStream::new(pending)
                .for_each_concurrent(CONCURRENT_WRITES, |occurrence| {
                    let events = Arc::clone(&events);
                    let source = writer_source.clone();
                    async move {
                        match record_in_store(&events, &source, &occurrence).await {
                            Ok(_) => {}
                            Err(error) if namespace_refused(&error) => {
                                tracing::debug!(%error, reason = occurrence.reason, "event refused");
                            }
                            Err(error) => {
                                tracing::warn!(%error, reason = occurrence.reason, "cannot record an event");
                            }
                        }
                    }
                })
                .await;
        });
        Self { queue, source, dropped: Arc::new(AtomicU64::new(0)) }
    }

    /// Queues an occurrence for writing; drops it (and counts it) when the queue is full.
    pub fn record(&self, occurrence: Occurrence) {
        if let Err(error) = self.queue.try_send(occurrence) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // One line per hundred, so a flood does not become a flood of logs too.
            if dropped % 100 == 1 {
                tracing::warn!(component = ?self.source.component, dropped, %error, "event queue full; dropping events");
            }
        }
    }

    pub fn normal<K: Resource + Metadata<Ty = ObjectMeta>>(
        &self,
        object: &K,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.record(Occurrence::normal(object_reference(object), reason, message));
    }

    pub fn warning<K: Resource + Metadata<Ty = ObjectMeta>>(
        &self,
        object: &K,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.record(Occurrence::warning(object_reference(object), reason, message));
    }

    /// Occurrences dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EventSource, ObjectReference};

    use super::{Occurrence, event_name};
    use crate::api::validation::dns1123_subdomain;

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".to_owned()),
            name: Some(name.to_owned()),
            namespace: Some("team".to_owned()),
            uid: Some("u1".to_owned()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn the_same_occurrence_gets_the_same_name_and_another_one_another() {
        let source = EventSource { component: Some("kubelet".to_owned()), host: Some("n1".into()) };
        let started = Occurrence::normal(pod("web"), "Started", "Started container app");
        assert_eq!(event_name(&source, &started), event_name(&source, &started.clone()));
        let killing = Occurrence::normal(pod("web"), "Killing", "Stopping container app");
        assert_ne!(event_name(&source, &started), event_name(&source, &killing));
        let other_host = EventSource { host: Some("n2".into()), ..source.clone() };
        assert_ne!(event_name(&source, &started), event_name(&other_host, &started));
        // Stable across builds: a fixed input has a fixed name.
        assert_eq!(event_name(&source, &started), "web.3fe5eaab357f92ff");
    }

    #[test]
    fn names_are_valid_subdomains_even_for_long_object_names() {
        let source = EventSource { component: Some("scheduler".to_owned()), host: None };
        // Six 58-character labels: longer than a name may be once the suffix is added, and
        // cut right after a dot.
        let long = vec!["a".repeat(58); 6].join(".");
        let name = event_name(&source, &Occurrence::warning(pod(&long), "X", "y"));
        assert!(name.len() <= 253, "{}", name.len());
        assert_eq!(dns1123_subdomain(&name), None, "{name}");
    }
}
