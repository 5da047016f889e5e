//! One pod's worker: sandbox, containers, restarts, status and teardown of a single pod.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use strait_controlplane::events::{Occurrence, container_reference};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodStatus},
    jiff::Timestamp,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    PodTarget, RuntimeContext,
    backoff::RestartBackoff,
    cni::{Attachment, POD_IFNAME},
    dns_config::{PodResolvConf, pod_resolv_conf},
    env::{self, Environment, PodFacts},
    events, image, limits, logs, mounts,
    probe::{self, ProbeChange, ProbeEvent, ProbeTarget, ProbeTask},
    process::{self, Launch},
    record::{ContainerRecord, ExitRecord, PodRecord},
    status::{ProbeResults, StatusInput, Waiting, pod_status, restarts},
    volumes::{self, VolumePath},
};
use crate::netns::NetNs;

/// How often a worker re-checks its pod even when nothing happened.
const RESYNC: Duration = Duration::from_secs(10);
/// First delay before retrying a pod sandbox that could not be made, or the removal of a
/// stopped pod's object; doubles up to [`MAX_RETRY`]. (Containers follow the crash-loop
/// back-off of `backoff.rs`.)
const INITIAL_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How long to wait for processes to disappear after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A container process that ended.
#[derive(Debug)]
struct Exit {
    container: String,
    pid: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
}

struct Retry {
    delay: Duration,
    next_start: Instant,
}

struct Worker {
    context: Arc<RuntimeContext>,
    uid: String,
    record: Option<PodRecord>,
    waiting: BTreeMap<String, Waiting>,
    /// The crash-loop back-off of each container.
    backoff: HashMap<String, RestartBackoff>,
    /// When each container that is to start again exited (or failed to start).
    exited_at: HashMap<String, Instant>,
    started: HashMap<String, Instant>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Retry>,
    /// The pod's restartPolicy as last seen.
    restart_policy: Option<String>,
    /// The `oom_kill` count of each container's cgroup when it started.
    oom_kills_at_start: HashMap<String, u64>,
    /// Why the pod's limits are not enforced (`None` when they are, or it has none), and
    /// whether the pod has limits at all.
    limits: Option<(bool, String)>,
    last_reported: Option<PodStatus>,
    report_pending: bool,
    exits: mpsc::UnboundedSender<Exit>,
    /// One probe task per running container that has probes, for the incarnation it probes.
    probe_tasks: HashMap<String, ProbeTask>,
    /// What the probes found about each container's current incarnation.
    probe_results: BTreeMap<String, ProbeResults>,
    /// Why the agent killed a container incarnation (name, pid), shown once it has exited.
    kill_reasons: HashMap<(String, u32), String>,
    probe_events: mpsc::UnboundedSender<ProbeEvent>,
}

