//! Service NAT on the host side of pod veths: DNAT of new flows to a VIP (ingress, packets
//! from the pod), reverse NAT of replies (egress, packets toward the pod), with the
//! translations kept in the conntrack LRU. The socket hooks translate most flows before a
//! packet exists; this path catches what did not pass them (processes outside the hooked
//! cgroup, raw sockets, pods of other runtimes).
//!
//! Fragmented datagrams (RFC 791): the first fragment carries the L4 header and is translated
//! like any packet; the address rewrite it got is recorded in `LB_FRAGMENTS_V1` under the
//! datagram's (source, destination, protocol, IP id) as it arrived, and the later fragments
//! get the same addresses from there. A later fragment that arrives before its first one (the
//! network reordered them) finds no entry and passes untranslated: its datagram is lost, as
//! it would be without the entry; the sender's retransmission (TCP) or the application (UDP)
//! recovers, like any loss.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use strait_common::lb::{
    AffinityKey, CT_FORWARD, CT_HAIRPIN_REPLY, CT_REPLY, ConntrackKey, ConntrackValue,
    FRAGMENT_FROM_POD, FRAGMENT_LIFETIME_NS, FRAGMENT_TO_POD, FragmentKey, FragmentValue,
    FrontendKey, PROTOCOL_TCP, PROTOCOL_UDP,
};

use crate::{
    lb::{CONNTRACK, FRAGMENTS, FRONTENDS, backend_of, choose_backend, now_ns},
    net::{ETH_HLEN, ptr_at},
};

/// RFC 791: offsets inside the IPv4 header.
const IP_ID: usize = 4;
const IP_CHECKSUM: usize = 10;
const IP_SOURCE: usize = 12;
const IP_DESTINATION: usize = 16;
/// RFC 793 / RFC 768: where the checksum sits in the L4 header.
const TCP_CHECKSUM: usize = 16;
const UDP_CHECKSUM: usize = 6;
/// RFC 791: the More Fragments flag in the high byte of flags + fragment offset, and the
/// 13-bit fragment offset (in 8-byte units) below the three flag bits.
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_FRAGMENT_OFFSET: u16 = 0x1fff;
/// RFC 793: the flags byte and its SYN and ACK bits.
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// A SYN that finds a forward entry younger than this is taken for a retransmission and keeps
/// the entry's backend; an older one starts a new connection on a reused tuple.
const SYN_RETRANSMIT_WINDOW_NS: u64 = 5_000_000_000;

/// The NAT could not be applied (a helper refused to rewrite the packet).
pub struct NatFailed;

/// An IPv4 TCP or UDP packet's tuple, all fields in network byte order.
pub struct Flow {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// Offset of the L4 header: Ethernet plus the IPv4 header with its options (IHL).
    pub l4_offset: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence number as it sits in the packet; 0 for UDP.
    pub tcp_seq: u32,
    /// The first fragment of a fragmented datagram (offset 0, More Fragments set): its
    /// translation is recorded for the fragments that follow.
    pub first_fragment: bool,
    /// The IPv4 identification field, network byte order.
    pub ip_id: u16,
}

/// A fragment other than the first (offset above 0): IPv4 header only, no L4 header. Addresses
/// and id in network byte order.
pub struct LaterFragment {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub ip_id: u16,
    pub protocol: u8,
}

impl LaterFragment {
    fn key(&self, direction: u8) -> FragmentKey {
        FragmentKey {
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            ip_id: self.ip_id,
            protocol: self.protocol,
            direction,
        }
    }
}

/// An IPv4 TCP or UDP packet the NAT may translate.
pub enum Packet {
    /// A whole datagram or the first fragment of one: it carries the ports.
    Flow(Flow),
    /// A later fragment: only its addresses can be translated, from its first fragment's entry.
    LaterFragment(LaterFragment),
}

impl Flow {
    fn key(&self, direction: u8) -> ConntrackKey {
        ConntrackKey {
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
            direction,
            _pad: 0,
        }
    }
}

