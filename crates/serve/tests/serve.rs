//! The server over loopback with a real HTTP client: multi-turn sessions that evaluate only new tokens,
//! restore after a restart, streaming, forced hibernation, bad input, and an actor that traps.

use std::path::PathBuf;
use std::time::Duration;

use driftwood_serve::{ServeConfig, Server};
use serde_json::{Value, json};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini")
}

fn config(store: &std::path::Path) -> ServeConfig {
    let mut c = ServeConfig::new(model_dir(), store.to_path_buf());
    c.addr = "127.0.0.1:0".parse().expect("address");
    c.max_seq = 512;
    c.backend = driftwood_backend::BackendKind::Cpu;
    c
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(server: &Server) -> Self {
        Client { http: reqwest::Client::new(), base: format!("http://{}", server.addr()) }
    }

    async fn post(&self, path: &str, session: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(s) = session {
            req = req.header("X-Session-Id", s);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.base)).send().await.expect("request sent");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// Sends a chat turn; returns the assistant's reply and the whole response.
    async fn chat(&self, session: &str, messages: &[Value]) -> (String, Value) {
        let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 24, "temperature": 0});
        let (status, resp) = self.post("/v1/chat/completions", Some(session), &body).await;
        assert_eq!(status, 200, "{resp}");
        let reply = resp["choices"][0]["message"]["content"].as_str().expect("content").to_string();
        (reply, resp)
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from\n{text}"))
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// Tokens a turn on `after` must evaluate when the actor already holds the prompt of `before` (a
/// conversation ending with the user's message) and the reply it generated (`after[before.len()]`): the
/// template's end of that reply and the new message.
fn new_message_tokens(before: &[Value], after: &[Value]) -> usize {
    let model = driftwood_engine::Model::load(&model_dir(), &mut |_| {}).expect("model");
    let msgs = |v: &[Value]| -> Vec<driftwood_engine::ChatMessage> {
        serde_json::from_value(Value::Array(v.to_vec())).expect("messages")
    };
    let reply = after[before.len()]["content"].as_str().expect("the reply follows `before`");
    let old = model.render_chat(&msgs(before), true).expect("render") + reply;
    let new = model.render_chat(&msgs(after), true).expect("render");
    let suffix = new.strip_prefix(old.as_str()).expect("the template renders a conversation as a prefix");
    model.tokenize(suffix, false).expect("tokenize").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_turns_across_a_restart_evaluate_only_new_messages() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let client = Client::new(&server);

    let mut conv = vec![user("Who was Elizabeth?")];
    let (r1, resp1) = client.chat("alice", &conv).await;
    assert_eq!(resp1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    conv.push(assistant(&r1));
    conv.push(user("And her sister?"));
    let (r2, resp2) = client.chat("alice", &conv).await;
    // Turn 2 reuses turn 1's prompt and reply from the actor's cache and evaluates only the new message.
    let cached = resp2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached");
    let t1 = &resp1["usage"];
    assert_eq!(cached, t1["prompt_tokens"].as_u64().unwrap() + t1["completion_tokens"].as_u64().unwrap());
    assert_eq!(resp2["driftwood"]["evaluated_tokens"], new_message_tokens(&conv[..1], &conv) as u64);
    conv.push(assistant(&r2));
    conv.push(user("What did Darcy say?"));

    // The same conversation in a session that never restarts, for comparison.
    let mut control = vec![user("Who was Elizabeth?")];
    let (c1, _) = client.chat("control", &control).await;
    assert_eq!(c1, r1, "greedy turns are deterministic");
    control.extend([assistant(&c1), user("And her sister?")]);
    let (c2, _) = client.chat("control", &control).await;
    control.extend([assistant(&c2), user("What did Darcy say?")]);
    let (c3, _) = client.chat("control", &control).await;

    let saved = server.shutdown().await.expect("graceful shutdown");
    assert_eq!(saved, 2, "both live actors are snapshotted at shutdown");

    let server = Server::start(config(store.path())).await.expect("server restarts");
    let client = Client::new(&server);
    let (_, info) = client.get("/v1/sessions/alice").await;
    assert!(info.contains("\"hibernated\":true"), "{info}");
    let (r3, resp3) = client.chat("alice", &conv).await;
    assert_eq!(resp3["driftwood"]["restored"], true);
    assert_eq!(r3, c3, "turn 3 continues the same conversation");
    let expected = new_message_tokens(&conv[..3], &conv) as u64;
    assert_eq!(resp3["driftwood"]["evaluated_tokens"], expected, "{resp3}");
    let (_, metrics) = client.get("/metrics").await;
    assert_eq!(metric(&metrics, "driftwood_sessions_restored_total"), 1.0);
    assert_eq!(metric(&metrics, "driftwood_prefill_tokens_total"), expected as f64);
    let saved_tokens = resp3["usage"]["prompt_tokens"].as_u64().unwrap() - expected;
    assert_eq!(metric(&metrics, "driftwood_restore_prefill_tokens_saved_total"), saved_tokens as f64);
    assert_eq!(metric(&metrics, "driftwood_restore_seconds_count"), 1.0);
    assert_eq!(metric(&metrics, "driftwood_copy_ledger_bytes{kind=\"tensor\"}"), 0.0);
    // Decode steps go through the batcher (on by default); one session at a time makes passes of one.
    let passes = metric(&metrics, "driftwood_decode_batch_size_count");
    let completion = resp3["usage"]["completion_tokens"].as_u64().unwrap() as f64;
    assert!(passes > 0.0 && passes <= completion, "{passes} decode passes for {completion} tokens");
    assert_eq!(metric(&metrics, "driftwood_decode_batch_size_sum"), passes);
    assert_eq!(metric(&metrics, "driftwood_decode_batch_size_bucket{le=\"1\"}"), passes);
    assert_eq!(metric(&metrics, "driftwood_batched_decode_passes_total"), 0.0);
    let pass_seconds = metric(&metrics, "driftwood_decode_pass_seconds_total");
    assert!(pass_seconds > 0.0 && pass_seconds.is_finite(), "{pass_seconds} s in decode passes");
    server.shutdown().await.expect("shutdown");
}

/// Reads a server-sent event stream to its end; returns the `data:` payloads.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("stream");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_the_plain_answer() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let client = Client::new(&server);
    let conv = [user("Tell me of the king.")];
    let (plain, _) = client.chat("plain", &conv).await;

    let body = json!({"model": "driftwood-mini", "messages": conv, "max_tokens": 24, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let resp = client
        .http
        .post(format!("{}/v1/chat/completions", client.base))
        .header("X-Session-Id", "streamed")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("chunk")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, plain);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert!(usage["completion_tokens"].as_u64().expect("usage") > 0);

    // Completions stream too.
    let body = json!({"model": "driftwood-mini", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": true});
    let resp = client.http.post(format!("{}/v1/completions", client.base)).json(&body).send().await.expect("sent");
    let events = sse(resp).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk"))
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let body = json!({"model": "driftwood-mini", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    let (status, resp) = client.post("/v1/completions", None, &body).await;
    assert_eq!(status, 200);
    assert_eq!(resp["choices"][0]["text"].as_str(), Some(streamed.as_str()));
    assert_eq!(resp["usage"]["completion_tokens"], 8);
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_hibernation_restores_every_turn() {
    let store = tempfile::tempdir().expect("tempdir");
    let mut c = config(store.path());
    c.hibernate_after = Duration::ZERO;
    let server = Server::start(c).await.expect("server starts");
    let client = Client::new(&server);
    let mut conv = vec![user("Who was Elizabeth?")];
    for turn in 0..3 {
        let (reply, resp) = client.chat("sleepy", &conv).await;
        assert_eq!(resp["driftwood"]["restored"], turn > 0, "turn {turn}");
        if turn > 0 {
            assert!(resp["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
        }
        conv.extend([assistant(&reply), user("Go on.")]);
    }
    let (_, metrics) = client.get("/metrics").await;
    assert_eq!(metric(&metrics, "driftwood_sessions_restored_total"), 2.0);
    assert_eq!(metric(&metrics, "driftwood_actors_active"), 0.0);
    assert_eq!(metric(&metrics, "driftwood_actors_hibernated"), 1.0);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_openai_errors() {
    let store = tempfile::tempdir().expect("tempdir");
    let mut c = config(store.path());
    c.max_seq = 64;
    let server = Server::start(c).await.expect("server starts");
    let client = Client::new(&server);
    let check = |(status, body): (u16, Value), want: u16, code: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
    };
    check(client.raw("/v1/chat/completions", "{\"model\": ").await, 400, "invalid_json");
    check(client.raw("/v1/chat/completions", "[1, 2]").await, 400, "invalid_json");
    let chat = |extra: Value| {
        let mut body = json!({"model": "driftwood-mini", "messages": [user("hi")], "max_tokens": 4});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    check(client.post("/v1/chat/completions", None, &chat(json!({"model": "gpt-9"}))).await, 404, "model_not_found");
    for bad in [
        json!({"max_tokens": -1}),
        json!({"max_tokens": 1_000_000}),
        json!({"temperature": -0.5}),
        json!({"temperature": 1e9}),
        json!({"top_p": 7}),
        json!({"n": 2}),
        json!({"messages": []}),
        json!({"messages": [{"role": "robot", "content": "x"}]}),
    ] {
        check(client.post("/v1/chat/completions", None, &chat(bad)).await, 400, "invalid_value");
    }
    let long = "the king ".repeat(200);
    check(
        client.post("/v1/chat/completions", None, &chat(json!({"messages": [user(&long)]}))).await,
        400,
        "context_length_exceeded",
    );
    check(client.post("/v1/chat/completions", Some("no/slashes"), &chat(json!({}))).await, 400, "invalid_session_key");
    check(
        client.post("/v1/chat/completions", Some("a"), &chat(json!({"session_id": "b"}))).await,
        400,
        "invalid_session_key",
    );
    let (status, body) = client.get("/v1/sessions/never-seen").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("session_not_found"));
    let resp = client.http.delete(format!("{}/v1/sessions/never-seen", client.base)).send().await.expect("sent");
    assert_eq!(resp.status(), 404);
    // A good request still works, and the session can be ended.
    let (status, _) = client.post("/v1/chat/completions", Some("fine"), &chat(json!({}))).await;
    assert_eq!(status, 200);
    let resp = client.http.delete(format!("{}/v1/sessions/fine", client.base)).send().await.expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(client.get("/v1/sessions/fine").await.0, 404);
    let (status, body) = client.get("/v1/models").await;
    assert_eq!(status, 200);
    assert!(body.contains("driftwood-mini"));
    assert_eq!(client.get("/health").await.0, 200);
    let (_, metrics) = client.get("/metrics").await;
    assert!(metrics.contains("driftwood_requests_total{endpoint=\"chat_completions\",status=\"400\"}"), "{metrics}");
    server.shutdown().await.expect("shutdown");
}

/// A module that speaks the serving protocol with do-nothing calls, plus `imports` (first: the text format
/// puts imports before definitions) and `defs`, which define `chat_messages` and `generate`.
fn protocol_actor(imports: &str, defs: &str) -> Vec<u8> {
    format!(
        r#"(module {imports}
  (memory (export "memory") 2)
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
  (func (export "stat") (param i32) (result i32) i32.const 0)
  {defs})"#
    )
    .into_bytes()
}

/// An actor that follows the serving protocol but traps in `chat_messages` and never returns from
/// `generate`; `exports` adds more.
fn faulty_actor(exports: &str) -> Vec<u8> {
    protocol_actor(
        "",
        &format!(
            r#"{exports}
  (func (export "chat_messages") (param i32 i32 i32) (result i32) unreachable)
  (func (export "generate") (param i32 i32 i32) (result i32) (loop $spin br $spin) i32.const 0)"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_actor_gets_a_500_and_the_server_keeps_serving() {
    let store = tempfile::tempdir().expect("tempdir");
    let mut c = config(store.path());
    c.actor_wasm = Some(faulty_actor(""));
    c.limits.deadline = Duration::from_millis(300);
    let server = Server::start(c).await.expect("server starts");
    let client = Client::new(&server);
    let body = json!({"model": "driftwood-mini", "messages": [user("hi")], "max_tokens": 4});
    let (status, resp) = client.post("/v1/chat/completions", Some("t1"), &body).await;
    assert_eq!(status, 500, "{resp}");
    assert_eq!(resp["error"]["code"], "actor_trap");
    assert!(resp["error"]["message"].as_str().unwrap().contains("unreachable"), "{resp}");
    let body = json!({"model": "driftwood-mini", "prompt": "hi", "max_tokens": 4});
    let (status, resp) = client.post("/v1/completions", Some("t2"), &body).await;
    assert_eq!(status, 500, "{resp}");
    assert!(resp["error"]["message"].as_str().unwrap().contains("deadline"), "{resp}");
    assert_eq!(client.get("/health").await.0, 200);
    let (_, metrics) = client.get("/metrics").await;
    assert_eq!(metric(&metrics, "driftwood_actor_traps_total"), 2.0);
    server.shutdown().await.expect("shutdown");

    // A module without the protocol is refused at start, naming what is missing.
    let mut c = config(store.path());
    c.actor_wasm = Some(
        br#"(module (memory (export "memory") 1) (func (export "driftwood_abi_version") (result i32) i32.const 1))"#
            .to_vec(),
    );
    let err = Server::start(c).await.err().expect("refused");
    assert!(err.to_string().contains("alloc"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_on_a_busy_session_is_refused_with_409() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let claim = server.sessions().claim("busy").expect("first claim");
    let client = Client::new(&server);
    let body = json!({"model": "driftwood-mini", "messages": [user("hi")], "max_tokens": 4});
    let (status, resp) = client.post("/v1/chat/completions", Some("busy"), &body).await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"]["code"], "session_busy");
    drop(claim);
    let (status, _) = client.post("/v1/chat/completions", Some("busy"), &body).await;
    assert_eq!(status, 200);
    server.shutdown().await.expect("shutdown");
}

/// Every metric `/metrics` exposed when its text was written by hand, with its type.
const METRICS: &[(&str, &str)] = &[
    ("driftwood_prompt_tokens_total", "counter"),
    ("driftwood_prefill_tokens_total", "counter"),
    ("driftwood_prefill_tokens_saved_total", "counter"),
    ("driftwood_restore_prefill_tokens_saved_total", "counter"),
    ("driftwood_completion_tokens_total", "counter"),
    ("driftwood_sessions_restored_total", "counter"),
    ("driftwood_actors_hibernated_total", "counter"),
    ("driftwood_snapshots_written_total", "counter"),
    ("driftwood_actor_traps_total", "counter"),
    ("driftwood_cluster_claims_total", "counter"),
    ("driftwood_cluster_commits_total", "counter"),
    ("driftwood_cluster_fenced_total", "counter"),
    ("driftwood_cluster_owned_elsewhere_total", "counter"),
    ("driftwood_cluster_forwarded_total", "counter"),
    ("driftwood_cluster_placed_total", "counter"),
    ("driftwood_batched_decode_passes_total", "counter"),
    ("driftwood_batched_decode_sequences_total", "counter"),
    ("driftwood_decode_pass_seconds_total", "counter"),
    ("driftwood_requests_rejected_total", "counter"),
    ("driftwood_requests_total", "counter"),
    ("driftwood_actors_active", "gauge"),
    ("driftwood_actors_hibernated", "gauge"),
    ("driftwood_queue_waiting", "gauge"),
    ("driftwood_copy_ledger_bytes", "counter"),
    ("driftwood_restore_seconds", "histogram"),
    ("driftwood_decode_batch_size", "histogram"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposes_every_metric_name_and_type() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let client = Client::new(&server);
    client.chat("metrics", &[user("Hello")]).await;
    let resp = client.http.get(format!("{}/metrics", client.base)).send().await.expect("request sent");
    assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4");
    let text = resp.text().await.expect("body");
    for (name, kind) in METRICS {
        assert!(text.lines().any(|l| l == format!("# TYPE {name} {kind}")), "{name} is not a {kind} in\n{text}");
        assert!(text.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "{name} has no help in\n{text}");
        let samples = text.lines().filter(|l| !l.starts_with('#') && l.starts_with(name)).count();
        assert!(samples > 0, "{name} has no sample in\n{text}");
    }
    // Nothing else: each family is one of the above (a histogram's samples carry suffixes).
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).expect("a name");
        assert!(METRICS.iter().any(|(n, _)| *n == name), "unexpected metric {name}");
    }
    assert_eq!(metric(&text, "driftwood_requests_rejected_total{reason=\"queue_full\"}"), 0.0);
    assert_eq!(metric(&text, "driftwood_requests_total{endpoint=\"chat_completions\",status=\"200\"}"), 1.0);
    assert_eq!(metric(&text, "driftwood_restore_seconds_bucket{le=\"+Inf\"}"), 0.0);
    assert_eq!(metric(&text, "driftwood_snapshots_written_total"), 1.0);
    server.shutdown().await.expect("clean shutdown");
}

/// The model's next-token distribution computed on the host, independently of the server and its actor:
/// the engine's forward pass on the CPU over a bf16 KV cache (the dtype the host recommends the actor),
/// prefill of the prompt then one token at a time, as the actor runs it; log-softmax in f64.
struct Reference {
    model: driftwood_engine::Model,
    dev: driftwood_backend::Device,
    kv: Vec<u32>,
    logits: Vec<f32>,
    scratch: driftwood_engine::Scratch,
    pos: usize,
}

const REFERENCE_MAX_SEQ: usize = 512;

impl Reference {
    fn new() -> Self {
        let model = driftwood_engine::Model::load(&model_dir(), &mut |_| {}).expect("model");
        let bytes = model.kv_bytes(REFERENCE_MAX_SEQ, driftwood_backend::DType::BF16);
        let vocab = model.config().vocab_size;
        Reference {
            model,
            dev: driftwood_backend::Device::cpu(),
            kv: vec![0u32; bytes.div_ceil(4)],
            logits: vec![0.0; vocab],
            scratch: Default::default(),
            pos: 0,
        }
    }

    /// Evaluates `tokens`; returns the log-softmax of the next-token logits.
    fn feed(&mut self, tokens: &[u32]) -> Vec<f64> {
        // SAFETY: `kv` holds the cache's bytes, 4-byte aligned, used by nothing else while the view lives.
        let mut kv = unsafe {
            driftwood_engine::KvCache::from_raw_parts_typed(
                self.kv.as_mut_ptr().cast(),
                driftwood_backend::DType::BF16,
                &self.model,
                REFERENCE_MAX_SEQ,
            )
        };
        let logits = driftwood_backend::TensorMut::from_f32(&mut self.logits);
        self.model.forward(&self.dev, &mut kv, self.pos, tokens, logits, &mut self.scratch).expect("forward");
        self.pos += tokens.len();
        let max = self.logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
        let lse = max + self.logits.iter().map(|&l| (f64::from(l) - max).exp()).sum::<f64>().ln();
        self.logits.iter().map(|&l| f64::from(l) - lse).collect()
    }

    fn text(&self, token: u32) -> String {
        self.model.detokenize(&[token], false).expect("detokenize")
    }
}

/// The chat prompt's tokens as the actor evaluates them.
fn chat_prompt(reference: &Reference, messages: &[Value]) -> Vec<u32> {
    let msgs: Vec<driftwood_engine::ChatMessage> =
        serde_json::from_value(Value::Array(messages.to_vec())).expect("messages");
    let rendered = reference.model.render_chat(&msgs, true).expect("render");
    reference.model.tokenize(&rendered, false).expect("tokenize")
}

/// Checks a chat response's `logprobs.content` against the reference, token by token: each reported token
/// is one whose reference log-probability equals the reported one within 1e-4 (greedy: the argmax), the
/// alternatives are sorted, hold the chosen token when it ranks among them, and equal the reference's most
/// likely tokens. Returns the token ids.
fn check_against_reference(
    reference: &mut Reference,
    prompt: &[u32],
    content: &[Value],
    top: usize,
    greedy: bool,
) -> Vec<u32> {
    let mut lp = reference.feed(prompt);
    let mut ids = vec![];
    for (i, entry) in content.iter().enumerate() {
        let reported = entry["logprob"].as_f64().expect("logprob");
        let text = entry["token"].as_str().expect("token");
        assert_eq!(entry["bytes"], json!(text.as_bytes()), "{entry}");
        let id = if greedy {
            let best = (0..lp.len()).max_by(|&a, &b| lp[a].total_cmp(&lp[b]).then(b.cmp(&a))).expect("a vocabulary");
            best as u32
        } else {
            (0..lp.len() as u32)
                .find(|&t| (lp[t as usize] - reported).abs() <= 1e-4 && reference.text(t) == text)
                .unwrap_or_else(|| panic!("token {i} ({text:?}, {reported}) has no match in the reference"))
        };
        assert_eq!(reference.text(id), text, "token {i}");
        assert!((lp[id as usize] - reported).abs() <= 1e-4, "token {i}: {reported} against {}", lp[id as usize]);
        let alts = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(alts.len(), top, "{entry}");
        let values: Vec<f64> = alts.iter().map(|a| a["logprob"].as_f64().expect("logprob")).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "sorted, most likely first: {values:?}");
        let mut order: Vec<usize> = (0..lp.len()).collect();
        order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
        for (k, alt) in alts.iter().enumerate() {
            assert!((values[k] - lp[order[k]]).abs() <= 1e-4, "token {i}, alternative {k}");
            // The text too, unless a neighbour ties (then either order is right).
            let tied =
                [k.wrapping_sub(1), k + 1].iter().any(|&j| j < top && (lp[order[j]] - lp[order[k]]).abs() < 1e-6);
            if !tied {
                assert_eq!(alt["token"], reference.text(order[k] as u32), "token {i}, alternative {k}");
            }
        }
        if order[..top].contains(&(id as usize)) {
            assert!(alts.iter().any(|a| a["token"] == text && a["logprob"] == entry["logprob"]), "token {i}: {entry}");
        }
        ids.push(id);
        lp = reference.feed(&[id]);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_models_log_softmax_at_each_chosen_token() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(store.path())).await.expect("server starts");
    let client = Client::new(&server);
    let messages = vec![user("Who was Elizabeth?")];

    // Greedy, non-streaming.
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 12, "temperature": 0,
                      "logprobs": true, "top_logprobs": 5});
    let (status, resp) = client.post("/v1/chat/completions", None, &body).await;
    assert_eq!(status, 200, "{resp}");
    let content = resp["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content").clone();
    assert_eq!(content.len() as u64, resp["usage"]["completion_tokens"].as_u64().expect("usage"), "{resp}");
    assert!(!content.is_empty());
    let mut reference = Reference::new();
    let prompt = chat_prompt(&reference, &messages);
    assert_eq!(prompt.len() as u64, resp["usage"]["prompt_tokens"].as_u64().expect("usage"));
    check_against_reference(&mut reference, &prompt, &content, 5, true);

    // Sampled at temperature 1.5: still the model's distribution, not the tempered one.
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 12, "temperature": 1.5,
                      "seed": 7, "logprobs": true, "top_logprobs": 3});
    let (status, resp) = client.post("/v1/chat/completions", None, &body).await;
    assert_eq!(status, 200, "{resp}");
    let sampled = resp["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content").clone();
    let mut reference = Reference::new();
    check_against_reference(&mut reference, &prompt, &sampled, 3, false);

    // Streaming gives the same tokens and values, spread over the chunks.
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 12, "temperature": 0,
                      "logprobs": true, "top_logprobs": 5, "stream": true});
    let events =
        client.http.post(format!("{}/v1/chat/completions", client.base)).json(&body).send().await.expect("sent");
    let streamed: Vec<Value> = sse(events)
        .await
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content);

    // Without logprobs, none; a session keeps working either way.
    let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 4, "temperature": 0});
    let (_, resp) = client.post("/v1/chat/completions", Some("lp"), &body).await;
    assert_eq!(resp["choices"][0]["logprobs"], Value::Null);

    // Completions: the legacy shape, offsets from the prompt's start.
    let prompt_text = "It is a truth universally acknowledged";
    let body =
        json!({"model": "driftwood-mini", "prompt": prompt_text, "max_tokens": 8, "temperature": 0, "logprobs": 3});
    let (status, resp) = client.post("/v1/completions", None, &body).await;
    assert_eq!(status, 200, "{resp}");
    let lp = &resp["choices"][0]["logprobs"];
    let tokens: Vec<&str> =
        lp["tokens"].as_array().expect("tokens").iter().map(|t| t.as_str().expect("text")).collect();
    assert_eq!(tokens.len() as u64, resp["usage"]["completion_tokens"].as_u64().expect("usage"));
    assert_eq!(tokens.concat(), resp["choices"][0]["text"].as_str().expect("text"));
    assert_eq!(lp["text_offset"][0], prompt_text.chars().count());
    let mut reference = Reference::new();
    let mut next = reference.feed(&reference.model.tokenize(prompt_text, true).expect("tokenize"));
    for (i, token) in tokens.iter().enumerate() {
        let best = (0..next.len()).max_by(|&a, &b| next[a].total_cmp(&next[b]).then(b.cmp(&a))).expect("vocabulary");
        assert_eq!(reference.text(best as u32), *token, "token {i}");
        let reported = lp["token_logprobs"][i].as_f64().expect("logprob");
        assert!((reported - next[best]).abs() <= 1e-4, "token {i}: {reported} against {}", next[best]);
        let alts = lp["top_logprobs"][i].as_object().expect("alternatives");
        assert!(!alts.is_empty() && alts.len() <= 3, "{alts:?}");
        assert_eq!(alts.get(*token).and_then(Value::as_f64), Some(reported), "the greedy token is the likeliest");
        next = reference.feed(&[best as u32]);
    }

    // Out of range or ill-typed: a 400 naming the parameter, and the server keeps serving.
    for (path, extra, param, says) in [
        ("/v1/chat/completions", json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", "from 0 to 20, got 21"),
        ("/v1/chat/completions", json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs", "from 0 to 20"),
        ("/v1/chat/completions", json!({"top_logprobs": 2}), "top_logprobs", "needs logprobs"),
        ("/v1/chat/completions", json!({"logprobs": "yes"}), "logprobs", "true or false"),
        ("/v1/completions", json!({"logprobs": 6}), "logprobs", "from 0 to 5, got 6"),
        ("/v1/completions", json!({"logprobs": true}), "logprobs", "from 0 to 5"),
    ] {
        let mut body = json!({"model": "driftwood-mini", "messages": messages, "prompt": "Hello", "max_tokens": 2});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, resp) = client.post(path, None, &body).await;
        assert_eq!(status, 400, "{path} {extra}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
        let message = resp["error"]["message"].as_str().expect("message");
        assert!(message.contains(says), "{path} {extra}: {message}");
    }
    let (status, _) = client.get("/health").await;
    assert_eq!(status, 200);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_protocol_version_is_checked() {
    let store = tempfile::tempdir().expect("tempdir");
    // A protocol-1 module serves requests without logprobs, and refuses those with them.
    let mut c = config(store.path());
    c.actor_wasm = Some(faulty_actor(""));
    let server = Server::start(c).await.expect("server starts");
    assert_eq!(server.sessions().protocol(), 1);
    let client = Client::new(&server);
    let body = json!({"model": "driftwood-mini", "messages": [user("hi")], "max_tokens": 4, "logprobs": true});
    let (status, resp) = client.post("/v1/chat/completions", Some("p1"), &body).await;
    assert_eq!((status, resp["error"]["code"].as_str()), (400, Some("unsupported_parameter")), "{resp}");
    assert!(resp["error"]["message"].as_str().expect("message").contains("protocol 1"), "{resp}");
    server.shutdown().await.expect("shutdown");

    // A later version, or version 2 without `set_logprobs`, is refused at start.
    for (exports, says) in [
        (
            r#"(func (export "serve_protocol") (result i32) i32.const 3) (func (export "set_logprobs") (param i32))"#,
            "protocol 3",
        ),
        (r#"(func (export "serve_protocol") (result i32) i32.const 2)"#, "set_logprobs"),
    ] {
        let mut c = config(store.path());
        c.actor_wasm = Some(faulty_actor(exports));
        let err = Server::start(c).await.err().expect("refused");
        assert!(err.to_string().contains(says), "{err}");
    }

    // A protocol-2 module that emits something else than a frame traps its turn, with a message saying so.
    let bad_frame = protocol_actor(
        r#"(import "driftwood" "emit" (func $emit (param i32 i32)))"#,
        r#"(data (i32.const 16) "Lnot a frame")
  (func (export "serve_protocol") (result i32) i32.const 2)
  (func (export "set_logprobs") (param i32))
  (func (export "chat_messages") (param i32 i32 i32) (result i32) (call $emit (i32.const 16) (i32.const 12)) i32.const 1)
  (func (export "generate") (param i32 i32 i32) (result i32) i32.const 0)"#,
    );
    let mut c = config(store.path());
    c.actor_wasm = Some(bad_frame);
    let server = Server::start(c).await.expect("server starts");
    assert_eq!(server.sessions().protocol(), 2);
    let client = Client::new(&server);
    let (status, resp) = client.post("/v1/chat/completions", Some("p2"), &body).await;
    assert_eq!((status, resp["error"]["code"].as_str()), (500, Some("actor_trap")), "{resp}");
    assert!(resp["error"]["message"].as_str().expect("message").contains("token frame"), "{resp}");
    assert_eq!(client.get("/health").await.0, 200);
    server.shutdown().await.expect("shutdown");
}
