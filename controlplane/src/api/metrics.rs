//! The resource metrics API (`metrics.k8s.io/v1beta1`), what `kubectl top` and the horizontal
//! pod autoscaler read: NodeMetrics and PodMetrics, CPU and memory usage over a window.
//!
//! Kubernetes serves it from metrics-server, which scrapes every kubelet. Here the node agents
//! push instead (the API server cannot reach the nodes' addresses in a lab, and agents already
//! talk to it): every few seconds each agent sends `PUT /apis/metrics.k8s.io/v1beta1/nodes/
//! {node}` with a [`NodeMetricsReport`], its node's usage and its pods' (from each pod's and
//! container's cgroup `cpu.stat` deltas and `memory.current`). The API server keeps the last
//! report of every node in memory, never in the store: metrics are samples, not state, and a
//! store write per node every few seconds would wake every watcher. A report is served while
//! it is fresh (three windows, at least ten seconds), so a dead node's pods have no metrics.
//!
//! With several API server replicas, each keeps the reports its own agents' connections
//! brought: a replica answers with the nodes that report to it, and the autoscaler (on the
//! leader) sees the pods of those nodes; pods without metrics are treated as Kubernetes' HPA
//! treats missing metrics (conservatively).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::stream::BoxStream;
use k8s_openapi::{
    ClusterResourceScope, ListableResource, Metadata, NamespaceResourceScope, Resource,
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    error::ApiError,
    handler::{KindHandler, PageRequest, PatchBody, WatchEventOut, WriteOptions, Written},
    kind::{DeleteRequest, KindInfo},
    metadata::MetadataAccess,
    selectors::FieldSelector,
    table::{self, Column, ResponseFormat, Row},
    typed::{ListFilter, WatchStart},
    validation::NameRule,
};
use crate::store::Revision;

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";

/// A report stays served for this many of its windows…
const FRESH_WINDOWS: u32 = 3;
/// …and at least this long.
const MIN_FRESHNESS: Duration = Duration::from_secs(10);

/// Usage of one node over `window`, ending at `timestamp`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetrics {
    pub metadata: ObjectMeta,
    pub timestamp: Option<Time>,
    /// A Go duration (`15s`, `1.5s`).
    pub window: String,
    /// `cpu` (cores) and `memory` (bytes).
    pub usage: BTreeMap<String, Quantity>,
}

/// Usage of one pod's containers over `window`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMetrics {
    /// The pod's name, namespace and labels (what `kubectl top pod -l` selects on).
    pub metadata: ObjectMeta,
    pub timestamp: Option<Time>,
    pub window: String,
    pub containers: Vec<ContainerMetrics>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerMetrics {
    pub name: String,
    pub usage: BTreeMap<String, Quantity>,
}

/// What a node agent reports: its node's usage and that of the pods it runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetricsReport {
    #[serde(flatten)]
    pub node: NodeMetrics,
    #[serde(default)]
    pub pods: Vec<PodMetrics>,
}

