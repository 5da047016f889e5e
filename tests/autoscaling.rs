//! Horizontal pod autoscaling end to end on a 3-node lab, through kubectl: a Deployment with a
//! CPU request behind a Service, `kubectl autoscale … --cpu-percent=50 --min=1 --max=3`, and a
//! load generator pod whose requests through the Service make the pods spin
//! (`/consume-cpu`). The agents' readings of the pods' cgroups reach `kubectl top` and the
//! autoscaler, which scales the Deployment to its maximum under the load and back to its
//! minimum once the load is gone and the downscale stabilization window has passed.

mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use serde_json::Value;
use support::lab::{TestLab, assert_route_stays_in_lab};

/// The controller's timers, short so that the test does not wait for minutes.
const SYNC_PERIOD_SECONDS: u64 = 2;
const DOWNSCALE_STABILIZATION_SECONDS: u64 = 10;

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: strait/netexec
        ports: [{name: http, containerPort: 8080}]
        resources: {requests: {cpu: 50m}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
";

/// The load: a request every 50 ms or so through the Service, each using 10 ms of its pod's
/// CPU: about 200m in all, four times what one pod requests.
fn load_generator(name: &str, vip: &str) -> String {
    let strait = env!("CARGO_BIN_EXE_strait");
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
  containers:
  - name: load
    image: strait/netclient
    command: [{strait}, netclient, tcp, --target, '{vip}:80', --count, '1000000',
              --interval-ms, '40', --timeout-ms, '5000', --path, '/consume-cpu?millis=10']
"
    )
}

/// Retries `attempt` about every second until it returns `Ok` (kubectl is a process per try:
/// a slower pace than the support's `eventually` keeps the shared machine's load down).
async fn every_second_until<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(error) if Instant::now() >= deadline => {
                panic!("{what}: still failing after {timeout:?}: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

fn stdout_of(output: &std::process::Output) -> Result<String, String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// `kubectl top pods -l app=web`: CPU in millicores and memory in MiB, by pod.
fn top_pods(lab: &TestLab, kubectl: &str) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let output = lab.kubectl_binary_with_input(
        kubectl,
        &["top", "pods", "-l", "app=web", "--no-headers"],
        None,
    );
    let text = stdout_of(&output)?;
    text.lines()
        .map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let figure = |index: usize, unit: &str| {
                columns.get(index).and_then(|c| c.strip_suffix(unit)?.parse::<u64>().ok())
            };
            match (columns.first(), figure(1, "m"), figure(2, "Mi")) {
                (Some(name), Some(cpu), Some(memory)) => Ok(((*name).to_owned(), (cpu, memory))),
                _ => Err(format!("unexpected kubectl top line {line:?}")),
            }
        })
        .collect()
}

/// `kubectl get hpa web`: the TARGETS figure of CPU (`42%/50%`) and REPLICAS.
fn hpa_row(lab: &TestLab) -> Result<(String, u32), String> {
    let text = stdout_of(&lab.kubectl(&["get", "hpa", "web", "--no-headers"]))?;
    let columns: Vec<&str> = text.split_whitespace().collect();
    let cpu = columns.iter().position(|c| *c == "cpu:").and_then(|i| columns.get(i + 1));
    // REPLICAS is the column before AGE, the last.
    let replicas = columns.len().checked_sub(2).and_then(|i| columns[i].parse().ok());
    match (cpu, replicas) {
        (Some(cpu), Some(replicas)) => Ok(((*cpu).to_owned(), replicas)),
        _ => Err(format!("unexpected kubectl get hpa output {text:?}")),
    }
}

/// The current CPU utilization of `cpu: 42%/50%`'s `42%/50%`, `None` for `<unknown>`.
fn utilization(targets: &str) -> Option<u32> {
    targets.split_once("%/")?.0.parse().ok()
}

/// The Deployment's replica count and how many of its pods are Ready.
async fn web_replicas(lab: &TestLab) -> (i32, usize) {
    let deployment: Deployment =
        lab.api.get(Some("default"), "web").await.expect("reading the deployment").expect("web");
    let wanted = deployment.spec.and_then(|s| s.replicas).unwrap_or_default();
    let (pods, _) =
        lab.api.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.expect("pods");
    let ready = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    (wanted, ready)
}

