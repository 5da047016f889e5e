//! Bounds-checked packet access. Every read of packet memory goes through [`ptr_at`].

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is too
/// short. The verifier needs this exact comparison against `data_end` before any access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A big-endian `u16` at `offset`, converted to host order.
#[inline(always)]
pub fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    let field: *const u16 = ptr_at(ctx, offset)?;
    // SAFETY: ptr_at checked the bounds; packet fields are not necessarily aligned.
    Some(u16::from_be(unsafe { field.read_unaligned() }))
}
