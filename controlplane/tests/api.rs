//! The REST API as clients see it: a real controller on loopback, driven with `ApiClient`.

use std::time::Duration;

use futures::StreamExt;
use http::{Method, StatusCode};
use k8s_openapi::{
    api::core::v1::{Namespace, Node, Pod},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{Status, WatchEvent},
    },
};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{TestController, eventually, namespace, node, pod, pod_on},
};

async fn status_of(
    client: &ApiClient,
    method: Method,
    path: &str,
    ct: &str,
    body: &str,
) -> (StatusCode, Status) {
    let (code, bytes) = client
        .send(method, path, ct, Some(body.as_bytes().to_vec()))
        .await
        .expect("the server answers");
    let status: Status = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("{code}: expected a Status object, got {}: {e}", String::from_utf8_lossy(&bytes))
    });
    (code, status)
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_pod_gets_server_fields_and_defaults() {
    let server = TestController::start("api-create").await;
    let client = server.client();
    let created: Pod = client.create(Some("default"), &pod("web")).await.unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36), "uid: {:?}", meta.uid);
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let revision: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    assert!(revision > 1);

    let spec = created.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(spec.scheduler_name.as_deref(), Some("default-scheduler"));
    assert_eq!(spec.enable_service_links, Some(true));
    let container = &spec.containers[0];
    assert_eq!(container.termination_message_path.as_deref(), Some("/dev/termination-log"));
    assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let status = created.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));

    let fetched: Pod = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);
    let (pods, list_revision) = client.list::<Pod>(Some("default"), "").await.unwrap();
    assert_eq!(pods.len(), 1);
    assert!(list_revision.parse::<u64>().unwrap() >= revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_name_gets_a_random_suffix() {
    let server = TestController::start("api-generate").await;
    let client = server.client();
    let mut template = pod("");
    template.metadata.name = None;
    template.metadata.generate_name = Some("web-".to_owned());
    let first: Pod = client.create(Some("default"), &template).await.unwrap();
    let second: Pod = client.create(Some("default"), &template).await.unwrap();
    let (a, b) = (first.metadata.name.unwrap(), second.metadata.name.unwrap());
    assert!(a.starts_with("web-") && a.len() == "web-".len() + 5, "{a}");
    assert_ne!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_twice_is_already_exists_and_unknown_names_are_not_found() {
    let server = TestController::start("api-exists").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();
    let again = client.create::<Pod>(Some("default"), &pod("web")).await.unwrap_err();
    assert_eq!((again.code(), again.reason()), (Some(409), Some("AlreadyExists")));
    assert!(client.get::<Pod>(Some("default"), "nope").await.unwrap().is_none());
    assert!(!client.delete::<Pod>(Some("default"), "nope", None).await.unwrap());
    let (code, status) =
        status_of(&client, Method::GET, "/api/v1/namespaces/default/pods/nope", "", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(status.reason.as_deref(), Some("NotFound"));
    assert_eq!(status.message.as_deref(), Some("pods \"nope\" not found"));

    let elsewhere = client.create::<Pod>(Some("missing"), &pod("web")).await.unwrap_err();
    assert_eq!(elsewhere.code(), Some(404));
    assert!(elsewhere.to_string().contains("namespaces \"missing\" not found"), "{elsewhere}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_resource_version_update_is_a_conflict() {
    let server = TestController::start("api-conflict").await;
    let client = server.client();
    // Assigned at creation, so that no scheduler write races the test's writes.
    let created: Pod = client.create(Some("default"), &pod_on("web", "node-1")).await.unwrap();
    let mut first = created.clone();
    first.metadata.labels = Some([("v".to_owned(), "1".to_owned())].into());
    let updated: Pod = client.replace(Some("default"), "web", &first).await.unwrap();
    assert_ne!(updated.metadata.resource_version, created.metadata.resource_version);

    let mut stale = created.clone();
    stale.metadata.labels = Some([("v".to_owned(), "2".to_owned())].into());
    let error = client.replace::<Pod>(Some("default"), "web", &stale).await.unwrap_err();
    assert_eq!((error.code(), error.reason()), (Some(409), Some("Conflict")));
    let stored: Pod = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.labels.unwrap()["v"], "1", "the conflicting write changed nothing");

    // Without a resourceVersion the write is unconditional.
    let mut blind = created;
    blind.metadata.resource_version = None;
    blind.metadata.labels = Some([("v".to_owned(), "3".to_owned())].into());
    let written: Pod = client.replace(Some("default"), "web", &blind).await.unwrap();
    assert_eq!(written.metadata.labels.unwrap()["v"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_spec_is_immutable_except_images() {
    let server = TestController::start("api-immutable").await;
    let client = server.client();
    let created: Pod = client.create(Some("default"), &pod_on("web", "node-1")).await.unwrap();

    let mut new_image = created.clone();
    new_image.spec.as_mut().unwrap().containers[0].image =
        Some("registry.example/app:2.0".to_owned());
    let updated: Pod = client.replace(Some("default"), "web", &new_image).await.unwrap();
    assert_eq!(
        updated.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("registry.example/app:2.0")
    );
    assert_eq!(updated.metadata.generation, Some(2), "a spec change counts a generation");

    let mut renamed = updated.clone();
    renamed.spec.as_mut().unwrap().containers[0].name = "other".to_owned();
    let body = serde_json::to_string(&renamed).unwrap();
    let (code, status) = status_of(
        &client,
        Method::PUT,
        "/api/v1/namespaces/default/pods/web",
        "application/json",
        &body,
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let causes = status.details.unwrap().causes.unwrap();
    assert_eq!(causes[0].field.as_deref(), Some("spec"));

    let mut bound = updated;
    bound.spec.as_mut().unwrap().node_name = Some("node-2".to_owned());
    let error = client.replace::<Pod>(Some("default"), "web", &bound).await.unwrap_err();
    assert_eq!(error.code(), Some(422), "a pod never moves to another node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_422_with_the_field_path() {
    let server = TestController::start("api-invalid").await;
    let client = server.client();
    let body = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "labels": {"bad key!": "x"}},
        "spec": {"containers": [
            {"name": "app", "image": "a", "ports": [{"containerPort": 70000}]},
            {"name": "app", "image": " "}
        ]}
    })
    .to_string();
    let (code, status) = status_of(
        &client,
        Method::POST,
        "/api/v1/namespaces/default/pods",
        "application/json",
        &body,
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(status.reason.as_deref(), Some("Invalid"));
    let fields: Vec<String> =
        status.details.unwrap().causes.unwrap().into_iter().filter_map(|c| c.field).collect();
    assert_eq!(
        fields,
        [
            "metadata.labels",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[1].name",
            "spec.containers[1].image"
        ]
    );
    assert!(
        client.get::<Pod>(Some("default"), "web").await.unwrap().is_none(),
        "nothing was stored"
    );

    let namespace_body =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}}).to_string();
    let (code, status) =
        status_of(&client, Method::POST, "/api/v1/namespaces", "application/json", &namespace_body)
            .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "namespace names are labels: no dots");
    assert_eq!(status.details.unwrap().causes.unwrap()[0].field.as_deref(), Some("metadata.name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_bad_request_and_unknown_patch_types_are_unsupported() {
    let server = TestController::start("api-malformed").await;
    let client = server.client();
    let (code, status) = status_of(
        &client,
        Method::POST,
        "/api/v1/namespaces/default/pods",
        "application/json",
        "{\"metadata\":",
    )
    .await;
    assert_eq!((code, status.reason.as_deref()), (StatusCode::BAD_REQUEST, Some("BadRequest")));

    client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();
    for media in ["application/xml", "text/plain"] {
        let (code, status) =
            status_of(&client, Method::PATCH, "/api/v1/namespaces/default/pods/web", media, "{}")
                .await;
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{media}");
        assert_eq!(status.reason.as_deref(), Some("UnsupportedMediaType"));
    }
    let (code, status) = status_of(
        &client,
        Method::POST,
        "/api/v1/namespaces/default/pods/web",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(
        (code, status.reason.as_deref()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("MethodNotAllowed"))
    );
    let strict = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": "a", "image": "b", "colour": 1}]}}).to_string();
    let (code, status) = status_of(
        &client,
        Method::POST,
        "/api/v1/namespaces/default/pods?fieldValidation=Strict",
        "application/json",
        &strict,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(status.message.unwrap().contains("spec.containers[0].colour"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_patch_changes_the_object_and_status_separately() {
    let server = TestController::start("api-patch").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &pod_on("web", "node-1")).await.unwrap();

    let labelled: Pod = client
        .merge_patch(
            Some("default"),
            "web",
            &json!({"metadata": {"labels": {"app": "web"}}, "status": {"phase": "Running"}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.labels.unwrap()["app"], "web");
    assert_eq!(
        labelled.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending"),
        "the main resource keeps status"
    );

    let running: Pod = client
        .merge_patch(
            Some("default"),
            "web",
            &json!({"status": {"phase": "Running", "podIP": "10.244.0.7"}, "metadata": {"labels": {"app": "changed"}}}),
            true,
        )
        .await
        .unwrap();
    let status = running.status.as_ref().unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.pod_ip.as_deref()),
        (Some("Running"), Some("10.244.0.7"))
    );
    assert_eq!(
        running.metadata.labels.as_ref().unwrap()["app"],
        "web",
        "/status changes only status"
    );
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));

    let mut replaced = running.clone();
    replaced.status.as_mut().unwrap().phase = Some("Succeeded".to_owned());
    let done: Pod = client.replace_status(Some("default"), "web", &replaced).await.unwrap();
    assert_eq!(done.status.unwrap().phase.as_deref(), Some("Succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_sets_the_node_once() {
    let server = TestController::start("api-binding").await;
    let client = server.client();
    // A pod for another scheduler, so that only the explicit binding places it.
    let mut custom = pod("web");
    custom.spec.as_mut().unwrap().scheduler_name = Some("elsewhere".to_owned());
    client.create::<Pod>(Some("default"), &custom).await.unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"}, "target": {"kind": "Node", "name": "node-7"}}).to_string();
    let path = "/api/v1/namespaces/default/pods/web/binding";
    let (code, status) = status_of(&client, Method::POST, path, "application/json", &binding).await;
    assert_eq!((code, status.status.as_deref()), (StatusCode::CREATED, Some("Success")));
    let bound: Pod = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(bound.spec.as_ref().unwrap().node_name.as_deref(), Some("node-7"));
    assert_eq!(condition(&bound, "PodScheduled").map(|c| c.status.as_str()), Some("True"));
    assert_eq!(bound.metadata.generation, Some(1), "binding is not a client spec change");

    let again = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"}, "target": {"kind": "Node", "name": "node-8"}}).to_string();
    let (code, status) = status_of(&client, Method::POST, path, "application/json", &again).await;
    assert_eq!((code, status.reason.as_deref()), (StatusCode::CONFLICT, Some("Conflict")));
    let still: Pod = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(still.spec.unwrap().node_name.as_deref(), Some("node-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_pod_is_deleted_gracefully_and_removed_by_the_agent() {
    let server = TestController::start("api-graceful").await;
    let client = server.client();
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_on("web", "node-1")).await.unwrap();

    let path = "/api/v1/namespaces/default/pods/web";
    let (code, bytes) = client
        .send(
            Method::DELETE,
            path,
            "application/json",
            Some(br#"{"propagationPolicy":"Background"}"#.to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    let deleting: Pod = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(30));
    let deadline = deleting.metadata.deletion_timestamp.clone().expect("a deletion timestamp");
    let created = deleting.metadata.creation_timestamp.clone().unwrap();
    assert!(deadline.0.as_second() - created.0.as_second() >= 29, "deadline is now + grace");
    assert!(
        client.get::<Pod>(Some("default"), "web").await.unwrap().is_some(),
        "still there for the agent"
    );

    // A shorter grace brings the deadline forward.
    let (_, bytes) = client
        .send(Method::DELETE, &format!("{path}?gracePeriodSeconds=5"), "", None)
        .await
        .unwrap();
    let sooner: Pod = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(sooner.metadata.deletion_grace_period_seconds, Some(5));

    // The agent stopped the pod: it removes it with grace 0.
    assert!(client.delete::<Pod>(Some("default"), "web", Some(0)).await.unwrap());
    assert!(client.get::<Pod>(Some("default"), "web").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_pods_and_pods_of_missing_nodes_are_removed_at_once() {
    let server = TestController::start("api-immediate").await;
    let client = server.client();
    let mut unscheduled = pod("pending");
    unscheduled.spec.as_mut().unwrap().scheduler_name = Some("elsewhere".to_owned());
    client.create::<Pod>(Some("default"), &unscheduled).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_on("orphan", "gone-node")).await.unwrap();
    assert!(client.delete::<Pod>(Some("default"), "pending", None).await.unwrap());
    assert!(client.delete::<Pod>(Some("default"), "orphan", None).await.unwrap());
    let (pods, _) = client.list::<Pod>(Some("default"), "").await.unwrap();
    assert!(pods.is_empty(), "{pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_field_selectors_filter_lists() {
    let server = TestController::start("api-selectors").await;
    let client = server.client();
    let mut a = pod_on("a", "node-1");
    a.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    let mut b = pod_on("b", "node-2");
    b.metadata.labels = Some([("app".to_owned(), "db".to_owned())].into());
    client.create::<Pod>(Some("default"), &a).await.unwrap();
    client.create::<Pod>(Some("default"), &b).await.unwrap();
    client.create::<Namespace>(None, &namespace("other")).await.unwrap();
    client.create::<Pod>(Some("other"), &pod_on("c", "node-1")).await.unwrap();

    let names = |pods: Vec<Pod>| -> Vec<String> {
        pods.into_iter().filter_map(|p| p.metadata.name).collect()
    };
    let (all, _) = client.list::<Pod>(None, "").await.unwrap();
    assert_eq!(names(all), ["a", "b", "c"]);
    let (web, _) = client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
    assert_eq!(names(web), ["a"]);
    let (not_web, _) =
        client.list::<Pod>(Some("default"), "labelSelector=app!%3Dweb").await.unwrap();
    assert_eq!(names(not_web), ["b"]);
    let (on_node, _) = client
        .list::<Pod>(None, "fieldSelector=spec.nodeName%3Dnode-1,status.phase!%3DFailed")
        .await
        .unwrap();
    assert_eq!(names(on_node), ["a", "c"]);
    let (by_name, _) =
        client.list::<Pod>(None, "fieldSelector=metadata.namespace%3Dother").await.unwrap();
    assert_eq!(names(by_name), ["c"]);
    let unsupported =
        client.list::<Pod>(None, "fieldSelector=spec.colour%3Dred").await.unwrap_err();
    assert_eq!(unsupported.code(), Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_and_resumes_from_a_resource_version() {
    let server = TestController::start("api-watch").await;
    let client = server.client();
    let first: Pod = client.create(Some("default"), &pod_on("a", "node-1")).await.unwrap();
    let mut watch = client
        .watch::<Pod>(
            Some("default"),
            &format!("resourceVersion={}", first.metadata.resource_version.clone().unwrap()),
        )
        .await
        .unwrap();
    client.create::<Pod>(Some("default"), &pod_on("b", "node-1")).await.unwrap();
    client
        .merge_patch::<Pod>(
            Some("default"),
            "b",
            &json!({"metadata": {"labels": {"x": "y"}}}),
            false,
        )
        .await
        .unwrap();
    client.delete::<Pod>(Some("default"), "b", Some(0)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(match event {
            WatchEvent::Added(p) => ("ADDED", p.metadata.name.unwrap()),
            WatchEvent::Modified(p) => ("MODIFIED", p.metadata.name.unwrap()),
            WatchEvent::Deleted(p) => ("DELETED", p.metadata.name.unwrap()),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        seen,
        [("ADDED", "b".to_owned()), ("MODIFIED", "b".to_owned()), ("DELETED", "b".to_owned())]
    );

    // Without a resourceVersion, the current objects come first as ADDED.
    let mut fresh = client.watch::<Pod>(Some("default"), "").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), fresh.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_a_selector_reports_objects_leaving_it_as_deleted() {
    let server = TestController::start("api-watch-selector").await;
    let client = server.client();
    let mut labelled = pod_on("a", "node-1");
    labelled.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    let created: Pod = client.create(Some("default"), &labelled).await.unwrap();
    let rv = created.metadata.resource_version.unwrap();
    let mut watch = client
        .watch::<Pod>(Some("default"), &format!("resourceVersion={rv}&labelSelector=app%3Dweb"))
        .await
        .unwrap();
    client.create::<Pod>(Some("default"), &pod_on("unlabelled", "node-1")).await.unwrap();
    client
        .merge_patch::<Pod>(
            Some("default"),
            "a",
            &json!({"metadata": {"labels": {"app": null}}}),
            false,
        )
        .await
        .unwrap();
    let event =
        tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    match event {
        WatchEvent::Deleted(p) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("expected a as DELETED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_history_is_expired_and_timeouts_end_watches() {
    let server =
        TestController::start_with("api-watch-expired", |config| config.history_revisions = 5)
            .await;
    let client = server.client();
    let first: Pod = client.create(Some("default"), &pod_on("a", "node-1")).await.unwrap();
    for i in 0..10 {
        client
            .merge_patch::<Pod>(
                Some("default"),
                "a",
                &json!({"metadata": {"labels": {"i": i.to_string()}}}),
                false,
            )
            .await
            .unwrap();
    }
    let old = first.metadata.resource_version.unwrap();
    let mut watch =
        client.watch::<Pod>(Some("default"), &format!("resourceVersion={old}")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::ErrorStatus(status) => {
            assert_eq!(status.code, Some(410));
            assert_eq!(status.reason.as_deref(), Some("Expired"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().is_none(),
        "the watch ends"
    );

    let (_, now) = client.list::<Pod>(Some("default"), "").await.unwrap();
    let started = std::time::Instant::now();
    let mut short = client
        .watch::<Pod>(Some("default"), &format!("resourceVersion={now}&timeoutSeconds=1"))
        .await
        .unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), short.next()).await.unwrap().is_none());
    assert!(started.elapsed() >= Duration::from_millis(900), "ended by timeoutSeconds, not before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_bookmarks_when_allowed() {
    let server = TestController::start_with("api-bookmarks", |config| {
        config.watch_bookmark_interval = Duration::from_millis(200)
    })
    .await;
    let client = server.client();
    let created: Pod = client.create(Some("default"), &pod_on("a", "node-1")).await.unwrap();
    let rv = created.metadata.resource_version.unwrap();
    let mut watch = client
        .watch::<Pod>(Some("default"), &format!("resourceVersion={rv}&allowWatchBookmarks=true"))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Bookmark { resource_version, .. } => assert_eq!(resource_version, rv),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    let mut plain = client
        .watch::<Pod>(Some("default"), &format!("resourceVersion={rv}&timeoutSeconds=1"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), plain.next()).await.unwrap().is_none(),
        "no bookmark unless asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_distinct_pod_cidrs_and_agents_write_status() {
    let server = TestController::start("api-nodes").await;
    let client = server.client();
    let one: Node = client.create(None, &node("node-1", "172.20.0.11", false)).await.unwrap();
    let two: Node = client.create(None, &node("node-2", "172.20.0.12", false)).await.unwrap();
    let cidr = |n: &Node| n.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap();
    assert_eq!(cidr(&one), "10.244.0.0/24");
    assert_eq!(cidr(&two), "10.244.1.0/24");
    assert_eq!(two.spec.as_ref().unwrap().pod_cidrs, Some(vec!["10.244.1.0/24".to_owned()]));

    // Read again, as an agent does: the node lifecycle controller taints a NotReady node.
    let mut ready: Node = client.get(None, "node-1").await.unwrap().unwrap();
    ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".to_owned();
    let written: Node = client.replace_status(None, "node-1", &ready).await.unwrap();
    assert_eq!(cidr(&written), "10.244.0.0/24", "status writes keep the spec");
    assert_eq!(written.status.unwrap().conditions.unwrap()[0].status, "True");

    let patched: Node = client
        .merge_patch(
            None,
            "node-2",
            &json!({"status": {"nodeInfo": {"kubeletVersion": "strait-test"}}}),
            true,
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().node_info.unwrap().kubelet_version, "strait-test");

    let mut moved = client.get::<Node>(None, "node-2").await.unwrap().unwrap();
    moved.spec.as_mut().unwrap().pod_cidr = Some("10.244.9.0/24".to_owned());
    moved.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.9.0/24".to_owned()]);
    let error = client.replace::<Node>(None, "node-2", &moved).await.unwrap_err();
    assert_eq!(error.code(), Some(422), "a pod CIDR never changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pod_cidrs_leave_the_node_unavailable_until_one_frees_up() {
    // A /23 holds two /24s.
    let server = TestController::start_with("api-exhausted", |config| {
        config.cluster_cidr = "10.250.0.0/23".parse().unwrap();
    })
    .await;
    let client = server.client();
    client.create::<Node>(None, &node("a", "172.20.0.1", true)).await.unwrap();
    client.create::<Node>(None, &node("b", "172.20.0.2", true)).await.unwrap();
    let c: Node = client.create(None, &node("c", "172.20.0.3", true)).await.unwrap();
    assert!(c.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none());
    let conditions = c.status.as_ref().unwrap().conditions.as_ref().unwrap();
    let unavailable =
        conditions.iter().find(|c| c.type_ == "NetworkUnavailable").expect("the condition");
    assert_eq!(
        (unavailable.status.as_str(), unavailable.reason.as_deref()),
        ("True", Some("NoPodCIDRAvailable"))
    );

    let freed =
        client.get::<Node>(None, "a").await.unwrap().unwrap().spec.unwrap().pod_cidr.unwrap();
    assert!(client.delete::<Node>(None, "a", None).await.unwrap());
    let assigned = eventually("node c to get the freed pod CIDR", 10, || async {
        let c: Node = client.get(None, "c").await.unwrap().unwrap();
        c.spec.as_ref().and_then(|s| s.pod_cidr.clone()).map(|cidr| (cidr, c))
    })
    .await;
    assert_eq!(assigned.0, freed);
    let conditions = assigned.1.status.unwrap().conditions.unwrap();
    assert!(conditions.iter().all(|c| c.type_ != "NetworkUnavailable"), "{conditions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_node_registrations_never_share_a_pod_cidr() {
    let server = TestController::start("api-concurrent-nodes").await;
    let client = server.client();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .create::<Node>(
                    None,
                    &node(&format!("node-{i}"), &format!("172.20.0.{}", i + 10), true),
                )
                .await
        }));
    }
    let mut cidrs = std::collections::HashSet::new();
    for task in tasks {
        let node = task.await.unwrap().unwrap();
        assert!(
            cidrs.insert(node.spec.unwrap().pod_cidr.unwrap()),
            "a pod CIDR was handed out twice"
        );
    }
    assert_eq!(cidrs.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_binds_pending_pods_to_the_least_loaded_ready_node() {
    let server = TestController::start("api-scheduler").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &pod("early")).await.unwrap();
    let unschedulable = eventually("the pod to be marked unschedulable", 10, || async {
        let pod: Pod = client.get(Some("default"), "early").await.unwrap().unwrap();
        let condition = condition(&pod, "PodScheduled")?.clone();
        (condition.status == "False").then_some(condition)
    })
    .await;
    assert_eq!(unschedulable.reason.as_deref(), Some("Unschedulable"));
    assert_eq!(unschedulable.message.as_deref(), Some("no nodes available to schedule pods"));

    client.create::<Node>(None, &node("not-ready", "172.20.0.9", false)).await.unwrap();
    let mut cordoned = node("cordoned", "172.20.0.8", true);
    cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        unschedulable: Some(true),
        ..Default::default()
    });
    client.create::<Node>(None, &cordoned).await.unwrap();
    let message = eventually("the message to name both kinds of exclusion", 10, || async {
        let pod: Pod = client.get(Some("default"), "early").await.unwrap().unwrap();
        let message = condition(&pod, "PodScheduled")?.message.clone()?;
        message.contains("unschedulable").then_some(message)
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 1 node(s) were not ready, 1 node(s) were unschedulable."
    );

    // Two ready nodes; n1 already runs a pod, so the pending one goes to n2.
    client.create::<Node>(None, &node("n1", "172.20.0.1", true)).await.unwrap();
    client.create::<Pod>(Some("default"), &pod_on("pinned", "n1")).await.unwrap();
    client.create::<Node>(None, &node("n2", "172.20.0.2", true)).await.unwrap();
    let placed = eventually("the early pod to be bound", 10, || async {
        let pod: Pod = client.get(Some("default"), "early").await.unwrap().unwrap();
        pod.spec.as_ref()?.node_name.clone()
    })
    .await;
    assert!(placed == "n1" || placed == "n2", "only ready, schedulable nodes: {placed}");

    for name in ["p1", "p2", "p3"] {
        client.create::<Pod>(Some("default"), &pod(name)).await.unwrap();
    }
    let placements = eventually("all pods to be bound", 10, || async {
        let (pods, _) = client.list::<Pod>(Some("default"), "").await.unwrap();
        pods.iter().map(|p| p.spec.as_ref()?.node_name.clone()).collect::<Option<Vec<_>>>()
    })
    .await;
    let on = |n: &str| placements.iter().filter(|p| p.as_str() == n).count();
    let mut counts = [on("n1"), on("n2")];
    counts.sort();
    assert_eq!(counts, [2, 3], "five pods spread as evenly as they can be: {placements:?}");
    let pinned: Pod = client.get(Some("default"), "pinned").await.unwrap().unwrap();
    assert_eq!(
        pinned.spec.unwrap().node_name.as_deref(),
        Some("n1"),
        "a pod created with a node stays there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_deletes_its_pods_then_itself() {
    let server = TestController::start("api-namespace").await;
    let client = server.client();
    let (namespaces, _) = client.list::<Namespace>(None, "").await.unwrap();
    let names: Vec<String> = namespaces.into_iter().filter_map(|n| n.metadata.name).collect();
    assert_eq!(names, ["default", "kube-node-lease", "kube-public", "kube-system"]);
    let forbidden = client.delete::<Namespace>(None, "default", None).await.unwrap_err();
    assert_eq!((forbidden.code(), forbidden.reason()), (Some(403), Some("Forbidden")));

    let team: Namespace = client.create(None, &namespace("team")).await.unwrap();
    assert_eq!(team.status.unwrap().phase.as_deref(), Some("Active"));
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    client.create::<Pod>(Some("team"), &pod_on("running", "node-1")).await.unwrap();
    client.create::<Pod>(Some("team"), &pod_on("orphan", "no-such-node")).await.unwrap();

    assert!(client.delete::<Namespace>(None, "team", None).await.unwrap());
    let terminating: Namespace = client.get(None, "team").await.unwrap().unwrap();
    assert_eq!(terminating.status.unwrap().phase.as_deref(), Some("Terminating"));
    let refused = client.create::<Pod>(Some("team"), &pod("late")).await.unwrap_err();
    assert_eq!((refused.code(), refused.reason()), (Some(403), Some("Forbidden")));

    // The running pod is deleted gracefully (its agent must confirm), the orphan at once.
    let deleting = eventually("the running pod to be marked for deletion", 10, || async {
        let pod: Option<Pod> = client.get(Some("team"), "running").await.unwrap();
        pod.filter(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(30));
    assert!(client.get::<Pod>(Some("team"), "orphan").await.unwrap().is_none());
    assert!(client.get::<Namespace>(None, "team").await.unwrap().is_some(), "not empty yet");

    assert!(client.delete::<Pod>(Some("team"), "running", Some(0)).await.unwrap());
    eventually("the namespace to be removed", 10, || async {
        client.get::<Namespace>(None, "team").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_the_served_resources() {
    let server = TestController::start("api-discovery").await;
    let client = server.client();
    let (_, bytes) = client.send(Method::GET, "/api/v1", "", None).await.unwrap();
    let list: Value = serde_json::from_slice(&bytes).unwrap();
    let resources = list["resources"].as_array().unwrap();
    let find = |name: &str| {
        resources
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(find("pods")["shortNames"], json!(["po"]));
    assert_eq!(find("nodes")["namespaced"], json!(false));
    assert_eq!(find("namespaces")["shortNames"], json!(["ns"]));
    assert_eq!(find("pods/binding")["verbs"], json!(["create"]));
    assert_eq!(find("pods/log")["verbs"], json!(["get"]));
    for status in ["pods/status", "nodes/status", "namespaces/status"] {
        assert_eq!(find(status)["verbs"], json!(["get", "patch", "update"]));
    }
    let (_, bytes) = client.send(Method::GET, "/version", "", None).await.unwrap();
    let version: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(version["major"], "1");
    let (code, _) = client
        .send(
            Method::GET,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n",
            "",
            None,
        )
        .await
        .unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, bytes) = client
        .send(
            Method::GET,
            "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dx",
            "",
            None,
        )
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap()["kind"], "EventList");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_ends_its_initial_events_with_a_bookmark() {
    let server = TestController::start("api-streaming-list").await;
    let client = server.client();
    client.create::<Pod>(Some("default"), &pod_on("a", "node-1")).await.unwrap();
    let mut watch = client
        .watch::<Pod>(
            Some("default"),
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        )
        .await
        .unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap()
    };
    match next().await {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("expected the current pod first, got {other:?}"),
    }
    match next().await {
        WatchEvent::Bookmark { annotations, resource_version } => {
            assert_eq!(
                annotations.get("k8s.io/initial-events-end").map(String::as_str),
                Some("true")
            );
            assert!(resource_version.parse::<u64>().is_ok());
        }
        other => panic!("expected the end-of-initial-events bookmark, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_level_errors_are_status_objects_too() {
    let server = TestController::start("api-transport-errors").await;
    let client = server.client();
    let huge = format!(
        "{{\"metadata\":{{\"name\":\"x\",\"annotations\":{{\"a\":\"{}\"}}}}}}",
        "x".repeat(4 << 20)
    );
    // Its own connection: the server closes one whose body it refused to read.
    let (code, status) = status_of(
        &server.client(),
        Method::POST,
        "/api/v1/namespaces/default/pods",
        "application/json",
        &huge,
    )
    .await;
    assert_eq!(
        (code, status.reason.as_deref()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("RequestEntityTooLarge"))
    );
    let (code, status) =
        status_of(&client, Method::POST, "/version", "application/json", "{}").await;
    assert_eq!(
        (code, status.reason.as_deref()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("MethodNotAllowed"))
    );
    let (code, status) = status_of(&client, Method::GET, "/api/v1/widgets", "", "").await;
    assert_eq!((code, status.reason.as_deref()), (StatusCode::NOT_FOUND, Some("NotFound")));
    let (code, document) = client.send(Method::GET, "/openapi/v2", "", None).await.unwrap();
    assert_eq!(code, StatusCode::OK);
    assert!(!document.is_empty(), "a protobuf OpenAPI v2 document");
    let (code, status) =
        status_of(&client, Method::GET, "/api/v1/pods?watch=true&timeoutSeconds=soon", "", "")
            .await;
    assert_eq!((code, status.reason.as_deref()), (StatusCode::BAD_REQUEST, Some("BadRequest")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_fits_nowhere_stays_pending_with_the_reasons_and_fits_once_room_appears() {
    let server = TestController::start("api-scheduler-fit").await;
    let client = server.client();
    let with_allocatable = |name: &str, ip: &str, cpu: &str| {
        let mut n = node(name, ip, true);
        let status = n.status.as_mut().unwrap();
        status.allocatable = Some(
            [
                ("cpu".to_owned(), Quantity(cpu.to_owned())),
                ("memory".to_owned(), Quantity("8Gi".to_owned())),
            ]
            .into(),
        );
        n
    };
    client.create::<Node>(None, &with_allocatable("small", "172.20.0.1", "1")).await.unwrap();
    let mut tainted = with_allocatable("tainted", "172.20.0.2", "8");
    tainted.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        taints: Some(vec![k8s_openapi::api::core::v1::Taint {
            key: "dedicated".to_owned(),
            value: Some("db".to_owned()),
            effect: "NoSchedule".to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    client.create::<Node>(None, &tainted).await.unwrap();

    let mut big = pod("big");
    big.spec.as_mut().unwrap().containers[0].resources =
        Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some([("cpu".to_owned(), Quantity("2".to_owned()))].into()),
            ..Default::default()
        });
    client.create::<Pod>(Some("default"), &big).await.unwrap();
    let message = eventually("the pod to be marked unschedulable with reasons", 10, || async {
        let pod: Pod = client.get(Some("default"), "big").await.unwrap().unwrap();
        condition(&pod, "PodScheduled")?.message.clone()
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}."
    );

    // A node with room appears: the pod is bound there, and never to the small one.
    client.create::<Node>(None, &with_allocatable("roomy", "172.20.0.3", "4")).await.unwrap();
    let placed = eventually("the big pod to be bound", 10, || async {
        let pod: Pod = client.get(Some("default"), "big").await.unwrap().unwrap();
        pod.spec.as_ref()?.node_name.clone()
    })
    .await;
    assert_eq!(placed, "roomy");
}
