//! The whole-actor snapshot, for migration: everything needed to rebuild an actor in a fresh wasmtime `Store`
//! in another process or on another machine — its linear memory (non-zero pages only), its globals, the models
//! its host-side handles refer to, and free-form metadata — in a small binary format of our own.
//!
//! # Format, version 2
//!
//! All integers are little-endian. Offsets in bytes.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `DWACTOR\0` (`44 57 41 43 54 4f 52 00`) |
//! | 8 | 4 | format version, u32 = 2 |
//! | 12 | 8 | header length `H`, u64, `2 ≤ H ≤ 16 MiB` ([`MAX_HEADER_BYTES`]) |
//! | 20 | 32 | BLAKE3 (32-byte output) of every byte from offset 52 to the end of the file |
//! | 52 | `H` | header: a UTF-8 JSON object (below) |
//! | 52 + `H` | 4·`P` | page index: `P` u32 page numbers, strictly increasing, each `< memory_size / 4096` |
//! | 52 + `H` + 4·`P` | 4096·`P` | page data: the 4096 bytes of each listed page, in index order |
//!
//! The file ends right after the page data: its length is exactly `52 + H + 4100·P`. Memory byte `o` of the actor
//! is byte `o % 4096` of page `o / 4096` if that page is listed, else 0. Writers list only pages with a non-zero
//! byte (this crate does); readers accept a listed all-zero page.
//!
//! The header object has exactly these members (unknown or duplicate members are refused):
//!
//! | member | JSON type | meaning |
//! |---|---|---|
//! | `module_digest` | string | SHA-256 of the module's wasm bytes, 64 lowercase hex digits |
//! | `abi_version` | integer (u32) | the host ABI version the module was instantiated with |
//! | `memory_size` | integer (u64) | linear memory size in bytes, a multiple of 65536 (the wasm page) |
//! | `page_size` | integer | 4096, the granularity of the page index |
//! | `pages` | integer | `P`, the number of stored pages, `≤ memory_size / 4096` |
//! | `globals` | array of `{"name": string, "type": "i32"\|"i64"\|"f32"\|"f64", "bits": integer}` | the module's globals; names unique; `bits` is the value's bit pattern as an unsigned integer (two's complement for integers, IEEE 754 for floats, so NaN payloads survive), `< 2^32` for 32-bit types |
//! | `models` | array of `{"name", "model_fingerprint", "tokenizer_fingerprint"}` (strings) | the host-side model handles, in handle order |
//! | `metadata` | object of strings | free-form, no duplicate keys |
//!
//! **Validation on read** ([`read_actor`], [`parse_actor`]), in this order, each failure an error naming the
//! field: file size within what [`ActorLimits`] allows, magic, version, header length bounds, JSON (UTF-8,
//! members, types), `page_size`, `module_digest`, `memory_size` (multiple of 65536, `≤ max_memory`), `pages`,
//! the exact file length, the checksum, the globals, and the page index. No allocation is sized by a number read
//! from the file before that number has been checked against the file's actual size (taken from the file system
//! before anything else is read), and the largest file accepted follows from the limits.
//!
//! **Restoring** ([`ActorReader`]) reads only the fixed header, the JSON header and the page index, validates
//! them (everything above but the checksum), then streams the stored pages from the file straight into the
//! target memory, verifying the checksum as it reads: pages not stored are not written when the target is
//! known to be zero (fresh memory), so resident memory after a restore follows the stored pages, not
//! `memory_size`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::error::{Format, SnapshotError};
use crate::util::{hex, is_digest_hex, read_exact_at};

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"DWACTOR\0";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed header (magic, version, header length, checksum).
pub const FIXED_HEADER_BYTES: usize = 52;
/// Largest JSON header accepted (16 MiB).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Granularity of the page index.
pub const PAGE_SIZE: usize = 4096;
/// The WebAssembly page: `memory_size` is a multiple of it.
pub const WASM_PAGE_SIZE: u64 = 65536;

const F: Format = Format::Actor;

/// The value of a global, by type. Floats are held as their bit patterns so that every value, NaN payloads
/// included, round-trips exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GlobalValue {
    /// An `i32` global.
    I32(i32),
    /// An `i64` global.
    I64(i64),
    /// An `f32` global, as `f32::to_bits`.
    F32(u32),
    /// An `f64` global, as `f64::to_bits`.
    F64(u64),
}

impl GlobalValue {
    /// An `f32` global holding `x`.
    pub fn from_f32(x: f32) -> Self {
        GlobalValue::F32(x.to_bits())
    }

    /// An `f64` global holding `x`.
    pub fn from_f64(x: f64) -> Self {
        GlobalValue::F64(x.to_bits())
    }

    fn to_json(self) -> (GlobalType, u64) {
        match self {
            GlobalValue::I32(v) => (GlobalType::I32, u64::from(v as u32)),
            GlobalValue::I64(v) => (GlobalType::I64, v as u64),
            GlobalValue::F32(bits) => (GlobalType::F32, u64::from(bits)),
            GlobalValue::F64(bits) => (GlobalType::F64, bits),
        }
    }

