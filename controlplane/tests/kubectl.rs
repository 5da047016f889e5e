//! Stock kubectl (1.27 and 1.33, unmodified) against a controller on loopback. The test plays
//! the node agent's part with `ApiClient` where one is needed (pod status, the final delete).

mod support;

use std::{process::Stdio, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{AgentTiming, SimulatedAgent, TestController, eventually, node, pod},
};
use support::kubectl::Kubectl;
use tokio::io::{AsyncBufReadExt, BufReader};

const POD_YAML: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels:
    app: web
spec:
  containers:
  - name: web
    image: registry.example/web:1.0
    ports:
    - containerPort: 8080
";

/// The whitespace-separated cells of the line whose first cell is `name`.
fn row<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{output}"))
}

fn header(output: &str) -> &str {
    output.lines().next().unwrap_or_default()
}

async fn kubectl_drives_the_cluster(version: &str) {
    let server = TestController::start(&format!("kubectl-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    // The agent of node-1 registers it.
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    let nodes = kubectl.ok(&["get", "nodes"]).await;
    assert_eq!(
        header(&nodes).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    );
    assert_eq!(row(&nodes, "node-1")[1], "Ready");
    let wide = kubectl.ok(&["get", "nodes", "-o", "wide"]).await;
    assert!(
        header(&wide).contains("INTERNAL-IP") && header(&wide).contains("CONTAINER-RUNTIME"),
        "{wide}"
    );
    assert_eq!(row(&wide, "node-1")[5], "172.20.0.11");

    let namespaces = kubectl.ok(&["get", "ns"]).await;
    assert_eq!(
        header(&namespaces).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATUS", "AGE"]
    );
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert_eq!(row(&namespaces, name)[1], "Active");
    }

    let manifest = server.data_dir().join("pod.yaml");
    std::fs::write(&manifest, POD_YAML).unwrap();
    let manifest = manifest.to_string_lossy().into_owned();
    let created = kubectl.ok(&["create", "-f", &manifest, "--validate=false"]).await;
    assert_eq!(created.trim(), "pod/web created");

    // The scheduler binds it; the agent starts it and reports its IP.
    eventually("web to be scheduled", 10, || async {
        let pod: Pod = client.get(Some("default"), "web").await.unwrap()?;
        pod.spec?.node_name
    })
    .await;
    client
        .merge_patch::<Pod>(
            Some("default"),
            "web",
            &json!({"status": {"phase": "Running", "podIP": "10.244.0.5"}}),
            true,
        )
        .await
        .unwrap();

    let pods = kubectl.ok(&["get", "pods", "-o", "wide"]).await;
    assert!(
        header(&pods).starts_with("NAME")
            && header(&pods).contains("IP")
            && header(&pods).contains("NOMINATED NODE"),
        "{pods}"
    );
    let web = row(&pods, "web");
    // NAME READY STATUS RESTARTS AGE IP NODE NOMINATED-NODE READINESS-GATES
    assert_eq!((web[1], web[2], web[3]), ("0/1", "Running", "0"));
    assert_eq!((web[5], web[6]), ("10.244.0.5", "node-1"), "IP and NODE columns: {pods}");

    let all = kubectl.ok(&["get", "pods", "-A"]).await;
    assert!(header(&all).starts_with("NAMESPACE"), "{all}");
    assert_eq!(row(&all, "default")[1], "web");
    let labelled = kubectl.ok(&["get", "pods", "-l", "app=web"]).await;
    assert_eq!(row(&labelled, "web")[2], "Running");
    let none = kubectl.run(&["get", "pods", "-l", "app=db"]).await;
    assert!(
        none.ok && none.stdout.is_empty() && none.stderr.contains("No resources found"),
        "{}",
        none.stderr
    );
    let by_node = kubectl
        .ok(&["get", "pods", "--field-selector", "spec.nodeName=node-1,status.phase!=Failed"])
        .await;
    assert_eq!(row(&by_node, "web")[0], "web");
    let elsewhere = kubectl.run(&["get", "pods", "--field-selector", "spec.nodeName=node-2"]).await;
    assert!(elsewhere.ok && elsewhere.stdout.is_empty(), "{}", elsewhere.stdout);

    let json_out = kubectl.ok(&["get", "pod", "web", "-o", "json"]).await;
    let object: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(object["metadata"]["name"], "web");
    assert_eq!(object["spec"]["nodeName"], "node-1");
    assert_eq!(object["status"]["podIP"], "10.244.0.5");
    assert_eq!(object["spec"]["restartPolicy"], "Always");
    let yaml_out = kubectl.ok(&["get", "pod", "web", "-o", "yaml"]).await;
    assert!(yaml_out.contains("podIP: 10.244.0.5"), "{yaml_out}");

    let described = kubectl.ok(&["describe", "pod", "web"]).await;
    assert!(described.contains("node-1") && described.contains("10.244.0.5"), "{described}");
    let described = kubectl.ok(&["describe", "node", "node-1"]).await;
    assert!(described.contains("10.244.0.0/24"), "describe node shows the pod CIDR: {described}");

    // `get pods -w` prints the current pods, then a row per change.
    let mut watcher = kubectl
        .command(&["get", "pods", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("kubectl get -w prints within 10s")
            .expect("reading kubectl's output")
            .expect("kubectl get -w is still running")
    };
    assert!(next_line().await.starts_with("NAME"));
    assert!(next_line().await.starts_with("web "));
    client.create::<Pod>(Some("default"), &pod("batch")).await.unwrap();
    let added = next_line().await;
    assert!(added.starts_with("batch "), "a watch event row for the new pod: {added}");
    watcher.kill().await.unwrap();

    // kubectl deletes and waits; the agent stops the pod and removes it with grace 0.
    let deleter = kubectl
        .command(&["delete", "pod", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("web to be marked for deletion", 10, || async {
        let pod: Pod = client.get(Some("default"), "web").await.unwrap()?;
        pod.metadata.deletion_timestamp.map(|_| ())
    })
    .await;
    let pods = kubectl.ok(&["get", "pods"]).await;
    assert_eq!(row(&pods, "web")[2], "Terminating");
    assert!(client.delete::<Pod>(Some("default"), "web", Some(0)).await.unwrap());
    let deleted = tokio::time::timeout(Duration::from_secs(20), deleter.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    assert_eq!(String::from_utf8_lossy(&deleted.stdout).trim(), "pod \"web\" deleted");
    assert!(client.get::<Pod>(Some("default"), "web").await.unwrap().is_none());

    // delete -f of a pod that never ran is immediate.
    let mut unbound = pod("web");
    unbound.spec.as_mut().unwrap().scheduler_name = Some("nobody".to_owned());
    client.create::<Pod>(Some("default"), &unbound).await.unwrap();
    let deleted = kubectl.ok(&["delete", "-f", &manifest]).await;
    assert_eq!(deleted.trim(), "pod \"web\" deleted");
    let missing = kubectl.run(&["get", "pod", "web"]).await;
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("Error from server (NotFound): pods \"web\" not found"),
        "{}",
        missing.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_drives_the_cluster() {
    kubectl_drives_the_cluster("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_drives_the_cluster() {
    kubectl_drives_the_cluster("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_drives_the_cluster() {
    kubectl_drives_the_cluster("1.33").await;
}

async fn kubectl_validation_is_left_to_the_server(version: &str) {
    let server = TestController::start(&format!("kubectl-validation-{version}")).await;
    let client: ApiClient = server.client();
    let kubectl = Kubectl::new(version, &server);
    let write = |name: &str, text: &str| {
        let path = server.data_dir().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };

    // Default (strict) validation: kubectl finds fieldValidation in the OpenAPI document and
    // asks the server to validate instead of refusing for want of a schema.
    let good = write("good.yaml", POD_YAML);
    assert_eq!(kubectl.ok(&["create", "-f", &good]).await.trim(), "pod/web created");
    let unknown = write(
        "unknown.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: odd\nspec:\n  containers:\n  - name: web\n    image: x\n    colour: red\n",
    );
    let output = kubectl.run(&["create", "-f", &unknown]).await;
    assert!(!output.ok);
    assert!(
        output.stderr.contains("unknown field \"spec.containers[0].colour\""),
        "{}",
        output.stderr
    );
    assert!(client.get::<Pod>(Some("default"), "odd").await.unwrap().is_none());

    let bad = write(
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: Web\n    image: x\n",
    );
    let output = kubectl.run(&["create", "-f", &bad, "--validate=false"]).await;
    assert!(!output.ok);
    assert!(
        output.stderr.contains("spec.containers[0].name: Invalid value: \"Web\""),
        "{}",
        output.stderr
    );
    assert!(client.get::<Pod>(Some("default"), "bad").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_leaves_validation_to_the_server() {
    kubectl_validation_is_left_to_the_server("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_leaves_validation_to_the_server() {
    kubectl_validation_is_left_to_the_server("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_leaves_validation_to_the_server() {
    kubectl_validation_is_left_to_the_server("1.33").await;
}

const SERVICE_YAML: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

const BAD_SERVICE_YAML: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: bad
spec:
  ports:
  - port: 80
  - port: 81
";

async fn kubectl_serves_services(version: &str) {
    let server = TestController::start(&format!("kubectl-svc-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    let write = |name: &str, text: &str| {
        let path = server.data_dir().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();

    // Validation left on: kubectl finds the Service in the OpenAPI document.
    let manifest = write("svc.yaml", SERVICE_YAML);
    assert_eq!(kubectl.ok(&["create", "-f", &manifest]).await.trim(), "service/web created");
    let services = kubectl.ok(&["get", "svc"]).await;
    assert_eq!(
        header(&services).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    );
    let web = row(&services, "web");
    let cluster_ip: std::net::Ipv4Addr = web[2].parse().unwrap();
    assert!(cluster_ip.octets()[..2] == [10, 96], "{services}");
    assert_eq!((web[1], web[3], web[4]), ("ClusterIP", "<none>", "80/TCP"));
    let wide = kubectl.ok(&["get", "services", "-o", "wide"]).await;
    assert_eq!(row(&wide, "web")[6], "app=web", "{wide}");
    let dns = kubectl.ok(&["get", "svc", "-n", "kube-system"]).await;
    assert_eq!(&row(&dns, "kube-dns")[2..5], ["10.96.0.10", "<none>", "53/UDP,53/TCP"]);
    let all = kubectl.ok(&["get", "all"]).await;
    assert!(all.contains("service/web"), "{all}");

    // A ready backend: the endpoint slice controller lists it.
    let mut backend = pod("web-1");
    backend.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    backend.spec.as_mut().unwrap().node_name = Some("node-1".to_owned());
    client.create::<Pod>(Some("default"), &backend).await.unwrap();
    client
        .merge_patch::<Pod>(
            Some("default"),
            "web-1",
            &json!({"status": {"phase": "Running", "podIP": "10.244.0.5",
                    "conditions": [{"type": "Ready", "status": "True"}]}}),
            true,
        )
        .await
        .unwrap();
    let slices = eventually("the slice to list web-1", 10, || async {
        let output = kubectl.ok(&["get", "endpointslices"]).await;
        output.contains("10.244.0.5").then_some(output)
    })
    .await;
    assert_eq!(
        header(&slices).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    );
    let slice = slices
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|n| n.starts_with("web-")))
        .unwrap_or_else(|| panic!("no slice of web in:\n{slices}"));
    assert_eq!(&slice[1..4], ["IPv4", "8080", "10.244.0.5"]);

    let described = kubectl.ok(&["describe", "svc", "web"]).await;
    assert!(described.contains(&cluster_ip.to_string()), "{described}");
    if version != "1.27" {
        // 1.31+ read the endpoints from the service's slices.
        assert!(described.contains("10.244.0.5:8080"), "{described}");
    }

    let bad = write("bad.yaml", BAD_SERVICE_YAML);
    let output = kubectl.run(&["create", "-f", &bad]).await;
    assert!(!output.ok);
    assert!(output.stderr.contains("spec.ports[0].name: Required value"), "{}", output.stderr);
    assert!(
        client
            .get::<k8s_openapi::api::core::v1::Service>(Some("default"), "bad")
            .await
            .unwrap()
            .is_none()
    );

    let deleted = kubectl.ok(&["delete", "svc", "web"]).await;
    assert_eq!(deleted.trim(), "service \"web\" deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_serves_services() {
    kubectl_serves_services("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_serves_services() {
    kubectl_serves_services("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_serves_services() {
    kubectl_serves_services("1.33").await;
}

const DEPLOYMENT_YAML: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
spec:
  replicas: 2
  selector:
    matchLabels:
      app: api
  template:
    metadata:
      labels:
        app: api
    spec:
      containers:
      - name: api
        image: strait/netexec:v1
";

/// Cells of a deployment's row in `kubectl get deploy`, once its pods are all ready.
async fn ready_row(kubectl: &Kubectl, name: &str, ready: &str) -> Vec<String> {
    eventually(&format!("{name} at {ready}"), 20, || async {
        let listed = kubectl.ok(&["get", "deploy", name]).await;
        let cells: Vec<String> = row(&listed, name).iter().map(|c| (*c).to_owned()).collect();
        (cells[1] == ready).then_some(cells)
    })
    .await
}

/// Deployments through stock kubectl, with a simulated agent making pods ready: create
/// deployment and apply -f, get, scale, set image and rollout status, history, undo (to the
/// previous and to a given revision), pause, resume and restart.
async fn kubectl_rolls_deployments(version: &str) {
    let server = TestController::start(&format!("kubectl-deploy-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    let _agent = SimulatedAgent::start(client.clone(), "default", AgentTiming::default());

    let manifest = server.data_dir().join("deployment.yaml");
    std::fs::write(&manifest, DEPLOYMENT_YAML).unwrap();
    let applied = kubectl.ok(&["apply", "-f", &manifest.to_string_lossy()]).await;
    assert_eq!(applied.trim(), "deployment.apps/api created");
    // A JSON POST up to 1.31, protobuf from 1.32.
    let created = kubectl
        .ok(&["create", "deployment", "web", "--image=strait/netexec:v1", "--replicas=2"])
        .await;
    assert_eq!(created.trim(), "deployment.apps/web created");
    let (web, container) = ("web", "netexec");

    let status =
        kubectl.ok(&["rollout", "status", &format!("deployment/{web}"), "--timeout=30s"]).await;
    assert!(status.contains(&format!("deployment \"{web}\" successfully rolled out")), "{status}");
    let listed = kubectl.ok(&["get", "deploy"]).await;
    assert_eq!(
        header(&listed).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    assert_eq!(&row(&listed, web)[1..4], ["2/2", "2", "2"], "{listed}");
    let wide = kubectl.ok(&["get", "deployments", "-o", "wide"]).await;
    assert_eq!(
        header(&wide).split_whitespace().collect::<Vec<_>>(),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    );
    assert_eq!(row(&wide, web)[5], container, "{wide}");
    assert_eq!(row(&wide, web)[7], format!("app={web}"), "{wide}");
    let sets = kubectl.ok(&["get", "rs", "-l", &format!("app={web}")]).await;
    assert_eq!(sets.lines().count(), 2, "one replica set: {sets}");

    // kubectl scale: GET, then a merge patch of /scale.
    let scaled = kubectl.ok(&["scale", "deployment", web, "--replicas=3"]).await;
    assert_eq!(scaled.trim(), format!("deployment.apps/{web} scaled"));
    ready_row(&kubectl, web, "3/3").await;

    // A second revision, with its change cause (annotations are merge patches).
    kubectl.ok(&["annotate", "deployment", web, "kubernetes.io/change-cause=image v2"]).await;
    let template = json!({"spec": {"template": {"spec": {"containers": [
        {"name": container, "image": "strait/netexec:v2"}]}}}});
    kubectl.ok(&["patch", "deployment", web, "--type=merge", "-p", &template.to_string()]).await;
    let status =
        kubectl.ok(&["rollout", "status", &format!("deployment/{web}"), "--timeout=30s"]).await;
    assert!(status.contains("successfully rolled out"), "{status}");
    let history = kubectl.ok(&["rollout", "history", &format!("deployment/{web}")]).await;
    let rows: Vec<Vec<&str>> = history
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.first().is_some_and(|c| c.parse::<u32>().is_ok()))
        .collect();
    assert_eq!(rows.len(), 2, "{history}");
    assert_eq!(rows[1], ["2", "image", "v2"], "{history}");
    let detail =
        kubectl.ok(&["rollout", "history", &format!("deployment/{web}"), "--revision=2"]).await;
    assert!(detail.contains("strait/netexec:v2"), "{detail}");
    // describe: the new and old replica sets (found by selector and owner) and the events.
    let described = kubectl.ok(&["describe", "deployment", web]).await;
    let new_set = eventually("the new set in describe", 10, || async {
        let sets = kubectl.ok(&["get", "rs", "-l", &format!("app={web}"), "--no-headers"]).await;
        sets.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.get(1) == Some(&"3"))
            .map(|cells| cells[0].to_owned())
    })
    .await;
    assert!(
        described.contains(&format!("NewReplicaSet:   {new_set} (3/3 replicas created)")),
        "{described}"
    );
    let described = eventually("scaling events in describe", 10, || async {
        let described = kubectl.ok(&["describe", "deployment", web]).await;
        described.contains("Scaled down replica set").then_some(described)
    })
    .await;
    assert!(described.contains("ScalingReplicaSet"), "{described}");

    // set image (a strategic merge patch of the containers by name) is revision 3.
    let deployment = format!("deployment/{web}");
    let image = |version: &str| format!("{container}=strait/netexec:{version}");
    kubectl.ok(&["set", "image", &deployment, &image("v3")]).await;
    rollout_done(&kubectl, &deployment).await;
    assert_eq!(revisions(&kubectl, &deployment).await, ["1", "2", "3"]);

    // rollout undo (a JSON patch of the template): revision 2's set runs again, as 4; with
    // --to-revision, revision 1's, as 5.
    let undone = kubectl.ok(&["rollout", "undo", &deployment]).await;
    assert_eq!(undone.trim(), format!("deployment.apps/{web} rolled back"));
    rollout_done(&kubectl, &deployment).await;
    assert_eq!(stored_image(&client, web).await, "strait/netexec:v2");
    assert_eq!(revisions(&kubectl, &deployment).await, ["1", "3", "4"]);
    kubectl.ok(&["rollout", "undo", &deployment, "--to-revision=1"]).await;
    rollout_done(&kubectl, &deployment).await;
    assert_eq!(stored_image(&client, web).await, "strait/netexec:v1");
    assert_eq!(revisions(&kubectl, &deployment).await, ["3", "4", "5"]);

    // pause: a template change starts nothing, and undo is refused; resume rolls it out.
    kubectl.ok(&["rollout", "pause", &deployment]).await;
    kubectl.ok(&["set", "image", &deployment, &image("v4")]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(revisions(&kubectl, &deployment).await, ["3", "4", "5"], "no rollout while paused");
    let refused = kubectl.run(&["rollout", "undo", &deployment]).await;
    assert!(!refused.ok && refused.stderr.contains("paused"), "{}", refused.stderr);
    kubectl.ok(&["rollout", "resume", &deployment]).await;
    rollout_done(&kubectl, &deployment).await;
    assert_eq!(revisions(&kubectl, &deployment).await, ["3", "4", "5", "6"]);

    // restart: a new template (its restartedAt stamp), so new pods under revision 7.
    let (before, _) =
        client.list::<Pod>(Some("default"), &format!("labelSelector=app%3D{web}")).await.unwrap();
    kubectl.ok(&["rollout", "restart", &deployment]).await;
    rollout_done(&kubectl, &deployment).await;
    let (after, _) =
        client.list::<Pod>(Some("default"), &format!("labelSelector=app%3D{web}")).await.unwrap();
    let old: Vec<_> = before.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let live = after.iter().filter(|p| p.metadata.deletion_timestamp.is_none());
    assert!(live.clone().all(|p| !old.contains(p.metadata.name.as_ref().unwrap())));
    assert_eq!(live.count(), 3);
    assert_eq!(revisions(&kubectl, &deployment).await.last().map(String::as_str), Some("7"));
}

async fn rollout_done(kubectl: &Kubectl, deployment: &str) {
    let status = kubectl.ok(&["rollout", "status", deployment, "--timeout=30s"]).await;
    assert!(status.contains("successfully rolled out"), "{status}");
}

/// The revisions `kubectl rollout history` lists.
async fn revisions(kubectl: &Kubectl, deployment: &str) -> Vec<String> {
    let history = kubectl.ok(&["rollout", "history", deployment]).await;
    history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.parse::<u32>().is_ok())
        .map(str::to_owned)
        .collect()
}

async fn stored_image(client: &ApiClient, name: &str) -> String {
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        client.get(Some("default"), name).await.unwrap().unwrap();
    let spec = deployment.spec.unwrap().template.spec.unwrap();
    spec.containers[0].image.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_rolls_deployments() {
    kubectl_rolls_deployments("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_rolls_deployments() {
    kubectl_rolls_deployments("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_rolls_deployments() {
    kubectl_rolls_deployments("1.33").await;
}
