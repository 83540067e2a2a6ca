//! `driftwood serve`: flags only; the server is the `driftwood-serve` crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use driftwood_backend::BackendKind;
use driftwood_host::ActorLimits;
use driftwood_serve::ServeConfig;

/// Arguments of `driftwood serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Hugging Face model directory. Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model id clients send as `model` (default: the model directory's name).
    #[arg(long)]
    model_id: Option<String>,
    /// The actor module each session runs (default: the bundled chat actor). It must export the serving
    /// protocol of the chat actor (`init`, `set_sampling`, `set_stop_list`, `chat_messages`, `generate`, `stat`,
    /// `alloc`, `dealloc`). A module exporting `serve_protocol` returning 2 and `set_logprobs` also reports
    /// log-probabilities (requests with `logprobs`); one without speaks protocol 1, and such requests get a
    /// 400. A later protocol version is refused at start.
    #[arg(long, value_name = "FILE")]
    actor: Option<PathBuf>,
    /// Where session snapshots live: a folder (sessions found in it are served again), `file:///PATH`,
    /// `s3://BUCKET[/PREFIX]` (endpoint and credentials from the `AWS_*` environment variables:
    /// `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP=true` for a
    /// plain-HTTP endpoint), or `memory://` (gone when the server stops).
    #[arg(long, value_name = "DIR|URL", default_value = "driftwood-store")]
    store: PathBuf,
    /// Run as a node of a cluster: etcd's client endpoints, comma-separated (`http://HOST:PORT,…`). The
    /// nodes share `--store` (S3 or a shared folder); a session runs on one node at a time.
    #[arg(long, value_name = "ENDPOINTS")]
    cluster: Option<String>,
    /// This node's id in the cluster (default: made from the advertised address).
    #[arg(long, requires = "cluster")]
    node_id: Option<String>,
    /// The address other nodes and clients reach this node at (default: http:// and the listen address).
    #[arg(long, value_name = "URL", requires = "cluster")]
    advertise: Option<String>,
    /// The bearer token of this node's admin endpoints (`POST /v1/admin/drain` moves its sessions to other
    /// nodes, `DELETE` ends the drain); without one they are off.
    #[arg(long, env = "DRIFTWOOD_ADMIN_TOKEN", hide_env_values = true, requires = "cluster")]
    admin_token: Option<String>,
    /// Seconds after a node stops (killed, stopped, cut off) until its sessions can move to other nodes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_ttl_secs: u64,
    /// Backend: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// Actor memory placement with the CUDA backend: managed (the default; device memory: each actor reserves
    /// its whole --memory-mib on the GPU when it is created, so size that to a session: its KV cache plus a few
    /// tens of MiB) or pinned (host memory the GPU reads across the bus, every step).
    #[arg(long, value_parser = driftwood_memory::Placement::parse)]
    placement: Option<driftwood_memory::Placement>,
    /// Tokens each session holds (0: the model's context length).
    #[arg(long, default_value_t = 0)]
    max_seq: u32,
    /// `max_tokens` of requests that give none.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    default_max_tokens: u32,
    /// Memory cap of each actor, in MiB (a wasm32 memory holds at most 4 GiB).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=4096))]
    memory_mib: u64,
    /// Host allowance of each actor, in MiB: the most the server keeps on an actor's behalf outside its memory
    /// (a turn's text, streamed text the client has not yet read, captured logs, model handles).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    host_allowance_mib: u64,
    /// Longest a turn may run in its actor, in seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    deadline_secs: u64,
    /// Turns running at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: u64,
    /// Requests that may wait for a worker; more are refused with 429.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    queue: u64,
    /// Release an idle actor's memory after this many seconds (its snapshot stays in the store); 0 releases
    /// it after every turn.
    #[arg(long, default_value_t = 300.0)]
    hibernate_after_secs: f64,
    /// Most actors live in memory; past it the least recently used idle ones hibernate.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_live: u64,
    /// Continuous batching: decode steps of turns running at the same time run as one forward pass, and a
    /// step waits at most this many milliseconds for the others. 0 turns batching off. Default: 2 on a GPU,
    /// off on the CPU (where it measured slower: see the README).
    #[arg(long)]
    batch_window_ms: Option<f64>,
}

/// Longest `--hibernate-after-secs` accepted: 30 days.
const MAX_HIBERNATE_AFTER_SECS: f64 = 30.0 * 24.0 * 3600.0;

/// `value` seconds as a duration, when it is a number from 0 to `max` seconds.
fn secs(flag: &str, value: f64, max: f64) -> anyhow::Result<Duration> {
    if !(value.is_finite() && (0.0..=max).contains(&value)) {
        anyhow::bail!("{flag} must be a number of seconds from 0 to {max}, got {value}");
    }
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value} is not a duration"))
}

/// Runs the server until SIGTERM or Ctrl-C.
///
/// # Errors
///
/// A flag out of its range (named in the message), a `RUST_LOG` that is not a log filter, or any error of
/// [`driftwood_serve::run_until_signal`].
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    driftwood_serve::logging::init()?;
    let hibernate_after = secs("--hibernate-after-secs", args.hibernate_after_secs, MAX_HIBERNATE_AFTER_SECS)?;
    let gpu = args.backend != driftwood_backend::BackendKind::Cpu && driftwood_backend::cuda::is_available();
    let batch_window_ms = args.batch_window_ms.unwrap_or(if gpu { 2.0 } else { 0.0 });
    if !(batch_window_ms.is_finite() && (0.0..=1000.0).contains(&batch_window_ms)) {
        anyhow::bail!("--batch-window-ms must be between 0 and 1000, got {batch_window_ms}");
    }
    let batch_window = secs("--batch-window-ms", batch_window_ms / 1000.0, 1.0)?;
    let model_dir = args.model.clone().unwrap_or_else(crate::llm::bundled_model_dir);
    let mut config = ServeConfig::new(model_dir, args.store.clone());
    config.addr = args.addr;
    config.model_id = args.model_id.clone();
    config.backend = args.backend;
    config.placement = args.placement;
    config.max_seq = args.max_seq;
    config.default_max_tokens = args.default_max_tokens;
    config.limits = ActorLimits {
        memory_bytes: usize::try_from(args.memory_mib << 20).context("--memory-mib is too large")?,
        deadline: Duration::from_secs(args.deadline_secs),
        host_bytes: usize::try_from(args.host_allowance_mib << 20).context("--host-allowance-mib is too large")?,
        ..Default::default()
    };
    config.workers = usize::try_from(args.workers).context("--workers is too large")?;
    config.queue = usize::try_from(args.queue).context("--queue is too large")?;
    config.hibernate_after = hibernate_after;
    config.max_live = usize::try_from(args.max_live).context("--max-live is too large")?;
    config.batch_window = (!batch_window.is_zero()).then_some(batch_window);
    if let Some(etcd) = &args.cluster {
        let mut cluster = driftwood_serve::ClusterConfig::new(etcd.clone());
        cluster.node_id = args.node_id.clone();
        cluster.advertise = args.advertise.clone();
        cluster.lease_ttl = Duration::from_secs(args.lease_ttl_secs);
        cluster.admin_token = args.admin_token.clone();
        config.cluster = Some(cluster);
    }
    config.validate()?;
    if let Some(path) = &args.actor {
        config.actor_wasm =
            Some(std::fs::read(path).with_context(|| format!("cannot read the actor module {}", path.display()))?);
    }
    let store = args.store.display().to_string();
    driftwood_serve::run_until_signal(config, |addr| {
        tracing::info!(store = %store, "listening on http://{addr} (SIGTERM or Ctrl-C to stop)");
    })
}
