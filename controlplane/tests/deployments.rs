//! Deployments through the API: the kind (defaults, validation, generation, the `/scale`
//! subresource) and the deployment controller's rollouts, observed change by change.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use http::Method;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::{Event, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::WatchEvent,
};
use serde_json::{Value, json};
use strait_controlplane::{
    client::ApiClient,
    testing::{AgentTiming, SimulatedAgent, TestController, eventually, first_image, node},
};

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": "strait/netexec"}]},
            },
        },
    }))
    .expect("a deployment")
}

/// Sends `body` to `path` and returns the status code and the JSON answer.
async fn call(
    client: &ApiClient,
    method: Method,
    path: &str,
    content_type: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap());
    let (status, bytes) = client.send(method, path, content_type, body).await.unwrap();
    (status.as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_defaulted_validated_and_counts_its_spec_changes() {
    let server = TestController::start("deployments-kind").await;
    let client = server.client();
    let created =
        client.create::<Deployment>(Some("default"), &deployment("web", 2)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(spec.revision_history_limit, Some(10));

    // A spec change counts; a label change does not.
    let patched = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"spec": {"minReadySeconds": 3}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    let labelled = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"metadata": {"labels": {"team": "a"}}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));

    // The selector is immutable; a 422 names the field and nothing is changed.
    let error = client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"spec": {"selector": {"matchLabels": {"app": "db"}},
                             "template": {"metadata": {"labels": {"app": "db"}}}}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.selector"), "{error}");
    let stored: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.generation, Some(2));

    // Both bounds zero is refused at creation, with the field.
    let mut frozen = serde_json::to_value(deployment("frozen", 1)).unwrap();
    frozen["spec"]["strategy"] = json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
    let (code, status) = call(
        &client,
        Method::POST,
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
        Some(frozen),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"], "spec.strategy.rollingUpdate.maxUnavailable",
        "{status}"
    );
    assert!(client.get::<Deployment>(Some("default"), "frozen").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_subresource_reads_and_writes_replicas_of_deployments_and_replica_sets() {
    let server = TestController::start("deployments-scale").await;
    let client = server.client();
    client.create::<Deployment>(Some("default"), &deployment("web", 2)).await.unwrap();
    let path = "/apis/apps/v1/namespaces/default/deployments/web/scale";
    let (code, scale) = call(&client, Method::GET, path, "", None).await;
    assert_eq!(code, 200, "{scale}");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["apiVersion"], "autoscaling/v1");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=web");

    // kubectl scale: a merge patch of the Scale.
    let (code, scale) = call(
        &client,
        Method::PATCH,
        path,
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": 5}})),
    )
    .await;
    assert_eq!((code, &scale["spec"]["replicas"]), (200, &json!(5)), "{scale}");
    let stored: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.spec.unwrap().replicas, Some(5));
    assert_eq!(stored.metadata.generation, Some(2), "a scale is a spec change");

    // PUT with a stale resourceVersion is a conflict; with the current one it writes (the
    // deployment controller writes the object too, so "current" may need a second read).
    let mut stale = scale.clone();
    stale["metadata"]["resourceVersion"] = "1".into();
    stale["spec"]["replicas"] = 7.into();
    let (code, _) = call(&client, Method::PUT, path, "application/json", Some(stale)).await;
    assert_eq!(code, 409);
    let put = eventually("a PUT of the current scale", 10, || async {
        let (_, mut current) = call(&client, Method::GET, path, "", None).await;
        current["spec"]["replicas"] = 1.into();
        let (code, scale) =
            call(&client, Method::PUT, path, "application/json", Some(current)).await;
        (code != 409).then_some((code, scale))
    })
    .await;
    assert_eq!((put.0, &put.1["spec"]["replicas"]), (200, &json!(1)), "{}", put.1);

    // Negative replicas are refused by the object's validation.
    let (code, status) = call(
        &client,
        Method::PATCH,
        path,
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": -1}})),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["details"]["causes"][0]["field"], "spec.replicas", "{status}");

    // Replica sets scale the same way; discovery lists both subresources as autoscaling/v1.
    let set: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "cache"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cache"}},
                 "template": {"metadata": {"labels": {"app": "cache"}},
                              "spec": {"containers": [{"name": "c", "image": "strait/netexec"}]}}},
    }))
    .unwrap();
    client.create::<ReplicaSet>(Some("default"), &set).await.unwrap();
    let (code, scale) = call(
        &client,
        Method::PATCH,
        "/apis/apps/v1/namespaces/default/replicasets/cache/scale",
        "application/merge-patch+json",
        Some(json!({"spec": {"replicas": 0}})),
    )
    .await;
    assert_eq!((code, &scale["spec"]["replicas"]), (200, &json!(0)), "{scale}");
    let (_, resources) = call(&client, Method::GET, "/apis/apps/v1", "", None).await;
    for name in ["deployments/scale", "replicasets/scale"] {
        let entry = resources["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from discovery: {resources}"));
        assert_eq!((&entry["group"], &entry["version"]), (&json!("autoscaling"), &json!("v1")));
    }
    // Kinds without one answer 404.
    let (code, _) =
        call(&client, Method::GET, "/api/v1/namespaces/default/pods/x/scale", "", None).await;
    assert_eq!(code, 404);
}

