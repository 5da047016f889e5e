//! `strait bench services`: what a service costs, per routing mode and number of services,
//! beside `direct` (the client connecting to a backend's pod IP) measured in the same run with
//! the same client: new connections (rate, latency, CPU), request/response on an established
//! connection, one stream's throughput, programming time (cold load, one service added or
//! removed) and memory.
//!
//! The lab is its own ([`StraitNodes`]): a client pod on node A, the backend pods on node B.
//! strait's modes are programmed by a stand-in of the node agent
//! ([`super::worker::agent_services`]) that holds the services as the agent does and writes the
//! maps through the agent's own planner and writer; kube-proxy's rule sets are loaded inside
//! node A. The root namespace gets no route, rule or sysctl; everything goes on drop, on
//! error and on Ctrl-C (the children stop with the signal, the bench sees them fail and
//! unwinds).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde::Serialize;
use strait_dataplane::{ebpf::lb::LbMapSizes, runtime::process::ChildSetup};

use super::{
    kube_proxy::{self, RuleService},
    lab::{
        ChildGuard, Durations, Namespace, StraitNodes, TrafficRun, assert_not_root_namespace,
        check_interrupted, measure_traffic, start_server,
    },
    stats::{self, Ratios, TrafficFigures, quantile},
    svg::{Chart, Series},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 9000;
/// VIP of service 0 (inside [`super::lab::SERVICE_CIDR`]); service `i` has this address plus `i`.
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Memory the kube-proxy rule loaders may use together (their own and the kernel's rules).
const LOADER_MEMORY_LIMIT_BYTES: u64 = 4 << 30;
/// How long the probe keeps trying before it calls a change lost.
const PROBE_DEADLINE: Duration = Duration::from_secs(120);

/// Options of `strait bench services`.
#[derive(clap::Args, Debug)]
pub struct ServicesArgs {
    /// N = 1 and 1,000, M = 1, short runs (within 3 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Numbers of services to measure at (comma-separated; default 1,1000,10000,30000,100000).
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<usize>,
    /// Endpoints per service to measure at (comma-separated; default 1,10).
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<usize>,
    /// Modes to measure (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<Mode>,
    /// Measured seconds of each repetition's new-connection run (default 1, 0.5 with --quick);
    /// its request/response and stream runs take half as long each.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Repetitions per figure.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Service changes (one add and one remove each) per mode and N (default 10, 4 with
    /// --quick).
    #[arg(long)]
    pub changes: Option<usize>,
    /// Longest the changes of one mode and N may take together, in seconds (default 20, 5
    /// with --quick); at least one add and one remove are always measured.
    #[arg(long)]
    pub changes_seconds: Option<f64>,
    /// Longest a kube-proxy mode may take to load its rules, in seconds: a mode that does not
    /// finish its load within it is reported as such at that N and not measured there, nor
    /// at larger rule sets; a one-service change may take half as long.
    #[arg(long, default_value_t = 60.0)]
    pub load_timeout: f64,
    /// Where to write JSON, CSV and SVG charts (default `bench-results/services-<unix time>`).
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
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::EbpfSocket => "ebpf-socket",
            Mode::EbpfTc => "ebpf-tc",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::IptablesLegacy => "iptables-legacy",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Mode::Direct => "#555555",
            Mode::EbpfSocket => "#1f77b4",
            Mode::EbpfTc => "#17becf",
            Mode::Nftables => "#ff7f0e",
            Mode::Iptables => "#d62728",
            Mode::IptablesLegacy => "#9467bd",
        }
    }

    fn is_ebpf(self) -> bool {
        matches!(self, Mode::EbpfSocket | Mode::EbpfTc)
    }

    fn is_kube_proxy(self) -> bool {
        matches!(self, Mode::Nftables | Mode::Iptables | Mode::IptablesLegacy)
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

fn vip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_VIP) + index as u32)
}

/// A cgroup of the memory controller (cgroup v1, where this machine kind has it) that the
/// rule loaders run in: the kernel charges the nf_tables and x_tables memory they allocate to
/// it, so its kernel-memory usage is the rules' own, whatever else the machine does. Removed
/// on drop.
struct KernelMemoryCgroup(PathBuf);

impl KernelMemoryCgroup {
    const ROOT: &str = "/sys/fs/cgroup/memory";

    /// None where there is no v1 memory controller with kernel-memory accounting.
    fn create(prefix: &str) -> Option<Self> {
        let root = Path::new(Self::ROOT);
        if !root.join("memory.kmem.usage_in_bytes").exists() {
            return None;
        }
        let path = root.join(format!("{prefix}-rules"));
        std::fs::create_dir(&path).ok()?;
        let cgroup = Self(path);
        // A loader that would take more is stopped there (and its mode reported as such)
        // rather than taking the shared machine's memory: `nft -f` of 100,000 services of 10
        // endpoints was seen past 11 GiB.
        if let Err(e) = std::fs::write(
            cgroup.0.join("memory.limit_in_bytes"),
            LOADER_MEMORY_LIMIT_BYTES.to_string(),
        ) {
            eprintln!("limiting the rule loaders' memory: {e}; they run without a limit");
        }
        Some(cgroup)
    }

    /// Times the cgroup's processes were killed for want of memory.
    fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.0.join("memory.oom_control"))
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|line| line.starts_with("oom_kill "))?.to_owned();
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0)
    }

    fn usage_kib(&self) -> i64 {
        std::fs::read_to_string(self.0.join("memory.kmem.usage_in_bytes"))
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .map_or(0, |bytes| bytes / 1024)
    }
}

