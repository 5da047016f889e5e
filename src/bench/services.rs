//! `strait bench services`: new-connection rate and latency through a service, per routing
//! mode, beside `direct` (the client connecting to a backend's pod IP) measured in the same
//! run with the same client.
//!
//! The lab is its own: two node namespaces joined by a veth, a client pod on node A and the
//! backend pods on node B plumbed by the real strait-cni (tc programs on the host veths), a
//! private pin directory per node and a cgroup under `strait/` carrying the socket hooks. The
//! root namespace gets no route and no sysctl; everything goes on drop, on error and on
//! Ctrl-C (the children stop with the signal, the bench sees them fail and unwinds).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use strait_dataplane::{
    cgroup::Cgroup,
    ebpf::{
        antispoof::AntiSpoof,
        lb::{Backend, FrontendKey, L4Protocol, LbMapSizes, ServiceFrontend, ServiceLb},
    },
    netns::NetNs,
    runtime::process::ChildSetup,
};

use super::{
    kube_proxy::{self, RuleService},
    worker::ConnRateReport,
};

/// The service range of the bench: large enough for 100,000 services and more.
const SERVICE_CIDR: &str = "10.96.0.0/12";
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 9000;
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;
/// Node A ↔ node B.
const NODE_A_ADDRESS: &str = "172.31.255.1";
const NODE_B_ADDRESS: &str = "172.31.255.2";
const NODE_LINK: &str = "nodelink";
const CLIENT_SUBNET: &str = "10.244.1.0/24";
const BACKEND_SUBNET: &str = "10.244.2.0/24";

/// Set by SIGINT/SIGTERM: the bench stops at the next step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// Options of `strait bench services`.
#[derive(clap::Args, Debug)]
pub struct ServicesArgs {
    /// N = 1 and 1,000, M = 1, short runs (within 3 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Numbers of services to measure at (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<usize>,
    /// Endpoints per service to measure at (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<usize>,
    /// Modes to measure (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<Mode>,
    /// Measured seconds per repetition (default 3, 1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Repetitions per figure.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Where to write JSON and CSV (default `bench-results/services-<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How the client reaches a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// To a backend's pod IP: the floor.
    Direct,
    /// To the VIP from the hooked cgroup: connect() is translated.
    EbpfSocket,
    /// To the VIP from outside the hooked cgroup: packets are translated on the client's veth.
    EbpfTc,
    /// kube-proxy's nftables-mode structure, loaded with `nft -f` in node A.
    Nftables,
    /// kube-proxy's iptables-mode structure, `iptables-nft-restore` in node A.
    Iptables,
    /// The same with `iptables-legacy-restore`. Measured last: the legacy nat table stays
    /// registered in node A once made, so it would weigh on every mode after it.
    IptablesLegacy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::EbpfSocket => "ebpf-socket",
            Mode::EbpfTc => "ebpf-tc",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::IptablesLegacy => "iptables-legacy",
        }
    }
}

const ALL_MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::EbpfSocket,
    Mode::EbpfTc,
    Mode::Nftables,
    Mode::Iptables,
    Mode::IptablesLegacy,
];

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace of the bench, deleted on drop.
struct Namespace {
    ns: Option<NetNs>,
    name: String,
}

impl Namespace {
    fn new(name: String) -> anyhow::Result<Self> {
        let ns = NetNs::create(&name).with_context(|| format!("creating namespace {name}"))?;
        let namespace = Self { ns: Some(ns), name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("open until dropped")
    }

    fn path(&self) -> PathBuf {
        strait_dataplane::netns::named_path(&self.name)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .context("running ip")?;
        ensure!(
            output.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A command whose child joins this namespace between fork and exec.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        ChildSetup::new().enter_netns(&self.path())?.install(&mut command);
        Ok(command)
    }

    /// Fails unless traffic from here to `destination` leaves through `device`, a link of the
    /// lab (DESIGN.md, Network safety). Called before anything is sent.
    fn check_route(&self, destination: &str, device: &str) -> anyhow::Result<()> {
        assert_not_root_namespace(&self.path())?;
        let routes: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "route", "get", destination])?)?;
        let found = routes[0]["dev"].as_str().unwrap_or_default();
        ensure!(
            found == device,
            "traffic from {} to {destination} would leave through {found:?}, not {device}: aborting",
            self.name
        );
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.ns.take();
        if let Err(e) = NetNs::delete(&self.name) {
            eprintln!("removing namespace {}: {e}", self.name);
        }
    }
}

