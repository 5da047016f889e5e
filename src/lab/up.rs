//! `strait lab up`: builds the lab's namespaces and fabric, starts the controller and one agent
//! per node, and returns once every node is Ready.

use std::{
    fs::{self, OpenOptions},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use strait_controlplane::{
    auth::{ClientCredentials, ClusterPki, kubeconfig::write_kubeconfig},
    store::StoreLocation,
};
use strait_dataplane::{cgroup::Cgroup, ebpf, netlink, netns::NetNs, runtime::process::ChildSetup};

use super::{
    CONTROLLER_ADDRESS, CONTROLLER_PORT, FABRIC_PREFIX_LEN, LabNode, LabReplica, LabState,
    MAX_NODES, down, fabric_netns, forget_cluster_state, lab_cgroup, lab_dir, netns_prefix,
    node_address, node_credentials_dir, node_name, node_netns, pki_dir, validate_lab_name,
};

/// The bridge in the fabric namespace that all nodes are plugged into.
const FABRIC_BRIDGE: &str = "fabric0";

#[derive(Clone, Debug)]
pub struct UpOptions {
    pub name: String,
    pub nodes: usize,
    /// The `strait` binary the lab's processes run (normally the running one).
    pub strait_exe: PathBuf,
    /// The `strait-cni` binary the agents exec.
    pub cni_plugin: PathBuf,
    /// How long to wait for every node to be Ready.
    pub ready_timeout: Duration,
    /// Extra arguments of `strait controller` (e.g. shorter node timers for tests).
    pub controller_args: Vec<String>,
    /// Extra arguments of every `strait agent`.
    pub agent_args: Vec<String>,
}

/// The lab's control plane: where it keeps the cluster's state and how many controller
/// replicas serve it.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// The embedded store (default) or an etcd the lab's controllers share.
    pub store: StoreLocation,
    /// Controller replicas (more than one needs etcd): all serve the API, one leads.
    pub controllers: usize,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self { store: StoreLocation::Embedded, controllers: 1 }
    }
}

/// The most controller replicas a lab runs.
pub const MAX_CONTROLLERS: usize = 7;

/// Brings a lab up with one controller on the embedded store. If anything fails, everything
/// made so far is removed again.
pub async fn up(options: &UpOptions) -> anyhow::Result<LabState> {
    up_with(options, &ControlPlaneOptions::default()).await
}

/// [`up`] with the control plane given.
pub async fn up_with(
    options: &UpOptions,
    control: &ControlPlaneOptions,
) -> anyhow::Result<LabState> {
    validate_lab_name(&options.name)?;
    if control.controllers == 0 || control.controllers > MAX_CONTROLLERS {
        bail!("a lab has 1 to {MAX_CONTROLLERS} controllers, not {}", control.controllers);
    }
    if control.controllers > 1 && control.store == StoreLocation::Embedded {
        bail!("several controllers need a shared store: add --store etcd://HOST:PORT");
    }
    if options.nodes == 0 || options.nodes > MAX_NODES {
        bail!("a lab has 1 to {MAX_NODES} nodes, not {}", options.nodes);
    }
    for binary in [&options.strait_exe, &options.cni_plugin] {
        if !binary.is_file() {
            bail!("{} does not exist; build it with `cargo build --release`", binary.display());
        }
    }
    if LabState::path(&options.name).exists() || lab_dir(&options.name).exists() {
        bail!(
            "a lab named {:?} already exists; remove it with `strait lab down --name {}`",
            options.name,
            options.name
        );
    }
    match build(options, control).await {
        Ok(state) => Ok(state),
        Err(error) => {
            let logs = log_tails(&options.name, 8);
            let cleanup = down(&options.name).and_then(|report| {
                forget_cluster_state(&options.name, &control.store).map(|()| report)
            });
            match cleanup {
                Ok(_) => Err(error.context(format!("bringing lab {} up (everything made was removed){logs}", options.name))),
                Err(cleanup_error) => Err(error.context(format!(
                    "bringing lab {} up; removing what was made also failed: {cleanup_error:#}{logs}",
                    options.name
                ))),
            }
        }
    }
}

