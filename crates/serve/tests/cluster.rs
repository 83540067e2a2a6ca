//! Two nodes of one cluster (a real etcd, one shared snapshot folder) over loopback: a session runs on one
//! node at a time, another node forwards its requests there (and answers 409 naming the owner to a request
//! already forwarded once); the same new session sent to both nodes at once runs on one node only, one turn
//! at a time; a drained node's sessions continue on the other with the replies a single node
//! gives; a node whose lease lapsed (its renewals stopped, as under SIGSTOP) has its late commit refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driftwood_cluster::testkit::{Binaries, EtcdCluster};
use driftwood_serve::{ClusterConfig, ServeConfig, Server};
use serde_json::{Value, json};

/// One etcd member on loopback, from the binaries the tests install.
fn start_etcd() -> EtcdCluster {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../cluster-venv");
    let bin = Binaries::install(&venv).unwrap_or_else(|e| panic!("installing etcd for the cluster tests: {e}"));
    EtcdCluster::start(&bin, 1).expect("etcd")
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini")
}

fn config(store: String) -> ServeConfig {
    let mut c = ServeConfig::new(model_dir(), PathBuf::from(store));
    c.addr = "127.0.0.1:0".parse().expect("address");
    c.max_seq = 512;
    c.backend = driftwood_backend::BackendKind::Cpu;
    c
}

fn node(store: &Path, etcd: &str, id: &str) -> ServeConfig {
    let mut c = config(format!("file://{}", store.display()));
    let mut cluster = ClusterConfig::new(etcd);
    cluster.node_id = Some(id.to_string());
    cluster.lease_ttl = Duration::from_secs(2);
    c.cluster = Some(cluster);
    c
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// Sends a greedy chat turn of `session` to `server`: status, body, the owner header of a 409.
async fn chat(server: &Server, session: &str, messages: &[Value]) -> (u16, Value, Option<String>) {
    let (status, body, headers) = chat_with(server, session, messages, &[]).await;
    (status, body, header(&headers, "x-driftwood-owner"))
}

/// [`chat`] with extra request headers; answers the response's headers.
async fn chat_with(
    server: &Server,
    session: &str,
    messages: &[Value],
    extra: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 16, "temperature": 0});
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", server.addr()))
        .header("X-Session-Id", session)
        .json(&body);
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.expect("JSON body"), headers)
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn reply(body: &Value) -> String {
    body["choices"][0]["message"]["content"].as_str().expect("content").to_string()
}

