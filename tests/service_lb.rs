//! Service load balancing in real namespaces: a node namespace (ip_forward on, the service CIDR
//! `unreachable`), pods plumbed by the real strait-cni with the tc programs on their host veths,
//! three backends running `strait netexec`, and a client pod running `strait netclient`, once
//! inside a test cgroup carrying the socket hooks (socket path) and once outside it (tc path).
//! Needs root; namespaces, cgroups, pins and processes go on drop, also on panic.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use strait_cni::{invocation::Attachment, naming::host_veth_name};
use strait_dataplane::{
    cgroup::Cgroup,
    ebpf::{
        antispoof::AntiSpoof,
        lb::{Backend, FrontendKey, L4Protocol, LbMapSizes, ServiceFrontend, ServiceLb},
    },
    runtime::process::ChildSetup,
};
use support::{DirGuard, NamespaceGuard, privileged, unique_name};

const STRAIT: &str = env!("CARGO_BIN_EXE_strait");
const SERVICE_CIDR: &str = "10.96.0.0/16";
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn tcp(vip: Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey { vip, port, protocol: L4Protocol::Tcp }
}

fn udp(vip: Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey { vip, port, protocol: L4Protocol::Udp }
}

/// A process killed and reaped when the guard drops.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cgroup under `strait/` whose processes are killed and which is removed on drop.
struct CgroupGuard(Cgroup);

impl CgroupGuard {
    fn new() -> Self {
        let cgroup = Cgroup::new(&Path::new("strait").join(unique_name("lb")))
            .expect("a cgroup under strait/");
        cgroup.create().expect("creating the test cgroup");
        Self(cgroup)
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill_all(Duration::from_secs(5)) {
            eprintln!("killing the processes of {}: {e}", self.0.path().display());
        }
        if let Err(e) = self.0.remove() {
            eprintln!("removing {}: {e}", self.0.path().display());
        }
    }
}

/// Which datapath a client goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path_ {
    /// The client joins the hooked cgroup: connect()/sendmsg() are translated.
    Socket,
    /// The client stays outside: its packets are translated on its host veth.
    Tc,
}

struct Pod {
    ns: NamespaceGuard,
    ip: Ipv4Addr,
    name: String,
    host_veth: String,
}

/// Fields drop in order: processes, the cgroup, the loaded programs, namespaces, then pins.
struct Topology {
    processes: Vec<ChildGuard>,
    hooked: CgroupGuard,
    lb: Option<ServiceLb>,
    _antispoof: AntiSpoof,
    client: Pod,
    backends: Vec<Pod>,
    node: NamespaceGuard,
    _data: DirGuard,
    pin_dir: PathBuf,
    _pins: DirGuard,
}

impl Topology {
    fn new(tag: &str) -> Self {
        strait_dataplane::ebpf::ensure_bpffs().unwrap();
        let (pins, pin_dir) = DirGuard::pins(tag);
        let sizes = LbMapSizes { conntrack: 16_384, sockets: 16_384, ..Default::default() };
        let antispoof = AntiSpoof::load_and_pin_with(&pin_dir, &sizes).expect("tc programs");
        let lb = ServiceLb::load_and_pin(&pin_dir, &sizes).expect("socket hooks");
        let hooked = CgroupGuard::new();
        lb.attach_cgroup(hooked.0.path()).expect("attaching the socket hooks");

        let node = NamespaceGuard::new(&format!("{tag}-node"));
        node.ns().write_net_sysctl("ipv4/ip_forward", "1").unwrap();
        node.ip(&["route", "add", "unreachable", SERVICE_CIDR]);
        // A source for the ICMP errors the node sends (the veths carry no address).
        node.ip(&["addr", "add", "10.255.0.1/32", "dev", "lo"]);
        // Every refused SYN gets its ICMP error: the default per-destination rate limit would
        // turn the second refusal within a second into a timeout.
        node.ns().write_net_sysctl("ipv4/icmp_ratelimit", "0").unwrap();
        let data = DirGuard::temp(&format!("{tag}-data"));
        let config = json!({
            "cniVersion": "1.1.0", "name": "strait-lb", "type": "strait-cni",
            "ipam": { "subnet": "10.244.5.0/24", "dataDir": data.path() },
            "antiSpoof": { "pinDir": pin_dir },
        });
        let add = |id: &str| -> Pod {
            let ns = NamespaceGuard::new(&format!("{tag}-{id}"));
            let output = node.run_cni("ADD", id, &ns.path(), &config);
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "ADD {id}: {stdout} {:?}", output.stderr);
            let result: Value = serde_json::from_str(&stdout).unwrap();
            let ip = result["ips"][0]["address"]
                .as_str()
                .unwrap()
                .trim_end_matches("/32")
                .parse()
                .unwrap();
            let host_veth = host_veth_name(&Attachment {
                container_id: id.to_owned(),
                ifname: "eth0".to_owned(),
            });
            Pod { ns, ip, name: id.to_owned(), host_veth }
        };
        let client = add("client");
        let backends: Vec<Pod> = ["pod-a", "pod-b", "pod-c"].into_iter().map(add).collect();