fn assert_not_root_namespace(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/1/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .context("reading the root namespace")?;
    let this = std::fs::metadata(path).context("reading a lab namespace")?;
    ensure!(
        (root.dev(), root.ino()) != (this.dev(), this.ino()),
        "{} is the root network namespace: refusing to go on",
        path.display()
    );
    Ok(())
}

/// A directory removed with its contents on drop (pins, IPAM data).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// The bench cgroup under `strait/`: its processes are killed and it is removed on drop.
struct CgroupGuard(Cgroup);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill_all(Duration::from_secs(5)) {
            eprintln!("stopping the processes of {}: {e}", self.0.path().display());
        }
        if let Err(e) = self.0.remove() {
            eprintln!("removing {}: {e}", self.0.path().display());
        }
    }
}

struct Pod {
    ns: Namespace,
    ip: Ipv4Addr,
    host_veth: String,
}

/// Fields drop in order: servers, cgroup (hooks' processes), programs, pods, nodes, pins.
struct Lab {
    servers: Vec<ChildGuard>,
    hooked: CgroupGuard,
    lb: ServiceLb,
    _tc_a: AntiSpoof,
    _tc_b: AntiSpoof,
    client: Pod,
    backends: Vec<Pod>,
    node_a: Namespace,
    node_b: Namespace,
    _data: DirGuard,
    _pins: DirGuard,
    strait: PathBuf,
}

fn vip(index: usize) -> Ipv4Addr {
    // 10.96.0.1 onwards, inside SERVICE_CIDR.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + index as u32)
}

