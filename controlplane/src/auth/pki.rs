//! The cluster's certificate authority and what it issues.
//!
//! A PKI directory (by default `<data dir>/pki` of the controller) holds the cluster's
//! credentials, which belong to the cluster and not to one controller process:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the cluster CA (ECDSA P-256, ten years), created once |
//! | `admin.crt`, `admin.key` | the admin credential (`kubernetes-admin` in `system:masters`), created with the CA |
//!
//! Every replica of a control plane must use the same CA (give them one PKI directory, or a
//! copy of it), so that any replica accepts any client. Each replica keeps its own serving
//! certificate (`apiserver.crt`, `apiserver.key`), issued by that CA for the addresses the
//! replica is reached at, and reused on restart while it still covers them.
//!
//! Creation happens under an exclusive lock on `.lock` in the directory, and `ca.crt` is
//! written last: processes racing to initialise one directory end up with the same CA, and a
//! crash midway leaves nothing that passes for a complete PKI.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::{
    client::{WebPkiServerVerifier, danger::ServerCertVerifier as _},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use super::{
    ADMIN_USER, MASTERS_GROUP, NODE_USER_PREFIX, NODES_GROUP,
    tls::{CertifiedKeyPem, ClientCredentials},
};

/// The PKI directory inside a controller's data directory.
pub const PKI_DIR: &str = "pki";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const ADMIN_CERT_FILE: &str = "admin.crt";
pub const ADMIN_KEY_FILE: &str = "admin.key";
pub const SERVING_CERT_FILE: &str = "apiserver.crt";
pub const SERVING_KEY_FILE: &str = "apiserver.key";
const LOCK_FILE: &str = ".lock";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// kubeadm's periods: ten years for the CA, one year for what it issues.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
const CERTIFICATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A serving certificate that expires sooner than this is replaced at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates are valid from a little before they are made, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} holds no cluster CA ({CA_CERT_FILE}); the controller creates it when it first starts"
    )]
    NotInitialised { dir: PathBuf },
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("{what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("setting up TLS with {what}")]
    Tls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("building the client certificate verifier")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("credentials without a client certificate cannot be written to {dir}")]
    NoIdentity { dir: PathBuf },
}

/// The cluster CA, loaded from a PKI directory, able to issue certificates.
pub struct ClusterPki {
    dir: PathBuf,
    ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ClusterPki {
    /// Opens the PKI in `dir`, creating the cluster CA and the admin credential if it has none
    /// yet (the cluster's initialisation). Later calls, from any process, reuse them.
    pub fn init(dir: &Path) -> Result<Self, PkiError> {
        create_private_dir(dir)?;
        let _lock = DirLock::exclusive(dir)?;
        if !dir.join(CA_CERT_FILE).exists() {
            create(dir)?;
            tracing::info!(dir = %dir.display(), "created the cluster CA and the admin credential");
        }
        Self::load(dir)
    }

    /// Opens the PKI in `dir`, which must have been initialised.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        if !dir.join(CA_CERT_FILE).exists() {
            return Err(PkiError::NotInitialised { dir: dir.to_owned() });
        }
        let _lock = DirLock::exclusive(dir)?;
        Self::load(dir)
    }

    fn load(dir: &Path) -> Result<Self, PkiError> {
        let ca = read(&dir.join(CA_CERT_FILE))?;
        let key = parse_key(&read(&dir.join(CA_KEY_FILE))?, "the cluster CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca, key).map_err(|source| PkiError::Generate {
            what: format!("reading the cluster CA {}", dir.join(CA_CERT_FILE).display()),
            source,
        })?;
        Ok(Self { dir: dir.to_owned(), ca, issuer })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM): what clients trust the API server by.
    pub fn ca_pem(&self) -> &str {
        &self.ca
    }

    /// The admin credential created with the CA.
    pub fn admin_credentials(&self) -> Result<ClientCredentials, PkiError> {
        read_admin_credentials(&self.dir)
    }

    /// A new client certificate for `user` in `group` (CommonName and Organization), valid
    /// for a year.
    pub fn issue_client(
        &self,
        user: &str,
        group: Option<&str>,
    ) -> Result<ClientCredentials, PkiError> {
        let identity = issue_client(&self.issuer, user, group)?;
        Ok(ClientCredentials { ca: self.ca.clone(), identity: Some(identity) })
    }

    /// The identity of the agent of `node`: `system:node:<node>` in `system:nodes`.
    pub fn issue_node(&self, node: &str) -> Result<ClientCredentials, PkiError> {
        self.issue_client(&format!("{NODE_USER_PREFIX}{node}"), Some(NODES_GROUP))
    }

    /// The serving certificate kept in `dir` if it was issued by this CA, covers every one of
    /// `names` (IP addresses or DNS names) and is valid for another 30 days; otherwise a new
    /// one for `names`, written to `dir` first.
    pub fn serving_certificate(
        &self,
        dir: &Path,
        names: &[String],
    ) -> Result<CertifiedKeyPem, PkiError> {
        create_private_dir(dir)?;
        let _lock = DirLock::exclusive(dir)?;
        let cert_path = dir.join(SERVING_CERT_FILE);
        let key_path = dir.join(SERVING_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let kept = CertifiedKeyPem { certificate: read(&cert_path)?, key: read(&key_path)? };
            match self.covers(&kept, names) {
                Ok(()) => return Ok(kept),
                Err(reason) => tracing::info!(
                    path = %cert_path.display(),
                    %reason,
                    "issuing a new serving certificate"
                ),
            }
        }
        let key = KeyPair::generate()
            .map_err(|source| PkiError::Generate { what: "generating a key".into(), source })?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|source| {
            PkiError::Generate { what: format!("the serving certificate names {names:?}"), source }
        })?;
        params.distinguished_name.push(DnType::CommonName, "strait-apiserver");
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued =
            sign(params, &key, &self.issuer, CERTIFICATE_VALIDITY, "the serving certificate")?;
        let serving = CertifiedKeyPem { certificate: issued, key: key.serialize_pem() };
        write_file(&key_path, &serving.key, 0o600)?;
        write_file(&cert_path, &serving.certificate, 0o644)?;
        Ok(serving)
    }

    /// Why `serving` would not do for `names` (a clients' verification of it, done ahead).
    fn covers(&self, serving: &CertifiedKeyPem, names: &[String]) -> Result<(), String> {
        let roots = super::tls::root_store(&self.ca).map_err(|e| e.to_string())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            super::tls::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let chain = CertificateDer::pem_slice_iter(serving.certificate.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
        let later = UnixTime::since_unix_epoch(since_epoch(SystemTime::now() + RENEW_BEFORE));
        for name in names {
            let server_name =
                ServerName::try_from(name.as_str()).map_err(|e| format!("{name}: {e}"))?;
            verifier.verify_server_cert(leaf, intermediates, &server_name, &[], later).map_err(
                |e| {
                    format!(
                        "not valid for {name} in {} days: {e}",
                        RENEW_BEFORE.as_secs() / DAY.as_secs()
                    )
                },
            )?;
        }
        // The kept key must be the certificate's: the listener would not start otherwise.
        super::tls::server_config(&self.ca, serving).map(drop).map_err(|e| format!("{e}"))
    }
}

