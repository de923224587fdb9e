//! OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status OpenAI uses for the same situation.
//!
//! Every failure a client can cause ends up here, including the ones axum would
//! otherwise answer itself in plain text (a malformed body would be a 422 from axum's
//! `Json`; we parse bodies ourselves and answer 400, as OpenAI does).

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Extra headers (rate-limit state, `retry-after`).
    pub headers: HeaderMap,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: HeaderMap::new(),
        }
    }

    /// 400: the request is malformed or a value is out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some(param.to_owned());
        e
    }

    /// 400 for a prompt (plus requested completion) longer than the context.
    pub fn context_length(message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some("messages".into());
        e.code = Some("context_length_exceeded");
        e
    }

    /// 401: missing, malformed, unknown or revoked API key (never says which).
    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided. Pass a valid key as `Authorization: Bearer <key>`; \
             create one with `isotope keys create --account NAME`.",
        );
        e.code = Some("invalid_api_key");
        e
    }

    /// 403: the account is blocked by policy.
    pub fn forbidden(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::FORBIDDEN, "permission_error", message);
        e.code = Some("account_blocked");
        e
    }

    /// 404 for an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist; GET /v1/models lists the served model."),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 404 for an unknown route.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {path}."),
        )
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this URL.",
        )
    }

    /// 413: the request body is larger than the server accepts.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body too large: the limit is {limit} bytes."),
        )
    }

    /// 429: a rate limit was hit.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message);
        e.code = Some("rate_limit_exceeded");
        if let Ok(v) = HeaderValue::from_str(&retry_after_secs.max(1).to_string()) {
            e.headers.insert("retry-after", v);
        }
        e
    }

    /// 429: the key's token quota is spent.
    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", message);
        e.code = Some("insufficient_quota");
        e
    }

    /// 503: overloaded or not ready.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        if let Ok(v) = HeaderValue::from_str("1") {
            e.headers.insert("retry-after", v);
        }
        e
    }

    /// 500: our fault. The message is generic; details go to the log.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{context}: {err}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("The server had an error while processing your request ({context})."),
        )
    }

    /// The JSON body, as sent (also used for mid-stream SSE error events).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("isotope_errors_total", "status" => self.status.as_u16().to_string())
            .increment(1);
        let mut resp = (self.status, axum::Json(self.body_json())).into_response();
        resp.headers_mut().extend(self.headers);
        resp
    }
}

impl From<isotope_store::StoreError> for ApiError {
    fn from(e: isotope_store::StoreError) -> Self {
        ApiError::internal("store", e)
    }
}
