//! `strait bench api`: the API server's own costs on each store backend, side by side in one
//! run: mutating requests (creates, then updates, from several concurrent clients), listing a
//! collection of many objects, and fanning one change out to many watchers.
//!
//! Each backend gets a controller of its own on loopback, in this process, on a fresh store:
//! the embedded redb file in a temporary directory, and a real etcd (Debian's `etcd`, one
//! member on 127.0.0.1, data in a temporary directory) with the controller's keys under one
//! root. Both fsync every commit. Nothing else runs against them meanwhile.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::WatchEvent};
use strait_controlplane::{
    client::ApiClient,
    server::{ControllerConfig, LocalController},
    store::StoreLocation,
    testing::{LocalEtcd, TempDataDir, pod_on},
};

/// What one run measures.
#[derive(Clone, Copy, Debug)]
pub struct ApiBenchOptions {
    /// Concurrent clients of the mutating phase.
    pub clients: usize,
    /// Creates (and then as many updates) per client.
    pub writes_per_client: usize,
    /// Objects in the collection that is listed.
    pub list_objects: usize,
    /// How many times it is listed.
    pub lists: usize,
    /// Watchers of the fan-out phase.
    pub watchers: usize,
    /// Changes fanned out, one at a time.
    pub fanout_writes: usize,
}

impl ApiBenchOptions {
    /// The full run: 16 clients × 250 creates and updates, a list of 10,000 pods, 50 watchers.
    pub const FULL: Self = Self {
        clients: 16,
        writes_per_client: 250,
        list_objects: 10_000,
        lists: 20,
        watchers: 50,
        fanout_writes: 200,
    };
    /// A smoke test of the same phases, in seconds.
    pub const QUICK: Self = Self {
        clients: 8,
        writes_per_client: 25,
        list_objects: 1_000,
        lists: 5,
        watchers: 50,
        fanout_writes: 20,
    };
}

/// Latencies of one kind of request, and the rate they were served at.
#[derive(Debug)]
pub struct Phase {
    pub latencies: Vec<Duration>,
    pub wall: Duration,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, fraction: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
        sorted[index - 1]
    }
}

/// What one backend measured.
#[derive(Debug)]
pub struct BackendReport {
    pub backend: String,
    pub creates: Phase,
    pub updates: Phase,
    pub lists: Phase,
    /// Per change: from sending the write to the last watcher having it.
    pub fanout: Phase,
}

#[derive(Debug)]
pub struct ApiBenchReport {
    pub options: ApiBenchOptions,
    pub backends: Vec<BackendReport>,
}

fn millis(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 { format!("{ms:.2} ms") } else { format!("{ms:.1} ms") }
}

impl fmt::Display for ApiBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "{} clients × {} creates then {} updates each; list of {} pods ×{}; {} watchers × {} changes",
            o.clients,
            o.writes_per_client,
            o.writes_per_client,
            o.list_objects,
            o.lists,
            o.watchers,
            o.fanout_writes
        )?;
        write!(f, "\n| |")?;
        for backend in &self.backends {
            write!(f, " {} |", backend.backend)?;
        }
        write!(f, "\n|---|")?;
        for _ in &self.backends {
            write!(f, "---|")?;
        }
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>,
                   name: String,
                   cell: &dyn Fn(&BackendReport) -> String|
         -> fmt::Result {
            write!(f, "| {name} |")?;
            for backend in &self.backends {
                write!(f, " {} |", cell(backend))?;
            }
            writeln!(f)
        };
        let rate_and_latency = |phase: &Phase| {
            format!(
                "{:.0}/s, p50 {} p99 {}",
                phase.rate(),
                millis(phase.percentile(0.5)),
                millis(phase.percentile(0.99))
            )
        };
        let latency = |phase: &Phase| {
            format!("p50 {} p99 {}", millis(phase.percentile(0.5)), millis(phase.percentile(0.99)))
        };
        row(f, format!("create pod, {} clients", o.clients), &|b| rate_and_latency(&b.creates))?;
        row(f, format!("update pod (merge patch), {} clients", o.clients), &|b| {
            rate_and_latency(&b.updates)
        })?;
        row(f, format!("list {} pods", o.list_objects), &|b| latency(&b.lists))?;
        row(f, format!("write → all {} watchers have it", o.watchers), &|b| latency(&b.fanout))
    }
}

/// Runs every phase on the embedded store, then on etcd.
pub async fn api(options: ApiBenchOptions) -> anyhow::Result<ApiBenchReport> {
    let mut backends = Vec::new();
    {
        let dir = TempDataDir::new("bench-api-redb");
        let config = ControllerConfig::new(dir.path());
        backends.push(run_backend("embedded (redb)", config, &options).await?);
    }
    {
        let etcd = LocalEtcd::start("bench-api").await.context("starting etcd")?;
        let version = etcd_version().unwrap_or_else(|| "etcd".to_owned());
        let dir = TempDataDir::new("bench-api-etcd");
        let mut config = ControllerConfig::new(dir.path());
        config.store = etcd.location("/strait/bench");
        backends.push(run_backend(&version, config, &options).await?);
    }
    Ok(ApiBenchReport { options, backends })
}

/// `etcd 3.4.23`, as the binary reports itself.
fn etcd_version() -> Option<String> {
    let binary = strait_controlplane::testing::etcd_binary()?;
    let output = std::process::Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let version = text.lines().next()?.strip_prefix("etcd Version: ")?.trim().to_owned();
    Some(format!("etcd {version}"))
}

