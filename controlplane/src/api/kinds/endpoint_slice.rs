//! EndpointSlices (`discovery.k8s.io/v1`): namespaced, no status. The endpoint slice
//! controller writes them for services with a selector; users write them for services
//! without one. Validation follows Kubernetes' limits (100 addresses per endpoint, 1000
//! endpoints and 100 ports per slice).

use std::collections::HashSet;

use async_trait::async_trait;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use serde_json::Value;

use crate::api::{
    error::{ApiError, FieldError},
    kind::{KindInfo, Strategy},
    table::{self, Column},
    validation::{self, NameRule},
};

/// The label that ties a slice to its service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming the controller (or tool) that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const ADDRESS_TYPE_IPV4: &str = "IPv4";

const INFO: KindInfo = KindInfo {
    has_status: false,
    ..KindInfo::of::<EndpointSlice>("endpointslice", true, &[], NameRule::Subdomain)
};

const ADDRESS_TYPES: [&str; 3] = [ADDRESS_TYPE_IPV4, "IPv6", "FQDN"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_PORTS: usize = 100;
/// How many ports or addresses the table shows before `+ N more...`.
const SHOWN_IN_TABLE: usize = 3;

/// Where slices live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// The service a slice belongs to (its `kubernetes.io/service-name` label).
pub fn service_name(slice: &EndpointSlice) -> Option<&str> {
    slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL).map(String::as_str)
}

#[derive(Debug, Default)]
pub struct EndpointSliceStrategy;

fn validate_address(address_type: &str, address: &str) -> Option<String> {
    match address_type {
        "IPv4" => address
            .parse::<std::net::Ipv4Addr>()
            .is_err()
            .then(|| "must be a valid IPv4 address".to_owned()),
        "IPv6" => address
            .parse::<std::net::Ipv6Addr>()
            .is_err()
            .then(|| "must be a valid IPv6 address".to_owned()),
        _ => validation::dns1123_subdomain(address),
    }
}

