//! `driftwood bench matmul`: CPU matmul throughput of our backend next to the `gemm` and `matrixmultiply`
//! crates, measured interleaved in the same run on the same inputs.

use std::hint::black_box;
use std::time::Instant;

use driftwood_backend::{Backend, Device, MatmulDims, TensorMut, TensorRef};
use half::bf16;
use serde::Serialize;

use super::{Output, emit, median};

/// One contender: computes C into the buffer it is given.
type Kernel<'a> = dyn FnMut(&mut [f32]) -> Result<(), driftwood_backend::BackendError> + 'a;

/// Arguments of `driftwood bench matmul`.
#[derive(clap::Args, Debug)]
pub struct MatmulArgs {
    /// Matrix sides to time.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024")]
    sizes: Vec<usize>,
    /// Interleaved repetitions per size (median reported).
    #[arg(long, default_value_t = 11)]
    reps: u32,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct Row {
    n: usize,
    driftwood_f32_gflops: f64,
    driftwood_bf16_gflops: f64,
    gemm_crate_f32_gflops: f64,
    matrixmultiply_f32_gflops: f64,
}

#[derive(Serialize, Debug)]
struct MatmulResults {
    threads: usize,
    rows: Vec<Row>,
}

pub fn run(args: &MatmulArgs) -> anyhow::Result<()> {
    let device = Device::cpu();
    let threads = rayon::current_num_threads();
    let mut rows = vec![];
    for &n in &args.sizes {
        let dims = MatmulDims { m: n, n, k: n };
        let iters = ((2e10 / dims.flops()) as usize).clamp(1, 1000);
        let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..n * n).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let (a16, b16): (Vec<bf16>, Vec<bf16>) =
            (a.iter().map(|&x| bf16::from_f32(x)).collect(), b.iter().map(|&x| bf16::from_f32(x)).collect());
        let mut c = vec![0f32; n * n];

        let mut ours_f32 = |c: &mut [f32]| {
            device.matmul(TensorRef::from_f32(&a), TensorRef::from_f32(&b), TensorMut::from_f32(c), dims).map(drop)
        };
        let mut ours_bf16 = |c: &mut [f32]| {
            device
                .matmul(TensorRef::from_bf16(&a16), TensorRef::from_bf16(&b16), TensorMut::from_f32(c), dims)
                .map(drop)
        };
        let mut gemm_crate = |c: &mut [f32]| {
            // SAFETY: row-major n×n matrices that fit the three buffers; c is exclusive.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    n as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
            Ok(())
        };
        let mut mm_crate = |c: &mut [f32]| {
            // SAFETY: as above; matrixmultiply takes (rows, cols) strides.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    n,
                    1.0,
                    a.as_ptr(),
                    n as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            Ok(())
        };
        let mut samples = [vec![], vec![], vec![], vec![]];
        for rep in 0..=args.reps {
            let kernels: [&mut Kernel; 4] = [&mut ours_f32, &mut ours_bf16, &mut gemm_crate, &mut mm_crate];
            for (slot, kernel) in samples.iter_mut().zip(kernels) {
                let t = Instant::now();
                for _ in 0..iters {
                    kernel(&mut c)?;
                }
                black_box(&c);
                // Repetition 0 is warm-up.
                if rep > 0 {
                    slot.push(dims.flops() * iters as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
        let [f32s, bf16s, gemms, mms] = &mut samples;
        let row = Row {
            n,
            driftwood_f32_gflops: median(f32s),
            driftwood_bf16_gflops: median(bf16s),
            gemm_crate_f32_gflops: median(gemms),
            matrixmultiply_f32_gflops: median(mms),
        };
        eprintln!(
            "{n}³: driftwood f32 {:.1}, bf16 {:.1}, gemm {:.1}, matrixmultiply {:.1} GFLOP/s",
            row.driftwood_f32_gflops,
            row.driftwood_bf16_gflops,
            row.gemm_crate_f32_gflops,
            row.matrixmultiply_f32_gflops
        );
        rows.push(row);
    }
    emit("matmul", "matmul-cpu", &args.output, MatmulResults { threads, rows })
}