async fn build(options: &UpOptions, control: &ControlPlaneOptions) -> anyhow::Result<LabState> {
    let lab = &options.name;
    // A lab of this name is not up (checked above): what an etcd still holds under its root
    // is left from an earlier one, and a new lab starts empty.
    forget_cluster_state(lab, &control.store)?;
    let dir = lab_dir(lab);
    strait_dataplane::dirs::create_dir_all_shared(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    ebpf::ensure_bpffs().context("mounting the bpf filesystem")?;
    let cgroup = Cgroup::new(&lab_cgroup(lab)).context("locating the lab's cgroup")?;
    cgroup.create().with_context(|| format!("creating cgroup {}", cgroup.path().display()))?;

    // The fabric: a bridge with the controller's address.
    let fabric = NetNs::create(&fabric_netns(lab)).context("creating the fabric namespace")?;
    let fabric_nl = fabric.netlink()?;
    bring_loopback_up(&fabric_nl).await?;
    let bridge = netlink::ensure_bridge(&fabric_nl, FABRIC_BRIDGE).await?;
    netlink::replace_address(
        &fabric_nl,
        bridge,
        Ipv4Net::new(CONTROLLER_ADDRESS, FABRIC_PREFIX_LEN)?,
    )
    .await?;
    netlink::set_link_up(&fabric_nl, bridge).await?;

    // Nodes: a namespace each, plugged into the fabric by a veth pair.
    let mut node_namespaces = Vec::new();
    for index in 1..=options.nodes {
        let name = node_name(index);
        let namespace = NetNs::create(&node_netns(lab, &name))
            .with_context(|| format!("creating the namespace of {name}"))?;
        netlink::create_veth(&fabric_nl, &name, "eth0", namespace.fd(), None).await?;
        let fabric_end = netlink::link_index(&fabric_nl, &name)
            .await?
            .with_context(|| format!("finding the fabric end of {name}"))?;
        netlink::set_master(&fabric_nl, fabric_end, bridge).await?;
        netlink::set_link_up(&fabric_nl, fabric_end).await?;

        let node_nl = namespace.netlink()?;
        bring_loopback_up(&node_nl).await?;
        let eth0 = netlink::link_index(&node_nl, "eth0")
            .await?
            .with_context(|| format!("finding eth0 of {name}"))?;
        netlink::replace_address(
            &node_nl,
            eth0,
            Ipv4Net::new(node_address(index), FABRIC_PREFIX_LEN)?,
        )
        .await?;
        netlink::set_link_up(&node_nl, eth0).await?;
        // A node routes for its pods. Per-namespace sysctl: the root namespace is untouched.
        namespace.write_net_sysctl("ipv4/ip_forward", "1")?;
        // A VIP without backends is refused by the node's `unreachable` route with ICMP; the
        // kernel's default rate limit would turn every refusal after the first in a second
        // into a client timeout. Lab nodes answer each one (this namespace only).
        namespace.write_net_sysctl("ipv4/icmp_ratelimit", "0")?;
        node_namespaces.push((index, name, namespace));
    }

    // The cluster's initialisation: its CA and admin credential, before any process needs them
    // (the controller reuses them; the lab issues each agent its identity from the CA).
    let pki = ClusterPki::init(&pki_dir(lab)).context("creating the cluster CA")?;

    // The controller's two ways in: loopback in the root namespace (kubectl), and the fabric
    // address inside the lab (agents). Both sockets are made here and handed over, so the port
    // printed in the kubeconfig is the one actually served.
    let mut replicas = Vec::new();
    for index in 1..=control.controllers {
        let loopback = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a loopback port for the API")?;
        let api_server = format!("https://127.0.0.1:{}", loopback.local_addr()?.port());
        let pid = start_controller(
            lab,
            &options.strait_exe,
            loopback,
            index,
            &control.store,
            &options.controller_args,
        )?;
        replicas.push(LabReplica { index, pid, api_server });
    }
    let first = replicas.remove(0);
    // kubectl talks to the first replica (a kubeconfig names one server).
    let (controller_pid, api_server) = (first.pid, first.api_server);

    let mut nodes = Vec::new();
    for (index, name, namespace) in &node_namespaces {
        let agent_pid = start_agent(lab, name, node_address(*index), options, control.controllers)?;
        nodes.push(LabNode {
            name: name.clone(),
            address: node_address(*index),
            netns: namespace.name().to_owned(),
            agent_pid,
        });
    }

    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("strait-{lab}"), &api_server, &pki.admin_credentials()?)
        .context("writing the kubeconfig")?;
    let state = LabState {
        name: lab.clone(),
        nodes,
        api_server,
        kubeconfig,
        controller_pid,
        strait_exe: options.strait_exe.clone(),
        cni_plugin: options.cni_plugin.clone(),
        store: control.store.to_string(),
        replicas,
        controller_args: options.controller_args.clone(),
        agent_args: options.agent_args.clone(),
    };
    state.save()?;
    wait_until_ready(&state, options.ready_timeout).await?;
    Ok(state)
}

