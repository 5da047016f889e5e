//! Service load balancing: the userspace side of the `LB_*_V1` maps.
//!
//! [`ServiceLb::load_and_pin`] loads the socket hooks (`strait-sock-lb`), creates the maps in
//! the node's pin directory or re-adopts them (never clearing them), pins the programs, and
//! rebuilds its index of frontends, slots and backend ids from what the maps hold, so a
//! restarted agent carries on where the last one stopped. [`ServiceLb::attach_cgroup`] hangs
//! the hooks on one of strait's cgroups with pinned links that outlive the agent.
//!
//! The tc half of the datapath (DNAT on the ingress of each pod's host veth, reverse NAT on its
//! egress) lives in the anti-spoofing object, which declares the same maps; see
//! [`super::antispoof`]. Whichever object loads first creates the maps with the sizes it was
//! given; maps adopted from pins keep the size they were made with.
//!
//! Each write keeps every intermediate state valid for the datapath reading concurrently: new
//! backends first, then the slots, then the frontend's backend count, and only then are stale
//! slots and backends removed. A change to one frontend touches only that frontend's entries.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType,
        links::{FdLink, PinnedLink},
    },
};
use strait_common::lb::{
    self as layout, AFFINITY_MAP, ALL_MAPS, BACKEND_FLAG_TERMINATING, BACKEND_SLOTS_MAP,
    BACKENDS_MAP, BackendSlotKey, CONNTRACK_MAP, FRAGMENTS_MAP, FRONTEND_FLAG_AFFINITY,
    FRONTENDS_MAP, PROTOCOL_TCP, PROTOCOL_UDP, SOCK_FLOWS_MAP, SOCK_REVNAT_MAP,
};

use super::{EbpfError, SOCK_LB_OBJECT};

/// Capacities of the load-balancing maps, applied when they are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbMapSizes {
    /// Service ports ([`FRONTENDS_MAP`]).
    pub frontends: u32,
    /// Backends over all frontends ([`BACKENDS_MAP`]; [`BACKEND_SLOTS_MAP`] has as many slots).
    pub backends: u32,
    /// ClientIP affinity entries ([`AFFINITY_MAP`]).
    pub affinity: u32,
    /// Sockets translated by the socket hooks ([`SOCK_REVNAT_MAP`], [`SOCK_FLOWS_MAP`]).
    pub sockets: u32,
    /// Translations of the tc path, two per flow ([`CONNTRACK_MAP`]).
    pub conntrack: u32,
    /// Fragmented datagrams in flight through the tc path ([`FRAGMENTS_MAP`]); an entry serves
    /// a datagram's later fragments for `FRAGMENT_LIFETIME_NS` after its first one, or until
    /// the LRU evicts it.
    pub fragments: u32,
}

impl Default for LbMapSizes {
    fn default() -> Self {
        Self {
            frontends: layout::DEFAULT_MAX_FRONTENDS,
            backends: layout::DEFAULT_MAX_BACKENDS,
            affinity: layout::DEFAULT_MAX_AFFINITY,
            sockets: layout::DEFAULT_MAX_SOCK_REVNAT,
            conntrack: layout::DEFAULT_MAX_CONNTRACK,
            fragments: layout::DEFAULT_MAX_FRAGMENTS,
        }
    }
}

impl LbMapSizes {
    /// Sets every load-balancing map's capacity on `loader`. Maps an object does not declare
    /// are ignored by the loader.
    pub(crate) fn apply(&self, loader: &mut EbpfLoader<'_>) {
        loader
            .map_max_entries(FRONTENDS_MAP, self.frontends)
            .map_max_entries(BACKEND_SLOTS_MAP, self.backends)
            .map_max_entries(BACKENDS_MAP, self.backends)
            .map_max_entries(AFFINITY_MAP, self.affinity)
            .map_max_entries(SOCK_REVNAT_MAP, self.sockets)
            .map_max_entries(SOCK_FLOWS_MAP, self.sockets)
            .map_max_entries(CONNTRACK_MAP, self.conntrack)
            .map_max_entries(FRAGMENTS_MAP, self.fragments);
    }
}

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