impl Drop for KernelMemoryCgroup {
    fn drop(&mut self) {
        // Its loaders have exited; charges left by rules still loaded move to the parent.
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// The node agent stand-in ([`super::worker::agent_services`]) running in node A, one per mode
/// and N, so that its memory is that of these services only.
struct AgentServices {
    requests: ChildStdin,
    answers: BufReader<ChildStdout>,
    base_rss_kib: u64,
    // Last: killed after its pipes are closed.
    _process: ChildGuard,
}

#[derive(serde::Deserialize)]
struct AgentAnswer {
    #[serde(default)]
    apply_ms: f64,
    #[serde(default)]
    apply_cpu_ms: f64,
    #[serde(default)]
    dns_zone_ms: f64,
    #[serde(default)]
    state_rss_kib: u64,
    #[serde(default)]
    programmed_rss_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

impl AgentServices {
    fn start(lab: &Lab) -> anyhow::Result<Self> {
        let mut command = lab.nodes.node_a.command(&lab.strait)?;
        command.args(["bench-worker", "agent-services", "--pin-dir"]).arg(&lab.nodes.pins_a);
        command.args(["--first-vip", &FIRST_VIP.to_string()]);
        command.args(["--service-port", &SERVICE_PORT.to_string()]);
        for backend in &lab.nodes.pods_b {
            command.args(["--backend", &SocketAddrV4::new(backend.ip, BACKEND_PORT).to_string()]);
        }
        let mut process = ChildGuard(
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the agent stand-in")?,
        );
        let requests = process.0.stdin.take().expect("piped");
        let answers = BufReader::new(process.0.stdout.take().expect("piped"));
        let mut agent = Self { requests, answers, base_rss_kib: 0, _process: process };
        agent.base_rss_kib = agent.read_answer("start")?.rss_kib;
        Ok(agent)
    }

    fn send(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.requests, "{command}")?;
        self.requests.flush().context("writing to the agent stand-in")
    }

    fn read_answer(&mut self, what: &str) -> anyhow::Result<AgentAnswer> {
        let mut line = String::new();
        self.answers.read_line(&mut line).context("reading the agent stand-in")?;
        serde_json::from_str(&line)
            .with_context(|| format!("the agent stand-in answered {line:?} to {what}"))
    }

    fn call(&mut self, command: &str) -> anyhow::Result<AgentAnswer> {
        self.send(command)?;
        self.read_answer(command)
    }
}

/// The bench lab: strait's two nodes, the client pod on node A, the backends on node B with
/// their servers; and a second pair of nodes just like them with one backend, where no mode is
/// ever programmed, for the `direct` floor. Each repetition of a mode is paired with one of
/// the floor taken just before it, so both see the same moment of a shared machine, and the
/// floor never carries a mode's rules (kube-proxy's chains are walked by every new
/// connection through node A, direct ones included, and its conntrack is paid by every
/// packet). Fields drop in order: servers first, then the nodes.
struct Lab {
    servers: Vec<ChildGuard>,
    floor_servers: Vec<ChildGuard>,
    nodes: StraitNodes,
    floor_nodes: StraitNodes,
    kernel_memory: Option<KernelMemoryCgroup>,
    strait: PathBuf,
}

impl Lab {
    fn build(cni: &Path, backends: usize, max_services: usize) -> anyhow::Result<Self> {
        let prefix = format!("strait-bench-{}", std::process::id());
        let sizes = LbMapSizes {
            frontends: (max_services as u32 + 1024).max(LbMapSizes::default().frontends),
            backends: ((max_services * backends) as u32 + 1024).max(LbMapSizes::default().backends),
            ..Default::default()
        };
        let names: Vec<String> = (0..backends).map(|i| format!("backend-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let nodes = StraitNodes::build(cni, &prefix, &["client"], &names, &sizes)?;
        nodes.pods_a[0].ns.check_route(&vip(0).to_string(), "eth0")?;
        let floor_nodes = StraitNodes::build(
            cni,
            &format!("{prefix}-floor"),
            &["client"],
            &["backend-0"],
            &Default::default(),
        )?;
        let strait = std::env::current_exe()?;
        let mut lab = Self {
            servers: Vec::new(),
            floor_servers: Vec::new(),
            kernel_memory: KernelMemoryCgroup::create(&prefix),
            nodes,
            floor_nodes,
            strait,
        };
        for backend in &lab.nodes.pods_b {
            lab.servers.push(start_server(&lab.strait, &backend.ns, BACKEND_PORT)?);
        }
        let floor_server = start_server(&lab.strait, &lab.floor_nodes.pods_b[0].ns, BACKEND_PORT)?;
        lab.floor_servers.push(floor_server);
        Ok(lab)
    }

    fn client_pod(&self) -> &Namespace {
        &self.nodes.pods_a[0].ns
    }

    /// Runs the bench worker in the client pod; inside the hooked cgroup for `ebpf-socket`.
    fn client_command(&self, mode: Mode, args: &[String]) -> anyhow::Result<Command> {
        let mut setup = ChildSetup::new().enter_netns(&self.client_pod().path())?;
        if mode == Mode::EbpfSocket {
            setup = setup.join_cgroup(&self.nodes.hooked.0.procs_file())?;
        }
        let mut command = Command::new(&self.strait);
        command.arg("bench-worker").args(args);
        setup.install(&mut command);
        Ok(command)
    }

    /// One repetition of the three kinds of traffic through `mode` to `target`.
    fn traffic(
        &self,
        mode: Mode,
        target: SocketAddrV4,
        durations: &Durations,
    ) -> anyhow::Result<TrafficRun> {
        // Client ports are reused from run to run, and the tc path's conntrack entries outlive
        // a reset connection (LRU): a stale reverse entry would rewrite the answers of the
        // next run's flows with the same ports. Every run starts from no flow state.
        self.nodes.lb.clear_flows().context("clearing the eBPF flow state")?;
        let client = |args: &[String]| self.client_command(mode, args);
        measure_traffic(&client, target, durations, &self.servers)
    }

    /// The floor: `direct` in the floor's nodes, from no flow state.
    fn floor(&self, durations: &Durations) -> anyhow::Result<TrafficRun> {
        self.floor_nodes.flush_conntrack()?;
        self.floor_nodes.lb.clear_flows().context("clearing the floor's eBPF flow state")?;
        let target = SocketAddrV4::new(self.floor_nodes.pods_b[0].ip, BACKEND_PORT);
        let client = |args: &[String]| -> anyhow::Result<Command> {
            let mut command = Command::new(&self.strait);
            command.arg("bench-worker").args(args);
            ChildSetup::new()
                .enter_netns(&self.floor_nodes.pods_a[0].ns.path())?
                .install(&mut command);
            Ok(command)
        };
        measure_traffic(&client, target, durations, &self.floor_servers)
    }

    fn rule_services(&self, services: usize, endpoints: usize) -> Vec<RuleService> {
        (0..services).map(|index| self.rule_service(index, endpoints)).collect()
    }

    fn rule_service(&self, index: usize, endpoints: usize) -> RuleService {
        RuleService {
            name: format!("bench/svc-{index}"),
            vip: SocketAddrV4::new(vip(index), SERVICE_PORT),
            endpoints: self.nodes.pods_b[..endpoints]
                .iter()
                .map(|pod| SocketAddrV4::new(pod.ip, BACKEND_PORT))
                .collect(),
        }
    }

    /// Runs a rule loader inside node A (never the root namespace) with `input` on stdin, in
    /// the kernel-memory cgroup; kills it if it has not finished within `timeout`.
    fn node_a_load(
        &self,
        program: &str,
        args: &[&str],
        input: String,
        timeout: Duration,
    ) -> anyhow::Result<Load> {
        let oom_kills = self.kernel_memory.as_ref().map_or(0, KernelMemoryCgroup::oom_kills);
        assert_not_root_namespace(&self.nodes.node_a.path())?;
        let mut setup = ChildSetup::new().enter_netns(&self.nodes.node_a.path())?;
        if let Some(cgroup) = &self.kernel_memory {
            setup = setup.join_cgroup(&cgroup.0.join("cgroup.procs"))?;
        }
        let mut command = Command::new(program);
        setup.install(&mut command);
        let mut child = ChildGuard(
            command
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {program} in node A"))?,
        );
        // Written from a thread: a loader may read slower than the rules come, and the clock
        // must keep running meanwhile.
        let mut stdin = child.0.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.0.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline || check_interrupted().is_err() {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let Some(status) = status else {
            // The guard kills it; the loaders commit atomically, so nothing half-made stays.
            drop(child);
            let _ = writer.join();
            check_interrupted()?;
            return Ok(Load::TimedOut);
        };
        if !status.success()
            && self.kernel_memory.as_ref().is_some_and(|cgroup| cgroup.oom_kills() > oom_kills)
        {
            let _ = writer.join();
            return Ok(Load::OutOfMemory);
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = child.0.stderr.take() {
            use std::io::Read as _;
            let _ = pipe.read_to_string(&mut stderr);
        }
        ensure!(
            status.success(),
            "{program} {} in node A: {}",
            args.join(" "),
            stderr.lines().take(5).collect::<Vec<_>>().join("; ")
        );
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the rule writer thread panicked"))?
            .with_context(|| format!("writing rules to {program}"))?;
        Ok(Load::Done)
    }

    fn kernel_memory_kib(&self) -> Option<i64> {
        self.kernel_memory.as_ref().map(KernelMemoryCgroup::usage_kib)
    }
}

/// How a rule loader's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    Done,
    TimedOut,
    /// Killed at [`LOADER_MEMORY_LIMIT_BYTES`].
    OutOfMemory,
}

impl Load {
    fn finished(self, what: &str) -> anyhow::Result<()> {
        match self {
            Load::Done => Ok(()),
            Load::TimedOut => anyhow::bail!("{what} did not finish in time"),
            Load::OutOfMemory => anyhow::bail!("{what} ran out of memory"),
        }
    }
}

fn iptables_restore(mode: Mode) -> &'static str {
    if mode == Mode::IptablesLegacy { "iptables-legacy-restore" } else { "iptables-nft-restore" }
}

/// Memory a mode's N services cost.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    /// RSS of the node agent stand-in holding the N services (eBPF modes): with everything
    /// (services as received, planner and writer state, DNS zone); before it had any; once
    /// it held the services as the controller streams them; once they were programmed too.
    pub agent_rss_kib: u64,
    pub agent_rss_before_kib: u64,
    pub agent_rss_received_kib: u64,
    pub agent_rss_programmed_kib: u64,
    /// Peak RSS of the stand-in (programming needs transient room).
    pub agent_peak_rss_kib: u64,
    /// `bytes_memlock` of the load-balancing maps (bpftool), summed: their whole capacity,
    /// allocated when they are made, whatever N.
    pub bpf_map_memlock_kib: i64,
    /// Kernel memory the kube-proxy rules hold: what their loader was charged for them in its
    /// memory cgroup (0 where the machine has no kernel-memory accounting).
    pub kernel_rules_kib: i64,
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

/// Programming figures of one mode at one N.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Programming {
    /// Loading N services from nothing, ms: the agent's `apply` of a snapshot (eBPF modes), the
    /// loader's run (kube-proxy modes).
    pub cold_ms: f64,
    /// CPU time of the agent's `apply` for the cold load (eBPF modes), ms: what the load costs
    /// whatever else the machine runs.
    pub cold_cpu_ms: f64,
    /// One service added with N present until a probe connection through the mode's path is
    /// answered, and one removed until one is not, ms.
    pub add_p50_ms: f64,
    pub add_p99_ms: f64,
    pub remove_p50_ms: f64,
    pub remove_p99_ms: f64,
    /// Add/remove pairs measured (fewer than asked when the time budget ran out).
    pub changes: usize,
    /// A kube-proxy change whose load did not finish within this many seconds: the changes
    /// stopped there.
    pub change_timeout_s: Option<f64>,
    /// Probe attempts that were neither answered nor refused within their 100 ms (a SYN to a
    /// removed service goes unanswered: the node's ICMP errors are rate-limited). They do not
    /// stretch the figures, which are taken from when the deciding attempt started.
    pub probe_timeouts: u64,
    /// Changes left out because an attempt started before the change already seemed to see
    /// it (an answer slower than 100 ms, on a loaded machine).
    pub early_readings: u64,
    /// The agent rebuilding the cluster DNS zone after a batch (it follows the map writes, so
    /// it is not in the add/remove figures), ms, median over the changes.
    pub dns_zone_ms: f64,
}

/// One mode at one (N, M).
#[derive(Debug, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub services: usize,
    pub endpoints: usize,
    /// Why nothing was measured at this N, if so (a load that did not finish in time).
    pub not_measured: Option<String>,
    /// Through the mode, median and spread of the repetitions.
    pub traffic: TrafficFigures,
    /// `direct` in the floor's nodes (never programmed), each repetition just before one of
    /// the mode's.
    pub floor: TrafficFigures,
    /// Each repetition over the floor repetition just before it, median of the pairs.
    pub ratio_to_direct: Ratios,
    pub programming: Programming,
    pub memory: Memory,
    pub runs: Vec<TrafficRun>,
    pub floor_runs: Vec<TrafficRun>,
}

/// The settings of one run of the bench.
struct Plan {
    modes: Vec<Mode>,
    services: Vec<usize>,
    endpoints: Vec<usize>,
    durations: Durations,
    repetitions: usize,
    changes: usize,
    changes_budget: Duration,
    load_timeout: Duration,
}

impl Plan {
    fn from_args(args: &ServicesArgs) -> anyhow::Result<Self> {
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
        let seconds = args.seconds.unwrap_or(if args.quick { 0.5 } else { 1.0 });
        ensure!(seconds > 0.0, "--seconds must be positive");
        let conn = Duration::from_secs_f64(seconds);
        Ok(Self {
            modes: if args.modes.is_empty() { ALL_MODES.to_vec() } else { args.modes.clone() },
            services,
            endpoints,
            durations: Durations {
                warmup: Duration::from_secs_f64((seconds / 5.0).min(0.3)),
                conn,
                rr: conn / 2,
                stream: conn / 2,
            },
            repetitions: args.repetitions.max(1),
            changes: args.changes.unwrap_or(if args.quick { 4 } else { 10 }).max(1),
            changes_budget: Duration::from_secs_f64(
                args.changes_seconds.unwrap_or(if args.quick { 5.0 } else { 20.0 }),
            ),
            load_timeout: Duration::from_secs_f64(args.load_timeout),
        })
    }
}

/// The progress line on stderr: a bar, the step, and the time left at the pace so far.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Self { total, done: 0, started: Instant::now(), terminal }
    }

