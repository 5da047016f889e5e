//! CPU and memory limits through cgroup v2, where the node offers the controllers to strait.
//!
//! A container's limits go to its own cgroup (`cpu.max`, `memory.max`, and `cpu.weight` from
//! its CPU request); the pod's cgroup gets the sums when every container sets them, as the
//! kubelet's pod cgroups do. The `cpu` and `memory` controllers must be enabled in the
//! `cgroup.subtree_control` of every cgroup above: the agent enables them from `strait/` down
//! to its pods' cgroups when `strait/` has them. It never touches the cgroups above `strait/`
//! (the node's own): on a node whose cgroup v2 hierarchy does not offer a controller there (a
//! hybrid layout where cgroup v1 holds it, say), limits that need it are not enforced, and each
//! pod with such limits says so in a `strait.io/ResourceLimitsEnforced=False` condition and a
//! `LimitsNotEnforced` event.
//!
//! A container killed by the kernel for going over its memory limit is recognised by the
//! `oom_kill` counter of its cgroup's `memory.events` and reported with reason `OOMKilled`.

use std::{fs, io, path::Path};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use strait_controlplane::api::quantity;

use crate::cgroup::{Cgroup, STRAIT_CGROUP, cgroup2_mount};

/// The period of `cpu.max`, in microseconds (the kubelet's default CFS period).
const CPU_PERIOD_US: u64 = 100_000;
/// The pod condition that tells whether the pod's limits are enforced.
pub const LIMITS_CONDITION: &str = "strait.io/ResourceLimitsEnforced";

/// Which controllers strait's pod cgroups have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controllers {
    pub cpu: bool,
    pub memory: bool,
}

/// The limits of one cgroup, as they are written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `cpu.max`: `<quota> <period>`, or `None` for no limit.
    pub cpu_max: Option<String>,
    /// `cpu.weight` (1 to 10000).
    pub cpu_weight: Option<u64>,
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
}

impl CgroupLimits {
    pub fn is_empty(&self) -> bool {
        self.cpu_max.is_none() && self.cpu_weight.is_none() && self.memory_max.is_none()
    }
}

fn amount(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
    name: &str,
    scale: f64,
) -> Option<u64> {
    map?.get(name).and_then(|q| quantity::scaled(&q.0, scale)).filter(|v| *v > 0)
}

/// What a container asks for, in millicores and bytes.
#[derive(Clone, Copy, Debug)]
struct Asked {
    cpu_limit: Option<u64>,
    /// The limit when unset, as the API defaults it.
    cpu_request: Option<u64>,
    memory_limit: Option<u64>,
}

fn container_resources(container: &Container) -> Asked {
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let cpu_limit = amount(limits, "cpu", 1000.0);
    Asked {
        cpu_limit,
        cpu_request: amount(requests, "cpu", 1000.0).or(cpu_limit),
        memory_limit: amount(limits, "memory", 1.0),
    }
}

/// `cpu.max` for a limit in millicores (at least 1 ms per period, as the kubelet's minimum).
fn cpu_max(milli: u64) -> String {
    let quota = (milli * CPU_PERIOD_US / 1000).max(1000);
    format!("{quota} {CPU_PERIOD_US}")
}

/// `cpu.weight` for a request in millicores: the kubelet's shares (1024 per core, at least 2)
/// mapped onto 1..10000 as runc maps `cpu.shares` (`1 + (shares - 2) * 9999 / 262142`).
pub fn cpu_weight(milli: u64) -> u64 {
    let shares = (milli * 1024 / 1000).clamp(2, 262_144);
    1 + (shares - 2) * 9999 / 262_142
}

/// The limits of a container's cgroup.
pub fn container_limits(container: &Container) -> CgroupLimits {
    let asked = container_resources(container);
    CgroupLimits {
        cpu_max: asked.cpu_limit.map(cpu_max),
        cpu_weight: asked.cpu_request.map(cpu_weight),
        memory_max: asked.memory_limit,
    }
}

