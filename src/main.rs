//! `strait`: cluster networking in Rust. One binary: the controller, the node agent, the lab,
//! the benchmarks, and the built-in `strait/netexec` workload.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::FromRawFd,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use strait::{bench, lab, netclient, netexec};
use strait_controlplane::store::StoreLocation;
use strait_dataplane::{ebpf::lb::LbMapSizes, runtime::logs::LogRotation};

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "Cluster networking in Rust: CNI, eBPF service load balancing, and the control plane that drives them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: API server, store, IPAM, scheduler, NodeSync (or, with a
    /// subcommand, issue credentials from the cluster CA).
    Controller(ControllerCommand),
    /// Run a node agent: registers the node, runs its pods, programs routes and eBPF.
    Agent(AgentArgs),
    /// A whole cluster on this machine, in network namespaces.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Measurements that strait ships, each against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The built-in `strait/netexec` workload (what containers with that image run).
    #[command(hide = true)]
    Netexec(NetexecArgs),
    /// The server, client and probe of `strait bench services`.
    #[command(hide = true)]
    BenchWorker {
        #[command(subcommand)]
        command: BenchWorkerCommand,
    },
    /// Writes one container's log (started by the agent for each container).
    #[command(hide = true)]
    LogShim(LogShimArgs),
    /// The test client paired with netexec: prints what answered as JSON.
    #[command(hide = true)]
    Netclient {
        #[command(subcommand)]
        command: NetclientCommand,
    },
}

