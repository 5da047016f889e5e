//! Services on this node: turns the services and endpoints the controller streams into the
//! frontends of the eBPF load balancer, and keeps them there.
//!
//! A dedicated thread owns the maps. The NodeSync follower hands it each change (a whole
//! service at a time); the thread rewrites only the frontends of the services that changed, and
//! on a snapshot also removes every frontend nobody wants any more (which is how a restarted
//! agent sheds what it adopted from the pins but no longer exists).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use strait_controlplane::nodesync_proto::ServiceState;

use crate::ebpf::lb::{Backend, FrontendKey, L4Protocol, ServiceFrontend, ServiceLb};

/// What the planner needs to know about the node it runs on.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub name: String,
    /// The cluster DNS VIP; its frontends always point at this node's own DNS server.
    pub cluster_dns: Option<Ipv4Addr>,
    /// Where this node's DNS server listens (node-local DNS).
    pub dns_server: Option<SocketAddrV4>,
}

/// One batch of service changes, as the follower saw it.
#[derive(Debug, Default)]
pub struct ServiceUpdate {
    /// True: `upserted` is every service there is; anything else programmed goes.
    pub snapshot: bool,
    pub upserted: Vec<Arc<ServiceState>>,
    pub removed: Vec<String>,
}

fn protocol(name: &str) -> Option<L4Protocol> {
    match name {
        "TCP" => Some(L4Protocol::Tcp),
        "UDP" => Some(L4Protocol::Udp),
        _ => None,
    }
}

/// The frontends one service needs on this node: one per service port, each with the backends
/// a new connection may go to.
///
/// Backends follow Kubernetes' rules: ready endpoints; when none is ready, the endpoints that
/// are terminating but still serving (so a rollout of the last pod drains instead of
/// refusing); with `internalTrafficPolicy: Local`, only endpoints on this node. An endpoint
/// that has no target port for a service port (a named port its pod lacks) is no backend of it.
pub fn plan_frontends(service: &ServiceState, node: &LocalNode) -> Vec<ServiceFrontend> {
    let Ok(vip) = service.cluster_ip.parse::<Ipv4Addr>() else {
        return Vec::new(); // headless (or unparseable): DNS only, no frontend
    };
    let affinity_timeout = (service.affinity_timeout_seconds > 0)
        .then(|| Duration::from_secs(u64::from(service.affinity_timeout_seconds)));
    let node_local_dns = (node.cluster_dns == Some(vip)).then_some(node.dns_server).flatten();
    let mut frontends = Vec::new();
    for port in &service.ports {
        let (Some(l4), Ok(port_number)) = (protocol(&port.protocol), u16::try_from(port.port))
        else {
            tracing::warn!(service = %format!("{}/{}", service.namespace, service.name), protocol = %port.protocol, port = port.port, "service port not supported by the datapath; skipped");
            continue;
        };
        let key = FrontendKey { vip, port: port_number, protocol: l4 };
        if let Some(dns) = node_local_dns {
            let backend = Backend { address: dns, terminating: false };
            frontends.push(ServiceFrontend { key, backends: vec![backend], affinity_timeout });
            continue;
        }
        let candidates = service.endpoints.iter().filter_map(|endpoint| {
            if service.internal_traffic_local && endpoint.node_name != node.name {
                return None;
            }
            let address = endpoint.address.parse::<Ipv4Addr>().ok()?;
            let target = endpoint
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
                .and_then(|p| u16::try_from(p.port).ok())?;
            Some((endpoint, SocketAddrV4::new(address, target)))
        });
        let mut backends: Vec<Backend> = candidates
            .clone()
            .filter(|(endpoint, _)| endpoint.ready)
            .map(|(_, address)| Backend { address, terminating: false })
            .collect();
        if backends.is_empty() {
            backends = candidates
                .filter(|(endpoint, _)| endpoint.serving && endpoint.terminating)
                .map(|(_, address)| Backend { address, terminating: true })
                .collect();
        }
        backends.sort_by_key(|b| (*b.address.ip(), b.address.port()));
        backends.dedup_by_key(|b| b.address);
        frontends.push(ServiceFrontend { key, backends, affinity_timeout });
    }
    frontends
}

