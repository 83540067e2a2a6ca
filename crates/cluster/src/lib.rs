//! Driftwood across machines: where session snapshots live and which node runs a session.
//!
//! - [`SnapshotStore`] keeps immutable snapshot objects `{session}/{fence}-{seq}.actor` in a local folder
//!   (durable: `fsync`ed before a name exists), in memory, or in S3-compatible storage (`object_store`, with
//!   conditional `PUT`s so an object is never replaced).
//! - [`Etcd`] is a client of etcd's v3 JSON gateway (no generated code, no `protoc`), with failover across
//!   the members given.
//! - [`Node`] is one server's membership (a lease and `nodes/{id}`) and its session ownership: a claim makes
//!   `owner/{session}` under the node's lease, whose create revision is the claim's fencing token; a commit
//!   moves `ptr/{session}` to a new object only while the owner key still carries that token.
//!
//! A turn is durable once its snapshot object exists and, in a cluster, once the pointer names it. A node
//! whose lease expired (killed, stopped, cut off) loses every claim at once, and its late commits are refused.
//!
//! With the `testkit` feature, [`testkit`] starts real etcd members and SeaweedFS processes on loopback for
//! tests.

#![warn(missing_docs)]

pub mod etcd;
mod local;
pub mod name;
pub mod node;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use etcd::{Etcd, EtcdError};
pub use name::{ObjectName, valid_session};
pub use node::{Claim, ClusterError, DEFAULT_PREFIX, Load, Node, Owner, Peer};
pub use store::{Fetched, SnapshotStore, StoreError};
