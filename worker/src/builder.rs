//! Starting a worker, in named steps: [`WorkerBuilder::start`] checks the
//! policies, loads every model it was not handed, connects, provisions
//! JetStream (what all models share, then each model's subject and
//! consumer, retried while the server comes up), registers each model with
//! the Services API and wires one pipeline per model. Configured the way
//! async-nats configures a consumer:
//!
//! ```no_run
//! # async fn f(config: jetinfer_worker::config::WorkerConfig) -> Result<(), jetinfer_worker::WorkerError> {
//! let worker = jetinfer_worker::Worker::builder(config).start().await?;
//! # Ok(()) }
//! ```
//!
//! Per model: a durable consumer (`worker-<model>`), intake, a batcher, an
//! inference thread, a publish stage, its own ledger and Settler, progress
//! acks, the sweep for undeliverable jobs and the queue-depth poll. Shared:
//! the connection (and its watch), the tenants' rate limits, the cancel
//! notices, readiness and the supervisor: one model's stage gone stops the
//! whole worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{ServedModel, WorkerConfig};
use crate::job::Ledger;
use crate::settle::Settler;
use crate::supervise::{Stage, Supervisor};
use crate::{
    batch, cancel, discovery, exhausted, http, infer, intake, keep_alive, load_backend, publish,
    queue_depth, rate_limit, supervise, Pipeline, Worker, WorkerError,
};

/// Jobs admitted but not yet taken by the batcher, which takes them as they
/// come (they wait in its per-tenant lanes, not here in arrival order). The
/// worker's memory is bounded by the consumer's `max_ack_pending`.
const ADMITTED_QUEUE: usize = 1024;
/// Finished batches waiting for the publish stage.
const DONE_QUEUE: usize = 4;

/// How a worker is started: its config, the backends already loaded (any
/// model without one is loaded by [`WorkerBuilder::start`]) and where it
/// reports readiness.
pub struct WorkerBuilder {
    config: WorkerConfig,
    backends: HashMap<String, Arc<dyn Backend>>,
    health: http::Health,
}

/// One model with its backend, as the steps after loading see it.
struct Model {
    served: ServedModel,
    backend: Arc<dyn Backend>,
}

impl WorkerBuilder {
    pub(crate) fn new(config: WorkerConfig) -> Self {
        Self {
            config,
            backends: HashMap::new(),
            health: http::Health::default(),
        }
    }

    /// Serves `model` with `backend` instead of loading it from its config.
    pub fn backend(mut self, model: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        self.backends.insert(model.into(), backend);
        self
    }

    /// Reports readiness into `health` (which the binary's HTTP endpoint
    /// serves as `/readyz`).
    pub fn health(mut self, health: http::Health) -> Self {
        self.health = health;
        self
    }

