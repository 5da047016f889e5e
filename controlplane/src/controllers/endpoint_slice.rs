//! The endpoint slice controller: every Service with a selector gets EndpointSlices listing
//! the pods of its namespace that match the selector, have an IP and have not finished, with
//! Kubernetes' conditions (`serving` = pod Ready, `terminating` = being deleted, `ready` =
//! serving and not terminating, or not terminating when the service publishes not-ready
//! addresses).
//!
//! Named target ports resolve per pod, so pods that resolve a service's ports differently sit
//! in different slices (one group of slices per distinct port set, at most 100 endpoints per
//! slice). Work is O(change): a burst of changes is coalesced for a short window, only the
//! services it touches are reconciled, endpoints stay in the slice they are in, and only slices
//! whose content changed are written. Services without a selector are left to their users.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use super::{CacheChanges, ObjectCache, Reconciler};
use crate::api::{
    Registry,
    error::ApiError,
    kind::{Strategy, TxnExtras},
    kinds::{
        endpoint_slice::{
            ADDRESS_TYPE_IPV4, EndpointSliceStrategy, MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
            service_name,
        },
        pod::{PodStrategy, is_terminated, node_name},
        service::ServiceStrategy,
    },
    typed::{UpdateMode, WriteOutcome},
};
use crate::events::EventRecorder;

/// The `endpointslice.kubernetes.io/managed-by` value of the slices this controller owns.
pub const CONTROLLER_NAME: &str = "endpointslice-controller.strait.io";
/// Kubernetes' default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// How long a burst of changes is gathered before the services it touched are reconciled.
pub const BATCH_WINDOW: Duration = Duration::from_millis(30);

/// A service, by namespace and name.
type ServiceKey = (String, String);
/// The resolved ports of an endpoint: the slices it can share.
type PortSet = Vec<EndpointPort>;

pub struct EndpointSliceController {
    registry: Arc<Registry>,
    services: ObjectCache<ServiceStrategy>,
    pods: ObjectCache<PodStrategy>,
    slices: ObjectCache<EndpointSliceStrategy>,
    /// Services to reconcile in the next pass.
    dirty: BTreeSet<ServiceKey>,
    /// Whether a change arrived since the last pass; a pass without one (the periodic resync,
    /// a retry) looks at every service.
    changed: bool,
    events: EventRecorder,
}