/// The cgroup, data directory and log name of controller replica `index` (1 is `controller`).
fn controller_name(index: usize) -> String {
    if index == 1 { "controller".to_owned() } else { format!("controller-{index}") }
}

/// Where replica `index` listens inside the fabric: the controller's address, one port each.
fn controller_fabric_address(index: usize) -> SocketAddr {
    let port = CONTROLLER_PORT + u16::try_from(index - 1).unwrap_or(0);
    SocketAddr::from((CONTROLLER_ADDRESS, port))
}

/// What agents are given: every replica's URL inside the fabric.
fn controller_urls(controllers: usize) -> String {
    (1..=controllers)
        .map(|index| format!("https://{}", controller_fabric_address(index)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts controller replica `index` with `loopback` (a socket bound in the root namespace)
/// and a socket bound to its address inside the fabric namespace.
fn start_controller(
    lab: &str,
    strait_exe: &Path,
    loopback: TcpListener,
    index: usize,
    store: &StoreLocation,
    extra_args: &[String],
) -> anyhow::Result<u32> {
    let dir = lab_dir(lab);
    let name = controller_name(index);
    let fabric = NetNs::open(&fabric_netns(lab))?;
    let fabric_address = controller_fabric_address(index);
    let in_fabric = fabric
        .run(|| TcpListener::bind(fabric_address))?
        .with_context(|| format!("binding {fabric_address} in the fabric"))?;
    let cgroup = Cgroup::new(&lab_cgroup(lab).join(&name))?;
    cgroup.create()?;
    let data_dir = dir.join(&name);
    fs::create_dir_all(&data_dir)?;
    let mut controller = Command::new(strait_exe);
    controller.args(["controller", "--cluster", lab, "--data-dir"]).arg(&data_dir).args([
        "--listen-fd",
        "3",
        "--listen-fd",
        "4",
    ]);
    controller.arg("--store").arg(store.to_string());
    // Every replica serves with the lab's one CA, so that any of them accepts any client.
    controller.arg("--pki-dir").arg(pki_dir(lab));
    // The API server reads nodes' logs from inside the fabric, where their addresses are.
    controller.arg("--node-netns").arg(strait_dataplane::netns::named_path(&fabric_netns(lab)));
    controller.args(extra_args);
    spawn_daemon(
        controller,
        &cgroup,
        None,
        &[loopback.as_raw_fd(), in_fabric.as_raw_fd()],
        &dir.join(format!("{name}.log")),
    )
    .with_context(|| format!("starting {name}"))
}

/// Starts the agent of one node inside that node's namespace.
fn start_agent(
    lab: &str,
    node: &str,
    address: Ipv4Addr,
    binaries: &impl LabBinaries,
    controllers: usize,
) -> anyhow::Result<u32> {
    let node_dir = lab_dir(lab).join("nodes").join(node);
    fs::create_dir_all(&node_dir)?;
    let cgroup_root = lab_cgroup(lab).join(node);
    let cgroup = Cgroup::new(&cgroup_root.join("agent"))?;
    cgroup.create()?;
    let controller_url = controller_urls(controllers);
    let credentials = node_credentials(lab, node)?;
    let mut agent = Command::new(binaries.strait_exe());
    agent
        .args(["agent", "--node-name", node, "--node-ip", &address.to_string()])
        .args(["--controller", &controller_url, "--cluster", lab])
        .arg("--credentials-dir")
        .arg(&credentials)
        .arg("--state-dir")
        .arg(&node_dir)
        .args(["--netns-prefix", &netns_prefix(lab)])
        .arg("--cgroup-root")
        .arg(&cgroup_root)
        .arg("--cni-plugin")
        .arg(binaries.cni_plugin())
        .arg("--cni-conf-dir")
        .arg(node_dir.join("net.d"))
        .args(binaries.agent_args());
    spawn_daemon(
        agent,
        &cgroup,
        Some(&node_netns_path(lab, node)),
        &[],
        &node_dir.join("agent.log"),
    )
    .with_context(|| format!("starting the agent of {node}"))
}

/// The node's own identity (`system:node:<node>`), issued by the cluster CA the first time the
/// node comes up and kept for its restarts.
fn node_credentials(lab: &str, node: &str) -> anyhow::Result<PathBuf> {
    let dir = node_credentials_dir(lab, node);
    if ClientCredentials::read_dir(&dir).is_err() {
        ClusterPki::open(&pki_dir(lab))
            .and_then(|pki| pki.issue_node(node))
            .and_then(|credentials| credentials.write_dir(&dir))
            .with_context(|| format!("issuing the credentials of {node}"))?;
    }
    Ok(dir)
}

fn node_netns_path(lab: &str, node: &str) -> PathBuf {
    strait_dataplane::netns::named_path(&node_netns(lab, node))
}

/// Where the binaries of a lab's processes are.
trait LabBinaries {
    fn strait_exe(&self) -> &Path;
    fn cni_plugin(&self) -> &Path;
    /// Extra arguments of the agents.
    fn agent_args(&self) -> &[String];
}

impl LabBinaries for UpOptions {
    fn strait_exe(&self) -> &Path {
        &self.strait_exe
    }
    fn cni_plugin(&self) -> &Path {
        &self.cni_plugin
    }
    fn agent_args(&self) -> &[String] {
        &self.agent_args
    }
}

impl LabBinaries for LabState {
    fn strait_exe(&self) -> &Path {
        &self.strait_exe
    }
    fn cni_plugin(&self) -> &Path {
        &self.cni_plugin
    }
    fn agent_args(&self) -> &[String] {
        &self.agent_args
    }
}

/// A process of a lab that `strait lab restart` can restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabProcess {
    /// The first controller.
    Controller,
    /// Controller replica N (2 and up), in a lab of several on etcd.
    ControllerReplica(usize),
    Agent(String),
}

impl std::str::FromStr for LabProcess {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> anyhow::Result<Self> {
        match text {
            "controller" | "controller-1" => Ok(Self::Controller),
            replica if let Some(index) = replica.strip_prefix("controller-") => {
                match index.parse::<usize>() {
                    Ok(index) if index >= 2 => Ok(Self::ControllerReplica(index)),
                    _ => bail!("{replica:?} is not a controller replica like `controller-2`"),
                }
            }
            node if node.starts_with("node-") => Ok(Self::Agent(node.to_owned())),
            other => bail!(
                "{other:?} is neither `controller`, `controller-N` nor a node name like `node-1`"
            ),
        }
    }
}

/// Kills a lab process with SIGKILL (the harshest way it can die) and waits until it is gone.
/// What it set up (pods, routes, pins, the store) stays.
pub fn kill(lab: &str, process: &LabProcess) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let cgroup = process_cgroup(&state, process)?;
    cgroup.kill_all(Duration::from_secs(10)).with_context(|| format!("killing {process:?}"))
}

/// Starts a lab process again after [`kill`] (or kills and restarts it if it runs), on the
/// same addresses, and records its new pid.
pub fn restart(lab: &str, process: &LabProcess) -> anyhow::Result<u32> {
    let mut state = LabState::load(lab)?;
    kill(lab, process)?;
    let store: StoreLocation = state.store.parse().map_err(anyhow::Error::msg)?;
    let controllers = state.replicas.len() + 1;
    let pid = match process {
        LabProcess::Controller | LabProcess::ControllerReplica(_) => {
            let index = match process {
                LabProcess::ControllerReplica(index) => *index,
                _ => 1,
            };
            let api_server = if index == 1 {
                state.api_server.clone()
            } else {
                state
                    .replicas
                    .iter()
                    .find(|r| r.index == index)
                    .map(|r| r.api_server.clone())
                    .with_context(|| format!("lab {lab} has no controller-{index}"))?
            };
            let port = api_server
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .context("reading the API port from the lab state")?;
            let loopback = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .with_context(|| format!("binding 127.0.0.1:{port} again"))?;
            let pid = start_controller(
                lab,
                &state.strait_exe,
                loopback,
                index,
                &store,
                &state.controller_args,
            )?;
            match state.replicas.iter_mut().find(|r| r.index == index) {
                Some(replica) => replica.pid = pid,
                None => state.controller_pid = pid,
            }
            pid
        }
        LabProcess::Agent(node) => {
            let address = state
                .nodes
                .iter()
                .find(|n| &n.name == node)
                .map(|n| n.address)
                .context("no such node")?;
            let pid = start_agent(lab, node, address, &state, controllers)?;
            if let Some(entry) = state.nodes.iter_mut().find(|n| &n.name == node) {
                entry.agent_pid = pid;
            }
            pid
        }
    };
    state.save()?;
    Ok(pid)
}

/// Takes a node off the fabric (`up: false`) or puts it back: the fabric end of its veth goes
/// down or up. With its agent killed ([`kill`]), a node taken off is a node that died: its
/// pods keep running but nothing reaches them and nothing is heard from them.
pub async fn set_node_link(lab: &str, node: &str, up: bool) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    if !state.nodes.iter().any(|n| n.name == node) {
        bail!("lab {lab} has no node {node}");
    }
    let fabric = NetNs::open(&fabric_netns(lab))?;
    let handle = fabric.netlink()?;
    let index = netlink::link_index(&handle, node)
        .await?
        .with_context(|| format!("finding the fabric end of {node}"))?;
    if up {
        netlink::set_link_up(&handle, index).await?;
    } else {
        netlink::set_link_down(&handle, index).await?;
    }
    Ok(())
}