    /// Loads what is not loaded, connects, provisions and starts every
    /// model's pipeline. When this returns the worker is consuming every
    /// model. A model that fails to load fails this, naming it.
    pub async fn start(self) -> Result<Worker, WorkerError> {
        let Self {
            config,
            mut backends,
            health,
        } = self;
        config.check_models()?;
        // Refuse a bad policy before touching the queue.
        let reply = jetinfer_nats::subjects::ReplyPolicy::new(&config.reply.allow)?;
        let rates = Arc::new(rate_limit::TenantLimits::new(&config.rate_limit)?);
        jetinfer_monitoring::install()?;

        let mut models = Vec::new();
        for served in config.served() {
            let backend = match backends.remove(&served.model.name) {
                Some(backend) => backend,
                None => load(&served).await?,
            };
            jetinfer_monitoring::register_model(&served.model.name, backend.task().as_str());
            models.push(Model { served, backend });
        }
        if let Some(extra) = backends.keys().next() {
            return Err(WorkerError::NotServed(extra.clone()));
        }
        health.set_model_loaded(true);

        let client = jetinfer_nats::connect(&config.nats).await?;
        health.set_client(client.clone());
        let js = jetstream::new(client.clone());
        let cancels = with_startup_retry(&config, || provision_shared(&js, &config)).await?;
        let mut queues = Vec::with_capacity(models.len());
        for model in &models {
            let name = &model.served.model.name;
            queues.push(with_startup_retry(&config, || provision_model(&js, &config, name)).await?);
        }
        let mut services = Vec::with_capacity(models.len());
        for model in &models {
            let service = discovery::announce(&client, &model.served, model.backend.info())
                .await
                .map_err(WorkerError::Discovery)?;
            services.push(service);
        }
        health.set_consumer_bound(true);

        let shutdown = CancellationToken::new();
        let helpers_stop = CancellationToken::new();
        let (supervisor, failures) = Supervisor::new(shutdown.clone());
        let cancellations = Arc::new(cancel::Cancellations::default());
        let shared = Shared {
            config: &config,
            client: &client,
            reply: &reply,
            rates: &rates,
            cancellations: &cancellations,
            supervisor: &supervisor,
            shutdown: &shutdown,
            helpers_stop: &helpers_stop,
        };
        let mut helpers = vec![
            tokio::spawn(supervise::watch_connection(
                client.clone(),
                config.supervision.max_disconnected,
                health.clone(),
                supervisor.clone(),
                helpers_stop.clone(),
            )),
            tokio::spawn(cancel::watch(
                cancels,
                Arc::clone(&cancellations),
                helpers_stop.clone(),
            )),
        ];
        let pipelines = models
            .into_iter()
            .zip(queues)
            .map(|(model, queue)| shared.wire(model, queue, &mut helpers))
            .collect();
        Ok(Worker {
            shutdown,
            health,
            services,
            pipelines,
            helpers,
            helpers_stop,
            drain_timeout: config.shutdown.drain_timeout,
            failures,
        })
    }
}

/// Loads `served`'s backend on a blocking thread.
async fn load(served: &ServedModel) -> Result<Arc<dyn Backend>, WorkerError> {
    let model = served.model.clone();
    let loaded = tokio::task::spawn_blocking(move || load_backend(&model)).await;
    let failed = |message: String| WorkerError::Load {
        model: served.model.name.clone(),
        message,
    };
    match loaded {
        Ok(Ok(backend)) => Ok(backend),
        Ok(Err(err)) => Err(failed(err.to_string())),
        Err(join) => Err(failed(format!("the load panicked: {join}"))),
    }
}

/// A server restarting or a leader election answers JetStream's API with
/// timeouts for a few seconds: a worker started then waits it out, as it
/// waits for the first connection, rather than exit: bounded by
/// `nats.startup_retry_for` alone, not by a count (a server without quorum
/// answers 503 at once, so three quick attempts would be over in a second).
/// Every provisioning step is idempotent, so a failed attempt is simply
/// made again.
async fn with_startup_retry<T, F, Fut>(
    config: &WorkerConfig,
    step: F,
) -> Result<T, jetinfer_nats::ProvisionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, jetinfer_nats::ProvisionError>>,
{
    step.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_total_delay(Some(config.nats.startup_retry_for))
            .without_max_times(),
    )
    .when(|err| !matches!(err, jetinfer_nats::ProvisionError::Subject(_)))
    .notify(
        |err, after| tracing::warn!(error = %err, retry_in = ?after, "provisioning JetStream failed; retrying"),
    )
    .await
}

/// What every model shares: the dead letters, the cancel notices (returned),
/// and the results stream and bulk bucket when tenants share one account.
async fn provision_shared(
    js: &jetstream::Context,
    config: &WorkerConfig,
) -> Result<jetstream::stream::Stream, jetinfer_nats::ProvisionError> {
    jetinfer_nats::dead_letter::provision_bounded(
        js,
        config.stream.replicas,
        config.stream.max_dead_letters_per_tenant,
    )
    .await?;
    if !config.stream.tenant_accounts {
        jetinfer_nats::results::provision(
            js,
            config.stream.results_max_age,
            config.stream.replicas,
        )
        .await?;
        jetinfer_nats::bulk::provision(js, config.stream.results_max_age, config.stream.replicas)
            .await?;
    }
    jetinfer_nats::bulk::provision_cancels(
        js,
        config.stream.results_max_age,
        config.stream.replicas,
    )
    .await
}

