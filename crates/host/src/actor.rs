//! [`Actor`]: one instance in its own wasmtime store, with its region, limits, ledger and logs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use driftwood_backend::Device;
use driftwood_engine::{Model, Scratch};
use driftwood_memory::{CopyKind, CopyLedger, LedgerSnapshot, SharedRegion};
use wasmtime::{Instance, Memory, Module, Store, Trap, WasmParams, WasmResults};

use crate::limits::{
    HostAllowanceExceeded, HostDeadline, HostDeviceMemory, HostShutdown, Limiter, MAX_MODEL_HANDLES,
    MODEL_HANDLE_BYTES, MemoryCapExceeded,
};
use crate::runtime::{EPOCH_TICK, ModelRegistry};
use crate::{ActorError, ActorLimits, LogMode, Runtime, abi};

/// Newest log lines an actor keeps in [`LogMode::Capture`] (fewer when their bytes would pass the actor's host
/// allowance).
const CAPTURED_LOG_LINES: usize = 1024;

/// Bytes a captured log line is charged to the host allowance beyond its text (the line's own bookkeeping).
const LOG_LINE_OVERHEAD: usize = 64;

/// Where a snapshot being restored comes from.
pub(crate) enum SnapshotSource {
    /// A file, opened and validated but for its pages, which are streamed into memory.
    File(Box<driftwood_snapshot::ActorReader>),
    /// Bytes held in memory (an object fetched from a store), validated whole.
    Bytes(driftwood_snapshot::ActorFile),
}

/// One line an actor logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// 0 error, 1 warn, 2 info, 3 debug, 4 trace (larger values are kept as given).
    pub level: u32,
    /// The text, with invalid UTF-8 replaced.
    pub text: String,
}

/// Time and tokens of an actor's `forward` calls (calls of more than one token count as prefill).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct InferenceStats {
    /// Tokens evaluated by multi-token calls.
    pub prefill_tokens: u64,
    /// Seconds spent in them.
    pub prefill_secs: f64,
    /// Single-token calls (decode steps).
    pub decode_tokens: u64,
    /// Seconds spent in them.
    pub decode_secs: f64,
}

impl InferenceStats {
    pub(crate) fn record_forward(&mut self, tokens: usize, took: Duration) {
        if tokens > 1 {
            self.prefill_tokens += tokens as u64;
            self.prefill_secs += took.as_secs_f64();
        } else {
            self.decode_tokens += tokens as u64;
            self.decode_secs += took.as_secs_f64();
        }
    }
}

/// Where text an actor emits goes; an `Err` refuses the text and traps the actor with its message.
type EmitSink = Box<dyn FnMut(&str) -> Result<(), String> + Send>;

/// Host-side state of one actor, owned by its store.
pub(crate) struct ActorState {
    limiter: Limiter,
    /// The actor's exported memory, set right after instantiation.
    pub(crate) memory: Option<Memory>,
    device: Arc<Device>,
    /// This actor's copies.
    ledger: CopyLedger,
    /// Every actor's copies, shared with the runtime.
    runtime_ledger: Arc<CopyLedger>,
    log_mode: LogMode,
    logs: VecDeque<LogLine>,
    /// Bytes of `logs` charged to the host allowance.
    log_bytes: usize,
    /// Models the host has loaded, by name.
    pub(crate) registry: Arc<ModelRegistry>,
    /// Models this actor opened, with the name it opened each by; the index is the guest's handle.
    pub(crate) models: Vec<(String, Arc<Model>)>,
    /// Activation scratch of the forward pass (backend memory, not guest memory).
    pub(crate) scratch: Scratch,
    pub(crate) stats: InferenceStats,
    emit_sink: Option<EmitSink>,
    emitted: String,
    /// Where `session_save` / `session_load` write and read; chosen by the host, never by the guest.
    pub(crate) session_file: Option<std::path::PathBuf>,
    /// Why the last host call that returned an error code failed.
    pub(crate) host_error: Option<String>,
    /// The last `session_save`, written but still being synced and renamed into place on its own thread.
    pending_save: Option<PendingSave>,
    /// The runtime's decode rendezvous, when batching is on.
    pub(crate) batcher: Option<Arc<crate::batch::Batcher>>,
    /// Whether the batcher counts this actor as decoding (in a generation loop, see `batch`).
    pub(crate) decoding: Arc<std::sync::atomic::AtomicBool>,
    /// When the running call's deadline passes (`None`: no call runs, or no deadline).
    call_deadline: Option<Instant>,
    /// Set by [`Runtime::shutdown`](crate::Runtime::shutdown): long host calls stop at their next check.
    shutdown: Arc<AtomicBool>,
    /// The KV cache dtype `model_info` recommends to this actor (the runtime's, see `Runtime::kv_dtype`).
    pub(crate) kv_dtype: driftwood_backend::DType,
    /// Whether the actor's memory is CUDA managed memory (restored pages are then prefetched to the device).
    pub(crate) managed: bool,
    /// With managed memory: the KV cache rows the host wrote (`forward`, `session_load`), which a whole-actor
    /// snapshot copies from the device instead of reading the cache from the CPU (see `kv_rows`).
    pub(crate) kv: crate::kv_rows::KvTrace,
}

