//! [`Runtime`]: the wasmtime engine whose memories are Driftwood regions, the backend, and the epoch ticker
//! that enforces deadlines.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use driftwood_backend::{BackendKind, DType, Device};
use driftwood_engine::Model;
use driftwood_memory::{CopyLedger, LedgerSnapshot, Placement, RegionCreator};
use wasmtime::{Config, Engine, Linker, Module};

use crate::actor::{Actor, ActorState};
use crate::batch::{BatchStats, Batcher};
use crate::{ActorError, ActorLimits, abi};

fn digest(wasm: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(wasm).into()
}

/// Longest [`RuntimeConfig::batch_window`] accepted.
pub const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);

/// How often the epoch advances; deadlines are rounded up to whole ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Where actors' log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogMode {
    /// Printed to standard error as they arrive.
    #[default]
    Stderr,
    /// Kept in the actor for [`Actor::take_logs`]: the newest 1,024 lines, fewer when they would pass the
    /// actor's host allowance ([`ActorLimits::host_bytes`]).
    Capture,
}

/// How to build a [`Runtime`].
#[derive(Clone, Debug, Default)]
pub struct RuntimeConfig {
    /// How the backend sees actor memory.
    pub placement: Placement,
    /// Which backend computes.
    pub backend: BackendKind,
    /// Limits applied to every actor.
    pub limits: ActorLimits,
    /// Where actor log lines go.
    pub log: LogMode,
    /// Continuous batching: when set, the decode steps (`driftwood.forward` of one token) of actors running
    /// at the same time are evaluated as one forward pass per model. The first step to arrive waits for the
    /// other actors in a call, at most this long. `None` (the default): every call runs alone.
    pub batch_window: Option<Duration>,
    /// The KV cache dtype `model_info` recommends to guests (f32 or bf16). `None` (the default): the backend's
    /// own, bf16 on CUDA (its kernels read only bf16 caches) and [`CPU_KV_DTYPE`](crate::CPU_KV_DTYPE) on the
    /// CPU.
    pub kv_dtype: Option<DType>,
}

impl RuntimeConfig {
    /// The placement to use for `backend` when none is asked for: managed actor memory with `cuda` (which cannot
    /// address plain host memory; managed pages live on the device, so the KV cache is read at the GPU's
    /// bandwidth, not the bus's: batch-1 decode measured 0.969 ms/token managed against 1.103 pinned on an H200),
    /// host memory otherwise (`auto` on a GPU machine moves to managed by itself in [`Runtime::new`]).
    pub fn default_placement(backend: BackendKind) -> Placement {
        if backend == BackendKind::Cuda { Placement::CudaManaged } else { Placement::Host }
    }
}

/// Models loaded by the host, by name. Each is loaded once and shared by every actor that opens it.
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, Arc<Model>>>,
}

impl ModelRegistry {
    /// The model registered as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Names of all registered models.
    pub fn names(&self) -> Vec<String> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    fn insert(&self, name: String, model: Arc<Model>) {
        self.models.write().unwrap_or_else(|p| p.into_inner()).insert(name, model);
    }
}

struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One wasmtime engine (compiled code is shared by every actor), its region creator, the backend and the
/// host ABI linker. Create one per placement; create actors with [`instantiate`](Self::instantiate).
pub struct Runtime {
    engine: Engine,
    linker: Linker<ActorState>,
    creator: Arc<RegionCreator>,
    device: Arc<Device>,
    ledger: Arc<CopyLedger>,
    models: Arc<ModelRegistry>,
    /// Compiled modules by content hash: creating many actors of one module compiles it once.
    modules: std::sync::Mutex<std::collections::HashMap<[u8; 32], Module>>,
    config: RuntimeConfig,
    /// The decode rendezvous, when batching is on.
    batcher: Option<Arc<Batcher>>,
    /// Set by [`shutdown`](Self::shutdown); every actor's long host calls check it between pieces of work.
    shutdown: Arc<AtomicBool>,
    _ticker: Ticker,
}

