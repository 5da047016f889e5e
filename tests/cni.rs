//! strait-cni run exactly as a container runtime runs it: the real binary, `CNI_*` variables,
//! the configuration on stdin, inside a test-owned "node" namespace, against test-owned pod
//! namespaces. Needs root; each test cleans up after itself, also when it panics.

mod support;

use std::{
    collections::HashSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use strait_cni::{invocation::Attachment, naming::host_veth_name};
use support::{DirGuard, NamespaceGuard, privileged};

const CNI_BIN: &str = env!("CARGO_BIN_EXE_strait-cni");

/// A node namespace with its own address store, where the plugin runs.
struct TestNode {
    ns: NamespaceGuard,
    data: DirGuard,
    subnet: String,
    anti_spoof: Option<PathBuf>,
}

/// What one plugin run printed and how it exited.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: Value,
    stderr: String,
}

impl Run {
    fn code(&self) -> u64 {
        assert!(!self.success, "expected a failure, got {}", self.stdout);
        self.stdout["code"].as_u64().unwrap_or_else(|| panic!("no code in {}", self.stdout))
    }

    fn ip(&self) -> Ipv4Addr {
        assert!(self.success, "ADD failed: {} {}", self.stdout, self.stderr);
        let address = self.stdout["ips"][0]["address"].as_str().expect("an address");
        address.trim_end_matches("/32").parse().expect("an IPv4 /32")
    }
}

impl TestNode {
    fn new(tag: &str, subnet: &str) -> Self {
        Self {
            ns: NamespaceGuard::new(tag),
            data: DirGuard::temp(tag),
            subnet: subnet.to_owned(),
            anti_spoof: None,
        }
    }

    fn config(&self, version: &str) -> Value {
        let mut config = json!({
            "cniVersion": version, "name": "strait-e2e", "type": "strait-cni", "mtu": 1400,
            "ipam": { "subnet": self.subnet, "dataDir": self.data.path() },
        });
        if let Some(pin_dir) = &self.anti_spoof {
            config["antiSpoof"] = json!({ "pinDir": pin_dir });
        }
        config
    }

