//! The replica set controller: each ReplicaSet keeps `replicas` active pods (not terminating,
//! not finished) that it controls (a controller ownerReference with its uid), made from its
//! template. Missing pods are created with `generateName: <set>-`, surplus ones deleted
//! gracefully (unscheduled, then unready, then ready for the shortest time, then the newest
//! first), and failed ones deleted so that they are replaced. Status counts replicas, ready and
//! available pods: a pod is available once it has been ready for the set's `minReadySeconds`,
//! and the controller wakes up when the next one comes due. Pods whose replica set is gone are
//! the garbage collector's (their ownerReference).
//!
//! Caches lag behind writes, so pods this controller created or deleted but has not seen yet
//! through its watch are remembered ("expectations") and counted as they will be: a pass never
//! creates a second pod for a hole it already filled.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        apps::v1::{ReplicaSet, ReplicaSetStatus},
        core::v1::{Pod, PodCondition},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::{SignedDuration, Timestamp},
};

use super::{ObjectCache, Reconciler};
use crate::api::{
    Registry,
    error::ApiError,
    kind::DeleteRequest,
    kinds::{
        pod::{PodStrategy, is_terminated, node_name},
        replica_set::ReplicaSetStrategy,
    },
    typed::UpdateMode,
};
use crate::events::EventRecorder;

/// How long a write this controller made may stay unseen in its cache before it stops
/// counting it (the write may have been lost with a controller restart of the store).
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ReplicaSetController {
    registry: Arc<Registry>,
    sets: ObjectCache<ReplicaSetStrategy>,
    pods: ObjectCache<PodStrategy>,
    /// Per replica set uid: pods created and not yet seen, pods deleted and still seen active.
    expectations: HashMap<String, Expectations>,
    events: EventRecorder,
    /// The earliest moment a ready pod becomes available, seen in the last pass.
    next_available: Option<Timestamp>,
}

#[derive(Debug, Default)]
struct Expectations {
    created: HashMap<String, Instant>,
    deleted: HashMap<String, Instant>,
}

impl Expectations {
    fn forget_stale(&mut self) {
        self.created.retain(|_, at| at.elapsed() < EXPECTATION_TIMEOUT);
        self.deleted.retain(|_, at| at.elapsed() < EXPECTATION_TIMEOUT);
    }
}

impl ReplicaSetController {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            sets: ObjectCache::new(Arc::clone(&registry.replica_sets)),
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            events: EventRecorder::spawn(Arc::clone(&registry.events), "replicaset-controller"),
            registry,
            expectations: HashMap::new(),
            next_available: None,
        }
    }
}

/// The uid of the object that controls `pod`, with the kind it names.
fn controller_of(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !is_terminated(pod)
}