macro_rules! metrics_resource {
    ($type:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl Resource for $type {
            const API_VERSION: &'static str = "metrics.k8s.io/v1beta1";
            const GROUP: &'static str = GROUP;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = VERSION;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl ListableResource for $type {
            const LIST_KIND: &'static str = concat!($kind, "List");
        }

        impl Metadata for $type {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

metrics_resource!(NodeMetrics, "NodeMetrics", "nodes", ClusterResourceScope);
metrics_resource!(PodMetrics, "PodMetrics", "pods", NamespaceResourceScope);

/// A window as Go prints a `time.Duration` (`15s`, `1.5s`).
pub fn window_text(window: Duration) -> String {
    let millis = window.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        let text = format!("{:.3}", window.as_secs_f64());
        format!("{}s", text.trim_end_matches('0'))
    }
}

/// A CPU rate in cores as metrics-server writes it: nanocores (`250000000n`).
pub fn cpu_quantity(cores: f64) -> Quantity {
    Quantity(format!("{}n", (cores.max(0.0) * 1e9).round() as u64))
}

/// Bytes as metrics-server writes them: kibibytes (`10240Ki`).
pub fn memory_quantity(bytes: u64) -> Quantity {
    Quantity(format!("{}Ki", bytes / 1024))
}

/// The CPU of a usage map, in cores.
pub fn cpu_cores(usage: &BTreeMap<String, Quantity>) -> Option<f64> {
    usage.get("cpu").and_then(|q| super::quantity::value(&q.0))
}

struct Received {
    report: NodeMetricsReport,
    at: Instant,
}

impl Received {
    fn is_fresh(&self, now: Instant) -> bool {
        let window = parse_window(&self.report.node.window).unwrap_or_default();
        now.duration_since(self.at) <= (window * FRESH_WINDOWS).max(MIN_FRESHNESS)
    }
}

fn parse_window(text: &str) -> Option<Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The last report of every node, in this API server's memory.
#[derive(Default)]
pub struct ResourceMetrics {
    reports: RwLock<HashMap<String, Received>>,
}

impl ResourceMetrics {
    /// Keeps `report` as its node's latest, in place of the previous one (pods that are gone
    /// from it are gone).
    pub fn record(&self, report: NodeMetricsReport) {
        let node = report.node.metadata.name.clone().unwrap_or_default();
        let received = Received { report, at: Instant::now() };
        if let Ok(mut reports) = self.reports.write() {
            reports.insert(node, received);
        }
    }

    fn fresh<T>(&self, mut pick: impl FnMut(&NodeMetricsReport) -> Vec<T>) -> Vec<T> {
        let now = Instant::now();
        let Ok(reports) = self.reports.read() else { return Vec::new() };
        let mut out = Vec::new();
        for received in reports.values().filter(|r| r.is_fresh(now)) {
            out.extend(pick(&received.report));
        }
        out
    }

    /// Every node with a fresh report, by name.
    pub fn nodes(&self) -> Vec<NodeMetrics> {
        let mut nodes = self.fresh(|r| vec![r.node.clone()]);
        nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        nodes
    }

    /// The pods of `namespace` (all with `None`) with fresh metrics, by namespace and name.
    pub fn pods(&self, namespace: Option<&str>) -> Vec<PodMetrics> {
        let mut pods = self.fresh(|r| {
            r.pods
                .iter()
                .filter(|p| namespace.is_none_or(|n| p.metadata.namespace.as_deref() == Some(n)))
                .cloned()
                .collect()
        });
        pods.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        pods
    }
}

const NODE_COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("CPU", "CPU usage"),
    Column::new("Memory", "Memory usage"),
    Column::new("Window", "The window the usage was measured over"),
];

const NODE_INFO: KindInfo = KindInfo {
    has_status: false,
    ..KindInfo::of::<NodeMetrics>("", false, &[], NameRule::Subdomain)
};
const POD_INFO: KindInfo = KindInfo {
    has_status: false,
    ..KindInfo::of::<PodMetrics>("", true, &[], NameRule::Subdomain)
};

/// `metrics.k8s.io` nodes or pods, read-only but for the agents' reports.
pub struct MetricsHandler {
    metrics: Arc<ResourceMetrics>,
    info: &'static KindInfo,
}

impl MetricsHandler {
    pub fn nodes(metrics: Arc<ResourceMetrics>) -> Self {
        Self { metrics, info: &NODE_INFO }
    }

    pub fn pods(metrics: Arc<ResourceMetrics>) -> Self {
        Self { metrics, info: &POD_INFO }
    }

    fn is_nodes(&self) -> bool {
        !self.info.namespaced
    }

    /// The objects of one namespace (or all) that pass `filter`, as JSON with their kind, and
    /// their table rows.
    fn select(&self, namespace: Option<&str>, filter: &ListFilter) -> Vec<(Value, Vec<Value>)> {
        let passes = |meta: &ObjectMeta| {
            filter.labels.matches(meta.labels.as_ref())
                && filter.fields.matches(|field| match field {
                    "metadata.name" => meta.name.clone().unwrap_or_default(),
                    "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                    _ => String::new(),
                })
        };
        let with_kind = |mut value: Value| {
            value["kind"] = self.info.kind.into();
            value["apiVersion"] = self.info.api_version().into();
            value
        };
        let usage = |usage: &BTreeMap<String, Quantity>, what: &str| -> Value {
            usage.get(what).map_or_else(|| "<unknown>".into(), |q| q.0.clone().into())
        };
        if self.is_nodes() {
            self.metrics
                .nodes()
                .into_iter()
                .filter(|n| passes(&n.metadata))
                .map(|n| {
                    let row = vec![
                        n.metadata.name.clone().unwrap_or_default().into(),
                        usage(&n.usage, "cpu"),
                        usage(&n.usage, "memory"),
                        n.window.clone().into(),
                    ];
                    (with_kind(serde_json::to_value(&n).unwrap_or_default()), row)
                })
                .collect()
        } else {
            self.metrics
                .pods(namespace)
                .into_iter()
                .filter(|p| passes(&p.metadata))
                .map(|p| {
                    let mut total: BTreeMap<String, f64> = BTreeMap::new();
                    for container in &p.containers {
                        for (resource, quantity) in &container.usage {
                            *total.entry(resource.clone()).or_default() +=
                                super::quantity::value(&quantity.0).unwrap_or(0.0);
                        }
                    }
                    let row = vec![
                        p.metadata.name.clone().unwrap_or_default().into(),
                        cpu_quantity(total.get("cpu").copied().unwrap_or(0.0)).0.into(),
                        memory_quantity(total.get("memory").copied().unwrap_or(0.0) as u64)
                            .0
                            .into(),
                        p.window.clone().into(),
                    ];
                    (with_kind(serde_json::to_value(&p).unwrap_or_default()), row)
                })
                .collect()
        }
    }

    fn render(&self, selected: Vec<(Value, Vec<Value>)>, format: ResponseFormat) -> Value {
        match format {
            ResponseFormat::Json => json!({
                "kind": self.info.list_kind(),
                "apiVersion": self.info.api_version(),
                "metadata": {},
                "items": selected.into_iter().map(|(object, _)| object).collect::<Vec<_>>(),
            }),
            ResponseFormat::Table { api_version, include_object } => {
                let rows =
                    selected.into_iter().map(|(object, cells)| Row { cells, object }).collect();
                table::build(api_version, NODE_COLUMNS, rows, None, include_object)
            }
        }
    }

    fn read_only() -> ApiError {
        ApiError::MethodNotAllowed
    }
}

#[async_trait]
impl KindHandler for MetricsHandler {
    fn info(&self) -> &KindInfo {
        self.info
    }

    fn check_field_selector(&self, fields: &FieldSelector) -> Result<(), ApiError> {
        match fields.fields().find(|f| !matches!(*f, "metadata.name" | "metadata.namespace")) {
            Some(field) => Err(ApiError::BadRequest(format!(
                "\"{field}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
            ))),
            None => Ok(()),
        }
    }

    async fn create(
        &self,
        _namespace: Option<&str>,
        _body: &[u8],
        _options: WriteOptions,
    ) -> Result<Written, ApiError> {
        Err(Self::read_only())
    }

    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        let filter = ListFilter {
            fields: FieldSelector::parse(&format!("metadata.name={name}"))
                .map_err(ApiError::BadRequest)?,
            ..ListFilter::default()
        };
        let selected = self.select(namespace, &filter);
        if selected.is_empty() {
            // As metrics-server words it: `podmetrics.metrics.k8s.io "default/web" not found`.
            return Err(match namespace {
                Some(namespace) => ApiError::NotFound {
                    resource: format!("podmetrics.{GROUP}"),
                    name: format!("{namespace}/{name}"),
                },
                None => ApiError::NotFound {
                    resource: format!("nodemetrics.{GROUP}"),
                    name: name.to_owned(),
                },
            });
        }
        Ok(match format {
            ResponseFormat::Json => selected.into_iter().next().map(|(o, _)| o).unwrap_or_default(),
            table @ ResponseFormat::Table { .. } => self.render(selected, table),
        })
    }

    async fn list(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
        _page: &PageRequest,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        // A list is a few objects per node, always answered whole.
        Ok(self.render(self.select(namespace, filter), format))
    }

    async fn watch(
        &self,
        _namespace: Option<&str>,
        _filter: ListFilter,
        _start: WatchStart,
        _format: ResponseFormat,
    ) -> Result<(Revision, BoxStream<'static, WatchEventOut>), ApiError> {
        Err(Self::read_only())
    }

    /// A node agent's report (`PUT …/nodes/{node}`), answered with the node's metrics.
    async fn replace(
        &self,
        _namespace: Option<&str>,
        name: &str,
        body: &[u8],
        status: bool,
        _options: WriteOptions,
    ) -> Result<Written, ApiError> {
        if !self.is_nodes() || status {
            return Err(Self::read_only());
        }
        let report: NodeMetricsReport = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("decoding the metrics report: {e}")))?;
        if report.node.metadata.name.as_deref() != Some(name) {
            return Err(ApiError::BadRequest(format!(
                "the report's node {:?} is not the node of the path ({name})",
                report.node.metadata.name.as_deref().unwrap_or_default()
            )));
        }
        let mut answer = serde_json::to_value(&report.node)
            .map_err(|e| ApiError::internal("encoding node metrics", e))?;
        answer["kind"] = self.info.kind.into();
        answer["apiVersion"] = self.info.api_version().into();
        self.metrics.record(report);
        Ok(Written { object: answer, created: false, warnings: Vec::new() })
    }

    async fn patch(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _patch: &PatchBody,
        _status: bool,
        _options: WriteOptions,
    ) -> Result<Written, ApiError> {
        Err(Self::read_only())
    }

    async fn delete(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _request: &DeleteRequest,
        _options: WriteOptions,
    ) -> Result<Value, ApiError> {
        Err(Self::read_only())
    }

    async fn post_subresource(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _subresource: &str,
        _body: &[u8],
    ) -> Result<Value, ApiError> {
        Err(ApiError::UnknownPath)
    }

    fn bookmark(&self, _revision: Revision, _format: ResponseFormat) -> Value {
        json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": {}})
    }

    fn metadata_access(&self) -> &dyn MetadataAccess {
        self
    }
}

