//! Continuous batching behind `driftwood.forward`: single-token (decode) calls of actors that run at the same
//! time are gathered and evaluated as one forward pass ([`Model::decode_batch`]), each on its own KV cache and
//! logits in its own memory.
//!
//! A rendezvous, no extra thread: the first actor to submit a step *leads*. It waits until every actor that
//! is *decoding* has submitted a step too, or until the window passes, whichever comes first; then it runs
//! the steps gathered (one pass per model) and hands each actor its own result. Actors that arrive while a
//! pass runs gather for the next one. An actor is decoding from its first decode step in a call until the
//! call returns or it runs a forward of several tokens (prefill, which runs alone): the leader does not wait
//! for actors that are setting up a turn, prefilling or finishing one, only for those between two steps of
//! a generation loop (sampling from their logits).
//!
//! Passes run one at a time. A leader that gathers while a pass runs keeps gathering until that pass is
//! over (the device is busy with it anyway), and its window starts only then: the actors of the pass that
//! just ended are the ones it waits for. Otherwise a leader that timed out while a pass ran would start a
//! second, small pass queued behind the first on the device, and the actors would settle into groups that
//! alternate passes and never merge.
//!
//! # The invariant that makes this sound
//!
//! A step carries raw addresses into its actor's linear memory (the cache and the logits). The actor's thread
//! stays blocked inside its `driftwood.forward` host call, in [`Batcher::decode`], until the step's result has
//! been posted, and the leader posts a result only after the pass that touched those bytes is complete. So
//! while another thread computes on them the guest cannot run, its memory cannot grow or be freed, and no
//! host code of that actor touches them: exactly the call contract of a host call made by the actor itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use driftwood_backend::{DType, Device, TensorMut};
use driftwood_engine::{BatchScratch, BatchSeq, EngineError, KvCache, Model};

/// Upper bounds of the batch-size histogram's buckets ([`BatchStats::sizes`]); the last bucket holds larger
/// passes.
pub const BATCH_SIZE_BOUNDS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// What the batcher did: decode passes and the sequences they carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Decode passes run by the batcher, of any size.
    pub passes: u64,
    /// Decode steps (sequences) carried by those passes.
    pub sequences: u64,
    /// Passes that carried more than one sequence.
    pub batched_passes: u64,
    /// Sequences carried by those passes.
    pub batched_sequences: u64,
    /// Passes by size: `sizes[i]` counts passes of more than `BATCH_SIZE_BOUNDS[i - 1]` and at most
    /// `BATCH_SIZE_BOUNDS[i]` sequences; the last entry counts passes larger than every bound.
    pub sizes: [u64; BATCH_SIZE_BOUNDS.len() + 1],
    /// Wall time spent inside those passes, in nanoseconds: `sequences` over it is the decode throughput
    /// while decoding, apart from the time the batcher waits to gather steps.
    pub pass_nanos: u64,
    /// The part of `pass_nanos` the passes spent waiting for the device while another forward held it (an
    /// actor's prefill, which runs alone): `sequences` over `pass_nanos - wait_nanos` is the throughput of the
    /// decode passes' own work.
    pub wait_nanos: u64,
}

impl BatchStats {
    /// Sequences per pass on average (0 before the first pass).
    pub fn mean_size(&self) -> f64 {
        if self.passes == 0 { 0.0 } else { self.sequences as f64 / self.passes as f64 }
    }

    fn record(&mut self, size: usize, took: Duration, waited: Duration) {
        let size = size as u64;
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.pass_nanos = self.pass_nanos.saturating_add(nanos(took));
        self.wait_nanos = self.wait_nanos.saturating_add(nanos(waited.min(took)));
        self.passes += 1;
        self.sequences += size;
        if size > 1 {
            self.batched_passes += 1;
            self.batched_sequences += size;
        }
        let bucket = BATCH_SIZE_BOUNDS.iter().position(|&b| size <= b).unwrap_or(BATCH_SIZE_BOUNDS.len());
        self.sizes[bucket] += 1;
    }
}

/// One actor's decode step: its model, where its cache and logits are, its position and token.
pub(crate) struct Step {
    pub model: Arc<Model>,
    /// Address of the cache, `model.kv_elems(max_seq)` elements of `kv_dtype`.
    pub kv: usize,
    /// The cache's element type (f32 or bf16).
    pub kv_dtype: DType,
    pub max_seq: usize,
    pub pos: usize,
    pub token: u32,
    /// Address of the logits, `vocab` f32s.
    pub logits: usize,
}

