//! One decode step for many sequences at once (continuous batching). Shapes are in comments as
//! `(rows, cols)`; `b` is the number of sequences in the step, one new token each.
//!
//! Every sequence keeps its own KV cache and logits buffer (in Driftwood: ranges of its own actor's memory)
//! and its own position. What the sequences share is the weights: each projection runs once over the `b`
//! rows, so a weight is read from memory once per step instead of once per sequence. Attention stays per
//! sequence, over its own cache.
//!
//! The projections write into backend scratch; each sequence's key and value rows are then stored into its
//! cache at its position, and its logits row into its logits buffer.

use driftwood_backend::{AttentionDims, Backend, DType, Device, LinearDims, TensorMut};

use crate::forward::{opt, r, sized, w};
use crate::kv::store_rows;
use crate::{EngineError, KvCache, Model, Scratch};

/// One sequence's part of a batched decode step: its cache, the position of its new token, the token, and
/// where its next-token logits `(vocab)` go.
#[derive(Debug)]
pub struct BatchSeq<'a> {
    /// The sequence's KV cache; rows `0..pos` hold its history, row `pos` receives the new token's key and
    /// value.
    pub kv: KvCache<'a>,
    /// Position of `token` (the number of tokens already in `kv`).
    pub pos: usize,
    /// The token to evaluate.
    pub token: u32,
    /// The sequence's logits buffer, `vocab` f32s.
    pub logits: TensorMut<'a>,
}

/// Activation buffers of [`Model::decode_batch`], reused across steps (backend scratch, never guest memory).
#[derive(Default, Debug)]
pub struct BatchScratch {
    x: Vec<f32>,      // (b, hidden)       residual stream
    xn: Vec<f32>,     // (b, hidden)       normalized input / block output
    q: Vec<f32>,      // (b, q_dim)        queries
    k: Vec<f32>,      // (b, kv_dim)       new keys, stored into each cache after RoPE
    v: Vec<f32>,      // (b, kv_dim)       new values, stored into each cache
    att: Vec<f32>,    // (b, q_dim)        attention output
    gate: Vec<f32>,   // (b, intermediate) SwiGLU gate, then activation
    up: Vec<f32>,     // (b, intermediate) SwiGLU up projection
    cos: Vec<f32>,    // (b, head_dim/2)   row i: sequence i's position
    sin: Vec<f32>,    // (b, head_dim/2)
    logits: Vec<f32>, // (b, vocab)
    tokens: Vec<u32>, // (b)
    single: Scratch,  // a batch of one runs the single-sequence forward pass
    /// How long the last [`Model::decode_batch`] waited for the device, held by another forward.
    device_wait: std::time::Duration,
}

impl BatchScratch {
    /// How long the last [`Model::decode_batch`] through these buffers waited for the device (CUDA: the
    /// model's device state and the backend's stream), held by another forward such as an actor's prefill,
    /// before its own work could start; zero on the CPU.
    pub fn device_wait(&self) -> std::time::Duration {
        self.device_wait
    }
}

