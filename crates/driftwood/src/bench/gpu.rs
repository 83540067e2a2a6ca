//! `driftwood bench gpu`: the CUDA backend against the CPU backend and the hardware limit, on one model.
//!
//! 1. Correctness: the same prompt through the CPU backend and the GPU (KV and logits in a region of the
//!    placement under test): max |Δlogit| after the prompt and the greedy continuation, token by token.
//! 2. Batch-1 decode: a prompt of `--prompt-tokens`, then `--gen-tokens` greedy steps; ms/token per placement,
//!    against the floor (weight bytes / measured device copy bandwidth).
//! 3. Batched decode, for each batch size B of `--batch` (a comma-separated sweep): B sequences with
//!    `--context`-token caches (managed placement) stepping together, `--batch-steps` steps timed (median);
//!    aggregate tokens/s against the roofline (weights once plus every sequence's KV, per step). Then, unless
//!    `--skip-cpu` or `--batch-check-tokens 0`, B fresh sequences with distinct 8-token prompts, fed one token
//!    per batched step, then `--batch-check-tokens` greedy steps, all B together (the batched kernels of exactly
//!    that batch size): the greedy tokens of sequences 0, B/2 and B−1 against the CPU backend's from the same
//!    prompts. They may part only at a near tie of the CPU's top two logits, as in the batch-1 check.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use driftwood_backend::cuda::{CudaBackend, SeqStep};
use driftwood_backend::{BackendKind, DType, Device, TensorMut};
use driftwood_engine::{KvCache, Model, Scratch};
use driftwood_memory::{Placement, SharedRegion};
use serde::Serialize;

use super::{Output, emit, median};
use crate::llm::{bundled_model_dir, load_model};

