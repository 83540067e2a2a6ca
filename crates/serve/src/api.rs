//! The OpenAI wire format: requests as they arrive, their validation into what an actor needs, and
//! OpenAI-style error bodies.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use driftwood_engine::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};

/// Longest stop list a request may give (as OpenAI allows).
const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes.
const MAX_STOP_BYTES: usize = 256;
/// Longest session key, in bytes.
pub const MAX_SESSION_KEY: usize = 128;

/// An error answered with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// `error.type`: `invalid_request_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// `error.code`, a stable machine-readable reason.
    pub code: &'static str,
    /// `error.param`, the request field at fault, if any.
    pub param: Option<&'static str>,
    /// `error.message`, for people.
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
    /// Where the session's requests go instead (a 409 `session_owned`): an `X-Driftwood-Owner` header.
    pub owner: Option<String>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&'static str>, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            param,
            message: message.into(),
            retry_after: None,
            owner: None,
        }
    }

    /// An error with any status.
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, param: None, message: message.into(), retry_after: None, owner: None }
    }

    /// A 500 `server_error` (an actor trap, a snapshot that cannot be read or written, ...).
    pub fn server(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", code, message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(owner) = self.owner.as_deref().and_then(|o| HeaderValue::from_str(o).ok()) {
            response.headers_mut().insert("x-driftwood-owner", owner);
        }
        response
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Up to four stop strings.
    Many(Vec<String>),
}

/// A message's `content`: text, or a list of parts of which the `text` ones are used.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": …}`).
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    /// The part's type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Deserialize, Debug, Clone)]
pub struct InMessage {
    /// `system`, `user`, `assistant` (or `developer`, treated as `system`).
    pub role: String,
    /// The message's text.
    pub content: Option<Content>,
}

/// `stream_options`.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields shared by `/v1/chat/completions` and `/v1/completions`.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct CommonParams {
    /// The model id (see `/v1/models`).
    pub model: Option<String>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    pub top_p: Option<f64>,
    /// Seed of the sampler's random stream.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Number of choices; only 1 is supported.
    pub n: Option<i64>,
    /// Accepted for compatibility (-2 to 2) and not applied.
    pub presence_penalty: Option<f64>,
    /// Accepted for compatibility (-2 to 2) and not applied.
    pub frequency_penalty: Option<f64>,
    /// Chat: `true` answers each generated token's log-probability. Completions: the number of
    /// alternatives per token, 0 to 5 (the legacy form). See [`CommonParams::chat_logprobs`] and
    /// [`CommonParams::completion_logprobs`].
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token, 0 to 20, with `logprobs: true`.
    pub top_logprobs: Option<Value>,
    /// The session key, as an alternative to the `X-Session-Id` header.
    pub session_id: Option<String>,
}

/// A `/v1/chat/completions` request.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<InMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// A `/v1/completions` request.
#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    /// The text to continue: a string or a list of exactly one string.
    pub prompt: Value,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// Sampling and limits of one request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Seed of the random stream.
    pub seed: u64,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send the usage in a last stream chunk.
    pub include_usage: bool,
    /// Report each generated token's log-probability with this many alternatives; `None`: do not.
    pub logprobs: Option<u32>,
}

/// Most alternatives per token a chat request may ask for (`top_logprobs`).
pub const MAX_CHAT_TOP_LOGPROBS: u32 = driftwood_abi::serve::MAX_TOP_LOGPROBS;

/// Most alternatives per token a completion request may ask for (`logprobs`, the legacy form).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// `value` as an integer from 0 to `max`, for `param`.
fn count(param: &'static str, value: &Value, max: u32) -> Result<u32, ApiError> {
    value.as_u64().filter(|&n| n <= u64::from(max)).map(|n| n as u32).ok_or_else(|| {
        ApiError::invalid(
            Some(param),
            "invalid_value",
            format!("{param} must be an integer from 0 to {max}, got {value}"),
        )
    })
}

/// Parses a JSON body into `T`, answering a clear 400 for malformed JSON or wrong types.
///
/// # Errors
///
/// A 400 `invalid_json` with serde's explanation (line and column included).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(None, "invalid_json", "the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, "invalid_json", format!("the request body is not a valid request: {e}")))
}

