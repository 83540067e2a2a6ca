//! The portable session snapshot: an actor's KV cache, its tokens and its own opaque state, as a
//! [safetensors](https://github.com/huggingface/safetensors) file that any safetensors reader opens.
//!
//! # Format, version 3
//!
//! A standard safetensors file: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON header, then
//! the tensor data. In files this crate writes, the header is padded with spaces (`0x20`) to a multiple of 8
//! bytes, so the data starts 8-byte aligned, and the data is laid out in this order with no gaps:
//!
//! | tensor | dtype | shape | contents |
//! |---|---|---|---|
//! | `layers.{i}.k`, `layers.{i}.v` for `i` in `0..num_layers` (k then v per layer) | `F32` or `BF16` (the `dtype` key) | `[n_tokens, kv_heads, head_dim]` | keys (after RoPE) / values of the first `n_tokens` positions |
//! | `tokens` | `U32` | `[n_tokens]` | the token ids those positions hold |
//! | `guest_state` | `U8` | `[m]` (`m` may be 0) | opaque bytes from the actor (e.g. its sampler state) |
//!
//! All numbers are little-endian, row-major (C order). Exactly these `2 * num_layers + 2` tensors are present.
//! A reader must not rely on the data order or the padding: it must use the `data_offsets` of the header (this
//! reader does; if a foreign writer leaves data misaligned in memory, [`SessionFile`] copies that tensor to an
//! aligned buffer).
//!
//! The header's `__metadata__` holds exactly these string keys, all required, no others:
//!
//! | key | value |
//! |---|---|
//! | `format` | `driftwood-session` |
//! | `version` | `3` |
//! | `model_fingerprint` | the model's fingerprint (opaque string; Driftwood uses hex SHA-256) |
//! | `tokenizer_fingerprint` | the tokenizer's fingerprint (opaque string) |
//! | `dtype` | `f32` or `bf16` ([`KvDtype`]): the dtype of every `layers.*` tensor (`F32` or `BF16`) |
//! | `layout` | `(tokens, kv_heads, head_dim) per layer; keys after RoPE` |
//! | `num_layers`, `kv_heads`, `head_dim` | canonical decimal (ASCII digits, no sign, no leading zero), each ≥ 1 |
//! | `n_tokens` | canonical decimal, ≥ 0, at most [`MAX_TOKENS`] |
//! | `digests` | one digest per tensor, in the order `tokens`, `guest_state`, `layers.0.k`, `layers.0.v`, `layers.1.k`, …: each the BLAKE3 (32-byte output) of the tensor's raw data bytes, as 64 lowercase hex digits; joined by `,` |
//! | `checksum` | 64 lowercase hex digits: BLAKE3 (32-byte output) as defined below |
//!
//! **Checksum.** BLAKE3 over every metadata entry except `checksum`, in ascending byte order of the keys, each as
//! `u64le(len(key)) ‖ key ‖ u64le(len(value)) ‖ value` (UTF-8 bytes). Since `digests` is one of those entries, the
//! checksum covers every value a reader uses; what it does not cover (the JSON's spelling, key order,
//! whitespace, `data_offsets`) is checked structurally instead. Per-tensor digests let a reader verify the
//! tensors independently, in parallel, while it reads them into their destinations.
//!
//! `guest_state` is at most [`MAX_GUEST_STATE_BYTES`] and the header at most [`MAX_HEADER_BYTES`].
//!
//! # Version 2 (read, not written)
//!
//! As version 3 except: `version` is `2`; `dtype` is `f32` only; there is no `digests` key; and `checksum` is
//! BLAKE3 over the metadata entries as above followed by the raw data of `tokens`, `guest_state`, `layers.0.k`,
//! `layers.0.v`, `layers.1.k`, … each as `u64le(len(data)) ‖ data` (one sequential hash).
//!
//! # Reading
//!
//! [`SessionReader::open`] looks before it allocates: it takes the file's size from the file system, refuses an
//! actor snapshot by its magic, checks the header length against the file, parses only the header, checks that
//! the tensors it declares account for the file's size exactly and (given a [`SessionExpect`]) that they fit the
//! loaded model and session, and only then reads the tokens and the guest state. The KV cache is read by
//! [`SessionReader::read_kv_into`] straight into the caller's buffers, converting between `f32` and `bf16` when
//! asked, and verified as it is read; on any failure every destination is zeroed. [`read_session`] and
//! [`parse_session`] validate the same way and hold the whole file in memory.
//!
//! **Validation** (any failure is an error naming the field; nothing panics): the file is at most
//! [`MAX_FILE_BYTES`]; the safetensors header parses and its offsets cover the data exactly; the metadata keys
//! and values are as above; the tensor set is exact; every tensor's dtype and shape agree with the metadata; the
//! checksum and digests match; and, given a [`SessionExpect`], the fingerprints, `num_layers`, `kv_heads`,
//! `head_dim` equal the loaded model's and `n_tokens ≤ max_tokens`.
//!
//! Python (`pip install safetensors numpy`):
//! ```python
//! from safetensors import safe_open
//! with safe_open("chat.dws", framework="numpy") as f:   # framework="pt" for bf16 caches
//!     meta = f.metadata(); k0 = f.get_tensor("layers.0.k")   # shape (n_tokens, kv_heads, head_dim)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::atomic::{Staged, stage_atomic};
use crate::error::{Format, SnapshotError};
use crate::util::{hex, is_digest_hex, le_bytes_u32, parse_canonical_u64, read_exact_at};

/// Value of the `format` metadata key.
pub const FORMAT_NAME: &str = "driftwood-session";
/// The format version this crate writes (`version` metadata key).
pub const FORMAT_VERSION: u32 = 3;
/// The format versions this crate reads.
pub const READ_VERSIONS: [u32; 2] = [2, 3];
/// Value of the `layout` metadata key.
pub const LAYOUT: &str = "(tokens, kv_heads, head_dim) per layer; keys after RoPE";
/// Largest session snapshot file written or read (64 GiB).
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// Largest JSON header written or read (16 MiB; a header is about 200 bytes per layer).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Most tokens a session snapshot holds.
pub const MAX_TOKENS: usize = 1 << 22;
/// Largest `guest_state` written or read (16 MiB).
pub const MAX_GUEST_STATE_BYTES: usize = 16 << 20;

/// Bytes read (and hashed) at a time when streaming tensors.
const CHUNK: usize = 1 << 20;

const F: Format = Format::Session;

/// The metadata keys of version 2, in ascending order.
const META_KEYS_V2: [&str; 11] = [
    "checksum",
    "dtype",
    "format",
    "head_dim",
    "kv_heads",
    "layout",
    "model_fingerprint",
    "n_tokens",
    "num_layers",
    "tokenizer_fingerprint",
    "version",
];

/// The metadata keys of version 3, in ascending order.
const META_KEYS_V3: [&str; 12] = [
    "checksum",
    "digests",
    "dtype",
    "format",
    "head_dim",
    "kv_heads",
    "layout",
    "model_fingerprint",
    "n_tokens",
    "num_layers",
    "tokenizer_fingerprint",
    "version",
];

