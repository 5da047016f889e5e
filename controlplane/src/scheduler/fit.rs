//! Where a pod may go and which node suits it best: the scheduler's filters and scores, pure
//! functions over the pod and a per-node summary of what is already placed there.
//!
//! Filters, as Kubernetes defines them: a cordoned node, unless the pod tolerates its
//! unschedulable taint; NoSchedule and NoExecute taints the pod does not tolerate; `nodeSelector` and required node affinity; CPU and memory requests against the
//! node's allocatable (never overcommitted); host ports already taken. Scores: fewer pods of
//! the same owner first (spread), then the least allocated node, then the fewest pods.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::{
    api::core::v1::{
        Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Taint, Toleration,
    },
    apimachinery::pkg::api::resource::Quantity,
};

use crate::api::kinds::node::TAINT_UNSCHEDULABLE;

/// CPU in millicores and memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_milli: u64,
    pub memory: u64,
}

impl Resources {
    fn plus(self, other: Self) -> Self {
        Self {
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            memory: self.memory.saturating_add(other.memory),
        }
    }
}

/// A Kubernetes quantity scaled by `scale` (1000 for millicores, 1 for bytes), rounded up.
pub fn parse_quantity(text: &str, scale: f64) -> Option<u64> {
    crate::api::quantity::scaled(text, scale)
}

fn resources_of(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let get = |name: &str, scale| {
        map.and_then(|m| m.get(name)).and_then(|q| parse_quantity(&q.0, scale)).unwrap_or(0)
    };
    Resources { cpu_milli: get("cpu", 1000.0), memory: get("memory", 1.0) }
}

/// What a pod asks for: the sum over its containers, or the largest init container if that is
/// more (init containers run one at a time, before the others).
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else { return Resources::default() };
    let requests = |c: &k8s_openapi::api::core::v1::Container| {
        resources_of(c.resources.as_ref().and_then(|r| r.requests.as_ref()))
    };
    let sum = spec.containers.iter().map(requests).fold(Resources::default(), Resources::plus);
    let init =
        spec.init_containers.iter().flatten().map(requests).fold(Resources::default(), |a, b| {
            Resources { cpu_milli: a.cpu_milli.max(b.cpu_milli), memory: a.memory.max(b.memory) }
        });
    Resources { cpu_milli: sum.cpu_milli.max(init.cpu_milli), memory: sum.memory.max(init.memory) }
}

/// The host ports a pod takes, as (protocol, port).
pub fn host_ports(pod: &Pod) -> Vec<(String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|port| *port > 0)?;
            Some((p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()), port))
        })
        .collect()
}

/// The controller that owns a pod (its ReplicaSet, …), for spreading.
pub fn owner_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// One node as the scheduler sees it during a pass: what it offers and what is placed there.
#[derive(Clone, Debug, Default)]
pub struct NodeSummary {
    pub name: String,
    pub allocatable: Resources,
    pub requested: Resources,
    pub pods: usize,
    pub host_ports: HashSet<(String, i32)>,
    /// Pods per owner uid.
    pub owners: BTreeMap<String, usize>,
}

impl NodeSummary {
    pub fn new(node: &Node) -> Self {
        let allocatable = resources_of(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            allocatable,
            ..Self::default()
        }
    }

    /// Counts a pod placed on this node.
    pub fn add(&mut self, pod: &Pod) {
        self.requested = self.requested.plus(pod_requests(pod));
        self.pods += 1;
        self.host_ports.extend(host_ports(pod));
        if let Some(owner) = owner_uid(pod) {
            *self.owners.entry(owner.to_owned()).or_default() += 1;
        }
    }
}

/// Why a node cannot take a pod, in the words of Kubernetes' Unschedulable messages.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misfit {
    /// Cordoned (`spec.unschedulable`), and the pod does not tolerate
    /// `node.kubernetes.io/unschedulable:NoSchedule`.
    Unschedulable,
    UntoleratedTaint(String),
    NodeAffinity,
    InsufficientCpu,
    InsufficientMemory,
    HostPorts,
}

impl Misfit {
    pub fn reason(&self) -> String {
        match self {
            Self::Unschedulable => "node(s) were unschedulable".to_owned(),
            Self::UntoleratedTaint(taint) => format!("node(s) had untolerated taint {{{taint}}}"),
            Self::NodeAffinity => "node(s) didn't match Pod's node affinity/selector".to_owned(),
            Self::InsufficientCpu => "Insufficient cpu".to_owned(),
            Self::InsufficientMemory => "Insufficient memory".to_owned(),
            Self::HostPorts => {
                "node(s) didn't have free ports for the requested pod ports".to_owned()
            }
        }
    }
}