/// Arguments of `driftwood bench gpu`.
#[derive(clap::Args, Debug)]
pub struct GpuArgs {
    /// Model directory (default: the bundled model).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Prompt tokens before timed decoding.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Greedy tokens generated and timed.
    #[arg(long, default_value_t = 256)]
    gen_tokens: usize,
    /// Tokens compared against the CPU backend.
    #[arg(long, default_value_t = 16)]
    check_tokens: usize,
    /// Batch sizes of the batched runs, comma-separated, each measured in turn (0 or an empty list skips them;
    /// at most the backend's maximum batch).
    #[arg(long, value_delimiter = ',', default_value = "64", value_parser = batch_size)]
    batch: Vec<usize>,
    /// Greedy tokens of sampled sequences of each batch size compared against the CPU backend (0 skips).
    #[arg(long, default_value_t = 8)]
    batch_check_tokens: usize,
    /// Context of each sequence in the batched run.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Batched steps timed.
    #[arg(long, default_value_t = 32)]
    batch_steps: usize,
    /// Skip the CPU comparison (large models take long on the CPU).
    #[arg(long)]
    skip_cpu: bool,
    /// Prompt lengths whose GPU prefill is timed (lengths past the model's context are skipped).
    #[arg(long, value_delimiter = ',', default_value = "24,128,1024,4096")]
    prefill_tokens: Vec<usize>,
    /// Prompt lengths whose GPU prefill logits are checked against the CPU backend, from position 0 and after
    /// a cached prefix of half the prompt.
    #[arg(long, value_delimiter = ',', default_value = "16,128,1024")]
    prefill_check_tokens: Vec<usize>,
    /// Timed repetitions of each prefill (median).
    #[arg(long, default_value_t = 5)]
    prefill_reps: usize,
    /// Tokens per GPU prefill pass (longer prompts run in chunks; at most the backend's maximum).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// A `transformers` reference (JSON with `prompt` and `f32`/`bf16` `top64_indices`, `top64_values`,
    /// `greedy_continuation`, as bench/peers/torch_decode.py --golden writes) to compare the GPU against.
    #[arg(long)]
    golden: Option<std::path::PathBuf>,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct PlacementRun {
    placement: &'static str,
    max_abs_logit_diff_vs_cpu: Option<f32>,
    /// The CPU's largest |logit| after the prompt, for scale.
    max_abs_logit_cpu: Option<f32>,
    greedy_tokens_equal_cpu: Option<usize>,
    /// When the greedy tokens part: the CPU's top-1 minus top-2 logit at that step (a near tie when it is within
    /// the logit tolerance).
    cpu_top2_gap_at_divergence: Option<f32>,
    greedy_tokens_compared: usize,
    prompt_ms: f64,
    decode_ms_per_token: f64,
    decode_ms_per_token_p90: f64,
    first_tokens: Vec<u32>,
}

/// GPU prefill logits against the CPU backend's (bf16 KV cache, f32 arithmetic) for one prompt.
#[derive(Serialize, Debug)]
struct PrefillCheck {
    placement: &'static str,
    tokens: usize,
    /// Tokens already in the cache when the rest of the prompt was evaluated (0: the whole prompt at once).
    cached_prefix: usize,
    max_abs_logit_diff_vs_cpu: f32,
    /// The CPU's largest |logit|, for scale.
    max_abs_logit_cpu: f32,
    argmax_equal_cpu: bool,
}

/// The time of one GPU prefill from position 0 (the call as an actor makes it, host clock, median).
#[derive(Serialize, Debug)]
struct PrefillRun {
    placement: &'static str,
    tokens: usize,
    ms: f64,
    /// Matrix-product and attention FLOPs of the prompt over the time.
    tflops: f64,
}

/// One batch size of the batched sweep: step time against the roofline, and greedy tokens of sampled sequences
/// against the CPU backend (the `greedy_*` fields are absent when that check is skipped).
#[derive(Serialize, Debug)]
struct BatchRun {
    batch: usize,
    context: usize,
    step_ms: f64,
    tokens_per_s: f64,
    roofline_tokens_per_s: f64,
    /// The sequences (indices in the batch) whose greedy tokens were compared with the CPU's.
    greedy_checked_seqs: Option<Vec<usize>>,
    /// The fewest leading greedy tokens equal to the CPU's, over the checked sequences.
    greedy_tokens_equal_cpu: Option<usize>,
    greedy_tokens_compared: Option<usize>,
    /// The CPU's top-1 minus top-2 logit where the worst sequence's tokens part (absent when none part).
    cpu_top2_gap_at_divergence: Option<f32>,
    /// Each checked sequence.
    greedy_seqs: Option<Vec<SeqGreedy>>,
    /// One more step with its kernels launched one by one between timing events: device milliseconds per part
    /// of the step, summed over layers (launch gaps not counted, so the sum is below `step_ms`).
    kernel_ms: Vec<PartTime>,
    /// Products whose cuBLASLt planning failed (they ran cuBLAS's default algorithm), with why.
    gemm_plan_refusals: Vec<String>,
}

/// Device time of one part of a decode step (see [`BatchRun::kernel_ms`]).
#[derive(Serialize, Debug)]
struct PartTime {
    part: &'static str,
    ms: f32,
}

/// One sequence of a batched greedy check against the CPU backend.
#[derive(Serialize, Debug)]
struct SeqGreedy {
    seq: usize,
    /// Leading greedy tokens equal to the CPU's.
    tokens_equal_cpu: usize,
    /// The CPU's top-1 minus top-2 logit where the tokens part.
    cpu_top2_gap_at_divergence: Option<f32>,
    /// After the 8-token prompt: the GPU's logits against the CPU's (recorded, not checked), and the CPU's
    /// largest |logit|, for scale.
    max_abs_logit_diff_vs_cpu: f32,
    max_abs_logit_cpu: f32,
}

/// The CPU backend's greedy continuation of one sequence's prompt.
struct CpuGreedy {
    /// Logits after the prompt.
    first: Vec<f32>,
    tokens: Vec<u32>,
    /// The top-2 gap of the logits each token was chosen from.
    gaps: Vec<f32>,
}

#[derive(Serialize, Debug)]
struct GpuResults {
    model: String,
    device: String,
    /// Kernels launched as programmatic dependent launches (`DRIFTWOOD_CUDA_PDL`).
    early_launch: bool,
    /// Batch 1's pinned KV rows staged on a side stream (`DRIFTWOOD_CUDA_KV_STAGE`).
    stages_pinned_kv: bool,
    weight_bytes_per_token: usize,
    copy_bandwidth_gb_s: f64,
    floor_ms_per_token: f64,
    prompt_tokens: usize,
    gen_tokens: usize,
    /// Bytes of bf16 KV cache per token on the GPU (half of the f32 cache's).
    kv_bytes_per_token: usize,
    kv_bytes_per_token_f32: usize,
    prefill_chunk: usize,
    runs: Vec<PlacementRun>,
    prefill_checks: Vec<PrefillCheck>,
    prefill: Vec<PrefillRun>,
    golden: Option<GoldenCheck>,
    /// One run per batch size of `--batch`, in its order.
    batched: Vec<BatchRun>,
}

/// The GPU's logits and greedy tokens against `transformers` on the same weights and prompt.
#[derive(Serialize, Debug)]
struct GoldenCheck {
    prompt_tokens: usize,
    /// Over transformers' top-64 logits (float32 compute) of the last prompt position.
    max_abs_diff_top64_vs_f32: f32,
    /// The same against transformers in bf16.
    max_abs_diff_top64_vs_bf16: f32,
    argmax_equal_f32: bool,
    greedy_equal_f32: usize,
    greedy_equal_bf16: usize,
    greedy_compared: usize,
}

/// A bf16 KV cache and a logits buffer in one region of `placement`. The CPU reference runs a bf16 cache too, so
/// that GPU and CPU differ only in their arithmetic (bf16 tensor-core products against f32 ones), not in what
/// the cache holds.
struct SeqMemory {
    region: SharedRegion,
    max_seq: usize,
    dtype: DType,
    kv_bytes: usize,
}

impl SeqMemory {
    fn new(model: &Model, cuda: Option<&CudaBackend>, placement: Placement, max_seq: usize) -> anyhow::Result<Self> {
        let dtype = DType::BF16;
        // The logits start on a 64-byte boundary after the cache.
        let kv_bytes = model.kv_bytes(max_seq, dtype).next_multiple_of(64);
        let bytes = kv_bytes + model.config().vocab_size * 4;
        let device = match cuda {
            Some(c) if placement != Placement::Host => Some(c.device_memory(placement)?),
            _ => None,
        };
        let region = SharedRegion::reserve_on(bytes, 0, device)?;
        region.commit_to(bytes)?;
        Ok(SeqMemory { region, max_seq, dtype, kv_bytes })
    }

