//! Rule sets with the structure kube-proxy's iptables and nftables modes write, for the same
//! services strait programs, so `strait bench services` can measure them side by side. Written
//! from the documented structure; loaded only inside the bench's node A namespace.

use std::{fmt::Write as _, net::SocketAddrV4};

/// One service port with its endpoints.
pub struct RuleService {
    pub name: String,
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

/// The pod range: traffic from outside it to a service is marked for masquerade.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const MASQ_MARK: &str = "0x4000";

/// A 16-character chain suffix from a name (FNV-1a, two seeds, base32 letters and digits), the
/// way kube-proxy keeps chain names short and stable.
fn chain_hash(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3))
    };
    let (a, b) = (fnv(0xcbf29ce484222325), fnv(0x84222325cbf29ce4));
    (0..16)
        .map(|i| {
            let word = if i < 8 { a } else { b };
            char::from(ALPHABET[((word >> ((i % 8) * 5)) & 31) as usize])
        })
        .collect()
}

fn svc_chain(service: &RuleService) -> String {
    format!("KUBE-SVC-{}", chain_hash(&service.name))
}

fn sep_chain(service: &RuleService, endpoint: &SocketAddrV4) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{}/{endpoint}", service.name)))
}

fn kube_services_rules(out: &mut String, services: &[RuleService]) {
    for service in services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {}",
            service.vip.ip(),
            service.name,
            service.vip.port(),
            svc_chain(service)
        );
    }
}

fn service_chains(out: &mut String, service: &RuleService) {
    let svc = svc_chain(service);
    let _ = writeln!(
        out,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m tcp --dport {} -j KUBE-MARK-MASQ",
        service.vip.ip(),
        service.vip.port()
    );
    let count = service.endpoints.len();
    for (i, endpoint) in service.endpoints.iter().enumerate() {
        let sep = sep_chain(service, endpoint);
        // Endpoint i of n is taken with probability 1/(n-i) among those left: uniform overall.
        if i + 1 < count {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{} -> {endpoint}\" -m statistic --mode random --probability {:.10} -j {sep}",
                service.name,
                1.0 / (count - i) as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{} -> {endpoint}\" -j {sep}",
                service.name
            );
        }
        let _ = writeln!(out, "-A {sep} -s {}/32 -j KUBE-MARK-MASQ", endpoint.ip());
        let _ = writeln!(out, "-A {sep} -p tcp -m tcp -j DNAT --to-destination {endpoint}");
    }
}

fn chain_declarations(out: &mut String, service: &RuleService) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(service));
    for endpoint in &service.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(service, endpoint));
    }
}

/// The whole nat table for `iptables-restore`.
pub fn iptables_restore(services: &[RuleService]) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    for service in services {
        chain_declarations(&mut out, service);
    }
    out.push_str("-A PREROUTING -m comment --comment \"service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A OUTPUT -m comment --comment \"service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A POSTROUTING -m comment --comment \"postrouting rules\" -j KUBE-POSTROUTING\n");
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    out.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    for service in services {
        service_chains(&mut out, service);
    }
    kube_services_rules(&mut out, services);
    out.push_str("COMMIT\n");
    out
}

/// One service added with `iptables-restore --noflush`: its chains, and KUBE-SERVICES
/// rewritten whole (`services`, then the new one last), as a partial sync does.
pub fn iptables_add(services: &[RuleService], added: &RuleService) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    chain_declarations(&mut out, added);
    service_chains(&mut out, added);
    kube_services_rules(&mut out, services);
    kube_services_rules(&mut out, std::slice::from_ref(added));
    out.push_str("COMMIT\n");
    out
}

/// One service removed with `iptables-restore --noflush`: KUBE-SERVICES rewritten without it
/// (`services` excludes it), its chains flushed and deleted.
pub fn iptables_remove(services: &[RuleService], removed: &RuleService) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    chain_declarations(&mut out, removed);
    kube_services_rules(&mut out, services);
    let _ = writeln!(out, "-X {}", svc_chain(removed));
    for endpoint in &removed.endpoints {
        let _ = writeln!(out, "-X {}", sep_chain(removed, endpoint));
    }
    out.push_str("COMMIT\n");
    out
}