    fn from_json(ty: GlobalType, bits: u64) -> Option<Self> {
        Some(match ty {
            GlobalType::I32 => GlobalValue::I32(u32::try_from(bits).ok()? as i32),
            GlobalType::I64 => GlobalValue::I64(bits as i64),
            GlobalType::F32 => GlobalValue::F32(u32::try_from(bits).ok()?),
            GlobalType::F64 => GlobalValue::F64(bits),
        })
    }
}

/// A host-side model handle of the actor: which model and tokenizer it must be re-opened with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// The name the actor opened the model by.
    pub name: String,
    /// Fingerprint of the model's weights.
    pub model_fingerprint: String,
    /// Fingerprint of its tokenizer.
    pub tokenizer_fingerprint: String,
}

/// Everything about an actor except its memory's contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActorImage {
    /// SHA-256 of the module's wasm bytes, 64 lowercase hex digits.
    pub module_digest: String,
    /// The host ABI version the module was instantiated with.
    pub abi_version: u32,
    /// Linear memory size in bytes; a multiple of 65536.
    pub memory_size: u64,
    /// The module's globals, by name (unique).
    pub globals: Vec<(String, GlobalValue)>,
    /// The host-side model handles, in handle order.
    pub models: Vec<ModelRef>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

/// What [`write_actor`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorWriteStats {
    /// Bytes written (the file's size).
    pub bytes: u64,
    /// Non-zero 4 KiB pages stored.
    pub pages_written: u64,
    /// 4 KiB pages in the memory (`memory_size / 4096`).
    pub pages_total: u64,
}

/// Limits applied when reading an actor snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorLimits {
    /// Largest `memory_size` accepted, in bytes.
    pub max_memory: u64,
}

impl Default for ActorLimits {
    /// 4 GiB, the most a 32-bit WebAssembly memory can have.
    fn default() -> Self {
        ActorLimits { max_memory: 4 << 30 }
    }
}

impl ActorLimits {
    /// The largest file these limits can allow: fixed header, largest JSON header, every page stored.
    pub fn max_file_bytes(&self) -> u64 {
        let pages = self.max_memory / PAGE_SIZE as u64;
        (FIXED_HEADER_BYTES as u64 + MAX_HEADER_BYTES).saturating_add(pages.saturating_mul(PAGE_SIZE as u64 + 4))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum GlobalType {
    #[serde(rename = "i32")]
    I32,
    #[serde(rename = "i64")]
    I64,
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "f64")]
    F64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalJson {
    name: String,
    #[serde(rename = "type")]
    ty: GlobalType,
    bits: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    module_digest: String,
    abi_version: u32,
    memory_size: u64,
    page_size: u64,
    pages: u64,
    globals: Vec<GlobalJson>,
    models: Vec<ModelRef>,
    #[serde(deserialize_with = "unique_map")]
    metadata: BTreeMap<String, String>,
}

/// A string map that refuses duplicate keys (serde's `BTreeMap` keeps the last one silently).
fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = BTreeMap::new();
            while let Some((k, v)) = access.next_entry::<String, String>()? {
                if map.contains_key(&k) {
                    return Err(A::Error::custom(format!("duplicate metadata key {k:?}")));
                }
                map.insert(k, v);
            }
            Ok(map)
        }
    }
    d.deserialize_map(V)
}

/// Bytes of one range of an actor's memory that a snapshot takes from elsewhere than the memory itself: a copy
/// the caller made of them (a device's copy of a KV cache, say), so that the writer never reads that range of
/// the memory. Bytes of `range` outside every piece are written as zero.
#[derive(Clone, Debug, Default)]
pub struct MemoryOverlay<'a> {
    /// Byte offsets in the memory that the overlay stands for (empty: no overlay).
    pub range: Range<usize>,
    /// Each piece's first byte's offset in the memory, and its bytes: inside `range`, not overlapping.
    pub pieces: Vec<(usize, &'a [u8])>,
}

/// Where a page's stored bytes lie: the memory, or one overlay piece (by its index).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Memory,
    Piece(usize),
}

/// One stored run of consecutive pages.
enum Run {
    /// A byte range of one source.
    Borrowed(Source, Range<usize>),
    /// Pages put together from the memory, the overlay's zeros and pieces (pages across their edges).
    Composed(Vec<u8>),
}

impl Run {
    fn bytes<'a>(&'a self, memory: &'a [u8], pieces: &[(usize, &'a [u8])]) -> &'a [u8] {
        match self {
            Run::Borrowed(Source::Memory, r) => &memory[r.clone()],
            Run::Borrowed(Source::Piece(i), r) => &pieces[*i].1[r.clone()],
            Run::Composed(v) => v,
        }
    }
}

/// A validated image and memory, ready to stream.
struct Prepared<'m> {
    fixed: [u8; FIXED_HEADER_BYTES],
    json: Vec<u8>,
    index: Vec<u8>,
    /// The stored pages' bytes, in order, in `memory` and `pieces`.
    runs: Vec<Run>,
    memory: &'m [u8],
    pieces: Vec<(usize, &'m [u8])>,
    stats: ActorWriteStats,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::BadInput { format: F, field, reason: reason.into() }
}

