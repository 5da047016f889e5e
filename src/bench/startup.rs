//! `strait bench startup`: how long a pod takes from the create request to Running and Ready,
//! for a burst of pods in a lab, beside the floor measured in the same run: the same number of
//! bare network namespaces asked for at once, each running the same `strait netexec` until its
//! HTTP port answers, made without the control plane, the agent or CNI (and without the
//! readiness round trip through the API).

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, WatchEvent},
};
use strait_dataplane::{netns::NetNs, runtime::process::ChildSetup};

/// Latencies of one kind, sorted.
#[derive(Debug)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// The `q` quantile (nearest rank).
    pub fn quantile(&self, q: f64) -> Duration {
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1]
    }
}

#[derive(Debug)]
pub struct StartupReport {
    pub pods: usize,
    pub nodes: usize,
    /// Create request → Running and Ready, per pod.
    pub pods_ready: Latencies,
    /// Namespace made → netexec answering, per bare namespace.
    pub floor: Latencies,
}

impl fmt::Display for StartupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(f, "{} pods created at once in a lab of {} nodes", self.pods, self.nodes)?;
        for (label, latencies) in [
            ("pod: create → Running and Ready", &self.pods_ready),
            ("floor: bare netns + netexec answering", &self.floor),
        ] {
            writeln!(
                f,
                "  {label:<40} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms",
                ms(latencies.quantile(0.5)),
                ms(latencies.quantile(0.99)),
                ms(latencies.quantile(1.0)),
            )?;
        }
        write!(
            f,
            "  pod / floor:                             p50 {:>8.2}      p99 {:>8.2}",
            ms(self.pods_ready.quantile(0.5)) / ms(self.floor.quantile(0.5)),
            ms(self.pods_ready.quantile(0.99)) / ms(self.floor.quantile(0.99)),
        )
    }
}

fn netexec_pod(name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "netexec".to_owned(),
                image: Some("strait/netexec".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Creates `pods` pods at once in the lab and waits (watching) until each is Ready.
async fn pods_ready(
    api: &strait_controlplane::client::ApiClient,
    pods: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (_, revision) = api.list::<Pod>(Some("default"), "").await.context("listing pods")?;
    let mut events = api
        .watch::<Pod>(Some("default"), &format!("resourceVersion={revision}"))
        .await
        .context("watching pods")?;
    let mut created: HashMap<String, Instant> = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..pods {
        let (api, name) = (api.clone(), format!("startup-{i}"));
        created.insert(name.clone(), Instant::now());
        tasks.push(tokio::spawn(async move {
            api.create::<Pod>(Some("default"), &netexec_pod(&name)).await.map(|_| ())
        }));
    }
    for task in tasks {
        task.await.context("a create task")?.context("creating a pod")?;
    }
    let mut ready: HashMap<String, Duration> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while ready.len() < pods {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("pods not Ready within 5 minutes")?
            .context("the watch ended")?
            .context("watching pods")?;
        if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) = event
            && is_ready(&pod)
            && let Some(name) = pod.metadata.name.as_deref()
            && let Some(started) = created.get(name)
        {
            ready.entry(name.to_owned()).or_insert_with(|| started.elapsed());
        }
    }
    Ok(ready.into_values().collect())
}

/// Removes the floor's namespaces and processes, also when a step failed.
struct FloorGuard {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for FloorGuard {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = NetNs::delete(name);
        }
    }
}

/// The floor, made the way the pods are asked for (all at once): `pods` bare namespaces, each
/// with netexec started in it, then each polled until its HTTP port answers on the
/// namespace's loopback. A latency runs from the moment its namespace was started.
fn floor(pods: usize, prefix: &str) -> anyhow::Result<Vec<Duration>> {
    let strait = std::env::current_exe().context("locating the strait binary")?;
    let mut guard = FloorGuard { names: Vec::new(), children: Vec::new() };
    let mut started = Vec::with_capacity(pods);
    for i in 0..pods {
        let name = format!("{prefix}{i}");
        let start = Instant::now();
        let namespace = NetNs::create(&name).with_context(|| format!("creating netns {name}"))?;
        guard.names.push(name.clone());
        namespace.run(|| {
            std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status()
        })??;
        let setup = ChildSetup::new().enter_netns(&namespace.path())?;
        let mut command = std::process::Command::new(&strait);
        command.arg("netexec").stdout(Stdio::null()).stderr(Stdio::null());
        setup.install(&mut command);
        guard.children.push(command.spawn().context("starting netexec")?);
        started.push((namespace, start));
    }
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
    let mut latencies = vec![None; pods];
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.iter().any(Option::is_none) {
        anyhow::ensure!(Instant::now() < deadline, "netexec never answered in some namespaces");
        for (i, (namespace, start)) in started.iter().enumerate() {
            if latencies[i].is_some() {
                continue;
            }
            let answered = namespace
                .run(|| TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok())?;
            if answered {
                latencies[i] = Some(start.elapsed());
            }
        }
    }
    Ok(latencies.into_iter().flatten().collect())
}

/// Brings up a lab of `nodes` nodes, measures, and removes everything it made.
pub async fn startup(
    pods: usize,
    nodes: usize,
    cni_plugin: &std::path::Path,
) -> anyhow::Result<StartupReport> {
    let name = format!("bstart-{}", std::process::id() % 100_000);
    let options = crate::lab::UpOptions {
        name: name.clone(),
        nodes,
        strait_exe: std::env::current_exe()?,
        cni_plugin: cni_plugin.to_owned(),
        ready_timeout: Duration::from_secs(120),
        controller_args: Vec::new(),
        agent_args: Vec::new(),
    };
    let state = crate::lab::up(&options).await.context("bringing the lab up")?;
    let measured = async {
        let api = state.api_client()?;
        let pods_ready = pods_ready(&api, pods).await?;
        let prefix = format!("{}floor-", crate::lab::netns_prefix(&name));
        let floor = tokio::task::spawn_blocking(move || floor(pods, &prefix)).await??;
        anyhow::Ok((pods_ready, floor))
    }
    .await;
    let down = crate::lab::down(&name);
    let (pods_ready, floor) = measured?;
    down.context("bringing the lab down")?;
    Ok(StartupReport {
        pods,
        nodes,
        pods_ready: Latencies::new(pods_ready),
        floor: Latencies::new(floor),
    })
}
