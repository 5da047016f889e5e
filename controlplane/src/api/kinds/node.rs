//! Nodes: cluster-scoped; the node agent registers its node and writes its status. A node
//! receives its pod CIDR in the transaction that creates it, and gives it back in the one that
//! deletes it.

use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};
use serde_json::Value;

use crate::{
    api::{
        error::{ApiError, FieldError},
        kind::{DeletePlan, DeleteRequest, KindInfo, Strategy, TxnExtras},
        table::{self, Column},
        typed::current_time,
        validation::NameRule,
    },
    ipam::PodCidrAllocator,
    store::Store,
};

/// The condition a node carries while no pod CIDR could be given to it.
pub const NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
pub const NO_POD_CIDR_AVAILABLE: &str = "NoPodCIDRAvailable";

/// The taints the node lifecycle controller keeps in step with a node's state, as Kubernetes
/// names them: Ready=False, Ready=Unknown (NoSchedule and NoExecute each) and cordoned.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

const INFO: KindInfo = KindInfo::of::<Node>("node", false, &["no"], NameRule::Subdomain);

/// Where nodes live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// The store key of a node.
pub fn node_key(name: &str) -> String {
    INFO.key(None, name)
}

/// The node's pod CIDR, when it has a valid one.
pub fn pod_cidr(node: &Node) -> Option<IpNet> {
    node.spec.as_ref()?.pod_cidr.as_deref()?.parse().ok()
}

/// The first address of a type (`InternalIP`, `ExternalIP`).
pub fn address(node: &Node, kind: &str) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == kind)
        .map(|a| a.address.clone())
}

/// The status of a condition type (`"True"`, `"False"`, `"Unknown"`), if present.
pub fn condition_status<'a>(node: &'a Node, kind: &str) -> Option<&'a str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.as_str())
}

/// Gives `node` the pod CIDR `cidr` (in `spec.podCIDR` and `spec.podCIDRs`) and drops the
/// NetworkUnavailable condition that its absence put there.
pub fn assign_pod_cidr(node: &mut Node, cidr: IpNet) {
    let spec = node.spec.get_or_insert_with(NodeSpec::default);
    spec.pod_cidr = Some(cidr.to_string());
    spec.pod_cidrs = Some(vec![cidr.to_string()]);
    if let Some(conditions) = node.status.as_mut().and_then(|s| s.conditions.as_mut()) {
        conditions.retain(|c| {
            !(c.type_ == NETWORK_UNAVAILABLE && c.reason.as_deref() == Some(NO_POD_CIDR_AVAILABLE))
        });
    }
}

fn mark_without_pod_cidr(node: &mut Node, allocator: &PodCidrAllocator) {
    let status = node.status.get_or_insert_with(NodeStatus::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    conditions.retain(|c| c.type_ != NETWORK_UNAVAILABLE);
    let now = current_time();
    conditions.push(NodeCondition {
        type_: NETWORK_UNAVAILABLE.to_owned(),
        status: "True".to_owned(),
        reason: Some(NO_POD_CIDR_AVAILABLE.to_owned()),
        message: Some(format!(
            "every /{} block of the cluster CIDR {} is assigned to another node",
            allocator.node_prefix(),
            allocator.cluster_cidr()
        )),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    });
}

pub struct NodeStrategy {
    pod_cidrs: Arc<PodCidrAllocator>,
}

impl NodeStrategy {
    pub fn new(pod_cidrs: Arc<PodCidrAllocator>) -> Self {
        Self { pod_cidrs }
    }

    pub fn pod_cidrs(&self) -> &Arc<PodCidrAllocator> {
        &self.pod_cidrs
    }
}

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Status", "The status of the node"),
    Column::new("Roles", "The roles of the node"),
    Column::new("Age", "Time since the node was created"),
    Column::new("Version", "Kubelet (node agent) version reported by the node"),
    Column::new("Internal-IP", "The node's internal address").wide(),
    Column::new("External-IP", "The node's external address").wide(),
    Column::new("OS-Image", "The operating system image reported by the node").wide(),
    Column::new("Kernel-Version", "The kernel version reported by the node").wide(),
    Column::new("Container-Runtime", "The container runtime reported by the node").wide(),
];

const ROLE_LABEL_PREFIX: &str = "node-role.kubernetes.io/";
const LEGACY_ROLE_LABEL: &str = "kubernetes.io/role";

fn or_placeholder(value: Option<String>, placeholder: &str) -> Value {
    value.filter(|v| !v.is_empty()).unwrap_or_else(|| placeholder.to_owned()).into()
}

#[async_trait]
impl Strategy for NodeStrategy {
    type Object = Node;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_update(&self, new: &mut Node, old: &Node) {
        new.status = old.status.clone();
        // A client that sends the node without its pod CIDR does not mean to release it.
        let old_cidr = old.spec.as_ref().and_then(|s| s.pod_cidr.clone());
        let new_spec = new.spec.get_or_insert_with(NodeSpec::default);
        if new_spec.pod_cidr.as_deref().unwrap_or_default().is_empty() && old_cidr.is_some() {
            new_spec.pod_cidr = old_cidr;
            new_spec.pod_cidrs = old.spec.as_ref().and_then(|s| s.pod_cidrs.clone());
        }
    }

