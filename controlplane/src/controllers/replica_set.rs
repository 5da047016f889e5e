//! The replica set controller: each ReplicaSet keeps `replicas` active pods (not terminating,
//! not finished) that it controls (a controller ownerReference with its uid), made from its
//! template. Missing pods are created with `generateName: <set>-`, surplus ones deleted
//! gracefully (unscheduled, then unready, then the newest first), and failed ones deleted so
//! that they are replaced. Status counts replicas, ready and available pods. Pods whose replica
//! set is gone are the garbage collector's (their ownerReference).
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
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
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

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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

/// Which surplus pods go first: unscheduled, then not ready, then the newest.
fn deletion_order(pods: &mut [&Pod]) {
    pods.sort_by(|a, b| {
        let key = |p: &Pod| {
            (
                !node_name(p).is_empty(),
                is_ready(p),
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
            available_replicas: Some(i32::try_from(ready).unwrap_or(i32::MAX)),
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

    async fn reconcile(&mut self) -> Result<(), ApiError> {
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

    use super::deletion_order;

    #[test]
    fn surplus_pods_go_unscheduled_first_then_unready_then_newest() {
        let pod = |name: &str, node: &str, ready: &str, created: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"nodeName": node, "containers": []},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        let old_ready = pod("old-ready", "n1", "True", "2026-01-01T00:00:00Z");
        let new_ready = pod("new-ready", "n1", "True", "2026-01-02T00:00:00Z");
        let unready = pod("unready", "n1", "False", "2026-01-01T00:00:00Z");
        let pending = pod("pending", "", "False", "2026-01-01T00:00:00Z");
        let mut pods = vec![&old_ready, &new_ready, &unready, &pending];
        deletion_order(&mut pods);
        let names: Vec<&str> = pods.iter().map(|p| p.metadata.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["pending", "unready", "new-ready", "old-ready"]);
    }
}
