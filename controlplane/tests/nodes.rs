//! Nodes and their lifecycle through the API: leases in `kube-node-lease`, a node whose lease
//! lapses turning Unknown and tainted, its pods losing readiness and being evicted after
//! their toleration, and everything restored when the node comes back.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    coordination::v1::Lease,
    core::v1::{Event, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, eventually, node},
};

/// What the controller under test is configured with: seconds, not Kubernetes' minutes.
const GRACE: Duration = Duration::from_secs(2);
const UNREACHABLE_TOLERATION: i64 = 3;

async fn start(label: &str) -> TestController {
    TestController::start_with(label, |config| {
        config.node_lifecycle.grace_period = GRACE;
        config.registry.default_tolerations.unreachable = UNREACHABLE_TOLERATION;
        config.registry.default_tolerations.not_ready = 30;
    })
    .await
}

/// Plays the node agents' lease renewal for the nodes in its set, every 250 ms.
struct LeaseRenewer {
    alive: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseRenewer {
    fn start(client: ApiClient, nodes: &[&str]) -> Self {
        let alive: Arc<Mutex<BTreeSet<String>>> =
            Arc::new(Mutex::new(nodes.iter().map(|n| (*n).to_owned()).collect()));
        let renewing = Arc::clone(&alive);
        let task = tokio::spawn(async move {
            loop {
                let nodes: Vec<String> = renewing.lock().unwrap().iter().cloned().collect();
                for node in nodes {
                    renew(&client, &node).await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { alive, task }
    }

    fn stop(&self, node: &str) {
        self.alive.lock().unwrap().remove(node);
    }

    fn resume(&self, node: &str) {
        self.alive.lock().unwrap().insert(node.to_owned());
    }
}

impl Drop for LeaseRenewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn microseconds_now() -> k8s_openapi::jiff::Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap())
        .unwrap();
    k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap()
}

/// One renewal: a fresh renewTime, creating the lease the first time.
async fn renew(client: &ApiClient, node: &str) {
    let now = microseconds_now().to_string();
    match client.get::<Lease>(Some("kube-node-lease"), node).await.unwrap() {
        Some(mut current) => {
            let spec = current.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(serde_json::from_value(json!(now)).unwrap());
            // A conflict with nobody: the renewer is the only writer.
            client.replace(Some("kube-node-lease"), node, &current).await.unwrap();
        }
        None => {
            let mut fresh = lease(node, 40);
            fresh.spec.as_mut().unwrap().renew_time =
                Some(serde_json::from_value(json!(now)).unwrap());
            client.create(Some("kube-node-lease"), &fresh).await.unwrap();
        }
    }
}

fn lease(node: &str, duration: i32) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "renewTime": "2026-01-01T00:00:00.000000Z",
        },
    }))
    .expect("a lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_leases_are_created_renewed_and_validated_in_kube_node_lease() {
    let server = TestController::start("leases").await;
    let client = server.client();
    let created =
        client.create::<Lease>(Some("kube-node-lease"), &lease("node-1", 40)).await.unwrap();
    assert_eq!(created.spec.as_ref().unwrap().holder_identity.as_deref(), Some("node-1"));

    // Renewal: a PUT with the current resourceVersion; a stale one is a conflict.
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().renew_time =
        Some(serde_json::from_value(json!("2026-01-01T00:00:10.500000Z")).unwrap());
    let after = client.replace(Some("kube-node-lease"), "node-1", &renewed).await.unwrap();
    assert_ne!(after.metadata.resource_version, created.metadata.resource_version);
    let stale = client.replace(Some("kube-node-lease"), "node-1", &renewed).await.unwrap_err();
    assert_eq!(stale.code(), Some(409), "{stale}");
    let stored: Lease = client.get(Some("kube-node-lease"), "node-1").await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&stored.spec.unwrap().renew_time).unwrap(),
        json!("2026-01-01T00:00:10.500000Z"),
        "renewTime keeps its microseconds"
    );

    // Invalid durations are refused with the field named.
    let invalid = client.create::<Lease>(Some("kube-node-lease"), &lease("node-2", 0)).await;
    let error = invalid.unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.leaseDurationSeconds"), "{error}");

    // Listed under the coordination group.
    let (status, body) = client
        .send(
            http::Method::GET,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            "",
            None,
        )
        .await
        .unwrap();
    assert!(status.is_success());
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["kind"], "LeaseList");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
}

