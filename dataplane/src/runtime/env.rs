//! A container's environment, as the kubelet makes it (`makeEnvironmentVariables`): defaults,
//! then `envFrom` in order, then `env` in order, each later name replacing an earlier one.
//!
//! - `value` may refer to variables defined before it as `$(NAME)` (`$$` is a literal `$`); a
//!   reference to an undefined variable stays as written.
//! - `valueFrom.fieldRef`: `metadata.name`, `metadata.namespace`, `metadata.uid`,
//!   `metadata.labels['k']`, `metadata.annotations['k']` (and the whole maps), `spec.nodeName`,
//!   `spec.serviceAccountName`, `status.podIP(s)`, `status.hostIP(s)`.
//! - `valueFrom.resourceFieldRef`: `limits.*` and `requests.*` of `cpu`, `memory` and
//!   `ephemeral-storage` of this or a named container, divided by `divisor` and rounded up; an
//!   unset limit is the node's allocatable amount, an unset request its limit (or 0).
//! - `valueFrom.configMapKeyRef` and `envFrom[].configMapRef`, from the ConfigMaps NodeSync
//!   delivered; `optional` ones that are missing are left out.
//!
//! A required ConfigMap or key that is missing is an error with the kubelet's message; the
//! container then waits with reason `CreateContainerConfigError`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, ObjectFieldSelector, Pod};
use strait_controlplane::api::quantity;

/// The PATH a container gets unless its spec sets one (the kubelet's runtimes use the same).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the node knows about a pod beyond its spec, for `fieldRef`s.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub pod_ip: Option<std::net::Ipv4Addr>,
    pub host_ip: std::net::Ipv4Addr,
}

/// The node's allocatable CPU (millicores) and memory (bytes): the default of unset limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAllocatable {
    pub cpu_milli: u64,
    pub memory: u64,
    pub ephemeral_storage: u64,
}

/// A container's environment, and the warnings to report about it (keys of an `envFrom`
/// source that are not valid variable names, which the kubelet skips).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    pub vars: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

impl Environment {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(k, _)| k == name) {
            Some(entry) => entry.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }
}

/// Why `name` is not an environment variable name the kubelet accepts (`IsEnvVarName`).
pub fn env_var_name_error(name: &str) -> Option<&'static str> {
    let first_ok =
        name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || "-._".contains(c));
    let rest_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    (!(first_ok && rest_ok)).then_some(
        "a valid environment variable name must consist of alphabetic characters, digits, '_', \
         '-', or '.', and must not start with a digit",
    )
}

/// Expands `$(NAME)` references to variables of `env` (`$$` → `$`), as the kubelet does for
/// `value`, `command` and `args`; unknown references are kept as written.
pub fn expand(input: &str, env: &Environment) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[at..at + 2 + end + 1]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The environment of `container` in `pod`. `config_map` finds a ConfigMap of the pod's
/// namespace by name. The error is the message of a `CreateContainerConfigError`.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    node: &NodeAllocatable,
    config_map: &dyn Fn(&str) -> Option<std::sync::Arc<ConfigMap>>,
) -> Result<Environment, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Environment::default();
    env.set("PATH", DEFAULT_PATH.to_owned());
    env.set("HOSTNAME", name);
    for source in container.env_from.iter().flatten() {
        let Some(reference) = &source.config_map_ref else { continue };
        let optional = reference.optional == Some(true);
        let Some(found) = config_map(&reference.name) else {
            if optional {
                continue;
            }
            return Err(format!("configmap \"{}\" not found", reference.name));
        };
        let prefix = source.prefix.as_deref().unwrap_or_default();
        let mut invalid = Vec::new();
        for (key, value) in found.data.iter().flatten() {
            let var = format!("{prefix}{key}");
            if env_var_name_error(&var).is_some() {
                invalid.push(var);
                continue;
            }
            env.set(&var, value.clone());
        }
        if !invalid.is_empty() {
            env.warnings.push(format!(
                "Keys [{}] from the EnvFrom configMap {namespace}/{} were skipped since they are considered invalid environment variable names.",
                invalid.join(", "),
                reference.name
            ));
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                field_value(pod, field, facts)?
            } else if let Some(resource) = &from.resource_field_ref {
                let target = match resource.container_name.as_deref().filter(|n| !n.is_empty()) {
                    None => container,
                    Some(other) => find_container(pod, other).ok_or_else(|| {
                        format!("env {}: resourceFieldRef names no container {other:?}", var.name)
                    })?,
                };
                resource_value(target, &resource.resource, resource.divisor.as_ref(), node)
                    .map_err(|why| format!("env {}: {why}", var.name))?
            } else if let Some(reference) = &from.config_map_key_ref {
                let optional = reference.optional == Some(true);
                let Some(found) = config_map(&reference.name) else {
                    if optional {
                        continue;
                    }
                    return Err(format!("configmap \"{}\" not found", reference.name));
                };
                match found.data.as_ref().and_then(|d| d.get(&reference.key)) {
                    Some(value) => value.clone(),
                    None if optional => continue,
                    None => {
                        return Err(format!(
                            "couldn't find key {} in ConfigMap {namespace}/{}",
                            reference.key, reference.name
                        ));
                    }
                }
            } else if from.secret_key_ref.is_some() {
                return Err(format!("env {}: secrets are not supported by strait", var.name));
            } else {
                String::new()
            }
        } else {
            expand(var.value.as_deref().unwrap_or_default(), &env)
        };
        env.set(&var.name, value);
    }
    Ok(env)
}

fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).find(|c| c.name == name)
}

/// A label or annotation map as the downward API prints it: `key="value"` lines, sorted.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

/// `metadata.labels['app']` → `("metadata.labels", "app")`.
fn subscript(path: &str) -> Option<(&str, &str)> {
    let (field, rest) = path.split_once('[')?;
    let key = rest.strip_suffix(']')?;
    let key = key.strip_prefix('\'').and_then(|k| k.strip_suffix('\''))?;
    Some((field, key))
}

fn field_value(pod: &Pod, field: &ObjectFieldSelector, facts: &PodFacts) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = field.field_path.as_str();
    if let Some((map, key)) = subscript(path) {
        let values = match map {
            "metadata.labels" => meta.labels.as_ref(),
            "metadata.annotations" => meta.annotations.as_ref(),
            _ => return Err(format!("fieldRef {path} is not supported")),
        };
        return Ok(values.and_then(|m| m.get(key)).cloned().unwrap_or_default());
    }
    let text = |value: Option<&String>| value.cloned().unwrap_or_default();
    Ok(match path {
        "metadata.name" => text(meta.name.as_ref()),
        "metadata.namespace" => text(meta.namespace.as_ref()),
        "metadata.uid" => text(meta.uid.as_ref()),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => text(spec.and_then(|s| s.node_name.as_ref())),
        "spec.serviceAccountName" => text(spec.and_then(|s| s.service_account_name.as_ref())),
        "status.podIP" | "status.podIPs" => {
            facts.pod_ip.map(|ip| ip.to_string()).unwrap_or_default()
        }
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        other => return Err(format!("fieldRef {other} is not supported")),
    })
}

