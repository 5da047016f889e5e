//! tc classifiers on each pod's host-side veth. Ingress (packets from the pod): a pod may only
//! send as itself, then service DNAT for flows the socket hooks did not translate. Egress
//! (packets toward the pod): reverse NAT of replies from service backends.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use strait_common::antispoof::{DROP_REASON_SLOTS, DropReason, MAX_ENDPOINTS, PodEndpoint};
use strait_ebpf::{
    nat,
    net::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, load_be16, ptr_at},
};

/// RFC 791: an IPv4 header without options.
const IPV4_MIN_HLEN: usize = 20;

#[map(name = "ENDPOINTS_V1")]
static ENDPOINTS: HashMap<u32, PodEndpoint> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map(name = "DROP_STATS_V1")]
static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASON_SLOTS, 0);

#[classifier]
pub fn antispoof(ctx: TcContext) -> i32 {
    match try_antispoof(&ctx).and_then(|header_len| service_nat_from_pod(&ctx, header_len)) {
        Ok(()) => TC_ACT_OK,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(()) => TC_ACT_OK,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

/// After the anti-spoofing check passed: DNAT of IPv4 TCP/UDP to a service frontend.
fn service_nat_from_pod(ctx: &TcContext, header_len: Option<usize>) -> Result<(), DropReason> {
    let Some(header_len) = header_len else { return Ok(()) };
    let Some(packet) = nat::parse_packet(ctx, header_len) else { return Ok(()) };
    nat::from_pod(ctx, &packet).map_err(|nat::NatFailed| DropReason::NAT_FAILED)
}

/// Reverse NAT of replies toward the pod. Anything that is not well-formed IPv4 TCP/UDP passes
/// unchanged: this direction polices nothing.
fn try_to_pod(ctx: &TcContext) -> Result<(), DropReason> {
    if load_be16(ctx, 12) != Some(ETH_P_IP) {
        return Ok(());
    }
    let Some(header) = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN) else { return Ok(()) };
    // SAFETY: ptr_at checked that all 20 bytes lie inside the packet.
    let version_ihl = unsafe { (*header)[0] };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Ok(());
    }
    if ptr_at::<u8>(ctx, ETH_HLEN + header_len - 1).is_none() {
        return Ok(());
    }
    let Some(packet) = nat::parse_packet(ctx, header_len) else { return Ok(()) };
    nat::to_pod(ctx, &packet).map_err(|nat::NatFailed| DropReason::NAT_FAILED)
}

fn count_drop(reason: DropReason) {
    if let Some(counter) = DROP_STATS.get_ptr_mut(reason.0) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// The anti-spoofing verdict; for IPv4, the header length (options included) for what follows.
fn try_antispoof(ctx: &TcContext) -> Result<Option<usize>, DropReason> {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is plain data; entries are replaced whole by userspace.
    let endpoint = unsafe { ENDPOINTS.get(ifindex) }.ok_or(DropReason::UNKNOWN_ENDPOINT)?;

    let ethertype = load_be16(ctx, 12).ok_or(DropReason::MALFORMED)?;
    match ethertype {
        ETH_P_IP => check_ipv4_source(ctx, endpoint.ipv4).map(Some),
        ETH_P_ARP => check_arp_sender(ctx, endpoint.ipv4).map(|()| None),
        _ => Err(DropReason::UNSUPPORTED_PROTOCOL),
    }
}

/// RFC 791: the fixed header is 20 bytes; version and IHL share its first byte, and IHL
/// counts 32-bit words (at least 5) including options.
fn check_ipv4_source(ctx: &TcContext, pod_ipv4: u32) -> Result<usize, DropReason> {
    // Bound the fixed header first and read the source through that same pointer. A source
    // read bounded only by the options check below is rejected by the verifier: the compiler
    // folds the fixed-offset check into the variable-length one, and the verifier cannot carry
    // a bound proven on a variable-offset pointer back to the packet start.
    let header: *const [u8; IPV4_MIN_HLEN] = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MALFORMED)?;
    // SAFETY: ptr_at checked that all 20 bytes lie inside the packet.
    let header = unsafe { &*header };
    let version_ihl = header[0];
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(DropReason::MALFORMED);
    }
    // The whole header, options included, must be present.
    ptr_at::<u8>(ctx, ETH_HLEN + header_len - 1).ok_or(DropReason::MALFORMED)?;
    // Bytes 12..16: the source address, compared in network byte order as the map stores it.
    let source = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]);
    if source == pod_ipv4 { Ok(header_len) } else { Err(DropReason::SPOOFED_IPV4_SOURCE) }
}

/// RFC 826 for Ethernet/IPv4: htype(2) ptype(2) hlen(1) plen(1) oper(2) sha(hlen) spa(plen).
fn check_arp_sender(ctx: &TcContext, pod_ipv4: u32) -> Result<(), DropReason> {
    let hlen: *const u8 = ptr_at(ctx, ETH_HLEN + 4).ok_or(DropReason::MALFORMED)?;
    let plen: *const u8 = ptr_at(ctx, ETH_HLEN + 5).ok_or(DropReason::MALFORMED)?;
    // SAFETY: both bytes were bounds-checked by ptr_at.
    let (hlen, plen) = unsafe { (usize::from(*hlen), usize::from(*plen)) };
    if plen != 4 {
        return Err(DropReason::MALFORMED);
    }
    let sender: *const u32 = ptr_at(ctx, ETH_HLEN + 8 + hlen).ok_or(DropReason::MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at; unaligned in general.
    let sender = unsafe { sender.read_unaligned() };
    if sender == pod_ipv4 || sender == 0 { Ok(()) } else { Err(DropReason::SPOOFED_ARP_SENDER) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
