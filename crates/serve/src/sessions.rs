//! The session table: one actor per session key, live in memory or hibernated in the store; turns run on
//! blocking threads; a snapshot after every completed turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use driftwood_cluster::{Claim as Ownership, ClusterError, Fetched, Load, Node, ObjectName, Owner, SnapshotStore};
use driftwood_engine::Model;
use driftwood_host::{Actor, ActorError, Runtime};
use serde_json::{Value, json};

use crate::api::{ApiError, Sampling};
use crate::logprobs::{self, TokenLogprob};
use crate::metrics::Metrics;
use crate::placement::Placement;

/// What a turn feeds the actor.
#[derive(Debug, Clone)]
pub enum Input {
    /// A chat conversation as the JSON list of `{role, content}` (the actor's `chat_messages` export).
    Chat(String),
    /// Text to continue (the actor's `generate` export).
    Completion(String),
}

/// What a completed turn did.
#[derive(Debug, Clone, Default)]
pub struct TurnOutcome {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens evaluated; the others were already in the actor's KV cache.
    pub evaluated_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// The generated text.
    pub text: String,
    /// Whether the session's actor was restored from its snapshot for this turn.
    pub restored: bool,
    /// Each generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// Settings of the session table.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Tokens each session's KV cache holds.
    pub max_seq: u32,
    /// Release an actor's memory (keeping its snapshot) after this long without a request; zero releases
    /// it right after each turn.
    pub hibernate_after: Duration,
    /// Most actors live in memory at once; past it, the least recently used idle ones hibernate.
    pub max_live: usize,
    /// This node's membership of a cluster: sessions are claimed in etcd before they run, and each snapshot
    /// is committed there (behind the claim's fencing token) before its turn is answered. `None`: one node,
    /// whose store alone says which snapshot is a session's latest.
    pub cluster: Option<Arc<Node>>,
}

#[derive(Default)]
struct SlotState {
    actor: Option<Actor>,
    last_used: Option<Instant>,
    turns: u64,
    restores: u64,
    /// A snapshot of the actor's last completed turn is in the store.
    saved: bool,
    /// That snapshot's object, once this server has read or written it.
    object: Option<ObjectName>,
    /// In a cluster, the fencing token of this node's claim of the session, while it holds one.
    fence: Option<u64>,
    /// The node's lease that claim is attached to (a claim lasts as long as its lease).
    claim_lease: i64,
    last: Option<TurnOutcome>,
}

/// One session.
#[derive(Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    busy: AtomicBool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Exclusive use of one session for one request; released when dropped.
pub struct Claim {
    key: String,
    slot: Arc<Slot>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// The exports the serving protocol needs from an actor.
const REQUIRED_EXPORTS: &[&str] =
    &["alloc", "dealloc", "init", "set_sampling", "set_stop_list", "chat_messages", "generate", "stat"];

/// Every session, the runtime its actors run in, and the store they hibernate to.
pub struct Sessions {
    runtime: Runtime,
    model: Arc<Model>,
    wasm: Arc<Vec<u8>>,
    store: SnapshotStore,
    /// Runs the store's calls from the blocking threads turns run on.
    tokio: tokio::runtime::Handle,
    config: SessionConfig,
    table: Mutex<HashMap<String, Arc<Slot>>>,
    live: AtomicUsize,
    /// The serving protocol the actor module speaks (1 without a `serve_protocol` export).
    protocol: u32,
    /// In a cluster: where new sessions go, and whether this node drains.
    pub(crate) placement: Placement,
    /// The server's counters.
    pub metrics: Arc<Metrics>,
}

fn actor_error(err: ActorError) -> ApiError {
    match &err {
        // The device is full now (too many actors, or a large batch or prompt): not the request's fault, and
        // it may succeed once memory is given back. The session continues from its last snapshot.
        ActorError::DeviceMemory { .. } => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "device_memory_exhausted",
                format!("the GPU is out of memory; retry later: {err}"),
            );
            e.retry_after = Some(1);
            e
        }
        ActorError::Trap { .. }
        | ActorError::Deadline { .. }
        | ActorError::MemoryCap { .. }
        | ActorError::HostAllowance { .. } => ApiError::server("actor_trap", err.to_string()),
        _ => ApiError::server("actor_error", err.to_string()),
    }
}

