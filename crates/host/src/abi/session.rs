//! Session snapshots through the host ABI: the guest names its session's buffers, the host (which alone
//! chooses the file: guests never see host paths) writes or reads a portable safetensors snapshot.
//!
//! | import | signature | |
//! |---|---|---|
//! | `session_save` | `(model, kv, kv_dtype, max_seq, tokens, n, state, state_len) -> i32` | 0, or -1 (reason in [`Actor::take_host_error`](crate::Actor::take_host_error)) |
//! | `session_load` | `(model, kv, kv_dtype, max_seq, tokens_out, state_out, state_cap) -> i32` | tokens restored, or -1 |
//!
//! The KV operand is as for `forward` (see [`inference`](super::inference)). The file (format version 3) stores
//! the cache's own dtype; a load into a cache of the other dtype converts (bf16 → f32 exactly, f32 → bf16 rounded
//! to nearest even), so a session saved from either dtype, on either backend, resumes on the other.
//!
//! `session_load` writes the state as a u32 little-endian length followed by the bytes.
//!
//! `session_save` returns once the snapshot no longer needs guest memory: a small one is copied out, a large one
//! is written to a temporary file next to the session file. Writing, the `fsync`s and the rename over the session
//! file run on another thread (the previous file stays whole until then). The host settles that work before the actor's next save or load and when the actor is dropped, and
//! [`Actor::settle_session_saves`](crate::Actor::settle_session_saves) waits for it on demand.

use driftwood_backend::DType;
use driftwood_engine::Model;
use driftwood_memory::CopyKind;
use driftwood_snapshot::{KvDtype, SessionExpect, SessionReader, SessionSnapshot, stage_session, write_session};
use wasmtime::{Caller, Linker};

use super::inference::kv_operand;
use super::validate::{check_range, disjoint};
use super::{AbiError, MODULE, guest_memory};
use crate::actor::ActorState;

pub(crate) fn link(linker: &mut Linker<ActorState>) -> anyhow::Result<()> {
    linker.func_wrap(
        MODULE,
        "session_save",
        |mut c: Caller<'_, ActorState>,
         m: u32,
         kv: u32,
         kv_dtype: u32,
         max_seq: u32,
         tokens: u32,
         n: u32,
         state: u32,
         len: u32| {
            session_save(&mut c, m, (kv, kv_dtype, max_seq), (tokens, n), (state, len)).map_err(wasmtime::Error::from)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "session_load",
        |mut c: Caller<'_, ActorState>,
         m: u32,
         kv: u32,
         kv_dtype: u32,
         max_seq: u32,
         tokens: u32,
         state: u32,
         cap: u32| {
            session_load(&mut c, m, (kv, kv_dtype, max_seq), tokens, (state, cap)).map_err(wasmtime::Error::from)
        },
    )?;
    Ok(())
}

fn u32s(bytes: &[u8]) -> &[u32] {
    // SAFETY: callers pass 4-byte-aligned ranges of guest memory (checked), whose length is a multiple of 4;
    // every bit pattern is a u32.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) }
}

/// The snapshot format's name for a KV dtype the ABI accepted (f32 or bf16, see `kv_operand`).
fn file_dtype(dtype: DType) -> KvDtype {
    if dtype == DType::BF16 { KvDtype::Bf16 } else { KvDtype::F32 }
}

/// Byte offset of layer `layer`'s K (`which` = 0) or V (1) rows in a cache of `max_seq` tokens of `dtype`.
fn kv_offset(model: &Model, layer: usize, which: usize, max_seq: usize, dtype: DType) -> usize {
    ((layer * 2 + which) * max_seq) * model.config().kv_dim() * dtype.size()
}

fn session_save(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (kv_ptr, kv_dtype, max_seq): (u32, u32, u32),
    (tokens_ptr, n): (u32, u32),
    (state_ptr, state_len): (u32, u32),
) -> Result<i32, AbiError> {
    const CALL: &str = "driftwood.session_save";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = super::inference::model(state, CALL, handle)?;
    let (kv, kv_dtype) = kv_operand(CALL, &model, (kv_ptr, kv_dtype, max_seq), data.len())?;
    let tokens = check_range(CALL, "tokens", tokens_ptr, n as u64, 4, data.len())?;
    let guest_state = check_range(CALL, "state", state_ptr, state_len as u64, 1, data.len())?;
    if n > max_seq {
        return Err(AbiError::new(CALL, format!("{n} tokens do not fit a {max_seq}-token cache")));
    }
    let Some(path) = state.session_file.clone() else {
        state.host_error = Some("no session snapshot file was chosen by the host".into());
        return Ok(-1);
    };
    let c = model.config();
    let row = c.kv_dim() * kv_dtype.size();
    let kv_range = kv.clone();
    let kv_bytes = &data[kv];
    let rows = |l: usize, which: usize| {
        let at = kv_offset(&model, l, which, max_seq as usize, kv_dtype);
        &kv_bytes[at..at + n as usize * row]
    };
    // Borrowed straight from guest memory, in the cache's own dtype: the used rows of each layer's K and V.
    let layers = (0..c.num_layers).map(|l| (rows(l, 0), rows(l, 1))).collect();
    let snapshot = SessionSnapshot {
        model_fingerprint: model.fingerprint(),
        tokenizer_fingerprint: model.tokenizer_fingerprint(),
        num_layers: c.num_layers,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        tokens: u32s(&data[tokens]),
        guest_state: &data[guest_state],
        kv_dtype: file_dtype(kv_dtype),
        layers,
    };
    // The actor is held up only until the snapshot no longer needs its memory; the rest (checksum, writing,
    // fsyncs, rename) runs on another thread. A small snapshot is copied out whole, which costs less than
    // writing a new file; a large one is written from guest memory here and only made durable in the background,
    // so an in-flight save never holds a second copy of a large KV cache.
    let bytes = snapshot.data_bytes();
    let result = if bytes <= COPY_OUT_LIMIT {
        let owned = snapshot.to_owned_snapshot();
        state.record_copy(CopyKind::Snapshot, bytes);
        let target = path.clone();
        state.save_in_background(path, move || write_session(&target, &owned.view()))
    } else {
        match stage_session(&path, &snapshot) {
            Ok(staged) => {
                state.record_copy(CopyKind::Snapshot, staged.bytes() as usize);
                state.save_in_background(path, move || staged.commit())
            }
            Err(e) => Err(format!("cannot save the session to {}: {e}", path.display())),
        }
    };
    // The rows were read by the CPU: with managed memory, back to the device for the next steps.
    state.return_to_device(data.as_ptr(), &kv_range);
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            state.host_error = Some(e);
            Ok(-1)
        }
    }
}

