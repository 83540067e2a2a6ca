//! The NVIDIA GPU backend. The driver, NVRTC and cuBLAS are loaded at run time, so the same binary builds and
//! runs on machines without CUDA: [`CudaBackend::new`] then returns [`BackendError::Unavailable`] (never a
//! panic) and `--backend auto` picks the CPU.
//!
//! Layers: [`driver`] is the only unsafe FFI; [`memory`] holds the placements' [`DeviceMemory`] providers;
//! this file offers the safe backend ([`Backend::matmul`] on guest memory through cuBLAS) and [`Exec`], the
//! kernel launches the engine's GPU forward pass is written in. Kernels are CUDA C in `kernels/`, one file per
//! family, compiled together by NVRTC for the device when the backend opens.

pub(crate) mod driver;
mod memory;

use std::sync::{Arc, Mutex, MutexGuard};

use driftwood_memory::{DeviceMemory, Placement};

use crate::device::{Backend, MatmulDims, OperandTrace};
use crate::{BackendError, DType, TensorMut, TensorRef};
use driver::{Arg, Blas, BlasType, Context, DeviceBuffer, Function, Lt, LtShape, MappedHost, Module, Stream};
use memory::{Addressable, ManagedMemory, PinnedMemory};

pub use driver::Graph;

/// The kernel sources, in dependency order (`kernels/common.cuh` says what each holds).
const KERNELS: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/elementwise.cu"),
    include_str!("kernels/gemv.cu"),
    include_str!("kernels/attn_decode.cu"),
    include_str!("kernels/attn_prefill.cu"),
);

/// Most sequences one batched step can carry.
pub const MAX_BATCH: usize = 256;

/// Most tokens one prefill pass ([`Exec::set_tokens`]) carries; longer prompts are evaluated in chunks.
pub const MAX_PREFILL: usize = 4096;

/// Decode attention for fewer sequences than this runs `attn_lanes` (one online softmax per lane, two key sets in
/// flight: the latency of few, short reads); for this many or more, `attn_split` (a pipeline of tiles per split: the
/// bandwidth of many). H200, Llama-3.2-1B-shaped: at batch 1, `attn_lanes` decoded at 1.20 (managed) and 1.29 ms
/// per token (pinned) against 1.20 and 1.38 for `attn_split` with the same splits; 64 sequences × 1024 tokens
/// stepped in 2.76 ms with `attn_split` and 2.98 with `attn_lanes`.
pub const ATTN_FEW_SEQS: usize = 8;

/// The kernels `{prefix}_g{group}_d{head_dim / 32}` for groups 1, 2, 4, 8 and head widths 32, 64, 128.
fn attn_table(
    prefix: &str,
    f: &dyn Fn(&str) -> Result<Function, BackendError>,
) -> Result<[[Function; 3]; 4], BackendError> {
    let mut table = [[f(&format!("{prefix}_g1_d1"))?; 3]; 4];
    for (gi, group) in [1, 2, 4, 8].iter().enumerate() {
        for (di, dims) in [1, 2, 4].iter().enumerate() {
            table[gi][di] = f(&format!("{prefix}_g{group}_d{dims}"))?;
        }
    }
    Ok(table)
}

/// The most keys per split of decode attention ([`Exec::attention`]), and the split of many sequences: enough
/// keys per block (four 64-key tiles) that `attn_split`'s tile pipeline fills, few enough that a 1024-token
/// context still spreads 64 sequences over four splits. 512 is the comparison to make next on a GPU.
pub const ATTN_MAX_CHUNK: usize = 256;

/// Head dimensions the attention kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// The parameters of the prefill attention kernel (`struct AttnPrefill` in `kernels/attn_prefill.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttnPrefillParams {
    /// (t, heads, head_dim) bf16: rotated queries times the softmax scale · log2 e.
    pub q: u64,
    /// The sequence's KV cache, (layer, {k, v}, max_seq, kv_dim) bf16.
    pub cache: u64,
    /// (t, kv_dim) bf16: this chunk's rotated keys.
    pub knew: u64,
    /// (t, kv_dim) bf16: this chunk's values.
    pub vnew: u64,
    /// (t, heads · head_dim) bf16 output.
    pub out: u64,
    /// Query rows in the chunk.
    pub t: i32,
    /// Position of row 0 (tokens already in the cache).
    pub pos0: i32,
    /// Rows per (layer, k|v) of the cache.
    pub max_seq: i32,
    /// The layer.
    pub layer: i32,
    /// Query heads.
    pub heads: i32,
    /// Key/value heads.
    pub kv_heads: i32,
    /// Sliding window, 0 for none.
    pub window: i32,
    /// Padding to a multiple of 8 bytes.
    pub pad: i32,
}

const _: () = assert!(size_of::<AttnPrefillParams>() == 72);
const _: () = assert!(size_of::<SeqStep>() == 32);

impl AttnPrefillParams {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(size_of::<Self>());
        for p in [self.q, self.cache, self.knew, self.vnew, self.out] {
            b.extend_from_slice(&p.to_ne_bytes());
        }
        for v in [self.t, self.pos0, self.max_seq, self.layer, self.heads, self.kv_heads, self.window, self.pad] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// One sequence of a decode step, as the kernels read it (`struct Seq` in `kernels/common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqStep {
    /// Device address of the sequence's KV cache, (layer, {k, v}, max_seq, kv_dim) bf16, 16-byte aligned.
    pub kv: u64,
    /// Device address of its logits (vocab) f32.
    pub logits: u64,
    /// Position of this step's token.
    pub pos: i32,
    /// Rows of its cache per (layer, k|v).
    pub max_seq: i32,
    /// The token.
    pub token: u32,
    /// Padding to 32 bytes.
    pub pad: i32,
}

struct Kernels {
    embed: Function,
    embed_tokens: Function,
    rope_prefill: Function,
    swiglu_pairs_bf16: Function,
    /// Prefill attention by head dimension ([`HEAD_DIMS`]).
    attn_prefill: [Function; 3],
    rmsnorm_bf16: Function,
    /// Block-split GEMV by rows per block ([`GEMV_ROWS`]).
    gemv: [Function; 4],
    /// Block-split gate/up GEMV with SwiGLU by rows per block (1, 2, 4).
    gemv_swiglu: [Function; 3],
    /// Decode attention by (log2 group, log2 head_dim/32).
    /// Decode attention for fewer than [`ATTN_FEW_SEQS`] sequences, by (group, head_dim) index.
    attn_lanes: [[Function; 3]; 4],
    /// Decode attention for more.
    attn_split: [[Function; 3]; 4],
    swiglu_bf16: Function,
    add_bias: Function,
    scatter_logits: Function,
    kv_stage: Function,
}