/// The element type of a KV cache (the `dtype` metadata key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// IEEE 754 single precision, 4 bytes (`f32`; safetensors `F32`).
    F32,
    /// bfloat16, the upper half of an f32, 2 bytes (`bf16`; safetensors `BF16`).
    Bf16,
}

impl KvDtype {
    /// Bytes per element: 4 or 2.
    pub const fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// The name used in the `dtype` metadata key: `"f32"` or `"bf16"`.
    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }

    /// The dtype named `name` (`"f32"` or `"bf16"`), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(KvDtype::F32),
            "bf16" => Some(KvDtype::Bf16),
            _ => None,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            KvDtype::F32 => Dtype::F32,
            KvDtype::Bf16 => Dtype::BF16,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rounds an f32 (as its bits) to bf16, to nearest with ties to even; NaNs stay NaN (quieted).
fn f32_to_bf16(bits: u32) -> u16 {
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x40) as u16;
    }
    // No overflow: the largest non-NaN pattern is 0xff80_0000.
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Converts little-endian elements of `from` in `src` to elements of `to` in `dst` (`dst` has as many elements).
fn convert(src: &[u8], from: KvDtype, dst: &mut [u8], to: KvDtype) {
    // Fast path: aligned buffers on a little-endian host, converted as whole words (vectorizes).
    if cfg!(target_endian = "little") {
        match (from, to) {
            (KvDtype::F32, KvDtype::Bf16) => {
                if let (Ok(s), Ok(d)) =
                    (bytemuck::try_cast_slice::<u8, u32>(src), bytemuck::try_cast_slice_mut::<u8, u16>(dst))
                {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = f32_to_bf16(s));
                    return;
                }
            }
            (KvDtype::Bf16, KvDtype::F32) => {
                if let (Ok(s), Ok(d)) =
                    (bytemuck::try_cast_slice::<u8, u16>(src), bytemuck::try_cast_slice_mut::<u8, u32>(dst))
                {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = u32::from(s) << 16);
                    return;
                }
            }
            _ => {}
        }
    }
    match (from, to) {
        (KvDtype::F32, KvDtype::Bf16) => {
            for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(2)) {
                let b = f32_to_bf16(u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
                d.copy_from_slice(&b.to_le_bytes());
            }
        }
        (KvDtype::Bf16, KvDtype::F32) => {
            for (s, d) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                d[0] = 0;
                d[1] = 0;
                d[2] = s[0];
                d[3] = s[1];
            }
        }
        _ => dst.copy_from_slice(src),
    }
}

/// A session's state to write: borrowed views of the KV cache (only the used positions), the tokens and the
/// actor's opaque state. Nothing is copied when it is written.
#[derive(Clone)]
pub struct SessionSnapshot<'a> {
    /// Fingerprint of the model the KV cache was computed with.
    pub model_fingerprint: &'a str,
    /// Fingerprint of the tokenizer that produced `tokens`.
    pub tokenizer_fingerprint: &'a str,
    /// Number of transformer layers (≥ 1); `layers.len()` must equal it.
    pub num_layers: usize,
    /// Key/value heads per layer (≥ 1).
    pub kv_heads: usize,
    /// Dimension of one head (≥ 1).
    pub head_dim: usize,
    /// The element type of `layers`.
    pub kv_dtype: KvDtype,
    /// The token ids of the cached positions; `n_tokens = tokens.len()` (at most [`MAX_TOKENS`]).
    pub tokens: &'a [u32],
    /// Opaque bytes from the actor (e.g. its sampler RNG state); may be empty; at most [`MAX_GUEST_STATE_BYTES`].
    pub guest_state: &'a [u8],
    /// Per layer, `(k, v)`: the raw little-endian bytes of `n_tokens * kv_heads * head_dim` elements of
    /// `kv_dtype` each, laid out `[n_tokens][kv_heads][head_dim]`.
    pub layers: Vec<(&'a [u8], &'a [u8])>,
}

impl SessionSnapshot<'_> {
    /// Bytes of data the snapshot refers to (KV values, tokens, guest state), not counting the header.
    pub fn data_bytes(&self) -> usize {
        let kv: usize = self.layers.iter().map(|(k, v)| k.len() + v.len()).sum();
        kv + self.tokens.len() * 4 + self.guest_state.len()
    }

    /// A copy that owns its data, so that it can be written after the borrowed memory changes or is gone
    /// (for example on another thread, after the actor resumed).
    pub fn to_owned_snapshot(&self) -> OwnedSessionSnapshot {
        let mut kv = Vec::with_capacity(self.layers.iter().map(|(k, v)| k.len() + v.len()).sum());
        for (k, v) in &self.layers {
            kv.extend_from_slice(k);
            kv.extend_from_slice(v);
        }
        OwnedSessionSnapshot {
            model_fingerprint: self.model_fingerprint.to_string(),
            tokenizer_fingerprint: self.tokenizer_fingerprint.to_string(),
            num_layers: self.num_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            kv_dtype: self.kv_dtype,
            tokens: self.tokens.to_vec(),
            guest_state: self.guest_state.to_vec(),
            layer_lens: self.layers.iter().map(|(k, v)| (k.len(), v.len())).collect(),
            kv,
        }
    }
}

/// A [`SessionSnapshot`] that owns its data (see [`SessionSnapshot::to_owned_snapshot`]).
pub struct OwnedSessionSnapshot {
    model_fingerprint: String,
    tokenizer_fingerprint: String,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    kv_dtype: KvDtype,
    tokens: Vec<u32>,
    guest_state: Vec<u8>,
    /// Per layer, the byte lengths of k and v in `kv`.
    layer_lens: Vec<(usize, usize)>,
    /// Every layer's k then v, in layer order.
    kv: Vec<u8>,
}

impl OwnedSessionSnapshot {
    /// The borrowed view [`write_session`] takes; equal to the snapshot this was copied from.
    pub fn view(&self) -> SessionSnapshot<'_> {
        let mut rest = self.kv.as_slice();
        let layers = self
            .layer_lens
            .iter()
            .map(|&(k, v)| {
                let (kv, tail) = rest.split_at(k + v);
                rest = tail;
                kv.split_at(k)
            })
            .collect();
        SessionSnapshot {
            model_fingerprint: &self.model_fingerprint,
            tokenizer_fingerprint: &self.tokenizer_fingerprint,
            num_layers: self.num_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            kv_dtype: self.kv_dtype,
            tokens: &self.tokens,
            guest_state: &self.guest_state,
            layers,
        }
    }
}

impl fmt::Debug for OwnedSessionSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.view().fmt(f)
    }
}

impl fmt::Debug for SessionSnapshot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The KV cache can be gigabytes: show its shape, not its values.
        f.debug_struct("SessionSnapshot")
            .field("model_fingerprint", &self.model_fingerprint)
            .field("tokenizer_fingerprint", &self.tokenizer_fingerprint)
            .field("num_layers", &self.num_layers)
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("kv_dtype", &self.kv_dtype)
            .field("n_tokens", &self.tokens.len())
            .field("guest_state_len", &self.guest_state.len())
            .finish_non_exhaustive()
    }
}

