//! What the server keeps for a turn is bounded by the actor's host allowance: the text of a plain response,
//! and streamed events a client has not read. An actor that emits past it traps (500 / an error event) and the
//! server keeps serving.

use std::path::PathBuf;
use std::time::Duration;

use driftwood_serve::{ServeConfig, Server};
use serde_json::{Value, json};

const MIB: usize = 1 << 20;

/// The serving protocol; `generate` and `chat_messages` emit 1 MiB of `a` 64 times.
fn emitter() -> Vec<u8> {
    format!(
        r#"(module
          (import "driftwood" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 32)
          (global $next (mut i32) (i32.const 1024))
          (func (export "driftwood_abi_version") (result i32) i32.const 1)
          (func (export "alloc") (param i32) (result i32) (local $p i32)
            global.get $next local.set $p
            global.get $next local.get 0 i32.add i32.const 8 i32.add global.set $next
            local.get $p)
          (func (export "dealloc") (param i32 i32))
          (func (export "init") (param i32))
          (func (export "set_sampling") (param f32 i32 f32 f32 f32 i64))
          (func (export "set_stop_list") (param i32 i32))
          (func $flood (result i32) (local $i i32)
            (memory.fill (i32.const 65536) (i32.const 97) (i32.const {MIB}))
            (loop $l (if (i32.lt_u (local.get $i) (i32.const 64)) (then
              (call $emit (i32.const 65536) (i32.const {MIB}))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $l))))
            (i32.const 1))
          (func (export "chat_messages") (param i32 i32 i32) (result i32) (call $flood))
          (func (export "generate") (param i32 i32 i32) (result i32) (call $flood))
          (func (export "stat") (param i32) (result i32) i32.const 0))"#
    )
    .into_bytes()
}

fn config(store: &std::path::Path) -> ServeConfig {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    let mut c = ServeConfig::new(dir, store.to_path_buf());
    c.addr = "127.0.0.1:0".parse().expect("address");
    c.max_seq = 128;
    c.backend = driftwood_backend::BackendKind::Cpu;
    c.actor_wasm = Some(emitter());
    c.limits.host_bytes = 4 * MIB;
    c
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_past_the_host_allowance_fails_alone() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    let http = reqwest::Client::new();
    // Traps are counted for sessions.
    let post =
        |path: &str, body: Value| http.post(format!("{base}{path}")).header("X-Session-Id", "flood").json(&body).send();

    // A plain response: the turn's text stops at 4 MiB.
    let resp = post("/v1/completions", json!({"model": "driftwood-mini", "prompt": "hi", "max_tokens": 4}))
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 500);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "actor_trap", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("host allowance"), "{body}");

    // A stream nobody reads: the unread events stop at 4 MiB.
    let stream =
        post("/v1/completions", json!({"model": "driftwood-mini", "prompt": "hi", "max_tokens": 4, "stream": true}))
            .await
            .expect("sent");
    assert_eq!(stream.status().as_u16(), 200);
    let traps = |text: &str| metric(text, "driftwood_actor_traps_total");
    let mut trapped = false;
    for _ in 0..600 {
        let text = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("body");
        if traps(&text) >= 2.0 {
            trapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trapped, "the streaming turn never hit the allowance");
    let text = stream.text().await.expect("stream");
    assert!(text.contains("host allowance") && text.contains("actor_trap"), "the stream ends with the error");
    assert!(text.len() < 64 * MIB, "the whole flood was queued");

    // The server still serves.
    let health = http.get(format!("{base}/health")).send().await.expect("health");
    assert_eq!(health.status().as_u16(), 200);
    server.shutdown().await.expect("shutdown");
}
