//! `strait bench cni`: CNI ADD and DEL latency of strait-cni against the reference `bridge` +
//! `host-local` plugins, measured in the same run, on the same machine, in namespaces the bench
//! makes and removes itself.
//!
//! Each plugin runs as a runtime runs it: a fresh process per call, `CNI_*` variables, the
//! configuration on stdin, inside the bench's "node" namespace (joined with setns(2) between
//! fork and exec). Latency is wall time from spawn to exit. For every plugin and concurrency
//! the bench makes a fresh node namespace, does N ADDs (each into its own pod namespace) with
//! `concurrency` callers, then the N DELs the same way.
//!
//! Safety: nothing is sent anywhere. The reference bridge and its gateway address live only in
//! the bench's node namespace; the bench checks afterwards that the root namespace's
//! `ip_forward` is what it was.

use std::{
    fmt,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use strait_dataplane::netns::{NetNs, named_path};

/// What to measure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniBenchOptions {
    /// The `strait-cni` binary to measure.
    pub strait_cni: PathBuf,
    /// Where the reference plugins live (`bridge`, `host-local`).
    pub reference_plugin_dir: PathBuf,
    /// ADDs (and as many DELs) per plugin and concurrency.
    pub adds: usize,
    /// Numbers of concurrent callers to measure at.
    pub concurrencies: Vec<usize>,
}

impl CniBenchOptions {
    pub fn new(strait_cni: impl Into<PathBuf>) -> Self {
        Self {
            strait_cni: strait_cni.into(),
            reference_plugin_dir: PathBuf::from("/usr/lib/cni"),
            adds: 200,
            concurrencies: vec![1, 16],
        }
    }
}

/// Latency percentiles of one kind of call, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Calls completed per second of wall time over the whole phase.
    pub calls_per_second: f64,
}

/// One plugin at one concurrency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginMeasurement {
    pub plugin: String,
    pub concurrency: usize,
    pub add: LatencySummary,
    pub del: LatencySummary,
}

/// strait-cni divided by the reference, at one concurrency: below 1 means strait is faster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyRatio {
    pub concurrency: usize,
    pub add_p50: f64,
    pub add_p99: f64,
    pub del_p50: f64,
    pub del_p99: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CniBenchReport {
    pub adds_per_run: usize,
    pub kernel: String,
    pub cpus: usize,
    pub measurements: Vec<PluginMeasurement>,
    pub ratios: Vec<LatencyRatio>,
}

pub const STRAIT_PLUGIN: &str = "strait-cni";
pub const REFERENCE_PLUGIN: &str = "bridge+host-local";

/// Runs the whole benchmark. Needs root (namespaces, links).
pub fn run_cni_bench(options: &CniBenchOptions) -> anyhow::Result<CniBenchReport> {
    ensure!(options.adds > 0, "the bench needs at least one ADD");
    ensure!(
        options.concurrencies.iter().all(|c| *c > 0),
        "concurrencies must be at least 1, got {:?}",
        options.concurrencies
    );
    ensure!(
        options.strait_cni.is_file(),
        "strait-cni binary {} not found",
        options.strait_cni.display()
    );
    for plugin in ["bridge", "host-local"] {
        let path = options.reference_plugin_dir.join(plugin);
        ensure!(
            path.is_file(),
            "reference plugin {} not found (Debian: apt-get install containernetworking-plugins)",
            path.display()
        );
    }
    // Plugins run with cwd `/`, as runtimes do not promise any; a relative path would miss.
    let strait_cni = options.strait_cni.canonicalize().with_context(|| {
        format!("resolving the strait-cni path {}", options.strait_cni.display())
    })?;
    let options = &CniBenchOptions { strait_cni, ..options.clone() };
    let root_forwarding = read_root_ip_forward()?;

    let pods: Vec<BenchNamespace> = (0..options.adds)
        .map(|n| BenchNamespace::create(&format!("pod{n}")))
        .collect::<anyhow::Result<_>>()?;
    let mut measurements = Vec::new();
    for &concurrency in &options.concurrencies {
        for plugin in [STRAIT_PLUGIN, REFERENCE_PLUGIN] {
            let measured = measure(options, plugin, concurrency, &pods)
                .with_context(|| format!("measuring {plugin} at concurrency {concurrency}"))?;
            measurements.push(measured);
        }
    }
    drop(pods);

    let after = read_root_ip_forward()?;
    ensure!(
        after == root_forwarding,
        "the root namespace's ip_forward changed from {root_forwarding} to {after} during the \
         bench: a plugin escaped its namespace"
    );

    let ratios = options
        .concurrencies
        .iter()
        .filter_map(|&concurrency| {
            let find = |plugin: &str| {
                measurements.iter().find(|m| m.plugin == plugin && m.concurrency == concurrency)
            };
            let (strait, reference) = (find(STRAIT_PLUGIN)?, find(REFERENCE_PLUGIN)?);
            Some(LatencyRatio {
                concurrency,
                add_p50: strait.add.p50_ms / reference.add.p50_ms,
                add_p99: strait.add.p99_ms / reference.add.p99_ms,
                del_p50: strait.del.p50_ms / reference.del.p50_ms,
                del_p99: strait.del.p99_ms / reference.del.p99_ms,
            })
        })
        .collect();
    Ok(CniBenchReport {
        adds_per_run: options.adds,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        measurements,
        ratios,
    })
}

