//! `y (t, out) = x (t, in) · w (out, in)ᵀ + bias`: the projection every transformer layer is made of, with
//! weights stored as the model file has them (f32, bf16 or f16) and f32 activations and accumulation.
//!
//! Weights are read in place (they may sit in an mmap of the model file, aligned only to their element size)
//! and never converted as a whole: each vector of weights is widened to f32 in a register right before use.
//!
//! * **Decode** (`t = 1`) is a matrix-vector product whose cost is reading `w` once: it is memory-bound.
//!   Rows are split into a few long contiguous chunks per thread, run by the calling thread and threads of
//!   the global rayon pool ([`share`]); each chunk is read front to back, one row at a time with four
//!   accumulators, prefetching [`PREFETCH_BYTES`] ahead (the hardware prefetcher alone leaves a core well
//!   short of its share of the memory bandwidth).
//! * **Prefill** (`t > 1`) reuses weights for many tokens. A register tile of 4 weight rows × up to 6
//!   tokens (AVX-512; 4 × 2 on AVX2) loads, per step along `in`, one vector of `x` per token and one of
//!   weights per row, and accumulates all 24 lane-wise products; each accumulator is summed across its
//!   lanes at the end, four at a time with a transposing reduction. A task's rows are taken in chunks that
//!   stay in L2, and for each block of tokens (whose `x` rows stay in L1) every 4-row tile of the chunk is
//!   applied: each weight is read from memory once per call, and while the first token block brings a tile
//!   from memory the kernel prefetches the next one.
//! * bf16 decode on AVX-512 reads 32 weights per load and widens them with one shift (even elements) and
//!   one mask (odd elements) instead of a zero-extension and a shift per 16, against a copy of `x` whose
//!   32-element groups are reordered evens first: fewer instructions per byte, which measured 5–10 % more
//!   bandwidth. (In the prefill tile the same trick needs more registers than there are and measured slower.)
//!
//! Paths: AVX-512F, AVX2 + FMA + F16C, and portable scalar code, chosen at run time: [`Isa::streaming`] for
//! decode, [`Isa::best`] for prefill.

use half::{bf16, f16};

use super::isa::Isa;
use super::share::share;
use super::simd::{Elem, Kind};

/// Weights of a linear layer, `(out, in)` row-major, in their stored type.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

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
    // Decode streams weights; prefill multiplies register tiles: each on the path that does its job best.
    let isa = if t == 1 { Isa::streaming() } else { Isa::best() };
    linear_with(isa, x, w, bias, y, t, input, output);
}

/// [`linear`] on a given path.
///
/// # Panics
///
/// If `isa` is not [available](Isa::available) or the slice lengths do not match the shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_with(
    isa: Isa,
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    t: usize,
    input: usize,
    output: usize,
) {
    assert!(isa.available(), "linear: {isa:?} is not supported by this CPU");
    match w {
        Weights::F32(w) => run(isa, x, w, bias, y, t, input, output),
        Weights::BF16(w) => run(isa, x, w, bias, y, t, input, output),
        Weights::F16(w) => run(isa, x, w, bias, y, t, input, output),
    }
}

/// A call runs on the calling thread alone unless it reads at least this many weight bytes or does at least
/// [`PARALLEL_MACS`] multiply-adds (a few µs of work): below that, waking a pool thread costs as much as it
/// saves. (Measured with [`share`]: 221 KiB of bf16 decode took 12 µs on two threads, 17 µs on one.)
const PARALLEL_BYTES: usize = 64 << 10;
/// See [`PARALLEL_BYTES`].
const PARALLEL_MACS: usize = 1 << 18;
/// Chunks of rows per thread: a little slack, so that a thread that starts late or is descheduled does not
/// hold up the rest.
const TASKS_PER_THREAD: usize = 4;
/// Weight bytes a task applies to a token block before moving on: a chunk that stays in L2.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHUNK_BYTES: usize = 128 << 10;
/// How far ahead of its reads decode prefetches weights. Measured on the development machine (one thread,
/// weights far larger than the caches): no prefetch reached 65 % (bf16) to 85 % (f32) of the streaming-read
/// bandwidth, 1 KiB 75–90 %, 4 KiB and up 90–100 % (flat to 16 KiB).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PREFETCH_BYTES: usize = 4096;