async fn run_backend(
    name: &str,
    config: ControllerConfig,
    options: &ApiBenchOptions,
) -> anyhow::Result<BackendReport> {
    let on = match &config.store {
        StoreLocation::Embedded => "the embedded store".to_owned(),
        other => other.to_string(),
    };
    eprintln!("{name}: starting a controller on {on}");
    let controller = LocalController::start(config).await.context("starting the controller")?;
    let api = controller.client()?;

    eprintln!("{name}: {} clients × {} creates", options.clients, options.writes_per_client);
    let creates = mutate(&api, options, Mutation::Create).await?;
    eprintln!("{name}: {} clients × {} updates", options.clients, options.writes_per_client);
    let updates = mutate(&api, options, Mutation::Update).await?;

    let written = options.clients * options.writes_per_client;
    if options.list_objects > written {
        eprintln!("{name}: filling the collection to {} pods", options.list_objects);
        fill(&api, written, options.list_objects, options.clients).await?;
    }
    let mut list_latencies = Vec::new();
    let started = Instant::now();
    for _ in 0..options.lists {
        let sent = Instant::now();
        let (pods, _) = api.list::<Pod>(Some("default"), "").await.context("listing pods")?;
        list_latencies.push(sent.elapsed());
        anyhow::ensure!(pods.len() >= options.list_objects, "the list has {} pods", pods.len());
    }
    let lists = Phase { latencies: list_latencies, wall: started.elapsed() };

    eprintln!("{name}: {} watchers, {} changes", options.watchers, options.fanout_writes);
    let fanout = fan_out(&api, options).await?;
    controller.stop().await.context("stopping the controller")?;
    Ok(BackendReport { backend: name.to_owned(), creates, updates, lists, fanout })
}

#[derive(Clone, Copy)]
enum Mutation {
    Create,
    Update,
}

fn pod_name(client: usize, index: usize) -> String {
    format!("bench-{client}-{index}")
}

/// Each client creates (or updates) its own pods, one request at a time.
async fn mutate(
    api: &ApiClient,
    options: &ApiBenchOptions,
    mutation: Mutation,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..options.clients {
        let (api, count) = (api.clone(), options.writes_per_client);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for index in 0..count {
                let name = pod_name(client, index);
                let sent = Instant::now();
                match mutation {
                    Mutation::Create => {
                        api.create::<Pod>(Some("default"), &pod_on(&name, "bench-node"))
                            .await
                            .with_context(|| format!("creating {name}"))?;
                    }
                    Mutation::Update => {
                        let patch = serde_json::json!({"metadata": {"labels": {"updated": "yes"}}});
                        api.merge_patch::<Pod>(Some("default"), &name, &patch, false)
                            .await
                            .with_context(|| format!("updating {name}"))?;
                    }
                }
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("a client task")??);
    }
    Ok(Phase { latencies, wall: started.elapsed() })
}

/// Creates pods `from..to` (not measured) with `clients` concurrent clients.
async fn fill(api: &ApiClient, from: usize, to: usize, clients: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for index in (from + client..to).step_by(clients) {
                let name = format!("fill-{index}");
                api.create::<Pod>(Some("default"), &pod_on(&name, "bench-node"))
                    .await
                    .with_context(|| format!("creating {name}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a filling task")??;
    }
    Ok(())
}

/// Opens the watchers, then changes one pod at a time and notes, for each change, how long
/// after the write was sent the last watcher received it.
async fn fan_out(api: &ApiClient, options: &ApiBenchOptions) -> anyhow::Result<Phase> {
    let probe = "fanout-probe";
    api.create::<Pod>(Some("default"), &pod_on(probe, "bench-node")).await.context("the probe")?;
    let (_, revision) = api.list::<Pod>(Some("default"), "limit=1").await.context("a revision")?;
    // resourceVersion → when each watcher received it.
    let seen: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let mut watchers = Vec::new();
    for _ in 0..options.watchers {
        let mut stream = api
            .watch::<Pod>(
                Some("default"),
                &format!("resourceVersion={revision}&fieldSelector=metadata.name%3D{probe}"),
            )
            .await
            .context("opening a watch")?;
        let seen = Arc::clone(&seen);
        watchers.push(tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let received = Instant::now();
                if let Ok(WatchEvent::Modified(pod)) = event
                    && let Some(version) = pod.metadata.resource_version
                    && let Ok(mut seen) = seen.lock()
                {
                    seen.entry(version).or_default().push(received);
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    for index in 0..options.fanout_writes {
        let patch = serde_json::json!({"metadata": {"labels": {"change": index.to_string()}}});
        let sent = Instant::now();
        let changed: Pod = api
            .merge_patch(Some("default"), probe, &patch, false)
            .await
            .context("changing the probe")?;
        let version = changed.metadata.resource_version.unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let last = loop {
            let everyone = seen.lock().ok().and_then(|seen| {
                let times = seen.get(&version)?;
                (times.len() == options.watchers).then(|| times.iter().max().copied())?
            });
            if let Some(last) = everyone {
                break last;
            }
            anyhow::ensure!(Instant::now() < deadline, "the watchers did not all get a change");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        latencies.push(last.duration_since(sent));
    }
    let wall = started.elapsed();
    for watcher in watchers {
        watcher.abort();
    }
    Ok(Phase { latencies, wall })
}
