//! kubeconfigs that carry their credentials: the cluster CA as `certificate-authority-data`,
//! the client certificate and key as `client-certificate-data` and `client-key-data`, so that
//! the one file is all kubectl needs.

use std::path::Path;

use base64::Engine as _;

use super::{pki::PkiError, tls::ClientCredentials};

/// The text of a kubeconfig with one cluster, user and context, all named after `cluster`,
/// whose context's namespace is `default`.
pub fn kubeconfig(cluster: &str, server: &str, credentials: &ClientCredentials) -> String {
    let encode = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    // JSON strings are YAML scalars: names and addresses need no further quoting.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let user = format!("{cluster}-admin");
    let mut text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster_name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
contexts:
- name: {cluster_name}
  context:
    cluster: {cluster_name}
    user: {user}
    namespace: default
current-context: {cluster_name}
users:
- name: {user}
  user:",
        cluster_name = quote(cluster),
        server = quote(server),
        ca = encode(&credentials.ca),
        user = quote(&user),
    );
    match &credentials.identity {
        Some(identity) => text.push_str(&format!(
            "\n    client-certificate-data: {}\n    client-key-data: {}\n",
            encode(&identity.certificate),
            encode(&identity.key)
        )),
        None => text.push_str(" {}\n"),
    }
    text
}

/// Writes [`kubeconfig`] to `path`, readable by its owner only (it holds a private key).
pub fn write_kubeconfig(
    path: &Path,
    cluster: &str,
    server: &str,
    credentials: &ClientCredentials,
) -> Result<(), PkiError> {
    super::pki::write_file(path, &kubeconfig(cluster, server, credentials), 0o600)
}
