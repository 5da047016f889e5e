//! kubectl's write commands (1.27, 1.31 and 1.33, unmodified) against a controller on
//! loopback, each checked by reading back what the server stored.

mod support;

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{ConfigMap, Namespace, Node, Pod, ResourceQuota, Service},
};
use strait_controlplane::testing::{TestController, node, pod};
use support::{kubectl::Kubectl, recorder::Recorder};

/// One test per kubectl version for each scenario.
macro_rules! for_each_kubectl {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_27() {
                super::$scenario("1.27").await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_31() {
                super::$scenario("1.31").await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_33() {
                super::$scenario("1.33").await;
            }
        }
    };
}

fn image_of(pod: &Pod, container: &str) -> Option<String> {
    pod.spec.as_ref()?.containers.iter().find(|c| c.name == container)?.image.clone()
}

async fn patch_of_each_type_and_label_annotate_cordon(version: &str) {
    let server = TestController::start(&format!("kubectl-patch-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();

    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "strategic",
            "-p",
            r#"{"spec":{"containers":[{"name":"app","image":"registry.example/app:2.0"}]}}"#,
        ])
        .await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "app").as_deref(), Some("registry.example/app:2.0"));

    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"labels":{"a":"1"}}}"#,
        ])
        .await;
    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/metadata/labels/a","value":"1"},{"op":"replace","path":"/spec/containers/0/image","value":"registry.example/app:3.0"}]"#,
        ])
        .await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "app").as_deref(), Some("registry.example/app:3.0"));
    assert_eq!(
        stored.metadata.labels.as_ref().and_then(|l| l.get("a")).map(String::as_str),
        Some("1")
    );

    // A failing JSON patch test: kubectl reports it and the pod is unchanged.
    let stderr = kubectl
        .fails(&[
            "patch",
            "pod",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/containers/0/image","value":"x:4"},{"op":"test","path":"/metadata/labels/a","value":"2"}]"#,
        ])
        .await;
    assert!(stderr.contains("test failed"), "{stderr}");
    let unchanged = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(unchanged.spec, stored.spec);

    kubectl.ok(&["label", "pod", "web", "tier=front", "a-"]).await;
    kubectl.ok(&["annotate", "pod", "web", "note=hello"]).await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    let labels = stored.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("tier").map(String::as_str), Some("front"));
    assert!(!labels.contains_key("a"), "a- removed the label: {labels:?}");
    assert_eq!(
        stored.metadata.annotations.as_ref().and_then(|a| a.get("note")).map(String::as_str),
        Some("hello")
    );
    // Without --overwrite an existing label is refused by kubectl itself.
    kubectl.fails(&["label", "pod", "web", "tier=back"]).await;
    kubectl.ok(&["label", "pod", "web", "tier=back", "--overwrite"]).await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.labels.unwrap().get("tier").map(String::as_str), Some("back"));

    client.create::<Node>(None, &node("n1", "172.20.0.2", true)).await.unwrap();
    kubectl.ok(&["cordon", "n1"]).await;
    let cordoned = client.get::<Node>(None, "n1").await.unwrap().unwrap();
    assert_eq!(cordoned.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
    kubectl.ok(&["uncordon", "n1"]).await;
    let uncordoned = client.get::<Node>(None, "n1").await.unwrap().unwrap();
    assert_ne!(uncordoned.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
}
for_each_kubectl!(patch_of_each_type_and_label_annotate_cordon);

const SERVICE_V1: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    app: web
    stage: test
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

const SERVICE_V2: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    app: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: metrics
    port: 9100
";

const REPLICA_SET: &str = "\
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: api
spec:
  replicas: 0
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
        image: registry.example/api:IMAGE
        env:
        - name: MODE
          value: MODE_VALUE
      - name: sidecar
        image: registry.example/sidecar:1.0
";

fn write(kubectl: &Kubectl, file: &str, content: &str) -> String {
    let path = kubectl.dir().join(file);
    std::fs::write(&path, content).expect("writing a manifest");
    path.to_string_lossy().into_owned()
}

fn managers(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Vec<(String, String)> {
    meta.managed_fields
        .iter()
        .flatten()
        .map(|e| (e.manager.clone().unwrap_or_default(), e.operation.clone().unwrap_or_default()))
        .collect()
}

async fn client_side_apply_creates_then_patches_three_ways(version: &str) {
    let server = TestController::start(&format!("kubectl-csa-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    let manifest = write(&kubectl, "svc.yaml", SERVICE_V1);
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let created = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let annotations = created.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"),
        "{annotations:?}"
    );
    assert!(
        managers(&created.metadata)
            .contains(&("kubectl-client-side-apply".to_owned(), "Update".to_owned()))
    );

    // The second apply is a strategic merge patch: the dropped label goes, the port is added.
    let manifest = write(&kubectl, "svc.yaml", SERVICE_V2);
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let updated = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let labels = updated.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key("stage"), "{labels:?}");
    let ports: Vec<i32> =
        updated.spec.as_ref().unwrap().ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [80, 9100]);
    assert_eq!(
        updated.spec.as_ref().unwrap().cluster_ip,
        created.spec.as_ref().unwrap().cluster_ip
    );

    // An unchanged apply changes nothing.
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let again = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(again.metadata.resource_version, updated.metadata.resource_version);

    // apps/v1: the template's containers merge by name, in the manifest's order.
    let replica_set =
        |image: &str, mode: &str| REPLICA_SET.replace("IMAGE", image).replace("MODE_VALUE", mode);
    let manifest = write(&kubectl, "rs.yaml", &replica_set("1.0", "a"));
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let manifest = write(&kubectl, "rs.yaml", &replica_set("2.0", "b"));
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let stored = client.get::<ReplicaSet>(Some("default"), "api").await.unwrap().unwrap();
    let template = stored.spec.unwrap().template.unwrap().spec.unwrap();
    let containers: Vec<(String, Option<String>)> =
        template.containers.iter().map(|c| (c.name.clone(), c.image.clone())).collect();
    assert_eq!(
        containers,
        [
            ("api".to_owned(), Some("registry.example/api:2.0".to_owned())),
            ("sidecar".to_owned(), Some("registry.example/sidecar:1.0".to_owned())),
        ]
    );
    let env = template.containers[0].env.clone().unwrap();
    assert_eq!((env.len(), env[0].value.as_deref()), (1, Some("b")));
}
for_each_kubectl!(client_side_apply_creates_then_patches_three_ways);

async fn server_side_apply_owns_conflicts_and_forces(version: &str) {
    let server = TestController::start(&format!("kubectl-ssa-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    let manifest = write(&kubectl, "svc.yaml", SERVICE_V2);
    kubectl.ok(&["apply", "--server-side", "-f", &manifest]).await;
    let created = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(managers(&created.metadata), [("kubectl".to_owned(), "Apply".to_owned())]);

    // Another manager changing kubectl's port: a conflict kubectl reports, nothing stored.
    let theirs = write(
        &kubectl,
        "theirs.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: 9090\n",
    );
    let stderr =
        kubectl.fails(&["apply", "--server-side", "--field-manager=ops", "-f", &theirs]).await;
    assert!(stderr.contains("conflict"), "{stderr}");
    assert!(stderr.contains(".spec.ports[port=80,protocol=\"TCP\"].targetPort"), "{stderr}");
    let unchanged = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(unchanged.metadata.resource_version, created.metadata.resource_version);

    kubectl
        .ok(&["apply", "--server-side", "--field-manager=ops", "--force-conflicts", "-f", &theirs])
        .await;
    let forced = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let target = forced.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].target_port.clone();
    assert_eq!(serde_json::to_value(target).unwrap(), 9090);
    assert_eq!(
        managers(&forced.metadata),
        [("kubectl".to_owned(), "Apply".to_owned()), ("ops".to_owned(), "Apply".to_owned())]
    );

    // kubectl drops the metrics port, which only it owned: it goes. (It leaves out the
    // target port too, which ops owns now: re-applying its old value would conflict.)
    let manifest = write(&kubectl, "svc.yaml", &SERVICE_V1.replace("    targetPort: 8080\n", ""));
    kubectl.ok(&["apply", "--server-side", "-f", &manifest]).await;
    let trimmed = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let ports: Vec<i32> =
        trimmed.spec.as_ref().unwrap().ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [80]);
    let target = trimmed.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].target_port.clone();
    assert_eq!(serde_json::to_value(target).unwrap(), 9090, "ops's field stays");
    assert_eq!(trimmed.metadata.labels.unwrap().get("stage").map(String::as_str), Some("test"));

    // An object made by client-side apply moves to server-side apply without conflicts.
    let replica_set = REPLICA_SET.replace("IMAGE", "1.0").replace("MODE_VALUE", "a");
    let manifest = write(&kubectl, "rs.yaml", &replica_set);
    kubectl.ok(&["apply", "-f", &manifest]).await;
    let manifest = write(&kubectl, "rs.yaml", &replica_set.replace("api:1.0", "api:3.0"));
    kubectl.ok(&["apply", "--server-side", "-f", &manifest]).await;
    let stored = client.get::<ReplicaSet>(Some("default"), "api").await.unwrap().unwrap();
    let image = stored.spec.unwrap().template.unwrap().spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.example/api:3.0"));

    // Server-side dry run stores nothing.
    let manifest = write(&kubectl, "rs.yaml", &replica_set.replace("api:1.0", "api:4.0"));
    kubectl.ok(&["apply", "--server-side", "--dry-run=server", "-f", &manifest]).await;
    let after = client.get::<ReplicaSet>(Some("default"), "api").await.unwrap().unwrap();
    let image = after.spec.unwrap().template.unwrap().spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.example/api:3.0"));
}
for_each_kubectl!(server_side_apply_owns_conflicts_and_forces);

