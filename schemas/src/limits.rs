//! Named limits every job is validated against before any work is done.

use serde::{Deserialize, Serialize};

/// Default largest encoded job accepted, in bytes.
pub const DEFAULT_MAX_JOB_BYTES: usize = 1024 * 1024;
/// Default most inputs one job may carry.
pub const DEFAULT_MAX_INPUTS_PER_JOB: usize = 256;
/// Default most documents one rerank job may carry: each is a forward pass
/// of its own (query and document together), so fewer than embedding inputs.
pub const DEFAULT_MAX_DOCUMENTS_PER_RERANK: usize = 128;
/// Default most characters (Unicode scalar values) one input may have.
pub const DEFAULT_MAX_CHARS_PER_INPUT: usize = 32 * 1024;
/// Longest job id: it doubles as JetStream's `Nats-Msg-Id` header.
pub const MAX_JOB_ID_LEN: usize = 128;
/// Longest model name: it is a subject token.
pub const MAX_MODEL_NAME_LEN: usize = 64;

/// Input limits, configurable on the worker; the defaults suit a sentence
/// embedding model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest encoded job, in bytes.
    pub max_job_bytes: usize,
    /// Most inputs per job.
    pub max_inputs_per_job: usize,
    /// Most characters per input, counted before tokenisation.
    pub max_chars_per_input: usize,
    /// Most documents per rerank job.
    pub max_documents_per_rerank: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_job_bytes: DEFAULT_MAX_JOB_BYTES,
            max_inputs_per_job: DEFAULT_MAX_INPUTS_PER_JOB,
            max_chars_per_input: DEFAULT_MAX_CHARS_PER_INPUT,
            max_documents_per_rerank: DEFAULT_MAX_DOCUMENTS_PER_RERANK,
        }
    }
}
