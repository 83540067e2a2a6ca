//! The router, the handlers and the admission queue.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::AppState;
use crate::request_log::{self, RequestLog};

/// Bytes a streamed text event is charged beyond its text (the JSON around it), against the actor's host
/// allowance for events the client has not yet read.
const STREAM_EVENT_BYTES: usize = 256;
use crate::api::{self, ApiError, Sampling};
use crate::forward::Forwardable;
use crate::sessions::{Claim, Input, TurnOutcome, session_not_found};

/// The header that carries the session key.
pub const SESSION_HEADER: &str = "x-session-id";

/// Admission: at most `workers` turns run at once; up to `queue` more wait, first come first served; past
/// that, requests are refused with 429.
pub(crate) struct Scheduler {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
    closed: AtomicBool,
}

impl Scheduler {
    pub(crate) fn new(workers: usize, queue: usize) -> Self {
        Scheduler {
            permits: Arc::new(Semaphore::new(workers)),
            waiting: AtomicUsize::new(0),
            queue,
            closed: AtomicBool::new(false),
        }
    }

    /// Refuses new requests from now on (503); requests already admitted finish.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    async fn admit(&self, metrics: &crate::metrics::Metrics) -> Result<OwnedSemaphorePermit, ApiError> {
        let unavailable = || {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the server is shutting down; retry against its successor",
            );
            e.retry_after = Some(1);
            e
        };
        if self.closed.load(Ordering::Acquire) {
            return Err(unavailable());
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            metrics.rejected_queue_full.inc();
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                format!("all workers are busy and {} requests are already waiting; retry shortly", self.queue),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        let permit = self.permits.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        permit.map_err(|_| unavailable())
    }
}

/// The HTTP API over `state`; bodies over `max_body_bytes` are refused with 413.
pub(crate) fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/sessions/{key}", get(session_info).delete(session_delete))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/admin/drain", post(admin_drain).delete(admin_undrain))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(request_log::middleware))
        .with_state(state)
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such endpoint").into_response()
}

/// The cluster as etcd sees it: this node, the live nodes (with the sessions each owns and whether it drains),
/// every session with its owner and snapshot.
async fn cluster_status(State(state): State<Arc<AppState>>) -> Response {
    let Some(node) = state.sessions.config().cluster.clone() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_clustered",
            "this server runs alone",
        )
        .into_response();
    };
    let listed = async { Ok::<_, driftwood_cluster::ClusterError>((node.peers().await?, node.sessions().await?)) };
    match listed.await {
        Ok((nodes, sessions)) => axum::Json(json!({
            "node": node.id(),
            "nodes": nodes.iter().map(|p| json!({
                "id": p.id,
                "address": p.address,
                "sessions": p.load.map(|l| l.sessions),
                "draining": p.load.map(|l| l.draining),
            })).collect::<Vec<_>>(),
            "sessions": sessions.iter().map(|(id, owner, pointer)| json!({
                "id": id,
                "owner": owner.as_ref().map(|o| json!({"node": o.node, "fence": o.fence})),
                "snapshot": pointer.as_ref().map(|p| p.path()),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "cluster_unavailable", e.to_string())
            .into_response(),
    }
}

/// Admits an admin request: it must carry `Authorization: Bearer` and the node's admin token.
fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = state.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "admin_disabled",
            "the admin endpoints are off: start the node with --admin-token (or DRIFTWOOD_ADMIN_TOKEN)",
        ));
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compared without an early exit, so the time taken does not tell how much of a guess was right.
    let matches = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if !matches {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_admin_token",
            "admin requests need `Authorization: Bearer` and the node's admin token",
        ));
    }
    Ok(())
}

