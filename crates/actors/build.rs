//! Builds the guest workspace (`guest/`) for `wasm32-unknown-unknown` and exposes the modules to `lib.rs`.
//!
//! The guests are a separate Cargo workspace (they target wasm32, the host crates do not). They are built
//! with the same toolchain into `target/wasm-guests`, kept apart from the host build so the two never contend
//! for a lock.
//!
//! The wasm targets come with the build: `rust-toolchain.toml` lists them, but rustup only installs a
//! toolchain file's targets when it auto-installs (not with `RUSTUP_AUTO_INSTALL=0`, nor on older rustups),
//! so this script checks the active toolchain's sysroot and, when a target is missing, runs `rustup target
//! add` itself. Without rustup it stops with one line naming the command to run. Failures here are reported
//! as one `error:` line and exit status 1, never a panic with a backtrace.

#[path = "src/toolchain.rs"]
mod toolchain;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The target the guests are compiled for.
const TARGET: &str = "wasm32-unknown-unknown";
/// The targets `rust-toolchain.toml` lists when it cannot be read (it is the source of truth).
const FALLBACK_TARGETS: &[&str] = &["wasm32-unknown-unknown", "wasm32-wasip1"];
/// The guest modules `lib.rs` embeds.
const ACTORS: &[&str] = &["matmul_check", "chat"];

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints a build script's stderr under its own "failed to run custom build command" line.
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = env_path("CARGO_MANIFEST_DIR")?;
    let root = manifest_dir.join("../..");
    let guest = root.join("guest");
    let target_dir = root.join("target/wasm-guests");
    for watched in ["Cargo.toml", "Cargo.lock", ".cargo", "sdk", "actors"] {
        println!("cargo:rerun-if-changed={}", guest.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("rust-toolchain.toml").display());
    // The ABI crate is shared with the host and is a path dependency of the guest SDK.
    println!("cargo:rerun-if-changed={}", root.join("crates/abi").display());

    ensure_targets(&root)?;

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--locked", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags, wrappers and target belong to the host build, not to wasm32 guests.
    for var in toolchain::HOST_BUILD_VARS {
        cmd.env_remove(var);
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo to build the guest actors: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the guest actors (guest/) for {TARGET} failed ({status}); the compiler's messages are above"
        ));
    }
    let out_dir = env_path("OUT_DIR")?;
    for actor in ACTORS {
        let built = target_dir.join(TARGET).join("release").join(format!("{actor}.wasm"));
        let dest = out_dir.join(format!("{actor}.wasm"));
        std::fs::copy(&built, &dest).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    }
    Ok(())
}

/// Makes sure every target of `rust-toolchain.toml` is installed for the toolchain this build runs on,
/// installing the missing ones with rustup when it can.
fn ensure_targets(root: &Path) -> Result<(), String> {
    let targets = toolchain::toolchain_targets(&root.join("rust-toolchain.toml"), FALLBACK_TARGETS);
    // Inside a rustup proxy RUSTUP_TOOLCHAIN names the toolchain this build runs on (the pinned one).
    let toolchain = toolchain::Toolchain::from_env(root);
    toolchain.ensure_targets(&targets, "the guest actors", &mut |line| println!("cargo:warning={line}"))
}

fn env_path(var: &str) -> Result<PathBuf, String> {
    env::var_os(var).map(PathBuf::from).ok_or_else(|| format!("cargo did not set {var}"))
}
