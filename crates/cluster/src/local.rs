//! The local-folder backend of [`SnapshotStore`](crate::SnapshotStore): `{root}/{session}/{fence}-{seq}.actor`.
//!
//! Not `object_store`'s `LocalFileSystem`, because that one does not `fsync`: a turn acknowledged after its
//! snapshot was "written" could be lost with the page cache on a power cut. Here every object is written into
//! a temporary file in its session's folder, `fsync`ed, hard-linked to its name (which fails if the name
//! exists: no object is ever replaced) and the folder `fsync`ed (`driftwood_snapshot::atomic`'s
//! `Staged::commit_new`), so an object that has a name is complete and
//! durable. Snapshots are streamed from the actor's memory straight into the file, never buffered whole.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::name::{ObjectName, SUFFIX, valid_session};

/// A folder of snapshot objects.
#[derive(Debug, Clone)]
pub(crate) struct LocalDir {
    root: PathBuf,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Temporary files younger than this are left alone when a store is opened: on a folder shared by several
/// nodes another node may be writing them.
const TEMP_MIN_AGE: Duration = Duration::from_secs(600);

/// Whether `entry` is a temporary file a killed writer (of this module, or of the single-node store before
/// it) left behind: named `.….tmp-…` and older than [`TEMP_MIN_AGE`].
fn is_stale_temp(entry: &fs::DirEntry) -> bool {
    let named = entry.file_name().to_str().is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"));
    named
        && entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= TEMP_MIN_AGE)
}

impl LocalDir {
    /// Opens (creating if needed) the folder `root`, removes temporary files a killed writer left and moves
    /// snapshots of the earlier single-file layout (`{root}/{session}.actor`) to `{root}/{session}/0-1.actor`.
    pub(crate) fn open(root: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&root)?;
        let dir = LocalDir { root };
        for entry in fs::read_dir(&dir.root)?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_stale_temp(&entry) {
                let _ = fs::remove_file(entry.path());
            } else if let Some(session) = name.strip_suffix(SUFFIX)
                && valid_session(session)
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                dir.migrate(session, &entry.path())?;
            } else if valid_session(name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                for inner in fs::read_dir(entry.path())?.flatten() {
                    if is_stale_temp(&inner) {
                        let _ = fs::remove_file(inner.path());
                    }
                }
            }
        }
        Ok(dir)
    }

    /// Moves a snapshot of the single-file layout into its session's folder, unless that folder already holds
    /// objects (then the newer layout wins and the old file stays for an operator to look at).
    fn migrate(&self, session: &str, old: &Path) -> io::Result<()> {
        if !self.list(session)?.is_empty() {
            return Ok(());
        }
        let Some(name) = ObjectName::new(session, 0, 1) else { return Ok(()) };
        let dir = self.root.join(session);
        fs::create_dir_all(&dir)?;
        fs::rename(old, self.path(&name))?;
        sync_dir(&dir)?;
        sync_dir(&self.root)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path(&self, name: &ObjectName) -> PathBuf {
        self.root.join(&name.session).join(name.file_name())
    }

    /// Writes object `name` with what `write` writes; `Ok(None)` when the name already exists (nothing is
    /// changed then). Returns the bytes written.
    pub(crate) fn put_new(
        &self,
        name: &ObjectName,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<Option<u64>> {
        let dir = self.root.join(&name.session);
        if !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            sync_dir(&self.root)?;
        }
        let target = self.path(name);
        if target.exists() {
            return Ok(None);
        }
        // Written beside its name, synced, then hard-linked (only if the name is free): never replaced.
        driftwood_snapshot::atomic::stage_atomic(&target, write)
            .and_then(|staged| staged.commit_new())
            .map_err(io::Error::other)
    }

    /// The path of object `name`, if it exists.
    pub(crate) fn get(&self, name: &ObjectName) -> Option<PathBuf> {
        let path = self.path(name);
        path.is_file().then_some(path)
    }

    /// Objects of `session`, in no particular order.
    pub(crate) fn list(&self, session: &str) -> io::Result<Vec<ObjectName>> {
        match fs::read_dir(self.root.join(session)) {
            Ok(entries) => {
                Ok(entries.flatten().filter_map(|e| ObjectName::parse_file(session, e.file_name().to_str()?)).collect())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e),
        }
    }

    /// Sessions that have a folder.
    pub(crate) fn sessions(&self) -> io::Result<Vec<String>> {
        Ok(fs::read_dir(&self.root)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| valid_session(name))
            .collect())
    }

    /// Deletes object `name`; an absent object is not an error.
    pub(crate) fn delete(&self, name: &ObjectName) -> io::Result<()> {
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every object of `session` and its folder.
    pub(crate) fn remove_session(&self, session: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.root.join(session)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => sync_dir(&self.root),
        }
    }
}
