//! The horizontal pod autoscaler controller: every sync period (15 s, Kubernetes'
//! `--horizontal-pod-autoscaler-sync-period`) each HorizontalPodAutoscaler's target is scaled
//! through its scale (the replica count of a Deployment or ReplicaSet) from its pods' resource
//! usage, with Kubernetes' algorithm:
//!
//! - the usage ratio is the pods' total usage over their total requests, divided by the target
//!   utilization; within the tolerance (10 %) of 1 nothing changes, otherwise the proposal is
//!   `ceil(ratio × pods)`;
//! - pods that are being deleted or failed are left out; pending or not-yet-ready pods (and,
//!   for CPU, samples taken before a pod turned ready) count as using nothing when scaling up
//!   and are left out otherwise; pods without metrics count as using their whole request when
//!   scaling down and nothing when scaling up; a proposal that these assumptions turn around
//!   or bring within the tolerance keeps the current count;
//! - the highest recommendation of the downscale stabilization window (5 min) wins, so a dip
//!   does not scale down at once; growth is limited to `max(2 × current, 4)` per sync; the
//!   result stays within `minReplicas` and `maxReplicas`;
//! - a target scaled to zero by hand is left alone (`ScalingActive=False/ScalingDisabled`).
//!
//! Status carries the current and desired replicas, the current utilization per metric and
//! Kubernetes' conditions (AbleToScale, ScalingActive, ScalingLimited). Metrics come from the
//! API server's in-memory resource metrics (see [`crate::api::metrics`]). Resource metrics
//! with Utilization targets are computed; other metric sources and targets are reported as
//! not supported. `spec.behavior` is honoured for its stabilization windows only; its rate
//! policies are not applied.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        autoscaling::v2::{
            HorizontalPodAutoscaler, HorizontalPodAutoscalerCondition,
            HorizontalPodAutoscalerStatus, MetricSpec, MetricStatus, MetricValueStatus,
            ResourceMetricStatus,
        },
        core::v1::Pod,
    },
    apimachinery::pkg::api::resource::Quantity,
    jiff::{SignedDuration, Timestamp},
};
use tokio::time::Instant;

use super::{ObjectCache, Reconciler};
use crate::{
    api::{
        Registry,
        error::ApiError,
        kind::{ScaleState, Strategy},
        kinds::{
            horizontal_pod_autoscaler::HorizontalPodAutoscalerStrategy,
            pod::{PHASE_FAILED, PHASE_PENDING, PodStrategy, phase},
        },
        metrics::PodMetrics,
        quantity,
        selectors::LabelSelector,
        typed::{TypedKind, UpdateMode, current_time, now_timestamp},
    },
    events::EventRecorder,
};

/// Kubernetes' `--horizontal-pod-autoscaler-cpu-initialization-period`.
const CPU_INITIALIZATION_PERIOD: Duration = Duration::from_secs(300);
/// Kubernetes' `--horizontal-pod-autoscaler-initial-readiness-delay`.
const INITIAL_READINESS_DELAY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
pub struct AutoscalerConfig {
    /// How often each autoscaler is evaluated.
    pub sync_period: Duration,
    /// Usage ratios within `1 ± tolerance` do not change the replica count.
    pub tolerance: f64,
    /// How long recommendations are remembered for scaling down (the highest wins).
    pub downscale_stabilization: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            sync_period: Duration::from_secs(15),
            tolerance: 0.1,
            downscale_stabilization: Duration::from_secs(300),
        }
    }
}

/// What the replica calculation knows about one pod of the target.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    pub name: String,
    /// Being deleted, or failed: left out.
    pub gone: bool,
    pub pending: bool,
    /// The Ready condition: its status and when it last changed.
    pub ready: Option<(bool, Timestamp)>,
    pub start_time: Option<Timestamp>,
    /// The pod's usage of the resource (millicores or bytes), with the end and length of
    /// the window it was measured over.
    pub usage: Option<(f64, Timestamp, Duration)>,
    /// The pod's total request of the resource; `None` when a container requests none.
    pub request: Option<f64>,
}

/// The outcome of one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub replicas: i32,
    /// The current utilization, in percent of the requests.
    pub utilization: i32,
    /// The pods' mean usage (millicores or bytes).
    pub average: f64,
}

