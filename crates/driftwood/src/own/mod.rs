//! Users' own actors: `driftwood new` writes an actor crate on the guest SDK, `driftwood build` compiles it
//! for wasm32, `driftwood run` runs it.
//!
//! The protocol `run` speaks with a module: it exports `alloc(len: u32) -> u32` (a buffer in its memory for the
//! input) and `run(ptr: u32, len: u32) -> i32` (one run over the input; 0 on success, negative on failure);
//! what it emits through `driftwood.emit` is the output, printed as it comes. Its `default` model is the one
//! `--model` names.

mod template;

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use driftwood_actors::toolchain::{HOST_BUILD_VARS, Toolchain};
use driftwood_backend::BackendKind;
use driftwood_host::{Actor, ActorLimits, LogMode, Runtime, RuntimeConfig};

/// The target actors are built for.
const TARGET: &str = "wasm32-unknown-unknown";

/// Arguments of `driftwood new`.
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// Name of the actor crate (letters, digits, `-` and `_`, starting with a letter); also its folder.
    name: String,
    /// Folder to create the crate in (default: the current folder).
    #[arg(long, default_value = ".")]
    path: PathBuf,
}

/// Arguments of `driftwood build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The actor crate's folder.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

/// Arguments of `driftwood run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The actor module (`.wasm`), e.g. from `driftwood build`.
    actor: PathBuf,
    /// The input text (`-`: read it from standard input).
    #[arg(long, default_value = "")]
    input: String,
    /// Hugging Face model directory the actor opens as `default` (default: the bundled model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// After the run, save the whole actor (memory, globals, model handles) to FILE.
    #[arg(long, value_name = "FILE")]
    save_actor: Option<PathBuf>,
    /// Start from the actor saved in FILE (by `--save-actor`, of the same module) instead of a fresh one.
    #[arg(long, value_name = "FILE")]
    resume_actor: Option<PathBuf>,
    /// Memory cap of the actor, in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=4096))]
    memory_mib: u64,
    /// Longest the run may take, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    deadline_s: u64,
}

/// Whether `name` can name a crate (and a folder).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64
}

/// `driftwood new`: writes the crate; refuses a folder that exists.
pub fn new(args: &NewArgs) -> anyhow::Result<()> {
    if !valid_name(&args.name) {
        bail!(
            "`{}` cannot name an actor crate: use letters, digits, `-` and `_`, starting with a letter (at most 64)",
            args.name
        );
    }
    let dir = args.path.join(&args.name);
    if dir.exists() {
        bail!("{} already exists; choose another name or folder", dir.display());
    }
    for file in template::files(&args.name) {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, file.contents).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let wasm = format!("target/{TARGET}/release/{}.wasm", args.name.replace('-', "_"));
    println!("created the actor crate {}", dir.display());
    println!("next:  driftwood build {}", dir.display());
    println!("       driftwood run {} --input \"Once upon a time\"", dir.join(wasm).display());
    Ok(())
}

/// `driftwood build`: adds the wasm target if the toolchain lacks it, builds the crate in release mode and
/// prints the module's path.
pub fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let manifest = args.dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("{} is not an actor crate (cannot read its Cargo.toml)", args.dir.display()))?;
    let name = package_name(&text).with_context(|| format!("{} names no [package]", manifest.display()))?;
    // The crate's own toolchain file picks the compiler; a rustup proxy's choice (RUSTUP_TOOLCHAIN) would
    // override it, so it is not passed on.
    let toolchain = Toolchain { toolchain: None, ..Toolchain::from_env(&args.dir) };
    let mut notice = |line: &str| eprintln!("driftwood build: {line}");
    toolchain.ensure_targets(&[TARGET.to_owned()], "the actor", &mut notice).map_err(anyhow::Error::msg)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&args.dir).args(["build", "--release", "--target", TARGET]);
    for var in HOST_BUILD_VARS.iter().chain(&["RUSTUP_TOOLCHAIN", "RUSTC"]) {
        cmd.env_remove(var);
    }
    let status = cmd.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("building {} failed ({status}); the compiler's messages are above", args.dir.display());
    }
    let wasm = args.dir.join("target").join(TARGET).join("release").join(format!("{}.wasm", name.replace('-', "_")));
    if !wasm.is_file() {
        bail!("cargo built no {} (is the crate a `cdylib`?)", wasm.display());
    }
    println!("{}", wasm.display());
    Ok(())
}

/// The `name` of the `[package]` table of a Cargo.toml.
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package && let Some(value) = line.strip_prefix("name").map(str::trim_start) {
            return value.strip_prefix('=')?.trim().trim_matches('"').to_owned().into();
        }
    }
    None
}

/// `driftwood run`: one run of the actor over the input, its output streamed to standard output.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.actor).with_context(|| format!("cannot read the actor {}", args.actor.display()))?;
    let input = if args.input == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read the input from standard input")?;
        text
    } else {
        args.input.clone()
    };
    let dir = args.model.clone().unwrap_or_else(crate::llm::bundled_model_dir);
    let model = crate::llm::load_model(&dir)?;
    let runtime = Runtime::new(RuntimeConfig {
        backend: args.backend,
        placement: RuntimeConfig::default_placement(args.backend),
        log: LogMode::Stderr,
        limits: ActorLimits {
            memory_bytes: usize::try_from(args.memory_mib << 20)?,
            deadline: Duration::from_secs(args.deadline_s),
            ..Default::default()
        },
        batch_window: None,
        kv_dtype: None,
    })?;
    runtime.add_model("default", model)?;
    let mut actor = match &args.resume_actor {
        Some(path) => runtime.restore_actor(path, &wasm)?,
        None => runtime.instantiate(&wasm).with_context(|| format!("cannot start {}", args.actor.display()))?,
    };
    crate::llm::stream_to_stdout(&mut actor);
    let status = run_once(&mut actor, &input).with_context(|| format!("{} failed", args.actor.display()))?;
    if status < 0 {
        let why = actor.take_host_error().map(|e| format!(": {e}")).unwrap_or_default();
        bail!("{}'s run returned {status}{why}", args.actor.display());
    }
    if let Some(path) = &args.save_actor {
        let stats = actor.save_snapshot(path, Default::default())?;
        eprintln!("[saved the actor to {} ({} bytes)]", path.display(), stats.bytes);
    }
    Ok(())
}

/// Writes `input` into the actor (its `alloc`) and calls its `run`.
fn run_once(actor: &mut Actor, input: &str) -> anyhow::Result<i32> {
    let len = u32::try_from(input.len()).context("the input is over 4 GiB")?;
    let protocol = "an actor for `driftwood run` exports `alloc(len: u32) -> u32` and `run(ptr: u32, len: u32) -> i32`";
    let ptr: u32 = actor.call("alloc", len).with_context(|| format!("calling `alloc` ({protocol})"))?;
    actor.write_text(ptr as usize, input.as_bytes())?;
    actor.call::<(u32, u32), i32>("run", (ptr, len)).with_context(|| format!("calling `run` ({protocol})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_crate_rules() {
        for ok in ["demo", "my-agent", "a_1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "1demo", "-x", "a b", "../x", "dé", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_package_name_is_read_from_its_table() {
        let toml = "[lib]\nname = \"x\"\n[package]\nversion = \"1\"\nname = \"my-agent\"\n[dependencies]\nname = 3\n";
        assert_eq!(package_name(toml).as_deref(), Some("my-agent"));
        assert_eq!(package_name("[lib]\nname = \"x\"\n"), None);
    }
}