/// The admin credential in a PKI directory, without touching the CA key (for tools that only
/// need to talk to the API, such as the lab's clients).
pub fn read_admin_credentials(dir: &Path) -> Result<ClientCredentials, PkiError> {
    if !dir.join(CA_CERT_FILE).exists() {
        return Err(PkiError::NotInitialised { dir: dir.to_owned() });
    }
    Ok(ClientCredentials {
        ca: read(&dir.join(CA_CERT_FILE))?,
        identity: Some(CertifiedKeyPem {
            certificate: read(&dir.join(ADMIN_CERT_FILE))?,
            key: read(&dir.join(ADMIN_KEY_FILE))?,
        }),
    })
}

/// Makes the CA and the admin credential; `ca.crt` last, as the mark of a complete PKI.
fn create(dir: &Path) -> Result<(), PkiError> {
    let key = KeyPair::generate()
        .map_err(|source| PkiError::Generate { what: "generating the CA key".into(), source })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "strait-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY)?;
    let ca = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate { what: "signing the CA certificate".into(), source })?
        .pem();
    let key_pem = key.serialize_pem();
    let issuer = Issuer::new(params, key);
    let admin = issue_client(&issuer, ADMIN_USER, Some(MASTERS_GROUP))?;
    write_file(&dir.join(CA_KEY_FILE), &key_pem, 0o600)?;
    write_file(&dir.join(ADMIN_KEY_FILE), &admin.key, 0o600)?;
    write_file(&dir.join(ADMIN_CERT_FILE), &admin.certificate, 0o644)?;
    write_file(&dir.join(CA_CERT_FILE), &ca, 0o644)
}

fn issue_client(
    issuer: &Issuer<'_, KeyPair>,
    user: &str,
    group: Option<&str>,
) -> Result<CertifiedKeyPem, PkiError> {
    let key = KeyPair::generate()
        .map_err(|source| PkiError::Generate { what: "generating a key".into(), source })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(group) = group {
        params.distinguished_name.push(DnType::OrganizationName, group);
    }
    params.distinguished_name.push(DnType::CommonName, user);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let certificate =
        sign(params, &key, issuer, CERTIFICATE_VALIDITY, &format!("the certificate of {user}"))?;
    Ok(CertifiedKeyPem { certificate, key: key.serialize_pem() })
}