impl Step {
    /// The step as the engine takes it.
    ///
    /// # Safety
    ///
    /// The contract of [`Batcher::decode`] holds for this step (its submitter is blocked until its result is
    /// posted), and no other view of the same bytes is alive.
    unsafe fn view(&self) -> BatchSeq<'_> {
        let vocab = self.model.config().vocab_size;
        // SAFETY: by the caller's contract the ranges are valid, aligned, exclusively ours for the view's life.
        unsafe {
            BatchSeq {
                kv: KvCache::from_raw_parts_typed(self.kv as *mut u8, self.kv_dtype, &self.model, self.max_seq),
                pos: self.pos,
                token: self.token,
                logits: TensorMut::from_raw_parts(self.logits as *mut u8, vocab, DType::F32),
            }
        }
    }
}

/// Why a batched decode step failed.
#[derive(Clone, Debug)]
pub(crate) struct StepError {
    /// What failed, for the actor's trap message.
    pub message: String,
    /// Whether the device ran out of memory ([`EngineError::is_device_out_of_memory`]): the host then reports
    /// it as such, not as a fault of the actor's request.
    pub device_memory: bool,
}

impl StepError {
    fn other(message: impl Into<String>) -> Self {
        StepError { message: message.into(), device_memory: false }
    }
}

impl From<EngineError> for StepError {
    fn from(e: EngineError) -> Self {
        StepError { device_memory: e.is_device_out_of_memory(), message: e.to_string() }
    }
}

/// Where a submitter waits for its own result (parked, woken by the leader).
struct Ticket {
    /// The submitter's thread.
    owner: Thread,
    posted: AtomicBool,
    result: Mutex<Option<Result<(), StepError>>>,
}

impl Ticket {
    fn new() -> Self {
        Ticket { owner: std::thread::current(), posted: AtomicBool::new(false), result: Mutex::new(None) }
    }

    /// Posts `result` unless one was posted already, and wakes the submitter.
    fn post(&self, result: Result<(), StepError>) {
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() && !self.posted.load(Ordering::Acquire) {
            *slot = Some(result);
            drop(slot);
            self.posted.store(true, Ordering::Release);
            self.owner.unpark();
        }
    }

    /// Waits for the result; called by the submitter's thread only.
    fn wait(&self) -> Result<(), StepError> {
        while !self.posted.load(Ordering::Acquire) {
            std::thread::park();
        }
        let result = self.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        result.unwrap_or_else(|| Err(StepError::other("the batched decode pass posted no result")))
    }
}

struct Pending {
    step: Step,
    ticket: Arc<Ticket>,
}

/// Posts an error to every step of a pass that got no result, so that no submitter waits forever if the
/// pass panics.
struct Release(Vec<Pending>);

impl Drop for Release {
    fn drop(&mut self) {
        for p in &self.0 {
            p.ticket.post(Err(StepError::other(
                "the batched decode pass did not complete (the thread running it panicked)",
            )));
        }
    }
}

#[derive(Default)]
struct Gathering {
    /// Actors decoding (see the module documentation); each one's own flag says whether it is counted.
    decoding: usize,
    /// Steps waiting for the next pass; the first one's submitter leads it.
    pending: Vec<Pending>,
    /// Whether that leader is waiting for the others (and needs waking when they are all there, or when the
    /// running pass ends).
    leader_waiting: bool,
    /// Whether a pass is running (its leader took the steps and released the lock to run them).
    running: bool,
}

impl Gathering {
    /// Every actor in a call that does not run a forward alone has a step pending.
    fn complete(&self) -> bool {
        self.pending.len() >= self.decoding
    }
}

/// The rendezvous of one runtime (see the module documentation).
pub(crate) struct Batcher {
    window: Duration,
    device: Arc<Device>,
    gathering: Mutex<Gathering>,
    /// Signalled when the waiting leader's gathering becomes complete.
    changed: Condvar,
    scratch: Mutex<BatchScratch>,
    stats: Mutex<BatchStats>,
}

/// Marks the batcher's pass as over when dropped (also when the pass panics), and wakes the leader gathering
/// the next one.
struct Running<'a>(&'a Batcher);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.running = false;
        if g.leader_waiting {
            self.0.changed.notify_one();
        }
    }
}

/// An actor inside a call; dropped when the call returns (or unwinds), which ends its decoding.
pub(crate) struct InCall {
    batcher: Arc<Batcher>,
    decoding: Arc<AtomicBool>,
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.batcher.stop_decoding(&self.decoding);
    }
}

