//! ResourceQuota admission: a pod that would take its namespace past a quota is refused with
//! 403 and the reason, nothing is stored, and racing creates never overshoot.

use http::StatusCode;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use serde_json::json;
use strait_controlplane::testing::{TestController, pod};

fn quota(name: &str, hard: serde_json::Value) -> ResourceQuota {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"hard": hard}})).unwrap()
}

fn pod_with_cpu(name: &str, cpu: &str) -> Pod {
    let mut p = pod(name);
    p.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(json!({"requests": {"cpu": cpu}})).unwrap());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_past_the_quota_is_refused_with_the_reason_and_fits_once_room_is_made() {
    let server = TestController::start("quota").await;
    let client = server.client();
    client
        .create::<ResourceQuota>(
            Some("default"),
            &quota("compute", json!({"pods": "2", "requests.cpu": "1"})),
        )
        .await
        .unwrap();
    client.create::<Pod>(Some("default"), &pod_with_cpu("a", "500m")).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_with_cpu("b", "500m")).await.unwrap();
    let body = serde_json::to_vec(&pod_with_cpu("c", "250m")).unwrap();
    let (code, answer) = client
        .send(http::Method::POST, "/api/v1/namespaces/default/pods", "application/json", Some(body))
        .await
        .unwrap();
    assert_eq!(code, StatusCode::FORBIDDEN);
    let status: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(
        status["message"],
        "pods \"c\" is forbidden: exceeded quota: compute, requested: pods=1,requests.cpu=250m, used: pods=2,requests.cpu=1, limited: pods=2,requests.cpu=1"
    );
    assert!(client.get::<Pod>(Some("default"), "c").await.unwrap().is_none(), "nothing stored");
    let recorded: ResourceQuota = client.get(Some("default"), "compute").await.unwrap().unwrap();
    let used = recorded.status.unwrap().used.unwrap();
    assert_eq!(used["pods"].0, "2");
    assert_eq!(used["requests.cpu"].0, "1");

    // Room made (an unscheduled pod goes at once): the same pod now fits.
    client.delete::<Pod>(Some("default"), "a", None).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_with_cpu("c", "250m")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_never_take_a_namespace_past_its_quota() {
    let server = TestController::start("quota-race").await;
    let client = server.client();
    client
        .create::<ResourceQuota>(Some("default"), &quota("count", json!({"pods": "5"})))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.create::<Pod>(Some("default"), &pod(&format!("p{i}"))).await.is_ok()
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    assert_eq!(admitted, 5);
    let (pods, _) = client.list::<Pod>(Some("default"), "").await.unwrap();
    assert_eq!(pods.len(), 5);
}
