//! `driftwood serve`: an OpenAI-compatible HTTP server whose conversations are persistent actors.
//!
//! Every session key names one actor running the chat guest (or a deployment's own module). The actor keeps
//! the conversation and its KV cache in its own memory, so a request whose messages extend the session's
//! history evaluates only the new tokens. After every completed turn the actor is snapshotted to the store
//! (a folder, S3 or memory: a new immutable object per turn); idle actors are released from memory and
//! restored from their snapshot on their next request, also after a restart or a crash.
//!
//! With [`ServeConfig::cluster`] the server is one node of a cluster: a session's turns run only on the node
//! that claimed it in etcd, each snapshot is committed there behind the claim's fencing token before the
//! turn is answered, and a request sent to another node is forwarded to the owner (a request forwarded
//! once is not forwarded again: it is answered 409 `session_owned` naming the owner).
//!
//! | endpoint | |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI chat completions, `stream: true` as server-sent events |
//! | `POST /v1/completions` | OpenAI text completions |
//! | `GET /v1/models` | the model served |
//! | `GET /v1/sessions/{key}`, `DELETE /v1/sessions/{key}` | a session's state; ending it |
//! | `GET /health` | liveness |
//! | `GET /metrics` | Prometheus text |
//!
//! The session key comes from the `X-Session-Id` header or the request's `session_id` field (1–128 ASCII
//! letters, digits, `-`, `_`). Without one, the request runs in a fresh actor that is discarded afterwards.
//! A second request on a session while one runs is answered 409.
//!
//! Requests may ask for each generated token's log-probability (`logprobs`, `top_logprobs`): the actor
//! computes the log-softmax of the model's logits before sampling and emits it beside the text (serving
//! protocol 2, [`driftwood_abi::serve`]); [`logprobs`] shapes it as OpenAI does.
//!
//! Logs are `tracing` events, one line per request at `info` ([`logging`]); `/metrics` is the `prometheus`
//! crate's text exposition ([`metrics`]).
//!
//! Turns run on blocking threads, at most `workers` at once; their decode steps are batched: steps of turns
//! running at the same time are evaluated as one forward pass, each on its own actor's KV cache and logits
//! ([`ServeConfig::batch_window`]).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = driftwood_serve::ServeConfig::new("models/driftwood-mini".into(), "/tmp/driftwood-store".into());
//! let server = driftwood_serve::Server::start(config).await?;
//! println!("listening on http://{}", server.addr());
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod api;
mod forward;
mod http;
pub mod logging;
pub mod logprobs;
pub mod metrics;
mod placement;
mod request_log;
pub mod sessions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use driftwood_backend::BackendKind;
use driftwood_cluster::{Etcd, Node, SnapshotStore, valid_session};
use driftwood_engine::Model;
use driftwood_host::{ActorLimits, LogMode, Placement, Runtime, RuntimeConfig};
use tokio::sync::oneshot;

use metrics::Metrics;
use sessions::{SessionConfig, Sessions};

/// The longest a decode step waits for the steps of other running turns, by default.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// Longest [`ServeConfig::batch_window`] accepted.
pub const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);

/// Longest [`ServeConfig::hibernate_after`] accepted: 30 days.
pub const MAX_HIBERNATE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most requests [`ServeConfig::queue`] and turns [`ServeConfig::workers`] accepted.
pub const MAX_QUEUE: usize = 1_000_000;

/// Shortest and longest [`ClusterConfig::lease_ttl`] accepted.
pub const LEASE_TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// Membership of a cluster of nodes sharing one etcd and one snapshot store.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd's client endpoints, comma-separated (`http://HOST:PORT,…`).
    pub etcd: String,
    /// This node's id, unique in the cluster (1–128 letters, digits, `-`, `_`). Default: made from the
    /// advertised address.
    pub node_id: Option<String>,
    /// The address other nodes and clients reach this node at (`http://HOST:PORT`). Default: the listen
    /// address.
    pub advertise: Option<String>,
    /// Time to live of the node's etcd lease: how long after this node stops (killed, stopped, cut off) its
    /// sessions can be claimed by other nodes.
    pub lease_ttl: Duration,
    /// Prefix of the cluster's etcd keys.
    pub prefix: String,
    /// The bearer token the admin endpoints (`/v1/admin/…`: drain) require; without one they are off.
    pub admin_token: Option<String>,
}