impl Sessions {
    /// A session table over `runtime` (which has `model` registered as `default`), running actors of
    /// `wasm`, with every session found in `store` known as hibernated. Call it, and every method that runs a
    /// turn or touches the store, from a blocking thread of a Tokio runtime (`spawn_blocking`): the store's
    /// calls run on that runtime.
    ///
    /// # Errors
    ///
    /// When an actor of `wasm` cannot be created and initialised, or lacks an export of the protocol; when
    /// there is no Tokio runtime, or the store cannot be listed.
    pub fn new(
        runtime: Runtime,
        model: Arc<Model>,
        wasm: Vec<u8>,
        store: SnapshotStore,
        config: SessionConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let tokio = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("the session table needs a Tokio runtime for its store"))?;
        let sessions = Sessions {
            runtime,
            model,
            wasm: Arc::new(wasm),
            store,
            tokio,
            config,
            table: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            protocol: 1,
            placement: Placement::default(),
            metrics,
        };
        // Check the module once, so that a wrong `--actor` fails at start rather than on each request.
        let module = sessions.runtime.compile(&sessions.wasm)?;
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        if let Some(missing) = REQUIRED_EXPORTS.iter().find(|name| !exports.contains(name)) {
            anyhow::bail!("the actor module has no export `{missing}`; serving needs {}", REQUIRED_EXPORTS.join(", "));
        }
        let mut actor = sessions.new_actor().map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let mut sessions = sessions;
        if exports.contains(&"serve_protocol") {
            let version: u32 = actor.call("serve_protocol", ()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let newest = driftwood_abi::serve::SERVE_PROTOCOL_VERSION;
            if version == 0 || version > newest {
                anyhow::bail!("the actor module speaks serving protocol {version}; this server speaks 1 to {newest}");
            }
            if version >= 2 && !exports.contains(&"set_logprobs") {
                anyhow::bail!("the actor module speaks serving protocol {version} but has no export `set_logprobs`");
            }
            sessions.protocol = version;
        }
        drop(actor);
        // In a cluster etcd knows the sessions; the store's listing would be every node's.
        let known = if sessions.config.cluster.is_some() {
            vec![]
        } else {
            sessions.tokio.block_on(sessions.store.sessions())?
        };
        {
            let mut table = sessions.table.lock().unwrap_or_else(|p| p.into_inner());
            for id in known {
                let slot = Slot::default();
                slot.lock().saved = true;
                table.insert(id, Arc::new(slot));
            }
        }
        Ok(sessions)
    }

    /// The serving protocol the actor module speaks: 1, or 2 with log-probabilities (see
    /// [`driftwood_abi::serve`]).
    pub fn protocol(&self) -> u32 {
        self.protocol
    }

    /// The runtime actors run in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Seconds a client should wait before retrying a session whose owner cannot be reached: its claim
    /// lapses with its lease (1 on a single node).
    pub fn retry_after_secs(&self) -> u64 {
        self.config.cluster.as_ref().map_or(1, |n| n.ttl().as_secs().max(1))
    }

