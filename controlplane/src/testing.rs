//! Helpers for tests of this crate and of the crates that drive a controller (node agent, lab):
//! a temporary data directory removed on drop, a controller served on loopback with ready
//! clients and kubeconfigs, objects as agents and users write them, and a polling wait.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::auth::ClientCredentials;
use k8s_openapi::{
    api::core::v1::{
        Container, Namespace, Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, Pod,
        PodSpec,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// A fresh directory under the system temp dir, removed with everything in it on drop
/// (including when the test panics).
#[derive(Debug)]
pub struct TempDataDir {
    path: PathBuf,
}

impl TempDataDir {
    /// Creates `<tmp>/strait-<label>-<random>`.
    ///
    /// # Panics
    /// When the directory cannot be created: this is a test helper, and a test cannot run
    /// without it.
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("strait-{label}-{}", uuid::Uuid::new_v4()));
        if let Err(error) = std::fs::create_dir_all(&path) {
            panic!("creating the temporary directory {}: {error}", path.display());
        }
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (or reopens) a redb store at `store.redb` in this directory.
    ///
    /// # Panics
    /// When the store cannot be opened.
    pub fn open_store(&self) -> crate::store::SharedStore {
        let path = self.path.join("store.redb");
        match crate::store::RedbStore::open(&path, crate::store::RedbStoreOptions::default()) {
            Ok(store) => std::sync::Arc::new(store),
            Err(error) => panic!("opening the store {}: {error}", path.display()),
        }
    }
}

impl Drop for TempDataDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing a temporary directory");
        }
    }
}

/// A controller on loopback with its own temporary data directory, which survives
/// [`TestController::restart`] and is removed when the value is dropped.
pub struct TestController {
    config: crate::server::ControllerConfig,
    controller: Option<crate::server::LocalController>,
    // Declared last: dropped after the controller has been told to stop.
    dir: TempDataDir,
}

impl TestController {
    /// Starts a controller with default settings on a fresh data directory.
    ///
    /// # Panics
    /// When the controller cannot start (a test helper: the test cannot go on).
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, |_| {}).await
    }

    /// Like [`TestController::start`], with the configuration adjusted by `configure`.
    pub async fn start_with(
        label: &str,
        configure: impl FnOnce(&mut crate::server::ControllerConfig),
    ) -> Self {
        let dir = TempDataDir::new(label);
        let mut config = crate::server::ControllerConfig::new(dir.path());
        configure(&mut config);
        let controller = match crate::server::LocalController::start(config.clone()).await {
            Ok(controller) => controller,
            Err(error) => panic!("starting a test controller: {error}"),
        };
        Self { config, controller: Some(controller), dir }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The base URL of the running controller.
    ///
    /// # Panics
    /// When the controller is stopped.
    pub fn url(&self) -> String {
        match &self.controller {
            Some(controller) => controller.url(),
            None => panic!("the test controller is stopped"),
        }
    }

    /// A REST client of the running controller, authenticated as the cluster admin.
    ///
    /// # Panics
    /// When the controller is stopped.
    pub fn client(&self) -> crate::client::ApiClient {
        self.client_with(&self.admin_credentials())
    }

    /// A REST client of the running controller with `credentials` (see
    /// [`TestController::issue_credentials`], [`ClientCredentials::anonymous`]).
    ///
    /// # Panics
    /// When the controller is stopped or the credentials are unusable.
    pub fn client_with(&self, credentials: &ClientCredentials) -> crate::client::ApiClient {
        match crate::client::ApiClient::new(&self.url(), credentials) {
            Ok(client) => client,
            Err(error) => panic!("creating a client: {error}"),
        }
    }

    /// The cluster's admin credential (from its PKI directory, so also while stopped).
    ///
    /// # Panics
    /// When the PKI cannot be read.
    pub fn admin_credentials(&self) -> ClientCredentials {
        match crate::auth::pki::read_admin_credentials(&self.config.pki_dir) {
            Ok(credentials) => credentials,
            Err(error) => panic!("reading the admin credential: {error}"),
        }
    }

    /// A new client certificate of the cluster CA for `user` in `group`.
    ///
    /// # Panics
    /// When the PKI cannot be read or the certificate not issued.
    pub fn issue_credentials(&self, user: &str, group: Option<&str>) -> ClientCredentials {
        let issued = crate::auth::ClusterPki::open(&self.config.pki_dir)
            .and_then(|pki| pki.issue_client(user, group));
        match issued {
            Ok(credentials) => credentials,
            Err(error) => panic!("issuing credentials for {user}: {error}"),
        }
    }

    /// The identity of the agent of `node` (`system:node:<node>` in `system:nodes`).
    pub fn node_credentials(&self, node: &str) -> ClientCredentials {
        self.issue_credentials(
            &format!("{}{node}", crate::auth::NODE_USER_PREFIX),
            Some(crate::auth::NODES_GROUP),
        )
    }

    /// Writes a kubeconfig that points kubectl at this controller with the admin credential
    /// (the cluster CA and the admin client certificate embedded), `default` as its
    /// namespace. Tests build every kubeconfig through here or
    /// [`TestController::write_kubeconfig_with`], so that how clients reach and authenticate
    /// to the API changes in one place.
    ///
    /// # Panics
    /// When the file cannot be written or the controller is stopped.
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_with(path, &self.admin_credentials());
    }

    /// [`TestController::write_kubeconfig`] with other `credentials` (a node's, another
    /// user's, or anonymous ones).
    ///
    /// # Panics
    /// When the file cannot be written or the controller is stopped.
    pub fn write_kubeconfig_with(&self, path: &Path, credentials: &ClientCredentials) {
        let written =
            crate::auth::kubeconfig::write_kubeconfig(path, "strait", &self.url(), credentials);
        if let Err(error) = written {
            panic!("writing the kubeconfig {}: {error}", path.display());
        }
    }

    /// Stops the controller (closing its store) and starts a new one on the same data
    /// directory, on a new port.
    ///
    /// # Panics
    /// When stopping or starting fails.
    pub async fn restart(&mut self) {
        self.stop().await;
        match crate::server::LocalController::start(self.config.clone()).await {
            Ok(controller) => self.controller = Some(controller),
            Err(error) => panic!("restarting the test controller: {error}"),
        }
    }

    /// Stops the controller and waits for its store to close.
    ///
    /// # Panics
    /// When the controller reports an error while stopping.
    pub async fn stop(&mut self) {
        if let Some(controller) = self.controller.take()
            && let Err(error) = controller.stop().await
        {
            panic!("stopping the test controller: {error}");
        }
    }
}

