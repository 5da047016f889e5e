//! Plain-data types shared by strait's eBPF programs and the userspace that writes their maps.
//!
//! Both sides are built by different compilers (bpfel nightly and host stable), so every type
//! here is `#[repr(C)]`, uses fixed-width integers only, spells out its padding and carries a
//! compile-time size assertion. A stray padding byte in a hash key is a silent lookup miss.
#![no_std]

pub mod antispoof;
pub mod lb;