/// The kubectl versions that send protobuf bodies for `create <generator>`.
fn sends_protobuf(version: &str) -> bool {
    version >= "1.32"
}

async fn create_generators_store_what_they_describe(version: &str) {
    let server = TestController::start(&format!("kubectl-create-{version}")).await;
    let client = server.client();
    let recorder = Recorder::start(client.clone()).await;
    let kubectl = Kubectl::through(version, &server, recorder.url());

    kubectl.ok(&["create", "namespace", "team"]).await;
    kubectl
        .ok(&[
            "create",
            "deployment",
            "web",
            "-n",
            "team",
            "--image=registry.example/web:1.0",
            "--replicas=2",
            "--port=8080",
        ])
        .await;
    kubectl.ok(&["create", "service", "clusterip", "web", "-n", "team", "--tcp=80:8080"]).await;
    let binary = kubectl.dir().join("blob.bin");
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    let from_file = format!("--from-file=blob={}", binary.display());
    kubectl
        .ok(&[
            "create",
            "configmap",
            "settings",
            "-n",
            "team",
            "--from-literal=mode=fast",
            &from_file,
        ])
        .await;
    kubectl.ok(&["create", "quota", "limits", "-n", "team", "--hard=pods=10,cpu=2"]).await;

    let namespace = client.get::<Namespace>(None, "team").await.unwrap().expect("namespace");
    assert_eq!(managers(&namespace.metadata), [("kubectl-create".to_owned(), "Update".to_owned())]);

    let deployment =
        client.get::<Deployment>(Some("team"), "web").await.unwrap().expect("deployment");
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.selector.match_labels.unwrap().get("app").map(String::as_str), Some("web"));
    let container = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        (container.name.as_str(), container.image.as_deref()),
        ("web", Some("registry.example/web:1.0"))
    );
    assert_eq!(container.ports.as_ref().unwrap()[0].container_port, 8080);

    let service = client.get::<Service>(Some("team"), "web").await.unwrap().expect("service");
    let service_spec = service.spec.unwrap();
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("80-8080"), 80));
    assert_eq!(serde_json::to_value(&port.target_port).unwrap(), 8080);
    assert_eq!(service_spec.selector.unwrap().get("app").map(String::as_str), Some("web"));
    assert_eq!(service_spec.type_.as_deref(), Some("ClusterIP"));

    let settings =
        client.get::<ConfigMap>(Some("team"), "settings").await.unwrap().expect("configmap");
    assert_eq!(settings.data.unwrap().get("mode").map(String::as_str), Some("fast"));
    assert_eq!(
        settings.binary_data.unwrap().get("blob").map(|b| b.0.clone()),
        Some(vec![0, 159, 146, 150, 255])
    );

    let quota = client.get::<ResourceQuota>(Some("team"), "limits").await.unwrap().expect("quota");
    let hard = quota.spec.unwrap().hard.unwrap();
    assert_eq!((hard["pods"].0.as_str(), hard["cpu"].0.as_str()), ("10", "2"));

    // The bodies were what this version sends: protobuf from 1.32 on, JSON before.
    let creates: Vec<_> = recorder.requests().into_iter().filter(|r| r.method == "POST").collect();
    assert_eq!(creates.len(), 5, "{creates:?}");
    let expected = if sends_protobuf(version) {
        "application/vnd.kubernetes.protobuf"
    } else {
        "application/json"
    };
    for request in &creates {
        assert_eq!(request.content_type, expected, "{request:?}");
        // How the fixtures of the protobuf unit tests (src/api/testdata) were recorded:
        // `CAPTURE_DIR=<dir> cargo test --test kubectl_writes create_generators`.
        if let Ok(dir) = std::env::var("CAPTURE_DIR") {
            let name = request.path.split('?').next().unwrap().rsplit('/').next().unwrap();
            std::fs::write(format!("{dir}/{name}-{version}.pb"), &request.body).unwrap();
        }
    }
}
for_each_kubectl!(create_generators_store_what_they_describe);

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
";

