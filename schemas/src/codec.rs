//! MessagePack encoding with named fields, and size-checked decoding.

use crate::{escape_within, ErrorCode, Job, JobError, JobResult, Limits, MAX_SHOWN_CHARS};

/// Why bytes could not be turned into a job or result.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a valid jetinfer message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

impl From<DecodeError> for JobError {
    fn from(err: DecodeError) -> Self {
        let code = match err {
            DecodeError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            DecodeError::Malformed(_) => ErrorCode::InvalidInput,
        };
        // A decoder's message can quote what it read (an unknown variant, a
        // bad string): it is shown escaped and cut short.
        JobError::new(code, escape_within(&err.to_string(), MAX_SHOWN_CHARS))
    }
}

pub fn encode_job(job: &Job) -> Vec<u8> {
    // Serialising plain structs of strings and numbers into a Vec cannot fail.
    rmp_serde::to_vec_named(job).expect("a Job always serialises")
}

/// Decodes a job, refusing oversized payloads before parsing them.
pub fn decode_job(bytes: &[u8], limits: &Limits) -> Result<Job, DecodeError> {
    if bytes.len() > limits.max_job_bytes {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_job_bytes,
        });
    }
    Ok(rmp_serde::from_slice(bytes)?)
}

pub fn encode_result(result: &JobResult) -> Vec<u8> {
    rmp_serde::to_vec_named(result).expect("a JobResult always serialises")
}

pub fn decode_result(bytes: &[u8]) -> Result<JobResult, DecodeError> {
    Ok(rmp_serde::from_slice(bytes)?)
}
