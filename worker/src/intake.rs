//! The intake stage: pulls job messages from the model's consumer, decodes and
//! validates them, tokenises their inputs off the runtime, and hands admitted
//! jobs to the batcher. A job that can never succeed is answered here with a
//! typed error and never reaches the model.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use jetinfer_nats::subjects;
use jetinfer_schemas::{decode_job, headers, ErrorCode, Job, JobError, Limits, Truncation};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use std::sync::atomic::AtomicBool;

use crate::backend::{Backend, Tokens};
use crate::cancel::{cancelled_error, Cancellations};
use crate::config::PullConfig;
use crate::job::{expired, InFlightJob};
use crate::publish::{deadline_error, Settler};

/// Pause before pulling again after a pull failed (e.g. while the server
/// restarts).
const REPULL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

pub struct Intake {
    pub consumer: PullConsumer,
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub limits: Limits,
    pub pull: PullConfig,
    pub settler: Settler,
    pub cancellations: Arc<Cancellations>,
}

impl Intake {
    /// Pulls until `shutdown` fires; dropping `jobs` on return lets the
    /// batcher flush and the pipeline drain behind it.
    ///
    /// Pulls are discrete requests (`pull.batch` messages, expiring after
    /// `pull.expires`), so on shutdown the worker knows exactly what it was
    /// sent: messages of the last request that arrive after shutdown are
    /// NAKed for another worker at once instead of waiting out `ack_wait`.
    pub async fn run(self, jobs: mpsc::Sender<Arc<InFlightJob>>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let request = self
                .consumer
                .batch()
                .max_messages(self.pull.batch)
                .expires(self.pull.expires)
                .messages()
                .await;
            let mut messages = match request {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "pull failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(REPULL_DELAY) => continue,
                    }
                }
            };
            while let Some(next) = messages.next().await {
                let message = match next {
                    Ok(message) => message,
                    Err(err) => {
                        tracing::warn!(error = %err, "pull interrupted; pulling again");
                        tokio::time::sleep(REPULL_DELAY).await;
                        break;
                    }
                };
                if shutdown.is_cancelled() {
                    if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::warn!(error = %err, "handing back a job failed; it returns after ack_wait");
                    }
                    continue;
                }
                let span = job_span(&message);
                if let Some(job) = self.admit(message).instrument(span.clone()).await {
                    let job = Arc::new(job.with_span(span));
                    self.settler.admitted(&job);
                    if jobs.send(job).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Turns a message into an admitted job, or answers it and returns `None`.
    async fn admit(&self, message: Message) -> Option<InFlightJob> {
        let delivery = message.info().map(|i| i.delivered).unwrap_or(1);
        jetinfer_monitoring::job_received(&self.model, delivery);
        let reply_to = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::REPLY_TO))
            .map(|v| v.as_str().to_string());
        let header_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::MSG_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();

        let job = match decode_job(&message.payload, &self.limits) {
            Ok(job) => job,
            Err(err) => {
                self.settler
                    .give_up(&message, reply_to.as_deref(), &header_id, err.into(), true)
                    .await;
                return None;
            }
        };
        let Some(reply_to) = reply_to else {
            let error = JobError::new(
                ErrorCode::InvalidInput,
                format!("job has no {} header: nobody to answer", headers::REPLY_TO),
            );
            self.settler
                .give_up(&message, None, &job.id, error, true)
                .await;
            return None;
        };
        if let Err(error) = self.check(&job, &message) {
            // An expired job is late, not poison: no dead letter.
            let keep = error.code != ErrorCode::DeadlineExceeded;
            self.settler
                .give_up(&message, Some(&reply_to), &job.id, error, keep)
                .await;
            return None;
        }
        let cancel_flag = self.cancel_flag(&message);
        if crate::cancel::is_cancelled(&cancel_flag) {
            // Answered, not poison: no dead letter.
            self.settler
                .give_up(&message, Some(&reply_to), &job.id, cancelled_error(), false)
                .await;
            return None;
        }
        let (key, delivered, published) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered, info.published),
            Err(_) => (0, 1, OffsetDateTime::now_utc()),
        };

        let tokens = match self.tokenize(&job).await {
            Ok(tokens) => tokens,
            Err(error) => {
                self.settler
                    .give_up(&message, Some(&reply_to), &job.id, error, true)
                    .await;
                return None;
            }
        };
        Some(
            InFlightJob::new(
                key,
                delivered,
                job.id,
                job.options,
                job.deadline_unix_ms,
                reply_to,
                message,
                published,
                tokens,
            )
            .with_cancel_flag(cancel_flag),
        )
    }

    /// The cancel flag of the bulk run the job belongs to, if it names one.
    /// The tenant comes from the subject, never from the producer's header.
    fn cancel_flag(&self, message: &Message) -> Option<Arc<AtomicBool>> {
        let run = message.headers.as_ref()?.get(headers::BULK_RUN)?;
        let (_, tenant) = subjects::parse_job(&message.subject)?;
        Some(self.cancellations.flag(tenant, run.as_str()))
    }

    /// Checks that need no tokenizer: limits, model, deadline.
    fn check(&self, job: &Job, message: &Message) -> Result<(), JobError> {
        job.validate(&self.limits)?;
        let subject_model = subjects::parse_job(&message.subject).map(|(model, _)| model);
        if job.model != self.model || subject_model != Some(self.model.as_str()) {
            return Err(JobError::new(
                ErrorCode::UnknownModel,
                format!(
                    "model {:?} is not served on this subject (this worker serves {:?})",
                    job.model, self.model
                ),
            ));
        }
        if expired(job.deadline_unix_ms, OffsetDateTime::now_utc()) {
            return Err(deadline_error());
        }
        Ok(())
    }

    /// Tokenises every input on a blocking thread.
    async fn tokenize(&self, job: &Job) -> Result<Vec<Tokens>, JobError> {
        let backend = Arc::clone(&self.backend);
        let inputs = job.inputs.clone();
        let reject_long = job.options.truncation == Truncation::Reject;
        let tokens = tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .map(|text| backend.tokenize(text))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| JobError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| JobError::new(ErrorCode::Internal, e.to_string()))?;
        if reject_long {
            if let Some(index) = tokens.iter().position(|t| t.truncated) {
                return Err(JobError::new(
                    ErrorCode::InputTooLong,
                    format!(
                        "input {index} is longer than the model's {} tokens; shorten it or allow truncation",
                        self.backend.max_seq_len()
                    ),
                ));
            }
        }
        Ok(tokens)
    }
}

/// The span a job's log lines carry from intake to its reply: its JetStream
/// identity and the producer's `traceparent` (W3C trace context), if any, so
/// logs join the caller's trace.
fn job_span(message: &Message) -> tracing::Span {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let traceparent = header(headers::TRACEPARENT).unwrap_or_default();
    let trace_id = traceparent
        .split('-')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    tracing::info_span!(
        "job",
        id = %header(headers::MSG_ID).unwrap_or_default(),
        traceparent = %traceparent,
        trace_id = %trace_id,
    )
}
