//! The scheduler: every pending pod (no node, not being deleted, for the default scheduler) is
//! bound to a Ready, schedulable node that fits it ([`fit`]: taints, node selection, CPU and
//! memory requests, host ports), preferring the node with the fewest pods of the same owner,
//! then the least allocated one. A pod that fits nowhere gets `PodScheduled=False` with
//! Kubernetes' `0/N nodes are available: …` message. It is level-triggered: each pass looks at
//! every pending pod, so a pod that found no node is retried whenever nodes or pods change.
//! Within a pass each placement is counted at once, so a burst is spread and never overcommits.
//! Pods created with a node are never moved. Binding goes through the same code path as the
//! `binding` subresource.

pub mod fit;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use async_trait::async_trait;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod, PodCondition};

use crate::{
    api::{
        Registry,
        error::ApiError,
        kinds::{
            node::{NodeStrategy, condition_status},
            pod::{
                DEFAULT_SCHEDULER, POD_SCHEDULED, PodStrategy, bind_pod, is_terminated, node_name,
                set_condition,
            },
        },
        typed::{UpdateMode, current_time},
    },
    controllers::{ObjectCache, Reconciler},
    events::EventRecorder,
};

/// Binds and status writes in flight at once during a pass.
const CONCURRENT_WRITES: usize = 16;

/// The reason of `PodScheduled=False` when no node fits, as Kubernetes names it.
pub const UNSCHEDULABLE: &str = "Unschedulable";

/// Why nodes cannot take pods right now, for the Unschedulable message.
#[derive(Debug, Default, PartialEq, Eq)]
struct Exclusions {
    not_ready: usize,
    unschedulable: usize,
}

/// Whether a node can take pods at all. A cordoned one (`spec.unschedulable`) still can take
/// pods that tolerate its unschedulable taint: [`fit::misfits`] decides per pod.
fn is_schedulable(node: &Node, exclusions: &mut Exclusions) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        exclusions.unschedulable += 1;
        return false;
    }
    if condition_status(node, "Ready") != Some("True") {
        exclusions.not_ready += 1;
        return false;
    }
    true
}

/// The message of an Unschedulable condition (Kubernetes' `0/N nodes are available: …`):
/// nodes left out for their state, then each reason a schedulable node did not fit, with the
/// number of nodes it applied to.
fn unschedulable_message(
    total: usize,
    exclusions: &Exclusions,
    misfits: &BTreeMap<String, usize>,
) -> String {
    if total == 0 {
        return "no nodes available to schedule pods".to_owned();
    }
    let mut reasons = Vec::new();
    if exclusions.not_ready > 0 {
        reasons.push(format!("{} node(s) were not ready", exclusions.not_ready));
    }
    if exclusions.unschedulable > 0 {
        reasons.push(format!("{} node(s) were unschedulable", exclusions.unschedulable));
    }
    for (reason, nodes) in misfits {
        reasons.push(format!("{nodes} {reason}"));
    }
    format!("0/{total} nodes are available: {}.", reasons.join(", "))
}

fn wants_scheduling(pod: &Pod) -> bool {
    let scheduler =
        pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()).unwrap_or(DEFAULT_SCHEDULER);
    node_name(pod).is_empty()
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminated(pod)
        && scheduler == DEFAULT_SCHEDULER
}

/// The event source of the scheduler, as Kubernetes names it.
pub const SCHEDULER_COMPONENT: &str = "default-scheduler";

pub struct Scheduler {
    registry: Arc<Registry>,
    pods: ObjectCache<PodStrategy>,
    nodes: ObjectCache<NodeStrategy>,
    events: EventRecorder,
}

impl Scheduler {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            nodes: ObjectCache::new(Arc::clone(&registry.nodes)),
            events: EventRecorder::spawn(Arc::clone(&registry.events), SCHEDULER_COMPONENT),
            registry,
        }
    }
}

