//! A model's weights on the CUDA device: uploaded once per model as bf16 (f32 and f16 checkpoints are rounded to
//! bf16 on upload) and shared by every actor, with the device state the steps keep (scratch, captured graphs).

use std::collections::HashMap;
use std::sync::Mutex;

use driftwood_backend::cuda::{CudaBackend, DeviceTensor, Graph, HEAD_DIMS};
use driftwood_backend::{BackendError, DType, TensorRef};

use super::decode::GpuScratch;
use super::prefill::PrefillScratch;
use crate::{EngineError, Model};

/// One layer's weights on the device.
#[derive(Debug)]
pub(crate) struct GpuLayer {
    pub attn_norm: DeviceTensor,    // (hidden) f32
    pub wqkv: DeviceTensor,         // (q_dim + 2 kv_dim, hidden) bf16: wq, wk, wv stacked
    pub bqkv: Option<DeviceTensor>, // (q_dim + 2 kv_dim) f32
    pub wo: DeviceTensor,           // (hidden, q_dim) bf16
    pub ffn_norm: DeviceTensor,     // (hidden) f32
    pub w_gu: DeviceTensor,         // (2 intermediate, hidden) bf16: w_gate then w_up, one GEMM in prefill
    pub w_down: DeviceTensor,       // (hidden, intermediate) bf16
}

impl GpuLayer {
    /// The gate rows of `w_gu`.
    pub fn w_gate(&self) -> u64 {
        self.w_gu.addr()
    }

    /// The up rows of `w_gu`: the second half.
    pub fn w_up(&self) -> u64 {
        self.w_gu.addr() + (self.w_gu.bytes() / 2) as u64
    }
}

/// A model's device state: its weights, the scratch of its steps and their captured graphs.
#[derive(Debug)]
pub(crate) struct GpuModel {
    pub embed: DeviceTensor,           // (vocab, hidden) bf16
    pub lm_head: Option<DeviceTensor>, // (vocab, hidden) bf16; None when tied to `embed`
    pub final_norm: DeviceTensor,      // (hidden) f32
    pub inv_freq: DeviceTensor,        // (head_dim / 2) f32
    pub layers: Vec<GpuLayer>,
    /// Taken before the backend's `exec` lock, by every step and prefill (one lock order).
    pub state: Mutex<GpuState>,
}

/// What the steps of one model keep on the device between calls.
#[derive(Debug, Default)]
pub(crate) struct GpuState {
    pub scratch: Option<GpuScratch>,
    pub prefill: Option<PrefillScratch>,
    /// Captured decode steps by (batch, splits, logits address for batch 1, whether the cache is staged).
    pub graphs: HashMap<(usize, usize, u64, bool), Graph>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The weight as bf16 bytes (copied as is when already bf16).
fn bf16_bytes(w: TensorRef<'_>, out: &mut Vec<u8>) {
    match w.dtype() {
        DType::BF16 => out.extend(w.as_bf16().unwrap_or_default().iter().flat_map(|x| x.to_bits().to_le_bytes())),
        DType::F32 => out.extend(
            w.as_f32().unwrap_or_default().iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()),
        ),
        DType::F16 => out.extend(
            w.as_f16()
                .unwrap_or_default()
                .iter()
                .flat_map(|x| half::bf16::from_f32(x.to_f32()).to_bits().to_le_bytes()),
        ),
    }
}

fn upload_bf16(dev: &CudaBackend, parts: &[TensorRef<'_>]) -> Result<DeviceTensor, BackendError> {
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len() * 2).sum());
    for p in parts {
        bf16_bytes(*p, &mut bytes);
    }
    dev.upload(&bytes)
}