impl ClusterConfig {
    /// Membership of the cluster whose etcd is at `etcd`, with a 5-second lease and the default prefix.
    pub fn new(etcd: impl Into<String>) -> Self {
        ClusterConfig {
            etcd: etcd.into(),
            node_id: None,
            advertise: None,
            lease_ttl: Duration::from_secs(5),
            prefix: driftwood_cluster::DEFAULT_PREFIX.to_string(),
            admin_token: None,
        }
    }
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Hugging Face model directory.
    pub model_dir: PathBuf,
    /// The model id clients name (`model` field); default: the directory's name.
    pub model_id: Option<String>,
    /// The actor module; default: the bundled chat actor.
    pub actor_wasm: Option<Vec<u8>>,
    /// The snapshot store: a folder, or an address `file:///PATH`, `s3://BUCKET[/PREFIX]` (endpoint and
    /// credentials from the usual `AWS_*` environment variables) or `memory://`. See
    /// [`SnapshotStore::open`].
    pub store: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// Backend.
    pub backend: BackendKind,
    /// Where actor memory lives; `None`: [`RuntimeConfig::default_placement`] for the backend (managed
    /// memory on CUDA). With `CudaManaged` each actor reserves its whole memory limit of device memory when it
    /// is created (the house rule: never more than the device has free, counting the other actors'
    /// reservations), so set [`limits`](Self::limits)' `memory_bytes` to what a session needs: its KV cache
    /// (`max_seq` × the model's KV bytes per token) and some tens of MiB for the actor's heap.
    pub placement: Option<Placement>,
    /// Tokens each session holds (0: the model's context length).
    pub max_seq: u32,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// Each actor's memory cap, per-call deadline and host allowance. The host allowance
    /// ([`ActorLimits::host_bytes`]) also bounds what the server keeps for a turn: its text for the response,
    /// and streamed events the client has not yet read; past either the actor traps and the turn fails.
    pub limits: ActorLimits,
    /// Turns running at once.
    pub workers: usize,
    /// Requests waiting for a worker before new ones are refused with 429.
    pub queue: usize,
    /// Idle time after which an actor's memory is released (its snapshot stays); zero releases after
    /// every turn.
    pub hibernate_after: Duration,
    /// Most actors live in memory; past it the least recently used idle ones hibernate.
    pub max_live: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Continuous batching: decode steps of turns running at the same time are evaluated as one forward
    /// pass; the first step waits at most this long for the others. `None` runs each turn's steps alone.
    pub batch_window: Option<Duration>,
    /// Run as a node of a cluster (sessions owned through etcd, snapshots in the shared `store`); `None`:
    /// one node.
    pub cluster: Option<ClusterConfig>,
}

impl ServeConfig {
    /// Checks every value against the range the server can honour.
    ///
    /// # Errors
    ///
    /// A message naming the field and its range: invalid [`limits`](Self::limits) (see
    /// [`ActorLimits::validate`]), `workers` of 0 or above [`MAX_QUEUE`], `queue` above [`MAX_QUEUE`],
    /// `max_live` of 0, `hibernate_after` above [`MAX_HIBERNATE_AFTER`], a zero `batch_window` or one above
    /// [`MAX_BATCH_WINDOW`], a zero `default_max_tokens` or `max_body_bytes`; in a cluster, a lease TTL outside
    /// [`LEASE_TTL_RANGE`] or not whole seconds, an invalid node id, or a `memory://` store.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.limits.validate().map_err(anyhow::Error::msg)?;
        if self.workers == 0 || self.workers > MAX_QUEUE {
            anyhow::bail!("workers must be between 1 and {MAX_QUEUE}, not {}", self.workers);
        }
        if self.queue > MAX_QUEUE {
            anyhow::bail!("queue must be at most {MAX_QUEUE}, not {}", self.queue);
        }
        if self.max_live == 0 {
            anyhow::bail!("max_live must be at least 1");
        }
        if self.hibernate_after > MAX_HIBERNATE_AFTER {
            anyhow::bail!(
                "hibernate_after must be at most {} s, not {:?}",
                MAX_HIBERNATE_AFTER.as_secs(),
                self.hibernate_after
            );
        }
        if let Some(window) = self.batch_window
            && (window.is_zero() || window > MAX_BATCH_WINDOW)
        {
            anyhow::bail!("batch_window must be more than zero and at most {MAX_BATCH_WINDOW:?}, not {window:?}");
        }
        if self.default_max_tokens == 0 {
            anyhow::bail!("default_max_tokens must be at least 1");
        }
        if self.max_body_bytes == 0 {
            anyhow::bail!("max_body_bytes must be at least 1");
        }
        if let Some(cluster) = &self.cluster {
            let (min, max) = LEASE_TTL_RANGE;
            if cluster.lease_ttl < min || cluster.lease_ttl > max || cluster.lease_ttl.subsec_nanos() != 0 {
                anyhow::bail!(
                    "the cluster lease TTL must be whole seconds from {} to {}, not {:?}",
                    min.as_secs(),
                    max.as_secs(),
                    cluster.lease_ttl
                );
            }
            if self.store.to_str() == Some("memory://") {
                anyhow::bail!("the nodes of a cluster share their store: memory:// is this process's alone");
            }
            if let Some(id) = &cluster.node_id
                && !valid_session(id)
            {
                anyhow::bail!("node id {id:?} is not valid: use 1–128 ASCII letters, digits, `-` or `_`");
            }
        }
        Ok(())
    }

    /// Defaults for the model in `model_dir` and the store `store`: loopback on port 8080, 4 workers, a
    /// 256-request queue, hibernation after 5 minutes idle or past 256 live actors, decode steps batched with
    /// a 2 ms window.
    pub fn new(model_dir: PathBuf, store: PathBuf) -> Self {
        ServeConfig {
            model_dir,
            model_id: None,
            actor_wasm: None,
            store,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            backend: BackendKind::Auto,
            placement: None,
            max_seq: 0,
            default_max_tokens: 256,
            limits: ActorLimits { memory_bytes: 1 << 30, deadline: Duration::from_secs(120), ..Default::default() },
            workers: 4,
            queue: 256,
            hibernate_after: Duration::from_secs(300),
            max_live: 256,
            max_body_bytes: 4 << 20,
            batch_window: Some(DEFAULT_BATCH_WINDOW),
            cluster: None,
        }
    }
}

