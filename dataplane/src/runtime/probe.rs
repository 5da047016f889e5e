//! Container probes (`startupProbe`, `readinessProbe`, `livenessProbe`) as Kubernetes defines
//! them (Pod lifecycle, "Container probes"; the API reference of `Probe`).
//!
//! Each running container with at least one probe gets one probe task, spawned by its pod
//! worker and aborted when that container process ends or the pod stops. The task never blocks
//! the worker: it reports what changed ([`ProbeChange`]) through a channel, tagged with the pid
//! of the container incarnation it probed, so a result about an earlier incarnation is ignored.
//!
//! Order, as the kubelet does it: the startup probe runs first, and neither liveness nor
//! readiness runs until it has succeeded; the startup and liveness probes kill the container
//! after `failureThreshold` consecutive failures; readiness only flips the container's `ready`.
//!
//! Handlers: `httpGet` (from the agent's namespace, which reaches the pod IP as a node does),
//! `tcpSocket`, and `exec` (inside the pod's network namespace and the container's cgroup, with
//! the container's environment). `grpc` is not supported: it always fails, with a warning.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, HTTPHeader, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

use super::process::{ChildSetup, resolve_program};

/// Which of a container's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Readiness => "readiness",
            Self::Liveness => "liveness",
        }
    }
}

/// What a probe task tells its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeChange {
    /// The readiness probe's result changed.
    Ready(bool),
    /// The startup probe succeeded (or the container has none): the other probes run now.
    Started,
    /// The startup or liveness probe failed `failureThreshold` times in a row: the container
    /// must be killed and restarted per the pod's restartPolicy. The message says why.
    Kill { kind: ProbeKind, message: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEvent {
    pub container: String,
    /// The container incarnation the probe ran against.
    pub pid: u32,
    pub change: ProbeChange,
}

/// What a probe task knows about the container incarnation it probes.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub container: String,
    pub pid: u32,
    /// The default host of `httpGet` and `tcpSocket`.
    pub pod_ip: Ipv4Addr,
    /// The container's ports, for ports given by name.
    pub ports: Vec<ContainerPort>,
    /// Where `exec` probes run: the pod's network namespace, the container's cgroup, its
    /// environment and hostname.
    pub netns_path: PathBuf,
    pub cgroup_procs: PathBuf,
    pub env: Vec<(String, String)>,
    pub hostname: String,
    /// The container's mount namespace (`/proc/<pid>/ns/mnt`): exec probes see its volumes.
    pub mount_namespace: PathBuf,
}