/// The value of `limits.cpu` etc. of `container`, in units of `divisor` rounded up, as the
/// downward API gives it (`ExtractContainerResourceValue` with defaulted limits).
fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    node: &NodeAllocatable,
) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("resource {resource:?} is not supported"))?;
    let resources = container.resources.clone().unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let (scale, allocatable) = match name {
        "cpu" => (1000.0, node.cpu_milli),
        "memory" => (1.0, node.memory),
        "ephemeral-storage" => (1.0, node.ephemeral_storage),
        _ => return Err(format!("resource {resource:?} is not supported")),
    };
    let amount = |map: &BTreeMap<
        String,
        k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    >| { map.get(name).and_then(|q| quantity::scaled(&q.0, scale)) };
    let value = match kind {
        "limits" => amount(&limits).unwrap_or(allocatable),
        "requests" => amount(&requests).or_else(|| amount(&limits)).unwrap_or(0),
        _ => return Err(format!("resource {resource:?} is not supported")),
    };
    let divisor = match divisor {
        Some(divisor) => quantity::value(&divisor.0)
            .filter(|d| *d > 0.0)
            .ok_or_else(|| format!("divisor {:?} is not a positive quantity", divisor.0))?,
        None => 1.0,
    } * scale;
    Ok(((value as f64 / divisor).ceil() as u64).to_string())
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use serde_json::json;

    use super::{Environment, NodeAllocatable, PodFacts, container_env, expand};

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {"owner": "team-a"},
            },
            "spec": {"nodeName": "node-2", "serviceAccountName": "default", "containers": containers},
        }))
        .unwrap()
    }

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: Some(Ipv4Addr::new(10, 244, 2, 7)),
            host_ip: Ipv4Addr::new(172, 20, 0, 12),
        }
    }

    const NODE: NodeAllocatable =
        NodeAllocatable { cpu_milli: 2000, memory: 8 << 30, ephemeral_storage: 100 << 30 };

    fn config_maps() -> impl Fn(&str) -> Option<Arc<ConfigMap>> {
        |name: &str| {
            (name == "settings").then(|| {
                Arc::new(
                    serde_json::from_value(json!({
                        "metadata": {"name": "settings", "namespace": "shop"},
                        "data": {"mode": "fast", "LEVEL": "3", "bad key": "x"},
                    }))
                    .unwrap(),
                )
            })
        }
    }

    fn env_of(containers: serde_json::Value) -> Result<Environment, String> {
        let pod = pod(containers);
        let container = &pod.spec.as_ref().unwrap().containers[0];
        container_env(&pod, container, &facts(), &NODE, &config_maps())
    }

    fn var(env: &Environment, name: &str) -> Option<String> {
        env.get(name).map(str::to_owned)
    }

    #[test]
    fn field_refs_give_the_pods_identity_addresses_labels_and_annotations() {
        let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
        let env = env_of(json!([{"name": "c", "env": [
            field("NAME", "metadata.name"),
            field("NS", "metadata.namespace"),
            field("UID", "metadata.uid"),
            field("IP", "status.podIP"),
            field("HOST", "status.hostIP"),
            field("NODE", "spec.nodeName"),
            field("APP", "metadata.labels['app']"),
            field("OWNER", "metadata.annotations['owner']"),
            field("NONE", "metadata.labels['missing']"),
            field("LABELS", "metadata.labels"),
        ]}]))
        .unwrap();
        for (name, value) in [
            ("NAME", "web"),
            ("NS", "shop"),
            ("UID", "u-1"),
            ("IP", "10.244.2.7"),
            ("HOST", "172.20.0.12"),
            ("NODE", "node-2"),
            ("APP", "web"),
            ("OWNER", "team-a"),
            ("NONE", ""),
            ("LABELS", "app=\"web\"\ntier=\"front\""),
            ("HOSTNAME", "web"),
        ] {
            assert_eq!(var(&env, name).as_deref(), Some(value), "{name}");
        }
        let unsupported = env_of(json!([{"name": "c", "env": [field("X", "spec.hostname")]}]));
        assert!(unsupported.unwrap_err().contains("spec.hostname"));
    }

    #[test]
    fn resource_field_refs_divide_and_round_up_with_node_allocatable_for_unset_limits() {
        let resource =
            |name: &str, resource: &str, divisor: Option<&str>, container: Option<&str>| {
                let mut reference = json!({"resource": resource});
                if let Some(divisor) = divisor {
                    reference["divisor"] = json!(divisor);
                }
                if let Some(container) = container {
                    reference["containerName"] = json!(container);
                }
                json!({"name": name, "valueFrom": {"resourceFieldRef": reference}})
            };
        let env = env_of(json!([
            {"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}, "env": [
                resource("CPU", "limits.cpu", None, None),
                resource("CPU_M", "limits.cpu", Some("1m"), None),
                resource("MEM_MI", "limits.memory", Some("1Mi"), None),
                resource("REQ_CPU_M", "requests.cpu", Some("1m"), None),
                resource("OTHER_MEM", "limits.memory", None, Some("side")),
                resource("OTHER_REQ", "requests.memory", None, Some("side")),
            ]},
            {"name": "side"},
        ]))
        .unwrap();
        assert_eq!(var(&env, "CPU").as_deref(), Some("1"), "250m rounds up to one core");
        assert_eq!(var(&env, "CPU_M").as_deref(), Some("250"));
        assert_eq!(var(&env, "MEM_MI").as_deref(), Some("64"));
        assert_eq!(
            var(&env, "REQ_CPU_M").as_deref(),
            Some("250"),
            "a request defaults to its limit"
        );
        assert_eq!(var(&env, "OTHER_MEM").as_deref(), Some("8589934592"), "node allocatable");
        assert_eq!(var(&env, "OTHER_REQ").as_deref(), Some("0"));
    }

    #[test]
    fn config_map_keys_fill_env_and_missing_required_ones_are_errors_with_the_kubelets_words() {
        let key = |name: &str, cm: &str, key: &str, optional: bool| json!({"name": name, "valueFrom": {"configMapKeyRef": {"name": cm, "key": key, "optional": optional}}});
        let env = env_of(json!([{"name": "c",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            key("MODE", "settings", "mode", false),
            key("GONE", "settings", "nothing", true),
            key("ALSO_GONE", "absent", "x", true),
            {"name": "CFG_LEVEL", "value": "override"},
        ]}]))
        .unwrap();
        assert_eq!(var(&env, "MODE").as_deref(), Some("fast"));
        assert_eq!(var(&env, "CFG_mode").as_deref(), Some("fast"));
        assert_eq!(var(&env, "CFG_LEVEL").as_deref(), Some("override"), "env wins over envFrom");
        assert_eq!(var(&env, "GONE"), None);
        assert_eq!(var(&env, "ALSO_GONE"), None);
        assert_eq!(env.warnings.len(), 1);
        assert!(env.warnings[0].contains("[CFG_bad key]"), "{}", env.warnings[0]);

        let missing_key =
            env_of(json!([{"name": "c", "env": [key("K", "settings", "nothing", false)]}]));
        assert_eq!(
            missing_key.unwrap_err(),
            "couldn't find key nothing in ConfigMap shop/settings"
        );
        let missing_map = env_of(json!([{"name": "c", "env": [key("K", "absent", "x", false)]}]));
        assert_eq!(missing_map.unwrap_err(), "configmap \"absent\" not found");
        let missing_from =
            env_of(json!([{"name": "c", "envFrom": [{"configMapRef": {"name": "absent"}}]}]));
        assert_eq!(missing_from.unwrap_err(), "configmap \"absent\" not found");
    }

    #[test]
    fn values_expand_earlier_variables_and_keep_unknown_references() {
        let env = env_of(json!([{"name": "c", "env": [
            {"name": "A", "value": "one"},
            {"name": "B", "value": "$(A)-two $(NOPE) $$(A) $"},
        ]}]))
        .unwrap();
        assert_eq!(var(&env, "B").as_deref(), Some("one-two $(NOPE) $(A) $"));
        assert_eq!(expand("$(HOSTNAME)!", &env), "web!");
    }
}
