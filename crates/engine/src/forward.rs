//! The forward pass, readable in one sitting. Shapes are in comments as `(rows, cols)`; `t` is the number of
//! tokens in this call, `pos` how many the cache already holds.

use driftwood_backend::{AttentionDims, Backend, DType, Device, LinearDims, TensorMut, TensorRef};

use crate::kv::store_rows;
use crate::{Cancel, EngineError, KvCache, Model};

/// Tokens processed per pass of a long prefill; bounds the scratch memory.
const PREFILL_CHUNK: usize = 256;

/// Activation buffers of the forward pass, reused across calls (the backend's scratch, never guest memory).
#[derive(Default, Debug)]
pub struct Scratch {
    x: Vec<f32>,    // (t, hidden)       residual stream
    xn: Vec<f32>,   // (t, hidden)       normalized input / block output
    q: Vec<f32>,    // (t, q_dim)        queries
    k: Vec<f32>,    // (t, kv_dim)       new keys, when the cache is not f32 (converted as they are stored)
    v: Vec<f32>,    // (t, kv_dim)       new values, likewise
    att: Vec<f32>,  // (t, q_dim)        attention output
    gate: Vec<f32>, // (t, intermediate) SwiGLU gate, then activation
    up: Vec<f32>,   // (t, intermediate) SwiGLU up projection
    cos: Vec<f32>,  // (t, head_dim/2)
    sin: Vec<f32>,  // (t, head_dim/2)
}

pub(crate) fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

pub(crate) fn r(buf: &[f32]) -> TensorRef<'_> {
    TensorRef::from_f32(buf)
}

pub(crate) fn w(buf: &mut [f32]) -> TensorMut<'_> {
    TensorMut::from_f32(buf)
}

pub(crate) fn opt(bias: &Option<Vec<f32>>) -> Option<TensorRef<'_>> {
    bias.as_deref().map(TensorRef::from_f32)
}

