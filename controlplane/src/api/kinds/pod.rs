//! Pods: namespaced; defaults, validation, the spec fields that may change after creation,
//! binding to a node, and graceful deletion, as Kubernetes defines them.

use std::{collections::HashSet, net::IpAddr};

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        core::v1::{
            Binding, Container, Pod, PodCondition, PodSecurityContext, PodSpec, PodStatus,
            ResourceRequirements, Toleration,
        },
        policy::v1::Eviction,
    },
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::{Value, json};

use crate::{
    api::{
        error::{ApiError, FieldError},
        kind::{DeletePlan, DeleteRequest, KindInfo, Strategy, TxnExtras},
        kinds::{
            config_map::config_map_key_error,
            node::{TAINT_NOT_READY, TAINT_UNREACHABLE, node_key},
        },
        table::{self, Column},
        typed::{TypedKind, UpdateMode, current_time},
        validation::{self, NameRule},
    },
    store::Store,
};

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";
pub const POD_SCHEDULED: &str = "PodScheduled";
/// Kubernetes' default grace period when neither the request nor the pod says otherwise.
pub const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 30;

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    post_subresources: &[("binding", "Binding"), ("eviction", "Eviction")],
    ..KindInfo::of::<Pod>("pod", true, &["po"], NameRule::Subdomain)
};

const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
const DNS_POLICIES: [&str; 4] = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const PULL_POLICIES: [&str; 3] = ["Always", "Never", "IfNotPresent"];
const PHASES: [&str; 5] = [PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED, "Unknown"];

/// Where pods live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// Whether the pod has finished for good (its containers will not run again).
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(phase(pod), PHASE_SUCCEEDED | PHASE_FAILED)
}

pub fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

pub fn node_name(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default()
}

/// Sets a pod condition, keeping its transition time when the status does not change.
/// Returns whether anything changed.
pub fn set_condition(pod: &mut Pod, condition: PodCondition) -> bool {
    let conditions =
        pod.status.get_or_insert_with(PodStatus::default).conditions.get_or_insert_with(Vec::new);
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            let same = existing.status == condition.status
                && existing.reason == condition.reason
                && existing.message == condition.message;
            if same {
                return false;
            }
            let transition = if existing.status == condition.status {
                existing.last_transition_time.clone()
            } else {
                condition.last_transition_time.clone()
            };
            *existing = PodCondition { last_transition_time: transition, ..condition };
            true
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// An image without a tag or with `:latest` is pulled every time (Kubernetes' default).
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_container(container: &mut Container) {
    container.termination_message_path.get_or_insert_with(|| "/dev/termination-log".to_owned());
    container.termination_message_policy.get_or_insert_with(|| "File".to_owned());
    if container.image_pull_policy.is_none() {
        let image = container.image.as_deref().unwrap_or_default();
        container.image_pull_policy = Some(default_pull_policy(image).to_owned());
    }
    let resources = container.resources.get_or_insert_with(ResourceRequirements::default);
    // A limit without a request makes the request equal to it (Kubernetes' pod defaults).
    if let Some(limits) = resources.limits.clone().filter(|l| !l.is_empty()) {
        let requests = resources.requests.get_or_insert_with(Default::default);
        for (name, limit) in limits {
            requests.entry(name).or_insert(limit);
        }
    }
    for port in container.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".to_owned());
    }
}

/// A resource quantity as a number (`500m` → 0.5, `1Gi` → 2^30), for comparisons.
fn quantity_value(quantity: &Quantity) -> Option<f64> {
    crate::api::quantity::value(&quantity.0)
}

/// The QoS class Kubernetes derives from requests and limits (`BestEffort`, `Burstable`,
/// `Guaranteed`), over regular and init containers, for CPU and memory.
pub fn qos_class(spec: &PodSpec) -> &'static str {
    const TRACKED: [&str; 2] = ["cpu", "memory"];
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    let mut any_set = false;
    let mut guaranteed = true;
    for container in containers {
        let resources = container.resources.clone().unwrap_or_default();
        let requests = resources.requests.unwrap_or_default();
        let limits = resources.limits.unwrap_or_default();
        for name in TRACKED {
            let request = requests.get(name).and_then(quantity_value).filter(|v| *v != 0.0);
            let limit = limits.get(name).and_then(quantity_value).filter(|v| *v != 0.0);
            any_set |= request.is_some() || limit.is_some();
            match (request, limit) {
                // A missing request defaults to the limit.
                (None, Some(_)) => {}
                (Some(request), Some(limit)) if request == limit => {}
                _ => guaranteed = false,
            }
        }
    }
    match (any_set, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Why `path` is not a relative path without `..` (`subPath`, `items[].path`), if it is not.
fn relative_path_error(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        Some("must be a relative path")
    } else if path.split('/').any(|part| part == "..") {
        Some("must not contain '..'")
    } else {
        None
    }
}

/// The `fieldRef` paths an environment variable may use (Kubernetes'
/// `validEnvDownwardAPIFieldPathExpressions`), besides `metadata.labels['…']` and
/// `metadata.annotations['…']`.
const ENV_FIELD_PATHS: [&str; 9] = [
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];
/// The resources a `resourceFieldRef` may name.
const RESOURCE_FIELDS: [&str; 6] = [
    "limits.cpu",
    "limits.ephemeral-storage",
    "limits.memory",
    "requests.cpu",
    "requests.ephemeral-storage",
    "requests.memory",
];

fn is_env_field_path(path: &str) -> bool {
    if ENV_FIELD_PATHS.contains(&path) {
        return true;
    }
    ["metadata.labels", "metadata.annotations"].iter().any(|map| {
        path.strip_prefix(map)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
            .is_some_and(|key| validation::qualified_name(key).is_none())
    })
}

/// Why `name` is not an environment variable name (`IsEnvVarName`), if it is not.
fn env_var_name_error(name: &str) -> Option<&'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ok = !name.is_empty()
        && name.chars().all(allowed)
        && !name.starts_with(|c: char| c.is_ascii_digit());
    (!ok).then_some(
        "a valid environment variable name must consist of alphabetic characters, digits, '_', \
         '-', or '.', and must not start with a digit",
    )
}