/// Device memory owned by the backend: uploaded weights, scratch.
#[derive(Debug)]
pub struct DeviceTensor(DeviceBuffer);

impl DeviceTensor {
    /// Its device address.
    pub fn addr(&self) -> u64 {
        self.0.ptr
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
}

/// The CUDA backend: one device context, one stream, the compiled kernels and a cuBLAS handle.
pub struct CudaBackend {
    ctx: Arc<Context>,
    /// Tokens per prefill pass, at most [`MAX_PREFILL`] ([`CudaBackend::set_prefill_chunk`]).
    prefill_chunk: std::sync::atomic::AtomicUsize,
    /// Stage a pinned cache's rows on the side stream (`DRIFTWOOD_CUDA_KV_STAGE=1`).
    stage_pinned_kv: bool,
    exec: Mutex<Exec>,
    /// Device-to-host copies beside `exec` ([`CudaBackend::read_blocks`]), made on first use.
    readback: Mutex<Option<Readback>>,
    addressable: Arc<Addressable>,
    last: Mutex<OperandTrace>,
}

/// Bytes [`CudaBackend::read_blocks`] stages at a time.
const READBACK_STAGE: usize = 8 << 20;

/// Copies from the device to the host on a stream of their own into page-locked staging, so that a copy
/// neither waits for the step in flight (it takes no [`Exec`]) nor makes a step wait for it: the copy engines
/// run it while the compute stream computes.
struct Readback {
    staging: driver::MappedHost,
    stream: Stream,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.ctx.name).finish_non_exhaustive()
    }
}

/// Exclusive use of the backend's stream: every launch goes through here, one caller at a time.
pub struct Exec {
    // Field order is drop order: launches and handles before the streams they use.
    kernels: Kernels,
    blas: Blas,
    /// Decode's products, each shape with its measured-fastest algorithm ([`Exec::plan_gemm_bf16`]).
    lt: Lt,
    /// A step's records as the host writes them ([`Exec::set_steps`]; page-locked, mapped), [`MAX_BATCH`] of
    /// them, and their device copy that the kernels read ([`Exec::load_steps`]): a read of mapped host memory
    /// crosses the bus (a microsecond or more) at the start of every block that needs its sequence.
    steps: MappedHost,
    steps_dev: DeviceBuffer,
    /// A prefill pass's token ids (page-locked host memory the device maps), [`MAX_PREFILL`] of them.
    tokens: MappedHost,
    _module: Module,
    /// Marks the start of a step on `stream`, for `side` to wait on.
    fork: driver::Event,
    /// `staged[l]`: layer l's keys and values are staged (recorded on `side`).
    staged: Vec<driver::Event>,
    /// Copies pinned KV rows to the device while `stream` computes (higher priority, so that its few blocks
    /// are scheduled between the main stream's; a graph that forks onto it keeps node priorities).
    side: Stream,
    stream: Stream,
    /// Launch kernels as programmatic dependent launches (compute capability 9.0+, unless `DRIFTWOOD_CUDA_PDL=0`).
    early: bool,
    /// The most dynamic shared memory a block may have on this device, in bytes.
    max_shared: usize,
    /// Whether the capture in progress forked work onto `side`.
    forked: bool,
    /// While [`Exec::time_marks`] runs: an event per [`Exec::mark`], with the name of the launches after it.
    marks: Option<Vec<(&'static str, driver::Event)>>,
    ctx: Arc<Context>,
}

// SAFETY: every handle inside is usable from any thread once the context is bound (each entry point binds it).
unsafe impl Send for Exec {}

/// Whether the environment variable `name` is `1`: the switches of step optimizations that are built but not
/// yet measured on a GPU, so off by default.
fn opt_in(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Whether the environment variable `name` is set to `0`.
fn opt_out(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

/// Whether a CUDA device can be opened here: the libraries load and the driver reports at least one device
/// (cheap: no context is created and nothing is compiled).
pub fn is_available() -> bool {
    driver::probe().is_ok() && driver::device_count() > 0
}

impl CudaBackend {
    /// Opens CUDA device 0: loads the driver libraries, creates a stream, compiles the kernels.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unavailable`] when the CUDA libraries cannot be loaded or there is no device (checked
    /// before any driver call, so a machine without CUDA gets an error, not a panic); [`BackendError::Driver`]
    /// when the driver, NVRTC or cuBLAS refuse.
    pub fn new() -> Result<Self, BackendError> {
        driver::probe().map_err(|reason| BackendError::Unavailable { backend: "cuda", reason })?;
        let ctx = Context::new(0).map_err(|e| match e {
            BackendError::Driver { reason, .. } if reason.contains("no CUDA-capable device") => {
                BackendError::Unavailable { backend: "cuda", reason }
            }
            e => e,
        })?;
        let stream = Stream::new(&ctx)?;
        let module = Module::compile(&ctx, KERNELS)?;
        let f = |name: &str| module.function(name);
        let kernels = Kernels {
            embed: f("embed")?,
            embed_tokens: f("embed_tokens")?,
            rope_prefill: f("rope_prefill")?,
            swiglu_pairs_bf16: f("swiglu_pairs_bf16")?,
            attn_prefill: [f("attn_prefill_d32")?, f("attn_prefill_d64")?, f("attn_prefill_d128")?],
            rmsnorm_bf16: f("rmsnorm_bf16")?,
            gemv: [f("gemv_r1")?, f("gemv_r2")?, f("gemv_r4")?, f("gemv_r8")?],
            gemv_swiglu: [f("gemv_swiglu_r1")?, f("gemv_swiglu_r2")?, f("gemv_swiglu_r4")?],
            attn_lanes: attn_table("attn_lanes", &f)?,
            attn_split: attn_table("attn_split", &f)?,
            swiglu_bf16: f("swiglu_bf16")?,
            add_bias: f("add_bias")?,
            scatter_logits: f("scatter_logits")?,
            kv_stage: f("kv_stage")?,
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        // Shapes that need more than the device allows are refused at launch (`Exec::attention`).
        let max_shared = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize;
        for (row, group) in kernels.attn_split.iter().zip([1, 2, 4, 8]) {
            for (k, hd) in row.iter().zip(HEAD_DIMS) {
                driver::allow_shared(*k, attn_split_shared(group, hd).min(max_shared) as i32)?;
                driver::prefer_shared(*k)?;
            }
        }
        for (k, hd) in kernels.attn_prefill.iter().zip(HEAD_DIMS) {
            driver::allow_shared(*k, prefill_shared(hd) as i32)?;
        }
        let blas = Blas::new(&ctx, &stream)?;
        let lt = Lt::new(&ctx)?;
        let steps = MappedHost::new(&ctx, MAX_BATCH * size_of::<SeqStep>())?;
        let steps_dev = DeviceBuffer::new(&ctx, MAX_BATCH * size_of::<SeqStep>())?;
        let tokens = MappedHost::new(&ctx, MAX_PREFILL * size_of::<u32>())?;
        let early =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? >= 9 && !opt_out("DRIFTWOOD_CUDA_PDL");
        let exec = Exec {
            kernels,
            blas,
            lt,
            steps,
            steps_dev,
            tokens,
            _module: module,
            fork: driver::Event::marker()?,
            staged: Vec::new(),
            side: Stream::urgent(&ctx)?,
            stream,
            early,
            max_shared,
            forked: false,
            marks: None,
            ctx: ctx.clone(),
        };
        Ok(CudaBackend {
            ctx,
            prefill_chunk: std::sync::atomic::AtomicUsize::new(MAX_PREFILL),
            stage_pinned_kv: opt_in("DRIFTWOOD_CUDA_KV_STAGE"),
            exec: Mutex::new(exec),
            readback: Mutex::new(None),
            addressable: Arc::default(),
            last: Mutex::default(),
        })
    }

    /// Sets the tokens per prefill pass (clamped to `1..=MAX_PREFILL`; longer prompts run in chunks) and
    /// returns the value in effect. Smaller chunks bound the prefill scratch memory and the time the backend is
    /// held by one actor at a time.
    pub fn set_prefill_chunk(&self, tokens: usize) -> usize {
        let tokens = tokens.clamp(1, MAX_PREFILL);
        self.prefill_chunk.store(tokens, std::sync::atomic::Ordering::Relaxed);
        tokens
    }

    /// Tokens per prefill pass.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.ctx.name
    }

    /// Free and total device memory in bytes.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn mem_info(&self) -> Result<(usize, usize), BackendError> {
        self.ctx.mem_info()
    }

    /// The provider that makes actor regions of `placement` addressable by this device.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unsupported`] for `Placement::Host` (it needs no provider), and for a device without
    /// unified addressing or (managed) concurrent managed access.
    pub fn device_memory(&self, placement: Placement) -> Result<Arc<dyn DeviceMemory>, BackendError> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ranges = self.addressable.clone();
        match placement {
            Placement::CudaPinned => {
                if self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? == 0 {
                    return Err(BackendError::Unsupported {
                        backend: "cuda",
                        op: "pinned placement without unified addressing",
                    });
                }
                Ok(Arc::new(PinnedMemory { ctx: self.ctx.clone(), ranges }))
            }
            Placement::CudaManaged => {
                if self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)? == 0 {
                    return Err(BackendError::Unsupported {
                        backend: "cuda",
                        op: "managed placement without concurrent access",
                    });
                }
                Ok(Arc::new(ManagedMemory { ctx: self.ctx.clone(), ranges }))
            }
            _ => Err(BackendError::Unsupported { backend: "cuda", op: "host placement (use pinned or managed)" }),
        }
    }

