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
pub use job::{Job, JobId, JobOptions, Truncation};
pub use limits::Limits;
pub use result::{Embeddings, JobResult, ModelInfo, Outcome, Timings};
pub use untrusted::{escape_for_log, escape_within, Untrusted, MAX_SHOWN_CHARS};

/// Version of the wire format this crate writes. Readers accept any version up
/// to this one; a newer version is refused with [`ErrorCode::UnsupportedVersion`].
pub const WIRE_VERSION: u16 = 1;
