//! The CPU backend: multithreaded SIMD kernels that compute directly on views of shared memory.

mod attention;
mod bandwidth;
mod isa;
mod linear;
mod matmul;
mod ops;
mod share;
mod simd;

pub use bandwidth::{stream_read_gb_s, stream_read_gb_s_of};

/// The instruction sets the CPU kernels run on this machine: `(decode, prefill)`, each `scalar`, `avx2` or
/// `avx512` (decode's matrix-vector products stream memory; prefill's tiles compute). For benchmark reports.
pub fn kernel_paths() -> (&'static str, &'static str) {
    (isa::Isa::streaming().name(), isa::Isa::best().name())
}

use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};

use crate::device::{AttentionDims, Backend, LinearDims, MatmulDims, OperandTrace};
use crate::{BackendError, DType, TensorMut, TensorRef};
use linear::Weights;

fn f32_ref<'a>(
    op: &'static str,
    operand: &'static str,
    v: TensorRef<'a>,
    len: usize,
) -> Result<&'a [f32], BackendError> {
    let data = v.as_f32().ok_or(BackendError::DType { op, operand, expected: "f32", actual: v.dtype() })?;
    if data.len() != len {
        return Err(BackendError::Shape { op, operand, expected: len, actual: data.len() });
    }
    Ok(data)
}

fn f32_mut<'a>(
    op: &'static str,
    operand: &'static str,
    v: TensorMut<'a>,
    len: usize,
) -> Result<&'a mut [f32], BackendError> {
    let dtype = v.dtype();
    let data = v.into_f32().ok_or(BackendError::DType { op, operand, expected: "f32", actual: dtype })?;
    if data.len() != len {
        return Err(BackendError::Shape { op, operand, expected: len, actual: data.len() });
    }
    Ok(data)
}

fn checked(op: &'static str, factors: &[usize]) -> Result<usize, BackendError> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or(BackendError::Overflow { op, shape: format!("{factors:?}") })
}

fn weights<'a>(op: &'static str, w: TensorRef<'a>, len: usize) -> Result<Weights<'a>, BackendError> {
    if w.len() != len {
        return Err(BackendError::Shape { op, operand: "w", expected: len, actual: w.len() });
    }
    Ok(match w.dtype() {
        DType::F32 => Weights::F32(w.as_f32().unwrap_or_default()),
        DType::BF16 => Weights::BF16(w.as_bf16().unwrap_or_default()),
        DType::F16 => Weights::F16(w.as_f16().unwrap_or_default()),
    })
}

fn row_to_f32(row: TensorRef<'_>, out: &mut [f32]) {
    match row.dtype() {
        DType::F32 => out.copy_from_slice(row.as_f32().unwrap_or_default()),
        DType::BF16 => {
            for (o, x) in out.iter_mut().zip(row.as_bf16().unwrap_or_default()) {
                *o = bf16::to_f32(*x);
            }
        }
        DType::F16 => {
            for (o, x) in out.iter_mut().zip(row.as_f16().unwrap_or_default()) {
                *o = f16::to_f32(*x);
            }
        }
    }
}

/// Host CPU backend. Kernels run on the global rayon pool; `RAYON_NUM_THREADS` sets its size.
#[derive(Debug, Default)]
pub struct CpuBackend {
    last: [AtomicUsize; 3],
}