/// A session save whose remaining work (writing, `fsync`, rename, directory `fsync`) runs off the actor's thread.
///
/// Invariant: at most one per actor, and it is settled (joined) before the next `session_save` or
/// `session_load`, before the actor is dropped, and by [`Actor::settle_session_saves`]; so saves land in call
/// order and a load never reads a file that a save of this actor is still replacing.
struct PendingSave {
    target: std::path::PathBuf,
    commit: std::thread::JoinHandle<Result<u64, driftwood_snapshot::SnapshotError>>,
}

impl Drop for ActorState {
    fn drop(&mut self) {
        // Nothing is lost by dropping an actor right after a save: the save finishes here. Its error, if any,
        // has no caller left to take it.
        if let Err(e) = self.settle_save() {
            eprintln!("driftwood: {e}");
        }
    }
}

impl ActorState {
    pub(crate) fn new(
        limits: ActorLimits,
        device: Arc<Device>,
        runtime_ledger: Arc<CopyLedger>,
        log_mode: LogMode,
        registry: Arc<ModelRegistry>,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        ActorState {
            limiter: Limiter { limits },
            memory: None,
            device,
            ledger: CopyLedger::new(),
            runtime_ledger,
            log_mode,
            logs: VecDeque::new(),
            log_bytes: 0,
            registry,
            models: Vec::new(),
            scratch: Scratch::default(),
            stats: InferenceStats::default(),
            emit_sink: None,
            emitted: String::new(),
            session_file: None,
            host_error: None,
            pending_save: None,
            batcher: None,
            decoding: Arc::default(),
            call_deadline: None,
            shutdown,
            kv_dtype: crate::CPU_KV_DTYPE,
            managed: false,
            kv: Default::default(),
        }
    }

    /// With managed memory on the CUDA backend: asks the driver to move `range` of the actor's memory (whose
    /// first byte is at `base`), a KV cache the CPU has just read, back to the device, on the stream the next
    /// step runs on. The driver migrates every page the CPU reads to host memory, and the region is mapped for
    /// the device wherever its pages are (`SET_ACCESSED_BY`), so without this the device would read those
    /// rows across the bus at every later step and never fault them back. Only a hint: if the driver refuses,
    /// the pages stay where they are and every step still computes the same results.
    pub(crate) fn return_to_device(&self, base: *const u8, range: &std::ops::Range<usize>) {
        if !self.managed || range.is_empty() {
            return;
        }
        let Device::Cuda(cuda) = &*self.device else { return };
        let start = base as u64 + range.start as u64;
        // Ignored on purpose (see above); the next step reports a real driver fault if there is one.
        let _ = cuda.exec().and_then(|exec| exec.prefetch_to_device(start, range.len()));
    }