fn is_zero(page: &[u8]) -> bool {
    // OR-reduce fixed-size chunks so the compiler vectorizes; exit early on the first non-zero chunk.
    page.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The overlay's pieces sorted by offset, checked to lie inside its range, and its range inside the memory.
fn check_overlay<'a>(overlay: &MemoryOverlay<'a>, memory_len: usize) -> Result<Vec<(usize, &'a [u8])>, SnapshotError> {
    let range = &overlay.range;
    if range.start > range.end || range.end > memory_len {
        return Err(bad("overlay", format!("range {range:?} is not inside the {memory_len}-byte memory")));
    }
    let mut pieces: Vec<(usize, &[u8])> = overlay.pieces.iter().copied().filter(|(_, b)| !b.is_empty()).collect();
    pieces.sort_by_key(|&(at, _)| at);
    let mut end = range.start;
    for &(at, bytes) in &pieces {
        if at < end || at.checked_add(bytes.len()).is_none_or(|e| e > range.end) {
            return Err(bad(
                "overlay",
                format!("a piece of {} bytes at {at} overlaps another or leaves the range {range:?}", bytes.len()),
            ));
        }
        end = at + bytes.len();
    }
    Ok(pieces)
}

/// One page's bytes: borrowed where they lie in one place (the memory, or one overlay piece), else composed.
enum Page {
    Zero,
    Borrowed(Source, Range<usize>),
    Composed(Box<[u8; PAGE_SIZE]>),
}

/// The bytes of page `span` of the memory as the snapshot stores them. `pieces` are sorted; `next` is the
/// first piece that may reach `span` (advanced past those that end before it).
fn page_bytes(
    memory: &[u8],
    overlay: &Range<usize>,
    pieces: &[(usize, &[u8])],
    next: &mut usize,
    span: Range<usize>,
) -> Page {
    let outside = span.end <= overlay.start || span.start >= overlay.end;
    if outside {
        return Page::Borrowed(Source::Memory, span);
    }
    while *next < pieces.len() && pieces[*next].0 + pieces[*next].1.len() <= span.start {
        *next += 1;
    }
    let touching = pieces[*next..].iter().take_while(|(at, _)| *at < span.end);
    let inside = span.start >= overlay.start && span.end <= overlay.end;
    let mut count = 0;
    for (i, &(at, bytes)) in touching.clone().enumerate() {
        count += 1;
        if inside && at <= span.start && at + bytes.len() >= span.end {
            return Page::Borrowed(Source::Piece(*next + i), span.start - at..span.end - at);
        }
    }
    if inside && count == 0 {
        return Page::Zero;
    }
    let mut page = Box::new([0u8; PAGE_SIZE]);
    // The memory's bytes outside the overlay's range.
    let (before, after) = (overlay.start.clamp(span.start, span.end), overlay.end.clamp(span.start, span.end));
    page[..before - span.start].copy_from_slice(&memory[span.start..before]);
    page[after - span.start..].copy_from_slice(&memory[after..span.end]);
    for &(at, bytes) in touching {
        let (lo, hi) = (at.max(span.start), (at + bytes.len()).min(span.end));
        page[lo - span.start..hi - span.start].copy_from_slice(&bytes[lo - at..hi - at]);
    }
    Page::Composed(page)
}

fn prepare<'m>(
    image: &ActorImage,
    memory: &'m [u8],
    overlay: &MemoryOverlay<'m>,
) -> Result<Prepared<'m>, SnapshotError> {
    if !is_digest_hex(&image.module_digest) {
        return Err(bad("module_digest", format!("{:?} is not 64 lowercase hex digits", image.module_digest)));
    }
    if memory.len() as u64 != image.memory_size {
        return Err(bad(
            "memory",
            format!("the memory is {} bytes but memory_size is {}", memory.len(), image.memory_size),
        ));
    }
    if !image.memory_size.is_multiple_of(WASM_PAGE_SIZE) {
        return Err(bad("memory_size", format!("{} is not a multiple of {WASM_PAGE_SIZE}", image.memory_size)));
    }
    let pages_total = image.memory_size / PAGE_SIZE as u64;
    if pages_total > u64::from(u32::MAX) + 1 {
        return Err(bad("memory_size", format!("{} is too large for 32-bit page numbers", image.memory_size)));
    }
    check_global_names(image.globals.iter().map(|(n, _)| n.as_str())).map_err(|(_, reason)| bad("globals", reason))?;
    let pieces = check_overlay(overlay, memory.len())?;

    let mut index = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    // The last page stored: a page joins the last run only if it directly follows it.
    let mut last = None;
    let mut next = 0;
    for i in 0..memory.len() / PAGE_SIZE {
        let span = i * PAGE_SIZE..(i + 1) * PAGE_SIZE;
        let page = page_bytes(memory, &overlay.range, &pieces, &mut next, span);
        let zero = match &page {
            Page::Zero => true,
            Page::Borrowed(Source::Memory, r) => is_zero(&memory[r.clone()]),
            Page::Borrowed(Source::Piece(p), r) => is_zero(&pieces[*p].1[r.clone()]),
            Page::Composed(bytes) => is_zero(&bytes[..]),
        };
        if zero {
            continue;
        }
        // `i < pages_total ≤ 2^32`, checked above.
        index.extend_from_slice(&(i as u32).to_le_bytes());
        let follows = last.is_some_and(|l| l + 1 == i);
        last = Some(i);
        match (page, runs.last_mut()) {
            (Page::Borrowed(from, r), Some(Run::Borrowed(run_from, run)))
                if follows && *run_from == from && run.end == r.start =>
            {
                run.end = r.end;
            }
            (Page::Borrowed(from, r), _) => runs.push(Run::Borrowed(from, r)),
            (Page::Composed(bytes), Some(Run::Composed(run))) if follows => run.extend_from_slice(&bytes[..]),
            (Page::Composed(bytes), _) => runs.push(Run::Composed(bytes.to_vec())),
            (Page::Zero, _) => {}
        }
    }
    let pages_written = (index.len() / 4) as u64;

    let header = HeaderJson {
        module_digest: image.module_digest.clone(),
        abi_version: image.abi_version,
        memory_size: image.memory_size,
        page_size: PAGE_SIZE as u64,
        pages: pages_written,
        globals: image
            .globals
            .iter()
            .map(|(name, value)| {
                let (ty, bits) = value.to_json();
                GlobalJson { name: name.clone(), ty, bits }
            })
            .collect(),
        models: image.models.clone(),
        metadata: image.metadata.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| bad("metadata", format!("cannot serialize the header: {e}")))?;
    if json.len() as u64 > MAX_HEADER_BYTES {
        return Err(bad("metadata", format!("the header would be {} bytes, over {MAX_HEADER_BYTES}", json.len())));
    }

    let mut hasher = blake3::Hasher::new();
    hasher.update(&json);
    hasher.update(&index);
    for run in &runs {
        hasher.update(run.bytes(memory, &pieces));
    }
    let mut fixed = [0u8; FIXED_HEADER_BYTES];
    fixed[0..8].copy_from_slice(&MAGIC);
    fixed[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    fixed[12..20].copy_from_slice(&(json.len() as u64).to_le_bytes());
    fixed[20..52].copy_from_slice(hasher.finalize().as_bytes());

    let bytes = FIXED_HEADER_BYTES as u64 + json.len() as u64 + pages_written * (PAGE_SIZE as u64 + 4);
    let stats = ActorWriteStats { bytes, pages_written, pages_total };
    Ok(Prepared { fixed, json, index, runs, memory, pieces, stats })
}