/// Parses an IPv4 packet whose header (`header_len` bytes, options included) has been checked.
/// `None` for other protocols and for a first fragment too short to hold its L4 header.
#[inline(always)]
pub fn parse_packet(ctx: &TcContext, header_len: usize) -> Option<Packet> {
    let header: *const [u8; 20] = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: ptr_at checked that the 20 bytes lie inside the packet.
    let header = unsafe { &*header };
    let protocol = header[9];
    if protocol != PROTOCOL_TCP && protocol != PROTOCOL_UDP {
        return None;
    }
    let src_ip = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]);
    let dst_ip = u32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
    let ip_id = u16::from_ne_bytes([header[IP_ID], header[IP_ID + 1]]);
    let fragment = u16::from_be_bytes([header[6], header[7]]);
    if fragment & IP_FRAGMENT_OFFSET != 0 {
        return Some(Packet::LaterFragment(LaterFragment { src_ip, dst_ip, ip_id, protocol }));
    }
    let first_fragment = fragment & IP_MORE_FRAGMENTS != 0;
    let l4_offset = ETH_HLEN + header_len;
    let (ports, tcp_flags, tcp_seq) = if protocol == PROTOCOL_TCP {
        let tcp: *const [u8; 14] = ptr_at(ctx, l4_offset)?;
        // SAFETY: bounds-checked by ptr_at.
        let tcp = unsafe { &*tcp };
        // RFC 793: the sequence number follows the two ports.
        let seq = u32::from_ne_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS], seq)
    } else {
        let udp: *const [u8; 8] = ptr_at(ctx, l4_offset)?;
        // SAFETY: bounds-checked by ptr_at.
        let udp = unsafe { &*udp };
        ([udp[0], udp[1], udp[2], udp[3]], 0, 0)
    };
    Some(Packet::Flow(Flow {
        src_ip,
        dst_ip,
        src_port: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        protocol,
        l4_offset,
        tcp_flags,
        tcp_seq,
        first_fragment,
        ip_id,
    }))
}

