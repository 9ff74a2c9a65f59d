//! The jetinfer worker. A job flows through four stages, one module each, in
//! this order:
//!
//! 1. [`intake`]: pull from JetStream, screen (reply subject, size, decoding,
//!    limits, model), apply the tenant's [`rate_limit`], tokenise;
//! 2. [`batch`]: form batches across jobs (inputs, padded tokens, max wait),
//!    shared fairly between tenants;
//! 3. [`infer`]: run each batch through the [`backend::Backend`] on its own thread;
//! 4. [`publish`]: hand each finished job to the [`settle::Settler`]: reply on
//!    its reply subject, flush, then ack.
//!
//! A stage imports the stages before it and the shared modules below them
//! all ([`job`], [`settle`], [`config`], [`backend`]), never a later stage.
//!
//! Every job ends settled through [`settle::Settler`]: answered and acked,
//! NAKed for a retry, or given up (error reply, dead letter, terminated).
//! Intake wraps each pulled message in a [`settle::Delivery`] at once, whose
//! message only [`settle`] can reach: no other module can ack, NAK or term.
//! [`exhausted`]: jobs that had all their deliveries (`max_deliver`) are
//! buried by the Settler and intake, and a sweep buries the ones JetStream
//! itself stopped delivering.
//! [`cancel`] follows cancelled bulk runs, whose jobs are answered
//! `cancelled` instead of computed.
//!
//! Shutdown flows the same way: cancelling stops intake, and each stage drains
//! what it holds before the next one sees its input close. What is not done
//! within the drain timeout is NAKed so another worker takes it at once.
//! A worker also stops on its own when [`supervise`] reports a failure (a
//! stage gone, the NATS connection gone or away too long): not ready, no more
//! progress acks, what it holds NAKed for another worker, and an error from
//! [`Worker::run_until_stopped`] that the binary turns into its exit status.
//!
//! Beside the data path: [`http`] (`/metrics`, `/healthz`, `/readyz`),
//! [`queue_depth`] (queue depth and drain estimate from JetStream),
//! [`discovery`] (the NATS Services API) and [`logging`] (the log, with
//! every control byte escaped). Metric names live in
//! `jetinfer-monitoring`; the stages call its one-line recording functions.

pub mod backend;
pub mod batch;
pub mod builder;
pub mod cancel;
pub mod config;
pub mod discovery;
pub mod exhausted;
pub mod http;
pub mod infer;
pub mod intake;
pub mod job;
pub mod logging;
pub mod publish;
pub mod queue_depth;
pub mod rate_limit;
pub mod settle;
pub mod supervise;

use std::sync::Arc;
use std::time::Duration;

