//! [`KvCache`]: a view of one sequence's keys and values, preallocated and written in place.
//!
//! Layout, f32 or bf16: `(layer, {k, v}, max_seq, kv_dim)` with `kv_dim = kv_heads · head_dim`. A token's K (or V)
//! for a layer is one contiguous row, so the K and V projections of new tokens write straight into their
//! rows, and the first `n` tokens of a layer's K are one contiguous `(n, kv_dim)` block (what a session
//! snapshot stores).

use std::marker::PhantomData;

use driftwood_backend::{DType, TensorMut, TensorRef};

use crate::{EngineError, Model};

/// A KV cache for up to `max_seq` tokens of one model, over memory the caller owns (in Driftwood: the
/// actor's linear memory).
#[derive(Debug)]
pub struct KvCache<'a> {
    base: *mut u8,
    dtype: DType,
    layers: usize,
    max_seq: usize,
    kv_dim: usize,
    _memory: PhantomData<&'a mut [f32]>,
}

impl<'a> KvCache<'a> {
    /// Views `model.kv_floats(max_seq)` f32s at `base` as an f32 KV cache.
    ///
    /// # Safety
    ///
    /// For `'a`: 1. `base` is non-null and 4-byte aligned; 2. the `model.kv_floats(max_seq)` f32s from `base`
    /// are readable and writable; 3. nothing else accesses them.
    pub unsafe fn from_raw_parts(base: *mut f32, model: &Model, max_seq: usize) -> Self {
        // SAFETY: the caller's conditions are those of `from_raw_parts_typed` for f32.
        unsafe { Self::from_raw_parts_typed(base.cast(), DType::F32, model, max_seq) }
    }

    /// Views `model.kv_bytes(max_seq, dtype)` bytes at `base` as a KV cache of `dtype` (f32 or bf16).
    ///
    /// # Safety
    ///
    /// For `'a`: 1. `base` is non-null and aligned to `dtype`; 2. the `model.kv_bytes(max_seq, dtype)` bytes
    /// from `base` are readable and writable; 3. nothing else accesses them.
    pub unsafe fn from_raw_parts_typed(base: *mut u8, dtype: DType, model: &Model, max_seq: usize) -> Self {
        let c = model.config();
        KvCache { base, dtype, layers: c.num_layers, max_seq, kv_dim: c.kv_dim(), _memory: PhantomData }
    }

    /// The element type of the cache.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Tokens the cache can hold.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Address of the cache's first byte (for a device backend that addresses guest memory directly).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    fn offset(&self, layer: usize, which: usize, row: usize) -> usize {
        ((layer * 2 + which) * self.max_seq + row) * self.kv_dim
    }

    fn rows(&self, layer: usize, which: usize, start: usize, n: usize) -> TensorRef<'_> {
        assert!(layer < self.layers && start + n <= self.max_seq, "KV rows out of range");
        // SAFETY: in bounds by the assert and the constructor's condition 2; shared borrow of self means no
        // TensorMut of this cache is alive.
        unsafe {
            TensorRef::from_raw_parts(
                self.base.add(self.offset(layer, which, start) * self.dtype.size()),
                n * self.kv_dim,
                self.dtype,
            )
        }
    }

    fn rows_mut(&mut self, layer: usize, which: usize, start: usize, n: usize) -> TensorMut<'_> {
        assert!(layer < self.layers && start + n <= self.max_seq, "KV rows out of range");
        // SAFETY: as in `rows`, and `&mut self` makes this the only view.
        unsafe {
            TensorMut::from_raw_parts(
                self.base.add(self.offset(layer, which, start) * self.dtype.size()),
                n * self.kv_dim,
                self.dtype,
            )
        }
    }

    /// Keys of `layer`, rows `start..start + n` (writable).
    ///
    /// # Panics
    ///
    /// If the rows are outside the cache (callers check sequence lengths first).
    pub fn k_mut(&mut self, layer: usize, start: usize, n: usize) -> TensorMut<'_> {
        self.rows_mut(layer, 0, start, n)
    }

    /// Values of `layer`, rows `start..start + n` (writable).
    ///
    /// # Panics
    ///
    /// As [`k_mut`](Self::k_mut).
    pub fn v_mut(&mut self, layer: usize, start: usize, n: usize) -> TensorMut<'_> {
        self.rows_mut(layer, 1, start, n)
    }

    /// Keys of `layer`, the first `n` rows.
    ///
    /// # Panics
    ///
    /// As [`k_mut`](Self::k_mut).
    pub fn k(&self, layer: usize, n: usize) -> TensorRef<'_> {
        self.rows(layer, 0, 0, n)
    }

    /// Values of `layer`, the first `n` rows.
    ///
    /// # Panics
    ///
    /// As [`k_mut`](Self::k_mut).
    pub fn v(&self, layer: usize, n: usize) -> TensorRef<'_> {
        self.rows(layer, 1, 0, n)
    }
}

/// Stores f32 rows `src` into cache rows `dst` of the cache's dtype: a copy for f32, one round to nearest
/// even for bf16 (the only rounding a bf16 cache's values see).
///
/// # Errors
///
/// [`EngineError::Request`] when the lengths differ or the cache's dtype is neither f32 nor bf16.
pub(crate) fn store_rows(dst: TensorMut<'_>, src: &[f32]) -> Result<(), EngineError> {
    let (len, dtype) = (dst.len(), dst.dtype());
    if len != src.len() {
        return Err(EngineError::Request(format!("{} new KV values cannot fill {len} cache elements", src.len())));
    }
    match dtype {
        DType::F32 => dst.into_f32().map(|d| d.copy_from_slice(src)),
        DType::BF16 => dst.into_bf16().map(|d| {
            for (o, &x) in d.iter_mut().zip(src) {
                *o = half::bf16::from_f32(x);
            }
        }),
        _ => None,
    }
    .ok_or_else(|| EngineError::Request(format!("a KV cache of {dtype} is not supported; use f32 or bf16")))
}
