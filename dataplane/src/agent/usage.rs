//! Resource usage of the node and its pods, reported to the API server's metrics API
//! (`metrics.k8s.io`, what `kubectl top` and the horizontal pod autoscaler read).
//!
//! Every interval the agent reads `cpu.stat` (`usage_usec`) and `memory.current` (where the
//! memory controller is not enabled, the resident memory of the processes) of its own cgroup
//! subtree (the node: agent and pods) and of each container's cgroup
//! (`<agent root>/pods/<uid>/<container>`); CPU is the usage delta over the time between two
//! readings, in cores. A container is reported from its second reading on, and again from
//! scratch when its counter went back (it was restarted in a new cgroup). One PUT per interval
//! carries everything: `PUT /apis/metrics.k8s.io/v1beta1/nodes/<node>`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use strait_controlplane::{
    api::metrics::{
        ContainerMetrics, NodeMetrics, NodeMetricsReport, PodMetrics, cpu_quantity,
        memory_quantity, window_text,
    },
    client::ApiClient,
};
use tokio::sync::watch;

use crate::{cgroup::Cgroup, runtime::PodRuntime};

/// One reading of a cgroup's CPU counter.
#[derive(Clone, Copy, Debug)]
struct Reading {
    usage_usec: u64,
    at: Instant,
}

/// The CPU rate of one cgroup between its last two readings.
#[derive(Debug, Default)]
pub struct CpuRates {
    last: HashMap<PathBuf, Reading>,
}

impl CpuRates {
    /// Records a reading and returns the rate since the previous one, in cores (`None` for a
    /// first reading, or after the counter went back).
    pub fn rate(&mut self, cgroup: PathBuf, usage_usec: u64, at: Instant) -> Option<f64> {
        let previous = self.last.insert(cgroup, Reading { usage_usec, at })?;
        let elapsed = at.checked_duration_since(previous.at)?.as_secs_f64();
        let used = usage_usec.checked_sub(previous.usage_usec)?;
        (elapsed > 0.0).then(|| used as f64 / 1e6 / elapsed)
    }

    /// Forgets the cgroups not read in the last pass (pods that are gone).
    pub fn retain(&mut self, seen: &std::collections::HashSet<PathBuf>) {
        self.last.retain(|path, _| seen.contains(path));
    }
}

/// What one pass reads: the node's and every running container's usage.
fn sample(
    rates: &mut CpuRates,
    node: &str,
    node_cgroup: &Cgroup,
    runtime: &PodRuntime,
    pods: &HashMap<String, Arc<Pod>>,
    window: Duration,
) -> NodeMetricsReport {
    let now = Instant::now();
    let timestamp = Some(Time(Timestamp::now()));
    let mut seen = std::collections::HashSet::new();
    let mut usage_of = |cgroup: &Cgroup| -> Option<
        BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    > {
        let usage_usec = cgroup.cpu_usage_usec().ok()?;
        seen.insert(cgroup.path().to_path_buf());
        let cores = rates.rate(cgroup.path().to_path_buf(), usage_usec, now)?;
        let mut usage = BTreeMap::from([("cpu".to_owned(), cpu_quantity(cores))]);
        // Without the memory controller (hybrid cgroup layouts), the processes' resident
        // memory: an approximation, but never a 0 that would look like an idle pod.
        let memory = match cgroup.memory_current() {
            Ok(Some(bytes)) => bytes,
            _ => cgroup.resident_memory().unwrap_or(0),
        };
        usage.insert("memory".to_owned(), memory_quantity(memory));
        Some(usage)
    };
    let node_usage = usage_of(node_cgroup).unwrap_or_default();
    let mut pod_metrics = Vec::new();
    for (uid, pod) in pods {
        let pod_cgroup = runtime.context().pod_cgroup(uid);
        if !pod_cgroup.exists() {
            continue;
        }
        let containers: Vec<ContainerMetrics> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .filter_map(|container| {
                let cgroup = pod_cgroup.child(&container.name);
                let usage = usage_of(&cgroup)?;
                Some(ContainerMetrics { name: container.name.clone(), usage })
            })
            .collect();
        if containers.is_empty() {
            continue;
        }
        pod_metrics.push(PodMetrics {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                uid: pod.metadata.uid.clone(),
                labels: pod.metadata.labels.clone(),
                ..ObjectMeta::default()
            },
            timestamp: timestamp.clone(),
            window: window_text(window),
            containers,
        });
    }
    rates.retain(&seen);
    NodeMetricsReport {
        node: NodeMetrics {
            metadata: ObjectMeta { name: Some(node.to_owned()), ..ObjectMeta::default() },
            timestamp,
            window: window_text(window),
            usage: node_usage,
        },
        pods: pod_metrics,
    }
}

/// Reads and reports usage every `interval` until the task is aborted.
pub async fn report_loop(
    api: ApiClient,
    node: String,
    node_cgroup: Cgroup,
    runtime: Arc<PodRuntime>,
    pods: watch::Receiver<HashMap<String, Arc<Pod>>>,
    interval: Duration,
) {
    let mut rates = CpuRates::default();
    let path = format!("/apis/metrics.k8s.io/v1beta1/nodes/{node}");
    let mut failing = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let snapshot = pods.borrow().clone();
        let report = sample(&mut rates, &node, &node_cgroup, &runtime, &snapshot, interval);
        let body = match serde_json::to_vec(&report) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot encode the usage report");
                continue;
            }
        };
        let sent = api.send(http::Method::PUT, &path, "application/json", Some(body)).await;
        match sent {
            Ok((status, _)) if status.is_success() => {
                if std::mem::take(&mut failing) {
                    tracing::info!("usage reports are accepted again");
                }
            }
            Ok((status, body)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%status, body = %String::from_utf8_lossy(&body), "the usage report was refused");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%error, "cannot send the usage report");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        time::{Duration, Instant},
    };

    use super::CpuRates;

    #[test]
    fn cpu_rates_are_deltas_over_time_and_restart_when_the_counter_goes_back() {
        let mut rates = CpuRates::default();
        let cgroup = PathBuf::from("/sys/fs/cgroup/strait/lab/node-1/pods/uid/web");
        let start = Instant::now();
        assert_eq!(rates.rate(cgroup.clone(), 1_000_000, start), None, "a first reading");
        let half_core = rates.rate(cgroup.clone(), 1_500_000, start + Duration::from_secs(1));
        assert!((half_core.unwrap() - 0.5).abs() < 1e-9, "{half_core:?}");
        assert_eq!(
            rates.rate(cgroup.clone(), 10, start + Duration::from_secs(2)),
            None,
            "a restarted container starts over"
        );
        let two = rates.rate(cgroup, 4_000_010, start + Duration::from_secs(4));
        assert!((two.unwrap() - 2.0).abs() < 1e-9, "{two:?}");
    }
}
