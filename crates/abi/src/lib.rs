//! The one source of truth for the host ABI between Driftwood and its actors: the version both sides check, the
//! import module's name, the dtype codes, and the [`ModelInfo`] record `driftwood.model_info` writes. The host
//! (`driftwood-host`) and the guest SDK (`driftwood-guest`, built for wasm32) both depend on this crate, so the
//! two cannot disagree on a word's meaning. `no_std`, no dependencies. [`serve`] holds the serving
//! protocol's version and frames, the exports `driftwood serve` calls beyond the host ABI.
//!
//! Version history:
//! - **1**: the KV cache has a dtype. `model_info` writes [`MODEL_INFO_WORDS`] words, among them the dtype the
//!   host recommends ([`ModelInfo::kv_dtype`]) and the cache's alignment; `forward`, `session_save` and
//!   `session_load` take the dtype of the guest's cache after its address (the guest keeps it in its own memory,
//!   so an actor snapshot carries it); the cache must be [`KV_ALIGN`]-byte aligned.
//! - 0: f32 KV caches only.

#![no_std]
#![warn(missing_docs)]

pub mod serve;

/// The ABI version. The host refuses a module whose `driftwood_abi_version` export returns another.
pub const ABI_VERSION: u32 = 1;

/// The import module guests link against.
pub const MODULE: &str = "driftwood";

/// Alignment, in bytes, the host requires of a KV cache's address (the GPU reads it in 16-byte units).
pub const KV_ALIGN: u32 = 16;

/// Element type codes of the ABI (`dtype` arguments of `matmul`, the KV dtype of `forward` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DTypeCode {
    /// IEEE 754 binary32.
    F32 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// IEEE 754 binary16 (weights only; not a KV dtype).
    F16 = 2,
}

impl DTypeCode {
    /// The type whose code is `code`.
    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(DTypeCode::F32),
            1 => Some(DTypeCode::Bf16),
            2 => Some(DTypeCode::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> u32 {
        match self {
            DTypeCode::F32 => 4,
            DTypeCode::Bf16 | DTypeCode::F16 => 2,
        }
    }
}

/// Words `model_info` writes.
pub const MODEL_INFO_WORDS: usize = 20;

/// Most end-of-sequence ids [`ModelInfo`] carries.
pub const MAX_EOS: usize = 6;

/// What `driftwood.model_info` tells an actor about a model, as [`MODEL_INFO_WORDS`] little-endian u32 words
/// in this field order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ModelInfo {
    /// Vocabulary size: the length of the logits.
    pub vocab_size: u32,
    /// Width of the residual stream.
    pub hidden_size: u32,
    /// Transformer blocks.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Longest sequence the model supports.
    pub max_position: u32,
    /// Bytes of KV cache one token needs in [`kv_dtype`](Self::kv_dtype): `layers · 2 · kv_heads · head_dim ·
    /// size`.
    pub kv_bytes_per_token: u32,
    /// Beginning-of-sequence token, `u32::MAX` if none.
    pub bos: u32,
    /// How many of `eos` are used.
    pub eos_count: u32,
    /// Tokens that end a generation.
    pub eos: [u32; MAX_EOS],
    /// The KV dtype the host recommends for this model on its backend (a [`DTypeCode`]).
    pub kv_dtype: u32,
    /// Alignment the host requires of a KV cache's address ([`KV_ALIGN`]).
    pub kv_align: u32,
    /// Zero.
    pub reserved: [u32; 2],
}

const _: () = assert!(core::mem::size_of::<ModelInfo>() == MODEL_INFO_WORDS * 4);

impl ModelInfo {
    /// The record as the words `model_info` writes.
    pub fn to_words(&self) -> [u32; MODEL_INFO_WORDS] {
        let mut w = [0u32; MODEL_INFO_WORDS];
        let head = [
            self.vocab_size,
            self.hidden_size,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.max_position,
            self.kv_bytes_per_token,
            self.bos,
            self.eos_count,
        ];
        w[..10].copy_from_slice(&head);
        w[10..16].copy_from_slice(&self.eos);
        w[16] = self.kv_dtype;
        w[17] = self.kv_align;
        w[18..20].copy_from_slice(&self.reserved);
        w
    }

    /// The record from the words `model_info` wrote.
    pub fn from_words(w: &[u32; MODEL_INFO_WORDS]) -> Self {
        let mut eos = [0u32; MAX_EOS];
        eos.copy_from_slice(&w[10..16]);
        ModelInfo {
            vocab_size: w[0],
            hidden_size: w[1],
            layers: w[2],
            heads: w[3],
            kv_heads: w[4],
            head_dim: w[5],
            max_position: w[6],
            kv_bytes_per_token: w[7],
            bos: w[8],
            eos_count: w[9],
            eos,
            kv_dtype: w[16],
            kv_align: w[17],
            reserved: [w[18], w[19]],
        }
    }

    /// The end-of-sequence ids in use.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos[..(self.eos_count as usize).min(MAX_EOS)]
    }

    /// Bytes of a KV cache of `max_seq` tokens whose elements are `dtype`, or `None` on overflow of `usize`.
    pub fn kv_bytes(&self, max_seq: u32, dtype: DTypeCode) -> Option<usize> {
        let per_token = (self.layers as usize)
            .checked_mul(2)?
            .checked_mul(self.kv_heads as usize)?
            .checked_mul(self.head_dim as usize)?
            .checked_mul(dtype.size() as usize)?;
        per_token.checked_mul(max_seq as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let info = ModelInfo {
            vocab_size: 1,
            hidden_size: 2,
            layers: 3,
            heads: 4,
            kv_heads: 5,
            head_dim: 6,
            max_position: 7,
            kv_bytes_per_token: 8,
            bos: 9,
            eos_count: 2,
            eos: [10, 11, 12, 13, 14, 15],
            kv_dtype: 1,
            kv_align: 16,
            reserved: [0, 0],
        };
        assert_eq!(ModelInfo::from_words(&info.to_words()), info);
        assert_eq!(info.eos_ids(), &[10, 11]);
        assert_eq!(info.to_words()[16], 1);
        assert_eq!(info.kv_bytes(10, DTypeCode::Bf16), Some(3 * 2 * 5 * 6 * 2 * 10));
    }

    #[test]
    fn dtype_codes() {
        for code in 0..3 {
            assert_eq!(DTypeCode::from_code(code).map(|d| d as u32), Some(code));
        }
        assert_eq!(DTypeCode::from_code(3), None);
    }
}
