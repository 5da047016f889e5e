//! Helpers shared by strait's eBPF programs.
#![no_std]

pub mod net;