/// One call's operands, shared by its tasks.
struct Job<'a, E> {
    x: &'a [f32],
    w: &'a [E],
    bias: Option<&'a [f32]>,
    y: SendPtr,
    t: usize,
    input: usize,
    output: usize,
    /// For bf16 decode on AVX-512: `x` with every full 32-element group reordered evens first, then odds (the
    /// order in which `dot` widens weights); empty otherwise.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    x_split: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run<E: Elem>(
    isa: Isa,
    x: &[f32],
    w: &[E],
    bias: Option<&[f32]>,
    y: &mut [f32],
    t: usize,
    input: usize,
    output: usize,
) {
    // The kernels index raw pointers by these shapes: check them here, once.
    assert_eq!(x.len(), t.checked_mul(input).expect("linear: shape overflow"), "linear: x length");
    assert_eq!(w.len(), output.checked_mul(input).expect("linear: shape overflow"), "linear: w length");
    assert_eq!(y.len(), t.checked_mul(output).expect("linear: shape overflow"), "linear: y length");
    assert!(bias.is_none_or(|b| b.len() == output), "linear: bias length");
    if y.is_empty() {
        return;
    }
    let x_split =
        if t == 1 && isa == Isa::Avx512 && E::KIND == Kind::BF16 && input >= 64 { split_pairs(x) } else { Vec::new() };
    let job = Job { x, w, bias, y: SendPtr(y.as_mut_ptr()), t, input, output, x_split };
    let threads = rayon::current_num_threads();
    let small = output * input * size_of::<E>() < PARALLEL_BYTES && t * input * output < PARALLEL_MACS;
    if small || threads == 1 || output < 8 {
        job.rows(isa, 0, output);
        return;
    }
    let tasks = threads * TASKS_PER_THREAD;
    let per_task = output.div_ceil(tasks).next_multiple_of(4);
    let chunks = output.div_ceil(per_task);
    share(chunks, threads - 1, &|i| job.rows(isa, i * per_task, ((i + 1) * per_task).min(output)));
}

/// `x` with every full 32-element group reordered: its 16 even elements, then its 16 odd ones. A partial
/// group at the end stays as it is.
fn split_pairs(x: &[f32]) -> Vec<f32> {
    let mut split = Vec::with_capacity(x.len());
    let (groups, tail) = x.as_chunks::<32>();
    for g in groups {
        split.extend(g.iter().step_by(2));
        split.extend(g.iter().skip(1).step_by(2));
    }
    split.extend_from_slice(tail);
    split
}

