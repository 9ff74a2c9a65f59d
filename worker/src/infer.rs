//! The inference stage: a dedicated OS thread that runs each batch through the
//! backend, so forward passes never block the async runtime.

use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError};
use crate::batch::Batch;
use crate::job::{BatchRun, InFlightJob};

/// A batch with its embeddings (or the backend's error).
pub struct Done {
    pub batch: Batch<InFlightJob>,
    pub run: BatchRun,
    pub embeddings: Result<Vec<Vec<f32>>, BackendError>,
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
            while let Some(batch) = batches.blocking_recv() {
                sequence += 1;
                let inputs: Vec<&[u32]> = batch
                    .items
                    .iter()
                    .map(|w| w.job.tokens[w.input].ids.as_slice())
                    .collect();
                let started = OffsetDateTime::now_utc();
                let clock = Instant::now();
                let embeddings = backend.embed(&inputs);
                let run = BatchRun {
                    batch: sequence,
                    started,
                    elapsed: clock.elapsed(),
                    size: inputs.len(),
                };
                drop(inputs);
                tracing::debug!(size = run.size, padded = batch.padded_tokens, elapsed = ?run.elapsed, "batch done");
                if done.blocking_send(Done { batch, run, embeddings }).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the inference thread")
}
