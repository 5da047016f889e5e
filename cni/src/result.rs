//! The ADD result (CNI spec §"Success") in the shape of the configuration's version, and the
//! parts of a `prevResult` that CHECK and DEL read back.

use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::{error::CniError, version::SpecVersion};

/// The link-local next hop every pod routes through. The host end of the veth answers for it
/// through the permanent neighbour entry ADD writes, so it needs no address anywhere.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What ADD made, in the terms of the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentResult {
    pub host_ifname: String,
    pub host_mac: [u8; 6],
    pub pod_ifname: String,
    pub pod_mac: [u8; 6],
    pub sandbox: String,
    pub pod_ip: Ipv4Addr,
    pub mtu: u32,
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

impl AttachmentResult {
    /// The result object for `version`: interfaces (host end, then the pod end with its
    /// sandbox), the pod's `/32` on interface 1 with its gateway, the default route, no DNS.
    pub fn to_json(&self, version: SpecVersion) -> Value {
        let mut pod_interface = json!({
            "name": self.pod_ifname,
            "mac": format_mac(self.pod_mac),
            "sandbox": self.sandbox,
        });
        let mut host_interface = json!({
            "name": self.host_ifname,
            "mac": format_mac(self.host_mac),
        });
        if version.interfaces_carry_mtu() {
            pod_interface["mtu"] = json!(self.mtu);
            host_interface["mtu"] = json!(self.mtu);
        }
        let mut ip = json!({
            "address": format!("{}/32", self.pod_ip),
            "gateway": POD_GATEWAY.to_string(),
            "interface": 1,
        });
        if version.ips_carry_version() {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version.as_str(),
            "interfaces": [host_interface, pod_interface],
            "ips": [ip],
            "routes": [{ "dst": "0.0.0.0/0", "gw": POD_GATEWAY.to_string() }],
            "dns": {},
        })
    }
}

/// What a `prevResult` says about the pod end: the interface name in the sandbox and the
/// address on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousAttachment {
    pub pod_ifname: String,
    pub pod_ip: Ipv4Addr,
}

/// Finds the IPv4 address that `prevResult` puts on the sandbox interface named `ifname`.
/// Accepts every result layout from 0.3.0 on (with or without `ips[].version`).
pub fn previous_attachment(
    prev_result: &Value,
    ifname: &str,
    netns: Option<&Path>,
) -> Result<PreviousAttachment, CniError> {
    let interfaces = prev_result.get("interfaces").and_then(Value::as_array);
    let ips = prev_result
        .get("ips")
        .and_then(Value::as_array)
        .ok_or_else(|| CniError::invalid_config("prevResult has no ips list"))?;
    for ip in ips {
        let Some(address) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let Ok(net) = address.parse::<Ipv4Net>() else {
            continue;
        };
        // An entry without `interface` cannot be tied to the pod end; skip it.
        let Some(index) = ip.get("interface").and_then(Value::as_u64) else {
            continue;
        };
        let interface = interfaces.and_then(|list| list.get(usize::try_from(index).ok()?));
        let Some(interface) = interface else {
            continue;
        };
        let name = interface.get("name").and_then(Value::as_str);
        let sandbox = interface.get("sandbox").and_then(Value::as_str).unwrap_or_default();
        let sandbox_matches = match netns {
            Some(netns) => sandbox == netns.to_string_lossy(),
            None => !sandbox.is_empty(),
        };
        if name == Some(ifname) && sandbox_matches {
            return Ok(PreviousAttachment { pod_ifname: ifname.to_owned(), pod_ip: net.addr() });
        }
    }
    Err(CniError::invalid_config(format!(
        "prevResult lists no IPv4 address on sandbox interface {ifname}"
    )))
}
