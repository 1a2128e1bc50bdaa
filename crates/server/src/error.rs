//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status. Every failure a client can cause ends here, never in a panic.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use flashmoe_runtime::RuntimeError;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            ..ApiError::invalid(
                "missing or incorrect API key: send `Authorization: Bearer KEY`",
                None,
            )
        }
    }

    pub fn queue_full(depth: usize) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("queue_full"),
            retry_after: Some(1),
            ..ApiError::invalid(
                format!("the server is busy ({depth} requests waiting); retry shortly"),
                None,
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            ..ApiError::invalid(message, None)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(message, None)
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl ApiError {
    /// A generation's error; `prompt_param` is the field the prompt came in (`messages` for
    /// chat, `prompt` for plain completions), named by prompt errors.
    pub fn from_runtime(e: RuntimeError, prompt_param: &str) -> Self {
        let message = e.to_string();
        match e {
            RuntimeError::PromptTooLong { .. } => {
                ApiError::invalid(message, Some(prompt_param)).with_code("context_length_exceeded")
            }
            RuntimeError::MaxTokensTooLarge { .. } => {
                ApiError::invalid(message, Some("max_tokens")).with_code("context_length_exceeded")
            }
            e if e.is_client_error() => ApiError::invalid(message, Some(prompt_param)),
            _ => ApiError::internal(message),
        }
    }

    /// 503 for requests the server will not run because it is stopping.
    pub fn shutting_down() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: Some("server_shutting_down"),
            ..ApiError::internal("the server is shutting down; the request was not completed")
        }
    }

    /// 408 for a request body that did not arrive in time.
    pub fn body_timeout(secs: f64) -> Self {
        ApiError::invalid(
            format!("the request body did not arrive within {secs} s (--idle-timeout)"),
            None,
        )
        .status(StatusCode::REQUEST_TIMEOUT)
        .with_code("request_timeout")
    }

    /// 503 for a connection beyond `--max-connections`.
    pub fn too_many_connections(max: usize) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: Some("too_many_connections"),
            retry_after: Some(1),
            ..ApiError::internal(format!(
                "the server has {max} connections open (--max-connections); retry shortly"
            ))
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