/// The timing fields of a `Probe`, with the Kubernetes defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    /// The API server defaults these fields; a pod stored without them (or with values
    /// validation would refuse, such as 0) gets the same defaults here.
    pub fn of(probe: &Probe) -> Self {
        let seconds = |value: Option<i32>, default: u64, min: u64| {
            Duration::from_secs(value.map_or(default, |v| (v.max(0) as u64).max(min)))
        };
        let count = |value: Option<i32>, default: u32| value.map_or(default, |v| v.max(1) as u32);
        Self {
            initial_delay: seconds(probe.initial_delay_seconds, 0, 0),
            period: seconds(probe.period_seconds, 10, 1),
            timeout: seconds(probe.timeout_seconds, 1, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// Turns single probe outcomes into a result: a result changes only after `successThreshold`
/// consecutive successes or `failureThreshold` consecutive failures, as the kubelet's prober
/// counts them.
#[derive(Clone, Debug)]
pub struct Thresholds {
    success_threshold: u32,
    failure_threshold: u32,
    result: Option<bool>,
    last: Option<bool>,
    run: u32,
}

impl Thresholds {
    /// `initial` is the result before any probe ran: `Some(false)` for readiness (not ready
    /// until proven), `None` for startup and liveness.
    pub fn new(timing: &ProbeTiming, initial: Option<bool>) -> Self {
        Self {
            success_threshold: timing.success_threshold,
            failure_threshold: timing.failure_threshold,
            result: initial,
            last: None,
            run: 0,
        }
    }

    /// Counts one outcome; returns the result when this outcome reached a threshold (also
    /// when it confirms the current result), `None` while the run is still short of it.
    pub fn observe(&mut self, success: bool) -> Option<bool> {
        if self.last == Some(success) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(success);
            self.run = 1;
        }
        let threshold = if success { self.success_threshold } else { self.failure_threshold };
        if self.run < threshold {
            return None;
        }
        self.result = Some(success);
        Some(success)
    }

    pub fn result(&self) -> Option<bool> {
        self.result
    }
}

/// A probe's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handler {
    HttpGet {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    TcpSocket {
        host: String,
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
    /// A handler this runtime cannot run (grpc, https, a port that names nothing): every
    /// attempt fails with this message.
    Unsupported(String),
}

impl Handler {
    /// The handler of `probe`, with ports resolved against the container's named ports and
    /// the host defaulting to the pod IP.
    pub fn of(probe: &Probe, ports: &[ContainerPort], pod_ip: Ipv4Addr) -> Self {
        let host = |host: &Option<String>| {
            host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| pod_ip.to_string())
        };
        let resolved = |port: &IntOrString| resolve_port(port, ports);
        if let Some(http) = &probe.http_get {
            let scheme = http.scheme.as_deref().unwrap_or("HTTP");
            if !scheme.eq_ignore_ascii_case("HTTP") {
                return Self::Unsupported(format!("httpGet scheme {scheme} is not supported"));
            }
            let port = match resolved(&http.port) {
                Ok(port) => port,
                Err(message) => return Self::Unsupported(message),
            };
            let path = http.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
            let path = if path.starts_with('/') { path } else { format!("/{path}") };
            let headers = http
                .http_headers
                .iter()
                .flatten()
                .map(|HTTPHeader { name, value }| (name.clone(), value.clone()))
                .collect();
            Self::HttpGet { host: host(&http.host), port, path, headers }
        } else if let Some(tcp) = &probe.tcp_socket {
            match resolved(&tcp.port) {
                Ok(port) => Self::TcpSocket { host: host(&tcp.host), port },
                Err(message) => Self::Unsupported(message),
            }
        } else if let Some(exec) = &probe.exec {
            Self::Exec { command: exec.command.clone().unwrap_or_default() }
        } else if probe.grpc.is_some() {
            Self::Unsupported("grpc probes are not supported by strait".to_owned())
        } else {
            Self::Unsupported("the probe has no handler".to_owned())
        }
    }
}

fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, String> {
    let number = match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(number) => number,
            Err(_) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| format!("the container has no port named {name:?}"))?,
        },
    };
    u16::try_from(number).ok().filter(|p| *p != 0).ok_or_else(|| format!("invalid port {number}"))
}

/// One attempt's outcome: `Err` carries why it failed.
pub type Outcome = Result<(), String>;

/// Runs `handler` once, giving up after `timeout`.
pub async fn run_handler(handler: &Handler, timeout: Duration, target: &ProbeTarget) -> Outcome {
    match handler {
        Handler::HttpGet { host, port, path, headers } => {
            within(timeout, http_get(host, *port, path, headers)).await
        }
        Handler::TcpSocket { host, port } => {
            within(timeout, async {
                TcpStream::connect((host.as_str(), *port))
                    .await
                    .map(drop)
                    .map_err(|e| format!("connecting to {host}:{port}: {e}"))
            })
            .await
        }
        Handler::Exec { command } => exec(command, timeout, target).await,
        Handler::Unsupported(message) => Err(message.clone()),
    }
}

async fn within(timeout: Duration, attempt: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))
}

/// The most of a response or of an exec probe's output that is read.
const READ_LIMIT: u64 = 10 * 1024;