/// Whether `key` can name a session: 1–128 ASCII letters, digits, `-` or `_`.
pub fn valid_session_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_SESSION_KEY
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl CommonParams {
    /// Validates the sampling parameters. `max_seq` bounds `max_tokens`; `default_max_tokens` applies when
    /// the request gives none.
    ///
    /// # Errors
    ///
    /// A 400 naming the parameter for anything negative, absurd or unsupported.
    pub fn sampling(&self, max_seq: u32, default_max_tokens: u32) -> Result<Sampling, ApiError> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max_tokens.min(max_seq),
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "invalid_value",
                    format!("max_tokens must be at least 1, got {n}"),
                ));
            }
            Some(n) if n > i64::from(max_seq) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "invalid_value",
                    format!("max_tokens is {n}, but a session holds at most {max_seq} tokens"),
                ));
            }
            Some(n) => n as u32,
        };
        let temperature = match self.temperature {
            None => 1.0,
            Some(t) if t.is_finite() && (0.0..=2.0).contains(&t) => t as f32,
            Some(t) => {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    "invalid_value",
                    format!("temperature must be between 0 and 2, got {t}"),
                ));
            }
        };
        let (temperature, top_p) = match self.top_p {
            None => (temperature, 1.0),
            // No mass left: the most likely token only.
            Some(0.0) => (0.0, 1.0),
            Some(p) if p.is_finite() && p > 0.0 && p <= 1.0 => (temperature, p as f32),
            Some(p) => {
                return Err(ApiError::invalid(
                    Some("top_p"),
                    "invalid_value",
                    format!("top_p must be between 0 and 1, got {p}"),
                ));
            }
        };
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(Some("n"), "invalid_value", format!("only n = 1 is supported, got {n}")));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if let Some(v) = value
                && !(v.is_finite() && (-2.0..=2.0).contains(&v))
            {
                let param = if name == "presence_penalty" { "presence_penalty" } else { "frequency_penalty" };
                return Err(ApiError::invalid(
                    Some(param),
                    "invalid_value",
                    format!("{name} must be between -2 and 2, got {v}"),
                ));
            }
        }
        let stops = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                Some("stop"),
                "invalid_value",
                format!("at most {MAX_STOPS} stop strings are allowed, got {}", stops.len()),
            ));
        }
        if let Some(bad) = stops.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES || s.contains('\0')) {
            return Err(ApiError::invalid(
                Some("stop"),
                "invalid_value",
                format!("stop strings must be 1–{MAX_STOP_BYTES} bytes without NUL, got {bad:?}"),
            ));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            // Without a seed every request gets its own random stream.
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed),
        };
        Ok(Sampling {
            max_tokens,
            temperature,
            top_p,
            seed,
            stops,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            logprobs: None,
        })
    }

    /// The alternatives per token a chat request asks for: `None` without `logprobs: true`, else
    /// `top_logprobs` (0 when absent).
    ///
    /// # Errors
    ///
    /// A 400 naming the parameter when `logprobs` is not a boolean, `top_logprobs` is not an integer from 0
    /// to [`MAX_CHAT_TOP_LOGPROBS`], or `top_logprobs` comes without `logprobs: true`.
    pub fn chat_logprobs(&self) -> Result<Option<u32>, ApiError> {
        let on = match &self.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    "invalid_value",
                    format!("logprobs must be true or false, got {other}"),
                ));
            }
        };
        let top = match &self.top_logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(count("top_logprobs", v, MAX_CHAT_TOP_LOGPROBS)?),
        };
        match (on, top) {
            (true, top) => Ok(Some(top.unwrap_or(0))),
            (false, None) => Ok(None),
            (false, Some(_)) => {
                Err(ApiError::invalid(Some("top_logprobs"), "invalid_value", "top_logprobs needs logprobs set to true"))
            }
        }
    }

    /// The alternatives per token a completion request asks for: its `logprobs`, an integer from 0 to
    /// [`MAX_COMPLETION_LOGPROBS`] (`None` when absent or null).
    ///
    /// # Errors
    ///
    /// A 400 naming the parameter for anything else (`top_logprobs` belongs to chat requests).
    pub fn completion_logprobs(&self) -> Result<Option<u32>, ApiError> {
        if !matches!(self.top_logprobs, None | Some(Value::Null)) {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "invalid_value",
                "top_logprobs is a chat parameter; completions take logprobs as the number of alternatives",
            ));
        }
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => count("logprobs", v, MAX_COMPLETION_LOGPROBS).map(Some),
        }
    }
}

/// The conversation as the JSON list the actor's chat template takes: `[{"role", "content"}]`, with content
/// parts joined and `developer` read as `system`.
///
/// # Errors
///
/// A 400 for an empty list, an unknown role or a non-text content part.
pub fn template_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "invalid_value", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "invalid_value",
                    format!("messages[{i}].role `{other}` is not supported; use system, user or assistant"),
                ));
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                "invalid_value",
                                format!("messages[{i}] has a content part of type `{kind}`; only text is supported"),
                            ));
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role: role.to_string(), content });
    }
    Ok(out)
}

