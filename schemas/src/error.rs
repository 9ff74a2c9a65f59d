//! The typed error a worker returns instead of embeddings.

use serde::{Deserialize, Serialize};

/// What went wrong, as a stable machine-readable code.
///
/// Serialised in `snake_case`; an unknown code from a newer worker decodes as
/// [`ErrorCode::Unknown`] rather than failing the whole result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job could not be decoded or breaks a rule (empty inputs, bad id...).
    InvalidInput,
    /// A header of the job message is malformed or over its limit (see
    /// `headers`); the message names which.
    InvalidHeader,
    /// No worker serves the requested model.
    UnknownModel,
    /// An input is longer than the model accepts and the job asked to reject.
    InputTooLong,
    /// The job carries more inputs than the limit.
    TooManyInputs,
    /// The encoded job is larger than the limit.
    PayloadTooLarge,
    /// The job was written in a newer wire version than this worker reads.
    UnsupportedVersion,
    /// The job's deadline passed before it could be answered.
    DeadlineExceeded,
    /// The worker failed; the job may succeed if retried.
    Internal,
    /// The tenant sent jobs faster than its rate limit allows. The job was not
    /// run; submit it again after [`JobError::retry_after`].
    RateLimited,
    /// The job costs more (inputs or tokens) than its tenant's rate-limit
    /// burst, so it could never pass the limit: waiting would not help.
    /// Split it into smaller jobs.
    TooCostly,
    /// The job's bulk run was cancelled (`jetinfer bulk cancel`) before the
    /// job was computed.
    Cancelled,
    /// The job asks for a task (embed, rerank) that the worker serving its
    /// model does not perform, or one no version knows.
    UnsupportedTask,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::InvalidHeader => "invalid_header",
            Self::UnknownModel => "unknown_model",
            Self::InputTooLong => "input_too_long",
            Self::TooManyInputs => "too_many_inputs",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
            Self::RateLimited => "rate_limited",
            Self::TooCostly => "too_costly",
            Self::Cancelled => "cancelled",
            Self::UnsupportedTask => "unsupported_task",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed error reply: a code to branch on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    /// For [`ErrorCode::RateLimited`]: milliseconds to wait before submitting
    /// again. Absent on the wire when not set, so older readers and writers
    /// are unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A [`ErrorCode::RateLimited`] error asking the caller to wait `after`.
    pub fn rate_limited(message: impl Into<String>, after: std::time::Duration) -> Self {
        Self {
            retry_after_ms: Some(after.as_millis().try_into().unwrap_or(u64::MAX).max(1)),
            ..Self::new(ErrorCode::RateLimited, message)
        }
    }

    /// How long to wait before submitting the job again, when the worker said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after_ms.map(std::time::Duration::from_millis)
    }
}
