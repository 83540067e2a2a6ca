//! Language models from inside an actor: open a model the host loaded, tokenize, render chat templates, and
//! run a [`Session`] whose KV cache and logits are ordinary buffers in this actor's memory. The host computes
//! on those bytes in place; nothing is copied across the boundary.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};

use driftwood_abi::{DTypeCode, MODEL_INFO_WORDS};

use crate::raw;

/// What the host says about a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// Vocabulary size (length of the logits).
    pub vocab_size: u32,
    /// Transformer blocks.
    pub layers: u32,
    /// Longest sequence the model supports.
    pub max_position: u32,
    /// Bytes of KV cache one token needs, in `kv_dtype`.
    pub kv_bytes_per_token: u32,
    /// The KV cache element type the host recommends for this model on its backend.
    pub kv_dtype: DTypeCode,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// Tokens that end a generation.
    pub eos: Vec<u32>,
}

/// A model the host has loaded.
#[derive(Clone, Debug)]
pub struct Model {
    handle: u32,
    info: ModelInfo,
}

/// Calls a host function that fills a buffer, growing the buffer until the result fits.
fn fill<T: Copy + Default>(mut call: impl FnMut(*mut T, usize) -> i32) -> Vec<T> {
    let mut buf: Vec<T> = vec![T::default(); 256];
    loop {
        let needed = call(buf.as_mut_ptr(), buf.len()).max(0) as usize;
        if needed <= buf.len() {
            buf.truncate(needed);
            return buf;
        }
        buf.resize(needed, T::default());
    }
}

impl Model {
    /// Opens the model the host loaded as `name` (`"default"` is the one the user chose).
    pub fn open(name: &str) -> Model {
        // SAFETY: `name` is readable for the call; the host traps on an unknown name.
        let handle = unsafe { raw::model_open(name.as_ptr(), name.len()) } as u32;
        let mut w = [0u32; MODEL_INFO_WORDS];
        // SAFETY: `w` holds the words the host writes.
        unsafe { raw::model_info(handle, w.as_mut_ptr()) };
        let abi = driftwood_abi::ModelInfo::from_words(&w);
        let info = ModelInfo {
            vocab_size: abi.vocab_size,
            layers: abi.layers,
            max_position: abi.max_position,
            kv_bytes_per_token: abi.kv_bytes_per_token,
            kv_dtype: DTypeCode::from_code(abi.kv_dtype).unwrap_or(DTypeCode::F32),
            bos: (abi.bos != u32::MAX).then_some(abi.bos),
            eos: abi.eos_ids().to_vec(),
        };
        Model { handle, info }
    }

