//! Cluster DNS: the names of services, answered by the node agent over UDP and TCP.
//!
//! The zone follows the Kubernetes DNS specification for services
//! (`<svc>.<ns>.svc.<cluster domain>`):
//!
//! - `A` of a service with a ClusterIP answers that address; `A` of a headless service answers
//!   every ready endpoint address, and nothing (NOERROR without records) when none is ready.
//! - `SRV _<port>._<proto>.<svc>.<ns>.svc.<domain>` answers the named port with the service
//!   name as its target (also for headless services: strait knows no per-pod hostnames), the
//!   target's addresses in the additional section.
//! - A name that exists but has no record of the asked type (`AAAA` of every service, `A` of a
//!   namespace) is NOERROR without records. A name inside the cluster domain that does not
//!   exist is NXDOMAIN. Both carry the zone's SOA in the authority section so that resolvers
//!   cache the negative answer for [`DNS_TTL`] (RFC 2308, section 5).
//! - Names compare case-insensitively (RFC 4343); every record lives [`DNS_TTL`] seconds.
//!
//! **strait never forwards.** A name outside the cluster domain is REFUSED: the server asks no
//! other resolver, ever, so a lab or a test cannot send a single packet to a real resolver
//! through it. Short names are the client's business: the pod's `resolv.conf` search list
//! (see `runtime::dns_config`) turns `web` into `web.<ns>.svc.<domain>` before asking.
//!
//! A published zone is immutable: each query clones the current `Arc` from a `watch` channel
//! (O(1)) and looks its name up in one shard of the zone's names. The agent keeps its own copy
//! that it changes service by service ([`DnsZone::upsert_service`],
//! [`DnsZone::remove_service`]) and publishes a clone after each batch of changes. The names
//! are split into [`SHARDS`] maps shared between copies: a clone costs one reference count per
//! shard, and a change copies only the shards it touches (those a published zone still holds),
//! so a service change costs about 1/[`SHARDS`] of the zone, not a rebuild of it. [`ClusterDns::with_metrics`] counts the answers by response code
//! (`strait_dns_queries_total`).

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher},
    io,
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, MessageType, Metadata, OpCode, ResponseCode},
    rr::{
        DNSClass, LowerName, Name, RData, Record, RecordType,
        rdata::{A, SOA, SRV},
    },
};
use hickory_server::{
    Server,
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};

use crate::metrics::AgentMetrics;

/// Time to live of every answer, positive and negative, in seconds: short, so that a changed
/// service is seen quickly (Kubernetes' cluster DNS uses the same).
pub const DNS_TTL: u32 = 5;

/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection before the connection is read again.
const TCP_RESPONSE_BUFFER: usize = 32;
/// The UDP payload size announced in EDNS answers (the DNS flag day 2020 default).
const EDNS_PAYLOAD: u16 = 1232;

/// A service as the DNS sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsService {
    pub namespace: String,
    pub name: String,
    /// The ClusterIP; `None` for a headless service.
    pub cluster_ip: Option<Ipv4Addr>,
    /// Addresses of the ready endpoints; answered for a headless service only.
    pub endpoints: Vec<Ipv4Addr>,
    pub ports: Vec<DnsPort>,
}

