//! `driftwood serve` as a process: two turns, SIGKILL, a restart on the same store, and turn 3 continues the
//! conversation from the session's snapshot, evaluating only the new message.

mod support;

use serde_json::{Value, json};
use support::serve::{reply, request, spawn_serve};

fn chat(addr: &str, session: &str, messages: &[Value]) -> Value {
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 16, "temperature": 0});
    let (status, body) = request(addr, "POST", "/v1/chat/completions", session, &body.to_string());
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
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
    let (mut server, addr) = spawn_serve([std::ffi::OsStr::new("--store"), store.path().as_os_str()]);
    // A session that is never interrupted, for comparison.
    let control_conv = two_turns(&addr, "control");
    let control = chat(&addr, "control", &control_conv);
    let conv = two_turns(&addr, "killed");
    assert_eq!(conv, control_conv, "greedy turns are deterministic");
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");

    let (mut server, addr) = spawn_serve([std::ffi::OsStr::new("--store"), store.path().as_os_str()]);
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
