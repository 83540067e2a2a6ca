//! Driftwood's snapshot files: the formats, atomic writes, and strict validating readers. No wasmtime or host
//! code lives here; the host turns an actor into the plain data these functions take, and back.
//!
//! - [`session`]: the portable session snapshot, a KV cache with its tokens and the actor's opaque state, as a
//!   safetensors file any safetensors reader opens ([`write_session`], [`SessionReader`], [`read_session`]).
//! - [`actor`]: the whole-actor snapshot for migration: module digest, ABI version, linear memory (non-zero
//!   4 KiB pages only), globals, model handles, metadata ([`write_actor`], [`ActorReader`], [`read_actor`]).
//! - [`atomic`]: [`write_atomic`], which both writers use: temporary file, fsync, rename, fsync of the directory.
//!
//! Each module documents its format precisely enough to write an independent reader. Readers treat files as
//! hostile: every inconsistency is a [`SnapshotError`] naming the field, never a panic, and no allocation is
//! sized by a length read from a file before that length is checked against the file's real size (from the file
//! system) and against what the file's own header declares; the streaming readers ([`SessionReader`],
//! [`ActorReader`]) then read data straight into its destination.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod actor;
pub mod atomic;
mod error;
pub mod session;
mod util;

pub use actor::{
    ActorFile, ActorImage, ActorLimits, ActorReader, ActorWriteStats, GlobalValue, MemoryOverlay, ModelRef,
    parse_actor, read_actor, write_actor, write_actor_overlaid, write_actor_to, write_actor_to_overlaid,
};
pub use atomic::{Staged, stage_atomic, write_atomic};
pub use error::{Format, SnapshotError};
pub use session::{
    KvDtype, OwnedSessionSnapshot, SessionExpect, SessionFile, SessionReader, SessionSnapshot, parse_session,
    read_session, stage_session, write_session, write_session_to,
};