/// State shared by every request.
pub(crate) struct AppState {
    pub sessions: Sessions,
    pub model_id: String,
    pub max_seq: u32,
    pub default_max_tokens: u32,
    pub scheduler: http::Scheduler,
    pub created: u64,
    /// In a cluster: sends requests for sessions other nodes own on to them.
    pub forwarder: Option<forward::Forwarder>,
    /// The admin endpoints' bearer token (`None`: they are off).
    pub admin_token: Option<String>,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    reaper: tokio::task::JoinHandle<()>,
    placer: Option<tokio::task::JoinHandle<()>>,
    node: Option<Arc<Node>>,
}

/// Joins the cluster as this node, listening at `addr`.
async fn join(cluster: &ClusterConfig, addr: SocketAddr) -> anyhow::Result<Node> {
    let etcd = Etcd::from_list(&cluster.etcd, Duration::from_secs(2))?;
    let advertise = cluster.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let id = cluster.node_id.clone().unwrap_or_else(|| {
        let plain = advertise.trim_start_matches("http://").trim_start_matches("https://");
        plain.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(128).collect()
    });
    Node::join(Arc::new(etcd), &cluster.prefix, &id, &advertise, cluster.lease_ttl)
        .await
        .with_context(|| format!("cannot join the cluster at {} as node `{id}`", cluster.etcd))
}

