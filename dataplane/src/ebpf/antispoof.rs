//! The tc programs on each pod's host-side veth. Ingress: a pod may only send from its own
//! address, then service DNAT for flows the socket hooks did not translate. Egress: reverse NAT
//! of service replies toward the pod.
//!
//! The agent loads them once per node ([`AntiSpoof::load_and_pin`]): their maps (endpoints,
//! drop counters and the `LB_*` service maps shared with [`super::lb`]) are pinned by name in
//! the node's pin directory and re-adopted on restart, so endpoint entries, counters and
//! translations survive the agent. The programs are pinned as [`PROGRAM_PIN`] and
//! [`EGRESS_PROGRAM_PIN`]. The CNI plugin attaches both to each new host-side veth ([`attach`])
//! after writing the pod's entry.

use std::{
    mem,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
    },
};
use strait_common::antispoof::{
    DROP_STATS_MAP, DropReason, EGRESS_PROGRAM, ENDPOINTS_MAP, PROGRAM, PodEndpoint,
};

use super::{ANTISPOOF_OBJECT, EbpfError, lb::LbMapSizes};

/// File name of the pinned ingress program inside the node's pin directory.
pub const PROGRAM_PIN: &str = "antispoof_prog";
/// Where a new program is pinned before it replaces [`PROGRAM_PIN`] with rename(2) (the
/// `_staged` name `pin_replacing` gives it).
pub const STAGED_PROGRAM_PIN: &str = "antispoof_prog_staged";
/// File name of the pinned egress program (service reverse NAT).
pub const EGRESS_PROGRAM_PIN: &str = "to_pod_prog";

/// The loaded program and its maps, as the agent holds them.
pub struct AntiSpoof {
    pin_dir: PathBuf,
    // Keeps the program and maps loaded for as long as the agent runs; the pins keep them after.
    _ebpf: aya::Ebpf,
}

impl AntiSpoof {
    /// Loads the program, re-adopting maps already pinned in `pin_dir` (agent restart) or pinning
    /// new ones, then pins the program, replacing an older pin atomically with rename(2).
    pub fn load_and_pin(pin_dir: &Path) -> Result<Self, EbpfError> {
        Self::load_and_pin_with(pin_dir, &LbMapSizes::default())
    }

    /// [`AntiSpoof::load_and_pin`] with the capacities of the service maps, used when this
    /// load creates them.
    pub fn load_and_pin_with(pin_dir: &Path, sizes: &LbMapSizes) -> Result<Self, EbpfError> {
        let mut ebpf =
            super::load_object(pin_dir, sizes, ANTISPOOF_OBJECT, "the anti-spoofing program")?;
        load_and_pin_classifier(&mut ebpf, PROGRAM, pin_dir, PROGRAM_PIN)?;
        load_and_pin_classifier(&mut ebpf, EGRESS_PROGRAM, pin_dir, EGRESS_PROGRAM_PIN)?;
        Ok(Self { pin_dir: pin_dir.to_owned(), _ebpf: ebpf })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Loads one classifier of the object and pins it at `pin`, replacing an older pin atomically.
fn load_and_pin_classifier(
    ebpf: &mut aya::Ebpf,
    name: &str,
    pin_dir: &Path,
    pin: &str,
) -> Result<(), EbpfError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| EbpfError::Io {
            action: format!("finding program {name} in the embedded object"),
            source: std::io::ErrorKind::NotFound.into(),
        })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            action: format!("reading {name} as a tc classifier"),
            source,
        })?;
    program.load().map_err(|source| EbpfError::Program {
        action: format!("loading {name} into the kernel"),
        source,
    })?;
    super::pin_replacing(pin_dir, pin, name, |path| program.pin(path))
}

fn open_endpoints(pin_dir: &Path) -> Result<HashMap<MapData, u32, PodEndpoint>, EbpfError> {
    let path = pin_dir.join(ENDPOINTS_MAP);
    let map = MapData::from_pin(&path).map_err(|source| EbpfError::Map {
        action: format!("opening pinned map {}", path.display()),
        source,
    })?;
    HashMap::try_from(aya::maps::Map::HashMap(map)).map_err(|source| EbpfError::Map {
        action: format!("reading {} as the endpoint map", path.display()),
        source,
    })
}

/// Writes the pod's entry and attaches the pinned programs to the egress and ingress of
/// `host_ifname`, the host side of the pod's veth in the calling thread's namespace. The entry
/// goes first: the ingress program drops everything from an interface without one.
pub fn attach(
    pin_dir: &Path,
    host_ifname: &str,
    host_ifindex: u32,
    pod_ip: Ipv4Addr,
) -> Result<(), EbpfError> {
    let mut endpoints = open_endpoints(pin_dir)?;
    let entry = PodEndpoint { ipv4: u32::from_ne_bytes(pod_ip.octets()), _pad: 0 };
    endpoints.insert(host_ifindex, entry, 0).map_err(|source| EbpfError::Map {
        action: format!("writing the endpoint entry of {host_ifname} ({pod_ip})"),
        source,
    })?;

    if let Err(error) = qdisc_add_clsact(host_ifname) {
        // EEXIST: the qdisc is already there (a repeated ADD); anything else is real.
        let exists = matches!(&error, aya::programs::tc::TcError::NetlinkError(e)
            if e.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(EbpfError::Tc {
                action: format!("adding the clsact qdisc to {host_ifname}"),
                source: error,
            });
        }
    }
    // Egress first: once the ingress DNAT translates a flow, its replies must find the reverse
    // NAT already in place.
    attach_pinned(pin_dir, EGRESS_PROGRAM_PIN, host_ifname, TcAttachType::Egress)?;
    attach_pinned(pin_dir, PROGRAM_PIN, host_ifname, TcAttachType::Ingress)
}