    /// Stops a long host call between two pieces of its work: `Err` once the running call's deadline has
    /// passed or the runtime is shutting down. Each piece of host work is bounded, so a call past its
    /// deadline returns within about one piece of it.
    ///
    /// # Errors
    ///
    /// The deadline or shutdown error the host reports for `call` (see `classify`).
    pub(crate) fn check_interrupt(&self, call: &'static str) -> wasmtime::Result<()> {
        if self.shutdown.load(Ordering::Relaxed) {
            return Err(HostShutdown { call }.into());
        }
        if self.call_deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(HostDeadline { call }.into());
        }
        Ok(())
    }

    /// What [`check_interrupt`](Self::check_interrupt) checks, as a hook for work that cannot reach the
    /// state (the engine's [`Cancel`](driftwood_engine::Cancel)): `true` once the call must stop.
    pub(crate) fn stop_probe(&self) -> impl Fn() -> bool + Sync + 'static {
        let (deadline, shutdown) = (self.call_deadline, self.shutdown.clone());
        move || shutdown.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The error for work that stopped because [`stop_probe`](Self::stop_probe) said so.
    pub(crate) fn interrupt_error(&self, call: &'static str) -> wasmtime::Error {
        match self.check_interrupt(call) {
            Err(e) => e,
            // The probe saw the deadline pass; nothing undoes that, so this is unreachable in practice.
            Ok(()) => HostDeadline { call }.into(),
        }
    }

    /// Bytes the host keeps for this actor and charges to its host allowance: undrained emitted text,
    /// captured log lines, model handles.
    pub(crate) fn host_bytes_used(&self) -> usize {
        let handles: usize = self.models.iter().map(|(name, _)| name.len() + MODEL_HANDLE_BYTES).sum();
        self.emitted.len() + self.log_bytes + handles
    }

    fn allowance_error(&self, call: &'static str, what: &str, asked: usize) -> HostAllowanceExceeded {
        let allowance = self.limiter.limits.host_bytes;
        HostAllowanceExceeded {
            call,
            detail: format!(
                "{what} of {asked} bytes would pass the actor's host allowance: the host already keeps {} of its \
                 {allowance} bytes (undrained emitted text {}, captured logs {}, {} model handles)",
                self.host_bytes_used(),
                self.emitted.len(),
                self.log_bytes,
                self.models.len()
            ),
        }
    }

    /// The handle for `model` opened as `name`: the one this actor already holds for that name and model, or a
    /// new one charged to the host allowance.
    ///
    /// # Errors
    ///
    /// [`HostAllowanceExceeded`] when a new handle would pass [`MAX_MODEL_HANDLES`] or the allowance.
    pub(crate) fn open_model(&mut self, call: &'static str, name: &str, model: Arc<Model>) -> wasmtime::Result<u32> {
        if let Some(i) = self.models.iter().position(|(n, m)| n == name && Arc::ptr_eq(m, &model)) {
            return Ok(i as u32);
        }
        if self.models.len() >= MAX_MODEL_HANDLES {
            return Err(HostAllowanceExceeded {
                call,
                detail: format!("the actor already holds the most model handles an actor may ({MAX_MODEL_HANDLES})"),
            }
            .into());
        }
        let cost = name.len() + MODEL_HANDLE_BYTES;
        if self.host_bytes_used().saturating_add(cost) > self.limiter.limits.host_bytes {
            return Err(self.allowance_error(call, "a new model handle", cost).into());
        }
        self.models.push((name.to_string(), model));
        Ok((self.models.len() - 1) as u32)
    }

    /// Runs `save` (which writes the session file at `target` and makes it durable) on its own thread, after
    /// the previous background save has finished.
    ///
    /// # Errors
    ///
    /// The previous save's failure, if it failed (`save` is then not started), or a thread that cannot start.
    pub(crate) fn save_in_background(
        &mut self,
        target: std::path::PathBuf,
        save: impl FnOnce() -> Result<u64, driftwood_snapshot::SnapshotError> + Send + 'static,
    ) -> Result<(), String> {
        self.settle_save()?;
        let commit = std::thread::Builder::new()
            .name("driftwood-session-save".into())
            .spawn(save)
            .map_err(|e| format!("cannot start the thread that saves {}: {e}", target.display()))?;
        self.pending_save = Some(PendingSave { target, commit });
        Ok(())
    }

    /// Waits for the background save, if any.
    ///
    /// # Errors
    ///
    /// Why that save could not be synced or renamed into place (the previous file is then unchanged).
    pub(crate) fn settle_save(&mut self) -> Result<(), String> {
        let Some(PendingSave { target, commit }) = self.pending_save.take() else { return Ok(()) };
        match commit.join() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("the session save to {} did not complete: {e}", target.display())),
            Err(_) => Err(format!("the session save to {} panicked", target.display())),
        }
    }

    /// Hands emitted text to the sink, or keeps it for [`Actor::take_emitted`] within the host allowance.
    ///
    /// # Errors
    ///
    /// [`HostAllowanceExceeded`] when the sink refuses the text or keeping it would pass the allowance.
    pub(crate) fn emit(&mut self, call: &'static str, piece: &str) -> wasmtime::Result<()> {
        if let Some(sink) = &mut self.emit_sink {
            return sink(piece).map_err(|detail| HostAllowanceExceeded { call, detail }.into());
        }
        if self.host_bytes_used().saturating_add(piece.len()) > self.limiter.limits.host_bytes {
            return Err(self
                .allowance_error(call, "emitted text the host has not taken, plus this piece,", piece.len())
                .into());
        }
        self.emitted.push_str(piece);
        Ok(())
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// A shared handle to the device, for calls that also borrow other parts of the state mutably.
    pub(crate) fn device_handle(&self) -> Arc<Device> {
        self.device.clone()
    }

    pub(crate) fn record_copy(&self, kind: CopyKind, bytes: usize) {
        self.ledger.record(kind, bytes);
        self.runtime_ledger.record(kind, bytes);
    }

    /// Prints or keeps a log line. Kept lines make room for a new one by dropping the oldest, so that at most
    /// [`CAPTURED_LOG_LINES`] are kept and they stay within the host allowance.
    ///
    /// # Errors
    ///
    /// [`HostAllowanceExceeded`] when the line does not fit even with no older line kept (the rest of the
    /// allowance is held by undrained emitted text and model handles).
    pub(crate) fn push_log(&mut self, call: &'static str, level: u32, text: String) -> wasmtime::Result<()> {
        match self.log_mode {
            LogMode::Stderr => {
                let tag = ["error", "warn", "info", "debug", "trace"].get(level as usize).copied().unwrap_or("log");
                eprintln!("[actor {tag}] {text}");
            }
            LogMode::Capture => {
                let cost = text.len() + LOG_LINE_OVERHEAD;
                let allowance = self.limiter.limits.host_bytes;
                while self.logs.len() >= CAPTURED_LOG_LINES || self.host_bytes_used().saturating_add(cost) > allowance {
                    let Some(old) = self.logs.pop_front() else { break };
                    self.log_bytes -= old.text.len() + LOG_LINE_OVERHEAD;
                }
                if self.host_bytes_used().saturating_add(cost) > allowance {
                    return Err(self.allowance_error(call, "a log line", cost).into());
                }
                self.log_bytes += cost;
                self.logs.push_back(LogLine { level, text });
            }
        }
        Ok(())
    }
}

