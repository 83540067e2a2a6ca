//! `driftwood verify`: runs the three-link chain (region → guest → backend) and measures that nothing is
//! copied along it.

use std::time::Instant;

use anyhow::{Context, bail};
use driftwood_backend::{Backend, BackendKind, DType, MatmulDims, TensorMut, TensorRef};
use driftwood_host::{Actor, LogMode, Runtime, RuntimeConfig};
use driftwood_memory::{Placement, SharedRegion, page_size, rss};
use serde::Serialize;

use crate::bench::median;

/// Arguments of `driftwood verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Backend that computes: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// How the backend sees actor memory: host, pinned or managed (the last two need the CUDA backend).
    #[arg(long, default_value = "host", value_parser = Placement::parse)]
    placement: Placement,
    /// Trials for each RSS and timing measurement (the median is reported; at least 5).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(5..=1000))]
    trials: u32,
}

/// Side of the shared matrix: 2048 × 2048 f32 = 16 MiB.
const SHARE_SIDE: u32 = 2048;
const MIB: f64 = (1 << 20) as f64;

/// Everything `verify` measured. The field names are the JSON keys.
#[derive(Serialize, Debug)]
struct VerifyReport {
    backend: &'static str,
    placement: &'static str,
    page_size: usize,
    region_base: String,
    region_capacity_bytes: usize,
    region_guard_bytes: usize,
    page_aligned: bool,
    guest_memory_base: String,
    backend_operand_base: String,
    pointer_identity: bool,
    shared_bytes: usize,
    rss_trials: u32,
    rss_delta_zero_copy_mib: f64,
    rss_delta_copy_mib: f64,
    matmul_errors: u32,
    matmul_elements: u32,
    matmul_errors_bf16: u32,
    matmul128_ms_zero_copy: f64,
    matmul128_ms_copy: f64,
    share_ms_zero_copy: f64,
    share_ms_copy: f64,
    ledger_bytes_copied_zero_copy_path: u64,
    ledger_bytes_copied_copy_path: u64,
    pass: bool,
}

fn hex(addr: usize) -> String {
    format!("0x{addr:x}")
}

fn rss_now() -> anyhow::Result<i64> {
    rss::resident_bytes().map(|b| b as i64).context("this platform does not report resident memory")
}

/// A fresh host buffer the way a copying runtime stages a guest tensor: newly mapped for the request, so
/// the copy's pages are really resident while it is in use (a reused heap block would hide them).
struct Staging {
    region: SharedRegion,
}

impl Staging {
    /// On a GPU placement the staging buffer is itself device-addressable (as a copying runtime's pinned or
    /// managed staging buffers would be).
    fn new(bytes: usize, runtime: &Runtime) -> anyhow::Result<Self> {
        let device = match (runtime.placement(), runtime.device()) {
            (Placement::Host, _) => None,
            (p, driftwood_backend::Device::Cuda(cuda)) => Some(cuda.device_memory(p)?),
            (p, _) => bail!("placement {p} needs the CUDA backend"),
        };
        let region = SharedRegion::reserve_on(bytes.max(1), 0, device)?;
        region.commit_to(bytes)?;
        Ok(Staging { region })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes are committed, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.region.base(), self.region.len()) }
    }

    fn f32s(&self) -> &[f32] {
        // SAFETY: page-aligned, committed, any bit pattern is an f32; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.region.base().cast(), self.region.len() / 4) }
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, exclusive borrow of self.
        unsafe { std::slice::from_raw_parts_mut(self.region.base().cast(), self.region.len() / 4) }
    }
}

/// The copy path: copy A (m,k) and B (k,n) out of guest memory into fresh host buffers, compute there,
/// copy C (m,n) back. Returns the RSS growth while the copies are live, in bytes.
fn copy_path(
    actor: &mut Actor,
    runtime: &Runtime,
    [a_off, b_off, c_off]: [usize; 3],
    dims: MatmulDims,
) -> anyhow::Result<i64> {
    let rss_before = rss_now()?;
    let mut a = Staging::new(dims.m * dims.k * 4, runtime)?;
    let mut b = Staging::new(dims.k * dims.n * 4, runtime)?;
    let mut c = Staging::new(dims.m * dims.n * 4, runtime)?;
    actor.read_memory(a_off, a.bytes_mut())?;
    actor.read_memory(b_off, b.bytes_mut())?;
    runtime.device().matmul(
        TensorRef::from_f32(a.f32s()),
        TensorRef::from_f32(b.f32s()),
        TensorMut::from_f32(c.f32s_mut()),
        dims,
    )?;
    let rss_after = rss_now()?;
    actor.write_memory(c_off, c.bytes_mut())?;
    Ok(rss_after - rss_before)
}

