//! The portable session snapshot: an actor's KV cache, its tokens and its own opaque state, as a
//! [safetensors](https://github.com/huggingface/safetensors) file that any safetensors reader opens.
//!
//! # Format, version 2
//!
//! A standard safetensors file: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON header, then
//! the tensor data. In files this crate writes, the header is padded with spaces (`0x20`) to a multiple of 8
//! bytes, so the data starts 8-byte aligned, and the data is laid out in this order with no gaps:
//!
//! | tensor | dtype | shape | contents |
//! |---|---|---|---|
//! | `layers.{i}.k`, `layers.{i}.v` for `i` in `0..num_layers` (k then v per layer) | `F32` | `[n_tokens, kv_heads, head_dim]` | keys (after RoPE) / values of the first `n_tokens` positions |
//! | `tokens` | `U32` | `[n_tokens]` | the token ids those positions hold |
//! | `guest_state` | `U8` | `[m]` (`m` may be 0) | opaque bytes from the actor (e.g. its sampler state) |
//!
//! All numbers are little-endian, row-major (C order). Exactly these `2 * num_layers + 2` tensors are present.
//! A reader must not rely on the data order or the padding: it must use the `data_offsets` of the header (this
//! reader does; if a foreign writer leaves f32 data misaligned in memory, that tensor is copied to an aligned
//! buffer).
//!
//! The header's `__metadata__` holds exactly these string keys, all required, no others:
//!
//! | key | value |
//! |---|---|
//! | `format` | `driftwood-session` |
//! | `version` | `1` |
//! | `model_fingerprint` | the model's fingerprint (opaque string; Driftwood uses hex SHA-256) |
//! | `tokenizer_fingerprint` | the tokenizer's fingerprint (opaque string) |
//! | `dtype` | `f32` (the dtype of the `layers.*` tensors) |
//! | `layout` | `(tokens, kv_heads, head_dim) per layer; keys after RoPE` |
//! | `num_layers`, `kv_heads`, `head_dim` | canonical decimal (ASCII digits, no sign, no leading zero), each ≥ 1 |
//! | `n_tokens` | canonical decimal, ≥ 0 |
//! | `checksum` | 64 lowercase hex digits: BLAKE3 (32-byte output) as defined below |
//!
//! **Checksum.** BLAKE3 over, in this order:
//! 1. every metadata entry except `checksum`, in ascending byte order of the keys, each as
//!    `u64le(len(key)) ‖ key ‖ u64le(len(value)) ‖ value` (UTF-8 bytes);
//! 2. the raw little-endian data of `tokens`, `guest_state`, `layers.0.k`, `layers.0.v`, `layers.1.k`, … each as
//!    `u64le(len(data)) ‖ data`.
//!
//! So the checksum covers every value a reader uses; what it does not cover (the JSON's spelling, key order,
//! whitespace, `data_offsets`) is checked structurally instead.
//!
//! **Validation on read** ([`read_session`], [`parse_session`]): the file is at most [`MAX_FILE_BYTES`]; the
//! safetensors header parses and its offsets cover the data exactly; the metadata keys and values are as above;
//! the tensor set is exact; every tensor's dtype and shape agree with the metadata; the checksum matches; and,
//! given a [`SessionExpect`], the fingerprints, `num_layers`, `kv_heads`, `head_dim` equal the loaded model's and
//! `n_tokens ≤ max_tokens`. Any failure is an error naming the field; nothing panics.
//!
//! Python (`pip install safetensors numpy`):
//! ```python
//! from safetensors import safe_open
//! with safe_open("chat.dws", framework="numpy") as f:
//!     meta = f.metadata(); k0 = f.get_tensor("layers.0.k")   # shape (n_tokens, kv_heads, head_dim)
//! ```

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::Range;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::atomic::{Staged, stage_atomic};
use crate::error::{Format, SnapshotError};
use crate::util::{hex, is_digest_hex, le_bytes_f32, le_bytes_u32, parse_canonical_u64, read_capped};

/// Value of the `format` metadata key.
pub const FORMAT_NAME: &str = "driftwood-session";
/// The format version this crate writes and reads (`version` metadata key).
pub const FORMAT_VERSION: u32 = 2;
/// Value of the `layout` metadata key.
pub const LAYOUT: &str = "(tokens, kv_heads, head_dim) per layer; keys after RoPE";
/// Largest session snapshot file written or read (64 GiB).
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// safetensors' own limit on the JSON header.
const MAX_HEADER_BYTES: usize = 100_000_000;

