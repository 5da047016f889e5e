//! Benchmarks strait ships. Each prints its figures beside a baseline measured in the same run
//! on the same machine; none asserts a time (the machine is shared and noisy).

use std::{
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Timings of bringing a lab up (until every node is Ready) and down again.
#[derive(Debug)]
pub struct LabUpDownReport {
    pub nodes: usize,
    pub up: Vec<Duration>,
    pub down: Vec<Duration>,
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
        writeln!(f, "  lab up (until every node is Ready): {}", summary(&self.up))?;
        write!(f, "  lab down (every trace removed):     {}", summary(&self.down))
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
    };
    let mut report = LabUpDownReport { nodes, up: Vec::new(), down: Vec::new() };
    for run in 0..runs.max(1) {
        let started = Instant::now();
        let up = crate::lab::up(&options).await;
        report.up.push(started.elapsed());
        let started = Instant::now();
        let down = crate::lab::down(&name);
        report.down.push(started.elapsed());
        up.with_context(|| format!("run {run}: lab up"))?;
        down.with_context(|| format!("run {run}: lab down"))?;
        eprintln!(
            "run {}/{}: up {:.3}s, down {:.3}s",
            run + 1,
            runs,
            report.up[run].as_secs_f64(),
            report.down[run].as_secs_f64()
        );
    }
    Ok(report)
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