impl CpuBackend {
    /// A CPU backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn trace(&self, a: usize, b: usize, c: usize) {
        for (slot, addr) in self.last.iter().zip([a, b, c]) {
            slot.store(addr, Ordering::Relaxed);
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(
        &self,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        c: TensorMut<'_>,
        dims: MatmulDims,
    ) -> Result<(), BackendError> {
        let (a_addr, b_addr, c_addr) = (a.addr(), b.addr(), c.addr());
        matmul::matmul(a, b, c, dims)?;
        self.trace(a_addr, b_addr, c_addr);
        Ok(())
    }

    fn last_operands(&self) -> OperandTrace {
        let [a, b, c] = &self.last;
        OperandTrace { a: a.load(Ordering::Relaxed), b: b.load(Ordering::Relaxed), c: c.load(Ordering::Relaxed) }
    }

    fn linear(
        &self,
        x: TensorRef<'_>,
        w: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        y: TensorMut<'_>,
        d: LinearDims,
    ) -> Result<(), BackendError> {
        const OP: &str = "linear";
        let x = f32_ref(OP, "x", x, checked(OP, &[d.t, d.input])?)?;
        let w = weights(OP, w, checked(OP, &[d.output, d.input])?)?;
        let bias = bias.map(|b| f32_ref(OP, "bias", b, d.output)).transpose()?;
        let y = f32_mut(OP, "y", y, checked(OP, &[d.t, d.output])?)?;
        linear::linear(x, w, bias, y, d.t, d.input, d.output);
        Ok(())
    }

    fn rms_norm(
        &self,
        x: TensorRef<'_>,
        weight: TensorRef<'_>,
        eps: f32,
        y: TensorMut<'_>,
    ) -> Result<(), BackendError> {
        const OP: &str = "rms_norm";
        let width = weight.len().max(1);
        let rows = x.len() / width;
        let weight = f32_ref(OP, "weight", weight, width)?;
        let x = f32_ref(OP, "x", x, rows * width)?;
        let y = f32_mut(OP, "y", y, rows * width)?;
        ops::rms_norm(x, weight, eps, y);
        Ok(())
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
        const OP: &str = "rope";
        let token = checked(OP, &[heads, head_dim])?.max(1);
        let t = x.len() / token;
        let x = f32_mut(OP, "x", x, t * token)?;
        let half = head_dim / 2;
        let needed = checked(OP, &[pos + t, half])?;
        let table = cos.len();
        if table < needed || sin.len() != table || !head_dim.is_multiple_of(2) {
            return Err(BackendError::OutOfRange {
                op: OP,
                detail: format!("positions {pos}..{} need {needed} table entries, the tables hold {table}", pos + t),
            });
        }
        let (cos, sin) = (f32_ref(OP, "cos", cos, table)?, f32_ref(OP, "sin", sin, table)?);
        ops::rope(x, cos, sin, pos, heads, head_dim);
        Ok(())
    }

    fn attention(
        &self,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        out: TensorMut<'_>,
        d: AttentionDims,
    ) -> Result<(), BackendError> {
        const OP: &str = "attention";
        if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
            return Err(BackendError::OutOfRange {
                op: OP,
                detail: format!("{} heads cannot share {} key/value heads", d.heads, d.kv_heads),
            });
        }
        let q_len = checked(OP, &[d.t, d.heads, d.head_dim])?;
        let kv_len = checked(OP, &[d.pos + d.t, d.kv_heads, d.head_dim])?;
        let q = f32_ref(OP, "q", q, q_len)?;
        let out = f32_mut(OP, "out", out, q_len)?;
        // The cache is f32 or bf16; keys and values share its dtype.
        for (operand, t) in [("k", &k), ("v", &v)] {
            if t.len() != kv_len {
                return Err(BackendError::Shape { op: OP, operand, expected: kv_len, actual: t.len() });
            }
        }
        match (k.as_f32(), v.as_f32(), k.as_bf16(), v.as_bf16()) {
            (Some(k), Some(v), _, _) => attention::attention(q, k, v, out, d),
            (_, _, Some(k), Some(v)) => attention::attention(q, k, v, out, d),
            _ => {
                return Err(BackendError::DType {
                    op: OP,
                    operand: "v",
                    expected: if k.dtype() == DType::BF16 { "bf16 (as k)" } else { "f32 or bf16 (as k)" },
                    actual: v.dtype(),
                });
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: TensorMut<'_>, up: TensorRef<'_>) -> Result<(), BackendError> {
        let len = up.len();
        let up = f32_ref("silu_mul", "up", up, len)?;
        ops::silu_mul(f32_mut("silu_mul", "gate", gate, len)?, up);
        Ok(())
    }

    fn add_assign(&self, x: TensorMut<'_>, y: TensorRef<'_>) -> Result<(), BackendError> {
        let len = y.len();
        let y = f32_ref("add_assign", "y", y, len)?;
        ops::add_assign(f32_mut("add_assign", "x", x, len)?, y);
        Ok(())
    }

    fn embed(&self, table: TensorRef<'_>, tokens: &[u32], out: TensorMut<'_>) -> Result<(), BackendError> {
        const OP: &str = "embed";
        let hidden = out.len() / tokens.len().max(1);
        let out = f32_mut(OP, "out", out, tokens.len() * hidden)?;
        let vocab = table.len() / hidden.max(1);
        for (&tok, row) in tokens.iter().zip(out.chunks_exact_mut(hidden.max(1))) {
            if tok as usize >= vocab {
                return Err(BackendError::OutOfRange {
                    op: OP,
                    detail: format!("token {tok} is outside the {vocab}-entry vocabulary"),
                });
            }
            row_to_f32(table.slice(tok as usize * hidden, hidden), row);
        }
        Ok(())
    }
}