    /// Runs the binary inside the node namespace with exactly these variables and stdin.
    fn run(&self, env: &[(&str, &str)], stdin: &str) -> Run {
        let mut child = self
            .ns
            .command(CNI_BIN)
            .env_clear()
            .envs(env.iter().copied())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning strait-cni");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
        };
        Run {
            success: output.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn verb(&self, verb: &str, id: &str, netns: Option<&Path>, config: &Value) -> Run {
        let netns = netns.map(|path| path.to_string_lossy().into_owned());
        let mut env = vec![
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        if let Some(netns) = &netns {
            env.push(("CNI_NETNS", netns));
        }
        self.run(&env, &config.to_string())
    }

    fn add(&self, id: &str, pod: &NamespaceGuard) -> Run {
        self.verb("ADD", id, Some(&pod.path()), &self.config("1.1.0"))
    }

    fn del(&self, id: &str, netns: Option<&Path>) -> Run {
        self.verb("DEL", id, netns, &self.config("1.1.0"))
    }

    fn check(&self, id: &str, pod: &NamespaceGuard, prev_result: &Value) -> Run {
        let mut config = self.config("1.1.0");
        config["prevResult"] = prev_result.clone();
        self.verb("CHECK", id, Some(&pod.path()), &config)
    }

    fn host_veths(&self) -> Vec<String> {
        self.ns.link_names().into_iter().filter(|name| name.starts_with("st")).collect()
    }

    fn allocations(&self) -> Vec<String> {
        let dir = self.data.path().join("strait-e2e");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                    .filter(|name| name.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The node's routes written by the plugin (protocol 84), as `ip` prints them.
    fn pod_routes(&self) -> Vec<Value> {
        self.ns.ip_json(&["route", "show", "proto", "84"]).as_array().cloned().unwrap_or_default()
    }
}

fn attachment(id: &str) -> Attachment {
    Attachment { container_id: id.to_owned(), ifname: "eth0".to_owned() }
}

fn read_sysctl(ns: &NamespaceGuard, key: &str) -> String {
    let path = format!("/proc/sys/net/{key}");
    ns.ns().run(|| std::fs::read_to_string(&path)).unwrap().unwrap().trim().to_owned()
}

#[test]
fn add_plumbs_the_pod_and_the_node_and_del_removes_it_all() {
    if !privileged("add_plumbs_the_pod_and_the_node_and_del_removes_it_all") {
        return;
    }
    let node = TestNode::new("cni-add", "10.244.1.0/24");
    let pod = NamespaceGuard::new("cni-add-pod");
    let added = node.add("pod-a", &pod);
    let ip = added.ip();
    assert_eq!(ip, Ipv4Addr::new(10, 244, 1, 2), "the first pod gets .2");
    let host = host_veth_name(&attachment("pod-a"));

    // The result, as the runtime reads it.
    assert_eq!(added.stdout["cniVersion"], "1.1.0");
    assert_eq!(added.stdout["interfaces"][0]["name"], host.as_str());
    assert_eq!(added.stdout["interfaces"][1]["name"], "eth0");
    assert_eq!(added.stdout["interfaces"][1]["sandbox"], pod.path().to_string_lossy().as_ref());
    assert_eq!(added.stdout["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(added.stdout["ips"][0]["interface"], 1);

    // Inside the pod.
    let eth0 = &pod.ip_json(&["addr", "show", "dev", "eth0"])[0];
    assert_eq!(eth0["mtu"], 1400);
    assert!(eth0["flags"].as_array().unwrap().contains(&json!("UP")), "{eth0}");
    let addresses: Vec<_> = eth0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addresses, vec![format!("{ip}/32")], "IPv4 /32 only, no IPv6 link-local");
    assert_eq!(added.stdout["interfaces"][1]["mac"], eth0["address"]);
    let lo = &pod.ip_json(&["link", "show", "dev", "lo"])[0];
    assert!(lo["flags"].as_array().unwrap().contains(&json!("UP")));
    let routes = pod.ip(&["route", "show"]);
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
    assert!(routes.contains("169.254.1.1 dev eth0"), "{routes}");
    let neighbours = pod.ip_json(&["neigh", "show", "dev", "eth0"]);
    let gateway = &neighbours[0];
    assert_eq!(gateway["dst"], "169.254.1.1");
    assert_eq!(gateway["lladdr"], added.stdout["interfaces"][0]["mac"]);
    assert!(gateway["state"].as_array().unwrap().contains(&json!("PERMANENT")), "{gateway}");
    assert_eq!(read_sysctl(&pod, "ipv6/conf/all/disable_ipv6"), "1");
    assert_eq!(read_sysctl(&pod, "ipv6/conf/default/disable_ipv6"), "1");

    // On the node.
    let veth = &node.ns.ip_json(&["link", "show", "dev", &host])[0];
    assert!(veth["flags"].as_array().unwrap().contains(&json!("UP")), "{veth}");
    assert_eq!(veth["mtu"], 1400);
    let node_routes = node.pod_routes();
    assert_eq!(node_routes.len(), 1, "{node_routes:?}");
    assert_eq!(node_routes[0]["dst"], ip.to_string());
    assert_eq!(node_routes[0]["dev"], host.as_str());
    assert_eq!(node_routes[0]["scope"], "link");
    assert_eq!(node.allocations(), vec![ip.to_string()]);

    let deleted = node.del("pod-a", Some(&pod.path()));
    assert!(deleted.success, "{} {}", deleted.stdout, deleted.stderr);
    assert_eq!(deleted.stdout, Value::Null, "DEL prints nothing");
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(!pod.link_names().contains(&"eth0".to_owned()), "the pod end went with it");
    assert!(node.pod_routes().is_empty());
    assert!(node.allocations().is_empty());

    let again = node.del("pod-a", Some(&pod.path()));
    assert!(again.success, "a second DEL succeeds: {} {}", again.stdout, again.stderr);
}

#[test]
fn add_answers_in_the_configs_version() {
    if !privileged("add_answers_in_the_configs_version") {
        return;
    }
    let node = TestNode::new("cni-ver", "10.244.2.0/24");
    for (n, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let pod = NamespaceGuard::new("cni-ver-pod");
        let id = format!("pod-{n}");
        let added = node.verb("ADD", &id, Some(&pod.path()), &node.config(version));
        added.ip();
        assert_eq!(added.stdout["cniVersion"], version);
        let ip_version = added.stdout["ips"][0].get("version");
        if version.starts_with("0.") {
            assert_eq!(ip_version, Some(&json!("4")), "{version}");
        } else {
            assert_eq!(ip_version, None, "{version}");
        }
        let deleted = node.verb("DEL", &id, Some(&pod.path()), &node.config(version));
        assert!(deleted.success, "{version}: {}", deleted.stdout);
    }
}

#[test]
fn del_succeeds_and_releases_the_address_after_the_pod_namespace_is_gone() {
    if !privileged("del_succeeds_and_releases_the_address_after_the_pod_namespace_is_gone") {
        return;
    }
    let node = TestNode::new("cni-gone", "10.244.3.0/24");
    let pod = NamespaceGuard::new("cni-gone-pod");
    let pod_path = pod.path();
    node.add("pod-a", &pod).ip();
    pod.destroy();
    let deleted = node.del("pod-a", Some(&pod_path));
    assert!(deleted.success, "{} {}", deleted.stdout, deleted.stderr);
    let without_netns = node.del("pod-a", None);
    assert!(without_netns.success, "{}", without_netns.stdout);
    assert!(node.allocations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.pod_routes().is_empty());
}

#[test]
fn check_passes_after_add_and_fails_on_drift() {
    if !privileged("check_passes_after_add_and_fails_on_drift") {
        return;
    }
    let node = TestNode::new("cni-check", "10.244.4.0/24");
    let pod = NamespaceGuard::new("cni-check-pod");
    let added = node.add("pod-a", &pod);
    let ip = added.ip();
    let host = host_veth_name(&attachment("pod-a"));
    let check = node.check("pod-a", &pod, &added.stdout);
    assert!(check.success, "{} {}", check.stdout, check.stderr);
    assert_eq!(check.stdout, Value::Null, "CHECK prints nothing on success");

    // The pod loses its address.
    pod.ip(&["addr", "del", &format!("{ip}/32"), "dev", "eth0"]);
    let drifted = node.check("pod-a", &pod, &added.stdout);
    assert_eq!(drifted.code(), 101);
    assert!(
        drifted.stdout["msg"].as_str().unwrap().contains("does not carry"),
        "{}",
        drifted.stdout
    );
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.ip(&["route", "replace", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    pod.ip(&["route", "replace", "default", "via", "169.254.1.1", "dev", "eth0"]);
    let healed = node.check("pod-a", &pod, &added.stdout);
    assert!(healed.success, "{}", healed.stdout);

    // The node loses the pod's route.
    node.ns.ip(&["route", "del", &format!("{ip}/32"), "dev", &host]);
    let drifted = node.check("pod-a", &pod, &added.stdout);
    assert_eq!(drifted.code(), 101);
    assert!(drifted.stdout["msg"].as_str().unwrap().contains("no route"), "{}", drifted.stdout);

    // The pod's default route goes.
    node.ns.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &host,
        "scope",
        "link",
        "proto",
        "84",
    ]);
    pod.ip(&["route", "del", "default"]);
    assert_eq!(node.check("pod-a", &pod, &added.stdout).code(), 101);
    pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);

    // A prevResult whose address is not the one the store holds.
    let mut forged = added.stdout.clone();
    forged["ips"][0]["address"] = json!("10.244.4.200/32");
    assert_eq!(node.check("pod-a", &pod, &forged).code(), 101);

    // The host veth disappears.
    node.ns.ip(&["link", "del", &host]);
    assert_eq!(node.check("pod-a", &pod, &added.stdout).code(), 101);
}

#[test]
fn gc_releases_what_the_runtime_no_longer_lists() {
    if !privileged("gc_releases_what_the_runtime_no_longer_lists") {
        return;
    }
    let node = TestNode::new("cni-gc", "10.244.5.0/24");
    let pods: Vec<_> = (0..3).map(|_| NamespaceGuard::new("cni-gc-pod")).collect();
    let results: Vec<_> =
        pods.iter().enumerate().map(|(n, pod)| node.add(&format!("pod-{n}"), pod)).collect();
    let kept_ip = results[0].ip();
    let mut config = node.config("1.1.0");
    config["cni.dev/valid-attachments"] = json!([{ "containerID": "pod-0", "ifname": "eth0" }]);
    let gc = node.run(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], &config.to_string());
    assert!(gc.success, "{} {}", gc.stdout, gc.stderr);
    assert_eq!(node.allocations(), vec![kept_ip.to_string()]);
    assert_eq!(node.host_veths(), vec![host_veth_name(&attachment("pod-0"))]);
    let routes = node.pod_routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["dst"], kept_ip.to_string());
    for pod in &pods[1..] {
        assert!(!pod.link_names().contains(&"eth0".to_owned()));
    }
    let still = node.check("pod-0", &pods[0], &results[0].stdout);
    assert!(still.success, "the listed pod is untouched: {}", still.stdout);
}

#[test]
fn status_reports_ready_and_then_exhausted() {
    if !privileged("status_reports_ready_and_then_exhausted") {
        return;
    }
    let node = TestNode::new("cni-status", "10.244.6.0/30");
    let status = || node.run(&[("CNI_COMMAND", "STATUS")], &node.config("1.1.0").to_string());
    let ready = status();
    assert!(ready.success, "{}", ready.stdout);
    let pod = NamespaceGuard::new("cni-status-pod");
    node.add("pod-a", &pod).ip();
    let full = status();
    assert_eq!(full.code(), 50);
    assert!(full.stdout["msg"].as_str().unwrap().contains("10.244.6.0/30"), "{}", full.stdout);
}

#[test]
fn the_binary_answers_bad_input_with_the_right_error_codes() {
    if !privileged("the_binary_answers_bad_input_with_the_right_error_codes") {
        return;
    }
    let node = TestNode::new("cni-errors", "10.244.7.0/30");
    let pod = NamespaceGuard::new("cni-errors-pod");
    let pod_path = pod.path().to_string_lossy().into_owned();
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "pod-a"),
        ("CNI_NETNS", pod_path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    assert_eq!(node.run(&add_env, "{\"cniVersion\": ").code(), 6);
    let mut future = node.config("1.1.0");
    future["cniVersion"] = json!("3.0.0");
    assert_eq!(node.run(&add_env, &future.to_string()).code(), 1);
    assert_eq!(node.run(&add_env[1..], &node.config("1.1.0").to_string()).code(), 4);
    let no_netns: Vec<_> = add_env.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect();
    assert_eq!(node.run(&no_netns, &node.config("1.1.0").to_string()).code(), 4);

    // A /30 holds one pod; the second ADD is refused and leaves nothing.
    node.add("pod-a", &pod).ip();
    let second_pod = NamespaceGuard::new("cni-errors-pod2");
    let refused = node.add("pod-b", &second_pod);
    assert_eq!(refused.code(), 100);
    assert!(refused.stdout["msg"].as_str().unwrap().contains("1 of 1"), "{}", refused.stdout);
    assert_eq!(node.host_veths(), vec![host_veth_name(&attachment("pod-a"))]);
    assert!(!second_pod.link_names().iter().any(|name| name != "lo"));
}

#[test]
fn a_failed_add_leaves_no_veth_and_no_allocation() {
    if !privileged("a_failed_add_leaves_no_veth_and_no_allocation") {
        return;
    }
    let node = TestNode::new("cni-fail", "10.244.8.0/24");

    // The pod's namespace does not exist.
    let missing = Path::new("/run/netns/strait-t-cni-fail-no-such-namespace");
    let failed = node.verb("ADD", "pod-a", Some(missing), &node.config("1.1.0"));
    assert_eq!(failed.code(), 3);
    assert!(node.host_veths().is_empty());
    assert!(node.allocations().is_empty());

    // The interface name is taken inside the pod: the veth is made, then the rename fails.
    let pod = NamespaceGuard::new("cni-fail-pod");
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "squatter"]);
    let failed = node.add("pod-b", &pod);
    assert_eq!(failed.code(), 104, "{}", failed.stderr);
    assert!(failed.stdout["msg"].as_str().unwrap().contains("eth0"));
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.pod_routes().is_empty());
    let mut left: Vec<_> = pod.link_names();
    left.sort();
    assert_eq!(left, vec!["eth0", "lo", "squatter"], "only what the test made is left");

    // Once the name is free, the same pod attaches.
    pod.ip(&["link", "del", "eth0"]);
    node.add("pod-b", &pod).ip();
}

