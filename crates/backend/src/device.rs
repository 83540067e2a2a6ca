//! The [`Backend`] trait and the closed [`Device`] enum over the backends of this build.

use std::fmt;

use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::{BackendError, DType, TensorMut, TensorRef};

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

    /// Checks the operands of a matmul of these dims, as every backend requires them: `a (m, k)` and
    /// `b (k, n)` of one dtype, `f32` or `bf16`, and `c (m, n)` `f32`. Returns the three element counts.
    ///
    /// # Errors
    ///
    /// [`BackendError::Overflow`] for absurd shapes, [`BackendError::Shape`] naming the operand whose length
    /// does not match, [`BackendError::DType`] for `f16` or mixed inputs or a non-`f32` `c`.
    pub fn check_operands(
        &self,
        a: &TensorRef<'_>,
        b: &TensorRef<'_>,
        c: &TensorMut<'_>,
    ) -> Result<(usize, usize, usize), BackendError> {
        const OP: &str = "matmul";
        let counts @ (na, nb, nc) = self.element_counts()?;
        for (operand, expected, actual) in [("a", na, a.len()), ("b", nb, b.len()), ("c", nc, c.len())] {
            if expected != actual {
                return Err(BackendError::Shape { op: OP, operand, expected, actual });
            }
        }
        if a.dtype() == DType::F16 {
            return Err(BackendError::DType { op: OP, operand: "a", expected: "f32 or bf16", actual: a.dtype() });
        }
        if b.dtype() != a.dtype() {
            return Err(BackendError::DType { op: OP, operand: "b", expected: a.dtype().name(), actual: b.dtype() });
        }
        if c.dtype() != DType::F32 {
            return Err(BackendError::DType { op: OP, operand: "c", expected: "f32", actual: c.dtype() });
        }
        Ok(counts)
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

/// Shape of `y (t, output) = x (t, input) · w (output, input)ᵀ + bias (output)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// Tokens (rows of x and y).
    pub t: usize,
    /// Input features (columns of x and w).
    pub input: usize,
    /// Output features (rows of w, columns of y).
    pub output: usize,
}

/// Shape of causal attention for `t` new tokens after `pos` cached ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// New tokens (queries).
    pub t: usize,
    /// Tokens already in the cache before these.
    pub pos: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it: grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sliding window: a query sees only the last `window` positions (itself included).
    pub window: Option<usize>,
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

    /// The operand addresses of the last completed matmul.
    fn last_operands(&self) -> OperandTrace;

    /// `y (t, output) = x (t, input) · w (output, input)ᵀ (+ bias)`. `x`, `y`, `bias` are f32; `w` is f32,
    /// bf16 or f16 and is read as stored (no converted copy of the weights is ever made).
    ///
    /// # Errors
    ///
    /// [`BackendError::Shape`] / [`BackendError::DType`] when the views do not match `dims`.
    fn linear(
        &self,
        x: TensorRef<'_>,
        w: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        y: TensorMut<'_>,
        dims: LinearDims,
    ) -> Result<(), BackendError> {
        let _ = (x, w, bias, y, dims);
        Err(unsupported(self.name(), "linear"))
    }

    /// Row-wise RMS normalization: `y = x / sqrt(mean(x²) + eps) · weight`, rows of `weight.len()`.
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch (all operands f32).
    fn rms_norm(
        &self,
        x: TensorRef<'_>,
        weight: TensorRef<'_>,
        eps: f32,
        y: TensorMut<'_>,
    ) -> Result<(), BackendError> {
        let _ = (x, weight, eps, y);
        Err(unsupported(self.name(), "rms_norm"))
    }

    /// Rotate-half rotary embedding in place on `x (t, heads, head_dim)` at positions `pos..pos+t`, from
    /// `cos`/`sin` tables of shape `(positions, head_dim/2)`.
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch, or positions past the tables.
    fn rope(
        &self,
        x: TensorMut<'_>,
        cos: TensorRef<'_>,
        sin: TensorRef<'_>,
        pos: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), BackendError> {
        let _ = (x, cos, sin, pos, heads, head_dim);
        Err(unsupported(self.name(), "rope"))
    }

    /// Causal (grouped-query) attention of `q (t, heads, hd)` over cached `k`, `v` `(pos + t, kv_heads·hd)`
    /// into `out (t, heads, hd)`.
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch.
    fn attention(
        &self,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        out: TensorMut<'_>,
        dims: AttentionDims,
    ) -> Result<(), BackendError> {
        let _ = (q, k, v, out, dims);
        Err(unsupported(self.name(), "attention"))
    }

    /// `gate = silu(gate) · up`, elementwise (the SwiGLU activation).
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch.
    fn silu_mul(&self, gate: TensorMut<'_>, up: TensorRef<'_>) -> Result<(), BackendError> {
        let _ = (gate, up);
        Err(unsupported(self.name(), "silu_mul"))
    }

    /// `x += y`, elementwise (the residual connection).
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch.
    fn add_assign(&self, x: TensorMut<'_>, y: TensorRef<'_>) -> Result<(), BackendError> {
        let _ = (x, y);
        Err(unsupported(self.name(), "add_assign"))
    }

    /// Copies rows `tokens` of the embedding `table (vocab, hidden)` into `out (tokens.len(), hidden)` as f32.
    ///
    /// # Errors
    ///
    /// Shape or dtype mismatch, or a token outside the table.
    fn embed(&self, table: TensorRef<'_>, tokens: &[u32], out: TensorMut<'_>) -> Result<(), BackendError> {
        let _ = (table, tokens, out);
        Err(unsupported(self.name(), "embed"))
    }
}

