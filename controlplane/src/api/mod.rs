//! The Kubernetes-style API server: REST layout, JSON and Table output, watch, and the served
//! kinds (Namespace, Node, Pod, Service, EndpointSlice, ConfigMap, ...).

pub mod autoscaling_v1;
pub mod deletion;
pub mod error;
pub mod handler;
pub mod http;
pub mod json_patch;
pub mod kind;
pub mod kinds;
pub mod managed_fields;
pub mod merge_patch;
pub mod metadata;
pub mod metrics;
pub mod openapi;
pub mod pagination;
pub mod patch_schema;
pub mod pod_exec;
pub mod pod_log;
pub mod protobuf;
pub mod quantity;
pub mod selectors;
pub mod server_side_apply;
pub mod strategic_merge;
pub mod table;
pub mod typed;
pub mod validation;

use std::sync::Arc;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Namespace, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use self::{
    error::ApiError,
    handler::{Handler, KindHandler},
    kinds::{
        config_map::ConfigMapStrategy,
        deployment::DeploymentStrategy,
        endpoint_slice::EndpointSliceStrategy,
        event::EventStrategy,
        horizontal_pod_autoscaler::HorizontalPodAutoscalerStrategy,
        lease::LeaseStrategy,
        namespace::{NamespaceStrategy, SYSTEM_NAMESPACES},
        node::NodeStrategy,
        pod::{DefaultTolerationSeconds, PodStrategy},
        replica_set::ReplicaSetStrategy,
        resource_quota::ResourceQuotaStrategy,
        service::ServiceStrategy,
    },
    typed::TypedKind,
};
use crate::{
    ipam::{PodCidrAllocator, ServiceIpAllocator},
    store::SharedStore,
};

/// The cluster DNS service: node agents answer DNS at its cluster IP themselves.
pub const CLUSTER_DNS_NAMESPACE: &str = "kube-system";
pub const CLUSTER_DNS_NAME: &str = "kube-dns";

/// What admission defaults the served kinds apply.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// The tolerations of not-ready and unreachable nodes every pod gets unless it has its own.
    pub default_tolerations: DefaultTolerationSeconds,
}

/// Every served kind, typed (for in-process controllers) and as handlers (for HTTP).
pub struct Registry {
    store: SharedStore,
    pub namespaces: Arc<TypedKind<NamespaceStrategy>>,
    pub nodes: Arc<TypedKind<NodeStrategy>>,
    pub pods: Arc<TypedKind<PodStrategy>>,
    pub services: Arc<TypedKind<ServiceStrategy>>,
    pub endpoint_slices: Arc<TypedKind<EndpointSliceStrategy>>,
    pub replica_sets: Arc<TypedKind<ReplicaSetStrategy>>,
    pub resource_quotas: Arc<TypedKind<ResourceQuotaStrategy>>,
    pub config_maps: Arc<TypedKind<ConfigMapStrategy>>,
    pub events: Arc<TypedKind<EventStrategy>>,
    pub deployments: Arc<TypedKind<DeploymentStrategy>>,
    pub leases: Arc<TypedKind<LeaseStrategy>>,
    pub horizontal_pod_autoscalers: Arc<TypedKind<HorizontalPodAutoscalerStrategy>>,
    /// The node agents' latest resource usage reports (in memory), served as `metrics.k8s.io`.
    pub metrics: Arc<metrics::ResourceMetrics>,
    handlers: Vec<Arc<dyn KindHandler>>,
}

impl Registry {
    /// A registry whose services get cluster IPs from the default range.
    pub fn new(store: SharedStore, pod_cidrs: Arc<PodCidrAllocator>) -> Self {
        Self::with_service_ips(store, pod_cidrs, Arc::new(ServiceIpAllocator::default_range()))
    }

    pub fn with_service_ips(
        store: SharedStore,
        pod_cidrs: Arc<PodCidrAllocator>,
        cluster_ips: Arc<ServiceIpAllocator>,
    ) -> Self {
        Self::with_options(store, pod_cidrs, cluster_ips, RegistryOptions::default())
    }

