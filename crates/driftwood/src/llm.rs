//! `driftwood generate` and `driftwood chat`: text generation inside the default actor.
//!
//! The host loads the model once (mapped read-only) and registers it as `default`; the actor (built from the
//! guest SDK and shipped in this binary) tokenizes, keeps its KV cache and logits in its own memory, samples,
//! and streams text back through `driftwood.emit`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use driftwood_backend::{BackendKind, DType};
use driftwood_engine::Model;
use driftwood_host::{Actor, ActorLimits, LogMode, Runtime, RuntimeConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// The model shipped in the repository, used when `--model` is not given.
pub const BUNDLED_MODEL: &str = "models/driftwood-mini";

/// Options shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// Actor memory placement: host (CPU), or pinned / managed with the CUDA backend (default: host on the
    /// CPU, managed on a GPU).
    #[arg(long, value_parser = driftwood_memory::Placement::parse)]
    placement: Option<driftwood_memory::Placement>,
    /// Tokens the session's KV cache holds (0: the model's context length).
    #[arg(long, default_value_t = 0)]
    max_seq: u32,
    /// KV cache dtype: f32 or bf16 (default: bf16, on either backend).
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<DType>,
    /// Most tokens to generate per request.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the sampler's random stream (same seed, same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating tokens already in the context (1: off).
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl ModelArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            bail!("--temperature must be between 0 and 100, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("--min-p must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            bail!("--repeat-penalty must be a positive number, got {}", self.repeat_penalty);
        }
        Ok(())
    }
}

/// Parses a `--kv-dtype` value: `f32` or `bf16`.
///
/// # Errors
///
/// A message naming the accepted values.
pub fn parse_kv_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown KV dtype `{other}`: use f32 or bf16")),
    }
}

/// Finds the bundled model from the working directory or, failing that, from where this binary was built.
pub fn bundled_model_dir() -> PathBuf {
    let here = Path::new(BUNDLED_MODEL);
    if here.join("config.json").exists() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(BUNDLED_MODEL)
}

/// Loads a model directory, with a progress bar when the weights are large.
pub fn load_model(dir: &Path) -> anyhow::Result<Arc<Model>> {
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(dir.display().to_string());
    let mut shown = false;
    let model = Model::load(dir, &mut |p| {
        if !shown && p.bytes_total > 256 << 20 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(p.bytes_total as u64);
            shown = true;
        }
        bar.set_position(p.bytes_done as u64);
    })
    .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    bar.finish_and_clear();
    Ok(Arc::new(model))
}

/// A runtime with the model registered as `default` and a chat actor ready to serve it.
pub struct ChatSession {
    /// The runtime the actor lives in (its engine, models and epoch ticker).
    _runtime: Runtime,
    /// The default actor.
    pub actor: Actor,
}

impl ChatSession {
    /// Loads the model, creates the actor and applies the sampling options.
    pub fn start(args: &ModelArgs) -> anyhow::Result<ChatSession> {
        args.validate()?;
        let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
        let model = load_model(&dir)?;
        let context = model.config().max_position_embeddings;
        if args.max_seq as usize > context {
            bail!("--max-seq must be at most the model's context of {context} tokens, got {}", args.max_seq);
        }
        let runtime = Runtime::new(RuntimeConfig {
            backend: args.backend,
            placement: args.placement.unwrap_or(RuntimeConfig::default_placement(args.backend)),
            log: LogMode::Stderr,
            limits: ActorLimits { memory_bytes: 4 << 30, deadline: Duration::from_secs(3600), ..Default::default() },
            batch_window: None,
            kv_dtype: args.kv_dtype,
        })?;
        runtime.add_model("default", model)?;
        let mut actor = runtime.instantiate(driftwood_actors::CHAT)?;
        actor.call::<u32, ()>("init", args.max_seq)?;
        actor.call::<(f32, u32, f32, f32, f32, u64), ()>(
            "set_sampling",
            (args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed),
        )?;
        let mut session = ChatSession { _runtime: runtime, actor };
        if !args.stop.is_empty() {
            let (ptr, len) = session.write_input(&args.stop.join("\n"))?;
            session.actor.call::<(u32, u32), ()>("set_stops", (ptr, len))?;
        }
        Ok(session)
    }

    /// Copies `text` into a fresh buffer in the actor's memory.
    pub fn write_input(&mut self, text: &str) -> anyhow::Result<(u32, u32)> {
        let len = u32::try_from(text.len()).context("input is larger than 4 GiB")?;
        let ptr: u32 = self.actor.call("alloc", len)?;
        self.actor.write_text(ptr as usize, text.as_bytes())?;
        Ok((ptr, len))
    }

    /// Runs the actor's `generate` or `chat` export on `text`; returns the call's stats.
    pub fn request(&mut self, export: &str, text: &str, max_tokens: u32) -> anyhow::Result<TurnStats> {
        let (ptr, len) = self.write_input(text)?;
        let result = self.timed(|actor| actor.call(export, (ptr, len, max_tokens)));
        // The protocol: (ptr, len) came from this actor's `alloc` and is freed once.
        self.actor.call::<(u32, u32), ()>("dealloc", (ptr, len))?;
        result
    }

    /// Continues generating after the tokens the actor's session holds.
    pub fn resume(&mut self, max_tokens: u32) -> anyhow::Result<TurnStats> {
        self.timed(|actor| actor.call("resume", max_tokens))
    }

