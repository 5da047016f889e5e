//! The events a node agent reports about its pods, told apart from two successive statuses of
//! a pod (what the worker reported before and what it reports now), so that the runtime only
//! hands over its statuses and the rules live here:
//!
//! - `Created` and `Started`: a container runs a new incarnation;
//! - `OOMKilled`: a container's last exit was the kernel's OOM kill (over its memory limit);
//! - `BackOff`: a container waits in `CrashLoopBackOff` after a new exit;
//! - `Failed`: a container cannot start (`CreateContainerConfigError`, `RunContainerError`, …);
//! - `Unhealthy` and `Killing`: a liveness or startup probe failure killed a container, or
//!   its readiness probe failed while it kept running;
//! - `FailedCreatePodSandBox`: the pod's network could not be set up;
//! - `FailedMount`: a volume of the pod could not be set up (`MountVolume.SetUp failed …`);
//! - `LimitsNotEnforced`: the pod has CPU or memory limits this node cannot enforce;
//! - `Killing` (stopping): the pod is being deleted.
//!
//! Events are posted in the background through the API, aggregated by name (see
//! `strait_controlplane::events`).

use k8s_openapi::api::core::v1::{ContainerStatus, EventSource, Pod, PodStatus};
use strait_controlplane::events::{
    Occurrence, container_reference, object_reference, post_through_api,
};

use super::{RuntimeContext, limits::LIMITS_CONDITION};

/// The source Kubernetes tooling expects node events from.
const COMPONENT: &str = "kubelet";

/// Waiting reasons that are steps of a normal start, not failures.
const STARTING: [&str; 3] = ["ContainerCreating", "PodInitializing", "CrashLoopBackOff"];

fn container<'a>(status: Option<&'a PodStatus>, name: &str) -> Option<&'a ContainerStatus> {
    status?.container_statuses.as_ref()?.iter().find(|c| c.name == name)
}

fn running_since(status: Option<&ContainerStatus>) -> Option<String> {
    let running = status?.state.as_ref()?.running.as_ref()?;
    Some(running.started_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default())
}

fn waiting(status: Option<&ContainerStatus>) -> Option<(String, String)> {
    let waiting = status?.state.as_ref()?.waiting.as_ref()?;
    Some((waiting.reason.clone().unwrap_or_default(), waiting.message.clone().unwrap_or_default()))
}

/// The last termination of a container (its current state if terminated, else lastState):
/// when it finished and the agent's message about it.
fn last_termination(status: Option<&ContainerStatus>) -> Option<(String, Option<String>)> {
    let status = status?;
    let terminated = status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| status.last_state.as_ref()?.terminated.as_ref())?;
    let finished = terminated.finished_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    Some((finished, terminated.message.clone()))
}

/// The reason of a container's last termination (`OOMKilled`, `Error`, …).
fn last_termination_reason(status: &ContainerStatus) -> Option<&str> {
    let terminated = status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| status.last_state.as_ref()?.terminated.as_ref())?;
    terminated.reason.as_deref()
}

