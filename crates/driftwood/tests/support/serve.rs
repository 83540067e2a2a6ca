//! Helpers for tests that run `driftwood serve` as a process and talk HTTP to it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Starts `driftwood serve` on a free loopback port on the CPU with 256-token caches, plus `args`; returns the
/// process and its address. Its standard error (its logs, at `info`) is drained so that it never blocks on it.
pub fn spawn_serve<I, S>(args: I) -> (Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .args(["serve", "--addr", "127.0.0.1:0", "--backend", "cpu", "--max-seq", "256"])
        .args(args)
        // The address is an `info` line; whatever the test's environment says, the server logs at `info`.
        .env("RUST_LOG", "info")
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
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// One HTTP/1.1 request with `Connection: close` (answered within 60 s); returns (status, body).
pub fn request(addr: &str, method: &str, path: &str, session: &str, body: &str) -> (u16, String) {
    let (status, _, body) = request_with_head(addr, method, path, session, body);
    (status, body)
}

/// [`request`], also answering the response's head (status line and headers, as sent).
pub fn request_with_head(addr: &str, method: &str, path: &str, session: &str, body: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
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
    (status, head.to_string(), body.to_string())
}

/// The assistant message of a chat completion, to append to the conversation.
pub fn reply(v: &Value) -> Value {
    json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]})
}
