//! [`SharedRegion`]: a page-aligned reservation that is an actor's linear memory and a backend's operand.
//!
//! Layout of one region (addresses grow to the right):
//!
//! ```text
//!  base                         base+len      base+capacity        base+capacity+guard
//!   |<----- committed (RW) ------>|<- reserved (no access) ->|<--- guard (no access) --->|
//! ```
//!
//! Invariants every method keeps, and that wasmtime's JIT code and the backends rely on:
//!
//! 1. `base` is page-aligned and never changes for the life of the region (memory is never moved).
//! 2. `[base, base+len)` is readable and writable; bytes never written read as zero.
//! 3. `[base+len, base+capacity+guard)` is mapped with no access, so an access past `len` faults instead of
//!    reading another allocation. wasmtime elides bounds checks because of this.
//! 4. `len` only grows, and only up to `capacity`.
//! 5. The mapping lives until the last clone of the region is dropped, so a backend holding a clone can
//!    never see the addresses unmapped under it.
//!
//! A region of a device placement ([`Placement::CudaPinned`], [`Placement::CudaManaged`]) is created with a
//! [`DeviceMemory`] provider. A pinned region is mapped as above and each committed range is registered with
//! the device. A managed region's memory comes from the device allocator: it is readable and writable from
//! the start, so invariant 3 cannot hold and such a region refuses a guard (the wasmtime `Config` of its
//! actors must request explicit bounds checks: no guard, a reservation equal to the memory limit).

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

use crate::{DeviceMemory, Placement};

/// The operating system's page size in bytes.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

fn round_up_to_page(bytes: usize) -> Option<usize> {
    let page = page_size();
    bytes.checked_add(page - 1).map(|b| b & !(page - 1))
}

/// Why a region could not be reserved or grown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The reservation (capacity plus guard) does not fit in the address space.
    #[error("cannot reserve {capacity} bytes plus a {guard}-byte guard: the size overflows")]
    TooLarge {
        /// Requested capacity in bytes.
        capacity: usize,
        /// Requested guard size in bytes.
        guard: usize,
    },
    /// The operating system refused the virtual reservation.
    #[error("cannot reserve {bytes} bytes of address space: {source}")]
    Reserve {
        /// Bytes asked for (capacity plus guard).
        bytes: usize,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Growth past the reservation was asked for; the region never moves, so it cannot grow there.
    #[error("cannot grow region to {requested} bytes: its fixed capacity is {capacity} bytes")]
    ExceedsCapacity {
        /// Requested length in bytes.
        requested: usize,
        /// The region's capacity in bytes.
        capacity: usize,
    },
    /// The device placement could not provide or map the memory.
    #[error("{placement} memory: {reason}")]
    Device {
        /// The region's placement.
        placement: Placement,
        /// What the device refused.
        reason: String,
    },
    /// The operating system refused to make a range accessible.
    #[error("cannot commit bytes {from}..{to} of the region: {source}")]
    Commit {
        /// Start of the range (offset from base).
        from: usize,
        /// End of the range (offset from base).
        to: usize,
        /// The operating system's error.
        source: std::io::Error,
    },
}

struct Mapping {
    /// Page-aligned start of the reservation (invariant 1).
    base: NonNull<u8>,
    /// Bytes that may ever become accessible, page-aligned.
    capacity: usize,
    /// Inaccessible bytes after `capacity`, page-aligned.
    guard: usize,
    placement: Placement,
    /// Accessible bytes; mirrors `grow_lock`'s value for lock-free reads.
    len: AtomicUsize,
    /// Page-rounded committed bytes; held while growing so growth is serialized.
    grow_lock: Mutex<usize>,
    /// The device provider of a device placement, and the ranges it committed (released on drop).
    device: Option<Arc<dyn DeviceMemory>>,
    committed_ranges: Mutex<Vec<(usize, usize)>>,
    /// Whether `device` allocated the memory (then it frees it; otherwise it is our anonymous mapping).
    device_allocated: bool,
}

// SAFETY: the mapping is plain memory owned by this struct; the raw pointer is only an address. Concurrent
// access to the bytes is governed by the users of the region (wasmtime and the backend), as documented on
// `SharedRegion::base`.
unsafe impl Send for Mapping {}
// SAFETY: as above; all mutable bookkeeping is behind atomics or a mutex.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(device) = &self.device {
            let ranges = std::mem::take(self.committed_ranges.get_mut().unwrap_or_else(|p| p.into_inner()));
            for (from, len) in ranges {
                // SAFETY: each range was committed by `device` exactly once and this is the last owner
                // (invariant 5), so the device has no work on it (DeviceMemory contract 4).
                unsafe { device.release(NonNull::new_unchecked(self.base.as_ptr().add(from)), len) };
            }
            if self.device_allocated {
                // SAFETY: `base`/`capacity` are what `allocate` returned and was asked for (guard is 0).
                unsafe { device.free(self.base, self.capacity) };
                return;
            }
        }
        // SAFETY: `base..base+capacity+guard` is exactly the mapping made in `reserve`; this is the last
        // owner (invariant 5), so nobody can access it afterwards.
        unsafe {
            let _ = rustix::mm::munmap(self.base.as_ptr().cast(), self.capacity + self.guard);
        }
    }
}

