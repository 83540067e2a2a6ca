//! Throughput of the CPU `linear` kernel at SmolLM2-135M shapes, against this machine's streaming-read
//! bandwidth (the roofline of decode, which reads every weight once per token).
//!
//! `cargo bench -p driftwood-backend --bench linear` (`RAYON_NUM_THREADS` sets the threads). Weights are
//! "cold": each call reads another copy from a pool larger than the last-level cache, as decode does when
//! the model does not fit in cache; "hot" rows repeat one copy.

// The kernel module itself, so that the benchmark can pick its instruction set. (Cargo builds benchmarks
// with `cfg(test)` but without the test harness: the module's tests compile, unused.)
#[allow(dead_code, unused_imports)]
#[path = "../src/cpu/linear.rs"]
mod linear;

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use linear::{Isa, Weights, linear_with};
use rayon::prelude::*;

/// Bytes of the weight pool and of the bandwidth buffer: well past any last-level cache.
const POOL_BYTES: usize = 1 << 30;
/// `(input, output)` of SmolLM2-135M's projections, with how many of each a decode step runs.
const SHAPES: [(&str, usize, usize, usize); 5] = [
    ("q/o 576→576", 576, 576, 2 * 30),
    ("k/v 576→192", 576, 192, 2 * 30),
    ("gate/up 576→1536", 576, 1536, 2 * 30),
    ("down 1536→576", 1536, 576, 30),
    ("lm head 576→49152", 576, 49152, 1),
];
const TOKENS: [usize; 3] = [1, 16, 128];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

/// A page-aligned pool of bytes that read as moderate, finite values in every dtype.
struct Pool(Vec<u64>);

impl Pool {
    fn new() -> Self {
        let mut words = vec![0u64; POOL_BYTES / 8];
        words.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
            let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for word in chunk {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Each 16-bit half in 0x3c00..0x3e00: bf16 ≈ 0.008..0.03, f16 1.0..1.5, f32 ≈ 0.008..0.03.
                *word = (s & 0x01ff_01ff_01ff_01ff) | 0x3c00_3c00_3c00_3c00;
            }
        });
        Pool(words)
    }

    fn bytes(&self) -> usize {
        self.0.len() * 8
    }

    fn f32(&self) -> &[f32] {
        // SAFETY: the u64 buffer is aligned for f32, every bit pattern is an f32, and the length covers it.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.bytes() / 4) }
    }

    /// `len` weights of copy `i` (of as many as fit), in `dtype`.
    fn weights(&self, dtype: DType, len: usize, i: usize) -> Weights<'_> {
        let copies = self.bytes() / (len * dtype.size());
        let start = (i % copies) * len;
        let (ptr, n) = (self.0.as_ptr(), self.bytes() / 2);
        // SAFETY: as for `f32`: bf16 and f16 need 2-byte alignment and accept every bit pattern.
        let (b, h): (&[bf16], &[f16]) =
            unsafe { (std::slice::from_raw_parts(ptr.cast(), n), std::slice::from_raw_parts(ptr.cast(), n)) };
        match dtype {
            DType::F32 => Weights::F32(&self.f32()[start..start + len]),
            DType::BF16 => Weights::BF16(&b[start..start + len]),
            DType::F16 => Weights::F16(&h[start..start + len]),
        }
    }
}

/// Sum of `data`, read with the widest loads the CPU has.
fn sum(data: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available.
        return unsafe { sum_avx512(data) };
    }
    data.iter().sum()
}

static SPF: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (body, tail) = data.as_chunks::<128>();
    let mut acc = [_mm512_setzero_ps(); 8];
    let pf = SPF.load(std::sync::atomic::Ordering::Relaxed);
    for block in body {
        if pf > 0 {
            let p = block.as_ptr().cast::<i8>().wrapping_add(pf);
            for l in 0..8 {
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l)) };
            }
        }
        for (a, v) in acc.iter_mut().zip(block.as_chunks::<16>().0) {
            // SAFETY: `v` is 16 readable floats.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(v.as_ptr()) });
        }
    }
    let total = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    _mm512_reduce_add_ps(total) + tail.iter().sum::<f32>()
}

/// Best of several full reads of `data`, split into one contiguous run per thread, in GB/s.
fn stream_read(data: &[f32], threads: usize) -> f64 {
    let per = data.len().div_ceil(threads);
    let best = (0..9)
        .map(|_| {
            let start = Instant::now();
            let s: f32 = if threads == 1 { sum(data) } else { data.par_chunks(per).map(sum).sum() };
            black_box(s);
            start.elapsed()
        })
        .min()
        .unwrap();
    (data.len() * 4) as f64 / best.as_secs_f64() / 1e9
}

/// Seconds per call of `f(i)`: the fastest of 15 batches of about 10 ms (the least disturbed by other work
/// on the machine).
fn time(mut f: impl FnMut(usize)) -> f64 {
    let mut i = 0;
    for _ in 0..2 {
        f(i);
        i += 1;
    }
    let start = Instant::now();
    f(i);
    i += 1;
    let once = start.elapsed().max(Duration::from_micros(1));
    let per_batch = (Duration::from_millis(10).as_secs_f64() / once.as_secs_f64()).ceil() as usize;
    (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                f(i);
                i += 1;
            }
            start.elapsed().as_secs_f64() / per_batch as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Seconds per call of `linear` at one shape. Cold: the best of 5 full passes over as many copies of the
/// weights as fit in the pool, each call reading the next (the same traffic as [`stream_read`]). Hot: [`time`]
/// with one copy.
#[allow(clippy::too_many_arguments)]
fn measure(pool: &Pool, isa: Isa, dtype: DType, t: usize, input: usize, output: usize, cold: bool) -> f64 {
    let x: Vec<f32> = (0..t * input).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut y = vec![0f32; t * output];
    let mut call = |i: usize| {
        let w = pool.weights(dtype, input * output, i);
        linear_with(isa, black_box(&x), w, None, &mut y, t, input, output);
        black_box(&mut y);
    };
    if !cold {
        return time(|_| call(0));
    }
    let copies = pool.bytes() / (input * output * dtype.size());
    // A pass costs a fixed number of bytes; at t > 1 fewer calls suffice (they are compute-bound).
    let calls = if t == 1 { copies } else { copies.min(64) };
    call(0);
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..calls {
                call(i);
            }
            start.elapsed().as_secs_f64() / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let pool = Pool::new();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let pfs: Vec<usize> = args.iter().map(|a| a.parse().unwrap()).collect();
    let mut best = std::collections::BTreeMap::new();
    for round in 0..4 {
        let bw = stream_read(pool.f32(), rayon::current_num_threads());
        let e = best.entry(("stream".to_string(), 0usize)).or_insert(0f64);
        *e = e.max(bw);
        for &pf in &pfs {
            linear::PF.store(pf % 100000, std::sync::atomic::Ordering::Relaxed);
            linear::SPLIT.store(pf / 100000, std::sync::atomic::Ordering::Relaxed);
            for &(name, input, output, _) in &[SHAPES[0], SHAPES[2], SHAPES[4]] {
                for dtype in [DType::BF16] {
                    let bytes = (input * output * dtype.size()) as f64;
                    let g = bytes / measure(&pool, Isa::Avx512, dtype, 1, input, output, true) / 1e9;
                    let e = best.entry((format!("{name} {}", dtype.name()), pf)).or_insert(0f64);
                    *e = e.max(g);
                }
            }
        }
        eprintln!("round {round}");
    }
    for ((k, pf), v) in best {
        println!("{k:30} pf={pf:5} {v:.2}");
    }
}
