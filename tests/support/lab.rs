//! A lab for one test, removed when the test ends (also when it panics), and the ways a test
//! talks to it: kubectl, the API, and sockets opened inside its namespaces after checking where
//! their traffic goes.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use strait::lab::{self, LabState, UpOptions};
use strait_controlplane::client::ApiClient;
use strait_dataplane::netns::NetNs;

/// A running lab that is brought down when dropped.
pub struct TestLab {
    pub state: LabState,
    pub api: ApiClient,
}

/// kubectl for tests: the newest real client on the machine, or `STRAIT_KUBECTL`.
pub fn kubectl_binary() -> String {
    if let Ok(path) = std::env::var("STRAIT_KUBECTL") {
        return path;
    }
    let pinned = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";
    if std::path::Path::new(pinned).exists() { pinned.to_owned() } else { "kubectl".to_owned() }
}

impl TestLab {
    /// Brings up a lab named `e2e-<tag>-<pid>` with `nodes` nodes.
    pub async fn up(tag: &str, nodes: usize) -> Self {
        Self::up_with(tag, nodes, &lab::ControlPlaneOptions::default()).await
    }

    /// [`TestLab::up`] with the control plane given; `api` is a client of every replica.
    pub async fn up_with(tag: &str, nodes: usize, control: &lab::ControlPlaneOptions) -> Self {
        Self::start(tag, nodes, control, &[], &[]).await
    }

    /// [`TestLab::up`] with extra arguments for the controller and the agents (shorter timers).
    pub async fn up_with_args(
        tag: &str,
        nodes: usize,
        controller_args: &[&str],
        agent_args: &[&str],
    ) -> Self {
        Self::start(tag, nodes, &lab::ControlPlaneOptions::default(), controller_args, agent_args)
            .await
    }

    /// A lab whose agents get `agent_args` too (short back-off delays, say).
    pub async fn up_with_agent_args(tag: &str, nodes: usize, agent_args: &[&str]) -> Self {
        Self::up_with_args(tag, nodes, &[], agent_args).await
    }

    async fn start(
        tag: &str,
        nodes: usize,
        control: &lab::ControlPlaneOptions,
        controller_args: &[&str],
        agent_args: &[&str],
    ) -> Self {
        let name = format!("e2e-{tag}-{}", std::process::id() % 100_000);
        assert!(name.len() <= 20, "lab name {name} too long; shorten the tag");
        // A lab of this name left by a crashed earlier run of this same test is removed first.
        lab::down(&name).expect("removing a stale lab of the same name");
        let options = UpOptions {
            name: name.clone(),
            nodes,
            strait_exe: env!("CARGO_BIN_EXE_strait").into(),
            cni_plugin: env!("CARGO_BIN_EXE_strait-cni").into(),
            ready_timeout: Duration::from_secs(90),
            controller_args: controller_args.iter().map(|a| (*a).to_owned()).collect(),
            agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        let state = lab::up_with(&options, control)
            .await
            .unwrap_or_else(|e| panic!("lab up {name}: {e:#}"));
        let api = state.api_client().expect("API client");
        Self { state, api }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Runs kubectl against this lab.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, None)
    }

    /// A kubectl command of `binary` (a given release) against this lab, arguments to add.
    pub fn kubectl_command(&self, binary: &str) -> Command {
        let mut command = Command::new(binary);
        command.arg("--kubeconfig").arg(&self.state.kubeconfig);
        command
    }

    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Output {
        self.kubectl_binary_with_input(&kubectl_binary(), args, input)
    }

    /// Runs the kubectl at `binary` (another version than [`kubectl_binary`]) against this lab.
    pub fn kubectl_binary_with_input(
        &self,
        binary: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Output {
        let mut child = self
            .kubectl_command(binary)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("writing to kubectl");
        }
        child.wait_with_output().expect("waiting for kubectl")
    }

