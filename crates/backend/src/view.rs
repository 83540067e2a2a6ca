//! Typed raw views of memory that a backend reads or writes in place.
//!
//! A view is an address, an element count and a dtype, tied to a lifetime. Creating one from raw parts is
//! `unsafe` because the view asserts facts about memory the type system cannot see; creating one from a Rust
//! slice is safe. Once made, a view can be handed to any backend safely.

use std::marker::PhantomData;
use std::ptr::NonNull;

use half::{bf16, f16};

use crate::DType;

/// A read-only view of `len` elements of `dtype` at `ptr`, valid for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    ptr: NonNull<u8>,
    len: usize,
    dtype: DType,
    _borrow: PhantomData<&'a [u8]>,
}

/// A writable view of `len` elements of `dtype` at `ptr`, valid and exclusive for `'a`.
#[derive(Debug)]
pub struct TensorMut<'a> {
    ptr: NonNull<u8>,
    len: usize,
    dtype: DType,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> TensorRef<'a> {
    /// Views `len` elements of `dtype` starting at `ptr`.
    ///
    /// # Safety
    ///
    /// For the whole lifetime `'a`:
    /// 1. `ptr` is non-null and aligned to `dtype.align()`;
    /// 2. the `len * dtype.size()` bytes from `ptr` are readable and that size does not overflow `isize`;
    /// 3. nothing writes those bytes (in particular no [`TensorMut`] overlaps them).
    pub unsafe fn from_raw_parts(ptr: *const u8, len: usize, dtype: DType) -> Self {
        TensorRef {
            // SAFETY: non-null by condition 1.
            ptr: unsafe { NonNull::new_unchecked(ptr.cast_mut()) },
            len,
            dtype,
            _borrow: PhantomData,
        }
    }

    /// Views an `f32` slice.
    pub fn from_f32(data: &'a [f32]) -> Self {
        // SAFETY: a slice is non-null, aligned, readable and not mutated while borrowed.
        unsafe { Self::from_raw_parts(data.as_ptr().cast(), data.len(), DType::F32) }
    }

    /// Views a `bf16` slice.
    pub fn from_bf16(data: &'a [bf16]) -> Self {
        // SAFETY: as for `from_f32`.
        unsafe { Self::from_raw_parts(data.as_ptr().cast(), data.len(), DType::BF16) }
    }

    /// Views an `f16` slice.
    pub fn from_f16(data: &'a [f16]) -> Self {
        // SAFETY: as for `from_f32`.
        unsafe { Self::from_raw_parts(data.as_ptr().cast(), data.len(), DType::F16) }
    }

    /// Element count.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Address of the first byte; the backend computes on exactly this address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The elements as `f16`, if the view is `f16`.
    pub fn as_f16(&self) -> Option<&'a [f16]> {
        (self.dtype == DType::F16)
            // SAFETY: as in `as_f32`.
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) })
    }

    /// Narrows the view to elements `start..start + len`.
    ///
    /// # Panics
    ///
    /// If the range is not inside the view (a caller bug, never guest-controlled: ranges from guests are
    /// validated before views are made).
    pub fn slice(&self, start: usize, len: usize) -> TensorRef<'a> {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len), "view slice out of range");
        // SAFETY: a sub-range of a valid view is valid under the same conditions; alignment is kept because
        // `start` counts whole elements.
        unsafe { TensorRef::from_raw_parts(self.ptr.as_ptr().add(start * self.dtype.size()), len, self.dtype) }
    }

    /// The elements as `f32`, if the view is `f32`.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        (self.dtype == DType::F32)
            // SAFETY: conditions 1–3 of `from_raw_parts` make this a valid shared slice for 'a.
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) })
    }

    /// The elements as `bf16`, if the view is `bf16`.
    pub fn as_bf16(&self) -> Option<&'a [bf16]> {
        (self.dtype == DType::BF16)
            // SAFETY: as in `as_f32`.
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) })
    }
}

impl<'a> TensorMut<'a> {
    /// Views `len` writable elements of `dtype` starting at `ptr`.
    ///
    /// # Safety
    ///
    /// For the whole lifetime `'a`:
    /// 1. `ptr` is non-null and aligned to `dtype.align()`;
    /// 2. the `len * dtype.size()` bytes from `ptr` are readable and writable and that size does not
    ///    overflow `isize`;
    /// 3. nothing else reads or writes those bytes (no other view overlaps them).
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize, dtype: DType) -> Self {
        TensorMut {
            // SAFETY: non-null by condition 1.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
            dtype,
            _borrow: PhantomData,
        }
    }

    /// Views a mutable `f32` slice.
    pub fn from_f32(data: &'a mut [f32]) -> Self {
        // SAFETY: a mutable slice is non-null, aligned, writable and exclusive while borrowed.
        unsafe { Self::from_raw_parts(data.as_mut_ptr().cast(), data.len(), DType::F32) }
    }

    /// Element count.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Address of the first byte; the backend computes on exactly this address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Reborrows the view for a shorter time, so it can be passed on and used again afterwards.
    pub fn reborrow(&mut self) -> TensorMut<'_> {
        TensorMut { ptr: self.ptr, len: self.len, dtype: self.dtype, _borrow: PhantomData }
    }

    /// A read-only view of the same elements for as long as this borrow lasts.
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef { ptr: self.ptr, len: self.len, dtype: self.dtype, _borrow: PhantomData }
    }

    /// The elements as a mutable `f32` slice, if the view is `f32`.
    pub fn into_f32(self) -> Option<&'a mut [f32]> {
        (self.dtype == DType::F32)
            // SAFETY: conditions 1–3 of `from_raw_parts` make this a valid exclusive slice for 'a.
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) })
    }

    /// The elements as a mutable `bf16` slice, if the view is `bf16`.
    pub fn into_bf16(self) -> Option<&'a mut [bf16]> {
        (self.dtype == DType::BF16)
            // SAFETY: as in `into_f32`.
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) })
    }
}