fn offsets(actor: &mut Actor, export: &str) -> anyhow::Result<[usize; 3]> {
    let mut out = [0usize; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = actor.call::<u32, u32>(export, i as u32)? as usize;
    }
    Ok(out)
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<bool> {
    let runtime = Runtime::new(RuntimeConfig {
        placement: args.placement,
        backend: args.backend,
        log: LogMode::Capture,
        ..RuntimeConfig::default()
    })?;
    let mut actor = runtime.instantiate(driftwood_actors::MATMUL_CHECK)?;
    let region = actor.region().clone();
    let base = region.base() as usize;
    let ledger_start = actor.ledger();

    // Link 1 → 2: the guest's memory is the region. Link 2 → 3: the backend computes on the guest's bytes.
    let matmul_errors: u32 = actor.call("run_check", (2024u32, DType::F32 as u32))?;
    let matmul_elements: u32 = actor.call("check_elements", ())?;
    let seen = runtime.device().last_operands();
    let check = offsets(&mut actor, "check_offset")?;
    let mut identity = actor.memory_base() as usize == base
        && [seen.a, seen.b, seen.c].iter().zip(check).all(|(&addr, off)| addr == base + off);
    let matmul_errors_bf16: u32 = actor.call("run_check", (2025u32, DType::BF16 as u32))?;

    // The 16 MiB share: the guest fills A (2048, 2048) and x (2048, 1); y = A·x on its bytes, or on copies.
    let (rows, cols) = (SHARE_SIDE as usize, SHARE_SIDE as usize);
    if actor.call::<(u32, u32, u32), u32>("prepare_share", (SHARE_SIDE, SHARE_SIDE, 7))? != 0 {
        bail!("the verify actor could not prepare the shared matrix");
    }
    let share = offsets(&mut actor, "share_offset")?;
    let share_dims = MatmulDims { m: rows, n: 1, k: cols };
    // Warm-up of both paths: thread pool, kernel buffers, page tables.
    actor.call::<(), u32>("share_compute", ())?;
    identity &= runtime.device().last_operands().a == base + share[0];
    let ledger_before_copy = actor.ledger();
    copy_path(&mut actor, &runtime, share, share_dims)?;
    let (mut zero_rss, mut copy_rss, mut zero_ms, mut copy_ms) = (vec![], vec![], vec![], vec![]);
    let mut zero_copy_ledger = ledger_before_copy.since(&ledger_start).total_bytes();
    for _ in 0..args.trials {
        let ledger_before = actor.ledger();
        let rss_before = rss_now()?;
        let t = Instant::now();
        actor.call::<(), u32>("share_compute", ())?;
        zero_ms.push(t.elapsed().as_secs_f64() * 1e3);
        zero_rss.push((rss_now()? - rss_before) as f64 / MIB);
        zero_copy_ledger += actor.ledger().since(&ledger_before).total_bytes();
        let t = Instant::now();
        copy_rss.push(copy_path(&mut actor, &runtime, share, share_dims)? as f64 / MIB);
        copy_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let copy_ledger = actor.ledger().since(&ledger_before_copy).total_bytes() / (args.trials as u64 + 1);

    // Compute time of the seed matmul (128³), zero-copy vs copy path.
    actor.call::<(u32, u32), ()>("bench_setup", (128, DType::F32 as u32))?;
    let bench = offsets(&mut actor, "bench_offset")?;
    let dims128 = MatmulDims { m: 128, n: 128, k: 128 };
    let (mut zero128, mut copy128) = (vec![], vec![]);
    for _ in 0..args.trials.max(25) {
        let ledger_before = actor.ledger();
        let t = Instant::now();
        actor.call::<u32, u32>("bench_matmul", 1)?;
        zero128.push(t.elapsed().as_secs_f64() * 1e3);
        zero_copy_ledger += actor.ledger().since(&ledger_before).total_bytes();
        let t = Instant::now();
        copy_path(&mut actor, &runtime, bench, dims128)?;
        copy128.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let page = page_size();
    let page_aligned = base.is_multiple_of(page) && (actor.memory_base() as usize).is_multiple_of(page);
    let mut report = VerifyReport {
        backend: runtime.device().name(),
        placement: region.placement().name(),
        page_size: page,
        region_base: hex(base),
        region_capacity_bytes: region.capacity(),
        region_guard_bytes: region.guard(),
        page_aligned,
        guest_memory_base: hex(actor.memory_base() as usize),
        backend_operand_base: hex(seen.c - check[2]),
        pointer_identity: identity,
        shared_bytes: rows * cols * 4,
        rss_trials: args.trials,
        rss_delta_zero_copy_mib: median(&mut zero_rss),
        rss_delta_copy_mib: median(&mut copy_rss),
        matmul_errors,
        matmul_elements,
        matmul_errors_bf16,
        matmul128_ms_zero_copy: median(&mut zero128),
        matmul128_ms_copy: median(&mut copy128),
        share_ms_zero_copy: median(&mut zero_ms),
        share_ms_copy: median(&mut copy_ms),
        ledger_bytes_copied_zero_copy_path: zero_copy_ledger,
        ledger_bytes_copied_copy_path: copy_ledger,
        pass: false,
    };
    report.pass = report.page_aligned
        && report.pointer_identity
        && report.rss_delta_zero_copy_mib <= 0.1
        && report.rss_delta_copy_mib >= 15.0
        && report.matmul_errors == 0
        && report.matmul_errors_bf16 == 0
        && report.matmul_elements == 128 * 128
        && report.ledger_bytes_copied_zero_copy_path == 0;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(report.pass)
}

fn print_table(r: &VerifyReport) {
    let ok = |b: bool| if b { "ok" } else { "FAIL" };
    println!("driftwood verify — backend {}, placement {}\n", r.backend, r.placement);
    println!("{:<44} {:>34}  {:<12}", "check", "measured", "expected");
    let rows: Vec<(String, String, &str, bool)> = vec![
        (
            "region base page-aligned".into(),
            format!("{} ({} B pages)", r.region_base, r.page_size),
            "aligned",
            r.page_aligned,
        ),
        (
            "pointer identity (guest = backend = region)".into(),
            format!("{} = {}", r.guest_memory_base, r.backend_operand_base),
            "equal",
            r.pointer_identity,
        ),
        (
            format!("RSS delta, share {} MiB zero-copy", r.shared_bytes >> 20),
            format!("{:.3} MiB", r.rss_delta_zero_copy_mib),
            "<= 0.1 MiB",
            r.rss_delta_zero_copy_mib <= 0.1,
        ),
        (
            format!("RSS delta, share {} MiB by copying", r.shared_bytes >> 20),
            format!("{:.3} MiB", r.rss_delta_copy_mib),
            ">= 15 MiB",
            r.rss_delta_copy_mib >= 15.0,
        ),
        (
            "matmul 128x128 f32 errors".into(),
            format!("{} of {}", r.matmul_errors, r.matmul_elements),
            "0",
            r.matmul_errors == 0,
        ),
        (
            "matmul 128x128 bf16 errors".into(),
            format!("{} of {}", r.matmul_errors_bf16, r.matmul_elements),
            "0",
            r.matmul_errors_bf16 == 0,
        ),
        (
            "copy-ledger bytes, zero-copy path".into(),
            r.ledger_bytes_copied_zero_copy_path.to_string(),
            "0",
            r.ledger_bytes_copied_zero_copy_path == 0,
        ),
    ];
    for (name, value, expected, good) in rows {
        println!("{name:<44} {value:>34}  {expected:<12} {}", ok(good));
    }
    println!();
    println!("{:<44} {:>12} {:>12}", "timing (median)", "zero-copy", "copy path");
    println!("{:<44} {:>9.3} ms {:>9.3} ms", "matmul 128x128x128 f32", r.matmul128_ms_zero_copy, r.matmul128_ms_copy);
    println!(
        "{:<44} {:>9.3} ms {:>9.3} ms",
        format!("y = A·x, A {} MiB f32", r.shared_bytes >> 20),
        r.share_ms_zero_copy,
        r.share_ms_copy
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "copy-ledger bytes per run", r.ledger_bytes_copied_zero_copy_path, r.ledger_bytes_copied_copy_path
    );
    println!("\nverify: {}", if r.pass { "PASS" } else { "FAIL" });
}
