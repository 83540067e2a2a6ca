//! Decode on the CUDA backend: one token per sequence per step, any number of sequences (actors) per step, each
//! attending to its own bf16 KV cache in its own actor's memory.
//!
//! Batch 1 runs fused GEMV kernels (RMSNorm folded into the projection that follows it, the residual add into
//! the projection's epilogue, SwiGLU's gate and up in one kernel); larger batches run cuBLAS GEMMs. At every
//! batch size, decode attention also applies this step's RoPE and writes its key and value into the cache, and
//! the last of its splits to finish merges them, so a layer's attention is one kernel. Each shape of step is
//! captured once in a CUDA graph and replayed.
//!
//! Kernels are programmatic dependent launches on compute capability 9.0+ (`DRIFTWOOD_CUDA_PDL=0` turns it
//! off): each kernel streams its weights while the one before it finishes (measured on an H200: batch-1 decode
//! 1.298 → 1.218 ms/token, managed). For one sequence whose cache is in pinned host memory, staging its earlier KV
//! rows to the device on a side stream from the start of the step (`DRIFTWOOD_CUDA_KV_STAGE=1`, off) overlaps
//! their bus transfer with the weight reads of earlier layers, at the cost of copying them every step
//! (1.371 → 1.322 ms/token pinned, with launches early).

use std::time::{Duration, Instant};

use driftwood_backend::cuda::{ATTN_FEW_SEQS, ATTN_MAX_CHUNK, CudaBackend, DeviceTensor, Exec, MAX_BATCH, SeqStep};
use driftwood_backend::{BackendError, DType};

use super::weights::GpuModel;
use crate::{EngineError, Model};

/// Keys per split of decode attention: for a few sequences, small, so that a short context still spreads over
/// many blocks (32 measured best for `attn_lanes` at batch 1); for many, 256, which fill the device anyway (64
/// sequences × 1024 tokens stepped in 2.76 ms at 256 keys per split, 3.20 at 128; again 3.36 against 3.49 after
/// `attn_split` staged its rows in shared memory; H200, Llama-3.2-1B-shaped; 512 keys per split: 2.62 ms
/// against 2.57 at 256, H100).
fn attn_chunk(batch: usize) -> usize {
    if batch < ATTN_FEW_SEQS { 32 } else { ATTN_MAX_CHUNK }
}

/// The batch size a step of `b` sequences runs at: `b` padded up to a power of two to 64, then to a multiple
/// of 32. Each size runs its own graph and its own measured GEMM plans, whose first use costs tens of
/// milliseconds (the plans' trials and the capture); a server whose passes carry every size from 1 to 64
/// paid that for each size (64 sessions × 5 turns on an H100: 293 passes took 4.2 s, 14 ms each, where one
/// batched step of 64 takes 2.0 ms; padded, and prepared at the server's start, 7.2 ms each, the rest of it
/// lost to snapshot traffic, see the README). Padding steps cost little: the products are bound by the
/// weights' bytes up to about 64 rows, and a padding step attends to one key.
fn graph_batch(b: usize) -> usize {
    if b <= 64 { b.next_power_of_two() } else { b.next_multiple_of(32) }
}

/// Batch-1 graphs write into their sequence's logits (the key holds its address): at most this many are
/// kept, so that a server that sees many actors over its life does not keep a graph for each.
const MAX_SINGLE_GRAPHS: usize = 64;

/// Scratch of a step for up to `batch` sequences (device memory).
#[derive(Debug)]
pub(crate) struct GpuScratch {
    batch: usize,
    x: DeviceTensor,      // (b, hidden) f32 residual stream
    qkv: DeviceTensor,    // (b, q_dim + 2 kv_dim) f32
    part: DeviceTensor,   // (b, heads, splits, head_dim + 2) f32
    counts: DeviceTensor, // (b, kv_heads) u32 splits of attention finished, zero between steps
    att: DeviceTensor,    // (b, q_dim) f32
    mlp: DeviceTensor,    // (b, 2 intermediate) f32: [gate | up] rows (batch 1: the activation, first half)
    xn_bf: DeviceTensor,  // (b, hidden) bf16
    att_bf: DeviceTensor, // (b, q_dim) bf16
    act_bf: DeviceTensor, // (b, intermediate) bf16
    logits: DeviceTensor, // (b, vocab) f32
    /// (layer, {k, v}, 1, kv_dim) bf16: the one-row cache of every padding step ([`graph_batch`]).
    pad_kv: DeviceTensor,
    /// (vocab) f32: where padding steps' logits go (never read).
    pad_logits: DeviceTensor,
    splits: usize,
    /// (layer, {k, v}, max_seq, kv_dim) bf16: batch 1's pinned cache rows, copied here during the step. None
    /// when not asked for, or when the device could not spare it (the step then reads the cache directly).
    stage: Option<DeviceTensor>,
    /// Bytes of stage asked for when this scratch was made (met or not), so that a refused stage is not asked
    /// for again at every step.
    stage_asked: usize,
}