fn read_root_ip_forward() -> anyhow::Result<String> {
    // Read from this thread, which never leaves the namespace the bench started in.
    Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .context("reading ip_forward of the bench's own namespace")?
        .trim()
        .to_owned())
}

/// A namespace the bench made, removed on drop (also when the bench fails half-way).
struct BenchNamespace {
    ns: Option<NetNs>,
    name: String,
}

impl BenchNamespace {
    fn create(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "strait-bench-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = NetNs::create(&name).with_context(|| format!("creating namespace {name}"))?;
        Ok(Self { ns: Some(ns), name })
    }

    fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("open until drop")
    }

    fn path(&self) -> PathBuf {
        named_path(&self.name)
    }
}

impl Drop for BenchNamespace {
    fn drop(&mut self) {
        self.ns.take();
        if let Err(e) = NetNs::delete(&self.name) {
            eprintln!("strait bench cni: removing namespace {}: {e}", self.name);
        }
    }
}

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "strait-bench-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to call one plugin.
struct PluginCall {
    binary: PathBuf,
    config: String,
    cni_path: String,
}

fn plugin_call(
    options: &CniBenchOptions,
    plugin: &str,
    data_dir: &Path,
) -> anyhow::Result<PluginCall> {
    let cni_path = options.reference_plugin_dir.to_string_lossy().into_owned();
    // Both get a /16 so that any N up to 65k fits, and MTU 1500.
    let (binary, config) = match plugin {
        STRAIT_PLUGIN => (
            options.strait_cni.clone(),
            json!({
                "cniVersion": "1.0.0", "name": "strait-bench", "type": "strait-cni",
                "mtu": 1500,
                "ipam": { "subnet": "10.100.0.0/16", "dataDir": data_dir },
            }),
        ),
        REFERENCE_PLUGIN => (
            options.reference_plugin_dir.join("bridge"),
            json!({
                "cniVersion": "1.0.0", "name": "strait-bench-ref", "type": "bridge",
                "bridge": "benchbr0", "isGateway": true, "ipMasq": false, "mtu": 1500,
                "ipam": { "type": "host-local", "subnet": "10.101.0.0/16", "dataDir": data_dir },
            }),
        ),
        other => bail!("unknown plugin {other}"),
    };
    Ok(PluginCall { binary, config: config.to_string(), cni_path })
}

fn measure(
    options: &CniBenchOptions,
    plugin: &str,
    concurrency: usize,
    pods: &[BenchNamespace],
) -> anyhow::Result<PluginMeasurement> {
    let node = BenchNamespace::create("node")?;
    set_loopback_up(&node.name).context("setting lo up in the node namespace")?;
    let data = ScratchDir::create("data")?;
    let call = plugin_call(options, plugin, &data.0)?;

    let add = run_phase(&node, &call, "ADD", concurrency, pods)?;
    let del = run_phase(&node, &call, "DEL", concurrency, pods)?;
    Ok(PluginMeasurement { plugin: plugin.to_owned(), concurrency, add, del })
}

fn set_loopback_up(namespace: &str) -> std::io::Result<()> {
    let status = Command::new("ip").args(["-n", namespace, "link", "set", "lo", "up"]).status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other(format!("ip: {status}"))) }
}

