//! The inference stage: a dedicated OS thread that runs each batch through the
//! backend, so forward passes never block the async runtime.

use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError};
use crate::batch::{Batch, Waiting};
use crate::job::{BatchRun, InFlightJob};

/// A batch with its embeddings (or the backend's error).
pub struct Done {
    pub batch: Batch<InFlightJob>,
    pub run: BatchRun,
    /// One outcome per item of `batch`, in order.
    pub embeddings: Vec<Result<Vec<f32>, BackendError>>,
    /// Inputs left out because their job's deadline had passed or its bulk
    /// run was cancelled ([`InFlightJob::stale`]).
    pub expired: Vec<Waiting<InFlightJob>>,
}

/// Runs batches from `batches` until it closes; closing `done` in turn.
pub fn spawn(
    backend: Arc<dyn Backend>,
    mut batches: mpsc::Receiver<Batch<InFlightJob>>,
    done: mpsc::Sender<Done>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("jetinfer-infer".into())
        .spawn(move || {
            let mut sequence = 0u64;
            while let Some(mut batch) = batches.blocking_recv() {
                sequence += 1;
                // Deadlines and cancelled runs are checked again as the
                // batch forms: no compute for an answer nobody will take.
                let now = OffsetDateTime::now_utc();
                let (live, expired): (Vec<_>, Vec<_>) = batch
                    .items
                    .into_iter()
                    .partition(|w| w.job.stale(now).is_none());
                batch.items = live;
                let inputs: Vec<&[u32]> = batch
                    .items
                    .iter()
                    .map(|w| w.job.tokens[w.input].ids.as_slice())
                    .collect();
                let started = OffsetDateTime::now_utc();
                let clock = Instant::now();
                let embeddings = embed(backend.as_ref(), &inputs);
                let run = BatchRun {
                    batch: sequence,
                    started,
                    elapsed: clock.elapsed(),
                    size: inputs.len(),
                };
                drop(inputs);
                tracing::debug!(size = run.size, padded = batch.padded_tokens, elapsed = ?run.elapsed, "batch done");
                let done_batch = Done {
                    batch,
                    run,
                    embeddings,
                    expired,
                };
                if done.blocking_send(done_batch).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the inference thread")
}

/// Embeds `inputs` as one batch. If the batch fails, each input is retried
/// alone, so one input the model chokes on fails only its own job and not
/// every job that happened to share its batch.
fn embed(backend: &dyn Backend, inputs: &[&[u32]]) -> Vec<Result<Vec<f32>, BackendError>> {
    if inputs.is_empty() {
        return Vec::new();
    }
    match backend.embed(inputs) {
        Ok(embeddings) => embeddings.into_iter().map(Ok).collect(),
        Err(err) if inputs.len() == 1 => vec![Err(err)],
        Err(err) => {
            tracing::warn!(error = %jetinfer_schemas::Untrusted(&err), size = inputs.len(), "batch failed; running its inputs one by one");
            inputs
                .iter()
                .map(|input| {
                    backend
                        .embed(std::slice::from_ref(input))
                        .map(|mut v| v.remove(0))
                })
                .collect()
        }
    }
}
