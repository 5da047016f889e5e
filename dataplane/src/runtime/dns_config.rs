//! A pod's `/etc/resolv.conf`, computed from `spec.dnsPolicy` and `spec.dnsConfig` the way the
//! Kubernetes documentation describes ("DNS for Services and Pods", "Pod's DNS Policy"):
//!
//! - `ClusterFirst` (the default; `ClusterFirstWithHostNet` is the same here, since every
//!   strait pod has a network namespace of its own): the cluster DNS as the only nameserver,
//!   the search list `<ns>.svc.<domain> svc.<domain> <domain>` and `options ndots:5`, so that
//!   `web` and `web.other-ns` resolve to services. Without a cluster DNS address the pod gets
//!   the node's file, as the kubelet does.
//! - `Default`: the node's own file, untouched. Unlike the kubelet, strait does not merge a
//!   `dnsConfig` into the node's file for this policy; the pod sees the node's file as is.
//! - `None`: only what `dnsConfig` says.
//!
//! A `dnsConfig` adds nameservers and search domains after the policy's (without duplicates)
//! and overrides options of the same name. At most [`MAX_NAMESERVERS`] nameservers and
//! [`MAX_SEARCHES`] search domains of together [`MAX_SEARCH_CHARS`] characters are kept, the
//! kubelet's limits; the rest is dropped with a warning.
//!
//! The search list uses none of the node's search domains: a lab's pods must not learn the
//! host's resolver configuration.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::PodSpec;

/// glibc reads at most three nameservers (`MAXNS` in `resolv.h`).
pub const MAX_NAMESERVERS: usize = 3;
/// The kubelet's limits on the search list (`MaxDNSSearchPaths`, `MaxDNSSearchListChars`).
pub const MAX_SEARCHES: usize = 32;
pub const MAX_SEARCH_CHARS: usize = 2048;

/// What a pod's processes see at `/etc/resolv.conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodResolvConf {
    /// The node's own file.
    Node,
    /// A file of the pod's own with this text, bind-mounted over `/etc/resolv.conf`.
    Own(String),
}

/// The resolver configuration of a pod in `namespace` with `spec`, on a node whose cluster DNS
/// answers at `cluster_dns` for `cluster_domain` (with or without a trailing dot). An unknown
/// `dnsPolicy` is an error: guessing would send the pod's queries somewhere it did not ask.
pub fn pod_resolv_conf(
    spec: &PodSpec,
    namespace: &str,
    cluster_dns: Option<Ipv4Addr>,
    cluster_domain: &str,
) -> Result<PodResolvConf, String> {
    let mut conf = ResolvConf::default();
    match spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
        "ClusterFirst" | "ClusterFirstWithHostNet" => {
            let Some(cluster_dns) = cluster_dns else { return Ok(PodResolvConf::Node) };
            let domain = cluster_domain.trim_end_matches('.');
            conf.nameservers.push(cluster_dns.to_string());
            conf.searches = vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}")];
            conf.searches.push(domain.to_owned());
            conf.options.push(("ndots".to_owned(), Some("5".to_owned())));
        }
        "Default" => return Ok(PodResolvConf::Node),
        "None" => {}
        other => return Err(format!("dnsPolicy {other:?} is not supported")),
    }
    if let Some(extra) = &spec.dns_config {
        for nameserver in extra.nameservers.iter().flatten() {
            push_new(&mut conf.nameservers, nameserver);
        }
        for search in extra.searches.iter().flatten() {
            push_new(&mut conf.searches, search);
        }
        for option in extra.options.iter().flatten() {
            let name = option.name.clone().unwrap_or_default();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!("dnsConfig option name {name:?} is not valid"));
            }
            match conf.options.iter_mut().find(|(existing, _)| *existing == name) {
                Some((_, value)) => *value = option.value.clone(),
                None => conf.options.push((name, option.value.clone())),
            }
        }
    }
    conf.apply_limits();
    Ok(PodResolvConf::Own(conf.render()))
}

#[derive(Debug, Default)]
struct ResolvConf {
    nameservers: Vec<String>,
    searches: Vec<String>,
    /// Name and optional value, rendered `name:value` or `name`.
    options: Vec<(String, Option<String>)>,
}

impl ResolvConf {
    fn apply_limits(&mut self) {
        if self.nameservers.len() > MAX_NAMESERVERS {
            tracing::warn!(dropped = ?&self.nameservers[MAX_NAMESERVERS..], "a pod asks for more than {MAX_NAMESERVERS} nameservers; the resolver would ignore the others");
            self.nameservers.truncate(MAX_NAMESERVERS);
        }
        let mut chars = 0;
        let keep = self
            .searches
            .iter()
            .take(MAX_SEARCHES)
            .take_while(|search| {
                // Each domain plus the space before it.
                chars += search.len() + 1;
                chars <= MAX_SEARCH_CHARS + 1
            })
            .count();
        if keep < self.searches.len() {
            tracing::warn!(dropped = ?&self.searches[keep..], "a pod's DNS search list is too long; dropping its tail");
            self.searches.truncate(keep);
        }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if !self.searches.is_empty() {
            text += &format!("search {}\n", self.searches.join(" "));
        }
        for nameserver in &self.nameservers {
            text += &format!("nameserver {nameserver}\n");
        }
        if !self.options.is_empty() {
            let options: Vec<String> = self
                .options
                .iter()
                .map(|(name, value)| match value {
                    Some(value) => format!("{name}:{value}"),
                    None => name.clone(),
                })
                .collect();
            text += &format!("options {}\n", options.join(" "));
        }
        text
    }
}