impl Batcher {
    pub(crate) fn new(window: Duration, device: Arc<Device>) -> Self {
        Batcher {
            window,
            device,
            gathering: Mutex::default(),
            changed: Condvar::new(),
            scratch: Mutex::default(),
            stats: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gathering> {
        self.gathering.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the waiting leader if its gathering is complete (only then: each wake-up costs a context
    /// switch).
    fn wake_leader(&self, g: &Gathering) {
        if g.leader_waiting && g.complete() {
            self.changed.notify_one();
        }
    }

    /// The longest a leader waits for the others.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    pub(crate) fn stats(&self) -> BatchStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call of the actor whose decoding flag is `decoding` begins; when the guard drops, the actor stops
    /// counting as decoding.
    pub(crate) fn enter(self: &Arc<Self>, decoding: &Arc<AtomicBool>) -> InCall {
        InCall { batcher: self.clone(), decoding: decoding.clone() }
    }

    /// The actor whose flag this is no longer decoding (its call ended, or it runs a forward alone): leaders
    /// stop waiting for it.
    pub(crate) fn stop_decoding(&self, decoding: &AtomicBool) {
        let mut g = self.lock();
        if decoding.swap(false, Ordering::Relaxed) {
            g.decoding -= 1;
            self.wake_leader(&g);
        }
    }

    /// Runs `step` in the next batched pass and returns its own result, blocking until then. `decoding` is
    /// the submitting actor's flag (it counts as decoding from now on).
    ///
    /// # Safety
    ///
    /// `step.kv` is the address of `step.model.kv_elems(step.max_seq)` elements of `step.kv_dtype` and `step.logits` of `vocab`
    /// f32s, both 4-byte aligned, disjoint, inside the memory of the actor whose thread calls this, and nothing
    /// else reads or writes them until this returns. The caller is that actor's host call: it stays blocked
    /// here until the pass that computes on those bytes is complete (see the module documentation).
    pub(crate) unsafe fn decode(&self, step: Step, decoding: &AtomicBool) -> Result<(), StepError> {
        let ticket = Arc::new(Ticket::new());
        let mut g = self.lock();
        if !decoding.swap(true, Ordering::Relaxed) {
            g.decoding += 1;
        }
        g.pending.push(Pending { step, ticket: ticket.clone() });
        if g.pending.len() == 1 {
            // Lead: wait for the running pass, if any, to end; then for every decoding actor, at most the
            // window (counted from the end of that pass, when the actors it carried start sampling again).
            g.leader_waiting = true;
            let mut deadline = None;
            loop {
                if g.running {
                    // Woken by `Running` when the pass ends (no timeout: the pass is bounded by its own work).
                    g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let now = Instant::now();
                let until = *deadline.get_or_insert(now + self.window);
                if g.complete() || now >= until {
                    break;
                }
                g = self.changed.wait_timeout(g, until - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            g.leader_waiting = false;
            g.running = true;
            let batch = std::mem::take(&mut g.pending);
            drop(g);
            let _running = Running(self);
            self.run(Release(batch));
        } else {
            self.wake_leader(&g);
            drop(g);
        }
        ticket.wait()
    }

    /// Runs one pass per model over the steps of `batch` and posts each step's result.
    fn run(&self, batch: Release) {
        let steps = &batch.0;
        let mut order: Vec<usize> = (0..steps.len()).collect();
        order.sort_by_key(|&i| Arc::as_ptr(&steps[i].step.model) as usize);
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for group in order.chunk_by(|&a, &b| Arc::ptr_eq(&steps[a].step.model, &steps[b].step.model)) {
            let model = &steps[group[0]].step.model;
            let pass = |members: &[usize], scratch: &mut BatchScratch| {
                // SAFETY: every step's submitter is blocked in `decode` until its ticket is posted, which
                // happens after this pass returns (the invariant of `decode`); each step is viewed once here.
                let mut seqs: Vec<BatchSeq<'_>> = members.iter().map(|&i| unsafe { steps[i].step.view() }).collect();
                let started = Instant::now();
                let result = model.decode_batch(&self.device, &mut seqs, scratch).map_err(StepError::from);
                let (took, waited) = (started.elapsed(), scratch.device_wait());
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).record(members.len(), took, waited);
                result
            };
            match pass(group, &mut scratch) {
                Ok(()) => group.iter().for_each(|&i| steps[i].ticket.post(Ok(()))),
                // One sequence's failure must not fail the others: run each alone. A decode step only writes
                // its own cache row at its position and its logits, so running it again is harmless.
                Err(_) if group.len() > 1 => {
                    for &i in group {
                        steps[i].ticket.post(pass(&[i], &mut scratch));
                    }
                }
                Err(e) => steps[group[0]].ticket.post(Err(e)),
            }
        }
    }
}