/// How the message of a volume that cannot be set up begins (see `volumes.rs`).
const MOUNT_FAILED: &str = "MountVolume.SetUp failed";

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// What happened to `pod` between the statuses `before` and `after`.
pub fn status_changes(pod: &Pod, before: Option<&PodStatus>, after: &PodStatus) -> Vec<Occurrence> {
    let mut occurrences = Vec::new();
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    for now in after.container_statuses.iter().flatten() {
        let name = now.name.as_str();
        let reference = || container_reference(pod, name);
        let then = container(before, name);

        let termination = last_termination(Some(now));
        let new_termination = termination.is_some() && termination != last_termination(then);
        if let (true, Some((_, Some(message)))) = (new_termination, &termination) {
            // The agent writes a message on the exits it caused: "<kind> probe failed …".
            for kind in ["liveness", "startup"] {
                if let Some(detail) = message.strip_prefix(&format!("{kind} probe failed")) {
                    occurrences.push(Occurrence::warning(
                        reference(),
                        "Unhealthy",
                        format!("{} probe failed{detail}", capitalized(kind)),
                    ));
                    occurrences.push(Occurrence::normal(
                        reference(),
                        "Killing",
                        format!("Container {name} failed {kind} probe, will be restarted"),
                    ));
                }
            }
        }

        if new_termination && last_termination_reason(now) == Some("OOMKilled") {
            occurrences.push(Occurrence::warning(
                reference(),
                "OOMKilled",
                format!("Container {name} was killed: out of memory (over its memory limit)"),
            ));
        }

        let since = running_since(Some(now));
        if since.is_some() && since != running_since(then) {
            // strait creates and starts a container in one step; both are told, as the
            // kubelet does.
            occurrences.push(Occurrence::normal(
                reference(),
                "Created",
                format!("Created container {name}"),
            ));
            occurrences.push(Occurrence::normal(
                reference(),
                "Started",
                format!("Started container {name}"),
            ));
        }

        if let Some((reason, message)) = waiting(Some(now)) {
            let was = waiting(then);
            if reason == "CrashLoopBackOff"
                && (was.as_ref().map(|(r, _)| r.as_str()) != Some("CrashLoopBackOff")
                    || new_termination)
            {
                occurrences.push(Occurrence::warning(
                    reference(),
                    "BackOff",
                    format!("Back-off restarting failed container {name} in pod {pod_name}_{namespace}({uid})"),
                ));
            } else if !STARTING.contains(&reason.as_str())
                && was != Some((reason.clone(), message.clone()))
            {
                let detail = if message.is_empty() { reason } else { message };
                occurrences.push(Occurrence::warning(
                    reference(),
                    "Failed",
                    format!("Error: {detail}"),
                ));
            }
        }

        // Still the same running incarnation, no longer ready: its readiness probe failed.
        let has_readiness =
            containers.iter().any(|c| c.name == name && c.readiness_probe.is_some());
        if has_readiness
            && since.is_some()
            && since == running_since(then)
            && then.is_some_and(|t| t.ready)
            && !now.ready
        {
            occurrences.push(Occurrence::warning(
                reference(),
                "Unhealthy",
                "Readiness probe failed",
            ));
        }
    }

    // A volume that cannot be set up keeps every container that waits for it creating, with
    // the same message: one event for the pod.
    let mount_failures = |status: Option<&PodStatus>| -> Vec<String> {
        let mut messages: Vec<String> = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| waiting(Some(c)))
            .filter(|(reason, message)| {
                reason == "ContainerCreating" && message.starts_with(MOUNT_FAILED)
            })
            .map(|(_, message)| message)
            .collect();
        messages.dedup();
        messages
    };
    let mounts_before = mount_failures(before);
    for message in mount_failures(Some(after)) {
        if !mounts_before.contains(&message) {
            occurrences.push(Occurrence::warning(object_reference(pod), "FailedMount", message));
        }
    }

    let limits_not_enforced = |status: Option<&PodStatus>| {
        status?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == LIMITS_CONDITION && c.status == "False")?
            .message
            .clone()
    };
    if let Some(message) = limits_not_enforced(Some(after))
        && limits_not_enforced(before).as_ref() != Some(&message)
    {
        occurrences.push(Occurrence::warning(object_reference(pod), "LimitsNotEnforced", message));
    }

    let sandbox_failure = |status: Option<&PodStatus>| {
        status?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "PodReadyToStartContainers" && c.status == "False")?
            .message
            .clone()
    };
    if let Some(message) = sandbox_failure(Some(after))
        && sandbox_failure(before).as_ref() != Some(&message)
    {
        occurrences.push(Occurrence::warning(
            object_reference(pod),
            "FailedCreatePodSandBox",
            format!("Failed to create pod sandbox: {message}"),
        ));
    }
    occurrences
}

/// `Killing` for every container still running in `status`, as the pod is being stopped.
pub fn stopping(pod: &Pod, status: Option<&PodStatus>) -> Vec<Occurrence> {
    status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| running_since(Some(c)).is_some())
        .map(|c| {
            Occurrence::normal(
                container_reference(pod, &c.name),
                "Killing",
                format!("Stopping container {}", c.name),
            )
        })
        .collect()
}

