//! The write paths of the REST API as clients see them: the three patch types, optimistic
//! concurrency on every write, and errors that leave the stored object as it was.

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, namespace, node, pod},
};

const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const MERGE: &str = "application/merge-patch+json";

/// Sends a request and returns the status code and the JSON answer.
async fn request(
    client: &ApiClient,
    method: Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, Value) {
    let (code, bytes) = client
        .send(method, path, content_type, Some(body.as_bytes().to_vec()))
        .await
        .expect("the server answers");
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("{code}: the answer is not JSON: {e}: {}", String::from_utf8_lossy(&bytes))
    });
    (code, value)
}

const WEB: &str = "/api/v1/namespaces/default/pods/web";
const TEAM: &str = "/api/v1/namespaces/team";

fn two_container_pod() -> Pod {
    let mut pod = pod("web");
    let spec = pod.spec.as_mut().expect("the helper's pod has a spec");
    let mut sidecar = spec.containers[0].clone();
    sidecar.name = "log".to_owned();
    sidecar.image = Some("registry.example/log:1.0".to_owned());
    spec.containers.push(sidecar);
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategic_merge_patch_merges_containers_by_name() {
    let server = TestController::start("writes-smp").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &two_container_pod()).await.unwrap();

    let patch = json!({
        "metadata": {"labels": {"tier": "front"}},
        "spec": {"containers": [{"name": "log", "image": "registry.example/log:2.0"}]},
    });
    let patched: Pod = client.patch(Some("default"), "web", STRATEGIC, &patch).await.unwrap();
    let containers = &patched.spec.as_ref().unwrap().containers;
    let images: Vec<(&str, Option<&str>)> =
        containers.iter().map(|c| (c.name.as_str(), c.image.as_deref())).collect();
    assert_eq!(
        images,
        [("app", Some("registry.example/app:1.0")), ("log", Some("registry.example/log:2.0"))]
    );
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.spec, patched.spec, "the answer is what was stored");
    assert_eq!(
        stored.metadata.labels.as_ref().and_then(|l| l.get("tier")).map(String::as_str),
        Some("front")
    );

    // kubectl apply's shape: an order for the whole list, one element changed.
    let patch = json!({"spec": {
        "$setElementOrder/containers": [{"name": "app"}, {"name": "log"}],
        "containers": [{"name": "app", "image": "registry.example/app:1.1"}],
    }});
    let patched: Pod = client.patch(Some("default"), "web", STRATEGIC, &patch).await.unwrap();
    let names: Vec<&str> =
        patched.spec.as_ref().unwrap().containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "log"]);
    assert_eq!(
        patched.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("registry.example/app:1.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_is_a_strategic_merge_patch_of_the_node() {
    let server = TestController::start("writes-cordon").await;
    let client = server.client();
    client.create::<Node>(None, &node("n1", "172.20.0.2", true)).await.unwrap();
    let patched: Node = client
        .patch(None, "n1", STRATEGIC, &json!({"spec": {"unschedulable": true}}))
        .await
        .unwrap();
    assert_eq!(patched.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
    assert!(
        patched.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some(),
        "the rest of the spec is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_patch_applies_all_operations_or_none() {
    let server = TestController::start("writes-jsonpatch").await;
    let client = server.client();
    let created = client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();
    let patch = json!([
        {"op": "test", "path": "/spec/containers/0/name", "value": "app"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "registry.example/app:2.0"},
        {"op": "add", "path": "/metadata/annotations", "value": {"note": "patched"}},
    ]);
    let patched: Pod = client.patch(Some("default"), "web", JSON_PATCH, &patch).await.unwrap();
    assert_eq!(
        patched.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("registry.example/app:2.0")
    );
    assert_ne!(patched.metadata.resource_version, created.metadata.resource_version);

    // A failed test after a change: 422, and nothing of the patch is stored.
    let failing = json!([
        {"op": "replace", "path": "/spec/containers/0/image", "value": "registry.example/app:3.0"},
        {"op": "test", "path": "/metadata/annotations/note", "value": "something else"},
    ])
    .to_string();
    let (code, status) = request(&client, Method::PATCH, WEB, JSON_PATCH, &failing).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(status["reason"], "Invalid");
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.resource_version, patched.metadata.resource_version);
    assert_eq!(
        stored.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("registry.example/app:2.0")
    );

    let (code, status) =
        request(&client, Method::PATCH, WEB, JSON_PATCH, r#"[{"op":"jump","path":"/a"}]"#).await;
    assert_eq!((code, status["reason"].as_str()), (StatusCode::BAD_REQUEST, Some("BadRequest")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resource_version_is_a_conflict_on_every_write_path() {
    // A namespace: no controller writes it behind the test's back.
    let server = TestController::start("writes-stale").await;
    let client = server.client();
    let created = client.create::<Namespace>(None, &namespace("team")).await.unwrap();
    let stale = created.metadata.resource_version.clone().unwrap();
    client
        .patch::<Namespace>(None, "team", MERGE, &json!({"metadata": {"labels": {"a": "1"}}}))
        .await
        .unwrap();
    let current = client.get::<Namespace>(None, "team").await.unwrap().unwrap();

    let mut replaced = current.clone();
    replaced.metadata.resource_version = Some(stale.clone());
    let stale_patch = json!({"metadata": {"resourceVersion": stale, "labels": {"b": "2"}}});
    let cases = [
        ("PUT", Method::PUT, "application/json", serde_json::to_string(&replaced).unwrap()),
        ("merge patch", Method::PATCH, MERGE, stale_patch.to_string()),
        ("strategic merge patch", Method::PATCH, STRATEGIC, stale_patch.to_string()),
        (
            "JSON patch",
            Method::PATCH,
            JSON_PATCH,
            json!([{"op": "replace", "path": "/metadata/resourceVersion", "value": stale}])
                .to_string(),
        ),
    ];
    for (what, method, content_type, body) in cases {
        let (code, status) = request(&client, method, TEAM, content_type, &body).await;
        assert_eq!(code, StatusCode::CONFLICT, "{what}: {status}");
        assert_eq!(status["reason"], "Conflict", "{what}");
    }
    let after = client.get::<Namespace>(None, "team").await.unwrap().unwrap();
    assert_eq!(after, current, "no stale write changed the namespace");

    // The current resourceVersion is accepted.
    let fresh = current.metadata.resource_version.clone().unwrap();
    let patched: Namespace = client
        .patch(
            None,
            "team",
            STRATEGIC,
            &json!({"metadata": {"resourceVersion": fresh, "labels": {"b": "2"}}}),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.unwrap().get("b").map(String::as_str), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_patches_are_bad_requests_that_change_nothing() {
    let server = TestController::start("writes-badpatch").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &two_container_pod()).await.unwrap();
    let before = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    let cases = [
        ("not JSON", STRATEGIC, "{\"spec\":".to_owned()),
        (
            "a container without its name",
            STRATEGIC,
            json!({"spec": {"containers": [{"image": "x"}]}}).to_string(),
        ),
        ("an unknown directive", STRATEGIC, json!({"spec": {"$patch": "explode"}}).to_string()),
        ("a merge patch that is a list", MERGE, "[]".to_owned()),
        ("a JSON patch that is an object", JSON_PATCH, "{}".to_owned()),
    ];
    for (what, content_type, body) in cases {
        let (code, status) = request(&client, Method::PATCH, WEB, content_type, &body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{what}: {status}");
        assert_eq!(status["kind"], "Status", "{what}");
    }
    // A patch that would make the pod invalid is 422 with the field, and is not stored.
    let invalid = json!({"spec": {"containers": [{"name": "app", "image": ""}]}}).to_string();
    let (code, status) = request(&client, Method::PATCH, WEB, STRATEGIC, &invalid).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert!(
        status["details"]["causes"].as_array().is_some_and(|c| !c.is_empty()),
        "causes name the field: {status}"
    );
    let after = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!((after.metadata.labels, after.spec), (before.metadata.labels, before.spec));
}

const APPLY: &str = "application/apply-patch+yaml";
const WEB_SERVICE: &str = "/api/v1/namespaces/default/services/web";

fn service_config(ports: Value, labels: Value) -> String {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "labels": labels},
           "spec": {"selector": {"app": "web"}, "ports": ports}})
    .to_string()
}

/// The managers of an object and their operations, in order.
fn managers(object: &Value) -> Vec<(String, String)> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    (
                        e["manager"].as_str().unwrap_or_default().to_owned(),
                        e["operation"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn owned(manager: &str, operation: &str) -> (String, String) {
    (manager.to_owned(), operation.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_creates_tracks_owners_and_removes_dropped_fields() {
    let server = TestController::start("writes-apply").await;
    let client = server.client();
    let path =
        |manager: &str| format!("{WEB_SERVICE}?fieldManager={manager}&fieldValidation=Strict");

    let first = service_config(
        json!([{"name": "http", "port": 80, "targetPort": 8080}, {"name": "https", "port": 443}]),
        json!({"app": "web", "team": "net"}),
    );
    let (code, created) = request(&client, Method::PATCH, &path("alice"), APPLY, &first).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(managers(&created), [owned("alice", "Apply")]);
    let fields = &created["metadata"]["managedFields"][0]["fieldsV1"];
    assert!(
        fields["f:spec"]["f:ports"].get("k:{\"port\":443,\"protocol\":\"TCP\"}").is_some(),
        "ports are owned by port and protocol: {fields}"
    );
    assert!(created["spec"]["clusterIP"].is_string(), "defaults and allocation apply: {created}");

    // The same configuration again is no write.
    let (code, again) = request(&client, Method::PATCH, &path("alice"), APPLY, &first).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(again["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"]);

    // bob changes a port alice owns: 409 naming alice and the field; nothing is stored.
    let bob = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"ports": [{"port": 80, "targetPort": 9090}]}})
    .to_string();
    let (code, status) = request(&client, Method::PATCH, &path("bob"), APPLY, &bob).await;
    assert_eq!(code, StatusCode::CONFLICT, "{status}");
    assert_eq!(status["reason"], "Conflict");
    let cause = &status["details"]["causes"][0];
    assert_eq!(cause["type"], "FieldManagerConflict");
    assert_eq!(cause["field"], ".spec.ports[port=80,protocol=\"TCP\"].targetPort");
    assert!(cause["message"].as_str().unwrap().contains("\"alice\""), "{cause}");
    let stored = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(serde_json::to_value(&stored).unwrap()["spec"]["ports"][0]["targetPort"], 8080);

    // Forced, bob takes the field; alice keeps the rest.
    let forced = format!("{}&force=true", path("bob"));
    let (code, taken) = request(&client, Method::PATCH, &forced, APPLY, &bob).await;
    assert_eq!(code, StatusCode::OK, "{taken}");
    assert_eq!(taken["spec"]["ports"][0]["targetPort"], 9090);
    assert_eq!(managers(&taken), [owned("alice", "Apply"), owned("bob", "Apply")]);

    // alice drops the https port, the team label and targetPort (now bob's): the first two
    // go, bob's field stays.
    let second = service_config(json!([{"name": "http", "port": 80}]), json!({"app": "web"}));
    let (code, updated) = request(&client, Method::PATCH, &path("alice"), APPLY, &second).await;
    assert_eq!(code, StatusCode::OK, "{updated}");
    let stored = client.get::<Service>(Some("default"), "web").await.unwrap().unwrap();
    let ports = stored.spec.as_ref().unwrap().ports.clone().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].port, 80);
    assert_eq!(
        serde_json::to_value(&ports[0].target_port).unwrap(),
        json!(9090),
        "bob's field is kept"
    );
    let labels = stored.metadata.labels.unwrap();
    assert!(!labels.contains_key("team"), "{labels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_own_the_fields_they_change_and_apply_conflicts_with_them() {
    let server = TestController::start("writes-owners").await;
    let client = server.client();
    let body = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    .to_string();
    let (code, created) = request(
        &client,
        Method::POST,
        "/api/v1/namespaces/default/services?fieldManager=kubectl-create",
        "application/json",
        &body,
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(managers(&created), [owned("kubectl-create", "Update")]);

    // A merge patch by another manager takes the selector.
    let (code, patched) = request(
        &client,
        Method::PATCH,
        &format!("{WEB_SERVICE}?fieldManager=kubectl-edit"),
        MERGE,
        &json!({"spec": {"selector": {"app": "web2"}}}).to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{patched}");
    assert_eq!(
        managers(&patched),
        [owned("kubectl-create", "Update"), owned("kubectl-edit", "Update")]
    );
    let editor_fields = &patched["metadata"]["managedFields"][1]["fieldsV1"];
    assert_eq!(editor_fields, &json!({"f:spec": {"f:selector": {"f:app": {}}}}));
    let creator_fields = &patched["metadata"]["managedFields"][0]["fieldsV1"];
    assert!(creator_fields["f:spec"].get("f:selector").is_none(), "{creator_fields}");

    // An apply changing the creator's port conflicts with kubectl-create.
    let apply = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"ports": [{"port": 80, "targetPort": 81}]}})
    .to_string();
    let (code, status) =
        request(&client, Method::PATCH, &format!("{WEB_SERVICE}?fieldManager=ops"), APPLY, &apply)
            .await;
    assert_eq!(code, StatusCode::CONFLICT, "{status}");
    assert!(status["message"].as_str().unwrap().contains("kubectl-create"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_requests_are_checked_before_anything_is_stored() {
    let server = TestController::start("writes-apply-bad").await;
    let client = server.client();
    let good = service_config(json!([{"port": 80}]), json!({"app": "web"}));
    let cases = [
        ("no field manager", WEB_SERVICE.to_owned(), good.clone()),
        (
            "another kind",
            format!("{WEB_SERVICE}?fieldManager=a"),
            good.replace("\"Service\"", "\"Pod\""),
        ),
        (
            "another name",
            format!("{WEB_SERVICE}?fieldManager=a"),
            good.replace("\"web\"", "\"db\""),
        ),
        ("malformed YAML", format!("{WEB_SERVICE}?fieldManager=a"), "kind: [unclosed".to_owned()),
        (
            "an unknown field under Strict",
            format!("{WEB_SERVICE}?fieldManager=a&fieldValidation=Strict"),
            good.replace("\"selector\"", "\"colour\":1,\"selector\""),
        ),
    ];
    for (what, path, body) in cases {
        let (code, status) = request(&client, Method::PATCH, &path, APPLY, &body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{what}: {status}");
        assert!(client.get::<Service>(Some("default"), "web").await.unwrap().is_none(), "{what}");
    }

    // YAML is accepted as well as JSON.
    let yaml =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n";
    let (code, created) =
        request(&client, Method::PATCH, &format!("{WEB_SERVICE}?fieldManager=a"), APPLY, yaml)
            .await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["spec"]["ports"][0]["port"], 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_validation_refuses_or_drops_unknown_and_duplicate_fields() {
    let server = TestController::start("writes-validation").await;
    let client = server.client();
    let services = "/api/v1/namespaces/default/services";
    let unknown = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80,"colour":"red"}]}}"#;
    let duplicate = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"b","name":"c"},"spec":{"ports":[{"port":80}]}}"#;
    for (what, body, needle) in [
        ("unknown", unknown, "unknown field \"spec.ports[0].colour\""),
        ("duplicate", duplicate, "duplicate field \"metadata.name\""),
    ] {
        let path = format!("{services}?fieldValidation=Strict");
        let (code, status) = request(&client, Method::POST, &path, "application/json", body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{what}: {status}");
        assert!(status["message"].as_str().unwrap().contains(needle), "{what}: {status}");
    }
    for name in ["a", "b", "c"] {
        assert!(client.get::<Service>(Some("default"), name).await.unwrap().is_none(), "{name}");
    }

    // Ignore (and Warn) drop the unknown field and keep the last duplicate.
    let path = format!("{services}?fieldValidation=Ignore");
    let (code, created) = request(&client, Method::POST, &path, "application/json", unknown).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert!(created["spec"]["ports"][0].get("colour").is_none());
    let (code, created) =
        request(&client, Method::POST, services, "application/json", duplicate).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["metadata"]["name"], "c");

    // A patch whose result has an unknown field, under Strict: 400, nothing stored.
    let path = "/api/v1/namespaces/default/services/a?fieldValidation=Strict";
    let patch = json!({"spec": {"flavour": 1}}).to_string();
    let (code, status) = request(&client, Method::PATCH, path, STRATEGIC, &patch).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{status}");
    assert!(status["message"].as_str().unwrap().contains("spec.flavour"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_validates_and_answers_without_storing() {
    let server = TestController::start("writes-dryrun").await;
    let client = server.client();
    let pods = "/api/v1/namespaces/default/pods";
    let body = serde_json::to_string(&pod("web")).unwrap();
    let revision = || async {
        client
            .send(Method::GET, "/api/v1/pods", "", None)
            .await
            .map(|(_, b)| {
                serde_json::from_slice::<Value>(&b).unwrap()["metadata"]["resourceVersion"].clone()
            })
            .unwrap()
    };
    let before = revision().await;

    let (code, would_be) =
        request(&client, Method::POST, &format!("{pods}?dryRun=All"), "application/json", &body)
            .await;
    assert_eq!(code, StatusCode::CREATED, "{would_be}");
    assert_eq!(would_be["metadata"]["name"], "web");
    assert!(would_be["metadata"]["uid"].is_string(), "the would-be object has its server fields");
    assert_eq!(would_be["spec"]["restartPolicy"], "Always", "and its defaults");
    assert!(client.get::<Pod>(Some("default"), "web").await.unwrap().is_none(), "nothing stored");
    assert_eq!(revision().await, before, "the store did not move");

    // An invalid object is still refused in a dry run.
    let invalid = body.replace("registry.example/app:1.0", "");
    let (code, _) =
        request(&client, Method::POST, &format!("{pods}?dryRun=All"), "application/json", &invalid)
            .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);

    client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    let labels = json!({"metadata": {"labels": {"dry": "run"}}}).to_string();
    for (what, method, content_type, body) in [
        ("merge patch", Method::PATCH, MERGE, labels.clone()),
        ("strategic merge patch", Method::PATCH, STRATEGIC, labels.clone()),
        ("JSON patch", Method::PATCH, JSON_PATCH, json!([{"op": "add", "path": "/metadata/labels", "value": {"dry": "run"}}]).to_string()),
        ("apply", Method::PATCH, "application/apply-patch+yaml", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"dry": "run"}}}).to_string()),
        ("PUT", Method::PUT, "application/json", {
            let mut changed = stored.clone();
            changed.metadata.labels = Some([("dry".to_owned(), "run".to_owned())].into());
            // Unconditional: the scheduler may write the pod's status meanwhile.
            changed.metadata.resource_version = None;
            serde_json::to_string(&changed).unwrap()
        }),
    ] {
        let path = format!("{WEB}?dryRun=All&fieldManager=tester");
        let (code, answer) = request(&client, method, &path, content_type, &body).await;
        assert_eq!(code, StatusCode::OK, "{what}: {answer}");
        assert_eq!(answer["metadata"]["labels"]["dry"], "run", "{what}: the would-be object");
        let after = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
        assert_eq!(after.metadata.labels, stored.metadata.labels, "{what}: nothing stored");
    }
    let (code, _) =
        request(&client, Method::DELETE, &format!("{WEB}?dryRun=All"), "application/json", "")
            .await;
    assert_eq!(code, StatusCode::OK);
    assert!(client.get::<Pod>(Some("default"), "web").await.unwrap().is_some(), "not deleted");
    let (code, status) =
        request(&client, Method::DELETE, &format!("{WEB}?dryRun=Some"), "application/json", "")
            .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{status}");
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: strait_controlplane::testing::meta(name),
        data: Some([("n".to_owned(), name.to_owned())].into()),
        ..ConfigMap::default()
    }
}

