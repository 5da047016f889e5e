//! The control plane of strait: a Kubernetes-style API server over a durable store, IPAM, the
//! scheduler and controllers, and the NodeSync stream that feeds node agents.

pub mod client;

/// Generated NodeSync gRPC types (client and server), from `proto/nodesync.proto`.
pub mod nodesync_proto {
    tonic::include_proto!("strait.nodesync.v1");
}
