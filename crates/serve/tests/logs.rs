//! The server's logs with `RUST_LOG=info`: exactly one line per HTTP request, carrying the session id, the
//! prompt, completion and cached tokens, the latency and the status. The subscriber is the one
//! `driftwood serve` installs, writing into a buffer instead of standard error; this file holds one test,
//! since it sets the process's environment and global subscriber.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftwood_serve::{ServeConfig, Server};
use serde_json::{Value, json};
use tracing_subscriber::fmt::MakeWriter;

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'w self) -> Buffer {
        self.clone()
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }

    /// The request lines logged so far.
    fn request_lines(&self) -> Vec<String> {
        self.text().lines().filter(|l| l.contains("request_log: request ")).map(str::to_string).collect()
    }
}

/// The `key=value` fields of a log line (quotes around strings removed).
fn fields(line: &str) -> HashMap<String, String> {
    let (_, rest) = line.split_once("request_log: request ").unwrap_or_else(|| panic!("not a request line: {line}"));
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_info_writes_one_line_per_request_with_its_counts() {
    // SAFETY: this file's only test sets the variable before any thread of its own reads the environment.
    unsafe { std::env::set_var("RUST_LOG", "info") };
    let buffer = Buffer::default();
    let filter = driftwood_serve::logging::env_filter().expect("RUST_LOG=info is a filter");
    tracing::subscriber::set_global_default(driftwood_serve::logging::subscriber(filter, buffer.clone(), false))
        .expect("the test's subscriber is the first");

    let store = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini"),
        store.path().into(),
    );
    config.addr = "127.0.0.1:0".parse().expect("address");
    config.max_seq = 256;
    config.backend = driftwood_backend::BackendKind::Cpu;
    let server = Server::start(config).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    let http = reqwest::Client::new();
    let before = buffer.request_lines().len();
    assert_eq!(before, 0, "no request yet:\n{}", buffer.text());

    let chat = |session: &str, messages: Value, stream: bool| {
        let body = json!({"model": "driftwood-mini", "messages": messages, "max_tokens": 8, "temperature": 0,
                          "stream": stream, "stream_options": {"include_usage": true}});
        http.post(format!("{base}/v1/chat/completions")).header("X-Session-Id", session).json(&body).send()
    };
    let first = chat("log-a", json!([{"role": "user", "content": "Who was Elizabeth?"}]), false).await.expect("sent");
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.expect("JSON");
    let reply = first["choices"][0]["message"]["content"].as_str().expect("reply").to_string();
    let second = chat(
        "log-a",
        json!([{"role": "user", "content": "Who was Elizabeth?"}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "And Jane?"}]),
        false,
    )
    .await
    .expect("sent");
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.expect("JSON");
    let streamed = chat("log-b", json!([{"role": "user", "content": "Hello"}]), true).await.expect("sent");
    assert_eq!(streamed.status(), 200);
    let events = streamed.text().await.expect("stream");
    let usage: Value = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").cloned())
        .expect("a usage chunk");
    let bad = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "driftwood-mini", "messages": [], "temperature": 9}))
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400);
    assert_eq!(http.get(format!("{base}/health")).send().await.expect("sent").status(), 200);
    assert_eq!(http.get(format!("{base}/metrics")).send().await.expect("sent").status(), 200);

    // A line is written when its response's body is done: the last ones may come a moment after the client
    // has read the body.
    let deadline = Instant::now() + Duration::from_secs(10);
    while buffer.request_lines().len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = buffer.request_lines();
    assert_eq!(lines.len(), 6, "one line per request:\n{}", buffer.text());
    for line in &lines {
        assert!(line.contains(" INFO "), "logged at info: {line}");
    }
    let parsed: Vec<HashMap<String, String>> = lines.iter().map(|l| fields(l)).collect();
    let by = |path: &str, session: Option<&str>| -> Vec<&HashMap<String, String>> {
        parsed.iter().filter(|f| f["path"] == path && f.get("session_id").map(String::as_str) == session).collect()
    };
    // The two turns of `log-a`, in order, with the counts the responses gave.
    let turns = by("/v1/chat/completions", Some("log-a"));
    assert_eq!(turns.len(), 2, "{lines:#?}");
    for (f, resp) in turns.iter().zip([&first, &second]) {
        let u = &resp["usage"];
        assert_eq!(f["status"], "200");
        assert_eq!(f["prompt_tokens"], u["prompt_tokens"].to_string(), "{f:?}");
        assert_eq!(f["completion_tokens"], u["completion_tokens"].to_string(), "{f:?}");
        assert_eq!(f["cached_tokens"], u["prompt_tokens_details"]["cached_tokens"].to_string(), "{f:?}");
        let latency: f64 = f["latency_ms"].parse().expect("latency in ms");
        assert!(latency > 0.0 && latency < 60_000.0, "{f:?}");
    }
    assert!(turns[1]["cached_tokens"].parse::<u32>().expect("cached") > 0, "the second turn reuses the first");
    // The stream is logged when it has ended, with its turn's counts.
    let stream = by("/v1/chat/completions", Some("log-b"));
    assert_eq!(stream.len(), 1, "{lines:#?}");
    assert_eq!(stream[0]["status"], "200");
    assert_eq!(stream[0]["prompt_tokens"], usage["prompt_tokens"].to_string());
    assert_eq!(stream[0]["completion_tokens"], usage["completion_tokens"].to_string());
    // A refused request: its status, no session, no counts.
    let refused = by("/v1/chat/completions", None);
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert_eq!(refused[0]["status"], "400");
    assert!(!refused[0].contains_key("prompt_tokens"), "{:?}", refused[0]);
    for path in ["/health", "/metrics"] {
        let f = by(path, None);
        assert_eq!(f.len(), 1, "{lines:#?}");
        assert_eq!((f[0]["method"].as_str(), f[0]["status"].as_str()), ("GET", "200"));
    }
    server.shutdown().await.expect("clean shutdown");
}