/// Polls until the Deployment wants `replicas` and has that many Ready pods.
async fn wait_for_replicas(lab: &TestLab, replicas: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (wanted, ready) = web_replicas(lab).await;
        if wanted == replicas && ready == usize::try_from(replicas).unwrap_or(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "web not at {replicas} replicas within {timeout:?}: wants {wanted}, {ready} ready\n{}",
            String::from_utf8_lossy(&lab.kubectl(&["describe", "hpa", "web"]).stdout)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_autoscaler_scales_a_deployment_to_its_maximum_under_load_and_back_after() {
    if !support::privileged(
        "an_autoscaler_scales_a_deployment_to_its_maximum_under_load_and_back_after",
    ) {
        return;
    }
    let sync = format!("--horizontal-pod-autoscaler-sync-period-seconds={SYNC_PERIOD_SECONDS}");
    let stabilization = format!(
        "--horizontal-pod-autoscaler-downscale-stabilization-seconds={DOWNSCALE_STABILIZATION_SECONDS}"
    );
    let lab =
        TestLab::up_with_args("hpa", 3, &[&sync, &stabilization], &["--usage-report-ms=1000"])
            .await;
    let output = lab.kubectl_with_input(&["apply", "-f", "-"], Some(DEPLOYMENT));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_for_replicas(&lab, 1, Duration::from_secs(60)).await;
    lab.kubectl_ok(&["autoscale", "deployment", "web", "--cpu-percent=50", "--min=1", "--max=3"]);

    // Idle, the pod's usage is measured and shown by every kubectl version, and the
    // autoscaler keeps the minimum.
    for version in ["1.27", "1.31", "1.33"] {
        let kubectl = format!("/usr/lib/google-cloud-sdk/bin/kubectl.{version}");
        if !std::path::Path::new(&kubectl).exists() {
            eprintln!("kubectl {version} is not installed here: not checked");
            continue;
        }
        let pods = every_second_until(
            &format!("kubectl {version} top pods"),
            Duration::from_secs(20),
            || {
                top_pods(&lab, &kubectl)
                    .and_then(|p| (p.len() == 1).then_some(p).ok_or("no pod".into()))
            },
        )
        .await;
        println!("kubectl {version} top pods, idle (CPU m, memory Mi): {pods:?}");
        assert!(pods.values().all(|(_, memory)| *memory > 0), "netexec's memory is measured");
        let nodes = stdout_of(&lab.kubectl_binary_with_input(
            &kubectl,
            &["top", "nodes", "--no-headers"],
            None,
        ))
        .unwrap_or_else(|e| panic!("kubectl {version} top nodes: {e}"));
        assert_eq!(nodes.lines().count(), 3, "kubectl {version} top nodes: {nodes}");
        for line in nodes.lines() {
            let columns: Vec<&str> = line.split_whitespace().collect();
            assert!(
                columns.len() >= 5
                    && columns[1].ends_with('m')
                    && columns[2].ends_with('%')
                    && columns[3].ends_with("Mi")
                    && columns[3] != "0Mi",
                "kubectl {version} top nodes line (CPU, %, memory, %) {line:?}"
            );
        }
    }
    let missing = lab.kubectl(&["top", "pod", "nosuch"]);
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success()
            && said.contains(r#"podmetrics.metrics.k8s.io "default/nosuch" not found"#),
        "kubectl top pod of a pod without metrics: {said}"
    );
    let (idle, _) = every_second_until("a measured utilization", Duration::from_secs(20), || {
        let row = hpa_row(&lab)?;
        utilization(&row.0).map(|u| (u, row.1)).ok_or(format!("{row:?}"))
    })
    .await;
    println!("idle: kubectl get hpa shows cpu {idle}%/50%");
    assert!(idle < 50, "an idle netexec is below its target: {idle}%");
    assert_eq!(web_replicas(&lab).await.0, 1, "idle: the minimum");

    // Load through the Service.
    let service: k8s_openapi::api::core::v1::Service =
        lab.api.get(Some("default"), "web").await.unwrap().unwrap();
    let vip = service.spec.and_then(|s| s.cluster_ip).expect("the service's cluster IP");
    let output = lab.kubectl_with_input(&["apply", "-f", "-"], Some(&load_generator("load", &vip)));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let load = lab.wait_running("load").await;
    assert_route_stays_in_lab(&lab.pod_netns(&load), vip.parse().expect("an IPv4 VIP"));
    let loaded = Instant::now();
    let busy = every_second_until("the first pod busy", Duration::from_secs(20), || {
        let pods = top_pods(&lab, &support::lab::kubectl_binary())?;
        pods.values().any(|(cpu, _)| *cpu >= 50).then_some(pods).ok_or("not busy yet".into())
    })
    .await;
    println!(
        "{:.1}s after the load started, kubectl top pods: {busy:?}",
        loaded.elapsed().as_secs_f64()
    );
    wait_for_replicas(&lab, 3, Duration::from_secs(60)).await;
    let scaled_up = loaded.elapsed();
    // The three share the load: each is measured busy, and the autoscaler shows them above
    // the target and at its maximum.
    let shared = every_second_until("three pods busy", Duration::from_secs(30), || {
        let pods = top_pods(&lab, &support::lab::kubectl_binary())?;
        (pods.len() == 3 && pods.values().all(|(cpu, _)| *cpu >= 10))
            .then_some(pods)
            .ok_or("not all three busy".into())
    })
    .await;
    println!("at the maximum, kubectl top pods: {shared:?}");
    let (busy_targets, replicas) =
        every_second_until("the HPA at 3", Duration::from_secs(20), || {
            let row = hpa_row(&lab)?;
            (row.1 == 3 && utilization(&row.0).is_some_and(|u| u > 50))
                .then_some(row.clone())
                .ok_or(format!("{row:?}"))
        })
        .await;
    println!("under load: kubectl get hpa shows cpu {busy_targets}, {replicas} replicas");
    let v1: Value = serde_json::from_str(&lab.kubectl_ok(&[
        "get",
        "horizontalpodautoscalers.v1.autoscaling",
        "web",
        "-o",
        "json",
    ]))
    .expect("the v1 autoscaler as JSON");
    let v1_utilization = v1["status"]["currentCPUUtilizationPercentage"].as_u64();
    assert!(v1_utilization.is_some_and(|u| u > 50), "autoscaling/v1 status: {}", v1["status"]);

    // The load stops: the replicas come down to the minimum, after the window.
    lab.kubectl_ok(&["delete", "pod", "load", "--wait=false"]);
    let stopped = Instant::now();
    wait_for_replicas(&lab, 1, Duration::from_secs(60)).await;
    let scaled_down = stopped.elapsed();
    println!(
        "scaled 1 → 3 (3 ready) {:.1}s after the load started; 3 → 1 {:.1}s after it stopped \
         (sync period {SYNC_PERIOD_SECONDS}s, downscale stabilization {DOWNSCALE_STABILIZATION_SECONDS}s)",
        scaled_up.as_secs_f64(),
        scaled_down.as_secs_f64()
    );
    assert!(
        scaled_down >= Duration::from_secs(DOWNSCALE_STABILIZATION_SECONDS - SYNC_PERIOD_SECONDS),
        "not before the stabilization window: {scaled_down:?}"
    );
    let (idle_targets, _) = every_second_until("the HPA at 1", Duration::from_secs(20), || {
        let row = hpa_row(&lab)?;
        (row.1 == 1).then_some(row.clone()).ok_or(format!("{row:?}"))
    })
    .await;
    println!("after the load: kubectl get hpa shows cpu {idle_targets}");
    let described = lab.kubectl_ok(&["describe", "hpa", "web"]);
    for expected in ["New size: 3", "New size: 1", "SuccessfulRescale", "ValidMetricFound"] {
        assert!(
            described.contains(expected),
            "kubectl describe hpa lacks {expected:?}:\n{described}"
        );
    }

    // kubectl before 1.33 creates autoscaling/v1 autoscalers: one made by kubectl 1.27 scales
    // the same Deployment up under the same load.
    let kubectl_1_27 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";
    if !std::path::Path::new(kubectl_1_27).exists() {
        eprintln!("kubectl 1.27 is not installed here: its autoscaling/v1 autoscaler not checked");
        return;
    }
    lab.kubectl_ok(&["delete", "hpa", "web"]);
    let args = ["autoscale", "deployment", "web", "--cpu-percent=50", "--min=1", "--max=3", "-v=6"];
    let output = lab.kubectl_binary_with_input(kubectl_1_27, &args, None);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl 1.27 autoscale: {log}");
    assert!(
        log.lines().any(|l| l.contains("POST") && l.contains("/apis/autoscaling/v1/")),
        "kubectl 1.27 creates an autoscaling/v1 autoscaler: {log}"
    );
    let output =
        lab.kubectl_with_input(&["apply", "-f", "-"], Some(&load_generator("load-v1", &vip)));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    lab.wait_running("load-v1").await;
    let loaded = Instant::now();
    wait_for_replicas(&lab, 3, Duration::from_secs(60)).await;
    println!(
        "the autoscaling/v1 autoscaler scaled 1 → 3 (3 ready) {:.1}s after the load started",
        loaded.elapsed().as_secs_f64()
    );
    let row = stdout_of(&lab.kubectl_binary_with_input(
        kubectl_1_27,
        &["get", "hpa", "web", "--no-headers"],
        None,
    ))
    .expect("kubectl 1.27 get hpa");
    println!("kubectl 1.27 get hpa: {}", row.trim());
    assert!(row.contains("Deployment/web"), "{row}");
}
