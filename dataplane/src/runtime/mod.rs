//! The process runtime: runs the pods bound to this node.
//!
//! Each pod has one worker task (see `worker.rs`) that owns its sandbox (network namespace +
//! CNI attachment + cgroup), its container processes and its status, and converges them to the
//! latest [`PodTarget`]. One worker per pod means the same pod is never acted on twice at once;
//! a newer target simply replaces an older one the worker has not looked at yet.

pub mod backoff;
pub mod cni;
pub mod dns_config;
pub mod env;
pub mod events;
pub mod image;
pub mod limits;
pub mod logs;
pub mod mounts;
pub mod probe;
pub mod process;
pub mod record;
pub mod status;
pub mod volumes;
mod worker;

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use strait_controlplane::{api::kinds::config_map, client::ApiClient};
use tokio::{sync::watch, task::JoinHandle};

use crate::cgroup::Cgroup;

/// What the runtime needs, shared by every pod worker.
pub struct RuntimeContext {
    pub api: ApiClient,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// Prefix of pod namespace names, e.g. `strait-` or `strait-<lab>-`.
    pub netns_prefix: String,
    /// Parent cgroup of the pods: `<agent cgroup root>/pods`, where the socket load balancer's
    /// hooks are attached.
    pub pods_cgroup: Cgroup,
    /// Parent cgroup of the pods annotated [`SOCKET_LB_ANNOTATION`]` = disabled`: no socket
    /// hooks, so their service traffic is translated per packet on their veth instead.
    pub pods_cgroup_without_socket_lb: Cgroup,
    /// Where the containers' log shims run (see `logs.rs`).
    pub log_shims_cgroup: Cgroup,
    pub records: record::RecordStore,
    /// Container logs, one directory per pod (see `logs.rs`).
    pub log_dir: PathBuf,
    /// How container log files rotate.
    pub log_rotation: logs::LogRotation,
    /// The `strait` executable, which also carries the built-in `strait/netexec` workload.
    pub strait_exe: PathBuf,
    /// The CNI plugin with this node's configuration; `None` until the node has a podCIDR.
    pub cni: watch::Receiver<Option<cni::CniInvoker>>,
    /// The cluster DNS address that `ClusterFirst` pods get as their nameserver; `None` leaves
    /// such pods the node's `/etc/resolv.conf` (see [`dns_config`]).
    pub cluster_dns: Option<Ipv4Addr>,
    /// The cluster domain, e.g. `cluster.local`, for the pods' DNS search list.
    pub cluster_domain: String,
    /// The ConfigMaps this node's pods use, as NodeSync sent them.
    pub config_maps: ConfigMaps,
    /// The crash-loop back-off of containers.
    pub restart_backoff: backoff::BackoffPolicy,
    /// The cgroup v2 controllers the pods' cgroups have (for their limits).
    pub controllers: limits::Controllers,
    /// What `resourceFieldRef`s see as the limit of a container without one.
    pub node_allocatable: env::NodeAllocatable,
}

/// The ConfigMaps that the pods of this node use, by `namespace/name`, as the controller sent
/// them (see `nodesync.rs`). A ConfigMap missing here does not exist, or no longer does.
#[derive(Debug, Default)]
pub struct ConfigMaps(RwLock<HashMap<String, Arc<ConfigMap>>>);

impl ConfigMaps {
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<ConfigMap>> {
        self.read().get(&format!("{namespace}/{name}")).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ConfigMap>>> {
        // Writers only insert and remove whole entries: a poisoned map is still consistent.
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, key: &str, config_map: Option<Arc<ConfigMap>>) {
        let mut map = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match config_map {
            Some(config_map) => map.insert(key.to_owned(), config_map),
            None => map.remove(key),
        };
    }
}

/// Annotation by which a pod opts out of socket-level load balancing (`disabled`): its
/// connections to services keep the VIP as their destination and are translated per packet by
/// the tc programs on its veth, as service meshes that redirect traffic themselves need.
pub const SOCKET_LB_ANNOTATION: &str = "strait.io/socket-lb";

/// Whether a pod opted out of socket-level load balancing.
pub fn socket_lb_disabled(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOCKET_LB_ANNOTATION))
        .is_some_and(|value| value == "disabled")
}

impl RuntimeContext {
    /// The cgroup a new pod gets, by its socket load-balancing choice.
    pub fn new_pod_cgroup(&self, pod: &Pod, uid: &str) -> Cgroup {
        if socket_lb_disabled(pod) {
            self.pods_cgroup_without_socket_lb.child(uid)
        } else {
            self.pods_cgroup.child(uid)
        }
    }

    /// The cgroup of an existing pod: under whichever parent it was created.
    pub fn pod_cgroup(&self, uid: &str) -> Cgroup {
        let opted_out = self.pods_cgroup_without_socket_lb.child(uid);
        if opted_out.exists() { opted_out } else { self.pods_cgroup.child(uid) }
    }

