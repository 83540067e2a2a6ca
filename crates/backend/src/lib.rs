//! Compute backends of Driftwood. A backend runs operations on **views of memory it does not own**: the
//! bytes of an actor's linear memory, read and written in place.
//!
//! * [`Backend`] — the small trait every backend implements.
//! * [`Device`] — the closed enum over the backends this build knows; the one type callers hold.
//! * [`TensorRef`] / [`TensorMut`] — raw, typed views of shared memory. Making one is `unsafe` (the caller
//!   vouches for the bytes); using one is safe.
//! * [`cpu::CpuBackend`] — multithreaded SIMD kernels on the host.
//! * [`cuda::CudaBackend`] — a stand-in that reports itself unavailable until the CUDA backend lands.
//!
//! # Example
//!
//! ```
//! use driftwood_backend::{Backend, DType, Device, MatmulDims, TensorMut, TensorRef};
//!
//! // Three host buffers standing in for ranges of an actor's memory.
//! let a = vec![1.0f32, 2.0, 3.0, 4.0]; // (2, 2)
//! let b = vec![1.0f32, 0.0, 0.0, 1.0]; // (2, 2) identity
//! let mut c = vec![0.0f32; 4];         // (2, 2) output
//! let device = Device::cpu();
//! // Views borrow the buffers; the backend computes on them in place.
//! let a_view = TensorRef::from_f32(&a);
//! let b_view = TensorRef::from_f32(&b);
//! let c_view = TensorMut::from_f32(&mut c);
//! device.matmul(a_view, b_view, c_view, MatmulDims { m: 2, n: 2, k: 2 })?;
//! assert_eq!(c, a);
//! # Ok::<(), driftwood_backend::BackendError>(())
//! ```

#![warn(missing_docs)]

pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
mod view;

pub use device::{AttentionDims, Backend, BackendKind, Device, LinearDims, MatmulDims, OperandTrace};
pub use dtype::DType;
pub use error::BackendError;
pub use view::{TensorMut, TensorRef};