        let mut topology = Self {
            processes: Vec::new(),
            hooked,
            lb: Some(lb),
            _antispoof: antispoof,
            client,
            backends,
            node,
            _data: data,
            pin_dir,
            _pins: pins,
        };
        for index in 0..topology.backends.len() {
            let backend = &topology.backends[index];
            topology.node.assert_route_stays_inside(&backend.ip.to_string(), &backend.host_veth);
            let setup = ChildSetup::new()
                .new_session()
                .enter_netns(&backend.ns.path())
                .unwrap()
                .hostname(&backend.name)
                .unwrap();
            let mut command = std::process::Command::new(STRAIT);
            command.arg("netexec").stdin(Stdio::null()).stdout(Stdio::null());
            setup.install(&mut command);
            topology.processes.push(ChildGuard(command.spawn().expect("starting netexec")));
        }
        for backend in &topology.backends {
            let address = SocketAddrV4::new(backend.ip, HTTP_PORT).into();
            let deadline = Instant::now() + Duration::from_secs(10);
            while topology
                .node
                .ns()
                .run(|| TcpStream::connect_timeout(&address, Duration::from_millis(200)))
                .unwrap()
                .is_err()
            {
                assert!(Instant::now() < deadline, "netexec in {} never listened", backend.name);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let service = vip(1).to_string();
        topology.client.ns.assert_route_stays_inside(&service, "eth0");
        for backend in &topology.backends {
            backend.ns.assert_route_stays_inside(&service, "eth0");
        }
        topology
    }

    fn lb(&mut self) -> &mut ServiceLb {
        self.lb.as_mut().expect("the load balancer is loaded")
    }

    fn backend_set(&self, port: u16, names: &[&str]) -> Vec<Backend> {
        self.backends
            .iter()
            .filter(|pod| names.contains(&pod.name.as_str()))
            .map(|pod| Backend { address: SocketAddrV4::new(pod.ip, port), terminating: false })
            .collect()
    }

    fn upsert(&mut self, key: FrontendKey, names: &[&str], affinity: Option<Duration>) {
        let port = if key.protocol == L4Protocol::Tcp { HTTP_PORT } else { UDP_PORT };
        let frontend = ServiceFrontend {
            key,
            backends: self.backend_set(port, names),
            affinity_timeout: affinity,
        };
        self.lb().upsert_frontend(&frontend).expect("writing the frontend");
    }

    /// Starts `strait netclient <args>` in `pod`'s namespace, in the hooked cgroup on the
    /// socket path.
    fn spawn_client(&self, pod: &Pod, path: Path_, args: &[&str]) -> Child {
        let mut setup = ChildSetup::new().enter_netns(&pod.ns.path()).unwrap();
        if path == Path_::Socket {
            setup = setup.join_cgroup(&self.hooked.0.procs_file()).unwrap();
        }
        let mut command = std::process::Command::new(STRAIT);
        command
            .arg("netclient")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        setup.install(&mut command);
        command.spawn().expect("starting netclient")
    }

    fn run_client(&self, pod: &Pod, path: Path_, args: &[&str]) -> Value {
        let output = self.spawn_client(pod, path, args).wait_with_output().unwrap();
        finish(output)
    }

    fn tcp_client(&self, path: Path_, target: SocketAddrV4, count: u32, extra: &[&str]) -> Value {
        let (target, count) = (target.to_string(), count.to_string());
        let mut args = vec!["tcp", "--target", &target, "--count", &count];
        args.extend_from_slice(extra);
        self.run_client(&self.client, path, &args)
    }
}

fn finish(output: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "netclient failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("netclient printed {stdout}: {e}"))
}

fn counts(report: &Value, field: &str) -> BTreeMap<String, u64> {
    report[field]
        .as_object()
        .map(|map| map.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn errors_total(report: &Value) -> u64 {
    counts(report, "errors").values().sum()
}

const PATHS: [Path_; 2] = [Path_::Socket, Path_::Tc];

#[test]
fn connections_spread_evenly_over_the_backends_on_both_paths() {
    if !privileged("connections_spread_evenly_over_the_backends_on_both_paths") {
        return;
    }
    let mut topology = Topology::new("lb-spread");
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b", "pod-c"], None);
    for path in PATHS {
        let report = topology.tcp_client(path, SocketAddrV4::new(vip(1), 80), 3000, &[]);
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
        assert_eq!(report["peer_mismatches"], 0, "{path:?}: getpeername is the VIP: {report}");
        let answers = counts(&report, "answers");
        assert_eq!(answers.len(), 3, "{path:?}: {answers:?}");
        for (backend, n) in &answers {
            assert!((850..=1150).contains(n), "{path:?}: {backend} got {n} of 3000: {answers:?}");
        }
    }
}

#[test]
fn backends_see_the_clients_pod_ip() {
    if !privileged("backends_see_the_clients_pod_ip") {
        return;
    }
    let mut topology = Topology::new("lb-clientip");
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b", "pod-c"], None);
    for path in PATHS {
        let target = SocketAddrV4::new(vip(1), 80);
        let report = topology.tcp_client(path, target, 30, &["--path", "/clientip"]);
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
        for seen in counts(&report, "answers").keys() {
            let ip = seen.rsplit_once(':').map(|(ip, _)| ip);
            assert_eq!(ip, Some(topology.client.ip.to_string().as_str()), "{path:?}: {seen}");
        }
    }
}

#[test]
fn a_frontend_without_backends_refuses_at_once() {
    if !privileged("a_frontend_without_backends_refuses_at_once") {
        return;
    }
    let mut topology = Topology::new("lb-refuse");
    topology.upsert(tcp(vip(2), 80), &[], None);
    // Socket path: connect() fails with ECONNREFUSED from the hook itself.
    let report = topology.tcp_client(Path_::Socket, SocketAddrV4::new(vip(2), 80), 5, &[]);
    assert_eq!(counts(&report, "errors")["refused"], 5, "{report}");
    assert!(report["refused_max_ms"].as_f64().unwrap() < 1000.0, "{report}");
    // tc path: the packet is left alone and the node's unreachable route answers at once
    // (EHOSTUNREACH from the ICMP error).
    let report = topology.tcp_client(Path_::Tc, SocketAddrV4::new(vip(2), 80), 5, &[]);
    assert_eq!(counts(&report, "errors")["unreachable"], 5, "{report}");
    assert!(report["elapsed_ms"].as_f64().unwrap() < 1000.0, "fails fast: {report}");
}

#[test]
fn udp_replies_come_from_the_vip_and_a_removed_backend_is_left_within_a_second() {
    if !privileged("udp_replies_come_from_the_vip_and_a_removed_backend_is_left_within_a_second") {
        return;
    }
    let mut topology = Topology::new("lb-udp");
    let key = udp(vip(3), 53);
    topology.upsert(key, &["pod-a", "pod-b", "pod-c"], None);
    for (path, source_port) in [(Path_::Socket, "40001"), (Path_::Tc, "40002")] {
        let target = SocketAddrV4::new(vip(3), 53).to_string();
        let args = [
            "udp",
            "--target",
            &target,
            "--count",
            "70",
            "--interval-ms",
            "50",
            "--source-port",
            source_port,
        ];
        // The client starts on pod-a, the only backend; two more arrive and it stays (one
        // socket keeps its backend); then pod-a leaves and it must move at once.
        topology.upsert(key, &["pod-a"], None);
        let started = Instant::now();
        let child = topology.spawn_client(&topology.client, path, &args);
        std::thread::sleep(Duration::from_millis(300));
        topology.upsert(key, &["pod-a", "pod-b", "pod-c"], None);
        std::thread::sleep(Duration::from_millis(500));
        let removed_at = started.elapsed();
        topology.upsert(key, &["pod-b", "pod-c"], None);
        let report = finish(child.wait_with_output().unwrap());

        let sources = counts(&report, "sources");
        assert_eq!(
            sources.keys().collect::<Vec<_>>(),
            vec![&target],
            "{path:?}: every reply comes from the VIP: {report}"
        );
        let replies = report["replies"].as_array().unwrap();
        let removed_ms = removed_at.as_secs_f64() * 1000.0;
        let before: Vec<&str> = replies
            .iter()
            .filter(|r| r["at_ms"].as_f64().unwrap() < removed_ms - 100.0)
            .map(|r| r["answer"].as_str().unwrap())
            .collect();
        assert!(before.len() >= 5, "{path:?}: {report}");
        assert!(
            before.iter().all(|answer| *answer == "pod-a"),
            "{path:?}: one socket keeps its backend: {before:?}"
        );
        let late: Vec<&Value> =
            replies.iter().filter(|r| r["at_ms"].as_f64().unwrap() > removed_ms + 1000.0).collect();
        assert!(late.len() >= 10, "{path:?}: {report}");
        let moved_at = replies
            .iter()
            .find(|r| r["answer"] != "pod-a")
            .and_then(|r| r["at_ms"].as_f64())
            .unwrap_or_else(|| panic!("{path:?}: never left pod-a: {report}"));
        assert!(moved_at - removed_ms < 1000.0, "{path:?}: moved after {moved_at} ms: {report}");
        assert!(
            late.iter().all(|r| r["answer"] != "pod-a"),
            "{path:?}: within a second of the removal no reply is from pod-a: {report}"
        );
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
    }
}

#[test]
fn client_ip_affinity_pins_a_client_and_expires() {
    if !privileged("client_ip_affinity_pins_a_client_and_expires") {
        return;
    }
    let mut topology = Topology::new("lb-affinity");
    topology.upsert(tcp(vip(4), 80), &["pod-a", "pod-b", "pod-c"], Some(Duration::from_secs(1)));
    for path in PATHS {
        let mut chosen = BTreeSet::new();
        for _ in 0..8 {
            let report = topology.tcp_client(path, SocketAddrV4::new(vip(4), 80), 20, &[]);
            assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
            let answers = counts(&report, "answers");
            assert_eq!(answers.len(), 1, "{path:?}: affinity pins every connection: {answers:?}");
            chosen.extend(answers.into_keys());
            // Idle past the timeout: the next batch chooses afresh.
            std::thread::sleep(Duration::from_millis(1300));
        }
        assert!(chosen.len() > 1, "{path:?}: affinity never expired: {chosen:?}");
    }
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    if !privileged("a_pod_reaches_itself_through_its_service") {
        return;
    }
    let mut topology = Topology::new("lb-hairpin");
    topology.upsert(tcp(vip(5), 80), &["pod-a"], None);
    for path in PATHS {
        let pod_a = &topology.backends[0];
        let target = SocketAddrV4::new(vip(5), 80).to_string();
        let report =
            topology.run_client(pod_a, path, &["tcp", "--target", &target, "--count", "10"]);
        assert_eq!(counts(&report, "answers").get("pod-a"), Some(&10), "{path:?}: {report}");
        assert_eq!(report["peer_mismatches"], 0, "{path:?}: {report}");
    }
}

#[test]
fn large_messages_cross_both_paths_intact_and_fragments_are_translated() {
    if !privileged("large_messages_cross_both_paths_intact_and_fragments_are_translated") {
        return;
    }
    let mut topology = Topology::new("lb-large");
    topology.upsert(tcp(vip(6), 80), &["pod-a", "pod-b", "pod-c"], None);
    topology.upsert(udp(vip(6), 53), &["pod-a", "pod-b", "pod-c"], None);
    let http = SocketAddrV4::new(vip(6), 80).to_string();
    let udp_target = SocketAddrV4::new(vip(6), 53).to_string();
    let fragment_entries = |topology: &mut Topology| -> u64 {
        let stats = topology.lb().stats();
        let usage = stats.maps.iter().find(|m| m.name == "LB_FRAGMENTS_V1");
        usage.unwrap_or_else(|| panic!("the fragment map is reported: {stats:?}")).entries
    };
    for path in PATHS {
        // 64 KiB through one TCP connection (segmented, never fragmented: TCP sets DF) and one
        // 8 KiB datagram, which leaves the client in six fragments at the veth's MTU of 1500
        // and comes back from the backend just as fragmented.
        let args = ["echo", "--http", &http, "--udp", &udp_target, "--udp-bytes", "8192"];
        let report = topology.run_client(&topology.client, path, &args);
        assert_eq!(report["errors"], json!([]), "{path:?}: {report}");
        assert_eq!(report["http_echoed"], 65_536, "{path:?}: {report}");
        assert_eq!(report["http_intact"], true, "{path:?}: {report}");
        assert_eq!(report["udp_echoed"], 8192, "{path:?}: {report}");
        assert_eq!(report["udp_intact"], true, "{path:?}: {report}");
        assert_eq!(report["udp_source"], udp_target.as_str(), "{path:?}: from the VIP: {report}");
        let entries = fragment_entries(&mut topology);
        match path {
            // The socket hooks addressed the datagram to the backend: the tc path had nothing
            // to translate and recorded nothing.
            Path_::Socket => assert_eq!(entries, 0, "{path:?}"),
            // The request's first fragment on the client's ingress and the echo's on its egress.
            Path_::Tc => assert!(entries >= 2, "{path:?}: {entries} fragment entries"),
        }
    }
}

#[test]
fn a_restarted_writer_adopts_the_pinned_frontends_and_traffic_goes_on() {
    if !privileged("a_restarted_writer_adopts_the_pinned_frontends_and_traffic_goes_on") {
        return;
    }
    let mut topology = Topology::new("lb-adopt");
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b", "pod-c"], None);
    topology.upsert(udp(vip(1), 53), &["pod-a", "pod-b"], None);
    topology.upsert(tcp(vip(2), 80), &["pod-c"], Some(Duration::from_secs(30)));
    let before: Vec<FrontendKey> = topology.lb().frontends().copied().collect();
    let backends_before = topology.lb().backends(&tcp(vip(2), 80));

    topology.lb.take();
    let sizes = LbMapSizes { conntrack: 16_384, sockets: 16_384, ..Default::default() };
    let reloaded = ServiceLb::load_and_pin(&topology.pin_dir, &sizes).expect("reloading");
    topology.lb = Some(reloaded);
    let after: Vec<FrontendKey> = topology.lb().frontends().copied().collect();
    assert_eq!(before, after, "the new writer lists the same frontends");
    assert_eq!(topology.lb().backends(&tcp(vip(2), 80)), backends_before);
    // Re-attaching is a no-op.
    let hooked = topology.hooked.0.path().to_owned();
    topology.lb().attach_cgroup(&hooked).expect("attaching again");

    for path in PATHS {
        let report = topology.tcp_client(path, SocketAddrV4::new(vip(1), 80), 300, &[]);
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
        assert_eq!(counts(&report, "answers").len(), 3, "{path:?}: {report}");
    }
    // The adopted index is good for updates: pod-c leaves the first frontend.
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b"], None);
    let report = topology.tcp_client(Path_::Socket, SocketAddrV4::new(vip(1), 80), 100, &[]);
    assert!(!counts(&report, "answers").contains_key("pod-c"), "{report}");
    let stats = topology.lb().stats();
    assert_eq!(stats.frontends, 3, "{stats:?}");
    assert_eq!(stats.backends, 2 + 2 + 1, "{stats:?}");
}

#[test]
fn an_update_changes_only_its_own_frontends_entries() {
    if !privileged("an_update_changes_only_its_own_frontends_entries") {
        return;
    }
    let mut topology = Topology::new("lb-isolate");
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b", "pod-c"], None);
    topology.upsert(tcp(vip(2), 80), &["pod-a", "pod-b"], None);
    let snapshot = |pin_dir: &Path| -> BTreeSet<(String, Vec<u8>, Vec<u8>)> {
        let mut entries = BTreeSet::new();
        for name in ["LB_FRONTENDS_V1", "LB_BACKEND_SLOTS_V1", "LB_BACKENDS_V1"] {
            let output = std::process::Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(pin_dir.join(name))
                .output()
                .expect("bpftool");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            let dump: Value = serde_json::from_slice(&output.stdout).unwrap();
            for entry in dump.as_array().unwrap() {
                let bytes = |v: &Value| -> Vec<u8> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|b| {
                            u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16)
                                .unwrap()
                        })
                        .collect()
                };
                entries.insert((name.to_owned(), bytes(&entry["key"]), bytes(&entry["value"])));
            }
        }
        entries
    };
    let before = snapshot(&topology.pin_dir);
    let report = topology.tcp_client(Path_::Socket, SocketAddrV4::new(vip(2), 80), 30, &[]);
    assert_eq!(counts(&report, "answers").len(), 2, "{report}");

