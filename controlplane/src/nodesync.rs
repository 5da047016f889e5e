//! The NodeSync gRPC service: each node agent receives a consistent snapshot of what concerns
//! it (every node with a pod CIDR as a peer, every pod bound to it, every service with its
//! endpoints), then deltas, each tagged with the store revision it brings the agent to
//! (`proto/nodesync.proto`). Services are joined with their slices once per change by the
//! [`ServiceCatalog`] and fanned out to every agent. ConfigMaps go only to the agents whose
//! pods use them ([`ConfigMapsInUse`]), when a first pod of the node starts using one and
//! whenever it changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    api::{
        kinds::{
            config_map,
            node::{self, address, pod_cidr},
            pod::{self, node_name},
        },
        typed::decode_object,
    },
    controllers::shutdown_signalled,
    nodesync_proto::{
        ConfigMapState, NodeStateUpdate, Peer, PodAssignment, WatchRequest,
        node_sync_server::{NodeSync, NodeSyncServer},
    },
    service_catalog::{
        DeltaLookup, ServiceCatalog, is_service_key, now_unix_nanos, service_states,
        services_prefix, slices_prefix,
    },
    store::{EventKind, KeyValue, Revision, SharedStore, StoreError, WatchBatch},
};

/// The common prefix of every kind, watched once so that node and pod changes arrive in one
/// revision order.
const REGISTRY_PREFIX: &str = "/registry/";
/// Messages buffered per agent before the sender waits for the agent to read.
const STREAM_BUFFER: usize = 16;
/// How long an agent's stream waits for the service catalog to reach a revision before it
/// gives up and sends a fresh snapshot instead.
const CATALOG_WAIT: Duration = Duration::from_secs(10);

pub struct NodeSyncService {
    store: SharedStore,
    catalog: Arc<ServiceCatalog>,
    shutdown: watch::Receiver<bool>,
}

impl NodeSyncService {
    /// Serves agents from `store`, following its services from now on (until `shutdown`).
    pub fn new(store: SharedStore, shutdown: watch::Receiver<bool>) -> Self {
        let catalog = ServiceCatalog::start(store.clone(), shutdown.clone());
        Self { store, catalog, shutdown }
    }

    pub fn into_server(self) -> NodeSyncServer<Self> {
        NodeSyncServer::new(self)
    }
}

fn nodes_prefix() -> String {
    node::key_prefix()
}

fn pods_prefix() -> String {
    pod::key_prefix()
}

/// The peer a node is for the others: only nodes with a pod CIDR are peers.
fn peer(node: &Node) -> Option<Peer> {
    let cidr = pod_cidr(node)?;
    Some(Peer {
        name: node.metadata.name.clone().unwrap_or_default(),
        internal_ip: address(node, "InternalIP").unwrap_or_default(),
        pod_cidr: cidr.to_string(),
    })
}

fn assignment(pod: &Pod) -> Result<PodAssignment, Status> {
    let pod_json = serde_json::to_vec(pod)
        .map_err(|e| Status::internal(format!("encoding a pod for a node agent: {e}")))?;
    Ok(PodAssignment {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        pod_json,
    })
}

fn internal(action: &str) -> impl FnOnce(crate::api::error::ApiError) -> Status + '_ {
    move |error| Status::internal(format!("{action}: {error}"))
}

/// The ConfigMaps that the pods of one node use, so that its stream sends exactly those: a
/// ConfigMap when a first pod of the node starts using it and whenever it changes; its
/// removal when the last such pod leaves the node or when it is deleted. Keys are
/// `namespace/name`.
#[derive(Debug, Default)]
struct ConfigMapsInUse {
    /// Pod uid → the ConfigMaps it uses.
    by_pod: HashMap<String, BTreeSet<String>>,
    /// ConfigMap → how many of the node's pods use it.
    users: HashMap<String, usize>,
    /// ConfigMap → the revision of the version last sent: a version read when a pod arrived
    /// may be newer than a change still queued in the watch, which must then not be sent.
    sent: HashMap<String, Revision>,
}