    /// Runs kubectl and returns its stdout, failing the test on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Creates a `strait/netexec` pod with kubectl, pinned to `node` when given.
    pub fn create_netexec_pod(&self, name: &str, node: Option<&str>) {
        let node_line = node.map(|n| format!("  nodeName: {n}\n")).unwrap_or_default();
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: netexec\nspec:\n{node_line}  containers:\n  - name: netexec\n    image: strait/netexec\n    ports:\n    - containerPort: 8080\n"
        );
        let output =
            self.kubectl_with_input(&["create", "--validate=false", "-f", "-"], Some(&manifest));
        assert!(
            output.status.success(),
            "kubectl create pod {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Waits until the pod is Running and Ready with an IP, and returns it.
    pub async fn wait_running(&self, name: &str) -> Pod {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.api.get::<Pod>(Some("default"), name).await {
                Ok(Some(pod)) => {
                    let status = pod.status.clone().unwrap_or_default();
                    let ready = status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    if status.phase.as_deref() == Some("Running")
                        && ready
                        && status.pod_ip.is_some()
                    {
                        return pod;
                    }
                    last = format!("{status:?}");
                }
                Ok(None) => last = "not found".to_owned(),
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("pod {name} not running and ready in time; last seen: {last}\n{}", self.logs());
    }

    /// Every node's podCIDR, by node name. Fails the test if a node has none.
    pub async fn pod_cidrs(&self) -> BTreeMap<String, Ipv4Net> {
        let (nodes, _) = self.api.list::<Node>(None, "").await.expect("listing nodes");
        nodes
            .iter()
            .map(|node| {
                let name = node.metadata.name.clone().expect("node name");
                let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).map(str::parse);
                match cidr {
                    Some(Ok(cidr)) => (name, cidr),
                    other => panic!("node {name} has no usable podCIDR: {other:?}"),
                }
            })
            .collect()
    }

    /// The namespace of a node of this lab.
    pub fn node_netns(&self, node: &str) -> NetNs {
        NetNs::open(&lab::node_netns(self.name(), node)).expect("opening the node namespace")
    }

    /// The namespace of a running pod of this lab.
    pub fn pod_netns(&self, pod: &Pod) -> NetNs {
        let uid = pod.metadata.uid.as_deref().expect("pod uid");
        NetNs::open(&format!("{}pod-{uid}", lab::netns_prefix(self.name())))
            .expect("opening the pod namespace")
    }

    /// Everything a container of `pod` on `node` printed so far, over all its restarts, as
    /// the agent's log files hold it (without their timestamps).
    pub fn container_output(&self, node: &str, pod: &Pod, container: &str) -> String {
        use strait_dataplane::runtime::logs;
        let meta = &pod.metadata;
        let dir = lab::lab_dir(self.name()).join("nodes").join(node).join("logs").join(format!(
            "{}_{}_{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
            meta.uid.as_deref().unwrap_or_default()
        ));
        let dir = logs::container_dir(&dir, container);
        let mut output = Vec::new();
        for incarnation in logs::incarnations(&dir) {
            // A file removed meanwhile (the pod went away) reads as nothing more.
            let _ = logs::stream_incarnation(&dir, incarnation, &Default::default(), &mut output);
        }
        String::from_utf8_lossy(&output).into_owned()
    }

    /// The last lines of every log of the lab, for failure messages.
    pub fn logs(&self) -> String {
        lab::log_tails(self.name(), 15)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(error) = lab::down(self.name()) {
            // Never hide a leak: make the test fail loudly (unless it is already failing).
            if !std::thread::panicking() {
                panic!("lab down {}: {error:#}", self.name());
            }
            eprintln!("lab down {} failed while the test was failing: {error:#}", self.name());
        }
    }
}

pub fn pod_ip(pod: &Pod) -> Ipv4Addr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("pod IP")
        .parse()
        .expect("IPv4 pod IP")
}

/// Asserts that traffic from `netns` to `destination` leaves through an interface the lab made
/// (a veth or a bridge in that namespace), never through a real one (DESIGN.md, Network safety).
pub fn assert_route_stays_in_lab(netns: &NetNs, destination: Ipv4Addr) {
    let route = Command::new("ip")
        .args(["-n", netns.name(), "-o", "route", "get", &destination.to_string()])
        .output()
        .expect("running ip route get");
    let text = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.status.success(),
        "no route from {} to {destination}: {}",
        netns.name(),
        String::from_utf8_lossy(&route.stderr)
    );
    let device =
        text.split_whitespace().skip_while(|word| *word != "dev").nth(1).unwrap_or_else(|| {
            panic!("route from {} to {destination} has no device: {text}", netns.name())
        });
    let link = Command::new("ip")
        .args(["-n", netns.name(), "-d", "-o", "link", "show", device])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains(" veth ") || link.contains(" bridge "),
        "traffic from {} to {destination} would leave through {device}, which is not a lab link: {link}",
        netns.name()
    );
}

