//! [`ActorStore`]: hibernation. An idle actor is snapshotted to a store directory and dropped (its memory
//! region is unmapped); waking it restores the snapshot into a fresh instance that continues exactly where
//! it stood.

use std::path::{Path, PathBuf};

use crate::{Actor, ActorError, Runtime};

/// A directory of hibernated actors, one whole-actor snapshot file per id.
#[derive(Debug, Clone)]
pub struct ActorStore {
    dir: PathBuf,
}

/// What hibernating one actor wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hibernated {
    /// Bytes of the snapshot file.
    pub file_bytes: u64,
    /// Bytes of linear memory the actor had (released now).
    pub memory_bytes: u64,
}

impl ActorStore {
    /// Opens (creating if needed) the store at `dir`.
    ///
    /// # Errors
    ///
    /// [`ActorError::Host`] if the directory cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ActorError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| ActorError::Host(format!("cannot create actor store {}: {e}", dir.display())))?;
        Ok(ActorStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> Result<PathBuf, ActorError> {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(ActorError::Host(format!(
                "actor id `{id}` is not valid: use 1–128 letters, digits, `-` or `_`"
            )));
        }
        Ok(self.dir.join(format!("{id}.actor")))
    }

    /// Snapshots `actor` under `id` (atomically replacing an earlier snapshot), then drops it, releasing its
    /// memory.
    ///
    /// # Errors
    ///
    /// An invalid id or a failed write. The actor is dropped only once its snapshot is safely on disk: on error
    /// it is still in `actor`, unchanged.
    pub fn hibernate(&self, id: &str, actor: &mut Option<Actor>) -> Result<Hibernated, ActorError> {
        let path = self.path(id)?;
        let live = actor.as_mut().ok_or_else(|| ActorError::Host("no actor to hibernate".into()))?;
        let memory_bytes = live.memory_size() as u64;
        let stats = live.save_snapshot(&path, Default::default())?;
        *actor = None;
        Ok(Hibernated { file_bytes: stats.bytes, memory_bytes })
    }

    /// Snapshots `actor` under `id` (atomically replacing an earlier snapshot) and keeps it running: after
    /// a crash, [`wake`](Self::wake) brings back the actor as it stood at this call.
    ///
    /// # Errors
    ///
    /// An invalid id or a failed write; the actor is unchanged either way.
    pub fn save(&self, id: &str, actor: &mut Actor) -> Result<u64, ActorError> {
        let path = self.path(id)?;
        Ok(actor.save_snapshot(&path, Default::default())?.bytes)
    }

    /// Restores the actor hibernated as `id` from the module `wasm`. The snapshot stays in the store until
    /// [`remove`](Self::remove)d, so a crash after waking loses nothing.
    ///
    /// # Errors
    ///
    /// An unknown id, or anything [`Runtime::restore_actor`] refuses.
    pub fn wake(&self, runtime: &Runtime, id: &str, wasm: &[u8]) -> Result<Actor, ActorError> {
        let path = self.path(id)?;
        if !path.exists() {
            return Err(ActorError::Host(format!("no hibernated actor `{id}` in {}", self.dir.display())));
        }
        runtime.restore_actor(&path, wasm)
    }

    /// Whether an actor is hibernated as `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.path(id).map(|p| p.exists()).unwrap_or(false)
    }

    /// Deletes the snapshot of `id`, if any.
    ///
    /// # Errors
    ///
    /// An invalid id or a failed deletion.
    pub fn remove(&self, id: &str) -> Result<(), ActorError> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ActorError::Host(format!("cannot remove {}: {e}", path.display()))),
        }
    }

    /// Ids of all hibernated actors.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".actor").map(str::to_string))
            .collect();
        ids.sort();
        ids
    }
}