/// A port of a service. Only named ports get an SRV record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsPort {
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`, as in the Service spec.
    pub protocol: String,
    pub port: u16,
}

/// The cluster domain was not a usable DNS name.
#[derive(Debug, thiserror::Error)]
#[error("cluster domain {domain:?} is not a valid DNS name")]
pub struct InvalidClusterDomain {
    domain: String,
    #[source]
    source: hickory_proto::ProtoError,
}

/// The records of one name, as little as answers need: the records themselves are made per
/// query from the name and these (a few per answer, against 100,000 services' worth held).
/// A name with no records at all still exists (an empty non-terminal such as
/// `<ns>.svc.<domain>`): it answers NOERROR without records, and its children are not denied
/// by an NXDOMAIN on it (RFC 8020). It exists as long as it is a service's name or has a name
/// below it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NameRecords {
    /// A records: the addresses, sorted, without duplicates.
    a: Vec<Ipv4Addr>,
    /// The SRV record of `_<port>._<proto>.<service>`: the port; the target is the service
    /// (two labels up), its addresses the additional section.
    srv: Option<u16>,
    /// A service's own name: its SRV names (removed with it).
    service: Option<Vec<LowerName>>,
    /// Names directly below this one.
    children: u32,
}

impl NameRecords {
    fn is_unused(&self) -> bool {
        self.service.is_none() && self.children == 0 && self.a.is_empty() && self.srv.is_none()
    }
}

/// Shards of a zone's names (see the module's documentation).
pub const SHARDS: usize = 256;

/// The shard of a name: a hash with fixed keys, the same in every copy of the zone.
type ShardHasher = BuildHasherDefault<DefaultHasher>;

type Names = HashMap<LowerName, NameRecords>;

/// Every name of the cluster domain. Cloning shares the names (see the module's
/// documentation).
#[derive(Clone, Debug)]
pub struct DnsZone {
    apex: LowerName,
    apex_name: Name,
    soa: Record,
    shards: Vec<Arc<Names>>,
}

/// What a query gets from the zone.
#[derive(Debug, PartialEq)]
enum Lookup {
    /// Outside the cluster domain: never answered, never forwarded.
    Refused,
    /// The name does not exist (the SOA goes in the authority section).
    NxDomain,
    /// The name exists; no records means NODATA (the SOA goes in the authority section).
    Found { answers: Vec<Record>, additionals: Vec<Record> },
}

impl DnsZone {
    /// The zone of `cluster_domain` (e.g. `cluster.local`, with or without the trailing dot)
    /// holding `services`. A service whose namespace, name or port name is not a DNS label
    /// (the API validates them, so this is a bug elsewhere) is logged and left out rather than
    /// taking the whole zone down.
    pub fn new(
        cluster_domain: &str,
        services: impl IntoIterator<Item = DnsService>,
    ) -> Result<Self, InvalidClusterDomain> {
        let invalid = |source| InvalidClusterDomain { domain: cluster_domain.to_owned(), source };
        let mut apex = Name::from_ascii(cluster_domain).map_err(invalid)?.to_lowercase();
        apex.set_fqdn(true);
        let soa_rdata = SOA::new(
            Name::from_ascii("ns.dns").and_then(|ns| ns.append_domain(&apex)).map_err(invalid)?,
            Name::from_ascii("hostmaster").and_then(|h| h.append_domain(&apex)).map_err(invalid)?,
            zone_serial(),
            7200,
            1800,
            86400,
            DNS_TTL,
        );
        let mut zone = Self {
            soa: Record::from_rdata(apex.clone(), DNS_TTL, RData::SOA(soa_rdata)),
            apex: LowerName::from(&apex),
            apex_name: apex,
            shards: Vec::new(),
        };
        zone.clear();
        for service in services {
            zone.upsert_service(&service);
        }
        Ok(zone)
    }

    /// Removes every service: the apex alone is left.
    pub fn clear(&mut self) {
        self.shards = (0..SHARDS).map(|_| Arc::default()).collect();
        let apex = self.apex.clone();
        self.names_mut(&apex).insert(apex, NameRecords::default());
    }

    /// Adds `service`, or replaces what the zone had under its namespace and name.
    pub fn upsert_service(&mut self, service: &DnsService) {
        self.remove_service(&service.namespace, &service.name);
        if let Err(error) = self.add_service(service) {
            tracing::warn!(
                service = %format!("{}/{}", service.namespace, service.name),
                %error,
                "service left out of the cluster DNS: its name is not a DNS name"
            );
        }
    }

    /// Removes the service `namespace/name` and its names, and the names above them that no
    /// other service needs. Nothing happens for a service the zone does not have.
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let Some(service_name) = self.service_name(namespace, name) else { return };
        let service_name = LowerName::from(&service_name);
        let Some(records) = self.names_mut(&service_name).get_mut(&service_name) else { return };
        let Some(srv_names) = records.service.take() else { return };
        records.a.clear();
        for srv_name in srv_names {
            if let Some(records) = self.names_mut(&srv_name).get_mut(&srv_name) {
                records.srv = None;
            }
            self.prune(srv_name);
        }
        self.prune(service_name);
    }

    /// The cluster domain, lowercase, with its trailing dot.
    pub fn domain(&self) -> String {
        self.apex.to_string()
    }

    /// How many names the zone holds, service names and the names between them and the apex.
    pub fn name_count(&self) -> usize {
        self.shards.iter().map(|names| names.len()).sum()
    }

    fn shard(&self, name: &LowerName) -> usize {
        (ShardHasher::default().hash_one(name) % SHARDS as u64) as usize
    }

    fn names(&self, name: &LowerName) -> &Names {
        &self.shards[self.shard(name)]
    }

    /// The shard of `name`, for a change: copied first if another zone shares it.
    fn names_mut(&mut self, name: &LowerName) -> &mut Names {
        let shard = self.shard(name);
        Arc::make_mut(&mut self.shards[shard])
    }

    /// `<name>.<namespace>.svc.<domain>`, lowercase; `None` if that is not a DNS name.
    fn service_name(&self, namespace: &str, name: &str) -> Option<Name> {
        let relative = format!("{name}.{namespace}.svc");
        Name::from_ascii(&relative)
            .and_then(|name| name.append_domain(&self.apex_name))
            .ok()
            .map(|name| name.to_lowercase())
    }

    fn add_service(&mut self, service: &DnsService) -> Result<(), String> {
        for label in [&service.namespace, &service.name] {
            if !is_dns_label(label) {
                return Err(format!("{label:?} is not a DNS label"));
            }
        }
        let service_name =
            self.service_name(&service.namespace, &service.name).ok_or_else(|| {
                format!("{}.{}.svc is not a DNS name", service.name, service.namespace)
            })?;
        let mut addresses: Vec<Ipv4Addr> = match service.cluster_ip {
            Some(ip) => vec![ip],
            None => service.endpoints.clone(),
        };
        addresses.sort_unstable();
        addresses.dedup();

        // Every name is checked before any is made: a refused service leaves nothing behind.
        let mut srv_ports = Vec::new();
        for port in service.ports.iter().filter(|p| !p.name.is_empty()) {
            if !is_dns_label(&port.name) || !is_dns_label(&port.protocol) {
                return Err(format!("port {:?}/{:?} is not a DNS label", port.name, port.protocol));
            }
            let relative = format!(
                "_{}._{}",
                port.name.to_ascii_lowercase(),
                port.protocol.to_ascii_lowercase()
            );
            let srv_name = Name::from_ascii(&relative)
                .and_then(|name| name.append_domain(&service_name))
                .map_err(|e| e.to_string())?;
            srv_ports.push((srv_name, port.port));
        }
        // The service's own name first, so that its SRV names are found by its removal.
        self.make_name(&service_name).service = Some(Vec::new());
        let mut srv_names = Vec::new();
        for (srv_name, port) in srv_ports {
            self.make_name(&srv_name).srv = Some(port);
            srv_names.push(LowerName::from(&srv_name));
        }
        let entry = self.make_name(&service_name);
        entry.a = addresses;
        entry.service = Some(srv_names);
        Ok(())
    }

    /// The records of `name`, made (with every name between it and the apex) if missing.
    fn make_name(&mut self, name: &Name) -> &mut NameRecords {
        let key = LowerName::from(name);
        if !self.names(&key).contains_key(&key) {
            if name.num_labels() > self.apex.num_labels() {
                self.make_name(&name.base_name()).children += 1;
            }
            self.names_mut(&key).insert(key.clone(), NameRecords::default());
        }
        self.names_mut(&key).get_mut(&key).expect("made above")
    }

    /// Removes `name` if nothing needs it any more, then its parent if that was its last
    /// child. The apex stays.
    fn prune(&mut self, name: LowerName) {
        let mut name = Name::from(&name);
        while name.num_labels() > self.apex.num_labels() {
            let key = LowerName::from(&name);
            if !self.names(&key).get(&key).is_some_and(NameRecords::is_unused) {
                return;
            }
            self.names_mut(&key).remove(&key);
            name = name.base_name();
            let parent = LowerName::from(&name);
            if let Some(records) = self.names_mut(&parent).get_mut(&parent) {
                records.children = records.children.saturating_sub(1);
            }
        }
    }

    fn lookup(&self, name: &LowerName, record_type: RecordType) -> Lookup {
        if !self.apex.zone_of(name) {
            return Lookup::Refused;
        }
        let Some(records) = self.names(name).get(name) else {
            return Lookup::NxDomain;
        };
        let owner = Name::from(name);
        let a = || address_records(&owner, &records.a);
        // `_<port>._<proto>.<service>`: the target, and its addresses for the additionals.
        let srv = || {
            let port = records.srv?;
            let target = owner.base_name().base_name();
            let rdata = RData::SRV(SRV::new(0, 100, port, target.clone()));
            let target_key = LowerName::from(&target);
            let addresses = self.names(&target_key).get(&target_key).map_or(&[][..], |t| &t.a);
            Some((
                Record::from_rdata(owner.clone(), DNS_TTL, rdata),
                address_records(&target, addresses),
            ))
        };
        let (answers, additionals) = match record_type {
            RecordType::A => (a(), Vec::new()),
            RecordType::SRV => {
                srv().map_or_else(Default::default, |(srv, additionals)| (vec![srv], additionals))
            }
            RecordType::SOA if *name == self.apex => (vec![self.soa.clone()], Vec::new()),
            RecordType::ANY => {
                let mut answers = a();
                answers.extend(srv().map(|(srv, _)| srv));
                (answers, Vec::new())
            }
            _ => (Vec::new(), Vec::new()),
        };
        Lookup::Found { answers, additionals }
    }
}

/// The A records of `owner` for `addresses`.
fn address_records(owner: &Name, addresses: &[Ipv4Addr]) -> Vec<Record> {
    addresses
        .iter()
        .map(|ip| Record::from_rdata(owner.clone(), DNS_TTL, RData::A(A(*ip))))
        .collect()
}

/// Letters, digits and hyphens, 1 to 63 of them (RFC 1035, section 2.3.1): what Kubernetes
/// allows for namespace, service and port names.
fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A serial that grows with every zone built (seconds since the epoch, RFC 1982 arithmetic
/// takes care of the wrap in 2106). Nothing transfers the zone; it only tells zones apart.
fn zone_serial() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as u32)
}

/// The mnemonic of a response code (RFC 6895, section 2.3), as DNS tools print it.
pub fn rcode_name(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

/// Answers queries from the current zone.
struct ClusterDnsHandler {
    zone: watch::Receiver<Arc<DnsZone>>,
    metrics: Option<Arc<AgentMetrics>>,
}

#[async_trait::async_trait]
impl RequestHandler for ClusterDnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        // The zone of this query; a swap while it is answered does not mix two zones.
        let zone = self.zone.borrow().clone();

        let response_edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = false;

        let lookup = if request.metadata.message_type != MessageType::Query {
            Err(ResponseCode::FormErr)
        } else if request.metadata.op_code != OpCode::Query {
            Err(ResponseCode::NotImp)
        } else if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            // RFC 6891, section 6.1.3: only EDNS version 0 exists.
            Err(ResponseCode::BADVERS)
        } else {
            match request.request_info() {
                // Exactly one question (RFC 9619).
                Err(_) => Err(ResponseCode::FormErr),
                Ok(info) if info.query.query_class() != DNSClass::IN => Err(ResponseCode::Refused),
                Ok(info) => Ok(zone.lookup(info.query.name(), info.query.query_type())),
            }
        };

        // An in-zone answer: the records (none for NXDOMAIN and NODATA) and the additionals.
        let (code, in_zone) = match lookup {
            Err(code) => (code, None),
            Ok(Lookup::Refused) => (ResponseCode::Refused, None),
            Ok(Lookup::NxDomain) => (ResponseCode::NXDomain, Some((Vec::new(), Vec::new()))),
            Ok(Lookup::Found { answers, additionals }) => {
                (ResponseCode::NoError, Some((answers, additionals)))
            }
        };
        metadata.response_code = code;
        // Counted before sending: a client holding its answer finds it counted.
        if let Some(metrics) = &self.metrics {
            metrics.count_dns_query(rcode_name(code));
        }
        let sent = match in_zone {
            None => response_handle.send_response(builder.build_no_records(metadata)).await,
            Some((answers, additionals)) => {
                metadata.authoritative = true;
                // RFC 2308, section 3: negative answers carry the SOA for their TTL.
                let soa: &[&Record] = if answers.is_empty() { &[&zone.soa] } else { &[] };
                let response = builder.build(
                    metadata,
                    answers.iter(),
                    [],
                    soa.iter().copied(),
                    additionals.iter(),
                );
                response_handle.send_response(response).await
            }
        };
        match sent {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "cannot send a DNS response");
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata: failed,
                    counts: Default::default(),
                })
            }
        }
    }
}

/// The cluster DNS server of a node.
#[derive(Debug)]
pub struct ClusterDns {
    zone: watch::Receiver<Arc<DnsZone>>,
    metrics: Option<Arc<AgentMetrics>>,
}

impl ClusterDns {
    /// A server answering from whatever zone `zone` holds when each query arrives.
    pub fn new(zone: watch::Receiver<Arc<DnsZone>>) -> Self {
        Self { zone, metrics: None }
    }

    /// Counts every answer in `strait_dns_queries_total{rcode}`. Queries too malformed to
    /// parse get no answer from the server and are not counted.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Serves on `udp` and `tcp` until the returned future is dropped (which stops every task
    /// it started) or a socket fails.
    pub async fn serve(self, udp: UdpSocket, tcp: TcpListener) -> io::Result<()> {
        let mut server = Server::new(ClusterDnsHandler { zone: self.zone, metrics: self.metrics });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        server.block_until_done().await.map_err(|e| io::Error::other(format!("cluster DNS: {e}")))
    }
}

/// Serves the cluster DNS on `udp` and `tcp` without metrics: [`ClusterDns::serve`].
pub async fn serve(
    zone: watch::Receiver<Arc<DnsZone>>,
    udp: UdpSocket,
    tcp: TcpListener,
) -> io::Result<()> {
    ClusterDns::new(zone).serve(udp, tcp).await
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddr},
        sync::Arc,
        time::Duration,
    };

    use hickory_proto::{
        op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
        rr::{Name, RData, RecordType},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream, UdpSocket},
        sync::watch,
    };

    use super::{ClusterDns, DNS_TTL, DnsPort, DnsService, DnsZone, serve};
    use crate::metrics::AgentMetrics;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn web() -> DnsService {
        DnsService {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            endpoints: vec![Ipv4Addr::new(10, 244, 1, 5)],
            ports: vec![
                DnsPort { name: "http".into(), protocol: "TCP".into(), port: 80 },
                DnsPort { name: String::new(), protocol: "TCP".into(), port: 8080 },
            ],
        }
    }

    fn headless(endpoints: &[Ipv4Addr]) -> DnsService {
        DnsService {
            namespace: "db".into(),
            name: "cassandra".into(),
            cluster_ip: None,
            endpoints: endpoints.to_vec(),
            ports: vec![DnsPort { name: "cql".into(), protocol: "TCP".into(), port: 9042 }],
        }
    }

    /// A cluster DNS on loopback: UDP and TCP on ephemeral ports of 127.0.0.1, stopped when
    /// dropped.
    struct TestServer {
        udp: SocketAddr,
        tcp: SocketAddr,
        zone: watch::Sender<Arc<DnsZone>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl TestServer {
        async fn start(zone: DnsZone) -> Self {
            Self::start_with(zone, None).await
        }

        async fn start_with(zone: DnsZone, metrics: Option<Arc<AgentMetrics>>) -> Self {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binding UDP on loopback");
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("binding TCP on loopback");
            let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
            let (sender, receiver) = watch::channel(Arc::new(zone));
            let task = match metrics {
                Some(metrics) => {
                    tokio::spawn(ClusterDns::new(receiver).with_metrics(metrics).serve(udp, tcp))
                }
                None => tokio::spawn(serve(receiver, udp, tcp)),
            };
            Self { udp: udp_addr, tcp: tcp_addr, zone: sender, task }
        }

        async fn udp(&self, name: &str, record_type: RecordType) -> Message {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
            let query = query(name, record_type);
            socket.send_to(&query.to_vec().unwrap(), self.udp).await.expect("sending the query");
            let mut buffer = vec![0; 4096];
            let (len, from) = tokio::time::timeout(TIMEOUT, socket.recv_from(&mut buffer))
                .await
                .expect("a UDP answer in time")
                .expect("receiving");
            assert_eq!(from, self.udp);
            let answer = Message::from_vec(&buffer[..len]).expect("a DNS message");
            assert_eq!(answer.metadata.id, query.metadata.id);
            answer
        }

        async fn tcp(&self, name: &str, record_type: RecordType) -> Message {
            let exchange = async {
                let mut stream = TcpStream::connect(self.tcp).await.expect("connecting");
                let query = query(name, record_type).to_vec().unwrap();
                // RFC 1035, section 4.2.2: a two-byte length before each message.
                stream.write_all(&(query.len() as u16).to_be_bytes()).await.unwrap();
                stream.write_all(&query).await.unwrap();
                let len = stream.read_u16().await.expect("answer length");
                let mut buffer = vec![0; usize::from(len)];
                stream.read_exact(&mut buffer).await.expect("answer");
                Message::from_vec(&buffer).expect("a DNS message")
            };
            tokio::time::timeout(TIMEOUT, exchange).await.expect("a TCP answer in time")
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message
    }

    fn addresses(message: &Message) -> Vec<Ipv4Addr> {
        message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn has_soa_authority(message: &Message) -> bool {
        message.authorities.iter().any(|r| matches!(r.data, RData::SOA(_)))
    }

    /// Every name of a zone with what it holds, in order.
    fn contents(zone: &DnsZone) -> BTreeMap<String, String> {
        zone.shards
            .iter()
            .flat_map(|names| names.iter())
            .map(|(name, records)| (name.to_string(), format!("{records:?}")))
            .collect()
    }

    fn service(namespace: &str, name: &str, ip: u8, ports: &[&str]) -> DnsService {
        DnsService {
            namespace: namespace.into(),
            name: name.into(),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 1, ip)),
            endpoints: Vec::new(),
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, port)| DnsPort {
                    name: (*port).into(),
                    protocol: "TCP".into(),
                    port: 80 + i as u16,
                })
                .collect(),
        }
    }

    #[test]
    fn a_zone_changed_service_by_service_equals_one_built_from_the_result() {
        let mut zone = DnsZone::new("cluster.local", [web(), headless(&[])]).unwrap();
        let published = zone.clone();
        let before = contents(&published);
        zone.upsert_service(&service("shop", "cart", 1, &["http", "grpc"]));
        zone.upsert_service(&service("shop", "pay", 2, &["http"]));
        // A changed service: one port gone, one new, another address.
        zone.upsert_service(&service("shop", "cart", 3, &["grpc", "admin"]));
        zone.remove_service("db", "cassandra");
        zone.remove_service("db", "missing");
        zone.remove_service("nowhere", "at-all");
        // A service refused for its port name leaves nothing of itself.
        zone.upsert_service(&service("bad", "svc", 4, &["ok", "not_a_label"]));
        let expected = DnsZone::new(
            "cluster.local",
            [
                web(),
                service("shop", "cart", 3, &["grpc", "admin"]),
                service("shop", "pay", 2, &["http"]),
            ],
        )
        .unwrap();
        assert_eq!(contents(&zone), contents(&expected));
        assert!(
            !contents(&zone).contains_key("db.svc.cluster.local."),
            "an emptied namespace goes"
        );
        assert!(!contents(&zone).contains_key("bad.svc.cluster.local."));
        // The clone published before the changes still answers as it did.
        assert_eq!(contents(&published), before);
        // Removing everything leaves the apex and nothing else.
        for (namespace, name) in [("default", "web"), ("shop", "cart"), ("shop", "pay")] {
            zone.remove_service(namespace, name);
        }
        assert_eq!(contents(&zone), contents(&DnsZone::new("cluster.local", []).unwrap()));
        assert_eq!(zone.name_count(), 1);
    }

    #[test]
    fn a_change_copies_only_the_shards_it_touches() {
        let services = (0..2000).map(|i| service("ns", &format!("svc-{i}"), 1, &[]));
        let mut zone = DnsZone::new("cluster.local", services).unwrap();
        let published = zone.clone();
        zone.upsert_service(&service("ns", "svc-7", 9, &[]));
        let copied = zone
            .shards
            .iter()
            .zip(&published.shards)
            .filter(|(ours, theirs)| !Arc::ptr_eq(ours, theirs))
            .count();
        // The service's name, and its namespace's (which counts the names below it): 2 of
        // 256, or 1 if both fall in one shard.
        assert!((1..=2).contains(&copied), "{copied} shards copied");
    }

    #[tokio::test]
    async fn service_name_resolves_to_its_cluster_ip_over_udp_and_tcp() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        for answer in [
            server.udp("web.default.svc.cluster.local.", RecordType::A).await,
            server.tcp("web.default.svc.cluster.local.", RecordType::A).await,
        ] {
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            assert_eq!(answer.metadata.message_type, MessageType::Response);
            assert!(answer.metadata.authoritative);
            assert!(!answer.metadata.recursion_available, "strait never recurses");
            assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 96, 0, 10)]);
            assert_eq!(answer.answers[0].ttl, DNS_TTL);
        }
    }

    #[tokio::test]
    async fn names_match_case_insensitively_with_or_without_the_trailing_dot() {
        let server = TestServer::start(DnsZone::new("Cluster.Local.", [web()]).unwrap()).await;
        for name in ["WEB.Default.SVC.cluster.LOCAL.", "web.default.svc.cluster.local"] {
            let answer = server.udp(name, RecordType::A).await;
            assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 96, 0, 10)], "{name}");
        }
    }

    #[tokio::test]
    async fn headless_service_answers_every_ready_endpoint_and_nodata_without_any() {
        let endpoints = [Ipv4Addr::new(10, 244, 2, 7), Ipv4Addr::new(10, 244, 1, 3)];
        let zone = DnsZone::new("cluster.local", [headless(&endpoints), web()]).unwrap();
        let server = TestServer::start(zone).await;
        let name = "cassandra.db.svc.cluster.local.";
        for answer in [server.udp(name, RecordType::A).await, server.tcp(name, RecordType::A).await]
        {
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            let mut got = addresses(&answer);
            got.sort();
            assert_eq!(got, [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 2, 7)]);
        }

        server.zone.send_replace(Arc::new(DnsZone::new("cluster.local", [headless(&[])]).unwrap()));
        let answer = server.udp(name, RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "the name still exists");
        assert!(answer.answers.is_empty());
        assert!(has_soa_authority(&answer), "a NODATA answer carries the SOA for caching");
    }

    #[tokio::test]
    async fn aaaa_of_a_service_is_nodata_not_nxdomain() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        let answer = server.udp("web.default.svc.cluster.local.", RecordType::AAAA).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert!(has_soa_authority(&answer));
    }

    #[tokio::test]
    async fn named_port_has_an_srv_record_pointing_at_the_service() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        let answer = server.tcp("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        let [record] = answer.answers.as_slice() else {
            panic!("one SRV record expected: {:?}", answer.answers);
        };
        let RData::SRV(srv) = &record.data else { panic!("not an SRV record: {record:?}") };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target, Name::from_ascii("web.default.svc.cluster.local.").unwrap());
        let glue: Vec<_> = answer
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(glue, [Ipv4Addr::new(10, 96, 0, 10)], "the target's address rides along");

        let wrong_protocol =
            server.udp("_http._udp.web.default.svc.cluster.local.", RecordType::SRV).await;
        assert_eq!(wrong_protocol.metadata.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn unknown_name_in_the_cluster_domain_is_nxdomain_with_the_soa() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        for name in ["nope.default.svc.cluster.local.", "web.other.svc.cluster.local."] {
            for answer in
                [server.udp(name, RecordType::A).await, server.tcp(name, RecordType::A).await]
            {
                assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "{name}");
                assert!(answer.metadata.authoritative);
                assert!(answer.answers.is_empty());
                assert!(
                    has_soa_authority(&answer),
                    "{name}: the SOA lets resolvers cache the miss"
                );
            }
        }
        // The names between a service and the apex exist (RFC 8020): NODATA, not NXDOMAIN.
        let namespace = server.udp("default.svc.cluster.local.", RecordType::A).await;
        assert_eq!(namespace.metadata.response_code, ResponseCode::NoError);
        assert!(namespace.answers.is_empty());
    }

    #[tokio::test]
    async fn names_outside_the_cluster_domain_are_refused_and_never_forwarded() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        for name in ["example.com.", "web.default.svc.cluster.local.example.com.", "local."] {
            for answer in
                [server.udp(name, RecordType::A).await, server.tcp(name, RecordType::A).await]
            {
                assert_eq!(answer.metadata.response_code, ResponseCode::Refused, "{name}");
                assert!(answer.answers.is_empty());
                assert!(!answer.metadata.recursion_available);
            }
        }
    }

    #[tokio::test]
    async fn a_new_zone_is_answered_from_the_next_query_on() {
        let server = TestServer::start(DnsZone::new("cluster.local", []).unwrap()).await;
        let name = "web.default.svc.cluster.local.";
        assert_eq!(
            server.udp(name, RecordType::A).await.metadata.response_code,
            ResponseCode::NXDomain
        );

        server.zone.send_replace(Arc::new(DnsZone::new("cluster.local", [web()]).unwrap()));
        assert_eq!(
            addresses(&server.udp(name, RecordType::A).await),
            [Ipv4Addr::new(10, 96, 0, 10)]
        );

        let mut moved = web();
        moved.cluster_ip = Some(Ipv4Addr::new(10, 96, 0, 99));
        server.zone.send_replace(Arc::new(DnsZone::new("cluster.local", [moved]).unwrap()));
        assert_eq!(
            addresses(&server.tcp(name, RecordType::A).await),
            [Ipv4Addr::new(10, 96, 0, 99)]
        );
    }

    #[tokio::test]
    async fn edns_queries_get_edns_answers_and_unknown_versions_badvers() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for (version, expected) in [(0, ResponseCode::NoError), (1, ResponseCode::BADVERS)] {
            let mut message = query("web.default.svc.cluster.local.", RecordType::A);
            let mut edns = Edns::new();
            edns.set_max_payload(1232).set_version(version);
            message.set_edns(edns);
            socket.send_to(&message.to_vec().unwrap(), server.udp).await.unwrap();
            let mut buffer = vec![0; 4096];
            let (len, _) = tokio::time::timeout(TIMEOUT, socket.recv_from(&mut buffer))
                .await
                .unwrap()
                .unwrap();
            let answer = Message::from_vec(&buffer[..len]).unwrap();
            // Compared by number: BADVERS and BADSIG share code 16 (RFC 6891, section 9).
            assert_eq!(
                u16::from(answer.metadata.response_code),
                u16::from(expected),
                "EDNS version {version}"
            );
            assert!(answer.edns.is_some(), "an EDNS query gets an OPT record back (RFC 6891)");
        }
    }

    #[tokio::test]
    async fn other_opcodes_are_not_implemented() {
        let server = TestServer::start(DnsZone::new("cluster.local", [web()]).unwrap()).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut message = query("web.default.svc.cluster.local.", RecordType::A);
        message.metadata.op_code = OpCode::Status;
        socket.send_to(&message.to_vec().unwrap(), server.udp).await.unwrap();
        let mut buffer = vec![0; 4096];
        let (len, _) =
            tokio::time::timeout(TIMEOUT, socket.recv_from(&mut buffer)).await.unwrap().unwrap();
        let answer = Message::from_vec(&buffer[..len]).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
    }

    #[tokio::test]
    async fn every_answer_is_counted_by_its_response_code() {
        let metrics = Arc::new(AgentMetrics::new());
        let zone = DnsZone::new("cluster.local", [web()]).unwrap();
        let server = TestServer::start_with(zone, Some(metrics.clone())).await;
        server.udp("web.default.svc.cluster.local.", RecordType::A).await;
        server.tcp("web.default.svc.cluster.local.", RecordType::AAAA).await;
        server.udp("gone.default.svc.cluster.local.", RecordType::A).await;
        server.udp("example.com.", RecordType::A).await;
        let text = metrics.render();
        for (rcode, count) in [("NOERROR", 2), ("NXDOMAIN", 1), ("REFUSED", 1), ("SERVFAIL", 0)] {
            let line = format!("strait_dns_queries_total{{rcode=\"{rcode}\"}} {count}\n");
            assert!(text.contains(&line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn services_with_names_that_are_not_dns_labels_are_left_out() {
        let mut bad = web();
        bad.name = "a.b".into();
        let zone = DnsZone::new("cluster.local", [bad, headless(&[])]).unwrap();
        // apex, svc, db.svc, cassandra.db.svc, _tcp.cassandra…, _cql._tcp.cassandra…
        assert_eq!(zone.name_count(), 6);
        assert_eq!(zone.domain(), "cluster.local.");
        assert!(DnsZone::new("bad..domain", []).is_err());
    }
}
