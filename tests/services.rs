//! Services end to end on a 3-node lab, through both datapath paths: clients in ordinary pods
//! go through the socket hooks; clients in pods annotated `strait.io/socket-lb: disabled` go
//! through the per-packet tc path on their host veth.
//!
//! Clients are `strait netclient` runs inside a pod (its network namespace and cgroup, as
//! `strait lab exec` gives them), so the traffic is a real application's.

mod support;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::Value;
use strait::lab::{self, LabProcess};
use support::lab::{TestLab, pod_ip};

/// Annotation that makes a pod's service traffic take the tc path.
const TC_PATH: &str = "strait.io/socket-lb: disabled";

/// The two ways a pod's service traffic is translated, and a client pod for each.
const PATHS: [(&str, &str); 2] = [("socket", "client-sock"), ("tc", "client-tc")];

fn pod_manifest(name: &str, app: &str, node: &str, tc_path: bool, args: &[&str]) -> String {
    let annotations =
        if tc_path { format!("  annotations:\n    {TC_PATH}\n") } else { String::new() };
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(
            "    args: [{}]\n",
            args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
        )
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\n{annotations}spec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 30\n  containers:\n  - name: netexec\n    image: strait/netexec\n{args}    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: udp, containerPort: 8081, protocol: UDP}}\n"
    )
}

fn create(lab: &TestLab, manifest: &str) {
    let output = lab.kubectl_with_input(&["create", "-f", "-"], Some(manifest));
    assert!(
        output.status.success(),
        "kubectl create:\n{manifest}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A ClusterIP service over `app`: port 80/TCP to the pods' `http` port and 80/UDP to `udp`
/// (the same port number on both protocols, and named target ports).
fn service_manifest(name: &str, app: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    app: {app}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: http}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: udp}}\n"
    )
}

async fn cluster_ip(lab: &TestLab, name: &str) -> Ipv4Addr {
    let service = lab.api.get::<Service>(Some("default"), name).await.expect("get service");
    let ip = service.and_then(|s| s.spec).and_then(|s| s.cluster_ip).expect("cluster IP");
    ip.parse().expect("IPv4 cluster IP")
}

/// Runs `strait netclient <args>` inside `pod` and returns its JSON report.
fn netclient(lab: &TestLab, pod: &str, args: &[&str]) -> Value {
    let strait = env!("CARGO_BIN_EXE_strait");
    let output = Command::new(strait)
        .args(["lab", "exec", "--name", lab.name(), pod, "--", strait, "netclient"])
        .args(args)
        .output()
        .expect("running strait lab exec");
    assert!(
        output.status.success(),
        "netclient {args:?} in {pod}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("netclient output {:?}: {e}", String::from_utf8_lossy(&output.stdout))
    })
}

fn tcp(lab: &TestLab, pod: &str, target: &str, count: u32, path: &str) -> Value {
    netclient(lab, pod, &["tcp", "--target", target, "--count", &count.to_string(), "--path", path])
}