/// The limits of the pod's cgroup: a sum where every container sets that limit.
pub fn pod_limits(spec: &PodSpec) -> CgroupLimits {
    let all: Vec<_> = spec.containers.iter().map(container_resources).collect();
    let sum = |pick: fn(&Asked) -> Option<u64>| all.iter().map(pick).sum::<Option<u64>>();
    let requests: u64 = all.iter().filter_map(|a| a.cpu_request).sum();
    CgroupLimits {
        cpu_max: sum(|a| a.cpu_limit).map(cpu_max),
        cpu_weight: (requests > 0).then(|| cpu_weight(requests)),
        memory_max: sum(|a| a.memory_limit),
    }
}

/// Whether any container of the pod has a CPU or memory limit, and which controllers those
/// limits need.
pub fn needed(spec: &PodSpec) -> Controllers {
    let mut needed = Controllers::default();
    for container in &spec.containers {
        let asked = container_resources(container);
        needed.cpu |= asked.cpu_limit.is_some();
        needed.memory |= asked.memory_limit.is_some();
    }
    needed
}

/// Why the limits of a pod that needs `needed` are not (all) enforced with `available`;
/// `None` when they are.
pub fn not_enforced(needed: Controllers, available: Controllers) -> Option<String> {
    let mut missing = Vec::new();
    if needed.cpu && !available.cpu {
        missing.push("cpu");
    }
    if needed.memory && !available.memory {
        missing.push("memory");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "limits not enforced: this node's cgroup v2 hierarchy does not offer the {} \
             controller{} to strait's cgroups",
            missing.join(" and "),
            if missing.len() > 1 { "s" } else { "" }
        )
    })
}

fn controllers_of(dir: &Path) -> io::Result<Vec<String>> {
    Ok(fs::read_to_string(dir.join("cgroup.controllers"))?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Enables `cpu` and `memory`, where `strait/` has them, in the `cgroup.subtree_control` of
/// every cgroup from `strait/` down to each of `parents` (and of the parents themselves, so
/// that their children, the pods, get them). Returns what the pods' cgroups can use.
pub fn enable_controllers(parents: &[&Cgroup]) -> io::Result<Controllers> {
    let mount = cgroup2_mount()?;
    let top = mount.join(STRAIT_CGROUP);
    let offered = controllers_of(&top)?;
    let wanted: Vec<&str> =
        ["cpu", "memory"].into_iter().filter(|c| offered.iter().any(|o| o == c)).collect();
    if wanted.is_empty() {
        return Ok(Controllers::default());
    }
    for parent in parents {
        let relative = parent.path().strip_prefix(&top).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not below {}", parent.path().display(), top.display()),
            )
        })?;
        let mut dir = top.clone();
        enable_in(&dir, &wanted)?;
        for part in relative.components() {
            dir.push(part);
            enable_in(&dir, &wanted)?;
        }
    }
    Ok(Controllers { cpu: wanted.contains(&"cpu"), memory: wanted.contains(&"memory") })
}

/// Enables `controllers` for the children of `dir`, unless they are enabled already.
pub fn enable_in(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&path)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !current.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::write(&path, missing.join(" ")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("enabling {} in {}: {e}", missing.join(" "), path.display()),
        )
    })
}

/// The names of `available` controllers, for `cgroup.subtree_control`.
pub fn names(available: Controllers) -> Vec<&'static str> {
    let mut names = Vec::new();
    if available.cpu {
        names.push("cpu");
    }
    if available.memory {
        names.push("memory");
    }
    names
}