use jetinfer_schemas::Untrusted;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use backend::{candle::CandleBackend, echo::EchoBackend, Backend, BackendError};
pub use builder::WorkerBuilder;
use config::{BackendKind, ModelConfig, WorkerConfig};
use settle::Settler;
use supervise::Failure;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
    #[error(transparent)]
    Provision(#[from] jetinfer_nats::ProvisionError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Subject(#[from] jetinfer_nats::SubjectError),
    #[error(transparent)]
    Metrics(#[from] jetinfer_monitoring::InstallError),
    #[error("registering with the NATS Services API: {0}")]
    Discovery(async_nats::Error),
    #[error("[reply] allow: {0}")]
    ReplyPolicy(#[from] jetinfer_nats::subjects::ReplyPatternError),
    #[error(transparent)]
    RateLimit(#[from] rate_limit::RateLimitError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A model failed to load: start-up fails, naming it.
    #[error("loading model {model}: {message}")]
    Load { model: String, message: String },
    #[error("a backend was given for model {0:?}, which the config does not serve")]
    NotServed(String),
}

/// Loads the backend `config` names.
pub fn load_backend(config: &ModelConfig) -> Result<Arc<dyn Backend>, BackendError> {
    // Install first: a load recorded before the recorder exists would be lost.
    if let Err(err) = jetinfer_monitoring::install() {
        tracing::warn!(error = %Untrusted(&err), "metrics unavailable");
    }
    let clock = std::time::Instant::now();
    let loaded: Result<Arc<dyn Backend>, BackendError> = match config.backend {
        BackendKind::Candle => CandleBackend::load(config).map(|b| Arc::new(b) as Arc<dyn Backend>),
        BackendKind::Echo => Ok(Arc::new(EchoBackend::new(
            backend::echo::ECHO_MAX_SEQ_LEN,
            Duration::from_micros(config.echo_delay_per_token_us),
        ))),
    };
    match &loaded {
        Ok(b) => jetinfer_monitoring::model_loaded(
            &config.name,
            b.task().as_str(),
            &b.info().id,
            &b.info().revision,
            &b.compute(),
            clock.elapsed(),
        ),
        Err(_) => jetinfer_monitoring::model_load_failed(&config.name),
    }
    loaded
}

/// A running worker. Each handle below is described by its role in stopping.
pub struct Worker {
    /// Cancelled by the owner (the binary on SIGTERM, a test) or by the
    /// worker itself on a failure: every model's intake stops pulling, and
    /// the stages behind it drain as their input closes.
    shutdown: CancellationToken,
    /// Flipped to not ready as soon as the worker starts stopping.
    health: http::Health,
    /// One Services API instance per model, left first, so the Services API
    /// stops listing a stopping worker.
    services: Vec<async_nats::service::Service>,
    /// One pipeline per model served.
    pipelines: Vec<Pipeline>,
    /// Side tasks (per model: progress acks, the sweep for undeliverable
    /// jobs, queue depth; shared: cancel notices, the connection watch),
    /// stopped by `helpers_stop` after the drain, or at once on a failure,
    /// so no progress ack keeps a job held by a worker that cannot finish it.
    helpers: Vec<JoinHandle<()>>,
    helpers_stop: CancellationToken,
    drain_timeout: Duration,
    /// Failures reported by the stages and the connection watch; the first
    /// one stops the worker ([`Worker::run_until_stopped`]).
    failures: mpsc::Receiver<Failure>,
}

/// One model's stages, wired by [`WorkerBuilder`].
struct Pipeline {
    /// Ends within one pull expiry of the shutdown token, having admitted or
    /// NAKed every message it was sent; awaited before the rest.
    intake: Option<JoinHandle<()>>,
    /// The batcher and the publish stage, which finish on their own once
    /// intake stops; each runs under the [`supervise::Supervisor`], which reports one
    /// that ends while the worker is not stopping.
    stages: Vec<JoinHandle<()>>,
    /// The inference thread: ends when the batcher closes its input, joined
    /// only after a drain that finished in time.
    infer: Option<std::thread::JoinHandle<()>>,
    /// Hands back (NAKs) what the model's ledger still holds once the
    /// stages stop.
    settler: Settler,
}

impl Worker {
    /// A worker for `config`'s models; see [`WorkerBuilder`].
    pub fn builder(config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder::new(config)
    }

    /// Connects, provisions the stream and the model's consumer, and starts the
    /// pipeline, serving the first (usually only) model of `config` with
    /// `backend` and loading any other. When this returns the worker is
    /// consuming.
    pub async fn start(
        config: WorkerConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, WorkerError> {
        Self::start_with_health(config, backend, http::Health::default()).await
    }

    /// [`Worker::start`], reporting readiness into `health` (which the
    /// binary's HTTP endpoint serves as `/readyz`).
    pub async fn start_with_health(
        config: WorkerConfig,
        backend: Arc<dyn Backend>,
        health: http::Health,
    ) -> Result<Self, WorkerError> {
        let first = config.served().swap_remove(0).model.name;
        Self::builder(config)
            .backend(first, backend)
            .health(health)
            .start()
            .await
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

    /// What `/readyz` reports for this worker.
    pub fn health(&self) -> http::Health {
        self.health.clone()
    }

    /// Jobs held and not yet settled, over every model.
    pub fn jobs_in_hand(&self) -> usize {
        self.pipelines
            .iter()
            .map(|p| p.settler.ledger().len())
            .sum()
    }

    /// Runs until the shutdown token fires (then drains as [`Worker::join`]
    /// does and returns `Ok`) or a failure is reported: then the worker
    /// reports not ready for good, stops its progress acks, lets what is
    /// left of the pipeline wind down, NAKs what it still holds (with the
    /// retry delay, so a fleet failing the same way does not spin on it) for
    /// another worker, and returns the failure. The binary exits with
    /// [`Failure::exit_code`].
    pub async fn run_until_stopped(mut self) -> Result<(), Failure> {
        let failure = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            Some(failure) = self.failures.recv() => Some(failure),
        };
        let Some(failure) = failure else {
            self.join().await;
            return Ok(());
        };
        tracing::error!(%failure, jobs = self.jobs_in_hand(), "stopping on a failure: handing jobs back");
        self.health.set_failed(failure.to_string());
        self.helpers_stop.cancel();
        self.shutdown.cancel();
        self.stop(Some(&failure)).await;
        Err(failure)
    }

    /// Waits until the worker has stopped (after its shutdown token fires):
    /// the pipeline drains for up to the drain timeout, then whatever is still
    /// held is NAKed for immediate redelivery elsewhere.
    pub async fn join(&mut self) {
        self.shutdown.cancelled().await;
        self.stop(None).await;
    }

    /// Stops a worker whose shutdown token fired. After a `failure`, what it
    /// still holds is NAKed with the retry delay instead of for immediate
    /// redelivery; after a connection failure nothing more is said to NATS
    /// (it could not arrive: what the worker holds returns after `ack_wait`).
    async fn stop(&mut self, failure: Option<&Failure>) {
        let failed = failure.is_some();
        let unreachable = failure.is_some_and(Failure::is_connection);
        self.health.set_consumer_bound(false);
        if unreachable {
            tracing::warn!("NATS unreachable: jobs held here return after ack_wait");
            self.services.clear();
        }
        for service in self.services.drain(..) {
            match tokio::time::timeout(LAST_WORDS, service.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %Untrusted(&err), "leaving the NATS Services API failed")
                }
                Err(_) => tracing::warn!("leaving the NATS Services API timed out"),
            }
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // Every intake ends within one pull expiry of the cancel, having
        // admitted or NAKed every message it was sent; only then are the
        // ledgers complete.
        let intakes: Vec<_> = self
            .pipelines
            .iter_mut()
            .filter_map(|p| p.intake.take())
            .collect();
        futures::future::join_all(intakes).await;
        let rest: Vec<_> = self
            .pipelines
            .iter_mut()
            .flat_map(|p| p.stages.drain(..))
            .collect();
        let drained = tokio::time::timeout_at(deadline, futures::future::join_all(rest)).await;
        // After a full drain the ledgers are empty, unless a stage was gone
        // and dropped what it held: whatever is left goes back to the queue.
        let left: Vec<_> = self
            .pipelines
            .iter()
            .flat_map(|p| {
                p.settler
                    .ledger()
                    .jobs()
                    .into_iter()
                    .map(|job| (&p.settler, job))
            })
            .collect();
        if !left.is_empty() && !unreachable {
            if drained.is_err() {
                tracing::warn!(
                    jobs = left.len(),
                    "drain timeout: handing jobs back to the queue"
                );
            }
            let hand_back = async {
                for (settler, job) in &left {
                    if failed {
                        settler.retry_later(job).await;
                    } else {
                        settler.hand_back(job).await;
                    }
                }
            };
            if tokio::time::timeout(LAST_WORDS, hand_back).await.is_err() {
                tracing::warn!("handing jobs back timed out; they return after ack_wait");
            }
        }
        self.helpers_stop.cancel();
        // Side tasks have nothing to hand over; one stuck in a request to a
        // server that is gone is not waited for.
        let helpers: Vec<_> = self.helpers.drain(..).collect();
        let aborts: Vec<_> = helpers.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(LAST_WORDS, futures::future::join_all(helpers))
            .await
            .is_err()
        {
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        // One connection: one flush pushes every model's acks and NAKs.
        let settler = self.pipelines.first().map(|p| p.settler.clone());
        if unreachable {
            // Nothing to flush to.
        } else if let Some(settler) = settler {
            if tokio::time::timeout(LAST_WORDS, settler.flush())
                .await
                .is_err()
            {
                tracing::warn!("NATS took no final flush; unacked jobs return after ack_wait");
            }
        }
        if drained.is_ok() {
            let infers: Vec<_> = self
                .pipelines
                .iter_mut()
                .filter_map(|p| p.infer.take())
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                infers.into_iter().for_each(|t| {
                    let _ = t.join();
                })
            })
            .await;
        }
    }
}

/// How long each last exchange with NATS while stopping (leaving the
/// Services API, handing jobs back, the final flush) may take: a server that
/// is gone must not keep a stopping worker alive. Nothing is lost by giving
/// up: an unacked job is redelivered after `ack_wait`. (Intake is not cut
/// short: it ends within one pull expiry and must NAK all it was sent.)
const LAST_WORDS: Duration = Duration::from_secs(5);

/// Sends progress acks for every held job a few times per `ack_wait`, so jobs
/// waiting behind a long backlog or a slow batch are not redelivered while
/// this worker still has them.
async fn keep_alive(settler: Settler, ack_wait: Duration, stop: CancellationToken) {
    const BEATS_PER_ACK_WAIT: u32 = 3;
    let mut ticker = tokio::time::interval(ack_wait / BEATS_PER_ACK_WAIT);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {
                for job in settler.ledger().jobs() {
                    settler.keep_alive(&job).await;
                }
            }
        }
    }
}
