//! The network configuration a runtime streams on stdin (CNI spec §"Network configuration"),
//! either a whole single-plugin config or one element of a conflist, into which the runtime has
//! copied `name` and `cniVersion` (and `prevResult`, for DEL and CHECK).
//!
//! ```json
//! { "cniVersion": "1.1.0", "name": "strait", "type": "strait-cni", "mtu": 1500,
//!   "ipam": { "subnet": "10.244.1.0/24", "dataDir": "/var/lib/strait/cni" },
//!   "antiSpoof": { "pinDir": "/sys/fs/bpf/strait/<cluster>/<node>" } }
//! ```

use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{error::CniError, invocation::Attachment, version::SpecVersion};

/// Where allocations live when `ipam.dataDir` is not given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/strait";
/// Ethernet's MTU, used when the config gives none.
pub const DEFAULT_MTU: u32 = 1500;
/// RFC 791: every IPv4 host must accept 68-byte datagrams; a smaller MTU breaks IPv4.
const MIN_MTU: u32 = 68;
/// The largest MTU a veth accepts (`VETH_MAX_MTU` in the kernel's veth driver, 64 KiB minus
/// the Ethernet header).
const MAX_MTU: u32 = 65535 - 14;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub version: SpecVersion,
    pub name: String,
    pub mtu: u32,
    pub ipam: IpamConfig,
    pub anti_spoof: Option<AntiSpoofConfig>,
    /// The result of the previous plugin or of our own ADD (DEL, CHECK), as sent.
    pub prev_result: Option<Value>,
    /// GC only: the attachments the runtime still knows (`cni.dev/valid-attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConfig {
    /// The node's podCIDR.
    pub subnet: Ipv4Net,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiSpoofConfig {
    /// The node agent's pin directory, holding the program and its maps.
    pub pin_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    name: String,
    #[serde(rename = "type")]
    _plugin_type: String,
    mtu: Option<u32>,
    ipam: Option<RawIpam>,
    anti_spoof: Option<RawAntiSpoof>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<RawAttachment>>,
    /// libcni also sends the list under this name, which an early 1.1 draft used.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<RawAttachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Option<String>,
    subnet: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(flatten)]
    unknown: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAntiSpoof {
    pin_dir: PathBuf,
}