impl ConfigMapsInUse {
    /// Records what pod `uid` uses now; returns the ConfigMaps newly in use and those that no
    /// pod uses any more.
    fn set_pod(&mut self, uid: &str, used: BTreeSet<String>) -> (Vec<String>, Vec<String>) {
        let before = self.by_pod.remove(uid).unwrap_or_default();
        let mut added = Vec::new();
        for key in used.difference(&before) {
            let users = self.users.entry(key.clone()).or_default();
            *users += 1;
            if *users == 1 {
                added.push(key.clone());
            }
        }
        let mut released = Vec::new();
        for key in before.difference(&used) {
            let users = self.users.entry(key.clone()).or_default();
            *users = users.saturating_sub(1);
            if *users == 0 {
                self.users.remove(key);
                self.sent.remove(key);
                released.push(key.clone());
            }
        }
        if !used.is_empty() {
            self.by_pod.insert(uid.to_owned(), used);
        }
        (added, released)
    }

    fn in_use(&self, key: &str) -> bool {
        self.users.contains_key(key)
    }

    /// The message entry for a ConfigMap stored at `revision`, unless a version as new was sent.
    fn upsert(
        &mut self,
        key: &str,
        value: &[u8],
        revision: Revision,
    ) -> Result<Option<ConfigMapState>, Status> {
        if self.sent.get(key).is_some_and(|sent| *sent >= revision) {
            return Ok(None);
        }
        let store_key = format!("{}{key}", config_maps_prefix());
        let config_map: ConfigMap =
            decode_object(value, revision, &store_key).map_err(internal("reading a ConfigMap"))?;
        let config_map_json = serde_json::to_vec(&config_map)
            .map_err(|e| Status::internal(format!("encoding a ConfigMap for a node agent: {e}")))?;
        self.sent.insert(key.to_owned(), revision);
        Ok(Some(ConfigMapState {
            namespace: config_map.metadata.namespace.clone().unwrap_or_default(),
            name: config_map.metadata.name.clone().unwrap_or_default(),
            config_map_json,
        }))
    }
}

fn config_maps_prefix() -> String {
    config_map::key_prefix()
}

/// The `namespace/name` keys of the ConfigMaps a pod uses.
fn config_maps_of(pod: &Pod) -> BTreeSet<String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    config_map::used_by(pod).into_iter().map(|name| format!("{namespace}/{name}")).collect()
}

/// What one node's stream knows between messages.
struct NodeView {
    node: String,
    config_maps: ConfigMapsInUse,
}

impl NodeView {
    fn new(node: &str) -> Self {
        Self { node: node.to_owned(), config_maps: ConfigMapsInUse::default() }
    }

    /// The first message of a stream: everything the agent needs, at one revision.
    async fn snapshot(&mut self, store: &SharedStore) -> Result<NodeStateUpdate, Status> {
        self.config_maps = ConfigMapsInUse::default();
        let read = store
            .snapshot(&[
                nodes_prefix(),
                pods_prefix(),
                services_prefix(),
                slices_prefix(),
                config_maps_prefix(),
            ])
            .await
            .map_err(|e| Status::unavailable(format!("reading the cluster state: {e}")))?;
        let mut update =
            NodeStateUpdate { revision: read.revision, snapshot: true, ..Default::default() };
        let empty = Vec::new();
        update.services_upserted = service_states(
            read.lists.get(2).unwrap_or(&empty),
            read.lists.get(3).unwrap_or(&empty),
            now_unix_nanos(),
        )
        .map_err(internal("reading the services"))?;
        for kv in read.lists.first().into_iter().flatten() {
            let stored: Node = decode_object(&kv.value, kv.mod_revision, &kv.key)
                .map_err(internal("reading a node"))?;
            update.peers_upserted.extend(peer(&stored));
        }
        for kv in read.lists.get(1).into_iter().flatten() {
            let pod: Pod = decode_object(&kv.value, kv.mod_revision, &kv.key)
                .map_err(internal("reading a pod"))?;
            if node_name(&pod) == self.node {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                self.config_maps.set_pod(&uid, config_maps_of(&pod));
                update.pods_upserted.push(assignment(&pod)?);
            }
        }
        let prefix = config_maps_prefix();
        for kv in read.lists.get(4).into_iter().flatten() {
            let key = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            if self.config_maps.in_use(key) {
                update.config_maps_upserted.extend(self.config_maps.upsert(
                    key,
                    &kv.value,
                    kv.mod_revision,
                )?);
            }
        }
        Ok(update)
    }

