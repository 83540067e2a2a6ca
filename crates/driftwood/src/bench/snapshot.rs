//! `driftwood bench snapshot`: what a conversation's state costs to save and restore, against re-running
//! its prompt. For each context length: save time and file size of a session snapshot, restore time into a
//! fresh actor, and re-prefill time (evaluating the same tokens from scratch); speedup = re-prefill / restore.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Output, emit, median};
use crate::llm::{bundled_model_dir, load_model};
use driftwood_backend::BackendKind;
use driftwood_host::{Actor, ActorLimits, LogMode, Runtime, RuntimeConfig};

/// Arguments of `driftwood bench snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Model directory (default: the bundled model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths to snapshot (longer than the model's context are skipped).
    #[arg(long, value_delimiter = ',', default_value = "24,256,1024,4096")]
    context: Vec<u32>,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Folder for the snapshot files (default: a temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Backend: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// Actor memory placement: host, or pinned / managed with the CUDA backend.
    #[arg(long, default_value = "host", value_parser = driftwood_memory::Placement::parse)]
    placement: driftwood_memory::Placement,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct Row {
    context: u32,
    file_bytes: u64,
    /// Until `session_save` returns to the guest: the snapshot is complete in a temporary file.
    save_ms: f64,
    /// Until that save is durable: synced and renamed over the session file (on a background thread).
    save_durable_ms: f64,
    restore_ms: f64,
    reprefill_ms: f64,
    speedup: f64,
}

#[derive(Serialize, Debug)]
struct SnapshotResults {
    model: String,
    backend: &'static str,
    rows: Vec<Row>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fresh(runtime: &Runtime, max_seq: u32) -> anyhow::Result<Actor> {
    let mut actor = runtime.instantiate(driftwood_actors::CHAT)?;
    actor.call::<u32, ()>("init", max_seq)?;
    Ok(actor)
}

fn check(actor: &mut Actor, what: &str, code: i32) -> anyhow::Result<()> {
    if code < 0 {
        let why = actor.take_host_error().unwrap_or_else(|| format!("code {code}"));
        anyhow::bail!("{what} failed: {why}");
    }
    Ok(())
}

pub fn run(args: &SnapshotArgs) -> anyhow::Result<()> {
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    let model = load_model(&dir)?;
    let max_position = model.config().max_position_embeddings as u32;
    let runtime = Runtime::new(RuntimeConfig {
        backend: args.backend,
        placement: args.placement,
        log: LogMode::Capture,
        limits: ActorLimits { memory_bytes: 4 << 30, deadline: Duration::from_secs(3600), ..Default::default() },
        batch_window: None,
        kv_dtype: None,
    })?;
    runtime.register_model("default", model);
    let tmp = tempfile::tempdir()?;
    let folder = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut rows = vec![];
    for &context in &args.context {
        if context > max_position {
            eprintln!("skipping context {context}: the model's context is {max_position}");
            continue;
        }
        let file = folder.join(format!("session-{context}.safetensors"));
        let (mut save, mut durable, mut restore, mut prefill) = (vec![], vec![], vec![], vec![]);
        for rep in 0..=args.reps {
            // Re-prefill: a fresh actor evaluates the context from scratch.
            let mut source = fresh(&runtime, context)?;
            let t = Instant::now();
            let filled: i32 = source.call("fill", context)?;
            let prefill_time = t.elapsed();
            check(&mut source, "prefill", filled)?;
            // Save that session.
            source.set_session_file(&file);
            let t = Instant::now();
            let saved: i32 = source.call("save_session", ())?;
            let save_time = t.elapsed();
            check(&mut source, "save", saved)?;
            source.settle_session_saves()?;
            let durable_time = t.elapsed();
            // Restore into another fresh actor.
            let mut target = fresh(&runtime, context)?;
            target.set_session_file(&file);
            let t = Instant::now();
            let restored: i32 = target.call("load_session", ())?;
            let restore_time = t.elapsed();
            check(&mut target, "restore", restored)?;
            if restored != context as i32 {
                anyhow::bail!("restored {restored} tokens, expected {context}");
            }
            if rep > 0 {
                prefill.push(ms(prefill_time));
                save.push(ms(save_time));
                durable.push(ms(durable_time));
                restore.push(ms(restore_time));
            }
        }
        let row = Row {
            context,
            file_bytes: std::fs::metadata(&file)?.len(),
            save_ms: median(&mut save),
            save_durable_ms: median(&mut durable),
            restore_ms: median(&mut restore),
            reprefill_ms: median(&mut prefill),
            speedup: median(&mut prefill) / median(&mut restore),
        };
        eprintln!(
            "context {context}: save {:.2} ms (durable {:.2} ms), {} bytes, restore {:.2} ms, re-prefill {:.1} ms → \
             restore {:.0}× faster",
            row.save_ms, row.save_durable_ms, row.file_bytes, row.restore_ms, row.reprefill_ms, row.speedup
        );
        rows.push(row);
    }
    let backend = driftwood_backend::Backend::name(runtime.device());
    let default_name = if backend == "cpu" { "snapshot-cpu" } else { "snapshot-cuda" };
    emit("snapshot", default_name, &args.output, SnapshotResults { model: dir.display().to_string(), backend, rows })
}
