//! The kernel side of an attachment: the veth pair, the pod's address, routes and neighbour,
//! the node's `/32` route, and the tc programs on the host veth (ingress: anti-spoofing then
//! service DNAT; egress: service reverse NAT), made, checked and removed over rtnetlink.
//!
//! Hairpin (a pod reaching itself through a VIP on the tc path) needs no pod sysctl: the tc
//! program gives such a request the VIP as its source, so it never arrives from the pod's own
//! address (which `accept_local=0` would drop) and the reply leaves the pod to be translated.
//!
//! The plugin runs in the node's namespace ("host side"); the pod side is reached through a
//! netlink socket opened inside the pod's namespace.

use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use strait_dataplane::{
    ebpf::antispoof,
    netlink::{self, Ipv4Route, ROUTE_PROTOCOL_STRAIT_POD},
    netns::NetNs,
};

use crate::{
    error::CniError,
    invocation::Attachment,
    naming,
    result::{AttachmentResult, POD_GATEWAY},
};

/// What ADD asks the kernel for.
pub struct AttachRequest<'a> {
    pub attachment: &'a Attachment,
    pub netns_path: &'a Path,
    pub pod_ip: Ipv4Addr,
    pub mtu: u32,
    pub anti_spoof_pin_dir: Option<&'a Path>,
}

fn host_route(pod_ip: Ipv4Addr, host_ifindex: u32) -> Ipv4Route {
    let mut route = Ipv4Route::on_link(Ipv4Net::from(pod_ip), host_ifindex);
    route.protocol = ROUTE_PROTOCOL_STRAIT_POD;
    route
}

fn gateway_route(pod_ifindex: u32) -> Ipv4Route {
    let mut route = Ipv4Route::on_link(Ipv4Net::from(POD_GATEWAY), pod_ifindex);
    route.protocol = ROUTE_PROTOCOL_STRAIT_POD;
    route
}

fn default_route(pod_ifindex: u32) -> Ipv4Route {
    let mut route = Ipv4Route::via(Ipv4Net::default(), POD_GATEWAY);
    route.output_interface = Some(pod_ifindex);
    route.protocol = ROUTE_PROTOCOL_STRAIT_POD;
    route
}

fn errno_is(error: &netlink::NetlinkError, errno: i32) -> bool {
    error.errno() == Some(errno)
}

/// Makes the attachment. On failure everything it made is removed again before it returns.
pub async fn attach(
    node: &Handle,
    pod_ns: &NetNs,
    request: &AttachRequest<'_>,
) -> Result<AttachmentResult, CniError> {
    let host_ifname = naming::host_veth_name(request.attachment);
    let temp_name = naming::pod_veth_temp_name(request.attachment);
    let created =
        netlink::create_veth(node, &host_ifname, &temp_name, pod_ns.fd(), Some(request.mtu)).await;
    match created {
        Ok(()) => {}
        Err(error) if errno_is(&error, libc::EEXIST) => {
            // A veth of this attachment's name is left from an ADD that died half-way (the
            // name is a function of container ID and ifname, so nobody else owns it).
            netlink::delete_link(node, &host_ifname)
                .await
                .map_err(CniError::netlink(format!("removing stale veth {host_ifname}")))?;
            netlink::create_veth(node, &host_ifname, &temp_name, pod_ns.fd(), Some(request.mtu))
                .await
                .map_err(CniError::netlink(format!(
                    "creating veth {host_ifname} with its peer in {}",
                    request.netns_path.display()
                )))?;
        }
        Err(error) => {
            return Err(CniError::netlink(format!(
                "creating veth {host_ifname} with its peer in {}",
                request.netns_path.display()
            ))(error));
        }
    }

    match configure(node, pod_ns, request, &host_ifname, &temp_name).await {
        Ok(result) => Ok(result),
        Err(error) => {
            if let Err(cleanup) = detach(node, &host_ifname, request.anti_spoof_pin_dir).await {
                eprintln!("strait-cni: rolling back the failed ADD: {cleanup}");
            }
            Err(error)
        }
    }
}

