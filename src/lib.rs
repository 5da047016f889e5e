//! The `strait` binary's library: the lab, the benchmarks and the built-in workload. The
//! control plane, the node agent and the CNI plugin live in their own crates.

pub mod bench;
pub mod lab;
pub mod netclient;
pub mod netexec;