/// Metrics are not stored objects: nothing to collect or delete with a namespace.
#[async_trait]
impl MetadataAccess for MetricsHandler {
    fn info(&self) -> &KindInfo {
        self.info
    }

    async fn list_metadata(&self, _namespace: Option<&str>) -> Result<Vec<ObjectMeta>, ApiError> {
        Ok(Vec::new())
    }

    async fn get_metadata(
        &self,
        _namespace: Option<&str>,
        _name: &str,
    ) -> Result<Option<ObjectMeta>, ApiError> {
        Ok(None)
    }

    async fn delete_object(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _request: &DeleteRequest,
    ) -> Result<(), ApiError> {
        Err(Self::read_only())
    }

    async fn update_metadata(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _uid: &str,
        _change: &(dyn for<'m> Fn(&'m mut ObjectMeta) + Send + Sync),
    ) -> Result<bool, ApiError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{cpu_quantity, memory_quantity, parse_window, window_text};

    #[test]
    fn quantities_and_windows_are_written_as_metrics_server_writes_them() {
        assert_eq!(cpu_quantity(0.25).0, "250000000n");
        assert_eq!(cpu_quantity(-1.0).0, "0n");
        assert_eq!(memory_quantity(10 * 1024 * 1024).0, "10240Ki");
        assert_eq!(window_text(Duration::from_secs(15)), "15s");
        assert_eq!(window_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(parse_window("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_window("15s"), Some(Duration::from_secs(15)));
    }
}