/// Whether a CPU sample of a pod is to be ignored as the pod's start-up (Kubernetes'
/// `groupPods`).
fn unready_for_cpu(
    pod: &PodSample,
    sample_end: Timestamp,
    window: Duration,
    now: Timestamp,
) -> bool {
    let (Some((ready, transition)), Some(start)) = (pod.ready, pod.start_time) else {
        return true;
    };
    let add = |t: Timestamp, d: Duration| {
        t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)).unwrap_or(t)
    };
    if add(start, CPU_INITIALIZATION_PERIOD) > now {
        !ready || sample_end < add(transition, window)
    } else {
        !ready && add(start, INITIAL_READINESS_DELAY) > transition
    }
}

/// Kubernetes' `GetResourceReplicas` for a Utilization target.
pub fn resource_replicas(
    current: i32,
    pods: &[PodSample],
    target_utilization: i32,
    tolerance: f64,
    cpu: bool,
    now: Timestamp,
) -> Result<Proposal, String> {
    if pods.is_empty() {
        return Err("no pods returned by selector while calculating replica count".to_owned());
    }
    let mut ready_count = 0usize;
    let mut unready = Vec::new();
    let mut missing = Vec::new();
    let mut usage: BTreeMap<&str, f64> = BTreeMap::new();
    for pod in pods {
        if pod.gone {
            continue;
        }
        if pod.pending {
            unready.push(pod);
            continue;
        }
        let Some((value, sample_end, window)) = pod.usage else {
            missing.push(pod);
            continue;
        };
        if cpu && unready_for_cpu(pod, sample_end, window, now) {
            unready.push(pod);
            continue;
        }
        ready_count += 1;
        usage.insert(&pod.name, value);
    }
    if usage.is_empty() {
        return Err("did not receive metrics for targeted pods (pods might be unready)".to_owned());
    }
    let requests: HashMap<&str, f64> = pods
        .iter()
        .filter(|p| !p.gone)
        .map(|p| p.request.map(|r| (p.name.as_str(), r)).ok_or_else(|| p.name.clone()))
        .collect::<Result<_, _>>()
        .map_err(|pod| format!("missing request for the resource in pod {pod}"))?;
    let ratio = |usage: &BTreeMap<&str, f64>| -> Result<(f64, i32, f64), String> {
        let (mut used, mut requested, mut counted) = (0.0, 0.0, 0usize);
        for (name, value) in usage {
            if let Some(request) = requests.get(name) {
                used += value;
                requested += request;
                counted += 1;
            }
        }
        if counted == 0 || requested <= 0.0 {
            return Err("no metrics returned matched known pods".to_owned());
        }
        // Kubernetes truncates the utilization to a whole percentage before the ratio.
        let utilization = ((used * 100.0) / requested) as i32;
        Ok((
            f64::from(utilization) / f64::from(target_utilization),
            utilization,
            used / counted as f64,
        ))
    };
    let (usage_ratio, utilization, average) = ratio(&usage)?;
    let proposal = |replicas| Proposal { replicas, utilization, average };
    let scale_up_with_unready = !unready.is_empty() && usage_ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - usage_ratio).abs() <= tolerance {
            return Ok(proposal(current));
        }
        return Ok(proposal((usage_ratio * ready_count as f64).ceil() as i32));
    }
    let mut assumed = usage.clone();
    for pod in &missing {
        if usage_ratio < 1.0 {
            // Scaling down: a pod without metrics may use its whole request (or the target,
            // when that is above 100 %).
            let fallback = f64::from(target_utilization.max(100)) / 100.0;
            assumed.insert(
                &pod.name,
                requests.get(pod.name.as_str()).copied().unwrap_or(0.0) * fallback,
            );
        } else if usage_ratio > 1.0 {
            assumed.insert(&pod.name, 0.0);
        }
    }
    if scale_up_with_unready {
        for pod in &unready {
            assumed.insert(&pod.name, 0.0);
        }
    }
    let (new_ratio, _, _) = ratio(&assumed)?;
    if (1.0 - new_ratio).abs() <= tolerance
        || (usage_ratio < 1.0 && new_ratio > 1.0)
        || (usage_ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok(proposal(current));
    }
    let replicas = (new_ratio * assumed.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(proposal(current));
    }
    Ok(proposal(replicas))
}

/// Kubernetes' `convertDesiredReplicasWithRules`: the count within the limits, with the
/// ScalingLimited reason and message.
fn limit_replicas(
    current: i32,
    desired: i32,
    min: i32,
    max: i32,
) -> (i32, &'static str, &'static str) {
    let scale_up_limit = (2 * current).max(4);
    let (maximum, reason, message) = if max > scale_up_limit {
        (
            scale_up_limit,
            "ScaleUpLimit",
            "the desired replica count is increasing faster than the maximum scale rate",
        )
    } else {
        (max, "TooManyReplicas", "the desired replica count is more than the maximum replica count")
    };
    if desired < min {
        return (
            min,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        );
    }
    if desired > maximum {
        return (maximum, reason, message);
    }
    (desired, "DesiredWithinRange", "the desired count is within the acceptable range")
}

