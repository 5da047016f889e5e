//! NodeSync as a node agent sees it: a real tonic client over loopback, on the same HTTPS port
//! as the REST API (HTTP/2 and HTTP/1.1 served together, chosen by ALPN).

use std::time::Duration;

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use strait_controlplane::{
    nodesync_proto::{
        Endpoint, EndpointPort, NodeStateUpdate, ServicePort, ServiceState, WatchRequest,
        node_sync_client::NodeSyncClient,
    },
    testing::{TestController, eventually, node, pod_on},
};
use tonic::{Code, Streaming, transport::Channel};

/// A NodeSync client with the credentials of the agent of `node`.
async fn connect(server: &TestController, node: &str) -> NodeSyncClient<Channel> {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .tls_config(server.node_credentials(node).grpc_tls())
        .expect("TLS configuration")
        .connect()
        .await
        .expect("h2 over TLS connects");
    NodeSyncClient::new(channel)
}

async fn next(stream: &mut Streaming<NodeStateUpdate>) -> NodeStateUpdate {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an update within 5s")
        .expect("the stream has no error")
        .expect("the stream is open")
}

fn peers(update: &NodeStateUpdate) -> Vec<(String, String, String)> {
    let mut peers: Vec<_> = update
        .peers_upserted
        .iter()
        .map(|p| (p.name.clone(), p.internal_ip.clone(), p.pod_cidr.clone()))
        .collect();
    peers.sort();
    peers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_a_snapshot_then_deltas_on_the_api_port() {
    let server = TestController::start("nodesync").await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.11", true)).await.unwrap();
    client.create::<Node>(None, &node("n2", "172.20.0.12", true)).await.unwrap();
    let mine: Pod = client.create(Some("default"), &pod_on("mine", "n1")).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_on("theirs", "n2")).await.unwrap();
    let (_, revision) = client.list::<Pod>(None, "").await.unwrap();

    // Same URL as the REST client: gRPC over HTTP/2, negotiated by ALPN.
    let mut agent = connect(&server, "n1").await;
    let mut stream =
        agent.watch(WatchRequest { node_name: "n1".to_owned() }).await.unwrap().into_inner();
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot);
    assert!(snapshot.revision >= revision.parse::<u64>().unwrap());
    assert_eq!(
        peers(&snapshot),
        [
            ("n1".to_owned(), "172.20.0.11".to_owned(), "10.244.0.0/24".to_owned()),
            ("n2".to_owned(), "172.20.0.12".to_owned(), "10.244.1.0/24".to_owned())
        ]
    );
    assert_eq!(snapshot.pods_upserted.len(), 1, "only pods bound to n1");
    let assignment = &snapshot.pods_upserted[0];
    assert_eq!((assignment.namespace.as_str(), assignment.name.as_str()), ("default", "mine"));
    assert_eq!(Some(&assignment.uid), mine.metadata.uid.as_ref());
    let stored: Pod = serde_json::from_slice(&assignment.pod_json).unwrap();
    assert_eq!(stored.metadata.resource_version, mine.metadata.resource_version);

    // A heartbeat that leaves n2's peer data unchanged sends nothing; a new node is a peer.
    client
        .merge_patch::<Node>(None, "n2", &json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "beat"}]}}), true)
        .await
        .unwrap();
    client.create::<Node>(None, &node("n3", "172.20.0.13", true)).await.unwrap();
    let added = next(&mut stream).await;
    assert!(!added.snapshot);
    assert!(added.revision > snapshot.revision);
    assert_eq!(
        peers(&added),
        [("n3".to_owned(), "172.20.0.13".to_owned(), "10.244.2.0/24".to_owned())]
    );

    // A pod for n1 arrives; pods of other nodes do not.
    client.create::<Pod>(Some("default"), &pod_on("elsewhere", "n2")).await.unwrap();
    let new_pod: Pod = client.create(Some("default"), &pod_on("second", "n1")).await.unwrap();
    let upsert = next(&mut stream).await;
    assert!(upsert.revision > added.revision);
    assert_eq!(upsert.pods_upserted.len(), 1);
    assert_eq!(upsert.pods_upserted[0].name, "second");
    assert_eq!(upsert.revision.to_string(), new_pod.metadata.resource_version.clone().unwrap());

    // Graceful delete: an upsert with a deletionTimestamp, then removal by uid.
    client.delete::<Pod>(Some("default"), "second", None).await.unwrap();
    let stopping = next(&mut stream).await;
    let pod: Pod = serde_json::from_slice(&stopping.pods_upserted[0].pod_json).unwrap();
    assert!(pod.metadata.deletion_timestamp.is_some());
    client.delete::<Pod>(Some("default"), "second", Some(0)).await.unwrap();
    let removed = next(&mut stream).await;
    assert_eq!(removed.pods_removed, [new_pod.metadata.uid.clone().unwrap()]);
    assert!(removed.revision > stopping.revision);

    client.delete::<Node>(None, "n3", None).await.unwrap();
    let gone = next(&mut stream).await;
    assert_eq!(gone.peers_removed, ["n3"]);

    // A reconnect starts over with a snapshot of the current state.
    let mut again =
        agent.watch(WatchRequest { node_name: "n1".to_owned() }).await.unwrap().into_inner();
    let fresh = next(&mut again).await;
    assert!(fresh.snapshot);
    assert_eq!(fresh.revision, gone.revision);
    assert_eq!(peers(&fresh).len(), 2);
    assert_eq!(fresh.pods_upserted.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["mine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_without_a_node_name_is_refused() {
    let server = TestController::start("nodesync-invalid").await;
    let mut agent = connect(&server, "n1").await;
    let status = agent.watch(WatchRequest { node_name: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// The ServiceState of `namespace/name` in an update, if the update carries one.
fn service_in<'a>(update: &'a NodeStateUpdate, id: &str) -> Option<&'a ServiceState> {
    update.services_upserted.iter().find(|s| format!("{}/{}", s.namespace, s.name) == id)
}

/// Reads updates until one satisfies `found` (other deltas may come first).
async fn until<T>(
    stream: &mut Streaming<NodeStateUpdate>,
    mut last_revision: u64,
    mut found: impl FnMut(&NodeStateUpdate) -> Option<T>,
) -> (NodeStateUpdate, T) {
    loop {
        let update = next(stream).await;
        assert!(!update.snapshot);
        assert!(update.revision > last_revision, "deltas come in revision order");
        last_revision = update.revision;
        if let Some(value) = found(&update) {
            return (update, value);
        }
    }
}

async fn report_pod(client: &strait_controlplane::client::ApiClient, ready: bool) {
    let status = if ready { "True" } else { "False" };
    client
        .merge_patch::<Pod>(
            Some("default"),
            "web-1",
            &json!({"status": {"phase": "Running", "podIP": "10.244.0.5",
                    "conditions": [{"type": "Ready", "status": status}]}}),
            true,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_every_service_with_its_endpoints() {
    let server = TestController::start("nodesync-services").await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.11", true)).await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let service = client.create(Some("default"), &service).await.unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();
    let mut web = pod_on("web-1", "n1");
    web.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    client.create::<Pod>(Some("default"), &web).await.unwrap();
    report_pod(&client, false).await;
    eventually("the slice of web", 10, || async {
        let (slices, _) = client
            .list::<EndpointSlice>(
                Some("default"),
                "labelSelector=kubernetes.io/service-name%3Dweb",
            )
            .await
            .unwrap();
        slices.iter().any(|s| !s.endpoints.is_empty()).then_some(())
    })
    .await;

    let mut agent = connect(&server, "n2").await;
    let mut stream =
        agent.watch(WatchRequest { node_name: "n2".to_owned() }).await.unwrap().into_inner();
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot);
    let dns = service_in(&snapshot, "kube-system/kube-dns").expect("kube-dns is in the snapshot");
    assert_eq!(dns.cluster_ip, "10.96.0.10");
    assert!(dns.endpoints.is_empty(), "agents serve DNS themselves");
    let state = service_in(&snapshot, "default/web").expect("web is in the snapshot");
    assert_eq!(state.cluster_ip, cluster_ip);
    assert_eq!(
        state.ports,
        [ServicePort { name: "http".to_owned(), protocol: "TCP".to_owned(), port: 80 }]
    );
    assert_eq!((state.affinity_timeout_seconds, state.internal_traffic_local), (0, false));
    assert!(state.observed_unix_nanos > 0);
    assert_eq!(
        state.endpoints,
        [Endpoint {
            address: "10.244.0.5".to_owned(),
            node_name: "n1".to_owned(),
            ready: false,
            serving: false,
            terminating: false,
            ports: vec![EndpointPort {
                name: "http".to_owned(),
                protocol: "TCP".to_owned(),
                port: 8080
            }],
        }]
    );

    // The pod turns Ready: the whole service comes again, with the time it was observed.
    let before =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64;
    report_pod(&client, true).await;
    let (ready_update, state) = until(&mut stream, snapshot.revision, |u| {
        service_in(u, "default/web").filter(|s| s.endpoints.iter().any(|e| e.ready)).cloned()
    })
    .await;
    assert_eq!(state.endpoints.len(), 1);
    assert!(state.endpoints[0].serving && !state.endpoints[0].terminating);
    assert!(state.observed_unix_nanos >= before, "observed after the change was made");
    assert_eq!(state.cluster_ip, cluster_ip);

    // A headless service with ClientIP affinity and the Local internal traffic policy.
    let headless: Service = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}],
                 "sessionAffinity": "ClientIP", "internalTrafficPolicy": "Local"},
    }))
    .unwrap();
    client.create::<Service>(Some("default"), &headless).await.unwrap();
    let (db_update, db) =
        until(&mut stream, ready_update.revision, |u| service_in(u, "default/db").cloned()).await;
    assert_eq!(db.cluster_ip, "", "headless");
    assert_eq!(db.affinity_timeout_seconds, 10800);
    assert!(db.internal_traffic_local);

    client.delete::<Service>(Some("default"), "web", None).await.unwrap();
    let (removed, ()) = until(&mut stream, db_update.revision, |u| {
        u.services_removed.contains(&"default/web".to_owned()).then_some(())
    })
    .await;
    assert!(service_in(&removed, "default/web").is_none());

    // Reconnecting: a snapshot without web.
    let mut again =
        agent.watch(WatchRequest { node_name: "n2".to_owned() }).await.unwrap().into_inner();
    let fresh = next(&mut again).await;
    assert!(service_in(&fresh, "default/web").is_none());
    assert!(service_in(&fresh, "default/db").is_some());
}
