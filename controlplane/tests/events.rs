//! Events through the API: aggregation of repeated occurrences, the field selectors of
//! `kubectl describe`, validation and expiry after the configured time to live.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use strait_controlplane::{
    client::ApiClient,
    events::{Occurrence, object_reference, post_through_api},
    testing::{TestController, eventually, pod, pod_on},
};

fn agent_source() -> EventSource {
    EventSource { component: Some("kubelet".to_owned()), host: Some("node-1".to_owned()) }
}

async fn events_about(
    client: &ApiClient,
    namespace: Option<&str>,
    involved: &ObjectReference,
) -> Vec<Event> {
    let query = format!(
        "fieldSelector=involvedObject.name={},involvedObject.namespace={},involvedObject.kind={},involvedObject.uid={}",
        involved.name.as_deref().unwrap_or_default(),
        involved.namespace.as_deref().unwrap_or_default(),
        involved.kind.as_deref().unwrap_or_default(),
        involved.uid.as_deref().unwrap_or_default(),
    );
    client.list::<Event>(namespace, &query).await.expect("listing events").0
}

#[tokio::test]
async fn a_repeated_occurrence_bumps_one_event_and_describe_selectors_find_it() {
    let controller = TestController::start("events-aggregate").await;
    let client = controller.client();
    // Created bound, so that the scheduler has nothing to report about them.
    let web: Pod =
        client.create(Some("default"), &pod_on("web", "node-1")).await.expect("creating web");
    let db: Pod =
        client.create(Some("default"), &pod_on("db", "node-1")).await.expect("creating db");
    let source = agent_source();
    let backoff = Occurrence::warning(
        object_reference(&web),
        "BackOff",
        "Back-off restarting failed container app",
    );
    for _ in 0..3 {
        post_through_api(&client, &source, &backoff).await.expect("posting the event");
    }
    let started = Occurrence::normal(object_reference(&web), "Started", "Started container app");
    post_through_api(&client, &source, &started).await.expect("posting another event");
    let db_started = Occurrence::normal(object_reference(&db), "Started", "Started container app");
    post_through_api(&client, &source, &db_started).await.expect("posting db's event");

    let about_web = events_about(&client, Some("default"), &object_reference(&web)).await;
    assert_eq!(about_web.len(), 2, "one event per distinct occurrence: {about_web:#?}");
    let bumped =
        about_web.iter().find(|e| e.reason.as_deref() == Some("BackOff")).expect("BackOff");
    assert_eq!(bumped.count, Some(3));
    assert_eq!(bumped.type_.as_deref(), Some("Warning"));
    assert!(bumped.last_timestamp >= bumped.first_timestamp);
    assert_eq!(bumped.source.as_ref().and_then(|s| s.host.as_deref()), Some("node-1"));
    let once = about_web.iter().find(|e| e.reason.as_deref() == Some("Started")).expect("Started");
    assert_eq!(once.count, Some(1));

    // The uid tells incarnations apart: a selector with another uid finds nothing.
    let mut other_incarnation = object_reference(&web);
    other_incarnation.uid = Some("another-uid".to_owned());
    assert!(events_about(&client, Some("default"), &other_incarnation).await.is_empty());
    // Across namespaces (`kubectl describe node` lists all events).
    let all = events_about(&client, None, &object_reference(&db)).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].reason.as_deref(), Some("Started"));

    let (by_reason, _) = client
        .list::<Event>(Some("default"), "fieldSelector=reason=BackOff,type=Warning")
        .await
        .unwrap();
    assert_eq!(by_reason.len(), 1);
    let error =
        client.list::<Event>(Some("default"), "fieldSelector=spec.nodeName=x").await.unwrap_err();
    assert_eq!(error.code(), Some(400), "{error}");
}

#[tokio::test]
async fn an_event_outside_its_objects_namespace_is_invalid() {
    let controller = TestController::start("events-invalid").await;
    let client = controller.client();
    client
        .create(None, &strait_controlplane::testing::namespace("team"))
        .await
        .expect("creating team");
    let mut event = strait_controlplane::events::new_event(
        &agent_source(),
        &Occurrence::normal(
            ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some("web".to_owned()),
                namespace: Some("default".to_owned()),
                ..ObjectReference::default()
            },
            "Started",
            "Started container app",
        ),
        strait_controlplane::api::typed::current_time(),
    );
    event.metadata.namespace = None;
    let error = client.create(Some("team"), &event).await.unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("involvedObject.namespace"), "{error}");
    // A node's event lives in `default` with no involved namespace.
    let node_event = strait_controlplane::events::new_event(
        &agent_source(),
        &Occurrence::normal(
            ObjectReference {
                kind: Some("Node".to_owned()),
                name: Some("node-1".to_owned()),
                ..ObjectReference::default()
            },
            "NodeReady",
            "Node node-1 status is now: NodeReady",
        ),
        strait_controlplane::api::typed::current_time(),
    );
    assert_eq!(node_event.metadata.namespace.as_deref(), Some("default"));
    client.create(Some("default"), &node_event).await.expect("a node's event is valid");
}

