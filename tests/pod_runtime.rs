//! The pod runtime end to end on a lab, through kubectl: containers of a pod share localhost
//! and an emptyDir that outlives a container restart and goes with the pod; ConfigMaps and
//! field references reach containers as env and as files, and a changed ConfigMap reaches a
//! running container; crashing containers back off as Kubernetes' do; a missing ConfigMap
//! keeps a container waiting until it exists; limits are enforced or reported as not
//! enforced; a deleted pod's endpoint turns terminating at once and its container is killed
//! after the grace period.
//!
//! What the containers see is read back from their own output, in the log files the agent
//! keeps for them.

mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{ContainerStatus, Pod},
    discovery::v1::EndpointSlice,
};
use strait::lab;
use strait_dataplane::cgroup::{Cgroup, cgroup2_mount};
use support::lab::TestLab;

const NODE: &str = "node-1";

fn create(lab: &TestLab, manifest: &str) {
    let output = lab.kubectl_with_input(&["create", "-f", "-"], Some(manifest));
    assert!(
        output.status.success(),
        "kubectl create: {}\n{manifest}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The agent's state directory of the lab's only node.
fn node_dir(lab: &TestLab) -> PathBuf {
    lab::lab_dir(lab.name()).join("nodes").join(NODE)
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("a uid")
}

/// What a container printed so far.
fn log_of(lab: &TestLab, pod: &Pod, container: &str) -> String {
    lab.container_output(NODE, pod, container)
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|s| s.name == container)
}

fn waiting_reason(pod: &Pod, container: &str) -> Option<(String, String)> {
    let waiting = status_of(pod, container)?.state.as_ref()?.waiting.as_ref()?;
    Some((waiting.reason.clone().unwrap_or_default(), waiting.message.clone().unwrap_or_default()))
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

async fn get(lab: &TestLab, name: &str) -> Option<Pod> {
    lab.api.get::<Pod>(Some("default"), name).await.expect("reading the pod")
}

/// Polls the pod every 100 ms until `check` gives a value; fails after `timeout` with the
/// last status seen and the lab's logs.
async fn until<T>(
    lab: &TestLab,
    name: &str,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&Pod) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(pod) = get(lab, name).await {
            if let Some(value) = check(&pod) {
                return value;
            }
            last = pod.status;
        }
        if Instant::now() > deadline {
            panic!("{name}: {what}: not within {timeout:?}; last status: {last:?}\n{}", lab.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events about pod `name`, as (type, reason, message), through kubectl.
fn events_of(lab: &TestLab, name: &str) -> Vec<(String, String, String)> {
    let selector = format!("involvedObject.name={name}");
    let json = lab.kubectl_ok(&["get", "events", "--field-selector", &selector, "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&json).expect("an event list");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["source"]["component"] == "kubelet")
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or_default().to_owned();
            (text("type"), text("reason"), text("message"))
        })
        .collect()
}

/// Waits until pod `name` has an event of `reason` whose message contains `message`.
async fn until_event(lab: &TestLab, name: &str, reason: &str, message: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = events_of(lab, name);
        if events.iter().any(|(_, r, m)| r == reason && m.contains(message)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no {reason} event with {message:?}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether anything is mounted at or below `dir` (in the test's, i.e. the node's, namespace).
fn mounted_below(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

fn shared_pod_manifest(tag: &str, host_dir: &Path) -> String {
    let host_dir = host_dir.display();
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: app-config}}
data:
  greeting: hello
  app.conf: "mode=fast\n"
---
apiVersion: v1
kind: Pod
metadata:
  name: shared
  labels: {{app: web}}
  annotations: {{team: net}}
spec:
  volumes:
  - {{name: data, emptyDir: {{}}}}
  - {{name: cache, emptyDir: {{medium: Memory, sizeLimit: 16Mi}}}}
  - {{name: config, configMap: {{name: app-config}}}}
  - {{name: host, hostPath: {{path: "{host_dir}", type: DirectoryOrCreate}}}}
  containers:
  - name: web
    image: strait/netexec
  - name: writer
    image: none
    command:
    - bash
    - -c
    - |
      echo start >> /shared-{tag}/starts
      for i in $(seq 100); do
        body=$( (exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /hostname HTTP/1.0\r\n\r\n' >&3 && tail -n1 <&3) 2>/dev/null ) && break
        sleep 0.1
      done
      echo "starts=$(wc -l < /shared-{tag}/starts) localhost=$body name=$POD_NAME ns=$POD_NS uid=$POD_UID ip=$POD_IP host=$HOST_IP node=$NODE app=$APP team=$TEAM greeting=$GREETING cfg=$CFG_greeting mem=$MEM_MI optional=${{OPTIONAL:-unset}} cache=$(stat -f -c %T /cache) conf=$(cat /etc/strait-{tag}/config/app.conf)"
      echo "written by writer" > /shared-{tag}/msg
      echo "from the container" > /host-{tag}/out
      exec sleep 100000
    env:
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
    - {{name: POD_UID, valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: HOST_IP, valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}}}
    - {{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
    - {{name: APP, valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['app']"}}}}}}
    - {{name: TEAM, valueFrom: {{fieldRef: {{fieldPath: "metadata.annotations['team']"}}}}}}
    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: app-config, key: greeting}}}}}}
    - {{name: OPTIONAL, valueFrom: {{configMapKeyRef: {{name: nowhere, key: x, optional: true}}}}}}
    - {{name: MEM_MI, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
    envFrom:
    - {{configMapRef: {{name: app-config}}, prefix: CFG_}}
    resources: {{limits: {{memory: 256Mi}}}}
    volumeMounts:
    - {{name: data, mountPath: /shared-{tag}}}
    - {{name: cache, mountPath: /cache}}
    - {{name: config, mountPath: /etc/strait-{tag}/config}}
    - {{name: host, mountPath: /host-{tag}}}
  - name: reader
    image: none
    command:
    - bash
    - -c
    - |
      until [ -f /shared-{tag}/msg ]; do sleep 0.1; done
      echo "reader saw: $(cat /shared-{tag}/msg)"
      last=""
      while true; do
        g=$(cat /etc/strait-{tag}/config/greeting)
        [ "$g" != "$last" ] && echo "greeting=$g" && last=$g
        sleep 0.2
      done
    volumeMounts:
    - {{name: data, mountPath: /shared-{tag}}}
    - {{name: config, mountPath: /etc/strait-{tag}/config}}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_of_a_pod_share_localhost_an_empty_dir_and_their_config() {
    if !support::privileged("containers_of_a_pod_share_localhost_an_empty_dir_and_their_config") {
        return;
    }
    let lab = TestLab::up("volumes", 1).await;
    let tag = std::process::id().to_string();
    let in_container =
        [PathBuf::from(format!("/shared-{tag}")), PathBuf::from(format!("/etc/strait-{tag}"))];
    for path in &in_container {
        assert!(!path.exists(), "{} exists on the node before the test", path.display());
    }
    let host = support::DirGuard::temp("hostpath");
    let host_dir = host.path().join("made");
    create(&lab, &shared_pod_manifest(&tag, &host_dir));
    let pod = lab.wait_running("shared").await;
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("an IP");
    let host_ip = pod.status.as_ref().and_then(|s| s.host_ip.clone()).expect("a host IP");

    // The writer reached the web container on localhost, and saw its env and files.
    let expected = format!(
        "starts=1 localhost=shared name=shared ns=default uid={} ip={pod_ip} host={host_ip} node={NODE} app=web team=net greeting=hello cfg=hello mem=256 optional=unset cache=tmpfs conf=mode=fast",
        uid(&pod)
    );
    until(&lab, "shared", "the writer's report", Duration::from_secs(20), |pod| {
        log_of(&lab, pod, "writer").contains(&expected).then_some(())
    })
    .await;
    // The reader saw what the writer wrote in the emptyDir, and the ConfigMap's file.
    until(&lab, "shared", "the reader's report", Duration::from_secs(20), |pod| {
        let log = log_of(&lab, pod, "reader");
        (log.contains("reader saw: written by writer") && log.contains("greeting=hello"))
            .then_some(())
    })
    .await;
    // Mount points that do not exist on the node were made in the containers' view only.
    for path in &in_container {
        assert!(!path.exists(), "{} appeared on the node", path.display());
    }
    let pod_dir = node_dir(&lab).join("pods").join(uid(&pod));
    let empty_dir = pod_dir.join("volumes/empty-dir/data");
    assert_eq!(std::fs::read_to_string(empty_dir.join("msg")).unwrap(), "written by writer\n");
    // The hostPath directory was made (DirectoryOrCreate) and is the node's own.
    assert_eq!(std::fs::read_to_string(host_dir.join("out")).unwrap(), "from the container\n");

    // A changed ConfigMap reaches the running container's files, with no restart.
    let table = lab.kubectl_ok(&["get", "configmap", "app-config"]);
    assert!(
        table.lines().nth(1).is_some_and(|row| row.split_whitespace().nth(1) == Some("2")),
        "{table}"
    );
    lab.kubectl_ok(&[
        "patch",
        "configmap",
        "app-config",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"greeting":"bonjour"}}"#,
    ]);
    let updated = Instant::now();
    until(&lab, "shared", "the new greeting in the reader", Duration::from_secs(10), |pod| {
        log_of(&lab, pod, "reader").contains("greeting=bonjour").then_some(())
    })
    .await;
    eprintln!("a ConfigMap change reached a running container in {:?}", updated.elapsed());
    let pod = get(&lab, "shared").await.expect("the pod");
    assert_eq!(status_of(&pod, "reader").map(|s| s.restart_count), Some(0));

    // A container restart keeps the emptyDir: the writer finds its first start recorded.
    let writer = Cgroup::new(
        &lab::lab_cgroup(lab.name()).join(NODE).join("pods").join(uid(&pod)).join("writer"),
    )
    .expect("the writer's cgroup");
    writer.kill_all(Duration::from_secs(5)).expect("killing the writer");
    until(
        &lab,
        "shared",
        "the writer restarted with the same emptyDir",
        Duration::from_secs(20),
        |pod| {
            let restarted = status_of(pod, "writer").is_some_and(|s| s.restart_count == 1);
            (restarted && log_of(&lab, pod, "writer").contains("starts=2 localhost=shared"))
                .then_some(())
        },
    )
    .await;

    // The pod's deletion removes its volumes: the directory, and the tmpfs of `cache`.
    assert!(!mounted_below(&pod_dir).is_empty(), "the memory-backed emptyDir is a mount");
    lab.kubectl_ok(&["delete", "pod", "shared", "--wait=true"]);
    assert!(get(&lab, "shared").await.is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod_dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!pod_dir.exists(), "{} outlived the pod", pod_dir.display());
    assert!(mounted_below(&pod_dir).is_empty(), "nothing stays mounted");
}

#[tokio::test(flavor = "multi_thread")]
async fn crashing_containers_back_off_and_missing_config_keeps_them_waiting() {
    if !support::privileged("crashing_containers_back_off_and_missing_config_keeps_them_waiting") {
        return;
    }
    // Short delays (0.5 s doubling to 4 s) instead of Kubernetes' 10 s to 5 min.
    let lab = TestLab::up_with_agent_args(
        "backoff",
        1,
        &["--restart-backoff", "0.5", "--restart-backoff-max", "4"],
    )
    .await;
    let host = support::DirGuard::temp("hostpath-missing");
    let missing = host.path().join("missing");
    create(
        &lab,
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: bad-host}}
spec:
  volumes: [{{name: h, hostPath: {{path: {}, type: Directory}}}}]
  containers: [{{name: c, image: none, command: [sleep, '1000'], volumeMounts: [{{name: h, mountPath: /h}}]}}]
",
            missing.display()
        ),
    );
    create(
        &lab,
        "apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  containers: [{name: c, image: none, command: [sh, -c, 'exit 3']}]
---
apiVersion: v1
kind: Pod
metadata: {name: fails-once}
spec:
  restartPolicy: Never
  containers: [{name: c, image: none, command: [sh, -c, 'exit 3']}]
---
apiVersion: v1
kind: Pod
metadata: {name: succeeds}
spec:
  restartPolicy: OnFailure
  containers: [{name: c, image: none, command: [sh, -c, 'exit 0']}]
---
apiVersion: v1
kind: Pod
metadata: {name: needs-config}
spec:
  containers:
  - name: c
    image: none
    command: [sh, -c, 'echo \"k=$K\"; exec sleep 100000']
    env: [{name: K, valueFrom: {configMapKeyRef: {name: later, key: k}}}]
",
    );

    // Restart count over time: the first exit restarts at once, then 0.5, 1, 2, 4 s.
    let mut restarts_at = Vec::new();
    let start = Instant::now();
    while restarts_at.len() < 5 && start.elapsed() < Duration::from_secs(40) {
        let pod = get(&lab, "crasher").await.expect("the pod");
        let count = status_of(&pod, "c").map_or(0, |s| s.restart_count) as usize;
        while restarts_at.len() < count {
            restarts_at.push(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(restarts_at.len(), 5, "five restarts in time:\n{}", lab.logs());
    // Now in its longest back-off (4 s): kubectl shows it with the restarts.
    let table = lab.kubectl_ok(&["get", "pod", "crasher", "--no-headers"]);
    let columns: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(columns.get(2), Some(&"CrashLoopBackOff"), "{table}");
    assert_eq!(columns.get(3), Some(&"5"), "RESTARTS: {table}");
    let gaps: Vec<f64> = restarts_at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    eprintln!("gaps between restarts (s): {gaps:.2?}");
    // Each gap is the delay measured from this side of the API (its timestamps have whole
    // seconds only): up to a poll and a read late at either end.
    for (gap, expected) in gaps.iter().zip([0.5, 1.0, 2.0, 4.0]) {
        assert!(
            *gap >= expected - 0.25 && *gap < expected + 2.0,
            "a back-off of {expected} s took {gap:.2} s: {gaps:.2?}"
        );
    }
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "the delays grow: {gaps:.2?}");

    // Never: failed for good with its exit code. OnFailure and exit 0: succeeded.
    let failed = until(&lab, "fails-once", "Failed", Duration::from_secs(15), |pod| {
        (phase(pod) == "Failed").then(|| pod.clone())
    })
    .await;
    let status = status_of(&failed, "c").expect("a status");
    assert_eq!(status.restart_count, 0);
    let terminated = status.state.as_ref().and_then(|s| s.terminated.as_ref()).expect("terminated");
    assert_eq!((terminated.exit_code, terminated.reason.as_deref()), (3, Some("Error")));
    until(&lab, "succeeds", "Succeeded", Duration::from_secs(15), |pod| {
        (phase(pod) == "Succeeded").then_some(())
    })
    .await;

    // A missing ConfigMap, then a missing key, keep the container waiting with the kubelet's
    // words; once the key exists it starts with it.
    until(&lab, "needs-config", "waiting for the ConfigMap", Duration::from_secs(15), |pod| {
        (waiting_reason(pod, "c")
            == Some(("CreateContainerConfigError".into(), "configmap \"later\" not found".into())))
        .then_some(())
    })
    .await;
    let table = lab.kubectl_ok(&["get", "pod", "needs-config", "--no-headers"]);
    assert_eq!(table.split_whitespace().nth(2), Some("CreateContainerConfigError"), "{table}");
    create(&lab, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: later}\ndata: {other: x}\n");
    until(&lab, "needs-config", "waiting for the key", Duration::from_secs(15), |pod| {
        waiting_reason(pod, "c")
            .is_some_and(|(_, message)| message == "couldn't find key k in ConfigMap default/later")
            .then_some(())
    })
    .await;
    lab.kubectl_ok(&[
        "patch",
        "configmap",
        "later",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"k":"at last"}}"#,
    ]);
    let pod = until(&lab, "needs-config", "running with the key", Duration::from_secs(15), |pod| {
        (phase(pod) == "Running").then(|| pod.clone())
    })
    .await;
    until(&lab, "needs-config", "its output", Duration::from_secs(10), |_| {
        log_of(&lab, &pod, "c").contains("k=at last").then_some(())
    })
    .await;

    // A hostPath of type Directory that does not exist keeps the pod from starting.
    let expected = format!("hostPath type check failed: {} does not exist", missing.display());
    until(&lab, "bad-host", "waiting for its hostPath", Duration::from_secs(15), |pod| {
        waiting_reason(pod, "c")
            .is_some_and(|(reason, message)| {
                reason == "ContainerCreating" && message.contains(&expected)
            })
            .then_some(())
    })
    .await;
    until_event(&lab, "bad-host", "FailedMount", &expected).await;
    assert!(!missing.exists(), "a hostPath of type Directory is not made");

    // The state changes above are events of the node, as kubectl shows them.
    until_event(
        &lab,
        "crasher",
        "BackOff",
        "Back-off restarting failed container c in pod crasher_default",
    )
    .await;
    until_event(&lab, "crasher", "Started", "Started container c").await;
    until_event(&lab, "needs-config", "Failed", "Error: configmap \"later\" not found").await;
    until_event(&lab, "needs-config", "Created", "Created container c").await;
    let backoff = events_of(&lab, "crasher").into_iter().find(|(_, r, _)| r == "BackOff");
    assert_eq!(backoff.map(|e| e.0).as_deref(), Some("Warning"));
}

/// Whether strait's cgroups can have the memory controller on this machine.
fn memory_controller_offered() -> bool {
    let top = cgroup2_mount().expect("cgroup2").join(strait_dataplane::cgroup::STRAIT_CGROUP);
    std::fs::read_to_string(top.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|name| name == "memory"))
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_enforced_or_reported_and_deleted_pods_stop_after_their_grace() {
    if !support::privileged(
        "limits_are_enforced_or_reported_and_deleted_pods_stop_after_their_grace",
    ) {
        return;
    }
    let lab = TestLab::up("limits", 1).await;
    // A container that takes 64 MiB with a limit of 32 MiB.
    create(
        &lab,
        r#"apiVersion: v1
kind: Pod
metadata: {name: hungry}
spec:
  containers:
  - name: c
    image: none
    command: [python3, -c, "import time; x = bytearray(64 << 20); print('allocated', flush=True); time.sleep(100000)"]
    resources: {limits: {memory: 32Mi, cpu: 500m}}
---
apiVersion: v1
kind: Pod
metadata: {name: stubborn, labels: {app: stubborn}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: c
    image: strait/netexec
  - name: ignores-term
    image: none
    command: [bash, -c, 'trap "" TERM; while true; do sleep 0.1; done']
---
apiVersion: v1
kind: Service
metadata: {name: stubborn}
spec:
  selector: {app: stubborn}
  ports: [{port: 80, targetPort: 8080}]
"#,
    );

    let limits_condition = |pod: &Pod| {
        pod.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "strait.io/ResourceLimitsEnforced")
            .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()))
    };
    if memory_controller_offered() {
        // Over its limit, the container is killed by the kernel and reported as such.
        let pod = until(&lab, "hungry", "OOMKilled", Duration::from_secs(30), |pod| {
            let last = status_of(pod, "c")?.last_state.as_ref()?.terminated.as_ref()?;
            (last.reason.as_deref() == Some("OOMKilled")).then(|| pod.clone())
        })
        .await;
        assert_eq!(limits_condition(&pod).map(|c| c.0).as_deref(), Some("True"));
        until_event(&lab, "hungry", "OOMKilled", "out of memory").await;
        eprintln!("this machine enforces memory limits: the container was OOMKilled");
    } else {
        // This machine's cgroup v2 hierarchy has no memory controller for strait: the pod says
        // its limits are not enforced, and the container keeps its 64 MiB.
        let (status, message) =
            until(&lab, "hungry", "the limits condition", Duration::from_secs(30), |pod| {
                (phase(pod) == "Running").then(|| limits_condition(pod)).flatten()
            })
            .await;
        assert_eq!(status, "False");
        assert!(message.contains("not enforced") && message.contains("memory"), "{message}");
        until(&lab, "hungry", "the allocation", Duration::from_secs(15), |pod| {
            log_of(&lab, pod, "c").contains("allocated").then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pod_now = get(&lab, "hungry").await.expect("the pod");
        assert_eq!(status_of(&pod_now, "c").map(|s| s.restart_count), Some(0), "not killed");
        let table = lab.kubectl_ok(&[
            "get",
            "pod",
            "hungry",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"strait.io/ResourceLimitsEnforced\")].status}",
        ]);
        assert_eq!(table, "False");
        until_event(&lab, "hungry", "LimitsNotEnforced", "limits not enforced").await;
        eprintln!("this machine does not enforce memory limits: reported on the pod");
    }

    // Graceful deletion: the endpoint turns terminating at once; the container that ignores
    // SIGTERM is killed after terminationGracePeriodSeconds (3 s), not before.
    lab.wait_running("stubborn").await;
    let endpoint = || async {
        let (slices, _) = lab
            .api
            .list::<EndpointSlice>(
                Some("default"),
                "labelSelector=kubernetes.io%2Fservice-name%3Dstubborn",
            )
            .await
            .expect("listing slices");
        slices.into_iter().flat_map(|s| s.endpoints).next()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !endpoint().await.and_then(|e| e.conditions).and_then(|c| c.ready).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the endpoint never turned ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deleted = Instant::now();
    lab.kubectl_ok(&["delete", "pod", "stubborn", "--wait=false"]);
    loop {
        let conditions = endpoint().await.and_then(|e| e.conditions).unwrap_or_default();
        if conditions.terminating == Some(true) && conditions.ready == Some(false) {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(2),
            "the endpoint did not turn terminating: {conditions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let terminating_after = deleted.elapsed();
    while get(&lab, "stubborn").await.is_some() {
        assert!(
            deleted.elapsed() < Duration::from_secs(15),
            "the pod outlived its grace period by far"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = deleted.elapsed();
    eprintln!("endpoint terminating after {terminating_after:?}, pod gone after {gone_after:?}");
    assert!(
        gone_after >= Duration::from_millis(2900),
        "killed before its grace period: {gone_after:?}"
    );
    until_event(&lab, "stubborn", "Killing", "Stopping container ignores-term").await;
}
