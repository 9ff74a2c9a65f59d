//! The inference stage: a dedicated OS thread that runs each batch through the
//! backend, so forward passes never block the async runtime.
//!
//! What the backend hands back is checked: a panic in `Backend::embed` is
//! caught, and a result with more or fewer embeddings than inputs is an
//! error of that batch; either way the batch is re-run input by input, so
//! only the input at fault fails its job. A backend that says it is
//! unusable ends the stage, and the worker stops ([`crate::supervise`]).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError, Tokens};
use crate::batch::{Batch, Batches, Waiting};
use crate::job::{BatchRun, InFlightJob};
use crate::supervise::{panic_message, Stage, Supervisor};

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

/// Runs batches from `batches` until the batcher ends; closing `done` in turn.
///
/// Role in shutdown: it ends when the batcher ends `batches` (after intake
/// stopped and the batcher flushed), once it has handed on its last batch.
/// Ending any other way (the backend unusable, a panic outside the forward
/// pass, the publish stage gone) is reported to `supervisor`; the batch in
/// hand is then left in the ledger, which the stopping worker hands back.
pub fn spawn(
    backend: Arc<dyn Backend>,
    batches: Batches<InFlightJob>,
    done: mpsc::Sender<Done>,
    supervisor: Supervisor,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("jetinfer-infer".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run(backend.as_ref(), batches, done, &supervisor)
            }));
            // `run` reported its own reason where it has one.
            if let Err(payload) = outcome {
                supervisor.ended(Stage::Infer, Err(payload));
            }
        })
        .expect("spawning the inference thread")
}

fn run(
    backend: &dyn Backend,
    mut batches: Batches<InFlightJob>,
    done: mpsc::Sender<Done>,
    supervisor: &Supervisor,
) {
    let mut sequence = 0u64;
    // Asks for the next batch only when it can run it: the batcher forms it
    // then, from everything that arrived while the last one ran.
    while let Some(mut batch) = batches.blocking_next() {
        sequence += 1;
        // Deadlines and cancelled runs are checked again as the
        // batch forms: no compute for an answer nobody will take.
        let now = OffsetDateTime::now_utc();
        let (live, expired): (Vec<_>, Vec<_>) = batch
            .items
            .into_iter()
            .partition(|w| w.job.stale(now).is_none());
        batch.items = live;
        let inputs: Vec<&Tokens> = batch.items.iter().map(|w| &w.job.tokens[w.input]).collect();
        let started = OffsetDateTime::now_utc();
        let clock = Instant::now();
        let embeddings = match embed(backend, &inputs) {
            Ok(embeddings) => embeddings,
            Err(unusable) => {
                supervisor.stage_gone(Stage::Infer, unusable.to_string());
                return;
            }
        };
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
            supervisor.stage_gone(Stage::Infer, "the publish stage stopped taking batches");
            return;
        }
    }
    supervisor.ended(Stage::Infer, Ok(()));
}

/// Embeds `inputs` as one batch. If the batch fails, each input is retried
/// alone, so one input the model chokes on fails only its own job and not
/// every job that happened to share its batch. `Err` only when the backend
/// is unusable: nothing more can be computed here.
fn embed(
    backend: &dyn Backend,
    inputs: &[&Tokens],
) -> Result<Vec<Result<Vec<f32>, BackendError>>, BackendError> {
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    match checked_embed(backend, inputs) {
        Ok(embeddings) => Ok(embeddings.into_iter().map(Ok).collect()),
        Err(err @ BackendError::Unusable(_)) => Err(err),
        Err(err) if inputs.len() == 1 => Ok(vec![Err(err)]),
        Err(err) => {
            tracing::warn!(error = %jetinfer_schemas::Untrusted(&err), size = inputs.len(), "batch failed; running its inputs one by one");
            inputs
                .iter()
                .map(
                    |input| match checked_embed(backend, std::slice::from_ref(input)) {
                        Ok(mut one) => Ok(one.pop().ok_or(BackendError::WrongCount {
                            inputs: 1,
                            vectors: 0,
                        })),
                        Err(err @ BackendError::Unusable(_)) => Err(err),
                        Err(err) => Ok(Err(err)),
                    },
                )
                .collect()
        }
    }
}

/// `Backend::run` (embed, or classify for a reranking model) with its
/// panics caught and its count checked.
fn checked_embed(backend: &dyn Backend, inputs: &[&Tokens]) -> Result<Vec<Vec<f32>>, BackendError> {
    let vectors = std::panic::catch_unwind(AssertUnwindSafe(|| backend.run(inputs)))
        .map_err(|payload| BackendError::Panicked(panic_message(payload.as_ref())))??;
    if vectors.len() != inputs.len() {
        return Err(BackendError::WrongCount {
            inputs: inputs.len(),
            vectors: vectors.len(),
        });
    }
    Ok(vectors)
}