    fn step(&self, what: &str) {
        let width = 24;
        let filled = width * self.done / self.total.max(1);
        let elapsed = self.started.elapsed().as_secs();
        let left = if self.done == 0 {
            String::new()
        } else {
            let per_step = self.started.elapsed().as_secs_f64() / self.done as f64;
            let left = (per_step * (self.total - self.done) as f64) as u64;
            format!(", ~{}:{:02} left", left / 60, left % 60)
        };
        let line = format!(
            "[{}{}] {}/{} {:>2}:{:02}{left}  {what}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total,
            elapsed / 60,
            elapsed % 60
        );
        if self.terminal {
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// Runs the bench and prints, writes and charts its figures.
pub fn services(args: &ServicesArgs, cni: &Path) -> anyhow::Result<()> {
    ensure!(nix::unistd::Uid::effective().is_root(), "strait bench services needs root");
    super::lab::stop_on_signals()?;
    let plan = Plan::from_args(args)?;
    let max_services = *plan.services.iter().max().unwrap_or(&1) + plan.changes + 64;
    let max_endpoints = *plan.endpoints.iter().max().unwrap_or(&1);
    let out = args.out.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!("bench-results/services-{now}"))
    });

    eprintln!("building the bench lab: 2 nodes, 1 client pod, {max_endpoints} backend pods");
    let lab = Lab::build(cni, max_endpoints, max_services)?;
    let mut progress = Progress::new(plan.modes.len() * plan.services.len() * plan.endpoints.len());
    let mut results: Vec<ModeResult> = Vec::new();
    for &mode in &plan.modes {
        for &m in &plan.endpoints {
            for &n in &plan.services {
                check_interrupted()?;
                let label = format!("{} N={n} M={m}", mode.name());
                // Once a kube-proxy mode cannot load a rule set, it cannot load a larger one.
                let failed = results.iter().find(|r| {
                    r.mode == mode
                        && r.not_measured.is_some()
                        && rule_count(r.services, r.endpoints) <= rule_count(n, m)
                });
                let result = match failed {
                    Some(smaller) => skipped(mode, n, m, smaller),
                    None => measure(&lab, &plan, mode, n, m, &|step| {
                        progress.step(&format!("{label}: {step}"))
                    })?,
                };
                results.push(result);
                progress.done += 1;
            }
        }
    }
    progress.step("done");
    progress.finish();
    drop(lab);

