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

/// Dot product with 16 independent accumulators, so the compiler can keep whole SIMD registers busy (a plain
/// `sum()` is one serial chain of adds: f32 addition order is fixed).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = 0f32;
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    acc.iter().sum::<f32>() + sum
}

/// An element type of the KV cache: f32, or bf16 widened to f32 one row at a time as attention reads it.
pub(crate) trait KvElem: Copy + Send + Sync {
    /// `row` as f32s: the row itself for f32, else widened into `buf` (at least `row.len()` long).
    fn as_f32<'b>(row: &'b [Self], buf: &'b mut [f32]) -> &'b [f32];
}

impl KvElem for f32 {
    #[inline(always)]
    fn as_f32<'b>(row: &'b [f32], _buf: &'b mut [f32]) -> &'b [f32] {
        row
    }
}

impl KvElem for half::bf16 {
    #[inline(always)]
    fn as_f32<'b>(row: &'b [half::bf16], buf: &'b mut [f32]) -> &'b [f32] {
        let out = &mut buf[..row.len()];
        // bf16 is the top half of an f32: widening is a shift (vectorized).
        for (o, x) in out.iter_mut().zip(row) {
            *o = f32::from_bits(u32::from(x.to_bits()) << 16);
        }
        out
    }
}

/// Positions per attention task: long contexts are split into chunks processed in parallel and merged
/// (a partial softmax per chunk), so decode uses every core even with few key/value heads.
const CHUNK: usize = 128;

/// Causal attention of `q (t, heads, hd)` over `k`, `v` `(pos + t, kv_heads · hd)` into `out (t, heads, hd)`.
/// Query `i` sits at absolute position `pos + i` and sees keys `0..=pos + i` (or the last `window` of them).
///
/// Each task takes one token, one key/value head and one chunk of positions, and serves all the query heads
/// that share that key/value head, so each key and value row is read once per chunk, not once per query head.
pub(crate) fn attention<E: KvElem>(q: &[f32], k: &[E], v: &[E], out: &mut [f32], d: AttentionDims) {
    let AttentionDims { t, pos, heads, kv_heads, head_dim: hd, .. } = d;
    let group = heads / kv_heads;
    let chunks = (pos + t).div_ceil(CHUNK);
    let part_len = group * (hd + 2); // per query head: acc (hd), max, sum
    let mut parts = vec![0f32; t * kv_heads * chunks * part_len]; // (t, kv_heads, chunks, group, hd + 2)
    let mut kernel: ChunkKernel<E> = chunk_generic;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            kernel = chunk_avx512;
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            kernel = chunk_avx2;
        }
    }
    parts.par_chunks_mut(part_len).enumerate().for_each_init(
        || (vec![0f32; group * CHUNK], vec![0f32; hd]),
        |(scores, row), (task, part)| {
            let (i, rest) = (task / (kv_heads * chunks), task % (kv_heads * chunks));
            let (g, c) = (rest / chunks, rest % chunks);
            // SAFETY: `kernel` matches this CPU (chosen above).
            unsafe { kernel(q, k, v, d, (i, g, c), (scores, row), part) }
        },
    );
    // Merge the chunks of each (token, query head): rescale each partial sum to the global maximum.
    for i in 0..t {
        for h in 0..heads {
            let (g, hq) = (h / group, h % group);
            let o = &mut out[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            let part = |c: usize| {
                let at = ((i * kv_heads + g) * chunks + c) * part_len + hq * (hd + 2);
                &parts[at..at + hd + 2]
            };
            let max = (0..chunks).map(|c| part(c)[hd]).fold(f32::NEG_INFINITY, f32::max);
            o.fill(0.0);
            let mut sum = 0f32;
            for c in 0..chunks {
                let p = part(c);
                if p[hd + 1] == 0.0 {
                    continue; // no visible position in this chunk
                }
                let scale = (p[hd] - max).exp();
                sum += p[hd + 1] * scale;
                for (x, &a) in o.iter_mut().zip(&p[..hd]) {
                    *x += a * scale;
                }
            }
            let inv = 1.0 / sum;
            for x in o.iter_mut() {
                *x *= inv;
            }
        }
    }
}

