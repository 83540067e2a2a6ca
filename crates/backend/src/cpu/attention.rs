//! Causal attention of the CPU backend over a KV cache of f32 or bf16 rows, for decode (one query token) and
//! prefill (many).
//!
//! Cost per query token and key/value head at context `n`: `2·n·hd` cache elements read (its K and V rows)
//! and `4·n·hd·group` FLOPs, `group` being the query heads that share the key/value head. At decode the reads
//! dominate: the kernel's job is one pass over the cache at memory speed. Work is split into tasks of (token,
//! key/value head, chunk of [`CHUNK`] positions); a task serves every query head of its group, so each K and V
//! row is read once per task, and a token's chunks (partial softmaxes) are merged at the end, each rescaled
//! to the global maximum. Calls that read little run on the calling thread; others are shared with the pool
//! ([`share`]), without the fork-join of a parallel iterator.
//!
//! The AVX-512 path (head widths 32, 64 and 128) scores 4 positions at a time: their K rows widened once
//! into registers, dotted with each query head, and summed across lanes by one transposing reduction; the
//! exponentials are vectorized; and each query head's V accumulator stays in registers while the chunk's V
//! rows stream past. Other widths, and CPUs without AVX-512, take the portable path.

use std::cell::RefCell;

use super::isa::Isa;
use super::share::share;
use super::simd::Elem;
use crate::device::AttentionDims;

/// Positions per task: long contexts are split into chunks processed in parallel and merged, so decode uses
/// every core even with few key/value heads.
const CHUNK: usize = 128;

/// A call runs on the calling thread alone unless it reads at least this many cache bytes (a few µs of
/// work): below that, waking a pool thread costs as much as it saves.
const PARALLEL_BYTES: usize = 64 << 10;

/// Rows ahead to prefetch: a head's rows are `kv_dim` apart, a stride the hardware prefetchers follow poorly.
const PREFETCH_ROWS: usize = 10;

/// Causal attention of `q (t, heads, hd)` over `k`, `v` `(pos + t, kv_heads · hd)` into `out (t, heads, hd)`,
/// on the fastest path this CPU runs. Query `i` sits at absolute position `pos + i` and sees keys
/// `0..=pos + i` (or the last `window` of them). Shapes are checked by the caller.
pub(crate) fn attention<E: Elem>(q: &[f32], k: &[E], v: &[E], out: &mut [f32], d: AttentionDims) {
    attention_with(Isa::best(), q, k, v, out, d);
}

/// [`attention`] on a given path.
///
/// # Panics
///
/// If `isa` is not [available](Isa::available), or the slice lengths do not match `d`.
pub(crate) fn attention_with<E: Elem>(isa: Isa, q: &[f32], k: &[E], v: &[E], out: &mut [f32], d: AttentionDims) {
    assert!(isa.available(), "attention: {isa:?} is not supported by this CPU");
    let AttentionDims { t, pos, heads, kv_heads, head_dim: hd, .. } = d;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "attention: {heads} heads over {kv_heads} kv heads");
    assert_eq!(q.len(), t * heads * hd, "attention: q length");
    assert_eq!(out.len(), t * heads * hd, "attention: out length");
    assert_eq!(k.len(), (pos + t) * kv_heads * hd, "attention: k length");
    assert_eq!(v.len(), k.len(), "attention: v length");
    if t == 0 || heads == 0 || hd == 0 {
        return;
    }
    let call = Call { q, k, v, d, group: heads / kv_heads, chunks: (pos + t).div_ceil(CHUNK) };
    let kernel = call.kernel(isa);
    let part_len = call.part_len();
    let tasks = t * kv_heads * call.chunks;
    let mut parts = vec![0f32; tasks * part_len]; // (t, kv_heads, chunks, group, hd + 2)
    let parts_at = SendPtr(parts.as_mut_ptr());
    let run = |task: usize| {
        // SAFETY: task `task` alone writes `parts[task · part_len..][..part_len]`, inside `parts` (task < tasks),
        // and `parts` outlives every task (`share` returns once all are done).
        let part = unsafe { std::slice::from_raw_parts_mut(parts_at.add(task * part_len), part_len) };
        let (i, rest) = (task / (kv_heads * call.chunks), task % (kv_heads * call.chunks));
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            if scores.len() < call.group * CHUNK {
                scores.resize(call.group * CHUNK, 0.0);
            }
            // SAFETY: `kernel` was chosen for this CPU and shape by `Call::kernel`; the lengths were checked above.
            unsafe { kernel(&call, (i, rest / call.chunks, rest % call.chunks), &mut scores, part) };
        });
    };
    // Every token reads the rows up to its own position: about t · (pos + t/2) rows of K and V.
    let bytes = t * (pos + t.div_ceil(2)) * 2 * kv_heads * hd * size_of::<E>();
    let threads = rayon::current_num_threads();
    if threads == 1 || tasks == 1 || bytes < PARALLEL_BYTES {
        (0..tasks).for_each(run);
    } else {
        share(tasks, threads - 1, &run);
    }
    call.merge(&parts, out);
}