/// Records on the pod why it stays pending (written only when the reason changes), with a
/// FailedScheduling event when it does.
async fn mark_unschedulable(
    registry: &Registry,
    events: &EventRecorder,
    pod: &Pod,
    message: &str,
) -> Result<(), ApiError> {
    let namespace = pod.metadata.namespace.as_deref();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut changed = false;
    let result = registry
        .pods
        .update(namespace, name, UpdateMode::Status, false, |current| {
            let mut updated = current.clone();
            changed = false;
            if wants_scheduling(current) {
                changed = set_condition(
                    &mut updated,
                    PodCondition {
                        type_: POD_SCHEDULED.to_owned(),
                        status: "False".to_owned(),
                        reason: Some(UNSCHEDULABLE.to_owned()),
                        message: Some(message.to_owned()),
                        last_transition_time: Some(current_time()),
                        ..PodCondition::default()
                    },
                );
            }
            Ok(updated)
        })
        .await;
    match result {
        Ok(updated) => {
            if changed {
                events.warning(&updated, "FailedScheduling", message);
            }
            Ok(())
        }
        Err(ApiError::NotFound { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

impl Scheduler {
    /// One scheduling pass over every pending pod.
    pub async fn schedule_pending(&mut self) -> Result<(), ApiError> {
        let mut exclusions = Exclusions::default();
        let mut candidates: Vec<(Node, fit::NodeSummary)> = self
            .nodes
            .objects()
            .filter(|node| is_schedulable(node, &mut exclusions))
            .map(|node| (node.clone(), fit::NodeSummary::new(node)))
            .collect();
        candidates.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let total_nodes = self.nodes.objects().count();
        let index: HashMap<String, usize> =
            candidates.iter().enumerate().map(|(i, (_, s))| (s.name.clone(), i)).collect();
        for pod in self.pods.objects() {
            if !node_name(pod).is_empty()
                && !is_terminated(pod)
                && let Some(&i) = index.get(node_name(pod))
            {
                candidates[i].1.add(pod);
            }
        }
        let mut pending: Vec<Pod> =
            self.pods.objects().filter(|p| wants_scheduling(p)).cloned().collect();
        // Oldest first, so that a burst of pods is placed in the order it arrived.
        pending.sort_by(|a, b| {
            let key = |p: &Pod| {
                (
                    p.metadata.creation_timestamp.clone(),
                    p.metadata.namespace.clone(),
                    p.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });

        // Placements are decided one pod after the other against the running summaries (so a
        // burst spreads and never overcommits); the writes then go out concurrently.
        let mut placements: Vec<(String, String, String)> = Vec::new();
        let mut unschedulable: Vec<(Pod, String)> = Vec::new();
        for pod in &pending {
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let chosen = candidates
                .iter()
                .enumerate()
                .filter(|(_, (node, summary))| {
                    let misfits = fit::misfits(pod, node, summary);
                    for misfit in &misfits {
                        *reasons.entry(misfit.reason()).or_default() += 1;
                    }
                    misfits.is_empty()
                })
                .min_by_key(|(_, (_, summary))| fit::preference_key(pod, summary))
                .map(|(i, _)| i);
            match chosen {
                Some(i) => {
                    candidates[i].1.add(pod);
                    placements.push((
                        pod.metadata.namespace.clone().unwrap_or_default(),
                        pod.metadata.name.clone().unwrap_or_default(),
                        candidates[i].1.name.clone(),
                    ));
                }
                None => unschedulable
                    .push((pod.clone(), unschedulable_message(total_nodes, &exclusions, &reasons))),
            }
        }
        let binds = placements.into_iter().map(|(namespace, name, node)| {
            let registry = Arc::clone(&self.registry);
            let events = self.events.clone();
            async move {
                match bind_pod(&registry.pods, &namespace, &name, &node).await {
                    Ok(pod) => {
                        tracing::debug!(namespace, pod = name, node, "bound pod");
                        events.normal(
                            &pod,
                            "Scheduled",
                            format!("Successfully assigned {namespace}/{name} to {node}"),
                        );
                        Ok(())
                    }
                    // The cache was behind: the pod is already bound, or gone. The next pass,
                    // with fresh caches, counts it where it really is.
                    Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => Ok(()),
                    Err(error) => Err(error),
                }
            }
        });
        let marks = unschedulable.into_iter().map(|(pod, message)| {
            let registry = Arc::clone(&self.registry);
            let events = self.events.clone();
            async move { mark_unschedulable(&registry, &events, &pod, &message).await }
        });
        let mut first_error = None;
        let mut results = futures::stream::iter(binds)
            .buffer_unordered(CONCURRENT_WRITES)
            .chain(futures::stream::iter(marks).buffer_unordered(CONCURRENT_WRITES));
        while let Some(result) = results.next().await {
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Reconciler for Scheduler {
    fn name(&self) -> &'static str {
        "scheduler"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.nodes.resync().await?;
        self.pods.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        tokio::select! {
            changed = self.nodes.next_change() => changed,
            changed = self.pods.next_change() => changed,
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.nodes.drain_ready().await?;
        self.pods.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        self.schedule_pending().await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};

    use super::{Exclusions, is_schedulable, unschedulable_message};

    fn node(ready: &str, unschedulable: bool) -> Node {
        Node {
            spec: Some(NodeSpec { unschedulable: Some(unschedulable), ..NodeSpec::default() }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".to_owned(),
                    status: ready.to_owned(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn only_ready_schedulable_nodes_take_pods() {
        let mut exclusions = Exclusions::default();
        assert!(is_schedulable(&node("True", false), &mut exclusions));
        assert!(!is_schedulable(&node("False", false), &mut exclusions));
        assert!(!is_schedulable(&node("Unknown", false), &mut exclusions));
        // Cordoned nodes are left to the per-pod filter (pods may tolerate the cordon).
        assert!(is_schedulable(&node("True", true), &mut exclusions));
        assert!(!is_schedulable(&Node::default(), &mut exclusions));
        let mut deleting = node("True", false);
        deleting.metadata.deletion_timestamp = Some(crate::api::typed::current_time());
        assert!(!is_schedulable(&deleting, &mut exclusions));
        assert_eq!(exclusions, Exclusions { not_ready: 3, unschedulable: 1 });
        let misfits = BTreeMap::from([("Insufficient cpu".to_owned(), 2)]);
        assert_eq!(
            unschedulable_message(6, &exclusions, &misfits),
            "0/6 nodes are available: 3 node(s) were not ready, 1 node(s) were unschedulable, 2 Insufficient cpu."
        );
        assert_eq!(
            unschedulable_message(0, &Exclusions::default(), &BTreeMap::new()),
            "no nodes available to schedule pods"
        );
    }
}
