//! Address management: per-node pod CIDRs and service VIPs (NodePorts come later).

pub mod pod_cidr;
pub mod service_ip;

pub use pod_cidr::{CidrClaim, IpamError, PodCidrAllocator};
pub use service_ip::{ServiceIpAllocator, ServiceIpError};
