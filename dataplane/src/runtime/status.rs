//! The `PodStatus` a node agent reports, computed from what its runtime knows. Pure functions:
//! the phase and readiness rules are unit-tested without processes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use super::record::{ExitRecord, PodRecord};

/// Why a container is not running right now, as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// Everything the status is computed from.
pub struct StatusInput<'a> {
    pub pod: &'a Pod,
    pub node_ip: Ipv4Addr,
    /// `None` until the sandbox (namespace + CNI ADD) exists.
    pub record: Option<&'a PodRecord>,
    /// Containers held back: not runnable, backing off, or waiting for the sandbox.
    pub waiting: &'a BTreeMap<String, Waiting>,
    /// Why the sandbox could not be made, if it could not.
    pub sandbox_error: Option<&'a str>,
    /// What the probes found about the running incarnation of each container (see `probe`).
    /// A container with no entry has no results yet.
    pub probes: &'a BTreeMap<String, ProbeResults>,
    /// For a pod with CPU or memory limits: whether this node enforces them, and how or why
    /// not (the `strait.io/ResourceLimitsEnforced` condition).
    pub limits: Option<(bool, &'a str)>,
}

/// The probe results of a container's current incarnation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeResults {
    /// The readiness probe's last result (not ready until it has succeeded).
    pub ready: bool,
    /// Whether the startup probe has succeeded.
    pub started: bool,
}

/// Whether a container that exited with `exit` starts again under `restart_policy`.
pub fn restarts(restart_policy: Option<&str>, exit: &ExitRecord) -> bool {
    match restart_policy.unwrap_or("Always") {
        "Never" => false,
        // An unknown exit code (seen after an agent restart) counts as a failure.
        "OnFailure" => exit.exit_code != Some(0),
        _ => true,
    }
}

fn time(rfc3339: &str) -> Option<Time> {
    rfc3339.parse::<Timestamp>().ok().map(Time)
}

