//! Follows the controller's NodeSync stream: a full snapshot on every (re)connect, then deltas.
//! Survives controller restarts by reconnecting with back-off; every snapshot is applied as a
//! complete, level-triggered resync, so nothing missed while disconnected is lost.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use strait_controlplane::{
    auth::ClientCredentials,
    nodesync_proto::{
        NodeStateUpdate, Peer, ServiceState, WatchRequest, node_sync_client::NodeSyncClient,
    },
};
use tonic::transport::Endpoint;

/// What the controller wants of this node, as the stream has described it so far.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub revision: u64,
    pub peers: BTreeMap<String, Peer>,
    /// Pods bound to this node, by uid.
    pub pods: HashMap<String, Arc<Pod>>,
    /// Every service of the cluster with its endpoints, by `namespace/name`.
    pub services: HashMap<String, Arc<ServiceState>>,
    /// The ConfigMaps that pods of this node use, by `namespace/name`.
    pub config_maps: HashMap<String, Arc<ConfigMap>>,
}

/// The `namespace/name` key the stream names services by.
pub fn service_key(service: &ServiceState) -> String {
    format!("{}/{}", service.namespace, service.name)
}

/// How one update changed the desired state.
#[derive(Debug, Default)]
pub struct Change {
    pub snapshot: bool,
    pub peers_changed: bool,
    pub pods_upserted: Vec<String>,
    pub pods_removed: Vec<String>,
    /// Keys of services added or changed.
    pub services_upserted: Vec<String>,
    /// Keys of services gone (on a snapshot: every service known before and absent now).
    pub services_removed: Vec<String>,
    /// Keys of ConfigMaps added, changed or gone (on a snapshot: every one known before or now).
    pub config_maps_changed: Vec<String>,
}

impl DesiredState {
    /// Applies one stream message. An update older than what was applied is ignored (the
    /// stream never sends one, but a reconnect must not move the state backwards).
    pub fn apply(&mut self, update: NodeStateUpdate) -> Option<Change> {
        if !update.snapshot && update.revision < self.revision {
            return None;
        }
        let mut change = Change { snapshot: update.snapshot, ..Default::default() };
        if update.snapshot {
            change.peers_changed = true;
            change.pods_removed = self.pods.keys().cloned().collect();
            change.services_removed = self.services.keys().cloned().collect();
            change.config_maps_changed = self.config_maps.keys().cloned().collect();
            self.peers.clear();
            self.pods.clear();
            self.services.clear();
            self.config_maps.clear();
        }
        self.revision = update.revision;
        for name in update.peers_removed {
            change.peers_changed |= self.peers.remove(&name).is_some();
        }
        for peer in update.peers_upserted {
            change.peers_changed |= self.peers.get(&peer.name) != Some(&peer);
            self.peers.insert(peer.name.clone(), peer);
        }
        // ConfigMaps before pods: a pod that arrives with the ConfigMaps it uses finds them.
        for key in update.config_maps_removed {
            if self.config_maps.remove(&key).is_some() {
                change.config_maps_changed.push(key);
            }
        }
        for state in update.config_maps_upserted {
            let key = format!("{}/{}", state.namespace, state.name);
            match serde_json::from_slice::<ConfigMap>(&state.config_map_json) {
                Ok(config_map) => {
                    change.config_maps_changed.push(key.clone());
                    self.config_maps.insert(key, Arc::new(config_map));
                }
                Err(error) => tracing::error!(
                    config_map = %key,
                    %error,
                    "the controller sent a ConfigMap this agent cannot decode; pods see it as missing"
                ),
            }
        }
        for uid in update.pods_removed {
            if self.pods.remove(&uid).is_some() || update.snapshot {
                change.pods_removed.push(uid);
            }
        }
        for assignment in update.pods_upserted {
            match serde_json::from_slice::<Pod>(&assignment.pod_json) {
                Ok(pod) => {
                    change.pods_upserted.push(assignment.uid.clone());
                    self.pods.insert(assignment.uid, Arc::new(pod));
                }
                Err(error) => tracing::error!(
                    uid = %assignment.uid,
                    pod = %format!("{}/{}", assignment.namespace, assignment.name),
                    %error,
                    "the controller sent a pod this agent cannot decode; it is not run"
                ),
            }
        }
        for key in update.services_removed {
            if self.services.remove(&key).is_some() {
                change.services_removed.push(key);
            }
        }
        for service in update.services_upserted {
            let key = service_key(&service);
            change.services_upserted.push(key.clone());
            self.services.insert(key, Arc::new(service));
        }
        if update.snapshot {
            change.pods_removed.retain(|uid| !self.pods.contains_key(uid));
            change.services_removed.retain(|key| !self.services.contains_key(key));
            change.config_maps_changed.sort();
            change.config_maps_changed.dedup();
        }
        Some(change)
    }
}

