//! Example actor (the seed experiment): fill two 128×128 matrices in this actor's own linear memory, ask the
//! host to multiply them *in place*, and check all 16,384 results against the actor's own scalar product.
//!
//! It also exports the pieces `driftwood verify` and `driftwood bench` drive: a large matrix to share with
//! the backend, and loops of host calls to time.

use std::cell::RefCell;

use driftwood_guest::{Bf16, Level};

/// Side of the seed experiment's square matrices.
const N: usize = 128;

/// Deterministic uniform numbers in [-1, 1): a 64-bit LCG, so host and guest runs are reproducible.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[derive(Default)]
struct State {
    /// Offsets of A, B, C of the last check, so the host can prove it computed on these very bytes.
    check_offsets: [u32; 3],
    last_errors: u32,
    last_max_error: f64,
    /// The shared matrix: A (rows, cols), x (cols, 1), y (rows, 1).
    share: Option<(Vec<f32>, Vec<f32>, Vec<f32>, u32, u32)>,
    /// Benchmark operands: A, B (n, n) in f32 or bf16 bits, C (n, n) f32.
    bench: Option<(Vec<u32>, Vec<u32>, Vec<f32>, u32, u32)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn offset<T>(slice: &[T]) -> u32 {
    slice.as_ptr() as usize as u32
}

/// Runs the seed experiment with `dtype` 0 (f32) or 1 (bf16). Returns the number of elements whose host
/// result differs from this actor's own scalar product by more than the rounding bound, or `u32::MAX` when
/// the dtype is unknown.
#[unsafe(no_mangle)]
pub extern "C" fn run_check(seed: u32, dtype: u32) -> u32 {
    let mut rng = Lcg(seed as u64 ^ 0x9E37_79B9_7F4A_7C15);
    let a: Vec<f32> = (0..N * N).map(|_| rng.next()).collect(); // (N, N)
    let b: Vec<f32> = (0..N * N).map(|_| rng.next()).collect(); // (N, N)
    let mut c = vec![f32::NAN; N * N]; // (N, N): poisoned, so an unwritten element is an error
    let (a, b) = match dtype {
        0 => {
            driftwood_guest::matmul_f32(&a, &b, &mut c, N as u32, N as u32, N as u32).ok();
            STATE.with(|s| s.borrow_mut().check_offsets = [offset(&a), offset(&b), offset(&c)]);
            (a, b)
        }
        1 => {
            let a16: Vec<Bf16> = a.iter().map(|&x| Bf16::from_f32(x)).collect();
            let b16: Vec<Bf16> = b.iter().map(|&x| Bf16::from_f32(x)).collect();
            driftwood_guest::matmul_bf16(&a16, &b16, &mut c, N as u32, N as u32, N as u32).ok();
            STATE.with(|s| s.borrow_mut().check_offsets = [offset(&a16), offset(&b16), offset(&c)]);
            (a16.iter().map(|x| x.to_f32()).collect(), b16.iter().map(|x| x.to_f32()).collect())
        }
        _ => return u32::MAX,
    };
    // The actor's own scalar product, accumulated in f64.
    let mut errors = 0u32;
    let mut max_error = 0f64;
    for i in 0..N {
        for j in 0..N {
            let (mut exact, mut magnitude) = (0f64, 0f64);
            for p in 0..N {
                let t = a[i * N + p] as f64 * b[p * N + j] as f64;
                exact += t;
                magnitude += t.abs();
            }
            let got = c[i * N + j] as f64;
            let err = (got - exact).abs();
            // f32 accumulation of N products: error below N · 2^-24 · Σ|a·b|.
            if !(err <= N as f64 * f32::EPSILON as f64 * magnitude) {
                errors += 1;
            }
            if err > max_error || err.is_nan() {
                max_error = err;
            }
        }
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.last_errors = errors;
        s.last_max_error = max_error;
    });
    errors
}

/// Elements compared by [`run_check`].
#[unsafe(no_mangle)]
pub extern "C" fn check_elements() -> u32 {
    (N * N) as u32
}

/// Offset in this actor's memory of operand `i` (0 = A, 1 = B, 2 = C) of the last check.
#[unsafe(no_mangle)]
pub extern "C" fn check_offset(i: u32) -> u32 {
    STATE.with(|s| s.borrow().check_offsets.get(i as usize).copied().unwrap_or(0))
}

