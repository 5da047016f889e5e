//! Helpers shared by this crate's integration tests.

#![allow(dead_code, reason = "each test file uses a different part of the helpers")]

pub mod kubectl;
pub mod recorder;
