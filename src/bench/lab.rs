//! The plumbing `strait bench services` and `strait bench pods` share: namespaces, cgroups,
//! pin directories and processes removed on drop (on error and on Ctrl-C too), pods plumbed by
//! the real strait-cni, and the client runs of the bench worker with their figures.
//!
//! Every rule and sysctl a bench writes goes into a namespace made here, never the root one;
//! every route is checked before traffic is sent (DESIGN.md, Network safety).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde::Serialize;
use strait_dataplane::{cgroup::Cgroup, netns::NetNs, runtime::process::ChildSetup};

use super::worker::{RateRun, StreamRun};

/// Set by SIGINT/SIGTERM: the bench stops at the next step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From here on, SIGINT and SIGTERM make [`check_interrupted`] fail, so the bench unwinds and
/// its guards clean up (the children, in their own process group, stop with the signal too).
pub fn stop_on_signals() -> anyhow::Result<()> {
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    for signal in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::signal(signal, handler) }
            .context("installing signal handlers")?;
    }
    Ok(())
}

pub fn check_interrupted() -> anyhow::Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// A child process killed and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace of the bench, deleted on drop.
pub struct Namespace {
    ns: Option<NetNs>,
    pub name: String,
}

impl Namespace {
    pub fn new(name: String) -> anyhow::Result<Self> {
        let ns = NetNs::create(&name).with_context(|| format!("creating namespace {name}"))?;
        let namespace = Self { ns: Some(ns), name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("open until dropped")
    }

    pub fn path(&self) -> PathBuf {
        strait_dataplane::netns::named_path(&self.name)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
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
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        ChildSetup::new().enter_netns(&self.path())?.install(&mut command);
        Ok(command)
    }

    /// Fails unless traffic from here to `destination` leaves through `device`, a link of the
    /// lab (DESIGN.md, Network safety). Called before anything is sent.
    pub fn check_route(&self, destination: &str, device: &str) -> anyhow::Result<()> {
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

pub fn assert_not_root_namespace(path: &Path) -> anyhow::Result<()> {
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
pub struct DirGuard(pub PathBuf);

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
pub struct CgroupGuard(pub Cgroup);

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

/// A pod of a bench lab: its namespace, address and host-side veth.
pub struct Pod {
    pub ns: Namespace,
    pub ip: Ipv4Addr,
    pub host_veth: String,
}

/// Plumbs `pod` into `node` with strait-cni (run inside the node's namespace, as a runtime on
/// that node would), with `config` as the network configuration.
pub fn cni_add(
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

/// Where the client and the servers run: on different CPUs, so that neither waits for the
/// other to be scheduled and every mode is measured on the same pair.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

/// How long each kind of traffic runs in one repetition, each after its own warm-up.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Durations {
    pub warmup: Duration,
    pub conn: Duration,
    pub rr: Duration,
    pub stream: Duration,
}

impl Durations {
    /// Wall time of one repetition, processes aside.
    pub fn repetition(&self) -> Duration {
        self.conn + self.rr + self.stream + self.warmup * 3
    }
}

/// One repetition: new connections, then request/response on one established connection,
/// then one stream, each from its own client process.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficRun {
    pub conn: RateRun,
    pub rr: RateRun,
    pub stream: StreamRun,
}

/// Starts the bench worker's server in `pod`, pinned to [`SERVER_CPU`].
pub fn start_server(strait: &Path, pod: &Namespace, port: u16) -> anyhow::Result<ChildGuard> {
    let mut command = pod.command(strait)?;
    command
        .args(["bench-worker", "serve", "--port", &port.to_string()])
        .args(["--cpu", &SERVER_CPU.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(ChildGuard(command.spawn().context("starting a server")?))
}

/// CPU time (user + system) of every server so far, from /proc/<pid>/stat.
pub fn servers_cpu_seconds(servers: &[ChildGuard]) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    servers
        .iter()
        .filter_map(|server| std::fs::read_to_string(format!("/proc/{}/stat", server.0.id())).ok())
        .map(|stat| {
            // Fields after the command name in parentheses; utime and stime are 14 and 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
            (field(11) + field(12)) / ticks
        })
        .sum()
}

/// Runs a worker client to completion and reads the JSON it prints.
fn run_client<T: serde::de::DeserializeOwned>(
    mut command: Command,
    what: &str,
) -> anyhow::Result<T> {
    check_interrupted()?;
    let output =
        command.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    ensure!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr).trim());
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{what} printed {}", String::from_utf8_lossy(&output.stdout)))
}

/// Measures the three kinds of traffic to `target` with clients made by `client` (given the
/// worker's arguments); the servers' CPU time is added to the clients'. Server time is read
/// over each whole client run (warm-up included) and spread over the measured part by its
/// share of the run: a small overestimate, the same for every mode.
pub fn measure_traffic(
    client: &dyn Fn(&[String]) -> anyhow::Result<Command>,
    target: SocketAddrV4,
    durations: &Durations,
    servers: &[ChildGuard],
) -> anyhow::Result<TrafficRun> {
    let args = |kind: &str, duration: Duration| -> Vec<String> {
        vec![
            kind.to_owned(),
            "--target".into(),
            target.to_string(),
            "--warmup-ms".into(),
            durations.warmup.as_millis().to_string(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
            "--cpu".into(),
            CLIENT_CPU.to_string(),
        ]
    };
    let warmup = durations.warmup.as_secs_f64();
    let share = |seconds: f64| seconds / (seconds + warmup);
    let before = servers_cpu_seconds(servers);
    let mut conn: RateRun =
        run_client(client(&args("conn-rate", durations.conn))?, "the new-connection client")?;
    let after_conn = servers_cpu_seconds(servers);
    conn.cpu_seconds += (after_conn - before) * share(conn.seconds);
    ensure!(conn.count > 0, "no connection to {target} succeeded: {:?}", conn.first_error);
    let mut rr: RateRun = run_client(
        client(&args("request-response", durations.rr))?,
        "the request/response client",
    )?;
    let after_rr = servers_cpu_seconds(servers);
    rr.cpu_seconds += (after_rr - after_conn) * share(rr.seconds);
    let mut stream: StreamRun =
        run_client(client(&args("stream", durations.stream))?, "the stream client")?;
    stream.cpu_seconds += (servers_cpu_seconds(servers) - after_rr) * share(stream.seconds);
    Ok(TrafficRun { conn, rr, stream })
}

/// Node A ↔ node B.
pub const NODE_A_ADDRESS: &str = "172.31.255.1";
pub const NODE_B_ADDRESS: &str = "172.31.255.2";
pub const NODE_LINK: &str = "nodelink";
pub const NODE_A_SUBNET: &str = "10.244.1.0/24";
pub const NODE_B_SUBNET: &str = "10.244.2.0/24";
/// The service range of the benches: large enough for 100,000 services and more.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Two node namespaces joined by a veth, each routing the other's pod subnet through it, with
/// pods plumbed by the real strait-cni (tc programs on the host veths), a private pin
/// directory per node, and a cgroup under `strait/` carrying the socket hooks, as a node agent
/// sets them up. The root namespace gets no route and no sysctl.
///
/// Fields drop in order: the hooked cgroup (and its processes), programs, pods, nodes, pins.
pub struct StraitNodes {
    pub hooked: CgroupGuard,
    pub lb: strait_dataplane::ebpf::lb::ServiceLb,
    _tc_a: strait_dataplane::ebpf::antispoof::AntiSpoof,
    _tc_b: strait_dataplane::ebpf::antispoof::AntiSpoof,
    pub pods_a: Vec<Pod>,
    pub pods_b: Vec<Pod>,
    pub node_a: Namespace,
    pub node_b: Namespace,
    _data: DirGuard,
    _pins: DirGuard,
    /// Node A's pins (the load-balancing maps the socket hooks and node A's tc programs use).
    pub pins_a: PathBuf,
}

impl StraitNodes {
    /// `prefix` names everything (namespaces, pins, the cgroup); `pods_a` and `pods_b` are the
    /// pod names per node; `sizes` sizes node A's load-balancing maps.
    pub fn build(
        cni: &Path,
        prefix: &str,
        pods_a: &[&str],
        pods_b: &[&str],
        sizes: &strait_dataplane::ebpf::lb::LbMapSizes,
    ) -> anyhow::Result<Self> {
        use strait_dataplane::ebpf::{antispoof::AntiSpoof, lb::ServiceLb};
        strait_dataplane::ebpf::ensure_bpffs()?;
        let pin_root = Path::new(strait_dataplane::ebpf::BPFFS_ROOT).join(prefix);
        let pins = DirGuard(pin_root.clone());
        let (pins_a, pins_b) = (pin_root.join("node-a"), pin_root.join("node-b"));
        std::fs::create_dir_all(&pins_a)?;
        std::fs::create_dir_all(&pins_b)?;
        let data = DirGuard(std::env::temp_dir().join(prefix));
        std::fs::create_dir_all(&data.0)?;
        let tc_a = AntiSpoof::load_and_pin_with(&pins_a, sizes).context("tc programs, node A")?;
        let tc_b = AntiSpoof::load_and_pin_with(&pins_b, &Default::default())
            .context("tc programs, node B")?;
        let lb = ServiceLb::load_and_pin(&pins_a, sizes).context("socket hooks")?;
        let cgroup = Cgroup::new(&Path::new("strait").join(prefix))?;
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
            (&node_a, NODE_A_ADDRESS, NODE_B_ADDRESS, NODE_B_SUBNET),
            (&node_b, NODE_B_ADDRESS, NODE_A_ADDRESS, NODE_A_SUBNET),
        ] {
            node.ip(&["addr", "add", &format!("{address}/30"), "dev", NODE_LINK])?;
            node.ip(&["link", "set", NODE_LINK, "up"])?;
            node.ip(&["route", "add", subnet, "via", peer, "dev", NODE_LINK])?;
            // A VIP with nothing behind it fails fast (DESIGN.md, Network safety).
            node.ip(&["route", "add", "unreachable", SERVICE_CIDR])?;
            // Per-namespace sysctls: the root namespace is untouched.
            node.ns().write_net_sysctl("ipv4/ip_forward", "1")?;
            // No ICMP type is rate-limited here (neither per peer nor by the namespace's
            // global budget of icmp_msgs_burst): a connection to a VIP without a frontend
            // gets its "unreachable" at once however often it is tried, so a probe sees
            // a removal within one connection attempt instead of waiting for a timeout.
            node.ns().write_net_sysctl("ipv4/icmp_ratemask", "0")?;
        }
        let config = |subnet: &str, pins: &Path, dir: &str| {
            serde_json::json!({
                "cniVersion": "1.1.0", "name": "strait-bench", "type": "strait-cni",
                "ipam": { "subnet": subnet, "dataDir": data.0.join(dir) },
                "antiSpoof": { "pinDir": pins },
            })
        };
        let mut plumbed = [Vec::new(), Vec::new()];
        for (list, node, names, subnet, pins, dir) in [
            (0, &node_a, pods_a, NODE_A_SUBNET, &pins_a, "a"),
            (1, &node_b, pods_b, NODE_B_SUBNET, &pins_b, "b"),
        ] {
            for name in names {
                let pod = Namespace::new(format!("{prefix}-{name}"))?;
                plumbed[list].push(cni_add(cni, node, pod, name, &config(subnet, pins, dir))?);
            }
        }
        let [pods_a, pods_b] = plumbed;
        let nodes = Self {
            hooked,
            lb,
            _tc_a: tc_a,
            _tc_b: tc_b,
            pods_a,
            pods_b,
            node_a,
            node_b,
            _data: data,
            _pins: pins,
            pins_a,
        };
        nodes.check_routes()?;
        Ok(nodes)
    }

    /// Every pod reaches every other pod through the lab's links only, and the service range
    /// ends at node A's and node B's unreachable routes (DESIGN.md, Network safety).
    fn check_routes(&self) -> anyhow::Result<()> {
        let all = || self.pods_a.iter().chain(&self.pods_b);
        for from in all() {
            for to in all() {
                if from.ip != to.ip {
                    from.ns.check_route(&to.ip.to_string(), "eth0")?;
                }
            }
        }
        for (node, local, remote) in
            [(&self.node_a, &self.pods_a, &self.pods_b), (&self.node_b, &self.pods_b, &self.pods_a)]
        {
            for pod in local {
                node.check_route(&pod.ip.to_string(), &pod.host_veth)?;
            }
            for pod in remote {
                node.check_route(&pod.ip.to_string(), NODE_LINK)?;
            }
            let routed = node.ip(&["route", "show", "table", "main", SERVICE_CIDR])?;
            ensure!(
                routed.contains("unreachable"),
                "{} routes {SERVICE_CIDR}: {routed}",
                node.name
            );
        }
        Ok(())
    }

    /// Empties node A's and node B's conntrack tables.
    pub fn flush_conntrack(&self) -> anyhow::Result<()> {
        flush_conntrack(&self.node_a)?;
        flush_conntrack(&self.node_b)
    }
}

/// Empties the conntrack table of `node`.
pub fn flush_conntrack(node: &Namespace) -> anyhow::Result<()> {
    let output = node.command("conntrack")?.arg("-F").output();
    match output {
        Ok(output) => {
            // "0 flow entries" goes to stderr with success; a missing table is no error.
            ensure!(
                output.status.success() || output.stderr.is_empty(),
                "conntrack -F in {}: {}",
                node.name,
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("the conntrack tool is missing (apt-get install conntrack)")
        }
        Err(error) => Err(error).context("running conntrack -F"),
    }
}
