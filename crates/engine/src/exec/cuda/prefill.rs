//! Prefill on the CUDA backend: a prompt of `t` tokens at positions `pos..pos + t` of one sequence, as whole-chunk
//! matrix products. Shapes are in comments as `(rows, cols)`.
//!
//! Per layer: RMSNorm → one QKV GEMM → RoPE, which writes the chunk's keys and values (bf16) straight into the
//! actor's cache rows and into a device copy → flash-style causal attention over the cached prefix and the
//! chunk (`kernels/attn_prefill.cu`) → the output projection GEMM, accumulated into the residual stream →
//! RMSNorm → one GEMM over the stacked gate and up weights → SwiGLU → the down projection GEMM, accumulated.
//! Only the last token's logits are computed, straight into the guest's buffer.
//!
//! The floor, for a Llama-3.2-1B shape at 4096 tokens: 2 · 0.97 G non-embedding weights · 4096 ≈ 8.0 TFLOP of
//! GEMMs plus ≈ 1.1 TFLOP of causal attention (4 · t²/2 · heads · head_dim per layer), about 11.6 ms at the
//! measured ~790 TFLOP/s. Bytes are no limit here (weights 2.5 GB once per chunk, activations a few hundred MB).
//!
//! Long prompts run in chunks of [`CudaBackend::prefill_chunk`] tokens (at most [`MAX_PREFILL`]); between chunks the backend is released, so that other
//! actors' decode steps run, and the caller's `between` check (the actor's deadline) runs.

use driftwood_backend::BackendError;
use driftwood_backend::cuda::{AttnPrefillParams, CudaBackend, DeviceTensor, Exec, MAX_PREFILL};

use super::weights::GpuModel;
use crate::{EngineError, Model};

/// Activations of one prefill chunk of up to `tokens` tokens (device memory).
#[derive(Debug)]
pub(crate) struct PrefillScratch {
    tokens: usize,
    x: DeviceTensor,    // (t, hidden) f32 residual stream
    xn: DeviceTensor,   // (t, hidden) bf16 normalized input of a GEMM
    qkv: DeviceTensor,  // (t, q_dim + 2 kv_dim) f32
    q: DeviceTensor,    // (t, q_dim) bf16 rotated, scaled queries
    knew: DeviceTensor, // (t, kv_dim) bf16 this chunk's rotated keys
    vnew: DeviceTensor, // (t, kv_dim) bf16 this chunk's values
    att: DeviceTensor,  // (t, q_dim) bf16 attention output
    gu: DeviceTensor,   // (t, 2 intermediate) bf16 gate | up
    act: DeviceTensor,  // (t, intermediate) bf16 SwiGLU activation
}

