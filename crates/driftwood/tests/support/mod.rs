//! Helpers for tests that measure a driftwood process's peak resident memory (here) and that run its server
//! ([`serve`]).
#![allow(dead_code)]

pub mod serve;

use std::path::Path;
use std::process::Command;

/// This process's peak resident set (VmHWM), in bytes.
pub fn own_peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// Exit code, stdout, stderr and peak resident memory (bytes) of a driftwood process.
///
/// Linux counts in a child's `ru_maxrss` the peak of the process it was spawned from (exec records the old
/// address space's high-water mark), so the figure is `max(this process's peak, the child's peak)`: an upper
/// bound on the child's peak. Tests that compare it with a small bound run in their own test binary, where
/// this process stays small.
#[allow(clippy::zombie_processes, reason = "the child is reaped by wait4, which also reports its peak RSS")]
pub fn measured(args: &[&str]) -> (Option<i32>, String, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let child = Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("the driftwood binary runs");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (std waits only when asked to); the pointers are valid.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let text = |p: &Path| std::fs::read_to_string(p).unwrap();
    // ru_maxrss is in KiB on Linux.
    (code, text(&out), text(&err), usage.ru_maxrss as u64 * 1024)
}

pub const MIB: u64 = 1 << 20;

pub fn sparse(dir: &Path, name: &str, len: u64, head: &[u8]) -> String {
    use std::io::Write;
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(head).unwrap();
    f.set_len(len).unwrap(); // nothing beyond `head` is stored
    p.to_string_lossy().into_owned()
}
