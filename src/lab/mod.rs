//! The lab: a whole strait cluster on one machine, built from network namespaces.
//!
//! ```text
//!   root namespace ── 127.0.0.1:<port> ──┐ (a listener of the controller; no route)
//!                                        ▼
//!   strait-<lab>_fabric:  bridge fabric0 172.20.0.1/24  ◀── controller (REST + NodeSync)
//!        │ node-1          │ node-2          │ node-3        (veth pairs)
//!   strait-<lab>_node-1  strait-<lab>_node-2  strait-<lab>_node-3
//!     eth0 172.20.0.11     eth0 172.20.0.12     eth0 172.20.0.13   ◀── one agent each
//!     pods: strait-<lab>_pod-<uid>, veth + /32 route, podCIDR 10.244.x.0/24
//! ```
//!
//! The root namespace gets nothing: no link, no route, no sysctl. kubectl reaches the API
//! through a loopback socket of the controller opened in the root namespace; the agents reach it
//! through a socket opened inside the fabric namespace. Every process of the lab runs in the
//! cgroup `strait/<lab>`, so `lab down` stops them all with one `cgroup.kill`.

mod exec;
mod up;

use std::{
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use strait_dataplane::{cgroup::Cgroup, ebpf::BPFFS_ROOT, netns::NetNs};

pub use exec::{exec_in_node, exec_in_pod};
pub use up::{
    ControlPlaneOptions, LabProcess, MAX_CONTROLLERS, UpOptions, is_node_ready, kill, log_tails,
    restart, set_node_link, start, up, up_with, wait_until_ready,
};

/// Where labs keep their state (store, logs, kubeconfig, CNI allocations). Under /run: a lab
/// does not survive a reboot (its namespaces do not either), and neither does its state.
pub const LABS_DIR: &str = "/run/strait/labs";
/// The fabric (underlay) subnet of every lab; labs are isolated from each other by namespaces.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// The controller's address on the fabric.
pub const CONTROLLER_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 1);
/// The port the controller serves on inside the lab (replica N of several: this + N - 1).
pub const CONTROLLER_PORT: u16 = 6443;
/// Most nodes a lab can have: node addresses are 172.20.0.11 … 172.20.0.250.
pub const MAX_NODES: usize = 240;

/// A lab's name: a DNS label of at most 20 characters, because it becomes part of namespace,
/// cgroup and pin names. It cannot contain `_`, which is what keeps names of different labs
/// apart (`strait-<lab>_…`).
pub fn validate_lab_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 20
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "lab name {name:?} is not valid: use 1-20 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

/// The prefix of every network namespace of a lab.
pub fn netns_prefix(lab: &str) -> String {
    format!("strait-{lab}_")
}

pub fn fabric_netns(lab: &str) -> String {
    format!("{}fabric", netns_prefix(lab))
}

pub fn node_netns(lab: &str, node: &str) -> String {
    format!("{}{node}", netns_prefix(lab))
}

pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

pub fn node_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 20, 0, 10 + index as u8)
}

pub fn lab_dir(lab: &str) -> PathBuf {
    Path::new(LABS_DIR).join(lab)
}

/// The lab's cluster PKI (CA and admin credential), which every controller replica is given.
pub fn pki_dir(lab: &str) -> PathBuf {
    lab_dir(lab).join("pki")
}

/// Where a node's own credentials (`system:node:<node>`) are kept, for its agent.
pub fn node_credentials_dir(lab: &str, node: &str) -> PathBuf {
    lab_dir(lab).join("nodes").join(node).join("credentials")
}

/// The lab's cgroup, relative to the cgroup2 mount.
pub fn lab_cgroup(lab: &str) -> PathBuf {
    Path::new(strait_dataplane::cgroup::STRAIT_CGROUP).join(lab)
}

/// What `lab up` recorded about a running lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub name: String,
    pub nodes: Vec<LabNode>,
    /// kubectl's way in: the controller's listener on the root namespace's loopback.
    pub api_server: String,
    pub kubeconfig: PathBuf,
    pub controller_pid: u32,
    /// The binaries the lab's processes run, for restarts.
    pub strait_exe: PathBuf,
    pub cni_plugin: PathBuf,
    /// Where the controllers keep the cluster's state: `embedded` or an etcd URL.
    #[serde(default = "embedded_store")]
    pub store: String,
    /// The controller replicas after the first (`controller-2`, …), on etcd.
    #[serde(default)]
    pub replicas: Vec<LabReplica>,
    /// Extra arguments the controllers and the agents were started with, for restarts.
    #[serde(default)]
    pub controller_args: Vec<String>,
    #[serde(default)]
    pub agent_args: Vec<String>,
}

fn embedded_store() -> String {
    strait_controlplane::store::StoreLocation::Embedded.to_string()
}

/// A controller replica beyond the first.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabReplica {
    /// N of `controller-N`.
    pub index: usize,
    pub pid: u32,
    /// Its listener on the root namespace's loopback.
    pub api_server: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabNode {
    pub name: String,
    pub address: Ipv4Addr,
    pub netns: String,
    pub agent_pid: u32,
}

impl LabState {
    pub fn path(lab: &str) -> PathBuf {
        lab_dir(lab).join("lab.json")
    }