    topology.upsert(tcp(vip(1), 80), &["pod-c"], None);
    let after = snapshot(&topology.pin_dir);
    let removed: Vec<_> = before.difference(&after).collect();
    let added: Vec<_> = after.difference(&before).collect();
    // Frontend 1 (service id 1) lost two backends and two slots and changed its count; nothing
    // else moved: every changed entry carries service id 1 or a backend id of service 1.
    let frontend_two_ids: BTreeSet<u32> = before
        .iter()
        .filter(|(name, _, value)| name == "LB_BACKENDS_V1" && value[8..12] == 2u32.to_ne_bytes())
        .map(|(_, key, _)| u32::from_ne_bytes(key[..4].try_into().unwrap()))
        .collect();
    assert_eq!(frontend_two_ids.len(), 2);
    for (name, key, value) in removed.iter().chain(added.iter()) {
        let touches_service_two = match name.as_str() {
            "LB_FRONTENDS_V1" => value[..4] == 2u32.to_ne_bytes(),
            "LB_BACKEND_SLOTS_V1" => key[..4] == 2u32.to_ne_bytes(),
            _ => frontend_two_ids.contains(&u32::from_ne_bytes(key[..4].try_into().unwrap())),
        };
        assert!(!touches_service_two, "{name} {key:?} {value:?} belongs to the other frontend");
    }
    assert_eq!(removed.len(), 6, "2 backends, 3 old slots, the old frontend value: {removed:?}");
    assert_eq!(added.len(), 2, "slot 0 now pod-c, the new frontend value: {added:?}");
    let report = topology.tcp_client(Path_::Socket, SocketAddrV4::new(vip(2), 80), 30, &[]);
    assert_eq!(counts(&report, "answers").len(), 2, "the other frontend still spreads: {report}");
}

