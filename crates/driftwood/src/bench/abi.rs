//! `driftwood bench abi`: what crossing the wasm→host boundary costs.
//!
//! Three numbers per matmul size, each the median of interleaved repetitions:
//! * `wasm_ms`: the actor calls `driftwood.matmul` on operands in its own memory;
//! * `native_ms`: Rust calls the same backend kernel directly on host buffers;
//! * `call_cost_us`: the actor calls `driftwood.matmul` with an empty shape (range validation, view
//!   construction and dispatch, no arithmetic) — the boundary's cost, isolated from kernel noise.
//!
//! `overhead_share` = `call_cost` / `native`: the fraction of a call spent on the boundary. The difference of
//! the two medians is reported too, but at 512³ it is far below run-to-run noise.

use std::hint::black_box;
use std::time::Instant;

use driftwood_backend::{Backend, BackendKind, DType, Device, MatmulDims, TensorMut, TensorRef};
use driftwood_host::{Actor, LogMode, Runtime, RuntimeConfig};
use serde::Serialize;

use super::{Output, emit, median};

/// Arguments of `driftwood bench abi`.
#[derive(clap::Args, Debug)]
pub struct AbiArgs {
    /// Matrix sides to time.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024")]
    sizes: Vec<u32>,
    /// Interleaved repetitions per size (median reported).
    #[arg(long, default_value_t = 15)]
    reps: u32,
    #[command(flatten)]
    output: Output,
}

#[derive(Serialize, Debug)]
struct NoopResult {
    calls: u32,
    wasm_ns_per_call: f64,
    empty_matmul_ns_per_call: f64,
}

#[derive(Serialize, Debug)]
struct MatmulRow {
    n: u32,
    iters_per_rep: u32,
    wasm_ms: f64,
    native_ms: f64,
    call_cost_us: f64,
    overhead_share_pct: f64,
    median_difference_pct: f64,
}

#[derive(Serialize, Debug)]
struct AbiResults {
    backend: &'static str,
    noop: NoopResult,
    matmul_f32: Vec<MatmulRow>,
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

/// Nanoseconds per host call when `run(actor)` makes `calls` of them, median of `reps`.
fn per_call_ns(
    actor: &mut Actor,
    calls: u32,
    reps: u32,
    mut run: impl FnMut(&mut Actor) -> Result<(), driftwood_host::ActorError>,
) -> anyhow::Result<f64> {
    let mut samples = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        run(actor)?;
        samples.push(t.elapsed().as_secs_f64() * 1e9 / calls as f64);
    }
    Ok(median(&mut samples))
}

pub fn run(args: &AbiArgs) -> anyhow::Result<()> {
    let runtime =
        Runtime::new(RuntimeConfig { backend: BackendKind::Cpu, log: LogMode::Capture, ..Default::default() })?;
    let mut actor = runtime.instantiate(driftwood_actors::MATMUL_CHECK)?;
    let native = Device::cpu();

    let calls = 200_000;
    let noop_ns = per_call_ns(&mut actor, calls, args.reps, |a| a.call::<u32, ()>("bench_noop", calls))?;
    actor.call::<(u32, u32), ()>("bench_setup", (0, DType::F32 as u32))?;
    let empty_ns = per_call_ns(&mut actor, calls, args.reps, |a| a.call::<u32, u32>("bench_matmul", calls).map(drop))?;
    eprintln!("no-op host call: {noop_ns:.1} ns; empty matmul call: {empty_ns:.1} ns");

    let mut rows = vec![];
    for &n in &args.sizes {
        let dims = MatmulDims { m: n as usize, n: n as usize, k: n as usize };
        // Enough iterations per repetition for ~20 ms of work at a few hundred GFLOP/s.
        let iters = ((2e10 / dims.flops()) as u32).clamp(1, 2000);
        actor.call::<(u32, u32), ()>("bench_setup", (n, DType::F32 as u32))?;
        let len = dims.m * dims.k;
        let a: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..len).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut c = vec![0f32; len];
        let mut native_call = || {
            for _ in 0..iters {
                native
                    .matmul(TensorRef::from_f32(&a), TensorRef::from_f32(&b), TensorMut::from_f32(&mut c), dims)
                    .expect("shapes match by construction");
            }
            black_box(&c);
        };
        native_call();
        actor.call::<u32, u32>("bench_matmul", iters)?;
        let (mut wasm, mut nat) = (vec![], vec![]);
        for _ in 0..args.reps {
            let mut result = Ok(0);
            wasm.push(time_ms(|| result = actor.call::<u32, u32>("bench_matmul", iters)) / iters as f64);
            result?;
            nat.push(time_ms(&mut native_call) / iters as f64);
        }
        let (wasm_ms, native_ms) = (median(&mut wasm), median(&mut nat));
        let row = MatmulRow {
            n,
            iters_per_rep: iters,
            wasm_ms,
            native_ms,
            call_cost_us: empty_ns / 1e3,
            overhead_share_pct: 100.0 * (empty_ns / 1e6) / native_ms,
            median_difference_pct: 100.0 * (wasm_ms - native_ms) / native_ms,
        };
        eprintln!(
            "matmul {n}³: wasm {wasm_ms:.4} ms, native {native_ms:.4} ms, boundary {:.4}% of the call",
            row.overhead_share_pct
        );
        rows.push(row);
    }
    let results = AbiResults {
        backend: runtime.device().name(),
        noop: NoopResult { calls, wasm_ns_per_call: noop_ns, empty_matmul_ns_per_call: empty_ns },
        matmul_f32: rows,
    };
    emit("abi", "abi-cpu", &args.output, results)
}