fn ready_condition(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn is_ready(pod: &Pod) -> bool {
    ready_condition(pod).is_some()
}

/// When a ready pod is (or was) available: once it has been ready for `min_ready_seconds`.
/// `None` for a pod that is not ready, or that must be ready for a while and does not say
/// since when. Transition times are whole seconds, cut down: the pod turned ready up to a
/// second after the one recorded, so that second is added for it to have been ready long
/// enough.
pub fn available_since(pod: &Pod, min_ready_seconds: i32) -> Option<Timestamp> {
    let condition = ready_condition(pod)?;
    let since = condition.last_transition_time.as_ref().map(|t| t.0);
    if min_ready_seconds <= 0 {
        return Some(since.unwrap_or(Timestamp::UNIX_EPOCH));
    }
    since?.checked_add(SignedDuration::from_secs(i64::from(min_ready_seconds) + 1)).ok()
}

/// The current time to the nanosecond (stored timestamps carry whole seconds).
pub fn precise_now() -> Timestamp {
    let since =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp::from_nanosecond(since.as_nanos().try_into().unwrap_or(0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Whether a pod counts as available at `now` (see [`available_since`]).
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    available_since(pod, min_ready_seconds).is_some_and(|at| at <= now)
}

/// The pod a replica set makes from its template.
fn pod_from_template(set: &ReplicaSet) -> Pod {
    let spec = set.spec.clone().unwrap_or_default();
    let template = spec.template.unwrap_or_default();
    let template_meta = template.metadata.unwrap_or_default();
    let name = set.metadata.name.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".to_owned(),
                kind: "ReplicaSet".to_owned(),
                name,
                uid: set.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// Which surplus pods go first: unscheduled, then not ready, then ready for the shortest
/// time (not yet available after `minReadySeconds`, so the deployment controller's count of
/// available pods stays true), then the newest.
fn deletion_order(pods: &mut [&Pod]) {
    pods.sort_by(|a, b| {
        let key = |p: &Pod| {
            let ready_since = ready_condition(p).and_then(|c| c.last_transition_time.clone());
            (
                !node_name(p).is_empty(),
                is_ready(p),
                std::cmp::Reverse(ready_since),
                std::cmp::Reverse(p.metadata.creation_timestamp.clone()),
            )
        };
        key(a).cmp(&key(b))
    });
}

impl ReplicaSetController {
    async fn reconcile_set(&mut self, set: &ReplicaSet) -> Result<(), ApiError> {
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        let uid = set.metadata.uid.clone().unwrap_or_default();
        let wanted =
            usize::try_from(set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)).unwrap_or(0);
        let owned: Vec<&Pod> = self
            .pods
            .objects()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .filter(|p| controller_of(p).is_some_and(|o| o.uid == uid))
            .collect();
        let expectations = self.expectations.entry(uid.clone()).or_default();
        expectations.forget_stale();
        let seen: HashSet<&str> = owned.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        expectations.created.retain(|name, _| !seen.contains(name.as_str()));
        let active: Vec<&Pod> = owned
            .iter()
            .copied()
            .filter(|p| is_active(p))
            .filter(|p| {
                !p.metadata.name.as_deref().is_some_and(|n| expectations.deleted.contains_key(n))
            })
            .collect();
        let active_names: HashSet<&str> =
            active.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        expectations.deleted.retain(|name, _| {
            seen.contains(name.as_str()) && !active_names.contains(name.as_str())
        });
        let failed: Vec<String> = owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_terminated(p))
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let counted = active.len() + expectations.created.len();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let min_ready = set.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0);
        let now = precise_now();
        let mut available: i32 = 0;
        for pod in &active {
            match available_since(pod, min_ready) {
                Some(at) if at <= now => available += 1,
                Some(at) => {
                    self.next_available = Some(self.next_available.map_or(at, |n| n.min(at)));
                }
                None => {}
            }
        }
        let mut surplus: Vec<&Pod> = active.clone();
        deletion_order(&mut surplus);
        let to_delete: Vec<String> = surplus
            .into_iter()
            .take(counted.saturating_sub(wanted))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let to_create = wanted.saturating_sub(counted);
        let status = ReplicaSetStatus {
            replicas: i32::try_from(active.len()).unwrap_or(i32::MAX),
            fully_labeled_replicas: Some(i32::try_from(active.len()).unwrap_or(i32::MAX)),
            ready_replicas: Some(i32::try_from(ready).unwrap_or(i32::MAX)),
            available_replicas: Some(available),
            observed_generation: set.metadata.generation,
            ..ReplicaSetStatus::default()
        };

        let mut first_error = None;
        let request = DeleteRequest::default();
        for name in failed.iter().chain(&to_delete) {
            match self.registry.pods.delete(Some(&namespace), name, &request, false).await {
                Ok(_) => {
                    self.events.normal(set, "SuccessfulDelete", format!("Deleted pod: {name}"));
                    if let Some(e) = self.expectations.get_mut(&uid) {
                        e.deleted.insert(name.clone(), Instant::now());
                    }
                }
                Err(ApiError::NotFound { .. }) => {
                    if let Some(e) = self.expectations.get_mut(&uid) {
                        e.deleted.insert(name.clone(), Instant::now());
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        for _ in 0..to_create {
            match self.registry.pods.create(Some(&namespace), pod_from_template(set), false).await {
                Ok(pod) => {
                    let name = pod.metadata.name.unwrap_or_default();
                    tracing::debug!(namespace, replica_set = ?set.metadata.name, pod = name, "created pod");
                    self.events.normal(set, "SuccessfulCreate", format!("Created pod: {name}"));
                    if let Some(e) = self.expectations.get_mut(&uid) {
                        e.created.insert(name, Instant::now());
                    }
                }
                Err(error) => {
                    self.events.warning(set, "FailedCreate", format!("Error creating: {error}"));
                    first_error.get_or_insert(error);
                    break;
                }
            }
        }
        if set.status.as_ref() != Some(&status) {
            let name = set.metadata.name.as_deref().unwrap_or_default();
            let written = self
                .registry
                .replica_sets
                .update(Some(&namespace), name, UpdateMode::Status, false, |current| {
                    let mut updated = current.clone();
                    updated.status = Some(status.clone());
                    Ok(updated)
                })
                .await;
            if let Err(error) = written
                && !matches!(error, ApiError::NotFound { .. } | ApiError::Conflict { .. })
            {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Reconciler for ReplicaSetController {
    fn name(&self) -> &'static str {
        "replicaset"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.sets.resync().await?;
        self.pods.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        tokio::select! {
            changed = self.sets.next_change() => changed,
            changed = self.pods.next_change() => changed,
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.sets.drain_ready().await?;
        self.pods.drain_ready().await
    }

    fn requeue_after(&self) -> Option<Duration> {
        let at = self.next_available?;
        let wait = at.duration_since(precise_now());
        // A little past the moment, so that the pass sees it as come.
        Some(Duration::try_from(wait).unwrap_or_default() + Duration::from_millis(10))
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        self.next_available = None;
        let sets: Vec<ReplicaSet> = self
            .sets
            .objects()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        let live: HashSet<String> = sets.iter().filter_map(|s| s.metadata.uid.clone()).collect();
        self.expectations.retain(|uid, _| live.contains(uid));
        let mut first_error = None;
        for set in &sets {
            if let Err(error) = self.reconcile_set(set).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::{available_since, deletion_order, is_available};

    #[test]
    fn surplus_pods_go_unscheduled_first_then_unready_then_ready_shortest_then_newest() {
        let pod = |name: &str, node: &str, ready: &str, created: &str, since: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"nodeName": node, "containers": []},
                "status": {"conditions": [
                    {"type": "Ready", "status": ready, "lastTransitionTime": since}]},
            }))
            .unwrap()
        };
        let day = |d: u32| format!("2026-01-0{d}T00:00:00Z");
        let old_ready = pod("old-ready", "n1", "True", &day(1), &day(2));
        let new_ready = pod("new-ready", "n1", "True", &day(2), &day(2));
        // Created first but ready last: it has been ready for the shortest time.
        let late_ready = pod("late-ready", "n1", "True", &day(1), &day(3));
        let unready = pod("unready", "n1", "False", &day(1), &day(1));
        let pending = pod("pending", "", "False", &day(1), &day(1));
        let mut pods = vec![&old_ready, &new_ready, &late_ready, &unready, &pending];
        deletion_order(&mut pods);
        let names: Vec<&str> = pods.iter().map(|p| p.metadata.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["pending", "unready", "late-ready", "new-ready", "old-ready"]);
    }

    #[test]
    fn a_pod_is_available_once_ready_for_min_ready_seconds_plus_the_cut_second() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}]},
        }))
        .unwrap();
        let at = |s: &str| s.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert!(is_available(&pod, 0, at("2026-01-01T00:00:10Z")));
        assert_eq!(available_since(&pod, 5), Some(at("2026-01-01T00:00:16Z")));
        assert!(!is_available(&pod, 5, at("2026-01-01T00:00:15.9Z")));
        assert!(is_available(&pod, 5, at("2026-01-01T00:00:16Z")));
        let unready: Pod = serde_json::from_value(json!({
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        }))
        .unwrap();
        assert_eq!(available_since(&unready, 0), None);
        // Without a transition time it cannot have been ready long enough.
        let untimed: Pod = serde_json::from_value(json!({
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        assert!(is_available(&untimed, 0, at("2026-01-01T00:00:00Z")));
        assert_eq!(available_since(&untimed, 1), None);
    }
}
