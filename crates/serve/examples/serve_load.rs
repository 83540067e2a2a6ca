//! Load test of `driftwood serve` over loopback: N concurrent sessions × T chat turns each, every turn
//! extending its session's conversation. Reports p50/p99 turn latency, aggregate generated tokens/s, errors
//! and lost sessions (a turn that found its history gone) as JSON.
//!
//! ```sh
//! cargo run --release -p driftwood-serve --example serve_load -- --out bench/results/serve-cpu.json
//! cargo run --release -p driftwood-serve --example serve_load -- --hibernate --out bench/results/serve-hibernate-cpu.json
//! serve_load --backend cuda --model DIR --workers 64 --max-tokens 32 --out bench/results/serve-cuda.json
//! ```
//!
//! The server runs in this process on an ephemeral loopback port with a fresh store; with `--hibernate`
//! every actor is released after each turn and restored from its snapshot on the next. Decode steps are
//! batched with the server's default window; `--batch-window-ms 0` runs every turn's steps alone.
//! `decode_tokens_per_s` is the decode steps over the time spent inside decode passes (the server's
//! `driftwood_decode_pass_seconds_total`): the number to set beside `bench gpu`'s batched decode.
//! `decode_tokens_per_s_excluding_waits` leaves out the part of that time the passes waited for the device
//! while an actor's prefill (which runs alone) held it.
//! Defaults: the bundled model, the server's default backend and placement, 512 tokens per session,
//! temperature 0.7 (`--temperature 0`: greedy), the server's actor memory limit (1 GiB; with managed
//! placement, CUDA's default, each actor reserves that much of the GPU, so pass `--memory-mib` sized to a
//! session, e.g. 128 for 2048 tokens of a Llama-3.2-1B-shaped model).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use driftwood_backend::BackendKind;
use driftwood_host::Placement;
use driftwood_serve::{ServeConfig, Server};
use serde_json::{Value, json};

struct Options {
    sessions: usize,
    turns: usize,
    max_tokens: u32,
    workers: usize,
    hibernate: bool,
    /// Milliseconds; `None`: the server's default.
    batch_window_ms: Option<f64>,
    backend: BackendKind,
    /// `None`: the server's default for the backend.
    placement: Option<Placement>,
    /// Each actor's memory limit in MiB; `None`: the server's default.
    memory_mib: Option<u64>,
    model: PathBuf,
    max_seq: u32,
    /// Sampling temperature of every request (0: greedy).
    temperature: f32,
    out: Option<PathBuf>,
}

fn parse() -> anyhow::Result<Options> {
    let mut o = Options {
        sessions: 64,
        turns: 5,
        max_tokens: 16,
        workers: 4,
        hibernate: false,
        batch_window_ms: None,
        backend: BackendKind::Auto,
        placement: None,
        memory_mib: None,
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini"),
        max_seq: 512,
        temperature: 0.7,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sessions" => o.sessions = value()?.parse()?,
            "--turns" => o.turns = value()?.parse()?,
            "--max-tokens" => o.max_tokens = value()?.parse()?,
            "--workers" => o.workers = value()?.parse()?,
            "--hibernate" => o.hibernate = true,
            "--batch-window-ms" => o.batch_window_ms = Some(value()?.parse()?),
            "--backend" => o.backend = BackendKind::parse(&value()?).map_err(anyhow::Error::msg)?,
            "--placement" => o.placement = Some(Placement::parse(&value()?).map_err(anyhow::Error::msg)?),
            "--memory-mib" => o.memory_mib = Some(value()?.parse()?),
            "--model" => o.model = value()?.into(),
            "--max-seq" => o.max_seq = value()?.parse()?,
            "--temperature" => o.temperature = value()?.parse()?,
            "--out" => o.out = Some(value()?.into()),
            other => bail!("unknown option {other}"),
        }
    }
    if !(0.0..=2.0).contains(&o.temperature) {
        bail!("--temperature must be between 0 and 2");
    }
    if o.sessions == 0 || o.turns == 0 || o.max_tokens == 0 || o.workers == 0 || o.max_seq == 0 {
        bail!("--sessions, --turns, --max-tokens, --workers and --max-seq must be positive");
    }
    if o.memory_mib.is_some_and(|m| !(1..=4096).contains(&m)) {
        bail!("--memory-mib must be between 1 and 4096 (a wasm32 memory holds at most 4 GiB)");
    }
    if o.batch_window_ms.is_some_and(|w| !(w.is_finite() && (0.0..=1000.0).contains(&w))) {
        bail!("--batch-window-ms must be between 0 and 1000");
    }
    Ok(o)
}