thread_local! {
    /// Scores of one task, `(group, CHUNK)`, reused across tasks and calls on this thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One call's operands and the shape of its tasks.
struct Call<'a, E> {
    q: &'a [f32], // (t, heads, hd)
    k: &'a [E],   // (pos + t, kv_heads, hd)
    v: &'a [E],   // (pos + t, kv_heads, hd)
    d: AttentionDims,
    /// Query heads per key/value head.
    group: usize,
    /// Chunks of [`CHUNK`] positions covering `0..pos + t`.
    chunks: usize,
}

/// A task's kernel: partial attention of token `i`'s query heads of key/value head `g` over chunk `c`, into
/// `part (group, hd + 2)`: per query head the unnormalized weighted sum of values (`hd`), the chunk's maximum
/// score and its sum of `exp(score − max)` (0 when the chunk has no visible position). `scores` holds at least
/// `group · CHUNK` floats.
///
/// # Safety
///
/// The CPU supports the kernel's target features, the call's slices have the lengths its shape says, and the
/// head width is one the kernel was chosen for (see [`Call::kernel`]).
type Kernel<E> = unsafe fn(&Call<'_, E>, (usize, usize, usize), &mut [f32], &mut [f32]);

impl<E: Elem> Call<'_, E> {
    /// Floats of one task's part: per query head, `hd` sums, the maximum and the sum of exponentials.
    fn part_len(&self) -> usize {
        self.group * (self.d.head_dim + 2)
    }

    /// The kernel for `isa` and this call's head width.
    fn kernel(&self, isa: Isa) -> Kernel<E> {
        match (isa, self.d.head_dim) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 32) => avx512::chunk::<E, 2, 8>,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 64) => avx512::chunk::<E, 4, 4>,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 128) => avx512::chunk::<E, 8, 2>,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, _) => portable::chunk_avx512,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => portable::chunk_avx2,
            _ => portable::chunk_scalar,
        }
    }

    /// Positions `lo..hi` of chunk `c` that token `i` sees (empty when `lo ≥ hi`).
    fn span(&self, i: usize, c: usize) -> (usize, usize) {
        let p = self.d.pos + i;
        let first = self.d.window.map_or(0, |w| (p + 1).saturating_sub(w));
        (first.max(c * CHUNK), (p + 1).min((c + 1) * CHUNK))
    }

    /// Merges the chunks of each (token, query head) into `out`: each partial sum rescaled to the maximum.
    fn merge(&self, parts: &[f32], out: &mut [f32]) {
        let AttentionDims { t, heads, kv_heads, head_dim: hd, .. } = self.d;
        let (group, chunks, part_len) = (self.group, self.chunks, self.part_len());
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
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
impl SendPtr {
    /// `self + count` elements (a method, so that closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    ///
    /// As for [`pointer::add`].
    unsafe fn add(self, count: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(count) }
    }
}

// SAFETY: used only to hand disjoint parts to pool threads (see `attention_with`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Asks the CPU to start loading the `bytes` bytes at `p` (a hint: never faults, whatever the address; no
/// effect off x86-64).
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: prefetching reads nothing architecturally and never faults; the address is formed with
        // wrapping arithmetic and never dereferenced.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// The portable kernel: plain Rust, compiled three times (no extra features, AVX2 + FMA, AVX-512F) so that
/// the compiler vectorizes it for each.
mod portable {
    use super::{CHUNK, Call, Elem, PREFETCH_ROWS, prefetch};
    use crate::device::AttentionDims;

    /// Dot product with 16 independent accumulators, so that the compiler can keep whole SIMD registers busy
    /// (a plain `sum()` is one serial chain of adds: f32 addition order is fixed).
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

    /// The kernel without extra target features.
    ///
    /// # Safety
    ///
    /// None beyond the types; `unsafe` only to share a signature with the other kernels.
    pub(super) unsafe fn chunk_scalar<E: Elem>(
        call: &Call<'_, E>,
        at: (usize, usize, usize),
        scores: &mut [f32],
        part: &mut [f32],
    ) {
        chunk(call, at, scores, part)
    }

