//! `strait bench pods`: pod-to-pod traffic on the same node and across nodes (new connections,
//! request/response on an established connection, one stream), through strait's plumbing
//! beside a floor built in the same run from plain veths and routes.
//!
//! - strait: two nodes of [`StraitNodes`] (strait-cni pods with their tc programs on the host
//!   veths; the client in the cgroup carrying the socket hooks, as a pod of a node agent is);
//! - floor: the same shape made with iproute2 and nothing else: node namespaces joined by a
//!   veth, pods on veths with a `/32` address, a link-local gateway and static neighbours as
//!   strait-cni makes them, but no program and no hook.
//!
//! Repetitions alternate floor and strait, so both see the same drift of a shared machine.
//! Every namespace is the bench's own and goes on drop, on error and on Ctrl-C.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde::Serialize;
use strait_dataplane::runtime::process::ChildSetup;

use super::{
    lab::{
        ChildGuard, Durations, NODE_LINK, Namespace, StraitNodes, TrafficRun, check_interrupted,
        measure_traffic, start_server,
    },
    stats::{self, Ratios, TrafficFigures},
};

const SERVER_PORT: u16 = 9000;

/// Options of `strait bench pods`.
#[derive(clap::Args, Debug)]
pub struct PodsArgs {
    /// Short runs (within a minute).
    #[arg(long)]
    pub quick: bool,
    /// Measured seconds of each repetition's new-connection run (default 2, 0.6 with
    /// --quick); its request/response and stream runs take half as long each.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Repetitions per figure (each one of every path and setup).
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Where to write JSON and CSV (default `bench-results/pods-<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Where the server pod is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodPath {
    SameNode,
    CrossNode,
}

impl PodPath {
    fn name(self) -> &'static str {
        match self {
            PodPath::SameNode => "same-node",
            PodPath::CrossNode => "cross-node",
        }
    }
}

/// The floor: node and pod namespaces joined by veths and routes made with iproute2. Fields
/// drop in order: servers, pods, nodes.
struct VethFloor {
    servers: Vec<ChildGuard>,
    client: Namespace,
    local: (Namespace, Ipv4Addr),
    remote: (Namespace, Ipv4Addr),
    node_a: Namespace,
    node_b: Namespace,
}

/// The floor's addresses: apart from strait's so that nothing could ever mix them up.
const FLOOR_NODE_A: &str = "172.31.254.1";
const FLOOR_NODE_B: &str = "172.31.254.2";
const FLOOR_POD_GATEWAY: &str = "169.254.1.1";
const FLOOR_PODS: &str = "10.245.0.0/16";

impl VethFloor {
    fn build(prefix: &str, strait: &Path) -> anyhow::Result<Self> {
        let node_a = Namespace::new(format!("{prefix}-floor-node-a"))?;
        let node_b = Namespace::new(format!("{prefix}-floor-node-b"))?;
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
            (&node_a, FLOOR_NODE_A, FLOOR_NODE_B, "10.245.2.0/24"),
            (&node_b, FLOOR_NODE_B, FLOOR_NODE_A, "10.245.1.0/24"),
        ] {
            node.ip(&["addr", "add", &format!("{address}/30"), "dev", NODE_LINK])?;
            node.ip(&["link", "set", NODE_LINK, "up"])?;
            node.ip(&["route", "add", subnet, "via", peer, "dev", NODE_LINK])?;
            node.ns().write_net_sysctl("ipv4/ip_forward", "1")?;
        }
        let client = Self::pod(prefix, &node_a, "client", "10.245.1.2")?;
        let local = Self::pod(prefix, &node_a, "local", "10.245.1.3")?;
        let remote = Self::pod(prefix, &node_b, "remote", "10.245.2.2")?;
        let mut floor = Self {
            servers: Vec::new(),
            client,
            local: (local, Ipv4Addr::new(10, 245, 1, 3)),
            remote: (remote, Ipv4Addr::new(10, 245, 2, 2)),
            node_a,
            node_b,
        };
        for (from, to) in [
            (&floor.client, floor.local.1),
            (&floor.client, floor.remote.1),
            (&floor.local.0, Ipv4Addr::new(10, 245, 1, 2)),
            (&floor.remote.0, Ipv4Addr::new(10, 245, 1, 2)),
        ] {
            from.check_route(&to.to_string(), "eth0")?;
        }
        floor.node_a.check_route(&floor.remote.1.to_string(), NODE_LINK)?;
        floor.node_b.check_route(&floor.local.1.to_string(), NODE_LINK)?;
        for pod in [&floor.local.0, &floor.remote.0] {
            floor.servers.push(start_server(strait, pod, SERVER_PORT)?);
        }
        Ok(floor)
    }

    /// A pod on `node` as strait-cni shapes one: `/32` address, the gateway on-link with a
    /// static neighbour, the node's `/32` route and static neighbour back, but with iproute2
    /// and with no program on either end. Only the floor's pod range is routed.
    fn pod(prefix: &str, node: &Namespace, name: &str, address: &str) -> anyhow::Result<Namespace> {
        let pod = Namespace::new(format!("{prefix}-floor-{name}"))?;
        let host = format!("fl-{name}");
        node.ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ])?;
        pod.ip(&["addr", "add", &format!("{address}/32"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        node.ip(&["link", "set", &host, "up"])?;
        let mac = |ns: &Namespace, device: &str| -> anyhow::Result<String> {
            let links: serde_json::Value =
                serde_json::from_str(&ns.ip(&["-j", "link", "show", device])?)?;
            Ok(links[0]["address"].as_str().context("a veth without a MAC address")?.to_owned())
        };
        let (host_mac, pod_mac) = (mac(node, &host)?, mac(&pod, "eth0")?);
        pod.ip(&["route", "add", FLOOR_POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
        pod.ip(&["route", "add", FLOOR_PODS, "via", FLOOR_POD_GATEWAY, "dev", "eth0"])?;
        pod.ip(&[
            "neigh",
            "add",
            FLOOR_POD_GATEWAY,
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        node.ip(&["route", "add", &format!("{address}/32"), "dev", &host])?;
        node.ip(&["neigh", "add", address, "lladdr", &pod_mac, "dev", &host, "nud", "permanent"])?;
        Ok(pod)
    }
}

/// strait's side: the client and a server pod on node A, a server pod on node B.
struct StraitPods {
    servers: Vec<ChildGuard>,
    nodes: StraitNodes,
}

impl StraitPods {
    fn build(cni: &Path, prefix: &str, strait: &Path) -> anyhow::Result<Self> {
        let nodes = StraitNodes::build(
            cni,
            prefix,
            &["client", "local"],
            &["remote"],
            &Default::default(),
        )?;
        let mut pods = Self { servers: Vec::new(), nodes };
        for pod in [&pods.nodes.pods_a[1].ns, &pods.nodes.pods_b[0].ns] {
            pods.servers.push(start_server(strait, pod, SERVER_PORT)?);
        }
        Ok(pods)
    }
}

/// One setup (floor or strait) on one path.
#[derive(Debug, Serialize)]
pub struct PodResult {
    pub setup: &'static str,
    pub path: PodPath,
    pub traffic: TrafficFigures,
    /// `traffic` over the floor's on the same path (1 for the floor itself).
    pub ratio_to_floor: Ratios,
    pub runs: Vec<TrafficRun>,
}

fn client_command(
    strait: &Path,
    pod: &Namespace,
    cgroup_procs: Option<&Path>,
    args: &[String],
) -> anyhow::Result<Command> {
    let mut setup = ChildSetup::new().enter_netns(&pod.path())?;
    if let Some(procs) = cgroup_procs {
        setup = setup.join_cgroup(procs)?;
    }
    let mut command = Command::new(strait);
    command.arg("bench-worker").args(args);
    setup.install(&mut command);
    Ok(command)
}

/// Runs the bench and prints and writes its figures.
pub fn pods(args: &PodsArgs, cni: &Path) -> anyhow::Result<()> {
    ensure!(nix::unistd::Uid::effective().is_root(), "strait bench pods needs root");
    super::lab::stop_on_signals()?;
    let seconds = args.seconds.unwrap_or(if args.quick { 0.6 } else { 2.0 });
    ensure!(seconds > 0.0, "--seconds must be positive");
    let repetitions = args.repetitions.unwrap_or(3).max(1);
    let conn = Duration::from_secs_f64(seconds);
    let durations = Durations {
        warmup: Duration::from_secs_f64((seconds / 5.0).min(0.3)),
        conn,
        rr: conn / 2,
        stream: conn / 2,
    };
    let strait = std::env::current_exe()?;
    let prefix = format!("strait-bench-{}", std::process::id());
    eprintln!("building the floor (iproute2 veths and routes) and strait's two nodes");
    let floor = VethFloor::build(&prefix, &strait)?;
    let ours = StraitPods::build(cni, &prefix, &strait)?;
    let hooked = ours.nodes.hooked.0.procs_file();

    let cases: [(&'static str, PodPath); 4] = [
        ("veth-floor", PodPath::SameNode),
        ("strait", PodPath::SameNode),
        ("veth-floor", PodPath::CrossNode),
        ("strait", PodPath::CrossNode),
    ];
    let mut runs: Vec<Vec<TrafficRun>> = cases.iter().map(|_| Vec::new()).collect();
    for rep in 0..repetitions {
        for (case, &(setup, path)) in cases.iter().enumerate() {
            check_interrupted()?;
            eprintln!("repetition {}/{repetitions}: {setup} {}", rep + 1, path.name());
            let run = if setup == "strait" {
                ours.nodes.flush_conntrack()?;
                ours.nodes.lb.clear_flows().context("clearing the eBPF flow state")?;
                let server = match path {
                    PodPath::SameNode => &ours.nodes.pods_a[1],
                    PodPath::CrossNode => &ours.nodes.pods_b[0],
                };
                let client = |args: &[String]| {
                    client_command(&strait, &ours.nodes.pods_a[0].ns, Some(&hooked), args)
                };
                let target = SocketAddrV4::new(server.ip, SERVER_PORT);
                measure_traffic(&client, target, &durations, &ours.servers)?
            } else {
                let server = match path {
                    PodPath::SameNode => floor.local.1,
                    PodPath::CrossNode => floor.remote.1,
                };
                let client = |args: &[String]| client_command(&strait, &floor.client, None, args);
                let target = SocketAddrV4::new(server, SERVER_PORT);
                measure_traffic(&client, target, &durations, &floor.servers)?
            };
            runs[case].push(run);
        }
    }
    drop(ours);
    drop(floor);

    let mut results = Vec::new();
    for (case, runs) in runs.into_iter().enumerate() {
        let (setup, path) = cases[case];
        let traffic = TrafficFigures::of(&runs);
        results.push(PodResult { setup, path, ratio_to_floor: Ratios::default(), traffic, runs });
    }
    // Repetition i of strait is paired with repetition i of the floor, taken just before it.
    for pair in results.chunks_mut(2) {
        let [floor, ours] = pair else { continue };
        floor.ratio_to_floor = Ratios::paired(&floor.runs, &floor.runs);
        ours.ratio_to_floor = Ratios::paired(&ours.runs, &floor.runs);
    }
    print!("{}", table(&results, &durations, repetitions));
    let out = args.out.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!("bench-results/pods-{now}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("pods.json"), serde_json::to_string_pretty(&results)?)?;
    let rows: Vec<Vec<(String, String)>> = results
        .iter()
        .map(|r| {
            let mut row = vec![
                ("setup".to_owned(), r.setup.to_owned()),
                ("path".to_owned(), r.path.name().to_owned()),
            ];
            row.extend(
                stats::traffic_columns("", &r.traffic, Some(&r.ratio_to_floor))
                    .into_iter()
                    .map(|(name, value)| (name.replace("ratio_", "ratio_to_floor_"), value)),
            );
            row
        })
        .collect();
    std::fs::write(out.join("pods.csv"), stats::csv(&rows))?;
    println!("written: {} and pods.csv", out.join("pods.json").display());
    Ok(())
}

fn table(results: &[PodResult], durations: &Durations, repetitions: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npod to pod: {repetitions} repetitions, each after a {:.1} s warm-up, median [min–max]; ×F = over the veth-and-route floor on the same path, each repetition over the floor's taken just before it, median of the pairs (same run). New connections ({:.1} s): connect, 1-byte request, 1-byte answer, close with reset. Request/response ({:.1} s): 1 byte each way on one connection. Stream ({:.1} s): one connection. Latency µs; CPU = client + server µs per operation.",
        durations.warmup.as_secs_f64(),
        durations.conn.as_secs_f64(),
        durations.rr.as_secs_f64(),
        durations.stream.as_secs_f64(),
    );
    let _ = writeln!(
        out,
        "{:<11} {:<10} {:>22} {:>6} {:>7} {:>7} {:>6} {:>22} {:>6} {:>7} {:>7} {:>20} {:>6}",
        "PATH",
        "SETUP",
        "CONN/S",
        "×F",
        "P50",
        "P99",
        "CPU µs",
        "REQ/S",
        "×F",
        "P50",
        "P99",
        "STREAM Gbit/s",
        "×F"
    );
    for r in results {
        let (t, x) = (&r.traffic, &r.ratio_to_floor);
        let _ = writeln!(
            out,
            "{:<11} {:<10} {:>7.0} [{:>6.0}–{:>6.0}] {:>6.3} {:>7.1} {:>7.1} {:>6.1} {:>7.0} [{:>6.0}–{:>6.0}] {:>6.3} {:>7.1} {:>7.1} {:>6.2} [{:>5.2}–{:>5.2}] {:>6.3}",
            r.path.name(),
            r.setup,
            t.conn_per_second.median,
            t.conn_per_second.min,
            t.conn_per_second.max,
            x.conn_per_second,
            t.conn_p50_us.median,
            t.conn_p99_us.median,
            t.conn_cpu_us,
            t.rr_per_second.median,
            t.rr_per_second.min,
            t.rr_per_second.max,
            x.rr_per_second,
            t.rr_p50_us.median,
            t.rr_p99_us.median,
            t.stream_gbit_per_second.median,
            t.stream_gbit_per_second.min,
            t.stream_gbit_per_second.max,
            x.stream_gbit_per_second,
        );
    }
    out
}
