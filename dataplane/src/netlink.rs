//! Small rtnetlink operations, one concern each, on a [`rtnetlink::Handle`] bound to a
//! namespace (see [`crate::netns::NetNs::netlink`]). Creation is idempotent where the kernel
//! allows (`replace`), deletion succeeds when the object is already gone.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, BorrowedFd},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// `rtm_protocol` of the node routes the agent writes (other nodes' podCIDRs, unreachable
/// ranges), so that its reconciler finds its own routes and never touches anybody else's.
/// Not among the numbers iproute2 names in `rt_protos`.
pub const ROUTE_PROTOCOL_STRAIT: u8 = 83;
/// `rtm_protocol` of the per-pod `/32` routes the CNI plugin writes on the host side. Distinct
/// from [`ROUTE_PROTOCOL_STRAIT`] so the agent's route reconciler leaves them to the plugin.
pub const ROUTE_PROTOCOL_STRAIT_POD: u8 = 84;

#[derive(Debug, thiserror::Error)]
#[error("{action}")]
pub struct NetlinkError {
    action: String,
    #[source]
    source: rtnetlink::Error,
}

impl NetlinkError {
    fn new(action: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self { action: action.into(), source }
    }

    /// The errno the kernel answered with, if the kernel answered with one.
    pub fn errno(&self) -> Option<i32> {
        errno_of(&self.source)
    }
}

fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) if message.raw_code() != 0 => {
            Some(message.raw_code().abs())
        }
        _ => None,
    }
}

fn is_errno(error: &rtnetlink::Error, codes: &[i32]) -> bool {
    errno_of(error).is_some_and(|code| codes.contains(&code))
}

/// The index of the link called `name`, or `None` when there is none.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    match handle.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, &[libc::ENODEV, libc::ENOENT]) => Ok(None),
        Err(e) => Err(NetlinkError::new(format!("looking up link {name}"), e)),
    }
}

/// The link message of the link called `name`, or `None`.
pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, NetlinkError> {
    match handle.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, &[libc::ENODEV, libc::ENOENT]) => Ok(None),
        Err(e) => Err(NetlinkError::new(format!("looking up link {name}"), e)),
    }
}

/// Every link in the namespace.
pub async fn list_links(handle: &Handle) -> Result<Vec<LinkMessage>, NetlinkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("listing links", e))
}

/// The name carried by a link message.
pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// The hardware address carried by a link message, if it is an Ethernet one.
pub fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::Address(address) => address.as_slice().try_into().ok(),
        _ => None,
    })
}

/// Sets the link administratively up.
pub async fn set_link_up(handle: &Handle, index: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("setting link {index} up"), e))
}

/// Sets the link administratively down.
pub async fn set_link_down(handle: &Handle, index: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("setting link {index} down"), e))
}

/// Renames a link (it must be down, or the kernel refuses with EBUSY).
pub async fn rename_link(handle: &Handle, index: u32, name: &str) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).name(name.to_owned()).build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("renaming link {index} to {name}"), e))
}

/// Creates a veth pair: `name` in this handle's namespace, `peer_name` in the namespace of
/// `peer_netns`. Both ends are created in one request, so there is never a half-made pair.
pub async fn create_veth(
    handle: &Handle,
    name: &str,
    peer_name: &str,
    peer_netns: BorrowedFd<'_>,
    mtu: Option<u32>,
) -> Result<(), NetlinkError> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(peer_name.to_owned());
    let mut local = LinkVeth::new(name, peer_name);
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        local = local.mtu(mtu);
    }
    let peer = peer.setns_by_fd(peer_netns.as_raw_fd()).build();
    let message = local.set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("creating veth pair {name}/{peer_name}"), e))
}

/// Creates a bridge, or leaves an existing one as it is.
pub async fn ensure_bridge(handle: &Handle, name: &str) -> Result<u32, NetlinkError> {
    if let Some(index) = link_index(handle, name).await? {
        return Ok(index);
    }
    handle
        .link()
        .add(LinkBridge::new(name).build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("creating bridge {name}"), e))?;
    link_index(handle, name).await?.ok_or_else(|| {
        NetlinkError::new(
            format!("finding bridge {name} after creating it"),
            rtnetlink::Error::RequestFailed,
        )
    })
}

/// Enslaves a link to a bridge.
pub async fn set_master(handle: &Handle, index: u32, master: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).controller(master).build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("attaching link {index} to bridge {master}"), e))
}

/// Deletes the link called `name`. Returns whether there was one.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetlinkError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, &[libc::ENODEV, libc::ENOENT]) => Ok(false),
        Err(e) => Err(NetlinkError::new(format!("deleting link {name}"), e)),
    }
}

/// Adds an IPv4 address to a link; an identical address already there is fine.
pub async fn replace_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Net,
) -> Result<(), NetlinkError> {
    handle
        .address()
        .add(index, IpAddr::V4(address.addr()), address.prefix_len())
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("adding address {address} to link {index}"), e))
}

/// The IPv4 addresses on a link.
pub async fn ipv4_addresses(handle: &Handle, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new(format!("listing addresses of link {index}"), e))?;
    let mut addresses = Vec::new();
    for message in messages {
        if message.header.family != AddressFamily::Inet {
            continue;
        }
        for attribute in &message.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attribute
                && let Ok(net) = Ipv4Net::new(*ip, message.header.prefix_len)
            {
                addresses.push(net);
            }
        }
    }
    Ok(addresses)
}