#[test]
fn fifty_concurrent_adds_get_fifty_addresses_and_fifty_veths() {
    if !privileged("fifty_concurrent_adds_get_fifty_addresses_and_fifty_veths") {
        return;
    }
    let node = TestNode::new("cni-50", "10.244.9.0/24");
    let pods: Vec<_> = (0..50).map(|_| NamespaceGuard::new("cni-50-pod")).collect();
    let ips: Vec<Ipv4Addr> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(n, pod)| {
                let node = &node;
                scope.spawn(move || node.add(&format!("pod-{n}"), pod).ip())
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    });
    let distinct: HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 50, "{ips:?}");
    assert_eq!(node.host_veths().len(), 50);
    assert_eq!(node.allocations().len(), 50);
    assert_eq!(node.pod_routes().len(), 50);
    for (pod, ip) in pods.iter().zip(&ips) {
        let addresses = pod.ip(&["-4", "addr", "show", "dev", "eth0"]);
        assert!(addresses.contains(&format!("{ip}/32")), "{addresses}");
    }

    std::thread::scope(|scope| {
        for (n, pod) in pods.iter().enumerate() {
            let node = &node;
            scope.spawn(move || {
                let deleted = node.del(&format!("pod-{n}"), Some(&pod.path()));
                assert!(deleted.success, "{}", deleted.stdout);
            });
        }
    });
    assert!(node.host_veths().is_empty());
    assert!(node.allocations().is_empty());
    assert!(node.pod_routes().is_empty());
}

