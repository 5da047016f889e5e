//! The Kubernetes-style API server: REST layout, JSON and Table output, watch, and the served
//! kinds (Namespace, Node, Pod).

pub mod error;
pub mod handler;
pub mod http;
pub mod kind;
pub mod kinds;
pub mod merge_patch;
pub mod openapi;
pub mod selectors;
pub mod table;
pub mod typed;
pub mod validation;

use std::sync::Arc;

use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use self::{
    error::ApiError,
    handler::{Handler, KindHandler},
    kinds::{
        namespace::{NamespaceStrategy, SYSTEM_NAMESPACES},
        node::NodeStrategy,
        pod::PodStrategy,
    },
    typed::TypedKind,
};
use crate::{ipam::PodCidrAllocator, store::SharedStore};

/// Every served kind, typed (for in-process controllers) and as handlers (for HTTP).
pub struct Registry {
    store: SharedStore,
    pub namespaces: Arc<TypedKind<NamespaceStrategy>>,
    pub nodes: Arc<TypedKind<NodeStrategy>>,
    pub pods: Arc<TypedKind<PodStrategy>>,
    handlers: Vec<Arc<dyn KindHandler>>,
}

impl Registry {
    pub fn new(store: SharedStore, pod_cidrs: Arc<PodCidrAllocator>) -> Self {
        let namespaces = Arc::new(TypedKind::new(Arc::clone(&store), NamespaceStrategy));
        let nodes = Arc::new(TypedKind::new(Arc::clone(&store), NodeStrategy::new(pod_cidrs)));
        let pods = Arc::new(TypedKind::new(Arc::clone(&store), PodStrategy));
        let handlers: Vec<Arc<dyn KindHandler>> = vec![
            Arc::new(Handler::new(Arc::clone(&namespaces))),
            Arc::new(Handler::new(Arc::clone(&nodes))),
            Arc::new(Handler::new(Arc::clone(&pods))),
        ];
        Self { store, namespaces, nodes, pods, handlers }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Every served kind, in registration order.
    pub fn handlers(&self) -> &[Arc<dyn KindHandler>] {
        &self.handlers
    }

    /// The kind served at `group`/`version` under the plural name `resource`.
    pub fn handler(
        &self,
        group: &str,
        version: &str,
        resource: &str,
    ) -> Option<&Arc<dyn KindHandler>> {
        self.handlers.iter().find(|h| {
            let info = h.info();
            info.group == group && info.version == version && info.plural == resource
        })
    }

    /// Creates the namespaces a cluster has from its first start, when they are missing.
    pub async fn ensure_system_namespaces(&self) -> Result<(), ApiError> {
        for name in SYSTEM_NAMESPACES {
            let namespace = Namespace {
                metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
                ..Namespace::default()
            };
            match self.namespaces.create(None, namespace, false).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}