fn stream(w: &mut dyn Write, p: &Prepared<'_>) -> io::Result<()> {
    w.write_all(&p.fixed)?;
    w.write_all(&p.json)?;
    w.write_all(&p.index)?;
    for run in &p.runs {
        w.write_all(run.bytes(p.memory, &p.pieces))?;
    }
    Ok(())
}

/// Writes an actor snapshot of `image` and `memory` to `path` atomically (see [`crate::atomic`]). Only the
/// non-zero 4 KiB pages of `memory` are stored; they are streamed from `memory` (runs of consecutive pages in
/// one write each), not copied.
///
/// # Errors
///
/// [`SnapshotError::BadInput`] (before anything is written) when `module_digest` is not 64 lowercase hex digits,
/// `memory.len()` differs from `memory_size`, `memory_size` is not a multiple of 65536 or needs page numbers
/// beyond 32 bits, two globals share a name, or the JSON header would exceed [`MAX_HEADER_BYTES`];
/// [`SnapshotError::Io`] when writing, syncing or renaming fails (an existing file is then left unchanged).
pub fn write_actor(path: &Path, image: &ActorImage, memory: &[u8]) -> Result<ActorWriteStats, SnapshotError> {
    write_actor_overlaid(path, image, memory, &MemoryOverlay::default())
}

/// [`write_actor`] with the bytes of `overlay.range` taken from `overlay` instead of `memory`: the writer reads
/// no byte of that range of `memory` (of a device's managed memory, say, where a read from the CPU would move
/// the pages to the host). The file is the one [`write_actor`] writes for a memory holding the overlay's bytes.
///
/// # Errors
///
/// As for [`write_actor`]; also [`SnapshotError::BadInput`] when the overlay's range is not inside the memory
/// or a piece leaves the range or overlaps another.
pub fn write_actor_overlaid(
    path: &Path,
    image: &ActorImage,
    memory: &[u8],
    overlay: &MemoryOverlay<'_>,
) -> Result<ActorWriteStats, SnapshotError> {
    let p = prepare(image, memory, overlay)?;
    let bytes = write_atomic(path, |w| stream(w, &p))?;
    Ok(ActorWriteStats { bytes, ..p.stats })
}

/// Writes an actor snapshot to any writer (a socket, a buffer), not atomically.
///
/// # Errors
///
/// [`SnapshotError::BadInput`] as for [`write_actor`] (nothing written); [`SnapshotError::Write`] when `w` fails.
pub fn write_actor_to(w: &mut dyn Write, image: &ActorImage, memory: &[u8]) -> Result<ActorWriteStats, SnapshotError> {
    write_actor_to_overlaid(w, image, memory, &MemoryOverlay::default())
}

/// [`write_actor_to`] with an overlay, as [`write_actor_overlaid`] takes it.
///
/// # Errors
///
/// As for [`write_actor_overlaid`] (nothing written) and [`SnapshotError::Write`] when `w` fails.
pub fn write_actor_to_overlaid(
    w: &mut dyn Write,
    image: &ActorImage,
    memory: &[u8],
    overlay: &MemoryOverlay<'_>,
) -> Result<ActorWriteStats, SnapshotError> {
    let p = prepare(image, memory, overlay)?;
    stream(w, &p).map_err(|source| SnapshotError::Write { format: F, source })?;
    Ok(p.stats)
}

