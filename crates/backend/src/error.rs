//! Errors a backend reports instead of panicking.

use crate::DType;

/// Why a backend could not run an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend cannot run on this machine or in this build.
    #[error("the {backend} backend is unavailable: {reason}")]
    Unavailable {
        /// Backend name (`cuda`, ...).
        backend: &'static str,
        /// What is missing.
        reason: String,
    },
    /// An operand's length does not match the shape of the operation.
    #[error("{op}: operand `{operand}` holds {actual} elements but the shape needs {expected}")]
    Shape {
        /// Operation name.
        op: &'static str,
        /// Operand name.
        operand: &'static str,
        /// Elements the shape requires.
        expected: usize,
        /// Elements the view holds.
        actual: usize,
    },
    /// An operand's element type is not supported for this operation.
    #[error("{op}: operand `{operand}` is {actual} but {expected} is required")]
    DType {
        /// Operation name.
        op: &'static str,
        /// Operand name.
        operand: &'static str,
        /// What the operation needs.
        expected: &'static str,
        /// What was given.
        actual: DType,
    },
    /// The backend does not implement this operation.
    #[error("the {backend} backend does not implement `{op}`")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Operation name.
        op: &'static str,
    },
    /// An index operand (token id, position) is out of range.
    #[error("{op}: {detail}")]
    OutOfRange {
        /// Operation name.
        op: &'static str,
        /// What was out of range.
        detail: String,
    },
    /// A driver or library call of a device backend failed.
    #[error("{backend}: {call} failed: {reason}")]
    Driver {
        /// The backend (`cuda`).
        backend: &'static str,
        /// The call, as the driver names it.
        call: &'static str,
        /// The driver's error name and text.
        reason: String,
    },
    /// The shape's element counts overflow the address space.
    #[error("{op}: shape {shape} is too large")]
    Overflow {
        /// Operation name.
        op: &'static str,
        /// The shape, as written by the caller.
        shape: String,
    },
}

impl BackendError {
    /// Whether the device ran out of memory: the driver refused an allocation (`CUDA_ERROR_OUT_OF_MEMORY`) or
    /// cuBLAS could not allocate (`CUBLAS_STATUS_ALLOC_FAILED`). Such a failure says nothing about the request
    /// that met it: the same call may succeed once other work has given memory back.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, BackendError::Driver { reason, .. }
            if reason.contains("out of memory") || reason.contains("ALLOC_FAILED"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_told_apart_from_other_driver_errors() {
        let driver = |call, reason: &str| BackendError::Driver { backend: "cuda", call, reason: reason.into() };
        assert!(driver("cuMemAlloc", "out of memory").is_out_of_memory());
        assert!(driver("cublasGemmEx", "CublasError(CUBLAS_STATUS_ALLOC_FAILED)").is_out_of_memory());
        assert!(!driver("cuLaunchKernel", "an illegal memory access was encountered").is_out_of_memory());
        assert!(!BackendError::OutOfRange { op: "decode", detail: "out of memory".into() }.is_out_of_memory());
    }
}