impl PrefillScratch {
    fn new(m: &Model, dev: &CudaBackend, tokens: usize) -> Result<Self, BackendError> {
        let c = m.config();
        let (h, qd, kvd, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let z = |elems: usize, size: usize| dev.alloc_zeroed(tokens * elems * size);
        Ok(PrefillScratch {
            tokens,
            x: z(h, 4)?,
            xn: z(h, 2)?,
            qkv: z(qd + 2 * kvd, 4)?,
            q: z(qd, 2)?,
            knew: z(kvd, 2)?,
            vnew: z(kvd, 2)?,
            att: z(qd, 2)?,
            gu: z(2 * ff, 2)?,
            act: z(ff, 2)?,
        })
    }
}

impl Model {
    /// Evaluates `tokens` at positions `pos..pos + tokens.len()` of the sequence whose bf16 KV cache of
    /// `max_seq` tokens is at device address `kv`: writes their keys and values into the cache rows and the
    /// last token's next-token logits `(vocab)` f32 to `logits`. `between` runs before each chunk after the
    /// first, with the backend released; its error stops the prefill (the rows written so far stay written).
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] for an empty prompt, a token outside the vocabulary, a sequence past the cache
    /// or the model's context, or buffers the device cannot use (see [`Model::decode_step_cuda`]); `between`'s
    /// error; driver errors.
    pub fn prefill_cuda(
        &self,
        dev: &CudaBackend,
        (kv, max_seq): (u64, usize),
        pos: usize,
        tokens: &[u32],
        logits: u64,
        between: &mut dyn FnMut() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let c = self.config();
        let end = pos.checked_add(tokens.len()).ok_or_else(|| EngineError::Request("position overflow".into()))?;
        if tokens.is_empty() {
            return Err(EngineError::Request("forward needs at least one token".into()));
        }
        if end > max_seq || end > c.max_position_embeddings {
            return Err(EngineError::Request(format!(
                "sequence of {end} tokens exceeds the {max_seq} the KV cache holds (model context {})",
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::Request(format!("token {bad} is outside the {}-token vocabulary", c.vocab_size)));
        }
        if i32::try_from(max_seq).is_err() {
            return Err(EngineError::Request(format!("a {max_seq}-token cache is too large for the CUDA kernels")));
        }
        self.check_gpu_buffers(dev, kv, max_seq, logits)?;
        let gpu = self.gpu(dev)?;
        let per_pass = dev.prefill_chunk().clamp(1, MAX_PREFILL);
        let chunks = tokens.chunks(per_pass);
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.enumerate() {
            if i > 0 {
                between()?;
            }
            let at = pos + i * per_pass;
            let mut guard = gpu.state.lock().unwrap_or_else(|p| p.into_inner());
            let scratch = match &mut guard.prefill {
                Some(s) if s.tokens >= chunk.len() => &*s,
                slot => {
                    // Grown in powers of two, so that prompts of similar lengths share one allocation; the old
                    // buffers are freed first.
                    *slot = None;
                    let tokens = chunk.len().next_power_of_two().clamp(64, MAX_PREFILL);
                    &*slot.insert(PrefillScratch::new(self, dev, tokens)?)
                }
            };
            let mut exec = dev.exec()?;
            exec.set_tokens(chunk)?;
            let out = (i == last).then_some(logits);
            // SAFETY: the scratch buffers hold `scratch.tokens ≥ chunk.len()` rows; the cache was checked
            // device-addressable, 16-byte aligned and `max_seq ≥ at + chunk.len()` rows long, the logits
            // `vocab` f32; the caller keeps both alive, and `exec.synchronize` below returns only when every
            // kernel touching them has finished.
            unsafe { self.record_prefill(&mut exec, gpu, scratch, (kv, max_seq), at, chunk.len(), out)? };
            exec.synchronize()?;
        }
        Ok(())
    }

    /// Launches the passes of one chunk of `t` tokens at `pos0` (ids already set).
    ///
    /// # Safety
    ///
    /// As stated at the call in [`Model::prefill_cuda`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn record_prefill(
        &self,
        e: &mut Exec,
        g: &GpuModel,
        s: &PrefillScratch,
        (kv, max_seq): (u64, usize),
        pos0: usize,
        t: usize,
        logits: Option<u64>,
    ) -> Result<(), BackendError> {
        let c = self.config();
        let (h, qd, kvd, ff, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let (eps, window) = (c.rms_norm_eps, c.sliding_window.unwrap_or(0));
        // Attention computes exp2: fold log2 e into the queries with the softmax scale.
        let qscale = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        // SAFETY: the caller's promise covers every address below.
        unsafe {
            e.embed_tokens(g.embed.addr(), s.x.addr(), t, h)?; // x (t, hidden)
            for (l, w) in g.layers.iter().enumerate() {
                // Attention block: qkv = rmsnorm(x) · Wqkvᵀ (+ b); rope → q, and k, v into the cache.
                e.rmsnorm_bf16(s.x.addr(), w.attn_norm.addr(), s.xn.addr(), t, h, eps)?;
                e.gemm_bf16(s.xn.addr(), w.wqkv.addr(), s.qkv.addr(), (t, qd + 2 * kvd, h), 0.0)?;
                if let Some(b) = &w.bqkv {
                    e.add_bias(s.qkv.addr(), b.addr(), t, qd + 2 * kvd)?;
                }
                e.rope_prefill(
                    s.qkv.addr(),
                    g.inv_freq.addr(),
                    (s.q.addr(), s.knew.addr(), s.vnew.addr()),
                    (kv, l, max_seq),
                    (t, pos0),
                    (c.num_heads, c.num_kv_heads, hd),
                    qscale,
                )?;
                let params = AttnPrefillParams {
                    q: s.q.addr(),
                    cache: kv,
                    knew: s.knew.addr(),
                    vnew: s.vnew.addr(),
                    out: s.att.addr(),
                    t: t as i32,
                    pos0: pos0 as i32,
                    max_seq: max_seq as i32,
                    layer: l as i32,
                    heads: c.num_heads as i32,
                    kv_heads: c.num_kv_heads as i32,
                    window: window as i32,
                    pad: 0,
                };
                e.attn_prefill(&params, hd)?; // att (t, q_dim)
                e.gemm_bf16(s.att.addr(), w.wo.addr(), s.x.addr(), (t, h, qd), 1.0)?; // x += att · Woᵀ

                // MLP block: x += swiglu(rmsnorm(x) · [Wg; Wu]ᵀ) · Wdᵀ.
                e.rmsnorm_bf16(s.x.addr(), w.ffn_norm.addr(), s.xn.addr(), t, h, eps)?;
                e.gemm_bf16_to_bf16(s.xn.addr(), w.w_gu.addr(), s.gu.addr(), (t, 2 * ff, h))?; // (t, 2 ff)
                e.swiglu_pairs(s.gu.addr(), s.act.addr(), t, ff)?; // (t, ff)
                e.gemm_bf16(s.act.addr(), w.w_down.addr(), s.x.addr(), (t, h, ff), 1.0)?; // x += act · Wdᵀ
            }
            if let Some(logits) = logits {
                // logits = lm_head · rmsnorm(x[t - 1]), straight into the guest's buffer.
                let last = s.x.addr() + ((t - 1) * h * 4) as u64;
                e.gemv(g.lm_head(), last, logits, 0, g.final_norm.addr(), eps, (h, c.vocab_size), false)?;
            }
        }
        Ok(())
    }
}
