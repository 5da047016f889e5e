//! Services: namespaced; Kubernetes' defaults and validation for the ClusterIP type (NodePort,
//! LoadBalancer and ExternalName come later). A service receives its cluster IP in the
//! transaction that creates it and gives it back in the one that deletes it.

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::{
        ClientIPConfig, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
        SessionAffinityConfig,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};

use crate::{
    api::{
        error::{ApiError, FieldError},
        kind::{DeletePlan, DeleteRequest, KindInfo, Strategy, TxnExtras},
        table::{self, Column},
        validation::{self, NameRule},
    },
    ipam::{
        ServiceIpAllocator, ServiceIpError,
        service_ip::{RequestedIpError, ServiceIpOwner},
    },
    store::Store,
};

pub const TYPE_CLUSTER_IP: &str = "ClusterIP";
/// `spec.clusterIP` of a headless service: no VIP, DNS answers with the endpoints.
pub const CLUSTER_IP_NONE: &str = "None";
pub const AFFINITY_NONE: &str = "None";
pub const AFFINITY_CLIENT_IP: &str = "ClientIP";
/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10800;
/// The longest ClientIP affinity timeout Kubernetes accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86400;
pub const TRAFFIC_POLICY_CLUSTER: &str = "Cluster";
pub const TRAFFIC_POLICY_LOCAL: &str = "Local";

const INFO: KindInfo = KindInfo {
    categories: &["all"],
    ..KindInfo::of::<Service>("service", true, &["svc"], NameRule::Label)
};

const TYPES: [&str; 4] = [TYPE_CLUSTER_IP, "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];
const AFFINITIES: [&str; 2] = [AFFINITY_NONE, AFFINITY_CLIENT_IP];
const TRAFFIC_POLICIES: [&str; 2] = [TRAFFIC_POLICY_CLUSTER, TRAFFIC_POLICY_LOCAL];
const IP_FAMILY_POLICIES: [&str; 3] = ["SingleStack", "PreferDualStack", "RequireDualStack"];
const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

/// Where services live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// `spec.clusterIP`, empty when unset.
pub fn cluster_ip(service: &Service) -> &str {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()).unwrap_or_default()
}

pub fn is_headless(service: &Service) -> bool {
    cluster_ip(service) == CLUSTER_IP_NONE
}

/// The ClientIP affinity timeout, `None` without affinity.
pub fn affinity_timeout_seconds(service: &Service) -> Option<i32> {
    let spec = service.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some(AFFINITY_CLIENT_IP) {
        return None;
    }
    Some(
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
    )
}

pub struct ServiceStrategy {
    cluster_ips: Arc<ServiceIpAllocator>,
}

impl ServiceStrategy {
    pub fn new(cluster_ips: Arc<ServiceIpAllocator>) -> Self {
        Self { cluster_ips }
    }

    pub fn cluster_ips(&self) -> &Arc<ServiceIpAllocator> {
        &self.cluster_ips
    }
}

fn validate_port(
    index: usize,
    port: &ServicePort,
    named_required: bool,
    names: &mut HashSet<String>,
    keys: &mut HashSet<(i32, String)>,
    errors: &mut Vec<FieldError>,
) {
    let path = format!("spec.ports[{index}]");
    match port.name.as_deref().filter(|n| !n.is_empty()) {
        None if named_required => errors.push(FieldError::required(format!("{path}.name"), "")),
        None => {}
        Some(name) => {
            if let Some(why) = validation::dns1123_label(name) {
                errors.push(FieldError::invalid(format!("{path}.name"), name, why));
            } else if !names.insert(name.to_owned()) {
                errors.push(FieldError::duplicate(format!("{path}.name"), name));
            }
        }
    }
    if !(1..=65535).contains(&port.port) {
        errors.push(FieldError::invalid(format!("{path}.port"), port.port, PORT_RANGE));
    }
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    if !PROTOCOLS.contains(&protocol) {
        errors.push(FieldError::not_supported(format!("{path}.protocol"), protocol, &PROTOCOLS));
    } else if !keys.insert((port.port, protocol.to_owned())) {
        errors.push(FieldError::duplicate(
            path.clone(),
            json!({"port": port.port, "protocol": protocol}),
        ));
    }
    match &port.target_port {
        // A target port defaulted from an invalid port is reported once, on the port.
        Some(IntOrString::Int(number)) if !(1..=65535).contains(number) && *number != port.port => {
            errors.push(FieldError::invalid(format!("{path}.targetPort"), *number, PORT_RANGE));
        }
        Some(IntOrString::String(name)) => {
            if let Some(why) = validation::iana_service_name(name) {
                errors.push(FieldError::invalid(format!("{path}.targetPort"), name.as_str(), why));
            }
        }
        _ => {}
    }
    if port.node_port.is_some_and(|p| p != 0) {
        errors.push(FieldError::forbidden(
            format!("{path}.nodePort"),
            "may not be used when `type` is 'ClusterIP'",
        ));
    }
}