pub(super) async fn run(
    context: Arc<RuntimeContext>,
    uid: String,
    mut target: watch::Receiver<PodTarget>,
    adopted: Option<PodRecord>,
) {
    let (exits, mut exit_events) = mpsc::unbounded_channel();
    let (probe_events, mut probe_results) = mpsc::unbounded_channel();
    let mut worker = Worker {
        context: context.clone(),
        uid,
        record: None,
        waiting: BTreeMap::new(),
        backoff: HashMap::new(),
        exited_at: HashMap::new(),
        started: HashMap::new(),
        sandbox_error: None,
        sandbox_retry: None,
        restart_policy: None,
        oom_kills_at_start: HashMap::new(),
        limits: None,
        last_reported: None,
        report_pending: false,
        exits,
        probe_tasks: HashMap::new(),
        probe_results: BTreeMap::new(),
        kill_reasons: HashMap::new(),
        probe_events,
    };
    if let Some(record) = adopted {
        worker.adopt(record);
    }
    let mut cni = context.cni.clone();
    let mut last_pod: Option<Arc<Pod>> = None;
    loop {
        let current = target.borrow_and_update().clone();
        match current {
            PodTarget::Hold => {}
            PodTarget::Run(pod) => {
                worker.sync(&pod).await;
                let before = worker.last_reported.clone().or_else(|| pod.status.clone());
                worker.report(&pod).await;
                if let Some(after) = &worker.last_reported {
                    events::post(&context, events::status_changes(&pod, before.as_ref(), after));
                }
                last_pod = Some(pod);
            }
            PodTarget::Terminate(pod) => {
                let reported = worker.last_reported.as_ref().or(pod.status.as_ref());
                events::post(&context, events::stopping(&pod, reported));
                let grace = grace_period(&pod);
                if worker.terminate(grace, &mut exit_events).await {
                    worker.remove_pod_object(&pod, &mut target).await;
                    return;
                }
            }
            PodTarget::Remove => {
                let grace = last_pod.as_deref().map_or(Duration::from_secs(30), grace_period);
                if worker.terminate(grace, &mut exit_events).await {
                    return;
                }
            }
        }
        let wake = worker.next_wakeup();
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    // The runtime is going away (agent shutdown): leave the pod running, a
                    // restarted agent adopts it.
                    return;
                }
            }
            Some(exit) = exit_events.recv() => worker.on_exit(exit),
            // Back to the top of the loop at once: a readiness change is reported right away,
            // as endpoints follow it.
            Some(event) = probe_results.recv() => worker.on_probe(event),
            _ = tokio::time::sleep_until(wake) => {}
            _ = cni.changed() => {}
        }
    }
}

fn grace_period(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(seconds.max(0) as u64)
}

fn now() -> String {
    Timestamp::now().to_string()
}

impl Worker {
    fn pod_log_dir(&self, record: &PodRecord) -> PathBuf {
        self.context.log_dir.join(format!("{}_{}_{}", record.namespace, record.name, record.uid))
    }