/// Starts a lab process that [`kill`] stopped (its cgroup empty), without killing anything.
pub fn start(lab: &str, process: &LabProcess) -> anyhow::Result<u32> {
    let state = LabState::load(lab)?;
    let cgroup = process_cgroup(&state, process)?;
    if cgroup.is_populated().unwrap_or(false) {
        bail!("{process:?} of lab {lab} is running; restart it instead");
    }
    restart(lab, process)
}

fn process_cgroup(state: &LabState, process: &LabProcess) -> anyhow::Result<Cgroup> {
    let relative = match process {
        LabProcess::Controller => lab_cgroup(&state.name).join(controller_name(1)),
        LabProcess::ControllerReplica(index) => {
            if !state.replicas.iter().any(|r| r.index == *index) {
                bail!("lab {} has no controller-{index}", state.name);
            }
            lab_cgroup(&state.name).join(controller_name(*index))
        }
        LabProcess::Agent(node) => {
            if !state.nodes.iter().any(|n| &n.name == node) {
                bail!("lab {} has no node {node}", state.name);
            }
            lab_cgroup(&state.name).join(node).join("agent")
        }
    };
    Ok(Cgroup::new(&relative)?)
}

async fn bring_loopback_up(handle: &rtnetlink::Handle) -> anyhow::Result<()> {
    let lo = netlink::link_index(handle, "lo").await?.context("a namespace without lo")?;
    netlink::set_link_up(handle, lo).await?;
    Ok(())
}

