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
    /// Every backend of this frontend in the backend map, by address.
    backends: BackendIds,
    /// A write of this frontend failed half-way: the maps may differ from this state in any
    /// entry, so the next write rewrites them all.
    dirty: bool,
    /// Backend ids that may still be in the backend map though no address of this frontend
    /// uses them (left by a failed write); the next write or removal deletes them.
    orphans: Vec<u32>,
}

/// A frontend's backends in the backend map: (address, id, entry), sorted by address. A
/// frontend has a few, so a sorted vector costs a fraction of a tree's smallest node.
#[derive(Clone, Debug, Default)]
struct BackendIds(Vec<(SocketAddrV4, u32, layout::Backend)>);

impl BackendIds {
    fn get(&self, address: &SocketAddrV4) -> Option<(u32, layout::Backend)> {
        let found = self.0.binary_search_by_key(address, |(a, _, _)| *a).ok()?;
        let (_, id, entry) = self.0[found];
        Some((id, entry))
    }

    fn insert(&mut self, address: SocketAddrV4, id: u32, entry: layout::Backend) {
        match self.0.binary_search_by_key(&address, |(a, _, _)| *a) {
            Ok(found) => self.0[found] = (address, id, entry),
            Err(at) => self.0.insert(at, (address, id, entry)),
        }
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|(_, id, _)| *id)
    }

    fn entries(&self) -> impl Iterator<Item = (u32, &layout::Backend)> {
        self.0.iter().map(|(_, id, entry)| (*id, entry))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What a failed batched write must know to leave a frontend's state safe to retry.
struct PlannedUndo {
    /// Slots the frontend had before the write.
    old_slots: usize,
    /// The backend ids the write was to delete, in `MapWrites::stale_backends`.
    stale: std::ops::Range<usize>,
}

impl FrontendState {
    /// What the index may assume after a failed batched write that wanted this state: any
    /// entry of the frontend may or may not be in the maps. The state is marked dirty (the
    /// next write rewrites every entry), keeps room for every slot either side may have
    /// written (id 0, never a backend's, pads them so they are removed), and remembers the
    /// backend ids the write was to delete, since their removal may not have happened.
    fn after_failed_write(mut self, undo: &PlannedUndo, writes: &MapWrites) -> Self {
        self.dirty = true;
        if undo.old_slots > self.slots.len() {
            self.slots.resize(undo.old_slots, 0);
        }
        self.orphans.extend_from_slice(&writes.stale_backends[undo.stale.clone()]);
        self
    }
}

/// The map writes one batched upsert makes, in the order they are applied.
#[derive(Default)]
struct MapWrites {
    backends: Vec<(u32, layout::Backend)>,
    slots: Vec<(BackendSlotKey, u32)>,
    frontends: Vec<(layout::FrontendKey, layout::Frontend)>,
    stale_slots: Vec<BackendSlotKey>,
    stale_backends: Vec<u32>,
}

impl MapWrites {
    fn apply(&self, lb: &ServiceLb) -> Result<(), EbpfError> {
        update_batch(&lb.backends_map, &self.backends, "backends")?;
        update_batch(&lb.slots_map, &self.slots, "backend slots")?;
        update_batch(&lb.frontends_map, &self.frontends, "frontends")?;
        delete_batch(&lb.slots_map, &self.stale_slots, "stale backend slots")?;
        delete_batch(&lb.backends_map, &self.stale_backends, "stale backends")
    }
}

/// `bpf_attr` as `BPF_MAP_*_BATCH` reads it (include/uapi/linux/bpf.h, `batch`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// include/uapi/linux/bpf.h, `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Runs one batch command over `count` elements; returns how many the kernel processed and
/// the error that stopped it, if any.
fn map_batch(
    command: libc::c_long,
    map: &MapData,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> (usize, Option<std::io::Error>) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: u32::try_from(count).unwrap_or(u32::MAX),
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a live, fully initialised bpf_attr prefix of the size passed; `keys`
    // (and `values` for an update) point at `count` contiguous elements of the map's key
    // (value) size, which the kernel only reads; it writes back only `attr.count`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            (&raw mut attr).cast::<libc::c_void>(),
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if result == 0 {
        (count, None)
    } else {
        (attr.count as usize, Some(std::io::Error::last_os_error()))
    }
}

/// Writes `entries` into `map` in one `BPF_MAP_UPDATE_BATCH` (insert or replace).
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    entries: &[(K, V)],
    what: &str,
) -> Result<(), EbpfError> {
    use aya::maps::IterableMap as _;
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(key, _)| *key).collect();
    let values: Vec<V> = entries.iter().map(|(_, value)| *value).collect();
    let (done, error) = map_batch(
        BPF_MAP_UPDATE_BATCH,
        map.map(),
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    );
    match error {
        None => Ok(()),
        Some(source) => Err(EbpfError::Io {
            action: format!("writing {} {what} (batch stopped after {done})", keys.len()),
            source,
        }),
    }
}

