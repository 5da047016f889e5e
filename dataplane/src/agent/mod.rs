//! The node agent: registers its Node, follows the controller's NodeSync stream, programs
//! routes, runs the pods bound to its node, and reports their status.
//!
//! Everything it sets up outlives it: pods keep running, routes and pinned maps stay. A
//! restarted agent adopts the pods recorded on disk, re-adopts its pinned maps, and converges
//! to the first snapshot the controller sends.

pub mod exec_server;
pub mod log_server;
pub mod node;
pub mod routes;
pub mod services;
pub mod sync;
pub mod usage;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;
use strait_controlplane::{auth::ClientCredentials, client::ApiClient};
use tokio::sync::watch;

use crate::{
    cgroup::Cgroup,
    dns::{ClusterDns, DnsZone},
    ebpf::{
        self,
        antispoof::AntiSpoof,
        lb::{LbMapSizes, ServiceLb},
    },
    metrics::{AgentMetrics, BpfMapStats, ScrapeSource, ScrapeValues},
    runtime::{PodRuntime, RuntimeContext, cni::CniInvoker, limits, record::RecordStore},
};
use node::NodeIdentity;
use routes::NodeRoute;

/// The agent's child cgroup holding the pods whose sockets the load balancer translates.
pub const POD_CGROUP: &str = "pods";
/// The agent's child cgroup holding the pods that opted out of socket load balancing
/// ([`crate::runtime::SOCKET_LB_ANNOTATION`]): no socket hooks here.
pub const POD_CGROUP_WITHOUT_SOCKET_LB: &str = "pods-tc";
/// The agent's child cgroup for node processes that reach services through the socket hooks.
pub const HOST_CGROUP: &str = "host";
/// The agent's child cgroup of the containers' log shims: outside the pods, so that a pod's
/// usage and limits are its containers' alone (as CRI runtimes keep their shims apart).
pub const LOG_SHIM_CGROUP: &str = "log-shims";

/// How a node agent is run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// The node's own address, announced as its InternalIP and used by other nodes as the
    /// next hop for its podCIDR.
    pub node_ip: Ipv4Addr,
    /// Base URL of the controller, e.g. `https://172.20.0.1:6443` (REST and NodeSync), or the
    /// URLs of several replicas separated by commas (the agent uses whichever answers).
    pub controller: String,
    /// The cluster CA and this node's own identity (`system:node:<name>`), issued by the
    /// controller's CA (`strait controller issue-node-credentials`).
    pub credentials: ClientCredentials,
    /// Cluster name: part of pin paths and of every name the agent makes.
    pub cluster: String,
    /// Pod records, CNI allocations and container logs live here.
    pub state_dir: PathBuf,
    /// Prefix of pod network namespace names.
    pub netns_prefix: String,
    /// This agent's cgroup subtree, relative to the cgroup2 mount (must start with `strait/`).
    pub cgroup_root: PathBuf,
    /// The `strait-cni` binary.
    pub cni_plugin: PathBuf,
    /// Where to write a `.conflist` for other runtimes on this node, if anywhere.
    pub cni_conf_dir: Option<PathBuf>,
    /// The `strait` binary (runs the built-in workload).
    pub strait_exe: PathBuf,
    /// How often the stored Node is compared with what the agent would report (and written
    /// when they differ).
    pub heartbeat: Duration,
    /// How often the Node's status is written even when nothing changed (the kubelet's
    /// `nodeStatusReportFrequency`, 5 minutes).
    pub status_refresh: Duration,
    /// The node lease's `leaseDurationSeconds` (40 s, as the kubelet's).
    pub lease_duration: Duration,
    /// How often the node lease is renewed (10 s, a quarter of its duration, as the kubelet's).
    pub lease_renew_interval: Duration,
    /// How often the node's and its pods' resource usage is reported (`kubectl top`, the
    /// autoscaler); 15 s as metrics-server's resolution.
    pub usage_report_interval: Duration,
    /// Service VIPs come from here; the node marks it `unreachable` so that a VIP the load
    /// balancer did not translate is refused at once.
    pub service_cidr: Ipv4Net,
    /// The cluster DNS VIP pods resolve names through (their `/etc/resolv.conf`).
    pub cluster_dns: Ipv4Addr,
    /// The cluster's DNS domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Where this node's DNS server listens; the cluster DNS VIP is translated to it.
    pub dns_listen: SocketAddrV4,
    /// Where Prometheus metrics are served (`/metrics`); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the API server reads container logs (see `log_server.rs`); `None` serves none.
    pub log_listen: Option<SocketAddr>,
    /// Capacities of the load balancer's maps.
    pub lb_sizes: LbMapSizes,
    /// The crash-loop back-off of containers (Kubernetes': 10 s doubling to 5 min).
    pub restart_backoff: crate::runtime::backoff::BackoffPolicy,
    /// How container log files rotate.
    pub log_rotation: crate::runtime::logs::LogRotation,
}