fn validate_cluster_ips(spec: &ServiceSpec, errors: &mut Vec<FieldError>) {
    let ip = spec.cluster_ip.as_deref().unwrap_or_default();
    if !ip.is_empty() && ip != CLUSTER_IP_NONE {
        match ip.parse::<std::net::IpAddr>() {
            Err(_) => errors.push(FieldError::invalid(
                "spec.clusterIP",
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
            Ok(std::net::IpAddr::V6(_)) => errors.push(FieldError::invalid(
                "spec.clusterIP",
                ip,
                "only IPv4 cluster IPs are served (this cluster is single-stack IPv4)",
            )),
            Ok(std::net::IpAddr::V4(_)) => {}
        }
    }
    if let Some(ips) = &spec.cluster_ips {
        if ips.len() > 1 {
            errors.push(FieldError::invalid(
                "spec.clusterIPs",
                ips.join(","),
                "may specify no more than one IP for each IP family (this cluster is IPv4 only)",
            ));
        }
        if let Some(first) = ips.first()
            && first != ip
        {
            errors.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                first.as_str(),
                "must be equal to clusterIP",
            ));
        }
    }
}

fn validate_spec(spec: &ServiceSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let kind = spec.type_.as_deref().unwrap_or(TYPE_CLUSTER_IP);
    if kind != TYPE_CLUSTER_IP {
        let mut error = FieldError::not_supported("spec.type", kind, &[TYPE_CLUSTER_IP]);
        if TYPES.contains(&kind) {
            error.detail = format!("{kind} services are not supported yet; {}", error.detail);
        }
        errors.push(error);
    }
    validate_cluster_ips(spec, &mut errors);
    let headless = spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless {
        errors.push(FieldError::required("spec.ports", ""));
    }
    let (mut names, mut keys) = (HashSet::new(), HashSet::new());
    for (index, port) in ports.iter().enumerate() {
        validate_port(index, port, ports.len() > 1, &mut names, &mut keys, &mut errors);
    }
    if let Some(selector) = &spec.selector {
        validation::labels("spec.selector", selector, &mut errors);
    }
    let affinity = spec.session_affinity.as_deref().unwrap_or(AFFINITY_NONE);
    if !AFFINITIES.contains(&affinity) {
        errors.push(FieldError::not_supported("spec.sessionAffinity", affinity, &AFFINITIES));
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    if affinity == AFFINITY_CLIENT_IP {
        if let Some(timeout) = timeout
            && !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&timeout)
        {
            errors.push(FieldError::invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                timeout,
                format!("must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT_SECONDS}"),
            ));
        }
    } else if spec.session_affinity_config.is_some() && timeout.is_some() {
        errors.push(FieldError::forbidden(
            "spec.sessionAffinityConfig",
            format!("must not be set when session affinity is {affinity}"),
        ));
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref()
        && !TRAFFIC_POLICIES.contains(&policy)
    {
        errors.push(FieldError::not_supported(
            "spec.internalTrafficPolicy",
            policy,
            &TRAFFIC_POLICIES,
        ));
    }
    for (index, family) in spec.ip_families.iter().flatten().enumerate() {
        if family != "IPv4" {
            errors.push(FieldError::not_supported(
                format!("spec.ipFamilies[{index}]"),
                family.as_str(),
                &["IPv4"],
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        Some("RequireDualStack") => errors.push(FieldError::invalid(
            "spec.ipFamilyPolicy",
            "RequireDualStack",
            "this cluster is configured for IPv4 only",
        )),
        Some(policy) if !IP_FAMILY_POLICIES.contains(&policy) => errors
            .push(FieldError::not_supported("spec.ipFamilyPolicy", policy, &IP_FAMILY_POLICIES)),
        _ => {}
    }
    errors
}

fn invalid_cluster_ip(service: &Service, value: &str, detail: String) -> ApiError {
    ApiError::Invalid {
        kind: INFO.kind.to_owned(),
        name: service.metadata.name.clone().unwrap_or_default(),
        causes: vec![FieldError::invalid("spec.clusterIP", value, detail)],
    }
}

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Type", "The type of the service"),
    Column::new("Cluster-IP", "The cluster IP of the service"),
    Column::new("External-IP", "The external IPs of the service"),
    Column::new("Port(s)", "The ports of the service"),
    Column::new("Age", "Time since the service was created"),
    Column::new("Selector", "The label selector of the pods the service sends traffic to").wide(),
];

/// `80/TCP,53/UDP` (with `:nodePort` when there is one), as `kubectl get svc` prints it.
fn ports_cell(ports: &[ServicePort]) -> String {
    if ports.is_empty() {
        return "<none>".to_owned();
    }
    let cells: Vec<String> = ports
        .iter()
        .map(|p| {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            match p.node_port.filter(|n| *n != 0) {
                Some(node_port) => format!("{}:{node_port}/{protocol}", p.port),
                None => format!("{}/{protocol}", p.port),
            }
        })
        .collect();
    cells.join(",")
}

#[async_trait]
impl Strategy for ServiceStrategy {
    type Object = Service;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, service: &mut Service) {
        let spec = service.spec.get_or_insert_with(ServiceSpec::default);
        spec.type_.get_or_insert_with(|| TYPE_CLUSTER_IP.to_owned());
        spec.session_affinity.get_or_insert_with(|| AFFINITY_NONE.to_owned());
        if spec.session_affinity.as_deref() == Some(AFFINITY_CLIENT_IP) {
            spec.session_affinity_config
                .get_or_insert_with(SessionAffinityConfig::default)
                .client_ip
                .get_or_insert_with(ClientIPConfig::default)
                .timeout_seconds
                .get_or_insert(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
        }
        spec.internal_traffic_policy.get_or_insert_with(|| TRAFFIC_POLICY_CLUSTER.to_owned());
        spec.ip_families.get_or_insert_with(|| vec!["IPv4".to_owned()]);
        spec.ip_family_policy.get_or_insert_with(|| "SingleStack".to_owned());
        for port in spec.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".to_owned());
            let unset = match &port.target_port {
                None => true,
                Some(IntOrString::Int(number)) => *number == 0,
                Some(IntOrString::String(name)) => name.is_empty(),
            };
            if unset {
                port.target_port = Some(IntOrString::Int(port.port));
            }
        }
        let ip = spec.cluster_ip.clone().filter(|ip| !ip.is_empty());
        let first = spec.cluster_ips.as_ref().and_then(|ips| ips.first()).cloned();
        match (ip, first) {
            (Some(ip), None) => spec.cluster_ips = Some(vec![ip]),
            (None, Some(first)) => spec.cluster_ip = Some(first),
            _ => {}
        }
    }

    fn prepare_for_create(&self, service: &mut Service) {
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus::default()),
            ..Default::default()
        });
    }

    fn prepare_for_update(&self, new: &mut Service, old: &Service) {
        new.status = old.status.clone();
        // A client that sends the service without its cluster IP (a replace of an edited
        // manifest) does not mean to change it: the allocated value is kept.
        let old_spec = old.spec.clone().unwrap_or_default();
        let spec = new.spec.get_or_insert_with(ServiceSpec::default);
        if spec.cluster_ip.as_deref().unwrap_or_default().is_empty() {
            spec.cluster_ip = old_spec.cluster_ip;
            if spec.cluster_ips.as_ref().is_none_or(Vec::is_empty) {
                spec.cluster_ips = old_spec.cluster_ips;
            }
        }
    }

    fn prepare_for_status_update(&self, new: &mut Service, old: &Service) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, service: &Service) -> Vec<FieldError> {
        match &service.spec {
            Some(spec) => validate_spec(spec),
            None => vec![FieldError::required("spec", "")],
        }
    }

    fn validate_update(&self, new: &Service, old: &Service) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let (new_spec, old_spec) =
            (new.spec.clone().unwrap_or_default(), old.spec.clone().unwrap_or_default());
        if new_spec.cluster_ip != old_spec.cluster_ip {
            errors.push(FieldError::invalid(
                "spec.clusterIP",
                new_spec.cluster_ip.unwrap_or_default(),
                "field is immutable",
            ));
        } else if new_spec.cluster_ips != old_spec.cluster_ips {
            errors.push(FieldError::invalid(
                "spec.clusterIPs",
                new_spec.cluster_ips.unwrap_or_default().join(","),
                "field is immutable",
            ));
        }
        errors
    }

    async fn before_create(
        &self,
        store: &dyn Store,
        service: &mut Service,
    ) -> Result<TxnExtras, ApiError> {
        let requested = cluster_ip(service).to_owned();
        if requested == CLUSTER_IP_NONE {
            return Ok(TxnExtras::default());
        }
        let owner = ServiceIpOwner {
            service: format!(
                "{}/{}",
                service.metadata.namespace.as_deref().unwrap_or_default(),
                service.metadata.name.as_deref().unwrap_or_default()
            ),
            uid: service.metadata.uid.clone().unwrap_or_default(),
        };
        let allocator = &self.cluster_ips;
        let claim = if requested.is_empty() {
            allocator
                .plan_next(store, &owner)
                .await
                .map_err(ApiError::store("planning a cluster IP"))?
                .ok_or_else(|| {
                    ApiError::internal(
                        "failed to allocate a cluster IP",
                        ServiceIpError::RangeFull { cidr: allocator.cidr() },
                    )
                })?
        } else {
            // Validation already refused anything but an IPv4 address here.
            let ip: Ipv4Addr = requested.parse().map_err(|_| {
                invalid_cluster_ip(service, &requested, "must be a valid IPv4 address".to_owned())
            })?;
            let planned = allocator
                .plan_requested(store, ip, &owner)
                .await
                .map_err(ApiError::store("reading cluster IP allocations"))?;
            match planned {
                Ok(claim) => claim,
                Err(RequestedIpError::AlreadyAllocated) => {
                    return Err(invalid_cluster_ip(
                        service,
                        &requested,
                        format!("failed to allocate IP {ip}: provided IP is already allocated"),
                    ));
                }
                Err(RequestedIpError::NotInRange) => {
                    return Err(invalid_cluster_ip(
                        service,
                        &requested,
                        format!(
                            "failed to allocate IP {ip}: provided IP is not in the valid range. \
                             The range of valid IPs is {}",
                            allocator.cidr()
                        ),
                    ));
                }
            }
        };
        let spec = service.spec.get_or_insert_with(ServiceSpec::default);
        spec.cluster_ip = Some(claim.ip.to_string());
        spec.cluster_ips = Some(vec![claim.ip.to_string()]);
        Ok(TxnExtras { compares: vec![claim.compare], ops: vec![claim.op] })
    }

    async fn plan_delete(
        &self,
        store: &dyn Store,
        service: &Service,
        _request: &DeleteRequest,
    ) -> Result<DeletePlan<Service>, ApiError> {
        let mut extras = TxnExtras::default();
        if let Ok(ip) = cluster_ip(service).parse::<Ipv4Addr>() {
            let uid = service.metadata.uid.as_deref().unwrap_or_default();
            let release = self
                .cluster_ips
                .plan_release(store, ip, uid)
                .await
                .map_err(ApiError::store("planning the release of a cluster IP"))?;
            if let Some((compare, op)) = release {
                extras.compares.push(compare);
                extras.ops.push(op);
            }
        }
        Ok(DeletePlan::Remove(extras))
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, service: &Service) -> Vec<Value> {
        let spec = service.spec.clone().unwrap_or_default();
        let or_none = |text: String| if text.is_empty() { "<none>".to_owned() } else { text };
        let selector: Vec<String> =
            spec.selector.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
        vec![
            service.metadata.name.clone().unwrap_or_default().into(),
            spec.type_.clone().unwrap_or_else(|| TYPE_CLUSTER_IP.to_owned()).into(),
            or_none(spec.cluster_ip.clone().unwrap_or_default()).into(),
            or_none(spec.external_ips.clone().unwrap_or_default().join(",")).into(),
            ports_cell(spec.ports.as_deref().unwrap_or_default()).into(),
            table::age(service.metadata.creation_timestamp.as_ref()).into(),
            or_none(selector.join(",")).into(),
        ]
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["spec.clusterIP", "spec.type"]
    }

    fn field_value(&self, service: &Service, field: &str) -> String {
        let spec = service.spec.as_ref();
        match field {
            "spec.clusterIP" => cluster_ip(service).to_owned(),
            "spec.type" => spec.and_then(|s| s.type_.clone()).unwrap_or_default(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{ServicePort, ServiceSpec},
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::{ports_cell, validate_spec};

    fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
        ServicePort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            port: number,
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        }
    }

    fn fields(spec: &ServiceSpec) -> Vec<String> {
        validate_spec(spec).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn port_rules_name_their_field() {
        let spec =
            |ports: Vec<ServicePort>| ServiceSpec { ports: Some(ports), ..Default::default() };
        assert!(fields(&spec(vec![port("", 80, "TCP")])).is_empty(), "one unnamed port is fine");
        assert_eq!(
            fields(&spec(vec![port("", 80, "TCP"), port("b", 81, "TCP")])),
            ["spec.ports[0].name"]
        );
        assert_eq!(
            fields(&spec(vec![port("a", 80, "TCP"), port("a", 81, "TCP")])),
            ["spec.ports[1].name"]
        );
        assert_eq!(
            fields(&spec(vec![port("a", 80, "TCP"), port("b", 80, "TCP")])),
            ["spec.ports[1]"]
        );
        assert!(fields(&spec(vec![port("a", 53, "TCP"), port("b", 53, "UDP")])).is_empty());
        assert_eq!(
            fields(&spec(vec![port("a", 80, "TCP"), port("b", 0, "TCP")])),
            ["spec.ports[1].port"]
        );
        assert_eq!(fields(&spec(vec![port("", 80, "SCTP")])), ["spec.ports[0].protocol"]);
        assert_eq!(fields(&spec(vec![port("Web", 80, "TCP")])), ["spec.ports[0].name"]);
        let mut named_target = port("", 80, "TCP");
        named_target.target_port = Some(IntOrString::String("http".to_owned()));
        assert!(fields(&spec(vec![named_target.clone()])).is_empty());
        named_target.target_port = Some(IntOrString::String("not--valid".to_owned()));
        assert_eq!(fields(&spec(vec![named_target])), ["spec.ports[0].targetPort"]);
        assert_eq!(fields(&ServiceSpec::default()), ["spec.ports"]);
        let headless =
            ServiceSpec { cluster_ip: Some("None".to_owned()), ..ServiceSpec::default() };
        assert!(fields(&headless).is_empty(), "a headless service needs no ports");
    }

    #[test]
    fn only_cluster_ip_services_for_now() {
        let spec = ServiceSpec {
            type_: Some("NodePort".to_owned()),
            ports: Some(vec![port("", 80, "TCP")]),
            ..ServiceSpec::default()
        };
        let errors = validate_spec(&spec);
        assert_eq!(errors[0].field, "spec.type");
        assert!(errors[0].to_string().contains("not supported yet"), "{}", errors[0]);
    }

    #[test]
    fn ports_print_like_kubectl() {
        assert_eq!(ports_cell(&[port("a", 80, "TCP"), port("b", 53, "UDP")]), "80/TCP,53/UDP");
        assert_eq!(ports_cell(&[]), "<none>");
    }
}
