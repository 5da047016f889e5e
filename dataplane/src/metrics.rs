//! The agent's metrics in the Prometheus text exposition format, version 0.0.4.
//!
//! Hand-written rather than taken from a client crate: the set is small and fixed, the
//! format is a page of rules, and the Rust Prometheus client crate writes OpenMetrics text,
//! not 0.0.4. What the agent counts as it works (services programmed, latencies, errors, DNS
//! answers) lives in atomics here; what only the kernel knows (drops, map fill, conntrack) is
//! read from the [`ScrapeSource`] when a scrape asks, and never otherwise.
//!
//! | metric | type | |
//! |---|---|---|
//! | `strait_services_programmed` | gauge | services whose frontends are in the datapath maps |
//! | `strait_service_backends_programmed` | gauge | backends written for them |
//! | `strait_service_programming_latency_seconds` | histogram | API change → map written |
//! | `strait_service_programming_errors_total` | counter | failed service map writes |
//! | `strait_datapath_drops_total{reason}` | counter | packets the datapath dropped (scrape) |
//! | `strait_bpf_map_entries{map}` | gauge | entries in each map (scrape) |
//! | `strait_bpf_map_capacity{map}` | gauge | `max_entries` of each map (scrape) |
//! | `strait_conntrack_entries` | gauge | connection-tracking entries (scrape) |
//! | `strait_dns_queries_total{rcode}` | counter | cluster DNS answers by response code |

use std::{
    fmt::Write as _,
    io,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

/// The content type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the programming latency buckets, in seconds: half a millisecond (a map
/// write right after the change) to five seconds (a stuck agent).
pub const PROGRAMMING_LATENCY_BUCKETS: [f64; 13] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Response codes the DNS query counter knows; anything else counts as `OTHER`. Every one is
/// exposed from the start, at zero, so that rates over them exist before the first error.
pub const DNS_RCODES: [&str; 8] =
    ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "OTHER"];

/// The fill of one BPF map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfMapStats {
    /// The map's name, the `map` label.
    pub map: String,
    pub entries: u64,
    /// Its `max_entries`.
    pub capacity: u64,
}

/// What the kernel knows, read when a scrape asks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrapeValues {
    /// Packets dropped by the datapath since it was loaded, by reason.
    pub datapath_drops: Vec<(String, u64)>,
    pub bpf_maps: Vec<BpfMapStats>,
    /// `None` when the conntrack table is not known (yet).
    pub conntrack_entries: Option<u64>,
}

/// Reads [`ScrapeValues`]; called on a blocking thread once per scrape.
pub type ScrapeSource = Box<dyn Fn() -> ScrapeValues + Send + Sync>;

