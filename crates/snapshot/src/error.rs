//! The one error type of this crate.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Which snapshot format an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The portable session (KV cache) snapshot, a safetensors file ([`crate::session`]).
    Session,
    /// The whole-actor snapshot used for migration ([`crate::actor`]).
    Actor,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Session => "session snapshot",
            Format::Actor => "actor snapshot",
        })
    }
}

/// Everything that can go wrong writing or reading a snapshot.
///
/// Every variant's message names the file operation or the field at fault. Reading never panics on a hostile
/// file: every inconsistency is one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// An operating-system error while creating, writing, syncing, renaming or reading a file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `"writing"` or `"renaming temporary file onto"`.
        op: &'static str,
        /// The file (or directory) concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An I/O error from a caller-supplied writer (see [`crate::session::write_session_to`] and
    /// [`crate::actor::write_actor_to`]).
    #[error("writing {format}: {source}")]
    Write {
        /// The format being written.
        format: Format,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid snapshot: a field is malformed, out of range or inconsistent with another.
    #[error("invalid {format}: {field}: {reason}")]
    Invalid {
        /// The format being read.
        format: Format,
        /// The field (or part of the file) at fault, e.g. `"memory_size"`, `"page index 3"`, `"file length"`.
        field: String,
        /// What is wrong with it, with the values involved.
        reason: String,
    },
    /// The file, or a size it claims, is over a limit.
    #[error("{format}: {what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The format being read.
        format: Format,
        /// What is too large, e.g. `"file"` or `"memory_size"`.
        what: &'static str,
        /// The size found.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The contents do not hash to the checksum recorded in the file.
    #[error("{format}: checksum mismatch: the file records {stored} but its contents hash to {computed}")]
    Checksum {
        /// The format being read.
        format: Format,
        /// The checksum recorded in the file (lowercase hex BLAKE3).
        stored: String,
        /// The checksum of the contents as read.
        computed: String,
    },
    /// A tensor's data does not hash to the digest the file records for it (session snapshot, version 3).
    #[error(
        "{format}: tensor {tensor}: checksum mismatch: the file records {stored} but its data hashes to {computed}"
    )]
    TensorChecksum {
        /// The format being read.
        format: Format,
        /// The tensor, e.g. `"layers.3.v"`.
        tensor: String,
        /// The digest recorded in the file (lowercase hex BLAKE3).
        stored: String,
        /// The digest of the data as read.
        computed: String,
    },
    /// A valid session snapshot made for another model or tokenizer than the loaded one.
    #[error("snapshot is for {what} {snapshot} but the loaded {what} is {loaded}")]
    FingerprintMismatch {
        /// `"model"` or `"tokenizer"`.
        what: &'static str,
        /// The fingerprint recorded in the snapshot.
        snapshot: String,
        /// The fingerprint of the loaded model or tokenizer.
        loaded: String,
    },
    /// A valid session snapshot whose KV-cache shape differs from the loaded model's.
    #[error("snapshot has {field} = {snapshot} but the loaded model has {field} = {loaded}")]
    ShapeMismatch {
        /// `"num_layers"`, `"kv_heads"` or `"head_dim"`.
        field: &'static str,
        /// The value in the snapshot.
        snapshot: u64,
        /// The value of the loaded model.
        loaded: u64,
    },
    /// A valid session snapshot that holds more tokens than the session it is restored into can.
    #[error("snapshot holds {n_tokens} tokens but the session holds at most {max_tokens}")]
    TooManyTokens {
        /// Tokens in the snapshot.
        n_tokens: u64,
        /// Capacity of the target session.
        max_tokens: u64,
    },
    /// The caller asked to write something the format cannot represent, or to restore into a memory of the
    /// wrong size. Nothing was written.
    #[error("{format}: {field}: {reason}")]
    BadInput {
        /// The format concerned.
        format: Format,
        /// The input field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl SnapshotError {
    pub(crate) fn invalid(format: Format, field: impl Into<String>, reason: impl Into<String>) -> Self {
        SnapshotError::Invalid { format, field: field.into(), reason: reason.into() }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SnapshotError::Io { op, path: path.into(), source }
    }
}