impl Server {
    /// Loads the model, opens the store (sessions found in it are known, hibernated), binds, joins the
    /// cluster if configured, and starts serving.
    ///
    /// # Errors
    ///
    /// A configuration that fails [`ServeConfig::validate`], a model that cannot be loaded, an actor module that does not fit the protocol, a store that cannot be
    /// created, an address that cannot be bound, an etcd that cannot be reached or a node id in use.
    pub async fn start(config: ServeConfig) -> anyhow::Result<Server> {
        config.validate()?;
        let model = Arc::new(
            Model::load(&config.model_dir, &mut |_| {})
                .with_context(|| format!("cannot load the model in {}", config.model_dir.display()))?,
        );
        let max_position = model.config().max_position_embeddings as u32;
        let max_seq = if config.max_seq == 0 { max_position } else { config.max_seq.min(max_position) };
        let model_id = config
            .model_id
            .clone()
            .unwrap_or_else(|| config.model_dir.file_name().and_then(|n| n.to_str()).unwrap_or("default").to_string());
        let runtime = Runtime::new(RuntimeConfig {
            backend: config.backend,
            placement: config.placement.unwrap_or(RuntimeConfig::default_placement(config.backend)),
            log: LogMode::Capture,
            limits: config.limits,
            batch_window: config.batch_window,
            ..Default::default()
        })?;
        // On a GPU the weights go to the device now, once, before any actor runs (see `Runtime::add_model`).
        runtime.add_model("default", model.clone())?;
        let max_live = config.max_live.max(1);
        if runtime.batch_window().is_some() {
            let started = std::time::Instant::now();
            let sizes = runtime.warm_decode(&model, max_seq as usize, max_live)?;
            if sizes > 0 {
                tracing::info!(
                    sizes,
                    max_batch = max_live,
                    seconds = started.elapsed().as_secs_f64(),
                    "batched decode prepared"
                );
            }
        }
        let store = match config.store.to_str() {
            Some(url) if url.contains("://") => SnapshotStore::open(url)?,
            _ => SnapshotStore::local(&config.store)?,
        };
        let wasm = config.actor_wasm.clone().unwrap_or_else(|| driftwood_actors::CHAT.to_vec());
        let metrics = Arc::new(Metrics::default());
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.addr))?;
        let addr = listener.local_addr()?;
        let node = match &config.cluster {
            Some(cluster) => Some(Arc::new(join(cluster, addr).await?)),
            None => None,
        };
        let forwarder = node.as_ref().map(|n| forward::Forwarder::new(n.id().to_string(), Duration::from_secs(2)));
        let session_config =
            SessionConfig { max_seq, hibernate_after: config.hibernate_after, max_live, cluster: node.clone() };
        let sessions =
            tokio::task::spawn_blocking(move || Sessions::new(runtime, model, wasm, store, session_config, metrics))
                .await??;
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let state = Arc::new(AppState {
            sessions,
            model_id,
            max_seq,
            default_max_tokens: config.default_max_tokens.max(1),
            scheduler: http::Scheduler::new(config.workers.max(1), config.queue),
            created,
            forwarder,
            admin_token: config.cluster.as_ref().and_then(|c| c.admin_token.clone()),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let app = http::router(state.clone(), config.max_body_bytes);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        let reaper = {
            let state = state.clone();
            let period = (config.hibernate_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || state.sessions.hibernate_idle()).await;
                }
            })
        };
        // In a cluster: this node's load published, and the others' read, twice a lease TTL (and once now, so
        // that a node that joins takes new sessions at once).
        let placer = node.as_ref().map(|node| {
            let state = state.clone();
            let period = (node.ttl() / 2).max(Duration::from_millis(200));
            tokio::spawn(async move {
                loop {
                    state.sessions.refresh_placement().await;
                    tokio::time::sleep(period).await;
                }
            })
        });
        Ok(Server { addr, state, stop: Some(stop), task, reaper, placer, node })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The session table (to inspect or claim sessions from the embedding program).
    pub fn sessions(&self) -> &Sessions {
        &self.state.sessions
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.state.sessions.metrics
    }

    /// This node's cluster membership, when it runs in a cluster.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_deref()
    }

    /// Stops accepting connections, lets requests in progress finish, then snapshots every live actor (in a
    /// cluster: and commits each snapshot, then leaves the cluster, which frees its sessions for the other
    /// nodes at once). Returns the number of actors snapshotted.
    ///
    /// # Errors
    ///
    /// When the server task failed or a snapshot could not be written (each failure named), or leaving the
    /// cluster failed (its lease then expires by itself).
    pub async fn shutdown(mut self) -> anyhow::Result<usize> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.state.scheduler.close();
        let served = (&mut self.task).await;
        self.reaper.abort();
        if let Some(placer) = &self.placer {
            placer.abort();
        }
        let state = self.state.clone();
        let (saved, failures) = tokio::task::spawn_blocking(move || state.sessions.snapshot_all()).await?;
        if let Some(node) = &self.node {
            node.leave().await.context("leaving the cluster")?;
        }
        served.context("the server task panicked")?.context("the server failed")?;
        if !failures.is_empty() {
            anyhow::bail!("snapshotting at shutdown failed for {}", failures.join("; "));
        }
        Ok(saved)
    }
}

/// Runs a server until SIGTERM or SIGINT, then shuts it down gracefully (every live actor snapshotted).
/// `on_ready` is called with the bound address once the server accepts connections.
///
/// # Errors
///
/// As [`Server::start`] and [`Server::shutdown`].
pub fn run_until_signal(config: ServeConfig, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = Server::start(config).await?;
        on_ready(server.addr());
        wait_for_signal().await?;
        tracing::info!("shutting down; snapshotting live actors");
        let saved = server.shutdown().await?;
        tracing::info!(snapshotted = saved, "live actors snapshotted; stopped");
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