/// The recommendations of one autoscaler over its stabilization windows.
#[derive(Debug, Default)]
struct Recommendations {
    recent: Vec<(Instant, i32)>,
}

impl Recommendations {
    /// Records `proposal` and returns the stabilized count: the highest of the downscale
    /// window's recommendations (a scale-down waits until the window agrees), and, with an
    /// upscale window, the lowest of that window's (a scale-up waits likewise).
    fn stabilize(&mut self, proposal: i32, current: i32, down: Duration, up: Duration) -> i32 {
        let now = Instant::now();
        let keep = down.max(up);
        self.recent.retain(|(at, _)| now.duration_since(*at) <= keep);
        self.recent.push((now, proposal));
        let within = |window: Duration| {
            self.recent
                .iter()
                .filter(move |(at, _)| now.duration_since(*at) <= window)
                .map(|(_, r)| *r)
        };
        let highest = within(down).max().unwrap_or(proposal);
        let lowest = within(up).min().unwrap_or(proposal);
        if proposal < current {
            highest.min(current)
        } else if proposal > current && !up.is_zero() {
            lowest.max(current)
        } else {
            proposal
        }
    }
}

fn set_condition(
    status: &mut HorizontalPodAutoscalerStatus,
    previous: Option<&HorizontalPodAutoscalerStatus>,
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
) {
    let wanted = if ok { "True" } else { "False" };
    let transition = previous
        .and_then(|p| p.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == kind))
        .filter(|c| c.status == wanted)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(current_time);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    conditions.retain(|c| c.type_ != kind);
    conditions.push(HorizontalPodAutoscalerCondition {
        type_: kind.to_owned(),
        status: wanted.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_transition_time: Some(transition),
    });
}

/// A pod's total request of `resource` (`None` when a container has none), in millicores for
/// CPU and bytes otherwise.
fn pod_request(pod: &Pod, resource: &str, scale: f64) -> Option<f64> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    if containers.is_empty() {
        return None;
    }
    containers
        .iter()
        .map(|c| {
            let requests = c.resources.as_ref()?.requests.as_ref()?;
            quantity::value(&requests.get(resource)?.0).map(|v| v * scale)
        })
        .sum()
}

fn sample_of(pod: &Pod, metrics: Option<&PodMetrics>, resource: &str, scale: f64) -> PodSample {
    // Metrics of an earlier pod of the same name (its node has not reported since) are not
    // this pod's.
    let metrics = metrics.filter(|m| match (&m.metadata.uid, &pod.metadata.uid) {
        (Some(measured), Some(uid)) => measured == uid,
        _ => true,
    });
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| {
            let at = c.last_transition_time.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0);
            (c.status == "True", at)
        });
    let usage = metrics.map(|m| {
        let total: f64 = m
            .containers
            .iter()
            .filter_map(|c| quantity::value(&c.usage.get(resource)?.0))
            .sum::<f64>()
            * scale;
        let end = m.timestamp.as_ref().map_or_else(now_timestamp, |t| t.0);
        let window = m
            .window
            .strip_suffix('s')
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or_default();
        (total, end, window)
    });
    PodSample {
        name: pod.metadata.name.clone().unwrap_or_default(),
        gone: pod.metadata.deletion_timestamp.is_some() || phase(pod) == PHASE_FAILED,
        pending: phase(pod) == PHASE_PENDING,
        ready,
        start_time: status.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
        usage,
        request: pod_request(pod, resource, scale),
    }
}

pub struct HorizontalPodAutoscalerController {
    registry: Arc<Registry>,
    config: AutoscalerConfig,
    events: EventRecorder,
    autoscalers: ObjectCache<HorizontalPodAutoscalerStrategy>,
    pods: ObjectCache<PodStrategy>,
    /// Per autoscaler uid: its recommendations, and its next sync with the generation synced.
    recommendations: HashMap<String, Recommendations>,
    synced: HashMap<String, (Instant, Option<i64>)>,
    wake_at: Option<Instant>,
}

