//! The publish stage: takes each finished batch from the inference thread,
//! records its metrics, and hands every job to the [`Settler`]: answered
//! (result stored, then acked), retried, or given up. Settling itself, and
//! every ack, lives in [`crate::settle`].
//!
//! Up to [`BATCHES_SETTLING`] batches are settled at once: a batch's results
//! wait for their PubAcks and then their double acks (two round trips to
//! JetStream), and the next batch's need not wait behind them. Each job is
//! still acked only after its own result is stored; the stage returns only
//! once every batch it took is settled.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use jetinfer_schemas::{ErrorCode, JobError, JobResult, ModelInfo, Task, Untrusted};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::infer::Done;
use crate::job::{deadline_error, InFlightJob};
use crate::settle::Settler;

/// Most finished batches being settled at once. Past it the stage stops
/// taking batches, the inference thread's `done` queue fills and the model
/// waits: the bound on jobs between computed and acked.
pub const BATCHES_SETTLING: usize = 8;

/// Runs until `done` closes (after the inference thread finished its last
/// batch) and every batch taken is settled.
pub async fn run(model: ModelInfo, settler: Settler, mut done: mpsc::Receiver<Done>) {
    let mut settling = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Settling first: finishing what is held frees room sooner.
            biased;
            Some(()) = settling.next(), if !settling.is_empty() => {}
            next = done.recv(), if settling.len() < BATCHES_SETTLING => match next {
                Some(finished) => settling.push(settle_batch(&model, &settler, finished)),
                None => break,
            },
        }
    }
    while settling.next().await.is_some() {}
}

/// Answers, retries or gives up every job of one finished batch.
async fn settle_batch(model: &ModelInfo, settler: &Settler, finished: Done) {
    let Done {
        batch,
        run,
        embeddings,
        expired,
    } = finished;
    if !batch.is_empty() {
        let tokens = batch.items.iter().map(|w| w.len).sum();
        jetinfer_monitoring::record_batch(
            settler.model(),
            settler.task().as_str(),
            run.size,
            tokens,
            batch.padded_tokens,
            run.elapsed,
        );
    }
    for item in expired {
        if item.job.fail() {
            let error = item
                .job
                .stale(OffsetDateTime::now_utc())
                .unwrap_or_else(deadline_error);
            settler.give_up_job(&item.job, error, false).await;
        }
    }
    let mut answered: Vec<(Arc<InFlightJob>, JobResult)> = Vec::new();
    for (item, embedding) in batch.items.into_iter().zip(embeddings) {
        let embedding = match embedding {
            Ok(embedding) => embedding,
            Err(err) if err.is_permanent() => {
                // A panic or a broken count, on this input alone: it
                // would fail the same way anywhere. Answered and
                // dead-lettered now, not redelivered to max_deliver.
                if item.job.fail() {
                    tracing::warn!(job = %item.job.id, error = %err, "inference failed for good");
                    let error = JobError::new(ErrorCode::Internal, err.to_string());
                    settler.give_up_job(&item.job, error, true).await;
                }
                continue;
            }
            Err(err) => {
                // Maybe a passing condition (memory, a device reset): retry
                // the job later. One that keeps failing reaches max_deliver
                // and becomes a dead letter.
                if item.job.fail() {
                    tracing::warn!(job = %Untrusted(&item.job.id), error = %Untrusted(&err), "inference failed; retrying the job later");
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
            let result = match job.task {
                Task::Rerank => JobResult::reranked(job.id.clone(), job.take_reranked(model)),
                _ => JobResult::ok(job.id.clone(), job.take_embeddings(model)),
            };
            answered.push((job, result));
        }
    }
    settler.answer(answered).await;
}
