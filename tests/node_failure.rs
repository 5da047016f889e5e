//! A node dying, end to end on a 3-node lab: its agent killed and its fabric link down, its
//! pods' endpoints leave the service within the grace period + 2 s, its pods come back on the
//! other nodes and serve through the service, and the node is Ready again when it returns.

mod support;

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;
use strait::lab;
use strait_controlplane::controllers::replica_set::is_ready as ready;
use support::lab::{TestLab, assert_route_stays_in_lab, until};

/// The timers the lab runs with: seconds, so that the test does not wait for minutes.
const GRACE_SECONDS: u64 = 4;
const TOLERATION_SECONDS: u64 = 3;

const REPLICA_SET: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers: [{name: web, image: strait/netexec, ports: [{name: http, containerPort: 8080}]}]
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
";

/// The client runs on node-1, which stays up.
const CLIENT: &str = "apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeName: node-1
  containers: [{name: client, image: strait/netexec}]
";

/// What `count` new connections to `target` from the client pod found: the pods that
/// answered, and how many connections failed.
fn connect(lab: &TestLab, target: &str, count: u32) -> (BTreeSet<String>, u32) {
    let strait = env!("CARGO_BIN_EXE_strait");
    let output = Command::new(strait)
        .args(["lab", "exec", "--name", lab.name(), "client", "--", strait, "netclient", "tcp"])
        .args(["--target", target, "--count", &count.to_string(), "--timeout-ms", "500"])
        .output()
        .expect("running netclient in the client pod");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("a netclient report");
    let answered =
        report["answers"].as_object().map(|a| a.keys().cloned().collect()).unwrap_or_default();
    let failed = report["errors"]
        .as_object()
        .map(|e| e.values().filter_map(Value::as_u64).sum::<u64>())
        .unwrap_or(0);
    (answered, u32::try_from(failed).unwrap_or(u32::MAX))
}