/// `GET http://host:port/path`; success is a status of 200 to 399. Redirects are not followed:
/// a 3xx already counts as success.
async fn http_get(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> Outcome {
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("host") {
        request.push_str(&format!("Host: {host}:{port}\r\n"));
    }
    if !has("user-agent") {
        request.push_str(&format!("User-Agent: strait-probe/{}\r\n", env!("CARGO_PKG_VERSION")));
    }
    if !has("accept") {
        request.push_str("Accept: */*\r\n");
    }
    for (name, value) in headers {
        // A CR or LF would end the header and let the pod spec write arbitrary request lines.
        if [name, value].iter().any(|s| s.contains(['\r', '\n'])) || name.is_empty() {
            return Err(format!("invalid httpHeader {name:?}"));
        }
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    if path.contains(['\r', '\n', ' ']) {
        return Err(format!("invalid path {path:?}"));
    }
    let url = format!("http://{host}:{port}{path}");
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET {url}: connecting: {e}"))?;
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("GET {url}: {e}"))?;
    let mut head = Vec::new();
    let mut reader = (&mut stream).take(READ_LIMIT);
    let mut buffer = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let read = reader.read(&mut buffer).await.map_err(|e| format!("GET {url}: {e}"))?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {url}: not an HTTP response: {status_line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP probe failed with statuscode: {code}"))
    }
}

/// Runs `command` inside the container's network namespace and cgroup with its environment;
/// success is exit status 0. After `timeout` its whole session is killed.
async fn exec(command: &[String], timeout: Duration, target: &ProbeTarget) -> Outcome {
    let Some(program) = command.first() else {
        return Err("the exec probe has no command".to_owned());
    };
    let path_var = target.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let resolved = resolve_program(program, path_var)
        .ok_or_else(|| format!("exec {program}: not found in the container's PATH"))?;
    let setup = ChildSetup::new()
        .join_cgroup(&target.cgroup_procs)
        .map(ChildSetup::new_session)
        .and_then(|setup| setup.enter_netns(&target.netns_path))
        .and_then(|setup| setup.hostname(&target.hostname))
        .and_then(|setup| setup.join_mount_namespace(&target.mount_namespace))
        .map_err(|e| format!("exec {program}: preparing: {e}"))?;
    let mut child = tokio::process::Command::new(&resolved);
    child
        .args(&command[1..])
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    setup.install(child.as_std_mut());
    let mut child = child.spawn().map_err(|e| format!("exec {program}: {e}"))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let finished = tokio::time::timeout(timeout, async {
        let (status, stdout, stderr) =
            tokio::join!(child.wait(), read_some(stdout), read_some(stderr));
        (status, format!("{stdout}{stderr}"))
    })
    .await;
    match finished {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), output)) => {
            let output = output.trim();
            Err(format!(
                "exec {command:?}: {status}{}{output}",
                if output.is_empty() { "" } else { ": " }
            ))
        }
        Ok((Err(error), _)) => Err(format!("exec {program}: waiting: {error}")),
        Err(_) => {
            // The child is not reaped yet, so its pid (= its session and process group) cannot
            // have been reused: kill the group, including anything it started.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            Err(format!("exec {command:?}: timed out after {timeout:?}"))
        }
    }
}

async fn read_some(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(stream) = stream else { return String::new() };
    let mut bytes = Vec::new();
    let _ = stream.take(READ_LIMIT).read_to_end(&mut bytes).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A container's probe task; aborted when dropped.
pub struct ProbeTask {
    pid: u32,
    task: JoinHandle<()>,
}

impl ProbeTask {
    /// The container incarnation it probes.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the container has any probe.
pub fn has_probes(container: &Container) -> bool {
    container.startup_probe.is_some()
        || container.readiness_probe.is_some()
        || container.liveness_probe.is_some()
}

/// Starts probing a container incarnation that started at `started_at`.
pub fn spawn(
    container: &Container,
    target: ProbeTarget,
    started_at: Instant,
    events: mpsc::UnboundedSender<ProbeEvent>,
) -> ProbeTask {
    let pid = target.pid;
    let startup = container.startup_probe.clone();
    let readiness = container.readiness_probe.clone();
    let liveness = container.liveness_probe.clone();
    let task = tokio::spawn(async move {
        let reporter = Reporter { target: &target, events: &events };
        if let Some(probe) = startup {
            if !run_probe(ProbeKind::Startup, &probe, started_at, &reporter).await {
                return;
            }
            reporter.send(ProbeChange::Started);
        }
        let readiness = async {
            if let Some(probe) = readiness {
                run_probe(ProbeKind::Readiness, &probe, started_at, &reporter).await;
            }
        };
        let liveness = async {
            if let Some(probe) = liveness {
                run_probe(ProbeKind::Liveness, &probe, started_at, &reporter).await;
            }
        };
        tokio::join!(readiness, liveness);
    });
    ProbeTask { pid, task }
}

struct Reporter<'a> {
    target: &'a ProbeTarget,
    events: &'a mpsc::UnboundedSender<ProbeEvent>,
}

impl Reporter<'_> {
    fn send(&self, change: ProbeChange) {
        // The worker is gone only when the pod is: nothing left to tell.
        let _ = self.events.send(ProbeEvent {
            container: self.target.container.clone(),
            pid: self.target.pid,
            change,
        });
    }
}