    fn kv_ptr(&self) -> *mut u8 {
        self.region.base()
    }

    fn logits_ptr(&self) -> *mut f32 {
        // SAFETY: the region holds kv_bytes then vocab f32.
        unsafe { self.kv_ptr().add(self.kv_bytes).cast() }
    }

    fn vocab(&self) -> usize {
        (self.region.len() - self.kv_bytes) / 4
    }

    /// A copy of the logits (no device work is in flight: every step synchronizes).
    fn logits(&self) -> Vec<f32> {
        // SAFETY: the region holds `vocab` f32 logits; nothing writes them during this read.
        unsafe { std::slice::from_raw_parts(self.logits_ptr(), self.vocab()) }.to_vec()
    }

    fn step(&self, pos: usize, token: u32) -> SeqStep {
        SeqStep {
            kv: self.kv_ptr() as u64,
            logits: self.logits_ptr() as u64,
            pos: pos as i32,
            max_seq: self.max_seq as i32,
            token,
            pad: 0,
        }
    }

    /// Runs `tokens` from `pos` on `dev` and returns the last logits.
    fn forward(
        &self,
        model: &Model,
        dev: &Device,
        pos: usize,
        tokens: &[u32],
        scratch: &mut Scratch,
    ) -> anyhow::Result<Vec<f32>> {
        // SAFETY: the region holds the cache for max_seq in `dtype` at its page-aligned base and is used by this
        // call alone.
        let mut kv = unsafe { KvCache::from_raw_parts_typed(self.kv_ptr(), self.dtype, model, self.max_seq) };
        // SAFETY: the logits follow the cache in the region, disjoint from it, and only this call uses them.
        let logits = unsafe { TensorMut::from_raw_parts(self.logits_ptr().cast(), self.vocab(), DType::F32) };
        model.forward(dev, &mut kv, pos, tokens, logits, scratch)?;
        Ok(self.logits())
    }
}

/// max |x|.
fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// max |a − b| over the pairs.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// The largest logit minus the second largest.
fn top2_gap(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            (a, b) = (x, a);
        } else if x > b {
            b = x;
        }
    }
    a - b
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32).collect()
}

/// Prompt tokens of each sequence in the batched greedy check.
const BATCH_PROMPT: usize = 8;

/// The batched greedy check's prompt of sequence `i`: `prompt`'s tokens `i..i + 8`, different for every sequence.
fn seq_prompt(i: usize, vocab: usize) -> Vec<u32> {
    prompt(BATCH_PROMPT + i, vocab)[i..].to_vec()
}

/// One `--batch` size: a number, or nothing (as 0, skipped).
fn batch_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    if s.is_empty() { Ok(0) } else { s.parse().map_err(|e| format!("`{s}` is not a batch size: {e}")) }
}

