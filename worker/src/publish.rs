//! The publish stage: assembles each job's embeddings as its batches finish,
//! publishes the result on the job's reply subject, flushes, and only then
//! acks the job. A job whose deadline passed while it waited gets
//! `deadline_exceeded` instead.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use jetinfer_schemas::{encode_result, ErrorCode, JobError, JobResult, ModelInfo, Outcome};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::infer::Done;
use crate::job::InFlightJob;

/// Publishes replies and acks jobs. Shared by intake (early error replies) and
/// the publish stage (results).
#[derive(Clone)]
pub struct Responder {
    client: async_nats::Client,
    /// The model name jobs are addressed to: the `model` label of metrics.
    model: Arc<str>,
}

impl Responder {
    pub fn new(client: async_nats::Client, model: String) -> Self {
        Self {
            client,
            model: model.into(),
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Publishes `result` to `reply_to` (buffered; see [`Responder::flush`]).
    pub async fn send(&self, reply_to: &str, result: &JobResult) {
        let payload = encode_result(result);
        if let Err(err) = self
            .client
            .publish(reply_to.to_string(), payload.into())
            .await
        {
            tracing::warn!(job = %result.job_id, error = %err, "publishing reply failed");
        }
    }

    pub async fn flush(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::warn!(error = %err, "flushing replies failed");
        }
    }

    /// Sends an error reply (when there is somewhere to send it), then settles
    /// the message with `ack` (`Ack` when the job is answered, `Term` when it
    /// can never succeed and has nobody to tell).
    pub async fn reject(
        &self,
        message: &Message,
        reply_to: Option<&str>,
        job_id: &str,
        error: JobError,
        ack: AckKind,
    ) {
        tracing::info!(job = job_id, code = %error.code, reason = %error.message, "job rejected");
        match reply_to {
            Some(_) => jetinfer_monitoring::job_finished(
                &self.model,
                error.code.as_str(),
                since_stored(message),
            ),
            None => jetinfer_monitoring::job_dead_lettered(
                &self.model,
                jetinfer_monitoring::DeadLetter::NoReplySubject,
            ),
        }
        if let Some(reply_to) = reply_to {
            self.send(reply_to, &JobResult::error(job_id.to_string(), error))
                .await;
            self.flush().await;
        }
        settle(message, ack).await;
    }
}

pub async fn settle(message: &Message, ack: AckKind) {
    if let Err(err) = message.ack_with(ack).await {
        tracing::warn!(error = %err, "acknowledging job failed");
    }
}

/// Runs until `done` closes (after the inference thread finished its last batch).
pub async fn run(model: ModelInfo, responder: Responder, mut done: mpsc::Receiver<Done>) {
    while let Some(Done {
        batch,
        run,
        embeddings,
    }) = done.recv().await
    {
        let mut finished: Vec<(Arc<InFlightJob>, JobResult)> = Vec::new();
        let tokens = batch.items.iter().map(|w| w.len).sum();
        jetinfer_monitoring::record_batch(
            responder.model(),
            run.size,
            tokens,
            batch.padded_tokens,
            run.elapsed,
        );
        match embeddings {
            Ok(embeddings) => {
                for (item, embedding) in batch.items.into_iter().zip(embeddings) {
                    if item.job.complete_input(item.input, embedding, run) {
                        let job = item.job;
                        let result = if job.expired(OffsetDateTime::now_utc()) {
                            JobResult::error(job.id.clone(), deadline_error())
                        } else {
                            JobResult::ok(job.id.clone(), job.take_embeddings(&model))
                        };
                        finished.push((job, result));
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, size = run.size, "batch failed");
                for item in batch.items {
                    if item.job.fail() {
                        let error = JobError::new(ErrorCode::Internal, err.to_string());
                        finished.push((
                            item.job.clone(),
                            JobResult::error(item.job.id.clone(), error),
                        ));
                    }
                }
            }
        }
        if finished.is_empty() {
            continue;
        }
        for (job, result) in &finished {
            let _span = job.span.enter();
            responder.send(&job.reply_to, result).await;
            record_finished(responder.model(), job, result);
        }
        // Ack only what has been flushed to the server: a crash before this
        // point means redelivery, never a lost result.
        responder.flush().await;
        for (job, _) in &finished {
            settle(&job.message, AckKind::Ack).await;
            jetinfer_monitoring::job_released(responder.model());
        }
    }
}

fn record_finished(model: &str, job: &InFlightJob, result: &JobResult) {
    let outcome = match &result.outcome {
        Outcome::Ok(e) => {
            jetinfer_monitoring::job_queue_wait(
                model,
                Duration::from_micros(e.timings.queue_wait_us),
            );
            jetinfer_monitoring::OUTCOME_OK
        }
        Outcome::Error(err) => err.code.as_str(),
    };
    let stored = (OffsetDateTime::now_utc() - job.published).try_into().ok();
    jetinfer_monitoring::job_finished(model, outcome, stored);
    tracing::debug!(job = %job.id, outcome, "job answered");
}

/// Time since JetStream stored `message`, when its metadata says.
fn since_stored(message: &Message) -> Option<Duration> {
    let published = message.info().ok()?.published;
    (OffsetDateTime::now_utc() - published).try_into().ok()
}

pub fn deadline_error() -> JobError {
    JobError::new(
        ErrorCode::DeadlineExceeded,
        "the job's deadline passed before it could be answered",
    )
}