    /// The kernel compiled for AVX-512F.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chunk_avx512<E: Elem>(
        call: &Call<'_, E>,
        at: (usize, usize, usize),
        scores: &mut [f32],
        part: &mut [f32],
    ) {
        chunk(call, at, scores, part)
    }

    /// The kernel compiled for AVX2 with FMA.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_avx2<E: Elem>(
        call: &Call<'_, E>,
        at: (usize, usize, usize),
        scores: &mut [f32],
        part: &mut [f32],
    ) {
        chunk(call, at, scores, part)
    }

    /// See [`Kernel`](super::Kernel). Each row is widened to f32 once, into a row buffer, before use.
    #[inline(always)]
    fn chunk<E: Elem>(call: &Call<'_, E>, (i, g, c): (usize, usize, usize), scores: &mut [f32], part: &mut [f32]) {
        let AttentionDims { heads, kv_heads, head_dim: hd, .. } = call.d;
        let (group, (q, k, v)) = (call.group, (call.q, call.k, call.v));
        let kv_stride = kv_heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let (lo, hi) = call.span(i, c);
        part.fill(0.0);
        if lo >= hi {
            for hq in 0..group {
                part[hq * (hd + 2) + hd] = f32::NEG_INFINITY;
            }
            return;
        }
        let n = hi - lo;
        let mut row_f32 = [0f32; 256];
        let mut heap = Vec::new();
        let buf: &mut [f32] = if hd <= row_f32.len() {
            &mut row_f32[..hd]
        } else {
            heap.resize(hd, 0.0);
            &mut heap
        };
        let q0 = (i * heads + g * group) * hd; // this group's query heads are contiguous
        for s in lo..hi {
            let row = s * kv_stride + g * hd;
            prefetch(k.as_ptr().wrapping_add(row + PREFETCH_ROWS * kv_stride).cast(), hd * size_of::<E>());
            for (b, x) in buf.iter_mut().zip(&k[row..row + hd]) {
                *b = x.to_f32();
            }
            for hq in 0..group {
                scores[hq * CHUNK + s - lo] = dot(&q[q0 + hq * hd..q0 + (hq + 1) * hd], buf) * scale;
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
            prefetch(v.as_ptr().wrapping_add(row + PREFETCH_ROWS * kv_stride).cast(), hd * size_of::<E>());
            for (b, x) in buf.iter_mut().zip(&v[row..row + hd]) {
                *b = x.to_f32();
            }
            for hq in 0..group {
                let w = scores[hq * CHUNK + s - lo];
                let acc = &mut part[hq * (hd + 2)..hq * (hd + 2) + hd];
                for (a, &x) in acc.iter_mut().zip(buf.iter()) {
                    *a += w * x;
                }
            }
        }
    }
}