/// The agent's metrics. Share it as `Arc<AgentMetrics>`; every method takes `&self`.
pub struct AgentMetrics {
    services_programmed: AtomicU64,
    service_backends_programmed: AtomicU64,
    programming_latency: Mutex<Histogram>,
    programming_errors: AtomicU64,
    dns_queries: [AtomicU64; DNS_RCODES.len()],
    scrape_source: RwLock<Option<ScrapeSource>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        Self {
            services_programmed: AtomicU64::new(0),
            service_backends_programmed: AtomicU64::new(0),
            programming_latency: Mutex::new(Histogram::new(&PROGRAMMING_LATENCY_BUCKETS)),
            programming_errors: AtomicU64::new(0),
            dns_queries: Default::default(),
            scrape_source: RwLock::new(None),
        }
    }

    pub fn set_services_programmed(&self, services: u64) {
        self.services_programmed.store(services, Ordering::Relaxed);
    }

    pub fn set_service_backends_programmed(&self, backends: u64) {
        self.service_backends_programmed.store(backends, Ordering::Relaxed);
    }

    /// Records the time from a service change seen by the API to its maps being written.
    pub fn observe_service_programming(&self, latency: Duration) {
        lock(&self.programming_latency).observe(latency.as_secs_f64());
    }

    pub fn count_service_programming_error(&self) {
        self.programming_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one DNS answer with response code `rcode` (a [`DNS_RCODES`] mnemonic).
    pub fn count_dns_query(&self, rcode: &str) {
        let index =
            DNS_RCODES.iter().position(|known| *known == rcode).unwrap_or(DNS_RCODES.len() - 1);
        self.dns_queries[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Sets where scrape-time values come from, replacing any earlier source.
    pub fn set_scrape_source(&self, source: ScrapeSource) {
        *self.scrape_source.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(source);
    }

    /// The exposition text: every metric, scrape-time ones read now.
    pub fn render(&self) -> String {
        let scraped = self
            .scrape_source
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|source| source())
            .unwrap_or_default();
        let mut out = Exposition::default();

        out.family(
            "strait_services_programmed",
            "gauge",
            "Services whose frontends are written to the datapath maps.",
        );
        out.sample(
            "strait_services_programmed",
            &[],
            self.services_programmed.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "strait_service_backends_programmed",
            "gauge",
            "Service backends written to the datapath maps.",
        );
        out.sample(
            "strait_service_backends_programmed",
            &[],
            self.service_backends_programmed.load(Ordering::Relaxed) as f64,
        );

        let name = "strait_service_programming_latency_seconds";
        out.family(
            name,
            "histogram",
            "Time from a service change in the API to its maps being written.",
        );
        lock(&self.programming_latency).write(&mut out, name);

        out.family(
            "strait_service_programming_errors_total",
            "counter",
            "Service changes whose map writes failed.",
        );
        out.sample(
            "strait_service_programming_errors_total",
            &[],
            self.programming_errors.load(Ordering::Relaxed) as f64,
        );

        out.family(
            "strait_datapath_drops_total",
            "counter",
            "Packets dropped by the datapath, by reason.",
        );
        for (reason, drops) in &scraped.datapath_drops {
            out.sample("strait_datapath_drops_total", &[("reason", reason)], *drops as f64);
        }
        out.family("strait_bpf_map_entries", "gauge", "Entries in each BPF map of the agent.");
        for map in &scraped.bpf_maps {
            out.sample("strait_bpf_map_entries", &[("map", &map.map)], map.entries as f64);
        }
        out.family(
            "strait_bpf_map_capacity",
            "gauge",
            "Maximum entries of each BPF map of the agent.",
        );
        for map in &scraped.bpf_maps {
            out.sample("strait_bpf_map_capacity", &[("map", &map.map)], map.capacity as f64);
        }
        out.family("strait_conntrack_entries", "gauge", "Connections tracked by the datapath.");
        if let Some(entries) = scraped.conntrack_entries {
            out.sample("strait_conntrack_entries", &[], entries as f64);
        }

        out.family("strait_dns_queries_total", "counter", "Cluster DNS answers, by response code.");
        for (rcode, count) in DNS_RCODES.iter().zip(&self.dns_queries) {
            out.sample(
                "strait_dns_queries_total",
                &[("rcode", rcode)],
                count.load(Ordering::Relaxed) as f64,
            );
        }
        out.text
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds valid numbers.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A histogram with fixed buckets. Observations are rare (one per service change), so one
/// lock keeps buckets, sum and count consistent with each other in every scrape.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    fn observe(&mut self, value: f64) {
        let bucket =
            self.bounds.iter().position(|bound| value <= *bound).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }

    fn write(&self, out: &mut Exposition, name: &str) {
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0;
        for (index, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = self.bounds.get(index).map_or_else(|| "+Inf".to_owned(), |b| format_value(*b));
            out.sample(&bucket_name, &[("le", &le)], cumulative as f64);
        }
        out.sample(&format!("{name}_sum"), &[], self.sum);
        out.sample(&format!("{name}_count"), &[], cumulative as f64);
    }
}

/// Text being written in the exposition format.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // In HELP, backslash and line feed are escaped; in label values also the double quote.
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let escaped = value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n");
                let _ = write!(self.text, "{label}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }
}

/// A sample value as the format spells it: Go's float syntax, `+Inf`, `-Inf`, `NaN`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
    } else {
        // Rust prints the shortest text that reads back as the same f64, without exponent.
        format!("{value}")
    }
}

/// Serves `GET /metrics` on `listener` until the future is dropped or the listener fails.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) -> io::Result<()> {
    let router = Router::new().route("/metrics", get(scrape)).with_state(metrics);
    axum::serve(listener, router).await
}