impl HorizontalPodAutoscalerController {
    pub fn new(registry: Arc<Registry>, config: AutoscalerConfig) -> Self {
        Self {
            events: EventRecorder::spawn(Arc::clone(&registry.events), "horizontal-pod-autoscaler"),
            autoscalers: ObjectCache::new(Arc::clone(&registry.horizontal_pod_autoscalers)),
            pods: ObjectCache::new(Arc::clone(&registry.pods)),
            registry,
            config,
            recommendations: HashMap::new(),
            synced: HashMap::new(),
            wake_at: None,
        }
    }
}

/// Reads the scale of a target of kind `S`.
async fn read_scale<S: Strategy>(
    kind: &TypedKind<S>,
    namespace: &str,
    name: &str,
) -> Result<ScaleState, ApiError> {
    let object = kind.get(Some(namespace), name).await?;
    kind.strategy().scale(&object).ok_or(ApiError::UnknownPath)
}

/// Sets the replica count of a target of kind `S` (what a write of its `/scale` does).
async fn write_replicas<S: Strategy>(
    kind: &TypedKind<S>,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<(), ApiError> {
    kind.update(Some(namespace), name, UpdateMode::Main, false, |current| {
        let mut scaled = current.clone();
        kind.strategy().set_replicas(&mut scaled, replicas);
        Ok(scaled)
    })
    .await
    .map(|_| ())
}

/// The scale of the autoscaler's target (Deployments and ReplicaSets of `apps`).
async fn target_scale(
    registry: &Registry,
    namespace: &str,
    hpa: &HorizontalPodAutoscaler,
) -> Result<ScaleState, String> {
    let reference = hpa.spec.as_ref().map(|s| s.scale_target_ref.clone()).unwrap_or_default();
    let group =
        reference.api_version.as_deref().unwrap_or("apps/v1").split('/').next().unwrap_or("");
    let read = match (group, reference.kind.as_str()) {
        ("apps", "Deployment") => {
            read_scale(&registry.deployments, namespace, &reference.name).await
        }
        ("apps", "ReplicaSet") => {
            read_scale(&registry.replica_sets, namespace, &reference.name).await
        }
        (_, kind) => return Err(format!("{kind} in {group} has no scale served by strait")),
    };
    read.map_err(|e| e.to_string())
}

/// Sets the replica count of the autoscaler's target (whose scale was just read).
async fn scale_target(
    registry: &Registry,
    namespace: &str,
    hpa: &HorizontalPodAutoscaler,
    replicas: i32,
) -> Result<(), ApiError> {
    let reference = hpa.spec.as_ref().map(|s| s.scale_target_ref.clone()).unwrap_or_default();
    match reference.kind.as_str() {
        "Deployment" => {
            write_replicas(&registry.deployments, namespace, &reference.name, replicas).await
        }
        _ => write_replicas(&registry.replica_sets, namespace, &reference.name, replicas).await,
    }
}

/// Writes the autoscaler's status when it changed.
async fn write_status(
    registry: &Registry,
    namespace: &str,
    name: &str,
    hpa: &HorizontalPodAutoscaler,
    status: HorizontalPodAutoscalerStatus,
) -> Result<(), ApiError> {
    if hpa.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let written = registry
        .horizontal_pod_autoscalers
        .update(Some(namespace), name, UpdateMode::Status, false, |current| {
            let mut updated = current.clone();
            updated.status = Some(status.clone());
            Ok(updated)
        })
        .await;
    match written {
        Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

impl HorizontalPodAutoscalerController {
    /// The proposal of one metric, with its status entry.
    fn metric_proposal(
        &self,
        current: i32,
        metric: &MetricSpec,
        pods: &[&Pod],
        metrics: &HashMap<String, &PodMetrics>,
    ) -> Result<(Proposal, MetricStatus, String), String> {
        let resource = metric
            .resource
            .as_ref()
            .filter(|_| metric.type_ == "Resource")
            .ok_or_else(|| format!("the {} metric source is not supported", metric.type_))?;
        let Some(target) =
            resource.target.average_utilization.filter(|_| resource.target.type_ == "Utilization")
        else {
            return Err(format!(
                "the {} target of resource {} is not supported (Utilization is)",
                resource.target.type_, resource.name
            ));
        };
        let (cpu, scale) = match resource.name.as_str() {
            "cpu" => (true, 1000.0),
            _ => (false, 1.0),
        };
        let samples: Vec<PodSample> = pods
            .iter()
            .map(|p| {
                let name = p.metadata.name.as_deref().unwrap_or_default();
                sample_of(p, metrics.get(name).copied(), &resource.name, scale)
            })
            .collect();
        let proposal = resource_replicas(
            current,
            &samples,
            target,
            self.config.tolerance,
            cpu,
            now_timestamp(),
        )
        .map_err(|e| format!("failed to get {} utilization: {e}", resource.name))?;
        let average = if cpu {
            Quantity(format!("{}m", proposal.average.round() as i64))
        } else {
            Quantity(format!("{}", proposal.average.round() as i64))
        };
        let status = MetricStatus {
            type_: "Resource".to_owned(),
            resource: Some(ResourceMetricStatus {
                name: resource.name.clone(),
                current: MetricValueStatus {
                    average_utilization: Some(proposal.utilization),
                    average_value: Some(average),
                    value: None,
                },
            }),
            ..MetricStatus::default()
        };
        Ok((
            proposal,
            status,
            format!("{} resource utilization (percentage of request)", resource.name),
        ))
    }

    /// One evaluation of one autoscaler: scales its target if needed and writes its status.
    async fn sync(&mut self, hpa: &HorizontalPodAutoscaler) -> Result<(), ApiError> {
        let namespace = hpa.metadata.namespace.clone().unwrap_or_default();
        let name = hpa.metadata.name.clone().unwrap_or_default();
        let uid = hpa.metadata.uid.clone().unwrap_or_default();
        let spec = hpa.spec.clone().unwrap_or_default();
        let previous = hpa.status.as_ref();
        let min = spec.min_replicas.unwrap_or(1);
        let max = spec.max_replicas;
        let mut status = HorizontalPodAutoscalerStatus {
            observed_generation: hpa.metadata.generation,
            last_scale_time: previous.and_then(|p| p.last_scale_time.clone()),
            conditions: previous.and_then(|p| p.conditions.clone()),
            current_metrics: previous.and_then(|p| p.current_metrics.clone()),
            ..HorizontalPodAutoscalerStatus::default()
        };
        let scale = match target_scale(&self.registry, &namespace, hpa).await {
            Ok(scale) => scale,
            Err(why) => {
                set_condition(
                    &mut status,
                    previous,
                    "AbleToScale",
                    false,
                    "FailedGetScale",
                    format!(
                        "the HPA controller was unable to get the target's current scale: {why}"
                    ),
                );
                status.current_replicas = previous.and_then(|p| p.current_replicas);
                status.desired_replicas = previous.map_or(0, |p| p.desired_replicas);
                self.events.warning(hpa, "FailedGetScale", why);
                return write_status(&self.registry, &namespace, &name, hpa, status).await;
            }
        };
        let current = scale.spec_replicas;
        status.current_replicas = Some(current);
        // Kubernetes' condition once the scale is read; what follows may say more.
        set_condition(
            &mut status,
            previous,
            "AbleToScale",
            true,
            "SucceededGetScale",
            "the HPA controller was able to get the target's current scale".to_owned(),
        );
        let mut desired = current;
        let mut rescale_reason = String::new();
        if current == 0 && min != 0 {
            set_condition(
                &mut status,
                previous,
                "ScalingActive",
                false,
                "ScalingDisabled",
                "scaling is disabled since the replica count of the target is zero".to_owned(),
            );
        } else if current > max {
            desired = max;
            rescale_reason = "Current number of replicas above Spec.MaxReplicas".to_owned();
        } else if current < min {
            desired = min;
            rescale_reason = "Current number of replicas below Spec.MinReplicas".to_owned();
        } else {
            let selector = LabelSelector::parse(&scale.selector).unwrap_or_default();
            let prefix = self.registry.pods.strategy().info().collection_prefix(Some(&namespace));
            let pods: Vec<&Pod> = self
                .pods
                .under(prefix)
                .filter(|p| {
                    !scale.selector.is_empty() && selector.matches(p.metadata.labels.as_ref())
                })
                .collect();
            let pod_metrics = self.registry.metrics.pods(Some(&namespace));
            let by_name: HashMap<String, &PodMetrics> =
                pod_metrics.iter().filter_map(|m| Some((m.metadata.name.clone()?, m))).collect();
            let mut best: Option<(i32, String)> = None;
            let mut statuses = Vec::new();
            let mut failures = Vec::new();
            for metric in spec.metrics.iter().flatten() {
                match self.metric_proposal(current, metric, &pods, &by_name) {
                    Ok((proposal, metric_status, metric_name)) => {
                        statuses.push(metric_status);
                        if best.as_ref().is_none_or(|(r, _)| proposal.replicas > *r) {
                            best = Some((proposal.replicas, metric_name));
                        }
                    }
                    Err(why) => {
                        let reason = match metric.type_.as_str() {
                            "Resource" => "FailedGetResourceMetric",
                            "ContainerResource" => "FailedGetContainerResourceMetric",
                            "Pods" => "FailedGetPodsMetric",
                            "Object" => "FailedGetObjectMetric",
                            _ => "FailedGetExternalMetric",
                        };
                        self.events.warning(hpa, reason, why.clone());
                        failures.push(why);
                    }
                }
            }
            let metric_count = failures.len() + statuses.len();
            status.current_metrics = (!statuses.is_empty()).then_some(statuses);
            let Some((proposal, metric_name)) = best else {
                let first = failures.first().cloned().unwrap_or_else(|| "no metrics".to_owned());
                let why = failures.join("; ");
                set_condition(
                    &mut status,
                    previous,
                    "ScalingActive",
                    false,
                    "FailedGetResourceMetric",
                    format!("the HPA was unable to compute the replica count: {why}"),
                );
                status.desired_replicas = previous.map_or(current, |p| p.desired_replicas);
                self.events.warning(
                    hpa,
                    "FailedComputeMetricsReplicas",
                    format!(
                        "invalid metrics ({} invalid out of {metric_count}), first error is: {first}",
                        failures.len()
                    ),
                );
                return write_status(&self.registry, &namespace, &name, hpa, status).await;
            };
            set_condition(
                &mut status,
                previous,
                "ScalingActive",
                true,
                "ValidMetricFound",
                format!(
                    "the HPA was able to successfully calculate a replica count from {metric_name}"
                ),
            );
            desired = proposal;
            if desired > current {
                rescale_reason = format!("{metric_name} above target");
            } else if desired < current {
                rescale_reason = "All metrics below target".to_owned();
            }
            let behavior = spec.behavior.as_ref();
            let window = |rules: Option<&k8s_openapi::api::autoscaling::v2::HPAScalingRules>,
                          default: Duration| {
                rules
                    .and_then(|r| r.stabilization_window_seconds)
                    .map_or(default, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            };
            let down = window(
                behavior.and_then(|b| b.scale_down.as_ref()),
                self.config.downscale_stabilization,
            );
            let up = window(behavior.and_then(|b| b.scale_up.as_ref()), Duration::ZERO);
            let stabilized = self
                .recommendations
                .entry(uid.clone())
                .or_default()
                .stabilize(desired, current, down, up);
            if stabilized != desired {
                set_condition(&mut status, previous, "AbleToScale", true, "ScaleDownStabilized",
                    "recent recommendations were higher than current one, applying the highest recent recommendation".to_owned());
            } else {
                set_condition(
                    &mut status,
                    previous,
                    "AbleToScale",
                    true,
                    "ReadyForNewScale",
                    "recommended size matches current size".to_owned(),
                );
            }
            let (limited, reason, message) = limit_replicas(current, stabilized, min, max);
            set_condition(
                &mut status,
                previous,
                "ScalingLimited",
                limited != stabilized,
                reason,
                message.to_owned(),
            );
            desired = limited;
        }
        if desired != current {
            match scale_target(&self.registry, &namespace, hpa, desired).await {
                Ok(()) => {
                    set_condition(
                        &mut status,
                        previous,
                        "AbleToScale",
                        true,
                        "SucceededRescale",
                        format!(
                            "the HPA controller was able to update the target scale to {desired}"
                        ),
                    );
                    status.last_scale_time = Some(current_time());
                    tracing::info!(
                        namespace,
                        autoscaler = name,
                        from = current,
                        to = desired,
                        reason = rescale_reason,
                        "rescaled"
                    );
                    self.events.normal(
                        hpa,
                        "SuccessfulRescale",
                        format!("New size: {desired}; reason: {rescale_reason}"),
                    );
                }
                Err(error) => {
                    set_condition(
                        &mut status,
                        previous,
                        "AbleToScale",
                        false,
                        "FailedUpdateScale",
                        format!(
                            "the HPA controller was unable to update the target scale: {error}"
                        ),
                    );
                    self.events.warning(
                        hpa,
                        "FailedRescale",
                        format!("New size: {desired}; reason: {rescale_reason}; error: {error}"),
                    );
                    desired = current;
                }
            }
        }
        status.desired_replicas = desired;
        write_status(&self.registry, &namespace, &name, hpa, status).await
    }
}

#[async_trait]
impl Reconciler for HorizontalPodAutoscalerController {
    fn name(&self) -> &'static str {
        "horizontal-pod-autoscaler"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.autoscalers.resync().await?;
        self.pods.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        let wake = self.wake_at;
        let timer = async move {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.autoscalers.next_change() => changed,
            changed = self.pods.next_change() => changed,
            () = timer => Ok(()),
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.autoscalers.drain_ready().await?;
        self.pods.drain_ready().await
    }

    /// Syncs the autoscalers whose period came round or whose spec changed; the pods' changes
    /// only refresh the cache (they are read at the next sync).
    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let now = Instant::now();
        let autoscalers: Vec<HorizontalPodAutoscaler> = self
            .autoscalers
            .objects()
            .filter(|a| a.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        let live: std::collections::HashSet<String> =
            autoscalers.iter().filter_map(|a| a.metadata.uid.clone()).collect();
        self.synced.retain(|uid, _| live.contains(uid));
        self.recommendations.retain(|uid, _| live.contains(uid));
        let mut first_error = None;
        let mut wake: Option<Instant> = None;
        for hpa in &autoscalers {
            let uid = hpa.metadata.uid.clone().unwrap_or_default();
            let due = match self.synced.get(&uid) {
                Some((next, generation)) => *next <= now || *generation != hpa.metadata.generation,
                None => true,
            };
            if due {
                if let Err(error) = self.sync(hpa).await {
                    first_error.get_or_insert(error);
                }
                self.synced
                    .insert(uid.clone(), (now + self.config.sync_period, hpa.metadata.generation));
            }
            if let Some((next, _)) = self.synced.get(&uid) {
                wake = Some(wake.map_or(*next, |w| w.min(*next)));
            }
        }
        self.wake_at = wake;
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::Timestamp;

    use k8s_openapi::{
        api::core::v1::{Container, Pod, PodSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::{PodSample, Recommendations, limit_replicas, resource_replicas, sample_of};
    use crate::api::metrics::{ContainerMetrics, PodMetrics, cpu_quantity};

    #[test]
    fn metrics_of_an_earlier_pod_of_the_same_name_are_not_the_pods() {
        let meta = |uid: &str| ObjectMeta {
            name: Some("web-0".to_owned()),
            uid: Some(uid.to_owned()),
            ..ObjectMeta::default()
        };
        let pod = Pod {
            metadata: meta("new"),
            spec: Some(PodSpec {
                containers: vec![Container { name: "web".to_owned(), ..Container::default() }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let measured = |uid: &str| PodMetrics {
            metadata: meta(uid),
            window: "1s".to_owned(),
            containers: vec![ContainerMetrics {
                name: "web".to_owned(),
                usage: [("cpu".to_owned(), cpu_quantity(0.25))].into(),
            }],
            ..PodMetrics::default()
        };
        let own = sample_of(&pod, Some(&measured("new")), "cpu", 1000.0);
        assert_eq!(own.usage.map(|(millicores, _, _)| millicores.round()), Some(250.0));
        let earlier = sample_of(&pod, Some(&measured("old")), "cpu", 1000.0);
        assert_eq!(earlier.usage, None, "the earlier pod's usage");
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    const NOW: &str = "2026-01-01T01:00:00Z";

    /// A ready pod started long ago, using `usage` millicores of `request`.
    fn pod(name: &str, usage: Option<f64>, request: f64) -> PodSample {
        PodSample {
            name: name.to_owned(),
            gone: false,
            pending: false,
            ready: Some((true, at("2026-01-01T00:00:00Z"))),
            start_time: Some(at("2026-01-01T00:00:00Z")),
            usage: usage.map(|u| (u, at(NOW), Duration::from_secs(15))),
            request: Some(request),
        }
    }

    fn replicas(current: i32, pods: &[PodSample], target: i32) -> i32 {
        resource_replicas(current, pods, target, 0.1, true, at(NOW)).unwrap().replicas
    }

    #[test]
    fn desired_is_the_ceiling_of_current_times_usage_over_target_outside_the_tolerance() {
        // Two pods at 90 % of 100m against a 50 % target: ratio 1.8 → ceil(3.6) = 4.
        let busy = [pod("a", Some(90.0), 100.0), pod("b", Some(90.0), 100.0)];
        assert_eq!(replicas(2, &busy, 50), 4);
        let proposal = resource_replicas(2, &busy, 50, 0.1, true, at(NOW)).unwrap();
        assert_eq!((proposal.utilization, proposal.average), (90, 90.0));
        // 54 % against 50 %: within the 10 % tolerance, nothing changes.
        let near = [pod("a", Some(54.0), 100.0), pod("b", Some(54.0), 100.0)];
        assert_eq!(replicas(2, &near, 50), 2);
        // 10 % against 50 %: ratio 0.2 → ceil(0.4) = 1.
        let idle = [pod("a", Some(10.0), 100.0), pod("b", Some(10.0), 100.0)];
        assert_eq!(replicas(2, &idle, 50), 1);
    }

    #[test]
    fn missing_metrics_and_unready_pods_are_assumed_against_the_direction_of_scaling() {
        // Scaling up: the pod without metrics counts as idle, 2 × 100 % / 3 = 66 %, ratio 1.33
        // → ceil(1.33 × 3) = 4.
        let up =
            [pod("a", Some(100.0), 100.0), pod("b", Some(100.0), 100.0), pod("c", None, 100.0)];
        assert_eq!(replicas(3, &up, 50), 4);
        // Scaling down: it counts as using all its request: (10 + 10 + 100) / 3 = 40 %, ratio
        // 0.8 → ceil(2.4) = 3 = current.
        let down =
            [pod("a", Some(10.0), 100.0), pod("b", Some(10.0), 100.0), pod("c", None, 100.0)];
        assert_eq!(replicas(3, &down, 50), 3);
        // An unready pod counts as idle when scaling up.
        let mut unready = pod("c", Some(500.0), 100.0);
        unready.ready = Some((false, at("2026-01-01T00:59:00Z")));
        unready.start_time = Some(at("2026-01-01T00:58:00Z"));
        let with_unready = [pod("a", Some(80.0), 100.0), pod("b", Some(80.0), 100.0), unready];
        // 160/300 = 53 %, ratio 1.06 within tolerance after the assumption: stays 3.
        assert_eq!(replicas(3, &with_unready, 50), 3);
        // Deleted pods do not count at all.
        let mut gone = pod("d", Some(1000.0), 100.0);
        gone.gone = true;
        assert_eq!(
            replicas(2, &[pod("a", Some(50.0), 100.0), pod("b", Some(50.0), 100.0), gone], 50),
            2
        );
    }

    #[test]
    fn a_cpu_sample_from_before_the_pod_turned_ready_is_ignored() {
        let mut fresh = pod("a", Some(900.0), 100.0);
        // Started two minutes ago, ready ten seconds ago, sampled over the last 15 s.
        fresh.start_time = Some(at("2026-01-01T00:58:00Z"));
        fresh.ready = Some((true, at("2026-01-01T00:59:50Z")));
        let error = resource_replicas(1, &[fresh], 50, 0.1, true, at(NOW)).unwrap_err();
        assert!(error.contains("did not receive metrics"), "{error}");
    }

    #[test]
    fn pods_without_requests_cannot_be_autoscaled_on_utilization() {
        let mut bare = pod("a", Some(10.0), 100.0);
        bare.request = None;
        let error = resource_replicas(1, &[bare], 50, 0.1, true, at(NOW)).unwrap_err();
        assert!(error.contains("missing request"), "{error}");
    }

    #[test]
    fn limits_cap_growth_and_keep_the_bounds() {
        assert_eq!(limit_replicas(1, 10, 1, 10).0, 4, "at most max(2 × current, 4)");
        assert_eq!(limit_replicas(1, 10, 1, 10).1, "ScaleUpLimit");
        assert_eq!(
            limit_replicas(4, 10, 1, 6),
            (
                6,
                "TooManyReplicas",
                "the desired replica count is more than the maximum replica count"
            )
        );
        assert_eq!(limit_replicas(3, 0, 2, 6).0, 2);
        assert_eq!(limit_replicas(3, 5, 2, 6).1, "DesiredWithinRange");
    }

    #[test]
    fn a_scale_down_waits_for_the_stabilization_window() {
        let mut recommendations = Recommendations::default();
        let window = Duration::from_secs(60);
        assert_eq!(recommendations.stabilize(5, 2, window, Duration::ZERO), 5, "up at once");
        assert_eq!(
            recommendations.stabilize(1, 5, window, Duration::ZERO),
            5,
            "the recent 5 holds"
        );
        let mut short = Recommendations::default();
        assert_eq!(short.stabilize(5, 2, Duration::ZERO, Duration::ZERO), 5);
        assert_eq!(
            short.stabilize(1, 5, Duration::ZERO, Duration::ZERO),
            1,
            "no window: down at once"
        );
    }
}