/// Scratch of one attention task: scores `(group, CHUNK)` and one widened row `(hd)`.
type TaskScratch<'s> = (&'s mut [f32], &'s mut [f32]);

type ChunkKernel<E> = unsafe fn(&[f32], &[E], &[E], AttentionDims, (usize, usize, usize), TaskScratch<'_>, &mut [f32]);

/// [`chunk`] without extra target features.
///
/// # Safety
///
/// None beyond the types; `unsafe` only to share a signature with the feature-specific versions.
unsafe fn chunk_generic<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    d: AttentionDims,
    at: (usize, usize, usize),
    scratch: TaskScratch<'_>,
    part: &mut [f32],
) {
    chunk(q, k, v, d, at, scratch, part)
}

/// [`chunk`] compiled for AVX-512.
///
/// # Safety
///
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_avx512<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    d: AttentionDims,
    at: (usize, usize, usize),
    scratch: TaskScratch<'_>,
    part: &mut [f32],
) {
    chunk(q, k, v, d, at, scratch, part)
}

/// [`chunk`] compiled for AVX2 with FMA.
///
/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    d: AttentionDims,
    at: (usize, usize, usize),
    scratch: TaskScratch<'_>,
    part: &mut [f32],
) {
    chunk(q, k, v, d, at, scratch, part)
}

/// Rows ahead to prefetch: a head's rows are `kv_dim` apart, a stride the hardware prefetchers follow poorly.
const PREFETCH_ROWS: usize = 10;

/// Asks the CPU to start loading `hd` floats at `data[at..]` (no effect past the end or off x86-64).
#[inline(always)]
fn prefetch_row<E>(data: &[E], at: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if at + hd <= data.len() {
        for line in (0..hd).step_by(64 / size_of::<E>().max(1)) {
            // SAFETY: prefetching is a hint and never faults; the address is inside `data` anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch(data.as_ptr().add(at + line).cast(), std::arch::x86_64::_MM_HINT_T0)
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, hd);
}

/// Partial attention of token `i`'s query heads of key/value head `g` over chunk `c` of positions: writes,
/// per query head, the unnormalized weighted sum of values (`hd`), the chunk's maximum score and its sum of
/// `exp(score − max)` (0 when the chunk has no visible position).
#[inline(always)]
fn chunk<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    d: AttentionDims,
    (i, g, c): (usize, usize, usize),
    (scores, buf): TaskScratch<'_>, // (group, CHUNK), (hd)
    part: &mut [f32],               // (group, hd + 2)
) {
    let AttentionDims { pos, heads, kv_heads, head_dim: hd, window, .. } = d;
    let group = heads / kv_heads;
    let kv_stride = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let p = pos + i;
    let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
    let (lo, hi) = (first.max(c * CHUNK), (p + 1).min((c + 1) * CHUNK));
    part.fill(0.0);
    if lo >= hi {
        for hq in 0..group {
            part[hq * (hd + 2) + hd] = f32::NEG_INFINITY;
        }
        return;
    }
    let n = hi - lo;
    let q0 = (i * heads + g * group) * hd; // this group's query heads are contiguous
    for s in lo..hi {
        let row = s * kv_stride + g * hd;
        prefetch_row(k, row + PREFETCH_ROWS * kv_stride, hd);
        let kr = E::as_f32(&k[row..row + hd], buf);
        for hq in 0..group {
            scores[hq * CHUNK + s - lo] = dot(&q[q0 + hq * hd..q0 + (hq + 1) * hd], kr) * scale;
        }
    }
    for hq in 0..group {
        let sc = &mut scores[hq * CHUNK..hq * CHUNK + n];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        part[hq * (hd + 2) + hd] = max;
        part[hq * (hd + 2) + hd + 1] = sum;
    }
    for s in lo..hi {
        let row = s * kv_stride + g * hd;
        prefetch_row(v, row + PREFETCH_ROWS * kv_stride, hd);
        let vr = E::as_f32(&v[row..row + hd], buf);
        for hq in 0..group {
            let w = scores[hq * CHUNK + s - lo];
            let acc = &mut part[hq * (hd + 2)..hq * (hd + 2) + hd];
            for (a, &x) in acc.iter_mut().zip(vr) {
                *a += w * x;
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
