//! Streaming sessions of the node's server (`kubectl exec`): the WebSocket framing and
//! Kubernetes' remote command channels on top of it.

pub mod remotecommand;
pub mod spdy;
pub mod terminal;
pub mod websocket;
