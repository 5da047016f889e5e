//! Placement and admission on a 3-node lab, through kubectl: a pod that fits nowhere stays
//! Pending and says why (in its condition, `kubectl describe` and the events), is placed once a
//! node fits it, and a ResourceQuota refuses what would exceed it, storing nothing.

mod support;

use std::time::Duration;

use support::lab::{TestLab, eventually};

/// Asks for more CPU than any lab node has (each offers the machine's CPUs, and this machine
/// has fewer than 64).
const TOO_BIG: &str = "apiVersion: v1
kind: Pod
metadata: {name: too-big}
spec:
  containers:
  - {name: web, image: strait/netexec, resources: {requests: {cpu: '64'}}}
";

const SSD_ONLY: &str = "apiVersion: v1
kind: Pod
metadata: {name: ssd-only}
spec:
  nodeSelector: {disk: ssd}
  containers: [{name: web, image: strait/netexec}]
";

fn pod_with_cpu(name: &str, cpu: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: team}}
spec:
  containers:
  - {{name: web, image: strait/netexec, resources: {{requests: {{cpu: '{cpu}'}}}}}}
"
    )
}

/// `kubectl get pod` of one field, by jsonpath.
fn field(lab: &TestLab, namespace: &str, pod: &str, path: &str) -> String {
    lab.kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", &format!("jsonpath={path}")])
}

/// Waits until `pod` has `PodScheduled=False` with reason Unschedulable and a message that
/// contains `why`; returns the message.
async fn until_unschedulable(lab: &TestLab, pod: &str, why: &str) -> String {
    eventually(&format!("{pod} Unschedulable"), Duration::from_secs(30), || {
        let condition = field(
            lab,
            "default",
            pod,
            "{.status.conditions[?(@.type==\"PodScheduled\")].status}/{.status.conditions[?(@.type==\"PodScheduled\")].reason}/{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        );
        if condition.starts_with("False/Unschedulable/") && condition.contains(why) {
            Ok(condition)
        } else {
            Err(condition)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unschedulable_pods_stay_pending_with_the_reason_and_quotas_refuse_the_excess() {
    if !support::privileged(
        "unschedulable_pods_stay_pending_with_the_reason_and_quotas_refuse_the_excess",
    ) {
        return;
    }
    let lab = TestLab::up("sched", 3).await;

    // More CPU than any node: Pending, never bound, with Kubernetes' message.
    let applied = lab.kubectl_with_input(&["apply", "-f", "-"], Some(TOO_BIG));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let message = until_unschedulable(&lab, "too-big", "Insufficient cpu").await;
    assert!(message.contains("0/3 nodes are available: 3 Insufficient cpu"), "{message}");
    assert_eq!(field(&lab, "default", "too-big", "{.status.phase}"), "Pending");
    assert_eq!(field(&lab, "default", "too-big", "{.spec.nodeName}"), "");
    let listed = lab.kubectl_ok(&["get", "pod", "too-big", "--no-headers"]);
    assert!(listed.contains("Pending"), "{listed}");
    eventually("FailedScheduling in describe", Duration::from_secs(15), || {
        let described = lab.kubectl_ok(&["describe", "pod", "too-big"]);
        if described.contains("FailedScheduling") && described.contains("Insufficient cpu") {
            Ok(())
        } else {
            Err(described)
        }
    })
    .await;
    let events = lab.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=too-big,reason=FailedScheduling",
        "--no-headers",
    ]);
    assert!(events.contains("Warning"), "{events}");

    // A selector no node matches: Pending until a node gets the label, then placed on it.
    let applied = lab.kubectl_with_input(&["apply", "-f", "-"], Some(SSD_ONLY));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let message =
        until_unschedulable(&lab, "ssd-only", "didn't match Pod's node affinity/selector").await;
    assert!(message.starts_with("False/Unschedulable/0/3 nodes are available"), "{message}");
    lab.kubectl_ok(&["label", "node", "node-2", "disk=ssd"]);
    eventually("ssd-only Running on node-2", Duration::from_secs(60), || {
        let placed = field(&lab, "default", "ssd-only", "{.spec.nodeName}/{.status.phase}");
        if placed == "node-2/Running" { Ok(()) } else { Err(placed) }
    })
    .await;
    // The one that fits nowhere still does not.
    assert_eq!(field(&lab, "default", "too-big", "{.spec.nodeName}"), "");

    // A quota of 3 pods and 500m of requested CPU in namespace team.
    lab.kubectl_ok(&["create", "namespace", "team"]);
    lab.kubectl_ok(&["create", "quota", "q", "-n", "team", "--hard=pods=3,requests.cpu=500m"]);
    let create = |name: &str, cpu: &str| {
        lab.kubectl_with_input(&["create", "-f", "-"], Some(&pod_with_cpu(name, cpu)))
    };
    for (name, cpu) in [("a", "200m"), ("b", "200m")] {
        let created = create(name, cpu);
        assert!(created.status.success(), "{name}: {}", String::from_utf8_lossy(&created.stderr));
    }
    // 200m more would make 600m: refused with the reason, and nothing stored.
    let refused = create("c", "200m");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a pod over the CPU quota was created");
    assert!(stderr.contains("Forbidden") || stderr.contains("forbidden"), "{stderr}");
    assert!(
        stderr.contains("exceeded quota: q")
            && stderr.contains("requested: requests.cpu=200m")
            && stderr.contains("limited: requests.cpu=500m"),
        "{stderr}"
    );
    let missing = lab.kubectl(&["get", "pod", "c", "-n", "team"]);
    assert!(!missing.status.success(), "the refused pod was stored");
    // 100m fits the CPU; it is the third pod, which the count allows; a fourth is refused.
    let created = create("c", "100m");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let refused = create("d", "0");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a fourth pod was created under a quota of 3");
    assert!(stderr.contains("exceeded quota: q") && stderr.contains("limited: pods=3"), "{stderr}");
    let described = lab.kubectl_ok(&["describe", "quota", "q", "-n", "team"]);
    // Resource, used, hard.
    let row = |resource: &str| {
        described
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.first() == Some(&resource))
    };
    assert_eq!(row("requests.cpu"), Some(vec!["requests.cpu", "500m", "500m"]), "{described}");
    assert_eq!(row("pods"), Some(vec!["pods", "3", "3"]), "{described}");
    // Deleting one frees room for another.
    lab.kubectl_ok(&["delete", "pod", "a", "-n", "team", "--wait=true", "--timeout=60s"]);
    let created = create("d", "100m");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
}