/// Streams the node's desired state forever, calling `on_change` after each applied update.
/// `controllers` is one base URL or several separated by commas (replicas of one control
/// plane, each serving NodeSync): a broken stream reconnects to the next one, with exponential
/// back-off (100 ms to 5 s) while none answers.
pub async fn follow(
    controllers: &str,
    credentials: &ClientCredentials,
    node_name: &str,
    mut on_change: impl FnMut(&DesiredState, &Change),
) {
    let controllers: Vec<&str> = controllers.split(',').map(str::trim).collect();
    let mut next = 0;
    let mut state = DesiredState::default();
    let mut delay = Duration::from_millis(100);
    loop {
        let controller = controllers[next % controllers.len()];
        next += 1;
        let mut connected = false;
        let once = stream_once(
            controller,
            credentials,
            node_name,
            &mut state,
            &mut connected,
            &mut on_change,
        );
        match once.await {
            Ok(()) => {
                tracing::warn!(%controller, "the controller closed the NodeSync stream; reconnecting")
            }
            Err(error) => {
                tracing::warn!(%controller, %error, ?delay, "NodeSync stream failed; reconnecting")
            }
        }
        if connected {
            delay = Duration::from_millis(100);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(
    controller: &str,
    credentials: &ClientCredentials,
    node_name: &str,
    state: &mut DesiredState,
    connected: &mut bool,
    on_change: &mut impl FnMut(&DesiredState, &Change),
) -> Result<(), tonic::Status> {
    let endpoint = Endpoint::from_shared(controller.to_owned())
        .map_err(|e| {
            tonic::Status::invalid_argument(format!("controller address {controller}: {e}"))
        })?
        .tls_config(credentials.grpc_tls())
        .map_err(|e| tonic::Status::invalid_argument(format!("TLS for {controller}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Notice a controller that vanished without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting to {controller}: {e}")))?;
    let mut client = NodeSyncClient::new(channel);
    let mut stream =
        client.watch(WatchRequest { node_name: node_name.to_owned() }).await?.into_inner();
    *connected = true;
    while let Some(update) = stream.message().await? {
        if let Some(change) = state.apply(update) {
            on_change(state, &change);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use strait_controlplane::nodesync_proto::{NodeStateUpdate, Peer, PodAssignment, ServiceState};

    use super::DesiredState;

    fn pod(uid: &str) -> PodAssignment {
        let json =
            serde_json::json!({"metadata": {"name": uid, "namespace": "default", "uid": uid}});
        PodAssignment {
            uid: uid.into(),
            namespace: "default".into(),
            name: uid.into(),
            pod_json: serde_json::to_vec(&json).unwrap(),
        }
    }

    fn peer(name: &str, cidr: &str) -> Peer {
        Peer { name: name.into(), internal_ip: "172.20.0.11".into(), pod_cidr: cidr.into() }
    }

    #[test]
    fn a_snapshot_replaces_everything_and_reports_what_disappeared() {
        let mut state = DesiredState::default();
        state.apply(NodeStateUpdate {
            revision: 5,
            snapshot: true,
            pods_upserted: vec![pod("a"), pod("b")],
            peers_upserted: vec![peer("n1", "10.244.0.0/24")],
            ..Default::default()
        });
        let change = state
            .apply(NodeStateUpdate {
                revision: 9,
                snapshot: true,
                pods_upserted: vec![pod("b")],
                ..Default::default()
            })
            .expect("applied");
        assert!(change.snapshot && change.peers_changed);
        assert_eq!(change.pods_removed, ["a"]);
        assert!(state.peers.is_empty());
        assert_eq!(state.pods.len(), 1);
    }

    #[test]
    fn deltas_apply_in_order_and_older_ones_are_ignored() {
        let mut state = DesiredState::default();
        state.apply(NodeStateUpdate {
            revision: 5,
            snapshot: true,
            pods_upserted: vec![pod("a")],
            ..Default::default()
        });
        let change = state
            .apply(NodeStateUpdate {
                revision: 6,
                pods_removed: vec!["a".into()],
                peers_upserted: vec![peer("n2", "10.244.1.0/24")],
                ..Default::default()
            })
            .expect("applied");
        assert_eq!(change.pods_removed, ["a"]);
        assert!(change.peers_changed);
        assert!(
            state
                .apply(NodeStateUpdate {
                    revision: 4,
                    pods_upserted: vec![pod("z")],
                    ..Default::default()
                })
                .is_none()
        );
        assert!(state.pods.is_empty());
    }

    fn service(name: &str) -> ServiceState {
        ServiceState {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: "10.96.0.20".into(),
            ..Default::default()
        }
    }

    #[test]
    fn services_follow_snapshots_and_deltas() {
        let mut state = DesiredState::default();
        state.apply(NodeStateUpdate {
            revision: 1,
            snapshot: true,
            services_upserted: vec![service("a"), service("b")],
            ..Default::default()
        });
        let change = state
            .apply(NodeStateUpdate {
                revision: 2,
                snapshot: true,
                services_upserted: vec![service("b"), service("c")],
                ..Default::default()
            })
            .expect("applied");
        assert_eq!(change.services_removed, ["default/a"]);
        let mut upserted = change.services_upserted.clone();
        upserted.sort();
        assert_eq!(upserted, ["default/b", "default/c"]);
        let change = state
            .apply(NodeStateUpdate {
                revision: 3,
                services_removed: vec!["default/b".into(), "default/never".into()],
                ..Default::default()
            })
            .expect("applied");
        assert_eq!(change.services_removed, ["default/b"]);
        assert_eq!(state.services.keys().collect::<Vec<_>>(), ["default/c"]);
    }

    fn config_map(name: &str, value: &str) -> strait_controlplane::nodesync_proto::ConfigMapState {
        let json = serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "data": {"k": value},
        });
        strait_controlplane::nodesync_proto::ConfigMapState {
            namespace: "default".into(),
            name: name.into(),
            config_map_json: serde_json::to_vec(&json).unwrap(),
        }
    }

    #[test]
    fn config_maps_follow_snapshots_and_deltas() {
        let mut state = DesiredState::default();
        let change = state
            .apply(NodeStateUpdate {
                revision: 1,
                snapshot: true,
                config_maps_upserted: vec![config_map("a", "1"), config_map("b", "1")],
                ..Default::default()
            })
            .expect("applied");
        assert_eq!(change.config_maps_changed, ["default/a", "default/b"]);
        let change = state
            .apply(NodeStateUpdate {
                revision: 2,
                config_maps_upserted: vec![config_map("a", "2")],
                config_maps_removed: vec!["default/b".into(), "default/never".into()],
                ..Default::default()
            })
            .expect("applied");
        assert_eq!(change.config_maps_changed, ["default/b", "default/a"]);
        let a = &state.config_maps["default/a"];
        assert_eq!(a.data.as_ref().unwrap()["k"], "2");
        assert!(!state.config_maps.contains_key("default/b"));
        let change = state
            .apply(NodeStateUpdate { revision: 3, snapshot: true, ..Default::default() })
            .expect("applied");
        assert_eq!(change.config_maps_changed, ["default/a"], "gone with the snapshot");
        assert!(state.config_maps.is_empty());
    }
}
