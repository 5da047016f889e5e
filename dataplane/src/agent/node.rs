//! The node's own Node object (registration, addresses, capacity, the Ready condition) and
//! its Lease, the heartbeat the node lifecycle controller watches.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
            NodeSystemInfo,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use strait_controlplane::{
    api::kinds::lease::NODE_LEASE_NAMESPACE,
    client::{ApiClient, ClientError},
};

/// What the agent says about its node.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub address: Ipv4Addr,
    /// The log server's port, announced as the node's `daemonEndpoints.kubeletEndpoint`.
    pub log_port: Option<u16>,
}

/// The agent's version, shown as the node's runtime and kubelet version.
pub const AGENT_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "-strait");

fn system_info() -> NodeSystemInfo {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname.as_ref().map(|u| f(u).to_string_lossy().into_owned()).unwrap_or_default()
    };
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|release| {
            release.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "Linux".to_owned());
    let machine_id =
        std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim().to_owned();
    NodeSystemInfo {
        architecture: match std::env::consts::ARCH {
            "x86_64" => "amd64".to_owned(),
            "aarch64" => "arm64".to_owned(),
            other => other.to_owned(),
        },
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        container_runtime_version: format!("strait://{}", env!("CARGO_PKG_VERSION")),
        kernel_version: field(nix::sys::utsname::UtsName::release),
        kube_proxy_version: String::new(),
        kubelet_version: AGENT_VERSION.to_owned(),
        machine_id,
        operating_system: "linux".to_owned(),
        os_image,
        system_uuid: String::new(),
        ..Default::default()
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// What the node offers its pods, as its Node reports it (`status.allocatable`), for the
/// downward API's defaults; ephemeral storage is the size of the file system of `state_dir`.
pub fn allocatable(state_dir: &std::path::Path) -> crate::runtime::env::NodeAllocatable {
    let ephemeral_storage =
        nix::sys::statvfs::statvfs(state_dir).map_or(0, |fs| fs.blocks() * fs.fragment_size());
    crate::runtime::env::NodeAllocatable {
        cpu_milli: cpus() as u64 * 1000,
        memory: memory_kib() * 1024,
        ephemeral_storage,
    }
}

fn capacity() -> BTreeMap<String, Quantity> {
    let (cpus, memory_kib) = (cpus(), memory_kib());
    [
        ("cpu".to_owned(), Quantity(cpus.to_string())),
        ("memory".to_owned(), Quantity(format!("{memory_kib}Ki"))),
        ("pods".to_owned(), Quantity("110".to_owned())),
    ]
    .into()
}

/// Merges the agent's own view (addresses, capacity, system info, Ready) into a status,
/// keeping conditions that others own and transition times that did not change.
fn merge_status(
    identity: &NodeIdentity,
    current: Option<NodeStatus>,
    ready: bool,
    message: &str,
) -> NodeStatus {
    let now = Time(Timestamp::now());
    let mut status = current.unwrap_or_default();
    status.addresses = Some(vec![
        NodeAddress { type_: "InternalIP".to_owned(), address: identity.address.to_string() },
        NodeAddress { type_: "Hostname".to_owned(), address: identity.name.clone() },
    ]);
    status.daemon_endpoints = identity.log_port.map(|port| NodeDaemonEndpoints {
        kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(port) }),
    });
    status.capacity = Some(capacity());
    status.allocatable = Some(capacity());
    status.node_info = Some(system_info());
    let wanted = if ready { "True" } else { "False" };
    let mut conditions = status.conditions.take().unwrap_or_default();
    let previous = conditions.iter().find(|c| c.type_ == "Ready").cloned();
    conditions.retain(|c| c.type_ != "Ready");
    let transition = previous
        .filter(|c| c.status == wanted)
        .and_then(|c| c.last_transition_time)
        .unwrap_or_else(|| now.clone());
    conditions.push(NodeCondition {
        type_: "Ready".to_owned(),
        status: wanted.to_owned(),
        reason: Some(if ready { "StraitAgentReady" } else { "StraitAgentStarting" }.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now),
        last_transition_time: Some(transition),
    });
    status.conditions = Some(conditions);
    status
}

/// What [`register`] found.
pub struct Registration {
    pub node: Node,
    /// Whether this call created the Node (a new node) rather than finding it (a restart).
    pub created: bool,
}

/// Creates the Node if it does not exist. An existing Node (an agent restart, or a node
/// re-joining) is kept with its podCIDR.
pub async fn register(
    api: &ApiClient,
    identity: &NodeIdentity,
) -> Result<Registration, ClientError> {
    if let Some(node) = api.get::<Node>(None, &identity.name).await? {
        return Ok(Registration { node, created: false });
    }
    let node = Node {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_owned(), identity.name.clone()),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ("kubernetes.io/arch".to_owned(), system_info().architecture),
                ]
                .into(),
            ),
            ..Default::default()
        },
        status: Some(merge_status(identity, None, false, "the node agent is starting")),
        ..Default::default()
    };
    match api.create(None, &node).await {
        Ok(created) => Ok(Registration { node: created, created: true }),
        // Registered concurrently (a restart racing the previous instance): take that one.
        Err(error) if error.code() == Some(409) => {
            let node = api.get::<Node>(None, &identity.name).await?.ok_or(error)?;
            Ok(Registration { node, created: false })
        }
        Err(error) => Err(error),
    }
}