/// A running actor: a wasm instance in its own store, whose linear memory is a [`SharedRegion`].
pub struct Actor {
    store: Store<ActorState>,
    instance: Instance,
    memory: Memory,
    region: SharedRegion,
    limits: ActorLimits,
    /// Hex SHA-256 of the module's bytes, when the actor was created from bytes.
    module_digest: Option<String>,
}

impl Actor {
    pub(crate) fn instantiate(
        runtime: &Runtime,
        module: &Module,
        module_digest: Option<String>,
        state: ActorState,
    ) -> Result<Actor, ActorError> {
        let limits = state.limiter.limits;
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(deadline_ticks(limits.deadline));
        store.epoch_deadline_trap();
        store.data_mut().call_deadline = Instant::now().checked_add(limits.deadline);
        let instance = runtime
            .linker()
            .instantiate(&mut store, module)
            .map_err(|e| classify("(instantiation)", e, limits.deadline, true))?;
        let memory = instance.get_memory(&mut store, "memory").ok_or_else(|| {
            ActorError::Instantiate("the module exports no memory named `memory`; actors must export it".into())
        })?;
        let region = runtime.creator().region_at(memory.data_ptr(&store)).ok_or_else(|| {
            ActorError::Instantiate(
                "the actor's memory was not created by Driftwood's region creator (imported memories are not supported)"
                    .into(),
            )
        })?;
        store.data_mut().memory = Some(memory);
        let mut actor = Actor { store, instance, memory, region, limits, module_digest };
        let version: u32 = actor.call("driftwood_abi_version", ()).map_err(|e| match e {
            ActorError::NoSuchExport { .. } => ActorError::Instantiate(
                "the module does not export `driftwood_abi_version: () -> i32`; build it with the driftwood guest SDK"
                    .into(),
            ),
            other => other,
        })?;
        if version != abi::ABI_VERSION {
            return Err(ActorError::AbiMismatch { guest: version, host: abi::ABI_VERSION });
        }
        Ok(actor)
    }

