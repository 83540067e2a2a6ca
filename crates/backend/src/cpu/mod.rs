//! The CPU backend: multithreaded SIMD kernels that compute directly on views of shared memory.

mod matmul;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::device::{Backend, MatmulDims, OperandTrace};
use crate::{BackendError, TensorMut, TensorRef};

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
}
