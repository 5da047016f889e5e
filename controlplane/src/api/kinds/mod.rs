//! The kinds served today. Each is a [`Strategy`](super::kind::Strategy).

pub mod namespace;
pub mod node;
pub mod pod;