fn cni_add(
    cni: &Path,
    node: &Namespace,
    pod: Namespace,
    id: &str,
    config: &serde_json::Value,
) -> anyhow::Result<Pod> {
    let mut child = node
        .command(cni)?
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting strait-cni")?;
    child.stdin.take().expect("piped").write_all(config.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "CNI ADD {id}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(&stdout)?;
    let ip = result["ips"][0]["address"]
        .as_str()
        .context("no address in the CNI result")?
        .trim_end_matches("/32")
        .parse()?;
    let host_veth = strait_cni::naming::host_veth_name(&strait_cni::invocation::Attachment {
        container_id: id.to_owned(),
        ifname: "eth0".to_owned(),
    });
    Ok(Pod { ns: pod, ip, host_veth })
}

impl Lab {
    fn build(cni: &Path, backends: usize, max_services: usize) -> anyhow::Result<Self> {
        strait_dataplane::ebpf::ensure_bpffs()?;
        let prefix = format!("strait-bench-{}", std::process::id());
        let pin_root = Path::new(strait_dataplane::ebpf::BPFFS_ROOT).join(&prefix);
        let pins = DirGuard(pin_root.clone());
        let (pins_a, pins_b) = (pin_root.join("node-a"), pin_root.join("node-b"));
        std::fs::create_dir_all(&pins_a)?;
        std::fs::create_dir_all(&pins_b)?;
        let data = DirGuard(std::env::temp_dir().join(&prefix));
        std::fs::create_dir_all(&data.0)?;
        let sizes = LbMapSizes {
            frontends: (max_services as u32 + 1024).max(LbMapSizes::default().frontends),
            backends: ((max_services * backends) as u32 + 1024).max(LbMapSizes::default().backends),
            ..Default::default()
        };
        let tc_a = AntiSpoof::load_and_pin_with(&pins_a, &sizes).context("tc programs, node A")?;
        let tc_b = AntiSpoof::load_and_pin_with(&pins_b, &LbMapSizes::default())
            .context("tc programs, node B")?;
        let lb = ServiceLb::load_and_pin(&pins_a, &sizes).context("socket hooks")?;
        let cgroup = Cgroup::new(&Path::new("strait").join(&prefix))?;
        cgroup.create().context("creating the bench cgroup")?;
        let hooked = CgroupGuard(cgroup);
        lb.attach_cgroup(hooked.0.path()).context("attaching the socket hooks")?;

        let node_a = Namespace::new(format!("{prefix}-node-a"))?;
        let node_b = Namespace::new(format!("{prefix}-node-b"))?;
        node_a.ip(&[
            "link",
            "add",
            NODE_LINK,
            "type",
            "veth",
            "peer",
            "name",
            NODE_LINK,
            "netns",
            &node_b.name,
        ])?;
        for (node, address, peer, subnet) in [
            (&node_a, NODE_A_ADDRESS, NODE_B_ADDRESS, BACKEND_SUBNET),
            (&node_b, NODE_B_ADDRESS, NODE_A_ADDRESS, CLIENT_SUBNET),
        ] {
            node.ip(&["addr", "add", &format!("{address}/30"), "dev", NODE_LINK])?;
            node.ip(&["link", "set", NODE_LINK, "up"])?;
            node.ip(&["route", "add", subnet, "via", peer, "dev", NODE_LINK])?;
            // A VIP with nothing behind it fails fast (DESIGN.md, Network safety).
            node.ip(&["route", "add", "unreachable", SERVICE_CIDR])?;
            // Per-namespace sysctls: the root namespace is untouched.
            node.ns().write_net_sysctl("ipv4/ip_forward", "1")?;
            // Probes hit the unreachable route thousands of times a second: every one gets
            // its ICMP error at once instead of a timeout.
            node.ns().write_net_sysctl("ipv4/icmp_ratelimit", "0")?;
            node.ns().write_net_sysctl("ipv4/icmp_msgs_per_sec", "1000000")?;
        }
        let config = |subnet: &str, pins: &Path, dir: &str| {
            serde_json::json!({
                "cniVersion": "1.1.0", "name": "strait-bench", "type": "strait-cni",
                "ipam": { "subnet": subnet, "dataDir": data.0.join(dir) },
                "antiSpoof": { "pinDir": pins },
            })
        };
        let client = cni_add(
            cni,
            &node_a,
            Namespace::new(format!("{prefix}-client"))?,
            "client",
            &config(CLIENT_SUBNET, &pins_a, "a"),
        )?;
        let mut backend_pods = Vec::new();
        for i in 0..backends {
            let id = format!("backend-{i}");
            let pod = Namespace::new(format!("{prefix}-{id}"))?;
            backend_pods.push(cni_add(
                cni,
                &node_b,
                pod,
                &id,
                &config(BACKEND_SUBNET, &pins_b, "b"),
            )?);
        }
        let mut lab = Self {
            servers: Vec::new(),
            hooked,
            lb,
            _tc_a: tc_a,
            _tc_b: tc_b,
            client,
            backends: backend_pods,
            node_a,
            node_b,
            _data: data,
            _pins: pins,
            strait: std::env::current_exe()?,
        };
        lab.check_routes()?;
        for index in 0..lab.backends.len() {
            let mut command = lab.backends[index].ns.command(&lab.strait)?;
            command
                .args(["bench-worker", "serve", "--port", &BACKEND_PORT.to_string()])
                .args(["--cpu", &SERVER_CPU.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            lab.servers.push(ChildGuard(command.spawn().context("starting a server")?));
        }
        Ok(lab)
    }

    fn check_routes(&self) -> anyhow::Result<()> {
        self.client.ns.check_route(&vip(0).to_string(), "eth0")?;
        for backend in &self.backends {
            self.client.ns.check_route(&backend.ip.to_string(), "eth0")?;
            self.node_a.check_route(&backend.ip.to_string(), NODE_LINK)?;
            self.node_b.check_route(&backend.ip.to_string(), &backend.host_veth)?;
            backend.ns.check_route(&self.client.ip.to_string(), "eth0")?;
        }
        self.node_b.check_route(&self.client.ip.to_string(), NODE_LINK)?;
        self.node_a.check_route(&self.client.ip.to_string(), &self.client.host_veth)?;
        // The service range ends at node A's unreachable route, never beyond.
        let routed = self.node_a.ip(&["route", "show", "table", "main", SERVICE_CIDR])?;
        ensure!(routed.contains("unreachable"), "node A routes {SERVICE_CIDR}: {routed}");
        Ok(())
    }

    fn frontend(&self, index: usize, endpoints: usize) -> ServiceFrontend {
        ServiceFrontend {
            key: FrontendKey { vip: vip(index), port: SERVICE_PORT, protocol: L4Protocol::Tcp },
            backends: self.backends[..endpoints]
                .iter()
                .map(|pod| Backend {
                    address: SocketAddrV4::new(pod.ip, BACKEND_PORT),
                    terminating: false,
                })
                .collect(),
            affinity_timeout: None,
        }
    }

    /// Runs the bench worker in the client pod; inside the hooked cgroup for `ebpf-socket`.
    fn client_command(&self, mode: Mode, args: &[String]) -> anyhow::Result<Command> {
        let mut setup = ChildSetup::new().enter_netns(&self.client.ns.path())?;
        if mode == Mode::EbpfSocket {
            setup = setup.join_cgroup(&self.hooked.0.procs_file())?;
        }
        let mut command = Command::new(&self.strait);
        command.arg("bench-worker").args(args);
        setup.install(&mut command);
        Ok(command)
    }

    fn conn_rate(
        &self,
        mode: Mode,
        target: SocketAddrV4,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<ConnRateReport> {
        check_interrupted()?;
        // Client ports are reused from run to run, and the tc path's conntrack entries outlive
        // a reset connection (LRU): a stale reverse entry would rewrite the answers of the
        // next run's flows with the same ports. Every run starts from no flow state.
        self.lb.clear_flows().context("clearing the eBPF flow state")?;
        let args: Vec<String> = vec![
            "conn-rate".into(),
            "--target".into(),
            target.to_string(),
            "--warmup-ms".into(),
            warmup.as_millis().to_string(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
            "--cpu".into(),
            CLIENT_CPU.to_string(),
        ];
        let server_cpu_before = self.server_cpu_seconds();
        let output = self
            .client_command(mode, &args)?
            .stdin(Stdio::null())
            .output()
            .context("running the client")?;
        ensure!(
            output.status.success(),
            "client ({}): {}",
            mode.name(),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut report: ConnRateReport =
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!("client printed {}", String::from_utf8_lossy(&output.stdout))
            })?;
        // Server time of the whole client run (warm-up included) spread over the measured
        // part by its share of the run: a small overestimate, the same for every mode.
        let server = self.server_cpu_seconds() - server_cpu_before;
        let share = report.seconds / (report.seconds + warmup.as_secs_f64());
        report.client_cpu_seconds += server * share;
        Ok(report)
    }

    /// CPU time (user + system) of every server so far, from /proc/<pid>/stat.
    fn server_cpu_seconds(&self) -> f64 {
        // SAFETY: sysconf has no memory effects.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.servers
            .iter()
            .filter_map(|server| {
                std::fs::read_to_string(format!("/proc/{}/stat", server.0.id())).ok()
            })
            .map(|stat| {
                // Fields after the command name in parentheses; utime and stime are 14 and 15.
                let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let field =
                    |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
                (field(11) + field(12)) / ticks
            })
            .sum()
    }

    fn flush_conntrack(&self) -> anyhow::Result<()> {
        let output = self.node_a.command("conntrack")?.arg("-F").output();
        match output {
            Ok(output) => {
                // "0 flow entries" goes to stderr with success; a missing table is no error.
                ensure!(
                    output.status.success() || output.stderr.is_empty(),
                    "conntrack -F in node A: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                bail!("the conntrack tool is missing (apt-get install conntrack)")
            }
            Err(error) => Err(error).context("running conntrack -F"),
        }
    }

    /// Programs `services` frontends of `endpoints` each; returns the time it took and the
    /// memory it cost.
    fn program(
        &mut self,
        mode: Mode,
        services: usize,
        endpoints: usize,
    ) -> anyhow::Result<(Duration, Memory)> {
        let (rss_before, slab_before) = (status_kib("/proc/self/status", "VmRSS:"), slab_kib());
        let elapsed = self.program_rules(mode, services, endpoints)?;
        let memory = Memory {
            bpf_map_memlock_kib: if matches!(mode, Mode::EbpfSocket | Mode::EbpfTc) {
                bpf_map_memlock_kib(self.lb.pin_dir())
            } else {
                0
            },
            writer_rss_delta_kib: status_kib("/proc/self/status", "VmRSS:") - rss_before,
            slab_delta_kib: slab_kib() - slab_before,
        };
        Ok((elapsed, memory))
    }

    fn program_rules(
        &mut self,
        mode: Mode,
        services: usize,
        endpoints: usize,
    ) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        match mode {
            Mode::Direct => {}
            Mode::EbpfSocket | Mode::EbpfTc => {
                for index in 0..services {
                    if index % 1024 == 0 {
                        check_interrupted()?;
                    }
                    let frontend = self.frontend(index, endpoints);
                    self.lb.upsert_frontend(&frontend).context("writing a frontend")?;
                }
            }
            Mode::Nftables => {
                let rules = kube_proxy::nft_ruleset(&self.rule_services(services, endpoints));
                self.node_a_load("nft", &["-f", "-"], &rules)?;
            }
            Mode::Iptables | Mode::IptablesLegacy => {
                let rules = kube_proxy::iptables_restore(&self.rule_services(services, endpoints));
                self.node_a_load(iptables_restore(mode), &[], &rules)?;
            }
        }
        Ok(started.elapsed())
    }

    fn unprogram(&mut self, mode: Mode) -> anyhow::Result<()> {
        match mode {
            Mode::Direct => {}
            Mode::EbpfSocket | Mode::EbpfTc => {
                let keys: Vec<FrontendKey> = self.lb.frontends().copied().collect();
                for key in keys {
                    self.lb.remove_frontend(&key).context("removing a frontend")?;
                }
            }
            Mode::Nftables | Mode::Iptables => {
                // Both live in nf_tables: node A holds nothing else.
                self.node_a_load("nft", &["flush", "ruleset"], "")?;
            }
            Mode::IptablesLegacy => {
                self.node_a_load(iptables_restore(mode), &[], "*nat\nCOMMIT\n")?;
            }
        }
        Ok(())
    }

    /// Adds and removes one service `changes` times with `services` present, each timed from
    /// the change until a probe connection from the client pod (through the mode's path) sees
    /// it: answered after an add, refused or unreachable after a remove.
    fn change_latencies(
        &mut self,
        mode: Mode,
        services: usize,
        endpoints: usize,
        changes: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        use std::io::BufRead as _;
        if mode == Mode::Direct {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut probe = ChildGuard(
            self.client_command(mode, &["probe".to_owned()])?
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the probe")?,
        );
        let mut requests = probe.0.stdin.take().expect("piped");
        let mut answers = std::io::BufReader::new(probe.0.stdout.take().expect("piped"));
        let present = self.rule_services(services, endpoints);
        let (mut adds, mut removes) = (Vec::new(), Vec::new());
        for change in 0..changes {
            check_interrupted()?;
            let index = services + change;
            let service = self.rule_service(index, endpoints);
            for adding in [true, false] {
                // The rules are written before the clock starts; only loading them is timed.
                let text = match (mode, adding) {
                    (Mode::Nftables, true) => kube_proxy::nft_add(&service),
                    (Mode::Nftables, false) => kube_proxy::nft_remove(&service),
                    (Mode::Iptables | Mode::IptablesLegacy, true) => {
                        kube_proxy::iptables_add(&present, &service)
                    }
                    (Mode::Iptables | Mode::IptablesLegacy, false) => {
                        kube_proxy::iptables_remove(&present, &service)
                    }
                    _ => String::new(),
                };
                let want = if adding { "open" } else { "closed" };
                let started = std::time::Instant::now();
                writeln!(requests, "{want} {}", service.vip)?;
                requests.flush()?;
                match mode {
                    Mode::Direct => {}
                    Mode::EbpfSocket | Mode::EbpfTc if adding => {
                        self.lb.upsert_frontend(&self.frontend(index, endpoints))?
                    }
                    Mode::EbpfSocket | Mode::EbpfTc => {
                        self.lb.remove_frontend(&self.frontend(index, endpoints).key)?
                    }
                    Mode::Nftables => self.node_a_load("nft", &["-f", "-"], &text)?,
                    Mode::Iptables | Mode::IptablesLegacy => {
                        self.node_a_load(iptables_restore(mode), &["--noflush"], &text)?
                    }
                }
                let mut answer = String::new();
                answers.read_line(&mut answer).context("reading the probe")?;
                let elapsed = started.elapsed();
                ensure!(
                    answer.starts_with("ok"),
                    "{}: service {index} never became {want}: {answer:?}",
                    mode.name()
                );
                if adding { adds.push(elapsed) } else { removes.push(elapsed) }
            }
        }
        Ok((adds, removes))
    }

    fn rule_services(&self, services: usize, endpoints: usize) -> Vec<RuleService> {
        (0..services).map(|index| self.rule_service(index, endpoints)).collect()
    }

    fn rule_service(&self, index: usize, endpoints: usize) -> RuleService {
        RuleService {
            name: format!("bench/svc-{index}"),
            vip: SocketAddrV4::new(vip(index), SERVICE_PORT),
            endpoints: self.backends[..endpoints]
                .iter()
                .map(|pod| SocketAddrV4::new(pod.ip, BACKEND_PORT))
                .collect(),
        }
    }

    /// Runs a rule loader inside node A (never the root namespace) with `input` on stdin.
    fn node_a_load(&self, program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
        assert_not_root_namespace(&self.node_a.path())?;
        let mut child = self
            .node_a
            .command(program)?
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in node A"))?;
        let mut stdin = child.stdin.take().expect("piped");
        let written = stdin.write_all(input.as_bytes());
        drop(stdin);
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "{program} {} in node A: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).lines().take(5).collect::<Vec<_>>().join("; ")
        );
        written.with_context(|| format!("writing rules to {program}"))?;
        Ok(())
    }
}

/// Memory a mode's programming cost. `slab_delta_kib` is the machine-wide `Slab` of
/// /proc/meminfo before and after loading: it holds nf_tables/x_tables rule memory but also
/// whatever else the shared machine allocated meanwhile, so it is a rough figure.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    /// `bytes_memlock` of the load balancer's maps (bpftool), summed: their whole capacity.
    pub bpf_map_memlock_kib: i64,
    /// RSS growth of the bench process, which holds the map writer as the agent would.
    pub writer_rss_delta_kib: i64,
    pub slab_delta_kib: i64,
}

fn status_kib(file: &str, field: &str) -> i64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with(field))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn slab_kib() -> i64 {
    status_kib("/proc/meminfo", "Slab:")
}

fn bpf_map_memlock_kib(pin_dir: &Path) -> i64 {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return 0 };
    let mut bytes = 0i64;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("LB_") {
            continue;
        }
        let Ok(output) = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(entry.path())
            .output()
        else {
            continue;
        };
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        bytes += info["bytes_memlock"].as_i64().unwrap_or(0);
    }
    bytes / 1024
}

