//! Placement of new sessions in a cluster: each node publishes its [`Load`] (sessions owned, draining) in
//! etcd, keeps a view of the others' refreshed twice a lease TTL, and sends a session nobody owns yet to the
//! least-loaded node. A draining node takes no new sessions.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use driftwood_cluster::{ClusterError, Load, Node, Peer};

/// This node's view of where new sessions should go.
#[derive(Default)]
pub(crate) struct Placement {
    /// This node takes no new sessions (an admin drain is under way or done).
    draining: AtomicBool,
    /// The live nodes as last read from etcd, with the sessions placed on them since counted in.
    peers: Mutex<Vec<Peer>>,
    /// The load this node last published, and under which lease (a new lease drops the old key).
    published: Mutex<Option<(i64, Load)>>,
}

impl Placement {
    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts (or ends) draining.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Replaces the view of the other nodes with what etcd holds now.
    pub fn set_peers(&self, peers: Vec<Peer>) {
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    /// Where a session nobody owns should go, given that this node (`me`) owns `mine` sessions: `None` for
    /// here, else the least-loaded other node that takes sessions, when it owns fewer than this node (or
    /// this node is draining). The choice is counted in that node's load until the next refresh, so that a
    /// burst of new sessions spreads instead of all going to the node that was least loaded at the refresh.
    pub fn choose(&self, me: &str, mine: usize) -> Option<Peer> {
        let draining = self.draining();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let best = peers
            .iter_mut()
            .filter(|p| p.id != me)
            .filter_map(|p| match p.load {
                Some(load) if !load.draining => Some((load.sessions, p)),
                _ => None,
            })
            .min_by(|(a, p), (b, q)| a.cmp(b).then_with(|| p.id.cmp(&q.id)))?;
        if !draining && best.0 >= mine {
            return None;
        }
        let peer = best.1;
        if let Some(load) = peer.load.as_mut() {
            load.sessions += 1;
        }
        Some(peer.clone())
    }

    /// Publishes `load` for this node unless it is what was published last under the node's lease.
    ///
    /// # Errors
    ///
    /// etcd's errors.
    pub async fn publish(&self, node: &Node, load: Load) -> Result<(), ClusterError> {
        let now = (node.lease(), load);
        if *self.published.lock().unwrap_or_else(|p| p.into_inner()) == Some(now) {
            return Ok(());
        }
        node.publish_load(load).await?;
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, sessions: usize, draining: bool) -> Peer {
        Peer { id: id.into(), address: format!("http://{id}"), lease: 1, load: Some(Load { sessions, draining }) }
    }

    #[test]
    fn new_sessions_spread_over_the_least_loaded_nodes() {
        let placement = Placement::default();
        placement.set_peers(vec![peer("a", 0, false), peer("b", 0, false), peer("c", 2, false)]);
        // Node a owns 3: b (the least loaded) takes new sessions until it counts 2, ties with c go by id.
        let chosen: Vec<Option<String>> = (0..3).map(|_| placement.choose("a", 3).map(|p| p.id)).collect();
        assert_eq!(chosen, [Some("b".to_string()), Some("b".to_string()), Some("b".to_string())]);
        // b now counts 3, c 2: c is chosen once, then nobody owns fewer than a's 3.
        assert_eq!(placement.choose("a", 3).map(|p| p.id), Some("c".into()));
        assert_eq!(placement.choose("a", 3), None);
    }

    #[test]
    fn a_draining_node_places_everything_elsewhere_and_is_never_chosen() {
        let placement = Placement::default();
        placement.set_peers(vec![peer("a", 0, false), peer("b", 5, false), peer("c", 0, true)]);
        assert_eq!(placement.choose("b", 9).map(|p| p.id), Some("a".into()));
        placement.set_draining(true);
        assert_eq!(placement.choose("a", 0).map(|p| p.id), Some("b".into()), "a drains, so even b (busier) takes it");
        placement.set_peers(vec![peer("a", 0, false), peer("c", 0, true)]);
        assert_eq!(placement.choose("a", 0), None, "no other node takes sessions: it stays here");
    }

    #[test]
    fn nodes_without_a_published_load_are_not_chosen() {
        let placement = Placement::default();
        placement.set_peers(vec![Peer { id: "b".into(), address: "http://b".into(), lease: 1, load: None }]);
        assert_eq!(placement.choose("a", 10), None);
    }
}