    /// What one store transaction changes for the agent; `None` when nothing.
    async fn delta(
        &mut self,
        store: &SharedStore,
        batch: &WatchBatch,
    ) -> Result<Option<NodeStateUpdate>, Status> {
        let (nodes, pods, config_maps) = (nodes_prefix(), pods_prefix(), config_maps_prefix());
        let mut update =
            NodeStateUpdate { revision: batch.revision, snapshot: false, ..Default::default() };
        // ConfigMap → its new version, or `None` for a removal; the last word of the batch wins.
        let mut config_map_changes: BTreeMap<String, Option<ConfigMapState>> = BTreeMap::new();
        let mut newly_used = BTreeSet::new();
        for event in &batch.events {
            let new_value = (event.kind == EventKind::Put).then_some(&event.value);
            if event.key.starts_with(&nodes) {
                let decode = |value: &Bytes| {
                    decode_object::<Node>(value, event.revision, &event.key)
                        .map_err(internal("reading a node"))
                };
                let before =
                    event.prev_value.as_ref().map(decode).transpose()?.as_ref().and_then(peer);
                let after = new_value.map(decode).transpose()?.as_ref().and_then(peer);
                match (before, after) {
                    // Heartbeats and status churn that leave the peer as it was are not sent.
                    (before, Some(after)) if before.as_ref() != Some(&after) => {
                        update.peers_upserted.push(after)
                    }
                    (Some(before), None) => update.peers_removed.push(before.name),
                    _ => {}
                }
            } else if event.key.starts_with(&pods) {
                let decode = |value: &Bytes| {
                    decode_object::<Pod>(value, event.revision, &event.key)
                        .map_err(internal("reading a pod"))
                };
                let before = event.prev_value.as_ref().map(decode).transpose()?;
                let after = new_value.map(decode).transpose()?;
                match (before, after) {
                    (_, Some(after)) if node_name(&after) == self.node => {
                        let uid = after.metadata.uid.clone().unwrap_or_default();
                        let (added, released) =
                            self.config_maps.set_pod(&uid, config_maps_of(&after));
                        newly_used.extend(added);
                        for key in released {
                            newly_used.remove(&key);
                            config_map_changes.insert(key, None);
                        }
                        update.pods_upserted.push(assignment(&after)?)
                    }
                    (Some(before), _) if node_name(&before) == self.node => {
                        let uid = before.metadata.uid.unwrap_or_default();
                        for key in self.config_maps.set_pod(&uid, BTreeSet::new()).1 {
                            newly_used.remove(&key);
                            config_map_changes.insert(key, None);
                        }
                        update.pods_removed.push(uid)
                    }
                    _ => {}
                }
            } else if let Some(key) = event.key.strip_prefix(&config_maps) {
                if !self.config_maps.in_use(key) {
                    continue;
                }
                match new_value {
                    Some(value) => {
                        if let Some(state) = self.config_maps.upsert(key, value, event.revision)? {
                            config_map_changes.insert(key.to_owned(), Some(state));
                        }
                        newly_used.remove(key);
                    }
                    None => {
                        self.config_maps.sent.remove(key);
                        newly_used.remove(key);
                        config_map_changes.insert(key.to_owned(), None);
                    }
                }
            }
        }
        // A ConfigMap a pod of this node started using: its current version, read now (later
        // changes arrive through the watch; older ones are then skipped, see `sent`).
        for key in newly_used {
            let read = store
                .get(&format!("{config_maps}{key}"))
                .await
                .map_err(|e| Status::unavailable(format!("reading ConfigMap {key}: {e}")))?;
            match read {
                Some(KeyValue { value, mod_revision, .. }) => {
                    if let Some(state) = self.config_maps.upsert(&key, &value, mod_revision)? {
                        config_map_changes.insert(key, Some(state));
                    }
                }
                // Not there (yet): nothing to send; its creation will be.
                None => {
                    config_map_changes.remove(&key);
                }
            }
        }
        for (key, change) in config_map_changes {
            match change {
                Some(state) => update.config_maps_upserted.push(state),
                None => update.config_maps_removed.push(key),
            }
        }
        let empty = update.peers_upserted.is_empty()
            && update.peers_removed.is_empty()
            && update.pods_upserted.is_empty()
            && update.pods_removed.is_empty()
            && update.config_maps_upserted.is_empty()
            && update.config_maps_removed.is_empty();
        Ok((!empty).then_some(update))
    }
}