/// Runs `driftwood bench gpu` (see the module docs).
pub fn run(args: &GpuArgs) -> anyhow::Result<()> {
    let batches: Vec<usize> = args.batch.iter().copied().filter(|&b| b > 0).collect();
    if let Some(b) = batches.iter().find(|&&b| b > driftwood_backend::cuda::MAX_BATCH) {
        bail!("--batch {b}: the CUDA backend steps at most {} sequences together", driftwood_backend::cuda::MAX_BATCH);
    }
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    let model: Arc<Model> = load_model(&dir)?;
    let c = model.config().clone();
    let device = Device::open(BackendKind::Cuda).context("the GPU benchmark needs the CUDA backend")?;
    let Device::Cuda(cuda) = &device else { bail!("the CUDA backend did not open") };
    eprintln!("device: {}; uploading weights", cuda.device_name());
    let t = Instant::now();
    model.upload_to(cuda)?;
    eprintln!("weights uploaded in {:.1} s", t.elapsed().as_secs_f64());
    let copy_gb_s = device_copy_bandwidth(cuda)?;
    let weight_bytes = model.weight_bytes_per_token();
    let floor_ms = weight_bytes as f64 / (copy_gb_s * 1e9) * 1e3;
    eprintln!(
        "device copy bandwidth {copy_gb_s:.0} GB/s; floor {floor_ms:.3} ms/token for {weight_bytes} weight bytes"
    );

    let max_seq = args.prompt_tokens + args.gen_tokens + 1;
    let tokens = prompt(args.prompt_tokens, c.vocab_size);
    // CPU reference: the prompt, then greedy tokens.
    let reference = if args.skip_cpu { None } else { Some(cpu_greedy(&model, &tokens, max_seq, args.check_tokens)?) };

    let mut runs = vec![];
    for placement in [Placement::CudaPinned, Placement::CudaManaged] {
        let mem = SeqMemory::new(&model, Some(cuda), placement, max_seq)?;
        let mut scratch = Scratch::default();
        let t = Instant::now();
        let mut logits = mem.forward(&model, &device, 0, &tokens, &mut scratch)?;
        let prompt_ms = t.elapsed().as_secs_f64() * 1e3;
        let diff = reference.as_ref().map(|r| max_abs_diff(&r.first, &logits));
        let mut generated = vec![];
        let mut times = vec![];
        for i in 0..args.gen_tokens {
            let next = argmax(&logits);
            generated.push(next);
            let t = Instant::now();
            let step = mem.step(tokens.len() + i, next);
            model.decode_step_cuda(cuda, &[step])?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            logits = mem.logits();
        }
        let equal = reference.as_ref().map(|r| r.tokens.iter().zip(&generated).take_while(|(a, b)| a == b).count());
        // Where the tokens part, how close the CPU's own top two logits were at that step.
        let cpu_top2_gap_at_divergence = reference.as_ref().zip(equal).and_then(|(r, k)| r.gaps.get(k).copied());
        let p90 = {
            let mut s = times.clone();
            s.sort_by(f64::total_cmp);
            s.get(s.len() * 9 / 10).copied().unwrap_or(0.0)
        };
        let run = PlacementRun {
            placement: placement.name(),
            max_abs_logit_diff_vs_cpu: diff,
            max_abs_logit_cpu: reference.as_ref().map(|r| max_abs(&r.first)),
            greedy_tokens_equal_cpu: equal,
            cpu_top2_gap_at_divergence,
            greedy_tokens_compared: args.check_tokens.min(args.gen_tokens),
            prompt_ms,
            decode_ms_per_token: median(&mut times),
            decode_ms_per_token_p90: p90,
            first_tokens: generated.iter().take(16).copied().collect(),
        };
        eprintln!("{run:?}");
        runs.push(run);
    }

    let chunk = cuda.set_prefill_chunk(args.prefill_chunk.unwrap_or(driftwood_backend::cuda::MAX_PREFILL));
    let (prefill_checks, prefill) = prefill_runs(&model, cuda, &device, args)?;

    let golden = match &args.golden {
        Some(path) => Some(golden_check(&model, cuda, &device, path)?),
        None => None,
    };
    let mut batched_runs = vec![];
    // CPU greedy continuations by sequence index, shared by the batch sizes.
    let mut cpu_refs = HashMap::new();
    for &b in &batches {
        let mut run = batched(&model, cuda, args, b, copy_gb_s)?;
        if !args.skip_cpu && args.batch_check_tokens > 0 {
            let seqs = batch_greedy_check(&model, cuda, b, args.batch_check_tokens, &mut cpu_refs)?;
            let worst = seqs.iter().min_by_key(|s| s.tokens_equal_cpu);
            run.greedy_checked_seqs = Some(seqs.iter().map(|s| s.seq).collect());
            run.greedy_tokens_equal_cpu = worst.map(|s| s.tokens_equal_cpu);
            run.greedy_tokens_compared = Some(args.batch_check_tokens);
            run.cpu_top2_gap_at_divergence = worst.and_then(|s| s.cpu_top2_gap_at_divergence);
            run.greedy_seqs = Some(seqs);
        }
        eprintln!("{run:?}");
        batched_runs.push(run);
    }
    let results = GpuResults {
        model: dir.display().to_string(),
        device: cuda.device_name().to_string(),
        early_launch: cuda.early_launch(),
        stages_pinned_kv: cuda.stages_pinned_kv(),
        weight_bytes_per_token: weight_bytes,
        copy_bandwidth_gb_s: copy_gb_s,
        floor_ms_per_token: floor_ms,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        kv_bytes_per_token: model.kv_bytes(1, DType::BF16),
        kv_bytes_per_token_f32: model.kv_bytes(1, DType::F32),
        prefill_chunk: chunk,
        runs,
        prefill_checks,
        prefill,
        golden,
        batched: batched_runs,
    };
    let failures = check_failures(&results);
    emit("gpu", "gpu-cuda", &args.output, results)?;
    if !failures.is_empty() {
        bail!("the GPU disagrees with its references: {}", failures.join("; "));
    }
    Ok(())
}

