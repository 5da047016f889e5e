//! The first scheduler: every pending pod (no node, not being deleted, for the default
//! scheduler) is bound to the Ready, schedulable node that runs the fewest non-terminated pods
//! (ties go to the first name). It is level-triggered: each pass looks at every pending pod, so
//! a pod that found no node is retried whenever nodes or pods change. Pods created with a node
//! are never moved. Binding goes through the same code path as the `binding` subresource.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
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
};

/// The reason of `PodScheduled=False` when no node fits, as Kubernetes names it.
pub const UNSCHEDULABLE: &str = "Unschedulable";

/// Why nodes cannot take pods right now, for the Unschedulable message.
#[derive(Debug, Default, PartialEq, Eq)]
struct Exclusions {
    not_ready: usize,
    unschedulable: usize,
}

fn is_schedulable(node: &Node, exclusions: &mut Exclusions) -> bool {
    if node.metadata.deletion_timestamp.is_some()
        || node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
    {
        exclusions.unschedulable += 1;
        return false;
    }
    if condition_status(node, "Ready") != Some("True") {
        exclusions.not_ready += 1;
        return false;
    }
    true
}

/// The message of an Unschedulable condition (Kubernetes' `0/N nodes are available: …`).
fn unschedulable_message(total: usize, exclusions: &Exclusions) -> String {
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
    format!("0/{total} nodes are available: {}.", reasons.join(", "))
}

/// Picks the node with the fewest pods, ties by name. `load` counts pods per node.
fn pick_node<'a>(candidates: &'a [String], load: &HashMap<String, usize>) -> Option<&'a str> {
    candidates
        .iter()
        .min_by_key(|name| (load.get(name.as_str()).copied().unwrap_or(0), name.as_str()))
        .map(String::as_str)
}

fn wants_scheduling(pod: &Pod) -> bool {
    let scheduler =
        pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()).unwrap_or(DEFAULT_SCHEDULER);
    node_name(pod).is_empty()
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminated(pod)
        && scheduler == DEFAULT_SCHEDULER
}

pub struct Scheduler {
    registry: Arc<Registry>,
    pods: ObjectCache<PodStrategy>,
    nodes: ObjectCache<NodeStrategy>,
}

impl Scheduler {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            nodes: ObjectCache::new(Arc::clone(&registry.nodes)),
            registry,
        }
    }
}

/// Records on the pod why it stays pending (written only when the reason changes).
async fn mark_unschedulable(registry: &Registry, pod: &Pod, message: &str) -> Result<(), ApiError> {
    let namespace = pod.metadata.namespace.as_deref();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let result = registry
        .pods
        .update(namespace, name, UpdateMode::Status, false, |current| {
            let mut updated = current.clone();
            if wants_scheduling(current) {
                set_condition(
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
        Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

impl Scheduler {
    /// One scheduling pass over every pending pod.
    pub async fn schedule_pending(&mut self) -> Result<(), ApiError> {
        let mut exclusions = Exclusions::default();
        let mut candidates: Vec<String> = self
            .nodes
            .objects()
            .filter(|node| is_schedulable(node, &mut exclusions))
            .filter_map(|node| node.metadata.name.clone())
            .collect();
        candidates.sort();
        let total_nodes = self.nodes.objects().count();

        let mut load: HashMap<String, usize> = HashMap::new();
        for pod in self.pods.objects() {
            if !node_name(pod).is_empty() && !is_terminated(pod) {
                *load.entry(node_name(pod).to_owned()).or_default() += 1;
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

        let mut first_error = None;
        for pod in &pending {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let Some(node) = pick_node(&candidates, &load) else {
                let message = unschedulable_message(total_nodes, &exclusions);
                if let Err(error) = mark_unschedulable(&self.registry, pod, &message).await {
                    first_error.get_or_insert(error);
                }
                continue;
            };
            match bind_pod(&self.registry.pods, namespace, name, node).await {
                Ok(_) => {
                    tracing::info!(namespace, pod = name, node, "bound pod");
                    *load.entry(node.to_owned()).or_default() += 1;
                }
                // The cache was behind: the pod is already bound, or gone.
                Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
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
    use std::collections::HashMap;

    use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};

    use super::{Exclusions, is_schedulable, pick_node, unschedulable_message};

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
        assert!(!is_schedulable(&node("True", true), &mut exclusions));
        assert!(!is_schedulable(&Node::default(), &mut exclusions));
        assert_eq!(exclusions, Exclusions { not_ready: 3, unschedulable: 1 });
        assert_eq!(
            unschedulable_message(4, &exclusions),
            "0/4 nodes are available: 3 node(s) were not ready, 1 node(s) were unschedulable."
        );
        assert_eq!(
            unschedulable_message(0, &Exclusions::default()),
            "no nodes available to schedule pods"
        );
    }

    #[test]
    fn least_loaded_node_wins_and_ties_go_to_the_first_name() {
        let candidates = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let mut load = HashMap::new();
        assert_eq!(pick_node(&candidates, &load), Some("a"));
        load.insert("a".to_owned(), 2);
        load.insert("b".to_owned(), 1);
        load.insert("c".to_owned(), 1);
        assert_eq!(pick_node(&candidates, &load), Some("b"));
        assert_eq!(pick_node(&[], &load), None);
    }
}