    print!("{}", table(&results, &plan));
    print!("{}", targets(&results));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("services.json"), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(out.join("services.csv"), csv(&results))?;
    let charts = charts(&results, &plan);
    for (name, chart) in &charts {
        std::fs::write(out.join(name), chart.to_svg())?;
    }
    println!(
        "written: {} with services.csv and {} charts (services-*.svg)",
        out.join("services.json").display(),
        charts.len()
    );
    Ok(())
}

/// About how many rules kube-proxy writes for `n` services of `m` endpoints: per service a
/// dispatch entry and a service chain with a masquerade rule, per endpoint a pick and an
/// endpoint chain of two rules.
fn rule_count(n: usize, m: usize) -> usize {
    n * (2 + 3 * m)
}

/// A kube-proxy mode at a size above one it could not load.
fn skipped(mode: Mode, n: usize, m: usize, smaller: &ModeResult) -> ModeResult {
    not_loaded(
        mode,
        n,
        m,
        format!(
            "not attempted: {} services of {} could not be loaded",
            smaller.services, smaller.endpoints
        ),
    )
}

fn not_loaded(mode: Mode, n: usize, m: usize, why: String) -> ModeResult {
    ModeResult {
        mode,
        services: n,
        endpoints: m,
        not_measured: Some(why),
        traffic: TrafficFigures::default(),
        floor: TrafficFigures::default(),
        ratio_to_direct: Ratios::default(),
        programming: Programming::default(),
        memory: Memory::default(),
        runs: Vec::new(),
        floor_runs: Vec::new(),
    }
}

