//! The NodeSync gRPC service: each node agent receives a consistent snapshot of what concerns
//! it (every node with a pod CIDR as a peer, every pod bound to it, every service with its
//! endpoints), then deltas, each tagged with the store revision it brings the agent to
//! (`proto/nodesync.proto`). Services are joined with their slices once per change by the
//! [`ServiceCatalog`] and fanned out to every agent.

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    api::{
        kinds::{
            node::{self, address, pod_cidr},
            pod::{self, node_name},
        },
        typed::decode_object,
    },
    controllers::shutdown_signalled,
    nodesync_proto::{
        NodeStateUpdate, Peer, PodAssignment, WatchRequest,
        node_sync_server::{NodeSync, NodeSyncServer},
    },
    service_catalog::{
        DeltaLookup, ServiceCatalog, is_service_key, now_unix_nanos, service_states,
        services_prefix, slices_prefix,
    },
    store::{EventKind, Revision, SharedStore, StoreError, WatchBatch},
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

/// The first message of a stream: everything the agent of `node` needs, at one revision.
async fn snapshot(store: &SharedStore, node: &str) -> Result<NodeStateUpdate, Status> {
    let read = store
        .snapshot(&[nodes_prefix(), pods_prefix(), services_prefix(), slices_prefix()])
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
        if node_name(&pod) == node {
            update.pods_upserted.push(assignment(&pod)?);
        }
    }
    Ok(update)
}

/// What one store transaction changes for the agent of `node`; `None` when nothing.
fn delta(node: &str, batch: &WatchBatch) -> Result<Option<NodeStateUpdate>, Status> {
    let (nodes, pods) = (nodes_prefix(), pods_prefix());
    let mut update =
        NodeStateUpdate { revision: batch.revision, snapshot: false, ..Default::default() };
    for event in &batch.events {
        let new_value = (event.kind == EventKind::Put).then_some(&event.value);
        if event.key.starts_with(&nodes) {
            let decode = |value: &Bytes| {
                decode_object::<Node>(value, event.revision, &event.key)
                    .map_err(internal("reading a node"))
            };
            let before = event.prev_value.as_ref().map(decode).transpose()?.as_ref().and_then(peer);
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
                (_, Some(after)) if node_name(&after) == node => {
                    update.pods_upserted.push(assignment(&after)?)
                }
                (Some(before), _) if node_name(&before) == node => {
                    update.pods_removed.push(before.metadata.uid.unwrap_or_default())
                }
                _ => {}
            }
        }
    }
    let empty = update.peers_upserted.is_empty()
        && update.peers_removed.is_empty()
        && update.pods_upserted.is_empty()
        && update.pods_removed.is_empty();
    Ok((!empty).then_some(update))
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
    loop {
        let first = match snapshot(&store, &node).await {
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
                    let mut update = match delta(&node, &batch) {
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
        testing::{TempDataDir, node},
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
}