impl<E: Elem> Job<'_, E> {
    /// Computes output rows `r0..r1` of every token.
    fn rows(&self, isa: Isa, r0: usize, r1: usize) {
        debug_assert!(r0 <= r1 && r1 <= self.output);
        match isa {
            Isa::Scalar => scalar::rows(self, r0, r1),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `linear_with` checked that the CPU supports AVX2, FMA and F16C; `run` checked the slice
            // lengths against the shape, and tasks get disjoint row ranges inside `0..output`.
            Isa::Avx2 => unsafe { avx2::rows(self, r0, r1) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, with AVX-512F.
            Isa::Avx512 => unsafe { avx512::rows(self, r0, r1) },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => unreachable!("checked by linear_with"),
        }
    }

    /// Rows per chunk of a task: a multiple of 4 whose weights fit in [`CHUNK_BYTES`].
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn chunk_rows(&self) -> usize {
        let row_bytes = (self.input * size_of::<E>()).max(1);
        (CHUNK_BYTES / row_bytes / 4 * 4).max(4)
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output rows to pool threads (see `run`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

mod scalar {
    use super::{Elem, Job};

    /// Lanes of the partial sums: independent chains the compiler can keep in vector registers.
    const LANES: usize = 8;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (a_body, a_tail) = a.as_chunks::<LANES>();
        let (b_body, b_tail) = b.as_chunks::<LANES>();
        for (a, b) in a_body.iter().zip(b_body) {
            for ((s, a), b) in acc.iter_mut().zip(a).zip(b) {
                *s += a * b;
            }
        }
        let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
        acc.iter().sum::<f32>() + tail
    }

    pub(super) fn rows<E: Elem>(job: &Job<'_, E>, r0: usize, r1: usize) {
        let (input, output) = (job.input, job.output);
        let mut row = vec![0f32; input];
        for r in r0..r1 {
            for (d, s) in row.iter_mut().zip(&job.w[r * input..(r + 1) * input]) {
                *d = s.to_f32();
            }
            let b = job.bias.map_or(0.0, |b| b[r]);
            for ti in 0..job.t {
                let v = dot(&job.x[ti * input..(ti + 1) * input], &row) + b;
                // SAFETY: each task writes only rows r0..r1 of every token: disjoint across tasks, in bounds
                // because `run` checked y.len() == t * output and r < output.
                unsafe { *job.y.0.add(ti * output + r) = v };
            }
        }
    }
}

/// Generates the blocking loops around one instruction set's `dot` (decode) and `kernel::<E, R, T>`
/// (prefill): row chunks that stay in L2, token blocks of `$tb`, and 4-row (then single-row) tiles.
#[cfg(target_arch = "x86_64")]
macro_rules! blocking {
    ($feature:literal, $tb:literal, [$($rem:literal),*]) => {
        /// Computes output rows `r0..r1` of every token.
        ///
        /// # Safety
        ///
        /// The CPU supports this module's target features; `job`'s slices have the lengths its shape says
        /// (`run` checks them); `r0 <= r1 <= output`; and no other thread writes these rows of `y`.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn rows<E: Elem>(job: &Job<'_, E>, r0: usize, r1: usize) {
            if job.t == 1 {
                // SAFETY: the caller's contract, for the only token.
                unsafe { tokens::<E, 1>(job, 0, r0, r1) };
                return;
            }
            let chunk = job.chunk_rows();
            let mut c0 = r0;
            while c0 < r1 {
                let c1 = (c0 + chunk).min(r1);
                // SAFETY: the caller's contract, for rows `c0..c1` ⊆ `r0..r1` and token blocks inside `0..t`.
                unsafe {
                    let mut ti = 0;
                    while ti + $tb <= job.t {
                        tokens::<E, $tb>(job, ti, c0, c1);
                        ti += $tb;
                    }
                    match job.t - ti {
                        0 => {}
                        $($rem => tokens::<E, $rem>(job, ti, c0, c1),)*
                        _ => unreachable!("a remainder is shorter than a token block"),
                    }
                }
                c0 = c1;
            }
        }

        /// Rows `c0..c1` of tokens `ti..ti + T`.
        ///
        /// # Safety
        ///
        /// As for [`rows`], with `ti + T <= t`.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn tokens<E: Elem, const T: usize>(job: &Job<'_, E>, ti: usize, c0: usize, c1: usize) {
            let (input, output) = (job.input, job.output);
            let x = job.x[ti * input..].as_ptr();
            let xs = if job.x_split.is_empty() { std::ptr::null() } else { job.x_split.as_ptr() };
            let bias = job.bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
            let w = job.w.as_ptr();
            // SAFETY: rows `c0..c1` ⊆ `0..output`, whose `w` rows and `bias` entries exist; `y` offsets stay
            // inside tokens `ti..ti + T` (`ti + T <= t`); `x_split` is present only when t = 1, with the
            // length of `x`; the caller's contract covers the rest.
            unsafe {
                let y = job.y.0.add(ti * output);
                let mut r = c0;
                if T == 1 {
                    while r < c1 {
                        let b = if bias.is_null() { 0.0 } else { *bias.add(r) };
                        *y.add(r) = dot(x, xs, w.add(r * input), input) + b;
                        r += 1;
                    }
                    return;
                }
                // The first token block brings each tile from memory: prefetch the next tile meanwhile.
                let ahead = if ti == 0 { 4 * input * size_of::<E>() } else { 0 };
                while r + 4 <= c1 {
                    kernel::<E, 4, T>(x, w.add(r * input), input, ahead, bias_at(bias, r), y.add(r), output);
                    r += 4;
                }
                while r < c1 {
                    kernel::<E, 1, T>(x, w.add(r * input), input, 0, bias_at(bias, r), y.add(r), output);
                    r += 1;
                }
            }
        }

        /// `bias + r`, or null when there is no bias.
        #[inline]
        fn bias_at(bias: *const f32, r: usize) -> *const f32 {
            if bias.is_null() { bias } else { bias.wrapping_add(r) }
        }

        /// Hints that the 64-byte lines of `bytes` bytes at `p` will be read soon. Never faults.
        #[target_feature(enable = $feature)]
        #[inline]
        fn prefetch(p: *const u8, bytes: usize) {
            let mut l = 0;
            while l < bytes {
                // A hint: it reads nothing architecturally and never faults, whatever the address (formed
                // with wrapping arithmetic, never dereferenced).
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l).cast());
                l += 64;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::simd::avx512::{load16, reduce4};
    use super::{Elem, Job, Kind, PREFETCH_BYTES};

    blocking!("avx512f", 6, [1, 2, 3, 4, 5]);

    /// The even elements of 32 bf16 at `p`, widened to f32: the low half of each 32-bit pair, shifted up.
    ///
    /// # Safety
    ///
    /// AVX-512F is available and 32 bf16 are readable at `p`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn bf16_even(p: *const u16) -> __m512 {
        // SAFETY: the caller's contract; an unaligned load.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(unsafe { _mm512_loadu_si512(p.cast()) }))
    }

    /// The odd elements of 32 bf16 at `p`, widened to f32: the high half of each 32-bit pair, masked.
    ///
    /// # Safety
    ///
    /// AVX-512F is available and 32 bf16 are readable at `p`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn bf16_odd(p: *const u16) -> __m512 {
        let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        // SAFETY: the caller's contract; an unaligned load.
        _mm512_castsi512_ps(_mm512_and_si512(unsafe { _mm512_loadu_si512(p.cast()) }, high))
    }

    /// `Σₖ x[k] · w[k]` for `k < input`, reading `w` front to back and prefetching ahead of it.
    ///
    /// # Safety
    ///
    /// AVX-512F is available; `x` and `w` have `input` readable elements; `xs` is null or, when `E` is
    /// bf16, `x` with its 32-element groups split (see `split_pairs`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot<E: Elem>(x: *const f32, xs: *const f32, w: *const E, input: usize) -> f32 {
        // SAFETY: full vectors while k + 64 (or 16) <= input, then a masked x load and a zero-padded copy of
        // the weights; prefetches never fault.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut k = 0;
            if E::KIND == Kind::BF16 && !xs.is_null() {
                while k + 64 <= input {
                    prefetch(w.add(k).cast::<u8>().wrapping_add(PREFETCH_BYTES), 128);
                    for h in 0..2 {
                        let (wk, xk) = (w.add(k + 32 * h).cast::<u16>(), xs.add(k + 32 * h));
                        acc[2 * h] = _mm512_fmadd_ps(bf16_even(wk), _mm512_loadu_ps(xk), acc[2 * h]);
                        acc[2 * h + 1] = _mm512_fmadd_ps(bf16_odd(wk), _mm512_loadu_ps(xk.add(16)), acc[2 * h + 1]);
                    }
                    k += 64;
                }
            } else {
                while k + 64 <= input {
                    prefetch(w.add(k).cast::<u8>().wrapping_add(PREFETCH_BYTES), 64 * size_of::<E>());
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(load16(w.add(k + 16 * u)), _mm512_loadu_ps(x.add(k + 16 * u)), *a);
                    }
                    k += 64;
                }
            }
            // What is left is shorter than 64: plain 16-wide steps on the unsplit `x`.
            while k + 16 <= input {
                acc[0] = _mm512_fmadd_ps(load16(w.add(k)), _mm512_loadu_ps(x.add(k)), acc[0]);
                k += 16;
            }
            let rem = input - k;
            if rem > 0 {
                let mut buf = [E::ZERO; 16];
                std::ptr::copy_nonoverlapping(w.add(k), buf.as_mut_ptr(), rem);
                let xv = _mm512_maskz_loadu_ps((1 << rem) - 1, x.add(k));
                acc[1] = _mm512_fmadd_ps(load16(buf.as_ptr()), xv, acc[1]);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
        }
    }

    /// `y[j · output + i] = Σₖ x[j · input + k] · w[i · input + k] (+ bias[i])` for `i < R`, `j < T`.
    ///
    /// # Safety
    ///
    /// AVX-512F is available; `x` has `T` rows and `w` has `R` rows of `input` readable elements; `bias` is
    /// null or has `R` readable elements; `y + j · output + i` is writable for every `i < R`, `j < T`. Weights
    /// `ahead` bytes past those read are prefetched (none when 0); they need not exist.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // Register tiles read clearest with explicit indices.
    unsafe fn kernel<E: Elem, const R: usize, const T: usize>(
        x: *const f32,
        w: *const E,
        input: usize,
        ahead: usize,
        bias: *const f32,
        y: *mut f32,
        output: usize,
    ) {
        // SAFETY: every access below stays inside the rows the caller vouches for: full vectors while
        // k + 16 <= input, then a masked load of x and a zero-padded copy of the weights for the tail.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut xv = [_mm512_setzero_ps(); T];
            let mut k = 0;
            while k + 16 <= input {
                if ahead != 0 {
                    for i in 0..R {
                        prefetch(w.add(i * input + k).cast::<u8>().wrapping_add(ahead), 16 * size_of::<E>());
                    }
                }
                for j in 0..T {
                    xv[j] = _mm512_loadu_ps(x.add(j * input + k));
                }
                for i in 0..R {
                    let wv = load16(w.add(i * input + k));
                    for j in 0..T {
                        acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
                    }
                }
                k += 16;
            }
            let rem = input - k;
            if rem > 0 {
                let mask: __mmask16 = (1 << rem) - 1;
                for j in 0..T {
                    xv[j] = _mm512_maskz_loadu_ps(mask, x.add(j * input + k));
                }
                for i in 0..R {
                    let mut buf = [E::ZERO; 16];
                    std::ptr::copy_nonoverlapping(w.add(i * input + k), buf.as_mut_ptr(), rem);
                    let wv = load16(buf.as_ptr());
                    for j in 0..T {
                        acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
                    }
                }
            }
            for j in 0..T {
                let yj = y.add(j * output);
                if R.is_multiple_of(4) {
                    for g in 0..R / 4 {
                        let i = 4 * g;
                        let mut s = reduce4(acc[i][j], acc[i + 1][j], acc[i + 2][j], acc[i + 3][j]);
                        if !bias.is_null() {
                            s = _mm_add_ps(s, _mm_loadu_ps(bias.add(i)));
                        }
                        _mm_storeu_ps(yj.add(i), s);
                    }
                } else {
                    for i in 0..R {
                        let b = if bias.is_null() { 0.0 } else { *bias.add(i) };
                        *yj.add(i) = _mm512_reduce_add_ps(acc[i][j]) + b;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Elem, Job, Kind, PREFETCH_BYTES};

    blocking!("avx2,fma,f16c", 2, [1]);

    /// 8 weights at `p`, widened to f32.
    ///
    /// # Safety
    ///
    /// AVX2 and F16C are available and 8 elements are readable at `p` (no alignment needed beyond `E`'s).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<E: Elem>(p: *const E) -> __m256 {
        // SAFETY: the caller's contract; unaligned loads.
        unsafe {
            match E::KIND {
                Kind::F32 => _mm256_loadu_ps(p.cast()),
                Kind::BF16 => {
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))))
                }
                Kind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            }
        }
    }

    /// `Σₖ x[k] · w[k]` for `k < input`, reading `w` front to back and prefetching ahead of it.
    ///
    /// # Safety
    ///
    /// AVX2, FMA and F16C are available; `x` and `w` have `input` readable elements. (`_xs` is unused: the
    /// split layout is an AVX-512 one.)
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<E: Elem>(x: *const f32, _xs: *const f32, w: *const E, input: usize) -> f32 {
        // SAFETY: full vectors while k + 32 (or 8) <= input, then zero-padded copies of x and of the weights;
        // prefetches never fault.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut k = 0;
            while k + 32 <= input {
                prefetch(w.add(k).cast::<u8>().wrapping_add(PREFETCH_BYTES), 32 * size_of::<E>());
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load8(w.add(k + 8 * u)), _mm256_loadu_ps(x.add(k + 8 * u)), *a);
                }
                k += 32;
            }
            while k + 8 <= input {
                acc[0] = _mm256_fmadd_ps(load8(w.add(k)), _mm256_loadu_ps(x.add(k)), acc[0]);
                k += 8;
            }
            let rem = input - k;
            if rem > 0 {
                let mut wb = [E::ZERO; 8];
                std::ptr::copy_nonoverlapping(w.add(k), wb.as_mut_ptr(), rem);
                let mut xb = [0f32; 8];
                std::ptr::copy_nonoverlapping(x.add(k), xb.as_mut_ptr(), rem);
                acc[1] = _mm256_fmadd_ps(load8(wb.as_ptr()), _mm256_loadu_ps(xb.as_ptr()), acc[1]);
            }
            reduce1(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        }
    }

    /// The lane sums of `a`, `b`, `c`, `d`, in that order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn reduce4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        let (ab, cd) = (_mm256_castps_pd(ab), _mm256_castps_pd(cd));
        let abcd =
            _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(ab, cd)), _mm256_castpd_ps(_mm256_unpackhi_pd(ab, cd)));
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd))
    }

    /// The sum of the lanes of `a`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn reduce1(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `y[j · output + i] = Σₖ x[j · input + k] · w[i · input + k] (+ bias[i])` for `i < R`, `j < T`.
    ///
    /// # Safety
    ///
    /// AVX2, FMA and F16C are available; `x` has `T` rows and `w` has `R` rows of `input` readable elements;
    /// `bias` is null or has `R` readable elements; `y + j · output + i` is writable for every `i < R`,
    /// `j < T`. Weights `ahead` bytes past those read are prefetched (none when 0); they need not exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // Register tiles read clearest with explicit indices.
    unsafe fn kernel<E: Elem, const R: usize, const T: usize>(
        x: *const f32,
        w: *const E,
        input: usize,
        ahead: usize,
        bias: *const f32,
        y: *mut f32,
        output: usize,
    ) {
        // SAFETY: every access below stays inside the rows the caller vouches for: full vectors while
        // k + 8 <= input, then zero-padded copies of x and of the weights for the tail.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut xv = [_mm256_setzero_ps(); T];
            let mut k = 0;
            while k + 8 <= input {
                if ahead != 0 {
                    for i in 0..R {
                        prefetch(w.add(i * input + k).cast::<u8>().wrapping_add(ahead), 8 * size_of::<E>());
                    }
                }
                for j in 0..T {
                    xv[j] = _mm256_loadu_ps(x.add(j * input + k));
                }
                for i in 0..R {
                    let wv = load8(w.add(i * input + k));
                    for j in 0..T {
                        acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
                    }
                }
                k += 8;
            }
            let rem = input - k;
            if rem > 0 {
                for j in 0..T {
                    let mut buf = [0f32; 8];
                    std::ptr::copy_nonoverlapping(x.add(j * input + k), buf.as_mut_ptr(), rem);
                    xv[j] = _mm256_loadu_ps(buf.as_ptr());
                }
                for i in 0..R {
                    let mut buf = [E::ZERO; 8];
                    std::ptr::copy_nonoverlapping(w.add(i * input + k), buf.as_mut_ptr(), rem);
                    let wv = load8(buf.as_ptr());
                    for j in 0..T {
                        acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
                    }
                }
            }
            for j in 0..T {
                let yj = y.add(j * output);
                if R.is_multiple_of(4) {
                    for g in 0..R / 4 {
                        let i = 4 * g;
                        let mut s = reduce4(acc[i][j], acc[i + 1][j], acc[i + 2][j], acc[i + 3][j]);
                        if !bias.is_null() {
                            s = _mm_add_ps(s, _mm_loadu_ps(bias.add(i)));
                        }
                        _mm_storeu_ps(yj.add(i), s);
                    }
                } else {
                    for i in 0..R {
                        let b = if bias.is_null() { 0.0 } else { *bias.add(i) };
                        *yj.add(i) = reduce1(acc[i][j]) + b;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::{Isa, Weights, linear, linear_with};

    /// Random weights in every dtype, as f64 values each dtype holds exactly.
    struct Case {
        f32: Vec<f32>,
        bf16: Vec<bf16>,
        f16: Vec<f16>,
    }

    impl Case {
        fn new(rng: &mut StdRng, len: usize) -> Self {
            let f32: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bf16 = f32.iter().map(|&v| bf16::from_f32(v)).collect();
            let f16 = f32.iter().map(|&v| f16::from_f32(v)).collect();
            Case { f32, bf16, f16 }
        }

        fn weights(&self) -> [(Weights<'_>, Vec<f64>); 3] {
            [
                (Weights::F32(&self.f32), self.f32.iter().map(|&v| f64::from(v)).collect()),
                (Weights::BF16(&self.bf16), self.bf16.iter().map(|v| f64::from(v.to_f32())).collect()),
                (Weights::F16(&self.f16), self.f16.iter().map(|v| f64::from(v.to_f32())).collect()),
            ]
        }
    }

    /// Checks `y` against an f64 reference, each output within 1e-5 of Σ|x·w| (plus the bias' rounding).
    #[allow(clippy::too_many_arguments)]
    fn check(what: &str, x: &[f32], w: &[f64], bias: Option<&[f32]>, y: &[f32], t: usize, input: usize, output: usize) {
        for ti in 0..t {
            for r in 0..output {
                let (mut dot, mut mag) = (0f64, 0f64);
                for k in 0..input {
                    let p = f64::from(x[ti * input + k]) * w[r * input + k];
                    dot += p;
                    mag += p.abs();
                }
                let b = bias.map_or(0.0, |b| f64::from(b[r]));
                let want = dot + b;
                let got = f64::from(y[ti * output + r]);
                let tol = 1e-5 * (mag + b.abs()) + 1e-30;
                assert!(
                    (got - want).abs() <= tol,
                    "{what}: t={t} in={input} out={output} y[{ti}][{r}] = {got}, want {want} (tolerance {tol})"
                );
            }
        }
    }

    fn dtype(w: Weights<'_>) -> &'static str {
        match w {
            Weights::F32(_) => "f32",
            Weights::BF16(_) => "bf16",
            Weights::F16(_) => "f16",
        }
    }

    fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.available()).collect()
    }

    /// One shape through every available path and dtype, with and without bias.
    fn shape(rng: &mut StdRng, t: usize, input: usize, output: usize) {
        let x: Vec<f32> = (0..t * input).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bias: Vec<f32> = (0..output).map(|_| rng.random_range(-1.0..1.0)).collect();
        let case = Case::new(rng, output * input);
        for isa in available() {
            for (w, w64) in case.weights() {
                for bias in [None, Some(&bias[..])] {
                    let mut y = vec![f32::NAN; t * output];
                    linear_with(isa, &x, w, bias, &mut y, t, input, output);
                    check(&format!("{isa:?} {}", dtype(w)), &x, &w64, bias, &y, t, input, output);
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        for t in [1, 2, 3, 7, 64] {
            for input in [1, 15, 17, 33, 100, 576] {
                for output in [1, 3, 65, 193] {
                    if t == 64 && input * output > 100 * 193 {
                        continue; // covered by the other t; keeps the unoptimized test build quick
                    }
                    shape(&mut rng, t, input, output);
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_model_shapes() {
        let mut rng = StdRng::seed_from_u64(11);
        // Big enough to go parallel (several tasks, chunks and token blocks, with remainders).
        for (t, input, output) in [(1, 576, 576), (1, 1536, 576), (13, 576, 200), (64, 576, 192), (5, 64, 3000)] {
            shape(&mut rng, t, input, output);
        }
    }

    #[test]
    fn every_path_is_tested() {
        // The paths this CPU has: each one ran in the tests above. On x86-64 with AVX-512 that is all three.
        let paths = available();
        assert!(paths.contains(&Isa::Scalar));
        assert_eq!(Isa::best(), *paths.last().unwrap());
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && std::env::var_os("DRIFTWOOD_CPU_ISA").is_none() {
            assert_eq!(Isa::best(), Isa::Avx512);
        }
    }

    #[test]
    fn misaligned_weights() {
        let mut rng = StdRng::seed_from_u64(3);
        let (t, input, output) = (3, 37, 21);
        let x: Vec<f32> = (0..t * input).map(|_| rng.random_range(-1.0..1.0)).collect();
        let case = Case::new(&mut rng, output * input + 1);
        // Start at element 1: an odd 2-byte (bf16/f16) or 4-byte (f32) offset, as inside an mmapped file.
        let f32 = &case.f32[1..];
        let bf16 = &case.bf16[1..];
        let f16 = &case.f16[1..];
        assert_eq!(bf16.as_ptr() as usize % 4, (case.bf16.as_ptr() as usize + 2) % 4);
        let refs: [(Weights<'_>, Vec<f64>); 3] = [
            (Weights::F32(f32), f32.iter().map(|&v| f64::from(v)).collect()),
            (Weights::BF16(bf16), bf16.iter().map(|v| f64::from(v.to_f32())).collect()),
            (Weights::F16(f16), f16.iter().map(|v| f64::from(v.to_f32())).collect()),
        ];
        for isa in available() {
            for (w, w64) in &refs {
                let mut y = vec![f32::NAN; t * output];
                linear_with(isa, &x, *w, None, &mut y, t, input, output);
                check(&format!("{isa:?} misaligned {}", dtype(*w)), &x, w64, None, &y, t, input, output);
            }
        }
    }

    #[test]
    fn degenerate_shapes() {
        let bias = [0.5f32, -2.0];
        let mut y = [f32::NAN; 6];
        // input = 0: y is the bias.
        linear(&[], Weights::F32(&[]), Some(&bias), &mut y[..4], 2, 0, 2);
        assert_eq!(&y[..4], &[0.5, -2.0, 0.5, -2.0]);
        linear(&[], Weights::BF16(&[]), None, &mut y[..4], 2, 0, 2);
        assert_eq!(&y[..4], &[0.0; 4]);
        // t = 0 or output = 0: nothing to write.
        linear(&[], Weights::F16(&[f16::ONE; 6]), None, &mut [], 0, 3, 2);
        linear(&[1.0; 3], Weights::F16(&[]), None, &mut [], 1, 3, 0);
    }
}
