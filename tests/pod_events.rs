//! The events of a pod's life on a real node, end to end on a lab: the scheduler's Scheduled,
//! then the node agent's Started, Unhealthy and Killing (a failing liveness probe), BackOff (a
//! container that keeps exiting) and Killing when a running pod is deleted, as `kubectl
//! describe` shows them.

mod support;

use k8s_openapi::api::core::v1::{Event, Pod};
use strait_controlplane::testing::eventually;
use support::lab::TestLab;

const PODS: &str = "apiVersion: v1
kind: Pod
metadata: {name: live}
spec:
  containers:
  - name: web
    image: strait/netexec
    livenessProbe:
      tcpSocket: {port: 9}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  containers:
  - name: app
    image: none
    command: [\"false\"]
---
apiVersion: v1
kind: Pod
metadata: {name: calm}
spec:
  containers: [{name: web, image: strait/netexec}]
";

/// `reason: message` of every event about the pod incarnation `uid`.
async fn events_of(lab: &TestLab, uid: &str) -> Vec<String> {
    let query = format!("fieldSelector=involvedObject.uid={uid}");
    let (events, _) = lab.api.list::<Event>(Some("default"), &query).await.unwrap_or_default();
    events
        .into_iter()
        .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

async fn wait_for_events(lab: &TestLab, uid: &str, wanted: &[&str]) -> Vec<String> {
    eventually(&format!("events {wanted:?}"), 60, || async {
        let events = events_of(lab, uid).await;
        wanted.iter().all(|w| events.iter().any(|e| e.starts_with(w))).then_some(events)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_life_on_a_node_is_reported_as_events() {
    if !support::privileged("a_pods_life_on_a_node_is_reported_as_events") {
        return;
    }
    let lab = TestLab::up("events", 1).await;
    let created = lab.kubectl_with_input(&["apply", "-f", "-"], Some(PODS));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let live: Pod = lab.wait_running("live").await;
    let live_uid = live.metadata.uid.clone().unwrap();
    let events = wait_for_events(
        &lab,
        &live_uid,
        &["Scheduled: Successfully assigned default/live to", "Started: Started container web"],
    )
    .await;
    eprintln!("live, running: {events:?}");
    // Nothing listens on port 9: the liveness probe fails twice and the agent restarts it.
    let events = wait_for_events(
        &lab,
        &live_uid,
        &[
            "Unhealthy: Liveness probe failed",
            "Killing: Container web failed liveness probe, will be restarted",
        ],
    )
    .await;
    eprintln!("live, restarted: {events:?}");

    let crash: Pod = eventually("the crash pod to exist", 30, || async {
        lab.api.get::<Pod>(Some("default"), "crash").await.ok().flatten()
    })
    .await;
    let crash_uid = crash.metadata.uid.clone().unwrap();
    let events =
        wait_for_events(&lab, &crash_uid, &["BackOff: Back-off restarting failed container app"])
            .await;
    eprintln!("crash: {events:?}");
    let described = lab.kubectl_ok(&["describe", "pod", "crash"]);
    let shown = described.split("Events:").nth(1).unwrap_or_default();
    assert!(shown.contains("BackOff") && shown.contains("kubelet"), "{described}");

    // A running container is stopped when its pod is deleted.
    let calm: Pod = lab.wait_running("calm").await;
    let calm_uid = calm.metadata.uid.clone().unwrap();
    let deleted = lab.kubectl(&["delete", "pod", "calm", "--wait=true", "--timeout=60s"]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    // The events outlive the pod (until their time to live).
    let events = wait_for_events(&lab, &calm_uid, &["Killing: Stopping container web"]).await;
    eprintln!("calm, deleted: {events:?}");
}
