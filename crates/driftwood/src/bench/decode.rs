//! `driftwood bench decode`: decode tokens/s, batch 1, inside an actor, at given context lengths, next to
//! the memory-bandwidth roofline measured in the same run (weight bytes per token / streaming-read speed).
//!
//! The actor (`bench_decode` of the default actor) prefills `context` tokens into a KV cache in its own
//! memory, then runs greedy decode steps; each step is a host call that computes on the guest's KV cache and
//! writes logits into guest memory, plus the guest's own argmax. Peers are measured by
//! `scripts/bench_decode.sh`, which runs this command beside them.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{Output, emit, median};
use crate::llm::{bundled_model_dir, load_model};
use driftwood_backend::{BackendKind, DType};
use driftwood_host::{ActorLimits, LogMode, Runtime, RuntimeConfig};

/// Arguments of `driftwood bench decode`.
#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Model directory (default: the bundled model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths (tokens already in the KV cache when decoding starts).
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    context: Vec<u32>,
    /// Decode steps timed per repetition.
    #[arg(long, default_value_t = 64)]
    steps: u32,
    /// Repetitions per context (median reported).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Backend: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// KV cache dtypes to measure, each at every context (f32, bf16; the CUDA backend runs bf16 only).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16", value_parser = crate::llm::parse_kv_dtype)]
    kv_dtype: Vec<DType>,
    /// Accepted for scripts: the JSON result is always printed on standard output (progress goes to standard
    /// error).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct Row {
    kv_dtype: &'static str,
    kv_bytes_per_token: usize,
    context: u32,
    decode_tokens_per_s: f64,
    ms_per_token: f64,
    forward_only_tokens_per_s: f64,
    prefill_tokens_per_s: f64,
}

#[derive(Serialize, Debug)]
struct DecodeResults {
    engine: &'static str,
    model: String,
    weights_dtype: String,
    backend: &'static str,
    weight_bytes_per_token: usize,
    read_bandwidth_gb_s: f64,
    roofline_tokens_per_s: f64,
    /// The CPU kernels' instruction sets (`DRIFTWOOD_CPU_ISA` sets them): decode's matrix-vector products.
    cpu_decode_path: &'static str,
    /// Prefill's matrix tiles and attention.
    cpu_prefill_path: &'static str,
    rows: Vec<Row>,
}

pub fn run(args: &DecodeArgs) -> anyhow::Result<()> {
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    let model = load_model(&dir)?;
    let weights_dtype = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("torch_dtype").or(v.get("dtype")).and_then(|d| d.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let weight_bytes = model.weight_bytes_per_token();
    let mut rows = vec![];
    let mut backend = "cpu";
    for &kv_dtype in &args.kv_dtype {
        let runtime = Runtime::new(RuntimeConfig {
            backend: args.backend,
            log: LogMode::Capture,
            limits: ActorLimits {
                memory_bytes: 4 << 30,
                deadline: std::time::Duration::from_secs(3600),
                ..Default::default()
            },
            kv_dtype: Some(kv_dtype),
            ..Default::default()
        })?;
        backend = driftwood_backend::Backend::name(runtime.device());
        runtime.register_model("default", model.clone());
        for &context in &args.context {
            rows.push(measure(&runtime, args, context)?);
        }
    }
    let bandwidth = driftwood_backend::cpu::stream_read_gb_s(1 << 30);
    let results = DecodeResults {
        engine: "driftwood",
        model: dir.display().to_string(),
        weights_dtype: weights_dtype.clone(),
        backend,
        weight_bytes_per_token: weight_bytes,
        read_bandwidth_gb_s: bandwidth,
        roofline_tokens_per_s: bandwidth * 1e9 / weight_bytes as f64,
        cpu_decode_path: driftwood_backend::cpu::kernel_paths().0,
        cpu_prefill_path: driftwood_backend::cpu::kernel_paths().1,
        rows,
    };
    eprintln!(
        "roofline: {:.0} MB of weights per token at {bandwidth:.1} GB/s = {:.1} tokens/s",
        weight_bytes as f64 / 1e6,
        results.roofline_tokens_per_s
    );
    emit("decode", &format!("decode-driftwood-{weights_dtype}"), &args.output, results)
}

/// One row: the chat actor's `bench_decode` at `context`, `args.reps` times after a warm-up, medians.
fn measure(runtime: &Runtime, args: &DecodeArgs, context: u32) -> anyhow::Result<Row> {
    let (mut decode, mut forward_only, mut prefill) = (vec![], vec![], vec![]);
    for rep in 0..=args.reps {
        let mut actor = runtime.instantiate(driftwood_actors::CHAT)?;
        let t = Instant::now();
        let steps: i32 = actor.call("bench_decode", (context, args.steps))?;
        let wall = t.elapsed().as_secs_f64();
        if steps != args.steps as i32 {
            anyhow::bail!("context {context} + {} steps does not fit the model (ran {steps})", args.steps);
        }
        let s = actor.inference_stats();
        if rep == 0 {
            continue; // warm-up
        }
        let decode_wall = wall - s.prefill_secs;
        decode.push(args.steps as f64 / decode_wall);
        forward_only.push(s.decode_tokens as f64 / s.decode_secs);
        prefill.push(s.prefill_tokens as f64 / s.prefill_secs);
    }
    let decode_tokens_per_s = median(&mut decode);
    let kv_dtype = runtime.kv_dtype();
    let model = runtime.models().get("default").ok_or_else(|| anyhow::anyhow!("the model is not registered"))?;
    let row = Row {
        kv_dtype: kv_dtype.name(),
        kv_bytes_per_token: model.kv_bytes(1, kv_dtype),
        context,
        decode_tokens_per_s,
        ms_per_token: 1e3 / decode_tokens_per_s,
        forward_only_tokens_per_s: median(&mut forward_only),
        prefill_tokens_per_s: median(&mut prefill),
    };
    eprintln!(
        "{kv_dtype} KV, context {context}: decode {:.1} tokens/s ({:.2} ms/token), prefill {:.0} tokens/s",
        row.decode_tokens_per_s, row.ms_per_token, row.prefill_tokens_per_s
    );
    Ok(row)
}
