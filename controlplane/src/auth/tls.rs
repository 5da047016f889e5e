//! rustls configurations: the API listener's (serving certificate, client certificates
//! verified against the cluster CA but not required, so that a request without one can be
//! answered 401 rather than cut off in the handshake) and its clients' (the cluster CA as the
//! only trust anchor, and a client certificate).

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};

use super::{UserInfo, pki::PkiError};

/// ALPN protocols of the API listener, in the server's order of preference.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Files of a client credentials directory (what `strait controller issue-node-credentials`
/// writes and `strait agent --credentials-dir` reads), named as in a Kubernetes TLS secret.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// The crypto provider of every TLS endpoint strait makes: ring, chosen explicitly so that
/// nothing depends on a process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate (PEM, leaf first) and its private key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKeyPem {
    pub certificate: String,
    pub key: String,
}

impl std::fmt::Debug for CertifiedKeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and panic messages.
        f.debug_struct("CertifiedKeyPem").field("certificate", &self.certificate).finish()
    }
}

impl CertifiedKeyPem {
    fn chain(&self, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        certificates(self.certificate.as_bytes(), what)
    }

    fn private_key(&self, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key.as_bytes()).map_err(|e| PkiError::Pem {
            what: format!("the private key of {what}"),
            message: e.to_string(),
        })
    }
}

/// What a client of the API presents: the CA it trusts the server by, and optionally the
/// certificate it authenticates with (none: the server treats it as anonymous).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCredentials {
    pub ca: String,
    pub identity: Option<CertifiedKeyPem>,
}

impl ClientCredentials {
    /// Trusts the cluster CA and presents no certificate.
    pub fn anonymous(ca: impl Into<String>) -> Self {
        Self { ca: ca.into(), identity: None }
    }

    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn read_dir(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Read { path, source })
        };
        Ok(Self {
            ca: read(CA_FILE)?,
            identity: Some(CertifiedKeyPem { certificate: read(CERT_FILE)?, key: read(KEY_FILE)? }),
        })
    }

    /// Writes the credentials as [`ClientCredentials::read_dir`] reads them; the key is
    /// readable by its owner only.
    pub fn write_dir(&self, dir: &Path) -> Result<(), PkiError> {
        let Some(identity) = &self.identity else {
            return Err(PkiError::NoIdentity { dir: dir.to_owned() });
        };
        super::pki::create_private_dir(dir)?;
        super::pki::write_file(&dir.join(KEY_FILE), &identity.key, 0o600)?;
        super::pki::write_file(&dir.join(CERT_FILE), &identity.certificate, 0o644)?;
        super::pki::write_file(&dir.join(CA_FILE), &self.ca, 0o644)
    }

    /// The user the client certificate names, if there is one.
    pub fn user(&self) -> Option<UserInfo> {
        let identity = self.identity.as_ref()?;
        let chain = certificates(identity.certificate.as_bytes(), "the client certificate").ok()?;
        user_from_certificate(chain.first()?)
    }

    /// A rustls client configuration trusting only the cluster CA, presenting the client
    /// certificate if there is one, offering `alpn`.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<ClientConfig, PkiError> {
        let roots = root_store(&self.ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| PkiError::Tls { what: "the client's protocol versions", source })?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(identity) => builder
                .with_client_auth_cert(
                    identity.chain("the client certificate")?,
                    identity.private_key("the client certificate")?,
                )
                .map_err(|source| PkiError::Tls { what: "the client certificate", source })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The same credentials for a tonic gRPC channel (which offers ALPN `h2` itself).
    pub fn grpc_tls(&self) -> tonic::transport::ClientTlsConfig {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca));
        if let Some(identity) = &self.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &identity.certificate,
                &identity.key,
            ));
        }
        tls
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem { what: what.to_owned(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(PkiError::Pem { what: what.to_owned(), message: "no certificate".to_owned() });
    }
    Ok(chain)
}

pub(crate) fn root_store(ca: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(ca.as_bytes(), "the cluster CA")? {
        roots
            .add(certificate)
            .map_err(|source| PkiError::Tls { what: "the cluster CA as a trust anchor", source })?;
    }
    Ok(roots)
}

/// The API listener's configuration: `serving` as its certificate; client certificates
/// signed by `ca` are verified and authenticate the connection, connections without one are
/// accepted (and their requests answered 401 where authentication is required).
pub fn server_config(ca: &str, serving: &CertifiedKeyPem) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|source| PkiError::Verifier { source })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| PkiError::Tls { what: "the server's protocol versions", source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            serving.chain("the serving certificate")?,
            serving.private_key("the serving certificate")?,
        )
        .map_err(|source| PkiError::Tls { what: "the serving certificate", source })?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The user a verified client certificate names: CommonName → user, Organizations → groups.
/// `None` when the certificate cannot be parsed or has no CommonName.
pub fn user_from_certificate(certificate: &CertificateDer<'_>) -> Option<UserInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let subject = parsed.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    if name.is_empty() {
        return None;
    }
    let groups =
        subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_owned)).collect();
    Some(UserInfo { name, groups })
}

/// A client configuration for the log server of `node`'s agent: `credentials` (the API
/// server's [`super::NODE_LOG_READER_USER`]) as the client certificate, and the agent trusted
/// by the certificate it has, its node identity: a client certificate of the cluster CA naming
/// `system:node:<node>`. Agents have no serving certificate of their own; their identity,
/// checked as a client certificate would be plus its name, proves the same thing.
pub fn node_client_config(
    credentials: &ClientCredentials,
    node: &str,
) -> Result<ClientConfig, PkiError> {
    let provider = provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&credentials.ca)?),
        provider.clone(),
    )
    .build()
    .map_err(|source| PkiError::Verifier { source })?;
    let verifier = NodeIdentityVerifier {
        identity: client_verifier,
        node_user: format!("{}{node}", super::NODE_USER_PREFIX),
    };
    let identity = credentials.identity.as_ref().ok_or_else(|| PkiError::Pem {
        what: "the node log reader's credentials".to_owned(),
        message: "no client certificate".to_owned(),
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| PkiError::Tls { what: "the client's protocol versions", source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            identity.chain("the node log reader's certificate")?,
            identity.private_key("the node log reader's certificate")?,
        )
        .map_err(|source| PkiError::Tls { what: "the node log reader's certificate", source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Verifies a node agent's certificate as the cluster CA's client certificate of one node.
#[derive(Debug)]
struct NodeIdentityVerifier {
    identity: Arc<dyn ClientCertVerifier>,
    node_user: String,
}

impl ServerCertVerifier for NodeIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.identity.verify_client_cert(end_entity, intermediates, now)?;
        match user_from_certificate(end_entity) {
            Some(user) if user.name == self.node_user => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "the node's certificate names {:?}, not {:?}",
                other.map(|u| u.name),
                self.node_user
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.identity.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.identity.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.identity.supported_verify_schemes()
    }
}
