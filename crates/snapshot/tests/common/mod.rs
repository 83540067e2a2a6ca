//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use driftwood_snapshot::{ActorImage, GlobalValue, KvDtype, ModelRef, SessionExpect, SessionFile, SessionSnapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

pub const MODEL_FP: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
pub const TOKENIZER_FP: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

/// Owned data behind a [`SessionSnapshot`].
#[derive(Debug, Clone)]
pub struct SessionData {
    pub model_fingerprint: String,
    pub tokenizer_fingerprint: String,
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tokens: Vec<u32>,
    pub guest_state: Vec<u8>,
    /// The KV values as f32 (for bf16 data, exactly the widened bf16 values).
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub kv_dtype: KvDtype,
    /// The KV values as stored: little-endian elements of `kv_dtype`.
    pub raw: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Little-endian bytes of `values` in `dtype` (bf16: the upper half of each f32, which must be exact).
pub fn raw_of(values: &[f32], dtype: KvDtype) -> Vec<u8> {
    match dtype {
        KvDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        KvDtype::Bf16 => values.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
    }
}

impl SessionData {
    /// Random contents; f32 values are random bit patterns (NaNs with payloads, infinities, subnormals included).
    pub fn random(
        seed: u64,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        n_tokens: usize,
        guest: usize,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let elems = n_tokens * kv_heads * head_dim;
        let mut values = || (0..elems).map(|_| f32::from_bits(rng.random())).collect::<Vec<f32>>();
        let layers: Vec<(Vec<f32>, Vec<f32>)> = (0..num_layers).map(|_| (values(), values())).collect();
        let raw = layers.iter().map(|(k, v)| (raw_of(k, KvDtype::F32), raw_of(v, KvDtype::F32))).collect();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        SessionData {
            model_fingerprint: MODEL_FP.to_string(),
            tokenizer_fingerprint: TOKENIZER_FP.to_string(),
            num_layers,
            kv_heads,
            head_dim,
            tokens: (0..n_tokens).map(|_| rng.random_range(0..50_000)).collect(),
            guest_state: (0..guest).map(|_| rng.random()).collect(),
            layers,
            kv_dtype: KvDtype::F32,
            raw,
        }
    }

    /// The same data with a bf16 cache: each value truncated to its upper 16 bits (so the f32 view is exact).
    pub fn bf16(mut self) -> Self {
        let cut = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits() & 0xffff_0000));
        for (k, v) in &mut self.layers {
            cut(k);
            cut(v);
        }
        self.kv_dtype = KvDtype::Bf16;
        self.raw = self.layers.iter().map(|(k, v)| (raw_of(k, KvDtype::Bf16), raw_of(v, KvDtype::Bf16))).collect();
        self
    }

    pub fn snapshot(&self) -> SessionSnapshot<'_> {
        SessionSnapshot {
            model_fingerprint: &self.model_fingerprint,
            tokenizer_fingerprint: &self.tokenizer_fingerprint,
            num_layers: self.num_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            kv_dtype: self.kv_dtype,
            tokens: &self.tokens,
            guest_state: &self.guest_state,
            layers: self.raw.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect(),
        }
    }

    pub fn expect(&self, max_tokens: usize) -> SessionExpect {
        SessionExpect {
            model_fingerprint: self.model_fingerprint.clone(),
            tokenizer_fingerprint: self.tokenizer_fingerprint.clone(),
            num_layers: self.num_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_tokens,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        driftwood_snapshot::write_session_to(&mut out, &self.snapshot()).expect("write_session_to");
        out
    }

    /// Bit-exact comparison with what was read back.
    pub fn assert_matches(&self, f: &SessionFile) {
        assert_eq!(f.n_tokens(), self.tokens.len());
        assert_eq!(f.num_layers(), self.num_layers);
        assert_eq!(f.kv_heads(), self.kv_heads);
        assert_eq!(f.head_dim(), self.head_dim);
        assert_eq!(f.tokens(), self.tokens.as_slice());
        assert_eq!(f.guest_state(), self.guest_state.as_slice());
        assert_eq!(f.model_fingerprint(), self.model_fingerprint);
        assert_eq!(f.tokenizer_fingerprint(), self.tokenizer_fingerprint);
        assert_eq!(f.kv_dtype(), self.kv_dtype);
        for (i, (k, v)) in self.layers.iter().enumerate() {
            assert_eq!(bits(f.k(i)), bits(k), "layer {i} k");
            assert_eq!(bits(f.v(i)), bits(v), "layer {i} v");
            assert_eq!(f.k_bytes(i), self.raw[i].0.as_slice(), "layer {i} k bytes");
            assert_eq!(f.v_bytes(i), self.raw[i].1.as_slice(), "layer {i} v bytes");
        }
    }
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// BLAKE3 of `bytes` as lowercase hex (the formats' checksum).
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A memory of `size` bytes where about one 4 KiB page in `one_in` holds random bytes (and the first and last
/// pages always do, when there are any).
pub fn sparse_memory(seed: u64, size: usize, one_in: u32) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut memory = vec![0u8; size];
    let pages = size / 4096;
    for (i, page) in memory.chunks_exact_mut(4096).enumerate() {
        if i == 0 || i + 1 == pages || rng.random_ratio(1, one_in) {
            rng.fill(page);
        }
    }
    // A page whose only non-zero byte is its last one must still be stored.
    if pages > 3 {
        memory[3 * 4096 - 1] = 1;
    }
    memory
}

pub fn sample_image(memory_size: u64) -> ActorImage {
    ActorImage {
        module_digest: sha256_hex(b"(module)"),
        abi_version: 3,
        memory_size,
        globals: vec![
            ("__stack_pointer".to_string(), GlobalValue::I32(-65536)),
            ("counter".to_string(), GlobalValue::I64(i64::MIN + 7)),
            ("temperature".to_string(), GlobalValue::from_f32(0.7)),
            ("nan_payload".to_string(), GlobalValue::F32(0x7fc0_1234)),
            ("pi".to_string(), GlobalValue::from_f64(std::f64::consts::PI)),
            ("neg_zero".to_string(), GlobalValue::F64((-0.0f64).to_bits())),
        ],
        models: vec![
            ModelRef {
                name: "driftwood-mini".to_string(),
                model_fingerprint: MODEL_FP.to_string(),
                tokenizer_fingerprint: TOKENIZER_FP.to_string(),
            },
            ModelRef {
                name: "other \"quoted\" ✓".to_string(),
                model_fingerprint: "x".into(),
                tokenizer_fingerprint: "".into(),
            },
        ],
        metadata: BTreeMap::from([
            ("created_by".to_string(), "test".to_string()),
            ("note".to_string(), "unicode ✓ and \"quotes\"\n".to_string()),
        ]),
    }
}

/// Passes through the first `left` bytes, then fails every write.
pub struct FailAfter<'a> {
    pub inner: &'a mut dyn Write,
    pub left: usize,
}

impl Write for FailAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("injected failure"));
        }
        let n = self.inner.write(&buf[..buf.len().min(self.left)])?;
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The names in `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