/// Whether `toleration` tolerates `taint` (Kubernetes' `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        // An empty key with Exists tolerates every taint.
        "Exists" => toleration.key.as_deref().is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            toleration.key.as_deref() == Some(taint.key.as_str())
                && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// The first NoSchedule or NoExecute taint of `node` that `spec` does not tolerate.
fn untolerated_taint(node: &Node, spec: &PodSpec) -> Option<String> {
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref())?;
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
        .map(|taint| match taint.value.as_deref() {
            Some(value) if !value.is_empty() => format!("{}: {value}", taint.key),
            _ => taint.key.clone(),
        })
}

fn requirement_matches(requirement: &NodeSelectorRequirement, node: &Node) -> bool {
    let value = node.metadata.labels.as_ref().and_then(|l| l.get(&requirement.key));
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |text: &str| text.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(|v| number(v)), values.first().and_then(|v| number(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(|v| number(v)), values.first().and_then(|v| number(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    term.match_expressions.iter().flatten().all(|r| requirement_matches(r, node))
        && term.match_fields.iter().flatten().all(|r| {
            // The only field Kubernetes supports here is metadata.name.
            r.key == "metadata.name"
                && match r.operator.as_str() {
                    "In" => r.values.iter().flatten().any(|v| v == name),
                    "NotIn" => r.values.iter().flatten().all(|v| v != name),
                    _ => false,
                }
        })
}

/// `nodeSelector` (every label equal) and required node affinity (any term matches).
fn matches_node_selection(node: &Node, spec: &PodSpec) -> bool {
    let labels = node.metadata.labels.as_ref();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    let affinity_ok =
        required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)));
    selector_ok && affinity_ok
}

/// Why `node` cannot take `pod` given what is already placed there (`summary`); empty when
/// it fits.
pub fn misfits(pod: &Pod, node: &Node, summary: &NodeSummary) -> Vec<Misfit> {
    let Some(spec) = pod.spec.as_ref() else { return Vec::new() };
    // A cordoned node is left out for that reason alone, as Kubernetes' NodeUnschedulable
    // filter does before any other: its unschedulable taint is not counted a second time.
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        let cordon = Taint {
            key: TAINT_UNSCHEDULABLE.to_owned(),
            effect: "NoSchedule".to_owned(),
            ..Taint::default()
        };
        if !spec.tolerations.iter().flatten().any(|t| tolerates(t, &cordon)) {
            return vec![Misfit::Unschedulable];
        }
    }
    let mut misfits = Vec::new();
    if let Some(taint) = untolerated_taint(node, spec) {
        misfits.push(Misfit::UntoleratedTaint(taint));
    }
    if !matches_node_selection(node, spec) {
        misfits.push(Misfit::NodeAffinity);
    }
    let wanted = pod_requests(pod);
    if summary.requested.cpu_milli.saturating_add(wanted.cpu_milli) > summary.allocatable.cpu_milli
        && wanted.cpu_milli > 0
    {
        misfits.push(Misfit::InsufficientCpu);
    }
    if summary.requested.memory.saturating_add(wanted.memory) > summary.allocatable.memory
        && wanted.memory > 0
    {
        misfits.push(Misfit::InsufficientMemory);
    }
    if host_ports(pod).iter().any(|p| summary.host_ports.contains(p)) {
        misfits.push(Misfit::HostPorts);
    }
    misfits
}

