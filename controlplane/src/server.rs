//! The controller process: the store, the API server and NodeSync on the same HTTPS listeners
//! (HTTP/1.1 or HTTP/2 for kubectl, HTTP/2 for agents' gRPC, chosen by ALPN), the scheduler and
//! the controllers, all stopped together on shutdown.
//!
//! On etcd, several replicas may run against one cluster: each serves the API and NodeSync
//! from etcd, and only the elected leader runs the scheduler and the controllers
//! ([`crate::leader`]). Replicas share the cluster's PKI directory, so that any of them
//! accepts any client ([`crate::auth::pki`]).

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net};
use tokio::{sync::watch, task::JoinSet};

use crate::{
    api::{
        Registry, RegistryOptions,
        error::ApiError,
        http::{ApiState, router},
        pod_exec,
        pod_log::{self, NodeLogClient},
    },
    auth::{self, ClientCredentials, ClusterPki, PkiError},
    controllers::{
        self,
        endpoint_slice::EndpointSliceController,
        horizontal_pod_autoscaler::{AutoscalerConfig, HorizontalPodAutoscalerController},
        namespace::NamespaceController,
        node_ipam::PodCidrReconciler,
        node_lifecycle::{NodeLifecycleConfig, NodeLifecycleController},
    },
    ipam::{IpamError, PodCidrAllocator, ServiceIpAllocator, ServiceIpError},
    leader::{self, LeaderElection},
    nodesync::NodeSyncService,
    nodesync_proto::node_sync_server::SERVICE_NAME,
    scheduler::Scheduler,
    store::{
        EtcdStore, EtcdStoreOptions, RedbStore, RedbStoreOptions, SharedStore, StoreClosed,
        StoreError, StoreLocation,
    },
};

/// The file of the embedded store inside the data directory.
pub const STORE_FILE: &str = "strait.redb";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where the store file lives (created if missing).
    pub data_dir: PathBuf,
    /// The range pod CIDRs are cut from.
    pub cluster_cidr: IpNet,
    /// The prefix length of each node's pod CIDR.
    pub node_cidr_prefix: u8,
    /// The range cluster IPs (service VIPs) are given from.
    pub service_cidr: Ipv4Net,
    /// The cluster IP of `kube-system/kube-dns`, where node agents answer DNS.
    pub cluster_dns_ip: Ipv4Addr,
    /// How many revisions of change history the store keeps for watch resume.
    pub history_revisions: u64,
    /// How often a watch that allows bookmarks receives one when nothing else happens.
    pub watch_bookmark_interval: Duration,
    /// How long shutdown waits for open connections before closing them.
    pub shutdown_grace: Duration,
    /// How long an event is kept after it last happened.
    pub event_ttl: Duration,
    /// When nodes are judged unreachable.
    pub node_lifecycle: NodeLifecycleConfig,
    /// How horizontal pod autoscalers scale.
    pub autoscaler: AutoscalerConfig,
    /// Admission defaults of the served kinds (pods' default tolerations).
    pub registry: RegistryOptions,
    /// Where the store lives: the embedded file in `data_dir` (default) or etcd.
    pub store: StoreLocation,
    /// On etcd: how long the leader's lease lasts unrenewed, which bounds how long the
    /// controllers of a replica that died stay unreplaced.
    pub leader_lease: Duration,
    /// On etcd: how this replica names itself in the leader record.
    pub replica_name: String,
    /// The cluster's PKI (its CA and admin credential), created on first start: by default
    /// `<data_dir>/pki`. Replicas of one control plane share it (see [`crate::auth::pki`]).
    pub pki_dir: PathBuf,
    /// Names (DNS names or IP addresses) the serving certificate covers beyond the listeners'
    /// own addresses, `localhost` and the host name: the addresses clients reach it at.
    pub tls_sans: Vec<String>,
    /// The network namespace (a file, `/run/netns/NAME`) from which the API server connects
    /// to nodes' log servers; `None`: its own (a lab's controller is outside the lab).
    pub node_netns: Option<PathBuf>,
}

