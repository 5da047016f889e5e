//! Object lifecycle through the API: finalizers hold a deletion, the garbage collector follows
//! ownerReferences in each propagation mode, and a terminating namespace empties itself, then
//! goes.

use std::time::Duration;

use http::Method;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::ReplicaSet,
        core::v1::{Event, Namespace, Pod, ResourceQuota, Service, ServicePort, ServiceSpec},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use strait_controlplane::{
    client::ApiClient,
    events::{Occurrence, object_reference, post_through_api},
    testing::{TestController, eventually, meta, namespace, pod},
};

/// Sends a DELETE with `options` (a `DeleteOptions` body) and returns the status code and body.
async fn delete_with<K: Resource>(
    client: &ApiClient,
    namespace: Option<&str>,
    name: &str,
    options: serde_json::Value,
) -> (u16, serde_json::Value) {
    let path = ApiClient::object_path::<K>(namespace, name);
    let body = serde_json::to_vec(&options).unwrap();
    let (status, bytes) =
        client.send(Method::DELETE, &path, "application/json", Some(body)).await.unwrap();
    (status.as_u16(), serde_json::from_slice(&bytes).unwrap_or_default())
}

fn owner_reference<
    K: Resource
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    owner: &K,
    block: bool,
) -> OwnerReference {
    OwnerReference {
        api_version: K::API_VERSION.to_owned(),
        kind: K::KIND.to_owned(),
        name: owner.metadata().name.clone().unwrap_or_default(),
        uid: owner.metadata().uid.clone().unwrap_or_default(),
        controller: None,
        block_owner_deletion: Some(block),
    }
}

/// A service without a selector: no endpoints, nothing else acts on it.
fn service(name: &str) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort { port: 80, ..ServicePort::default() }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A replica set of no pods: an owner nothing else acts on.
fn empty_replica_set(name: &str) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]},
            },
        },
    }))
    .unwrap()
}

fn with_owners<
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    mut object: K,
    owners: Vec<OwnerReference>,
) -> K {
    object.metadata_mut().owner_references = Some(owners);
    object
}

fn with_finalizer<
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    mut object: K,
    finalizer: &str,
) -> K {
    object.metadata_mut().finalizers = Some(vec![finalizer.to_owned()]);
    object
}

async fn exists<K: Resource + DeserializeOwned>(
    client: &ApiClient,
    namespace: Option<&str>,
    name: &str,
) -> bool {
    client.get::<K>(namespace, name).await.unwrap().is_some()
}

async fn wait_gone<K: Resource + DeserializeOwned>(
    client: &ApiClient,
    namespace: Option<&str>,
    name: &str,
) {
    eventually(&format!("{} {name} to be gone", K::KIND), 10, || async {
        (!exists::<K>(client, namespace, name).await).then_some(())
    })
    .await;
}

/// Removes every finalizer of an object (as the controller owning them would).
async fn release<K: Resource + Serialize + DeserializeOwned>(
    client: &ApiClient,
    namespace: Option<&str>,
    name: &str,
) {
    client
        .merge_patch::<K>(namespace, name, &json!({"metadata": {"finalizers": null}}), false)
        .await
        .unwrap();
}

