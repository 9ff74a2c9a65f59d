//! The job a producer enqueues, and its validation.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_JOB_ID_LEN, MAX_MODEL_NAME_LEN};
use crate::{ErrorCode, JobError, Limits, EMBED_WIRE_VERSION, RERANK_WIRE_VERSION, WIRE_VERSION};

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

/// What a job asks of its model. Absent on the wire means [`Task::Embed`],
/// so every wire-version-1 job is an embedding job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One embedding per input.
    #[default]
    Embed,
    /// One relevance score per document (the job's `inputs`) against the
    /// job's [`RerankQuery`], by a cross-encoder. Written as wire version 2,
    /// so a worker of version 1 refuses it (`unsupported_version`) instead of
    /// embedding the documents.
    Rerank,
    /// A task this version does not know: answered `unsupported_task`.
    #[serde(other)]
    Unknown,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Rerank => "rerank",
            Task::Unknown => "unknown",
        }
    }

    fn is_embed(&self) -> bool {
        *self == Task::Embed
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The query a rerank job scores its documents against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RerankQuery {
    pub query: String,
    /// Answer only the `top_n` best-scoring documents (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_n: Option<u32>,
}

/// A job: one or more texts for one model, to embed, or to score against a
/// query ([`Task::Rerank`]: the texts are the documents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    #[serde(default = "wire_version")]
    pub version: u16,
    pub id: JobId,
    /// Model name as it appears in the subject (`jobs.<model>.<tenant>`).
    pub model: String,
    /// Absent for embedding jobs, so older readers see the job they know.
    #[serde(default, skip_serializing_if = "Task::is_embed")]
    pub task: Task,
    /// The texts to embed, or a rerank job's documents.
    pub inputs: Vec<String>,
    /// A rerank job's query (present exactly when `task` is rerank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<RerankQuery>,
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
    /// An embedding job with a fresh ULID id and default options, written
    /// as wire version 1 so workers of every version take it.
    pub fn new(model: impl Into<String>, inputs: Vec<String>) -> Self {
        Self {
            version: EMBED_WIRE_VERSION,
            id: ulid::Ulid::new().to_string(),
            model: model.into(),
            task: Task::Embed,
            inputs,
            rerank: None,
            options: JobOptions::default(),
            deadline_unix_ms: None,
        }
    }

    /// A rerank job: `documents` scored against `query` by a cross-encoder,
    /// answered with the `top_n` best (all when `None`), best first.
    pub fn rerank(
        model: impl Into<String>,
        query: impl Into<String>,
        documents: Vec<String>,
        top_n: Option<u32>,
    ) -> Self {
        Self {
            version: RERANK_WIRE_VERSION,
            task: Task::Rerank,
            rerank: Some(RerankQuery {
                query: query.into(),
                top_n,
            }),
            ..Self::new(model, documents)
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
        match self.task {
            Task::Embed => {}
            Task::Rerank => return self.validate_rerank(limits),
            Task::Unknown => {
                return Err(JobError::new(
                    ErrorCode::UnsupportedTask,
                    "job asks for a task this worker does not know (it knows embed and rerank)",
                ))
            }
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
            check_chars(&format!("input {index}"), input, limits)?;
        }
        Ok(())
    }

    /// A rerank job's own rules: a query, 1 to `max_documents_per_rerank`
    /// documents, each text within `max_chars_per_input`.
    fn validate_rerank(&self, limits: &Limits) -> Result<(), JobError> {
        let Some(rerank) = &self.rerank else {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                "rerank job has no query: send `rerank.query`",
            ));
        };
        if self.inputs.is_empty() {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                "rerank job has no documents: send at least one",
            ));
        }
        if self.inputs.len() > limits.max_documents_per_rerank {
            return Err(JobError::new(
                ErrorCode::TooManyInputs,
                format!(
                    "rerank job has {} documents, the limit is {}: split it into several jobs",
                    self.inputs.len(),
                    limits.max_documents_per_rerank
                ),
            ));
        }
        if rerank.top_n == Some(0) {
            return Err(JobError::new(
                ErrorCode::InvalidInput,
                "top_n is 0: ask for at least one document, or leave it out for all",
            ));
        }
        check_chars("the query", &rerank.query, limits)?;
        for (index, document) in self.inputs.iter().enumerate() {
            check_chars(&format!("document {index}"), document, limits)?;
        }
        Ok(())
    }
}

/// `text` within `max_chars_per_input` characters, or `input_too_long`
/// naming it as `what`.
fn check_chars(what: &str, text: &str, limits: &Limits) -> Result<(), JobError> {
    // Byte length bounds the character count from above, so most texts
    // skip the character walk.
    if text.len() > limits.max_chars_per_input {
        let chars = text.chars().count();
        if chars > limits.max_chars_per_input {
            return Err(JobError::new(
                ErrorCode::InputTooLong,
                format!(
                    "{what} has {chars} characters, the limit is {}",
                    limits.max_chars_per_input
                ),
            ));
        }
    }
    Ok(())
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