/// A page-aligned, zero-filled, never-moving memory reservation shared by a WebAssembly actor and a compute
/// backend. Cloning is cheap and yields another handle to the same bytes.
#[derive(Clone)]
pub struct SharedRegion {
    mapping: Arc<Mapping>,
}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("base", &self.base())
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("guard", &self.guard())
            .field("placement", &self.placement())
            .finish()
    }
}

impl SharedRegion {
    /// Reserves `capacity` bytes of address space (rounded up to whole pages) followed by `guard`
    /// inaccessible bytes. Nothing is committed: [`len`](Self::len) starts at 0.
    ///
    /// # Errors
    ///
    /// [`RegionError::TooLarge`] if the sizes overflow, [`RegionError::Reserve`] if the operating system
    /// refuses the reservation.
    pub fn reserve(capacity: usize, guard: usize, placement: Placement) -> Result<Self, RegionError> {
        if placement.needs_device() {
            return Err(RegionError::Device {
                placement,
                reason: "this placement needs a device memory provider (SharedRegion::reserve_on)".into(),
            });
        }
        Self::reserve_inner(capacity, guard, placement, None)
    }

    /// Reserves a region whose memory `device` provides or maps (see [`DeviceMemory`]); `Host` when `None`.
    ///
    /// # Errors
    ///
    /// As for [`reserve`](Self::reserve), and [`RegionError::Device`] when the provider refuses the memory, or
    /// when it allocates the memory itself (managed memory) and `guard` is not 0: such memory cannot have
    /// inaccessible guard pages.
    pub fn reserve_on(
        capacity: usize,
        guard: usize,
        device: Option<Arc<dyn DeviceMemory>>,
    ) -> Result<Self, RegionError> {
        let placement = device.as_ref().map_or(Placement::Host, |d| d.placement());
        Self::reserve_inner(capacity, guard, placement, device)
    }

