//! The kinds served today. Each is a [`Strategy`](super::kind::Strategy).

pub mod config_map;
pub mod deployment;
pub mod endpoint_slice;
pub mod event;
pub mod horizontal_pod_autoscaler;
pub mod lease;
pub mod namespace;
pub mod node;
pub mod pod;
pub mod replica_set;
pub mod resource_quota;
pub mod service;