/// Posts `occurrences` about pods of this node in the background; a failure is logged, never
/// holds the pod's worker up.
pub fn post(context: &RuntimeContext, occurrences: Vec<Occurrence>) {
    if occurrences.is_empty() {
        return;
    }
    let api = context.api.clone();
    let source = EventSource {
        component: Some(COMPONENT.to_owned()),
        host: Some(context.node_name.clone()),
    };
    tokio::spawn(async move {
        for occurrence in occurrences {
            if let Err(error) = post_through_api(&api, &source, &occurrence).await {
                tracing::debug!(%error, reason = occurrence.reason, "cannot post a pod event");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Pod, PodStatus};
    use serde_json::json;

    use super::{status_changes, stopping};

    fn pod(readiness: bool) -> Pod {
        let mut container = json!({"name": "app", "image": "strait/netexec"});
        if readiness {
            container["readinessProbe"] = json!({"tcpSocket": {"port": 8080}});
        }
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "team", "uid": "u1"},
            "spec": {"containers": [container]},
        }))
        .unwrap()
    }

    fn status(container: serde_json::Value) -> PodStatus {
        serde_json::from_value(json!({"containerStatuses": [container]})).unwrap()
    }

    fn reasons(pod: &Pod, before: Option<&PodStatus>, after: &PodStatus) -> Vec<(String, String)> {
        status_changes(pod, before, after).into_iter().map(|o| (o.reason, o.message)).collect()
    }

    fn running(since: &str, ready: bool) -> serde_json::Value {
        json!({"name": "app", "image": "", "imageID": "", "restartCount": 0, "ready": ready,
               "state": {"running": {"startedAt": since}}})
    }

    #[test]
    fn a_new_incarnation_is_started_once() {
        let pod = pod(false);
        let creating = status(json!({"name": "app", "image": "", "imageID": "", "restartCount": 0,
            "ready": false, "state": {"waiting": {"reason": "ContainerCreating"}}}));
        let up = status(running("2026-01-01T00:00:00Z", true));
        assert_eq!(
            reasons(&pod, Some(&creating), &up),
            [
                ("Created".into(), "Created container app".into()),
                ("Started".into(), "Started container app".into())
            ]
        );
        assert!(reasons(&pod, Some(&up), &up).is_empty(), "the same status again reports nothing");
        assert!(reasons(&pod, Some(&creating), &creating).is_empty());
        let again = status(running("2026-01-01T00:01:00Z", true));
        assert_eq!(reasons(&pod, Some(&up), &again)[1].0, "Started");
    }

    #[test]
    fn crash_loops_back_off_once_per_exit_and_config_errors_fail() {
        let pod = pod(false);
        let backing_off = |finished: &str, message: &str| {
            status(
                json!({"name": "app", "image": "", "imageID": "", "restartCount": 1, "ready": false,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
                "lastState": {"terminated": {"exitCode": 1, "finishedAt": finished}}}),
            )
        };
        let up = status(running("2026-01-01T00:00:00Z", true));
        let first = backing_off("2026-01-01T00:00:05Z", "back-off 1s");
        assert_eq!(
            reasons(&pod, Some(&up), &first),
            [(
                "BackOff".into(),
                "Back-off restarting failed container app in pod web_team(u1)".into()
            )]
        );
        assert!(
            reasons(&pod, Some(&first), &backing_off("2026-01-01T00:00:05Z", "back-off 1s"))
                .is_empty()
        );
        let second = backing_off("2026-01-01T00:00:09Z", "back-off 2s");
        assert_eq!(reasons(&pod, Some(&first), &second)[0].0, "BackOff");

        let config_error =
            status(json!({"name": "app", "image": "", "imageID": "", "restartCount": 0,
            "ready": false, "state": {"waiting": {"reason": "CreateContainerConfigError",
            "message": "configmap \"settings\" not found"}}}));
        assert_eq!(
            reasons(&pod, None, &config_error),
            [("Failed".into(), "Error: configmap \"settings\" not found".into())]
        );
        assert!(reasons(&pod, Some(&config_error), &config_error).is_empty());
    }

    #[test]
    fn probe_failures_are_unhealthy_and_liveness_kills() {
        let up = status(running("2026-01-01T00:00:00Z", true));
        let killed = status(json!({"name": "app", "image": "", "imageID": "", "restartCount": 1,
            "ready": true, "state": {"running": {"startedAt": "2026-01-01T00:00:31Z"}},
            "lastState": {"terminated": {"exitCode": 137, "finishedAt": "2026-01-01T00:00:30Z",
                "message": "liveness probe failed 3 times in a row: connection refused"}}}));
        let found = reasons(&pod(false), Some(&up), &killed);
        assert_eq!(
            found,
            [
                (
                    "Unhealthy".into(),
                    "Liveness probe failed 3 times in a row: connection refused".into()
                ),
                ("Killing".into(), "Container app failed liveness probe, will be restarted".into()),
                ("Created".into(), "Created container app".into()),
                ("Started".into(), "Started container app".into()),
            ]
        );
        let unready = status(running("2026-01-01T00:00:00Z", false));
        assert_eq!(
            reasons(&pod(true), Some(&up), &unready),
            [("Unhealthy".into(), "Readiness probe failed".into())]
        );
        assert!(reasons(&pod(false), Some(&up), &unready).is_empty(), "no probe, no probe event");
    }

    #[test]
    fn sandbox_failures_and_stopping_are_reported() {
        let pod = pod(false);
        let failing: PodStatus = serde_json::from_value(json!({"conditions": [{
            "type": "PodReadyToStartContainers", "status": "False",
            "message": "waiting for this node's podCIDR"}]}))
        .unwrap();
        let found = reasons(&pod, None, &failing);
        assert_eq!(found[0].0, "FailedCreatePodSandBox");
        assert!(found[0].1.ends_with("waiting for this node's podCIDR"));
        assert!(reasons(&pod, Some(&failing), &failing).is_empty());

        let up = status(running("2026-01-01T00:00:00Z", true));
        let stops = stopping(&pod, Some(&up));
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].reason, "Killing");
        assert_eq!(stops[0].message, "Stopping container app");
        assert_eq!(stops[0].involved.field_path.as_deref(), Some("spec.containers{app}"));
    }

    #[test]
    fn oom_kills_failed_mounts_and_unenforced_limits_are_reported_once() {
        let pod = pod(false);
        let up = status(running("2026-01-01T00:00:00Z", true));
        let oom = status(json!({"name": "app", "image": "", "imageID": "", "restartCount": 1,
            "ready": false, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                "finishedAt": "2026-01-01T00:00:30Z"}}}));
        let found = reasons(&pod, Some(&up), &oom);
        assert_eq!(found[0].0, "OOMKilled");
        assert_eq!(found[1].0, "BackOff");
        assert!(reasons(&pod, Some(&oom), &oom).is_empty());

        let message = "MountVolume.SetUp failed for volume \"h\" : hostPath type check failed";
        let mounting: PodStatus = serde_json::from_value(json!({
            "containerStatuses": [
                {"name": "app", "image": "", "imageID": "", "restartCount": 0, "ready": false,
                 "state": {"waiting": {"reason": "ContainerCreating", "message": message}}},
                {"name": "side", "image": "", "imageID": "", "restartCount": 0, "ready": false,
                 "state": {"waiting": {"reason": "ContainerCreating", "message": message}}},
            ],
            "conditions": [{"type": "strait.io/ResourceLimitsEnforced", "status": "False",
                "message": "limits not enforced: no memory controller"}],
        }))
        .unwrap();
        let found = reasons(&pod, None, &mounting);
        assert_eq!(
            found,
            [
                ("FailedMount".into(), message.into()),
                ("LimitsNotEnforced".into(), "limits not enforced: no memory controller".into()),
            ],
            "one FailedMount for the pod, not one per container"
        );
        assert!(reasons(&pod, Some(&mounting), &mounting).is_empty());
    }
}