/// Runs the agent until `shutdown` completes. Pods are left running on shutdown.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let pin_dir = ebpf::node_pin_dir(&config.cluster, &config.node_name);
    ebpf::ensure_bpffs().context("making sure the bpf filesystem is mounted")?;
    // The load balancer first: whichever object creates the shared maps sets their sizes.
    let lb = ServiceLb::load_and_pin(&pin_dir, &config.lb_sizes)
        .with_context(|| format!("loading the service load balancer into {}", pin_dir.display()))?;
    let antispoof = AntiSpoof::load_and_pin_with(&pin_dir, &config.lb_sizes)
        .with_context(|| format!("loading the anti-spoofing program into {}", pin_dir.display()))?;
    tracing::info!(pin_dir = %antispoof.pin_dir().display(), "eBPF programs loaded and pinned");

    let cgroup = Cgroup::new(&config.cgroup_root).context("locating the agent's cgroup")?;
    let pods_cgroup = cgroup.child(POD_CGROUP);
    // Processes of the node itself that should reach services (e.g. `strait lab node-exec`).
    let host_cgroup = cgroup.child(HOST_CGROUP);
    let pods_cgroup_without_socket_lb = cgroup.child(POD_CGROUP_WITHOUT_SOCKET_LB);
    pods_cgroup_without_socket_lb
        .create()
        .with_context(|| format!("creating {}", pods_cgroup_without_socket_lb.path().display()))?;
    let log_shims_cgroup = cgroup.child(LOG_SHIM_CGROUP);
    log_shims_cgroup
        .create()
        .with_context(|| format!("creating {}", log_shims_cgroup.path().display()))?;
    for hooked in [&pods_cgroup, &host_cgroup] {
        hooked.create().with_context(|| format!("creating {}", hooked.path().display()))?;
        lb.attach_cgroup(hooked.path()).with_context(|| {
            format!("attaching the socket load balancer to {}", hooked.path().display())
        })?;
    }
    let controllers = limits::enable_controllers(&[&pods_cgroup, &pods_cgroup_without_socket_lb])
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot enable the cpu and memory controllers for pods");
            limits::Controllers::default()
        });
    if let Some(why) =
        limits::not_enforced(limits::Controllers { cpu: true, memory: true }, controllers)
    {
        tracing::warn!("pods' CPU and memory {why}");
    }
    let local = services::LocalNode {
        name: config.node_name.clone(),
        cluster_dns: Some(config.cluster_dns),
        dns_server: Some(config.dns_listen),
    };
    let programs = Arc::new(Mutex::new(services::ServicePrograms::new(lb, local)));
    let metrics = Arc::new(AgentMetrics::new());
    metrics.set_scrape_source(scrape_source(programs.clone(), pin_dir.clone()));
    if let Some(address) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics address {address}"))?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve(listener, metrics).await {
                tracing::error!(%error, "the metrics server stopped");
            }
        });
    }

    // Node-local cluster DNS: the cluster DNS VIP is translated to this server on every node.
    let empty_zone = DnsZone::new(&config.cluster_domain, [])
        .with_context(|| format!("cluster domain {:?}", config.cluster_domain))?;
    let empty_zone_copy = empty_zone.clone();
    let (zone_sender, zone_receiver) = watch::channel(Arc::new(empty_zone));
    let dns_udp = tokio::net::UdpSocket::bind(config.dns_listen)
        .await
        .with_context(|| format!("binding the DNS server to {}/udp", config.dns_listen))?;
    let dns_tcp = tokio::net::TcpListener::bind(config.dns_listen)
        .await
        .with_context(|| format!("binding the DNS server to {}/tcp", config.dns_listen))?;
    let dns = ClusterDns::new(zone_receiver).with_metrics(metrics.clone());
    tokio::spawn(async move {
        if let Err(error) = dns.serve(dns_udp, dns_tcp).await {
            tracing::error!(%error, "the cluster DNS server stopped");
        }
    });

    let (service_sender, service_receiver) = std::sync::mpsc::channel();
    {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("service-programmer".into())
            .spawn(move || {
                // The programming thread's own copy of the zone, changed service by service; a
                // clone of it (sharing all it did not change) is what the DNS server answers
                // from.
                let mut zone = empty_zone_copy;
                services::run_programmer(
                    &programs,
                    service_receiver,
                    |report, batch, all, programs| {
                        for latency in &report.latencies {
                            metrics.observe_service_programming(*latency);
                        }
                        for _ in 0..report.errors {
                            metrics.count_service_programming_error();
                        }
                        let (frontends, backends) = programs.programmed();
                        metrics.set_services_programmed(frontends as u64);
                        metrics.set_service_backends_programmed(backends as u64);
                        services::update_zone(&mut zone, batch, all);
                        zone_sender.send_replace(Arc::new(zone.clone()));
                    },
                )
            })
            .context("starting the service programming thread")?;
    }

    let api = ApiClient::new(&config.controller, &config.credentials)
        .context("configuring the API client")?;
    let identity = NodeIdentity {
        name: config.node_name.clone(),
        address: config.node_ip,
        log_port: config.log_listen.map(|address| address.port()),
    };
    // The exec server needs the runtime, made once the node is registered.
    let (exec_runtime, exec_runtime_receiver) = watch::channel(None);
    if let Some(address) = config.log_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the log server address {address}"))?;
        let credentials = config.credentials.clone();
        let log_dir = config.state_dir.join("logs");
        let exec = exec_server::ExecState { runtime: exec_runtime_receiver };
        tokio::spawn(async move {
            if let Err(error) = log_server::serve(listener, &credentials, log_dir, exec).await {
                tracing::error!(error = format!("{error:#}"), "the log server stopped");
            }
        });
    }
    let registration = register_until_done(&api, &identity).await;
    let lease = tokio::spawn(lease_loop(
        node::NodeLease::new(
            api.clone(),
            &identity.name,
            registration.node.metadata.uid.clone(),
            config.lease_duration,
        ),
        config.lease_renew_interval,
    ));

    let (cni_sender, cni_receiver) = watch::channel(None::<CniInvoker>);
    let runtime = Arc::new(PodRuntime::new(RuntimeContext {
        api: api.clone(),
        node_name: config.node_name.clone(),
        node_ip: config.node_ip,
        netns_prefix: config.netns_prefix.clone(),
        pods_cgroup,
        pods_cgroup_without_socket_lb,
        log_shims_cgroup,
        records: RecordStore::open(&config.state_dir.join("pods"))
            .context("opening the pod records")?,
        log_dir: config.state_dir.join("logs"),
        log_rotation: config.log_rotation,
        strait_exe: config.strait_exe.clone(),
        cni: cni_receiver,
        cluster_dns: Some(config.cluster_dns),
        cluster_domain: config.cluster_domain.clone(),
        config_maps: Default::default(),
        restart_backoff: config.restart_backoff,
        controllers,
        node_allocatable: node::allocatable(&config.state_dir),
    }));
    exec_runtime.send_replace(Some(runtime.context().clone()));
    let adopted = runtime.adopt_existing().context("adopting the pods recorded on disk")?;
    tracing::info!(adopted, "pods adopted from a previous run");

    let (ready, ready_receiver) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat_loop(
        node::StatusReporter::new(api.clone(), identity.clone(), config.status_refresh),
        ready_receiver,
        config.heartbeat,
        registration.created,
    ));

    let routing = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(routing.0);
    let (routes_sender, routes_receiver) = watch::channel(BTreeMap::<String, NodeRoute>::new());
    let route_task = tokio::spawn(route_loop(
        routing.1,
        config.node_name.clone(),
        config.service_cidr,
        routes_receiver,
    ));

    let (pods_sender, pods_receiver) = watch::channel(HashMap::<String, Arc<Pod>>::new());
    let usage = tokio::spawn(usage::report_loop(
        api.clone(),
        config.node_name.clone(),
        cgroup.clone(),
        runtime.clone(),
        pods_receiver,
        config.usage_report_interval,
    ));

    let controller = config.controller.clone();
    let credentials = config.credentials.clone();
    let node_name = config.node_name.clone();
    let follow = {
        let runtime = runtime.clone();
        let config = config.clone();
        let mut own_cidr: Option<Ipv4Net> = None;
        sync::follow(&controller, &credentials, &node_name, move |state, change| {
            if change.peers_changed {
                let nodes = node_routes(state);
                let cidr = nodes.get(&config.node_name).map(|n| n.pod_cidr);
                if cidr != own_cidr
                    && let Some(cidr) = cidr
                {
                    own_cidr = Some(cidr);
                    let cni_config = CniInvoker::strait_config(
                        cidr,
                        &config.state_dir.join("cni"),
                        Some(&pin_dir),
                    );
                    write_conflist(config.cni_conf_dir.as_deref(), &cni_config);
                    tracing::info!(pod_cidr = %cidr, "this node's podCIDR is known; pods can start");
                    cni_sender
                        .send_replace(Some(CniInvoker::new(config.cni_plugin.clone(), cni_config)));
                }
                routes_sender.send_replace(nodes);
            }
            if !change.config_maps_changed.is_empty() {
                let changes: Vec<_> = change
                    .config_maps_changed
                    .iter()
                    .map(|key| (key.clone(), state.config_maps.get(key).cloned()))
                    .collect();
                runtime.update_config_maps(&changes);
            }
            if change.snapshot {
                runtime.apply(&state.pods, true);
                if !ready.send_replace(true) {
                    tracing::info!(
                        revision = state.revision,
                        pods = state.pods.len(),
                        "first snapshot applied; node is Ready"
                    );
                }
            } else {
                let upserted = change
                    .pods_upserted
                    .iter()
                    .filter_map(|uid| state.pods.get(uid).map(|pod| (uid.clone(), pod.clone())))
                    .collect();
                runtime.apply(&upserted, false);
            }
            for uid in &change.pods_removed {
                runtime.remove(uid);
            }
            if change.snapshot
                || !change.pods_upserted.is_empty()
                || !change.pods_removed.is_empty()
            {
                pods_sender.send_replace(state.pods.clone());
            }
            if change.snapshot
                || !change.services_upserted.is_empty()
                || !change.services_removed.is_empty()
            {
                let keys: Box<dyn Iterator<Item = &String>> = if change.snapshot {
                    Box::new(state.services.keys())
                } else {
                    Box::new(change.services_upserted.iter())
                };
                let update = services::ServiceUpdate {
                    snapshot: change.snapshot,
                    upserted: keys.filter_map(|key| state.services.get(key).cloned()).collect(),
                    removed: change.services_removed.clone(),
                };
                if service_sender.send(update).is_err() {
                    tracing::error!(
                        "the service programming thread is gone; services are no longer programmed"
                    );
                }
            }
        })
    };

    tokio::select! {
        () = follow => {}
        () = shutdown => tracing::info!("shutting down; pods keep running"),
    }
    heartbeat.abort();
    lease.abort();
    usage.abort();
    route_task.abort();
    Ok(())
}