fn sign(
    mut params: CertificateParams,
    key: &KeyPair,
    issuer: &Issuer<'_, KeyPair>,
    validity: Duration,
    what: &str,
) -> Result<String, PkiError> {
    set_validity(&mut params, validity)?;
    params.use_authority_key_identifier_extension = true;
    params
        .signed_by(key, issuer)
        .map(|certificate| certificate.pem())
        .map_err(|source| PkiError::Generate { what: format!("signing {what}"), source })
}

/// A random positive serial number and the validity period from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    let mut serial = [0u8; 16];
    rand::rng().fill(&mut serial);
    // RFC 5280 §4.1.2.2: a positive integer.
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = SystemTime::now();
    params.not_before = offset_date_time(now - BACKDATE)?;
    params.not_after = offset_date_time(now + validity)?;
    Ok(())
}

fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn offset_date_time(time: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let seconds = i64::try_from(since_epoch(time).as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(seconds).map_err(|e| PkiError::Pem {
        what: "a certificate's validity".to_owned(),
        message: e.to_string(),
    })
}

fn parse_key(pem: &str, what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem)
        .map_err(|source| PkiError::Generate { what: format!("reading {what}"), source })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_owned(), source })
}

/// Creates `dir` (and its parents) and makes it accessible to its owner only.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let failed = |source| PkiError::Write { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

/// Writes `contents` to `path` with `mode`, through a temporary file renamed into place, so
/// a reader never sees half a certificate.
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let failed = |source| PkiError::Write { path: path.to_owned(), source };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(failed)?;
    // The mode of an existing file is not changed by open.
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}

/// An exclusive lock on a directory's `.lock`, released on drop.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn exclusive(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(LOCK_FILE);
        let failed = |source| PkiError::Lock { path: path.clone(), source };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        file.lock().map_err(failed)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::{CA_CERT_FILE, CA_KEY_FILE, ClusterPki, SERVING_CERT_FILE};
    use crate::{
        auth::{UserInfo, tls::ClientCredentials},
        testing::TempDataDir,
    };

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_ca_is_created_once_and_reused() {
        let dir = TempDataDir::new("pki-reuse");
        let first = ClusterPki::init(dir.path()).unwrap();
        let key = std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let admin = first.admin_credentials().unwrap();
        let second = ClusterPki::init(dir.path()).unwrap();
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_eq!(key, std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap());
        assert_eq!(admin, second.admin_credentials().unwrap());
        assert_eq!(admin.user(), Some(UserInfo::admin()));
        let mode = |file: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode("admin.key"), 0o600);
    }

    #[test]
    fn processes_racing_to_initialise_one_directory_get_one_ca() {
        let dir = TempDataDir::new("pki-race");
        let path = dir.path().to_owned();
        let cas: Vec<String> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| ClusterPki::init(&path).unwrap().ca_pem().to_owned()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert!(cas.windows(2).all(|pair| pair[0] == pair[1]), "different CAs: {cas:?}");
    }

    #[test]
    fn open_refuses_a_directory_without_a_ca() {
        let dir = TempDataDir::new("pki-missing");
        let error = ClusterPki::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains(CA_CERT_FILE), "{error}");
    }

    #[test]
    fn issued_identities_name_their_user_and_group() {
        let dir = TempDataDir::new("pki-issue");
        let pki = ClusterPki::init(dir.path()).unwrap();
        let node = pki.issue_node("node-1").unwrap();
        assert_eq!(node.user(), Some(UserInfo::node("node-1")));
        let written = dir.path().join("node-1");
        node.write_dir(&written).unwrap();
        assert_eq!(ClientCredentials::read_dir(&written).unwrap(), node);
        let plain = pki.issue_client("jane", None).unwrap();
        assert_eq!(plain.user(), Some(UserInfo::new("jane", &[])));
    }

    #[test]
    fn the_serving_certificate_is_kept_while_it_covers_the_names_asked_for() {
        let dir = TempDataDir::new("pki-serving");
        let pki = ClusterPki::init(&dir.path().join("cluster")).unwrap();
        let serving_dir = dir.path().join("replica");
        let first =
            pki.serving_certificate(&serving_dir, &names(&["127.0.0.1", "localhost"])).unwrap();
        let again = pki.serving_certificate(&serving_dir, &names(&["localhost"])).unwrap();
        assert_eq!(first, again, "a certificate that covers the names is reused");
        let wider =
            pki.serving_certificate(&serving_dir, &names(&["127.0.0.1", "api.example"])).unwrap();
        assert_ne!(first, wider, "a missing name means a new certificate");
        assert_eq!(
            std::fs::read_to_string(serving_dir.join(SERVING_CERT_FILE)).unwrap(),
            wider.certificate
        );

        // Another CA (a PKI directory replaced): the kept certificate is not trusted by it.
        let other = ClusterPki::init(&dir.path().join("other")).unwrap();
        let reissued = other.serving_certificate(&serving_dir, &names(&["api.example"])).unwrap();
        assert_ne!(wider, reissued);
    }
}
