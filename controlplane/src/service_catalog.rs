//! Services joined with their EndpointSlices, as NodeSync sends them to node agents
//! ([`ServiceState`]). Every agent gets every service, so the join is done once per change,
//! not once per agent: one [`ServiceCatalog`] follows the store, and for each revision that
//! changed a service or one of its slices keeps the resulting states, which every agent's
//! stream then picks up at that revision, in order with its other changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::sync::watch;

use crate::{
    api::{
        error::ApiError,
        kinds::{
            endpoint_slice::{self, ADDRESS_TYPE_IPV4, service_name},
            service::{self, TRAFFIC_POLICY_LOCAL, affinity_timeout_seconds, is_headless},
        },
        typed::decode_object,
    },
    controllers::{backoff, shutdown_signalled},
    nodesync_proto::{self as proto, ServiceState},
    store::{EventKind, KeyValue, Revision, SharedStore, StoreError, WatchBatch},
};

/// How many revisions with service changes the catalog keeps for agents that lag behind; an
/// agent further behind is sent a fresh snapshot.
const KEPT_REVISIONS: usize = 1024;

/// What one revision changed in the services agents see.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceDelta {
    pub upserted: Vec<ServiceState>,
    /// `namespace/name` of deleted services.
    pub removed: Vec<String>,
}

pub fn services_prefix() -> String {
    service::key_prefix()
}

pub fn slices_prefix() -> String {
    endpoint_slice::key_prefix()
}

/// Whether a store change can change a [`ServiceState`].
pub fn is_service_key(key: &str) -> bool {
    key.starts_with(&services_prefix()) || key.starts_with(&slices_prefix())
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn service_id(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or_default(), name.unwrap_or_default())
}

/// The service a slice belongs to, as `namespace/name`.
fn slice_owner(slice: &EndpointSlice) -> Option<String> {
    service_name(slice).map(|name| service_id(slice.metadata.namespace.as_deref(), Some(name)))
}

/// One service joined with its slices. `observed_unix_nanos` is left 0 for the caller.
pub fn service_state<'a>(
    service: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice>,
) -> ServiceState {
    let spec = service.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| proto::ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            port: u32::try_from(p.port).unwrap_or_default(),
        })
        .collect();
    let mut endpoints = Vec::new();
    for slice in slices.filter(|s| s.address_type == ADDRESS_TYPE_IPV4) {
        let ports: Vec<proto::EndpointPort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(proto::EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                    port: u32::try_from(p.port?).ok()?,
                })
            })
            .collect();
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // Unknown readiness counts as ready, and serving follows ready (EndpointSlice API).
            let ready = conditions.ready.unwrap_or(true);
            for address in &endpoint.addresses {
                endpoints.push(proto::Endpoint {
                    address: address.clone(),
                    node_name: endpoint.node_name.clone().unwrap_or_default(),
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    ports: ports.clone(),
                });
            }
        }
    }
    ServiceState {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
        cluster_ip: if is_headless(service) {
            String::new()
        } else {
            spec.cluster_ip.clone().unwrap_or_default()
        },
        ports,
        affinity_timeout_seconds: affinity_timeout_seconds(service)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        internal_traffic_local: spec.internal_traffic_policy.as_deref()
            == Some(TRAFFIC_POLICY_LOCAL),
        endpoints,
        observed_unix_nanos: 0,
    }
}

/// Every service joined with its slices, from the lists of one store snapshot.
pub fn service_states(
    services: &[KeyValue],
    slices: &[KeyValue],
    observed_unix_nanos: u64,
) -> Result<Vec<ServiceState>, ApiError> {
    let mut by_service: HashMap<String, Vec<EndpointSlice>> = HashMap::new();
    for kv in slices {
        let slice: EndpointSlice = decode_object(&kv.value, kv.mod_revision, &kv.key)?;
        if let Some(owner) = slice_owner(&slice) {
            by_service.entry(owner).or_default().push(slice);
        }
    }
    let mut states = Vec::with_capacity(services.len());
    for kv in services {
        let service: Service = decode_object(&kv.value, kv.mod_revision, &kv.key)?;
        let id =
            service_id(service.metadata.namespace.as_deref(), service.metadata.name.as_deref());
        let slices = by_service.get(&id).map(Vec::as_slice).unwrap_or_default();
        let mut state = service_state(&service, slices.iter());
        state.observed_unix_nanos = observed_unix_nanos;
        states.push(state);
    }
    Ok(states)
}