#[test]
fn hooks_refuse_cgroups_outside_strait() {
    if !privileged("hooks_refuse_cgroups_outside_strait") {
        return;
    }
    strait_dataplane::ebpf::ensure_bpffs().unwrap();
    let (_pins, pin_dir) = DirGuard::pins("lb-root");
    let lb = ServiceLb::load_and_pin(&pin_dir, &LbMapSizes::default()).expect("loading");
    let root = strait_dataplane::cgroup::cgroup2_mount().unwrap();
    let error = lb.attach_cgroup(&root).expect_err("the root cgroup is refused");
    assert!(error.to_string().contains("strait"), "{error}");
}

#[test]
fn a_new_connection_reusing_its_source_port_chooses_afresh_on_the_tc_path() {
    if !privileged("a_new_connection_reusing_its_source_port_chooses_afresh_on_the_tc_path") {
        return;
    }
    let mut topology = Topology::new("lb-reuse");
    topology.upsert(tcp(vip(1), 80), &["pod-a", "pod-b", "pod-c"], None);
    // Forty connections from one source port within a second: each is a new SYN with its own
    // sequence number on the same tuple, not a retransmission, so each picks a backend anew.
    // All forty on one backend by chance: odds 3 in 3^40.
    for path in PATHS {
        let report = topology.tcp_client(
            path,
            SocketAddrV4::new(vip(1), 80),
            40,
            &["--source-port", "41234"],
        );
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
        assert!(counts(&report, "answers").len() > 1, "{path:?}: stuck on one backend: {report}");
    }
}