impl GpuScratch {
    pub(crate) fn new(
        m: &Model,
        dev: &CudaBackend,
        batch: usize,
        splits: usize,
        stage_bytes: usize,
    ) -> Result<Self, BackendError> {
        let c = m.config();
        let (h, qd, kvd, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let z = |elems: usize, size: usize| dev.alloc_zeroed(batch * elems * size);
        Ok(GpuScratch {
            batch,
            x: z(h, 4)?,
            qkv: z(qd + 2 * kvd, 4)?,
            part: z(c.num_heads * splits * (c.head_dim + 2), 4)?,
            counts: z(c.num_kv_heads, 4)?,
            att: z(qd, 4)?,
            mlp: z(2 * ff, 4)?,
            xn_bf: z(h, 2)?,
            att_bf: z(qd, 2)?,
            act_bf: z(ff, 2)?,
            logits: z(c.vocab_size, 4)?,
            pad_kv: dev.alloc_zeroed(m.kv_bytes(1, DType::BF16))?,
            pad_logits: dev.alloc_zeroed(c.vocab_size * 4)?,
            splits,
            // The stage is an optimization: without device memory for it the step still runs.
            stage: if stage_bytes > 0 { dev.alloc_zeroed(stage_bytes).ok() } else { None },
            stage_asked: stage_bytes,
        })
    }
}

impl Model {
    /// One decode step on the GPU for every sequence in `steps`: embeds each step's token, writes its keys
    /// and values into its own cache at its position, and its next-token logits into its logits buffer.
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] when a token is outside the vocabulary, a position is past its cache or the
    /// model's context, or a cache or logits buffer is not in device-addressable memory; driver errors.
    pub fn decode_step_cuda(&self, dev: &CudaBackend, steps: &[SeqStep]) -> Result<(), EngineError> {
        self.decode_step_cuda_waited(dev, steps).map(|_| ())
    }

    /// [`Model::decode_step_cuda`], returning how long the step waited for the model's device state and the
    /// backend's stream, held by another forward (an actor's prefill, say), before its own work could start.
    ///
    /// # Errors
    ///
    /// As [`Model::decode_step_cuda`].
    pub fn decode_step_cuda_waited(&self, dev: &CudaBackend, steps: &[SeqStep]) -> Result<Duration, EngineError> {
        let mut waited = Duration::ZERO;
        self.decode_step_cuda_inner(dev, steps, false, (0, 0), &mut waited)?;
        Ok(waited)
    }