    /// The state of a lab that is up.
    pub fn load(lab: &str) -> anyhow::Result<Self> {
        validate_lab_name(lab)?;
        let path = Self::path(lab);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!("no lab named {lab:?} is up (start one with `strait lab up --name {lab}`)")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// An API client of every controller replica of the lab (the first one first), with the
    /// admin credential.
    pub fn api_client(&self) -> anyhow::Result<strait_controlplane::client::ApiClient> {
        let pki = pki_dir(&self.name);
        let admin = strait_controlplane::auth::pki::read_admin_credentials(&pki)
            .with_context(|| format!("reading the admin credential of lab {}", self.name))?;
        let mut servers = vec![self.api_server.clone()];
        servers.extend(self.replicas.iter().map(|r| r.api_server.clone()));
        Ok(strait_controlplane::client::ApiClient::new(&servers.join(","), &admin)?)
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        let path = Self::path(&self.name);
        fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// What `lab down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub processes_killed: usize,
    pub namespaces: Vec<String>,
    pub pins_removed: bool,
    pub state_removed: bool,
}

/// Removes every trace of a lab: processes, cgroups, namespaces (and with them every link),
/// BPF pins and state. Works on a half-made or already removed lab; running it twice is fine.
pub fn down(lab: &str) -> anyhow::Result<DownReport> {
    validate_lab_name(lab)?;
    let mut report = DownReport::default();

    let store = LabState::load(lab).ok().map(|state| state.store);

    // Processes first, so no agent recreates what is being removed.
    let cgroup = Cgroup::new(&lab_cgroup(lab)).context("locating the lab's cgroup")?;
    report.processes_killed = cgroup.processes().map(|p| p.len()).unwrap_or(0);
    cgroup
        .kill_all(Duration::from_secs(10))
        .with_context(|| format!("stopping the processes of {}", cgroup.path().display()))?;
    cgroup.remove().with_context(|| format!("removing cgroup {}", cgroup.path().display()))?;

    // Pods first, then nodes, then the fabric: deleting a namespace deletes its links.
    let prefix = netns_prefix(lab);
    let mut namespaces = NetNs::list_with_prefix(&prefix).context("listing namespaces")?;
    namespaces.sort_by_key(|name| {
        let rest = &name[prefix.len()..];
        (!rest.starts_with("pod-"), rest == "fabric")
    });
    for name in namespaces {
        NetNs::delete(&name).with_context(|| format!("deleting namespace {name}"))?;
        report.namespaces.push(name);
    }

    let pins = Path::new(BPFFS_ROOT).join(lab);
    if pins.exists() {
        fs::remove_dir_all(&pins).with_context(|| format!("removing pins {}", pins.display()))?;
        report.pins_removed = true;
    }
    remove_dir_if_empty(Path::new(BPFFS_ROOT));

    // The cluster's keys in a shared etcd are the lab's too.
    // Best effort: an etcd that is gone took the keys with it.
    if let Some(Ok(store)) = store.map(|s| s.parse::<strait_controlplane::store::StoreLocation>())
        && let Err(error) = forget_cluster_state(lab, &store)
    {
        tracing::warn!(error = %format!("{error:#}"), "the lab's keys stay in etcd");
    }

    let dir = lab_dir(lab);
    if dir.exists() {
        // Pods' `medium: Memory` emptyDirs are tmpfs mounts in there.
        strait_dataplane::runtime::volumes::unmount_all_below(&dir)
            .with_context(|| format!("unmounting what is mounted below {}", dir.display()))?;
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        report.state_removed = true;
    }
    remove_dir_if_empty(Path::new(LABS_DIR));
    if let Ok(root) = Cgroup::new(Path::new(strait_dataplane::cgroup::STRAIT_CGROUP)) {
        let _ = fs::remove_dir(root.path());
    }
    Ok(report)
}

/// Deletes every key of the lab's cluster from its etcd (nothing for the embedded store, whose
/// file is in the lab's directory). Runs on a thread of its own, so that it can be called from
/// synchronous code inside an async runtime.
pub fn forget_cluster_state(
    lab: &str,
    store: &strait_controlplane::store::StoreLocation,
) -> anyhow::Result<()> {
    use strait_controlplane::store::{EtcdStore, EtcdStoreOptions, StoreLocation};
    let StoreLocation::Etcd { endpoints, root } = store else { return Ok(()) };
    let root = root.clone().unwrap_or_else(|| EtcdStoreOptions::default_root(lab));
    let options = EtcdStoreOptions {
        request_timeout: Duration::from_secs(3),
        ..EtcdStoreOptions::new(endpoints.clone(), root.clone())
    };
    let removed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let store = EtcdStore::connect(options).await?;
            anyhow::Ok(store.remove_everything().await?)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread removing the lab's etcd keys panicked"))?;
    removed.with_context(|| format!("removing the lab's keys under {root} from etcd"))?;
    Ok(())
}

/// Removes a shared parent directory once the last lab has left it; another lab's files keep
/// it, which is not an error.
fn remove_dir_if_empty(dir: &Path) {
    let _ = fs::remove_dir(dir);
}

/// The names of the labs that have state on this machine.
pub fn list() -> anyhow::Result<Vec<String>> {
    let mut labs = Vec::new();
    match fs::read_dir(LABS_DIR) {
        Ok(entries) => {
            for entry in entries {
                labs.push(entry?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("listing labs"),
    }
    labs.sort();
    Ok(labs)
}

#[cfg(test)]
mod tests {
    use super::{netns_prefix, node_netns, validate_lab_name};

    #[test]
    fn lab_names_are_dns_labels_without_underscores() {
        for good in ["default", "a", "bench-1", "x2"] {
            assert!(validate_lab_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "twenty-one-characters"] {
            assert!(validate_lab_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_lab_prefix_matches_another_labs_names() {
        let other = node_netns("a-b", "node-1");
        assert!(!other.starts_with(&netns_prefix("a")), "{other} must not belong to lab a");
    }
}
