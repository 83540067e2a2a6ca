//! The CUDA backend's place in the build. This build has no CUDA kernels yet: opening it reports the backend
//! unavailable (an error, never a panic), so `--backend auto` falls back to the CPU.

use crate::device::{Backend, MatmulDims, OperandTrace};
use crate::{BackendError, TensorMut, TensorRef};

fn unavailable() -> BackendError {
    BackendError::Unavailable {
        backend: "cuda",
        reason: "this build of Driftwood has no CUDA kernels yet; use --backend cpu".into(),
    }
}

/// Stand-in for the NVIDIA GPU backend. It cannot be constructed in this build.
#[derive(Debug)]
pub struct CudaBackend {
    _not_constructible: (),
}

impl CudaBackend {
    /// Opens the first CUDA device.
    ///
    /// # Errors
    ///
    /// Always [`BackendError::Unavailable`] in this build.
    pub fn new() -> Result<Self, BackendError> {
        Err(unavailable())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matmul(&self, _: TensorRef<'_>, _: TensorRef<'_>, _: TensorMut<'_>, _: MatmulDims) -> Result<(), BackendError> {
        Err(unavailable())
    }

    fn last_operands(&self) -> OperandTrace {
        OperandTrace::default()
    }
}