fn iptables_restore(mode: Mode) -> &'static str {
    if mode == Mode::IptablesLegacy { "iptables-legacy-restore" } else { "iptables-nft-restore" }
}

/// One mode at one (N, M).
#[derive(Debug, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub services: usize,
    pub endpoints: usize,
    pub repetitions: Vec<ConnRateReport>,
    pub conn_per_second: f64,
    pub conn_per_second_min: f64,
    pub conn_per_second_max: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Client + server CPU time per connection, microseconds.
    pub cpu_us_per_connection: f64,
    pub cold_programming_ms: f64,
    /// One service added with N present until a probe connects, p50/p99 in ms.
    pub add_p50_ms: f64,
    pub add_p99_ms: f64,
    /// One service removed with N present until a probe is refused, p50/p99 in ms.
    pub remove_p50_ms: f64,
    pub remove_p99_ms: f64,
    pub memory: Memory,
    /// conn/s of `direct` just before this mode was programmed and just after it was removed.
    pub direct_per_second: f64,
    /// conn/s over `direct_per_second`.
    pub ratio_to_direct: f64,
}

/// The middle value; for an even count the mean of the two middle ones.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn summarize(
    mode: Mode,
    services: usize,
    endpoints: usize,
    runs: Vec<ConnRateReport>,
    cold: Duration,
    (adds, removes): (Vec<Duration>, Vec<Duration>),
) -> ModeResult {
    let ms = |samples: &[Duration], fraction: f64| {
        let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return 0.0;
        }
        sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
    };
    let pick = |f: fn(&ConnRateReport) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let rates: Vec<f64> = runs.iter().map(|r| r.per_second).collect();
    let cpu: f64 = runs.iter().map(|r| r.client_cpu_seconds).sum::<f64>()
        / runs.iter().map(|r| r.connections as f64).sum::<f64>().max(1.0);
    ModeResult {
        mode,
        services,
        endpoints,
        conn_per_second: pick(|r| r.per_second),
        conn_per_second_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        conn_per_second_max: rates.iter().copied().fold(0.0, f64::max),
        p50_us: pick(|r| r.p50_us),
        p90_us: pick(|r| r.p90_us),
        p99_us: pick(|r| r.p99_us),
        p999_us: pick(|r| r.p999_us),
        cpu_us_per_connection: cpu * 1e6,
        cold_programming_ms: cold.as_secs_f64() * 1e3,
        add_p50_ms: ms(&adds, 0.5),
        add_p99_ms: ms(&adds, 0.99),
        remove_p50_ms: ms(&removes, 0.5),
        remove_p99_ms: ms(&removes, 0.99),
        memory: Memory::default(),
        direct_per_second: 0.0,
        ratio_to_direct: 0.0,
        repetitions: runs,
    }
}

