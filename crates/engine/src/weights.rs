//! Safetensors weights mapped read-only, once per model (single file or sharded with an index), each tensor
//! checked against the shape the config implies.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use driftwood_backend::{DType, TensorRef};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{EngineError, invalid};

/// Where one tensor's bytes are.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range within the file.
    start: usize,
    end: usize,
}

/// A weight tensor in its stored dtype. Points into a mapping owned by the same [`WeightFiles`] (or into an
/// aligned copy it owns), so it is valid exactly as long as the model.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weight {
    ptr: *const u8,
    elems: usize,
    dtype: DType,
}

// SAFETY: a Weight is a read-only view of immutable mapped bytes owned by the model that holds it.
unsafe impl Send for Weight {}
// SAFETY: as above; nothing ever writes through it.
unsafe impl Sync for Weight {}

impl Weight {
    /// A view of the weight for the backend.
    pub(crate) fn view(&self) -> TensorRef<'_> {
        // SAFETY: ptr is aligned to the dtype (checked or copied at load), the bytes are readable for the
        // model's life (which outlives &self), and the mapping is read-only.
        unsafe { TensorRef::from_raw_parts(self.ptr, self.elems, self.dtype) }
    }

    /// The weight widened to f32 (for small tensors: norms and biases).
    pub(crate) fn to_f32(self) -> Vec<f32> {
        let v = self.view();
        match v.dtype() {
            DType::F32 => v.as_f32().unwrap_or_default().to_vec(),
            DType::BF16 => v.as_bf16().unwrap_or_default().iter().map(|x| bf16::to_f32(*x)).collect(),
            DType::F16 => v.as_f16().unwrap_or_default().iter().map(|x| f16::to_f32(*x)).collect(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.elems * self.dtype.size()
    }
}

/// The mapped weight files of one model and the index of their tensors.
pub(crate) struct WeightFiles {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    /// Aligned copies of tensors whose offsets in the file were not aligned to their dtype (rare).
    copies: Vec<Box<[u64]>>,
    /// Each file's safetensors header, for fingerprints.
    pub(crate) headers: Vec<Vec<u8>>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

fn map_file(path: &Path) -> Result<Mmap, EngineError> {
    let file = File::open(path).map_err(|source| EngineError::Io { path: path.into(), source })?;
    // SAFETY: the mapping is read-only and private. Like every mmap-based loader, this assumes nobody
    // truncates or rewrites the model file while it is loaded; the file is validated below before use.
    unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io { path: path.into(), source })
}

impl WeightFiles {
    /// Maps `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub(crate) fn open(dir: &Path) -> Result<Self, EngineError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| EngineError::Io { path: index.clone(), source })?;
            let idx: Index =
                serde_json::from_str(&text).map_err(|e| invalid(&index, format!("not a valid index: {e}")))?;
            let mut shards: Vec<String> = idx.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            if shards.iter().any(|s| s.contains('/') || s.contains('\\') || s.starts_with('.')) {
                return Err(invalid(&index, "shard names must be plain file names inside the model directory"));
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(EngineError::Missing {
                dir: dir.into(),
                file: "model.safetensors",
                hint: "the weights (or model.safetensors.index.json for sharded weights)",
            });
        };
        let mut out =
            WeightFiles { paths: vec![], maps: vec![], entries: HashMap::new(), copies: vec![], headers: vec![] };
        for path in files {
            let map = map_file(&path)?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| invalid(&path, format!("not a valid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            out.headers.push(map[..data_start].to_vec());
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => DType::F32,
                    Dtype::BF16 => DType::BF16,
                    Dtype::F16 => DType::F16,
                    other => {
                        return Err(invalid(
                            &path,
                            format!("tensor `{name}` has dtype {other:?}; supported: F32, BF16, F16"),
                        ));
                    }
                };
                let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if out.entries.contains_key(&name) {
                    return Err(invalid(&path, format!("tensor `{name}` appears in more than one shard")));
                }
                out.entries.insert(name, Entry { file: out.maps.len(), dtype, shape: info.shape.clone(), start, end });
            }
            out.paths.push(path);
            out.maps.push(map);
        }
        Ok(out)
    }

    /// Whether a tensor exists.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`.
    pub(crate) fn get(&mut self, name: &str, shape: &[usize]) -> Result<Weight, EngineError> {
        let first = self.paths.first().cloned().unwrap_or_default();
        let entry = self.entries.get(name).ok_or_else(|| invalid(&first, format!("tensor `{name}` is missing")))?;
        let path = &self.paths[entry.file];
        if entry.shape != shape {
            return Err(invalid(
                path,
                format!("tensor `{name}` has shape {:?}, but config.json implies {shape:?}", entry.shape),
            ));
        }
        let elems: usize = shape.iter().product();
        if entry.end - entry.start != elems * entry.dtype.size() {
            return Err(invalid(path, format!("tensor `{name}` byte length does not match its shape")));
        }
        let bytes = &self.maps[entry.file][entry.start..entry.end];
        let ptr = if (bytes.as_ptr() as usize).is_multiple_of(entry.dtype.align()) {
            bytes.as_ptr()
        } else {
            let mut copy = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
            // SAFETY: `copy` holds at least bytes.len() bytes; the regions are distinct allocations.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy.as_mut_ptr().cast::<u8>(), bytes.len()) };
            let ptr = copy.as_ptr().cast::<u8>();
            self.copies.push(copy);
            ptr
        };
        Ok(Weight { ptr, elems, dtype: entry.dtype })
    }

    /// Total bytes of all mapped files.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.maps.iter().map(|m| m.len()).sum()
    }

    /// Reads every mapped page once (so the first request does not pay for the disk), calling `progress` with
    /// (bytes done, bytes total) as it goes.
    pub(crate) fn prefault(&self, progress: &mut dyn FnMut(usize, usize)) {
        let total = self.mapped_bytes();
        let mut done = 0;
        let mut sink = 0u8;
        for map in &self.maps {
            for chunk in map.chunks(16 << 20) {
                for page in chunk.chunks(4096) {
                    sink ^= page[0];
                }
                done += chunk.len();
                progress(done, total);
            }
        }
        std::hint::black_box(sink);
    }
}