async fn register_until_done(api: &ApiClient, identity: &NodeIdentity) -> node::Registration {
    let mut delay = Duration::from_millis(100);
    loop {
        match node::register(api, identity).await {
            Ok(registration) => {
                tracing::info!(node = %identity.name, created = registration.created, "node registered");
                return registration;
            }
            Err(error) => tracing::warn!(%error, ?delay, "cannot register the node yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Keeps the node's status current. A node that already existed (the agent restarted) is not
/// reported NotReady while the agent waits for its first snapshot: its pods, routes and pinned
/// maps kept serving all along, and a NotReady blip would take its pods out of every service.
async fn heartbeat_loop(
    mut reporter: node::StatusReporter,
    mut ready: watch::Receiver<bool>,
    interval: Duration,
    new_node: bool,
) {
    loop {
        let is_ready = *ready.borrow_and_update();
        let message = if is_ready {
            "the node agent is running and its network is programmed"
        } else {
            "waiting for the first state snapshot from the controller"
        };
        if is_ready || new_node {
            match reporter.sync(is_ready, message).await {
                Ok(true) => tracing::debug!(ready = is_ready, "node status written"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "cannot report the node status"),
            }
        }
        // The next check, or at once when the node turns Ready.
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = ready.changed() => if changed.is_err() { return },
        }
    }
}

/// Renews the node lease every `interval`; a failed renewal is retried sooner (a quarter of
/// the interval), each attempt bounded by the interval so that a dead connection cannot hold
/// the heartbeat up for long.
async fn lease_loop(mut lease: node::NodeLease, interval: Duration) {
    let retry = (interval / 4).max(Duration::from_millis(200));
    let mut failing = false;
    loop {
        let attempt = tokio::time::timeout(interval.max(Duration::from_secs(1)), lease.renew());
        let wait = match attempt.await {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the node lease is renewed again");
                }
                interval
            }
            Ok(Err(error)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%error, "cannot renew the node lease; retrying");
                }
                retry
            }
            Err(_) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(?interval, "renewing the node lease timed out; retrying");
                }
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Peers with a usable address and podCIDR; the others are logged and left out.
fn node_routes(state: &sync::DesiredState) -> BTreeMap<String, NodeRoute> {
    let mut nodes = BTreeMap::new();
    for peer in state.peers.values() {
        match (peer.internal_ip.parse::<Ipv4Addr>(), peer.pod_cidr.parse::<Ipv4Net>()) {
            (Ok(address), Ok(pod_cidr)) => {
                nodes.insert(peer.name.clone(), NodeRoute { address, pod_cidr });
            }
            _ => {
                tracing::warn!(peer = %peer.name, ip = %peer.internal_ip, cidr = %peer.pod_cidr, "peer without a usable address or podCIDR; no route to it")
            }
        }
    }
    nodes
}

async fn route_loop(
    handle: rtnetlink::Handle,
    own_name: String,
    service_cidr: Ipv4Net,
    mut nodes: watch::Receiver<BTreeMap<String, NodeRoute>>,
) {
    // Nothing is reconciled before the first snapshot says what the peers are: the empty
    // initial value would remove every route a previous run installed, and traffic to the
    // other nodes' pods would be unreachable until the snapshot arrives.
    if nodes.changed().await.is_err() {
        return;
    }
    loop {
        let desired = routes::desired_routes(&own_name, &nodes.borrow_and_update(), service_cidr);
        match routes::reconcile_routes(&handle, &desired).await {
            Ok(changes) if changes != routes::RouteChanges::default() => {
                tracing::info!(installed = ?changes.installed, removed = ?changes.removed, "routes reconciled");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "cannot reconcile routes; retrying")
            }
        }
        // Level-triggered: also re-check periodically in case someone removed a route.
        tokio::select! {
            changed = nodes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// Writes the network configuration for other container runtimes on this node.
fn write_conflist(dir: Option<&std::path::Path>, plugin_config: &serde_json::Value) {
    let Some(dir) = dir else { return };
    let mut plugin = plugin_config.clone();
    if let Some(object) = plugin.as_object_mut() {
        object.remove("cniVersion");
        object.remove("name");
    }
    let conflist =
        serde_json::json!({ "cniVersion": "1.1.0", "name": "strait", "plugins": [plugin] });
    let path = dir.join("10-strait.conflist");
    let written = serde_json::to_vec_pretty(&conflist)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, bytes)));
    if let Err(error) = written {
        tracing::error!(path = %path.display(), %error, "cannot write the CNI configuration");
    }
}

/// What a scrape reads from the datapath: drop counters and map usage.
fn scrape_source(
    programs: Arc<Mutex<services::ServicePrograms>>,
    pin_dir: PathBuf,
) -> ScrapeSource {
    Box::new(move || {
        let datapath_drops = match ebpf::antispoof::drop_counts(&pin_dir) {
            Ok(counts) => counts.into_iter().map(|(reason, n)| (reason.to_owned(), n)).collect(),
            Err(error) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(error)), "cannot read the drop counters");
                Vec::new()
            }
        };
        let stats = match programs.lock() {
            Ok(programs) => programs.lb().stats(),
            Err(_) => return ScrapeValues { datapath_drops, ..Default::default() },
        };
        let conntrack_entries = stats
            .maps
            .iter()
            .find(|m| m.name == strait_common::lb::CONNTRACK_MAP)
            .map(|m| m.entries);
        let bpf_maps = stats
            .maps
            .into_iter()
            .map(|m| BpfMapStats {
                map: m.name.to_owned(),
                entries: m.entries,
                capacity: u64::from(m.capacity),
            })
            .collect();
        ScrapeValues { datapath_drops, bpf_maps, conntrack_entries }
    })
}
