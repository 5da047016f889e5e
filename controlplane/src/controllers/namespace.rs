//! The namespace controller: a Terminating namespace has everything in it deleted, of every
//! served namespaced kind (the registry's, so kinds added later are covered), through the
//! same path as a client's DELETE: pods gracefully (their node agents stop them first),
//! objects with finalizers once those are done, services releasing their cluster IPs. No
//! order is needed: nothing new can be created in a terminating namespace (403), so no
//! controller refills it. Once it is empty the controller removes the `kubernetes` finalizer
//! from `spec.finalizers`, and the namespace is removed with it (unless finalizers in its
//! metadata still hold it).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Namespace;

use super::{ObjectCache, Reconciler};
use crate::api::{
    Registry,
    error::ApiError,
    kind::DeleteRequest,
    kinds::{
        namespace::{KUBERNETES_FINALIZER, NamespaceStrategy, is_terminating},
        pod::PodStrategy,
    },
    typed::UpdateMode,
};

/// How soon a namespace that still has content is looked at again. Most content goes at once;
/// what waits (graceful pods, finalizers of any kind) is not all watched here.
const RECHECK: Duration = Duration::from_secs(1);

pub struct NamespaceController {
    registry: Arc<Registry>,
    namespaces: ObjectCache<NamespaceStrategy>,
    pods: ObjectCache<PodStrategy>,
    /// Whether the last pass left a terminating namespace with content.
    waiting: bool,
}

impl NamespaceController {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            namespaces: ObjectCache::new(Arc::clone(&registry.namespaces)),
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            registry,
            waiting: false,
        }
    }
}

/// Deletes what is left in `namespace`, of every namespaced kind, and returns how many objects
/// were still there before. Read from the store rather than a cache: finalizing a namespace on
/// a cache that lags behind a creation would leave that object behind.
async fn delete_content(registry: &Registry, namespace: &str) -> Result<usize, ApiError> {
    let mut left = 0;
    for handler in registry.handlers().iter().filter(|h| h.info().namespaced) {
        let access = handler.metadata_access();
        for meta in access.list_metadata(Some(namespace)).await? {
            left += 1;
            if meta.deletion_timestamp.is_some() {
                continue;
            }
            let name = meta.name.as_deref().unwrap_or_default();
            let request =
                DeleteRequest { precondition_uid: meta.uid.clone(), ..DeleteRequest::default() };
            match access.delete_object(Some(namespace), name, &request).await {
                // Gone meanwhile, or the name belongs to a newer object (deleted next pass).
                Ok(()) | Err(ApiError::NotFound { .. } | ApiError::Conflict { .. }) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(left)
}

/// Deletes what is left in one terminating namespace; once it is empty, finalizes it. Returns
/// whether it was finalized.
pub async fn reconcile_terminating(
    registry: &Registry,
    namespace: &Namespace,
) -> Result<bool, ApiError> {
    let name = namespace.metadata.name.as_deref().unwrap_or_default();
    // Most content goes at once: when it did, the namespace is finalized in the same pass (no
    // change of what this controller watches would wake the next one).
    if delete_content(registry, name).await? > 0 && delete_content(registry, name).await? > 0 {
        return Ok(false);
    }
    let uid = namespace.metadata.uid.clone();
    let finalized = registry
        .namespaces
        .update(None, name, UpdateMode::Internal, false, |current| {
            if current.metadata.uid != uid {
                return Err(ApiError::NotFound {
                    resource: "namespaces".to_owned(),
                    name: name.to_owned(),
                });
            }
            let mut finalized = current.clone();
            if let Some(finalizers) = finalized.spec.as_mut().and_then(|s| s.finalizers.as_mut()) {
                finalizers.retain(|f| f != KUBERNETES_FINALIZER);
            }
            Ok(finalized)
        })
        .await;
    match finalized {
        Ok(_) => {
            tracing::info!(namespace = name, "finalized the terminated namespace");
            Ok(true)
        }
        Err(ApiError::NotFound { .. }) => Ok(true),
        Err(error) => Err(error),
    }
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
        let recheck = async {
            if self.waiting {
                tokio::time::sleep(RECHECK).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = self.namespaces.next_change() => changed,
            changed = self.pods.next_change() => changed,
            () = recheck => Ok(()),
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
        let mut waiting = false;
        for namespace in &terminating {
            match reconcile_terminating(&self.registry, namespace).await {
                Ok(finalized) => waiting |= !finalized,
                Err(error) => {
                    waiting = true;
                    first_error.get_or_insert(error);
                }
            }
        }
        self.waiting = waiting;
        first_error.map_or(Ok(()), Err)
    }
}
