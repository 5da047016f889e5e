//! Benchmarks strait ships. Each prints its figures beside a baseline measured in the same run
//! on the same machine; none asserts a time (the machine is shared and noisy).

pub mod api;
pub mod scheduler;
pub mod startup;

use std::{
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub mod kube_proxy;
pub mod lab;
pub mod pods;
pub mod services;
pub mod stats;
pub mod svg;
pub mod worker;

pub use pods::{PodsArgs, pods};
pub use services::{ServicesArgs, services};

/// Timings of bringing a lab up (until every node is Ready) and down again, beside the floor:
/// the same namespaces, bridge, veths and addresses made with iproute2 and nothing else.
#[derive(Debug)]
pub struct LabUpDownReport {
    pub nodes: usize,
    pub up: Vec<Duration>,
    pub down: Vec<Duration>,
    pub plumbing_up: Vec<Duration>,
    pub plumbing_down: Vec<Duration>,
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn summary(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    format!(
        "median {:>7.3}s  min {:>7.3}s  max {:>7.3}s",
        median.as_secs_f64(),
        min.as_secs_f64(),
        max.as_secs_f64()
    )
}

impl fmt::Display for LabUpDownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lab of {} nodes, {} runs", self.nodes, self.up.len())?;
        writeln!(f, "  lab up (until every node is Ready):     {}", summary(&self.up))?;
        writeln!(f, "  floor: same plumbing with iproute2:     {}", summary(&self.plumbing_up))?;
        writeln!(
            f,
            "  lab up / floor (median):                {:.2}",
            median(&self.up).as_secs_f64() / median(&self.plumbing_up).as_secs_f64()
        )?;
        writeln!(f, "  lab down (processes, names, pins, state): {}", summary(&self.down))?;
        writeln!(f, "  floor: ip netns del of the same:        {}", summary(&self.plumbing_down))?;
        write!(
            f,
            "  (namespaces are freed by the kernel after their names are gone, in both cases)"
        )
    }
}

/// Brings a lab of `nodes` nodes up and down `runs` times, under its own name.
pub async fn lab_up_down(
    nodes: usize,
    runs: usize,
    cni_plugin: &Path,
) -> anyhow::Result<LabUpDownReport> {
    let name = format!("bench-{}", std::process::id());
    let options = crate::lab::UpOptions {
        name: name.clone(),
        nodes,
        strait_exe: std::env::current_exe()?,
        cni_plugin: cni_plugin.to_owned(),
        ready_timeout: Duration::from_secs(120),
        controller_args: Vec::new(),
        agent_args: Vec::new(),
    };
    let mut report = LabUpDownReport {
        nodes,
        up: Vec::new(),
        down: Vec::new(),
        plumbing_up: Vec::new(),
        plumbing_down: Vec::new(),
    };
    for run in 0..runs.max(1) {
        let (up, down) = plumbing_floor(&name, nodes)?;
        report.plumbing_up.push(up);
        report.plumbing_down.push(down);
        let started = Instant::now();
        let up = crate::lab::up(&options).await;
        report.up.push(started.elapsed());
        let started = Instant::now();
        let down = crate::lab::down(&name);
        report.down.push(started.elapsed());
        up.with_context(|| format!("run {run}: lab up"))?;
        down.with_context(|| format!("run {run}: lab down"))?;
        eprintln!(
            "run {}/{}: up {:.3}s (floor {:.3}s), down {:.3}s (floor {:.3}s)",
            run + 1,
            runs,
            report.up[run].as_secs_f64(),
            report.plumbing_up[run].as_secs_f64(),
            report.down[run].as_secs_f64(),
            report.plumbing_down[run].as_secs_f64()
        );
    }
    Ok(report)
}

/// The lab's plumbing alone, the way an operator would make it by hand with iproute2: fabric
/// namespace and bridge, a namespace per node plugged in by a veth, addresses, links up,
/// forwarding on inside the nodes. Every name carries the bench lab's prefix and is removed.
fn plumbing_floor(lab: &str, nodes: usize) -> anyhow::Result<(Duration, Duration)> {
    let prefix = format!("{}floor-", crate::lab::netns_prefix(lab));
    let fabric = format!("{prefix}fabric");
    let node_ns = |i: usize| format!("{prefix}node-{i}");
    let mut commands: Vec<Vec<String>> = vec![
        split(&format!("netns add {fabric}")),
        split(&format!("-n {fabric} link set lo up")),
        split(&format!("-n {fabric} link add fabric0 type bridge")),
        split(&format!("-n {fabric} addr add 172.20.0.1/24 dev fabric0")),
        split(&format!("-n {fabric} link set fabric0 up")),
    ];
    for i in 1..=nodes {
        let ns = node_ns(i);
        let address = crate::lab::node_address(i);
        commands.push(split(&format!("netns add {ns}")));
        commands.push(split(&format!(
            "-n {fabric} link add node-{i} type veth peer name eth0 netns {ns}"
        )));
        commands.push(split(&format!("-n {fabric} link set node-{i} master fabric0 up")));
        commands.push(split(&format!("-n {ns} link set lo up")));
        commands.push(split(&format!("-n {ns} addr add {address}/24 dev eth0")));
        commands.push(split(&format!("-n {ns} link set eth0 up")));
        commands.push(split(&format!("netns exec {ns} sysctl -qw net.ipv4.ip_forward=1")));
    }
    let started = Instant::now();
    let built = commands.iter().try_for_each(|args| ip(args));
    let up = started.elapsed();
    let started = Instant::now();
    // Every namespace is deleted even if one deletion fails; the first failure is reported.
    let mut removed = Ok(());
    for ns in (1..=nodes).map(node_ns).chain(std::iter::once(fabric)) {
        let result = ip(&split(&format!("netns del {ns}")));
        if removed.is_ok() {
            removed = result;
        }
    }
    let down = started.elapsed();
    built?;
    removed?;
    Ok((up, down))
}

fn split(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}

fn ip(args: &[String]) -> anyhow::Result<()> {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    anyhow::ensure!(status.success(), "ip {} failed", args.join(" "));
    Ok(())
}

/// Options of `strait bench cni`.
#[derive(clap::Args, Debug)]
pub struct CniArgs {
    /// ADDs (and as many DELs) per plugin and concurrency.
    #[arg(long, default_value_t = 200)]
    pub adds: usize,
    /// Concurrent callers to measure at (repeatable).
    #[arg(long = "concurrency", default_values_t = [1, 16])]
    pub concurrencies: Vec<usize>,
    /// Where the reference `bridge` and `host-local` plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub reference_plugin_dir: std::path::PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// CNI ADD/DEL latency of strait-cni beside bridge + host-local, measured in the same run.
pub fn cni(args: &CniArgs, strait_cni: &Path) -> anyhow::Result<()> {
    let mut options = strait_cni::bench::CniBenchOptions::new(strait_cni);
    options.adds = args.adds;
    options.concurrencies = args.concurrencies.clone();
    options.reference_plugin_dir = args.reference_plugin_dir.clone();
    let report = strait_cni::bench::run_cni_bench(&options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
