//! Guest SDK for Driftwood actors (wasm32).
//!
//! An actor is a core WebAssembly module that imports the `driftwood` host module. Linking this crate does two
//! things:
//! 1. it exports `driftwood_abi_version`, which the host reads at instantiation and refuses the module when
//!    the version differs from its own;
//! 2. it gives safe wrappers over the imports. Tensors are ordinary Rust slices in the actor's own linear
//!    memory: the host computes on those bytes in place and copies nothing.
//!
//! ```ignore
//! // Inside an actor built for wasm32-unknown-unknown:
//! let a = vec![1.0f32; 4 * 8];           // (4, 8) lives in this actor's memory
//! let b = vec![0.5f32; 8 * 2];           // (8, 2)
//! let mut c = vec![0.0f32; 4 * 2];       // (4, 2) is written by the backend in place
//! driftwood_guest::matmul_f32(&a, &b, &mut c, 4, 2, 8).unwrap();
//! driftwood_guest::log(driftwood_guest::Level::Info, "done");
//! ```

#![warn(missing_docs)]

pub mod llm;
pub mod logprobs;
pub mod sample;

/// The host ABI version this SDK speaks (`driftwood-abi`). The host refuses modules built for another version.
pub const ABI_VERSION: u32 = driftwood_abi::ABI_VERSION;

pub use driftwood_abi::DTypeCode;
/// The serving protocol's version and frames (what `driftwood serve` expects of an actor).
pub use driftwood_abi::serve;

/// Raw imports of the `driftwood` module. Prefer the safe wrappers; these are public so that tests can
/// exercise the host's validation with deliberately bad arguments.
pub mod raw {
    #[link(wasm_import_module = "driftwood")]
    unsafe extern "C" {
        /// The host's ABI version.
        pub fn abi_version() -> u32;
        /// Writes `len` bytes of UTF-8 at `ptr` to the host log at `level` (0 error … 4 trace).
        pub fn log(level: u32, ptr: *const u8, len: usize);
        /// `c (m, n) = a (m, k) · b (k, n)`, row-major, `a` and `b` of `dtype` (0 f32, 1 bf16), `c` f32.
        pub fn matmul(a: *const u8, b: *const u8, c: *mut u8, m: u32, n: u32, k: u32, dtype: u32);
        /// Does nothing; measures the cost of crossing into the host.
        pub fn noop();
        /// Handle of the model the host loaded as the UTF-8 name at `ptr`.
        pub fn model_open(ptr: *const u8, len: usize) -> i32;
        /// Writes `driftwood_abi::MODEL_INFO_WORDS` u32s describing the model at `out`.
        pub fn model_info(model: u32, out: *mut u32);
        /// Token ids of the text at `ptr`; returns the count (nothing written if it exceeds `cap`).
        pub fn tokenize(model: u32, ptr: *const u8, len: usize, add_special: u32, out: *mut u32, cap: usize) -> i32;
        /// UTF-8 text of `n` ids; returns the byte count (nothing written if it exceeds `cap`).
        pub fn detokenize(model: u32, ids: *const u32, n: usize, skip_special: u32, out: *mut u8, cap: usize) -> i32;
        /// Renders a JSON list of `{role, content}` with the model's chat template; returns the byte count.
        pub fn chat_template(model: u32, ptr: *const u8, len: usize, add_generation_prompt: u32, out: *mut u8, cap: usize) -> i32;
        /// Runs `n` tokens at `pos` of the KV cache at `kv` (`max_seq` tokens of dtype code `kv_dtype`, 16-byte
        /// aligned), writing the last token's logits.
        pub fn forward(model: u32, kv: *mut u8, kv_dtype: u32, max_seq: u32, pos: u32, tokens: *const u32, n: usize, logits: *mut f32);
        /// Streams generated text to the host.
        pub fn emit(ptr: *const u8, len: usize);
        /// Writes the session (the first `n` tokens' KV rows, the tokens, and `state`) to the snapshot file the
        /// host chose. Returns 0, or -1 if the host could not (its reason goes to the host's error report).
        pub fn session_save(model: u32, kv: *const u8, kv_dtype: u32, max_seq: u32, tokens: *const u32, n: usize, state: *const u8, state_len: usize) -> i32;
        /// Reads the snapshot file the host chose into a session: KV rows into `kv`, tokens into `tokens`
        /// (capacity `max_seq`), the saved state into `state` (capacity `state_cap`). Returns the token count,
        /// or -1 if the host refused the file.
        pub fn session_load(model: u32, kv: *mut u8, kv_dtype: u32, max_seq: u32, tokens: *mut u32, state: *mut u8, state_cap: usize) -> i32;
    }
}