/// What happened to the maps in one batch, for metrics and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProgrammingReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub errors: usize,
    /// Controller observation → map written, per service written.
    pub latencies: Vec<Duration>,
}

/// One service of a batch being applied: its key, the frontends it wants, those it had.
struct PlannedService<'a> {
    service: &'a Arc<ServiceState>,
    key: String,
    wanted: Vec<ServiceFrontend>,
    old: Vec<FrontendKey>,
}

/// The load balancer's frontends as this agent last wrote them, by service.
pub struct ServicePrograms {
    lb: ServiceLb,
    node: LocalNode,
    /// The frontend keys written per service key; their backends are in the writer's index
    /// (held once: 100,000 services must fit in the agent's memory budget).
    written: HashMap<String, Vec<FrontendKey>>,
}

impl ServicePrograms {
    /// Services planned and written together in one batched write.
    const WRITE_CHUNK: usize = 4096;

    pub fn new(lb: ServiceLb, node: LocalNode) -> Self {
        Self { lb, node, written: HashMap::new() }
    }

    pub fn lb(&self) -> &ServiceLb {
        &self.lb
    }

    /// Frontends and backends currently programmed.
    pub fn programmed(&self) -> (usize, usize) {
        self.lb.programmed()
    }

    /// Applies one batch. Errors are logged and counted; the service is retried on its next
    /// change or on the next snapshot.
    ///
    /// The whole batch goes to the maps in one batched write (a few system calls however many
    /// services it holds: a snapshot of 100,000 services included): the removed services'
    /// frontends first, then every frontend that changed, then those the services no longer
    /// have. If the batched write fails, the services are written again one by one, so that one
    /// bad service costs only itself.
    pub fn apply(&mut self, update: &ServiceUpdate) -> ProgrammingReport {
        let mut report = ProgrammingReport::default();
        let mut gone: Vec<FrontendKey> = Vec::new();
        for key in &update.removed {
            if let Some(old) = self.written.remove(key) {
                gone.extend(old);
            }
        }
        if update.snapshot && !self.written.is_empty() {
            // A snapshot is every service there is: one written before and absent now is gone
            // (whether or not the batch names it among the removed).
            let present: std::collections::HashSet<(&str, &str)> = update
                .upserted
                .iter()
                .map(|service| (service.namespace.as_str(), service.name.as_str()))
                .collect();
            self.written.retain(|key, frontends| {
                let keep = key.split_once('/').is_some_and(|name| present.contains(&name));
                if !keep {
                    gone.append(frontends);
                }
                keep
            });
        }
        self.remove(&gone, &mut report);

        // In chunks, so that what planning holds at once stays small however large the batch
        // (a snapshot of 100,000 services is a few dozen batched writes).
        let mut wanted_keys: Vec<FrontendKey> = Vec::new();
        let mut stale = Vec::new();
        for chunk in update.upserted.chunks(Self::WRITE_CHUNK) {
            let planned: Vec<PlannedService> = chunk
                .iter()
                .map(|service| {
                    let key = format!("{}/{}", service.namespace, service.name);
                    let wanted = plan_frontends(service, &self.node);
                    let old = self.written.remove(&key).unwrap_or_default();
                    PlannedService { service, key, wanted, old }
                })
                .collect();
            let changed: Vec<&ServiceFrontend> = planned
                .iter()
                .flat_map(|p| p.wanted.iter().filter(|w| !self.lb.is_programmed(w)))
                .collect();
            let written = changed.len();
            let failed_services = match self.lb.upsert_frontends(changed) {
                Ok(()) => {
                    report.frontends_written += written;
                    std::collections::HashSet::new()
                }
                Err(error) => {
                    tracing::warn!(frontends = written, error = %format!("{:#}", anyhow::Error::new(error)), "batched service write failed; writing the services one by one");
                    self.write_one_by_one(&planned, &mut report)
                }
            };
            for PlannedService { service, key, wanted, old } in planned {
                wanted_keys.extend(wanted.iter().map(|w| w.key));
                stale.extend(old.into_iter().filter(|o| !wanted.iter().any(|w| w.key == *o)));
                if failed_services.contains(&key) {
                    continue;
                }
                if let Some(latency) = since_unix_nanos(service.observed_unix_nanos) {
                    report.latencies.push(latency);
                }
                if !wanted.is_empty() {
                    self.written.insert(key, wanted.into_iter().map(|w| w.key).collect());
                }
            }
        }
        // A frontend a service no longer has, unless a service of the batch has it now.
        if !stale.is_empty() {
            let wanted_keys: std::collections::HashSet<FrontendKey> =
                wanted_keys.into_iter().collect();
            stale.retain(|key| !wanted_keys.contains(key));
            self.remove(&stale, &mut report);
        }
        // Every written key is in the writer's index; when the index holds nothing more,
        // nothing is left to shed.
        if update.snapshot
            && self.lb.frontends().count() != self.written.values().map(Vec::len).sum::<usize>()
        {
            // Whatever the maps hold beyond what the snapshot wants (adopted from a previous
            // run, or left by a failed write) goes now.
            let wanted: std::collections::HashSet<FrontendKey> =
                self.written.values().flatten().copied().collect();
            let stale: Vec<FrontendKey> =
                self.lb.frontends().filter(|key| !wanted.contains(key)).copied().collect();
            self.remove(&stale, &mut report);
        }
        report
    }

