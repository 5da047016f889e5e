//! The kinds served today. Each is a [`Strategy`](super::kind::Strategy).

pub mod endpoint_slice;
pub mod lease;
pub mod namespace;
pub mod node;
pub mod pod;
pub mod replica_set;
pub mod resource_quota;
pub mod service;