/// Installs a permanent neighbour entry (static ARP).
pub async fn replace_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), NetlinkError> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("adding neighbour {ip} on link {index}"), e))
}

/// What an IPv4 route does with matching packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Forward: via a gateway, or directly out of an interface.
    Unicast,
    /// Refuse at once with ICMP unreachable (EHOSTUNREACH locally): nothing is forwarded.
    Unreachable,
}

/// An IPv4 route in the main table, as strait writes and reads them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Route {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub output_interface: Option<u32>,
    /// Preferred source address for locally generated packets.
    pub preferred_source: Option<Ipv4Addr>,
    pub kind: RouteKind,
    /// `RT_SCOPE_LINK` for on-link destinations; universe otherwise.
    pub link_scope: bool,
    pub protocol: u8,
}

impl Ipv4Route {
    /// A route to `destination` via `gateway`, tagged as strait's.
    pub fn via(destination: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            destination,
            gateway: Some(gateway),
            output_interface: None,
            preferred_source: None,
            kind: RouteKind::Unicast,
            link_scope: false,
            protocol: ROUTE_PROTOCOL_STRAIT,
        }
    }

    /// An on-link route to `destination` out of `interface`, tagged as strait's.
    pub fn on_link(destination: Ipv4Net, interface: u32) -> Self {
        Self {
            destination,
            gateway: None,
            output_interface: Some(interface),
            preferred_source: None,
            kind: RouteKind::Unicast,
            link_scope: true,
            protocol: ROUTE_PROTOCOL_STRAIT,
        }
    }

    /// An `unreachable` route, tagged as strait's.
    pub fn unreachable(destination: Ipv4Net) -> Self {
        Self {
            destination,
            gateway: None,
            output_interface: None,
            preferred_source: None,
            kind: RouteKind::Unreachable,
            link_scope: false,
            protocol: ROUTE_PROTOCOL_STRAIT,
        }
    }

    fn to_message(&self) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.destination.network(), self.destination.prefix_len())
            .protocol(RouteProtocol::from(self.protocol));
        if let Some(gateway) = self.gateway {
            builder = builder.gateway(gateway);
        }
        if let Some(interface) = self.output_interface {
            builder = builder.output_interface(interface);
        }
        if let Some(source) = self.preferred_source {
            builder = builder.pref_source(source);
        }
        if self.link_scope {
            builder = builder.scope(RouteScope::Link);
        }
        if self.kind == RouteKind::Unreachable {
            builder = builder.kind(RouteType::Unreachable);
        }
        builder.build()
    }

    fn from_message(message: &RouteMessage) -> Option<Self> {
        if message.header.address_family != AddressFamily::Inet
            || message.header.table != RouteHeader::RT_TABLE_MAIN
        {
            return None;
        }
        let kind = match message.header.kind {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::Unreachable => RouteKind::Unreachable,
            _ => return None,
        };
        let mut destination = Ipv4Addr::UNSPECIFIED;
        let mut gateway = None;
        let mut output_interface = None;
        let mut preferred_source = None;
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => preferred_source = Some(*ip),
                RouteAttribute::Oif(index) => output_interface = Some(*index),
                _ => {}
            }
        }
        Some(Self {
            destination: Ipv4Net::new(destination, message.header.destination_prefix_length)
                .ok()?,
            gateway,
            output_interface,
            preferred_source,
            kind,
            link_scope: message.header.scope == RouteScope::Link,
            protocol: u8::from(message.header.protocol),
        })
    }
}

/// Installs the route, replacing any route to the same destination.
pub async fn replace_route(handle: &Handle, route: &Ipv4Route) -> Result<(), NetlinkError> {
    handle
        .route()
        .add(route.to_message())
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("installing route to {}", route.destination), e))
}

/// Removes the route. Succeeds when it is already gone.
pub async fn delete_route(handle: &Handle, route: &Ipv4Route) -> Result<(), NetlinkError> {
    match handle.route().del(route.to_message()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, &[libc::ESRCH, libc::ENOENT]) => Ok(()),
        Err(e) => Err(NetlinkError::new(format!("removing route to {}", route.destination), e)),
    }
}

/// The IPv4 routes of the main table that carry `protocol`.
pub async fn routes_with_protocol(
    handle: &Handle,
    protocol: u8,
) -> Result<Vec<Ipv4Route>, NetlinkError> {
    let messages: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("listing IPv4 routes", e))?;
    Ok(messages
        .iter()
        .filter_map(Ipv4Route::from_message)
        .filter(|route| route.protocol == protocol)
        .collect())
}

/// Every IPv4 route of the main table, whoever wrote it.
pub async fn ipv4_routes(handle: &Handle) -> Result<Vec<Ipv4Route>, NetlinkError> {
    let messages: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("listing IPv4 routes", e))?;
    Ok(messages.iter().filter_map(Ipv4Route::from_message).collect())
}

/// Whether a link message describes a veth.
pub fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|attribute| match attribute {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|info| matches!(info, netlink_packet_route::link::LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}