/// Deletes `keys` from `map` with `BPF_MAP_DELETE_BATCH`, skipping keys that are not there
/// (the kernel stops a batch at the first missing key; it is resumed after it).
fn delete_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    what: &str,
) -> Result<(), EbpfError> {
    use aya::maps::IterableMap as _;
    let mut rest = keys;
    while !rest.is_empty() {
        let (done, error) = map_batch(
            BPF_MAP_DELETE_BATCH,
            map.map(),
            rest.as_ptr().cast(),
            std::ptr::null(),
            rest.len(),
        );
        match error {
            None => return Ok(()),
            Some(error) if error.raw_os_error() == Some(libc::ENOENT) && done < rest.len() => {
                rest = &rest[done + 1..];
            }
            Some(source) => {
                return Err(EbpfError::Io {
                    action: format!("removing {} {what} (batch stopped after {done})", keys.len()),
                    source,
                });
            }
        }
    }
    Ok(())
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
                    backends: BackendIds::default(),
                    dirty: false,
                    orphans: Vec::new(),
                },
            );
        }
        let mut stale_backends = Vec::new();
        for entry in self.backends_map.iter() {
            let (id, backend) = entry.map_err(map_error("reading the backend map"))?;
            self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            match by_service.get(&backend.service_id).and_then(|key| self.index.get_mut(key)) {
                Some(state) => state.backends.insert(backend_address(&backend), id, backend),
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
        self.upsert_frontends(std::slice::from_ref(frontend))
    }

    /// Writes many frontends at once, as [`Self::upsert_frontend`] would one after another,
    /// but with one batched system call per map and step (`BPF_MAP_UPDATE_BATCH`): a snapshot
    /// of 100,000 services costs a handful of system calls, not millions. The order of the
    /// steps is the single write's, applied to every frontend of the batch at once: all new
    /// backends, then all slots, then all frontends, then the stale slots and backends; so a
    /// concurrent reader still sees every frontend either as it was or as it is now. When a
    /// frontend appears twice, the last one wins.
    ///
    /// If a step fails, the frontends of the batch are left for the next write to rewrite
    /// whole: the index forgets what it knew of their slots and frontend entry, and keeps
    /// every backend id that may now be in the map so that a later write or removal clears it.
    pub fn upsert_frontends<'a>(
        &mut self,
        frontends: impl IntoIterator<Item = &'a ServiceFrontend>,
    ) -> Result<(), EbpfError> {
        // One per key, the last given winning: a stable sort keeps their order, and the
        // reversed list puts the last first in each run of equal keys.
        let mut wanted: Vec<&ServiceFrontend> = frontends.into_iter().collect();
        wanted.reverse();
        wanted.sort_by_key(|frontend| frontend.key);
        wanted.dedup_by_key(|frontend| frontend.key);
        let mut writes = MapWrites::default();
        let mut planned = Vec::with_capacity(wanted.len());
        for frontend in wanted {
            let key = frontend.key;
            let old = self.index.remove(&key);
            let old_slots = old.as_ref().map_or(0, |old| old.slots.len());
            let stale_from = writes.stale_backends.len();
            let new = match self.plan_upsert(frontend, old, &mut writes) {
                Ok(new) => new,
                Err((error, state)) => {
                    // Ids ran out: nothing is written; every frontend planned so far, this
                    // one included, is left for the next write to rewrite whole.
                    if let Some(state) = state {
                        self.index.insert(key, state);
                    }
                    self.forget_plans(planned, &writes);
                    return Err(error);
                }
            };
            let undo = PlannedUndo { old_slots, stale: stale_from..writes.stale_backends.len() };
            planned.push((key, new, undo));
        }
        let written = writes.apply(self);
        for (key, new, undo) in planned {
            let state = match &written {
                Ok(()) => new,
                Err(_) => new.after_failed_write(&undo, &writes),
            };
            self.index.insert(key, state);
        }
        written
    }

    /// Puts back frontends planned for a write that will not happen, marked dirty (their
    /// planned state is not what the maps hold; the next write rewrites them whole).
    fn forget_plans(
        &mut self,
        planned: Vec<(FrontendKey, FrontendState, PlannedUndo)>,
        writes: &MapWrites,
    ) {
        for (key, new, undo) in planned {
            self.index.insert(key, new.after_failed_write(&undo, writes));
        }
    }

    /// What writing `frontend` over `old` takes, added to `writes`; returns the state the
    /// index holds once the writes are done. Touches no map. When ids run out, returns the
    /// error with the state as far as it got, marked dirty (nothing of it is written).
    #[expect(
        clippy::result_large_err,
        reason = "the state travels back only when ids are exhausted, once in a process' life"
    )]
    fn plan_upsert(
        &mut self,
        frontend: &ServiceFrontend,
        old: Option<FrontendState>,
        writes: &mut MapWrites,
    ) -> Result<FrontendState, (EbpfError, Option<FrontendState>)> {
        let key = frontend.key;
        let mut state = match old {
            Some(old) => old,
            None => {
                let service_id = self.next_service_id;
                self.next_service_id = service_id.checked_add(1).ok_or_else(|| {
                    let error =
                        EbpfError::Refused("service ids are exhausted; restart the agent".into());
                    (error, None)
                })?;
                let value = layout::Frontend {
                    service_id,
                    backend_count: 0,
                    flags: 0,
                    affinity_timeout_s: 0,
                };
                FrontendState {
                    service_id,
                    value,
                    written: false,
                    slots: Vec::with_capacity(frontend.backends.len()),
                    backends: BackendIds(Vec::with_capacity(frontend.backends.len())),
                    dirty: false,
                    orphans: Vec::new(),
                }
            }
        };
        let service_id = state.service_id;
        let dirty = std::mem::take(&mut state.dirty);
        // Desired backends, one per address (the last one given wins), in address order.
        let mut desired: Vec<Backend> = frontend.backends.iter().rev().copied().collect();
        desired.sort_by_key(|backend| backend.address);
        desired.dedup_by_key(|backend| backend.address);

        // 1. Backends: new ones get ids; changed flags are rewritten in place.
        let mut slot_ids = Vec::with_capacity(desired.len());
        for backend in &desired {
            let existing = state.backends.get(&backend.address);
            let entry = backend_entry(service_id, backend);
            let id =
                match existing.map(|(id, _)| id).ok_or(()).or_else(|()| self.allocate_backend_id())
                {
                    Ok(id) => id,
                    Err(error) => {
                        state.dirty = true;
                        return Err((error, Some(state)));
                    }
                };
            if dirty || existing.map(|(_, old)| old) != Some(entry) {
                writes.backends.push((id, entry));
            }
            state.backends.insert(backend.address, id, entry);
            slot_ids.push(id);
        }

        // 2. Slots 0..n, only those that change.
        for (slot, id) in slot_ids.iter().enumerate() {
            if !dirty && state.slots.get(slot) == Some(id) {
                continue;
            }
            writes.slots.push((BackendSlotKey { service_id, slot: slot as u32 }, *id));
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
        if dirty || !state.written || state.value != value {
            writes.frontends.push((key.to_raw(), value));
            state.value = value;
            state.written = true;
        }

        // 4. Slots beyond the new count, then backends that left (and those a failed write
        // may have left behind).
        writes.stale_backends.append(&mut state.orphans);
        for slot in slot_ids.len()..state.slots.len() {
            writes.stale_slots.push(BackendSlotKey { service_id, slot: slot as u32 });
        }
        state.slots.truncate(slot_ids.len());
        state.backends.0.retain(|(address, id, _)| {
            let keep = desired.binary_search_by_key(address, |b| b.address).is_ok();
            if !keep {
                writes.stale_backends.push(*id);
            }
            keep
        });
        Ok(state)
    }

    /// Removes one frontend and its slots and backends. Succeeds when it is not there.
    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        self.remove_frontends(std::slice::from_ref(key))
    }

    /// Removes many frontends with their slots and backends, with one batched system call per
    /// map (`BPF_MAP_DELETE_BATCH`): every frontend first, so that from then on no reader
    /// reaches their slots and backends, then the slots, then the backends. Keys that are not
    /// there are skipped. If a step fails, the frontends stay in the index (the entry unknown),
    /// so a later removal finishes the job.
    pub fn remove_frontends(&mut self, keys: &[FrontendKey]) -> Result<(), EbpfError> {
        let mut frontends = Vec::new();
        let mut slots = Vec::new();
        let mut backends = Vec::new();
        let mut removed = Vec::new();
        for key in keys {
            let Some(state) = self.index.get(key) else { continue };
            frontends.push(key.to_raw());
            let service_id = state.service_id;
            slots.extend(
                (0..state.slots.len() as u32).map(|slot| BackendSlotKey { service_id, slot }),
            );
            backends.extend(state.backends.ids());
            backends.extend(&state.orphans);
            removed.push(*key);
        }
        let result = delete_batch(&self.frontends_map, &frontends, "frontends")
            .and_then(|()| delete_batch(&self.slots_map, &slots, "backend slots"))
            .and_then(|()| delete_batch(&self.backends_map, &backends, "backends"));
        for key in removed {
            match &result {
                Ok(()) => {
                    self.index.remove(&key);
                }
                Err(_) => {
                    if let Some(state) = self.index.get_mut(&key) {
                        state.written = false;
                        state.dirty = true;
                    }
                }
            }
        }
        result
    }

    /// Whether the maps hold `frontend` exactly as given (its backends in address order, with
    /// their flags, and its affinity), so that writing it again would change nothing.
    pub fn is_programmed(&self, frontend: &ServiceFrontend) -> bool {
        let Some(state) = self.index.get(&frontend.key) else { return false };
        if state.dirty || !state.written || !state.orphans.is_empty() {
            return false;
        }
        let affinity = match frontend.affinity_timeout {
            Some(timeout) => u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
            None => 0,
        };
        let flags = if frontend.affinity_timeout.is_some() { FRONTEND_FLAG_AFFINITY } else { 0 };
        state.value.flags == flags
            && state.value.affinity_timeout_s == affinity
            && state.value.backend_count as usize == frontend.backends.len()
            && state.slots.len() == frontend.backends.len()
            && state.backends.len() == frontend.backends.len()
            && frontend.backends.windows(2).all(|pair| pair[0].address < pair[1].address)
            && frontend.backends.iter().zip(&state.slots).all(|(backend, slot)| {
                state.backends.get(&backend.address).is_some_and(|(id, entry)| {
                    id == *slot && entry == backend_entry(state.service_id, backend)
                })
            })
    }

    /// Frontends written and their backends, from the index.
    pub fn programmed(&self) -> (usize, usize) {
        let written = self.index.values().filter(|s| s.written);
        written
            .fold((0, 0), |(frontends, backends), s| (frontends + 1, backends + s.backends.len()))
    }

    /// The frontends in the maps, for a resync against the desired set.
    pub fn frontends(&self) -> impl Iterator<Item = &FrontendKey> {
        self.index.keys()
    }

    /// The backends of one frontend as the maps hold them, in slot order.
    pub fn backends(&self, key: &FrontendKey) -> Option<Vec<Backend>> {
        let state = self.index.get(key)?;
        let by_id: StdHashMap<u32, &layout::Backend> = state.backends.entries().collect();
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