/// One mode at one (N, M): floor, programming, repetitions, changes, removal, floor.
fn measure(
    lab: &Lab,
    plan: &Plan,
    mode: Mode,
    n: usize,
    m: usize,
    step: &dyn Fn(&str),
) -> anyhow::Result<ModeResult> {
    let durations = &plan.durations;
    step("programming");
    let mut agent = if mode.is_ebpf() { Some(AgentServices::start(lab)?) } else { None };
    let kernel_before = lab.kernel_memory_kib();
    let mut memory = Memory::default();
    let mut programming = Programming::default();
    let loaded = match (mode, agent.as_mut()) {
        (Mode::Direct, _) => Load::Done,
        (_, Some(agent)) => {
            let answer = agent.call(&format!("program {n} {m}"))?;
            programming.cold_ms = answer.apply_ms;
            programming.cold_cpu_ms = answer.apply_cpu_ms;
            memory.agent_rss_before_kib = agent.base_rss_kib;
            memory.agent_rss_received_kib = answer.state_rss_kib;
            memory.agent_rss_programmed_kib = answer.programmed_rss_kib;
            memory.agent_rss_kib = answer.rss_kib;
            memory.agent_peak_rss_kib = answer.hwm_kib;
            memory.bpf_map_memlock_kib = bpf_map_memlock_kib(&lab.nodes.pins_a);
            Load::Done
        }
        _ => {
            // The rules are written before the clock starts; only loading them is timed.
            let services = lab.rule_services(n, m);
            let (program, args, rules) = if mode == Mode::Nftables {
                ("nft", &["-f", "-"][..], kube_proxy::nft_ruleset(&services))
            } else {
                (iptables_restore(mode), &[][..], kube_proxy::iptables_restore(&services))
            };
            drop(services);
            let started = Instant::now();
            let loaded = lab.node_a_load(program, args, rules, plan.load_timeout)?;
            programming.cold_ms = started.elapsed().as_secs_f64() * 1e3;
            if let (Some(before), Some(after)) = (kernel_before, lab.kernel_memory_kib()) {
                memory.kernel_rules_kib = after - before;
            }
            loaded
        }
    };
    if loaded != Load::Done {
        unprogram(lab, mode, plan)?;
        let why = match loaded {
            Load::OutOfMemory => format!(
                "the loader ran out of its {} GiB memory limit after {:.0} s",
                LOADER_MEMORY_LIMIT_BYTES >> 30,
                programming.cold_ms / 1e3
            ),
            _ => format!("the load did not finish within {} s", plan.load_timeout.as_secs()),
        };
        return Ok(not_loaded(mode, n, m, why));
    }
    // Conntrack and the eBPF flow state: nothing a previous mode left translates a flow of
    // this one (client ports are reused across modes).
    lab.nodes.flush_conntrack()?;
    let target = match mode {
        Mode::Direct => SocketAddrV4::new(lab.nodes.pods_b[0].ip, BACKEND_PORT),
        // The last service programmed: a linear lookup pays its whole length.
        _ => SocketAddrV4::new(vip(n - 1), SERVICE_PORT),
    };
    let (mut runs, mut floor_runs) = (Vec::new(), Vec::new());
    for rep in 0..plan.repetitions {
        step(&format!("repetition {}/{}", rep + 1, plan.repetitions));
        floor_runs.push(lab.floor(durations)?);
        runs.push(lab.traffic(mode, target, durations)?);
    }
    if mode != Mode::Direct {
        step("service changes");
        change_latencies(lab, agent.as_mut(), plan, mode, n, m, &mut programming)?;
    }
    if let Some(agent) = agent.as_mut() {
        agent.call("clear")?;
    }
    drop(agent);
    unprogram(lab, mode, plan)?;
    let traffic = TrafficFigures::of(&runs);
    let floor = TrafficFigures::of(&floor_runs);
    Ok(ModeResult {
        mode,
        services: n,
        endpoints: m,
        not_measured: None,
        ratio_to_direct: Ratios::paired(&runs, &floor_runs),
        traffic,
        floor,
        programming,
        memory,
        runs,
        floor_runs,
    })
}

/// Removes every rule of a kube-proxy mode from node A (the eBPF modes' agent clears its own).
fn unprogram(lab: &Lab, mode: Mode, plan: &Plan) -> anyhow::Result<()> {
    let finished = match mode {
        Mode::Direct | Mode::EbpfSocket | Mode::EbpfTc => Load::Done,
        // Both live in nf_tables: node A holds nothing else.
        Mode::Nftables | Mode::Iptables => {
            lab.node_a_load("nft", &["flush", "ruleset"], String::new(), plan.load_timeout)?
        }
        Mode::IptablesLegacy => lab.node_a_load(
            iptables_restore(mode),
            &[],
            "*nat\nCOMMIT\n".to_owned(),
            plan.load_timeout,
        )?,
    };
    finished.finished(&format!("{}: removing the rules", mode.name()))
}