    /// The model served.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The session table's settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn new_actor(&self) -> Result<Actor, ApiError> {
        let mut actor = self.runtime.instantiate(&self.wasm).map_err(actor_error)?;
        actor.call::<u32, ()>("init", self.config.max_seq).map_err(actor_error)?;
        Ok(actor)
    }

    /// Claims session `key` for one request, creating the session if it is new.
    ///
    /// # Errors
    ///
    /// A 409 `session_busy` while another request on the same session is running.
    pub fn claim(&self, key: &str) -> Result<Claim, ApiError> {
        let slot = self.table.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone();
        if slot.busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.metrics.rejected_busy.inc();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "session_busy",
                format!("session `{key}` is already running a request; send its next turn when that one has finished"),
            ));
        }
        Ok(Claim { key: key.to_string(), slot })
    }

    /// In a cluster, makes sure this node owns the claimed session before its turn runs (see
    /// [`locate`](Self::locate)).
    ///
    /// # Errors
    ///
    /// A 409 `session_owned` naming the owner (and its address in an `X-Driftwood-Owner` header) when another
    /// node owns the session; a 503 `cluster_unavailable` when etcd cannot be reached.
    pub async fn own(&self, claim: &Claim) -> Result<(), ApiError> {
        match self.locate(claim, false).await? {
            None => Ok(()),
            Some(elsewhere) => Err(elsewhere.refusal(&claim.key)),
        }
    }

    /// In a cluster, finds where the claimed session's turn runs: `None` for here (this node holds a claim
    /// of it, or has just claimed it in etcd), else the node to send the request to: its owner, or, for a
    /// session nobody owns and `may_place`, the least-loaded node (see [`Placement::choose`]). A claim newly
    /// won starts the session from the snapshot etcd points to (whatever this node had of it is older). A
    /// draining node claims no session that is not its own already. On one node, `None`.
    ///
    /// # Errors
    ///
    /// A 503 `cluster_unavailable` when etcd cannot be reached; a 503 `node_draining` when this node drains
    /// and the session is nobody's (a request another node forwarded on a stale view of this one).
    pub async fn locate(&self, claim: &Claim, may_place: bool) -> Result<Option<OwnedElsewhere>, ApiError> {
        let Some(node) = &self.config.cluster else { return Ok(None) };
        // A lost lease took every claim of this node with it: rejoin under a new one, and claim again.
        if node.lease_lost() {
            node.rejoin().await.map_err(|e| cluster_unavailable(&e))?;
        }
        {
            let state = claim.slot.lock();
            if state.fence.is_some() && state.claim_lease == node.lease() {
                return Ok(None);
            }
        }
        let place_elsewhere = if may_place { self.placement.choose(node.id(), self.owned()) } else { None };
        if place_elsewhere.is_some() || (!may_place && self.placement.draining()) {
            let owner = node.owner(&claim.key).await.map_err(|e| cluster_unavailable(&e))?;
            match (owner, place_elsewhere) {
                (Some(owner), _) if owner.node != node.id() => return Ok(Some(self.elsewhere(node, owner).await)),
                (Some(_), _) => {}
                (None, Some(peer)) => {
                    self.metrics.cluster_placed.inc();
                    return Ok(Some(OwnedElsewhere {
                        node: peer.id,
                        lease: peer.lease,
                        address: Some(peer.address),
                        placed: true,
                    }));
                }
                (None, None) => {
                    let mut e = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "node_draining",
                        format!(
                            "node `{}` is draining and takes no new sessions; send the request to another node",
                            node.id()
                        ),
                    );
                    e.retry_after = Some(1);
                    return Err(e);
                }
            }
        }
        let mut claimed = node.claim(&claim.key).await;
        if matches!(&claimed, Err(ClusterError::Etcd(e)) if e.is_lease_not_found()) {
            node.rejoin().await.map_err(|e| cluster_unavailable(&e))?;
            claimed = node.claim(&claim.key).await;
        }
        match claimed {
            Ok(Ownership::Won { fence, lease, pointer }) => {
                {
                    let mut state = claim.slot.lock();
                    if state.actor.take().is_some() {
                        self.live.fetch_sub(1, Ordering::Relaxed);
                    }
                    state.fence = Some(fence);
                    state.claim_lease = lease;
                    state.saved = pointer.is_some();
                    state.object = pointer;
                }
                self.metrics.cluster_claims.inc();
                // Other nodes place new sessions by what this node owns: tell them now, not at the next refresh.
                let _ = self.placement.publish(node, self.load()).await;
                Ok(None)
            }
            Ok(Ownership::Taken(owner)) => Ok(Some(self.elsewhere(node, owner).await)),
            Err(e) => Err(cluster_unavailable(&e)),
        }
    }

    /// The session is `owner`'s: where to find it.
    async fn elsewhere(&self, node: &Node, owner: Owner) -> OwnedElsewhere {
        self.metrics.cluster_owned_elsewhere.inc();
        let address = node.address_of(&owner.node).await.ok().flatten();
        OwnedElsewhere { node: owner.node, lease: owner.lease, address, placed: false }
    }

    /// Whether node `id` is still alive under `lease` (an owner or placement target found earlier). A node
    /// that stopped or died is gone once its lease expires.
    ///
    /// # Errors
    ///
    /// A 503 `cluster_unavailable` when etcd cannot be reached.
    pub async fn still_alive(&self, id: &str, lease: i64) -> Result<bool, ApiError> {
        let Some(node) = &self.config.cluster else { return Ok(false) };
        node.is_registered(id, lease).await.map_err(|e| cluster_unavailable(&e))
    }

    /// Sessions this node holds a claim of (a session running a turn counts: it was claimed to run it).
    fn owned(&self) -> usize {
        let slots: Vec<Arc<Slot>> = self.table.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        slots.iter().filter(|s| s.state.try_lock().map(|st| st.fence.is_some()).unwrap_or(true)).count()
    }

    /// What this node publishes for placement.
    fn load(&self) -> Load {
        Load { sessions: self.owned(), draining: self.placement.draining() }
    }

    /// In a cluster: publishes this node's load (if it changed) and reads the other nodes'. The server calls
    /// it twice a lease TTL.
    pub async fn refresh_placement(&self) {
        let Some(node) = &self.config.cluster else { return };
        if let Err(e) = self.placement.publish(node, self.load()).await {
            tracing::debug!(error = %e, "publishing this node's load");
        }
        match node.peers().await {
            Ok(peers) => self.placement.set_peers(peers),
            Err(e) => tracing::debug!(error = %e, "reading the other nodes' loads"),
        }
    }

    /// Drains this node without stopping it: from now on it takes no new sessions, and every session it
    /// owns is snapshotted (unless its last turn's snapshot is in the store already), released from memory
    /// and released in etcd, so that its next request, on any node, is placed on another node. Waits for
    /// running turns to finish. Returns the sessions released and, for each one that could not be, why. On
    /// one node, does nothing. Blocks; call it from a blocking thread.
    pub fn drain(&self) -> (usize, Vec<String>) {
        let Some(node) = &self.config.cluster else { return (0, vec![]) };
        self.placement.set_draining(true);
        self.tokio.block_on(self.refresh_placement());
        let slots: Vec<(String, Arc<Slot>)> =
            self.table.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        let (mut released, mut failures) = (0, vec![]);
        for (key, slot) in slots {
            let mut state = slot.lock();
            let Some(fence) = state.fence else { continue };
            if state.actor.is_some() && !state.saved {
                match self.save(&key, &mut state) {
                    Ok(()) => {}
                    Err(SaveError::Fenced(_)) => {
                        self.forget(&mut state);
                        continue;
                    }
                    Err(e) => {
                        failures.push(format!("session `{key}`: {e}"));
                        continue;
                    }
                }
            }
            self.release(&mut state);
            match self.tokio.block_on(node.release(&key, fence)) {
                Ok(_) => {
                    state.fence = None;
                    released += 1;
                }
                Err(e) => failures.push(format!("session `{key}`: {e}")),
            }
        }
        self.tokio.block_on(self.refresh_placement());
        (released, failures)
    }

    /// Ends a drain: this node takes new sessions again.
    pub async fn undrain(&self) {
        self.placement.set_draining(false);
        self.refresh_placement().await;
    }

    /// Runs one turn on the claimed session (or, without a claim, on a fresh actor discarded afterwards),
    /// sending generated text to `sink` as it is produced. Blocks; call it from a blocking thread.
    ///
    /// After a completed turn the session's actor is snapshotted to the store (atomically), so a crash loses
    /// at most the turn in progress. An actor that traps is dropped: the session continues from its last
    /// snapshot.
    ///
    /// # Errors
    ///
    /// A 500 with the trap message when the actor traps or runs past its deadline or memory cap, or when its
    /// snapshot cannot be read or written; a 400 when the prompt does not fit in the session.
    pub fn run_turn(
        &self,
        claim: Option<&Claim>,
        input: &Input,
        sampling: &Sampling,
        sink: impl FnMut(&str, &[TokenLogprob]) -> Result<(), String> + Send + 'static,
    ) -> Result<TurnOutcome, ApiError> {
        let Some(claim) = claim else {
            let mut actor = self.new_actor()?;
            return self.drive(&mut actor, input, sampling, sink);
        };
        let mut state = claim.slot.lock();
        let mut restored = false;
        if state.actor.is_none() {
            let actor = if state.saved {
                let _span = tracing::info_span!("restore", session_id = %claim.key).entered();
                let started = Instant::now();
                let actor = self.wake(&claim.key, &mut state).map_err(|e| {
                    tracing::warn!(error = format!("{e:#}"), "restore failed");
                    ApiError::server("restore_failed", format!("session `{}` cannot be restored: {e:#}", claim.key))
                })?;
                let took = started.elapsed();
                tracing::debug!(
                    object = state.object.as_ref().map(ObjectName::path),
                    ms = took.as_secs_f64() * 1e3,
                    "restored"
                );
                self.metrics.restored(took);
                state.restores += 1;
                restored = true;
                actor
            } else {
                self.new_actor()?
            };
            state.actor = Some(actor);
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        let result = match state.actor.as_mut() {
            Some(actor) => self.drive(actor, input, sampling, sink),
            None => Err(ApiError::server("actor_error", "the session has no actor")),
        };
        state.last_used = Some(Instant::now());
        match result {
            Ok(mut outcome) => {
                outcome.restored = restored;
                if restored {
                    let saved = outcome.prompt_tokens.saturating_sub(outcome.evaluated_tokens);
                    self.metrics.restore_prefill_saved_tokens.inc_by(saved as u64);
                }
                state.turns += 1;
                // The session keeps the turn's counts, not its text (up to the host allowance, held for as long
                // as the session exists).
                state.last = Some(TurnOutcome { text: String::new(), ..outcome.clone() });
                if state.actor.is_some() {
                    if let Err(e) = self.save(&claim.key, &mut state) {
                        return Err(self.unsaved(&mut state, e));
                    }
                    self.metrics.snapshots.inc();
                }
                if self.config.hibernate_after.is_zero() {
                    self.release(&mut state);
                }
                Ok(outcome)
            }
            Err(err) => {
                if err.code == "actor_trap" {
                    self.metrics.traps.inc();
                }
                // The actor's state after a failed call is unknown: continue from the last snapshot.
                if state.actor.take().is_some() {
                    self.live.fetch_sub(1, Ordering::Relaxed);
                }
                Err(err)
            }
        }
    }

    /// Restores the actor of session `key` from its latest snapshot.
    fn wake(&self, key: &str, state: &mut SlotState) -> anyhow::Result<Actor> {
        let name = match state.object.clone() {
            Some(name) => name,
            None if self.config.cluster.is_some() => anyhow::bail!("etcd holds no committed snapshot of it"),
            None => self
                .tokio
                .block_on(self.store.latest(key))?
                .ok_or_else(|| anyhow::anyhow!("{} holds no snapshot of it", self.store.url()))?,
        };
        let actor = match self.tokio.block_on(self.store.get(&name))? {
            Fetched::File(path) => self.runtime.restore_actor(&path, &self.wasm)?,
            Fetched::Bytes(bytes) => self.runtime.restore_actor_bytes(bytes, &self.wasm)?,
        };
        state.object = Some(name);
        Ok(actor)
    }

    /// Writes the live actor of session `key` as the session's next snapshot object and, in a cluster,
    /// commits it in etcd; then deletes the earlier objects. The session's state is unchanged if the write
    /// fails.
    fn save(&self, key: &str, state: &mut SlotState) -> Result<(), SaveError> {
        let _span = tracing::info_span!("snapshot", session_id = key).entered();
        let started = Instant::now();
        let saved = self.write_snapshot(key, state);
        match &saved {
            Ok(()) => tracing::debug!(
                object = state.object.as_ref().map(ObjectName::path),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "snapshot written"
            ),
            Err(e) => tracing::warn!(error = %e, "snapshot not kept"),
        }
        saved
    }

    /// [`save`](Self::save), without its span and log lines.
    fn write_snapshot(&self, key: &str, state: &mut SlotState) -> Result<(), SaveError> {
        let Some(actor) = state.actor.as_mut() else {
            return Err(SaveError::Other(anyhow::anyhow!("session `{key}` has no live actor")));
        };
        let cluster = self.config.cluster.as_ref().map(|node| (node, state.fence));
        let fence = match cluster {
            Some((_, Some(fence))) => fence,
            Some((_, None)) => return Err(SaveError::Other(anyhow::anyhow!("this node holds no claim of `{key}`"))),
            // One node, no claims: fence 0.
            None => 0,
        };
        let last = match &state.object {
            Some(name) => Some(name.clone()),
            None if cluster.is_some() => None,
            None => self.tokio.block_on(self.store.latest(key)).map_err(|e| SaveError::Other(e.into()))?,
        };
        // The next number after the latest object of this claim; a new claim starts at 1.
        let seq = last.as_ref().filter(|n| n.fence == fence).map_or(1, |n| n.seq + 1);
        let next = ObjectName::new(key, fence, seq)
            .ok_or_else(|| SaveError::Other(anyhow::anyhow!("`{key}` is not a session id")))?;
        let write = |w: &mut dyn std::io::Write| {
            actor.write_snapshot_to(w, Default::default()).map(|_| ()).map_err(std::io::Error::other)
        };
        self.tokio.block_on(self.store.put_new(&next, write)).map_err(|e| SaveError::Other(e.into()))?;
        if let Some((node, _)) = cluster {
            match self.tokio.block_on(node.commit(fence, &next)) {
                Ok(()) => self.metrics.cluster_commits.inc(),
                Err(e @ ClusterError::Fenced { .. }) => {
                    self.metrics.cluster_fenced.inc();
                    // Garbage: no pointer names it. The session's owner collects it after its next commit.
                    let _ = self.tokio.block_on(self.store.delete(&next));
                    return Err(SaveError::Fenced(e));
                }
                // The commit may or may not have been applied: the session restarts from whatever etcd says.
                Err(e) => return Err(SaveError::Uncertain(e)),
            };
        }
        state.saved = true;
        state.object = Some(next.clone());
        // Earlier snapshots are garbage now; one left by a failure here is collected after the next turn.
        if let Err(e) = self.tokio.block_on(self.store.collect(&next)) {
            tracing::warn!(session_id = key, error = %e, "collecting earlier snapshots failed");
        }
        Ok(())
    }

    /// The answer to a turn whose snapshot could not be saved or committed, after forgetting what the
    /// failure made unknown.
    fn unsaved(&self, state: &mut SlotState, err: SaveError) -> ApiError {
        match err {
            SaveError::Other(e) => {
                state.saved = state.object.is_some();
                ApiError::server("snapshot_failed", format!("the turn completed but {e:#}"))
            }
            SaveError::Fenced(e) => {
                self.forget(state);
                ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    "session_moved",
                    format!("the turn was not kept: {e}; send the request again"),
                )
            }
            SaveError::Uncertain(e) => {
                self.forget(state);
                unavailable(format!(
                    "the turn's snapshot was written but its commit is unknown: {e}; send the request again"
                ))
            }
        }
    }

    /// Drops this node's claim and copy of a session (the next request claims it anew and restores it from
    /// what etcd points to).
    fn forget(&self, state: &mut SlotState) {
        if state.actor.take().is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        state.fence = None;
        state.object = None;
        state.saved = false;
    }

    /// Feeds `input` to `actor` with `sampling` and collects the outcome.
    fn drive(
        &self,
        actor: &mut Actor,
        input: &Input,
        sampling: &Sampling,
        sink: impl FnMut(&str, &[TokenLogprob]) -> Result<(), String> + Send + 'static,
    ) -> Result<TurnOutcome, ApiError> {
        let turn = Arc::new(Mutex::new(Emitted::default()));
        let framed = sampling.logprobs.is_some();
        // Shared with the emit sink, to flush what is left after the turn.
        let sink = Arc::new(Mutex::new(sink));
        {
            let (turn, sink) = (turn.clone(), sink.clone());
            // The turn's text and log-probabilities are kept for the response: at most the actor's host
            // allowance of them.
            let allowance = actor.limits().host_bytes;
            actor.set_emit_sink(move |piece| {
                let mut turn = turn.lock().unwrap_or_else(|p| p.into_inner());
                if turn.bytes.saturating_add(piece.len()) > allowance {
                    return Err(format!(
                        "the turn's text would pass the actor's {allowance}-byte host allowance (it has {} bytes, \
                         the piece {})",
                        turn.bytes,
                        piece.len()
                    ));
                }
                turn.bytes += piece.len();
                // With log-probabilities on, each piece is a frame: a token's record, or text.
                let text = match framed.then(|| piece.split_at_checked(1)).flatten() {
                    None if !framed => piece,
                    Some(("T", text)) => text,
                    Some(("L", record)) => {
                        let t = logprobs::parse_frame(record)?;
                        // The record kept may be larger than its frame: charge the larger.
                        let kept = std::mem::size_of::<TokenLogprob>() + std::mem::size_of_val(t.top.as_slice());
                        turn.bytes += kept.saturating_sub(piece.len());
                        if turn.bytes > allowance {
                            return Err(format!(
                                "the turn's log-probabilities would pass the actor's {allowance}-byte host allowance"
                            ));
                        }
                        turn.pending += 1;
                        turn.logprobs.push(t);
                        return Ok(());
                    }
                    _ => {
                        return Err(format!("the actor emitted {piece:?}, which is not a frame of serving protocol 2"));
                    }
                };
                turn.text.push_str(text);
                // A piece of text goes out with the tokens chosen since the last one.
                let from = turn.logprobs.len() - turn.pending;
                turn.pending = 0;
                let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
                (*sink)(text, &turn.logprobs[from..])
            });
        }
        let result = self.drive_calls(actor, input, sampling);
        // Drops the request's sink (and the stream's sender with it).
        actor.set_emit_sink(|_| Ok(()));
        // Nobody reads captured log lines after the turn: they are printed, and their host memory freed.
        for line in actor.take_logs() {
            crate::logging::actor_line(&line);
        }
        let generated = result?;
        let stat = |actor: &mut Actor, i: u32| actor.call::<u32, u32>("stat", i).map_err(actor_error);
        let prompt_tokens = stat(actor, 0)?;
        let evaluated_tokens = stat(actor, 1)?;
        let finish_reason = match stat(actor, 3)? {
            0 | 1 => "stop",
            _ => "length",
        };
        let m = &self.metrics;
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        m.prefill_tokens.inc_by(evaluated_tokens as u64);
        m.prefill_saved_tokens.inc_by(prompt_tokens.saturating_sub(evaluated_tokens) as u64);
        m.completion_tokens.inc_by(generated as u64);
        let Emitted { text, logprobs, pending, .. } =
            std::mem::take(&mut *turn.lock().unwrap_or_else(|p| p.into_inner()));
        // Tokens whose text never came (cut at a stop string) are sent on their own.
        if pending > 0 {
            let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
            (*sink)("", &logprobs[logprobs.len() - pending..]).map_err(|e| ApiError::server("actor_trap", e))?;
        }
        Ok(TurnOutcome {
            prompt_tokens,
            evaluated_tokens,
            completion_tokens: generated,
            finish_reason,
            text,
            restored: false,
            logprobs,
        })
    }

    fn drive_calls(&self, actor: &mut Actor, input: &Input, s: &Sampling) -> Result<u32, ApiError> {
        let (top_k, min_p, repetition_penalty) = (0u32, 0f32, 1f32);
        // Set on every turn: a session's actor keeps the setting of its previous one.
        if self.protocol >= 2 {
            let top = s.logprobs.map_or(-1, |n| n.min(driftwood_abi::serve::MAX_TOP_LOGPROBS) as i32);
            actor.call::<i32, ()>("set_logprobs", top).map_err(actor_error)?;
        } else if s.logprobs.is_some() {
            return Err(logprobs_unsupported());
        }
        actor
            .call::<(f32, u32, f32, f32, f32, u64), ()>(
                "set_sampling",
                (s.temperature, top_k, s.top_p, min_p, repetition_penalty, s.seed),
            )
            .map_err(actor_error)?;
        let stops = s.stops.join("\0");
        let (ptr, len) = write_input(actor, &stops)?;
        actor.call::<(u32, u32), ()>("set_stop_list", (ptr, len)).map_err(actor_error)?;
        actor.call::<(u32, u32), ()>("dealloc", (ptr, len)).map_err(actor_error)?;
        let (export, text) = match input {
            Input::Chat(json) => ("chat_messages", json),
            Input::Completion(prompt) => ("generate", prompt),
        };
        let (ptr, len) = write_input(actor, text)?;
        let generated: i32 = actor.call(export, (ptr, len, s.max_tokens)).map_err(actor_error)?;
        actor.call::<(u32, u32), ()>("dealloc", (ptr, len)).map_err(actor_error)?;
        match generated {
            -1 => Err(ApiError::invalid(
                Some("messages"),
                "context_length_exceeded",
                format!("the prompt does not fit in the session's {}-token context", self.config.max_seq),
            )),
            n if n < 0 => Err(ApiError::server("actor_error", format!("the actor refused the request (code {n})"))),
            n => Ok(n as u32),
        }
    }

    fn release(&self, state: &mut SlotState) {
        if state.actor.take().is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.metrics.hibernations.inc();
        }
    }

    /// Hibernates idle actors: those unused for the configured idle time, then, while more than the
    /// configured number are live, the least recently used. Their snapshots are already in the store (one
    /// is written after every turn); only their memory is released. Returns how many were released.
    pub fn hibernate_idle(&self) -> usize {
        let slots: Vec<Arc<Slot>> = self.table.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let now = Instant::now();
        let mut released = 0;
        let mut idle_live = vec![];
        for slot in &slots {
            let Ok(mut state) = slot.state.try_lock() else { continue };
            if state.actor.is_none() || !state.saved {
                continue;
            }
            let idle = state.last_used.map_or(Duration::MAX, |t| now.duration_since(t));
            if idle >= self.config.hibernate_after {
                self.release(&mut state);
                released += 1;
            } else {
                idle_live.push((state.last_used, slot.clone()));
            }
        }
        let mut live = self.live.load(Ordering::Relaxed);
        if live > self.config.max_live {
            idle_live.sort_by_key(|(t, _)| *t);
            for (_, slot) in idle_live {
                if live <= self.config.max_live {
                    break;
                }
                let Ok(mut state) = slot.state.try_lock() else { continue };
                if state.actor.is_some() && state.saved {
                    self.release(&mut state);
                    released += 1;
                    live -= 1;
                }
            }
        }
        released
    }

    /// Snapshots every live actor to the store (for a graceful shutdown), in a cluster committing each; a
    /// session whose commit is refused (another node owns it now) is dropped. Waits for turns in progress.
    /// Returns (actors snapshotted, failures).
    pub fn snapshot_all(&self) -> (usize, Vec<String>) {
        let slots: Vec<(String, Arc<Slot>)> =
            self.table.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        let (mut saved, mut failures) = (0, vec![]);
        for (key, slot) in slots {
            let mut state = slot.lock();
            if state.actor.is_some() {
                match self.save(&key, &mut state) {
                    Ok(()) => {
                        saved += 1;
                        self.metrics.snapshots.inc();
                    }
                    // Another node owns the session now: what this node held of it was not its to keep.
                    Err(SaveError::Fenced(_)) => self.forget(&mut state),
                    Err(e) => failures.push(format!("session `{key}`: {e}")),
                }
            }
        }
        (saved, failures)
    }

    /// (live actors, hibernated sessions).
    pub fn counts(&self) -> (usize, usize) {
        let slots: Vec<Arc<Slot>> = self.table.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let hibernated = slots
            .iter()
            .filter(|s| s.state.try_lock().map(|st| st.actor.is_none() && st.saved).unwrap_or(false))
            .count();
        (self.live.load(Ordering::Relaxed), hibernated)
    }

    /// What the server knows of session `key`, or `None` if there is no such session.
    pub fn info(&self, key: &str) -> Option<Value> {
        let slot = self.table.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()?;
        let busy = slot.busy.load(Ordering::Acquire);
        let Ok(state) = slot.state.try_lock() else {
            return Some(json!({"id": key, "busy": true, "live": true}));
        };
        if state.actor.is_none() && !state.saved && state.turns == 0 {
            return None;
        }
        let last = state.last.as_ref().map(|t| {
            json!({
                "prompt_tokens": t.prompt_tokens,
                "evaluated_tokens": t.evaluated_tokens,
                "completion_tokens": t.completion_tokens,
                "restored": t.restored,
            })
        });
        Some(json!({
            "id": key,
            "busy": busy,
            "live": state.actor.is_some(),
            "hibernated": state.actor.is_none() && state.saved,
            "turns": state.turns,
            "restores": state.restores,
            "last_turn": last,
            "snapshot": state.object.as_ref().map(ObjectName::path),
            "fence": state.fence,
        }))
    }

    /// Ends session `key`: drops its actor and deletes its snapshot.
    ///
    /// # Errors
    ///
    /// 404 for an unknown session, 409 while it runs a request, 500 if the snapshot cannot be deleted.
    pub fn delete(&self, key: &str) -> Result<(), ApiError> {
        // In a cluster the session may be known to etcd only: claiming it tells.
        if self.config.cluster.is_none() && self.info(key).is_none() {
            return Err(session_not_found(key));
        }
        let claim = self.claim(key)?;
        self.tokio.block_on(self.own(&claim))?;
        let mut state = claim.slot.lock();
        if state.actor.is_none() && !state.saved && state.turns == 0 {
            if let (Some(node), Some(fence)) = (&self.config.cluster, state.fence.take()) {
                let _ = self.tokio.block_on(node.release(key, fence));
            }
            drop(state);
            self.table.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
            return Err(session_not_found(key));
        }
        if state.actor.take().is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        if let (Some(node), Some(fence)) = (&self.config.cluster, state.fence) {
            self.tokio.block_on(node.remove(key, fence)).map_err(|e| cluster_unavailable(&e))?;
        }
        self.tokio
            .block_on(self.store.remove_session(key))
            .map_err(|e| ApiError::server("snapshot_failed", e.to_string()))?;
        *state = SlotState::default();
        drop(state);
        self.table.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        Ok(())
    }
}

