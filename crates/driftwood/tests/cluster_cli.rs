//! `driftwood serve --cluster` as processes over a real etcd and one shared store folder: a turn sent to a
//! node that does not own the session is forwarded to its owner; a node stopped
//! (SIGSTOP) past its lease loses its session to another node and, continued (SIGCONT), cannot keep a turn of
//! it; the new owner killed (SIGKILL), a third node continues the session from its last acknowledged turn.

mod support;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use driftwood_cluster::testkit::{Binaries, EtcdCluster};
use serde_json::{Value, json};
use support::serve::{reply, request, request_with_head, spawn_serve};

/// A node process, killed (by its pid) when dropped.
struct NodeProc {
    child: Child,
    addr: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProc {
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this struct spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

fn start(store: &Path, etcd: &str, id: &str) -> NodeProc {
    let store = format!("file://{}", store.display());
    let (child, addr) = spawn_serve(["--store", &store, "--cluster", etcd, "--node-id", id, "--lease-ttl-secs", "2"]);
    NodeProc { child, addr }
}

fn chat(node: &NodeProc, session: &str, messages: &[Value]) -> (u16, Value) {
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 12, "temperature": 0});
    let (status, body) = request(&node.addr, "POST", "/v1/chat/completions", session, &body.to_string());
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

/// Sends the turn to `node` until it is answered 200 (at most 20 s); returns the answer and how long it took.
fn until_served(node: &NodeProc, session: &str, messages: &[Value]) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let (status, body) = chat(node, session, messages);
        if status == 200 {
            return (body, start.elapsed());
        }
        assert!(matches!(status, 409 | 503), "only a moving session's answers are expected, got {status}: {body}");
        assert!(start.elapsed() < Duration::from_secs(20), "the session did not move in 20 s: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tokens(v: &Value) -> (u64, u64) {
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    (prompt, v["driftwood"]["evaluated_tokens"].as_u64().expect("evaluated tokens"))
}

#[test]
fn stopped_and_killed_nodes_lose_sessions_without_losing_turns() {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../cluster-venv");
    let bin = Binaries::install(&venv).unwrap_or_else(|e| panic!("installing etcd for the cluster tests: {e}"));
    let etcd = EtcdCluster::start(&bin, 1).expect("etcd");
    let store = tempfile::tempdir().expect("tempdir");
    let a = start(store.path(), &etcd.endpoint_list(), "a");
    let b = start(store.path(), &etcd.endpoint_list(), "b");
    let c = start(store.path(), &etcd.endpoint_list(), "c");

    let mut conv = vec![json!({"role": "user", "content": "Who was Elizabeth?"})];
    let (status, first) = chat(&a, "s", &conv);
    assert_eq!(status, 200, "{first}");
    conv.extend([reply(&first), json!({"role": "user", "content": "And her sister?"})]);
    let (status, forwarded) = chat(&b, "s", &conv);
    assert_eq!(status, 200, "b forwards the turn to a, the owner: {forwarded}");
    assert_eq!(forwarded["driftwood"]["restored"], false, "a ran it on its live actor: {forwarded}");
    let first = forwarded;
    conv.extend([reply(&first), json!({"role": "user", "content": "Who did she marry?"})]);

    // Node a stopped past its lease: b (whose forwarded request waits for a until a's lease lapses, then is
    // answered 503) takes the session over from a's last commit.
    a.signal(libc::SIGSTOP);
    let (second, took) = until_served(&b, "s", &conv);
    eprintln!("SIGSTOP of the owner to the session's next turn on another node: {took:?}");
    assert_eq!(second["driftwood"]["restored"], true, "{second}");
    let (prompt, evaluated) = tokens(&second);
    assert!(prompt - evaluated >= tokens(&first).0, "turn 1 came from a's snapshot: {evaluated} of {prompt}");

    // Node a continued: it still believes it owns the session, but a turn sent to it does not run there: its
    // commit is fenced, its claim refused once it has seen its lease gone, or (claiming anew) it forwards
    // the turn to b. The session's history stays b's.
    a.signal(libc::SIGCONT);
    let body = json!({"model": "driftwood-mini", "messages": conv, "max_tokens": 12, "temperature": 0}).to_string();
    let (status, head, stale) = request_with_head(&a.addr, "POST", "/v1/chat/completions", "s", &body);
    let served_by_b = head.to_ascii_lowercase().contains(&format!("x-driftwood-served-by: http://{}", b.addr));
    assert!(
        matches!(status, 409 | 503) || (status == 200 && served_by_b),
        "a stale node must not run a turn of the session: {status} {head} {stale}"
    );
    eprintln!("the stale node's turn was answered {status} (run by b: {served_by_b})");
    let (_, cluster) = request(&b.addr, "GET", "/v1/cluster", "s", "");
    let cluster: Value = serde_json::from_str(&cluster).expect("JSON");
    let session = cluster["sessions"].as_array().expect("sessions").iter().find(|s| s["id"] == "s").expect("s");
    assert_eq!(session["owner"]["node"], "b", "{cluster}");

    // Node b killed: c continues from b's acknowledged turn 2.
    conv.extend([reply(&second), json!({"role": "user", "content": "What did Darcy say?"})]);
    drop(b);
    let (third, recovery) = until_served(&c, "s", &conv);
    eprintln!("kill -9 of the owner to the session's next turn on another node: {recovery:?}");
    let (prompt, evaluated) = tokens(&third);
    assert!(prompt - evaluated >= tokens(&second).0, "turn 2 came from b's snapshot: {evaluated} of {prompt}");
    drop(a);
    drop(c);
}