// ---------------------------------------------------------------------------------------
// The controller. A simulated node agent makes bound pods Running and Ready and finishes
// graceful deletions after a while; an observer watches every pod and replica set change.

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Every state of the pods and of the replica sets the watches delivered, one snapshot per
/// change, with the time it arrived.
#[derive(Default)]
struct History {
    pods: Vec<(Instant, BTreeMap<String, Pod>)>,
    sets: Vec<(Instant, BTreeMap<String, ReplicaSet>)>,
}

struct Observer {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    history: Arc<Mutex<History>>,
}

impl Observer {
    async fn start(client: &ApiClient) -> Self {
        let history = Arc::new(Mutex::new(History::default()));
        // The state as listed, then every change after it.
        let (pods, pods_version) = client.list::<Pod>(Some("default"), "").await.unwrap();
        let (sets, sets_version) = client.list::<ReplicaSet>(Some("default"), "").await.unwrap();
        let (pods, sets) = (by_name(pods), by_name(sets));
        let now = Instant::now();
        history.lock().unwrap().pods.push((now, pods.clone()));
        history.lock().unwrap().sets.push((now, sets.clone()));
        let pod_changes = client
            .watch::<Pod>(Some("default"), &format!("resourceVersion={pods_version}"))
            .await
            .unwrap();
        let set_changes = client
            .watch::<ReplicaSet>(Some("default"), &format!("resourceVersion={sets_version}"))
            .await
            .unwrap();
        let record = Arc::clone(&history);
        let pod_task = tokio::spawn(async move {
            let (mut changes, mut state) = (pod_changes, pods);
            while let Some(Ok(event)) = changes.next().await {
                apply(&mut state, event);
                record.lock().unwrap().pods.push((Instant::now(), state.clone()));
            }
        });
        let record = Arc::clone(&history);
        let set_task = tokio::spawn(async move {
            let (mut changes, mut state) = (set_changes, sets);
            while let Some(Ok(event)) = changes.next().await {
                apply(&mut state, event);
                record.lock().unwrap().sets.push((Instant::now(), state.clone()));
            }
        });
        Self { tasks: vec![pod_task, set_task], history }
    }

    /// Every pod state seen so far.
    fn pod_states(&self) -> Vec<(Instant, BTreeMap<String, Pod>)> {
        self.history.lock().unwrap().pods.clone()
    }

