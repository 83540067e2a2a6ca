//! The extension point through which an accelerator backend provides or maps a region's memory.

use std::fmt;
use std::ptr::NonNull;

use crate::Placement;

/// The words a [`DeviceMemory`] provider puts in a refusal caused by exhausted device memory (rather than by a
/// driver fault or a misconfiguration), so that the host can tell a caller "the device is full now, try again
/// later or with fewer actors" apart from "this can never work". The provider's messages are plain strings
/// (wasmtime's `MemoryCreator` returns them), so the marker is part of the text.
pub const OUT_OF_DEVICE_MEMORY: &str = "out of device memory";

/// How a [`SharedRegion`](crate::SharedRegion) of a device placement gets its memory and makes it addressable by
/// the device. Implemented by GPU backends (the CUDA backend provides one per CUDA placement); the memory
/// layer calls it and never links a driver itself.
///
/// # Safety
///
/// Implementors promise, for every call the region makes:
///
/// 1. [`allocate`](Self::allocate) returns either `None` (the region then reserves an anonymous mapping
///    itself) or a pointer to `bytes` bytes, page-aligned, readable and writable by the CPU, that stay valid
///    and never move until [`free`](Self::free) is called with the same pointer and size.
/// 2. After [`commit`](Self::commit)`(ptr, len)` returns `Ok`, the `len` bytes at `ptr` read as zero (when the
///    region allocated them itself they are already zero) and the device can read and write them at the same
///    address the CPU uses; an `Err` leaves nothing registered.
/// 3. [`release`](Self::release) undoes one successful `commit` of the same range; the region calls it, once per
///    committed range, before it frees or unmaps the memory.
/// 4. The device touches these bytes only while the host is inside a call that launched the work and waits for
///    it (the region itself does not enforce this; the backend's calls do).
pub unsafe trait DeviceMemory: Send + Sync + fmt::Debug {
    /// The placement this provider implements.
    fn placement(&self) -> Placement;

    /// Allocates the region's whole reservation, or returns `None` to let the region map it itself.
    ///
    /// # Errors
    ///
    /// A message when the device cannot provide the memory (for example, less free device memory than asked).
    fn allocate(&self, bytes: usize) -> Result<Option<NonNull<u8>>, String>;

    /// Frees what [`allocate`](Self::allocate) returned.
    ///
    /// # Safety
    ///
    /// `base` and `bytes` are exactly what a successful `allocate` returned and was asked for, and nothing uses
    /// the memory any more.
    unsafe fn free(&self, base: NonNull<u8>, bytes: usize);

    /// Makes a newly committed range zero and addressable by the device (contract 2).
    ///
    /// # Safety
    ///
    /// The range lies inside the region, is readable and writable, and does not overlap a range already
    /// committed.
    ///
    /// # Errors
    ///
    /// A message naming what the driver refused.
    unsafe fn commit(&self, ptr: NonNull<u8>, len: usize) -> Result<(), String>;

    /// Undoes one successful [`commit`](Self::commit).
    ///
    /// # Safety
    ///
    /// `ptr` and `len` are exactly those of a successful `commit` not yet released, and the device no longer
    /// uses the range.
    unsafe fn release(&self, ptr: NonNull<u8>, len: usize);
}
