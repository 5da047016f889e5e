//! Nodes and their lifecycle through the API: leases in `kube-node-lease`, a node whose lease
//! lapses turning Unknown and tainted, its pods losing readiness and being evicted after
//! their toleration, and everything restored when the node comes back.

use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use strait_controlplane::testing::TestController;

fn lease(node: &str, duration: i32) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "renewTime": "2026-01-01T00:00:00.000000Z",
        },
    }))
    .expect("a lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_leases_are_created_renewed_and_validated_in_kube_node_lease() {
    let server = TestController::start("leases").await;
    let client = server.client();
    let created =
        client.create::<Lease>(Some("kube-node-lease"), &lease("node-1", 40)).await.unwrap();
    assert_eq!(created.spec.as_ref().unwrap().holder_identity.as_deref(), Some("node-1"));

    // Renewal: a PUT with the current resourceVersion; a stale one is a conflict.
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().renew_time =
        Some(serde_json::from_value(json!("2026-01-01T00:00:10.500000Z")).unwrap());
    let after = client.replace(Some("kube-node-lease"), "node-1", &renewed).await.unwrap();
    assert_ne!(after.metadata.resource_version, created.metadata.resource_version);
    let stale = client.replace(Some("kube-node-lease"), "node-1", &renewed).await.unwrap_err();
    assert_eq!(stale.code(), Some(409), "{stale}");
    let stored: Lease = client.get(Some("kube-node-lease"), "node-1").await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&stored.spec.unwrap().renew_time).unwrap(),
        json!("2026-01-01T00:00:10.500000Z"),
        "renewTime keeps its microseconds"
    );

    // Invalid durations are refused with the field named.
    let invalid = client.create::<Lease>(Some("kube-node-lease"), &lease("node-2", 0)).await;
    let error = invalid.unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.leaseDurationSeconds"), "{error}");

    // Listed under the coordination group.
    let (status, body) = client
        .send(
            http::Method::GET,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            "",
            None,
        )
        .await
        .unwrap();
    assert!(status.is_success());
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["kind"], "LeaseList");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
}
