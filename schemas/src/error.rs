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
    /// The job's bulk run was cancelled (`jetinfer bulk cancel`) before the
    /// job was computed.
    Cancelled,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::UnknownModel => "unknown_model",
            Self::InputTooLong => "input_too_long",
            Self::TooManyInputs => "too_many_inputs",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
            Self::Cancelled => "cancelled",
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
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
