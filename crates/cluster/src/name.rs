//! [`ObjectName`]: where one snapshot of one session lives, `{session}/{fence}-{seq}.actor`.
//!
//! The fence is the fencing token of the claim that wrote the snapshot (0 on a single node, which claims
//! nothing) and the seq counts the snapshots written under that claim. A name is written once and never
//! replaced, so a reader holding a name always reads the bytes that were committed under it.

use std::fmt;

/// Suffix of every snapshot object.
pub const SUFFIX: &str = ".actor";

/// Longest session id accepted, in bytes.
pub const MAX_SESSION_ID: usize = 128;

/// The name of one immutable snapshot object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectName {
    /// The session the snapshot is of.
    pub session: String,
    /// Fencing token of the claim under which it was written.
    pub fence: u64,
    /// Position among the snapshots written under that claim, from 1.
    pub seq: u64,
}

/// Whether `id` is a valid session id: 1–128 ASCII letters, digits, `-` or `_` (so it is one path segment on
/// every store and one etcd key segment).
pub fn valid_session(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ObjectName {
    /// The name of snapshot `seq` of `session` under claim `fence`, or `None` when `session` is not a valid id.
    pub fn new(session: &str, fence: u64, seq: u64) -> Option<Self> {
        valid_session(session).then(|| ObjectName { session: session.to_string(), fence, seq })
    }

    /// The object's path in its store, relative to the store's root.
    pub fn path(&self) -> String {
        format!("{}/{}-{}{SUFFIX}", self.session, self.fence, self.seq)
    }

    /// The file name part, `{fence}-{seq}.actor`.
    pub fn file_name(&self) -> String {
        format!("{}-{}{SUFFIX}", self.fence, self.seq)
    }

    /// Parses a path written by [`path`](Self::path); `None` for anything else (temporary files, other objects).
    pub fn parse(path: &str) -> Option<Self> {
        let (session, file) = path.split_once('/')?;
        Self::parse_file(session, file)
    }

    /// Parses the file name `file` of an object of `session`.
    pub fn parse_file(session: &str, file: &str) -> Option<Self> {
        let stem = file.strip_suffix(SUFFIX)?;
        let (fence, seq) = stem.split_once('-')?;
        // Digits only: `u64::from_str` would also take a leading `+`.
        let number = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?;
        let name = ObjectName::new(session, number(fence)?, number(seq)?)?;
        // One spelling per name: no leading zeros, so two files never name the same snapshot.
        (name.file_name() == file).then_some(name)
    }

    /// Sort key: later claims first by fence, then later snapshots of one claim.
    pub fn order(&self) -> (u64, u64) {
        (self.fence, self.seq)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_others() {
        let name = ObjectName::new("chat-1", 42, 7).unwrap();
        assert_eq!(name.path(), "chat-1/42-7.actor");
        assert_eq!(ObjectName::parse(&name.path()), Some(name));
        for bad in [
            "chat-1/42-7.actor.tmp",
            "chat-1/.42-7.actor.tmp-1-2",
            "chat-1/042-7.actor",
            "chat-1/+4-7.actor",
            "chat-1/42_7.actor",
            "chat-1/42-.actor",
            "chat 1/42-7.actor",
            "/42-7.actor",
            "chat-1/a/42-7.actor",
            "chat-1.actor",
        ] {
            assert_eq!(ObjectName::parse(bad), None, "{bad}");
        }
        assert!(ObjectName::new(&"x".repeat(129), 0, 1).is_none());
    }
}