/// Runs the bench and prints, writes and charts its figures.
pub fn services(args: &ServicesArgs, cni: &Path) -> anyhow::Result<()> {
    ensure!(nix::unistd::Uid::effective().is_root(), "strait bench services needs root");
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    for signal in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::signal(signal, handler) }
            .context("installing signal handlers")?;
    }
    let services = match (&args.services[..], args.quick) {
        ([], true) => vec![1, 1_000],
        ([], false) => vec![1, 1_000, 10_000, 30_000, 100_000],
        (chosen, _) => chosen.to_vec(),
    };
    let endpoints = match (&args.endpoints[..], args.quick) {
        ([], true) => vec![1],
        ([], false) => vec![1, 10],
        (chosen, _) => chosen.to_vec(),
    };
    ensure!(services.iter().all(|&n| n >= 1), "--services: every N is at least 1");
    ensure!(endpoints.iter().all(|&m| (1..=64).contains(&m)), "--endpoints: 1 to 64");
    let modes: Vec<Mode> =
        if args.modes.is_empty() { ALL_MODES.to_vec() } else { args.modes.clone() };
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 3.0 });
    let duration = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_secs_f64((seconds / 5.0).min(0.5));
    let repetitions = args.repetitions.max(1);
    // Each is one add and one remove.
    let changes = if args.quick { 6 } else { 10 };
    let max_services = *services.iter().max().unwrap_or(&1) + 64;
    let max_endpoints = *endpoints.iter().max().unwrap_or(&1);

    eprintln!("building the bench lab: 2 nodes, 1 client pod, {max_endpoints} backend pods");
    let mut lab = Lab::build(cni, max_endpoints, max_services)?;
    let mut results: Vec<ModeResult> = Vec::new();
    let total = modes.len() * services.len() * endpoints.len();
    let mut done = 0;
    for &mode in &modes {
        for &m in &endpoints {
            for &n in &services {
                check_interrupted()?;
                done += 1;
                // The floor is measured without the mode's rules or frontends: kube-proxy's
                // chains are walked by every new connection, direct ones included, so a floor
                // taken with them in place would hide their cost. It brackets the mode's runs
                // (just before programming, just after removing), for the machine's drifting
                // load.
                let floor_target = SocketAddrV4::new(lab.backends[0].ip, BACKEND_PORT);
                let mut floors = Vec::new();
                if mode != Mode::Direct {
                    eprint!("\r\x1b[K[{done}/{total}] {} N={n} M={m}: floor", mode.name());
                    lab.flush_conntrack()?;
                    floors.push(
                        lab.conn_rate(Mode::Direct, floor_target, warmup, duration)?.per_second,
                    );
                }
                eprint!("\r\x1b[K[{done}/{total}] {} N={n} M={m}: programming", mode.name());
                let (cold, memory) = lab.program(mode, n, m)?;
                // Conntrack of node A and the eBPF flow state: nothing a previous mode left
                // translates a flow of this one (client ports are reused across modes).
                lab.flush_conntrack()?;
                lab.lb.clear_flows().context("clearing the eBPF flow state")?;
                let target = match mode {
                    Mode::Direct => SocketAddrV4::new(lab.backends[0].ip, BACKEND_PORT),
                    // The last service programmed: a linear lookup pays its whole length.
                    _ => SocketAddrV4::new(vip(n - 1), SERVICE_PORT),
                };
                let mut runs = Vec::new();
                for rep in 0..repetitions {
                    eprint!(
                        "\r\x1b[K[{done}/{total}] {} N={n} M={m}: repetition {}/{repetitions}",
                        mode.name(),
                        rep + 1
                    );
                    let run = lab.conn_rate(mode, target, warmup, duration)?;
                    ensure!(
                        run.connections > 0,
                        "{} N={n}: no connection succeeded: {:?}",
                        mode.name(),
                        run.first_error
                    );
                    runs.push(run);
                }
                eprint!("\r\x1b[K[{done}/{total}] {} N={n} M={m}: service changes", mode.name());
                let changes = lab.change_latencies(mode, n, m, changes)?;
                let mut result = summarize(mode, n, m, runs, cold, changes);
                result.memory = memory;
                lab.unprogram(mode)?;
                if mode != Mode::Direct {
                    eprint!("\r\x1b[K[{done}/{total}] {} N={n} M={m}: floor", mode.name());
                    lab.flush_conntrack()?;
                    lab.lb.clear_flows().context("clearing the eBPF flow state")?;
                    floors.push(
                        lab.conn_rate(Mode::Direct, floor_target, warmup, duration)?.per_second,
                    );
                }
                result.direct_per_second =
                    if floors.is_empty() { result.conn_per_second } else { median(&mut floors) };
                result.ratio_to_direct = result.conn_per_second / result.direct_per_second;
                results.push(result);
            }
        }
    }
    eprintln!("\r\x1b[Kdone");
    drop(lab);
    print!("{}", table(&results, seconds, repetitions));
    let out = args.out.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!("bench-results/services-{now}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("services.json"), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(out.join("services.csv"), csv(&results))?;
    println!("written: {} and services.csv", out.join("services.json").display());
    Ok(())
}

