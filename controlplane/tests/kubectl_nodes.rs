//! Stock kubectl (1.27 and 1.33) managing nodes: `get leases`, `describe node` with its lease,
//! `cordon`, `drain` (evictions through `pods/{name}/eviction`) and `uncordon`. The test plays
//! the node agents' part with `ApiClient` where one is needed (the final delete of a pod).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, eventually, node},
};
use support::kubectl::Kubectl;

/// The whitespace-separated cells of the line whose first cell is `name`.
fn row<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{output}"))
}

fn header(output: &str) -> &str {
    output.lines().next().unwrap_or_default()
}

/// Plays the node agents' part in a drain: a pod marked for deletion is stopped and removed
/// with grace 0 (only that incarnation of the name).
fn finish_deletions(client: ApiClient) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (pods, _) = client.list::<Pod>(None, "").await.unwrap();
            for pod in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_some()) {
                let uid = pod.metadata.uid.as_deref();
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                let namespace = pod.metadata.namespace.as_deref();
                let _ = client.delete_with_uid::<Pod>(namespace, name, Some(0), uid).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// `get leases`, `describe node` (with its lease), `cordon`, `drain` and `uncordon`.
async fn kubectl_manages_nodes(version: &str) {
    let server = TestController::start(&format!("kubectl-nodes-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    for (name, ip) in [("node-1", "172.20.0.11"), ("node-2", "172.20.0.12")] {
        client.create::<Node>(None, &node(name, ip, true)).await.unwrap();
    }
    // node-1's agent holds its lease.
    let lease: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": "node-1", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 40,
                 "renewTime": "2026-01-01T00:00:00.000000Z"},
    }))
    .unwrap();
    client.create(Some("kube-node-lease"), &lease).await.unwrap();
    let leases = kubectl.ok(&["get", "leases", "-n", "kube-node-lease"]).await;
    assert_eq!(header(&leases).split_whitespace().collect::<Vec<_>>(), ["NAME", "HOLDER", "AGE"]);
    assert_eq!(row(&leases, "node-1")[1], "node-1");
    let described = kubectl.ok(&["describe", "node", "node-1"]).await;
    for expected in ["HolderIdentity:  node-1", "RenewTime:", "Unschedulable:      false"] {
        assert!(described.contains(expected), "{expected:?} in:\n{described}");
    }
    assert!(!described.contains("Failed to get lease"), "{described}");

    // Two pods of a replica set, one on each node, running.
    let set = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: strait/netexec}]
";
    let manifest = kubectl.dir().join("web-rs.yaml");
    std::fs::write(&manifest, set).unwrap();
    kubectl.ok(&["create", "-f", manifest.to_str().unwrap()]).await;
    let on_node = |pods: &[Pod], node: &str| -> Vec<String> {
        pods.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter_map(|p| p.metadata.name.clone())
            .collect()
    };
    let first = eventually("a web pod on each node", 10, || async {
        let (pods, _) = client.list::<Pod>(Some("default"), "").await.unwrap();
        let one = on_node(&pods, "node-1");
        (one.len() == 1 && on_node(&pods, "node-2").len() == 1).then(|| one[0].clone())
    })
    .await;

    // cordon: a strategic merge patch; the node controller adds the unschedulable taint.
    let cordoned = kubectl.ok(&["cordon", "node-1"]).await;
    assert_eq!(cordoned.trim(), "node/node-1 cordoned");
    let nodes = kubectl.ok(&["get", "nodes"]).await;
    assert_eq!(row(&nodes, "node-1")[1], "Ready,SchedulingDisabled");
    eventually("the unschedulable taint", 10, || async {
        let n: Node = client.get(None, "node-1").await.unwrap()?;
        n.spec?.taints?.iter().any(|t| t.key == "node.kubernetes.io/unschedulable").then_some(())
    })
    .await;
    let described = kubectl.ok(&["describe", "node", "node-1"]).await;
    assert!(
        described.contains("node.kubernetes.io/unschedulable:NoSchedule")
            && described.contains("Unschedulable:      true"),
        "{described}"
    );

    // drain: lists the node's pods by field selector, evicts them through pods/eviction and
    // waits until they are gone; the replica set replaces the pod on node-2.
    let agent = finish_deletions(client.clone());
    let drained = kubectl
        .ok(&[
            "drain",
            "node-1",
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=30s",
        ])
        .await;
    agent.abort();
    assert!(drained.contains(&format!("pod/{first} evicted")), "{drained}");
    assert!(drained.contains("node/node-1 drained"), "{drained}");
    assert!(client.get::<Pod>(Some("default"), &first).await.unwrap().is_none());
    eventually("the replacement on node-2", 10, || async {
        let (pods, _) = client.list::<Pod>(Some("default"), "").await.unwrap();
        (on_node(&pods, "node-1").is_empty() && on_node(&pods, "node-2").len() == 2).then_some(())
    })
    .await;

    // An eviction of a pod that does not exist is a 404, as kubectl shows it.
    let (status, _) = client
        .send(
            http::Method::POST,
            "/api/v1/namespaces/default/pods/nothing/eviction",
            "application/json",
            Some(
                br#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"nothing"}}"#
                    .to_vec(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::NOT_FOUND);

    let uncordoned = kubectl.ok(&["uncordon", "node-1"]).await;
    assert_eq!(uncordoned.trim(), "node/node-1 uncordoned");
    eventually("node-1 schedulable without taints", 10, || async {
        let n: Node = client.get(None, "node-1").await.unwrap()?;
        let spec = n.spec?;
        (spec.unschedulable != Some(true) && spec.taints.unwrap_or_default().is_empty())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_manages_nodes() {
    kubectl_manages_nodes("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_manages_nodes() {
    kubectl_manages_nodes("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_manages_nodes() {
    kubectl_manages_nodes("1.33").await;
}