/// One service port: VIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: L4Protocol,
}

impl FrontendKey {
    fn to_raw(self) -> layout::FrontendKey {
        layout::FrontendKey {
            vip: u32::from_ne_bytes(self.vip.octets()),
            port: self.port.to_be(),
            protocol: match self.protocol {
                L4Protocol::Tcp => PROTOCOL_TCP,
                L4Protocol::Udp => PROTOCOL_UDP,
            },
            _pad: 0,
        }
    }

    fn from_raw(raw: &layout::FrontendKey) -> Option<Self> {
        let protocol = match raw.protocol {
            PROTOCOL_TCP => L4Protocol::Tcp,
            PROTOCOL_UDP => L4Protocol::Udp,
            _ => return None,
        };
        Some(Self {
            vip: Ipv4Addr::from(raw.vip.to_ne_bytes()),
            port: u16::from_be(raw.port),
            protocol,
        })
    }
}

impl std::fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{:?}", self.vip, self.port, self.protocol)
    }
}

/// One backend of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddrV4,
    /// The endpoint is terminating: no new affinity is made to it; it is only in the usable set
    /// when the frontend has no ready backend.
    pub terminating: bool,
}

/// A service port with its usable backends, as the caller has filtered them: the ready ones,
/// or the terminating ones when none is ready. No backend: connections are refused at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    pub key: FrontendKey,
    pub backends: Vec<Backend>,
    /// ClientIP session affinity and its timeout (whole seconds, at least 1).
    pub affinity_timeout: Option<Duration>,
}

/// Entries and capacity of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u32,
    /// The walk stopped at [`STATS_WALK_LIMIT`] entries; `entries` is a lower bound.
    pub truncated: bool,
}

/// What [`ServiceLb::stats`] reports, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbStats {
    pub frontends: u64,
    pub backends: u64,
    pub maps: Vec<MapUsage>,
}

/// Most entries [`ServiceLb::stats`] walks in one map.
pub const STATS_WALK_LIMIT: u64 = 1 << 20;

/// The four socket hooks: (program name in the object, attach type, pin suffix).
const HOOKS: [(&str, CgroupSockAddrAttachType, &str); 4] = [
    ("sock_lb_connect4", CgroupSockAddrAttachType::Connect4, "connect4"),
    ("sock_lb_sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4, "sendmsg4"),
    ("sock_lb_recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4, "recvmsg4"),
    ("sock_lb_getpeername4", CgroupSockAddrAttachType::GetPeerName4, "getpeername4"),
];

/// Pin file of a socket hook program in the node's pin directory.
pub fn program_pin(hook: &str) -> String {
    format!("sock_lb_{hook}_prog")
}

/// What the writer knows about one frontend (rebuilt from the maps on adopt).
#[derive(Clone, Debug)]
struct FrontendState {
    service_id: u32,
    value: layout::Frontend,
    /// Whether `value` is in the frontend map.
    written: bool,
    /// Backend ids in slot order (`slots[i]` is in slot `i`).
    slots: Vec<u32>,
    /// Every backend of this frontend in the backend map: address → (id, entry).
    backends: BTreeMap<SocketAddrV4, (u32, layout::Backend)>,
}

/// The socket hooks and the writer of the load-balancing maps, as the agent holds them.
pub struct ServiceLb {
    pin_dir: PathBuf,
    frontends_map: HashMap<MapData, layout::FrontendKey, layout::Frontend>,
    slots_map: HashMap<MapData, BackendSlotKey, u32>,
    backends_map: HashMap<MapData, u32, layout::Backend>,
    index: BTreeMap<FrontendKey, FrontendState>,
    next_service_id: u32,
    next_backend_id: u32,
    // Keeps the programs loaded while the agent runs; the pins keep them after.
    _ebpf: aya::Ebpf,
}

fn map_error(action: impl Into<String>) -> impl FnOnce(MapError) -> EbpfError {
    let action = action.into();
    move |source| EbpfError::Map { action, source }
}

/// Whether a map operation failed only because the key is not there (aya reports a delete's
/// ENOENT as a syscall error).
fn is_missing_key(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(syscall) => syscall.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    what: impl FnOnce() -> String,
) -> Result<(), EbpfError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(error) if is_missing_key(&error) => Ok(()),
        Err(source) => Err(EbpfError::Map { action: what(), source }),
    }
}

fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf.take_map(name).ok_or_else(|| EbpfError::Io {
        action: format!("finding map {name} in the socket load-balancer object"),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    HashMap::try_from(map).map_err(map_error(format!("reading {name} as a hash map")))
}

fn backend_entry(service_id: u32, backend: &Backend) -> layout::Backend {
    layout::Backend {
        ip: u32::from_ne_bytes(backend.address.ip().octets()),
        port: backend.address.port().to_be(),
        flags: if backend.terminating { BACKEND_FLAG_TERMINATING } else { 0 },
        _pad: 0,
        service_id,
        _pad2: 0,
    }
}

fn backend_address(entry: &layout::Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(entry.ip.to_ne_bytes()), u16::from_be(entry.port))
}

impl ServiceLb {
    /// Loads the socket hooks, creates the maps in `pin_dir` or re-adopts the pinned ones
    /// (never clearing them), pins the programs (replacing older pins atomically) and rebuilds
    /// the index of frontends, slots and ids from the maps.
    pub fn load_and_pin(pin_dir: &Path, sizes: &LbMapSizes) -> Result<Self, EbpfError> {
        let mut ebpf = super::load_object(
            pin_dir,
            sizes,
            SOCK_LB_OBJECT,
            "the socket load-balancer programs",
        )?;
        for (name, _, hook) in HOOKS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::Io {
                    action: format!("finding program {name} in the embedded object"),
                    source: std::io::ErrorKind::NotFound.into(),
                })?
                .try_into()
                .map_err(|source| EbpfError::Program {
                    action: format!("reading {name} as a cgroup sock_addr program"),
                    source,
                })?;
            program.load().map_err(|source| EbpfError::Program {
                action: format!("loading {name} into the kernel"),
                source,
            })?;
            super::pin_replacing(pin_dir, &program_pin(hook), name, |path| program.pin(path))?;
        }
        let frontends_map = take_hash_map(&mut ebpf, FRONTENDS_MAP)?;
        let slots_map = take_hash_map(&mut ebpf, BACKEND_SLOTS_MAP)?;
        let backends_map = take_hash_map(&mut ebpf, BACKENDS_MAP)?;
        let mut lb = Self {
            pin_dir: pin_dir.to_owned(),
            frontends_map,
            slots_map,
            backends_map,
            index: BTreeMap::new(),
            next_service_id: 1,
            next_backend_id: 1,
            _ebpf: ebpf,
        };
        lb.rebuild_index()?;
        Ok(lb)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Reads the maps back into the index. Entries no frontend reaches (left by a writer that
    /// stopped half-way through a change) are removed; nothing a reader can reach is touched.
    fn rebuild_index(&mut self) -> Result<(), EbpfError> {
        let mut by_service: StdHashMap<u32, FrontendKey> = StdHashMap::new();
        for entry in self.frontends_map.iter() {
            let (raw, value) = entry.map_err(map_error("reading the frontend map"))?;
            self.next_service_id = self.next_service_id.max(value.service_id.saturating_add(1));
            let Some(key) = FrontendKey::from_raw(&raw) else { continue };
            by_service.insert(value.service_id, key);
            self.index.insert(
                key,
                FrontendState {
                    service_id: value.service_id,
                    value,
                    written: true,
                    slots: vec![0; value.backend_count as usize],
                    backends: BTreeMap::new(),
                },
            );
        }
        let mut stale_backends = Vec::new();
        for entry in self.backends_map.iter() {
            let (id, backend) = entry.map_err(map_error("reading the backend map"))?;
            self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            match by_service.get(&backend.service_id).and_then(|key| self.index.get_mut(key)) {
                Some(state) => {
                    state.backends.insert(backend_address(&backend), (id, backend));
                }
                None => stale_backends.push(id),
            }
        }
        let mut stale_slots = Vec::new();
        for entry in self.slots_map.iter() {
            let (slot, id) = entry.map_err(map_error("reading the backend slot map"))?;
            let state = by_service.get(&slot.service_id).and_then(|key| self.index.get_mut(key));
            match state {
                Some(state) if (slot.slot as usize) < state.slots.len() => {
                    state.slots[slot.slot as usize] = id;
                }
                _ => stale_slots.push(slot),
            }
        }
        for slot in stale_slots {
            remove_if_present(&mut self.slots_map, &slot, || {
                format!("removing stale slot {} of service {}", slot.slot, slot.service_id)
            })?;
        }
        for id in stale_backends {
            remove_if_present(&mut self.backends_map, &id, || {
                format!("removing stale backend {id}")
            })?;
        }
        Ok(())
    }

    fn allocate_backend_id(&mut self) -> Result<u32, EbpfError> {
        let id = self.next_backend_id;
        self.next_backend_id = id.checked_add(1).ok_or_else(|| {
            EbpfError::Refused("backend ids are exhausted; restart the agent to compact".into())
        })?;
        Ok(id)
    }

    /// Writes one frontend with its usable backends. Costs O(this frontend's backends) map
    /// operations, ordered so that a concurrent reader always sees a valid frontend (see the
    /// module documentation). Backends keep their id (and so their affinity and sticky flows)
    /// across updates.
    pub fn upsert_frontend(&mut self, frontend: &ServiceFrontend) -> Result<(), EbpfError> {
        let key = frontend.key;
        let raw_key = key.to_raw();
        if !self.index.contains_key(&key) {
            let service_id = self.next_service_id;
            self.next_service_id = service_id.checked_add(1).ok_or_else(|| {
                EbpfError::Refused("service ids are exhausted; restart the agent".into())
            })?;
            let value =
                layout::Frontend { service_id, backend_count: 0, flags: 0, affinity_timeout_s: 0 };
            self.index.insert(
                key,
                FrontendState {
                    service_id,
                    value,
                    written: false,
                    slots: Vec::new(),
                    backends: BTreeMap::new(),
                },
            );
        }
        // Desired backends, one per address (the last one given wins).
        let mut desired: BTreeMap<SocketAddrV4, Backend> = BTreeMap::new();
        for backend in &frontend.backends {
            desired.insert(backend.address, *backend);
        }

        // 1. Backends: new ones get ids; changed flags are rewritten in place.
        let mut slot_ids = Vec::with_capacity(desired.len());
        for backend in desired.values() {
            let Some(state) = self.index.get(&key) else { unreachable!("inserted above") };
            let service_id = state.service_id;
            let existing = state.backends.get(&backend.address).copied();
            let entry = backend_entry(service_id, backend);
            let id = match existing {
                Some((id, _)) => id,
                None => self.allocate_backend_id()?,
            };
            if existing.map(|(_, old)| old) != Some(entry) {
                self.backends_map
                    .insert(id, entry, 0)
                    .map_err(map_error(format!("writing backend {} of {key}", backend.address)))?;
            }
            if let Some(state) = self.index.get_mut(&key) {
                state.backends.insert(backend.address, (id, entry));
            }
            slot_ids.push(id);
        }

        let Some(state) = self.index.get_mut(&key) else { unreachable!("inserted above") };
        let service_id = state.service_id;
        // 2. Slots 0..n, only those that change.
        for (slot, id) in slot_ids.iter().enumerate() {
            if state.slots.get(slot) == Some(id) {
                continue;
            }
            let slot_key = BackendSlotKey { service_id, slot: slot as u32 };
            self.slots_map
                .insert(slot_key, *id, 0)
                .map_err(map_error(format!("writing slot {slot} of {key}")))?;
            if slot < state.slots.len() {
                state.slots[slot] = *id;
            } else {
                state.slots.push(*id);
            }
        }

        // 3. The frontend: from here on readers use the new count.
        let (flags, affinity_timeout_s) = match frontend.affinity_timeout {
            Some(timeout) => (
                FRONTEND_FLAG_AFFINITY,
                u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
            ),
            None => (0, 0),
        };
        let value = layout::Frontend {
            service_id,
            backend_count: slot_ids.len() as u32,
            flags,
            affinity_timeout_s,
        };
        if !state.written || state.value != value {
            self.frontends_map
                .insert(raw_key, value, 0)
                .map_err(map_error(format!("writing frontend {key}")))?;
            state.value = value;
            state.written = true;
        }

        // 4. Slots beyond the new count, then backends that left.
        while state.slots.len() > slot_ids.len() {
            let slot = state.slots.len() - 1;
            let slot_key = BackendSlotKey { service_id, slot: slot as u32 };
            remove_if_present(&mut self.slots_map, &slot_key, || {
                format!("removing slot {slot} of {key}")
            })?;
            state.slots.pop();
        }
        let gone: Vec<(SocketAddrV4, u32)> = state
            .backends
            .iter()
            .filter(|(address, _)| !desired.contains_key(address))
            .map(|(address, (id, _))| (*address, *id))
            .collect();
        for (address, id) in gone {
            remove_if_present(&mut self.backends_map, &id, || {
                format!("removing backend {address} of {key}")
            })?;
            state.backends.remove(&address);
        }
        Ok(())
    }

    /// Removes one frontend and its slots and backends. Succeeds when it is not there.
    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        let Some(state) = self.index.get_mut(key) else { return Ok(()) };
        // The frontend first: from then on no reader reaches the slots and backends.
        remove_if_present(&mut self.frontends_map, &key.to_raw(), || {
            format!("removing frontend {key}")
        })?;
        state.written = false;
        let service_id = state.service_id;
        while !state.slots.is_empty() {
            let slot = (state.slots.len() - 1) as u32;
            remove_if_present(&mut self.slots_map, &BackendSlotKey { service_id, slot }, || {
                format!("removing slot {slot} of {key}")
            })?;
            state.slots.pop();
        }
        while let Some((&address, &(id, _))) = state.backends.iter().next() {
            remove_if_present(&mut self.backends_map, &id, || {
                format!("removing backend {address} of {key}")
            })?;
            state.backends.remove(&address);
        }
        self.index.remove(key);
        Ok(())
    }

    /// The frontends in the maps, for a resync against the desired set.
    pub fn frontends(&self) -> impl Iterator<Item = &FrontendKey> {
        self.index.keys()
    }

    /// The backends of one frontend as the maps hold them, in slot order.
    pub fn backends(&self, key: &FrontendKey) -> Option<Vec<Backend>> {
        let state = self.index.get(key)?;
        let by_id: StdHashMap<u32, &layout::Backend> =
            state.backends.values().map(|(id, entry)| (*id, entry)).collect();
        Some(
            state
                .slots
                .iter()
                .filter_map(|id| by_id.get(id))
                .map(|entry| Backend {
                    address: backend_address(entry),
                    terminating: entry.flags & BACKEND_FLAG_TERMINATING != 0,
                })
                .collect(),
        )
    }

    /// Empties the per-flow state (tc conntrack, socket translations, affinity, fragments),
    /// leaving frontends and backends alone: what a benchmark does between modes so that no
    /// flow of one mode is translated by what another left. Returns the entries removed.
    pub fn clear_flows(&self) -> Result<u64, EbpfError> {
        fn clear<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<u64, EbpfError> {
            let Ok(data) = MapData::from_pin(path) else { return Ok(0) };
            let map = match MapInfo::from_pin(path).map(|info| info.map_type()) {
                Ok(Ok(aya::maps::MapType::LruHash)) => Map::LruHashMap(data),
                _ => Map::HashMap(data),
            };
            let mut map = HashMap::<MapData, K, V>::try_from(map)
                .map_err(map_error(format!("opening {}", path.display())))?;
            let keys: Vec<K> = map.keys().take_while(Result::is_ok).flatten().collect();
            for key in &keys {
                remove_if_present(&mut map, key, || format!("clearing {}", path.display()))?;
            }
            Ok(keys.len() as u64)
        }
        let dir = &self.pin_dir;
        Ok(clear::<layout::ConntrackKey, layout::ConntrackValue>(&dir.join(CONNTRACK_MAP))?
            + clear::<layout::SockRevNatKey, layout::SockRevNatValue>(&dir.join(SOCK_REVNAT_MAP))?
            + clear::<layout::SockFlowKey, layout::SockFlowValue>(&dir.join(SOCK_FLOWS_MAP))?
            + clear::<layout::AffinityKey, layout::AffinityValue>(&dir.join(AFFINITY_MAP))?
            + clear::<layout::FragmentKey, layout::FragmentValue>(&dir.join(FRAGMENTS_MAP))?)
    }

    /// Entries per map against capacity. Each map walk stops at [`STATS_WALK_LIMIT`]; maps not
    /// created yet (the conntrack and fragment maps before the tc programs load) are left out.
    pub fn stats(&self) -> LbStats {
        let mut stats = LbStats {
            frontends: self.index.values().filter(|s| s.written).count() as u64,
            backends: self.index.values().map(|s| s.backends.len() as u64).sum(),
            maps: Vec::new(),
        };
        for name in ALL_MAPS {
            let path = self.pin_dir.join(name);
            let Ok(info) = MapInfo::from_pin(&path) else { continue };
            let Ok(data) = MapData::from_pin(&path) else { continue };
            let map = match info.map_type() {
                Ok(aya::maps::MapType::LruHash) => Map::LruHashMap(data),
                _ => Map::HashMap(data),
            };
            let (entries, truncated) = count_keys(name, map);
            stats.maps.push(MapUsage { name, entries, capacity: info.max_entries(), truncated });
        }
        stats
    }

    /// Attaches the four socket hooks to the cgroup at `cgroup_dir`, which must lie inside
    /// strait's own subtree (never the root cgroup). The links are pinned in the pin directory,
    /// so they outlive the agent; attaching again is a no-op.
    pub fn attach_cgroup(&self, cgroup_dir: &Path) -> Result<(), EbpfError> {
        let (cgroup, id) = strait_cgroup(cgroup_dir)?;
        for (name, attach_type, hook) in HOOKS {
            let link_pin = self.link_pin(id, hook);
            if PinnedLink::from_pin(&link_pin).is_ok() {
                continue;
            }
            let program_path = self.pin_dir.join(program_pin(hook));
            let mut program =
                CgroupSockAddr::from_pin(&program_path, attach_type).map_err(|source| {
                    EbpfError::Program {
                        action: format!("opening pinned program {}", program_path.display()),
                        source,
                    }
                })?;
            let link_id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| {
                EbpfError::Program {
                    action: format!("attaching {name} to {}", cgroup_dir.display()),
                    source,
                }
            })?;
            let link = program.take_link(link_id).map_err(|source| EbpfError::Program {
                action: format!("taking the link of {name}"),
                source,
            })?;
            let link = FdLink::try_from(link).map_err(|source| EbpfError::Link {
                action: format!("turning the link of {name} into a pinnable link"),
                source,
            })?;
            link.pin(&link_pin).map_err(|source| EbpfError::Pin {
                action: format!("pinning the link of {name} at {}", link_pin.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Detaches the socket hooks from a cgroup by removing their link pins. Succeeds when they
    /// are not attached.
    pub fn detach_cgroup(&self, cgroup_dir: &Path) -> Result<(), EbpfError> {
        let (_, id) = strait_cgroup(cgroup_dir)?;
        for (_, _, hook) in HOOKS {
            let link_pin = self.link_pin(id, hook);
            match std::fs::remove_file(&link_pin) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(EbpfError::Io {
                        action: format!("removing link pin {}", link_pin.display()),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// `sock_lb_link_<cgroup inode>_<hook>`: the cgroup's path may contain dots, which bpffs
    /// refuses; its inode number (the cgroup id) names it uniquely while it exists.
    fn link_pin(&self, cgroup_id: u64, hook: &str) -> PathBuf {
        self.pin_dir.join(format!("sock_lb_link_{cgroup_id}_{hook}"))
    }
}

/// Counts the keys of one load-balancing map, stopping at [`STATS_WALK_LIMIT`].
fn count_keys(name: &str, map: Map) -> (u64, bool) {
    fn walk<K: aya::Pod, V: aya::Pod>(map: Map) -> (u64, bool) {
        let Ok(map) = HashMap::<MapData, K, V>::try_from(map) else { return (0, false) };
        let mut entries = 0;
        for key in map.keys() {
            if key.is_err() {
                break;
            }
            entries += 1;
            if entries >= STATS_WALK_LIMIT {
                return (entries, true);
            }
        }
        (entries, false)
    }
    match name {
        FRONTENDS_MAP => walk::<layout::FrontendKey, layout::Frontend>(map),
        BACKEND_SLOTS_MAP => walk::<BackendSlotKey, u32>(map),
        BACKENDS_MAP => walk::<u32, layout::Backend>(map),
        AFFINITY_MAP => walk::<layout::AffinityKey, layout::AffinityValue>(map),
        SOCK_REVNAT_MAP => walk::<layout::SockRevNatKey, layout::SockRevNatValue>(map),
        SOCK_FLOWS_MAP => walk::<layout::SockFlowKey, layout::SockFlowValue>(map),
        CONNTRACK_MAP => walk::<layout::ConntrackKey, layout::ConntrackValue>(map),
        FRAGMENTS_MAP => walk::<layout::FragmentKey, layout::FragmentValue>(map),
        _ => (0, false),
    }
}

/// Opens `cgroup_dir` after checking that it is a cgroup inside strait's subtree; returns it
/// with its id (inode number).
fn strait_cgroup(cgroup_dir: &Path) -> Result<(File, u64), EbpfError> {
    use std::os::unix::fs::MetadataExt as _;
    let io = |action: String| move |source| EbpfError::Io { action, source };
    let mount =
        crate::cgroup::cgroup2_mount().map_err(io("finding the cgroup v2 hierarchy".to_owned()))?;
    let canonical = cgroup_dir
        .canonicalize()
        .map_err(io(format!("resolving cgroup {}", cgroup_dir.display())))?;
    let relative = canonical.strip_prefix(&mount).map_err(|_| {
        EbpfError::Refused(format!("{} is not in the cgroup v2 hierarchy", canonical.display()))
    })?;
    if relative.components().next().map(|c| c.as_os_str())
        != Some(crate::cgroup::STRAIT_CGROUP.as_ref())
    {
        return Err(EbpfError::Refused(format!(
            "socket hooks go only on strait's own cgroups, not on {}",
            canonical.display()
        )));
    }
    let file =
        File::open(&canonical).map_err(io(format!("opening cgroup {}", canonical.display())))?;
    let id = file.metadata().map_err(io(format!("reading cgroup {}", canonical.display())))?.ino();
    Ok((file, id))
}