fn validate_ports(ports: &[EndpointPort], errors: &mut Vec<FieldError>) {
    if ports.len() > MAX_PORTS {
        errors.push(FieldError::forbidden("ports", format!("must have at most {MAX_PORTS} items")));
    }
    let mut names = HashSet::new();
    for (index, port) in ports.iter().enumerate() {
        let path = format!("ports[{index}]");
        let name = port.name.as_deref().unwrap_or_default();
        if !name.is_empty()
            && let Some(why) = validation::dns1123_label(name)
        {
            errors.push(FieldError::invalid(format!("{path}.name"), name, why));
        }
        if !names.insert(name) {
            errors.push(FieldError::duplicate(format!("{path}.name"), name));
        }
        match port.protocol.as_deref() {
            None => errors.push(FieldError::required(format!("{path}.protocol"), "")),
            Some(protocol) if !PROTOCOLS.contains(&protocol) => errors
                .push(FieldError::not_supported(format!("{path}.protocol"), protocol, &PROTOCOLS)),
            Some(_) => {}
        }
        if let Some(number) = port.port
            && !(1..=65535).contains(&number)
        {
            errors.push(FieldError::invalid(
                format!("{path}.port"),
                number,
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
}

/// `80,443` or `80,443,8080 + 2 more...`; `<unset>` without ports.
fn list_with_more(items: Vec<String>, total: usize) -> String {
    if items.is_empty() {
        return "<unset>".to_owned();
    }
    let shown = items.join(",");
    if total > items.len() { format!("{shown} + {} more...", total - items.len()) } else { shown }
}

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("AddressType", "The type of the addresses of the endpoints"),
    Column::new("Ports", "The ports of the endpoints"),
    Column::new("Endpoints", "The addresses of the endpoints"),
    Column::new("Age", "Time since the slice was created"),
];

#[async_trait]
impl Strategy for EndpointSliceStrategy {
    type Object = EndpointSlice;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_status_update(&self, new: &mut EndpointSlice, old: &EndpointSlice) {
        // There is no status subresource: nothing may change through it.
        *new = old.clone();
    }

    fn validate(&self, slice: &EndpointSlice) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let address_type = slice.address_type.as_str();
        if address_type.is_empty() {
            errors.push(FieldError::required("addressType", ""));
        } else if !ADDRESS_TYPES.contains(&address_type) {
            errors.push(FieldError::not_supported("addressType", address_type, &ADDRESS_TYPES));
        }
        if slice.endpoints.len() > MAX_ENDPOINTS {
            errors.push(FieldError::forbidden(
                "endpoints",
                format!("must have at most {MAX_ENDPOINTS} items"),
            ));
        }
        for (index, endpoint) in slice.endpoints.iter().enumerate() {
            let path = format!("endpoints[{index}]");
            if endpoint.addresses.is_empty() {
                errors.push(FieldError::required(
                    format!("{path}.addresses"),
                    "must contain at least 1 address",
                ));
            } else if endpoint.addresses.len() > MAX_ADDRESSES {
                errors.push(FieldError::forbidden(
                    format!("{path}.addresses"),
                    format!("must have at most {MAX_ADDRESSES} items"),
                ));
            }
            if ADDRESS_TYPES.contains(&address_type) {
                for (i, address) in endpoint.addresses.iter().enumerate() {
                    if let Some(why) = validate_address(address_type, address) {
                        errors.push(FieldError::invalid(
                            format!("{path}.addresses[{i}]"),
                            address.as_str(),
                            why,
                        ));
                    }
                }
            }
            if let Some(node) = endpoint.node_name.as_deref().filter(|n| !n.is_empty())
                && let Some(why) = validation::dns1123_subdomain(node)
            {
                errors.push(FieldError::invalid(format!("{path}.nodeName"), node, why));
            }
            if let Some(hostname) = endpoint.hostname.as_deref()
                && let Some(why) = validation::dns1123_label(hostname)
            {
                errors.push(FieldError::invalid(format!("{path}.hostname"), hostname, why));
            }
        }
        validate_ports(slice.ports.as_deref().unwrap_or_default(), &mut errors);
        errors
    }

    fn validate_update(&self, new: &EndpointSlice, old: &EndpointSlice) -> Vec<FieldError> {
        if new.address_type != old.address_type {
            return vec![FieldError::invalid(
                "addressType",
                new.address_type.as_str(),
                "field is immutable",
            )];
        }
        Vec::new()
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, slice: &EndpointSlice) -> Vec<Value> {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let shown_ports: Vec<String> = ports
            .iter()
            .take(SHOWN_IN_TABLE)
            .map(|p| match (p.port, p.name.as_deref()) {
                (Some(number), _) => number.to_string(),
                (None, Some(name)) if !name.is_empty() => name.to_owned(),
                _ => "*".to_owned(),
            })
            .collect();
        let addresses: Vec<&String> = slice.endpoints.iter().flat_map(|e| &e.addresses).collect();
        let shown_addresses: Vec<String> =
            addresses.iter().take(SHOWN_IN_TABLE).map(|a| (*a).clone()).collect();
        vec![
            slice.metadata.name.clone().unwrap_or_default().into(),
            slice.address_type.clone().into(),
            list_with_more(shown_ports, ports.len()).into(),
            list_with_more(shown_addresses, addresses.len()).into(),
            table::age(slice.metadata.creation_timestamp.as_ref()).into(),
        ]
    }
}

/// Refuses a slice write the server cannot accept, before it is attempted (for controllers
/// that build slices).
pub fn check(slice: &EndpointSlice) -> Result<(), ApiError> {
    let causes = EndpointSliceStrategy.validate(slice);
    if causes.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid {
        kind: INFO.kind.to_owned(),
        name: slice.metadata.name.clone().unwrap_or_default(),
        causes,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

    use super::{EndpointSliceStrategy, list_with_more};
    use crate::api::kind::Strategy;

    #[test]
    fn addresses_match_the_address_type_and_ports_are_checked() {
        let slice = EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints: vec![
                Endpoint { addresses: vec!["10.244.1.5".to_owned()], ..Endpoint::default() },
                Endpoint { addresses: vec!["fd00::1".to_owned()], ..Endpoint::default() },
                Endpoint::default(),
            ],
            ports: Some(vec![
                EndpointPort {
                    name: Some("http".to_owned()),
                    port: Some(8080),
                    protocol: Some("TCP".to_owned()),
                    ..EndpointPort::default()
                },
                EndpointPort {
                    name: Some("http".to_owned()),
                    port: Some(0),
                    protocol: Some("TCP".to_owned()),
                    ..EndpointPort::default()
                },
            ]),
            ..EndpointSlice::default()
        };
        let fields: Vec<String> =
            EndpointSliceStrategy.validate(&slice).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "endpoints[1].addresses[0]",
                "endpoints[2].addresses",
                "ports[1].name",
                "ports[1].port"
            ]
        );
    }

    #[test]
    fn table_lists_shorten_after_three() {
        let items = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(list_with_more(items(2), 2), "0,1");
        assert_eq!(list_with_more(items(3), 5), "0,1,2 + 2 more...");
        assert_eq!(list_with_more(Vec::new(), 0), "<unset>");
    }
}
