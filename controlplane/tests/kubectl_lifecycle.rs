//! Stock kubectl (1.27 and 1.33) against a controller on loopback: `delete --cascade=…` on a
//! replica set, and events in `describe pod`, `describe node`, `get events` and `events`. The
//! test posts the node agent's events itself, through the API as an agent does.

mod support;

use std::time::Duration;

use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{EventSource, Node, ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::json;
use strait_controlplane::{
    client::ApiClient,
    events::{Occurrence, container_reference, post_through_api},
    testing::{TestController, eventually, node, pod},
};
use support::kubectl::Kubectl;

fn replica_set(name: &str, replicas: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]},
            },
        },
    }))
    .expect("a replica set")
}

/// The pods labelled `app=<name>`.
async fn pods_of(client: &ApiClient, name: &str) -> Vec<Pod> {
    client.list::<Pod>(Some("default"), &format!("labelSelector=app%3D{name}")).await.unwrap().0
}

/// Creates a replica set and waits for its pods.
async fn running_set(client: &ApiClient, name: &str, replicas: usize) -> ReplicaSet {
    let set = client
        .create(Some("default"), &replica_set(name, i32::try_from(replicas).unwrap()))
        .await
        .unwrap();
    eventually(&format!("{replicas} pods of {name}"), 10, || async {
        (pods_of(client, name).await.len() == replicas).then_some(())
    })
    .await;
    set
}