/// Snapshots up to this size are copied out of guest memory and written in the background.
const COPY_OUT_LIMIT: usize = 32 << 20;

fn session_load(
    caller: &mut Caller<'_, ActorState>,
    handle: u32,
    (kv_ptr, kv_dtype, max_seq): (u32, u32, u32),
    tokens_ptr: u32,
    (state_ptr, state_cap): (u32, u32),
) -> Result<i32, AbiError> {
    const CALL: &str = "driftwood.session_load";
    let (data, state) = guest_memory(caller, CALL)?;
    let model = super::inference::model(state, CALL, handle)?;
    let (kv, kv_dtype) = kv_operand(CALL, &model, (kv_ptr, kv_dtype, max_seq), data.len())?;
    let tokens = check_range(CALL, "tokens", tokens_ptr, max_seq as u64, 4, data.len())?;
    let guest_state = check_range(CALL, "state", state_ptr, state_cap as u64, 1, data.len())?;
    disjoint(CALL, ("kv", &kv), ("tokens", &tokens))?;
    disjoint(CALL, ("state", &guest_state), ("kv", &kv))?;
    disjoint(CALL, ("state", &guest_state), ("tokens", &tokens))?;
    let Some(path) = state.session_file.clone() else {
        state.host_error = Some("no session snapshot file was chosen by the host".into());
        return Ok(-1);
    };
    if let Err(e) = state.settle_save() {
        state.host_error = Some(e);
        return Ok(-1);
    }
    let c = model.config();
    let expect = SessionExpect {
        model_fingerprint: model.fingerprint().into(),
        tokenizer_fingerprint: model.tokenizer_fingerprint().into(),
        num_layers: c.num_layers,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        max_tokens: max_seq as usize,
    };
    // Header, sizes and shapes are checked before anything is read; the KV is then read straight into the
    // guest's cache (converted when the file's dtype differs) with every digest verified, and zeroed again if
    // any check fails, so the guest never sees a byte of a refused file.
    let reader = match SessionReader::open(&path, Some(&expect)) {
        Ok(reader) => reader,
        Err(e) => {
            state.host_error = Some(format!("cannot restore the session from {}: {e}", path.display()));
            return Ok(-1);
        }
    };
    let saved_state = reader.guest_state().to_vec();
    if saved_state.len() + 4 > state_cap as usize {
        state.host_error = Some(format!("the snapshot's actor state ({} bytes) does not fit", saved_state.len()));
        return Ok(-1);
    }
    let n = reader.n_tokens();
    let token_bytes: Vec<u8> = reader.tokens().iter().flat_map(|t| t.to_le_bytes()).collect();
    let file_len = reader.file_len();
    let row = c.kv_dim() * kv_dtype.size();
    let block = max_seq as usize * row; // one layer's K (or V) rows in the guest's cache
    // Disjoint views of the first `n` rows of every K and V block of the cache: (layer, {k, v}, max_seq, kv_dim).
    let mut dst = Vec::with_capacity(c.num_layers);
    let mut rest = &mut data[kv.start..kv.start + 2 * c.num_layers * block];
    for _ in 0..c.num_layers {
        let (k, tail) = rest.split_at_mut(block);
        let (v, tail) = tail.split_at_mut(block);
        rest = tail;
        dst.push((&mut k[..n * row], &mut v[..n * row]));
    }
    if let Err(e) = reader.read_kv_into(file_dtype(kv_dtype), dst) {
        state.host_error = Some(format!("cannot restore the session from {}: {e}", path.display()));
        return Ok(-1);
    }
    if state.managed {
        state.kv.wrote(crate::kv_rows::KvRows::of(kv.clone(), &model, kv_dtype, max_seq as usize, n));
    }
    if state.managed
        && n > 0
        && let driftwood_backend::Device::Cuda(cuda) = state.device()
    {
        // The restored rows were written by the CPU, so the driver holds them in host memory: move them to the
        // device now, on the stream the actor's next step runs on, instead of faulting them over one by one.
        let base = data.as_ptr() as u64 + kv.start as u64;
        let prefetched = cuda.exec().and_then(|exec| {
            (0..2 * c.num_layers).try_for_each(|b| exec.prefetch_to_device(base + (b * block) as u64, n * row))
        });
        if let Err(e) = prefetched {
            state.host_error = Some(format!("the session was restored, but moving it to the GPU failed: {e}"));
            return Ok(-1);
        }
    }
    data[tokens.start..tokens.start + token_bytes.len()].copy_from_slice(&token_bytes);
    let s = guest_state.start;
    data[s..s + 4].copy_from_slice(&(saved_state.len() as u32).to_le_bytes());
    data[s + 4..s + 4 + saved_state.len()].copy_from_slice(&saved_state);
    state.record_copy(CopyKind::Snapshot, file_len as usize);
    Ok(n as i32)
}