    /// Takes over a pod found on disk: processes still alive are watched again; the others
    /// are recorded as exited with an unknown code.
    fn adopt(&mut self, mut record: PodRecord) {
        for (name, container) in record.containers.iter_mut() {
            let Some(pid) = container.pid else { continue };
            if process::is_same_process_alive(pid, container.start_ticks) {
                let exits = self.exits.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(error) = process::wait_for_exit_of(pid).await {
                        tracing::warn!(pid, %error, "cannot watch an adopted container; treating it as exited");
                    }
                    let _ =
                        exits.send(Exit { container: name, pid, exit_code: None, signal: None });
                });
            } else {
                container.pid = None;
                container.last_exit = Some(ExitRecord {
                    exit_code: None,
                    signal: None,
                    started_at: container.started_at.clone(),
                    finished_at: now(),
                    message: None,
                    reason: None,
                });
            }
        }
        tracing::info!(uid = %record.uid, pod = %format!("{}/{}", record.namespace, record.name), "adopted pod");
        self.record = Some(record);
        self.save();
    }

    fn save(&self) {
        if let Some(record) = &self.record
            && let Err(error) = self.context.records.save(record)
        {
            tracing::error!(uid = %self.uid, %error, "cannot save the pod record");
        }
    }

    fn next_wakeup(&self) -> Instant {
        let mut wake = Instant::now() + RESYNC;
        let policy = &self.context.restart_backoff;
        for (name, exited) in &self.exited_at {
            let backoff = self.backoff.get(name).copied().unwrap_or_default();
            wake = wake.min(backoff.restart_at(policy, *exited));
        }
        if let Some(retry) = &self.sandbox_retry {
            wake = wake.min(retry.next_start);
        }
        wake
    }

    /// Converges the sandbox and the containers to `pod`.
    async fn sync(&mut self, pod: &Pod) {
        if self.record.as_ref().is_none_or(|r| r.pod_ip.is_none()) {
            if self.sandbox_retry.as_ref().is_some_and(|r| Instant::now() < r.next_start) {
                return;
            }
            match self.create_sandbox(pod).await {
                Ok(()) => {
                    self.sandbox_error = None;
                    self.sandbox_retry = None;
                }
                Err(error) => {
                    tracing::warn!(uid = %self.uid, %error, "cannot create the pod sandbox");
                    self.sandbox_error = Some(error);
                    let delay = self
                        .sandbox_retry
                        .as_ref()
                        .map_or(INITIAL_RETRY, |b| (b.delay * 2).min(MAX_RETRY));
                    self.sandbox_retry = Some(Retry { delay, next_start: Instant::now() + delay });
                    return;
                }
            }
        }
        let spec = pod.spec.clone().unwrap_or_default();
        self.restart_policy = spec.restart_policy.clone();
        self.check_limits(pod);
        let Some(pod_dir) = self.record.as_ref().map(|r| self.context.records.pod_dir(&r.uid))
        else {
            return;
        };
        let context = self.context.clone();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let lookup = move |name: &str| context.config_maps.get(&namespace, name);
        // Every sync: idempotent, and it brings configMap volumes up to date.
        let volume_paths = match volumes::prepare(pod, &pod_dir, &lookup) {
            Ok(paths) => paths,
            Err(error) => {
                // Shown as the containers' waiting message (and so as a FailedMount event).
                let message = error.to_string();
                for container in &spec.containers {
                    if self.is_running(&container.name) {
                        continue;
                    }
                    self.set_waiting(&container.name, "ContainerCreating", message.clone());
                }
                return;
            }
        };
        for container in &spec.containers {
            self.sync_container(pod, container, &volume_paths, &lookup).await;
            self.ensure_probes(pod, container, &lookup);
        }
    }

    fn is_running(&self, name: &str) -> bool {
        self.record.as_ref().and_then(|r| r.containers.get(name)).is_some_and(|c| c.pid.is_some())
    }

    /// Notes whether the pod's CPU and memory limits can be enforced on this node (shown as a
    /// condition of the pod, and so as a LimitsNotEnforced event).
    fn check_limits(&mut self, pod: &Pod) {
        let spec = pod.spec.clone().unwrap_or_default();
        let needed = limits::needed(&spec);
        if needed == limits::Controllers::default() {
            self.limits = None;
            return;
        }
        self.limits = Some(match limits::not_enforced(needed, self.context.controllers) {
            Some(why) => (false, why),
            None => {
                (true, "CPU and memory limits are enforced through the pod's cgroup".to_owned())
            }
        });
    }

    /// The environment of a container, or why it cannot be made.
    fn environment(
        &self,
        pod: &Pod,
        container: &Container,
        lookup: &(dyn Fn(&str) -> Option<Arc<ConfigMap>> + Sync),
    ) -> Result<Environment, String> {
        let pod_ip = self.record.as_ref().and_then(|r| r.pod_ip);
        let facts = PodFacts { pod_ip, host_ip: self.context.node_ip };
        env::container_env(pod, container, &facts, &self.context.node_allocatable, lookup)
    }

    /// Starts probing the running incarnation of `container` unless that is under way already
    /// (also for a process adopted after an agent restart, which is probed afresh).
    fn ensure_probes(
        &mut self,
        pod: &Pod,
        container: &Container,
        lookup: &(dyn Fn(&str) -> Option<Arc<ConfigMap>> + Sync),
    ) {
        let name = &container.name;
        let Some(record) = self.record.as_ref() else { return };
        let (Some(pod_ip), Some(pid)) =
            (record.pod_ip, record.containers.get(name).and_then(|c| c.pid))
        else {
            return;
        };
        if !probe::has_probes(container)
            || self.probe_tasks.get(name).is_some_and(|task| task.pid() == pid)
        {
            return;
        }
        // The container started with this environment; only a changed pod could make it fail
        // now, and an exec probe then runs with the defaults.
        let env = self.environment(pod, container, lookup).unwrap_or_default().vars;
        let target = ProbeTarget {
            container: name.clone(),
            pid,
            pod_ip,
            ports: container.ports.clone().unwrap_or_default(),
            netns_path: crate::netns::named_path(&record.netns),
            cgroup_procs: self.context.pod_cgroup(&self.uid).child(name).procs_file(),
            env,
            hostname: record.name.clone(),
            mount_namespace: PathBuf::from(format!("/proc/{pid}/ns/mnt")),
        };
        let started_at = self.started.get(name).copied().unwrap_or_else(Instant::now);
        let task = probe::spawn(container, target, started_at, self.probe_events.clone());
        self.probe_results.insert(name.clone(), ProbeResults::default());
        self.probe_tasks.insert(name.clone(), task);
        self.report_pending = true;
    }

    /// Takes in a probe result about a container incarnation that is still the current one.
    fn on_probe(&mut self, event: ProbeEvent) {
        let current = self
            .record
            .as_ref()
            .and_then(|r| r.containers.get(&event.container))
            .and_then(|c| c.pid);
        if current != Some(event.pid) {
            return;
        }
        let results = self.probe_results.entry(event.container.clone()).or_default();
        match event.change {
            ProbeChange::Ready(ready) => {
                tracing::info!(uid = %self.uid, container = %event.container, ready, "readiness changed");
                results.ready = ready;
            }
            ProbeChange::Started => results.started = true,
            ProbeChange::Kill { kind, message } => {
                tracing::info!(uid = %self.uid, container = %event.container, pid = event.pid, probe = kind.name(), %message, "killing the container to restart it");
                results.ready = false;
                self.kill_reasons.insert((event.container.clone(), event.pid), message);
                // Its exit then arrives as any other (on_exit), and restartPolicy and back-off
                // decide what follows. cgroup.kill takes whatever the container started too.
                let cgroup = self.context.pod_cgroup(&self.uid).child(&event.container);
                let uid = self.uid.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = cgroup.kill_all(KILL_TIMEOUT) {
                        tracing::error!(%uid, %error, "cannot kill a container whose probe failed");
                    }
                });
            }
        }
    }

    async fn create_sandbox(&mut self, pod: &Pod) -> Result<(), String> {
        let cni = self
            .context
            .cni
            .borrow()
            .clone()
            .ok_or_else(|| "waiting for this node's podCIDR".to_owned())?;
        // A record without an address is a sandbox an earlier attempt (or agent) left half-made.
        if let Some(stale) = self.record.take() {
            self.teardown_sandbox(&stale).await?;
        }
        let netns = self.context.pod_netns(&self.uid);
        NetNs::delete(&netns).map_err(|e| format!("{e:#}"))?;
        let namespace = NetNs::create(&netns).map_err(|e| format!("{e:#}"))?;
        let cgroup = self.context.new_pod_cgroup(pod, &self.uid);
        let mut record = PodRecord {
            uid: self.uid.clone(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            netns: netns.clone(),
            pod_ip: None,
            cni_result: None,
            started_at: now(),
            containers: BTreeMap::new(),
        };
        // Recorded before ADD, so that an agent killed during ADD finds it and cleans it up.
        self.record = Some(record.clone());
        self.save();
        let attachment = self.attachment(&record, namespace.path());
        let controllers = self.context.controllers;
        let pod_limits = limits::pod_limits(&pod.spec.clone().unwrap_or_default());
        let made = async {
            cgroup
                .create()
                .map_err(|e| format!("creating cgroup {}: {e}", cgroup.path().display()))?;
            // Before any process is in it: the containers' cgroups get the controllers too.
            limits::enable_in(cgroup.path(), &limits::names(controllers))
                .and_then(|()| limits::apply(&cgroup, &pod_limits, controllers))
                .map_err(|e| format!("setting the pod's limits: {e}"))?;
            std::fs::create_dir_all(self.pod_log_dir(&record))
                .map_err(|e| format!("creating the log directory: {e}"))?;
            cni.add(&attachment).await.map_err(|e| format!("{e:#}"))
        }
        .await;
        match made {
            Ok(result) => {
                tracing::info!(uid = %self.uid, ip = %result.pod_ip, netns = %netns, "pod sandbox ready");
                record.pod_ip = Some(result.pod_ip);
                record.cni_result = Some(result.raw);
                self.record = Some(record);
                self.save();
                self.report_pending = true;
                Ok(())
            }
            Err(error) => {
                let cleanup = self.teardown_sandbox(&record).await;
                self.record = None;
                if let Err(cleanup_error) = cleanup {
                    // Keep the record so the next attempt (or the next agent) retries the cleanup.
                    self.record = Some(record);
                    return Err(format!("{error}; and cleaning up: {cleanup_error}"));
                }
                Err(error)
            }
        }
    }

    fn attachment(&self, record: &PodRecord, netns_path: PathBuf) -> Attachment {
        Attachment {
            container_id: record.uid.clone(),
            netns_path,
            ifname: POD_IFNAME.to_owned(),
            args: vec![
                ("IgnoreUnknown".to_owned(), "1".to_owned()),
                ("K8S_POD_NAMESPACE".to_owned(), record.namespace.clone()),
                ("K8S_POD_NAME".to_owned(), record.name.clone()),
                ("K8S_POD_UID".to_owned(), record.uid.clone()),
            ],
        }
    }

    /// Undoes a sandbox: CNI DEL, namespace, cgroup, logs, record. Processes must be gone.
    async fn teardown_sandbox(&self, record: &PodRecord) -> Result<(), String> {
        let cni = self.context.cni.borrow().clone();
        if let Some(cni) = cni {
            let attachment = self.attachment(record, crate::netns::named_path(&record.netns));
            cni.del(&attachment, record.cni_result.as_ref()).await.map_err(|e| format!("{e:#}"))?;
        } else if record.pod_ip.is_some() {
            return Err("cannot run CNI DEL before this node's podCIDR is known".to_owned());
        }
        NetNs::delete(&record.netns).map_err(|e| format!("{e:#}"))?;
        let cgroup = self.context.pod_cgroup(&record.uid);
        cgroup.remove().map_err(|e| format!("removing cgroup {}: {e}", cgroup.path().display()))?;
        match std::fs::remove_dir_all(self.pod_log_dir(record)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing logs: {e}"));
            }
            _ => {}
        }
        volumes::unmount_all_below(&self.context.records.pod_dir(&record.uid))
            .map_err(|e| format!("unmounting the pod's volumes: {e}"))?;
        self.context
            .records
            .remove_pod_dir(&record.uid)
            .map_err(|e| format!("removing the pod's files: {e}"))?;
        self.context
            .records
            .remove(&record.uid)
            .map_err(|e| format!("removing the pod record: {e}"))
    }

    async fn sync_container(
        &mut self,
        pod: &Pod,
        container: &Container,
        volume_paths: &BTreeMap<String, VolumePath>,
        lookup: &(dyn Fn(&str) -> Option<Arc<ConfigMap>> + Sync),
    ) {
        let name = container.name.clone();
        let Some(record) = self.record.as_ref() else { return };
        let existing = record.containers.get(&name).cloned().unwrap_or_default();
        if existing.pid.is_some() {
            return;
        }
        let restart_policy = self.restart_policy.clone();
        if let Some(exit) = &existing.last_exit
            && !restarts(restart_policy.as_deref(), exit)
        {
            self.waiting.remove(&name);
            self.exited_at.remove(&name);
            return;
        }
        let policy = self.context.restart_backoff;
        if let Some(exited) = self.exited_at.get(&name).copied() {
            let backoff = self.backoff.get(&name).copied().unwrap_or_default();
            if Instant::now() < backoff.restart_at(&policy, exited) {
                let delay = backoff.delay(&policy, exited);
                let pod_id = format!("{}_{}({})", record.name, record.namespace, record.uid);
                let message =
                    format!("back-off {delay:?} restarting failed container={name} pod={pod_id}");
                self.set_waiting(&name, "CrashLoopBackOff", message);
                return;
            }
        }
        let environment = match self.environment(pod, container, lookup) {
            Ok(environment) => environment,
            Err(message) => {
                self.config_error(&name, message);
                return;
            }
        };
        if !environment.warnings.is_empty() {
            let occurrences = environment
                .warnings
                .iter()
                .map(|warning| {
                    Occurrence::warning(
                        container_reference(pod, &name),
                        "InvalidEnvironmentVariableNames",
                        warning.clone(),
                    )
                })
                .collect();
            events::post(&self.context, occurrences);
        }
        let mount_plan = volumes::container_mounts(container, volume_paths, &environment)
            .and_then(|requests| mounts::plan(&mounts::NodeFiles, &requests));
        let mount_plan = match mount_plan {
            Ok(plan) => plan,
            Err(message) => {
                self.config_error(&name, message);
                return;
            }
        };
        // `$(VAR)` in command and args, with the container's environment (as the kubelet).
        let mut expanded = container.clone();
        for list in [&mut expanded.command, &mut expanded.args].into_iter().flatten() {
            for item in list.iter_mut() {
                *item = env::expand(item, &environment);
            }
        }
        let (program, args) =
            match image::executable(&expanded, &self.context.strait_exe, environment.get("PATH")) {
                Ok(executable) => executable,
                Err(refused) => {
                    self.set_waiting(&name, refused.reason, refused.message);
                    return;
                }
            };
        let Some(record) = self.record.as_ref() else { return };
        let resolv_conf = match self.resolv_conf(pod, record) {
            Ok(resolv_conf) => resolv_conf,
            Err((reason, message)) => {
                self.set_waiting(&name, reason, message);
                return;
            }
        };
        let scaffold_dir = self.context.records.pod_dir(&self.uid).join("containers").join(&name);
        let cgroup = self.context.pod_cgroup(&self.uid).child(&name);
        let prepared = std::fs::create_dir_all(&scaffold_dir)
            .map_err(|e| format!("creating {}: {e}", scaffold_dir.display()))
            .and_then(|()| {
                cgroup
                    .create()
                    .map_err(|e| format!("creating cgroup {}: {e}", cgroup.path().display()))
            })
            .and_then(|()| {
                let limits = limits::container_limits(container);
                limits::apply(&cgroup, &limits, self.context.controllers)
                    .map_err(|e| format!("setting the container's limits: {e}"))
            });
        // Each incarnation logs to a file of its own, numbered by its restart count, so the
        // one before stays readable (`kubectl logs --previous`).
        let restarted = existing.last_exit.is_some();
        let restart_count = existing.restart_count + i32::from(restarted);
        let log_dir = logs::container_dir(&self.pod_log_dir(record), &name);
        let prepared = prepared.and_then(|()| {
            std::fs::create_dir_all(&log_dir)
                .map_err(|e| format!("creating the log directory {}: {e}", log_dir.display()))
        });
        if let Err(message) = prepared {
            self.set_waiting(&name, "RunContainerError", message);
            return;
        }
        let launch = Launch {
            program,
            args,
            env: environment.vars,
            working_dir: container
                .working_dir
                .as_ref()
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            netns_path: crate::netns::named_path(&record.netns),
            cgroup_procs: cgroup.procs_file(),
            hostname: record.name.clone(),
            log_path: logs::incarnation_path(&log_dir, restart_count.max(0).unsigned_abs()),
            log_rotation: self.context.log_rotation,
            log_shim_cgroup_procs: self.context.log_shims_cgroup.procs_file(),
            resolv_conf,
            mounts: mount_plan,
            scaffold_dir,
        };
        let oom_kills = limits::oom_kills(&cgroup);
        let mut child = match process::spawn(&launch, &self.context.strait_exe) {
            Ok(child) => child,
            Err(error) => {
                let message = format!("{error}");
                self.set_waiting(&name, "RunContainerError", message);
                // A start that fails is retried after the back-off, as an exit would be.
                let now = Instant::now();
                let exited = self.exited_at.get(&name).copied().unwrap_or(now);
                self.backoff.entry(name.clone()).or_default().restarted(&policy, exited, now);
                self.exited_at.insert(name.clone(), now);
                return;
            }
        };
        let Some(pid) = child.id() else {
            self.set_waiting(
                &name,
                "RunContainerError",
                "the process exited before it could be watched".to_owned(),
            );
            return;
        };
        let exits = self.exits.clone();
        let watched = name.clone();
        tokio::spawn(async move {
            let (exit_code, signal) = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    (status.code().or_else(|| status.signal().map(|s| 128 + s)), status.signal())
                }
                Err(_) => (None, None),
            };
            let _ = exits.send(Exit { container: watched, pid, exit_code, signal });
        });
        let started = Instant::now();
        if let Some(exited) = self.exited_at.remove(&name) {
            self.backoff.entry(name.clone()).or_default().restarted(&policy, exited, started);
        }
        self.oom_kills_at_start.insert(name.clone(), oom_kills);
        let Some(record) = self.record.as_mut() else { return };
        record.containers.insert(
            name.clone(),
            ContainerRecord {
                pid: Some(pid),
                start_ticks: process::process_start_ticks(pid).unwrap_or_default(),
                started_at: now(),
                restart_count,
                last_exit: existing.last_exit,
            },
        );
        self.started.insert(name.clone(), started);
        self.waiting.remove(&name);
        self.report_pending = true;
        self.save();
        tracing::info!(uid = %self.uid, container = %name, pid, "container started");
    }

    /// A container that cannot be configured (a missing ConfigMap or key, a bad mount): it
    /// waits with reason `CreateContainerConfigError`, as in Kubernetes.
    fn config_error(&mut self, name: &str, message: String) {
        self.set_waiting(name, "CreateContainerConfigError", message);
    }

    /// The pod's own resolv.conf, (re)written to its directory unless it already says this (see
    /// `dns_config`), or `None` for the node's file. The error is a waiting reason and message.
    fn resolv_conf(
        &self,
        pod: &Pod,
        record: &PodRecord,
    ) -> Result<Option<PathBuf>, (&'static str, String)> {
        let spec = pod.spec.clone().unwrap_or_default();
        let wanted = pod_resolv_conf(
            &spec,
            &record.namespace,
            self.context.cluster_dns,
            &self.context.cluster_domain,
        )
        .map_err(|message| ("CreateContainerConfigError", message))?;
        match wanted {
            PodResolvConf::Node => Ok(None),
            PodResolvConf::Own(text) => {
                self.context.records.write_resolv_conf(&record.uid, &text).map(Some).map_err(|e| {
                    ("RunContainerError", format!("writing the pod's resolv.conf: {e}"))
                })
            }
        }
    }

    fn set_waiting(&mut self, name: &str, reason: &str, message: String) {
        let waiting = Waiting { reason: reason.to_owned(), message };
        if self.waiting.get(name) != Some(&waiting) {
            self.waiting.insert(name.to_owned(), waiting);
            self.report_pending = true;
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(record) = self.record.as_mut() else { return };
        let Some(container) = record.containers.get_mut(&exit.container) else { return };
        if container.pid != Some(exit.pid) {
            return;
        }
        tracing::info!(uid = %self.uid, container = %exit.container, code = ?exit.exit_code, "container exited");
        // The kernel's OOM killer took a process of this container since it started.
        let cgroup = self.context.pod_cgroup(&self.uid).child(&exit.container);
        let baseline = self.oom_kills_at_start.remove(&exit.container).unwrap_or(u64::MAX);
        let oom_killed = limits::oom_kills(&cgroup) > baseline;
        container.pid = None;
        let exit_record = ExitRecord {
            exit_code: exit.exit_code,
            signal: exit.signal,
            started_at: container.started_at.clone(),
            finished_at: now(),
            message: self.kill_reasons.remove(&(exit.container.clone(), exit.pid)),
            reason: oom_killed.then(|| "OOMKilled".to_owned()),
        };
        let restarts_again = restarts(self.restart_policy.as_deref(), &exit_record);
        container.last_exit = Some(exit_record);
        self.probe_tasks.remove(&exit.container);
        self.probe_results.remove(&exit.container);
        self.started.remove(&exit.container);
        if restarts_again {
            self.exited_at.insert(exit.container.clone(), Instant::now());
        }
        self.report_pending = true;
        self.save();
    }

    /// Reports the pod's status when it changed (or the last report failed).
    async fn report(&mut self, pod: &Pod) {
        let mut basis = pod.clone();
        if let Some(reported) = &self.last_reported {
            basis.status = Some(reported.clone());
        }
        let input = StatusInput {
            pod: &basis,
            node_ip: self.context.node_ip,
            record: self.record.as_ref(),
            waiting: &self.waiting,
            sandbox_error: self.sandbox_error.as_deref(),
            probes: &self.probe_results,
            limits: self.limits.as_ref().map(|(enforced, message)| (*enforced, message.as_str())),
        };
        let status = pod_status(&input, Timestamp::now());
        // Conditions keep their transition times from the last report, so an unchanged pod
        // computes the same status and nothing is sent.
        if !self.report_pending && self.last_reported.as_ref() == Some(&status) {
            return;
        }
        let namespace = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let patch = serde_json::json!({ "status": status });
        match self.context.api.merge_patch::<Pod>(namespace, name, &patch, true).await {
            Ok(_) => {
                self.last_reported = Some(status);
                self.report_pending = false;
            }
            Err(error) => {
                tracing::warn!(uid = %self.uid, %error, "cannot report pod status; will retry");
                self.report_pending = true;
            }
        }
    }

    /// Stops every process of the pod (SIGTERM, then SIGKILL after `grace`) and undoes the
    /// sandbox. Returns false if something could not be undone (it is retried later).
    async fn terminate(
        &mut self,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<Exit>,
    ) -> bool {
        let Some(record) = self.record.clone() else { return true };
        // No probe runs against a pod that is going away: no exec probe starts in its cgroup
        // and no liveness failure restarts a container being stopped. Its endpoints turn
        // not-ready from the deletionTimestamp (the EndpointSlice controller's `terminating`).
        self.probe_tasks.clear();
        // Nothing of the pod starts again while it stops.
        self.exited_at.clear();
        let cgroup = self.context.pod_cgroup(&self.uid);
        if let Err(error) = cgroup.signal_all(nix::sys::signal::Signal::SIGTERM) {
            tracing::warn!(uid = %self.uid, %error, "cannot send SIGTERM to the pod");
        }
        let deadline = Instant::now() + grace;
        while cgroup.is_populated().unwrap_or(false) && Instant::now() < deadline {
            tokio::select! {
                Some(exit) = exits.recv() => self.on_exit(exit),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let killer = cgroup.clone();
        let killed = tokio::task::spawn_blocking(move || killer.kill_all(KILL_TIMEOUT)).await;
        if !matches!(killed, Ok(Ok(()))) {
            tracing::error!(uid = %self.uid, "processes of the pod survived SIGKILL");
            return false;
        }
        match self.teardown_sandbox(&record).await {
            Ok(()) => {
                tracing::info!(uid = %self.uid, pod = %format!("{}/{}", record.namespace, record.name), "pod stopped and its sandbox removed");
                self.record = None;
                true
            }
            Err(error) => {
                tracing::error!(uid = %self.uid, %error, "cannot remove the pod sandbox; will retry");
                false
            }
        }
    }

    /// The final step of a graceful delete: the agent has stopped the pod and tells the API
    /// it may go (grace 0, only this incarnation of the name).
    async fn remove_pod_object(&self, pod: &Pod, target: &mut watch::Receiver<PodTarget>) {
        let namespace = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let mut delay = INITIAL_RETRY;
        loop {
            match self
                .context
                .api
                .delete_with_uid::<Pod>(namespace, name, Some(0), pod.metadata.uid.as_deref())
                .await
            {
                Ok(_) => return,
                // 409: the name now belongs to another pod; this one is gone already.
                Err(error) if error.code() == Some(409) => return,
                Err(error) => {
                    tracing::warn!(uid = %self.uid, %error, "cannot remove the pod object; will retry")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = target.changed() => if changed.is_err() { return },
            }
            if matches!(*target.borrow(), PodTarget::Remove) {
                return;
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }
}