async fn get(server: &Server, path: &str) -> String {
    let url = format!("http://{}{path}", server.addr());
    reqwest::get(url).await.expect("request sent").text().await.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_sessions_one_at_a_time() {
    let etcd = start_etcd();
    let shared = tempfile::tempdir().expect("tempdir");
    let alone = tempfile::tempdir().expect("tempdir");
    let a = Server::start(node(shared.path(), &etcd.endpoint_list(), "a")).await.expect("node a starts");
    let b = Server::start(node(shared.path(), &etcd.endpoint_list(), "b")).await.expect("node b starts");
    let single = Server::start(config(alone.path().display().to_string())).await.expect("single node starts");

    // Turn 1 on node a, and the same conversation on a single node.
    let turn1 = vec![user("Who made the world?")];
    let (status, first, _) = chat(&a, "conv", &turn1).await;
    assert_eq!(status, 200, "{first}");
    let (_, expected1, _) = chat(&single, "conv", &turn1).await;
    assert_eq!(reply(&first), reply(&expected1));

    // Node b forwards the session's next turn to a, which owns it; the reply is a single node's.
    let turn2 = vec![turn1[0].clone(), assistant(&reply(&first)), user("And what did he make next?")];
    let (status, second, headers) = chat_with(&b, "conv", &turn2, &[]).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(header(&headers, "x-driftwood-served-by"), Some(format!("http://{}", a.addr())));
    assert_eq!(second["driftwood"]["restored"], false, "a ran turn 2 on its live actor");
    let (_, expected2, _) = chat(&single, "conv", &turn2).await;
    assert_eq!(reply(&second), reply(&expected2));
    assert_eq!(metric(&b, "driftwood_cluster_forwarded_total").await, 1.0);
    // A request another node forwarded already is not forwarded again: b names the owner instead.
    let (status, refused, headers) = chat_with(&b, "conv", &turn2, &[("x-driftwood-forwarded", "x")]).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "session_owned");
    assert_eq!(header(&headers, "x-driftwood-owner"), Some(format!("http://{}", a.addr())));

    // A new session sent to both nodes at once runs on one node: the loser of the claim forwards its
    // request to the winner, which runs it after the first turn or refuses it while that one runs.
    let race = vec![user("Tell me of the sea.")];
    let (on_a, on_b) = tokio::join!(chat_with(&a, "race", &race, &[]), chat_with(&b, "race", &race, &[]));
    let mut ran = 0;
    let mut runners = Vec::new();
    for (answer, here) in [(&on_a, &a), (&on_b, &b)] {
        match answer.0 {
            200 => {
                ran += 1;
                runners.push(header(&answer.2, "x-driftwood-served-by").unwrap_or(format!("http://{}", here.addr())));
            }
            409 => assert_eq!(answer.1["error"]["code"], "session_busy", "{}", answer.1),
            other => panic!("unexpected {other}: {}", answer.1),
        }
    }
    assert!(ran >= 1, "{} / {}", on_a.1, on_b.1);
    runners.dedup();
    assert_eq!(runners.len(), 1, "both nodes ran the session: {runners:?}");
    let owner_addr = &runners[0];
    let owner = if *owner_addr == format!("http://{}", a.addr()) { &a } else { &b };
    let info: Value = serde_json::from_str(&get(owner, "/v1/sessions/race").await).expect("JSON");
    assert_eq!(info["turns"], ran, "every answered turn ran on the owner: {info}");

    let status: Value = serde_json::from_str(&get(&b, "/v1/cluster").await).expect("JSON");
    let nodes: Vec<&str> = status["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["id"].as_str()).collect();
    assert_eq!(nodes, ["a", "b"], "{status}");
    let conv = status["sessions"].as_array().expect("sessions").iter().find(|s| s["id"] == "conv").expect("conv");
    assert_eq!(conv["owner"]["node"], "a", "{status}");
    let info: Value = serde_json::from_str(&get(&b, "/v1/sessions/conv").await).expect("JSON");
    assert_eq!(info["owner"]["node"], "a", "another node's session is described from etcd: {info}");

    // Draining a: its sessions are committed and released, and continue on b from a's last turn.
    let started = Instant::now();
    a.shutdown().await.expect("node a drains");
    eprintln!("drain of a node with 2 sessions: {:?}", started.elapsed());
    let turn3 = vec![turn2[0].clone(), turn2[1].clone(), turn2[2].clone(), assistant(&reply(&second)), user("Why?")];
    let (status, third, _) = chat(&b, "conv", &turn3).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(third["driftwood"]["restored"], true, "b continues from a's snapshot");
    let prompt = third["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    let evaluated = third["driftwood"]["evaluated_tokens"].as_u64().expect("evaluated tokens");
    let second_prompt = second["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert!(prompt - evaluated >= second_prompt, "turn 2 comes from the snapshot: {evaluated} of {prompt} evaluated");
    let (_, expected3, _) = chat(&single, "conv", &turn3).await;
    assert_eq!(reply(&third), reply(&expected3), "the moved session answers as a single node does");

    for name in ["driftwood_cluster_claims_total", "driftwood_cluster_commits_total"] {
        assert!(metric(&b, name).await >= 1.0, "{name}");
    }

    // Node b stops renewing its lease (as if SIGSTOPped) and c takes the session over after the TTL; b, which
    // still believes it owns the session, runs a turn but its commit is refused, so the turn is not kept.
    let c = Server::start(node(shared.path(), &etcd.endpoint_list(), "c")).await.expect("node c starts");
    let b_node = b.node().expect("b is a node");
    b_node.suspend_keepalive();
    let started = Instant::now();
    while c.node().expect("c is a node").owner("conv").await.expect("owner").is_some() {
        assert!(started.elapsed() < Duration::from_secs(15), "b's lease outlived its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut turn4 = turn3.clone();
    turn4.extend([assistant(&reply(&third)), user("Who else?")]);
    let (status, fourth, _) = chat(&c, "conv", &turn4).await;
    assert_eq!(status, 200, "{fourth}");
    let (status, stale, _) = chat(&b, "conv", &turn4).await;
    assert_eq!((status, stale["error"]["code"].as_str()), (409, Some("session_moved")), "{stale}");
    assert_eq!(metric(&b, "driftwood_cluster_fenced_total").await, 1.0);
    // b forgot its claim with the refused turn: its next request finds the session c's (and, forwarded
    // already, is not forwarded again).
    let (status, refused, headers) = chat_with(&b, "conv", &turn4, &[("x-driftwood-forwarded", "x")]).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("session_owned")), "{refused}");
    assert_eq!(header(&headers, "x-driftwood-owner"), Some(format!("http://{}", c.addr())));
    let status: Value = serde_json::from_str(&get(&c, "/v1/cluster").await).expect("JSON");
    let conv = status["sessions"].as_array().expect("sessions").iter().find(|s| s["id"] == "conv").expect("conv");
    let fence = conv["owner"]["fence"].as_u64().expect("fence");
    assert_eq!(conv["owner"]["node"], "c", "{status}");
    assert!(conv["snapshot"].as_str().expect("snapshot").starts_with(&format!("conv/{fence}-")), "{status}");
    let (_, expected4, _) = chat(&single, "conv", &turn4).await;
    assert_eq!(reply(&fourth), reply(&expected4), "the history stays the one c continued");

    c.shutdown().await.expect("node c drains");
    b.shutdown().await.expect("node b drains");
    single.shutdown().await.expect("single node stops");
}

/// The value of counter `name` on `server`'s `/metrics`.
async fn metric(server: &Server, name: &str) -> f64 {
    let text = get(server, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from\n{text}"))
}

/// `POST` or `DELETE` to `path` on `server` with an optional bearer token: status and JSON body.
async fn admin(server: &Server, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", server.addr()));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("request sent");
    (resp.status().as_u16(), resp.json().await.expect("JSON body"))
}

/// The owner of every session `/v1/cluster` lists, by session id.
async fn owners(server: &Server) -> Vec<(String, Option<String>)> {
    let status: Value = serde_json::from_str(&get(server, "/v1/cluster").await).expect("JSON");
    let sessions = status["sessions"].as_array().expect("sessions");
    sessions
        .iter()
        .map(|s| (s["id"].as_str().unwrap_or("").to_string(), s["owner"]["node"].as_str().map(String::from)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_go_to_the_least_loaded_node_and_a_drained_node_hands_its_sessions_over() {
    let etcd = start_etcd();
    let shared = tempfile::tempdir().expect("tempdir");
    let with_token = |id: &str| {
        let mut c = node(shared.path(), &etcd.endpoint_list(), id);
        c.cluster.as_mut().expect("cluster").admin_token = Some(format!("secret-{id}"));
        c
    };
    let a = Server::start(with_token("a")).await.expect("node a starts");
    let b = Server::start(node(shared.path(), &etcd.endpoint_list(), "b")).await.expect("node b starts");
    // a started before b: let it read b's load now rather than at its next refresh.
    a.sessions().refresh_placement().await;

    // Six new sessions, all sent to a: a keeps a new one while b owns no fewer, else places it on b.
    let first = vec![user("Who made the world?")];
    for i in 0..6 {
        let (status, body, headers) = chat_with(&a, &format!("s{i}"), &first, &[]).await;
        assert_eq!(status, 200, "{body}");
        let placed = header(&headers, "x-driftwood-served-by").is_some();
        assert_eq!(placed, i % 2 == 1, "session s{i}: {headers:?}");
    }
    let owned_by = |owners: &[(String, Option<String>)], node: &str| {
        owners.iter().filter(|(_, o)| o.as_deref() == Some(node)).count()
    };
    let before = owners(&a).await;
    assert_eq!((owned_by(&before, "a"), owned_by(&before, "b")), (3, 3), "{before:?}");
    assert_eq!(metric(&a, "driftwood_cluster_placed_total").await, 3.0);

    // The admin endpoint wants a's token; b has none, so its endpoint is off.
    assert_eq!(admin(&a, reqwest::Method::POST, "/v1/admin/drain", None).await.0, 401);
    assert_eq!(admin(&a, reqwest::Method::POST, "/v1/admin/drain", Some("secret-b")).await.0, 401);
    let (status, off) = admin(&b, reqwest::Method::POST, "/v1/admin/drain", Some("secret-b")).await;
    assert_eq!((status, off["error"]["code"].as_str()), (404, Some("admin_disabled")), "{off}");

    // Drain a: its three sessions are released, and every next turn, sent to a, runs on b from its snapshot.
    let (status, drained) = admin(&a, reqwest::Method::POST, "/v1/admin/drain", Some("secret-a")).await;
    assert_eq!(status, 200, "{drained}");
    assert_eq!(drained["released"], 3, "{drained}");
    eprintln!("drain of a node with 3 sessions: {} s", drained["seconds"]);
    assert_eq!(owned_by(&owners(&a).await, "a"), 0);
    for i in 0..6 {
        let (_, body, _) = chat(&a, &format!("s{i}"), &first).await;
        let turn2 = vec![first[0].clone(), assistant(&reply(&body)), user("And then?")];
        let (status, second, headers) = chat_with(&a, &format!("s{i}"), &turn2, &[]).await;
        assert_eq!(status, 200, "{second}");
        assert_eq!(header(&headers, "x-driftwood-served-by"), Some(format!("http://{}", b.addr())), "s{i}");
    }
    let after = owners(&a).await;
    assert_eq!(owned_by(&after, "b"), 6, "{after:?}");

    // Drain ended: a takes new sessions again (b owns 6, a none).
    assert_eq!(admin(&a, reqwest::Method::DELETE, "/v1/admin/drain", Some("secret-a")).await.0, 200);
    let (status, body, headers) = chat_with(&a, "fresh", &first, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-driftwood-served-by"), None, "a runs a new session itself again");

    a.shutdown().await.expect("node a stops");
    b.shutdown().await.expect("node b stops");
}