/// Exported for the host: the ABI version this module was built against.
#[unsafe(no_mangle)]
pub extern "C" fn driftwood_abi_version() -> u32 {
    ABI_VERSION
}

/// Log severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    /// Something failed.
    Error = 0,
    /// Something looks wrong.
    Warn = 1,
    /// Progress a user wants to see.
    Info = 2,
    /// Detail for developers.
    Debug = 3,
    /// Everything.
    Trace = 4,
}

/// Writes `message` to the host's log.
pub fn log(level: Level, message: &str) {
    // SAFETY: `message` is a valid readable range of this module's memory for the duration of the call.
    unsafe { raw::log(level as u32, message.as_ptr(), message.len()) }
}

/// The ABI version the host implements.
pub fn host_abi_version() -> u32 {
    // SAFETY: takes no arguments and touches no guest memory.
    unsafe { raw::abi_version() }
}

/// Crosses into the host and back, doing nothing.
pub fn noop() {
    // SAFETY: as above.
    unsafe { raw::noop() }
}

/// Streams `text` to the host's output (the user's terminal or an HTTP response).
pub fn emit(text: &str) {
    // SAFETY: a valid readable range of this module's memory for the duration of the call.
    unsafe { raw::emit(text.as_ptr(), text.len()) }
}

/// Why a wrapper refused to call the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A slice's length does not match the shape.
    Shape,
}

fn shape_ok(a: usize, b: usize, c: usize, m: u32, n: u32, k: u32) -> bool {
    let (m, n, k) = (m as u64, n as u64, k as u64);
    a as u64 == m * k && b as u64 == k * n && c as u64 == m * n
}

/// `c (m, n) = a (m, k) · b (k, n)` in f32, computed by the host backend directly on these slices.
///
/// # Errors
///
/// [`Error::Shape`] if a slice's length does not match the shape; the host is not called.
pub fn matmul_f32(a: &[f32], b: &[f32], c: &mut [f32], m: u32, n: u32, k: u32) -> Result<(), Error> {
    if !shape_ok(a.len(), b.len(), c.len(), m, n, k) {
        return Err(Error::Shape);
    }
    // SAFETY: the three slices are valid, aligned, and `c` is exclusive (a `&mut` cannot alias `a`/`b`).
    unsafe { raw::matmul(a.as_ptr().cast(), b.as_ptr().cast(), c.as_mut_ptr().cast(), m, n, k, 0) };
    Ok(())
}

/// A bfloat16 value stored as its bit pattern (the top 16 bits of an f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Rounds `x` to the nearest bfloat16 (ties to even; NaN stays NaN).
    pub fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        if x.is_nan() {
            return Bf16((bits >> 16) as u16 | 0x40);
        }
        let round = 0x7FFF + ((bits >> 16) & 1);
        Bf16((bits.wrapping_add(round) >> 16) as u16)
    }

    /// The exact f32 value.
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// `c (m, n) = a (m, k) · b (k, n)` with bf16 inputs and f32 accumulation and output.
///
/// # Errors
///
/// [`Error::Shape`] if a slice's length does not match the shape; the host is not called.
pub fn matmul_bf16(a: &[Bf16], b: &[Bf16], c: &mut [f32], m: u32, n: u32, k: u32) -> Result<(), Error> {
    if !shape_ok(a.len(), b.len(), c.len(), m, n, k) {
        return Err(Error::Shape);
    }
    // SAFETY: as in `matmul_f32`.
    unsafe { raw::matmul(a.as_ptr().cast(), b.as_ptr().cast(), c.as_mut_ptr().cast(), m, n, k, 1) };
    Ok(())
}
