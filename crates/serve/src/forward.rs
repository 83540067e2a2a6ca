//! Forwarding: in a cluster, a request for a session another node owns is sent on to that node and its
//! answer (JSON or a stream of events) passed back unchanged, so a client may send any turn to any node.
//!
//! A forwarded request carries [`FORWARDED_HEADER`]; a node never forwards such a request again (the
//! ownership it was sent on may have moved meanwhile): it answers 409 `session_owned` naming the owner
//! it knows, and the client follows that.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::future::{self, Either, FutureExt};

use crate::api::ApiError;

/// Marks a request one node forwarded to another; its value is the forwarding node's id.
pub const FORWARDED_HEADER: &str = "x-driftwood-forwarded";

/// Request headers passed on to the owner (the rest describe this hop, not the request).
const REQUEST_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION];
/// Response headers passed back from the owner.
const RESPONSE_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::CACHE_CONTROL, header::RETRY_AFTER];

/// What a handler keeps of its request so it can be sent on.
pub(crate) struct Forwardable {
    /// The endpoint's path, e.g. `/v1/chat/completions`.
    pub path: &'static str,
    /// The request's headers, as received.
    pub headers: HeaderMap,
    /// The request's body, as received.
    pub body: Bytes,
}

impl Forwardable {
    /// Whether another node forwarded this request here already.
    pub fn was_forwarded(&self) -> bool {
        self.headers.contains_key(FORWARDED_HEADER)
    }
}

/// Sends requests on to the nodes that own their sessions.
pub(crate) struct Forwarder {
    client: reqwest::Client,
    /// This node's id, sent in [`FORWARDED_HEADER`].
    from: String,
}

impl Forwarder {
    /// A forwarder for node `from`. Connecting to an owner gives up after `connect_timeout`; a turn itself
    /// has no time limit here (the owner's deadline bounds it).
    pub fn new(from: String, connect_timeout: Duration) -> Self {
        let client = reqwest::Client::builder().connect_timeout(connect_timeout).build().unwrap_or_default();
        Forwarder { client, from }
    }

    /// Sends `request` to the node at `owner` (`http://host:port`) and answers with what it answers, until
    /// `gone` completes: the owner lost the session (stopped or died past its lease), so its answer will not
    /// come or will not count. A stream cut that way ends early.
    ///
    /// # Errors
    ///
    /// A 503 `owner_unreachable` (with `Retry-After: retry_after_secs`) when the owner cannot be reached or
    /// `gone` completes before it answers: its claim lapses with its lease, after which any node takes the
    /// session.
    pub async fn forward(
        &self,
        owner: &str,
        request: &Forwardable,
        retry_after_secs: u64,
        gone: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Response, ApiError> {
        let unreachable = |why: String| {
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "owner_unreachable",
                format!("the session's node at {owner} {why}; retry once its claim lapses"),
            );
            err.retry_after = Some(retry_after_secs);
            err.owner = Some(owner.to_string());
            err
        };
        let gone = gone.boxed().shared();
        let url = format!("{}{}", owner.trim_end_matches('/'), request.path);
        let mut outgoing = self.client.post(url).body(request.body.clone()).header(FORWARDED_HEADER, &self.from);
        for name in REQUEST_HEADERS.iter().chain([&HeaderName::from_static(crate::http::SESSION_HEADER)]) {
            if let Some(value) = request.headers.get(name) {
                outgoing = outgoing.header(name, value);
            }
        }
        let lost = || unreachable("lost the session before answering".into());
        let answer = before(outgoing.send(), gone.clone()).await.ok_or_else(lost)?;
        let answer = answer.map_err(|e| unreachable(format!("cannot be reached ({e})")))?;
        let mut response = Response::builder().status(answer.status());
        for name in RESPONSE_HEADERS.iter().chain([&HeaderName::from_static("x-driftwood-owner")]) {
            if let Some(value) = answer.headers().get(name) {
                response = response.header(name, value);
            }
        }
        response = response.header("x-driftwood-served-by", owner);
        // An answer of known length (JSON) is read whole and sent with its length; a stream of events is
        // passed through as the owner produces it.
        let body = if answer.content_length().is_some() {
            let bytes = before(answer.bytes(), gone).await.ok_or_else(lost)?;
            Body::from(bytes.map_err(|e| unreachable(format!("broke off its answer ({e})")))?)
        } else {
            Body::from_stream(answer.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other)).take_until(gone))
        };
        response.body(body).map_err(|e| ApiError::server("internal", format!("forwarded answer: {e}")))
    }
}

/// `work`'s output, or `None` if `gone` completes first.
async fn before<T>(work: impl Future<Output = T>, gone: impl Future<Output = ()>) -> Option<T> {
    match future::select(Box::pin(work), Box::pin(gone)).await {
        Either::Left((done, _)) => Some(done),
        Either::Right(((), _)) => None,
    }
}