impl EndpointSliceController {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            services: ObjectCache::logging_changes(Arc::clone(&registry.services)),
            pods: ObjectCache::logging_changes(Arc::clone(&registry.pods)),
            slices: ObjectCache::logging_changes(Arc::clone(&registry.endpoint_slices)),
            events: EventRecorder::spawn(Arc::clone(&registry.events), "endpoint-slice-controller"),
            registry,
            dirty: BTreeSet::new(),
            changed: false,
        }
    }

    fn services_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Service> + 'a {
        let prefix = self.registry.services.strategy().info().collection_prefix(Some(namespace));
        self.services.under(prefix)
    }

    /// Turns what the caches saw into the set of services to reconcile. `false` when a cache
    /// was relisted (then every service is).
    fn collect_dirty(&mut self) -> bool {
        let mut complete = true;
        let services = self.services.take_changes();
        complete &= !services.relisted;
        for change in services.changes {
            for service in change.before.iter().chain(&change.after) {
                self.dirty.insert(service_key(&service.metadata));
            }
        }
        let CacheChanges { relisted, changes } = self.pods.take_changes();
        complete &= !relisted;
        for change in changes {
            if change.before.as_ref().map(endpoint_view) == change.after.as_ref().map(endpoint_view)
            {
                continue;
            }
            let Some(namespace) = change
                .after
                .as_ref()
                .or(change.before.as_ref())
                .and_then(|p| p.metadata.namespace.clone())
            else {
                continue;
            };
            let affected: Vec<ServiceKey> = self
                .services_in(&namespace)
                .filter(|service| {
                    [&change.before, &change.after]
                        .into_iter()
                        .flatten()
                        .any(|pod| selects(service, pod))
                })
                .map(|service| service_key(&service.metadata))
                .collect();
            self.dirty.extend(affected);
        }
        let slices = self.slices.take_changes();
        complete &= !slices.relisted;
        for change in slices.changes {
            for slice in change.before.iter().chain(&change.after) {
                if let (true, Some(service)) = (is_managed(slice), service_name(slice)) {
                    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                    self.dirty.insert((namespace, service.to_owned()));
                }
            }
        }
        complete
    }

    /// Every service and every service that managed slices point to (orphans are removed).
    fn every_service(&self) -> BTreeSet<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> =
            self.services.objects().map(|s| service_key(&s.metadata)).collect();
        for slice in self.slices.objects().filter(|s| is_managed(s)) {
            if let Some(service) = service_name(slice) {
                keys.insert((
                    slice.metadata.namespace.clone().unwrap_or_default(),
                    service.to_owned(),
                ));
            }
        }
        keys
    }

    async fn reconcile_service(&mut self, (namespace, name): &ServiceKey) -> Result<(), ApiError> {
        let key = self.registry.services.key(Some(namespace), name);
        let prefix =
            self.registry.endpoint_slices.strategy().info().collection_prefix(Some(namespace));
        let existing: Vec<EndpointSlice> = self
            .slices
            .under(prefix)
            .filter(|s| is_managed(s) && service_name(s) == Some(name.as_str()))
            .cloned()
            .collect();
        let plan = match self.services.get(&key) {
            Some(service) if has_selector(service) => {
                let pod_prefix =
                    self.registry.pods.strategy().info().collection_prefix(Some(namespace));
                let desired = desired_endpoints(service, self.pods.under(pod_prefix));
                plan_slices(service, desired, existing)
            }
            // Deleted, or its selector was removed: its managed slices go.
            _ => SlicePlan { delete: existing, ..SlicePlan::default() },
        };
        self.apply(plan).await
    }

    async fn apply(&mut self, plan: SlicePlan) -> Result<(), ApiError> {
        let slices = Arc::clone(&self.registry.endpoint_slices);
        for slice in plan.delete {
            if slices.remove(&slice).await? {
                self.slices.record_removal(&slice);
            }
        }
        for (old, new) in plan.update {
            match slices
                .write_update(UpdateMode::Main, &old, new, TxnExtras::default(), false)
                .await?
            {
                WriteOutcome::Written(written) => self.slices.record_write(written),
                // Someone else changed the slice: its change wakes another pass.
                WriteOutcome::Stale => {}
            }
        }
        for slice in plan.create {
            let namespace = slice.metadata.namespace.clone();
            let created = slices.create(namespace.as_deref(), slice, false).await?;
            self.slices.record_write(created);
        }
        Ok(())
    }
}

fn service_key(meta: &ObjectMeta) -> ServiceKey {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

fn is_managed(slice: &EndpointSlice) -> bool {
    slice.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str)
        == Some(CONTROLLER_NAME)
}

fn has_selector(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty())
}

/// Whether the service's selector picks the pod (a service without one picks nothing).
fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    !selector.is_empty()
        && selector.iter().all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.pod_ip.as_deref().filter(|ip| !ip.is_empty())
}

/// What of a pod can change its endpoints; pod changes that leave it alone are ignored.
fn endpoint_view(pod: &Pod) -> impl PartialEq + use<'_> {
    let containers = pod.spec.as_ref().map(|s| &s.containers);
    (
        &pod.metadata.labels,
        &pod.metadata.uid,
        pod.metadata.deletion_timestamp.is_some(),
        pod_ip(pod),
        is_ready(pod),
        is_terminated(pod),
        node_name(pod),
        containers.map(|c| c.iter().map(|c| &c.ports).collect::<Vec<_>>()),
    )
}

