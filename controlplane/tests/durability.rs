//! A controller stopped and started again on the same data directory serves the same cluster:
//! every object, every resource version, every pod CIDR, and the history that watches resume
//! from.

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Node, Pod},
    apimachinery::pkg::apis::meta::v1::WatchEvent,
};
use strait_controlplane::testing::{TestController, namespace, node, pod_on};

fn pod_cidr(node: &Node) -> String {
    node.spec.as_ref().and_then(|s| s.pod_cidr.clone()).expect("the node has a pod CIDR")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_objects_revisions_and_pod_cidrs() {
    let mut server = TestController::start("durability").await;
    let client = server.client();
    client.create::<Namespace>(None, &namespace("team")).await.unwrap();
    let n1: Node = client.create(None, &node("n1", "172.20.0.1", true)).await.unwrap();
    let n2: Node = client.create(None, &node("n2", "172.20.0.2", true)).await.unwrap();
    client.create::<Pod>(Some("team"), &pod_on("api", "n1")).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_on("web", "n2")).await.unwrap();
    let (pods_before, revision_before) = client.list::<Pod>(None, "").await.unwrap();
    let (nodes_before, _) = client.list::<Node>(None, "").await.unwrap();
    let (namespaces_before, _) = client.list::<Namespace>(None, "").await.unwrap();
    // A change after the noted revision, for the watch to find after the restart.
    client.create::<Pod>(Some("default"), &pod_on("late", "n1")).await.unwrap();

    server.restart().await;
    let client = server.client();
    let (pods_after, _) = client.list::<Pod>(None, "").await.unwrap();
    let (nodes_after, _) = client.list::<Node>(None, "").await.unwrap();
    let (namespaces_after, revision_after) = client.list::<Namespace>(None, "").await.unwrap();
    let identity = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (meta.namespace.clone(), meta.name.clone(), meta.uid.clone(), meta.resource_version.clone())
    };
    for before in &pods_before {
        assert!(
            pods_after.iter().any(|after| identity(&after.metadata) == identity(&before.metadata)),
            "pod {:?} survived with the same uid and resourceVersion",
            before.metadata.name
        );
    }
    assert_eq!(pods_after.len(), pods_before.len() + 1);
    assert_eq!(
        nodes_after.iter().map(|n| (identity(&n.metadata), pod_cidr(n))).collect::<Vec<_>>(),
        nodes_before.iter().map(|n| (identity(&n.metadata), pod_cidr(n))).collect::<Vec<_>>()
    );
    assert_eq!(
        namespaces_after.iter().map(|n| identity(&n.metadata)).collect::<Vec<_>>(),
        namespaces_before.iter().map(|n| identity(&n.metadata)).collect::<Vec<_>>(),
        "the system namespaces are not created again"
    );
    assert!(revision_after.parse::<u64>().unwrap() > revision_before.parse::<u64>().unwrap());

    // History survived: a watch from before the restart sees the change made after it.
    let mut watch =
        client.watch::<Pod>(None, &format!("resourceVersion={revision_before}")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(pod) => assert_eq!(pod.metadata.name.as_deref(), Some("late")),
        other => panic!("expected the late pod, got {other:?}"),
    }

    // New allocations do not collide with the ones made before the restart.
    let n3: Node = client.create(None, &node("n3", "172.20.0.3", true)).await.unwrap();
    let mut taken: HashSet<String> = [pod_cidr(&n1), pod_cidr(&n2)].into();
    assert!(taken.insert(pod_cidr(&n3)), "n3 got a pod CIDR already in use");

    // A released block may be reused; the others stay taken, across another restart.
    assert!(client.delete::<Node>(None, "n1", None).await.unwrap());
    server.restart().await;
    let client = server.client();
    let n4: Node = client.create(None, &node("n4", "172.20.0.4", true)).await.unwrap();
    assert_ne!(pod_cidr(&n4), pod_cidr(&n2));
    assert_ne!(pod_cidr(&n4), pod_cidr(&n3));
    let (nodes, _) = client.list::<Node>(None, "").await.unwrap();
    let cidrs: HashSet<String> = nodes.iter().map(pod_cidr).collect();
    assert_eq!(cidrs.len(), nodes.len(), "no two nodes share a pod CIDR: {cidrs:?}");
}