/// A validated actor snapshot: its image, and its stored pages served from the file's bytes.
#[derive(Clone)]
pub struct ActorFile {
    /// Everything but the memory's contents.
    pub image: ActorImage,
    bytes: Vec<u8>,
    memory_size: u64,
    index_start: usize,
    data_start: usize,
    pages: usize,
}

impl fmt::Debug for ActorFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorFile")
            .field("image", &self.image)
            .field("file_len", &self.bytes.len())
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl ActorFile {
    /// The stored pages in increasing order: `(byte offset in memory, its 4096 bytes)`. Memory outside them is 0.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = (u64, &[u8])> + '_ {
        let index = &self.bytes[self.index_start..self.index_start + 4 * self.pages];
        let data = &self.bytes[self.data_start..self.data_start + PAGE_SIZE * self.pages];
        index.chunks_exact(4).zip(data.chunks_exact(PAGE_SIZE)).map(|(i, page)| {
            let n = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
            (u64::from(n) * PAGE_SIZE as u64, page)
        })
    }

    /// Number of stored (non-zero) pages.
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Makes `memory` equal to the snapshot's memory: every byte outside the stored pages is zeroed, every stored
    /// page copied. Each byte of `memory` is written exactly once.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::BadInput`] when `memory.len()` is not the snapshot's `memory_size` (the caller must
    /// grow the fresh instance's memory to that size first); `memory` is then untouched.
    pub fn restore_into(&self, memory: &mut [u8]) -> Result<(), SnapshotError> {
        self.check_memory_len(memory)?;
        let mut cursor = 0usize;
        for (offset, page) in self.pages() {
            // Page numbers were checked strictly increasing and below memory_size / 4096 when the file was read.
            let offset = offset as usize;
            memory[cursor..offset].fill(0);
            memory[offset..offset + PAGE_SIZE].copy_from_slice(page);
            cursor = offset + PAGE_SIZE;
        }
        memory[cursor..].fill(0);
        Ok(())
    }

    /// `BadInput` unless `memory` is exactly the snapshot's `memory_size`.
    fn check_memory_len(&self, memory: &[u8]) -> Result<(), SnapshotError> {
        if memory.len() as u64 == self.memory_size {
            return Ok(());
        }
        Err(bad(
            "memory",
            format!(
                "the target memory is {} bytes but the snapshot's memory_size is {}",
                memory.len(),
                self.memory_size
            ),
        ))
    }

    /// [`restore_into`](Self::restore_into) for memory whose bytes from `zero_from` on are already zero, as
    /// freshly mapped memory is: pages outside the stored ones are zeroed only below `zero_from` (and there only
    /// where they are not zero already), so a restore into fresh memory touches only the stored pages and
    /// resident memory follows them.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::BadInput`] when `memory.len()` is not the snapshot's `memory_size`; `memory` is then
    /// untouched.
    pub fn restore_into_fresh(&self, memory: &mut [u8], zero_from: usize) -> Result<(), SnapshotError> {
        self.check_memory_len(memory)?;
        let zero_from = zero_from.min(memory.len());
        let clear = |memory: &mut [u8], start: usize, end: usize| {
            let (start, end) = (start.min(zero_from), end.min(zero_from));
            for page in memory[start..end].chunks_mut(PAGE_SIZE) {
                if !is_zero(page) {
                    page.fill(0);
                }
            }
        };
        let mut cursor = 0usize;
        for (offset, page) in self.pages() {
            // Page numbers were checked strictly increasing and below memory_size / 4096 when the file was read.
            let offset = offset as usize;
            clear(memory, cursor, offset);
            memory[offset..offset + PAGE_SIZE].copy_from_slice(page);
            cursor = offset + PAGE_SIZE;
        }
        clear(memory, cursor, memory.len());
        Ok(())
    }
}

/// Reads and validates the actor snapshot at `path`, holding the whole file in memory. Everything but the
/// checksum is validated (by [`ActorReader::open`]) before the page data is read, so the memory used is what a
/// valid file of the declared size needs.
///
/// # Errors
///
/// Every error of [`ActorReader::open`] and of [`parse_actor`].
pub fn read_actor(path: &Path, limits: &ActorLimits) -> Result<ActorFile, SnapshotError> {
    let reader = ActorReader::open(path, limits)?;
    // The length was checked against the limits and against what the header declares.
    let mut bytes = vec![0u8; reader.file_len as usize];
    read_exact_at(&reader.file, &mut bytes, 0).map_err(|e| SnapshotError::io("reading", path, e))?;
    parse_actor(bytes, limits)
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::invalid(F, field, reason)
}

fn check_global_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), (usize, String)> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, name) in names.enumerate() {
        if !seen.insert(name) {
            return Err((i, format!("duplicate global name {name:?}")));
        }
    }
    Ok(())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Checks the file's size against `limits`, then the fixed header (`prefix` is the file's first