#[test]
fn pods_on_one_node_reach_each_other_with_their_own_addresses() {
    if !privileged("pods_on_one_node_reach_each_other_with_their_own_addresses") {
        return;
    }
    let node = TestNode::new("cni-ping", "10.244.10.0/24");
    // Forwarding between pod veths, in the test's node namespace only.
    node.ns.ns().write_net_sysctl("ipv4/ip_forward", "1").unwrap();
    let pod_a = NamespaceGuard::new("cni-ping-a");
    let pod_b = NamespaceGuard::new("cni-ping-b");
    let ip_a = node.add("pod-a", &pod_a).ip();
    let ip_b = node.add("pod-b", &pod_b).ip();

    pod_a.assert_route_stays_inside(&ip_b.to_string(), "eth0");
    node.ns.assert_route_stays_inside(&ip_b.to_string(), &host_veth_name(&attachment("pod-b")));
    node.ns.assert_route_stays_inside(&ip_a.to_string(), &host_veth_name(&attachment("pod-a")));
    assert!(node.ns.ip(&["route", "show", "default"]).trim().is_empty(), "the node has no way out");

    let listener = pod_b.ns().run(|| TcpListener::bind((ip_b, 0))).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut stream, peer) = listener.accept().unwrap();
        let mut greeting = String::new();
        stream.read_to_string(&mut greeting).unwrap();
        (peer, greeting)
    });
    pod_a
        .ns()
        .run(|| {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::from((ip_b, port)),
                Duration::from_secs(5),
            )?;
            stream.write_all(b"hello from pod a")
        })
        .unwrap()
        .unwrap();
    let (peer, greeting) = server.join().unwrap();
    assert_eq!(greeting, "hello from pod a");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(ip_a), "the receiver sees the sender's pod IP");
}

