//! Helpers shared by strait's eBPF programs.
#![no_std]

pub mod lb;
pub mod nat;
pub mod net;
