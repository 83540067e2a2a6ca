//! Host ABI for inference: coarse calls only. The KV cache, the token buffer and the logits live in the
//! actor's memory; `forward` computes on them in place. Text (prompts, pieces, templates) is the only thing
//! copied, and the ledger counts it as text.
//!
//! | import | signature | |
//! |---|---|---|
//! | `model_open` | `(name_ptr, name_len) -> i32` | handle of a model the host has loaded under that name |
//! | `model_info` | `(model, out_ptr)` | writes [`MODEL_INFO_WORDS`] u32s: [`driftwood_abi::ModelInfo`] |
//! | `tokenize` | `(model, text_ptr, text_len, add_special, out_ptr, out_cap) -> i32` | token ids (u32) |
//! | `detokenize` | `(model, ids_ptr, n, skip_special, out_ptr, out_cap) -> i32` | UTF-8 bytes |
//! | `chat_template` | `(model, json_ptr, json_len, add_generation_prompt, out_ptr, out_cap) -> i32` | rendered prompt |
//! | `forward` | `(model, kv_ptr, kv_dtype, max_seq, pos, tokens_ptr, n, logits_ptr)` | runs `n` tokens at `pos`, writes the last token's logits |
//! | `emit` | `(ptr, len)` | streams generated text to the host's output |
//!
//! The KV cache (`kv_ptr`, `kv_dtype`, `max_seq`) is `layers · 2 · max_seq · kv_heads · head_dim` elements of
//! `kv_dtype` (0 = f32, 1 = bf16), [`KV_ALIGN`]-byte aligned; `model_info` says which dtype the host recommends
//! (bf16 on CUDA, whose kernels read only bf16 caches) and the bytes one token takes in it.
//!
//! The cache is the host's to write: `forward` writes rows `pos..pos + n` and reads rows `0..pos + n`. A
//! whole-actor snapshot of an actor in CUDA managed memory stores the rows below the highest one `forward` or
//! `session_load` wrote, copied from the device, and stores the rest of the cache as zero; so bytes a guest
//! writes itself past those rows read as zero after a restore. (Reading the cache from the CPU would move it to
//! host memory, under the decode passes of every other actor.)
//!
//! Calls returning `i32` follow one protocol: the result is the number of elements the output needs; when
//! that exceeds `out_cap` nothing is written and the guest retries with a larger buffer.

use std::sync::Arc;
use std::time::Instant;

use driftwood_backend::{DType, TensorMut};
use driftwood_engine::{Cancel, ChatMessage, EngineError, KvCache, Model};
use driftwood_memory::CopyKind;
use wasmtime::{Caller, Linker};

use super::validate::{check_range, disjoint};
use super::{AbiError, MODULE, guest_memory};
use crate::actor::ActorState;
use crate::limits::HostDeviceMemory;

/// Words written by `model_info`.
pub const MODEL_INFO_WORDS: usize = driftwood_abi::MODEL_INFO_WORDS;

/// Alignment, in bytes, of a KV cache a guest passes.
pub const KV_ALIGN: u32 = driftwood_abi::KV_ALIGN;

/// The `model_info` record of `model` for a guest whose host recommends KV caches of `kv_dtype`
/// (see [`driftwood_abi::ModelInfo`] for the word layout).
pub fn model_info_words(model: &Model, kv_dtype: DType) -> [u32; MODEL_INFO_WORDS] {
    let c = model.config();
    let eos_ids = model.eos_token_ids();
    let mut eos = [0u32; driftwood_abi::MAX_EOS];
    for (slot, &e) in eos.iter_mut().zip(eos_ids) {
        *slot = e;
    }
    let word = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    driftwood_abi::ModelInfo {
        vocab_size: word(c.vocab_size),
        hidden_size: word(c.hidden_size),
        layers: word(c.num_layers),
        heads: word(c.num_heads),
        kv_heads: word(c.num_kv_heads),
        head_dim: word(c.head_dim),
        max_position: word(c.max_position_embeddings),
        kv_bytes_per_token: word(model.kv_bytes(1, kv_dtype)),
        bos: c.bos_token_id.unwrap_or(u32::MAX),
        eos_count: word(eos_ids.len().min(driftwood_abi::MAX_EOS)),
        eos,
        kv_dtype: kv_dtype.code(),
        kv_align: KV_ALIGN,
        reserved: [0; 2],
    }
    .to_words()
}

