//! ConfigMaps through the API: stored and updated as sent, an invalid one refused with 422
//! naming its field (nothing stored), an immutable one keeps its data; a pod that refers to
//! volumes or ConfigMap keys wrongly is refused naming the field.

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};
use strait_controlplane::{client::ApiClient, testing::TestController};

const COLLECTION: &str = "/api/v1/namespaces/default/configmaps";

async fn send(client: &ApiClient, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    let content_type =
        if method == Method::PATCH { "application/merge-patch+json" } else { "application/json" };
    let (code, answer) = client
        .send(method, path, content_type, Some(serde_json::to_vec(&body).unwrap()))
        .await
        .expect("the API answers");
    (code, serde_json::from_slice(&answer).expect("a JSON answer"))
}

fn causes(status: &Value) -> Vec<String> {
    status["details"]["causes"]
        .as_array()
        .expect("causes")
        .iter()
        .map(|c| c["field"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_maps_are_validated_stored_and_immutable_ones_keep_their_data() {
    let server = TestController::start("config-maps").await;
    let client = server.client();

    let game = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "game"},
        "data": {"lives": "3", "game.properties": "enemies=aliens\n"},
        "binaryData": {"logo.bin": "AAEC"},
    });
    let (code, stored) = send(&client, Method::POST, COLLECTION, game).await;
    assert_eq!(code, StatusCode::CREATED, "{stored}");
    let read: ConfigMap = client.get(Some("default"), "game").await.unwrap().expect("stored");
    assert_eq!(read.data.as_ref().unwrap()["lives"], "3");
    assert_eq!(read.binary_data.as_ref().unwrap()["logo.bin"].0, [0u8, 1, 2]);

    let bad = json!({
        "metadata": {"name": "bad"},
        "data": {"a/b": "x", "dup": "y"},
        "binaryData": {"dup": "AA=="},
    });
    let (code, status) = send(&client, Method::POST, COLLECTION, bad).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(causes(&status), ["data[a/b]", "data[dup]"]);
    assert!(client.get::<ConfigMap>(Some("default"), "bad").await.unwrap().is_none());

    let huge = json!({"metadata": {"name": "huge"}, "data": {"big": "x".repeat(1024 * 1024 + 1)}});
    let (code, status) = send(&client, Method::POST, COLLECTION, huge).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(status["details"]["causes"][0]["reason"], "FieldValueTooLong");

    // Mutable: data changes; then it is made immutable, after which data cannot change and
    // immutability cannot be undone, while labels still can.
    let path = format!("{COLLECTION}/game");
    let (code, _) = send(&client, Method::PATCH, &path, json!({"data": {"lives": "4"}})).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = send(&client, Method::PATCH, &path, json!({"immutable": true})).await;
    assert_eq!(code, StatusCode::OK);
    let (code, status) = send(&client, Method::PATCH, &path, json!({"data": {"lives": "5"}})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(causes(&status), ["data"]);
    let (code, status) = send(&client, Method::PATCH, &path, json!({"immutable": false})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(causes(&status), ["immutable"]);
    let labelled = json!({"metadata": {"labels": {"tier": "game"}}});
    let (code, _) = send(&client, Method::PATCH, &path, labelled).await;
    assert_eq!(code, StatusCode::OK);
    let read: ConfigMap = client.get(Some("default"), "game").await.unwrap().expect("stored");
    assert_eq!(read.data.as_ref().unwrap()["lives"], "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_mounting_no_volume_or_a_bad_key_is_refused_naming_the_field() {
    let server = TestController::start("pod-volumes").await;
    let client = server.client();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {
            "volumes": [{"name": "config", "configMap": {"name": "app"}}],
            "containers": [{
                "name": "web", "image": "strait/netexec",
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "env": [{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "a/b"}}}],
            }],
        },
    });
    let (code, status) = send(&client, Method::POST, "/api/v1/namespaces/default/pods", pod).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(
        causes(&status),
        [
            "spec.containers[0].volumeMounts[0].name",
            "spec.containers[0].env[0].valueFrom.configMapKeyRef.key",
        ]
    );
    assert_eq!(status["details"]["causes"][0]["reason"], "FieldValueNotFound");
    assert!(
        status["message"].as_str().unwrap().contains("volumeMounts[0].name: Not found: \"data\""),
        "{status}"
    );
}
