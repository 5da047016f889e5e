//! The namespace controller: a Terminating namespace has its pods deleted (through the
//! graceful path, so running pods are stopped by their node agents first), its replica sets,
//! services and endpoint slices deleted (releasing their cluster IPs), and is removed once
//! nothing is left in it.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Namespace;

use super::{ObjectCache, Reconciler};
use crate::api::{
    Registry,
    error::ApiError,
    kind::DeleteRequest,
    kinds::{
        namespace::{NamespaceStrategy, is_terminating},
        pod::PodStrategy,
    },
    typed::ListFilter,
};

pub struct NamespaceController {
    registry: Arc<Registry>,
    namespaces: ObjectCache<NamespaceStrategy>,
    pods: ObjectCache<PodStrategy>,
}

impl NamespaceController {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            namespaces: ObjectCache::new(Arc::clone(&registry.namespaces)),
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            registry,
        }
    }
}

/// Deletes what is left in one terminating namespace; removes the namespace once empty.
pub async fn reconcile_terminating(
    registry: &Registry,
    namespace: &Namespace,
) -> Result<(), ApiError> {
    let name = namespace.metadata.name.as_deref().unwrap_or_default();
    // Read the pods from the store rather than the cache: removing the namespace on a
    // cache that lags behind a pod creation would orphan that pod.
    let (pods, _) = registry.pods.list(Some(name), &ListFilter::default()).await?;
    let (services, _) = registry.services.list(Some(name), &ListFilter::default()).await?;
    let (slices, _) = registry.endpoint_slices.list(Some(name), &ListFilter::default()).await?;
    let (sets, _) = registry.replica_sets.list(Some(name), &ListFilter::default()).await?;
    if pods.is_empty() && services.is_empty() && slices.is_empty() && sets.is_empty() {
        if registry.namespaces.remove(namespace).await? {
            tracing::info!(namespace = name, "removed the terminated namespace");
        }
        return Ok(());
    }
    for pod in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        match registry.pods.delete(Some(name), pod_name, &DeleteRequest::default(), false).await {
            Ok(_) | Err(ApiError::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    let request = DeleteRequest::default();
    // Replica sets first, so that none makes a new pod while its pods are being deleted.
    for set in &sets {
        registry.replica_sets.remove(set).await?;
    }
    let (quotas, _) = registry.resource_quotas.list(Some(name), &ListFilter::default()).await?;
    for quota in &quotas {
        registry.resource_quotas.remove(quota).await?;
    }
    let (config_maps, _) = registry.config_maps.list(Some(name), &ListFilter::default()).await?;
    for config_map in &config_maps {
        registry.config_maps.remove(config_map).await?;
    }
    for service in &services {
        let service_name = service.metadata.name.as_deref().unwrap_or_default();
        match registry.services.delete(Some(name), service_name, &request, false).await {
            Ok(_) | Err(ApiError::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    for slice in &slices {
        registry.endpoint_slices.remove(slice).await?;
    }
    // Services and slices go at once; with no pods left to wait for, the namespace can go in
    // this pass too (no pod change would wake the next one).
    let (pods, _) = registry.pods.list(Some(name), &ListFilter::default()).await?;
    let (services, _) = registry.services.list(Some(name), &ListFilter::default()).await?;
    let (slices, _) = registry.endpoint_slices.list(Some(name), &ListFilter::default()).await?;
    let (sets, _) = registry.replica_sets.list(Some(name), &ListFilter::default()).await?;
    if pods.is_empty()
        && sets.is_empty()
        && services.is_empty()
        && slices.is_empty()
        && registry.namespaces.remove(namespace).await?
    {
        tracing::info!(namespace = name, "removed the terminated namespace");
    }
    Ok(())
}

#[async_trait]
impl Reconciler for NamespaceController {
    fn name(&self) -> &'static str {
        "namespace"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.namespaces.resync().await?;
        self.pods.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        tokio::select! {
            changed = self.namespaces.next_change() => changed,
            changed = self.pods.next_change() => changed,
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.namespaces.drain_ready().await?;
        self.pods.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let terminating: Vec<Namespace> =
            self.namespaces.objects().filter(|n| is_terminating(n)).cloned().collect();
        let mut first_error = None;
        for namespace in &terminating {
            if let Err(error) = reconcile_terminating(&self.registry, namespace).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
