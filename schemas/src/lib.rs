//! jetinfer's wire format: everything that crosses NATS is defined here, once.
//!
//! A producer publishes a [`Job`] on `jobs.<model>.<tenant>`; the reply subject
//! travels in the [`headers::REPLY_TO`] header because JetStream uses the
//! message's own reply subject for acks. The worker answers with a [`JobResult`]
//! whose [`Outcome`] is either embeddings or a typed [`JobError`].
//!
//! Encoding is MessagePack with named fields (`rmp_serde::to_vec_named`), so a
//! field can be added later without breaking older readers. This crate is pure:
//! types, codec, validation and limits, no I/O.

mod codec;
mod error;
pub mod headers;
mod job;
mod limits;
mod result;
mod untrusted;

pub use codec::{decode_job, decode_result, encode_job, encode_result, DecodeError};
pub use error::{ErrorCode, JobError};
pub use job::{Job, JobId, JobOptions, RerankQuery, Task, Truncation};
pub use limits::Limits;
pub use result::{Embeddings, JobResult, ModelInfo, Outcome, RerankScore, Reranked, Timings};
pub use untrusted::{escape_for_log, escape_within, Untrusted, MAX_SHOWN_CHARS};

/// Newest version of the wire format this crate reads. Readers accept any
/// version up to this one; a newer version is refused with
/// [`ErrorCode::UnsupportedVersion`]. Each message is written in the oldest
/// version that holds it, so older readers keep reading what they can.
pub const WIRE_VERSION: u16 = RERANK_WIRE_VERSION;
/// Embedding jobs and their results: every reader takes them.
pub const EMBED_WIRE_VERSION: u16 = 1;
/// Rerank jobs ([`Task::Rerank`]) and their results: a version-1 worker
/// refuses such a job as `unsupported_version` rather than embedding it.
pub const RERANK_WIRE_VERSION: u16 = 2;
