//! Deployments through the API: the kind (defaults, validation, generation, the `/scale`
//! subresource) and the deployment controller's rollouts, observed change by change.

use http::Method;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde_json::{Value, json};
use strait_controlplane::{client::ApiClient, testing::TestController};

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
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
    .expect("a deployment")
}

/// Sends `body` to `path` and returns the status code and the JSON answer.
async fn call(
    client: &ApiClient,
    method: Method,
    path: &str,
    content_type: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap());
    let (status, bytes) = client.send(method, path, content_type, body).await.unwrap();
    (status.as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_defaulted_validated_and_counts_its_spec_changes() {
    let server = TestController::start("deployments-kind").await;
    let client = server.client();
    let created =
        client.create::<Deployment>(Some("default"), &deployment("web", 2)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(spec.revision_history_limit, Some(10));

    // A spec change counts; a label change does not.
    let patched = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"spec": {"minReadySeconds": 3}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    let labelled = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"metadata": {"labels": {"team": "a"}}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));

    // The selector is immutable; a 422 names the field and nothing is changed.
    let error = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"spec": {"selector": {"matchLabels": {"app": "db"}},
                             "template": {"metadata": {"labels": {"app": "db"}}}}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.selector"), "{error}");
    let stored: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.generation, Some(2));

    // Both bounds zero is refused at creation, with the field.
    let mut frozen = serde_json::to_value(deployment("frozen", 1)).unwrap();
    frozen["spec"]["strategy"] = json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
    let (code, status) = call(
        &client,
        Method::POST,
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
        Some(frozen),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"], "spec.strategy.rollingUpdate.maxUnavailable",
        "{status}"
    );
    assert!(client.get::<Deployment>(Some("default"), "frozen").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_subresource_reads_and_writes_replicas_of_deployments_and_replica_sets() {
    let server = TestController::start("deployments-scale").await;
    let client = server.client();
    client.create::<Deployment>(Some("default"), &deployment("web", 2)).await.unwrap();
    let path = "/apis/apps/v1/namespaces/default/deployments/web/scale";
    let (code, scale) = call(&client, Method::GET, path, "", None).await;
    assert_eq!(code, 200, "{scale}");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["apiVersion"], "autoscaling/v1");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=web");

    // kubectl scale: a merge patch of the Scale.
    let (code, scale) = call(
        &client,
        Method::PATCH,
        path,
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": 5}})),
    )
    .await;
    assert_eq!((code, &scale["spec"]["replicas"]), (200, &json!(5)), "{scale}");
    let stored: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.spec.unwrap().replicas, Some(5));
    assert_eq!(stored.metadata.generation, Some(2), "a scale is a spec change");

    // PUT with a stale resourceVersion is a conflict; with the current one it writes.
    let mut stale = scale.clone();
    stale["metadata"]["resourceVersion"] = "1".into();
    stale["spec"]["replicas"] = 7.into();
    let (code, _) = call(&client, Method::PUT, path, "application/json", Some(stale)).await;
    assert_eq!(code, 409);
    let mut current = scale.clone();
    current["spec"]["replicas"] = 1.into();
    let (code, scale) = call(&client, Method::PUT, path, "application/json", Some(current)).await;
    assert_eq!((code, &scale["spec"]["replicas"]), (200, &json!(1)), "{scale}");

    // Negative replicas are refused by the object's validation.
    let (code, status) = call(
        &client,
        Method::PATCH,
        path,
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": -1}})),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["details"]["causes"][0]["field"], "spec.replicas", "{status}");

    // Replica sets scale the same way; discovery lists both subresources as autoscaling/v1.
    let set: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "cache"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cache"}},
                 "template": {"metadata": {"labels": {"app": "cache"}},
                              "spec": {"containers": [{"name": "c", "image": "strait/netexec"}]}}},
    }))
    .unwrap();
    client.create::<ReplicaSet>(Some("default"), &set).await.unwrap();
    let (code, scale) = call(
        &client,
        Method::PATCH,
        "/apis/apps/v1/namespaces/default/replicasets/cache/scale",
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": 0}})),
    )
    .await;
    assert_eq!((code, &scale["spec"]["replicas"]), (200, &json!(0)), "{scale}");
    let (_, resources) = call(&client, Method::GET, "/apis/apps/v1", "", None).await;
    for name in ["deployments/scale", "replicasets/scale"] {
        let entry = resources["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from discovery: {resources}"));
        assert_eq!((&entry["group"], &entry["version"]), (&json!("autoscaling"), &json!("v1")));
    }
    // Kinds without one answer 404.
    let (code, _) =
        call(&client, Method::GET, "/api/v1/namespaces/default/pods/x/scale", "", None).await;
    assert_eq!(code, 404);
}