    /// The fallback of a failed batched write: each service's changed frontends on their own;
    /// returns the keys of the services that failed.
    fn write_one_by_one(
        &mut self,
        planned: &[PlannedService],
        report: &mut ProgrammingReport,
    ) -> std::collections::HashSet<String> {
        let mut failed = std::collections::HashSet::new();
        for PlannedService { key, wanted, .. } in planned {
            for frontend in wanted {
                if self.lb.is_programmed(frontend) {
                    continue;
                }
                match self.lb.upsert_frontend(frontend) {
                    Ok(()) => report.frontends_written += 1,
                    Err(error) => {
                        failed.insert(key.clone());
                        report.errors += 1;
                        tracing::error!(service = %key, frontend = ?frontend.key, error = %format!("{:#}", anyhow::Error::new(error)), "cannot program a service frontend");
                    }
                }
            }
        }
        failed
    }

    fn remove(&mut self, keys: &[FrontendKey], report: &mut ProgrammingReport) {
        if keys.is_empty() {
            return;
        }
        match self.lb.remove_frontends(keys) {
            Ok(()) => report.frontends_removed += keys.len(),
            Err(error) => {
                report.errors += 1;
                tracing::error!(frontends = keys.len(), error = %format!("{:#}", anyhow::Error::new(error)), "cannot remove service frontends");
            }
        }
    }
}