/// `min(len, 52)` bytes); returns the JSON header's length.
fn check_fixed(prefix: &[u8], len: u64, limits: &ActorLimits) -> Result<u64, SnapshotError> {
    let max_file = limits.max_file_bytes();
    if len > max_file {
        return Err(SnapshotError::TooLarge { format: F, what: "file", size: len, limit: max_file });
    }
    let head = &prefix[..prefix.len().min(MAGIC.len())];
    if head != &MAGIC[..head.len()] {
        return Err(invalid("magic", format!("expected \"DWACTOR\\0\", found \"{}\"", head.escape_ascii())));
    }
    if len < FIXED_HEADER_BYTES as u64 || prefix.len() < FIXED_HEADER_BYTES {
        return Err(invalid(
            "file length",
            format!("{len} bytes, shorter than the {FIXED_HEADER_BYTES}-byte fixed header (truncated)"),
        ));
    }
    let version = u32_at(prefix, 8);
    if version != FORMAT_VERSION {
        return Err(invalid(
            "format version",
            format!("unsupported version {version} (this reader understands {FORMAT_VERSION})"),
        ));
    }
    let mut h = [0u8; 8];
    h.copy_from_slice(&prefix[12..20]);
    let header_len = u64::from_le_bytes(h);
    let room = len - FIXED_HEADER_BYTES as u64;
    if !(2..=MAX_HEADER_BYTES).contains(&header_len) || header_len > room {
        return Err(invalid(
            "header length",
            format!(
                "{header_len} bytes, but it must be 2..={MAX_HEADER_BYTES} and fit in the {room} bytes after the fixed header"
            ),
        ));
    }
    Ok(header_len)
}

/// Validates the JSON header of a file of `len` bytes: members, page size, digest, memory size (against
/// `limits`), page count, and the file's exact length.
fn check_header(json: &[u8], len: u64, limits: &ActorLimits) -> Result<HeaderJson, SnapshotError> {
    let header: HeaderJson = serde_json::from_slice(json).map_err(|e| invalid("header", e.to_string()))?;
    if header.page_size != PAGE_SIZE as u64 {
        return Err(invalid("page_size", format!("{} (this reader understands {PAGE_SIZE})", header.page_size)));
    }
    if !is_digest_hex(&header.module_digest) {
        return Err(invalid("module_digest", format!("{:?} is not 64 lowercase hex digits", header.module_digest)));
    }
    let memory_size = header.memory_size;
    if !memory_size.is_multiple_of(WASM_PAGE_SIZE) {
        return Err(invalid("memory_size", format!("{memory_size} is not a multiple of {WASM_PAGE_SIZE}")));
    }
    if memory_size > limits.max_memory {
        return Err(SnapshotError::TooLarge {
            format: F,
            what: "memory_size",
            size: memory_size,
            limit: limits.max_memory,
        });
    }
    let pages_total = memory_size / PAGE_SIZE as u64;
    if header.pages > pages_total {
        return Err(invalid(
            "pages",
            format!("{} stored pages, but a memory of {memory_size} bytes has only {pages_total}", header.pages),
        ));
    }
    let json_end = FIXED_HEADER_BYTES as u64 + json.len() as u64;
    let expected = header.pages.checked_mul(PAGE_SIZE as u64 + 4).and_then(|x| x.checked_add(json_end));
    if expected != Some(len) {
        let (described, what) = match expected {
            Some(e) if len < e => (e.to_string(), "truncated"),
            Some(e) => (e.to_string(), "trailing bytes"),
            None => ("more than 2^64".to_string(), "truncated"),
        };
        return Err(invalid(
            "file length",
            format!("the file is {len} bytes but its header describes {described} bytes ({what})"),
        ));
    }
    Ok(header)
}

fn check_globals(globals: Vec<GlobalJson>) -> Result<Vec<(String, GlobalValue)>, SnapshotError> {
    check_global_names(globals.iter().map(|g| g.name.as_str()))
        .map_err(|(i, reason)| invalid(format!("globals[{i}].name"), reason))?;
    let mut out = Vec::with_capacity(globals.len());
    for (i, g) in globals.into_iter().enumerate() {
        let value = GlobalValue::from_json(g.ty, g.bits).ok_or_else(|| {
            invalid(format!("globals[{i}].bits"), format!("{} does not fit a {:?} global", g.bits, g.ty))
        })?;
        out.push((g.name, value));
    }
    Ok(out)
}

/// Checks that the page index (`4 · pages` bytes) is strictly increasing and within a memory of `memory_size`.
fn check_index(index: &[u8], memory_size: u64) -> Result<(), SnapshotError> {
    let pages_total = memory_size / PAGE_SIZE as u64;
    let mut previous: Option<u32> = None;
    for (j, c) in index.chunks_exact(4).enumerate() {
        let n = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if u64::from(n) >= pages_total {
            return Err(invalid(
                format!("page index {j}"),
                format!("page {n} is beyond the memory ({memory_size} bytes, {pages_total} pages)"),
            ));
        }
        if let Some(p) = previous.filter(|&p| p >= n) {
            return Err(invalid(format!("page index {j}"), format!("pages must be strictly increasing: {p} then {n}")));
        }
        previous = Some(n);
    }
    Ok(())
}

fn image_of(header: HeaderJson, globals: Vec<(String, GlobalValue)>) -> ActorImage {
    ActorImage {
        module_digest: header.module_digest,
        abi_version: header.abi_version,
        memory_size: header.memory_size,
        globals,
        models: header.models,
        metadata: header.metadata,
    }
}