fn validate_env(path: &str, container: &Container, errors: &mut Vec<FieldError>) {
    for (index, var) in container.env.iter().flatten().enumerate() {
        let var_path = format!("{path}.env[{index}]");
        if var.name.is_empty() {
            errors.push(FieldError::required(format!("{var_path}.name"), ""));
        } else if let Some(why) = env_var_name_error(&var.name) {
            errors.push(FieldError::invalid(format!("{var_path}.name"), var.name.as_str(), why));
        }
        let Some(from) = &var.value_from else { continue };
        let from_path = format!("{var_path}.valueFrom");
        let sources = [
            from.field_ref.is_some(),
            from.resource_field_ref.is_some(),
            from.config_map_key_ref.is_some(),
            from.secret_key_ref.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if sources == 0 {
            errors.push(FieldError::invalid(
                from_path.as_str(),
                "",
                "must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or \
                 `secretKeyRef`",
            ));
        } else if sources > 1 {
            errors.push(FieldError::invalid(
                from_path.as_str(),
                "",
                "may not have more than one field specified at a time",
            ));
        }
        if var.value.as_deref().is_some_and(|v| !v.is_empty()) {
            errors.push(FieldError::invalid(
                from_path.as_str(),
                "",
                "may not be specified when `value` is not empty",
            ));
        }
        if let Some(field) = &from.field_ref
            && !is_env_field_path(&field.field_path)
        {
            errors.push(FieldError::not_supported(
                format!("{from_path}.fieldRef.fieldPath"),
                field.field_path.as_str(),
                &ENV_FIELD_PATHS,
            ));
        }
        if let Some(resource) = &from.resource_field_ref
            && !RESOURCE_FIELDS.contains(&resource.resource.as_str())
        {
            errors.push(FieldError::not_supported(
                format!("{from_path}.resourceFieldRef.resource"),
                resource.resource.as_str(),
                &RESOURCE_FIELDS,
            ));
        }
        if let Some(reference) = &from.config_map_key_ref {
            let ref_path = format!("{from_path}.configMapKeyRef");
            if reference.name.is_empty() {
                errors.push(FieldError::required(format!("{ref_path}.name"), ""));
            }
            if reference.key.is_empty() {
                errors.push(FieldError::required(format!("{ref_path}.key"), ""));
            } else if let Some(why) = config_map_key_error(&reference.key) {
                errors.push(FieldError::invalid(
                    format!("{ref_path}.key"),
                    reference.key.as_str(),
                    why,
                ));
            }
        }
    }
    for (index, source) in container.env_from.iter().flatten().enumerate() {
        let source_path = format!("{path}.envFrom[{index}]");
        if let Some(prefix) = source.prefix.as_deref().filter(|p| !p.is_empty())
            && let Some(why) = env_var_name_error(prefix)
        {
            errors.push(FieldError::invalid(format!("{source_path}.prefix"), prefix, why));
        }
        match (&source.config_map_ref, &source.secret_ref) {
            (None, None) => errors.push(FieldError::invalid(
                source_path,
                "",
                "must specify one of: `configMapRef` or `secretRef`",
            )),
            (Some(_), Some(_)) => errors.push(FieldError::invalid(
                source_path,
                "",
                "may not have more than one field specified at a time",
            )),
            (Some(reference), None) if reference.name.is_empty() => {
                errors.push(FieldError::required(format!("{source_path}.configMapRef.name"), ""))
            }
            _ => {}
        }
    }
}

const HOST_PATH_TYPES: [&str; 8] = [
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
];
const STORAGE_MEDIA: [&str; 2] = ["", "Memory"];

/// Why a file mode of a volume is out of range, if it is (`0` to `0777`).
fn mode_error(mode: i32) -> Option<&'static str> {
    (!(0..=0o777).contains(&mode))
        .then_some("must be a number between 0 and 0777 (octal), both inclusive")
}

/// The checks of one volume besides its name: exactly one source, and that source's fields.
fn validate_volume(
    path: &str,
    volume: &k8s_openapi::api::core::v1::Volume,
    errors: &mut Vec<FieldError>,
) {
    let sources = serde_json::to_value(volume)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().filter(|k| *k != "name").count()))
        .unwrap_or(0);
    if sources == 0 {
        errors.push(FieldError::required(path, "must specify a volume type"));
    } else if sources > 1 {
        errors.push(FieldError::forbidden(path, "may not specify more than 1 volume type"));
    }
    if let Some(host_path) = &volume.host_path {
        if host_path.path.is_empty() {
            errors.push(FieldError::required(format!("{path}.hostPath.path"), ""));
        } else if host_path.path.split('/').any(|part| part == "..") {
            errors.push(FieldError::invalid(
                format!("{path}.hostPath.path"),
                host_path.path.as_str(),
                "must not contain '..'",
            ));
        }
        if let Some(kind) = host_path.type_.as_deref()
            && !HOST_PATH_TYPES.contains(&kind)
        {
            errors.push(FieldError::not_supported(
                format!("{path}.hostPath.type"),
                kind,
                &HOST_PATH_TYPES,
            ));
        }
    }
    if let Some(empty_dir) = &volume.empty_dir {
        if let Some(medium) = empty_dir.medium.as_deref()
            && !STORAGE_MEDIA.contains(&medium)
        {
            errors.push(FieldError::not_supported(
                format!("{path}.emptyDir.medium"),
                medium,
                &STORAGE_MEDIA,
            ));
        }
        if let Some(limit) = &empty_dir.size_limit
            && quantity_value(limit).is_none()
        {
            errors.push(FieldError::invalid(
                format!("{path}.emptyDir.sizeLimit"),
                limit.0.as_str(),
                "must be a non-negative quantity",
            ));
        }
    }
    if let Some(config_map) = &volume.config_map {
        let source_path = format!("{path}.configMap");
        if config_map.name.is_empty() {
            errors.push(FieldError::required(format!("{source_path}.name"), ""));
        }
        if let Some(mode) = config_map.default_mode
            && let Some(why) = mode_error(mode)
        {
            errors.push(FieldError::invalid(format!("{source_path}.defaultMode"), mode, why));
        }
        for (index, item) in config_map.items.iter().flatten().enumerate() {
            let item_path = format!("{source_path}.items[{index}]");
            if item.key.is_empty() {
                errors.push(FieldError::required(format!("{item_path}.key"), ""));
            } else if let Some(why) = config_map_key_error(&item.key) {
                errors.push(FieldError::invalid(
                    format!("{item_path}.key"),
                    item.key.as_str(),
                    why,
                ));
            }
            if item.path.is_empty() {
                errors.push(FieldError::required(format!("{item_path}.path"), ""));
            } else if let Some(why) = relative_path_error(&item.path) {
                errors.push(FieldError::invalid(
                    format!("{item_path}.path"),
                    item.path.as_str(),
                    why,
                ));
            }
            if let Some(mode) = item.mode
                && let Some(why) = mode_error(mode)
            {
                errors.push(FieldError::invalid(format!("{item_path}.mode"), mode, why));
            }
        }
    }
}