/// The service's ports as this pod serves them: a named target port is looked up among the
/// pod's container ports (name and protocol); a port the pod does not have is left out.
fn resolve_ports(service: &Service, pod: &Pod) -> PortSet {
    let spec = service.spec.as_ref();
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let mut ports = Vec::new();
    for port in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten() {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
        let number = match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(number)) => Some(*number),
            Some(IntOrString::String(name)) => containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port),
        };
        if let Some(number) = number {
            ports.push(EndpointPort {
                name: Some(port.name.clone().unwrap_or_default()),
                port: Some(number),
                protocol: Some(protocol),
                app_protocol: port.app_protocol.clone(),
            });
        }
    }
    ports
}

fn endpoint(service: &Service, pod: &Pod, ip: &str) -> Endpoint {
    let publish_not_ready =
        service.spec.as_ref().and_then(|s| s.publish_not_ready_addresses).unwrap_or(false);
    let serving = is_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = !terminating && (serving || publish_not_ready);
    Endpoint {
        addresses: vec![ip.to_owned()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        node_name: Some(node_name(pod).to_owned()).filter(|n| !n.is_empty()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

/// The endpoints the service should have, grouped by their resolved ports.
fn desired_endpoints<'a>(
    service: &Service,
    pods: impl Iterator<Item = &'a Pod>,
) -> BTreeMap<String, (PortSet, Vec<Endpoint>)> {
    let has_ports =
        service.spec.as_ref().and_then(|s| s.ports.as_ref()).is_some_and(|p| !p.is_empty());
    let mut groups: BTreeMap<String, (PortSet, Vec<Endpoint>)> = BTreeMap::new();
    for pod in pods {
        let Some(ip) = pod_ip(pod) else { continue };
        if is_terminated(pod) || !selects(service, pod) || ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            continue;
        }
        let ports = resolve_ports(service, pod);
        // A pod that serves none of the service's ports is no backend of it (a headless
        // service without ports still lists every pod, for DNS).
        if has_ports && ports.is_empty() {
            continue;
        }
        let group = groups.entry(port_set_key(&ports)).or_insert_with(|| (ports, Vec::new()));
        group.1.push(endpoint(service, pod, ip));
    }
    groups
}

fn port_set_key(ports: &[EndpointPort]) -> String {
    serde_json::to_string(ports).unwrap_or_default()
}

/// The identity of an endpoint across passes: its pod.
fn endpoint_id(endpoint: &Endpoint) -> (String, String) {
    let target = endpoint.target_ref.as_ref();
    (
        target.and_then(|t| t.name.clone()).unwrap_or_default(),
        target.and_then(|t| t.uid.clone()).unwrap_or_else(|| endpoint.addresses.join(",")),
    )
}

/// The writes that take a service's managed slices to the desired endpoints.
#[derive(Debug, Default)]
struct SlicePlan {
    create: Vec<EndpointSlice>,
    /// Old version, new version.
    update: Vec<(EndpointSlice, EndpointSlice)>,
    delete: Vec<EndpointSlice>,
}

/// A managed slice of `service` with `ports` and no endpoints yet.
fn new_slice(service: &Service, ports: &PortSet) -> EndpointSlice {
    let name = service.metadata.name.clone().unwrap_or_default();
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: service.metadata.namespace.clone(),
            ..ObjectMeta::default()
        },
        ..EndpointSlice::default()
    };
    dress(service, ports, slice)
}

/// Sets what the controller owns on a slice: labels, owner, address type, ports.
fn dress(service: &Service, ports: &PortSet, mut slice: EndpointSlice) -> EndpointSlice {
    let name = service.metadata.name.clone().unwrap_or_default();
    let labels = slice.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(SERVICE_NAME_LABEL.to_owned(), name.clone());
    labels.insert(MANAGED_BY_LABEL.to_owned(), CONTROLLER_NAME.to_owned());
    slice.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Service".to_owned(),
        name,
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    slice.address_type = ADDRESS_TYPE_IPV4.to_owned();
    slice.ports = Some(ports.clone());
    slice
}

