//! `driftwood serve` as a process: two turns, SIGKILL, a restart on the same store, and turn 3 continues the
//! conversation from the session's snapshot, evaluating only the new message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

/// Starts the server on a free loopback port; returns the process and its address.
fn start(store: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .args(["serve", "--addr", "127.0.0.1:0", "--backend", "cpu", "--max-seq", "256", "--store"])
        .arg(store)
        .stderr(Stdio::piped())
        .spawn()
        .expect("driftwood serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("the server prints its address").expect("stderr line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn request(addr: &str, method: &str, path: &str, session: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         X-Session-Id: {session}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, body.to_string())
}

fn chat(addr: &str, session: &str, messages: &[Value]) -> Value {
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 16, "temperature": 0});
    let (status, body) = request(addr, "POST", "/v1/chat/completions", session, &body.to_string());
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

fn reply(v: &Value) -> Value {
    json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]})
}

/// Turns 1 and 2 of a conversation on `session`; returns the messages for turn 3.
fn two_turns(addr: &str, session: &str) -> Vec<Value> {
    let mut conv = vec![json!({"role": "user", "content": "Who was Elizabeth?"})];
    let r1 = chat(addr, session, &conv);
    conv.extend([reply(&r1), json!({"role": "user", "content": "And her sister?"})]);
    let r2 = chat(addr, session, &conv);
    conv.extend([reply(&r2), json!({"role": "user", "content": "What did Darcy say?"})]);
    conv
}

#[test]
fn a_session_survives_kill_9_between_turns() {
    let store = tempfile::tempdir().expect("tempdir");
    let (mut server, addr) = start(store.path());
    // A session that is never interrupted, for comparison.
    let control_conv = two_turns(&addr, "control");
    let control = chat(&addr, "control", &control_conv);
    let conv = two_turns(&addr, "killed");
    assert_eq!(conv, control_conv, "greedy turns are deterministic");
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");

    let (mut server, addr) = start(store.path());
    let r3 = chat(&addr, "killed", &conv);
    assert_eq!(r3["driftwood"]["restored"], true, "{r3}");
    assert_eq!(r3["choices"][0]["message"], control["choices"][0]["message"], "turn 3 continues the conversation");
    // Only the new message is evaluated, exactly as in the session that was never interrupted.
    assert_eq!(r3["driftwood"]["evaluated_tokens"], control["driftwood"]["evaluated_tokens"], "{r3}");
    assert_eq!(r3["usage"], control["usage"]);
    let (_, metrics) = request(&addr, "GET", "/metrics", "killed", "");
    assert!(metrics.contains("\ndriftwood_sessions_restored_total 1\n"), "{metrics}");
    server.kill().expect("stop");
    let _ = server.wait();
}