#[tokio::test]
async fn events_expire_after_their_time_to_live_unless_they_happen_again() {
    let ttl = Duration::from_secs(3);
    let controller =
        TestController::start_with("events-expiry", |config| config.event_ttl = ttl).await;
    let client = controller.client();
    let web: Pod =
        client.create(Some("default"), &pod_on("web", "node-1")).await.expect("creating web");
    let source = agent_source();
    let once = Occurrence::normal(object_reference(&web), "Pulled", "image already present");
    let repeated =
        Occurrence::warning(object_reference(&web), "Unhealthy", "Readiness probe failed");
    let posted = Instant::now();
    post_through_api(&client, &source, &once).await.unwrap();
    post_through_api(&client, &source, &repeated).await.unwrap();
    let reasons = |events: Vec<Event>| {
        let mut reasons: Vec<String> = events.into_iter().filter_map(|e| e.reason).collect();
        reasons.sort();
        reasons
    };
    assert_eq!(
        reasons(client.list::<Event>(Some("default"), "").await.unwrap().0),
        ["Pulled", "Unhealthy"]
    );
    // Keep the repeated one happening: each bump renews its time to live.
    let mut kept_until = Instant::now();
    while posted.elapsed() < ttl + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        post_through_api(&client, &source, &repeated).await.unwrap();
        kept_until = Instant::now();
    }
    let left = reasons(client.list::<Event>(Some("default"), "").await.unwrap().0);
    assert_eq!(left, ["Unhealthy"], "the one-off event expired, the repeated one lives on");
    // Once it stops happening it goes too, within the TTL and a little slack.
    eventually("the repeated event to expire", 10, || {
        let client = client.clone();
        async move {
            let (events, _) = client.list::<Event>(Some("default"), "").await.ok()?;
            events.is_empty().then_some(())
        }
    })
    .await;
    assert!(
        kept_until.elapsed() >= ttl - Duration::from_secs(1),
        "expired {:?} after its last occurrence, before its TTL of {ttl:?}",
        kept_until.elapsed()
    );
}

/// The events about one object, by reason, once `reasons` are all there.
async fn wait_for_reasons(
    client: &ApiClient,
    involved: &ObjectReference,
    reasons: &[&str],
) -> Vec<Event> {
    let what = format!("events {reasons:?} about {:?}", involved.name);
    eventually(&what, 10, || async {
        let events = events_about(client, involved.namespace.as_deref(), involved).await;
        reasons
            .iter()
            .all(|r| events.iter().any(|e| e.reason.as_deref() == Some(*r)))
            .then_some(events)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_and_the_replica_set_controller_report_what_they_did() {
    use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Node};
    use strait_controlplane::testing::node;

    let controller = TestController::start("events-controllers").await;
    let client = controller.client();
    let mut picky = pod("picky");
    picky.spec.as_mut().unwrap().node_selector =
        Some([("disk".to_owned(), "ssd".to_owned())].into());
    let picky: Pod = client.create(Some("default"), &picky).await.unwrap();
    let failed = wait_for_reasons(&client, &object_reference(&picky), &["FailedScheduling"]).await;
    let failed = failed.iter().find(|e| e.reason.as_deref() == Some("FailedScheduling")).unwrap();
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert_eq!(failed.message.as_deref(), Some("no nodes available to schedule pods"));
    assert_eq!(
        failed.source.as_ref().and_then(|s| s.component.as_deref()),
        Some("default-scheduler")
    );

    client.create::<Node>(None, &node("node-1", "172.20.0.1", true)).await.unwrap();
    let web: Pod = client.create(Some("default"), &pod("web")).await.unwrap();
    let scheduled = wait_for_reasons(&client, &object_reference(&web), &["Scheduled"]).await;
    assert_eq!(
        scheduled[0].message.as_deref(),
        Some("Successfully assigned default/web to node-1")
    );
    assert_eq!(scheduled[0].type_.as_deref(), Some("Normal"));
    // The picky pod's reason changed with the new node: a second FailedScheduling event.
    eventually("the new unschedulable reason as an event", 10, || async {
        let events = events_about(&client, Some("default"), &object_reference(&picky)).await;
        events
            .iter()
            .any(|e| {
                e.message.as_deref()
                    == Some("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
            })
            .then_some(())
    })
    .await;

    let set: ReplicaSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "front"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "front"}},
            "template": {
                "metadata": {"labels": {"app": "front"}},
                "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]},
            },
        },
    }))
    .unwrap();
    let set = client.create(Some("default"), &set).await.unwrap();
    let created = eventually("two SuccessfulCreate events", 10, || async {
        let events = events_about(&client, Some("default"), &object_reference(&set)).await;
        let created: Vec<String> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("SuccessfulCreate"))
            .filter_map(|e| e.message.clone())
            .collect();
        (created.len() == 2).then_some(created)
    })
    .await;
    let (pods, _) = client.list::<Pod>(Some("default"), "labelSelector=app%3Dfront").await.unwrap();
    for pod in &pods {
        let expected = format!("Created pod: {}", pod.metadata.name.as_deref().unwrap());
        assert!(created.contains(&expected), "{expected} in {created:?}");
    }
    client
        .merge_patch::<ReplicaSet>(
            Some("default"),
            "front",
            &serde_json::json!({"spec": {"replicas": 1}}),
            false,
        )
        .await
        .unwrap();
    let deleted = wait_for_reasons(&client, &object_reference(&set), &["SuccessfulDelete"]).await;
    let deleted = deleted.iter().find(|e| e.reason.as_deref() == Some("SuccessfulDelete")).unwrap();
    assert!(deleted.message.as_deref().unwrap().starts_with("Deleted pod: front-"), "{deleted:?}");
}
