//! The bottom layer of Driftwood: memory that is at once a WebAssembly actor's linear memory and the bytes a
//! compute backend reads and writes in place.
//!
//! * [`SharedRegion`] — one page-aligned virtual reservation per actor memory, zero-filled, committed as the
//!   memory grows, never moved, followed by the guard bytes wasmtime's `Config` promised to its JIT code.
//! * [`RegionCreator`] — the [`wasmtime::MemoryCreator`] that hands these regions to wasmtime and remembers
//!   them by base address, so the host can find the region behind any instance's memory.
//! * [`Placement`] — how an accelerator sees a region (`Host`, `CudaPinned`, `CudaManaged`), and
//!   [`DeviceMemory`], the `unsafe trait` through which a GPU backend allocates or maps a region's memory.
//! * [`CopyLedger`] — counts every byte the runtime copies between guest memory and anything else, so
//!   "zero-copy" is a measured claim rather than a slogan.
//!
//! # Example
//!
//! ```
//! use driftwood_memory::{Placement, SharedRegion};
//!
//! // Reserve 1 MiB of address space with a 64 KiB guard; nothing is committed yet.
//! let region = SharedRegion::reserve(1 << 20, 64 << 10, Placement::Host)?;
//! assert_eq!(region.len(), 0);
//! // Commit the first 64 KiB (one wasm page). The base pointer never moves.
//! let base = region.base();
//! region.commit_to(64 << 10)?;
//! assert_eq!(region.base(), base);
//! assert_eq!(region.len(), 64 << 10);
//! // Fresh memory reads as zero.
//! // SAFETY: the first 64 KiB are committed and nothing else accesses them here.
//! let first = unsafe { std::slice::from_raw_parts(region.base(), 64 << 10) };
//! assert!(first.iter().all(|&b| b == 0));
//! # Ok::<(), driftwood_memory::RegionError>(())
//! ```

#![warn(missing_docs)]

mod creator;
mod device_memory;
mod ledger;
mod placement;
mod region;
pub mod rss;

pub use creator::RegionCreator;
pub use device_memory::{DeviceMemory, OUT_OF_DEVICE_MEMORY};
pub use ledger::{CopyKind, CopyLedger, LedgerSnapshot};
pub use placement::Placement;
pub use region::{RegionError, SharedRegion, page_size};