/// A status without its heartbeat times: what decides whether a write is needed.
fn without_heartbeats(status: &NodeStatus) -> NodeStatus {
    let mut status = status.clone();
    for condition in status.conditions.iter_mut().flatten() {
        condition.last_heartbeat_time = None;
    }
    status
}

/// Keeps the node's status current, as the kubelet does: the stored Node is read every
/// [`StatusReporter::sync`], and written only when what the agent would write differs from it
/// (the Ready condition changed, the controller marked the node Unknown while the agent was
/// unreachable, an address moved) or when `refresh` has passed since the last write. The
/// node's liveness is its [`NodeLease`], not these writes.
pub struct StatusReporter {
    api: ApiClient,
    identity: NodeIdentity,
    refresh: Duration,
    last_write: Option<tokio::time::Instant>,
}

impl StatusReporter {
    pub fn new(api: ApiClient, identity: NodeIdentity, refresh: Duration) -> Self {
        Self { api, identity, refresh, last_write: None }
    }

    /// Reads the Node and writes its status if needed, read-modify-write with optimistic
    /// concurrency so that conditions and taints written by the controller are kept. Returns
    /// whether it wrote.
    pub async fn sync(&mut self, ready: bool, message: &str) -> Result<bool, ClientError> {
        for _attempt in 0..5 {
            let Some(mut node) = self.api.get::<Node>(None, &self.identity.name).await? else {
                register(&self.api, &self.identity).await?;
                continue;
            };
            let current = node.status.take();
            let wanted = merge_status(&self.identity, current.clone(), ready, message);
            let changed =
                current.as_ref().map(without_heartbeats) != Some(without_heartbeats(&wanted));
            let due = self.last_write.is_none_or(|at| at.elapsed() >= self.refresh);
            if !changed && !due {
                return Ok(false);
            }
            node.status = Some(wanted);
            match self.api.replace_status(None, &self.identity.name, &node).await {
                Ok(_) => {
                    self.last_write = Some(tokio::time::Instant::now());
                    return Ok(true);
                }
                Err(error) if error.code() == Some(409) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::Status {
            method: http::Method::PUT,
            path: ApiClient::object_path::<Node>(None, &self.identity.name),
            code: 409,
            reason: "Conflict".to_owned(),
            message: "the node status kept changing under five attempts".to_owned(),
        })
    }
}

/// The node's Lease in `kube-node-lease` (named after the node, held by it): created when
/// missing, then renewed with a fresh `renewTime` every few seconds. The last written version
/// is kept, so a renewal is a single PUT; a conflict or a missing lease falls back to a read.
pub struct NodeLease {
    api: ApiClient,
    node: String,
    /// The Node's uid, for the lease's owner reference (the lease goes with its node).
    node_uid: Option<String>,
    duration_seconds: i32,
    latest: Option<Lease>,
}

impl NodeLease {
    pub fn new(api: ApiClient, node: &str, node_uid: Option<String>, duration: Duration) -> Self {
        let duration_seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
        Self { api, node: node.to_owned(), node_uid, duration_seconds, latest: None }
    }

    fn renewed(&self, mut lease: Lease) -> Lease {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.node.clone());
        spec.lease_duration_seconds = Some(self.duration_seconds);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease
    }

    /// Renews the lease (creating it if needed).
    pub async fn renew(&mut self) -> Result<(), ClientError> {
        let namespace = Some(NODE_LEASE_NAMESPACE);
        if let Some(latest) = self.latest.take() {
            let lease = self.renewed(latest.clone());
            match self.api.replace(namespace, &self.node, &lease).await {
                Ok(written) => {
                    self.latest = Some(written);
                    return Ok(());
                }
                // Someone else wrote it, or it was deleted: start again from the server's.
                Err(error) if matches!(error.code(), Some(404 | 409)) => {}
                Err(error) => {
                    self.latest = Some(latest);
                    return Err(error);
                }
            }
        }
        let written = match self.api.get::<Lease>(namespace, &self.node).await? {
            Some(current) => {
                let lease = self.renewed(current);
                self.api.replace(namespace, &self.node, &lease).await?
            }
            None => {
                let owner = self.node_uid.clone().map(|uid| OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "Node".to_owned(),
                    name: self.node.clone(),
                    uid,
                    ..OwnerReference::default()
                });
                let lease = self.renewed(Lease {
                    metadata: ObjectMeta {
                        name: Some(self.node.clone()),
                        namespace: Some(NODE_LEASE_NAMESPACE.to_owned()),
                        owner_references: owner.map(|o| vec![o]),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                });
                self.api.create(namespace, &lease).await?
            }
        };
        self.latest = Some(written);
        Ok(())
    }
}
