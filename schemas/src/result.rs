//! The result a worker publishes on a job's reply subject.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, JobError, JobId, EMBED_WIRE_VERSION, RERANK_WIRE_VERSION};

/// Which model produced an embedding, so stored vectors can be traced to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model identifier, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub id: String,
    /// Revision of the weights (a content hash when no revision is declared).
    pub revision: String,
    /// Embedding dimension.
    pub dimension: u32,
}

/// Where the time went, as the worker saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// From JetStream's publish time to the start of the job's first batch.
    pub queue_wait_us: u64,
    /// Forward-pass time of the batches the job's inputs ran in.
    pub inference_us: u64,
    /// Largest batch (in inputs, across all jobs) the job's inputs ran in.
    pub batch_size: u32,
}

/// The successful payload: one embedding per input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    pub model: ModelInfo,
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens per input, special tokens included, after truncation.
    pub token_counts: Vec<u32>,
    /// Whether each input was truncated to the model's maximum length.
    #[serde(default)]
    pub truncated: Vec<bool>,
    pub timings: Timings,
}

/// One document's relevance to a rerank job's query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RerankScore {
    /// The document's position in the job's `inputs`.
    pub index: u32,
    /// `sigmoid(logit)`, in 0..1, as sentence-transformers' `CrossEncoder`
    /// and text-embeddings-inference report it.
    pub score: f32,
    /// The classifier's raw output.
    pub logit: f32,
}

/// A rerank job's answer: its documents by relevance, best first (ties in
/// document order), cut to the job's `top_n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reranked {
    /// `dimension` is the classifier's number of outputs (1).
    pub model: ModelInfo,
    pub results: Vec<RerankScore>,
    /// Tokens of each (query, document) pair, in document order, special
    /// tokens included, after truncation.
    pub token_counts: Vec<u32>,
    /// Whether each pair was cut to the model's maximum length.
    #[serde(default)]
    pub truncated: Vec<bool>,
    pub timings: Timings,
}

/// Embeddings, rerank scores or a typed error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Embeddings),
    Error(JobError),
    /// Only ever the answer to a rerank job, so a reader that sends none
    /// never meets it.
    Reranked(Reranked),
}

/// What a worker publishes on a job's reply subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    #[serde(default = "wire_version")]
    pub version: u16,
    pub job_id: JobId,
    pub outcome: Outcome,
}

fn wire_version() -> u16 {
    EMBED_WIRE_VERSION
}

impl JobResult {
    pub fn ok(job_id: JobId, embeddings: Embeddings) -> Self {
        Self {
            version: EMBED_WIRE_VERSION,
            job_id,
            outcome: Outcome::Ok(embeddings),
        }
    }

    pub fn reranked(job_id: JobId, reranked: Reranked) -> Self {
        Self {
            version: RERANK_WIRE_VERSION,
            job_id,
            outcome: Outcome::Reranked(reranked),
        }
    }

    pub fn error(job_id: JobId, error: JobError) -> Self {
        Self {
            version: EMBED_WIRE_VERSION,
            job_id,
            outcome: Outcome::Error(error),
        }
    }

    /// The embeddings, or the job's error.
    pub fn into_result(self) -> Result<Embeddings, JobError> {
        match self.outcome {
            Outcome::Ok(embeddings) => Ok(embeddings),
            Outcome::Error(error) => Err(error),
            Outcome::Reranked(_) => Err(not_the_task("rerank scores", "embeddings")),
        }
    }

    /// The rerank scores, or the job's error.
    pub fn into_reranked(self) -> Result<Reranked, JobError> {
        match self.outcome {
            Outcome::Reranked(reranked) => Ok(reranked),
            Outcome::Error(error) => Err(error),
            Outcome::Ok(_) => Err(not_the_task("embeddings", "rerank scores")),
        }
    }
}

fn not_the_task(got: &str, wanted: &str) -> JobError {
    JobError::new(
        ErrorCode::UnsupportedTask,
        format!("the result holds {got}, not {wanted}: the job asked for another task"),
    )
}
