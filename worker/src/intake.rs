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

use crate::backend::{Backend, Tokens};
use crate::config::PullConfig;
use crate::job::{expired, InFlightJob};
use crate::publish::{deadline_error, Responder};

/// Pause before re-opening a pull stream that failed (e.g. missed heartbeats
/// while the server restarts).
const REPULL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

pub struct Intake {
    pub consumer: PullConsumer,
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub limits: Limits,
    pub pull: PullConfig,
    pub responder: Responder,
}

impl Intake {
    /// Pulls until `shutdown` fires; dropping `jobs` on return lets the
    /// batcher flush and the pipeline drain behind it.
    pub async fn run(self, jobs: mpsc::Sender<Arc<InFlightJob>>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(self.pull.batch)
                .heartbeat(self.pull.heartbeat)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "opening pull stream failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(REPULL_DELAY) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        let span = job_span(&message);
                        if let Some(job) = self.admit(message).instrument(span.clone()).await {
                            jetinfer_monitoring::job_admitted(&self.model);
                            let job = job.with_span(span);
                            if jobs.send(Arc::new(job)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "pull stream error; re-pulling");
                        break;
                    }
                    None => break,
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
                let ack = if reply_to.is_some() {
                    AckKind::Ack
                } else {
                    AckKind::Term
                };
                self.responder
                    .reject(&message, reply_to.as_deref(), &header_id, err.into(), ack)
                    .await;
                return None;
            }
        };
        let Some(reply_to) = reply_to else {
            tracing::warn!(job = %job.id, "job has no {} header: nobody to answer; terminated", headers::REPLY_TO);
            jetinfer_monitoring::job_dead_lettered(
                &self.model,
                jetinfer_monitoring::DeadLetter::NoReplySubject,
            );
            crate::publish::settle(&message, AckKind::Term).await;
            return None;
        };
        if let Err(error) = self.check(&job, &message) {
            self.responder
                .reject(&message, Some(&reply_to), &job.id, error, AckKind::Ack)
                .await;
            return None;
        }
        let published = message
            .info()
            .map(|info| info.published)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());

        let tokens = match self.tokenize(&job).await {
            Ok(tokens) => tokens,
            Err(error) => {
                self.responder
                    .reject(&message, Some(&reply_to), &job.id, error, AckKind::Ack)
                    .await;
                return None;
            }
        };
        Some(InFlightJob::new(
            job.id,
            job.options,
            job.deadline_unix_ms,
            reply_to,
            message,
            published,
            tokens,
        ))
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

impl Intake {
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