/// The prompt of a completion request: a string, or a list holding exactly one string.
///
/// # Errors
///
/// A 400 for anything else.
pub fn completion_prompt(prompt: &Value) -> Result<String, ApiError> {
    match prompt {
        Value::String(s) => Ok(s.clone()),
        Value::Array(list) if list.len() == 1 => match &list[0] {
            Value::String(s) => Ok(s.clone()),
            _ => Err(ApiError::invalid(Some("prompt"), "invalid_value", "prompt must be a string")),
        },
        _ => Err(ApiError::invalid(
            Some("prompt"),
            "invalid_value",
            "prompt must be a string or a list of one string (batched prompts are not supported)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> CommonParams {
        serde_json::from_str(json).expect("test JSON parses")
    }

    #[test]
    fn sampling_defaults_and_bounds() {
        let s = params("{}").sampling(1024, 128).expect("defaults are valid");
        assert_eq!((s.max_tokens, s.temperature, s.top_p), (128, 1.0, 1.0));
        for bad in [
            r#"{"max_tokens": 0}"#,
            r#"{"max_tokens": -5}"#,
            r#"{"max_tokens": 100000}"#,
            r#"{"temperature": -1}"#,
            r#"{"temperature": 9}"#,
            r#"{"top_p": 1.5}"#,
            r#"{"n": 3}"#,
            r#"{"stop": ["a","b","c","d","e"]}"#,
            r#"{"stop": ""}"#,
            r#"{"presence_penalty": 7}"#,
        ] {
            let err = params(bad).sampling(1024, 128).expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.param.is_some(), "{bad}");
        }
        let s = params(r#"{"top_p": 0, "temperature": 0.7, "seed": -1, "stop": "\n"}"#).sampling(1024, 128).unwrap();
        assert_eq!((s.temperature, s.seed, s.stops.as_slice()), (0.0, u64::MAX, ["\n".to_string()].as_slice()));
    }

    #[test]
    fn logprobs_are_checked() {
        assert_eq!(params("{}").chat_logprobs().unwrap(), None);
        assert_eq!(params(r#"{"logprobs": false}"#).chat_logprobs().unwrap(), None);
        assert_eq!(params(r#"{"logprobs": true}"#).chat_logprobs().unwrap(), Some(0));
        assert_eq!(params(r#"{"logprobs": true, "top_logprobs": 20}"#).chat_logprobs().unwrap(), Some(20));
        for bad in [
            r#"{"logprobs": true, "top_logprobs": 21}"#,
            r#"{"logprobs": true, "top_logprobs": -1}"#,
            r#"{"logprobs": true, "top_logprobs": 2.5}"#,
            r#"{"logprobs": true, "top_logprobs": "3"}"#,
            r#"{"top_logprobs": 3}"#,
            r#"{"logprobs": 3}"#,
        ] {
            let err = params(bad).chat_logprobs().expect_err(bad);
            assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, "invalid_value"), "{bad}");
            assert!(err.param.is_some() && err.message.contains("logprobs"), "{bad}: {}", err.message);
        }
        assert_eq!(params(r#"{"logprobs": 5}"#).completion_logprobs().unwrap(), Some(5));
        assert_eq!(params(r#"{"logprobs": 0}"#).completion_logprobs().unwrap(), Some(0));
        assert_eq!(params(r#"{"logprobs": null}"#).completion_logprobs().unwrap(), None);
        for bad in [r#"{"logprobs": 6}"#, r#"{"logprobs": true}"#, r#"{"logprobs": 1, "top_logprobs": 1}"#] {
            let err = params(bad).completion_logprobs().expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn messages_are_checked() {
        let m: Vec<InMessage> = serde_json::from_str(
            r#"[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#,
        )
        .unwrap();
        assert_eq!(template_messages(&m).unwrap()[0], ChatMessage { role: "system".into(), content: "ab".into() });
        let bad: Vec<InMessage> = serde_json::from_str(r#"[{"role":"wizard","content":"x"}]"#).unwrap();
        assert!(template_messages(&bad).unwrap_err().message.contains("wizard"));
        assert!(template_messages(&[]).is_err());
        assert!(completion_prompt(&json!(["a", "b"])).is_err());
        assert_eq!(completion_prompt(&json!(["a"])).unwrap(), "a");
    }

    #[test]
    fn session_keys() {
        assert!(valid_session_key("abc-DEF_123"));
        for bad in ["", "a b", "../x", "é", &"x".repeat(129)] {
            assert!(!valid_session_key(bad), "{bad}");
        }
    }
}