/// Validates an actor snapshot held in memory and takes ownership of its bytes (see [`read_actor`]).
///
/// # Errors
///
/// - [`SnapshotError::TooLarge`] when the buffer exceeds [`ActorLimits::max_file_bytes`] or `memory_size`
///   exceeds `limits.max_memory`;
/// - [`SnapshotError::Invalid`] naming the field: `magic`, `format version`, `header length`, `header` (not
///   UTF-8, not JSON, a missing, unknown, duplicate or mistyped member), `page_size`, `module_digest`,
///   `memory_size` (not a multiple of 65536), `pages` (more than the memory has), `file length` (truncated or
///   trailing bytes), `globals[i]` (duplicate name, `bits` out of range for a 32-bit type), `page index j`
///   (out of range or not strictly increasing);
/// - [`SnapshotError::Checksum`] when the bytes after the fixed header do not hash to the recorded BLAKE3 checksum.
pub fn parse_actor(bytes: Vec<u8>, limits: &ActorLimits) -> Result<ActorFile, SnapshotError> {
    let len = bytes.len();
    let header_len = check_fixed(&bytes[..len.min(FIXED_HEADER_BYTES)], len as u64, limits)?;
    // header_len ≤ len - 52, checked.
    let json_end = FIXED_HEADER_BYTES + header_len as usize;
    let header = check_header(&bytes[FIXED_HEADER_BYTES..json_end], len as u64, limits)?;
    let computed = hex(blake3::hash(&bytes[FIXED_HEADER_BYTES..]).as_bytes());
    let stored = hex(&bytes[20..52]);
    if computed != stored {
        return Err(SnapshotError::Checksum { format: F, stored, computed });
    }
    let memory_size = header.memory_size;
    // `pages` fits in usize: pages * 4100 ≤ len.
    let pages = header.pages as usize;
    let index_start = json_end;
    let data_start = index_start + 4 * pages;
    let mut header = header;
    let globals = check_globals(std::mem::take(&mut header.globals))?;
    check_index(&bytes[index_start..data_start], memory_size)?;
    let image = image_of(header, globals);
    Ok(ActorFile { image, bytes, memory_size, index_start, data_start, pages })
}

/// An actor snapshot opened for restoring: everything but the page data read and validated (fixed header, JSON
/// header, the file's exact size from the file system, globals, page index); the page data is streamed by
/// [`restore_into`](Self::restore_into), which verifies the checksum as it goes.
///
/// Memory use before restoring is bounded by the JSON header (≤ [`MAX_HEADER_BYTES`]) and the page index (4
/// bytes per stored page, ≤ 4 MiB for a 4 GiB memory).
pub struct ActorReader {
    file: File,
    path: PathBuf,
    file_len: u64,
    image: ActorImage,
    /// Stored page numbers, strictly increasing.
    index: Vec<u32>,
    /// File offset of the first stored page's data.
    data_start: u64,
    /// BLAKE3 fed with the JSON header and the page index; the page data follows.
    hasher: blake3::Hasher,
    stored: [u8; 32],
}

