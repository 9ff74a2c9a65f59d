//! The job a producer enqueues, and its validation.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_JOB_ID_LEN, MAX_MODEL_NAME_LEN};
use crate::{ErrorCode, JobError, Limits, WIRE_VERSION};

/// A job id: the producer's own, or a generated ULID. It is also the
/// `Nats-Msg-Id` JetStream de-duplicates on, so resubmitting a job with the
/// same id within the stream's duplicate window is a no-op.
pub type JobId = String;

/// What to do with an input longer than the model's maximum sequence length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_seq_length` tokens, as sentence-transformers does.
    #[default]
    Truncate,
    /// Refuse the job with [`ErrorCode::InputTooLong`].
    Reject,
}

/// Per-job options. Every field has a default so older producers stay valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobOptions {
    /// L2-normalise each embedding (cosine similarity becomes a dot product).
    pub normalize: bool,
    pub truncation: Truncation,
    /// Keep only the first `dimensions` values of each embedding (then
    /// normalise, when `normalize` is set), as OpenAI's `dimensions` asks.
    /// Absent on the wire when not set, so older producers and workers are
    /// unaffected. 0 is refused by [`Job::validate`], more than the model's
    /// width by [`JobOptions::check_dimensions`] (the worker knows the width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            normalize: true,
            truncation: Truncation::Truncate,
            dimensions: None,
        }
    }
}

impl JobOptions {
    /// Checks `dimensions` against the width of the model's embeddings.
    pub fn check_dimensions(&self, width: u32) -> Result<(), JobError> {
        match self.dimensions {
            Some(n) if n == 0 || n > width => Err(JobError::new(
                ErrorCode::InvalidInput,
                format!("dimensions is {n}; this model's embeddings have 1 to {width}"),
            )),
            _ => Ok(()),
        }
    }
}

/// An embedding job: one or more texts for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    #[serde(default = "wire_version")]
    pub version: u16,
    pub id: JobId,
    /// Model name as it appears in the subject (`jobs.<model>.<tenant>`).
    pub model: String,
    pub inputs: Vec<String>,
    #[serde(default)]
    pub options: JobOptions,
    /// Answer by this time (Unix epoch, milliseconds) or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
}

fn wire_version() -> u16 {
    WIRE_VERSION
}

impl Job {
    /// A job with a fresh ULID id and default options.
    pub fn new(model: impl Into<String>, inputs: Vec<String>) -> Self {
        Self {
            version: WIRE_VERSION,
            id: ulid::Ulid::new().to_string(),
            model: model.into(),
            inputs,
            options: JobOptions::default(),
            deadline_unix_ms: None,
        }
    }

    pub fn with_id(mut self, id: impl Into<JobId>) -> Self {
        self.id = id.into();
        self
    }

    pub fn with_options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }

    pub fn with_deadline_unix_ms(mut self, deadline: u64) -> Self {
        self.deadline_unix_ms = Some(deadline);
        self
    }

    /// Checks the job against `limits`, cheapest checks first. Token-level
    /// limits need the model's tokenizer and are checked by the worker.
    pub fn validate(&self, limits: &Limits) -> Result<(), JobError> {
        if self.version > WIRE_VERSION {
            return Err(JobError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "job is wire version {}, this worker reads up to {WIRE_VERSION}",
                    self.version
                ),
            ));
        }
        validate_id(&self.id)?;
        if self.model.is_empty() || self.model.len() > MAX_MODEL_NAME_LEN {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                format!("model name must be 1 to {MAX_MODEL_NAME_LEN} bytes"),
            ));
        }
        if self.options.dimensions == Some(0) {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                "dimensions is 0: ask for at least 1, or leave it out for the model's full width",
            ));
        }
        if self.inputs.is_empty() {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                "job has no inputs: send at least one text",
            ));
        }
        if self.inputs.len() > limits.max_inputs_per_job {
            return Err(JobError::new(
                ErrorCode::TooManyInputs,
                format!(
                    "job has {} inputs, the limit is {}: split it into several jobs",
                    self.inputs.len(),
                    limits.max_inputs_per_job
                ),
            ));
        }
        for (index, input) in self.inputs.iter().enumerate() {
            // Byte length bounds the character count from above, so most
            // inputs skip the character walk.
            if input.len() > limits.max_chars_per_input {
                let chars = input.chars().count();
                if chars > limits.max_chars_per_input {
                    return Err(JobError::new(
                        ErrorCode::InputTooLong,
                        format!(
                            "input {index} has {chars} characters, the limit is {}",
                            limits.max_chars_per_input
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A job id must be safe as a header value and short: 1 to 128 printable ASCII
/// characters without spaces.
fn validate_id(id: &str) -> Result<(), JobError> {
    let ok =
        !id.is_empty() && id.len() <= MAX_JOB_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(JobError::new(
            ErrorCode::InvalidInput,
            format!(
                "job id must be 1 to {MAX_JOB_ID_LEN} printable ASCII characters without spaces"
            ),
        ))
    }
}