    /// Calls the export `name` with `params`, under the actor's deadline.
    ///
    /// # Errors
    ///
    /// [`ActorError::NoSuchExport`] when there is no such export of that type; [`ActorError::Deadline`],
    /// [`ActorError::MemoryCap`] or [`ActorError::Trap`] when the call does not complete. The actor stays
    /// usable after a trap only as far as its own state allows; the host and other actors are unaffected.
    pub fn call<P: WasmParams, R: WasmResults>(&mut self, name: &str, params: P) -> Result<R, ActorError> {
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| ActorError::NoSuchExport { export: name.into(), message: format!("{e:#}") })?;
        self.store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        self.store.data_mut().call_deadline = Instant::now().checked_add(self.limits.deadline);
        // When the call returns, batched decode steps of other actors stop waiting for this one's.
        let state = self.store.data();
        let _in_call = state.batcher.as_ref().map(|b| b.enter(&state.decoding));
        let result = func.call(&mut self.store, params).map_err(|e| classify(name, e, self.limits.deadline, false));
        self.store.data_mut().call_deadline = None;
        result
    }

    /// The region behind this actor's linear memory.
    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    /// The address wasmtime reports for this actor's memory (the guest's offset 0).
    pub fn memory_base(&self) -> *const u8 {
        self.memory.data_ptr(&self.store)
    }

    /// Current size of the actor's linear memory in bytes.
    pub fn memory_size(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// The limits this actor runs under.
    pub fn limits(&self) -> ActorLimits {
        self.limits
    }

    /// Bytes this actor's host calls and host-side accesses have copied.
    pub fn ledger(&self) -> LedgerSnapshot {
        self.store.data().ledger.snapshot()
    }

    /// Removes and returns the captured log lines (empty unless the runtime uses [`LogMode::Capture`]).
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        let state = self.store.data_mut();
        state.log_bytes = 0;
        state.logs.drain(..).collect()
    }

    /// Sends the text the actor emits (`driftwood.emit`) to `sink` as it arrives, instead of keeping it for
    /// [`take_emitted`](Self::take_emitted). The sink bounds what it keeps itself: when it returns `Err`, the
    /// `emit` call traps the actor with [`ActorError::HostAllowance`] and that message.
    pub fn set_emit_sink(&mut self, sink: impl FnMut(&str) -> Result<(), String> + Send + 'static) {
        self.store.data_mut().emit_sink = Some(Box::new(sink));
    }

    /// Bytes the host keeps on this actor's behalf and charges to its host allowance
    /// ([`ActorLimits::host_bytes`]): emitted text not yet taken, captured log lines, model handles.
    pub fn host_bytes(&self) -> usize {
        self.store.data().host_bytes_used()
    }

    /// Writes a whole-actor snapshot to `path` (atomically): module digest, ABI version, the non-zero pages of
    /// its memory, its exported mutable globals and the models it opened (by name and fingerprint). Call it
    /// between calls, when the guest is idle.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] if the actor was not created from bytes (no digest) or the file cannot be written.
    pub fn save_snapshot(
        &mut self,
        path: &std::path::Path,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<driftwood_snapshot::ActorWriteStats, ActorError> {
        let written = self.write_image(metadata, |image, memory, overlay| {
            driftwood_snapshot::write_actor_overlaid(path, image, memory, overlay)
        })?;
        let stats =
            written.map_err(|e| ActorError::Host(format!("cannot write actor snapshot {}: {e}", path.display())))?;
        self.store.data().record_copy(CopyKind::Snapshot, stats.bytes as usize);
        Ok(stats)
    }

    /// Writes the same whole-actor snapshot as [`save_snapshot`](Self::save_snapshot) to any writer (an object
    /// upload buffer, a socket), not atomically: the writer's owner decides when it is complete.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] if the actor was not created from bytes (no digest) or `w` fails.
    pub fn write_snapshot_to(
        &mut self,
        w: &mut dyn std::io::Write,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<driftwood_snapshot::ActorWriteStats, ActorError> {
        let written = self.write_image(metadata, |image, memory, overlay| {
            driftwood_snapshot::write_actor_to_overlaid(w, image, memory, overlay)
        })?;
        let stats = written.map_err(|e| ActorError::Host(format!("cannot write actor snapshot: {e}")))?;
        self.store.data().record_copy(CopyKind::Snapshot, stats.bytes as usize);
        Ok(stats)
    }

    /// Runs `write` on the snapshot's image and memory. With managed memory on the CUDA backend and one KV
    /// cache written by the host, the cache's written rows are first copied from the device and stand in for
    /// the cache's range ([`MemoryOverlay`](driftwood_snapshot::MemoryOverlay)), so the writer never reads the
    /// cache from the CPU; otherwise `write` reads the whole memory, and the cache of the last forward is then
    /// moved back to the device ([`ActorState::return_to_device`]).
    fn write_image<T>(
        &mut self,
        metadata: std::collections::BTreeMap<String, String>,
        write: impl FnOnce(&driftwood_snapshot::ActorImage, &[u8], &driftwood_snapshot::MemoryOverlay<'_>) -> T,
    ) -> Result<T, ActorError> {
        let image = self.snapshot_image(metadata)?;
        let copied = self.copy_kv_rows();
        let overlay = match &copied {
            Some((rows, copy)) => {
                driftwood_snapshot::MemoryOverlay { range: rows.range.clone(), pieces: rows.pieces(copy) }
            }
            None => Default::default(),
        };
        let written = write(&image, self.memory.data(&self.store), &overlay);
        if copied.is_none() {
            let state = self.store.data();
            if let Some(kv) = state.kv.last_range()
                && kv.end <= self.memory.data_size(&self.store)
            {
                state.return_to_device(self.memory.data_ptr(&self.store), kv);
            }
        }
        Ok(written)
    }

    /// The device's copy of the KV rows the host wrote, when the actor's memory is CUDA managed memory and it
    /// has one cache (see `kv_rows`); `None` (the snapshot then reads the memory from the CPU) otherwise, or if
    /// the copy fails.
    fn copy_kv_rows(&self) -> Option<(crate::kv_rows::KvRows, Vec<u8>)> {
        let state = self.store.data();
        let Device::Cuda(cuda) = &*state.device else { return None };
        let rows = state.kv.one().filter(|_| state.managed)?.clone();
        if rows.range.end > self.memory.data_size(&self.store) {
            return None;
        }
        let mut copy = vec![0u8; rows.blocks * rows.used()];
        let base = self.memory.data_ptr(&self.store) as u64 + rows.range.start as u64;
        // SAFETY: the blocks lie inside the actor's memory (checked above), managed memory the device can read.
        // A snapshot is taken between calls: the guest is idle and every pass that wrote this cache has
        // completed before its call returned, so nothing writes these bytes during the copy (condition 1).
        let read = unsafe { cuda.read_blocks(base, rows.block as u64, rows.blocks, &mut copy) };
        read.ok().map(|()| (rows, copy))
    }

    /// Everything of a snapshot but the memory's contents.
    fn snapshot_image(
        &mut self,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<driftwood_snapshot::ActorImage, ActorError> {
        use driftwood_snapshot::{ActorImage, GlobalValue, ModelRef};
        let digest = self
            .module_digest
            .clone()
            .ok_or_else(|| ActorError::Host("only actors instantiated from module bytes can be snapshotted".into()))?;
        let exports: Vec<(String, wasmtime::Global)> = self
            .instance
            .exports(&mut self.store)
            .filter_map(|e| {
                let name = e.name().to_string();
                e.into_global().map(|g| (name, g))
            })
            .collect();
        let mut globals = vec![];
        for (name, global) in exports {
            if global.ty(&self.store).mutability() != wasmtime::Mutability::Var {
                continue;
            }
            let value = match global.get(&mut self.store) {
                wasmtime::Val::I32(v) => GlobalValue::I32(v),
                wasmtime::Val::I64(v) => GlobalValue::I64(v),
                wasmtime::Val::F32(bits) => GlobalValue::F32(bits),
                wasmtime::Val::F64(bits) => GlobalValue::F64(bits),
                _ => return Err(ActorError::Host(format!("global `{name}` has a type snapshots cannot hold"))),
            };
            globals.push((name, value));
        }
        let models = self
            .store
            .data()
            .models
            .iter()
            .map(|(name, m)| ModelRef {
                name: name.clone(),
                model_fingerprint: m.fingerprint().into(),
                tokenizer_fingerprint: m.tokenizer_fingerprint().into(),
            })
            .collect();
        Ok(ActorImage {
            module_digest: digest,
            abi_version: abi::ABI_VERSION,
            memory_size: self.memory_size() as u64,
            globals,
            models,
            metadata,
        })
    }

    /// Overwrites this freshly instantiated actor with a snapshot (see [`Runtime::restore_actor`]).
    pub(crate) fn restore_from(
        &mut self,
        file: SnapshotSource,
        registry: &crate::ModelRegistry,
    ) -> Result<(), ActorError> {
        use driftwood_snapshot::GlobalValue;
        let image = match &file {
            SnapshotSource::File(reader) => reader.image().clone(),
            SnapshotSource::Bytes(bytes) => bytes.image.clone(),
        };
        if self.module_digest.as_deref() != Some(image.module_digest.as_str()) {
            return Err(ActorError::Host(format!(
                "the snapshot is of module {}, not of the module given ({})",
                image.module_digest,
                self.module_digest.as_deref().unwrap_or("unknown")
            )));
        }
        if image.abi_version != abi::ABI_VERSION {
            return Err(ActorError::AbiMismatch { guest: image.abi_version, host: abi::ABI_VERSION });
        }
        if image.models.len() > MAX_MODEL_HANDLES {
            return Err(ActorError::Host(format!(
                "the snapshot holds {} model handles; an actor may hold at most {MAX_MODEL_HANDLES}",
                image.models.len()
            )));
        }
        // Models first: nothing is changed if one is missing or different.
        let mut models = vec![];
        for m in &image.models {
            let model = registry.get(&m.name).ok_or_else(|| {
                ActorError::Host(format!("the snapshot needs model `{}`, which is not loaded", m.name))
            })?;
            if model.fingerprint() != m.model_fingerprint || model.tokenizer_fingerprint() != m.tokenizer_fingerprint {
                return Err(ActorError::Host(format!(
                    "model `{}` differs from the one the snapshot was taken with (fingerprint {} vs {})",
                    m.name,
                    model.fingerprint(),
                    m.model_fingerprint
                )));
            }
            models.push((m.name.clone(), model));
        }
        let size = image.memory_size as usize;
        if size > self.limits.memory_bytes {
            return Err(ActorError::Host(format!(
                "the snapshot's {size}-byte memory exceeds this actor's cap of {} bytes",
                self.limits.memory_bytes
            )));
        }
        let current = self.memory_size();
        if size > current {
            let pages = ((size - current) / 65536) as u64;
            self.memory
                .grow(&mut self.store, pages)
                .map_err(|e| ActorError::Host(format!("cannot grow memory: {e}")))?;
        }
        if self.memory_size() != size {
            return Err(ActorError::Host(format!(
                "the snapshot's memory ({size} bytes) is smaller than the module's initial memory ({} bytes)",
                self.memory_size()
            )));
        }
        // Memory the instance grew to here is freshly mapped and zero: only the stored pages are written there,
        // so resident memory after the restore follows the snapshot's stored pages, not its memory size.
        let memory = self.memory.data_mut(&mut self.store);
        let (file_len, restored) = match file {
            SnapshotSource::File(reader) => (reader.file_len(), reader.restore_into(memory, current)),
            // Already checked whole (checksum included) when it was parsed.
            SnapshotSource::Bytes(bytes) => (bytes.file_len(), bytes.restore_into_fresh(memory, current)),
        };
        restored.map_err(|e| ActorError::Host(format!("cannot restore memory: {e}")))?;
        for (name, value) in &image.globals {
            let global = self
                .instance
                .get_global(&mut self.store, name)
                .ok_or_else(|| ActorError::Host(format!("the module has no global `{name}`")))?;
            let val = match *value {
                GlobalValue::I32(v) => wasmtime::Val::I32(v),
                GlobalValue::I64(v) => wasmtime::Val::I64(v),
                GlobalValue::F32(bits) => wasmtime::Val::F32(bits),
                GlobalValue::F64(bits) => wasmtime::Val::F64(bits),
            };
            global
                .set(&mut self.store, val)
                .map_err(|e| ActorError::Host(format!("cannot restore global `{name}`: {e}")))?;
        }
        self.store.data().record_copy(CopyKind::Snapshot, file_len as usize);
        self.store.data_mut().models = models;
        Ok(())
    }

    /// Chooses the file the actor's `session_save` / `session_load` calls write and read.
    pub fn set_session_file(&mut self, path: impl Into<std::path::PathBuf>) {
        self.store.data_mut().session_file = Some(path.into());
    }

    /// Waits until the actor's last `session_save` is durable: synced and renamed over the session file.
    ///
    /// `session_save` returns to the guest once the snapshot is complete in a temporary file (the cost of
    /// writing into the page cache); syncing it to disk and renaming it into place happens on another thread,
    /// so the actor is not held up by the disk. Until then the previous session file stays in place, whole. The
    /// wait also happens before the actor's next `session_save` or `session_load` and when the actor is
    /// dropped, so saves land in order and none is lost by exiting.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] when that save could not be synced or renamed (the previous file is then unchanged).
    pub fn settle_session_saves(&mut self) -> Result<(), ActorError> {
        self.store.data_mut().settle_save().map_err(ActorError::Host)
    }

    /// Why the last host call that returned an error code to the guest failed, if one did.
    pub fn take_host_error(&mut self) -> Option<String> {
        self.store.data_mut().host_error.take()
    }

    /// Removes and returns the text emitted since the last call (when no sink is set).
    pub fn take_emitted(&mut self) -> String {
        std::mem::take(&mut self.store.data_mut().emitted)
    }

    /// Time and tokens of this actor's `forward` calls so far.
    pub fn inference_stats(&self) -> InferenceStats {
        self.store.data().stats
    }

    /// Copies `text` into the actor's memory at `offset` (recorded in the ledger as text).
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] when the range is outside the memory.
    pub fn write_text(&mut self, offset: usize, text: &[u8]) -> Result<(), ActorError> {
        self.memory.write(&mut self.store, offset, text).map_err(|e| {
            ActorError::Host(format!("cannot write {} bytes at 0x{offset:x} of actor memory: {e}", text.len()))
        })?;
        self.store.data().record_copy(CopyKind::Text, text.len());
        Ok(())
    }

    /// Copies `dst.len()` bytes out of the actor's memory at `offset` (recorded in the ledger as tensor
    /// bytes). This is the copy a copying runtime makes; the zero-copy path never calls it.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] when the range is outside the memory.
    pub fn read_memory(&self, offset: usize, dst: &mut [u8]) -> Result<(), ActorError> {
        self.memory.read(&self.store, offset, dst).map_err(|e| {
            ActorError::Host(format!("cannot read {} bytes at 0x{offset:x} of actor memory: {e}", dst.len()))
        })?;
        self.store.data().record_copy(CopyKind::Tensor, dst.len());
        Ok(())
    }

    /// Copies `src` into the actor's memory at `offset` (recorded in the ledger as tensor bytes).
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] when the range is outside the memory.
    pub fn write_memory(&mut self, offset: usize, src: &[u8]) -> Result<(), ActorError> {
        self.memory.write(&mut self.store, offset, src).map_err(|e| {
            ActorError::Host(format!("cannot write {} bytes at 0x{offset:x} of actor memory: {e}", src.len()))
        })?;
        self.store.data().record_copy(CopyKind::Tensor, src.len());
        Ok(())
    }
}

/// Epoch ticks for `deadline`. The call starts somewhere inside the current tick, so the first tick may come
/// at once: one tick more than the deadline spans guarantees the guest at least its whole deadline.
fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64).saturating_add(1)
}