#[derive(Deserialize)]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// Parses stdin as JSON. Text that is not JSON is code 6; JSON that is not an object is code 7.
pub fn parse_document(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    let value: Value =
        serde_json::from_slice(stdin).map_err(|source| CniError::Decode { source })?;
    match value {
        Value::Object(object) => Ok(object),
        other => Err(CniError::invalid_config(format!(
            "expected a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

/// The version the configuration declares, negotiated as CNI 1.1 allows: `cniVersion` when
/// present, else the newest of `cniVersions` that strait speaks.
pub fn declared_version(document: &Map<String, Value>) -> Result<SpecVersion, CniError> {
    match document.get("cniVersion") {
        Some(Value::String(text)) => SpecVersion::parse(text)
            .ok_or_else(|| CniError::UnsupportedVersion { declared: text.clone() }),
        Some(other) => Err(CniError::invalid_config(format!(
            "cniVersion must be a string like \"1.1.0\", got {}",
            json_kind(other)
        ))),
        None => match document.get("cniVersions") {
            Some(Value::Array(listed)) => {
                let newest =
                    listed.iter().filter_map(Value::as_str).filter_map(SpecVersion::parse).max();
                newest.ok_or_else(|| CniError::UnsupportedVersion {
                    declared: Value::Array(listed.clone()).to_string(),
                })
            }
            _ => Err(CniError::invalid_config(
                "cniVersion is missing: set it to one of the versions strait-cni speaks, \
                 e.g. \"1.1.0\"",
            )),
        },
    }
}

impl NetworkConfig {
    /// Parses a whole configuration document. `version` comes from [`declared_version`].
    pub fn from_document(
        document: Map<String, Value>,
        version: SpecVersion,
    ) -> Result<Self, CniError> {
        let raw: RawConfig = serde_json::from_value(Value::Object(document))
            .map_err(|error| CniError::invalid_config(error.to_string()))?;
        validate_network_name(&raw.name)?;

        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(CniError::invalid_config(format!(
                "mtu {mtu} is out of range: it must be between {MIN_MTU} and {MAX_MTU}"
            )));
        }

        let ipam = parse_ipam(raw.ipam)?;
        let anti_spoof = raw
            .anti_spoof
            .map(|anti_spoof| {
                require_absolute("antiSpoof.pinDir", &anti_spoof.pin_dir)?;
                Ok::<_, CniError>(AntiSpoofConfig { pin_dir: anti_spoof.pin_dir })
            })
            .transpose()?;

        let valid_attachments = raw.valid_attachments.or(raw.attachments).map(|listed| {
            listed
                .into_iter()
                .map(|entry| Attachment { container_id: entry.container_id, ifname: entry.ifname })
                .collect()
        });

        Ok(Self {
            version,
            name: raw.name,
            mtu,
            ipam,
            anti_spoof,
            prev_result: raw.prev_result,
            valid_attachments,
        })
    }
}

fn parse_ipam(raw: Option<RawIpam>) -> Result<IpamConfig, CniError> {
    let Some(raw) = raw else {
        return Err(CniError::invalid_config(
            "ipam is missing: set ipam.subnet to the node's podCIDR, e.g. \"10.244.1.0/24\"",
        ));
    };
    if let Some(kind) = raw.kind
        && kind != "strait"
    {
        return Err(CniError::UnsupportedField {
            key: "ipam.type".to_owned(),
            value: format!("{kind:?}"),
            hint: "strait-cni allocates addresses itself; leave ipam.type out or set it to \
                   \"strait\""
                .to_owned(),
        });
    }
    // Keys strait does not implement (ranges, routes, gateways of other IPAM plugins) would
    // otherwise be ignored silently and surprise whoever wrote them.
    if let Some((key, value)) = raw.unknown.iter().next() {
        return Err(CniError::UnsupportedField {
            key: format!("ipam.{key}"),
            value: value.to_string(),
            hint: "strait's IPAM takes only subnet, dataDir and type".to_owned(),
        });
    }
    let Some(subnet_text) = raw.subnet else {
        return Err(CniError::invalid_config(
            "ipam.subnet is missing: set it to the node's podCIDR, e.g. \"10.244.1.0/24\"",
        ));
    };
    let subnet: Ipv4Net = subnet_text.parse().map_err(|_| {
        CniError::invalid_config(format!(
            "ipam.subnet {subnet_text:?} is not an IPv4 CIDR like \"10.244.1.0/24\""
        ))
    })?;
    if subnet.addr() != subnet.network() {
        return Err(CniError::invalid_config(format!(
            "ipam.subnet {subnet_text} has host bits set: did you mean {}?",
            subnet.trunc()
        )));
    }
    // The network address, .1 (the node's) and the broadcast address are never handed out,
    // so a /30 is the smallest subnet with an address left for a pod.
    if subnet.prefix_len() > 30 {
        return Err(CniError::invalid_config(format!(
            "ipam.subnet {subnet} is too small: strait keeps the network address, the first \
             host address and the broadcast address, so the prefix must be /30 or shorter"
        )));
    }
    let data_dir = raw.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    require_absolute("ipam.dataDir", &data_dir)?;
    Ok(IpamConfig { subnet, data_dir })
}

fn require_absolute(key: &str, path: &Path) -> Result<(), CniError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "{key} {} must be an absolute path: the runtime's working directory is not defined",
            path.display()
        )))
    }
}

/// §"Network configuration": a network name starts with an alphanumeric character, followed
/// by alphanumerics, `_`, `.` or `-`. strait also uses it as a directory name, so this rule
/// keeps it from escaping `dataDir`.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if starts_well && rest_ok {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "network name {name:?} must start with a letter or digit and contain only \
             letters, digits, '_', '.' and '-'"
        )))
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
