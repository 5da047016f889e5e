//! Service load balancing: the maps the socket hooks and the pod-veth tc programs read, and the
//! userspace writer (`dataplane::ebpf::lb`) fills.
//!
//! A service port is a *frontend* ([`FrontendKey`] → [`Frontend`]). Its usable backends sit in
//! slots `0..backend_count` of [`BACKEND_SLOTS_MAP`] ([`BackendSlotKey`] → backend id), and each
//! backend id names a [`Backend`] in [`BACKENDS_MAP`]. A new connection costs one frontend
//! lookup, one slot lookup and one backend lookup, whatever the number of services.
//!
//! Invariants the writer keeps for a concurrent reader (the datapath):
//! - every slot below a frontend's `backend_count` names an existing backend of that frontend;
//! - a backend id belongs to exactly one frontend (its `service_id`), so removing a backend
//!   never touches another service's entries;
//! - ids are never reused while their entries may still be in a map of the current process.
//!
//! Addresses and ports are stored in network byte order, exactly as they sit in packets and in
//! `struct bpf_sock_addr`, so the datapath never swaps bytes.
//!
//! Map names carry their layout version (`_V1`); a layout change gets a new name.

/// [`FrontendKey`] → [`Frontend`]. Hash map.
pub const FRONTENDS_MAP: &str = "LB_FRONTENDS_V1";
/// [`BackendSlotKey`] → `u32` backend id. Hash map.
pub const BACKEND_SLOTS_MAP: &str = "LB_BACKEND_SLOTS_V1";
/// `u32` backend id → [`Backend`]. Hash map.
pub const BACKENDS_MAP: &str = "LB_BACKENDS_V1";
/// [`AffinityKey`] → [`AffinityValue`]. LRU hash map, written by the datapath.
pub const AFFINITY_MAP: &str = "LB_AFFINITY_V1";
/// [`SockRevNatKey`] → [`SockRevNatValue`]: what a socket's peer address really was. LRU hash
/// map, written by connect4/sendmsg4, read by recvmsg4/getpeername4.
pub const SOCK_REVNAT_MAP: &str = "LB_SOCK_REVNAT_V1";
/// [`SockFlowKey`] → [`SockFlowValue`]: the backend an unconnected UDP socket is using for one
/// frontend, so consecutive datagrams keep it while it is valid. LRU hash map.
pub const SOCK_FLOWS_MAP: &str = "LB_SOCK_FLOWS_V1";
/// [`ConntrackKey`] → [`ConntrackValue`]: translations of the tc path. LRU hash map.
pub const CONNTRACK_MAP: &str = "LB_CONNTRACK_V1";
/// [`FragmentKey`] → [`FragmentValue`]: the address rewrite of a fragmented datagram, recorded
/// from its first fragment for the ones that follow. LRU hash map, written by the tc path.
pub const FRAGMENTS_MAP: &str = "LB_FRAGMENTS_V1";

/// Every map of the load balancer, in the order the writer reports them.
pub const ALL_MAPS: [&str; 8] = [
    FRONTENDS_MAP,
    BACKEND_SLOTS_MAP,
    BACKENDS_MAP,
    AFFINITY_MAP,
    SOCK_REVNAT_MAP,
    SOCK_FLOWS_MAP,
    CONNTRACK_MAP,
    FRAGMENTS_MAP,
];

/// Capacities compiled into the objects. The loader overrides them when it creates the maps
/// (`LbMapSizes` in the dataplane); maps adopted from pins keep the size they were made with.
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262_144;
pub const DEFAULT_MAX_CONNTRACK: u32 = 262_144;
pub const DEFAULT_MAX_FRAGMENTS: u32 = 8_192;

/// How long a [`FRAGMENTS_MAP`] entry serves the fragments that follow its first one: the
/// kernel's default reassembly timeout (`net.ipv4.ipfrag_time`, 30 s), after which the receiver
/// has given up on the datagram anyway and its IP id may be reused.
pub const FRAGMENT_LIFETIME_NS: u64 = 30_000_000_000;

/// `IPPROTO_TCP` (RFC 793).
pub const PROTOCOL_TCP: u8 = 6;
/// `IPPROTO_UDP` (RFC 768).
pub const PROTOCOL_UDP: u8 = 17;

/// [`Frontend::flags`]: ClientIP session affinity; `affinity_timeout_s` applies.
pub const FRONTEND_FLAG_AFFINITY: u32 = 1;
/// [`Backend::flags`]: the backend is terminating. New flows avoid it through affinity;
/// established flows keep it.
pub const BACKEND_FLAG_TERMINATING: u8 = 1;

/// Key of [`FRONTENDS_MAP`]: one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    /// The service VIP, network byte order.
    pub vip: u32,
    /// The service port, network byte order.
    pub port: u16,
    /// [`PROTOCOL_TCP`] or [`PROTOCOL_UDP`].
    pub protocol: u8,
    /// Reserved, must be zero (part of the hash key).
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 8);

/// Value of [`FRONTENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Names this frontend's slots and backends; unique per frontend. Host byte order.
    pub service_id: u32,
    /// Usable backends in slots `0..backend_count`. 0: refuse new connections at once.
    pub backend_count: u32,
    /// `FRONTEND_FLAG_*` bits.
    pub flags: u32,
    /// Affinity timeout in seconds, when [`FRONTEND_FLAG_AFFINITY`] is set.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 16);

/// Key of [`BACKEND_SLOTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSlotKey {
    /// [`Frontend::service_id`], host byte order.
    pub service_id: u32,
    /// Slot index, `0..backend_count`, host byte order.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendSlotKey>() == 8);