/// Turns a wasmtime error into the [`ActorError`] a user can act on.
fn classify(export: &str, err: wasmtime::Error, deadline: Duration, instantiating: bool) -> ActorError {
    if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return ActorError::Deadline { export: export.into(), deadline };
    }
    if let Some(cap) = err.chain().find_map(|e| e.downcast_ref::<MemoryCapExceeded>()) {
        return ActorError::MemoryCap { export: export.into(), message: cap.to_string() };
    }
    if err.chain().any(|e| e.downcast_ref::<HostDeadline>().is_some()) {
        return ActorError::Deadline { export: export.into(), deadline };
    }
    if err.chain().any(|e| e.downcast_ref::<HostShutdown>().is_some()) {
        return ActorError::Shutdown { export: export.into() };
    }
    if let Some(over) = err.chain().find_map(|e| e.downcast_ref::<HostAllowanceExceeded>()) {
        return ActorError::HostAllowance { export: export.into(), message: over.to_string() };
    }
    if let Some(oom) = err.chain().find_map(|e| e.downcast_ref::<HostDeviceMemory>()) {
        return ActorError::DeviceMemory { export: export.into(), message: oom.to_string() };
    }
    if instantiating && err.downcast_ref::<Trap>().is_none() {
        let message = format!("{err:#}");
        // The region creator's refusal to place the memory on a full device (its text carries the marker).
        if message.contains(driftwood_memory::OUT_OF_DEVICE_MEMORY) {
            return ActorError::DeviceMemory { export: export.into(), message };
        }
        return ActorError::Instantiate(message);
    }
    ActorError::Trap { export: export.into(), message: err.root_cause().to_string() }
}
