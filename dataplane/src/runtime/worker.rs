//! One pod's worker: sandbox, containers, restarts, status and teardown of a single pod.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

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
    cni::{Attachment, POD_IFNAME},
    dns_config::{PodResolvConf, pod_resolv_conf},
    events, image,
    probe::{self, ProbeChange, ProbeEvent, ProbeTarget, ProbeTask},
    process::{self, Launch},
    record::{ContainerRecord, ExitRecord, PodRecord},
    status::{ProbeResults, StatusInput, Waiting, pod_status, restarts},
};
use crate::netns::NetNs;

/// How often a worker re-checks its pod even when nothing happened.
const RESYNC: Duration = Duration::from_secs(10);
/// First delay before restarting a container that exited; doubles up to [`MAX_BACKOFF`] and
/// resets once a container has run for [`BACKOFF_RESET`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const BACKOFF_RESET: Duration = Duration::from_secs(60);
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

struct Backoff {
    delay: Duration,
    next_start: Instant,
}

struct Worker {
    context: Arc<RuntimeContext>,
    uid: String,
    record: Option<PodRecord>,
    waiting: BTreeMap<String, Waiting>,
    backoff: HashMap<String, Backoff>,
    started: HashMap<String, Instant>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Backoff>,
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
        started: HashMap::new(),
        sandbox_error: None,
        sandbox_retry: None,
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
        for backoff in self.backoff.values() {
            wake = wake.min(backoff.next_start);
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
                        .map_or(INITIAL_BACKOFF, |b| (b.delay * 2).min(MAX_BACKOFF));
                    self.sandbox_retry =
                        Some(Backoff { delay, next_start: Instant::now() + delay });
                    return;
                }
            }
        }
        let spec = pod.spec.clone().unwrap_or_default();
        for container in &spec.containers {
            self.sync_container(pod, container, spec.restart_policy.as_deref()).await;
            self.ensure_probes(pod, container);
        }
    }

    /// Starts probing the running incarnation of `container` unless that is under way already
    /// (also for a process adopted after an agent restart, which is probed afresh).
    fn ensure_probes(&mut self, pod: &Pod, container: &Container) {
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
        let env = container_env(pod, container, record).unwrap_or_default();
        let target = ProbeTarget {
            container: name.clone(),
            pid,
            pod_ip,
            ports: container.ports.clone().unwrap_or_default(),
            netns_path: crate::netns::named_path(&record.netns),
            cgroup_procs: self.context.pod_cgroup(&self.uid).child(name).procs_file(),
            env,
            hostname: record.name.clone(),
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
        let made = async {
            cgroup
                .create()
                .map_err(|e| format!("creating cgroup {}: {e}", cgroup.path().display()))?;
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
        restart_policy: Option<&str>,
    ) {
        let name = container.name.clone();
        let Some(record) = self.record.as_ref() else { return };
        let existing = record.containers.get(&name).cloned().unwrap_or_default();
        if existing.pid.is_some() {
            return;
        }
        if let Some(exit) = &existing.last_exit
            && !restarts(restart_policy, exit)
        {
            self.waiting.remove(&name);
            return;
        }
        if let Some(backoff) = self.backoff.get(&name)
            && Instant::now() < backoff.next_start
        {
            let message = format!(
                "back-off {:?} restarting failed container={name} pod={}",
                backoff.delay, record.name
            );
            self.set_waiting(&name, "CrashLoopBackOff", message);
            return;
        }
        let env = match container_env(pod, container, record) {
            Ok(env) => env,
            Err(message) => {
                self.set_waiting(&name, "CreateContainerConfigError", message);
                return;
            }
        };
        let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
        let (program, args) = match image::executable(container, &self.context.strait_exe, path_var)
        {
            Ok(executable) => executable,
            Err(refused) => {
                self.set_waiting(&name, refused.reason, refused.message);
                return;
            }
        };
        let resolv_conf = match self.resolv_conf(pod, record) {
            Ok(resolv_conf) => resolv_conf,
            Err((reason, message)) => {
                self.set_waiting(&name, reason, message);
                return;
            }
        };
        let cgroup = self.context.pod_cgroup(&self.uid).child(&name);
        if let Err(error) = cgroup.create() {
            self.set_waiting(
                &name,
                "RunContainerError",
                format!("creating cgroup {}: {error}", cgroup.path().display()),
            );
            return;
        }
        let launch = Launch {
            program,
            args,
            env,
            working_dir: container.working_dir.as_ref().map(PathBuf::from),
            netns_path: crate::netns::named_path(&record.netns),
            cgroup_procs: cgroup.procs_file(),
            hostname: record.name.clone(),
            log_path: self.pod_log_dir(record).join(format!("{name}.log")),
            resolv_conf,
        };
        let mut child = match process::spawn(&launch) {
            Ok(child) => child,
            Err(error) => {
                self.set_waiting(&name, "RunContainerError", format!("{error}"));
                self.bump_backoff(&name, Duration::ZERO);
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
        let restarted = existing.last_exit.is_some();
        let Some(record) = self.record.as_mut() else { return };
        record.containers.insert(
            name.clone(),
            ContainerRecord {
                pid: Some(pid),
                start_ticks: process::process_start_ticks(pid).unwrap_or_default(),
                started_at: now(),
                restart_count: existing.restart_count + i32::from(restarted),
                last_exit: existing.last_exit,
            },
        );
        self.started.insert(name.clone(), Instant::now());
        self.waiting.remove(&name);
        self.report_pending = true;
        self.save();
        tracing::info!(uid = %self.uid, container = %name, pid, "container started");
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

    fn bump_backoff(&mut self, name: &str, ran_for: Duration) {
        let delay = match self.backoff.get(name) {
            Some(previous) if ran_for < BACKOFF_RESET => (previous.delay * 2).min(MAX_BACKOFF),
            _ => INITIAL_BACKOFF,
        };
        self.backoff.insert(name.to_owned(), Backoff { delay, next_start: Instant::now() + delay });
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(record) = self.record.as_mut() else { return };
        let Some(container) = record.containers.get_mut(&exit.container) else { return };
        if container.pid != Some(exit.pid) {
            return;
        }
        tracing::info!(uid = %self.uid, container = %exit.container, code = ?exit.exit_code, "container exited");
        container.pid = None;
        container.last_exit = Some(ExitRecord {
            exit_code: exit.exit_code,
            signal: exit.signal,
            started_at: container.started_at.clone(),
            finished_at: now(),
            message: self.kill_reasons.remove(&(exit.container.clone(), exit.pid)),
        });
        self.probe_tasks.remove(&exit.container);
        self.probe_results.remove(&exit.container);
        let ran_for = self.started.remove(&exit.container).map_or(Duration::ZERO, |t| t.elapsed());
        self.bump_backoff(&exit.container, ran_for);
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
        };
        let status = pod_status(&input, Timestamp::now());
        // Conditions keep their transition times from the last report, so an unchanged pod
        // computes the same status and nothing is sent.
        // The stored Ready condition is compared too: the node lifecycle controller sets it
        // False while the node is unreachable, and a node that comes back must correct it.
        let ready_of = |status: Option<&PodStatus>| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.status.clone())
        };
        let stored_agrees = ready_of(pod.status.as_ref()) == ready_of(Some(&status));
        if !self.report_pending && self.last_reported.as_ref() == Some(&status) && stored_agrees {
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
        let mut delay = INITIAL_BACKOFF;
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
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}

/// The environment of a container: defaults, then its `env` with `value` and the `fieldRef`s
/// that the node knows.
fn container_env(
    pod: &Pod,
    container: &Container,
    record: &PodRecord,
) -> Result<Vec<(String, String)>, String> {
    let mut env = vec![
        (
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("HOSTNAME".to_owned(), record.name.clone()),
    ];
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            value.clone()
        } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
            match field.field_path.as_str() {
                "metadata.name" => record.name.clone(),
                "metadata.namespace" => record.namespace.clone(),
                "metadata.uid" => record.uid.clone(),
                "spec.nodeName" => {
                    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
                }
                "spec.serviceAccountName" => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                "status.podIP" => record.pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                "status.hostIP" => {
                    pod.status.as_ref().and_then(|s| s.host_ip.clone()).unwrap_or_default()
                }
                other => {
                    return Err(format!("env {}: fieldRef {other} is not supported", var.name));
                }
            }
        } else if var.value_from.is_some() {
            return Err(format!("env {}: only value and fieldRef are supported so far", var.name));
        } else {
            String::new()
        };
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}