#[test]
fn a_direct_connection_reusing_a_service_flows_ports_is_not_rewritten() {
    if !privileged("a_direct_connection_reusing_a_service_flows_ports_is_not_rewritten") {
        return;
    }
    let mut topology = Topology::new("lb-direct");
    topology.upsert(tcp(vip(1), 80), &["pod-a"], None);
    let pod_a = SocketAddrV4::new(topology.backends[0].ip, HTTP_PORT);
    for path in PATHS {
        // Through the service, then straight to the same backend, from one source port: the
        // second connection's replies must not be taken for the first one's.
        let via_vip = topology.tcp_client(
            path,
            SocketAddrV4::new(vip(1), 80),
            1,
            &["--source-port", "41999"],
        );
        assert_eq!(counts(&via_vip, "answers").get("pod-a"), Some(&1), "{path:?}: {via_vip}");
        let direct = topology.tcp_client(path, pod_a, 3, &["--source-port", "41999"]);
        assert_eq!(errors_total(&direct), 0, "{path:?}: {direct}");
        assert_eq!(counts(&direct, "answers").get("pod-a"), Some(&3), "{path:?}: {direct}");
        assert_eq!(direct["peer_mismatches"], 0, "{path:?}: {direct}");
    }
}

/// Entries of the three frontend maps (frontends, slots, backends), as bpftool dumps them.
fn lb_entry_counts(pin_dir: &Path) -> [usize; 3] {
    ["LB_FRONTENDS_V1", "LB_BACKEND_SLOTS_V1", "LB_BACKENDS_V1"].map(|name| {
        let output = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_dir.join(name))
            .output()
            .expect("bpftool");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let dump: Value = serde_json::from_slice(&output.stdout).unwrap();
        dump.as_array().map_or(0, Vec::len)
    })
}

