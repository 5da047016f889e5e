//! The node lifecycle controller: it watches every node's heartbeat (its Lease in
//! `kube-node-lease`, and its Ready condition's heartbeat) and keeps the cluster's view of the
//! node true.
//!
//! - A node whose heartbeat this controller has not seen change for the grace period
//!   (Kubernetes' `--node-monitor-grace-period`, 40 s) gets `Ready=Unknown` with reason
//!   `NodeStatusUnknown`. Time is measured on this controller's own clock from when it saw the
//!   heartbeat change, never from the agent's timestamps, so clock skew cannot age a node;
//!   after a restart (or a leader change) every node gets a fresh grace period.
//! - Taints follow the Ready condition (`node.kubernetes.io/unreachable` for Unknown,
//!   `node.kubernetes.io/not-ready` for False, each NoSchedule and NoExecute) and the cordon
//!   (`node.kubernetes.io/unschedulable:NoSchedule`); they go when the node is back.
//! - When a node stops being Ready its pods get `Ready=False` (once per episode: a live agent
//!   may set it back), so their endpoints leave every service.
//! - Pods on a node with NoExecute taints are evicted (deleted) when their toleration of those
//!   taints runs out: at once without a toleration, after `tolerationSeconds` (counted from
//!   when the taint was added, or the pod was bound if later), never with an unbounded one.
//! - A pod being deleted on an unreachable (or vanished) node cannot be stopped by its agent:
//!   once its grace period is over it is removed, as Kubernetes' pod garbage collector does, so
//!   its owner's replacement is not waiting for a pod that will never report.
//!
//! The controller wakes on changes and at the next deadline (a heartbeat running out, an
//! eviction falling due). A lease renewal only refreshes the node's heartbeat: the pods are
//! looked at when nodes or pods changed or a deadline passed.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodCondition, Taint},
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};
use tokio::time::Instant;

use super::{ObjectCache, Reconciler};
use crate::{
    api::{
        Registry,
        error::ApiError,
        kind::DeleteRequest,
        kinds::{
            lease::{LeaseStrategy, node_lease_key},
            node::{
                NodeStrategy, TAINT_NOT_READY, TAINT_UNREACHABLE, TAINT_UNSCHEDULABLE, node_key,
            },
            pod::{POD_SCHEDULED, PodStrategy, is_terminated, node_name, set_condition},
        },
        typed::{UpdateMode, current_time, now_timestamp},
    },
    events::EventRecorder,
    scheduler::fit::tolerates,
};

/// The reason of `Ready=Unknown` on a node whose heartbeat lapsed, as Kubernetes names it.
pub const NODE_STATUS_UNKNOWN: &str = "NodeStatusUnknown";
/// The reason when the node never reported a Ready condition at all.
pub const NODE_STATUS_NEVER_UPDATED: &str = "NodeStatusNeverUpdated";

/// How often the pods are looked at even when nothing changed (a missed write is retried).
const POD_PASS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct NodeLifecycleConfig {
    /// How long a node's heartbeat may stay unchanged before the node is Unknown.
    pub grace_period: Duration,
}

impl Default for NodeLifecycleConfig {
    fn default() -> Self {
        Self { grace_period: Duration::from_secs(40) }
    }
}

/// The heartbeat of a node as last seen (its lease's renewTime and its Ready condition, whose
/// heartbeat time the agent refreshes with every status write), and when this controller saw
/// either change.
#[derive(Debug)]
struct NodeHealth {
    lease_renewed: Option<MicroTime>,
    ready: Option<NodeCondition>,
    changed_at: Instant,
}

pub struct NodeLifecycleController {
    registry: Arc<Registry>,
    events: EventRecorder,
    config: NodeLifecycleConfig,
    nodes: ObjectCache<NodeStrategy>,
    leases: ObjectCache<LeaseStrategy>,
    pods: ObjectCache<PodStrategy>,
    health: HashMap<String, NodeHealth>,
    /// Nodes whose pods were marked not ready since the node was last Ready.
    pods_marked: HashSet<String>,
    /// The cache revisions the last pod pass saw, and when it ran.
    pod_pass: Option<(u64, u64, Instant)>,
    /// The earliest time something falls due: a heartbeat lapsing, an eviction, a removal.
    node_deadline: Option<Instant>,
    pod_deadline: Option<Instant>,
}