/// One session's turns; returns (latencies, generated tokens, errors, lost).
async fn session(
    client: reqwest::Client,
    base: String,
    id: usize,
    o: Arc<Options>,
) -> (Vec<f64>, u64, Vec<String>, bool) {
    let key = format!("load-{id}");
    let questions = ["Who was Elizabeth?", "And her sister?", "What did Darcy say?", "Where did they go?", "Go on."];
    let mut messages: Vec<Value> = vec![];
    let (mut latencies, mut tokens, mut errors, mut lost) = (vec![], 0, vec![], false);
    for turn in 0..o.turns {
        messages.push(json!({"role": "user", "content": format!("{} ({id})", questions[turn % questions.len()])}));
        let body = json!({"model": "default", "messages": messages, "max_tokens": o.max_tokens,
                          "temperature": o.temperature, "seed": id});
        let started = Instant::now();
        let sent =
            client.post(format!("{base}/v1/chat/completions")).header("X-Session-Id", &key).json(&body).send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("{key} turn {turn}: {e}"));
                break;
            }
        };
        let status = response.status();
        let value: Value = match response.json().await {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{key} turn {turn}: {e}"));
                break;
            }
        };
        latencies.push(started.elapsed().as_secs_f64());
        if !status.is_success() {
            errors.push(format!("{key} turn {turn}: {status} {value}"));
            break;
        }
        tokens += value["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        // From turn 2 on the session's history must come from its actor (live or restored), not be re-read.
        if turn > 0 && value["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) == 0 {
            lost = true;
        }
        let reply = value["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    (latencies, tokens, errors, lost)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    json!({"cpu": cpu, "threads": threads, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}

fn commit() -> String {
    let git = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    match (git(&["rev-parse", "--short=12", "HEAD"]), git(&["status", "--porcelain", "--untracked-files=no"])) {
        (Some(rev), Some(dirty)) => {
            let sha = String::from_utf8_lossy(&rev.stdout).trim().to_string();
            if dirty.stdout.is_empty() { sha } else { format!("{sha}-dirty") }
        }
        _ => "unknown".into(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Arc::new(parse()?);
    let store = tempfile::tempdir()?;
    let mut config = ServeConfig::new(o.model.clone(), store.path().to_path_buf());
    config.addr = "127.0.0.1:0".parse()?;
    config.backend = o.backend;
    config.placement = o.placement;
    if let Some(mib) = o.memory_mib {
        config.limits.memory_bytes = usize::try_from(mib << 20)?;
    }
    config.workers = o.workers;
    config.queue = o.sessions;
    config.max_seq = o.max_seq;
    if o.hibernate {
        config.hibernate_after = Duration::ZERO;
    }
    if let Some(ms) = o.batch_window_ms {
        config.batch_window = (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let batch_window_ms = config.batch_window.map_or(0.0, |w| w.as_secs_f64() * 1000.0);
    let server = Server::start(config).await?;
    let base = format!("http://{}", server.addr());
    let client = reqwest::Client::builder().pool_max_idle_per_host(o.sessions).build()?;
    let started = Instant::now();
    let tasks: Vec<_> =
        (0..o.sessions).map(|i| tokio::spawn(session(client.clone(), base.clone(), i, o.clone()))).collect();
    let (mut latencies, mut tokens, mut errors, mut lost) = (vec![], 0u64, vec![], 0usize);
    for t in tasks {
        let (l, n, e, gone) = t.await?;
        latencies.extend(l);
        tokens += n;
        errors.extend(e);
        lost += gone as usize;
    }
    let wall = started.elapsed().as_secs_f64();
    let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let metric = |name: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(f64::NAN)
    };
    // Every session must still be known at the end.
    for i in 0..o.sessions {
        let status = client.get(format!("{base}/v1/sessions/load-{i}")).send().await?.status();
        if !status.is_success() {
            lost += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    // Not among the metrics: how much of the passes' time they waited for a prefill to free the device.
    let batch = server.sessions().runtime().batch_stats();
    let (pass_s, wait_s) = (batch.pass_nanos as f64 * 1e-9, batch.wait_nanos as f64 * 1e-9);
    let results = json!({
        // The directory's name: a full path would name this machine's folders.
        "model": o.model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "backend": format!("{:?}", o.backend).to_lowercase(),
        "placement": o.placement.map(|p| p.name()),
        "memory_mib": o.memory_mib,
        "max_seq": o.max_seq,
        "temperature": o.temperature,
        "sessions": o.sessions,
        "turns_per_session": o.turns,
        "max_tokens": o.max_tokens,
        "workers": o.workers,
        "forced_hibernation": o.hibernate,
        "batch_window_ms": batch_window_ms,
        "requests": latencies.len(),
        "errors": errors.len(),
        "error_samples": errors.iter().take(5).collect::<Vec<_>>(),
        "lost_sessions": lost,
        "latency_p50_s": percentile(&latencies, 0.5),
        "latency_p99_s": percentile(&latencies, 0.99),
        "latency_max_s": latencies.last().copied().unwrap_or(f64::NAN),
        "wall_s": wall,
        "generated_tokens": tokens,
        "aggregate_tokens_per_s": tokens as f64 / wall,
        "prefill_tokens": metric("driftwood_prefill_tokens_total"),
        "prefill_tokens_saved": metric("driftwood_prefill_tokens_saved_total"),
        "sessions_restored": metric("driftwood_sessions_restored_total"),
        "restore_mean_s": metric("driftwood_restore_seconds_sum") / metric("driftwood_restore_seconds_count"),
        "decode_passes": metric("driftwood_decode_batch_size_count"),
        "decode_steps": metric("driftwood_decode_batch_size_sum"),
        "decode_batch_mean": metric("driftwood_decode_batch_size_sum") / metric("driftwood_decode_batch_size_count"),
        "batched_decode_passes": metric("driftwood_batched_decode_passes_total"),
        "decode_pass_seconds": metric("driftwood_decode_pass_seconds_total"),
        "decode_tokens_per_s":
            metric("driftwood_decode_batch_size_sum") / metric("driftwood_decode_pass_seconds_total"),
        "decode_pass_wait_seconds": wait_s,
        "decode_tokens_per_s_excluding_waits": batch.sequences as f64 / (pass_s - wait_s),
    });
    server.shutdown().await?;
    let command = format!(
        "cargo run --release -p driftwood-serve --example serve_load -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let unix_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let report = json!({"bench": "serve", "machine": machine(), "commit": commit(), "command": command,
                        "unix_time": unix_time, "results": results});
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &o.out {
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !errors.is_empty() || lost > 0 {
        bail!("{} errors, {lost} lost sessions", errors.len());
    }
    Ok(())
}
