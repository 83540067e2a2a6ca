//! The machine's streaming-read bandwidth: the roofline of memory-bound work such as batch-1 decode.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

fn sum(data: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { sum_avx512(data) };
    }
    // Sixteen independent partial sums so the compiler can vectorize the reduction.
    let mut acc = [0f32; 16];
    let (body, tail) = data.as_chunks::<16>();
    for block in body {
        for (a, &x) in acc.iter_mut().zip(block) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// # Safety
///
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (body, tail) = data.as_chunks::<128>();
    let mut acc = [_mm512_setzero_ps(); 8];
    for block in body {
        for (a, v) in acc.iter_mut().zip(block.as_chunks::<16>().0) {
            // SAFETY: `v` is 16 readable floats.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(v.as_ptr()) });
        }
    }
    let total = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    _mm512_reduce_add_ps(total) + tail.iter().sum::<f32>()
}

/// Streaming-read bandwidth over all pool threads in GB/s, measured on a fresh `bytes`-sized buffer (use one
/// far larger than the caches).
pub fn stream_read_gb_s(bytes: usize) -> f64 {
    let data: Vec<f32> = (0..bytes / 4).into_par_iter().map(|i| (i % 251) as f32).collect();
    stream_read_gb_s_of(&data, rayon::current_num_threads())
}

/// Bandwidth of reading `data` in GB/s: the best of 9 full reads, split into one contiguous run per thread
/// (`threads` of them; 1 reads on the calling thread).
pub fn stream_read_gb_s_of(data: &[f32], threads: usize) -> f64 {
    let per = data.len().div_ceil(threads.max(1)).max(1);
    let best = (0..9)
        .map(|_| {
            let start = Instant::now();
            let s: f32 = if threads <= 1 { sum(data) } else { data.par_chunks(per).map(sum).sum() };
            black_box(s);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (data.len() * 4) as f64 / best / 1e9
}
