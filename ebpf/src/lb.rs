//! The service load-balancing maps and the backend choice, shared by the socket hooks
//! (`strait-sock-lb`) and the pod-veth tc programs (`strait-antispoof`). Both objects declare the
//! same maps pinned by name, so whichever loads first creates them and the other adopts them.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap},
};
use strait_common::lb::{
    AffinityKey, AffinityValue, BACKEND_FLAG_TERMINATING, Backend, BackendSlotKey, ConntrackKey,
    ConntrackValue, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK,
    DEFAULT_MAX_FRAGMENTS, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_SOCK_REVNAT, FRONTEND_FLAG_AFFINITY,
    FragmentKey, FragmentValue, Frontend, FrontendKey, SockFlowKey, SockFlowValue, SockRevNatKey,
    SockRevNatValue,
};

#[map(name = "LB_FRONTENDS_V1")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

#[map(name = "LB_BACKEND_SLOTS_V1")]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, u32> = HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "LB_BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "LB_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

#[map(name = "LB_SOCK_REVNAT_V1")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(DEFAULT_MAX_SOCK_REVNAT, 0);

#[map(name = "LB_SOCK_FLOWS_V1")]
pub static SOCK_FLOWS: LruHashMap<SockFlowKey, SockFlowValue> =
    LruHashMap::pinned(DEFAULT_MAX_SOCK_REVNAT, 0);

#[map(name = "LB_CONNTRACK_V1")]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map(name = "LB_FRAGMENTS_V1")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::pinned(DEFAULT_MAX_FRAGMENTS, 0);

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A backend chosen for a new flow.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub backend_id: u32,
    pub backend: Backend,
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The backend `backend_id` if it still belongs to `service_id`: the writer removes a backend
/// from the map when it leaves the service, and ids are per service.
#[inline(always)]
pub fn backend_of(service_id: u32, backend_id: u32) -> Option<Backend> {
    // SAFETY: plain data, replaced whole by userspace.
    let backend = unsafe { BACKENDS.get(backend_id) }?;
    if backend.service_id == service_id { Some(*backend) } else { None }
}

/// Chooses a backend for a new flow of `frontend`: the client's affinity entry when the service
/// has ClientIP affinity and the entry is fresh and names a usable backend (its timestamp is
/// refreshed), else a uniformly random slot. `None` when the frontend has no backend.
#[inline(always)]
pub fn choose_backend(frontend: &Frontend, client: AffinityKey) -> Option<Chosen> {
    if frontend.backend_count == 0 {
        return None;
    }
    let affinity = frontend.flags & FRONTEND_FLAG_AFFINITY != 0;
    let now = now_ns();
    if affinity && let Some(entry) = AFFINITY.get_ptr_mut(client) {
        // SAFETY: a valid pointer into the map value; a concurrent update of the same entry
        // only races on the timestamp, which is advisory.
        let entry = unsafe { &mut *entry };
        let timeout = u64::from(frontend.affinity_timeout_s) * NANOS_PER_SECOND;
        if now.wrapping_sub(entry.last_used_ns) < timeout
            && let Some(backend) = backend_of(frontend.service_id, entry.backend_id)
            && backend.flags & BACKEND_FLAG_TERMINATING == 0
        {
            entry.last_used_ns = now;
            return Some(Chosen { backend_id: entry.backend_id, backend });
        }
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % frontend.backend_count;
    let slot_key = BackendSlotKey { service_id: frontend.service_id, slot };
    // SAFETY: plain data.
    let backend_id = *unsafe { BACKEND_SLOTS.get(slot_key) }?;
    let backend = backend_of(frontend.service_id, backend_id)?;
    if affinity {
        let entry = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        // An affinity entry that cannot be written only costs the next connection its
        // stickiness; the connection itself is fine.
        let _ = AFFINITY.insert(client, entry, 0);
    }
    Some(Chosen { backend_id, backend })
}
