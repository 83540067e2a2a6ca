//! [`Node`]: one server's membership and session ownership in etcd.
//!
//! Keys, under a prefix (default `/driftwood/`):
//!
//! | key | value | lease | written by |
//! |---|---|---|---|
//! | `nodes/{node}` | the node's address | the node's | [`Node::join`] |
//! | `owner/{session}` | the owning node's id | the owner's | [`Node::claim`] |
//! | `ptr/{session}` | the session's latest committed snapshot object | none | [`Node::commit`] |
//! | `load/{node}` | the node's [`Load`] as JSON (sessions it owns, whether it is draining) | the node's | [`Node::publish_load`] |
//!
//! A claim creates `owner/{session}` only if it is absent, under the node's lease, in one transaction that also
//! reads the pointer. The key's create revision is the claim's **fencing token**: etcd's revisions only grow,
//! so every later claim of the session has a larger one. A commit moves the pointer only in a transaction that
//! checks the owner key still has the committer's token, so a node that lost its claim (its lease expired while
//! it was stopped or cut off) cannot move the pointer, whatever it believes. When a node's lease expires, etcd
//! deletes all its keys at once: every session it owned can be claimed by another node.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::etcd::{Compare, Etcd, EtcdError, Op, OpResult, Txn};
use crate::name::{ObjectName, valid_session};

/// The prefix of every key, unless a deployment chooses another.
pub const DEFAULT_PREFIX: &str = "/driftwood/";

/// What a cluster operation could not do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd could not be reached or refused the call.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A node or session id that is not 1–128 letters, digits, `-` or `_`.
    #[error("`{0}` is not a valid id: use 1–128 ASCII letters, digits, `-` or `_`")]
    BadId(String),
    /// Another live node is registered under this node's id.
    #[error("node id `{0}` is registered by another live node")]
    NodeIdTaken(String),
    /// The commit was refused: the session's owner key no longer carries this claim's fencing token (the
    /// claim's lease expired, or another node claimed the session since).
    #[error("commit of session `{session}` under fence {fence} refused: {}", describe_owner(.owner))]
    Fenced {
        /// The session.
        session: String,
        /// The token the commit carried.
        fence: u64,
        /// The owner etcd holds now.
        owner: Option<Owner>,
    },
    /// etcd holds a value this module did not write (a pointer that is not an object name).
    #[error("etcd key `{key}` holds an unexpected value: {what}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        what: String,
    },
}

/// The owner of a session, as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owning node's id.
    pub node: String,
    /// Its fencing token (the owner key's create revision).
    pub fence: u64,
    /// The lease the owner key is attached to.
    pub lease: i64,
}

/// What a node publishes about itself so that others can place new sessions on the least-loaded node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    /// Sessions the node owns.
    pub sessions: usize,
    /// The node is draining: it takes no new sessions.
    pub draining: bool,
}

/// A live node, as [`Node::peers`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its id.
    pub id: String,
    /// The address it registered (`http://host:port`).
    pub address: String,
    /// The lease its registration is attached to: while `nodes/{id}` carries it, this incarnation of the
    /// node is alive.
    pub lease: i64,
    /// Its published load, if it has published one.
    pub load: Option<Load>,
}

/// What [`Node::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the session (newly, or already), with this fencing token.
    Won {
        /// The token every commit of this claim carries.
        fence: u64,
        /// The node's lease the claim is attached to: it lasts as long as that lease.
        lease: i64,
        /// The session's latest committed snapshot, if it has one.
        pointer: Option<ObjectName>,
    },
    /// Another node owns it.
    Taken(Owner),
}

/// A registered node of a cluster. Its lease is kept alive by a background task until
/// [`leave`](Self::leave), [`suspend_keepalive`](Self::suspend_keepalive) or drop; when the lease is lost
/// anyway (the process was stopped past its TTL), [`rejoin`](Self::rejoin) registers the node under a new one.
#[derive(Debug)]
pub struct Node {
    etcd: Arc<Etcd>,
    id: String,
    prefix: String,
    addr: String,
    ttl: Duration,
    /// The current lease.
    lease: AtomicI64,
    /// The last lease the renewal task found gone (0: none).
    lost: Arc<AtomicI64>,
    keepalive: Mutex<tokio::task::JoinHandle<()>>,
    rejoining: tokio::sync::Mutex<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.keepalive.lock().unwrap_or_else(|p| p.into_inner()).abort();
    }
}

