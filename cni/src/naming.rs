//! Names of the host-side veths, derived from the attachment alone so that DEL, CHECK and GC
//! find the interface again without any stored state.

use crate::invocation::Attachment;

/// Prefix of every host-side pod veth strait creates.
pub const HOST_VETH_PREFIX: &str = "st";
/// Prefix of the pod end between its creation and its rename to `CNI_IFNAME`.
const POD_VETH_TEMP_PREFIX: &str = "sp";
/// Hex digits of the hash in a name: 2 + 11 = 13 bytes, within IFNAMSIZ (15 + NUL).
const HASH_DIGITS: usize = 11;

/// FNV-1a, 64-bit (the published offset basis and prime). Spelled out here, not taken from
/// `std`'s `DefaultHasher`, whose algorithm may change between Rust releases: a different name
/// after an upgrade would strand every existing veth.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

fn attachment_hash(attachment: &Attachment) -> String {
    // The NUL keeps ("ab", "c") and ("a", "bc") apart; neither part may contain one.
    let mut key = Vec::with_capacity(attachment.container_id.len() + attachment.ifname.len() + 1);
    key.extend_from_slice(attachment.container_id.as_bytes());
    key.push(0);
    key.extend_from_slice(attachment.ifname.as_bytes());
    let hex = format!("{:016x}", fnv1a_64(&key));
    hex[..HASH_DIGITS].to_owned()
}

/// The host-side veth of an attachment, e.g. `st3f0c9a1b2d4`.
pub fn host_veth_name(attachment: &Attachment) -> String {
    format!("{HOST_VETH_PREFIX}{}", attachment_hash(attachment))
}

/// The temporary name of the pod end, unlikely to clash with anything already in the pod.
pub fn pod_veth_temp_name(attachment: &Attachment) -> String {
    format!("{POD_VETH_TEMP_PREFIX}{}", attachment_hash(attachment))
}