/// The AVX-512 kernel for head widths of `16 · NV`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::simd::avx512::{exp_neg, load16, reduce4};
    use super::{CHUNK, Call, Elem, PREFETCH_ROWS, prefetch};
    use crate::device::AttentionDims;

    /// See [`Kernel`](super::Kernel).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512F; `16 · NV` is the head width and `HB · NV ≤ 16` (the query heads whose V
    /// accumulators share the registers); the call's slices have the lengths its shape
    /// says; `scores` holds `group · CHUNK` floats and `part` `group · (hd + 2)`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // Register tiles read clearest with explicit indices.
    pub(super) unsafe fn chunk<E: Elem, const NV: usize, const HB: usize>(
        call: &Call<'_, E>,
        (i, g, c): (usize, usize, usize),
        scores: &mut [f32], // (group, CHUNK)
        part: &mut [f32],   // (group, hd + 2)
    ) {
        let AttentionDims { heads, kv_heads, head_dim: hd, .. } = call.d;
        debug_assert_eq!(hd, 16 * NV);
        let group = call.group;
        let kv_stride = kv_heads * hd;
        let (lo, hi) = call.span(i, c);
        if lo >= hi {
            part.fill(0.0);
            for hq in 0..group {
                part[hq * (hd + 2) + hd] = f32::NEG_INFINITY;
            }
            return;
        }
        let n = hi - lo;
        let row_bytes = hd * size_of::<E>();
        // SAFETY: positions `lo..hi` ⊆ `0..pos + t` (span), so rows `s · kv_stride + g · hd` plus `hd` elements
        // lie inside `k` and `v`; this group's query heads `q0..q0 + group · hd` lie inside `q`; score indices
        // stay below `group · CHUNK` (n ≤ CHUNK) and part indices below `group · (hd + 2)`. Prefetches never
        // fault.
        unsafe {
            let (kb, vb) = (call.k.as_ptr().add(g * hd), call.v.as_ptr().add(g * hd));
            let qb = call.q.as_ptr().add((i * heads + g * group) * hd); // the group's heads are contiguous
            let sp = scores.as_mut_ptr();
            let scale = _mm_set1_ps(1.0 / (hd as f32).sqrt());

            // Scores, 4 positions at a time: K rows widened once, each query head dotted with all 4.
            let mut s = lo;
            while s + 4 <= hi {
                let mut kr = [[_mm512_setzero_ps(); NV]; 4];
                for (p, kp) in kr.iter_mut().enumerate() {
                    let row = kb.add((s + p) * kv_stride);
                    prefetch(row.wrapping_add(PREFETCH_ROWS * kv_stride).cast(), row_bytes);
                    for (j, kv) in kp.iter_mut().enumerate() {
                        *kv = load16(row.add(16 * j));
                    }
                }
                for hq in 0..group {
                    let qh = qb.add(hq * hd);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for j in 0..NV {
                        let qv = _mm512_loadu_ps(qh.add(16 * j));
                        for p in 0..4 {
                            acc[p] = _mm512_fmadd_ps(kr[p][j], qv, acc[p]);
                        }
                    }
                    let s4 = _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), scale);
                    _mm_storeu_ps(sp.add(hq * CHUNK + s - lo), s4);
                }
                s += 4;
            }
            while s < hi {
                let row = kb.add(s * kv_stride);
                let mut kr = [_mm512_setzero_ps(); NV];
                for (j, kv) in kr.iter_mut().enumerate() {
                    *kv = load16(row.add(16 * j));
                }
                for hq in 0..group {
                    let qh = qb.add(hq * hd);
                    let mut acc = _mm512_setzero_ps();
                    for (j, kv) in kr.iter().enumerate() {
                        acc = _mm512_fmadd_ps(*kv, _mm512_loadu_ps(qh.add(16 * j)), acc);
                    }
                    *sp.add(hq * CHUNK + s - lo) = _mm512_reduce_add_ps(acc) * (1.0 / (hd as f32).sqrt());
                }
                s += 1;
            }

            // Softmax numerators in place, and each head's maximum and sum.
            for hq in 0..group {
                let sc = sp.add(hq * CHUNK);
                let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
                let mut j = 0;
                while j < n {
                    let m: __mmask16 = if n - j >= 16 { 0xffff } else { (1u16 << (n - j)) - 1 };
                    maxv = _mm512_max_ps(maxv, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, sc.add(j)));
                    j += 16;
                }
                let max = _mm512_reduce_max_ps(maxv);
                let (maxv, mut sumv) = (_mm512_set1_ps(max), _mm512_setzero_ps());
                let mut j = 0;
                while j < n {
                    let m: __mmask16 = if n - j >= 16 { 0xffff } else { (1u16 << (n - j)) - 1 };
                    let e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc.add(j)), maxv));
                    _mm512_mask_storeu_ps(sc.add(j), m, e);
                    sumv = _mm512_mask_add_ps(sumv, m, sumv, e);
                    j += 16;
                }
                *part.as_mut_ptr().add(hq * (hd + 2) + hd) = max;
                *part.as_mut_ptr().add(hq * (hd + 2) + hd + 1) = _mm512_reduce_add_ps(sumv);
            }

            // Weighted sums of V: up to 16 accumulators (a block of query heads) stay in registers while the
            // chunk's V rows stream past, once per block.
            let mut h0 = 0;
            while h0 < group {
                let hb = HB.min(group - h0);
                let mut acc = [[_mm512_setzero_ps(); NV]; HB];
                for s in lo..hi {
                    let row = vb.add(s * kv_stride);
                    prefetch(row.wrapping_add(PREFETCH_ROWS * kv_stride).cast(), row_bytes);
                    let mut vr = [_mm512_setzero_ps(); NV];
                    for (j, vv) in vr.iter_mut().enumerate() {
                        *vv = load16(row.add(16 * j));
                    }
                    // A constant trip count (HB), so that the accumulators are registers; heads past `hb` skip.
                    for (h, ah) in acc.iter_mut().enumerate() {
                        if h < hb {
                            let w = _mm512_set1_ps(*sp.add((h0 + h) * CHUNK + s - lo));
                            for j in 0..NV {
                                ah[j] = _mm512_fmadd_ps(w, vr[j], ah[j]);
                            }
                        }
                    }
                }
                for (h, ah) in acc.iter().enumerate().take(hb) {
                    let o = part.as_mut_ptr().add((h0 + h) * (hd + 2));
                    for (j, a) in ah.iter().enumerate() {
                        _mm512_storeu_ps(o.add(16 * j), *a);
                    }
                }
                h0 += hb;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::{Isa, attention_with};
    use crate::cpu::simd::Elem;
    use crate::device::AttentionDims;

    /// Softmax attention in f64 over the same (already rounded) cache values.
    fn reference<E: Elem>(q: &[f32], k: &[E], v: &[E], d: AttentionDims) -> Vec<f64> {
        let AttentionDims { t, pos, heads, kv_heads, head_dim: hd, window } = d;
        let group = heads / kv_heads;
        let mut out = vec![0f64; t * heads * hd];
        for i in 0..t {
            let p = pos + i;
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            for h in 0..heads {
                let g = h / group;
                let qh = &q[(i * heads + h) * hd..][..hd];
                let scores: Vec<f64> = (first..=p)
                    .map(|s| {
                        let kr = &k[(s * kv_heads + g) * hd..][..hd];
                        qh.iter().zip(kr).map(|(&a, b)| f64::from(a) * f64::from(b.to_f32())).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                let o = &mut out[(i * heads + h) * hd..][..hd];
                for (s, w) in (first..=p).zip(&w) {
                    let vr = &v[(s * kv_heads + g) * hd..][..hd];
                    for (o, x) in o.iter_mut().zip(vr) {
                        *o += w / sum * f64::from(x.to_f32());
                    }
                }
            }
        }
        out
    }

    fn case<E: Elem>(rng: &mut StdRng, d: AttentionDims, from_f32: fn(f32) -> E, what: &str) {
        let rows = (d.pos + d.t) * d.kv_heads * d.head_dim;
        // Scores of a few units, as in a trained model: the softmax is neither flat nor one-hot.
        let q: Vec<f32> = (0..d.t * d.heads * d.head_dim).map(|_| rng.random_range(-1.5..1.5)).collect();
        let k: Vec<E> = (0..rows).map(|_| from_f32(rng.random_range(-1.5..1.5))).collect();
        let v: Vec<E> = (0..rows).map(|_| from_f32(rng.random_range(-1.0..1.0))).collect();
        let want = reference(&q, &k, &v, d);
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            let mut out = vec![f32::NAN; q.len()];
            attention_with(isa, &q, &k, &v, &mut out, d);
            for (j, (&got, &want)) in out.iter().zip(&want).enumerate() {
                assert!((f64::from(got) - want).abs() <= 2e-5, "{what} {isa:?} {d:?}: out[{j}] = {got}, want {want}");
            }
        }
    }

    #[test]
    fn matches_reference_on_every_path() {
        let mut rng = StdRng::seed_from_u64(5);
        // Head widths with and without a vector kernel; groups of 1 to 8 query heads (block remainders);
        // decode and prefill; chunk boundaries (128) crossed; windows.
        let shapes = [
            (1, 0, 2, 2, 64, None),
            (1, 5, 9, 3, 64, None),
            (1, 300, 9, 3, 64, None),
            (1, 300, 8, 1, 128, Some(200)),
            (1, 131, 8, 2, 32, None),
            (1, 140, 6, 2, 80, None),
            (3, 126, 4, 1, 64, None),
            (17, 0, 4, 2, 128, Some(5)),
            (5, 250, 3, 3, 16, Some(130)),
        ];
        for (t, pos, heads, kv_heads, head_dim, window) in shapes {
            let d = AttentionDims { t, pos, heads, kv_heads, head_dim, window };
            case(&mut rng, d, |x| x, "f32");
            case(&mut rng, d, bf16::from_f32, "bf16");
        }
    }

    #[test]
    fn large_enough_to_share_with_the_pool() {
        // Over PARALLEL_BYTES of cache: the tasks are spread over the pool's threads.
        let mut rng = StdRng::seed_from_u64(9);
        let d = AttentionDims { t: 1, pos: 1500, heads: 8, kv_heads: 2, head_dim: 64, window: None };
        case(&mut rng, d, bf16::from_f32, "bf16");
    }
}
