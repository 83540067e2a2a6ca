//! The wasm targets a guest build needs, installed with rustup when the toolchain lacks them; and the
//! variables of a host build that must not reach a guest build. Shared by this crate's build script (which
//! includes this file) and `driftwood build`, so it depends on nothing but the standard library.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Variables of the outer (host) build that would change a guest build: flags, wrappers, target and target
/// folder belong to the host, not to wasm32 guests.
pub const HOST_BUILD_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    "CARGO_PROFILE_RELEASE_DEBUG",
];

/// The toolchain a guest is built with.
#[derive(Clone, Debug)]
pub struct Toolchain {
    /// The compiler (`RUSTC`, or `rustc` on the PATH).
    pub rustc: OsString,
    /// rustup (`RUSTUP`, or `rustup` on the PATH).
    pub rustup: OsString,
    /// The toolchain to add targets to (`RUSTUP_TOOLCHAIN` inside a rustup proxy); `None`: the one active in
    /// `dir`.
    pub toolchain: Option<String>,
    /// Where the compiler and rustup run (a `rust-toolchain.toml` there picks the toolchain).
    pub dir: PathBuf,
}

impl Toolchain {
    /// The toolchain the environment names, run in `dir`.
    pub fn from_env(dir: &Path) -> Self {
        Toolchain {
            rustc: std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc")),
            rustup: std::env::var_os("RUSTUP").unwrap_or_else(|| OsString::from("rustup")),
            toolchain: std::env::var("RUSTUP_TOOLCHAIN").ok().filter(|t| !t.is_empty()),
            dir: dir.to_path_buf(),
        }
    }

    /// Makes sure every one of `targets` is installed, adding the missing ones with rustup when it can;
    /// `notice` hears a line before rustup runs. `what` names the build, for messages.
    ///
    /// # Errors
    ///
    /// One line saying what is missing and the command to run by hand: no rustup, rustup failed, or the
    /// target is still missing afterwards.
    pub fn ensure_targets(&self, targets: &[String], what: &str, notice: &mut dyn FnMut(&str)) -> Result<(), String> {
        let sysroot = self.sysroot()?;
        let missing: Vec<&str> = targets.iter().map(String::as_str).filter(|t| !installed(&sysroot, t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let by_hand = format!("rustup target add {}", targets.join(" "));
        let has_rustup = Command::new(&self.rustup)
            .arg("--version")
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_rustup {
            return Err(format!(
                "the Rust toolchain lacks the wasm target(s) {} that {what} needs, and rustup is not on the PATH to add them: run `{by_hand}`",
                missing.join(", ")
            ));
        }
        let mut cmd = Command::new(&self.rustup);
        cmd.current_dir(&self.dir).args(["target", "add"]);
        if let Some(toolchain) = &self.toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
        cmd.args(&missing);
        notice(&format!(
            "installing the missing wasm target(s) {} for {what}: rustup target add {}",
            missing.join(", "),
            missing.join(" ")
        ));
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
        let sysroot = self.sysroot()?;
        if let Some(still) = missing.iter().find(|t| !installed(&sysroot, t)) {
            return Err(format!(
                "rustup reported success but {still} is still missing from {}; run `{by_hand}`{}",
                sysroot.display(),
                self.toolchain.as_ref().map(|t| format!(" --toolchain {t}")).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// The compiler's sysroot.
    fn sysroot(&self) -> Result<PathBuf, String> {
        let rustc = self.rustc.to_string_lossy();
        let output = Command::new(&self.rustc)
            .args(["--print", "sysroot"])
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("cannot run {rustc} --print sysroot: {e}"))?;
        if !output.status.success() {
            return Err(format!("{rustc} --print sysroot failed ({})", output.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    }
}

/// The `targets = [...]` list of a toolchain file, or `fallback` when it cannot be read.
pub fn toolchain_targets(file: &Path, fallback: &[&str]) -> Vec<String> {
    let parsed = std::fs::read_to_string(file).ok().and_then(|text| {
        let line = text.lines().find(|l| l.trim_start().starts_with("targets"))?;
        let list = line.split_once('=')?.1;
        let names: Vec<String> =
            list.split('"').skip(1).step_by(2).map(str::to_owned).filter(|t| !t.is_empty()).collect();
        (!names.is_empty()).then_some(names)
    });
    parsed.unwrap_or_else(|| fallback.iter().map(|t| (*t).to_owned()).collect())
}

/// Whether the sysroot holds the standard library for `target`.
fn installed(sysroot: &Path, target: &str) -> bool {
    let lib = sysroot.join("lib/rustlib").join(target).join("lib");
    std::fs::read_dir(lib)
        .is_ok_and(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
}