#[derive(Subcommand)]
enum NetclientCommand {
    /// N new TCP connections, each one HTTP GET against netexec.
    Tcp {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Connections held open at once (the oldest closes beyond this many).
        #[arg(long, default_value_t = 0)]
        keep: u32,
        #[arg(long, default_value = "/hostname")]
        path: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Connect from this local port every time (0: any).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
        /// Pause between two connections (a steady request rate, as a load generator).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// One large `POST /echo` and one large datagram, each checked byte for byte.
    Echo {
        /// netexec's HTTP address.
        #[arg(long)]
        http: std::net::SocketAddrV4,
        /// netexec's UDP address.
        #[arg(long)]
        udp: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 65_536)]
        http_bytes: usize,
        #[arg(long, default_value_t = 8192)]
        udp_bytes: usize,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Long-lived keep-alive connections used all along while new ones keep being made.
    Hold {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 200)]
        connections: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 20)]
        new_every_ms: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// What the new connections ask for (the long-lived ones ask for `/hostname`).
        #[arg(long, default_value = "/hostname")]
        path: String,
    },
    /// One DNS query for the A records of a name.
    Dns {
        #[arg(long, default_value = "10.96.0.10:53")]
        server: std::net::SocketAddrV4,
        #[arg(long)]
        name: String,
        /// Over TCP instead of UDP.
        #[arg(long)]
        tcp: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// N `hostname` datagrams from one unconnected UDP socket.
    Udp {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Local port to send from (0: any).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
        /// Pause between datagrams.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ControllerCommand {
    #[command(subcommand)]
    credentials: Option<CredentialsCommand>,
    #[command(flatten)]
    run: ControllerArgs,
}

/// Credentials issued offline from the cluster CA in the controller's PKI directory.
#[derive(Subcommand)]
enum CredentialsCommand {
    /// Issue the identity of a node agent (`system:node:NODE` in `system:nodes`): writes
    /// `ca.crt`, `tls.crt` and `tls.key` into DIR, for `strait agent --credentials-dir DIR`.
    IssueNodeCredentials {
        #[command(flatten)]
        pki: PkiArgs,
        /// The node's name (its agent's `--node-name`).
        #[arg(long)]
        node: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write a kubeconfig with the cluster's admin credential, for the API at `--server`.
    AdminKubeconfig {
        #[command(flatten)]
        pki: PkiArgs,
        /// The API's URL as clients reach it, e.g. `https://192.0.2.1:6443` (an address the
        /// serving certificate covers: see `--tls-san`).
        #[arg(long)]
        server: String,
        /// The name of the cluster, context and user in the file.
        #[arg(long, default_value = "default")]
        cluster: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct PkiArgs {
    /// The controller's data directory.
    #[arg(long, default_value = "/var/lib/strait/controller")]
    data_dir: PathBuf,
    /// The cluster PKI directory (default: `<data-dir>/pki`).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
}

impl PkiArgs {
    fn pki_dir(&self) -> PathBuf {
        self.pki_dir
            .clone()
            .unwrap_or_else(|| strait_controlplane::ControllerConfig::new(&self.data_dir).pki_dir)
    }
}

#[derive(Args)]
struct ControllerArgs {
    /// Directory of the embedded store.
    #[arg(long, default_value = "/var/lib/strait/controller")]
    data_dir: PathBuf,
    /// The cluster PKI: CA and admin credential, created on first start (default:
    /// `<data-dir>/pki`). Replicas of one control plane share it.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// A DNS name or IP address the serving certificate covers besides the listeners' own
    /// addresses, localhost and the host name (repeatable): how clients reach the API.
    #[arg(long)]
    tls_san: Vec<String>,
    /// The network namespace file (e.g. `/run/netns/NAME`) from which the API server connects
    /// to nodes (their log servers), when they are not reachable from its own.
    #[arg(long)]
    node_netns: Option<PathBuf>,
    /// Address to serve the API and NodeSync on (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// An already bound listening socket handed over as this file descriptor (repeatable).
    #[arg(long)]
    listen_fd: Vec<i32>,
    /// Name of the cluster.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// The range pod CIDRs are cut from.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_prefix: u8,
    /// The range service cluster IPs are given from.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: Ipv4Net,
    /// The cluster IP of kube-system/kube-dns (inside --service-cidr).
    #[arg(long, default_value = "10.96.0.10")]
    cluster_dns_ip: Ipv4Addr,
    /// How long an event is kept after it last happened, in seconds.
    #[arg(long, default_value_t = 3600)]
    event_ttl_seconds: u64,
    /// Seconds a node's lease may go unrenewed before the node is marked Unknown.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period_seconds: u64,
    /// Seconds pods tolerate a not-ready node by default before they are evicted.
    #[arg(long, default_value_t = 300)]
    default_not_ready_toleration_seconds: i64,
    /// Seconds pods tolerate an unreachable node by default before they are evicted.
    #[arg(long, default_value_t = 300)]
    default_unreachable_toleration_seconds: i64,
    /// Where the cluster's state lives: `embedded` (a file in --data-dir) or
    /// `etcd://host:port[,host:port…][/root]` (keys under /strait/<cluster> by default).
    /// Several controllers may share one etcd cluster: all serve the API, one leads.
    #[arg(long, default_value = "embedded")]
    store: strait_controlplane::store::StoreLocation,
    /// On etcd: seconds the leader's lease lasts unrenewed (how long a dead leader's
    /// scheduler and controllers stay unreplaced).
    #[arg(long, default_value_t = 3)]
    leader_lease_seconds: u64,
    /// Seconds between two evaluations of each horizontal pod autoscaler.
    #[arg(long, default_value_t = 15)]
    horizontal_pod_autoscaler_sync_period_seconds: u64,
    /// Usage ratios within 1 ± this do not change an autoscaled replica count.
    #[arg(long, default_value_t = 0.1)]
    horizontal_pod_autoscaler_tolerance: f64,
    /// Seconds an autoscaler remembers its recommendations before it scales down.
    #[arg(long, default_value_t = 300)]
    horizontal_pod_autoscaler_downscale_stabilization_seconds: u64,
}

#[derive(Args)]
struct AgentArgs {
    /// Name of this node (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// This node's address, where other nodes send traffic for its pods.
    #[arg(long)]
    node_ip: Ipv4Addr,
    /// The controller's base URL, `https://HOST:PORT`, or several replicas' URLs separated by
    /// commas.
    #[arg(long)]
    controller: String,
    /// This node's credentials: `ca.crt`, `tls.crt`, `tls.key`, as written by `strait
    /// controller issue-node-credentials` (default: `<state-dir>/credentials`).
    #[arg(long)]
    credentials_dir: Option<PathBuf>,
    /// Name of the cluster (part of pin paths and namespace names).
    #[arg(long, default_value = "default")]
    cluster: String,
    #[arg(long, default_value = "/var/lib/strait/agent")]
    state_dir: PathBuf,
    /// Prefix of pod network namespace names (default: `strait-<cluster>_`).
    #[arg(long)]
    netns_prefix: Option<String>,
    /// The agent's cgroup subtree below the cgroup2 mount (default: `strait/<cluster>/<node>`).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// The CNI plugin binary (default: `strait-cni` next to this binary).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// Where to write `10-strait.conflist` for other container runtimes.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Seconds between checks of the Node's status (written only when it changed).
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds after which the Node's status is written even if nothing changed.
    #[arg(long, default_value_t = 300)]
    status_refresh_seconds: u64,
    /// The node lease's duration in seconds.
    #[arg(long, default_value_t = 40)]
    lease_duration_seconds: u64,
    /// Milliseconds between renewals of the node lease.
    #[arg(long, default_value_t = 10_000)]
    lease_renew_ms: u64,
    /// Milliseconds between reports of the node's and its pods' CPU and memory usage.
    #[arg(long, default_value_t = 15_000)]
    usage_report_ms: u64,
    /// The cluster's service CIDR (the controller's `--service-cidr`).
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: ipnet::Ipv4Net,
    /// The cluster DNS VIP written into pods' resolv.conf.
    #[arg(long, default_value = "10.96.0.10")]
    cluster_dns: Ipv4Addr,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Where this node's DNS server listens (default: the node IP, port 53).
    #[arg(long)]
    dns_listen: Option<std::net::SocketAddrV4>,
    /// Where to serve Prometheus metrics (default: the node IP, port 10249); `off` to disable.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Where the API server reads container logs, over TLS (default: the node IP, port
    /// 10250, kubelet's); `off` to disable.
    #[arg(long)]
    log_listen: Option<String>,
    /// Capacities of the load balancer's maps, applied when the maps are first created
    /// (pinned maps keep their size across agent restarts).
    #[command(flatten)]
    lb_sizes: LbSizeArgs,
    /// Seconds a crashed container waits before its second restart; each further restart
    /// waits twice as long, up to `--restart-backoff-max` (Kubernetes: 10 and 300).
    #[arg(long, default_value_t = 10.0)]
    restart_backoff: f64,
    #[arg(long, default_value_t = 300.0)]
    restart_backoff_max: f64,
    /// Size in bytes at which a container's log file is rotated (kubelet's
    /// `containerLogMaxSize`, 10 MiB).
    #[arg(long, default_value_t = LogRotation::default().max_size)]
    container_log_max_size: u64,
    /// Log files kept per container incarnation, the live one included (kubelet's
    /// `containerLogMaxFiles`, 5).
    #[arg(long, default_value_t = LogRotation::default().max_files, value_parser = clap::value_parser!(u32).range(1..=63))]
    container_log_max_files: u32,
}

/// The log shim of one container incarnation: the container's stdout on stdin, its stderr
/// on fd 3, written to `--path` (see the agent's `runtime/logs.rs`).
#[derive(Args)]
struct LogShimArgs {
    #[arg(long)]
    path: PathBuf,
    #[arg(long)]
    max_size: u64,
    #[arg(long)]
    max_files: u32,
}

#[derive(Args)]
struct LbSizeArgs {
    /// Service ports the load balancer holds.
    #[arg(long, default_value_t = LbMapSizes::default().frontends)]
    lb_frontends: u32,
    /// Backends over all service ports.
    #[arg(long, default_value_t = LbMapSizes::default().backends)]
    lb_backends: u32,
    /// ClientIP affinity entries.
    #[arg(long, default_value_t = LbMapSizes::default().affinity)]
    lb_affinity: u32,
    /// Sockets translated by the socket hooks.
    #[arg(long, default_value_t = LbMapSizes::default().sockets)]
    lb_sockets: u32,
    /// Conntrack entries of the tc path (two per flow).
    #[arg(long, default_value_t = LbMapSizes::default().conntrack)]
    lb_conntrack: u32,
    /// Fragmented datagrams in flight on the tc path.
    #[arg(long, default_value_t = LbMapSizes::default().fragments)]
    lb_fragments: u32,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a lab and wait until every node is Ready.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "default")]
        name: String,
        /// Seconds to wait for every node to be Ready.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Where the lab's controllers keep the cluster: `embedded` (default) or an etcd,
        /// `etcd://host:port[,host:port…]` (keys under /strait/<lab>).
        #[arg(long, default_value = "embedded")]
        store: StoreLocation,
        /// Controller replicas (more than one needs --store etcd://…): all serve the API and
        /// NodeSync, one leads; agents are given every replica.
        #[arg(long, default_value_t = 1)]
        controllers: usize,
        /// An extra argument of the controllers (repeatable), e.g.
        /// `--controller-arg=--node-monitor-grace-period-seconds=5`.
        #[arg(long, allow_hyphen_values = true)]
        controller_arg: Vec<String>,
        /// An extra argument of every agent (repeatable), e.g. `--agent-arg=--lease-renew-ms=1000`.
        #[arg(long, allow_hyphen_values = true)]
        agent_arg: Vec<String>,
    },
    /// Stop a node as if it died: kill its agent (its pods keep running) and take its link
    /// off the fabric.
    Stop {
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (`node-1`).
        node: String,
    },
    /// Bring a stopped node back: its link on the fabric, then its agent.
    Start {
        #[arg(long, default_value = "default")]
        name: String,
        node: String,
    },
    /// Remove every trace of a lab: processes, namespaces, links, pins, cgroups, state.
    Down {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Show a lab's nodes and processes.
    Status {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Kill a lab process with SIGKILL and start it again (what it set up stays).
    Restart {
        #[arg(long, default_value = "default")]
        name: String,
        /// `controller` (or `controller-N` of several), or a node name (`node-1`) for that
        /// node's agent.
        process: lab::LabProcess,
    },
    /// Print the path of a lab's kubeconfig.
    Kubeconfig {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Run a command in a pod's network namespace and cgroup.
    Exec {
        #[arg(long, default_value = "default")]
        name: String,
        /// `<namespace>/<pod>` (or just `<pod>` in `default`).
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run a command in a node's network namespace.
    NodeExec {
        #[arg(long, default_value = "default")]
        name: String,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Pod startup latency in a lab (create → Running and Ready), beside bare namespaces
    /// running the same workload.
    Startup {
        #[arg(long, default_value_t = 100)]
        pods: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Pods scheduled per second from a burst of pending pods, beside the API's write rate.
    Scheduler {
        #[arg(long, default_value_t = 1000)]
        pods: usize,
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The API server on the embedded store and on etcd, side by side: create and update
    /// rates and latencies, list latency of a large collection, watch fan-out latency.
    Api {
        /// A short run of every phase (smoke test).
        #[arg(long)]
        quick: bool,
    },
    /// Time `lab up` and `lab down` of a lab of N nodes.
    Lab {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// CNI ADD/DEL latency of strait-cni beside the reference bridge + host-local plugins.
    Cni(bench::CniArgs),
    /// What a service costs per connection, per request and per change as services grow:
    /// strait's socket and tc paths and kube-proxy's rule sets beside direct pod-IP
    /// connections, in a lab of its own.
    Services(bench::ServicesArgs),
    /// Pod-to-pod traffic on one node and across nodes, beside plain veths and routes.
    Pods(bench::PodsArgs),
}

/// The processes `strait bench services` and `strait bench pods` run inside their labs.
#[derive(Subcommand)]
enum BenchWorkerCommand {
    /// Serves new connections, request/response and streams, one connection at a time.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        cpu: usize,
    },
    /// New connections one after another; prints a JSON report.
    ConnRate(BenchClientArgs),
    /// 1-byte requests and answers on one connection; prints a JSON report.
    RequestResponse(BenchClientArgs),
    /// One connection writing as fast as it can; prints a JSON report.
    Stream(BenchClientArgs),
    /// Waits for `open ADDR` / `closed ADDR` lines on stdin to come true.
    Probe,
    /// Holds and programs services as the node agent does, on commands from stdin.
    AgentServices {
        #[arg(long)]
        pin_dir: std::path::PathBuf,
        #[arg(long)]
        first_vip: std::net::Ipv4Addr,
        #[arg(long)]
        service_port: u16,
        #[arg(long = "backend")]
        backends: Vec<std::net::SocketAddrV4>,
    },
}

#[derive(Args)]
struct BenchClientArgs {
    #[arg(long)]
    target: std::net::SocketAddrV4,
    #[arg(long, default_value_t = 200)]
    warmup_ms: u64,
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    #[arg(long, default_value_t = 0)]
    cpu: usize,
}

impl BenchClientArgs {
    fn run<T: serde::Serialize>(
        &self,
        client: fn(std::net::SocketAddrV4, Duration, Duration, usize) -> anyhow::Result<T>,
    ) -> anyhow::Result<()> {
        let report = client(
            self.target,
            Duration::from_millis(self.warmup_ms),
            Duration::from_millis(self.duration_ms),
            self.cpu,
        )?;
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

#[derive(Args)]
struct NetexecArgs {
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    #[arg(long, default_value_t = 8081)]
    udp_port: u16,
    /// On SIGTERM, keep serving this many seconds before exiting.
    #[arg(long)]
    shutdown_delay_seconds: Option<u64>,
    /// What `/release` answers: the version of the workload, so that clients can tell a
    /// rollout's old pods from its new ones.
    #[arg(long, default_value = "")]
    release: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The shim is a plain blocking program: no async runtime of its own per container.
    if let Command::LogShim(args) = &cli.command {
        return run_log_shim(args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("strait: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("strait: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Controller(ControllerCommand { credentials: None, run }) => {
            run_controller(run).await?
        }
        Command::Controller(ControllerCommand { credentials: Some(command), .. }) => {
            issue_credentials(command)?
        }
        Command::Agent(args) => run_agent(args).await?,
        Command::LogShim(args) => return Ok(run_log_shim(&args)),
        Command::Lab { command } => return run_lab(command).await,
        Command::Bench { command } => match command {
            BenchCommand::Lab { nodes, runs } => {
                let report =
                    bench::lab_up_down(nodes, runs, &sibling_binary("strait-cni")?).await?;
                println!("{report}");
            }
            BenchCommand::Startup { pods, nodes } => {
                let cni = sibling_binary("strait-cni")?;
                println!("{}", bench::startup::startup(pods, nodes, &cni).await?)
            }
            BenchCommand::Scheduler { pods, nodes, runs } => {
                println!("{}", bench::scheduler::scheduler(pods, nodes, runs).await?)
            }
            BenchCommand::Api { quick } => {
                let options = if quick {
                    bench::api::ApiBenchOptions::QUICK
                } else {
                    bench::api::ApiBenchOptions::FULL
                };
                println!("{}", bench::api::api(options).await?)
            }
            BenchCommand::Cni(args) => bench::cni(&args, &sibling_binary("strait-cni")?)?,
            BenchCommand::Services(args) => bench::services(&args, &sibling_binary("strait-cni")?)?,
            BenchCommand::Pods(args) => bench::pods(&args, &sibling_binary("strait-cni")?)?,
        },
        Command::BenchWorker { command } => match command {
            BenchWorkerCommand::Serve { port, cpu } => bench::worker::serve(port, cpu)?,
            BenchWorkerCommand::ConnRate(args) => args.run(bench::worker::conn_rate)?,
            BenchWorkerCommand::RequestResponse(args) => {
                args.run(bench::worker::request_response)?
            }
            BenchWorkerCommand::Stream(args) => args.run(bench::worker::stream)?,
            BenchWorkerCommand::AgentServices { pin_dir, first_vip, service_port, backends } => {
                bench::worker::agent_services(&bench::worker::AgentServicesOptions {
                    pin_dir,
                    first_vip,
                    service_port,
                    backends,
                })?
            }
            BenchWorkerCommand::Probe => bench::worker::probe()?,
        },
        Command::Netclient { command } => {
            let report = match command {
                NetclientCommand::Tcp {
                    target,
                    count,
                    keep,
                    path,
                    timeout_ms,
                    source_port,
                    interval_ms,
                } => serde_json::to_string(&netclient::tcp(&netclient::TcpOptions {
                    target,
                    count,
                    keep,
                    path,
                    timeout: Duration::from_millis(timeout_ms),
                    source_port,
                    interval: Duration::from_millis(interval_ms),
                }))?,
                NetclientCommand::Echo { http, udp, http_bytes, udp_bytes, timeout_ms } => {
                    serde_json::to_string(&netclient::echo(&netclient::EchoOptions {
                        http,
                        udp,
                        http_bytes,
                        udp_bytes,
                        timeout: Duration::from_millis(timeout_ms),
                    }))?
                }
                NetclientCommand::Hold {
                    target,
                    connections,
                    seconds,
                    new_every_ms,
                    timeout_ms,
                    path,
                } => serde_json::to_string(&netclient::hold(&netclient::HoldOptions {
                    target,
                    connections,
                    duration: Duration::from_secs(seconds),
                    new_every: Duration::from_millis(new_every_ms),
                    timeout: Duration::from_millis(timeout_ms),
                    path,
                }))?,
                NetclientCommand::Dns { server, name, tcp, timeout_ms } => serde_json::to_string(
                    &netclient::dns(server, &name, tcp, Duration::from_millis(timeout_ms)),
                )?,
                NetclientCommand::Udp { target, count, source_port, interval_ms, timeout_ms } => {
                    let options = netclient::UdpOptions {
                        target,
                        count,
                        source_port,
                        interval: Duration::from_millis(interval_ms),
                        timeout: Duration::from_millis(timeout_ms),
                    };
                    serde_json::to_string(&netclient::udp(&options).context("netclient udp")?)?
                }
            };
            println!("{report}");
        }
        Command::Netexec(args) => {
            let ports = netexec::NetexecPorts { http: args.http_port, udp: args.udp_port };
            let delay = args.shutdown_delay_seconds.map(std::time::Duration::from_secs);
            netexec::run(ports, delay, args.release).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the process still stops on the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for address in &args.listen {
        listeners.push(TcpListener::bind(address).with_context(|| format!("binding {address}"))?);
    }
    for fd in &args.listen_fd {
        listeners.push(inherited_listener(*fd)?);
    }
    if listeners.is_empty() {
        bail!("nothing to serve on: give --listen ADDRESS or --listen-fd FD");
    }
    let mut config = strait_controlplane::server::ControllerConfig::new(args.data_dir);
    if let Some(pki_dir) = args.pki_dir {
        config.pki_dir = pki_dir;
    }
    config.tls_sans = args.tls_san;
    config.node_netns = args.node_netns;
    config.cluster_cidr = ipnet::IpNet::V4(args.cluster_cidr);
    config.node_cidr_prefix = args.node_cidr_prefix;
    config.service_cidr = args.service_cidr;
    config.cluster_dns_ip = args.cluster_dns_ip;
    config.event_ttl = Duration::from_secs(args.event_ttl_seconds);
    config.node_lifecycle.grace_period =
        Duration::from_secs(args.node_monitor_grace_period_seconds);
    config.autoscaler.sync_period =
        Duration::from_secs(args.horizontal_pod_autoscaler_sync_period_seconds.max(1));
    config.autoscaler.tolerance = args.horizontal_pod_autoscaler_tolerance;
    config.autoscaler.downscale_stabilization =
        Duration::from_secs(args.horizontal_pod_autoscaler_downscale_stabilization_seconds);
    config.registry.default_tolerations =
        strait_controlplane::api::kinds::pod::DefaultTolerationSeconds {
            not_ready: args.default_not_ready_toleration_seconds,
            unreachable: args.default_unreachable_toleration_seconds,
        };
    config.store = match args.store {
        StoreLocation::Etcd { endpoints, root: None } => StoreLocation::Etcd {
            endpoints,
            root: Some(strait_controlplane::store::EtcdStoreOptions::default_root(&args.cluster)),
        },
        other => other,
    };
    config.leader_lease = Duration::from_secs(args.leader_lease_seconds);
    let host = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    config.replica_name = format!("{host}/{}", std::process::id());
    tracing::info!(cluster = %args.cluster, store = %config.store, "controller starting");
    strait_controlplane::server::run(config, listeners, termination()).await?;
    Ok(())
}

fn issue_credentials(command: CredentialsCommand) -> anyhow::Result<()> {
    use strait_controlplane::auth::{ClusterPki, kubeconfig::write_kubeconfig};
    match command {
        CredentialsCommand::IssueNodeCredentials { pki, node, out } => {
            if let Some(why) = strait_controlplane::api::validation::dns1123_subdomain(&node) {
                bail!("--node {node:?} is not a valid node name: {why}");
            }
            let credentials = ClusterPki::open(&pki.pki_dir())?.issue_node(&node)?;
            credentials.write_dir(&out)?;
            println!("credentials of node {node} written to {}", out.display());
        }
        CredentialsCommand::AdminKubeconfig { pki, server, cluster, out } => {
            if !server.starts_with("https://") {
                bail!("--server {server:?}: the API is served over HTTPS only (https://HOST:PORT)");
            }
            let admin = ClusterPki::open(&pki.pki_dir())?.admin_credentials()?;
            write_kubeconfig(&out, &cluster, &server, &admin)?;
            println!("admin kubeconfig written to {}", out.display());
        }
    }
    Ok(())
}

/// A listening TCP socket passed in by the process that started this one.
fn inherited_listener(fd: i32) -> anyhow::Result<TcpListener> {
    // SAFETY: fstat only fills the zeroed struct; an fd that is not open gives EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        bail!("--listen-fd {fd} is not open: {}", std::io::Error::last_os_error());
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--listen-fd {fd} is not a socket");
    }
    // SAFETY: fd is an open socket handed to this process, owned by nothing else here.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    listener.local_addr().with_context(|| format!("--listen-fd {fd} is not a TCP listener"))?;
    Ok(listener)
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let node_name = match args.node_name {
        Some(name) => name,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let credentials_dir =
        args.credentials_dir.unwrap_or_else(|| args.state_dir.join("credentials"));
    let credentials = strait_controlplane::auth::ClientCredentials::read_dir(&credentials_dir)
        .with_context(|| {
            format!(
                "reading the node's credentials from {} (issue them with `strait controller issue-node-credentials`)",
                credentials_dir.display()
            )
        })?;
    let config = strait_dataplane::agent::AgentConfig {
        credentials,
        netns_prefix: args.netns_prefix.unwrap_or_else(|| format!("strait-{}_", args.cluster)),
        cgroup_root: args
            .cgroup_root
            .unwrap_or_else(|| PathBuf::from("strait").join(&args.cluster).join(&node_name)),
        cni_plugin: match args.cni_plugin {
            Some(path) => path,
            None => sibling_binary("strait-cni")?,
        },
        cni_conf_dir: Some(args.cni_conf_dir),
        strait_exe: std::env::current_exe().context("locating the strait binary")?,
        node_name,
        node_ip: args.node_ip,
        controller: args.controller,
        cluster: args.cluster,
        state_dir: args.state_dir,
        heartbeat: Duration::from_secs(args.heartbeat_seconds),
        status_refresh: Duration::from_secs(args.status_refresh_seconds),
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        lease_renew_interval: Duration::from_millis(args.lease_renew_ms),
        usage_report_interval: Duration::from_millis(args.usage_report_ms.max(100)),
        service_cidr: args.service_cidr,
        cluster_dns: args.cluster_dns,
        cluster_domain: args.cluster_domain,
        dns_listen: args.dns_listen.unwrap_or(std::net::SocketAddrV4::new(args.node_ip, 53)),
        metrics_listen: match args.metrics_listen.as_deref() {
            Some("off") => None,
            Some(address) => {
                Some(address.parse().with_context(|| format!("--metrics-listen {address:?}"))?)
            }
            None => Some(SocketAddr::from((args.node_ip, 10249))),
        },
        log_listen: match args.log_listen.as_deref() {
            Some("off") => None,
            Some(address) => {
                Some(address.parse().with_context(|| format!("--log-listen {address:?}"))?)
            }
            None => Some(SocketAddr::from((
                args.node_ip,
                strait_dataplane::agent::log_server::DEFAULT_PORT,
            ))),
        },
        lb_sizes: LbMapSizes {
            frontends: args.lb_sizes.lb_frontends,
            backends: args.lb_sizes.lb_backends,
            affinity: args.lb_sizes.lb_affinity,
            sockets: args.lb_sizes.lb_sockets,
            conntrack: args.lb_sizes.lb_conntrack,
            fragments: args.lb_sizes.lb_fragments,
        },
        restart_backoff: strait_dataplane::runtime::backoff::BackoffPolicy {
            initial: seconds_arg("--restart-backoff", args.restart_backoff)?,
            max: seconds_arg("--restart-backoff-max", args.restart_backoff_max)?,
        },
        log_rotation: LogRotation {
            max_size: args.container_log_max_size,
            max_files: args.container_log_max_files,
        },
    };
    strait_dataplane::agent::run(config, termination()).await
}

fn run_log_shim(args: &LogShimArgs) -> ExitCode {
    // Signals meant for the container or a terminal are not the shim's: it ends when its
    // pipes close, after the container's last words are written.
    for signal in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        // SAFETY: SIG_IGN installs no handler code.
        if let Err(error) =
            unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) }
        {
            eprintln!("strait log-shim: ignoring {signal}: {error}");
        }
    }
    // SAFETY: the agent put the stdout pipe on stdin and the stderr pipe on this descriptor,
    // for this process alone; nothing else here uses either.
    let (stdout, stderr) = unsafe {
        (
            std::fs::File::from_raw_fd(0),
            std::fs::File::from_raw_fd(strait_dataplane::runtime::process::LOG_SHIM_STDERR_FD),
        )
    };
    let rotation = LogRotation { max_size: args.max_size, max_files: args.max_files };
    match strait_dataplane::runtime::logs::run_shim(&args.path, rotation, stdout, stderr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strait log-shim {}: {error}", args.path.display());
            ExitCode::FAILURE
        }
    }
}

/// A duration given in (fractional) seconds.
fn seconds_arg(flag: &str, seconds: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .with_context(|| format!("{flag} {seconds}: not a duration in seconds"))
}

/// A binary that ships next to this one.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the strait binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}; build both with `cargo build --release`",
            name,
            exe.display()
        );
    }
    Ok(path)
}

async fn run_lab(command: LabCommand) -> anyhow::Result<ExitCode> {
    match command {
        LabCommand::Up {
            nodes,
            name,
            timeout,
            store,
            controllers,
            controller_arg: controller_args,
            agent_arg: agent_args,
        } => {
            let started = std::time::Instant::now();
            let options = lab::UpOptions {
                name,
                nodes,
                strait_exe: std::env::current_exe()?,
                cni_plugin: sibling_binary("strait-cni")?,
                ready_timeout: Duration::from_secs(timeout),
                controller_args,
                agent_args,
            };
            let control = lab::ControlPlaneOptions { store, controllers };
            let state = lab::up_with(&options, &control).await?;
            println!(
                "lab {} is up: {} nodes Ready in {:.1}s",
                state.name,
                state.nodes.len(),
                started.elapsed().as_secs_f64()
            );
            println!("API server: {}", state.api_server);
            println!("kubeconfig: {}", state.kubeconfig.display());
            println!("try: KUBECONFIG={} kubectl get nodes -o wide", state.kubeconfig.display());
        }
        LabCommand::Down { name } => {
            let report = lab::down(&name)?;
            println!(
                "lab {name} removed: {} processes stopped, {} namespaces deleted, pins {}, state {}",
                report.processes_killed,
                report.namespaces.len(),
                if report.pins_removed { "removed" } else { "none" },
                if report.state_removed { "removed" } else { "none" },
            );
        }
        LabCommand::Status { name } => print!("{}", lab_status(&name).await?),
        LabCommand::Restart { name, process } => {
            let pid = lab::restart(&name, &process)?;
            println!("{process:?} of lab {name} restarted as pid {pid}");
        }
        LabCommand::Stop { name, node } => {
            lab::kill(&name, &lab::LabProcess::Agent(node.clone()))?;
            lab::set_node_link(&name, &node, false).await?;
            println!("{node} of lab {name} stopped: agent killed, link down");
        }
        LabCommand::Start { name, node } => {
            lab::set_node_link(&name, &node, true).await?;
            let pid = lab::start(&name, &lab::LabProcess::Agent(node.clone()))?;
            println!("{node} of lab {name} started: link up, agent pid {pid}");
        }
        LabCommand::Kubeconfig { name } => {
            println!("{}", lab::LabState::load(&name)?.kubeconfig.display())
        }
        LabCommand::Exec { name, pod, command } => {
            let code = lab::exec_in_pod(&name, &pod, &command).await?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        LabCommand::NodeExec { name, node, command } => {
            let code = lab::exec_in_node(&name, &node, &command)?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn lab_status(name: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let state = lab::LabState::load(name)?;
    let api = state.api_client()?;
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let mut out = String::new();
    writeln!(
        out,
        "lab {} — API {} — kubeconfig {}",
        state.name,
        state.api_server,
        state.kubeconfig.display()
    )?;
    writeln!(
        out,
        "controller pid {} {}",
        state.controller_pid,
        if alive(state.controller_pid) { "running" } else { "NOT RUNNING" }
    )?;
    for replica in &state.replicas {
        writeln!(
            out,
            "controller-{} pid {} {} — API {}",
            replica.index,
            replica.pid,
            if alive(replica.pid) { "running" } else { "NOT RUNNING" },
            replica.api_server
        )?;
    }
    writeln!(out, "store: {}", state.store)?;
    let nodes = api.list::<k8s_openapi::api::core::v1::Node>(None, "").await.map(|(n, _)| n);
    writeln!(out, "{:<10} {:<14} {:<16} {:<8} AGENT", "NODE", "ADDRESS", "POD CIDR", "READY")?;
    for node in &state.nodes {
        let object = nodes
            .as_ref()
            .ok()
            .and_then(|all| all.iter().find(|n| n.metadata.name.as_deref() == Some(&node.name)));
        let cidr =
            object.and_then(|n| n.spec.as_ref()?.pod_cidr.clone()).unwrap_or_else(|| "-".into());
        let ready = object.map_or("?", |n| if lab::is_node_ready(n) { "True" } else { "False" });
        let agent = if alive(node.agent_pid) {
            format!("pid {} running", node.agent_pid)
        } else {
            format!("pid {} NOT RUNNING", node.agent_pid)
        };
        writeln!(out, "{:<10} {:<14} {:<16} {:<8} {agent}", node.name, node.address, cidr, ready)?;
    }
    if let Err(error) = nodes {
        writeln!(out, "(the API did not answer: {error})")?;
    }
    Ok(out)
}