/// What the loaded model requires of a snapshot before it is restored (see [`SessionReader::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionExpect {
    /// Fingerprint of the loaded model.
    pub model_fingerprint: String,
    /// Fingerprint of the loaded tokenizer.
    pub tokenizer_fingerprint: String,
    /// The loaded model's layer count.
    pub num_layers: usize,
    /// The loaded model's KV heads per layer.
    pub kv_heads: usize,
    /// The loaded model's head dimension.
    pub head_dim: usize,
    /// How many positions the target session can hold.
    pub max_tokens: usize,
}

/// Feeds the checksum as the module documentation defines it.
struct Checksum(blake3::Hasher);

impl Checksum {
    fn new<'m>(meta: impl IntoIterator<Item = (&'m str, &'m str)>) -> Self {
        let mut c = Checksum(blake3::Hasher::new());
        for (k, v) in meta {
            if k != "checksum" {
                c.field(k.as_bytes());
                c.field(v.as_bytes());
            }
        }
        c
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> String {
        hex(self.0.finalize().as_bytes())
    }
}

fn digest_hex(data: &[u8]) -> String {
    hex(blake3::hash(data).as_bytes())
}

/// The safetensors header, serialized in data order with `__metadata__` first (deterministic bytes).
struct HeaderJson<'a> {
    meta: &'a BTreeMap<String, String>,
    tensors: &'a [(String, TensorInfo)],
}

impl Serialize for HeaderJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry("__metadata__", self.meta)?;
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

/// A validated snapshot, ready to stream: the complete header (length prefix included).
struct Prepared {
    header: Vec<u8>,
    total_len: u64,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::BadInput { format: F, field, reason: reason.into() }
}

