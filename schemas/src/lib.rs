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
mod job;
mod limits;
mod result;

pub use codec::{decode_job, decode_result, encode_job, encode_result, DecodeError};
pub use error::{ErrorCode, JobError};
pub use job::{Job, JobId, JobOptions, Truncation};
pub use limits::Limits;
pub use result::{Embeddings, JobResult, ModelInfo, Outcome, Timings};

/// Version of the wire format this crate writes. Readers accept any version up
/// to this one; a newer version is refused with [`ErrorCode::UnsupportedVersion`].
pub const WIRE_VERSION: u16 = 1;

/// Header names jetinfer sets on job messages.
pub mod headers {
    /// Subject the worker publishes the [`crate::JobResult`] to.
    pub const REPLY_TO: &str = "Jetinfer-Reply-To";
    /// JetStream's de-duplication header; jetinfer sets it to the job id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context of the submitting caller, carried into the worker's spans.
    pub const TRACEPARENT: &str = "traceparent";
    /// The bulk run a job belongs to (`jetinfer bulk`); workers answer jobs
    /// of a cancelled run `cancelled` instead of computing them.
    pub const BULK_RUN: &str = "Jetinfer-Bulk-Run";
}