/// Rewrites the packet's tuple to `to`, fixing the IPv4 checksum and the L4 checksum (its
/// pseudo-header covers the addresses). A UDP checksum of 0 means "none" (RFC 768) and stays 0.
/// In a first fragment the L4 checksum covers the whole datagram, pseudo-header included, so
/// the same incremental update is right there and the later fragments need none.
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, to: &ConntrackValue) -> Result<(), NatFailed> {
    let (l4_checksum, mangled) = if flow.protocol == PROTOCOL_TCP {
        (flow.l4_offset + TCP_CHECKSUM, 0)
    } else {
        (flow.l4_offset + UDP_CHECKSUM, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let ip_checksum = ETH_HLEN + IP_CHECKSUM;
    let addresses = [
        (flow.src_ip, to.src_ip, ETH_HLEN + IP_SOURCE),
        (flow.dst_ip, to.dst_ip, ETH_HLEN + IP_DESTINATION),
    ];
    for (old, new, offset) in addresses {
        if old == new {
            continue;
        }
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
        ctx.l4_csum_replace(l4_checksum, u64::from(old), u64::from(new), pseudo)
            .map_err(|_| NatFailed)?;
        ctx.l3_csum_replace(ip_checksum, u64::from(old), u64::from(new), 4)
            .map_err(|_| NatFailed)?;
        ctx.store(offset, &new, 0).map_err(|_| NatFailed)?;
    }
    let ports = [
        (flow.src_port, to.src_port, flow.l4_offset),
        (flow.dst_port, to.dst_port, flow.l4_offset + 2),
    ];
    for (old, new, offset) in ports {
        if old == new {
            continue;
        }
        ctx.l4_csum_replace(l4_checksum, u64::from(old), u64::from(new), mangled | 2)
            .map_err(|_| NatFailed)?;
        ctx.store(offset, &new, 0).map_err(|_| NatFailed)?;
    }
    Ok(())
}

/// Rewrites a later fragment's addresses to those its first fragment got, fixing only the IPv4
/// header checksum: the fragment holds no L4 header. No entry (the first fragment has not been
/// seen, or was not translated): the fragment passes as it is.
#[inline(always)]
fn rewrite_later_fragment(
    ctx: &TcContext,
    fragment: &LaterFragment,
    direction: u8,
) -> Result<(), NatFailed> {
    // SAFETY: plain data, entries replaced whole.
    let Some(entry) = (unsafe { FRAGMENTS.get(fragment.key(direction)) }) else { return Ok(()) };
    let entry = *entry;
    if now_ns().wrapping_sub(entry.created_ns) >= FRAGMENT_LIFETIME_NS {
        return Ok(());
    }
    let ip_checksum = ETH_HLEN + IP_CHECKSUM;
    let addresses = [
        (fragment.src_ip, entry.src_ip, ETH_HLEN + IP_SOURCE),
        (fragment.dst_ip, entry.dst_ip, ETH_HLEN + IP_DESTINATION),
    ];
    for (old, new, offset) in addresses {
        if old == new {
            continue;
        }
        ctx.l3_csum_replace(ip_checksum, u64::from(old), u64::from(new), 4)
            .map_err(|_| NatFailed)?;
        ctx.store(offset, &new, 0).map_err(|_| NatFailed)?;
    }
    Ok(())
}

/// Applies `to` to a whole datagram or a first fragment; for a first fragment, first records
/// the address rewrite for the fragments that follow.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    flow: &Flow,
    to: &ConntrackValue,
    direction: u8,
) -> Result<(), NatFailed> {
    if flow.first_fragment {
        let key = FragmentKey {
            src_ip: flow.src_ip,
            dst_ip: flow.dst_ip,
            ip_id: flow.ip_id,
            protocol: flow.protocol,
            direction,
        };
        let value = FragmentValue { src_ip: to.src_ip, dst_ip: to.dst_ip, created_ns: now_ns() };
        // Without the entry the rest of the datagram would pass untranslated and the datagram
        // be lost downstream: a failure here is a NAT failure like any other.
        FRAGMENTS.insert(key, value, 0).map_err(|_| NatFailed)?;
    }
    rewrite(ctx, flow, to)
}

/// Whether a forward entry may carry this packet. Established TCP keeps its backend whatever
/// happens to it (terminating or gone: the connection ends on its own); a new SYN on an old
/// tuple and a UDP datagram need the backend still in its service.
#[inline(always)]
fn forward_entry_holds(flow: &Flow, entry: &ConntrackValue) -> bool {
    let valid = || backend_of(entry.service_id, entry.backend_id).is_some();
    if flow.protocol == PROTOCOL_TCP {
        let new_connection = flow.tcp_flags & TCP_SYN != 0 && flow.tcp_flags & TCP_ACK == 0;
        if !new_connection {
            return true;
        }
        // The same SYN again (its sequence number): a retransmission keeps its backend. Another
        // SYN on the same port pair is a new connection (the client reused its port, e.g. after
        // the server closed first) and chooses afresh, affinity included.
        entry.syn_seq == flow.tcp_seq
            && now_ns().wrapping_sub(entry.created_ns) < SYN_RETRANSMIT_WINDOW_NS
            && valid()
    } else {
        valid()
    }
}

/// A flow straight to a pod (no service) may reuse the ports of an earlier service flow to
/// the same backend: that flow's reply entry would then rewrite this one's replies to the VIP.
/// A new TCP connection (SYN) or a UDP datagram toward a non-service address drops such an
/// entry first. Established TCP never gets here with a stale entry: its SYN did.
#[inline(always)]
fn forget_stale_reply(flow: &Flow) {
    let new_tcp = flow.protocol == PROTOCOL_TCP
        && flow.tcp_flags & TCP_SYN != 0
        && flow.tcp_flags & TCP_ACK == 0;
    if !new_tcp && flow.protocol != PROTOCOL_UDP {
        return;
    }
    let reply_key = ConntrackKey {
        src_ip: flow.dst_ip,
        dst_ip: flow.src_ip,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        protocol: flow.protocol,
        direction: CT_REPLY,
        _pad: 0,
    };
    // SAFETY (map read): plain data. A UDP datagram pays one lookup; only a stale entry costs
    // a delete.
    if unsafe { CONNTRACK.get(reply_key) }.is_some() {
        let _ = CONNTRACK.remove(reply_key);
    }
}

/// Ingress of a pod's host veth, after the anti-spoofing check.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, packet: &Packet) -> Result<(), NatFailed> {
    match packet {
        Packet::Flow(flow) => match translation_from_pod(flow)? {
            Some(to) => translate(ctx, flow, &to, FRAGMENT_FROM_POD),
            None => Ok(()),
        },
        Packet::LaterFragment(fragment) => rewrite_later_fragment(ctx, fragment, FRAGMENT_FROM_POD),
    }
}