async fn page(client: &ApiClient, query: &str) -> (StatusCode, Value) {
    let path = format!("/api/v1/namespaces/default/configmaps?{query}");
    let (code, bytes) =
        client.send(Method::GET, &path, "", None).await.expect("the server answers");
    (code, serde_json::from_slice(&bytes).expect("JSON"))
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_the_list_as_it_was_at_its_first_page() {
    let server = TestController::start("writes-pages").await;
    pages_at_the_first_page_revision(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_etcd_show_the_list_as_it_was_at_its_first_page() {
    let etcd = strait_controlplane::testing::LocalEtcd::start("writes-pages")
        .await
        .unwrap_or_else(|error| panic!("starting etcd: {error}"));
    let server = TestController::start_with("writes-pages-etcd", |config| {
        config.store = etcd.location("/strait/pages");
    })
    .await;
    pages_at_the_first_page_revision(&server).await;
}

async fn pages_at_the_first_page_revision(server: &TestController) {
    let client = server.client();
    let mut created = std::collections::BTreeMap::new();
    for name in ["cm-1", "cm-2", "cm-3", "cm-4", "cm-5"] {
        let object = client.create::<ConfigMap>(Some("default"), &config_map(name)).await.unwrap();
        created.insert(name, object);
    }

    let (code, first) = page(&client, "limit=2").await;
    assert_eq!(code, StatusCode::OK, "{first}");
    assert_eq!(names(&first), ["cm-1", "cm-2"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let token = first["metadata"]["continue"].as_str().expect("a continue token").to_owned();
    let revision = first["metadata"]["resourceVersion"].clone();

    // Changes after the first page: deleted, changed and new objects.
    client.delete::<ConfigMap>(Some("default"), "cm-3", None).await.unwrap();
    client
        .merge_patch::<ConfigMap>(
            Some("default"),
            "cm-4",
            &json!({"data": {"n": "changed"}}),
            false,
        )
        .await
        .unwrap();
    client.create::<ConfigMap>(Some("default"), &config_map("cm-2a")).await.unwrap();

    let (code, second) = page(&client, &format!("limit=2&continue={token}")).await;
    assert_eq!(code, StatusCode::OK, "{second}");
    assert_eq!(names(&second), ["cm-3", "cm-4"], "the list as it was, not as it is");
    assert_eq!(second["metadata"]["resourceVersion"], revision);
    assert_eq!(second["items"][1]["data"]["n"], "cm-4", "the value it had then");
    for (index, name) in [(0, "cm-3"), (1, "cm-4")] {
        assert_eq!(
            second["items"][index]["metadata"]["resourceVersion"].as_str(),
            created[name].metadata.resource_version.as_deref(),
            "{name} has the resourceVersion it had then"
        );
    }
    let token = second["metadata"]["continue"].as_str().expect("a third page").to_owned();
    let (code, third) = page(&client, &format!("limit=2&continue={token}")).await;
    assert_eq!(code, StatusCode::OK, "{third}");
    assert_eq!(names(&third), ["cm-5"]);
    assert!(third["metadata"].get("continue").is_none(), "{third}");

    // Without a limit, everything now.
    let (_, all) = page(&client, "").await;
    assert_eq!(names(&all), ["cm-1", "cm-2", "cm-2a", "cm-4", "cm-5"]);
    // A selector pages over what passes it.
    let (_, selected) = page(&client, "limit=1&fieldSelector=metadata.name%3Dcm-5").await;
    assert_eq!(names(&selected), ["cm-5"]);
    assert!(selected["metadata"].get("continue").is_none());

    let (code, status) = page(&client, "limit=2&continue=garbage").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continue_token_expires_with_the_history_it_needs() {
    let server =
        TestController::start_with("writes-pages-expired", |config| config.history_revisions = 5)
            .await;
    let client = server.client();
    for name in ["cm-1", "cm-2", "cm-3"] {
        client.create::<ConfigMap>(Some("default"), &config_map(name)).await.unwrap();
    }
    let (_, first) = page(&client, "limit=1").await;
    let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    for i in 0..10 {
        client
            .merge_patch::<ConfigMap>(
                Some("default"),
                "cm-2",
                &json!({"data": {"i": i.to_string()}}),
                false,
            )
            .await
            .unwrap();
    }
    let (code, status) = page(&client, &format!("limit=1&continue={token}")).await;
    assert_eq!(code, StatusCode::GONE, "{status}");
    assert_eq!(status["reason"], "Expired");
}