impl GpuModel {
    pub(crate) fn upload(m: &Model, dev: &CudaBackend) -> Result<Self, EngineError> {
        let c = m.config();
        if !HEAD_DIMS.contains(&c.head_dim)
            || ![1, 2, 4, 8].iter().any(|&g| g * c.num_kv_heads == c.num_heads)
            || !c.hidden_size.is_multiple_of(8)
            || !c.intermediate_size.is_multiple_of(8)
        {
            return Err(EngineError::Request(format!(
                "the CUDA backend needs head_dim 32, 64 or 128, 1, 2, 4 or 8 query heads per KV head and \
                 hidden and intermediate sizes multiples of 8 (this model: head_dim {}, {} heads, {} KV heads, \
                 hidden {}, intermediate {})",
                c.head_dim, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size
            )));
        }
        let f32t = |v: &[f32]| dev.upload(&f32_bytes(v));
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let bqkv = match (&l.bq, &l.bk, &l.bv) {
                (Some(q), Some(k), Some(v)) => Some(f32t(&[q.as_slice(), k, v].concat())?),
                _ => None,
            };
            layers.push(GpuLayer {
                attn_norm: f32t(&l.attn_norm)?,
                wqkv: upload_bf16(dev, &[l.wq.view(), l.wk.view(), l.wv.view()])?,
                bqkv,
                wo: upload_bf16(dev, &[l.wo.view()])?,
                ffn_norm: f32t(&l.ffn_norm)?,
                w_gu: upload_bf16(dev, &[l.w_gate.view(), l.w_up.view()])?,
                w_down: upload_bf16(dev, &[l.w_down.view()])?,
            });
        }
        let tied = m.lm_head.view().addr() == m.embed.view().addr();
        Ok(GpuModel {
            embed: upload_bf16(dev, &[m.embed.view()])?,
            lm_head: if tied { None } else { Some(upload_bf16(dev, &[m.lm_head.view()])?) },
            final_norm: f32t(&m.final_norm)?,
            inv_freq: f32t(&m.inv_freq)?,
            layers,
            state: Mutex::default(),
        })
    }

    pub(crate) fn lm_head(&self) -> u64 {
        self.lm_head.as_ref().unwrap_or(&self.embed).addr()
    }
}

impl Model {
    /// This model's weights on `dev`, uploaded on first use.
    pub(crate) fn gpu(&self, dev: &CudaBackend) -> Result<&GpuModel, EngineError> {
        if let Some(g) = self.gpu.get() {
            return Ok(g);
        }
        // One upload: the others wait for it and find it done.
        let _uploading = self.gpu_upload.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = self.gpu.get() {
            return Ok(g);
        }
        let g = GpuModel::upload(self, dev)?;
        Ok(self.gpu.get_or_init(|| g))
    }

    /// Uploads the weights to `dev` now (otherwise the first GPU step does).
    ///
    /// # Errors
    ///
    /// A shape the CUDA kernels do not support, or a driver error (out of device memory).
    pub fn upload_to(&self, dev: &CudaBackend) -> Result<(), EngineError> {
        self.gpu(dev).map(|_| ())
    }

    /// Checks that a sequence's cache and logits can be used by the GPU: device-addressable, large enough for
    /// a bf16 cache of `max_seq` tokens, and the cache 16-byte aligned (the kernels read it in 16-byte units).
    pub(crate) fn check_gpu_buffers(
        &self,
        dev: &CudaBackend,
        kv: u64,
        max_seq: usize,
        logits: u64,
    ) -> Result<(), EngineError> {
        let kv_bytes = self.kv_bytes(max_seq, DType::BF16);
        if !dev.is_addressable(kv as usize, kv_bytes)
            || !dev.is_addressable(logits as usize, self.config().vocab_size * 4)
        {
            return Err(EngineError::Request(
                "the KV cache or logits are not in device-addressable memory: run actors with --placement pinned or managed"
                    .into(),
            ));
        }
        if !kv.is_multiple_of(16) {
            return Err(EngineError::Request(format!(
                "the KV cache at {kv:#x} is not 16-byte aligned, as the CUDA backend requires"
            )));
        }
        Ok(())
    }
}