async fn web_pods(lab: &TestLab) -> Vec<Pod> {
    let (pods, _) = lab.api.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
    pods
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// The pods whose endpoints in the service's slices are ready.
async fn ready_endpoints(lab: &TestLab) -> BTreeSet<String> {
    let (slices, _) = lab
        .api
        .list::<EndpointSlice>(Some("default"), "labelSelector=kubernetes.io/service-name%3Dweb")
        .await
        .unwrap();
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
        .collect()
}

fn node_ready(node: &Node) -> Option<String> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_leaves_the_services_in_time_and_its_pods_come_back_elsewhere() {
    if !support::privileged(
        "a_stopped_node_leaves_the_services_in_time_and_its_pods_come_back_elsewhere",
    ) {
        return;
    }
    let grace = format!("--node-monitor-grace-period-seconds={GRACE_SECONDS}");
    let unreachable = format!("--default-unreachable-toleration-seconds={TOLERATION_SECONDS}");
    let lab = TestLab::up_with_args(
        "nodefail",
        3,
        &[&grace, &unreachable],
        &["--lease-renew-ms=500", "--lease-duration-seconds=4", "--heartbeat-seconds=2"],
    )
    .await;
    for manifest in [REPLICA_SET, SERVICE, CLIENT] {
        let output = lab.kubectl_with_input(&["create", "-f", "-"], Some(manifest));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let client = lab.wait_running("client").await;
    let service = lab.api.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let vip = service.spec.unwrap().cluster_ip.unwrap();
    assert_route_stays_in_lab(&lab.pod_netns(&client), vip.parse().unwrap());
    let target = format!("{vip}:80");

    let pods = until("three ready pods on three nodes", Duration::from_secs(60), || async {
        let pods = web_pods(&lab).await;
        let nodes: BTreeSet<_> = pods.iter().map(node_of).collect();
        (pods.len() == 3 && nodes.len() == 3 && pods.iter().all(ready)).then_some(pods)
    })
    .await;
    let names: BTreeSet<String> = pods.iter().map(name).collect();
    until("the service reaches all three", Duration::from_secs(20), || async {
        let (answered, _) = connect(&lab, &target, 60);
        (answered == names).then_some(())
    })
    .await;
    let victim = pods.iter().find(|p| node_of(p) == "node-3").map(name).expect("a pod on node-3");

    // node-3 dies: its agent is killed, its link leaves the fabric. Its pod keeps running,
    // unreachable.
    let stopped = Instant::now();
    lab::kill(lab.name(), &lab::LabProcess::Agent("node-3".to_owned())).unwrap();
    lab::set_node_link(lab.name(), "node-3", false).await.unwrap();

    until("node-3 Unknown", Duration::from_secs(GRACE_SECONDS + 10), || async {
        let node: Node = lab.api.get(None, "node-3").await.unwrap()?;
        (node_ready(&node)?.as_str() == "Unknown").then_some(())
    })
    .await;
    let unknown_after = stopped.elapsed();
    until(
        "the victim's endpoint leaves the service",
        Duration::from_secs(GRACE_SECONDS + 10),
        || async { (!ready_endpoints(&lab).await.contains(&victim)).then_some(()) },
    )
    .await;
    let endpoint_after = stopped.elapsed();
    // The client's node programs the change: every new connection is answered, never by the
    // dead pod.
    until("every connection answered by a live pod", Duration::from_secs(10), || async {
        let (answered, failed) = connect(&lab, &target, 20);
        (failed == 0 && !answered.contains(&victim) && !answered.is_empty()).then_some(())
    })
    .await;
    let traffic_after = stopped.elapsed();
    println!(
        "node-3 stopped: Unknown after {:.2}s, its endpoint out of the service after {:.2}s \
         (grace {GRACE_SECONDS}s), every connection answered by a live pod after {:.2}s",
        unknown_after.as_secs_f64(),
        endpoint_after.as_secs_f64(),
        traffic_after.as_secs_f64(),
    );
    assert!(
        endpoint_after <= Duration::from_secs(GRACE_SECONDS + 2),
        "the endpoint left after {endpoint_after:?}, more than grace + 2 s\n{}",
        lab.logs()
    );

    // After its toleration the pod is evicted, its deletion completes without an agent, and
    // its replica set runs a replacement on another node, which the service reaches.
    let replaced = until("three ready pods off node-3", Duration::from_secs(60), || async {
        let pods = web_pods(&lab).await;
        let off: Vec<&Pod> = pods.iter().filter(|p| node_of(p) != "node-3").collect();
        let gone = !pods.iter().any(|p| name(p) == victim);
        (gone && pods.len() == 3 && off.len() == 3 && off.iter().all(|p| ready(p)))
            .then(|| pods.iter().map(name).collect::<BTreeSet<_>>())
    })
    .await;
    println!(
        "node-3's pod replaced elsewhere and ready after {:.2}s",
        stopped.elapsed().as_secs_f64()
    );
    until("the service reaches the three live pods", Duration::from_secs(20), || async {
        let (answered, failed) = connect(&lab, &target, 60);
        (failed == 0 && answered == replaced).then_some(())
    })
    .await;
    let node: Node = lab.api.get(None, "node-3").await.unwrap().unwrap();
    let taints: Vec<String> =
        node.spec.unwrap().taints.unwrap_or_default().into_iter().map(|t| t.key).collect();
    assert!(taints.iter().all(|t| t == "node.kubernetes.io/unreachable"), "{taints:?}");
    assert_eq!(taints.len(), 2, "unreachable NoSchedule and NoExecute: {taints:?}");

    // node-3 comes back: link up, agent started. It is Ready again, untainted, and stops the
    // pod that was deleted while it was away.
    lab::set_node_link(lab.name(), "node-3", true).await.unwrap();
    lab::start(lab.name(), &lab::LabProcess::Agent("node-3".to_owned())).unwrap();
    until("node-3 Ready without taints", Duration::from_secs(30), || async {
        let node: Node = lab.api.get(None, "node-3").await.unwrap()?;
        let untainted = node.spec.as_ref()?.taints.as_ref().is_none_or(Vec::is_empty);
        (node_ready(&node)?.as_str() == "True" && untainted).then_some(())
    })
    .await;
    let victim_uid = pods.iter().find(|p| name(p) == victim).and_then(|p| p.metadata.uid.clone());
    let victim_netns = format!("{}pod-{}", lab::netns_prefix(lab.name()), victim_uid.unwrap());
    until("the deleted pod's sandbox removed on node-3", Duration::from_secs(30), || async {
        let namespaces = strait_dataplane::netns::NetNs::list_with_prefix(&victim_netns).ok()?;
        namespaces.is_empty().then_some(())
    })
    .await;
    // A new pod can land on node-3 again.
    let output = lab.kubectl_with_input(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: back}\nspec:\n  nodeSelector: {kubernetes.io/hostname: node-3}\n  containers: [{name: back, image: strait/netexec}]\n"),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let back = lab.wait_running("back").await;
    assert_eq!(node_of(&back), "node-3");
}