impl ControllerConfig {
    /// The defaults: pod CIDRs are /24s of 10.244.0.0/16, cluster IPs from 10.96.0.0/16 with
    /// DNS at 10.96.0.10, 10,000 revisions of history.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            pki_dir: data_dir.join(auth::pki::PKI_DIR),
            tls_sans: Vec::new(),
            node_netns: None,
            data_dir,
            cluster_cidr: IpNet::V4(ipnet::Ipv4Net::new_assert(
                std::net::Ipv4Addr::new(10, 244, 0, 0),
                16,
            )),
            node_cidr_prefix: 24,
            service_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16),
            cluster_dns_ip: Ipv4Addr::new(10, 96, 0, 10),
            history_revisions: RedbStoreOptions::default().history_revisions,
            watch_bookmark_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            event_ttl: controllers::event_expiry::DEFAULT_EVENT_TTL,
            node_lifecycle: NodeLifecycleConfig::default(),
            autoscaler: AutoscalerConfig::default(),
            registry: RegistryOptions::default(),
            store: StoreLocation::Embedded,
            leader_lease: Duration::from_secs(3),
            replica_name: format!("controller-{}", std::process::id()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no listener to serve on")]
    NoListeners,
    #[error("creating the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the store")]
    Store(#[source] StoreError),
    #[error("preparing the cluster's credentials")]
    Pki(#[source] PkiError),
    #[error("{name:?} cannot be a name of the serving certificate: {message}")]
    ServingName { name: String, message: String },
    #[error("configuring pod CIDR allocation")]
    PodCidrs(#[source] IpamError),
    #[error("configuring cluster IP allocation")]
    ServiceIps(#[source] ServiceIpError),
    #[error("creating the system namespaces")]
    Bootstrap(#[source] ApiError),
    #[error("preparing the listener {address}")]
    Listener {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the controller stopped before it served")]
    StoppedEarly,
    #[error("the controller task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Runs the controller on `listeners` (already bound: the caller may bind some inside other
/// network namespaces) until `shutdown` resolves. Returns once everything has stopped and the
/// store file is closed.
pub async fn run(
    config: ControllerConfig,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    serve(config, listeners, shutdown, None).await
}

/// [`run`], telling `ready` once the store is open and the listeners are served.
async fn serve(
    config: ControllerConfig,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), ControllerError> {
    if listeners.is_empty() {
        return Err(ControllerError::NoListeners);
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| ControllerError::DataDir { path: config.data_dir.clone(), source })?;
    let pki = ClusterPki::init(&config.pki_dir).map_err(ControllerError::Pki)?;
    let names = serving_names(&listeners, &config.tls_sans)?;
    let serving = pki
        .serving_certificate(&config.data_dir.join(auth::pki::PKI_DIR), &names)
        .map_err(ControllerError::Pki)?;
    let tls = auth::tls::server_config(pki.ca_pem(), &serving).map_err(ControllerError::Pki)?;
    let node_logs = NodeLogClient {
        credentials: pki
            .issue_client(auth::NODE_LOG_READER_USER, None)
            .map_err(ControllerError::Pki)?,
        netns: config.node_netns.clone(),
    };
    drop(pki);
    let (store, closed, election) = open_store(&config).await?;
    let allocator = PodCidrAllocator::new(config.cluster_cidr, config.node_cidr_prefix)
        .map_err(ControllerError::PodCidrs)?;
    let cluster_ips = ServiceIpAllocator::new(config.service_cidr, config.cluster_dns_ip)
        .map_err(ControllerError::ServiceIps)?;
    let registry = Arc::new(Registry::with_options(
        Arc::clone(&store),
        Arc::new(allocator),
        Arc::new(cluster_ips),
        config.registry.clone(),
    ));
    registry.ensure_system_namespaces().await.map_err(ControllerError::Bootstrap)?;
    match registry.ensure_cluster_dns().await {
        Ok(()) => {}
        // The address was given to another service explicitly: the cluster still works,
        // without in-cluster DNS at the configured address.
        Err(error @ ApiError::Invalid { .. }) => {
            tracing::warn!(%error, "cannot create the cluster DNS service");
        }
        Err(error) => return Err(ControllerError::Bootstrap(error)),
    }

    let (stop, stopped) = watch::channel(false);
    let mut background = JoinSet::new();
    let leading = Arc::clone(&registry);
    let (history_revisions, event_ttl) = (config.history_revisions, config.event_ttl);
    let (node_lifecycle, autoscaler) = (config.node_lifecycle, config.autoscaler);
    // The embedded store bounds its own history; etcd keeps all until it is compacted.
    let compacts = election.is_some();
    background.spawn(leader::run_while_leading(election, stopped.clone(), move |term| {
        let mut tasks =
            spawn_controllers(&leading, event_ttl, node_lifecycle, autoscaler, term.clone());
        if compacts {
            let store = Arc::clone(leading.store());
            tasks.spawn(crate::store::etcd::bound_history(store, history_revisions, term));
        }
        tasks
    }));

    let grpc = NodeSyncService::new(Arc::clone(&store), stopped.clone()).into_server();
    let app = router(ApiState {
        registry: Arc::clone(&registry),
        shutdown: stopped.clone(),
        bookmark_interval: config.watch_bookmark_interval,
    })
    .merge(pod_exec::router(Arc::clone(&registry), node_logs.clone()))
    .merge(pod_log::router(Arc::clone(&registry), node_logs))
    .route_service(&format!("/{SERVICE_NAME}/{{*method}}"), grpc)
    .layer(axum::middleware::from_fn_with_state(Arc::clone(&registry), auth::authz::guard));
    drop(registry);
    drop(store);

    let mut servers = JoinSet::new();
    for listener in listeners {
        let address = listener.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
        let prepare = |source| ControllerError::Listener { address: address.clone(), source };
        listener.set_nonblocking(true).map_err(prepare)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(prepare)?;
        let app = app.clone();
        let stopped = stopped.clone();
        let tls = Arc::clone(&tls);
        servers.spawn(async move {
            tracing::info!(%address, "serving the API and NodeSync over HTTPS");
            auth::https::serve(listener, tls, app, stopped).await;
            Ok(())
        });
    }
    drop(app);
    if let Some(ready) = ready {
        let _ = ready.send(());
    }

    let mut result = Ok(());
    tokio::select! {
        () = shutdown => {}
        Some(ended) = servers.join_next() => {
            result = flatten(ended);
        }
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(ended) = servers.join_next().await {
            if let (Ok(()), Err(error)) = (&result, flatten(ended)) {
                result = Err(error);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
        servers.abort_all();
    }
    while background.join_next().await.is_some() {}
    // Streams, connections and blocking reads still running hold the store; the file is
    // closed when the last of them is gone, and only then may it be opened again.
    if let Some(closed) = closed
        && tokio::time::timeout(config.shutdown_grace, closed.wait()).await.is_err()
    {
        tracing::warn!("the store is still in use after the shutdown grace period");
    }
    result
}

/// Opens the configured store; on etcd, also this replica's candidacy for leadership.
async fn open_store(
    config: &ControllerConfig,
) -> Result<(SharedStore, Option<StoreClosed>, Option<LeaderElection>), ControllerError> {
    match &config.store {
        StoreLocation::Embedded => {
            let options = RedbStoreOptions {
                history_revisions: config.history_revisions,
                ..RedbStoreOptions::default()
            };
            let store = RedbStore::open_async(config.data_dir.join(STORE_FILE), options)
                .await
                .map_err(ControllerError::Store)?;
            let closed = store.closed();
            Ok((Arc::new(store), Some(closed), None))
        }
        StoreLocation::Etcd { endpoints, root } => {
            let root = root.clone().unwrap_or_else(|| EtcdStoreOptions::default_root("default"));
            let options = EtcdStoreOptions::new(endpoints.clone(), root);
            let store = EtcdStore::connect(options).await.map_err(ControllerError::Store)?;
            let election = LeaderElection::new(&store, &config.replica_name, config.leader_lease);
            Ok((Arc::new(store), None, Some(election)))
        }
    }
}

/// The scheduler and the controllers, stopped by `stopped`.
fn spawn_controllers(
    registry: &Arc<Registry>,
    event_ttl: Duration,
    node_lifecycle: NodeLifecycleConfig,
    autoscaler: AutoscalerConfig,
    stopped: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    tasks.spawn(controllers::run(Scheduler::new(Arc::clone(registry)), stopped.clone()));
    tasks.spawn(controllers::run(NamespaceController::new(Arc::clone(registry)), stopped.clone()));
    tasks.spawn(controllers::run(PodCidrReconciler::new(Arc::clone(registry)), stopped.clone()));
    tasks.spawn(controllers::run(
        EndpointSliceController::new(Arc::clone(registry)),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        controllers::replica_set::ReplicaSetController::new(Arc::clone(registry)),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        controllers::garbage_collector::GarbageCollector::new(Arc::clone(registry)),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        controllers::deployment::DeploymentController::new(Arc::clone(registry)),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        controllers::event_expiry::EventExpiry::new(Arc::clone(&registry.events), event_ttl),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        NodeLifecycleController::new(Arc::clone(registry), node_lifecycle),
        stopped.clone(),
    ));
    tasks.spawn(controllers::run(
        HorizontalPodAutoscalerController::new(Arc::clone(registry), autoscaler),
        stopped,
    ));
    tasks
}

/// What the serving certificate must cover: every address a listener is bound to (all
/// addresses of an unspecified one cannot be known, hence `tls_sans`), loopback by name and
/// number, the host name, and `extra`.
fn serving_names(
    listeners: &[TcpListener],
    extra: &[String],
) -> Result<Vec<String>, ControllerError> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    for listener in listeners {
        if let Ok(address) = listener.local_addr()
            && !address.ip().is_unspecified()
        {
            names.push(address.ip().to_string());
        }
    }
    // A host name that is no valid DNS name (an underscore, say) is left out, not an error.
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && rustls::pki_types::ServerName::try_from(host).is_ok() {
            names.push(host.to_owned());
        }
    }
    for name in extra {
        if let Err(error) = rustls::pki_types::ServerName::try_from(name.as_str()) {
            return Err(ControllerError::ServingName {
                name: name.clone(),
                message: error.to_string(),
            });
        }
        names.push(name.clone());
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|name| seen.insert(name.clone()));
    Ok(names)
}

fn flatten(
    ended: Result<Result<(), ControllerError>, tokio::task::JoinError>,
) -> Result<(), ControllerError> {
    ended.map_err(ControllerError::Task).and_then(|served| served)
}

/// A controller serving on `127.0.0.1:<ephemeral port>` in this process, for tests and for
/// tools that embed one.
pub struct LocalController {
    address: SocketAddr,
    admin: ClientCredentials,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
}

impl LocalController {
    /// Binds a loopback listener, starts the controller on it as a task of the current Tokio
    /// runtime, and returns once it serves (or with the error that stopped it).
    pub async fn start(config: ControllerConfig) -> Result<Self, ControllerError> {
        let listener_error =
            |source| ControllerError::Listener { address: "127.0.0.1:0".to_owned(), source };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(listener_error)?;
        let address = listener.local_addr().map_err(listener_error)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, serving) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let pki_dir = config.pki_dir.clone();
        let mut task = tokio::spawn(serve(config, vec![listener], shutdown, Some(ready)));
        tokio::select! {
            started = serving => {
                if started.is_ok() {
                    let admin = auth::pki::read_admin_credentials(&pki_dir)
                        .map_err(ControllerError::Pki)?;
                    return Ok(Self { address, admin, stop: Some(stop), task });
                }
                // The sender was dropped: the controller failed before serving.
                (&mut task).await.map_err(ControllerError::Task)??;
                Err(ControllerError::StoppedEarly)
            }
            ended = &mut task => {
                ended.map_err(ControllerError::Task)??;
                Err(ControllerError::StoppedEarly)
            }
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL, e.g. `https://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// The cluster's admin credential.
    pub fn admin_credentials(&self) -> &ClientCredentials {
        &self.admin
    }

    /// An API client with the admin credential.
    pub fn client(&self) -> Result<crate::client::ApiClient, crate::client::ClientError> {
        crate::client::ApiClient::new(&self.url(), &self.admin)
    }

    /// Stops the controller and waits until its store is closed.
    pub async fn stop(mut self) -> Result<(), ControllerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(ControllerError::Task)?
    }
}

impl Drop for LocalController {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
