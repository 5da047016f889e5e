//! A Deployment rolled to a new version and back under continuous traffic through its
//! Service, end to end on a 3-node lab through kubectl: readiness probes keep new pods out of
//! the service until they answer, terminating endpoints stop taking new connections while the
//! old pods drain, and not one request is lost either way.

mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::{Value, json};
use support::lab::{TestLab, assert_route_stays_in_lab, netclient_report};

/// Seconds a netexec pod keeps serving after SIGTERM: the drain a workload does while its
/// endpoint is terminating and the nodes stop sending it new connections.
const DRAIN_SECONDS: &str = "3";

fn container(release: &str) -> Value {
    json!({
        "name": "web",
        "image": "strait/netexec",
        "args": ["--release", release, "--shutdown-delay-seconds", DRAIN_SECONDS],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
    })
}

fn deployment(release: &str) -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [container(release)]},
            },
        },
    })
    .to_string()
}

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

fn rollout_status(lab: &TestLab) -> String {
    lab.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=120s"])
}

/// The distinct answers of `count` new connections to `target` from the client pod.
fn answers(lab: &TestLab, target: &str, count: u32) -> BTreeSet<String> {
    let args = ["tcp", "--target", target, "--count", &count.to_string(), "--path", "/release"];
    let report = netclient_report(lab.spawn_netclient("client", &args));
    report["answers"].as_object().map(|a| a.keys().cloned().collect()).unwrap_or_default()
}

/// Runs `change` while the client opens a new connection through the service every 10 ms for
/// `seconds`, and checks that every one was answered, first by `from`, at the end only by
/// `to`, and by nothing else. Returns how long the rollout took and the report.
fn under_traffic(
    lab: &TestLab,
    target: &str,
    (from, to): (&str, &str),
    seconds: u64,
    change: impl FnOnce(),
) -> (Duration, Value) {
    let args = [
        "hold",
        "--target",
        target,
        "--connections",
        "0",
        "--seconds",
        &seconds.to_string(),
        "--new-every-ms",
        "10",
        "--timeout-ms",
        "3000",
        "--path",
        "/release",
    ];
    let started = Instant::now();
    let hold = lab.spawn_netclient("client", &args);
    std::thread::sleep(Duration::from_secs(2));
    let changing = Instant::now();
    change();
    let status = rollout_status(lab);
    let rolled = changing.elapsed();
    assert!(status.contains("successfully rolled out"), "{status}");
    assert!(
        started.elapsed() + Duration::from_secs(3) < Duration::from_secs(seconds),
        "the rollout took {rolled:?}: too long for the traffic to show its end"
    );
    let report = netclient_report(hold);
    let failed: u64 =
        report["new_failed"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert_eq!(failed, 0, "{from} → {to}: requests lost during the rollout: {report}");
    let runs: Vec<(String, u64)> = report["new_answer_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| (run[0].as_str().unwrap().to_owned(), run[1].as_u64().unwrap()))
        .collect();
    let seen: BTreeSet<&str> = runs.iter().map(|(answer, _)| answer.as_str()).collect();
    assert_eq!(seen, BTreeSet::from([from, to]), "{report}");
    assert_eq!(runs.first().map(|r| r.0.as_str()), Some(from), "{report}");
    let (last, count) = runs.last().unwrap();
    assert_eq!(last, to, "{report}");
    // At least the last three seconds (10 ms apart) answered only by the new version.
    assert!(*count >= 200, "{from} → {to}: only {count} answers at the end: {report}");
    (rolled, report)
}

/// A hold report in one line: answered and lost requests, and how often the answer switched.
fn summary(report: &Value) -> String {
    format!(
        "{} requests answered, {} lost, {} answer switches",
        report["new_ok"],
        report["new_failed"]
            .as_object()
            .map_or(0, |f| f.values().filter_map(Value::as_u64).sum::<u64>()),
        report["new_answer_runs"].as_array().map_or(0, |r| r.len().saturating_sub(1)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_rolls_out_and_back_under_traffic_without_losing_a_request() {
    if !support::privileged(
        "a_deployment_rolls_out_and_back_under_traffic_without_losing_a_request",
    ) {
        return;
    }
    let lab = TestLab::up("rollout", 3).await;
    for manifest in [deployment("v1").as_str(), SERVICE, CLIENT] {
        let output = lab.kubectl_with_input(&["apply", "-f", "-"], Some(manifest));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let client = lab.wait_running("client").await;
    rollout_status(&lab);
    let service = lab.api.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let vip = service.spec.unwrap().cluster_ip.unwrap();
    assert_route_stays_in_lab(&lab.pod_netns(&client), vip.parse().unwrap());
    let target = format!("{vip}:80");
    support::lab::eventually("v1 answers through the service", Duration::from_secs(10), || {
        let seen = answers(&lab, &target, 30);
        if seen == BTreeSet::from(["v1".to_owned()]) { Ok(()) } else { Err(format!("{seen:?}")) }
    })
    .await;

    // v1 → v2: a change of the container's arguments is a new template, so a new revision.
    let patch = json!({"spec": {"template": {"spec": {"containers": [container("v2")]}}}});
    let (forward, report) = under_traffic(&lab, &target, ("v1", "v2"), 40, || {
        lab.kubectl_ok(&["patch", "deployment", "web", "--type=merge", "-p", &patch.to_string()]);
    });
    eprintln!("v1 → v2 rolled out in {forward:?}; {}", summary(&report));

    // rollout undo: kubectl writes revision 1's template back; it runs again as revision 3.
    let (back, report) = under_traffic(&lab, &target, ("v2", "v1"), 40, || {
        let undone = lab.kubectl_ok(&["rollout", "undo", "deployment/web"]);
        assert!(undone.contains("rolled back"), "{undone}");
    });
    eprintln!("v2 → v1 rolled back in {back:?}; {}", summary(&report));
    let history = lab.kubectl_ok(&["rollout", "history", "deployment/web"]);
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["2", "3"], "{history}");

    // Three v1 pods are left.
    let (pods, _) = lab.api.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
    let args: Vec<Vec<String>> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.spec.as_ref().unwrap().containers[0].args.clone().unwrap_or_default())
        .collect();
    assert_eq!(args.len(), 3, "{args:?}");
    assert!(args.iter().all(|a| a[1] == "v1"), "{args:?}");
}