/// The pod's status. `now` stamps conditions whose value changed since the pod's current
/// status; unchanged conditions keep their transition time, so re-reporting is a no-op.
pub fn pod_status(input: &StatusInput<'_>, now: Timestamp) -> PodStatus {
    let spec = input.pod.spec.clone().unwrap_or_default();
    let restart_policy = spec.restart_policy.as_deref();
    let previous = input.pod.status.as_ref();

    let mut statuses = Vec::new();
    let mut ready_count = 0;
    let mut ever_started = 0;
    let mut finished_for_good = 0;
    let mut failed = 0;
    for container in &spec.containers {
        let record = input.record.and_then(|r| r.containers.get(&container.name));
        let last_exit = record.and_then(|r| r.last_exit.as_ref());
        let terminated = |exit: &ExitRecord| {
            ContainerStateTerminated {
            exit_code: exit.exit_code.unwrap_or(-1),
            signal: exit.signal,
            reason: Some(match (&exit.reason, exit.exit_code) {
                (Some(reason), _) => reason.clone(),
                (None, Some(0)) => "Completed".to_owned(),
                (None, Some(_)) => "Error".to_owned(),
                (None, None) => "Unknown".to_owned(),
            }),
            message: exit.message.clone().or_else(|| exit.exit_code.is_none().then(|| {
                "the process ended while the node agent was restarting; its exit code is unknown".to_owned()
            })),
            started_at: time(&exit.started_at),
            finished_at: time(&exit.finished_at),
            container_id: None,
        }
        };
        let (state, is_running) = match (record, input.waiting.get(&container.name)) {
            (Some(r), _) if r.pid.is_some() => (
                ContainerState {
                    running: Some(ContainerStateRunning { started_at: time(&r.started_at) }),
                    ..Default::default()
                },
                true,
            ),
            (_, Some(waiting)) => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(waiting.reason.clone()),
                        message: Some(waiting.message.clone()).filter(|m| !m.is_empty()),
                    }),
                    ..Default::default()
                },
                false,
            ),
            (_, None) => match last_exit {
                Some(exit) => (
                    ContainerState { terminated: Some(terminated(exit)), ..Default::default() },
                    false,
                ),
                None => (
                    ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".to_owned()),
                            message: None,
                        }),
                        ..Default::default()
                    },
                    false,
                ),
            },
        };
        // As the kubelet decides: a container with a startup probe has started once that
        // succeeded, one with a readiness probe is ready once that succeeded; without them,
        // running is enough.
        let results = input.probes.get(&container.name).copied().unwrap_or_default();
        let started = is_running && (container.startup_probe.is_none() || results.started);
        let ready = is_running && (container.readiness_probe.is_none() || results.ready);
        if ready {
            ready_count += 1;
        }
        if record.is_some_and(|r| r.pid.is_some() || r.last_exit.is_some()) {
            ever_started += 1;
        }
        if !is_running
            && let Some(exit) = last_exit
            && !restarts(restart_policy, exit)
        {
            finished_for_good += 1;
            if exit.exit_code != Some(0) {
                failed += 1;
            }
        }
        // The last termination is shown as lastState while the container runs or waits again.
        let last_state = last_exit.filter(|_| state.terminated.is_none()).map(|exit| {
            ContainerState { terminated: Some(terminated(exit)), ..Default::default() }
        });
        statuses.push(ContainerStatus {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            image_id: String::new(),
            container_id: record.and_then(|r| r.pid).map(|pid| {
                format!(
                    "strait://{}/{}/{pid}",
                    input.pod.metadata.uid.as_deref().unwrap_or(""),
                    container.name
                )
            }),
            ready,
            started: Some(started),
            restart_count: record.map_or(0, |r| r.restart_count),
            state: Some(state),
            last_state,
            ..Default::default()
        });
    }

    let total = spec.containers.len();
    let sandbox_ready = input.record.is_some_and(|r| r.pod_ip.is_some());
    let phase = if !sandbox_ready || ever_started == 0 {
        "Pending"
    } else if total > 0 && finished_for_good == total {
        if failed == 0 { "Succeeded" } else { "Failed" }
    } else {
        "Running"
    };
    let all_ready = total > 0 && ready_count == total;

    let condition = |kind: &str, ok: bool, reason: Option<&str>, message: Option<String>| {
        let status = if ok { "True" } else { "False" }.to_owned();
        let unchanged = previous
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status);
        PodCondition {
            type_: kind.to_owned(),
            status,
            last_transition_time: unchanged
                .and_then(|c| c.last_transition_time.clone())
                .or(Some(Time(now))),
            reason: reason.map(str::to_owned),
            message,
            ..Default::default()
        }
    };
    let not_ready_reason = (!all_ready).then_some("ContainersNotReady");
    let not_ready_message = (!all_ready).then(|| {
        let names: Vec<_> = statuses.iter().filter(|s| !s.ready).map(|s| s.name.as_str()).collect();
        format!("containers with unready status: [{}]", names.join(" "))
    });
    let mut conditions = vec![
        condition(
            "PodReadyToStartContainers",
            sandbox_ready,
            input.sandbox_error.map(|_| "SandboxCreationFailed"),
            input.sandbox_error.map(str::to_owned),
        ),
        condition("Initialized", true, None, None),
        condition("Ready", all_ready, not_ready_reason, not_ready_message.clone()),
        condition("ContainersReady", all_ready, not_ready_reason, not_ready_message),
        condition("PodScheduled", true, None, None),
    ];
    if let Some((enforced, message)) = input.limits {
        let reason = if enforced { "Enforced" } else { "ControllersUnavailable" };
        conditions.push(condition(
            super::limits::LIMITS_CONDITION,
            enforced,
            Some(reason),
            Some(message.to_owned()),
        ));
    }

    let pod_ip = input.record.and_then(|r| r.pod_ip);
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        host_ip: Some(input.node_ip.to_string()),
        host_ips: Some(vec![HostIP { ip: input.node_ip.to_string() }]),
        pod_ip: pod_ip.map(|ip| ip.to_string()),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
        start_time: previous
            .and_then(|s| s.start_time.clone())
            .or_else(|| input.record.and_then(|r| time(&r.started_at))),
        container_statuses: Some(statuses),
        qos_class: previous.and_then(|s| s.qos_class.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use k8s_openapi::{
        api::core::v1::{Container, Pod, PodSpec},
        jiff::Timestamp,
    };

    use super::{ProbeResults, StatusInput, Waiting, pod_status};
    use crate::runtime::record::{ContainerRecord, ExitRecord, PodRecord};

    fn pod(policy: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                containers: vec![
                    Container { name: "a".into(), ..Default::default() },
                    Container { name: "b".into(), ..Default::default() },
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn record(a: ContainerRecord, b: ContainerRecord) -> PodRecord {
        PodRecord {
            pod_ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
            containers: [("a".to_owned(), a), ("b".to_owned(), b)].into(),
            ..Default::default()
        }
    }

    fn running(pid: u32) -> ContainerRecord {
        ContainerRecord { pid: Some(pid), ..Default::default() }
    }

    fn exited(code: i32) -> ContainerRecord {
        ContainerRecord {
            last_exit: Some(ExitRecord { exit_code: Some(code), ..Default::default() }),
            ..Default::default()
        }
    }

    fn status(
        pod: &Pod,
        record: Option<&PodRecord>,
        waiting: &BTreeMap<String, Waiting>,
    ) -> k8s_openapi::api::core::v1::PodStatus {
        status_with_probes(pod, record, waiting, &BTreeMap::new())
    }

    fn status_with_probes(
        pod: &Pod,
        record: Option<&PodRecord>,
        waiting: &BTreeMap<String, Waiting>,
        probes: &BTreeMap<String, ProbeResults>,
    ) -> k8s_openapi::api::core::v1::PodStatus {
        let input = StatusInput {
            pod,
            node_ip: Ipv4Addr::new(172, 20, 0, 11),
            record,
            waiting,
            sandbox_error: None,
            probes,
            limits: None,
        };
        pod_status(&input, Timestamp::UNIX_EPOCH)
    }

    fn condition(status: &k8s_openapi::api::core::v1::PodStatus, kind: &str) -> String {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .map(|c| c.status.clone())
            .unwrap_or_default()
    }

    #[test]
    fn pod_without_sandbox_is_pending_and_not_ready() {
        let pod = pod("Always");
        let s = status(&pod, None, &BTreeMap::new());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(condition(&s, "Ready"), "False");
        assert_eq!(s.pod_ip, None);
    }

    #[test]
    fn pod_with_every_container_running_is_running_and_ready_with_its_ip() {
        let pod = pod("Always");
        let rec = record(running(10), running(11));
        let s = status(&pod, Some(&rec), &BTreeMap::new());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(condition(&s, "Ready"), "True");
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.2"));
        assert_eq!(s.host_ip.as_deref(), Some("172.20.0.11"));
    }

    #[test]
    fn one_container_backing_off_keeps_the_pod_running_but_not_ready() {
        let pod = pod("Always");
        let rec = record(running(10), exited(1));
        let waiting = [(
            "b".to_owned(),
            Waiting { reason: "CrashLoopBackOff".into(), message: String::new() },
        )]
        .into();
        let s = status(&pod, Some(&rec), &waiting);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(condition(&s, "Ready"), "False");
        let b = &s.container_statuses.as_ref().expect("statuses")[1];
        assert_eq!(
            b.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()),
            Some("CrashLoopBackOff")
        );
        assert!(b.last_state.as_ref().is_some_and(|s| s.terminated.is_some()));
    }

    #[test]
    fn never_restarting_pods_end_succeeded_or_failed_by_exit_codes() {
        let pod = pod("Never");
        let ok = record(exited(0), exited(0));
        assert_eq!(status(&pod, Some(&ok), &BTreeMap::new()).phase.as_deref(), Some("Succeeded"));
        let bad = record(exited(0), exited(3));
        assert_eq!(status(&pod, Some(&bad), &BTreeMap::new()).phase.as_deref(), Some("Failed"));
        let pod = pod_with_policy_on_failure();
        assert_eq!(
            status(&pod, Some(&bad), &BTreeMap::new()).phase.as_deref(),
            Some("Running"),
            "OnFailure restarts the failed one"
        );
    }

    fn pod_with_policy_on_failure() -> Pod {
        pod("OnFailure")
    }

    fn with_probes(mut pod: Pod, startup: bool, readiness: bool) -> Pod {
        let spec = pod.spec.as_mut().expect("spec");
        let probe = || Some(k8s_openapi::api::core::v1::Probe::default());
        spec.containers[1].startup_probe = if startup { probe() } else { None };
        spec.containers[1].readiness_probe = if readiness { probe() } else { None };
        pod
    }

    fn container_ready(status: &k8s_openapi::api::core::v1::PodStatus, name: &str) -> bool {
        let statuses = status.container_statuses.as_ref().expect("statuses");
        statuses.iter().find(|s| s.name == name).expect("container").ready
    }

    #[test]
    fn a_container_with_a_readiness_probe_is_ready_only_once_the_probe_succeeded() {
        let pod = with_probes(pod("Always"), false, true);
        let rec = record(running(10), running(11));
        let none = BTreeMap::new();
        let s = status(&pod, Some(&rec), &none);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(container_ready(&s, "a"), "no probe: running is ready");
        assert!(!container_ready(&s, "b"), "no probe result yet");
        assert_eq!(condition(&s, "Ready"), "False");
        assert_eq!(condition(&s, "ContainersReady"), "False");

        let passed = [("b".to_owned(), ProbeResults { ready: true, started: false })].into();
        let s = status_with_probes(&pod, Some(&rec), &none, &passed);
        assert!(container_ready(&s, "b"));
        assert_eq!(condition(&s, "Ready"), "True");
        assert_eq!(condition(&s, "ContainersReady"), "True");

        let stopped = record(running(10), exited(1));
        let s = status_with_probes(&pod, Some(&stopped), &none, &passed);
        assert!(
            !container_ready(&s, "b"),
            "a stale result does not make a stopped container ready"
        );
    }

    #[test]
    fn a_container_with_a_startup_probe_has_not_started_until_it_succeeded() {
        let pod = with_probes(pod("Always"), true, false);
        let rec = record(running(10), running(11));
        let started = |s: &k8s_openapi::api::core::v1::PodStatus| {
            s.container_statuses.as_ref().expect("statuses")[1].started
        };
        let s = status(&pod, Some(&rec), &BTreeMap::new());
        assert_eq!(started(&s), Some(false));
        let results = [("b".to_owned(), ProbeResults { ready: false, started: true })].into();
        let s = status_with_probes(&pod, Some(&rec), &BTreeMap::new(), &results);
        assert_eq!(started(&s), Some(true));
        assert_eq!(condition(&s, "Ready"), "True", "without a readiness probe running is ready");
    }

    #[test]
    fn a_probe_kill_is_explained_in_the_last_termination_state() {
        let pod = pod("Always");
        let mut killed = exited(137);
        if let Some(exit) = killed.last_exit.as_mut() {
            exit.signal = Some(9);
            exit.message = Some("liveness probe failed 2 times in a row".into());
        }
        killed.pid = Some(12);
        let rec = record(running(10), killed);
        let s = status(&pod, Some(&rec), &BTreeMap::new());
        let b = &s.container_statuses.as_ref().expect("statuses")[1];
        let last = b.last_state.as_ref().and_then(|s| s.terminated.as_ref()).expect("lastState");
        assert_eq!(last.exit_code, 137);
        assert_eq!(last.message.as_deref(), Some("liveness probe failed 2 times in a row"));
    }
}