/// Grants a lease of `ttl_secs` and registers `key` = `addr` under it, waiting up to the TTL and a second for
/// a predecessor's key of the same id to go.
async fn register(etcd: &Etcd, key: &[u8], id: &str, addr: &str, ttl_secs: i64) -> Result<i64, ClusterError> {
    let lease = etcd.lease_grant(ttl_secs).await?;
    let txn = Txn {
        compare: vec![Compare::CreateRevision(key.to_vec(), 0)],
        success: vec![Op::Put { key: key.to_vec(), value: addr.as_bytes().to_vec(), lease: lease.id }],
        failure: vec![Op::Get(key.to_vec())],
    };
    // A node restarted right after it died finds its predecessor's key until that lease expires: wait for it
    // that long (a live node of the same id renews its lease, so the id stays taken).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ttl_secs as u64 + 1);
    loop {
        let registered = etcd.txn(&txn).await?;
        // A resent transaction finds its own first application: that is ours too.
        let ours = registered.succeeded
            || matches!(&registered.results[..], [OpResult::Get(Some(kv))] if kv.lease == lease.id);
        if ours {
            return Ok(lease.id);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = etcd.lease_revoke(lease.id).await;
            return Err(ClusterError::NodeIdTaken(id.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn describe_owner(owner: &Option<Owner>) -> String {
    match owner {
        Some(o) => format!("it is now owned by node `{}` (fence {})", o.node, o.fence),
        None => "it has no owner now".to_string(),
    }
}

/// The id in `key`, a key listed under `prefix` (`…nodes/{id}`).
fn id_under(prefix: &str, key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(prefix).unwrap_or(&key).to_string()
}

fn owner_of(kv: &crate::etcd::KeyValue) -> Owner {
    Owner { node: String::from_utf8_lossy(&kv.value).into_owned(), fence: kv.create_revision as u64, lease: kv.lease }
}

impl Node {
    /// Joins the cluster as node `id` reachable at `addr`: grants a lease of `ttl` (whole seconds, at least 1),
    /// registers `nodes/{id}` under it and starts renewing it every third of `ttl`. Keys go under `prefix`
    /// ([`DEFAULT_PREFIX`] unless several deployments share one etcd). When `nodes/{id}` exists (a node of this
    /// id died moments ago, or is alive), waits up to `ttl` and a second for it to go.
    ///
    /// Call it inside a Tokio runtime (the renewal is a task of it).
    ///
    /// # Errors
    ///
    /// [`ClusterError::BadId`]; [`ClusterError::NodeIdTaken`] when a live node has the id; etcd's errors.
    pub async fn join(
        etcd: Arc<Etcd>,
        prefix: &str,
        id: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<Node, ClusterError> {
        if !valid_session(id) {
            return Err(ClusterError::BadId(id.to_string()));
        }
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let key = format!("{prefix}nodes/{id}").into_bytes();
        let lease = register(&etcd, &key, id, addr, ttl_secs).await?;
        let ttl = Duration::from_secs(ttl_secs as u64);
        let lost = Arc::new(AtomicI64::new(0));
        let keepalive = tokio::spawn(keep_alive(etcd.clone(), lease, ttl, lost.clone()));
        Ok(Node {
            etcd,
            id: id.to_string(),
            prefix: prefix.to_string(),
            addr: addr.to_string(),
            ttl,
            lease: AtomicI64::new(lease),
            lost,
            keepalive: Mutex::new(keepalive),
            rejoining: tokio::sync::Mutex::new(()),
        })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The etcd lease every key of this node is attached to; claims are valid only while it lasts.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the current lease is known to be gone (the renewal task found it expired, or etcd refused a
    /// claim under it): every claim made under it has been freed, and its commits will be refused.
    pub fn lease_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire) == self.lease()
    }

    /// Stops renewing the lease, as if this process had been stopped: after the TTL etcd frees the node's
    /// sessions. For failure drills and tests.
    pub fn suspend_keepalive(&self) {
        self.keepalive.lock().unwrap_or_else(|p| p.into_inner()).abort();
    }

    /// After the lease was lost: registers the node under a new lease and renews that one. Claims made under
    /// the old lease stay lost (claim the sessions again). Does nothing while the lease is not known to be
    /// lost; concurrent calls rejoin once.
    ///
    /// # Errors
    ///
    /// etcd's errors; [`ClusterError::NodeIdTaken`] when another live node took the id meanwhile.
    pub async fn rejoin(&self) -> Result<(), ClusterError> {
        let _one_at_a_time = self.rejoining.lock().await;
        if !self.lease_lost() {
            return Ok(());
        }
        let key = self.key("nodes", &self.id);
        let lease = register(&self.etcd, &key, &self.id, &self.addr, self.ttl.as_secs() as i64).await?;
        let renewal = tokio::spawn(keep_alive(self.etcd.clone(), lease, self.ttl, self.lost.clone()));
        let old = std::mem::replace(&mut *self.keepalive.lock().unwrap_or_else(|p| p.into_inner()), renewal);
        old.abort();
        self.lease.store(lease, Ordering::Release);
        tracing::warn!(node = %self.id, lease, "rejoined the cluster under a new lease");
        Ok(())
    }

    /// Marks `lease` lost (etcd refused it), so that [`lease_lost`](Self::lease_lost) says so.
    pub fn mark_lost(&self, lease: i64) {
        self.lost.store(lease, Ordering::Release);
    }

    fn key(&self, kind: &str, id: &str) -> Vec<u8> {
        format!("{}{kind}/{id}", self.prefix).into_bytes()
    }

    fn pointer_from(&self, session: &str, result: Option<&OpResult>) -> Result<Option<ObjectName>, ClusterError> {
        let Some(OpResult::Get(Some(kv))) = result else { return Ok(None) };
        let text = String::from_utf8_lossy(&kv.value);
        match ObjectName::parse(&text) {
            Some(name) if name.session == session => Ok(Some(name)),
            _ => Err(ClusterError::BadValue {
                key: String::from_utf8_lossy(&self.key("ptr", session)).into_owned(),
                what: format!("`{text}` is not a snapshot object of session `{session}`"),
            }),
        }
    }

    /// Claims `session` for this node, unless another node owns it; either way returns the session's latest
    /// committed snapshot as read in the same transaction.
    ///
    /// # Errors
    ///
    /// [`ClusterError::BadId`]; etcd's errors (a lease that expired is refused with code 5); a pointer that is
    /// not an object name ([`ClusterError::BadValue`]).
    pub async fn claim(&self, session: &str) -> Result<Claim, ClusterError> {
        if !valid_session(session) {
            return Err(ClusterError::BadId(session.to_string()));
        }
        let lease = self.lease();
        let (owner, ptr) = (self.key("owner", session), self.key("ptr", session));
        let txn = Txn {
            compare: vec![Compare::CreateRevision(owner.clone(), 0)],
            success: vec![
                Op::Put { key: owner.clone(), value: self.id.as_bytes().to_vec(), lease },
                Op::Get(ptr.clone()),
            ],
            failure: vec![Op::Get(owner.clone()), Op::Get(ptr)],
        };
        let done = match self.etcd.txn(&txn).await {
            Err(e) if e.is_lease_not_found() => {
                self.mark_lost(lease);
                return Err(e.into());
            }
            other => other?,
        };
        let pointer = self.pointer_from(session, done.results.get(1))?;
        if done.succeeded {
            // The put made this revision: it is the owner key's create revision.
            return Ok(Claim::Won { fence: done.revision as u64, lease, pointer });
        }
        match done.results.first() {
            Some(OpResult::Get(Some(kv))) if kv.lease == lease => {
                Ok(Claim::Won { fence: kv.create_revision as u64, lease, pointer })
            }
            Some(OpResult::Get(Some(kv))) => Ok(Claim::Taken(owner_of(kv))),
            _ => Err(ClusterError::BadValue {
                key: String::from_utf8_lossy(&owner).into_owned(),
                what: "the claim's compare failed but the key is absent".into(),
            }),
        }
    }

    /// Moves `object`'s session pointer to `object`, if the session's owner key still carries `fence`.
    /// Acknowledge a turn only after this returns `Ok`.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Fenced`] when it does not (nothing is changed); etcd's errors.
    pub async fn commit(&self, fence: u64, object: &ObjectName) -> Result<(), ClusterError> {
        let owner = self.key("owner", &object.session);
        let txn = Txn {
            compare: vec![Compare::CreateRevision(owner.clone(), fence as i64)],
            success: vec![Op::Put {
                key: self.key("ptr", &object.session),
                value: object.path().into_bytes(),
                lease: 0,
            }],
            failure: vec![Op::Get(owner)],
        };
        let done = self.etcd.txn(&txn).await?;
        if done.succeeded {
            return Ok(());
        }
        let owner = match done.results.first() {
            Some(OpResult::Get(Some(kv))) => Some(owner_of(kv)),
            _ => None,
        };
        Err(ClusterError::Fenced { session: object.session.clone(), fence, owner })
    }

    /// Gives up the claim of `session` made with `fence` (its pointer stays). Returns whether this node still
    /// held it.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn release(&self, session: &str, fence: u64) -> Result<bool, ClusterError> {
        let owner = self.key("owner", session);
        let txn = Txn {
            compare: vec![Compare::CreateRevision(owner.clone(), fence as i64)],
            success: vec![Op::Delete(owner)],
            failure: vec![],
        };
        Ok(self.etcd.txn(&txn).await?.succeeded)
    }

    /// The owner of `session`, if it has one.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn owner(&self, session: &str) -> Result<Option<Owner>, ClusterError> {
        Ok(self.etcd.get(&self.key("owner", session)).await?.as_ref().map(owner_of))
    }

    /// The latest committed snapshot of `session`, if it has one.
    ///
    /// # Errors
    ///
    /// etcd's errors; [`ClusterError::BadValue`] for a pointer that is not an object name.
    pub async fn pointer(&self, session: &str) -> Result<Option<ObjectName>, ClusterError> {
        let kv = self.etcd.get(&self.key("ptr", session)).await?;
        self.pointer_from(session, Some(&OpResult::Get(kv)))
    }

    /// The live nodes: `(id, address)`, by id.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn nodes(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let prefix = format!("{}nodes/", self.prefix);
        let kvs = self.etcd.get_prefix(prefix.as_bytes()).await?;
        Ok(kvs.iter().map(|kv| (id_under(&prefix, &kv.key), String::from_utf8_lossy(&kv.value).into_owned())).collect())
    }

    /// The live nodes with their registrations' leases and published loads, by id.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn peers(&self) -> Result<Vec<Peer>, ClusterError> {
        let (nodes, loads) = (format!("{}nodes/", self.prefix), format!("{}load/", self.prefix));
        let registered = self.etcd.get_prefix(nodes.as_bytes()).await?;
        let published = self.etcd.get_prefix(loads.as_bytes()).await?;
        Ok(registered
            .iter()
            .map(|kv| {
                let id = id_under(&nodes, &kv.key);
                let load = published
                    .iter()
                    .find(|l| l.lease == kv.lease && id_under(&loads, &l.key) == id)
                    .and_then(|l| serde_json::from_slice(&l.value).ok());
                Peer { id, address: String::from_utf8_lossy(&kv.value).into_owned(), lease: kv.lease, load }
            })
            .collect())
    }

    /// Whether node `id` is still registered under `lease` (the incarnation found earlier is alive).
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn is_registered(&self, id: &str, lease: i64) -> Result<bool, ClusterError> {
        Ok(self.etcd.get(&self.key("nodes", id)).await?.is_some_and(|kv| kv.lease == lease))
    }

    /// Publishes this node's load under its lease (`load/{id}`), for other nodes' placement.
    ///
    /// # Errors
    ///
    /// etcd's errors (a lease that expired is refused with code 5).
    pub async fn publish_load(&self, load: Load) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(&load).map_err(|e| ClusterError::BadValue {
            key: String::from_utf8_lossy(&self.key("load", &self.id)).into_owned(),
            what: e.to_string(),
        })?;
        self.etcd.put(&self.key("load", &self.id), &value, self.lease()).await?;
        Ok(())
    }

    /// Deletes the session claimed with `fence`: its pointer and its owner key (its objects are the caller's
    /// to delete). Returns whether this node still held the claim (if not, nothing is deleted).
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn remove(&self, session: &str, fence: u64) -> Result<bool, ClusterError> {
        let owner = self.key("owner", session);
        let txn = Txn {
            compare: vec![Compare::CreateRevision(owner.clone(), fence as i64)],
            success: vec![Op::Delete(self.key("ptr", session)), Op::Delete(owner)],
            failure: vec![],
        };
        Ok(self.etcd.txn(&txn).await?.succeeded)
    }

    /// The address node `id` registered, if it is live.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn address_of(&self, id: &str) -> Result<Option<String>, ClusterError> {
        let kv = self.etcd.get(&self.key("nodes", id)).await?;
        Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Every session etcd knows (it has an owner or a committed snapshot): `(id, owner, pointer)`, by id.
    ///
    /// # Errors
    ///
    /// etcd's errors; [`ClusterError::BadValue`] for a pointer that is not an object name.
    pub async fn sessions(&self) -> Result<Vec<(String, Option<Owner>, Option<ObjectName>)>, ClusterError> {
        let owner_prefix = format!("{}owner/", self.prefix);
        let ptr_prefix = format!("{}ptr/", self.prefix);
        let owners = self.etcd.get_prefix(owner_prefix.as_bytes()).await?;
        let pointers = self.etcd.get_prefix(ptr_prefix.as_bytes()).await?;
        let mut sessions: std::collections::BTreeMap<String, (Option<Owner>, Option<ObjectName>)> = Default::default();
        for kv in &owners {
            let key = String::from_utf8_lossy(&kv.key);
            if let Some(id) = key.strip_prefix(&owner_prefix) {
                sessions.entry(id.to_string()).or_default().0 = Some(owner_of(kv));
            }
        }
        for kv in pointers {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if let Some(id) = key.strip_prefix(&ptr_prefix) {
                let pointer = self.pointer_from(id, Some(&OpResult::Get(Some(kv.clone()))))?;
                sessions.entry(id.to_string()).or_default().1 = pointer;
            }
        }
        Ok(sessions.into_iter().map(|(id, (owner, pointer))| (id, owner, pointer)).collect())
    }

    /// Leaves the cluster: stops renewing the lease and revokes it, which deletes `nodes/{id}` and frees every
    /// session this node owns at once (their pointers stay).
    ///
    /// # Errors
    ///
    /// etcd's errors; the lease then expires by itself after its TTL.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.suspend_keepalive();
        self.etcd.lease_revoke(self.lease()).await?;
        Ok(())
    }
}

/// Renews `lease` every third of `ttl` until it is gone, then records it in `lost`.
async fn keep_alive(etcd: Arc<Etcd>, lease: i64, ttl: Duration, lost: Arc<AtomicI64>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        match etcd.lease_keepalive(lease).await {
            Ok(0) => {
                tracing::warn!(lease, "the node's etcd lease expired: its sessions are free for other nodes");
                lost.store(lease, Ordering::Release);
                return;
            }
            Ok(_) => {}
            // Renewed on the next round, or the lease expires and the node learns it then.
            Err(e) => tracing::warn!(lease, "renewing the node's etcd lease failed: {e}"),
        }
    }
}
