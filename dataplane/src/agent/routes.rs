//! Native (host-gw style) routing between nodes: a route to every other node's podCIDR via
//! that node's address, and an `unreachable` route for this node's own podCIDR so that a packet
//! for an address no local pod holds fails at once instead of wandering. Pod `/32` routes are
//! the CNI plugin's (another route protocol) and are never touched here.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;

use crate::netlink::{self, Ipv4Route, NetlinkError, ROUTE_PROTOCOL_STRAIT};

/// One node as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoute {
    pub address: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

/// The routes this node should have, given every node (itself included) and the service CIDR.
///
/// The service CIDR is `unreachable`: the eBPF load balancer translates service addresses
/// before routing, so a packet still addressed to a VIP has no backend and must be refused at
/// once, never forwarded toward a default route (DESIGN.md, Network safety).
pub fn desired_routes(
    own_name: &str,
    nodes: &BTreeMap<String, NodeRoute>,
    service_cidr: Ipv4Net,
) -> Vec<Ipv4Route> {
    let mut routes: Vec<Ipv4Route> = nodes
        .iter()
        .map(|(name, node)| {
            if name == own_name {
                Ipv4Route::unreachable(node.pod_cidr)
            } else {
                Ipv4Route::via(node.pod_cidr, node.address)
            }
        })
        .chain([Ipv4Route::unreachable(service_cidr)])
        .collect();
    routes.sort_by_key(|route| route.destination);
    routes.dedup_by_key(|route| route.destination);
    routes
}

/// What a reconcile pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub installed: Vec<Ipv4Net>,
    pub removed: Vec<Ipv4Net>,
}

/// Whether an installed route already does what `wanted` asks. The kernel reports extra
/// attributes (the output interface of a gateway route), so only what strait sets is compared.
fn same_route(installed: &Ipv4Route, wanted: &Ipv4Route) -> bool {
    installed.destination == wanted.destination
        && installed.kind == wanted.kind
        && installed.gateway == wanted.gateway
}

/// Makes the node's strait routes equal to `desired`: installs what is missing or different,
/// removes strait routes nobody wants any more. Touches nothing else; repeating it is harmless.
pub async fn reconcile_routes(
    handle: &rtnetlink::Handle,
    desired: &[Ipv4Route],
) -> Result<RouteChanges, NetlinkError> {
    let installed = netlink::routes_with_protocol(handle, ROUTE_PROTOCOL_STRAIT).await?;
    let mut changes = RouteChanges::default();
    for route in &installed {
        if !desired.iter().any(|wanted| same_route(route, wanted)) {
            // A route being replaced is overwritten below; delete only true leftovers.
            if !desired.iter().any(|wanted| wanted.destination == route.destination) {
                netlink::delete_route(handle, route).await?;
                changes.removed.push(route.destination);
            }
        }
    }
    for wanted in desired {
        if !installed.iter().any(|route| same_route(route, wanted)) {
            netlink::replace_route(handle, wanted).await?;
            changes.installed.push(wanted.destination);
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{NodeRoute, desired_routes};
    use crate::netlink::RouteKind;

    #[test]
    fn every_other_node_is_reached_via_its_address_and_the_own_range_is_unreachable() {
        let nodes: BTreeMap<String, NodeRoute> = [
            ("node-1", "172.20.0.11", "10.244.0.0/24"),
            ("node-2", "172.20.0.12", "10.244.1.0/24"),
            ("node-3", "172.20.0.13", "10.244.2.0/24"),
        ]
        .into_iter()
        .map(|(n, a, c)| {
            (n.to_owned(), NodeRoute { address: a.parse().unwrap(), pod_cidr: c.parse().unwrap() })
        })
        .collect();
        let routes = desired_routes("node-2", &nodes, "10.96.0.0/16".parse().unwrap());
        assert_eq!(routes.len(), 4);
        let services = routes
            .iter()
            .find(|r| r.destination.to_string() == "10.96.0.0/16")
            .expect("service CIDR");
        assert_eq!(services.kind, RouteKind::Unreachable);
        let own = routes
            .iter()
            .find(|r| r.destination.to_string() == "10.244.1.0/24")
            .expect("own range");
        assert_eq!(own.kind, RouteKind::Unreachable);
        let other =
            routes.iter().find(|r| r.destination.to_string() == "10.244.2.0/24").expect("node-3");
        assert_eq!(other.gateway, Some("172.20.0.13".parse().unwrap()));
        assert_eq!(other.kind, RouteKind::Unicast);
    }
}