async fn configure(
    node: &Handle,
    pod_ns: &NetNs,
    request: &AttachRequest<'_>,
    host_ifname: &str,
    temp_name: &str,
) -> Result<AttachmentResult, CniError> {
    let ifname = request.attachment.ifname.as_str();
    let pod = pod_ns
        .netlink()
        .map_err(CniError::namespace("opening a netlink socket in the pod's namespace"))?;

    // Pod side. The pod end was created down, which a rename requires.
    let temp_index = netlink::link_index(&pod, temp_name)
        .await
        .map_err(CniError::netlink(format!("finding {temp_name} in the pod")))?
        .ok_or_else(|| CniError::vanished(format!("{temp_name} vanished from the pod")))?;
    if netlink::link_index(&pod, ifname)
        .await
        .map_err(CniError::netlink(format!("looking for {ifname} in the pod")))?
        .is_some()
    {
        return Err(CniError::InterfaceNameTaken { ifname: ifname.to_owned() });
    }
    match netlink::rename_link(&pod, temp_index, ifname).await {
        Ok(()) => {}
        Err(error) if errno_is(&error, libc::EEXIST) => {
            return Err(CniError::InterfaceNameTaken { ifname: ifname.to_owned() });
        }
        Err(error) => {
            return Err(CniError::netlink(format!("renaming the pod end to {ifname}"))(error));
        }
    }
    let pod_index = temp_index;

    // Pods are IPv4-only, and the anti-spoofing program drops IPv6. Switching IPv6 off before
    // any link comes up keeps the pod from sending router solicitations and DAD probes that
    // would only be counted as drops.
    for key in ["ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6"] {
        if let Err(error) = pod_ns.write_net_sysctl(key, "1")
            && error.io_error().kind() != std::io::ErrorKind::NotFound
        {
            return Err(CniError::namespace(format!("setting {key} in the pod"))(error));
        }
    }

    let lo_index = netlink::link_index(&pod, "lo")
        .await
        .map_err(CniError::netlink("finding lo in the pod"))?
        .ok_or_else(|| CniError::vanished("the pod's namespace has no lo"))?;
    netlink::set_link_up(&pod, lo_index)
        .await
        .map_err(CniError::netlink("setting lo up in the pod"))?;
    let pod_address = Ipv4Net::from(request.pod_ip);
    netlink::replace_address(&pod, pod_index, pod_address)
        .await
        .map_err(CniError::netlink(format!("adding {pod_address} to {ifname} in the pod")))?;
    // Routes through a link need it up (the kernel answers ENETDOWN otherwise).
    netlink::set_link_up(&pod, pod_index)
        .await
        .map_err(CniError::netlink(format!("setting {ifname} up in the pod")))?;

    let host_link = netlink::link_by_name(node, host_ifname)
        .await
        .map_err(CniError::netlink(format!("finding {host_ifname} on the node")))?
        .ok_or_else(|| CniError::vanished(format!("{host_ifname} vanished from the node")))?;
    let host_index = host_link.header.index;
    let host_mac = netlink::link_mac(&host_link)
        .ok_or_else(|| CniError::vanished(format!("{host_ifname} has no MAC address")))?;

    netlink::replace_route(&pod, &gateway_route(pod_index))
        .await
        .map_err(CniError::netlink(format!("routing {POD_GATEWAY} onto {ifname} in the pod")))?;
    netlink::replace_route(&pod, &default_route(pod_index))
        .await
        .map_err(CniError::netlink("adding the pod's default route"))?;
    // With the gateway's MAC written down, the pod never ARPs for it and the node needs no
    // proxy ARP and no address on the veth.
    netlink::replace_permanent_neighbour(&pod, pod_index, POD_GATEWAY, host_mac)
        .await
        .map_err(CniError::netlink(format!("adding neighbour {POD_GATEWAY} in the pod")))?;
    let pod_link = netlink::link_by_name(&pod, ifname)
        .await
        .map_err(CniError::netlink(format!("reading {ifname} in the pod")))?
        .ok_or_else(|| CniError::vanished(format!("{ifname} vanished from the pod")))?;
    let pod_mac = netlink::link_mac(&pod_link)
        .ok_or_else(|| CniError::vanished(format!("{ifname} in the pod has no MAC address")))?;

    // Node side. The filters go on before the link comes up, so not one packet from the pod
    // passes unchecked; the veth's deletion on rollback or DEL takes them along.
    if let Some(pin_dir) = request.anti_spoof_pin_dir {
        antispoof::attach(pin_dir, host_ifname, host_index, request.pod_ip).map_err(
            CniError::anti_spoof(format!(
                "attaching the anti-spoofing program from {} to {host_ifname}",
                pin_dir.display()
            )),
        )?;
    }
    netlink::set_link_up(node, host_index)
        .await
        .map_err(CniError::netlink(format!("setting {host_ifname} up on the node")))?;
    netlink::replace_route(node, &host_route(request.pod_ip, host_index)).await.map_err(
        CniError::netlink(format!("routing {pod_address} onto {host_ifname} on the node")),
    )?;
    // The node has no address on the veth to ARP from; the pod's MAC is known, so write it.
    netlink::replace_permanent_neighbour(node, host_index, request.pod_ip, pod_mac)
        .await
        .map_err(CniError::netlink(format!("adding neighbour {} on the node", request.pod_ip)))?;

    Ok(AttachmentResult {
        host_ifname: host_ifname.to_owned(),
        host_mac,
        pod_ifname: ifname.to_owned(),
        pod_mac,
        sandbox: request.netns_path.to_string_lossy().into_owned(),
        pod_ip: request.pod_ip,
        mtu: request.mtu,
    })
}