/// Runs one probe every period from `started_at + initialDelaySeconds`. A startup probe
/// returns true once it succeeded; a startup or liveness probe returns false after it asked for
/// the container to be killed; a readiness probe runs until the task is aborted.
async fn run_probe(
    kind: ProbeKind,
    probe: &Probe,
    started_at: Instant,
    reporter: &Reporter<'_>,
) -> bool {
    let timing = ProbeTiming::of(probe);
    let handler = Handler::of(probe, &reporter.target.ports, reporter.target.pod_ip);
    if let Handler::Unsupported(message) = &handler {
        tracing::warn!(container = %reporter.target.container, probe = kind.name(), %message, "probe cannot run; counting it as failing");
    }
    let initial = (kind == ProbeKind::Readiness).then_some(false);
    let mut thresholds = Thresholds::new(&timing, initial);
    let mut ticks = tokio::time::interval_at(started_at + timing.initial_delay, timing.period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = run_handler(&handler, timing.timeout, reporter.target).await;
        if let Err(message) = &outcome {
            tracing::debug!(container = %reporter.target.container, probe = kind.name(), %message, "probe failed");
        }
        let before = thresholds.result();
        let Some(result) = thresholds.observe(outcome.is_ok()) else { continue };
        match (kind, result) {
            (ProbeKind::Readiness, ready) => {
                if before != Some(ready) {
                    reporter.send(ProbeChange::Ready(ready));
                }
            }
            (ProbeKind::Startup, true) => return true,
            (ProbeKind::Liveness, true) => {}
            (ProbeKind::Startup | ProbeKind::Liveness, false) => {
                let message = format!(
                    "{} probe failed {} times in a row: {}",
                    kind.name(),
                    timing.failure_threshold,
                    outcome.err().unwrap_or_default()
                );
                reporter.send(ProbeChange::Kill { kind, message });
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use k8s_openapi::{
        api::core::v1::{
            ContainerPort, ExecAction, GRPCAction, HTTPGetAction, HTTPHeader, Probe,
            TCPSocketAction,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::{Handler, ProbeTarget, ProbeTiming, Thresholds, run_handler};

    fn timing(success: u32, failure: u32) -> ProbeTiming {
        ProbeTiming {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    fn target() -> ProbeTarget {
        ProbeTarget {
            container: "app".into(),
            pid: 1,
            pod_ip: Ipv4Addr::LOCALHOST,
            ports: vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }],
            netns_path: "/proc/self/ns/net".into(),
            cgroup_procs: "/nonexistent".into(),
            env: Vec::new(),
            hostname: "app".into(),
            mount_namespace: "/proc/self/ns/mnt".into(),
        }
    }

    #[test]
    fn unset_fields_get_the_kubernetes_defaults() {
        let t = ProbeTiming::of(&Probe::default());
        assert_eq!(t.initial_delay, Duration::ZERO);
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        let zeros = Probe {
            period_seconds: Some(0),
            timeout_seconds: Some(0),
            failure_threshold: Some(0),
            ..Default::default()
        };
        let t = ProbeTiming::of(&zeros);
        assert_eq!((t.period, t.timeout), (Duration::from_secs(1), Duration::from_secs(1)));
        assert_eq!(t.failure_threshold, 1, "a zero threshold would never fire");
    }

    #[test]
    fn readiness_needs_success_threshold_successes_and_failure_threshold_failures() {
        let mut t = Thresholds::new(&timing(2, 3), Some(false));
        assert_eq!(t.observe(true), None, "one success is not enough");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a failure restarted the run");
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.result(), Some(true));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.result(), Some(true), "still ready after two of three failures");
        assert_eq!(t.observe(true), None, "a success after failures starts a new run");
        assert_eq!(t.result(), Some(true), "and the failures before it are forgotten");
        for _ in 0..2 {
            assert_eq!(t.observe(false), None);
        }
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.result(), Some(false));
    }

    #[test]
    fn one_failure_with_threshold_one_flips_at_once() {
        let mut t = Thresholds::new(&timing(1, 1), None);
        assert_eq!(t.result(), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(true), Some(true));
    }

    #[test]
    fn handlers_default_to_the_pod_ip_and_resolve_named_ports() {
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("healthz".into()),
                http_headers: Some(vec![HTTPHeader { name: "X-A".into(), value: "b".into() }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Handler::of(&probe, &target().ports, ip),
            Handler::HttpGet {
                host: "10.244.1.7".into(),
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("X-A".into(), "b".into())],
            }
        );
        let tcp = Probe {
            tcp_socket: Some(TCPSocketAction {
                host: Some("127.0.0.1".into()),
                port: IntOrString::Int(53),
            }),
            ..Default::default()
        };
        assert_eq!(
            Handler::of(&tcp, &[], ip),
            Handler::TcpSocket { host: "127.0.0.1".into(), port: 53 }
        );
        let unnamed = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("metrics".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            matches!(Handler::of(&unnamed, &target().ports, ip), Handler::Unsupported(m) if m.contains("metrics"))
        );
        let grpc =
            Probe { grpc: Some(GRPCAction { port: 9000, service: None }), ..Default::default() };
        assert!(
            matches!(Handler::of(&grpc, &[], ip), Handler::Unsupported(m) if m.contains("grpc"))
        );
        let exec = Probe {
            exec: Some(ExecAction { command: Some(vec!["true".into()]) }),
            ..Default::default()
        };
        assert_eq!(Handler::of(&exec, &[], ip), Handler::Exec { command: vec!["true".into()] });
    }

    /// A loopback HTTP server that answers each connection with `status` and hands back the
    /// request it read.
    async fn http_server(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = sender.send(String::from_utf8_lossy(&request).into_owned());
                let answer = format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (port, receiver)
    }

    fn http(port: u16, headers: Vec<(String, String)>) -> Handler {
        Handler::HttpGet { host: "127.0.0.1".into(), port, path: "/healthz".into(), headers }
    }

    #[tokio::test]
    async fn http_get_succeeds_on_2xx_and_3xx_and_sends_the_probe_headers() {
        let (port, mut requests) = http_server(200).await;
        let headers = vec![("X-Probe".to_owned(), "yes".to_owned())];
        run_handler(&http(port, headers), Duration::from_secs(1), &target())
            .await
            .expect("200 is success");
        let request = requests.recv().await.expect("a request");
        assert!(request.starts_with("GET /healthz HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nX-Probe: yes\r\n"), "{request}");
        assert!(request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")), "{request}");

        let (port, _requests) = http_server(302).await;
        run_handler(&http(port, Vec::new()), Duration::from_secs(1), &target())
            .await
            .expect("a redirect is success");
    }

    #[tokio::test]
    async fn http_get_fails_on_4xx_5xx_refused_connections_and_bad_headers() {
        for status in [404, 500] {
            let (port, _requests) = http_server(status).await;
            let error = run_handler(&http(port, Vec::new()), Duration::from_secs(1), &target())
                .await
                .expect_err("an error status");
            assert!(error.contains(&status.to_string()), "{error}");
        }
        let closed = closed_port().await;
        run_handler(&http(closed, Vec::new()), Duration::from_secs(1), &target())
            .await
            .expect_err("nothing listens");
        let (port, _requests) = http_server(200).await;
        let injected = vec![("X-A".to_owned(), "a\r\nX-B: b".to_owned())];
        run_handler(&http(port, injected), Duration::from_secs(1), &target())
            .await
            .expect_err("a header value with CRLF is refused");
    }

    #[tokio::test]
    async fn http_get_times_out_when_the_server_never_answers() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let error = run_handler(&http(port, Vec::new()), Duration::from_millis(200), &target())
            .await
            .expect_err("no answer");
        assert!(error.contains("timed out"), "{error}");
        drop(listener);
    }

    /// A loopback port nothing listens on (bound, then released).
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        listener.local_addr().expect("address").port()
    }

    #[tokio::test]
    async fn tcp_socket_succeeds_when_something_listens_and_fails_otherwise() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let handler = Handler::TcpSocket { host: "127.0.0.1".into(), port };
        run_handler(&handler, Duration::from_secs(1), &target()).await.expect("listening");
        drop(listener);
        let error = run_handler(&handler, Duration::from_secs(1), &target())
            .await
            .expect_err("nothing listens any more");
        assert!(error.contains(&port.to_string()), "{error}");
    }

    #[tokio::test]
    async fn unsupported_handlers_always_fail_with_their_reason() {
        let handler = Handler::Unsupported("grpc probes are not supported by strait".into());
        let error =
            run_handler(&handler, Duration::from_secs(1), &target()).await.expect_err("fails");
        assert!(error.contains("grpc"));
    }

    #[tokio::test]
    async fn exec_probes_without_a_runnable_command_fail_before_starting_anything() {
        let empty = Handler::Exec { command: Vec::new() };
        let error = run_handler(&empty, Duration::from_secs(1), &target()).await.expect_err("");
        assert!(error.contains("no command"), "{error}");
        let missing = Handler::Exec { command: vec!["no-such-program-strait".into()] };
        let mut target = target();
        target.env.push(("PATH".into(), "/nonexistent".into()));
        let error = run_handler(&missing, Duration::from_secs(1), &target).await.expect_err("");
        assert!(error.contains("not found in the container's PATH"), "{error}");
    }
}