    /// The model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Token ids of `text`; `add_special` adds the tokenizer's special tokens (such as a leading BOS).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<u32> {
        // SAFETY: `text` is readable and `out` writable for `cap` ids during each call.
        fill(|out, cap| unsafe { raw::tokenize(self.handle, text.as_ptr(), text.len(), add_special as u32, out, cap) })
    }

    /// The text of `ids`, skipping special tokens when `skip_special`.
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> String {
        // SAFETY: `ids` readable, `out` writable for `cap` bytes during each call.
        let bytes = fill(|out, cap| unsafe {
            raw::detokenize(self.handle, ids.as_ptr(), ids.len(), skip_special as u32, out, cap)
        });
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Renders messages given as JSON (a list of `{"role": …, "content": …}` objects) with the model's chat
    /// template; the host traps if the JSON is not such a list.
    pub fn chat_template_json(&self, json: &str, add_generation_prompt: bool) -> String {
        // SAFETY: as in `detokenize`.
        let bytes = fill(|out, cap| unsafe {
            raw::chat_template(self.handle, json.as_ptr(), json.len(), add_generation_prompt as u32, out, cap)
        });
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Renders `(role, content)` messages with the model's chat template.
    pub fn chat_template(&self, messages: &[(String, String)], add_generation_prompt: bool) -> String {
        let mut json = String::from("[");
        for (i, (role, content)) in messages.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str("{\"role\":");
            json_string(&mut json, role);
            json.push_str(",\"content\":");
            json_string(&mut json, content);
            json.push('}');
        }
        json.push(']');
        // SAFETY: as in `detokenize`.
        let bytes = fill(|out, cap| unsafe {
            raw::chat_template(self.handle, json.as_ptr(), json.len(), add_generation_prompt as u32, out, cap)
        });
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Zeroed bytes at a 64-byte-aligned address in this actor's memory: a KV cache (the host requires 16-byte
/// alignment; 64 keeps rows on cache lines).
struct KvBuffer {
    ptr: *mut u8,
    layout: Layout,
}

impl KvBuffer {
    fn zeroed(bytes: usize) -> KvBuffer {
        let layout = Layout::from_size_align(bytes.max(1), 64).unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            handle_alloc_error(layout);
        }
        KvBuffer { ptr, layout }
    }

    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for KvBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// One sequence: its KV cache `(layer, {k, v}, max_seq, kv_dim)` and logits `(vocab)` live in this actor's
/// memory, along with the tokens the cache holds and the cache's element type, so that a snapshot of the actor
/// carries all four.
pub struct Session {
    model: Model,
    kv: KvBuffer,     // (layers, 2, max_seq, kv_dim) of kv_dtype
    kv_dtype: DTypeCode,
    logits: Vec<f32>, // (vocab)
    max_seq: u32,
    tokens: Vec<u32>, // the tokens whose keys and values are in `kv`, in order
}

impl Session {
    /// A session able to hold `max_seq` tokens (capped at the model's context length), its cache of the dtype the
    /// host recommends.
    pub fn new(model: &Model, max_seq: u32) -> Session {
        let max_seq = max_seq.clamp(1, model.info.max_position);
        let bytes = model.info.kv_bytes_per_token as usize * max_seq as usize;
        Session {
            model: model.clone(),
            kv: KvBuffer::zeroed(bytes),
            kv_dtype: model.info.kv_dtype,
            logits: vec![0f32; model.info.vocab_size as usize],
            max_seq,
            tokens: Vec::new(),
        }
    }

    /// The model this session runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Tokens in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Offset of the KV cache in this actor's memory and its size in bytes.
    pub fn kv_region(&self) -> (u32, u32) {
        (self.kv.ptr as u32, self.kv.len() as u32)
    }

    /// The element type of the KV cache.
    pub fn kv_dtype(&self) -> DTypeCode {
        self.kv_dtype
    }

    /// Tokens the cache can hold.
    pub fn max_seq(&self) -> u32 {
        self.max_seq
    }

    /// Forgets every token after the first `len` (their cache rows are simply overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// Keeps the longest prefix of the cache that `tokens` starts with, and returns its length: only the rest
    /// of `tokens` needs evaluating.
    pub fn reuse_prefix(&mut self, tokens: &[u32]) -> usize {
        let common = self.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // Keep at least one token to evaluate, so there are fresh logits.
        let keep = common.min(tokens.len().saturating_sub(1));
        self.tokens.truncate(keep);
        keep
    }

    /// Saves this session and `state` (the actor's own bytes, e.g. its sampler) to the snapshot file the host
    /// chose. Returns false if the host could not write it.
    pub fn save(&self, state: &[u8]) -> bool {
        // SAFETY: all buffers are this session's and readable for the call.
        unsafe {
            raw::session_save(
                self.model.handle,
                self.kv.ptr,
                self.kv_dtype as u32,
                self.max_seq,
                self.tokens.as_ptr(),
                self.tokens.len(),
                state.as_ptr(),
                state.len(),
            ) == 0
        }
    }

    /// Replaces this session's contents with the snapshot file the host chose; returns the saved state bytes,
    /// or `None` if the host refused the file (wrong model, corrupt, too long for this session).
    pub fn load(&mut self) -> Option<Vec<u8>> {
        let mut tokens = vec![0u32; self.max_seq as usize];
        let mut state = vec![0u8; 4096];
        // SAFETY: kv, tokens and state are writable buffers of the stated capacities.
        let n = unsafe {
            raw::session_load(
                self.model.handle,
                self.kv.ptr,
                self.kv_dtype as u32,
                self.max_seq,
                tokens.as_mut_ptr(),
                state.as_mut_ptr(),
                state.len(),
            )
        };
        if n < 0 {
            return None;
        }
        tokens.truncate(n as usize);
        self.tokens = tokens;
        let state_len = u32::from_le_bytes([state[0], state[1], state[2], state[3]]) as usize;
        Some(state.get(4..4 + state_len).map(<[u8]>::to_vec).unwrap_or_default())
    }

    /// Evaluates `tokens` after those in the cache and returns the next-token logits. Returns `None` (and
    /// evaluates nothing) when they do not fit in the cache.
    pub fn feed(&mut self, tokens: &[u32]) -> Option<&mut [f32]> {
        if tokens.is_empty() || self.tokens.len() + tokens.len() > self.max_seq as usize {
            return None;
        }
        // SAFETY: kv and logits are this session's buffers sized for the model and `max_seq`; tokens is
        // readable; the three are distinct allocations. The host computes in place and returns when done.
        unsafe {
            raw::forward(
                self.model.handle,
                self.kv.ptr,
                self.kv_dtype as u32,
                self.max_seq,
                self.tokens.len() as u32,
                tokens.as_ptr(),
                tokens.len(),
                self.logits.as_mut_ptr(),
            )
        };
        self.tokens.extend_from_slice(tokens);
        Some(&mut self.logits)
    }
}