/// Adds and removes one service up to `plan.changes` times with N present (fewer once the
/// time budget is spent, at least once), each timed from the change until a probe connection
/// from the client pod (through the mode's path) sees it: answered after an add, not
/// answered (refused or unreachable) after a remove.
fn change_latencies(
    lab: &Lab,
    mut agent: Option<&mut AgentServices>,
    plan: &Plan,
    mode: Mode,
    services: usize,
    endpoints: usize,
    programming: &mut Programming,
) -> anyhow::Result<()> {
    let mut probe = ChildGuard(
        lab.client_command(mode, &["probe".to_owned()])?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the probe")?,
    );
    let mut requests = probe.0.stdin.take().expect("piped");
    let mut answers = BufReader::new(probe.0.stdout.take().expect("piped"));
    let present = if mode.is_kube_proxy() && mode != Mode::Nftables {
        lab.rule_services(services, endpoints)
    } else {
        Vec::new()
    };
    let (mut adds, mut removes, mut zone_ms) = (Vec::new(), Vec::new(), Vec::new());
    let started_all = Instant::now();
    'changes: for change in 0..plan.changes {
        check_interrupted()?;
        if change > 0 && started_all.elapsed() > plan.changes_budget {
            break;
        }
        let index = services + change;
        let service = lab.rule_service(index, endpoints);
        for adding in [true, false] {
            // The rules are written before the clock starts; only loading them is timed.
            let rules = match (mode, adding) {
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
            writeln!(requests, "{want} {} {}", service.vip, PROBE_DEADLINE.as_millis())?;
            requests.flush()?;
            let mut answer = String::new();
            answers.read_line(&mut answer).context("reading the probe")?;
            ensure!(answer.trim() == "probing", "the probe answered {answer:?}");
            let started_ns = super::worker::monotonic_ns();
            let mut zone = None;
            match agent.as_deref_mut() {
                Some(agent) => {
                    // The answer comes after the maps are written and the DNS zone rebuilt:
                    // it is read once the probe has seen the change.
                    agent.send(&if adding {
                        format!("add {index} {endpoints}")
                    } else {
                        format!("remove {index}")
                    })?;
                    zone = Some(agent);
                }
                None => {
                    let timeout = plan.load_timeout / 2;
                    let loaded = if mode == Mode::Nftables {
                        lab.node_a_load("nft", &["-f", "-"], rules, timeout)?
                    } else {
                        lab.node_a_load(iptables_restore(mode), &["--noflush"], rules, timeout)?
                    };
                    if loaded == Load::TimedOut {
                        // Reported as such; the probe goes with its guard, the rules with the
                        // mode's removal.
                        programming.change_timeout_s = Some(timeout.as_secs_f64());
                        break 'changes;
                    }
                    loaded.finished(&format!("{}: a one-service change", mode.name()))?;
                }
            }
            answer.clear();
            answers.read_line(&mut answer).context("reading the probe")?;
            if let Some(agent) = zone {
                zone_ms.push(agent.read_answer("a change")?.dns_zone_ms);
            }
            let words: Vec<&str> = answer.split_whitespace().collect();
            let ["ok", _attempts, timeouts, seen_at_ns] = words[..] else {
                anyhow::bail!("{}: service {index} never became {want}: {answer:?}", mode.name());
            };
            programming.probe_timeouts += timeouts.parse::<u64>().unwrap_or(0);
            let seen_at_ns: u64 = seen_at_ns.parse().context("the probe's time")?;
            let Some(elapsed) = seen_at_ns.checked_sub(started_ns) else {
                // An attempt started before the change saw it: a slow answer taken for none.
                programming.early_readings += 1;
                continue;
            };
            let elapsed = Duration::from_nanos(elapsed);
            if adding { adds.push(elapsed) } else { removes.push(elapsed) }
        }
        programming.changes += 1;
    }
    let ms = |samples: &[Duration]| -> Vec<f64> {
        samples.iter().map(|d| d.as_secs_f64() * 1e3).collect()
    };
    let (adds, removes) = (ms(&adds), ms(&removes));
    programming.add_p50_ms = quantile(&adds, 0.5);
    programming.add_p99_ms = quantile(&adds, 0.99);
    programming.remove_p50_ms = quantile(&removes, 0.5);
    programming.remove_p99_ms = quantile(&removes, 0.99);
    programming.dns_zone_ms = quantile(&zone_ms, 0.5);
    Ok(())
}

fn csv(results: &[ModeResult]) -> String {
    let rows: Vec<Vec<(String, String)>> = results
        .iter()
        .map(|r| {
            let mut row = vec![
                ("mode".to_owned(), r.mode.name().to_owned()),
                ("services".to_owned(), r.services.to_string()),
                ("endpoints".to_owned(), r.endpoints.to_string()),
                (
                    "not_measured".to_owned(),
                    r.not_measured.as_deref().unwrap_or("").replace(',', ";"),
                ),
            ];
            row.extend(stats::traffic_columns("", &r.traffic, Some(&r.ratio_to_direct)));
            row.extend(
                stats::traffic_columns("direct_", &r.floor, None)
                    .into_iter()
                    .filter(|(name, _)| !name.starts_with("direct_ratio_")),
            );
            let p = &r.programming;
            for (name, value) in [
                ("cold_ms", p.cold_ms),
                ("cold_cpu_ms", p.cold_cpu_ms),
                ("add_p50_ms", p.add_p50_ms),
                ("add_p99_ms", p.add_p99_ms),
                ("remove_p50_ms", p.remove_p50_ms),
                ("remove_p99_ms", p.remove_p99_ms),
                ("dns_zone_ms", p.dns_zone_ms),
            ] {
                row.push((name.to_owned(), format!("{value:.3}")));
            }
            row.push(("changes".to_owned(), p.changes.to_string()));
            row.push(("probe_timeouts".to_owned(), p.probe_timeouts.to_string()));
            row.push(("early_readings".to_owned(), p.early_readings.to_string()));
            let mem = &r.memory;
            for (name, value) in [
                ("agent_rss_kib", mem.agent_rss_kib as i64),
                ("agent_rss_before_kib", mem.agent_rss_before_kib as i64),
                ("agent_rss_received_kib", mem.agent_rss_received_kib as i64),
                ("agent_rss_programmed_kib", mem.agent_rss_programmed_kib as i64),
                ("agent_peak_rss_kib", mem.agent_peak_rss_kib as i64),
                ("bpf_map_memlock_kib", mem.bpf_map_memlock_kib),
                ("kernel_rules_kib", mem.kernel_rules_kib),
            ] {
                row.push((name.to_owned(), value.to_string()));
            }
            row
        })
        .collect();
    stats::csv(&rows)
}

fn mib(kib: impl Into<f64>) -> f64 {
    kib.into() / 1024.0
}