/// The catalog's view of the store.
#[derive(Default)]
struct Index {
    /// The revision the index reflects; 0 until the first list.
    revision: Revision,
    /// Deltas are kept for every revision after this one (up to `revision`).
    kept_after: Revision,
    services: BTreeMap<String, Service>,
    /// Slices by store key, with the service they belong to.
    slices: BTreeMap<String, (Option<String>, EndpointSlice)>,
    slices_of: HashMap<String, BTreeSet<String>>,
    /// The state last published per service (without its observation time), so that changes
    /// that leave it alone are not sent.
    published: HashMap<String, ServiceState>,
    deltas: VecDeque<(Revision, Arc<ServiceDelta>)>,
}

impl Index {
    fn state_of(&self, id: &str) -> Option<ServiceState> {
        let service = self.services.get(id)?;
        let slices = self
            .slices_of
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.get(key).map(|(_, slice)| slice));
        Some(service_state(service, slices))
    }

    fn relist(
        &mut self,
        services: &[KeyValue],
        slices: &[KeyValue],
        revision: Revision,
    ) -> Result<(), ApiError> {
        let mut index = Self { revision, kept_after: revision, ..Self::default() };
        for kv in services {
            let service: Service = decode_object(&kv.value, kv.mod_revision, &kv.key)?;
            let id =
                service_id(service.metadata.namespace.as_deref(), service.metadata.name.as_deref());
            index.services.insert(id, service);
        }
        for kv in slices {
            let slice: EndpointSlice = decode_object(&kv.value, kv.mod_revision, &kv.key)?;
            index.put_slice(kv.key.clone(), slice);
        }
        let ids: Vec<String> = index.services.keys().cloned().collect();
        for id in ids {
            if let Some(state) = index.state_of(&id) {
                index.published.insert(id, state);
            }
        }
        *self = index;
        Ok(())
    }

    fn put_slice(&mut self, key: String, slice: EndpointSlice) -> Option<String> {
        let owner = slice_owner(&slice);
        let previous = self.remove_slice(&key);
        if let Some(owner) = &owner {
            self.slices_of.entry(owner.clone()).or_default().insert(key.clone());
        }
        self.slices.insert(key, (owner, slice));
        previous
    }

    /// Returns the service the removed slice belonged to.
    fn remove_slice(&mut self, key: &str) -> Option<String> {
        let (owner, _) = self.slices.remove(key)?;
        if let Some(owner) = &owner
            && let Some(keys) = self.slices_of.get_mut(owner)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.slices_of.remove(owner);
            }
        }
        owner
    }

    /// Applies one transaction's changes and records what they did to the services.
    fn apply(&mut self, batch: &WatchBatch, observed_unix_nanos: u64) -> Result<(), ApiError> {
        let (services, slices) = (services_prefix(), slices_prefix());
        let mut touched = BTreeSet::new();
        for event in &batch.events {
            if event.key.starts_with(&services) {
                match event.kind {
                    EventKind::Put => {
                        let service: Service =
                            decode_object(&event.value, event.revision, &event.key)?;
                        let id = service_id(
                            service.metadata.namespace.as_deref(),
                            service.metadata.name.as_deref(),
                        );
                        touched.insert(id.clone());
                        self.services.insert(id, service);
                    }
                    EventKind::Delete => {
                        // The key is `<prefix><namespace>/<name>`.
                        let id = event.key[services.len()..].to_owned();
                        self.services.remove(&id);
                        touched.insert(id);
                    }
                }
            } else if event.key.starts_with(&slices) {
                let previous = match event.kind {
                    EventKind::Put => {
                        let slice: EndpointSlice =
                            decode_object(&event.value, event.revision, &event.key)?;
                        touched.extend(slice_owner(&slice));
                        self.put_slice(event.key.clone(), slice)
                    }
                    EventKind::Delete => self.remove_slice(&event.key),
                };
                touched.extend(previous);
            }
        }
        let mut delta = ServiceDelta::default();
        for id in touched {
            match self.state_of(&id) {
                Some(state) => {
                    if self.published.get(&id) != Some(&state) {
                        self.published.insert(id, state.clone());
                        delta.upserted.push(ServiceState { observed_unix_nanos, ..state });
                    }
                }
                None => {
                    if self.published.remove(&id).is_some() {
                        delta.removed.push(id);
                    }
                }
            }
        }
        self.revision = batch.revision;
        if delta != ServiceDelta::default() {
            self.deltas.push_back((batch.revision, Arc::new(delta)));
            while self.deltas.len() > KEPT_REVISIONS {
                if let Some((revision, _)) = self.deltas.pop_front() {
                    self.kept_after = revision;
                }
            }
        }
        Ok(())
    }
}

