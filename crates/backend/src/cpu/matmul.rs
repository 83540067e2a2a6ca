//! CPU matrix product on views of shared memory.
//!
//! f32 runs the `matrixmultiply` crate's packed, multithreaded kernels directly on the guest's bytes (on the
//! development machine it measured 1.6× the `gemm` crate at 1024³ with the same two threads; `driftwood bench
//! matmul` re-measures both side by side). bf16 walks K in blocks of [`K_BLOCK`]: each block of A's columns and B's rows is widened to f32
//! into a per-call tile buffer (`K_BLOCK · (m + n)` floats, never a whole operand) and accumulated into C
//! with the same f32 kernel, so accumulation is always f32.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::device::MatmulDims;
use crate::{BackendError, DType, TensorMut, TensorRef};

/// Depth of one bf16 block: 256 f32 columns keep a block of A rows within L2 for typical `m`.
const K_BLOCK: usize = 256;

/// Elements widened per parallel task; smaller tasks cost more in scheduling than they save.
const MIN_ELEMS_PER_TASK: usize = 1 << 15;

pub(super) fn matmul(
    a: TensorRef<'_>,
    b: TensorRef<'_>,
    c: TensorMut<'_>,
    dims: MatmulDims,
) -> Result<(), BackendError> {
    dims.check_operands(&a, &b, &c)?;
    let c_dtype = c.dtype();
    let c = c.into_f32().ok_or(BackendError::DType { op: "matmul", operand: "c", expected: "f32", actual: c_dtype })?;
    if c.is_empty() {
        return Ok(());
    }
    if dims.k == 0 {
        c.fill(0.0);
        return Ok(());
    }
    match a.dtype() {
        DType::F32 => {
            // Both unwraps are guarded by the dtype checks above.
            let (a, b) = (a.as_f32().unwrap_or_default(), b.as_f32().unwrap_or_default());
            f32_product(c, a, dims.k, b, dims, false);
        }
        DType::BF16 | DType::F16 => {
            let (a, b) = (a.as_bf16().unwrap_or_default(), b.as_bf16().unwrap_or_default());
            bf16_product(c, a, b, dims);
        }
    }
    Ok(())
}

