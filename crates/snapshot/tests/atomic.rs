//! `write_atomic`: the target is either the old file or the complete new one.

mod common;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::dir_entries;
use driftwood_snapshot::{SnapshotError, write_atomic};

const CHILD_TARGET: &str = "DRIFTWOOD_SNAPSHOT_TEST_CHILD_TARGET";
const CHILD_MARKER: &str = "DRIFTWOOD_SNAPSHOT_TEST_CHILD_MARKER";

#[test]
fn writes_counts_and_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.bin");
    let n = write_atomic(&path, |w| w.write_all(b"first version")).unwrap();
    assert_eq!(n, 13);
    assert_eq!(fs::read(&path).unwrap(), b"first version");

    let big = vec![7u8; 3 << 20];
    let n = write_atomic(&path, |w| {
        w.write_all(b"hdr")?;
        w.write_all(&big)
    })
    .unwrap();
    assert_eq!(n, 3 + big.len() as u64);
    assert_eq!(fs::metadata(&path).unwrap().len(), n);
    assert_eq!(dir_entries(dir.path()), ["snap.bin"], "no temporary file left behind");
}

#[test]
fn empty_write_creates_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty");
    assert_eq!(write_atomic(&path, |_| Ok(())).unwrap(), 0);
    assert_eq!(fs::read(&path).unwrap(), b"");
}

#[test]
fn writer_error_halfway_keeps_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.bin");
    fs::write(&path, b"the old snapshot").unwrap();
    let err = write_atomic(&path, |w| {
        w.write_all(&[1u8; 100_000])?;
        Err(io::Error::other("disk on fire"))
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SnapshotError::Io { op: "writing", .. }), "{err:?}");
    assert!(msg.contains("disk on fire") && msg.contains("snap.bin"), "{msg}");
    assert_eq!(fs::read(&path).unwrap(), b"the old snapshot");
    assert_eq!(dir_entries(dir.path()), ["snap.bin"]);
}

#[test]
fn writer_error_with_no_old_file_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.bin");
    write_atomic(&path, |w| {
        w.write_all(b"partial")?;
        Err(io::Error::other("nope"))
    })
    .unwrap_err();
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn writer_panic_keeps_old_file_and_removes_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.bin");
    fs::write(&path, b"old").unwrap();
    let result = std::panic::catch_unwind(|| {
        let _ = write_atomic(&path, |w| {
            w.write_all(b"half of it")?;
            panic!("writer panicked");
        });
    });
    assert!(result.is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(dir_entries(dir.path()), ["snap.bin"]);
}

#[test]
fn bad_targets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No file name.
    let err = write_atomic(Path::new("/"), |w| w.write_all(b"x")).unwrap_err();
    assert!(err.to_string().contains("no file name"), "{err}");
    // Missing directory.
    let err = write_atomic(&dir.path().join("missing/snap.bin"), |w| w.write_all(b"x")).unwrap_err();
    assert!(matches!(err, SnapshotError::Io { .. }), "{err:?}");
    // The target is a non-empty directory: the rename fails, the temporary file is removed.
    let target = dir.path().join("a-directory");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("inside"), b"keep").unwrap();
    let err = write_atomic(&target, |w| w.write_all(b"x")).unwrap_err();
    assert!(matches!(err, SnapshotError::Io { op: "renaming temporary file onto", .. }), "{err:?}");
    assert_eq!(dir_entries(dir.path()), ["a-directory"]);
    assert_eq!(fs::read(target.join("inside")).unwrap(), b"keep");
}

/// Run by `killed_mid_write_keeps_old_file` in a child process (a no-op in a normal test run): starts a large,
/// slow atomic write and is killed with SIGKILL in the middle of it.
#[test]
fn child_slow_writer() {
    let (Ok(target), Ok(marker)) = (std::env::var(CHILD_TARGET), std::env::var(CHILD_MARKER)) else {
        return;
    };
    let chunk = vec![0xABu8; 1 << 20];
    let _ = write_atomic(Path::new(&target), |w| {
        for i in 0..60 {
            w.write_all(&chunk)?;
            if i == 1 {
                fs::write(&marker, b"2 MiB written")?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    });
    // Not killed in time: the parent notices the target changed and fails.
}

#[test]
fn killed_mid_write_keeps_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.bin");
    let marker = dir.path().join("marker");
    let old: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
    fs::write(&path, &old).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_slow_writer", "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_TARGET, &path)
        .env(CHILD_MARKER, &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !marker.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "child never started writing");
        assert!(child.try_wait().unwrap().is_none(), "child exited before writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Mid-write: the temporary file holds at least 2 MiB of the 60 MiB.
    let temp: PathBuf = dir
        .path()
        .join(dir_entries(dir.path()).into_iter().find(|n| n.starts_with(".snap.bin.tmp-")).expect("temporary file"));
    assert!(fs::metadata(&temp).unwrap().len() >= 2 << 20);

    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    #[cfg(not(unix))]
    assert!(!status.success());

    assert_eq!(fs::read(&path).unwrap(), old, "the old snapshot is intact");
    // The partial data sits only in the killed writer's temporary file, never at `path`.
    let partial = fs::metadata(&temp).unwrap().len();
    assert!((2 << 20..60 << 20).contains(&partial), "{partial}");
    assert_eq!(dir_entries(dir.path()).len(), 3, "{:?}", dir_entries(dir.path()));
}

#[test]
fn commit_new_never_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("obj.bin");
    let staged = driftwood_snapshot::atomic::stage_atomic(&path, |w| w.write_all(b"first")).unwrap();
    assert_eq!(staged.commit_new().unwrap(), Some(5));
    let staged = driftwood_snapshot::atomic::stage_atomic(&path, |w| w.write_all(b"second")).unwrap();
    assert_eq!(staged.commit_new().unwrap(), None, "an existing name is left alone");
    assert_eq!(fs::read(&path).unwrap(), b"first");
    // Neither commit leaves its temporary name behind.
    assert_eq!(dir_entries(dir.path()), vec!["obj.bin".to_string()]);
}
