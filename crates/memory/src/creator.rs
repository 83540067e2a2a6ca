//! [`RegionCreator`]: the `wasmtime::MemoryCreator` that makes every actor memory a [`SharedRegion`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::{DeviceMemory, Placement, SharedRegion};

/// Capacity chosen when wasmtime leaves the reservation to us and the memory declares no maximum: the whole
/// 32-bit index space, so growth never has to move the memory.
const FULL_32BIT_SPACE: usize = 1 << 32;

type Registry = Arc<Mutex<HashMap<usize, SharedRegion>>>;

/// Hands wasmtime [`SharedRegion`]s as linear memories and keeps a registry of them by base address.
///
/// Install it with [`wasmtime::Config::with_host_memory`]. The `Config` must also set
/// `memory_init_cow(false)` (wasmtime cannot apply copy-on-write images to memory it did not map) and
/// `memory_may_move(false)`. Every memory wasmtime asks for then honours the `Config`'s reservation and guard
/// exactly (see [`MemoryCreator::new_memory`]).
///
/// After instantiation, [`region_at`](Self::region_at) with the address returned by
/// `wasmtime::Memory::data_ptr` yields the region behind that memory: that lookup is how the host gets from
/// an instance to the bytes it hands to a backend.
#[derive(Debug, Default)]
pub struct RegionCreator {
    placement: Placement,
    device: Option<Arc<dyn DeviceMemory>>,
    live: Registry,
}

impl RegionCreator {
    /// A creator of regions with `placement`. A device placement needs [`on_device`](Self::on_device): with
    /// this constructor every memory request of such a creator fails with a clear message.
    pub fn new(placement: Placement) -> Self {
        RegionCreator { placement, device: None, live: Registry::default() }
    }

    /// A creator whose regions get their memory from `device` (a GPU backend's provider for its placement).
    pub fn on_device(device: Arc<dyn DeviceMemory>) -> Self {
        RegionCreator { placement: device.placement(), device: Some(device), live: Registry::default() }
    }

    /// The placement of every region this creator makes.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The live region whose base is `base`, if this creator made one.
    pub fn region_at(&self, base: *const u8) -> Option<SharedRegion> {
        self.registry().get(&(base as usize)).cloned()
    }

    /// How many regions made by this creator are still backing a wasmtime memory.
    pub fn live_regions(&self) -> usize {
        self.registry().len()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<usize, SharedRegion>> {
        // The map stays consistent even if a holder panicked: every insert/remove is a single call.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// SAFETY: every memory returned is a `SharedRegion` that (1) reserves `reserved_size_in_bytes` (or, when
// wasmtime leaves the choice to us, the memory's whole possible size) plus exactly `guard_size_in_bytes`
// inaccessible bytes, (2) is zero-filled, (3) never moves, so `byte_capacity` is final, and (4) is unmapped
// only after wasmtime drops the memory and every other handle is gone.
unsafe impl MemoryCreator for RegionCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_shared() {
            return Err("shared (threads) memories are not supported by Driftwood's region creator".into());
        }
        if ty.is_64() {
            return Err("64-bit memories are not supported by Driftwood's region creator".into());
        }
        let capacity = match reserved_size_in_bytes {
            Some(reserved) => reserved,
            None => maximum.unwrap_or(FULL_32BIT_SPACE).max(minimum),
        };
        if minimum > capacity {
            return Err(format!("memory needs {minimum} bytes but its reservation is {capacity} bytes"));
        }
        let region = match &self.device {
            Some(device) => SharedRegion::reserve_on(capacity, guard_size_in_bytes, Some(device.clone())),
            None => SharedRegion::reserve(capacity, guard_size_in_bytes, self.placement),
        }
        .map_err(|e| format!("cannot create actor memory: {e}"))?;
        region.commit_to(minimum).map_err(|e| format!("cannot create actor memory: {e}"))?;
        self.registry().insert(region.base() as usize, region.clone());
        Ok(Box::new(RegionMemory { region, registry: self.live.clone() }))
    }
}

/// The `LinearMemory` wasmtime drives; a thin adapter over a [`SharedRegion`].
struct RegionMemory {
    region: SharedRegion,
    registry: Registry,
}

impl Drop for RegionMemory {
    fn drop(&mut self) {
        let mut live = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&(self.region.base() as usize));
    }
}

// SAFETY: `as_ptr` is the region's fixed base; `byte_size` bytes from it are accessible; growth up to
// `byte_capacity` happens in place (region invariants 1–4).
unsafe impl LinearMemory for RegionMemory {
    fn byte_size(&self) -> usize {
        self.region.len()
    }

    fn byte_capacity(&self) -> usize {
        self.region.capacity()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.region.commit_to(new_size).map_err(wasmtime::Error::from)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region.base()
    }
}
