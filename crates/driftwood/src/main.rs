//! `driftwood`: the command-line front end.
//!
//! * `driftwood generate --prompt …` / `driftwood chat` — a language model inside an actor.
//! * `driftwood new NAME` / `driftwood build DIR` / `driftwood run ACTOR.wasm` — users' own actors.
//! * `driftwood verify [--json]` — proves the zero-copy chain (region → guest → backend) by measurement.
//! * `driftwood bench abi|matmul|readme` — benchmarks written as JSON under `bench/results/`, and the README
//!   tables regenerated from them.

mod bench;
mod inspect;
mod llm;
mod own;
mod serve;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Stateful WebAssembly actors whose linear memory the compute backend reads and writes in place.
#[derive(Parser, Debug)]
#[command(name = "driftwood", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prove the zero-copy chain: page alignment, pointer identity, RSS of sharing vs copying, matmul
    /// errors, compute time and copy-ledger bytes.
    Verify(verify::VerifyArgs),
    /// Continue a prompt with a language model inside an actor, streaming the text.
    Generate(llm::GenerateArgs),
    /// Chat with a language model; the whole conversation lives in one actor.
    Chat(llm::ChatArgs),
    /// Inspect session and actor snapshots.
    #[command(subcommand)]
    Snapshot(inspect::SnapshotCommand),
    /// Serve the OpenAI API over HTTP; every conversation is a persistent actor.
    Serve(serve::ServeArgs),
    /// Write a new actor crate on the guest SDK (then `driftwood build` and `driftwood run` it).
    New(own::NewArgs),
    /// Build an actor crate for wasm32 (adding the target if the toolchain lacks it); prints the module's path.
    Build(own::BuildArgs),
    /// Run an actor module once over an input, its output streamed; save and resume the whole actor.
    Run(own::RunArgs),
    /// Run a benchmark and write its JSON under bench/results/.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(args) => verify::run(&args),
        Command::Generate(args) => llm::generate(&args).map(|()| true),
        Command::Chat(args) => llm::chat(&args).map(|()| true),
        Command::Bench(cmd) => bench::run(cmd).map(|()| true),
        Command::Snapshot(cmd) => inspect::run(cmd).map(|()| true),
        Command::Serve(args) => serve::run(args).map(|()| true),
        Command::New(args) => own::new(&args).map(|()| true),
        Command::Build(args) => own::build(&args).map(|()| true),
        Command::Run(args) => own::run(&args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