    /// Plans the products and captures the graph of every batch size from 2 to `max_batch` (as padded:
    /// [`graph_batch`]) for caches of `max_seq` rows, by running a step of padding only at each; returns how
    /// many sizes that was. A server calls this once at its start, so that the first passes of each size do not
    /// pay tens of milliseconds for it. (Batch 1 captures one graph per logits buffer, on first use.)
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] when `max_seq` is 0 or past the model's context; driver errors.
    pub fn warm_decode_cuda(&self, dev: &CudaBackend, max_seq: usize, max_batch: usize) -> Result<usize, EngineError> {
        if max_seq == 0 || max_seq > self.config().max_position_embeddings {
            return Err(EngineError::Request(format!(
                "caches of {max_seq} rows: the model's context is {}",
                self.config().max_position_embeddings
            )));
        }
        let mut sizes = 0;
        let mut b = 2;
        while b <= max_batch.min(MAX_BATCH) {
            let padded = graph_batch(b);
            self.decode_step_cuda_inner(dev, &[], false, (padded, max_seq), &mut Duration::default())?;
            sizes += 1;
            b = padded + 1;
        }
        Ok(sizes)
    }

    /// [`Model::decode_step_cuda`] with its kernels launched one by one (no graph, no early launch) between
    /// timing events: the device milliseconds of each part of the step (`embed`, `qkv`, `attention`, `o`,
    /// `gate_up`, `down`, `lm_head`, `scatter`), summed over layers. The step's results are the same; its
    /// time is not the graph's (launch gaps are not counted).
    ///
    /// # Errors
    ///
    /// As [`Model::decode_step_cuda`].
    pub fn decode_step_cuda_kernel_times(
        &self,
        dev: &CudaBackend,
        steps: &[SeqStep],
    ) -> Result<Vec<(&'static str, f32)>, EngineError> {
        self.decode_step_cuda_inner(dev, steps, true, (0, 0), &mut Duration::default()).map(Option::unwrap_or_default)
    }

    /// One step of `steps`, padded to at least `min_batch` sequences and run as if the caches held at least
    /// `min_seq` rows (both 0 but for [`Model::warm_decode_cuda`]); adds the time spent waiting for the
    /// model's state and the stream to `waited`.
    fn decode_step_cuda_inner(
        &self,
        dev: &CudaBackend,
        steps: &[SeqStep],
        timed: bool,
        (min_batch, min_seq): (usize, usize),
        waited: &mut Duration,
    ) -> Result<Option<Vec<(&'static str, f32)>>, EngineError> {
        if steps.is_empty() && min_batch < 2 {
            return Ok(None);
        }
        for s in steps {
            let (Ok(pos), Ok(max_seq)) = (usize::try_from(s.pos), usize::try_from(s.max_seq)) else {
                return Err(EngineError::Request(format!("negative position {} or cache size {}", s.pos, s.max_seq)));
            };
            self.check_decode(max_seq, pos, s.token)?;
            self.check_gpu_buffers(dev, s.kv, max_seq, s.logits)?;
        }
        let gpu = self.gpu(dev)?;
        let real = steps.len();
        let b = graph_batch(real.max(min_batch)).min(MAX_BATCH).max(real);
        let max_seq = steps.iter().map(|s| s.max_seq as usize).max().unwrap_or(1).max(min_seq);
        let chunk = attn_chunk(b);
        let splits = max_seq.div_ceil(chunk);
        // One sequence whose cache is in pinned host memory: attention would read every earlier row across the
        // bus (tens of GB/s) after the layer's projections; instead a side stream copies them to the device
        // from the start of the step, overlapped with the weight reads (in 16-byte units: the cache is 16-byte
        // aligned, checked above, and kv_dim a multiple of 8 with head_dim ≥ 32).
        // Layer 0 always reads its cache directly, so a one-layer model has nothing to stage.
        let staged =
            b == 1 && self.layers.len() > 1 && dev.stages_pinned_kv() && dev.is_host_resident(steps[0].kv as usize);
        let stage_bytes = if staged { self.kv_bytes(max_seq, DType::BF16) } else { 0 };
        let waiting = Instant::now();
        let mut guard = gpu.state.lock().unwrap_or_else(|p| p.into_inner());
        *waited += waiting.elapsed();
        let state = &mut *guard;
        let scratch = match &mut state.scratch {
            Some(s) if s.batch >= b && s.splits >= splits && s.stage_asked >= stage_bytes => &*s,
            slot => {
                // The captured graphs hold the old buffers' addresses. Free those buffers before allocating
                // the larger ones.
                let (had_batch, had_splits, had_stage) =
                    slot.as_ref().map_or((1, 1, 0), |s| (s.batch, s.splits, s.stage_asked));
                state.graphs.clear();
                *slot = None;
                // Reallocated for steps without a stage, the scratch drops it.
                let stage = if staged { had_stage.max(stage_bytes) } else { 0 };
                // Batch room in powers of two: a server whose batches grow one sequence at a time reallocates
                // (and drops its graphs) about log2 times, not once per size.
                let batch = had_batch.max(b.next_power_of_two());
                &*slot.insert(GpuScratch::new(self, dev, batch, had_splits.max(splits), stage)?)
            }
        };
        // Padding steps: token 0 at position 0 of a one-row cache, logits into a buffer nobody reads. They all
        // share those two buffers (what they write there is never used).
        let padded: Vec<SeqStep>;
        let steps = if b > real {
            let pad = SeqStep {
                kv: scratch.pad_kv.addr(),
                logits: scratch.pad_logits.addr(),
                pos: 0,
                max_seq: 1,
                token: 0,
                ..Default::default()
            };
            padded = steps.iter().copied().chain(std::iter::repeat_n(pad, b - real)).collect();
            &padded[..]
        } else {
            steps
        };
        let stage = match (&scratch.stage, staged) {
            (Some(t), true) => t.addr(),
            _ => 0,
        };
        let waiting = Instant::now();
        let mut exec = dev.exec()?;
        *waited += waiting.elapsed();
        exec.set_steps(steps)?;
        if stage != 0 {
            exec.prepare_stages(gpu.layers.len())?;
        }
        let key = (b, splits, if b == 1 { steps[0].logits } else { 0 }, stage != 0);
        if timed || !state.graphs.contains_key(&key) {
            // SAFETY: the operands are this model's weights and this scratch, sized for `b` sequences.
            unsafe { self.plan_products(&mut exec, gpu, scratch, b)? };
        }
        if timed {
            let times =
                exec.time_marks(|e| self.record_step(e, gpu, scratch, (b, chunk, splits), (steps[0].logits, stage)))?;
            return Ok(Some(times));
        }
        if b == 1 && !state.graphs.contains_key(&key) {
            let singles: Vec<_> = state.graphs.keys().filter(|k| k.0 == 1).copied().collect();
            if singles.len() >= MAX_SINGLE_GRAPHS {
                singles.into_iter().for_each(|k| drop(state.graphs.remove(&k)));
            }
        }
        let graph = match state.graphs.entry(key) {
            std::collections::hash_map::Entry::Occupied(g) => g.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(
                exec.capture(|e| self.record_step(e, gpu, scratch, (b, chunk, splits), (steps[0].logits, stage)))?,
            ),
        };
        exec.replay(graph)?;
        exec.synchronize()?;
        Ok(None)
    }

    /// Measures the algorithms of a `b`-sequence step's matrix products (one shape per projection, the same in
    /// every layer), so that the graph captured next runs each with the fastest. Batch 1 runs GEMVs instead.
    ///
    /// # Safety
    ///
    /// `s` is sized for at least `b` sequences; not capturing.
    unsafe fn plan_products(&self, e: &mut Exec, g: &GpuModel, s: &GpuScratch, b: usize) -> Result<(), BackendError> {
        let Some(w) = g.layers.first() else { return Ok(()) };
        if b == 1 {
            return Ok(());
        }
        let c = self.config();
        let (h, qd, kvd, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        // SAFETY: weights of this model and scratch for `b` sequences, at the shapes `record_step` uses.
        unsafe {
            e.plan_gemm_bf16(s.xn_bf.addr(), w.wqkv.addr(), (b, qd + 2 * kvd, h))?;
            e.plan_gemm_bf16(s.att_bf.addr(), w.wo.addr(), (b, h, qd))?;
            e.plan_gemm_bf16(s.xn_bf.addr(), w.w_gu.addr(), (b, 2 * ff, h))?;
            e.plan_gemm_bf16(s.act_bf.addr(), w.w_down.addr(), (b, h, ff))?;
            e.plan_gemm_bf16(s.xn_bf.addr(), g.lm_head(), (b, c.vocab_size, h))
        }
    }

    /// Launches one step (recorded into a graph by the caller).
    fn record_step(
        &self,
        e: &mut Exec,
        g: &GpuModel,
        s: &GpuScratch,
        (b, chunk, splits): (usize, usize, usize),
        (logits_1, stage): (u64, u64),
    ) -> Result<(), BackendError> {
        if stage != 0 && b != 1 {
            // Staging serves one sequence; the batched branch below would leave the side stream unjoined.
            return Err(BackendError::OutOfRange {
                op: "decode",
                detail: "a staged cache with several sequences".into(),
            });
        }
        let c = self.config();
        let (h, qd, kvd, ff, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let (eps, window) = (c.rms_norm_eps, c.sliding_window.unwrap_or(0));
        let heads = (c.num_heads, c.num_kv_heads, hd);
        // SAFETY: every address is a live device buffer of this model or scratch, sized above for `b`
        // sequences and `splits` splits, or a step record's KV cache / logits, checked device-addressable and
        // large enough by `decode_step_cuda` (and kept alive by the caller until it synchronizes). A non-zero
        // `stage` is a scratch buffer as large as the one sequence's cache, which is 16-byte aligned.
        unsafe {
            e.load_steps(b)?; // the step records, to device memory before any kernel reads them
            if stage != 0 {
                // Layer 0's attention comes too soon for a copy to help: it reads the cache directly.
                e.fork_side()?;
                for l in 1..g.layers.len() {
                    e.stage_kv(stage, l, kvd, window)?;
                }
            }
            e.mark("embed")?;
            e.embed(g.embed.addr(), s.x.addr(), b, h)?; // x (b, hidden)
            for (l, w) in g.layers.iter().enumerate() {
                let bias = w.bqkv.as_ref().map_or(0, |t| t.addr());
                let stage = if stage != 0 && l > 0 { stage } else { 0 };
                if b == 1 {
                    // qkv = Wqkv · rmsnorm(x) (+ b); att = attention(rope(q), rope(k) and v → cache); x += Wo · att
                    e.mark("qkv")?;
                    e.gemv(
                        w.wqkv.addr(),
                        s.x.addr(),
                        s.qkv.addr(),
                        bias,
                        w.attn_norm.addr(),
                        eps,
                        (h, qd + 2 * kvd),
                        false,
                    )?;
                    if stage != 0 {
                        e.join_stage(l)?;
                    }
                    e.mark("attention")?;
                    e.attention(
                        s.qkv.addr(),
                        g.inv_freq.addr(),
                        stage,
                        (s.part.addr(), s.counts.addr()),
                        (s.att.addr(), 0),
                        l,
                        b,
                        heads,
                        (chunk, splits),
                        window,
                    )?;
                    e.mark("o")?;
                    e.gemv(w.wo.addr(), s.att.addr(), s.x.addr(), 0, 0, 0.0, (qd, h), true)?;
                    // mlp = silu(Wg · rmsnorm(x)) * (Wu · rmsnorm(x)); x += Wd · mlp
                    e.mark("gate_up")?;
                    e.gemv_swiglu(w.w_gate(), w.w_up(), s.x.addr(), s.mlp.addr(), w.ffn_norm.addr(), eps, (h, ff))?;
                    e.mark("down")?;
                    e.gemv(w.w_down.addr(), s.mlp.addr(), s.x.addr(), 0, 0, 0.0, (ff, h), true)?;
                } else {
                    e.mark("qkv")?;
                    e.rmsnorm_bf16(s.x.addr(), w.attn_norm.addr(), s.xn_bf.addr(), b, h, eps)?;
                    e.gemm_bf16(s.xn_bf.addr(), w.wqkv.addr(), s.qkv.addr(), (b, qd + 2 * kvd, h), 0.0)?;
                    if bias != 0 {
                        e.add_bias(s.qkv.addr(), bias, b, qd + 2 * kvd)?;
                    }
                    e.mark("attention")?;
                    e.attention(
                        s.qkv.addr(),
                        g.inv_freq.addr(),
                        0,
                        (s.part.addr(), s.counts.addr()),
                        (0, s.att_bf.addr()),
                        l,
                        b,
                        heads,
                        (chunk, splits),
                        window,
                    )?;
                    e.mark("o")?;
                    e.gemm_bf16(s.att_bf.addr(), w.wo.addr(), s.x.addr(), (b, h, qd), 1.0)?; // x += att · Woᵀ
                    e.mark("gate_up")?;
                    e.rmsnorm_bf16(s.x.addr(), w.ffn_norm.addr(), s.xn_bf.addr(), b, h, eps)?;
                    // [gate | up] = xn · [Wg; Wu]ᵀ: one GEMM over the stacked weights, twice the columns to spread.
                    e.gemm_bf16(s.xn_bf.addr(), w.w_gu.addr(), s.mlp.addr(), (b, 2 * ff, h), 0.0)?;
                    e.swiglu_bf16(s.mlp.addr(), s.act_bf.addr(), b, ff)?;
                    e.mark("down")?;
                    e.gemm_bf16(s.act_bf.addr(), w.w_down.addr(), s.x.addr(), (b, h, ff), 1.0)?; // x += act · Wdᵀ
                }
            }
            e.mark("lm_head")?;
            if b == 1 {
                // logits = lm_head · rmsnorm(x), straight into the guest's logits buffer.
                e.gemv(g.lm_head(), s.x.addr(), logits_1, 0, g.final_norm.addr(), eps, (h, c.vocab_size), false)?;
            } else {
                e.rmsnorm_bf16(s.x.addr(), g.final_norm.addr(), s.xn_bf.addr(), b, h, eps)?;
                e.gemm_bf16(s.xn_bf.addr(), g.lm_head(), s.logits.addr(), (b, c.vocab_size, h), 0.0)?;
                e.mark("scatter")?;
                e.scatter_logits(s.logits.addr(), b, c.vocab_size)?;
            }
        }
        Ok(())
    }
}