    fn prepare_for_status_update(&self, new: &mut Node, old: &Node) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, node: &Node) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let Some(spec) = &node.spec else {
            return errors;
        };
        if let Some(cidr) = spec.pod_cidr.as_deref().filter(|c| !c.is_empty()) {
            if cidr.parse::<IpNet>().is_err() {
                errors.push(FieldError::invalid("spec.podCIDR", cidr, "must be a valid CIDR"));
            }
            if let Some(cidrs) = &spec.pod_cidrs
                && cidrs.first().map(String::as_str) != Some(cidr)
            {
                errors.push(FieldError::invalid(
                    "spec.podCIDRs",
                    cidrs.join(","),
                    "the first entry must equal spec.podCIDR",
                ));
            }
        }
        for (index, taint) in spec.taints.iter().flatten().enumerate() {
            if taint.key.is_empty() {
                errors.push(FieldError::required(format!("spec.taints[{index}].key"), ""));
            }
            const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
            if !EFFECTS.contains(&taint.effect.as_str()) {
                errors.push(FieldError::not_supported(
                    format!("spec.taints[{index}].effect"),
                    taint.effect.as_str(),
                    &EFFECTS,
                ));
            }
        }
        errors
    }

    fn validate_update(&self, new: &Node, old: &Node) -> Vec<FieldError> {
        let old_cidr = old.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).unwrap_or_default();
        let new_cidr = new.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).unwrap_or_default();
        if !old_cidr.is_empty() && old_cidr != new_cidr {
            return vec![FieldError::forbidden(
                "spec.podCIDR",
                "node updates may not change podCIDR except from \"\" to valid",
            )];
        }
        if old_cidr.is_empty() && !new_cidr.is_empty() {
            return vec![FieldError::forbidden(
                "spec.podCIDR",
                "pod CIDRs are assigned by the controller, not by node updates",
            )];
        }
        Vec::new()
    }

    async fn before_create(
        &self,
        store: &dyn Store,
        node: &mut Node,
    ) -> Result<TxnExtras, ApiError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let requested =
            node.spec.as_ref().and_then(|s| s.pod_cidr.clone()).filter(|c| !c.is_empty());
        let invalid = |value: &str, detail: String| ApiError::Invalid {
            kind: INFO.kind.to_owned(),
            name: name.clone(),
            causes: vec![FieldError::invalid("spec.podCIDR", value, detail)],
        };
        let claim = match requested {
            Some(text) => {
                let cidr: IpNet =
                    text.parse().map_err(|_| invalid(&text, "must be a valid CIDR".to_owned()))?;
                self.pod_cidrs.check_block(&cidr).map_err(|why| invalid(&text, why))?;
                let allocations = self
                    .pod_cidrs
                    .allocations(store)
                    .await
                    .map_err(ApiError::store("reading pod CIDR allocations"))?;
                if let Some((_, owner)) = allocations.iter().find(|(block, _)| *block == cidr) {
                    return Err(invalid(&text, format!("already assigned to node {owner}")));
                }
                Some(self.pod_cidrs.claim(cidr, &name))
            }
            None => self
                .pod_cidrs
                .plan(store, &name)
                .await
                .map_err(ApiError::store("planning a pod CIDR"))?,
        };
        match claim {
            Some(claim) => {
                assign_pod_cidr(node, claim.cidr);
                Ok(TxnExtras { compares: vec![claim.compare], ops: vec![claim.op] })
            }
            None => {
                mark_without_pod_cidr(node, &self.pod_cidrs);
                Ok(TxnExtras::default())
            }
        }
    }

    async fn plan_delete(
        &self,
        store: &dyn Store,
        node: &Node,
        _request: &DeleteRequest,
    ) -> Result<DeletePlan<Node>, ApiError> {
        let mut extras = TxnExtras::default();
        if let Some(cidr) = pod_cidr(node) {
            let name = node.metadata.name.clone().unwrap_or_default();
            let release = self
                .pod_cidrs
                .plan_release(store, &cidr, &name)
                .await
                .map_err(ApiError::store("planning the release of a pod CIDR"))?;
            if let Some((compare, op)) = release {
                extras.compares.push(compare);
                extras.ops.push(op);
            }
        }
        Ok(DeletePlan::Remove(extras))
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, node: &Node) -> Vec<Value> {
        let mut status = match condition_status(node, "Ready") {
            Some("True") => "Ready",
            Some("False") => "NotReady",
            _ => "Unknown",
        }
        .to_owned();
        if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            status.push_str(",SchedulingDisabled");
        }
        let mut roles: Vec<String> = Vec::new();
        for (key, value) in node.metadata.labels.iter().flatten() {
            if let Some(role) = key.strip_prefix(ROLE_LABEL_PREFIX).filter(|r| !r.is_empty()) {
                roles.push(role.to_owned());
            } else if key == LEGACY_ROLE_LABEL && !value.is_empty() {
                roles.push(value.clone());
            }
        }
        roles.sort();
        roles.dedup();
        let info = node.status.as_ref().and_then(|s| s.node_info.clone()).unwrap_or_default();
        vec![
            node.metadata.name.clone().unwrap_or_default().into(),
            status.into(),
            or_placeholder(Some(roles.join(",")), "<none>"),
            table::age(node.metadata.creation_timestamp.as_ref()).into(),
            info.kubelet_version.into(),
            or_placeholder(address(node, "InternalIP"), "<none>"),
            or_placeholder(address(node, "ExternalIP"), "<none>"),
            or_placeholder(Some(info.os_image), "<unknown>"),
            or_placeholder(Some(info.kernel_version), "<unknown>"),
            or_placeholder(Some(info.container_runtime_version), "<unknown>"),
        ]
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["spec.unschedulable"]
    }

    fn field_value(&self, node: &Node, field: &str) -> String {
        match field {
            "spec.unschedulable" => {
                node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false).to_string()
            }
            _ => String::new(),
        }
    }
}