fn validate_container(
    path: &str,
    container: &Container,
    names: &mut HashSet<String>,
    volumes: &HashSet<&str>,
    errors: &mut Vec<FieldError>,
) {
    if container.name.is_empty() {
        errors.push(FieldError::required(format!("{path}.name"), ""));
    } else if let Some(why) = validation::dns1123_label(&container.name) {
        errors.push(FieldError::invalid(format!("{path}.name"), container.name.as_str(), why));
    } else if !names.insert(container.name.clone()) {
        errors.push(FieldError::duplicate(format!("{path}.name"), container.name.as_str()));
    }
    if container.image.as_deref().unwrap_or_default().trim().is_empty() {
        errors.push(FieldError::required(format!("{path}.image"), ""));
    }
    if let Some(policy) = container.image_pull_policy.as_deref()
        && !PULL_POLICIES.contains(&policy)
    {
        errors.push(FieldError::not_supported(
            format!("{path}.imagePullPolicy"),
            policy,
            &PULL_POLICIES,
        ));
    }
    let mut port_names = HashSet::new();
    for (index, port) in container.ports.iter().flatten().enumerate() {
        let port_path = format!("{path}.ports[{index}]");
        if !(1..=65535).contains(&port.container_port) {
            errors.push(FieldError::invalid(
                format!("{port_path}.containerPort"),
                port.container_port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(host_port) = port.host_port.filter(|p| *p != 0)
            && !(1..=65535).contains(&host_port)
        {
            errors.push(FieldError::invalid(
                format!("{port_path}.hostPort"),
                host_port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(protocol) = port.protocol.as_deref()
            && !PROTOCOLS.contains(&protocol)
        {
            errors.push(FieldError::not_supported(
                format!("{port_path}.protocol"),
                protocol,
                &PROTOCOLS,
            ));
        }
        if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            if let Some(why) = validation::iana_service_name(name) {
                errors.push(FieldError::invalid(format!("{port_path}.name"), name, why));
            } else if !port_names.insert(name) {
                errors.push(FieldError::duplicate(format!("{port_path}.name"), name));
            }
        }
    }
    let mut mount_paths = HashSet::new();
    for (index, mount) in container.volume_mounts.iter().flatten().enumerate() {
        let mount_path = format!("{path}.volumeMounts[{index}]");
        if mount.name.is_empty() {
            errors.push(FieldError::required(format!("{mount_path}.name"), ""));
        } else if !volumes.contains(mount.name.as_str()) {
            errors.push(FieldError::not_found(format!("{mount_path}.name"), mount.name.as_str()));
        }
        if mount.mount_path.is_empty() {
            errors.push(FieldError::required(format!("{mount_path}.mountPath"), ""));
        } else if !mount_paths.insert(mount.mount_path.as_str()) {
            errors.push(FieldError::invalid(
                format!("{mount_path}.mountPath"),
                mount.mount_path.as_str(),
                "must be unique",
            ));
        }
        let sub_path = mount.sub_path.as_deref().unwrap_or_default();
        if !sub_path.is_empty() {
            if let Some(why) = relative_path_error(sub_path) {
                errors.push(FieldError::invalid(format!("{mount_path}.subPath"), sub_path, why));
            }
            if mount.sub_path_expr.as_deref().is_some_and(|e| !e.is_empty()) {
                errors.push(FieldError::invalid(
                    format!("{mount_path}.subPathExpr"),
                    mount.sub_path_expr.clone().unwrap_or_default(),
                    "subPathExpr and subPath are mutually exclusive",
                ));
            }
        }
    }
    validate_env(path, container, errors);
    if let Some(resources) = &container.resources {
        let requests = resources.requests.clone().unwrap_or_default();
        for (name, limit) in resources.limits.iter().flatten() {
            let (Some(limit_value), Some(request)) = (quantity_value(limit), requests.get(name))
            else {
                continue;
            };
            if quantity_value(request).is_some_and(|r| r > limit_value) {
                errors.push(FieldError::invalid(
                    format!("{path}.resources.requests[{name}]"),
                    request.0.as_str(),
                    format!("must be less than or equal to {name} limit of {}", limit.0),
                ));
            }
        }
        for (field, map) in [("requests", &resources.requests), ("limits", &resources.limits)] {
            for (name, quantity) in map.iter().flatten() {
                if quantity_value(quantity).is_none_or(|v| v < 0.0) {
                    errors.push(FieldError::invalid(
                        format!("{path}.resources.{field}[{name}]"),
                        quantity.0.as_str(),
                        "must be a non-negative quantity",
                    ));
                }
            }
        }
    }
}

pub(crate) fn validate_spec(spec: &PodSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut volume_names = HashSet::new();
    for (index, volume) in spec.volumes.iter().flatten().enumerate() {
        validate_volume(&format!("spec.volumes[{index}]"), volume, &mut errors);
        if let Some(why) = validation::dns1123_label(&volume.name) {
            errors.push(FieldError::invalid(
                format!("spec.volumes[{index}].name"),
                volume.name.as_str(),
                why,
            ));
        } else if !volume_names.insert(volume.name.as_str()) {
            errors.push(FieldError::duplicate(
                format!("spec.volumes[{index}].name"),
                volume.name.as_str(),
            ));
        }
    }
    if spec.containers.is_empty() {
        errors.push(FieldError::required("spec.containers", ""));
    }
    let mut names = HashSet::new();
    for (index, container) in spec.init_containers.iter().flatten().enumerate() {
        let path = format!("spec.initContainers[{index}]");
        validate_container(&path, container, &mut names, &volume_names, &mut errors);
    }
    for (index, container) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{index}]");
        validate_container(&path, container, &mut names, &volume_names, &mut errors);
    }
    if let Some(policy) = spec.restart_policy.as_deref()
        && !RESTART_POLICIES.contains(&policy)
    {
        errors.push(FieldError::not_supported("spec.restartPolicy", policy, &RESTART_POLICIES));
    }
    if let Some(policy) = spec.dns_policy.as_deref()
        && !DNS_POLICIES.contains(&policy)
    {
        errors.push(FieldError::not_supported("spec.dnsPolicy", policy, &DNS_POLICIES));
    }
    if let Some(grace) = spec.termination_grace_period_seconds.filter(|g| *g < 0) {
        errors.push(FieldError::invalid(
            "spec.terminationGracePeriodSeconds",
            grace,
            "must be greater than or equal to 0",
        ));
    }
    if let Some(deadline) = spec.active_deadline_seconds.filter(|d| *d <= 0) {
        errors.push(FieldError::invalid(
            "spec.activeDeadlineSeconds",
            deadline,
            "must be between 1 and 2147483647, inclusive",
        ));
    }
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty())
        && let Some(why) = validation::dns1123_subdomain(node)
    {
        errors.push(FieldError::invalid("spec.nodeName", node, why));
    }
    if let Some(selector) = &spec.node_selector {
        validation::labels("spec.nodeSelector", selector, &mut errors);
    }
    errors
}

/// What node agents report: a known phase and well-formed addresses.
fn validate_status(status: &PodStatus) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(phase) = status.phase.as_deref()
        && !PHASES.contains(&phase)
    {
        errors.push(FieldError::not_supported("status.phase", phase, &PHASES));
    }
    let mut check_ip = |field: String, value: &str| {
        if value.parse::<IpAddr>().is_err() {
            errors.push(FieldError::invalid(field, value, "must be a valid IP address"));
        }
    };
    for (field, value) in [("status.podIP", &status.pod_ip), ("status.hostIP", &status.host_ip)] {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            check_ip(field.to_owned(), value);
        }
    }
    for (index, ip) in status.pod_ips.iter().flatten().enumerate() {
        check_ip(format!("status.podIPs[{index}].ip"), &ip.ip);
    }
    if let (Some(first), Some(pod_ip)) = (
        status.pod_ips.as_ref().and_then(|ips| ips.first()),
        status.pod_ip.as_deref().filter(|ip| !ip.is_empty()),
    ) && first.ip != pod_ip
    {
        errors.push(FieldError::invalid(
            "status.podIPs[0].ip",
            first.ip.as_str(),
            "must equal status.podIP",
        ));
    }
    errors
}

