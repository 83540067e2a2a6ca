//! Builds the guest workspace (`guest/`) for `wasm32-unknown-unknown` and exposes the modules to `lib.rs`.
//!
//! The guests are a separate Cargo workspace (they target wasm32, the host crates do not). They are built
//! with the same toolchain (`rust-toolchain.toml` lists the wasm targets, so rustup installs them on first
//! use) into `target/wasm-guests`, kept apart from the host build so the two never contend for a lock.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";
const ACTORS: &[&str] = &["matmul_check", "chat"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let guest = root.join("guest");
    let target_dir = root.join("target/wasm-guests");
    for watched in ["Cargo.toml", "Cargo.lock", ".cargo", "sdk", "actors"] {
        println!("cargo:rerun-if-changed={}", guest.join(watched).display());
    }
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
    let status = cmd.status().expect("failed to run cargo to build the guest actors");
    if !status.success() {
        panic!(
            "building the guest actors for {TARGET} failed ({status}); if the target is missing, run `rustup target add {TARGET}`"
        );
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for actor in ACTORS {
        let built = target_dir.join(TARGET).join("release").join(format!("{actor}.wasm"));
        let dest = out_dir.join(format!("{actor}.wasm"));
        std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    }
}