#[test]
fn a_batch_of_frontends_is_written_and_removed_whole_and_serves_like_single_writes() {
    if !privileged(
        "a_batch_of_frontends_is_written_and_removed_whole_and_serves_like_single_writes",
    ) {
        return;
    }
    let mut topology = Topology::new("lb-batch");
    let all = topology.backend_set(HTTP_PORT, &["pod-a", "pod-b", "pod-c"]);
    let frontend = |i: u32, backends: &[Backend]| ServiceFrontend {
        key: tcp(Ipv4Addr::from(u32::from(vip(10)) + i), 80),
        backends: backends.to_vec(),
        affinity_timeout: None,
    };
    let batch: Vec<ServiceFrontend> = (0..2000).map(|i| frontend(i, &all)).collect();
    topology.lb().upsert_frontends(&batch).expect("writing 2,000 frontends at once");
    assert_eq!(lb_entry_counts(&topology.pin_dir), [2000, 6000, 6000]);
    assert!(batch.iter().all(|f| topology.lb.as_ref().unwrap().is_programmed(f)));
    let last = SocketAddrV4::new(Ipv4Addr::from(u32::from(vip(10)) + 1999), 80);
    for path in PATHS {
        let report = topology.tcp_client(path, last, 300, &[]);
        assert_eq!(errors_total(&report), 0, "{path:?}: {report}");
        assert_eq!(counts(&report, "answers").len(), 3, "{path:?}: {report}");
    }

    // Half of them lose pod-c, in one batch that also names one frontend twice: the last
    // one given wins.
    let mut update: Vec<ServiceFrontend> = (0..1000).map(|i| frontend(i, &all[..2])).collect();
    update.push(frontend(1999, &all[..1]));
    update.push(frontend(1999, &all[2..]));
    topology.lb().upsert_frontends(&update).expect("updating 1,001 frontends at once");
    assert_eq!(lb_entry_counts(&topology.pin_dir), [2000, 4998, 4998]);
    assert_eq!(topology.lb().backends(&frontend(1999, &[]).key).unwrap(), all[2..]);
    let report = topology.tcp_client(Path_::Socket, last, 100, &[]);
    assert_eq!(counts(&report, "answers").keys().collect::<Vec<_>>(), ["pod-c"], "{report}");

    // Removal in one batch, with keys that are not there among them.
    let mut keys: Vec<FrontendKey> = batch.iter().map(|f| f.key).collect();
    keys.insert(500, tcp(vip(250), 80));
    keys.push(tcp(vip(251), 80));
    topology.lb().remove_frontends(&keys).expect("removing every frontend at once");
    assert_eq!(lb_entry_counts(&topology.pin_dir), [0, 0, 0]);
    assert_eq!(topology.lb().frontends().count(), 0);
}