fn push_new(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|existing| existing == item) {
        list.push(item.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::core::v1::{PodDNSConfig, PodDNSConfigOption, PodSpec};

    use super::{PodResolvConf, pod_resolv_conf};

    const DNS: Option<Ipv4Addr> = Some(Ipv4Addr::new(10, 96, 0, 10));

    fn spec(policy: Option<&str>, config: Option<PodDNSConfig>) -> PodSpec {
        PodSpec { dns_policy: policy.map(str::to_owned), dns_config: config, ..Default::default() }
    }

    fn option(name: &str, value: Option<&str>) -> PodDNSConfigOption {
        PodDNSConfigOption { name: Some(name.to_owned()), value: value.map(str::to_owned) }
    }

    fn own(text: &str) -> PodResolvConf {
        PodResolvConf::Own(text.to_owned())
    }

    #[test]
    fn cluster_first_is_the_default_and_points_at_the_cluster_dns() {
        let expected = own(concat!(
            "search shop.svc.cluster.local svc.cluster.local cluster.local\n",
            "nameserver 10.96.0.10\n",
            "options ndots:5\n",
        ));
        for policy in [None, Some("ClusterFirst"), Some("ClusterFirstWithHostNet")] {
            let conf = pod_resolv_conf(&spec(policy, None), "shop", DNS, "cluster.local.");
            assert_eq!(conf, Ok(expected.clone()), "{policy:?}");
        }
    }

    #[test]
    fn cluster_first_without_a_cluster_dns_keeps_the_nodes_file() {
        let conf = pod_resolv_conf(&spec(None, None), "shop", None, "cluster.local");
        assert_eq!(conf, Ok(PodResolvConf::Node));
    }

    #[test]
    fn default_policy_keeps_the_nodes_file() {
        let extra =
            PodDNSConfig { nameservers: Some(vec!["10.0.0.1".into()]), ..Default::default() };
        let conf =
            pod_resolv_conf(&spec(Some("Default"), Some(extra)), "shop", DNS, "cluster.local");
        assert_eq!(conf, Ok(PodResolvConf::Node));
    }

    #[test]
    fn none_policy_takes_only_the_dns_config() {
        let extra = PodDNSConfig {
            nameservers: Some(vec!["10.96.0.53".into()]),
            searches: Some(vec!["corp.example".into()]),
            options: Some(vec![option("edns0", None), option("timeout", Some("2"))]),
        };
        let conf = pod_resolv_conf(&spec(Some("None"), Some(extra)), "shop", DNS, "cluster.local");
        assert_eq!(
            conf,
            Ok(own("search corp.example\nnameserver 10.96.0.53\noptions edns0 timeout:2\n"))
        );
        let empty = pod_resolv_conf(&spec(Some("None"), None), "shop", DNS, "cluster.local");
        assert_eq!(empty, Ok(own("")), "nothing asked, nothing given");
    }

    #[test]
    fn dns_config_extends_cluster_first_without_duplicates_and_overrides_options() {
        let extra = PodDNSConfig {
            nameservers: Some(vec!["10.96.0.10".into(), "10.96.0.11".into()]),
            searches: Some(vec!["svc.cluster.local".into(), "extra.example".into()]),
            options: Some(vec![option("ndots", Some("2")), option("single-request", None)]),
        };
        let conf = pod_resolv_conf(&spec(None, Some(extra)), "shop", DNS, "cluster.local");
        assert_eq!(
            conf,
            Ok(own(concat!(
                "search shop.svc.cluster.local svc.cluster.local cluster.local extra.example\n",
                "nameserver 10.96.0.10\n",
                "nameserver 10.96.0.11\n",
                "options ndots:2 single-request\n",
            )))
        );
    }

    #[test]
    fn more_nameservers_and_searches_than_the_resolver_reads_are_dropped() {
        let extra = PodDNSConfig {
            nameservers: Some((1..=5).map(|i| format!("10.0.0.{i}")).collect()),
            searches: Some((0..40).map(|i| format!("s{i}.example")).collect()),
            options: None,
        };
        let Ok(PodResolvConf::Own(text)) =
            pod_resolv_conf(&spec(None, Some(extra)), "shop", DNS, "cluster.local")
        else {
            panic!("an own file expected");
        };
        assert_eq!(text.matches("nameserver ").count(), 3);
        assert!(text.contains("nameserver 10.96.0.10\n"), "the cluster DNS comes first: {text}");
        let searches = text.lines().find(|l| l.starts_with("search ")).unwrap();
        assert_eq!(searches.split_whitespace().count() - 1, 32);
    }

    #[test]
    fn unknown_policies_and_nameless_options_are_refused() {
        assert!(pod_resolv_conf(&spec(Some("Cluster"), None), "a", DNS, "cluster.local").is_err());
        let extra =
            PodDNSConfig { options: Some(vec![option("", Some("1"))]), ..Default::default() };
        assert!(pod_resolv_conf(&spec(None, Some(extra)), "a", DNS, "cluster.local").is_err());
    }
}