/// One model's queue: the jobs stream with its subject added, and its
/// durable consumer.
struct Queue {
    stream: jetstream::stream::Stream,
    consumer: jetstream::consumer::PullConsumer,
}

async fn provision_model(
    js: &jetstream::Context,
    config: &WorkerConfig,
    model: &str,
) -> Result<Queue, jetinfer_nats::ProvisionError> {
    let stream = jetinfer_nats::provision_stream(js, &config.stream, model).await?;
    let consumer = jetinfer_nats::provision_consumer(&stream, model, &config.consumer).await?;
    Ok(Queue { stream, consumer })
}

/// What each model's pipeline is wired to.
struct Shared<'a> {
    config: &'a WorkerConfig,
    client: &'a async_nats::Client,
    reply: &'a jetinfer_nats::subjects::ReplyPolicy,
    rates: &'a Arc<rate_limit::TenantLimits>,
    cancellations: &'a Arc<cancel::Cancellations>,
    supervisor: &'a Supervisor,
    shutdown: &'a CancellationToken,
    helpers_stop: &'a CancellationToken,
}

impl Shared<'_> {
    /// Starts `model`'s stages and inference thread, and pushes its side
    /// tasks (progress acks, the sweep, queue depth) onto `helpers`.
    fn wire(
        &self,
        Model { served, backend }: Model,
        Queue { stream, consumer }: Queue,
        helpers: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Pipeline {
        let config = self.config;
        let name = served.model.name.clone();
        // Its stages' failures name the model.
        let supervisor = self.supervisor.for_model(&name);
        tracing::info!(
            model = %name,
            id = %backend.info().id,
            revision = %backend.info().revision,
            stream = %config.stream.name,
            "worker consuming"
        );
        let ledger = Arc::new(Ledger::new(name.clone()));
        let settler = Settler::new(
            self.client.clone(),
            name.clone(),
            backend.task(),
            Arc::clone(&ledger),
            config.retry,
        )
        .with_limits(config.consumer.max_deliver, config.limits.max_job_bytes);
        let (jobs_tx, jobs_rx) = mpsc::channel(ADMITTED_QUEUE);
        let (batch_requests, batches) = batch::hand_over();
        let (done_tx, done_rx) = mpsc::channel(DONE_QUEUE);

        helpers.push(tokio::spawn(queue_depth::run(
            consumer.clone(),
            stream.clone(),
            config.monitoring.queue_poll,
            served.model.cuda_device(),
            self.helpers_stop.clone(),
        )));
        helpers.push(tokio::spawn(keep_alive(
            settler.clone(),
            config.consumer.ack_wait,
            self.helpers_stop.clone(),
        )));
        let sweep = exhausted::Sweep {
            settler: settler.clone(),
            consumer: consumer.clone(),
            stream,
            model: name.clone(),
            reply: self.reply.clone(),
            max_deliver: config.consumer.max_deliver,
        };
        helpers.push(tokio::spawn(exhausted::sweep(
            sweep,
            self.helpers_stop.clone(),
        )));

        let intake = intake::Intake {
            consumer,
            backend: Arc::clone(&backend),
            model: name,
            limits: config.limits,
            pull: config.pull,
            settler: settler.clone(),
            reply: self.reply.clone(),
            rates: Arc::clone(self.rates),
            cancellations: Arc::clone(self.cancellations),
        };
        let cost = if backend.pads_batches() {
            batch::Cost::Padded
        } else {
            batch::Cost::Packed
        };
        let intake = supervisor.spawn(Stage::Intake, intake.run(jobs_tx, self.shutdown.clone()));
        let stages = vec![
            supervisor.spawn(
                Stage::Batch,
                batch::run(served.batch, cost, jobs_rx, batch_requests),
            ),
            supervisor.spawn(
                Stage::Publish,
                publish::run(backend.info().clone(), settler.clone(), done_rx),
            ),
        ];
        let infer = infer::spawn(backend, batches, done_tx, supervisor);
        Pipeline {
            intake: Some(intake),
            stages,
            infer: Some(infer),
            settler,
        }
    }
}
