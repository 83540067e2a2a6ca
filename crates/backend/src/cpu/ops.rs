//! The small transformer operations of the CPU backend: normalization, rotary embedding, gated activation,
//! residual add and embedding lookup. All activations are f32.

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