/// `POST /v1/admin/drain`: this node takes no new sessions, and releases the ones it owns to the others
/// (each snapshotted first); answers when every running turn has finished and every session is released.
async fn admin_drain(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_admin(&state, &headers) {
        return e.into_response();
    }
    let started = std::time::Instant::now();
    let sessions = state.clone();
    let drained = tokio::task::spawn_blocking(move || sessions.sessions.drain()).await;
    let Ok((released, failures)) = drained else {
        return ApiError::server("internal", "the drain's thread failed").into_response();
    };
    let status = if failures.is_empty() { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    let body = json!({
        "draining": true,
        "released": released,
        "failures": failures,
        "seconds": started.elapsed().as_secs_f64(),
    });
    (status, axum::Json(body)).into_response()
}

/// `DELETE /v1/admin/drain`: this node takes new sessions again.
async fn admin_undrain(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_admin(&state, &headers) {
        return e.into_response();
    }
    state.sessions.undrain().await;
    axum::Json(json!({"draining": false})).into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    state.sessions.metrics.request("models", 200);
    axum::Json(json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "driftwood"}],
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (live, hibernated) = state.sessions.counts();
    let text = state.sessions.metrics.render(state.sessions.runtime(), live, hibernated, state.scheduler.waiting());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if api::valid_session_key(key) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            Some("session_id"),
            "invalid_session_key",
            format!(
                "session key {key:?} is not valid: use 1–{} ASCII letters, digits, `-` or `_`",
                api::MAX_SESSION_KEY
            ),
        ))
    }
}

async fn session_info(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Response {
    if let Err(e) = check_key(&key) {
        return e.into_response();
    }
    if let Some(info) = state.sessions.info(&key) {
        return axum::Json(info).into_response();
    }
    // In a cluster the session may live on another node: etcd knows its owner and latest snapshot.
    let Some(node) = state.sessions.config().cluster.clone() else {
        return session_not_found(&key).into_response();
    };
    let found =
        async { Ok::<_, driftwood_cluster::ClusterError>((node.owner(&key).await?, node.pointer(&key).await?)) };
    match found.await {
        Ok((None, None)) => session_not_found(&key).into_response(),
        Ok((owner, pointer)) => axum::Json(json!({
            "id": key,
            "owner": owner.as_ref().map(|o| json!({"node": o.node, "fence": o.fence})),
            "snapshot": pointer.as_ref().map(|p| p.path()),
        }))
        .into_response(),
        Err(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "cluster_unavailable", e.to_string())
            .into_response(),
    }
}

async fn session_delete(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Response {
    if let Err(e) = check_key(&key) {
        return e.into_response();
    }
    let state2 = state.clone();
    let key2 = key.clone();
    let result = tokio::task::spawn_blocking(move || state2.sessions.delete(&key2))
        .await
        .unwrap_or_else(|e| Err(ApiError::server("internal", e.to_string())));
    match result {
        Ok(()) => axum::Json(json!({"id": key, "object": "session", "deleted": true})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The session key of a request: the header, or the body's `session_id` (they must agree if both are given).
fn session_key(headers: &HeaderMap, field: Option<&str>) -> Result<Option<String>, ApiError> {
    let header = match headers.get(SESSION_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::invalid(Some("session_id"), "invalid_session_key", "the X-Session-Id header is not ASCII")
        })?),
    };
    let key = match (header, field) {
        (Some(h), Some(f)) if h != f => {
            return Err(ApiError::invalid(
                Some("session_id"),
                "invalid_session_key",
                format!("the X-Session-Id header ({h:?}) and the session_id field ({f:?}) differ"),
            ));
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Ok(None),
    };
    check_key(key)?;
    Ok(Some(key.to_string()))
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid(Some("model"), "missing_model", "you must provide a model parameter")),
        Some(m) if m == state.model_id || m == "default" => Ok(()),
        Some(m) => {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model `{m}` does not exist; this server serves `{}`", state.model_id),
            );
            e.param = Some("model");
            Err(e)
        }
    }
}