/// The spec changes Kubernetes allows on a running pod: container images, a lower (or a
/// first) active deadline, and added tolerations (`ValidatePodUpdate`).
fn validate_spec_update(new: &PodSpec, old: &PodSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match (old.active_deadline_seconds, new.active_deadline_seconds) {
        (Some(_), None) => errors.push(FieldError::invalid(
            "spec.activeDeadlineSeconds",
            Value::Null,
            "must not update from a positive integer to nil value",
        )),
        (Some(old), Some(new)) if new > old => errors.push(FieldError::invalid(
            "spec.activeDeadlineSeconds",
            new,
            "must be less than or equal to previous value",
        )),
        _ => {}
    }
    let old_tolerations = old.tolerations.clone().unwrap_or_default();
    let new_tolerations = new.tolerations.clone().unwrap_or_default();
    if old_tolerations.iter().any(|t| !new_tolerations.contains(t)) {
        errors.push(FieldError::forbidden(
            "spec.tolerations",
            "existing toleration can not be modified except its tolerationSeconds",
        ));
    }
    // Everything else must be equal: compare with the mutable fields taken from the old spec.
    let mut masked = new.clone();
    masked.active_deadline_seconds = old.active_deadline_seconds;
    masked.tolerations = old.tolerations.clone();
    let take_images = |masked: &mut Vec<Container>, old: &[Container]| {
        for (container, previous) in masked.iter_mut().zip(old) {
            container.image = previous.image.clone();
            container.image_pull_policy = previous.image_pull_policy.clone();
        }
    };
    take_images(&mut masked.containers, &old.containers);
    if let (Some(masked), Some(old)) = (&mut masked.init_containers, &old.init_containers) {
        take_images(masked, old);
    }
    if masked != *old {
        errors.push(FieldError::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`, \
             `spec.initContainers[*].image`, `spec.activeDeadlineSeconds` and `spec.tolerations` \
             (only additions to existing tolerations); the node is set through the binding \
             subresource",
        ));
    }
    errors
}

/// How long pods tolerate by default being on a node that is not ready or unreachable before
/// the node lifecycle controller evicts them (Kubernetes' DefaultTolerationSeconds admission,
/// `--default-not-ready-toleration-seconds` and `--default-unreachable-toleration-seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultTolerationSeconds {
    pub not_ready: i64,
    pub unreachable: i64,
}

impl Default for DefaultTolerationSeconds {
    fn default() -> Self {
        Self { not_ready: 300, unreachable: 300 }
    }
}

/// Adds `{key}:NoExecute` for `seconds` unless the pod already tolerates that taint in some
/// way (a toleration with that key or no key, for NoExecute or every effect), as
/// DefaultTolerationSeconds does: a pod's own toleration is kept as it is.
fn add_default_toleration(spec: &mut PodSpec, key: &str, seconds: i64) {
    let tolerated = spec.tolerations.iter().flatten().any(|t| {
        t.key.as_deref().is_none_or(|k| k.is_empty() || k == key)
            && t.effect.as_deref().is_none_or(|e| e.is_empty() || e == "NoExecute")
    });
    if !tolerated {
        spec.tolerations.get_or_insert_with(Vec::new).push(Toleration {
            key: Some(key.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoExecute".to_owned()),
            toleration_seconds: Some(seconds),
            value: None,
        });
    }
}

/// The defaults of a pod spec (also a pod template's). Admission defaults (the default
/// tolerations) are not among them: they are the pod strategy's, applied to pods only.
pub fn default_spec(spec: &mut PodSpec) {
    spec.restart_policy.get_or_insert_with(|| "Always".to_owned());
    spec.termination_grace_period_seconds.get_or_insert(DEFAULT_TERMINATION_GRACE_SECONDS);
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".to_owned());
    spec.scheduler_name.get_or_insert_with(|| DEFAULT_SCHEDULER.to_owned());
    spec.enable_service_links.get_or_insert(true);
    spec.security_context.get_or_insert_with(PodSecurityContext::default);
    // What Kubernetes' Priority admission sets when no priority class is named.
    spec.priority.get_or_insert(0);
    spec.preemption_policy.get_or_insert_with(|| "PreemptLowerPriority".to_owned());
    for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        default_container(container);
    }
}

#[derive(Debug, Default)]
pub struct PodStrategy {
    default_tolerations: DefaultTolerationSeconds,
}

impl PodStrategy {
    pub fn new(default_tolerations: DefaultTolerationSeconds) -> Self {
        Self { default_tolerations }
    }
}

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Ready", "The aggregate readiness state of this pod for accepting traffic."),
    Column::new("Status", "The aggregate status of the containers in this pod."),
    Column::new("Restarts", "The number of times the containers in this pod have been restarted."),
    Column::new("Age", "Time since the pod was created"),
    Column::new("IP", "The IP address allocated to the pod").wide(),
    Column::new("Node", "The node the pod is bound to").wide(),
    Column::new("Nominated Node", "The node the scheduler nominated for preemption").wide(),
    Column::new("Readiness Gates", "Readiness gates that are met, of those declared").wide(),
];

/// The STATUS column of `kubectl get pods`: the phase, refined by what the containers report
/// (a waiting reason, an exit code), and `Terminating` during graceful deletion.
fn display_status(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let mut reason =
        status.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| phase(pod).to_owned());
    let init_total = pod.spec.as_ref().and_then(|s| s.init_containers.as_ref()).map_or(0, Vec::len);
    let mut initializing = false;
    for (index, container) in status.init_container_statuses.iter().flatten().enumerate() {
        let state = container.state.clone().unwrap_or_default();
        if let Some(terminated) = &state.terminated {
            if terminated.exit_code == 0 {
                continue;
            }
            reason = match terminated.reason.as_deref().filter(|r| !r.is_empty()) {
                Some(why) => format!("Init:{why}"),
                None => match terminated.signal.filter(|s| *s != 0) {
                    Some(signal) => format!("Init:Signal:{signal}"),
                    None => format!("Init:ExitCode:{}", terminated.exit_code),
                },
            };
        } else if let Some(why) = state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.as_deref())
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            reason = format!("Init:{why}");
        } else {
            reason = format!("Init:{index}/{init_total}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut running = false;
        for container in status.container_statuses.iter().flatten().rev() {
            let state = container.state.clone().unwrap_or_default();
            if let Some(why) =
                state.waiting.as_ref().and_then(|w| w.reason.clone()).filter(|r| !r.is_empty())
            {
                reason = why;
            } else if let Some(terminated) = &state.terminated {
                reason = match terminated.reason.clone().filter(|r| !r.is_empty()) {
                    Some(why) => why,
                    None => match terminated.signal.filter(|s| *s != 0) {
                        Some(signal) => format!("Signal:{signal}"),
                        None => format!("ExitCode:{}", terminated.exit_code),
                    },
                };
            } else if state.running.is_some() && container.ready {
                running = true;
            }
        }
        if reason == "Completed" && running {
            reason = PHASE_RUNNING.to_owned();
        }
    }
    if pod.metadata.deletion_timestamp.is_some() {
        reason = if status.reason.as_deref() == Some("NodeLost") {
            "Unknown".to_owned()
        } else {
            "Terminating".to_owned()
        };
    }
    reason
}

fn none_if_empty(value: Option<String>) -> Value {
    value.filter(|v| !v.is_empty()).unwrap_or_else(|| "<none>".to_owned()).into()
}

#[async_trait]
impl Strategy for PodStrategy {
    type Object = Pod;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, pod: &mut Pod) {
        let spec = pod.spec.get_or_insert_with(PodSpec::default);
        default_spec(spec);
        let defaults = self.default_tolerations;
        add_default_toleration(spec, TAINT_NOT_READY, defaults.not_ready);
        add_default_toleration(spec, TAINT_UNREACHABLE, defaults.unreachable);
    }

    fn prepare_for_create(&self, pod: &mut Pod) {
        let qos = pod.spec.as_ref().map(qos_class).unwrap_or("BestEffort");
        pod.status = Some(PodStatus {
            phase: Some(PHASE_PENDING.to_owned()),
            qos_class: Some(qos.to_owned()),
            ..PodStatus::default()
        });
    }

    fn prepare_for_update(&self, new: &mut Pod, old: &Pod) {
        new.status = old.status.clone();
    }

    fn prepare_for_status_update(&self, new: &mut Pod, old: &Pod) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
        // The QoS class is fixed at creation.
        if let (Some(status), Some(qos)) =
            (new.status.as_mut(), old.status.as_ref().and_then(|s| s.qos_class.clone()))
        {
            status.qos_class = Some(qos);
        }
    }

    fn validate(&self, pod: &Pod) -> Vec<FieldError> {
        let mut errors = match &pod.spec {
            Some(spec) => validate_spec(spec),
            None => vec![FieldError::required("spec", "")],
        };
        if let Some(status) = &pod.status {
            errors.extend(validate_status(status));
        }
        errors
    }

    fn validate_update(&self, new: &Pod, old: &Pod) -> Vec<FieldError> {
        match (&new.spec, &old.spec) {
            (Some(new), Some(old)) => validate_spec_update(new, old),
            _ => Vec::new(),
        }
    }

    fn spec_changed(&self, new: &Pod, old: &Pod) -> Option<bool> {
        Some(new.spec != old.spec)
    }

    /// Resource quotas of the namespace admit the pod (or refuse it with 403) in the same
    /// transaction that creates it.
    async fn before_create(&self, store: &dyn Store, pod: &mut Pod) -> Result<TxnExtras, ApiError> {
        super::resource_quota::admit_pod(store, pod).await
    }

    async fn plan_delete(
        &self,
        store: &dyn Store,
        pod: &Pod,
        request: &DeleteRequest,
    ) -> Result<DeletePlan<Pod>, ApiError> {
        let remove = Ok(DeletePlan::Remove(TxnExtras::default()));
        let spec_grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds);
        let grace = request
            .grace_period_seconds
            .or(spec_grace)
            .unwrap_or(DEFAULT_TERMINATION_GRACE_SECONDS)
            .max(0);
        // Nothing runs the pod (never scheduled, already finished): no one to wait for.
        if grace == 0 || node_name(pod).is_empty() || is_terminated(pod) {
            return remove;
        }
        // Nor when its node is gone: no agent will ever confirm the stop.
        let node = store
            .get(&node_key(node_name(pod)))
            .await
            .map_err(ApiError::store("reading the pod's node"))?;
        if node.is_none() {
            return remove;
        }
        let now = current_time();
        let deadline = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            now.0
                .saturating_add(k8s_openapi::jiff::SignedDuration::from_secs(grace))
                .unwrap_or(now.0),
        );
        if let Some(current) = &pod.metadata.deletion_timestamp {
            // A second delete may only bring the deadline forward.
            if deadline >= *current {
                return Ok(DeletePlan::Unchanged);
            }
        }
        let mut deleting = pod.clone();
        deleting.metadata.deletion_timestamp = Some(deadline);
        deleting.metadata.deletion_grace_period_seconds = Some(grace);
        deleting.metadata.generation = Some(pod.metadata.generation.unwrap_or(1) + 1);
        Ok(DeletePlan::Update(deleting))
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, pod: &Pod) -> Vec<Value> {
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let statuses = status.container_statuses.clone().unwrap_or_default();
        let ready = statuses.iter().filter(|s| s.ready).count();
        let restarts: i64 = statuses.iter().map(|s| i64::from(s.restart_count)).sum();
        let gates = spec.readiness_gates.clone().unwrap_or_default();
        let readiness_gates = if gates.is_empty() {
            "<none>".to_owned()
        } else {
            let conditions = status.conditions.clone().unwrap_or_default();
            let met = gates
                .iter()
                .filter(|gate| {
                    conditions.iter().any(|c| c.type_ == gate.condition_type && c.status == "True")
                })
                .count();
            format!("{met}/{}", gates.len())
        };
        vec![
            pod.metadata.name.clone().unwrap_or_default().into(),
            format!("{ready}/{}", spec.containers.len()).into(),
            display_status(pod).into(),
            restarts.to_string().into(),
            table::age(pod.metadata.creation_timestamp.as_ref()).into(),
            none_if_empty(status.pod_ip.clone()),
            none_if_empty(spec.node_name.clone()),
            none_if_empty(status.nominated_node_name.clone()),
            readiness_gates.into(),
        ]
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ]
    }

    fn field_value(&self, pod: &Pod, field: &str) -> String {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let text = |value: Option<&String>| value.cloned().unwrap_or_default();
        match field {
            "spec.nodeName" => text(spec.and_then(|s| s.node_name.as_ref())),
            "spec.restartPolicy" => text(spec.and_then(|s| s.restart_policy.as_ref())),
            "spec.schedulerName" => text(spec.and_then(|s| s.scheduler_name.as_ref())),
            "spec.serviceAccountName" => text(spec.and_then(|s| s.service_account_name.as_ref())),
            "spec.hostNetwork" => spec.and_then(|s| s.host_network).unwrap_or(false).to_string(),
            "status.phase" => text(status.and_then(|s| s.phase.as_ref())),
            "status.podIP" => text(status.and_then(|s| s.pod_ip.as_ref())),
            "status.nominatedNodeName" => text(status.and_then(|s| s.nominated_node_name.as_ref())),
            _ => String::new(),
        }
    }

    async fn post_subresource(
        &self,
        kind: &TypedKind<Self>,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        match subresource {
            "binding" => {}
            "eviction" => return evict_pod(kind, namespace, name, body).await,
            _ => return Err(ApiError::UnknownPath),
        }
        let binding: Binding = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("decoding the Binding: {e}")))?;
        if binding.metadata.name.as_deref().is_some_and(|n| !n.is_empty() && n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the Binding ({}) does not match the pod's name ({name})",
                binding.metadata.name.as_deref().unwrap_or_default()
            )));
        }
        let target_kind = binding.target.kind.as_deref().unwrap_or("Node");
        let target = binding.target.name.clone().unwrap_or_default();
        let mut causes = Vec::new();
        if !target_kind.is_empty() && target_kind != "Node" {
            causes.push(FieldError::not_supported("target.kind", target_kind, &["Node"]));
        }
        if target.is_empty() {
            causes.push(FieldError::required("target.name", ""));
        } else if let Some(why) = validation::dns1123_subdomain(&target) {
            causes.push(FieldError::invalid("target.name", target.as_str(), why));
        }
        if !causes.is_empty() {
            return Err(ApiError::Invalid {
                kind: "Binding".to_owned(),
                name: name.to_owned(),
                causes,
            });
        }
        bind_pod(kind, namespace.unwrap_or_default(), name, &target).await?;
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }))
    }
}