impl NodeLifecycleController {
    pub fn new(registry: Arc<Registry>, config: NodeLifecycleConfig) -> Self {
        Self {
            events: EventRecorder::spawn(Arc::clone(&registry.events), "node-controller"),
            nodes: ObjectCache::new(Arc::clone(&registry.nodes)),
            leases: ObjectCache::new(Arc::clone(&registry.leases)),
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            registry,
            config,
            health: HashMap::new(),
            pods_marked: HashSet::new(),
            pod_pass: None,
            node_deadline: None,
            pod_deadline: None,
        }
    }
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")
}

/// `Ready` as the taints see it: `True`, `False` or `Unknown` (also when absent).
fn ready_status(node: &Node) -> &str {
    match ready_condition(node).map(|c| c.status.as_str()) {
        Some(status @ ("True" | "False")) => status,
        _ => "Unknown",
    }
}

/// Marks a node whose heartbeat lapsed: `Ready=Unknown`, keeping the last heartbeat time.
fn mark_unknown(node: &mut Node, now: &Time) {
    let conditions =
        node.status.get_or_insert_with(NodeStatus::default).conditions.get_or_insert_with(Vec::new);
    match conditions.iter_mut().find(|c| c.type_ == "Ready") {
        Some(ready) if ready.status == "Unknown" => {}
        Some(ready) => {
            ready.status = "Unknown".to_owned();
            ready.reason = Some(NODE_STATUS_UNKNOWN.to_owned());
            ready.message = Some("the node agent stopped renewing its lease".to_owned());
            ready.last_transition_time = Some(now.clone());
        }
        None => conditions.push(NodeCondition {
            type_: "Ready".to_owned(),
            status: "Unknown".to_owned(),
            reason: Some(NODE_STATUS_NEVER_UPDATED.to_owned()),
            message: Some("the node agent never reported the node's status".to_owned()),
            last_heartbeat_time: None,
            last_transition_time: Some(now.clone()),
        }),
    }
}

/// The taints this controller owns, as the node's state calls for them.
fn wanted_taints(node: &Node) -> Vec<(&'static str, &'static str)> {
    let mut taints = Vec::new();
    match ready_status(node) {
        "True" => {}
        "False" => taints.extend([(TAINT_NOT_READY, "NoSchedule"), (TAINT_NOT_READY, "NoExecute")]),
        _ => taints.extend([(TAINT_UNREACHABLE, "NoSchedule"), (TAINT_UNREACHABLE, "NoExecute")]),
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        taints.push((TAINT_UNSCHEDULABLE, "NoSchedule"));
    }
    taints
}

/// Puts the node's taints in step with its state: the controller's taints that are wanted are
/// kept (with their `timeAdded`) or added (NoExecute ones stamped `now`), the others removed;
/// everyone else's taints are left alone.
fn converge_taints(node: &mut Node, now: &Time) {
    let wanted = wanted_taints(node);
    let owned = [TAINT_NOT_READY, TAINT_UNREACHABLE, TAINT_UNSCHEDULABLE];
    let spec = node.spec.get_or_insert_with(NodeSpec::default);
    let mut taints = spec.taints.take().unwrap_or_default();
    taints.retain(|t| {
        !owned.contains(&t.key.as_str())
            || wanted.iter().any(|(key, effect)| t.key == *key && t.effect == *effect)
    });
    for (key, effect) in wanted {
        if !taints.iter().any(|t| t.key == key && t.effect == effect) {
            taints.push(Taint {
                key: key.to_owned(),
                effect: effect.to_owned(),
                time_added: (effect == "NoExecute").then(|| now.clone()),
                value: None,
            });
        }
    }
    spec.taints = (!taints.is_empty()).then_some(taints);
}

/// When a pod on a node with these NoExecute taints is to be evicted.
#[derive(Debug, PartialEq, Eq)]
enum Eviction {
    Now,
    At(Timestamp),
    Never,
}

fn pod_bound_at(pod: &Pod) -> Option<Timestamp> {
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == POD_SCHEDULED))
        .and_then(|c| c.last_transition_time.as_ref());
    scheduled.or(pod.metadata.creation_timestamp.as_ref()).map(|t| t.0)
}

/// The taint manager's rule: a NoExecute taint the pod does not tolerate evicts it at once;
/// otherwise the shortest `tolerationSeconds` of the tolerations in use decides, counted from
/// when the taint was added (or the pod bound, if later); tolerations without seconds
/// tolerate forever.
fn eviction(pod: &Pod, taints: &[&Taint]) -> Eviction {
    let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_deref()).unwrap_or_default();
    let mut due: Option<Timestamp> = None;
    for taint in taints {
        let matching: Vec<_> = tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return Eviction::Now;
        }
        let Some(seconds) = matching.iter().filter_map(|t| t.toleration_seconds).min() else {
            continue;
        };
        let since = [taint.time_added.as_ref().map(|t| t.0), pod_bound_at(pod)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_else(now_timestamp);
        let at = since.saturating_add(SignedDuration::from_secs(seconds.max(0))).unwrap_or(since);
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    due.map_or(Eviction::Never, Eviction::At)
}