/// `c (m, n) (+)= a (m, k; rows `a_row_stride` apart) · b (k, n)`; `accumulate` keeps C's previous contents.
fn f32_product(c: &mut [f32], a: &[f32], a_row_stride: usize, b: &[f32], dims: MatmulDims, accumulate: bool) {
    let MatmulDims { m, n, k } = dims;
    assert!(c.len() == m * n && b.len() >= k * n && a.len() >= (m - 1) * a_row_stride + k);
    // SAFETY: the strides describe row-major matrices lying inside the three slices (checked just above),
    // c does not overlap a or b (it is a `&mut`), and sgemm reads/writes only those elements.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_row_stride as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn bf16_product(c: &mut [f32], a: &[bf16], b: &[bf16], dims: MatmulDims) {
    let MatmulDims { m, n, k } = dims;
    let block = K_BLOCK.min(k);
    let mut a_tile = vec![0f32; m * block]; // (m, kb)
    let mut b_tile = vec![0f32; block * n]; // (kb, n)
    for k0 in (0..k).step_by(block) {
        let kb = block.min(k - k0);
        let a_tile = &mut a_tile[..m * kb];
        let b_tile = &mut b_tile[..kb * n];
        a_tile.par_chunks_mut(kb).with_min_len(MIN_ELEMS_PER_TASK / kb + 1).enumerate().for_each(|(row, dst)| {
            a[row * k + k0..row * k + k0 + kb].convert_to_f32_slice(dst);
        });
        b_tile.par_chunks_mut(n).with_min_len(MIN_ELEMS_PER_TASK / n + 1).enumerate().for_each(|(row, dst)| {
            b[(k0 + row) * n..(k0 + row + 1) * n].convert_to_f32_slice(dst);
        });
        f32_product(c, a_tile, kb, b_tile, MatmulDims { m, n, k: kb }, k0 > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// f64 reference product.
    fn reference(a: &[f64], b: &[f64], d: MatmulDims) -> Vec<f64> {
        let mut c = vec![0.0; d.m * d.n];
        for i in 0..d.m {
            for p in 0..d.k {
                let aip = a[i * d.k + p];
                for j in 0..d.n {
                    c[i * d.n + j] += aip * b[p * d.n + j];
                }
            }
        }
        c
    }

    /// Shapes around tile edges, degenerate vectors and primes.
    fn shapes() -> Vec<MatmulDims> {
        let mut v = vec![];
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 300, 77),
            (300, 1, 77),
            (1, 1, 513),
            (7, 13, 5),
            (16, 16, 16),
            (17, 31, 33),
            (63, 65, 129),
            (128, 128, 128),
            (129, 127, 255),
            (200, 3, 600),
            (3, 257, 300),
            (64, 96, 1000),
            (0, 5, 5),
            (5, 0, 5),
            (4, 4, 0),
        ] {
            v.push(MatmulDims { m, n, k });
        }
        v
    }

    fn check(dtype: DType, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for d in shapes() {
            let a64: Vec<f64> = (0..d.m * d.k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b64: Vec<f64> = (0..d.k * d.n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut c = vec![f32::NAN; d.m * d.n];
            let (a32, b32): (Vec<f32>, Vec<f32>) =
                (a64.iter().map(|&x| x as f32).collect(), b64.iter().map(|&x| x as f32).collect());
            let (ab, bb): (Vec<bf16>, Vec<bf16>) =
                (a32.iter().map(|&x| bf16::from_f32(x)).collect(), b32.iter().map(|&x| bf16::from_f32(x)).collect());
            // The reference sees exactly the inputs the kernel sees (after rounding to the dtype).
            let (ar, br): (Vec<f64>, Vec<f64>) = match dtype {
                DType::F32 => (a32.iter().map(|&x| x as f64).collect(), b32.iter().map(|&x| x as f64).collect()),
                _ => (ab.iter().map(|x| x.to_f64()).collect(), bb.iter().map(|x| x.to_f64()).collect()),
            };
            let (av, bv) = match dtype {
                DType::F32 => (TensorRef::from_f32(&a32), TensorRef::from_f32(&b32)),
                _ => (TensorRef::from_bf16(&ab), TensorRef::from_bf16(&bb)),
            };
            matmul(av, bv, TensorMut::from_f32(&mut c), d).unwrap();
            let want = reference(&ar, &br, d);
            for (i, (&got, &want)) in c.iter().zip(&want).enumerate() {
                // f32 accumulation of k products of magnitude ≤ 1: error grows like k·eps.
                let tol = 1e-6 * (d.k as f64 + 1.0);
                assert!((got as f64 - want).abs() <= tol, "{dtype} {d} at {i}: got {got}, want {want}");
            }
        }
    }

    #[test]
    fn f32_matches_f64_reference_on_many_shapes() {
        check(DType::F32, 1);
        check(DType::F32, 2);
    }

    #[test]
    fn bf16_matches_f64_reference_on_many_shapes() {
        check(DType::BF16, 3);
    }

    #[test]
    fn wrong_lengths_and_dtypes_are_errors() {
        let a = vec![0f32; 6];
        let b = vec![0f32; 6];
        let mut c = vec![0f32; 4];
        let d = MatmulDims { m: 2, n: 2, k: 3 };
        let err = matmul(TensorRef::from_f32(&a[..5]), TensorRef::from_f32(&b), TensorMut::from_f32(&mut c), d);
        assert!(matches!(err, Err(BackendError::Shape { operand: "a", .. })));
        let bb = vec![bf16::ZERO; 6];
        let err = matmul(TensorRef::from_f32(&a), TensorRef::from_bf16(&bb), TensorMut::from_f32(&mut c), d);
        assert!(matches!(err, Err(BackendError::DType { operand: "b", .. })));
        let huge = MatmulDims { m: usize::MAX, n: 2, k: 2 };
        let err = matmul(TensorRef::from_f32(&a), TensorRef::from_f32(&b), TensorMut::from_f32(&mut c), huge);
        assert!(matches!(err, Err(BackendError::Overflow { .. })));
    }
}