impl Runtime {
    /// Builds the engine, opens the backend and starts the deadline ticker.
    ///
    /// # Errors
    ///
    /// When the limits are invalid ([`ActorLimits::validate`]), the batch window is longer than
    /// [`MAX_BATCH_WINDOW`], the backend asked for is unavailable or
    /// wasmtime rejects the configuration.
    pub fn new(mut config: RuntimeConfig) -> anyhow::Result<Self> {
        config.limits.validate().map_err(anyhow::Error::msg)?;
        if let Some(window) = config.batch_window
            && window > MAX_BATCH_WINDOW
        {
            anyhow::bail!("the batch window must be at most {MAX_BATCH_WINDOW:?}, not {window:?}");
        }
        let device = Arc::new(Device::open(config.backend)?);
        if config.placement == Placement::Host && matches!(*device, Device::Cuda(_)) {
            // The GPU cannot address plain host memory. `--backend auto` that found a GPU gets managed actor
            // memory (see `default_placement`); an explicit `--backend cuda --placement host` is refused.
            if config.backend != BackendKind::Auto {
                anyhow::bail!(
                    "the CUDA backend cannot address host-placed actor memory; use --placement pinned or managed"
                );
            }
            config.placement = Placement::CudaManaged;
        }
        match (config.kv_dtype, &*device) {
            (None | Some(DType::BF16), _) | (Some(DType::F32), Device::Cpu(_)) => {}
            (Some(DType::F32), Device::Cuda(_)) => {
                anyhow::bail!("the CUDA backend's kernels read bf16 KV caches; pass --kv-dtype bf16 (its default)")
            }
            (Some(other), _) => anyhow::bail!("a KV cache of {other} is not supported; use f32 or bf16"),
        }
        let creator = Arc::new(match (config.placement, &*device) {
            (Placement::Host, _) => RegionCreator::new(Placement::Host),
            (placement, Device::Cuda(cuda)) => RegionCreator::on_device(cuda.device_memory(placement)?),
            (placement, other) => anyhow::bail!(
                "placement `{placement}` needs the CUDA backend, but the {} backend is in use (pass --backend cuda)",
                driftwood_backend::Backend::name(other)
            ),
        });
        let mut wasm = Config::new();
        if config.placement == Placement::CudaManaged {
            // Managed memory cannot have inaccessible guard pages: reserve exactly the actor memory limit and let
            // the JIT emit explicit bounds checks.
            let limit = (config.limits.memory_bytes as u64).next_multiple_of(65536);
            wasm.memory_reservation(limit).memory_guard_size(0).memory_reservation_for_growth(0);
        }
        wasm.with_host_memory(creator.clone())
            // Required with a custom MemoryCreator: copy-on-write images assume wasmtime mapped the memory.
            .memory_init_cow(false)
            // Regions never move; telling wasmtime lets it rely on a fixed base.
            .memory_may_move(false)
            .epoch_interruption(true);
        let engine = Engine::new(&wasm)?;
        let mut linker = Linker::new(&engine);
        abi::link(&mut linker)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new().name("driftwood-epoch".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?
        };
        let batcher = config.batch_window.map(|window| Arc::new(Batcher::new(window, device.clone())));
        Ok(Runtime {
            engine,
            linker,
            creator,
            device,
            ledger: Arc::new(CopyLedger::new()),
            models: Arc::new(ModelRegistry::default()),
            modules: Default::default(),
            config,
            batcher,
            shutdown: Arc::new(AtomicBool::new(false)),
            _ticker: Ticker { stop, thread: Some(thread) },
        })
    }