/// The monotonic instant of a wall-clock time (now, when it is past).
fn instant_of(at: Timestamp) -> Instant {
    let ahead = at.duration_since(now_timestamp());
    Instant::now() + Duration::try_from(ahead).unwrap_or(Duration::ZERO)
}

fn earliest(current: &mut Option<Instant>, candidate: Instant) {
    *current = Some(current.map_or(candidate, |c| c.min(candidate)));
}

fn pod_key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

impl NodeLifecycleController {
    /// Refreshes every node's heartbeat, marks lapsed nodes Unknown and converges the taints.
    /// Returns whether any node was written.
    async fn reconcile_nodes(&mut self) -> Result<bool, ApiError> {
        let now = Instant::now();
        let grace = self.config.grace_period;
        let mut wrote = false;
        let mut first_error = None;
        let mut deadline = None;
        let nodes: Vec<Node> = self.nodes.objects().cloned().collect();
        let names: HashSet<&str> =
            nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
        self.health.retain(|name, _| names.contains(name.as_str()));
        for node in &nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let lease_renewed = self
                .leases
                .get(&node_lease_key(&name))
                .and_then(|l| l.spec.as_ref()?.renew_time.clone());
            let ready = ready_condition(node).cloned();
            let health = self.health.entry(name.clone()).or_insert_with(|| NodeHealth {
                lease_renewed: lease_renewed.clone(),
                ready: ready.clone(),
                changed_at: now,
            });
            if health.lease_renewed != lease_renewed || health.ready != ready {
                health.lease_renewed = lease_renewed;
                health.ready = ready.clone();
                health.changed_at = now;
            }
            let lapsed = now.duration_since(health.changed_at) >= grace;
            if !lapsed {
                earliest(&mut deadline, health.changed_at + grace);
            }
            if node.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let wall_now = current_time();
            let converge = |current: &Node| {
                let mut updated = current.clone();
                // Only a node whose Ready condition is still the one judged lapsed is marked:
                // a status the agent wrote meanwhile wins.
                if lapsed && ready_condition(current) == ready.as_ref() {
                    mark_unknown(&mut updated, &wall_now);
                }
                converge_taints(&mut updated, &wall_now);
                updated
            };
            if converge(node) == *node {
                continue;
            }
            let written = self
                .registry
                .nodes
                .update(None, &name, UpdateMode::Internal, false, |current| Ok(converge(current)))
                .await;
            match written {
                Ok(updated) => {
                    wrote = true;
                    if ready_status(&updated) != ready_status(node) {
                        tracing::info!(
                            node = name,
                            ready = ready_status(&updated),
                            "node readiness changed; taints follow"
                        );
                    }
                    // Kubernetes' node controller reports the change of the Ready condition
                    // it saw, whoever made it.
                    let (before, after) = (ready_status(node), ready_status(&updated));
                    if before != after && (before == "True" || after == "True") {
                        let reason = if after == "True" { "NodeReady" } else { "NodeNotReady" };
                        self.events.normal(
                            &updated,
                            reason,
                            format!("Node {name} status is now: {reason}"),
                        );
                    }
                    self.nodes.record_write(updated);
                }
                Err(ApiError::NotFound { .. }) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        self.node_deadline = deadline;
        first_error.map_or(Ok(wrote), Err)
    }

    /// Marks the pods of not-ready nodes not ready, evicts pods whose toleration ran out, and
    /// removes pods whose deletion no agent will ever finish.
    async fn reconcile_pods(&mut self) -> Result<(), ApiError> {
        let wall_now = now_timestamp();
        let mut deadline = None;
        let mut mark = Vec::new();
        let mut evict = Vec::new();
        let mut remove = Vec::new();
        let mut marked_nodes = HashSet::new();
        let not_ready: HashSet<String> = self
            .nodes
            .objects()
            .filter(|n| ready_status(n) != "True")
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        self.pods_marked.retain(|name| not_ready.contains(name));
        for pod in self.pods.objects() {
            let node_name = node_name(pod);
            if node_name.is_empty() || is_terminated(pod) {
                continue;
            }
            let node = self.nodes.get(&node_key(node_name));
            let unreachable = node.is_none_or(|n| ready_status(n) == "Unknown");
            if let Some(deleting) = &pod.metadata.deletion_timestamp {
                if unreachable {
                    if deleting.0 <= wall_now {
                        remove.push(pod.clone());
                    } else {
                        earliest(&mut deadline, instant_of(deleting.0));
                    }
                }
                continue;
            }
            let Some(node) = node else { continue };
            if not_ready.contains(node_name) && !self.pods_marked.contains(node_name) {
                marked_nodes.insert(node_name.to_owned());
                let ready =
                    pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                        c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                if ready {
                    mark.push(pod_key(pod));
                }
            }
            let no_execute: Vec<&Taint> = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .filter(|t| t.effect == "NoExecute")
                .collect();
            if no_execute.is_empty() {
                continue;
            }
            match eviction(pod, &no_execute) {
                Eviction::Now => evict.push(pod_key(pod)),
                Eviction::At(at) if at <= wall_now => evict.push(pod_key(pod)),
                Eviction::At(at) => earliest(&mut deadline, instant_of(at)),
                Eviction::Never => {}
            }
        }
        self.pod_deadline = deadline;

        let mut first_error = None;
        let mut failed_nodes = HashSet::new();
        for (namespace, name) in mark {
            let written = self
                .registry
                .pods
                .update(Some(&namespace), &name, UpdateMode::Status, false, |current| {
                    let mut updated = current.clone();
                    let ready = current
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                        .cloned();
                    if let Some(ready) = ready.filter(|c| c.status == "True") {
                        set_condition(
                            &mut updated,
                            PodCondition {
                                status: "False".to_owned(),
                                last_transition_time: Some(current_time()),
                                ..ready
                            },
                        );
                    }
                    Ok(updated)
                })
                .await;
            match written {
                Ok(pod) => {
                    tracing::info!(
                        namespace,
                        pod = name,
                        node = node_name(&pod),
                        "marked the pod of a not-ready node not ready"
                    );
                    self.events.warning(&pod, "NodeNotReady", "Node is not ready");
                }
                Err(ApiError::NotFound { .. }) => {}
                Err(error) => {
                    if let Some(pod) = self
                        .pods
                        .objects()
                        .find(|p| pod_key(p) == (namespace.clone(), name.clone()))
                    {
                        failed_nodes.insert(node_name(pod).to_owned());
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        self.pods_marked.extend(marked_nodes.into_iter().filter(|n| !failed_nodes.contains(n)));
        for (namespace, name) in evict {
            match self
                .registry
                .pods
                .delete(Some(&namespace), &name, &DeleteRequest::default(), false)
                .await
            {
                Ok(pod) => {
                    tracing::info!(namespace, pod = name, "evicted a pod from a tainted node");
                    self.events.normal(
                        &pod,
                        "TaintManagerEviction",
                        format!("Marking for deletion Pod {namespace}/{name}"),
                    );
                }
                Err(ApiError::NotFound { .. }) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        for pod in remove {
            let (namespace, name) = pod_key(&pod);
            let request = DeleteRequest {
                grace_period_seconds: Some(0),
                precondition_uid: pod.metadata.uid.clone(),
                ..DeleteRequest::default()
            };
            match self.registry.pods.delete(Some(&namespace), &name, &request, false).await {
                Ok(_) => tracing::info!(
                    namespace,
                    pod = name,
                    node = node_name(&pod),
                    "removed a pod whose node cannot finish its deletion"
                ),
                Err(ApiError::NotFound { .. } | ApiError::Conflict { .. }) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn wake_at(&self) -> Option<Instant> {
        [self.node_deadline, self.pod_deadline].into_iter().flatten().min()
    }
}

#[async_trait]
impl Reconciler for NodeLifecycleController {
    fn name(&self) -> &'static str {
        "node-lifecycle"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.nodes.resync().await?;
        self.leases.resync().await?;
        self.pods.resync().await?;
        self.pod_pass = None;
        Ok(())
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        let wake = self.wake_at();
        let timer = async move {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.nodes.next_change() => changed,
            changed = self.leases.next_change() => changed,
            changed = self.pods.next_change() => changed,
            () = timer => Ok(()),
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.nodes.drain_ready().await?;
        self.leases.drain_ready().await?;
        self.pods.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let wrote = self.reconcile_nodes().await?;
        let now = Instant::now();
        let revisions = (self.nodes.revision(), self.pods.revision());
        let pods_due = wrote
            || self.pod_deadline.is_some_and(|at| at <= now)
            || self.pod_pass.is_none_or(|(nodes, pods, at)| {
                (nodes, pods) != revisions || now.duration_since(at) >= POD_PASS_INTERVAL
            });
        if pods_due {
            self.reconcile_pods().await?;
            self.pod_pass = Some((self.nodes.revision(), self.pods.revision(), Instant::now()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Node, Pod, Taint},
        apimachinery::pkg::apis::meta::v1::Time,
        jiff::Timestamp,
    };
    use serde_json::json;

    use super::{Eviction, converge_taints, eviction, mark_unknown, ready_status};

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).expect("a node")
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("a timestamp")
    }

    fn taint_keys(node: &Node) -> Vec<(String, String, bool)> {
        node.spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t.key, t.effect, t.time_added.is_some()))
            .collect()
    }

    #[test]
    fn taints_follow_readiness_and_the_cordon_and_leave_other_taints_alone() {
        let now = Time(at("2026-01-01T00:00:00Z"));
        let mut n = node(json!({
            "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }));
        converge_taints(&mut n, &now);
        assert_eq!(taint_keys(&n), [("dedicated".into(), "NoSchedule".into(), false)]);

        mark_unknown(&mut n, &now);
        assert_eq!(ready_status(&n), "Unknown");
        let ready = &n.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
        assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
        converge_taints(&mut n, &now);
        assert_eq!(
            taint_keys(&n),
            [
                ("dedicated".into(), "NoSchedule".into(), false),
                ("node.kubernetes.io/unreachable".into(), "NoSchedule".into(), false),
                ("node.kubernetes.io/unreachable".into(), "NoExecute".into(), true),
            ]
        );
        // Converging again keeps the NoExecute taint's timeAdded.
        let later = Time(at("2026-01-01T00:05:00Z"));
        let before = n.clone();
        converge_taints(&mut n, &later);
        assert_eq!(n, before, "idempotent");

        // The agent reports NotReady: unreachable gives way to not-ready; cordoned adds its own.
        n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        n.spec.as_mut().unwrap().unschedulable = Some(true);
        converge_taints(&mut n, &later);
        assert_eq!(
            taint_keys(&n),
            [
                ("dedicated".into(), "NoSchedule".into(), false),
                ("node.kubernetes.io/not-ready".into(), "NoSchedule".into(), false),
                ("node.kubernetes.io/not-ready".into(), "NoExecute".into(), true),
                ("node.kubernetes.io/unschedulable".into(), "NoSchedule".into(), false),
            ]
        );
        // Back to Ready and uncordoned: only the user's taint remains.
        n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".into();
        n.spec.as_mut().unwrap().unschedulable = Some(false);
        converge_taints(&mut n, &later);
        assert_eq!(taint_keys(&n), [("dedicated".into(), "NoSchedule".into(), false)]);
    }

    #[test]
    fn a_node_that_never_reported_is_unknown_for_that_reason() {
        let mut n = Node::default();
        mark_unknown(&mut n, &Time(at("2026-01-01T00:00:00Z")));
        let ready = &n.status.unwrap().conditions.unwrap()[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("Unknown", Some("NodeStatusNeverUpdated"))
        );
    }

    #[test]
    fn eviction_waits_for_the_shortest_toleration_counted_from_the_taint_or_the_binding() {
        let taint: Taint = serde_json::from_value(json!({
            "key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
            "timeAdded": "2026-01-01T00:00:00Z",
        }))
        .unwrap();
        let pod = |tolerations: serde_json::Value, scheduled: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"creationTimestamp": "2025-12-31T00:00:00Z"},
                "spec": {"containers": [], "tolerations": tolerations},
                "status": {"conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}]},
            }))
            .unwrap()
        };
        let old = "2025-12-31T00:00:00Z";
        assert_eq!(eviction(&pod(json!([]), old), &[&taint]), Eviction::Now);
        let defaulted = json!([
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        ]);
        assert_eq!(
            eviction(&pod(defaulted.clone(), old), &[&taint]),
            Eviction::At(at("2026-01-01T00:00:30Z")),
            "the shortest toleration, from when the taint was added"
        );
        assert_eq!(
            eviction(&pod(defaulted, "2026-01-01T00:01:00Z"), &[&taint]),
            Eviction::At(at("2026-01-01T00:01:30Z")),
            "a pod bound after the taint gets its whole toleration"
        );
        let forever = json!([{"operator": "Exists"}]);
        assert_eq!(eviction(&pod(forever, old), &[&taint]), Eviction::Never);
    }
}
