//! The pod CIDR reconciler: a node that registered while every block was taken gets one as
//! soon as one is free (a node was deleted), in a transaction that claims the block and
//! updates the node together.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Node;

use super::{ObjectCache, Reconciler};
use crate::api::{
    Registry,
    error::ApiError,
    kind::TxnExtras,
    kinds::node::{NodeStrategy, assign_pod_cidr, pod_cidr},
    typed::{UpdateMode, WriteOutcome},
};

pub struct PodCidrReconciler {
    registry: Arc<Registry>,
    nodes: ObjectCache<NodeStrategy>,
}

impl PodCidrReconciler {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { nodes: ObjectCache::new(Arc::clone(&registry.nodes)), registry }
    }
}

/// Gives `node` a free block if there is one. Returns whether it got one.
pub async fn reconcile_pod_cidr(registry: &Registry, node: &Node) -> Result<bool, ApiError> {
    let nodes = &registry.nodes;
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let allocator = nodes.strategy().pod_cidrs();
    let Some(claim) = allocator
        .plan(nodes.store().as_ref(), name)
        .await
        .map_err(ApiError::store("planning a pod CIDR"))?
    else {
        return Ok(false);
    };
    let mut assigned = node.clone();
    assign_pod_cidr(&mut assigned, claim.cidr);
    let extras = TxnExtras { compares: vec![claim.compare], ops: vec![claim.op] };
    match nodes.write_update(UpdateMode::Internal, node, assigned, extras, false).await? {
        WriteOutcome::Written(_) => {
            tracing::info!(node = name, cidr = %claim.cidr, "assigned a pod CIDR");
            Ok(true)
        }
        // The node changed or the block was taken meanwhile: the change wakes the next pass.
        WriteOutcome::Stale => Ok(false),
    }
}

#[async_trait]
impl Reconciler for PodCidrReconciler {
    fn name(&self) -> &'static str {
        "pod-cidr"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.nodes.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        self.nodes.next_change().await
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.nodes.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let waiting: Vec<Node> = self
            .nodes
            .objects()
            .filter(|n| pod_cidr(n).is_none() && n.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        for node in &waiting {
            if !reconcile_pod_cidr(&self.registry, node).await? {
                // No block for this node means none for the next ones either.
                break;
            }
        }
        Ok(())
    }
}