fn check_prompt_len(state: &AppState, tokens: usize) -> Result<(), ApiError> {
    if tokens >= state.max_seq as usize {
        return Err(ApiError::invalid(
            Some("messages"),
            "context_length_exceeded",
            format!(
                "the prompt is {tokens} tokens; a session holds {} tokens, and at least one must be left to generate",
                state.max_seq
            ),
        ));
    }
    Ok(())
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_body" };
        ApiError::new(status, "invalid_request_error", code, r.body_text())
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<RequestLog>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body_or_error(body)?;
        let req: api::ChatRequest = api::parse_body(&body)?;
        check_model(&state, req.params.model.as_deref())?;
        let mut sampling = req.params.sampling(state.max_seq, state.default_max_tokens)?;
        sampling.logprobs = req.params.chat_logprobs()?;
        let messages = api::template_messages(&req.messages)?;
        let model = state.sessions.model();
        let rendered = model
            .render_chat(&messages, true)
            .map_err(|e| ApiError::invalid(Some("messages"), "template_error", e.to_string()))?;
        let tokens = model
            .tokenize(&rendered, false)
            .map_err(|e| ApiError::invalid(Some("messages"), "tokenizer_error", e.to_string()))?;
        check_prompt_len(&state, tokens.len())?;
        let key = session_key(&headers, req.params.session_id.as_deref())?;
        let json = serde_json::to_string(&messages).map_err(|e| ApiError::server("internal", e.to_string()))?;
        let request = Forwardable { path: "/v1/chat/completions", headers, body };
        run(&state, &log, Kind::Chat, key, Input::Chat(json), sampling, request).await
    }
    .await;
    respond(&state, Kind::Chat, result)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<RequestLog>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body_or_error(body)?;
        let req: api::CompletionRequest = api::parse_body(&body)?;
        check_model(&state, req.params.model.as_deref())?;
        let mut sampling = req.params.sampling(state.max_seq, state.default_max_tokens)?;
        sampling.logprobs = req.params.completion_logprobs()?;
        let prompt = api::completion_prompt(&req.prompt)?;
        let tokens = state
            .sessions
            .model()
            .tokenize(&prompt, true)
            .map_err(|e| ApiError::invalid(Some("prompt"), "tokenizer_error", e.to_string()))?;
        check_prompt_len(&state, tokens.len()).map_err(|mut e| {
            e.param = Some("prompt");
            e
        })?;
        if tokens.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "invalid_value", "the prompt is empty"));
        }
        let key = session_key(&headers, req.params.session_id.as_deref())?;
        let request = Forwardable { path: "/v1/completions", headers, body };
        run(&state, &log, Kind::Completion, key, Input::Completion(prompt), sampling, request).await
    }
    .await;
    respond(&state, Kind::Completion, result)
}

fn respond(state: &AppState, kind: Kind, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => {
            state.sessions.metrics.request(kind.endpoint(), response.status().as_u16());
            response
        }
        Err(e) => {
            state.sessions.metrics.request(kind.endpoint(), e.status.as_u16());
            e.into_response()
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn request_id(kind: Kind) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{n:06x}", now_secs())
}

fn usage(o: &TurnOutcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.prompt_tokens.saturating_sub(o.evaluated_tokens)},
    })
}

/// What Driftwood adds to a response: the tokens evaluated for the prompt and whether the session's actor
/// was restored from its snapshot for this turn.
fn extension(key: &Option<String>, o: &TurnOutcome) -> Value {
    json!({"session_id": key, "evaluated_tokens": o.evaluated_tokens, "restored": o.restored})
}

/// Completes once node `id` is no longer alive under `lease` (checked twice a lease TTL; while etcd cannot
/// be reached, the node is taken to be alive).
async fn node_gone(state: Arc<AppState>, id: String, lease: i64) {
    let every = Duration::from_secs_f64((state.sessions.retry_after_secs() as f64 / 2.0).max(0.2));
    loop {
        tokio::time::sleep(every).await;
        if let Ok(false) = state.sessions.still_alive(&id, lease).await {
            return;
        }
    }
}