/// What a turn's actor emitted so far.
#[derive(Default)]
struct Emitted {
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Of `logprobs`, the last ones whose text has not come yet.
    pending: usize,
    /// Bytes emitted, frames included (charged to the host allowance).
    bytes: usize,
}

/// The 400 for log-probabilities asked of an actor that cannot report them.
pub fn logprobs_unsupported() -> ApiError {
    ApiError::invalid(
        Some("logprobs"),
        "unsupported_parameter",
        "the actor module this server runs does not report log-probabilities (it speaks serving protocol 1; \
         logprobs need protocol 2)",
    )
}

/// Why a snapshot was not kept.
enum SaveError {
    /// Not written (or not readable for the next number).
    Other(anyhow::Error),
    /// Written, and its commit refused: another node owns the session now.
    Fenced(ClusterError),
    /// Written, and whether its commit was applied is unknown (etcd did not answer).
    Uncertain(ClusterError),
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::Other(e) => write!(f, "{e:#}"),
            SaveError::Fenced(e) | SaveError::Uncertain(e) => write!(f, "{e}"),
        }
    }
}

/// The 503 for etcd out of reach.
fn cluster_unavailable(err: &ClusterError) -> ApiError {
    unavailable(format!("the cluster's etcd cannot be reached: {err}"))
}