fn answers(report: &Value) -> BTreeMap<String, u64> {
    report["answers"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn errors(report: &Value) -> u64 {
    report["errors"].as_object().map(|o| o.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

fn answered_by(report: &Value) -> Vec<String> {
    answers(report).into_keys().collect()
}

/// [`within`], with the last thing the probe saw in the failure message.
fn within_or(
    limit: Duration,
    what: &str,
    last: &std::cell::RefCell<Value>,
    probe: impl FnMut() -> bool,
) -> Duration {
    let mut probe = probe;
    let started = Instant::now();
    loop {
        // A probe that began within the limit and succeeded proves the change had arrived
        // when it began, however long the probe itself then took.
        let began = started.elapsed();
        if probe() {
            return began;
        }
        assert!(began < limit, "{what}: not within {limit:?}; last: {}", last.borrow());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `probe` until it returns true, failing after `limit`; returns how long it took.
fn within(limit: Duration, what: &str, probe: impl FnMut() -> bool) -> Duration {
    within_or(limit, what, &std::cell::RefCell::new(Value::Null), probe)
}

/// Starts `strait netclient hold` in each client pod of [`PATHS`]: `connections` long-lived
/// connections used for `seconds`, with a new connection every 20 ms all along.
fn spawn_holds(
    lab: &TestLab,
    target: &str,
    connections: u32,
    seconds: u32,
) -> Vec<(&'static str, std::process::Child)> {
    let strait = env!("CARGO_BIN_EXE_strait");
    PATHS
        .iter()
        .map(|(path, client)| {
            let child = Command::new(strait)
                .args(["lab", "exec", "--name", lab.name(), client, "--", strait, "netclient"])
                .args(["hold", "--target", target])
                .args([
                    "--connections",
                    &connections.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("starting netclient hold");
            (*path, child)
        })
        .collect()
}

/// Waits for a `netclient hold` and returns its report.
fn hold_report(path: &str, child: std::process::Child) -> Value {
    let output = child.wait_with_output().expect("netclient hold");
    assert!(output.status.success(), "{path}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("hold report")
}

/// A second netexec in `web` pods, on other ports, so that a multi-port service has two
/// different target ports to reach.
const ALT_CONTAINER: &str = "  - name: alt\n    image: strait/netexec\n    args: [\"--http-port\", \"9090\", \"--udp-port\", \"9091\"]\n    ports:\n    - {name: alt-http, containerPort: 9090}\n";

async fn start_pods(lab: &TestLab, pods: &[(&str, &str, &str, bool)]) -> BTreeMap<String, Pod> {
    for (name, app, node, tc) in pods {
        let extra = if *app == "web" { ALT_CONTAINER } else { "" };
        create(lab, &format!("{}{extra}", pod_manifest(name, app, node, *tc, &[])));
    }
    let mut running = BTreeMap::new();
    for (name, ..) in pods {
        running.insert((*name).to_owned(), lab.wait_running(name).await);
    }
    running
}

#[tokio::test(flavor = "multi_thread")]
async fn services_balance_pin_and_preserve_the_client_through_both_paths() {
    if !support::privileged("services_balance_pin_and_preserve_the_client_through_both_paths") {
        return;
    }
    let lab = TestLab::up("svc-lb", 3).await;
    let pods = start_pods(
        &lab,
        &[
            ("web-1", "web", "node-1", false),
            ("web-2", "web", "node-2", false),
            // A backend on the tc path too, so that hairpin is tried on both paths.
            ("web-3", "web", "node-3", true),
            ("client-sock", "client", "node-1", false),
            ("client-tc", "client", "node-1", true),
        ],
    )
    .await;
    create(&lab, &service_manifest("web", "web", ""));
    let vip = cluster_ip(&lab, "web").await;
    assert!("10.96.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&vip));
    let target = format!("{vip}:80");
    let backends = ["web-1", "web-2", "web-3"];

    for (path, client) in PATHS {
        // Every backend is programmed before the spread is measured.
        within(Duration::from_secs(10), "all three backends answer", || {
            answered_by(&tcp(&lab, client, &target, 30, "/hostname")).len() == 3
        });
        // Uniform spread: 3,000 new connections, each backend 33 % ± 5 %.
        let report = tcp(&lab, client, &target, 3000, "/hostname");
        assert_eq!(errors(&report), 0, "{path}: {report}");
        assert_eq!(report["peer_mismatches"], 0, "{path}: getpeername must say the VIP");
        let counts = answers(&report);
        assert_eq!(counts.keys().collect::<Vec<_>>(), backends, "{path}: {report}");
        for (backend, count) in &counts {
            let share = *count as f64 / 3000.0;
            assert!((0.28..=0.38).contains(&share), "{path}: {backend} got {share:.3}");
        }
        // The backend sees the client's own pod IP.
        let client_ip = pod_ip(&pods[client]).to_string();
        let seen = tcp(&lab, client, &target, 20, "/clientip");
        for answer in answers(&seen).keys() {
            assert_eq!(answer.split(':').next(), Some(client_ip.as_str()), "{path}: {seen}");
        }
        // UDP on the same port number: replies come back from the VIP, from every backend.
        let udp = netclient(&lab, client, &["udp", "--target", &target, "--count", "60"]);
        assert_eq!(errors(&udp), 0, "{path}: {udp}");
        let sources: Vec<String> = udp["sources"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            sources,
            std::slice::from_ref(&target),
            "{path}: replies must come from the VIP"
        );
        assert!(answered_by(&udp).iter().all(|a| backends.contains(&a.as_str())), "{udp}");
    }

    // A multi-port service: each service port reaches its own target port on every backend
    // (netexec's `/port` says which one answered), through both paths.
    let multi = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-multi\nspec:\n  selector:\n    app: web\n  ports:\n  - {name: main, port: 80, targetPort: http}\n  - {name: alt, port: 90, targetPort: alt-http}\n";
    create(&lab, multi);
    let multi_vip = cluster_ip(&lab, "web-multi").await;
    for (path, client) in PATHS {
        for (port, expected) in [(80, "8080"), (90, "9090")] {
            let target = format!("{multi_vip}:{port}");
            within(Duration::from_secs(5), &format!("{path}: {target} reaches {expected}"), || {
                let report = tcp(&lab, client, &target, 30, "/port");
                errors(&report) == 0
                    && answered_by(&report) == [expected]
                    && answers(&tcp(&lab, client, &target, 30, "/hostname")).len() == 3
            });
        }
    }

    // internalTrafficPolicy: Local: the clients on node-1 reach only node-1's backend.
    create(&lab, &service_manifest("web-local", "web", "  internalTrafficPolicy: Local\n"));
    let local = format!("{}:80", cluster_ip(&lab, "web-local").await);
    for (path, client) in PATHS {
        within(Duration::from_secs(5), &format!("{path}: local endpoints only"), || {
            let report = tcp(&lab, client, &local, 60, "/hostname");
            errors(&report) == 0 && answered_by(&report) == ["web-1"]
        });
    }

    // Hairpin: a backend reaching its own service reaches itself too (socket path: web-1; tc
    // path: web-3).
    for (path, backend) in [("socket", "web-1"), ("tc", "web-3")] {
        let report = tcp(&lab, backend, &target, 90, "/hostname");
        assert_eq!(errors(&report), 0, "{path} hairpin: {report}");
        assert!(answers(&report).contains_key(backend), "{path} hairpin: {report}");
    }

    // ClientIP affinity: on (one backend), off (all), on again (one), expiring (moves).
    let patch = |affinity: &str| {
        let body = match affinity {
            "ClientIP" => {
                r#"{"spec":{"sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":2}}}}"#
            }
            _ => r#"{"spec":{"sessionAffinity":"None","sessionAffinityConfig":null}}"#,
        };
        lab.kubectl_ok(&["patch", "service", "web", "--type=merge", "-p", body]);
    };
    for (path, client) in PATHS {
        patch("ClientIP");
        within(Duration::from_secs(5), "affinity on", || {
            answered_by(&tcp(&lab, client, &target, 60, "/hostname")).len() == 1
        });
        patch("None");
        within(Duration::from_secs(5), "affinity off", || {
            answered_by(&tcp(&lab, client, &target, 60, "/hostname")).len() == 3
        });
        patch("ClientIP");
        within(Duration::from_secs(5), "affinity on again", || {
            answered_by(&tcp(&lab, client, &target, 60, "/hostname")).len() == 1
        });
        // Expiry: after more than the timeout without traffic, the choice is made afresh.
        // Eight fresh choices all landing on one of three backends has odds 1 in 2,187.
        let mut chosen = std::collections::BTreeSet::new();
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(2300));
            let report = tcp(&lab, client, &target, 5, "/hostname");
            assert_eq!(answered_by(&report).len(), 1, "{path}: pinned within a round: {report}");
            chosen.extend(answered_by(&report));
        }
        assert!(chosen.len() > 1, "{path}: affinity never expired: {chosen:?}");
        patch("None");
    }

    // A deleted service refuses; recreated (with the same VIP) it serves again.
    lab.kubectl_ok(&["delete", "service", "web"]);
    for (path, client) in PATHS {
        within(Duration::from_secs(5), "deleted service refuses", || {
            let report = tcp(&lab, client, &target, 1, "/hostname");
            answers(&report).is_empty()
        });
        let _ = path;
    }
    create(&lab, &service_manifest("web", "web", &format!("  clusterIP: {vip}\n")));
    for (_, client) in PATHS {
        within(Duration::from_secs(5), "recreated service serves", || {
            answered_by(&tcp(&lab, client, &target, 30, "/hostname")).len() == 3
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_follows_endpoints_from_none_to_two_and_back_within_a_second() {
    if !support::privileged("traffic_follows_endpoints_from_none_to_two_and_back_within_a_second") {
        return;
    }
    let lab = TestLab::up("svc-churn", 3).await;
    start_pods(
        &lab,
        &[("client-sock", "client", "node-1", false), ("client-tc", "client", "node-1", true)],
    )
    .await;
    create(&lab, &service_manifest("churn", "churn", ""));
    let vip = cluster_ip(&lab, "churn").await;
    let target = format!("{vip}:80");

    // No endpoints: refused at once, never a timeout.
    for (path, client) in PATHS {
        let report = tcp(&lab, client, &target, 5, "/hostname");
        assert!(answers(&report).is_empty(), "{path}: {report}");
        let refused = report["errors"]["refused"].as_u64().unwrap_or(0)
            + report["errors"]["unreachable"].as_u64().unwrap_or(0);
        assert_eq!(refused, 5, "{path}: {report}");
        assert!(report["refused_max_ms"].as_f64().unwrap_or(0.0) < 1000.0, "{path}: {report}");
    }

    let fixed_port_udp = |client: &str| {
        let args = ["udp", "--target", &target, "--count", "3", "--source-port", "40123"];
        netclient(&lab, client, &[&args[..], &["--timeout-ms", "300"]].concat())
    };
    let follow = |expected: &[&str], what: &str| {
        for (path, client) in PATHS {
            let last = std::cell::RefCell::new(Value::Null);
            let took = within_or(Duration::from_secs(1), &format!("{path}: {what}"), &last, || {
                let report = tcp(&lab, client, &target, 12, "/hostname");
                let got = answered_by(&report);
                let done = if expected.is_empty() {
                    got.is_empty() && errors(&report) == 12
                } else {
                    got == expected && errors(&report) == 0
                };
                *last.borrow_mut() = report;
                // UDP from one fixed source port (one flow on the tc path) follows too.
                let udp = fixed_port_udp(client);
                let udp_got = answered_by(&udp);
                let udp_done = if expected.is_empty() {
                    udp_got.is_empty()
                } else {
                    !udp_got.is_empty() && udp_got.iter().all(|a| expected.contains(&a.as_str()))
                };
                done && udp_done
            });
            eprintln!("{path}: {what} after {took:?}");
        }
    };
    create(&lab, &pod_manifest("churn-1", "churn", "node-2", false, &[]));
    lab.wait_running("churn-1").await;
    follow(&["churn-1"], "0 → 1");
    create(&lab, &pod_manifest("churn-2", "churn", "node-3", false, &[]));
    lab.wait_running("churn-2").await;
    follow(&["churn-1", "churn-2"], "1 → 2");
    // The backend a fixed-port UDP flow of the tc path is on goes; the flow moves to the other.
    let flow = answered_by(&fixed_port_udp("client-tc"));
    assert_eq!(flow.len(), 1, "one flow, one backend: {flow:?}");
    let (gone, stays) =
        if flow[0] == "churn-1" { ("churn-1", "churn-2") } else { ("churn-2", "churn-1") };
    lab.kubectl_ok(&["delete", "pod", gone, "--grace-period=0", "--force", "--wait=false"]);
    follow(&[stays], "2 → 1");
    lab.kubectl_ok(&["delete", "pod", stays, "--grace-period=0", "--force", "--wait=false"]);
    follow(&[], "1 → 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_resolve_services_through_the_cluster_dns() {
    if !support::privileged("pods_resolve_services_through_the_cluster_dns") {
        return;
    }
    let lab = TestLab::up("svc-dns", 3).await;
    let pods = start_pods(
        &lab,
        &[
            ("web-1", "web", "node-1", false),
            ("web-2", "web", "node-2", false),
            ("client-sock", "client", "node-1", false),
            ("client-tc", "client", "node-2", true),
        ],
    )
    .await;
    create(&lab, &service_manifest("web", "web", ""));
    create(&lab, &service_manifest("web-headless", "web", "  clusterIP: None\n"));
    let vip = cluster_ip(&lab, "web").await.to_string();
    let mut pod_ips: Vec<String> =
        ["web-1", "web-2"].iter().map(|p| pod_ip(&pods[*p]).to_string()).collect();
    pod_ips.sort();

    let getent = |pod: &str, name: &str| -> Option<Vec<String>> {
        let output = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(["lab", "exec", "--name", lab.name(), pod, "--", "getent", "ahostsv4", name])
            .output()
            .expect("running getent in a pod");
        if !output.status.success() {
            return None;
        }
        let mut ips: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        ips.sort();
        ips.dedup();
        Some(ips)
    };
    for (path, client) in PATHS {
        within(Duration::from_secs(5), &format!("{path}: service name resolves"), || {
            getent(client, "web.default.svc.cluster.local") == Some(vec![vip.clone()])
        });
        // Short names through the search domains of the pod's resolv.conf.
        assert_eq!(getent(client, "web"), Some(vec![vip.clone()]), "{path}: short name");
        assert_eq!(getent(client, "web.default"), Some(vec![vip.clone()]), "{path}");
        assert_eq!(getent(client, "web-headless"), Some(pod_ips.clone()), "{path}: headless");
        assert_eq!(getent(client, "nothing-here.default.svc.cluster.local"), None, "{path}");
        // The same at the cluster DNS VIP over UDP and over TCP, with the response codes.
        for transport in ["udp", "tcp"] {
            let ask = |name: &str| {
                let mut args = vec!["dns", "--name", name];
                if transport == "tcp" {
                    args.push("--tcp");
                }
                netclient(&lab, client, &args)
            };
            let answer = ask("web.default.svc.cluster.local");
            assert_eq!(answer["rcode"], "NoError", "{path}/{transport}: {answer}");
            assert_eq!(answer["addresses"], serde_json::json!([vip]), "{path}/{transport}");
            let answer = ask("web-headless.default.svc.cluster.local");
            let mut addresses: Vec<String> =
                serde_json::from_value(answer["addresses"].clone()).expect("addresses");
            addresses.sort();
            assert_eq!(addresses, pod_ips, "{path}/{transport}: headless: {answer}");
            let answer = ask("nothing-here.default.svc.cluster.local");
            assert_eq!(answer["rcode"], "NXDomain", "{path}/{transport}: {answer}");
        }
    }
    // A deleted service's name goes; the other service of its namespace stays.
    lab.kubectl_ok(&["delete", "service", "web"]);
    for (path, client) in PATHS {
        within(Duration::from_secs(5), &format!("{path}: a deleted service's name goes"), || {
            getent(client, "web.default.svc.cluster.local").is_none()
        });
        assert_eq!(getent(client, "web-headless"), Some(pod_ips.clone()), "{path}: headless");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_service_is_refused_with_the_field_and_nothing_is_stored() {
    if !support::privileged("an_invalid_service_is_refused_with_the_field_and_nothing_is_stored") {
        return;
    }
    let lab = TestLab::up("svc-bad", 1).await;
    let cases = [
        ("bad-port", "  ports:\n  - {name: a, port: 70000}\n", "spec.ports[0].port"),
        (
            "dup-names",
            "  ports:\n  - {name: a, port: 80}\n  - {name: a, port: 81}\n",
            "spec.ports[1].name",
        ),
        ("taken-ip", "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n", "spec.clusterIP"),
    ];
    for (name, spec, field) in cases {
        let manifest =
            format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n{spec}");
        let output = lab.kubectl_with_input(&["create", "-f", "-"], Some(&manifest));
        assert!(!output.status.success(), "{name} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field), "{name}: error does not name {field}: {stderr}");
        assert!(stderr.contains("is invalid"), "{name}: not a 422 Invalid: {stderr}");
        assert!(lab.api.get::<Service>(Some("default"), name).await.expect("get").is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_payloads_pass_and_an_agent_sigkill_breaks_no_connection() {
    if !support::privileged("large_payloads_pass_and_an_agent_sigkill_breaks_no_connection") {
        return;
    }
    let lab = TestLab::up("svc-kill", 3).await;
    start_pods(
        &lab,
        &[
            ("web-1", "web", "node-2", false),
            ("web-2", "web", "node-2", false),
            ("client-sock", "client", "node-1", false),
            ("client-tc", "client", "node-1", true),
        ],
    )
    .await;
    create(&lab, &service_manifest("web", "web", ""));
    let vip = cluster_ip(&lab, "web").await;
    let target = format!("{vip}:80");
    for (_, client) in PATHS {
        within(Duration::from_secs(10), "both backends answer", || {
            answered_by(&tcp(&lab, client, &target, 20, "/hostname")).len() == 2
        });
    }

    // 200 long-lived connections per path and a new connection every 20 ms, while the agent of
    // the clients' node is killed with SIGKILL and started again.
    let holders = spawn_holds(&lab, &target, 200, 8);
    std::thread::sleep(Duration::from_secs(3));
    lab::restart(lab.name(), &LabProcess::Agent("node-1".into())).expect("SIGKILL and restart");
    for (path, child) in holders {
        let report = hold_report(path, child);
        assert_eq!(report["established"], 200, "{path}: {report}");
        assert_eq!(report["established_broken"], 0, "{path}: {report}");
        let failed: u64 =
            report["new_failed"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
        assert_eq!(failed, 0, "{path}: new connections failed during the restart: {report}");
        assert!(report["new_ok"].as_u64().unwrap() > 100, "{path}: {report}");
    }

    // A 64 KiB HTTP body and an 8 KiB datagram through the VIP, echoed intact.
    for (path, client) in PATHS {
        let report = netclient(&lab, client, &["echo", "--http", &target, "--udp", &target]);
        assert_eq!(report["http_intact"], true, "{path}: {report}");
        assert_eq!(report["http_echoed"], 65_536, "{path}: {report}");
        // The datagram is fragmented at the veth MTU: on the tc path every fragment is
        // translated, not only the first.
        assert_eq!(report["udp_intact"], true, "{path}: {report}");
        assert_eq!(report["udp_source"], target.as_str(), "{path}: {report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_endpoints_keep_their_connections_and_serve_only_when_nothing_else_can() {
    if !support::privileged(
        "terminating_endpoints_keep_their_connections_and_serve_only_when_nothing_else_can",
    ) {
        return;
    }
    let lab = TestLab::up("svc-term", 3).await;
    // Backends that keep serving 20 s after SIGTERM, as a draining workload does.
    for (name, node) in [("old", "node-2"), ("new", "node-2")] {
        create(&lab, &pod_manifest(name, "web", node, false, &["--shutdown-delay-seconds", "20"]));
    }
    start_pods(
        &lab,
        &[("client-sock", "client", "node-1", false), ("client-tc", "client", "node-1", true)],
    )
    .await;
    lab.wait_running("old").await;
    lab.wait_running("new").await;
    create(&lab, &service_manifest("web", "web", ""));
    let target = format!("{}:80", cluster_ip(&lab, "web").await);
    for (_, client) in PATHS {
        within(Duration::from_secs(10), "both backends answer", || {
            answered_by(&tcp(&lab, client, &target, 30, "/hostname")).len() == 2
        });
    }

    // Connections established to both, held while `old` terminates.
    let holders = spawn_holds(&lab, &target, 40, 6);
    std::thread::sleep(Duration::from_secs(1));
    lab.kubectl_ok(&["delete", "pod", "old", "--wait=false"]);
    // New connections go only to the ready endpoint.
    for (path, client) in PATHS {
        within(Duration::from_secs(2), &format!("{path}: only new gets new connections"), || {
            answered_by(&tcp(&lab, client, &target, 30, "/hostname")) == ["new"]
        });
    }
    for (path, child) in holders {
        let report = hold_report(path, child);
        assert_eq!(report["established"], 40, "{path}: {report}");
        assert_eq!(
            report["established_broken"], 0,
            "{path}: a terminating endpoint lost a connection: {report}"
        );
    }
    // When every endpoint is terminating, they still take new connections.
    lab.kubectl_ok(&["delete", "pod", "new", "--wait=false"]);
    for (path, client) in PATHS {
        within(Duration::from_secs(2), &format!("{path}: terminating endpoints serve"), || {
            let report = tcp(&lab, client, &target, 30, "/hostname");
            errors(&report) == 0 && answered_by(&report) == ["new", "old"]
        });
    }

    // The agent's metrics show what it programmed and how fast.
    let node_ip = lab.state.nodes[0].address.to_string();
    let metrics = tcp(&lab, "client-sock", &format!("{node_ip}:10249"), 1, "/metrics");
    let text = answered_by(&metrics).join("");
    for line in [
        "strait_services_programmed ",
        "strait_service_programming_latency_seconds_count ",
        "strait_bpf_map_entries{map=\"LB_FRONTENDS_V1\"}",
    ] {
        assert!(text.contains(line), "metrics lack {line}: {text}");
    }
}

/// A directory of readiness flags for exec probes, removed when the test ends.
struct ReadyFlags(std::path::PathBuf);

impl ReadyFlags {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("strait-ready-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the readiness flag directory");
        Self(dir)
    }

    fn path(&self, pod: &str) -> String {
        self.0.join(pod).display().to_string()
    }

    fn set(&self, pod: &str) {
        std::fs::write(self.path(pod), b"").expect("setting a readiness flag");
    }
}

impl Drop for ReadyFlags {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A netexec pod that is ready only while its flag file exists.
fn probed_pod_manifest(name: &str, app: &str, node: &str, tc_path: bool, flag: &str) -> String {
    let base = pod_manifest(name, app, node, tc_path, &[]);
    format!(
        "{base}    readinessProbe:\n      exec:\n        command: [\"test\", \"-e\", \"{flag}\"]\n      periodSeconds: 1\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn unready_endpoints_serve_only_with_publish_not_ready_addresses() {
    if !support::privileged("unready_endpoints_serve_only_with_publish_not_ready_addresses") {
        return;
    }
    let flags = ReadyFlags::new("svc");
    let lab = TestLab::up("svc-ready", 3).await;
    flags.set("warm");
    create(&lab, &probed_pod_manifest("warm", "web", "node-2", false, &flags.path("warm")));
    create(&lab, &probed_pod_manifest("cold", "web", "node-2", false, &flags.path("cold")));
    start_pods(
        &lab,
        &[("client-sock", "client", "node-1", false), ("client-tc", "client", "node-1", true)],
    )
    .await;
    lab.wait_running("warm").await;
    create(&lab, &service_manifest("web", "web", ""));
    create(&lab, &service_manifest("web-all", "web", "  publishNotReadyAddresses: true\n"));
    let web = format!("{}:80", cluster_ip(&lab, "web").await);
    let web_all = format!("{}:80", cluster_ip(&lab, "web-all").await);

    for (path, client) in PATHS {
        within(Duration::from_secs(10), &format!("{path}: unready cold is left out"), || {
            answered_by(&tcp(&lab, client, &web, 30, "/hostname")) == ["warm"]
        });
        within(Duration::from_secs(5), &format!("{path}: published unready cold serves"), || {
            answered_by(&tcp(&lab, client, &web_all, 30, "/hostname")) == ["cold", "warm"]
        });
        // Still not ready: the plain service never sends it anything.
        let report = tcp(&lab, client, &web, 60, "/hostname");
        assert_eq!(answered_by(&report), ["warm"], "{path}: {report}");
    }

    // Unready → ready: a fixed-port UDP flow and new connections reach it too.
    flags.set("cold");
    lab.wait_running("cold").await;
    for (path, client) in PATHS {
        within(Duration::from_secs(1), &format!("{path}: cold serves once ready"), || {
            let tcp_ok = answered_by(&tcp(&lab, client, &web, 30, "/hostname")) == ["cold", "warm"];
            let args = ["udp", "--target", &web, "--count", "12", "--source-port", "40124"];
            let udp = netclient(&lab, client, &args);
            tcp_ok && errors(&udp) == 0
        });
    }
}