/// What an agent's stream finds for one revision.
#[derive(Debug)]
pub enum DeltaLookup {
    Found(Option<Arc<ServiceDelta>>),
    /// The revision is older than what the catalog keeps: send a fresh snapshot.
    Gone,
}

/// Services joined with their slices, followed from the store by one task.
pub struct ServiceCatalog {
    index: Mutex<Index>,
    progress: watch::Sender<Revision>,
}

impl ServiceCatalog {
    /// Starts following the store until `shutdown`.
    pub fn start(store: SharedStore, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let catalog =
            Arc::new(Self { index: Mutex::new(Index::default()), progress: watch::Sender::new(0) });
        tokio::spawn(Arc::clone(&catalog).follow(store, shutdown));
        catalog
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // The index is replaced whole or updated by one batch under the lock; a panic in
        // between is a bug that the next relist repairs.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The services' changes at `revision`, once the catalog has processed it (`None` inside
    /// `Found` when that revision changed no service state). Waits at most `limit`.
    pub async fn delta_at(&self, revision: Revision, limit: Duration) -> DeltaLookup {
        let mut progress = self.progress.subscribe();
        let reached = tokio::time::timeout(limit, progress.wait_for(|done| *done >= revision));
        if !matches!(reached.await, Ok(Ok(_))) {
            return DeltaLookup::Gone;
        }
        let index = self.lock();
        if revision <= index.kept_after {
            return DeltaLookup::Gone;
        }
        let found = index
            .deltas
            .binary_search_by_key(&revision, |(r, _)| *r)
            .ok()
            .map(|at| Arc::clone(&index.deltas[at].1));
        DeltaLookup::Found(found)
    }

    async fn follow(self: Arc<Self>, store: SharedStore, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0;
        loop {
            let ended = tokio::select! {
                () = shutdown_signalled(&mut shutdown) => return,
                ended = self.follow_once(&store) => ended,
            };
            if let Err(error) = ended {
                failures += 1;
                tracing::warn!(%error, failures, "the service catalog lost the store; relisting");
            }
            tokio::select! {
                () = shutdown_signalled(&mut shutdown) => return,
                () = tokio::time::sleep(backoff(failures)) => {}
            }
        }
    }

    /// Lists and follows until the watch fails or the history it needs is compacted.
    async fn follow_once(&self, store: &SharedStore) -> Result<(), ApiError> {
        let read = store
            .snapshot(&[services_prefix(), slices_prefix()])
            .await
            .map_err(ApiError::store("listing services and endpoint slices"))?;
        let empty = Vec::new();
        let services = read.lists.first().unwrap_or(&empty);
        let slices = read.lists.get(1).unwrap_or(&empty);
        self.lock().relist(services, slices, read.revision)?;
        self.progress.send_replace(read.revision);
        // One watch of everything: every revision moves the catalog on, so that an agent
        // waiting for a revision without service changes is not left waiting.
        let mut changes = store
            .watch("/registry/", read.revision)
            .await
            .map_err(ApiError::store("watching services and endpoint slices"))?;
        while let Some(batch) = changes.next().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(StoreError::Compacted { .. }) => return Ok(()),
                Err(error) => return Err(ApiError::store("watching services")(error)),
            };
            self.lock().apply(&batch, now_unix_nanos())?;
            self.progress.send_replace(batch.revision);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;

    use super::service_state;

    #[test]
    fn slices_join_into_one_state_with_api_defaults_for_missing_conditions() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
        }))
        .unwrap();
        let slice = |address_type: &str, address: &str, conditions: serde_json::Value| {
            serde_json::from_value::<EndpointSlice>(json!({
                "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": address_type,
                "endpoints": [{"addresses": [address], "conditions": conditions}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "any"}],
            }))
            .unwrap()
        };
        let slices = [
            slice("IPv4", "10.244.0.5", json!({})),
            slice("IPv4", "10.244.0.6", json!({"ready": false, "terminating": true})),
            slice("IPv6", "fd00::1", json!({})),
        ];
        let state = service_state(&service, slices.iter());
        assert_eq!(state.cluster_ip, "", "headless");
        assert_eq!(state.affinity_timeout_seconds, 60);
        let endpoints: Vec<(&str, bool, bool, bool)> = state
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            endpoints,
            [("10.244.0.5", true, true, false), ("10.244.0.6", false, false, true)]
        );
        assert_eq!(state.endpoints[0].ports.len(), 1, "a slice port without a number is skipped");
    }
}
