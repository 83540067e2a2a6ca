//! Atomic file replacement: a snapshot file is either the old one or the complete new one, never a mix.
//!
//! [`write_atomic`] writes into a temporary file in the target's directory, named
//! `.{file name}.tmp-{process id}-{counter}` and created exclusively (`O_CREAT|O_EXCL`), then:
//!
//! 1. `fsync`s the temporary file (data and metadata),
//! 2. renames it over the target (atomic within one file system on POSIX),
//! 3. `fsync`s the directory, so that the rename itself survives a power loss.
//!
//! If the writer fails, returns early or panics, the temporary file is removed and an existing target is left
//! untouched. If the process is killed (`SIGKILL`, power loss) before step 2, the target is also untouched, but
//! the temporary file may remain: it is never read by this crate, and any file whose name starts with `.` and
//! contains `.tmp-` next to a snapshot can be deleted once no writer is running.
//!
//! Replacing the target replaces the directory entry: a symbolic link at `path` is replaced by the new file, not
//! followed, and readers that already opened (or memory-mapped) the old file keep seeing the old contents.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::SnapshotError;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file on drop unless disarmed (covers errors, early returns and panics).
#[derive(Debug)]
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Counts the bytes that reach the file.
struct Counting<'a> {
    inner: &'a mut File,
    written: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Atomically replaces (or creates) the file at `path` with what `write` writes.
///
/// `write` receives an unbuffered writer on a fresh temporary file in the same directory as `path`; large
/// slices can be passed to it directly. When it returns `Ok`, the temporary file is `fsync`ed, renamed over
/// `path`, and the directory is `fsync`ed. Returns the number of bytes written. This is
/// [`stage_atomic`] followed at once by [`Staged::commit`].
///
/// # Errors
///
/// [`SnapshotError::Io`] naming the step and the file when `path` has no file name, the temporary file cannot be
/// created, `write` fails (its error is passed through as the source), or syncing or renaming fails. In every
/// case but the last step (syncing the directory after the rename succeeded) the temporary file is removed and
/// an existing file at `path` is unchanged; if only the directory sync fails, the new file is in place but its
/// durability across a power loss is not guaranteed.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<u64, SnapshotError> {
    stage_atomic(path, write)?.commit()
}

/// A complete temporary file, written but not yet synced or renamed into place: the first half of
/// [`write_atomic`].
///
/// Staging costs what writing into the page cache costs; [`Staged::commit`] pays for durability (two `fsync`s,
/// milliseconds on most disks) and can run on another thread, so the writer's caller need not wait for the disk.
/// Until `commit` returns, the file at the target path is still the old one (or absent). Dropping a `Staged`
/// without committing removes the temporary file.
#[derive(Debug)]
pub struct Staged {
    file: File,
    guard: TempGuard,
    target: PathBuf,
    written: u64,
}

impl Staged {
    /// The path the file will replace on [`Staged::commit`].
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Bytes written into the temporary file.
    pub fn bytes(&self) -> u64 {
        self.written
    }

    /// `fsync`s the temporary file, renames it over the target and `fsync`s the directory. Returns the number of
    /// bytes written.
    ///
    /// # Errors
    ///
    /// As for [`write_atomic`]'s syncing and renaming steps: on any failure before the rename the temporary file
    /// is removed and the target is unchanged.
    pub fn commit(self) -> Result<u64, SnapshotError> {
        let Staged { file, mut guard, target, written } = self;
        file.sync_all().map_err(|e| SnapshotError::io("syncing", &guard.path, e))?;
        drop(file);
        fs::rename(&guard.path, &target).map_err(|e| SnapshotError::io("renaming temporary file onto", &target, e))?;
        guard.armed = false;
        let dir = parent_dir(&target);
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| SnapshotError::io("syncing directory", dir, e))?;
        Ok(written)
    }
}

impl Staged {
    /// [`commit`](Self::commit) that never replaces: `fsync`s the temporary file, hard-links it to the target
    /// (atomic, and only if the name is free), removes the temporary name and `fsync`s the directory. Returns the
    /// number of bytes written, or `None` when the target already exists (nothing is changed then).
    ///
    /// # Errors
    ///
    /// As for [`commit`](Self::commit), with linking in place of renaming; on any failure the temporary file is
    /// removed and the target is unchanged (or, if only the directory sync failed, in place but not known durable).
    pub fn commit_new(self) -> Result<Option<u64>, SnapshotError> {
        let Staged { file, guard, target, written } = self;
        file.sync_all().map_err(|e| SnapshotError::io("syncing", &guard.path, e))?;
        drop(file);
        match fs::hard_link(&guard.path, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(SnapshotError::io("linking temporary file to", &target, e)),
        }
        drop(guard); // the temporary name goes; the target keeps the data
        let dir = parent_dir(&target);
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| SnapshotError::io("syncing directory", dir, e))?;
        Ok(Some(written))
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes what `write` writes into a fresh temporary file next to `path` and returns it unsynced and not yet in
/// place; [`Staged::commit`] finishes the replacement. See [`write_atomic`] for the writer's contract.
///
/// # Errors
///
/// [`SnapshotError::Io`] when `path` has no file name, the temporary file cannot be created, or `write` fails; the
/// temporary file is then removed and the target is unchanged.
pub fn stage_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Staged, SnapshotError> {
    let Some(name) = path.file_name() else {
        return Err(SnapshotError::io(
            "writing",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        ));
    };
    let (mut file, guard) = create_temp(parent_dir(path), name, path)?;
    let mut counting = Counting { inner: &mut file, written: 0 };
    write(&mut counting).and_then(|()| counting.flush()).map_err(|e| SnapshotError::io("writing", path, e))?;
    let written = counting.written;
    Ok(Staged { file, guard, target: path.to_path_buf(), written })
}

fn create_temp(dir: &Path, name: &std::ffi::OsStr, target: &Path) -> Result<(File, TempGuard), SnapshotError> {
    let pid = std::process::id();
    let mut attempts = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".tmp-{pid}-{n}"));
        let temp = dir.join(temp_name);
        match OpenOptions::new().write(true).create_new(true).open(&temp) {
            Ok(file) => return Ok((file, TempGuard { path: temp, armed: true })),
            // A stale file left by a killed process that had our pid: try the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 64 => attempts += 1,
            Err(e) => return Err(SnapshotError::io("creating a temporary file for", target, e)),
        }
    }
}