fn csv(results: &[ModeResult]) -> String {
    let mut out = String::from(
        "mode,services,endpoints,conn_per_second,conn_per_second_min,conn_per_second_max,direct_per_second,ratio_to_direct,p50_us,p90_us,p99_us,p999_us,cpu_us_per_connection,cold_programming_ms,add_p50_ms,add_p99_ms,remove_p50_ms,remove_p99_ms,bpf_map_memlock_kib,writer_rss_delta_kib,slab_delta_kib\n",
    );
    for r in results {
        let fields = [
            r.conn_per_second,
            r.conn_per_second_min,
            r.conn_per_second_max,
            r.direct_per_second,
            r.ratio_to_direct,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.cpu_us_per_connection,
            r.cold_programming_ms,
            r.add_p50_ms,
            r.add_p99_ms,
            r.remove_p50_ms,
            r.remove_p99_ms,
        ];
        let fields: Vec<String> = fields.iter().map(|f| format!("{f:.3}")).collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.mode.name(),
            r.services,
            r.endpoints,
            fields.join(","),
            r.memory.bpf_map_memlock_kib,
            r.memory.writer_rss_delta_kib,
            r.memory.slab_delta_kib,
        ));
    }
    out
}

fn table(results: &[ModeResult], seconds: f64, repetitions: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "new connections (connect, 1-byte request, 1-byte answer, close with reset): {repetitions} × {seconds}s each, median [min–max]; ×DIRECT against direct runs just before the mode is programmed and just after it is removed (no rules or frontends in place); latency in µs (median of the repetitions); CPU = client + server per connection; COLD = programming N services; ADD/DEL = one service changed with N present until a probe connection sees it; MAPS = memlock of the LB maps (capacity, not use), RSS = growth of this process (the map writer), SLAB = machine-wide /proc/meminfo Slab delta over the load (rough: shared machine)"
    );
    let _ = writeln!(
        out,
        "{:<15} {:>7} {:>3} {:>24} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>10} {:>15} {:>15} {:>17}",
        "MODE",
        "N",
        "M",
        "CONN/S",
        "×DIRECT",
        "P50",
        "P90",
        "P99",
        "P99.9",
        "CPU µs/c",
        "COLD ms",
        "ADD p50/p99 ms",
        "DEL p50/p99 ms",
        "MAPS/RSS/SLAB KiB"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<15} {:>7} {:>3} {:>8.0} [{:>6.0}–{:>6.0}] {:>8.3} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>9.1} {:>10.2} {:>7.2}/{:<7.2} {:>7.2}/{:<7.2} {}/{}/{}",
            r.mode.name(),
            r.services,
            r.endpoints,
            r.conn_per_second,
            r.conn_per_second_min,
            r.conn_per_second_max,
            r.ratio_to_direct,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.cpu_us_per_connection,
            r.cold_programming_ms,
            r.add_p50_ms,
            r.add_p99_ms,
            r.remove_p50_ms,
            r.remove_p99_ms,
            r.memory.bpf_map_memlock_kib,
            r.memory.writer_rss_delta_kib,
            r.memory.slab_delta_kib,
        );
    }
    out
}
