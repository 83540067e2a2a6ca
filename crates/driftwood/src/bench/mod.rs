//! `driftwood bench …`: benchmarks that write JSON results under `bench/results/` (with machine, commit and
//! command), and `driftwood bench readme`, which regenerates the README's tables from those files.
//!
//! Speed claims are ratios measured side by side in one run on one machine; nothing here asserts a time.

mod abi;
mod decode;
mod density;
mod gpu;
mod matmul;
mod readme;
mod snapshot;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

/// The benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Cost of crossing the wasm→host boundary: a no-op call, and matmul 128/512/1024 called from an actor
    /// vs the same kernel called natively.
    Abi(abi::AbiArgs),
    /// CPU matmul GFLOP/s (f32, bf16) next to the `gemm` and `matrixmultiply` crates, same run.
    Matmul(matmul::MatmulArgs),
    /// Decode tokens/s (batch 1) inside an actor at given context lengths, with the bandwidth roofline.
    Decode(decode::DecodeArgs),
    /// Session snapshot save/restore time and size vs re-prefill, at several context lengths.
    Snapshot(snapshot::SnapshotArgs),
    /// Live actors per memory budget, zero-copy vs a copy path; hibernated actors' size and wake latency.
    Density(density::DensityArgs),
    /// The CUDA backend: logits vs the CPU, batch-1 decode ms/token per placement vs the floor, batched decode over
    /// a sweep of batch sizes.
    Gpu(gpu::GpuArgs),
    /// Regenerate the README's benchmark tables from bench/results/*.json.
    Readme(readme::ReadmeArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Abi(args) => abi::run(&args),
        BenchCommand::Matmul(args) => matmul::run(&args),
        BenchCommand::Decode(args) => decode::run(&args),
        BenchCommand::Snapshot(args) => snapshot::run(&args),
        BenchCommand::Density(args) => density::run(&args),
        BenchCommand::Gpu(args) => gpu::run(&args),
        BenchCommand::Readme(args) => readme::run(&args),
    }
}

/// Where a benchmark writes, shared by all of them.
#[derive(clap::Args, Debug)]
pub struct Output {
    /// File to write the JSON result to (default: bench/results/<bench>-<backend>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not write a file; print the JSON only.
    #[arg(long)]
    no_write: bool,
}

/// The median of `values` (sorted in place); NaN for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

/// What machine a result was measured on.
#[derive(Serialize, Debug)]
struct Machine {
    cpu: String,
    threads: usize,
    os: &'static str,
    arch: &'static str,
}

impl Machine {
    fn this() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
            .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        Machine { cpu, threads: rayon::current_num_threads(), os: std::env::consts::OS, arch: std::env::consts::ARCH }
    }
}

/// The envelope every result file has.
#[derive(Serialize, Debug)]
struct Envelope<'a, T: Serialize> {
    bench: &'a str,
    machine: Machine,
    commit: String,
    command: String,
    unix_time: u64,
    results: T,
}

fn commit() -> String {
    let rev = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!README.md"])
        .output();
    match (rev, dirty) {
        (Ok(rev), Ok(dirty)) if rev.status.success() => {
            let sha = String::from_utf8_lossy(&rev.stdout).trim().to_string();
            if dirty.stdout.is_empty() { sha } else { format!("{sha}-dirty") }
        }
        _ => "unknown".into(),
    }
}

/// Prints the result as JSON and writes it to `out` (or `bench/results/<default_name>.json`).
fn emit<T: Serialize>(bench: &str, default_name: &str, output: &Output, results: T) -> anyhow::Result<()> {
    let envelope = Envelope {
        bench,
        machine: Machine::this(),
        commit: commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        results,
    };
    let json = serde_json::to_string_pretty(&envelope)?;
    println!("{json}");
    if !output.no_write {
        let path =
            output.out.clone().unwrap_or_else(|| Path::new("bench/results").join(format!("{default_name}.json")));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
