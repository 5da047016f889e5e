//! The verbs of CNI spec §"CNI operations", each from a validated configuration and
//! invocation to a result (ADD) or nothing.

use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use serde_json::Value;
use strait_dataplane::{ebpf::antispoof, netns::NetNs};

use crate::{
    config::NetworkConfig,
    error::{CniError, exhausted_hint},
    invocation::Attachment,
    ipam::PodIpAllocator,
    naming,
    pod_network::{self, AttachRequest, pinned_maps_exist},
    result::previous_attachment,
};

fn allocator(config: &NetworkConfig) -> PodIpAllocator {
    PodIpAllocator::new(&config.ipam.data_dir, &config.name, config.ipam.subnet)
}

fn anti_spoof_pin_dir(config: &NetworkConfig) -> Option<&Path> {
    config.anti_spoof.as_ref().map(|anti_spoof| anti_spoof.pin_dir.as_path())
}

/// A single-threaded runtime: one plugin run does a few dozen netlink round trips in order.
fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| {
        CniError::Io { action: "starting the netlink runtime".to_owned(), source }
    })
}

/// A netlink handle on the plugin's own namespace: the node. Must run inside the runtime.
fn node_netlink() -> Result<rtnetlink::Handle, CniError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| CniError::Io {
        action: "opening a netlink socket on the node".to_owned(),
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn open_pod_namespace(netns: &Path) -> Result<NetNs, CniError> {
    NetNs::open_path(netns)
        .map_err(|source| CniError::ContainerUnknown { netns: netns.to_owned(), source })
}

fn require_anti_spoof_pins(config: &NetworkConfig) -> Result<(), CniError> {
    match anti_spoof_pin_dir(config) {
        Some(pin_dir) if !pinned_maps_exist(pin_dir) => Err(CniError::NotAvailable {
            reason: format!(
                "antiSpoof.pinDir {} holds no anti-spoofing maps: is the strait agent running \
                 on this node, with that pin directory?",
                pin_dir.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// ADD: allocate, plumb, report. A failure leaves nothing behind: the veth (and with it the
/// pod end, its routes and the endpoint entry) is removed first, the address released last.
pub fn add(
    config: &NetworkConfig,
    attachment: &Attachment,
    netns: &Path,
) -> Result<Value, CniError> {
    require_anti_spoof_pins(config)?;
    // Opened before allocating, so that a pod that is already gone costs nothing to undo.
    let pod_ns = open_pod_namespace(netns)?;
    let allocator = allocator(config);
    let pod_ip = allocator.allocate(attachment)?;
    let request = AttachRequest {
        attachment,
        netns_path: netns,
        pod_ip,
        mtu: config.mtu,
        anti_spoof_pin_dir: anti_spoof_pin_dir(config),
    };
    let attached = runtime().and_then(|runtime| {
        runtime.block_on(async {
            let node = node_netlink()?;
            pod_network::attach(&node, &pod_ns, &request).await
        })
    });
    match attached {
        Ok(result) => Ok(result.to_json(config.version)),
        Err(error) => {
            if let Err(release) = allocator.release(attachment) {
                eprintln!("strait-cni: releasing {pod_ip} after the failed ADD: {release}");
            }
            Err(error)
        }
    }
}

/// Removes what one attachment holds on the node, then releases its address. Every step
/// succeeds when its object is already gone (spec §DEL: DEL must be idempotent and must
/// clean up as much as it can even when the namespace is gone).
fn remove_attachment(
    node: &rtnetlink::Handle,
    config: &NetworkConfig,
    attachment: &Attachment,
    held_ip: Option<Ipv4Addr>,
) -> impl Future<Output = Result<(), CniError>> {
    let host_ifname = naming::host_veth_name(attachment);
    let pin_dir = anti_spoof_pin_dir(config).map(Path::to_owned);
    let node = node.clone();
    async move {
        pod_network::detach(&node, &host_ifname, pin_dir.as_deref()).await?;
        // Entries whose veth vanished with the pod's namespace are found by address. The
        // address is still held here, so no other pod can carry it yet.
        if let (Some(ip), Some(pin_dir)) = (held_ip, pin_dir.as_deref())
            && pinned_maps_exist(pin_dir)
        {
            antispoof::forget_endpoint(pin_dir, ip)
                .map_err(CniError::anti_spoof(format!("removing the endpoint entry of {ip}")))?;
        }
        Ok(())
    }
}

/// DEL: remove the host veth, route and endpoint entry, then release the address.
pub fn del(config: &NetworkConfig, attachment: &Attachment) -> Result<(), CniError> {
    let allocator = allocator(config);
    let held_ip = allocator.allocation_of(attachment)?;
    runtime()?.block_on(async {
        let node = node_netlink()?;
        remove_attachment(&node, config, attachment, held_ip).await
    })?;
    allocator.release(attachment)?;
    Ok(())
}

/// CHECK: the allocation, the pod's interface, address and routes, the host veth and its
/// route, and the endpoint entry must all still be what ADD made (spec §CHECK).
pub fn check(
    config: &NetworkConfig,
    attachment: &Attachment,
    netns: &Path,
) -> Result<(), CniError> {
    let prev_result = config.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("CHECK needs prevResult: the runtime must pass ADD's result")
    })?;
    let previous = previous_attachment(prev_result, &attachment.ifname, Some(netns))?;
    let held = allocator(config).allocation_of(attachment)?;
    if held != Some(previous.pod_ip) {
        return Err(CniError::drifted(format!(
            "the address store holds {held:?} for container {} on {}, prevResult says {}",
            attachment.container_id, attachment.ifname, previous.pod_ip
        )));
    }
    let pod_ns = open_pod_namespace(netns)?;
    runtime()?.block_on(async {
        let node = node_netlink()?;
        pod_network::check(&node, &pod_ns, attachment, previous.pod_ip, anti_spoof_pin_dir(config))
            .await
    })
}

/// STATUS: ready when the address store is usable, has a free address, and the anti-spoofing
/// maps are pinned if the config asks for them (spec §STATUS: error 50 otherwise).
pub fn status(config: &NetworkConfig) -> Result<(), CniError> {
    let allocator = allocator(config);
    let usage = allocator.usage().map_err(|error| CniError::NotAvailable {
        reason: format!("the address store {} is not usable: {error}", allocator.dir().display()),
    })?;
    if usage.in_use >= usage.capacity {
        return Err(CniError::NotAvailable {
            reason: exhausted_hint(config.ipam.subnet, usage.in_use, usage.capacity),
        });
    }
    require_anti_spoof_pins(config)
}

/// GC: release every allocation whose attachment the runtime no longer lists, with whatever of
/// it is left on the node. Carries on past failures and reports the first (spec §GC: remove as
/// much as possible).
pub fn gc(config: &NetworkConfig) -> Result<(), CniError> {
    let valid = config.valid_attachments.as_ref().ok_or_else(|| {
        CniError::invalid_config(
            "GC needs cni.dev/valid-attachments: without it every pod would count as stale",
        )
    })?;
    let keep: HashSet<Attachment> = valid.iter().cloned().collect();
    let allocator = allocator(config);
    let stale: Vec<_> = allocator
        .allocations()?
        .into_iter()
        .filter(|allocation| !keep.contains(&allocation.owner))
        .collect();
    let mut first_failure = None;
    let mut cleaned = HashSet::new();
    runtime()?.block_on(async {
        let node = node_netlink()?;
        for allocation in &stale {
            match remove_attachment(&node, config, &allocation.owner, Some(allocation.ip)).await {
                Ok(()) => {
                    cleaned.insert(allocation.owner.clone());
                }
                Err(error) => {
                    eprintln!("strait-cni: GC of {:?}: {error}", allocation.owner);
                    first_failure.get_or_insert(error);
                }
            }
        }
        Ok::<_, CniError>(())
    })?;
    // Addresses whose cleanup failed stay held, so they are not handed out over leftovers.
    let mut keep_now = keep;
    keep_now.extend(stale.iter().filter(|a| !cleaned.contains(&a.owner)).map(|a| a.owner.clone()));
    allocator.release_all_except(&keep_now)?;
    first_failure.map_or(Ok(()), Err)
}