const F: Format = Format::Session;

/// The metadata keys of version 2, in ascending order.
const META_KEYS: [&str; 11] = [
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
    /// The token ids of the cached positions; `n_tokens = tokens.len()`.
    pub tokens: &'a [u32],
    /// Opaque bytes from the actor (e.g. its sampler RNG state); may be empty.
    pub guest_state: &'a [u8],
    /// Per layer, `(k, v)`, each `n_tokens * kv_heads * head_dim` values laid out `[n_tokens][kv_heads][head_dim]`.
    pub layers: Vec<(&'a [f32], &'a [f32])>,
}

impl SessionSnapshot<'_> {
    /// Bytes of data the snapshot refers to (KV values, tokens, guest state), not counting the header.
    pub fn data_bytes(&self) -> usize {
        let kv: usize = self.layers.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum();
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
    tokens: Vec<u32>,
    guest_state: Vec<u8>,
    /// Per layer, the lengths of k and v in `kv`.
    layer_lens: Vec<(usize, usize)>,
    /// Every layer's k then v, in layer order.
    kv: Vec<f32>,
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
            tokens: &self.tokens,
            guest_state: &self.guest_state,
            layers,
        }
    }
}

impl std::fmt::Debug for OwnedSessionSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}

impl std::fmt::Debug for SessionSnapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The KV cache can be gigabytes: show its shape, not its values.
        f.debug_struct("SessionSnapshot")
            .field("model_fingerprint", &self.model_fingerprint)
            .field("tokenizer_fingerprint", &self.tokenizer_fingerprint)
            .field("num_layers", &self.num_layers)
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("n_tokens", &self.tokens.len())
            .field("guest_state_len", &self.guest_state.len())
            .finish_non_exhaustive()
    }
}