async fn scrape(State(metrics): State<Arc<AgentMetrics>>) -> impl IntoResponse {
    // The scrape source may walk BPF maps: keep that off the async workers.
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(text) => Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text)),
        Err(error) => {
            tracing::error!(%error, "rendering the metrics failed");
            Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc, time::Duration};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{
        AgentMetrics, BpfMapStats, CONTENT_TYPE, PROGRAMMING_LATENCY_BUCKETS, ScrapeValues, serve,
    };

    /// One sample line: name, labels, value.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A parsed exposition: the samples in order and each family's HELP and TYPE.
    #[derive(Debug, Default)]
    struct Parsed {
        samples: Vec<Sample>,
        types: BTreeMap<String, String>,
        helps: BTreeMap<String, String>,
    }

    impl Parsed {
        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            self.samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.len() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
                })
                .map(|s| s.value)
        }
    }

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses `name="value",…}` (what follows a `{`): the labels and the text after the `}`.
    fn parse_labels<'a>(mut text: &'a str, line: &str) -> (BTreeMap<String, String>, &'a str) {
        let mut labels = BTreeMap::new();
        loop {
            let (label, rest) =
                text.split_once("=\"").unwrap_or_else(|| panic!("label=\"…\" in {line}"));
            assert!(is_metric_name(label) && !label.contains(':'), "label {label:?} in {line}");
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => panic!("escape {other:?} in {line}"),
                    },
                    Some((index, '"')) => break index + 1,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line}"),
                }
            };
            assert!(labels.insert(label.to_owned(), value).is_none(), "label twice in {line}");
            let after = &rest[end..];
            if let Some(more) = after.strip_prefix(',') {
                text = more;
            } else if let Some(tail) = after.strip_prefix('}') {
                return (labels, tail);
            } else {
                panic!("{after:?} after a label value in {line}");
            }
        }
    }

    /// Parses the text format line by line the way a scraper does, and panics at the first
    /// line that breaks it: malformed names, labels or values, a sample before its family's
    /// TYPE, a family declared twice, a missing final line feed.
    fn parse(text: &str) -> Parsed {
        assert!(text.ends_with('\n'), "the last line ends with a line feed");
        let mut parsed = Parsed::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(is_metric_name(name), "{line}");
                assert!(
                    parsed.helps.insert(name.into(), help.into()).is_none(),
                    "HELP twice: {line}"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name type");
                assert!(is_metric_name(name), "{line}");
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind));
                assert!(parsed.helps.contains_key(name), "HELP comes before TYPE: {line}");
                assert!(
                    parsed.types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line}"
                );
                assert!(
                    !parsed.samples.iter().any(|s| s.name.starts_with(name)),
                    "TYPE after samples of its family: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
            let name_end = line.find(['{', ' ']).expect("a value after the name");
            let name = &line[..name_end];
            assert!(is_metric_name(name), "{line}");
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(after_brace) = rest.strip_prefix('{') {
                (labels, rest) = parse_labels(after_brace, line);
            }
            let value = rest.strip_prefix(' ').expect("a space before the value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix).filter(|base| {
                        parsed.types.get(*base).map(String::as_str) == Some("histogram")
                    })
                })
                .unwrap_or(name);
            assert!(parsed.types.contains_key(family), "sample before its TYPE: {line}");
            parsed.samples.push(Sample { name: name.to_owned(), labels, value });
        }
        parsed
    }

    fn scrape_values() -> ScrapeValues {
        ScrapeValues {
            datapath_drops: vec![("no_backend".into(), 7), ("policy \"deny\"\\all\nnow".into(), 2)],
            bpf_maps: vec![
                BpfMapStats { map: "services_v1".into(), entries: 3, capacity: 65536 },
                BpfMapStats { map: "backends_v1".into(), entries: 9, capacity: 262144 },
            ],
            conntrack_entries: Some(42),
        }
    }

    #[test]
    fn exposition_parses_and_carries_every_metric_with_its_type() {
        let metrics = AgentMetrics::new();
        metrics.set_services_programmed(3);
        metrics.set_service_backends_programmed(9);
        metrics.count_service_programming_error();
        metrics.count_dns_query("NOERROR");
        metrics.count_dns_query("NOERROR");
        metrics.count_dns_query("NXDOMAIN");
        metrics.count_dns_query("YXDOMAIN");
        metrics.set_scrape_source(Box::new(scrape_values));
        let parsed = parse(&metrics.render());

        let expected_types = [
            ("strait_services_programmed", "gauge"),
            ("strait_service_backends_programmed", "gauge"),
            ("strait_service_programming_latency_seconds", "histogram"),
            ("strait_service_programming_errors_total", "counter"),
            ("strait_datapath_drops_total", "counter"),
            ("strait_bpf_map_entries", "gauge"),
            ("strait_bpf_map_capacity", "gauge"),
            ("strait_conntrack_entries", "gauge"),
            ("strait_dns_queries_total", "counter"),
        ];
        let types: Vec<(&str, &str)> =
            parsed.types.iter().map(|(name, kind)| (name.as_str(), kind.as_str())).collect();
        let mut expected = expected_types.to_vec();
        expected.sort();
        assert_eq!(types, expected);
        for (name, kind) in &parsed.types {
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: only counters end in _total"
            );
            assert!(!parsed.helps[name].is_empty(), "{name} has a HELP text");
        }

        assert_eq!(parsed.value("strait_services_programmed", &[]), Some(3.0));
        assert_eq!(parsed.value("strait_service_backends_programmed", &[]), Some(9.0));
        assert_eq!(parsed.value("strait_service_programming_errors_total", &[]), Some(1.0));
        assert_eq!(
            parsed.value("strait_datapath_drops_total", &[("reason", "no_backend")]),
            Some(7.0)
        );
        assert_eq!(
            parsed.value("strait_datapath_drops_total", &[("reason", "policy \"deny\"\\all\nnow")]),
            Some(2.0),
            "label values with quotes, backslashes and line feeds survive escaping"
        );
        assert_eq!(parsed.value("strait_bpf_map_entries", &[("map", "backends_v1")]), Some(9.0));
        assert_eq!(
            parsed.value("strait_bpf_map_capacity", &[("map", "services_v1")]),
            Some(65536.0)
        );
        assert_eq!(parsed.value("strait_conntrack_entries", &[]), Some(42.0));
        assert_eq!(parsed.value("strait_dns_queries_total", &[("rcode", "NOERROR")]), Some(2.0));
        assert_eq!(parsed.value("strait_dns_queries_total", &[("rcode", "NXDOMAIN")]), Some(1.0));
        assert_eq!(parsed.value("strait_dns_queries_total", &[("rcode", "OTHER")]), Some(1.0));
        assert_eq!(
            parsed.value("strait_dns_queries_total", &[("rcode", "SERVFAIL")]),
            Some(0.0),
            "known codes are exposed before they happen"
        );
    }

    #[test]
    fn scrape_time_metrics_are_read_at_each_scrape_and_absent_without_a_source() {
        let metrics = AgentMetrics::new();
        let parsed = parse(&metrics.render());
        assert_eq!(parsed.types["strait_conntrack_entries"], "gauge", "declared even when empty");
        assert_eq!(parsed.value("strait_conntrack_entries", &[]), None);
        assert!(!parsed.samples.iter().any(|s| s.name == "strait_bpf_map_entries"));

        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = scrapes.clone();
        metrics.set_scrape_source(Box::new(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            ScrapeValues { conntrack_entries: Some(n * 10), ..Default::default() }
        }));
        assert_eq!(
            scrapes.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "nothing read until scraped"
        );
        assert_eq!(parse(&metrics.render()).value("strait_conntrack_entries", &[]), Some(10.0));
        assert_eq!(parse(&metrics.render()).value("strait_conntrack_entries", &[]), Some(20.0));
    }

    #[test]
    fn latency_histogram_buckets_are_cumulative_with_matching_count_and_sum() {
        let metrics = AgentMetrics::new();
        let observations = [0.0001, 0.0005, 0.003, 0.003, 0.2, 4.0, 9.0];
        for seconds in observations {
            metrics.observe_service_programming(Duration::from_secs_f64(seconds));
        }
        let parsed = parse(&metrics.render());
        let name = "strait_service_programming_latency_seconds";
        let buckets: Vec<(String, f64)> = parsed
            .samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .map(|s| (s.labels["le"].clone(), s.value))
            .collect();
        let mut expected_bounds: Vec<String> =
            PROGRAMMING_LATENCY_BUCKETS.iter().map(|b| b.to_string()).collect();
        expected_bounds.push("+Inf".into());
        assert_eq!(buckets.iter().map(|(le, _)| le.clone()).collect::<Vec<_>>(), expected_bounds);
        assert_eq!(expected_bounds[0], "0.0005");
        assert_eq!(expected_bounds[10], "1");
        for (le, count) in &buckets {
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().unwrap() };
            let expected = observations.iter().filter(|o| **o <= bound).count() as f64;
            assert_eq!(*count, expected, "bucket le={le} counts every observation up to it");
        }
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {buckets:?}");
        let count = parsed.value(&format!("{name}_count"), &[]).unwrap();
        assert_eq!(count, observations.len() as f64);
        assert_eq!(buckets.last().unwrap().1, count, "+Inf equals _count");
        let sum = parsed.value(&format!("{name}_sum"), &[]).unwrap();
        assert!((sum - observations.iter().sum::<f64>()).abs() < 1e-9, "sum {sum}");
    }

    async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.expect("connecting");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: strait\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        tokio::time::timeout(Duration::from_secs(5), exchange).await.expect("an answer in time")
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_text_format_on_get_metrics() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback");
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(AgentMetrics::new());
        metrics.set_services_programmed(5);
        let server = tokio::spawn(serve(listener, metrics.clone()));

        let response = http_get(address, "/metrics").await;
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.lines().any(|l| l.eq_ignore_ascii_case(&format!("content-type: {CONTENT_TYPE}"))),
            "{head}"
        );
        assert_eq!(parse(body).value("strait_services_programmed", &[]), Some(5.0));

        let missing = http_get(address, "/nothing").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}
