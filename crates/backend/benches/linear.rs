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
// The modules it uses (their tests compile here unused).
#[allow(dead_code, unused_imports)]
#[path = "../src/cpu/isa.rs"]
mod isa;
#[allow(dead_code, unused_imports)]
#[path = "../src/cpu/share.rs"]
mod share;
#[allow(dead_code, unused_imports)]
#[path = "../src/cpu/simd.rs"]
mod simd;

use std::hint::black_box;
use std::time::{Duration, Instant};

use driftwood_backend::cpu::stream_read_gb_s_of as stream_read;
use half::{bf16, f16};
use isa::Isa;
use linear::{Weights, linear_with};
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

/// Seconds per call of `linear` at one shape. Cold: the best of 5 passes, each call of a pass reading the
/// next copy of the weights from a pool larger than the caches (at t = 1 a pass reads the whole pool: the
/// traffic of [`stream_read`]; at t > 1, compute-bound, a pass lasts about 0.1 s). Hot: [`time`] on one copy.
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
    let start = Instant::now();
    call(0);
    let once = start.elapsed().as_secs_f64();
    let calls = if t == 1 { copies } else { ((0.1 / once) as usize).clamp(2, copies) };
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

/// Fastest seconds seen per measurement, over the rounds.
#[derive(Default)]
struct Best(std::collections::HashMap<String, f64>);

impl Best {
    fn keep(&mut self, key: String, seconds: f64) -> f64 {
        let best = self.0.entry(key).or_insert(f64::INFINITY);
        *best = best.min(seconds);
        *best
    }
}

/// The 1-minute load average, where the system reports one: other work on the machine skews the numbers.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "unknown".into(), |l| l.split(' ').next().unwrap_or("").into())
}

fn main() {
    let threads = rayon::current_num_threads();
    let isa = Isa::best();
    // Arguments (after `--`) pick shapes by part of their name; cargo adds `--bench`.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let picked = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let rounds: usize = std::env::var("LINEAR_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    println!("linear benchmark: {threads} rayon threads, best path {isa:?}, best of {rounds} rounds, load {}", load());
    let pool = Pool::new();
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let shapes: Vec<_> = SHAPES.iter().copied().filter(|s| picked(s.0)).collect();
    let paths: Vec<_> = Isa::ALL.into_iter().filter(|p| p.available()).collect();

    // Every round measures everything; each figure keeps its best round (the least disturbed by other work).
    let mut best = Best::default();
    for round in 0..rounds {
        let bytes = pool.bytes() as f64;
        best.keep("stream 1".into(), bytes / stream_read(pool.f32(), 1) / 1e9);
        best.keep("stream".into(), bytes / stream_read(pool.f32(), threads) / 1e9);
        for &(name, input, output, _) in &shapes {
            for dtype in dtypes {
                for t in TOKENS {
                    best.keep(format!("{name} {dtype:?} {t}"), measure(&pool, isa, dtype, t, input, output, true));
                }
                best.keep(format!("{name} {dtype:?} hot"), measure(&pool, isa, dtype, 1, input, output, false));
            }
        }
        for &(name, input, output, _) in [SHAPES[2], SHAPES[4]].iter().filter(|s| picked(s.0)) {
            for dtype in dtypes {
                for &path in &paths {
                    for t in [1, 128] {
                        let s = measure(&pool, path, dtype, t, input, output, true);
                        best.keep(format!("{name} {dtype:?} {path:?} {t}"), s);
                    }
                }
            }
        }
        eprintln!("round {} of {rounds} done, load {}", round + 1, load());
    }
    let get = |key: String| best.0[&key];

    let gb = pool.bytes() as f64 / 1e9;
    let (bw1, bw) = (gb / get("stream 1".into()), gb / get("stream".into()));
    println!("\nstreaming read of {} MiB: {bw1:.1} GB/s on 1 thread, {bw:.1} GB/s on {threads}", POOL_BYTES >> 20);

    // Whole-model decode roofline: every projection weight and the tied head are read once per token.
    let params: usize = SHAPES.iter().map(|&(_, i, o, n)| i * o * n).sum();
    println!("\nSmolLM2-135M decode roofline: {:.1} M projection + head parameters per token", params as f64 / 1e6);
    for dtype in [DType::BF16, DType::F32] {
        let bytes = (params * dtype.size()) as f64;
        println!(
            "  {:>4}: {:.0} MB/token → ≤ {:.1} tokens/s at {bw:.1} GB/s",
            dtype.name(),
            bytes / 1e6,
            bw * 1e9 / bytes
        );
    }

    println!(
        "\n| shape | dtype | t | µs/call (cold) | weight GB/s | % of stream | GFLOP/s | hot GB/s | tokens/s | ×t=1 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut decode = [0f64; 3];
    for &(name, input, output, per_token) in &shapes {
        for (d, dtype) in dtypes.into_iter().enumerate() {
            let bytes = (input * output * dtype.size()) as f64;
            let t1 = get(format!("{name} {dtype:?} 1"));
            decode[d] += t1 * per_token as f64;
            for t in TOKENS {
                let s = get(format!("{name} {dtype:?} {t}"));
                let gbs = bytes / s / 1e9;
                let gflops = 2.0 * (t * input * output) as f64 / s / 1e9;
                let (pct, hot) = if t == 1 {
                    let hot = bytes / get(format!("{name} {dtype:?} hot")) / 1e9;
                    (format!("{:.0} %", 100.0 * gbs / bw), format!("{hot:.1}"))
                } else {
                    (String::new(), String::new())
                };
                println!(
                    "| {name} | {} | {t} | {:.1} | {gbs:.1} | {pct} | {gflops:.1} | {hot} | {:.0} | {:.1} |",
                    dtype.name(),
                    s * 1e6,
                    t as f64 / s,
                    t as f64 * t1 / s,
                );
            }
        }
    }
    if shapes.len() == SHAPES.len() {
        println!("\nProjections + head of one decode step (cold weights, sum of the t = 1 rows above):");
        for (d, dtype) in dtypes.into_iter().enumerate() {
            let bytes = (params * dtype.size()) as f64;
            println!(
                "  {:>4}: {:.2} ms/token = {:.1} tokens/s, {:.1} GB/s ({:.0} % of the roofline)",
                dtype.name(),
                decode[d] * 1e3,
                1.0 / decode[d],
                bytes / decode[d] / 1e9,
                100.0 * bytes / decode[d] / 1e9 / bw,
            );
        }
    }

    println!("\nPaths (cold weights), GB/s at t = 1 and GFLOP/s at t = 128:");
    println!("| shape | dtype | path | t=1 GB/s | t=128 GFLOP/s |");
    println!("|---|---|---|---:|---:|");
    for &(name, input, output, _) in [SHAPES[2], SHAPES[4]].iter().filter(|s| picked(s.0)) {
        for dtype in dtypes {
            for &path in &paths {
                let gbs = (input * output * dtype.size()) as f64 / get(format!("{name} {dtype:?} {path:?} 1")) / 1e9;
                let gflops = 2.0 * (128 * input * output) as f64 / get(format!("{name} {dtype:?} {path:?} 128")) / 1e9;
                println!("| {name} | {} | {path:?} | {gbs:.1} | {gflops:.1} |", dtype.name());
            }
        }
    }
    println!("\nload at the end: {}", load());
}