/// What the loaded model requires of a snapshot before it is restored (see [`read_session`]).
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
    let elems = n_tokens
        .checked_mul(s.kv_heads)
        .and_then(|x| x.checked_mul(s.head_dim))
        .filter(|x| x.checked_mul(4).is_some())
        .ok_or_else(|| bad("layers", "n_tokens * kv_heads * head_dim overflows"))?;
    for (i, (k, v)) in s.layers.iter().enumerate() {
        for (which, t) in [("k", k), ("v", v)] {
            if t.len() != elems {
                return Err(bad(
                    "layers",
                    format!(
                        "layer {i} {which} has {} values, expected {elems} (n_tokens {n_tokens} × kv_heads {} × head_dim {})",
                        t.len(),
                        s.kv_heads,
                        s.head_dim
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
        ("dtype", "f32".to_string()),
        ("layout", LAYOUT.to_string()),
        ("num_layers", s.num_layers.to_string()),
        ("kv_heads", s.kv_heads.to_string()),
        ("head_dim", s.head_dim.to_string()),
        ("n_tokens", n_tokens.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let mut sum = Checksum::new(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    sum.field(&le_bytes_u32(s.tokens));
    sum.field(s.guest_state);
    for (k, v) in &s.layers {
        sum.field(&le_bytes_f32(k));
        sum.field(&le_bytes_f32(v));
    }
    meta.insert("checksum".to_string(), sum.finish());

    let layer_bytes = elems * 4;
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
        push(format!("layers.{i}.k"), Dtype::F32, kv_shape.clone(), layer_bytes)?;
        push(format!("layers.{i}.v"), Dtype::F32, kv_shape.clone(), layer_bytes)?;
    }
    push("tokens".to_string(), Dtype::U32, vec![n_tokens], n_tokens * 4)?;
    push("guest_state".to_string(), Dtype::U8, vec![s.guest_state.len()], s.guest_state.len())?;

    let mut json = serde_json::to_vec(&HeaderJson { meta: &meta, tensors: &tensors })
        .map_err(|e| bad("metadata", format!("cannot serialize the header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_HEADER_BYTES {
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
        w.write_all(&le_bytes_f32(k))?;
        w.write_all(&le_bytes_f32(v))?;
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
/// `num_layers`, a layer's `k` or `v` has the wrong length, or the file would exceed [`MAX_FILE_BYTES`];
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
    meta: BTreeMap<String, String>,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    n_tokens: usize,
    tokens: Slot<u32>,
    guest_state: Range<usize>,
    layers: Vec<(Slot<f32>, Slot<f32>)>,
}

impl std::fmt::Debug for SessionFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionFile")
            .field("file_len", &self.bytes.len())
            .field("meta", &self.meta)
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

    /// Keys of `layer`, `n_tokens * kv_heads * head_dim` values laid out `[n_tokens][kv_heads][head_dim]`.
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

    /// The file's metadata (all keys of the format, checksum included).
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.meta
    }

    /// Number of cached positions.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Fingerprint of the model the snapshot was made with.
    pub fn model_fingerprint(&self) -> &str {
        self.meta.get("model_fingerprint").map_or("", String::as_str)
    }

    /// Fingerprint of the tokenizer the snapshot was made with.
    pub fn tokenizer_fingerprint(&self) -> &str {
        self.meta.get("tokenizer_fingerprint").map_or("", String::as_str)
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

/// Reads and validates the session snapshot at `path`. With `expect`, also checks that it fits the loaded model
/// and session; with `None`, it is only inspected (structure and checksum are still fully validated).
///
/// # Errors
///
/// [`SnapshotError::Io`] when the file cannot be read; [`SnapshotError::TooLarge`] over [`MAX_FILE_BYTES`]; and
/// every error of [`parse_session`].
pub fn read_session(path: &Path, expect: Option<&SessionExpect>) -> Result<SessionFile, SnapshotError> {
    parse_session(read_capped(path, MAX_FILE_BYTES, F)?, expect)
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

/// Validates a session snapshot held in memory and takes ownership of its bytes (see [`read_session`]).
///
/// # Errors
///
/// - [`SnapshotError::TooLarge`] over [`MAX_FILE_BYTES`];
/// - [`SnapshotError::Invalid`] naming the field, when the safetensors header does not parse or its offsets do
///   not cover the data exactly, `__metadata__` is missing, a metadata key is missing or unknown, `format`,
///   `version`, `dtype` or `layout` is not this format's, a dimension is not a canonical decimal or is 0, the
///   `checksum` is not 64 lowercase hex digits, a tensor is missing or unexpected, or a tensor's dtype or shape
///   disagrees with the metadata;
/// - [`SnapshotError::Checksum`] when the contents do not hash to the recorded checksum;
/// - with `expect`: [`SnapshotError::FingerprintMismatch`] (model, then tokenizer),
///   [`SnapshotError::ShapeMismatch`] (`num_layers`, `kv_heads`, `head_dim`) and
///   [`SnapshotError::TooManyTokens`].
pub fn parse_session(bytes: Vec<u8>, expect: Option<&SessionExpect>) -> Result<SessionFile, SnapshotError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(SnapshotError::TooLarge {
            format: F,
            what: "file",
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let (header_len, st_meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| invalid("safetensors header", e.to_string()))?;
    let data_start = 8 + header_len;

    let Some(raw_meta) = st_meta.metadata() else {
        return Err(invalid("__metadata__", "missing (not a Driftwood session snapshot)"));
    };
    let format = raw_meta.get("format").map(String::as_str);
    if format != Some(FORMAT_NAME) {
        return Err(invalid("format", format!("is {format:?}, expected {FORMAT_NAME:?}")));
    }
    let meta: BTreeMap<String, String> = raw_meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(unknown) = meta.keys().find(|k| !META_KEYS.contains(&k.as_str())) {
        return Err(invalid("__metadata__", format!("unknown key {unknown:?}")));
    }
    if let Some(missing) = META_KEYS.iter().find(|k| !meta.contains_key(**k)) {
        return Err(invalid(*missing, "missing from __metadata__"));
    }
    let get = |key: &str| meta.get(key).map_or("", String::as_str);
    if get("version") != FORMAT_VERSION.to_string() {
        return Err(invalid(
            "version",
            format!("unsupported version {:?} (this reader understands {FORMAT_VERSION})", get("version")),
        ));
    }
    if get("dtype") != "f32" {
        return Err(invalid("dtype", format!("is {:?}, expected \"f32\"", get("dtype"))));
    }
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

    let kv_shape = [n_tokens, kv_heads, head_dim];
    let range_of = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Range<usize>, SnapshotError> {
        let info = infos.get(name).ok_or_else(|| invalid("tensors", format!("missing tensor {name:?}")))?;
        if info.dtype != dtype || info.shape != shape {
            return Err(invalid(
                format!("tensor {name}"),
                format!("is {:?} {:?}, but the metadata requires {dtype:?} {shape:?}", info.dtype, info.shape),
            ));
        }
        let (s, e) = info.data_offsets;
        Ok(data_start + s..data_start + e)
    };
    let tokens_range = range_of("tokens", Dtype::U32, &[n_tokens])?;
    let guest = infos.get("guest_state").ok_or_else(|| invalid("tensors", "missing tensor \"guest_state\""))?;
    let guest_range = match guest.shape.as_slice() {
        [m] => range_of("guest_state", Dtype::U8, &[*m])?,
        other => {
            return Err(invalid(
                "tensor guest_state",
                format!("is {:?} {other:?}, but must be one-dimensional U8", guest.dtype),
            ));
        }
    };
    let mut layer_ranges = Vec::with_capacity(num_layers);
    for i in 0..num_layers {
        let k = range_of(&format!("layers.{i}.k"), Dtype::F32, &kv_shape)?;
        let v = range_of(&format!("layers.{i}.v"), Dtype::F32, &kv_shape)?;
        layer_ranges.push((k, v));
    }

    let mut sum = Checksum::new(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    sum.field(&bytes[tokens_range.clone()]);
    sum.field(&bytes[guest_range.clone()]);
    for (k, v) in &layer_ranges {
        sum.field(&bytes[k.clone()]);
        sum.field(&bytes[v.clone()]);
    }
    let computed = sum.finish();
    if computed != stored_sum {
        return Err(SnapshotError::Checksum { format: F, stored: stored_sum.to_string(), computed });
    }

    if let Some(x) = expect {
        check_expect(&meta, [num_layers, kv_heads, head_dim], n_tokens, x)?;
    }

    let tokens = slot(&bytes, tokens_range, u32::from_le_bytes);
    let layers = layer_ranges
        .into_iter()
        .map(|(k, v)| (slot(&bytes, k, f32::from_le_bytes), slot(&bytes, v, f32::from_le_bytes)))
        .collect();
    Ok(SessionFile { bytes, meta, num_layers, kv_heads, head_dim, n_tokens, tokens, guest_state: guest_range, layers })
}

fn check_expect(
    meta: &BTreeMap<String, String>,
    dims: [usize; 3],
    n_tokens: usize,
    x: &SessionExpect,
) -> Result<(), SnapshotError> {
    for (what, key, loaded) in [
        ("model", "model_fingerprint", &x.model_fingerprint),
        ("tokenizer", "tokenizer_fingerprint", &x.tokenizer_fingerprint),
    ] {
        let snapshot = meta.get(key).map_or("", String::as_str);
        if snapshot != loaded {
            return Err(SnapshotError::FingerprintMismatch {
                what,
                snapshot: snapshot.to_string(),
                loaded: loaded.clone(),
            });
        }
    }
    for (field, snapshot, loaded) in
        [("num_layers", dims[0], x.num_layers), ("kv_heads", dims[1], x.kv_heads), ("head_dim", dims[2], x.head_dim)]
    {
        if snapshot != loaded {
            return Err(SnapshotError::ShapeMismatch { field, snapshot: snapshot as u64, loaded: loaded as u64 });
        }
    }
    if n_tokens > x.max_tokens {
        return Err(SnapshotError::TooManyTokens { n_tokens: n_tokens as u64, max_tokens: x.max_tokens as u64 });
    }
    Ok(())
}

/// Serves a 4-byte tensor in place when the bytes are aligned and the host is little-endian, else copies it.
fn slot<T: bytemuck::Pod>(bytes: &[u8], range: Range<usize>, from_le: fn([u8; 4]) -> T) -> Slot<T> {
    let data = &bytes[range.clone()];
    if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, T>(data).is_ok() {
        return Slot::InFile(range);
    }
    Slot::Copied(data.chunks_exact(4).map(|c| from_le([c[0], c[1], c[2], c[3]])).collect())
}
