//! Every refusal the gateway answers, in OpenAI's error shape with the
//! status the issue lists: 400 invalid input, 401 no or bad credentials,
//! 403 not allowed, 404 unknown model or route, 413 too large, 429 rate
//! limited or quota full (with `Retry-After`), 503 queue full or no worker,
//! 504 timed out (the job may still complete). Built from the producer's
//! [`SubmitError`] and the worker's typed [`JobError`] codes, so nothing a
//! caller sees depends on an error's text.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jetinfer_producer::batches::BatchError;
use jetinfer_producer::SubmitError;
use jetinfer_schemas::{ErrorCode, JobError};

use crate::openai::{ErrorBody, ErrorDetail};

/// Asked of a caller refused by a full tenant quota (the worker names no
/// wait for it): about one job's time.
pub const QUOTA_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An OpenAI-shaped error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .param(param)
            .code("invalid_value")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).code("permission_denied")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model '{}' does not exist or no worker serves it",
                shown(model)
            ),
        )
        .param("model")
        .code("model_not_found")
    }

    pub fn too_large(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
            .code("request_too_large")
        }
    }

    pub fn rate_limited(message: impl Into<String>, after: Duration) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .code("rate_limit_exceeded")
            .retry_after(after)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .code("service_unavailable")
    }

    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message).code("timeout")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).code("internal")
    }

    /// A refused or failed submit of a job for `model`.
    pub fn from_submit(err: SubmitError, model: &str) -> Self {
        match err {
            SubmitError::UnknownModel(_) | SubmitError::Subject(_) => Self::model_not_found(model),
            SubmitError::QueueFull => {
                Self::unavailable("The job queue is full; retry later").retry_after(QUOTA_RETRY_AFTER)
            }
            SubmitError::QuotaExceeded { .. } => Self::rate_limited(
                "Your tenant has its quota of jobs queued for this model; retry once some are answered",
                QUOTA_RETRY_AFTER,
            )
            .code("quota_exceeded"),
            SubmitError::Timeout { job_id, after } => Self::timed_out(format!(
                "No result for job {job_id} within {}s; it stays queued and may still complete",
                after.as_secs()
            )),
            other => {
                tracing::warn!(error = %jetinfer_schemas::Untrusted(&other.to_string()), "submit failed");
                Self::unavailable("The job queue cannot be reached; retry later")
            }
        }
    }

    /// A Batch API refusal, per `producer::batches::BatchError`'s table.
    pub fn from_batch(err: BatchError) -> Self {
        let message = err.to_string();
        match err {
            BatchError::NotFound { param, .. } => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).param(param)
            }
            BatchError::Invalid { param, .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
            }
            BatchError::TooLarge(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
            .param("file"),
            BatchError::Conflict(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
            }
            BatchError::Store(_) | BatchError::Connect(_) | BatchError::LeaseLost { .. } => {
                tracing::warn!(error = %jetinfer_schemas::Untrusted(&message), "batch store");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "The batch store cannot be reached; retry later",
                )
            }
        }
    }

    /// The worker's typed error for the job.
    pub fn from_job(err: JobError) -> Self {
        let message = err.message.clone();
        match err.code {
            ErrorCode::InvalidInput | ErrorCode::InvalidHeader | ErrorCode::UnsupportedVersion => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
                    .code("invalid_value")
            }
            // The model serves another task (a cross-encoder asked for
            // embeddings).
            ErrorCode::UnsupportedTask => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
                    .param("model")
                    .code("unsupported_task")
            }
            ErrorCode::UnknownModel => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .param("model")
                    .code("model_not_found")
            }
            ErrorCode::InputTooLong | ErrorCode::TooManyInputs | ErrorCode::PayloadTooLarge => {
                Self::too_large(Some("input"), message)
            }
            ErrorCode::TooCostly => Self::too_large(
                Some("input"),
                format!("{message} (larger than the rate limit's burst: split the request)"),
            ),
            ErrorCode::RateLimited => {
                Self::rate_limited(message, err.retry_after().unwrap_or(QUOTA_RETRY_AFTER))
            }
            ErrorCode::DeadlineExceeded => Self::timed_out(message),
            ErrorCode::Internal | ErrorCode::Cancelled | ErrorCode::Unknown => {
                Self::internal(message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let headers = response.headers_mut();
            // Whole seconds, rounded up, for every client; milliseconds for
            // the OpenAI SDKs, which prefer `retry-after-ms`.
            let secs = after.as_millis().div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from(after.as_millis().max(1) as u64),
            );
        }
        response
    }
}

/// A caller's text quoted in a message: escaped and cut short.
pub fn shown(text: &str) -> String {
    jetinfer_schemas::escape_within(text, 64)
}
