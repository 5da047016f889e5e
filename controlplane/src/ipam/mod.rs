//! Address management: per-node pod CIDRs (service VIPs and NodePorts come later).

pub mod pod_cidr;

pub use pod_cidr::{CidrClaim, IpamError, PodCidrAllocator};