/// Hands one message to the agent's stream; false when the agent is gone or the server is
/// shutting down (an agent that stops reading must not hold up shutdown).
async fn deliver(
    updates: &mpsc::Sender<Result<NodeStateUpdate, Status>>,
    message: Result<NodeStateUpdate, Status>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        sent = updates.send(message) => sent.is_ok(),
        () = shutdown_signalled(shutdown) => false,
    }
}

/// Feeds one agent until it disconnects or the server shuts down: a snapshot, then deltas;
/// a fresh snapshot whenever the watch's history was compacted.
async fn stream_node_state(
    store: SharedStore,
    catalog: Arc<ServiceCatalog>,
    node: String,
    updates: mpsc::Sender<Result<NodeStateUpdate, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut view = NodeView::new(&node);
    loop {
        let first = match view.snapshot(&store).await {
            Ok(first) => first,
            Err(status) => {
                deliver(&updates, Err(status), &mut shutdown).await;
                return;
            }
        };
        let revision: Revision = first.revision;
        if !deliver(&updates, Ok(first), &mut shutdown).await {
            return;
        }
        let mut changes = match store.watch(REGISTRY_PREFIX, revision).await {
            Ok(changes) => changes,
            Err(StoreError::Compacted { .. }) => continue,
            Err(error) => {
                let status = Status::unavailable(format!("watching the cluster state: {error}"));
                deliver(&updates, Err(status), &mut shutdown).await;
                return;
            }
        };
        loop {
            let batch = tokio::select! {
                () = updates.closed() => return,
                () = shutdown_signalled(&mut shutdown) => return,
                batch = changes.next() => batch,
            };
            let update = match batch {
                None => return,
                Some(Err(StoreError::Compacted { .. })) => break,
                Some(Err(error)) => {
                    let status =
                        Status::unavailable(format!("watching the cluster state: {error}"));
                    deliver(&updates, Err(status), &mut shutdown).await;
                    return;
                }
                Some(Ok(batch)) => {
                    let mut update = match view.delta(&store, &batch).await {
                        Ok(update) => update,
                        Err(status) => {
                            deliver(&updates, Err(status), &mut shutdown).await;
                            return;
                        }
                    };
                    if batch.events.iter().any(|e| is_service_key(&e.key)) {
                        let services = tokio::select! {
                            () = updates.closed() => return,
                            found = catalog.delta_at(batch.revision, CATALOG_WAIT) => found,
                        };
                        match services {
                            DeltaLookup::Found(None) => {}
                            DeltaLookup::Found(Some(services)) => {
                                let update = update.get_or_insert_with(|| NodeStateUpdate {
                                    revision: batch.revision,
                                    ..Default::default()
                                });
                                update.services_upserted.extend_from_slice(&services.upserted);
                                update.services_removed.extend_from_slice(&services.removed);
                            }
                            DeltaLookup::Gone => {
                                tracing::info!(
                                    node,
                                    "the service catalog no longer has revision {}; resending a snapshot",
                                    batch.revision
                                );
                                break;
                            }
                        }
                    }
                    match update {
                        Some(update) => update,
                        None => continue,
                    }
                }
            };
            if !deliver(&updates, Ok(update), &mut shutdown).await {
                return;
            }
        }
        tracing::info!(
            node,
            "the NodeSync watch fell behind compacted history; resending a snapshot"
        );
    }
}

