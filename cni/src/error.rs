//! Every way the plugin can fail, each with the CNI error code the runtime sees.
//!
//! Errors travel as [`CniError`] values up to `crate::main`, which is the one place that turns
//! them into the error object of CNI spec §"Error" (`cniVersion`, `code`, `msg`, `details`) on
//! stdout. Nothing else prints errors.

use std::{io, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use strait_dataplane::{ebpf::EbpfError, netlink::NetlinkError, netns::NetNsError};

use crate::{ipam::IpamError, version::SpecVersion};

/// A CNI error code. 0–99 are the spec's well-known codes (§"Error"), 100 and up are strait's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const INCOMPATIBLE_VERSION: Self = Self(1);
    pub const UNSUPPORTED_FIELD: Self = Self(2);
    pub const CONTAINER_UNKNOWN: Self = Self(3);
    pub const INVALID_ENVIRONMENT: Self = Self(4);
    pub const IO_FAILURE: Self = Self(5);
    pub const DECODE_FAILURE: Self = Self(6);
    pub const INVALID_NETWORK_CONFIG: Self = Self(7);
    pub const TRY_AGAIN_LATER: Self = Self(11);
    pub const PLUGIN_NOT_AVAILABLE: Self = Self(50);
    /// strait: every address of the node's pod subnet is allocated.
    pub const SUBNET_EXHAUSTED: Self = Self(100);
    /// strait: CHECK found the pod's network different from what ADD made.
    pub const ATTACHMENT_DRIFTED: Self = Self(101);
    /// strait: the kernel refused a link, address, route or neighbour change.
    pub const NETWORK_SETUP_FAILED: Self = Self(102);
    /// strait: the anti-spoofing program or its maps could not be used.
    pub const ANTI_SPOOFING_FAILED: Self = Self(103);
    /// strait: the interface name asked for already exists in the pod's namespace.
    pub const INTERFACE_NAME_TAKEN: Self = Self(104);
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(
        "cniVersion {declared:?} is not supported: strait-cni speaks {}",
        SpecVersion::supported_list()
    )]
    UnsupportedVersion { declared: String },

    #[error("{verb} needs cniVersion {since} or newer, but the configuration declares {declared}")]
    VerbNeedsNewerVersion { verb: &'static str, since: SpecVersion, declared: SpecVersion },

    #[error("unsupported field {key} = {value}: {hint}")]
    UnsupportedField { key: String, value: String, hint: String },

    #[error("the container's network namespace {} cannot be opened", netns.display())]
    ContainerUnknown {
        netns: PathBuf,
        #[source]
        source: NetNsError,
    },

    #[error("environment variable {variable} {problem}")]
    InvalidEnvironment { variable: &'static str, problem: String },

    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("the network configuration on stdin is not valid JSON")]
    Decode {
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid network configuration: {problem}")]
    InvalidConfig { problem: String },

    #[error(transparent)]
    Ipam(#[from] IpamError),

    #[error("strait-cni cannot serve ADD requests: {reason}")]
    NotAvailable { reason: String },

    #[error("CHECK found drift: {what}")]
    Drifted { what: String },

    /// Something ADD just made or relies on is not there (another process interfering).
    #[error("setting up the pod's network: {what}")]
    Vanished { what: String },

    #[error("{action}")]
    Netlink {
        action: String,
        #[source]
        source: NetlinkError,
    },

    #[error("{action}")]
    Namespace {
        action: String,
        #[source]
        source: NetNsError,
    },

    #[error("{action}")]
    AntiSpoof {
        action: String,
        // Boxed: aya's errors are large, and every Result in the plugin would carry the size.
        #[source]
        source: Box<EbpfError>,
    },

    #[error(
        "interface {ifname} already exists in the pod's network namespace: pick another \
         CNI_IFNAME or DEL the attachment that owns it"
    )]
    InterfaceNameTaken { ifname: String },
}

impl CniError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion { .. } | Self::VerbNeedsNewerVersion { .. } => {
                ErrorCode::INCOMPATIBLE_VERSION
            }
            Self::UnsupportedField { .. } => ErrorCode::UNSUPPORTED_FIELD,
            Self::ContainerUnknown { .. } => ErrorCode::CONTAINER_UNKNOWN,
            Self::InvalidEnvironment { .. } => ErrorCode::INVALID_ENVIRONMENT,
            Self::Io { .. } => ErrorCode::IO_FAILURE,
            Self::Decode { .. } => ErrorCode::DECODE_FAILURE,
            Self::InvalidConfig { .. } => ErrorCode::INVALID_NETWORK_CONFIG,
            Self::Ipam(error) => match error {
                IpamError::Exhausted { .. } => ErrorCode::SUBNET_EXHAUSTED,
                IpamError::LockTimeout { .. } => ErrorCode::TRY_AGAIN_LATER,
                IpamError::Io { .. } => ErrorCode::IO_FAILURE,
            },
            Self::NotAvailable { .. } => ErrorCode::PLUGIN_NOT_AVAILABLE,
            Self::Drifted { .. } => ErrorCode::ATTACHMENT_DRIFTED,
            Self::Netlink { .. } | Self::Namespace { .. } | Self::Vanished { .. } => {
                ErrorCode::NETWORK_SETUP_FAILED
            }
            Self::AntiSpoof { .. } => ErrorCode::ANTI_SPOOFING_FAILED,
            Self::InterfaceNameTaken { .. } => ErrorCode::INTERFACE_NAME_TAKEN,
        }
    }

    pub(crate) fn invalid_config(problem: impl Into<String>) -> Self {
        Self::InvalidConfig { problem: problem.into() }
    }

    pub(crate) fn drifted(what: impl Into<String>) -> Self {
        Self::Drifted { what: what.into() }
    }

    pub(crate) fn vanished(what: impl Into<String>) -> Self {
        Self::Vanished { what: what.into() }
    }

    pub(crate) fn netlink(action: impl Into<String>) -> impl FnOnce(NetlinkError) -> Self {
        let action = action.into();
        move |source| Self::Netlink { action, source }
    }

    pub(crate) fn namespace(action: impl Into<String>) -> impl FnOnce(NetNsError) -> Self {
        let action = action.into();
        move |source| Self::Namespace { action, source }
    }

    pub(crate) fn anti_spoof(action: impl Into<String>) -> impl FnOnce(EbpfError) -> Self {
        let action = action.into();
        move |source| Self::AntiSpoof { action, source: Box::new(source) }
    }

    /// The chain of causes below the message, outermost first, for the `details` field.
    pub fn details(&self) -> String {
        let mut causes = Vec::new();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        causes.join(": ")
    }

    /// The error object of CNI spec §"Error", in the version the runtime asked for (or the
    /// newest strait speaks when the request never got as far as declaring one it knows).
    pub fn to_json(&self, version: SpecVersion) -> Value {
        let mut object = json!({
            "cniVersion": version.as_str(),
            "code": self.code().0,
            "msg": self.to_string(),
        });
        let details = self.details();
        if !details.is_empty() {
            object["details"] = Value::String(details);
        }
        object
    }
}

/// Describes an exhausted subnet the way an operator needs it: which range, how full.
pub(crate) fn exhausted_hint(subnet: Ipv4Net, in_use: usize, capacity: usize) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 2);
    let last = Ipv4Addr::from(u32::from(subnet.broadcast()).saturating_sub(1));
    format!(
        "pod subnet {subnet} is exhausted: {in_use} of {capacity} assignable addresses \
         ({first}-{last}) are in use; DEL pods that are gone, run GC, or give the node a \
         larger podCIDR"
    )
}