const HOLD: &str = "example.com/hold";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizer_holds_a_deletion_until_it_is_removed() {
    let controller = TestController::start("lifecycle-finalizers").await;
    let client = controller.client();
    let held: Service =
        client.create(Some("default"), &with_finalizer(service("held"), HOLD)).await.unwrap();
    let cluster_ip = held.spec.as_ref().and_then(|s| s.cluster_ip.clone()).unwrap();

    let (code, answer) = delete_with::<Service>(&client, Some("default"), "held", json!({})).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer["metadata"]["deletionTimestamp"].is_string(), "{answer}");
    // Still there, marked for deletion, and deleting again changes nothing.
    let deleting: Service = client.get(Some("default"), "held").await.unwrap().unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(0));
    let (code, _) = delete_with::<Service>(&client, Some("default"), "held", json!({})).await;
    assert_eq!(code, 200);
    let again: Service = client.get(Some("default"), "held").await.unwrap().unwrap();
    assert_eq!(again.metadata.resource_version, deleting.metadata.resource_version);

    // Other changes are fine; new finalizers are not.
    client
        .merge_patch::<Service>(
            Some("default"),
            "held",
            &json!({"metadata": {"labels": {"a": "b"}}}),
            false,
        )
        .await
        .unwrap();
    let refused = client
        .merge_patch::<Service>(
            Some("default"),
            "held",
            &json!({"metadata": {"finalizers": [HOLD, "example.com/more"]}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("no new finalizers can be added"), "{refused}");

    // Its cluster IP is still taken while it is held...
    let mut twin = service("twin");
    twin.spec.as_mut().unwrap().cluster_ip = Some(cluster_ip.clone());
    let taken = client.create(Some("default"), &twin).await.unwrap_err();
    assert_eq!(taken.code(), Some(422), "{taken}");
    // ...and the update that removes the last finalizer removes the service and releases it.
    release::<Service>(&client, Some("default"), "held").await;
    assert!(!exists::<Service>(&client, Some("default"), "held").await);
    client.create(Some("default"), &twin).await.expect("the released cluster IP is free");

    let (code, answer) = delete_with::<Service>(
        &client,
        Some("default"),
        "twin",
        json!({"propagationPolicy": "Sideways"}),
    )
    .await;
    assert_eq!(code, 422, "{answer}");
    assert_eq!(answer["details"]["causes"][0]["field"], "propagationPolicy", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_deletion_removes_the_owner_at_once_and_a_chain_of_dependents_after() {
    let controller = TestController::start("lifecycle-background").await;
    let client = controller.client();
    let top: ReplicaSet = client.create(Some("default"), &empty_replica_set("top")).await.unwrap();
    let middle: Service = client
        .create(Some("default"), &with_owners(service("middle"), vec![owner_reference(&top, true)]))
        .await
        .unwrap();
    client
        .create(Some("default"), &with_owners(pod("leaf"), vec![owner_reference(&middle, true)]))
        .await
        .unwrap();
    // Nothing happens to dependents whose owners live.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(exists::<Pod>(&client, Some("default"), "leaf").await);

    let (code, _) = delete_with::<ReplicaSet>(
        &client,
        Some("default"),
        "top",
        json!({"propagationPolicy": "Background"}),
    )
    .await;
    assert_eq!(code, 200);
    assert!(!exists::<ReplicaSet>(&client, Some("default"), "top").await, "the owner goes at once");
    wait_gone::<Service>(&client, Some("default"), "middle").await;
    wait_gone::<Pod>(&client, Some("default"), "leaf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_waits_for_blocking_dependents_from_the_leaves_up() {
    let controller = TestController::start("lifecycle-foreground").await;
    let client = controller.client();
    let top: ReplicaSet = client.create(Some("default"), &empty_replica_set("top")).await.unwrap();
    let middle: Service = client
        .create(Some("default"), &with_owners(service("middle"), vec![owner_reference(&top, true)]))
        .await
        .unwrap();
    // The leaf is held by a finalizer: the chain above it must wait for it.
    client
        .create(
            Some("default"),
            &with_finalizer(with_owners(pod("leaf"), vec![owner_reference(&middle, true)]), HOLD),
        )
        .await
        .unwrap();
    // A dependent that does not block its owner is deleted too, but not waited for.
    client
        .create(Some("default"), &with_owners(pod("side"), vec![owner_reference(&top, false)]))
        .await
        .unwrap();

    let (code, answer) = delete_with::<ReplicaSet>(
        &client,
        Some("default"),
        "top",
        json!({"propagationPolicy": "Foreground"}),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["metadata"]["finalizers"], json!(["foregroundDeletion"]), "{answer}");
    let leaf = eventually("the leaf to be marked for deletion", 10, || async {
        let leaf: Pod = client.get(Some("default"), "leaf").await.unwrap()?;
        leaf.metadata.deletion_timestamp.is_some().then_some(leaf)
    })
    .await;
    assert_eq!(leaf.metadata.finalizers.as_deref(), Some(&[HOLD.to_owned()][..]));
    wait_gone::<Pod>(&client, Some("default"), "side").await;
    // The middle waits in the foreground too, and so does the top.
    let middle: Service =
        client.get(Some("default"), "middle").await.unwrap().expect("middle waits");
    assert!(middle.metadata.deletion_timestamp.is_some());
    assert_eq!(middle.metadata.finalizers.as_deref(), Some(&["foregroundDeletion".to_owned()][..]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        exists::<ReplicaSet>(&client, Some("default"), "top").await,
        "the top waits for the chain"
    );
    assert!(exists::<Service>(&client, Some("default"), "middle").await);

    release::<Pod>(&client, Some("default"), "leaf").await;
    wait_gone::<Pod>(&client, Some("default"), "leaf").await;
    wait_gone::<Service>(&client, Some("default"), "middle").await;
    wait_gone::<ReplicaSet>(&client, Some("default"), "top").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_deletion_keeps_dependents_without_their_reference_to_the_owner() {
    let controller = TestController::start("lifecycle-orphan").await;
    let client = controller.client();
    let top: ReplicaSet = client.create(Some("default"), &empty_replica_set("top")).await.unwrap();
    let keep = owner_reference(&top, true);
    client
        .create(Some("default"), &with_owners(service("middle"), vec![keep.clone()]))
        .await
        .unwrap();
    let other: ReplicaSet =
        client.create(Some("default"), &empty_replica_set("other")).await.unwrap();
    client
        .create(
            Some("default"),
            &with_owners(pod("shared"), vec![keep, owner_reference(&other, true)]),
        )
        .await
        .unwrap();

    let (code, answer) = delete_with::<ReplicaSet>(
        &client,
        Some("default"),
        "top",
        json!({"propagationPolicy": "Orphan"}),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    wait_gone::<ReplicaSet>(&client, Some("default"), "top").await;
    let middle: Service =
        client.get(Some("default"), "middle").await.unwrap().expect("orphaned, kept");
    assert_eq!(middle.metadata.owner_references, None);
    let shared: Pod = client.get(Some("default"), "shared").await.unwrap().expect("kept");
    let owners: Vec<String> =
        shared.metadata.owner_references.iter().flatten().map(|o| o.name.clone()).collect();
    assert_eq!(owners, ["other"], "only the reference to the orphaning owner went");
    // The legacy form says the same.
    let legacy: ReplicaSet =
        client.create(Some("default"), &empty_replica_set("legacy")).await.unwrap();
    client
        .create(Some("default"), &with_owners(pod("kept"), vec![owner_reference(&legacy, true)]))
        .await
        .unwrap();
    let (code, _) = delete_with::<ReplicaSet>(
        &client,
        Some("default"),
        "legacy",
        json!({"orphanDependents": true}),
    )
    .await;
    assert_eq!(code, 200);
    wait_gone::<ReplicaSet>(&client, Some("default"), "legacy").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept: Pod = client.get(Some("default"), "kept").await.unwrap().expect("orphaned, kept");
    assert_eq!(kept.metadata.owner_references, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_with_two_owners_goes_when_both_are_gone() {
    let controller = TestController::start("lifecycle-two-owners").await;
    let client = controller.client();
    let first: ReplicaSet =
        client.create(Some("default"), &empty_replica_set("first")).await.unwrap();
    let second: Service = client.create(Some("default"), &service("second")).await.unwrap();
    client
        .create(
            Some("default"),
            &with_owners(
                pod("shared"),
                vec![owner_reference(&first, true), owner_reference(&second, true)],
            ),
        )
        .await
        .unwrap();
    let (code, _) = delete_with::<ReplicaSet>(&client, Some("default"), "first", json!({})).await;
    assert_eq!(code, 200);
    let shared = eventually("the gone owner's reference to be dropped", 10, || async {
        let pod: Pod = client.get(Some("default"), "shared").await.unwrap()?;
        (pod.metadata.owner_references.as_ref()?.len() == 1).then_some(pod)
    })
    .await;
    assert!(shared.metadata.deletion_timestamp.is_none(), "a live owner keeps it");
    assert_eq!(shared.metadata.owner_references.unwrap()[0].name, "second");
    let (code, _) = delete_with::<Service>(&client, Some("default"), "second", json!({})).await;
    assert_eq!(code, 200);
    wait_gone::<Pod>(&client, Some("default"), "shared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_namespace_refuses_new_content_deletes_all_of_it_and_then_goes() {
    let controller = TestController::start("lifecycle-namespace").await;
    let client = controller.client();
    client.create(None, &namespace("team")).await.unwrap();
    let team = Some("team");
    client.create(team, &pod("loose")).await.unwrap();
    // Held by a finalizer, so that the namespace stays terminating while the test looks.
    client.create(team, &with_finalizer(pod("held"), HOLD)).await.unwrap();
    client.create(team, &service("web")).await.unwrap();
    let mut selecting = service("selecting");
    selecting.spec.as_mut().unwrap().selector =
        Some([("app".to_owned(), "front".to_owned())].into());
    client.create(team, &selecting).await.unwrap();
    let mut front = empty_replica_set("front");
    front.spec.as_mut().unwrap().replicas = Some(2);
    client.create(team, &front).await.unwrap();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "pods"}, "spec": {"hard": {"pods": "10"}},
    }))
    .unwrap();
    client.create(team, &quota).await.unwrap();
    let loose: Pod = client.get(team, "loose").await.unwrap().unwrap();
    let source =
        k8s_openapi::api::core::v1::EventSource { component: Some("test".to_owned()), host: None };
    post_through_api(
        &client,
        &source,
        &Occurrence::normal(object_reference(&loose), "Tested", "an event"),
    )
    .await
    .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "by-hand"}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.9.9"]}],
    }))
    .unwrap();
    client.create(team, &slice).await.unwrap();
    eventually("the replica set's pods", 10, || async {
        let (pods, _) = client.list::<Pod>(team, "labelSelector=app%3Dfront").await.ok()?;
        (pods.len() == 2).then_some(())
    })
    .await;

    let (code, answer) =
        delete_with::<Namespace>(&client, None, "team", json!({"propagationPolicy": "Background"}))
            .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"]["phase"], "Terminating", "{answer}");
    // Everything but the held pod goes; the namespace waits for it.
    eventually("the namespace to be emptied but for the held pod", 10, || async {
        let (pods, _) = client.list::<Pod>(team, "").await.ok()?;
        let (services, _) = client.list::<Service>(team, "").await.ok()?;
        let (sets, _) = client.list::<ReplicaSet>(team, "").await.ok()?;
        let (quotas, _) = client.list::<ResourceQuota>(team, "").await.ok()?;
        let (events, _) = client.list::<Event>(team, "").await.ok()?;
        let (slices, _) =
            client.list::<k8s_openapi::api::discovery::v1::EndpointSlice>(team, "").await.ok()?;
        let names: Vec<_> = pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        (names == ["held"]
            && services.is_empty()
            && sets.is_empty()
            && quotas.is_empty()
            && events.is_empty()
            && slices.is_empty())
        .then_some(())
    })
    .await;
    let held: Pod = client.get(team, "held").await.unwrap().unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    let terminating: Namespace =
        client.get(None, "team").await.unwrap().expect("still terminating");
    assert_eq!(terminating.status.unwrap().phase.as_deref(), Some("Terminating"));

    let refused = client.create(team, &pod("late")).await.unwrap_err();
    assert_eq!(refused.code(), Some(403), "{refused}");
    assert_eq!(refused.reason(), Some("Forbidden"));
    assert!(
        refused.to_string().contains(
            "unable to create new content in namespace team because it is being terminated"
        ),
        "{refused}"
    );
    let event_refused = post_through_api(
        &client,
        &source,
        &Occurrence::normal(object_reference(&held), "Tested", "too late"),
    )
    .await
    .unwrap_err();
    assert_eq!(event_refused.code(), Some(403), "{event_refused}");

    release::<Pod>(&client, team, "held").await;
    wait_gone::<Namespace>(&client, None, "team").await;
    // The name is free again, for a new, empty namespace.
    client.create(None, &namespace("team")).await.unwrap();
    let (pods, _) = client.list::<Pod>(team, "").await.unwrap();
    assert!(pods.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_across_namespaces_follow_kubernetes_rules() {
    use k8s_openapi::api::core::v1::Node;
    use strait_controlplane::testing::node;

    let controller = TestController::start("lifecycle-scopes").await;
    let client = controller.client();
    client.create(None, &namespace("other")).await.unwrap();
    let elsewhere: ReplicaSet =
        client.create(Some("other"), &empty_replica_set("elsewhere")).await.unwrap();
    // A namespaced owner is looked for in its dependent's namespace only: absent there, the
    // dependent goes, although an object with that uid lives in another namespace.
    client
        .create(
            Some("default"),
            &with_owners(pod("astray"), vec![owner_reference(&elsewhere, true)]),
        )
        .await
        .unwrap();
    // A cluster-scoped dependent cannot have a namespaced owner: the reference is
    // unresolvable and the node is never collected over it. (Not Ready: a Ready node would
    // get `astray` bound to it, and a bound pod's delete waits for a node agent this test
    // does not run.)
    client
        .create(
            None,
            &with_owners(
                node("owned-node", "172.20.0.7", false),
                vec![owner_reference(&elsewhere, true)],
            ),
        )
        .await
        .unwrap();
    wait_gone::<Pod>(&client, Some("default"), "astray").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(exists::<Node>(&client, None, "owned-node").await);
    assert!(exists::<ReplicaSet>(&client, Some("other"), "elsewhere").await);
}
