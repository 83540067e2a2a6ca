//! The snapshot store on every backend, and session ownership on a real etcd cluster with snapshots in a
//! real SeaweedFS: fencing of a node whose lease expired, two claims at once, a killed etcd member and a killed
//! volume server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwood_cluster::testkit::{Binaries, EtcdCluster, SeaweedFs};
use driftwood_cluster::{Claim, ClusterError, Etcd, EtcdError, Fetched, Node, ObjectName, SnapshotStore, StoreError};

fn binaries() -> Binaries {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../cluster-venv");
    Binaries::install(&venv).unwrap_or_else(|e| panic!("installing etcd and SeaweedFS for the cluster tests: {e}"))
}

fn name(session: &str, fence: u64, seq: u64) -> ObjectName {
    ObjectName::new(session, fence, seq).expect("valid name")
}

async fn read(store: &SnapshotStore, name: &ObjectName) -> Vec<u8> {
    match store.get(name).await.expect("object exists") {
        Fetched::File(path) => std::fs::read(path).expect("readable"),
        Fetched::Bytes(bytes) => bytes,
    }
}

/// What every backend must do: immutable names, listing in order, collection of earlier objects only.
async fn exercise(store: &SnapshotStore) {
    let a1 = name("alpha", 0, 1);
    let written = store.put_new(&a1, |w| w.write_all(b"first")).await.expect("put");
    assert_eq!(written, 5);
    match store.put_new(&a1, |w| w.write_all(b"second")).await {
        Err(StoreError::Exists { .. }) => {}
        other => panic!("a second put of one name must be refused, got {other:?}"),
    }
    assert_eq!(read(store, &a1).await, b"first", "the first object stays");
    // A failing writer leaves no object behind.
    let failed = store.put_new(&name("alpha", 0, 9), |_| Err(std::io::Error::other("disk on fire"))).await;
    assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
    for (fence, seq) in [(0, 2), (7, 1), (7, 3), (12, 1)] {
        store.put_new(&name("alpha", fence, seq), |w| write!(w, "{fence}-{seq}")).await.expect("put");
    }
    store.put_new(&name("beta", 3, 1), |w| w.write_all(b"b")).await.expect("put");
    let listed: Vec<(u64, u64)> = store.list("alpha").await.expect("list").iter().map(ObjectName::order).collect();
    assert_eq!(listed, [(0, 1), (0, 2), (7, 1), (7, 3), (12, 1)]);
    assert_eq!(store.latest("alpha").await.expect("latest"), Some(name("alpha", 12, 1)));
    assert_eq!(store.latest("gamma").await.expect("latest"), None);
    assert_eq!(store.sessions().await.expect("sessions"), ["alpha", "beta"]);
    assert!(matches!(store.get(&name("alpha", 5, 5)).await, Err(StoreError::NotFound { .. })));
    // Collecting after committing (7, 3) deletes what came before and keeps the later claim's object.
    assert_eq!(store.collect(&name("alpha", 7, 3)).await.expect("collect"), 3);
    let left: Vec<(u64, u64)> = store.list("alpha").await.expect("list").iter().map(ObjectName::order).collect();
    assert_eq!(left, [(7, 3), (12, 1)]);
    assert_eq!(read(store, &name("alpha", 12, 1)).await, b"12-1");
    store.remove_session("alpha").await.expect("remove");
    assert_eq!(store.sessions().await.expect("sessions"), ["beta"]);
    store.remove_session("beta").await.expect("remove");
    assert!(matches!(store.list("../etc").await, Err(StoreError::BadSession(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_memory_stores() {
    exercise(&SnapshotStore::memory()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open(&format!("file://{}", dir.path().display())).expect("open");
    exercise(&store).await;

    // The one-file-per-session layout of earlier versions is moved into the new one; temporary files of a
    // killed writer are removed.
    std::fs::write(dir.path().join("old-chat.actor"), b"old").expect("write");
    let temp = dir.path().join(".old-chat.actor.tmp-1-2");
    std::fs::write(&temp, b"partial").expect("write");
    let fresh = dir.path().join(".old-chat.actor.tmp-1-3");
    std::fs::write(&fresh, b"being written").expect("write");
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&temp).and_then(|f| f.set_modified(long_ago)).expect("mtime");
    let store = SnapshotStore::open(&dir.path().display().to_string()).expect("reopen");
    assert_eq!(store.latest("old-chat").await.expect("latest"), Some(name("old-chat", 0, 1)));
    assert_eq!(read(&store, &name("old-chat", 0, 1)).await, b"old");
    assert!(!temp.exists(), "a temporary file a killed writer left is removed");
    assert!(fresh.exists(), "a recent one may be another node's write in progress");
    assert!(!dir.path().join("old-chat.actor").exists());

    for bad in ["file://relative/path", "ftp://host/x", "s3://", "s3:///prefix"] {
        assert!(matches!(SnapshotStore::open(bad), Err(StoreError::BadUrl { .. })), "{bad}");
    }
    let unknown = SnapshotStore::open_with("s3://bucket/prefix", &[("aws_no_such_setting", "x")]);
    assert!(matches!(unknown, Err(StoreError::BadUrl { .. })), "{unknown:?}");
    assert!(matches!(Etcd::from_list(" , ", Duration::from_secs(1)), Err(EtcdError::NoEndpoints)));
    assert!(matches!(Etcd::from_list("https://h:1", Duration::from_secs(1)), Err(EtcdError::BadEndpoint(_))));
}

async fn lease_gone(node: &Node, session: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if node.owner(session).await.expect("owner").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the owner key of `{session}` outlived its lease by 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_on_etcd_with_snapshots_in_seaweedfs() {
    let bin = binaries();
    let mut etcd_members = EtcdCluster::start(&bin, 3).expect("etcd cluster");
    let mut seaweed = SeaweedFs::start(&bin, 3, "snapshots").expect("SeaweedFS");
    let options: Vec<(&str, String)> = seaweed.s3_options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = SnapshotStore::open_with(&seaweed.store_url("cluster-test"), &options).expect("S3 store");

    // The S3 gateway honours If-None-Match through object_store: an object is never replaced.
    exercise(&store).await;

    let etcd = Arc::new(Etcd::new(&etcd_members.endpoints(), Duration::from_secs(2)).expect("client"));
    let prefix = "/test/";
    // A's lease is short, so that the test waits little for it to expire; the others outlive a leader election.
    let a = Node::join(etcd.clone(), prefix, "node-a", "127.0.0.1:1", Duration::from_secs(2)).await.expect("a joins");
    let ttl = Duration::from_secs(5);
    let b = Node::join(etcd.clone(), prefix, "node-b", "127.0.0.1:2", ttl).await.expect("b joins");
    // A live node's id stays taken (the newcomer waits its own TTL and a second for it to go).
    assert!(matches!(
        Node::join(etcd.clone(), prefix, "node-a", "127.0.0.1:3", Duration::from_secs(1)).await,
        Err(ClusterError::NodeIdTaken(_))
    ));
    let ids: Vec<String> = a.nodes().await.expect("nodes").into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["node-a", "node-b"]);

    // Node A claims the session and commits two turns.
    let Claim::Won { fence: fence_a, pointer: None, .. } = a.claim("chat").await.expect("claim") else {
        panic!("a fresh session is won, with no pointer");
    };
    let again = Claim::Won { fence: fence_a, lease: a.lease(), pointer: None };
    assert_eq!(a.claim("chat").await.expect("reclaim"), again, "a claim of one's own session is the same claim");
    for seq in 1..=2 {
        let object = name("chat", fence_a, seq);
        store.put_new(&object, |w| write!(w, "turn {seq} by a")).await.expect("put");
        a.commit(fence_a, &object).await.expect("a commits while it owns the session");
    }
    match b.claim("chat").await.expect("claim") {
        Claim::Taken(owner) => assert_eq!((owner.node.as_str(), owner.fence), ("node-a", fence_a)),
        other => panic!("b must find a's claim, got {other:?}"),
    }

    // A stops renewing its lease, as if SIGSTOPped; after the TTL its claim is gone and B takes the session,
    // reading A's last committed snapshot in the claim's transaction.
    a.suspend_keepalive();
    lease_gone(&b, "chat").await;
    let Claim::Won { fence: fence_b, pointer, .. } = b.claim("chat").await.expect("claim") else {
        panic!("b must win the freed session");
    };
    assert!(fence_b > fence_a, "fencing tokens grow: {fence_b} after {fence_a}");
    assert_eq!(pointer, Some(name("chat", fence_a, 2)), "b resumes from a's last commit");
    assert_eq!(read(&store, &name("chat", fence_a, 2)).await, b"turn 2 by a");
    let object_b = name("chat", fence_b, 1);
    store.put_new(&object_b, |w| w.write_all(b"turn 3 by b")).await.expect("put");
    b.commit(fence_b, &object_b).await.expect("b commits");

    // A wakes up (SIGCONT) and finishes the turn it was running: its object is written, its commit refused.
    let stale = name("chat", fence_a, 3);
    store.put_new(&stale, |w| w.write_all(b"turn 3 by a, stale")).await.expect("a stale object may be written");
    match a.commit(fence_a, &stale).await {
        Err(ClusterError::Fenced { fence, owner: Some(owner), .. }) => {
            assert_eq!((fence, owner.node.as_str(), owner.fence), (fence_a, "node-b", fence_b));
        }
        other => panic!("the stale commit must be fenced, got {other:?}"),
    }
    assert_eq!(b.pointer("chat").await.expect("pointer"), Some(object_b.clone()), "history stays b's");
    assert!(!a.release("chat", fence_a).await.expect("release"), "a stale release frees nothing");

    // A learns its lease is gone when etcd refuses a claim under it, and rejoins under a new one: the session
    // stays b's, other sessions can be claimed again.
    let old_lease = a.lease();
    assert!(a.claim("elsewhere").await.is_err(), "a claim under an expired lease is refused");
    assert!(a.lease_lost());
    a.rejoin().await.expect("rejoin");
    assert!(a.lease() != old_lease && !a.lease_lost());
    assert!(matches!(a.claim("chat").await.expect("claim"), Claim::Taken(owner) if owner.node == "node-b"));
    assert!(matches!(a.claim("elsewhere").await.expect("claim"), Claim::Won { .. }));
    // B's collection removes A's objects, the stale one included, and keeps its own.
    assert_eq!(store.collect(&object_b).await.expect("collect"), 3);
    assert_eq!(store.list("chat").await.expect("list"), std::slice::from_ref(&object_b));

    // The same sessions claimed by two nodes at once: exactly one wins each.
    let c = Node::join(etcd.clone(), prefix, "node-c", "127.0.0.1:4", ttl).await.expect("c");
    for i in 0..16 {
        let session = format!("race-{i}");
        let (from_b, from_c) = tokio::join!(b.claim(&session), c.claim(&session));
        let outcomes = [from_b.expect("b claims"), from_c.expect("c claims")];
        let winners: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| if let Claim::Won { fence, .. } = o { Some(*fence) } else { None })
            .collect();
        assert_eq!(winners.len(), 1, "{session}: exactly one claim wins: {outcomes:?}");
        let loser = outcomes.iter().find_map(|o| if let Claim::Taken(owner) = o { Some(owner) } else { None });
        assert_eq!(loser.map(|o| o.fence), Some(winners[0]), "{session}: the loser is told the winner's fence");
    }

    // Releasing frees a session for another node; the pointer stays.
    assert!(b.release("chat", fence_b).await.expect("release"));
    let Claim::Won { pointer, .. } = c.claim("chat").await.expect("claim") else { panic!("c must win") };
    assert_eq!(pointer, Some(object_b));

    // One etcd member killed: the others keep serving (the client fails over), claims and commits go on.
    etcd_members.members[0].kill();
    let started = Instant::now();
    let Claim::Won { fence, .. } = c.claim("after-etcd-kill").await.expect("claim with a member down") else {
        panic!("c must win a fresh session");
    };
    let object = name("after-etcd-kill", fence, 1);
    store.put_new(&object, |w| w.write_all(b"x")).await.expect("put");
    c.commit(fence, &object).await.expect("commit with a member down");
    eprintln!("claim + put + commit with one of 3 etcd members killed: {:?}", started.elapsed());

    // One volume server killed: writes go on (every volume has a replica on another server).
    seaweed.volumes[0].kill();
    let started = Instant::now();
    for seq in 1..=8 {
        let object = name("after-volume-kill", fence, seq);
        store.put_new(&object, |w| w.write_all(&vec![seq as u8; 64 << 10])).await.expect("put with a volume down");
        assert_eq!(read(&store, &object).await.len(), 64 << 10);
    }
    eprintln!("8 puts and gets of 64 KiB with one of 3 volume servers killed: {:?}", started.elapsed());

    // Leaving frees every session of the node at once.
    c.leave().await.expect("leave");
    assert_eq!(b.owner("after-etcd-kill").await.expect("owner"), None);
    b.leave().await.expect("leave");
}
