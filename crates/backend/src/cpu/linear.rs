//! `y (t, out) = x (t, in) · w (out, in)ᵀ + bias`: the projection every transformer layer is made of, with
//! weights stored as the model file has them (f32, bf16 or f16) and f32 activations and accumulation.
//!
//! For decode (`t = 1`) this is a matrix-vector product whose cost is reading `w` once: it is memory-bound,
//! so the kernel streams each weight row once and spreads rows over threads. For prefill (`t > 1`) each block
//! of weight rows is reused for every token while it is in cache.

use half::{bf16, f16};
use rayon::prelude::*;

/// Weights of a linear layer, `(out, in)` row-major, in their stored type.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `y (t, out) = x (t, in) · w (out, in)ᵀ (+ bias (out))`. Shapes are checked by the caller.
pub(crate) fn linear(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    t: usize,
    input: usize,
    output: usize,
) {
    debug_assert!(x.len() == t * input && y.len() == t * output);
    // Work on blocks of output rows: each block's weights are read once and applied to every token.
    let rows: Vec<usize> = (0..output).step_by(ROWS_PER_TASK).collect();
    let y_ptr = SendPtr(y.as_mut_ptr());
    rows.par_iter().for_each(|&r0| {
        let r1 = (r0 + ROWS_PER_TASK).min(output);
        let mut row = vec![0f32; input];
        for r in r0..r1 {
            let w_row: &[f32] = match w {
                Weights::F32(w) => &w[r * input..(r + 1) * input],
                Weights::BF16(w) => {
                    for (d, s) in row.iter_mut().zip(&w[r * input..(r + 1) * input]) {
                        *d = s.to_f32();
                    }
                    &row
                }
                Weights::F16(w) => {
                    for (d, s) in row.iter_mut().zip(&w[r * input..(r + 1) * input]) {
                        *d = s.to_f32();
                    }
                    &row
                }
            };
            let b = bias.map_or(0.0, |b| b[r]);
            for ti in 0..t {
                let xs = &x[ti * input..(ti + 1) * input];
                let dot: f32 = xs.iter().zip(w_row).map(|(a, b)| a * b).sum();
                // SAFETY: each task writes only the rows r0..r1 of every token: disjoint across tasks, in
                // bounds because y.len() == t * output and r < output.
                unsafe { *y_ptr.get().add(ti * output + r) = dot + b };
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output rows to pool threads (see `linear`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