fn ready_condition(node: &Node) -> Option<(String, Option<String>)> {
    let condition =
        node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    Some((condition.status.clone(), condition.reason.clone()))
}

fn taints(node: &Node) -> Vec<(String, String)> {
    let mut taints: Vec<_> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.effect))
        .collect();
    taints.sort();
    taints
}

fn pod_ready(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone())
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// Reports a pod Running and Ready with `ip`, as its node agent would.
async fn report_running(client: &ApiClient, name: &str, ip: &str) {
    client
        .merge_patch::<Pod>(
            Some("default"),
            name,
            &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}]}}),
            true,
        )
        .await
        .unwrap();
}

async fn web_pods(client: &ApiClient) -> Vec<Pod> {
    client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap().0
}

/// The endpoints of service `web`: pod name → ready.
async fn web_endpoints(client: &ApiClient) -> Vec<(String, bool)> {
    let (slices, _) = client
        .list::<EndpointSlice>(Some("default"), "labelSelector=kubernetes.io/service-name%3Dweb")
        .await
        .unwrap();
    let mut endpoints: Vec<(String, bool)> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| {
            let name = e.target_ref.as_ref().and_then(|t| t.name.clone()).unwrap_or_default();
            (name, e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        })
        .collect();
    endpoints.sort();
    endpoints
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_lapses_is_unknown_tainted_and_its_pods_leave_and_come_back_elsewhere() {
    let server = start("node-lease-lapse").await;
    let client = server.client();
    for (name, ip) in [("n1", "172.20.0.11"), ("n2", "172.20.0.12")] {
        client.create::<Node>(None, &node(name, ip, true)).await.unwrap();
    }
    let renewer = LeaseRenewer::start(client.clone(), &["n1", "n2"]);
    let set: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "web", "image": "strait/netexec"}],
                },
            },
        },
    }))
    .unwrap();
    client.create(Some("default"), &set).await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    client.create(Some("default"), &service).await.unwrap();
    // A pod of its own that tolerates everything forever: never evicted.
    let loyal: Pod = serde_json::from_value(json!({
        "metadata": {"name": "loyal"},
        "spec": {"nodeName": "n1", "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "app", "image": "strait/netexec"}]},
    }))
    .unwrap();
    client.create(Some("default"), &loyal).await.unwrap();
    report_running(&client, "loyal", "10.244.1.100").await;

    let pods = eventually("two web pods, one on each node", 10, || async {
        let pods = web_pods(&client).await;
        let nodes: BTreeSet<String> = pods.iter().map(node_of).collect();
        (pods.len() == 2 && nodes.len() == 2 && !nodes.contains("")).then_some(pods)
    })
    .await;
    for (index, pod) in pods.iter().enumerate() {
        let ip = format!("10.244.{}.{}", index + 1, 10 + index);
        report_running(&client, pod.metadata.name.as_deref().unwrap(), &ip).await;
    }
    let defaulted = pods[0].spec.as_ref().unwrap().tolerations.clone().unwrap_or_default();
    assert!(
        defaulted.iter().any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable")
            && t.toleration_seconds == Some(UNREACHABLE_TOLERATION)),
        "pods get the default toleration: {defaulted:?}"
    );
    let on_n1 = pods.iter().find(|p| node_of(p) == "n1").unwrap().metadata.name.clone().unwrap();
    let on_n2 = pods.iter().find(|p| node_of(p) == "n2").unwrap().metadata.name.clone().unwrap();
    eventually("both endpoints ready", 10, || async {
        let endpoints = web_endpoints(&client).await;
        (endpoints.len() == 2 && endpoints.iter().all(|(_, ready)| *ready)).then_some(())
    })
    .await;
    // Renewed leases keep both nodes Ready well past the grace period.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    for name in ["n1", "n2"] {
        let n: Node = client.get(None, name).await.unwrap().unwrap();
        assert_eq!(ready_condition(&n).unwrap().0, "True", "{name} stays Ready");
        assert!(taints(&n).is_empty(), "{name}: {:?}", taints(&n));
    }

    // n1 stops renewing.
    renewer.stop("n1");
    let stopped = Instant::now();
    let lapsed = eventually("n1 Unknown and tainted unreachable", 10, || async {
        let n: Node = client.get(None, "n1").await.unwrap()?;
        (ready_condition(&n)?.0 == "Unknown").then_some(n)
    })
    .await;
    let detected = stopped.elapsed();
    println!(
        "n1 marked Unknown {:.2}s after its last lease renewal stopped",
        detected.as_secs_f64()
    );
    assert!(detected >= GRACE - Duration::from_millis(300), "not before the grace: {detected:?}");
    assert!(detected <= GRACE + Duration::from_secs(2), "within grace + 2 s: {detected:?}");
    assert_eq!(ready_condition(&lapsed).unwrap().1.as_deref(), Some("NodeStatusUnknown"));
    assert_eq!(
        taints(&lapsed),
        [
            ("node.kubernetes.io/unreachable".to_owned(), "NoExecute".to_owned()),
            ("node.kubernetes.io/unreachable".to_owned(), "NoSchedule".to_owned()),
        ]
    );
    let n2: Node = client.get(None, "n2").await.unwrap().unwrap();
    assert_eq!(ready_condition(&n2).unwrap().0, "True", "n2 keeps renewing");
    eventually("a NodeNotReady event for n1", 5, || async {
        let (events, _) = client
            .list::<Event>(Some("default"), "fieldSelector=involvedObject.name%3Dn1")
            .await
            .unwrap();
        events.iter().any(|e| e.reason.as_deref() == Some("NodeNotReady")).then_some(())
    })
    .await;

    // Its pods lose readiness, and their endpoints leave the service.
    eventually("n1's pods not ready, its endpoint not ready", 5, || async {
        let pod: Pod = client.get(Some("default"), &on_n1).await.unwrap()?;
        let loyal: Pod = client.get(Some("default"), "loyal").await.unwrap()?;
        let endpoints = web_endpoints(&client).await;
        (pod_ready(&pod)?.as_str() == "False"
            && pod_ready(&loyal)?.as_str() == "False"
            && endpoints.iter().all(|(name, ready)| *ready == (name == &on_n2)))
        .then_some(())
    })
    .await;
    println!(
        "n1's endpoint not ready {:.2}s after its lease stopped",
        stopped.elapsed().as_secs_f64()
    );

    // After its toleration the web pod is evicted, its deletion completes without an agent,
    // and its replica set replaces it on n2.
    let replaced = eventually("the evicted pod gone and replaced on n2", 20, || async {
        let pods = web_pods(&client).await;
        let gone = !pods.iter().any(|p| p.metadata.name.as_deref() == Some(on_n1.as_str()));
        (gone && pods.len() == 2 && pods.iter().all(|p| node_of(p) == "n2")).then_some(pods)
    })
    .await;
    let evicted_after = stopped.elapsed();
    println!(
        "n1's pod evicted, removed and replaced {:.2}s after its lease stopped",
        evicted_after.as_secs_f64()
    );
    assert!(
        evicted_after
            >= GRACE + Duration::from_secs(UNREACHABLE_TOLERATION as u64) - Duration::from_secs(1),
        "not before its toleration: {evicted_after:?}"
    );
    let (events, _) = client
        .list::<Event>(Some("default"), &format!("fieldSelector=involvedObject.name%3D{on_n1}"))
        .await
        .unwrap();
    let reasons: BTreeSet<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(
        reasons.contains("NodeNotReady") && reasons.contains("TaintManagerEviction"),
        "{reasons:?}"
    );
    let loyal: Pod = client.get(Some("default"), "loyal").await.unwrap().expect("loyal stays");
    assert!(loyal.metadata.deletion_timestamp.is_none(), "a pod tolerating forever stays");
    let replacement = replaced
        .iter()
        .find(|p| p.metadata.name.as_deref() != Some(on_n2.as_str()))
        .and_then(|p| p.metadata.name.clone())
        .unwrap();
    report_running(&client, &replacement, "10.244.2.20").await;
    eventually("the replacement's endpoint ready", 5, || async {
        let endpoints = web_endpoints(&client).await;
        let expected = {
            let mut e = vec![(on_n2.clone(), true), (replacement.clone(), true)];
            e.sort();
            e
        };
        (endpoints == expected).then_some(())
    })
    .await;

    // n1 comes back: its lease renews and its agent reports Ready; taints and Unknown go.
    renewer.resume("n1");
    let mut back: Node = client.get(None, "n1").await.unwrap().unwrap();
    for condition in back.status.as_mut().unwrap().conditions.as_mut().unwrap() {
        if condition.type_ == "Ready" {
            condition.status = "True".to_owned();
            condition.reason = Some("StraitAgentReady".to_owned());
            condition.last_heartbeat_time =
                Some(serde_json::from_value(json!(microseconds_now().to_string())).unwrap());
        }
    }
    client.replace_status(None, "n1", &back).await.unwrap();
    let healed = eventually("n1 Ready without taints", 10, || async {
        let n: Node = client.get(None, "n1").await.unwrap()?;
        (ready_condition(&n)?.0 == "True" && taints(&n).is_empty()).then_some(n)
    })
    .await;
    // And stays so, its lease renewed.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let later: Node = client.get(None, "n1").await.unwrap().unwrap();
    assert_eq!(ready_condition(&later).unwrap().0, "True", "{healed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_cordoned_nodes_are_tainted_and_the_scheduler_keeps_off_them() {
    let server = start("node-taints").await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.11", true)).await.unwrap();
    let _renewer = LeaseRenewer::start(client.clone(), &["n1"]);

    // The agent reports NotReady: not-ready taints.
    client
        .merge_patch::<Node>(
            None,
            "n1",
            &json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "StraitAgentStarting"}]}}),
            true,
        )
        .await
        .unwrap();
    eventually("not-ready taints", 5, || async {
        let n: Node = client.get(None, "n1").await.unwrap()?;
        (taints(&n)
            == [
                ("node.kubernetes.io/not-ready".to_owned(), "NoExecute".to_owned()),
                ("node.kubernetes.io/not-ready".to_owned(), "NoSchedule".to_owned()),
            ])
        .then_some(())
    })
    .await;
    let n: Node = client.get(None, "n1").await.unwrap().unwrap();
    let added = n.spec.unwrap().taints.unwrap();
    assert!(
        added.iter().all(|t| (t.effect == "NoExecute") == t.time_added.is_some()),
        "NoExecute taints carry timeAdded: {added:?}"
    );

    // Ready again, then cordoned (as `kubectl cordon` patches it): only the cordon's taint.
    client
        .merge_patch::<Node>(
            None,
            "n1",
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "StraitAgentReady"}]}}),
            true,
        )
        .await
        .unwrap();
    client
        .merge_patch::<Node>(None, "n1", &json!({"spec": {"unschedulable": true}}), false)
        .await
        .unwrap();
    eventually("the unschedulable taint alone", 5, || async {
        let n: Node = client.get(None, "n1").await.unwrap()?;
        (taints(&n) == [("node.kubernetes.io/unschedulable".to_owned(), "NoSchedule".to_owned())])
            .then_some(())
    })
    .await;

    // A pod stays pending on the cordoned node with the reason; one that tolerates the cordon
    // is placed.
    let pod = |name: &str, tolerations: Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"tolerations": tolerations,
                     "containers": [{"name": "app", "image": "strait/netexec"}]},
        }))
        .unwrap()
    };
    client.create(Some("default"), &pod("plain", json!([]))).await.unwrap();
    let tolerant = json!([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]);
    client.create(Some("default"), &pod("tolerant", tolerant)).await.unwrap();
    let message = eventually("plain stays pending with the reason", 5, || async {
        let p: Pod = client.get(Some("default"), "plain").await.unwrap()?;
        let scheduled = p.status?.conditions?.into_iter().find(|c| c.type_ == "PodScheduled")?;
        (scheduled.status == "False").then_some(scheduled.message.unwrap_or_default())
    })
    .await;
    assert_eq!(message, "0/1 nodes are available: 1 node(s) were unschedulable.");
    eventually("tolerant placed on n1", 5, || async {
        let p: Pod = client.get(Some("default"), "tolerant").await.unwrap()?;
        (node_of(&p) == "n1").then_some(())
    })
    .await;

    // Uncordoned: the taint goes and the waiting pod is placed.
    client
        .merge_patch::<Node>(None, "n1", &json!({"spec": {"unschedulable": false}}), false)
        .await
        .unwrap();
    eventually("no taints and plain placed", 5, || async {
        let n: Node = client.get(None, "n1").await.unwrap()?;
        let p: Pod = client.get(Some("default"), "plain").await.unwrap()?;
        (taints(&n).is_empty() && node_of(&p) == "n1").then_some(())
    })
    .await;
}