fn since_unix_nanos(observed: u64) -> Option<Duration> {
    if observed == 0 {
        return None;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    now.checked_sub(Duration::from_nanos(observed))
}

/// The programming thread: applies batches until every sender is gone. After each batch,
/// `after_batch` sees the report, the batch, every service known, and the programs (for DNS
/// and metrics).
pub fn run_programmer(
    programs: &std::sync::Mutex<ServicePrograms>,
    receiver: mpsc::Receiver<ServiceUpdate>,
    mut after_batch: impl FnMut(
        &ProgrammingReport,
        &ServiceUpdate,
        &HashMap<String, Arc<ServiceState>>,
        &ServicePrograms,
    ),
) {
    let mut services: HashMap<String, Arc<ServiceState>> = HashMap::new();
    while let Ok(first) = receiver.recv() {
        let batch = coalesce(first, &receiver);
        if batch.snapshot {
            services.clear();
        }
        for key in &batch.removed {
            services.remove(key);
        }
        for service in &batch.upserted {
            services.insert(format!("{}/{}", service.namespace, service.name), service.clone());
        }
        let Ok(mut programs) = programs.lock() else {
            tracing::error!(
                "the service programs lock is poisoned; services are no longer programmed"
            );
            return;
        };
        let report = programs.apply(&batch);
        if report.frontends_written + report.frontends_removed > 0 || report.errors > 0 {
            tracing::debug!(
                written = report.frontends_written,
                removed = report.frontends_removed,
                errors = report.errors,
                "service frontends programmed"
            );
        }
        after_batch(&report, &batch, &services, &programs);
    }
}

/// Brings the cluster DNS zone to a batch of changes: a snapshot fills it anew with every
/// service (`all`), anything else changes only the batch's services.
pub fn update_zone(
    zone: &mut crate::dns::DnsZone,
    batch: &ServiceUpdate,
    all: &HashMap<String, Arc<ServiceState>>,
) {
    if batch.snapshot {
        zone.clear();
        for service in all.values() {
            zone.upsert_service(&dns_service(service));
        }
        return;
    }
    for key in &batch.removed {
        if let Some((namespace, name)) = key.split_once('/') {
            zone.remove_service(namespace, name);
        }
    }
    for service in &batch.upserted {
        zone.upsert_service(&dns_service(service));
    }
}

/// What the cluster DNS serves for a service: its ClusterIP, or for a headless service the
/// addresses of its ready endpoints.
pub fn dns_service(service: &ServiceState) -> crate::dns::DnsService {
    let mut endpoints: Vec<Ipv4Addr> = service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| e.address.parse().ok())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    crate::dns::DnsService {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        cluster_ip: service.cluster_ip.parse().ok(),
        endpoints,
        ports: service
            .ports
            .iter()
            .filter_map(|p| {
                Some(crate::dns::DnsPort {
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect(),
    }
}

/// Drains every update already queued into one batch, so a burst costs one pass. A lone
/// update is the batch as it is.
pub fn coalesce(first: ServiceUpdate, receiver: &mpsc::Receiver<ServiceUpdate>) -> ServiceUpdate {
    let Ok(second) = receiver.try_recv() else { return first };
    let mut services: BTreeMap<String, Option<Arc<ServiceState>>> = BTreeMap::new();
    let mut snapshot = false;
    let mut add = |update: ServiceUpdate, services: &mut BTreeMap<_, _>| {
        if update.snapshot {
            snapshot = true;
            services.clear();
        }
        for key in update.removed {
            services.insert(key, None);
        }
        for service in update.upserted {
            services.insert(format!("{}/{}", service.namespace, service.name), Some(service));
        }
    };
    add(first, &mut services);
    add(second, &mut services);
    while let Ok(next) = receiver.try_recv() {
        add(next, &mut services);
    }
    let mut batch = ServiceUpdate { snapshot, ..Default::default() };
    for (key, service) in services {
        match service {
            Some(service) => batch.upserted.push(service),
            None if !snapshot => batch.removed.push(key),
            None => {}
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use strait_controlplane::nodesync_proto::{Endpoint, EndpointPort, ServicePort};

    use super::*;

    fn endpoint(address: &str, node: &str, ready: bool, terminating: bool) -> Endpoint {
        Endpoint {
            address: address.into(),
            node_name: node.into(),
            ready,
            serving: ready || terminating,
            terminating,
            ports: vec![
                EndpointPort { name: "http".into(), protocol: "TCP".into(), port: 8080 },
                EndpointPort { name: "dns".into(), protocol: "UDP".into(), port: 5353 },
            ],
        }
    }

    #[test]
    fn the_dns_zone_follows_snapshots_and_single_changes() {
        let mut zone = crate::dns::DnsZone::new("cluster.local", []).unwrap();
        let web = Arc::new(service(Vec::new()));
        let all = HashMap::from([("default/web".to_owned(), Arc::clone(&web))]);
        let snapshot = ServiceUpdate { snapshot: true, upserted: vec![web], removed: vec![] };
        update_zone(&mut zone, &snapshot, &all);
        // The apex, svc, default.svc, the service, and _tcp/_http._tcp, _udp/_dns._udp below it.
        assert_eq!(zone.name_count(), 8);
        let removal = ServiceUpdate { removed: vec!["default/web".into()], ..Default::default() };
        update_zone(&mut zone, &removal, &HashMap::new());
        assert_eq!(zone.name_count(), 1, "the apex alone");
        // A snapshot replaces whatever was there.
        zone.upsert_service(&crate::dns::DnsService {
            namespace: "old".into(),
            name: "gone".into(),
            ..Default::default()
        });
        update_zone(&mut zone, &snapshot, &all);
        assert_eq!(zone.name_count(), 8);
    }

    fn service(endpoints: Vec<Endpoint>) -> ServiceState {
        ServiceState {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: "10.96.0.20".into(),
            ports: vec![
                ServicePort { name: "http".into(), protocol: "TCP".into(), port: 80 },
                ServicePort { name: "dns".into(), protocol: "UDP".into(), port: 53 },
            ],
            endpoints,
            ..Default::default()
        }
    }

    fn node() -> LocalNode {
        LocalNode { name: "n1".into(), cluster_dns: None, dns_server: None }
    }

    fn backends(frontend: &ServiceFrontend) -> Vec<(String, bool)> {
        frontend.backends.iter().map(|b| (b.address.to_string(), b.terminating)).collect()
    }

    #[test]
    fn each_service_port_becomes_a_frontend_with_its_own_target_port() {
        let plan =
            plan_frontends(&service(vec![endpoint("10.244.0.5", "n1", true, false)]), &node());
        assert_eq!(plan.len(), 2);
        assert_eq!(
            plan[0].key,
            FrontendKey { vip: [10, 96, 0, 20].into(), port: 80, protocol: L4Protocol::Tcp }
        );
        assert_eq!(backends(&plan[0]), [("10.244.0.5:8080".to_owned(), false)]);
        assert_eq!(plan[1].key.protocol, L4Protocol::Udp);
        assert_eq!(backends(&plan[1]), [("10.244.0.5:5353".to_owned(), false)]);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
        let both = service(vec![
            endpoint("10.244.0.5", "n1", true, false),
            endpoint("10.244.0.6", "n1", false, true),
        ]);
        assert_eq!(
            backends(&plan_frontends(&both, &node())[0]),
            [("10.244.0.5:8080".to_owned(), false)]
        );
        let draining = service(vec![endpoint("10.244.0.6", "n1", false, true)]);
        assert_eq!(
            backends(&plan_frontends(&draining, &node())[0]),
            [("10.244.0.6:8080".to_owned(), true)]
        );
        let unready = service(vec![endpoint("10.244.0.7", "n1", false, false)]);
        assert!(plan_frontends(&unready, &node())[0].backends.is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
        let mut local = service(vec![
            endpoint("10.244.0.5", "n1", true, false),
            endpoint("10.244.1.5", "n2", true, false),
        ]);
        local.internal_traffic_local = true;
        assert_eq!(
            backends(&plan_frontends(&local, &node())[0]),
            [("10.244.0.5:8080".to_owned(), false)]
        );
    }

    #[test]
    fn an_endpoint_without_the_named_port_is_no_backend_of_it() {
        let mut partial = endpoint("10.244.0.8", "n1", true, false);
        partial.ports.retain(|p| p.name == "http");
        let plan = plan_frontends(&service(vec![partial]), &node());
        assert_eq!(plan[0].backends.len(), 1);
        assert!(plan[1].backends.is_empty());
    }

    #[test]
    fn headless_services_get_no_frontend_and_affinity_carries_its_timeout() {
        let mut headless = service(vec![endpoint("10.244.0.5", "n1", true, false)]);
        headless.cluster_ip = String::new();
        assert!(plan_frontends(&headless, &node()).is_empty());
        let mut sticky = service(vec![]);
        sticky.affinity_timeout_seconds = 30;
        assert_eq!(
            plan_frontends(&sticky, &node())[0].affinity_timeout,
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn the_cluster_dns_vip_goes_to_this_nodes_dns_server() {
        let mut dns = service(vec![]);
        dns.cluster_ip = "10.96.0.10".into();
        let local = LocalNode {
            cluster_dns: Some([10, 96, 0, 10].into()),
            dns_server: Some("172.20.0.11:53".parse().unwrap()),
            ..node()
        };
        let plan = plan_frontends(&dns, &local);
        assert!(plan.iter().all(|f| backends(f) == [("172.20.0.11:53".to_owned(), false)]));
    }

    #[test]
    fn coalescing_keeps_the_last_word_per_service() {
        let (sender, receiver) = mpsc::channel();
        let web = Arc::new(service(vec![]));
        sender
            .send(ServiceUpdate { removed: vec!["default/web".into()], ..Default::default() })
            .unwrap();
        sender.send(ServiceUpdate { upserted: vec![web.clone()], ..Default::default() }).unwrap();
        let first = ServiceUpdate { removed: vec!["default/old".into()], ..Default::default() };
        let batch = coalesce(first, &receiver);
        assert!(!batch.snapshot);
        assert_eq!(batch.removed, ["default/old"]);
        assert_eq!(batch.upserted.len(), 1);
    }
}
