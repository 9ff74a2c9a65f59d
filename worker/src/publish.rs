//! The publish stage, and the one place where jobs are settled.
//!
//! A job ends in exactly one of three ways, and every path goes through
//! [`Settler`]:
//! - answered: result or error reply published and flushed, then acked (with
//!   the double ack, so the worker knows JetStream took it);
//! - retried: NAKed with a growing delay, for failures that may pass;
//! - given up: error reply (when it has a reply subject), stored as a dead
//!   letter with its reason, then terminated.

use std::sync::Arc;

use async_nats::jetstream::{self, AckKind, Message};
use futures::future::join_all;
use jetinfer_nats::dead_letter::{self, DeadLetter};
use jetinfer_schemas::{encode_result, ErrorCode, JobError, JobResult, ModelInfo};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::config::RetryConfig;
use crate::infer::Done;
use crate::job::{InFlightJob, Ledger};

/// Settles jobs. Shared by intake (jobs refused on arrival), the publish stage
/// (results), the progress ticker and the drain.
#[derive(Clone)]
pub struct Settler {
    client: async_nats::Client,
    js: jetstream::Context,
    ledger: Arc<Ledger>,
    retry: RetryConfig,
}

impl Settler {
    pub fn new(client: async_nats::Client, ledger: Arc<Ledger>, retry: RetryConfig) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            ledger,
            retry,
        }
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Publishes replies, flushes, then double-acks each job. A job whose reply
    /// could not be flushed is NAKed instead: its result is not known to have
    /// left, so it must run again rather than be lost.
    pub async fn answer(&self, answered: Vec<(Arc<InFlightJob>, JobResult)>) {
        if answered.is_empty() {
            return;
        }
        let mut sent = Vec::with_capacity(answered.len());
        for (job, result) in answered {
            match self
                .client
                .publish(job.reply_to.clone(), encode_result(&result).into())
                .await
            {
                Ok(()) => sent.push(job),
                Err(err) => {
                    tracing::warn!(job = %job.id, error = %err, "publishing result failed; retrying the job");
                    self.retry_later(&job).await;
                }
            }
        }
        if let Err(err) = self.client.flush().await {
            tracing::warn!(error = %err, "flushing results failed; retrying their jobs");
            for job in &sent {
                self.retry_later(job).await;
            }
            return;
        }
        join_all(sent.iter().map(|job| self.settle(job, AckKind::Ack))).await;
    }

    /// NAKs `job` so JetStream redelivers it after the retry policy's delay.
    pub async fn retry_later(&self, job: &InFlightJob) {
        let delay = self.retry.delay(job.delivered);
        self.settle(job, AckKind::Nak(Some(delay))).await;
    }

    /// NAKs `job` for immediate redelivery to any worker (used by the drain).
    pub async fn hand_back(&self, job: &InFlightJob) {
        self.settle(job, AckKind::Nak(None)).await;
    }

    async fn settle(&self, job: &InFlightJob, kind: AckKind) {
        let outcome = match kind {
            // The double ack waits for JetStream to confirm, so a lost ack
            // shows up here rather than as a silent redelivery later.
            AckKind::Ack => job.message.double_ack().await,
            other => job.message.ack_with(other).await,
        };
        if let Err(err) = outcome {
            tracing::warn!(job = %job.id, error = %err, "settling job failed; JetStream will redeliver it");
        }
        self.ledger.remove(job);
    }

    /// Pushes everything buffered (replies, acks, NAKs) to the server: a
    /// process that exits without it loses its last NAKs and acks.
    pub async fn flush(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::warn!(error = %err, "final flush failed");
        }
    }

    /// Sends a progress ack so JetStream keeps waiting for a job still queued
    /// or running here.
    pub async fn keep_alive(&self, job: &InFlightJob) {
        if let Err(err) = job.message.ack_with(AckKind::Progress).await {
            tracing::debug!(job = %job.id, error = %err, "progress ack failed");
        }
    }

    /// Replies `error` (when there is a reply subject) and terminates the
    /// message; with `dead_letter`, the job is first stored in the dead-letter
    /// stream. If that store fails the message is NAKed instead, so the job is
    /// never dropped without a trace.
    pub async fn give_up(
        &self,
        message: &Message,
        reply_to: Option<&str>,
        job_id: &str,
        error: JobError,
        keep: bool,
    ) {
        tracing::info!(job = job_id, code = %error.code, reason = %error.message, "job refused");
        if let Some(reply_to) = reply_to {
            let result = JobResult::error(job_id.to_string(), error.clone());
            if let Err(err) = self
                .client
                .publish(reply_to.to_string(), encode_result(&result).into())
                .await
            {
                tracing::warn!(job = job_id, error = %err, "publishing error reply failed");
            }
            let _ = self.client.flush().await;
        }
        if keep {
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            let letter = DeadLetter {
                original_subject: &message.subject,
                headers: message.headers.as_ref(),
                payload: message.payload.clone(),
                reason: error.code.as_str(),
                detail: &error.message,
                deliveries: delivered,
            };
            if let Err(err) = dead_letter::publish(&self.js, letter).await {
                tracing::error!(job = job_id, error = %err, "dead letter not stored; job will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(self.retry.max_delay)))
                    .await;
                return;
            }
        }
        if let Err(err) = message.ack_with(AckKind::Term).await {
            tracing::warn!(job = job_id, error = %err, "terminating job failed");
        }
    }

    /// Gives up on an admitted job (held in the ledger).
    pub async fn give_up_job(&self, job: &InFlightJob, error: JobError, keep: bool) {
        self.give_up(&job.message, Some(&job.reply_to), &job.id, error, keep)
            .await;
        self.ledger.remove(job);
    }
}

/// Runs until `done` closes (after the inference thread finished its last batch).
pub async fn run(model: ModelInfo, settler: Settler, mut done: mpsc::Receiver<Done>) {
    while let Some(Done {
        batch,
        run,
        embeddings,
        expired,
    }) = done.recv().await
    {
        for item in expired {
            if item.job.fail() {
                settler
                    .give_up_job(&item.job, deadline_error(), false)
                    .await;
            }
        }
        let mut answered: Vec<(Arc<InFlightJob>, JobResult)> = Vec::new();
        for (item, embedding) in batch.items.into_iter().zip(embeddings) {
            let embedding = match embedding {
                Ok(embedding) => embedding,
                Err(err) => {
                    // Maybe a passing condition (memory, a device reset): retry
                    // the job later. One that keeps failing reaches max_deliver
                    // and becomes a dead letter.
                    if item.job.fail() {
                        tracing::warn!(job = %item.job.id, error = %err, "inference failed; retrying the job later");
                        settler.retry_later(&item.job).await;
                    }
                    continue;
                }
            };
            if !item.job.complete_input(item.input, embedding, run) {
                continue;
            }
            let job = item.job;
            if job.expired(OffsetDateTime::now_utc()) {
                settler.give_up_job(&job, deadline_error(), false).await;
            } else {
                let result = JobResult::ok(job.id.clone(), job.take_embeddings(&model));
                answered.push((job, result));
            }
        }
        settler.answer(answered).await;
    }
}

pub fn deadline_error() -> JobError {
    JobError::new(
        ErrorCode::DeadlineExceeded,
        "the job's deadline passed before it could be answered",
    )
}