/// Admits the request and runs its turn on a blocking thread; answers JSON or a stream of events. In a
/// cluster, a request for a session another node owns is forwarded there instead (`request`).
async fn run(
    state: &Arc<AppState>,
    log: &RequestLog,
    kind: Kind,
    key: Option<String>,
    input: Input,
    sampling: Sampling,
    request: Forwardable,
) -> Result<Response, ApiError> {
    if let Some(k) = &key {
        log.session(k);
    }
    let claim: Option<Claim> = key.as_deref().map(|k| state.sessions.claim(k)).transpose()?;
    // In a cluster: only the session's owner runs its turns; a request for another node's session goes there.
    let located = match claim.as_ref() {
        Some(claim) => state.sessions.locate(claim, !request.was_forwarded()).await?,
        None => None,
    };
    if let (Some(elsewhere), Some(key)) = (located, key.clone()) {
        // A request forwarded once already is not forwarded again.
        let forwarder = state.forwarder.as_ref().filter(|_| !request.was_forwarded());
        let (Some(address), Some(forwarder)) = (elsewhere.address.clone(), forwarder) else {
            return Err(elsewhere.refusal(&key));
        };
        // The local claim kept this node's own requests for the session apart; the owner does that now.
        drop(claim);
        state.sessions.metrics.cluster_forwarded.inc();
        let gone = node_gone(state.clone(), elsewhere.node.clone(), elsewhere.lease);
        return forwarder.forward(&address, &request, state.sessions.retry_after_secs(), gone).await;
    }
    if sampling.logprobs.is_some() && state.sessions.protocol() < 2 {
        return Err(crate::sessions::logprobs_unsupported());
    }
    let permit = state.scheduler.admit(&state.sessions.metrics).await?;
    let id = request_id(kind);
    let created = now_secs();
    let model_id = state.model_id.clone();
    // The turn's thread runs inside the request's span, so that its restore and snapshot spans nest in it.
    let span = tracing::Span::current();
    let want_logprobs = sampling.logprobs.is_some();
    // Legacy completion offsets count characters from the start of the prompt.
    let prompt_chars = match &input {
        Input::Completion(prompt) => prompt.chars().count(),
        Input::Chat(_) => 0,
    };
    if !sampling.stream {
        let state2 = state.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _span = span.enter();
            state2.sessions.run_turn(claim.as_ref(), &input, &sampling, |_, _| Ok(()))
        })
        .await
        .map_err(|e| ApiError::server("internal", format!("the turn's thread failed: {e}")))??;
        log.turn(&outcome);
        let model = state.sessions.model();
        let logprobs = match kind {
            _ if !want_logprobs => Value::Null,
            Kind::Chat => crate::logprobs::chat(model, &outcome.logprobs),
            Kind::Completion => {
                let mut offset = prompt_chars;
                crate::logprobs::completion(model, &outcome.logprobs, &mut offset)
            }
        };
        let body = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": outcome.text},
                    "finish_reason": outcome.finish_reason,
                    "logprobs": logprobs,
                }],
                "usage": usage(&outcome),
                "driftwood": extension(&key, &outcome),
            }),
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": outcome.text, "finish_reason": outcome.finish_reason, "logprobs": logprobs}],
                "usage": usage(&outcome),
                "driftwood": extension(&key, &outcome),
            }),
        };
        let mut response = axum::Json(body).into_response();
        if let Some(k) = &key
            && let Ok(v) = HeaderValue::from_str(k)
        {
            response.headers_mut().insert(SESSION_HEADER, v);
        }
        response
            .headers_mut()
            .insert("x-driftwood-restored", HeaderValue::from_static(if outcome.restored { "true" } else { "false" }));
        return Ok(response);
    }

    // Streaming: the turn's thread sends each piece of text as an event as soon as the actor emits it. The
    // channel is bounded in bytes: events the client has not yet taken may hold at most the actor's host
    // allowance; past it the actor's `emit` traps (a client that stops reading cannot grow the server).
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Result<Event, Infallible>)>();
    let queued = Arc::new(AtomicUsize::new(0));
    let allowance = state.sessions.runtime().config().limits.host_bytes;
    let chunk = {
        let (id, model_id) = (id.clone(), model_id.clone());
        move |choice: Value, usage: Option<Value>| -> Event {
            let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            let choices = if choice.is_null() { json!([]) } else { json!([choice]) };
            let mut body =
                json!({"id": id, "object": object, "created": created, "model": model_id, "choices": choices});
            if let Some(u) = usage {
                body["usage"] = u;
            }
            Event::default().data(body.to_string())
        }
    };
    if kind == Kind::Chat {
        let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null});
        let _ = tx.send((0, Ok(chunk(first, None))));
    }
    let state2 = state.clone();
    let include_usage = sampling.include_usage;
    let queued2 = queued.clone();
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _span = span.enter();
        let sink = {
            let (tx, chunk, queued, state) = (tx.clone(), chunk.clone(), queued2.clone(), state2.clone());
            let mut offset = prompt_chars;
            move |piece: &str, tokens: &[crate::logprobs::TokenLogprob]| {
                // Each chunk carries the log-probabilities of the tokens chosen since the previous one.
                let model = state.sessions.model();
                let logprobs = match kind {
                    _ if !want_logprobs => Value::Null,
                    Kind::Chat => crate::logprobs::chat(model, tokens),
                    Kind::Completion => crate::logprobs::completion(model, tokens, &mut offset),
                };
                let extra = if want_logprobs { logprobs.to_string().len() } else { 0 };
                let cost = piece.len() + STREAM_EVENT_BYTES + extra;
                let waiting = queued.load(Ordering::Relaxed);
                if waiting.saturating_add(cost) > allowance {
                    return Err(format!(
                        "the client has not read {waiting} bytes of streamed text; the actor's host allowance is \
                         {allowance} bytes"
                    ));
                }
                let choice = match kind {
                    Kind::Chat if want_logprobs => {
                        json!({"index": 0, "delta": {"content": piece}, "finish_reason": null, "logprobs": logprobs})
                    }
                    Kind::Chat => json!({"index": 0, "delta": {"content": piece}, "finish_reason": null}),
                    Kind::Completion => json!({"index": 0, "text": piece, "finish_reason": null, "logprobs": logprobs}),
                };
                queued.fetch_add(cost, Ordering::Relaxed);
                let _ = tx.send((cost, Ok(chunk(choice, None))));
                Ok(())
            }
        };
        match state2.sessions.run_turn(claim.as_ref(), &input, &sampling, sink) {
            Ok(outcome) => {
                log.turn(&outcome);
                let last = match kind {
                    Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": outcome.finish_reason}),
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "finish_reason": outcome.finish_reason, "logprobs": null})
                    }
                };
                let _ = tx.send((0, Ok(chunk(last, None))));
                if include_usage {
                    let mut u = usage(&outcome);
                    u["driftwood"] = extension(&key, &outcome);
                    let _ = tx.send((0, Ok(chunk(Value::Null, Some(u)))));
                }
            }
            Err(e) => {
                log.failed(e.code);
                let _ = tx.send((0, Ok(Event::default().data(e.body().to_string()))));
            }
        }
        let _ = tx.send((0, Ok(Event::default().data("[DONE]"))));
    });
    let events = UnboundedReceiverStream::new(rx).map(move |(bytes, event)| {
        queued.fetch_sub(bytes, Ordering::Relaxed);
        event
    });
    Ok(Sse::new(events).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn a_full_queue_answers_429_and_a_closed_one_503() {
        let metrics = Metrics::default();
        let scheduler = Scheduler::new(1, 0);
        let held = scheduler.admit(&metrics).await.expect("the first request gets the worker");
        let refused = scheduler.admit(&metrics).await.expect_err("no worker and no queue");
        assert_eq!(
            (refused.status, refused.code, refused.retry_after),
            (StatusCode::TOO_MANY_REQUESTS, "queue_full", Some(1))
        );
        assert_eq!(metrics.rejected_queue_full.get(), 1);
        drop(held);
        let again = scheduler.admit(&metrics).await.expect("the worker is free again");
        drop(again);
        scheduler.close();
        assert_eq!(scheduler.admit(&metrics).await.expect_err("closed").status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn waiting_requests_are_served_in_arrival_order() {
        let metrics = Arc::new(Metrics::default());
        let scheduler = Arc::new(Scheduler::new(1, 8));
        let held = scheduler.admit(&metrics).await.expect("worker");
        let order = Arc::new(std::sync::Mutex::new(vec![]));
        let mut tasks = vec![];
        for i in 0..4 {
            let (sched, metrics, order) = (scheduler.clone(), metrics.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = sched.admit(&metrics).await.expect("queued");
                order.lock().unwrap().push(i);
                drop(permit);
            }));
            // Each waiter is queued before the next one arrives.
            while scheduler.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }
}