    /// Whether the device can address `[addr, addr + len)` (a committed range of a pinned or managed region).
    pub fn is_addressable(&self, addr: usize, len: usize) -> bool {
        self.addressable.contains(addr, len)
    }

    /// Whether `addr` is in a pinned region: host memory the device reads across the bus, at a fraction of
    /// its own memory's bandwidth (false for managed memory and for addresses in no region).
    pub fn is_host_resident(&self, addr: usize) -> bool {
        self.addressable.in_host(addr)
    }

    /// Whether kernels are launched as programmatic dependent launches, each one prefetching its weights while
    /// the one before it finishes (compute capability 9.0+, unless `DRIFTWOOD_CUDA_PDL=0`). On by default from
    /// `scripts/device/check.sh ab` (H200, Llama-3.2-1B-shaped, batch 1): managed 1.218 ms/token with it, 1.298
    /// without; pinned 1.371 and 1.412.
    pub fn early_launch(&self) -> bool {
        self.exec.lock().unwrap_or_else(|p| p.into_inner()).early
    }

    /// Whether a single sequence's pinned KV rows are copied to the device on a side stream during each step,
    /// overlapping the bus transfer with the weight reads, instead of read across the bus by attention
    /// (`DRIFTWOOD_CUDA_KV_STAGE=1`). Off by default until measured on a GPU, like
    /// [`CudaBackend::early_launch`].
    pub fn stages_pinned_kv(&self) -> bool {
        self.stage_pinned_kv
    }

    fn check_addressable(
        &self,
        op: &'static str,
        operand: &'static str,
        addr: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        if self.is_addressable(addr, len) {
            Ok(())
        } else {
            Err(BackendError::OutOfRange {
                op,
                detail: format!(
                    "operand `{operand}` ({len} bytes at {addr:#x}) is not in device-addressable memory; run actors with \
                     --placement pinned or managed"
                ),
            })
        }
    }

    /// Copies bytes to a new device buffer.
    ///
    /// # Errors
    ///
    /// A driver error (for example, out of device memory).
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceTensor, BackendError> {
        DeviceBuffer::from_bytes(&self.ctx, bytes).map(DeviceTensor)
    }

    /// A zero-filled device buffer of `bytes` bytes.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceTensor, BackendError> {
        let b = DeviceBuffer::new(&self.ctx, bytes)?;
        b.zero()?;
        Ok(DeviceTensor(b))
    }

    /// Exclusive use of the stream and kernels (blocks while another caller holds it).
    ///
    /// # Errors
    ///
    /// A driver error when the context cannot be bound to this thread.
    pub fn exec(&self) -> Result<MutexGuard<'_, Exec>, BackendError> {
        let guard = self.exec.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx.bind()?;
        Ok(guard)
    }
}

