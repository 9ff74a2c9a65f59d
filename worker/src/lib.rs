//! The jetinfer worker. A job flows through four stages, one module each, in
//! this order:
//!
//! 1. [`intake`]: pull from JetStream, decode, validate, tokenise;
//! 2. [`batch`]: form batches across jobs (inputs, padded tokens, max wait);
//! 3. [`infer`]: run each batch through the [`backend::Backend`] on its own thread;
//! 4. [`publish`]: reply on each job's reply subject, flush, then ack.
//!
//! Shutdown flows the same way: cancelling stops intake, and each stage drains
//! what it holds before the next one sees its input close.

pub mod backend;
pub mod batch;
pub mod config;
pub mod infer;
pub mod intake;
pub mod job;
pub mod publish;

use std::sync::Arc;

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use backend::{candle::CandleBackend, echo::EchoBackend, Backend, BackendError};
use config::{BackendKind, ModelConfig, WorkerConfig};

/// Jobs admitted but not yet batched; bounds the worker's memory together with
/// the consumer's `max_ack_pending`.
const ADMITTED_QUEUE: usize = 1024;
/// Finished batches waiting for the publish stage.
const DONE_QUEUE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
    #[error(transparent)]
    Provision(#[from] jetinfer_nats::ProvisionError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Loads the backend `config` names.
pub fn load_backend(config: &ModelConfig) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match config.backend {
        BackendKind::Candle => Arc::new(CandleBackend::load(config)?),
        BackendKind::Echo => Arc::new(EchoBackend::default()),
    })
}

/// A running worker.
pub struct Worker {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    infer: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Connects, provisions the stream and the model's consumer, and starts the
    /// pipeline. When this returns the worker is consuming.
    pub async fn start(
        config: WorkerConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, WorkerError> {
        let client = jetinfer_nats::connect(&config.nats).await?;
        let js = jetstream::new(client.clone());
        let stream = jetinfer_nats::provision_stream(&js, &config.stream).await?;
        let consumer =
            jetinfer_nats::provision_consumer(&stream, &config.model.name, &config.consumer)
                .await?;
        tracing::info!(
            model = %config.model.name,
            id = %backend.info().id,
            revision = %backend.info().revision,
            stream = %config.stream.name,
            "worker consuming"
        );

        let shutdown = CancellationToken::new();
        let responder = publish::Responder::new(client);
        let (jobs_tx, jobs_rx) = mpsc::channel(ADMITTED_QUEUE);
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = mpsc::channel(DONE_QUEUE);

        let intake = intake::Intake {
            consumer,
            backend: Arc::clone(&backend),
            model: config.model.name.clone(),
            limits: config.limits,
            pull: config.pull,
            responder: responder.clone(),
        };
        let tasks = vec![
            tokio::spawn(intake.run(jobs_tx, shutdown.clone())),
            tokio::spawn(batch::run(config.batch, jobs_rx, batch_tx)),
            tokio::spawn(publish::run(backend.info().clone(), responder, done_rx)),
        ];
        let infer = infer::spawn(backend, batch_rx, done_tx);
        Ok(Self {
            shutdown,
            tasks,
            infer: Some(infer),
        })
    }

    /// A token that stops the worker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops pulling, finishes and answers what the worker holds, and returns.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Waits until the worker has stopped (after its shutdown token fires).
    pub async fn join(&mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(infer) = self.infer.take() {
            let _ = tokio::task::spawn_blocking(move || infer.join()).await;
        }
    }
}