async fn create_file_replace_and_edit(version: &str) {
    let server = TestController::start(&format!("kubectl-edit-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    let manifest = write(&kubectl, "pod.yaml", POD_YAML);
    let created = kubectl.ok(&["create", "-f", &manifest]).await;
    assert_eq!(created.trim(), "pod/web created");
    let stderr = kubectl.fails(&["create", "-f", &manifest]).await;
    assert!(stderr.contains("AlreadyExists") && stderr.contains("already exists"), "{stderr}");
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert!(
        managers(&stored.metadata).contains(&("kubectl-create".to_owned(), "Update".to_owned()))
    );

    // edit: the editor changes the image; kubectl sends the difference as a patch.
    let editor = write(
        &kubectl,
        "editor.sh",
        "#!/bin/sh\nsed -i 's#registry.example/web:1.0#registry.example/web:2.0#' \"$1\"\n",
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut command = kubectl.command(&["edit", "pod", "web"]);
    command.env("EDITOR", &editor);
    let edited = kubectl.output(command, "edit pod web").await;
    assert!(edited.ok, "kubectl edit failed: {}\n{}", edited.stdout, edited.stderr);
    assert_eq!(edited.stdout.trim(), "pod/web edited");
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "web").as_deref(), Some("registry.example/web:2.0"));
    assert!(managers(&stored.metadata).contains(&("kubectl-edit".to_owned(), "Update".to_owned())));

    // replace: the object as read, changed, sent whole (with its resourceVersion).
    let current = kubectl.ok(&["get", "pod", "web", "-o", "yaml"]).await;
    let changed = current.replace("registry.example/web:2.0", "registry.example/web:3.0");
    let manifest = write(&kubectl, "replace.yaml", &changed);
    let replaced = kubectl.ok(&["replace", "-f", &manifest]).await;
    assert_eq!(replaced.trim(), "pod/web replaced");
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "web").as_deref(), Some("registry.example/web:3.0"));
    // The same file again carries a stale resourceVersion: 409, nothing changes.
    let stale = write(&kubectl, "stale.yaml", &changed.replace("web:3.0", "web:4.0"));
    let stderr = kubectl.fails(&["replace", "-f", &stale]).await;
    assert!(stderr.contains("Conflict") || stderr.contains("modified"), "{stderr}");
    let after = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&after, "web").as_deref(), Some("registry.example/web:3.0"));
}
for_each_kubectl!(create_file_replace_and_edit);