/// Greedy tokens must equal the CPU's and transformers' (float32) continuations, and logits must agree within
/// bf16 rounding of a few units.
fn check_failures(r: &GpuResults) -> Vec<String> {
    const TOLERANCE: f32 = 0.05;
    // bf16 activations through every layer: a few bf16 units (2⁻⁸) of the largest logit. For scale,
    // transformers' own bf16 run differs from its f32 run by 1.6 % of the largest logit on the 16-token golden
    // prompt of the Llama-3.2-1B-shaped model.
    const REL_TOLERANCE: f32 = 0.025;
    let mut out = vec![];
    for run in &r.runs {
        if let (Some(equal), Some(diff)) = (run.greedy_tokens_equal_cpu, run.max_abs_logit_diff_vs_cpu) {
            let tolerance = TOLERANCE.max(REL_TOLERANCE * run.max_abs_logit_cpu.unwrap_or(0.0));
            // Tokens may part only where the CPU itself could not tell its top two apart within the tolerance.
            let near_tie = run.cpu_top2_gap_at_divergence.is_some_and(|gap| gap <= tolerance);
            if equal < run.greedy_tokens_compared && !near_tie {
                out.push(format!(
                    "{}: {equal} of {} greedy tokens equal the CPU's (its top-2 gap there: {:?})",
                    run.placement, run.greedy_tokens_compared, run.cpu_top2_gap_at_divergence
                ));
            }
            if diff.is_nan() || diff > tolerance {
                out.push(format!("{}: logits differ from the CPU's by up to {diff}", run.placement));
            }
        }
    }
    for p in &r.prefill_checks {
        let tolerance = TOLERANCE.max(REL_TOLERANCE * p.max_abs_logit_cpu);
        if p.max_abs_logit_diff_vs_cpu.is_nan() || p.max_abs_logit_diff_vs_cpu > tolerance || !p.argmax_equal_cpu {
            out.push(format!("prefill against the CPU: {p:?}"));
        }
    }
    for b in &r.batched {
        for s in b.greedy_seqs.iter().flatten() {
            let tolerance = TOLERANCE.max(REL_TOLERANCE * s.max_abs_logit_cpu);
            let near_tie = s.cpu_top2_gap_at_divergence.is_some_and(|gap| gap <= tolerance);
            let compared = b.greedy_tokens_compared.unwrap_or(0);
            if s.tokens_equal_cpu < compared && !near_tie {
                out.push(format!(
                    "batch {}, sequence {}: {} of {compared} greedy tokens equal the CPU's (its top-2 gap there: {:?})",
                    b.batch, s.seq, s.tokens_equal_cpu, s.cpu_top2_gap_at_divergence
                ));
            }
        }
    }
    if let Some(g) = &r.golden
        && (g.greedy_equal_f32 < g.greedy_compared || !g.argmax_equal_f32 || g.max_abs_diff_top64_vs_f32 > TOLERANCE)
    {
        out.push(format!("against transformers: {g:?}"));
    }
    out
}

/// `batch` sequences filled to `--context` tokens, then `--batch-steps` timed steps of all of them together.
fn batched(
    model: &Model,
    cuda: &CudaBackend,
    args: &GpuArgs,
    batch: usize,
    copy_gb_s: f64,
) -> anyhow::Result<BatchRun> {
    let c = model.config();
    let max_seq = args.context + args.batch_steps + 1;
    let seqs: Vec<SeqMemory> = (0..batch)
        .map(|_| SeqMemory::new(model, Some(cuda), Placement::CudaManaged, max_seq))
        .collect::<anyhow::Result<_>>()?;
    {
        let exec = cuda.exec()?;
        for s in &seqs {
            exec.prefetch_to_device(s.region.base() as u64, s.region.len())?;
        }
        exec.synchronize()?;
    }
    // Fill every cache to `context` tokens, all sequences stepping together.
    eprintln!("batched: filling {batch} caches to {} tokens", args.context);
    let tokens = prompt(args.context, c.vocab_size);
    for (pos, &tok) in tokens.iter().enumerate() {
        let steps: Vec<SeqStep> =
            seqs.iter().enumerate().map(|(i, s)| s.step(pos, (tok + i as u32) % c.vocab_size as u32)).collect();
        model.decode_step_cuda(cuda, &steps)?;
    }
    let mut times = vec![];
    for step in 0..args.batch_steps {
        let steps: Vec<SeqStep> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| s.step(args.context + step, (i * 31 + step) as u32 % c.vocab_size as u32))
            .collect();
        let t = Instant::now();
        model.decode_step_cuda(cuda, &steps)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let step_ms = median(&mut times);
    let steps: Vec<SeqStep> =
        seqs.iter().enumerate().map(|(i, s)| s.step(args.context + args.batch_steps, i as u32)).collect();
    let kernel_ms: Vec<PartTime> = model
        .decode_step_cuda_kernel_times(cuda, &steps)?
        .into_iter()
        .map(|(part, ms)| PartTime { part, ms })
        .collect();
    let kv_bytes_per_step = batch * model.kv_bytes(args.context, DType::BF16);
    let roofline_step_s = (model.weight_bytes_per_token() + kv_bytes_per_step) as f64 / (copy_gb_s * 1e9);
    let run = BatchRun {
        batch,
        context: args.context,
        step_ms,
        tokens_per_s: batch as f64 / (step_ms / 1e3),
        roofline_tokens_per_s: batch as f64 / roofline_step_s,
        greedy_checked_seqs: None,
        greedy_tokens_equal_cpu: None,
        greedy_tokens_compared: None,
        cpu_top2_gap_at_divergence: None,
        greedy_seqs: None,
        kernel_ms,
        gemm_plan_refusals: cuda.exec()?.gemm_plan_refusals(),
    };
    eprintln!("batched: {batch} sequences at {:.3} ms/step, {:.0} tokens/s", run.step_ms, run.tokens_per_s);
    let parts: Vec<String> = run.kernel_ms.iter().map(|p| format!("{} {:.3}", p.part, p.ms)).collect();
    eprintln!("batched: kernel ms by part: {}", parts.join(", "));
    for why in &run.gemm_plan_refusals {
        eprintln!("batched: cuBLASLt plan refused, cuBLAS default kept: {why}");
    }
    Ok(run)
}

