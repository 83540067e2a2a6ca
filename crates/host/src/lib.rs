//! The actor host: one wasmtime [`Store`](wasmtime::Store) per actor, whose linear memory is a
//! [`SharedRegion`](driftwood_memory::SharedRegion) the compute backend reads and writes in place.
//!
//! # The call contract (why zero-copy is sound)
//!
//! wasmtime treats a memory as owned by its store: bytes may change only inside wasmtime-invoked code. The
//! backend therefore touches an actor's memory only **inside a host call the actor is making**, and every host
//! call returns only after the backend has finished with the guest's bytes. Between calls the host neither
//! reads nor writes guest memory except through [`Actor`] methods that take `&mut self` (and record the
//! bytes they copy in the actor's [`CopyLedger`](driftwood_memory::CopyLedger)).
//!
//! With continuous batching on ([`RuntimeConfig::batch_window`]) a decode step may be computed on another
//! actor's thread, in one pass with the steps of other actors; the actor whose bytes are used is then blocked
//! inside its own `driftwood.forward` call until that pass is complete, so the contract holds unchanged.
//!
//! # Example
//!
//! ```
//! use driftwood_host::{Backend, Runtime, RuntimeConfig};
//!
//! // 1. A runtime: one wasmtime engine whose memories are Driftwood regions, and a CPU backend.
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! // 2. An actor from the bundled example module; instantiation checks its ABI version.
//! let mut actor = runtime.instantiate(driftwood_actors::MATMUL_CHECK)?;
//! // 3. The actor fills two 128×128 matrices in its memory and the backend multiplies them in place.
//! let errors: u32 = actor.call("run_check", (7u32, 0u32))?;
//! assert_eq!(errors, 0);
//! // 4. The backend computed on the actor's own bytes: C's address is the region's base plus C's offset.
//! let c_offset: u32 = actor.call("check_offset", 2u32)?;
//! assert_eq!(runtime.device().last_operands().c, actor.region().base() as usize + c_offset as usize);
//! // 5. Nothing was copied.
//! assert_eq!(actor.ledger().tensor_bytes, 0);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod abi;
mod actor;
mod batch;
mod error;
mod hibernate;
mod kv_rows;
mod limits;
mod runtime;

pub use actor::{Actor, InferenceStats, LogLine};
pub use batch::{BATCH_SIZE_BOUNDS, BatchStats};
pub use driftwood_backend::Backend;
/// Where actor memory lives ([`RuntimeConfig::placement`]).
pub use driftwood_memory::Placement;
pub use error::ActorError;
pub use hibernate::{ActorStore, Hibernated};
pub use limits::{ActorLimits, MAX_DEADLINE, MAX_MODEL_HANDLES, MIN_HOST_BYTES, MODEL_HANDLE_BYTES};
pub use runtime::{LogMode, MAX_BATCH_WINDOW, ModelRegistry, Runtime, RuntimeConfig};

/// The KV cache dtype `model_info` recommends on the CPU backend unless [`RuntimeConfig::kv_dtype`] says
/// otherwise. bf16, by measurement (`driftwood bench decode --kv-dtype f32,bf16`, Llama-3.2-1B-shaped, 16
/// threads): decode as fast or faster than with f32 (41.1 against 39.7 tokens/s at 128 tokens of context, 34.9
/// against 34.2 at 1024) in half the KV bytes, prefill 8–12 % slower.
pub const CPU_KV_DTYPE: driftwood_backend::DType = driftwood_backend::DType::BF16;
