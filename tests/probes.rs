//! End to end on a lab: container probes. A readiness probe holds a running pod out of Ready
//! until it passes and takes it out again when it fails; a failing liveness probe restarts the
//! container.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use support::{DirGuard, lab::TestLab};

/// A `strait/netexec` pod whose container has `probe` (YAML lines under the container, indented
/// by four spaces).
fn netexec_pod_with(name: &str, probe: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: netexec
    image: strait/netexec
    ports:
    - containerPort: 8080
{probe}"
    )
}

fn create(lab: &TestLab, manifest: &str) {
    let output = lab.kubectl_with_input(&["create", "--validate=false", "-f", "-"], Some(manifest));
    assert!(
        output.status.success(),
        "kubectl create: {}\n{manifest}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn container(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && container(pod).and_then(|c| c.state.as_ref()).is_some_and(|s| s.running.is_some())
}

/// Polls the pod every 100 ms until `condition` holds, and returns it with how long that took;
/// panics after `timeout` with the last status seen.
async fn wait_for(
    lab: &TestLab,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&Pod) -> bool,
) -> (Pod, Duration) {
    let start = Instant::now();
    let mut last = String::from("nothing yet");
    while start.elapsed() < timeout {
        match lab.api.get::<Pod>(Some("default"), name).await {
            Ok(Some(pod)) if condition(&pod) => return (pod, start.elapsed()),
            Ok(Some(pod)) => last = format!("{:?}", pod.status),
            Ok(None) => last = "not found".to_owned(),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pod {name}: not {what} within {timeout:?}; last status: {last}\n{}", lab.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_probes_gate_ready_and_a_failing_liveness_probe_restarts_the_container() {
    if !support::privileged(
        "readiness_probes_gate_ready_and_a_failing_liveness_probe_restarts_the_container",
    ) {
        return;
    }
    let lab = TestLab::up("probes", 1).await;
    let flags = DirGuard::temp("probes");
    let ready_file = flags.path().join("ready");

    // All three pods start together; each part below then watches its own.
    let exec_probe = format!(
        "    readinessProbe:
      exec:
        command: [\"test\", \"-e\", \"{}\"]
      periodSeconds: 1
",
        ready_file.display()
    );
    create(&lab, &netexec_pod_with("exec-ready", &exec_probe));
    let http_probe = "    readinessProbe:
      httpGet:
        path: /healthz
        port: 8080
      periodSeconds: 1
";
    create(&lab, &netexec_pod_with("http-ready", http_probe));
    // netexec serves HTTP on 8080 and UDP on 8081: nothing accepts TCP on 9.
    let liveness_probe = "    livenessProbe:
      tcpSocket:
        port: 9
      periodSeconds: 1
      failureThreshold: 2
";
    create(&lab, &netexec_pod_with("tcp-live", liveness_probe));

    // (1) exec readiness: running but not Ready while the file is missing.
    wait_for(&lab, "exec-ready", "running", Duration::from_secs(60), is_running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (pod, _) =
        wait_for(&lab, "exec-ready", "running", Duration::from_secs(5), is_running).await;
    assert!(!is_ready(&pod), "Ready before its readiness probe ever passed: {:?}", pod.status);
    assert_eq!(container(&pod).map(|c| c.ready), Some(false));

    std::fs::write(&ready_file, "").expect("creating the file the probe looks for");
    let (pod, took) = wait_for(&lab, "exec-ready", "Ready", Duration::from_secs(3), is_ready).await;
    eprintln!("exec-ready: Ready {took:?} after the file appeared");
    assert_eq!(container(&pod).map(|c| c.ready), Some(true));
    assert_eq!(container(&pod).map(|c| c.restart_count), Some(0), "readiness never restarts");

    std::fs::remove_file(&ready_file).expect("removing the file");
    // failureThreshold 3 (the default) at one probe a second.
    let (pod, took) =
        wait_for(&lab, "exec-ready", "unready", Duration::from_secs(5), |p| !is_ready(p)).await;
    eprintln!("exec-ready: unready {took:?} after the file went away");
    assert!(is_running(&pod), "an unready container keeps running: {:?}", pod.status);

    // (2) httpGet readiness against netexec's /healthz.
    let (pod, _) = wait_for(&lab, "http-ready", "Ready", Duration::from_secs(60), is_ready).await;
    assert_eq!(container(&pod).map(|c| c.ready), Some(true));

    // (3) tcpSocket liveness on a closed port: killed after two failures, then restarted.
    let restarted = |pod: &Pod| container(pod).is_some_and(|c| c.restart_count >= 1);
    wait_for(&lab, "tcp-live", "running", Duration::from_secs(60), is_running).await;
    let (pod, took) =
        wait_for(&lab, "tcp-live", "restarted", Duration::from_secs(10), restarted).await;
    eprintln!("tcp-live: restarted {took:?} after it was first seen running");
    let last = container(&pod)
        .and_then(|c| c.last_state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .unwrap_or_else(|| panic!("no last termination state: {:?}", pod.status));
    assert!(
        last.message.as_deref().is_some_and(|m| m.contains("liveness probe failed")),
        "the last termination says why: {last:?}"
    );
    assert_eq!(last.signal, Some(9), "killed, not exited by itself: {last:?}");
}