#[test]
fn the_planner_writes_a_snapshot_and_removes_services_a_later_snapshot_lacks() {
    use std::sync::Arc;
    use strait_controlplane::nodesync_proto::{Endpoint, EndpointPort, ServicePort, ServiceState};
    use strait_dataplane::agent::services::{LocalNode, ServicePrograms, ServiceUpdate};
    if !privileged("the_planner_writes_a_snapshot_and_removes_services_a_later_snapshot_lacks") {
        return;
    }
    let topology = Topology::new("lb-plan");
    let service = |name: &str, vip: Ipv4Addr, pods: &[&Pod]| {
        Arc::new(ServiceState {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: vip.to_string(),
            ports: vec![ServicePort { name: "http".into(), protocol: "TCP".into(), port: 80 }],
            endpoints: pods
                .iter()
                .map(|pod| Endpoint {
                    address: pod.ip.to_string(),
                    node_name: "node".into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    ports: vec![EndpointPort {
                        name: "http".into(),
                        protocol: "TCP".into(),
                        port: u32::from(HTTP_PORT),
                    }],
                })
                .collect(),
            ..Default::default()
        })
    };
    let lb = ServiceLb::load_and_pin(&topology.pin_dir, &LbMapSizes::default()).expect("adopting");
    let node = LocalNode { name: "node".into(), cluster_dns: None, dns_server: None };
    let mut programs = ServicePrograms::new(lb, node);
    let [a, b, c] = [&topology.backends[0], &topology.backends[1], &topology.backends[2]];
    let web = service("web", vip(1), &[a, b]);
    let api = service("api", vip(2), &[c]);
    let snapshot = |upserted: Vec<Arc<ServiceState>>| ServiceUpdate {
        snapshot: true,
        upserted,
        removed: vec![],
    };
    let report = programs.apply(&snapshot(vec![web.clone(), api.clone()]));
    assert_eq!((report.frontends_written, report.errors), (2, 0), "{report:?}");
    assert_eq!(programs.programmed(), (2, 3));
    for path in PATHS {
        let report = topology.tcp_client(path, SocketAddrV4::new(vip(2), 80), 50, &[]);
        assert_eq!(counts(&report, "answers").keys().collect::<Vec<_>>(), ["pod-c"], "{report}");
    }
    // The same snapshot again writes nothing.
    let report = programs.apply(&snapshot(vec![web.clone(), api.clone()]));
    assert_eq!((report.frontends_written, report.frontends_removed), (0, 0), "{report:?}");

    // A snapshot without `api` (deleted while the agent was away) takes its frontend away,
    // although no update named it removed.
    let report = programs.apply(&snapshot(vec![web.clone()]));
    assert_eq!((report.frontends_written, report.frontends_removed), (0, 1), "{report:?}");
    assert_eq!(programs.programmed(), (1, 2));
    assert_eq!(lb_entry_counts(&topology.pin_dir), [1, 2, 2]);
    let refused = topology.tcp_client(Path_::Socket, SocketAddrV4::new(vip(2), 80), 5, &[]);
    assert_eq!(counts(&refused, "answers").len(), 0, "{refused}");
}