    /// Compiles a module (binary or text format) once, for any number of actors.
    ///
    /// # Errors
    ///
    /// [`ActorError::Compile`] when the bytes are not a valid module.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, ActorError> {
        self.compile_keyed(wasm, digest(wasm))
    }

    /// [`compile`](Self::compile) with the module's digest already computed.
    fn compile_keyed(&self, wasm: &[u8], key: [u8; 32]) -> Result<Module, ActorError> {
        let cached = self.modules.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        if let Some(module) = cached {
            return Ok(module);
        }
        let module = Module::new(&self.engine, wasm).map_err(|e| ActorError::Compile(format!("{e:#}")))?;
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).insert(key, module.clone());
        Ok(module)
    }

    /// Compiles and instantiates an actor with the runtime's default limits.
    ///
    /// # Errors
    ///
    /// See [`instantiate_module`](Self::instantiate_module).
    pub fn instantiate(&self, wasm: &[u8]) -> Result<Actor, ActorError> {
        let key = digest(wasm);
        let module = self.compile_keyed(wasm, key)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        Actor::instantiate(self, &module, Some(hex), self.new_state(self.config.limits))
    }

    /// Recreates an actor from a whole-actor snapshot: a fresh instance of `wasm` (which must be the module
    /// the snapshot was taken of), its memory, globals and model handles restored. Its next call continues
    /// exactly where the snapshotted actor stood.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] naming what is wrong: unreadable or corrupt file, another module, a model that is
    /// not loaded or differs, a memory over the cap.
    pub fn restore_actor(&self, path: &std::path::Path, wasm: &[u8]) -> Result<Actor, ActorError> {
        let limits = driftwood_snapshot::ActorLimits { max_memory: self.config.limits.memory_bytes as u64 };
        // Everything but the page data is read and validated before an instance exists; the pages are then
        // streamed straight into the fresh instance's memory.
        let file = driftwood_snapshot::ActorReader::open(path, &limits)
            .map_err(|e| ActorError::Host(format!("cannot read actor snapshot {}: {e}", path.display())))?;
        let mut actor = self.instantiate(wasm)?;
        actor.restore_from(crate::actor::SnapshotSource::File(Box::new(file)), &self.models)?;
        Ok(actor)
    }

    /// [`restore_actor`](Self::restore_actor) from a snapshot held in memory (an object fetched from a store):
    /// the whole snapshot, checksum included, is validated before an instance exists.
    ///
    /// # Errors
    ///
    /// As for [`restore_actor`](Self::restore_actor).
    pub fn restore_actor_bytes(&self, bytes: Vec<u8>, wasm: &[u8]) -> Result<Actor, ActorError> {
        let limits = driftwood_snapshot::ActorLimits { max_memory: self.config.limits.memory_bytes as u64 };
        let file = driftwood_snapshot::parse_actor(bytes, &limits)
            .map_err(|e| ActorError::Host(format!("cannot read actor snapshot: {e}")))?;
        let mut actor = self.instantiate(wasm)?;
        actor.restore_from(crate::actor::SnapshotSource::Bytes(file), &self.models)?;
        Ok(actor)
    }

    /// Instantiates an actor from a compiled module with the given limits, checking its ABI version.
    ///
    /// # Errors
    ///
    /// [`ActorError::Instantiate`] for a missing import/export or an imported memory,
    /// [`ActorError::AbiMismatch`] for another ABI version, [`ActorError::MemoryCap`] when the module's
    /// initial memory is already over the cap, [`ActorError::Trap`] if its start function traps,
    /// [`ActorError::Host`] for limits that fail [`ActorLimits::validate`].
    pub fn instantiate_module(&self, module: &Module, limits: ActorLimits) -> Result<Actor, ActorError> {
        limits.validate().map_err(ActorError::Host)?;
        Actor::instantiate(self, module, None, self.new_state(limits))
    }

    fn new_state(&self, limits: ActorLimits) -> ActorState {
        let mut state = ActorState::new(
            limits,
            self.device.clone(),
            self.ledger.clone(),
            self.config.log,
            self.models.clone(),
            self.shutdown.clone(),
        );
        state.batcher = self.batcher.clone();
        state.kv_dtype = self.kv_dtype();
        state.managed = self.config.placement == Placement::CudaManaged;
        state
    }

    /// Stops every actor's long host work: a `matmul` or `forward` running now, or called later, returns at
    /// its next check between pieces of work and the actor's call fails with [`ActorError::Shutdown`]. Guest
    /// code itself runs on until it returns or reaches its deadline. There is no undoing it; create a new
    /// runtime.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Makes `model` available to actors as `name` (`driftwood.model_open`). Registering a name again
    /// replaces the model for actors that open it afterwards.
    ///
    /// On the CUDA backend the weights are uploaded by the first step that needs them (once: steps that start
    /// together wait for that upload); [`add_model`](Self::add_model) uploads them here instead.
    pub fn register_model(&self, name: &str, model: Arc<Model>) {
        self.models.insert(name.to_string(), model);
    }

    /// [`register_model`](Self::register_model), with the model first made ready on this runtime's backend:
    /// on the CUDA backend its weights are uploaded here. Left to the first step, the upload would delay the
    /// first request, and a device that cannot hold the model would fail that request; here it is an error
    /// when the runtime is set up.
    ///
    /// # Errors
    ///
    /// A model whose shape the CUDA kernels do not run, or whose weights do not fit in the device's free
    /// memory (the message says how much is free). On the CPU backend there is nothing to prepare.
    pub fn add_model(&self, name: &str, model: Arc<Model>) -> anyhow::Result<()> {
        if let Device::Cuda(cuda) = &*self.device
            && let Err(e) = model.upload_to(cuda)
        {
            let free = match cuda.mem_info() {
                Ok((free, total)) => format!(" ({free} of the device's {total} bytes are free)"),
                Err(_) => String::new(),
            };
            anyhow::bail!("cannot put the weights of model `{name}` on {}: {e}{free}", cuda.device_name());
        }
        self.register_model(name, model);
        Ok(())
    }

    /// Prepares batched decode of `model` for up to `max_batch` actors whose caches hold `max_seq` rows, on
    /// the CUDA backend: the matrix products of each batch size are planned and its step captured as a graph
    /// ([`Model::warm_decode_cuda`]), which the first pass of each size would otherwise do, tens of
    /// milliseconds each. Returns how many batch sizes were prepared: 0 on the CPU backend, which has nothing
    /// to prepare.
    ///
    /// # Errors
    ///
    /// `max_seq` of 0 or past the model's context; a device error.
    pub fn warm_decode(&self, model: &Model, max_seq: usize, max_batch: usize) -> anyhow::Result<usize> {
        match &*self.device {
            Device::Cuda(cuda) => model
                .warm_decode_cuda(cuda, max_seq, max_batch)
                .map_err(|e| anyhow::anyhow!("cannot prepare batched decode on {}: {e}", cuda.device_name())),
            Device::Cpu(_) => Ok(0),
        }
    }

    /// The KV cache dtype `model_info` recommends to this runtime's actors ([`RuntimeConfig::kv_dtype`]).
    pub fn kv_dtype(&self) -> DType {
        self.config.kv_dtype.unwrap_or(match &*self.device {
            Device::Cuda(_) => DType::BF16,
            Device::Cpu(_) => crate::CPU_KV_DTYPE,
        })
    }

    /// The models actors can open.
    pub fn models(&self) -> &ModelRegistry {
        &self.models
    }

    /// How this runtime's actor memories are placed.
    pub fn placement(&self) -> Placement {
        self.config.placement
    }

    /// The backend every actor of this runtime computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Whether decode steps of concurrent actors are batched, and the longest the first step waits for the
    /// others ([`RuntimeConfig::batch_window`]).
    pub fn batch_window(&self) -> Option<Duration> {
        self.batcher.as_ref().map(|b| b.window())
    }

    /// Decode passes the batcher has run and their sizes (all zero when batching is off).
    pub fn batch_stats(&self) -> BatchStats {
        self.batcher.as_ref().map(|b| b.stats()).unwrap_or_default()
    }

    /// Bytes copied between any actor's memory and anything else since the runtime started.
    pub fn ledger(&self) -> LedgerSnapshot {
        self.ledger.snapshot()
    }

    /// Regions currently backing a live actor memory.
    pub fn live_regions(&self) -> usize {
        self.creator.live_regions()
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<ActorState> {
        &self.linker
    }

    pub(crate) fn creator(&self) -> &RegionCreator {
        &self.creator
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;

    /// A restore writes only the snapshot's stored pages: an actor whose snapshot declares a 1 GiB memory but
    /// stores a few hundred KiB of pages is woken without that memory becoming resident. (This crate's only
    /// unit test that allocates, so nothing else moves the process's resident set much while it is measured.)
    #[test]
    fn restoring_a_big_sparse_memory_makes_only_the_stored_pages_resident() {
        use driftwood_memory::rss::resident_bytes;
        use driftwood_snapshot::{ActorImage, ActorLimits as FileLimits, read_actor, write_actor};
        const MIB: u64 = 1 << 20;
        let runtime = Runtime::new(RuntimeConfig {
            limits: ActorLimits { memory_bytes: 4 << 30, ..Default::default() },
            ..Default::default()
        })
        .unwrap();
        let wasm = driftwood_actors::MATMUL_CHECK;
        let mut actor = runtime.instantiate(wasm).unwrap();
        let _: u32 = actor.call("prepare_share", (128u32, 128u32, 7u32)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.actor");
        actor.save_snapshot(&small, Default::default()).unwrap();
        let a_offset: u32 = actor.call("share_offset", 0u32).unwrap();
        let mut a = vec![0u8; 128 * 128 * 4];
        actor.read_memory(a_offset as usize, &mut a).unwrap();
        drop(actor);

        // The same pages in a memory declared 1 GiB (zero-filling it all would make 1 GiB resident).
        let file = read_actor(&small, &FileLimits::default()).unwrap();
        let size: u64 = 1 << 30;
        let mut memory = vec![0u8; size as usize]; // untouched pages stay unbacked
        for (offset, page) in file.pages() {
            memory[offset as usize..offset as usize + page.len()].copy_from_slice(page);
        }
        let big = dir.path().join("big.actor");
        let stats = write_actor(&big, &ActorImage { memory_size: size, ..file.image.clone() }, &memory).unwrap();
        drop(memory);
        assert!(stats.bytes < 4 * MIB, "{stats:?}");

        let before = resident_bytes().unwrap();
        let restored = runtime.restore_actor(&big, wasm).unwrap();
        let after = resident_bytes().unwrap();
        eprintln!(
            "restore of a {} MiB memory storing {} pages ({:.2} MiB): resident +{:.2} MiB",
            size >> 20,
            stats.pages_written,
            (stats.pages_written * 4096) as f64 / MIB as f64,
            after.saturating_sub(before) as f64 / MIB as f64
        );
        assert_eq!(restored.memory_size() as u64, size);
        assert!(after.saturating_sub(before) < 64 * MIB, "resident memory grew by {} bytes", after - before);
        let mut back = vec![0u8; a.len()];
        restored.read_memory(a_offset as usize, &mut back).unwrap();
        assert_eq!(back, a, "the stored pages are restored");
    }
}
