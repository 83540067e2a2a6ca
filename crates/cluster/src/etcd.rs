//! [`Etcd`]: a small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/put`,
//! `/v3/kv/txn`, `/v3/kv/deleterange`, `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`).
//!
//! The gateway is part of every etcd server since 3.3 and speaks the gRPC API's messages as JSON (keys and
//! values base64, 64-bit integers as strings, fields equal to their default left out), so the client needs
//! HTTP and JSON only: no generated code, no `protoc` at build time.
//!
//! Each call goes to the member that answered last; when a member cannot be reached, times out or answers
//! that it is unavailable (no leader, leader changed), the call is sent to the next member of the list. A call
//! that times out may have been applied by the member that did not answer, so a resent call may be applied
//! twice: the callers here send only calls for which that is harmless (puts of the same value, compare-and-set
//! transactions whose second application fails its compare and reads what the first did).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// What an etcd call could not do.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint was given.
    #[error("no etcd endpoint given: use http://HOST:PORT[,http://HOST:PORT…]")]
    NoEndpoints,
    /// An endpoint that is not `http://HOST:PORT` (or `HOST:PORT`).
    #[error("invalid etcd endpoint `{0}`: use http://HOST:PORT")]
    BadEndpoint(String),
    /// No member answered: each was unreachable, timed out or unavailable.
    #[error("no etcd member could serve {call} ({tried}); the last said: {last}")]
    Unavailable {
        /// The call.
        call: &'static str,
        /// The endpoints tried, in order.
        tried: String,
        /// The last member's error.
        last: String,
    },
    /// A member answered with an error that another member would answer too (a bad request, a lease that
    /// does not exist).
    #[error("etcd at {endpoint} refused {call}: {message} (gRPC code {code})")]
    Refused {
        /// The member.
        endpoint: String,
        /// The call.
        call: &'static str,
        /// The gRPC status code (5: not found, 3: invalid argument, …).
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// A member answered something that is not what etcd sends.
    #[error("etcd at {endpoint} answered {call} with something unexpected: {what}")]
    Malformed {
        /// The member.
        endpoint: String,
        /// The call.
        call: &'static str,
        /// What was wrong.
        what: String,
    },
}

impl EtcdError {
    /// Whether etcd said the lease named does not exist (expired or revoked).
    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Refused { code: 5, message, .. } if message.contains("lease not found"))
    }
}

/// gRPC codes after which another member may succeed: deadline exceeded, unavailable.
const RETRY_ELSEWHERE: [i64; 2] = [4, 14];

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (unique across the cluster's history).
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Changes since it was created (1 on creation).
    pub version: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A condition of a [`Txn`].
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision(Vec<u8>, i64),
    /// The key's value equals this.
    Value(Vec<u8>, Vec<u8>),
}

/// An operation of a [`Txn`].
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets a key, attached to a lease when given.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// Lease id (0: none).
        lease: i64,
    },
    /// Reads a key.
    Get(Vec<u8>),
    /// Deletes a key.
    Delete(Vec<u8>),
}

/// A transaction: if every compare holds, the `success` operations run, else the `failure` ones; atomically.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compare: Vec<Compare>,
    /// Run when they hold.
    pub success: Vec<Op>,
    /// Run when one does not.
    pub failure: Vec<Op>,
}

/// What one operation of a transaction returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A read: the key, if it exists.
    Get(Option<KeyValue>),
    /// A put.
    Put,
    /// A delete: keys deleted.
    Delete(i64),
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether the compares held (so the `success` operations ran).
    pub succeeded: bool,
    /// The store's revision after the transaction; a transaction that changed keys made this revision.
    pub revision: i64,
    /// One result per operation that ran.
    pub results: Vec<OpResult>,
}

/// A lease granted by etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: i64,
    /// Seconds it lives without a keepalive.
    pub ttl: i64,
}

/// Client of one etcd cluster. Cheap to share behind an `Arc`; calls may run concurrently.
#[derive(Debug)]
pub struct Etcd {
    http: reqwest::Client,
    endpoints: Vec<String>,
    preferred: AtomicUsize,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A 64-bit integer field: etcd writes them as strings, and leaves out zeros.
fn int(v: &Value, field: &str) -> Result<i64, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("`{field}` is not an integer: {s:?}")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("`{field}` is not a 64-bit integer: {n}")),
        Some(other) => Err(format!("`{field}` is not an integer: {other}")),
    }
}

fn bytes_field(v: &Value, field: &str) -> Result<Vec<u8>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => B64.decode(s).map_err(|e| format!("`{field}` is not base64: {e}")),
        Some(other) => Err(format!("`{field}` is not a string: {other}")),
    }
}

fn key_value(v: &Value) -> Result<KeyValue, String> {
    Ok(KeyValue {
        key: bytes_field(v, "key")?,
        value: bytes_field(v, "value")?,
        create_revision: int(v, "create_revision")?,
        mod_revision: int(v, "mod_revision")?,
        version: int(v, "version")?,
        lease: int(v, "lease")?,
    })
}

