//! One log line per HTTP request, at `info`: method, path, status, session id, prompt tokens, completion
//! tokens, cached prompt tokens, latency, and the error code of a turn that failed after its answer began
//! (a stream's status is 200 before the turn has run).
//!
//! A middleware gives every request a [`RequestLog`] (handlers fill it in as they learn the session and the
//! turn's counts) and wraps the response's body; the line is written when the body has been sent or dropped,
//! so a streamed turn is logged once it has finished, with its tokens and its whole latency.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tracing::Instrument;

use crate::sessions::TurnOutcome;

/// What a handler learned about its request, for the request's log line.
#[derive(Clone, Default)]
pub(crate) struct RequestLog(Arc<Mutex<Fields>>);

#[derive(Default)]
struct Fields {
    session: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    restored: Option<bool>,
    error: Option<&'static str>,
}

impl RequestLog {
    fn fields(&self) -> std::sync::MutexGuard<'_, Fields> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request's session key (also recorded in the current `request` span).
    pub(crate) fn session(&self, key: &str) {
        tracing::Span::current().record("session_id", key);
        self.fields().session = Some(key.to_string());
    }

    /// The counts of the request's completed turn.
    pub(crate) fn turn(&self, o: &TurnOutcome) {
        let mut f = self.fields();
        f.prompt_tokens = Some(o.prompt_tokens);
        f.completion_tokens = Some(o.completion_tokens);
        f.cached_tokens = Some(o.prompt_tokens.saturating_sub(o.evaluated_tokens));
        f.restored = Some(o.restored);
    }

    /// The error code of a turn that failed after its answer's status was sent.
    pub(crate) fn failed(&self, code: &'static str) {
        self.fields().error = Some(code);
    }
}

/// The middleware: a [`RequestLog`] in the request's extensions, a `request` span around its handler, and
/// the log line once its response's body is done.
pub(crate) async fn middleware(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let log = RequestLog::default();
    request.extensions_mut().insert(log.clone());
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let span = tracing::info_span!("request", method = %method, path = %path, session_id = tracing::field::Empty);
    let response = next.run(request).instrument(span).await;
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let line = Line { log, started, method, path, status };
    Response::from_parts(parts, Body::new(Logged { body, line: Some(line) }))
}

/// The request's line, written when dropped.
struct Line {
    log: RequestLog,
    started: Instant,
    method: String,
    path: String,
    status: u16,
}

impl Drop for Line {
    fn drop(&mut self) {
        let f = self.log.fields();
        tracing::info!(
            method = %self.method,
            path = %self.path,
            status = self.status,
            session_id = f.session.as_deref(),
            prompt_tokens = f.prompt_tokens,
            completion_tokens = f.completion_tokens,
            cached_tokens = f.cached_tokens,
            restored = f.restored,
            latency_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            error = f.error,
            "request"
        );
    }
}

/// A response body that writes its request's line when it ends or is dropped (a client that hangs up).
struct Logged {
    body: Body,
    line: Option<Line>,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.line.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