/// Writes `limits` to `cgroup` for the controllers that are `available`; a limit that is not
/// set is reset (`max`), so a changed pod does not keep an old one.
pub fn apply(cgroup: &Cgroup, limits: &CgroupLimits, available: Controllers) -> io::Result<()> {
    let write = |file: &str, value: String| {
        fs::write(cgroup.path().join(file), &value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing {value} to {}/{file}: {e}", cgroup.path().display()),
            )
        })
    };
    if available.cpu {
        write("cpu.max", limits.cpu_max.clone().unwrap_or_else(|| format!("max {CPU_PERIOD_US}")))?;
        write("cpu.weight", limits.cpu_weight.unwrap_or(100).to_string())?;
    }
    if available.memory {
        write("memory.max", limits.memory_max.map_or("max".to_owned(), |m| m.to_string()))?;
        // Over its limit a container is OOM-killed rather than swapped out, as in Kubernetes
        // (swap off by default).
        if limits.memory_max.is_some() && cgroup.path().join("memory.swap.max").exists() {
            write("memory.swap.max", "0".to_owned())?;
        }
    }
    Ok(())
}

/// How many processes of the cgroup the kernel has OOM-killed (`memory.events`); 0 when the
/// memory controller is not there.
pub fn oom_kills(cgroup: &Cgroup) -> u64 {
    fs::read_to_string(cgroup.path().join("memory.events"))
        .ok()
        .and_then(|events| {
            events.lines().find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use serde_json::json;

    use super::{Controllers, container_limits, cpu_weight, needed, not_enforced, pod_limits};

    fn container(resources: serde_json::Value) -> Container {
        serde_json::from_value(json!({"name": "c", "resources": resources})).unwrap()
    }

    #[test]
    fn a_containers_limits_become_cpu_max_memory_max_and_its_request_cpu_weight() {
        let limits = container_limits(&container(
            json!({"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}}),
        ));
        assert_eq!(limits.cpu_max.as_deref(), Some("50000 100000"));
        assert_eq!(limits.memory_max, Some(64 << 20));
        assert_eq!(limits.cpu_weight, Some(cpu_weight(250)));
        let tiny = container_limits(&container(json!({"limits": {"cpu": "1m"}})));
        assert_eq!(tiny.cpu_max.as_deref(), Some("1000 100000"), "the kubelet's minimum quota");
        assert_eq!(tiny.cpu_weight, Some(1), "the request defaults to the limit");
        assert!(container_limits(&container(json!({}))).is_empty());
    }

    #[test]
    fn cpu_weight_follows_the_kubelets_shares() {
        assert_eq!(cpu_weight(1000), 39, "1024 shares");
        assert_eq!(cpu_weight(1), 1, "at least 2 shares");
        assert_eq!(cpu_weight(256_000), 10_000);
    }

    #[test]
    fn the_pod_gets_sums_only_where_every_container_sets_the_limit() {
        let spec = PodSpec {
            containers: vec![
                container(json!({"limits": {"cpu": "1", "memory": "64Mi"}})),
                container(json!({"limits": {"memory": "32Mi"}, "requests": {"cpu": "500m"}})),
            ],
            ..PodSpec::default()
        };
        let pod = pod_limits(&spec);
        assert_eq!(pod.memory_max, Some(96 << 20));
        assert_eq!(pod.cpu_max, None, "the second container has no CPU limit");
        assert_eq!(pod.cpu_weight, Some(cpu_weight(1500)));
        assert_eq!(needed(&spec), Controllers { cpu: true, memory: true });
    }

    #[test]
    fn limits_without_their_controller_are_reported_as_not_enforced() {
        let both = Controllers { cpu: true, memory: true };
        let memory_only = Controllers { cpu: false, memory: true };
        assert_eq!(not_enforced(memory_only, both), None);
        assert_eq!(not_enforced(Controllers::default(), Controllers::default()), None);
        let why = not_enforced(both, Controllers::default()).unwrap();
        assert!(why.contains("cpu and memory controllers"), "{why}");
        let why = not_enforced(both, memory_only).unwrap();
        assert!(why.contains("the cpu controller "), "{why}");
    }
}