fn kvs(v: &Value) -> Result<Vec<KeyValue>, String> {
    match v.get("kvs") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(key_value).collect(),
        Some(other) => Err(format!("`kvs` is not a list: {other}")),
    }
}

fn revision(v: &Value) -> Result<i64, String> {
    int(v.get("header").unwrap_or(&Value::Null), "revision")
}

/// The end of the range of every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix empty): the range runs to the end of the key space.
    vec![0]
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::CreateRevision(key, rev) => {
            json!({"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": rev.to_string()})
        }
        Compare::Value(key, value) => {
            json!({"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)})
        }
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => {
            json!({"request_put": {"key": b64(key), "value": b64(value), "lease": lease.to_string()}})
        }
        Op::Get(key) => json!({"request_range": {"key": b64(key)}}),
        Op::Delete(key) => json!({"request_delete_range": {"key": b64(key)}}),
    }
}

fn op_result(v: &Value) -> Result<OpResult, String> {
    if let Some(range) = v.get("response_range") {
        return Ok(OpResult::Get(kvs(range)?.into_iter().next()));
    }
    if v.get("response_put").is_some() {
        return Ok(OpResult::Put);
    }
    if let Some(delete) = v.get("response_delete_range") {
        return Ok(OpResult::Delete(int(delete, "deleted")?));
    }
    Err(format!("unknown operation response: {v}"))
}

/// Parses `http://HOST:PORT` (or `HOST:PORT`) into the base address calls go to.
fn endpoint(raw: &str) -> Result<String, EtcdError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let rest = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    let valid = !rest.is_empty()
        && !rest.contains('/')
        && rest.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid || rest.contains("://") {
        return Err(EtcdError::BadEndpoint(raw.to_string()));
    }
    Ok(format!("http://{rest}"))
}