/// Logs the last check's outcome.
#[unsafe(no_mangle)]
pub extern "C" fn report() {
    let (errors, max_error) = STATE.with(|s| {
        let s = s.borrow();
        (s.last_errors, s.last_max_error)
    });
    let line = format!("matmul check: {errors} errors of {} elements, max |error| {max_error:.3e}", N * N);
    driftwood_guest::log(if errors == 0 { Level::Info } else { Level::Error }, &line);
}

/// Allocates and fills A (rows, cols), x (cols, 1) and y (rows, 1) in this actor's memory. Returns 0.
#[unsafe(no_mangle)]
pub extern "C" fn prepare_share(rows: u32, cols: u32, seed: u32) -> u32 {
    let mut rng = Lcg(seed as u64);
    let a: Vec<f32> = (0..rows as usize * cols as usize).map(|_| rng.next()).collect();
    let x: Vec<f32> = (0..cols as usize).map(|_| rng.next()).collect();
    let y = vec![0f32; rows as usize];
    STATE.with(|s| s.borrow_mut().share = Some((a, x, y, rows, cols)));
    0
}

/// Offset of the shared A (0), x (1) or y (2), or 0 before [`prepare_share`].
#[unsafe(no_mangle)]
pub extern "C" fn share_offset(i: u32) -> u32 {
    STATE.with(|s| match (&s.borrow().share, i) {
        (Some((a, _, _, _, _)), 0) => offset(a),
        (Some((_, x, _, _, _)), 1) => offset(x),
        (Some((_, _, y, _, _)), 2) => offset(y),
        _ => 0,
    })
}

/// y = A · x, computed by the host on this actor's bytes. Returns 1 if nothing was prepared.
#[unsafe(no_mangle)]
pub extern "C" fn share_compute() -> u32 {
    STATE.with(|s| match &mut s.borrow_mut().share {
        Some((a, x, y, rows, cols)) => {
            driftwood_guest::matmul_f32(a, x, y, *rows, 1, *cols).ok();
            0
        }
        None => 1,
    })
}

/// Allocates and fills benchmark operands of side `n` in `dtype` (0 f32, 1 bf16).
#[unsafe(no_mangle)]
pub extern "C" fn bench_setup(n: u32, dtype: u32) {
    let mut rng = Lcg(n as u64);
    let len = n as usize * n as usize;
    let mut fill = || -> Vec<u32> {
        if dtype == 1 {
            // Two bf16 values per u32 word; a Vec<u32> keeps 4-byte alignment.
            (0..len.div_ceil(2))
                .map(|_| Bf16::from_f32(rng.next()).0 as u32 | (Bf16::from_f32(rng.next()).0 as u32) << 16)
                .collect()
        } else {
            (0..len).map(|_| rng.next().to_bits()).collect()
        }
    };
    let (a, b) = (fill(), fill());
    STATE.with(|s| s.borrow_mut().bench = Some((a, b, vec![0f32; len], n, dtype)));
}

/// Offset of benchmark operand A (0), B (1) or C (2), or 0 before [`bench_setup`].
#[unsafe(no_mangle)]
pub extern "C" fn bench_offset(i: u32) -> u32 {
    STATE.with(|s| match (&s.borrow().bench, i) {
        (Some((a, _, _, _, _)), 0) => offset(a),
        (Some((_, b, _, _, _)), 1) => offset(b),
        (Some((_, _, c, _, _)), 2) => offset(c),
        _ => 0,
    })
}

/// Runs the benchmark matmul `iters` times. Returns 1 if nothing was set up.
#[unsafe(no_mangle)]
pub extern "C" fn bench_matmul(iters: u32) -> u32 {
    STATE.with(|s| match &mut s.borrow_mut().bench {
        Some((a, b, c, n, dtype)) => {
            for _ in 0..iters {
                // SAFETY: a and b hold n·n elements of dtype, c holds n·n f32, all in this memory.
                unsafe {
                    driftwood_guest::raw::matmul(
                        a.as_ptr().cast(),
                        b.as_ptr().cast(),
                        c.as_mut_ptr().cast(),
                        *n,
                        *n,
                        *n,
                        *dtype,
                    )
                };
            }
            0
        }
        None => 1,
    })
}

/// Crosses into the host `iters` times doing nothing.
#[unsafe(no_mangle)]
pub extern "C" fn bench_noop(iters: u32) {
    for _ in 0..iters {
        driftwood_guest::noop();
    }
}
