//! The endpoint slice controller as a user sees it through the API: pods whose status an agent
//! reports turn into EndpointSlice endpoints with Kubernetes' conditions.

use std::time::Duration;

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::{Endpoint, EndpointSlice},
};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, eventually, node, pod_on},
};

const SERVICE_SELECTOR: &str = "labelSelector=kubernetes.io/service-name%3Dweb";

fn web_pod(name: &str, http_port: Option<i32>) -> Pod {
    let mut pod = pod_on(name, "n1");
    pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    if let Some(port) = http_port {
        pod.spec.as_mut().unwrap().containers[0].ports = Some(vec![
            serde_json::from_value(json!({"name": "http", "containerPort": port})).unwrap(),
        ]);
    }
    pod
}

/// Reports the pod running with `ip`, Ready or not, as a node agent does.
async fn report(client: &ApiClient, name: &str, ip: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    client
        .merge_patch::<Pod>(
            Some("default"),
            name,
            &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": status}]}}),
            true,
        )
        .await
        .unwrap();
}

async fn slices(client: &ApiClient) -> Vec<EndpointSlice> {
    client.list::<EndpointSlice>(Some("default"), SERVICE_SELECTOR).await.unwrap().0
}

/// The endpoint of `pod` and the target port of its slice, once `check` holds for it.
async fn endpoint_of(
    client: &ApiClient,
    pod: &str,
    what: &str,
    check: impl Fn(&Endpoint) -> bool,
) -> (Endpoint, i32) {
    eventually(what, 10, || async {
        slices(client).await.into_iter().find_map(|slice| {
            let port = slice.ports.as_ref()?.first()?.port?;
            slice
                .endpoints
                .iter()
                .find(|e| e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(pod))
                .filter(|e| check(e))
                .map(|e| (e.clone(), port))
        })
    })
    .await
}

fn conditions(endpoint: &Endpoint) -> (Option<bool>, Option<bool>, Option<bool>) {
    let c = endpoint.conditions.clone().unwrap_or_default();
    (c.ready, c.serving, c.terminating)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_become_endpoints_with_kubernetes_conditions() {
    let server = TestController::start("endpointslices").await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.11", true)).await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    let service = client.create(Some("default"), &service).await.unwrap();
    for (name, port) in [("a", Some(8080)), ("b", Some(9090)), ("c", None)] {
        client.create::<Pod>(Some("default"), &web_pod(name, port)).await.unwrap();
    }
    let mut other = web_pod("other", Some(8080));
    other.metadata.labels = Some([("app".to_owned(), "db".to_owned())].into());
    client.create::<Pod>(Some("default"), &other).await.unwrap();
    report(&client, "a", "10.244.0.5", true).await;
    report(&client, "b", "10.244.0.6", false).await;
    report(&client, "c", "10.244.0.7", true).await;
    report(&client, "other", "10.244.0.8", true).await;

    let (a, a_port) = endpoint_of(&client, "a", "a's endpoint", |_| true).await;
    assert_eq!(a.addresses, ["10.244.0.5"]);
    assert_eq!(conditions(&a), (Some(true), Some(true), Some(false)));
    assert_eq!(a.node_name.as_deref(), Some("n1"));
    assert_eq!(a.target_ref.as_ref().unwrap().kind.as_deref(), Some("Pod"));
    assert_eq!(a_port, 8080, "the named port resolves in a's containers");
    let (b, b_port) = endpoint_of(&client, "b", "b's endpoint", |_| true).await;
    assert_eq!(conditions(&b), (Some(false), Some(false), Some(false)), "b is not Ready");
    assert_eq!(b_port, 9090, "b resolves the same name to another number");

    let all = slices(&client).await;
    assert_eq!(all.len(), 2, "one slice per port set: {all:?}");
    let endpoints: Vec<&Endpoint> = all.iter().flat_map(|s| &s.endpoints).collect();
    assert_eq!(endpoints.len(), 2, "c lacks the named port, `other` is not selected");
    for slice in &all {
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            "endpointslice-controller.strait.io"
        );
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Service", Some(true)));
        assert_eq!(Some(&owner.uid), service.metadata.uid.as_ref());
        assert_eq!(slice.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
    }

    // b turns Ready.
    report(&client, "b", "10.244.0.6", true).await;
    endpoint_of(&client, "b", "b to be ready", |e| conditions(e).0 == Some(true)).await;

    // Graceful deletion: a keeps serving while it terminates, and is no longer ready.
    client.delete::<Pod>(Some("default"), "a", None).await.unwrap();
    let (a, _) =
        endpoint_of(&client, "a", "a to be terminating", |e| conditions(e).2 == Some(true)).await;
    assert_eq!(conditions(&a), (Some(false), Some(true), Some(true)));

    // publishNotReadyAddresses: an unready pod is ready, a terminating one still is not.
    report(&client, "b", "10.244.0.6", false).await;
    endpoint_of(&client, "b", "b to be unready", |e| conditions(e).0 == Some(false)).await;
    client
        .merge_patch::<Service>(
            Some("default"),
            "web",
            &json!({"spec": {"publishNotReadyAddresses": true}}),
            false,
        )
        .await
        .unwrap();
    let (b, _) = endpoint_of(&client, "b", "b published", |e| conditions(e).0 == Some(true)).await;
    assert_eq!(conditions(&b), (Some(true), Some(false), Some(false)));
    let (a, _) = endpoint_of(&client, "a", "a still terminating", |_| true).await;
    assert_eq!(conditions(&a).0, Some(false));

    // The pod removed for good leaves its slice; the service deleted takes its slices along.
    client.delete::<Pod>(Some("default"), "a", Some(0)).await.unwrap();
    eventually("a's endpoint to go", 10, || async {
        let all = slices(&client).await;
        let names: Vec<String> = all
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .collect();
        (!names.contains(&"a".to_owned()) && all.len() == 1).then_some(())
    })
    .await;
    client.delete::<Service>(Some("default"), "web", None).await.unwrap();
    eventually("the slices of the deleted service to go", 10, || async {
        slices(&client).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_of_a_service_without_selector_belong_to_the_user() {
    let server = TestController::start("endpointslices-manual").await;
    let client = server.client();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]},
    }))
    .unwrap();
    client.create::<Service>(Some("default"), &service).await.unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-manual", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap();
    let created = client.create(Some("default"), &slice).await.unwrap();
    // Give the controller time to (wrongly) act on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = slices(&client).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].metadata.resource_version, created.metadata.resource_version);

    // Slices are validated like Kubernetes does.
    let mut bad: Value = serde_json::to_value(&slice).unwrap();
    bad["metadata"]["name"] = "bad".into();
    bad["endpoints"][0]["addresses"][0] = "not-an-ip".into();
    let bad: EndpointSlice = serde_json::from_value(bad).unwrap();
    let error = client.create(Some("default"), &bad).await.unwrap_err();
    assert_eq!(error.code(), Some(422));
    assert!(error.to_string().contains("endpoints[0].addresses[0]"), "{error}");
}