async fn kubectl_deletes_replica_sets_with_each_cascade(version: &str) {
    let server = TestController::start(&format!("kubectl-cascade-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    running_set(&client, "kept", 2).await;
    kubectl.ok(&["delete", "replicaset", "kept", "--cascade=orphan"]).await;
    assert!(client.get::<ReplicaSet>(Some("default"), "kept").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let orphans = pods_of(&client, "kept").await;
    assert_eq!(orphans.len(), 2, "orphaned pods stay");
    assert!(orphans.iter().all(|p| p.metadata.owner_references.is_none()), "{orphans:#?}");

    running_set(&client, "gone", 2).await;
    kubectl.ok(&["delete", "rs", "gone", "--cascade=background"]).await;
    assert!(client.get::<ReplicaSet>(Some("default"), "gone").await.unwrap().is_none());
    eventually("the background-deleted set's pods to go", 10, || async {
        pods_of(&client, "gone").await.is_empty().then_some(())
    })
    .await;

    // Foreground: a dependent held by a finalizer keeps the set until it goes.
    let set = running_set(&client, "front", 1).await;
    let mut held = pod("front-held");
    held.metadata.finalizers = Some(vec!["example.com/hold".to_owned()]);
    held.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".to_owned(),
        kind: "ReplicaSet".to_owned(),
        name: "front".to_owned(),
        uid: set.metadata.uid.clone().unwrap(),
        controller: None,
        block_owner_deletion: Some(true),
    }]);
    client.create(Some("default"), &held).await.unwrap();
    kubectl.ok(&["delete", "rs", "front", "--cascade=foreground", "--wait=false"]).await;
    let waiting = eventually("the set's other pod to go first", 10, || async {
        let set: ReplicaSet = client.get(Some("default"), "front").await.unwrap()?;
        pods_of(&client, "front").await.is_empty().then_some(set)
    })
    .await;
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert_eq!(waiting.metadata.finalizers, Some(vec!["foregroundDeletion".to_owned()]));
    let listed = kubectl.ok(&["get", "rs", "front", "-o", "jsonpath={.metadata.finalizers}"]).await;
    assert!(listed.contains("foregroundDeletion"), "{listed}");
    client
        .merge_patch::<Pod>(
            Some("default"),
            "front-held",
            &json!({"metadata": {"finalizers": null}}),
            false,
        )
        .await
        .unwrap();
    // kubectl waits for the owner to go once its last dependent has.
    kubectl.ok(&["wait", "--for=delete", "rs/front", "--timeout=10s"]).await;
    assert!(client.get::<Pod>(Some("default"), "front-held").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_deletes_replica_sets_with_each_cascade() {
    kubectl_deletes_replica_sets_with_each_cascade("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_deletes_replica_sets_with_each_cascade() {
    kubectl_deletes_replica_sets_with_each_cascade("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_deletes_replica_sets_with_each_cascade() {
    kubectl_deletes_replica_sets_with_each_cascade("1.33").await;
}

async fn kubectl_shows_events(version: &str) {
    let server = TestController::start(&format!("kubectl-events-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    let node_1: Node = client.create(None, &node("node-1", "172.20.0.1", true)).await.unwrap();
    client.create(Some("default"), &pod("web")).await.unwrap();
    let web = eventually("web to be scheduled", 10, || async {
        let pod: Pod = client.get(Some("default"), "web").await.unwrap()?;
        pod.spec.as_ref()?.node_name.is_some().then_some(pod)
    })
    .await;
    // What node-1's agent reports.
    let agent =
        EventSource { component: Some("kubelet".to_owned()), host: Some("node-1".to_owned()) };
    let app = container_reference(&web, "app");
    post_through_api(
        &client,
        &agent,
        &Occurrence::normal(app.clone(), "Started", "Started container app"),
    )
    .await
    .unwrap();
    let backoff = Occurrence::warning(app, "BackOff", "Back-off restarting failed container app");
    for _ in 0..3 {
        post_through_api(&client, &agent, &backoff).await.unwrap();
    }
    let node_ref = ObjectReference {
        kind: Some("Node".to_owned()),
        name: Some("node-1".to_owned()),
        uid: node_1.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    post_through_api(
        &client,
        &agent,
        &Occurrence::normal(node_ref, "NodeReady", "Node node-1 status is now: NodeReady"),
    )
    .await
    .unwrap();
    // The scheduler's event is written in the background.
    eventually("the Scheduled event", 10, || async {
        let shown = kubectl.run(&["get", "events", "--field-selector", "reason=Scheduled"]).await;
        shown.stdout.contains("pod/web").then_some(())
    })
    .await;

    let described = kubectl.ok(&["describe", "pod", "web"]).await;
    let events =
        described.split("Events:").nth(1).unwrap_or_else(|| panic!("no events: {described}"));
    for expected in [
        "Scheduled",
        "default-scheduler",
        "Successfully assigned default/web to node-1",
        "Started",
        "Started container app",
        "BackOff",
        "(x3 over",
        "Back-off restarting failed container app",
        "kubelet",
    ] {
        assert!(events.contains(expected), "describe pod shows {expected:?}:\n{events}");
    }
    assert!(!events.contains("NodeReady"), "only the pod's own events:\n{events}");

    let described = kubectl.ok(&["describe", "node", "node-1"]).await;
    let events =
        described.split("Events:").nth(1).unwrap_or_else(|| panic!("no events: {described}"));
    assert!(
        events.contains("NodeReady") && events.contains("Node node-1 status is now: NodeReady"),
        "{events}"
    );
    assert!(!events.contains("BackOff"), "only the node's own events:\n{events}");

    let listed = kubectl.ok(&["get", "events"]).await;
    let header: Vec<&str> = listed.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], "{listed}");
    let backoff_row =
        listed.lines().find(|l| l.contains("BackOff")).unwrap_or_else(|| panic!("{listed}"));
    assert!(backoff_row.contains("Warning") && backoff_row.contains("pod/web"), "{backoff_row}");
    assert!(listed.contains("node/node-1"), "{listed}");
    let wide =
        kubectl.ok(&["get", "events", "-o", "wide", "--field-selector", "reason=BackOff"]).await;
    let wide_header = wide.lines().next().unwrap_or_default();
    for column in ["SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"] {
        assert!(wide_header.contains(column), "{wide_header}");
    }
    let row = wide.lines().nth(1).unwrap_or_default();
    assert!(row.contains("spec.containers{app}") && row.contains("kubelet, node-1"), "{row}");
    assert!(row.split_whitespace().any(|cell| cell == "3"), "the count: {row}");
    assert_eq!(wide.lines().count(), 2, "one aggregated event: {wide}");

    let all = kubectl.ok(&["events", "-A"]).await;
    assert!(all.contains("Successfully assigned default/web to node-1"), "{all}");
    let for_pod = kubectl.ok(&["events", "--for", "pod/web"]).await;
    assert!(for_pod.contains("BackOff") && !for_pod.contains("NodeReady"), "{for_pod}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_shows_events() {
    kubectl_shows_events("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_shows_events() {
    kubectl_shows_events("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_shows_events() {
    kubectl_shows_events("1.33").await;
}
