//! End to end on real labs: NAT-free pod networking across nodes, anti-spoofing, and state
//! that outlives the controller and the agents.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use strait::lab::{self, LabProcess};
use strait_dataplane::{ebpf, netns::NetNs};
use support::lab::{TestLab, assert_route_stays_in_lab, eventually, http_get, pod_ip, udp_request};

/// The address part of `ip:port`, as netexec's `/clientip` answers.
fn client_ip(answer: &str) -> Ipv4Addr {
    answer
        .trim()
        .rsplit_once(':')
        .map_or(answer, |(ip, _)| ip)
        .parse()
        .unwrap_or_else(|_| panic!("not ip:port: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_each_other_and_nodes_reach_pods_without_nat() {
    if !support::privileged("pods_reach_each_other_and_nodes_reach_pods_without_nat") {
        return;
    }
    let routes_before =
        std::process::Command::new("ip").args(["-4", "route"]).output().expect("ip route").stdout;
    let lab = TestLab::up("net", 3).await;

    // Two pods on node-1 (same-node traffic), one each on node-2 and node-3.
    let placement = [("a1", "node-1"), ("a2", "node-1"), ("b", "node-2"), ("c", "node-3")];
    for (name, node) in placement {
        lab.create_netexec_pod(name, Some(node));
    }
    let mut pods = BTreeMap::new();
    for (name, node) in placement {
        let pod = lab.wait_running(name).await;
        assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(node));
        pods.insert(name, pod);
    }
    let ips: BTreeMap<_, _> = pods.iter().map(|(name, pod)| (*name, pod_ip(pod))).collect();
    let distinct: std::collections::BTreeSet<_> = ips.values().collect();
    assert_eq!(distinct.len(), ips.len(), "every pod has its own IP: {ips:?}");

    // Every pod's IP lies in the podCIDR of its node.
    let cidrs = lab.pod_cidrs().await;
    for (name, node) in placement {
        let cidr = cidrs[node];
        assert!(cidr.contains(&ips[name]), "{name} ({}) is outside {node}'s {cidr}", ips[name]);
    }

    // Pod to pod, same node and across nodes, HTTP and UDP: the receiver sees the sender's own
    // pod IP (no NAT), and the right pod answers.
    for (from, from_pod) in &pods {
        let netns = lab.pod_netns(from_pod);
        for (to, to_ip) in &ips {
            if from == to {
                continue;
            }
            let seen = http_get(&netns, *to_ip, 8080, "/clientip")
                .unwrap_or_else(|e| panic!("{from} → {to}: {e}\n{}", lab.logs()));
            assert_eq!(client_ip(&seen), ips[from], "{to} saw {from} as {seen}");
            let name = http_get(&netns, *to_ip, 8080, "/hostname").expect("hostname");
            assert_eq!(name.trim(), *to);
            let seen = udp_request(&netns, None, *to_ip, 8081, "clientip", Duration::from_secs(2))
                .unwrap_or_else(|| panic!("no UDP answer from {to} to {from}"));
            assert_eq!(client_ip(&seen), ips[from], "{to} saw {from} over UDP as {seen}");
            let echoed =
                udp_request(&netns, None, *to_ip, 8081, "strait echo", Duration::from_secs(2));
            assert_eq!(echoed.as_deref(), Some("strait echo"));
        }
    }

    // Every node reaches every pod, and the pod sees the node's own address.
    for node in &lab.state.nodes {
        let netns = lab.node_netns(&node.name);
        for (to, to_ip) in &ips {
            let seen = http_get(&netns, *to_ip, 8080, "/clientip")
                .unwrap_or_else(|e| panic!("{} → {to}: {e}", node.name));
            assert_eq!(client_ip(&seen), node.address, "{to} saw {} as {seen}", node.name);
        }
    }

    // What kubectl shows: the nodes Ready, the pods with their IPs and nodes.
    let nodes_out = lab.kubectl_ok(&["get", "nodes"]);
    for node in &lab.state.nodes {
        let line = nodes_out
            .lines()
            .find(|l| l.starts_with(&node.name))
            .unwrap_or_else(|| panic!("{} missing:\n{nodes_out}", node.name));
        assert!(line.contains(" Ready "), "{line}");
    }
    let pods_out = lab.kubectl_ok(&["get", "pods", "-o", "wide"]);
    for (name, node) in placement {
        let line = pods_out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{pods_out}"));
        assert!(line.contains("Running"), "{line}");
        assert!(line.contains(&ips[name].to_string()), "{line} lacks {}", ips[name]);
        assert!(line.contains(node), "{line} lacks {node}");
    }

    // Containers of one pod share its network namespace: the second container reaches the
    // first on localhost. Both run in the pod's own namespace and cgroup under strait's tree.
    let duo = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: duo\nspec:\n  nodeName: node-2\n  containers:\n  - name: server\n    image: strait/netexec\n  - name: client\n    image: debian\n    command: [\"bash\", \"-c\"]\n    args:\n    - 'until exec 3<>/dev/tcp/127.0.0.1/8080; do sleep 0.1; done; printf \"GET /hostname HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3; echo; sleep 3600'\n";
    let created = lab.kubectl_with_input(&["create", "--validate=false", "-f", "-"], Some(duo));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let duo = lab.wait_running("duo").await;
    let uid = duo.metadata.uid.clone().expect("uid");
    let answer = eventually(
        "the client container's request over localhost",
        Duration::from_secs(20),
        || {
            let text = lab.container_output("node-2", &duo, "client");
            if text.contains("200 OK") { Ok(text) } else { Err(text) }
        },
    )
    .await;
    assert!(
        answer.trim_end().ends_with("duo"),
        "the server container answered with the pod's name: {answer}"
    );
    let duo_netns = std::fs::metadata(lab.pod_netns(&duo).path())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("netns inode");
    for status in
        duo.status.as_ref().and_then(|s| s.container_statuses.clone()).expect("container statuses")
    {
        let pid: u32 = status
            .container_id
            .as_deref()
            .and_then(|id| id.rsplit('/').next()?.parse().ok())
            .expect("pid in containerID");
        let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("container netns");
        assert_eq!(
            netns, duo_netns,
            "container {} runs in the pod's network namespace",
            status.name
        );
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .expect("cgroup of the container");
        let expected = format!("0::/strait/{}/node-2/pods/{uid}/{}", lab.name(), status.name);
        assert!(
            cgroup.lines().any(|l| l == expected),
            "container {} cgroup: {cgroup}",
            status.name
        );
    }

    // The lab's own commands: exec in a pod (its namespace and cgroup), exec in a node, status.
    let strait = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(args)
            .output()
            .expect("strait");
        assert!(
            output.status.success(),
            "strait {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let in_pod = strait(&[
        "lab",
        "exec",
        "--name",
        lab.name(),
        "default/a1",
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(
        in_pod.contains(&format!("inet {}/32", ips["a1"])),
        "lab exec runs in a1's namespace: {in_pod}"
    );
    let cgroup =
        strait(&["lab", "exec", "--name", lab.name(), "a1", "--", "cat", "/proc/self/cgroup"]);
    let a1_uid = pods["a1"].metadata.uid.clone().expect("uid");
    assert!(
        cgroup.contains(&format!("/strait/{}/node-1/pods/{a1_uid}", lab.name())),
        "lab exec joins a1's cgroup: {cgroup}"
    );
    let node_routes =
        strait(&["lab", "node-exec", "--name", lab.name(), "node-2", "--", "ip", "route"]);
    assert!(
        node_routes.contains(&format!("{} dev st", ips["b"])),
        "node-2 routes b locally: {node_routes}"
    );
    let status = strait(&["lab", "status", "--name", lab.name()]);
    assert_eq!(status.matches(" True ").count(), 3, "three Ready nodes in lab status: {status}");

    // Deleting a pod stops it and releases its namespace (CNI DEL ran).
    let a2_netns = lab.pod_netns(&pods["a2"]).name().to_owned();
    lab.kubectl_ok(&["delete", "pod", "a2", "--timeout=60s"]);
    assert!(lab.api.get::<Pod>(Some("default"), "a2").await.expect("get").is_none());
    eventually("a2's namespace removed", Duration::from_secs(10), || {
        if NetNs::exists(&a2_netns) { Err("still there".into()) } else { Ok(()) }
    })
    .await;
    let a1 = lab.pod_netns(&pods["a1"]);
    assert!(http_get(&a1, ips["b"], 8080, "/hostname").is_ok(), "the other pods keep working");

    drop(lab);
    let routes_after =
        std::process::Command::new("ip").args(["-4", "route"]).output().expect("ip route").stdout;
    assert_eq!(routes_before, routes_after, "the root namespace's routes must not change");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_sending_from_an_address_not_its_own_is_dropped_and_counted() {
    if !support::privileged("a_pod_sending_from_an_address_not_its_own_is_dropped_and_counted") {
        return;
    }
    let lab = TestLab::up("spoof", 2).await;
    lab.create_netexec_pod("honest", Some("node-1"));
    lab.create_netexec_pod("target", Some("node-2"));
    let honest = lab.wait_running("honest").await;
    let target = lab.wait_running("target").await;
    let (honest_ip, target_ip) = (pod_ip(&honest), pod_ip(&target));
    let netns = lab.pod_netns(&honest);
    let pins = ebpf::node_pin_dir(lab.name(), "node-1");
    let spoofed_before = spoofed_count(&pins);

    // The pod's own address works.
    let seen =
        udp_request(&netns, Some(honest_ip), target_ip, 8081, "clientip", Duration::from_secs(2));
    assert!(seen.is_some_and(|s| client_ip(&s) == honest_ip));

    // Another address, added inside the pod (as a compromised workload could), does not.
    let octets = honest_ip.octets();
    let spoofed = Ipv4Addr::new(octets[0], octets[1], octets[2], 250);
    let added = std::process::Command::new("ip")
        .args(["-n", netns.name(), "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .status()
        .expect("ip addr add");
    assert!(added.success());
    for _ in 0..3 {
        let answer = udp_request(
            &netns,
            Some(spoofed),
            target_ip,
            8081,
            "clientip",
            Duration::from_millis(700),
        );
        assert_eq!(answer, None, "a packet from {spoofed} got through");
    }
    let spoofed_after = spoofed_count(&pins);
    assert!(
        spoofed_after >= spoofed_before + 3,
        "drops counted: {spoofed_before} → {spoofed_after}"
    );
    // And the honest address still works afterwards.
    assert!(
        udp_request(&netns, Some(honest_ip), target_ip, 8081, "hostname", Duration::from_secs(2))
            .is_some()
    );
}

fn spoofed_count(pins: &Path) -> u64 {
    ebpf::antispoof::drop_counts(pins)
        .expect("reading drop counters")
        .into_iter()
        .find(|(name, _)| *name == "spoofed_ipv4_source")
        .map(|(_, count)| count)
        .expect("the spoofed_ipv4_source counter")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_restart_keeps_every_allocation() {
    if !support::privileged("a_controller_restart_keeps_every_allocation") {
        return;
    }
    let lab = TestLab::up("ctl", 2).await;
    lab.create_netexec_pod("before", Some("node-1"));
    let before = lab.wait_running("before").await;
    let cidrs_before = lab.pod_cidrs().await;

    lab::restart(lab.name(), &LabProcess::Controller).expect("restarting the controller");
    lab::wait_until_ready(&lab.state, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the API is not back with Ready nodes: {e:#}\n{}", lab.logs()));
    assert_eq!(lab.pod_cidrs().await, cidrs_before, "podCIDRs survive the restart");
    let still =
        lab.api.get::<Pod>(Some("default"), "before").await.expect("get").expect("pod kept");
    assert_eq!(still.metadata.uid, before.metadata.uid);
    assert_eq!(pod_ip(&still), pod_ip(&before));

    // The agents reconnected: a new pod is placed, started, and gets an address of its own.
    lab.create_netexec_pod("after", Some("node-1"));
    let after = lab.wait_running("after").await;
    assert_ne!(pod_ip(&after), pod_ip(&before));
    let netns = lab.pod_netns(&after);
    let seen = http_get(&netns, pod_ip(&before), 8080, "/clientip").expect("after → before");
    assert_eq!(client_ip(&seen), pod_ip(&after));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restart_keeps_pods_reachable_and_readopts_its_pinned_maps() {
    if !support::privileged("an_agent_restart_keeps_pods_reachable_and_readopts_its_pinned_maps") {
        return;
    }
    let lab = TestLab::up("agent", 2).await;
    lab.create_netexec_pod("local", Some("node-1"));
    lab.create_netexec_pod("remote", Some("node-2"));
    let local = lab.wait_running("local").await;
    let remote = lab.wait_running("remote").await;
    let pins = ebpf::node_pin_dir(lab.name(), "node-1");
    let map_id = |name: &str| {
        aya::maps::MapData::from_pin(pins.join(name))
            .and_then(|m| m.info())
            .map(|info| info.id())
            .expect("pinned map id")
    };
    let endpoints_id = map_id(strait_common::antispoof::ENDPOINTS_MAP);
    let counters_id = map_id(strait_common::antispoof::DROP_STATS_MAP);
    let started_at = container_started_at(&local);

    lab::kill(lab.name(), &LabProcess::Agent("node-1".into())).expect("killing the agent");
    // With its agent dead, node-1's pod still serves and reaches across nodes.
    let remote_netns = lab.pod_netns(&remote);
    let seen = http_get(&remote_netns, pod_ip(&local), 8080, "/clientip")
        .expect("remote → local, agent down");
    assert_eq!(client_ip(&seen), pod_ip(&remote));

    lab::restart(lab.name(), &LabProcess::Agent("node-1".into())).expect("restarting the agent");
    assert_eq!(
        map_id(strait_common::antispoof::ENDPOINTS_MAP),
        endpoints_id,
        "the endpoint map was re-adopted, not recreated"
    );
    assert_eq!(
        map_id(strait_common::antispoof::DROP_STATS_MAP),
        counters_id,
        "the counters were re-adopted"
    );

    // The restarted agent adopted the pod rather than restarting it, and runs new pods.
    lab.create_netexec_pod("new", Some("node-1"));
    let new = lab.wait_running("new").await;
    let after =
        lab.api.get::<Pod>(Some("default"), "local").await.expect("get").expect("local pod");
    assert_eq!(container_started_at(&after), started_at, "the container was not restarted");
    let local_netns = lab.pod_netns(&after);
    let seen = http_get(&local_netns, pod_ip(&new), 8080, "/clientip").expect("local → new");
    assert_eq!(client_ip(&seen), pod_ip(&after));
    let seen = http_get(&remote_netns, pod_ip(&local), 8080, "/hostname").expect("remote → local");
    assert_eq!(seen.trim(), "local");
}

fn container_started_at(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
        .map(|t| t.0.to_string())
        .expect("a running container")
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_down_leaves_no_namespace_link_pin_cgroup_or_process() {
    if !support::privileged("lab_down_leaves_no_namespace_link_pin_cgroup_or_process") {
        return;
    }
    let lab = TestLab::up("down", 2).await;
    lab.create_netexec_pod("p", Some("node-2"));
    let pod = lab.wait_running("p").await;
    let pod_netns = lab.pod_netns(&pod);
    assert_route_stays_in_lab(&pod_netns, Ipv4Addr::new(172, 20, 0, 11));
    drop(pod_netns);
    let name = lab.name().to_owned();
    let pids: Vec<u32> = std::iter::once(lab.state.controller_pid)
        .chain(lab.state.nodes.iter().map(|n| n.agent_pid))
        .collect();
    drop(lab);

    assert!(
        NetNs::list_with_prefix(&lab::netns_prefix(&name)).expect("netns list").is_empty(),
        "namespaces left"
    );
    assert!(
        !ebpf::node_pin_dir(&name, "node-1").exists()
            && !Path::new(ebpf::BPFFS_ROOT).join(&name).exists(),
        "pins left"
    );
    let cgroup =
        strait_dataplane::cgroup::Cgroup::new(&lab::lab_cgroup(&name)).expect("cgroup path");
    assert!(!cgroup.exists(), "cgroup {} left", cgroup.path().display());
    assert!(!lab::lab_dir(&name).exists(), "state left");
    for pid in pids {
        // Gone, or a zombie waiting to be reaped by its parent: either way it runs no more.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next())
            })
            .flatten();
        assert!(matches!(state, None | Some('Z')), "process {pid} still running (state {state:?})");
    }
    // Running it again on a lab that is gone is fine.
    lab::down(&name).expect("a second lab down");
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_to_a_node_that_leaves_are_removed_and_the_others_stay() {
    if !support::privileged("routes_to_a_node_that_leaves_are_removed_and_the_others_stay") {
        return;
    }
    let lab = TestLab::up("leave", 3).await;
    let cidrs = lab.pod_cidrs().await;
    let (leaving, staying) = (cidrs["node-3"], cidrs["node-2"]);
    let node_1 = lab.node_netns("node-1");
    let routes = || {
        let handle = node_1.netlink().expect("netlink in node-1");
        async move {
            strait_dataplane::netlink::routes_with_protocol(
                &handle,
                strait_dataplane::netlink::ROUTE_PROTOCOL_STRAIT,
            )
            .await
            .expect("routes")
            .into_iter()
            .map(|r| r.destination)
            .collect::<Vec<_>>()
        }
    };
    let before = routes().await;
    assert!(before.contains(&leaving) && before.contains(&staying), "{before:?}");

    // The node's agent is gone for good (otherwise it would register again), then the Node.
    lab::kill(lab.name(), &LabProcess::Agent("node-3".into())).expect("stopping node-3's agent");
    assert!(lab.api.delete::<Node>(None, "node-3", None).await.expect("delete node-3"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = routes().await;
        if !now.contains(&leaving) {
            assert!(now.contains(&staying), "the route to node-2 stays: {now:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "route to {leaving} still there: {now:?}\n{}",
            lab.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
