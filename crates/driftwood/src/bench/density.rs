//! `driftwood bench density`: how many live actors with N-token contexts fit in a memory budget on the
//! zero-copy path vs a copy path that keeps a second, host-side copy of each actor's KV cache (what a runtime
//! does when guest memory and compute memory are separate), and how hibernated actors store and wake: the
//! resident memory a woken actor takes against the bytes its snapshot stores (a restore writes only the stored
//! pages, so the two should be close; bar: at most 1.5×).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Output, emit, median};
use crate::llm::{bundled_model_dir, load_model};
use driftwood_host::{Actor, ActorLimits, ActorStore, LogMode, Runtime, RuntimeConfig};
use driftwood_memory::rss::resident_bytes;

/// Arguments of `driftwood bench density`.
#[derive(clap::Args, Debug)]
pub struct DensityArgs {
    /// Model directory (default: the bundled model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens of context each actor holds.
    #[arg(long, default_value_t = 512)]
    context: u32,
    /// Live actors measured per path.
    #[arg(long, default_value_t = 16)]
    actors: u32,
    /// Memory budget the fit is computed for, in MiB.
    #[arg(long, default_value_t = 4096)]
    budget_mib: u64,
    /// Actors hibernated and woken for the latency figures.
    #[arg(long, default_value_t = 64)]
    hibernated: u32,
    /// KV cache dtype of the actors: f32 or bf16 (default: the CPU backend's, bf16).
    #[arg(long, value_parser = crate::llm::parse_kv_dtype)]
    kv_dtype: Option<driftwood_backend::DType>,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct DensityResults {
    model: String,
    context: u32,
    kv_dtype: &'static str,
    /// KV cache bytes one token takes in `kv_dtype`.
    kv_bytes_per_token: usize,
    kv_bytes_per_actor: u64,
    budget_mib: u64,
    zero_copy_bytes_per_actor: f64,
    copy_path_bytes_per_actor: f64,
    zero_copy_actors_in_budget: u64,
    copy_path_actors_in_budget: u64,
    density_ratio: f64,
    hibernated_actors: u32,
    hibernated_bytes_per_actor: f64,
    wake_ms_p50: f64,
    wake_ms_p99: f64,
    /// Linear memory each hibernated actor had.
    hibernated_memory_bytes_per_actor: f64,
    /// Resident memory each woken actor adds (all hibernated actors woken and kept alive; RSS delta / count).
    woken_resident_bytes_per_actor: f64,
    /// `woken_resident_bytes_per_actor / hibernated_bytes_per_actor`.
    woken_resident_to_stored: f64,
    /// The bar for `woken_resident_to_stored`.
    woken_resident_to_stored_max: f64,
    woken_resident_ok: bool,
}

/// Most resident memory a woken actor may take per byte its snapshot stores.
const WOKEN_RESIDENT_TO_STORED_MAX: f64 = 1.5;

fn rss() -> anyhow::Result<f64> {
    resident_bytes().map(|b| b as f64).ok_or_else(|| anyhow::anyhow!("this platform does not report RSS"))
}

fn filled_actor(runtime: &Runtime, context: u32) -> anyhow::Result<Actor> {
    let mut actor = runtime.instantiate(driftwood_actors::CHAT)?;
    actor.call::<u32, ()>("init", context)?;
    let n: i32 = actor.call("fill", context)?;
    anyhow::ensure!(n == context as i32, "context {context} does not fit the model");
    Ok(actor)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: &DensityArgs) -> anyhow::Result<()> {
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    let runtime = Runtime::new(RuntimeConfig {
        log: LogMode::Capture,
        limits: ActorLimits { memory_bytes: 4 << 30, deadline: Duration::from_secs(3600), ..Default::default() },
        kv_dtype: args.kv_dtype,
        ..Default::default()
    })?;
    let model = load_model(&dir)?;
    let kv_bytes_per_token = model.kv_bytes(1, runtime.kv_dtype());
    runtime.register_model("default", model);
    // Warm-up: compile the module, touch the weights, size the thread pool.
    drop(filled_actor(&runtime, args.context)?);

    // Zero-copy path: the KV cache lives only in each actor's memory.
    let before = rss()?;
    let mut live: Vec<Actor> =
        (0..args.actors).map(|_| filled_actor(&runtime, args.context)).collect::<Result<_, _>>()?;
    let zero_copy = (rss()? - before) / args.actors as f64;
    // Copy path: the same actors, plus the host-side copy of each KV cache a copying runtime keeps.
    let before = rss()?;
    let mut copies = vec![];
    let mut kv_bytes = 0u64;
    for actor in &mut live {
        let offset: u32 = actor.call("kv_region", 0u32)?;
        let bytes: u32 = actor.call("kv_region", 1u32)?;
        kv_bytes = bytes as u64;
        let mut copy = vec![0u8; bytes as usize];
        actor.read_memory(offset as usize, &mut copy)?;
        copies.push(copy);
    }
    let copy_path = zero_copy + (rss()? - before) / args.actors as f64;
    drop(copies);
    drop(live);

    // Hibernation: snapshot, release, wake.
    let tmp = tempfile::tempdir()?;
    let store = ActorStore::open(tmp.path())?;
    let mut stored = 0u64;
    let mut memory = 0u64;
    for i in 0..args.hibernated {
        let mut actor = Some(filled_actor(&runtime, args.context)?);
        let h = store.hibernate(&format!("a{i}"), &mut actor)?;
        stored += h.file_bytes;
        memory += h.memory_bytes;
    }
    let mut wake = vec![];
    for i in 0..args.hibernated {
        let t = Instant::now();
        let actor = store.wake(&runtime, &format!("a{i}"), driftwood_actors::CHAT)?;
        wake.push(t.elapsed().as_secs_f64() * 1e3);
        drop(actor);
    }
    wake.sort_by(f64::total_cmp);
    // Resident memory after wake: every hibernated actor woken and kept alive at once.
    let before = rss()?;
    let woken: Vec<Actor> = (0..args.hibernated)
        .map(|i| store.wake(&runtime, &format!("a{i}"), driftwood_actors::CHAT))
        .collect::<Result<_, _>>()?;
    let woken_resident = (rss()? - before) / args.hibernated as f64;
    drop(woken);
    let stored_per_actor = stored as f64 / args.hibernated as f64;
    let woken_ratio = woken_resident / stored_per_actor;
    let budget = (args.budget_mib << 20) as f64;
    let results = DensityResults {
        model: dir.display().to_string(),
        context: args.context,
        kv_dtype: runtime.kv_dtype().name(),
        kv_bytes_per_token,
        kv_bytes_per_actor: kv_bytes,
        budget_mib: args.budget_mib,
        zero_copy_bytes_per_actor: zero_copy,
        copy_path_bytes_per_actor: copy_path,
        zero_copy_actors_in_budget: (budget / zero_copy) as u64,
        copy_path_actors_in_budget: (budget / copy_path) as u64,
        density_ratio: copy_path / zero_copy,
        hibernated_actors: args.hibernated,
        hibernated_bytes_per_actor: stored_per_actor,
        wake_ms_p50: median(&mut wake.clone()),
        wake_ms_p99: percentile(&wake, 0.99),
        hibernated_memory_bytes_per_actor: memory as f64 / args.hibernated as f64,
        woken_resident_bytes_per_actor: woken_resident,
        woken_resident_to_stored: woken_ratio,
        woken_resident_to_stored_max: WOKEN_RESIDENT_TO_STORED_MAX,
        woken_resident_ok: woken_ratio <= WOKEN_RESIDENT_TO_STORED_MAX,
    };
    eprintln!(
        "{}-token contexts: {:.1} MiB/actor zero-copy vs {:.1} MiB/actor with a KV copy → {} vs {} actors in {} MiB ({:.2}×); hibernated: {:.1} MiB/actor on disk, wake p50 {:.2} ms, p99 {:.2} ms",
        args.context,
        zero_copy / 1048576.0,
        copy_path / 1048576.0,
        results.zero_copy_actors_in_budget,
        results.copy_path_actors_in_budget,
        args.budget_mib,
        results.density_ratio,
        results.hibernated_bytes_per_actor / 1048576.0,
        results.wake_ms_p50,
        results.wake_ms_p99
    );
    eprintln!(
        "woken ({}-token conversation): {:.2} MiB resident/actor vs {:.2} MiB stored ({:.2}×, bar ≤ {WOKEN_RESIDENT_TO_STORED_MAX}×: {}); memory size {:.1} MiB/actor",
        args.context,
        woken_resident / 1048576.0,
        stored_per_actor / 1048576.0,
        woken_ratio,
        if results.woken_resident_ok { "ok" } else { "OVER" },
        results.hibernated_memory_bytes_per_actor / 1048576.0
    );
    let name = if runtime.kv_dtype() == driftwood_backend::DType::F32 { "density-cpu-f32kv" } else { "density-cpu" };
    emit("density", name, &args.output, results)
}
