//! Host ABI v1: the core-wasm imports of module `driftwood` (version and module name from `driftwood-abi`,
//! the crate guests build against). v1 added the KV cache's dtype to `forward`, `session_save`,
//! `session_load` and `model_info`.
//!
//! | import | signature | what it does |
//! |---|---|---|
//! | `abi_version` | `() -> i32` | the host's ABI version ([`ABI_VERSION`]) |
//! | `log` | `(level: i32, ptr: i32, len: i32)` | writes `len` bytes of UTF-8 at `ptr` to the host log |
//! | `matmul` | `(a, b, c, m, n, k, dtype: i32)` | `c (m,n) = a (m,k) · b (k,n)` on the guest's own bytes |
//! | `noop` | `()` | nothing; measures the cost of a host call |
//!
//! Every guest must export `memory` (its linear memory) and `driftwood_abi_version: () -> i32`; the host
//! refuses a module whose version differs from [`ABI_VERSION`]. All `i32` arguments are read as `u32`.
//! Every `(offset, length)` a call receives is validated **before any work** (bounds, 32-bit wrap, size
//! overflow, alignment, dtype, aliasing of outputs with inputs); a violation traps the guest with a message
//! naming the call and the range, and leaves the host and other actors running.

mod inference;
mod session;
mod validate;

use driftwood_backend::{Backend, DType, MatmulDims, TensorMut, TensorRef};
use driftwood_memory::CopyKind;
use wasmtime::{Caller, Linker};

use crate::actor::ActorState;
pub use inference::{KV_ALIGN, MODEL_INFO_WORDS, model_info_words};
pub use validate::AbiError;
use validate::{check_range, disjoint};

/// The version of this ABI. Bumped on any incompatible change to an import or a required export.
pub const ABI_VERSION: u32 = driftwood_abi::ABI_VERSION;

/// The import module name guests link against.
pub const MODULE: &str = driftwood_abi::MODULE;

/// Longest log line accepted, in bytes.
pub const MAX_LOG_BYTES: u32 = 64 * 1024;

/// Multiply-adds in one piece of a `matmul`: a product larger than this runs as blocks of rows of `a` and `c`
/// (each block contiguous, so still computed in place), and the call's deadline and runtime shutdown are
/// checked between blocks. A piece costs at most this many multiply-adds (about 40 ms on two CPU cores) plus
/// one pass of the kernel over all of `b` (packing it; about 100 ms for a 6144×6144 f32 `b` on two loaded
/// cores), so products with a very large `b` have longer pieces; that pass is also the price of splitting,
/// paid once per piece, which is why pieces are not smaller.
pub const MATMUL_PIECE_MACS: u64 = 1 << 32;

fn guest_memory<'a>(
    caller: &'a mut Caller<'_, ActorState>,
    call: &'static str,
) -> Result<(&'a mut [u8], &'a mut ActorState), AbiError> {
    let memory = caller.data().memory.ok_or(AbiError::new(call, "the actor has no linear memory".into()))?;
    Ok(memory.data_and_store_mut(caller))
}

pub(crate) fn link(linker: &mut Linker<ActorState>) -> anyhow::Result<()> {
    inference::link(linker)?;
    session::link(linker)?;
    linker.func_wrap(MODULE, "abi_version", || ABI_VERSION)?;
    linker.func_wrap(MODULE, "noop", || {})?;
    linker.func_wrap(MODULE, "log", |mut caller: Caller<'_, ActorState>, level: u32, ptr: u32, len: u32| {
        log(&mut caller, level, ptr, len)
    })?;
    linker.func_wrap(
        MODULE,
        "matmul",
        |mut caller: Caller<'_, ActorState>, a: u32, b: u32, c: u32, m: u32, n: u32, k: u32, dtype: u32| {
            matmul(&mut caller, [a, b, c], MatmulDims { m: m as usize, n: n as usize, k: k as usize }, dtype)
        },
    )?;
    Ok(())
}

fn log(caller: &mut Caller<'_, ActorState>, level: u32, ptr: u32, len: u32) -> wasmtime::Result<()> {
    const CALL: &str = "driftwood.log";
    if len > MAX_LOG_BYTES {
        return Err(
            AbiError::new(CALL, format!("message of {len} bytes exceeds the {MAX_LOG_BYTES}-byte limit")).into()
        );
    }
    let (data, state) = guest_memory(caller, CALL)?;
    let range = check_range(CALL, "message", ptr, len as u64, 1, data.len())?;
    // Logging is the one host call that copies guest bytes (into the log line); the ledger says so.
    let text = String::from_utf8_lossy(&data[range]).into_owned();
    state.record_copy(CopyKind::Text, len as usize);
    state.push_log(CALL, level, text)
}

fn matmul(
    caller: &mut Caller<'_, ActorState>,
    [a_off, b_off, c_off]: [u32; 3],
    dims: MatmulDims,
    dtype: u32,
) -> wasmtime::Result<()> {
    const CALL: &str = "driftwood.matmul";
    let dtype = DType::from_code(dtype)
        .ok_or_else(|| AbiError::new(CALL, format!("unknown dtype code {dtype} (0 = f32, 1 = bf16)")))?;
    // Element counts in u64: products of two u32 cannot overflow it.
    let (m, n, k) = (dims.m as u64, dims.n as u64, dims.k as u64);
    let (data, state) = guest_memory(caller, CALL)?;
    let a = check_range(CALL, "a", a_off, m * k, dtype.size(), data.len())?;
    let b = check_range(CALL, "b", b_off, k * n, dtype.size(), data.len())?;
    let c = check_range(CALL, "c", c_off, m * n, DType::F32.size(), data.len())?;
    disjoint(CALL, ("c", &c), ("a", &a))?;
    disjoint(CALL, ("c", &c), ("b", &b))?;
    let base = data.as_mut_ptr();
    // Blocks of `rows` rows of `a` and `c` (each contiguous), all of `b`; at least one row per block.
    let rows = (MATMUL_PIECE_MACS / (n * k).max(1)).clamp(1, m.max(1));
    let mut r0 = 0;
    loop {
        let block = rows.min(m - r0);
        // SAFETY (TensorRef/TensorMut conditions):
        // 1. `base` is the region's page-aligned base and each offset was checked to be dtype-aligned (a block
        //    starts a whole number of rows, hence elements, into its operand);
        // 2. each block lies inside its checked range (`r0 + block <= m`), inside `data`, the actor's committed
        //    memory, exclusively borrowed for this call;
        // 3. `c` overlaps neither `a` nor `b` (checked above); `a` and `b` are only read. The guest is
        //    suspended in this host call, and the backend returns only after it has finished with these bytes.
        let (a_view, b_view, c_view) = unsafe {
            (
                TensorRef::from_raw_parts(
                    base.add(a.start + (r0 * k) as usize * dtype.size()),
                    (block * k) as usize,
                    dtype,
                ),
                TensorRef::from_raw_parts(base.add(b.start), (k * n) as usize, dtype),
                TensorMut::from_raw_parts(base.add(c.start + (r0 * n) as usize * 4), (block * n) as usize, DType::F32),
            )
        };
        let piece = MatmulDims { m: block as usize, ..dims };
        state.device().matmul(a_view, b_view, c_view, piece).map_err(|e| AbiError::new(CALL, e.to_string()))?;
        r0 += block;
        if r0 >= m {
            return Ok(());
        }
        state.check_interrupt(CALL)?;
    }
}
