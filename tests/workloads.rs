//! The loop under the networking, end to end on a lab through kubectl: a ReplicaSet keeps its
//! pods, a killed container is restarted, and a Service follows the pods as they come and go.

mod support;

use std::{collections::BTreeSet, process::Command, time::Duration};

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::Value;
use strait::lab;
use strait_dataplane::cgroup::Cgroup;
use support::lab::{TestLab, until};

const REPLICA_SET: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: strait/netexec, ports: [{name: http, containerPort: 8080}]}]
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
";

const CLIENT: &str = "apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers: [{name: client, image: strait/netexec}]
";

/// Which pods answered `count` new connections to `target` from the client pod.
fn answered(lab: &TestLab, target: &str, count: u32) -> BTreeSet<String> {
    let strait = env!("CARGO_BIN_EXE_strait");
    let output = Command::new(strait)
        .args(["lab", "exec", "--name", lab.name(), "client", "--", strait, "netclient", "tcp"])
        .args(["--target", target, "--count", &count.to_string()])
        .output()
        .expect("running netclient in the client pod");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("a netclient report");
    report["answers"].as_object().map(|a| a.keys().cloned().collect()).unwrap_or_default()
}

async fn web_pods(lab: &TestLab) -> Vec<Pod> {
    let (pods, _) = lab.api.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
    pods.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_set_replaces_pods_and_containers_and_its_service_follows() {
    if !support::privileged("a_replica_set_replaces_pods_and_containers_and_its_service_follows") {
        return;
    }
    let lab = TestLab::up("workloads", 3).await;
    for manifest in [REPLICA_SET, SERVICE, CLIENT] {
        let output = lab.kubectl_with_input(&["create", "-f", "-"], Some(manifest));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    lab.wait_running("client").await;
    let service = lab.api.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let target = format!("{}:80", service.spec.unwrap().cluster_ip.unwrap());

    let pods = until("three ready pods on three nodes", Duration::from_secs(30), || async {
        let pods = web_pods(&lab).await;
        let nodes: BTreeSet<_> =
            pods.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
        (pods.len() == 3 && nodes.len() == 3 && pods.iter().all(ready)).then_some(pods)
    })
    .await;
    let names: BTreeSet<String> = pods.iter().map(name).collect();
    until("the service reaches all three", Duration::from_secs(10), || async {
        (answered(&lab, &target, 60) == names).then_some(())
    })
    .await;

    // A deleted pod is replaced by a new one, and the service moves to it.
    lab.kubectl_ok(&["delete", "pod", &name(&pods[0])]);
    let replaced = until("a ready replacement", Duration::from_secs(30), || async {
        let now: BTreeSet<String> =
            web_pods(&lab).await.iter().filter(|p| ready(p)).map(name).collect();
        (now.len() == 3 && !now.contains(&name(&pods[0]))).then_some(now)
    })
    .await;
    until("the service reaches the replacement", Duration::from_secs(10), || async {
        (answered(&lab, &target, 60) == replaced).then_some(())
    })
    .await;

    // A killed container process is restarted in place: same pod, restartCount 1.
    let victim = web_pods(&lab).await.into_iter().find(|p| replaced.contains(&name(p))).unwrap();
    let node = victim.spec.as_ref().unwrap().node_name.clone().unwrap();
    let uid = victim.metadata.uid.clone().unwrap();
    let container =
        Cgroup::new(&lab::lab_cgroup(lab.name()).join(&node).join("pods").join(&uid).join("web"))
            .expect("the container's cgroup");
    let pids = container.processes().expect("the container's processes");
    assert!(!pids.is_empty(), "the container runs");
    for pid in pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("killing the container process");
    }
    until("the container restarted and ready", Duration::from_secs(30), || async {
        let pod: Pod = lab.api.get(Some("default"), &name(&victim)).await.unwrap()?;
        let restarts = pod.status.as_ref()?.container_statuses.as_ref()?.first()?.restart_count;
        (restarts >= 1 && ready(&pod)).then_some(())
    })
    .await;
    until("the service reaches all three again", Duration::from_secs(10), || async {
        (answered(&lab, &target, 60) == replaced).then_some(())
    })
    .await;
}
