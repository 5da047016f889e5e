//! Anti-spoofing on the host side of each pod's veth.
//!
//! Packets a pod sends arrive on the ingress hook of its host-side veth. The program looks the
//! interface up in [`ENDPOINTS_MAP`] and drops anything whose source is not the pod's own
//! address, counting each drop under a [`DropReason`] index in [`DROP_STATS_MAP`].

/// Name (and pin name) of the endpoint map: `u32` ifindex of the host-side veth →
/// [`PodEndpoint`]. The `_V1` suffix is the layout version; a layout change gets a new name.
pub const ENDPOINTS_MAP: &str = "ENDPOINTS_V1";
/// Name (and pin name) of the per-CPU drop counters, indexed by [`DropReason`].
pub const DROP_STATS_MAP: &str = "DROP_STATS_V1";
/// Name of the ingress tc classifier (anti-spoofing, then service DNAT) in the object file.
pub const PROGRAM: &str = "antispoof";
/// Name of the egress tc classifier (service reverse NAT toward the pod) in the object file.
pub const EGRESS_PROGRAM: &str = "to_pod";
/// Capacity of [`ENDPOINTS_MAP`]: pods on one node.
pub const MAX_ENDPOINTS: u32 = 4096;
/// Slots in [`DROP_STATS_MAP`]; indices are [`DropReason`] values.
pub const DROP_REASON_SLOTS: u32 = 8;

/// Why a packet from a pod was dropped. Values index [`DROP_STATS_MAP`].
///
/// A `u32` newtype rather than an enum: the value crosses into a map index.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropReason(pub u32);

impl DropReason {
    /// IPv4 packet whose source address is not the pod's.
    pub const SPOOFED_IPV4_SOURCE: Self = Self(1);
    /// ARP packet whose sender protocol address is neither the pod's nor 0.0.0.0 (an RFC 5227
    /// probe, which updates no cache).
    pub const SPOOFED_ARP_SENDER: Self = Self(2);
    /// Header too short for its own length fields.
    pub const MALFORMED: Self = Self(3);
    /// The interface has no endpoint entry: fail closed.
    pub const UNKNOWN_ENDPOINT: Self = Self(4);
    /// IPv6 or any other ethertype: pods are assigned IPv4 only.
    pub const UNSUPPORTED_PROTOCOL: Self = Self(5);
    /// Service NAT could not rewrite the packet (a checksum or store helper failed, or the
    /// conntrack map refused an entry).
    pub const NAT_FAILED: Self = Self(6);

    /// Every reason, with the name metrics and `strait` output use.
    pub const ALL: [(Self, &'static str); 6] = [
        (Self::SPOOFED_IPV4_SOURCE, "spoofed_ipv4_source"),
        (Self::SPOOFED_ARP_SENDER, "spoofed_arp_sender"),
        (Self::MALFORMED, "malformed"),
        (Self::UNKNOWN_ENDPOINT, "unknown_endpoint"),
        (Self::UNSUPPORTED_PROTOCOL, "unsupported_protocol"),
        (Self::NAT_FAILED, "nat_failed"),
    ];
}

/// Value of [`ENDPOINTS_MAP`]: what the pod behind one host-side veth may send as.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    /// The pod's IPv4 address, network byte order (as it sits in the packet).
    pub ipv4: u32,
    /// Reserved, must be zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PodEndpoint>() == 8);

#[cfg(feature = "user")]
// SAFETY: PodEndpoint is repr(C), has no implicit padding and every bit pattern is valid.
unsafe impl aya::Pod for PodEndpoint {}