/// A guest's KV cache operand: its dtype code checked (f32 or bf16), its range inside `data_len` bytes of
/// guest memory checked and [`KV_ALIGN`]-aligned.
pub(super) fn kv_operand(
    call: &'static str,
    model: &Model,
    (ptr, dtype, max_seq): (u32, u32, u32),
    data_len: usize,
) -> Result<(std::ops::Range<usize>, DType), AbiError> {
    let dtype = match DType::from_code(dtype) {
        Some(d @ (DType::F32 | DType::BF16)) => d,
        _ => return Err(AbiError::new(call, format!("kv dtype code {dtype} is not a KV dtype (0 = f32, 1 = bf16)"))),
    };
    if ptr % KV_ALIGN != 0 {
        return Err(AbiError::new(call, format!("operand `kv` at {ptr:#x} is not {KV_ALIGN}-byte aligned")));
    }
    let range = check_range(call, "kv", ptr, model.kv_elems(max_seq as usize) as u64, dtype.size(), data_len)?;
    Ok((range, dtype))
}

pub(super) fn model(state: &ActorState, call: &'static str, handle: u32) -> Result<Arc<Model>, AbiError> {
    state
        .models
        .get(handle as usize)
        .map(|(_, m)| m.clone())
        .ok_or_else(|| AbiError::new(call, format!("model handle {handle} was not returned by model_open")))
}

fn text<'a>(data: &'a [u8], call: &'static str, what: &str, ptr: u32, len: u32) -> Result<&'a str, AbiError> {
    let range = check_range(call, what, ptr, len as u64, 1, data.len())?;
    std::str::from_utf8(&data[range]).map_err(|e| AbiError::new(call, format!("operand `{what}` is not UTF-8: {e}")))
}

/// Writes `bytes` at `out_ptr` if they fit in `out_cap` bytes; returns `needed` (elements) either way.
fn write_out(
    data: &mut [u8],
    state: &ActorState,
    call: &'static str,
    (out_ptr, out_cap, elem): (u32, u32, usize),
    bytes: &[u8],
) -> Result<i32, AbiError> {
    let needed = bytes.len() / elem;
    let needed_i32 = i32::try_from(needed).map_err(|_| AbiError::new(call, "result too large".into()))?;
    if needed <= out_cap as usize {
        let range = check_range(call, "out", out_ptr, needed as u64, elem, data.len())?;
        data[range].copy_from_slice(bytes);
        state.record_copy(CopyKind::Text, bytes.len());
    }
    Ok(needed_i32)
}

pub(crate) fn link(linker: &mut Linker<ActorState>) -> anyhow::Result<()> {
    linker.func_wrap(MODULE, "model_open", |mut c: Caller<'_, ActorState>, ptr: u32, len: u32| {
        model_open(&mut c, ptr, len)
    })?;
    linker.func_wrap(MODULE, "model_info", |mut c: Caller<'_, ActorState>, m: u32, out: u32| {
        model_info(&mut c, m, out).map_err(wasmtime::Error::from)
    })?;
    linker.func_wrap(
        MODULE,
        "tokenize",
        |mut c: Caller<'_, ActorState>, m: u32, ptr: u32, len: u32, special: u32, out: u32, cap: u32| {
            tokenize(&mut c, m, (ptr, len), special != 0, (out, cap)).map_err(wasmtime::Error::from)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "detokenize",
        |mut c: Caller<'_, ActorState>, m: u32, ids: u32, n: u32, skip: u32, out: u32, cap: u32| {
            detokenize(&mut c, m, (ids, n), skip != 0, (out, cap)).map_err(wasmtime::Error::from)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "chat_template",
        |mut c: Caller<'_, ActorState>, m: u32, ptr: u32, len: u32, add_gen: u32, out: u32, cap: u32| {
            chat_template(&mut c, m, (ptr, len), add_gen != 0, (out, cap)).map_err(wasmtime::Error::from)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "forward",
        |mut c: Caller<'_, ActorState>,
         m: u32,
         kv: u32,
         kv_dtype: u32,
         max_seq: u32,
         pos: u32,
         tokens: u32,
         n: u32,
         logits: u32| { forward(&mut c, m, (kv, kv_dtype, max_seq), pos, (tokens, n), logits) },
    )?;
    linker.func_wrap(MODULE, "emit", |mut c: Caller<'_, ActorState>, ptr: u32, len: u32| emit(&mut c, ptr, len))?;
    Ok(())
}