/// Orders fitting nodes for `pod`: fewer pods of the same owner, then more room left after
/// placing it (the mean free share of CPU and memory), then fewer pods, then the name.
pub fn preference_key(pod: &Pod, summary: &NodeSummary) -> (usize, u64, usize, String) {
    let owner_pods = owner_uid(pod).and_then(|o| summary.owners.get(o)).copied().unwrap_or(0);
    let wanted = pod_requests(pod);
    let free_share = |allocatable: u64, used: u64| {
        (allocatable.saturating_sub(used) * 1000).checked_div(allocatable).unwrap_or(0)
    };
    let free =
        (free_share(summary.allocatable.cpu_milli, summary.requested.cpu_milli + wanted.cpu_milli)
            + free_share(summary.allocatable.memory, summary.requested.memory + wanted.memory))
            / 2;
    // Larger free share sorts first.
    (owner_pods, 1000 - free.min(1000), summary.pods, summary.name.clone())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::json;

    use super::{Misfit, NodeSummary, misfits, pod_requests, preference_key};

    fn node(name: &str, extra: serde_json::Value) -> Node {
        let mut value = json!({
            "metadata": {"name": name, "labels": {"zone": "a", "rank": "5"}},
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"}},
        });
        merge(&mut value, extra);
        serde_json::from_value(value).expect("a node")
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut value = json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]},
        });
        merge(&mut value, extra);
        serde_json::from_value(value).expect("a pod")
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(base), serde_json::Value::Object(extra)) => {
                for (key, value) in extra {
                    merge(base.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
            (base, extra) => *base = extra,
        }
    }

    #[test]
    fn requests_never_overcommit_a_node() {
        let n = node("n1", json!({}));
        let mut summary = NodeSummary::new(&n);
        let p = pod(json!({}));
        assert_eq!(pod_requests(&p).cpu_milli, 500);
        for _ in 0..4 {
            assert!(misfits(&p, &n, &summary).is_empty());
            summary.add(&p);
        }
        // 2 CPUs and 4 GiB are now fully requested.
        assert_eq!(
            misfits(&p, &n, &summary),
            [Misfit::InsufficientCpu, Misfit::InsufficientMemory]
        );
        let best_effort = pod(json!({"spec": {"containers": [{"name": "c"}]}}));
        assert!(misfits(&best_effort, &n, &summary).is_empty(), "no requests, no limit");
    }

    #[test]
    fn taints_need_tolerations() {
        let tainted = node(
            "n1",
            json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
        );
        let summary = NodeSummary::new(&tainted);
        assert_eq!(
            misfits(&pod(json!({})), &tainted, &summary),
            [Misfit::UntoleratedTaint("dedicated: db".into())]
        );
        let tolerant = pod(json!({"spec": {"tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}}));
        assert!(misfits(&tolerant, &tainted, &summary).is_empty());
        let wrong_value = pod(json!({"spec": {"tolerations": [
            {"key": "dedicated", "value": "web"}]}}));
        assert!(!misfits(&wrong_value, &tainted, &summary).is_empty());
        let everything = pod(json!({"spec": {"tolerations": [{"operator": "Exists"}]}}));
        assert!(misfits(&everything, &tainted, &summary).is_empty());
        let soft =
            node("n2", json!({"spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]}}));
        assert!(misfits(&pod(json!({})), &soft, &NodeSummary::new(&soft)).is_empty());
    }

    #[test]
    fn a_cordoned_node_takes_only_pods_that_tolerate_its_unschedulable_taint() {
        let cordoned = node(
            "n1",
            json!({"spec": {"unschedulable": true, "taints": [
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
        );
        let summary = NodeSummary::new(&cordoned);
        assert_eq!(misfits(&pod(json!({})), &cordoned, &summary), [Misfit::Unschedulable]);
        assert_eq!(Misfit::Unschedulable.reason(), "node(s) were unschedulable");
        let daemon = pod(json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}}));
        assert!(misfits(&daemon, &cordoned, &summary).is_empty());
    }

    #[test]
    fn node_selector_and_required_affinity_choose_nodes() {
        let n = node("n1", json!({}));
        let summary = NodeSummary::new(&n);
        let selected = pod(json!({"spec": {"nodeSelector": {"zone": "a"}}}));
        assert!(misfits(&selected, &n, &summary).is_empty());
        let elsewhere = pod(json!({"spec": {"nodeSelector": {"zone": "b"}}}));
        assert_eq!(misfits(&elsewhere, &n, &summary), [Misfit::NodeAffinity]);
        let affinity = |expression: serde_json::Value| {
            pod(json!({"spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [expression]}]}}}}}))
        };
        let fits = |p: &Pod| misfits(p, &n, &summary).is_empty();
        assert!(fits(&affinity(json!({"key": "zone", "operator": "In", "values": ["a", "b"]}))));
        assert!(!fits(&affinity(json!({"key": "zone", "operator": "NotIn", "values": ["a"]}))));
        assert!(fits(&affinity(json!({"key": "rank", "operator": "Gt", "values": ["3"]}))));
        assert!(!fits(&affinity(json!({"key": "rank", "operator": "Lt", "values": ["3"]}))));
        assert!(fits(&affinity(json!({"key": "gpu", "operator": "DoesNotExist"}))));
    }

    #[test]
    fn host_ports_are_taken_once_per_node() {
        let n = node("n1", json!({}));
        let mut summary = NodeSummary::new(&n);
        let with_port = pod(json!({"spec": {"containers": [
            {"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}));
        assert!(misfits(&with_port, &n, &summary).is_empty());
        summary.add(&with_port);
        assert_eq!(misfits(&with_port, &n, &summary), [Misfit::HostPorts]);
    }

    #[test]
    fn an_owners_pods_spread_then_the_least_allocated_node_wins() {
        let owned = pod(json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-1", "controller": true}]}}));
        let (a, b) = (node("a", json!({})), node("b", json!({})));
        let (mut on_a, mut on_b) = (NodeSummary::new(&a), NodeSummary::new(&b));
        on_a.add(&owned);
        // b is busier with other pods, but a already has one of this owner's.
        let other = pod(json!({}));
        on_b.add(&other);
        on_b.add(&other);
        assert!(preference_key(&owned, &on_b) < preference_key(&owned, &on_a));
        // Without an owner, the least allocated node wins.
        assert!(preference_key(&other, &on_a) < preference_key(&other, &on_b));
    }
}