fn plan_slices(
    service: &Service,
    desired: BTreeMap<String, (PortSet, Vec<Endpoint>)>,
    existing: Vec<EndpointSlice>,
) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let mut by_ports: BTreeMap<String, Vec<EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        let key = port_set_key(slice.ports.as_deref().unwrap_or_default());
        if desired.contains_key(&key) && slice.address_type == ADDRESS_TYPE_IPV4 {
            by_ports.entry(key).or_default().push(slice);
        } else {
            plan.delete.push(slice);
        }
    }
    for (key, (ports, endpoints)) in desired {
        let mut left: BTreeMap<(String, String), Endpoint> =
            endpoints.into_iter().map(|e| (endpoint_id(&e), e)).collect();
        // Endpoints stay in the slice they are in, with their current content.
        let mut kept: Vec<(EndpointSlice, Vec<Endpoint>)> = Vec::new();
        for slice in by_ports.remove(&key).unwrap_or_default() {
            let mut seen = HashSet::new();
            let endpoints: Vec<Endpoint> = slice
                .endpoints
                .iter()
                .filter_map(|e| {
                    let id = endpoint_id(e);
                    // A slice never lists the same pod twice, whatever was stored.
                    if !seen.insert(id.clone()) {
                        return None;
                    }
                    left.remove(&id)
                })
                .take(MAX_ENDPOINTS_PER_SLICE)
                .collect();
            kept.push((slice, endpoints));
        }
        // New endpoints fill the room left in existing slices, then new slices.
        let mut left = left.into_values();
        for (_, endpoints) in &mut kept {
            let room = MAX_ENDPOINTS_PER_SLICE.saturating_sub(endpoints.len());
            if room > 0 && !endpoints.is_empty() {
                endpoints.extend(left.by_ref().take(room));
            }
        }
        for (old, mut endpoints) in kept {
            if endpoints.is_empty() {
                plan.delete.push(old);
                continue;
            }
            endpoints.sort_by_key(endpoint_id);
            let mut new = dress(service, &ports, old.clone());
            new.endpoints = endpoints;
            if new != old {
                plan.update.push((old, new));
            }
        }
        let rest: Vec<Endpoint> = left.collect();
        for chunk in rest.chunks(MAX_ENDPOINTS_PER_SLICE) {
            let mut slice = new_slice(service, &ports);
            slice.endpoints = chunk.to_vec();
            plan.create.push(slice);
        }
    }
    // Slices of port sets no longer wanted (the loop consumed the wanted ones).
    plan.delete.extend(by_ports.into_values().flatten());
    plan
}