/// Runs the verb once per pod with `concurrency` callers and summarises the latencies.
fn run_phase(
    node: &BenchNamespace,
    call: &PluginCall,
    verb: &str,
    concurrency: usize,
    pods: &[BenchNamespace],
) -> anyhow::Result<LatencySummary> {
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(pods.len()));
    let failure = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.min(pods.len()) {
            scope.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= pods.len() || failure.lock().is_ok_and(|f| f.is_some()) {
                        break;
                    }
                    match invoke(node, call, verb, &format!("bench-{n}"), &pods[n]) {
                        Ok(latency) => {
                            if let Ok(mut all) = latencies.lock() {
                                all.push(latency);
                            }
                        }
                        Err(error) => {
                            if let Ok(mut slot) = failure.lock() {
                                slot.get_or_insert(error);
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    if let Some(error) = failure.into_inner().map_err(|_| anyhow!("a caller panicked"))? {
        return Err(error);
    }
    let latencies = latencies.into_inner().map_err(|_| anyhow!("a caller panicked"))?;
    Ok(summarise(latencies, wall))
}

/// One plugin call, timed from spawn to exit.
fn invoke(
    node: &BenchNamespace,
    call: &PluginCall,
    verb: &str,
    container_id: &str,
    pod: &BenchNamespace,
) -> anyhow::Result<Duration> {
    let node_fd = node.ns().fd().as_raw_fd();
    let mut command = Command::new(&call.binary);
    command
        .env_clear()
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &call.cni_path)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setns(2), which is async-signal-safe, runs between fork and exec; the
    // descriptor is open in the child until exec closes it.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(node_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child =
        command.spawn().with_context(|| format!("spawning {}", call.binary.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(call.config.as_bytes()).context("writing the config to the plugin")?;
    }
    let output = child.wait_with_output().context("waiting for the plugin")?;
    let latency = started.elapsed();
    if !output.status.success() {
        let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        bail!(
            "{verb} {container_id} failed ({}): {stdout} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(latency)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarise(mut latencies: Vec<Duration>, wall: Duration) -> LatencySummary {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    LatencySummary {
        calls: latencies.len(),
        p50_ms: ms(percentile(&latencies, 0.50)),
        p99_ms: ms(percentile(&latencies, 0.99)),
        max_ms: ms(latencies.last().copied().unwrap_or_default()),
        calls_per_second: latencies.len() as f64 / wall.as_secs_f64().max(f64::EPSILON),
    }
}

impl fmt::Display for CniBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CNI ADD/DEL latency, {} calls each, kernel {}, {} CPUs (wall time per plugin \
             process, spawn to exit)",
            self.adds_per_run, self.kernel, self.cpus
        )?;
        writeln!(
            f,
            "{:<18} {:>4} | {:>9} {:>9} {:>9} {:>8} | {:>9} {:>9} {:>9} {:>8}",
            "plugin",
            "conc",
            "ADD p50",
            "ADD p99",
            "ADD max",
            "ADD/s",
            "DEL p50",
            "DEL p99",
            "DEL max",
            "DEL/s"
        )?;
        for m in &self.measurements {
            writeln!(
                f,
                "{:<18} {:>4} | {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>8.1} | {:>7.2}ms {:>7.2}ms \
                 {:>7.2}ms {:>8.1}",
                m.plugin,
                m.concurrency,
                m.add.p50_ms,
                m.add.p99_ms,
                m.add.max_ms,
                m.add.calls_per_second,
                m.del.p50_ms,
                m.del.p99_ms,
                m.del.max_ms,
                m.del.calls_per_second
            )?;
        }
        writeln!(f, "strait-cni / {REFERENCE_PLUGIN} (below 1.00: strait is faster)")?;
        for r in &self.ratios {
            writeln!(
                f,
                "  concurrency {:>3}: ADD p50 {:.2}  ADD p99 {:.2}  DEL p50 {:.2}  DEL p99 {:.2}",
                r.concurrency, r.add_p50, r.add_p99, r.del_p50, r.del_p99
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.50), Duration::from_millis(100));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(198));
        assert_eq!(percentile(&samples[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn a_summary_reports_throughput_over_the_wall_time() {
        let summary = summarise(vec![Duration::from_millis(4); 10], Duration::from_secs(2));
        assert_eq!(summary.calls, 10);
        assert!((summary.calls_per_second - 5.0).abs() < 1e-9);
        assert!((summary.p50_ms - 4.0).abs() < 1e-9);
    }
}