    fn set_states(&self) -> Vec<(Instant, BTreeMap<String, ReplicaSet>)> {
        self.history.lock().unwrap().sets.clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

fn apply<
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    state: &mut BTreeMap<String, K>,
    event: WatchEvent<K>,
) {
    match event {
        WatchEvent::Added(object) | WatchEvent::Modified(object) => {
            let name = object.metadata().name.clone().unwrap_or_default();
            state.insert(name, object);
        }
        WatchEvent::Deleted(object) => {
            state.remove(object.metadata().name.as_deref().unwrap_or_default());
        }
        WatchEvent::Bookmark { .. } | WatchEvent::ErrorStatus(_) | WatchEvent::ErrorOther(_) => {}
    }
}

fn by_name<
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    items: Vec<K>,
) -> BTreeMap<String, K> {
    items.into_iter().map(|o| (o.metadata().name.clone().unwrap_or_default(), o)).collect()
}

fn active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
}

/// A deployment of `strait/netexec:<version>` pods with extra spec fields merged in.
fn versioned(name: &str, replicas: i32, version: &str, extra: Value) -> Deployment {
    let mut value = serde_json::to_value(deployment(name, replicas)).unwrap();
    value["spec"]["template"]["spec"]["containers"][0]["image"] =
        format!("strait/netexec:{version}").into();
    strait_controlplane::api::merge_patch::apply(&mut value["spec"], &extra);
    serde_json::from_value(value).unwrap()
}

/// Sets the image of the deployment's container (a template change, like `kubectl set image`).
async fn set_version(client: &ApiClient, name: &str, version: &str) {
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": format!("strait/netexec:{version}")}
    ]}}}});
    client.merge_patch::<Deployment>(Some("default"), name, &patch, false).await.unwrap();
}

/// Waits until the deployment is rolled out as `kubectl rollout status` decides it, with every
/// active pod of the deployment running `version`.
async fn rolled_out(client: &ApiClient, name: &str, version: &str, seconds: u64) -> Deployment {
    let image = format!("strait/netexec:{version}");
    eventually(&format!("{name} rolled out at {version}"), seconds, || async {
        let deployment: Deployment = client.get(Some("default"), name).await.ok()??;
        let status = deployment.status.clone()?;
        let replicas = deployment.spec.as_ref()?.replicas?;
        let done = status.observed_generation >= deployment.metadata.generation
            && status.updated_replicas? == replicas
            && status.replicas? == replicas
            && status.available_replicas? == replicas;
        let (pods, _) = client
            .list::<Pod>(Some("default"), &format!("labelSelector=app%3D{name}"))
            .await
            .ok()?;
        let active: Vec<&Pod> = pods.iter().filter(|p| active(p)).collect();
        let all_new =
            active.len() == replicas as usize && active.iter().all(|p| first_image(p) == image);
        (done && all_new).then_some(deployment)
    })
    .await
}

async fn sets_of(client: &ApiClient, name: &str) -> Vec<ReplicaSet> {
    let (sets, _) = client
        .list::<ReplicaSet>(Some("default"), &format!("labelSelector=app%3D{name}"))
        .await
        .unwrap();
    sets
}

