//! Helpers for tests of this crate and of the crates that drive a controller (node agent, lab):
//! a temporary data directory removed on drop, a controller served on loopback, objects as
//! agents and users write them, and a polling wait.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

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

    /// A REST client of the running controller.
    ///
    /// # Panics
    /// When the controller is stopped.
    pub fn client(&self) -> crate::client::ApiClient {
        match crate::client::ApiClient::new(&self.url()) {
            Ok(client) => client,
            Err(error) => panic!("creating a client: {error}"),
        }
    }

    /// Writes a kubeconfig that points kubectl at this controller, with `namespace` as the
    /// default namespace. Tests build every kubeconfig through here, so that how clients
    /// reach and authenticate to the API changes in one place.
    ///
    /// # Panics
    /// When the file cannot be written or the controller is stopped.
    pub fn write_kubeconfig(&self, path: &Path) {
        if let Err(error) = std::fs::write(path, kubeconfig(&self.url(), "default")) {
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

/// A kubeconfig for the API server at `server`, with `namespace` as the default namespace.
pub fn kubeconfig(server: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: strait
  cluster:
    server: {server}
contexts:
- name: strait
  context:
    cluster: strait
    user: tester
    namespace: {namespace}
current-context: strait
users:
- name: tester
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