/// The translation of a packet from a pod: hairpin replies, then flows already translated,
/// then new flows to a frontend with a usable backend (their conntrack entries are made here).
/// A VIP without one is left alone: the node's `unreachable` route for the service range
/// refuses it at once.
#[inline(always)]
fn translation_from_pod(flow: &Flow) -> Result<Option<ConntrackValue>, NatFailed> {
    // SAFETY (map reads below): plain data, entries replaced whole.
    if let Some(entry) = unsafe { CONNTRACK.get(flow.key(CT_HAIRPIN_REPLY)) } {
        return Ok(Some(*entry));
    }
    let forward_key = flow.key(CT_FORWARD);
    if let Some(entry) = unsafe { CONNTRACK.get(forward_key) } {
        let entry = *entry;
        if forward_entry_holds(flow, &entry) {
            return Ok(Some(entry));
        }
    }
    let frontend_key =
        FrontendKey { vip: flow.dst_ip, port: flow.dst_port, protocol: flow.protocol, _pad: 0 };
    let Some(frontend) = (unsafe { FRONTENDS.get(frontend_key) }) else {
        forget_stale_reply(flow);
        return Ok(None);
    };
    let client =
        AffinityKey { service_id: frontend.service_id, client_ip: flow.src_ip, netns_cookie: 0 };
    let Some(chosen) = choose_backend(frontend, client) else { return Ok(None) };
    let backend = chosen.backend;
    // Hairpin: the pod reaches itself through the VIP. Its reply would stay inside the pod
    // (the destination is local there) and never meet the reverse NAT, so the request gets the
    // VIP as its source: the reply leaves the pod toward the VIP and is translated back here.
    let hairpin = backend.ip == flow.src_ip;
    let now = now_ns();
    let forward = ConntrackValue {
        src_ip: if hairpin { flow.dst_ip } else { flow.src_ip },
        dst_ip: backend.ip,
        src_port: flow.src_port,
        dst_port: backend.port,
        backend_id: chosen.backend_id,
        service_id: frontend.service_id,
        syn_seq: flow.tcp_seq,
        created_ns: now,
    };
    let reply_key = ConntrackKey {
        src_ip: backend.ip,
        dst_ip: forward.src_ip,
        src_port: backend.port,
        dst_port: flow.src_port,
        protocol: flow.protocol,
        direction: if hairpin { CT_HAIRPIN_REPLY } else { CT_REPLY },
        _pad: 0,
    };
    let reply = ConntrackValue {
        src_ip: flow.dst_ip,
        dst_ip: flow.src_ip,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        backend_id: chosen.backend_id,
        service_id: frontend.service_id,
        syn_seq: 0,
        created_ns: now,
    };
    // The reply entry first: a reply can only follow the forward packet.
    CONNTRACK.insert(reply_key, reply, 0).map_err(|_| NatFailed)?;
    CONNTRACK.insert(forward_key, forward, 0).map_err(|_| NatFailed)?;
    Ok(Some(forward))
}

/// Egress of a pod's host veth: a backend's reply to this pod gets the VIP back as its source.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, packet: &Packet) -> Result<(), NatFailed> {
    match packet {
        Packet::Flow(flow) => {
            // SAFETY: plain data, entries replaced whole.
            match unsafe { CONNTRACK.get(flow.key(CT_REPLY)) } {
                Some(entry) => {
                    let entry = *entry;
                    translate(ctx, flow, &entry, FRAGMENT_TO_POD)
                }
                None => Ok(()),
            }
        }
        Packet::LaterFragment(fragment) => rewrite_later_fragment(ctx, fragment, FRAGMENT_TO_POD),
    }
}