fn set_image(set: &ReplicaSet) -> String {
    set.spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

fn annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<String> {
    meta.annotations.as_ref().and_then(|a| a.get(key)).cloned()
}

async fn cluster(label: &str, timing: AgentTiming) -> (TestController, ApiClient, SimulatedAgent) {
    let server = TestController::start(label).await;
    let client = server.client();
    client.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    let agent = SimulatedAgent::start(client.clone(), "default", timing);
    (server, client, agent)
}

/// Rolls a 4-replica deployment from v1 to v2 and checks every observed state against its
/// bounds: at most `replicas + surge` active pods and desired replicas, at least
/// `replicas - unavailable` ready pods.
async fn roll_within(
    client: &ApiClient,
    name: &str,
    surge: Value,
    unavailable: Value,
    bounds: (usize, usize),
) {
    let strategy =
        json!({"strategy": {"rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}});
    client
        .create::<Deployment>(Some("default"), &versioned(name, 4, "v1", strategy))
        .await
        .unwrap();
    rolled_out(client, name, "v1", 20).await;
    let observer = Observer::start(client).await;
    set_version(client, name, "v2").await;
    rolled_out(client, name, "v2", 30).await;
    // The last changes (old pods leaving) are in the watch before the check.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (max_active, min_ready) = bounds;
    let ours = |pod: &&Pod| {
        pod.metadata.labels.as_ref().and_then(|l| l.get("app")).map(String::as_str) == Some(name)
    };
    let states = observer.pod_states();
    assert!(states.len() > 10, "{name}: too few pod changes seen ({})", states.len());
    let mut saw_both = false;
    for (_, pods) in &states {
        let pods: Vec<&Pod> = pods.values().filter(ours).collect();
        let running = pods.iter().filter(|p| active(p)).count();
        let ready = pods.iter().filter(|p| active(p) && is_ready(p)).count();
        assert!(running <= max_active, "{name}: {running} active pods, more than {max_active}");
        assert!(ready >= min_ready, "{name}: {ready} ready pods, fewer than {min_ready}");
        let versions: BTreeSet<String> =
            pods.iter().filter(|p| active(p)).map(|p| first_image(p)).collect();
        saw_both |= versions.len() == 2;
    }
    assert!(saw_both, "{name}: never saw both versions at once: not a rolling update");
    for (_, sets) in observer.set_states() {
        let desired: i32 = sets
            .values()
            .filter(|s| {
                s.metadata.labels.as_ref().and_then(|l| l.get("app")).map(String::as_str)
                    == Some(name)
            })
            .map(|s| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0))
            .sum();
        assert!(desired as usize <= max_active, "{name}: replica sets want {desired} pods");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_never_exceed_their_surge_nor_their_unavailability() {
    let (_server, client, _agent) = cluster("deployments-bounds", AgentTiming::default()).await;
    // (surge, unavailable) → at most 4 + surge pods, at least 4 - unavailable ready.
    roll_within(&client, "surge", json!(1), json!(0), (5, 4)).await;
    roll_within(&client, "unavail", json!(0), json!(1), (4, 3)).await;
    roll_within(&client, "both", json!("50%"), json!("25%"), (6, 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sets_are_named_by_template_hash_owned_and_numbered_by_revision() {
    let (_server, client, _agent) = cluster("deployments-revisions", AgentTiming::default()).await;
    let limit = json!({"revisionHistoryLimit": 1});
    let created = client
        .create::<Deployment>(Some("default"), &versioned("web", 2, "v1", limit))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    // Once converged, passes write nothing: the versions stay put.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let versions = || async {
        let deployment: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
        let sets = sets_of(&client, "web").await;
        let mut versions = vec![deployment.metadata.resource_version];
        versions.extend(sets.into_iter().map(|s| s.metadata.resource_version));
        versions
    };
    let settled = versions().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(versions().await, settled, "a converged deployment is rewritten");
    let sets = sets_of(&client, "web").await;
    assert_eq!(sets.len(), 1);
    let first = &sets[0];
    let hash = first.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(first.metadata.name.as_deref(), Some(format!("web-{hash}").as_str()));
    assert_eq!(
        first.spec.as_ref().unwrap().selector.match_labels.as_ref().unwrap()["pod-template-hash"],
        hash
    );
    let owner = &first.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Deployment", uid.as_str(), Some(true))
    );
    assert_eq!(
        annotation(&first.metadata, "deployment.kubernetes.io/revision").as_deref(),
        Some("1")
    );
    let (pods, _) = client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.unwrap();
    assert!(pods.iter().all(|p| p.metadata.labels.as_ref().unwrap()["pod-template-hash"] == hash));

    // v2, v3: revisions 2 and 3; the history keeps one old set, so v1's goes.
    set_version(&client, "web", "v2").await;
    rolled_out(&client, "web", "v2", 20).await;
    set_version(&client, "web", "v3").await;
    let deployment = rolled_out(&client, "web", "v3", 20).await;
    assert_eq!(
        annotation(&deployment.metadata, "deployment.kubernetes.io/revision").as_deref(),
        Some("3")
    );
    let revisions = eventually("v1's set pruned", 10, || async {
        let sets = sets_of(&client, "web").await;
        let mut revisions: Vec<(String, String)> = sets
            .iter()
            .map(|s| {
                (
                    annotation(&s.metadata, "deployment.kubernetes.io/revision")
                        .unwrap_or_default(),
                    set_image(s),
                )
            })
            .collect();
        revisions.sort();
        (revisions.len() == 2).then_some(revisions)
    })
    .await;
    assert_eq!(
        revisions,
        [
            ("2".to_owned(), "strait/netexec:v2".to_owned()),
            ("3".to_owned(), "strait/netexec:v3".to_owned())
        ]
    );

    // Undo, as kubectl does it: the template of revision 2 (without its hash label) written
    // back. The same set becomes new again, under revision 4; no set is created.
    let v2 =
        sets_of(&client, "web").await.into_iter().find(|s| set_image(s).ends_with(":v2")).unwrap();
    let mut template =
        serde_json::to_value(v2.spec.as_ref().unwrap().template.clone().unwrap()).unwrap();
    template["metadata"]["labels"].as_object_mut().unwrap().remove("pod-template-hash");
    let mut current: Deployment = client.get(Some("default"), "web").await.unwrap().unwrap();
    current.spec.as_mut().unwrap().template = serde_json::from_value(template).unwrap();
    client.replace::<Deployment>(Some("default"), "web", &current).await.unwrap();
    let deployment = rolled_out(&client, "web", "v2", 20).await;
    assert_eq!(
        annotation(&deployment.metadata, "deployment.kubernetes.io/revision").as_deref(),
        Some("4")
    );
    let sets = sets_of(&client, "web").await;
    assert_eq!(sets.len(), 2, "an undo reuses the old set");
    let again = sets.iter().find(|s| s.metadata.uid == v2.metadata.uid).expect("the v2 set");
    assert_eq!(
        annotation(&again.metadata, "deployment.kubernetes.io/revision").as_deref(),
        Some("4")
    );
    assert_eq!(
        annotation(&again.metadata, "deployment.kubernetes.io/revision-history").as_deref(),
        Some("2")
    );
    let conditions = deployment.status.unwrap().conditions.unwrap();
    let progressing = conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_deref()),
        ("True", Some("NewReplicaSetAvailable"))
    );
    let available = conditions.iter().find(|c| c.type_ == "Available").unwrap();
    assert_eq!(available.status, "True");

    // Every resize is an event of the deployment, as kubectl describe shows them.
    let v3_name =
        sets.iter().find(|s| set_image(s).ends_with(":v3")).unwrap().metadata.name.clone().unwrap();
    let messages = eventually("scaling events", 10, || async {
        let (events, _) = client.list::<Event>(Some("default"), "").await.ok()?;
        let messages: Vec<String> = events
            .into_iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some("Deployment")
                    && e.reason.as_deref() == Some("ScalingReplicaSet")
            })
            .filter_map(|e| e.message)
            .collect();
        messages
            .iter()
            .any(|m| *m == format!("Scaled down replica set {v3_name} from 1 to 0"))
            .then_some(messages)
    })
    .await;
    assert!(messages.iter().any(|m| m.starts_with("Scaled up replica set web-")), "{messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_deployment_scales_but_rolls_nothing_until_resumed() {
    let (_server, client, _agent) = cluster("deployments-pause", AgentTiming::default()).await;
    client
        .create::<Deployment>(Some("default"), &versioned("web", 2, "v1", json!({})))
        .await
        .unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    let pause = |paused: bool| json!({"spec": {"paused": paused}});
    client.merge_patch::<Deployment>(Some("default"), "web", &pause(true), false).await.unwrap();
    set_version(&client, "web", "v2").await;
    // Scaling while paused resizes the current set.
    client
        .merge_patch::<Deployment>(Some("default"), "web", &json!({"spec": {"replicas": 3}}), false)
        .await
        .unwrap();
    let paused = eventually("three v1 pods while paused", 10, || async {
        let deployment: Deployment = client.get(Some("default"), "web").await.ok()??;
        let status = deployment.status.clone()?;
        (status.available_replicas == Some(3)
            && status.observed_generation >= deployment.metadata.generation)
            .then_some(deployment)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sets = sets_of(&client, "web").await;
    assert_eq!(sets.len(), 1, "no rollout while paused");
    assert_eq!(set_image(&sets[0]), "strait/netexec:v1");
    let progressing = paused
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_deref()),
        ("Unknown", Some("DeploymentPaused"))
    );

    client.merge_patch::<Deployment>(Some("default"), "web", &pause(false), false).await.unwrap();
    let resumed = rolled_out(&client, "web", "v2", 20).await;
    assert_eq!(resumed.spec.unwrap().replicas, Some(3));
    assert_eq!(
        annotation(&resumed.metadata, "deployment.kubernetes.io/revision").as_deref(),
        Some("2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_makes_no_progress_exceeds_its_deadline() {
    let timing = AgentTiming {
        never_ready: vec!["strait/netexec:broken".to_owned()],
        ..AgentTiming::default()
    };
    let (_server, client, _agent) = cluster("deployments-deadline", timing).await;
    let spec = json!({"progressDeadlineSeconds": 2,
                      "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}});
    client.create::<Deployment>(Some("default"), &versioned("web", 2, "v1", spec)).await.unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    let started = Instant::now();
    set_version(&client, "web", "broken").await;
    let progressing = |d: &Deployment| {
        d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Progressing").cloned()
    };
    let exceeded = eventually("ProgressDeadlineExceeded", 15, || async {
        let deployment: Deployment = client.get(Some("default"), "web").await.ok()??;
        let condition = progressing(&deployment)?;
        (condition.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            .then_some((deployment, condition))
    })
    .await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "timed out after {waited:?}, before the deadline");
    assert!(waited < Duration::from_secs(6), "noticed {waited:?} after the change");
    let (deployment, condition) = exceeded;
    assert_eq!(condition.status, "False");
    // The old pods still serve: with no unavailability allowed none was taken away.
    let status = deployment.status.unwrap();
    assert_eq!(status.available_replicas, Some(2));
    let available =
        status.conditions.unwrap().into_iter().find(|c| c.type_ == "Available").unwrap();
    assert_eq!(available.status, "True");

    // A fix is progress again.
    set_version(&client, "web", "v3").await;
    let fixed = rolled_out(&client, "web", "v3", 20).await;
    let condition = progressing(&fixed).unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_deref()),
        ("True", Some("NewReplicaSetAvailable"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_removes_every_old_pod_before_the_first_new_one() {
    let timing = AgentTiming { stop_after: Duration::from_millis(600), ..AgentTiming::default() };
    let (_server, client, _agent) = cluster("deployments-recreate", timing).await;
    let spec = json!({"strategy": {"type": "Recreate"}});
    client.create::<Deployment>(Some("default"), &versioned("web", 3, "v1", spec)).await.unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    let observer = Observer::start(&client).await;
    set_version(&client, "web", "v2").await;
    rolled_out(&client, "web", "v2", 20).await;
    let states = observer.pod_states();
    let mut saw_terminating = false;
    for (_, pods) in &states {
        let old: Vec<&Pod> = pods.values().filter(|p| first_image(p).ends_with(":v1")).collect();
        let new = pods.values().filter(|p| first_image(p).ends_with(":v2")).count();
        saw_terminating |= old.iter().any(|p| !active(p));
        assert!(
            old.is_empty() || new == 0,
            "{} old pods (terminating included) beside {new} new ones",
            old.len()
        );
    }
    assert!(saw_terminating, "the old pods were never seen terminating");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pods_count_as_available_only_after_min_ready_seconds() {
    let (_server, client, agent) = cluster("deployments-minready", AgentTiming::default()).await;
    let spec = json!({"minReadySeconds": 2,
                      "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}});
    client.create::<Deployment>(Some("default"), &versioned("web", 2, "v1", spec)).await.unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    let observer = Observer::start(&client).await;
    let started = Instant::now();
    set_version(&client, "web", "v2").await;
    rolled_out(&client, "web", "v2", 30).await;
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "two pods, each held 2 s: {:?}",
        started.elapsed()
    );
    // Whenever an old pod began terminating, as many new pods had been ready for 2 s.
    let mut deleted = BTreeSet::new();
    for (at, pods) in observer.pod_states() {
        for pod in pods.values().filter(|p| first_image(p).ends_with(":v1") && !active(p)) {
            if deleted.insert(pod_name(pod)) {
                let held = pods
                    .values()
                    .filter(|p| first_image(p).ends_with(":v2"))
                    .filter_map(|p| agent.ready_at(&pod_name(p)))
                    .filter(|ready| at.duration_since(*ready) >= Duration::from_secs(2))
                    .count();
                assert!(
                    held >= deleted.len(),
                    "old pod {} deleted with {held} new pods available",
                    pod_name(pod)
                );
            }
        }
    }
    assert_eq!(deleted.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_deployment_takes_its_replica_sets_and_pods_along() {
    let (_server, client, _agent) = cluster("deployments-delete", AgentTiming::default()).await;
    client
        .create::<Deployment>(Some("default"), &versioned("web", 2, "v1", json!({})))
        .await
        .unwrap();
    rolled_out(&client, "web", "v1", 20).await;
    set_version(&client, "web", "v2").await;
    rolled_out(&client, "web", "v2", 20).await;
    assert_eq!(sets_of(&client, "web").await.len(), 2);
    // Background propagation, as kubectl delete sends: the garbage collector follows the
    // controller references the deployment controller wrote.
    client.delete::<Deployment>(Some("default"), "web", None).await.unwrap();
    eventually("no replica set and no pod left", 20, || async {
        let sets = sets_of(&client, "web").await;
        let (pods, _) =
            client.list::<Pod>(Some("default"), "labelSelector=app%3Dweb").await.ok()?;
        (sets.is_empty() && pods.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_during_a_rollout_shares_the_new_replicas_in_proportion() {
    // Kubernetes' own example: 10 replicas, maxSurge 3, maxUnavailable 2, a new version that
    // never becomes ready, then 15 replicas: 3 more for the old set, 2 for the new.
    let timing = AgentTiming {
        never_ready: vec!["strait/netexec:broken".to_owned()],
        ..AgentTiming::default()
    };
    let (_server, client, _agent) = cluster("deployments-proportion", timing).await;
    let spec = json!({"strategy": {"rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}});
    client.create::<Deployment>(Some("default"), &versioned("web", 10, "v1", spec)).await.unwrap();
    rolled_out(&client, "web", "v1", 30).await;
    set_version(&client, "web", "broken").await;
    let sizes = |sets: &[ReplicaSet]| -> (i32, i32) {
        let size = |suffix: &str| {
            sets.iter()
                .filter(|s| set_image(s).ends_with(suffix))
                .map(|s| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0))
                .sum()
        };
        (size(":v1"), size(":broken"))
    };
    eventually("the rollout stuck at 8 old and 5 new", 20, || async {
        (sizes(&sets_of(&client, "web").await) == (8, 5)).then_some(())
    })
    .await;
    // Nothing moves while the new pods stay unready.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sizes(&sets_of(&client, "web").await), (8, 5));
    client
        .merge_patch::<Deployment>(
            Some("default"),
            "web",
            &json!({"spec": {"replicas": 15}}),
            false,
        )
        .await
        .unwrap();
    eventually("11 old and 7 new", 20, || async {
        (sizes(&sets_of(&client, "web").await) == (11, 7)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sizes(&sets_of(&client, "web").await), (11, 7), "then it holds");
}