/// Asserts that the first node's TLS server (`:10250`, `path` on it) answers the API server
/// alone: from inside `pod` (a pod of that node, so in the lab's fabric), a request without a
/// certificate gets 401 and one with the lab's admin certificate 403. `method` as curl's `-X`.
pub fn assert_node_server_refuses_all_but_the_api(
    lab: &TestLab,
    pod: &Pod,
    method: &str,
    path: &str,
) {
    let node = &lab.state.nodes[0];
    let pod_netns = lab.pod_netns(pod);
    assert_route_stays_in_lab(&pod_netns, node.address);
    let url = format!("https://{}:10250{path}", node.address);
    let pki = lab::pki_dir(lab.name());
    let admin = [pki.join("admin.crt"), pki.join("admin.key")];
    let admin_args =
        ["--cert".as_ref(), admin[0].as_os_str(), "--key".as_ref(), admin[1].as_os_str()];
    for (who, extra, expected) in
        [("anonymous", &admin_args[..0], "401"), ("the admin", &admin_args[..], "403")]
    {
        // -k: the agent presents its node identity, not a serving certificate.
        let output = Command::new("ip")
            .args(["netns", "exec", pod_netns.name(), "curl", "-sk", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--max-time", "10", "-X", method])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        let code = String::from_utf8_lossy(&output.stdout);
        assert_eq!(code, expected, "{who} asking {url} directly");
    }
}

/// `GET path` over HTTP/1.0 from inside `netns`, after checking the route. Returns the body.
pub fn http_get(
    netns: &NetNs,
    destination: Ipv4Addr,
    port: u16,
    path: &str,
) -> Result<String, String> {
    assert_route_stays_in_lab(netns, destination);
    let request = format!("GET {path} HTTP/1.0\r\nHost: {destination}\r\n\r\n");
    netns
        .run(|| -> std::io::Result<String> {
            let address = SocketAddr::from((destination, port));
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("HTTP to {destination}:{port}{path} from {}: {e}", netns.name()))
        .and_then(|response| {
            let (head, body) =
                response.split_once("\r\n\r\n").ok_or_else(|| format!("not HTTP: {response}"))?;
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                return Err(format!("HTTP answer {head}"));
            }
            Ok(body.to_owned())
        })
}

/// Sends one UDP datagram from inside `netns` (from `source` when given) and returns the reply,
/// or `None` when none came within `wait`.
pub fn udp_request(
    netns: &NetNs,
    source: Option<Ipv4Addr>,
    destination: Ipv4Addr,
    port: u16,
    payload: &str,
    wait: Duration,
) -> Option<String> {
    assert_route_stays_in_lab(netns, destination);
    netns
        .run(|| -> std::io::Result<Option<String>> {
            let socket = UdpSocket::bind((source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?;
            socket.set_read_timeout(Some(wait))?;
            socket.send_to(payload.as_bytes(), (destination, port))?;
            let mut buffer = [0u8; 2048];
            match socket.recv_from(&mut buffer) {
                Ok((len, _)) => Ok(Some(String::from_utf8_lossy(&buffer[..len]).into_owned())),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .expect("entering the namespace")
        .expect("sending UDP")
}

/// Polls the async `attempt` every 50 ms until it gives a value, failing the test after
/// `timeout`; [`eventually`] for checks that are not async.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `attempt` for up to `timeout` until it returns `Ok`, then returns that value; on
/// timeout panics with the last error. For things that become true shortly (routes, status).
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(error) if Instant::now() >= deadline => {
                panic!("{what}: still failing after {timeout:?}: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl TestLab {
    /// Starts `strait netclient <args>` inside `pod` (its namespace and cgroup), for a run
    /// that goes on while the test acts; [`netclient_report`] waits for its JSON report.
    pub fn spawn_netclient(&self, pod: &str, args: &[&str]) -> std::process::Child {
        let strait = env!("CARGO_BIN_EXE_strait");
        Command::new(strait)
            .args(["lab", "exec", "--name", self.name(), pod, "--", strait, "netclient"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting strait netclient in a pod")
    }
}

/// Waits for a netclient started by [`TestLab::spawn_netclient`] and returns its report.
pub fn netclient_report(child: std::process::Child) -> serde_json::Value {
    let output = child.wait_with_output().expect("waiting for netclient");
    assert!(output.status.success(), "netclient: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("netclient report {:?}: {e}", String::from_utf8_lossy(&output.stdout))
    })
}
