//! Publishing a job: `Nats-Msg-Id` = job id so JetStream de-duplicates
//! resubmissions, the reply subject in a header, and the PubAck awaited so the
//! caller knows the job is stored.

use async_nats::jetstream::{self, context::PublishErrorKind, publish::PublishAck};
use async_nats::HeaderMap;
use jetinfer_schemas::{encode_job, headers, Job};

use crate::subjects::{self, SubjectError, Tenant};

/// Why a job was not accepted by JetStream.
#[derive(Debug, thiserror::Error)]
pub enum PublishJobError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The stream is at a limit and refuses new jobs: back off and retry.
    #[error("the job queue is full: retry later")]
    QueueFull,
    /// No stream listens on the job subject: no worker was ever started here.
    #[error("no jobs stream on this server: start a worker (it provisions the stream) first")]
    NoStream,
    /// No PubAck arrived in time: the job may or may not be stored. Retrying
    /// with the same job id is safe (JetStream de-duplicates it).
    #[error("JetStream did not acknowledge the job in time; retrying with the same id is safe")]
    Timeout,
    /// The connection dropped while publishing; the client is reconnecting.
    #[error("connection to NATS lost while publishing; retrying with the same id is safe")]
    Disconnected,
    #[error("publishing job: {0}")]
    Other(#[source] jetstream::context::PublishError),
}

impl From<jetstream::context::PublishError> for PublishJobError {
    fn from(err: jetstream::context::PublishError) -> Self {
        match err.kind() {
            PublishErrorKind::TimedOut => Self::Timeout,
            PublishErrorKind::BrokenPipe => Self::Disconnected,
            PublishErrorKind::StreamNotFound => Self::NoStream,
            _ if is_limit_refusal(&err) => Self::QueueFull,
            _ => Self::Other(err),
        }
    }
}

/// JetStream answers a full stream with discard=new with error code 10077
/// ("maximum messages exceeded") or 10047 ("maximum bytes exceeded").
fn is_limit_refusal(err: &jetstream::context::PublishError) -> bool {
    let text = err.to_string();
    text.contains("maximum messages")
        || text.contains("maximum bytes")
        || text.contains("10077")
        || text.contains("10047")
}

/// Publishes `job` for `tenant`, asking for the result on `reply_to`, and waits
/// until JetStream has stored it.
pub async fn publish_job(
    js: &jetstream::Context,
    tenant: &Tenant,
    job: &Job,
    reply_to: &str,
) -> Result<PublishAck, PublishJobError> {
    let subject = subjects::job(&job.model, tenant)?;
    let mut headers = HeaderMap::new();
    headers.insert(headers::MSG_ID, job.id.as_str());
    headers.insert(headers::REPLY_TO, reply_to);
    let ack = js
        .publish_with_headers(subject, headers, encode_job(job).into())
        .await?
        .await?;
    Ok(ack)
}

impl PublishJobError {
    /// Whether publishing the same job again (same id) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout | Self::Disconnected)
    }
}