fn table(results: &[ModeResult], plan: &Plan) -> String {
    use std::fmt::Write as _;
    let d = &plan.durations;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} repetitions per figure, each after a {:.1} s warm-up: median [min–max] of the repetitions; ×D = over `direct` in a twin pair of nodes where nothing is ever programmed, each repetition over the floor repetition taken just before it, median of the pairs (same run). Client on CPU {}, servers on CPU {}.",
        plan.repetitions,
        d.warmup.as_secs_f64(),
        super::lab::CLIENT_CPU,
        super::lab::SERVER_CPU,
    );
    let _ = writeln!(
        out,
        "\nNEW CONNECTIONS ({:.1} s each): connect, 1-byte request, 1-byte answer, close with reset; latency µs per connection; CPU = client + server µs per connection",
        d.conn.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<15} {:>7} {:>3} {:>22} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6}",
        "MODE", "N", "M", "CONN/S", "×D", "P50", "P90", "P99", "P99.9", "×D P99", "CPU µs", "×D"
    );
    for r in results {
        let _ = write!(out, "{:<15} {:>7} {:>3} ", r.mode.name(), r.services, r.endpoints);
        if let Some(why) = &r.not_measured {
            let _ = writeln!(out, "{why}");
            continue;
        }
        let (t, x) = (&r.traffic, &r.ratio_to_direct);
        let _ = writeln!(
            out,
            "{:>7.0} [{:>6.0}–{:>6.0}] {:>6.3} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6.2} {:>7.1} {:>6.2}",
            t.conn_per_second.median,
            t.conn_per_second.min,
            t.conn_per_second.max,
            x.conn_per_second,
            t.conn_p50_us.median,
            t.conn_p90_us.median,
            t.conn_p99_us.median,
            t.conn_p999_us.median,
            x.conn_p99_us,
            t.conn_cpu_us,
            x.conn_cpu_us,
        );
    }
    let _ = writeln!(
        out,
        "\nESTABLISHED CONNECTION: request/response = 1-byte request, 1-byte answer on one connection ({:.1} s each), latency µs; stream = one connection writing as fast as it can ({:.1} s each)",
        d.rr.as_secs_f64(),
        d.stream.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<15} {:>7} {:>3} {:>22} {:>6} {:>7} {:>7} {:>7} {:>6} {:>20} {:>6}",
        "MODE", "N", "M", "REQ/S", "×D", "P50", "P99", "P99.9", "CPU µs", "STREAM Gbit/s", "×D"
    );
    for r in results {
        let _ = write!(out, "{:<15} {:>7} {:>3} ", r.mode.name(), r.services, r.endpoints);
        if let Some(why) = &r.not_measured {
            let _ = writeln!(out, "{why}");
            continue;
        }
        let (t, x) = (&r.traffic, &r.ratio_to_direct);
        let _ = writeln!(
            out,
            "{:>7.0} [{:>6.0}–{:>6.0}] {:>6.3} {:>7.1} {:>7.1} {:>7.1} {:>6.1} {:>6.2} [{:>5.2}–{:>5.2}] {:>6.3}",
            t.rr_per_second.median,
            t.rr_per_second.min,
            t.rr_per_second.max,
            x.rr_per_second,
            t.rr_p50_us.median,
            t.rr_p99_us.median,
            t.rr_p999_us.median,
            t.rr_cpu_us,
            t.stream_gbit_per_second.median,
            t.stream_gbit_per_second.min,
            t.stream_gbit_per_second.max,
            x.stream_gbit_per_second,
        );
    }
    let _ = writeln!(
        out,
        "\nPROGRAMMING AND MEMORY: COLD = N services from nothing, wall (CPU) ms (eBPF: the agent's apply of a snapshot; kube-proxy: the loader's run); ADD/DEL = one service changed with N present until a probe connection sees it, from when the first connection attempt that met the change started (CHG = changes measured; + = a later change took over half the load bound and the changes stopped); AGENT = RSS of the agent stand-in: before any service / holding the N services as received / programmed too / with its DNS zone too; MAPS = LB map memlock (capacity); RULES = kernel memory of the kube-proxy rules"
    );
    let _ = writeln!(
        out,
        "{:<15} {:>7} {:>3} {:>18} {:>17} {:>18} {:>3} {:>25} {:>8} {:>9}",
        "MODE",
        "N",
        "M",
        "COLD ms",
        "ADD p50/p99 ms",
        "DEL p50/p99 ms",
        "CHG",
        "AGENT MiB",
        "MAPS MiB",
        "RULES MiB"
    );
    for r in results {
        if r.mode == Mode::Direct {
            continue;
        }
        let _ = write!(out, "{:<15} {:>7} {:>3} ", r.mode.name(), r.services, r.endpoints);
        if let Some(why) = &r.not_measured {
            let _ = writeln!(out, "{why}");
            continue;
        }
        let (p, mem) = (&r.programming, &r.memory);
        let (cold, agent, maps, rules) = if r.mode.is_ebpf() {
            (
                format!("{:.1} ({:.1})", p.cold_ms, p.cold_cpu_ms),
                format!(
                    "{:.1}/{:.1}/{:.1}/{:.1}",
                    mib(mem.agent_rss_before_kib as f64),
                    mib(mem.agent_rss_received_kib as f64),
                    mib(mem.agent_rss_programmed_kib as f64),
                    mib(mem.agent_rss_kib as f64)
                ),
                format!("{:.1}", mib(mem.bpf_map_memlock_kib as f64)),
                "-".to_owned(),
            )
        } else {
            (
                format!("{:.1}", p.cold_ms),
                "-".to_owned(),
                "-".to_owned(),
                format!("{:.1}", mib(mem.kernel_rules_kib as f64)),
            )
        };
        let changes = match (p.change_timeout_s, p.changes) {
            (Some(limit), 0) => format!("{:>35}", format!("a change took over {limit:.0} s")),
            (timed_out, _) => format!(
                "{:>8.2}/{:<8.2} {:>8.2}/{:<8.2}{}",
                p.add_p50_ms,
                p.add_p99_ms,
                p.remove_p50_ms,
                p.remove_p99_ms,
                if timed_out.is_some() { "+" } else { " " }
            ),
        };
        let _ = writeln!(
            out,
            "{cold:>18} {changes} {:>3} {agent:>25} {maps:>8} {rules:>9}",
            p.changes,
        );
    }
    out
}

