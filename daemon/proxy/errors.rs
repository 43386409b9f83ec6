//! Refusals and daemon-side failures, answered in the provider's own error format so that the
//! agent's SDK shows our message to its user.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use super::body::{ProxyBody, full};
use crate::providers::ErrorFormat;

/// A request the proxy answers itself. The status says whose fault it is: 4xx the client's or
/// its grant's, 502/504 the upstream's, 500/503 the daemon's.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub status: StatusCode,
    /// A short machine-readable reason (OpenAI `code`).
    pub code: &'static str,
    pub message: String,
    /// Seconds after which a retry may succeed (rate limits), sent as `retry-after`.
    pub retry_after: Option<u64>,
    /// Why, under which the refusal is counted for its grant (the code unless more precise).
    pub reason: &'static str,
    /// The model the refused request asked for, once its body was read.
    pub model: Option<String>,
}

impl ProxyError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ProxyError {
        ProxyError { status, code, message: message.into(), retry_after: None, reason: code, model: None }
    }

    /// Names the model the refused request asked for, for the refusal's trace.
    pub fn for_model(mut self, model: &str) -> ProxyError {
        self.model = Some(model.to_string());
        self
    }

    pub fn into_response(self, format: ErrorFormat) -> Response<ProxyBody> {
        let body = match format {
            ErrorFormat::OpenAi => json!({"error": {
                "message": self.message,
                "type": if self.code == "rate_limit_exceeded" { "requests" } else { openai_type(self.status) },
                "param": null,
                "code": self.code,
            }}),
            ErrorFormat::Anthropic => json!({
                "type": "error",
                "error": {"type": anthropic_type(self.status), "message": self.message},
            }),
            ErrorFormat::Google => json!({"error": {
                "code": self.status.as_u16(),
                "message": self.message,
                "status": google_status(self.status),
            }}),
        };
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response.headers_mut().insert("x-capit-refusal", HeaderValue::from_static(self.code));
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 400 | 404 | 408 | 413 | 421 => "invalid_request_error",
        403 => "permission_error",
        429 => "insufficient_quota",
        _ => "server_error",
    }
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 421 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        408 | 504 => "timeout_error",
        _ => "api_error",
    }
}

fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 421 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        408 | 504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}