/// Removes the node's side of an attachment: its endpoint entry, its `/32` route and the host
/// veth (which takes the pod end with it). Succeeds when they are already gone. Only what
/// hangs off this attachment's own veth is touched, so an address that has since gone to
/// another pod keeps its route and entry.
pub async fn detach(
    node: &Handle,
    host_ifname: &str,
    anti_spoof_pin_dir: Option<&Path>,
) -> Result<(), CniError> {
    let Some(host_index) = netlink::link_index(node, host_ifname)
        .await
        .map_err(CniError::netlink(format!("looking up {host_ifname} on the node")))?
    else {
        return Ok(());
    };
    if let Some(pin_dir) = anti_spoof_pin_dir
        && pinned_maps_exist(pin_dir)
    {
        antispoof::forget_interface(pin_dir, host_index).map_err(CniError::anti_spoof(format!(
            "removing the endpoint entry of {host_ifname}"
        )))?;
    }
    let routes = netlink::routes_with_protocol(node, ROUTE_PROTOCOL_STRAIT_POD)
        .await
        .map_err(CniError::netlink("listing pod routes on the node"))?;
    for route in routes.iter().filter(|route| route.output_interface == Some(host_index)) {
        netlink::delete_route(node, route)
            .await
            .map_err(CniError::netlink(format!("removing route {}", route.destination)))?;
    }
    netlink::delete_link(node, host_ifname)
        .await
        .map_err(CniError::netlink(format!("deleting {host_ifname}")))?;
    Ok(())
}

/// Whether the agent has pinned the anti-spoofing maps in `pin_dir`.
pub fn pinned_maps_exist(pin_dir: &Path) -> bool {
    pin_dir.join(strait_common::antispoof::ENDPOINTS_MAP).exists()
}

/// Compares the kernel with what ADD made. Returns the first difference as [`CniError::Drifted`].
pub async fn check(
    node: &Handle,
    pod_ns: &NetNs,
    attachment: &Attachment,
    pod_ip: Ipv4Addr,
    anti_spoof_pin_dir: Option<&Path>,
) -> Result<(), CniError> {
    let ifname = attachment.ifname.as_str();
    let host_ifname = naming::host_veth_name(attachment);
    let pod = pod_ns
        .netlink()
        .map_err(CniError::namespace("opening a netlink socket in the pod's namespace"))?;

    let pod_index = netlink::link_index(&pod, ifname)
        .await
        .map_err(CniError::netlink(format!("looking up {ifname} in the pod")))?
        .ok_or_else(|| CniError::drifted(format!("interface {ifname} is missing in the pod")))?;
    let addresses = netlink::ipv4_addresses(&pod, pod_index)
        .await
        .map_err(CniError::netlink(format!("listing the addresses of {ifname}")))?;
    let pod_address = Ipv4Net::from(pod_ip);
    if !addresses.contains(&pod_address) {
        return Err(CniError::drifted(format!(
            "{ifname} in the pod does not carry {pod_address} (it has {addresses:?})"
        )));
    }
    let pod_routes =
        netlink::ipv4_routes(&pod).await.map_err(CniError::netlink("listing the pod's routes"))?;
    let gateway_present = pod_routes.iter().any(|route| {
        route.destination == Ipv4Net::from(POD_GATEWAY)
            && route.output_interface == Some(pod_index)
            && route.gateway.is_none()
    });
    if !gateway_present {
        return Err(CniError::drifted(format!(
            "the pod has no on-link route to {POD_GATEWAY} through {ifname}"
        )));
    }
    let default_present = pod_routes
        .iter()
        .any(|route| route.destination.prefix_len() == 0 && route.gateway == Some(POD_GATEWAY));
    if !default_present {
        return Err(CniError::drifted(format!("the pod has no default route via {POD_GATEWAY}")));
    }

    let host_index = netlink::link_index(node, &host_ifname)
        .await
        .map_err(CniError::netlink(format!("looking up {host_ifname} on the node")))?
        .ok_or_else(|| {
            CniError::drifted(format!("host veth {host_ifname} is missing on the node"))
        })?;
    let node_routes = netlink::routes_with_protocol(node, ROUTE_PROTOCOL_STRAIT_POD)
        .await
        .map_err(CniError::netlink("listing pod routes on the node"))?;
    if !node_routes
        .iter()
        .any(|route| route.destination == pod_address && route.output_interface == Some(host_index))
    {
        return Err(CniError::drifted(format!(
            "the node has no route to {pod_address} through {host_ifname}"
        )));
    }

    if let Some(pin_dir) = anti_spoof_pin_dir {
        let entry = antispoof::endpoint(pin_dir, host_index).map_err(CniError::anti_spoof(
            format!("reading the endpoint entry of {host_ifname}"),
        ))?;
        if entry != Some(pod_ip) {
            return Err(CniError::drifted(format!(
                "the anti-spoofing entry of {host_ifname} is {entry:?}, expected {pod_ip}"
            )));
        }
    }
    Ok(())
}