    /// The name of a pod's network namespace.
    pub fn pod_netns(&self, uid: &str) -> String {
        format!("{}pod-{uid}", self.netns_prefix)
    }
}

/// What a pod's worker should converge to.
#[derive(Clone, Debug)]
pub enum PodTarget {
    /// Keep what exists as it is and watch it (adopted after a restart, before the first
    /// snapshot from the controller says what is wanted).
    Hold,
    /// Run this pod.
    Run(Arc<Pod>),
    /// Stop it gracefully, then remove the pod object (it has a deletionTimestamp).
    Terminate(Arc<Pod>),
    /// It is no longer bound here: stop it and forget it.
    Remove,
}

struct WorkerHandle {
    target: watch::Sender<PodTarget>,
    task: JoinHandle<()>,
    /// The ConfigMaps (`namespace/name`) its pod uses: a change to one wakes the worker.
    config_maps: BTreeSet<String>,
}

fn config_maps_of(pod: &Pod) -> BTreeSet<String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    config_map::used_by(pod).into_iter().map(|name| format!("{namespace}/{name}")).collect()
}

/// The set of pod workers of this node.
pub struct PodRuntime {
    context: Arc<RuntimeContext>,
    workers: Mutex<HashMap<String, WorkerHandle>>,
}

impl PodRuntime {
    pub fn new(context: RuntimeContext) -> Self {
        Self { context: Arc::new(context), workers: Mutex::new(HashMap::new()) }
    }

    pub fn context(&self) -> &Arc<RuntimeContext> {
        &self.context
    }

    /// Starts a worker for every pod record on disk, holding its processes as they are until
    /// [`PodRuntime::apply`] says what is wanted. Returns how many pods were adopted.
    pub fn adopt_existing(&self) -> std::io::Result<usize> {
        let records = self.context.records.load_all()?;
        let count = records.len();
        let mut workers = self.lock();
        for record in records {
            let uid = record.uid.clone();
            let (target, receiver) = watch::channel(PodTarget::Hold);
            let task = tokio::spawn(worker::run(
                self.context.clone(),
                uid.clone(),
                receiver,
                Some(record),
            ));
            workers.insert(uid, WorkerHandle { target, task, config_maps: BTreeSet::new() });
        }
        Ok(count)
    }

    /// Points each pod's worker at its new target, starting workers for new pods. With
    /// `complete`, `desired` is everything this node should run (a snapshot) and every other
    /// worker is told to remove its pod.
    pub fn apply(&self, desired: &HashMap<String, Arc<Pod>>, complete: bool) {
        let mut workers = self.lock();
        workers.retain(|_, handle| !handle.task.is_finished());
        for (uid, pod) in desired {
            let target = if pod.metadata.deletion_timestamp.is_some() {
                PodTarget::Terminate(pod.clone())
            } else {
                PodTarget::Run(pod.clone())
            };
            match workers.get_mut(uid) {
                Some(handle) => {
                    handle.config_maps = config_maps_of(pod);
                    handle.target.send_replace(target);
                }
                None => {
                    let (sender, receiver) = watch::channel(target);
                    let task = tokio::spawn(worker::run(
                        self.context.clone(),
                        uid.clone(),
                        receiver,
                        None,
                    ));
                    let config_maps = config_maps_of(pod);
                    workers.insert(uid.clone(), WorkerHandle { target: sender, task, config_maps });
                }
            }
        }
        if complete {
            for (uid, handle) in workers.iter() {
                if !desired.contains_key(uid) {
                    handle.target.send_replace(PodTarget::Remove);
                }
            }
        }
    }

    /// Takes in new versions of ConfigMaps (`None`: gone) and wakes the workers of the pods that
    /// use them, which update their `configMap` volumes and retry containers that waited for a
    /// missing ConfigMap or key. Call it before [`PodRuntime::apply`] for the same update.
    pub fn update_config_maps(&self, changes: &[(String, Option<Arc<ConfigMap>>)]) {
        for (key, config_map) in changes {
            self.context.config_maps.set(key, config_map.clone());
        }
        let workers = self.lock();
        for handle in workers.values() {
            if changes.iter().any(|(key, _)| handle.config_maps.contains(key)) {
                // Same target, marked as changed: the worker converges again.
                handle.target.send_modify(|_| {});
            }
        }
    }

    /// Tells the worker of `uid`, if any, that the pod is gone from this node.
    pub fn remove(&self, uid: &str) {
        if let Some(handle) = self.lock().get(uid) {
            handle.target.send_replace(PodTarget::Remove);
        }
    }

    /// Pods with a live worker.
    pub fn active_pods(&self) -> usize {
        self.lock().values().filter(|handle| !handle.task.is_finished()).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkerHandle>> {
        // A panicking worker never holds this lock; recover the map rather than stop the node.
        self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