impl Etcd {
    /// A client of the members at `endpoints` (`http://HOST:PORT` each), with each call given `timeout` per
    /// member before the next one is tried.
    ///
    /// # Errors
    ///
    /// [`EtcdError::NoEndpoints`], [`EtcdError::BadEndpoint`] (HTTPS is not supported), or
    /// [`EtcdError::Malformed`] when the HTTP client cannot be built.
    pub fn new<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, EtcdError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| endpoint(e.as_ref())).collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| EtcdError::Malformed { endpoint: String::new(), call: "connect", what: e.to_string() })?;
        Ok(Etcd { http, endpoints, preferred: AtomicUsize::new(0) })
    }

    /// [`new`](Self::new) from a comma-separated list, as `--cluster` takes it.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new).
    pub fn from_list(list: &str, timeout: Duration) -> Result<Self, EtcdError> {
        let endpoints: Vec<&str> = list.split(',').filter(|s| !s.trim().is_empty()).collect();
        Self::new(&endpoints, timeout)
    }

    /// The members' addresses.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Posts `body` to `path` on one member after another until one answers.
    async fn call(&self, call: &'static str, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut tried = vec![];
        let mut last = String::new();
        for i in 0..n {
            let index = (first + i) % n;
            let endpoint = &self.endpoints[index];
            tried.push(endpoint.as_str());
            let sent = self.http.post(format!("{endpoint}{path}")).json(body).send().await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
            };
            let status = response.status();
            let text = match response.text().await {
                Ok(t) => t,
                Err(e) => {
                    last = format!("{endpoint}: reading the answer: {e}");
                    continue;
                }
            };
            // A streaming call (keepalive) answers one JSON object per line.
            let first_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let value: Value = match serde_json::from_str(first_line) {
                Ok(v) => v,
                Err(_) if status.is_server_error() => {
                    last = format!("{endpoint}: HTTP {status}");
                    continue;
                }
                Err(e) => {
                    return Err(EtcdError::Malformed {
                        endpoint: endpoint.clone(),
                        call,
                        what: format!("HTTP {status}, not JSON ({e}): {}", text.chars().take(200).collect::<String>()),
                    });
                }
            };
            let value = match value.get("result") {
                Some(inner) if inner.is_object() => inner.clone(),
                _ => value,
            };
            if let Some(error) = value.get("error") {
                // Unary calls: {"error": "...", "code": N, "message": "..."}; streams: {"error": {"grpc_code"…}}.
                let (code, message) = match error {
                    Value::Object(_) => (
                        int(error, "grpc_code").unwrap_or(2),
                        error.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
                    ),
                    _ => (
                        int(&value, "code").unwrap_or(2),
                        value.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
                    ),
                };
                if RETRY_ELSEWHERE.contains(&code) || (status.is_server_error() && code == 2) {
                    last = format!("{endpoint}: {message} (gRPC code {code})");
                    continue;
                }
                return Err(EtcdError::Refused { endpoint: endpoint.clone(), call, code, message });
            }
            if !status.is_success() {
                last = format!("{endpoint}: HTTP {status}");
                continue;
            }
            self.preferred.store(index, Ordering::Relaxed);
            return Ok(value);
        }
        Err(EtcdError::Unavailable { call, tried: tried.join(", "), last })
    }

    fn malformed(&self, call: &'static str, what: String) -> EtcdError {
        let endpoint = self.endpoints[self.preferred.load(Ordering::Relaxed) % self.endpoints.len()].clone();
        EtcdError::Malformed { endpoint, call, what }
    }

    /// Reads `key`.
    ///
    /// # Errors
    ///
    /// [`EtcdError::Unavailable`] when no member answers; [`EtcdError::Refused`] or [`EtcdError::Malformed`].
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let v = self.call("range", "/v3/kv/range", &json!({"key": b64(key)})).await?;
        Ok(kvs(&v).map_err(|e| self.malformed("range", e))?.into_iter().next())
    }

    /// Reads every key that starts with `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        let body = json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix))});
        let v = self.call("range", "/v3/kv/range", &body).await?;
        kvs(&v).map_err(|e| self.malformed("range", e))
    }

    /// Sets `key` to `value`, attached to `lease` unless it is 0. Returns the new revision.
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get); [`EtcdError::Refused`] with code 5 for a lease that does not exist.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let body = json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()});
        let v = self.call("put", "/v3/kv/put", &body).await?;
        revision(&v).map_err(|e| self.malformed("put", e))
    }

    /// Deletes `key`. Returns how many keys were deleted (0 or 1).
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let v = self.call("deleterange", "/v3/kv/deleterange", &json!({"key": b64(key)})).await?;
        int(&v, "deleted").map_err(|e| self.malformed("deleterange", e))
    }

    /// Runs a transaction.
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        let body = json!({
            "compare": txn.compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": txn.success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": txn.failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let v = self.call("txn", "/v3/kv/txn", &body).await?;
        let parse = || -> Result<TxnResult, String> {
            let succeeded = match v.get("succeeded") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(format!("`succeeded` is not a boolean: {other}")),
            };
            let results = match v.get("responses") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(items)) => items.iter().map(op_result).collect::<Result<_, _>>()?,
                Some(other) => return Err(format!("`responses` is not a list: {other}")),
            };
            let expected = if succeeded { txn.success.len() } else { txn.failure.len() };
            if results.len() != expected {
                return Err(format!("{} operation results for {expected} operations", results.len()));
            }
            Ok(TxnResult { succeeded, revision: revision(&v)?, results })
        };
        parse().map_err(|e| self.malformed("txn", e))
    }

    /// Grants a lease of `ttl_secs` seconds.
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<Lease, EtcdError> {
        let v = self.call("lease grant", "/v3/lease/grant", &json!({"TTL": ttl_secs.to_string()})).await?;
        let lease = Lease {
            id: int(&v, "ID").map_err(|e| self.malformed("lease grant", e))?,
            ttl: int(&v, "TTL").map_err(|e| self.malformed("lease grant", e))?,
        };
        if lease.id == 0 || lease.ttl <= 0 {
            return Err(self.malformed("lease grant", format!("lease {} with TTL {}", lease.id, lease.ttl)));
        }
        Ok(lease)
    }

    /// Renews lease `id`. Returns its TTL in seconds, 0 when the lease no longer exists (it expired or was
    /// revoked: the keys attached to it are gone).
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self.call("lease keepalive", "/v3/lease/keepalive", &json!({"ID": id.to_string()})).await?;
        int(&v, "TTL").map_err(|e| self.malformed("lease keepalive", e))
    }

    /// Revokes lease `id`, deleting every key attached to it. A lease that no longer exists is not an error.
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self.call("lease revoke", "/v3/lease/revoke", &json!({"ID": id.to_string()})).await {
            Err(e) if e.is_lease_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_prefixes() {
        assert_eq!(endpoint("127.0.0.1:2379").unwrap(), "http://127.0.0.1:2379");
        assert_eq!(endpoint(" http://h:1/ ").unwrap(), "http://h:1");
        for bad in ["", "http://", "https://h:1", "h", "h:x", "h:1/v3", ":1"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn answers_with_defaults_left_out_parse() {
        let v = json!({"kvs": [{"key": "Zm9v", "create_revision": "3", "mod_revision": "4", "version": "2"}]});
        let kv = &kvs(&v).unwrap()[0];
        assert_eq!((kv.key.as_slice(), kv.value.as_slice(), kv.lease), (&b"foo"[..], &b""[..], 0));
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (3, 4, 2));
        assert!(kvs(&json!({"kvs": [{"key": "%%"}]})).is_err());
        assert!(int(&json!({"n": "x"}), "n").is_err());
        assert_eq!(int(&json!({}), "n").unwrap(), 0);
    }
}