/// The nftables table of the bench.
pub const NFT_TABLE: &str = "strait-bench";

fn nft_service_chain(service: &RuleService) -> String {
    format!("service-{}-{}", chain_hash(&service.name), service.name.replace('/', "-"))
}

fn nft_endpoint_chain(service: &RuleService, endpoint: &SocketAddrV4) -> String {
    format!("endpoint-{}-{}", chain_hash(&format!("{}/{endpoint}", service.name)), endpoint.ip())
}

fn nft_element(service: &RuleService) -> String {
    format!(
        "{} . tcp . {} : goto {}",
        service.vip.ip(),
        service.vip.port(),
        nft_service_chain(service)
    )
}

fn nft_service_chains(out: &mut String, service: &RuleService) {
    for endpoint in &service.endpoints {
        let chain = nft_endpoint_chain(service, endpoint);
        let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} ip saddr {} jump mark-for-masquerade",
            endpoint.ip()
        );
        let _ =
            writeln!(out, "add rule ip {NFT_TABLE} {chain} meta l4proto tcp dnat to {endpoint}");
    }
    let chain = nft_service_chain(service);
    let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        service.vip.ip(),
        service.vip.port()
    );
    let picks: Vec<String> = service
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| format!("{i} : goto {}", nft_endpoint_chain(service, endpoint)))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        service.endpoints.len(),
        picks.join(", ")
    );
}

/// The whole table for `nft -f`: a verdict map from (ip, protocol, port) to per-service
/// chains, each picking an endpoint chain with `numgen random mod M`.
pub fn nft_ruleset(services: &[RuleService]) -> String {
    let mut out = format!("add table ip {NFT_TABLE}\n");
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
    );
    let _ = writeln!(out, "add chain ip {t} mark-for-masquerade");
    let _ =
        writeln!(out, "add rule ip {t} mark-for-masquerade meta mark set meta mark or {MASQ_MARK}");
    let _ = writeln!(out, "add chain ip {t} masquerading");
    let _ = writeln!(out, "add rule ip {t} masquerading meta mark and {MASQ_MARK} == 0 return");
    let _ = writeln!(out, "add rule ip {t} masquerading meta mark set meta mark xor {MASQ_MARK}");
    let _ = writeln!(out, "add rule ip {t} masquerading masquerade fully-random");
    let _ = writeln!(out, "add chain ip {t} services");
    let _ = writeln!(
        out,
        "add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add chain ip {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}"
    );
    let _ = writeln!(out, "add rule ip {t} nat-prerouting jump services");
    let _ = writeln!(out, "add chain ip {t} nat-output {{ type nat hook output priority -100 ; }}");
    let _ = writeln!(out, "add rule ip {t} nat-output jump services");
    let _ = writeln!(
        out,
        "add chain ip {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}"
    );
    let _ = writeln!(out, "add rule ip {t} nat-postrouting jump masquerading");
    for service in services {
        nft_service_chains(&mut out, service);
    }
    for chunk in services.chunks(1000) {
        let elements: Vec<String> = chunk.iter().map(nft_element).collect();
        let _ = writeln!(out, "add element ip {t} service-ips {{ {} }}", elements.join(", "));
    }
    out
}

/// One service added: its chains and its map element.
pub fn nft_add(service: &RuleService) -> String {
    let mut out = String::new();
    nft_service_chains(&mut out, service);
    let _ = writeln!(out, "add element ip {NFT_TABLE} service-ips {{ {} }}", nft_element(service));
    out
}

/// One service removed: its map element, then its chains.
pub fn nft_remove(service: &RuleService) -> String {
    let t = NFT_TABLE;
    let mut out = format!(
        "delete element ip {t} service-ips {{ {} . tcp . {} }}\n",
        service.vip.ip(),
        service.vip.port()
    );
    let _ = writeln!(out, "delete chain ip {t} {}", nft_service_chain(service));
    for endpoint in &service.endpoints {
        let _ = writeln!(out, "delete chain ip {t} {}", nft_endpoint_chain(service, endpoint));
    }
    out
}