/// The CPU backend's greedy continuation (`n` tokens) of `tokens`, in a cache of `max_seq` positions.
fn cpu_greedy(model: &Model, tokens: &[u32], max_seq: usize, n: usize) -> anyhow::Result<CpuGreedy> {
    let cpu = Device::cpu();
    let mem = SeqMemory::new(model, None, Placement::Host, max_seq)?;
    let mut scratch = Scratch::default();
    let mut logits = mem.forward(model, &cpu, 0, tokens, &mut scratch)?;
    let first = logits.clone();
    let (mut greedy, mut gaps) = (vec![], vec![]);
    for i in 0..n {
        let next = argmax(&logits);
        greedy.push(next);
        gaps.push(top2_gap(&logits));
        logits = mem.forward(model, &cpu, tokens.len() + i, &[next], &mut scratch)?;
    }
    Ok(CpuGreedy { first, tokens: greedy, gaps })
}

/// `batch` fresh sequences (managed placement) with distinct 8-token prompts, fed one prompt token per batched
/// step, then `n` greedy steps of all of them together, each sequence fed its own argmax; sequences 0, batch/2
/// and batch−1 against the CPU's greedy continuations (computed once per sequence index into `cpu_refs`).
fn batch_greedy_check(
    model: &Model,
    cuda: &CudaBackend,
    batch: usize,
    n: usize,
    cpu_refs: &mut HashMap<usize, CpuGreedy>,
) -> anyhow::Result<Vec<SeqGreedy>> {
    let vocab = model.config().vocab_size;
    eprintln!("batched: greedy check of {batch} sequences, {n} tokens");
    let max_seq = BATCH_PROMPT + n + 1;
    let seqs: Vec<SeqMemory> = (0..batch)
        .map(|_| SeqMemory::new(model, Some(cuda), Placement::CudaManaged, max_seq))
        .collect::<anyhow::Result<_>>()?;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|i| seq_prompt(i, vocab)).collect();
    for pos in 0..BATCH_PROMPT {
        let steps: Vec<SeqStep> = seqs.iter().zip(&prompts).map(|(s, p)| s.step(pos, p[pos])).collect();
        model.decode_step_cuda(cuda, &steps)?;
    }
    let mut logits: Vec<Vec<f32>> = seqs.iter().map(SeqMemory::logits).collect();
    let after_prompt = logits.clone();
    let mut generated: Vec<Vec<u32>> = vec![vec![]; batch];
    for i in 0..n {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for (g, &t) in generated.iter_mut().zip(&next) {
            g.push(t);
        }
        let steps: Vec<SeqStep> = seqs.iter().zip(&next).map(|(s, &t)| s.step(BATCH_PROMPT + i, t)).collect();
        model.decode_step_cuda(cuda, &steps)?;
        logits = seqs.iter().map(SeqMemory::logits).collect();
    }
    drop(seqs);
    let mut sampled = vec![0, batch / 2, batch - 1];
    sampled.dedup();
    let mut out = vec![];
    for seq in sampled {
        let r = match cpu_refs.entry(seq) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                eprintln!("batched: CPU greedy reference of sequence {seq}");
                e.insert(cpu_greedy(model, &seq_prompt(seq, vocab), max_seq, n)?)
            }
        };
        let equal = r.tokens.iter().zip(&generated[seq]).take_while(|(a, b)| a == b).count();
        let check = SeqGreedy {
            seq,
            tokens_equal_cpu: equal,
            cpu_top2_gap_at_divergence: r.gaps.get(equal).copied(),
            max_abs_logit_diff_vs_cpu: max_abs_diff(&r.first, &after_prompt[seq]),
            max_abs_logit_cpu: max_abs(&r.first),
        };
        eprintln!("{check:?}");
        out.push(check);
    }
    Ok(out)
}

