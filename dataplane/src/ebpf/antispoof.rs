//! The anti-spoofing tc program: a pod may only send from its own address.
//!
//! The agent loads it once per node ([`AntiSpoof::load_and_pin`]): its maps are pinned by name
//! in the node's pin directory and re-adopted on restart, so endpoint entries and drop counters
//! survive the agent. The program itself is pinned as [`PROGRAM_PIN`]. The CNI plugin attaches
//! that pinned program to each new host-side veth ([`attach`]) after writing the pod's entry.

use std::{
    mem,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
    },
};
use strait_common::antispoof::{DROP_STATS_MAP, DropReason, ENDPOINTS_MAP, PROGRAM, PodEndpoint};

use super::{ANTISPOOF_OBJECT, EbpfError};

/// File name of the pinned program inside the node's pin directory.
pub const PROGRAM_PIN: &str = "antispoof_prog";
/// Where a new program is pinned before it replaces [`PROGRAM_PIN`] with rename(2).
pub const STAGED_PROGRAM_PIN: &str = "antispoof_prog_staged";

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
        crate::dirs::create_dir_all_shared(pin_dir).map_err(|source| EbpfError::Io {
            action: format!("creating pin directory {}", pin_dir.display()),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(ANTISPOOF_OBJECT)
            .map_err(|source| EbpfError::Load {
                action: "loading the anti-spoofing program".to_owned(),
                source: Box::new(source),
            })?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| EbpfError::Io {
                action: format!("finding program {PROGRAM} in the embedded object"),
                source: std::io::ErrorKind::NotFound.into(),
            })?
            .try_into()
            .map_err(|source| EbpfError::Program {
                action: format!("reading {PROGRAM} as a tc classifier"),
                source,
            })?;
        program.load().map_err(|source| EbpfError::Program {
            action: format!("loading {PROGRAM} into the kernel"),
            source,
        })?;
        // bpffs refuses names with a dot (EPERM: dots are reserved for the kernel's own
        // entries, kernel/bpf/inode.c), so the staging name uses an underscore.
        let staged = pin_dir.join(STAGED_PROGRAM_PIN);
        let _ = std::fs::remove_file(&staged);
        program.pin(&staged).map_err(|source| EbpfError::Pin {
            action: format!("pinning {PROGRAM} at {}", staged.display()),
            source,
        })?;
        let pinned = pin_dir.join(PROGRAM_PIN);
        std::fs::rename(&staged, &pinned).map_err(|source| EbpfError::Io {
            action: format!("moving the program pin to {}", pinned.display()),
            source,
        })?;
        Ok(Self { pin_dir: pin_dir.to_owned(), _ebpf: ebpf })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
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

/// Writes the pod's entry and attaches the pinned program to the ingress of `host_ifname`, the
/// host side of the pod's veth in the calling thread's namespace. The entry goes first: the
/// program drops everything from an interface without one.
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

    let path = pin_dir.join(PROGRAM_PIN);
    let mut program = SchedClassifier::from_pin(&path).map_err(|source| EbpfError::Program {
        action: format!("opening pinned program {}", path.display()),
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
    // Netlink (classic tc) rather than tcx: the filter belongs to the device and goes away with
    // it, so nothing outlives the pod and the short-lived CNI process need not pin a link.
    let link_id = program
        .attach_with_options(
            host_ifname,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|source| EbpfError::Program {
            action: format!("attaching {PROGRAM} to the ingress of {host_ifname}"),
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