/// Attaches the classifier pinned at `pin` to one direction of `host_ifname`.
fn attach_pinned(
    pin_dir: &Path,
    pin: &str,
    host_ifname: &str,
    direction: TcAttachType,
) -> Result<(), EbpfError> {
    let path = pin_dir.join(pin);
    let mut program = SchedClassifier::from_pin(&path).map_err(|source| EbpfError::Program {
        action: format!("opening pinned program {}", path.display()),
        source,
    })?;
    // Netlink (classic tc) rather than tcx: the filter belongs to the device and goes away with
    // it, so nothing outlives the pod and the short-lived CNI process need not pin a link.
    let link_id = program
        .attach_with_options(host_ifname, direction, TcAttachOptions::Netlink(NlOptions::default()))
        .map_err(|source| EbpfError::Program {
            action: format!("attaching {} to the {direction:?} of {host_ifname}", path.display()),
            source,
        })?;
    let link = program.take_link(link_id).map_err(|source| EbpfError::Program {
        action: format!("taking the tc link of {host_ifname}"),
        source,
    })?;
    // Dropping the link would detach the filter; the device owns it from here on.
    mem::forget(link);
    Ok(())
}

/// Whether a map operation failed only because the key is not there. aya reports a lookup miss
/// as `KeyNotFound` but passes a delete's ENOENT through as a syscall error.
fn is_missing_key(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(syscall) => {
            syscall.io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// Removes the endpoint entries that carry `pod_ip`. Succeeds when there are none.
pub fn forget_endpoint(pin_dir: &Path, pod_ip: Ipv4Addr) -> Result<(), EbpfError> {
    let mut endpoints = open_endpoints(pin_dir)?;
    let wanted = u32::from_ne_bytes(pod_ip.octets());
    let mut stale = Vec::new();
    for entry in endpoints.iter() {
        let (ifindex, endpoint) = entry.map_err(|source| EbpfError::Map {
            action: "reading the endpoint map".to_owned(),
            source,
        })?;
        if endpoint.ipv4 == wanted {
            stale.push(ifindex);
        }
    }
    for ifindex in stale {
        match endpoints.remove(&ifindex) {
            Ok(()) => {}
            Err(error) if is_missing_key(&error) => {}
            Err(source) => {
                return Err(EbpfError::Map {
                    action: format!("removing endpoint entry {ifindex}"),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Removes the endpoint entry of one host-side interface. Succeeds when there is none. Unlike
/// [`forget_endpoint`] it cannot touch another pod's entry when an address has moved on.
pub fn forget_interface(pin_dir: &Path, host_ifindex: u32) -> Result<(), EbpfError> {
    let mut endpoints = open_endpoints(pin_dir)?;
    match endpoints.remove(&host_ifindex) {
        Ok(()) => Ok(()),
        Err(error) if is_missing_key(&error) => Ok(()),
        Err(source) => Err(EbpfError::Map {
            action: format!("removing endpoint entry {host_ifindex}"),
            source,
        }),
    }
}

/// The endpoint entry for a host-side interface, if any.
pub fn endpoint(pin_dir: &Path, host_ifindex: u32) -> Result<Option<Ipv4Addr>, EbpfError> {
    let endpoints = open_endpoints(pin_dir)?;
    match endpoints.get(&host_ifindex, 0) {
        Ok(endpoint) => Ok(Some(Ipv4Addr::from(endpoint.ipv4.to_ne_bytes()))),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(source) => {
            Err(EbpfError::Map { action: format!("reading endpoint entry {host_ifindex}"), source })
        }
    }
}

/// Drop counters summed over CPUs, by reason name.
pub fn drop_counts(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, EbpfError> {
    let path = pin_dir.join(DROP_STATS_MAP);
    let map = MapData::from_pin(&path).map_err(|source| EbpfError::Map {
        action: format!("opening pinned map {}", path.display()),
        source,
    })?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).map_err(|source| {
            EbpfError::Map {
                action: format!("reading {} as per-CPU counters", path.display()),
                source,
            }
        })?;
    let mut counts = Vec::new();
    for (DropReason(index), name) in DropReason::ALL {
        let per_cpu = counters.get(&index, 0).map_err(|source| EbpfError::Map {
            action: format!("reading drop counter {name}"),
            source,
        })?;
        counts.push((name, per_cpu.iter().sum()));
    }
    Ok(counts)
}