#[tonic::async_trait]
impl NodeSync for NodeSyncService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<NodeStateUpdate, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Set by the API's authentication layer, which every request passes.
        let caller = request.extensions().get::<crate::auth::UserInfo>().cloned();
        let node = request.into_inner().node_name;
        if node.is_empty() {
            return Err(Status::invalid_argument("node_name is required"));
        }
        let Some(caller) = caller else {
            return Err(Status::unauthenticated("no client certificate"));
        };
        crate::auth::authz::may_follow_node(&caller, &node).map_err(Status::permission_denied)?;
        let (updates, stream) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(stream_node_state(
            self.store.clone(),
            Arc::clone(&self.catalog),
            node,
            updates,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use tokio::sync::{mpsc, watch};

    use super::stream_node_state;
    use crate::{
        api::Registry,
        ipam::PodCidrAllocator,
        nodesync_proto::NodeStateUpdate,
        service_catalog::ServiceCatalog,
        store::{RedbStore, RedbStoreOptions, SharedStore},
        testing::{TempDataDir, node, pod_on},
    };

    async fn receive(
        updates: &mut mpsc::Receiver<Result<NodeStateUpdate, tonic::Status>>,
    ) -> NodeStateUpdate {
        tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .expect("an update within 5s")
            .expect("the stream is open")
            .expect("the update is not an error")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_that_falls_behind_compacted_history_gets_a_fresh_snapshot() {
        let dir = TempDataDir::new("nodesync-compacted");
        let options = RedbStoreOptions { history_revisions: 2, watch_buffer: 1 };
        let store: SharedStore =
            Arc::new(RedbStore::open(&dir.path().join("store.redb"), options).unwrap());
        let allocator = PodCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        let registry = Registry::new(Arc::clone(&store), Arc::new(allocator));
        registry.nodes.create(None, node("n1", "172.20.0.1", true), false).await.unwrap();

        let (sender, mut updates) = mpsc::channel(1);
        let (_stop, stopped) = watch::channel(false);
        let catalog = ServiceCatalog::start(Arc::clone(&store), stopped.clone());
        tokio::spawn(stream_node_state(
            Arc::clone(&store),
            catalog,
            "n1".to_owned(),
            sender,
            stopped,
        ));
        let first = receive(&mut updates).await;
        assert!(first.snapshot);
        assert_eq!(first.peers_upserted.len(), 1);

        // The agent reads nothing while ten nodes register: its stream stalls, its watch falls
        // behind the two revisions of history the store keeps.
        for i in 2..=11 {
            let name = format!("n{i}");
            registry
                .nodes
                .create(None, node(&name, &format!("172.20.0.{i}"), true), false)
                .await
                .unwrap();
        }
        let mut last_revision = first.revision;
        let resynced = loop {
            let update = receive(&mut updates).await;
            assert!(update.revision > last_revision, "revisions grow within a stream");
            last_revision = update.revision;
            if update.snapshot {
                break update;
            }
            assert!(
                update.peers_upserted.len() == 1,
                "deltas before the resync carry one node each"
            );
        };
        assert_eq!(resynced.peers_upserted.len(), 11, "the fresh snapshot has every node");
        assert_eq!(resynced.revision, store.revision().await.unwrap());
    }

    fn config_map(name: &str, value: &str) -> k8s_openapi::api::core::v1::ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "data": {"key": value},
        }))
        .unwrap()
    }

    fn pod_using(name: &str, node: &str, config_map: &str) -> k8s_openapi::api::core::v1::Pod {
        let mut pod = pod_on(name, node);
        pod.metadata.namespace = Some("default".to_owned());
        pod.spec.as_mut().unwrap().containers[0].env_from = Some(vec![
            serde_json::from_value(serde_json::json!({
                "configMapRef": {"name": config_map}
            }))
            .unwrap(),
        ]);
        pod
    }

    fn config_map_values(update: &NodeStateUpdate) -> Vec<(String, String)> {
        update
            .config_maps_upserted
            .iter()
            .map(|state| {
                let cm: k8s_openapi::api::core::v1::ConfigMap =
                    serde_json::from_slice(&state.config_map_json).unwrap();
                (state.name.clone(), cm.data.unwrap()["key"].clone())
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_gets_the_config_maps_its_pods_use_and_their_changes_only() {
        let dir = TempDataDir::new("nodesync-configmaps");
        let store = dir.open_store();
        let allocator = PodCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        let registry = Registry::new(Arc::clone(&store), Arc::new(allocator));
        registry.ensure_system_namespaces().await.unwrap();
        for (name, ip) in [("n1", "172.20.0.1"), ("n2", "172.20.0.2")] {
            registry.nodes.create(None, node(name, ip, true), false).await.unwrap();
        }
        for name in ["shared", "other", "unused"] {
            registry
                .config_maps
                .create(Some("default"), config_map(name, "v1"), false)
                .await
                .unwrap();
        }
        registry.pods.create(Some("default"), pod_using("a", "n1", "shared"), false).await.unwrap();

        let (_stop, stopped) = watch::channel(false);
        let catalog = ServiceCatalog::start(Arc::clone(&store), stopped.clone());
        let mut streams = Vec::new();
        for node in ["n1", "n2"] {
            let (sender, updates) = mpsc::channel(16);
            tokio::spawn(stream_node_state(
                Arc::clone(&store),
                Arc::clone(&catalog),
                node.to_owned(),
                sender,
                stopped.clone(),
            ));
            streams.push(updates);
        }
        let first = receive(&mut streams[0]).await;
        assert_eq!(config_map_values(&first), [("shared".to_owned(), "v1".to_owned())]);
        let first = receive(&mut streams[1]).await;
        assert!(first.config_maps_upserted.is_empty(), "n2 runs no pod that uses one");

        // A change to a ConfigMap no pod of n1 uses sends nothing; then one it uses does.
        let change = |value: &'static str| {
            move |old: &k8s_openapi::api::core::v1::ConfigMap| {
                let mut new = old.clone();
                new.data = Some([("key".to_owned(), value.to_owned())].into());
                Ok(new)
            }
        };
        let internal = crate::api::typed::UpdateMode::Main;
        registry
            .config_maps
            .update(Some("default"), "unused", internal, false, change("v2"))
            .await
            .unwrap();
        registry
            .config_maps
            .update(Some("default"), "shared", internal, false, change("v2"))
            .await
            .unwrap();
        let update = receive(&mut streams[0]).await;
        assert_eq!(config_map_values(&update), [("shared".to_owned(), "v2".to_owned())]);
        assert!(update.pods_upserted.is_empty());

        // A new pod that uses another ConfigMap arrives with it, in the same message.
        registry.pods.create(Some("default"), pod_using("b", "n1", "other"), false).await.unwrap();
        let update = receive(&mut streams[0]).await;
        assert_eq!(update.pods_upserted.len(), 1);
        assert_eq!(config_map_values(&update), [("other".to_owned(), "v1".to_owned())]);

        // The last pod that uses it leaves: the agent is told to forget it.
        let a = registry.pods.get(Some("default"), "a").await.unwrap();
        registry.pods.remove(&a).await.unwrap();
        let update = receive(&mut streams[0]).await;
        assert_eq!(update.pods_removed.len(), 1);
        assert_eq!(update.config_maps_removed, ["default/shared"]);

        // n2 saw none of this: its next message is the one it is concerned by.
        registry.pods.create(Some("default"), pod_using("c", "n2", "shared"), false).await.unwrap();
        let update = receive(&mut streams[1]).await;
        assert_eq!(update.pods_upserted.len(), 1);
        assert_eq!(config_map_values(&update), [("shared".to_owned(), "v2".to_owned())]);
    }
}