/// Matrix-product and attention FLOPs of a prefill of `t` tokens from position 0 (the last token's logits only).
fn prefill_flops(model: &Model, t: usize) -> f64 {
    let c = model.config();
    let (h, qd, kvd, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let per_token = 2.0 * (h * (qd + 2 * kvd) + qd * h + 3 * h * ff) as f64 * c.num_layers as f64;
    let attention = 4.0 * (t * (t + 1) / 2) as f64 * qd as f64 * c.num_layers as f64;
    per_token * t as f64 + attention + 2.0 * (h * c.vocab_size) as f64
}

/// GPU prefill against the CPU (whole prompts and prompts after a cached prefix), then prefill times, on both
/// placements.
fn prefill_runs(
    model: &Model,
    cuda: &CudaBackend,
    device: &Device,
    args: &GpuArgs,
) -> anyhow::Result<(Vec<PrefillCheck>, Vec<PrefillRun>)> {
    let c = model.config();
    let fits = |t: &usize| *t >= 1 && *t < c.max_position_embeddings;
    let mut checks = vec![];
    if !args.skip_cpu {
        let cpu = Device::cpu();
        for &t in args.prefill_check_tokens.iter().filter(|t| fits(t)) {
            let tokens = prompt(t, c.vocab_size);
            let reference = SeqMemory::new(model, None, Placement::Host, t)?.forward(
                model,
                &cpu,
                0,
                &tokens,
                &mut Scratch::default(),
            )?;
            let max_ref = max_abs(&reference);
            for placement in [Placement::CudaPinned, Placement::CudaManaged] {
                for cached_prefix in [0, t / 2] {
                    let mem = SeqMemory::new(model, Some(cuda), placement, t)?;
                    let mut scratch = Scratch::default();
                    if cached_prefix > 0 {
                        mem.forward(model, device, 0, &tokens[..cached_prefix], &mut scratch)?;
                    }
                    let logits = mem.forward(model, device, cached_prefix, &tokens[cached_prefix..], &mut scratch)?;
                    let diff = max_abs_diff(&reference, &logits);
                    let check = PrefillCheck {
                        placement: placement.name(),
                        tokens: t,
                        cached_prefix,
                        max_abs_logit_diff_vs_cpu: diff,
                        max_abs_logit_cpu: max_ref,
                        argmax_equal_cpu: argmax(&reference) == argmax(&logits),
                    };
                    eprintln!("{check:?}");
                    checks.push(check);
                }
            }
        }
    }
    let mut runs = vec![];
    for placement in [Placement::CudaPinned, Placement::CudaManaged] {
        for &t in args.prefill_tokens.iter().filter(|t| fits(t)) {
            let tokens = prompt(t, c.vocab_size);
            let mem = SeqMemory::new(model, Some(cuda), placement, t)?;
            let mut scratch = Scratch::default();
            let mut times = vec![];
            for rep in 0..args.prefill_reps.max(1) + 1 {
                let start = Instant::now();
                mem.forward(model, device, 0, &tokens, &mut scratch)?;
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(&mut times);
            let run =
                PrefillRun { placement: placement.name(), tokens: t, ms, tflops: prefill_flops(model, t) / ms / 1e9 };
            eprintln!("{run:?}");
            runs.push(run);
        }
    }
    Ok((checks, runs))
}

/// Device-to-device copy bandwidth (read + write bytes per second / 2 = bytes read per second), in GB/s.
fn device_copy_bandwidth(cuda: &CudaBackend) -> anyhow::Result<f64> {
    let bytes = 1usize << 30;
    let src = cuda.alloc_zeroed(bytes)?;
    let dst = cuda.alloc_zeroed(bytes)?;
    let mut exec = cuda.exec()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let (_, ms) = exec.time(|e| e.copy(src.addr(), dst.addr(), bytes))?;
        best = best.min(ms as f64);
    }
    // A copy reads and writes every byte: report the rate at which weights could be read.
    Ok(2.0 * bytes as f64 / (best / 1e3) / 1e9)
}

fn golden_check(
    model: &Model,
    cuda: &CudaBackend,
    device: &Device,
    path: &std::path::Path,
) -> anyhow::Result<GoldenCheck> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()
    };
    let prompt = ids(&doc["prompt"]);
    if prompt.is_empty() {
        bail!("{} has no prompt", path.display());
    }
    let mem = SeqMemory::new(model, Some(cuda), Placement::CudaManaged, prompt.len() + 64)?;
    let mut scratch = Scratch::default();
    let mut logits = mem.forward(model, device, 0, &prompt, &mut scratch)?;
    let diff = |which: &str| -> f32 {
        let idx = ids(&doc[which]["top64_indices"]);
        let vals: Vec<f64> =
            doc[which]["top64_values"].as_array().into_iter().flatten().filter_map(|x| x.as_f64()).collect();
        idx.iter()
            .zip(&vals)
            .map(|(&i, &v)| (logits.get(i as usize).copied().unwrap_or(f32::NAN) - v as f32).abs())
            .fold(0.0, f32::max)
    };
    let (d32, d16) = (diff("f32"), diff("bf16"));
    let argmax_equal_f32 = doc["f32"]["argmax"].as_u64() == Some(argmax(&logits) as u64);
    let (ref32, ref16) = (ids(&doc["f32"]["greedy_continuation"]), ids(&doc["bf16"]["greedy_continuation"]));
    let mut mine = vec![];
    for i in 0..ref32.len().max(ref16.len()) {
        let next = argmax(&logits);
        mine.push(next);
        logits = mem.forward(model, device, prompt.len() + i, &[next], &mut scratch)?;
    }
    let same = |r: &[u32]| r.iter().zip(&mine).take_while(|(a, b)| a == b).count();
    let check = GoldenCheck {
        prompt_tokens: prompt.len(),
        max_abs_diff_top64_vs_f32: d32,
        max_abs_diff_top64_vs_bf16: d16,
        argmax_equal_f32,
        greedy_equal_f32: same(&ref32),
        greedy_equal_bf16: same(&ref16),
        greedy_compared: ref32.len(),
    };
    eprintln!("{check:?}");
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(batched: Vec<BatchRun>) -> GpuResults {
        GpuResults {
            model: String::new(),
            device: String::new(),
            early_launch: false,
            stages_pinned_kv: false,
            weight_bytes_per_token: 0,
            copy_bandwidth_gb_s: 0.0,
            floor_ms_per_token: 0.0,
            prompt_tokens: 0,
            gen_tokens: 0,
            kv_bytes_per_token: 0,
            kv_bytes_per_token_f32: 0,
            prefill_chunk: 0,
            runs: vec![],
            prefill_checks: vec![],
            prefill: vec![],
            golden: None,
            batched,
        }
    }

    fn batch_run(batch: usize, seqs: Vec<SeqGreedy>) -> BatchRun {
        BatchRun {
            batch,
            context: 16,
            step_ms: 1.0,
            tokens_per_s: 1.0,
            roofline_tokens_per_s: 1.0,
            greedy_checked_seqs: Some(seqs.iter().map(|s| s.seq).collect()),
            greedy_tokens_equal_cpu: seqs.iter().map(|s| s.tokens_equal_cpu).min(),
            greedy_tokens_compared: Some(8),
            cpu_top2_gap_at_divergence: None,
            greedy_seqs: Some(seqs),
            kernel_ms: vec![],
            gemm_plan_refusals: vec![],
        }
    }

    fn seq(seq: usize, equal: usize, gap: Option<f32>) -> SeqGreedy {
        SeqGreedy {
            seq,
            tokens_equal_cpu: equal,
            cpu_top2_gap_at_divergence: gap,
            max_abs_logit_diff_vs_cpu: 0.0,
            max_abs_logit_cpu: 1.0,
        }
    }

    #[test]
    fn batch_sizes_parse_with_empty_entries_as_zero() {
        assert_eq!(batch_size(" 64 "), Ok(64));
        assert_eq!(batch_size(""), Ok(0));
        assert!(batch_size("x").is_err());
    }

    #[test]
    fn sequence_prompts_differ_and_have_eight_tokens() {
        let prompts: Vec<Vec<u32>> = (0..256).map(|i| seq_prompt(i, 128256)).collect();
        assert!(prompts.iter().all(|p| p.len() == BATCH_PROMPT));
        for (i, a) in prompts.iter().enumerate() {
            assert!(prompts[i + 1..].iter().all(|b| a != b), "prompt {i} repeats");
        }
    }

    #[test]
    fn batched_tokens_may_part_only_at_a_near_tie() {
        let ok = results(vec![
            batch_run(1, vec![seq(0, 8, None)]),
            batch_run(8, vec![seq(0, 8, None), seq(4, 3, Some(0.01))]),
        ]);
        assert!(check_failures(&ok).is_empty(), "{:?}", check_failures(&ok));
        // Any one sequence parting at a clear CPU choice fails the run, even when another parts earlier at a tie.
        let bad = results(vec![batch_run(64, vec![seq(0, 2, Some(0.01)), seq(32, 8, None), seq(63, 5, Some(1.5))])]);
        let failures = check_failures(&bad);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("batch 64, sequence 63"), "{failures:?}");
        // Skipped checks fail nothing.
        let mut skipped = batch_run(256, vec![]);
        (skipped.greedy_seqs, skipped.greedy_tokens_compared) = (None, None);
        assert!(check_failures(&results(vec![skipped])).is_empty());
    }

    #[test]
    fn cpu_greedy_reference_of_the_bundled_model() -> anyhow::Result<()> {
        let model = load_model(&bundled_model_dir())?;
        let vocab = model.config().vocab_size;
        let greedy = |seq| cpu_greedy(&model, &seq_prompt(seq, vocab), BATCH_PROMPT + 5, 4);
        let (a, b) = (greedy(0)?, greedy(5)?);
        for r in [&a, &b] {
            assert_eq!((r.first.len(), r.tokens.len(), r.gaps.len()), (vocab, 4, 4));
            assert_eq!(r.tokens[0], argmax(&r.first));
            assert!(r.gaps.iter().all(|g| *g >= 0.0));
        }
        assert_ne!(a.first, b.first, "different prompts, different logits");
        // Deterministic: the same sequence index gives the same continuation.
        assert_eq!(greedy(0)?.tokens, a.tokens);
        Ok(())
    }
}