/// A 503 `cluster_unavailable` with `message`, to be retried after a second.
fn unavailable(message: String) -> ApiError {
    let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "cluster_unavailable", message);
    e.retry_after = Some(1);
    e
}

/// Where a session's request goes instead of here: the node that owns the session, or the node it is
/// placed on.
#[derive(Debug, Clone)]
pub struct OwnedElsewhere {
    /// That node's id.
    pub node: String,
    /// The lease its registration carried when it was found (while it carries it, the node is alive).
    pub lease: i64,
    /// The address it registered (`http://host:port`), if it is still registered.
    pub address: Option<String>,
    /// The session has no owner yet and is being placed on that node.
    pub placed: bool,
}

impl OwnedElsewhere {
    /// The 409 `session_owned` for session `key`, naming the owner (and its address in an
    /// `X-Driftwood-Owner` header).
    pub fn refusal(&self, key: &str) -> ApiError {
        let at = self.address.as_deref().map(|a| format!(" at {a}")).unwrap_or_default();
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "session_owned",
            format!("session `{key}` is running on node `{}`{at}; send its requests there", self.node),
        );
        e.owner = self.address.clone();
        e
    }
}

/// The 404 for an unknown session.
pub fn session_not_found(key: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "session_not_found", format!("no session `{key}`"))
}

/// Copies `text` into a fresh buffer of the actor's (from its `alloc` export).
fn write_input(actor: &mut Actor, text: &str) -> Result<(u32, u32), ApiError> {
    let len = u32::try_from(text.len()).map_err(|_| ApiError::invalid(None, "invalid_value", "input over 4 GiB"))?;
    let ptr: u32 = actor.call("alloc", len).map_err(actor_error)?;
    actor.write_text(ptr as usize, text.as_bytes()).map_err(actor_error)?;
    Ok((ptr, len))
}