/// Opening a name again returns the handle already open for it (while it names the same model); new handles
/// are charged to the actor's host allowance.
fn model_open(caller: &mut Caller<'_, ActorState>, ptr: u32, len: u32) -> wasmtime::Result<i32> {
    const CALL: &str = "driftwood.model_open";
    let (data, state) = guest_memory(caller, CALL)?;
    let name = text(data, CALL, "name", ptr, len)?;
    let model = state.registry.get(name).ok_or_else(|| {
        AbiError::new(CALL, format!("no model named `{name}` is loaded; loaded: {}", state.registry.names().join(", ")))
    })?;
    let handle = state.open_model(CALL, name, model)?;
    // At most MAX_MODEL_HANDLES handles exist, far below i32::MAX.
    Ok(handle as i32)
}

fn model_info(caller: &mut Caller<'_, ActorState>, handle: u32, out: u32) -> Result<(), AbiError> {
    const CALL: &str = "driftwood.model_info";
    let (data, state) = guest_memory(caller, CALL)?;
    let words = model_info_words(&*model(state, CALL, handle)?, state.kv_dtype);
    let range = check_range(CALL, "out", out, MODEL_INFO_WORDS as u64, 4, data.len())?;
    for (dst, w) in data[range].chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    Ok(())
}

fn tokenize(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (ptr, len): (u32, u32),
    add_special: bool,
    (out, cap): (u32, u32),
) -> Result<i32, AbiError> {
    const CALL: &str = "driftwood.tokenize";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = model(state, CALL, handle)?;
    let input = text(data, CALL, "text", ptr, len)?;
    state.record_copy(CopyKind::Text, input.len());
    let ids = model.tokenize(input, add_special).map_err(|e| AbiError::new(CALL, e.to_string()))?;
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    write_out(data, state, CALL, (out, cap, 4), &bytes)
}

fn detokenize(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (ids_ptr, n): (u32, u32),
    skip_special: bool,
    (out, cap): (u32, u32),
) -> Result<i32, AbiError> {
    const CALL: &str = "driftwood.detokenize";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = model(state, CALL, handle)?;
    let range = check_range(CALL, "ids", ids_ptr, n as u64, 4, data.len())?;
    let ids: Vec<u32> = data[range].chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    state.record_copy(CopyKind::Text, ids.len() * 4);
    let vocab = model.config().vocab_size;
    if let Some((i, bad)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
        return Err(AbiError::new(CALL, format!("token id {bad} (ids[{i}]) is outside the {vocab}-token vocabulary")));
    }
    let text = model.detokenize(&ids, skip_special).map_err(|e| AbiError::new(CALL, e.to_string()))?;
    write_out(data, state, CALL, (out, cap, 1), text.as_bytes())
}

fn chat_template(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (ptr, len): (u32, u32),
    add_generation_prompt: bool,
    (out, cap): (u32, u32),
) -> Result<i32, AbiError> {
    const CALL: &str = "driftwood.chat_template";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = model(state, CALL, handle)?;
    let json = text(data, CALL, "messages", ptr, len)?;
    state.record_copy(CopyKind::Text, json.len());
    let messages: Vec<ChatMessage> = serde_json::from_str(json)
        .map_err(|e| AbiError::new(CALL, format!("messages must be a JSON list of {{role, content}}: {e}")))?;
    let prompt = model.render_chat(&messages, add_generation_prompt).map_err(|e| AbiError::new(CALL, e.to_string()))?;
    write_out(data, state, CALL, (out, cap, 1), prompt.as_bytes())
}

