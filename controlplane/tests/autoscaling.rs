//! Horizontal pod autoscaling through the API, with the metrics an agent would report fed by
//! the test: the metrics API serves them, and an autoscaler scales its replica set up by
//! Kubernetes' rule, stops at its maximum, and scales down only after its stabilization window.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{Event, Node, Pod},
};
use serde_json::{Value, json};
use strait_controlplane::{
    api::metrics::PodMetrics,
    client::ApiClient,
    testing::{TestController, eventually, node},
};

const STABILIZATION: Duration = Duration::from_secs(4);

/// Plays node `n1`'s agent: every 300 ms it reports the replica set's pods Running and Ready
/// (started long ago, so no start-up sample is ignored) and their CPU usage, `millicores`
/// each.
struct SimulatedNode {
    millicores: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimulatedNode {
    fn start(client: ApiClient, millicores: u64) -> Self {
        let millicores = Arc::new(Mutex::new(millicores));
        let usage = Arc::clone(&millicores);
        let task = tokio::spawn(async move {
            loop {
                let (pods, _) =
                    client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
                let load = *usage.lock().unwrap();
                let mut reported = Vec::new();
                for (index, pod) in pods.iter().enumerate() {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if pod.metadata.deletion_timestamp.is_some() {
                        let uid = pod.metadata.uid.as_deref();
                        let _ = client
                            .delete_with_uid::<Pod>(Some("default"), &name, Some(0), uid)
                            .await;
                        continue;
                    }
                    let ready =
                        pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if !ready {
                        let ip = format!("10.244.0.{}", 10 + index);
                        let status = json!({"status": {
                            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                            "startTime": "2026-01-01T00:00:00Z",
                            "conditions": [{"type": "Ready", "status": "True",
                                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                        let _ =
                            client.merge_patch::<Pod>(Some("default"), &name, &status, true).await;
                    }
                    reported.push(json!({
                        "metadata": {"name": name, "namespace": "default", "labels": pod.metadata.labels},
                        "timestamp": now(), "window": "1s",
                        "containers": [{"name": "web", "usage": {"cpu": format!("{load}m"), "memory": "10240Ki"}}],
                    }));
                }
                let report = json!({
                    "apiVersion": "metrics.k8s.io/v1beta1", "kind": "NodeMetrics",
                    "metadata": {"name": "n1"}, "timestamp": now(), "window": "1s",
                    "usage": {"cpu": "500m", "memory": "1048576Ki"},
                    "pods": reported,
                });
                let (status, body) = client
                    .send(
                        http::Method::PUT,
                        "/apis/metrics.k8s.io/v1beta1/nodes/n1",
                        "application/json",
                        Some(report.to_string().into_bytes()),
                    )
                    .await
                    .unwrap();
                assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { millicores, task }
    }

    fn set(&self, millicores: u64) {
        *self.millicores.lock().unwrap() = millicores;
    }
}

impl Drop for SimulatedNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> String {
    let seconds =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(seconds).unwrap()).unwrap().to_string()
}

async fn autoscaler(client: &ApiClient) -> HorizontalPodAutoscaler {
    client.get(Some("default"), "web").await.unwrap().unwrap()
}

async fn replicas(client: &ApiClient) -> i32 {
    let set: ReplicaSet = client.get(Some("default"), "web").await.unwrap().unwrap();
    set.spec.unwrap().replicas.unwrap()
}

fn condition(hpa: &HorizontalPodAutoscaler, kind: &str) -> Option<(String, String)> {
    let conditions = hpa.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.reason.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_scales_up_by_the_usage_ratio_to_its_maximum_and_down_after_the_window() {
    let server = TestController::start_with("autoscaling", |config| {
        config.autoscaler.sync_period = Duration::from_secs(1);
        config.autoscaler.downscale_stabilization = STABILIZATION;
        // No agent renews n1's lease here: keep it Ready for the length of the test.
        config.node_lifecycle.grace_period = Duration::from_secs(600);
    })
    .await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.11", true)).await.unwrap();
    let set: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "strait/netexec",
                                         "resources": {"requests": {"cpu": "100m"}}}]},
            },
        },
    }))
    .unwrap();
    client.create(Some("default"), &set).await.unwrap();
    // 90m of 100m against a 50 % target: ratio 1.8.
    let agent = SimulatedNode::start(client.clone(), 90);

    // The metrics API serves what the node reported, pods by label.
    let metrics = eventually("the pod's metrics", 10, || async {
        let (metrics, _) =
            client.list::<PodMetrics>(Some("default"), "labelSelector=app%3Dweb").await.ok()?;
        (metrics.len() == 1).then_some(metrics)
    })
    .await;
    assert_eq!(metrics[0].containers[0].usage["cpu"].0, "90m");
    let (status, body) = client
        .send(http::Method::GET, "/apis/metrics.k8s.io/v1beta1/nodes/n1", "", None)
        .await
        .unwrap();
    assert!(status.is_success());
    let node_metrics: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(node_metrics["kind"], "NodeMetrics");
    assert_eq!(node_metrics["usage"]["cpu"], "500m");

    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web"},
            "minReplicas": 1, "maxReplicas": 5,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                         "target": {"type": "Utilization", "averageUtilization": 50}}}],
        },
    }))
    .unwrap();
    client.create(Some("default"), &hpa).await.unwrap();

    // 1 → ceil(1 × 1.8) = 2 → ceil(2 × 1.8) = 4 → ceil(4 × 1.8) = 8, capped at 5.
    let first =
        eventually("scaled to 2", 10, || async { (replicas(&client).await >= 2).then_some(()) });
    first.await;
    assert_eq!(replicas(&client).await, 2, "one step: ceil(1 × 1.8)");
    let scaled = eventually("scaled to the maximum", 20, || async {
        let hpa = autoscaler(&client).await;
        (replicas(&client).await == 5 && hpa.status.as_ref()?.desired_replicas == 5).then_some(hpa)
    })
    .await;
    let status = scaled.status.clone().unwrap();
    let current = status.current_metrics.unwrap()[0].resource.clone().unwrap().current;
    assert_eq!(current.average_utilization, Some(90));
    assert_eq!(
        condition(&scaled, "ScalingActive").unwrap(),
        ("True".into(), "ValidMetricFound".into())
    );
    eventually("limited by the maximum", 10, || async {
        let hpa = autoscaler(&client).await;
        (condition(&hpa, "ScalingLimited")? == ("True".into(), "TooManyReplicas".into()))
            .then_some(())
    })
    .await;
    assert!(status.last_scale_time.is_some());

    // Load drops to 10m (ratio 0.2): the recommendation is 1, but the window holds 5 first.
    agent.set(10);
    let dropped = Instant::now();
    eventually("the scale-down recommendation held", 10, || async {
        let hpa = autoscaler(&client).await;
        (condition(&hpa, "AbleToScale")?.1 == "ScaleDownStabilized").then_some(())
    })
    .await;
    assert_eq!(replicas(&client).await, 5, "held during the window");
    eventually("scaled down to 1", 20, || async { (replicas(&client).await == 1).then_some(()) })
        .await;
    let waited = dropped.elapsed();
    println!(
        "scaled down {:.1}s after the load dropped (window {STABILIZATION:?})",
        waited.as_secs_f64()
    );
    assert!(
        waited >= STABILIZATION - Duration::from_millis(500),
        "not before the window: {waited:?}"
    );
    eventually("status: 1 current, 1 desired", 10, || async {
        let status = autoscaler(&client).await.status?;
        (status.current_replicas == Some(1) && status.desired_replicas == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_is_defaulted_validated_and_says_why_it_cannot_read_its_target() {
    let server = TestController::start("autoscaling-errors").await;
    let client = server.client();
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "missing"},
                 "maxReplicas": 3},
    }))
    .unwrap();
    let created: HorizontalPodAutoscaler = client.create(Some("default"), &hpa).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.min_replicas, Some(1), "defaulted");
    let target = spec.metrics.unwrap()[0].resource.clone().unwrap().target;
    assert_eq!(target.average_utilization, Some(80), "defaulted to 80 % CPU");
    eventually("AbleToScale=False FailedGetScale", 30, || async {
        let hpa = autoscaler(&client).await;
        (condition(&hpa, "AbleToScale")? == ("False".into(), "FailedGetScale".into())).then_some(())
    })
    .await;

    // A target whose pods report no metrics: the scale is read, the replica count cannot be
    // computed, and both say so in events as Kubernetes' do.
    let set: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "quiet"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "quiet"}},
            "template": {
                "metadata": {"labels": {"app": "quiet"}},
                "spec": {"containers": [{"name": "quiet", "image": "strait/netexec",
                                         "resources": {"requests": {"cpu": "100m"}}}]},
            },
        },
    }))
    .unwrap();
    client.create(Some("default"), &set).await.unwrap();
    let quiet: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "quiet"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "quiet"},
                 "maxReplicas": 3},
    }))
    .unwrap();
    client.create(Some("default"), &quiet).await.unwrap();
    eventually("ScalingActive=False FailedGetResourceMetric", 30, || async {
        let hpa: HorizontalPodAutoscaler = client.get(Some("default"), "quiet").await.ok()??;
        (condition(&hpa, "ScalingActive")? == ("False".into(), "FailedGetResourceMetric".into())
            && condition(&hpa, "AbleToScale")? == ("True".into(), "SucceededGetScale".into()))
            .then_some(())
    })
    .await;
    let events = eventually("the autoscaler's warnings", 10, || async {
        let (events, _) = client
            .list::<Event>(
                Some("default"),
                "fieldSelector=involvedObject.name%3Dquiet,type%3DWarning",
            )
            .await
            .ok()?;
        let reasons: Vec<(String, String)> = events
            .iter()
            .map(|e| (e.reason.clone().unwrap_or_default(), e.message.clone().unwrap_or_default()))
            .collect();
        (reasons.len() >= 2).then_some(reasons)
    })
    .await;
    let message = |reason: &str| {
        events.iter().find(|(r, _)| r == reason).map(|(_, m)| m.clone()).unwrap_or_default()
    };
    assert!(
        message("FailedGetResourceMetric").starts_with("failed to get cpu utilization: "),
        "{events:?}"
    );
    assert!(
        message("FailedComputeMetricsReplicas")
            .starts_with("invalid metrics (1 invalid out of 1), first error is: failed to get cpu"),
        "{events:?}"
    );

    let invalid: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "bad"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"},
                 "minReplicas": 3, "maxReplicas": 2},
    }))
    .unwrap();
    let error = client.create(Some("default"), &invalid).await.unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.maxReplicas"), "{error}");
}