impl Model {
    /// Runs `tokens` at positions `pos..pos + tokens.len()`: writes their keys and values into `kv` in place
    /// and the last token's next-token logits `(vocab)` into `logits`.
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] when `tokens` is empty, a token is outside the vocabulary, or the sequence
    /// would pass the cache or the model's context; backend errors otherwise.
    pub fn forward(
        &self,
        dev: &Device,
        kv: &mut KvCache<'_>,
        pos: usize,
        tokens: &[u32],
        logits: TensorMut<'_>,
        s: &mut Scratch,
    ) -> Result<(), EngineError> {
        self.forward_cancellable(dev, kv, pos, tokens, logits, s, Cancel::NEVER)
    }

    /// [`forward`](Self::forward), asking `cancel` after every layer of every prefill chunk (on the GPU, after
    /// every chunk) whether to stop.
    ///
    /// # Errors
    ///
    /// Those of [`forward`](Self::forward), and [`EngineError::Cancelled`] when `cancel` asked to stop (the
    /// cache rows of these tokens are then partly written).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cancellable(
        &self,
        dev: &Device,
        kv: &mut KvCache<'_>,
        pos: usize,
        tokens: &[u32],
        mut logits: TensorMut<'_>,
        s: &mut Scratch,
        cancel: Cancel<'_>,
    ) -> Result<(), EngineError> {
        let c = self.config();
        let end = pos.checked_add(tokens.len()).ok_or_else(|| EngineError::Request("position overflow".into()))?;
        if tokens.is_empty() {
            return Err(EngineError::Request("forward needs at least one token".into()));
        }
        if end > kv.max_seq() || end > c.max_position_embeddings {
            return Err(EngineError::Request(format!(
                "sequence of {end} tokens exceeds the {} the KV cache holds (model context {})",
                kv.max_seq(),
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::Request(format!("token {bad} is outside the {}-token vocabulary", c.vocab_size)));
        }
        if logits.len() != c.vocab_size {
            return Err(EngineError::Request(format!(
                "logits buffer holds {}, vocab is {}",
                logits.len(),
                c.vocab_size
            )));
        }
        if let Device::Cuda(cuda) = dev {
            // The GPU runs a prompt as whole-chunk matrix products, a decode step as one captured graph; only
            // the last token's logits reach the guest. Its kernels read and write bf16 caches.
            if kv.dtype() != DType::BF16 {
                return Err(EngineError::Request(format!(
                    "the CUDA backend runs bf16 KV caches; this one is {}",
                    kv.dtype()
                )));
            }
            let (kv_addr, logits_addr) = (kv.as_ptr() as u64, logits.addr() as u64);
            if let [token] = tokens {
                let step = driftwood_backend::cuda::SeqStep {
                    kv: kv_addr,
                    logits: logits_addr,
                    max_seq: kv.max_seq() as i32,
                    pos: pos as i32,
                    token: *token,
                    ..Default::default()
                };
                return self.decode_step_cuda(cuda, &[step]);
            }
            return self.prefill_cuda(cuda, (kv_addr, kv.max_seq()), pos, tokens, logits_addr, &mut || cancel.check());
        }
        let mut start = 0;
        while start < tokens.len() {
            let chunk = &tokens[start..(start + PREFILL_CHUNK).min(tokens.len())];
            self.forward_chunk(dev, kv, pos + start, chunk, s, cancel)?;
            start += chunk.len();
        }
        // Logits of the last token only: (1, hidden) → (1, vocab), written straight into `logits`.
        let h = c.hidden_size;
        let last = (tokens.len() - 1) % PREFILL_CHUNK * h; // the last token within the last chunk
        dev.rms_norm(r(&s.x[last..last + h]), r(&self.final_norm), c.rms_norm_eps, w(&mut s.xn[..h]))?;
        let dims = LinearDims { t: 1, input: h, output: c.vocab_size };
        dev.linear(r(&s.xn[..h]), self.lm_head.view(), None, logits.reborrow(), dims)?;
        Ok(())
    }

    /// One transformer pass over `tokens` (at most [`PREFILL_CHUNK`]); leaves the final residual stream in
    /// `s.x`.
    fn forward_chunk(
        &self,
        dev: &Device,
        kv: &mut KvCache<'_>,
        pos: usize,
        tokens: &[u32],
        s: &mut Scratch,
        cancel: Cancel<'_>,
    ) -> Result<(), EngineError> {
        let c = self.config();
        let t = tokens.len();
        let (h, qd, kvd, ff, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let eps = c.rms_norm_eps;
        let lin = |input, output| LinearDims { t, input, output };
        crate::rope::tables(&self.inv_freq, pos, t, &mut s.cos, &mut s.sin); // (t, hd/2) each

        let x = sized(&mut s.x, t * h); // (t, hidden)
        dev.embed(self.embed.view(), tokens, w(x))?;
        sized(&mut s.xn, t * h);
        sized(&mut s.q, t * qd);
        sized(&mut s.att, t * qd);
        if kv.dtype() != DType::F32 {
            sized(&mut s.k, t * kvd);
            sized(&mut s.v, t * kvd);
        }
        sized(&mut s.gate, t * ff);
        sized(&mut s.up, t * ff);
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block: xn = norm(x); q, k, v = xn · W; k and v land in the cache rows pos..pos+t.
            dev.rms_norm(r(&s.x), r(&layer.attn_norm), eps, w(&mut s.xn))?;
            dev.linear(r(&s.xn), layer.wq.view(), opt(&layer.bq), w(&mut s.q), lin(h, qd))?;
            if kv.dtype() == DType::F32 {
                // An f32 cache takes the projections in place: no staging, no copy.
                dev.linear(r(&s.xn), layer.wk.view(), opt(&layer.bk), kv.k_mut(l, pos, t), lin(h, kvd))?;
                dev.linear(r(&s.xn), layer.wv.view(), opt(&layer.bv), kv.v_mut(l, pos, t), lin(h, kvd))?;
                dev.rope(kv.k_mut(l, pos, t), r(&s.cos), r(&s.sin), 0, c.num_kv_heads, hd)?;
            } else {
                // A narrower cache: project and rotate in f32, round once as the rows are stored.
                dev.linear(r(&s.xn), layer.wk.view(), opt(&layer.bk), w(&mut s.k), lin(h, kvd))?; // (t, kv_dim)
                dev.linear(r(&s.xn), layer.wv.view(), opt(&layer.bv), w(&mut s.v), lin(h, kvd))?; // (t, kv_dim)
                dev.rope(w(&mut s.k), r(&s.cos), r(&s.sin), 0, c.num_kv_heads, hd)?;
                store_rows(kv.k_mut(l, pos, t), &s.k)?;
                store_rows(kv.v_mut(l, pos, t), &s.v)?;
            }
            dev.rope(w(&mut s.q), r(&s.cos), r(&s.sin), 0, c.num_heads, hd)?;
            let dims = AttentionDims {
                t,
                pos,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: hd,
                window: c.sliding_window,
            };
            dev.attention(r(&s.q), kv.k(l, pos + t), kv.v(l, pos + t), w(&mut s.att), dims)?; // (t, q_dim)
            dev.linear(r(&s.att), layer.wo.view(), None, w(&mut s.xn), lin(qd, h))?;
            dev.add_assign(w(&mut s.x), r(&s.xn))?;

            // MLP block: x += down(silu(gate(xn)) · up(xn)), xn = norm(x).
            dev.rms_norm(r(&s.x), r(&layer.ffn_norm), eps, w(&mut s.xn))?;
            dev.linear(r(&s.xn), layer.w_gate.view(), None, w(&mut s.gate), lin(h, ff))?;
            dev.linear(r(&s.xn), layer.w_up.view(), None, w(&mut s.up), lin(h, ff))?;
            dev.silu_mul(w(&mut s.gate), r(&s.up))?;
            dev.linear(r(&s.gate), layer.w_down.view(), None, w(&mut s.xn), lin(ff, h))?;
            dev.add_assign(w(&mut s.x), r(&s.xn))?;
            cancel.check()?;
        }
        Ok(())
    }
}
