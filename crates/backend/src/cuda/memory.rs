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
        // Held across the check and the allocation, so that actors created together cannot all pass the check
        // against the same free memory.
        let mut account = managed_account();
        let (free, total) = self.ctx.mem_info().map_err(|e| e.to_string())?;
        account.admit(bytes, free, total)?;
        let ptr = driver::managed_alloc(bytes).map_err(|e| e.to_string())?;
        if !(ptr as usize).is_multiple_of(driftwood_memory::page_size()) {
            // SAFETY: just allocated, unused.
            unsafe { driver::managed_free(ptr) };
            return Err("the driver returned managed memory that is not page-aligned".into());
        }
        // Map the whole allocation into the device's page tables: pages the guest touches (tokens, logits) can
        // then be read and written by the device where they are, instead of migrating back and forth each step.
        // (The flip side: a page the CPU touched stays in host memory and the device reads it across the bus
        // until something moves it back; see `abi::session` and `Actor::write_snapshot_to` in the host.)
        if let Err(e) = driver::advise_accessed_by_device(&self.ctx, ptr, bytes) {
            // SAFETY: just allocated, unused.
            unsafe { driver::managed_free(ptr) };
            return Err(e.to_string());
        }
        let Some(base) = NonNull::new(ptr as *mut u8) else {
            return Err("the driver returned a null pointer".into());
        };
        account.reserved += bytes;
        Ok(Some(base))
    }

    unsafe fn free(&self, base: NonNull<u8>, bytes: usize) {
        if self.ctx.bind().is_ok() {
            // SAFETY: `base` came from `allocate` and is no longer used (the region's promise).
            unsafe { driver::managed_free(base.as_ptr() as u64) };
        }
        let mut account = managed_account();
        account.reserved = account.reserved.saturating_sub(bytes);
    }

    unsafe fn commit(&self, ptr: NonNull<u8>, len: usize) -> Result<(), String> {
        // Zeroed by the device, so the pages start out resident in device memory (where the KV cache is read);
        // the ones the guest touches migrate to the host on demand.
        driver::managed_zero(&self.ctx, ptr.as_ptr() as u64, len).map_err(|e| e.to_string())?;
        self.ranges.insert(ptr.as_ptr() as usize, len, false);
        managed_account().committed += len;
        Ok(())
    }

    unsafe fn release(&self, ptr: NonNull<u8>, len: usize) {
        self.ranges.remove(ptr.as_ptr() as usize);
        let mut account = managed_account();
        account.committed = account.committed.saturating_sub(len);
    }
}

/// The managed memory that live actor regions of this process hold: every region is on device 0, the only
/// device [`CudaBackend::new`](super::CudaBackend::new) opens, so one account serves every provider (and every
/// runtime) of the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ManagedAccount {
    /// Bytes reserved by `cuMemAllocManaged` for regions not yet freed.
    reserved: usize,
    /// Of those, bytes committed. A committed range is zeroed by the device, so it is resident there (and
    /// already counted as used by `cuMemGetInfo`) when it is committed.
    committed: usize,
}

static MANAGED: Mutex<ManagedAccount> = Mutex::new(ManagedAccount { reserved: 0, committed: 0 });

fn managed_account() -> std::sync::MutexGuard<'static, ManagedAccount> {
    // Two counters updated together under the lock: a panic elsewhere cannot leave them half-written.
    MANAGED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Device memory left free for what the backend allocates itself while actors run (weights of a model opened
/// later, decode and prefill scratch, captured graphs, cuBLAS): 1 GiB, or 1/32 of the device when that is more.
fn managed_headroom(total: usize) -> usize {
    (1usize << 30).max(total / 32)
}

impl ManagedAccount {
    /// Whether a new region of `bytes` may be reserved on a device with `free` of `total` bytes free: the house
    /// rule is never to ask for more managed memory than the device has free, counting the reservations
    /// already made. A managed allocation takes no device memory until its pages are touched, so `free` does
    /// not yet count the uncommitted part of earlier reservations; it is added here, so that every live region
    /// could grow to its full size (and the backend's own allocations still succeed) without the driver
    /// evicting pages to the host or refusing the backend memory.
    ///
    /// Committed pages that have since migrated to the host are counted as resident (they would return on
    /// the device's next access): a slight over-admission, bounded by what the guests touch from the CPU.
    ///
    /// # Errors
    ///
    /// A message, containing [`OUT_OF_DEVICE_MEMORY`](driftwood_memory::OUT_OF_DEVICE_MEMORY), naming the
    /// sizes and what to lower.
    fn admit(&self, bytes: usize, free: usize, total: usize) -> Result<(), String> {
        let outstanding = self.reserved.saturating_sub(self.committed);
        let headroom = managed_headroom(total);
        let needed = bytes.saturating_add(outstanding).saturating_add(headroom);
        if needed <= free {
            return Ok(());
        }
        Err(format!(
            "{}: an actor memory of {bytes} bytes, with the {outstanding} bytes the managed memories of live actors \
             may still take and {headroom} bytes kept for the backend, exceeds the device's {free} free bytes; lower \
             the actor memory limit (--memory-mib) or run fewer actors at once",
            driftwood_memory::OUT_OF_DEVICE_MEMORY
        ))
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
    fn managed_reservations_count_what_live_regions_may_still_take() {
        const GIB: usize = 1 << 30;
        let total = 80 * GIB;
        let headroom = managed_headroom(total);
        assert_eq!(headroom, total / 32);
        assert_eq!(managed_headroom(8 * GIB), GIB, "at least 1 GiB");
        let empty = ManagedAccount::default();
        assert!(empty.admit(GIB, GIB + headroom, total).is_ok());
        assert!(empty.admit(GIB, GIB + headroom - 1, total).is_err());
        // 64 actors of 1 GiB, 64 MiB of each committed: their untouched 60 GiB still count against 70 GiB free.
        let live = ManagedAccount { reserved: 64 * GIB, committed: 64 * (64 << 20) };
        let free = 70 * GIB;
        let err = live.admit(8 * GIB, free, total).unwrap_err();
        assert!(err.contains(driftwood_memory::OUT_OF_DEVICE_MEMORY) && err.contains("--memory-mib"), "{err}");
        assert!(live.admit(GIB, free, total).is_ok());
        // Committed bytes are in `free` already: not counted twice.
        let resident = ManagedAccount { reserved: 8 * GIB, committed: 8 * GIB };
        assert!(resident.admit(GIB, GIB + headroom, total).is_ok());
        assert!(ManagedAccount { reserved: usize::MAX, committed: 0 }.admit(1, usize::MAX - 1, total).is_err());
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