    fn reserve_inner(
        capacity: usize,
        guard: usize,
        placement: Placement,
        device: Option<Arc<dyn DeviceMemory>>,
    ) -> Result<Self, RegionError> {
        let too_large = || RegionError::TooLarge { capacity, guard };
        let capacity_pages = round_up_to_page(capacity).ok_or_else(too_large)?;
        let guard_pages = round_up_to_page(guard).ok_or_else(too_large)?;
        let total = capacity_pages.checked_add(guard_pages).ok_or_else(too_large)?;
        if total == 0 {
            return Err(too_large());
        }
        let device_err = |reason: String| RegionError::Device { placement, reason };
        if let Some(d) = &device
            && let Some(base) = d.allocate(capacity_pages).map_err(device_err)?
        {
            if guard_pages != 0 {
                // SAFETY: just allocated with this size, unused.
                unsafe { d.free(base, capacity_pages) };
                return Err(device_err(format!(
                    "cannot provide a {guard_pages}-byte guard; configure actors with no guard (explicit bounds checks)"
                )));
            }
            return Ok(SharedRegion {
                mapping: Arc::new(Mapping {
                    base,
                    capacity: capacity_pages,
                    guard: 0,
                    placement,
                    len: AtomicUsize::new(0),
                    grow_lock: Mutex::new(0),
                    device,
                    committed_ranges: Mutex::new(Vec::new()),
                    device_allocated: true,
                }),
            });
        }
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| RegionError::Reserve { bytes: total, source: e.into() })?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| RegionError::Reserve {
            bytes: total,
            source: std::io::Error::other("the kernel returned a null mapping"),
        })?;
        debug_assert_eq!(base.as_ptr() as usize % page_size(), 0, "mmap returns page-aligned memory");
        Ok(SharedRegion {
            mapping: Arc::new(Mapping {
                base,
                capacity: capacity_pages,
                guard: guard_pages,
                placement,
                len: AtomicUsize::new(0),
                grow_lock: Mutex::new(0),
                device,
                committed_ranges: Mutex::new(Vec::new()),
                device_allocated: false,
            }),
        })
    }

    /// Makes the first `new_len` bytes accessible. Shrinking is not supported: a smaller `new_len` is a
    /// no-op. Newly committed bytes read as zero. The base pointer does not move.
    ///
    /// # Errors
    ///
    /// [`RegionError::ExceedsCapacity`] past the reservation; [`RegionError::Commit`] if the operating
    /// system refuses. On error the region is unchanged.
    pub fn commit_to(&self, new_len: usize) -> Result<(), RegionError> {
        let m = &*self.mapping;
        if new_len > m.capacity {
            return Err(RegionError::ExceedsCapacity { requested: new_len, capacity: m.capacity });
        }
        // A poisoned lock only means another thread panicked mid-growth; the committed size it guards is
        // still accurate because it is written after a successful mprotect.
        let mut committed = m.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        if new_len <= m.len.load(Ordering::Acquire) {
            return Ok(());
        }
        // Cannot overflow: new_len <= capacity, which is page-aligned.
        let new_committed = round_up_to_page(new_len).unwrap_or(m.capacity);
        if new_committed > *committed {
            let from = *committed;
            if !m.device_allocated {
                // SAFETY: `from..new_committed` lies inside the reservation (checked against capacity above)
                // and is currently inaccessible; making it RW keeps invariants 1, 2 (anonymous mappings are
                // zero-filled) and 3 (the rest stays PROT_NONE).
                unsafe {
                    rustix::mm::mprotect(
                        m.base.as_ptr().add(from).cast(),
                        new_committed - from,
                        MprotectFlags::READ | MprotectFlags::WRITE,
                    )
                }
                .map_err(|e| RegionError::Commit { from, to: new_committed, source: e.into() })?;
            }
            if let Some(device) = &m.device {
                // SAFETY: the range is inside the region, accessible, and not committed before (growth is
                // serialized by `grow_lock` and `from` is the previous end).
                let ptr = unsafe { NonNull::new_unchecked(m.base.as_ptr().add(from)) };
                unsafe { device.commit(ptr, new_committed - from) }
                    .map_err(|reason| RegionError::Device { placement: m.placement, reason })?;
                m.committed_ranges.lock().unwrap_or_else(|p| p.into_inner()).push((from, new_committed - from));
            }
            *committed = new_committed;
        }
        m.len.store(new_len, Ordering::Release);
        Ok(())
    }

    /// The region's first byte. Page-aligned, and the same value for the life of the region.
    ///
    /// Reading or writing through it is governed by the owner of the bytes: while the region backs a
    /// wasmtime memory, only wasmtime-invoked code (the guest, or a host call it is making) may touch
    /// `[base, base+len)`; see `driftwood-host`'s call contract.
    pub fn base(&self) -> *mut u8 {
        self.mapping.base.as_ptr()
    }

    /// Bytes currently accessible from [`base`](Self::base).
    pub fn len(&self) -> usize {
        self.mapping.len.load(Ordering::Acquire)
    }

    /// Whether no byte is accessible yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the region can grow to without moving (the reservation, page-aligned).
    pub fn capacity(&self) -> usize {
        self.mapping.capacity
    }

    /// Inaccessible bytes reserved after [`capacity`](Self::capacity).
    pub fn guard(&self) -> usize {
        self.mapping.guard
    }

    /// How an accelerator sees this region.
    pub fn placement(&self) -> Placement {
        self.mapping.placement
    }

    /// Whether `addr` lies within the accessible bytes `[base, base+len)`.
    pub fn contains(&self, addr: *const u8) -> bool {
        let start = self.base() as usize;
        (start..start + self.len()).contains(&(addr as usize))
    }

    /// Whether two handles refer to the same reservation.
    pub fn same_as(&self, other: &SharedRegion) -> bool {
        Arc::ptr_eq(&self.mapping, &other.mapping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_is_page_aligned_and_stable_across_growth() {
        let r = SharedRegion::reserve(16 << 20, 1 << 20, Placement::Host).unwrap();
        let base = r.base();
        assert_eq!(base as usize % page_size(), 0);
        for len in [65536, 3 << 20, 16 << 20] {
            r.commit_to(len).unwrap();
            assert_eq!(r.base(), base);
            assert_eq!(r.len(), len);
        }
    }

    #[test]
    fn committed_memory_is_zero_and_writable() {
        let r = SharedRegion::reserve(1 << 20, 0, Placement::Host).unwrap();
        r.commit_to(100_000).unwrap();
        // SAFETY: 100_000 bytes are committed and this test is the only user.
        let bytes = unsafe { std::slice::from_raw_parts_mut(r.base(), 100_000) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes.fill(7);
        r.commit_to(200_000).unwrap();
        // SAFETY: as above, now 200_000 bytes.
        let bytes = unsafe { std::slice::from_raw_parts(r.base(), 200_000) };
        assert!(bytes[..100_000].iter().all(|&b| b == 7));
        assert!(bytes[100_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn growth_past_capacity_is_refused_and_changes_nothing() {
        let r = SharedRegion::reserve(1 << 20, 0, Placement::Host).unwrap();
        r.commit_to(4096).unwrap();
        let err = r.commit_to((1 << 20) + 1).unwrap_err();
        assert!(matches!(err, RegionError::ExceedsCapacity { .. }), "{err}");
        assert_eq!(r.len(), 4096);
    }

    #[test]
    fn absurd_sizes_are_errors_not_panics() {
        assert!(SharedRegion::reserve(usize::MAX, 4096, Placement::Host).is_err());
        assert!(SharedRegion::reserve(usize::MAX - 10, 0, Placement::Host).is_err());
        assert!(SharedRegion::reserve(0, 0, Placement::Host).is_err());
    }
}
