//! The [`Backend`] trait and the closed [`Device`] enum over the backends of this build.

use std::fmt;

use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::{BackendError, TensorMut, TensorRef};

/// Shape of `C (m, n) = A (m, k) · B (k, n)`, all row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Columns of A, rows of B.
    pub k: usize,
}

impl MatmulDims {
    /// Element counts of A, B and C, or an error if any overflows.
    ///
    /// # Errors
    ///
    /// [`BackendError::Overflow`] when a product of dimensions does not fit in `usize`.
    pub fn element_counts(&self) -> Result<(usize, usize, usize), BackendError> {
        let overflow = || BackendError::Overflow { op: "matmul", shape: format!("{self}") };
        let a = self.m.checked_mul(self.k).ok_or_else(overflow)?;
        let b = self.k.checked_mul(self.n).ok_or_else(overflow)?;
        let c = self.m.checked_mul(self.n).ok_or_else(overflow)?;
        Ok((a, b, c))
    }

    /// Floating-point operations of the product (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

impl fmt::Display for MatmulDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m={} n={} k={}", self.m, self.n, self.k)
    }
}

/// Addresses of the operands of the most recent operation, as the backend saw them. Used by
/// `driftwood verify` to prove the backend computed on the guest's own bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OperandTrace {
    /// Address of A's first byte.
    pub a: usize,
    /// Address of B's first byte.
    pub b: usize,
    /// Address of C's first byte.
    pub c: usize,
}

/// What every compute backend provides. Operands are views of memory the backend does not own; the
/// backend reads and writes them in place and returns only when the work touching them is complete.
pub trait Backend {
    /// Short name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// `c = a · b` for row-major `a (m, k)` and `b (k, n)` of the same dtype (`f32` or `bf16`),
    /// accumulated and written as `f32` into `c (m, n)`.
    ///
    /// # Errors
    ///
    /// [`BackendError::Shape`] when a view's length does not match `dims`, [`BackendError::DType`] when the
    /// dtypes are mixed or `c` is not `f32`, [`BackendError::Overflow`] for absurd shapes.
    fn matmul(
        &self,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        c: TensorMut<'_>,
        dims: MatmulDims,
    ) -> Result<(), BackendError>;

    /// The operand addresses of the last completed operation.
    fn last_operands(&self) -> OperandTrace;
}

/// Which backend to use, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The best available: CUDA when it is usable, else CPU.
    #[default]
    Auto,
    /// The host CPU.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

impl BackendKind {
    /// Parses `auto`, `cpu` or `cuda`.
    ///
    /// # Errors
    ///
    /// A message naming the known kinds.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend `{other}`; known: auto, cpu, cuda")),
        }
    }
}

/// One of the backends this build knows. Hold this; call the [`Backend`] methods on it.
#[derive(Debug)]
pub enum Device {
    /// Host CPU kernels.
    Cpu(CpuBackend),
    /// NVIDIA GPU kernels.
    Cuda(CudaBackend),
}

impl Device {
    /// The CPU backend, always available.
    pub fn cpu() -> Self {
        Device::Cpu(CpuBackend::new())
    }

    /// Opens the backend `kind` names. `Auto` falls back to the CPU when CUDA is unavailable.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unavailable`] when `Cuda` is asked for explicitly and cannot be used.
    pub fn open(kind: BackendKind) -> Result<Self, BackendError> {
        match kind {
            BackendKind::Cpu => Ok(Device::cpu()),
            BackendKind::Cuda => CudaBackend::new().map(Device::Cuda),
            BackendKind::Auto => Ok(CudaBackend::new().map(Device::Cuda).unwrap_or_else(|_| Device::cpu())),
        }
    }

    fn inner(&self) -> &dyn Backend {
        match self {
            Device::Cpu(b) => b,
            Device::Cuda(b) => b,
        }
    }
}

impl Backend for Device {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn matmul(
        &self,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        c: TensorMut<'_>,
        dims: MatmulDims,
    ) -> Result<(), BackendError> {
        self.inner().matmul(a, b, c, dims)
    }

    fn last_operands(&self) -> OperandTrace {
        self.inner().last_operands()
    }
}