    pub fn with_options(
        store: SharedStore,
        pod_cidrs: Arc<PodCidrAllocator>,
        cluster_ips: Arc<ServiceIpAllocator>,
        options: RegistryOptions,
    ) -> Self {
        let namespaces = Arc::new(TypedKind::new(Arc::clone(&store), NamespaceStrategy));
        let nodes = Arc::new(TypedKind::new(Arc::clone(&store), NodeStrategy::new(pod_cidrs)));
        let pods = Arc::new(TypedKind::new(
            Arc::clone(&store),
            PodStrategy::new(options.default_tolerations),
        ));
        let services =
            Arc::new(TypedKind::new(Arc::clone(&store), ServiceStrategy::new(cluster_ips)));
        let endpoint_slices = Arc::new(TypedKind::new(Arc::clone(&store), EndpointSliceStrategy));
        let replica_sets = Arc::new(TypedKind::new(Arc::clone(&store), ReplicaSetStrategy));
        let resource_quotas = Arc::new(TypedKind::new(Arc::clone(&store), ResourceQuotaStrategy));
        let config_maps = Arc::new(TypedKind::new(Arc::clone(&store), ConfigMapStrategy));
        let events = Arc::new(TypedKind::new(Arc::clone(&store), EventStrategy));
        let deployments = Arc::new(TypedKind::new(Arc::clone(&store), DeploymentStrategy));
        let leases = Arc::new(TypedKind::new(Arc::clone(&store), LeaseStrategy));
        let horizontal_pod_autoscalers =
            Arc::new(TypedKind::new(Arc::clone(&store), HorizontalPodAutoscalerStrategy));
        let metrics = Arc::new(metrics::ResourceMetrics::default());
        // Autoscalers are stored in autoscaling/v2 and also served in v1, converted.
        let autoscalers_v2: Arc<dyn KindHandler> =
            Arc::new(Handler::new(Arc::clone(&horizontal_pod_autoscalers)));
        let handlers: Vec<Arc<dyn KindHandler>> = vec![
            Arc::new(Handler::new(Arc::clone(&namespaces))),
            Arc::new(Handler::new(Arc::clone(&nodes))),
            Arc::new(Handler::new(Arc::clone(&pods))),
            Arc::new(Handler::new(Arc::clone(&services))),
            Arc::new(Handler::new(Arc::clone(&endpoint_slices))),
            Arc::new(Handler::new(Arc::clone(&replica_sets))),
            Arc::new(Handler::new(Arc::clone(&resource_quotas))),
            Arc::new(Handler::new(Arc::clone(&config_maps))),
            Arc::new(Handler::new(Arc::clone(&events))),
            Arc::new(Handler::new(Arc::clone(&deployments))),
            Arc::new(Handler::new(Arc::clone(&leases))),
            Arc::clone(&autoscalers_v2),
            Arc::new(autoscaling_v1::AutoscalingV1Handler::new(autoscalers_v2)),
            Arc::new(metrics::MetricsHandler::nodes(Arc::clone(&metrics))),
            Arc::new(metrics::MetricsHandler::pods(Arc::clone(&metrics))),
        ];
        Self {
            store,
            namespaces,
            nodes,
            pods,
            services,
            endpoint_slices,
            replica_sets,
            resource_quotas,
            config_maps,
            events,
            deployments,
            leases,
            horizontal_pod_autoscalers,
            metrics,
            handlers,
        }
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

    /// Creates `kube-system/kube-dns` at the cluster DNS address when it is missing. It has no
    /// selector and so no endpoints: every node agent answers DNS at that address itself.
    pub async fn ensure_cluster_dns(&self) -> Result<(), ApiError> {
        let dns_ip = self.services.strategy().cluster_ips().cluster_dns_ip().to_string();
        let port = |name: &str, protocol: &str| ServicePort {
            name: Some(name.to_owned()),
            port: 53,
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        };
        let service = Service {
            metadata: ObjectMeta {
                name: Some(CLUSTER_DNS_NAME.to_owned()),
                namespace: Some(CLUSTER_DNS_NAMESPACE.to_owned()),
                labels: Some(BTreeMap::from([("k8s-app".to_owned(), "kube-dns".to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(dns_ip),
                ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        match self.services.create(Some(CLUSTER_DNS_NAMESPACE), service, false).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }
}