/// Starts a long-running lab process, detached from this one: its own session, its own cgroup,
/// optionally inside a network namespace, stdout and stderr to `log`, and `inherited` file
/// descriptors handed over as fds 3, 4, … (systemd-style socket passing).
fn spawn_daemon(
    mut command: Command,
    cgroup: &Cgroup,
    netns: Option<&Path>,
    inherited: &[i32],
    log: &Path,
) -> anyhow::Result<u32> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut setup = ChildSetup::new().join_cgroup(&cgroup.procs_file())?.new_session();
    if let Some(netns) = netns {
        setup = setup.enter_netns(netns).context("opening the node namespace")?;
    }
    const MAX_INHERITED: usize = 8;
    if inherited.len() > MAX_INHERITED {
        bail!("at most {MAX_INHERITED} sockets can be handed over, not {}", inherited.len());
    }
    let inherited = inherited.to_vec();
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()));
    // SAFETY: runs between fork and exec; only async-signal-safe calls on prepared data.
    unsafe {
        command.pre_exec(move || {
            setup.apply()?;
            // Move the sockets out of the way first, so that placing one on fd 3 cannot close
            // another that happens to sit there; dup2 leaves the targets without CLOEXEC.
            let mut high = [0i32; MAX_INHERITED];
            for (slot, fd) in inherited.iter().enumerate() {
                high[slot] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                if high[slot] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (slot, moved) in high.iter().take(inherited.len()).enumerate() {
                if libc::dup2(*moved, 3 + slot as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().context("spawning")?;
    let pid = child.id();
    // Reap it when it ends, so a long-lived parent (a test, a benchmark) keeps no zombie. When
    // this process exits first, the daemon is re-parented and keeps running.
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

/// Waits until every node of the lab is registered and Ready, and returns the nodes.
pub async fn wait_until_ready(state: &LabState, timeout: Duration) -> anyhow::Result<Vec<Node>> {
    let api = state.api_client()?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("the API server did not answer");
    while Instant::now() < deadline {
        match api.list::<Node>(None, "").await {
            Ok((nodes, _)) => {
                let ready = nodes.iter().filter(|node| is_node_ready(node)).count();
                if ready == state.nodes.len() {
                    return Ok(nodes);
                }
                last = format!(
                    "{ready} of {} nodes Ready ({} registered)",
                    state.nodes.len(),
                    nodes.len()
                );
            }
            Err(error) => last = format!("{error}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the lab was not ready within {timeout:?}: {last}")
}

/// Whether a Node reports `Ready=True`.
pub fn is_node_ready(node: &Node) -> bool {
    node.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|conditions| {
        conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The last `lines` lines of every log of a lab (controller and agents), for error messages.
pub fn log_tails(lab: &str, lines: usize) -> String {
    let dir = lab_dir(lab);
    let mut logs = vec![dir.join("controller.log")];
    logs.extend(
        (2..=MAX_CONTROLLERS).map(|index| dir.join(format!("{}.log", controller_name(index)))),
    );
    if let Ok(nodes) = fs::read_dir(dir.join("nodes")) {
        logs.extend(nodes.flatten().map(|entry| entry.path().join("agent.log")));
    }
    let mut text = String::new();
    for log in logs {
        if let Ok(content) = fs::read_to_string(&log) {
            let tail: Vec<_> = content.lines().rev().take(lines).collect();
            text.push_str(&format!("\n--- {} ---\n", log.display()));
            for line in tail.iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}
