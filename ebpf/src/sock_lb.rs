//! Socket-level service load balancing: cgroup hooks that translate a VIP to a backend once per
//! connect() (TCP, connected UDP) or per datagram (unconnected UDP), before any packet exists,
//! and translate the backend back to the VIP wherever the application reads a peer address.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use strait_common::lb::{
    AffinityKey, FrontendKey, PROTOCOL_TCP, PROTOCOL_UDP, SockFlowKey, SockFlowValue,
    SockRevNatKey, SockRevNatValue,
};
use strait_ebpf::lb::{Chosen, FRONTENDS, SOCK_FLOWS, SOCK_REVNAT, backend_of, choose_backend};

/// Return values of cgroup sock_addr programs (kernel/bpf/cgroup.c): 1 lets the call go on,
/// 0 fails it with the error set by `bpf_set_retval` (EPERM when none is set).
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// include/uapi/asm-generic/errno.h
const ECONNREFUSED: i32 = 111;

/// What a hook decided.
enum Verdict {
    Allow,
    /// The frontend has no usable backend: fail the call at once with ECONNREFUSED, as a
    /// closed port would, instead of letting it time out.
    Refuse,
}

fn verdict(result: Result<Verdict, ()>) -> i32 {
    match result {
        // A failed lookup or a missing context field leaves the call untouched: the address is
        // then the VIP itself, which the node's `unreachable` route refuses.
        Ok(Verdict::Allow) | Err(()) => ALLOW,
        Ok(Verdict::Refuse) => {
            // SAFETY: allowed for connect4 and sendmsg4 (cgroup_current_func_proto).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_lb_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect4(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(try_sendmsg4(&ctx))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_vip(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_lb_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_vip(&ctx);
    ALLOW
}

fn frontend_key(addr: &bpf_sock_addr) -> Option<FrontendKey> {
    let protocol = addr.protocol as u8;
    if protocol != PROTOCOL_TCP && protocol != PROTOCOL_UDP {
        return None;
    }
    // user_port holds the port in network byte order in its first two bytes.
    Some(FrontendKey { vip: addr.user_ip4, port: addr.user_port as u16, protocol, _pad: 0 })
}

fn client(ctx: &SockAddrContext, service_id: u32) -> AffinityKey {
    // SAFETY: the context is a valid sock_addr context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    AffinityKey { service_id, client_ip: 0, netns_cookie }
}

fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context is a valid sock_addr context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Points the call at the backend and remembers the VIP for the reverse direction.
fn translate(ctx: &SockAddrContext, key: &FrontendKey, chosen: &Chosen) {
    // SAFETY: the kernel's context, valid for the whole run; user_ip4 and user_port are
    // writable in connect4 and sendmsg4 (4-byte stores).
    let addr = unsafe { &mut *ctx.sock_addr };
    let reverse_key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        backend_ip: chosen.backend.ip,
        backend_port: chosen.backend.port,
        _pad: 0,
    };
    let reverse = SockRevNatValue { vip: key.vip, port: key.port, _pad: 0 };
    // Without this entry the application would see the backend's address as its peer; the
    // connection itself is unaffected, so a full map does not fail it.
    let _ = SOCK_REVNAT.insert(&reverse_key, &reverse, 0);
    addr.user_ip4 = chosen.backend.ip;
    addr.user_port = u32::from(chosen.backend.port);
}

fn try_connect4(ctx: &SockAddrContext) -> Result<Verdict, ()> {
    // SAFETY: the kernel's context, valid for the whole run.
    let addr = unsafe { &*ctx.sock_addr };
    let Some(key) = frontend_key(addr) else { return Ok(Verdict::Allow) };
    // SAFETY: plain data, replaced whole by userspace.
    let Some(frontend) = (unsafe { FRONTENDS.get(&key) }) else { return Ok(Verdict::Allow) };
    if frontend.backend_count == 0 {
        return Ok(Verdict::Refuse);
    }
    let chosen = choose_backend(frontend, client(ctx, frontend.service_id)).ok_or(())?;
    translate(ctx, &key, &chosen);
    Ok(Verdict::Allow)
}

/// Unconnected UDP: every datagram passes here. A socket keeps its backend while the backend
/// stays in its service, and picks another with the next datagram once it is gone.
fn try_sendmsg4(ctx: &SockAddrContext) -> Result<Verdict, ()> {
    // SAFETY: the kernel's context, valid for the whole run.
    let addr = unsafe { &*ctx.sock_addr };
    let Some(key) = frontend_key(addr) else { return Ok(Verdict::Allow) };
    if key.protocol != PROTOCOL_UDP {
        return Ok(Verdict::Allow);
    }
    // SAFETY: plain data, replaced whole by userspace.
    let Some(frontend) = (unsafe { FRONTENDS.get(&key) }) else { return Ok(Verdict::Allow) };
    if frontend.backend_count == 0 {
        return Ok(Verdict::Refuse);
    }
    let flow_key = SockFlowKey { cookie: socket_cookie(ctx), frontend: key };
    // SAFETY: plain data.
    let sticky = unsafe { SOCK_FLOWS.get(&flow_key) }.and_then(|flow| {
        if flow.service_id != frontend.service_id {
            return None;
        }
        let backend = backend_of(flow.service_id, flow.backend_id)?;
        Some(Chosen { backend_id: flow.backend_id, backend })
    });
    let chosen = match sticky {
        Some(chosen) => chosen,
        None => {
            let chosen = choose_backend(frontend, client(ctx, frontend.service_id)).ok_or(())?;
            let flow =
                SockFlowValue { backend_id: chosen.backend_id, service_id: frontend.service_id };
            // Without the entry the next datagram picks again; this one is still delivered.
            let _ = SOCK_FLOWS.insert(&flow_key, &flow, 0);
            chosen
        }
    };
    translate(ctx, &key, &chosen);
    Ok(Verdict::Allow)
}

/// recvmsg4 and getpeername4: a backend address this socket was sent to becomes the VIP again.
fn restore_vip(ctx: &SockAddrContext) {
    // SAFETY: the kernel's context, valid for the whole run; user_ip4 and user_port are
    // writable in recvmsg4 and getpeername4.
    let addr = unsafe { &mut *ctx.sock_addr };
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        backend_ip: addr.user_ip4,
        backend_port: addr.user_port as u16,
        _pad: 0,
    };
    // SAFETY: plain data.
    if let Some(reverse) = unsafe { SOCK_REVNAT.get(&key) } {
        addr.user_ip4 = reverse.vip;
        addr.user_port = u32::from(reverse.port);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
