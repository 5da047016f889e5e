//! `strait bench scheduler`: how fast a burst of pending pods is placed, beside the API's own
//! write rate measured in the same run on the same controller.
//!
//! Each run starts a controller on a fresh store in a temporary directory (loopback only, no
//! agents: the nodes are API objects reported Ready with room for every pod). The floor is the
//! time to create N pods already bound to a node, one write each, from 16 concurrent clients.
//! The measured figure is the time from the moment N pending pods meet the first Ready node
//! until every one is bound: the scheduler's whole loop (watch, filter, score, bind).

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_openapi::{
    api::core::v1::{Container, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodSpec},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use strait_controlplane::{
    client::ApiClient,
    server::{ControllerConfig, LocalController},
};

/// Concurrent API clients that create pods.
const CLIENTS: usize = 16;

/// What one run of the scheduler benchmark measured.
#[derive(Debug)]
pub struct SchedulerRun {
    /// N pods created already bound, 16 clients at once.
    pub floor: Duration,
    /// First Ready node created → every pending pod bound.
    pub scheduled: Duration,
}

#[derive(Debug)]
pub struct SchedulerReport {
    pub pods: usize,
    pub nodes: usize,
    pub runs: Vec<SchedulerRun>,
}

impl fmt::Display for SchedulerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |d: Duration| self.pods as f64 / d.as_secs_f64();
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (floor, floor_min, floor_max) =
            median(self.runs.iter().map(|r| rate(r.floor)).collect());
        let (sched, sched_min, sched_max) =
            median(self.runs.iter().map(|r| rate(r.scheduled)).collect());
        writeln!(f, "{} pending pods, {} nodes, {} runs", self.pods, self.nodes, self.runs.len())?;
        writeln!(
            f,
            "  scheduled (pending → bound):        median {sched:>8.0} pods/s  min {sched_min:>8.0}  max {sched_max:>8.0}"
        )?;
        writeln!(
            f,
            "  floor: API creates of bound pods:   median {floor:>8.0} pods/s  min {floor_min:>8.0}  max {floor_max:>8.0}"
        )?;
        write!(f, "  scheduled / floor (median):         {:.2}", sched / floor)
    }
}

fn ready_node(name: &str, index: usize) -> Node {
    let quantity = |text: &str| Quantity(text.to_owned());
    let resources = [
        ("cpu".to_owned(), quantity("1000")),
        ("memory".to_owned(), quantity("4Ti")),
        ("pods".to_owned(), quantity("100000")),
    ];
    Node {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalIP".to_owned(),
                address: format!("172.31.{}.{}", index / 250, index % 250 + 1),
            }]),
            allocatable: Some(resources.clone().into()),
            capacity: Some(resources.into()),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_owned(),
                status: "True".to_owned(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn bench_pod(name: &str, node: Option<&str>) -> Pod {
    let requests = [
        ("cpu".to_owned(), Quantity("100m".to_owned())),
        ("memory".to_owned(), Quantity("64Mi".to_owned())),
    ];
    Pod {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        spec: Some(PodSpec {
            node_name: node.map(str::to_owned),
            containers: vec![Container {
                name: "c".to_owned(),
                image: Some("strait/netexec".to_owned()),
                resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    requests: Some(requests.into()),
                    ..Default::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Creates `names` pods from [`CLIENTS`] concurrent tasks.
async fn create_pods(
    api: &ApiClient,
    names: Vec<String>,
    node: Option<&str>,
) -> anyhow::Result<()> {
    let names = Arc::new(names);
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (api, names, node) = (api.clone(), Arc::clone(&names), node.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            for name in names.iter().skip(client).step_by(CLIENTS) {
                api.create::<Pod>(Some("default"), &bench_pod(name, node.as_deref()))
                    .await
                    .with_context(|| format!("creating pod {name}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a pod-creating task")??;
    }
    Ok(())
}

async fn bound_pods(api: &ApiClient, prefix: &str) -> anyhow::Result<usize> {
    let (pods, _) = api.list::<Pod>(Some("default"), "").await.context("listing pods")?;
    Ok(pods
        .iter()
        .filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with(prefix)))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some())
        .count())
}

async fn one_run(pods: usize, nodes: usize, run: usize) -> anyhow::Result<SchedulerRun> {
    let dir =
        std::env::temp_dir().join(format!("strait-bench-scheduler-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = async {
        let controller =
            LocalController::start(ControllerConfig::new(&dir)).await.context("starting")?;
        let api = controller.client()?;

        // The floor: N writes of pods that need no scheduling.
        let names: Vec<String> = (0..pods).map(|i| format!("floor-{i}")).collect();
        api.create::<Node>(None, &ready_node("floor-node", 0)).await.context("floor node")?;
        let started = Instant::now();
        create_pods(&api, names, Some("floor-node")).await?;
        let floor = started.elapsed();
        // Cordon the floor node so it takes no pending pod.
        let cordon = serde_json::json!({"spec": {"unschedulable": true}});
        api.merge_patch::<Node>(None, "floor-node", &cordon, false).await.context("cordoning")?;

        // N pending pods, then the nodes: the burst the scheduler must place.
        let names: Vec<String> = (0..pods).map(|i| format!("pending-{i}")).collect();
        create_pods(&api, names, None).await?;
        let started = Instant::now();
        for i in 0..nodes {
            api.create::<Node>(None, &ready_node(&format!("node-{i}"), i + 1))
                .await
                .context("creating a node")?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while bound_pods(&api, "pending-").await? < pods {
            anyhow::ensure!(Instant::now() < deadline, "pods still pending after 5 minutes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let scheduled = started.elapsed();
        drop(controller);
        anyhow::Ok(SchedulerRun { floor, scheduled })
    }
    .await;
    let removed = std::fs::remove_dir_all(&dir);
    let run = result?;
    removed.with_context(|| format!("removing {}", dir.display()))?;
    Ok(run)
}

/// Runs the benchmark `runs` times.
pub async fn scheduler(pods: usize, nodes: usize, runs: usize) -> anyhow::Result<SchedulerReport> {
    let mut report = SchedulerReport { pods, nodes, runs: Vec::new() };
    for run in 0..runs.max(1) {
        let measured =
            one_run(pods, nodes.max(1), run).await.with_context(|| format!("run {run}"))?;
        eprintln!(
            "run {}/{}: scheduled {} pods in {:.3}s (floor {:.3}s)",
            run + 1,
            runs,
            pods,
            measured.scheduled.as_secs_f64(),
            measured.floor.as_secs_f64()
        );
        report.runs.push(measured);
    }
    Ok(report)
}