/// Value of [`BACKENDS_MAP`] (key: `u32` backend id, host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub ip: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
    /// Reserved, must be zero.
    pub _pad: u8,
    /// The frontend this backend belongs to. Host byte order.
    pub service_id: u32,
    /// Reserved, must be zero.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

/// Key of [`AFFINITY_MAP`]. The client is its IPv4 source on the tc path and its network
/// namespace cookie on the socket path (at connect() the socket has no source address yet; a
/// pod is one namespace with one address, so both name the pod). The other field is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// [`Frontend::service_id`], host byte order.
    pub service_id: u32,
    /// Client IPv4 address (tc path), network byte order; 0 on the socket path.
    pub client_ip: u32,
    /// `bpf_get_netns_cookie()` of the client (socket path); 0 on the tc path.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of [`AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend the client is pinned to.
    pub backend_id: u32,
    /// Reserved, must be zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used the entry.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Key of [`SOCK_REVNAT_MAP`]: a socket and the backend address it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub backend_ip: u32,
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// Reserved, must be zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

/// Value of [`SOCK_REVNAT_MAP`]: the address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue {
    /// The VIP, network byte order.
    pub vip: u32,
    /// The service port, network byte order.
    pub port: u16,
    /// Reserved, must be zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);

/// Key of [`SOCK_FLOWS_MAP`]: one unconnected UDP socket talking to one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFlowKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The frontend, as in [`FRONTENDS_MAP`].
    pub frontend: FrontendKey,
}
const _: () = assert!(core::mem::size_of::<SockFlowKey>() == 16);

/// Value of [`SOCK_FLOWS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFlowValue {
    /// The backend the socket uses while it stays in [`BACKENDS_MAP`] under `service_id`.
    pub backend_id: u32,
    /// [`Frontend::service_id`] when the flow was made.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockFlowValue>() == 8);

/// [`ConntrackKey::direction`]: a packet from a client to a VIP, seen on the ingress of the
/// client's host veth.
pub const CT_FORWARD: u8 = 0;
/// A reply from a backend to a client, seen on the egress of the client's host veth.
pub const CT_REPLY: u8 = 1;
/// A reply from a backend that is also the client (hairpin), seen on the ingress of its own
/// host veth: it is addressed to the VIP, where the client's packets came from.
pub const CT_HAIRPIN_REPLY: u8 = 2;

/// Key of [`CONNTRACK_MAP`]: a packet's 5-tuple as it arrives, plus where it was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    /// Source IPv4 address, network byte order.
    pub src_ip: u32,
    /// Destination IPv4 address, network byte order.
    pub dst_ip: u32,
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// [`PROTOCOL_TCP`] or [`PROTOCOL_UDP`].
    pub protocol: u8,
    /// `CT_FORWARD`, `CT_REPLY` or `CT_HAIRPIN_REPLY`.
    pub direction: u8,
    /// Reserved, must be zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ConntrackKey>() == 16);

/// Value of [`CONNTRACK_MAP`]: the tuple the packet is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackValue {
    /// New source address, network byte order.
    pub src_ip: u32,
    /// New destination address, network byte order.
    pub dst_ip: u32,
    /// New source port, network byte order.
    pub src_port: u16,
    /// New destination port, network byte order.
    pub dst_port: u16,
    /// The backend of the flow (forward entries), checked before a new TCP SYN or a UDP
    /// datagram reuses the entry.
    pub backend_id: u32,
    /// The frontend's service id when the flow was made.
    pub service_id: u32,
    /// Sequence number of the SYN that made a TCP forward entry, as it sits in the packet
    /// (network byte order); 0 otherwise. A SYN with the same number is a retransmission; a
    /// SYN with another one is a new connection reusing the port pair, which chooses afresh.
    pub syn_seq: u32,
    /// `bpf_ktime_get_ns()` when the entry was made.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 32);

/// [`FragmentKey::direction`]: fragments from a pod, seen on the ingress of its host veth.
pub const FRAGMENT_FROM_POD: u8 = 0;
/// Fragments toward a pod, seen on the egress of its host veth.
pub const FRAGMENT_TO_POD: u8 = 1;

/// Key of [`FRAGMENTS_MAP`]: what identifies the fragments of one datagram (RFC 791: source,
/// destination, protocol and identification), as they arrive, plus where they are seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source IPv4 address before translation, network byte order.
    pub src_ip: u32,
    /// Destination IPv4 address before translation, network byte order.
    pub dst_ip: u32,
    /// The IPv4 identification field, network byte order.
    pub ip_id: u16,
    /// [`PROTOCOL_TCP`] or [`PROTOCOL_UDP`].
    pub protocol: u8,
    /// [`FRAGMENT_FROM_POD`] or [`FRAGMENT_TO_POD`].
    pub direction: u8,
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);

/// Value of [`FRAGMENTS_MAP`]: the addresses the first fragment was rewritten to. The ports
/// live only in the first fragment, and the L4 checksum there already covers the new
/// addresses, so the fragments that follow need only these and their IPv4 header checksum.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentValue {
    /// New source address, network byte order.
    pub src_ip: u32,
    /// New destination address, network byte order.
    pub dst_ip: u32,
    /// `bpf_ktime_get_ns()` when the first fragment was seen; the entry serves for
    /// [`FRAGMENT_LIFETIME_NS`].
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY (all): repr(C), no implicit padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for SockFlowKey {}
    unsafe impl aya::Pod for SockFlowValue {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
}