impl fmt::Debug for ActorReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorReader")
            .field("path", &self.path)
            .field("image", &self.image)
            .field("file_len", &self.file_len)
            .field("pages", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// Bytes read (and hashed) at a time when streaming pages.
const CHUNK: usize = 4 << 20;

impl ActorReader {
    /// Opens the actor snapshot at `path` and validates everything but the checksum, reading only the fixed
    /// header, the JSON header and the page index. The file's size comes from the file system and must be
    /// within `limits` and exactly what the header declares before the JSON header is read.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] when the file cannot be opened or read; [`SnapshotError::TooLarge`] and
    /// [`SnapshotError::Invalid`] as for [`parse_actor`] (all but the checksum, which
    /// [`restore_into`](Self::restore_into) and [`verify`](Self::verify) check).
    pub fn open(path: &Path, limits: &ActorLimits) -> Result<ActorReader, SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io("opening", path, e))?;
        let len = file.metadata().map_err(|e| SnapshotError::io("reading metadata of", path, e))?.len();
        let io = |e| SnapshotError::io("reading", path, e);
        let mut fixed = [0u8; FIXED_HEADER_BYTES];
        let got = (len as usize).min(FIXED_HEADER_BYTES);
        if len <= limits.max_file_bytes() {
            read_exact_at(&file, &mut fixed[..got], 0).map_err(io)?;
        }
        let header_len = check_fixed(&fixed[..got], len, limits)?;
        // header_len ≤ MAX_HEADER_BYTES and ≤ the file's size, checked.
        let mut json = vec![0u8; header_len as usize];
        read_exact_at(&file, &mut json, FIXED_HEADER_BYTES as u64).map_err(io)?;
        let mut header = check_header(&json, len, limits)?;
        // pages ≤ memory_size / 4096 and pages · 4100 ≤ len, checked.
        let pages = header.pages as usize;
        let index_start = FIXED_HEADER_BYTES as u64 + header_len;
        let mut index_bytes = vec![0u8; 4 * pages];
        read_exact_at(&file, &mut index_bytes, index_start).map_err(io)?;
        let globals = check_globals(std::mem::take(&mut header.globals))?;
        check_index(&index_bytes, header.memory_size)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&json);
        hasher.update(&index_bytes);
        let index = index_bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut stored = [0u8; 32];
        stored.copy_from_slice(&fixed[20..52]);
        Ok(ActorReader {
            file,
            path: path.to_path_buf(),
            file_len: len,
            image: image_of(header, globals),
            index,
            data_start: index_start + 4 * pages as u64,
            hasher,
            stored,
        })
    }

    /// Everything but the memory's contents.
    pub fn image(&self) -> &ActorImage {
        &self.image
    }

    /// Number of stored (non-zero) pages.
    pub fn page_count(&self) -> usize {
        self.index.len()
    }

    /// Bytes of page data stored (4096 per stored page): what restoring writes into memory.
    pub fn stored_bytes(&self) -> u64 {
        self.index.len() as u64 * PAGE_SIZE as u64
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Runs of consecutive stored pages: `(first page, count, position in the index)`.
    fn runs(&self) -> Vec<(u64, usize, usize)> {
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        for (j, &n) in self.index.iter().enumerate() {
            match runs.last_mut() {
                Some((first, count, _)) if *first + *count as u64 == u64::from(n) => *count += 1,
                _ => runs.push((u64::from(n), 1, j)),
            }
        }
        runs
    }

    /// Makes `memory` equal to the snapshot's memory, writing only what must change: the stored pages are read
    /// from the file straight into place, and pages outside them are zeroed only below `zero_from` (and there
    /// only where they are not zero already). `memory[zero_from..]` must already be zero, as freshly mapped
    /// memory is; so a restore into fresh memory touches only the stored pages, and resident memory follows
    /// them. The checksum is verified as the pages are read; on a mismatch or a read error the stored pages are
    /// zeroed before returning, so a corrupted file never leaves its bytes in `memory`.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::BadInput`] when `memory.len()` is not the snapshot's `memory_size` (nothing is written);
    /// [`SnapshotError::Io`] when reading fails; [`SnapshotError::Checksum`] when the file does not hash to its
    /// recorded checksum.
    pub fn restore_into(mut self, memory: &mut [u8], zero_from: usize) -> Result<(), SnapshotError> {
        if memory.len() as u64 != self.image.memory_size {
            return Err(bad(
                "memory",
                format!(
                    "the target memory is {} bytes but the snapshot's memory_size is {}",
                    memory.len(),
                    self.image.memory_size
                ),
            ));
        }
        let zero_from = zero_from.min(memory.len());
        let clear = |memory: &mut [u8], range: Range<usize>| {
            let range = range.start.min(zero_from)..range.end.min(zero_from);
            for page in memory[range].chunks_mut(PAGE_SIZE) {
                if !is_zero(page) {
                    page.fill(0);
                }
            }
        };
        let mut cursor = 0usize;
        let mut result = Ok(());
        for (first, count, j) in self.runs() {
            // Page numbers were checked below memory_size / 4096, and memory_size == memory.len().
            let start = first as usize * PAGE_SIZE;
            let end = start + count * PAGE_SIZE;
            clear(memory, cursor..start);
            cursor = end;
            let file_at = self.data_start + (j * PAGE_SIZE) as u64;
            if let Err(e) = read_hashed(&self.file, &mut self.hasher, &mut memory[start..end], file_at) {
                result = Err(SnapshotError::io("reading", &self.path, e));
                break;
            }
        }
        if result.is_ok() {
            clear(memory, cursor..memory.len());
            result = self.check(self.hasher.finalize());
        }
        if result.is_err() {
            for &n in &self.index {
                let at = n as usize * PAGE_SIZE;
                memory[at..at + PAGE_SIZE].fill(0);
            }
        }
        result
    }

    /// Verifies the checksum by streaming the page data through it in bounded chunks, without keeping it (for
    /// inspection).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] when reading fails; [`SnapshotError::Checksum`] on a mismatch.
    pub fn verify(mut self) -> Result<(), SnapshotError> {
        let total = self.stored_bytes() as usize;
        let mut buf = vec![0u8; CHUNK.min(total)];
        let mut done = 0usize;
        while done < total {
            let n = CHUNK.min(total - done);
            read_hashed(&self.file, &mut self.hasher, &mut buf[..n], self.data_start + done as u64)
                .map_err(|e| SnapshotError::io("reading", &self.path, e))?;
            done += n;
        }
        self.check(self.hasher.finalize())
    }

    fn check(&self, computed: blake3::Hash) -> Result<(), SnapshotError> {
        if computed.as_bytes() != &self.stored {
            return Err(SnapshotError::Checksum {
                format: F,
                stored: hex(&self.stored),
                computed: hex(computed.as_bytes()),
            });
        }
        Ok(())
    }
}

/// Reads `dst.len()` bytes of `file` at `offset` into `dst`, feeding them to `hasher`, in chunks (each hashed
/// right after it is read, while it is in cache).
fn read_hashed(file: &File, hasher: &mut blake3::Hasher, dst: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    for chunk in dst.chunks_mut(CHUNK) {
        read_exact_at(file, chunk, offset + done as u64)?;
        hasher.update(chunk);
        done += chunk.len();
    }
    Ok(())
}
