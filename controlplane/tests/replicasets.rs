//! ReplicaSets through the API: the controller keeps the count, replaces what is deleted,
//! scales both ways, and takes its pods with it when it goes.

use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use serde_json::json;
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, eventually},
};

fn replica_set(name: &str, replicas: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
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

/// Names of the pods the set controls and that are not being deleted.
async fn active_pods(client: &ApiClient, set: &str) -> Vec<String> {
    let (pods, _) =
        client.list::<Pod>(Some("default"), &format!("labelSelector=app%3D{set}")).await.unwrap();
    let mut names: Vec<String> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "ReplicaSet" && o.name == set && o.controller == Some(true))
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_keeps_its_count_replaces_deleted_pods_scales_and_cascades() {
    let server = TestController::start("replicasets").await;
    let client = server.client();
    client.create::<ReplicaSet>(Some("default"), &replica_set("web", 3)).await.unwrap();
    let first = eventually("three pods", 10, || async {
        let pods = active_pods(&client, "web").await;
        (pods.len() == 3).then_some(pods)
    })
    .await;
    assert!(first.iter().all(|n| n.starts_with("web-")), "{first:?}");
    // The count stays three: no pass makes a fourth while its cache catches up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(active_pods(&client, "web").await.len(), 3);

    // A deleted pod is replaced by a new one.
    client.delete::<Pod>(Some("default"), &first[0], None).await.unwrap();
    let replaced = eventually("a replacement pod", 10, || async {
        let pods = active_pods(&client, "web").await;
        (pods.len() == 3 && !pods.contains(&first[0])).then_some(pods)
    })
    .await;
    assert_eq!(replaced.iter().filter(|n| first.contains(n)).count(), 2);

    // Status follows.
    let set = eventually("status.replicas = 3", 10, || async {
        let set: ReplicaSet = client.get(Some("default"), "web").await.unwrap()?;
        (set.status.as_ref()?.replicas == 3).then_some(set)
    })
    .await;
    assert_eq!(set.status.unwrap().observed_generation, Some(1));

    // Scale down to one, then up to two.
    client
        .merge_patch::<ReplicaSet>(Some("default"), "web", &json!({"spec": {"replicas": 1}}), false)
        .await
        .unwrap();
    eventually("one pod", 10, || async {
        (active_pods(&client, "web").await.len() == 1).then_some(())
    })
    .await;
    client
        .merge_patch::<ReplicaSet>(Some("default"), "web", &json!({"spec": {"replicas": 2}}), false)
        .await
        .unwrap();
    eventually("two pods", 10, || async {
        (active_pods(&client, "web").await.len() == 2).then_some(())
    })
    .await;

    // Deleting the set deletes its pods.
    client.delete::<ReplicaSet>(Some("default"), "web", None).await.unwrap();
    eventually("no pods left", 10, || async {
        let (pods, _) =
            client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
        pods.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_whose_selector_misses_its_template_is_refused() {
    let server = TestController::start("replicasets-invalid").await;
    let client = server.client();
    let mut set = replica_set("web", 1);
    set.spec.as_mut().unwrap().selector.match_labels =
        Some([("app".to_owned(), "other".to_owned())].into());
    let error = client.create::<ReplicaSet>(Some("default"), &set).await.unwrap_err();
    assert!(error.to_string().contains("spec.template.metadata.labels"), "{error}");
    assert!(client.get::<ReplicaSet>(Some("default"), "web").await.unwrap().is_none());
}