fn blas_type(op: &'static str, operand: &'static str, d: DType) -> Result<BlasType, BackendError> {
    match d {
        DType::F32 => Ok(BlasType::F32),
        DType::BF16 => Ok(BlasType::Bf16),
        actual => Err(BackendError::DType { op, operand, expected: "f32 or bf16", actual }),
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matmul(
        &self,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        c: TensorMut<'_>,
        dims: MatmulDims,
    ) -> Result<(), BackendError> {
        const OP: &str = "matmul";
        let (na, nb, nc) = dims.check_operands(&a, &b, &c)?;
        let t = blas_type(OP, "a", a.dtype())?;
        let size = a.dtype().size();
        self.check_addressable(OP, "a", a.addr(), na * size)?;
        self.check_addressable(OP, "b", b.addr(), nb * size)?;
        self.check_addressable(OP, "c", c.addr(), nc * 4)?;
        if dims.m == 0 || dims.n == 0 {
            return Ok(());
        }
        let exec = self.exec()?;
        // SAFETY: the three ranges are inside device-addressable regions (checked above) and stay alive and
        // unaliased for the call: the caller holds the views, and we synchronize before returning.
        unsafe {
            exec.blas.gemm(
                (dims.m, dims.n, dims.k),
                a.addr() as u64,
                b.addr() as u64,
                false,
                c.addr() as u64,
                (t, BlasType::F32),
                0.0,
            )?;
        }
        exec.stream.synchronize()?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = OperandTrace { a: a.addr(), b: b.addr(), c: c.addr() };
        Ok(())
    }

    fn last_operands(&self) -> OperandTrace {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Query rows per block of the prefill attention kernel for `head_dim` (two 16-row tiles per warp, one for
/// head dimension 128, whose accumulators leave no registers for a second).
fn prefill_rows(head_dim: usize) -> usize {
    if head_dim > 64 { 64 } else { 128 }
}

/// Dynamic shared memory of the prefill attention kernel for `head_dim`: the query tile and two buffers each
/// of 64 key and 64 value rows, bf16.
fn prefill_shared(head_dim: usize) -> usize {
    (prefill_rows(head_dim) + 4 * 64) * head_dim * 2
}

/// Keys per tile of `attn_split`'s ring, and its stages (`ATTN_TILE`, `ATTN_STAGES` in
/// `kernels/attn_decode.cu`).
const ATTN_TILE: usize = 64;
const ATTN_STAGES: usize = 3;

/// Dynamic shared memory of `attn_split` for `group` query heads per KV head of `head_dim`: its ring of
/// [`ATTN_STAGES`] tiles of [`ATTN_TILE`] K rows (padded by 16 bytes against bank conflicts) and V rows, bf16;
/// this step's key and value, bf16; then f32: the queries (group, head_dim + 8), the tile's scores (tile,
/// group), a running max, sum and factor per query head, cos and sin (head_dim). See `kernels/attn_decode.cu`.
fn attn_split_shared(group: usize, head_dim: usize) -> usize {
    let ring = ATTN_STAGES * ATTN_TILE * ((head_dim * 2 + 16) + head_dim * 2);
    let floats = group * (head_dim + 8) + ATTN_TILE * group + 3 * group + head_dim;
    ring + 2 * head_dim * 2 + floats * 4
}

/// Rows per block of the block-split GEMV kernels (`gemv_r{R}` in `kernels/gemv.cu`).
const GEMV_ROWS: [usize; 4] = [1, 2, 4, 8];

/// The shape of a block-split GEMV over `out` rows of `input` inputs (`matrices` weight rows read per output
/// row: 2 for gate and up): (index into [`GEMV_ROWS`], threads per block).
///
/// Threads split a row so that each takes at least two of its 16-byte vectors where the row is long enough
/// (at most 256 threads); rows per block are then as many as keep a thread's loads in flight at about 8
/// (the kernels hold 8 / R vectors per row in flight), while leaving at least 2 blocks per SM of a 132-SM
/// device. Llama-3.2-1B: 2048 inputs → 128 threads, 4 rows; 8192 inputs → 256 threads, 2 rows.
fn gemv_shape(input: usize, out: usize, matrices: usize) -> (usize, u32) {
    let vectors = input / 8;
    let threads = (vectors / 2).next_multiple_of(32).clamp(32, 256);
    let per_row = vectors.div_ceil(threads).max(1);
    // gemv_swiglu has no 8-row variant (its two matrices double the loads).
    let most = if matrices > 1 { 2 } else { GEMV_ROWS.len() - 1 };
    let mut index = GEMV_ROWS.iter().rposition(|&r| r * per_row <= 8).unwrap_or(0).min(most);
    while index > 0 && out.div_ceil(GEMV_ROWS[index]) < 264 {
        index -= 1;
    }
    (index, threads as u32)
}

impl Exec {
    /// Writes this step's sequences where the kernels read them (page-locked host memory the device maps).
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfRange`] for more than [`MAX_BATCH`] sequences.
    pub fn set_steps(&mut self, seqs: &[SeqStep]) -> Result<(), BackendError> {
        if seqs.len() > MAX_BATCH {
            return Err(BackendError::OutOfRange {
                op: "decode",
                detail: format!("{} sequences, at most {MAX_BATCH}", seqs.len()),
            });
        }
        // The previous step's kernels may still read the records: wait for them first.
        self.stream.synchronize()?;
        // SAFETY: the buffer holds MAX_BATCH records, is ours, and no device work reads it now.
        unsafe { std::ptr::copy_nonoverlapping(seqs.as_ptr(), self.steps.ptr.cast::<SeqStep>(), seqs.len()) };
        Ok(())
    }

    /// The device address of the step records.
    pub fn steps_addr(&self) -> u64 {
        self.steps_dev.ptr
    }

    /// Copies the first `b` records of [`Exec::set_steps`] to the device copy that kernels read: the first
    /// launch of a step (in its graph, a memcpy node that copies the records of each replay).
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfRange`] past [`MAX_BATCH`]; a driver error.
    pub fn load_steps(&self, b: usize) -> Result<(), BackendError> {
        if b > MAX_BATCH {
            return Err(BackendError::OutOfRange {
                op: "decode",
                detail: format!("{b} sequences, at most {MAX_BATCH}"),
            });
        }
        // SAFETY: both buffers hold MAX_BATCH records; the host writes `steps` only in `set_steps`, after
        // synchronizing the stream, so never while this copy may run.
        unsafe { driver::copy_from_host(&self.steps, self.steps_dev.ptr, b * size_of::<SeqStep>(), &self.stream) }
    }

    /// Waits for every launch so far.
    ///
    /// # Errors
    ///
    /// A driver error, including one raised by an earlier kernel.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.stream.synchronize()
    }

    /// Records the launches `record` makes into a graph instead of running them. Work forked onto the side
    /// stream ([`Exec::fork_side`]) keeps that stream's higher priority in the graph.
    ///
    /// # Errors
    ///
    /// A driver error, or `record`'s.
    pub fn capture(
        &mut self,
        record: impl FnOnce(&mut Self) -> Result<(), BackendError>,
    ) -> Result<Graph, BackendError> {
        let stream = &self.stream as *const Stream;
        self.forked = false;
        // SAFETY: `stream` is a field of `self`, alive for the call; `record` gets `self` mutably but the stream
        // is never moved or dropped by it.
        Graph::capture(unsafe { &*stream }, || record(self).map(|()| self.forked))
    }

    /// Replays a captured graph.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn replay(&self, graph: &Graph) -> Result<(), BackendError> {
        graph.launch(&self.stream)
    }

    /// A timer: events recorded on the stream.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn time<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, BackendError>) -> Result<(T, f32), BackendError> {
        let (a, b) = (driver::Event::new()?, driver::Event::new()?);
        a.record(&self.stream)?;
        let r = f(self)?;
        b.record(&self.stream)?;
        Ok((r, a.elapsed_ms(&b)?))
    }

    /// Runs `f` (launches, not a capture) with [`Exec::mark`] recording events, then returns the device time
    /// between each mark and the next (or the end of `f`'s launches), summed by mark name in first-seen order.
    /// Early launch is off meanwhile, so that kernels do not overlap across a mark.
    ///
    /// # Errors
    ///
    /// A driver error, or `f`'s.
    pub fn time_marks(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), BackendError>,
    ) -> Result<Vec<(&'static str, f32)>, BackendError> {
        let early = std::mem::replace(&mut self.early, false);
        self.marks = Some(vec![]);
        let ran = f(self).and_then(|()| self.mark("end"));
        self.early = early;
        let marks = self.marks.take().unwrap_or_default();
        ran?;
        let mut sums: Vec<(&'static str, f32)> = vec![];
        for pair in marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1)?;
            match sums.iter_mut().find(|(n, _)| *n == pair[0].0) {
                Some((_, t)) => *t += ms,
                None => sums.push((pair[0].0, ms)),
            }
        }
        Ok(sums)
    }

    /// Inside [`Exec::time_marks`]: the launches from here to the next mark are timed under `name`. Otherwise
    /// (a capture, a plain step) nothing.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn mark(&mut self, name: &'static str) -> Result<(), BackendError> {
        let Some(marks) = &mut self.marks else { return Ok(()) };
        let event = driver::Event::new()?;
        event.record(&self.stream)?;
        marks.push((name, event));
        Ok(())
    }

    fn launch(
        &self,
        f: Function,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), BackendError> {
        // SAFETY: forwarded to the callers of the `unsafe fn`s below, which promise valid addresses. Every
        // kernel calls `wait_prior()` before touching anything an earlier kernel writes (`kernels/`), as an
        // early launch requires.
        unsafe { driver::launch(f, grid, block, shared, &self.stream, args, self.early) }
    }

    /// Starts a step's side work: later [`Exec::stage_kv`] calls run on the side stream after everything
    /// launched on the main stream so far.
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn fork_side(&mut self) -> Result<(), BackendError> {
        self.forked = true;
        self.fork.record(&self.stream)?;
        self.side.wait(&self.fork)
    }

    /// Creates the ordering events of `layers` staged layers ahead of a capture (event creation is kept out
    /// of the captured region).
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn prepare_stages(&mut self, layers: usize) -> Result<(), BackendError> {
        while self.staged.len() < layers {
            self.staged.push(driver::Event::marker()?);
        }
        Ok(())
    }

    /// On the side stream: copies layer `layer`'s key and value rows before the current position of the one
    /// step sequence's cache (pinned host memory) into `stage`, which has the cache's layout; then marks the
    /// layer staged for [`Exec::join_stage`].
    ///
    /// # Safety
    ///
    /// Step record 0 set; its cache 16-byte aligned and holding `layer`; `stage` a device buffer as large as
    /// that cache; `kv_dim` a multiple of 8 (the cache is bf16).
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfRange`] for a layer beyond [`Exec::prepare_stages`]; a driver error.
    pub unsafe fn stage_kv(
        &mut self,
        stage: u64,
        layer: usize,
        kv_dim: usize,
        window: usize,
    ) -> Result<(), BackendError> {
        if layer >= self.staged.len() {
            return Err(BackendError::OutOfRange {
                op: "stage_kv",
                detail: format!("layer {layer}, but events were prepared for {}", self.staged.len()),
            });
        }
        let args = [
            Arg::Ptr(self.steps_addr()),
            Arg::Ptr(stage),
            Arg::I32(layer as i32),
            Arg::I32(kv_dim as i32),
            Arg::I32(window as i32),
        ];
        // SAFETY: the caller's promise; a normal launch (the kernel does not wait for programmatic edges).
        unsafe { driver::launch(self.kernels.kv_stage, (32, 1, 1), 256, 0, &self.side, &args, false)? };
        self.staged[layer].record(&self.side)
    }

    /// Makes the main stream's later work wait until layer `layer` is staged. Call it only for a layer staged
    /// in the same capture: the event would otherwise refer to an earlier one (the driver then fails the
    /// capture).
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfRange`] for a layer beyond [`Exec::prepare_stages`]; a driver error.
    pub fn join_stage(&self, layer: usize) -> Result<(), BackendError> {
        let event = self.staged.get(layer).ok_or_else(|| BackendError::OutOfRange {
            op: "join_stage",
            detail: format!("layer {layer} was not staged"),
        })?;
        self.stream.wait(event)
    }

    /// x (b, hidden) f32 = table (vocab, hidden) bf16 rows of the step tokens.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents; step records set for `b` sequences with tokens < vocab.
    pub unsafe fn embed(&self, table: u64, x: u64, b: usize, hidden: usize) -> Result<(), BackendError> {
        let args = [Arg::Ptr(table), Arg::Ptr(self.steps_addr()), Arg::Ptr(x), Arg::I32(hidden as i32)];
        self.launch(self.kernels.embed, (b as u32, 1, 1), 256, 0, &args)
    }

    /// Writes a prefill pass's token ids where [`Exec::embed_tokens`] reads them.
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfRange`] for more than [`MAX_PREFILL`] tokens.
    pub fn set_tokens(&mut self, tokens: &[u32]) -> Result<(), BackendError> {
        if tokens.len() > MAX_PREFILL {
            return Err(BackendError::OutOfRange {
                op: "prefill",
                detail: format!("{} tokens in one pass, at most {MAX_PREFILL}", tokens.len()),
            });
        }
        // The previous pass's kernels may still read the ids: wait for them first.
        self.stream.synchronize()?;
        // SAFETY: the buffer holds MAX_PREFILL ids, is ours, and no device work reads it now.
        unsafe { std::ptr::copy_nonoverlapping(tokens.as_ptr(), self.tokens.ptr.cast::<u32>(), tokens.len()) };
        Ok(())
    }

    /// x (t, hidden) f32 = table (vocab, hidden) bf16 rows of the ids [`Exec::set_tokens`] wrote.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents; `t` ids set, each below the table's rows.
    pub unsafe fn embed_tokens(&self, table: u64, x: u64, t: usize, hidden: usize) -> Result<(), BackendError> {
        let args = [Arg::Ptr(table), Arg::Ptr(self.tokens.ptr as u64), Arg::Ptr(x), Arg::I32(hidden as i32)];
        self.launch(self.kernels.embed_tokens, (t as u32, 1, 1), 256, 0, &args)
    }

    /// RoPE for `t` consecutive positions from `pos0` of one sequence: from qkv (t, q_dim + 2 kv_dim) f32, the
    /// rotated queries times `qscale` into q (t, heads, head_dim) bf16, and the rotated keys and the values into
    /// knew, vnew (t, kv_dim) bf16 and into the cache rows `pos0..pos0 + t` of `layer`.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents; the cache holds `max_seq ≥ pos0 + t` rows per layer and `layer`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_prefill(
        &self,
        qkv: u64,
        inv_freq: u64,
        (q, knew, vnew): (u64, u64, u64),
        (cache, layer, max_seq): (u64, usize, usize),
        (t, pos0): (usize, usize),
        (heads, kv_heads, head_dim): (usize, usize, usize),
        qscale: f32,
    ) -> Result<(), BackendError> {
        let args = [
            Arg::Ptr(qkv),
            Arg::Ptr(inv_freq),
            Arg::Ptr(q),
            Arg::Ptr(knew),
            Arg::Ptr(vnew),
            Arg::Ptr(cache),
            Arg::I32(layer as i32),
            Arg::I32(pos0 as i32),
            Arg::I32(max_seq as i32),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::F32(qscale),
        ];
        self.launch(self.kernels.rope_prefill, (t as u32, 1, 1), 128, 0, &args)
    }

    /// Causal grouped-query attention of a prefill chunk (`kernels/attn_prefill.cu`).
    ///
    /// # Safety
    ///
    /// The buffers `p` names are valid for its shapes; the cache is 16-byte aligned and holds `layer` and
    /// the rows `0..pos0` the queries see; `head_dim` is one of [`HEAD_DIMS`] (checked: others are refused).
    pub unsafe fn attn_prefill(&self, p: &AttnPrefillParams, head_dim: usize) -> Result<(), BackendError> {
        let Some(di) = HEAD_DIMS.iter().position(|&d| d == head_dim) else {
            return Err(BackendError::Unsupported { backend: "cuda", op: "prefill attention with this head size" });
        };
        if p.t <= 0 || p.kv_heads <= 0 || p.heads % p.kv_heads != 0 {
            return Err(BackendError::OutOfRange {
                op: "attn_prefill",
                detail: format!("{} rows, {} heads over {} key/value heads", p.t, p.heads, p.kv_heads),
            });
        }
        let grid = ((p.t as u32).div_ceil(prefill_rows(head_dim) as u32), p.heads as u32, 1);
        let args = [Arg::Struct(p.bytes())];
        self.launch(self.kernels.attn_prefill[di], grid, 128, prefill_shared(head_dim) as u32, &args)
    }

    /// act (t, ff) bf16 = silu(gate) · up from gu (t, 2 ff) bf16, whose rows are `[gate | up]`. `ff` must be a
    /// multiple of 8.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents, 16-byte aligned.
    pub unsafe fn swiglu_pairs(&self, gu: u64, act: u64, t: usize, ff: usize) -> Result<(), BackendError> {
        let vectors = t * ff / 8;
        let args = [Arg::Ptr(gu), Arg::Ptr(act), Arg::I32(t as i32), Arg::I32(ff as i32)];
        self.launch(self.kernels.swiglu_pairs_bf16, (vectors.div_ceil(256).min(8192) as u32, 1, 1), 256, 0, &args)
    }

    /// y (out) = [y +] W (out, in) bf16 · rmsnorm?(x (in)) (+ bias). `in` must be a multiple of 8.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents (`norm`, `bias` may be 0 for none).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv(
        &self,
        w: u64,
        x: u64,
        y: u64,
        bias: u64,
        norm: u64,
        eps: f32,
        (input, out): (usize, usize),
        accumulate: bool,
    ) -> Result<(), BackendError> {
        let args = [
            Arg::Ptr(w),
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(bias),
            Arg::Ptr(norm),
            Arg::F32(eps),
            Arg::I32(input as i32),
            Arg::I32(out as i32),
            Arg::I32(accumulate as i32),
        ];
        let (index, threads) = gemv_shape(input, out, 1);
        let grid = (out.div_ceil(GEMV_ROWS[index]) as u32, 1, 1);
        self.launch(self.kernels.gemv[index], grid, threads, 0, &args)
    }

    /// y (out) = silu(Wg · rmsnorm(x)) * (Wu · rmsnorm(x)).
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_swiglu(
        &self,
        wg: u64,
        wu: u64,
        x: u64,
        y: u64,
        norm: u64,
        eps: f32,
        (input, out): (usize, usize),
    ) -> Result<(), BackendError> {
        let args = [
            Arg::Ptr(wg),
            Arg::Ptr(wu),
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(norm),
            Arg::F32(eps),
            Arg::I32(input as i32),
            Arg::I32(out as i32),
        ];
        let (index, threads) = gemv_shape(input, out, 2);
        let grid = (out.div_ceil(GEMV_ROWS[index]) as u32, 1, 1);
        self.launch(self.kernels.gemv_swiglu[index], grid, threads, 0, &args)
    }

    /// Decode attention over each sequence's cache, after RoPE on this step's queries and key (angles from
    /// `inv_freq`, (head_dim / 2) f32) and the key and value stored into each cache at its position `layer`:
    /// att (b, q_dim) f32, or bf16 into `att_bf16` when non-zero. `qkv` (b, q_dim + 2 kv_dim) is the QKV
    /// projection's output. One launch: the context is split, and the last split of each (sequence, KV head)
    /// to finish merges them. `part` holds (b, heads, splits, head_dim + 2) f32 where splits = ceil(max_seq /
    /// chunk), `counts` (b, kv_heads) u32, zero before the first step and left zero by every step. With
    /// `stage` non-zero (one sequence), rows before the current position come from that copy of the cache
    /// ([`Exec::stage_kv`], joined before this call).
    ///
    /// # Safety
    ///
    /// Addresses valid; head_dim 32, 64 or 128; heads / kv_heads 1, 2, 4 or 8 (other shapes are refused with
    /// an error before any launch); `counts` used by no other launch in flight.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention(
        &self,
        qkv: u64,
        inv_freq: u64,
        stage: u64,
        (part, counts): (u64, u64),
        (att, att_bf16): (u64, u64),
        layer: usize,
        b: usize,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        (chunk, splits): (usize, usize),
        window: usize,
    ) -> Result<(), BackendError> {
        let group = heads / kv_heads;
        let (Some(gi), Some(di)) = (
            [1, 2, 4, 8].iter().position(|&g| g == group && g * kv_heads == heads),
            HEAD_DIMS.iter().position(|&d| d == head_dim),
        ) else {
            return Err(BackendError::Unsupported { backend: "cuda", op: "attention with this head shape" });
        };
        if chunk == 0 || chunk > ATTN_MAX_CHUNK {
            return Err(BackendError::OutOfRange {
                op: "attention",
                detail: format!("{chunk} keys per split (1 to {ATTN_MAX_CHUNK})"),
            });
        }
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (kernel, shared) = if b < ATTN_FEW_SEQS {
            // The 4 warps' (group, head_dim + 2) partial results.
            (self.kernels.attn_lanes[gi][di], 4 * group * (head_dim + 2) * 4)
        } else {
            (self.kernels.attn_split[gi][di], attn_split_shared(group, head_dim))
        };
        if shared > self.max_shared {
            return Err(BackendError::OutOfRange {
                op: "attention",
                detail: format!(
                    "{group} query heads of {head_dim} need {shared} bytes of shared memory, the device has {}",
                    self.max_shared
                ),
            });
        }
        let args = [
            Arg::Ptr(qkv),
            Arg::Ptr(self.steps_addr()),
            Arg::Ptr(inv_freq),
            Arg::Ptr(stage),
            Arg::Ptr(part),
            Arg::Ptr(att),
            Arg::Ptr(att_bf16),
            Arg::Ptr(counts),
            Arg::I32(layer as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(chunk as i32),
            Arg::I32(splits as i32),
            Arg::I32(window as i32),
            Arg::F32(scale),
        ];
        self.launch(kernel, (kv_heads as u32, splits as u32, b as u32), 128, shared as u32, &args)
    }

    /// y (b, n) bf16 = rmsnorm(x (b, n)) * w.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn rmsnorm_bf16(
        &self,
        x: u64,
        w: u64,
        y: u64,
        b: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), BackendError> {
        let args = [Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(y), Arg::I32(n as i32), Arg::F32(eps)];
        self.launch(self.kernels.rmsnorm_bf16, (b as u32, 1, 1), 256, 0, &args)
    }

    /// act (b, ff) bf16 = silu(gate) * up for gu (b, 2 ff) f32, each row [gate (ff) | up (ff)].
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn swiglu_bf16(&self, gu: u64, act: u64, b: usize, ff: usize) -> Result<(), BackendError> {
        let total = b * ff;
        let args = [Arg::Ptr(gu), Arg::Ptr(act), Arg::I32(b as i32), Arg::I32(ff as i32)];
        self.launch(self.kernels.swiglu_bf16, (total.div_ceil(256).min(4096) as u32, 1, 1), 256, 0, &args)
    }

    /// y (b, n) += bias (n).
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn add_bias(&self, y: u64, bias: u64, b: usize, n: usize) -> Result<(), BackendError> {
        let total = b * n;
        let args = [Arg::Ptr(y), Arg::Ptr(bias), Arg::I32(n as i32), Arg::I32(total as i32)];
        self.launch(self.kernels.add_bias, (total.div_ceil(256).min(4096) as u32, 1, 1), 256, 0, &args)
    }

    /// Copies logits (b, vocab) to each step record's logits buffer.
    ///
    /// # Safety
    ///
    /// Addresses valid; each record's logits buffer holds `vocab` f32.
    pub unsafe fn scatter_logits(&self, logits: u64, b: usize, vocab: usize) -> Result<(), BackendError> {
        let args = [Arg::Ptr(logits), Arg::Ptr(self.steps_addr()), Arg::I32(vocab as i32)];
        self.launch(self.kernels.scatter_logits, (vocab.div_ceil(256).min(1024) as u32, b as u32, 1), 256, 0, &args)
    }

    /// Row-major c (m, n) f32 = beta·c + a (m, k) bf16 · w (n, k)ᵀ bf16, with cuBLAS.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn gemm_bf16(
        &self,
        a: u64,
        w: u64,
        c: u64,
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<(), BackendError> {
        let shape = LtShape { m, n, k, out: BlasType::F32 };
        // SAFETY: the caller's promise.
        unsafe {
            if self.lt.planned(&shape) {
                self.lt.matmul(&shape, a, w, c, beta, &self.stream)
            } else {
                self.blas.gemm((m, n, k), a, w, true, c, (BlasType::Bf16, BlasType::F32), beta)
            }
        }
    }

    /// Measures cuBLASLt's candidate algorithms for [`Exec::gemm_bf16`] of this shape (with `a` (m, k) and
    /// `w` (n, k) bf16 as operands; their values do not matter) and runs that shape with the fastest from
    /// then on. Shapes whose output would not fit the trial buffer keep cuBLAS's default, as do shapes whose
    /// planning fails (the product is the same either way; [`Exec::gemm_plan_refusals`] says why). Call
    /// outside a capture; a shape tried before returns at once.
    ///
    /// # Errors
    ///
    /// None today: a failed plan falls back (the `Result` keeps callers ready for errors that cannot).
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn plan_gemm_bf16(
        &mut self,
        a: u64,
        w: u64,
        (m, n, k): (usize, usize, usize),
    ) -> Result<(), BackendError> {
        let shape = LtShape { m, n, k, out: BlasType::F32 };
        if self.lt.tried(&shape) || !self.lt.fits(&shape) {
            return Ok(());
        }
        // SAFETY: the caller's promise; not capturing (the caller's contract).
        if let Err(e) = unsafe { self.lt.plan(shape, a, w, &self.stream) } {
            self.lt.refuse(shape, e.to_string());
        }
        Ok(())
    }

    /// The decode products whose cuBLASLt planning failed (`m × n × k: why`); they run cuBLAS's default.
    pub fn gemm_plan_refusals(&self) -> Vec<String> {
        self.lt.refusals().into_iter().map(|(s, why)| format!("{} × {} × {}: {why}", s.m, s.n, s.k)).collect()
    }

    /// Row-major c (m, n) bf16 = a (m, k) bf16 · w (n, k)ᵀ bf16 (f32 accumulation), with cuBLAS: for products
    /// whose result only feeds another product.
    ///
    /// # Safety
    ///
    /// Addresses valid for those extents.
    pub unsafe fn gemm_bf16_to_bf16(
        &self,
        a: u64,
        w: u64,
        c: u64,
        (m, n, k): (usize, usize, usize),
    ) -> Result<(), BackendError> {
        // SAFETY: the caller's promise.
        unsafe { self.blas.gemm((m, n, k), a, w, true, c, (BlasType::Bf16, BlasType::Bf16), 0.0) }
    }

    /// Copies `bytes` from `src` to `dst` on the stream (device memory).
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn copy(&self, src: u64, dst: u64, bytes: usize) -> Result<(), BackendError> {
        driver::copy(src, dst, bytes, &self.stream)
    }

    /// Asks the driver to move a managed range to the device ahead of use (a hint; no effect on pinned memory).
    ///
    /// # Errors
    ///
    /// A driver error.
    pub fn prefetch_to_device(&self, addr: u64, bytes: usize) -> Result<(), BackendError> {
        driver::prefetch(addr, bytes, Some(self.ctx.device()), &self.stream)
    }
}

impl CudaBackend {
    /// Copies `count` blocks of `dst.len() / count` bytes into `dst`, one after another, block `i` from the
    /// device address `src + i · stride`: the used rows of each layer's keys and values of a KV cache in managed
    /// memory, say. The copy runs on the copy engines beside the compute stream, through page-locked staging,
    /// and does not move managed pages to the host as a read from the CPU would. Returns once `dst` is filled.
    ///
    /// # Safety
    ///
    /// 1. Every block is device-accessible memory (device, managed, or host memory the device maps), alive
    ///    and not written by anyone until this returns.
    ///
    /// # Errors
    ///
    /// [`BackendError::Shape`] when `dst.len()` is not a multiple of `count`; a driver error.
    pub unsafe fn read_blocks(&self, src: u64, stride: u64, count: usize, dst: &mut [u8]) -> Result<(), BackendError> {
        if count == 0 || !dst.len().is_multiple_of(count) {
            let expected = count.max(1) * (dst.len() / count.max(1));
            return Err(BackendError::Shape { op: "read_blocks", operand: "dst", expected, actual: dst.len() });
        }
        let block = dst.len() / count;
        let mut guard = self.readback.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx.bind()?;
        let readback = match &mut *guard {
            Some(readback) => readback,
            none => {
                let stream = Stream::new(&self.ctx)?;
                none.insert(Readback { staging: driver::MappedHost::new(&self.ctx, READBACK_STAGE)?, stream })
            }
        };
        // SAFETY: the staging buffer is `READBACK_STAGE` bytes, owned by `readback`, which this lock guards.
        let staging = unsafe { std::slice::from_raw_parts_mut(readback.staging.ptr, readback.staging.bytes) };
        let mut done = 0;
        while done < dst.len() {
            let mut filled = 0;
            while filled < staging.len() && done + filled < dst.len() {
                let (i, x) = ((done + filled) / block, (done + filled) % block);
                let n = (block - x).min(staging.len() - filled);
                let from = src + i as u64 * stride + x as u64;
                // SAFETY: the caller's condition 1 for the block's bytes; the staging is ours (above), read
                // only after the stream is synchronized below.
                unsafe { driver::copy_to_host(from, &mut staging[filled..filled + n], &readback.stream)? };
                filled += n;
            }
            readback.stream.synchronize()?;
            dst[done..done + filled].copy_from_slice(&staging[..filled]);
            done += filled;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_shapes_keep_about_eight_loads_per_thread_and_enough_blocks() {
        // Llama-3.2-1B: QKV, O, lm_head (2048 inputs); down (8192); gate and up.
        assert_eq!(gemv_shape(2048, 3072, 1), (2, 128));
        assert_eq!(gemv_shape(2048, 128_256, 1), (2, 128));
        assert_eq!(gemv_shape(8192, 2048, 1), (1, 256));
        assert_eq!(gemv_shape(2048, 8192, 2), (2, 128));
        // One vector per row: 8 rows a block, unless that leaves too few blocks.
        assert_eq!(gemv_shape(256, 100_000, 1), (3, 32));
        assert_eq!(gemv_shape(256, 512, 1), (0, 32));
        // Long rows: one row a block, the loop takes the rest.
        assert_eq!(gemv_shape(65_536, 4096, 1), (0, 256));
        for (input, out, m) in [(8, 1, 1), (64, 3, 2), (14_336, 4096, 1), (4096, 14_336, 2)] {
            let (index, threads) = gemv_shape(input, out, m);
            assert!(index < if m > 1 { 3 } else { 4 } && threads % 32 == 0 && (32..=256).contains(&threads));
        }
    }

    #[test]
    fn attn_split_shared_memory_fits_an_sm() {
        for group in [1, 2, 4, 8] {
            for hd in HEAD_DIMS {
                let bytes = attn_split_shared(group, hd);
                // The largest (8 heads of 128) stays under 163 KiB (sm_80's opt-in limit).
                assert!(bytes <= 163 << 10, "{group} × {hd}: {bytes}");
            }
        }
        // Llama-3.2-1B (4 heads of 64 per KV head): four blocks fit an H100's 228 KiB SM.
        assert!(4 * (attn_split_shared(4, 64) + 1024) <= 228 << 10);
    }
}
