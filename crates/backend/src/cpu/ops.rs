//! The small transformer operations of the CPU backend: normalization, rotary embedding, attention over a
//! KV cache, gated activation, residual add and embedding lookup. All activations are f32.

use rayon::prelude::*;

use crate::device::AttentionDims;

/// `y[r] = x[r] / sqrt(mean(x[r]²) + eps) · weight` for each row `r` of width `weight.len()`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let d = weight.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// Rotate-half RoPE in place on `x (t, heads, head_dim)` for absolute positions `pos..pos+t`, with
/// `cos`/`sin` tables `(positions, head_dim/2)`: pair `(j, j + head_dim/2)` rotates by angle `(p, j)`.
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], pos: usize, heads: usize, head_dim: usize) {
    let half = head_dim / 2;
    for (i, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let row = (pos + i) * half;
        let (c, s) = (&cos[row..row + half], &sin[row..row + half]);
        for head in token.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (lo[j], hi[j]);
                lo[j] = a * c[j] - b * s[j];
                hi[j] = b * c[j] + a * s[j];
            }
        }
    }
}

/// Causal attention of `q (t, heads, hd)` over `k`, `v` `(pos + t, kv_heads · hd)` into `out (t, heads, hd)`.
/// Query `i` sits at absolute position `pos + i` and sees keys `0..=pos + i` (or the last `window` of them).
pub(crate) fn attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], d: AttentionDims) {
    let AttentionDims { t, pos, heads, kv_heads, head_dim: hd, window } = d;
    let group = heads / kv_heads;
    let kv_stride = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..heads).into_par_iter().for_each(|h| {
        let kvh = h / group;
        let mut scores = vec![0f32; pos + t];
        let mut acc = vec![0f32; hd];
        for i in 0..t {
            let p = pos + i;
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for s in first..=p {
                let kr = &k[s * kv_stride + kvh * hd..s * kv_stride + (kvh + 1) * hd];
                let dot = qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                scores[s] = dot;
                max = max.max(dot);
            }
            let mut sum = 0f32;
            for sc in &mut scores[first..=p] {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            acc.fill(0.0);
            for s in first..=p {
                let w = scores[s] / sum;
                let vr = &v[s * kv_stride + kvh * hd..s * kv_stride + (kvh + 1) * hd];
                for (a, &x) in acc.iter_mut().zip(vr) {
                    *a += w * x;
                }
            }
            // SAFETY: head `h` of token `i` is written by this task only; in bounds as out is (t, heads, hd).
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out_ptr.get().add((i * heads + h) * hd), hd) };
        }
    });
}

/// `gate = silu(gate) · up`, elementwise.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`, elementwise.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: hands disjoint output ranges to pool threads (see `attention`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
