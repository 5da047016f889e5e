//! Who is asking, and may they.
//!
//! - [`pki`]: the cluster CA, created once when the cluster is initialised, and the
//!   certificates it issues (the API server's serving certificate, the admin credential, one
//!   identity per node).
//! - [`tls`]: rustls configurations of the API listener and of its clients, and the user a
//!   client certificate names.
//! - [`https`]: the listener itself: TLS with ALPN `h2` and `http/1.1` on one port, so kubectl
//!   (HTTP/1.1 or HTTP/2) and the agents' NodeSync gRPC (HTTP/2) share it, as before TLS.
//! - [`kubeconfig`]: kubeconfigs that carry the CA and a client certificate.
//! - [`authz`]: 401 for requests without a certificate, 403 for what the user may not do (the
//!   admin may do everything, a node agent what concerns its own node).
//!
//! A client certificate authenticates as Kubernetes does it (x509 client-cert authentication):
//! the subject's CommonName is the user name, each Organization a group.

pub mod authz;
pub mod https;
pub mod kubeconfig;
pub mod pki;
pub mod tls;

pub use pki::{ClusterPki, PkiError};
pub use tls::{CertifiedKeyPem, ClientCredentials};

/// The superuser group: members may do everything (Kubernetes' `system:masters`).
pub const MASTERS_GROUP: &str = "system:masters";
/// The user name of the admin credential, as kubeadm names it.
pub const ADMIN_USER: &str = "kubernetes-admin";
/// The group of every node agent.
pub const NODES_GROUP: &str = "system:nodes";
/// Node agents are users `system:node:<node name>`.
pub const NODE_USER_PREFIX: &str = "system:node:";
/// The identity the API server presents to node agents' log servers, the one user they
/// serve (as kube-apiserver's `--kubelet-client-certificate`). Issued in memory by each
/// controller at start; no group, so it is worth nothing against the API itself.
pub const NODE_LOG_READER_USER: &str = "system:strait:node-log-reader";

/// An authenticated user: the name and groups its client certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn new(name: impl Into<String>, groups: &[&str]) -> Self {
        Self { name: name.into(), groups: groups.iter().map(|g| (*g).to_owned()).collect() }
    }

    /// The admin of the cluster.
    pub fn admin() -> Self {
        Self::new(ADMIN_USER, &[MASTERS_GROUP])
    }

    /// The identity of the agent of `node`.
    pub fn node(node: &str) -> Self {
        Self::new(format!("{NODE_USER_PREFIX}{node}"), &[NODES_GROUP])
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node this user is the agent of: a `system:node:<name>` user in `system:nodes`.
    pub fn node_name(&self) -> Option<&str> {
        let name = self.name.strip_prefix(NODE_USER_PREFIX)?;
        (self.in_group(NODES_GROUP) && !name.is_empty()).then_some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::UserInfo;

    #[test]
    fn a_node_user_must_also_be_in_the_nodes_group() {
        assert_eq!(UserInfo::node("node-1").node_name(), Some("node-1"));
        assert_eq!(UserInfo::new("system:node:node-1", &["other"]).node_name(), None);
        assert_eq!(UserInfo::new("system:node:", &["system:nodes"]).node_name(), None);
        assert_eq!(UserInfo::admin().node_name(), None);
    }
}
