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

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

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
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
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
    let targets = toolchain_targets(&root.join("rust-toolchain.toml"));
    let sysroot = sysroot()?;
    let missing: Vec<&str> = targets.iter().map(String::as_str).filter(|t| !installed(&sysroot, t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let all = targets.join(" ");
    let by_hand = format!("rustup target add {all}");
    let rustup = env::var_os("RUSTUP").unwrap_or_else(|| OsString::from("rustup"));
    let has_rustup = Command::new(&rustup)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_rustup {
        return Err(format!(
            "the Rust toolchain lacks the wasm target(s) {} that the guest actors need, and rustup is not on the PATH to add them: run `{by_hand}`",
            missing.join(", ")
        ));
    }
    let mut cmd = Command::new(&rustup);
    cmd.args(["target", "add"]);
    // Inside a rustup proxy RUSTUP_TOOLCHAIN names the toolchain this build runs on (the pinned one).
    let toolchain = env::var("RUSTUP_TOOLCHAIN").ok().filter(|t| !t.is_empty());
    if let Some(toolchain) = &toolchain {
        cmd.args(["--toolchain", toolchain]);
    }
    cmd.args(&missing);
    println!(
        "cargo:warning=installing the missing wasm target(s) {} for the guest actors: rustup target add {}",
        missing.join(", "),
        missing.join(" ")
    );
    let output = cmd.output().map_err(|e| format!("cannot run rustup ({e}); run `{by_hand}`"))?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let last = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(format!(
            "rustup could not add the wasm target(s) {} ({}: {}); run `{by_hand}` when it can reach its server",
            missing.join(", "),
            output.status,
            last.trim()
        ));
    }
    let sysroot = self::sysroot()?;
    if let Some(still) = missing.iter().find(|t| !installed(&sysroot, t)) {
        return Err(format!(
            "rustup reported success but {still} is still missing from {}; run `{by_hand}`{}",
            sysroot.display(),
            toolchain.map(|t| format!(" --toolchain {t}")).unwrap_or_default()
        ));
    }
    Ok(())
}

/// The `targets = [...]` list of the toolchain file, or the fallback list when it cannot be read.
fn toolchain_targets(file: &Path) -> Vec<String> {
    let parsed = std::fs::read_to_string(file).ok().and_then(|text| {
        let line = text.lines().find(|l| l.trim_start().starts_with("targets"))?;
        let list = line.split_once('=')?.1;
        let names: Vec<String> =
            list.split('"').skip(1).step_by(2).map(str::to_owned).filter(|t| !t.is_empty()).collect();
        (!names.is_empty()).then_some(names)
    });
    parsed.unwrap_or_else(|| FALLBACK_TARGETS.iter().map(|t| (*t).to_owned()).collect())
}

/// The sysroot of the compiler cargo builds with.
fn sysroot() -> Result<PathBuf, String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run {} --print sysroot: {e}", rustc.to_string_lossy()))?;
    if !output.status.success() {
        return Err(format!("{} --print sysroot failed ({})", rustc.to_string_lossy(), output.status));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Whether the sysroot holds the standard library for `target`.
fn installed(sysroot: &Path, target: &str) -> bool {
    let lib = sysroot.join("lib/rustlib").join(target).join("lib");
    std::fs::read_dir(lib)
        .is_ok_and(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
}

fn env_path(var: &str) -> Result<PathBuf, String> {
    env::var_os(var).map(PathBuf::from).ok_or_else(|| format!("cargo did not set {var}"))
}