#[async_trait]
impl Reconciler for EndpointSliceController {
    fn name(&self) -> &'static str {
        "endpointslice"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.services.resync().await?;
        self.pods.resync().await?;
        self.slices.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        tokio::select! {
            changed = self.services.next_change() => changed,
            changed = self.pods.next_change() => changed,
            changed = self.slices.next_change() => changed,
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.changed = true;
        // Coalesce a burst (a rollout, a node's pods turning ready) into one pass.
        tokio::time::sleep(BATCH_WINDOW).await;
        self.services.drain_ready().await?;
        self.pods.drain_ready().await?;
        self.slices.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let complete = self.collect_dirty();
        if !complete || !std::mem::take(&mut self.changed) {
            let every = self.every_service();
            self.dirty.extend(every);
        }
        let targets = std::mem::take(&mut self.dirty);
        let mut first_error = None;
        for key in targets {
            if let Err(error) = self.reconcile_service(&key).await {
                tracing::debug!(namespace = key.0, service = key.1, %error, "endpoint slices not converged");
                // A conflict is a write that raced another and is retried at once; anything
                // else is worth telling the service's owner.
                if !matches!(error, ApiError::Conflict { .. })
                    && let Some(service) =
                        self.services.get(&self.registry.services.key(Some(&key.0), &key.1))
                {
                    self.events.warning(
                        service,
                        "FailedToUpdateEndpointSlices",
                        format!(
                            "Error updating Endpoint Slices for Service {}/{}: {error}",
                            key.0, key.1
                        ),
                    );
                }
                self.dirty.insert(key);
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                ContainerPort, Pod, PodCondition, PodStatus, Service, ServicePort, ServiceSpec,
            },
            discovery::v1::EndpointSlice,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::{MAX_ENDPOINTS_PER_SLICE, desired_endpoints, plan_slices};
    use crate::testing::pod;

    fn service(target: IntOrString) -> Service {
        let mut service = Service {
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ports: Some(vec![ServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    target_port: Some(target),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        service.metadata.name = Some("web".to_owned());
        service.metadata.namespace = Some("default".to_owned());
        service.metadata.uid = Some("svc-uid".to_owned());
        service
    }

    fn web_pod(index: usize, http_port: Option<i32>) -> Pod {
        let mut pod = pod(&format!("web-{index}"));
        pod.metadata.namespace = Some("default".to_owned());
        pod.metadata.uid = Some(format!("uid-{index}"));
        pod.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
        if let Some(port) = http_port {
            pod.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: port,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            }]);
        }
        pod.status = Some(PodStatus {
            pod_ip: Some(format!("10.244.{}.{}", index / 200, index % 200 + 1)),
            phase: Some("Running".to_owned()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".to_owned(),
                status: "True".to_owned(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        pod
    }

    /// Gives created slices a name, as the API server would.
    fn stored(plan_create: Vec<EndpointSlice>) -> Vec<EndpointSlice> {
        plan_create
            .into_iter()
            .enumerate()
            .map(|(i, mut slice)| {
                slice.metadata.name = Some(format!("web-{i}"));
                slice
            })
            .collect()
    }

    #[test]
    fn named_ports_split_pods_into_one_slice_group_per_port_number() {
        let service = service(IntOrString::String("http".to_owned()));
        let pods = [web_pod(1, Some(8080)), web_pod(2, Some(9090)), web_pod(3, None)];
        let desired = desired_endpoints(&service, pods.iter());
        let ports: Vec<i32> = desired.values().map(|(p, _)| p[0].port.unwrap()).collect();
        assert_eq!(ports.len(), 2, "the pod without the named port is in no slice");
        assert!(ports.contains(&8080) && ports.contains(&9090));
    }

    #[test]
    fn slices_hold_at_most_100_and_unchanged_ones_are_not_rewritten() {
        let service = service(IntOrString::Int(8080));
        let pods: Vec<Pod> = (0..250).map(|i| web_pod(i, None)).collect();
        let plan = plan_slices(&service, desired_endpoints(&service, pods.iter()), Vec::new());
        let sizes: Vec<usize> = plan.create.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        for slice in &plan.create {
            assert!(super::is_managed(slice), "new slices carry the managed-by label");
            assert_eq!(super::service_name(slice), Some("web"));
            assert_eq!(slice.metadata.generate_name.as_deref(), Some("web-"));
        }
        let existing = stored(plan.create);

        let again =
            plan_slices(&service, desired_endpoints(&service, pods.iter()), existing.clone());
        assert!(again.create.is_empty() && again.update.is_empty() && again.delete.is_empty());

        // One pod gone and one new: the new one fills the room; only touched slices change.
        let mut changed = pods.clone();
        changed.remove(0);
        changed.push(web_pod(999, None));
        let plan = plan_slices(&service, desired_endpoints(&service, changed.iter()), existing);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert!(plan.update.len() <= 2, "{} slices rewritten", plan.update.len());
        assert!(plan.update.iter().all(|(_, new)| new.endpoints.len() <= MAX_ENDPOINTS_PER_SLICE));
    }
}