async fn rollout_restart_and_undo(version: &str) {
    let server = TestController::start(&format!("kubectl-rollout-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);

    kubectl.ok(&["create", "deployment", "web", "--image=registry.example/web:1.0"]).await;
    kubectl.ok(&["set", "image", "deployment/web", "web=registry.example/web:2.0"]).await;
    let deployment = client.get::<Deployment>(Some("default"), "web").await.unwrap().unwrap();
    let image = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .image
        .clone();
    assert_eq!(
        image.as_deref(),
        Some("registry.example/web:2.0"),
        "set image patched the template"
    );

    // The test plays the deployment controller: one replica set per revision, owned by the
    // deployment and annotated with its revision, which is what `rollout undo` reads.
    let uid = deployment.metadata.uid.clone().unwrap();
    for (revision, tag) in [("1", "1.0"), ("2", "2.0")] {
        let set: ReplicaSet = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("web-{revision}"),
                "labels": {"app": "web", "pod-template-hash": revision},
                "annotations": {"deployment.kubernetes.io/revision": revision},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                                     "uid": uid, "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "web", "pod-template-hash": revision}},
                "template": {
                    "metadata": {"labels": {"app": "web", "pod-template-hash": revision}},
                    "spec": {"containers": [{"name": "web", "image": format!("registry.example/web:{tag}")}]},
                },
            },
        }))
        .unwrap();
        client.create::<ReplicaSet>(Some("default"), &set).await.unwrap();
    }

    kubectl.ok(&["rollout", "restart", "deployment/web"]).await;
    let restarted = client.get::<Deployment>(Some("default"), "web").await.unwrap().unwrap();
    let annotations =
        restarted.spec.unwrap().template.metadata.unwrap().annotations.unwrap_or_default();
    assert!(annotations.contains_key("kubectl.kubernetes.io/restartedAt"), "{annotations:?}");

    // undo: the template of revision 1, sent as a JSON patch.
    let undone = kubectl.ok(&["rollout", "undo", "deployment/web", "--to-revision=1"]).await;
    assert!(undone.contains("rolled back"), "{undone}");
    let stored = client.get::<Deployment>(Some("default"), "web").await.unwrap().unwrap();
    let template = stored.spec.unwrap().template;
    assert_eq!(
        template.spec.unwrap().containers[0].image.as_deref(),
        Some("registry.example/web:1.0")
    );
    let labels = template.metadata.unwrap().labels.unwrap_or_default();
    assert!(!labels.contains_key("pod-template-hash"), "{labels:?}");
}
for_each_kubectl!(rollout_restart_and_undo);