fn unsupported(backend: &'static str, op: &'static str) -> BackendError {
    BackendError::Unsupported { backend, op }
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
    /// NVIDIA GPU kernels (boxed: the backend holds its stream, kernels and handles inline).
    Cuda(Box<CudaBackend>),
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
            BackendKind::Cuda => CudaBackend::new().map(|b| Device::Cuda(Box::new(b))),
            BackendKind::Auto => {
                Ok(CudaBackend::new().map(|b| Device::Cuda(Box::new(b))).unwrap_or_else(|_| Device::cpu()))
            }
        }
    }

    fn inner(&self) -> &dyn Backend {
        match self {
            Device::Cpu(b) => b,
            Device::Cuda(b) => &**b,
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

    fn linear(
        &self,
        x: TensorRef<'_>,
        w: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        y: TensorMut<'_>,
        dims: LinearDims,
    ) -> Result<(), BackendError> {
        self.inner().linear(x, w, bias, y, dims)
    }

    fn rms_norm(
        &self,
        x: TensorRef<'_>,
        weight: TensorRef<'_>,
        eps: f32,
        y: TensorMut<'_>,
    ) -> Result<(), BackendError> {
        self.inner().rms_norm(x, weight, eps, y)
    }

    fn rope(
        &self,
        x: TensorMut<'_>,
        cos: TensorRef<'_>,
        sin: TensorRef<'_>,
        pos: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), BackendError> {
        self.inner().rope(x, cos, sin, pos, heads, head_dim)
    }

    fn attention(
        &self,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        out: TensorMut<'_>,
        dims: AttentionDims,
    ) -> Result<(), BackendError> {
        self.inner().attention(q, k, v, out, dims)
    }

    fn silu_mul(&self, gate: TensorMut<'_>, up: TensorRef<'_>) -> Result<(), BackendError> {
        self.inner().silu_mul(gate, up)
    }

    fn add_assign(&self, x: TensorMut<'_>, y: TensorRef<'_>) -> Result<(), BackendError> {
        self.inner().add_assign(x, y)
    }

    fn embed(&self, table: TensorRef<'_>, tokens: &[u32], out: TensorMut<'_>) -> Result<(), BackendError> {
        self.inner().embed(table, tokens, out)
    }
}