fn prepare(s: &SessionSnapshot<'_>) -> Result<Prepared, SnapshotError> {
    for (field, value) in [("num_layers", s.num_layers), ("kv_heads", s.kv_heads), ("head_dim", s.head_dim)] {
        if value == 0 {
            return Err(bad(field, "must be at least 1"));
        }
    }
    if s.layers.len() != s.num_layers {
        return Err(bad("layers", format!("{} layers given but num_layers is {}", s.layers.len(), s.num_layers)));
    }
    let n_tokens = s.tokens.len();
    if n_tokens > MAX_TOKENS {
        return Err(bad("tokens", format!("{n_tokens} tokens, over the limit of {MAX_TOKENS}")));
    }
    if s.guest_state.len() > MAX_GUEST_STATE_BYTES {
        return Err(bad(
            "guest_state",
            format!("{} bytes, over the limit of {MAX_GUEST_STATE_BYTES}", s.guest_state.len()),
        ));
    }
    let size = s.kv_dtype.size();
    let elems = n_tokens
        .checked_mul(s.kv_heads)
        .and_then(|x| x.checked_mul(s.head_dim))
        .filter(|x| x.checked_mul(size).is_some())
        .ok_or_else(|| bad("layers", "n_tokens * kv_heads * head_dim overflows"))?;
    let layer_bytes = elems * size;
    for (i, (k, v)) in s.layers.iter().enumerate() {
        for (which, t) in [("k", k), ("v", v)] {
            if t.len() != layer_bytes {
                return Err(bad(
                    "layers",
                    format!(
                        "layer {i} {which} has {} bytes, expected {layer_bytes} (n_tokens {n_tokens} × kv_heads {} × head_dim {} × {} bytes of {})",
                        t.len(),
                        s.kv_heads,
                        s.head_dim,
                        size,
                        s.kv_dtype
                    ),
                ));
            }
        }
    }

    let mut meta: BTreeMap<String, String> = [
        ("format", FORMAT_NAME.to_string()),
        ("version", FORMAT_VERSION.to_string()),
        ("model_fingerprint", s.model_fingerprint.to_string()),
        ("tokenizer_fingerprint", s.tokenizer_fingerprint.to_string()),
        ("dtype", s.kv_dtype.name().to_string()),
        ("layout", LAYOUT.to_string()),
        ("num_layers", s.num_layers.to_string()),
        ("kv_heads", s.kv_heads.to_string()),
        ("head_dim", s.head_dim.to_string()),
        ("n_tokens", n_tokens.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    // Per-tensor digests, in the documented order, hashed in parallel.
    let tokens = le_bytes_u32(s.tokens);
    let mut order: Vec<&[u8]> = Vec::with_capacity(2 * s.num_layers + 2);
    order.push(&tokens);
    order.push(s.guest_state);
    for (k, v) in &s.layers {
        order.push(k);
        order.push(v);
    }
    let digests: Vec<String> = order.par_iter().map(|d| digest_hex(d)).collect();
    meta.insert("digests".to_string(), digests.join(","));
    let sum = Checksum::new(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    meta.insert("checksum".to_string(), sum.finish());

    let mut offset = 0usize;
    let mut tensors = Vec::with_capacity(2 * s.num_layers + 2);
    let mut push = |name: String, dtype: Dtype, shape: Vec<usize>, len: usize| -> Result<(), SnapshotError> {
        let end = offset.checked_add(len).ok_or_else(|| bad("layers", "total size overflows"))?;
        tensors.push((name, TensorInfo { dtype, shape, data_offsets: (offset, end) }));
        offset = end;
        Ok(())
    };
    let kv_shape = vec![n_tokens, s.kv_heads, s.head_dim];
    for i in 0..s.num_layers {
        push(format!("layers.{i}.k"), s.kv_dtype.safetensors(), kv_shape.clone(), layer_bytes)?;
        push(format!("layers.{i}.v"), s.kv_dtype.safetensors(), kv_shape.clone(), layer_bytes)?;
    }
    push("tokens".to_string(), Dtype::U32, vec![n_tokens], n_tokens * 4)?;
    push("guest_state".to_string(), Dtype::U8, vec![s.guest_state.len()], s.guest_state.len())?;

    let mut json = serde_json::to_vec(&HeaderJson { meta: &meta, tensors: &tensors })
        .map_err(|e| bad("metadata", format!("cannot serialize the header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() as u64 > MAX_HEADER_BYTES {
        return Err(bad("layers", format!("the header would be {} bytes, over {MAX_HEADER_BYTES}", json.len())));
    }
    let total_len = (8 + json.len() as u64).saturating_add(offset as u64);
    if total_len > MAX_FILE_BYTES {
        return Err(bad("layers", format!("the file would be {total_len} bytes, over the limit of {MAX_FILE_BYTES}")));
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    Ok(Prepared { header, total_len })
}

fn stream(w: &mut dyn Write, s: &SessionSnapshot<'_>, p: &Prepared) -> io::Result<()> {
    w.write_all(&p.header)?;
    for (k, v) in &s.layers {
        w.write_all(k)?;
        w.write_all(v)?;
    }
    w.write_all(&le_bytes_u32(s.tokens))?;
    w.write_all(s.guest_state)
}

/// Writes `s` to `path` atomically (see [`crate::atomic`]): an existing file at `path` is replaced only once the
/// new one is complete and synced. The KV data is streamed from the borrowed slices, not copied. Returns the
/// number of bytes written.
///
/// # Errors
///
/// [`SnapshotError::BadInput`] (before anything is written) when a dimension is 0, `layers.len()` differs from
/// `num_layers`, a layer's `k` or `v` has the wrong length, there are more than [`MAX_TOKENS`] tokens, the guest
/// state is over [`MAX_GUEST_STATE_BYTES`], or the file would exceed [`MAX_FILE_BYTES`];
/// [`SnapshotError::Io`] when writing, syncing or renaming fails (an existing file is then left unchanged).
pub fn write_session(path: &Path, s: &SessionSnapshot<'_>) -> Result<u64, SnapshotError> {
    stage_session(path, s)?.commit()
}

/// Writes `s` into a temporary file next to `path` and returns it [`Staged`]: complete, but neither synced nor
/// in place until [`Staged::commit`] (which may run on another thread; `s` is no longer needed by then).
///
/// # Errors
///
/// As for [`write_session`], except that syncing and renaming happen in [`Staged::commit`].
pub fn stage_session(path: &Path, s: &SessionSnapshot<'_>) -> Result<Staged, SnapshotError> {
    let p = prepare(s)?;
    stage_atomic(path, |w| stream(w, s, &p))
}

/// Writes `s` in the session format to any writer (a socket, a buffer), not atomically. Returns the number of
/// bytes written.
///
/// # Errors
///
/// [`SnapshotError::BadInput`] as for [`write_session`] (nothing written), [`SnapshotError::Write`] when `w`
/// fails.
pub fn write_session_to(w: &mut dyn Write, s: &SessionSnapshot<'_>) -> Result<u64, SnapshotError> {
    let p = prepare(s)?;
    stream(w, s, &p).map_err(|source| SnapshotError::Write { format: F, source })?;
    Ok(p.total_len)
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::invalid(F, field, reason)
}

/// What a tensor name is, if it belongs to the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Tokens,
    GuestState,
    Layer(usize, bool),
}

fn classify(name: &str, num_layers: usize) -> Option<Name> {
    match name {
        "tokens" => Some(Name::Tokens),
        "guest_state" => Some(Name::GuestState),
        _ => {
            let rest = name.strip_prefix("layers.")?;
            let (index, kv) = rest.rsplit_once('.')?;
            let is_k = match kv {
                "k" => true,
                "v" => false,
                _ => return None,
            };
            let i = usize::try_from(parse_canonical_u64(index)?).ok()?;
            (i < num_layers).then_some(Name::Layer(i, is_k))
        }
    }
}

fn expected_name(index: usize) -> String {
    match index {
        0 => "tokens".to_string(),
        1 => "guest_state".to_string(),
        i => format!("layers.{}.{}", (i - 2) / 2, if i % 2 == 0 { "k" } else { "v" }),
    }
}

/// A parsed and structurally validated header: everything about the file but its data, with the data's
/// positions as absolute byte ranges of the file.
#[derive(Debug, Clone)]
struct Header {
    version: u32,
    meta: BTreeMap<String, String>,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    n_tokens: usize,
    kv_dtype: KvDtype,
    tokens: Range<u64>,
    guest_state: Range<u64>,
    layers: Vec<(Range<u64>, Range<u64>)>,
    /// Version 3: the digests in the documented order (tokens, guest_state, then k, v per layer).
    digests: Vec<String>,
}

impl Header {
    fn checksum(&self) -> &str {
        self.meta.get("checksum").map_or("", String::as_str)
    }

    /// Version 3: whether the metadata hashes to the recorded checksum.
    fn check_meta_checksum(&self) -> Result<(), SnapshotError> {
        let computed = Checksum::new(self.meta.iter().map(|(k, v)| (k.as_str(), v.as_str()))).finish();
        if computed != self.checksum() {
            return Err(SnapshotError::Checksum { format: F, stored: self.checksum().to_string(), computed });
        }
        Ok(())
    }

    /// The digest of tensor `i` in the documented order.
    fn digest(&self, i: usize) -> &str {
        self.digests.get(i).map_or("", String::as_str)
    }

    fn kv_bytes(&self) -> u64 {
        self.layers.iter().map(|(k, v)| (k.end - k.start) + (v.end - v.start)).sum()
    }
}

fn digest_mismatch(tensor: String, stored: &str, computed: String) -> SnapshotError {
    SnapshotError::TensorChecksum { format: F, tensor, stored: stored.to_string(), computed }
}

fn tensor_name(i: usize) -> String {
    expected_name(i)
}

/// Reads the safetensors length prefix and checks it against the file's size (before anything is allocated
/// for the header).
fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, SnapshotError> {
    let Ok(bytes) = <[u8; 8]>::try_from(prefix) else {
        return Err(invalid(
            "safetensors header",
            format!("the file is {file_len} bytes, too short for the 8-byte header length"),
        ));
    };
    if bytes == crate::actor::MAGIC {
        return Err(invalid(
            "magic",
            "this is an actor snapshot (it starts with \"DWACTOR\\0\"), not a session snapshot",
        ));
    }
    let n = u64::from_le_bytes(bytes);
    let room = file_len - 8;
    if !(2..=MAX_HEADER_BYTES).contains(&n) || n > room {
        return Err(invalid(
            "safetensors header",
            format!("header length {n}, but it must be 2..={MAX_HEADER_BYTES} and fit in the {room} bytes after it"),
        ));
    }
    Ok(n)
}

/// Validates the JSON header of a file of `file_len` bytes whose header is `n` bytes long.
fn parse_header(json: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
    let data_start = 8 + json.len() as u64;
    let st_meta: Metadata = serde_json::from_slice(json).map_err(|e| invalid("safetensors header", e.to_string()))?;
    let described = data_start.saturating_add(st_meta.data_len() as u64);
    if described != file_len {
        let what = if file_len < described { "truncated" } else { "trailing bytes" };
        return Err(invalid(
            "safetensors header",
            format!("the header describes {described} bytes but the file is {file_len} bytes ({what})"),
        ));
    }

    let Some(raw_meta) = st_meta.metadata() else {
        return Err(invalid("__metadata__", "missing (not a Driftwood session snapshot)"));
    };
    let format = raw_meta.get("format").map(String::as_str);
    if format != Some(FORMAT_NAME) {
        return Err(invalid("format", format!("is {format:?}, expected {FORMAT_NAME:?}")));
    }
    let meta: BTreeMap<String, String> = raw_meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let get = |key: &str| meta.get(key).map_or("", String::as_str);
    let version = match get("version") {
        "2" => 2,
        "3" => 3,
        other => {
            return Err(invalid(
                "version",
                format!("unsupported version {other:?} (this reader understands {READ_VERSIONS:?})"),
            ));
        }
    };
    let keys: &[&str] = if version == 2 { &META_KEYS_V2 } else { &META_KEYS_V3 };
    if let Some(unknown) = meta.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(invalid("__metadata__", format!("unknown key {unknown:?}")));
    }
    if let Some(missing) = keys.iter().find(|k| !meta.contains_key(**k)) {
        return Err(invalid(*missing, "missing from __metadata__"));
    }
    let kv_dtype = match (version, KvDtype::from_name(get("dtype"))) {
        (2, Some(KvDtype::F32)) => KvDtype::F32,
        (3, Some(d)) => d,
        _ => {
            let allowed = if version == 2 { "\"f32\"" } else { "\"f32\" or \"bf16\"" };
            return Err(invalid("dtype", format!("is {:?}, expected {allowed}", get("dtype"))));
        }
    };
    if get("layout") != LAYOUT {
        return Err(invalid("layout", format!("is {:?}, expected {LAYOUT:?}", get("layout"))));
    }
    let dim = |key: &'static str, min: u64| -> Result<usize, SnapshotError> {
        parse_canonical_u64(get(key))
            .filter(|&v| v >= min)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| invalid(key, format!("{:?} is not a decimal integer ≥ {min}", get(key))))
    };
    let num_layers = dim("num_layers", 1)?;
    let kv_heads = dim("kv_heads", 1)?;
    let head_dim = dim("head_dim", 1)?;
    let n_tokens = dim("n_tokens", 0)?;
    if n_tokens > MAX_TOKENS {
        return Err(invalid("n_tokens", format!("{n_tokens} tokens, over the limit of {MAX_TOKENS}")));
    }
    let stored_sum = get("checksum");
    if !is_digest_hex(stored_sum) {
        return Err(invalid("checksum", format!("{stored_sum:?} is not 64 lowercase hex digits")));
    }

    // The tensor set: nothing unexpected, nothing missing.
    let infos = st_meta.tensors();
    let mut names: Vec<&String> = infos.keys().collect();
    names.sort();
    for name in &names {
        if classify(name, num_layers).is_none() {
            return Err(invalid("tensors", format!("unexpected tensor {name:?}")));
        }
    }
    let expected = num_layers.checked_mul(2).and_then(|x| x.checked_add(2));
    if expected != Some(infos.len()) {
        // Every present name is valid and distinct, so one of the first `len + 1` expected names is absent.
        let missing = (0..=infos.len()).map(expected_name).find(|n| !infos.contains_key(n));
        return Err(invalid(
            "tensors",
            format!(
                "missing tensor {:?} (num_layers {num_layers} needs {} tensors, the file has {})",
                missing.unwrap_or_default(),
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                infos.len()
            ),
        ));
    }

    let digests: Vec<String> = if version == 3 {
        let list: Vec<String> = get("digests").split(',').map(str::to_string).collect();
        if list.len() != infos.len() || !list.iter().all(|d| is_digest_hex(d)) {
            return Err(invalid(
                "digests",
                format!(
                    "must be {} comma-separated digests of 64 lowercase hex digits ({} entries found)",
                    infos.len(),
                    list.len()
                ),
            ));
        }
        list
    } else {
        Vec::new()
    };

    let kv_shape = [n_tokens, kv_heads, head_dim];
    let range_of = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Range<u64>, SnapshotError> {
        let info = infos.get(name).ok_or_else(|| invalid("tensors", format!("missing tensor {name:?}")))?;
        if info.dtype != dtype || info.shape != shape {
            return Err(invalid(
                format!("tensor {name}"),
                format!("is {:?} {:?}, but the metadata requires {dtype:?} {shape:?}", info.dtype, info.shape),
            ));
        }
        let (s, e) = info.data_offsets;
        Ok(data_start + s as u64..data_start + e as u64)
    };
    let tokens = range_of("tokens", Dtype::U32, &[n_tokens])?;
    let guest = infos.get("guest_state").ok_or_else(|| invalid("tensors", "missing tensor \"guest_state\""))?;
    let guest_state = match guest.shape.as_slice() {
        [m] => range_of("guest_state", Dtype::U8, &[*m])?,
        other => {
            return Err(invalid(
                "tensor guest_state",
                format!("is {:?} {other:?}, but must be one-dimensional U8", guest.dtype),
            ));
        }
    };
    let guest_len = guest_state.end - guest_state.start;
    if guest_len > MAX_GUEST_STATE_BYTES as u64 {
        return Err(SnapshotError::TooLarge {
            format: F,
            what: "guest_state",
            size: guest_len,
            limit: MAX_GUEST_STATE_BYTES as u64,
        });
    }
    let mut layers = Vec::with_capacity(num_layers);
    for i in 0..num_layers {
        let k = range_of(&format!("layers.{i}.k"), kv_dtype.safetensors(), &kv_shape)?;
        let v = range_of(&format!("layers.{i}.v"), kv_dtype.safetensors(), &kv_shape)?;
        layers.push((k, v));
    }
    Ok(Header {
        version,
        meta,
        num_layers,
        kv_heads,
        head_dim,
        n_tokens,
        kv_dtype,
        tokens,
        guest_state,
        layers,
        digests,
    })
}

fn check_expect(h: &Header, x: &SessionExpect) -> Result<(), SnapshotError> {
    for (what, key, loaded) in [
        ("model", "model_fingerprint", &x.model_fingerprint),
        ("tokenizer", "tokenizer_fingerprint", &x.tokenizer_fingerprint),
    ] {
        let snapshot = h.meta.get(key).map_or("", String::as_str);
        if snapshot != loaded {
            return Err(SnapshotError::FingerprintMismatch {
                what,
                snapshot: snapshot.to_string(),
                loaded: loaded.clone(),
            });
        }
    }
    for (field, snapshot, loaded) in [
        ("num_layers", h.num_layers, x.num_layers),
        ("kv_heads", h.kv_heads, x.kv_heads),
        ("head_dim", h.head_dim, x.head_dim),
    ] {
        if snapshot != loaded {
            return Err(SnapshotError::ShapeMismatch { field, snapshot: snapshot as u64, loaded: loaded as u64 });
        }
    }
    if h.n_tokens > x.max_tokens {
        return Err(SnapshotError::TooManyTokens { n_tokens: h.n_tokens as u64, max_tokens: x.max_tokens as u64 });
    }
    Ok(())
}

fn to_usize(r: &Range<u64>) -> Range<usize> {
    // Ranges come from a header validated against a buffer or file of that many bytes.
    r.start as usize..r.end as usize
}

fn tokens_from_le(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A session snapshot opened for restoring: header, sizes, tokens and guest state validated (and, for version 3,
/// the checksum and the digests of the tokens and guest state verified); the KV cache not read yet.
///
/// Memory use is bounded by what the header declares: the header itself (≤ [`MAX_HEADER_BYTES`]), the tokens
/// (≤ 4 × [`MAX_TOKENS`] bytes, and at most `max_tokens` of the [`SessionExpect`]) and the guest state
/// (≤ [`MAX_GUEST_STATE_BYTES`]). The KV cache goes straight into the caller's buffers.
pub struct SessionReader {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: Header,
    tokens: Vec<u32>,
    tokens_raw: Vec<u8>,
    guest_state: Vec<u8>,
}

impl fmt::Debug for SessionReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionReader")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("meta", &self.header.meta)
            .finish_non_exhaustive()
    }
}

impl SessionReader {
    /// Opens and validates the session snapshot at `path` without reading its KV cache (see the
    /// [module documentation](self) for the order of the checks). With `expect`, also checks that it fits the
    /// loaded model and session before reading any data.
    ///
    /// # Errors
    ///
    /// - [`SnapshotError::Io`] when the file cannot be opened or read;
    /// - [`SnapshotError::TooLarge`] when the file is over [`MAX_FILE_BYTES`] or its guest state over
    ///   [`MAX_GUEST_STATE_BYTES`];
    /// - [`SnapshotError::Invalid`]: `magic` for an actor snapshot, `safetensors header` when the header length
    ///   or the JSON is bad or the declared tensors do not account for the file's size exactly, and every
    ///   metadata and tensor check of [`parse_session`]; and
    ///   [`SnapshotError::TensorChecksum`] when a version-3 digest of the tokens or guest state does not match;
    /// - [`SnapshotError::Checksum`] when a version-3 file's metadata does not hash to its checksum;
    /// - with `expect`: [`SnapshotError::FingerprintMismatch`], [`SnapshotError::ShapeMismatch`],
    ///   [`SnapshotError::TooManyTokens`].
    pub fn open(path: &Path, expect: Option<&SessionExpect>) -> Result<SessionReader, SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io("opening", path, e))?;
        let file_len = file.metadata().map_err(|e| SnapshotError::io("reading metadata of", path, e))?.len();
        if file_len > MAX_FILE_BYTES {
            return Err(SnapshotError::TooLarge { format: F, what: "file", size: file_len, limit: MAX_FILE_BYTES });
        }
        let mut prefix = [0u8; 8];
        let got = if file_len >= 8 {
            read_exact_at(&file, &mut prefix, 0).map_err(|e| SnapshotError::io("reading", path, e))?;
            &prefix[..]
        } else {
            &prefix[..0]
        };
        let n = header_len(got, file_len)?;
        // `n ≤ MAX_HEADER_BYTES`, checked against the file's size.
        let mut json = vec![0u8; n as usize];
        read_exact_at(&file, &mut json, 8).map_err(|e| SnapshotError::io("reading", path, e))?;
        let header = parse_header(&json, file_len)?;
        drop(json);
        if header.version == 3 {
            header.check_meta_checksum()?;
        }
        if let Some(x) = expect {
            check_expect(&header, x)?;
        }
        let read = |r: &Range<u64>| -> Result<Vec<u8>, SnapshotError> {
            // Bounded: ≤ 4 × MAX_TOKENS and ≤ MAX_GUEST_STATE_BYTES, checked in `parse_header`.
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            read_exact_at(&file, &mut buf, r.start).map_err(|e| SnapshotError::io("reading", path, e))?;
            Ok(buf)
        };
        let tokens_raw = read(&header.tokens)?;
        let guest_state = read(&header.guest_state)?;
        if header.version == 3 {
            for (i, data) in [(0, &tokens_raw), (1, &guest_state)] {
                let computed = digest_hex(data);
                if computed != header.digest(i) {
                    return Err(digest_mismatch(tensor_name(i), header.digest(i), computed));
                }
            }
        }
        Ok(SessionReader {
            file,
            path: path.to_path_buf(),
            file_len,
            tokens: tokens_from_le(&tokens_raw),
            tokens_raw,
            guest_state,
            header,
        })
    }

    /// The format version of the file (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Number of cached positions.
    pub fn n_tokens(&self) -> usize {
        self.header.n_tokens
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.header.num_layers
    }

    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.header.kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.header.head_dim
    }

    /// The element type of the stored KV cache.
    pub fn kv_dtype(&self) -> KvDtype {
        self.header.kv_dtype
    }

    /// The token ids of the cached positions (`n_tokens` of them).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The actor's opaque state, as written.
    pub fn guest_state(&self) -> &[u8] {
        &self.guest_state
    }

    /// The file's metadata (all keys of the format, checksum included).
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.header.meta
    }

    /// Fingerprint of the model the snapshot was made with.
    pub fn model_fingerprint(&self) -> &str {
        self.header.meta.get("model_fingerprint").map_or("", String::as_str)
    }

    /// Fingerprint of the tokenizer the snapshot was made with.
    pub fn tokenizer_fingerprint(&self) -> &str {
        self.header.meta.get("tokenizer_fingerprint").map_or("", String::as_str)
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes of KV data stored in the file (every layer's k and v).
    pub fn kv_bytes(&self) -> u64 {
        self.header.kv_bytes()
    }

    /// Bytes of one layer's k (or v) once converted to `dtype`: `n_tokens * kv_heads * head_dim * dtype.size()`.
    pub fn layer_bytes(&self, dtype: KvDtype) -> usize {
        self.header.n_tokens * self.header.kv_heads * self.header.head_dim * dtype.size()
    }

    /// Reads the KV cache into `dst` (per layer, `(k, v)`, each exactly [`layer_bytes(dst_dtype)`](Self::layer_bytes)
    /// long, raw little-endian elements of `dst_dtype` laid out `[n_tokens][kv_heads][head_dim]`), converting
    /// from the file's dtype when it differs (f32 to bf16 rounds to nearest, ties to even), and verifies every
    /// checksum as it reads. Version-3 tensors are read and verified in parallel. On any error, every byte of
    /// `dst` is zeroed before returning, so a corrupted file never leaves its bytes in the destination.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::BadInput`] when `dst` has the wrong number of layers or a slice the wrong length (nothing
    /// is written then); [`SnapshotError::Io`] when reading fails (the file shrank, say);
    /// [`SnapshotError::TensorChecksum`] when a version-3 tensor does not match its digest;
    /// [`SnapshotError::Checksum`] when a version-2 file does not hash to its checksum.
    pub fn read_kv_into(self, dst_dtype: KvDtype, mut dst: Vec<(&mut [u8], &mut [u8])>) -> Result<(), SnapshotError> {
        let want = self.layer_bytes(dst_dtype);
        if dst.len() != self.header.num_layers {
            return Err(bad(
                "dst",
                format!("{} layers given but the snapshot has {}", dst.len(), self.header.num_layers),
            ));
        }
        for (i, (k, v)) in dst.iter().enumerate() {
            for (which, t) in [("k", k), ("v", v)] {
                if t.len() != want {
                    return Err(bad(
                        "dst",
                        format!(
                            "layer {i} {which} is {} bytes, expected {want} ({} tokens of {dst_dtype})",
                            t.len(),
                            self.header.n_tokens
                        ),
                    ));
                }
            }
        }
        let result = self.fill(dst_dtype, &mut dst);
        if result.is_err() {
            dst.par_iter_mut().for_each(|(k, v)| {
                k.fill(0);
                v.fill(0);
            });
        }
        result
    }

    fn fill(&self, dst_dtype: KvDtype, dst: &mut [(&mut [u8], &mut [u8])]) -> Result<(), SnapshotError> {
        let from = self.header.kv_dtype;
        let mut tasks: Vec<(usize, &Range<u64>, &mut [u8])> = Vec::with_capacity(2 * dst.len());
        for (l, ((k, v), (kr, vr))) in dst.iter_mut().zip(&self.header.layers).enumerate() {
            tasks.push((2 + 2 * l, kr, &mut **k));
            tasks.push((3 + 2 * l, vr, &mut **v));
        }
        if self.header.version == 3 {
            let results: Vec<Result<(), SnapshotError>> = tasks
                .into_par_iter()
                .map(|(i, range, out)| {
                    let mut hasher = blake3::Hasher::new();
                    self.stream(range, from, Some((out, dst_dtype)), |chunk| {
                        hasher.update(chunk);
                    })?;
                    let computed = hex(hasher.finalize().as_bytes());
                    if computed != self.header.digest(i) {
                        return Err(digest_mismatch(tensor_name(i), self.header.digest(i), computed));
                    }
                    Ok(())
                })
                .collect();
            results.into_iter().collect()
        } else {
            let mut sum = self.v2_checksum_start();
            for (_, range, out) in tasks {
                sum.0.update(&(range.end - range.start).to_le_bytes());
                self.stream(range, from, Some((out, dst_dtype)), |chunk| {
                    sum.0.update(chunk);
                })?;
            }
            self.v2_checksum_finish(sum)
        }
    }

    fn v2_checksum_start(&self) -> Checksum {
        let mut sum = Checksum::new(self.header.meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        sum.field(&self.tokens_raw);
        sum.field(&self.guest_state);
        sum
    }

    fn v2_checksum_finish(&self, sum: Checksum) -> Result<(), SnapshotError> {
        let computed = sum.finish();
        if computed != self.header.checksum() {
            return Err(SnapshotError::Checksum { format: F, stored: self.header.checksum().to_string(), computed });
        }
        Ok(())
    }

    /// Reads the file bytes of `range` chunk by chunk, hands each chunk to `hash` and, given a destination,
    /// stores it there converted from `from` to the destination's dtype.
    fn stream(
        &self,
        range: &Range<u64>,
        from: KvDtype,
        mut out: Option<(&mut [u8], KvDtype)>,
        mut hash: impl FnMut(&[u8]),
    ) -> Result<(), SnapshotError> {
        let len = (range.end - range.start) as usize;
        let same = out.as_ref().is_some_and(|(_, to)| *to == from);
        let mut buf = if same { Vec::new() } else { vec![0u8; CHUNK.min(len)] };
        let mut done = 0usize;
        while done < len {
            let n = CHUNK.min(len - done);
            let at = range.start + done as u64;
            match &mut out {
                Some((dst, _)) if same => {
                    let chunk = &mut dst[done..done + n];
                    read_exact_at(&self.file, chunk, at).map_err(|e| SnapshotError::io("reading", &self.path, e))?;
                    hash(chunk);
                }
                _ => {
                    let chunk = &mut buf[..n];
                    read_exact_at(&self.file, chunk, at).map_err(|e| SnapshotError::io("reading", &self.path, e))?;
                    hash(chunk);
                    if let Some((dst, to)) = &mut out {
                        let (a, b) = (done / from.size() * to.size(), (done + n) / from.size() * to.size());
                        convert(chunk, from, &mut dst[a..b], *to);
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Verifies the whole file without keeping its KV cache (for inspection): reads it in bounded chunks and
    /// checks every checksum.
    ///
    /// # Errors
    ///
    /// As for [`read_kv_into`](Self::read_kv_into), without the `dst` errors.
    pub fn verify(self) -> Result<(), SnapshotError> {
        let from = self.header.kv_dtype;
        let ranges: Vec<(usize, &Range<u64>)> =
            self.header.layers.iter().enumerate().flat_map(|(l, (k, v))| [(2 + 2 * l, k), (3 + 2 * l, v)]).collect();
        if self.header.version == 3 {
            ranges.into_par_iter().try_for_each(|(i, range)| {
                let mut hasher = blake3::Hasher::new();
                self.stream(range, from, None, |chunk| {
                    hasher.update(chunk);
                })?;
                let computed = hex(hasher.finalize().as_bytes());
                if computed != self.header.digest(i) {
                    return Err(digest_mismatch(tensor_name(i), self.header.digest(i), computed));
                }
                Ok(())
            })
        } else {
            let mut sum = self.v2_checksum_start();
            for (_, range) in ranges {
                sum.0.update(&(range.end - range.start).to_le_bytes());
                self.stream(range, from, None, |chunk| {
                    sum.0.update(chunk);
                })?;
            }
            self.v2_checksum_finish(sum)
        }
    }
}

/// Where a tensor's values are: in the file's bytes (aligned, little-endian host) or copied out.
#[derive(Debug)]
enum Slot<T> {
    InFile(Range<usize>),
    Copied(Vec<T>),
}

/// A validated session snapshot, owning the file's bytes. Tensors are served in place from those bytes when they
/// are suitably aligned, and from an aligned copy otherwise.
pub struct SessionFile {
    bytes: Vec<u8>,
    header: Header,
    tokens: Slot<u32>,
    guest_state: Range<usize>,
    /// The KV cache as f32 (converted from bf16 files).
    layers: Vec<(Slot<f32>, Slot<f32>)>,
}

impl fmt::Debug for SessionFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFile")
            .field("file_len", &self.bytes.len())
            .field("meta", &self.header.meta)
            .field("guest_state_len", &self.guest_state.len())
            .finish_non_exhaustive()
    }
}

impl SessionFile {
    /// The token ids of the cached positions (`n_tokens` of them).
    pub fn tokens(&self) -> &[u32] {
        self.slot(&self.tokens)
    }

    /// The actor's opaque state, as written.
    pub fn guest_state(&self) -> &[u8] {
        &self.bytes[self.guest_state.clone()]
    }

    /// Keys of `layer` as f32 (converted exactly from a bf16 file), `n_tokens * kv_heads * head_dim` values laid
    /// out `[n_tokens][kv_heads][head_dim]`.
    ///
    /// # Panics
    ///
    /// If `layer >= self.num_layers()`.
    pub fn k(&self, layer: usize) -> &[f32] {
        self.slot(&self.layers[layer].0)
    }

    /// Values of `layer`, laid out like [`SessionFile::k`].
    ///
    /// # Panics
    ///
    /// If `layer >= self.num_layers()`.
    pub fn v(&self, layer: usize) -> &[f32] {
        self.slot(&self.layers[layer].1)
    }

    /// The stored bytes of `layer`'s keys: little-endian elements of [`kv_dtype`](Self::kv_dtype).
    ///
    /// # Panics
    ///
    /// If `layer >= self.num_layers()`.
    pub fn k_bytes(&self, layer: usize) -> &[u8] {
        &self.bytes[to_usize(&self.header.layers[layer].0)]
    }

    /// The stored bytes of `layer`'s values, like [`SessionFile::k_bytes`].
    ///
    /// # Panics
    ///
    /// If `layer >= self.num_layers()`.
    pub fn v_bytes(&self, layer: usize) -> &[u8] {
        &self.bytes[to_usize(&self.header.layers[layer].1)]
    }

    /// The element type of the stored KV cache.
    pub fn kv_dtype(&self) -> KvDtype {
        self.header.kv_dtype
    }

    /// The format version of the file (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The file's metadata (all keys of the format, checksum included).
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.header.meta
    }

    /// Number of cached positions.
    pub fn n_tokens(&self) -> usize {
        self.header.n_tokens
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.header.num_layers
    }

    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.header.kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.header.head_dim
    }

    /// Fingerprint of the model the snapshot was made with.
    pub fn model_fingerprint(&self) -> &str {
        self.header.meta.get("model_fingerprint").map_or("", String::as_str)
    }

    /// Fingerprint of the tokenizer the snapshot was made with.
    pub fn tokenizer_fingerprint(&self) -> &str {
        self.header.meta.get("tokenizer_fingerprint").map_or("", String::as_str)
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn slot<'s, T: bytemuck::Pod>(&'s self, slot: &'s Slot<T>) -> &'s [T] {
        match slot {
            // Alignment and length were checked when the slot was made; the bytes never move.
            Slot::InFile(r) => bytemuck::cast_slice(&self.bytes[r.clone()]),
            Slot::Copied(v) => v,
        }
    }
}

/// Reads and validates the session snapshot at `path`, holding the whole file in memory. With `expect`, also
/// checks that it fits the loaded model and session; with `None`, it is only inspected (structure and checksums
/// are still fully validated). The header, the file's size and `expect` are checked (by [`SessionReader::open`])
/// before the file is read, so the memory used is what a valid file of the declared shape needs.
///
/// # Errors
///
/// Every error of [`SessionReader::open`] and of [`parse_session`].
pub fn read_session(path: &Path, expect: Option<&SessionExpect>) -> Result<SessionFile, SnapshotError> {
    let reader = SessionReader::open(path, expect)?;
    // The length was checked against MAX_FILE_BYTES and against what the header declares.
    let mut bytes = vec![0u8; reader.file_len as usize];
    read_exact_at(&reader.file, &mut bytes, 0).map_err(|e| SnapshotError::io("reading", path, e))?;
    parse_session(bytes, expect)
}

/// Validates a session snapshot held in memory and takes ownership of its bytes (see [`read_session`]).
///
/// # Errors
///
/// - [`SnapshotError::TooLarge`] over [`MAX_FILE_BYTES`], or a guest state over [`MAX_GUEST_STATE_BYTES`];
/// - [`SnapshotError::Invalid`] naming the field, when the safetensors header does not parse or its offsets do
///   not cover the data exactly, the file is an actor snapshot (`magic`), `__metadata__` is missing, a metadata
///   key is missing or unknown, `format`, `version`, `dtype` or `layout` is not this format's, a dimension is not
///   a canonical decimal or is 0, `n_tokens` is over [`MAX_TOKENS`], the `checksum` or `digests` are malformed,
///   a tensor is missing or unexpected, or a tensor's dtype or shape disagrees with the metadata;
/// - [`SnapshotError::TensorChecksum`] when a version-3 tensor does not match its digest;
/// - [`SnapshotError::Checksum`] when the metadata (version 3) or the contents (version 2) do not hash to the
///   recorded checksum;
/// - with `expect`: [`SnapshotError::FingerprintMismatch`] (model, then tokenizer),
///   [`SnapshotError::ShapeMismatch`] (`num_layers`, `kv_heads`, `head_dim`) and
///   [`SnapshotError::TooManyTokens`].
pub fn parse_session(bytes: Vec<u8>, expect: Option<&SessionExpect>) -> Result<SessionFile, SnapshotError> {
    let file_len = bytes.len() as u64;
    if file_len > MAX_FILE_BYTES {
        return Err(SnapshotError::TooLarge { format: F, what: "file", size: file_len, limit: MAX_FILE_BYTES });
    }
    let n = header_len(&bytes[..bytes.len().min(8)], file_len)?;
    let header = parse_header(&bytes[8..8 + n as usize], file_len)?;

    let tokens_range = to_usize(&header.tokens);
    let guest_range = to_usize(&header.guest_state);
    if header.version == 3 {
        header.check_meta_checksum()?;
        let mut order: Vec<Range<usize>> = vec![tokens_range.clone(), guest_range.clone()];
        for (k, v) in &header.layers {
            order.push(to_usize(k));
            order.push(to_usize(v));
        }
        order.into_par_iter().enumerate().try_for_each(|(i, r)| {
            let computed = digest_hex(&bytes[r]);
            if computed != header.digest(i) {
                return Err(digest_mismatch(tensor_name(i), header.digest(i), computed));
            }
            Ok(())
        })?;
    } else {
        let mut sum = Checksum::new(header.meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        sum.field(&bytes[tokens_range.clone()]);
        sum.field(&bytes[guest_range.clone()]);
        for (k, v) in &header.layers {
            sum.field(&bytes[to_usize(k)]);
            sum.field(&bytes[to_usize(v)]);
        }
        let computed = sum.finish();
        if computed != header.checksum() {
            return Err(SnapshotError::Checksum { format: F, stored: header.checksum().to_string(), computed });
        }
    }

    if let Some(x) = expect {
        check_expect(&header, x)?;
    }

    let tokens = slot(&bytes, tokens_range, u32::from_le_bytes);
    let layers = header
        .layers
        .iter()
        .map(|(k, v)| (kv_slot(&bytes, to_usize(k), header.kv_dtype), kv_slot(&bytes, to_usize(v), header.kv_dtype)))
        .collect();
    Ok(SessionFile { bytes, header, tokens, guest_state: guest_range, layers })
}

fn kv_slot(bytes: &[u8], range: Range<usize>, dtype: KvDtype) -> Slot<f32> {
    match dtype {
        KvDtype::F32 => slot(bytes, range, f32::from_le_bytes),
        KvDtype::Bf16 => Slot::Copied(
            bytes[range]
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
        ),
    }
}

/// Serves a 4-byte tensor in place when the bytes are aligned and the host is little-endian, else copies it.
fn slot<T: bytemuck::Pod>(bytes: &[u8], range: Range<usize>, from_le: fn([u8; 4]) -> T) -> Slot<T> {
    let data = &bytes[range.clone()];
    if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, T>(data).is_ok() {
        return Slot::InFile(range);
    }
    Slot::Copied(data.chunks_exact(4).map(|c| from_le([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        let r = |x: f32| f32_to_bf16(x.to_bits());
        assert_eq!(r(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(r(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties to even (up).
        assert_eq!(r(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(r(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(r(f32::MAX), 0x7f80, "overflows to infinity");
        assert_eq!(r(f32::INFINITY), 0x7f80);
        assert_eq!(r(f32::NEG_INFINITY), 0xff80);
        assert_eq!(r(-0.0), 0x8000);
        let nan = r(f32::from_bits(0x7f80_0001));
        assert!(nan & 0x7f80 == 0x7f80 && nan & 0x7f != 0, "a NaN stays NaN: {nan:#x}");
    }

    #[test]
    fn conversion_widens_exactly() {
        let src: Vec<u8> = [0x3f80u16, 0xc040, 0x0001].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut dst = vec![0u8; 12];
        convert(&src, KvDtype::Bf16, &mut dst, KvDtype::F32);
        let back: Vec<f32> = dst.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -3.0);
        assert_eq!(back[2].to_bits(), 0x0001_0000);
    }
}