/// Copies `src` into a writable view of the same length (a cache row or a logits buffer).
impl Model {
    /// Checks that a decode step of `token` at position `pos` fits a `max_seq`-token cache of this model and
    /// its context: what [`forward`](Self::forward) and [`decode_batch`](Self::decode_batch) require of one
    /// sequence.
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] naming the token outside the vocabulary or the position past the cache or
    /// the model's context.
    pub fn check_decode(&self, max_seq: usize, pos: usize, token: u32) -> Result<(), EngineError> {
        let c = self.config();
        if token as usize >= c.vocab_size {
            return Err(EngineError::Request(format!(
                "token {token} is outside the {}-token vocabulary",
                c.vocab_size
            )));
        }
        if pos >= max_seq || pos >= c.max_position_embeddings {
            return Err(EngineError::Request(format!(
                "sequence of {} tokens exceeds the {max_seq} the KV cache holds (model context {})",
                pos.saturating_add(1),
                c.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// One decode step for every sequence of `seqs` as one forward pass: each sequence's token is evaluated
    /// at its own position, its key and value written into its own cache and its next-token logits into its
    /// own buffer. The results equal [`forward`](Self::forward) of each sequence alone (up to the summation
    /// order of the batched projections).
    ///
    /// On the CUDA backend the step runs through [`decode_step_cuda`](Self::decode_step_cuda).
    ///
    /// # Errors
    ///
    /// [`EngineError::Request`] naming the first sequence whose token is outside the vocabulary, whose
    /// position is past its cache or the model's context, or whose logits buffer is not `vocab` f32s; nothing
    /// is computed then. Backend errors otherwise (caches may then hold partial rows at the new positions,
    /// which the next step at those positions overwrites).
    pub fn decode_batch(
        &self,
        dev: &Device,
        seqs: &mut [BatchSeq<'_>],
        scratch: &mut BatchScratch,
    ) -> Result<(), EngineError> {
        let c = self.config();
        for (i, s) in seqs.iter().enumerate() {
            let invalid = |e: EngineError| EngineError::Request(format!("sequence {i} of the batch: {e}"));
            self.check_decode(s.kv.max_seq(), s.pos, s.token).map_err(invalid)?;
            if s.logits.len() != c.vocab_size || s.logits.dtype() != DType::F32 {
                return Err(invalid(EngineError::Request(format!(
                    "logits buffer holds {} {:?}, vocab is {} f32",
                    s.logits.len(),
                    s.logits.dtype(),
                    c.vocab_size
                ))));
            }
        }
        scratch.device_wait = std::time::Duration::ZERO;
        if seqs.is_empty() {
            return Ok(());
        }
        if let Device::Cuda(cuda) = dev {
            let steps: Vec<_> = seqs
                .iter()
                .map(|s| driftwood_backend::cuda::SeqStep {
                    kv: s.kv.as_ptr() as u64,
                    logits: s.logits.addr() as u64,
                    pos: s.pos as i32,
                    max_seq: s.kv.max_seq() as i32,
                    token: s.token,
                    ..Default::default()
                })
                .collect();
            for part in steps.chunks(driftwood_backend::cuda::MAX_BATCH) {
                scratch.device_wait += self.decode_step_cuda_waited(cuda, part)?;
            }
            return Ok(());
        }
        self.decode_batch_cpu(dev, seqs, scratch)
    }

    fn decode_batch_cpu(
        &self,
        dev: &Device,
        seqs: &mut [BatchSeq<'_>],
        s: &mut BatchScratch,
    ) -> Result<(), EngineError> {
        if let [seq] = seqs {
            // One sequence: nothing to share; the single-sequence pass writes straight into its cache rows.
            let (pos, token) = (seq.pos, seq.token);
            return self.forward(dev, &mut seq.kv, pos, &[token], seq.logits.reborrow(), &mut s.single);
        }
        let c = self.config();
        let b = seqs.len();
        let (h, qd, kvd, ff, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let (eps, vocab) = (c.rms_norm_eps, c.vocab_size);
        let lin = |input, output| LinearDims { t: b, input, output };

        // RoPE tables, one row per sequence at its own position: rope over the b rows with table offset 0
        // rotates row i by sequence i's position.
        s.cos.clear();
        s.sin.clear();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for seq in seqs.iter() {
            crate::rope::tables(&self.inv_freq, seq.pos, 1, &mut cos, &mut sin); // (1, hd/2) each
            s.cos.extend_from_slice(&cos);
            s.sin.extend_from_slice(&sin);
        }
        s.tokens.clear();
        s.tokens.extend(seqs.iter().map(|seq| seq.token));

        let x = sized(&mut s.x, b * h); // (b, hidden)
        dev.embed(self.embed.view(), &s.tokens, w(x))?;
        sized(&mut s.xn, b * h);
        sized(&mut s.q, b * qd);
        sized(&mut s.k, b * kvd);
        sized(&mut s.v, b * kvd);
        sized(&mut s.att, b * qd);
        sized(&mut s.gate, b * ff);
        sized(&mut s.up, b * ff);
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block: xn = norm(x); q, k, v = xn · W over the b rows (each weight read once).
            dev.rms_norm(r(&s.x), r(&layer.attn_norm), eps, w(&mut s.xn))?;
            dev.linear(r(&s.xn), layer.wq.view(), opt(&layer.bq), w(&mut s.q), lin(h, qd))?;
            dev.linear(r(&s.xn), layer.wk.view(), opt(&layer.bk), w(&mut s.k), lin(h, kvd))?;
            dev.linear(r(&s.xn), layer.wv.view(), opt(&layer.bv), w(&mut s.v), lin(h, kvd))?;
            dev.rope(w(&mut s.q), r(&s.cos), r(&s.sin), 0, c.num_heads, hd)?; // (b, q_dim)
            dev.rope(w(&mut s.k), r(&s.cos), r(&s.sin), 0, c.num_kv_heads, hd)?; // (b, kv_dim)
            for (i, seq) in seqs.iter_mut().enumerate() {
                // Row i's key and value land in sequence i's cache at its position; its query attends to
                // its own rows 0..=pos.
                store_rows(seq.kv.k_mut(l, seq.pos, 1), &s.k[i * kvd..(i + 1) * kvd])?; // (1, kv_dim)
                store_rows(seq.kv.v_mut(l, seq.pos, 1), &s.v[i * kvd..(i + 1) * kvd])?; // (1, kv_dim)
                let dims = AttentionDims {
                    t: 1,
                    pos: seq.pos,
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: hd,
                    window: c.sliding_window,
                };
                let (q, att) = (&s.q[i * qd..(i + 1) * qd], &mut s.att[i * qd..(i + 1) * qd]); // (1, q_dim)
                dev.attention(r(q), seq.kv.k(l, seq.pos + 1), seq.kv.v(l, seq.pos + 1), w(att), dims)?;
            }
            dev.linear(r(&s.att), layer.wo.view(), None, w(&mut s.xn), lin(qd, h))?;
            dev.add_assign(w(&mut s.x), r(&s.xn))?;

            // MLP block: x += down(silu(gate(xn)) · up(xn)), xn = norm(x).
            dev.rms_norm(r(&s.x), r(&layer.ffn_norm), eps, w(&mut s.xn))?;
            dev.linear(r(&s.xn), layer.w_gate.view(), None, w(&mut s.gate), lin(h, ff))?;
            dev.linear(r(&s.xn), layer.w_up.view(), None, w(&mut s.up), lin(h, ff))?;
            dev.silu_mul(w(&mut s.gate), r(&s.up))?;
            dev.linear(r(&s.gate), layer.w_down.view(), None, w(&mut s.xn), lin(ff, h))?;
            dev.add_assign(w(&mut s.x), r(&s.xn))?;
        }
        // Logits: (b, hidden) → (b, vocab), then row i into sequence i's buffer.
        dev.rms_norm(r(&s.x), r(&self.final_norm), eps, w(&mut s.xn))?;
        let logits = sized(&mut s.logits, b * vocab);
        dev.linear(r(&s.xn), self.lm_head.view(), None, w(logits), lin(h, vocab))?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            store_rows(seq.logits.reborrow(), &s.logits[i * vocab..(i + 1) * vocab])?;
        }
        Ok(())
    }
}