    fn timed(
        &mut self,
        call: impl FnOnce(&mut Actor) -> Result<i32, driftwood_host::ActorError>,
    ) -> anyhow::Result<TurnStats> {
        let before = self.actor.inference_stats();
        let started = Instant::now();
        let generated: i32 = call(&mut self.actor)?;
        let wall = started.elapsed();
        match generated {
            -1 => bail!("the prompt does not fit in the session's KV cache (raise --max-seq)"),
            n if n < 0 => bail!("the actor refused the request (code {n})"),
            _ => {}
        }
        let after = self.actor.inference_stats();
        let stat = |actor: &mut Actor, i: u32| actor.call::<u32, u32>("stat", i);
        Ok(TurnStats {
            prompt_tokens: stat(&mut self.actor, 0)?,
            evaluated_tokens: stat(&mut self.actor, 1)?,
            generated_tokens: stat(&mut self.actor, 2)?,
            stop: ["end of sequence", "stop string", "max tokens", "context full"]
                .get(stat(&mut self.actor, 3)? as usize)
                .copied()
                .unwrap_or("?"),
            prefill_secs: after.prefill_secs - before.prefill_secs,
            decode_secs: after.decode_secs - before.decode_secs,
            decode_steps: after.decode_tokens - before.decode_tokens,
            wall,
        })
    }
}

/// What one request did.
#[derive(Debug, Clone)]
pub struct TurnStats {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens evaluated (the rest were already in the KV cache).
    pub evaluated_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Why generation stopped.
    pub stop: &'static str,
    /// Seconds in multi-token forward calls.
    pub prefill_secs: f64,
    /// Seconds in decode steps.
    pub decode_secs: f64,
    /// Decode steps run.
    pub decode_steps: u64,
    /// Wall time of the whole request.
    pub wall: Duration,
}

impl TurnStats {
    fn summary(&self) -> String {
        let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
        format!(
            "[{} tokens generated ({}), {:.1} tokens/s decode; prompt {} tokens, {} evaluated at {:.0} tokens/s; {:.2} s total]",
            self.generated_tokens,
            self.stop,
            rate(self.decode_steps as f64, self.decode_secs),
            self.prompt_tokens,
            self.evaluated_tokens,
            rate(self.evaluated_tokens as f64, self.prefill_secs),
            self.wall.as_secs_f64()
        )
    }
}

pub(crate) fn stream_to_stdout(actor: &mut Actor) {
    actor.set_emit_sink(|piece| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
        Ok(())
    });
}

/// Arguments of `driftwood generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Text to continue (not needed with --resume or --resume-actor).
    #[arg(long, required_unless_present_any = ["resume", "resume_actor"])]
    prompt: Option<String>,
    /// After generating, save the session (KV cache, tokens, sampler) as a portable safetensors snapshot.
    #[arg(long, value_name = "FILE")]
    save_session: Option<PathBuf>,
    /// Continue the session saved in FILE instead of starting from a prompt.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "resume_actor"])]
    resume: Option<PathBuf>,
    /// After generating, save the whole actor (memory, globals, model handles) for migration.
    #[arg(long, value_name = "FILE")]
    save_actor: Option<PathBuf>,
    /// Continue from a whole-actor snapshot instead of starting from a prompt.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    resume_actor: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let mut session = ChatSession::start(&args.model)?;
    if let Some(path) = &args.resume_actor {
        let actor = session._runtime.restore_actor(path, driftwood_actors::CHAT)?;
        session.actor = actor;
    }
    stream_to_stdout(&mut session.actor);
    let stats = if let Some(path) = &args.resume {
        session.actor.set_session_file(path);
        let restored: i32 = session.actor.call("load_session", ())?;
        if restored < 0 {
            let why = session.actor.take_host_error().unwrap_or_else(|| "unknown error".into());
            bail!("cannot resume: {why}");
        }
        session.resume(args.model.max_tokens)?
    } else if args.resume_actor.is_some() {
        session.resume(args.model.max_tokens)?
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        print!("{prompt}");
        session.request("generate", prompt, args.model.max_tokens)?
    };
    println!();
    eprintln!("{}", stats.summary());
    if let Some(path) = &args.save_session {
        session.actor.set_session_file(path);
        let saved: i32 = session.actor.call("save_session", ())?;
        if saved < 0 {
            let why = session.actor.take_host_error().unwrap_or_else(|| "unknown error".into());
            bail!("cannot save the session: {why}");
        }
        // The file is synced and in place only once the background save settles.
        session.actor.settle_session_saves().context("cannot save the session")?;
        eprintln!("[saved {saved} tokens of session state to {}]", path.display());
    }
    if let Some(path) = &args.save_actor {
        let stats = session.actor.save_snapshot(path, Default::default())?;
        eprintln!(
            "[saved the actor to {} ({} bytes, {} of {} pages non-zero)]",
            path.display(),
            stats.bytes,
            stats.pages_written,
            stats.pages_total
        );
    }
    Ok(())
}

/// Arguments of `driftwood chat`.
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn chat(args: &ChatArgs) -> anyhow::Result<()> {
    let mut session = ChatSession::start(&args.model)?;
    stream_to_stdout(&mut session.actor);
    eprintln!("driftwood chat — one actor holds the whole conversation. Type a message; /exit or end of input quits.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("you> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let message = line.trim();
        if message.is_empty() {
            continue;
        }
        if message == "/exit" {
            break;
        }
        print!("assistant> ");
        let stats = session.request("chat", message, args.model.max_tokens)?;
        println!();
        eprintln!("{}", stats.summary());
    }
    Ok(())
}
