//! The node side of strait: the agent that registers its node, runs its pods, programs routes
//! with rtnetlink and loads, attaches and pins the eBPF programs.

pub mod agent;
pub mod cgroup;
pub mod dirs;
pub mod dns;
pub mod ebpf;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod runtime;
pub mod streaming;
