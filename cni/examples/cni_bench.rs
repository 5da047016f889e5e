//! Runs the CNI benchmark from the command line until `strait bench cni` is wired:
//!
//! ```text
//! cargo run --release -p strait-cni --example cni_bench -- \
//!     --strait-cni target/release/strait-cni [--adds 200] [--json]
//! ```
use anyhow::{Context as _, bail};
use strait_cni::bench::{CniBenchOptions, run_cni_bench};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut strait_cni = None;
    let mut adds = None;
    let mut json = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--strait-cni" => strait_cni = args.next(),
            "--adds" => adds = Some(args.next().context("--adds needs a number")?.parse()?),
            "--json" => json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let strait_cni = strait_cni.context("--strait-cni <path> is required")?;
    let mut options = CniBenchOptions::new(strait_cni);
    if let Some(adds) = adds {
        options.adds = adds;
    }
    let report = run_cni_bench(&options)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