#[test]
fn the_cni_bench_measures_both_plugins_and_leaves_nothing_behind() {
    if !privileged("the_cni_bench_measures_both_plugins_and_leaves_nothing_behind") {
        return;
    }
    use strait_cni::bench::{CniBenchOptions, REFERENCE_PLUGIN, STRAIT_PLUGIN, run_cni_bench};
    let mut options = CniBenchOptions::new(CNI_BIN);
    options.adds = 6;
    options.concurrencies = vec![1, 3];
    let report = run_cni_bench(&options).expect("the bench runs");
    assert_eq!(report.measurements.len(), 4);
    for measurement in &report.measurements {
        assert!([STRAIT_PLUGIN, REFERENCE_PLUGIN].contains(&measurement.plugin.as_str()));
        assert_eq!(measurement.add.calls, 6, "{measurement:?}");
        assert_eq!(measurement.del.calls, 6, "{measurement:?}");
        assert!(measurement.add.p50_ms > 0.0 && measurement.add.p50_ms <= measurement.add.p99_ms);
        assert!(measurement.del.p99_ms <= measurement.del.max_ms);
    }
    assert_eq!(report.ratios.iter().map(|r| r.concurrency).collect::<Vec<_>>(), vec![1, 3]);
    let strait = &report.measurements[0];
    let reference = &report.measurements[1];
    assert!((report.ratios[0].add_p50 - strait.add.p50_ms / reference.add.p50_ms).abs() < 1e-9);
    let text = report.to_string();
    assert!(text.contains("bridge+host-local") && text.contains("ADD p50"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["adds_per_run"], 6);
    let left = strait_dataplane::netns::NetNs::list_with_prefix("strait-bench-").unwrap();
    let ours: Vec<_> =
        left.iter().filter(|name| name.contains(&format!("-{}-", std::process::id()))).collect();
    assert!(ours.is_empty(), "namespaces left behind: {ours:?}");
}
