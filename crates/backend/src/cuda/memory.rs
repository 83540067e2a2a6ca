//! The CUDA placements: [`DeviceMemory`] providers that make actor regions addressable by the GPU, and the
//! registry of those ranges the backend checks every operand against.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use driftwood_memory::{DeviceMemory, Placement};

use super::driver::{self, Context};

/// Host address ranges the device can address at the same address (start → (length, whether the bytes stay
/// in host memory, i.e. the device reads them across the bus)).
#[derive(Debug, Default)]
pub(crate) struct Addressable(Mutex<BTreeMap<usize, (usize, bool)>>);

impl Addressable {
    fn insert(&self, start: usize, len: usize, in_host: bool) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(start, (len, in_host));
    }

    /// Whether the range holding `addr` is page-locked host memory (pinned placement) rather than memory the
    /// driver keeps on the device; false for an address in no range.
    pub(crate) fn in_host(&self, addr: usize) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        matches!(map.range(..=addr).next_back(), Some((&s, &(l, true))) if s + l > addr)
    }

    fn remove(&self, start: usize) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&start);
    }

    /// Whether `[addr, addr + len)` lies inside one device-addressable range (adjacent registered ranges of
    /// one region count as one).
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(end) = addr.checked_add(len) else { return false };
        let mut cursor = addr;
        // Walk the ranges that cover `cursor` until `end` is covered.
        while cursor < end || (len == 0 && cursor == addr) {
            match map.range(..=cursor).next_back() {
                Some((&s, &(l, _))) if s + l > cursor => {
                    if len == 0 {
                        return true;
                    }
                    cursor = s + l;
                }
                _ => return false,
            }
        }
        true
    }
}

/// Pinned placement: each committed range of the region is page-locked and mapped into the device's address
/// space with `cuMemHostRegister`; the device address must equal the host address (unified addressing).
#[derive(Debug)]
pub(crate) struct PinnedMemory {
    pub(crate) ctx: Arc<Context>,
    pub(crate) ranges: Arc<Addressable>,
}

// SAFETY: (1) `allocate` returns None: the region maps the memory itself. (2) `commit` registers exactly the
// committed range (fresh anonymous pages, so zero) and fails unless the device address equals the host
// address, unregistering again in that case. (3) `release` unregisters what `commit` registered. (4) is the
// backend's: launches on guest memory are synchronized before the host call returns.
unsafe impl DeviceMemory for PinnedMemory {
    fn placement(&self) -> Placement {
        Placement::CudaPinned
    }

    fn allocate(&self, _bytes: usize) -> Result<Option<NonNull<u8>>, String> {
        Ok(None)
    }

    unsafe fn free(&self, _base: NonNull<u8>, _bytes: usize) {}

    unsafe fn commit(&self, ptr: NonNull<u8>, len: usize) -> Result<(), String> {
        self.ctx.bind().map_err(|e| e.to_string())?;
        // SAFETY: the region's promise: the range is mapped RW and not registered yet.
        let device = unsafe { driver::host_register(ptr.as_ptr(), len) }.map_err(|e| e.to_string())?;
        if device != ptr.as_ptr() as u64 {
            // SAFETY: registered just above, unused.
            unsafe { driver::host_unregister(ptr.as_ptr()) };
            return Err(format!(
                "the device maps host address {:#x} at {device:#x}; Driftwood needs them equal (unified addressing)",
                ptr.as_ptr() as usize
            ));
        }
        self.ranges.insert(ptr.as_ptr() as usize, len, true);
        Ok(())
    }

    unsafe fn release(&self, ptr: NonNull<u8>, _len: usize) {
        self.ranges.remove(ptr.as_ptr() as usize);
        if self.ctx.bind().is_ok() {
            // SAFETY: registered by `commit`; the region calls this once, after device work on it ended.
            unsafe { driver::host_unregister(ptr.as_ptr()) };
        }
    }
}

/// Managed placement: the whole region is one `cuMemAllocManaged` allocation, refused when it would exceed the
/// device's free memory.
#[derive(Debug)]
pub(crate) struct ManagedMemory {
    pub(crate) ctx: Arc<Context>,
    pub(crate) ranges: Arc<Addressable>,
}

// SAFETY: (1) `allocate` returns a fresh managed allocation of `bytes` (page-aligned: the driver aligns
// managed allocations to at least 4 KiB... checked below), freed only in `free`. (2) `commit` zeroes the range
// on the device (synchronously); managed memory is addressable by the device at the host address. (3) `release` only forgets
// the range. (4) as for pinned.
unsafe impl DeviceMemory for ManagedMemory {
    fn placement(&self) -> Placement {
        Placement::CudaManaged
    }

    fn allocate(&self, bytes: usize) -> Result<Option<NonNull<u8>>, String> {
        let (free, _total) = self.ctx.mem_info().map_err(|e| e.to_string())?;
        if bytes > free {
            return Err(format!(
                "an actor memory of {bytes} bytes exceeds the device's {free} free bytes; lower the actor memory limit"
            ));
        }
        let ptr = driver::managed_alloc(bytes).map_err(|e| e.to_string())?;
        if !(ptr as usize).is_multiple_of(driftwood_memory::page_size()) {
            // SAFETY: just allocated, unused.
            unsafe { driver::managed_free(ptr) };
            return Err("the driver returned managed memory that is not page-aligned".into());
        }
        // Map the whole allocation into the device's page tables: pages the guest touches (tokens, logits) can
        // then be read and written by the device where they are, instead of migrating back and forth each step.
        driver::advise_accessed_by_device(&self.ctx, ptr, bytes).map_err(|e| e.to_string())?;
        NonNull::new(ptr as *mut u8).map(Some).ok_or_else(|| "the driver returned a null pointer".into())
    }

    unsafe fn free(&self, base: NonNull<u8>, _bytes: usize) {
        if self.ctx.bind().is_ok() {
            // SAFETY: `base` came from `allocate` and is no longer used (the region's promise).
            unsafe { driver::managed_free(base.as_ptr() as u64) };
        }
    }

    unsafe fn commit(&self, ptr: NonNull<u8>, len: usize) -> Result<(), String> {
        // Zeroed by the device, so the pages start out resident in device memory (where the KV cache is read);
        // the ones the guest touches migrate to the host on demand.
        driver::managed_zero(&self.ctx, ptr.as_ptr() as u64, len).map_err(|e| e.to_string())?;
        self.ranges.insert(ptr.as_ptr() as usize, len, false);
        Ok(())
    }

    unsafe fn release(&self, ptr: NonNull<u8>, _len: usize) {
        self.ranges.remove(ptr.as_ptr() as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressable_ranges_cover_adjacent_commits_only() {
        let a = Addressable::default();
        a.insert(0x1000, 0x1000, true);
        a.insert(0x2000, 0x2000, true);
        assert!(a.contains(0x1000, 0x3000));
        assert!(a.contains(0x1800, 0x100));
        assert!(!a.contains(0x0fff, 2));
        assert!(!a.contains(0x3fff, 2));
        assert!(!a.contains(usize::MAX, 2));
        a.remove(0x2000);
        assert!(!a.contains(0x1000, 0x1001));
    }

    #[test]
    fn ranges_remember_whether_they_stay_in_host_memory() {
        let a = Addressable::default();
        a.insert(0x1000, 0x1000, true);
        a.insert(0x4000, 0x1000, false);
        assert!(a.in_host(0x1000) && a.in_host(0x1fff));
        assert!(!a.in_host(0x2000), "past the pinned range");
        assert!(!a.in_host(0x4800), "managed");
        assert!(!a.in_host(0x800), "in no range");
    }
}