/// The targets, each with what this run measured and whether it is met. A target is
/// judged at N = 100,000 (and M = 10 where it says so); a sweep without that N judges at its
/// largest N and says so.
fn targets(results: &[ModeResult]) -> String {
    use std::fmt::Write as _;
    const TARGET_N: usize = 100_000;
    let measured =
        |mode: Mode| results.iter().filter(move |r| r.mode == mode && r.not_measured.is_none());
    let mut out = String::from("\nTARGETS\n");
    let verdict = |met: bool| if met { "met" } else { "NOT MET" };
    let Some(largest) = measured(Mode::EbpfSocket).map(|r| r.services).max() else {
        out.push_str("  ebpf-socket was not measured: no target can be judged\n");
        return out;
    };
    let at = if largest == TARGET_N {
        format!("N={largest}")
    } else {
        format!("N={largest} (the sweep's largest; the targets are for N={TARGET_N})")
    };
    let mut endpoints: Vec<usize> = measured(Mode::EbpfSocket).map(|r| r.endpoints).collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    for &m in &endpoints {
        let row =
            |n: usize| measured(Mode::EbpfSocket).find(|r| r.services == n && r.endpoints == m);
        let (Some(big), Some(one)) = (row(largest), row(1).or_else(|| row(largest))) else {
            continue;
        };
        let scale = big.traffic.conn_per_second.median / one.traffic.conn_per_second.median;
        let scale_normalized =
            big.ratio_to_direct.conn_per_second / one.ratio_to_direct.conn_per_second;
        let _ = writeln!(
            out,
            "  ebpf-socket new connections at {at}, M={m} ≥ 0.98 × at N={}: {:.3} ({:.0}/s against {:.0}/s); over each one's own direct floor: {:.3} — {}",
            one.services,
            scale,
            big.traffic.conn_per_second.median,
            one.traffic.conn_per_second.median,
            scale_normalized,
            verdict(scale_normalized >= 0.98),
        );
        let _ = writeln!(
            out,
            "  ebpf-socket new connections at {at}, M={m} ≥ 0.95 × direct: {:.3} — {}",
            big.ratio_to_direct.conn_per_second,
            verdict(big.ratio_to_direct.conn_per_second >= 0.95),
        );
        let change = big.programming.add_p99_ms.max(big.programming.remove_p99_ms);
        let _ = writeln!(
            out,
            "  one service change with {at} present, M={m}, ≤ 5 ms p99: add {:.2} ms, remove {:.2} ms ({} of each) — {}",
            big.programming.add_p99_ms,
            big.programming.remove_p99_ms,
            big.programming.changes,
            verdict(change <= 5.0),
        );
        let rss = mib(big.memory.agent_rss_kib as f64);
        let _ = writeln!(
            out,
            "  agent RSS with {at}, M={m}, ≤ 150 MiB: {rss:.1} MiB (of which {:.1} MiB before any service) — {}",
            mib(big.memory.agent_rss_before_kib as f64),
            verdict(rss <= 150.0),
        );
    }
    match measured(Mode::EbpfSocket).find(|r| r.services == largest && r.endpoints == 10) {
        Some(r) => {
            let _ = writeln!(
                out,
                "  cold programming of {at} × 10 endpoints ≤ 1 s: {:.0} ms — {}",
                r.programming.cold_ms,
                verdict(r.programming.cold_ms <= 1000.0),
            );
        }
        None => out.push_str("  cold programming × 10 endpoints: not measured (needs M=10)\n"),
    }
    out
}

/// The charts: per M, new-connection rate and latency against N for every mode; per M,
/// programming (cold load, and one change's p99) against N.
fn charts(results: &[ModeResult], plan: &Plan) -> Vec<(String, Chart)> {
    let mut charts = Vec::new();
    let series = |m: usize, modes: &[Mode], value: &dyn Fn(&ModeResult) -> f64| -> Vec<Series> {
        modes
            .iter()
            .map(|&mode| Series {
                name: mode.name().to_owned(),
                color: mode.color(),
                dashed: false,
                points: results
                    .iter()
                    .filter(|r| r.mode == mode && r.endpoints == m)
                    .map(|r| (r.services as f64, r.not_measured.is_none().then(|| value(r))))
                    .collect(),
            })
            .collect()
    };
    let programmed: Vec<Mode> = plan.modes.iter().copied().filter(|m| *m != Mode::Direct).collect();
    for &m in &plan.endpoints {
        let endpoints = if m == 1 { "1 endpoint".to_owned() } else { format!("{m} endpoints") };
        let chart = |title: String, y_label: &str, log_y: bool, series: Vec<Series>| Chart {
            title,
            x_label: "services (N), log scale".to_owned(),
            y_label: y_label.to_owned(),
            log_y,
            series,
        };
        charts.push((
            format!("services-conn-rate-m{m}.svg"),
            chart(
                format!("New connections per second, services of {endpoints}"),
                "connections/s",
                false,
                series(m, &plan.modes, &|r| r.traffic.conn_per_second.median),
            ),
        ));
        let mut latency = series(m, &plan.modes, &|r| r.traffic.conn_p50_us.median);
        for line in &mut latency {
            line.name.push_str(" p50");
        }
        for mut line in series(m, &plan.modes, &|r| r.traffic.conn_p99_us.median) {
            line.name.push_str(" p99");
            line.dashed = true;
            latency.push(line);
        }
        charts.push((
            format!("services-conn-latency-m{m}.svg"),
            chart(
                format!("New-connection latency, services of {endpoints}"),
                "µs per connection (log scale)",
                true,
                latency,
            ),
        ));
        charts.push((
            format!("services-cold-programming-m{m}.svg"),
            chart(
                format!("Programming N services from nothing, {endpoints} each"),
                "ms (log scale)",
                true,
                series(m, &programmed, &|r| r.programming.cold_ms.max(0.001)),
            ),
        ));
        let mut change = series(m, &programmed, &|r| r.programming.add_p99_ms.max(0.001));
        for line in &mut change {
            line.name.push_str(" add");
        }
        for mut line in series(m, &programmed, &|r| r.programming.remove_p99_ms.max(0.001)) {
            line.name.push_str(" remove");
            line.dashed = true;
            change.push(line);
        }
        charts.push((
            format!("services-change-p99-m{m}.svg"),
            chart(
                format!("One service changed with N present, p99, {endpoints}"),
                "ms until a probe sees it (log scale)",
                true,
                change,
            ),
        ));
    }
    charts
}
