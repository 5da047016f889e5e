//! The control plane of strait: a Kubernetes-style API server over a durable store, IPAM, the
//! scheduler and controllers, and the NodeSync stream that feeds node agents.

pub mod api;
pub mod auth;
pub mod client;
pub mod controllers;
pub mod events;
pub mod ipam;
pub mod leader;
pub mod nodesync;
pub mod scheduler;
pub mod server;
pub mod service_catalog;
pub mod store;
pub mod testing;

/// Generated NodeSync gRPC types (client and server), from `proto/nodesync.proto`.
pub mod nodesync_proto {
    tonic::include_proto!("strait.nodesync.v1");
}

pub use server::{ControllerConfig, ControllerError, LocalController, run};

/// An error and its causes on one line (`what: why: deeper why`), for logs and messages.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