/// A kubeconfig without credentials for a test's own plain-HTTP relay at `server` (which
/// itself reaches the controller with a credential, as `tests/support/recorder.rs` does), with
/// `namespace` as the default namespace. The controller serves HTTPS only: kubeconfigs for it
/// come from [`TestController::write_kubeconfig`].
pub fn kubeconfig(server: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: relay
  cluster:
    server: {server}
contexts:
- name: relay
  context:
    cluster: relay
    user: relay
    namespace: {namespace}
current-context: relay
users:
- name: relay
  user: {{}}
"
    )
}

pub fn meta(name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() }
}

/// A pod with one container, not assigned to any node.
pub fn pod(name: &str) -> Pod {
    Pod {
        metadata: meta(name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("registry.example/app:1.0".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A pod created already assigned to `node` (the scheduler leaves it where it is).
pub fn pod_on(name: &str, node: &str) -> Pod {
    let mut pod = pod(name);
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.to_owned());
    }
    pod
}

/// A node as an agent registers it: an InternalIP, a Ready condition and system info.
pub fn node(name: &str, internal_ip: &str, ready: bool) -> Node {
    Node {
        metadata: meta(name),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_owned(),
                address: internal_ip.to_owned(),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_owned(),
                status: if ready { "True" } else { "False" }.to_owned(),
                ..NodeCondition::default()
            }]),
            node_info: Some(NodeSystemInfo {
                kubelet_version: format!("strait-{}", env!("CARGO_PKG_VERSION")),
                operating_system: "linux".to_owned(),
                os_image: "Debian GNU/Linux 12".to_owned(),
                kernel_version: "6.18.0".to_owned(),
                container_runtime_version: "strait://test".to_owned(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

pub fn namespace(name: &str) -> Namespace {
    Namespace { metadata: meta(name), ..Namespace::default() }
}

/// Polls `check` every 25 ms until it returns `Some`, for at most `seconds`.
///
/// # Panics
/// When the time is up; `what` says what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, seconds: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {seconds}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The etcd binary: `$STRAIT_ETCD`, else `etcd` on the `PATH`, else Debian's `/usr/bin/etcd`
/// (package `etcd-server`, which `scripts/setup.sh` installs).
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STRAIT_ETCD") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file());
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
}

/// A single-member etcd on 127.0.0.1 with free ports and its own temporary data directory,
/// for tests and benchmarks. Dropping it kills etcd (SIGKILL) and removes the directory, also
/// when a test panics; etcd also dies with the thread that started it (`PR_SET_PDEATHSIG`), so
/// a test process killed outright leaves no etcd behind either.
pub struct LocalEtcd {
    binary: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<std::process::Child>,
    // Declared last: removed after etcd is gone.
    dir: TempDataDir,
}

impl LocalEtcd {
    /// Starts etcd and waits until it answers (at most 20 s).
    pub async fn start(label: &str) -> std::io::Result<Self> {
        let binary = etcd_binary().ok_or_else(|| {
            std::io::Error::other(
                "no etcd binary: install Debian's etcd-server (scripts/setup.sh) or set STRAIT_ETCD",
            )
        })?;
        let mut last_error = None;
        // Free ports are found by binding port 0 and letting go; another process may take one
        // in between, so a failed start is tried again on new ports.
        for _ in 0..3 {
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let mut etcd = Self {
                binary: binary.clone(),
                client_port,
                peer_port,
                child: None,
                dir: TempDataDir::new(&format!("etcd-{label}")),
            };
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    /// Starts etcd with the same ports and data, after [`LocalEtcd::kill`].
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        self.kill();
        self.launch().await
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:<port><root>`, as `strait controller --store` takes it.
    pub fn url(&self, root: &str) -> String {
        format!("etcd://{}{root}", self.endpoint())
    }

    /// The store location of a cluster whose keys live under `root`.
    pub fn location(&self, root: &str) -> crate::store::StoreLocation {
        crate::store::StoreLocation::Etcd {
            endpoints: vec![self.endpoint()],
            root: Some(root.to_owned()),
        }
    }

    /// Connects a store whose keys live under `root`.
    pub async fn store(
        &self,
        root: &str,
    ) -> Result<crate::store::EtcdStore, crate::store::StoreError> {
        let options = crate::store::EtcdStoreOptions::new(vec![self.endpoint()], root);
        crate::store::EtcdStore::connect(options).await
    }

    /// etcd's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills etcd with SIGKILL (no chance to flush anything) and waits until it is gone.
    /// The data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn launch(&mut self) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut command = std::process::Command::new(&self.binary);
        command
            .arg("--name=strait")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=strait={peer}"))
            // Objects may be as large as the API accepts (3 MiB bodies), and namespace
            // cleanup may delete many keys in one transaction.
            .arg("--max-request-bytes=10485760")
            .arg("--max-txn-ops=4096")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches only the child being started.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(command.spawn()?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(std::io::Error::other(format!(
                    "etcd exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            let options = crate::store::EtcdStoreOptions {
                request_timeout: Duration::from_secs(1),
                ..crate::store::EtcdStoreOptions::new(vec![self.endpoint()], "/probe")
            };
            if crate::store::EtcdStore::connect(options).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.kill();
                return Err(std::io::Error::other("etcd did not answer within 20s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How a [`SimulatedAgent`] treats pods.
#[derive(Clone, Debug)]
pub struct AgentTiming {
    /// A bound pod turns Running and Ready this long after the agent first sees it.
    pub ready_after: Duration,
    /// A terminating pod is removed this long after the agent first sees it terminating.
    pub stop_after: Duration,
    /// Pods of these images never turn ready (a broken version).
    pub never_ready: Vec<String>,
}

impl Default for AgentTiming {
    fn default() -> Self {
        Self {
            ready_after: Duration::from_millis(150),
            stop_after: Duration::from_millis(200),
            never_ready: Vec::new(),
        }
    }
}

/// Plays the node agent of every node for control-plane tests without a lab: bound pods of
/// one namespace become Running and Ready, terminating ones are removed (grace 0 with their
/// uid, as an agent finishes a graceful delete). Records when each pod turned ready. Stops
/// when dropped.
pub struct SimulatedAgent {
    task: tokio::task::JoinHandle<()>,
    ready_at:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// The image of a pod's first container.
pub fn first_image(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

fn has_ready_condition(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl SimulatedAgent {
    pub fn start(client: crate::client::ApiClient, namespace: &str, timing: AgentTiming) -> Self {
        use std::{collections::HashMap, time::Instant};
        let ready_at = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
        let recorded = std::sync::Arc::clone(&ready_at);
        let namespace = namespace.to_owned();
        let task = tokio::spawn(async move {
            let namespace = Some(namespace.as_str());
            let mut first_seen: HashMap<String, Instant> = HashMap::new();
            let mut deleting_since: HashMap<String, Instant> = HashMap::new();
            let mut next_ip = 2u32;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                // A failed list is retried on the next round, as an agent's relist would be.
                let Ok((pods, _)) = client.list::<Pod>(namespace, "").await else { continue };
                for pod in pods {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                    if pod.metadata.deletion_timestamp.is_some() {
                        let since = *deleting_since.entry(uid.clone()).or_insert_with(Instant::now);
                        if since.elapsed() >= timing.stop_after {
                            // Gone already or replaced: either way nothing is left to stop.
                            let _ = client
                                .delete_with_uid::<Pod>(namespace, &name, Some(0), Some(&uid))
                                .await;
                        }
                        continue;
                    }
                    if !bound
                        || has_ready_condition(&pod)
                        || timing.never_ready.contains(&first_image(&pod))
                    {
                        continue;
                    }
                    let seen = *first_seen.entry(uid).or_insert_with(Instant::now);
                    if seen.elapsed() < timing.ready_after {
                        continue;
                    }
                    next_ip += 1;
                    let ip = format!("10.244.{}.{}", next_ip / 250, next_ip % 250 + 2);
                    let now = crate::api::typed::current_time();
                    let status = serde_json::json!({"status": {
                        "phase": "Running", "podIP": ip,
                        "conditions": [
                            {"type": "Ready", "status": "True", "lastTransitionTime": now}],
                    }});
                    if client.merge_patch::<Pod>(namespace, &name, &status, true).await.is_ok()
                        && let Ok(mut recorded) = recorded.lock()
                    {
                        recorded.insert(name, Instant::now());
                    }
                }
            }
        });
        Self { task, ready_at }
    }

    /// When a pod turned ready, as the agent saw it.
    pub fn ready_at(&self, pod: &str) -> Option<std::time::Instant> {
        self.ready_at.lock().ok()?.get(pod).copied()
    }
}

impl Drop for SimulatedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