fn forward(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (kv_ptr, kv_dtype, max_seq): (u32, u32, u32),
    pos: u32,
    (tokens_ptr, n): (u32, u32),
    logits_ptr: u32,
) -> wasmtime::Result<()> {
    const CALL: &str = "driftwood.forward";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = model(state, CALL, handle)?;
    let vocab = model.config().vocab_size;
    let (kv, kv_dtype) = kv_operand(CALL, &model, (kv_ptr, kv_dtype, max_seq), data.len())?;
    let tokens = check_range(CALL, "tokens", tokens_ptr, n as u64, 4, data.len())?;
    let logits = check_range(CALL, "logits", logits_ptr, vocab as u64, 4, data.len())?;
    disjoint(CALL, ("kv", &kv), ("tokens", &tokens))?;
    disjoint(CALL, ("logits", &logits), ("tokens", &tokens))?;
    disjoint(CALL, ("logits", &logits), ("kv", &kv))?;
    if state.managed {
        let rows_end = (pos as usize).saturating_add(n as usize);
        state.kv.wrote(crate::kv_rows::KvRows::of(kv.clone(), &model, kv_dtype, max_seq as usize, rows_end));
    }
    let base = data.as_mut_ptr();
    if let Some(batcher) = state.batcher.clone()
        && n == 1
    {
        // A decode step: joins the next batched pass of this runtime.
        let t = &data[tokens.start..tokens.end];
        let token = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        // A step that cannot run fails here, for this actor alone, before it joins a pass.
        model.check_decode(max_seq as usize, pos as usize, token).map_err(|e| AbiError::new(CALL, e.to_string()))?;
        let step = crate::batch::Step {
            kv: base as usize + kv.start,
            kv_dtype,
            max_seq: max_seq as usize,
            pos: pos as usize,
            token,
            logits: base as usize + logits.start,
            model,
        };
        let started = Instant::now();
        // SAFETY (the contract of `Batcher::decode`): kv and logits were checked above to lie inside this
        // actor's memory, aligned (kv to KV_ALIGN, logits to 4; the region's base is page-aligned), and disjoint. This thread is
        // the actor's own, inside its host call: the guest is suspended and `data` stays borrowed until
        // `decode` returns, which it does only after the pass computing on these bytes is complete. So no
        // one else touches them while the leader's thread does.
        unsafe { batcher.decode(step, &state.decoding) }.map_err(|e| -> wasmtime::Error {
            if e.device_memory {
                HostDeviceMemory { call: CALL, detail: e.message }.into()
            } else {
                AbiError::new(CALL, e.message).into()
            }
        })?;
        state.stats.record_forward(1, started.elapsed());
        return Ok(());
    }
    // Prefill (or batching off) runs alone; batched decode steps of other actors do not wait for it.
    if let Some(batcher) = &state.batcher {
        batcher.stop_decoding(&state.decoding);
    }
    // SAFETY: each range was checked to lie inside the actor's memory and be aligned to its element (kv to
    // KV_ALIGN; the region's base is page-aligned); kv and logits are written and overlap nothing else; tokens are only read. The
    // guest is suspended in this call, which returns only after the backend is done with all three.
    let (mut kv, tokens, logits) = unsafe {
        (
            KvCache::from_raw_parts_typed(base.add(kv.start), kv_dtype, &model, max_seq as usize),
            std::slice::from_raw_parts(base.add(tokens.start).cast::<u32>(), n as usize),
            TensorMut::from_raw_parts(base.add(logits.start), vocab, DType::F32),
        )
    };
    let started = Instant::now();
    let device = state.device_handle();
    // The pass stops between layers once the call's deadline passes or the runtime shuts down.
    let stop = state.stop_probe();
    let result = model.forward_cancellable(
        &device,
        &mut kv,
        pos as usize,
        tokens,
        logits,
        &mut state.scratch,
        Cancel::new(&stop),
    );
    match result {
        Ok(()) => {}
        Err(EngineError::Cancelled) => return Err(state.interrupt_error(CALL)),
        Err(e) if e.is_device_out_of_memory() => {
            return Err(HostDeviceMemory { call: CALL, detail: e.to_string() }.into());
        }
        Err(e) => return Err(AbiError::new(CALL, e.to_string()).into()),
    }
    state.stats.record_forward(n as usize, started.elapsed());
    Ok(())
}

/// Text the host keeps (no sink) is charged to the actor's host allowance until taken.
fn emit(caller: &mut Caller<'_, ActorState>, ptr: u32, len: u32) -> wasmtime::Result<()> {
    const CALL: &str = "driftwood.emit";
    let (data, state) = guest_memory(caller, CALL)?;
    let piece = text(data, CALL, "text", ptr, len)?;
    state.record_copy(CopyKind::Text, piece.len());
    state.emit(CALL, piece)
}