/// `POST …/pods/{name}/eviction` (`policy/v1` Eviction, what `kubectl drain` sends): the pod
/// is deleted gracefully with the eviction's delete options. PodDisruptionBudgets are not
/// served, so no budget can refuse an eviction (Kubernetes would answer 429 then).
async fn evict_pod(
    kind: &TypedKind<PodStrategy>,
    namespace: Option<&str>,
    name: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let eviction: Eviction = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("decoding the Eviction: {e}")))?;
    if eviction.metadata.name.as_deref().is_some_and(|n| !n.is_empty() && n != name) {
        return Err(ApiError::BadRequest(format!(
            "name in URL does not match name in Eviction object: {name} != {}",
            eviction.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    let options = eviction.delete_options.unwrap_or_default();
    if let Some(grace) = options.grace_period_seconds.filter(|g| *g < 0) {
        return Err(ApiError::Invalid {
            kind: "Eviction".to_owned(),
            name: name.to_owned(),
            causes: vec![FieldError::invalid(
                "deleteOptions.gracePeriodSeconds",
                grace,
                "must be greater than or equal to 0",
            )],
        });
    }
    let preconditions = options.preconditions.unwrap_or_default();
    let propagation_policy = options
        .propagation_policy
        .as_deref()
        .map(crate::api::deletion::PropagationPolicy::parse)
        .transpose()?;
    let request = DeleteRequest {
        grace_period_seconds: options.grace_period_seconds,
        precondition_uid: preconditions.uid,
        precondition_resource_version: preconditions.resource_version,
        propagation_policy,
    };
    let dry_run = options.dry_run.iter().flatten().any(|d| d == "All");
    kind.delete(namespace, name, &request, dry_run).await?;
    Ok(json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": 201,
    }))
}

/// Binds a pod to a node: sets `spec.nodeName` and a `PodScheduled=True` condition. A pod
/// already bound (to any node) or being deleted cannot be bound: Conflict. This is the path
/// of `POST …/pods/{name}/binding` and of the scheduler.
pub async fn bind_pod(
    pods: &TypedKind<PodStrategy>,
    namespace: &str,
    name: &str,
    node: &str,
) -> Result<Pod, ApiError> {
    let conflict = |message: String| ApiError::Conflict {
        resource: "pods".to_owned(),
        name: name.to_owned(),
        message,
    };
    pods.update(Some(namespace), name, UpdateMode::Internal, false, |pod| {
        let bound = node_name(pod);
        if !bound.is_empty() {
            return Err(conflict(format!("pod {name} is already assigned to node \"{bound}\"")));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(conflict(format!(
                "pod {name} is being deleted, cannot be assigned to a host"
            )));
        }
        let mut bound = pod.clone();
        bound.spec.get_or_insert_with(PodSpec::default).node_name = Some(node.to_owned());
        let now = current_time();
        set_condition(
            &mut bound,
            PodCondition {
                type_: POD_SCHEDULED.to_owned(),
                status: "True".to_owned(),
                last_transition_time: Some(now),
                ..PodCondition::default()
            },
        );
        Ok(bound)
    })
    .await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Container, PodIP, PodSpec, PodStatus, ResourceRequirements, Toleration},
        apimachinery::pkg::api::resource::Quantity,
    };

    use super::{
        DefaultTolerationSeconds, PodStrategy, default_pull_policy, qos_class, validate_spec,
        validate_spec_update, validate_status,
    };
    use crate::api::kind::Strategy;

    fn container(name: &str, image: &str) -> Container {
        Container { name: name.to_owned(), image: Some(image.to_owned()), ..Container::default() }
    }

    fn resources(
        requests: &[(&str, &str)],
        limits: &[(&str, &str)],
    ) -> Option<ResourceRequirements> {
        let map = |pairs: &[(&str, &str)]| {
            Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned()))).collect())
        };
        Some(ResourceRequirements { requests: map(requests), limits: map(limits), claims: None })
    }

    #[test]
    fn pull_policy_follows_the_tag() {
        assert_eq!(default_pull_policy("nginx"), "Always");
        assert_eq!(default_pull_policy("nginx:latest"), "Always");
        assert_eq!(default_pull_policy("nginx:1.27"), "IfNotPresent");
        assert_eq!(default_pull_policy("registry:5000/nginx"), "Always");
        assert_eq!(default_pull_policy("nginx@sha256:abcd"), "IfNotPresent");
    }

    #[test]
    fn qos_classes() {
        let mut spec = PodSpec { containers: vec![container("a", "x")], ..PodSpec::default() };
        assert_eq!(qos_class(&spec), "BestEffort");
        spec.containers[0].resources = resources(&[("cpu", "100m")], &[]);
        assert_eq!(qos_class(&spec), "Burstable");
        spec.containers[0].resources = resources(
            &[("cpu", "1"), ("memory", "1Gi")],
            &[("cpu", "1000m"), ("memory", "1024Mi")],
        );
        assert_eq!(qos_class(&spec), "Guaranteed", "equal quantities in other units");
        spec.containers[0].resources = resources(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        assert_eq!(qos_class(&spec), "Guaranteed", "requests default to limits");
        spec.containers.push(container("b", "y"));
        assert_eq!(qos_class(&spec), "Burstable", "one container without limits");
    }

    #[test]
    fn container_rules_name_their_field() {
        let spec = PodSpec {
            containers: vec![
                container("web", "nginx"),
                container("web", ""),
                container("Bad", "x"),
            ],
            ..PodSpec::default()
        };
        let fields: Vec<String> = validate_spec(&spec).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            ["spec.containers[1].name", "spec.containers[1].image", "spec.containers[2].name"]
        );
        let empty = PodSpec::default();
        assert_eq!(validate_spec(&empty)[0].field, "spec.containers");
    }

    fn fields_of(spec: serde_json::Value) -> Vec<String> {
        let spec: PodSpec = serde_json::from_value(spec).unwrap();
        validate_spec(&spec).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn volumes_and_their_mounts_are_checked_field_by_field() {
        let fields = fields_of(serde_json::json!({
            "volumes": [
                {"name": "data", "emptyDir": {"medium": "Disk"}},
                {"name": "both", "emptyDir": {}, "hostPath": {"path": "/x"}},
                {"name": "none"},
                {"name": "host", "hostPath": {"path": "/srv", "type": "Folder"}},
                {"name": "cfg", "configMap": {"name": "c", "defaultMode": 0o1000,
                    "items": [{"key": "a/b", "path": "../x"}]}},
            ],
            "containers": [{"name": "c", "image": "x", "volumeMounts": [
                {"name": "data", "mountPath": "/data", "subPath": "/abs"},
                {"name": "missing", "mountPath": "/data"},
            ]}],
        }));
        assert_eq!(
            fields,
            [
                "spec.volumes[0].emptyDir.medium",
                "spec.volumes[1]",
                "spec.volumes[2]",
                "spec.volumes[3].hostPath.type",
                "spec.volumes[4].configMap.defaultMode",
                "spec.volumes[4].configMap.items[0].key",
                "spec.volumes[4].configMap.items[0].path",
                "spec.containers[0].volumeMounts[0].subPath",
                "spec.containers[0].volumeMounts[1].name",
                "spec.containers[0].volumeMounts[1].mountPath",
            ]
        );
    }

    #[test]
    fn env_sources_are_checked_field_by_field() {
        let fields = fields_of(serde_json::json!({
            "containers": [{"name": "c", "image": "x",
                "env": [
                    {"name": "OK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "1BAD", "value": "x"},
                    {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}},
                    {"name": "R", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}},
                    {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "", "key": "a b"}}},
                    {"name": "V", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "E", "valueFrom": {}},
                ],
                "envFrom": [{"prefix": "9"}],
            }],
        }));
        assert_eq!(
            fields,
            [
                "spec.containers[0].env[1].name",
                "spec.containers[0].env[2].valueFrom.fieldRef.fieldPath",
                "spec.containers[0].env[3].valueFrom.resourceFieldRef.resource",
                "spec.containers[0].env[4].valueFrom.configMapKeyRef.name",
                "spec.containers[0].env[4].valueFrom.configMapKeyRef.key",
                "spec.containers[0].env[5].valueFrom",
                "spec.containers[0].env[6].valueFrom",
                "spec.containers[0].envFrom[0].prefix",
                "spec.containers[0].envFrom[0]",
            ]
        );
    }

    #[test]
    fn agents_must_report_known_phases_and_valid_addresses() {
        let status = |phase: &str, ip: &str| PodStatus {
            phase: Some(phase.to_owned()),
            pod_ip: Some(ip.to_owned()),
            ..PodStatus::default()
        };
        assert!(validate_status(&status("Running", "10.244.1.5")).is_empty());
        assert!(validate_status(&status("Running", "fd00::5")).is_empty());
        assert_eq!(validate_status(&status("Sleeping", "10.244.1.5"))[0].field, "status.phase");
        assert_eq!(validate_status(&status("Running", "10.244.1.300"))[0].field, "status.podIP");
        let mismatch = PodStatus {
            pod_ips: Some(vec![PodIP { ip: "10.244.1.6".to_owned() }]),
            ..status("Running", "10.244.1.5")
        };
        assert_eq!(validate_status(&mismatch)[0].field, "status.podIPs[0].ip");
    }

    #[test]
    fn only_images_deadline_and_added_tolerations_may_change() {
        let toleration =
            |key: &str| Toleration { key: Some(key.to_owned()), ..Toleration::default() };
        let old = PodSpec {
            containers: vec![container("web", "nginx:1")],
            active_deadline_seconds: Some(100),
            tolerations: Some(vec![toleration("a")]),
            ..PodSpec::default()
        };
        let mut new = old.clone();
        new.containers[0].image = Some("nginx:2".to_owned());
        new.active_deadline_seconds = Some(50);
        new.tolerations = Some(vec![toleration("a"), toleration("b")]);
        assert!(validate_spec_update(&new, &old).is_empty());

        let mut longer = old.clone();
        longer.active_deadline_seconds = Some(200);
        assert_eq!(validate_spec_update(&longer, &old)[0].field, "spec.activeDeadlineSeconds");

        let mut fewer = old.clone();
        fewer.tolerations = None;
        assert_eq!(validate_spec_update(&fewer, &old)[0].field, "spec.tolerations");

        let mut moved = old.clone();
        moved.node_name = Some("elsewhere".to_owned());
        assert_eq!(validate_spec_update(&moved, &old)[0].field, "spec");

        let mut renamed = old.clone();
        renamed.containers[0].name = "other".to_owned();
        assert_eq!(validate_spec_update(&renamed, &old)[0].field, "spec");
    }

    #[test]
    fn pods_tolerate_not_ready_and_unreachable_nodes_for_the_default_seconds_unless_they_say() {
        let strategy =
            PodStrategy::new(DefaultTolerationSeconds { not_ready: 30, unreachable: 60 });
        let toleration = |key: &str, seconds: Option<i64>| Toleration {
            key: Some(key.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoExecute".to_owned()),
            toleration_seconds: seconds,
            value: None,
        };
        let mut pod = super::Pod {
            spec: Some(PodSpec { containers: vec![container("a", "x")], ..PodSpec::default() }),
            ..super::Pod::default()
        };
        strategy.default(&mut pod);
        let expected = vec![
            toleration("node.kubernetes.io/not-ready", Some(30)),
            toleration("node.kubernetes.io/unreachable", Some(60)),
        ];
        assert_eq!(pod.spec.as_ref().unwrap().tolerations.as_ref(), Some(&expected));
        strategy.default(&mut pod);
        assert_eq!(
            pod.spec.as_ref().unwrap().tolerations.as_ref(),
            Some(&expected),
            "defaults are idempotent"
        );

        // A pod's own toleration of one of them is kept; the other is still added.
        let own = toleration("node.kubernetes.io/unreachable", Some(5));
        let mut pod = super::Pod {
            spec: Some(PodSpec {
                containers: vec![container("a", "x")],
                tolerations: Some(vec![own.clone()]),
                ..PodSpec::default()
            }),
            ..super::Pod::default()
        };
        strategy.default(&mut pod);
        assert_eq!(
            pod.spec.unwrap().tolerations.unwrap(),
            [own, toleration("node.kubernetes.io/not-ready", Some(30))]
        );

        // Tolerating everything tolerates both.
        let everything =
            Toleration { operator: Some("Exists".to_owned()), ..Toleration::default() };
        let mut pod = super::Pod {
            spec: Some(PodSpec {
                containers: vec![container("a", "x")],
                tolerations: Some(vec![everything.clone()]),
                ..PodSpec::default()
            }),
            ..super::Pod::default()
        };
        strategy.default(&mut pod);
        assert_eq!(pod.spec.unwrap().tolerations.unwrap(), [everything]);
    }
}
